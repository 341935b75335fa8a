// sbpg/schema/registry.hpp
//   The registered schemas as the AMQP thread uses them: compiled once per registry change, read
//   (never modified) while messages are classified, so one snapshot may be shared by threads.
//   Classify() finds a message's type and version and validates its JSON body. Pure C++ (RapidJSON).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

struct ReceivedMessage;

namespace schema {

struct SchemaRow {
	std::string message_type;
	int version = 0;
	std::string schema_json;
};

// What to do with a message whose type or version has no registered schema.
enum class UnknownPolicy { DeadLetter, Pass };

struct ClassifyOptions {
	std::string version_property = "schema_version"; // application property naming the version
	UnknownPolicy unknown = UnknownPolicy::DeadLetter;
};

class Registry {
  public:
	// Compiles every row; a row that does not compile is skipped with its reason in *errors.
	static std::shared_ptr<const Registry> Build(const std::vector<SchemaRow> &rows, std::vector<std::string> *errors);
	~Registry();

	// Finds the message's type and version (CloudEvents binary mode, structured mode, subject with
	// the version property or the content type's v= parameter) and validates the body against the
	// registered schema. Sets message_type, schema_version, and schema_reason/schema_error on m.
	// A structured-mode CloudEvent's `data` replaces the body. Never throws.
	void Classify(ReceivedMessage *m, const ClassifyOptions &opt) const;

	size_t size() const;

  private:
	Registry() = default;
	struct Compiled;
	std::map<std::string, std::map<int, std::unique_ptr<Compiled>>> types_;
};

} // namespace schema
} // namespace sbpg
