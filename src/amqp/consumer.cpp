// src/amqp/consumer.cpp
//   The AMQP thread: one Proton C++ container, one connection at a time, a $cbs link pair for
//   tokens, one peek-lock receiver (receiver settle mode second, so the broker confirms every
//   settlement). Credit is granted only as settlements complete, so the consumer never holds more
//   than `prefetch` messages. Reconnection uses exponential backoff with full jitter, driven by a
//   short re-armed tick (a long Proton timer would delay container shutdown by its length).
#include "sbpg/amqp/consumer.hpp"

#include "sbpg/core/text.hpp"
#include "sbpg/identity/sas.hpp"

#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/connection.hpp>
#include <proton/connection_options.hpp>
#include <proton/container.hpp>
#include <proton/delivery.h>
#include <proton/delivery.hpp>
#include <proton/disposition.h>
#include <proton/error_condition.hpp>
#include <proton/link.h>
#include <proton/logger.h>
#include <proton/transport.h>
#include <proton/message.hpp>
#include <proton/message_id.hpp>
#include <proton/messaging_handler.hpp>
#include <proton/receiver.hpp>
#include <proton/receiver_options.hpp>
#include <proton/scalar.hpp>
#include <proton/sender.hpp>
#include <proton/ssl.hpp>
#include <proton/target_options.hpp>
#include <proton/transport.hpp>
#include <proton/types.hpp>
#include <proton/uuid.hpp>
#include <proton/value.hpp>
#include <proton/work_queue.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include <pthread.h>
#include <unistd.h>

namespace sbpg {

namespace {

// The C objects under Proton C++ wrappers, for what the 0.37 C++ API lacks (receiver settle mode,
// disposition conditions). A pointer to the protected accessor, formed through a derived class,
// may be applied to any object of the base.
struct LinkAccess : proton::receiver {
	static pn_link_t *Get(const proton::link &l) {
		auto fn = &LinkAccess::pn_object;
		return (l.*fn)();
	}
};
struct TransportAccess : proton::transport {
	static pn_transport_t *Get(const proton::transport &t) {
		auto fn = &TransportAccess::pn_object;
		return (t.*fn)();
	}
};
struct DeliveryAccess : proton::delivery {
	static pn_delivery_t *Get(const proton::transfer &t) {
		auto fn = &DeliveryAccess::pn_object;
		return (t.*fn)();
	}
};

// Proton's frame trace (PN_TRACE_FRM, PN_LOG in the environment) would print put-token bodies,
// that is tokens and SAS signatures, to the server log. Clear every level but CRITICAL, whatever
// the environment says (connection errors reach the log through the worker's own lines).
void
QuietLogger(pn_logger_t *l) {
	if (l)
		pn_logger_reset_mask(l, PN_SUBSYSTEM_ALL, PN_LEVEL_ALL & ~(PN_LEVEL_CRITICAL | PN_LEVEL_ERROR));
}

int64_t
Now() {
	return WallMs();
}

std::string
Truncate(const std::string &s, size_t n) {
	return s.size() <= n ? s : s.substr(0, n);
}

void
PutSymbolString(pn_data_t *d, const char *key, const std::string &value) {
	pn_data_put_symbol(d, pn_bytes(std::strlen(key), key));
	pn_data_put_string(d, pn_bytes(value.size(), value.data()));
}

} // namespace

struct Consumer::Impl : public proton::messaging_handler {
	ConsumerConfig cfg;
	int wake_fd;

	// Shared with the main thread (mu).
	std::mutex mu;
	std::deque<ReceivedMessage> inbox;
	std::vector<Settlement> to_settle;
	std::vector<SettleResult> results;
	std::vector<ConsumerEvent> events;
	std::vector<int64_t> to_fetch;                  // deferred messages the main thread asked for
	// Versioned schemas and how to use them, replaced as a whole (so a message never pays for
	// copying the options), or null.
	struct Classifier {
		std::shared_ptr<const schema::Registry> registry;
		schema::ClassifyOptions options;
	};
	std::shared_ptr<const Classifier> classifier;
	std::vector<Consumer::FetchFailure> fetch_failures;
	ConsumerStatus status;
	proton::work_queue *wq = nullptr; // of the live connection, or null
	std::atomic<bool> stopping{false};

	std::unique_ptr<proton::container> container;
	std::thread thread;
	bool started = false;

	// AMQP thread only.
	proton::connection conn;
	proton::receiver receiver;
	proton::sender cbs_sender;
	proton::receiver cbs_receiver;
	std::string cbs_reply;
	std::deque<proton::message> cbs_queue;
	uint64_t gen = 0;
	uint64_t next_id = 0;
	std::unordered_map<uint64_t, proton::delivery> unsettled;
	std::unordered_map<pn_delivery_t *, uint64_t> ids;
	bool broker_settles_first = false; // broker answered rcv-settle-mode first: settle locally
	int64_t reconnect_at = 0;
	int attempts = 0;
	int64_t refresh_at = 0;           // SAS: when to put the next token
	bool receiver_open = false;
	bool put_pending = false;         // a put-token awaits its answer
	int64_t put_sent_ms = 0;
	uint64_t put_serial = 0;          // JWT: the token last put (or being put) on this connection
	int64_t put_expires_ms = 0;       // JWT: its expiry
	int64_t accepted_expires_ms = 0;  // the token the broker last accepted on this connection
	uint64_t refused_serial = 0;      // JWT: the broker refused this token; wait for another
	bool waiting_noted = false;

	// Locks of the messages held (delivered on the receiver, or fetched over $management).
	struct Lock {
		uint8_t token[16];          // as the broker's $management expects it (RFC order)
		bool has_token = false;
		int64_t received_ms = 0;
		int64_t locked_until_ms = 0; // 0: the broker gave no lock expiry (never renewed)
		int64_t duration_ms = 0;     // the lock duration, as first given (renewals extend by it)
		bool renewing = false;
		bool single = false;         // renew alone (a batch renewal was refused as lock-lost)
		bool lost = false;
		bool fetched = false;        // received by sequence number: settled over $management
	};
	std::unordered_map<uint64_t, Lock> locks;
	proton::sender mgmt_sender;
	proton::receiver mgmt_receiver;
	std::string mgmt_reply;
	bool mgmt_sender_open = false, mgmt_receiver_open = false;
	bool mgmt_ever_open = false;   // on this connection: a later detach is reopened, not given up
	int64_t mgmt_reopen_at = 0;
	int mgmt_reopens = 0;
	uint64_t mgmt_next = 0;
	using MgmtDone = std::function<void(int64_t code, const std::string &desc, const proton::value &body)>;
	struct MgmtCall {
		MgmtDone done;
		int64_t sent_ms;
	};
	std::map<std::string, MgmtCall> mgmt_pending;
	std::deque<proton::message> mgmt_queue;
	int64_t next_renew_scan = 0;
	bool conn_work_queued = false;
	std::mt19937_64 rng{std::random_device{}()};

	Impl(ConsumerConfig c, int fd) : cfg(std::move(c)), wake_fd(fd) {}

	void Wake() {
		uint64_t one = 1;
		ssize_t r = ::write(wake_fd, &one, sizeof one);
		(void)r;
	}
	void Event(ConsumerEvent::Kind kind, const std::string &text) {
		{
			std::lock_guard<std::mutex> g(mu);
			events.push_back({kind, text, Now()});
			if (kind == ConsumerEvent::Kind::Error || kind == ConsumerEvent::Kind::Disconnected)
				status.last_error = text;
		}
		Wake();
	}

	// ---- connection lifecycle (AMQP thread)

	void Tick() {
		if (stopping.load())
			return;
		int64_t n = Now();
		if (!conn && reconnect_at && n >= reconnect_at) {
			if (cfg.auth == ConsumerConfig::Auth::Jwt && !TokenReady()) {
				// No usable token yet: the TokenSource is fetching or backing off. Connecting now
				// would only be refused; keep waiting (the worker shows why in sbpg.stats).
				SetWaiting(true);
			} else {
				SetWaiting(false);
				reconnect_at = 0;
				Connect();
			}
		}
		// What the connection does by itself runs in its own context (its work queue): frames
		// written from a timer callback would wait for the connection's next I/O event.
		if (conn && !conn_work_queued) {
			conn_work_queued = true;
			if (!conn.work_queue().add([this] { ConnectionWork(); }))
				conn_work_queued = false;
		}
		Rearm();
	}

	void ConnectionWork() {
		conn_work_queued = false;
		if (stopping.load() || !conn)
			return;
		int64_t n = Now();
		if (refresh_at && n >= refresh_at && cfg.auth == ConsumerConfig::Auth::Sas) {
			refresh_at = 0;
			PutToken();
		}
		if (put_pending && n - put_sent_ms > 60000) {
			Lost("no answer to put-token for " + cfg.audience + " within 60 s");
			return;
		}
		if (cbs_sender && !put_pending && cfg.auth == ConsumerConfig::Auth::Jwt) {
			BearerToken t;
			if (cfg.current_token(&t) && t.serial != put_serial && t.serial != refused_serial)
				PutJwt(t);
		}
		if (mgmt_reopen_at && n >= mgmt_reopen_at && receiver)
			ReopenMgmt();
		if (MgmtReady() && n >= next_renew_scan) {
			next_renew_scan = n + 250;
			RenewLocks(n);
		}
		ExpireMgmtCalls(n);
	}
	void Rearm() { container->schedule(proton::duration(100), [this] { Tick(); }); }

	void Connect() {
		std::string url = std::string(cfg.tls ? "amqps://" : "amqp://") + cfg.host + ":" + std::to_string(cfg.port);
		try {
			proton::connection_options o;
			o.idle_timeout(proton::duration(60000));
			o.sasl_enabled(true);
			o.sasl_allowed_mechs("ANONYMOUS");
			if (cfg.tls) {
				// The system's CA store, host-name verification, and the extra CA if one is set
				// (Proton adds it to the default paths). An unreadable CA file throws here.
				o.ssl_client_options(cfg.extra_ca_file.empty()
				                         ? proton::ssl_client_options()
				                         : proton::ssl_client_options(cfg.extra_ca_file, proton::ssl::VERIFY_PEER_NAME));
				o.virtual_host(cfg.host);
			}
			container->connect(url, o);
		} catch (const std::exception &e) {
			Lost(std::string("cannot connect to ") + url + ": " + e.what());
		}
	}

	// The connection is gone (or unusable): forget its deliveries and schedule a reconnect.
	void Lost(const std::string &why) {
		if (conn && conn.active()) {
			try {
				conn.close();
			} catch (const std::exception &) {
				// Already closing: nothing more to do for it.
			}
		}
		bool was_connected;
		std::vector<Settlement> orphaned;
		{
			std::lock_guard<std::mutex> g(mu);
			wq = nullptr;
			was_connected = status.connected;
			status.connected = false;
			status.in_flight = 0;
			status.token_expires_ms = 0;
			orphaned.swap(to_settle);
			for (auto &s : orphaned)
				results.push_back({s.delivery_id, false, "the connection was lost before the settlement was sent"});
		}
		FailMgmtCalls("the connection was lost");
		locks.clear();
		conn_work_queued = false; // a task queued on the old connection may never run
		mgmt_sender = proton::sender();
		mgmt_receiver = proton::receiver();
		mgmt_sender_open = mgmt_receiver_open = false;
		mgmt_ever_open = false;
		mgmt_reopen_at = 0;
		mgmt_reopens = 0;
		mgmt_queue.clear();
		{
			std::lock_guard<std::mutex> g(mu);
			status.management_ready = false;
			for (int64_t seq : to_fetch)
				fetch_failures.push_back({seq, false, "the connection was lost"});
			to_fetch.clear();
		}
		conn = proton::connection();
		receiver = proton::receiver();
		cbs_sender = proton::sender();
		cbs_receiver = proton::receiver();
		cbs_queue.clear();
		unsettled.clear();
		ids.clear();
		receiver_open = false;
		refresh_at = 0;
		put_pending = false;
		put_serial = 0;
		accepted_expires_ms = 0;
		++gen;
		int64_t cap = std::min<int64_t>(cfg.reconnect_max_ms, static_cast<int64_t>(cfg.reconnect_min_ms) << std::min(attempts, 16));
		int64_t delay = static_cast<int64_t>(rng() % static_cast<uint64_t>(cap + 1)); // full jitter
		++attempts;
		reconnect_at = Now() + std::max<int64_t>(delay, 50);
		{
			std::lock_guard<std::mutex> g(mu);
			++status.reconnects;
			status.generation = gen;
		}
		Event(was_connected ? ConsumerEvent::Kind::Disconnected : ConsumerEvent::Kind::Error,
		      why + "; retrying in " + std::to_string(reconnect_at - Now()) + " ms");
	}

	// A token worth connecting with: not refused, and with enough life left to be put and used
	// (a quarter of its lifetime, at most 30 s); otherwise wait for the renewal.
	bool TokenReady() {
		BearerToken t;
		if (!cfg.current_token || !cfg.current_token(&t) || t.serial == refused_serial)
			return false;
		int64_t margin = std::min<int64_t>(30000, (t.expires_ms - t.obtained_ms) / 4);
		return t.expires_ms - Now() >= margin;
	}

	void SetWaiting(bool w) {
		std::lock_guard<std::mutex> g(mu);
		status.waiting_for_token = w;
	}

	void on_transport_open(proton::transport &t) override { QuietLogger(pn_transport_logger(TransportAccess::Get(t))); }

	void on_container_start(proton::container &) override {
		if (cfg.auth == ConsumerConfig::Auth::Jwt)
			reconnect_at = Now(); // Tick connects once a token is there
		else
			Connect();
		container->schedule(proton::duration(100), [this] { Tick(); });
	}

	void on_connection_open(proton::connection &c) override {
		conn = c;
		{
			std::lock_guard<std::mutex> g(mu);
			wq = &c.work_queue();
		}
		if (cfg.auth != ConsumerConfig::Auth::Anonymous) {
			cbs_reply = "cbs-" + NewGuid();
			cbs_sender = c.open_sender("$cbs");
			cbs_receiver = c.open_receiver("$cbs", proton::receiver_options().credit_window(10).target(
			                                          proton::target_options().address(cbs_reply)));
			if (cfg.auth == ConsumerConfig::Auth::Sas) {
				PutToken();
			} else {
				BearerToken t;
				if (!cfg.current_token(&t)) {
					Lost("the token expired before it could be put");
					return;
				}
				PutJwt(t);
			}
		} else {
			OpenReceiver();
		}
	}

	void PutToken() {
		int64_t expiry = Now() / 1000 + cfg.sas_token_lifetime_s;
		proton::message m;
		m.id(proton::message_id(NewGuid()));
		m.reply_to(cbs_reply);
		m.to("$cbs");
		m.properties().put("operation", "put-token");
		m.properties().put("type", "servicebus.windows.net:sastoken");
		m.properties().put("name", cfg.audience);
		m.body(MakeSasToken(cfg.audience, cfg.sas_key_name, cfg.sas_key, expiry));
		put_expires_ms = expiry * 1000;
		put_pending = true;
		put_sent_ms = Now();
		cbs_queue.push_back(std::move(m));
		FlushCbs();
	}

	// An Entra ID token, put for the entity's audience as the Azure SDKs do.
	void PutJwt(const BearerToken &t) {
		proton::message m;
		m.id(proton::message_id(NewGuid()));
		m.reply_to(cbs_reply);
		m.to("$cbs");
		m.properties().put("operation", "put-token");
		m.properties().put("type", "jwt");
		m.properties().put("name", cfg.audience);
		m.body(t.jwt);
		put_serial = t.serial;
		put_expires_ms = t.expires_ms;
		put_pending = true;
		put_sent_ms = Now();
		cbs_queue.push_back(std::move(m));
		FlushCbs();
	}

	void FlushCbs() {
		while (!cbs_queue.empty() && cbs_sender && cbs_sender.credit() > 0) {
			cbs_sender.send(cbs_queue.front());
			cbs_queue.pop_front();
		}
	}

	void OnCbsReply(proton::message &m) {
		int64_t code = 0;
		std::string desc;
		try {
			proton::scalar s = m.properties().get("status-code");
			code = proton::coerce<int64_t>(s);
			if (m.properties().exists("status-description"))
				desc = proton::coerce<std::string>(m.properties().get("status-description"));
		} catch (const std::exception &e) {
			desc = std::string("unreadable put-token answer: ") + e.what();
		}
		put_pending = false;
		bool jwt = cfg.auth == ConsumerConfig::Auth::Jwt;
		if (code >= 200 && code < 300) {
			accepted_expires_ms = put_expires_ms;
			{
				std::lock_guard<std::mutex> g(mu);
				status.token_expires_ms = put_expires_ms;
				++status.tokens_put;
			}
			if (jwt)
				cfg.token_answer(put_serial, true, "");
			else // Renew at half the token's life, on this connection.
				refresh_at = Now() + cfg.sas_token_lifetime_s * 500;
			if (!receiver)
				OpenReceiver();
			else
				Event(ConsumerEvent::Kind::TokenRenewed,
				      "token renewed for " + cfg.audience + " until " + FormatTime(put_expires_ms));
			return;
		}
		std::string why = "put-token for " + cfg.audience + " was refused (" + std::to_string(code) + " " + desc + ")";
		if (jwt) {
			refused_serial = put_serial;
			cfg.token_answer(put_serial, false, std::to_string(code) + " " + desc);
			// A renewal refused while the accepted token still holds: keep the links (and their
			// locks) and put the next token when it comes.
			if (receiver && accepted_expires_ms > Now()) {
				Event(ConsumerEvent::Kind::TokenRefused, why + "; the accepted token holds until " + FormatTime(accepted_expires_ms));
				return;
			}
		}
		Lost(why);
	}

	void OpenReceiver() {
		receiver = conn.open_receiver(cfg.entity, proton::receiver_options().credit_window(0).auto_accept(false));
		// Peek-lock as Service Bus clients do it: the broker confirms each settlement.
		pn_link_set_rcv_settle_mode(LinkAccess::Get(receiver), PN_RCV_SECOND);
		if (cfg.management)
			OpenMgmt();
	}

	// Type, version and schema validation, here on the AMQP thread: the main thread only records
	// the verdict.
	void Classify(ReceivedMessage *m) {
		std::shared_ptr<const Classifier> c;
		{
			std::lock_guard<std::mutex> g(mu);
			c = classifier;
		}
		if (c && c->registry)
			c->registry->Classify(m, c->options);
	}

	// ---- $management: lock renewal, deferred messages (AMQP thread)

	bool MgmtReady() const { return mgmt_sender_open && mgmt_receiver_open && mgmt_sender && mgmt_sender.active(); }

	void MgmtFailed(const std::string &why) {
		mgmt_sender_open = mgmt_receiver_open = false;
		FailMgmtCalls(why);
		if (mgmt_ever_open) {
			// It worked on this connection: a detach (Service Bus detaches links idle for 10
			// minutes) is answered by opening the pair again, after a growing pause.
			{
				std::lock_guard<std::mutex> g(mu);
				status.management_ready = false;
			}
			int64_t delay = std::min<int64_t>(30000, 1000LL << std::min(mgmt_reopens, 5));
			++mgmt_reopens;
			mgmt_reopen_at = Now() + delay;
			Event(ConsumerEvent::Kind::Error, "the $management link was lost (" + why + "); reopening it in " +
			                                      std::to_string(delay) + " ms");
			return;
		}
		bool first;
		{
			std::lock_guard<std::mutex> g(mu);
			first = !status.management_failed;
			status.management_failed = true;
			status.management_ready = false;
		}
		if (first)
			Event(ConsumerEvent::Kind::Error, "the broker's $management link is unavailable (" + why +
			                                      "): message locks are not renewed and nothing is deferred");
	}

	void Request(const std::string &operation, proton::value body, MgmtDone done) {
		proton::message m;
		std::string id = "sbpg-" + std::to_string(++mgmt_next);
		m.id(proton::message_id(id));
		m.reply_to(mgmt_reply);
		m.properties().put("operation", operation);
		if (receiver)
			m.properties().put("associated-link-name", receiver.name());
		m.body(body);
		mgmt_pending[id] = MgmtCall{std::move(done), Now()};
		mgmt_queue.push_back(std::move(m));
		FlushMgmt();
	}

	void FlushMgmt() {
		while (!mgmt_queue.empty() && mgmt_sender && mgmt_sender.credit() > 0) {
			mgmt_sender.send(mgmt_queue.front());
			mgmt_queue.pop_front();
		}
	}

	void OnMgmtReply(proton::message &m) {
		std::string id;
		try {
			id = proton::coerce<std::string>(m.correlation_id());
		} catch (const std::exception &) {
			return;
		}
		auto it = mgmt_pending.find(id);
		if (it == mgmt_pending.end())
			return;
		MgmtDone done = std::move(it->second.done);
		mgmt_pending.erase(it);
		int64_t code = 0;
		std::string desc;
		try {
			auto props = m.properties();
			if (props.exists("statusCode"))
				code = proton::coerce<int64_t>(props.get("statusCode"));
			else if (props.exists("status-code"))
				code = proton::coerce<int64_t>(props.get("status-code"));
			if (props.exists("statusDescription"))
				desc = proton::coerce<std::string>(props.get("statusDescription"));
			else if (props.exists("status-description"))
				desc = proton::coerce<std::string>(props.get("status-description"));
			if (props.exists("errorCondition"))
				desc = proton::coerce<std::string>(props.get("errorCondition")) + (desc.empty() ? "" : ": " + desc);
		} catch (const std::exception &e) {
			code = 0;
			desc = std::string("unreadable $management answer: ") + e.what();
		}
		done(code, desc, m.body());
	}

	// Answers every outstanding request with code -1 (connection lost, or no $management).
	void FailMgmtCalls(const std::string &why) {
		std::map<std::string, MgmtCall> pending;
		pending.swap(mgmt_pending);
		mgmt_queue.clear();
		for (auto &p : pending)
			p.second.done(-1, why, proton::value());
	}

	void ExpireMgmtCalls(int64_t n) {
		std::vector<std::string> late;
		for (auto &p : mgmt_pending)
			if (n - p.second.sent_ms > 60000)
				late.push_back(p.first);
		for (auto &id : late) {
			MgmtDone done = std::move(mgmt_pending[id].done);
			mgmt_pending.erase(id);
			done(-1, "no answer within 60 s", proton::value());
		}
	}

	// Finds a key (string or symbol) in a $management body map.
	static bool Field(const proton::value &body, const char *key, proton::value *out) {
		try {
			std::map<proton::value, proton::value> m;
			proton::get(body, m);
			for (auto &kv : m) {
				if (proton::coerce<std::string>(kv.first) == key) {
					*out = kv.second;
					return true;
				}
			}
		} catch (const std::exception &) {
		}
		return false;
	}

	// Renews the locks of held messages before they run out: once less than half the lock
	// duration (at least 2 s) is left, for at most max_lock_renewal_ms after receipt.
	void RenewLocks(int64_t n) {
		std::vector<uint64_t> batch;
		for (auto &kv : locks) {
			Lock &l = kv.second;
			if (l.renewing || l.lost || !l.has_token || !l.locked_until_ms)
				continue;
			if (n - l.received_ms >= cfg.max_lock_renewal_ms)
				continue; // the bound on total renewal: the lock is let go
			if (!l.duration_ms)
				l.duration_ms = std::max<int64_t>(1000, l.locked_until_ms - l.received_ms);
			int64_t margin = std::max<int64_t>(l.duration_ms / 2, 2000);
			if (l.locked_until_ms - n > margin)
				continue;
			if (l.single) {
				SendRenewal({kv.first});
				continue;
			}
			batch.push_back(kv.first);
			if (batch.size() == 100) {
				SendRenewal(batch);
				batch.clear();
			}
		}
		if (!batch.empty())
			SendRenewal(batch);
	}

	void SendRenewal(const std::vector<uint64_t> &ids) {
		std::vector<proton::uuid> tokens;
		for (uint64_t id : ids) {
			Lock &l = locks[id];
			l.renewing = true;
			proton::uuid u;
			std::memcpy(&u[0], l.token, 16);
			tokens.push_back(u);
		}
		std::map<std::string, proton::value> body;
		body["lock-tokens"] = tokens;
		Request("com.microsoft:renew-lock", body, [this, ids](int64_t code, const std::string &desc, const proton::value &b) {
			for (uint64_t id : ids) {
				auto it = locks.find(id);
				if (it != locks.end())
					it->second.renewing = false;
			}
			if (code == 200) {
				std::vector<proton::timestamp> until;
				proton::value v;
				try {
					if (Field(b, "expirations", &v))
						proton::get(v, until);
				} catch (const std::exception &) {
					until.clear();
				}
				uint64_t renewed = 0;
				for (size_t i = 0; i < ids.size(); ++i) {
					auto it = locks.find(ids[i]);
					if (it == locks.end())
						continue;
					it->second.locked_until_ms = i < until.size() ? until[i].milliseconds() : Now() + 30000;
					++renewed;
				}
				std::lock_guard<std::mutex> g(mu);
				status.lock_renewals += renewed;
				return;
			}
			if (code == 410) {
				// A lock in the batch is gone: find which by renewing each alone.
				if (ids.size() == 1) {
					auto it = locks.find(ids[0]);
					if (it != locks.end())
						it->second.lost = true;
					std::lock_guard<std::mutex> g(mu);
					++status.locks_lost;
				} else {
					for (uint64_t id : ids) {
						auto it = locks.find(id);
						if (it != locks.end())
							it->second.single = true;
					}
				}
				return;
			}
			if (code == -1)
				return; // connection gone: its locks are gone with it
			// Anything else: try again at the next scan.
		});
	}

	void FetchOne(int64_t seq) {
		std::map<std::string, proton::value> body;
		body["sequence-numbers"] = std::vector<int64_t>{seq};
		body["receiver-settle-mode"] = static_cast<uint32_t>(1); // peek-lock
		uint64_t g0 = gen;
		Request("com.microsoft:receive-by-sequence-number", body,
		        [this, seq, g0](int64_t code, const std::string &desc, const proton::value &b) {
			        if (code == 200 && g0 == gen) {
				        proton::value list;
				        std::vector<proton::value> items;
				        try {
					        if (Field(b, "messages", &list))
						        proton::get(list, items);
				        } catch (const std::exception &) {
					        items.clear();
				        }
				        for (auto &item : items) {
					        proton::value tok, bin;
					        if (!Field(item, "lock-token", &tok) || !Field(item, "message", &bin))
						        continue;
					        ReceivedMessage rm;
					        rm.delivery_id = ++next_id;
					        rm.connection_gen = gen;
					        rm.received_ms = Now();
					        rm.fetched = true;
					        Lock l;
					        try {
						        proton::uuid u = proton::get<proton::uuid>(tok);
						        std::memcpy(l.token, &u[0], 16);
						        l.has_token = true;
						        proton::binary raw = proton::get<proton::binary>(bin);
						        DecodeMessage(std::string_view(reinterpret_cast<const char *>(raw.data()), raw.size()),
						                      cfg.max_json_depth, &rm);
					        } catch (const std::exception &e) {
						        rm.decode_error = ToValidUtf8(std::string("the deferred message could not be decoded: ") + e.what());
					        }
					        Classify(&rm);
					        l.received_ms = rm.received_ms;
					        l.locked_until_ms = rm.locked_until_ms;
					        l.fetched = true;
					        locks[rm.delivery_id] = l;
					        {
						        std::lock_guard<std::mutex> g(mu);
						        inbox.push_back(std::move(rm));
					        }
				        }
				        if (items.empty()) {
					        std::lock_guard<std::mutex> g(mu);
					        fetch_failures.push_back({seq, false, "the broker answered without the message"});
				        }
				        Wake();
				        return;
			        }
			        {
				        std::lock_guard<std::mutex> g(mu);
				        fetch_failures.push_back({seq, code == 404, std::to_string(code) + " " + desc});
			        }
			        Wake();
		        });
	}

	void DrainFetches() {
		std::vector<int64_t> seqs;
		{
			std::lock_guard<std::mutex> g(mu);
			seqs.swap(to_fetch);
		}
		for (int64_t seq : seqs) {
			if (!MgmtReady()) {
				std::lock_guard<std::mutex> g(mu);
				fetch_failures.push_back({seq, false, "the $management link is not open"});
				continue;
			}
			FetchOne(seq);
		}
		Wake();
	}

	// Settles a message received by sequence number: over $management, with its lock token.
	void SettleFetched(const Settlement &s, Lock &l) {
		std::map<std::string, proton::value> body;
		proton::uuid u;
		std::memcpy(&u[0], l.token, 16);
		body["lock-tokens"] = std::vector<proton::uuid>{u};
		switch (s.outcome) {
		case Outcome::Complete:
			body["disposition-status"] = std::string("completed");
			break;
		case Outcome::DeadLetter:
			body["disposition-status"] = std::string("suspended");
			body["deadletter-reason"] = Truncate(s.reason, 4096);
			body["deadletter-description"] = Truncate(s.description, 4096);
			break;
		case Outcome::Abandon:
			body["disposition-status"] = std::string("abandoned");
			break;
		case Outcome::Defer:
			body["disposition-status"] = std::string("defered"); // sic: the service's spelling
			break;
		}
		uint64_t id = s.delivery_id;
		l.renewing = true; // no renewal races the settlement
		Request("com.microsoft:update-disposition", body, [this, id](int64_t code, const std::string &desc, const proton::value &) {
			locks.erase(id);
			{
				std::lock_guard<std::mutex> g(mu);
				results.push_back({id, code == 200, code == 200 ? "" : std::to_string(code) + " " + desc});
			}
			Wake();
		});
	}

	void on_receiver_open(proton::receiver &r) override {
		if (r == mgmt_receiver) {
			mgmt_receiver_open = true;
			MgmtOpened();
			return;
		}
		if (r != receiver)
			return;
		receiver_open = true;
		broker_settles_first = pn_link_remote_rcv_settle_mode(LinkAccess::Get(r)) == PN_RCV_FIRST;
		attempts = 0;
		r.add_credit(cfg.prefetch);
		{
			std::lock_guard<std::mutex> g(mu);
			status.connected = true;
			status.connected_since_ms = Now();
			status.in_flight = 0;
			status.generation = gen;
		}
		Event(ConsumerEvent::Kind::Connected, "receiving from " + cfg.entity + " on " + cfg.host + ":" +
		                                          std::to_string(cfg.port) + (cfg.tls ? " (TLS)" : ""));
	}

	void MgmtOpened() {
		if (!mgmt_sender_open || !mgmt_receiver_open)
			return;
		mgmt_ever_open = true;
		mgmt_reopens = 0;
		std::lock_guard<std::mutex> g(mu);
		status.management_ready = true;
		status.management_failed = false;
	}

	void OpenMgmt() {
		std::string addr = cfg.entity + "/$management";
		mgmt_reply = "mgmt-" + NewGuid();
		mgmt_sender = conn.open_sender(addr);
		mgmt_receiver = conn.open_receiver(
		    addr, proton::receiver_options().credit_window(50).target(proton::target_options().address(mgmt_reply)));
	}

	void ReopenMgmt() {
		mgmt_reopen_at = 0;
		for (proton::link l : {proton::link(mgmt_sender), proton::link(mgmt_receiver)}) {
			try {
				if (l && l.active())
					l.close();
			} catch (const std::exception &) {
				// Already closing.
			}
		}
		OpenMgmt();
	}
	void on_sender_open(proton::sender &s) override {
		if (s == mgmt_sender) {
			mgmt_sender_open = true;
			MgmtOpened();
		}
	}

	void on_sendable(proton::sender &s) override {
		if (s == cbs_sender)
			FlushCbs();
		else if (s == mgmt_sender)
			FlushMgmt();
	}

	void on_message(proton::delivery &d, proton::message &m) override {
		if (d.receiver() == cbs_receiver) {
			d.accept();
			OnCbsReply(m);
			return;
		}
		if (d.receiver() == mgmt_receiver) {
			d.accept();
			OnMgmtReply(m);
			return;
		}
		ReceivedMessage rm;
		rm.delivery_id = ++next_id;
		rm.connection_gen = gen;
		rm.received_ms = Now();
		try {
			std::vector<char> buf;
			m.encode(buf);
			DecodeMessage(std::string_view(buf.data(), buf.size()), cfg.max_json_depth, &rm);
		} catch (const std::exception &e) {
			rm.decode_error = ToValidUtf8(std::string("the message could not be decoded: ") + e.what());
		}
		Classify(&rm);
		unsettled[rm.delivery_id] = d;
		ids[DeliveryAccess::Get(d)] = rm.delivery_id;
		{
			// The lock token is the delivery tag (.NET byte order); $management wants RFC order.
			Lock l;
			proton::binary tag = d.tag();
			if (tag.size() == 16) {
				DotNetGuidSwap(reinterpret_cast<const uint8_t *>(tag.data()), l.token);
				l.has_token = true;
			}
			l.received_ms = rm.received_ms;
			l.locked_until_ms = rm.locked_until_ms;
			locks[rm.delivery_id] = l;
		}
		{
			std::lock_guard<std::mutex> g(mu);
			inbox.push_back(std::move(rm));
			status.in_flight = static_cast<uint32_t>(unsettled.size());
		}
		Wake();
	}

	// Runs in the connection's context (work queue): sends the queued settlements.
	void DrainSettlements() {
		std::vector<Settlement> batch;
		{
			std::lock_guard<std::mutex> g(mu);
			batch.swap(to_settle);
		}
		std::vector<SettleResult> done;
		for (auto &s : batch) {
			auto lk = locks.find(s.delivery_id);
			if (s.connection_gen == gen && lk != locks.end() && lk->second.fetched) {
				SettleFetched(s, lk->second);
				continue;
			}
			auto it = unsettled.find(s.delivery_id);
			if (s.connection_gen != gen || it == unsettled.end()) {
				done.push_back({s.delivery_id, false, "the delivering connection is gone"});
				continue;
			}
			pn_delivery_t *pd = DeliveryAccess::Get(it->second);
			pn_disposition_t *local = pn_delivery_local(pd);
			uint64_t state = PN_ACCEPTED;
			switch (s.outcome) {
			case Outcome::Complete:
				state = PN_ACCEPTED;
				break;
			case Outcome::DeadLetter: {
				state = PN_REJECTED;
				pn_condition_t *cond = pn_disposition_condition(local);
				std::string reason = Truncate(s.reason, 4096), desc = Truncate(s.description, 4096);
				pn_condition_set_name(cond, "com.microsoft:dead-letter");
				pn_condition_set_description(cond, desc.c_str());
				pn_data_t *info = pn_condition_info(cond);
				pn_data_clear(info);
				pn_data_put_map(info);
				pn_data_enter(info);
				PutSymbolString(info, "DeadLetterReason", reason);
				PutSymbolString(info, "DeadLetterErrorDescription", desc);
				pn_data_exit(info);
				break;
			}
			case Outcome::Defer:
				// Service Bus defers on `modified` with undeliverable-here.
				state = PN_MODIFIED;
				pn_disposition_set_failed(local, false);
				pn_disposition_set_undeliverable(local, true);
				break;
			case Outcome::Abandon:
				if (cfg.release_to_abandon) {
					state = PN_RELEASED;
				} else {
					state = PN_MODIFIED;
					pn_disposition_set_failed(local, true);
					pn_disposition_set_undeliverable(local, false);
				}
				break;
			}
			pn_delivery_update(pd, state);
			if (broker_settles_first) {
				Finish(s.delivery_id, true, "");
				done.push_back({s.delivery_id, true, ""});
			}
		}
		if (!done.empty()) {
			{
				std::lock_guard<std::mutex> g(mu);
				results.insert(results.end(), done.begin(), done.end());
				status.in_flight = static_cast<uint32_t>(unsettled.size());
			}
			Wake();
		}
	}

	// Settles a delivery locally and returns its credit.
	void Finish(uint64_t id, bool, const std::string &) {
		auto it = unsettled.find(id);
		if (it == unsettled.end())
			return;
		proton::delivery d = it->second;
		ids.erase(DeliveryAccess::Get(d));
		unsettled.erase(it);
		locks.erase(id);
		d.settle();
		if (receiver && receiver.active())
			receiver.add_credit(1);
	}

	// The broker settled a delivery: the outcome took effect, or (rejected with an error) did not.
	void on_delivery_settle(proton::delivery &d) override {
		auto it = ids.find(DeliveryAccess::Get(d));
		if (it == ids.end()) {
			d.settle();
			return;
		}
		uint64_t id = it->second;
		pn_delivery_t *pd = DeliveryAccess::Get(d);
		bool ok = true;
		std::string err;
		if (pn_delivery_remote_state(pd) == PN_REJECTED) {
			pn_condition_t *c = pn_disposition_condition(pn_delivery_remote(pd));
			if (pn_condition_is_set(c)) {
				ok = false;
				const char *name = pn_condition_get_name(c), *desc = pn_condition_get_description(c);
				err = std::string(name ? name : "rejected") + (desc ? std::string(": ") + desc : "");
			}
		}
		Finish(id, ok, err);
		{
			std::lock_guard<std::mutex> g(mu);
			results.push_back({id, ok, err});
			status.in_flight = static_cast<uint32_t>(unsettled.size());
		}
		Wake();
	}

	std::string Describe(const proton::error_condition &e) {
		if (!e)
			return "closed by the peer";
		return e.name() + (e.description().empty() ? "" : ": " + e.description());
	}
	void on_transport_error(proton::transport &t) override {
		std::string why = Describe(t.error());
		// Proton matches the host name against the certificate's DNS names only.
		if (cfg.tls && why.find("certificate verify failed") != std::string::npos &&
		    cfg.host.find_first_not_of("0123456789.:[]abcdefABCDEF") == std::string::npos)
			why += " (the certificate is checked against the host name, and an IP address never matches: use a host name "
			       "that the certificate names)";
		Lost("connection failed: " + why);
	}
	void on_connection_error(proton::connection &c) override { Lost("connection closed: " + Describe(c.error())); }
	void on_receiver_error(proton::receiver &r) override {
		if (r == mgmt_receiver)
			return MgmtFailed("the $management link was detached: " + Describe(r.error()));
		Lost((r == cbs_receiver ? "the $cbs link was detached: " : "the receiver was detached: ") + Describe(r.error()));
	}
	void on_sender_error(proton::sender &s) override {
		if (s == mgmt_sender)
			return MgmtFailed("the $management link was detached: " + Describe(s.error()));
		Lost("the $cbs link was detached: " + Describe(s.error()));
	}
	void on_session_error(proton::session &s) override { Lost("the session ended: " + Describe(s.error())); }
	void on_receiver_close(proton::receiver &r) override {
		if (r == receiver && !stopping.load() && conn)
			Lost("the receiver was detached by the broker");
	}
	void on_transport_close(proton::transport &) override {
		if (!stopping.load() && conn)
			Lost("connection closed");
	}
	void on_error(const proton::error_condition &e) override { Lost("AMQP error: " + Describe(e)); }

	void Run() {
		try {
			container->run();
		} catch (const std::exception &e) {
			std::lock_guard<std::mutex> g(mu);
			status.dead = true;
			status.connected = false;
			events.push_back({ConsumerEvent::Kind::Error, std::string("the AMQP thread stopped: ") + e.what(), Now()});
		}
		Wake();
	}
};

Consumer::Consumer(ConsumerConfig cfg, int wake_fd) : impl_(new Impl(std::move(cfg), wake_fd)) {}

Consumer::~Consumer() {
	Stop();
}

void
Consumer::Start() {
	Impl &i = *impl_;
	if (i.started)
		return;
	QuietLogger(pn_default_logger());
	i.container.reset(new proton::container(i, i.cfg.container_id));
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	i.thread = std::thread([&i] { i.Run(); });
	pthread_sigmask(SIG_SETMASK, &old, nullptr);
	i.started = true;
}

void
Consumer::Stop() {
	Impl &i = *impl_;
	if (!i.started || i.stopping.exchange(true))
		return;
	{
		std::lock_guard<std::mutex> g(i.mu);
		i.wq = nullptr;
	}
	i.container->stop();
	if (i.thread.joinable())
		i.thread.join();
}

size_t
Consumer::TakeMessages(std::vector<ReceivedMessage> *out, size_t max) {
	std::lock_guard<std::mutex> g(impl_->mu);
	size_t n = 0;
	while (n < max && !impl_->inbox.empty()) {
		out->push_back(std::move(impl_->inbox.front()));
		impl_->inbox.pop_front();
		++n;
	}
	return n;
}

void
Consumer::Settle(std::vector<Settlement> settlements) {
	Impl &i = *impl_;
	std::lock_guard<std::mutex> g(i.mu);
	if (!i.wq) {
		for (auto &s : settlements)
			i.results.push_back({s.delivery_id, false, "not connected: the settlement could not be sent"});
		return;
	}
	for (auto &s : settlements)
		i.to_settle.push_back(std::move(s));
	// Holding mu keeps the connection (and its work queue) alive: Lost() clears wq under mu first.
	if (!i.wq->add([&i] { i.DrainSettlements(); })) {
		for (auto &s : i.to_settle)
			i.results.push_back({s.delivery_id, false, "the connection is closing: the settlement could not be sent"});
		i.to_settle.clear();
	}
}

void
Consumer::FetchDeferred(std::vector<int64_t> seqs) {
	Impl &i = *impl_;
	std::lock_guard<std::mutex> g(i.mu);
	if (!i.wq || !i.status.management_ready) {
		for (int64_t s : seqs)
			i.fetch_failures.push_back({s, false, "not connected"});
		return;
	}
	i.to_fetch.insert(i.to_fetch.end(), seqs.begin(), seqs.end());
	if (!i.wq->add([&i] { i.DrainFetches(); })) {
		for (int64_t s : i.to_fetch)
			i.fetch_failures.push_back({s, false, "the connection is closing"});
		i.to_fetch.clear();
	}
}

void
Consumer::TakeFetchFailures(std::vector<FetchFailure> *out) {
	std::lock_guard<std::mutex> g(impl_->mu);
	out->insert(out->end(), impl_->fetch_failures.begin(), impl_->fetch_failures.end());
	impl_->fetch_failures.clear();
}

void
Consumer::SetRegistry(std::shared_ptr<const schema::Registry> registry, schema::ClassifyOptions options) {
	auto c = std::make_shared<Impl::Classifier>();
	c->registry = std::move(registry);
	c->options = std::move(options);
	std::lock_guard<std::mutex> g(impl_->mu);
	impl_->classifier = std::move(c);
}

void
Consumer::TakeResults(std::vector<SettleResult> *out) {
	std::lock_guard<std::mutex> g(impl_->mu);
	out->insert(out->end(), impl_->results.begin(), impl_->results.end());
	impl_->results.clear();
}

void
Consumer::TakeEvents(std::vector<ConsumerEvent> *out) {
	std::lock_guard<std::mutex> g(impl_->mu);
	out->insert(out->end(), impl_->events.begin(), impl_->events.end());
	impl_->events.clear();
}

ConsumerStatus
Consumer::Status() {
	std::lock_guard<std::mutex> g(impl_->mu);
	return impl_->status;
}

} // namespace sbpg
