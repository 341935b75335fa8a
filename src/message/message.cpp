// src/message/message.cpp
//   Decoding a transfer into a ReceivedMessage, and the JSON checks that decide how a body reaches
//   the handler. Pure C++: RapidJSON (asserting by exception) and the project's AMQP codec.
#include "sbpg/message/message.hpp"

#include "sbpg/amqp/codec.hpp"
#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"

#include <cstring>

namespace sbpg {

namespace {

bool NumericFits(std::string_view num);

// The JSON number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
bool
IsJsonNumber(std::string_view n) {
	size_t i = 0;
	auto digits = [&] {
		size_t s = i;
		while (i < n.size() && n[i] >= '0' && n[i] <= '9')
			++i;
		return i > s;
	};
	if (i < n.size() && n[i] == '-')
		++i;
	if (i < n.size() && n[i] == '0')
		++i;
	else if (!digits())
		return false;
	if (i < n.size() && n[i] == '.') {
		++i;
		if (!digits())
			return false;
	}
	if (i < n.size() && (n[i] == 'e' || n[i] == 'E')) {
		++i;
		if (i < n.size() && (n[i] == '+' || n[i] == '-'))
			++i;
		if (!digits())
			return false;
	}
	return i == n.size();
}

// A SAX handler that tracks nesting and refuses what jsonb refuses.
struct JsonChecker : rapidjson::BaseReaderHandler<rapidjson::UTF8<>, JsonChecker> {
	int depth = 0, max_depth = 0;
	std::string error;
	bool Default() { return true; }
	bool StartObject() { return Enter(); }
	bool StartArray() { return Enter(); }
	bool EndObject(rapidjson::SizeType) { return Leave(); }
	bool EndArray(rapidjson::SizeType) { return Leave(); }
	bool String(const char *s, rapidjson::SizeType len, bool) { return Text(s, len); }
	bool Key(const char *s, rapidjson::SizeType len, bool) { return Text(s, len); }
	bool Enter() {
		if (++depth > max_depth) {
			error = "JSON nesting is deeper than " + std::to_string(max_depth) + " levels";
			return false;
		}
		return true;
	}
	bool Leave() {
		--depth;
		return true;
	}
	bool Text(const char *s, rapidjson::SizeType len) {
		if (std::memchr(s, '\0', len)) {
			error = "JSON string contains \\u0000, which jsonb cannot store";
			return false;
		}
		// The input is valid UTF-8, so a surrogate in the decoded text (ED A0..BF ..) came from an
		// escape: RapidJSON pairs a high surrogate but lets a lone low one (\udc00-\udfff) through,
		// which jsonb refuses.
		for (const char *p = s, *end = s + len; (p = static_cast<const char *>(std::memchr(p, '\xed', end - p))); ++p) {
			if (p + 1 < end && (static_cast<unsigned char>(p[1]) & 0xe0) == 0xa0) {
				error = "JSON string contains an unpaired UTF-16 surrogate escape, which jsonb cannot store";
				return false;
			}
		}
		return true;
	}
	bool RawNumber(const char *s, rapidjson::SizeType len, bool) {
		if (!NumericFits(std::string_view(s, len))) {
			error = "JSON number " + std::string(s, std::min<size_t>(len, 40)) + (len > 40 ? "..." : "") +
			        " is out of the range PostgreSQL's numeric can store";
			return false;
		}
		return true;
	}
};

// A JSON number (grammar checked) as PostgreSQL 15's numeric_in takes it: exponent magnitude
// below INT_MAX / 2, display scale (fraction digits minus exponent) at most 16383, and for a
// non-zero value the leading digit at most 10^131071.
bool
NumericFits(std::string_view num) {
	size_t i = num.size() && num[0] == '-' ? 1 : 0;
	int64_t int_digits = 0, frac_digits = 0, lead = -1; // lead: index (in all digits) of the first non-zero
	for (; i < num.size() && num[i] >= '0' && num[i] <= '9'; ++i, ++int_digits)
		if (lead < 0 && num[i] != '0')
			lead = int_digits;
	if (i < num.size() && num[i] == '.')
		for (++i; i < num.size() && num[i] >= '0' && num[i] <= '9'; ++i, ++frac_digits)
			if (lead < 0 && num[i] != '0')
				lead = int_digits + frac_digits;
	int64_t exp = 0;
	if (i < num.size() && (num[i] == 'e' || num[i] == 'E')) {
		bool neg = ++i < num.size() && num[i] == '-';
		if (i < num.size() && (num[i] == '-' || num[i] == '+'))
			++i;
		for (; i < num.size(); ++i)
			if (exp < (int64_t(1) << 40))
				exp = exp * 10 + (num[i] - '0');
		if (neg)
			exp = -exp;
	}
	constexpr int64_t kExpLimit = 1073741823; // INT_MAX / 2
	if (exp >= kExpLimit || exp <= -kExpLimit || frac_digits - exp > 16383)
		return false;
	return lead < 0 || int_digits - 1 - lead + exp <= 131071;
}

// Copies text with every number outside strings replaced by 0 (after checking that numeric can
// store it), for a second parse when RapidJSON refused a number too large for a double, which
// jsonb stores as numeric. Returns false, with a reason, for a number numeric cannot store.
bool
NumbersToZero(std::string_view text, std::string *out, std::string *why) {
	out->clear();
	out->reserve(text.size());
	for (size_t i = 0; i < text.size();) {
		char c = text[i];
		if (c == '"') { // copy the string, escapes included
			size_t j = i + 1;
			while (j < text.size() && text[j] != '"')
				j += text[j] == '\\' ? 2 : 1;
			j = std::min(j + 1, text.size());
			out->append(text.substr(i, j - i));
			i = j;
		} else if (c == '-' || (c >= '0' && c <= '9')) {
			size_t j = i;
			while (j < text.size() && (std::strchr("0123456789+-.eE", text[j]) && text[j] != '\0'))
				++j;
			std::string_view num = text.substr(i, j - i);
			if (IsJsonNumber(num)) {
				if (!NumericFits(num)) {
					*why = "JSON number " + std::string(num.substr(0, 40)) + (num.size() > 40 ? "..." : "") +
					       " is out of the range PostgreSQL's numeric can store";
					return false;
				}
				out->push_back('0');
			} else {
				out->append(num); // the parser reports it
			}
			i = j;
		} else {
			out->push_back(c);
			++i;
		}
	}
	return true;
}

void
AppendJsonString(std::string *out, std::string_view s) {
	out->push_back('"');
	out->append(JsonEscape(s));
	out->push_back('"');
}

// JSON for an AMQP value (application properties, non-string bodies).
void
ValueToJson(const amqp::Value &v, std::string *out) {
	using K = amqp::Value::Kind;
	switch (v.kind) {
	case K::Null:
		*out += "null";
		break;
	case K::Bool:
		*out += v.u ? "true" : "false";
		break;
	case K::Float:
	case K::Double: {
		if (v.d != v.d || v.d == 1.0 / 0.0 || v.d == -1.0 / 0.0) {
			AppendJsonString(out, v.d != v.d ? "NaN" : (v.d > 0 ? "Infinity" : "-Infinity"));
		} else {
			char buf[64];
			std::snprintf(buf, sizeof buf, "%.17g", v.d);
			*out += buf;
		}
		break;
	}
	case K::UByte:
	case K::UShort:
	case K::UInt:
	case K::ULong:
	case K::Byte:
	case K::Short:
	case K::Int:
	case K::Long:
		*out += v.ToText();
		break;
	case K::Timestamp:
		AppendJsonString(out, FormatTime(v.i));
		break;
	case K::Binary:
	case K::Decimal:
		AppendJsonString(out, Base64Encode(v.s));
		break;
	case K::Uuid:
	case K::String:
	case K::Symbol:
	case K::Char:
		AppendJsonString(out, v.ToText());
		break;
	case K::List:
	case K::Array:
		out->push_back('[');
		for (size_t k = 0; k < v.items.size(); ++k) {
			if (k)
				out->push_back(',');
			ValueToJson(v.items[k], out);
		}
		out->push_back(']');
		break;
	case K::Map:
		out->push_back('{');
		for (size_t k = 0; k + 1 < v.items.size(); k += 2) {
			if (k)
				out->push_back(',');
			AppendJsonString(out, v.items[k].ToText());
			out->push_back(':');
			ValueToJson(v.items[k + 1], out);
		}
		out->push_back('}');
		break;
	case K::Described:
		if (v.items.size() == 2)
			ValueToJson(v.items[1], out);
		else
			*out += "null";
		break;
	}
}

// A properties-list entry as text: strings and symbols as they are (possibly not UTF-8; the caller
// sanitizes), numbers in decimal, a uuid in canonical form, binary as lower-case hex.
std::string
ListText(const amqp::Value &list, size_t idx) {
	if (list.kind != amqp::Value::Kind::List || idx >= list.items.size())
		return std::string();
	return list.items[idx].ToText();
}

// The message's text fields, each stored in a PostgreSQL text column and sent in NOTIFY payloads,
// with the name a decode error uses for it.
struct TextField {
	const char *name;
	std::string ReceivedMessage::*field;
};
const TextField kTextFields[] = {
    {"message_id", &ReceivedMessage::message_id},
    {"to", &ReceivedMessage::to},
    {"subject", &ReceivedMessage::subject},
    {"reply_to", &ReceivedMessage::reply_to},
    {"correlation_id", &ReceivedMessage::correlation_id},
    {"content_type", &ReceivedMessage::content_type},
    {"session_id", &ReceivedMessage::session_id},
};

// Replaces invalid UTF-8 and NUL bytes in every text field by U+FFFD. Returns the decode error
// naming the fields that needed it, or "" when all were valid.
std::string
SanitizeTextFields(ReceivedMessage *m) {
	std::string names;
	size_t count = 0;
	for (const TextField &f : kTextFields) {
		std::string &text = m->*f.field;
		bool changed = false;
		std::string valid = ToValidUtf8(text, &changed);
		if (!changed)
			continue;
		text = std::move(valid);
		if (count++)
			names += ", ";
		names += f.name;
	}
	if (count == 0)
		return std::string();
	return (count == 1 ? "property " + names + " is" : "properties " + names + " are") +
	       " not valid UTF-8 text (invalid bytes are shown as U+FFFD)";
}

void
Classify(ReceivedMessage *m, int max_depth) {
	if (m->body_kind == BodyKind::None) {
		m->json = JsonVerdict::Empty;
		return;
	}
	bool declared_json = IsJsonContentType(m->content_type);
	if (!m->content_type.empty() && !declared_json) {
		m->json = JsonVerdict::OtherType;
		return;
	}
	std::string why;
	if (CheckJson(m->raw_body, max_depth, &why)) {
		m->json = JsonVerdict::Json;
	} else if (declared_json) {
		m->json = JsonVerdict::Invalid;
		m->json_error = why;
	} else {
		m->json = JsonVerdict::NotJson;
		m->json_error = why;
	}
}

// One validating parse. Returns kParseErrorNone when text is JSON jsonb accepts; otherwise the
// error code with *why set.
rapidjson::ParseErrorCode
ParseChecked(std::string_view text, int max_depth, std::string *why) {
	JsonChecker h;
	h.max_depth = max_depth;
	rapidjson::Reader reader;
	// A plain MemoryStream, not EncodedInputStream: that one skips a byte-order mark, and even a
	// lone 0xEF, before parsing; jsonb accepts neither.
	rapidjson::MemoryStream is(text.data(), text.size());
	rapidjson::ParseResult r =
	    reader.Parse<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag |
	                 rapidjson::kParseNumbersAsStringsFlag | rapidjson::kParseStopWhenDoneFlag>(is, h);
	if (!r) {
		if (!h.error.empty())
			*why = h.error;
		else
			*why = std::string("not valid JSON: ") + rapidjson::GetParseError_En(r.Code()) + " (at byte " +
			       std::to_string(r.Offset()) + ")";
		return r.Code() == rapidjson::kParseErrorNone ? rapidjson::kParseErrorTermination : r.Code();
	}
	// kParseStopWhenDoneFlag stops after one value: anything but white space after it is an error.
	for (size_t k = is.Tell(); k < text.size(); ++k) {
		char c = text[k];
		if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
			*why = "not valid JSON: unexpected data after the value (at byte " + std::to_string(k) + ")";
			return rapidjson::kParseErrorDocumentRootNotSingular;
		}
	}
	return rapidjson::kParseErrorNone;
}

} // namespace

namespace {

bool
LowerHex(std::string_view s) {
	for (char c : s)
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
			return false;
	return true;
}

bool
AllZero(std::string_view s) {
	return s.find_first_not_of('0') == std::string_view::npos;
}

} // namespace

bool
ParseTraceParent(std::string_view text, std::string *out) {
	// version "-" trace-id "-" parent-id "-" flags: 2 + 1 + 32 + 1 + 16 + 1 + 2 = 55
	constexpr size_t kLen = 55;
	if (text.size() < kLen || text[2] != '-' || text[35] != '-' || text[52] != '-')
		return false;
	std::string_view version = text.substr(0, 2), trace = text.substr(3, 32), parent = text.substr(36, 16),
	                 flags = text.substr(53, 2);
	if (!LowerHex(version) || !LowerHex(trace) || !LowerHex(parent) || !LowerHex(flags) || version == "ff" ||
	    AllZero(trace) || AllZero(parent))
		return false;
	// Version 00 has exactly these fields; a later one may add more after a "-".
	if (text.size() > kLen && (version == "00" || text[kLen] != '-'))
		return false;
	out->assign(text.substr(0, kLen));
	return true;
}

bool
IsJsonContentType(std::string_view ct) {
	size_t semi = ct.find(';');
	std::string base = ToLower(ct.substr(0, semi));
	while (!base.empty() && (base.back() == ' ' || base.back() == '\t'))
		base.pop_back();
	while (!base.empty() && (base.front() == ' ' || base.front() == '\t'))
		base.erase(base.begin());
	if (base == "application/json" || base == "text/json")
		return true;
	return base.size() > 5 && base.compare(base.size() - 5, 5, "+json") == 0;
}

bool
CheckJson(std::string_view text, int max_depth, std::string *why) {
	if (text.empty()) {
		*why = "the body is empty";
		return false;
	}
	if (std::memchr(text.data(), '\0', text.size())) {
		*why = "the body contains a NUL byte";
		return false;
	}
	try {
		rapidjson::ParseErrorCode code = ParseChecked(text, max_depth, why);
		if (code == rapidjson::kParseErrorNumberTooBig) {
			// RapidJSON refuses numbers beyond a double even when it hands them over as text;
			// jsonb stores them as numeric. Check them here and parse again with them as 0.
			std::string zeroed;
			if (!NumbersToZero(text, &zeroed, why))
				return false;
			code = ParseChecked(zeroed, max_depth, why);
		}
		if (code != rapidjson::kParseErrorNone)
			return false;
		why->clear();
		return true;
	} catch (const std::exception &e) {
		*why = std::string("not valid JSON: ") + e.what();
		return false;
	}
}

namespace {

// The header's delivery count and the broker's annotations (sequence number, enqueued time,
// locked-until); a section that does not decode leaves them unset.
void
ReadHeaderAndAnnotations(const amqp::Sections &sec, ReceivedMessage *m) {
	if (!sec.header.empty()) {
		amqp::Value h;
		if (amqp::DecodeSection(sec.header, &h) && h.kind == amqp::Value::Kind::List && h.items.size() > 4 &&
		    h.items[4].IsInteger())
			m->delivery_count = static_cast<uint32_t>(h.items[4].AsInt());
	}
	if (!sec.message_annotations.empty()) {
		amqp::Value ma;
		if (amqp::DecodeSection(sec.message_annotations, &ma) && ma.kind == amqp::Value::Kind::Map) {
			const amqp::Value *seq = ma.Get("x-opt-sequence-number");
			if (seq && seq->IsInteger()) {
				m->has_sequence_number = true;
				m->sequence_number = seq->AsInt();
			}
			const amqp::Value *enq = ma.Get("x-opt-enqueued-time");
			if (enq && (enq->kind == amqp::Value::Kind::Timestamp || enq->IsInteger()))
				m->enqueued_ms = enq->AsInt();
			const amqp::Value *lu = ma.Get("x-opt-locked-until");
			if (lu && (lu->kind == amqp::Value::Kind::Timestamp || lu->IsInteger()))
				m->locked_until_ms = lu->AsInt();
		}
	}
}

// The properties section's text fields; false with decode_error set when it is malformed.
bool
ReadProperties(const amqp::Sections &sec, ReceivedMessage *m) {
	if (sec.properties.empty())
		return true;
	amqp::Value p;
	if (!amqp::DecodeSection(sec.properties, &p) || p.kind != amqp::Value::Kind::List) {
		m->decode_error = "the properties section is malformed";
		return false;
	}
	m->message_id = ListText(p, amqp::kMessageId);
	m->to = ListText(p, amqp::kTo);
	m->subject = ListText(p, amqp::kSubject);
	m->reply_to = ListText(p, amqp::kReplyTo);
	m->correlation_id = ListText(p, amqp::kCorrelationId);
	m->content_type = ListText(p, amqp::kContentType);
	m->session_id = ListText(p, amqp::kGroupId);
	return true;
}

// The trace context a producer attached: "traceparent" (W3C, as OpenTelemetry's messaging
// instrumentations write it), else "Diagnostic-Id" (the Azure SDKs write the same value there).
void
ReadTraceParent(const amqp::Value &ap, ReceivedMessage *m) {
	using K = amqp::Value::Kind;
	for (const char *key : {"traceparent", "Diagnostic-Id"})
		for (size_t k = 0; k + 1 < ap.items.size(); k += 2) {
			const amqp::Value &name = ap.items[k], &value = ap.items[k + 1];
			if ((name.kind == K::String || name.kind == K::Symbol) && name.s == key &&
			    (value.kind == K::String || value.kind == K::Symbol) && ParseTraceParent(value.s, &m->traceparent))
				return;
		}
}

// The application properties as JSON that jsonb accepts; false with decode_error set otherwise.
bool
ReadApplicationProperties(const amqp::Sections &sec, ReceivedMessage *m) {
	if (sec.application_properties.empty())
		return true;
	amqp::Value ap;
	if (!amqp::DecodeSection(sec.application_properties, &ap) || ap.kind != amqp::Value::Kind::Map) {
		m->decode_error = "the application-properties section is malformed";
		return false;
	}
	m->properties_json.clear();
	ValueToJson(ap, &m->properties_json);
	ReadTraceParent(ap, m);
	std::string why;
	if (!CheckJson(m->properties_json, 64, &why)) {
		m->decode_error = "the application properties cannot be stored as jsonb: " + why;
		return false;
	}
	return true;
}

// The body: data sections joined, an amqp-value (its bytes for a string or binary, JSON for any
// other value), or amqp-sequence sections as one JSON array. False with decode_error set when a
// section is malformed.
bool
ReadBody(const amqp::Sections &sec, ReceivedMessage *m) {
	const uint8_t *p = reinterpret_cast<const uint8_t *>(sec.body.data());
	const uint8_t *end = p + sec.body.size();
	if (sec.body_code == amqp::kData) {
		m->body_kind = BodyKind::Data;
		while (p < end && *p == 0x00) {
			++p;
			amqp::Value bin;
			if (!amqp::Skip(p, end) || !amqp::Decode(p, end, &bin) || bin.kind != amqp::Value::Kind::Binary) {
				m->decode_error = "a data section is malformed";
				return false;
			}
			m->raw_body += bin.s;
		}
	} else if (sec.body_code == amqp::kAmqpValue) {
		amqp::Value v;
		if (!amqp::DecodeSection(sec.body, &v)) {
			m->decode_error = "the amqp-value body is malformed";
			return false;
		}
		if (v.kind == amqp::Value::Kind::String || v.kind == amqp::Value::Kind::Binary) {
			m->body_kind = BodyKind::String;
			m->raw_body = v.s;
		} else {
			m->body_kind = BodyKind::Value;
			ValueToJson(v, &m->raw_body);
		}
	} else if (sec.body_code == amqp::kAmqpSequence) {
		m->body_kind = BodyKind::Sequence;
		m->raw_body = "[";
		bool first = true;
		while (p < end && *p == 0x00) {
			++p;
			amqp::Value v;
			if (!amqp::Skip(p, end) || !amqp::Decode(p, end, &v)) {
				m->decode_error = "an amqp-sequence section is malformed";
				return false;
			}
			for (auto &item : v.items) {
				if (!first)
					m->raw_body.push_back(',');
				first = false;
				ValueToJson(item, &m->raw_body);
			}
		}
		m->raw_body.push_back(']');
	}
	return true;
}

// DecodeMessage without the final pass over its error strings.
void
DecodeInto(std::string_view encoded, int max_json_depth, ReceivedMessage *m) {
	try {
		amqp::Sections sec;
		std::string err;
		if (!amqp::SplitSections(encoded, &sec, &err)) {
			m->decode_error = err;
			return;
		}
		ReadHeaderAndAnnotations(sec, m);
		if (!ReadProperties(sec, m))
			return;
		// The fields are made valid text now, whatever happens below: a message that fails to
		// decode is still dead-lettered and recorded with them.
		std::string bad_text = SanitizeTextFields(m);
		if (!ReadApplicationProperties(sec, m))
			return;
		if (!bad_text.empty()) {
			m->decode_error = std::move(bad_text);
			return; // dead-lettered; the body is not needed
		}
		if (!ReadBody(sec, m))
			return;
		Classify(m, max_json_depth);
	} catch (const std::exception &e) {
		m->decode_error = std::string("the message could not be decoded: ") + e.what();
	}
}

} // namespace

void
DecodeMessage(std::string_view encoded, int max_json_depth, ReceivedMessage *m) {
	DecodeInto(encoded, max_json_depth, m);
	if (!m->decode_error.empty()) {
		// Normally done already; again in case decoding stopped (an exception) between reading the
		// properties and making them valid.
		try {
			SanitizeTextFields(m);
		} catch (const std::exception &) {
			for (const TextField &f : kTextFields)
				(m->*f.field).clear();
		}
	}
	// Reasons may quote message bytes; they go into text columns and the DLQ description.
	for (std::string *e : {&m->decode_error, &m->json_error, &m->schema_error}) {
		try {
			*e = ToValidUtf8(*e);
		} catch (const std::exception &) {
			if (!e->empty())
				*e = "unreadable"; // short enough not to allocate; an error stays an error
		}
	}
}

} // namespace sbpg
