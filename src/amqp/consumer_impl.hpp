// src/amqp/consumer_impl.hpp
//   The parts of Consumer::Impl, private to src/amqp (it pulls in Proton's headers, which nothing
//   outside the consumer needs, so it stays beside the sources rather than under include/):
//     Handoff          what the AMQP thread and the main thread share, under one mutex (consumer.cpp)
//     Live             the live connection, its receiver and its generation
//     NodeLinks        a request/response link pair, as $cbs and $management use (node_links.cpp)
//     CbsTokens        put-token on $cbs, SAS and Entra ID (cbs.cpp)
//     Management       requests on <entity>/$management and their answers (management.cpp)
//     LockTable        the locks of held messages and their renewal (locks.cpp)
//     Deliveries       receipt, dispositions, the broker's answers, credit (deliveries.cpp)
//     DeferredFetches  receive-by-sequence-number for the main thread (deferred.cpp)
//     SessionLinks     session receivers: next available session, renewal, release (sessions.cpp)
//     Consumer::Impl   the Proton handler that owns them (consumer.cpp) and the connection's
//                      life: connect, reconnect with backoff, loss (connection.cpp)
//   Thread rules: everything but Handoff belongs to the AMQP thread (Proton callbacks, the
//   container's timer, and tasks on the connection's work queue, which run on the same thread).
//   The main thread touches only Handoff, under its mutex, and hands work over through the live
//   connection's work queue; the AMQP thread wakes it through the eventfd. Nothing here calls
//   PostgreSQL.
#pragma once

#include "sbpg/amqp/consumer.hpp"

#include "sbpg/core/text.hpp"

#include <proton/connection.hpp>
#include <proton/connection_options.hpp>
#include <proton/logger.h>
#include <proton/container.hpp>
#include <proton/delivery.h>
#include <proton/delivery.hpp>
#include <proton/link.h>
#include <proton/message.hpp>
#include <proton/messaging_handler.hpp>
#include <proton/receiver.hpp>
#include <proton/sender.hpp>
#include <proton/transport.h>
#include <proton/transport.hpp>
#include <proton/types.hpp>
#include <proton/value.hpp>
#include <proton/work_queue.hpp>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg::amqp {

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

inline int64_t
Now() {
	return WallMs();
}

// Where and how to connect (SASL ANONYMOUS; TLS with the system's CAs, the extra CA file and the
// host name checked), shared by the consumer and the publisher (connection.cpp).
std::string ConnectionUrl(const ConsumerConfig &cfg);
proton::connection_options ConnectionOptions(const ConsumerConfig &cfg);
// Starts fn on a thread of its own with every signal blocked, so that PostgreSQL's handlers run
// only on the main thread.
std::thread StartBlocked(std::function<void()> fn);
// Proton's frame trace (PN_TRACE_FRM, PN_LOG in the environment) would print put-token bodies,
// that is tokens and SAS signatures: every level but CRITICAL and ERROR is cleared.
void QuietLogger(pn_logger_t *l);

inline std::string
Truncate(const std::string &s, size_t n) {
	return s.size() <= n ? s : s.substr(0, n);
}

// What the AMQP thread and the main thread share. Every field is read and written under mu; the
// eventfd write (Wake) happens after mu is released.
struct Handoff {
	explicit Handoff(int fd) : wake_fd(fd) {}

	const int wake_fd;
	std::mutex mu;
	std::deque<ReceivedMessage> inbox;
	std::vector<Settlement> to_settle;
	std::vector<SettleResult> results;
	std::vector<ConsumerEvent> events;
	std::vector<int64_t> to_fetch; // deferred messages the main thread asked for
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
	std::unordered_set<uint64_t> live_links; // session receivers holding their session now
	std::vector<SessionStateUpdate> to_set_state;
	std::vector<SessionStateResult> state_results;
	// A peek the main thread asked for (com.microsoft:peek-message) and its answer.
	int64_t peek_from = 0;
	int peek_count = 0;
	bool peek_done = false;
	std::string peek_error;
	std::vector<ReceivedMessage> peeked;

	// Writes the eventfd the main thread waits on. Any thread; never under mu.
	void Wake();
	// Records an event for the main thread (and, for errors, the status's last error); wakes it.
	void Event(ConsumerEvent::Kind kind, const std::string &text);
	// Type, version and schema validation, here on the AMQP thread: the main thread only records
	// the verdict.
	void Classify(ReceivedMessage *m);
	// Records a deferred message that could not be fetched (takes mu; does not wake).
	void FetchFailed(int64_t seq, bool not_found, std::string error);
};

// The live connection and its peek-lock receiver (both null between connections), the connection
// generation (changes with every connection; settlements of older ones are refused), and the
// delivery-id counter (unique across connections).
struct Live {
	proton::connection conn;
	proton::receiver receiver; // null in session mode (SessionLinks holds the receivers)
	bool receiving = false;    // the receiver (or the session receivers) were opened on conn
	uint64_t gen = 0;
	uint64_t next_id = 0;
	uint64_t next_link_gen = 0; // session receivers' generations, unique across connections

	// A message received now on this connection, with the next delivery id.
	ReceivedMessage NewMessage();
};

// A request/response link pair on a node ($cbs, $management): a sender to the node, and a receiver
// from it whose target is a reply address of the pair's own; requests wait in a queue for credit.
class NodeLinks {
  public:
	// Opens the pair on `conn`; the reply address is `reply_prefix` and a new GUID.
	void Open(proton::connection &conn, const std::string &node, const std::string &reply_prefix, int credit);
	// Addresses the request's answer to this pair and sends it as soon as there is credit.
	void Send(proton::message m);
	void Flush();
	// Closes both links (if still open) before the pair is opened again.
	void Close();
	// The connection is gone: forgets the links and the queued requests.
	void Reset();
	void DropQueue() { queue_.clear(); }
	bool Owns(const proton::sender &s) const { return s == sender_; }
	bool Owns(const proton::receiver &r) const { return r == receiver_; }
	bool HasSender() const { return bool(sender_); }
	bool SenderActive() const { return sender_ && sender_.active(); }

  private:
	proton::sender sender_;
	proton::receiver receiver_;
	std::string reply_;
	std::deque<proton::message> queue_;
};

// put-token on the $cbs node: the SAS token (renewed at half its life on the same connection) or
// the Entra ID token of the TokenSource (put again whenever a new one is there).
class CbsTokens {
  public:
	CbsTokens(const ConsumerConfig &cfg, Handoff &handoff, Live &live) : cfg_(cfg), handoff_(handoff), live_(live) {}

	// Opens the $cbs link pair on the live connection and puts the first token. Returns why the
	// connection cannot go on (empty when it can).
	std::string Open();
	// Auth::Jwt: a token worth connecting with is there.
	bool TokenReady() const;
	// Runs in the connection's context: a SAS renewal that is due, a put-token left unanswered for
	// 60 s, a new Entra ID token. Returns why the connection must be dropped (empty: it may stay).
	std::string Work(int64_t now);
	enum class Next { Nothing, OpenReceiver, Drop };
	// The broker's answer to a put-token; on Drop, *why says why.
	Next OnReply(proton::message &m, std::string *why);
	NodeLinks &links() { return links_; }
	// The connection is gone.
	void Reset();

  private:
	void PutSas();
	void PutJwt(const BearerToken &t);
	void Put(const std::string &type, const std::string &token, int64_t expires_ms);
	Next Accepted();
	Next Refused(int64_t code, const std::string &desc, std::string *why);

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Live &live_;
	NodeLinks links_;
	int64_t refresh_at_ = 0;          // SAS: when to put the next token
	bool put_pending_ = false;        // a put-token awaits its answer
	int64_t put_sent_ms_ = 0;
	uint64_t put_serial_ = 0;         // JWT: the token last put (or being put) on this connection
	int64_t put_expires_ms_ = 0;      // its expiry
	int64_t accepted_expires_ms_ = 0; // the token the broker last accepted on this connection
	uint64_t refused_serial_ = 0;     // JWT: the broker refused this token; wait for another
};

// The request/response link pair on <entity>/$management: requests with a correlation id, answers
// matched to them, a 60 s time-out, and reopening after a detach of a pair that worked.
class Management {
  public:
	using Done = std::function<void(int64_t code, const std::string &desc, const proton::value &body)>;

	Management(const ConsumerConfig &cfg, Handoff &handoff, Live &live)
	    : cfg_(cfg), handoff_(handoff), live_(live) {}

	bool Ready() const { return sender_open_ && receiver_open_ && links_.SenderActive(); }
	// Opens the pair on the live connection (after the receiver, whose name requests carry).
	void Open();
	void ReopenIfDue(int64_t now);
	// One side of the pair is open; false when the link is not one of them.
	bool OnOpened(const proton::sender &s);
	bool OnOpened(const proton::receiver &r);
	// A link of the pair was detached (or the broker has none).
	void OnDetached(const std::string &why);
	// Sends a request; `done` runs once, on the AMQP thread, with the answer, or with code -1 when
	// the link or the connection is lost or no answer came within 60 s. The request names the
	// receiver it concerns (associated-link-name): link_name, else the receiver's.
	void Request(const std::string &operation, proton::value body, Done done, const std::string &link_name = "");
	void OnReply(proton::message &m);
	void Expire(int64_t now);
	NodeLinks &links() { return links_; }
	// The connection is gone: outstanding requests fail, the pair is forgotten.
	void Reset();
	// Finds a key (string or symbol) in a $management body map.
	static bool Field(const proton::value &body, const char *key, proton::value *out);

  private:
	struct Call {
		Done done;
		int64_t sent_ms;
	};
	void Opened();
	void Reopen();
	void FailCalls(const std::string &why);

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Live &live_;
	NodeLinks links_;
	bool sender_open_ = false, receiver_open_ = false;
	bool ever_open_ = false; // on this connection: a later detach is reopened, not given up
	int64_t reopen_at_ = 0;
	int reopens_ = 0;
	uint64_t next_ = 0;
	std::map<std::string, Call> pending_;
};

// The lock of a held message (delivered on the receiver, or fetched over $management).
struct Lock {
	uint8_t token[16];           // as the broker's $management expects it (RFC order)
	bool has_token = false;
	int64_t received_ms = 0;
	int64_t locked_until_ms = 0; // 0: the broker gave no lock expiry (never renewed)
	int64_t duration_ms = 0;     // the lock duration, as first given (renewals extend by it)
	bool renewing = false;       // a renewal or a settlement over $management is under way
	bool single = false;         // renew alone (a batch renewal was refused as lock-lost)
	bool lost = false;
	bool fetched = false;        // received by sequence number: settled over $management
};

// The locks of every message handed to the main thread and not settled. Every 250 ms the locks
// with less than half their duration (at least 2 s) left are renewed, in batches of up to 100,
// for at most max_lock_renewal_ms after receipt.
class LockTable {
  public:
	LockTable(const ConsumerConfig &cfg, Handoff &handoff, Management &mgmt)
	    : cfg_(cfg), handoff_(handoff), mgmt_(mgmt) {}

	// Holds the lock of a message; `token` (RFC order) may be null when the broker gave none.
	void Hold(const ReceivedMessage &m, const uint8_t *token, bool fetched);
	Lock *Find(uint64_t id);
	void Release(uint64_t id) { locks_.erase(id); }
	void Clear() { locks_.clear(); }
	// Runs in the connection's context on every tick: renews what is due, every 250 ms at most.
	void RenewDue(int64_t now);

  private:
	void SendRenewal(const std::vector<uint64_t> &ids);
	void OnRenewed(const std::vector<uint64_t> &ids, const proton::value &body);
	void OnLockLost(const std::vector<uint64_t> &ids);

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Management &mgmt_;
	std::unordered_map<uint64_t, Lock> locks_;
	int64_t next_scan_ = 0;
};

// Deliveries on the peek-lock receiver from receipt to settlement: decoding and handing them over,
// the dispositions the main thread asks for (over $management for fetched messages), the broker's
// answers, and credit, granted only as settlements complete so that at most `prefetch` messages
// are held.
class Deliveries {
  public:
	Deliveries(const ConsumerConfig &cfg, Handoff &handoff, Live &live, LockTable &locks, Management &mgmt)
	    : cfg_(cfg), handoff_(handoff), live_(live), locks_(locks), mgmt_(mgmt) {}

	// The receiver is open: grant the first credit.
	void Start(proton::receiver &r, uint32_t credit);
	// link_gen: the session receiver's (0 when not in session mode).
	void Receive(proton::delivery &d, proton::message &m, uint64_t link_gen);
	// A session receiver lost its session: its deliveries can no longer be settled (settlements
	// the main thread sends for them are answered as failed).
	void DropLink(const proton::receiver &r);
	// How many deliveries of the receiver are not settled.
	size_t UnsettledOn(const proton::receiver &r) const;
	// Runs in the connection's context: sends the settlements the main thread queued.
	void Drain();
	// The broker settled a delivery: the outcome took effect, or (rejected with an error) did not.
	void OnSettled(proton::delivery &d);
	// The connection is gone: its deliveries cannot be settled any more.
	void Clear();

  private:
	void Dispose(pn_delivery_t *pd, const Settlement &s);
	void SettleFetched(const Settlement &s, Lock &l);
	void Finish(uint64_t id);

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Live &live_;
	LockTable &locks_;
	Management &mgmt_;
	std::unordered_map<uint64_t, proton::delivery> unsettled_;
	std::unordered_map<pn_delivery_t *, uint64_t> ids_;
	bool broker_settles_first_ = false; // broker answered rcv-settle-mode first: settle locally
};

// Session mode: up to max_sessions receivers, each attached with com.microsoft:session-filter
// null (the next available session; the broker may keep the attach waiting up to
// com.microsoft:timeout) and then holding the session the broker locked for it. Each receiver has
// a link generation of its own, carried by its messages; while it holds its session the generation
// is in Handoff::live_links. The session lock is renewed (renew-session-lock) at half its
// duration; a session without messages for session_idle_ms and with nothing unsettled is released
// (the link closed); a lost lock (detach with session-lock-lost, a refused renewal, expiry) drops
// that receiver's deliveries. A receiver that ends for any of these reasons, or because no session
// was free, is replaced by a new one on the next tick.
class SessionLinks {
  public:
	SessionLinks(const ConsumerConfig &cfg, Handoff &handoff, Live &live, Management &mgmt, Deliveries &deliveries)
	    : cfg_(cfg), handoff_(handoff), live_(live), mgmt_(mgmt), deliveries_(deliveries) {}

	// Opens receivers up to max_sessions on the live connection.
	void Fill(int64_t now);
	bool Owns(const proton::receiver &r) const { return Find(r) != nullptr; }
	// The link generation of a session receiver (0 when r is not one).
	uint64_t LinkGen(const proton::receiver &r) const;
	// The broker answered r's attach: true when it locked a session for it.
	bool OnOpened(proton::receiver &r);
	// r is closed (by the broker: no session free, lock lost, an error; or by us). Returns the
	// error that must drop the connection, or empty.
	std::string OnClosed(proton::receiver &r);
	void OnActivity(const proton::receiver &r, int64_t now);
	// Runs in the connection's context on every tick: renewals, idle releases, replacements.
	void Work(int64_t now);
	// Runs in the connection's context: puts the states the main thread queued, for the sessions
	// held (the others are answered as failed).
	void SetStates();
	// The connection is gone.
	void Reset();
	size_t Held() const;

  private:
	struct Link {
		proton::receiver receiver;
		uint64_t gen = 0;
		std::string session_id;
		bool locked = false;    // the broker locked a session for it
		bool closing = false;   // closed by us (idle release or lost lock)
		bool renewing = false;  // a renew-session-lock is under way
		// When to renew, on the local clock: the broker's locked-until is on its own clock, so
		// only the lock's length is taken from it (and renewals come at most 10 s apart).
		int64_t renew_at_ms = 0, duration_ms = 0, last_activity_ms = 0;
	};
	Link *Find(const proton::receiver &r);
	const Link *Find(const proton::receiver &r) const;
	void Renew(Link &l);
	void Lose(Link &l, const std::string &why);
	void Publish();

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Live &live_;
	Management &mgmt_;
	Deliveries &deliveries_;
	std::vector<Link> links_;
	int64_t fill_at_ = 0; // when to open replacements (a short pause after a refusal)
};

// Deferred messages the main thread asks for by sequence number: received over $management
// (peek-lock) and handed over with the other messages; failures go back as FetchFailures.
class DeferredFetches {
  public:
	DeferredFetches(const ConsumerConfig &cfg, Handoff &handoff, Live &live, Management &mgmt, LockTable &locks)
	    : cfg_(cfg), handoff_(handoff), live_(live), mgmt_(mgmt), locks_(locks) {}

	// Runs in the connection's context: asks for the sequence numbers the main thread queued.
	void Drain();
	// Runs in the connection's context: the peek the main thread asked for (Consumer::Peek).
	void Peek();

  private:
	void FetchOne(int64_t seq);
	void OnAnswer(int64_t seq, const proton::value &body);
	void Adopt(const proton::value &token, const proton::value &message);

	const ConsumerConfig &cfg_;
	Handoff &handoff_;
	Live &live_;
	Management &mgmt_;
	LockTable &locks_;
};

} // namespace sbpg::amqp

namespace sbpg {

struct Consumer::Impl : public proton::messaging_handler {
	Impl(ConsumerConfig c, int fd);

	ConsumerConfig cfg;
	amqp::Handoff handoff;
	std::atomic<bool> stopping{false};
	std::unique_ptr<proton::container> container;
	std::thread thread;
	bool started = false;

	// AMQP thread only.
	amqp::Live live;
	amqp::CbsTokens cbs;
	amqp::Management mgmt;
	amqp::LockTable locks;
	amqp::Deliveries deliveries;
	amqp::DeferredFetches deferred;
	amqp::SessionLinks sessions;
	bool session_mode = false; // receiving sessions on this entity (declared or detected)
	int64_t reconnect_at = 0;
	int attempts = 0;
	bool conn_work_queued = false;
	std::mt19937_64 rng{std::random_device{}()};

	// The connection's life (connection.cpp).
	void Tick();
	void Rearm();
	void ConnectionWork();
	void Connect();
	void OpenReceiver();
	void OpenSessionReceivers();
	void MarkReceiving(const std::string &text);
	bool RefusedForSessions(const proton::error_condition &e) const;
	void OnCbsReply(proton::message &m);
	void Lost(const std::string &why);
	bool ForgetConnection();
	void ScheduleReconnect(const std::string &why, bool was_connected);
	void SetWaiting(bool w);

	// Proton's callbacks (consumer.cpp).
	void on_container_start(proton::container &) override;
	void on_transport_open(proton::transport &t) override;
	void on_connection_open(proton::connection &c) override;
	void on_receiver_open(proton::receiver &r) override;
	void on_sender_open(proton::sender &s) override;
	void on_sendable(proton::sender &s) override;
	void on_message(proton::delivery &d, proton::message &m) override;
	void on_delivery_settle(proton::delivery &d) override;
	void on_transport_error(proton::transport &t) override;
	void on_connection_error(proton::connection &c) override;
	void on_receiver_error(proton::receiver &r) override;
	void on_sender_error(proton::sender &s) override;
	void on_session_error(proton::session &s) override;
	void on_receiver_close(proton::receiver &r) override;
	void on_transport_close(proton::transport &) override;
	void on_error(const proton::error_condition &e) override;

	void Run();
};

} // namespace sbpg
