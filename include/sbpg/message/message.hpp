// sbpg/message/message.hpp
//   A received Service Bus message as a plain C++ value: its fields, its body bytes, its
//   application properties as JSON text, and the verdict on whether the body is JSON. Built on the
//   AMQP thread from the encoded message; read by the worker's main thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

enum class BodyKind : uint8_t { None, Data, String, Value, Sequence };
enum class JsonVerdict : uint8_t {
	Json,      // body parsed as JSON (content type JSON or absent)
	NotJson,   // no content type and not JSON: handler gets body NULL, raw_body set
	OtherType, // a non-JSON content type: body NULL, raw_body set
	Invalid,   // JSON content type but not valid JSON: dead-letter
	Empty,     // no body at all
};

struct ReceivedMessage {
	uint64_t delivery_id = 0;    // the AMQP thread's handle for settlement
	uint64_t connection_gen = 0; // which connection delivered it (settlements on older ones are void)
	// Received on a session receiver (an entity that requires sessions): its session's messages are
	// applied in order, and it can be settled only while link_gen, the receiver that holds the
	// session, is (Consumer::LinkLive).
	bool in_session = false;
	uint64_t link_gen = 0;
	std::string message_id, correlation_id, session_id, subject, content_type, reply_to, to;
	BodyKind body_kind = BodyKind::None;
	std::string raw_body; // data sections joined, a string value's bytes, or JSON for other values
	std::string properties_json = "{}";
	bool has_sequence_number = false;
	int64_t sequence_number = 0;
	int64_t enqueued_ms = 0; // 0 when the broker gave none
	int64_t locked_until_ms = 0;
	uint32_t delivery_count = 0;
	int64_t received_ms = 0; // when the worker received it
	// Versioned schemas (filled on the AMQP thread when the subscription validates): the type and
	// version the message carries, and why it may not be applied (schema_reason is
	// "SchemaViolation" or "UnknownMessageType", with schema_error the description).
	std::string message_type;
	int schema_version = 0;
	int latest_version = 0; // the type's newest registered version (upcasts run when behind it)
	std::string schema_reason, schema_error;
	bool fetched = false; // received by sequence number (a deferred message): it stays deferred
	                      // on the broker until a settlement over $management is confirmed
	JsonVerdict json = JsonVerdict::Empty;
	std::string json_error;   // why the body is not valid JSON
	std::string decode_error; // set when the message could not be decoded at all
	// W3C trace context: the application property "traceparent", or else the Azure SDKs'
	// "Diagnostic-Id" when it has the same form; empty when neither is a valid one.
	std::string traceparent;
};

// Decodes an encoded AMQP message (the bytes of one transfer). Never throws; a message that cannot
// be decoded gets decode_error set (it will be dead-lettered with that reason).
void DecodeMessage(std::string_view encoded, int max_json_depth, ReceivedMessage *out);

// A W3C trace context traceparent (https://www.w3.org/TR/trace-context/#traceparent-header) as
// sbpg keeps it: version, trace id, parent id and flags in lower-case hex, 55 characters. Refuses
// version ff, an all-zero trace or parent id, upper-case hex and anything malformed; a later
// version is read by its first 55 characters, as the recommendation asks. True with *out set.
bool ParseTraceParent(std::string_view text, std::string *out);

// Whether a content type names JSON ("application/json", "text/json", "application/x+json",
// parameters such as "; charset=utf-8" allowed).
bool IsJsonContentType(std::string_view content_type);

// Checks that text is JSON PostgreSQL's jsonb accepts: valid UTF-8, no \u0000 and no unpaired
// surrogate escape, numbers within numeric's range (beyond a double is fine), nesting at most
// max_depth. Returns false with a readable reason.
bool CheckJson(std::string_view text, int max_depth, std::string *why);

} // namespace sbpg
