// test/unit/message_test.cpp
//   Regression tests for message decoding (src/message), from what the fuzzers in test/fuzz
//   found, and for text fields made valid UTF-8. Built and run by test/unit/run.sh
//   (sbpg_message_test, plain and ASan/UBSan) and by test/fuzz/run.sh (test/fuzz/Makefile).
#include "sbpg/amqp/codec.hpp"
#include "sbpg/amqp/publisher.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/schema/registry.hpp"

#include "tap.hpp"

using namespace sbpg;

namespace {

bool
Json(const std::string &text, std::string *why = nullptr, int depth = 1000) {
	std::string w;
	bool ok = CheckJson(text, depth, &w);
	if (why)
		*why = w;
	return ok;
}

// An encoded message: properties (message-id, content-type) and one data section.
std::string
Encoded(const std::string &message_id, const std::string &body) {
	std::string out;
	std::vector<amqp::Value> p(7);
	p[amqp::kMessageId] = amqp::Value::String(message_id);
	p[amqp::kContentType] = amqp::Value::Symbol("application/json");
	amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &out);
	amqp::EncodeSection(amqp::kData, amqp::Value::Binary(body), &out);
	return out;
}

} // namespace

TEST("CheckJson accepts numbers beyond a double that numeric stores (RapidJSON refused them)") {
	std::string why;
	CHECK(Json("1e309", &why));
	CHECK(why.empty());
	CHECK(Json("{\"amount\": -1.5E+400, \"n\": [1e131071, 0.1e-16382]}"));
	CHECK(Json(std::string(400, '9')));
	CHECK(Json("0e131072")); // zero has no weight
}

TEST("CheckJson refuses numbers numeric cannot store, with the number in the reason") {
	std::string why;
	CHECK(!Json("{\"a\": 1e131072}", &why));
	CHECK(why.find("1e131072") != std::string::npos);
	CHECK(!Json("[1.0e-16383]"));
	CHECK(!Json("0e1073741823"));
	CHECK(!Json("[1e400, \"\\udc00\"]", &why)); // other errors after a big number are still found
	CHECK(why.find("surrogate") != std::string::npos);
	CHECK(!Json("[1e400"));
}

TEST("CheckJson refuses an unpaired low surrogate escape, which jsonb refuses") {
	std::string why;
	CHECK(!Json("\"\\udc00\"", &why));
	CHECK(why.find("surrogate") != std::string::npos);
	CHECK(!Json("{\"k\\udfff\": 1}"));
	CHECK(Json("\"\\ud800\\udc00\""));
	CHECK(Json("\"\\u00e9 \xed\x9f\xbf\"")); // U+D7FF, just below the surrogates
}

TEST("message properties must be UTF-8 PostgreSQL accepts: no surrogates, overlong forms or > U+10FFFF") {
	for (const char *bad :
	     {"id-\xed\xa0\x80", "id-\xc0\xaf", "id-\xe0\x80\x80", "id-\xf4\x90\x80\x80", "id-\xf0\x80\x80\x80"}) {
		ReceivedMessage m;
		DecodeMessage(Encoded(bad, "{}"), 1000, &m);
		CHECK_EQ(m.decode_error,
		         std::string("property message_id is not valid UTF-8 text (invalid bytes are shown as U+FFFD)"));
		CHECK(IsStrictUtf8(m.message_id));
		CHECK_EQ(m.message_id.compare(0, 3, "id-"), 0);
		CHECK(m.message_id.find("\xEF\xBF\xBD") != std::string::npos);
	}
	ReceivedMessage m;
	DecodeMessage(Encoded("id-\xf0\x9f\x98\x80-\xed\x9f\xbf", "{\"a\": 1e999}"), 1000, &m);
	CHECK(m.decode_error.empty());
	CHECK(m.json == JsonVerdict::Json);
}

TEST("invalid message properties become U+FFFD text, and the decode error names each of them") {
	std::string enc;
	std::vector<amqp::Value> p(7);
	p[amqp::kMessageId] = amqp::Value::String("ab\xFF\xFE"
	                                          "cd");
	p[amqp::kSubject] = amqp::Value::String("fine \xC3\xA9");
	p[amqp::kCorrelationId] = amqp::Value::String("corr-\xC0\xAF-\xE0\x80\x80");
	p[amqp::kContentType] = amqp::Value::Symbol("application/json");
	amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &enc);
	amqp::EncodeSection(amqp::kData, amqp::Value::Binary("{}"), &enc);
	ReceivedMessage m;
	DecodeMessage(enc, 1000, &m);
	CHECK_EQ(m.decode_error, std::string("properties message_id, correlation_id are not valid UTF-8 text (invalid "
	                                     "bytes are shown as U+FFFD)"));
	const std::string r = "\xEF\xBF\xBD";
	CHECK_EQ(m.message_id, "ab" + r + r + "cd");
	CHECK_EQ(m.correlation_id, "corr-" + r + r + "-" + r + r + r);
	CHECK_EQ(m.subject, std::string("fine \xC3\xA9")); // valid fields are untouched
	CHECK_EQ(m.content_type, std::string("application/json"));
	for (const std::string *f : {&m.message_id, &m.to, &m.subject, &m.reply_to, &m.correlation_id, &m.content_type,
	                             &m.session_id, &m.decode_error})
		CHECK(IsStrictUtf8(*f) && f->find('\0') == std::string::npos);
}

TEST("a NUL byte in a property is replaced too, and fields stay valid when a later section fails") {
	std::string enc;
	std::vector<amqp::Value> p(amqp::kGroupId + 1);
	p[amqp::kMessageId] = amqp::Value::String("ok");
	p[amqp::kGroupId] = amqp::Value::String(std::string("s\0\xED\xA0\x80", 5));
	amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &enc);
	ReceivedMessage m;
	DecodeMessage(enc, 1000, &m);
	CHECK_EQ(m.decode_error,
	         std::string("property session_id is not valid UTF-8 text (invalid bytes are shown as U+FFFD)"));
	CHECK_EQ(m.session_id, std::string("s\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"));
	CHECK_EQ(m.message_id, std::string("ok"));
	// A malformed application-properties section after a bad property: that error wins (as before),
	// and the property is still made valid.
	std::string enc2;
	p[amqp::kGroupId] = amqp::Value::String("g\xFF");
	amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &enc2);
	amqp::EncodeSection(amqp::kApplicationProperties, amqp::Value::List({}), &enc2);
	ReceivedMessage m2;
	DecodeMessage(enc2, 1000, &m2);
	CHECK_EQ(m2.decode_error, std::string("the application-properties section is malformed"));
	CHECK_EQ(m2.session_id, std::string("g\xEF\xBF\xBD"));
}

TEST("a binary or uuid message-id becomes text: lower-case hex, canonical GUID") {
	std::string enc;
	std::vector<amqp::Value> p(7);
	p[amqp::kMessageId] = amqp::Value::Binary(std::string("\xFF\x00\xC3", 3));
	const uint8_t g[16] = {0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7};
	p[amqp::kCorrelationId] = amqp::Value::Uuid(g);
	amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &enc);
	amqp::EncodeSection(amqp::kData, amqp::Value::Binary("{}"), &enc);
	ReceivedMessage m;
	DecodeMessage(enc, 1000, &m);
	CHECK(m.decode_error.empty());
	CHECK_EQ(m.message_id, std::string("ff00c3"));
	CHECK_EQ(m.correlation_id, std::string("12345678-9abc-def0-0001-020304050607"));
}

TEST("a schema violation quoting a long value is cut on a character boundary") {
	std::vector<std::string> errors;
	auto reg = schema::Registry::Build({{"t", 1,
	                                     "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}"}},
	                                   &errors);
	REQUIRE(errors.empty());
	std::string value;
	for (int k = 0; k < 150; ++k)
		value += "\xC3\xA9"; // é: the quoted value is cut at 200 bytes, inside the 100th
	ReceivedMessage m;
	m.subject = "t";
	m.json = JsonVerdict::Json;
	m.body_kind = BodyKind::Data;
	m.raw_body = "{\"a\": \"" + value + "\"}";
	reg->Classify(&m, schema::ClassifyOptions());
	CHECK_EQ(m.schema_reason, std::string("SchemaViolation"));
	CHECK(IsStrictUtf8(m.schema_error));
	CHECK(m.schema_error.find("the value is \"" + value.substr(0, 198) + "\xE2\x80\xA6") != std::string::npos);
}

// Found by test/fuzz/run.sh 900: RapidJSON's EncodedInputStream took a leading 0xEF as part of a
// byte-order mark and went on, so "\xEF" + a number passed as JSON; jsonb refuses it.
TEST("CheckJson refuses a body that starts with a byte-order mark or a stray 0xEF") {
	std::string why;
	CHECK(!Json("\xef"
	            "89012134565890123.45",
	            &why));
	CHECK(why.find("at byte 0") != std::string::npos);
	CHECK(!Json("\xef\xbb\xbf{\"a\": 1}"));
	CHECK(!Json("\xef\xbb"
	            "1"));
	CHECK(Json(" {\"a\": \"\xef\xbb\xbf\"}")); // inside a string it is just a character
}

TEST("ParseTraceParent keeps a W3C traceparent and refuses what the recommendation refuses") {
	const std::string ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
	std::string out;
	CHECK(ParseTraceParent(ok, &out));
	CHECK_EQ(out, ok);
	for (const char *bad : {"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  // upper-case hex
	                        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  // all-zero trace id
	                        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  // all-zero parent id
	                        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  // version ff
	                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", // version 00 has no more fields
	                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",     // no flags
	                        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  // separator
	                        "|4bf92f3577b34da6a3ce929d0e0e4736.00f067aa0ba902b7.",      // the old Request-Id form
	                        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", ""}) {
		out = "unchanged";
		CHECK(!ParseTraceParent(bad, &out));
		CHECK_EQ(out, std::string("unchanged"));
	}
	// A later version is read by its first 55 characters; anything after them must follow a "-".
	CHECK(ParseTraceParent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes", &out));
	CHECK_EQ(out, std::string("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
	CHECK(!ParseTraceParent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", &out));
}

TEST("a message's trace context: traceparent first, else Diagnostic-Id, else none") {
	const std::string tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
	const std::string di = "00-11111111111111111111111111111111-2222222222222222-00";
	auto decode = [](std::vector<amqp::Value> props) {
		std::string enc;
		std::vector<amqp::Value> p(2);
		p[amqp::kMessageId] = amqp::Value::String("m");
		amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &enc);
		amqp::EncodeSection(amqp::kApplicationProperties, amqp::Value::Map(std::move(props)), &enc);
		amqp::EncodeSection(amqp::kData, amqp::Value::Binary("{}"), &enc);
		ReceivedMessage m;
		DecodeMessage(enc, 1000, &m);
		return m;
	};
	ReceivedMessage both = decode({amqp::Value::String("Diagnostic-Id"), amqp::Value::String(di),
	                               amqp::Value::String("traceparent"), amqp::Value::String(tp)});
	CHECK_EQ(both.decode_error, std::string());
	CHECK_EQ(both.traceparent, tp);
	CHECK_EQ(decode({amqp::Value::String("Diagnostic-Id"), amqp::Value::String(di)}).traceparent, di);
	// An invalid traceparent falls back to a valid Diagnostic-Id; an old-style one is no trace context.
	CHECK_EQ(decode({amqp::Value::String("traceparent"), amqp::Value::String("junk"),
	                 amqp::Value::String("Diagnostic-Id"), amqp::Value::String(di)})
	             .traceparent,
	         di);
	CHECK_EQ(decode({amqp::Value::String("Diagnostic-Id"), amqp::Value::String("|abc.1.")}).traceparent, std::string());
	// Not a string: ignored (the property itself stays in properties_json).
	ReceivedMessage num = decode({amqp::Value::String("traceparent"), amqp::Value::Long(7)});
	CHECK_EQ(num.traceparent, std::string());
	CHECK(num.properties_json.find("\"traceparent\":7") != std::string::npos);
	CHECK_EQ(decode({}).traceparent, std::string());
}

TEST("an outgoing message (the outbox's encoding) decodes as sent, field by field") {
	OutgoingMessage m;
	m.message_id = "m-1";
	m.body = std::string("{\"a\":1}");
	m.content_type = "application/json";
	m.correlation_id = "c-1";
	m.session_id = "s-1";
	m.subject = "order.created";
	m.reply_to = "replies";
	m.properties_json = "{\"tenant\": \"eu\", \"n\": 3, \"r\": 0.5, \"ok\": true, \"none\": null}";
	m.ttl_ms = 60000;
	m.scheduled_ms = 1893456000000;
	m.created_ms = 1700000000000;
	m.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
	std::string enc, why;
	CHECK(EncodeOutgoing(m, &enc, &why));
	ReceivedMessage r;
	DecodeMessage(enc, 1000, &r);
	CHECK_EQ(r.decode_error, std::string());
	CHECK_EQ(r.message_id, std::string("m-1"));
	CHECK_EQ(r.correlation_id, std::string("c-1"));
	CHECK_EQ(r.session_id, std::string("s-1"));
	CHECK_EQ(r.subject, std::string("order.created"));
	CHECK_EQ(r.reply_to, std::string("replies"));
	CHECK_EQ(r.content_type, std::string("application/json"));
	CHECK_EQ(r.raw_body, m.body);
	CHECK_EQ(r.traceparent, m.traceparent);
	CHECK(r.properties_json.find("\"tenant\":\"eu\"") != std::string::npos);
	CHECK(r.properties_json.find("\"n\":3") != std::string::npos);
	CHECK(r.properties_json.find("\"ok\":true") != std::string::npos);
	CHECK(r.properties_json.find("\"Diagnostic-Id\"") != std::string::npos);
	// Binary bodies stay byte for byte; properties that are not simple values are refused.
	m.body = std::string("\x00\xff\x10", 3);
	m.properties_json = "{\"nested\": {\"a\": 1}}";
	CHECK(!EncodeOutgoing(m, &enc, &why));
	CHECK(why.find("nested") != std::string::npos);
	m.properties_json = "";
	m.traceparent = "";
	CHECK(EncodeOutgoing(m, &enc, &why));
	ReceivedMessage b;
	DecodeMessage(enc, 1000, &b);
	CHECK_EQ(b.raw_body, std::string("\x00\xff\x10", 3));
	CHECK_EQ(b.properties_json, std::string("{}"));
}

TAP_MAIN
