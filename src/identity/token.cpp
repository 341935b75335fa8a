// src/identity/token.cpp
//   Entra ID token providers over libcurl, and the TokenSource thread. Protocol facts and their
//   sources: servicebus-amqp.md section 8 in the steering repository.
#include "sbpg/identity/token.hpp"

#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/http.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pthread.h>

namespace sbpg {

namespace {

constexpr char kImdsDefault[] = "http://169.254.169.254/metadata/identity/oauth2/token";
constexpr char kAuthorityDefault[] = "https://login.microsoftonline.com";

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

std::string
JsonError(const std::string &body) {
	try {
		rapidjson::Document d;
		d.Parse(body.c_str(), body.size());
		if (!d.HasParseError() && d.IsObject()) {
			std::string e, desc;
			if (d.HasMember("error") && d["error"].IsString())
				e = d["error"].GetString();
			else if (d.HasMember("error") && d["error"].IsObject() && d["error"].HasMember("code") &&
			         d["error"]["code"].IsString())
				e = d["error"]["code"].GetString();
			if (d.HasMember("error_description") && d["error_description"].IsString())
				desc = d["error_description"].GetString();
			else if (d.HasMember("message") && d["message"].IsString())
				desc = d["message"].GetString();
			if (!e.empty() || !desc.empty())
				return e + (desc.empty() ? "" : ": " + desc);
		}
	} catch (const std::exception &) {
		// Not JSON: fall through to a generic description.
	}
	return "";
}

// Replaces every occurrence of each secret (an endpoint could echo what it was sent).
void
Redact(std::string *text, const std::vector<std::string> &secrets) {
	for (auto &sec : secrets) {
		if (sec.size() < 4)
			continue;
		for (size_t at; (at = text->find(sec)) != std::string::npos;)
			text->replace(at, sec.size(), "[redacted]");
	}
}

// Turns an HTTP exchange into a TokenResult. retry_404: a 404 or 410 is worth retrying (the
// managed identity endpoints answer it while they start). `secrets` are what the request carried:
// they never reach the error text.
TokenResult
FromHttp(const HttpResponse &r, const std::string &what, bool retry_404, const std::vector<std::string> &secrets = {}) {
	TokenResult res;
	res.http_status = r.status;
	if (r.status == 0) {
		res.error = what + ": " + (r.timed_out ? "timed out" : r.error);
		Redact(&res.error, secrets);
		res.retryable = !r.local_error;
		return res;
	}
	if (r.status == 200) {
		res = ParseTokenResponse(r.body, WallMs());
		if (!res.ok)
			res.error = what + ": " + res.error;
		res.http_status = 200;
		return res;
	}
	std::string detail = JsonError(r.body);
	Redact(&detail, secrets);
	if (detail.size() > 300)
		detail = detail.substr(0, 300) + "...";
	res.error = what + " answered HTTP " + std::to_string(r.status) + (detail.empty() ? "" : " (" + detail + ")");
	res.retryable = r.status == 408 || r.status == 429 || r.status >= 500 || (retry_404 && (r.status == 404 || r.status == 410));
	auto ra = r.headers.find("retry-after");
	if (ra != r.headers.end()) {
		long s = std::atol(ra->second.c_str());
		if (s > 0 && s < 3600)
			res.retry_after_ms = s * 1000;
	}
	return res;
}

std::string
Query(const std::vector<std::pair<std::string, std::string>> &q) {
	return FormEncode(q);
}

std::string
Join(const std::string &base, const std::string &query) {
	return base + (base.find('?') == std::string::npos ? "?" : "&") + query;
}

// ---- Managed identity: IMDS

class ImdsProvider : public TokenProvider {
  public:
	ImdsProvider(IdentityConfig cfg, std::string endpoint) : cfg_(std::move(cfg)), endpoint_(std::move(endpoint)) {}
	TokenResult Fetch() override {
		std::vector<std::pair<std::string, std::string>> q = {{"api-version", "2018-02-01"}, {"resource", cfg_.resource}};
		if (!cfg_.client_id.empty())
			q.emplace_back("client_id", cfg_.client_id);
		if (!cfg_.object_id.empty())
			q.emplace_back("object_id", cfg_.object_id);
		if (!cfg_.resource_id.empty())
			q.emplace_back("msi_res_id", cfg_.resource_id);
		HttpRequest req;
		req.url = Join(endpoint_, Query(q));
		req.headers = {"Metadata: true"};
		req.no_proxy = true;
		req.timeout_ms = cfg_.timeout_ms;
		req.abort = abort_;
		req.extra_ca_file = cfg_.extra_ca_file;
		req.connect_timeout_ms = std::min<long>(cfg_.timeout_ms, 2000);
		TokenResult r = FromHttp(Http(req), "the instance metadata endpoint", true);
		if (r.http_status == 400)
			r.error += "; is a managed identity assigned to this machine (and, for a user-assigned one, is its id right)?";
		return r;
	}
	std::string Describe() const override { return "managed identity (instance metadata endpoint " + endpoint_ + ")"; }

  private:
	IdentityConfig cfg_;
	std::string endpoint_;
};

// ---- Managed identity: App Service, Functions, Container Apps

class AppServiceProvider : public TokenProvider {
  public:
	AppServiceProvider(IdentityConfig cfg, std::string endpoint, std::string header)
	    : cfg_(std::move(cfg)), endpoint_(std::move(endpoint)), header_(std::move(header)) {}
	TokenResult Fetch() override {
		std::vector<std::pair<std::string, std::string>> q = {{"api-version", "2019-08-01"}, {"resource", cfg_.resource}};
		if (!cfg_.client_id.empty())
			q.emplace_back("client_id", cfg_.client_id);
		if (!cfg_.object_id.empty())
			q.emplace_back("principal_id", cfg_.object_id);
		if (!cfg_.resource_id.empty())
			q.emplace_back("mi_res_id", cfg_.resource_id);
		HttpRequest req;
		req.url = Join(endpoint_, Query(q));
		req.headers = {"X-IDENTITY-HEADER: " + header_};
		req.no_proxy = true;
		req.timeout_ms = cfg_.timeout_ms;
		req.abort = abort_;
		req.extra_ca_file = cfg_.extra_ca_file;
		return FromHttp(Http(req), "the App Service identity endpoint", true, {header_});
	}
	std::string Describe() const override { return "managed identity (App Service identity endpoint " + endpoint_ + ")"; }

  private:
	IdentityConfig cfg_;
	std::string endpoint_, header_;
};

// ---- Managed identity: Azure Arc (a 401 challenge names a key file; answer with its contents)

class ArcProvider : public TokenProvider {
  public:
	ArcProvider(IdentityConfig cfg, std::string endpoint) : cfg_(std::move(cfg)), endpoint_(std::move(endpoint)) {}
	TokenResult Fetch() override {
		std::vector<std::pair<std::string, std::string>> q = {{"api-version", "2020-06-01"}, {"resource", cfg_.resource}};
		HttpRequest req;
		req.url = Join(endpoint_, Query(q));
		req.headers = {"Metadata: true"};
		req.no_proxy = true;
		req.timeout_ms = cfg_.timeout_ms;
		req.abort = abort_;
		req.extra_ca_file = cfg_.extra_ca_file;
		HttpResponse first = Http(req);
		if (first.status != 401)
			return FromHttp(first, "the Azure Arc identity endpoint", true);
		auto auth = first.headers.find("www-authenticate");
		std::string realm;
		if (auth != first.headers.end()) {
			size_t eq = auth->second.find('=');
			if (eq != std::string::npos)
				realm = auth->second.substr(eq + 1);
		}
		TokenResult bad;
		bad.retryable = false;
		if (realm.empty()) {
			bad.error = "the Azure Arc identity endpoint answered 401 without a key file challenge";
			return bad;
		}
		// Read only a small .key file in the agent's directory: the endpoint names the file, and
		// its contents are sent back, so anything else would be an exfiltration path.
		std::string dir = cfg_.arc_key_dir;
		while (!dir.empty() && dir.back() == '/')
			dir.pop_back();
		size_t slash = realm.rfind('/');
		if (slash == std::string::npos || realm.substr(0, slash) != dir || realm.size() < 5 ||
		    realm.compare(realm.size() - 4, 4, ".key") != 0 || realm.find("..") != std::string::npos) {
			bad.error = "the Azure Arc identity endpoint named a key file outside " + dir + " or not ending in .key";
			return bad;
		}
		// No symbolic links, a regular file, small: read through the descriptor that was checked.
		int fd = open(realm.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		struct stat st;
		if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > 4096) {
			if (fd >= 0)
				close(fd);
			bad.error = "the Azure Arc key file " + realm + " is missing, unreadable, a link, not a file, or larger than 4096 bytes";
			return bad;
		}
		std::string key(static_cast<size_t>(st.st_size), '\0');
		ssize_t got = read(fd, &key[0], key.size());
		close(fd);
		if (got < 0) {
			bad.error = "cannot read the Azure Arc key file " + realm;
			return bad;
		}
		key.resize(static_cast<size_t>(got));
		req.headers.push_back("Authorization: Basic " + key);
		return FromHttp(Http(req), "the Azure Arc identity endpoint", true, {key});
	}
	std::string Describe() const override { return "managed identity (Azure Arc identity endpoint " + endpoint_ + ")"; }

  private:
	IdentityConfig cfg_;
	std::string endpoint_;
};

// ---- Entra ID v2 token endpoint: client credentials with a secret or a federated assertion

class EntraProvider : public TokenProvider {
  public:
	EntraProvider(IdentityConfig cfg, std::string authority, bool assertion)
	    : cfg_(std::move(cfg)), authority_(std::move(authority)), assertion_(assertion) {}
	TokenResult Fetch() override {
		std::vector<std::pair<std::string, std::string>> form = {{"grant_type", "client_credentials"},
		                                                         {"client_id", cfg_.client_id},
		                                                         {"scope", cfg_.resource + "/.default"}};
		if (assertion_) {
			// The kubelet rotates the projected token: read it at every exchange.
			std::ifstream f(cfg_.token_file);
			if (!f) {
				TokenResult r;
				r.error = "cannot read the federated token file " + cfg_.token_file;
				r.retryable = false; // until someone fixes it: retried slowly
				return r;
			}
			std::stringstream ss;
			ss << f.rdbuf();
			std::string t = ss.str();
			while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' '))
				t.pop_back();
			form.emplace_back("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
			form.emplace_back("client_assertion", t);
		} else {
			std::string secret = cfg_.client_secret, why;
			if (secret.empty() && !ReadSecret(cfg_.client_secret_file, cfg_.client_secret_env, ProcessEnv(), &secret, &why)) {
				TokenResult r;
				r.error = why;
				r.retryable = false;
				return r;
			}
			form.emplace_back("client_secret", secret);
		}
		HttpRequest req;
		req.method = "POST";
		req.url = authority_ + "/" + cfg_.tenant_id + "/oauth2/v2.0/token";
		req.headers = {"Content-Type: application/x-www-form-urlencoded", "Accept: application/json"};
		req.body = FormEncode(form);
		req.timeout_ms = cfg_.timeout_ms;
		req.abort = abort_;
		req.extra_ca_file = cfg_.extra_ca_file;
		std::vector<std::string> sent;
		for (auto &f : form)
			if (f.first == "client_secret" || f.first == "client_assertion")
				sent.push_back(f.second);
		return FromHttp(Http(req), "the Entra ID token endpoint " + authority_, false, sent);
	}
	std::string Describe() const override {
		return std::string(assertion_ ? "workload identity" : "client secret") + " (tenant " + cfg_.tenant_id +
		       ", client " + cfg_.client_id + ", authority " + authority_ + ")";
	}

  private:
	IdentityConfig cfg_;
	std::string authority_;
	bool assertion_;
};

std::string
Authority(const IdentityConfig &cfg, const EnvLookup &env, std::string *why) {
	std::string a = !cfg.authority_host.empty() ? cfg.authority_host : env("AZURE_AUTHORITY_HOST");
	if (a.empty())
		a = kAuthorityDefault;
	while (!a.empty() && a.back() == '/')
		a.pop_back();
	if (!IStartsWith(a, "https://")) {
		*why = "the authority host must use https: " + a;
		return "";
	}
	return a;
}

std::unique_ptr<TokenProvider>
MakeManaged(IdentityConfig cfg, const EnvLookup &env, std::string *why) {
	int ids = !cfg.client_id.empty() + !cfg.object_id.empty() + !cfg.resource_id.empty();
	if (ids > 1) {
		*why = "give at most one of client_id, object_id, resource_id";
		return nullptr;
	}
	std::string source = cfg.source.empty() ? "auto" : ToLower(cfg.source);
	std::string identity_endpoint = env("IDENTITY_ENDPOINT");
	if (source == "auto") {
		if (!identity_endpoint.empty() && !env("IMDS_ENDPOINT").empty())
			source = "arc";
		else if (!identity_endpoint.empty() && !env("IDENTITY_HEADER").empty())
			source = "app_service";
		else
			source = "imds";
	}
	if (source == "imds") {
		std::string ep = cfg.endpoint;
		if (ep.empty()) {
			std::string host = env("AZURE_POD_IDENTITY_AUTHORITY_HOST");
			while (!host.empty() && host.back() == '/')
				host.pop_back();
			ep = host.empty() ? kImdsDefault : host + "/metadata/identity/oauth2/token";
		}
		return std::unique_ptr<TokenProvider>(new ImdsProvider(cfg, ep));
	}
	if (source == "app_service") {
		std::string ep = cfg.endpoint.empty() ? identity_endpoint : cfg.endpoint;
		std::string header = env("IDENTITY_HEADER");
		if (ep.empty() || header.empty()) {
			*why = "the App Service identity endpoint needs IDENTITY_ENDPOINT and IDENTITY_HEADER in the server's environment";
			return nullptr;
		}
		return std::unique_ptr<TokenProvider>(new AppServiceProvider(cfg, ep, header));
	}
	if (source == "arc") {
		if (ids > 0) {
			*why = "Azure Arc supports only the system-assigned identity (no client_id, object_id or resource_id)";
			return nullptr;
		}
		std::string ep = cfg.endpoint.empty() ? identity_endpoint : cfg.endpoint;
		if (ep.empty()) {
			*why = "Azure Arc needs IDENTITY_ENDPOINT in the server's environment";
			return nullptr;
		}
		return std::unique_ptr<TokenProvider>(new ArcProvider(cfg, ep));
	}
	*why = "unknown managed identity source '" + source + "' (auto, imds, app_service, arc)";
	return nullptr;
}

// DefaultAzureCredential's order: environment (client secret), workload identity, managed
// identity. A step that is not configured here is skipped, and the reason noted; the first step
// that returns a token is kept.
class DefaultChain : public TokenProvider {
  public:
	DefaultChain(IdentityConfig cfg, EnvLookup env) : cfg_(std::move(cfg)), env_(std::move(env)) {}
	TokenResult Fetch() override {
		if (chosen_)
			return chosen_->Fetch();
		TokenResult last;
		std::vector<std::string> errors;
		for (int step = 0; step < 3; ++step) {
			std::string why;
			std::unique_ptr<TokenProvider> p = Build(step, &why);
			if (!p) {
				notes_.push_back("default credential: skipped " + std::string(kSteps[step]) + ": " + why);
				continue;
			}
			p->SetAbort(abort_);
			TokenResult r = p->Fetch();
			if (r.ok) {
				notes_.push_back("default credential: using " + p->Describe());
				chosen_ = std::move(p);
				return r;
			}
			notes_.push_back("default credential: " + std::string(kSteps[step]) + " failed: " + r.error);
			errors.push_back(r.error);
			last = r;
		}
		if (errors.empty()) {
			last.error = "no credential is configured: " + std::string(kSteps[0]) + ", " + kSteps[1] + " and " + kSteps[2] +
			             " were all skipped";
			last.retryable = false;
		} else {
			last.error = "no credential in the default chain returned a token; last: " + last.error;
		}
		return last;
	}
	std::string Describe() const override {
		return chosen_ ? "default chain: " + chosen_->Describe() : "default chain (environment, workload identity, managed identity)";
	}
	std::vector<std::string> TakeNotes() override {
		std::vector<std::string> n;
		n.swap(notes_);
		return n;
	}

  private:
	static constexpr const char *kSteps[3] = {"environment", "workload identity", "managed identity"};
	std::unique_ptr<TokenProvider> Build(int step, std::string *why) {
		IdentityConfig c = cfg_;
		if (step == 0) {
			c.tenant_id = env_("AZURE_TENANT_ID");
			c.client_id = env_("AZURE_CLIENT_ID");
			c.client_secret = env_("AZURE_CLIENT_SECRET");
			if (c.tenant_id.empty() || c.client_id.empty() || c.client_secret.empty()) {
				*why = "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are not all set";
				return nullptr;
			}
			std::string a = Authority(c, env_, why);
			if (a.empty())
				return nullptr;
			return std::unique_ptr<TokenProvider>(new EntraProvider(c, a, false));
		}
		if (step == 1) {
			c.tenant_id = env_("AZURE_TENANT_ID");
			c.client_id = cfg_.client_id.empty() ? env_("AZURE_CLIENT_ID") : cfg_.client_id;
			c.token_file = env_("AZURE_FEDERATED_TOKEN_FILE");
			if (c.tenant_id.empty() || c.client_id.empty() || c.token_file.empty()) {
				*why = "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE are not all set";
				return nullptr;
			}
			std::string a = Authority(c, env_, why);
			if (a.empty())
				return nullptr;
			return std::unique_ptr<TokenProvider>(new EntraProvider(c, a, true));
		}
		c.client_id = cfg_.client_id.empty() ? env_("AZURE_CLIENT_ID") : cfg_.client_id;
		return MakeManaged(c, env_, why);
	}
	IdentityConfig cfg_;
	EnvLookup env_;
	std::unique_ptr<TokenProvider> chosen_;
	std::vector<std::string> notes_;
};

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
			*why = "cannot read the secret file " + file + " (it must be readable by the server's operating system user)";
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
		*why = file.empty() ? "environment variable " + env_name + " is empty" : "the secret file " + file + " is empty";
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
		const Field fields[] = {{"client_id", &cfg->client_id},
		                        {"object_id", &cfg->object_id},
		                        {"resource_id", &cfg->resource_id},
		                        {"source", &cfg->source},
		                        {"endpoint", &cfg->endpoint},
		                        {"arc_key_dir", &cfg->arc_key_dir},
		                        {"tenant_id", &cfg->tenant_id},
		                        {"authority_host", &cfg->authority_host},
		                        {"token_file", &cfg->token_file},
		                        {"secret_file", &cfg->client_secret_file},
		                        {"secret_env", &cfg->client_secret_env}};
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

std::unique_ptr<TokenProvider>
MakeTokenProvider(const IdentityConfig &cfg, const EnvLookup &env, std::string *why) {
	if (cfg.kind == "managed_identity")
		return MakeManaged(cfg, env, why);
	if (cfg.kind == "workload_identity" || cfg.kind == "client_secret") {
		IdentityConfig c = cfg;
		bool assertion = cfg.kind == "workload_identity";
		if (c.tenant_id.empty())
			c.tenant_id = env("AZURE_TENANT_ID");
		if (c.client_id.empty())
			c.client_id = env("AZURE_CLIENT_ID");
		if (assertion && c.token_file.empty())
			c.token_file = env("AZURE_FEDERATED_TOKEN_FILE");
		if (c.tenant_id.empty() || c.client_id.empty()) {
			*why = "tenant_id and client_id are needed (options, or AZURE_TENANT_ID and AZURE_CLIENT_ID in the server's environment)";
			return nullptr;
		}
		if (assertion && c.token_file.empty()) {
			*why = "the federated token file is needed (option token_file, or AZURE_FEDERATED_TOKEN_FILE)";
			return nullptr;
		}
		if (!assertion && c.client_secret.empty() && c.client_secret_file.empty() && c.client_secret_env.empty()) {
			*why = "the client secret is missing";
			return nullptr;
		}
		std::string a = Authority(c, env, why);
		if (a.empty())
			return nullptr;
		return std::unique_ptr<TokenProvider>(new EntraProvider(c, a, assertion));
	}
	if (cfg.kind == "default")
		return std::unique_ptr<TokenProvider>(new DefaultChain(cfg, env));
	*why = "identity kind '" + cfg.kind + "' does not use Entra ID tokens";
	return nullptr;
}

// ---- TokenSource

TokenSource::TokenSource(std::unique_ptr<TokenProvider> provider, std::function<void()> on_change)
    : provider_(std::move(provider)), on_change_(std::move(on_change)), rng_(std::random_device{}()) {
	status_.provider = provider_->Describe();
}

TokenSource::~TokenSource() {
	Stop();
}

void
TokenSource::Start() {
	if (started_)
		return;
	started_ = true;
	HttpGlobalInit();
	provider_->SetAbort(&abort_);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	thread_ = std::thread([this] { Run(); });
	pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void
TokenSource::Stop() {
	{
		std::lock_guard<std::mutex> g(mu_);
		if (stop_)
			return;
		stop_ = true;
	}
	cv_.notify_all();
	if (thread_.joinable())
		thread_.join();
}

bool
TokenSource::Current(AccessToken *out) {
	std::lock_guard<std::mutex> g(mu_);
	if (token_.token.empty() || token_.expires_ms <= WallMs())
		return false;
	*out = token_;
	return true;
}

TokenSource::Status
TokenSource::GetStatus() {
	std::lock_guard<std::mutex> g(mu_);
	Status s = status_;
	s.has_token = !token_.token.empty() && token_.expires_ms > WallMs();
	s.expires_ms = token_.expires_ms;
	s.subject = token_.subject;
	return s;
}

void
TokenSource::Abort() {
	abort_.store(true);
	Stop();
}

std::vector<TokenSource::LogLine>
TokenSource::TakeLog() {
	std::lock_guard<std::mutex> g(mu_);
	std::vector<LogLine> l;
	l.swap(log_);
	return l;
}

void
TokenSource::Invalidate(uint64_t serial, const std::string &why) {
	{
		std::lock_guard<std::mutex> g(mu_);
		if (serial != token_.serial)
			return; // a newer token is already there
		++refusals_;
		int64_t now = WallMs();
		int64_t ceiling = std::min<int64_t>(300000, 1000LL << std::min(refusals_ - 1, 16));
		int64_t delay = ceiling / 2 + static_cast<int64_t>(rng_() % static_cast<uint64_t>(ceiling / 2 + 1));
		// Never sooner than a failure backoff or Retry-After the endpoint asked for.
		int64_t at = std::max(now + (refusals_ == 1 ? 0 : delay), backoff_until_);
		if (at <= now)
			force_ = true;
		else if (at < next_ms_)
			next_ms_ = at;
		log_.push_back({false, "the broker refused token " + std::to_string(serial) + " (" + why + "); " +
		                           (at <= now ? std::string("asking for a new one now")
		                                      : "asking for a new one in " + std::to_string(at - now) + " ms")});
	}
	cv_.notify_all();
}

void
TokenSource::Accepted(uint64_t serial) {
	std::lock_guard<std::mutex> g(mu_);
	if (serial == token_.serial)
		refusals_ = 0;
}

void
TokenSource::Run() {
	std::mt19937_64 rng{std::random_device{}()};
	int failures = 0;
	for (;;) {
		{
			std::unique_lock<std::mutex> g(mu_);
			while (!stop_ && !force_ && WallMs() < next_ms_)
				cv_.wait_for(g, std::chrono::milliseconds(std::min<int64_t>(next_ms_ - WallMs(), 1000)));
			if (stop_)
				return;
			force_ = false;
		}
		TokenResult r = provider_->Fetch();
		std::vector<std::string> notes = provider_->TakeNotes();
		int64_t now = WallMs();
		bool changed = true;
		{
			std::lock_guard<std::mutex> g(mu_);
			for (auto &n : notes)
				log_.push_back({false, n});
			++status_.fetches;
			status_.provider = provider_->Describe();
			if (r.ok) {
				int recovering = failures;
				token_ = r.token;
				token_.serial = next_serial_++;
				failures = 0;
				next_ms_ = r.token.refresh_ms;
				backoff_until_ = 0;
				bool routine = token_.serial > 1 && !recovering;
				log_.push_back({routine, "token " + std::to_string(token_.serial) + " obtained from " + status_.provider +
				                             (recovering ? " after " + std::to_string(recovering) + " failed attempts" : "") +
				                             ": subject " + (r.token.subject.empty() ? "?" : r.token.subject) +
				                             ", audience " + (r.token.audience.empty() ? "?" : r.token.audience) +
				                             ", expires " + FormatTime(r.token.expires_ms) + ", next renewal " +
				                             FormatTime(next_ms_)});
				status_.last_error.clear();
			} else {
				++failures;
				++status_.failures;
				// Exponential backoff with full jitter; slower for errors a retry is unlikely to cure.
				int64_t base = r.retryable ? 500 : 10000;
				int64_t cap = r.retryable ? 30000 : 300000;
				int64_t ceiling = std::min<int64_t>(cap, base << std::min(failures - 1, 16));
				int64_t delay = static_cast<int64_t>(rng() % static_cast<uint64_t>(ceiling + 1));
				// While the current token is valid, try again within its remaining life...
				if (!token_.token.empty() && token_.expires_ms > now)
					delay = std::min<int64_t>(delay, std::max<int64_t>((token_.expires_ms - now) / 2, 1000));
				// ...but never sooner than the endpoint asked, nor in a tight loop.
				delay = std::max<int64_t>({delay, r.retry_after_ms, 250});
				next_ms_ = now + delay;
				backoff_until_ = next_ms_;
				changed = status_.last_error != r.error || failures == 1;
				status_.last_error = r.error;
				status_.last_error_ms = now;
				log_.push_back({false, "token request failed (attempt " + std::to_string(failures) + ", " +
				                           (r.retryable ? "retrying" : "not likely to be cured by a retry; retrying slowly") +
				                           " in " + std::to_string(delay) + " ms): " + r.error});
			}
		}
		if (changed && on_change_)
			on_change_();
	}
}

} // namespace sbpg
