// src/pg/worker_setup.cpp
//   A worker's start: it reads its subscription, works out where and how to connect (endpoint,
//   shared access key, Entra ID token source), sets up its wait on the latch and the AMQP thread's
//   eventfd, and starts the consumer. A setting that cannot work leaves the slot failed with the
//   reason in last_error. Secrets never reach PostgreSQL memory beyond the configuration row.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include <sys/eventfd.h>
#include <unistd.h>

extern "C" {
#include "postgres.h"

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/connect.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/worker.hpp"

namespace sbpg::pg {

namespace {

std::string
Trim(std::string s) {
	while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
		s.pop_back();
	return s;
}

} // namespace

Endpoint
ParseNamespace(const std::string &ns) {
	Endpoint e;
	std::string s = ns;
	if (IStartsWith(s, "amqps://")) {
		e.tls = true;
		s = s.substr(8);
	} else if (IStartsWith(s, "amqp://")) {
		s = s.substr(7);
	} else {
		// A Service Bus namespace: TLS on 5671.
		e.host = s;
		e.port = 5671;
		e.tls = true;
		return e;
	}
	while (!s.empty() && s.back() == '/')
		s.pop_back();
	size_t colon = s.rfind(':');
	if (!s.empty() && s.front() == '[') {
		size_t close = s.find(']');
		e.host = s.substr(1, close - 1);
		colon = s.find(':', close);
	} else {
		e.host = s.substr(0, colon);
	}
	e.port = e.tls ? 5671 : 5672;
	if (colon != std::string::npos)
		e.port = std::atoi(s.c_str() + colon + 1);
	if (e.host.empty() || e.port <= 0 || e.port > 65535)
		e.error = "cannot parse namespace " + ns;
	return e;
}

// The shared access key, from the identity's literal key, file or environment variable.
bool
ResolveKey(const SubConfig &cfg, std::string *key, std::string *why) {
	if (cfg.key) {
		*key = cfg.key;
		return true;
	}
	if (cfg.key_file) {
		std::ifstream f(cfg.key_file);
		if (!f) {
			*why = std::string("cannot read key_file ") + cfg.key_file + ": " + strerror(errno);
			return false;
		}
		std::stringstream ss;
		ss << f.rdbuf();
		*key = Trim(ss.str());
		if (key->empty()) {
			*why = std::string("key_file ") + cfg.key_file + " is empty";
			return false;
		}
		return true;
	}
	if (cfg.key_env) {
		const char *v = getenv(cfg.key_env);
		if (!v || !*v) {
			*why = std::string("environment variable ") + cfg.key_env + " is not set in the server's environment";
			return false;
		}
		*key = Trim(v);
		return true;
	}
	*why = "identity has no key";
	return false;
}

std::string
Audience(const SubConfig &cfg, const Endpoint &ep, const std::string &path) {
	bool default_port = (ep.tls && ep.port == 5671) || (!ep.tls && ep.port == 5672);
	bool service_bus = !IStartsWith(cfg.namespace_, "amqp");
	return "sb://" + ep.host + (default_port && service_bus ? "" : ":" + std::to_string(ep.port)) + "/" + path;
}

// Marks the slot failed with msg (logged as a warning when log is set); returns false.
bool
Worker::Fail(const std::string &msg, bool log) {
	SetError(msg);
	SetState(kStateFailed);
	if (log)
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": " + msg);
	return false;
}

bool
Worker::Setup() {
	PgError err;
	if (!PgGuard([&] { LoadSubConfig(start_.name, &cfg_); }, &err)) {
		SetError(std::string("cannot read the subscription: ") + err.message.c_str());
		SetState(kStateFailed);
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot read its settings: " + err.message.c_str());
		return false;
	}
	cfg_.worker = start_.worker;
	if (!cfg_.found || !cfg_.enabled) {
		SetState(kStateStopped);
		return false;
	}
	ConsumerConfig cc;
	if (!ConnectionSettings(&cc))
		return false;
	efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd_ < 0) {
		SetError(std::string("eventfd: ") + strerror(errno));
		return false;
	}
	if (!Authentication(&cc) || !SetupWaiting())
		return false;
	consumer_.reset(new Consumer(cc, efd_));
	g_consumer = consumer_.get();
	RefreshSchemas(true);
	if (tokens_)
		tokens_->Start();
	consumer_->Start();
	SetState(kStateConnecting);
	Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": consuming " + cfg_.entity + " from " +
	             cfg_.namespace_ + " as " + cfg_.run_as_name + " (batch " + std::to_string(cfg_.batch_size) +
	             ", prefetch " + std::to_string(cfg_.prefetch) + ")");
	return true;
}

// Where to connect and the consumer's limits, from the subscription and the settings.
bool
Worker::ConnectionSettings(ConsumerConfig *cc) {
	Endpoint ep = ParseNamespace(cfg_.namespace_);
	if (!ep.error.empty())
		return Fail(ep.error, false);
	cc->host = ep.host;
	cc->port = ep.port;
	cc->tls = ep.tls;
	cc->entity = cfg_.entity;
	cc->audience = Audience(cfg_, ep, cfg_.entity);
	cc->prefetch = static_cast<uint32_t>(cfg_.prefetch);
	cc->container_id = std::string("sbpg-") + start_.name + "-" + NewGuid().substr(0, 8);
	cc->max_json_depth = guc_max_json_depth;
	cc->max_lock_renewal_ms = static_cast<int64_t>(cfg_.max_lock_renewal_s) * 1000;
	cc->sessions = cfg_.sessions > 0   ? ConsumerConfig::Sessions::On
	               : cfg_.sessions < 0 ? ConsumerConfig::Sessions::Off
	                                   : ConsumerConfig::Sessions::Detect;
	cc->max_sessions = cfg_.max_sessions;
	cc->session_idle_ms = cfg_.session_idle_ms;
	ca_file_ = guc_ca_file ? guc_ca_file : "";
	cc->extra_ca_file = ca_file_;
	return true;
}

// How to authenticate, from the identity's kind: Entra ID tokens, a shared access key, or none.
bool
Worker::Authentication(ConsumerConfig *cc) {
	std::string why;
	if (!SetupAuth(cfg_, ca_file_, efd_, cc, &tokens_, &why))
		return Fail(why, true);
	g_tokens = tokens_.get();
	return true;
}

// The wait: the latch, postmaster death, and the eventfd the AMQP and token threads write to.
bool
Worker::SetupWaiting() {
	PgError err;
	if (PgGuard(
	        [&] {
		        wait_set_ = compat::CreateLongLivedWaitSet(3);
		        AddWaitEventToSet(wait_set_, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
		        AddWaitEventToSet(wait_set_, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
		        AddWaitEventToSet(wait_set_, WL_SOCKET_READABLE, efd_, nullptr, nullptr);
	        },
	        &err))
		return true;
	SetError(std::string("cannot set up waiting: ") + err.message.c_str());
	return false;
}

bool
SetupAuth(const SubConfig &cfg, const std::string &ca_file, int efd, ConsumerConfig *cc,
          std::unique_ptr<TokenSource> *tokens, std::string *why) {
	std::string kind = cfg.identity_kind ? cfg.identity_kind : "anonymous";
	if (kind == "managed_identity" || kind == "workload_identity" || kind == "client_secret" || kind == "default") {
		// Checked when the subscription or publisher was created; checked again here, where the
		// token would go.
		if (!cfg.token_destination_ok) {
			*why = std::string("identity \"") + cfg.identity +
			       "\" sends Entra ID tokens only over TLS to "
			       "Service Bus namespaces or to brokers it lists in allowed_namespaces, not to " +
			       cfg.namespace_;
			return false;
		}
		return SetupTokens(cfg, ca_file, efd, cc, tokens, why);
	}
	if (kind == "sas") {
		cc->auth = ConsumerConfig::Auth::Sas;
		cc->sas_key_name = cfg.key_name ? cfg.key_name : "";
		std::string err;
		if (!ResolveKey(cfg, &cc->sas_key, &err)) {
			*why = std::string("identity \"") + cfg.identity + "\": " + err;
			return false;
		}
		return true;
	}
	cc->auth = ConsumerConfig::Auth::Anonymous;
	cc->release_to_abandon = true; // plain AMQP brokers do not all accept `modified`
	cc->management = false;        // nor have Service Bus's $management
	return true;
}

// An Entra ID identity: a TokenSource on its own thread keeps the token fresh; the AMQP side puts
// each new one on the live connection. The token never reaches PostgreSQL memory.
bool
SetupTokens(const SubConfig &cfg, const std::string &ca_file, int efd, ConsumerConfig *cc,
            std::unique_ptr<TokenSource> *tokens, std::string *why) {
	IdentityConfig ic;
	std::string err;
	bool ok = IdentityConfigFromJson(cfg.identity_kind, cfg.identity_options ? cfg.identity_options : "{}", &ic, &err);
	if (ok) {
		if (cfg.key)
			ic.client_secret = cfg.key; // a client secret given literally
		ic.extra_ca_file = ca_file;
	}
	std::unique_ptr<TokenProvider> provider;
	if (ok) {
		provider = MakeTokenProvider(ic, ProcessEnv(), &err);
		ok = provider != nullptr;
	}
	if (!ok) {
		*why = std::string("identity \"") + cfg.identity + "\" (" + cfg.identity_kind + "): " + err;
		return false;
	}
	int fd = efd;
	tokens->reset(new TokenSource(std::move(provider), [fd] {
		uint64_t one = 1;
		ssize_t r = ::write(fd, &one, sizeof one);
		(void)r;
	}));
	TokenSource *t = tokens->get();
	cc->auth = ConsumerConfig::Auth::Jwt;
	cc->current_token = [t](BearerToken *out) {
		AccessToken a;
		if (!t->Current(&a))
			return false;
		out->jwt = std::move(a.token);
		out->obtained_ms = a.obtained_ms;
		out->expires_ms = a.expires_ms;
		out->serial = a.serial;
		return true;
	};
	cc->token_answer = [t](uint64_t serial, bool accepted, const std::string &reason) {
		if (accepted)
			t->Accepted(serial);
		else
			t->Invalidate(serial, reason);
	};
	return true;
}

} // namespace sbpg::pg
