// src/amqp/codec.cpp
//   AMQP 1.0 type-system encoding and decoding (part 1 of the specification).
#include "sbpg/amqp/codec.hpp"

#include "sbpg/core/text.hpp"

#include <cstdio>
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
	explicit Budget(size_t input) : left(kBudgetBase + (input > (SIZE_MAX - kBudgetBase) / kBudgetPerByte
	                                                        ? SIZE_MAX - kBudgetBase
	                                                        : input * kBudgetPerByte)) {}
	bool Take(size_t n) {
		if (n > left)
			return false;
		left -= n;
		return true;
	}
	// Whether `count` more values could still fit.
	bool Room(uint64_t count) const { return count <= left / sizeof(Value); }
};

uint16_t
Rd16(const uint8_t *p) {
	return static_cast<uint16_t>((p[0] << 8) | p[1]);
}
uint32_t
Rd32(const uint8_t *p) {
	return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}
uint64_t
Rd64(const uint8_t *p) {
	return (uint64_t(Rd32(p)) << 32) | Rd32(p + 4);
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

bool
DecodeCompound(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	uint32_t size, count;
	bool wide = (code & 0xf0) == 0xd0 || (code & 0xf0) == 0xf0;
	if (wide) {
		if (end - p < 8)
			return false;
		size = Rd32(p);
		count = Rd32(p + 4);
		p += 4;
		if (size < 4 || static_cast<size_t>(end - p) < size)
			return false;
		const uint8_t *limit = p + size;
		p += 4;
		end = limit;
	} else {
		if (end - p < 2)
			return false;
		size = p[0];
		count = p[1];
		p += 1;
		if (size < 1 || static_cast<size_t>(end - p) < size)
			return false;
		const uint8_t *limit = p + size;
		p += 1;
		end = limit;
	}
	bool is_array = (code & 0x0f) == 0x00 && ((code & 0xf0) == 0xe0 || (code & 0xf0) == 0xf0);
	if (count > static_cast<uint32_t>(end - p) + 1u && !is_array)
		return false; // each element takes at least one byte
	out->items.clear();
	if (!budget.Room(count))
		return false;
	if (is_array) {
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
	} else {
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
	}
	p = end;
	return true;
}

bool
DecodeWithCode(uint8_t code, const uint8_t *&p, const uint8_t *end, Value *out, int depth, Budget &budget) {
	if (depth > kMaxDepth)
		return false;
	*out = Value();
	int fw = FixedWidth(code);
	if (fw > 0 && end - p < fw)
		return false;
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
	case 0x50:
		out->kind = Value::Kind::UByte;
		out->u = *p++;
		return true;
	case 0x60:
		out->kind = Value::Kind::UShort;
		out->u = Rd16(p);
		p += 2;
		return true;
	case 0x70:
		out->kind = Value::Kind::UInt;
		out->u = Rd32(p);
		p += 4;
		return true;
	case 0x52:
		out->kind = Value::Kind::UInt;
		out->u = *p++;
		return true;
	case 0x43:
		out->kind = Value::Kind::UInt;
		return true;
	case 0x80:
		out->kind = Value::Kind::ULong;
		out->u = Rd64(p);
		p += 8;
		return true;
	case 0x53:
		out->kind = Value::Kind::ULong;
		out->u = *p++;
		return true;
	case 0x44:
		out->kind = Value::Kind::ULong;
		return true;
	case 0x51:
		out->kind = Value::Kind::Byte;
		out->i = static_cast<int8_t>(*p++);
		return true;
	case 0x61:
		out->kind = Value::Kind::Short;
		out->i = static_cast<int16_t>(Rd16(p));
		p += 2;
		return true;
	case 0x71:
		out->kind = Value::Kind::Int;
		out->i = static_cast<int32_t>(Rd32(p));
		p += 4;
		return true;
	case 0x54:
		out->kind = Value::Kind::Int;
		out->i = static_cast<int8_t>(*p++);
		return true;
	case 0x81:
		out->kind = Value::Kind::Long;
		out->i = static_cast<int64_t>(Rd64(p));
		p += 8;
		return true;
	case 0x55:
		out->kind = Value::Kind::Long;
		out->i = static_cast<int8_t>(*p++);
		return true;
	case 0x72: {
		out->kind = Value::Kind::Float;
		uint32_t b = Rd32(p);
		float f;
		std::memcpy(&f, &b, 4);
		out->d = f;
		p += 4;
		return true;
	}
	case 0x82: {
		out->kind = Value::Kind::Double;
		uint64_t b = Rd64(p);
		std::memcpy(&out->d, &b, 8);
		p += 8;
		return true;
	}
	case 0x74:
	case 0x84:
	case 0x94:
		out->kind = Value::Kind::Decimal;
		out->s.assign(reinterpret_cast<const char *>(p), fw);
		p += fw;
		return true;
	case 0x73:
		out->kind = Value::Kind::Char;
		out->u = Rd32(p);
		p += 4;
		return true;
	case 0x83:
		out->kind = Value::Kind::Timestamp;
		out->i = static_cast<int64_t>(Rd64(p));
		p += 8;
		return true;
	case 0x98:
		out->kind = Value::Kind::Uuid;
		out->s.assign(reinterpret_cast<const char *>(p), 16);
		p += 16;
		return true;
	case 0xa0:
	case 0xa1:
	case 0xa3:
	case 0xb0:
	case 0xb1:
	case 0xb3: {
		size_t len;
		if ((code & 0xf0) == 0xa0) {
			if (end - p < 1)
				return false;
			len = *p++;
		} else {
			if (end - p < 4)
				return false;
			len = Rd32(p);
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
	case 0x45:
		out->kind = Value::Kind::List;
		return true;
	case 0xc0:
	case 0xc1:
	case 0xd0:
	case 0xd1:
	case 0xe0:
	case 0xf0:
		return DecodeCompound(code, p, end, out, depth, budget);
	case 0x00: {
		out->kind = Value::Kind::Described;
		if (!budget.Take(2 * sizeof(Value)))
			return false;
		out->items.resize(2);
		if (!DecodeValue(p, end, &out->items[0], depth + 1, budget))
			return false;
		return DecodeValue(p, end, &out->items[1], depth + 1, budget);
	}
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
		len = Rd32(p);
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

Value
Value::Bool(bool b) {
	Value v;
	v.kind = Kind::Bool;
	v.u = b;
	return v;
}
Value
Value::UByte(uint8_t x) {
	Value v;
	v.kind = Kind::UByte;
	v.u = x;
	return v;
}
Value
Value::UInt(uint32_t x) {
	Value v;
	v.kind = Kind::UInt;
	v.u = x;
	return v;
}
Value
Value::ULong(uint64_t x) {
	Value v;
	v.kind = Kind::ULong;
	v.u = x;
	return v;
}
Value
Value::Int(int32_t x) {
	Value v;
	v.kind = Kind::Int;
	v.i = x;
	return v;
}
Value
Value::Long(int64_t x) {
	Value v;
	v.kind = Kind::Long;
	v.i = x;
	return v;
}
Value
Value::Timestamp(int64_t ms) {
	Value v;
	v.kind = Kind::Timestamp;
	v.i = ms;
	return v;
}
Value
Value::Uuid(const uint8_t bytes[16]) {
	Value v;
	v.kind = Kind::Uuid;
	v.s.assign(reinterpret_cast<const char *>(bytes), 16);
	return v;
}
Value
Value::Binary(std::string_view b) {
	Value v;
	v.kind = Kind::Binary;
	v.s = std::string(b);
	return v;
}
Value
Value::String(std::string_view s) {
	Value v;
	v.kind = Kind::String;
	v.s = std::string(s);
	return v;
}
Value
Value::Symbol(std::string_view s) {
	Value v;
	v.kind = Kind::Symbol;
	v.s = std::string(s);
	return v;
}
Value
Value::List(std::vector<Value> items) {
	Value v;
	v.kind = Kind::List;
	v.items = std::move(items);
	return v;
}
Value
Value::Map(std::vector<Value> kv) {
	Value v;
	v.kind = Kind::Map;
	v.items = std::move(kv);
	return v;
}
Value
Value::Array(std::vector<Value> items) {
	Value v;
	v.kind = Kind::Array;
	v.items = std::move(items);
	return v;
}

bool
Value::IsInteger() const {
	switch (kind) {
	case Kind::UByte:
	case Kind::UShort:
	case Kind::UInt:
	case Kind::ULong:
	case Kind::Byte:
	case Kind::Short:
	case Kind::Int:
	case Kind::Long:
		return true;
	default:
		return false;
	}
}

bool
Value::IsUnsigned() const {
	return kind == Kind::UByte || kind == Kind::UShort || kind == Kind::UInt || kind == Kind::ULong;
}

int64_t
Value::AsInt() const {
	if (IsUnsigned())
		return u > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(u);
	if (kind == Kind::Bool)
		return static_cast<int64_t>(u);
	if (kind == Kind::Float || kind == Kind::Double)
		return static_cast<int64_t>(d);
	return i;
}

const Value *
Value::Get(std::string_view key) const {
	if (kind != Kind::Map)
		return nullptr;
	for (size_t k = 0; k + 1 < items.size(); k += 2)
		if (items[k].IsText() && items[k].s == key)
			return &items[k + 1];
	return nullptr;
}

Value *
Value::GetMutable(std::string_view key) {
	return const_cast<Value *>(static_cast<const Value *>(this)->Get(key));
}

void
Value::Put(Value key, Value value) {
	if (kind != Kind::Map) {
		kind = Kind::Map;
		items.clear();
	}
	for (size_t k = 0; k + 1 < items.size(); k += 2) {
		if (items[k].IsText() && key.IsText() && items[k].s == key.s) {
			items[k + 1] = std::move(value);
			return;
		}
	}
	items.push_back(std::move(key));
	items.push_back(std::move(value));
}

std::string
Value::ToText() const {
	char buf[64];
	switch (kind) {
	case Kind::Null:
		return "";
	case Kind::Bool:
		return u ? "true" : "false";
	case Kind::UByte:
	case Kind::UShort:
	case Kind::UInt:
	case Kind::ULong:
	case Kind::Char:
		std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(u));
		return buf;
	case Kind::Byte:
	case Kind::Short:
	case Kind::Int:
	case Kind::Long:
	case Kind::Timestamp:
		std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(i));
		return buf;
	case Kind::Float:
	case Kind::Double:
		std::snprintf(buf, sizeof buf, "%.17g", d);
		return buf;
	case Kind::Uuid:
		return UuidString(reinterpret_cast<const uint8_t *>(s.data()));
	case Kind::Binary:
	case Kind::Decimal:
		return HexEncode(s);
	case Kind::String:
	case Kind::Symbol:
		return s;
	default:
		return ToJson();
	}
}

std::string
Value::ToJson() const {
	switch (kind) {
	case Kind::Null:
		return "null";
	case Kind::Bool:
		return u ? "true" : "false";
	case Kind::UByte:
	case Kind::UShort:
	case Kind::UInt:
	case Kind::ULong:
	case Kind::Byte:
	case Kind::Short:
	case Kind::Int:
	case Kind::Long:
	case Kind::Float:
	case Kind::Double:
		return ToText();
	case Kind::Timestamp:
		return "\"" + FormatTime(i) + "\"";
	case Kind::List:
	case Kind::Array: {
		std::string r = "[";
		for (size_t k = 0; k < items.size(); ++k) {
			if (k)
				r += ",";
			r += items[k].ToJson();
		}
		return r + "]";
	}
	case Kind::Map: {
		std::string r = "{";
		for (size_t k = 0; k + 1 < items.size(); k += 2) {
			if (k)
				r += ",";
			r += "\"" + JsonEscape(items[k].ToText()) + "\":" + items[k + 1].ToJson();
		}
		return r + "}";
	}
	case Kind::Described:
		return items.size() == 2 ? items[1].ToJson() : "null";
	default:
		return "\"" + JsonEscape(ToText()) + "\"";
	}
}

bool
operator==(const Value &a, const Value &b) {
	if (a.kind != b.kind)
		return false;
	return a.u == b.u && a.i == b.i && a.d == b.d && a.s == b.s && a.items == b.items;
}

void
Writer::Be16(uint16_t v) {
	out_->push_back(static_cast<char>(v >> 8));
	out_->push_back(static_cast<char>(v));
}
void
Writer::Be32(uint32_t v) {
	char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
	out_->append(b, 4);
}
void
Writer::Be64(uint64_t v) {
	Be32(static_cast<uint32_t>(v >> 32));
	Be32(static_cast<uint32_t>(v));
}
void
Writer::UByte(uint8_t v) {
	out_->push_back(char(0x50));
	out_->push_back(static_cast<char>(v));
}
void
Writer::UInt(uint32_t v) {
	if (v == 0) {
		out_->push_back(char(0x43));
	} else if (v < 256) {
		out_->push_back(char(0x52));
		out_->push_back(static_cast<char>(v));
	} else {
		out_->push_back(char(0x70));
		Be32(v);
	}
}
void
Writer::ULong(uint64_t v) {
	if (v == 0) {
		out_->push_back(char(0x44));
	} else if (v < 256) {
		out_->push_back(char(0x53));
		out_->push_back(static_cast<char>(v));
	} else {
		out_->push_back(char(0x80));
		Be64(v);
	}
}
void
Writer::Int(int32_t v) {
	if (v >= -128 && v <= 127) {
		out_->push_back(char(0x54));
		out_->push_back(static_cast<char>(v));
	} else {
		out_->push_back(char(0x71));
		Be32(static_cast<uint32_t>(v));
	}
}
void
Writer::Long(int64_t v) {
	if (v >= -128 && v <= 127) {
		out_->push_back(char(0x55));
		out_->push_back(static_cast<char>(v));
	} else {
		out_->push_back(char(0x81));
		Be64(static_cast<uint64_t>(v));
	}
}
void
Writer::Timestamp(int64_t ms) {
	out_->push_back(char(0x83));
	Be64(static_cast<uint64_t>(ms));
}
void
Writer::Uuid(const uint8_t b[16]) {
	out_->push_back(char(0x98));
	out_->append(reinterpret_cast<const char *>(b), 16);
}
void
Writer::Binary(std::string_view b) {
	if (b.size() < 256) {
		out_->push_back(char(0xa0));
		out_->push_back(static_cast<char>(b.size()));
	} else {
		out_->push_back(char(0xb0));
		Be32(static_cast<uint32_t>(b.size()));
	}
	out_->append(b.data(), b.size());
}
void
Writer::String(std::string_view s) {
	if (s.size() < 256) {
		out_->push_back(char(0xa1));
		out_->push_back(static_cast<char>(s.size()));
	} else {
		out_->push_back(char(0xb1));
		Be32(static_cast<uint32_t>(s.size()));
	}
	out_->append(s.data(), s.size());
}
void
Writer::Symbol(std::string_view s) {
	if (s.size() < 256) {
		out_->push_back(char(0xa3));
		out_->push_back(static_cast<char>(s.size()));
	} else {
		out_->push_back(char(0xb3));
		Be32(static_cast<uint32_t>(s.size()));
	}
	out_->append(s.data(), s.size());
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
	char *p = &(*out_)[mark];
	uint32_t vals[2] = {size, count};
	for (int k = 0; k < 2; ++k) {
		p[4 * k] = char(vals[k] >> 24);
		p[4 * k + 1] = char(vals[k] >> 16);
		p[4 * k + 2] = char(vals[k] >> 8);
		p[4 * k + 3] = char(vals[k]);
	}
}
void
Writer::ArrayOfLong(const std::vector<int64_t> &v) {
	size_t mark = BeginCompound(0xf0);
	out_->push_back(char(0x81));
	for (int64_t x : v)
		Be64(static_cast<uint64_t>(x));
	EndCompound(mark, static_cast<uint32_t>(v.size()));
}
void
Writer::ArrayOfTimestamp(const std::vector<int64_t> &v) {
	size_t mark = BeginCompound(0xf0);
	out_->push_back(char(0x83));
	for (int64_t x : v)
		Be64(static_cast<uint64_t>(x));
	EndCompound(mark, static_cast<uint32_t>(v.size()));
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

// Writes an array element without its constructor; returns false for kinds we do not emit in arrays.
void
EncodeArray(const Value &v, std::string *out) {
	Writer w(out);
	size_t mark = w.BeginCompound(0xf0);
	if (!v.s.empty()) { // elements described by one descriptor (kept encoded)
		out->push_back(char(0x00));
		out->append(v.s);
	}
	if (v.items.empty()) {
		out->push_back(char(0x40));
		w.EndCompound(mark, 0);
		return;
	}
	// Encode each element fully, then strip the (common, widest) constructor. To keep it
	// simple we widen every element to the 32/64-bit form of its kind.
	Value::Kind k = v.items[0].kind;
	auto be = [&](uint64_t x, int bytes) {
		for (int s = bytes - 1; s >= 0; --s)
			out->push_back(static_cast<char>(x >> (8 * s)));
	};
	switch (k) {
	case Value::Kind::Long:
	case Value::Kind::Timestamp:
		out->push_back(char(k == Value::Kind::Long ? 0x81 : 0x83));
		for (auto &e : v.items)
			be(static_cast<uint64_t>(e.i), 8);
		break;
	case Value::Kind::ULong:
		out->push_back(char(0x80));
		for (auto &e : v.items)
			be(e.u, 8);
		break;
	case Value::Kind::Int:
		out->push_back(char(0x71));
		for (auto &e : v.items)
			be(static_cast<uint32_t>(e.i), 4);
		break;
	case Value::Kind::UInt:
		out->push_back(char(0x70));
		for (auto &e : v.items)
			be(e.u, 4);
		break;
	case Value::Kind::Uuid:
		out->push_back(char(0x98));
		for (auto &e : v.items)
			out->append(e.s.data(), 16);
		break;
	case Value::Kind::String:
	case Value::Kind::Symbol:
	case Value::Kind::Binary: {
		uint8_t c = k == Value::Kind::String ? 0xb1 : (k == Value::Kind::Symbol ? 0xb3 : 0xb0);
		out->push_back(static_cast<char>(c));
		for (auto &e : v.items) {
			be(e.s.size(), 4);
			out->append(e.s);
		}
		break;
	}
	case Value::Kind::Bool:
		out->push_back(char(0x56));
		for (auto &e : v.items)
			out->push_back(e.u ? 1 : 0);
		break;
	case Value::Kind::UByte:
	case Value::Kind::Byte:
		out->push_back(char(k == Value::Kind::UByte ? 0x50 : 0x51));
		for (auto &e : v.items)
			out->push_back(static_cast<char>(k == Value::Kind::UByte ? e.u : static_cast<uint64_t>(e.i)));
		break;
	case Value::Kind::UShort:
	case Value::Kind::Short:
		out->push_back(char(k == Value::Kind::UShort ? 0x60 : 0x61));
		for (auto &e : v.items)
			be(k == Value::Kind::UShort ? e.u : static_cast<uint64_t>(e.i), 2);
		break;
	default: {
		// Maps and lists in arrays: 32-bit compound encodings without constructors.
		out->push_back(static_cast<char>(k == Value::Kind::Map ? 0xd1 : 0xd0));
		for (auto &e : v.items) {
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
	w.EndCompound(mark, static_cast<uint32_t>(v.items.size()));
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
	case Value::Kind::UShort:
		out->push_back(char(0x60));
		out->push_back(static_cast<char>(v.u >> 8));
		out->push_back(static_cast<char>(v.u));
		break;
	case Value::Kind::UInt:
		w.UInt(static_cast<uint32_t>(v.u));
		break;
	case Value::Kind::ULong:
		w.ULong(v.u);
		break;
	case Value::Kind::Byte:
		out->push_back(char(0x51));
		out->push_back(static_cast<char>(v.i));
		break;
	case Value::Kind::Short:
		out->push_back(char(0x61));
		out->push_back(static_cast<char>(v.i >> 8));
		out->push_back(static_cast<char>(v.i));
		break;
	case Value::Kind::Int:
		w.Int(static_cast<int32_t>(v.i));
		break;
	case Value::Kind::Long:
		w.Long(v.i);
		break;
	case Value::Kind::Float: {
		float f = static_cast<float>(v.d);
		uint32_t b;
		std::memcpy(&b, &f, 4);
		out->push_back(char(0x72));
		for (int s = 3; s >= 0; --s)
			out->push_back(static_cast<char>(b >> (8 * s)));
		break;
	}
	case Value::Kind::Double: {
		uint64_t b;
		std::memcpy(&b, &v.d, 8);
		out->push_back(char(0x82));
		for (int s = 7; s >= 0; --s)
			out->push_back(static_cast<char>(b >> (8 * s)));
		break;
	}
	case Value::Kind::Decimal:
		out->push_back(static_cast<char>(v.s.size() == 4 ? 0x74 : (v.s.size() == 8 ? 0x84 : 0x94)));
		out->append(v.s);
		break;
	case Value::Kind::Char:
		out->push_back(char(0x73));
		for (int s = 3; s >= 0; --s)
			out->push_back(static_cast<char>(v.u >> (8 * s)));
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
	}
}

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
		std::string_view sec(reinterpret_cast<const char *>(start), static_cast<size_t>(p - start));
		if (code < kHeader || code > kFooter) {
			*err = "malformed message: unknown section descriptor";
			return false;
		}
		bool is_body = code == kData || code == kAmqpSequence || code == kAmqpValue;
		// Sections must come in order; body sections may repeat (data, amqp-sequence).
		if (code < last && !(is_body && last >= kData && last <= kAmqpValue)) {
			*err = "malformed message: sections out of order";
			return false;
		}
		if (code == last && !is_body) {
			*err = "malformed message: a section appears twice";
			return false;
		}
		if (is_body) {
			if (out->body_sections > 0 && code != out->body_code) {
				*err = "malformed message: mixed body section kinds";
				return false;
			}
			if (!body_start)
				body_start = start;
			body_end = p;
			out->body_code = code;
			++out->body_sections;
		}
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
		if (code >= kProperties && code != kFooter && !bare_start)
			bare_start = start;
		last = code;
	}
	if (body_start)
		out->body = std::string_view(reinterpret_cast<const char *>(body_start), static_cast<size_t>(body_end - body_start));
	if (bare_start) {
		const uint8_t *bare_end = out->footer.empty() ? end : reinterpret_cast<const uint8_t *>(out->footer.data());
		out->bare = std::string_view(reinterpret_cast<const char *>(bare_start), static_cast<size_t>(bare_end - bare_start));
	}
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
