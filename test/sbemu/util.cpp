// sbemu/util.cpp
//   Clock, logging and text helpers of the emulator.
#include "util.hpp"

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <random>

#include <fcntl.h>
#include <unistd.h>

namespace sbemu {

int64_t
NowMs() {
	using namespace std::chrono;
	return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

int64_t
MonoMs() {
	using namespace std::chrono;
	return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

namespace {
LogLevel g_level = LogLevel::Info;
FILE *g_log = nullptr; // stderr when null
std::mutex g_log_mutex;
const char *const kLevelNames[] = {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"};
} // namespace

void
SetLogLevel(LogLevel level) {
	g_level = level;
}

bool
SetLogFile(const std::string &path, std::string *err) {
	FILE *f = std::fopen(path.c_str(), "a");
	if (!f) {
		*err = "cannot open log file " + path + ": " + std::strerror(errno);
		return false;
	}
	setvbuf(f, nullptr, _IOLBF, 0);
	g_log = f;
	return true;
}

bool
ParseLogLevel(std::string_view text, LogLevel *out) {
	std::string t = ToLower(text);
	for (int i = 0; i <= 4; ++i) {
		if (t == ToLower(kLevelNames[i]) || (i == 1 && t == "warning")) {
			*out = static_cast<LogLevel>(i);
			return true;
		}
	}
	return false;
}

bool
LogEnabled(LogLevel level) {
	return level <= g_level;
}

void
Log(LogLevel level, const char *fmt, ...) {
	char msg[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	std::string ts = FormatTime(NowMs());
	std::lock_guard<std::mutex> guard(g_log_mutex);
	std::fprintf(g_log ? g_log : stderr, "%s sbemu %s: %s\n", ts.c_str(), kLevelNames[static_cast<int>(level)], msg);
}

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
		return seed ^ static_cast<uint64_t>(MonoMs()) ^ reinterpret_cast<uintptr_t>(&seed);
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

namespace {
int64_t
SatAdd(int64_t a, int64_t b) {
	if (b > 0 && a > INT64_MAX - b)
		return INT64_MAX;
	return a + b;
}
int64_t
SatMul(int64_t a, double factor) {
	double r = static_cast<double>(a) * factor;
	if (r >= 9.2e18)
		return INT64_MAX;
	return static_cast<int64_t>(r);
}
} // namespace

bool
ParseDuration(std::string_view text, int64_t *ms) {
	if (text.empty())
		return false;
	if (text[0] == 'P' || text[0] == 'p') {
		int64_t total = 0;
		bool in_time = false, any = false;
		size_t i = 1;
		while (i < text.size()) {
			if (text[i] == 'T' || text[i] == 't') {
				in_time = true;
				++i;
				continue;
			}
			size_t start = i;
			while (i < text.size() && ((text[i] >= '0' && text[i] <= '9') || text[i] == '.' || text[i] == ','))
				++i;
			if (start == i || i >= text.size())
				return false;
			std::string num(text.substr(start, i - start));
			for (auto &c : num)
				if (c == ',')
					c = '.';
			double v = std::strtod(num.c_str(), nullptr);
			char unit = static_cast<char>(text[i] & ~0x20); // upper case
			double factor;
			if (!in_time && unit == 'Y')
				factor = 365.0 * 86400000.0;
			else if (!in_time && unit == 'M')
				factor = 30.0 * 86400000.0;
			else if (!in_time && unit == 'W')
				factor = 7.0 * 86400000.0;
			else if (!in_time && unit == 'D')
				factor = 86400000.0;
			else if (in_time && unit == 'H')
				factor = 3600000.0;
			else if (in_time && unit == 'M')
				factor = 60000.0;
			else if (in_time && unit == 'S')
				factor = 1000.0;
			else
				return false;
			total = SatAdd(total, SatMul(1, v * factor));
			any = true;
			++i;
		}
		if (!any)
			return false;
		*ms = total;
		return true;
	}
	// .NET TimeSpan: [d.]hh:mm:ss[.fffffff]
	int64_t days = 0;
	std::string_view rest = text;
	size_t colon = rest.find(':');
	if (colon == std::string_view::npos)
		return false;
	size_t dot = rest.substr(0, colon).find('.');
	if (dot != std::string_view::npos) {
		days = std::strtoll(std::string(rest.substr(0, dot)).c_str(), nullptr, 10);
		rest = rest.substr(dot + 1);
	}
	auto parts = Split(rest, ':');
	if (parts.size() != 3)
		return false;
	double h = std::strtod(parts[0].c_str(), nullptr), m = std::strtod(parts[1].c_str(), nullptr),
	       s = std::strtod(parts[2].c_str(), nullptr);
	int64_t total = SatMul(1, days * 86400000.0);
	total = SatAdd(total, SatMul(1, h * 3600000.0 + m * 60000.0 + s * 1000.0));
	*ms = total;
	return true;
}

std::string
FormatDuration(int64_t ms) {
	if (ms >= INT64_MAX / 2)
		return "infinite";
	char buf[64];
	if (ms % 1000 == 0)
		std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(ms / 1000));
	else
		std::snprintf(buf, sizeof buf, "%lldms", static_cast<long long>(ms));
	return buf;
}

std::string
FormatTime(int64_t ms) {
	if (ms == kNever)
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

} // namespace sbemu
