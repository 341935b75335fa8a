// sbpg/identity/token.hpp
//   Entra ID token providers (managed identity: IMDS, App Service, Azure Arc; workload identity;
//   client secret; the default chain) and the TokenSource that keeps one identity's token fresh on
//   a thread of its own. Tokens live only in this process's memory: never logged, never handed to
//   PostgreSQL.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

struct AccessToken {
	std::string token; // never logged
	int64_t obtained_ms = 0;
	int64_t expires_ms = 0;
	int64_t refresh_ms = 0; // when to get the next one
	std::string subject;    // oid (or sub) claim, for logs
	std::string audience;   // aud claim, for logs
	uint64_t serial = 0;    // 1 for the first token a TokenSource obtains, then 2, 3...
};

struct TokenResult {
	bool ok = false;
	AccessToken token;
	std::string error; // readable; never contains a secret
	bool retryable = true;
	long http_status = 0;
	int64_t retry_after_ms = 0;
	bool unavailable = false; // this credential is not configured here (the default chain moves on)
};

// Where environment variables come from (tests pass their own).
using EnvLookup = std::function<std::string(const std::string &)>;
EnvLookup ProcessEnv();

struct IdentityConfig {
	std::string kind; // managed_identity, workload_identity, client_secret, default
	// Managed identity.
	std::string client_id, object_id, resource_id;
	std::string source = "auto"; // auto, imds, app_service, arc
	std::string endpoint;        // the identity endpoint, overriding detection (tests)
	std::string arc_key_dir = "/var/opt/azcmagent/tokens";
	// Entra ID (workload identity, client secret).
	std::string tenant_id, authority_host, token_file;
	std::string client_secret;                         // given literally (never logged)
	std::string client_secret_file, client_secret_env; // or read at every exchange
	// Common.
	std::string resource = "https://servicebus.azure.net";
	std::string extra_ca_file; // trusted in addition to the system's CA store (sbpg.ca_file)
	long timeout_ms = 10000;
};

class TokenProvider {
  public:
	virtual ~TokenProvider() = default;
	virtual TokenResult Fetch() = 0;
	virtual std::string Describe() const = 0;
	// Lines explaining choices made (the default chain's skipped steps), drained by the caller.
	virtual std::vector<std::string> TakeNotes() { return {}; }
	// A flag that, once set, makes a request in progress give up.
	virtual void SetAbort(const std::atomic<bool> *abort) { abort_ = abort; }

  protected:
	const std::atomic<bool> *abort_ = nullptr;
};

// Fills cfg from an identity's kind and its options (a JSON object, as sbpg.identities stores
// it); false with *why when they cannot be used.
bool IdentityConfigFromJson(const std::string &kind, const std::string &options_json, IdentityConfig *cfg,
                            std::string *why);

// Reads a secret from a file (trailing white space removed) or an environment variable.
bool ReadSecret(const std::string &file, const std::string &env_name, const EnvLookup &env, std::string *out,
                std::string *why);

// Builds a provider; null with *why on a configuration error.
std::unique_ptr<TokenProvider> MakeTokenProvider(const IdentityConfig &cfg, const EnvLookup &env, std::string *why);

// Parses an identity endpoint's JSON answer (IMDS, App Service, Arc or Entra v2).
TokenResult ParseTokenResponse(const std::string &body, int64_t now_ms);
// When to refresh: after refresh_in seconds when the endpoint says so, otherwise at half-life;
// never later than a couple of minutes before expiry, never sooner than a second from now.
int64_t RefreshAt(int64_t obtained_ms, int64_t expires_ms, int64_t refresh_in_s);
// The claims of a JWT, without verification (for logs and tests).
bool PeekJwtClaims(const std::string &jwt, std::string *subject, std::string *audience, int64_t *exp_s);

// Keeps one identity's token fresh: fetches at start, renews per RefreshAt, retries failures with
// exponential backoff and full jitter (slowly for errors a retry is unlikely to cure), and calls
// on_change (from its own thread) whenever a new token or a new error is there.
class TokenSource {
  public:
	TokenSource(std::unique_ptr<TokenProvider> provider, std::function<void()> on_change);
	~TokenSource();
	TokenSource(const TokenSource &) = delete;
	TokenSource &operator=(const TokenSource &) = delete;

	void Start(); // with every signal blocked on the new thread
	void Stop();  // idempotent, joins
	// The latest token if it has not expired.
	bool Current(AccessToken *out);
	struct Status {
		bool has_token = false;
		int64_t expires_ms = 0;
		std::string last_error;
		int64_t last_error_ms = 0;
		uint64_t fetches = 0, failures = 0;
		std::string provider;
		std::string subject; // the current token's principal (oid), for sbpg.stats
	};
	Status GetStatus();
	// Log lines (fetched tokens, failures, retries, the default chain's choices); never a token.
	// Routine lines (a renewal like the one before) can go to a debug level.
	struct LogLine {
		bool routine = false;
		std::string text;
	};
	std::vector<LogLine> TakeLog();
	// Makes a blocked token request give up (called before Stop when the process exits).
	void Abort();
	// The broker refused token `serial`: ask for a new one soon. Repeated refusals back off
	// (1 s, 2 s, 4 s ... 5 min, with jitter), so a misconfigured identity never hammers the
	// endpoint; Accepted() ends the series.
	void Invalidate(uint64_t serial, const std::string &why);
	void Accepted(uint64_t serial);

  private:
	void Run();
	std::unique_ptr<TokenProvider> provider_;
	std::function<void()> on_change_;
	std::mutex mu_;
	std::condition_variable cv_;
	bool stop_ = false;
	bool started_ = false;
	bool force_ = false;
	int refusals_ = 0; // consecutive refusals by the broker
	uint64_t next_serial_ = 1;
	int64_t next_ms_ = 0;       // when the thread fetches next
	int64_t backoff_until_ = 0; // after a failure: no request before this
	std::mt19937_64 rng_;       // jitter (under mu_)
	AccessToken token_;
	Status status_;
	std::vector<LogLine> log_;
	std::atomic<bool> abort_{false};
	std::thread thread_;
};

} // namespace sbpg
