// src/amqp/codec_decode.cpp
//   Decoding of the AMQP 1.0 type system (part 1 of the specification) into Value trees, and
//   skipping of encoded values. Invariants: input is untrusted, so every read is bounds-checked
//   against `end`; nesting is bounded by kMaxDepth; what one Decode call may allocate is bounded by
//   its Budget (a fixed amount plus a multiple of the input size). A false return leaves `p`
//   somewhere inside the input and `out` unspecified.
#include "sbpg/amqp/codec.hpp"

#include <cstdint>
#include <cstring>

namespace sbpg::amqp {

namespace {

constexpr int kMaxDepth = 64;

// What one Decode call may allocate, so that a small input cannot make a huge value tree (an
// array of a million zero-width nulls, a list of 64M one-byte nulls). Every value costs its
// node plus its text; the allowance is a fixed amount plus a multiple of the input size, far
// above what any real message or request needs.
constexpr size_t kBudgetBase = 8u << 20;
constexpr size_t kBudgetPerByte = 16;

struct Budget {
	size_t left;
	explicit Budget(size_t input)
	    : left(kBudgetBase +
	           (input > (SIZE_MAX - kBudgetBase) / kBudgetPerByte ? SIZE_MAX - kBudgetBase : input * kBudgetPerByte)) {}
	bool Take(size_t n) {
		if (n > left)
			return false;
		left -= n;
		return true;
	}
	// Whether `count` more values could still fit.
	bool Room(uint64_t count) const { return count <= left / sizeof(Value); }
};

// Reads `width` bytes (0 to 8) as a big-endian unsigned number.
uint64_t
ReadBe(const uint8_t *p, int width) {
	uint64_t v = 0;
	for (int k = 0; k < width; ++k)
		v = (v << 8) | p[k];
	return v;
}

// The value of the low `width` bytes of `raw`, read as a two's-complement number of that width.
int64_t
SignExtend(uint64_t raw, int width) {
	switch (width) {
	case 1:
		return static_cast<int8_t>(raw);
	case 2:
		return static_cast<int16_t>(raw);
	case 4:
		return static_cast<int32_t>(raw);
	default:
		return static_cast<int64_t>(raw);
	}
}

// Width in bytes of the fixed part of a primitive encoding, -1 for variable or compound.
int
FixedWidth(uint8_t code) {
	switch (code >> 4) {
	case 0x4:
		return 0;
	case 0x5:
		return 1;
	case 0x6:
		return 2;
	case 0x7:
		return 4;
	case 0x8:
		return 8;
	case 0x9:
		return 16;
	default:
		return -1;
	}
}

bool DecodeWithCode(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget);
bool DecodeValue(const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget);
bool SkipValue(const uint8_t *&p, const uint8_t *end, int depth);

// The integer encodings (and char, timestamp): `width` bytes big-endian, sign-extended for the
// signed kinds. The caller has checked that `width` bytes are there.
bool
DecodeInteger(uint8_t code, int width, const uint8_t *&p, Value *out) {
	bool is_signed = false;
	switch (code) {
	case 0x43: // uint0
	case 0x52: // smalluint
	case 0x70:
		out->kind = Value::Kind::UInt;
		break;
	case 0x44: // ulong0
	case 0x53: // smallulong
	case 0x80:
		out->kind = Value::Kind::ULong;
		break;
	case 0x50:
		out->kind = Value::Kind::UByte;
		break;
	case 0x60:
		out->kind = Value::Kind::UShort;
		break;
	case 0x73:
		out->kind = Value::Kind::Char;
		break;
	case 0x51:
		out->kind = Value::Kind::Byte, is_signed = true;
		break;
	case 0x61:
		out->kind = Value::Kind::Short, is_signed = true;
		break;
	case 0x54: // smallint
	case 0x71:
		out->kind = Value::Kind::Int, is_signed = true;
		break;
	case 0x55: // smalllong
	case 0x81:
		out->kind = Value::Kind::Long, is_signed = true;
		break;
	case 0x83:
		out->kind = Value::Kind::Timestamp, is_signed = true;
		break;
	default:
		return false;
	}
	uint64_t raw = ReadBe(p, width);
	p += width;
	if (is_signed)
		out->i = SignExtend(raw, width);
	else
		out->u = raw;
	return true;
}

// The fixed-width encodings (codes 0x40 to 0x9f); `width` bytes are there.
bool
DecodeFixed(uint8_t code, int width, const uint8_t *&p, Value *out) {
	switch (code) {
	case 0x40:
		out->kind = Value::Kind::Null;
		return true;
	case 0x41:
	case 0x42:
		out->kind = Value::Kind::Bool;
		out->u = code == 0x41;
		return true;
	case 0x56:
		out->kind = Value::Kind::Bool;
		out->u = *p++ != 0;
		return true;
	case 0x45: // list0
		out->kind = Value::Kind::List;
		return true;
	case 0x72: {
		out->kind = Value::Kind::Float;
		uint32_t b = static_cast<uint32_t>(ReadBe(p, 4));
		float f;
		std::memcpy(&f, &b, 4);
		out->d = f;
		p += 4;
		return true;
	}
	case 0x82: {
		out->kind = Value::Kind::Double;
		uint64_t b = ReadBe(p, 8);
		std::memcpy(&out->d, &b, 8);
		p += 8;
		return true;
	}
	case 0x74:
	case 0x84:
	case 0x94:
		out->kind = Value::Kind::Decimal;
		out->s.assign(reinterpret_cast<const char *>(p), width);
		p += width;
		return true;
	case 0x98:
		out->kind = Value::Kind::Uuid;
		out->s.assign(reinterpret_cast<const char *>(p), 16);
		p += 16;
		return true;
	default:
		return DecodeInteger(code, width, p, out);
	}
}

// Binary, string and symbol: a one-byte (0xaX) or four-byte (0xbX) length, then the bytes.
bool
DecodeVariable(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, Budget &budget) {
	size_t len;
	if ((code & 0xf0) == 0xa0) {
		if (end - p < 1)
			return false;
		len = *p++;
	} else {
		if (end - p < 4)
			return false;
		len = static_cast<size_t>(ReadBe(p, 4));
		p += 4;
	}
	if (static_cast<size_t>(end - p) < len || !budget.Take(len))
		return false;
	out->kind = (code & 0x0f) == 0 ? Value::Kind::Binary
	                               : ((code & 0x0f) == 1 ? Value::Kind::String : Value::Kind::Symbol);
	out->s.assign(reinterpret_cast<const char *>(p), len);
	p += len;
	return true;
}

// Reads a compound value's size and count, leaves `p` at its first element and narrows `end` to
// the value's own bytes.
bool
ReadCompoundHeader(uint8_t code, const uint8_t *&p, const uint8_t *&end, uint32_t *count) {
	bool wide = (code & 0xf0) == 0xd0 || (code & 0xf0) == 0xf0;
	int width = wide ? 4 : 1; // of the size and of the count
	if (end - p < 2 * width)
		return false;
	uint32_t size = static_cast<uint32_t>(ReadBe(p, width));
	*count = static_cast<uint32_t>(ReadBe(p + width, width));
	p += width;
	if (size < static_cast<uint32_t>(width) || static_cast<size_t>(end - p) < size)
		return false;
	end = p + size;
	p += width;
	return true;
}

// The elements of an array: one constructor (with its descriptor, for described elements), then
// each element's data alone.
bool
DecodeArrayElements(uint32_t count, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	out->kind = Value::Kind::Array;
	if (p >= end)
		return count == 0;
	uint8_t elem = *p++;
	if (elem == 0x00) {
		// An array of described elements: the descriptor is written once, before the element
		// constructor, and is kept once (encoded, in `s`) rather than copied into each element.
		const uint8_t *desc = p;
		if (!SkipValue(p, end, depth + 1) || p >= end || !budget.Take(static_cast<size_t>(p - desc)))
			return false;
		out->s.assign(reinterpret_cast<const char *>(desc), static_cast<size_t>(p - desc));
		elem = *p++;
		if (elem == 0x00)
			return false; // a described descriptor of elements: not something peers send
	}
	int fw = FixedWidth(elem);
	if (fw == 0 && count > 1024 * 1024)
		return false;
	if (fw > 0 && static_cast<uint64_t>(count) * fw > static_cast<uint64_t>(end - p))
		return false;
	out->items.reserve(count < 4096 ? count : 4096);
	for (uint32_t k = 0; k < count; ++k) {
		Value v;
		if (!budget.Take(sizeof(Value)) || !DecodeWithCode(elem, p, end, &v, depth + 1, budget))
			return false;
		out->items.push_back(std::move(v));
	}
	return true;
}

// The elements of a list, or the keys and values of a map.
bool
DecodeListElements(uint8_t code, uint32_t count, const uint8_t *&p, const uint8_t *end, Value *out, int depth,
                   Budget &budget) {
	out->kind = ((code & 0x0f) == 0x00) ? Value::Kind::List : Value::Kind::Map;
	if (out->kind == Value::Kind::Map && count % 2 != 0)
		return false;
	out->items.reserve(count < 4096 ? count : 4096);
	for (uint32_t k = 0; k < count; ++k) {
		Value v;
		if (!budget.Take(sizeof(Value)) || !DecodeValue(p, end, &v, depth + 1, budget))
			return false;
		out->items.push_back(std::move(v));
	}
	return true;
}

bool
DecodeCompound(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	uint32_t count;
	if (!ReadCompoundHeader(code, p, end, &count))
		return false;
	bool is_array = (code & 0x0f) == 0x00 && ((code & 0xf0) == 0xe0 || (code & 0xf0) == 0xf0);
	if (count > static_cast<uint32_t>(end - p) + 1u && !is_array)
		return false; // each element takes at least one byte
	out->items.clear();
	if (!budget.Room(count))
		return false;
	bool ok = is_array ? DecodeArrayElements(count, p, end, out, depth, budget)
	                   : DecodeListElements(code, count, p, end, out, depth, budget);
	if (ok)
		p = end;
	return ok;
}

bool
DecodeWithCode(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	if (depth > kMaxDepth)
		return false;
	*out = Value();
	int fw = FixedWidth(code);
	if (fw >= 0) {
		if (end - p < fw)
			return false;
		return DecodeFixed(code, fw, p, out);
	}
	switch (code) {
	case 0xa0:
	case 0xa1:
	case 0xa3:
	case 0xb0:
	case 0xb1:
	case 0xb3:
		return DecodeVariable(code, p, end, out, budget);
	case 0xc0:
	case 0xc1:
	case 0xd0:
	case 0xd1:
	case 0xe0:
	case 0xf0:
		return DecodeCompound(code, p, end, out, depth, budget);
	case 0x00:
		out->kind = Value::Kind::Described;
		if (!budget.Take(2 * sizeof(Value)))
			return false;
		out->items.resize(2);
		return DecodeValue(p, end, &out->items[0], depth + 1, budget) &&
		       DecodeValue(p, end, &out->items[1], depth + 1, budget);
	default:
		return false;
	}
}

bool
DecodeValue(const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	if (p >= end || depth > kMaxDepth)
		return false;
	uint8_t code = *p++;
	return DecodeWithCode(code, p, end, out, depth, budget);
}

// Skips one value. Described values nest (a descriptor may itself be described), so the depth
// is bounded as in Decode; compound values are skipped by their size without recursion.
bool
SkipValue(const uint8_t *&p, const uint8_t *end, int depth) {
	if (p >= end || depth > kMaxDepth)
		return false;
	uint8_t code = *p++;
	if (code == 0x00)
		return SkipValue(p, end, depth + 1) && SkipValue(p, end, depth + 1);
	int fw = FixedWidth(code);
	if (fw >= 0) {
		if (end - p < fw)
			return false;
		p += fw;
		return true;
	}
	size_t len;
	switch (code & 0xf0) {
	case 0xa0:
	case 0xc0:
	case 0xe0:
		if (end - p < 1)
			return false;
		len = *p++;
		break;
	case 0xb0:
	case 0xd0:
	case 0xf0:
		if (end - p < 4)
			return false;
		len = static_cast<size_t>(ReadBe(p, 4));
		p += 4;
		break;
	default:
		return false;
	}
	if (static_cast<size_t>(end - p) < len)
		return false;
	p += len;
	return true;
}

} // namespace

bool
Decode(const uint8_t *&p, const uint8_t *end, Value *out, int depth) {
	if (p >= end)
		return false;
	Budget budget(static_cast<size_t>(end - p));
	return DecodeValue(p, end, out, depth, budget);
}

bool
DecodeAll(std::string_view bytes, Value *out) {
	const uint8_t *p = reinterpret_cast<const uint8_t *>(bytes.data());
	const uint8_t *end = p + bytes.size();
	return Decode(p, end, out) && p == end;
}

bool
Skip(const uint8_t *&p, const uint8_t *end) {
	return SkipValue(p, end, 0);
}

} // namespace sbpg::amqp
