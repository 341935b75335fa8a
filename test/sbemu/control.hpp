// sbemu/control.hpp
//   The test control interface: a small HTTP/1.1 server that reads entity counts and injects
//   faults. It accepts on its own thread and serves each request on a thread of its own (so an
//   idle client holds up no one); the work of every request runs on the AMQP event thread through
//   Server::TryRunOnLoop, so the broker stays single-threaded.
#pragma once

#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace sbemu {

class Server;

class ControlServer {
  public:
	explicit ControlServer(Server &server) : server_(server) {}
	~ControlServer();
	// Binds host:port (port 0 picks one); returns false with err on failure.
	bool Start(const std::string &addr, std::string *err);
	std::string bound() const { return bound_; }
	void Stop();

  private:
	static constexpr size_t kMaxClients = 32;       // requests served at once
	static constexpr int64_t kReadTimeoutMs = 5000; // for the whole request to arrive
	static constexpr size_t kMaxBody = 64u << 20;   // request body
	struct Worker {
		std::thread thread;
		std::shared_ptr<std::atomic<bool>> done;
	};
	void Loop();
	void Serve(int fd);
	void Reap(bool all); // joins finished request threads (all: every one)
	std::string Handle(const std::string &method, const std::string &path, const std::string &query,
	                   const std::string &body, int *status);
	Server &server_;
	int listen_fd_ = -1;
	std::string bound_;
	std::thread thread_;
	std::atomic<bool> stop_{false};
	std::mutex mu_;
	std::set<int> client_fds_;  // connections being served (guarded by mu_)
	std::list<Worker> workers_; // their threads (guarded by mu_)
};

} // namespace sbemu
