// src/amqp/codec_encode.cpp
//   Encoding of the AMQP 1.0 type system: the Writer for hand-built frames, and Encode for Value
//   trees. Invariants: numbers are written big-endian; Encode picks the narrowest constructor the
//   Writer has for a kind (uint0, smallulong, ...), except in arrays, whose elements share one
//   constructor and are therefore written in their widest form; compound values carry 32-bit size
//   and count, back-filled once their contents are written.
#include "sbpg/amqp/codec.hpp"

#include <cstdint>
#include <cstring>

namespace sbpg::amqp {

namespace {

// Appends the low `width` bytes of `v`, most significant first.
void
PutBe(std::string *out, uint64_t v, int width) {
	for (int s = width - 1; s >= 0; --s)
		out->push_back(static_cast<char>(v >> (8 * s)));
}

// A constructor byte followed by `width` bytes of `bits`.
void
PutFixed(std::string *out, uint8_t code, uint64_t bits, int width) {
	out->push_back(static_cast<char>(code));
	PutBe(out, bits, width);
}

} // namespace

void
Writer::Be32(uint32_t v) {
	PutBe(out_, v, 4);
}
void
Writer::Be64(uint64_t v) {
	PutBe(out_, v, 8);
}
void
Writer::UByte(uint8_t v) {
	PutFixed(out_, 0x50, v, 1);
}
void
Writer::UInt(uint32_t v) {
	if (v == 0)
		out_->push_back(char(0x43));
	else if (v < 256)
		PutFixed(out_, 0x52, v, 1);
	else
		PutFixed(out_, 0x70, v, 4);
}
void
Writer::ULong(uint64_t v) {
	if (v == 0)
		out_->push_back(char(0x44));
	else if (v < 256)
		PutFixed(out_, 0x53, v, 1);
	else
		PutFixed(out_, 0x80, v, 8);
}
void
Writer::Int(int32_t v) {
	if (v >= -128 && v <= 127)
		PutFixed(out_, 0x54, static_cast<uint64_t>(v), 1);
	else
		PutFixed(out_, 0x71, static_cast<uint32_t>(v), 4);
}
void
Writer::Long(int64_t v) {
	if (v >= -128 && v <= 127)
		PutFixed(out_, 0x55, static_cast<uint64_t>(v), 1);
	else
		PutFixed(out_, 0x81, static_cast<uint64_t>(v), 8);
}
void
Writer::Timestamp(int64_t ms) {
	PutFixed(out_, 0x83, static_cast<uint64_t>(ms), 8);
}
void
Writer::Uuid(const uint8_t b[16]) {
	out_->push_back(char(0x98));
	out_->append(reinterpret_cast<const char *>(b), 16);
}
void
Writer::Variable(uint8_t code8, std::string_view bytes) {
	if (bytes.size() < 256)
		PutFixed(out_, code8, bytes.size(), 1);
	else
		PutFixed(out_, code8 | 0x10, bytes.size(), 4); // the 32-bit form of the same kind
	out_->append(bytes.data(), bytes.size());
}
void
Writer::Binary(std::string_view b) {
	Variable(0xa0, b);
}
void
Writer::String(std::string_view s) {
	Variable(0xa1, s);
}
void
Writer::Symbol(std::string_view s) {
	Variable(0xa3, s);
}
void
Writer::Descriptor(uint64_t code) {
	out_->push_back(char(0x00));
	ULong(code);
}
size_t
Writer::BeginCompound(uint8_t code) {
	out_->push_back(static_cast<char>(code));
	size_t mark = out_->size();
	Be32(0);
	Be32(0);
	return mark;
}
void
Writer::EndCompound(size_t mark, uint32_t count) {
	uint32_t size = static_cast<uint32_t>(out_->size() - mark - 4);
	std::string field;
	PutBe(&field, size, 4);
	PutBe(&field, count, 4);
	out_->replace(mark, 8, field);
}
void
Writer::ArrayOf64(uint8_t code, const std::vector<int64_t> &v) {
	size_t mark = BeginCompound(0xf0);
	out_->push_back(static_cast<char>(code));
	for (int64_t x : v)
		Be64(static_cast<uint64_t>(x));
	EndCompound(mark, static_cast<uint32_t>(v.size()));
}
void
Writer::ArrayOfLong(const std::vector<int64_t> &v) {
	ArrayOf64(0x81, v);
}
void
Writer::ArrayOfTimestamp(const std::vector<int64_t> &v) {
	ArrayOf64(0x83, v);
}
void
Writer::ArrayOfUuid(const std::vector<std::string> &uuids) {
	size_t mark = BeginCompound(0xf0);
	out_->push_back(char(0x98));
	for (const auto &u : uuids)
		out_->append(u.data(), 16);
	EndCompound(mark, static_cast<uint32_t>(uuids.size()));
}

namespace {

// The constructor and data of an array's elements, all of the first element's kind, each in the
// widest form of that kind.
void
EncodeArrayElements(const std::vector<Value> &items, std::string *out) {
	Value::Kind k = items[0].kind;
	switch (k) {
	case Value::Kind::Long:
	case Value::Kind::Timestamp:
		out->push_back(char(k == Value::Kind::Long ? 0x81 : 0x83));
		for (auto &e : items)
			PutBe(out, static_cast<uint64_t>(e.i), 8);
		break;
	case Value::Kind::ULong:
		out->push_back(char(0x80));
		for (auto &e : items)
			PutBe(out, e.u, 8);
		break;
	case Value::Kind::Int:
		out->push_back(char(0x71));
		for (auto &e : items)
			PutBe(out, static_cast<uint32_t>(e.i), 4);
		break;
	case Value::Kind::UInt:
		out->push_back(char(0x70));
		for (auto &e : items)
			PutBe(out, e.u, 4);
		break;
	case Value::Kind::Uuid:
		out->push_back(char(0x98));
		for (auto &e : items)
			out->append(e.s.data(), 16);
		break;
	case Value::Kind::String:
	case Value::Kind::Symbol:
	case Value::Kind::Binary:
		out->push_back(static_cast<char>(k == Value::Kind::String ? 0xb1 : (k == Value::Kind::Symbol ? 0xb3 : 0xb0)));
		for (auto &e : items) {
			PutBe(out, e.s.size(), 4);
			out->append(e.s);
		}
		break;
	case Value::Kind::Bool:
		out->push_back(char(0x56));
		for (auto &e : items)
			out->push_back(e.u ? 1 : 0);
		break;
	case Value::Kind::UByte:
	case Value::Kind::Byte:
		out->push_back(char(k == Value::Kind::UByte ? 0x50 : 0x51));
		for (auto &e : items)
			out->push_back(static_cast<char>(k == Value::Kind::UByte ? e.u : static_cast<uint64_t>(e.i)));
		break;
	case Value::Kind::UShort:
	case Value::Kind::Short:
		out->push_back(char(k == Value::Kind::UShort ? 0x60 : 0x61));
		for (auto &e : items)
			PutBe(out, k == Value::Kind::UShort ? e.u : static_cast<uint64_t>(e.i), 2);
		break;
	default:
		// Maps and lists in arrays: 32-bit compound encodings without constructors.
		out->push_back(static_cast<char>(k == Value::Kind::Map ? 0xd1 : 0xd0));
		for (auto &e : items) {
			std::string one;
			Encode(e, &one);
			if (!one.empty() && (uint8_t(one[0]) == 0xd0 || uint8_t(one[0]) == 0xd1))
				out->append(one, 1, std::string::npos);
			else
				out->append("\x00\x00\x00\x04\x00\x00\x00\x00", 8);
		}
		break;
	}
}

void
EncodeArray(const Value &v, std::string *out) {
	Writer w(out);
	size_t mark = w.BeginCompound(0xf0);
	if (!v.s.empty()) { // elements described by one descriptor (kept encoded)
		out->push_back(char(0x00));
		out->append(v.s);
	}
	if (v.items.empty())
		out->push_back(char(0x40));
	else
		EncodeArrayElements(v.items, out);
	w.EndCompound(mark, static_cast<uint32_t>(v.items.size()));
}

// The kinds the Writer has no call for, and float and double (their bits, big-endian).
void
EncodeOtherScalar(const Value &v, std::string *out) {
	switch (v.kind) {
	case Value::Kind::UShort:
		PutFixed(out, 0x60, v.u, 2);
		break;
	case Value::Kind::Byte:
		PutFixed(out, 0x51, static_cast<uint64_t>(v.i), 1);
		break;
	case Value::Kind::Short:
		PutFixed(out, 0x61, static_cast<uint64_t>(v.i), 2);
		break;
	case Value::Kind::Float: {
		float f = static_cast<float>(v.d);
		uint32_t b;
		std::memcpy(&b, &f, 4);
		PutFixed(out, 0x72, b, 4);
		break;
	}
	case Value::Kind::Double: {
		uint64_t b;
		std::memcpy(&b, &v.d, 8);
		PutFixed(out, 0x82, b, 8);
		break;
	}
	case Value::Kind::Decimal:
		out->push_back(static_cast<char>(v.s.size() == 4 ? 0x74 : (v.s.size() == 8 ? 0x84 : 0x94)));
		out->append(v.s);
		break;
	case Value::Kind::Char:
		PutFixed(out, 0x73, v.u, 4);
		break;
	default:
		break;
	}
}

} // namespace

void
Encode(const Value &v, std::string *out) {
	Writer w(out);
	switch (v.kind) {
	case Value::Kind::Null:
		w.Null();
		break;
	case Value::Kind::Bool:
		w.Bool(v.u != 0);
		break;
	case Value::Kind::UByte:
		w.UByte(static_cast<uint8_t>(v.u));
		break;
	case Value::Kind::UInt:
		w.UInt(static_cast<uint32_t>(v.u));
		break;
	case Value::Kind::ULong:
		w.ULong(v.u);
		break;
	case Value::Kind::Int:
		w.Int(static_cast<int32_t>(v.i));
		break;
	case Value::Kind::Long:
		w.Long(v.i);
		break;
	case Value::Kind::Timestamp:
		w.Timestamp(v.i);
		break;
	case Value::Kind::Uuid:
		w.Uuid(reinterpret_cast<const uint8_t *>(v.s.data()));
		break;
	case Value::Kind::Binary:
		w.Binary(v.s);
		break;
	case Value::Kind::String:
		w.String(v.s);
		break;
	case Value::Kind::Symbol:
		w.Symbol(v.s);
		break;
	case Value::Kind::List:
	case Value::Kind::Map: {
		size_t mark = w.BeginCompound(v.kind == Value::Kind::List ? 0xd0 : 0xd1);
		for (auto &e : v.items)
			Encode(e, out);
		w.EndCompound(mark, static_cast<uint32_t>(v.items.size()));
		break;
	}
	case Value::Kind::Array:
		EncodeArray(v, out);
		break;
	case Value::Kind::Described:
		out->push_back(char(0x00));
		if (v.items.size() == 2) {
			Encode(v.items[0], out);
			Encode(v.items[1], out);
		} else {
			w.Null();
			w.Null();
		}
		break;
	default:
		EncodeOtherScalar(v, out);
		break;
	}
}

} // namespace sbpg::amqp
