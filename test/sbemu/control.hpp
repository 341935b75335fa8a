// sbemu/control.hpp
//   The test control interface: a small HTTP/1.1 server on its own thread that reads entity
//   counts and injects faults. Every request runs on the AMQP event thread through
//   Server::RunOnLoop, so the broker stays single-threaded.
#pragma once

#include <atomic>
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
	void Loop();
	void Serve(int fd);
	std::string Handle(const std::string &method, const std::string &path, const std::string &query,
	                   const std::string &body, int *status);
	Server &server_;
	int listen_fd_ = -1;
	std::string bound_;
	std::thread thread_;
	std::atomic<bool> stop_{false};
};

} // namespace sbemu
