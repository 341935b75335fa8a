// sbemu/util.hpp
//   Small shared helpers of the Service Bus emulator: clock, logging, text codecs
//   (base64, URL, hex), GUIDs and ISO-8601 durations.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sbemu {

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

std::string ToLower(std::string_view s);
bool IEquals(std::string_view a, std::string_view b);
bool IStartsWith(std::string_view s, std::string_view prefix);
std::vector<std::string> Split(std::string_view s, char sep);

std::string Base64Encode(std::string_view data);
// Accepts standard and URL-safe alphabets, with or without padding.
bool Base64Decode(std::string_view text, std::string *out);
std::string UrlEncode(std::string_view s);   // RFC 3986 unreserved kept, rest %XX
bool UrlDecode(std::string_view s, std::string *out); // '+' is kept as '+'
std::string HexEncode(std::string_view data);

// 16 random bytes (a lock token / delivery tag).
void RandomBytes(uint8_t *out, size_t n);
// A GUID in canonical text form, from 16 bytes in network (RFC 4122) order.
std::string UuidString(const uint8_t bytes[16]);
// Reorders 16 bytes between .NET's in-memory GUID layout and RFC 4122 order
// (bytes 0-3 reversed, 4-5 and 6-7 swapped). The operation is its own inverse.
void DotNetGuidSwap(const uint8_t in[16], uint8_t out[16]);
std::string NewGuid();

// ISO-8601 durations as Service Bus writes them ("PT1M", "P14D", "P10675199DT2H48M5.4775807S"),
// and .NET TimeSpan text ("00:01:00", "1.00:00:00"). Result in milliseconds, saturating.
bool ParseDuration(std::string_view text, int64_t *ms);
std::string FormatDuration(int64_t ms);
// RFC 3339 UTC text for a millisecond timestamp.
std::string FormatTime(int64_t ms);

// A string is valid UTF-8 (used to decide whether a body is shown as text).
bool IsValidUtf8(std::string_view s);
std::string JsonEscape(std::string_view s);

constexpr int64_t kNever = INT64_MAX;

} // namespace sbemu
