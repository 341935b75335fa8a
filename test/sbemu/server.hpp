// sbemu/server.hpp
//   The AMQP 1.0 side of the emulator, on Qpid Proton's C proactor with one event thread:
//   SASL (ANONYMOUS, PLAIN, MSSBCBS), TLS, claims-based security on $cbs, entity links,
//   $management request/response and fault injection. All broker state is touched only on the
//   event thread; other threads reach it through RunOnLoop().
#pragma once

#include "auth.hpp"
#include "broker.hpp"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

struct pn_proactor_t;
struct pn_listener_t;
struct pn_event_t;
struct pn_ssl_domain_t;

namespace sbemu {

struct ServerOptions {
	std::vector<std::string> listen;     // plain AMQP, host:port
	std::vector<std::string> tls_listen; // AMQP over TLS, host:port
	std::string tls_cert, tls_key, tls_key_password;
	std::vector<SasKey> sas_keys;
	std::vector<std::string> jwt_audiences{"https://servicebus.azure.net"};
	int64_t cbs_grace_ms = 20000;       // a connection must put a valid token within this time
	uint64_t max_message_size = 262144; // bytes, per message and per batch
	uint32_t link_credit = 1000;        // credit granted to senders
	int64_t session_wait_ms = 60000;    // accept-next-session wait when the client sets no timeout
	bool no_auth = false;               // links need no token (local development only)
	std::string container_id = "sbemu";
};

// The longest a fault window (refuse-connections, delay-dispositions) may be asked for.
constexpr int64_t kMaxFaultMs = 24 * 3600 * 1000LL;

// Faults a test can switch on through the control interface.
struct Faults {
	int server_busy_attaches = 0;   // answer the next N attaches with com.microsoft:server-busy
	int server_busy_sends = 0;      // reject the next N messages sent to entities with com.microsoft:server-busy
	std::string server_busy_entity; // ...only those sent to this entity (its key), when set
	int reject_tokens = 0;          // refuse the next N put-token requests (401)
	int hold_tokens = 0;            // take the next N put-token requests and never answer them
	int64_t delay_dispositions_ms = 0;
	int64_t refuse_until_ms = 0; // listeners closed until then
	// Entities (by key) whose receive-link deliveries carry no x-opt-sequence-number, as a broker
	// that numbers nothing would send them ($management answers keep it).
	std::set<std::string> omit_sequence_numbers;
};

struct Conn;
class LinkCtx;

class Server {
  public:
	Server(Broker &broker, ServerOptions opts, const JwtKeys *jwt);
	~Server();
	Server(const Server &) = delete;
	Server &operator=(const Server &) = delete;

	// Opens the listeners; on_ready gets the bound addresses ("amqp://127.0.0.1:5672", ...) once all are listening.
	bool Start(std::function<void(const std::vector<std::string> &)> on_ready, std::string *err);
	// Runs the event loop until Stop().
	void Run();
	void Stop(); // thread-safe
	// Runs fn on the event thread and returns its result (thread-safe, blocking). Before Start and
	// once the event loop has ended it runs nothing and returns false at once, with an error
	// document in *out.
	bool TryRunOnLoop(std::function<std::string()> fn, std::string *out);
	std::string RunOnLoop(std::function<std::string()> fn); // the result, or the error document

	// Event-thread operations for the control interface.
	void DropConnections();
	void RefuseConnections(int64_t ms); // clamped to [0, kMaxFaultMs]
	void ClearFaults();                 // every fault off, listeners reopened
	Faults &faults() { return faults_; }
	std::string ConnectionsJson();
	std::string StatsJson();
	Broker &broker() { return broker_; }
	const ServerOptions &options() const { return opts_; }

	// Used by Conn and LinkCtx (event thread only).
	void HandleEvent(pn_event_t *e);
	int64_t now() const;
	const std::vector<SasKey> &sas_keys() const { return opts_.sas_keys; }

  private:
	friend struct Conn;
	friend class LinkCtx;
	void OnTick();
	void OpenListeners();
	void EndRefusal();
	size_t MaxRequestSize() const;
	void RunControlQueue();
	void OnLinkOpen(Conn &c, LinkCtx &l);
	void OnIncoming(Conn &c, LinkCtx &l, void *delivery);
	void OnOutgoingUpdate(Conn &c, LinkCtx &l, void *delivery);
	void ApplyDisposition(Conn &c, LinkCtx &l, void *delivery);
	void HandleCbs(Conn &c, LinkCtx &l, const std::string &msg);
	void HandleManagement(Conn &c, LinkCtx &l, const std::string &msg);
	void HandleEntitySend(Conn &c, LinkCtx &l, const std::string &msg, void *delivery);
	void SendReply(Conn &c, const std::string &reply_to, std::string bytes);
	void FlushReplies(LinkCtx &l);
	void Pump(Conn &c, LinkCtx &l);
	void CloseConnection(Conn &c, const char *cond, const std::string &desc, bool abrupt);
	void DetachLink(LinkCtx &l, const char *cond, const std::string &desc);
	void TryPendingSessions(Entity &e);
	void CompletePendingSession(LinkCtx &l, bool timed_out);
	void ReleaseConnection(Conn &c);
	bool Authorized(Conn &c, const std::string &path, unsigned right, std::string *why);
	void CheckTokens(Conn &c);

	Broker &broker_;
	ServerOptions opts_;
	const JwtKeys *jwt_;
	Faults faults_;
	pn_proactor_t *proactor_ = nullptr;
	pn_ssl_domain_t *ssl_domain_ = nullptr;
	struct ListenerInfo {
		std::string addr;
		bool tls = false;
		pn_listener_t *listener = nullptr; // until PN_LISTENER_CLOSE
		std::string bound;
		bool open = false;    // PN_LISTENER_OPEN seen
		bool closing = false; // closed by refuse-connections, PN_LISTENER_CLOSE not yet seen
	};
	std::vector<ListenerInfo> listeners_;
	std::function<void(const std::vector<std::string> &)> on_ready_;
	bool ready_sent_ = false;
	std::unordered_map<uint64_t, Conn *> conns_;
	uint64_t next_conn_id_ = 1;
	uint64_t next_link_id_ = 1;
	std::vector<LinkCtx *> pending_sessions_;
	// Control requests from other threads.
	struct ControlRequest {
		std::function<std::string()> fn;
		std::promise<std::pair<bool, std::string>> result; // ran, result
	};
	std::mutex control_mu_;
	bool accepting_control_ = false; // guarded by control_mu_: the proactor exists and the loop runs
	std::deque<std::shared_ptr<ControlRequest>> control_queue_;
	std::atomic<bool> stop_{false};
	uint64_t total_connections_ = 0, put_tokens_ok_ = 0, put_tokens_refused_ = 0, sasl_failures_ = 0;
	int64_t started_ms_ = 0;
};

} // namespace sbemu
