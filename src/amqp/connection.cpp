// src/amqp/connection.cpp
//   The life of the consumer's connection, on the AMQP thread: the 100 ms tick that connects
//   (once a usable token is there, for Entra ID) and posts the connection's own work to its work
//   queue; connecting; opening the receiver once the token is accepted; and the loss of a
//   connection, which voids its deliveries, locks and requests, answers what the main thread had
//   queued as failed, and schedules a reconnect with exponential backoff and full jitter.
//   Invariants: one connection at a time; a new connection has a new generation; the tick is
//   short and re-armed (a long Proton timer would delay container shutdown by its length).
#include "consumer_impl.hpp"

#include <proton/connection_options.hpp>
#include <proton/receiver_options.hpp>
#include <proton/ssl.hpp>

#include <algorithm>
#include <csignal>

#include <pthread.h>

namespace sbpg {

namespace amqp {

std::string
ConnectionUrl(const ConsumerConfig &cfg) {
	return std::string(cfg.tls ? "amqps://" : "amqp://") + cfg.host + ":" + std::to_string(cfg.port);
}

proton::connection_options
ConnectionOptions(const ConsumerConfig &cfg) {
	proton::connection_options o;
	o.idle_timeout(proton::duration(60000));
	o.sasl_enabled(true);
	o.sasl_allowed_mechs("ANONYMOUS");
	if (cfg.tls) {
		// The system's CA store, host-name verification, and the extra CA if one is set (Proton
		// adds it to the default paths). An unreadable CA file throws (when connecting).
		o.ssl_client_options(cfg.extra_ca_file.empty()
		                         ? proton::ssl_client_options()
		                         : proton::ssl_client_options(cfg.extra_ca_file, proton::ssl::VERIFY_PEER_NAME));
		o.virtual_host(cfg.host);
	}
	return o;
}

std::thread
StartBlocked(std::function<void()> fn) {
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	std::thread t(std::move(fn));
	pthread_sigmask(SIG_SETMASK, &old, nullptr);
	return t;
}

void
QuietLogger(pn_logger_t *l) {
	if (l)
		pn_logger_reset_mask(l, PN_SUBSYSTEM_ALL, PN_LEVEL_ALL & ~(PN_LEVEL_CRITICAL | PN_LEVEL_ERROR));
}

} // namespace amqp

void
Consumer::Impl::Tick() {
	if (stopping.load())
		return;
	int64_t n = amqp::Now();
	if (!live.conn && reconnect_at && n >= reconnect_at) {
		if (cfg.auth == ConsumerConfig::Auth::Jwt && !cbs.TokenReady()) {
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
	if (live.conn && !conn_work_queued) {
		conn_work_queued = true;
		if (!live.conn.work_queue().add([this] { ConnectionWork(); }))
			conn_work_queued = false;
	}
	Rearm();
}

void
Consumer::Impl::Rearm() {
	container->schedule(proton::duration(100), [this] { Tick(); });
}

// Token renewals, lock renewals, request time-outs: posted by Tick, run in the connection's context.
void
Consumer::Impl::ConnectionWork() {
	conn_work_queued = false;
	if (stopping.load() || !live.conn)
		return;
	int64_t n = amqp::Now();
	std::string why = cbs.Work(n);
	if (!why.empty()) {
		Lost(why);
		return;
	}
	mgmt.ReopenIfDue(n);
	locks.RenewDue(n);
	if (session_mode && live.receiving)
		sessions.Work(n);
	mgmt.Expire(n);
}

void
Consumer::Impl::Connect() {
	std::string url = amqp::ConnectionUrl(cfg);
	try {
		container->connect(url, amqp::ConnectionOptions(cfg));
	} catch (const std::exception &e) {
		Lost(std::string("cannot connect to ") + url + ": " + e.what());
	}
}

// The peek-lock receiver (and the $management pair beside it), once the connection may receive.
void
Consumer::Impl::OpenReceiver() {
	live.receiving = true;
	if (session_mode) {
		OpenSessionReceivers();
	} else {
		live.receiver = live.conn.open_receiver(cfg.entity,
		                                        proton::receiver_options().credit_window(0).auto_accept(false));
		// Peek-lock as Service Bus clients do it: the broker confirms each settlement.
		pn_link_set_rcv_settle_mode(amqp::LinkAccess::Get(live.receiver), PN_RCV_SECOND);
	}
	if (cfg.management)
		mgmt.Open();
}

// Session mode: receivers for the next available sessions, up to max_sessions. The connection
// counts as receiving at once, though no session may be free yet.
void
Consumer::Impl::OpenSessionReceivers() {
	sessions.Fill(amqp::Now());
	MarkReceiving("receiving up to " + std::to_string(cfg.max_sessions) + " sessions at once from " + cfg.entity +
	              " on " + cfg.host + ":" + std::to_string(cfg.port) + (cfg.tls ? " (TLS)" : ""));
}

void
Consumer::Impl::OnCbsReply(proton::message &m) {
	std::string why;
	switch (cbs.OnReply(m, &why)) {
	case amqp::CbsTokens::Next::Nothing:
		break;
	case amqp::CbsTokens::Next::OpenReceiver:
		OpenReceiver();
		break;
	case amqp::CbsTokens::Next::Drop:
		Lost(why);
		break;
	}
}

// The connection is gone (or unusable): forget its deliveries and schedule a reconnect.
void
Consumer::Impl::Lost(const std::string &why) {
	if (live.conn && live.conn.active()) {
		try {
			live.conn.close();
		} catch (const std::exception &) {
			// Already closing: nothing more to do for it.
		}
	}
	bool was_connected = ForgetConnection();
	ScheduleReconnect(why, was_connected);
}

// Voids everything tied to the lost connection, in this order: the main thread's view and its
// queued settlements, outstanding $management requests (their callbacks still see the locks),
// the locks, the link pairs, queued fetches, the links and deliveries. Returns whether the
// receiver was open.
bool
Consumer::Impl::ForgetConnection() {
	bool was_connected;
	{
		std::lock_guard<std::mutex> g(handoff.mu);
		handoff.wq = nullptr;
		was_connected = handoff.status.connected;
		handoff.status.connected = false;
		handoff.status.in_flight = 0;
		handoff.status.token_expires_ms = 0;
		std::vector<Settlement> orphaned;
		orphaned.swap(handoff.to_settle);
		for (auto &s : orphaned)
			handoff.results.push_back({s.delivery_id, false, "the connection was lost before the settlement was sent"});
	}
	mgmt.Reset();
	locks.Clear();
	conn_work_queued = false; // a task queued on the old connection may never run
	{
		std::lock_guard<std::mutex> g(handoff.mu);
		handoff.status.management_ready = false;
		for (int64_t seq : handoff.to_fetch)
			handoff.fetch_failures.push_back({seq, false, "the connection was lost"});
		handoff.to_fetch.clear();
		for (auto &u : handoff.to_set_state)
			handoff.state_results.push_back({u.session_id, u.version, false, "the connection was lost"});
		handoff.to_set_state.clear();
	}
	live.conn = proton::connection();
	live.receiver = proton::receiver();
	live.receiving = false;
	sessions.Reset();
	cbs.Reset();
	deliveries.Clear();
	++live.gen;
	return was_connected;
}

void
Consumer::Impl::ScheduleReconnect(const std::string &why, bool was_connected) {
	int64_t cap = std::min<int64_t>(cfg.reconnect_max_ms, static_cast<int64_t>(cfg.reconnect_min_ms)
	                                                          << std::min(attempts, 16));
	int64_t delay = static_cast<int64_t>(rng() % static_cast<uint64_t>(cap + 1)); // full jitter
	++attempts;
	reconnect_at = amqp::Now() + std::max<int64_t>(delay, 50);
	{
		std::lock_guard<std::mutex> g(handoff.mu);
		++handoff.status.reconnects;
		handoff.status.generation = live.gen;
	}
	handoff.Event(was_connected ? ConsumerEvent::Kind::Disconnected : ConsumerEvent::Kind::Error,
	              why + "; retrying in " + std::to_string(reconnect_at - amqp::Now()) + " ms");
}

void
Consumer::Impl::SetWaiting(bool w) {
	std::lock_guard<std::mutex> g(handoff.mu);
	handoff.status.waiting_for_token = w;
}

} // namespace sbpg
