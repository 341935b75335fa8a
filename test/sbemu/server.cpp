// sbemu/server.cpp
//   Proton proactor event loop: connections, SASL, claims-based security, entity links,
//   settlement, $management and fault injection.
#include "server.hpp"

#include "util.hpp"

#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/connection.h>
#include <proton/delivery.h>
#include <proton/disposition.h>
#include <proton/event.h>
#include <proton/link.h>
#include <proton/listener.h>
#include <proton/netaddr.h>
#include <proton/proactor.h>
#include <proton/sasl.h>
#include <proton/sasl_plugin.h>
#include <proton/session.h>
#include <proton/ssl.h>
#include <proton/terminus.h>
#include <proton/transport.h>

#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <set>

namespace sbemu {

namespace {

constexpr pn_millis_t kTickMs = 20;
// The longest a session receiver's attach waits for a session (com.microsoft:timeout is the
// client's; larger values are clamped).
constexpr int64_t kMaxSessionWaitMs = 24 * 3600 * 1000LL;
const char kLockLostDesc[] =
    "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.";

int64_t
DotNetTicks(int64_t ms) {
	return ms * 10000 + 621355968000000000LL;
}

// Converts a pn_data_t to the emulator's value tree by encoding it and decoding the bytes.
bool
DataToValue(pn_data_t *data, amqp::Value *out) {
	if (!data)
		return false;
	pn_data_rewind(data);
	if (!pn_data_next(data))
		return false;
	pn_data_rewind(data);
	ssize_t size = pn_data_encoded_size(data);
	if (size <= 0)
		return false;
	std::string buf(static_cast<size_t>(size), '\0');
	if (pn_data_encode(data, &buf[0], buf.size()) < 0)
		return false;
	return amqp::DecodeAll(buf, out);
}

// A decoded $cbs or $management request.
struct Request {
	amqp::Value message_id;
	std::string reply_to;
	amqp::Value app; // application-properties map
	amqp::Value body;
};

bool
ParseRequest(const std::string &msg, Request *r, std::string *err) {
	amqp::Sections sec;
	if (!amqp::SplitSections(msg, &sec, err))
		return false;
	amqp::Value props;
	if (!sec.properties.empty() && amqp::DecodeSection(sec.properties, &props) &&
	    props.kind == amqp::Value::Kind::List) {
		if (props.items.size() > amqp::kMessageId)
			r->message_id = props.items[amqp::kMessageId];
		if (props.items.size() > amqp::kReplyTo)
			r->reply_to = props.items[amqp::kReplyTo].ToText();
	}
	if (!sec.application_properties.empty())
		amqp::DecodeSection(sec.application_properties, &r->app);
	if (sec.body_code == amqp::kAmqpValue)
		amqp::DecodeSection(sec.body, &r->body);
	return true;
}

std::string
AppText(const amqp::Value &app, const char *key) {
	const amqp::Value *v = app.Get(key);
	return v ? v->ToText() : std::string();
}

// Builds a reply: correlation-id = the request's message-id (same type), status in the
// application properties (hyphenated keys on $cbs, camelCase on $management).
std::string
BuildReply(const Request &req, int status, const std::string &desc, const char *condition, const amqp::Value *body,
           bool camel) {
	std::string out;
	amqp::Value props = amqp::Value::List({amqp::Value(), amqp::Value(),
	                                       req.reply_to.empty() ? amqp::Value() : amqp::Value::String(req.reply_to),
	                                       amqp::Value(), amqp::Value(), req.message_id});
	amqp::EncodeSection(amqp::kProperties, props, &out);
	amqp::Value app = amqp::Value::Map();
	app.Put(amqp::Value::String(camel ? "statusCode" : "status-code"), amqp::Value::Int(status));
	app.Put(amqp::Value::String(camel ? "statusDescription" : "status-description"), amqp::Value::String(desc));
	if (condition)
		app.Put(amqp::Value::String(camel ? "errorCondition" : "error-condition"), amqp::Value::Symbol(condition));
	amqp::EncodeSection(amqp::kApplicationProperties, app, &out);
	amqp::EncodeSection(amqp::kAmqpValue, body ? *body : amqp::Value::Map(), &out);
	return out;
}

// Splits a batch envelope's body into the encoded messages it carries. Proton 0.37 does not
// expose a transfer's message-format, so a batch is recognised by its shape, as strictly as the
// SDKs allow: the envelope sets no header fields (the JavaScript SDK's envelope has an empty
// header, .NET's none), and its body is one or more data sections each of which decodes
// completely as a message with a properties section and a body. An ordinary message whose data
// sections happen to hold such encoded messages is still taken for a batch (see README.md).
bool
BatchMessages(const std::string &msg, std::vector<std::string_view> *out) {
	amqp::Sections sec;
	std::string err;
	if (!amqp::SplitSections(msg, &sec, &err) || sec.body_code != amqp::kData || sec.body_sections < 1)
		return false;
	if (!sec.header.empty()) {
		amqp::Value h;
		if (!amqp::DecodeSection(sec.header, &h) || h.kind != amqp::Value::Kind::List)
			return false;
		for (auto &field : h.items)
			if (!field.IsNull())
				return false;
	}
	std::vector<std::string_view> parts;
	const uint8_t *p = reinterpret_cast<const uint8_t *>(sec.body.data());
	const uint8_t *end = p + sec.body.size();
	while (p < end) {
		// Each body section is 0x00, the data descriptor (validated by SplitSections), a binary.
		if (*p != 0x00)
			return false;
		++p;
		if (!amqp::Skip(p, end) || p >= end)
			return false;
		size_t len;
		uint8_t code = *p++;
		if (code == 0xa0 && end - p >= 1) {
			len = *p++;
		} else if (code == 0xb0 && end - p >= 4) {
			len = (size_t(p[0]) << 24) | (size_t(p[1]) << 16) | (size_t(p[2]) << 8) | size_t(p[3]);
			p += 4;
		} else {
			return false;
		}
		if (static_cast<size_t>(end - p) < len)
			return false;
		std::string_view payload(reinterpret_cast<const char *>(p), len);
		p += len;
		amqp::Sections inner;
		if (payload.empty() || !amqp::SplitSections(payload, &inner, &err) || inner.properties.empty() ||
		    inner.body_sections == 0)
			return false;
		parts.push_back(payload);
	}
	if (parts.empty())
		return false;
	*out = std::move(parts);
	return true;
}

} // namespace

// ---------------------------------------------------------------------------------------------

enum class Role { Refused, Receiver, Sender, CbsIn, CbsOut, MgmtIn, MgmtOut };

const char *
RoleName(Role r) {
	switch (r) {
	case Role::Receiver:
		return "receiver";
	case Role::Sender:
		return "sender";
	case Role::CbsIn:
		return "cbs-request";
	case Role::CbsOut:
		return "cbs-reply";
	case Role::MgmtIn:
		return "management-request";
	case Role::MgmtOut:
		return "management-reply";
	default:
		return "refused";
	}
}

struct Conn {
	Server *srv = nullptr;
	pn_connection_t *pc = nullptr;
	uint64_t id = 0;
	std::string remote;
	bool tls = false;
	std::string mech;
	bool plain = false;
	unsigned plain_rights = 0;
	std::string plain_key;
	struct Token {
		std::string scope;
		int64_t expires_ms;
		unsigned rights;
		std::string identity;
		std::string type;
	};
	std::vector<Token> tokens;
	bool ever_authorized = false;
	int64_t opened_ms = 0;
	std::unordered_map<uint64_t, std::unique_ptr<LinkCtx>> links;
	std::vector<std::function<void(Conn &)>> tasks;
	bool wake_pending = false;
	bool closed = false;
	bool grace_reported = false;
	std::set<Entity *> lock_entities;

	void Wake() {
		if (!wake_pending && !closed && pc) {
			wake_pending = true;
			pn_connection_wake(pc);
		}
	}
	void Post(std::function<void(Conn &)> fn) {
		tasks.push_back(std::move(fn));
		Wake();
	}
};

class LinkCtx : public Consumer {
  public:
	Server *srv = nullptr;
	Conn *conn = nullptr;
	pn_link_t *link = nullptr;
	uint64_t id = 0;
	Role role = Role::Refused;
	Entity *entity = nullptr;
	bool peek_lock = true;
	bool registered = false; // added to the broker as a consumer
	bool closing = false;
	std::string name, address, reply_target;
	std::string buf;
	bool too_big = false;
	std::deque<std::string> outq;
	uint64_t tag_counter = 0;
	bool pump_pending = false;
	bool pending_session = false;
	bool session_any = false;
	std::string session_wanted;
	int64_t session_deadline = 0;
	struct Delayed {
		pn_delivery_t *d;
		int64_t due;
	};
	std::deque<Delayed> delayed;
	std::string scratch;

	uint32_t Credit() const override {
		if (!link || closing || pending_session)
			return 0;
		int c = pn_link_credit(link);
		return c > 0 ? static_cast<uint32_t>(c) : 0u;
	}
	bool PeekLock() const override { return peek_lock; }
	void Deliver(Entity &e, StoredMessage &m) override {
		scratch.clear();
		srv->broker().EncodeDelivery(e, m, peek_lock, &scratch, srv->faults().omit_sequence_numbers.count(e.key) == 0);
		pn_delivery_t *d;
		if (peek_lock) {
			d = pn_delivery(link, pn_dtag(reinterpret_cast<const char *>(m.lock.data()), 16));
		} else {
			uint64_t t = ++tag_counter;
			d = pn_delivery(link, pn_dtag(reinterpret_cast<const char *>(&t), sizeof t));
		}
		pn_link_send(link, scratch.data(), scratch.size());
		pn_link_advance(link);
		if (!peek_lock)
			pn_delivery_settle(d);
	}
	void Wake() override {
		pump_pending = true;
		conn->Wake();
	}
	void SessionLockLost() override {
		uint64_t lid = id;
		Server *s = srv;
		conn->Post([s, lid](Conn &c) {
			auto it = c.links.find(lid);
			if (it != c.links.end())
				s->DetachLink(*it->second, "com.microsoft:session-lock-lost",
				              "The session lock has expired on the MessageSession. Accept a new MessageSession.");
		});
	}
};

// ---------------------------------------------------------------------------------------------
// SASL: ANONYMOUS and MSSBCBS (the token comes later on $cbs) and PLAIN (a shared access key
// name and key, authorizing the whole connection).

namespace {

const char kAnonymousUser[] = "anonymous";
const char kSasUser[] = "sas-key";

void
SaslFree(pn_transport_t *) {}
const char *
SaslListMechs(pn_transport_t *) {
	return "MSSBCBS PLAIN ANONYMOUS";
}
bool
SaslInitServer(pn_transport_t *t) {
	pnx_sasl_set_desired_state(t, SASL_POSTED_MECHANISMS);
	return true;
}
bool
SaslInitClient(pn_transport_t *) {
	return false;
}
void
SaslPrepare(pn_transport_t *) {}
void
SaslProcessInit(pn_transport_t *t, const char *mech, const pn_bytes_t *recv) {
	Conn *c = static_cast<Conn *>(pnx_sasl_get_context(t));
	std::string m = mech ? mech : "";
	if (c)
		c->mech = m;
	if (m == "ANONYMOUS" || m == "MSSBCBS") {
		pnx_sasl_set_succeeded(t, kAnonymousUser, nullptr);
	} else if (m == "PLAIN" && recv && c) {
		// authzid NUL authcid NUL password
		std::string data(recv->start ? recv->start : "", recv->size);
		size_t a = data.find('\0');
		size_t b = a == std::string::npos ? a : data.find('\0', a + 1);
		bool ok = false;
		if (b != std::string::npos) {
			std::string user = data.substr(a + 1, b - a - 1), pass = data.substr(b + 1);
			for (auto &k : c->srv->sas_keys())
				if (k.name == user && k.key.size() == pass.size() &&
				    CRYPTO_memcmp(k.key.data(), pass.data(), pass.size()) == 0) {
					c->plain = true;
					c->plain_rights = k.rights;
					c->plain_key = k.name;
					ok = true;
				}
			if (!ok)
				LOG_INFO("connection %llu: SASL PLAIN refused for key name '%s'", (unsigned long long)c->id,
				         user.c_str());
		}
		if (ok)
			pnx_sasl_set_succeeded(t, kSasUser, nullptr);
		else
			pnx_sasl_set_failed(t);
	} else {
		pnx_sasl_set_failed(t);
	}
	pnx_sasl_set_desired_state(t, SASL_POSTED_OUTCOME);
}
void
SaslProcessResponse(pn_transport_t *, const pn_bytes_t *) {}
bool
SaslProcessMechanisms(pn_transport_t *, const char *) {
	return false;
}
void
SaslProcessChallenge(pn_transport_t *, const pn_bytes_t *) {}
void
SaslProcessOutcome(pn_transport_t *, const pn_bytes_t *) {}
bool
SaslCanEncrypt(pn_transport_t *) {
	return false;
}
ssize_t
SaslMaxEncrypt(pn_transport_t *) {
	return 0;
}
ssize_t
SaslEncode(pn_transport_t *, pn_bytes_t, pn_bytes_t *) {
	return 0;
}
ssize_t
SaslDecode(pn_transport_t *, pn_bytes_t, pn_bytes_t *) {
	return 0;
}

const pnx_sasl_implementation kSaslImpl = {SaslFree,
                                           SaslListMechs,
                                           SaslInitServer,
                                           SaslInitClient,
                                           SaslPrepare,
                                           SaslProcessInit,
                                           SaslProcessResponse,
                                           SaslProcessMechanisms,
                                           SaslProcessChallenge,
                                           SaslProcessOutcome,
                                           SaslCanEncrypt,
                                           SaslMaxEncrypt,
                                           SaslEncode,
                                           SaslDecode};

} // namespace

// ---------------------------------------------------------------------------------------------

Server::Server(Broker &broker, ServerOptions opts, const JwtKeys *jwt)
    : broker_(broker), opts_(std::move(opts)), jwt_(jwt) {
	broker_.on_session_available = [this](Entity &e) { TryPendingSessions(e); };
}

Server::~Server() {
	if (ssl_domain_)
		pn_ssl_domain_free(ssl_domain_);
	if (proactor_)
		pn_proactor_free(proactor_);
}

int64_t
Server::now() const {
	return NowMs();
}

bool
Server::Start(std::function<void(const std::vector<std::string> &)> on_ready, std::string *err) {
	on_ready_ = std::move(on_ready);
	started_ms_ = NowMs();
	if (!opts_.tls_listen.empty()) {
		if (opts_.tls_cert.empty() || opts_.tls_key.empty()) {
			*err = "--tls-listen needs --tls-cert and --tls-key";
			return false;
		}
		ssl_domain_ = pn_ssl_domain(PN_SSL_MODE_SERVER);
		if (pn_ssl_domain_set_credentials(ssl_domain_, opts_.tls_cert.c_str(), opts_.tls_key.c_str(),
		                                  opts_.tls_key_password.empty() ? nullptr : opts_.tls_key_password.c_str()) !=
		    0) {
			*err = "cannot load TLS certificate " + opts_.tls_cert + " / key " + opts_.tls_key;
			return false;
		}
	}
	for (auto &a : opts_.listen) {
		listeners_.emplace_back();
		listeners_.back().addr = a;
	}
	for (auto &a : opts_.tls_listen) {
		listeners_.emplace_back();
		listeners_.back().addr = a;
		listeners_.back().tls = true;
	}
	if (listeners_.empty()) {
		*err = "nothing to listen on (--listen or --tls-listen)";
		return false;
	}
	proactor_ = pn_proactor();
	OpenListeners();
	pn_proactor_set_timeout(proactor_, kTickMs);
	{
		std::lock_guard<std::mutex> g(control_mu_);
		accepting_control_ = true;
	}
	return true;
}

size_t
Server::MaxRequestSize() const {
	// $cbs and $management requests: schedule-message carries several messages of up to
	// --max-message-size each.
	const uint64_t floor = 4u << 20;
	uint64_t m = opts_.max_message_size > (UINT64_MAX / 4) ? UINT64_MAX : opts_.max_message_size * 4;
	m = std::max(m, floor);
	return m > SIZE_MAX ? SIZE_MAX : static_cast<size_t>(m);
}

void
Server::OpenListeners() {
	for (auto &li : listeners_) {
		// A listener still closing (no PN_LISTENER_CLOSE yet) is reopened when that event comes.
		if (li.listener)
			continue;
		li.listener = pn_listener();
		pn_listener_set_context(li.listener, &li);
		std::string addr = li.bound.empty() ? li.addr : li.bound;
		pn_proactor_listen(proactor_, li.listener, addr.c_str(), 128);
	}
}

void
Server::Run() {
	while (!stop_.load()) {
		pn_event_batch_t *batch = pn_proactor_wait(proactor_);
		pn_event_t *e;
		while ((e = pn_event_batch_next(batch))) {
			try {
				HandleEvent(e);
			} catch (const std::exception &ex) {
				LOG_ERROR("internal error handling %s: %s", pn_event_type_name(pn_event_type(e)), ex.what());
				pn_connection_t *pc = pn_event_connection(e);
				if (pc) {
					pn_condition_set_name(pn_connection_condition(pc), "amqp:internal-error");
					pn_condition_set_description(pn_connection_condition(pc), ex.what());
					pn_connection_close(pc);
				}
			}
		}
		pn_proactor_done(proactor_, batch);
	}
	// Control requests that came too late to run are answered rather than left waiting.
	std::deque<std::shared_ptr<ControlRequest>> left;
	{
		std::lock_guard<std::mutex> g(control_mu_);
		accepting_control_ = false;
		left.swap(control_queue_);
	}
	for (auto &r : left)
		r->result.set_value({false, "{\"error\":\"sbemu is stopping\"}"});
}

void
Server::Stop() {
	stop_.store(true);
	if (proactor_)
		pn_proactor_interrupt(proactor_);
}

bool
Server::TryRunOnLoop(std::function<std::string()> fn, std::string *out) {
	auto req = std::make_shared<ControlRequest>();
	req->fn = std::move(fn);
	std::future<std::pair<bool, std::string>> fut = req->result.get_future();
	{
		std::lock_guard<std::mutex> g(control_mu_);
		if (!accepting_control_ || !proactor_) {
			*out = "{\"error\":\"sbemu is not running (starting or stopping)\"}";
			return false;
		}
		control_queue_.push_back(req);
		pn_proactor_interrupt(proactor_);
	}
	auto r = fut.get();
	*out = std::move(r.second);
	return r.first;
}

std::string
Server::RunOnLoop(std::function<std::string()> fn) {
	std::string out;
	TryRunOnLoop(std::move(fn), &out);
	return out;
}

void
Server::RunControlQueue() {
	std::deque<std::shared_ptr<ControlRequest>> q;
	{
		std::lock_guard<std::mutex> g(control_mu_);
		q.swap(control_queue_);
	}
	for (auto &r : q) {
		try {
			r->result.set_value({true, r->fn()});
		} catch (const std::exception &e) {
			r->result.set_value({true, std::string("{\"error\":\"") + JsonEscape(e.what()) + "\"}"});
		}
	}
}

void
Server::HandleEvent(pn_event_t *e) {
	pn_event_type_t type = pn_event_type(e);
	switch (type) {
	case PN_LISTENER_OPEN: {
		auto *li = static_cast<ListenerInfo *>(pn_listener_get_context(pn_event_listener(e)));
		char host[256], port[32];
		pn_netaddr_host_port(pn_listener_addr(pn_event_listener(e)), host, sizeof host, port, sizeof port);
		if (li->bound.empty()) {
			std::string h = li->addr.substr(0, li->addr.rfind(':'));
			li->bound = h + ":" + port;
		}
		li->open = true;
		bool all = std::all_of(listeners_.begin(), listeners_.end(), [](const ListenerInfo &l) { return l.open; });
		if (all && !ready_sent_) {
			ready_sent_ = true;
			std::vector<std::string> addrs;
			for (auto &l : listeners_)
				addrs.push_back(std::string(l.tls ? "amqps://" : "amqp://") + l.bound);
			if (on_ready_)
				on_ready_(addrs);
		} else if (all) {
			LOG_INFO("listeners open again");
		}
		break;
	}
	case PN_LISTENER_CLOSE: {
		pn_listener_t *l = pn_event_listener(e);
		auto *li = static_cast<ListenerInfo *>(pn_listener_get_context(l));
		pn_condition_t *cond = pn_listener_condition(l);
		if (pn_condition_is_set(cond)) {
			LOG_ERROR("listener %s: %s: %s", li ? li->addr.c_str() : "?", pn_condition_get_name(cond),
			          pn_condition_get_description(cond));
			if (!ready_sent_) {
				std::fprintf(stderr, "sbemu: cannot listen on %s: %s\n", li ? li->addr.c_str() : "?",
				             pn_condition_get_description(cond));
				std::exit(2);
			}
		}
		if (li) {
			bool ours = li->closing;
			li->listener = nullptr;
			li->open = false;
			li->closing = false;
			// Closed for refuse-connections, and the refusal ended before this event came.
			if (ours && !faults_.refuse_until_ms && !stop_.load())
				OpenListeners();
		}
		break;
	}
	case PN_LISTENER_ACCEPT: {
		pn_listener_t *l = pn_event_listener(e);
		auto *li = static_cast<ListenerInfo *>(pn_listener_get_context(l));
		auto *c = new Conn;
		c->srv = this;
		c->id = next_conn_id_++;
		c->tls = li->tls;
		c->opened_ms = NowMs();
		pn_transport_t *t = pn_transport();
		pn_transport_set_server(t);
		pn_transport_require_auth(t, false);
		pn_sasl_t *sasl = pn_sasl(t);
		pn_sasl_set_allow_insecure_mechs(sasl, true);
		pnx_sasl_set_implementation(t, &kSaslImpl, c);
		if (li->tls)
			pn_ssl_init(pn_ssl(t), ssl_domain_, nullptr);
		pn_connection_t *pc = pn_connection();
		c->pc = pc;
		pn_connection_set_context(pc, c);
		pn_connection_set_container(pc, opts_.container_id.c_str());
		conns_[c->id] = c;
		++total_connections_;
		pn_listener_accept2(l, pc, t);
		break;
	}
	case PN_PROACTOR_TIMEOUT:
		OnTick();
		if (!stop_.load())
			pn_proactor_set_timeout(proactor_, kTickMs);
		break;
	case PN_PROACTOR_INTERRUPT:
		RunControlQueue();
		break;
	case PN_CONNECTION_BOUND: {
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (c) {
			char buf[128];
			const pn_netaddr_t *ra = pn_transport_remote_addr(pn_event_transport(e));
			if (ra && pn_netaddr_str(ra, buf, sizeof buf) >= 0)
				c->remote = buf;
			LOG_DEBUG("connection %llu from %s%s", (unsigned long long)c->id, c->remote.c_str(),
			          c->tls ? " (TLS)" : "");
		}
		break;
	}
	case PN_CONNECTION_REMOTE_OPEN:
		pn_connection_open(pn_event_connection(e));
		break;
	case PN_CONNECTION_REMOTE_CLOSE:
		pn_connection_close(pn_event_connection(e));
		break;
	case PN_CONNECTION_WAKE: {
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (!c)
			break;
		c->wake_pending = false;
		std::vector<std::function<void(Conn &)>> tasks;
		tasks.swap(c->tasks);
		for (auto &t : tasks)
			t(*c);
		if (c->closed)
			break;
		int64_t n = NowMs();
		std::vector<LinkCtx *> ls;
		for (auto &kv : c->links)
			ls.push_back(kv.second.get());
		for (LinkCtx *l : ls) {
			while (!l->delayed.empty() && l->delayed.front().due <= n) {
				pn_delivery_t *d = l->delayed.front().d;
				l->delayed.pop_front();
				ApplyDisposition(*c, *l, d);
			}
			if (l->pump_pending) {
				l->pump_pending = false;
				Pump(*c, *l);
			}
		}
		break;
	}
	case PN_SESSION_REMOTE_OPEN:
		pn_session_open(pn_event_session(e));
		break;
	case PN_SESSION_REMOTE_CLOSE:
		pn_session_close(pn_event_session(e));
		break;
	case PN_LINK_REMOTE_OPEN: {
		pn_link_t *l = pn_event_link(e);
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (!c)
			break;
		auto lc = std::make_unique<LinkCtx>();
		lc->srv = this;
		lc->conn = c;
		lc->link = l;
		lc->id = next_link_id_++;
		LinkCtx *raw = lc.get();
		pn_link_set_context(l, raw);
		c->links[raw->id] = std::move(lc);
		OnLinkOpen(*c, *raw);
		break;
	}
	case PN_LINK_REMOTE_CLOSE:
	case PN_LINK_REMOTE_DETACH: {
		pn_link_t *l = pn_event_link(e);
		LinkCtx *lc = static_cast<LinkCtx *>(pn_link_get_context(l));
		if (lc) {
			lc->closing = true;
			// A session receiver still waiting for a session stops waiting.
			lc->pending_session = false;
			pending_sessions_.erase(std::remove(pending_sessions_.begin(), pending_sessions_.end(), lc),
			                        pending_sessions_.end());
			if (lc->registered) {
				lc->registered = false;
				broker_.RemoveConsumer(*lc->entity, lc, NowMs());
			}
			lc->delayed.clear();
		}
		pn_state_t st = pn_link_state(l);
		if (!(st & PN_LOCAL_CLOSED)) {
			if (st & PN_LOCAL_UNINIT)
				pn_link_open(l); // an attach not yet answered (waiting for a session): answer it, then detach
			if (type == PN_LINK_REMOTE_CLOSE)
				pn_link_close(l);
			else
				pn_link_detach(l);
		}
		break;
	}
	case PN_LINK_FLOW: {
		pn_link_t *l = pn_event_link(e);
		LinkCtx *lc = static_cast<LinkCtx *>(pn_link_get_context(l));
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (!lc || !c)
			break;
		if (lc->role == Role::Receiver)
			Pump(*c, *lc);
		else if (lc->role == Role::CbsOut || lc->role == Role::MgmtOut)
			FlushReplies(*lc);
		break;
	}
	case PN_LINK_FINAL: {
		pn_link_t *l = pn_event_link(e);
		LinkCtx *lc = static_cast<LinkCtx *>(pn_link_get_context(l));
		if (lc && lc->conn) {
			pn_link_set_context(l, nullptr);
			if (lc->registered)
				broker_.RemoveConsumer(*lc->entity, lc, NowMs());
			pending_sessions_.erase(std::remove(pending_sessions_.begin(), pending_sessions_.end(), lc),
			                        pending_sessions_.end());
			lc->conn->links.erase(lc->id);
		}
		break;
	}
	case PN_DELIVERY: {
		pn_delivery_t *d = pn_event_delivery(e);
		pn_link_t *l = pn_delivery_link(d);
		LinkCtx *lc = static_cast<LinkCtx *>(pn_link_get_context(l));
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (!lc || !c)
			break;
		if (pn_link_is_receiver(l))
			OnIncoming(*c, *lc, d);
		else
			OnOutgoingUpdate(*c, *lc, d);
		break;
	}
	case PN_TRANSPORT_ERROR: {
		pn_condition_t *cond = pn_transport_condition(pn_event_transport(e));
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (pn_condition_is_set(cond)) {
			const char *name = pn_condition_get_name(cond);
			if (name && std::strcmp(name, "amqp:unauthorized-access") == 0)
				++sasl_failures_;
			LOG_DEBUG("connection %llu transport error %s: %s", c ? (unsigned long long)c->id : 0ULL, name,
			          pn_condition_get_description(cond));
		}
		break;
	}
	case PN_TRANSPORT_CLOSED: {
		Conn *c = static_cast<Conn *>(pn_connection_get_context(pn_event_connection(e)));
		if (c)
			ReleaseConnection(*c);
		break;
	}
	default:
		break;
	}
}

void
Server::ReleaseConnection(Conn &c) {
	int64_t n = NowMs();
	// First make the connection unreachable: releasing a consumer can make a session available,
	// and TryPendingSessions must then neither pick this connection's waiting links nor post work
	// to it.
	c.closed = true;
	for (auto &kv : c.links) {
		LinkCtx &l = *kv.second;
		l.pending_session = false;
		l.closing = true;
		pending_sessions_.erase(std::remove(pending_sessions_.begin(), pending_sessions_.end(), &l),
		                        pending_sessions_.end());
	}
	for (auto &kv : c.links) {
		LinkCtx &l = *kv.second;
		if (l.registered) {
			l.registered = false;
			broker_.RemoveConsumer(*l.entity, &l, n);
		}
		if (l.link)
			pn_link_set_context(l.link, nullptr);
	}
	for (Entity *e : c.lock_entities)
		broker_.ReleaseOwner(*e, &c, n);
	LOG_DEBUG("connection %llu closed", (unsigned long long)c.id);
	c.tasks.clear();
	conns_.erase(c.id);
	pn_connection_set_context(c.pc, nullptr);
	delete &c;
}

bool
Server::Authorized(Conn &c, const std::string &path, unsigned right, std::string *why) {
	if (opts_.no_auth)
		return true;
	if (c.plain) {
		if ((c.plain_rights & right) == right)
			return true;
		*why = "Unauthorized access. '" + RightsText(right) + "' claim(s) are required to perform this operation.";
		return false;
	}
	int64_t n = NowMs();
	bool covered = false;
	for (auto &t : c.tokens) {
		if (t.expires_ms <= n || !ScopeCovers(t.scope, path))
			continue;
		covered = true;
		if ((t.rights & right) == right)
			return true;
	}
	if (covered)
		*why = "Unauthorized access. '" + RightsText(right) +
		       "' claim(s) are required to perform this operation. "
		       "Resource: 'sb://" +
		       broker_.namespace_name() + "/" + path + "'.";
	else
		*why = "Unauthorized access. No valid token was put on $cbs for 'sb://" + broker_.namespace_name() + "/" +
		       path + "' on this connection.";
	return false;
}

void
Server::DetachLink(LinkCtx &l, const char *cond, const std::string &desc) {
	if (!l.link)
		return;
	if (l.registered) {
		l.registered = false;
		broker_.RemoveConsumer(*l.entity, &l, NowMs());
	}
	pending_sessions_.erase(std::remove(pending_sessions_.begin(), pending_sessions_.end(), &l),
	                        pending_sessions_.end());
	l.closing = true;
	if (pn_link_state(l.link) & PN_LOCAL_CLOSED)
		return;
	pn_condition_t *cnd = pn_link_condition(l.link);
	pn_condition_set_name(cnd, cond);
	pn_condition_set_description(cnd, desc.c_str());
	if (pn_link_state(l.link) & PN_LOCAL_UNINIT)
		pn_link_open(l.link);
	pn_link_close(l.link);
}

void
Server::CloseConnection(Conn &c, const char *cond, const std::string &desc, bool abrupt) {
	pn_transport_t *t = pn_connection_transport(c.pc);
	LOG_DEBUG("connection %llu: closing (%s%s)", (unsigned long long)c.id, cond, abrupt ? ", abrupt" : "");
	if (abrupt && t) {
		pn_condition_set_name(pn_transport_condition(t), cond);
		pn_condition_set_description(pn_transport_condition(t), desc.c_str());
		pn_transport_close_tail(t);
		pn_transport_close_head(t);
		return;
	}
	pn_condition_set_name(pn_connection_condition(c.pc), cond);
	pn_condition_set_description(pn_connection_condition(c.pc), desc.c_str());
	if (pn_connection_state(c.pc) & PN_LOCAL_UNINIT)
		pn_connection_open(c.pc);
	pn_connection_close(c.pc);
}

void
Server::OnLinkOpen(Conn &c, LinkCtx &l) {
	pn_link_t *link = l.link;
	bool client_receives = pn_link_is_sender(link);
	const char *src = pn_terminus_get_address(pn_link_remote_source(link));
	const char *tgt = pn_terminus_get_address(pn_link_remote_target(link));
	l.name = pn_link_name(link);
	l.address = client_receives ? (src ? src : "") : (tgt ? tgt : "");
	l.reply_target = tgt ? tgt : "";
	auto refuse = [&](const char *cond, const std::string &desc) {
		LOG_INFO("connection %llu: attach '%s' to '%s' refused: %s: %s", (unsigned long long)c.id, l.name.c_str(),
		         l.address.c_str(), cond, desc.c_str());
		l.role = Role::Refused;
		DetachLink(l, cond, desc);
	};
	auto accept_termini = [&]() {
		pn_terminus_copy(pn_link_source(link), pn_link_remote_source(link));
		pn_terminus_copy(pn_link_target(link), pn_link_remote_target(link));
		pn_link_set_snd_settle_mode(link, pn_link_remote_snd_settle_mode(link));
		pn_link_set_rcv_settle_mode(link, pn_link_remote_rcv_settle_mode(link));
	};
	std::string addr = l.address;
	// Normalise "sb://host/x" and "/x" forms for the special nodes.
	std::string path = AudiencePath(addr);
	if (path == "$cbs") {
		l.role = client_receives ? Role::CbsOut : Role::CbsIn;
		accept_termini();
		if (client_receives)
			pn_link_set_snd_settle_mode(link, PN_SND_SETTLED);
		pn_link_open(link);
		if (!client_receives)
			pn_link_flow(link, 100);
		return;
	}
	const std::string mgmt_suffix = "/$management";
	if (path.size() > mgmt_suffix.size() &&
	    path.compare(path.size() - mgmt_suffix.size(), mgmt_suffix.size(), mgmt_suffix) == 0) {
		Entity *e = broker_.Find(path.substr(0, path.size() - mgmt_suffix.size()));
		if (!e)
			return refuse("amqp:not-found", "The messaging entity 'sb://" + broker_.namespace_name() + "/" + path +
			                                    "' could not be found.");
		std::string why;
		if (!Authorized(c, path, 0, &why))
			return refuse("amqp:unauthorized-access", why);
		l.entity = e;
		l.role = client_receives ? Role::MgmtOut : Role::MgmtIn;
		accept_termini();
		if (client_receives)
			pn_link_set_snd_settle_mode(link, PN_SND_SETTLED);
		pn_link_open(link);
		if (!client_receives)
			pn_link_flow(link, 100);
		return;
	}
	if (path.empty())
		return refuse("amqp:not-implemented", "Links without an address (anonymous relay) are not supported.");
	Entity *e = broker_.Find(path);
	if (!e)
		return refuse("amqp:not-found",
		              "The messaging entity 'sb://" + broker_.namespace_name() + "/" + path + "' could not be found.");
	if (faults_.server_busy_attaches > 0) {
		--faults_.server_busy_attaches;
		return refuse("com.microsoft:server-busy",
		              "The request was terminated because the entity is being throttled (fault injected by sbemu).");
	}
	std::string why;
	if (client_receives) {
		if (!e->CanReceive())
			return refuse("amqp:not-allowed", "Cannot receive from topic '" + e->name +
			                                      "': receive from one of its subscriptions (" + e->name +
			                                      "/Subscriptions/<name>).");
		if (!Authorized(c, e->key, kListen, &why))
			return refuse("amqp:unauthorized-access", why);
		l.entity = e;
		l.role = Role::Receiver;
		l.peek_lock = pn_link_remote_snd_settle_mode(link) != PN_SND_SETTLED;
		// Session filter.
		bool has_filter = false, any = false;
		std::string sid;
		pn_data_t *f = pn_terminus_filter(pn_link_remote_source(link));
		amqp::Value fv;
		if (DataToValue(f, &fv) && fv.kind == amqp::Value::Kind::Map) {
			const amqp::Value *sv = fv.Get("com.microsoft:session-filter");
			if (sv) {
				has_filter = true;
				const amqp::Value *inner = sv->kind == amqp::Value::Kind::Described && sv->items.size() == 2
				                               ? &sv->items[1]
				                               : sv;
				if (inner->IsNull())
					any = true;
				else
					sid = inner->ToText();
			}
		}
		if (e->SessionsEnabled()) {
			if (!has_filter)
				return refuse("amqp:not-allowed",
				              "It is not possible for an entity that requires sessions to create a non-sessionful "
				              "message receiver. Entity: " +
				                  e->name);
			int64_t timeout = opts_.session_wait_ms;
			amqp::Value props;
			if (DataToValue(pn_link_remote_properties(link), &props) && props.kind == amqp::Value::Kind::Map) {
				const amqp::Value *tv = props.Get("com.microsoft:timeout");
				if (tv && tv->IsInteger())
					timeout = std::clamp<int64_t>(tv->AsInt(), 0, kMaxSessionWaitMs);
			}
			l.session_any = any;
			l.session_wanted = sid;
			std::string locked, cond;
			if (broker_.LockSession(*e, &l, sid, any, NowMs(), &locked, &cond)) {
				CompletePendingSession(l, false);
				return;
			}
			if (any && cond.empty()) {
				l.pending_session = true;
				l.session_deadline = NowMs() + timeout;
				pending_sessions_.push_back(&l);
				return; // the attach is answered when a session becomes available or the wait ends
			}
			return refuse(cond.c_str(), "The requested session '" + sid +
			                                "' cannot be accepted. It may be locked by another receiver.");
		}
		if (has_filter)
			return refuse("amqp:not-allowed", "Entity '" + e->name +
			                                      "' does not require sessions; a session "
			                                      "receiver cannot be created on it.");
		accept_termini();
		pn_link_open(link);
		broker_.AddConsumer(*e, &l);
		l.registered = true;
		return;
	}
	if (!e->CanSend())
		return refuse("amqp:not-allowed", "Cannot send to '" + e->name + "': only queues and topics accept messages.");
	if (!Authorized(c, e->key, kSend, &why))
		return refuse("amqp:unauthorized-access", why);
	l.entity = e;
	l.role = Role::Sender;
	accept_termini();
	pn_link_set_max_message_size(link, opts_.max_message_size);
	pn_link_open(link);
	pn_link_flow(link, static_cast<int>(opts_.link_credit));
}

// Finishes (or, on timeout, refuses) a session receiver's attach once its session is decided.
void
Server::CompletePendingSession(LinkCtx &l, bool timed_out) {
	pn_link_t *link = l.link;
	pending_sessions_.erase(std::remove(pending_sessions_.begin(), pending_sessions_.end(), &l),
	                        pending_sessions_.end());
	l.pending_session = false;
	if (timed_out) {
		DetachLink(l, "com.microsoft:timeout",
		           "The operation did not complete within the allocated time: no session is available on '" +
		               l.entity->name + "'.");
		return;
	}
	pn_terminus_copy(pn_link_source(link), pn_link_remote_source(link));
	pn_terminus_copy(pn_link_target(link), pn_link_remote_target(link));
	pn_link_set_snd_settle_mode(link, pn_link_remote_snd_settle_mode(link));
	pn_link_set_rcv_settle_mode(link, pn_link_remote_rcv_settle_mode(link));
	pn_data_t *lf = pn_terminus_filter(pn_link_source(link));
	pn_data_clear(lf);
	pn_data_put_map(lf);
	pn_data_enter(lf);
	pn_data_put_symbol(lf, pn_bytes(std::strlen("com.microsoft:session-filter"), "com.microsoft:session-filter"));
	pn_data_put_string(lf, pn_bytes(l.session_id.size(), l.session_id.data()));
	pn_data_exit(lf);
	SessionGroup *g = broker_.Session(*l.entity, l.session_id, false);
	int64_t until = g ? g->locked_until : NowMs();
	pn_data_t *props = pn_link_properties(link);
	pn_data_clear(props);
	pn_data_put_map(props);
	pn_data_enter(props);
	pn_data_put_symbol(props,
	                   pn_bytes(std::strlen("com.microsoft:locked-until-utc"), "com.microsoft:locked-until-utc"));
	pn_data_put_long(props, DotNetTicks(until));
	pn_data_exit(props);
	pn_link_open(link);
	broker_.AddConsumer(*l.entity, &l);
	l.registered = true;
	LOG_DEBUG("session '%s' of %s locked by link %s", l.session_id.c_str(), l.entity->name.c_str(), l.name.c_str());
	Pump(*l.conn, l);
}

void
Server::TryPendingSessions(Entity &e) {
	for (LinkCtx *l : pending_sessions_) {
		if (l->entity != &e || !l->pending_session || l->conn->closed)
			continue;
		uint64_t lid = l->id;
		l->conn->Post([this, lid](Conn &c) {
			auto it = c.links.find(lid);
			if (it == c.links.end() || !it->second->pending_session || it->second->closing)
				return;
			LinkCtx &lc = *it->second;
			std::string locked, cond;
			if (broker_.LockSession(*lc.entity, &lc, lc.session_wanted, lc.session_any, NowMs(), &locked, &cond))
				CompletePendingSession(lc, false);
		});
	}
}

void
Server::Pump(Conn &c, LinkCtx &l) {
	(void)c;
	if (l.role != Role::Receiver || !l.link)
		return;
	if (l.registered)
		broker_.Pump(l, *l.entity, NowMs());
	// A drain is answered whenever the link is attached, whether or not there was anything to send
	// (a session receiver whose session lock was lost, say). A receiver still waiting for its
	// session is answered when its attach is (CompletePendingSession pumps it).
	if ((pn_link_state(l.link) & PN_LOCAL_ACTIVE) && pn_link_get_drain(l.link) && pn_link_credit(l.link) > 0)
		pn_link_drained(l.link);
}

void
Server::OnIncoming(Conn &c, LinkCtx &l, void *dv) {
	pn_delivery_t *d = static_cast<pn_delivery_t *>(dv);
	pn_link_t *link = l.link;
	if (pn_delivery_aborted(d)) {
		l.buf.clear();
		l.too_big = false;
		pn_delivery_settle(d);
		return;
	}
	size_t limit = l.role == Role::Sender ? opts_.max_message_size : MaxRequestSize();
	char tmp[65536];
	ssize_t n;
	while ((n = pn_link_recv(link, tmp, sizeof tmp)) > 0) {
		if (l.buf.size() + static_cast<size_t>(n) > limit)
			l.too_big = true;
		if (!l.too_big)
			l.buf.append(tmp, static_cast<size_t>(n));
	}
	if (pn_delivery_partial(d))
		return;
	std::string msg;
	msg.swap(l.buf);
	bool too_big = l.too_big;
	l.too_big = false;
	auto reject = [&](const char *cond, const std::string &desc) {
		pn_condition_t *cnd = pn_disposition_condition(pn_delivery_local(d));
		pn_condition_set_name(cnd, cond);
		pn_condition_set_description(cnd, desc.c_str());
		pn_delivery_update(d, PN_REJECTED);
		pn_delivery_settle(d);
	};
	switch (l.role) {
	case Role::Sender:
		if (too_big) {
			reject("amqp:link:message-size-exceeded", "The received message exceeds the limit (" +
			                                              std::to_string(opts_.max_message_size) +
			                                              " bytes) currently allowed on the link.");
			break;
		}
		HandleEntitySend(c, l, msg, d);
		break;
	case Role::CbsIn:
	case Role::MgmtIn:
		if (too_big) {
			reject("amqp:link:message-size-exceeded", "request too large");
			break;
		}
		pn_delivery_update(d, PN_ACCEPTED);
		pn_delivery_settle(d);
		if (l.role == Role::CbsIn)
			HandleCbs(c, l, msg);
		else
			HandleManagement(c, l, msg);
		break;
	default:
		pn_delivery_settle(d);
		break;
	}
	if (!(pn_link_state(link) & PN_LOCAL_CLOSED)) {
		int credit = pn_link_credit(link);
		int window = l.role == Role::Sender ? static_cast<int>(opts_.link_credit) : 100;
		if (credit < window / 2)
			pn_link_flow(link, window - credit);
	}
}

void
Server::HandleEntitySend(Conn &c, LinkCtx &l, const std::string &msg, void *dv) {
	pn_delivery_t *d = static_cast<pn_delivery_t *>(dv);
	auto reject = [&](const char *cond, const std::string &desc) {
		LOG_INFO("connection %llu: send to %s rejected: %s: %s", (unsigned long long)c.id, l.entity->name.c_str(), cond,
		         desc.c_str());
		pn_condition_t *cnd = pn_disposition_condition(pn_delivery_local(d));
		pn_condition_set_name(cnd, cond);
		pn_condition_set_description(cnd, desc.c_str());
		pn_delivery_update(d, PN_REJECTED);
		pn_delivery_settle(d);
	};
	std::string why;
	if (!Authorized(c, l.entity->key, kSend, &why))
		return reject("amqp:unauthorized-access", why);
	if (faults_.server_busy_sends > 0 &&
	    (faults_.server_busy_entity.empty() || faults_.server_busy_entity == l.entity->key)) {
		--faults_.server_busy_sends;
		return reject("com.microsoft:server-busy",
		              "The server is busy. Please retry the operation. (sbemu fault server-busy-sends)");
	}
	std::vector<std::string_view> parts;
	if (!BatchMessages(msg, &parts)) {
		parts.clear();
		parts.push_back(msg);
	}
	std::vector<Incoming> incoming(parts.size());
	for (size_t k = 0; k < parts.size(); ++k) {
		std::string err;
		if (!ParseIncoming(parts[k], &incoming[k], &err))
			return reject("amqp:decode-error", err);
		if (l.entity->kind == Entity::Kind::Queue && l.entity->props.requires_session && incoming[k].session_id.empty())
			return reject("amqp:not-allowed",
			              "The SessionId was not set on a message, and it cannot be sent to the entity '" +
			                  l.entity->name +
			                  "'. Entities that have session support enabled can only receive "
			                  "messages that have the SessionId set to a valid value.");
	}
	int64_t n = NowMs();
	for (auto &in : incoming) {
		Broker::SendResult r = broker_.Send(*l.entity, std::move(in), n);
		if (!r.ok)
			return reject(r.condition.c_str(), r.description);
	}
	pn_delivery_update(d, PN_ACCEPTED);
	pn_delivery_settle(d);
}

void
Server::OnOutgoingUpdate(Conn &c, LinkCtx &l, void *dv) {
	pn_delivery_t *d = static_cast<pn_delivery_t *>(dv);
	if (l.role != Role::Receiver || !l.peek_lock) {
		if (pn_delivery_settled(d) || pn_delivery_remote_state(d))
			pn_delivery_settle(d);
		return;
	}
	if (!pn_delivery_updated(d) && !pn_delivery_settled(d))
		return;
	if (!pn_delivery_settled(d) && pn_delivery_remote_state(d) == PN_RECEIVED)
		return; // progress report, not an outcome
	if (pn_delivery_get_context(d))
		return; // already waiting in the delay queue
	if (faults_.delay_dispositions_ms > 0) {
		pn_delivery_set_context(d, &l);
		l.delayed.push_back({d, NowMs() + faults_.delay_dispositions_ms});
		return;
	}
	ApplyDisposition(c, l, d);
}

void
Server::ApplyDisposition(Conn &c, LinkCtx &l, void *dv) {
	(void)c;
	pn_delivery_t *d = static_cast<pn_delivery_t *>(dv);
	uint64_t st = pn_delivery_remote_state(d);
	bool remote_settled = pn_delivery_settled(d);
	if (st == PN_RECEIVED) {
		if (!remote_settled) {
			pn_delivery_set_context(d, nullptr); // not an outcome: the delivery stays unsettled
			return;
		}
		st = 0; // settled with no outcome
	}
	if (!st && !remote_settled)
		return;
	pn_delivery_tag_t tag = pn_delivery_tag(d);
	LockToken tok{};
	if (tag.size == 16)
		std::memcpy(tok.data(), tag.start, 16);
	Entity &e = *l.entity;
	int64_t n = NowMs();
	pn_disposition_t *rd = pn_delivery_remote(d);
	SettleResult r = SettleResult::LockLost;
	switch (st) {
	case PN_ACCEPTED:
		r = broker_.Complete(e, tok, n);
		break;
	case PN_REJECTED: {
		pn_condition_t *cond = pn_disposition_condition(rd);
		amqp::Value info;
		DataToValue(pn_condition_info(cond), &info);
		std::string reason, desc;
		amqp::Value props = amqp::Value::Map();
		if (info.kind == amqp::Value::Kind::Map) {
			for (size_t k = 0; k + 1 < info.items.size(); k += 2) {
				const std::string key = info.items[k].ToText();
				if (key == "DeadLetterReason")
					reason = info.items[k + 1].ToText();
				else if (key == "DeadLetterErrorDescription")
					desc = info.items[k + 1].ToText();
				else
					props.Put(amqp::Value::String(key), info.items[k + 1]);
			}
		}
		if (reason.empty() && pn_condition_get_description(cond))
			reason = pn_condition_get_description(cond);
		r = broker_.DeadLetter(e, tok, reason, desc, &props, n);
		break;
	}
	case PN_MODIFIED: {
		amqp::Value ann;
		DataToValue(pn_disposition_annotations(rd), &ann);
		if (pn_disposition_is_undeliverable(rd))
			r = broker_.Defer(e, tok, &ann, n);
		else
			r = broker_.Abandon(e, tok, &ann, n);
		break;
	}
	default: // released, or settled without an outcome
		r = broker_.Abandon(e, tok, nullptr, n);
		break;
	}
	if (!remote_settled) {
		if (r == SettleResult::Ok) {
			pn_delivery_update(d, st ? st : PN_ACCEPTED);
		} else {
			pn_condition_t *cnd = pn_disposition_condition(pn_delivery_local(d));
			if (r == SettleResult::LockLost) {
				if (e.SessionsEnabled()) {
					pn_condition_set_name(cnd, "com.microsoft:session-lock-lost");
					pn_condition_set_description(cnd, "The session lock has expired on the MessageSession.");
				} else {
					pn_condition_set_name(cnd, "com.microsoft:message-lock-lost");
					pn_condition_set_description(cnd, kLockLostDesc);
				}
			} else {
				pn_condition_set_name(cnd, "amqp:not-allowed");
				pn_condition_set_description(cnd, "Cannot dead-letter a message from a dead-letter queue.");
			}
			pn_delivery_update(d, PN_REJECTED);
		}
	}
	pn_delivery_settle(d);
}

void
Server::SendReply(Conn &c, const std::string &reply_to, std::string bytes) {
	for (auto &kv : c.links) {
		LinkCtx &l = *kv.second;
		if ((l.role == Role::CbsOut || l.role == Role::MgmtOut) &&
		    (l.reply_target == reply_to || (!reply_to.empty() && l.name == reply_to))) {
			l.outq.push_back(std::move(bytes));
			FlushReplies(l);
			return;
		}
	}
	LOG_WARN("connection %llu: no reply link for reply-to '%s'; reply dropped", (unsigned long long)c.id,
	         reply_to.c_str());
}

void
Server::FlushReplies(LinkCtx &l) {
	while (!l.outq.empty() && l.link && pn_link_credit(l.link) > 0 && !(pn_link_state(l.link) & PN_LOCAL_CLOSED)) {
		uint64_t t = ++l.tag_counter;
		pn_delivery_t *d = pn_delivery(l.link, pn_dtag(reinterpret_cast<const char *>(&t), sizeof t));
		const std::string &m = l.outq.front();
		pn_link_send(l.link, m.data(), m.size());
		pn_link_advance(l.link);
		pn_delivery_settle(d);
		l.outq.pop_front();
	}
}

void
Server::HandleCbs(Conn &c, LinkCtx &l, const std::string &msg) {
	(void)l;
	Request req;
	std::string err;
	if (!ParseRequest(msg, &req, &err)) {
		LOG_INFO("connection %llu: malformed $cbs request: %s", (unsigned long long)c.id, err.c_str());
		return;
	}
	std::string op = AppText(req.app, "operation");
	std::string type = AppText(req.app, "type");
	std::string name = AppText(req.app, "name");
	auto reply = [&](int status, const std::string &desc) {
		SendReply(c, req.reply_to, BuildReply(req, status, desc, nullptr, nullptr, false));
	};
	if (op != "put-token")
		return reply(400, "The $cbs node supports only the put-token operation.");
	if (faults_.hold_tokens > 0) {
		--faults_.hold_tokens;
		LOG_INFO("connection %llu: put-token for '%s' held, never answered (fault injected by sbemu)",
		         (unsigned long long)c.id, name.c_str());
		return;
	}
	std::string token = req.body.ToText();
	int64_t n = NowMs();
	TokenGrant g;
	if (faults_.reject_tokens > 0) {
		--faults_.reject_tokens;
		g.error = "token rejected (fault injected by sbemu)";
	} else if (type == "servicebus.windows.net:sastoken") {
		g = VerifySas(token, n, opts_.sas_keys);
	} else if (type == "jwt") {
		if (jwt_)
			g = jwt_->Verify(token, n, opts_.jwt_audiences);
		else
			g.error = "no JWT signing keys are configured (--jwt-public-key or --jwks)";
	} else {
		++put_tokens_refused_;
		return reply(400, "Unsupported token type '" + type + "'.");
	}
	std::string scope = AudiencePath(name);
	if (g.ok && !ScopeCovers(g.scope, scope)) {
		g.ok = false;
		g.error = "the token's resource does not cover '" + name + "'";
	}
	if (!g.ok) {
		++put_tokens_refused_;
		LOG_INFO("connection %llu: put-token for '%s' (%s) refused: %s", (unsigned long long)c.id, name.c_str(),
		         type.c_str(), g.error.c_str());
		return reply(401, "Unauthorized: " + g.error);
	}
	std::string entity_path = scope;
	const std::string mgmt = "/$management";
	if (entity_path.size() > mgmt.size() &&
	    entity_path.compare(entity_path.size() - mgmt.size(), mgmt.size(), mgmt) == 0)
		entity_path.resize(entity_path.size() - mgmt.size());
	Entity *e = entity_path.empty() ? nullptr : broker_.Find(entity_path);
	if (!entity_path.empty() && !e) {
		++put_tokens_refused_;
		return reply(404, "The messaging entity '" + name + "' could not be found.");
	}
	if (e)
		++e->counters.put_tokens;
	bool replaced = false;
	for (auto &t : c.tokens) {
		if (t.scope == scope) {
			t = {scope, g.expires_ms, g.rights, g.identity, type};
			replaced = true;
		}
	}
	if (!replaced)
		c.tokens.push_back({scope, g.expires_ms, g.rights, g.identity, type});
	c.ever_authorized = true;
	++put_tokens_ok_;
	LOG_DEBUG("connection %llu: token for '%s' accepted (%s, %s, expires %s)", (unsigned long long)c.id, name.c_str(),
	          g.identity.c_str(), RightsText(g.rights).c_str(), FormatTime(g.expires_ms).c_str());
	reply(202, "Accepted");
}

namespace {

std::vector<int64_t>
LongList(const amqp::Value *v) {
	std::vector<int64_t> out;
	if (!v)
		return out;
	if (v->kind == amqp::Value::Kind::Array || v->kind == amqp::Value::Kind::List) {
		for (auto &x : v->items)
			out.push_back(x.AsInt());
	} else if (v->IsInteger()) {
		out.push_back(v->AsInt());
	}
	return out;
}

std::vector<LockToken>
TokenList(const amqp::Value *v) {
	std::vector<LockToken> out;
	if (!v)
		return out;
	auto add = [&](const amqp::Value &x) {
		if ((x.kind == amqp::Value::Kind::Uuid || x.kind == amqp::Value::Kind::Binary) && x.s.size() == 16) {
			LockToken t;
			// The client sends the GUID it shows (RFC order); delivery tags are in .NET order.
			DotNetGuidSwap(reinterpret_cast<const uint8_t *>(x.s.data()), t.data());
			out.push_back(t);
		}
	};
	if (v->kind == amqp::Value::Kind::Array || v->kind == amqp::Value::Kind::List)
		for (auto &x : v->items)
			add(x);
	else
		add(*v);
	return out;
}

amqp::Value
WireToken(const LockToken &t) {
	uint8_t b[16];
	DotNetGuidSwap(t.data(), b);
	return amqp::Value::Uuid(b);
}

} // namespace

void
Server::HandleManagement(Conn &c, LinkCtx &l, const std::string &msg) {
	Request req;
	std::string err;
	if (!ParseRequest(msg, &req, &err)) {
		LOG_INFO("connection %llu: malformed $management request: %s", (unsigned long long)c.id, err.c_str());
		return;
	}
	Entity &e = *l.entity;
	std::string op = AppText(req.app, "operation");
	int64_t n = NowMs();
	auto reply = [&](int status, const std::string &desc, const char *cond, const amqp::Value *body) {
		SendReply(c, req.reply_to, BuildReply(req, status, desc, cond, body, true));
	};
	auto fail = [&](int status, const char *cond, const std::string &desc) {
		LOG_DEBUG("connection %llu: %s on %s failed: %d %s", (unsigned long long)c.id, op.c_str(), e.name.c_str(),
		          status, desc.c_str());
		reply(status, desc, cond, nullptr);
	};
	const amqp::Value &body = req.body;
	if (body.kind != amqp::Value::Kind::Map && !body.IsNull())
		return fail(400, "com.microsoft:argument-error", "The request body must be a map.");
	std::string why;
	bool needs_send = op == "com.microsoft:schedule-message" || op == "com.microsoft:cancel-scheduled-message";
	unsigned right = needs_send ? kSend : kListen;
	if (!Authorized(c, e.key + "/$management", right, &why))
		return fail(401, "amqp:unauthorized-access", why);
	auto session_owned_here = [&](const std::string &sid) -> bool {
		SessionGroup *g = broker_.Session(e, sid, false);
		if (!g || !g->owner || g->locked_until <= n)
			return false;
		auto *owner = dynamic_cast<LinkCtx *>(g->owner);
		return owner && owner->conn == &c;
	};
	if (op == "com.microsoft:renew-lock") {
		std::vector<LockToken> toks = TokenList(body.Get("lock-tokens"));
		std::vector<int64_t> exps;
		for (auto &t : toks) {
			int64_t until = broker_.RenewLock(e, t, n);
			if (!until)
				return fail(410, "com.microsoft:message-lock-lost", kLockLostDesc);
			exps.push_back(until);
		}
		amqp::Value arr = amqp::Value::Array({});
		for (int64_t x : exps)
			arr.items.push_back(amqp::Value::Timestamp(x));
		amqp::Value resp = amqp::Value::Map();
		resp.Put(amqp::Value::String("expirations"), arr);
		return reply(200, "OK", nullptr, &resp);
	}
	if (op == "com.microsoft:peek-message") {
		const amqp::Value *from = body.Get("from-sequence-number");
		const amqp::Value *count = body.Get("message-count");
		const amqp::Value *sidv = body.Get("session-id");
		std::string sid = sidv ? sidv->ToText() : std::string();
		int64_t cnt64 = count ? count->AsInt() : 1;
		if (cnt64 <= 0)
			return fail(400, "com.microsoft:argument-out-of-range", "message-count must be positive");
		int cnt = static_cast<int>(std::min<int64_t>(cnt64, 1000));
		auto msgs = broker_.Peek(e, from ? static_cast<uint64_t>(std::max<int64_t>(0, from->AsInt())) : 0,
		                         std::min(cnt, 1000), sidv && !sidv->IsNull() ? &sid : nullptr);
		if (msgs.empty()) {
			amqp::Value resp = amqp::Value::Map();
			return reply(204, "No Content", nullptr, &resp);
		}
		amqp::Value list = amqp::Value::List();
		for (auto *m : msgs) {
			std::string enc;
			broker_.EncodeDelivery(e, *m, m->state == MsgState::Locked, &enc);
			amqp::Value item = amqp::Value::Map();
			item.Put(amqp::Value::String("message"), amqp::Value::Binary(enc));
			list.items.push_back(std::move(item));
		}
		amqp::Value resp = amqp::Value::Map();
		resp.Put(amqp::Value::String("messages"), list);
		return reply(200, "OK", nullptr, &resp);
	}
	if (op == "com.microsoft:receive-by-sequence-number") {
		std::vector<int64_t> seqs = LongList(body.Get("sequence-numbers"));
		const amqp::Value *mode = body.Get("receiver-settle-mode");
		bool peek_lock = !mode || mode->AsInt() != 0;
		std::vector<StoredMessage *> got;
		int64_t missing = 0;
		if (!broker_.ReceiveDeferred(e, seqs, peek_lock, &c, n, &got, &missing))
			return fail(404, "com.microsoft:message-not-found",
			            "Failed to lock one or more specified messages. The message with sequence number " +
			                std::to_string(missing) + " was not found or is not deferred.");
		c.lock_entities.insert(&e);
		amqp::Value list = amqp::Value::List();
		std::vector<LockToken> to_complete;
		for (auto *m : got) {
			std::string enc;
			broker_.EncodeDelivery(e, *m, peek_lock, &enc);
			amqp::Value item = amqp::Value::Map();
			if (peek_lock)
				item.Put(amqp::Value::String("lock-token"), WireToken(m->lock));
			item.Put(amqp::Value::String("message"), amqp::Value::Binary(enc));
			list.items.push_back(std::move(item));
			if (!peek_lock)
				to_complete.push_back(m->lock);
		}
		for (auto &t : to_complete)
			broker_.Complete(e, t, n);
		amqp::Value resp = amqp::Value::Map();
		resp.Put(amqp::Value::String("messages"), list);
		return reply(200, "OK", nullptr, &resp);
	}
	if (op == "com.microsoft:schedule-message") {
		if (!e.CanSend())
			return fail(400, "amqp:not-allowed", "Messages can be scheduled only on queues and topics.");
		const amqp::Value *msgs = body.Get("messages");
		if (!msgs || (msgs->kind != amqp::Value::Kind::List && msgs->kind != amqp::Value::Kind::Array))
			return fail(400, "com.microsoft:argument-error", "schedule-message needs a 'messages' list");
		std::vector<Incoming> incoming;
		for (auto &item : msgs->items) {
			const amqp::Value *bin = item.Get("message");
			if (!bin || bin->kind != amqp::Value::Kind::Binary)
				return fail(400, "com.microsoft:argument-error", "each scheduled message needs a 'message' binary");
			Incoming in;
			if (!ParseIncoming(bin->s, &in, &err))
				return fail(400, "com.microsoft:argument-error", err);
			if (e.kind == Entity::Kind::Queue && e.props.requires_session && in.session_id.empty())
				return fail(400, "com.microsoft:argument-error",
				            "The SessionId was not set on a message, and it cannot be sent to the entity.");
			if (!in.scheduled_ms)
				in.scheduled_ms = n;
			incoming.push_back(std::move(in));
		}
		amqp::Value arr = amqp::Value::Array({});
		for (auto &in : incoming) {
			Broker::SendResult r = broker_.Send(e, std::move(in), n);
			if (!r.ok)
				return fail(400, "amqp:not-allowed", r.description);
			arr.items.push_back(amqp::Value::Long(static_cast<int64_t>(r.seq)));
		}
		amqp::Value resp = amqp::Value::Map();
		resp.Put(amqp::Value::String("sequence-numbers"), arr);
		return reply(200, "OK", nullptr, &resp);
	}
	if (op == "com.microsoft:cancel-scheduled-message") {
		int64_t missing = 0;
		if (!broker_.CancelScheduled(e, LongList(body.Get("sequence-numbers")), &missing))
			return fail(404, "com.microsoft:message-not-found",
			            "The scheduled message with sequence number " + std::to_string(missing) + " was not found.");
		return reply(200, "OK", nullptr, nullptr);
	}
	if (op == "com.microsoft:update-disposition") {
		std::string status = ToLower(body.Get("disposition-status") ? body.Get("disposition-status")->ToText() : "");
		std::vector<LockToken> toks = TokenList(body.Get("lock-tokens"));
		const amqp::Value *props = body.Get("properties-to-modify");
		std::string reason = body.Get("deadletter-reason") ? body.Get("deadletter-reason")->ToText() : "";
		std::string desc = body.Get("deadletter-description") ? body.Get("deadletter-description")->ToText() : "";
		for (auto &t : toks) {
			SettleResult r;
			if (status == "completed")
				r = broker_.Complete(e, t, n);
			else if (status == "abandoned")
				r = broker_.Abandon(e, t, props, n);
			else if (status == "defered" || status == "deferred")
				r = broker_.Defer(e, t, props, n);
			else if (status == "suspended")
				r = broker_.DeadLetter(e, t, reason, desc, props, n);
			else
				return fail(400, "com.microsoft:argument-error", "unknown disposition-status '" + status + "'");
			if (r == SettleResult::LockLost)
				return fail(410, "com.microsoft:message-lock-lost", kLockLostDesc);
			if (r == SettleResult::NotAllowed)
				return fail(400, "amqp:not-allowed", "Cannot dead-letter a message from a dead-letter queue.");
		}
		return reply(200, "OK", nullptr, nullptr);
	}
	if (op == "com.microsoft:renew-session-lock" || op == "com.microsoft:get-session-state" ||
	    op == "com.microsoft:set-session-state") {
		if (!e.SessionsEnabled())
			return fail(400, "amqp:not-allowed", "Entity '" + e.name + "' does not require sessions.");
		const amqp::Value *sidv = body.Get("session-id");
		std::string sid = sidv ? sidv->ToText() : std::string();
		if (!session_owned_here(sid))
			return fail(410, "com.microsoft:session-lock-lost",
			            "The session lock has expired on the MessageSession, or this connection does not hold it.");
		SessionGroup *g = broker_.Session(e, sid, false);
		amqp::Value resp = amqp::Value::Map();
		if (op == "com.microsoft:renew-session-lock") {
			int64_t until = broker_.RenewSessionLock(e, sid, &c, n);
			if (!until)
				return fail(410, "com.microsoft:session-lock-lost", "The session lock has expired.");
			resp.Put(amqp::Value::String("expiration"), amqp::Value::Timestamp(until));
		} else if (op == "com.microsoft:get-session-state") {
			resp.Put(amqp::Value::String("session-state"),
			         g->has_state ? amqp::Value::Binary(g->state) : amqp::Value::Null());
		} else {
			const amqp::Value *sv = body.Get("session-state");
			if (!sv || sv->IsNull()) {
				g->has_state = false;
				g->state.clear();
			} else {
				g->has_state = true;
				g->state = sv->s;
			}
		}
		return reply(200, "OK", nullptr, &resp);
	}
	if (op == "com.microsoft:get-message-sessions") {
		amqp::Value ids = amqp::Value::Array({});
		for (auto &kv : e.groups)
			if (kv.second.messages > 0 || kv.second.has_state)
				ids.items.push_back(amqp::Value::String(kv.first));
		amqp::Value resp = amqp::Value::Map();
		resp.Put(amqp::Value::String("skip"), amqp::Value::Int(0));
		resp.Put(amqp::Value::String("sessions-ids"), ids);
		return reply(ids.items.empty() ? 204 : 200, ids.items.empty() ? "No Content" : "OK", nullptr, &resp);
	}
	fail(501, "amqp:not-implemented", "Operation '" + op + "' is not supported by sbemu.");
}

void
Server::CheckTokens(Conn &c) {
	std::vector<LinkCtx *> ls;
	for (auto &kv : c.links)
		ls.push_back(kv.second.get());
	for (LinkCtx *l : ls) {
		if (!l->entity || l->closing)
			continue;
		std::string why, path;
		unsigned right = 0;
		switch (l->role) {
		case Role::Receiver:
			right = kListen;
			path = l->entity->key;
			break;
		case Role::Sender:
			right = kSend;
			path = l->entity->key;
			break;
		case Role::MgmtIn:
		case Role::MgmtOut:
			path = l->entity->key + "/$management";
			break;
		default:
			continue;
		}
		if (!Authorized(c, path, right, &why)) {
			LOG_INFO("connection %llu: token for %s expired; detaching link %s", (unsigned long long)c.id, path.c_str(),
			         l->name.c_str());
			DetachLink(*l, "amqp:unauthorized-access",
			           "The token has expired and was not renewed on this connection: " + why);
		}
	}
}

void
Server::OnTick() {
	int64_t n = NowMs();
	broker_.Tick(n);
	for (auto &kv : conns_) {
		Conn &c = *kv.second;
		size_t before = c.tokens.size();
		c.tokens.erase(std::remove_if(c.tokens.begin(), c.tokens.end(),
		                              [n](const Conn::Token &t) { return t.expires_ms <= n; }),
		               c.tokens.end());
		if (c.tokens.size() != before)
			c.Post([this](Conn &cc) { CheckTokens(cc); });
		if (!opts_.no_auth && !c.plain && !c.ever_authorized && !c.grace_reported &&
		    n - c.opened_ms > opts_.cbs_grace_ms) {
			c.grace_reported = true;
			LOG_INFO("connection %llu: no valid token within %s; closing", (unsigned long long)c.id,
			         FormatDuration(opts_.cbs_grace_ms).c_str());
			c.Post([this](Conn &cc) {
				CloseConnection(cc, "amqp:unauthorized-access",
				                "No valid token was put on $cbs within " + FormatDuration(opts_.cbs_grace_ms) +
				                    " of opening the connection.",
				                false);
			});
		}
		for (auto &lk : c.links)
			if (!lk.second->delayed.empty() && lk.second->delayed.front().due <= n)
				c.Wake();
	}
	for (LinkCtx *l : std::vector<LinkCtx *>(pending_sessions_)) {
		if (l->session_deadline > n)
			continue;
		uint64_t lid = l->id;
		l->session_deadline = kNever; // post once
		l->conn->Post([this, lid](Conn &c) {
			auto it = c.links.find(lid);
			if (it != c.links.end() && it->second->pending_session)
				CompletePendingSession(*it->second, true);
		});
	}
	if (faults_.refuse_until_ms && n >= faults_.refuse_until_ms)
		EndRefusal();
}

void
Server::EndRefusal() {
	faults_.refuse_until_ms = 0;
	LOG_INFO("accepting connections again");
	OpenListeners();
}

void
Server::ClearFaults() {
	faults_.server_busy_attaches = 0;
	faults_.server_busy_sends = 0;
	faults_.server_busy_entity.clear();
	faults_.reject_tokens = 0;
	faults_.hold_tokens = 0;
	faults_.delay_dispositions_ms = 0;
	faults_.omit_sequence_numbers.clear();
	if (faults_.refuse_until_ms)
		EndRefusal();
}

void
Server::DropConnections() {
	LOG_INFO("dropping %zu connections (fault)", conns_.size());
	for (auto &kv : conns_)
		kv.second->Post([this](Conn &c) {
			CloseConnection(c, "amqp:connection:forced", "connection dropped (fault injected by sbemu)", true);
		});
}

void
Server::RefuseConnections(int64_t ms) {
	ms = std::clamp<int64_t>(ms, 0, kMaxFaultMs);
	faults_.refuse_until_ms = NowMs() + ms;
	for (auto &li : listeners_) {
		if (li.listener && !li.closing) {
			li.closing = true;
			pn_listener_close(li.listener);
		}
	}
	LOG_INFO("refusing connections for %s", FormatDuration(ms).c_str());
}

std::string
Server::ConnectionsJson() {
	std::string out = "[";
	bool first = true;
	int64_t n = NowMs();
	for (auto &kv : conns_) {
		Conn &c = *kv.second;
		if (!first)
			out += ",";
		first = false;
		out += "{\"id\":" + std::to_string(c.id) + ",\"remote\":\"" + JsonEscape(c.remote) +
		       "\",\"tls\":" + (c.tls ? "true" : "false") + ",\"sasl\":\"" + JsonEscape(c.mech) + "\",\"tokens\":[";
		for (size_t k = 0; k < c.tokens.size(); ++k) {
			auto &t = c.tokens[k];
			out += std::string(k ? "," : "") + "{\"scope\":\"" + JsonEscape(t.scope) + "\",\"type\":\"" +
			       JsonEscape(t.type) + "\",\"identity\":\"" + JsonEscape(t.identity) + "\",\"rights\":\"" +
			       RightsText(t.rights) + "\",\"expires\":\"" + FormatTime(t.expires_ms) +
			       "\",\"expired\":" + (t.expires_ms <= n ? "true" : "false") + "}";
		}
		out += "],\"links\":[";
		bool lf = true;
		for (auto &lk : c.links) {
			LinkCtx &l = *lk.second;
			if (!lf)
				out += ",";
			lf = false;
			out += "{\"name\":\"" + JsonEscape(l.name) + "\",\"role\":\"" + RoleName(l.role) + "\",\"address\":\"" +
			       JsonEscape(l.address) + "\",\"credit\":" + std::to_string(l.link ? pn_link_credit(l.link) : 0) +
			       ",\"unsettled\":" + std::to_string(l.link ? pn_link_unsettled(l.link) : 0) +
			       ",\"closed\":" + (l.closing ? "true" : "false") +
			       (l.session_bound ? ",\"session\":\"" + JsonEscape(l.session_id) + "\"" : std::string()) + "}";
		}
		out += "]}";
	}
	return out + "]";
}

std::string
Server::StatsJson() {
	char buf[640];
	bool listening = std::all_of(listeners_.begin(), listeners_.end(), [](const ListenerInfo &l) { return l.open; });
	// Refusing until the window has ended and every listener is open again.
	bool refusing = faults_.refuse_until_ms != 0 || !listening;
	std::snprintf(
	    buf, sizeof buf,
	    "{\"uptime_ms\":%lld,\"connections\":%zu,\"connections_total\":%llu,\"put_tokens_accepted\":%llu,"
	    "\"put_tokens_refused\":%llu,\"sasl_failures\":%llu,\"listening\":%s,\"faults\":{\"server_busy_attaches\":%d,"
	    "\"server_busy_sends\":%d,"
	    "\"reject_tokens\":%d,\"hold_tokens\":%d,\"delay_dispositions_ms\":%lld,\"refusing_connections\":%s",
	    (long long)(NowMs() - started_ms_), conns_.size(), (unsigned long long)total_connections_,
	    (unsigned long long)put_tokens_ok_, (unsigned long long)put_tokens_refused_, (unsigned long long)sasl_failures_,
	    listening ? "true" : "false", faults_.server_busy_attaches, faults_.server_busy_sends, faults_.reject_tokens,
	    faults_.hold_tokens, (long long)faults_.delay_dispositions_ms, refusing ? "true" : "false");
	std::string out = buf;
	out += ",\"omit_sequence_numbers\":[";
	const char *sep = "";
	for (const std::string &key : faults_.omit_sequence_numbers) {
		out += sep;
		out += "\"" + JsonEscape(key) + "\"";
		sep = ",";
	}
	return out + "]}}";
}

} // namespace sbemu
