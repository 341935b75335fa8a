// test/lib/harness.hpp
//   Process and protocol helpers for the C++ test programs: start sbemu on free ports and stop it
//   (a death by a signal the test did not send is a failure), call its HTTP control interface,
//   make SAS tokens, and reach the C objects under Proton C++ objects for what the 0.37 C++ API
//   lacks (settle modes, disposition conditions).
#pragma once

#include "tap.hpp"

#include <proton/delivery.h>
#include <proton/delivery.hpp>
#include <proton/link.h>
#include <proton/link.hpp>
#include <proton/receiver.hpp>
#include <proton/tracker.hpp>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace harness {

// The C objects under Proton C++ wrappers. A pointer to the protected accessor, formed through a
// derived class, may be applied to any object of the base.
struct LinkAccess : proton::receiver {
	static pn_link_t *Get(const proton::link &l) {
		auto fn = &LinkAccess::pn_object;
		return (l.*fn)();
	}
};
struct DeliveryAccess : proton::delivery {
	static pn_delivery_t *Get(const proton::transfer &t) {
		auto fn = &DeliveryAccess::pn_object;
		return (t.*fn)();
	}
};

inline std::string
ReadAll(int fd) {
	std::string out;
	char buf[4096];
	ssize_t n;
	while ((n = read(fd, buf, sizeof buf)) > 0)
		out.append(buf, static_cast<size_t>(n));
	return out;
}

// A TCP connection to host:port (the caller closes it); -1 when it cannot connect.
inline int
ConnectTcp(const std::string &hostport) {
	size_t colon = hostport.rfind(':');
	std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
	struct addrinfo hints {
	}, *res = nullptr;
	hints.ai_socktype = SOCK_STREAM;
	if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0)
		throw std::runtime_error("cannot resolve " + hostport);
	int fd = socket(res->ai_family, SOCK_STREAM, 0);
	if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
		freeaddrinfo(res);
		close(fd);
		return -1;
	}
	freeaddrinfo(res);
	return fd;
}

// A blocking HTTP/1.1 request to host:port; returns the body, sets *status.
inline std::string
Http(const std::string &hostport, const std::string &method, const std::string &path, int *status = nullptr,
     const std::string &body = "") {
	int fd = ConnectTcp(hostport);
	if (fd < 0)
		throw std::runtime_error("cannot connect to control " + hostport);
	std::string req = method + " " + path + " HTTP/1.1\r\nHost: " + hostport +
	                  "\r\nConnection: close\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
	if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size()))
		throw std::runtime_error("control write failed");
	std::string resp = ReadAll(fd);
	close(fd);
	size_t sp = resp.find(' ');
	if (status)
		*status = sp == std::string::npos ? 0 : std::atoi(resp.c_str() + sp + 1);
	size_t he = resp.find("\r\n\r\n");
	return he == std::string::npos ? std::string() : resp.substr(he + 4);
}

// The integer value of "field" in a flat JSON object (enough for sbemu's counts).
inline long
JsonInt(const std::string &json, const std::string &field) {
	std::string key = "\"" + field + "\":";
	size_t pos = json.find(key);
	if (pos == std::string::npos)
		throw std::runtime_error("no field " + field + " in " + json);
	return std::strtol(json.c_str() + pos + key.size(), nullptr, 10);
}

// The value after "key=" in a readiness line, up to the next space or newline.
inline std::string
Field(const std::string &line, const std::string &key) {
	size_t pos = line.find(" " + key + "=");
	if (pos == std::string::npos)
		return "";
	size_t start = pos + key.size() + 2;
	size_t end = line.find_first_of(" \n", start);
	return line.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

inline std::string
UrlEncode(const std::string &s) {
	static const char hex[] = "0123456789ABCDEF";
	std::string out;
	for (unsigned char c : s) {
		if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~')
			out += static_cast<char>(c);
		else {
			out += '%';
			out += hex[c >> 4];
			out += hex[c & 15];
		}
	}
	return out;
}

inline std::string
Base64(const std::string &in) {
	std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
	int n = EVP_EncodeBlock(reinterpret_cast<unsigned char *>(&out[0]),
	                        reinterpret_cast<const unsigned char *>(in.data()), static_cast<int>(in.size()));
	out.resize(static_cast<size_t>(n));
	return out;
}

// A Shared Access Signature as the SDKs make it.
inline std::string
SasToken(const std::string &resource, const std::string &key_name, const std::string &key, long expiry_unix) {
	std::string sr = UrlEncode(resource), se = std::to_string(expiry_unix);
	std::string to_sign = sr + "\n" + se;
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int len = 0;
	HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
	     reinterpret_cast<const unsigned char *>(to_sign.data()), to_sign.size(), mac, &len);
	return "SharedAccessSignature sr=" + sr +
	       "&sig=" + UrlEncode(Base64(std::string(reinterpret_cast<char *>(mac), len))) + "&se=" + se +
	       "&skn=" + UrlEncode(key_name);
}

inline long
NowUnix() {
	return static_cast<long>(
	    std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// Polls fn until true; the timeout only guards against a hang.
template <class F>
bool
WaitUntil(F fn, int timeout_ms = 15000) {
	auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
	while (std::chrono::steady_clock::now() < deadline) {
		if (fn())
			return true;
		std::this_thread::sleep_for(std::chrono::milliseconds(20));
	}
	return fn();
}

// An sbemu process for one test.
class Sbemu {
  public:
	explicit Sbemu(std::vector<std::string> args, const std::string &config_json = "") {
		char dir[] = "/tmp/sbemu-test-XXXXXX";
		if (!mkdtemp(dir))
			throw std::runtime_error("mkdtemp failed");
		dir_ = dir;
		std::vector<std::string> argv = {SBEMU_BIN,           "--control",   "127.0.0.1:0", "--log-file",
		                                 dir_ + "/sbemu.log", "--log-level", "debug"};
		bool has_listen = false;
		for (auto &a : args)
			if (a == "--listen" || a == "--tls-listen")
				has_listen = true;
		if (!has_listen) {
			argv.push_back("--listen");
			argv.push_back("127.0.0.1:0");
		}
		if (!config_json.empty()) {
			std::string path = dir_ + "/Config.json";
			FILE *f = std::fopen(path.c_str(), "w");
			std::fputs(config_json.c_str(), f);
			std::fclose(f);
			argv.push_back("--config");
			argv.push_back(path);
		}
		argv.insert(argv.end(), args.begin(), args.end());
		int out[2];
		if (pipe(out) != 0)
			throw std::runtime_error("pipe failed");
		pid_ = fork();
		if (pid_ == 0) {
			dup2(out[1], 1);
			close(out[0]);
			std::vector<char *> cargv;
			for (auto &a : argv)
				cargv.push_back(const_cast<char *>(a.c_str()));
			cargv.push_back(nullptr);
			execv(cargv[0], cargv.data());
			_exit(127);
		}
		close(out[1]);
		std::string line;
		char c;
		struct pollfd pfd {
			out[0], POLLIN, 0
		};
		while (line.find('\n') == std::string::npos) {
			if (poll(&pfd, 1, 10000) <= 0 || read(out[0], &c, 1) != 1)
				throw std::runtime_error("sbemu did not become ready: " + Log());
			line += c;
		}
		out_fd_ = out[0];
		auto strip = [](std::string v, const std::string &scheme) {
			return v.compare(0, scheme.size(), scheme) == 0 ? v.substr(scheme.size()) : v;
		};
		amqp_ = strip(Field(line, "amqp"), "amqp://");
		amqps_ = strip(Field(line, "amqps"), "amqps://");
		control_ = strip(Field(line, "control"), "http://");
	}
	~Sbemu() {
		if (pid_ > 0) {
			Stop();
		}
		if (out_fd_ >= 0)
			close(out_fd_);
	}
	Sbemu(const Sbemu &) = delete;
	Sbemu &operator=(const Sbemu &) = delete;

	std::string url() const { return "amqp://" + amqp_; }
	std::string tls_hostport() const { return amqps_; }
	std::string hostport() const { return amqp_; }
	std::string control_hostport() const { return control_; }
	const std::string &dir() const { return dir_; }
	std::string Log() const {
		FILE *f = std::fopen((dir_ + "/sbemu.log").c_str(), "r");
		if (!f)
			return "";
		std::string s;
		char buf[4096];
		size_t n;
		while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
			s.append(buf, n);
		std::fclose(f);
		return s;
	}
	std::string Get(const std::string &path) {
		int status = 0;
		std::string body = Http(control_, "GET", path, &status);
		if (status != 200)
			throw std::runtime_error("GET " + path + " -> " + std::to_string(status) + " " + body);
		return body;
	}
	std::string Post(const std::string &path, const std::string &body = "") {
		int status = 0;
		std::string r = Http(control_, "POST", path, &status, body);
		if (status != 200)
			throw std::runtime_error("POST " + path + " -> " + std::to_string(status) + " " + r);
		return r;
	}
	long Count(const std::string &entity, const std::string &field) {
		return JsonInt(Get("/entities/" + UrlEncode(entity)), field);
	}
	// Stops sbemu with SIGTERM; a process that died earlier, or by another signal, or that does
	// not exit (the guard: 20 s, then SIGKILL), fails the test.
	void Stop() {
		if (pid_ <= 0)
			return;
		int status = 0;
		pid_t r = waitpid(pid_, &status, WNOHANG);
		if (r == pid_) {
			tap::Fail(__FILE__, __LINE__, "sbemu died during the test: " + Describe(status));
		} else {
			kill(pid_, SIGTERM);
			bool exited = WaitUntil([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }, 20000);
			if (!exited) {
				kill(pid_, SIGKILL);
				waitpid(pid_, &status, 0);
				tap::Fail(__FILE__, __LINE__, "sbemu did not stop on SIGTERM");
			} else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
				tap::Fail(__FILE__, __LINE__, "sbemu did not exit cleanly: " + Describe(status));
			}
		}
		pid_ = -1;
	}

  private:
	static std::string Describe(int status) {
		if (WIFSIGNALED(status))
			return std::string("terminated by signal ") + strsignal(WTERMSIG(status));
		return "exit code " + std::to_string(WEXITSTATUS(status));
	}
	pid_t pid_ = -1;
	int out_fd_ = -1;
	std::string dir_, amqp_, amqps_, control_;
};

} // namespace harness
