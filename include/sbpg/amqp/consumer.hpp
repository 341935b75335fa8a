// sbpg/amqp/consumer.hpp
//   The worker's AMQP side: a Qpid Proton C++ container on a thread of its own that holds the
//   connection, puts tokens on $cbs, and keeps one peek-lock receiver with bounded credit. It never
//   calls PostgreSQL. The worker's main thread takes messages and hands back settlements through
//   the thread-safe calls below; the consumer wakes it by writing to an eventfd it waits on.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "sbpg/message/message.hpp"
#include "sbpg/schema/registry.hpp"

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

// An Entra ID token as the consumer puts it on $cbs.
struct BearerToken {
	std::string jwt; // never logged
	int64_t obtained_ms = 0;
	int64_t expires_ms = 0;
	uint64_t serial = 0; // changes with every new token
};

struct ConsumerConfig {
	std::string host;
	int port = 5672;
	bool tls = false;
	std::string entity;   // "orders" or "orders/subscriptions/audit"
	std::string audience; // "sb://host[:port]/entity", the put-token name
	enum class Auth { Anonymous, Sas, Jwt } auth = Auth::Anonymous;
	std::string sas_key_name;
	std::string sas_key; // never logged
	int64_t sas_token_lifetime_s = 3600;
	// Auth::Jwt: the current token, if there is one (called on the AMQP thread; thread-safe), and
	// what to do when the broker refuses one. Tokens are put again, on the live connection, as
	// soon as a new one is there; the consumer waits for a token before it connects.
	std::function<bool(BearerToken *)> current_token;
	std::function<void(uint64_t serial, bool accepted, const std::string &why)> token_answer;
	uint32_t prefetch = 100;   // messages held (unsettled) at most: credit + in flight (0: none received)
	std::string extra_ca_file; // TLS: trusted in addition to the system's CA store
	std::string container_id;
	int max_json_depth = 1000;
	bool release_to_abandon = false; // plain AMQP brokers: abandon with `released`, not `modified`
	// Service Bus's request/response link (<entity>/$management): lock renewal, deferred messages.
	// Off for plain AMQP brokers, which have neither.
	bool management = true;
	// Locks are renewed while a message is held (in the queue to the main thread, in a
	// transaction, or waiting for a retry), for at most this long after it was received.
	int64_t max_lock_renewal_ms = 300000;
	int reconnect_min_ms = 500;
	int reconnect_max_ms = 30000;
	// Sessions (an entity that requires them): declared, or detected when the broker refuses a
	// receiver without a session filter (unless detection is off). Up to max_sessions sessions are
	// held at once, each on a receiver of its own that asked for the next available session; one
	// without messages for session_idle_ms (and nothing unsettled) is released for the next.
	enum class Sessions { Detect, On, Off } sessions = Sessions::Detect;
	int max_sessions = 8;
	int64_t session_idle_ms = 5000;
	int64_t session_wait_ms = 30000; // how long the broker may wait for a session to become free
};

enum class Outcome : uint8_t { Complete, DeadLetter, Abandon, Defer };

struct Settlement {
	uint64_t delivery_id = 0;
	uint64_t connection_gen = 0;
	Outcome outcome = Outcome::Complete;
	std::string reason, description; // dead-letter only
};

// The broker's answer to a settlement (or why none came).
struct SettleResult {
	uint64_t delivery_id = 0;
	bool ok = false;
	std::string error;
};

// A session's state to put on the broker (com.microsoft:set-session-state), and its answer.
struct SessionStateUpdate {
	std::string session_id;
	bool has_state = false; // false: the state is removed
	std::string state;
	int64_t version = 0; // the writer's count, handed back with the answer
};
struct SessionStateResult {
	std::string session_id;
	int64_t version = 0;
	bool ok = false;
	std::string error;
};

struct ConsumerEvent {
	enum class Kind : uint8_t {
		Connected,
		Disconnected,
		TokenRenewed,
		TokenRefused,
		Error,
		SessionAccepted, // text: the session id
		SessionReleased, // idle, released for the next one
		SessionLost,     // its lock ended: its unsettled messages come again
	} kind = Kind::Error;
	std::string text;
};

struct ConsumerStatus {
	bool connected = false;
	int64_t connected_since_ms = 0;
	int64_t token_expires_ms = 0;
	uint64_t reconnects = 0;
	uint64_t tokens_put = 0; // put-token requests the broker accepted
	bool waiting_for_token = false;
	uint32_t in_flight = 0;
	uint64_t generation = 0;        // changes with every connection; messages of older ones cannot be settled
	uint64_t lock_renewals = 0;     // message locks the broker renewed
	uint64_t locks_lost = 0;        // renewals the broker refused because the lock was gone
	bool management_ready = false;  // the $management link pair is open
	bool management_failed = false; // the broker has no $management (no renewal, no deferral)
	std::string last_error;
	bool dead = false;          // the AMQP thread stopped on an unexpected error
	bool sessions = false;      // receiving sessions (declared, or detected on this entity)
	uint32_t sessions_held = 0; // sessions locked by this consumer now
	uint64_t sessions_accepted = 0, sessions_lost = 0;
};

class Consumer {
  public:
	Consumer(ConsumerConfig cfg, int wake_fd);
	~Consumer();
	Consumer(const Consumer &) = delete;
	Consumer &operator=(const Consumer &) = delete;

	// Starts the AMQP thread with every signal blocked, so PostgreSQL's handlers run only on the
	// main thread.
	void Start();
	// Stops the container and joins the thread. Thread-safe and idempotent.
	void Stop();

	// Moves up to max received messages into out (appending); returns how many.
	size_t TakeMessages(std::vector<ReceivedMessage> *out, size_t max);
	// Queues settlements; they are sent on the connection that delivered the messages, or answered
	// as failed when that connection is gone.
	void Settle(std::vector<Settlement> settlements);
	void TakeResults(std::vector<SettleResult> *out);
	// Registered schemas to classify and validate every message with (nullptr: none). Thread-safe;
	// messages received from now on use it.
	void SetRegistry(std::shared_ptr<const schema::Registry> registry, schema::ClassifyOptions options);
	// Asks the broker for deferred messages by sequence number (peek-lock, over $management); they
	// arrive with the other messages. Those the broker does not have come back from
	// TakeFetchFailures with `not_found` set.
	void FetchDeferred(std::vector<int64_t> sequence_numbers);
	struct FetchFailure {
		int64_t sequence_number = 0;
		bool not_found = false;
		std::string error;
	};
	void TakeFetchFailures(std::vector<FetchFailure> *out);
	// Peeks at up to count messages from sequence number `from` on (com.microsoft:peek-message over
	// $management: nothing is locked or received). TakePeeked returns true once the answer came,
	// with the messages, or with *error set.
	void Peek(int64_t from, int count);
	bool TakePeeked(std::vector<ReceivedMessage> *out, std::string *error);
	void TakeEvents(std::vector<ConsumerEvent> *out);
	ConsumerStatus Status();
	// Whether the session receiver link_gen still holds its session: the messages it delivered can
	// be settled (a message that is not in_session: always true).
	bool LinkLive(const ReceivedMessage &m);
	// Puts sessions' states on the broker, each only while this consumer holds that session (else
	// it is answered as failed); the answers come back from TakeSessionStateResults.
	void SetSessionStates(std::vector<SessionStateUpdate> updates);
	void TakeSessionStateResults(std::vector<SessionStateResult> *out);

  private:
	struct Impl;
	std::unique_ptr<Impl> impl_;
};

} // namespace sbpg
