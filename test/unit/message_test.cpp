// test/unit/message_test.cpp
//   Regression tests for message decoding (src/message), from what the fuzzers in test/fuzz
//   found. Built and run by test/fuzz/run.sh (test/fuzz/Makefile, with ASan and UBSan).
#include "sbpg/amqp/codec.hpp"
#include "sbpg/message/message.hpp"

#include "tap.hpp"

using namespace sbpg;

namespace {

bool Json(const std::string &text, std::string *why = nullptr, int depth = 1000) {
	std::string w;
	bool ok = CheckJson(text, depth, &w);
	if (why)
		*why = w;
	return ok;
}

// An encoded message: properties (message-id, content-type) and one data section.
std::string Encoded(const std::string &message_id, const std::string &body) {
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
	for (const char *bad : {"id-\xed\xa0\x80", "id-\xc0\xaf", "id-\xe0\x80\x80", "id-\xf4\x90\x80\x80", "id-\xf0\x80\x80\x80"}) {
		ReceivedMessage m;
		DecodeMessage(Encoded(bad, "{}"), 1000, &m);
		CHECK_EQ(m.decode_error, std::string("a message property is not valid UTF-8 text"));
	}
	ReceivedMessage m;
	DecodeMessage(Encoded("id-\xf0\x9f\x98\x80-\xed\x9f\xbf", "{\"a\": 1e999}"), 1000, &m);
	CHECK(m.decode_error.empty());
	CHECK(m.json == JsonVerdict::Json);
}

// Found by test/fuzz/run.sh 900: RapidJSON's EncodedInputStream took a leading 0xEF as part of a
// byte-order mark and went on, so "\xEF" + a number passed as JSON; jsonb refuses it.
TEST("CheckJson refuses a body that starts with a byte-order mark or a stray 0xEF") {
	std::string why;
	CHECK(!Json("\xef" "89012134565890123.45", &why));
	CHECK(why.find("at byte 0") != std::string::npos);
	CHECK(!Json("\xef\xbb\xbf{\"a\": 1}"));
	CHECK(!Json("\xef\xbb" "1"));
	CHECK(Json(" {\"a\": \"\xef\xbb\xbf\"}")); // inside a string it is just a character
}

TAP_MAIN
