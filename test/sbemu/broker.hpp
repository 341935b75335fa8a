// sbemu/broker.hpp
//   The emulator's message store: queues, topics with filtered subscriptions, dead-letter
//   queues, peek-lock with lock tokens and expiry, deferral, scheduling, time-to-live,
//   duplicate detection and sessions. It knows nothing of sockets or Proton: connections reach it
//   through the Consumer interface, and everything runs on the server's single event thread.
#pragma once

#include "sbpg/amqp/codec.hpp"
#include "util.hpp"
#include "config.hpp"

#include <array>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sbemu {

using LockToken = std::array<uint8_t, 16>;

// Service Bus forwards a message at most this many times (ForwardTo, ForwardDeadLetteredMessagesTo).
constexpr int kMaxForwardHops = 4;
struct LockTokenHash {
	size_t operator()(const LockToken &t) const {
		uint64_t a, b;
		std::memcpy(&a, t.data(), 8);
		std::memcpy(&b, t.data() + 8, 8);
		return std::hash<uint64_t>()(a ^ (b * 0x9e3779b97f4a7c15ULL));
	}
};

enum class MsgState : uint8_t { Active, Locked, Deferred, Scheduled };
const char *MsgStateName(MsgState s);

// A message as the sender gave it, parsed once on arrival.
struct Incoming {
	std::shared_ptr<const std::string> bare; // properties, application-properties, body (byte for byte)
	std::string annotations;                 // the sender's message-annotation entries, encoded
	uint32_t annotation_count = 0;           // encoded elements (keys + values) in `annotations`
	bool durable = false;
	uint8_t priority = 4;
	int64_t ttl_ms = 0; // header ttl, 0 when absent
	std::string message_id, session_id, correlation_id, subject, to, reply_to, reply_to_session_id, content_type;
	std::string partition_key;
	int64_t scheduled_ms = 0;
	size_t size = 0;
};
// Parses one encoded message; fills in a message-id when the sender gave none.
bool ParseIncoming(std::string_view encoded, Incoming *out, std::string *err);

struct StoredMessage {
	uint64_t seq = 0;
	int64_t enqueued_ms = 0;
	std::shared_ptr<const std::string> bare;
	std::string annotations;
	uint32_t annotation_count = 0;
	bool durable = false;
	uint8_t priority = 4;
	int64_t ttl_ms = 0;
	std::string message_id, session_id;
	int64_t expires_ms = kNever;
	int64_t scheduled_ms = 0;
	uint32_t delivery_count = 0;
	MsgState state = MsgState::Active;
	bool deferred = false; // returns to Deferred rather than Active when a lock ends
	LockToken lock{};
	int64_t locked_until = 0;
	const void *lock_owner = nullptr;
	uint32_t lock_gen = 0;
	std::string dead_letter_source;
	size_t size = 0;
};

struct Counters {
	uint64_t sent = 0, delivered = 0, completed = 0, abandoned = 0, deferred = 0, dead_lettered = 0, expired = 0,
	         lock_renewals = 0, lock_lost = 0, lock_expired = 0, duplicates = 0, put_tokens = 0, scheduled = 0,
	         cancelled = 0, released_by_detach = 0;
	// The most messages one owner (a receive link, or the $management link for messages received
	// by sequence number) ever held locked at once: a high-water mark, so a test sees a breach of
	// prefetch however briefly it lasted. Zeroed with the counters.
	uint64_t max_locked_by_link = 0;
	// The most sessions of the entity ever locked at once (by any receivers): how a test sees that
	// a client held several sessions concurrently. Zeroed with the counters.
	uint64_t max_sessions_locked = 0;
};

class Entity;

// A receive link as the store sees it.
class Consumer {
  public:
	virtual ~Consumer() = default;
	virtual uint32_t Credit() const = 0;
	virtual bool PeekLock() const = 0;
	virtual void Deliver(Entity &e, StoredMessage &m) = 0;
	virtual void Wake() = 0;          // ask the owning connection to pump this consumer soon
	virtual void SessionLockLost() {} // the session lock expired
	bool session_bound = false;
	std::string session_id;
};

struct SessionGroup {
	std::set<uint64_t> available; // sequence numbers ready for delivery, in order
	Consumer *owner = nullptr;    // the receiver holding the session lock
	int64_t locked_until = 0;
	std::string state;
	bool has_state = false;
	uint64_t messages = 0; // all messages of this session in the entity (any state)
};

class Broker;

class Entity {
  public:
	enum class Kind { Queue, Topic, Subscription, DeadLetter };
	std::string name; // as configured, e.g. "orders", "events/Subscriptions/audit", "orders/$DeadLetterQueue"
	std::string key;  // lower case
	Kind kind = Kind::Queue;
	EntityProps props;
	Entity *dlq = nullptr;
	Entity *owner = nullptr;             // DLQ -> its entity; subscription -> its topic
	std::vector<Entity *> subscriptions; // topic
	std::vector<Rule> rules;             // subscription
	uint64_t next_seq = 1;               // queues and topics assign sequence numbers

	std::map<uint64_t, StoredMessage> msgs;
	std::map<std::string, SessionGroup> groups; // "" for entities without sessions
	std::unordered_map<LockToken, uint64_t, LockTokenHash> locks;
	std::vector<Consumer *> consumers;
	size_t n_active = 0, n_locked = 0, n_deferred = 0, n_scheduled = 0;
	std::unordered_map<const void *, size_t> locked_by_owner; // messages locked now, per lock owner
	Counters counters;
	std::unordered_map<std::string, int64_t> dup_ids;
	std::deque<std::pair<int64_t, std::string>> dup_order;

	bool SessionsEnabled() const { return props.requires_session && kind != Kind::DeadLetter; }
	bool CanReceive() const { return kind != Kind::Topic; }
	bool CanSend() const { return kind == Kind::Queue || kind == Kind::Topic; }
	const char *KindName() const;
	std::string CountsJson() const;
	size_t SessionsLocked() const; // sessions whose lock a receiver holds now
};

// Outcome of a settlement.
enum class SettleResult { Ok, LockLost, NotAllowed };

class Broker {
  public:
	Broker(const NamespaceConfig &cfg);
	Broker(const Broker &) = delete;
	Broker &operator=(const Broker &) = delete;

	const std::string &namespace_name() const { return ns_name_; }
	// Resolves an address ("orders", "/orders", "sb://host/orders", "t/Subscriptions/s",
	// "orders/$DeadLetterQueue") to an entity, case-insensitively. Null when unknown.
	Entity *Find(std::string_view address);
	std::vector<Entity *> All();

	struct SendResult {
		bool ok = true;
		bool duplicate = false;
		std::string condition, description;
		uint64_t seq = 0;
	};
	SendResult Send(Entity &target, Incoming &&m, int64_t now);

	// Delivers available messages to a consumer while it has credit.
	void Pump(Consumer &c, Entity &e, int64_t now);
	void AddConsumer(Entity &e, Consumer *c);
	// Removes a consumer, releasing its message locks (delivery count + 1) and its session.
	void RemoveConsumer(Entity &e, Consumer *c, int64_t now);
	// Releases locks held by an owner (a management link's connection) without removing consumers.
	void ReleaseOwner(Entity &e, const void *owner, int64_t now);

	// Session receivers: lock `session_id`, or the next available one when empty.
	// Returns false when no (such) session can be locked now.
	bool LockSession(Entity &e, Consumer *c, const std::string &session_id, bool any, int64_t now,
	                 std::string *locked_id, std::string *error_condition);

	SettleResult Complete(Entity &e, const LockToken &t, int64_t now);
	SettleResult Abandon(Entity &e, const LockToken &t, const amqp::Value *props, int64_t now);
	SettleResult Defer(Entity &e, const LockToken &t, const amqp::Value *props, int64_t now);
	SettleResult DeadLetter(Entity &e, const LockToken &t, const std::string &reason, const std::string &desc,
	                        const amqp::Value *props, int64_t now);
	// Renews a message lock; returns the new expiry or 0 when the lock is lost.
	int64_t RenewLock(Entity &e, const LockToken &t, int64_t now);
	int64_t RenewSessionLock(Entity &e, const std::string &session_id, const void *holder, int64_t now);
	bool LockValid(Entity &e, const LockToken &t, int64_t now);

	// $management operations on message sets.
	std::vector<const StoredMessage *> Peek(Entity &e, uint64_t from_seq, int count, const std::string *session_id);
	// Receives deferred messages by sequence number (a number given twice counts once); `missing`
	// gets the first unknown number.
	bool ReceiveDeferred(Entity &e, const std::vector<int64_t> &seqs, bool peek_lock, const void *owner, int64_t now,
	                     std::vector<StoredMessage *> *out, int64_t *missing);
	// Cancels scheduled messages, all or none: `missing` gets the first number that is not scheduled.
	bool CancelScheduled(Entity &e, const std::vector<int64_t> &seqs, int64_t *missing);
	SessionGroup *Session(Entity &e, const std::string &id, bool create);

	// Encodes a message as delivered: header, annotations (sequence number, enqueued time, lock
	// expiry, state) and the bare message.
	// with_sequence_number false leaves out x-opt-sequence-number (fault omit-sequence-numbers).
	void EncodeDelivery(const Entity &e, const StoredMessage &m, bool locked, std::string *out,
	                    bool with_sequence_number = true) const;

	// Time-driven work: lock expiry, TTL, scheduled activation, duplicate windows, session locks.
	void Tick(int64_t now);

	// Test controls.
	void ExpireAllLocks(int64_t now);
	void Purge(Entity &e);
	void ResetCounters();
	// Called when a session group of `e` gets available messages and has no owner.
	std::function<void(Entity &)> on_session_available;

  private:
	Entity *NewEntity(const std::string &name, Entity::Kind kind, const EntityProps &props);
	void Store(Entity &e, StoredMessage &&m, int64_t now);
	void MakeAvailable(Entity &e, StoredMessage &m, int64_t now);
	void NotifyAvailable(Entity &e, const std::string &session_id);
	void Remove(Entity &e, std::map<uint64_t, StoredMessage>::iterator it);
	void Unlock(Entity &e, StoredMessage &m);
	// Gives `m` (already in state Locked) a new lock held by `owner`; every lock starts here.
	void GrantLock(Entity &e, StoredMessage &m, const void *owner);
	// Forgets the owner's hold on `m`'s lock (for Unlock and Remove).
	void ForgetOwner(Entity &e, const StoredMessage &m);
	// Ends a lock without completion: delivery count + 1, dead-letter at MaxDeliveryCount.
	void ReleaseLock(Entity &e, StoredMessage &m, int64_t now, bool count_delivery);
	// `hops`: how many times the message has been forwarded to get here; a dead-letter forward
	// counts on from it.
	void MoveToDeadLetter(Entity &e, std::map<uint64_t, StoredMessage>::iterator it, const std::string &reason,
	                      const std::string &desc, const amqp::Value *props, int64_t now, int hops = 0);
	void Expire(Entity &e, std::map<uint64_t, StoredMessage>::iterator it, int64_t now);
	uint64_t Forward(Entity &target, const StoredMessage &m, int64_t now, int hops);
	void ExpireSessionLock(Entity &e, const std::string &session_id, int64_t now);
	StoredMessage *Locked(Entity &e, const LockToken &t, int64_t now);
	void SetState(Entity &e, StoredMessage &m, MsgState s);

	struct Timer {
		int64_t at;
		Entity *e;
		uint64_t seq;
		uint32_t gen;
		bool operator>(const Timer &o) const { return at > o.at; }
	};
	using TimerHeap = std::priority_queue<Timer, std::vector<Timer>, std::greater<Timer>>;
	TimerHeap lock_timers_, ttl_timers_, schedule_timers_;
	struct SessionTimer {
		int64_t at;
		Entity *e;
		std::string id;
		bool operator>(const SessionTimer &o) const { return at > o.at; }
	};
	std::priority_queue<SessionTimer, std::vector<SessionTimer>, std::greater<SessionTimer>> session_timers_;

	std::string ns_name_;
	std::vector<std::unique_ptr<Entity>> entities_;
	std::unordered_map<std::string, Entity *> by_key_;
};

} // namespace sbemu
