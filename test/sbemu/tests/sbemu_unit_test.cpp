// test/sbemu/tests/sbemu_unit_test.cpp
//   Unit tests of the emulator's pure parts: AMQP codec, durations, text codecs, SAS and JWT
//   verification, filters, Config.json, and the message store driven with explicit clock values.
#include "sbpg/amqp/codec.hpp"
#include "../auth.hpp"
#include "../broker.hpp"
#include "../config.hpp"
#include "../filter.hpp"
#include "../util.hpp"

#include "../../lib/tap.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <unistd.h>

using namespace sbemu;
using amqp::Value;

namespace {

std::string
Enc(const Value &v) {
	std::string s;
	amqp::Encode(v, &s);
	return s;
}

Value
Dec(const std::string &s) {
	Value v;
	if (!amqp::DecodeAll(s, &v))
		throw std::runtime_error("decode failed");
	return v;
}

std::string
B64Url(const std::string &s) {
	std::string b = Base64Encode(s);
	for (auto &c : b)
		c = c == '+' ? '-' : c == '/' ? '_' : c;
	while (!b.empty() && b.back() == '=')
		b.pop_back();
	return b;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// AMQP codec

TEST("codec: primitives round-trip with their types") {
	uint8_t u[16];
	for (int i = 0; i < 16; ++i)
		u[i] = static_cast<uint8_t>(i * 7);
	std::vector<Value> vals = {Value::Null(),         Value::Bool(true),         Value::Bool(false),
	                           Value::UByte(200),     Value::UInt(0),            Value::UInt(7),
	                           Value::UInt(70000),    Value::ULong(0),           Value::ULong(300),
	                           Value::ULong(1ULL << 40), Value::Int(-5),         Value::Int(-70000),
	                           Value::Long(-1),       Value::Long(1LL << 50),    Value::Timestamp(1700000000123LL),
	                           Value::Uuid(u),        Value::Binary(std::string(300, '\0')), Value::String("héllo"),
	                           Value::String(std::string(1000, 'x')), Value::Symbol("com.microsoft:dead-letter")};
	for (auto &v : vals) {
		Value back = Dec(Enc(v));
		CHECK(back == v);
	}
}

TEST("codec: lists, maps, arrays and described values nest") {
	Value m = Value::Map();
	m.Put(Value::String("lock-tokens"), Value::Array({Value::Long(1), Value::Long(2)}));
	m.Put(Value::Symbol("x"), Value::List({Value::Int(1), Value::String("two"), Value::Map()}));
	Value d;
	d.kind = Value::Kind::Described;
	d.items = {Value::ULong(0x77), Value::String("body")};
	m.Put(Value::String("described"), d);
	Value back = Dec(Enc(m));
	CHECK(back == m);
	REQUIRE(back.Get("lock-tokens"));
	CHECK_EQ(back.Get("lock-tokens")->items.size(), 2u);
	CHECK_EQ(back.Get("x")->items[1].s, std::string("two"));
	Value arr = Value::Array({Value::String("a"), Value::String("bc")});
	CHECK(Dec(Enc(arr)) == arr);
	std::vector<std::string> uu = {std::string(16, 'a'), std::string(16, 'b')};
	std::string raw;
	amqp::Writer(&raw).ArrayOfUuid(uu);
	Value ua = Dec(raw);
	CHECK(ua.kind == Value::Kind::Array);
	CHECK_EQ(ua.items.size(), 2u);
	CHECK(ua.items[1].kind == Value::Kind::Uuid);
}

TEST("codec: small encodings of other peers decode (list8, map8, smalllong, uint0)") {
	// list8 with 3 elements: smalllong 5, uint0, str8 "ab"
	std::string raw = std::string("\xc0\x08\x03\x55\x05\x43\xa1\x02\x61\x62", 10);
	Value v = Dec(raw);
	REQUIRE(v.kind == Value::Kind::List);
	REQUIRE(v.items.size() == 3);
	CHECK_EQ(v.items[0].AsInt(), 5);
	CHECK_EQ(v.items[1].AsInt(), 0);
	CHECK_EQ(v.items[2].s, std::string("ab"));
	// map8 {sym "k": true}
	std::string m8 = std::string("\xc1\x05\x02\xa3\x01k\x41", 7);
	Value mv = Dec(m8);
	REQUIRE(mv.Get("k"));
	CHECK(mv.Get("k")->u == 1);
}

TEST("codec: malformed input is refused, never over-read") {
	const char *bad[] = {"\xa1\x05" "ab",          // string longer than the buffer
	                     "\xd0\x00\x00\x00\x10\x00\x00\x00\x01", // list32 size beyond the buffer
	                     "\xc1\x03\x03\x41\x41\x41",  // map with an odd element count
	                     "\xff",                       // unknown constructor
	                     "\x81\x00\x01"};              // truncated long
	size_t lens[] = {4, 9, 6, 1, 3};
	for (size_t i = 0; i < 5; ++i) {
		Value v;
		CHECK(!amqp::DecodeAll(std::string(bad[i], lens[i]), &v));
	}
	// Nesting deeper than the limit is refused rather than recursing without bound.
	std::string deep;
	for (int i = 0; i < 200; ++i)
		deep += std::string("\xc0\x00\x01", 3);
	deep += "\x40";
	Value v;
	CHECK(!amqp::DecodeAll(deep, &v));
	// Truncation at every length of a valid encoding is refused.
	Value m = Value::Map();
	m.Put(Value::String("a"), Value::List({Value::Long(1LL << 40), Value::String("xyz")}));
	std::string good = Enc(m);
	for (size_t k = 0; k < good.size(); ++k) {
		Value t;
		CHECK(!amqp::DecodeAll(good.substr(0, k), &t));
	}
}

TEST("codec: a long chain of described constructors is refused by Skip and the message parser, not recursed") {
	// Regression: Skip recursed once per 0x00 byte; 300000 of them in an unauthenticated $cbs
	// request overflowed the stack.
	std::string deep = std::string("\x00\x53\x77", 3) + std::string(300000, '\0');
	const uint8_t *p = reinterpret_cast<const uint8_t *>(deep.data()) + 3;
	CHECK(!amqp::Skip(p, reinterpret_cast<const uint8_t *>(deep.data()) + deep.size()));
	amqp::Sections sec;
	std::string err;
	CHECK(!amqp::SplitSections(deep, &sec, &err));
	Incoming in;
	CHECK(!ParseIncoming(deep, &in, &err));
	// Modest nesting still skips: a described value whose descriptor is itself described.
	std::string ok = std::string("\x00\x00\x53\x01\x53\x02\xa1\x01x", 9);
	p = reinterpret_cast<const uint8_t *>(ok.data());
	CHECK(amqp::Skip(p, p + ok.size()));
	CHECK(p == reinterpret_cast<const uint8_t *>(ok.data()) + ok.size());
}

namespace {
std::string
Be32(uint32_t v) {
	return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
}
} // namespace

TEST("codec: an array of described elements keeps its descriptor once and round-trips") {
	// Regression: the descriptor was copied into every element (60 kB x 5000 elements from a
	// 65 kB request).
	std::string desc = std::string(1, '\xb0') + Be32(60000) + std::string(60000, 'A');
	std::string body = Be32(5000) + std::string(1, '\0') + desc + std::string(1, '\x50') + std::string(5000, '\x01');
	std::string arr = std::string(1, '\xf0') + Be32(static_cast<uint32_t>(body.size())) + body;
	Value v = Dec(arr);
	REQUIRE(v.kind == Value::Kind::Array);
	REQUIRE(v.items.size() == 5000u);
	CHECK(v.items[0].kind == Value::Kind::UByte);
	CHECK_EQ(v.items[4999].u, 1u);
	CHECK_EQ(v.s, desc); // the descriptor, once, as encoded
	CHECK(Dec(Enc(v)) == v);
	// A small one written by hand: array8 of two smallulongs described by symbol "d".
	std::string small = std::string("\xe0\x09\x02\x00\xa3\x01" "d" "\x53\x07\x09", 11);
	Value sv = Dec(small);
	REQUIRE(sv.items.size() == 2u);
	CHECK_EQ(sv.items[1].u, 9u);
	CHECK_EQ(sv.s, std::string("\xa3\x01" "d", 3));
}

TEST("codec: a value tree out of proportion to its input is refused") {
	// 4M one-byte nulls in a list32: 4 MB in, ~350 MB of nodes out. Refused.
	uint32_t n = 4u << 20;
	std::string big = std::string(1, '\xd0') + Be32(n + 4) + Be32(n) + std::string(n, '\x40');
	Value v;
	CHECK(!amqp::DecodeAll(big, &v));
	// An array32 of a million zero-width nulls from 10 bytes. Refused.
	std::string zero = std::string(1, '\xf0') + Be32(5) + Be32(1000000) + std::string(1, '\x40');
	CHECK(!amqp::DecodeAll(zero, &v));
	// Ordinary sizes decode: 50000 nulls, and a 1 MB binary.
	uint32_t m = 50000;
	std::string fine = std::string(1, '\xd0') + Be32(m + 4) + Be32(m) + std::string(m, '\x40');
	REQUIRE(amqp::DecodeAll(fine, &v));
	CHECK_EQ(v.items.size(), 50000u);
	CHECK(amqp::DecodeAll(Enc(Value::Binary(std::string(1u << 20, 'b'))), &v));
}

TEST("codec: a message splits into its sections and the bare message is kept byte for byte") {
	std::string msg;
	amqp::EncodeSection(amqp::kHeader, Value::List({Value::Bool(true)}), &msg);
	Value ma = Value::Map();
	ma.Put(Value::Symbol("x-opt-partition-key"), Value::String("pk"));
	amqp::EncodeSection(amqp::kMessageAnnotations, ma, &msg);
	size_t bare_start = msg.size();
	amqp::EncodeSection(amqp::kProperties, Value::List({Value::String("id-1")}), &msg);
	amqp::EncodeSection(amqp::kData, Value::Binary("payload"), &msg);
	amqp::EncodeSection(amqp::kData, Value::Binary("more"), &msg);
	amqp::Sections sec;
	std::string err;
	REQUIRE(amqp::SplitSections(msg, &sec, &err));
	CHECK(!sec.header.empty());
	CHECK(!sec.message_annotations.empty());
	CHECK_EQ(sec.body_sections, 2);
	CHECK(sec.body_code == amqp::kData);
	CHECK(sec.bare == std::string_view(msg).substr(bare_start));
	// Out of order and repeated sections are refused.
	std::string swapped;
	amqp::EncodeSection(amqp::kProperties, Value::List(), &swapped);
	amqp::EncodeSection(amqp::kHeader, Value::List(), &swapped);
	CHECK(!amqp::SplitSections(swapped, &sec, &err));
	std::string twice;
	amqp::EncodeSection(amqp::kProperties, Value::List(), &twice);
	amqp::EncodeSection(amqp::kProperties, Value::List(), &twice);
	CHECK(!amqp::SplitSections(twice, &sec, &err));
}

TEST("codec: random and mutated input never crashes the decoder or the message parser") {
	// Deterministic: the same inputs every run.
	std::mt19937_64 rng(20261126);
	std::string good;
	amqp::EncodeSection(amqp::kHeader, Value::List({Value::Bool(true), Value::UByte(4)}), &good);
	Value ma = Value::Map();
	ma.Put(Value::Symbol("x-opt-scheduled-enqueue-time"), Value::Timestamp(1));
	amqp::EncodeSection(amqp::kMessageAnnotations, ma, &good);
	amqp::EncodeSection(amqp::kProperties, Value::List({Value::String("id"), Value(), Value::String("to")}), &good);
	Value ap = Value::Map();
	ap.Put(Value::String("k"), Value::List({Value::Long(1), Value::Array({Value::Int(1), Value::Int(2)})}));
	amqp::EncodeSection(amqp::kApplicationProperties, ap, &good);
	amqp::EncodeSection(amqp::kData, Value::Binary("payload"), &good);
	size_t parsed = 0;
	for (int i = 0; i < 200000; ++i) {
		std::string in;
		if (i % 2 == 0) {
			in.resize(rng() % 64);
			for (auto &c : in)
				c = static_cast<char>(rng());
		} else {
			in = good;
			int flips = 1 + static_cast<int>(rng() % 4);
			for (int f = 0; f < flips; ++f)
				in[rng() % in.size()] = static_cast<char>(rng());
			if (rng() % 4 == 0)
				in.resize(rng() % in.size());
		}
		Value v;
		amqp::DecodeAll(in, &v);
		Incoming msg;
		std::string err;
		if (ParseIncoming(in, &msg, &err))
			++parsed;
	}
	CHECK(parsed > 0); // some mutations stay valid messages
}

// ---------------------------------------------------------------------------------------------
// Durations and text

TEST("durations: ISO-8601 and TimeSpan forms") {
	int64_t ms = 0;
	CHECK(ParseDuration("PT1M", &ms) && ms == 60000);
	CHECK(ParseDuration("PT20S", &ms) && ms == 20000);
	CHECK(ParseDuration("PT0.5S", &ms) && ms == 500);
	CHECK(ParseDuration("P14D", &ms) && ms == 14LL * 86400000);
	CHECK(ParseDuration("P1DT2H3M4S", &ms) && ms == 86400000 + 2 * 3600000 + 3 * 60000 + 4000);
	CHECK(ParseDuration("00:01:00", &ms) && ms == 60000);
	CHECK(ParseDuration("1.00:00:30", &ms) && ms == 86400000 + 30000);
	CHECK(ParseDuration("P10675199DT2H48M5.4775807S", &ms) && ms > 100LL * 365 * 86400000);
	CHECK(!ParseDuration("", &ms));
	CHECK(!ParseDuration("P", &ms));
	CHECK(!ParseDuration("PT5X", &ms));
	CHECK(!ParseDuration("five minutes", &ms));
}

TEST("text: base64, URL encoding, GUID byte order") {
	std::string out;
	CHECK(Base64Decode(Base64Encode("any carnal pleas"), &out) && out == "any carnal pleas");
	CHECK(Base64Decode("aGk", &out) && out == "hi");
	CHECK(Base64Decode("-_8", &out) && out == std::string("\xfb\xff", 2));
	CHECK(!Base64Decode("a*b", &out));
	CHECK_EQ(UrlEncode("sb://h:1/q/$management"), std::string("sb%3A%2F%2Fh%3A1%2Fq%2F%24management"));
	CHECK(UrlDecode("sb%3A%2F%2Fh", &out) && out == "sb://h");
	CHECK(!UrlDecode("%G1", &out));
	uint8_t tag[16], swapped[16], back[16];
	for (int i = 0; i < 16; ++i)
		tag[i] = static_cast<uint8_t>(0xa0 + i);
	DotNetGuidSwap(tag, swapped);
	CHECK_EQ(UuidString(swapped), std::string("a3a2a1a0-a5a4-a7a6-a8a9-aaabacadaeaf"));
	DotNetGuidSwap(swapped, back);
	CHECK(std::memcmp(tag, back, 16) == 0);
	CHECK(IsValidUtf8("plain ascii"));
	CHECK(IsValidUtf8("h\xc3\xa9"));
	CHECK(!IsValidUtf8("\xc3"));
	CHECK(!IsValidUtf8("\xff\xfe"));
}

// ---------------------------------------------------------------------------------------------
// SAS and JWT

TEST("sas: a token made with the key verifies, and every kind of tampering is refused") {
	std::vector<SasKey> keys = {{"RootManageSharedAccessKey", "SAS_KEY_VALUE", kAllRights}, {"ro", "k2", kListen}};
	int64_t now = 1700000000000LL;
	std::string tok = MakeSasToken("sb://127.0.0.1:5672/orders", keys[0], now / 1000 + 60);
	TokenGrant g = VerifySas(tok, now, keys);
	CHECK(g.ok);
	CHECK_EQ(g.scope, std::string("orders"));
	CHECK_EQ(g.rights, static_cast<unsigned>(kAllRights));
	CHECK_EQ(g.expires_ms, now + 60000);
	// Expired.
	CHECK(!VerifySas(tok, now + 61000, keys).ok);
	// Wrong key.
	SasKey wrong{"RootManageSharedAccessKey", "other", kAllRights};
	CHECK(!VerifySas(MakeSasToken("sb://h/orders", wrong, now / 1000 + 60), now, keys).ok);
	// Unknown key name.
	SasKey unknown{"nobody", "SAS_KEY_VALUE", kAllRights};
	TokenGrant gu = VerifySas(MakeSasToken("sb://h/orders", unknown, now / 1000 + 60), now, keys);
	CHECK(!gu.ok);
	CHECK(gu.error.find("nobody") != std::string::npos);
	// Changed resource with the old signature.
	std::string forged = tok;
	size_t pos = forged.find("orders");
	forged.replace(pos, 6, "others");
	CHECK(!VerifySas(forged, now, keys).ok);
	// The error never contains the signature.
	CHECK(g.error.empty());
	TokenGrant bad = VerifySas(forged, now, keys);
	CHECK(bad.error.find("sig=") == std::string::npos);
	// Rights come from the key.
	CHECK_EQ(VerifySas(MakeSasToken("sb://h/", keys[1], now / 1000 + 60), now, keys).rights, static_cast<unsigned>(kListen));
	CHECK(!VerifySas("Bearer abc", now, keys).ok);
}

TEST("scopes: audiences reduce to entity paths and cover by path prefix") {
	CHECK_EQ(AudiencePath("sb://ns.servicebus.windows.net/Orders/"), std::string("orders"));
	CHECK_EQ(AudiencePath("amqps://h:5671/t/Subscriptions/S"), std::string("t/subscriptions/s"));
	CHECK_EQ(AudiencePath("sb://h/"), std::string(""));
	CHECK(ScopeCovers("", "anything"));
	CHECK(ScopeCovers("orders", "orders"));
	CHECK(ScopeCovers("orders", "orders/$management"));
	CHECK(!ScopeCovers("orders", "orders2"));
	CHECK(!ScopeCovers("orders/$management", "orders"));
}

namespace {
struct RsaKey {
	EVP_PKEY *key = nullptr;
	std::string pub_path;
	RsaKey() {
		key = EVP_RSA_gen(2048);
		char path[] = "/tmp/sbemu-unit-XXXXXX";
		int fd = mkstemp(path);
		close(fd);
		pub_path = path;
		FILE *f = std::fopen(path, "w");
		PEM_write_PUBKEY(f, key);
		std::fclose(f);
	}
	~RsaKey() {
		EVP_PKEY_free(key);
		unlink(pub_path.c_str());
	}
	std::string Sign(const std::string &header, const std::string &payload) const {
		std::string data = B64Url(header) + "." + B64Url(payload);
		EVP_MD_CTX *md = EVP_MD_CTX_new();
		size_t len = 0;
		EVP_DigestSignInit(md, nullptr, EVP_sha256(), nullptr, key);
		EVP_DigestSign(md, nullptr, &len, reinterpret_cast<const unsigned char *>(data.data()), data.size());
		std::string sig(len, '\0');
		EVP_DigestSign(md, reinterpret_cast<unsigned char *>(&sig[0]), &len,
		               reinterpret_cast<const unsigned char *>(data.data()), data.size());
		EVP_MD_CTX_free(md);
		sig.resize(len);
		return data + "." + B64Url(sig);
	}
};
} // namespace

TEST("jwt: RS256 tokens verify by signature, audience, exp and nbf") {
	RsaKey k, other;
	JwtKeys keys;
	std::string err;
	REQUIRE(keys.AddPemFile(k.pub_path, &err));
	std::vector<std::string> auds = {"https://servicebus.azure.net"};
	int64_t now = 1700000000000LL;
	auto payload = [](const char *aud, long exp, long nbf) {
		char buf[256];
		std::snprintf(buf, sizeof buf, "{\"aud\":\"%s\",\"exp\":%ld,\"nbf\":%ld,\"oid\":\"abc\"}", aud, exp, nbf);
		return std::string(buf);
	};
	const std::string hdr = "{\"alg\":\"RS256\",\"typ\":\"JWT\"}";
	TokenGrant g = keys.Verify(k.Sign(hdr, payload("https://servicebus.azure.net", 1700000600, 1699999000)), now, auds);
	CHECK(g.ok);
	CHECK_EQ(g.identity, std::string("jwt:abc"));
	CHECK_EQ(g.expires_ms, 1700000600000LL);
	CHECK(keys.Verify(k.Sign(hdr, payload("https://servicebus.azure.net/", 1700000600, 1699999000)), now, auds).ok);
	CHECK(!keys.Verify(k.Sign(hdr, payload("https://storage.azure.com", 1700000600, 1699999000)), now, auds).ok);
	CHECK(!keys.Verify(k.Sign(hdr, payload("https://servicebus.azure.net", 1699999999, 1699999000)), now, auds).ok);
	CHECK(!keys.Verify(k.Sign(hdr, payload("https://servicebus.azure.net", 1700000600, 1700000100)), now, auds).ok);
	CHECK(!keys.Verify(other.Sign(hdr, payload("https://servicebus.azure.net", 1700000600, 1699999000)), now, auds).ok);
	CHECK(!keys.Verify(k.Sign("{\"alg\":\"none\"}", payload("https://servicebus.azure.net", 1700000600, 1699999000)), now, auds).ok);
	CHECK(!keys.Verify("not.a.jwt.at.all", now, auds).ok);
	CHECK(!keys.Verify("garbage", now, auds).ok);
	std::string roles = "{\"aud\":\"https://servicebus.azure.net\",\"exp\":1700000600,\"roles\":[\"Azure Service Bus Data Receiver\"]}";
	TokenGrant gr = keys.Verify(k.Sign(hdr, roles), now, auds);
	CHECK(gr.ok);
	CHECK_EQ(gr.rights, static_cast<unsigned>(kListen));
}

TEST("tokens: expiry times far in the future are clamped, not overflowed") {
	std::vector<SasKey> keys = {{"k", "secret", kAllRights}};
	int64_t now = 1700000000000LL;
	for (long long se : {9223372036854775807LL, 9223372036854775LL, 253402300800LL}) {
		TokenGrant g = VerifySas(MakeSasToken("sb://h/q", keys[0], se), now, keys);
		CHECK(g.ok);
		CHECK(g.expires_ms > now);
		CHECK(g.expires_ms <= 253402300799000LL);
	}
	CHECK(!VerifySas(MakeSasToken("sb://h/q", keys[0], -5), now, keys).ok);
	RsaKey k;
	JwtKeys jk;
	std::string err;
	REQUIRE(jk.AddPemFile(k.pub_path, &err));
	const std::string hdr = "{\"alg\":\"RS256\"}";
	TokenGrant g = jk.Verify(k.Sign(hdr, "{\"aud\":\"https://servicebus.azure.net\",\"exp\":1e300,\"nbf\":-1e300}"), now,
	                         {"https://servicebus.azure.net"});
	CHECK(g.ok);
	CHECK_EQ(g.expires_ms, 253402300799000LL);
}

// ---------------------------------------------------------------------------------------------
// Filters

namespace {
FilterInput
Input(Value *props) {
	FilterInput in;
	in.subject = "order";
	in.correlation_id = "c-1";
	in.content_type = "application/json";
	in.app_props = props;
	return in;
}
bool
Sql(const char *expr, const FilterInput &in) {
	std::string err;
	auto f = SqlFilter::Parse(expr, &err);
	if (!f)
		throw std::runtime_error(std::string("parse failed: ") + expr + ": " + err);
	return f->Match(in);
}
} // namespace

TEST("sql filter: comparisons, logic, IN, LIKE, NULL and EXISTS as Service Bus evaluates them") {
	Value props = Value::Map();
	props.Put(Value::String("amount"), Value::Long(150));
	props.Put(Value::String("region"), Value::String("eu-west"));
	props.Put(Value::String("vip"), Value::Bool(true));
	props.Put(Value::String("quote"), Value::String("it's"));
	Value rate;
	rate.kind = Value::Kind::Double;
	rate.d = 1.5;
	props.Put(Value::String("rate"), rate);
	FilterInput in = Input(&props);
	CHECK(Sql("1=1", in));
	CHECK(!Sql("1=0", in));
	CHECK(Sql("amount > 100", in));
	CHECK(Sql("user.amount >= 150 AND amount < 151", in));
	CHECK(Sql("amount * 2 = 300 AND amount - 50 = 100", in));
	CHECK(Sql("rate > 1", in));
	CHECK(Sql("sys.Label = 'order'", in));
	CHECK(Sql("sys.CorrelationId = 'c-1' OR 1 = 0", in));
	CHECK(Sql("region LIKE 'eu-%'", in));
	CHECK(Sql("region NOT LIKE 'us%'", in));
	CHECK(Sql("region LIKE 'eu_west'", in));
	CHECK(!Sql("region LIKE 'eu!_west' ESCAPE '!'", in));
	CHECK(Sql("region IN ('us', 'eu-west')", in));
	CHECK(Sql("region NOT IN ('us', 'apac')", in));
	CHECK(Sql("missing IS NULL", in));
	CHECK(Sql("region IS NOT NULL", in));
	CHECK(Sql("EXISTS(vip) AND vip = TRUE", in));
	CHECK(!Sql("EXISTS(missing)", in));
	CHECK(!Sql("missing = 1", in));
	CHECK(!Sql("NOT (missing = 1)", in)); // unknown stays unknown under NOT
	CHECK(Sql("missing = 1 OR amount = 150", in));
	CHECK(Sql("NOT (amount < 100)", in));
	CHECK(Sql("[region] = 'eu-west'", in));
	CHECK(Sql("quote = 'it''s'", in));
	std::string err;
	CHECK(!SqlFilter::Parse("amount >", &err));
	CHECK(!err.empty());
	CHECK(!SqlFilter::Parse("(amount = 1", &err));
	CHECK(!SqlFilter::Parse("region LIKE 5", &err));
	CHECK(!SqlFilter::Parse("'unterminated", &err));
}

TEST("sql filter: integer overflow and division edge cases are unknown, never a trap") {
	Value props = Value::Map();
	props.Put(Value::String("min"), Value::Long(INT64_MIN));
	props.Put(Value::String("max"), Value::Long(INT64_MAX));
	props.Put(Value::String("m1"), Value::Long(-1));
	props.Put(Value::String("zero"), Value::Long(0));
	Value zd;
	zd.kind = Value::Kind::Double;
	props.Put(Value::String("zd"), zd);
	FilterInput in = Input(&props);
	// INT64_MIN / -1 used to raise SIGFPE; the result is unknown, so neither it nor its negation matches.
	CHECK(!Sql("min / m1 = 1", in));
	CHECK(!Sql("NOT (min / m1 = 1)", in));
	CHECK(Sql("min % m1 = 0", in)); // mathematically 0, and no trap
	CHECK(Sql("7 % m1 = 0", in));
	CHECK(Sql("7 / m1 = -7", in));
	CHECK(!Sql("max + 1 > 0", in));
	CHECK(!Sql("NOT (max + 1 > 0)", in));
	CHECK(!Sql("min - 1 < 0", in));
	CHECK(!Sql("max * 2 > 0", in));
	CHECK(!Sql("-min > 0", in));
	CHECK(!Sql("NOT (-min > 0)", in));
	CHECK(!Sql("1 / zero = 1", in));
	CHECK(!Sql("NOT (1 / zero = 1)", in));
	CHECK(!Sql("1 / zd = 1", in));
	CHECK(!Sql("NOT (1 % zd = 1)", in));
	CHECK(Sql("max - 1 < max AND min + 1 > min", in));
}

TEST("sql filter: LIKE matches % and _ without backtracking blow-up") {
	Value props = Value::Map();
	props.Put(Value::String("a"), Value::String(std::string(20000, 'a')));
	props.Put(Value::String("p"), Value::String("100%_sure"));
	FilterInput in = Input(&props);
	// Many % against a long non-matching text: exponential for a recursive matcher.
	CHECK(!Sql("a LIKE '%a%a%a%a%a%a%a%a%a%a%a%a%b'", in));
	CHECK(Sql("a LIKE '%a%a%a%a%a%a%a%a%a%a%a%a%'", in));
	CHECK(Sql("a LIKE 'a%a'", in));
	CHECK(!Sql("a LIKE '%b%'", in));
	CHECK(Sql("p LIKE '100!%!_sure' ESCAPE '!'", in));
	CHECK(Sql("p LIKE '%!%%' ESCAPE '!'", in));
	CHECK(!Sql("p LIKE '%!%x%' ESCAPE '!'", in));
	CHECK(Sql("p LIKE '1_0%'", in));
	CHECK(Sql("p LIKE '%'", in));
	CHECK(!Sql("p LIKE '_'", in));
	CHECK(Sql("sys.Label LIKE 'o%r'", in));
	CHECK(!Sql("sys.Label LIKE 'o%x'", in));
	Value empty = Value::Map();
	empty.Put(Value::String("e"), Value::String(""));
	FilterInput ein = Input(&empty);
	CHECK(Sql("e LIKE '%%'", ein));
	CHECK(!Sql("e LIKE '_%'", ein));
	// Deep nesting is refused at parse time rather than recursing without bound.
	std::string err;
	CHECK(!SqlFilter::Parse(std::string(5000, '(') + "1=1" + std::string(5000, ')'), &err));
	CHECK(err.find("nested too deeply") != std::string::npos);
}

TEST("correlation filter: system fields and properties must all match") {
	Value props = Value::Map();
	props.Put(Value::String("region"), Value::String("eu"));
	props.Put(Value::String("count"), Value::Long(3));
	FilterInput in = Input(&props);
	CorrelationFilter f;
	CHECK(f.Empty());
	CHECK(f.Match(in));
	f.label = "order";
	f.properties["region"].kind = FilterValue::Kind::String;
	f.properties["region"].s = "eu";
	CHECK(f.Match(in));
	f.properties["count"].kind = FilterValue::Kind::Int;
	f.properties["count"].i = 3;
	CHECK(f.Match(in));
	f.properties["count"].i = 4;
	CHECK(!f.Match(in));
	f.properties.erase("count");
	f.correlation_id = "other";
	CHECK(!f.Match(in));
}

// ---------------------------------------------------------------------------------------------
// Config.json

TEST("config: Microsoft's sample file loads with its entities and rules") {
	NamespaceConfig cfg;
	std::string err;
	std::vector<std::string> warnings;
	REQUIRE(LoadConfigFile(std::string(SBEMU_SOURCE_DIR) + "/examples/Config.json", &cfg, &err, &warnings));
	CHECK_EQ(cfg.name, std::string("sbemulatorns"));
	REQUIRE(cfg.queues.size() == 1);
	CHECK_EQ(cfg.queues[0].props.max_delivery_count, 3);
	CHECK_EQ(cfg.queues[0].props.lock_duration_ms, 60000);
	CHECK_EQ(cfg.queues[0].props.default_ttl_ms, 3600000);
	REQUIRE(cfg.topics.size() == 1);
	REQUIRE(cfg.topics[0].subscriptions.size() == 3);
	REQUIRE(cfg.topics[0].subscriptions[0].rules.size() == 1);
	const Rule &r = cfg.topics[0].subscriptions[0].rules[0];
	CHECK(r.kind == Rule::Kind::Correlation);
	CHECK(r.correlation.label && *r.correlation.label == "subject1");
	CHECK(cfg.topics[0].subscriptions[2].rules.empty());
	CHECK(warnings.empty());
}

TEST("config: errors name the entity and the problem") {
	auto fails = [](const std::string &text, const char *needle) {
		NamespaceConfig cfg;
		std::string err;
		std::vector<std::string> w;
		bool ok = ParseConfig(text, &cfg, &err, &w);
		if (ok || err.find(needle) == std::string::npos) {
			std::printf("  # config error was '%s'\n", err.c_str());
			return false;
		}
		return true;
	};
	CHECK(fails("{", "not valid JSON"));
	CHECK(fails("{\"UserConfig\":{}}", "Namespaces"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"q\",\"Properties\":{\"LockDuration\":\"soon\"}}]}]}}",
	            "queue q: LockDuration"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"q\",\"Properties\":{\"LockDuration\":\"PT10M\"}}]}]}}",
	            "between 1 second and 5 minutes"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Topics\":[{\"Name\":\"t\",\"Subscriptions\":[{\"Name\":\"s\",\"Rules\":"
	            "[{\"Name\":\"r\",\"Properties\":{\"FilterType\":\"Sql\",\"SqlFilter\":{\"SqlExpression\":\"a >\"}}}]}]}]}]}}",
	            "rule r"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"bad name!\"}]}]}}", "not a valid entity name"));
	NamespaceConfig cfg;
	std::string err;
	std::vector<std::string> w;
	CHECK(ParseConfig("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"q\",\"Properties\":{\"Shiny\":1}}]}]}}", &cfg,
	                  &err, &w));
	CHECK_EQ(w.size(), 1u);
}

TEST("config: entity names that differ only in case, and ForwardTo cycles, are refused") {
	auto fails = [](const std::string &text, const char *needle) {
		NamespaceConfig cfg;
		std::string err;
		std::vector<std::string> w;
		bool ok = ParseConfig(text, &cfg, &err, &w);
		if (ok || err.find(needle) == std::string::npos) {
			std::printf("  # config error was '%s'\n", err.c_str());
			return false;
		}
		return true;
	};
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"Orders\"},{\"Name\":\"orders\"}]}]}}",
	            "queue 'orders' clashes with the entity 'Orders'"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"t\"}],\"Topics\":[{\"Name\":\"T\"}]}]}}",
	            "case-insensitive"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Topics\":[{\"Name\":\"t\",\"Subscriptions\":[{\"Name\":\"s\"},"
	            "{\"Name\":\"S\"}]}]}]}}",
	            "subscription 't/Subscriptions/S'"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"t/subscriptions/s\"}],\"Topics\":[{\"Name\":\"t\","
	            "\"Subscriptions\":[{\"Name\":\"s\"}]}]}]}}",
	            "clashes"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"a\",\"Properties\":{\"ForwardTo\":\"b\"}},"
	            "{\"Name\":\"b\",\"Properties\":{\"ForwardTo\":\"A\"}}]}]}}",
	            "forwarding cycle: a -> b -> a"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"a\",\"Properties\":{\"ForwardTo\":\"a\"}}]}]}}",
	            "forwarding cycle"));
	CHECK(fails("{\"UserConfig\":{\"Namespaces\":[{\"Topics\":[{\"Name\":\"t\",\"Subscriptions\":[{\"Name\":\"s\","
	            "\"Properties\":{\"ForwardTo\":\"/t\"}}]}]}]}}",
	            "forwarding cycle: t -> t/Subscriptions/s -> t"));
	// Forwarding without a cycle, and dead-letter forwarding back to the topic, load.
	NamespaceConfig cfg;
	std::string err;
	std::vector<std::string> w;
	CHECK(ParseConfig("{\"UserConfig\":{\"Namespaces\":[{\"Queues\":[{\"Name\":\"a\",\"Properties\":{\"ForwardTo\":\"b\"}},"
	                  "{\"Name\":\"b\"}],\"Topics\":[{\"Name\":\"t\",\"Subscriptions\":[{\"Name\":\"s\",\"Properties\":"
	                  "{\"ForwardTo\":\"a\",\"ForwardDeadLetteredMessagesTo\":\"t\"}}]}]}]}}",
	                  &cfg, &err, &w));
	// main() checks again after adding --queue entities.
	QueueConfig extra;
	extra.name = "B";
	cfg.queues.push_back(extra);
	CHECK(!ValidateNamespace(cfg, &err));
	CHECK(err.find("clashes") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// The store, with explicit clock values

namespace {

class FakeConsumer : public Consumer {
  public:
	explicit FakeConsumer(bool peek_lock = true, uint32_t credit = 100) : peek_lock_(peek_lock), credit_(credit) {}
	uint32_t Credit() const override { return credit_; }
	bool PeekLock() const override { return peek_lock_; }
	void Deliver(Entity &, StoredMessage &m) override {
		--credit_;
		got.push_back(m.seq);
		tokens.push_back(m.lock);
		counts.push_back(m.delivery_count);
	}
	void Wake() override { ++wakes; }
	void SessionLockLost() override { ++session_lost; }
	std::vector<uint64_t> got;
	std::vector<LockToken> tokens;
	std::vector<uint32_t> counts;
	int wakes = 0, session_lost = 0;
	bool peek_lock_;
	uint32_t credit_;
};

Incoming
Msg(const std::string &id, const std::string &session = "") {
	std::string enc;
	Value props = Value::List({Value::String(id), Value(), Value(), Value(), Value(), Value(), Value(), Value(), Value(),
	                           Value(), session.empty() ? Value() : Value::String(session)});
	amqp::EncodeSection(amqp::kProperties, props, &enc);
	amqp::EncodeSection(amqp::kData, Value::Binary("body-" + id), &enc);
	Incoming in;
	std::string err;
	if (!ParseIncoming(enc, &in, &err))
		throw std::runtime_error(err);
	return in;
}

NamespaceConfig
OneQueue(EntityProps p = EntityProps()) {
	NamespaceConfig cfg;
	QueueConfig q;
	q.name = "q";
	q.props = p;
	cfg.queues.push_back(q);
	return cfg;
}

} // namespace

TEST("store: peek-lock, complete, abandon with delivery count, dead-letter at MaxDeliveryCount") {
	EntityProps p;
	p.max_delivery_count = 2;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	int64_t t = 1000000;
	b.Send(q, Msg("a"), t);
	b.Send(q, Msg("b"), t);
	FakeConsumer c;
	b.AddConsumer(q, &c);
	b.Pump(c, q, t);
	REQUIRE(c.got.size() == 2);
	CHECK_EQ(q.n_locked, 2u);
	CHECK(b.Complete(q, c.tokens[0], t) == SettleResult::Ok);
	CHECK(b.Complete(q, c.tokens[0], t) == SettleResult::LockLost);
	CHECK(b.Abandon(q, c.tokens[1], nullptr, t) == SettleResult::Ok);
	b.Pump(c, q, t);
	REQUIRE(c.got.size() == 3);
	CHECK_EQ(c.counts[2], 1u);
	CHECK(b.Abandon(q, c.tokens[2], nullptr, t) == SettleResult::Ok);
	CHECK_EQ(q.msgs.size(), 0u);
	REQUIRE(q.dlq->msgs.size() == 1);
	const StoredMessage &d = q.dlq->msgs.begin()->second;
	CHECK_EQ(d.message_id, std::string("b"));
	CHECK_EQ(d.dead_letter_source, std::string("q"));
	amqp::Sections sec;
	std::string err;
	REQUIRE(amqp::SplitSections(*d.bare, &sec, &err));
	Value app;
	REQUIRE(amqp::DecodeSection(sec.application_properties, &app));
	CHECK_EQ(app.Get("DeadLetterReason")->s, std::string("MaxDeliveryCountExceeded"));
}

TEST("store: a receive-and-delete consumer drains the queue to empty") {
	// Regression: removing the last message once dropped the group the pump was reading.
	Broker b(OneQueue());
	Entity &q = *b.Find("q");
	for (int i = 0; i < 3; ++i)
		b.Send(q, Msg("m" + std::to_string(i)), 1);
	FakeConsumer c(false, 10);
	b.AddConsumer(q, &c);
	b.Pump(c, q, 2);
	CHECK_EQ(c.got.size(), 3u);
	CHECK_EQ(q.msgs.size(), 0u);
	b.Send(q, Msg("late"), 3);
	b.Pump(c, q, 4);
	CHECK_EQ(c.got.size(), 4u);
}

TEST("store: a lock expires at its time, not before, and the message returns with count + 1") {
	EntityProps p;
	p.lock_duration_ms = 5000;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	int64_t t = 1000000;
	b.Send(q, Msg("a"), t);
	FakeConsumer c;
	b.AddConsumer(q, &c);
	b.Pump(c, q, t);
	b.Tick(t + 4999);
	CHECK_EQ(q.n_locked, 1u);
	CHECK(b.RenewLock(q, c.tokens[0], t + 4000) == t + 9000);
	b.Tick(t + 8999);
	CHECK_EQ(q.n_locked, 1u);
	b.Tick(t + 9000);
	CHECK_EQ(q.n_locked, 0u);
	CHECK_EQ(q.n_active, 1u);
	CHECK(b.Complete(q, c.tokens[0], t + 9001) == SettleResult::LockLost);
	b.Pump(c, q, t + 9001);
	REQUIRE(c.counts.size() == 2);
	CHECK_EQ(c.counts[1], 1u);
}

TEST("store: removing a consumer releases its locks") {
	Broker b(OneQueue());
	Entity &q = *b.Find("q");
	b.Send(q, Msg("a"), 1);
	FakeConsumer c, other;
	b.AddConsumer(q, &c);
	b.AddConsumer(q, &other);
	b.Pump(c, q, 1);
	CHECK_EQ(q.n_locked, 1u);
	b.RemoveConsumer(q, &c, 2);
	CHECK_EQ(q.n_active, 1u);
	CHECK(other.wakes > 0);
	b.Pump(other, q, 3);
	REQUIRE(other.counts.size() == 1);
	CHECK_EQ(other.counts[0], 1u);
}

TEST("store: the most messages one link held locked at once is kept as a high-water mark, per link") {
	EntityProps p;
	p.lock_duration_ms = 5000;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	for (int i = 0; i < 10; ++i)
		b.Send(q, Msg("m" + std::to_string(i)), 1);
	FakeConsumer c(true, 3), other(true, 2);
	b.AddConsumer(q, &c);
	b.AddConsumer(q, &other);
	b.Pump(c, q, 1);
	b.Pump(other, q, 1);
	// Five locked in all, but never more than three by one link.
	CHECK_EQ(q.n_locked, 5u);
	CHECK_EQ(q.counters.max_locked_by_link, 3u);
	// Settling and taking one more keeps c at three: the mark does not move.
	CHECK(b.Complete(q, c.tokens[0], 2) == SettleResult::Ok);
	c.credit_ = 1;
	b.Pump(c, q, 2);
	CHECK_EQ(c.got.size(), 4u);
	CHECK_EQ(q.counters.max_locked_by_link, 3u);
	// A breach, however brief, stays recorded after the locks go (settled, abandoned, expired).
	c.credit_ = 1;
	b.Pump(c, q, 3);
	CHECK_EQ(q.counters.max_locked_by_link, 4u);
	CHECK(b.Complete(q, c.tokens[1], 3) == SettleResult::Ok);
	CHECK(b.Abandon(q, c.tokens[2], nullptr, 3) == SettleResult::Ok);
	b.Tick(10000);
	CHECK_EQ(q.n_locked, 0u);
	CHECK_EQ(q.counters.max_locked_by_link, 4u);
	CHECK(q.CountsJson().find("\"max_locked_by_link\":4") != std::string::npos);
	// Locks that ended do not count again: c, with every lock gone, takes three and the mark stays.
	c.credit_ = 3;
	b.Pump(c, q, 10002);
	CHECK_EQ(q.counters.max_locked_by_link, 4u);
	// Messages received by sequence number count against the link that asked for them.
	CHECK(b.Defer(q, c.tokens.back(), nullptr, 10003) == SettleResult::Ok);
	std::vector<StoredMessage *> got;
	int64_t missing = 0;
	REQUIRE(b.ReceiveDeferred(q, {static_cast<int64_t>(c.got.back())}, true, &c, 10004, &got, &missing));
	CHECK_EQ(q.counters.max_locked_by_link, 4u);
	// A removed link's locks are forgotten, and the counters reset zeroes the mark.
	b.RemoveConsumer(q, &c, 10005);
	CHECK(q.locked_by_owner.find(&c) == q.locked_by_owner.end());
	b.ResetCounters();
	CHECK_EQ(q.counters.max_locked_by_link, 0u);
}

TEST("store: defer keeps a message out of the queue until received by sequence number") {
	Broker b(OneQueue());
	Entity &q = *b.Find("q");
	b.Send(q, Msg("a"), 1);
	FakeConsumer c;
	b.AddConsumer(q, &c);
	b.Pump(c, q, 1);
	CHECK(b.Defer(q, c.tokens[0], nullptr, 2) == SettleResult::Ok);
	CHECK_EQ(q.n_deferred, 1u);
	b.Pump(c, q, 3);
	CHECK_EQ(c.got.size(), 1u);
	std::vector<StoredMessage *> got;
	int64_t missing = 0;
	CHECK(!b.ReceiveDeferred(q, {99}, true, &c, 4, &got, &missing));
	CHECK_EQ(missing, 99);
	REQUIRE(b.ReceiveDeferred(q, {static_cast<int64_t>(c.got[0])}, true, &c, 4, &got, &missing));
	REQUIRE(got.size() == 1);
	LockToken tok = got[0]->lock;
	CHECK(b.Abandon(q, tok, nullptr, 5) == SettleResult::Ok);
	CHECK_EQ(q.n_deferred, 1u); // an abandoned deferred message stays deferred
}

TEST("store: time-to-live, scheduling and duplicate detection") {
	EntityProps p;
	p.default_ttl_ms = 1000;
	p.dead_letter_on_expiration = true;
	p.requires_duplicate_detection = true;
	p.duplicate_window_ms = 60000;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	b.Send(q, Msg("a"), 0);
	CHECK(b.Send(q, Msg("a"), 10).duplicate);
	Incoming later = Msg("later");
	later.scheduled_ms = 5000;
	b.Send(q, std::move(later), 20);
	CHECK_EQ(q.n_scheduled, 1u);
	b.Tick(999);
	CHECK_EQ(q.n_active, 1u);
	b.Tick(1000);
	CHECK_EQ(q.n_active, 0u);
	CHECK_EQ(q.dlq->msgs.size(), 1u);
	b.Tick(5000);
	CHECK_EQ(q.n_scheduled, 0u);
	CHECK_EQ(q.n_active, 1u); // time-to-live of a scheduled message starts at its enqueue time
	b.Tick(5999);
	CHECK_EQ(q.n_active, 1u);
	CHECK(b.Send(q, Msg("a"), 59999).duplicate);
	CHECK_EQ(q.counters.duplicates, 2u);
	b.Tick(60001);
	CHECK(!b.Send(q, Msg("a"), 60001).duplicate);
}

TEST("store: sessions lock one receiver per session and deliver in order") {
	EntityProps p;
	p.requires_session = true;
	p.lock_duration_ms = 1000;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	b.Send(q, Msg("a1", "A"), 1);
	b.Send(q, Msg("b1", "B"), 2);
	b.Send(q, Msg("a2", "A"), 3);
	FakeConsumer ca, cb, cc;
	std::string locked, cond;
	REQUIRE(b.LockSession(q, &ca, "", true, 10, &locked, &cond));
	CHECK_EQ(locked, std::string("A"));
	CHECK(!b.LockSession(q, &cc, "A", false, 10, &locked, &cond));
	CHECK_EQ(cond, std::string("com.microsoft:session-cannot-be-locked"));
	REQUIRE(b.LockSession(q, &cb, "", true, 10, &locked, &cond));
	CHECK_EQ(locked, std::string("B"));
	CHECK(!b.LockSession(q, &cc, "", true, 10, &locked, &cond));
	CHECK(cond.empty());
	CHECK_EQ(q.SessionsLocked(), 2u);
	CHECK_EQ(q.counters.max_sessions_locked, 2u);
	b.AddConsumer(q, &ca);
	b.Pump(ca, q, 11);
	REQUIRE(ca.got.size() == 2);
	CHECK(ca.got[0] < ca.got[1]);
	CHECK(b.Complete(q, ca.tokens[0], 12) == SettleResult::Ok);
	b.Tick(1010);
	CHECK_EQ(ca.session_lost, 1);
	CHECK(b.Complete(q, ca.tokens[1], 1011) == SettleResult::LockLost);
	CHECK_EQ(q.SessionsLocked(), 0u);
	CHECK(b.LockSession(q, &cc, "A", false, 1012, &locked, &cond));
	CHECK_EQ(q.SessionsLocked(), 1u);
	CHECK_EQ(q.counters.max_sessions_locked, 2u); // a high-water mark
	CHECK(q.CountsJson().find("\"sessions_locked\":1,") != std::string::npos);
	CHECK(q.CountsJson().find("\"max_sessions_locked\":2}") != std::string::npos);
}

TEST("store: topic fan-out honours rules and forwarding") {
	NamespaceConfig cfg;
	TopicConfig t;
	t.name = "t";
	SubscriptionConfig all, eu;
	all.name = "all";
	eu.name = "eu";
	Rule r;
	r.kind = Rule::Kind::Sql;
	std::string err;
	r.sql = SqlFilter::Parse("sys.MessageId LIKE 'eu-%'", &err);
	eu.rules.push_back(r);
	t.subscriptions = {all, eu};
	cfg.topics.push_back(t);
	QueueConfig q;
	q.name = "target";
	cfg.queues.push_back(q);
	cfg.topics[0].subscriptions[0].props.forward_to = "target";
	Broker b(cfg);
	b.Send(*b.Find("t"), Msg("eu-1"), 1);
	b.Send(*b.Find("t"), Msg("us-1"), 2);
	CHECK_EQ(b.Find("t/subscriptions/eu")->msgs.size(), 1u);
	CHECK_EQ(b.Find("t/Subscriptions/all")->msgs.size(), 0u);
	CHECK_EQ(b.Find("target")->msgs.size(), 2u);
	CHECK(b.Find("T/SUBSCRIPTIONS/EU") == b.Find("t/subscriptions/eu"));
	CHECK(b.Find("sb://host:5672/t/subscriptions/eu/$deadletterqueue") == b.Find("t/subscriptions/eu")->dlq);
	CHECK(b.Find("nope") == nullptr);
}

TEST("store: a dead-letter forward back into the topic stops at the hop limit") {
	// Regression: a subscription that requires sessions and forwards its dead letters to its own
	// topic recursed without end on a message without a session id.
	NamespaceConfig cfg;
	TopicConfig t;
	t.name = "t";
	SubscriptionConfig s;
	s.name = "s";
	s.props.requires_session = true;
	s.props.forward_dead_lettered_to = "t";
	t.subscriptions.push_back(s);
	cfg.topics.push_back(t);
	Broker b(cfg);
	Broker::SendResult r = b.Send(*b.Find("t"), Msg("m"), 1);
	CHECK(r.ok);
	Entity &sub = *b.Find("t/subscriptions/s");
	CHECK_EQ(sub.msgs.size(), 0u);
	REQUIRE(sub.dlq->msgs.size() == 1u);
	CHECK_EQ(sub.dlq->msgs.begin()->second.message_id, std::string("m"));
	CHECK_EQ(sub.counters.dead_lettered, static_cast<uint64_t>(kMaxForwardHops + 1));
}

TEST("store: a send reports the sequence number the message got where it was stored") {
	NamespaceConfig cfg;
	QueueConfig a, z;
	a.name = "a";
	a.props.forward_to = "z";
	z.name = "z";
	cfg.queues = {a, z};
	Broker b(cfg);
	Entity &qz = *b.Find("z");
	b.Send(qz, Msg("first"), 1);
	b.Send(qz, Msg("second"), 1);
	Broker::SendResult r = b.Send(*b.Find("a"), Msg("forwarded"), 2);
	REQUIRE(qz.msgs.count(r.seq) == 1u);
	CHECK_EQ(qz.msgs[r.seq].message_id, std::string("forwarded"));
	CHECK_EQ(r.seq, 3u);
}

TEST("store: expiring every lock on a session entity releases each message once and frees the session") {
	// Regression: the messages were released while the receiver still held the session, so it got
	// them again, and the session expiry then released them a second time (delivery count + 2).
	EntityProps p;
	p.requires_session = true;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	b.Send(q, Msg("m1", "s1"), 1);
	b.Send(q, Msg("m2", "s1"), 1);
	FakeConsumer c;
	std::string locked, cond;
	REQUIRE(b.LockSession(q, &c, "s1", false, 2, &locked, &cond));
	b.AddConsumer(q, &c);
	b.Pump(c, q, 3);
	REQUIRE(c.got.size() == 2u);
	int wakes = c.wakes;
	b.ExpireAllLocks(4);
	CHECK_EQ(c.session_lost, 1);
	CHECK_EQ(c.wakes, wakes); // not woken to take the released messages again
	CHECK(!c.session_bound);
	b.Pump(c, q, 5);
	CHECK_EQ(c.got.size(), 2u);
	b.Tick(6);
	CHECK_EQ(c.session_lost, 1);
	CHECK_EQ(q.n_active, 2u);
	for (auto &kv : q.msgs)
		CHECK_EQ(kv.second.delivery_count, 1u);
	CHECK_EQ(q.counters.lock_expired, 2u);
	FakeConsumer next;
	REQUIRE(b.LockSession(q, &next, "s1", false, 7, &locked, &cond));
	b.AddConsumer(q, &next);
	b.Pump(next, q, 8);
	REQUIRE(next.counts.size() == 2u);
	CHECK_EQ(next.counts[0], 1u);
}

TEST("store: locking a session whose lock lapsed (before the tick) ends the old lock first") {
	EntityProps p;
	p.requires_session = true;
	p.lock_duration_ms = 1000;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	b.Send(q, Msg("m1", "s1"), 1);
	FakeConsumer old, taker;
	std::string locked, cond;
	REQUIRE(b.LockSession(q, &old, "s1", false, 10, &locked, &cond));
	b.AddConsumer(q, &old);
	b.Pump(old, q, 11);
	REQUIRE(old.got.size() == 1u);
	CHECK(!b.LockSession(q, &taker, "s1", false, 1009, &locked, &cond)); // still held
	// At 1010 the lock has lapsed; no Tick has run.
	REQUIRE(b.LockSession(q, &taker, "s1", false, 1010, &locked, &cond));
	CHECK_EQ(old.session_lost, 1);
	CHECK(!old.session_bound);
	CHECK(b.Complete(q, old.tokens[0], 1011) == SettleResult::LockLost);
	b.AddConsumer(q, &taker);
	b.Pump(taker, q, 1012);
	REQUIRE(taker.counts.size() == 1u);
	CHECK_EQ(taker.counts[0], 1u);
	CHECK(b.Complete(q, taker.tokens[0], 1013) == SettleResult::Ok);
	b.Tick(5000);
	CHECK_EQ(old.session_lost, 1); // the old lock's timer finds nothing more to do
}

TEST("store: deferred messages asked for twice are received once; cancelling scheduled is all or nothing") {
	Broker b(OneQueue());
	Entity &q = *b.Find("q");
	b.Send(q, Msg("a"), 1);
	FakeConsumer c;
	b.AddConsumer(q, &c);
	b.Pump(c, q, 1);
	REQUIRE(b.Defer(q, c.tokens[0], nullptr, 2) == SettleResult::Ok);
	int64_t seq = static_cast<int64_t>(c.got[0]), missing = 0;
	std::vector<StoredMessage *> got;
	REQUIRE(b.ReceiveDeferred(q, {seq, seq}, true, &c, 3, &got, &missing));
	CHECK_EQ(got.size(), 1u);
	CHECK_EQ(q.locks.size(), 1u);
	CHECK_EQ(q.n_locked, 1u);
	CHECK(b.Complete(q, got[0]->lock, 4) == SettleResult::Ok);
	CHECK_EQ(q.locks.size(), 0u);

	NamespaceConfig cfg;
	TopicConfig t;
	t.name = "t";
	SubscriptionConfig s1, s2;
	s1.name = "s1";
	s2.name = "s2";
	t.subscriptions = {s1, s2};
	cfg.topics.push_back(t);
	Broker tb(cfg);
	Entity &topic = *tb.Find("t");
	Incoming later = Msg("later");
	later.scheduled_ms = 100000;
	uint64_t sseq = tb.Send(topic, std::move(later), 1).seq;
	CHECK(!tb.CancelScheduled(topic, {static_cast<int64_t>(sseq), 99}, &missing));
	CHECK_EQ(missing, 99);
	CHECK_EQ(topic.counters.cancelled, 0u);
	CHECK_EQ(tb.Find("t/subscriptions/s1")->n_scheduled, 1u);
	CHECK(tb.CancelScheduled(topic, {static_cast<int64_t>(sseq), static_cast<int64_t>(sseq)}, &missing));
	CHECK_EQ(topic.counters.cancelled, 1u);
	CHECK_EQ(tb.Find("t/subscriptions/s1")->n_scheduled, 0u);
	CHECK_EQ(tb.Find("t/subscriptions/s2")->counters.cancelled, 1u);
}

TEST("store: a duplicate detection window near the largest duration does not overflow") {
	EntityProps p;
	p.requires_duplicate_detection = true;
	p.duplicate_window_ms = kNever;
	Broker b(OneQueue(p));
	Entity &q = *b.Find("q");
	int64_t t = 1700000000000LL;
	CHECK(!b.Send(q, Msg("a"), t).duplicate);
	CHECK(b.Send(q, Msg("a"), t + 1).duplicate);
	b.Tick(t + 2);
	CHECK(b.Send(q, Msg("a"), t + 3).duplicate);
}

TAP_MAIN
