// sbpg/schema/detail.hpp
//   What the two halves of the schema core share (src/schema/schema.cpp, which decides whether a
//   schema is supported, and src/schema/compat.cpp, which compares two versions): JSON pointers
//   (RFC 6901) for messages, short JSON renderings, and parsing a schema within the bounds of
//   schema.hpp. Not for use outside src/schema. RapidJSON only.
#pragma once

#include <string>
#include <string_view>

#include "sbpg/core/json.hpp"

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {
namespace schema {
namespace detail {

using rapidjson::Value;

// s as a JSON string literal (quotes and escapes), for messages.
std::string Quote(std::string_view s);
// v as compact JSON, cut to about 200 bytes.
std::string ToJson(const Value &v);
// ptr + "/" + key (and + "/" + name), each escaped as an RFC 6901 reference token.
std::string Child(const std::string &ptr, std::string_view key);
std::string Child(const std::string &ptr, std::string_view key, std::string_view name);
// A JSON pointer for a sentence: "the root" for the empty one.
std::string Where(const std::string &ptr);

inline std::string_view
Name(const Value &v) {
	return std::string_view(v.GetString(), v.GetStringLength());
}

// obj[key] when obj is an object that has it; otherwise null.
inline const Value *
Member(const Value &obj, const char *key) {
	if (!obj.IsObject())
		return nullptr;
	auto it = obj.FindMember(key);
	return it == obj.MemberEnd() ? nullptr : &it->value;
}

// Keywords that never affect validation.
bool IsAnnotation(std::string_view k);

// Parses text into d; false with *why on bad JSON, a non-object, or a document past the bounds
// (nesting depth, number of values, duplicate member names).
bool ParseSchema(std::string_view text, rapidjson::Document *d, std::string *why);
// Whether every keyword of a parsed schema takes effect in RapidJSON's draft-04 validator; false
// with *why naming the keyword and where it is.
bool CheckSupported(const rapidjson::Document &doc, std::string *why);

} // namespace detail
} // namespace schema
} // namespace sbpg
