// sbemu/control.cpp
//   HTTP control interface (JSON in, JSON out). Routes:
//     GET  /health                         liveness
//     GET  /stats                          server-wide counters and active faults
//     GET  /connections                    connections, their tokens (never the token text) and links
//     GET  /entities                       counts of every entity
//     GET  /entities/<path>                counts of one entity (e.g. orders/$DeadLetterQueue)
//     GET  /entities/<path>/messages       the messages held, with state and dead-letter reason
//     POST /entities/<path>/messages       send the request body as a message (query: message_id,
//                                          content_type, session_id, correlation_id, subject, ttl_ms,
//                                          scheduled_ms, properties=<JSON object>)
//     POST /entities/<path>/purge          remove unlocked messages
//     POST /faults/drop-connections        close every connection abruptly
//     POST /faults/refuse-connections?seconds=N
//     POST /faults/server-busy?count=N     next N entity attaches answered com.microsoft:server-busy
//     POST /faults/server-busy-sends?count=N[&entity=PATH]  next N messages sent (to PATH) rejected
//     com.microsoft:server-busy POST /faults/expire-locks            every message and session lock expires now POST
//     /faults/reject-tokens?count=N   next N put-token requests refused POST /faults/hold-tokens?count=N    next N
//     put-token requests taken and never answered POST /faults/delay-dispositions?ms=N settlements take effect (and are
//     answered) N ms late POST /faults/omit-sequence-numbers?entity=PATH
//                                          that entity's deliveries carry no x-opt-sequence-number
//     POST /faults/clear                   switch every fault off
//     POST /reset                          purge all entities, zero counters, clear faults
#include "control.hpp"

#include "broker.hpp"
#include "sbpg/core/json.hpp"
#include "server.hpp"
#include "util.hpp"

#include <algorithm>
#include <cstring>
#include <functional>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sbemu {

namespace {

std::map<std::string, std::string>
ParseQuery(const std::string &q) {
	std::map<std::string, std::string> out;
	for (auto &kv : Split(q, '&')) {
		if (kv.empty())
			continue;
		size_t eq = kv.find('=');
		std::string k = kv.substr(0, eq), v = eq == std::string::npos ? "" : kv.substr(eq + 1);
		for (auto &ch : v)
			if (ch == '+')
				ch = ' ';
		std::string dk, dv;
		UrlDecode(k, &dk);
		UrlDecode(v, &dv);
		out[dk] = dv;
	}
	return out;
}

std::string
Error(int *status, int code, const std::string &msg) {
	if (status)
		*status = code;
	return "{\"error\":\"" + JsonEscape(msg) + "\"}";
}

// An integer query parameter, clamped to [lo, hi] (strtoll saturates on overflow).
int64_t
IntParam(const std::map<std::string, std::string> &q, const char *name, int64_t def, int64_t lo = INT64_MIN,
         int64_t hi = INT64_MAX) {
	auto it = q.find(name);
	int64_t v = it == q.end() || it->second.empty() ? def : std::strtoll(it->second.c_str(), nullptr, 10);
	return std::clamp(v, lo, hi);
}

// A fault window given as ms= or seconds=, in milliseconds within [0, kMaxFaultMs].
int64_t
WindowMs(const std::map<std::string, std::string> &q, int64_t default_seconds) {
	if (q.count("ms"))
		return IntParam(q, "ms", 0, 0, kMaxFaultMs);
	return IntParam(q, "seconds", default_seconds, 0, kMaxFaultMs / 1000) * 1000;
}

std::string
MessageJson(const Entity &e, const StoredMessage &m) {
	amqp::Sections sec;
	std::string err;
	std::string out = "{\"sequence_number\":" + std::to_string(m.seq) + ",\"message_id\":\"" +
	                  JsonEscape(m.message_id) + "\",\"state\":\"" + MsgStateName(m.state) +
	                  "\",\"delivery_count\":" + std::to_string(m.delivery_count) + ",\"enqueued_at\":\"" +
	                  FormatTime(m.enqueued_ms) + "\"";
	if (m.state == MsgState::Locked)
		out += ",\"locked_until\":\"" + FormatTime(m.locked_until) + "\"";
	if (m.scheduled_ms)
		out += ",\"scheduled_at\":\"" + FormatTime(m.scheduled_ms) + "\"";
	if (!m.session_id.empty())
		out += ",\"session_id\":\"" + JsonEscape(m.session_id) + "\"";
	if (!m.dead_letter_source.empty())
		out += ",\"dead_letter_source\":\"" + JsonEscape(m.dead_letter_source) + "\"";
	if (m.expires_ms != kNever)
		out += ",\"expires_at\":\"" + FormatTime(m.expires_ms) + "\"";
	if (amqp::SplitSections(*m.bare, &sec, &err)) {
		amqp::Value props;
		if (!sec.properties.empty() && amqp::DecodeSection(sec.properties, &props) &&
		    props.kind == amqp::Value::Kind::List) {
			auto field = [&](size_t idx, const char *name) {
				if (idx < props.items.size() && !props.items[idx].IsNull())
					out += std::string(",\"") + name + "\":\"" + JsonEscape(props.items[idx].ToText()) + "\"";
			};
			field(amqp::kCorrelationId, "correlation_id");
			field(amqp::kSubject, "subject");
			field(amqp::kContentType, "content_type");
			field(amqp::kTo, "to");
			field(amqp::kReplyTo, "reply_to");
		}
		amqp::Value app;
		if (!sec.application_properties.empty() && amqp::DecodeSection(sec.application_properties, &app)) {
			out += ",\"application_properties\":" + app.ToJson();
			const amqp::Value *r = app.Get("DeadLetterReason");
			const amqp::Value *d = app.Get("DeadLetterErrorDescription");
			if (r)
				out += ",\"dead_letter_reason\":\"" + JsonEscape(r->ToText()) + "\"";
			if (d)
				out += ",\"dead_letter_description\":\"" + JsonEscape(d->ToText()) + "\"";
		}
		// Body: data sections concatenated; an amqp-value string as text; anything else as JSON.
		std::string body, encoding;
		const uint8_t *p = reinterpret_cast<const uint8_t *>(sec.body.data());
		const uint8_t *end = p + sec.body.size();
		if (sec.body_code == amqp::kData) {
			while (p < end && *p == 0x00) {
				++p;
				amqp::Value bin;
				if (!amqp::Skip(p, end) || !amqp::Decode(p, end, &bin))
					break;
				body += bin.s;
			}
			encoding = IsValidUtf8(body) ? "utf8" : "base64";
			if (encoding == "base64")
				body = Base64Encode(body);
		} else if (sec.body_code == amqp::kAmqpValue) {
			amqp::Value v;
			amqp::DecodeSection(sec.body, &v);
			if (v.kind == amqp::Value::Kind::String) {
				body = v.s;
				encoding = "utf8";
			} else {
				body = v.ToJson();
				encoding = "amqp-value-json";
			}
		} else if (sec.body_code == amqp::kAmqpSequence) {
			encoding = "amqp-sequence-json";
			std::string seqs = "[";
			while (p < end && *p == 0x00) {
				++p;
				amqp::Value v;
				if (!amqp::Skip(p, end) || !amqp::Decode(p, end, &v))
					break;
				seqs += (seqs.size() > 1 ? "," : "") + v.ToJson();
			}
			body = seqs + "]";
		}
		out += ",\"body_encoding\":\"" + encoding + "\",\"body\":\"" + JsonEscape(body) + "\"";
	}
	(void)e;
	return out + "}";
}

// Builds an encoded message from control parameters.
bool
BuildMessage(const std::string &body, const std::map<std::string, std::string> &q, std::string *out, std::string *err) {
	auto get = [&](const char *k) -> std::string {
		auto it = q.find(k);
		return it == q.end() ? std::string() : it->second;
	};
	int64_t ttl = IntParam(q, "ttl_ms", 0, 0, UINT32_MAX);
	if (ttl > 0) {
		amqp::Value h = amqp::Value::List(
		    {amqp::Value::Bool(false), amqp::Value::UByte(4), amqp::Value::UInt(static_cast<uint32_t>(ttl))});
		amqp::EncodeSection(amqp::kHeader, h, out);
	}
	int64_t sched = IntParam(q, "scheduled_ms", 0);
	if (sched > 0) {
		amqp::Value ma = amqp::Value::Map();
		ma.Put(amqp::Value::Symbol("x-opt-scheduled-enqueue-time"), amqp::Value::Timestamp(sched));
		amqp::EncodeSection(amqp::kMessageAnnotations, ma, out);
	}
	auto str_or_null = [&](const char *k) {
		std::string v = get(k);
		return v.empty() ? amqp::Value() : amqp::Value::String(v);
	};
	std::string ct = get("content_type");
	amqp::Value props = amqp::Value::List({str_or_null("message_id"), amqp::Value(), amqp::Value(),
	                                       str_or_null("subject"), amqp::Value(), str_or_null("correlation_id"),
	                                       ct.empty() ? amqp::Value() : amqp::Value::Symbol(ct), amqp::Value(),
	                                       amqp::Value(), amqp::Value(), str_or_null("session_id")});
	amqp::EncodeSection(amqp::kProperties, props, out);
	std::string pj = get("properties");
	if (!pj.empty()) {
		rapidjson::Document d;
		d.Parse(pj.c_str(), pj.size());
		if (d.HasParseError() || !d.IsObject()) {
			*err = "properties must be a JSON object";
			return false;
		}
		amqp::Value ap = amqp::Value::Map();
		for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
			amqp::Value v;
			if (it->value.IsString())
				v = amqp::Value::String(it->value.GetString());
			else if (it->value.IsBool())
				v = amqp::Value::Bool(it->value.GetBool());
			else if (it->value.IsInt64())
				v = amqp::Value::Long(it->value.GetInt64());
			else if (it->value.IsNumber()) {
				v.kind = amqp::Value::Kind::Double;
				v.d = it->value.GetDouble();
			} else {
				*err = std::string("property ") + it->name.GetString() + " must be a string, number or boolean";
				return false;
			}
			ap.Put(amqp::Value::String(it->name.GetString()), v);
		}
		amqp::EncodeSection(amqp::kApplicationProperties, ap, out);
	}
	amqp::EncodeSection(amqp::kData, amqp::Value::Binary(body), out);
	return true;
}

} // namespace

ControlServer::~ControlServer() {
	Stop();
}

bool
ControlServer::Start(const std::string &addr, std::string *err) {
	size_t colon = addr.rfind(':');
	if (colon == std::string::npos) {
		*err = "--control needs host:port";
		return false;
	}
	std::string host = addr.substr(0, colon), port = addr.substr(colon + 1);
	struct addrinfo hints {
	}, *res = nullptr;
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	if (getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
		*err = "cannot resolve control address " + addr;
		return false;
	}
	int fd = socket(res->ai_family, res->ai_socktype, 0);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 16) != 0) {
		*err = "cannot listen on control address " + addr + ": " + std::strerror(errno);
		freeaddrinfo(res);
		if (fd >= 0)
			close(fd);
		return false;
	}
	freeaddrinfo(res);
	struct sockaddr_storage ss {};
	socklen_t len = sizeof ss;
	getsockname(fd, reinterpret_cast<struct sockaddr *>(&ss), &len);
	char hbuf[128], pbuf[16];
	getnameinfo(reinterpret_cast<struct sockaddr *>(&ss), len, hbuf, sizeof hbuf, pbuf, sizeof pbuf,
	            NI_NUMERICHOST | NI_NUMERICSERV);
	bound_ = std::string(hbuf) + ":" + pbuf;
	listen_fd_ = fd;
	thread_ = std::thread([this] { Loop(); });
	return true;
}

void
ControlServer::Stop() {
	stop_.store(true);
	if (listen_fd_ >= 0)
		shutdown(listen_fd_, SHUT_RDWR);
	if (thread_.joinable())
		thread_.join();
	if (listen_fd_ >= 0) {
		close(listen_fd_);
		listen_fd_ = -1;
	}
	// Requests in progress: a client that sends nothing more is cut off; one waiting for the
	// event loop is answered by it (or, once the loop has ended, at once with 503).
	std::list<Worker> workers;
	{
		std::lock_guard<std::mutex> g(mu_);
		for (int fd : client_fds_)
			shutdown(fd, SHUT_RDWR);
		workers.swap(workers_);
	}
	for (auto &w : workers)
		w.thread.join();
}

void
ControlServer::Reap(bool all) {
	std::list<Worker> done;
	{
		std::lock_guard<std::mutex> g(mu_);
		for (auto it = workers_.begin(); it != workers_.end();) {
			if (all || it->done->load()) {
				auto next = std::next(it);
				done.splice(done.end(), workers_, it);
				it = next;
			} else {
				++it;
			}
		}
	}
	for (auto &w : done)
		w.thread.join();
}

void
ControlServer::Loop() {
	while (!stop_.load()) {
		Reap(false);
		struct pollfd pfd {
			listen_fd_, POLLIN, 0
		};
		int r = poll(&pfd, 1, 200);
		if (r <= 0 || stop_.load())
			continue;
		int fd = accept(listen_fd_, nullptr, nullptr);
		if (fd < 0)
			continue;
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		// Each request is served on its own thread, so that a client that connects and sends
		// nothing cannot hold up the others.
		std::lock_guard<std::mutex> g(mu_);
		if (client_fds_.size() >= kMaxClients) {
			static const char busy[] =
			    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
			    "Connection: close\r\nContent-Length: 30\r\n\r\n{\"error\":\"too many requests\"}\n";
			ssize_t n = send(fd, busy, sizeof busy - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
			(void)n;
			close(fd);
			continue;
		}
		client_fds_.insert(fd);
		auto done = std::make_shared<std::atomic<bool>>(false);
		workers_.push_back({std::thread([this, fd, done] {
			                    try {
				                    Serve(fd);
			                    } catch (const std::exception &e) {
				                    LOG_ERROR("control request failed: %s", e.what());
			                    }
			                    {
				                    std::lock_guard<std::mutex> lk(mu_);
				                    client_fds_.erase(fd);
				                    close(fd);
			                    }
			                    done->store(true);
		                    }),
		                    done});
	}
}

namespace {

const char *
Reason(int status) {
	switch (status) {
	case 200:
		return "OK";
	case 400:
		return "Bad Request";
	case 404:
		return "Not Found";
	case 408:
		return "Request Timeout";
	case 411:
		return "Length Required";
	case 413:
		return "Payload Too Large";
	case 503:
		return "Service Unavailable";
	default:
		return "Error";
	}
}

} // namespace

void
ControlServer::Serve(int fd) {
	auto respond = [fd](int status, const std::string &resp) {
		std::string out = "HTTP/1.1 " + std::to_string(status) + " " + Reason(status) +
		                  "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
		                  std::to_string(resp.size() + 1) + "\r\n\r\n" + resp + "\n";
		size_t off = 0;
		while (off < out.size()) {
			ssize_t n = send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
			if (n <= 0)
				return;
			off += static_cast<size_t>(n);
		}
	};
	// The whole request must arrive within kReadTimeoutMs.
	const int64_t deadline = MonoMs() + kReadTimeoutMs;
	char buf[8192];
	auto receive = [&](std::string *into) -> bool {
		int64_t left = deadline - MonoMs();
		if (left <= 0)
			return false;
		struct pollfd pfd {
			fd, POLLIN, 0
		};
		if (poll(&pfd, 1, static_cast<int>(left)) <= 0 || stop_.load())
			return false;
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		if (n <= 0)
			return false;
		into->append(buf, static_cast<size_t>(n));
		return true;
	};
	std::string req;
	size_t header_end = std::string::npos;
	while (header_end == std::string::npos) {
		if (!receive(&req))
			return;
		header_end = req.find("\r\n\r\n");
		if (req.size() > (1u << 20) && header_end == std::string::npos)
			return respond(413, Error(nullptr, 0, "request header too large"));
	}
	std::string head = req.substr(0, header_end);
	std::string body = req.substr(header_end + 4);
	size_t content_length = 0;
	for (auto &line : Split(head, '\n')) {
		if (IStartsWith(line, "content-length:")) {
			char *endp = nullptr;
			const char *v = line.c_str() + 15;
			while (*v == ' ' || *v == '\t')
				++v;
			unsigned long long n = std::strtoull(v, &endp, 10);
			if (endp == v || n > kMaxBody)
				return respond(n > kMaxBody ? 413 : 400, Error(nullptr, 0, "bad or too large Content-Length"));
			content_length = static_cast<size_t>(n);
		} else if (IStartsWith(line, "transfer-encoding:")) {
			// Bodies are read by Content-Length only.
			return respond(411, Error(nullptr, 0, "send the body with a Content-Length, not a transfer encoding"));
		}
	}
	while (body.size() < content_length)
		if (!receive(&body))
			return;
	body.resize(content_length);
	std::string first = head.substr(0, head.find("\r\n"));
	auto parts = Split(first, ' ');
	int status = 200;
	std::string resp;
	if (parts.size() < 2) {
		resp = Error(&status, 400, "bad request line");
	} else {
		std::string target = parts[1];
		size_t qm = target.find('?');
		std::string path = target.substr(0, qm), query = qm == std::string::npos ? "" : target.substr(qm + 1);
		std::string dpath;
		UrlDecode(path, &dpath);
		resp = Handle(parts[0], dpath, query, body, &status);
	}
	respond(status, resp);
}

std::string
ControlServer::Handle(const std::string &method, const std::string &path, const std::string &query,
                      const std::string &body, int *status) {
	auto q = ParseQuery(query);
	Server &srv = server_;
	// Runs fn on the event loop; 503 when sbemu is not (or no longer) running it.
	auto run = [&](std::function<std::string()> fn) {
		std::string out;
		if (!srv.TryRunOnLoop(std::move(fn), &out))
			*status = 503;
		return out;
	};
	if (method == "GET" && path == "/health")
		return "{\"status\":\"ok\"}";
	if (method == "GET" && path == "/stats")
		return run([&srv] { return srv.StatsJson(); });
	if (method == "GET" && path == "/connections")
		return run([&srv] { return srv.ConnectionsJson(); });
	if (method == "GET" && (path == "/entities" || path == "/entities/")) {
		return run([&srv] {
			std::string out = "[";
			bool first = true;
			for (Entity *e : srv.broker().All()) {
				out += (first ? "" : ",") + e->CountsJson();
				first = false;
			}
			return out + "]";
		});
	}
	const std::string ep = "/entities/";
	if (path.compare(0, ep.size(), ep) == 0) {
		std::string rest = path.substr(ep.size());
		std::string action;
		for (const char *suffix : {"/messages", "/purge"}) {
			size_t sl = std::strlen(suffix);
			if (rest.size() > sl && rest.compare(rest.size() - sl, sl, suffix) == 0) {
				action = suffix + 1;
				rest.resize(rest.size() - sl);
				break;
			}
		}
		std::string result;
		int code = 200;
		result = run([&]() -> std::string {
			Entity *e = srv.broker().Find(rest);
			if (!e)
				return Error(&code, 404, "no entity '" + rest + "'");
			if (action.empty() && method == "GET")
				return e->CountsJson();
			if (action == "messages" && method == "GET") {
				int64_t limit = IntParam(q, "limit", 1000);
				std::string out = "[";
				int64_t k = 0;
				for (auto &kv : e->msgs) {
					if (k++ >= limit)
						break;
					out += (k > 1 ? "," : "") + MessageJson(*e, kv.second);
				}
				return out + "]";
			}
			if (action == "messages" && method == "POST") {
				std::string enc, err;
				if (!BuildMessage(body, q, &enc, &err))
					return Error(&code, 400, err);
				Incoming in;
				if (!ParseIncoming(enc, &in, &err))
					return Error(&code, 400, err);
				std::string id = in.message_id;
				Broker::SendResult r = srv.broker().Send(*e, std::move(in), NowMs());
				if (!r.ok)
					return Error(&code, 400, r.condition + ": " + r.description);
				return "{\"sequence_number\":" + std::to_string(r.seq) + ",\"message_id\":\"" + JsonEscape(id) +
				       "\",\"duplicate\":" + (r.duplicate ? "true" : "false") + "}";
			}
			if (action == "purge" && method == "POST") {
				size_t before = e->msgs.size();
				srv.broker().Purge(*e);
				return "{\"removed\":" + std::to_string(before - e->msgs.size()) + "}";
			}
			return Error(&code, 400, "unsupported method or action");
		});
		if (*status == 200)
			*status = code;
		return result;
	}
	if (method == "POST" && path.compare(0, 8, "/faults/") == 0) {
		std::string fault = path.substr(8);
		int code = 200;
		std::string r = run([&]() -> std::string {
			Faults &f = srv.faults();
			if (fault == "drop-connections")
				srv.DropConnections();
			else if (fault == "refuse-connections")
				srv.RefuseConnections(WindowMs(q, 5));
			else if (fault == "server-busy")
				f.server_busy_attaches = static_cast<int>(IntParam(q, "count", 1, 0, INT32_MAX));
			else if (fault == "server-busy-sends") {
				auto it = q.find("entity");
				Entity *e = it == q.end() ? nullptr : srv.broker().Find(it->second);
				if (it != q.end() && !e)
					return Error(&code, 404, "unknown entity '" + it->second + "'");
				f.server_busy_sends = static_cast<int>(IntParam(q, "count", 1, 0, INT32_MAX));
				f.server_busy_entity = e ? e->key : std::string();
			} else if (fault == "expire-locks")
				srv.broker().ExpireAllLocks(NowMs());
			else if (fault == "reject-tokens")
				f.reject_tokens = static_cast<int>(IntParam(q, "count", 1, 0, INT32_MAX));
			else if (fault == "hold-tokens")
				f.hold_tokens = static_cast<int>(IntParam(q, "count", 1, 0, INT32_MAX));
			else if (fault == "delay-dispositions")
				f.delay_dispositions_ms = IntParam(q, "ms", 0, 0, kMaxFaultMs);
			else if (fault == "omit-sequence-numbers") {
				auto it = q.find("entity");
				Entity *e = it == q.end() ? nullptr : srv.broker().Find(it->second);
				if (!e)
					return Error(&code, 404, "unknown entity '" + (it == q.end() ? std::string() : it->second) + "'");
				f.omit_sequence_numbers.insert(e->key);
			} else if (fault == "clear")
				srv.ClearFaults();
			else
				return Error(&code, 404, "unknown fault '" + fault + "'");
			return srv.StatsJson();
		});
		if (*status == 200)
			*status = code;
		return r;
	}
	if (method == "POST" && path == "/reset") {
		return run([&srv] {
			for (Entity *e : srv.broker().All())
				srv.broker().Purge(*e);
			srv.broker().ResetCounters();
			srv.ClearFaults();
			return std::string("{\"reset\":true}");
		});
	}
	return Error(status, 404, "no route " + method + " " + path);
}

} // namespace sbemu
