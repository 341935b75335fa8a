// src/identity/sas.cpp
//   Shared Access Signature tokens.
#include "sbpg/identity/sas.hpp"

#include "sbpg/core/text.hpp"

namespace sbpg {

std::string
MakeSasToken(std::string_view resource_uri, std::string_view key_name, std::string_view key, int64_t expiry) {
	std::string sr = UrlEncode(resource_uri);
	std::string se = std::to_string(expiry);
	std::string sig = Base64Encode(HmacSha256(key, sr + "\n" + se));
	return "SharedAccessSignature sr=" + sr + "&sig=" + UrlEncode(sig) + "&se=" + se + "&skn=" + UrlEncode(key_name);
}

} // namespace sbpg
