// src/core/text.cpp
//   Text helpers shared by the extension and the emulator.
#include "sbpg/core/text.hpp"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <random>

#include <fcntl.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

namespace sbpg {

std::string
ToLower(std::string_view s) {
	std::string r(s);
	for (auto &c : r)
		if (c >= 'A' && c <= 'Z')
			c = static_cast<char>(c - 'A' + 'a');
	return r;
}

bool
IEquals(std::string_view a, std::string_view b) {
	if (a.size() != b.size())
		return false;
	for (size_t i = 0; i < a.size(); ++i) {
		char x = a[i], y = b[i];
		if (x >= 'A' && x <= 'Z')
			x = static_cast<char>(x - 'A' + 'a');
		if (y >= 'A' && y <= 'Z')
			y = static_cast<char>(y - 'A' + 'a');
		if (x != y)
			return false;
	}
	return true;
}

bool
IStartsWith(std::string_view s, std::string_view prefix) {
	return s.size() >= prefix.size() && IEquals(s.substr(0, prefix.size()), prefix);
}

std::vector<std::string>
Split(std::string_view s, char sep) {
	std::vector<std::string> out;
	size_t start = 0;
	for (;;) {
		size_t pos = s.find(sep, start);
		out.emplace_back(s.substr(start, pos == std::string_view::npos ? std::string_view::npos : pos - start));
		if (pos == std::string_view::npos)
			break;
		start = pos + 1;
	}
	return out;
}

std::string
Base64Encode(std::string_view data) {
	static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	std::string out;
	out.reserve((data.size() + 2) / 3 * 4);
	size_t i = 0;
	for (; i + 2 < data.size(); i += 3) {
		uint32_t v = (uint8_t(data[i]) << 16) | (uint8_t(data[i + 1]) << 8) | uint8_t(data[i + 2]);
		out += tbl[(v >> 18) & 63];
		out += tbl[(v >> 12) & 63];
		out += tbl[(v >> 6) & 63];
		out += tbl[v & 63];
	}
	if (i + 1 == data.size()) {
		uint32_t v = uint8_t(data[i]) << 16;
		out += tbl[(v >> 18) & 63];
		out += tbl[(v >> 12) & 63];
		out += "==";
	} else if (i + 2 == data.size()) {
		uint32_t v = (uint8_t(data[i]) << 16) | (uint8_t(data[i + 1]) << 8);
		out += tbl[(v >> 18) & 63];
		out += tbl[(v >> 12) & 63];
		out += tbl[(v >> 6) & 63];
		out += '=';
	}
	return out;
}

bool
Base64Decode(std::string_view text, std::string *out) {
	out->clear();
	uint32_t acc = 0;
	int bits = 0;
	for (char c : text) {
		int v;
		if (c >= 'A' && c <= 'Z')
			v = c - 'A';
		else if (c >= 'a' && c <= 'z')
			v = c - 'a' + 26;
		else if (c >= '0' && c <= '9')
			v = c - '0' + 52;
		else if (c == '+' || c == '-')
			v = 62;
		else if (c == '/' || c == '_')
			v = 63;
		else if (c == '=')
			break;
		else
			return false;
		acc = (acc << 6) | static_cast<uint32_t>(v);
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out->push_back(static_cast<char>((acc >> bits) & 0xff));
		}
	}
	return true;
}

std::string
UrlEncode(std::string_view s) {
	static const char hex[] = "0123456789ABCDEF";
	std::string out;
	for (unsigned char c : s) {
		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
		    c == '.' || c == '~') {
			out += static_cast<char>(c);
		} else {
			out += '%';
			out += hex[c >> 4];
			out += hex[c & 15];
		}
	}
	return out;
}

bool
UrlDecode(std::string_view s, std::string *out) {
	out->clear();
	for (size_t i = 0; i < s.size(); ++i) {
		if (s[i] == '%') {
			if (i + 2 >= s.size())
				return false;
			auto hv = [](char c) -> int {
				if (c >= '0' && c <= '9')
					return c - '0';
				if (c >= 'a' && c <= 'f')
					return c - 'a' + 10;
				if (c >= 'A' && c <= 'F')
					return c - 'A' + 10;
				return -1;
			};
			int h = hv(s[i + 1]), l = hv(s[i + 2]);
			if (h < 0 || l < 0)
				return false;
			out->push_back(static_cast<char>(h * 16 + l));
			i += 2;
		} else {
			out->push_back(s[i]);
		}
	}
	return true;
}

std::string
HexEncode(std::string_view data) {
	static const char hex[] = "0123456789abcdef";
	std::string out;
	out.reserve(data.size() * 2);
	for (unsigned char c : data) {
		out += hex[c >> 4];
		out += hex[c & 15];
	}
	return out;
}

void
RandomBytes(uint8_t *out, size_t n) {
	// A per-thread generator seeded from the OS: lock tokens must be unguessable enough for tests
	// and unique, not cryptographically strong.
	thread_local std::mt19937_64 gen([] {
		uint64_t seed = 0;
		int fd = ::open("/dev/urandom", O_RDONLY);
		if (fd >= 0) {
			if (::read(fd, &seed, sizeof seed) != static_cast<ssize_t>(sizeof seed))
				seed = 0;
			::close(fd);
		}
		return seed ^ static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
		       reinterpret_cast<uintptr_t>(&seed);
	}());
	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = gen();
		std::memcpy(out + i, &v, n - i < 8 ? n - i : 8);
	}
}

std::string
UuidString(const uint8_t b[16]) {
	char buf[37];
	std::snprintf(buf, sizeof buf, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
	              b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
	return buf;
}

void
DotNetGuidSwap(const uint8_t in[16], uint8_t out[16]) {
	uint8_t t[16];
	t[0] = in[3];
	t[1] = in[2];
	t[2] = in[1];
	t[3] = in[0];
	t[4] = in[5];
	t[5] = in[4];
	t[6] = in[7];
	t[7] = in[6];
	std::memcpy(t + 8, in + 8, 8);
	std::memcpy(out, t, 16);
}

std::string
NewGuid() {
	uint8_t b[16];
	RandomBytes(b, 16);
	b[6] = (b[6] & 0x0f) | 0x40;
	b[8] = (b[8] & 0x3f) | 0x80;
	return UuidString(b);
}

std::string
FormatTime(int64_t ms) {
	if (ms == INT64_MAX)
		return "never";
	time_t secs = static_cast<time_t>(ms / 1000);
	struct tm tmv;
	gmtime_r(&secs, &tmv);
	char buf[64];
	std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tmv.tm_year + 1900, tmv.tm_mon + 1,
	              tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec, static_cast<int>(ms % 1000));
	return buf;
}

bool
IsValidUtf8(std::string_view s) {
	size_t i = 0;
	while (i < s.size()) {
		unsigned char c = static_cast<unsigned char>(s[i]);
		size_t n;
		if (c < 0x80)
			n = 0;
		else if ((c & 0xe0) == 0xc0 && c >= 0xc2)
			n = 1;
		else if ((c & 0xf0) == 0xe0)
			n = 2;
		else if ((c & 0xf8) == 0xf0 && c <= 0xf4)
			n = 3;
		else
			return false;
		if (n > 0 && i + n >= s.size())
			return false;
		for (size_t k = 1; k <= n; ++k)
			if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80)
				return false;
		i += n + 1;
	}
	return true;
}

namespace {

bool
IsContinuation(unsigned char c) {
	return (c & 0xc0) == 0x80;
}

// How many bytes a character starting with c has by its bit pattern alone (1 for ASCII, 0 for a
// continuation byte or 0xF8..0xFF).
size_t
LeadLength(unsigned char c) {
	return c < 0x80 ? 1 : c < 0xc0 ? 0 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf8 ? 4 : 0;
}

// Looks at the bytes p[0..avail). Returns the length of the well-formed character starting there
// (1..4), or 0 when there is none; then *bad is the length of the maximal subpart to replace: the
// lead byte and the continuation bytes after it that still fit a valid character (at least 1).
size_t
ScanUtf8(const unsigned char *p, size_t avail, size_t *bad) {
	unsigned c = p[0];
	*bad = 1;
	if (c < 0x80)
		return 1;
	size_t n;                      // bytes in the character
	unsigned lo = 0x80, hi = 0xbf; // the range the second byte must fall in
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		if (c == 0xe0)
			lo = 0xa0; // below: overlong
		else if (c == 0xed)
			hi = 0x9f; // above: UTF-16 surrogates
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		if (c == 0xf0)
			lo = 0x90; // below: overlong
		else if (c == 0xf4)
			hi = 0x8f; // above: past U+10FFFF
	} else {
		return 0; // a continuation byte on its own, C0, C1 or F5..FF
	}
	for (size_t k = 1; k < n; ++k) {
		if (k >= avail)
			return 0; // cut short: *bad covers what there is
		unsigned b = p[k];
		if (k == 1 ? (b < lo || b > hi) : !IsContinuation(static_cast<unsigned char>(b)))
			return 0; // p[k] starts the next attempt
		*bad = k + 1;
	}
	return n;
}

} // namespace

bool
IsStrictUtf8(std::string_view s) {
	const unsigned char *p = reinterpret_cast<const unsigned char *>(s.data());
	size_t i = 0, bad;
	while (i < s.size()) {
		size_t n = ScanUtf8(p + i, s.size() - i, &bad);
		if (n == 0)
			return false;
		i += n;
	}
	return true;
}

std::string
ToValidUtf8(std::string_view s, bool *changed) {
	const unsigned char *p = reinterpret_cast<const unsigned char *>(s.data());
	std::string out;
	out.reserve(s.size());
	bool replaced = false;
	size_t i = 0, bad;
	while (i < s.size()) {
		size_t n = ScanUtf8(p + i, s.size() - i, &bad);
		if (n == 0 || p[i] == 0) {
			out += "\xEF\xBF\xBD";
			replaced = true;
			i += n ? n : bad;
		} else {
			out.append(s.data() + i, n);
			i += n;
		}
	}
	if (changed)
		*changed = replaced;
	return out;
}

size_t
Utf8Prefix(std::string_view s, size_t max_bytes) {
	if (max_bytes >= s.size())
		return s.size();
	// s[max_bytes] is the first byte left out. If it continues a character, step back to that
	// character's lead byte (at most three steps in UTF-8) and end before it.
	size_t k = 0;
	while (k <= 3 && k <= max_bytes && IsContinuation(static_cast<unsigned char>(s[max_bytes - k])))
		++k;
	if (k == 0 || k > 3 || k > max_bytes)
		return max_bytes; // on a boundary, or no lead byte in reach (not UTF-8)
	size_t start = max_bytes - k;
	return LeadLength(static_cast<unsigned char>(s[start])) > k ? start : max_bytes;
}

void
ClipUtf8(char *buf) {
	size_t n = std::strlen(buf);
	// Trailing continuation bytes, then the byte before them: a lead byte that needs more bytes
	// than follow it starts the partial character.
	size_t k = 0;
	while (k < 3 && k < n && IsContinuation(static_cast<unsigned char>(buf[n - 1 - k])))
		++k;
	if (k == n)
		return;
	size_t lead = n - 1 - k;
	if (LeadLength(static_cast<unsigned char>(buf[lead])) > k + 1)
		buf[lead] = '\0';
}

void
CopyUtf8(char *dst, const char *src, size_t size) {
	if (size == 0)
		return;
	size_t len = strnlen(src, size);
	if (len == size) // too long: keep at most size - 1 bytes, ending on a boundary
		len = Utf8Prefix(std::string_view(src, size), size - 1);
	std::memcpy(dst, src, len);
	dst[len] = '\0';
}

std::string
JsonEscape(std::string_view s) {
	std::string out;
	out.reserve(s.size() + 2);
	for (unsigned char c : s) {
		switch (c) {
		case '"':
			out += "\\\"";
			break;
		case '\\':
			out += "\\\\";
			break;
		case '\n':
			out += "\\n";
			break;
		case '\r':
			out += "\\r";
			break;
		case '\t':
			out += "\\t";
			break;
		default:
			if (c < 0x20) {
				char buf[8];
				std::snprintf(buf, sizeof buf, "\\u%04x", c);
				out += buf;
			} else {
				out += static_cast<char>(c);
			}
		}
	}
	return out;
}

std::string
HmacSha256(std::string_view key, std::string_view data) {
	unsigned char out[EVP_MAX_MD_SIZE];
	unsigned int len = 0;
	HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char *>(data.data()),
	     data.size(), out, &len);
	return std::string(reinterpret_cast<char *>(out), len);
}

int64_t
WallMs() {
	using namespace std::chrono;
	return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

} // namespace sbpg
