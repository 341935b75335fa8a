// test/fuzz/schema_fuzzer.cpp: libFuzzer harness for the schema registry's pure C++ core
// (src/schema/): CheckSchemaSupported and CheckCompatible on fuzzed schemas, and
// Registry::Classify of fuzzed messages (subject, version property, CloudEvents attributes,
// structured events, JSON bodies) against a fixed registry. Nothing may throw or crash, and a
// verdict always carries its reason.
#include "sbpg/message/message.hpp"
#include "sbpg/schema/registry.hpp"
#include "sbpg/schema/schema.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

[[noreturn]] void
Fail(const char *what, const std::string &detail = std::string()) {
	std::fprintf(stderr, "INVARIANT VIOLATED: %s %s\n", what, detail.substr(0, 300).c_str());
	std::abort();
}

const sbpg::schema::Registry &
Fixed() {
	static std::shared_ptr<const sbpg::schema::Registry> reg = [] {
		std::vector<sbpg::schema::SchemaRow> rows = {
		    {"orders.created", 1,
		     R"({"type":"object","properties":{"id":{"type":"integer"},"amount":{"type":"number","minimum":0},)"
		     R"("currency":{"enum":["EUR","USD"]},"code":{"type":"string","pattern":"^[A-Z]{3}-[0-9]+$"},)"
		     R"("items":{"type":"array","items":{"type":"object","required":["sku"]},"maxItems":5}},)"
		     R"("required":["id","amount"],"additionalProperties":false})"},
		    {"orders.created", 2, R"({"type":"object","required":["id"]})"},
		    {"any", 1, R"({})"},
		    {"deep", 1, R"({"type":"array","items":{"type":"array","items":{"type":"array"}}})"},
		};
		std::vector<std::string> errors;
		auto r = sbpg::schema::Registry::Build(rows, &errors);
		if (!errors.empty() || r->size() != 4)
			Fail("the fixed registry did not compile", errors.empty() ? "" : errors[0]);
		return r;
	}();
	return *reg;
}

void
ClassifyFuzzed(FuzzedDataProvider &in) {
	sbpg::ReceivedMessage m;
	static const char *types[] = {"orders.created", "any", "deep", "nope", ""};
	m.subject = in.ConsumeBool() ? types[in.ConsumeIntegralInRange<int>(0, 4)] : in.ConsumeRandomLengthString(20);
	m.content_type = in.PickValueInArray({"application/json", "application/json; v=2", "application/cloudevents+json",
	                                      "text/plain", "", "application/json;version=\"1\""});
	std::string props = in.ConsumeRandomLengthString(200);
	m.properties_json = in.ConsumeBool() ? props
	                                     : std::string("{\"schema_version\":") +
	                                           std::to_string(in.ConsumeIntegralInRange<int>(-2, 3)) + "}";
	m.raw_body = in.ConsumeRemainingBytesAsString();
	m.body_kind = sbpg::BodyKind::Data;
	std::string why;
	m.json = sbpg::CheckJson(m.raw_body, 1000, &why) ? sbpg::JsonVerdict::Json : sbpg::JsonVerdict::NotJson;
	sbpg::schema::ClassifyOptions opt;
	opt.unknown = in.ConsumeBool() ? sbpg::schema::UnknownPolicy::Pass : sbpg::schema::UnknownPolicy::DeadLetter;
	Fixed().Classify(&m, opt);
	if (!m.schema_reason.empty() && m.schema_error.empty())
		Fail("a verdict without a reason", m.schema_reason);
	if (!m.schema_reason.empty() && m.schema_reason != "SchemaViolation" && m.schema_reason != "UnknownMessageType")
		Fail("an unexpected reason", m.schema_reason);
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	if (size < 2)
		return 0;
	FuzzedDataProvider in(data + 1, size - 1);
	switch (data[0] % 3) {
	case 0: {
		std::string s = in.ConsumeRemainingBytesAsString();
		std::string why;
		bool ok = sbpg::schema::CheckSchemaSupported(s, &why);
		if (!ok && why.empty())
			Fail("a schema refused without a reason");
		if (ok) {
			std::vector<std::string> errors;
			auto r = sbpg::schema::Registry::Build({{"fuzzed", 1, s}}, &errors);
			if (r->size() != 1)
				Fail("a supported schema did not compile", errors.empty() ? "" : errors[0]);
		}
		break;
	}
	case 1: {
		std::string a = in.ConsumeRandomLengthString(2000), b = in.ConsumeRemainingBytesAsString();
		for (auto mode : {sbpg::schema::Mode::Backward, sbpg::schema::Mode::Forward, sbpg::schema::Mode::Full})
			for (auto &v : sbpg::schema::CheckCompatible(a, b, mode))
				if (v.rule.empty() || v.detail.empty())
					Fail("a violation without rule or detail");
		break;
	}
	default:
		ClassifyFuzzed(in);
		break;
	}
	return 0;
}
