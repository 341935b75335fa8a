// src/amqp/codec_value.cpp
//   Value: the factories, map look-ups and updates, integer reads, and the text and JSON forms
//   used in logs and the emulator's control interface. Nothing here encodes or decodes; a Value
//   is a plain tree (a map keeps its keys and values alternating in `items`).
#include "sbpg/amqp/codec.hpp"

#include "sbpg/core/text.hpp"

#include <cstdint>
#include <cstdio>

namespace sbpg::amqp {

namespace {

// A value of `kind` with its one field set; the factories below name the kinds.
Value
Unsigned(Value::Kind kind, uint64_t x) {
	Value v;
	v.kind = kind;
	v.u = x;
	return v;
}
Value
Signed(Value::Kind kind, int64_t x) {
	Value v;
	v.kind = kind;
	v.i = x;
	return v;
}
Value
Bytes(Value::Kind kind, std::string_view s) {
	Value v;
	v.kind = kind;
	v.s = std::string(s);
	return v;
}
Value
Compound(Value::Kind kind, std::vector<Value> items) {
	Value v;
	v.kind = kind;
	v.items = std::move(items);
	return v;
}

} // namespace

Value
Value::Bool(bool b) {
	return Unsigned(Kind::Bool, b);
}
Value
Value::UByte(uint8_t x) {
	return Unsigned(Kind::UByte, x);
}
Value
Value::UInt(uint32_t x) {
	return Unsigned(Kind::UInt, x);
}
Value
Value::ULong(uint64_t x) {
	return Unsigned(Kind::ULong, x);
}
Value
Value::Int(int32_t x) {
	return Signed(Kind::Int, x);
}
Value
Value::Long(int64_t x) {
	return Signed(Kind::Long, x);
}
Value
Value::Timestamp(int64_t ms) {
	return Signed(Kind::Timestamp, ms);
}
Value
Value::Uuid(const uint8_t bytes[16]) {
	return Bytes(Kind::Uuid, std::string_view(reinterpret_cast<const char *>(bytes), 16));
}
Value
Value::Binary(std::string_view b) {
	return Bytes(Kind::Binary, b);
}
Value
Value::String(std::string_view s) {
	return Bytes(Kind::String, s);
}
Value
Value::Symbol(std::string_view s) {
	return Bytes(Kind::Symbol, s);
}
Value
Value::List(std::vector<Value> items) {
	return Compound(Kind::List, std::move(items));
}
Value
Value::Map(std::vector<Value> kv) {
	return Compound(Kind::Map, std::move(kv));
}
Value
Value::Array(std::vector<Value> items) {
	return Compound(Kind::Array, std::move(items));
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

} // namespace sbpg::amqp
