// sbpg/core/text.hpp
//   Text and byte helpers shared by the extension's pure C++ parts and the emulator: case-folding,
//   base64, URL encoding, GUIDs, RFC 3339 time, UTF-8 checks, JSON escaping, HMAC-SHA256.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sbpg {

std::string ToLower(std::string_view s);
bool IEquals(std::string_view a, std::string_view b);
bool IStartsWith(std::string_view s, std::string_view prefix);
std::vector<std::string> Split(std::string_view s, char sep);

std::string Base64Encode(std::string_view data);
// Accepts standard and URL-safe alphabets, with or without padding.
bool Base64Decode(std::string_view text, std::string *out);
std::string UrlEncode(std::string_view s);             // RFC 3986 unreserved kept, the rest %XX
bool UrlDecode(std::string_view s, std::string *out); // '+' stays '+'
std::string HexEncode(std::string_view data);

// Random bytes for tags and identifiers (unique, not for keys).
void RandomBytes(uint8_t *out, size_t n);
// A GUID in canonical text form, from 16 bytes in network (RFC 4122) order.
std::string UuidString(const uint8_t bytes[16]);
// Reorders 16 bytes between .NET's in-memory GUID layout and RFC 4122 order
// (bytes 0-3 reversed, 4-5 and 6-7 swapped). The operation is its own inverse.
void DotNetGuidSwap(const uint8_t in[16], uint8_t out[16]);
std::string NewGuid();

// RFC 3339 UTC text for a millisecond timestamp ("never" for INT64_MAX).
std::string FormatTime(int64_t ms);
// Milliseconds since the Unix epoch.
int64_t WallMs();

bool IsValidUtf8(std::string_view s);
// Escapes for the inside of a JSON string (no surrounding quotes).
std::string JsonEscape(std::string_view s);

std::string HmacSha256(std::string_view key, std::string_view data);

} // namespace sbpg
