// sbemu/config.hpp
//   Entities as Microsoft's Service Bus emulator describes them in Config.json
//   (UserConfig.Namespaces[].Queues/Topics/Subscriptions/Rules), with the service's defaults.
#pragma once

#include "filter.hpp"
#include "util.hpp"

#include <string>
#include <vector>

namespace sbemu {

struct EntityProps {
	int64_t lock_duration_ms = 60000; // Service Bus default PT1M
	int max_delivery_count = 10;
	int64_t default_ttl_ms = kNever; // TimeSpan.MaxValue unless configured
	bool dead_letter_on_expiration = false;
	bool requires_duplicate_detection = false;
	int64_t duplicate_window_ms = 10 * 60000; // PT10M
	bool requires_session = false;
	std::string forward_to;
	std::string forward_dead_lettered_to;
};

struct SubscriptionConfig {
	std::string name;
	EntityProps props;
	std::vector<Rule> rules; // empty means the $Default true filter
};

struct TopicConfig {
	std::string name;
	EntityProps props;
	std::vector<SubscriptionConfig> subscriptions;
};

struct QueueConfig {
	std::string name;
	EntityProps props;
};

struct NamespaceConfig {
	std::string name = "sbemulatorns";
	std::vector<QueueConfig> queues;
	std::vector<TopicConfig> topics;
};

// Parses a Config.json text. Unknown keys are ignored (with a warning in `warnings`), so that a
// user's existing file works unchanged.
bool ParseConfig(const std::string &text, NamespaceConfig *out, std::string *err, std::vector<std::string> *warnings);
bool LoadConfigFile(const std::string &path, NamespaceConfig *out, std::string *err,
                    std::vector<std::string> *warnings);
// Checks what spans entities (ParseConfig does it; call it again after adding entities): no two
// entity names that differ only in case, no ForwardTo cycle.
bool ValidateNamespace(const NamespaceConfig &cfg, std::string *err);

} // namespace sbemu
