// test/fuzz/decode_fuzzer.cpp
//   libFuzzer harness for what the handler receives: sbpg::DecodeMessage (an encoded AMQP message
//   → ReceivedMessage) and sbpg::CheckJson (would jsonb take this body?). The first input byte
//   picks a mode:
//     0  raw bytes as an encoded message
//     1  raw bytes as a JSON body, CheckJson against the oracle (RapidJSON DOM + strict UTF-8 +
//        PostgreSQL's numeric range)
//     2  deep nesting: up to 300,000 levels of [ or {"k": around a fuzzed core, fuzzed max depth
//     3  a well-formed message built from the input (header, annotations, properties,
//        application properties, a data / amqp-value / amqp-sequence body), so the fuzzer spends
//        its time past the section parser
//   Invariants (any violation aborts, which libFuzzer reports as a crash):
//     - nothing throws out of DecodeMessage or CheckJson;
//     - every text field and reason is strict UTF-8 without NUL, decode_error or not;
//     - a message has decode_error, or else: properties_json is JSON jsonb accepts, and the JSON
//       verdict agrees with the body kind, the content type and the oracle (Json ⇔ the oracle
//       accepts; Invalid/NotJson carry a reason);
//     - CheckJson(text, depth) == oracle, with a non-empty reason when false.
#include "sbpg/amqp/codec.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/message/message.hpp"

#include "oracle.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdio>
#include <cstdlib>

using sbpg::BodyKind;
using sbpg::JsonVerdict;
using sbpg::ReceivedMessage;
namespace amqp = sbpg::amqp;

namespace {

[[noreturn]] void
Fail(const char *what, const std::string &detail = std::string()) {
	std::fprintf(stderr, "INVARIANT VIOLATED: %s %s\n", what, detail.substr(0, 300).c_str());
	std::abort();
}

void
CheckJsonAgainstOracle(std::string_view text, int depth) {
	std::string why;
	bool got;
	try {
		got = sbpg::CheckJson(text, depth, &why);
	} catch (...) {
		Fail("CheckJson threw");
	}
	oracle::Verdict want = oracle::JsonbAccepts(text, depth);
	if (got != want.valid)
		Fail(got ? "CheckJson accepted what jsonb refuses:" : "CheckJson refused what jsonb accepts:",
		     want.why + " / " + why + " / text: " + std::string(text.substr(0, 200)));
	if (!got && why.empty())
		Fail("CheckJson refused without a reason");
	if (got && !oracle::StrictUtf8(text))
		Fail("CheckJson accepted invalid UTF-8");
}

void
CheckMessage(const ReceivedMessage &m, int depth) {
	// Text fields and reasons are stored and sent even when the message is dead-lettered.
	for (const std::string *f : {&m.message_id, &m.to, &m.subject, &m.reply_to, &m.correlation_id, &m.content_type,
	                             &m.session_id, &m.decode_error, &m.json_error, &m.schema_error}) {
		if (!oracle::StrictUtf8(*f) || f->find('\0') != std::string::npos)
			Fail("a text field that PostgreSQL text cannot hold passed:", *f);
	}
	if (!m.decode_error.empty())
		return; // dead-lettered as MalformedMessage with this reason
	if (!oracle::JsonbAccepts(m.properties_json, 64).valid)
		Fail("properties_json is not jsonb input:", m.properties_json);
	if ((m.body_kind == BodyKind::None) != (m.json == JsonVerdict::Empty))
		Fail("body kind None and verdict Empty disagree");
	if (m.body_kind == BodyKind::None && !m.raw_body.empty())
		Fail("no body but raw_body set");
	bool declared = sbpg::IsJsonContentType(m.content_type);
	switch (m.json) {
	case JsonVerdict::Empty:
		break;
	case JsonVerdict::OtherType:
		if (m.content_type.empty() || declared)
			Fail("OtherType with a JSON or no content type:", m.content_type);
		break;
	case JsonVerdict::Json:
		if (!m.content_type.empty() && !declared)
			Fail("Json verdict under a non-JSON content type");
		if (!oracle::JsonbAccepts(m.raw_body, depth).valid)
			Fail("Json verdict for a body jsonb refuses:", m.raw_body);
		break;
	case JsonVerdict::Invalid:
	case JsonVerdict::NotJson:
		if ((m.json == JsonVerdict::Invalid) != declared)
			Fail("Invalid/NotJson does not follow the content type:", m.content_type);
		if (m.json_error.empty())
			Fail("Invalid/NotJson without a reason");
		if (oracle::JsonbAccepts(m.raw_body, depth).valid)
			Fail("body refused but jsonb accepts it:", m.raw_body);
		break;
	}
}

void
Decode(std::string_view bytes, int depth) {
	ReceivedMessage m;
	try {
		sbpg::DecodeMessage(bytes, depth, &m);
	} catch (...) {
		Fail("DecodeMessage threw");
	}
	CheckMessage(m, depth);
}

int
PickDepth(uint8_t b) {
	static const int depths[] = {1, 2, 3, 8, 64, 1000, 100000};
	return depths[b % (sizeof depths / sizeof depths[0])];
}

// ---- mode 3: a well-formed message from the input

amqp::Value
FuzzValue(FuzzedDataProvider &in, int depth) {
	switch (in.ConsumeIntegralInRange<int>(0, depth > 3 ? 11 : 14)) {
	case 0:
		return amqp::Value::Null();
	case 1:
		return amqp::Value::Bool(in.ConsumeBool());
	case 2:
		return amqp::Value::Long(in.ConsumeIntegral<int64_t>());
	case 3:
		return amqp::Value::ULong(in.ConsumeIntegral<uint64_t>());
	case 4: {
		amqp::Value v;
		v.kind = amqp::Value::Kind::Double;
		v.d = in.ConsumeFloatingPoint<double>();
		return v;
	}
	case 5:
		return amqp::Value::Timestamp(in.ConsumeIntegral<int64_t>());
	case 6: {
		uint8_t b[16];
		for (auto &x : b)
			x = in.ConsumeIntegral<uint8_t>();
		return amqp::Value::Uuid(b);
	}
	case 7:
		return amqp::Value::Binary(in.ConsumeRandomLengthString(64));
	case 8:
	case 9:
		return amqp::Value::String(in.ConsumeRandomLengthString(64));
	case 10:
		return amqp::Value::Symbol(in.ConsumeRandomLengthString(32));
	case 11: {
		amqp::Value v;
		v.kind = amqp::Value::Kind::Char;
		v.u = in.ConsumeIntegral<uint32_t>();
		return v;
	}
	case 12: {
		std::vector<amqp::Value> items;
		int n = in.ConsumeIntegralInRange<int>(0, 4);
		for (int k = 0; k < n; ++k)
			items.push_back(FuzzValue(in, depth + 1));
		return amqp::Value::List(items);
	}
	case 13: {
		std::vector<amqp::Value> kv;
		int n = in.ConsumeIntegralInRange<int>(0, 4);
		for (int k = 0; k < n; ++k) {
			kv.push_back(in.ConsumeBool() ? amqp::Value::String(in.ConsumeRandomLengthString(16))
			                              : FuzzValue(in, depth + 1));
			kv.push_back(FuzzValue(in, depth + 1));
		}
		return amqp::Value::Map(kv);
	}
	default: {
		amqp::Value v;
		v.kind = amqp::Value::Kind::Described;
		v.items = {amqp::Value::ULong(in.ConsumeIntegralInRange<uint64_t>(0, 0x80)), FuzzValue(in, depth + 1)};
		return v;
	}
	}
}

std::string
FuzzText(FuzzedDataProvider &in) {
	static const char *const types[] = {"application/json",
	                                    "text/json; charset=utf-8",
	                                    " Application/Problem+JSON ",
	                                    "text/plain",
	                                    "",
	                                    "application/octet-stream",
	                                    "+json",
	                                    "application/json;"};
	if (in.ConsumeBool())
		return types[in.ConsumeIntegralInRange<int>(0, 7)];
	return in.ConsumeRandomLengthString(24);
}

void
BuildMessage(FuzzedDataProvider &in, int depth) {
	std::string msg;
	if (in.ConsumeBool()) {
		std::vector<amqp::Value> h{amqp::Value::Bool(in.ConsumeBool()), amqp::Value::UByte(4), amqp::Value::Null(),
		                           amqp::Value::Bool(false), amqp::Value::UInt(in.ConsumeIntegral<uint32_t>())};
		amqp::EncodeSection(amqp::kHeader, amqp::Value::List(h), &msg);
	}
	if (in.ConsumeBool()) {
		std::vector<amqp::Value> kv{amqp::Value::Symbol("x-opt-sequence-number"), FuzzValue(in, 3),
		                            amqp::Value::Symbol("x-opt-enqueued-time"),   FuzzValue(in, 3),
		                            amqp::Value::Symbol("x-opt-locked-until"),    FuzzValue(in, 3)};
		amqp::EncodeSection(amqp::kMessageAnnotations, amqp::Value::Map(kv), &msg);
	}
	if (in.ConsumeBool()) {
		std::vector<amqp::Value> p;
		int n = in.ConsumeIntegralInRange<int>(0, 13);
		for (int k = 0; k < n; ++k) {
			if (k == amqp::kContentType || k == amqp::kMessageId || k == amqp::kSubject)
				p.push_back(in.ConsumeBool() ? amqp::Value::Symbol(FuzzText(in)) : FuzzValue(in, 2));
			else
				p.push_back(in.ConsumeBool() ? amqp::Value::Null() : FuzzValue(in, 2));
		}
		amqp::EncodeSection(amqp::kProperties, amqp::Value::List(p), &msg);
	}
	if (in.ConsumeBool()) {
		std::vector<amqp::Value> kv;
		int n = in.ConsumeIntegralInRange<int>(0, 6);
		for (int k = 0; k < n; ++k) {
			kv.push_back(in.ConsumeBool() ? amqp::Value::String(in.ConsumeRandomLengthString(12)) : FuzzValue(in, 2));
			kv.push_back(FuzzValue(in, 1));
		}
		amqp::EncodeSection(amqp::kApplicationProperties, amqp::Value::Map(kv), &msg);
	}
	switch (in.ConsumeIntegralInRange<int>(0, 3)) {
	case 0: // no body
		break;
	case 1: { // data sections: the rest of the input, cut into 1-3 pieces
		int n = in.ConsumeIntegralInRange<int>(1, 3);
		for (int k = 0; k < n; ++k) {
			std::string part = k + 1 == n ? in.ConsumeRemainingBytesAsString() : in.ConsumeRandomLengthString(256);
			amqp::EncodeSection(amqp::kData, amqp::Value::Binary(part), &msg);
		}
		break;
	}
	case 2:
		amqp::EncodeSection(amqp::kAmqpValue,
		                    in.ConsumeBool() ? amqp::Value::String(in.ConsumeRemainingBytesAsString())
		                                     : FuzzValue(in, 0),
		                    &msg);
		break;
	default: {
		int n = in.ConsumeIntegralInRange<int>(1, 3);
		for (int k = 0; k < n; ++k) {
			std::vector<amqp::Value> items;
			int m = in.ConsumeIntegralInRange<int>(0, 4);
			for (int j = 0; j < m; ++j)
				items.push_back(FuzzValue(in, 1));
			amqp::EncodeSection(amqp::kAmqpSequence, amqp::Value::List(items), &msg);
		}
		break;
	}
	}
	Decode(msg, depth);
}

// ---- mode 2: deep nesting

void
DeepNesting(FuzzedDataProvider &in) {
	int depth = in.ConsumeBool() ? PickDepth(in.ConsumeIntegral<uint8_t>()) : in.ConsumeIntegralInRange<int>(1, 300000);
	// Mostly moderate nesting (fast), one input in eight up to 300,000 levels.
	size_t levels = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<size_t>(0, 300000)
	                                                          : in.ConsumeIntegralInRange<size_t>(0, 3000);
	bool objects = in.ConsumeBool();
	bool unbalanced = in.ConsumeIntegralInRange<int>(0, 7) == 0;
	std::string core = in.ConsumeRemainingBytesAsString();
	std::string text;
	text.reserve(levels * 6 + core.size());
	for (size_t k = 0; k < levels; ++k)
		text += objects ? "{\"k\":" : "[";
	text += core.empty() ? "0" : core;
	for (size_t k = 0; k < levels - (unbalanced && levels > 0 ? 1 : 0); ++k)
		text += objects ? "}" : "]";
	CheckJsonAgainstOracle(text, depth);
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	if (size < 2)
		return 0;
	uint8_t mode = data[0] & 3;
	int depth = PickDepth(data[0] >> 2);
	std::string_view rest(reinterpret_cast<const char *>(data + 1), size - 1);
	switch (mode) {
	case 0:
		Decode(rest, depth);
		break;
	case 1:
		CheckJsonAgainstOracle(rest, depth);
		break;
	case 2: {
		FuzzedDataProvider in(data + 1, size - 1);
		DeepNesting(in);
		break;
	}
	default: {
		FuzzedDataProvider in(data + 1, size - 1);
		BuildMessage(in, depth);
		break;
	}
	}
	return 0;
}
