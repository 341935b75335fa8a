// sbpg/core/text.hpp
//   Text and byte helpers shared by the extension's pure C++ parts and the emulator: case-folding,
//   base64, URL encoding, GUIDs, RFC 3339 time, UTF-8 checks, JSON escaping, HMAC-SHA256.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

std::string ToLower(std::string_view s);
bool IEquals(std::string_view a, std::string_view b);
bool IStartsWith(std::string_view s, std::string_view prefix);
std::vector<std::string> Split(std::string_view s, char sep);

std::string Base64Encode(std::string_view data);
// Accepts standard and URL-safe alphabets, with or without padding.
bool Base64Decode(std::string_view text, std::string *out);
std::string UrlEncode(std::string_view s);            // RFC 3986 unreserved kept, the rest %XX
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

// Byte pattern only (lead and continuation bytes line up); see IsStrictUtf8 for what PostgreSQL
// accepts.
bool IsValidUtf8(std::string_view s);
// RFC 3629 UTF-8 exactly as PostgreSQL verifies it: no overlong forms (C0, C1, E0 80..9F,
// F0 80..8F), no UTF-16 surrogates (ED A0..BF), nothing past U+10FFFF (F4 90.., F5..FF), no
// sequence cut short. NUL bytes are well-formed UTF-8 here; PostgreSQL text refuses them, so
// callers that store text check for them too (ToValidUtf8 does).
bool IsStrictUtf8(std::string_view s);
// s made valid for PostgreSQL text: every ill-formed sequence and every NUL byte is replaced by
// U+FFFD (EF BF BD); well-formed characters are kept as they are. Replacement follows Unicode's
// "substitution of maximal subparts" (the WHATWG decoder's behaviour): a lead byte followed by as
// many bytes as can still begin a valid character becomes one U+FFFD, and decoding resumes at the
// first byte that does not fit, so "E1 80 41" gives U+FFFD "A", while each byte that can never
// start a character (80..BF alone, C0, C1, F5..FF) and each NUL becomes a U+FFFD of its own.
// *changed (when given) tells whether anything was replaced.
std::string ToValidUtf8(std::string_view s, bool *changed = nullptr);
// The largest length <= max_bytes that does not end inside a multi-byte character of s (s is
// valid UTF-8; for other input the result is only as good as the bytes). s.size() when it fits.
size_t Utf8Prefix(std::string_view s, size_t max_bytes);
// Removes an incomplete multi-byte character from the end of a NUL-terminated buffer, as left by
// strlcpy or snprintf cutting valid UTF-8 text to the buffer's size. Only the trailing partial
// sequence goes; the rest is left as it is.
void ClipUtf8(char *buf);
// strlcpy that never cuts a character: copies as much of the NUL-terminated src as fits in size
// bytes with the terminator, ending on a character boundary. Always NUL-terminates when size > 0.
void CopyUtf8(char *dst, const char *src, size_t size);
// Escapes for the inside of a JSON string (no surrounding quotes).
std::string JsonEscape(std::string_view s);

std::string HmacSha256(std::string_view key, std::string_view data);

} // namespace sbpg
