// sbpg/identity/http.hpp
//   A minimal blocking HTTP(S) client over libcurl for the token providers. Requests and answers
//   may carry secrets: nothing here logs them, and libcurl's own tracing is never enabled.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

struct HttpRequest {
	std::string method = "GET";
	std::string url;
	std::vector<std::string> headers; // "Name: value"
	std::string body;                 // for POST
	long timeout_ms = 10000;
	long connect_timeout_ms = 5000;
	std::string extra_ca_file;                // trusted in addition to the system's CA store
	bool no_proxy = false;                    // the metadata endpoints must bypass proxies
	const std::atomic<bool> *abort = nullptr; // set: give up as soon as possible
};

struct HttpResponse {
	long status = 0; // 0 when no answer came
	std::string body;
	std::map<std::string, std::string> headers; // lower-case names
	std::string error;                          // transport error (no status)
	bool timed_out = false;
	bool local_error = false; // the request could not be made here (e.g. the CA file): not worth a fast retry
};

// Must be called once per process before any thread uses Http (libcurl's global init).
void HttpGlobalInit();
HttpResponse Http(const HttpRequest &req);
// "a=b&c=d" with form encoding.
std::string FormEncode(const std::vector<std::pair<std::string, std::string>> &fields);

} // namespace sbpg
