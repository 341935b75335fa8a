// src/identity/token.cpp
//   What the token providers share that needs no network: reading an identity's configuration and
//   secrets, parsing an identity endpoint's answer (expires_on, expires_in, refresh_in in their
//   several spellings), peeking at a JWT's claims for logs, and when to renew. Numbers from an
//   endpoint are bounded so that no later arithmetic on them overflows.
#include "sbpg/identity/token.hpp"

#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>

namespace sbpg {

namespace {

// A count of seconds from a JSON number or numeric string; -1 when absent, malformed or beyond a
// century (so that * 1000 and sums with the current time cannot overflow).
int64_t
JsonInt(const rapidjson::Value &v) {
	constexpr int64_t kMax = 100LL * 366 * 24 * 3600 + 4'000'000'000LL; // past 2096 as epoch seconds
	int64_t n = -1;
	if (v.IsInt64()) {
		n = v.GetInt64();
	} else if (v.IsNumber()) {
		double d = v.GetDouble();
		n = d >= 0 && d <= static_cast<double>(kMax) ? static_cast<int64_t>(d) : -1;
	} else if (v.IsString()) {
		const char *s = v.GetString();
		char *end = nullptr;
		errno = 0;
		long long x = std::strtoll(s, &end, 10);
		if (end && end != s && *end == '\0' && errno == 0)
			n = x;
	}
	return n >= 0 && n <= kMax ? n : -1;
}

// App Service's 2017 API wrote expires_on as a date ("11/26/2026 17:07:32 +00:00").
int64_t
ParseDateSeconds(const std::string &s) {
	struct tm tmv = {};
	int off_h = 0, off_m = 0;
	char sign = '+';
	if (std::sscanf(s.c_str(), "%d/%d/%d %d:%d:%d %c%d:%d", &tmv.tm_mon, &tmv.tm_mday, &tmv.tm_year, &tmv.tm_hour,
	                &tmv.tm_min, &tmv.tm_sec, &sign, &off_h, &off_m) < 6)
		return -1;
	tmv.tm_mon -= 1;
	tmv.tm_year -= 1900;
	int64_t t = timegm(&tmv);
	int64_t off = (off_h * 3600 + off_m * 60) * (sign == '-' ? -1 : 1);
	return t - off;
}

} // namespace

EnvLookup
ProcessEnv() {
	return [](const std::string &name) {
		const char *v = std::getenv(name.c_str());
		return std::string(v ? v : "");
	};
}

bool
PeekJwtClaims(const std::string &jwt, std::string *subject, std::string *audience, int64_t *exp_s) {
	size_t d1 = jwt.find('.');
	size_t d2 = d1 == std::string::npos ? d1 : jwt.find('.', d1 + 1);
	if (d2 == std::string::npos)
		return false;
	std::string payload;
	if (!Base64Decode(jwt.substr(d1 + 1, d2 - d1 - 1), &payload))
		return false;
	try {
		rapidjson::Document d;
		d.Parse(payload.c_str(), payload.size());
		if (d.HasParseError() || !d.IsObject())
			return false;
		if (subject) {
			subject->clear();
			for (const char *k : {"oid", "sub"})
				if (subject->empty() && d.HasMember(k) && d[k].IsString())
					*subject = d[k].GetString();
		}
		if (audience && d.HasMember("aud") && d["aud"].IsString())
			*audience = d["aud"].GetString();
		if (exp_s && d.HasMember("exp"))
			*exp_s = JsonInt(d["exp"]);
		return true;
	} catch (const std::exception &) {
		return false;
	}
}

int64_t
RefreshAt(int64_t obtained_ms, int64_t expires_ms, int64_t refresh_in_s) {
	int64_t lifetime = std::max<int64_t>(expires_ms - obtained_ms, 0);
	// At half-life, or later when the endpoint says so (refresh_in), never sooner: an endpoint
	// cannot make the worker renew more often than every half-life.
	int64_t at = obtained_ms + std::max<int64_t>(lifetime / 2, refresh_in_s > 0 ? refresh_in_s * 1000 : 0);
	// Long tokens: renew no later than a couple of minutes before they expire.
	at = std::min(at, expires_ms - std::min<int64_t>(120000, lifetime / 2));
	return std::max(at, obtained_ms + 1000);
}

TokenResult
ParseTokenResponse(const std::string &body, int64_t now_ms) {
	TokenResult r;
	try {
		rapidjson::Document d;
		d.Parse(body.c_str(), body.size());
		if (d.HasParseError() || !d.IsObject()) {
			r.error = "the answer is not a JSON object";
			return r;
		}
		if (!d.HasMember("access_token") || !d["access_token"].IsString() || !*d["access_token"].GetString()) {
			r.error = "the answer has no access_token";
			return r;
		}
		int64_t expires_on = d.HasMember("expires_on") ? JsonInt(d["expires_on"]) : -1;
		if (expires_on < 0 && d.HasMember("expires_on") && d["expires_on"].IsString())
			expires_on = ParseDateSeconds(d["expires_on"].GetString());
		int64_t expires_in = d.HasMember("expires_in") ? JsonInt(d["expires_in"]) : -1;
		int64_t refresh_in = d.HasMember("refresh_in") ? JsonInt(d["refresh_in"]) : -1;
		int64_t expires_ms;
		if (expires_on > 0)
			expires_ms = expires_on * 1000;
		else if (expires_in > 0)
			expires_ms = now_ms + expires_in * 1000;
		else {
			r.error = "the answer says neither expires_on nor expires_in";
			return r;
		}
		if (expires_ms <= now_ms) {
			r.error = "the token has already expired (clock skew?)";
			return r;
		}
		r.ok = true;
		r.token.token = d["access_token"].GetString();
		r.token.obtained_ms = now_ms;
		r.token.expires_ms = expires_ms;
		r.token.refresh_ms = RefreshAt(now_ms, expires_ms, refresh_in);
		PeekJwtClaims(r.token.token, &r.token.subject, &r.token.audience, nullptr);
		return r;
	} catch (const std::exception &e) {
		r.error = std::string("the answer could not be read: ") + e.what();
		return r;
	}
}

bool
ReadSecret(const std::string &file, const std::string &env_name, const EnvLookup &env, std::string *out,
           std::string *why) {
	if (!file.empty()) {
		std::ifstream f(file, std::ios::binary);
		if (!f) {
			*why = "cannot read the secret file " + file +
			       " (it must be readable by the server's operating system user)";
			return false;
		}
		std::stringstream ss;
		ss << f.rdbuf();
		*out = ss.str();
	} else if (!env_name.empty()) {
		*out = env(env_name);
		if (out->empty()) {
			*why = "environment variable " + env_name + " is not set in the server's environment";
			return false;
		}
	} else {
		*why = "no secret is configured";
		return false;
	}
	while (!out->empty() && (out->back() == '\n' || out->back() == '\r' || out->back() == ' ' || out->back() == '\t'))
		out->pop_back();
	if (out->empty()) {
		*why = file.empty() ? "environment variable " + env_name + " is empty"
		                    : "the secret file " + file + " is empty";
		return false;
	}
	return true;
}

bool
IdentityConfigFromJson(const std::string &kind, const std::string &options_json, IdentityConfig *cfg,
                       std::string *why) {
	cfg->kind = kind;
	try {
		rapidjson::Document d;
		d.Parse(options_json.c_str(), options_json.size());
		if (d.HasParseError() || !d.IsObject()) {
			*why = "the identity's options are not a JSON object";
			return false;
		}
		struct Field {
			const char *name;
			std::string *dest;
		};
		const Field fields[] = {
		    {"client_id", &cfg->client_id},
		    {"object_id", &cfg->object_id},
		    {"resource_id", &cfg->resource_id},
		    {"source", &cfg->source},
		    {"endpoint", &cfg->endpoint},
		    {"arc_key_dir", &cfg->arc_key_dir},
		    {"tenant_id", &cfg->tenant_id},
		    {"authority_host", &cfg->authority_host},
		    {"token_file", &cfg->token_file},
		    {"secret_file", &cfg->client_secret_file},
		    {"secret_env", &cfg->client_secret_env},
		};
		for (auto m = d.MemberBegin(); m != d.MemberEnd(); ++m) {
			std::string name(m->name.GetString(), m->name.GetStringLength());
			const Field *f = nullptr;
			for (auto &x : fields)
				if (name == x.name)
					f = &x;
			if (!f)
				continue; // validated by sbpg.create_identity; other kinds' options are not ours
			if (!m->value.IsString()) {
				*why = "identity option " + name + " is not a string";
				return false;
			}
			*f->dest = std::string(m->value.GetString(), m->value.GetStringLength());
		}
		return true;
	} catch (const std::exception &e) {
		*why = std::string("the identity's options cannot be read: ") + e.what();
		return false;
	}
}

} // namespace sbpg
