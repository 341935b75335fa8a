// bench/classify_bench.cpp: the per-message CPU cost of versioned-schema work on the AMQP thread,
// beside decoding alone. For N messages like bench/sbpg_bench.mjs's bodies, measures
//   decode:   CheckJson of the body (what every message pays)
//   classify: Registry::Classify (type from the subject, version property, JSON Schema validation)
// Prints ns per message for each. Built and run by bench/schemas.sh.
#include "sbpg/message/message.hpp"
#include "sbpg/schema/registry.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int
main(int argc, char **argv) {
	int n = argc > 1 ? std::atoi(argv[1]) : 200000;
	std::vector<sbpg::schema::SchemaRow> rows = {{"orders.created", 1,
	    R"({"type":"object","properties":{"id":{"type":"integer"},"customer":{"type":"string","pattern":"^c[0-9]+$"},)"
	    R"("amount":{"type":"number","minimum":0,"maximum":1000},"note":{"type":"string","maxLength":200}},)"
	    R"("required":["id","customer","amount"],"additionalProperties":false})"}};
	std::vector<std::string> errors;
	auto reg = sbpg::schema::Registry::Build(rows, &errors);
	if (!errors.empty()) {
		std::fprintf(stderr, "%s\n", errors[0].c_str());
		return 1;
	}
	std::vector<sbpg::ReceivedMessage> msgs(n);
	for (int i = 0; i < n; ++i) {
		auto &m = msgs[i];
		m.subject = "orders.created";
		m.properties_json = "{\"schema_version\":1}";
		m.content_type = "application/json";
		m.raw_body = "{\"id\":" + std::to_string(i) + ",\"customer\":\"c" + std::to_string(i % 50) +
		             "\",\"amount\":" + std::to_string(i % 90 + 1) + ",\"note\":\"" + std::string(60, 'x') + "\"}";
		m.body_kind = sbpg::BodyKind::Data;
		m.json = sbpg::JsonVerdict::Json;
	}
	using clock = std::chrono::steady_clock;
	std::string why;
	auto t0 = clock::now();
	size_t ok = 0;
	for (auto &m : msgs)
		ok += sbpg::CheckJson(m.raw_body, 1000, &why);
	auto t1 = clock::now();
	sbpg::schema::ClassifyOptions opt;
	size_t valid = 0;
	for (auto &m : msgs) {
		reg->Classify(&m, opt);
		valid += m.schema_reason.empty();
	}
	auto t2 = clock::now();
	double dec = std::chrono::duration<double, std::nano>(t1 - t0).count() / n;
	double cls = std::chrono::duration<double, std::nano>(t2 - t1).count() / n;
	std::printf("messages=%d decode_ns=%.0f classify_ns=%.0f checked=%zu valid=%zu\n", n, dec, cls, ok, valid);
	return valid == static_cast<size_t>(n) ? 0 : 1;
}
