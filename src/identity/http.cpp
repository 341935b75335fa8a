// src/identity/http.cpp
//   libcurl, easy interface, one handle per request. Every CURLcode is checked in one place.
#include "sbpg/identity/http.hpp"

#include "sbpg/core/text.hpp"

#include <curl/curl.h>

#include <fstream>
#include <mutex>
#include <sstream>

namespace sbpg {

namespace {

size_t
OnBody(char *data, size_t size, size_t n, void *user) {
	auto *out = static_cast<std::string *>(user);
	size_t len = size * n;
	if (out->size() + len > (4u << 20))
		return 0; // an identity answer is small: refuse anything huge
	out->append(data, len);
	return len;
}

size_t
OnHeader(char *data, size_t size, size_t n, void *user) {
	auto *out = static_cast<std::map<std::string, std::string> *>(user);
	std::string line(data, size * n);
	size_t colon = line.find(':');
	if (colon != std::string::npos) {
		std::string name = ToLower(line.substr(0, colon));
		std::string value = line.substr(colon + 1);
		while (!value.empty() && (value.front() == ' ' || value.front() == '\t'))
			value.erase(value.begin());
		while (!value.empty() && (value.back() == '\r' || value.back() == '\n' || value.back() == ' '))
			value.pop_back();
		(*out)[name] = value;
	}
	return size * n;
}

std::string
ReadFile(const std::string &path) {
	std::ifstream f(path, std::ios::binary);
	std::stringstream ss;
	ss << f.rdbuf();
	return f ? ss.str() : std::string();
}

// The system's CA bundle followed by the extra CA file, built once per extra file: libcurl's
// CAINFO replaces the system store, and an extra CA must add to it, as it does for Proton.
bool
TrustBlob(const std::string &extra, std::string *blob, std::string *why) {
	static std::mutex mu;
	static std::string cached_for, cached;
	std::lock_guard<std::mutex> g(mu);
	if (cached_for == extra) {
		*blob = cached;
		return true;
	}
	std::string extra_pem = ReadFile(extra);
	if (extra_pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
		*why = "the CA file " + extra + " cannot be read or holds no PEM certificate";
		return false;
	}
	std::string system_pem;
	CURL *h = curl_easy_init();
	if (h) {
		char *path = nullptr;
		if (curl_easy_getinfo(h, CURLINFO_CAINFO, &path) == CURLE_OK && path)
			system_pem = ReadFile(path);
		curl_easy_cleanup(h);
	}
	cached = system_pem + (system_pem.empty() || system_pem.back() == '\n' ? "" : "\n") + extra_pem;
	cached_for = extra;
	*blob = cached;
	return true;
}

int
OnProgress(void *user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
	auto *abort = static_cast<const std::atomic<bool> *>(user);
	return abort && abort->load() ? 1 : 0;
}

} // namespace

void
HttpGlobalInit() {
	static std::once_flag once;
	std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string
FormEncode(const std::vector<std::pair<std::string, std::string>> &fields) {
	std::string out;
	for (auto &f : fields) {
		if (!out.empty())
			out += '&';
		out += UrlEncode(f.first) + "=" + UrlEncode(f.second);
	}
	return out;
}

HttpResponse
Http(const HttpRequest &req) {
	HttpResponse resp;
	CURL *h = curl_easy_init();
	if (!h) {
		resp.error = "cannot create an HTTP handle";
		return resp;
	}
	struct curl_slist *headers = nullptr;
	for (auto &hd : req.headers)
		headers = curl_slist_append(headers, hd.c_str());
	char errbuf[CURL_ERROR_SIZE] = "";
	CURLcode rc = CURLE_OK;
	auto set = [&](CURLoption opt, auto value) {
		if (rc == CURLE_OK)
			rc = curl_easy_setopt(h, opt, value);
	};
	set(CURLOPT_URL, req.url.c_str());
	set(CURLOPT_ERRORBUFFER, errbuf);
	set(CURLOPT_NOSIGNAL, 1L); // never raise signals in a PostgreSQL process
	set(CURLOPT_TIMEOUT_MS, req.timeout_ms);
	set(CURLOPT_CONNECTTIMEOUT_MS, req.connect_timeout_ms);
	set(CURLOPT_FOLLOWLOCATION, 0L);
	set(CURLOPT_PROTOCOLS_STR, "http,https");
	set(CURLOPT_WRITEFUNCTION, OnBody);
	set(CURLOPT_WRITEDATA, &resp.body);
	set(CURLOPT_HEADERFUNCTION, OnHeader);
	set(CURLOPT_HEADERDATA, &resp.headers);
	set(CURLOPT_VERBOSE, 0L);
	if (headers)
		set(CURLOPT_HTTPHEADER, headers);
	std::string trust;
	if (!req.extra_ca_file.empty()) {
		std::string why;
		if (!TrustBlob(req.extra_ca_file, &trust, &why)) {
			curl_slist_free_all(headers);
			curl_easy_cleanup(h);
			resp.error = why;
			resp.local_error = true;
			return resp;
		}
		struct curl_blob blob = {const_cast<char *>(trust.data()), trust.size(), CURL_BLOB_NOCOPY};
		set(CURLOPT_CAINFO_BLOB, &blob);
	}
	if (req.no_proxy)
		set(CURLOPT_NOPROXY, "*");
	if (req.abort) {
		set(CURLOPT_NOPROGRESS, 0L);
		set(CURLOPT_XFERINFOFUNCTION, OnProgress);
		set(CURLOPT_XFERINFODATA, const_cast<std::atomic<bool> *>(req.abort));
	}
	if (req.method == "POST") {
		set(CURLOPT_POST, 1L);
		set(CURLOPT_POSTFIELDS, req.body.c_str());
		set(CURLOPT_POSTFIELDSIZE, static_cast<long>(req.body.size()));
	}
	if (rc == CURLE_OK)
		rc = curl_easy_perform(h);
	if (rc == CURLE_OK) {
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp.status);
	} else {
		resp.timed_out = rc == CURLE_OPERATION_TIMEDOUT;
		// The URL is safe to show (no secret travels in a query string here); the body is not shown.
		resp.error = std::string(errbuf[0] ? errbuf : curl_easy_strerror(rc));
	}
	curl_slist_free_all(headers);
	curl_easy_cleanup(h);
	return resp;
}

} // namespace sbpg
