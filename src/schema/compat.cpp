// src/schema/compat.cpp
//   Whether a new version of a schema is compatible with the one before under a compatibility mode
//   (backward, forward, full): both schemas must first be supported (src/schema/schema.cpp); then
//   the two are walked side by side, keyword by keyword, from an explicit stack (never recursion on
//   the thread's stack), and every change is reported as narrowing, widening or both. docs/schemas.md
//   is the rule book; keep the two in step.
#include "sbpg/schema/schema.hpp"

#include "sbpg/schema/detail.hpp"

#include <cmath>
#include <set>

namespace sbpg {
namespace schema {

namespace {

using namespace detail;

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
			Report(r.closed, ptr, Effect::Narrowing,
			       slot + ": the old schema allowed values there, the new one allows none");
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
		    {"allOf", "all-of-changed"},
		    {"anyOf", "any-of-changed"},
		    {"oneOf", "one-of-changed"},
		    {"not", "not-changed"},
		    {"dependencies", "dependencies-changed"},
		    {"patternProperties", "pattern-properties-changed"},
		    {"$ref", "ref-changed"},
		};
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
				Report("enum-value-removed", p, Effect::Narrowing,
				       "the value " + ToJson(e) + " was removed from \"enum\"");
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
				     "property " + Quote(Name(m.name)) +
				         " was added (the old schema left it to \"additionalProperties\")");
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
			     "tuple position " + std::to_string(i) +
			         " was removed (the new schema leaves it to \"additionalItems\")");
		if (!(oai == nai))
			Slot(oai, nai, Child(ptr, "additionalItems"), depth,
			     {"additional-items-closed", "additional-items-opened", nullptr, nullptr},
			     "\"additionalItems\" changed");
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
				Report((rule + "-added").c_str(), p, Effect::Narrowing,
				       std::string("\"") + kw + "\" " + ToJson(*b) + " was added");
			return;
		}
		if (!b) {
			if (upper || a->GetUint64() > 0)
				Report((rule + "-removed").c_str(), p, Effect::Widening,
				       std::string("\"") + kw + "\" " + ToJson(*a) + " was removed");
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
			Report("unique-items-removed", Child(ptr, "uniqueItems"), Effect::Widening,
			       "items need no longer be unique");
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
