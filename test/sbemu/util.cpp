// sbemu/util.cpp
//   Clock, logging and text helpers of the emulator.
#include "util.hpp"

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>

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

} // namespace sbemu
