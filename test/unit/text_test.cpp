// test/unit/text_test.cpp
//   Unit tests of the UTF-8 helpers in src/core/text.cpp: IsStrictUtf8 (what PostgreSQL accepts),
//   ToValidUtf8 (U+FFFD for each maximal ill-formed subpart and each NUL), and cutting text on a
//   character boundary (Utf8Prefix, ClipUtf8, CopyUtf8, FixedText). Also the latency histogram of
//   the per-minute history (sbpg/core/histogram.hpp).
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/core/text.hpp"

#include "tap.hpp"

#include <cstdio>
#include <cstring>

using namespace sbpg;

namespace {

const std::string kFffd = "\xEF\xBF\xBD";

// ToValidUtf8 with the changed flag checked against what is expected.
std::string
Fix(const std::string &in, bool expect_changed) {
	bool changed = !expect_changed;
	std::string out = ToValidUtf8(in, &changed);
	if (changed != expect_changed)
		tap::Fail(__FILE__, __LINE__, "changed flag wrong for input of " + std::to_string(in.size()) + " bytes");
	if (!IsStrictUtf8(out) || out.find('\0') != std::string::npos)
		tap::Fail(__FILE__, __LINE__, "output is not valid text");
	return out;
}

// Printable form for failure messages: bytes >= 0x80 as \xHH.
std::string
Show(const std::string &s) {
	std::string r;
	for (unsigned char c : s) {
		if (c >= 0x20 && c < 0x7f) {
			r += static_cast<char>(c);
		} else {
			char b[8];
			std::snprintf(b, sizeof b, "\\x%02X", c);
			r += b;
		}
	}
	return r;
}

#define CHECK_FIX(in, changed, want) CHECK_EQ(Show(Fix(in, changed)), Show(want))

} // namespace

TEST("IsStrictUtf8 takes what PostgreSQL takes") {
	CHECK(IsStrictUtf8(""));
	CHECK(IsStrictUtf8("plain ASCII"));
	CHECK(IsStrictUtf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xED\x9F\xBF \xEE\x80\x80 \xF4\x8F\xBF\xBF"));
	CHECK(IsStrictUtf8(std::string("a\0b", 3))); // NUL is UTF-8; text columns refuse it separately
	for (const char *bad : {"\xC0\x80", "\xC1\xBF", "\xE0\x80\x80", "\xE0\x9F\xBF", "\xED\xA0\x80", "\xED\xBF\xBF",
	                        "\xF0\x80\x80\x80", "\xF0\x8F\xBF\xBF", "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xFF",
	                        "\x80", "\xC3", "\xE2\x82", "\xF0\x9F\x98",
	                        "a\xC3"
	                        "b"})
		CHECK(!IsStrictUtf8(bad));
}

TEST("ToValidUtf8 leaves valid text as it is") {
	for (const char *ok : {"", "plain", "caf\xC3\xA9", "\xE2\x82\xAC\xF0\x9F\x98\x80", "\xED\x9F\xBF\xEE\x80\x80",
	                       "\xF4\x8F\xBF\xBF", "\xEF\xBF\xBD already a replacement"})
		CHECK_FIX(ok, false, ok);
	CHECK_EQ(ToValidUtf8("no flag asked"), std::string("no flag asked"));
}

TEST("ToValidUtf8 replaces overlong forms, surrogates and code points past U+10FFFF") {
	// C0 and C1 can never start a character: each byte is a subpart of its own.
	CHECK_FIX("a\xC0\x80z", true, "a" + kFffd + kFffd + "z");
	// E0 needs A0..BF next, so 80 is not part of it.
	CHECK_FIX("a\xE0\x80\x80z", true, "a" + kFffd + kFffd + kFffd + "z");
	CHECK_FIX("\xF0\x80\x80\x80", true, kFffd + kFffd + kFffd + kFffd);
	CHECK_FIX("\xED\xA0\x80", true, kFffd + kFffd + kFffd);             // U+D800
	CHECK_FIX("x\xED\xBF\xBF", true, "x" + kFffd + kFffd + kFffd);      // U+DFFF
	CHECK_FIX("\xF4\x90\x80\x80", true, kFffd + kFffd + kFffd + kFffd); // U+110000
	CHECK_FIX("\xF5\x80\x80\x80", true, kFffd + kFffd + kFffd + kFffd);
}

TEST("ToValidUtf8 replaces a truncated sequence with one U+FFFD, at the end or in the middle") {
	CHECK_FIX("ab\xC3", true, "ab" + kFffd);
	CHECK_FIX("ab\xE2\x82", true, "ab" + kFffd);
	CHECK_FIX("ab\xF0\x9F\x98", true, "ab" + kFffd);
	CHECK_FIX("\xE2\x82"
	          "A",
	          true, kFffd + "A");                                // the byte that does not fit starts afresh
	CHECK_FIX("\xF0\x9F\x98\xC3\xA9", true, kFffd + "\xC3\xA9"); // and may be a valid character itself
	CHECK_FIX("\xE1\x80\xE2\x82\xAC", true, kFffd + "\xE2\x82\xAC");
	CHECK_FIX("\xC3\xC3\xA9", true, kFffd + "\xC3\xA9");
}

TEST("ToValidUtf8 replaces lone continuation bytes, FF FE and NUL one byte at a time") {
	CHECK_FIX("\x80", true, kFffd);
	CHECK_FIX("a\x80\xBF"
	          "b",
	          true, "a" + kFffd + kFffd + "b");
	CHECK_FIX("\xC3\xA9\xA9", true, "\xC3\xA9" + kFffd);
	CHECK_FIX("\xFF\xFE", true, kFffd + kFffd);
	CHECK_FIX("\xFE\xFF"
	          "a",
	          true, kFffd + kFffd + "a");
	CHECK_FIX(std::string("a\0b", 3), true, "a" + kFffd + "b");
	CHECK_FIX(std::string("\0\0", 2), true, kFffd + kFffd);
}

TEST("Utf8Prefix never ends inside a 2-, 3- or 4-byte character") {
	const std::string s2 = "ab\xC3\xA9", s3 = "ab\xE2\x82\xAC", s4 = "ab\xF0\x9F\x98\x80";
	CHECK_EQ(Utf8Prefix(s2, 100), s2.size());
	CHECK_EQ(Utf8Prefix(s2, 4), size_t(4));
	CHECK_EQ(Utf8Prefix(s2, 3), size_t(2));
	CHECK_EQ(Utf8Prefix(s2, 2), size_t(2));
	CHECK_EQ(Utf8Prefix(s3, 4), size_t(2));
	CHECK_EQ(Utf8Prefix(s3, 3), size_t(2));
	CHECK_EQ(Utf8Prefix(s3, 5), size_t(5));
	for (size_t n = 2; n < 6; ++n)
		CHECK_EQ(Utf8Prefix(s4, n), size_t(2));
	CHECK_EQ(Utf8Prefix(s4, 6), size_t(6));
	CHECK_EQ(Utf8Prefix("\xC3\xA9", 1), size_t(0));
	CHECK_EQ(Utf8Prefix("\xC3\xA9", 0), size_t(0));
	CHECK_EQ(Utf8Prefix("", 0), size_t(0));
	CHECK_EQ(Utf8Prefix("abc", 1), size_t(1));
}

TEST("CopyUtf8 copies like strlcpy but ends on a character boundary") {
	char buf[8];
	struct Case {
		const char *src;
		size_t size;
		const char *want;
	} cases[] = {
	    {"ab\xC3\xA9", 4, "ab"},         // room for 3 bytes: the 2-byte character does not fit
	    {"ab\xC3\xA9", 5, "ab\xC3\xA9"}, // exactly fits
	    {"ab\xE2\x82\xAC", 5, "ab"},     // 3-byte character, one byte short
	    {"ab\xE2\x82\xAC", 4, "ab"},
	    {"ab\xE2\x82\xAC", 6, "ab\xE2\x82\xAC"},
	    {"ab\xF0\x9F\x98\x80", 6, "ab"}, // 4-byte character, one byte short
	    {"ab\xF0\x9F\x98\x80", 4, "ab"},
	    {"ab\xF0\x9F\x98\x80", 7, "ab\xF0\x9F\x98\x80"},
	    {"abcdefghij", 8, "abcdefg"},
	    {"\xC3\xA9", 2, ""},
	    {"", 1, ""},
	};
	for (const Case &c : cases) {
		std::memset(buf, 'x', sizeof buf);
		CopyUtf8(buf, c.src, c.size);
		CHECK_EQ(Show(buf), Show(c.want));
	}
	buf[0] = 'x';
	CopyUtf8(buf, "abc", 0); // nothing written
	CHECK_EQ(buf[0], 'x');
}

TEST("ClipUtf8 removes the partial character strlcpy/snprintf left at the end") {
	struct Case {
		const char *cut;
		const char *want;
	} cases[] = {
	    {"ab\xC3", "ab"}, // 2-byte character, lead byte only
	    {"ab\xE2", "ab"},
	    {"ab\xE2\x82", "ab"}, // 3-byte
	    {"ab\xF0", "ab"},
	    {"ab\xF0\x9F", "ab"},
	    {"ab\xF0\x9F\x98", "ab"}, // 4-byte
	    {"ab\xC3\xA9", "ab\xC3\xA9"},
	    {"ab\xE2\x82\xAC", "ab\xE2\x82\xAC"},
	    {"ab\xF0\x9F\x98\x80", "ab\xF0\x9F\x98\x80"},
	    {"abc", "abc"},
	    {"", ""},
	    {"\xC3", ""},
	};
	for (const Case &c : cases) {
		char buf[16];
		std::snprintf(buf, sizeof buf, "%s", c.cut);
		ClipUtf8(buf);
		CHECK_EQ(Show(buf), Show(c.want));
	}
	// As used: snprintf into a small buffer, then clip.
	char small[6];
	std::snprintf(small, sizeof small, "id %s", "\xE2\x82\xAC\xE2\x82\xAC"); // "id " + 2 of 3 bytes
	ClipUtf8(small);
	CHECK_EQ(std::string(small), std::string("id "));
}

TEST("FixedText cuts on a character boundary when set or appended past its size") {
	FixedText<8> t;              // 7 bytes of text
	t.Set("abcdef\xE2\x82\xAC"); // "abcdef" + a 3-byte character: only "abcdef" fits
	CHECK_EQ(Show(t.str()), Show("abcdef"));
	t.Set("ab");
	CHECK(t.Append("\xC3\xA9"));          // "ab\xC3\xA9": 4 bytes
	CHECK(!t.Append("\xF0\x9F\x98\x80")); // a 4-byte character does not fit in the 3 left
	CHECK_EQ(Show(t.str()), Show("ab\xC3\xA9"));
	CHECK(t.Append("xyz"));
	CHECK_EQ(t.str(), std::string("ab\xC3\xA9xyz"));
	CHECK(!t.Append("!"));
	t.Clear();
	CHECK(t.Empty());
	ErrorText e;
	e.Set(std::string(2000, 'x'));
	CHECK_EQ(e.view().size(), ErrorText::kCapacity);
	CHECK(IsStrictUtf8(e.view()));
}

namespace {

bool
Near(double got, double want, double rel) {
	return got >= want * (1 - rel) && got <= want * (1 + rel);
}

} // namespace

TEST("Histogram: percentiles within 4.5% over six decades, clamped to what was seen") {
	Histogram h;
	h.Clear();
	CHECK(h.Percentile(0.5) < 0); // empty
	for (int i = 1; i <= 1000; ++i)
		h.Add(i); // 1 .. 1000 ms
	CHECK_EQ(h.Count(), uint64_t(1000));
	CHECK(Near(h.Percentile(0.5), 500, 0.045));
	CHECK(Near(h.Percentile(0.99), 990, 0.045));
	CHECK(h.Percentile(1.0) <= 1000 && h.Percentile(1.0) >= 1000 * 0.955);
	h.Clear();
	for (double v : {0.002, 0.02, 0.2, 2.0, 20.0, 200.0, 2000.0}) {
		h.Clear();
		h.Add(v);
		CHECK_EQ(h.Percentile(0.5), v); // one value: exactly it
		h.Add(v * 1.001);
		h.Add(v * 0.999);
		CHECK(Near(h.Percentile(0.5), v, 0.045));
	}
	h.Clear();
	for (int i = 0; i < 99; ++i)
		h.Add(1.0);
	h.Add(5000.0);
	CHECK(Near(h.Percentile(0.99), 1.0, 0.045)); // rank 99 of 100
	CHECK_EQ(h.Percentile(1.0), 5000.0);
	h.Clear();
	h.Add(0);
	h.Add(-3);   // a clock that went backwards counts as 0
	h.Add(1e12); // beyond the last bucket: kept there, reported as seen
	CHECK_EQ(h.Percentile(0.5), 0.0);
	CHECK_EQ(h.Percentile(1.0), 1e12);
}

TAP_MAIN
