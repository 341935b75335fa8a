// sbpg/amqp/publisher.hpp
//   The publisher's AMQP side: a Qpid Proton C++ container on a thread of its own that holds one
//   connection to a namespace, puts the token for the namespace on $cbs, and keeps a sender link
//   per entity. The main thread hands it groups of encoded messages (one group in flight per
//   entity, its messages sent back to back on the entity's link, so the broker receives them in the
//   order given) and takes back the broker's verdict on each message; the publisher wakes it
//   through an eventfd. It never calls PostgreSQL. Also the encoding of an outgoing message, pure
//   C++ over sbpg/amqp/codec.hpp.
//   Each message is its own transfer: Proton 0.37 writes message-format 0 into every transfer
//   frame (c/src/core/transport.c) and has no call to set another, so Service Bus's batch format
//   (0x80013700) cannot be sent with it; docs/outbox.md says what that means.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sbpg/amqp/consumer.hpp"

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

// One message as sbpg.send queued it (text fields empty when not given).
struct OutgoingMessage {
	std::string message_id;
	std::string body; // bytes
	std::string content_type, correlation_id, session_id, subject, reply_to;
	std::string properties_json; // a JSON object of simple values, or empty
	int64_t ttl_ms = 0;          // 0: none
	int64_t scheduled_ms = 0;    // enqueue time (Unix ms), 0: now
	std::string traceparent;     // W3C trace context, also sent as Diagnostic-Id
	int64_t created_ms = 0;      // creation-time (the row's queue time)
};

// The message's AMQP encoding (header, message annotations, properties, application properties, one
// data section). Returns false with *why when the properties are not a JSON object of simple values.
bool EncodeOutgoing(const OutgoingMessage &m, std::string *out, std::string *why);
struct PublisherConfig {
	ConsumerConfig conn; // host, port, tls, audience (the namespace), auth, tokens, CA, reconnect
};

// A message to send: the main thread's id for it (the outbox row) and its encoding.
struct OutgoingItem {
	int64_t id = 0;
	std::string payload;
};
// Messages for one entity, sent one after another on its link without waiting for each answer.
struct OutgoingGroup {
	std::string entity;
	std::vector<OutgoingItem> items;
};

// The broker's verdict on one message.
struct SendResult {
	enum class Kind : uint8_t {
		Accepted, // the broker stored it
		Retry,    // try again later: server busy, connection or link lost, token refused or expired
		Failed,   // refused for good: entity not found, not authorised, too large, not allowed
	} kind = Kind::Retry;
	int64_t id = 0;
	std::string error; // the broker's condition and description
};

struct PublisherStatus {
	bool connected = false;
	int64_t connected_since_ms = 0;
	int64_t token_expires_ms = 0;
	uint64_t reconnects = 0;
	bool waiting_for_token = false;
	std::string last_error;
	bool dead = false;
};

class Publisher {
  public:
	Publisher(PublisherConfig cfg, int wake_fd);
	~Publisher();
	Publisher(const Publisher &) = delete;
	Publisher &operator=(const Publisher &) = delete;

	// Starts the AMQP thread with every signal blocked.
	void Start();
	// Stops the container and joins the thread. Thread-safe and idempotent.
	void Stop();
	// Queues a group; its messages are sent in order on the entity's link. The caller keeps at most
	// one group per entity unanswered, so that an entity's messages reach the broker in order.
	void Send(OutgoingGroup group);
	void TakeResults(std::vector<SendResult> *out);
	void TakeEvents(std::vector<ConsumerEvent> *out);
	PublisherStatus Status();

	struct Impl;

  private:
	std::unique_ptr<Impl> impl_;
};

} // namespace sbpg
