// test/fuzz/oracle.hpp
//   Reference checks the fuzzer compares sbpg's message decoding against, written independently
//   of src/message: strict UTF-8 (RFC 3629), what PostgreSQL's numeric type can store, and
//   "would jsonb_in accept this text" built on a RapidJSON DOM walked with an explicit stack.
#pragma once

#include "sbpg/core/json.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace oracle {

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
inline bool
StrictUtf8(std::string_view s) {
	const unsigned char *p = reinterpret_cast<const unsigned char *>(s.data());
	size_t n = s.size(), i = 0;
	while (i < n) {
		unsigned c = p[i];
		if (c < 0x80) {
			++i;
			continue;
		}
		unsigned need, cp;
		if (c >= 0xc2 && c <= 0xdf) {
			need = 1;
			cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			need = 2;
			cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			need = 3;
			cp = c & 0x07;
		} else {
			return false;
		}
		if (n - i <= need)
			return false;
		for (unsigned k = 1; k <= need; ++k) {
			if ((p[i + k] & 0xc0) != 0x80)
				return false;
			cp = (cp << 6) | (p[i + k] & 0x3f);
		}
		if ((need == 2 && cp < 0x800) || (need == 3 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += need + 1;
	}
	return true;
}

// Whether PostgreSQL 15's numeric_in accepts a JSON number (grammar already checked): decimal
// exponent magnitude below INT_MAX/2, display scale at most 16383, and for non-zero values the
// leading digit's decimal weight at most 131071 (32767 base-10000 digits).
inline bool
NumericFits(std::string_view num) {
	size_t i = 0;
	if (i < num.size() && num[i] == '-')
		++i;
	std::string digits; // integer then fraction digits
	long long int_len = 0, frac_len = 0;
	while (i < num.size() && num[i] >= '0' && num[i] <= '9') {
		digits.push_back(num[i++]);
		++int_len;
	}
	if (i < num.size() && num[i] == '.') {
		++i;
		while (i < num.size() && num[i] >= '0' && num[i] <= '9') {
			digits.push_back(num[i++]);
			++frac_len;
		}
	}
	long long exp = 0;
	if (i < num.size() && (num[i] == 'e' || num[i] == 'E')) {
		++i;
		bool neg = false;
		if (i < num.size() && (num[i] == '+' || num[i] == '-'))
			neg = num[i++] == '-';
		for (; i < num.size(); ++i) {
			if (exp < 10000000000LL)
				exp = exp * 10 + (num[i] - '0');
		}
		if (neg)
			exp = -exp;
	}
	if (exp >= 1073741823LL || exp <= -1073741823LL)
		return false;
	long long dscale = frac_len - exp;
	if (dscale > 16383)
		return false;
	size_t first = digits.find_first_not_of('0');
	if (first == std::string::npos)
		return true; // zero: no weight
	long long weight = int_len - 1 - static_cast<long long>(first) + exp;
	return weight <= 131071;
}

struct Verdict {
	bool valid = false;
	std::string why; // for messages only
};

// Would PostgreSQL's jsonb_in accept `text` (with nesting at most max_depth)?
inline Verdict
JsonbAccepts(std::string_view text, int max_depth) {
	Verdict v;
	if (text.empty()) {
		v.why = "empty";
		return v;
	}
	if (std::memchr(text.data(), '\0', text.size())) { // a C string ends there
		v.why = "NUL byte";
		return v;
	}
	if (!StrictUtf8(text)) {
		v.why = "invalid UTF-8";
		return v;
	}
	bool out_of_range = false;
	// RapidJSON refuses numbers beyond a double; jsonb takes them as numeric. Check every number
	// token here and hand RapidJSON a 0 in its place.
	std::string zeroed;
	{
		size_t i = 0;
		bool in_string = false;
		while (i < text.size()) {
			char c = text[i];
			if (in_string) {
				zeroed.push_back(c);
				if (c == '\\' && i + 1 < text.size())
					zeroed.push_back(text[++i]);
				else if (c == '"')
					in_string = false;
				++i;
				continue;
			}
			if (c == '"') {
				in_string = true;
				zeroed.push_back(c);
				++i;
				continue;
			}
			if (c != '-' && !(c >= '0' && c <= '9')) {
				zeroed.push_back(c);
				++i;
				continue;
			}
			size_t j = i;
			while (j < text.size() && ((text[j] >= '0' && text[j] <= '9') || text[j] == '-' || text[j] == '+' ||
			                           text[j] == '.' || text[j] == 'e' || text[j] == 'E'))
				++j;
			std::string_view tok = text.substr(i, j - i);
			// grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
			size_t k = 0;
			bool ok = true;
			auto run = [&] {
				size_t s0 = k;
				while (k < tok.size() && tok[k] >= '0' && tok[k] <= '9')
					++k;
				return k - s0;
			};
			if (k < tok.size() && tok[k] == '-')
				++k;
			if (k < tok.size() && tok[k] == '0')
				++k;
			else if (!run())
				ok = false;
			if (ok && k < tok.size() && tok[k] == '.') {
				++k;
				if (!run())
					ok = false;
			}
			if (ok && k < tok.size() && (tok[k] == 'e' || tok[k] == 'E')) {
				++k;
				if (k < tok.size() && (tok[k] == '+' || tok[k] == '-'))
					++k;
				if (!run())
					ok = false;
			}
			ok = ok && k == tok.size();
			if (ok && !NumericFits(tok))
				out_of_range = true;
			zeroed.append(ok ? std::string_view("0") : tok);
			i = j;
		}
	}
	rapidjson::Document doc;
	doc.Parse<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag |
	          rapidjson::kParseNumbersAsStringsFlag>(zeroed.data(), zeroed.size());
	if (doc.HasParseError()) {
		v.why = std::string("rapidjson: ") + rapidjson::GetParseError_En(doc.GetParseError());
		return v;
	}
	// Walk the tree without recursion: depth, strings (NUL, unpaired surrogates), numbers.
	struct Frame {
		const rapidjson::Value *val;
		int depth;
	};
	std::vector<Frame> stack{{&doc, 0}};
	auto text_ok = [&](const rapidjson::Value &s) {
		std::string_view sv(s.GetString(), s.GetStringLength());
		if (sv.find('\0') != std::string_view::npos) {
			v.why = "\\u0000";
			return false;
		}
		if (!StrictUtf8(sv)) {
			v.why = "unpaired surrogate";
			return false;
		}
		return true;
	};
	while (!stack.empty()) {
		Frame f = stack.back();
		stack.pop_back();
		const rapidjson::Value &x = *f.val;
		if (x.IsArray() || x.IsObject()) {
			if (f.depth + 1 > max_depth) {
				v.why = "too deep";
				return v;
			}
			if (x.IsArray()) {
				for (auto &e : x.GetArray())
					stack.push_back({&e, f.depth + 1});
			} else {
				for (auto &m : x.GetObject()) {
					if (!text_ok(m.name))
						return v;
					stack.push_back({&m.value, f.depth + 1});
				}
			}
		} else if (x.IsString()) { // numbers too (kParseNumbersAsStringsFlag); they are ASCII
			if (!text_ok(x))
				return v;
		}
	}
	if (out_of_range) {
		v.why = "number out of numeric range";
		return v;
	}
	v.valid = true;
	return v;
}

} // namespace oracle
