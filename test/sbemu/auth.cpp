// sbemu/auth.cpp
//   SAS and JWT verification over OpenSSL 3.
#include "auth.hpp"

#include "util.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "sbpg/core/json.hpp"

namespace sbemu {

namespace {

// 9999-12-31T23:59:59Z: token expiry times are clamped to it, so that seconds * 1000 cannot overflow.
constexpr long long kMaxEpochSeconds = 253402300799LL;

// A JWT NumericDate (seconds, possibly fractional) as epoch milliseconds, clamped.
int64_t
EpochMs(double seconds) {
	if (!(seconds > 0))
		return 0;
	if (seconds > static_cast<double>(kMaxEpochSeconds))
		return kMaxEpochSeconds * 1000LL;
	return static_cast<int64_t>(seconds * 1000.0);
}

} // namespace

std::string
RightsText(unsigned rights) {
	std::string r;
	if (rights & kListen)
		r += "Listen";
	if (rights & kSend)
		r += r.empty() ? "Send" : ",Send";
	if (rights & kManage)
		r += r.empty() ? "Manage" : ",Manage";
	return r.empty() ? "none" : r;
}

bool
ParseRights(std::string_view text, unsigned *out) {
	unsigned r = 0;
	for (auto &part : Split(text, ',')) {
		std::string p = ToLower(part);
		if (p == "listen")
			r |= kListen;
		else if (p == "send")
			r |= kSend;
		else if (p == "manage")
			r |= kManage | kListen | kSend; // Manage implies the others, as in Service Bus
		else if (!p.empty())
			return false;
	}
	*out = r;
	return r != 0;
}

std::string
AudiencePath(std::string_view uri) {
	std::string_view s = uri;
	size_t scheme = s.find("://");
	if (scheme != std::string_view::npos) {
		s = s.substr(scheme + 3);
		size_t slash = s.find('/');
		s = slash == std::string_view::npos ? std::string_view() : s.substr(slash);
	}
	while (!s.empty() && s.front() == '/')
		s.remove_prefix(1);
	while (!s.empty() && s.back() == '/')
		s.remove_suffix(1);
	return ToLower(s);
}

bool
ScopeCovers(std::string_view scope, std::string_view path) {
	if (scope.empty())
		return true;
	if (path.size() < scope.size() || path.compare(0, scope.size(), scope) != 0)
		return false;
	return path.size() == scope.size() || path[scope.size()] == '/';
}

std::string
MakeSasToken(std::string_view resource_uri, const SasKey &key, int64_t expiry_seconds) {
	std::string sr = UrlEncode(resource_uri);
	std::string se = std::to_string(expiry_seconds);
	std::string sig = Base64Encode(HmacSha256(key.key, sr + "\n" + se));
	return "SharedAccessSignature sr=" + sr + "&sig=" + UrlEncode(sig) + "&se=" + se + "&skn=" + UrlEncode(key.name);
}

TokenGrant
VerifySas(std::string_view token, int64_t now_ms, const std::vector<SasKey> &keys) {
	TokenGrant g;
	const std::string_view prefix = "SharedAccessSignature ";
	if (!IStartsWith(token, prefix)) {
		g.error = "not a SharedAccessSignature token";
		return g;
	}
	std::string_view rest = token.substr(prefix.size());
	std::string sr_raw, sig, se, skn;
	for (auto &field : Split(rest, '&')) {
		size_t eq = field.find('=');
		if (eq == std::string::npos)
			continue;
		std::string k = field.substr(0, eq), v = field.substr(eq + 1);
		if (k == "sr")
			sr_raw = v;
		else if (k == "sig")
			UrlDecode(v, &sig);
		else if (k == "se")
			se = v;
		else if (k == "skn")
			UrlDecode(v, &skn);
	}
	if (sr_raw.empty() || sig.empty() || se.empty() || skn.empty()) {
		g.error = "SAS token lacks sr, sig, se or skn";
		return g;
	}
	const SasKey *key = nullptr;
	for (auto &k : keys)
		if (k.name == skn)
			key = &k;
	if (!key) {
		g.error = "unknown shared access key name '" + skn + "'";
		return g;
	}
	char *endp = nullptr;
	long long expiry = std::strtoll(se.c_str(), &endp, 10);
	if (!endp || *endp != '\0') {
		g.error = "SAS token expiry is not a number";
		return g;
	}
	// Seconds since the epoch, within what milliseconds can hold without overflow (year 9999).
	expiry = std::clamp<long long>(expiry, 0, kMaxEpochSeconds);
	// The signature covers the resource exactly as it appears (URL-encoded) in the token. SDKs
	// differ in what they encode, so accept the signature over either form.
	std::string sr;
	UrlDecode(sr_raw, &sr);
	std::string expected_raw = HmacSha256(key->key, sr_raw + "\n" + se);
	std::string expected_enc = HmacSha256(key->key, UrlEncode(sr) + "\n" + se);
	std::string got;
	if (!Base64Decode(sig, &got) ||
	    !((got.size() == expected_raw.size() && CRYPTO_memcmp(got.data(), expected_raw.data(), got.size()) == 0) ||
	      (got.size() == expected_enc.size() && CRYPTO_memcmp(got.data(), expected_enc.data(), got.size()) == 0))) {
		g.error = "SAS signature does not match key '" + skn + "'";
		return g;
	}
	if (expiry * 1000LL <= now_ms) {
		g.error = "SAS token expired at " + FormatTime(expiry * 1000LL);
		return g;
	}
	g.ok = true;
	g.scope = AudiencePath(sr);
	g.expires_ms = expiry * 1000LL;
	g.rights = key->rights;
	g.identity = "sas:" + skn;
	return g;
}

struct JwtKeys::Impl {
	struct Key {
		std::string kid;
		EVP_PKEY *pkey = nullptr;
	};
	std::vector<Key> keys;
	~Impl() {
		for (auto &k : keys)
			EVP_PKEY_free(k.pkey);
	}
};

JwtKeys::JwtKeys() : impl_(new Impl) {}
JwtKeys::~JwtKeys() = default;
size_t
JwtKeys::size() const {
	return impl_->keys.size();
}

namespace {
bool
ReadFile(const std::string &path, std::string *out, std::string *err) {
	std::ifstream f(path, std::ios::binary);
	if (!f) {
		*err = "cannot read " + path;
		return false;
	}
	std::stringstream ss;
	ss << f.rdbuf();
	*out = ss.str();
	return true;
}
} // namespace

bool
JwtKeys::AddPemFile(const std::string &path, std::string *err) {
	std::string pem;
	if (!ReadFile(path, &pem, err))
		return false;
	BIO *bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
	EVP_PKEY *key = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
	if (!key) {
		BIO_free(bio);
		bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
		X509 *cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
		if (cert) {
			key = X509_get_pubkey(cert);
			X509_free(cert);
		}
	}
	BIO_free(bio);
	if (!key) {
		*err = path + " holds no PEM public key or certificate";
		return false;
	}
	impl_->keys.push_back({"", key});
	return true;
}

bool
JwtKeys::AddJwksFile(const std::string &path, std::string *err) {
	std::string text;
	if (!ReadFile(path, &text, err))
		return false;
	rapidjson::Document doc;
	doc.Parse(text.c_str(), text.size());
	if (doc.HasParseError() || !doc.IsObject() || !doc.HasMember("keys") || !doc["keys"].IsArray()) {
		*err = path + " is not a JWKS document ({\"keys\": [...]})";
		return false;
	}
	size_t added = 0;
	for (auto &k : doc["keys"].GetArray()) {
		if (!k.IsObject() || !k.HasMember("kty") || !k["kty"].IsString() || std::string(k["kty"].GetString()) != "RSA")
			continue;
		if (!k.HasMember("n") || !k["n"].IsString() || !k.HasMember("e") || !k["e"].IsString())
			continue;
		std::string n, e;
		if (!Base64Decode(k["n"].GetString(), &n) || !Base64Decode(k["e"].GetString(), &e))
			continue;
		BIGNUM *bn_n = BN_bin2bn(reinterpret_cast<const unsigned char *>(n.data()), static_cast<int>(n.size()),
		                         nullptr);
		BIGNUM *bn_e = BN_bin2bn(reinterpret_cast<const unsigned char *>(e.data()), static_cast<int>(e.size()),
		                         nullptr);
		OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
		OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n);
		OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e);
		OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
		EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr);
		EVP_PKEY *pkey = nullptr;
		if (ctx && EVP_PKEY_fromdata_init(ctx) > 0)
			EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params);
		EVP_PKEY_CTX_free(ctx);
		OSSL_PARAM_free(params);
		OSSL_PARAM_BLD_free(bld);
		BN_free(bn_n);
		BN_free(bn_e);
		if (pkey) {
			std::string kid = k.HasMember("kid") && k["kid"].IsString() ? k["kid"].GetString() : "";
			impl_->keys.push_back({kid, pkey});
			++added;
		}
	}
	if (added == 0) {
		*err = path + " contains no usable RSA key";
		return false;
	}
	return true;
}

TokenGrant
JwtKeys::Verify(std::string_view jwt, int64_t now_ms, const std::vector<std::string> &audiences) const {
	TokenGrant g;
	size_t d1 = jwt.find('.');
	size_t d2 = d1 == std::string_view::npos ? d1 : jwt.find('.', d1 + 1);
	if (d2 == std::string_view::npos) {
		g.error = "token is not a JWT (expected three dot-separated parts)";
		return g;
	}
	std::string header, payload, sig;
	if (!Base64Decode(jwt.substr(0, d1), &header) || !Base64Decode(jwt.substr(d1 + 1, d2 - d1 - 1), &payload) ||
	    !Base64Decode(jwt.substr(d2 + 1), &sig)) {
		g.error = "JWT is not base64url encoded";
		return g;
	}
	rapidjson::Document h, p;
	h.Parse(header.c_str(), header.size());
	p.Parse(payload.c_str(), payload.size());
	if (h.HasParseError() || !h.IsObject() || p.HasParseError() || !p.IsObject()) {
		g.error = "JWT header or payload is not a JSON object";
		return g;
	}
	if (!h.HasMember("alg") || !h["alg"].IsString() || std::string(h["alg"].GetString()) != "RS256") {
		g.error = "JWT alg must be RS256";
		return g;
	}
	if (impl_->keys.empty()) {
		g.error = "no JWT signing keys are configured (--jwt-public-key or --jwks)";
		return g;
	}
	std::string kid = h.HasMember("kid") && h["kid"].IsString() ? h["kid"].GetString() : "";
	std::string_view signed_part = jwt.substr(0, d2);
	bool verified = false;
	for (auto &k : impl_->keys) {
		if (!kid.empty() && !k.kid.empty() && k.kid != kid)
			continue;
		EVP_MD_CTX *md = EVP_MD_CTX_new();
		if (EVP_DigestVerifyInit(md, nullptr, EVP_sha256(), nullptr, k.pkey) == 1 &&
		    EVP_DigestVerify(md, reinterpret_cast<const unsigned char *>(sig.data()), sig.size(),
		                     reinterpret_cast<const unsigned char *>(signed_part.data()), signed_part.size()) == 1)
			verified = true;
		EVP_MD_CTX_free(md);
		if (verified)
			break;
	}
	if (!verified) {
		g.error = "JWT signature does not verify against any configured key";
		return g;
	}
	// aud may be a string or an array of strings.
	bool aud_ok = false;
	auto aud_matches = [&](const std::string &a) {
		std::string t = a;
		while (!t.empty() && t.back() == '/')
			t.pop_back();
		for (auto &want : audiences) {
			std::string w = want;
			while (!w.empty() && w.back() == '/')
				w.pop_back();
			if (IEquals(t, w))
				return true;
		}
		return false;
	};
	std::string aud_seen;
	if (p.HasMember("aud") && p["aud"].IsString()) {
		aud_seen = p["aud"].GetString();
		aud_ok = aud_matches(aud_seen);
	} else if (p.HasMember("aud") && p["aud"].IsArray()) {
		for (auto &a : p["aud"].GetArray())
			if (a.IsString() && aud_matches(a.GetString()))
				aud_ok = true;
		aud_seen = "(array)";
	}
	if (!aud_ok) {
		g.error = "JWT audience '" + aud_seen + "' is not https://servicebus.azure.net";
		return g;
	}
	if (!p.HasMember("exp") || !p["exp"].IsNumber()) {
		g.error = "JWT has no exp claim";
		return g;
	}
	int64_t exp_ms = EpochMs(p["exp"].GetDouble());
	if (exp_ms <= now_ms) {
		g.error = "JWT expired at " + FormatTime(exp_ms);
		return g;
	}
	if (p.HasMember("nbf") && p["nbf"].IsNumber()) {
		int64_t nbf_ms = EpochMs(p["nbf"].GetDouble());
		if (nbf_ms > now_ms) {
			g.error = "JWT is not valid before " + FormatTime(nbf_ms);
			return g;
		}
	}
	g.ok = true;
	g.expires_ms = exp_ms;
	g.rights = kAllRights;
	for (const char *claim : {"oid", "appid", "azp", "sub"}) {
		if (p.HasMember(claim) && p[claim].IsString()) {
			g.identity = std::string("jwt:") + p[claim].GetString();
			break;
		}
	}
	if (g.identity.empty())
		g.identity = "jwt";
	// Optional Service Bus data roles, as Entra ID app roles would carry them.
	if (p.HasMember("roles") && p["roles"].IsArray()) {
		unsigned r = 0;
		for (auto &role : p["roles"].GetArray()) {
			if (!role.IsString())
				continue;
			std::string name = ToLower(role.GetString());
			if (name.find("receiver") != std::string::npos || name == "listen")
				r |= kListen;
			else if (name.find("sender") != std::string::npos || name == "send")
				r |= kSend;
			else if (name.find("owner") != std::string::npos || name == "manage")
				r |= kAllRights;
		}
		if (r)
			g.rights = r;
	}
	return g;
}

} // namespace sbemu
