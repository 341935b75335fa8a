// src/amqp/codec_sections.cpp
//   The sections of an encoded AMQP message (part 3 of the specification): the split of a message
//   into views of its sections and its bare message, and the decoding and encoding of one section.
//   Invariants: SplitSections copies nothing (every view points into the input); it accepts
//   sections only in the specification's order, each at most once, body sections repeated only
//   with one kind; the bare message spans from the first of properties, application-properties or
//   body to the footer (or the end).
#include "sbpg/amqp/codec.hpp"

#include <cstdint>

namespace sbpg::amqp {

namespace {

// Reads a section descriptor: 0x00 followed by a ulong code or a symbolic name.
bool
ReadDescriptor(const uint8_t *&p, const uint8_t *end, uint64_t *code) {
	if (p >= end || *p != 0x00)
		return false;
	++p;
	Value d;
	if (!Decode(p, end, &d))
		return false;
	if (d.kind == Value::Kind::ULong) {
		*code = d.u;
		return true;
	}
	if (d.kind == Value::Kind::Symbol) {
		static const struct {
			const char *name;
			uint64_t code;
		} names[] = {{"amqp:header:list", kHeader},
		             {"amqp:delivery-annotations:map", kDeliveryAnnotations},
		             {"amqp:message-annotations:map", kMessageAnnotations},
		             {"amqp:properties:list", kProperties},
		             {"amqp:application-properties:map", kApplicationProperties},
		             {"amqp:data:binary", kData},
		             {"amqp:amqp-sequence:list", kAmqpSequence},
		             {"amqp:value:*", kAmqpValue},
		             {"amqp:footer:map", kFooter}};
		for (auto &n : names)
			if (d.s == n.name) {
				*code = n.code;
				return true;
			}
	}
	return false;
}

bool
IsBody(uint64_t code) {
	return code == kData || code == kAmqpSequence || code == kAmqpValue;
}

// Whether a section with `code` may follow the one with `last` (0 at the start) in a message
// whose body so far is described by `out`; sets `err` when not.
bool
CheckPlace(uint64_t code, uint64_t last, const Sections &out, std::string *err) {
	if (code < kHeader || code > kFooter) {
		*err = "malformed message: unknown section descriptor";
		return false;
	}
	bool is_body = IsBody(code);
	// Sections must come in order; body sections may repeat (data, amqp-sequence).
	if (code < last && !(is_body && last >= kData && last <= kAmqpValue)) {
		*err = "malformed message: sections out of order";
		return false;
	}
	if (code == last && !is_body) {
		*err = "malformed message: a section appears twice";
		return false;
	}
	if (is_body && out.body_sections > 0 && code != out.body_code) {
		*err = "malformed message: mixed body section kinds";
		return false;
	}
	return true;
}

// Keeps the view of a non-body section in its field of `out`.
void
KeepSection(uint64_t code, std::string_view sec, Sections *out) {
	switch (code) {
	case kHeader:
		out->header = sec;
		break;
	case kDeliveryAnnotations:
		out->delivery_annotations = sec;
		break;
	case kMessageAnnotations:
		out->message_annotations = sec;
		break;
	case kProperties:
		out->properties = sec;
		break;
	case kApplicationProperties:
		out->application_properties = sec;
		break;
	case kFooter:
		out->footer = sec;
		break;
	default:
		break;
	}
}

std::string_view
View(const uint8_t *from, const uint8_t *to) {
	return std::string_view(reinterpret_cast<const char *>(from), static_cast<size_t>(to - from));
}

} // namespace

bool
SplitSections(std::string_view message, Sections *out, std::string *err) {
	*out = Sections();
	const uint8_t *base = reinterpret_cast<const uint8_t *>(message.data());
	const uint8_t *p = base, *end = base + message.size();
	uint64_t last = 0;
	const uint8_t *bare_start = nullptr, *body_start = nullptr, *body_end = nullptr;
	while (p < end) {
		const uint8_t *start = p;
		uint64_t code;
		if (!ReadDescriptor(p, end, &code)) {
			*err = "malformed message: a section has no valid descriptor";
			return false;
		}
		if (!Skip(p, end)) {
			*err = "malformed message: a section value is truncated or invalid";
			return false;
		}
		if (!CheckPlace(code, last, *out, err))
			return false;
		if (IsBody(code)) {
			if (!body_start)
				body_start = start;
			body_end = p;
			out->body_code = code;
			++out->body_sections;
		}
		KeepSection(code, View(start, p), out);
		if (code >= kProperties && code != kFooter && !bare_start)
			bare_start = start;
		last = code;
	}
	if (body_start)
		out->body = View(body_start, body_end);
	if (bare_start)
		out->bare = View(bare_start, out->footer.empty() ? end : reinterpret_cast<const uint8_t *>(out->footer.data()));
	return true;
}

bool
DecodeSection(std::string_view section, Value *out) {
	const uint8_t *p = reinterpret_cast<const uint8_t *>(section.data());
	const uint8_t *end = p + section.size();
	uint64_t code;
	if (!ReadDescriptor(p, end, &code))
		return false;
	return Decode(p, end, out) && p == end;
}

void
EncodeSection(uint64_t code, const Value &v, std::string *out) {
	Writer w(out);
	w.Descriptor(code);
	Encode(v, out);
}

} // namespace sbpg::amqp
