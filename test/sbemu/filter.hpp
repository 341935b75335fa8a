// sbemu/filter.hpp
//   Topic subscription rules: correlation filters and SQL filters as Service Bus evaluates them
//   (a practical subset of the SQL filter grammar: comparisons, arithmetic, AND/OR/NOT, IN, LIKE,
//   IS NULL, EXISTS, sys./user. property references).
#pragma once

#include "sbpg/amqp/codec.hpp"
#include "util.hpp"

#include <map>
#include <memory>
#include <optional>
#include <string>

namespace sbemu {

// What a filter can see of a message.
struct FilterInput {
	std::string message_id, correlation_id, to, reply_to, subject, session_id, reply_to_session_id, content_type;
	const amqp::Value *app_props = nullptr; // application-properties map, may be null
	uint64_t sequence_number = 0;
	int64_t enqueued_ms = 0;
};

// A scalar as filters compare them.
struct FilterValue {
	enum class Kind { Null, Bool, Int, Double, String } kind = Kind::Null;
	bool b = false;
	int64_t i = 0;
	double d = 0;
	std::string s;
	static FilterValue FromAmqp(const amqp::Value &v);
};

struct CorrelationFilter {
	std::optional<std::string> content_type, correlation_id, label, message_id, reply_to, reply_to_session_id,
	    session_id, to;
	std::map<std::string, FilterValue> properties;
	bool Match(const FilterInput &m) const;
	bool Empty() const;
};

class SqlFilter {
  public:
	// Parses the expression; on error returns null and sets err.
	static std::unique_ptr<SqlFilter> Parse(const std::string &text, std::string *err);
	bool Match(const FilterInput &m) const;
	~SqlFilter();
	struct Node;

  private:
	std::unique_ptr<Node> root_;
};

struct Rule {
	std::string name;
	enum class Kind { True, False, Correlation, Sql } kind = Kind::True;
	CorrelationFilter correlation;
	std::shared_ptr<SqlFilter> sql;
	std::string sql_text;
	bool Match(const FilterInput &m) const;
};

} // namespace sbemu
