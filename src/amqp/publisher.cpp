// src/amqp/publisher.cpp
//   The publisher's AMQP thread: one Proton C++ container, one connection at a time, the $cbs link
//   pair (the token is put for the namespace, which covers every entity in it), and a sender link
//   per entity, opened when the first group for it comes. The main thread's groups wait in the
//   hand-off until the connection can send; each message is one transfer, and its outcome goes
//   back as a SendResult: accepted; refused for good (the link's attach or the transfer refused with
//   not-found, unauthorized-access, message-size-exceeded, not-allowed); or to be retried (server
//   busy, anything else, and every message whose answer a lost link or connection took with it).
//   Invariants: Proton callbacks and tasks on the connection's work queue run on this thread; the
//   main thread touches only the hand-off, under its mutex; every message handed over gets exactly
//   one result; nothing calls PostgreSQL.
#include "sbpg/amqp/publisher.hpp"

#include "consumer_impl.hpp"

#include <proton/connection_options.hpp>
#include <proton/error_condition.hpp>
#include <proton/logger.h>
#include <proton/sender_options.hpp>
#include <proton/ssl.hpp>
#include <proton/tracker.hpp>

#include <algorithm>
#include <csignal>

#include <pthread.h>

namespace sbpg {

namespace {

std::string
Describe(const proton::error_condition &e) {
	if (!e)
		return "closed by the peer";
	return e.name() + (e.description().empty() ? "" : ": " + e.description());
}

// Conditions that no retry can change: the row fails with the broker's reason.
bool
Permanent(const std::string &condition) {
	static const char *const kPermanent[] = {"amqp:not-found",
	                                         "com.microsoft:entity-not-found",
	                                         "amqp:unauthorized-access",
	                                         "amqp:link:message-size-exceeded",
	                                         "com.microsoft:message-size-exceeded",
	                                         "amqp:not-allowed",
	                                         "amqp:invalid-field",
	                                         "amqp:decode-error",
	                                         "com.microsoft:entity-disabled",
	                                         "com.microsoft:argument-error",
	                                         "com.microsoft:argument-out-of-range"};
	for (const char *p : kPermanent)
		if (condition == p)
			return true;
	return false;
}

std::string
Condition(pn_condition_t *c, std::string *name) {
	if (!c || !pn_condition_is_set(c))
		return "";
	const char *n = pn_condition_get_name(c);
	const char *d = pn_condition_get_description(c);
	*name = n ? n : "";
	return *name + (d && *d ? std::string(": ") + d : "");
}

} // namespace

struct Publisher::Impl : public proton::messaging_handler {
	Impl(PublisherConfig c, int fd) : cfg(std::move(c)), handoff(fd), cbs(cfg.conn, handoff, live) {}

	PublisherConfig cfg;
	amqp::Handoff handoff;
	std::deque<OutgoingGroup> to_send; // under handoff.mu
	std::vector<SendResult> results;   // under handoff.mu
	std::atomic<bool> stopping{false};
	std::unique_ptr<proton::container> container;
	std::thread thread;
	bool started = false;

	// AMQP thread only.
	amqp::Live live;
	amqp::CbsTokens cbs;
	struct Link {
		proton::sender sender;
		bool open = false;                                      // the broker answered the attach
		bool credited = false;                                  // and gave credit: a link refused at attach never does
		std::deque<OutgoingItem> queue;                         // waiting for the attach or credit
		std::unordered_map<pn_delivery_t *, int64_t> in_flight; // sent, unanswered
		int64_t progress_ms = 0; // the last attach, send or answer: nothing for 60 s drops the connection
	};
	std::map<std::string, Link> links;
	bool ready = false;      // the token was accepted (or none is needed): links may be opened
	bool connecting = false; // a connection was asked for and has not been lost yet
	int64_t reconnect_at = 0;
	int attempts = 0;
	bool conn_work_queued = false;
	uint64_t next_tag = 0;
	std::mt19937_64 rng{std::random_device{}()};

	void Result(int64_t id, SendResult::Kind kind, const std::string &error) {
		std::lock_guard<std::mutex> g(handoff.mu);
		results.push_back({kind, id, error});
	}

	// ---- the connection's life

	void Tick() {
		if (stopping.load())
			return;
		int64_t n = amqp::Now();
		if (!live.conn && reconnect_at && n >= reconnect_at) {
			if (cfg.conn.auth == ConsumerConfig::Auth::Jwt && !cbs.TokenReady()) {
				SetWaiting(true);
			} else {
				SetWaiting(false);
				reconnect_at = 0;
				Connect();
			}
		}
		if (live.conn && !conn_work_queued) {
			conn_work_queued = true;
			if (!live.conn.work_queue().add([this] { ConnectionWork(); }))
				conn_work_queued = false;
		}
		container->schedule(proton::duration(100), [this] { Tick(); });
	}

	void ConnectionWork() {
		conn_work_queued = false;
		if (stopping.load() || !live.conn)
			return;
		int64_t n = amqp::Now();
		std::string why = cbs.Work(n);
		if (why.empty()) {
			for (auto &kv : links)
				if ((!kv.second.in_flight.empty() || !kv.second.queue.empty()) && n - kv.second.progress_ms > 60000)
					why = "no progress sending to " + kv.first + " within 60 s (no attach, credit or answer)";
		}
		if (!why.empty())
			Lost(why);
	}

	void Connect() {
		std::string url = amqp::ConnectionUrl(cfg.conn);
		connecting = true;
		try {
			container->connect(url, amqp::ConnectionOptions(cfg.conn));
		} catch (const std::exception &e) {
			Lost(std::string("cannot connect to ") + url + ": " + e.what());
		}
	}

	void SetWaiting(bool w) {
		std::lock_guard<std::mutex> g(handoff.mu);
		handoff.status.waiting_for_token = w;
	}

	// The token was accepted (or none is needed): open links for what waits.
	void Ready() {
		ready = true;
		live.receiving = true;
		attempts = 0;
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			handoff.status.connected = true;
			handoff.status.connected_since_ms = amqp::Now();
		}
		handoff.Event(ConsumerEvent::Kind::Connected, "connected to " + cfg.conn.host + ":" +
		                                                  std::to_string(cfg.conn.port) +
		                                                  (cfg.conn.tls ? " (TLS)" : ""));
		Drain();
	}

	// Moves the main thread's groups to their links, opening links as needed, and sends.
	void Drain() {
		if (stopping.load() || !live.conn || !ready)
			return;
		std::deque<OutgoingGroup> groups;
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			groups.swap(to_send);
		}
		for (auto &grp : groups) {
			Link &l = links[grp.entity];
			if (l.queue.empty() && l.in_flight.empty())
				l.progress_ms = amqp::Now();
			for (auto &it : grp.items)
				l.queue.push_back(std::move(it));
			if (!l.sender) {
				proton::sender_options so;
				so.delivery_mode(proton::delivery_mode::AT_LEAST_ONCE);
				l.sender = live.conn.open_sender(grp.entity, so);
			} else {
				Pump(l);
			}
		}
	}

	void Pump(Link &l) {
		if (!l.open)
			return;
		pn_link_t *pl = amqp::LinkAccess::Get(l.sender);
		// A message over the size the broker gave for the link fails here, alone: sent, it could
		// make the broker detach the link and take the others with it.
		uint64_t max = pn_link_remote_max_message_size(pl);
		while (!l.queue.empty() && pn_link_credit(pl) > 0) {
			OutgoingItem it = std::move(l.queue.front());
			l.queue.pop_front();
			if (max && it.payload.size() > max) {
				Result(it.id, SendResult::Kind::Failed,
				       "amqp:link:message-size-exceeded: the message is " + std::to_string(it.payload.size()) +
				           " bytes, over the " + std::to_string(max) + " bytes the broker takes on this link");
				handoff.Wake();
				continue;
			}
			uint64_t tag = ++next_tag;
			pn_delivery_t *d = pn_delivery(pl, pn_dtag(reinterpret_cast<const char *>(&tag), sizeof tag));
			pn_link_send(pl, it.payload.data(), it.payload.size());
			pn_link_advance(pl);
			l.progress_ms = amqp::Now();
			l.in_flight.emplace(d, it.id);
		}
	}

	Link *Find(const proton::sender &s) {
		for (auto &kv : links)
			if (kv.second.sender == s)
				return &kv.second;
		return nullptr;
	}

	// Every message of a link gets its result: the link is gone.
	void FailLink(const std::string &entity, Link &l, const std::string &why, bool permanent) {
		SendResult::Kind k = permanent ? SendResult::Kind::Failed : SendResult::Kind::Retry;
		std::string text = permanent ? why : why + " (will be sent again)";
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			for (auto &kv : l.in_flight)
				results.push_back({k, kv.second, text});
			for (auto &it : l.queue)
				results.push_back({k, it.id, text});
		}
		l.in_flight.clear();
		l.queue.clear();
		links.erase(entity);
		handoff.Wake();
	}

	void Lost(const std::string &why) {
		if (live.conn && live.conn.active()) {
			try {
				live.conn.close();
			} catch (const std::exception &) {
			}
		}
		bool was_connected;
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			handoff.wq = nullptr;
			was_connected = handoff.status.connected;
			handoff.status.connected = false;
			handoff.status.token_expires_ms = 0;
			// Groups not handed to a link yet are answered too: the main thread sends them again.
			for (auto &grp : to_send)
				for (auto &it : grp.items)
					results.push_back({SendResult::Kind::Retry, it.id, why + " (will be sent again)"});
			to_send.clear();
		}
		while (!links.empty()) {
			auto it = links.begin();
			FailLink(it->first, it->second, why, false);
		}
		live.conn = proton::connection();
		live.receiving = false;
		ready = false;
		connecting = false;
		conn_work_queued = false;
		cbs.Reset();
		++live.gen;
		int64_t cap = std::min<int64_t>(cfg.conn.reconnect_max_ms, static_cast<int64_t>(cfg.conn.reconnect_min_ms)
		                                                               << std::min(attempts, 16));
		int64_t delay = static_cast<int64_t>(rng() % static_cast<uint64_t>(cap + 1));
		++attempts;
		reconnect_at = amqp::Now() + std::max<int64_t>(delay, 50);
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			++handoff.status.reconnects;
		}
		handoff.Event(was_connected ? ConsumerEvent::Kind::Disconnected : ConsumerEvent::Kind::Error,
		              why + "; retrying in " + std::to_string(reconnect_at - amqp::Now()) + " ms");
	}

	// ---- Proton's callbacks

	void on_container_start(proton::container &) override {
		reconnect_at = amqp::Now();
		Tick();
	}

	void on_transport_open(proton::transport &t) override {
		amqp::QuietLogger(pn_transport_logger(amqp::TransportAccess::Get(t)));
	}

	void on_connection_open(proton::connection &c) override {
		live.conn = c;
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			handoff.wq = &c.work_queue();
		}
		if (cfg.conn.auth == ConsumerConfig::Auth::Anonymous) {
			Ready();
			return;
		}
		std::string why = cbs.Open();
		if (!why.empty())
			Lost(why);
	}

	void on_sender_open(proton::sender &s) override {
		Link *l = Find(s);
		if (!l)
			return;
		// A refused attach comes without a target, then a detach with the reason.
		if (pn_terminus_get_type(pn_link_remote_target(amqp::LinkAccess::Get(s))) == PN_UNSPECIFIED)
			return;
		l->open = true;
		l->progress_ms = amqp::Now();
		Pump(*l);
	}

	void on_sendable(proton::sender &s) override {
		if (cbs.links().Owns(s)) {
			cbs.links().Flush();
			return;
		}
		if (Link *l = Find(s)) {
			l->credited = true;
			Pump(*l);
		}
	}

	void on_message(proton::delivery &d, proton::message &m) override {
		if (!cbs.links().Owns(d.receiver()))
			return;
		d.accept();
		std::string why;
		switch (cbs.OnReply(m, &why)) {
		case amqp::CbsTokens::Next::Nothing:
			break;
		case amqp::CbsTokens::Next::OpenReceiver:
			Ready();
			break;
		case amqp::CbsTokens::Next::Drop:
			Lost(why);
			break;
		}
	}

	void Answered(proton::tracker &t) {
		proton::sender s = t.sender();
		Link *l = Find(s);
		if (!l)
			return;
		pn_delivery_t *pd = amqp::DeliveryAccess::Get(t);
		auto it = l->in_flight.find(pd);
		if (it == l->in_flight.end())
			return;
		int64_t id = it->second;
		l->in_flight.erase(it);
		l->progress_ms = amqp::Now();
		uint64_t state = pn_delivery_remote_state(pd);
		if (state == PN_ACCEPTED) {
			Result(id, SendResult::Kind::Accepted, "");
		} else {
			std::string name;
			std::string text = Condition(pn_disposition_condition(pn_delivery_remote(pd)), &name);
			if (text.empty())
				text = state == PN_REJECTED ? "rejected by the broker" : "released by the broker";
			Result(id, Permanent(name) ? SendResult::Kind::Failed : SendResult::Kind::Retry, text);
		}
		handoff.Wake(); // Proton settles the delivery (auto-settle) once the broker settled it
		Pump(*l);
	}

	void on_tracker_accept(proton::tracker &t) override { Answered(t); }
	void on_tracker_reject(proton::tracker &t) override { Answered(t); }
	void on_tracker_release(proton::tracker &t) override { Answered(t); }
	// Settled by the broker without an outcome: not stored; sent again.
	void on_tracker_settle(proton::tracker &t) override { Answered(t); }

	void on_sender_error(proton::sender &s) override {
		if (cbs.links().Owns(s))
			return Lost("the $cbs link was detached: " + Describe(s.error()));
	}

	void on_sender_close(proton::sender &s) override { SenderGone(s); }
	void on_sender_detach(proton::sender &s) override { SenderGone(s); }

	// An entity's link ended. Refused at attach (it never got credit) with a condition no retry
	// changes (the entity does not exist, the identity may not send to it): its messages fail for
	// good. Detached after it opened (a token that expired, the broker's own reasons): they are
	// sent again on a new link.
	void SenderGone(proton::sender &s) {
		if (cbs.links().Owns(s) || stopping.load() || !live.conn)
			return;
		for (auto &kv : links) {
			if (kv.second.sender != s)
				continue;
			proton::error_condition e = s.error();
			bool refused = !kv.second.credited;
			std::string why = "the link to " + kv.first + " was " + (refused ? "refused" : "detached") + ": " +
			                  Describe(e);
			FailLink(kv.first, kv.second, why, refused && e && Permanent(e.name()));
			return;
		}
	}

	void on_receiver_error(proton::receiver &r) override {
		if (cbs.links().Owns(r))
			Lost("the $cbs link was detached: " + Describe(r.error()));
	}

	// An event of a connection that is gone already (a late close of the one before): ignored, so
	// that it cannot take the new connection down with it.
	bool Stale(const proton::connection &c) const {
		if (live.conn)
			return c != live.conn;
		return !connecting;
	}
	void on_transport_error(proton::transport &t) override {
		if (!Stale(t.connection()))
			Lost("connection failed: " + Describe(t.error()));
	}
	void on_connection_error(proton::connection &c) override {
		if (!Stale(c))
			Lost("connection closed: " + Describe(c.error()));
	}
	void on_session_error(proton::session &s) override {
		if (!Stale(s.connection()))
			Lost("the session ended: " + Describe(s.error()));
	}
	void on_transport_close(proton::transport &t) override {
		if (!stopping.load() && live.conn && !Stale(t.connection()))
			Lost("connection closed");
	}
	void on_error(const proton::error_condition &e) override { Lost("AMQP error: " + Describe(e)); }

	void Run() {
		try {
			container->run();
		} catch (const std::exception &e) {
			std::lock_guard<std::mutex> g(handoff.mu);
			handoff.status.dead = true;
			handoff.status.connected = false;
			handoff.events.push_back({ConsumerEvent::Kind::Error, std::string("the AMQP thread stopped: ") + e.what()});
		}
		handoff.Wake();
	}
};

Publisher::Publisher(PublisherConfig cfg, int wake_fd) : impl_(new Impl(std::move(cfg), wake_fd)) {}

Publisher::~Publisher() {
	Stop();
}

void
Publisher::Start() {
	Impl &i = *impl_;
	if (i.started)
		return;
	amqp::QuietLogger(pn_default_logger());
	i.container.reset(new proton::container(i, i.cfg.conn.container_id));
	i.thread = amqp::StartBlocked([&i] { i.Run(); });
	i.started = true;
}

void
Publisher::Stop() {
	Impl &i = *impl_;
	if (!i.started || i.stopping.exchange(true))
		return;
	{
		std::lock_guard<std::mutex> g(i.handoff.mu);
		i.handoff.wq = nullptr;
	}
	i.container->stop();
	if (i.thread.joinable())
		i.thread.join();
}

void
Publisher::Send(OutgoingGroup group) {
	Impl &i = *impl_;
	std::lock_guard<std::mutex> g(i.handoff.mu);
	i.to_send.push_back(std::move(group));
	// Holding mu keeps the connection (and its work queue) alive: Lost() clears wq under mu first.
	// Without a connection the group waits; the connection drains it once it can send.
	if (i.handoff.wq)
		(void)i.handoff.wq->add([&i] { i.Drain(); });
}

void
Publisher::TakeResults(std::vector<SendResult> *out) {
	std::lock_guard<std::mutex> g(impl_->handoff.mu);
	out->insert(out->end(), impl_->results.begin(), impl_->results.end());
	impl_->results.clear();
}

void
Publisher::TakeEvents(std::vector<ConsumerEvent> *out) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	out->insert(out->end(), h.events.begin(), h.events.end());
	h.events.clear();
}

PublisherStatus
Publisher::Status() {
	std::lock_guard<std::mutex> g(impl_->handoff.mu);
	const ConsumerStatus &c = impl_->handoff.status;
	PublisherStatus s;
	s.connected = c.connected;
	s.connected_since_ms = c.connected_since_ms;
	s.token_expires_ms = c.token_expires_ms;
	s.reconnects = c.reconnects;
	s.waiting_for_token = c.waiting_for_token;
	s.last_error = c.last_error;
	s.dead = c.dead;
	return s;
}

} // namespace sbpg
