// src/amqp/consumer.cpp
//   The AMQP thread: one Proton C++ container, one connection at a time, a $cbs link pair for
//   tokens, one peek-lock receiver (receiver settle mode second, so the broker confirms every
//   settlement) and the $management link pair. This file holds the Proton handler's callbacks,
//   which hand each event to the part that owns it (consumer_impl.hpp lists them), the hand-off
//   to the main thread, and Consumer's public calls. Invariants: Proton callbacks and the tasks
//   posted to the connection's work queue run on the AMQP thread; the main thread's calls touch
//   only the Handoff, under its mutex, and post work to the live connection's work queue while
//   holding that mutex (Lost clears the queue's pointer under it first); nothing calls PostgreSQL.
#include "consumer_impl.hpp"

#include <proton/error_condition.hpp>
#include <proton/logger.h>

#include <csignal>

#include <pthread.h>
#include <unistd.h>

namespace sbpg {

namespace {

std::string
Describe(const proton::error_condition &e) {
	if (!e)
		return "closed by the peer";
	return e.name() + (e.description().empty() ? "" : ": " + e.description());
}

} // namespace

namespace amqp {

void
Handoff::Wake() {
	uint64_t one = 1;
	ssize_t r = ::write(wake_fd, &one, sizeof one);
	(void)r;
}

void
Handoff::Event(ConsumerEvent::Kind kind, const std::string &text) {
	{
		std::lock_guard<std::mutex> g(mu);
		events.push_back({kind, text});
		if (kind == ConsumerEvent::Kind::Error || kind == ConsumerEvent::Kind::Disconnected)
			status.last_error = text;
	}
	Wake();
}

void
Handoff::Classify(ReceivedMessage *m) {
	std::shared_ptr<const Classifier> c;
	{
		std::lock_guard<std::mutex> g(mu);
		c = classifier;
	}
	if (c && c->registry)
		c->registry->Classify(m, c->options);
}

void
Handoff::FetchFailed(int64_t seq, bool not_found, std::string error) {
	std::lock_guard<std::mutex> g(mu);
	fetch_failures.push_back({seq, not_found, std::move(error)});
}

ReceivedMessage
Live::NewMessage() {
	ReceivedMessage rm;
	rm.delivery_id = ++next_id;
	rm.connection_gen = gen;
	rm.received_ms = Now();
	return rm;
}

} // namespace amqp

Consumer::Impl::Impl(ConsumerConfig c, int fd)
    : cfg(std::move(c)), handoff(fd), cbs(cfg, handoff, live), mgmt(cfg, handoff, live), locks(cfg, handoff, mgmt),
      deliveries(cfg, handoff, live, locks, mgmt), deferred(cfg, handoff, live, mgmt, locks),
      sessions(cfg, handoff, live, mgmt, deliveries), session_mode(cfg.sessions == ConsumerConfig::Sessions::On) {
	handoff.status.sessions = session_mode;
}

// ---- Proton's callbacks (AMQP thread)

void
Consumer::Impl::on_container_start(proton::container &) {
	if (cfg.auth == ConsumerConfig::Auth::Jwt)
		reconnect_at = amqp::Now(); // Tick connects once a token is there
	else
		Connect();
	Rearm();
}

void
Consumer::Impl::on_transport_open(proton::transport &t) {
	amqp::QuietLogger(pn_transport_logger(amqp::TransportAccess::Get(t)));
}

void
Consumer::Impl::on_connection_open(proton::connection &c) {
	live.conn = c;
	{
		std::lock_guard<std::mutex> g(handoff.mu);
		handoff.wq = &c.work_queue();
	}
	if (cfg.auth == ConsumerConfig::Auth::Anonymous) {
		OpenReceiver();
		return;
	}
	std::string why = cbs.Open();
	if (!why.empty())
		Lost(why);
}

void
Consumer::Impl::on_receiver_open(proton::receiver &r) {
	if (mgmt.OnOpened(r))
		return;
	if (sessions.Owns(r)) {
		// The connection counts as healthy (the reconnect backoff starts over) once a session is
		// locked, not when the receivers are only asked for.
		if (sessions.OnOpened(r))
			attempts = 0;
		return;
	}
	if (r != live.receiver)
		return;
	// A refused attach is answered without a source, then detached with the reason (on a session
	// entity, that sessions are required): nothing is received on it.
	if (pn_terminus_get_type(pn_link_remote_source(amqp::LinkAccess::Get(r))) == PN_UNSPECIFIED)
		return;
	deliveries.Start(r, cfg.prefetch);
	attempts = 0;
	MarkReceiving("receiving from " + cfg.entity + " on " + cfg.host + ":" + std::to_string(cfg.port) +
	              (cfg.tls ? " (TLS)" : ""));
}

// The connection receives (its receiver is open, or in session mode its session receivers are).
void
Consumer::Impl::MarkReceiving(const std::string &text) {
	{
		std::lock_guard<std::mutex> g(handoff.mu);
		handoff.status.connected = true;
		handoff.status.connected_since_ms = amqp::Now();
		handoff.status.in_flight = 0;
		handoff.status.generation = live.gen;
	}
	handoff.Event(ConsumerEvent::Kind::Connected, text);
}

void
Consumer::Impl::on_sender_open(proton::sender &s) {
	mgmt.OnOpened(s);
}

void
Consumer::Impl::on_sendable(proton::sender &s) {
	if (cbs.links().Owns(s))
		cbs.links().Flush();
	else if (mgmt.links().Owns(s))
		mgmt.links().Flush();
}

void
Consumer::Impl::on_message(proton::delivery &d, proton::message &m) {
	if (cbs.links().Owns(d.receiver())) {
		d.accept();
		OnCbsReply(m);
		return;
	}
	if (mgmt.links().Owns(d.receiver())) {
		d.accept();
		mgmt.OnReply(m);
		return;
	}
	if (!session_mode) {
		deliveries.Receive(d, m, 0);
		return;
	}
	// A session receiver that no longer holds its session (being released, or its lock lost):
	// nothing it delivers can be settled; the broker gives the message back when the link closes.
	uint64_t gen = sessions.LinkGen(d.receiver());
	if (!gen)
		return;
	sessions.OnActivity(d.receiver(), amqp::Now());
	deliveries.Receive(d, m, gen);
}

void
Consumer::Impl::on_delivery_settle(proton::delivery &d) {
	if (session_mode)
		sessions.OnActivity(d.receiver(), amqp::Now());
	deliveries.OnSettled(d);
}

void
Consumer::Impl::on_transport_error(proton::transport &t) {
	std::string why = Describe(t.error());
	// Proton matches the host name against the certificate's DNS names only.
	if (cfg.tls && why.find("certificate verify failed") != std::string::npos &&
	    cfg.host.find_first_not_of("0123456789.:[]abcdefABCDEF") == std::string::npos)
		why += " (the certificate is checked against the host name, and an IP address never matches: use a host name "
		       "that the certificate names)";
	Lost("connection failed: " + why);
}

void
Consumer::Impl::on_connection_error(proton::connection &c) {
	Lost("connection closed: " + Describe(c.error()));
}

// Service Bus's refusal of a receiver without a session filter on an entity that requires sessions.
bool
Consumer::Impl::RefusedForSessions(const proton::error_condition &e) const {
	return cfg.sessions == ConsumerConfig::Sessions::Detect && e && e.name() == "amqp:not-allowed" &&
	       (e.description().find("requires sessions") != std::string::npos ||
	        e.description().find("non-sessionful") != std::string::npos);
}

void
Consumer::Impl::on_receiver_error(proton::receiver &r) {
	if (mgmt.links().Owns(r))
		return mgmt.OnDetached("the $management link was detached: " + Describe(r.error()));
	if (sessions.Owns(r))
		return; // on_receiver_close, which follows, handles it
	if (r == live.receiver && !session_mode && RefusedForSessions(r.error())) {
		// The entity requires sessions: receive them from now on (this connection and the next).
		session_mode = true;
		live.receiver = proton::receiver();
		{
			std::lock_guard<std::mutex> g(handoff.mu);
			handoff.status.sessions = true;
		}
		OpenSessionReceivers();
		return;
	}
	Lost((cbs.links().Owns(r) ? "the $cbs link was detached: " : "the receiver was detached: ") + Describe(r.error()));
}

void
Consumer::Impl::on_sender_error(proton::sender &s) {
	if (mgmt.links().Owns(s))
		return mgmt.OnDetached("the $management link was detached: " + Describe(s.error()));
	Lost("the $cbs link was detached: " + Describe(s.error()));
}

void
Consumer::Impl::on_session_error(proton::session &s) {
	Lost("the session ended: " + Describe(s.error()));
}

void
Consumer::Impl::on_receiver_close(proton::receiver &r) {
	if (sessions.Owns(r)) {
		std::string why = sessions.OnClosed(r);
		if (!why.empty() && !stopping.load() && live.conn)
			Lost(why);
		return;
	}
	if (r == live.receiver && !stopping.load() && live.conn)
		Lost("the receiver was detached by the broker");
}

void
Consumer::Impl::on_transport_close(proton::transport &) {
	if (!stopping.load() && live.conn)
		Lost("connection closed");
}

void
Consumer::Impl::on_error(const proton::error_condition &e) {
	Lost("AMQP error: " + Describe(e));
}

void
Consumer::Impl::Run() {
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

// ---- Consumer's public calls (main thread)

Consumer::Consumer(ConsumerConfig cfg, int wake_fd) : impl_(new Impl(std::move(cfg), wake_fd)) {}

Consumer::~Consumer() {
	Stop();
}

void
Consumer::Start() {
	Impl &i = *impl_;
	if (i.started)
		return;
	amqp::QuietLogger(pn_default_logger());
	i.container.reset(new proton::container(i, i.cfg.container_id));
	i.thread = amqp::StartBlocked([&i] { i.Run(); });
	i.started = true;
}

void
Consumer::Stop() {
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

size_t
Consumer::TakeMessages(std::vector<ReceivedMessage> *out, size_t max) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	size_t n = 0;
	while (n < max && !h.inbox.empty()) {
		out->push_back(std::move(h.inbox.front()));
		h.inbox.pop_front();
		++n;
	}
	return n;
}

void
Consumer::Settle(std::vector<Settlement> settlements) {
	Impl &i = *impl_;
	amqp::Handoff &h = i.handoff;
	std::lock_guard<std::mutex> g(h.mu);
	if (!h.wq) {
		for (auto &s : settlements)
			h.results.push_back({s.delivery_id, false, "not connected: the settlement could not be sent"});
		return;
	}
	for (auto &s : settlements)
		h.to_settle.push_back(std::move(s));
	// Holding mu keeps the connection (and its work queue) alive: Lost() clears wq under mu first.
	if (!h.wq->add([&i] { i.deliveries.Drain(); })) {
		for (auto &s : h.to_settle)
			h.results.push_back({s.delivery_id, false, "the connection is closing: the settlement could not be sent"});
		h.to_settle.clear();
	}
}

void
Consumer::FetchDeferred(std::vector<int64_t> seqs) {
	Impl &i = *impl_;
	amqp::Handoff &h = i.handoff;
	std::lock_guard<std::mutex> g(h.mu);
	if (!h.wq || !h.status.management_ready) {
		for (int64_t s : seqs)
			h.fetch_failures.push_back({s, false, "not connected"});
		return;
	}
	h.to_fetch.insert(h.to_fetch.end(), seqs.begin(), seqs.end());
	if (!h.wq->add([&i] { i.deferred.Drain(); })) {
		for (int64_t s : h.to_fetch)
			h.fetch_failures.push_back({s, false, "the connection is closing"});
		h.to_fetch.clear();
	}
}

void
Consumer::Peek(int64_t from, int count) {
	Impl &i = *impl_;
	amqp::Handoff &h = i.handoff;
	std::lock_guard<std::mutex> g(h.mu);
	h.peek_from = from;
	h.peek_count = count;
	h.peek_done = false;
	h.peeked.clear();
	if (!h.wq || !h.status.management_ready || !h.wq->add([&i] { i.deferred.Peek(); })) {
		h.peek_done = true;
		h.peek_error = "not connected";
	}
}

bool
Consumer::TakePeeked(std::vector<ReceivedMessage> *out, std::string *error) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	if (!h.peek_done)
		return false;
	*error = h.peek_error;
	for (auto &m : h.peeked)
		out->push_back(std::move(m));
	h.peeked.clear();
	h.peek_done = false;
	return true;
}

void
Consumer::TakeFetchFailures(std::vector<FetchFailure> *out) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	out->insert(out->end(), h.fetch_failures.begin(), h.fetch_failures.end());
	h.fetch_failures.clear();
}

void
Consumer::SetRegistry(std::shared_ptr<const schema::Registry> registry, schema::ClassifyOptions options) {
	auto c = std::make_shared<amqp::Handoff::Classifier>();
	c->registry = std::move(registry);
	c->options = std::move(options);
	std::lock_guard<std::mutex> g(impl_->handoff.mu);
	impl_->handoff.classifier = std::move(c);
}

void
Consumer::TakeResults(std::vector<SettleResult> *out) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	out->insert(out->end(), h.results.begin(), h.results.end());
	h.results.clear();
}

void
Consumer::TakeEvents(std::vector<ConsumerEvent> *out) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	out->insert(out->end(), h.events.begin(), h.events.end());
	h.events.clear();
}

bool
Consumer::LinkLive(const ReceivedMessage &m) {
	if (!m.in_session)
		return true;
	std::lock_guard<std::mutex> g(impl_->handoff.mu);
	return impl_->handoff.live_links.count(m.link_gen) != 0;
}

void
Consumer::SetSessionStates(std::vector<SessionStateUpdate> updates) {
	Impl &i = *impl_;
	amqp::Handoff &h = i.handoff;
	std::lock_guard<std::mutex> g(h.mu);
	auto fail = [&h](std::vector<SessionStateUpdate> &us, const char *why) {
		for (auto &u : us)
			h.state_results.push_back({u.session_id, u.version, false, why});
		us.clear();
	};
	if (!h.wq)
		return fail(updates, "not connected");
	for (auto &u : updates)
		h.to_set_state.push_back(std::move(u));
	if (!h.wq->add([&i] { i.sessions.SetStates(); }))
		fail(h.to_set_state, "the connection is closing");
}

void
Consumer::TakeSessionStateResults(std::vector<SessionStateResult> *out) {
	amqp::Handoff &h = impl_->handoff;
	std::lock_guard<std::mutex> g(h.mu);
	out->insert(out->end(), h.state_results.begin(), h.state_results.end());
	h.state_results.clear();
}

ConsumerStatus
Consumer::Status() {
	std::lock_guard<std::mutex> g(impl_->handoff.mu);
	return impl_->handoff.status;
}

} // namespace sbpg
