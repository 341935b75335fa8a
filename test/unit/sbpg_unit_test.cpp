// test/unit/sbpg_unit_test.cpp
//   Unit tests of the extension's identity code, without PostgreSQL or a broker: token answers,
//   refresh timing, provider selection, each provider's HTTP exchange against a small HTTP server
//   in this process, secret handling, and the TokenSource's retry and refusal logic.
#include "sbpg/core/text.hpp"
#include "sbpg/identity/http.hpp"
#include "sbpg/identity/token.hpp"

#include "tap.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

using namespace sbpg;

namespace {

// ---- a small HTTP/1.1 server: one request per connection, answered by a function

struct Request {
	std::string method, target, path, query, body;
	std::map<std::string, std::string> headers; // lower-case names
};

struct Answer {
	int status = 200;
	std::string body;
	std::vector<std::string> headers;
	bool hang = false; // never answer (until the server stops)
};

std::string TempDir(); // a fresh directory, removed at exit

// A throwaway CA and a certificate for localhost / 127.0.0.1 (test/lib/make-test-ca.sh), once.
const std::string &
TestCa() {
	static std::string dir;
	if (dir.empty()) {
		dir = TempDir();
		// The script sits in test/lib, above this program's directory (test/unit or a build dir under it).
		char exe[4096];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
		std::string script, at = n > 0 ? std::string(exe, n) : std::string(".");
		while (script.empty() && at.find('/') != std::string::npos) {
			at = at.substr(0, at.rfind('/'));
			struct stat st;
			if (stat((at + "/test/lib/make-test-ca.sh").c_str(), &st) == 0)
				script = at + "/test/lib/make-test-ca.sh";
		}
		if (script.empty())
			throw std::runtime_error("test/lib/make-test-ca.sh not found above " + std::string(exe, n > 0 ? n : 0));
		std::string cmd = script + " " + dir;
		if (std::system(cmd.c_str()) != 0)
			throw std::runtime_error("make-test-ca.sh failed");
	}
	return dir;
}

class TinyHttp {
  public:
	using Handler = std::function<Answer(const Request &)>;
	// tls: serve HTTPS with TestCa()'s server certificate.
	explicit TinyHttp(Handler h, bool tls = false, const char *bind_ip = "127.0.0.1") : handler_(std::move(h)) {
		if (tls) {
			ctx_ = SSL_CTX_new(TLS_server_method());
			SSL_CTX_use_certificate_chain_file(ctx_, (TestCa() + "/server.pem").c_str());
			SSL_CTX_use_PrivateKey_file(ctx_, (TestCa() + "/server.key").c_str(), SSL_FILETYPE_PEM);
		}
		fd_ = socket(AF_INET, SOCK_STREAM, 0);
		int one = 1;
		setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		sockaddr_in a{};
		a.sin_family = AF_INET;
		inet_pton(AF_INET, bind_ip, &a.sin_addr);
		ip_ = bind_ip;
		bind(fd_, reinterpret_cast<sockaddr *>(&a), sizeof a);
		listen(fd_, 16);
		socklen_t len = sizeof a;
		getsockname(fd_, reinterpret_cast<sockaddr *>(&a), &len);
		port_ = ntohs(a.sin_port);
		thread_ = std::thread([this] { Loop(); });
	}
	~TinyHttp() {
		{
			std::lock_guard<std::mutex> g(mu_);
			stop_ = true;
		}
		cv_.notify_all();
		shutdown(fd_, SHUT_RDWR);
		close(fd_);
		thread_.join();
		if (ctx_)
			SSL_CTX_free(ctx_);
	}
	std::string Url(const std::string &path = "", const std::string &host = "") const {
		return std::string(ctx_ ? "https://" : "http://") + (host.empty() ? ip_ : host) + ":" + std::to_string(port_) +
		       path;
	}
	std::vector<Request> Requests() {
		std::lock_guard<std::mutex> g(mu_);
		return requests_;
	}

  private:
	void Loop() {
		for (;;) {
			int c = accept(fd_, nullptr, nullptr);
			if (c < 0)
				return;
			SSL *ssl = nullptr;
			if (ctx_) {
				ssl = SSL_new(ctx_);
				SSL_set_fd(ssl, c);
				if (SSL_accept(ssl) != 1) { // e.g. the client did not trust the certificate
					SSL_free(ssl);
					close(c);
					continue;
				}
			}
			ssl_ = ssl;
			Serve(c);
			if (ssl) {
				SSL_shutdown(ssl);
				SSL_free(ssl);
			}
			ssl_ = nullptr;
			close(c);
		}
	}
	ssize_t Read(int c, char *buf, size_t n) {
		return ssl_ ? SSL_read(ssl_, buf, static_cast<int>(n)) : read(c, buf, n);
	}
	ssize_t Write(int c, const std::string &out) {
		return ssl_ ? SSL_write(ssl_, out.data(), static_cast<int>(out.size())) : write(c, out.data(), out.size());
	}
	void Serve(int c) {
		std::string in;
		char buf[4096];
		size_t head_end;
		while ((head_end = in.find("\r\n\r\n")) == std::string::npos) {
			ssize_t n = Read(c, buf, sizeof buf);
			if (n <= 0)
				return;
			in.append(buf, n);
		}
		Request r;
		std::string head = in.substr(0, head_end);
		auto lines = Split(head, '\n');
		auto first = Split(lines[0], ' ');
		r.method = first[0];
		r.target = first.size() > 1 ? first[1] : "";
		size_t q = r.target.find('?');
		r.path = r.target.substr(0, q);
		r.query = q == std::string::npos ? "" : r.target.substr(q + 1);
		for (size_t i = 1; i < lines.size(); ++i) {
			std::string l = lines[i];
			if (!l.empty() && l.back() == '\r')
				l.pop_back();
			size_t colon = l.find(':');
			if (colon == std::string::npos)
				continue;
			std::string v = l.substr(colon + 1);
			while (!v.empty() && v.front() == ' ')
				v.erase(v.begin());
			r.headers[ToLower(l.substr(0, colon))] = v;
		}
		size_t want = r.headers.count("content-length") ? std::stoul(r.headers["content-length"]) : 0;
		r.body = in.substr(head_end + 4);
		while (r.body.size() < want) {
			ssize_t n = Read(c, buf, sizeof buf);
			if (n <= 0)
				break;
			r.body.append(buf, n);
		}
		{
			std::lock_guard<std::mutex> g(mu_);
			requests_.push_back(r);
		}
		Answer a = handler_(r);
		if (a.hang) {
			std::unique_lock<std::mutex> g(mu_);
			cv_.wait(g, [this] { return stop_; });
			return;
		}
		std::string out = "HTTP/1.1 " + std::to_string(a.status) + " X\r\nContent-Type: application/json\r\n";
		for (auto &h : a.headers)
			out += h + "\r\n";
		out += "Content-Length: " + std::to_string(a.body.size()) + "\r\nConnection: close\r\n\r\n" + a.body;
		ssize_t w = Write(c, out);
		(void)w;
	}

	Handler handler_;
	SSL_CTX *ctx_ = nullptr;
	SSL *ssl_ = nullptr;
	int fd_ = -1;
	int port_ = 0;
	std::string ip_;
	std::thread thread_;
	std::mutex mu_;
	std::condition_variable cv_;
	bool stop_ = false;
	std::vector<Request> requests_;
};

// An unsigned JWT with the given payload (the extension never verifies tokens; the broker does).
std::string
Jwt(const std::string &payload_json) {
	auto b64url = [](const std::string &s) {
		std::string b = Base64Encode(s);
		for (auto &ch : b)
			ch = ch == '+' ? '-' : ch == '/' ? '_' : ch;
		while (!b.empty() && b.back() == '=')
			b.pop_back();
		return b;
	};
	return b64url("{\"alg\":\"RS256\",\"typ\":\"JWT\"}") + "." + b64url(payload_json) + ".c2lnbmF0dXJl";
}

std::string
TokenJson(const std::string &jwt, int64_t expires_in) {
	return "{\"token_type\":\"Bearer\",\"expires_in\":" + std::to_string(expires_in) + ",\"access_token\":\"" + jwt +
	       "\"}";
}

EnvLookup
Env(std::map<std::string, std::string> vars) {
	return [vars](const std::string &k) {
		auto it = vars.find(k);
		return it == vars.end() ? std::string() : it->second;
	};
}

std::string
QueryParam(const std::string &query, const std::string &name) {
	for (auto &kv : Split(query, '&')) {
		size_t eq = kv.find('=');
		std::string k = kv.substr(0, eq), v;
		if (k == name && UrlDecode(kv.substr(eq + 1), &v))
			return v;
	}
	return "";
}

std::vector<std::string> &
Cleanup() {
	static std::vector<std::string> dirs;
	static bool registered = false;
	if (!registered) {
		registered = true;
		std::atexit([] {
			for (auto &d : Cleanup())
				if (std::system(("rm -rf '" + d + "'").c_str()) != 0)
					std::fprintf(stderr, "cannot remove %s\n", d.c_str());
		});
	}
	return dirs;
}

std::string
TempDir() {
	char tmpl[] = "/tmp/sbpg-unit-XXXXXX";
	std::string d = mkdtemp(tmpl);
	Cleanup().push_back(d);
	return d;
}

void
WriteFile(const std::string &path, const std::string &content) {
	std::ofstream f(path, std::ios::binary | std::ios::trunc);
	f << content;
}

// Waits (up to a generous bound, so a bug fails instead of hanging) for a condition.
template <typename F>
bool
Eventually(F f) {
	for (int i = 0; i < 3000; ++i) {
		if (f())
			return true;
		std::this_thread::sleep_for(std::chrono::milliseconds(10));
	}
	return false;
}

bool
Contains(const std::string &s, const std::string &part) {
	return s.find(part) != std::string::npos;
}

} // namespace

// ---- token answers and refresh timing

TEST("ParseTokenResponse reads the metadata endpoint's answer (numbers as strings)") {
	int64_t now = 1'800'000'000'000;
	std::string jwt = Jwt("{\"aud\":\"https://servicebus.azure.net\",\"oid\":\"o-1\",\"sub\":\"s-1\"}");
	TokenResult r = ParseTokenResponse("{\"access_token\":\"" + jwt +
	                                       "\",\"expires_in\":\"3599\",\"expires_on\":\"1800003600\","
	                                       "\"resource\":\"https://servicebus.azure.net\",\"token_type\":\"Bearer\"}",
	                                   now);
	REQUIRE(r.ok);
	CHECK_EQ(r.token.token, jwt);
	CHECK_EQ(r.token.expires_ms, int64_t{1'800'003'600'000});
	CHECK_EQ(r.token.subject, std::string("o-1")); // oid before sub
	CHECK_EQ(r.token.audience, std::string("https://servicebus.azure.net"));
	CHECK_EQ(r.token.refresh_ms, now + 1'800'000); // half of an hour
}

TEST("ParseTokenResponse reads Entra ID's answer and honours refresh_in") {
	int64_t now = 1'800'000'000'000;
	TokenResult r = ParseTokenResponse(TokenJson(Jwt("{}"), 3599), now);
	REQUIRE(r.ok);
	CHECK_EQ(r.token.expires_ms, now + 3'599'000);
	r = ParseTokenResponse("{\"access_token\":\"a.b.c\",\"expires_in\":86399,\"refresh_in\":60000}", now);
	REQUIRE(r.ok);
	CHECK_EQ(r.token.refresh_ms, now + 60'000'000);
	// An endpoint cannot make renewals more frequent than every half-life.
	r = ParseTokenResponse("{\"access_token\":\"a.b.c\",\"expires_in\":8,\"refresh_in\":1}", now);
	REQUIRE(r.ok);
	CHECK_EQ(r.token.refresh_ms, now + 4'000);
}

TEST("ParseTokenResponse reads App Service's 2017 date form of expires_on") {
	TokenResult r = ParseTokenResponse("{\"access_token\":\"a.b.c\",\"expires_on\":\"11/26/2026 18:00:00 +00:00\"}",
	                                   1'795'710'000'000);
	REQUIRE(r.ok);
	CHECK_EQ(r.token.expires_ms, int64_t{1'795'716'000'000}); // 2026-11-26T18:00:00Z
}

TEST("ParseTokenResponse refuses unusable answers without quoting the token") {
	int64_t now = 1'800'000'000'000;
	const char *secret = "TOKEN-SECRET-VALUE";
	TokenResult r = ParseTokenResponse("not json", now);
	CHECK(!r.ok);
	CHECK(Contains(r.error, "not a JSON object"));
	r = ParseTokenResponse("{\"expires_in\":3600}", now);
	CHECK(!r.ok);
	CHECK(Contains(r.error, "no access_token"));
	r = ParseTokenResponse(std::string("{\"access_token\":\"") + secret + "\"}", now);
	CHECK(!r.ok);
	CHECK(Contains(r.error, "neither expires_on nor expires_in"));
	CHECK(!Contains(r.error, secret));
	r = ParseTokenResponse(std::string("{\"access_token\":\"") + secret + "\",\"expires_on\":1000}", now);
	CHECK(!r.ok);
	CHECK(Contains(r.error, "already expired"));
	CHECK(!Contains(r.error, secret));
	r = ParseTokenResponse("{\"access_token\":\"\",\"expires_in\":3600}", now);
	CHECK(!r.ok);
	// Absurd numbers are refused rather than overflowing.
	for (const char *exp : {"\"expires_in\":1e300", "\"expires_in\":-5", "\"expires_on\":\"99999999999999999999\"",
	                        "\"expires_in\":9223372036854775807", "\"expires_on\":1e19"}) {
		r = ParseTokenResponse(std::string("{\"access_token\":\"a.b.c\",") + exp + "}", now);
		CHECK(!r.ok);
	}
}

TEST("RefreshAt: half-life, refresh_in, a few minutes before long expiries, never sooner than a second") {
	int64_t t = 1'000'000;
	CHECK_EQ(RefreshAt(t, t + 8'000, -1), t + 4'000); // an 8-second token: about every 4 seconds
	CHECK_EQ(RefreshAt(t, t + 10'000, -1), t + 5'000);
	CHECK_EQ(RefreshAt(t, t + 3'600'000, -1), t + 1'800'000);    // an hour: at half-life
	CHECK_EQ(RefreshAt(t, t + 3'600'000, 3'500), t + 3'480'000); // refresh_in past expiry - 2 min is clamped
	CHECK_EQ(RefreshAt(t, t + 86'400'000, 43'200), t + 43'200'000);
	CHECK_EQ(RefreshAt(t, t + 500, -1), t + 1'000); // never sooner than a second
	CHECK_EQ(RefreshAt(t, t + 300'000, -1), t + 150'000);
}

TEST("PeekJwtClaims reads subject, audience and expiry, and refuses what is not a JWT") {
	std::string sub, aud;
	int64_t exp = 0;
	CHECK(PeekJwtClaims(Jwt("{\"sub\":\"s\",\"aud\":\"a\",\"exp\":1800000000}"), &sub, &aud, &exp));
	CHECK_EQ(sub, std::string("s"));
	CHECK_EQ(aud, std::string("a"));
	CHECK_EQ(exp, int64_t{1800000000});
	CHECK(!PeekJwtClaims("opaque-token", &sub, &aud, &exp));
	CHECK(!PeekJwtClaims("a.!!!.c", &sub, &aud, &exp));
	CHECK(!PeekJwtClaims(Jwt("[1,2]"), &sub, &aud, &exp));
}

// ---- configuration

TEST("IdentityConfigFromJson fills the configuration from sbpg.identities options") {
	IdentityConfig c;
	std::string why;
	REQUIRE(IdentityConfigFromJson(
	    "managed_identity",
	    "{\"client_id\":\"cid\",\"source\":\"imds\",\"endpoint\":\"http://x/t\",\"arc_key_dir\":\"/k\"}", &c, &why));
	CHECK_EQ(c.kind, std::string("managed_identity"));
	CHECK_EQ(c.client_id, std::string("cid"));
	CHECK_EQ(c.source, std::string("imds"));
	CHECK_EQ(c.endpoint, std::string("http://x/t"));
	CHECK_EQ(c.arc_key_dir, std::string("/k"));
	IdentityConfig d;
	REQUIRE(IdentityConfigFromJson("client_secret", "{\"tenant_id\":\"t\",\"client_id\":\"c\",\"secret_env\":\"E\"}",
	                               &d, &why));
	CHECK_EQ(d.tenant_id, std::string("t"));
	CHECK_EQ(d.client_secret_env, std::string("E"));
	CHECK(!IdentityConfigFromJson("default", "{\"client_id\":5}", &d, &why));
	CHECK(Contains(why, "client_id"));
	CHECK(!IdentityConfigFromJson("default", "[]", &d, &why));
	CHECK(!IdentityConfigFromJson("default", "{", &d, &why));
}

TEST("ReadSecret reads a file or an environment variable and trims trailing white space") {
	std::string dir = TempDir(), s, why;
	WriteFile(dir + "/secret", "s3cr3t\n");
	CHECK(ReadSecret(dir + "/secret", "", ProcessEnv(), &s, &why));
	CHECK_EQ(s, std::string("s3cr3t"));
	CHECK(ReadSecret("", "SECRET_VAR", Env({{"SECRET_VAR", "from-env \n"}}), &s, &why));
	CHECK_EQ(s, std::string("from-env"));
	CHECK(!ReadSecret(dir + "/missing", "", ProcessEnv(), &s, &why));
	CHECK(Contains(why, "cannot read the secret file"));
	CHECK(!ReadSecret("", "UNSET_VAR", Env({}), &s, &why));
	CHECK(Contains(why, "UNSET_VAR is not set"));
	WriteFile(dir + "/empty", "\n");
	CHECK(!ReadSecret(dir + "/empty", "", ProcessEnv(), &s, &why));
	CHECK(Contains(why, "is empty"));
}

TEST("MakeTokenProvider detects the managed identity endpoint from the environment as the Azure SDKs do") {
	IdentityConfig c;
	c.kind = "managed_identity";
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "instance metadata endpoint http://169.254.169.254/metadata/identity/oauth2/token"));
	p = MakeTokenProvider(c, Env({{"AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://10.0.0.1:2579/"}}), &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "http://10.0.0.1:2579/metadata/identity/oauth2/token"));
	p = MakeTokenProvider(c, Env({{"IDENTITY_ENDPOINT", "http://localhost:8081/msi/token"}, {"IDENTITY_HEADER", "h"}}),
	                      &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "App Service identity endpoint http://localhost:8081/msi/token"));
	p = MakeTokenProvider(c,
	                      Env({{"IDENTITY_ENDPOINT", "http://localhost:40342/metadata/identity/oauth2/token"},
	                           {"IMDS_ENDPOINT", "http://localhost:40342"}}),
	                      &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "Azure Arc"));
	c.endpoint = "http://127.0.0.1:1/token";
	p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "http://127.0.0.1:1/token"));
}

TEST("MakeTokenProvider explains configurations that cannot work") {
	std::string why;
	IdentityConfig c;
	c.kind = "managed_identity";
	c.client_id = "a";
	c.object_id = "b";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
	CHECK(Contains(why, "at most one"));
	c = IdentityConfig();
	c.kind = "managed_identity";
	c.source = "app_service";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
	CHECK(Contains(why, "IDENTITY_ENDPOINT and IDENTITY_HEADER"));
	c.source = "arc";
	c.client_id = "x";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
	CHECK(Contains(why, "system-assigned"));
	c = IdentityConfig();
	c.kind = "workload_identity";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
	CHECK(Contains(why, "tenant_id and client_id"));
	CHECK(!MakeTokenProvider(c, Env({{"AZURE_TENANT_ID", "t"}, {"AZURE_CLIENT_ID", "c"}}), &why));
	CHECK(Contains(why, "federated token file"));
	CHECK(!MakeTokenProvider(c,
	                         Env({{"AZURE_TENANT_ID", "t"},
	                              {"AZURE_CLIENT_ID", "c"},
	                              {"AZURE_FEDERATED_TOKEN_FILE", "/f"},
	                              {"AZURE_AUTHORITY_HOST", "http://login.example"}}),
	                         &why));
	CHECK(Contains(why, "must use https"));
	auto p = MakeTokenProvider(
	    c, Env({{"AZURE_TENANT_ID", "t"}, {"AZURE_CLIENT_ID", "c"}, {"AZURE_FEDERATED_TOKEN_FILE", "/f"}}), &why);
	REQUIRE(p);
	CHECK(Contains(p->Describe(), "https://login.microsoftonline.com"));
	c = IdentityConfig();
	c.kind = "client_secret";
	c.tenant_id = "t";
	c.client_id = "c";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
	CHECK(Contains(why, "client secret is missing"));
	c.kind = "sas";
	CHECK(!MakeTokenProvider(c, Env({}), &why));
}

// ---- providers over HTTP

TEST("the metadata endpoint is asked as IMDS expects: Metadata header, api-version, resource, user-assigned id") {
	std::string jwt = Jwt("{\"aud\":\"https://servicebus.azure.net\",\"oid\":\"mi-1\"}");
	TinyHttp srv([&](const Request &) {
		return Answer{200, "{\"access_token\":\"" + jwt + "\",\"expires_in\":\"3599\",\"expires_on\":\"" +
		                       std::to_string(WallMs() / 1000 + 3600) + "\",\"token_type\":\"Bearer\"}"};
	});
	IdentityConfig c;
	c.kind = "managed_identity";
	c.endpoint = srv.Url("/metadata/identity/oauth2/token");
	c.client_id = "11111111-aaaa-bbbb-cccc-000000000001";
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	REQUIRE(r.ok);
	CHECK_EQ(r.token.token, jwt);
	CHECK_EQ(r.token.subject, std::string("mi-1"));
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 1);
	CHECK_EQ(reqs[0].method, std::string("GET"));
	CHECK_EQ(reqs[0].path, std::string("/metadata/identity/oauth2/token"));
	CHECK_EQ(reqs[0].headers["metadata"], std::string("true"));
	CHECK_EQ(QueryParam(reqs[0].query, "api-version"), std::string("2018-02-01"));
	CHECK_EQ(QueryParam(reqs[0].query, "resource"), std::string("https://servicebus.azure.net"));
	CHECK_EQ(QueryParam(reqs[0].query, "client_id"), c.client_id);
}

TEST(
    "identity endpoint errors: 429 with Retry-After and 5xx and 404 are retried, 400 is explained, refusal has no status") {
	int status = 429;
	TinyHttp srv([&](const Request &) {
		Answer a{status, "{\"error\":\"invalid_request\",\"error_description\":\"Identity not found\"}"};
		if (status == 429)
			a.headers.push_back("Retry-After: 7");
		return a;
	});
	IdentityConfig c;
	c.kind = "managed_identity";
	c.endpoint = srv.Url("/metadata/identity/oauth2/token");
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	CHECK(!r.ok);
	CHECK(r.retryable);
	CHECK_EQ(r.retry_after_ms, int64_t{7000});
	CHECK(Contains(r.error, "HTTP 429"));
	for (int s : {500, 503, 404}) {
		status = s;
		r = p->Fetch();
		CHECK(!r.ok && r.retryable);
		CHECK(Contains(r.error, "HTTP " + std::to_string(s)));
	}
	status = 400;
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(!r.retryable);
	CHECK(Contains(r.error, "invalid_request: Identity not found"));
	CHECK(Contains(r.error, "is a managed identity assigned"));
	c.endpoint = "http://127.0.0.1:1/metadata/identity/oauth2/token"; // nothing listens on port 1
	p = MakeTokenProvider(c, Env({}), &why);
	r = p->Fetch();
	CHECK(!r.ok && r.retryable);
	CHECK_EQ(r.http_status, 0L);
}

TEST("App Service: X-IDENTITY-HEADER from the environment, api-version 2019-08-01, principal_id") {
	TinyHttp srv([&](const Request &) {
		return Answer{200,
		              "{\"access_token\":\"a.b.c\",\"expires_on\":\"" + std::to_string(WallMs() / 1000 + 3600) + "\"}"};
	});
	IdentityConfig c;
	c.kind = "managed_identity";
	c.object_id = "obj-1";
	std::string why;
	auto p = MakeTokenProvider(c,
	                           Env({{"IDENTITY_ENDPOINT", srv.Url("/msi/token")}, {"IDENTITY_HEADER", "hdr-secret"}}),
	                           &why);
	REQUIRE(p);
	REQUIRE(p->Fetch().ok);
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 1);
	CHECK_EQ(reqs[0].path, std::string("/msi/token"));
	CHECK_EQ(reqs[0].headers["x-identity-header"], std::string("hdr-secret"));
	CHECK_EQ(QueryParam(reqs[0].query, "api-version"), std::string("2019-08-01"));
	CHECK_EQ(QueryParam(reqs[0].query, "principal_id"), std::string("obj-1"));
}

TEST("App Service: an identity header echoed in an error never reaches the error text") {
	TinyHttp srv([&](const Request &r) {
		return Answer{401, "{\"error\":\"unauthorized\",\"error_description\":\"bad header " +
		                       r.headers.at("x-identity-header") + "\"}"};
	});
	IdentityConfig c;
	c.kind = "managed_identity";
	std::string why;
	auto p = MakeTokenProvider(
	    c, Env({{"IDENTITY_ENDPOINT", srv.Url("/msi/token")}, {"IDENTITY_HEADER", "hdr-secret-value"}}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	CHECK(!r.ok);
	CHECK(Contains(r.error, "bad header [redacted]"));
	CHECK(!Contains(r.error, "hdr-secret-value"));
}

TEST("Azure Arc: answers the challenge with the key file, only from the agent's directory") {
	std::string dir = TempDir(), realm = dir + "/abc.key", outside = TempDir() + "/evil.key";
	WriteFile(realm, "arc-secret-content");
	WriteFile(outside, "not-for-you");
	std::string challenge = realm;
	TinyHttp srv([&](const Request &r) {
		if (!r.headers.count("authorization"))
			return Answer{401, "", {"WWW-Authenticate: Basic realm=" + challenge}};
		if (r.headers.at("authorization") == "Basic arc-secret-content")
			return Answer{200, "{\"access_token\":\"a.b.c\",\"expires_in\":3600}"};
		return Answer{401, "{\"error\":\"wrong\"}"};
	});
	IdentityConfig c;
	c.kind = "managed_identity";
	c.source = "arc";
	c.endpoint = srv.Url("/metadata/identity/oauth2/token");
	c.arc_key_dir = dir;
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	CHECK(r.ok);
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 2);
	CHECK_EQ(QueryParam(reqs[0].query, "api-version"), std::string("2020-06-01"));
	CHECK_EQ(reqs[1].headers["authorization"], std::string("Basic arc-secret-content"));
	// A challenge naming a file elsewhere is refused, and the file is never read or sent.
	challenge = outside;
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(!r.retryable);
	CHECK(Contains(r.error, "outside " + dir));
	challenge = dir + "/../" + outside.substr(5);
	r = p->Fetch();
	CHECK(!r.ok);
	challenge = dir + "/big.key";
	WriteFile(challenge, std::string(5000, 'x'));
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(Contains(r.error, "larger than 4096"));
	// A symbolic link in the directory is not followed.
	REQUIRE(symlink(outside.c_str(), (dir + "/link.key").c_str()) == 0);
	challenge = dir + "/link.key";
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(Contains(r.error, "a link"));
	for (auto &q : srv.Requests())
		CHECK(!Contains(q.headers["authorization"], "not-for-you"));
	// The key file's content, echoed by the endpoint, is not shown.
	challenge = realm;
	TinyHttp echo([&](const Request &q) {
		if (!q.headers.count("authorization"))
			return Answer{401, "", {"WWW-Authenticate: Basic realm=" + realm}};
		return Answer{403, "{\"error\":\"denied\",\"error_description\":\"" + q.headers.at("authorization") + "\"}"};
	});
	c.endpoint = echo.Url("/arc/token");
	p = MakeTokenProvider(c, Env({}), &why);
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(!Contains(r.error, "arc-secret-content"));
	CHECK(Contains(r.error, "[redacted]"));
}

TEST("client secret: the v2 token request over TLS, and a secret echoed by the endpoint never reaches the error") {
	std::string secret = "very-secret-client-value";
	bool echo = false;
	TinyHttp srv(
	    [&](const Request &) {
		    if (echo)
			    return Answer{401, "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS7000215: bad secret " +
			                           secret + "\"}"};
		    return Answer{200, TokenJson(Jwt("{\"oid\":\"sp-1\"}"), 3599)};
	    },
	    true);
	IdentityConfig c;
	c.kind = "client_secret";
	c.tenant_id = "tenant-1";
	c.client_id = "client-1";
	c.client_secret = secret;
	c.authority_host = srv.Url("", "localhost");
	c.extra_ca_file = TestCa() + "/ca.pem";
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	REQUIRE(r.ok);
	CHECK_EQ(r.token.subject, std::string("sp-1"));
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 1);
	CHECK_EQ(reqs[0].method, std::string("POST"));
	CHECK_EQ(reqs[0].path, std::string("/tenant-1/oauth2/v2.0/token"));
	CHECK_EQ(reqs[0].headers["content-type"], std::string("application/x-www-form-urlencoded"));
	CHECK_EQ(QueryParam(reqs[0].body, "grant_type"), std::string("client_credentials"));
	CHECK_EQ(QueryParam(reqs[0].body, "client_id"), std::string("client-1"));
	CHECK_EQ(QueryParam(reqs[0].body, "scope"), std::string("https://servicebus.azure.net/.default"));
	CHECK_EQ(QueryParam(reqs[0].body, "client_secret"), secret);
	echo = true;
	r = p->Fetch();
	CHECK(!r.ok);
	CHECK(!r.retryable); // 401: a retry will not cure a wrong secret soon
	CHECK(Contains(r.error, "HTTP 401 (invalid_client: AADSTS7000215: bad secret [redacted])"));
	CHECK(!Contains(r.error, secret));
}

TEST("client secret by file is read at every exchange, so a rotated secret is used without a restart") {
	std::string dir = TempDir();
	WriteFile(dir + "/secret", "first-secret\n");
	TinyHttp srv([&](const Request &) { return Answer{200, TokenJson("a.b.c", 3600)}; }, true);
	IdentityConfig c;
	c.kind = "client_secret";
	c.tenant_id = "t";
	c.client_id = "c";
	c.client_secret_file = dir + "/secret";
	c.authority_host = srv.Url("", "localhost");
	c.extra_ca_file = TestCa() + "/ca.pem";
	std::string why;
	auto p = MakeTokenProvider(c, Env({}), &why);
	REQUIRE(p);
	REQUIRE(p->Fetch().ok);
	WriteFile(dir + "/secret", "second-secret");
	REQUIRE(p->Fetch().ok);
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 2);
	CHECK_EQ(QueryParam(reqs[0].body, "client_secret"), std::string("first-secret"));
	CHECK_EQ(QueryParam(reqs[1].body, "client_secret"), std::string("second-secret"));
}

TEST("workload identity posts the federated token as a jwt-bearer assertion, read again at every exchange") {
	std::string dir = TempDir();
	TinyHttp srv([&](const Request &) { return Answer{200, TokenJson("a.b.c", 3600)}; }, true);
	IdentityConfig c;
	c.kind = "workload_identity";
	c.extra_ca_file = TestCa() + "/ca.pem";
	std::string why;
	auto p = MakeTokenProvider(c,
	                           Env({{"AZURE_TENANT_ID", "tenant-2"},
	                                {"AZURE_CLIENT_ID", "client-2"},
	                                {"AZURE_FEDERATED_TOKEN_FILE", dir + "/token"},
	                                {"AZURE_AUTHORITY_HOST", srv.Url("/", "localhost")}}),
	                           &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	CHECK(!r.ok);
	CHECK(!r.retryable); // a configuration problem: retried slowly
	CHECK(Contains(r.error, "cannot read the federated token file " + dir + "/token"));
	CHECK(srv.Requests().empty());
	WriteFile(dir + "/token", "assertion-1\n");
	REQUIRE(p->Fetch().ok);
	WriteFile(dir + "/token", "assertion-2");
	REQUIRE(p->Fetch().ok);
	auto reqs = srv.Requests();
	REQUIRE(reqs.size() == 2);
	CHECK_EQ(reqs[0].path, std::string("/tenant-2/oauth2/v2.0/token"));
	CHECK_EQ(QueryParam(reqs[0].body, "client_assertion_type"),
	         std::string("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
	CHECK_EQ(QueryParam(reqs[0].body, "client_assertion"), std::string("assertion-1"));
	CHECK_EQ(QueryParam(reqs[1].body, "client_assertion"), std::string("assertion-2"));
	CHECK_EQ(QueryParam(reqs[1].body, "client_id"), std::string("client-2"));
	CHECK(QueryParam(reqs[1].body, "client_secret").empty());
}

TEST("HTTPS: the extra CA adds trust; an unknown CA and a wrong host name are refused") {
	TinyHttp srv([&](const Request &) { return Answer{200, "{}"}; }, true);
	HttpRequest req;
	req.url = srv.Url("/x", "localhost");
	HttpResponse r = Http(req); // the system store alone does not know the test CA
	CHECK_EQ(r.status, 0L);
	CHECK(Contains(r.error, "certificate"));
	req.extra_ca_file = TestCa() + "/other-ca.pem";
	r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(Contains(r.error, "certificate"));
	req.extra_ca_file = TestCa() + "/ca.pem";
	r = Http(req);
	CHECK_EQ(r.status, 200L);
	req.url = srv.Url("/x", "127.0.0.1"); // in the certificate as an IP address
	CHECK_EQ(Http(req).status, 200L);
	// 127.0.0.2 reaches a server with the same certificate, but is not named in it.
	TinyHttp other([&](const Request &) { return Answer{200, "{}"}; }, true, "127.0.0.2");
	req.url = other.Url("/x");
	r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(Contains(r.error, "127.0.0.2"));
	CHECK(other.Requests().empty());
}

TEST("Http: timeouts, transport errors and an abort flag end a request without an answer") {
	TinyHttp srv([&](const Request &) { return Answer{0, "", {}, true}; });
	HttpRequest req;
	req.url = srv.Url("/slow");
	req.timeout_ms = 300;
	HttpResponse r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(r.timed_out);
	std::atomic<bool> abort{true};
	req.timeout_ms = 60000;
	req.abort = &abort;
	r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(!r.timed_out);
	req.url = "http://127.0.0.1:1/";
	req.abort = nullptr;
	r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(!r.error.empty());
}

TEST("Http: an extra CA file that holds no certificate is an error, not a silent fallback") {
	HttpRequest req;
	std::string dir = TempDir();
	WriteFile(dir + "/ca.pem", "garbage");
	req.url = "https://127.0.0.1:1/";
	req.extra_ca_file = dir + "/ca.pem";
	HttpResponse r = Http(req);
	CHECK_EQ(r.status, 0L);
	CHECK(Contains(r.error, "holds no PEM certificate"));
}

TEST("the default chain skips what is not configured, says why, and keeps the credential that worked") {
	TinyHttp srv([&](const Request &) { return Answer{200, TokenJson(Jwt("{\"oid\":\"vm\"}"), 3600)}; });
	IdentityConfig c;
	c.kind = "default";
	c.endpoint = srv.Url("/metadata/identity/oauth2/token");
	std::string why;
	auto p = MakeTokenProvider(c, Env({{"AZURE_TENANT_ID", "t"}}), &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	REQUIRE(r.ok);
	auto notes = p->TakeNotes();
	REQUIRE(notes.size() == 3);
	CHECK(Contains(notes[0],
	               "skipped environment: AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are not all set"));
	CHECK(Contains(notes[1], "skipped workload identity"));
	CHECK(Contains(notes[2], "using managed identity"));
	CHECK(Contains(p->Describe(), "default chain: managed identity"));
	REQUIRE(p->Fetch().ok); // the chosen credential is asked directly now
	CHECK(p->TakeNotes().empty());
	CHECK_EQ(srv.Requests().size(), size_t{2});
}

TEST("the default chain tries the environment's client secret first and reports every failure") {
	IdentityConfig c;
	c.kind = "default";
	c.endpoint = "http://127.0.0.1:1/metadata/identity/oauth2/token";
	std::string why;
	auto p = MakeTokenProvider(c,
	                           Env({{"AZURE_TENANT_ID", "t"},
	                                {"AZURE_CLIENT_ID", "c"},
	                                {"AZURE_CLIENT_SECRET", "env-secret"},
	                                {"AZURE_AUTHORITY_HOST", "https://127.0.0.1:1"}}),
	                           &why);
	REQUIRE(p);
	TokenResult r = p->Fetch();
	CHECK(!r.ok);
	CHECK(Contains(r.error, "no credential in the default chain returned a token"));
	auto notes = p->TakeNotes();
	REQUIRE(notes.size() == 3);
	CHECK(Contains(notes[0], "environment failed"));
	CHECK(Contains(notes[1], "skipped workload identity"));
	CHECK(Contains(notes[2], "managed identity failed"));
	for (auto &n : notes)
		CHECK(!Contains(n, "env-secret"));
}

// ---- TokenSource

namespace {

class ScriptedProvider : public TokenProvider {
  public:
	explicit ScriptedProvider(std::vector<TokenResult> script) : script_(std::move(script)) {}
	TokenResult Fetch() override {
		std::lock_guard<std::mutex> g(mu_);
		++calls_;
		if (script_.empty())
			return ok(3600);
		TokenResult r = script_.front();
		script_.erase(script_.begin());
		return r;
	}
	std::string Describe() const override { return "scripted"; }
	static TokenResult ok(int64_t life_s) {
		return ParseTokenResponse(TokenJson(Jwt("{\"oid\":\"scripted\"}"), life_s), WallMs());
	}
	static TokenResult fail(const std::string &e, int64_t retry_after_ms = 0) {
		TokenResult r;
		r.error = e;
		r.retry_after_ms = retry_after_ms;
		return r;
	}
	int Calls() {
		std::lock_guard<std::mutex> g(mu_);
		return calls_;
	}

  private:
	std::mutex mu_;
	std::vector<TokenResult> script_;
	int calls_ = 0;
};

std::string
AllLog(std::vector<TokenSource::LogLine> &acc, TokenSource &ts) {
	for (auto &l : ts.TakeLog())
		acc.push_back(l);
	std::string s;
	for (auto &l : acc)
		s += l.text + "\n";
	return s;
}

} // namespace

TEST("TokenSource retries failures with backoff, then serves the token and says it recovered") {
	auto *prov = new ScriptedProvider(
	    {ScriptedProvider::fail("endpoint said 500"), ScriptedProvider::fail("endpoint said 503")});
	std::atomic<int> changes{0};
	TokenSource ts(std::unique_ptr<TokenProvider>(prov), [&] { ++changes; });
	ts.Start();
	AccessToken t;
	REQUIRE(Eventually([&] { return ts.Current(&t); }));
	CHECK_EQ(t.serial, uint64_t{1});
	CHECK_EQ(t.subject, std::string("scripted"));
	TokenSource::Status st = ts.GetStatus();
	CHECK(st.has_token);
	CHECK_EQ(st.failures, uint64_t{2});
	CHECK(st.last_error.empty());
	CHECK(changes.load() >= 2);
	std::vector<TokenSource::LogLine> acc;
	std::string log = AllLog(acc, ts);
	CHECK(Contains(log, "token request failed (attempt 1, retrying in"));
	CHECK(Contains(log, "(attempt 2,"));
	CHECK(Contains(log, "token 1 obtained from scripted after 2 failed attempts: subject scripted"));
	CHECK(!Contains(log, t.token));
	ts.Stop();
}

TEST("TokenSource: a refused token is replaced at once, repeated refusals back off, stale refusals are ignored") {
	auto *prov = new ScriptedProvider({});
	TokenSource ts(std::unique_ptr<TokenProvider>(prov), nullptr);
	ts.Start();
	AccessToken t;
	REQUIRE(Eventually([&] { return ts.Current(&t); }));
	REQUIRE(t.serial == 1);
	ts.Invalidate(1, "401 wrong audience");
	REQUIRE(Eventually([&] { return ts.Current(&t) && t.serial == 2; }));
	ts.Invalidate(1, "a late answer about token 1"); // token 2 is current: nothing happens
	ts.Invalidate(2, "401 wrong audience");
	std::vector<TokenSource::LogLine> acc;
	std::string log;
	REQUIRE(Eventually([&] {
		log = AllLog(acc, ts);
		return Contains(log, "refused token 2");
	}));
	CHECK(Contains(log, "refused token 1 (401 wrong audience); asking for a new one now"));
	CHECK(!Contains(log, "a late answer"));
	size_t at = log.find("refused token 2 (401 wrong audience); asking for a new one in ");
	REQUIRE(at != std::string::npos);
	long ms = std::atol(log.c_str() + at +
	                    std::strlen("refused token 2 (401 wrong audience); asking for a new one in "));
	CHECK(ms >= 1000 && ms <= 2000);
	REQUIRE(Eventually([&] { return ts.Current(&t) && t.serial == 3; }));
	ts.Accepted(3);
	ts.Invalidate(3, "refused again");
	REQUIRE(Eventually(
	    [&] { return Contains(AllLog(acc, ts), "refused token 3 (refused again); asking for a new one now"); }));
	ts.Stop();
}

TEST("TokenSource: a refusal never brings a request forward past the endpoint's Retry-After") {
	auto *prov = new ScriptedProvider({ScriptedProvider::ok(3600), ScriptedProvider::fail("HTTP 429", 30000)});
	TokenSource ts(std::unique_ptr<TokenProvider>(prov), nullptr);
	ts.Start();
	AccessToken t;
	REQUIRE(Eventually([&] { return ts.Current(&t); }));
	ts.Invalidate(1, "refused"); // fetches at once: the endpoint answers 429, Retry-After 30 s
	REQUIRE(Eventually([&] { return prov->Calls() == 2; }));
	REQUIRE(Eventually([&] { return ts.GetStatus().failures == 1; }));
	ts.Invalidate(1, "refused again"); // must wait for the Retry-After
	std::vector<TokenSource::LogLine> acc;
	std::string log;
	REQUIRE(Eventually([&] {
		log = AllLog(acc, ts);
		return Contains(log, "refused again");
	}));
	const char *lead = "(refused again); asking for a new one in ";
	size_t at = log.find(lead);
	REQUIRE(at != std::string::npos);
	long ms = std::atol(log.c_str() + at + std::strlen(lead));
	CHECK(ms > 20000);
	CHECK_EQ(prov->Calls(), 2);
	ts.Stop();
}

TEST("TokenSource: routine renewals are marked routine; the first token and recoveries are not") {
	auto *prov = new ScriptedProvider({ScriptedProvider::ok(2), ScriptedProvider::ok(2)});
	TokenSource ts(std::unique_ptr<TokenProvider>(prov), nullptr);
	ts.Start();
	AccessToken t;
	REQUIRE(Eventually([&] { return ts.Current(&t) && t.serial >= 2; }));
	auto log = ts.TakeLog();
	REQUIRE(log.size() >= 2);
	CHECK(!log[0].routine);
	CHECK(log[1].routine);
	ts.Stop();
}

TEST("TokenSource::Abort ends a token request that hangs") {
	TinyHttp srv([&](const Request &) { return Answer{0, "", {}, true}; });
	IdentityConfig c;
	c.kind = "managed_identity";
	c.endpoint = srv.Url("/metadata/identity/oauth2/token");
	c.timeout_ms = 600000;
	std::string why;
	TokenSource ts(MakeTokenProvider(c, Env({}), &why), nullptr);
	ts.Start();
	REQUIRE(Eventually([&] { return srv.Requests().size() == 1; }));
	// Abort must end the request long before its 600 s timeout. It runs on a thread so that an Abort
	// that does not return fails the suite with a message instead of hanging it: after a generous 30 s
	// the program reports the failure and exits (the stuck thread and `ts` cannot be unwound safely).
	std::promise<void> returned;
	std::future<void> done = returned.get_future();
	std::thread aborter([&] {
		ts.Abort();
		returned.set_value();
	});
	if (done.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
		std::printf("not ok - TokenSource::Abort ends a token request that hangs: Abort() did not return within 30 s "
		            "(the request blocked in the provider was not ended); the test program stops here\n");
		std::printf("# fail 1\n");
		std::fflush(stdout);
		std::_Exit(1);
	}
	aborter.join();
	CHECK(!ts.GetStatus().has_token);
}

TAP_MAIN
