// src/schema/schema.cpp
//   The schema registry's pure C++ core: which JSON Schemas are supported (draft-04 as RapidJSON
//   1.1's validator implements it, refusing whatever it would silently ignore) and the
//   compatibility rules between two versions of a schema. docs/schemas.md is the rule book; keep
//   the two in step. Both walks use explicit stacks, never recursion on the thread's stack.
#include "sbpg/schema/schema.hpp"

#include "sbpg/core/json.hpp"

#include <rapidjson/internal/regex.h>
#include <rapidjson/pointer.h>
#include <rapidjson/schema.h>

#include <cmath>
#include <cstring>
#include <set>
#include <unordered_set>

namespace sbpg {
namespace schema {

namespace {

using rapidjson::Value;

constexpr int kParseFlags = rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag;

std::string
Quote(std::string_view s) {
	rapidjson::StringBuffer b;
	rapidjson::Writer<rapidjson::StringBuffer> w(b);
	w.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
	return std::string(b.GetString(), b.GetSize());
}

std::string
ToJson(const Value &v) {
	rapidjson::StringBuffer b;
	rapidjson::Writer<rapidjson::StringBuffer> w(b);
	v.Accept(w);
	std::string s(b.GetString(), b.GetSize());
	if (s.size() > 200)
		s = s.substr(0, 200) + "...";
	return s;
}

// RFC 6901: "~" -> "~0", "/" -> "~1".
std::string
Token(std::string_view name) {
	std::string out;
	for (char c : name) {
		if (c == '~')
			out += "~0";
		else if (c == '/')
			out += "~1";
		else
			out += c;
	}
	return out;
}

std::string
Child(const std::string &ptr, std::string_view key) {
	return ptr + "/" + Token(key);
}

std::string
Child(const std::string &ptr, std::string_view key, std::string_view name) {
	return ptr + "/" + Token(key) + "/" + Token(name);
}

std::string
Where(const std::string &ptr) {
	return ptr.empty() ? "the root" : ptr;
}

std::string_view
Name(const Value &v) {
	return std::string_view(v.GetString(), v.GetStringLength());
}

const Value *
Member(const Value &obj, const char *key) {
	if (!obj.IsObject())
		return nullptr;
	auto it = obj.FindMember(key);
	return it == obj.MemberEnd() ? nullptr : &it->value;
}

// Keywords that never affect validation.
bool
IsAnnotation(std::string_view k) {
	return k == "title" || k == "description" || k == "default" || k == "examples" || k == "$comment" ||
	       k == "definitions" || k == "$schema" || k == "id";
}

bool
IsTypeName(std::string_view t) {
	return t == "null" || t == "boolean" || t == "integer" || t == "number" || t == "string" || t == "array" ||
	       t == "object";
}

// Parses text into d; false with *why on bad JSON, a non-object, or a document past the bounds
// (nesting depth, number of values, duplicate member names).
bool
ParseSchema(std::string_view text, rapidjson::Document *d, std::string *why) {
	if (text.size() > kMaxSchemaBytes) {
		*why = "the schema is larger than " + std::to_string(kMaxSchemaBytes) + " bytes";
		return false;
	}
	d->Parse<kParseFlags>(text.data(), text.size());
	if (d->HasParseError()) {
		*why = std::string("the schema is not valid JSON: ") + rapidjson::GetParseError_En(d->GetParseError()) +
		       " at offset " + std::to_string(d->GetErrorOffset());
		return false;
	}
	if (!d->IsObject()) {
		*why = "the schema is not a JSON object";
		return false;
	}
	// Every JSON value, for depth (RapidJSON's SchemaDocument walks the whole document
	// recursively), count and duplicate names (RapidJSON would see the first, jsonb keeps the last).
	struct Item {
		const Value *v;
		int depth;
		std::string ptr;
	};
	std::vector<Item> stack{{d, 1, ""}};
	size_t count = 0;
	while (!stack.empty()) {
		Item it = std::move(stack.back());
		stack.pop_back();
		if (++count > kMaxSchemaValues) {
			*why = "the schema has more than " + std::to_string(kMaxSchemaValues) + " JSON values";
			return false;
		}
		if (!it.v->IsObject() && !it.v->IsArray())
			continue;
		if (it.depth > kMaxSchemaDepth) {
			*why = "the schema nests deeper than " + std::to_string(kMaxSchemaDepth) + " levels at " + Where(it.ptr);
			return false;
		}
		if (it.v->IsObject()) {
			std::set<std::string_view> names;
			for (auto &m : it.v->GetObject()) {
				if (!names.insert(Name(m.name)).second) {
					*why = "member " + Quote(Name(m.name)) + " appears twice at " + Where(it.ptr);
					return false;
				}
				stack.push_back({&m.value, it.depth + 1, Child(it.ptr, Name(m.name))});
			}
		} else {
			for (rapidjson::SizeType i = 0; i < it.v->Size(); ++i)
				stack.push_back({&(*it.v)[i], it.depth + 1, Child(it.ptr, std::to_string(i))});
		}
	}
	return true;
}

bool
IsCount(const Value &v) {
	return v.IsUint64() && v.GetUint64() <= 0xffffffffu;
}

bool
PatternCompiles(const Value &v) {
	if (!v.IsString() || v.GetStringLength() > kMaxPatternBytes || std::strlen(v.GetString()) != v.GetStringLength())
		return false;
	rapidjson::internal::Regex r(v.GetString());
	return r.IsValid();
}

bool
UniqueStrings(const Value &v, bool nonempty) {
	if (!v.IsArray() || (nonempty && v.Empty()))
		return false;
	std::set<std::string_view> seen;
	for (auto &e : v.GetArray())
		if (!e.IsString() || !seen.insert(Name(e)).second)
			return false;
	return true;
}

bool
CheckSupported(const rapidjson::Document &doc, std::string *why) {
	struct Item {
		const Value *v;
		std::string ptr;
	};
	std::vector<Item> stack{{&doc, ""}};
	std::unordered_set<const Value *> schemas; // every position walked as a schema
	std::vector<std::pair<const Value *, std::string>> refs; // ($ref target, pointer of the $ref)
	auto refuse = [&](const std::string &ptr, std::string_view kw, const std::string &reason) {
		*why = "keyword " + Quote(kw) + " at " + Where(ptr) + ": " + reason;
		return false;
	};
	while (!stack.empty()) {
		Item it = std::move(stack.back());
		stack.pop_back();
		const Value &s = *it.v;
		const std::string &p = it.ptr;
		if (!s.IsObject()) {
			*why = "the subschema at " + Where(p) + " is not a JSON object";
			return false;
		}
		schemas.insert(&s);
		bool root = &s == &doc;
		const Value *ref = Member(s, "$ref");
		if (const Value *ex = Member(s, "exclusiveMaximum"); ex && ex->IsBool() && !Member(s, "maximum"))
			return refuse(p, "exclusiveMaximum", "draft-04 requires \"maximum\" next to it");
		if (const Value *ex = Member(s, "exclusiveMinimum"); ex && ex->IsBool() && !Member(s, "minimum"))
			return refuse(p, "exclusiveMinimum", "draft-04 requires \"minimum\" next to it");
		for (auto &m : s.GetObject()) {
			std::string_view k = Name(m.name);
			const Value &v = m.value;
			if (ref && k != "$ref" && !IsAnnotation(k))
				return refuse(p, k, "RapidJSON ignores every keyword next to \"$ref\"");
			if (k == "title" || k == "description" || k == "default" || k == "examples" || k == "$comment") {
				continue;
			} else if (k == "$schema") {
				if (!root)
					return refuse(p, k, "only the root may name the JSON Schema version");
				if (!v.IsString() || (Name(v) != "http://json-schema.org/draft-04/schema#" &&
				                      Name(v) != "http://json-schema.org/draft-04/schema"))
					return refuse(p, k, "only draft-04 (\"http://json-schema.org/draft-04/schema#\") is supported, " +
					                        ToJson(v) + " is not");
			} else if (k == "id") {
				if (!root || !v.IsString())
					return refuse(p, k, "RapidJSON does not resolve references against \"id\"; only a string \"id\" "
					                    "at the root is accepted");
			} else if (k == "format") {
				return refuse(p, k, "RapidJSON's validator ignores \"format\", so it would never be checked");
			} else if (k == "const" || k == "contains" || k == "propertyNames" || k == "if" || k == "then" ||
			           k == "else") {
				return refuse(p, k, "not a draft-04 keyword (draft-06 or later); RapidJSON's draft-04 validator "
				                    "would silently ignore it");
			} else if (k == "type") {
				bool ok = v.IsString() ? IsTypeName(Name(v)) : UniqueStrings(v, true);
				if (ok && v.IsArray())
					for (auto &t : v.GetArray())
						ok = ok && IsTypeName(Name(t));
				if (!ok)
					return refuse(p, k, "must be one of null, boolean, integer, number, string, array, object, or a "
					                    "non-empty array of distinct such names; got " + ToJson(v));
			} else if (k == "enum") {
				if (!v.IsArray() || v.Empty())
					return refuse(p, k, "must be a non-empty array");
			} else if (k == "allOf" || k == "anyOf" || k == "oneOf") {
				if (!v.IsArray() || v.Empty())
					return refuse(p, k, "must be a non-empty array of schemas");
				for (rapidjson::SizeType i = 0; i < v.Size(); ++i)
					stack.push_back({&v[i], Child(p, k, std::to_string(i))});
			} else if (k == "not") {
				stack.push_back({&v, Child(p, k)});
			} else if (k == "properties" || k == "patternProperties" || k == "definitions") {
				if (!v.IsObject())
					return refuse(p, k, "must be an object of schemas");
				for (auto &e : v.GetObject()) {
					if (k == "patternProperties" && !PatternCompiles(e.name))
						return refuse(Child(p, k, Name(e.name)), k,
						              "the pattern " + Quote(Name(e.name)) +
						                  " does not compile with RapidJSON's regular expressions, which would "
						                  "silently ignore it");
					stack.push_back({&e.value, Child(p, k, Name(e.name))});
				}
			} else if (k == "additionalProperties" || k == "additionalItems") {
				if (v.IsObject())
					stack.push_back({&v, Child(p, k)});
				else if (!v.IsBool())
					return refuse(p, k, "must be a boolean or a schema");
			} else if (k == "items") {
				if (v.IsObject()) {
					stack.push_back({&v, Child(p, k)});
				} else if (v.IsArray()) {
					for (rapidjson::SizeType i = 0; i < v.Size(); ++i)
						stack.push_back({&v[i], Child(p, k, std::to_string(i))});
				} else {
					return refuse(p, k, "must be a schema or an array of schemas");
				}
			} else if (k == "required") {
				if (!UniqueStrings(v, true))
					return refuse(p, k, "must be a non-empty array of distinct strings");
			} else if (k == "dependencies") {
				if (!v.IsObject())
					return refuse(p, k, "must be an object");
				for (auto &e : v.GetObject()) {
					if (e.value.IsObject())
						stack.push_back({&e.value, Child(p, k, Name(e.name))});
					else if (!UniqueStrings(e.value, true))
						return refuse(Child(p, k, Name(e.name)), k,
						              "each dependency must be a schema or a non-empty array of distinct strings");
				}
			} else if (k == "minLength" || k == "maxLength" || k == "minItems" || k == "maxItems" ||
			           k == "minProperties" || k == "maxProperties") {
				if (!IsCount(v))
					return refuse(p, k, "must be a non-negative integer (RapidJSON ignores anything else); got " +
					                        ToJson(v));
			} else if (k == "minimum" || k == "maximum") {
				if (!v.IsNumber())
					return refuse(p, k, "must be a number");
			} else if (k == "exclusiveMinimum" || k == "exclusiveMaximum") {
				if (!v.IsBool())
					return refuse(p, k, "must be a boolean in draft-04 (the numeric form is draft-06)");
			} else if (k == "multipleOf") {
				if (!v.IsNumber() || v.GetDouble() <= 0)
					return refuse(p, k, "must be a number greater than 0");
			} else if (k == "uniqueItems") {
				if (!v.IsBool())
					return refuse(p, k, "must be a boolean");
			} else if (k == "pattern") {
				if (!PatternCompiles(v))
					return refuse(p, k, "the pattern " + ToJson(v) +
					                        " does not compile with RapidJSON's regular expressions (no \\d, \\w, "
					                        "lookaround or backreferences), which would silently ignore it");
			} else if (k == "$ref") {
				if (!v.IsString() || v.GetStringLength() == 0 || v.GetString()[0] != '#')
					return refuse(p, k, "only local references (\"#\" or \"#/json/pointer\") are supported; got " +
					                        ToJson(v));
				rapidjson::Pointer ptr(v.GetString(), v.GetStringLength());
				const Value *target = ptr.IsValid() ? ptr.Get(doc) : nullptr;
				if (!target)
					return refuse(p, k, "the reference " + ToJson(v) + " does not point into this schema");
				refs.emplace_back(target, p);
			} else {
				return refuse(p, k, "not a draft-04 keyword; RapidJSON's validator would silently ignore it");
			}
		}
	}
	for (auto &[target, p] : refs) {
		if (!schemas.count(target))
			return refuse(p, "$ref", "the reference does not point at a schema");
		// A chain of references that returns to itself would recurse without end in RapidJSON.
		std::unordered_set<const Value *> seen;
		const Value *at = target;
		while (const Value *r = Member(*at, "$ref")) {
			if (!seen.insert(at).second)
				return refuse(p, "$ref", "the chain of references is a cycle");
			at = rapidjson::Pointer(r->GetString(), r->GetStringLength()).Get(doc);
		}
	}
	return true;
}

// ---- compatibility

// What a change does to the set of valid instances. Narrowing (fewer values valid) breaks
// backward compatibility: data written with the old schema may fail the new one. Widening (more
// values valid) breaks forward compatibility: data written with the new schema may fail the old one.
enum class Effect { Narrowing, Widening, Both };

bool
Breaks(Effect e, Mode m) {
	switch (m) {
	case Mode::None:
		return false;
	case Mode::Backward:
		return e != Effect::Widening;
	case Mode::Forward:
		return e != Effect::Narrowing;
	case Mode::Full:
		return true;
	}
	return true;
}

const char *
Consequence(Effect e) {
	switch (e) {
	case Effect::Narrowing:
		return "this narrows the schema: data written with the old schema may be invalid under the new one, which "
		       "breaks backward compatibility (and so full)";
	case Effect::Widening:
		return "this widens the schema: data written with the new schema may be invalid under the old one, which "
		       "breaks forward compatibility (and so full)";
	case Effect::Both:
		return "this both narrows and widens the schema, which breaks backward, forward and full compatibility";
	}
	return "";
}

const Value &
Anything() {
	static const Value v(rapidjson::kObjectType);
	return v;
}

// True when the subschema constrains nothing (true, or an object of annotations only).
bool
IsTrivial(const Value &s) {
	if (s.IsBool())
		return s.GetBool();
	if (!s.IsObject())
		return false;
	for (auto &m : s.GetObject())
		if (!IsAnnotation(Name(m.name)))
			return false;
	return true;
}

// The JSON types a subschema's "type" admits, as bits; "number" includes integer.
unsigned
TypeBits(const Value *t) {
	auto bit = [](std::string_view n) -> unsigned {
		if (n == "null")
			return 1;
		if (n == "boolean")
			return 2;
		if (n == "integer")
			return 4;
		if (n == "number")
			return 4 | 8;
		if (n == "string")
			return 16;
		if (n == "array")
			return 32;
		if (n == "object")
			return 64;
		return 0;
	};
	if (!t)
		return 127;
	if (t->IsString())
		return bit(Name(*t));
	unsigned b = 0;
	for (auto &e : t->GetArray())
		b |= bit(Name(e));
	return b;
}

class Comparer {
  public:
	explicit Comparer(Mode mode) : mode_(mode) {}

	void Run(const Value &o, const Value &n) {
		work_.push_back({&o, &n, "", 0});
		while (!work_.empty()) {
			Item it = std::move(work_.back());
			work_.pop_back();
			Compare(*it.o, *it.n, it.ptr, it.depth);
		}
	}

	std::vector<Violation> out;

  private:
	struct Item {
		const Value *o, *n;
		std::string ptr;
		int depth;
	};
	// Names for the four ways a slot (a property, a tuple position, additional properties) changes
	// between "allows nothing" (false), "allows anything" and "a schema"; nullptr: compare the two
	// subschemas rule by rule instead.
	struct SlotRules {
		const char *closed;        // something -> false: narrowing
		const char *opened;        // false -> something: widening
		const char *constrained;   // anything -> a schema: narrowing
		const char *unconstrained; // a schema -> anything: widening
	};

	void Report(const char *rule, const std::string &ptr, Effect e, const std::string &what) {
		if (!rule || !Breaks(e, mode_))
			return;
		out.push_back({rule, ptr, std::string(rule) + " at " + Where(ptr) + ": " + what + "; " + Consequence(e)});
	}

	void Push(const Value &o, const Value &n, std::string ptr, int depth) {
		if (depth > 4 * kMaxSchemaDepth) // cannot happen with supported schemas
			return;
		work_.push_back({&o, &n, std::move(ptr), depth});
	}

	// o, n: the subschema (an object) or a boolean governing the slot. slot names it in sentences.
	void Slot(const Value &o, const Value &n, const std::string &ptr, int depth, const SlotRules &r,
	          const std::string &slot) {
		bool of = o.IsBool() && !o.GetBool(), nf = n.IsBool() && !n.GetBool();
		if (of && nf)
			return;
		if (nf) {
			Report(r.closed, ptr, Effect::Narrowing, slot + ": the old schema allowed values there, the new one allows none");
			return;
		}
		if (of) {
			Report(r.opened, ptr, Effect::Widening, slot + ": the old schema allowed no value there, the new one does");
			return;
		}
		bool ot = IsTrivial(o), nt = IsTrivial(n);
		if (ot && nt)
			return;
		if (ot && r.constrained) {
			Report(r.constrained, ptr, Effect::Narrowing,
			       slot + ": the old schema allowed any value there, the new one constrains it");
			return;
		}
		if (nt && r.unconstrained) {
			Report(r.unconstrained, ptr, Effect::Widening,
			       slot + ": the old schema constrained it, the new one allows any value there");
			return;
		}
		Push(o.IsObject() ? o : Anything(), n.IsObject() ? n : Anything(), ptr, depth + 1);
	}

	static const Value &Governing(const Value *v) { // absent -> true (anything)
		static const Value yes(true);
		return v ? *v : yes;
	}

	void Compare(const Value &o, const Value &n, const std::string &ptr, int depth) {
		if (o == n)
			return;
		Type(o, n, ptr);
		Enum(o, n, ptr);
		Required(o, n, ptr);
		Properties(o, n, ptr, depth);
		Items(o, n, ptr, depth);
		Bound(o, n, ptr, "minimum", "exclusiveMinimum", false);
		Bound(o, n, ptr, "maximum", "exclusiveMaximum", true);
		Count(o, n, ptr, "minLength", "min-length", false);
		Count(o, n, ptr, "maxLength", "max-length", true);
		Count(o, n, ptr, "minItems", "min-items", false);
		Count(o, n, ptr, "maxItems", "max-items", true);
		Count(o, n, ptr, "minProperties", "min-properties", false);
		Count(o, n, ptr, "maxProperties", "max-properties", true);
		Pattern(o, n, ptr);
		UniqueItems(o, n, ptr);
		MultipleOf(o, n, ptr);
		static const std::pair<const char *, const char *> kOpaque[] = {
		    {"allOf", "all-of-changed"},         {"anyOf", "any-of-changed"},
		    {"oneOf", "one-of-changed"},         {"not", "not-changed"},
		    {"dependencies", "dependencies-changed"}, {"patternProperties", "pattern-properties-changed"},
		    {"$ref", "ref-changed"}};
		for (auto &[kw, rule] : kOpaque) {
			const Value *a = Member(o, kw), *b = Member(n, kw);
			if ((a || b) && !(a && b && *a == *b))
				Report(rule, Child(ptr, kw), Effect::Both,
				       std::string("\"") + kw + "\" went from " + (a ? ToJson(*a) : "absent") + " to " +
				           (b ? ToJson(*b) : "absent") + " (sbpg compares it only for equality)");
		}
		const Value *od = Member(o, "definitions"), *nd = Member(n, "definitions");
		if (od && nd)
			for (auto &m : nd->GetObject())
				if (const Value *a = Member(*od, m.name.GetString()))
					Push(*a, m.value, Child(ptr, "definitions", Name(m.name)), depth + 1);
	}

	void Type(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "type"), *b = Member(n, "type");
		unsigned ob = TypeBits(a), nb = TypeBits(b);
		if (ob == nb)
			return;
		std::string what = "\"type\" went from " + (a ? ToJson(*a) : std::string("any")) + " to " +
		                   (b ? ToJson(*b) : std::string("any"));
		if ((nb & ob) == nb)
			Report("type-narrowed", Child(ptr, "type"), Effect::Narrowing, what);
		else if ((nb & ob) == ob)
			Report("type-widened", Child(ptr, "type"), Effect::Widening, what);
		else
			Report("type-changed", Child(ptr, "type"), Effect::Both, what);
	}

	void Enum(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "enum"), *b = Member(n, "enum");
		std::string p = Child(ptr, "enum");
		if (!a && !b)
			return;
		if (!a) {
			Report("enum-added", p, Effect::Narrowing, "\"enum\" " + ToJson(*b) + " was added");
			return;
		}
		if (!b) {
			Report("enum-removed", p, Effect::Widening, "\"enum\" " + ToJson(*a) + " was removed");
			return;
		}
		auto has = [](const Value &arr, const Value &x) {
			for (auto &e : arr.GetArray())
				if (e == x)
					return true;
			return false;
		};
		for (auto &e : a->GetArray())
			if (!has(*b, e))
				Report("enum-value-removed", p, Effect::Narrowing, "the value " + ToJson(e) + " was removed from \"enum\"");
		for (auto &e : b->GetArray())
			if (!has(*a, e))
				Report("enum-value-added", p, Effect::Widening, "the value " + ToJson(e) + " was added to \"enum\"");
	}

	void Required(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "required"), *b = Member(n, "required");
		std::set<std::string_view> sa, sb;
		if (a)
			for (auto &e : a->GetArray())
				sa.insert(Name(e));
		if (b)
			for (auto &e : b->GetArray())
				sb.insert(Name(e));
		std::string p = Child(ptr, "required");
		for (auto name : sb)
			if (!sa.count(name))
				Report("required-added", p, Effect::Narrowing, "property " + Quote(name) + " became required");
		for (auto name : sa)
			if (!sb.count(name))
				Report("required-removed", p, Effect::Widening, "property " + Quote(name) + " is no longer required");
	}

	void Properties(const Value &o, const Value &n, const std::string &ptr, int depth) {
		const Value *op = Member(o, "properties"), *np = Member(n, "properties");
		const Value &oap = Governing(Member(o, "additionalProperties"));
		const Value &nap = Governing(Member(n, "additionalProperties"));
		bool patterns = Member(o, "patternProperties") || Member(n, "patternProperties");
		static const Value none(rapidjson::kObjectType);
		const Value &opr = op ? *op : none, &npr = np ? *np : none;
		for (auto &m : npr.GetObject()) {
			std::string p = Child(ptr, "properties", Name(m.name));
			if (const Value *a = Member(opr, m.name.GetString())) {
				Push(*a, m.value, p, depth + 1);
			} else if (patterns) {
				Report("property-added", p, Effect::Both,
				       "property " + Quote(Name(m.name)) +
				           " was added next to \"patternProperties\" (sbpg does not match patterns against it)");
			} else {
				Slot(oap, m.value, p, depth,
				     {nullptr, "property-added-to-closed-model", "property-added-to-open-model", nullptr},
				     "property " + Quote(Name(m.name)) + " was added (the old schema left it to \"additionalProperties\")");
			}
		}
		for (auto &m : opr.GetObject()) {
			if (Member(npr, m.name.GetString()))
				continue;
			std::string p = Child(ptr, "properties", Name(m.name));
			if (patterns) {
				Report("property-removed", p, Effect::Both,
				       "property " + Quote(Name(m.name)) +
				           " was removed next to \"patternProperties\" (sbpg does not match patterns against it)");
			} else {
				Slot(m.value, nap, p, depth,
				     {"property-removed-from-closed-model", nullptr, nullptr, "property-removed-from-open-model"},
				     "property " + Quote(Name(m.name)) +
				         " was removed (the new schema leaves it to \"additionalProperties\")");
			}
		}
		if (!(oap == nap))
			Slot(oap, nap, Child(ptr, "additionalProperties"), depth,
			     {"additional-properties-closed", "additional-properties-opened", nullptr, nullptr},
			     "\"additionalProperties\" changed");
	}

	void Items(const Value &o, const Value &n, const std::string &ptr, int depth) {
		const Value *a = Member(o, "items"), *b = Member(n, "items");
		std::string p = Child(ptr, "items");
		bool ta = a && a->IsArray(), tb = b && b->IsArray();
		if (!ta && !tb) {
			if (a || b)
				Push(a ? *a : Anything(), b ? *b : Anything(), p, depth + 1);
			return; // additionalItems means nothing without a tuple
		}
		if (ta != tb) {
			Report("items-changed", p, Effect::Both, "\"items\" changed between one schema for every item and a tuple");
			return;
		}
		const Value &oai = Governing(Member(o, "additionalItems"));
		const Value &nai = Governing(Member(n, "additionalItems"));
		rapidjson::SizeType i = 0;
		for (; i < a->Size() && i < b->Size(); ++i)
			Push((*a)[i], (*b)[i], Child(p, std::to_string(i)), depth + 1);
		for (; i < b->Size(); ++i)
			Slot(oai, (*b)[i], Child(p, std::to_string(i)), depth,
			     {nullptr, "item-added-to-closed-tuple", "item-added-to-open-tuple", nullptr},
			     "tuple position " + std::to_string(i) + " was added (the old schema left it to \"additionalItems\")");
		for (; i < a->Size(); ++i)
			Slot((*a)[i], nai, Child(p, std::to_string(i)), depth,
			     {"item-removed-from-closed-tuple", nullptr, nullptr, "item-removed-from-open-tuple"},
			     "tuple position " + std::to_string(i) + " was removed (the new schema leaves it to \"additionalItems\")");
		if (!(oai == nai))
			Slot(oai, nai, Child(ptr, "additionalItems"), depth,
			     {"additional-items-closed", "additional-items-opened", nullptr, nullptr}, "\"additionalItems\" changed");
	}

	// minimum/maximum with draft-04's boolean exclusiveMinimum/exclusiveMaximum.
	void Bound(const Value &o, const Value &n, const std::string &ptr, const char *kw, const char *excl, bool upper) {
		const Value *a = Member(o, kw), *b = Member(n, kw);
		std::string base = upper ? "maximum" : "minimum", p = Child(ptr, kw);
		if (!a && !b)
			return;
		if (!a) {
			Report((base + "-added").c_str(), p, Effect::Narrowing, "\"" + base + "\" " + ToJson(*b) + " was added");
			return;
		}
		if (!b) {
			Report((base + "-removed").c_str(), p, Effect::Widening, "\"" + base + "\" " + ToJson(*a) + " was removed");
			return;
		}
		const Value *ea = Member(o, excl), *eb = Member(n, excl);
		bool xa = ea && ea->GetBool(), xb = eb && eb->GetBool();
		if (*a == *b || a->GetDouble() == b->GetDouble()) {
			if (xa == xb)
				return;
			std::string eb_name = upper ? "exclusive-maximum" : "exclusive-minimum";
			if (xb)
				Report((eb_name + "-added").c_str(), Child(ptr, excl), Effect::Narrowing,
				       std::string("\"") + excl + "\" became true at the same bound " + ToJson(*b));
			else
				Report((eb_name + "-removed").c_str(), Child(ptr, excl), Effect::Widening,
				       std::string("\"") + excl + "\" became false at the same bound " + ToJson(*b));
			return;
		}
		bool tighter = upper ? b->GetDouble() < a->GetDouble() : b->GetDouble() > a->GetDouble();
		std::string what = "\"" + base + "\" went from " + ToJson(*a) + " to " + ToJson(*b);
		if (tighter)
			Report((base + (upper ? "-decreased" : "-increased")).c_str(), p, Effect::Narrowing, what);
		else
			Report((base + (upper ? "-increased" : "-decreased")).c_str(), p, Effect::Widening, what);
	}

	// Integer bounds on lengths and sizes.
	void Count(const Value &o, const Value &n, const std::string &ptr, const char *kw, const std::string &rule,
	           bool upper) {
		const Value *a = Member(o, kw), *b = Member(n, kw);
		std::string p = Child(ptr, kw);
		if (!a && !b)
			return;
		if (!a) {
			if (upper || b->GetUint64() > 0)
				Report((rule + "-added").c_str(), p, Effect::Narrowing, std::string("\"") + kw + "\" " + ToJson(*b) + " was added");
			return;
		}
		if (!b) {
			if (upper || a->GetUint64() > 0)
				Report((rule + "-removed").c_str(), p, Effect::Widening, std::string("\"") + kw + "\" " + ToJson(*a) + " was removed");
			return;
		}
		uint64_t x = a->GetUint64(), y = b->GetUint64();
		if (x == y)
			return;
		std::string what = std::string("\"") + kw + "\" went from " + std::to_string(x) + " to " + std::to_string(y);
		if (upper ? y < x : y > x)
			Report((rule + (upper ? "-decreased" : "-increased")).c_str(), p, Effect::Narrowing, what);
		else
			Report((rule + (upper ? "-increased" : "-decreased")).c_str(), p, Effect::Widening, what);
	}

	void Pattern(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "pattern"), *b = Member(n, "pattern");
		std::string p = Child(ptr, "pattern");
		if (a && b && *a == *b)
			return;
		if (a && b)
			Report("pattern-changed", p, Effect::Both,
			       "\"pattern\" went from " + ToJson(*a) + " to " + ToJson(*b) +
			           " (sbpg does not compare regular expressions, only their text)");
		else if (b)
			Report("pattern-added", p, Effect::Narrowing, "\"pattern\" " + ToJson(*b) + " was added");
		else if (a)
			Report("pattern-removed", p, Effect::Widening, "\"pattern\" " + ToJson(*a) + " was removed");
	}

	void UniqueItems(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "uniqueItems"), *b = Member(n, "uniqueItems");
		bool x = a && a->GetBool(), y = b && b->GetBool();
		if (x == y)
			return;
		if (y)
			Report("unique-items-added", Child(ptr, "uniqueItems"), Effect::Narrowing, "items must now be unique");
		else
			Report("unique-items-removed", Child(ptr, "uniqueItems"), Effect::Widening, "items need no longer be unique");
	}

	void MultipleOf(const Value &o, const Value &n, const std::string &ptr) {
		const Value *a = Member(o, "multipleOf"), *b = Member(n, "multipleOf");
		std::string p = Child(ptr, "multipleOf");
		if (!a && !b)
			return;
		if (!a) {
			Report("multiple-of-added", p, Effect::Narrowing, "\"multipleOf\" " + ToJson(*b) + " was added");
			return;
		}
		if (!b) {
			Report("multiple-of-removed", p, Effect::Widening, "\"multipleOf\" " + ToJson(*a) + " was removed");
			return;
		}
		double x = a->GetDouble(), y = b->GetDouble();
		if (x == y)
			return;
		std::string what = "\"multipleOf\" went from " + ToJson(*a) + " to " + ToJson(*b);
		auto divides = [](double d, double m) { // is m a whole multiple of d
			double q = m / d;
			return std::isfinite(q) && q == std::floor(q);
		};
		if (divides(x, y))
			Report("multiple-of-changed", p, Effect::Narrowing, what);
		else if (divides(y, x))
			Report("multiple-of-changed", p, Effect::Widening, what);
		else
			Report("multiple-of-changed", p, Effect::Both, what);
	}

	Mode mode_;
	std::vector<Item> work_;
};

} // namespace

bool
CheckSchemaSupported(std::string_view schema_json, std::string *why) {
	std::string w;
	bool ok = false;
	try {
		rapidjson::Document d;
		ok = ParseSchema(schema_json, &d, &w) && CheckSupported(d, &w);
		if (ok) {
			// The proof: RapidJSON compiles it (bounded depth, so its recursion is bounded too).
			rapidjson::SchemaDocument sd(d);
			(void)sd;
		}
	} catch (const std::exception &e) {
		ok = false;
		w = std::string("the schema could not be compiled: ") + e.what();
	}
	if (why)
		*why = ok ? std::string() : w;
	return ok;
}

bool
ParseMode(std::string_view text, Mode *mode) {
	std::string t;
	for (char c : text)
		t += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
	if (t == "none")
		*mode = Mode::None;
	else if (t == "backward")
		*mode = Mode::Backward;
	else if (t == "forward")
		*mode = Mode::Forward;
	else if (t == "full")
		*mode = Mode::Full;
	else
		return false;
	return true;
}

const char *
ModeName(Mode mode) {
	switch (mode) {
	case Mode::None:
		return "none";
	case Mode::Backward:
		return "backward";
	case Mode::Forward:
		return "forward";
	case Mode::Full:
		return "full";
	}
	return "?";
}

std::vector<Violation>
CheckCompatible(std::string_view old_schema, std::string_view new_schema, Mode mode) {
	if (mode == Mode::None)
		return {};
	try {
		rapidjson::Document o, n;
		std::string why;
		if (!ParseSchema(old_schema, &o, &why) || !CheckSupported(o, &why))
			return {{"schema-unsupported", "", "the old schema is not supported: " + why}};
		if (!ParseSchema(new_schema, &n, &why) || !CheckSupported(n, &why))
			return {{"schema-unsupported", "", "the new schema is not supported: " + why}};
		Comparer c(mode);
		c.Run(o, n);
		return std::move(c.out);
	} catch (const std::exception &e) {
		return {{"schema-unsupported", "", std::string("the schemas could not be compared: ") + e.what()}};
	}
}

} // namespace schema
} // namespace sbpg
