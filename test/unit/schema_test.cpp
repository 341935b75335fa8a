// test/unit/schema_test.cpp
//   Unit tests of the schema registry's pure C++ core (src/schema): which schemas are supported,
//   and each compatibility rule, accepted and refused, in every mode. docs/schemas.md is the table.
#include "sbpg/schema/schema.hpp"

#include "tap.hpp"

#include <functional>
#include <set>

using namespace sbpg::schema;

namespace {

bool
Supported(const std::string &s, std::string *why = nullptr) {
	std::string w;
	bool ok = CheckSchemaSupported(s, &w);
	if (why)
		*why = w;
	return ok;
}

bool
Has(const std::string &s, const std::string &part) {
	return s.find(part) != std::string::npos;
}

// The violations' rules, joined by spaces (empty when compatible).
std::string
Rules(const std::string &o, const std::string &n, Mode m) {
	std::string r;
	for (auto &v : CheckCompatible(o, n, m))
		r += (r.empty() ? "" : " ") + v.rule;
	return r;
}

// A change's verdict in each mode: which of backward, forward, full it breaks (by rule).
// narrowing: breaks backward and full; widening: forward and full; both: all three. Never none.
void
ExpectNarrowing(const std::string &o, const std::string &n, const std::string &rule) {
	CHECK_EQ(Rules(o, n, Mode::Backward), rule);
	CHECK_EQ(Rules(o, n, Mode::Forward), std::string());
	CHECK_EQ(Rules(o, n, Mode::Full), rule);
	CHECK_EQ(Rules(o, n, Mode::None), std::string());
	// and the reverse change is a widening
	CHECK_EQ(Rules(n, o, Mode::Backward), std::string());
	CHECK(!Rules(n, o, Mode::Forward).empty());
}
void
ExpectWidening(const std::string &o, const std::string &n, const std::string &rule) {
	CHECK_EQ(Rules(o, n, Mode::Backward), std::string());
	CHECK_EQ(Rules(o, n, Mode::Forward), rule);
	CHECK_EQ(Rules(o, n, Mode::Full), rule);
	CHECK_EQ(Rules(o, n, Mode::None), std::string());
}
void
ExpectBoth(const std::string &o, const std::string &n, const std::string &rule) {
	CHECK_EQ(Rules(o, n, Mode::Backward), rule);
	CHECK_EQ(Rules(o, n, Mode::Forward), rule);
	CHECK_EQ(Rules(o, n, Mode::Full), rule);
	CHECK_EQ(Rules(o, n, Mode::None), std::string());
}
void
ExpectCompatible(const std::string &o, const std::string &n) {
	CHECK_EQ(Rules(o, n, Mode::Backward), std::string());
	CHECK_EQ(Rules(o, n, Mode::Forward), std::string());
	CHECK_EQ(Rules(o, n, Mode::Full), std::string());
}

} // namespace

// ---- supported schemas

TEST("CheckSchemaSupported accepts a draft-04 schema using every supported keyword") {
	std::string why;
	CHECK(Supported(R"({"$schema":"http://json-schema.org/draft-04/schema#","id":"urn:x","title":"t",
	  "description":"d","type":"object","required":["a"],"additionalProperties":false,
	  "definitions":{"pos":{"type":"integer","minimum":0,"exclusiveMinimum":true}},
	  "properties":{"a":{"$ref":"#/definitions/pos","description":"ok next to $ref"},
	    "b":{"type":["string","null"],"minLength":1,"maxLength":5,"pattern":"^[a-z]+$","default":"x"},
	    "c":{"type":"array","items":{"enum":[1,"two",null]},"minItems":0,"maxItems":3,"uniqueItems":true},
	    "d":{"type":"array","items":[{"type":"string"}],"additionalItems":false},
	    "e":{"allOf":[{"type":"number"}],"anyOf":[{"maximum":5}],"oneOf":[{"multipleOf":2}],"not":{"enum":[4]}},
	    "f":{"type":"object","patternProperties":{"^x":{}},"dependencies":{"p":["q"],"r":{"required":["s"]}},
	         "minProperties":1,"maxProperties":2,"additionalProperties":{"type":"string"}}}})",
	                &why));
	CHECK_EQ(why, std::string());
	CHECK(Supported("{}"));
	CHECK(Supported(R"({"$ref":"#"})") == false); // a cycle
}

TEST("CheckSchemaSupported refuses non-objects and bad JSON") {
	std::string why;
	CHECK(!Supported("[]", &why));
	CHECK(Has(why, "not a JSON object"));
	CHECK(!Supported("true", &why));
	CHECK(!Supported("{", &why));
	CHECK(Has(why, "not valid JSON"));
	CHECK(!Supported("", &why));
	CHECK(!Supported(R"({"type":"string","type":"integer"})", &why));
	CHECK(Has(why, "appears twice"));
	CHECK(!Supported(R"({"properties":{"a":true}})", &why));
	CHECK(Has(why, "/properties/a is not a JSON object"));
}

TEST("CheckSchemaSupported refuses each keyword RapidJSON would ignore, naming it and its pointer") {
	const char *kws[] = {"format", "const", "contains", "propertyNames", "if", "then", "else", "nullable", "$id"};
	for (const char *k : kws) {
		std::string why;
		CHECK(!Supported(std::string("{\"") + k + "\":{}}", &why));
		CHECK(Has(why, std::string("keyword \"") + k + "\" at the root"));
	}
	std::string why;
	CHECK(!Supported(R"({"format":"date-time"})", &why));
	CHECK(Has(why, "ignores \"format\""));
	CHECK(!Supported(R"({"const":1})", &why));
	CHECK(Has(why, "draft-06"));
}

TEST("CheckSchemaSupported names the pointer of a nested refused keyword") {
	std::string why;
	CHECK(!Supported(R"({"properties":{"a/b":{"items":{"properties":{"when":{"type":"string","format":"date"}}}}}})",
	                 &why));
	CHECK(Has(why, "keyword \"format\" at /properties/a~1b/items/properties/when"));
	CHECK(!Supported(R"({"definitions":{"x":{"anyOf":[{},{"contains":{}}]}}})", &why));
	CHECK(Has(why, "keyword \"contains\" at /definitions/x/anyOf/1"));
}

TEST("CheckSchemaSupported: $schema, id, $ref") {
	std::string why;
	CHECK(Supported(R"({"$schema":"http://json-schema.org/draft-04/schema"})"));
	CHECK(!Supported(R"({"$schema":"http://json-schema.org/draft-07/schema#"})", &why));
	CHECK(Has(why, "only draft-04"));
	CHECK(!Supported(R"({"properties":{"a":{"$schema":"http://json-schema.org/draft-04/schema#"}}})", &why));
	CHECK(!Supported(R"({"properties":{"a":{"id":"x"}}})", &why));
	CHECK(Has(why, "\"id\" at /properties/a"));
	CHECK(!Supported(R"({"$ref":"http://example.com/s.json#/a"})", &why));
	CHECK(Has(why, "only local references"));
	CHECK(!Supported(R"({"$ref":"other.json"})", &why));
	CHECK(!Supported(R"({"properties":{"a":{"$ref":"#/definitions/missing"}}})", &why));
	CHECK(Has(why, "does not point into this schema"));
	CHECK(!Supported(R"({"definitions":{"a":{}},"properties":{"x":{"$ref":"#/definitions"}}})", &why));
	CHECK(Has(why, "does not point at a schema"));
	CHECK(!Supported(R"({"definitions":{"a":{"$ref":"#/definitions/b"},"b":{"$ref":"#/definitions/a"}}})", &why));
	CHECK(Has(why, "cycle"));
	CHECK(
	    !Supported(R"({"definitions":{"a":{}},"properties":{"x":{"$ref":"#/definitions/a","type":"string"}}})", &why));
	CHECK(Has(why, "next to \"$ref\""));
	CHECK(Supported(
	    R"({"definitions":{"n":{"type":"object","properties":{"next":{"$ref":"#/definitions/n"}}}},"$ref":"#/definitions/n"})"));
}

TEST("CheckSchemaSupported refuses keyword values RapidJSON would ignore") {
	const char *bad[] = {R"({"type":"text"})",
	                     R"({"type":[]})",
	                     R"({"type":["string","string"]})",
	                     R"({"enum":[]})",
	                     R"({"required":[]})",
	                     R"({"required":[1]})",
	                     R"({"minLength":1.5})",
	                     R"({"maxItems":-1})",
	                     R"({"minimum":"1"})",
	                     R"({"maximum":5,"exclusiveMaximum":5})",
	                     R"({"exclusiveMinimum":true})",
	                     R"({"multipleOf":0})",
	                     R"({"pattern":"\\d+"})",
	                     R"x({"pattern":"(a"})x",
	                     R"({"patternProperties":{"\\w":{}}})",
	                     R"({"additionalProperties":1})",
	                     R"({"items":true})",
	                     R"({"allOf":[]})",
	                     R"({"dependencies":{"a":[]}})",
	                     R"({"uniqueItems":1})"};
	for (const char *s : bad) {
		std::string why;
		bool ok = Supported(s, &why);
		CHECK(!ok);
		if (ok)
			tap::Fail(__FILE__, __LINE__, std::string("accepted ") + s);
	}
}

TEST("CheckSchemaSupported bounds nesting without deep recursion") {
	std::string deep;
	for (int i = 0; i < 40; ++i)
		deep += R"({"items":)";
	deep += "{}";
	for (int i = 0; i < 40; ++i)
		deep += "}";
	CHECK(Supported(deep));
	std::string deeper;
	for (int i = 0; i < 100000; ++i)
		deeper += R"({"not":)";
	deeper += "{}";
	for (int i = 0; i < 100000; ++i)
		deeper += "}";
	std::string why;
	CHECK(!Supported(deeper, &why));
	CHECK(Has(why, "nests deeper than 64"));
	// nesting inside a value (enum) counts too: RapidJSON's SchemaDocument walks every value
	std::string e = R"({"enum":[)" + std::string(100, '[') + std::string(100, ']') + "]}";
	CHECK(!Supported(e, &why));
	CHECK(Has(why, "nests deeper"));
	CHECK(!Supported(deeper, nullptr));
	CHECK_EQ(CheckCompatible(deeper, "{}", Mode::Full).at(0).rule, std::string("schema-unsupported"));
}

// ---- compatibility

TEST("compat: mode none checks nothing; identical schemas are compatible; parse modes") {
	CHECK(CheckCompatible(R"({"type":"string"})", R"({"type":"integer"})", Mode::None).empty());
	ExpectCompatible(R"({"type":"object","properties":{"a":{"type":"string","title":"x"}}})",
	                 R"({"type":"object","properties":{"a":{"type":"string","title":"y"}}})");
	Mode m;
	CHECK(ParseMode("FULL", &m) && m == Mode::Full);
	CHECK(ParseMode("backward", &m) && m == Mode::Backward);
	CHECK(!ParseMode("transitive", &m));
	CHECK_EQ(std::string(ModeName(Mode::Forward)), std::string("forward"));
}

TEST("compat: type narrowed, widened, changed; integer is a subset of number") {
	ExpectNarrowing(R"({"type":["string","null"]})", R"({"type":"string"})", "type-narrowed");
	ExpectNarrowing(R"({"type":"number"})", R"({"type":"integer"})", "type-narrowed");
	ExpectNarrowing(R"({})", R"({"type":"object"})", "type-narrowed");
	ExpectWidening(R"({"type":"integer"})", R"({"type":"number"})", "type-widened");
	ExpectWidening(R"({"type":"string"})", R"({"type":["null","string"]})", "type-widened");
	ExpectBoth(R"({"type":"string"})", R"({"type":"integer"})", "type-changed");
	ExpectCompatible(R"({"type":["integer","number"]})", R"({"type":"number"})");
}

TEST("compat: required added and removed") {
	ExpectNarrowing(R"({"required":["a"]})", R"({"required":["a","b"]})", "required-added");
	ExpectNarrowing(R"({})", R"({"required":["b"]})", "required-added");
	ExpectWidening(R"({"required":["a","b"]})", R"({"required":["b"]})", "required-removed");
	ExpectCompatible(R"({"required":["a","b"]})", R"({"required":["b","a"]})");
	auto v = CheckCompatible(R"({"properties":{"x":{"required":["a"]}}})",
	                         R"({"properties":{"x":{"required":["a","b"]}}})", Mode::Backward);
	REQUIRE(v.size() == 1);
	CHECK_EQ(v[0].pointer, std::string("/properties/x/required"));
	CHECK(Has(v[0].detail, "\"b\" became required"));
	CHECK(Has(v[0].detail, "breaks backward"));
}

TEST("compat: properties added and removed, open and closed content models") {
	// open model: adding a constrained property narrows (old data may carry it with any value)
	ExpectNarrowing(R"({"properties":{"a":{}}})", R"({"properties":{"a":{},"b":{"type":"string"}}})",
	                "property-added-to-open-model");
	// ... an unconstrained one changes nothing
	ExpectCompatible(R"({"properties":{"a":{}}})", R"({"properties":{"a":{},"b":{"description":"any"}}})");
	// closed model: adding a property widens (new data may carry what the old schema refused)
	ExpectWidening(R"({"properties":{"a":{}},"additionalProperties":false})",
	               R"({"properties":{"a":{},"b":{"type":"string"}},"additionalProperties":false})",
	               "property-added-to-closed-model");
	// removing from a closed model narrows; from an open one widens
	ExpectNarrowing(R"({"properties":{"a":{},"b":{}},"additionalProperties":false})",
	                R"({"properties":{"a":{}},"additionalProperties":false})", "property-removed-from-closed-model");
	ExpectWidening(R"({"properties":{"a":{},"b":{"type":"string"}}})", R"({"properties":{"a":{}}})",
	               "property-removed-from-open-model");
	// additionalProperties as a schema governs the added property: compared rule by rule
	ExpectCompatible(R"({"additionalProperties":{"type":"string"}})",
	                 R"({"properties":{"b":{"type":"string"}},"additionalProperties":{"type":"string"}})");
	auto v = CheckCompatible(
	    R"({"additionalProperties":{"type":"string"}})",
	    R"({"properties":{"b":{"type":"string","maxLength":3}},"additionalProperties":{"type":"string"}})", Mode::Full);
	REQUIRE(v.size() == 1);
	CHECK_EQ(v[0].rule, std::string("max-length-added"));
	CHECK_EQ(v[0].pointer, std::string("/properties/b/maxLength"));
	// a property's own schema is compared recursively
	ExpectNarrowing(R"({"properties":{"a":{"properties":{"b":{"type":"number"}}}}})",
	                R"({"properties":{"a":{"properties":{"b":{"type":"integer"}}}}})", "type-narrowed");
	CHECK_EQ(CheckCompatible(R"({"properties":{"a":{"properties":{"b":{"type":"number"}}}}})",
	                         R"({"properties":{"a":{"properties":{"b":{"type":"integer"}}}}})", Mode::Full)
	             .at(0)
	             .pointer,
	         std::string("/properties/a/properties/b/type"));
	// next to patternProperties, an added property is refused both ways
	ExpectBoth(R"({"patternProperties":{"^x":{}}})", R"({"patternProperties":{"^x":{}},"properties":{"b":{}}})",
	           "property-added");
}

TEST("compat: additionalProperties closed, opened, and its schema changed") {
	ExpectNarrowing(R"({"properties":{"a":{}}})", R"({"properties":{"a":{}},"additionalProperties":false})",
	                "additional-properties-closed");
	ExpectNarrowing(R"({"additionalProperties":true})", R"({"additionalProperties":false})",
	                "additional-properties-closed");
	ExpectNarrowing(R"({"additionalProperties":{"type":"string"}})", R"({"additionalProperties":false})",
	                "additional-properties-closed");
	ExpectWidening(R"({"additionalProperties":false})", R"({"additionalProperties":{"type":"string"}})",
	               "additional-properties-opened");
	ExpectWidening(R"({"additionalProperties":false})", R"({})", "additional-properties-opened");
	ExpectNarrowing(R"({"additionalProperties":{"type":"number"}})", R"({"additionalProperties":{"type":"integer"}})",
	                "type-narrowed");
	ExpectNarrowing(R"({})", R"({"additionalProperties":{"type":"integer"}})", "type-narrowed");
	ExpectCompatible(R"({})", R"({"additionalProperties":true})");
}

TEST("compat: enum values added and removed; enum added and removed") {
	ExpectNarrowing(R"({"enum":["a","b"]})", R"({"enum":["a"]})", "enum-value-removed");
	ExpectWidening(R"({"enum":["a"]})", R"({"enum":["a","b"]})", "enum-value-added");
	CHECK_EQ(Rules(R"({"enum":["a"]})", R"({"enum":["b"]})", Mode::Backward), std::string("enum-value-removed"));
	CHECK_EQ(Rules(R"({"enum":["a"]})", R"({"enum":["b"]})", Mode::Forward), std::string("enum-value-added"));
	CHECK_EQ(Rules(R"({"enum":["a"]})", R"({"enum":["b"]})", Mode::Full),
	         std::string("enum-value-removed enum-value-added"));
	ExpectNarrowing(R"({"type":"string"})", R"({"type":"string","enum":["a"]})", "enum-added");
	ExpectWidening(R"({"enum":["a"]})", R"({})", "enum-removed");
	ExpectCompatible(R"({"enum":[1,"a",{"x":[null]}]})", R"({"enum":[{"x":[null]},"a",1]})");
}

TEST("compat: items compared recursively; tuples; additionalItems") {
	ExpectNarrowing(R"({"items":{"type":"number"}})", R"({"items":{"type":"integer"}})", "type-narrowed");
	CHECK_EQ(CheckCompatible(R"({"items":{"type":"number"}})", R"({"items":{"type":"integer"}})", Mode::Backward)
	             .at(0)
	             .pointer,
	         std::string("/items/type"));
	ExpectWidening(R"({"items":{"properties":{"a":{"enum":[1]}}}})", R"({"items":{"properties":{"a":{"enum":[1,2]}}}})",
	               "enum-value-added");
	ExpectNarrowing(R"({})", R"({"items":{"type":"string"}})", "type-narrowed");
	ExpectBoth(R"({"items":{}})", R"({"items":[{}]})", "items-changed");
	ExpectNarrowing(R"({"items":[{"type":"number"}]})", R"({"items":[{"type":"integer"}]})", "type-narrowed");
	ExpectWidening(R"({"items":[{}],"additionalItems":false})",
	               R"({"items":[{},{"type":"string"}],"additionalItems":false})", "item-added-to-closed-tuple");
	ExpectNarrowing(R"({"items":[{}]})", R"({"items":[{},{"type":"string"}]})", "item-added-to-open-tuple");
	ExpectNarrowing(R"({"items":[{}]})", R"({"items":[{}],"additionalItems":false})", "additional-items-closed");
	ExpectWidening(R"({"items":[{}],"additionalItems":false})", R"({"items":[{}]})", "additional-items-opened");
}

TEST("compat: minimum and maximum, with draft-04 exclusive flags") {
	ExpectNarrowing(R"({"maximum":10})", R"({"maximum":5})", "maximum-decreased");
	ExpectWidening(R"({"maximum":5})", R"({"maximum":10.5})", "maximum-increased");
	ExpectNarrowing(R"({})", R"({"maximum":5})", "maximum-added");
	ExpectWidening(R"({"maximum":5})", R"({})", "maximum-removed");
	ExpectNarrowing(R"({"minimum":0})", R"({"minimum":1})", "minimum-increased");
	ExpectWidening(R"({"minimum":1})", R"({"minimum":-1})", "minimum-decreased");
	ExpectNarrowing(R"({})", R"({"minimum":0})", "minimum-added");
	ExpectWidening(R"({"minimum":0})", R"({})", "minimum-removed");
	ExpectNarrowing(R"({"maximum":5})", R"({"maximum":5,"exclusiveMaximum":true})", "exclusive-maximum-added");
	ExpectWidening(R"({"minimum":5,"exclusiveMinimum":true})", R"({"minimum":5.0})", "exclusive-minimum-removed");
	ExpectCompatible(R"({"minimum":5})", R"({"minimum":5.0,"exclusiveMinimum":false})");
}

TEST("compat: minLength and maxLength") {
	ExpectNarrowing(R"({"maxLength":10})", R"({"maxLength":5})", "max-length-decreased");
	ExpectWidening(R"({"maxLength":5})", R"({"maxLength":10})", "max-length-increased");
	ExpectNarrowing(R"({})", R"({"maxLength":0})", "max-length-added");
	ExpectWidening(R"({"maxLength":5})", R"({})", "max-length-removed");
	ExpectNarrowing(R"({"minLength":1})", R"({"minLength":2})", "min-length-increased");
	ExpectWidening(R"({"minLength":2})", R"({"minLength":1})", "min-length-decreased");
	ExpectNarrowing(R"({})", R"({"minLength":1})", "min-length-added");
	ExpectWidening(R"({"minLength":1})", R"({})", "min-length-removed");
	ExpectCompatible(R"({})", R"({"minLength":0})");
	auto v = CheckCompatible(R"({"properties":{"s":{"maxLength":10}}})", R"({"properties":{"s":{"maxLength":5}}})",
	                         Mode::Full);
	REQUIRE(v.size() == 1);
	CHECK_EQ(v[0].pointer, std::string("/properties/s/maxLength"));
	CHECK(Has(v[0].detail, "went from 10 to 5"));
	CHECK(Has(v[0].detail, "breaks backward"));
}

TEST("compat: minItems/maxItems, minProperties/maxProperties, uniqueItems, multipleOf") {
	ExpectNarrowing(R"({"maxItems":3})", R"({"maxItems":2})", "max-items-decreased");
	ExpectWidening(R"({"minItems":3})", R"({"minItems":2})", "min-items-decreased");
	ExpectNarrowing(R"({})", R"({"minItems":1})", "min-items-added");
	ExpectWidening(R"({"maxItems":1})", R"({})", "max-items-removed");
	ExpectNarrowing(R"({"minProperties":1})", R"({"minProperties":2})", "min-properties-increased");
	ExpectWidening(R"({"maxProperties":1})", R"({"maxProperties":2})", "max-properties-increased");
	ExpectNarrowing(R"({})", R"({"uniqueItems":true})", "unique-items-added");
	ExpectWidening(R"({"uniqueItems":true})", R"({"uniqueItems":false})", "unique-items-removed");
	ExpectNarrowing(R"({"multipleOf":2})", R"({"multipleOf":4})", "multiple-of-changed");
	ExpectWidening(R"({"multipleOf":4})", R"({"multipleOf":2})", "multiple-of-changed");
	ExpectBoth(R"({"multipleOf":2})", R"({"multipleOf":3})", "multiple-of-changed");
	ExpectNarrowing(R"({})", R"({"multipleOf":3})", "multiple-of-added");
	ExpectWidening(R"({"multipleOf":3})", R"({})", "multiple-of-removed");
}

TEST("compat: pattern added, removed, changed") {
	ExpectNarrowing(R"({"type":"string"})", R"({"type":"string","pattern":"^a"})", "pattern-added");
	ExpectWidening(R"({"pattern":"^a"})", R"({})", "pattern-removed");
	ExpectBoth(R"({"pattern":"^a"})", R"({"pattern":"^[ab]"})", "pattern-changed");
	ExpectCompatible(R"({"pattern":"^a"})", R"({"pattern":"^a"})");
}

TEST("compat: combinators, dependencies, patternProperties and $ref compared for equality") {
	ExpectBoth(R"({"anyOf":[{"type":"string"}]})", R"({"anyOf":[{"type":"string"},{"type":"null"}]})",
	           "any-of-changed");
	ExpectBoth(R"({})", R"({"allOf":[{}]})", "all-of-changed");
	ExpectBoth(R"({"oneOf":[{}]})", R"({})", "one-of-changed");
	ExpectBoth(R"({"not":{"type":"null"}})", R"({"not":{"type":"string"}})", "not-changed");
	ExpectBoth(R"({"dependencies":{"a":["b"]}})", R"({})", "dependencies-changed");
	ExpectBoth(R"({"patternProperties":{"^a":{}}})", R"({"patternProperties":{"^b":{}}})",
	           "pattern-properties-changed");
	ExpectBoth(R"({"definitions":{"a":{},"b":{}},"properties":{"x":{"$ref":"#/definitions/a"}}})",
	           R"({"definitions":{"a":{},"b":{}},"properties":{"x":{"$ref":"#/definitions/b"}}})", "ref-changed");
	// the same $ref: its definition is compared
	ExpectNarrowing(R"({"definitions":{"a":{"type":"number"}},"properties":{"x":{"$ref":"#/definitions/a"}}})",
	                R"({"definitions":{"a":{"type":"integer"}},"properties":{"x":{"$ref":"#/definitions/a"}}})",
	                "type-narrowed");
	ExpectCompatible(R"({"anyOf":[{"type":"string"}]})", R"({"anyOf":[{"type":"string"}]})");
}

TEST("compat: several violations, each with rule, pointer and the mode it breaks") {
	std::string o =
	    R"({"type":"object","properties":{"id":{"type":"integer"},"name":{"type":"string","maxLength":50}},"required":["id"]})";
	std::string n =
	    R"({"type":"object","properties":{"id":{"type":"integer"},"name":{"type":"string","maxLength":20}},"required":["id","name"]})";
	auto v = CheckCompatible(o, n, Mode::Backward);
	std::string all;
	for (auto &x : v)
		all += x.rule + "@" + x.pointer + " ";
	CHECK(Has(all, "required-added@/required "));
	CHECK(Has(all, "max-length-decreased@/properties/name/maxLength "));
	CHECK_EQ(v.size(), size_t(2));
	CHECK(CheckCompatible(o, n, Mode::Forward).empty());
	CHECK_EQ(CheckCompatible(o, R"({"format":"x"})", Mode::Full).at(0).rule, std::string("schema-unsupported"));
	CHECK(Has(CheckCompatible(o, R"({"format":"x"})", Mode::Full).at(0).detail, "the new schema"));
}

TEST("compat: the detail names the change and the mode it breaks") {
	auto v = CheckCompatible(R"({"enum":["a"]})", R"({"enum":["a","b"]})", Mode::Forward);
	REQUIRE(v.size() == 1);
	CHECK_EQ(v[0].pointer, std::string("/enum"));
	CHECK(Has(v[0].detail, "the value \"b\" was added to \"enum\""));
	CHECK(Has(v[0].detail, "breaks forward"));
	v = CheckCompatible(R"({"type":"string"})", R"({"type":"integer"})", Mode::Backward);
	REQUIRE(v.size() == 1);
	CHECK(Has(v[0].detail, "\"type\" went from \"string\" to \"integer\""));
	CHECK(Has(v[0].detail, "breaks backward, forward and full"));
	v = CheckCompatible(R"({"properties":{"a":{}},"additionalProperties":false})",
	                    R"({"properties":{"a":{},"b":{}},"additionalProperties":false})", Mode::Full);
	REQUIRE(v.size() == 1);
	CHECK(Has(v[0].detail, "property \"b\" was added"));
}

// Random schemas built from the supported keywords and some refused ones: neither function may
// throw or crash (run under ASan/UBSan too), every supported schema is compatible with itself,
// and a change breaks backward exactly when its reverse breaks forward (a narrowing one way is a
// widening the other way).
TEST("random schemas: no crash, self-compatible, narrowing one way is widening the other") {
	unsigned seed = 12345;
	auto rnd = [&](unsigned n) {
		seed = seed * 1103515245u + 12345u;
		return (seed >> 16) % n;
	};
	std::function<std::string(int)> gen = [&](int depth) -> std::string {
		static const char *leaves[] = {R"("type":"string")",
		                               R"("type":"integer")",
		                               R"("type":["number","null"])",
		                               R"("minLength":2)",
		                               R"("maxLength":7)",
		                               R"("minimum":0)",
		                               R"("maximum":10,"exclusiveMaximum":true)",
		                               R"("enum":[1,"a",null])",
		                               R"("enum":["a"])",
		                               R"("pattern":"^[a-z]+$")",
		                               R"("required":["a"])",
		                               R"("required":["a","b"])",
		                               R"("additionalProperties":false)",
		                               R"("additionalProperties":true)",
		                               R"("uniqueItems":true)",
		                               R"("minItems":1)",
		                               R"("maxItems":3)",
		                               R"("multipleOf":2)",
		                               R"("format":"email")",
		                               R"("const":3)",
		                               R"("title":"t")",
		                               R"("maxProperties":4)"};
		std::string s = "{";
		std::set<std::string> used;
		int n = static_cast<int>(rnd(4));
		for (int i = 0; i < n; ++i) {
			std::string kv;
			unsigned pick = depth > 0 ? rnd(26) : rnd(22);
			if (pick < 22)
				kv = leaves[pick];
			else if (pick == 22)
				kv = "\"properties\":{\"a\":" + gen(depth - 1) + ",\"b\":" + gen(depth - 1) + "}";
			else if (pick == 23)
				kv = "\"items\":" + gen(depth - 1);
			else if (pick == 24)
				kv = "\"additionalProperties\":" + gen(depth - 1);
			else
				kv = "\"anyOf\":[" + gen(depth - 1) + "]";
			std::string key = kv.substr(0, kv.find(':'));
			if (!used.insert(key).second || (key == "\"maximum\"" && used.count("\"exclusiveMaximum\"")))
				continue;
			s += (s.size() > 1 ? "," : "") + kv;
		}
		return s + "}";
	};
	int supported = 0, pairs = 0;
	for (int i = 0; i < 400; ++i) {
		std::string a = gen(3), b = gen(3);
		bool sa = Supported(a), sb = Supported(b);
		supported += sa;
		if (sa)
			CHECK(CheckCompatible(a, a, Mode::Full).empty());
		if (sa && sb) {
			++pairs;
			// backward(a -> b) breaks exactly when forward(b -> a) breaks.
			auto back = CheckCompatible(a, b, Mode::Backward), fwd = CheckCompatible(b, a, Mode::Forward);
			CHECK_EQ(back.empty(), fwd.empty());
			CHECK(CheckCompatible(a, b, Mode::Full).size() >= back.size());
		} else {
			CHECK(!CheckCompatible(a, b, Mode::Full).empty());
		}
	}
	CHECK(supported > 50);
	CHECK(pairs > 20);
}

TAP_MAIN
