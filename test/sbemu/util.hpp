// sbemu/util.hpp
//   Small shared helpers of the Service Bus emulator: clock, logging, text codecs
//   (base64, URL, hex), GUIDs and ISO-8601 durations.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "sbpg/core/text.hpp"

namespace sbemu {

// The shared helpers (text, codec) live in namespace sbpg.
using namespace ::sbpg;

// Milliseconds since the Unix epoch (wall clock, as AMQP timestamps are).
int64_t NowMs();
// Monotonic milliseconds, for deadlines that must not jump with the wall clock.
int64_t MonoMs();

enum class LogLevel { Error = 0, Warn = 1, Info = 2, Debug = 3, Trace = 4 };
void SetLogLevel(LogLevel level);
bool SetLogFile(const std::string &path, std::string *err);
bool ParseLogLevel(std::string_view text, LogLevel *out);
bool LogEnabled(LogLevel level);
void Log(LogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define SBEMU_LOG(level, ...)                                                                                          \
	do {                                                                                                               \
		if (::sbemu::LogEnabled(level))                                                                                \
			::sbemu::Log(level, __VA_ARGS__);                                                                          \
	} while (0)
#define LOG_ERROR(...) SBEMU_LOG(::sbemu::LogLevel::Error, __VA_ARGS__)
#define LOG_WARN(...) SBEMU_LOG(::sbemu::LogLevel::Warn, __VA_ARGS__)
#define LOG_INFO(...) SBEMU_LOG(::sbemu::LogLevel::Info, __VA_ARGS__)
#define LOG_DEBUG(...) SBEMU_LOG(::sbemu::LogLevel::Debug, __VA_ARGS__)

// ISO-8601 durations as Service Bus writes them ("PT1M", "P14D", "P10675199DT2H48M5.4775807S"),
// and .NET TimeSpan text ("00:01:00", "1.00:00:00"). Result in milliseconds, saturating.
bool ParseDuration(std::string_view text, int64_t *ms);
std::string FormatDuration(int64_t ms);

constexpr int64_t kNever = INT64_MAX;

} // namespace sbemu
