// src/schema/schema.cpp
//   The schema registry's pure C++ core, first half: which JSON Schemas are supported (draft-04 as
//   RapidJSON 1.1's validator implements it, refusing whatever it would silently ignore), the
//   bounds a schema document must keep, and the compatibility modes' names. The comparison of two
//   versions is in src/schema/compat.cpp. docs/schemas.md is the rule book; keep the two in step.
//   Every walk uses an explicit stack, never recursion on the thread's stack.
#include "sbpg/schema/schema.hpp"

#include "sbpg/schema/detail.hpp"

#include <rapidjson/internal/regex.h>
#include <rapidjson/pointer.h>
#include <rapidjson/schema.h>

#include <cstring>
#include <set>
#include <unordered_set>

namespace sbpg {
namespace schema {

namespace {

constexpr int kParseFlags = rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag;

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

} // namespace

namespace detail {

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

// Keywords that never affect validation.
bool
IsAnnotation(std::string_view k) {
	return k == "title" || k == "description" || k == "default" || k == "examples" || k == "$comment" ||
	       k == "definitions" || k == "$schema" || k == "id";
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

} // namespace detail

namespace {

using namespace detail;

bool
IsTypeName(std::string_view t) {
	return t == "null" || t == "boolean" || t == "integer" || t == "number" || t == "string" || t == "array" ||
	       t == "object";
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

// The walk behind CheckSupported: every subschema is visited once, from an explicit stack; each
// keyword is accepted, pushes the subschemas it holds, or refuses the schema with *why_ set.
// References are resolved after the walk, when every position that is a schema is known.
class SupportCheck {
  public:
	SupportCheck(const rapidjson::Document &doc, std::string *why) : doc_(doc), why_(why) {}

	bool Run() {
		stack_.push_back({&doc_, ""});
		while (!stack_.empty()) {
			Item it = std::move(stack_.back());
			stack_.pop_back();
			if (!Subschema(*it.v, it.ptr))
				return false;
		}
		return RefsResolve();
	}

  private:
	struct Item {
		const Value *v;
		std::string ptr;
	};
	// What a group of keywords says of one keyword: fine, refused (*why_ set), or not its keyword.
	enum class Verdict { Ok, Refused, NotMine };

	Verdict Refuse(const std::string &ptr, std::string_view kw, const std::string &reason) {
		*why_ = "keyword " + Quote(kw) + " at " + Where(ptr) + ": " + reason;
		return Verdict::Refused;
	}

	// The same, where a whole subschema or the document is refused.
	bool RefuseSchema(const std::string &ptr, std::string_view kw, const std::string &reason) {
		Refuse(ptr, kw, reason);
		return false;
	}

	void Push(const Value &v, std::string ptr) { stack_.push_back({&v, std::move(ptr)}); }

	bool Subschema(const Value &s, const std::string &p) {
		if (!s.IsObject()) {
			*why_ = "the subschema at " + Where(p) + " is not a JSON object";
			return false;
		}
		schemas_.insert(&s);
		bool root = &s == &doc_;
		const Value *ref = Member(s, "$ref");
		if (const Value *ex = Member(s, "exclusiveMaximum"); ex && ex->IsBool() && !Member(s, "maximum"))
			return RefuseSchema(p, "exclusiveMaximum", "draft-04 requires \"maximum\" next to it");
		if (const Value *ex = Member(s, "exclusiveMinimum"); ex && ex->IsBool() && !Member(s, "minimum"))
			return RefuseSchema(p, "exclusiveMinimum", "draft-04 requires \"minimum\" next to it");
		for (auto &m : s.GetObject()) {
			std::string_view k = Name(m.name);
			const Value &v = m.value;
			if (ref && k != "$ref" && !IsAnnotation(k))
				return RefuseSchema(p, k, "RapidJSON ignores every keyword next to \"$ref\"");
			Verdict verdict = Meta(p, k, v, root);
			if (verdict == Verdict::NotMine)
				verdict = Applicator(p, k, v);
			if (verdict == Verdict::NotMine)
				verdict = Assertion(p, k, v);
			if (verdict == Verdict::NotMine && k == "$ref")
				verdict = Ref(p, k, v);
			if (verdict == Verdict::NotMine)
				verdict = Refuse(p, k, "not a draft-04 keyword; RapidJSON's validator would silently ignore it");
			if (verdict == Verdict::Refused)
				return false;
		}
		return true;
	}

	// Annotations, the schema's version and id, and keywords RapidJSON's draft-04 validator skips.
	Verdict Meta(const std::string &p, std::string_view k, const Value &v, bool root) {
		if (k == "title" || k == "description" || k == "default" || k == "examples" || k == "$comment") {
			return Verdict::Ok;
		} else if (k == "$schema") {
			if (!root)
				return Refuse(p, k, "only the root may name the JSON Schema version");
			if (!v.IsString() || (Name(v) != "http://json-schema.org/draft-04/schema#" &&
			                      Name(v) != "http://json-schema.org/draft-04/schema"))
				return Refuse(p, k,
				              "only draft-04 (\"http://json-schema.org/draft-04/schema#\") is supported, " + ToJson(v) +
				                  " is not");
		} else if (k == "id") {
			if (!root || !v.IsString())
				return Refuse(p, k,
				              "RapidJSON does not resolve references against \"id\"; only a string \"id\" "
				              "at the root is accepted");
		} else if (k == "format") {
			return Refuse(p, k, "RapidJSON's validator ignores \"format\", so it would never be checked");
		} else if (k == "const" || k == "contains" || k == "propertyNames" || k == "if" || k == "then" || k == "else") {
			return Refuse(p, k,
			              "not a draft-04 keyword (draft-06 or later); RapidJSON's draft-04 validator "
			              "would silently ignore it");
		} else {
			return Verdict::NotMine;
		}
		return Verdict::Ok;
	}

	// Keywords that hold subschemas: their shape is checked and the subschemas pushed.
	Verdict Applicator(const std::string &p, std::string_view k, const Value &v) {
		if (k == "allOf" || k == "anyOf" || k == "oneOf") {
			if (!v.IsArray() || v.Empty())
				return Refuse(p, k, "must be a non-empty array of schemas");
			for (rapidjson::SizeType i = 0; i < v.Size(); ++i)
				Push(v[i], Child(p, k, std::to_string(i)));
		} else if (k == "not") {
			Push(v, Child(p, k));
		} else if (k == "properties" || k == "patternProperties" || k == "definitions") {
			if (!v.IsObject())
				return Refuse(p, k, "must be an object of schemas");
			for (auto &e : v.GetObject()) {
				if (k == "patternProperties" && !PatternCompiles(e.name))
					return Refuse(Child(p, k, Name(e.name)), k,
					              "the pattern " + Quote(Name(e.name)) +
					                  " does not compile with RapidJSON's regular expressions, which would "
					                  "silently ignore it");
				Push(e.value, Child(p, k, Name(e.name)));
			}
		} else if (k == "additionalProperties" || k == "additionalItems") {
			if (v.IsObject())
				Push(v, Child(p, k));
			else if (!v.IsBool())
				return Refuse(p, k, "must be a boolean or a schema");
		} else if (k == "items") {
			if (v.IsObject()) {
				Push(v, Child(p, k));
			} else if (v.IsArray()) {
				for (rapidjson::SizeType i = 0; i < v.Size(); ++i)
					Push(v[i], Child(p, k, std::to_string(i)));
			} else {
				return Refuse(p, k, "must be a schema or an array of schemas");
			}
		} else if (k == "dependencies") {
			if (!v.IsObject())
				return Refuse(p, k, "must be an object");
			for (auto &e : v.GetObject()) {
				if (e.value.IsObject())
					Push(e.value, Child(p, k, Name(e.name)));
				else if (!UniqueStrings(e.value, true))
					return Refuse(Child(p, k, Name(e.name)), k,
					              "each dependency must be a schema or a non-empty array of distinct strings");
			}
		} else {
			return Verdict::NotMine;
		}
		return Verdict::Ok;
	}

	// Keywords that constrain values: each must have the form RapidJSON acts on.
	Verdict Assertion(const std::string &p, std::string_view k, const Value &v) {
		if (k == "type") {
			bool ok = v.IsString() ? IsTypeName(Name(v)) : UniqueStrings(v, true);
			if (ok && v.IsArray())
				for (auto &t : v.GetArray())
					ok = ok && IsTypeName(Name(t));
			if (!ok)
				return Refuse(p, k,
				              "must be one of null, boolean, integer, number, string, array, object, or a "
				              "non-empty array of distinct such names; got " +
				                  ToJson(v));
		} else if (k == "enum") {
			if (!v.IsArray() || v.Empty())
				return Refuse(p, k, "must be a non-empty array");
		} else if (k == "required") {
			if (!UniqueStrings(v, true))
				return Refuse(p, k, "must be a non-empty array of distinct strings");
		} else if (k == "minLength" || k == "maxLength" || k == "minItems" || k == "maxItems" || k == "minProperties" ||
		           k == "maxProperties") {
			if (!IsCount(v))
				return Refuse(p, k,
				              "must be a non-negative integer (RapidJSON ignores anything else); got " + ToJson(v));
		} else if (k == "minimum" || k == "maximum") {
			if (!v.IsNumber())
				return Refuse(p, k, "must be a number");
		} else if (k == "exclusiveMinimum" || k == "exclusiveMaximum") {
			if (!v.IsBool())
				return Refuse(p, k, "must be a boolean in draft-04 (the numeric form is draft-06)");
		} else if (k == "multipleOf") {
			if (!v.IsNumber() || v.GetDouble() <= 0)
				return Refuse(p, k, "must be a number greater than 0");
		} else if (k == "uniqueItems") {
			if (!v.IsBool())
				return Refuse(p, k, "must be a boolean");
		} else if (k == "pattern") {
			if (!PatternCompiles(v))
				return Refuse(p, k,
				              "the pattern " + ToJson(v) +
				                  " does not compile with RapidJSON's regular expressions (no \\d, \\w, "
				                  "lookaround or backreferences), which would silently ignore it");
		} else {
			return Verdict::NotMine;
		}
		return Verdict::Ok;
	}

	// A local reference; where it leads is checked once the walk is over.
	Verdict Ref(const std::string &p, std::string_view k, const Value &v) {
		if (!v.IsString() || v.GetStringLength() == 0 || v.GetString()[0] != '#')
			return Refuse(p, k, "only local references (\"#\" or \"#/json/pointer\") are supported; got " + ToJson(v));
		rapidjson::Pointer ptr(v.GetString(), v.GetStringLength());
		const Value *target = ptr.IsValid() ? ptr.Get(doc_) : nullptr;
		if (!target)
			return Refuse(p, k, "the reference " + ToJson(v) + " does not point into this schema");
		refs_.emplace_back(target, p);
		return Verdict::Ok;
	}

	bool RefsResolve() {
		for (auto &[target, p] : refs_) {
			if (!schemas_.count(target))
				return RefuseSchema(p, "$ref", "the reference does not point at a schema");
			// A chain of references that returns to itself would recurse without end in RapidJSON.
			std::unordered_set<const Value *> seen;
			const Value *at = target;
			while (const Value *r = Member(*at, "$ref")) {
				if (!seen.insert(at).second)
					return RefuseSchema(p, "$ref", "the chain of references is a cycle");
				at = rapidjson::Pointer(r->GetString(), r->GetStringLength()).Get(doc_);
			}
		}
		return true;
	}

	const rapidjson::Document &doc_;
	std::string *why_;
	std::vector<Item> stack_;
	std::unordered_set<const Value *> schemas_;               // every position walked as a schema
	std::vector<std::pair<const Value *, std::string>> refs_; // ($ref target, pointer of the $ref)
};

} // namespace

bool
detail::CheckSupported(const rapidjson::Document &doc, std::string *why) {
	return SupportCheck(doc, why).Run();
}

bool
CheckSchemaSupported(std::string_view schema_json, std::string *why) {
	std::string w;
	bool ok = false;
	try {
		rapidjson::Document d;
		ok = detail::ParseSchema(schema_json, &d, &w) && detail::CheckSupported(d, &w);
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

} // namespace schema
} // namespace sbpg
