// sbpg/schema/schema.hpp
//   The pure C++ core of the message schema registry (issue 6): which JSON Schemas sbpg accepts
//   (draft-04 as RapidJSON's validator implements it, nothing it would silently ignore) and whether
//   a new version of a schema is compatible with the previous one under a compatibility mode.
//   RapidJSON only; no PostgreSQL headers. docs/schemas.md states the rules this code implements.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {
namespace schema {

// Bounds on a schema document: nesting of any JSON value in it, number of JSON values, text size.
constexpr int kMaxSchemaDepth = 64;
constexpr size_t kMaxSchemaValues = 100000;
constexpr size_t kMaxSchemaBytes = 1 << 20;
constexpr size_t kMaxPatternBytes = 1024;

// True when schema_json is a JSON object that RapidJSON's draft-04 SchemaDocument compiles with
// every keyword taking effect. Otherwise false, with *why naming the keyword and the JSON pointer
// (RFC 6901) of the subschema where it appears. Never throws.
bool CheckSchemaSupported(std::string_view schema_json, std::string *why);

enum class Mode { None, Backward, Forward, Full };

// "none", "backward", "forward", "full" (case-insensitive); false for anything else.
bool ParseMode(std::string_view text, Mode *mode);
const char *ModeName(Mode mode);

// One change that breaks the requested mode: the rule (e.g. "required-added"), the JSON pointer of
// the subschema in the new schema (or the old one, for what was removed) and a sentence saying
// which change breaks which compatibility direction.
struct Violation {
	std::string rule, pointer, detail;
};

// The changes from old_schema to new_schema that break mode. Backward: data written with the old
// schema is valid under the new one. Forward: data written with the new schema is valid under the
// old one. Full: both. None: no check (always empty). A schema that CheckSchemaSupported refuses
// yields one violation with rule "schema-unsupported". Never throws.
std::vector<Violation> CheckCompatible(std::string_view old_schema, std::string_view new_schema, Mode mode);

} // namespace schema
} // namespace sbpg
