// sbpg/identity/sas.hpp
//   Shared Access Signature tokens, as the Azure SDKs make them for $cbs put-token
//   (type servicebus.windows.net:sastoken).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

// "SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded base64 HMAC-SHA256 of
// resource '\n' expiry>&se=<expiry>&skn=<key name>". The key is used as its UTF-8 bytes.
std::string MakeSasToken(std::string_view resource_uri, std::string_view key_name, std::string_view key,
                         int64_t expiry_unix_seconds);

} // namespace sbpg
