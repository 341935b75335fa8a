// sbemu/auth.hpp
//   Token verification for the emulator's claims-based security: Shared Access Signatures
//   (HMAC-SHA256 over the resource URI and expiry) and Entra ID style JWTs (RS256 against
//   configured public keys, audience https://servicebus.azure.net).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sbemu {

// Rights a credential grants, as Service Bus authorization rules do.
enum Rights : unsigned { kListen = 1, kSend = 2, kManage = 4, kAllRights = 7 };
std::string RightsText(unsigned rights);
bool ParseRights(std::string_view text, unsigned *out);

struct SasKey {
	std::string name;
	std::string key;
	unsigned rights = kAllRights;
};

// The outcome of verifying one token.
struct TokenGrant {
	bool ok = false;
	std::string error;      // why it was refused (never contains the token)
	std::string scope;      // entity path prefix the token covers ("" = whole namespace), lower case
	int64_t expires_ms = 0; // wall-clock expiry
	unsigned rights = 0;
	std::string identity; // key name, or the JWT's oid/appid/sub
};

// Reduces an audience or resource URI ("sb://host:port/a/b", "amqps://host/a", "/a", "a") to the
// entity path it names, lower case, without leading or trailing slashes.
std::string AudiencePath(std::string_view uri);
// A scope covers an entity path when it is empty (namespace-wide) or a path prefix of it.
bool ScopeCovers(std::string_view scope, std::string_view entity_path);

class JwtKeys {
  public:
	JwtKeys();
	~JwtKeys();
	JwtKeys(const JwtKeys &) = delete;
	JwtKeys &operator=(const JwtKeys &) = delete;
	// A PEM file with a public key (or a certificate).
	bool AddPemFile(const std::string &path, std::string *err);
	// A JWKS file ({"keys":[{"kty":"RSA","n":..,"e":..,"kid":..}]}).
	bool AddJwksFile(const std::string &path, std::string *err);
	size_t size() const;
	// Verifies signature, alg RS256, aud, exp, nbf at `now_ms`.
	TokenGrant Verify(std::string_view jwt, int64_t now_ms, const std::vector<std::string> &audiences) const;

  private:
	struct Impl;
	std::unique_ptr<Impl> impl_;
};

// Verifies "SharedAccessSignature sr=..&sig=..&se=..&skn=.." against the configured keys.
TokenGrant VerifySas(std::string_view token, int64_t now_ms, const std::vector<SasKey> &keys);

// Creates a SAS token (used by the control interface and tests).
std::string MakeSasToken(std::string_view resource_uri, const SasKey &key, int64_t expiry_seconds);

} // namespace sbemu
