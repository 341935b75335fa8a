// sbemu/config.cpp
//   Config.json reader. Keys are matched case-insensitively; values may be written as JSON
//   booleans and numbers or as strings, as hand-written files do.
#include "config.hpp"

#include "sbpg/core/json.hpp"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

namespace sbemu {

namespace {

using JVal = rapidjson::Value;

const JVal *
Member(const JVal &obj, const char *name) {
	if (!obj.IsObject())
		return nullptr;
	for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it)
		if (it->name.IsString() && IEquals(it->name.GetString(), name))
			return &it->value;
	return nullptr;
}

struct Ctx {
	std::string *err;
	std::vector<std::string> *warnings;
	std::string where;
	bool Fail(const std::string &m) {
		*err = where + ": " + m;
		return false;
	}
	void Warn(const std::string &m) { warnings->push_back(where + ": " + m); }
};

bool
GetString(Ctx &c, const JVal &obj, const char *name, std::string *out) {
	const JVal *v = Member(obj, name);
	if (!v || v->IsNull())
		return true;
	if (!v->IsString())
		return c.Fail(std::string(name) + " must be a string");
	*out = v->GetString();
	return true;
}

bool
GetBool(Ctx &c, const JVal &obj, const char *name, bool *out) {
	const JVal *v = Member(obj, name);
	if (!v || v->IsNull())
		return true;
	if (v->IsBool()) {
		*out = v->GetBool();
		return true;
	}
	if (v->IsString()) {
		std::string s = ToLower(v->GetString());
		if (s == "true" || s == "false") {
			*out = s == "true";
			return true;
		}
	}
	return c.Fail(std::string(name) + " must be true or false");
}

bool
GetInt(Ctx &c, const JVal &obj, const char *name, int *out) {
	const JVal *v = Member(obj, name);
	if (!v || v->IsNull())
		return true;
	if (v->IsInt()) {
		*out = v->GetInt();
		return true;
	}
	if (v->IsString()) {
		char *end = nullptr;
		long n = std::strtol(v->GetString(), &end, 10);
		if (end && *end == '\0') {
			*out = static_cast<int>(n);
			return true;
		}
	}
	return c.Fail(std::string(name) + " must be an integer");
}

bool
GetDuration(Ctx &c, const JVal &obj, const char *name, int64_t *out) {
	const JVal *v = Member(obj, name);
	if (!v || v->IsNull())
		return true;
	if (v->IsString()) {
		if (ParseDuration(v->GetString(), out))
			return true;
		return c.Fail(std::string(name) + " '" + v->GetString() + "' is not an ISO-8601 duration such as PT1M");
	}
	if (v->IsNumber()) { // seconds
		*out = static_cast<int64_t>(v->GetDouble() * 1000.0);
		return true;
	}
	return c.Fail(std::string(name) + " must be a duration such as \"PT1M\"");
}

bool
ParseProps(Ctx &c, const JVal *props, EntityProps *p, bool is_topic) {
	if (!props)
		return true;
	if (!props->IsObject())
		return c.Fail("Properties must be an object");
	static const char *known[] = {"DeadLetteringOnMessageExpiration",
	                              "DefaultMessageTimeToLive",
	                              "DuplicateDetectionHistoryTimeWindow",
	                              "ForwardDeadLetteredMessagesTo",
	                              "ForwardTo",
	                              "LockDuration",
	                              "MaxDeliveryCount",
	                              "RequiresDuplicateDetection",
	                              "RequiresSession",
	                              "MaxSizeInMegabytes",
	                              "EnablePartitioning",
	                              "EnableBatchedOperations",
	                              "AutoDeleteOnIdle",
	                              "Status",
	                              "UserMetadata",
	                              "SupportOrdering",
	                              "DeadLetteringOnFilterEvaluationExceptions",
	                              "EnableExpress",
	                              "MaxMessageSizeInKilobytes"};
	for (auto it = props->MemberBegin(); it != props->MemberEnd(); ++it) {
		bool ok = false;
		for (const char *k : known)
			if (IEquals(it->name.GetString(), k))
				ok = true;
		if (!ok)
			c.Warn(std::string("unknown property ") + it->name.GetString() + " ignored");
	}
	if (!GetBool(c, *props, "DeadLetteringOnMessageExpiration", &p->dead_letter_on_expiration) ||
	    !GetDuration(c, *props, "DefaultMessageTimeToLive", &p->default_ttl_ms) ||
	    !GetDuration(c, *props, "DuplicateDetectionHistoryTimeWindow", &p->duplicate_window_ms) ||
	    !GetString(c, *props, "ForwardDeadLetteredMessagesTo", &p->forward_dead_lettered_to) ||
	    !GetString(c, *props, "ForwardTo", &p->forward_to) ||
	    !GetDuration(c, *props, "LockDuration", &p->lock_duration_ms) ||
	    !GetInt(c, *props, "MaxDeliveryCount", &p->max_delivery_count) ||
	    !GetBool(c, *props, "RequiresDuplicateDetection", &p->requires_duplicate_detection) ||
	    !GetBool(c, *props, "RequiresSession", &p->requires_session))
		return false;
	if (p->lock_duration_ms < 1000 || p->lock_duration_ms > 5 * 60000)
		return c.Fail("LockDuration must be between 1 second and 5 minutes (PT1S..PT5M), as in Service Bus");
	if (p->max_delivery_count < 1)
		return c.Fail("MaxDeliveryCount must be at least 1");
	if (p->default_ttl_ms <= 0)
		return c.Fail("DefaultMessageTimeToLive must be positive");
	if (p->duplicate_window_ms < 20000 && p->requires_duplicate_detection)
		c.Warn("DuplicateDetectionHistoryTimeWindow below PT20S is accepted here but refused by Service Bus");
	(void)is_topic;
	return true;
}

bool
ParseFilterValue(const JVal &v, FilterValue *out) {
	if (v.IsString()) {
		out->kind = FilterValue::Kind::String;
		out->s = v.GetString();
	} else if (v.IsBool()) {
		out->kind = FilterValue::Kind::Bool;
		out->b = v.GetBool();
	} else if (v.IsInt64()) {
		out->kind = FilterValue::Kind::Int;
		out->i = v.GetInt64();
	} else if (v.IsNumber()) {
		out->kind = FilterValue::Kind::Double;
		out->d = v.GetDouble();
	} else {
		return false;
	}
	return true;
}

bool
ParseRule(Ctx &c, const JVal &r, Rule *rule) {
	if (!GetString(c, r, "Name", &rule->name))
		return false;
	const JVal *props = Member(r, "Properties");
	if (!props || !props->IsObject())
		return c.Fail("rule " + rule->name + " has no Properties");
	std::string type = "Correlation";
	if (!GetString(c, *props, "FilterType", &type))
		return false;
	if (IEquals(type, "Correlation")) {
		rule->kind = Rule::Kind::Correlation;
		const JVal *cf = Member(*props, "CorrelationFilter");
		if (!cf || !cf->IsObject())
			return c.Fail("rule " + rule->name + ": FilterType Correlation needs a CorrelationFilter object");
		auto opt = [&](const char *name, std::optional<std::string> *out) {
			const JVal *v = Member(*cf, name);
			if (v && v->IsString())
				*out = std::string(v->GetString());
		};
		CorrelationFilter &f = rule->correlation;
		opt("ContentType", &f.content_type);
		opt("CorrelationId", &f.correlation_id);
		opt("Label", &f.label);
		if (!f.label)
			opt("Subject", &f.label);
		opt("MessageId", &f.message_id);
		opt("ReplyTo", &f.reply_to);
		opt("ReplyToSessionId", &f.reply_to_session_id);
		opt("SessionId", &f.session_id);
		opt("To", &f.to);
		const JVal *p = Member(*cf, "Properties");
		if (p && p->IsObject()) {
			for (auto it = p->MemberBegin(); it != p->MemberEnd(); ++it) {
				FilterValue fv;
				if (!ParseFilterValue(it->value, &fv))
					return c.Fail("rule " + rule->name + ": correlation property " + it->name.GetString() +
					              " must be a string, number or boolean");
				f.properties[it->name.GetString()] = fv;
			}
		}
	} else if (IEquals(type, "Sql")) {
		rule->kind = Rule::Kind::Sql;
		const JVal *sf = Member(*props, "SqlFilter");
		std::string expr;
		if (sf && sf->IsObject())
			GetString(c, *sf, "SqlExpression", &expr);
		else if (sf && sf->IsString())
			expr = sf->GetString();
		if (expr.empty())
			return c.Fail("rule " + rule->name + ": FilterType Sql needs SqlFilter.SqlExpression");
		std::string perr;
		auto parsed = SqlFilter::Parse(expr, &perr);
		if (!parsed)
			return c.Fail("rule " + rule->name + ": SQL filter '" + expr + "': " + perr);
		rule->sql = std::move(parsed);
		rule->sql_text = expr;
		if (Member(*props, "Action"))
			c.Warn("rule " + rule->name + ": SQL rule actions are not applied by sbemu");
	} else if (IEquals(type, "True") || IEquals(type, "TrueFilter")) {
		rule->kind = Rule::Kind::True;
	} else if (IEquals(type, "False") || IEquals(type, "FalseFilter")) {
		rule->kind = Rule::Kind::False;
	} else {
		return c.Fail("rule " + rule->name + ": unknown FilterType " + type);
	}
	return true;
}

bool
ValidName(const std::string &n) {
	if (n.empty() || n.size() > 260)
		return false;
	for (char ch : n)
		if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '.' || ch == '_' || ch == '/' ||
		      ch == '~'))
			return false;
	return n.front() != '/' && n.back() != '/';
}

// An entity reference as ForwardTo writes it ("orders", "/orders", "sb://host/orders"), lower case.
std::string
EntityKey(const std::string &ref) {
	std::string_view s = ref;
	size_t scheme = s.find("://");
	if (scheme != std::string_view::npos) {
		s = s.substr(scheme + 3);
		size_t slash = s.find('/');
		s = slash == std::string_view::npos ? std::string_view() : s.substr(slash);
	}
	while (!s.empty() && s.front() == '/')
		s.remove_prefix(1);
	while (!s.empty() && s.back() == '/')
		s.remove_suffix(1);
	return ToLower(s);
}

} // namespace

bool
ValidateNamespace(const NamespaceConfig &cfg, std::string *err) {
	// Entity names are case-insensitive: two that differ only in case (or a queue named like a
	// subscription's path) would be one entity.
	std::map<std::string, std::string> names; // key -> name as written
	auto add = [&](const std::string &name, const char *what) {
		auto r = names.emplace(ToLower(name), name);
		if (!r.second) {
			*err = std::string("Config.json: ") + what + " '" + name + "' clashes with the entity '" + r.first->second +
			       "' (entity names are case-insensitive)";
			return false;
		}
		return true;
	};
	for (auto &q : cfg.queues)
		if (!add(q.name, "queue"))
			return false;
	for (auto &t : cfg.topics) {
		if (!add(t.name, "topic"))
			return false;
		for (auto &sc : t.subscriptions)
			if (!add(t.name + "/Subscriptions/" + sc.name, "subscription"))
				return false;
	}
	// ForwardTo must not make a cycle: a message would go round until the hop limit, copied into
	// every subscription on the way.
	std::map<std::string, std::vector<std::string>> next; // entity key -> where a message goes on
	for (auto &q : cfg.queues)
		if (!q.props.forward_to.empty())
			next[ToLower(q.name)].push_back(EntityKey(q.props.forward_to));
	for (auto &t : cfg.topics) {
		// A topic that forwards passes everything on; otherwise it copies into its subscriptions.
		if (!t.props.forward_to.empty())
			next[ToLower(t.name)].push_back(EntityKey(t.props.forward_to));
		for (auto &sc : t.subscriptions) {
			std::string sub = ToLower(t.name + "/Subscriptions/" + sc.name);
			if (t.props.forward_to.empty())
				next[ToLower(t.name)].push_back(sub);
			if (!sc.props.forward_to.empty())
				next[sub].push_back(EntityKey(sc.props.forward_to));
		}
	}
	std::map<std::string, int> state; // 1 on the current path, 2 done
	std::vector<std::string> path;
	std::function<bool(const std::string &)> visit = [&](const std::string &k) -> bool {
		int &st = state[k];
		if (st == 2)
			return true;
		if (st == 1) {
			std::string cycle;
			auto from = std::find(path.begin(), path.end(), k);
			for (auto it = from; it != path.end(); ++it)
				cycle += names.count(*it) ? names[*it] + " -> " : *it + " -> ";
			*err = "Config.json: ForwardTo makes a forwarding cycle: " + cycle + (names.count(k) ? names[k] : k);
			return false;
		}
		st = 1;
		path.push_back(k);
		auto it = next.find(k);
		if (it != next.end())
			for (auto &n : it->second)
				if (!visit(n))
					return false;
		path.pop_back();
		state[k] = 2;
		return true;
	};
	for (auto &kv : next)
		if (!visit(kv.first))
			return false;
	return true;
}

bool
ParseConfig(const std::string &text, NamespaceConfig *out, std::string *err, std::vector<std::string> *warnings) {
	rapidjson::Document doc;
	doc.Parse<rapidjson::kParseCommentsFlag | rapidjson::kParseTrailingCommasFlag>(text.c_str(), text.size());
	if (doc.HasParseError()) {
		*err = std::string("Config.json is not valid JSON: ") + rapidjson::GetParseError_En(doc.GetParseError()) +
		       " at offset " + std::to_string(doc.GetErrorOffset());
		return false;
	}
	Ctx c{err, warnings, "Config.json"};
	const JVal *user = Member(doc, "UserConfig");
	const JVal *root = user ? user : &doc;
	const JVal *nss = Member(*root, "Namespaces");
	if (!nss || !nss->IsArray() || nss->Empty())
		return c.Fail("UserConfig.Namespaces must be a non-empty array");
	if (nss->Size() > 1)
		c.Warn("only the first namespace is served, as in Microsoft's emulator");
	const JVal &ns = (*nss)[0];
	GetString(c, ns, "Name", &out->name);
	const JVal *queues = Member(ns, "Queues");
	if (queues && queues->IsArray()) {
		for (auto &q : queues->GetArray()) {
			QueueConfig qc;
			if (!GetString(c, q, "Name", &qc.name))
				return false;
			if (!ValidName(qc.name))
				return c.Fail("queue name '" + qc.name + "' is not a valid entity name");
			c.where = "queue " + qc.name;
			if (!ParseProps(c, Member(q, "Properties"), &qc.props, false))
				return false;
			out->queues.push_back(std::move(qc));
			c.where = "Config.json";
		}
	}
	const JVal *topics = Member(ns, "Topics");
	if (topics && topics->IsArray()) {
		for (auto &t : topics->GetArray()) {
			TopicConfig tc;
			if (!GetString(c, t, "Name", &tc.name))
				return false;
			if (!ValidName(tc.name))
				return c.Fail("topic name '" + tc.name + "' is not a valid entity name");
			c.where = "topic " + tc.name;
			if (!ParseProps(c, Member(t, "Properties"), &tc.props, true))
				return false;
			const JVal *subs = Member(t, "Subscriptions");
			if (subs && subs->IsArray()) {
				for (auto &s : subs->GetArray()) {
					SubscriptionConfig sc;
					if (!GetString(c, s, "Name", &sc.name))
						return false;
					if (!ValidName(sc.name) || sc.name.find('/') != std::string::npos)
						return c.Fail("subscription name '" + sc.name + "' is not valid");
					c.where = "subscription " + tc.name + "/" + sc.name;
					if (!ParseProps(c, Member(s, "Properties"), &sc.props, false))
						return false;
					// Duplicate detection is a topic property; subscriptions inherit nothing else.
					const JVal *rules = Member(s, "Rules");
					if (rules && rules->IsArray()) {
						for (auto &r : rules->GetArray()) {
							Rule rule;
							if (!ParseRule(c, r, &rule))
								return false;
							sc.rules.push_back(std::move(rule));
						}
					}
					tc.subscriptions.push_back(std::move(sc));
				}
			}
			out->topics.push_back(std::move(tc));
			c.where = "Config.json";
		}
	}
	return ValidateNamespace(*out, err);
}

bool
LoadConfigFile(const std::string &path, NamespaceConfig *out, std::string *err, std::vector<std::string> *warnings) {
	std::ifstream f(path);
	if (!f) {
		*err = "cannot read config file " + path;
		return false;
	}
	std::stringstream ss;
	ss << f.rdbuf();
	try {
		return ParseConfig(ss.str(), out, err, warnings);
	} catch (const std::exception &e) {
		*err = std::string("Config.json could not be read: ") + e.what();
		return false;
	}
}

} // namespace sbemu
