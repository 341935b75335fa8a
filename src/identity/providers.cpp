// src/identity/providers.cpp
//   The Entra ID token providers, one class per way of getting a token: managed identity (IMDS, App
//   Service, Azure Arc), the Entra ID v2 endpoint (client secret or federated assertion) and the
//   default chain; MakeTokenProvider picks one from an IdentityConfig. Every request goes through
//   Http (src/identity/http.cpp); what a request carried (secret, assertion, key) never reaches an
//   error text. Protocol facts and their sources: servicebus-amqp.md section 8 in the steering
//   repository.
#include "sbpg/identity/token.hpp"

#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/http.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sbpg {

namespace {

constexpr char kImdsDefault[] = "http://169.254.169.254/metadata/identity/oauth2/token";
constexpr char kAuthorityDefault[] = "https://login.microsoftonline.com";

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
	res.retryable = r.status == 408 || r.status == 429 || r.status >= 500 ||
	                (retry_404 && (r.status == 404 || r.status == 410));
	auto ra = r.headers.find("retry-after");
	if (ra != r.headers.end()) {
		long s = std::atol(ra->second.c_str());
		if (s > 0 && s < 3600)
			res.retry_after_ms = s * 1000;
	}
	return res;
}

std::string
Join(const std::string &base, const std::string &query) {
	return base + (base.find('?') == std::string::npos ? "?" : "&") + query;
}

// The query parameters a managed identity endpoint names a user-assigned identity's ids with
// (null: that id is not sent).
struct IdParams {
	const char *client_id = nullptr, *object_id = nullptr, *resource_id = nullptr;
};

// A GET of a managed identity endpoint: api-version, resource and the configured ids in the query,
// one header, never through a proxy.
HttpRequest
ManagedRequest(const IdentityConfig &cfg, const std::string &endpoint, const char *api_version, const IdParams &ids,
               std::string header, const std::atomic<bool> *abort) {
	std::vector<std::pair<std::string, std::string>> q = {{"api-version", api_version}, {"resource", cfg.resource}};
	if (ids.client_id && !cfg.client_id.empty())
		q.emplace_back(ids.client_id, cfg.client_id);
	if (ids.object_id && !cfg.object_id.empty())
		q.emplace_back(ids.object_id, cfg.object_id);
	if (ids.resource_id && !cfg.resource_id.empty())
		q.emplace_back(ids.resource_id, cfg.resource_id);
	HttpRequest req;
	req.url = Join(endpoint, FormEncode(q));
	req.headers = {std::move(header)};
	req.no_proxy = true;
	req.timeout_ms = cfg.timeout_ms;
	req.abort = abort;
	req.extra_ca_file = cfg.extra_ca_file;
	return req;
}

// ---- Managed identity: IMDS

class ImdsProvider : public TokenProvider {
  public:
	ImdsProvider(IdentityConfig cfg, std::string endpoint) : cfg_(std::move(cfg)), endpoint_(std::move(endpoint)) {}
	TokenResult Fetch() override {
		HttpRequest req = ManagedRequest(cfg_, endpoint_, "2018-02-01", {"client_id", "object_id", "msi_res_id"},
		                                 "Metadata: true", abort_);
		req.connect_timeout_ms = std::min<long>(cfg_.timeout_ms, 2000);
		TokenResult r = FromHttp(Http(req), "the instance metadata endpoint", true);
		if (r.http_status == 400)
			r.error += "; is a managed identity assigned to this machine (and, for a user-assigned one, is its id "
			           "right)?";
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
		HttpRequest req = ManagedRequest(cfg_, endpoint_, "2019-08-01", {"client_id", "principal_id", "mi_res_id"},
		                                 "X-IDENTITY-HEADER: " + header_, abort_);
		return FromHttp(Http(req), "the App Service identity endpoint", true, {header_});
	}
	std::string Describe() const override {
		return "managed identity (App Service identity endpoint " + endpoint_ + ")";
	}

  private:
	IdentityConfig cfg_;
	std::string endpoint_, header_;
};

// ---- Managed identity: Azure Arc (a 401 challenge names a key file; answer with its contents)

class ArcProvider : public TokenProvider {
  public:
	ArcProvider(IdentityConfig cfg, std::string endpoint) : cfg_(std::move(cfg)), endpoint_(std::move(endpoint)) {}
	TokenResult Fetch() override {
		// System-assigned only: MakeManaged refuses ids for Azure Arc, so none is sent.
		HttpRequest req = ManagedRequest(cfg_, endpoint_, "2020-06-01", {}, "Metadata: true", abort_);
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
			bad.error = "the Azure Arc key file " + realm +
			            " is missing, unreadable, a link, not a file, or larger than 4096 bytes";
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
			if (secret.empty() &&
			    !ReadSecret(cfg_.client_secret_file, cfg_.client_secret_env, ProcessEnv(), &secret, &why)) {
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
			*why = "the App Service identity endpoint needs IDENTITY_ENDPOINT and IDENTITY_HEADER in the server's "
			       "environment";
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
			last.error = "no credential is configured: " + std::string(kSteps[0]) + ", " + kSteps[1] + " and " +
			             kSteps[2] + " were all skipped";
			last.retryable = false;
		} else {
			last.error = "no credential in the default chain returned a token; last: " + last.error;
		}
		return last;
	}
	std::string Describe() const override {
		return chosen_ ? "default chain: " + chosen_->Describe()
		               : "default chain (environment, workload identity, managed identity)";
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
			*why = "tenant_id and client_id are needed (options, or AZURE_TENANT_ID and AZURE_CLIENT_ID in the "
			       "server's environment)";
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

} // namespace sbpg
