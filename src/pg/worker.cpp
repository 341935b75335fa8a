// src/pg/worker.cpp
//   One subscription's worker. The main thread (the only one that calls PostgreSQL) waits on its
//   latch and on an eventfd the AMQP thread writes to; it takes up to batch_size messages, applies
//   them in one transaction (apply.cpp), and only after the commit is flushed hands the
//   settlements back to the AMQP thread. Broker confirmations of those settlements are stamped
//   into sbpg.inbox.settled_at with the next transaction.
//
//   This file owns C++ objects (the consumer, vectors, strings); every PostgreSQL call from it
//   goes through PgGuard, so a PostgreSQL error never longjmps across these frames.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <sys/eventfd.h>
#include <unistd.h>

extern "C" {
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/test_hooks.hpp"

namespace sbpg::pg {

namespace {

Consumer *g_consumer = nullptr; // for the exit callback
TokenSource *g_tokens = nullptr;
WorkerSlot *g_slot = nullptr;

TimestampTz
ToTimestamp(int64_t unix_ms) {
	return static_cast<TimestampTz>(unix_ms) * 1000 -
	       static_cast<TimestampTz>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * USECS_PER_SEC;
}

// Runs at process exit (also after FATAL from SIGTERM): stop the AMQP thread before exit()
// destroys static objects under it.
void
OnExit(int, Datum) {
	if (g_consumer)
		g_consumer->Stop();
	if (g_tokens)
		g_tokens->Abort();
	if (g_slot && EndedByTimeLimit()) {
		const char *why = "tenant code went on past handler_timeout_ms after its statement was cancelled, so the worker "
		                  "ended; the broker delivers the message again";
		ereport(LOG, (errmsg("sbpg: subscription \"%s\": %s", g_slot->name, why)));
		SpinLockAcquire(&g_slot->mutex);
		strlcpy(g_slot->last_error, why, sizeof g_slot->last_error);
		g_slot->last_error_at = GetCurrentTimestamp();
		SpinLockRelease(&g_slot->mutex);
	}
	if (g_slot) {
		SpinLockAcquire(&g_slot->mutex);
		g_slot->pid = 0;
		if (g_slot->state != kStateFailed && g_slot->state != kStatePaused)
			g_slot->state = kStateStopped;
		SpinLockRelease(&g_slot->mutex);
	}
}

void
SetState(int state) {
	SpinLockAcquire(&g_slot->mutex);
	g_slot->state = state;
	SpinLockRelease(&g_slot->mutex);
}

void
SetError(const std::string &msg) {
	SpinLockAcquire(&g_slot->mutex);
	CopyUtf8(g_slot->last_error, msg.c_str(), sizeof g_slot->last_error);
	g_slot->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&g_slot->mutex);
}

void
Log(int level, const std::string &text) {
	PgError err;
	PgGuard([&] { ereport(level, (errmsg_internal("%s", text.c_str()))); }, &err);
}

// Where to connect, from the subscription's namespace.
struct Endpoint {
	std::string host;
	int port = 0;
	bool tls = false;
	std::string error;
};

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

std::string
Trim(std::string s) {
	while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
		s.pop_back();
	return s;
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

// A message's inbox key, remembered until its settlement is confirmed.
struct InboxKey {
	bool has_seq = false;
	int64_t seq = 0;
	std::string message_id;
	uint64_t gen = 0; // the connection that carries the settlement
};

struct Stats {
	uint64_t received = 0, applied = 0, dead = 0, dup = 0, abandoned = 0, settle_failures = 0;
	uint64_t retries = 0, retried = 0, gave_up = 0, deferred = 0;
	std::vector<float> apply_ms, lag_ms;
};

void
Publish(Stats &st, bool batch, TimestampTz at) {
	int64 now_s = GetCurrentTimestamp() / USECS_PER_SEC;
	SpinLockAcquire(&g_slot->mutex);
	g_slot->received += st.received;
	g_slot->applied += st.applied;
	g_slot->dead_lettered += st.dead;
	g_slot->duplicates += st.dup;
	g_slot->abandoned += st.abandoned;
	g_slot->settle_failures += st.settle_failures;
	g_slot->retries += st.retries;
	g_slot->retried_messages += st.retried;
	g_slot->max_retries_exceeded += st.gave_up;
	g_slot->deferred += st.deferred;
	if (batch) {
		++g_slot->batches;
		g_slot->last_batch_at = at;
	}
	for (float v : st.apply_ms) {
		g_slot->apply_ms[g_slot->apply_next] = v;
		g_slot->apply_next = (g_slot->apply_next + 1) % kSamples;
		g_slot->apply_count = std::min<uint32>(g_slot->apply_count + 1, kSamples);
	}
	for (float v : st.lag_ms) {
		g_slot->lag_ms[g_slot->lag_next] = v;
		g_slot->lag_next = (g_slot->lag_next + 1) % kSamples;
		g_slot->lag_count = std::min<uint32>(g_slot->lag_count + 1, kSamples);
	}
	uint64 settled = st.applied + st.dead + st.dup;
	if (settled) {
		int b = static_cast<int>(now_s % kRateSeconds);
		if (g_slot->rate_second[b] != now_s) {
			g_slot->rate_second[b] = now_s;
			g_slot->rate_count[b] = 0;
		}
		g_slot->rate_count[b] += static_cast<uint32>(settled);
	}
	SpinLockRelease(&g_slot->mutex);
	st = Stats();
}

// The structured log line of one settled message.
std::string
MessageLogLine(const std::string &sub, const ApplyItem &it, uint64 xid) {
	std::string s = "sbpg: ";
	WriteOutcome(
	    sub.c_str(), it, xid, OutcomeFor::kLog,
	    [](void *line, const char *text, size_t len) { static_cast<std::string *>(line)->append(text, len); }, &s);
	return s;
}

class Worker {
  public:
	explicit Worker(const WorkerStart &start) : start_(start) {}
	// The exit callback must not reach the consumer or the token source once they are gone (the
	// loop ended by itself, e.g. when sbpg.ca_file changed). Runs before the members are destroyed.
	~Worker() {
		if (consumer_)
			consumer_->Stop();
		if (tokens_)
			tokens_->Abort();
		g_consumer = nullptr;
		g_tokens = nullptr;
	}
	// Returns the process's exit code: 0, or 1 when a test fault ended the loop.
	int Run();

  private:
	bool Setup();
	void Loop();
	void HandleEvents();
	void HandleResults();
	void ProcessBatch(std::vector<ReceivedMessage> &msgs);
	void Housekeeping();
	bool Interrupts();

	bool SetupTokens(ConsumerConfig *cc);
	void Hold(ReceivedMessage &&m, TimestampTz due);
	TimestampTz NextDue() const;
	void TakeDue(std::vector<ReceivedMessage> *msgs, size_t max);
	void FetchDue();
	void RefreshSchemas(bool force);

	WorkerStart start_;
	SubConfig cfg_{};
	std::string ca_file_;                 // sbpg.ca_file when the worker started
	std::unique_ptr<TokenSource> tokens_; // Entra ID identities; outlives the consumer
	std::unique_ptr<Consumer> consumer_;
	int efd_ = -1;
	WaitEventSet *wait_set_ = nullptr;
	Stats stats_;
	std::unordered_map<uint64_t, InboxKey> awaiting_; // delivery id -> inbox key, until confirmed
	std::vector<InboxKey> confirmed_;                  // settlements the broker confirmed
	TimestampTz last_stamp_ = 0, last_prune_ = 0;
	TimestampTz paused_until_ = 0;
	bool stop_ = false;
	int exit_code_ = 0; // nonzero: leave the loop at once and exit the process with it
	// Messages waiting for their next attempt while the worker holds their locks (renewed on the
	// AMQP thread), and deferred messages asked for by sequence number and not back yet.
	struct Held {
		ReceivedMessage msg;
		TimestampTz due;
	};
	std::vector<Held> held_;
	std::unordered_map<int64_t, TimestampTz> fetching_;
	TimestampTz last_fetch_ = 0;
	uint64_t gen_ = 0; // the connection generation last seen
	int64 schemas_stamp_ = -1;
	TimestampTz last_schema_check_ = 0;
	int64 batch_backoff_ms_ = 0; // after a batch failed as a whole
};

bool
Worker::Interrupts() {
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    CHECK_FOR_INTERRUPTS();
		    if (ConfigReloadPending) {
			    ConfigReloadPending = false;
			    ProcessConfigFile(PGC_SIGHUP);
			    if (ca_file_ != (guc_ca_file ? guc_ca_file : "")) {
				    ereport(LOG, (errmsg("sbpg: subscription \"%s\": sbpg.ca_file changed; restarting to use it",
				                         start_.name)));
				    stop_ = true; // the launcher starts the worker again
			    }
		    }
	    },
	    &err);
	if (!ok)
		Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": " + err.message);
	return ok;
}

bool
Worker::Setup() {
	PgError err;
	if (!PgGuard([&] { LoadSubConfig(start_.name, &cfg_); }, &err)) {
		SetError(std::string("cannot read the subscription: ") + err.message);
		SetState(kStateFailed);
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": cannot read its settings: " + err.message);
		return false;
	}
	if (!cfg_.found || !cfg_.enabled) {
		SetState(kStateStopped);
		return false;
	}
	ConsumerConfig cc;
	Endpoint ep = ParseNamespace(cfg_.namespace_);
	if (!ep.error.empty()) {
		SetError(ep.error);
		SetState(kStateFailed);
		return false;
	}
	cc.host = ep.host;
	cc.port = ep.port;
	cc.tls = ep.tls;
	cc.entity = cfg_.entity;
	bool default_port = (ep.tls && ep.port == 5671) || (!ep.tls && ep.port == 5672);
	bool service_bus = !IStartsWith(cfg_.namespace_, "amqp");
	cc.audience = "sb://" + ep.host + (default_port && service_bus ? "" : ":" + std::to_string(ep.port)) + "/" +
	              cfg_.entity;
	cc.prefetch = static_cast<uint32_t>(cfg_.prefetch);
	cc.container_id = std::string("sbpg-") + start_.name + "-" + NewGuid().substr(0, 8);
	cc.max_json_depth = guc_max_json_depth;
	cc.max_lock_renewal_ms = static_cast<int64_t>(cfg_.max_lock_renewal_s) * 1000;
	ca_file_ = guc_ca_file ? guc_ca_file : "";
	cc.extra_ca_file = ca_file_;
	efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd_ < 0) {
		SetError(std::string("eventfd: ") + strerror(errno));
		return false;
	}
	std::string kind = cfg_.identity_kind ? cfg_.identity_kind : "anonymous";
	if (kind == "managed_identity" || kind == "workload_identity" || kind == "client_secret" || kind == "default") {
		// Checked when the subscription was created; checked again here, where the token would go.
		if (!cfg_.token_destination_ok) {
			std::string msg = std::string("identity \"") + cfg_.identity + "\" sends Entra ID tokens only over TLS to "
			                  "Service Bus namespaces or to brokers it lists in allowed_namespaces, not to " + cfg_.namespace_;
			SetError(msg);
			SetState(kStateFailed);
			Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": " + msg);
			return false;
		}
		if (!SetupTokens(&cc))
			return false;
	} else if (kind == "sas") {
		cc.auth = ConsumerConfig::Auth::Sas;
		cc.sas_key_name = cfg_.key_name ? cfg_.key_name : "";
		std::string why;
		if (!ResolveKey(cfg_, &cc.sas_key, &why)) {
			SetError(std::string("identity \"") + cfg_.identity + "\": " + why);
			SetState(kStateFailed);
			Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": identity \"" + cfg_.identity +
			                 "\": " + why);
			return false;
		}
	} else {
		cc.auth = ConsumerConfig::Auth::Anonymous;
		cc.release_to_abandon = true; // plain AMQP brokers do not all accept `modified`
		cc.management = false;        // nor have Service Bus's $management
	}
	if (!PgGuard(
	        [&] {
		        wait_set_ = CreateWaitEventSet(TopMemoryContext, 3);
		        AddWaitEventToSet(wait_set_, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
		        AddWaitEventToSet(wait_set_, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
		        AddWaitEventToSet(wait_set_, WL_SOCKET_READABLE, efd_, nullptr, nullptr);
	        },
	        &err)) {
		SetError(std::string("cannot set up waiting: ") + err.message);
		return false;
	}
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

// An Entra ID identity: a TokenSource on its own thread keeps the token fresh; the consumer puts
// each new one on the live connection. The token never reaches PostgreSQL memory.
bool
Worker::SetupTokens(ConsumerConfig *cc) {
	IdentityConfig ic;
	std::string why;
	bool ok = IdentityConfigFromJson(cfg_.identity_kind, cfg_.identity_options ? cfg_.identity_options : "{}", &ic, &why);
	if (ok) {
		if (cfg_.key)
			ic.client_secret = cfg_.key; // a client secret given literally
		ic.extra_ca_file = ca_file_;
	}
	std::unique_ptr<TokenProvider> provider;
	if (ok) {
		provider = MakeTokenProvider(ic, ProcessEnv(), &why);
		ok = provider != nullptr;
	}
	if (!ok) {
		std::string msg = std::string("identity \"") + cfg_.identity + "\" (" + cfg_.identity_kind + "): " + why;
		SetError(msg);
		SetState(kStateFailed);
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": " + msg);
		return false;
	}
	int fd = efd_;
	tokens_.reset(new TokenSource(std::move(provider), [fd] {
		uint64_t one = 1;
		ssize_t r = ::write(fd, &one, sizeof one);
		(void)r;
	}));
	g_tokens = tokens_.get();
	TokenSource *t = tokens_.get();
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
	cc->token_answer = [t](uint64_t serial, bool accepted, const std::string &why) {
		if (accepted)
			t->Accepted(serial);
		else
			t->Invalidate(serial, why);
	};
	return true;
}

void
Worker::HandleEvents() {
	if (tokens_) {
		for (auto &l : tokens_->TakeLog())
			Log(l.routine ? DEBUG1 : LOG,
			    std::string("sbpg: {\"event\":\"token\",\"subscription\":\"") + JsonEscape(start_.name) +
			        "\",\"identity\":\"" + JsonEscape(cfg_.identity) + "\",\"detail\":\"" + JsonEscape(l.text) + "\"}");
	}
	std::vector<ConsumerEvent> events;
	consumer_->TakeEvents(&events);
	for (auto &e : events) {
		int level = LOG;
		std::string line = std::string("sbpg: {\"event\":\"connection\",\"subscription\":\"") + JsonEscape(start_.name) +
		                   "\",\"state\":\"";
		switch (e.kind) {
		case ConsumerEvent::Kind::Connected:
			line += "connected";
			SetState(kStateConnected);
			break;
		case ConsumerEvent::Kind::Disconnected:
			line += "disconnected";
			SetState(kStateReconnecting);
			SetError(e.text);
			break;
		case ConsumerEvent::Kind::TokenRenewed:
			line += "token_renewed";
			level = DEBUG1; // routine
			break;
		case ConsumerEvent::Kind::TokenRefused:
			line += "token_refused";
			SetError(e.text);
			break;
		case ConsumerEvent::Kind::Error:
			line += "error";
			SetState(kStateReconnecting);
			SetError(e.text);
			break;
		}
		line += "\",\"detail\":\"" + JsonEscape(e.text) + "\"}";
		Log(level, line);
	}
	ConsumerStatus st = consumer_->Status();
	TokenSource::Status ts;
	if (tokens_)
		ts = tokens_->GetStatus();
	std::string no_token = ts.last_error.empty() ? "" : "no token: " + ts.last_error;
	SpinLockAcquire(&g_slot->mutex);
	g_slot->connected_since = st.connected ? ToTimestamp(st.connected_since_ms) : 0;
	g_slot->token_expires_at = st.token_expires_ms ? ToTimestamp(st.token_expires_ms) : 0;
	g_slot->reconnects = st.reconnects;
	g_slot->tokens_put = st.tokens_put;
	CopyUtf8(g_slot->token_subject, ts.subject.c_str(), sizeof g_slot->token_subject);
	CopyUtf8(g_slot->token_error, ts.last_error.c_str(), sizeof g_slot->token_error);
	if (!st.connected && st.waiting_for_token && g_slot->state != kStateFailed && g_slot->state != kStatePaused) {
		g_slot->state = kStateWaitingForToken;
		if (!no_token.empty()) {
			CopyUtf8(g_slot->last_error, no_token.c_str(), sizeof g_slot->last_error);
			g_slot->last_error_at = ToTimestamp(ts.last_error_ms);
		}
	} else if (!st.connected && g_slot->state == kStateWaitingForToken) {
		g_slot->state = kStateConnecting;
	}
	SpinLockRelease(&g_slot->mutex);
	if (st.dead) {
		SetState(kStateFailed);
		stop_ = true; // the launcher restarts the worker
	}
}

void
Worker::HandleResults() {
	std::vector<SettleResult> results;
	consumer_->TakeResults(&results);
	for (auto &r : results) {
		auto it = awaiting_.find(r.delivery_id);
		if (it == awaiting_.end())
			continue;
		if (r.ok) {
			confirmed_.push_back(std::move(it->second));
		} else {
			// The broker will deliver the message again; the inbox recognises it then.
			++stats_.settle_failures;
			if (guc_log_messages != kLogNone)
				Log(LOG, std::string("sbpg: {\"event\":\"settle_failed\",\"subscription\":\"") + JsonEscape(start_.name) +
				             "\",\"detail\":\"" + JsonEscape(r.error) + "\"}");
		}
		awaiting_.erase(it);
	}
}

void
Worker::Hold(ReceivedMessage &&m, TimestampTz due) {
	held_.push_back(Held{std::move(m), due});
}

TimestampTz
Worker::NextDue() const {
	TimestampTz next = 0;
	for (auto &h : held_)
		if (!next || h.due < next)
			next = h.due;
	return next;
}

// Moves held messages that are due (oldest due first) into msgs, up to max; drops those of a
// connection that is gone (their locks went with it: the broker delivers them again).
void
Worker::TakeDue(std::vector<ReceivedMessage> *msgs, size_t max) {
	if (held_.empty())
		return;
	uint64_t gen = consumer_->Status().generation;
	TimestampTz now = GetCurrentTimestamp();
	std::stable_sort(held_.begin(), held_.end(), [](const Held &a, const Held &b) { return a.due < b.due; });
	std::vector<Held> keep;
	for (auto &h : held_) {
		if (h.msg.connection_gen != gen)
			continue;
		if (h.due <= now && msgs->size() < max)
			msgs->push_back(std::move(h.msg));
		else
			keep.push_back(std::move(h));
	}
	held_.swap(keep);
}

// Asks the broker for deferred messages whose next attempt is due.
void
Worker::FetchDue() {
	TimestampTz now = GetCurrentTimestamp();
	std::vector<Consumer::FetchFailure> failures;
	consumer_->TakeFetchFailures(&failures);
	PgError err;
	for (auto &f : failures) {
		fetching_.erase(f.sequence_number);
		if (f.not_found) {
			// Not handed over (still locked by an earlier connection, its deferral not yet in
			// effect, or gone): ask again in a minute; the row stays until retention.
			int64 seq = f.sequence_number;
			PgGuard([&] { PostponeDeferred(&cfg_, seq); }, &err);
			Log(DEBUG1, std::string("sbpg: subscription \"") + start_.name + "\": deferred message " +
			                std::to_string(seq) + " was not handed over: " + f.error + "; asking again in a minute");
		}
	}
	ConsumerStatus st = consumer_->Status();
	if (!st.management_ready || now - last_fetch_ < USECS_PER_SEC)
		return;
	last_fetch_ = now;
	int room = cfg_.prefetch - static_cast<int>(st.in_flight) - static_cast<int>(held_.size()) -
	           static_cast<int>(fetching_.size());
	if (room <= 0)
		return;
	// Never ask for what the worker holds or has asked for: the broker would refuse a locked
	// message, and the answer must not be taken for "gone".
	std::unordered_set<int64_t> mine;
	for (auto &h : held_)
		if (h.msg.has_sequence_number)
			mine.insert(h.msg.sequence_number);
	int want = std::min(room, 100) + static_cast<int>(fetching_.size() + mine.size());
	std::vector<int64> due(static_cast<size_t>(want));
	int n = 0;
	if (!PgGuard([&] { n = DueDeferred(&cfg_, due.data(), want); }, &err))
		return;
	std::vector<int64_t> ask;
	for (int i = 0; i < n && static_cast<int>(ask.size()) < room; ++i) {
		if (fetching_.count(due[i]) || mine.count(due[i]))
			continue;
		fetching_[due[i]] = now;
		ask.push_back(due[i]);
	}
	if (!ask.empty())
		consumer_->FetchDeferred(std::move(ask));
}

// Versioned schemas: compiled here (pure C++, no PostgreSQL call while C++ objects are alive in a
// guarded frame) and handed to the AMQP thread, which classifies every message with them. Checked
// every 5 s; a newly registered version applies to messages received from then on.
void
Worker::RefreshSchemas(bool force) {
	if (!cfg_.validate_schemas)
		return;
	TimestampTz now = GetCurrentTimestamp();
	if (!force && now - last_schema_check_ < 5 * USECS_PER_SEC)
		return;
	last_schema_check_ = now;
	PgError err;
	int64 stamp = 0;
	if (!PgGuard([&] { stamp = SchemasStamp(); }, &err))
		return;
	if (stamp == schemas_stamp_)
		return;
	std::vector<schema::SchemaRow> list;
	if (!PgGuard([&] { LoadSchemas(&list); }, &err)) {
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": cannot read sbpg.schemas: " + err.message);
		return;
	}
	std::vector<std::string> errors;
	std::shared_ptr<const schema::Registry> reg = schema::Registry::Build(list, &errors);
	for (auto &e : errors)
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": schema skipped: " + e);
	schema::ClassifyOptions opt;
	opt.version_property = cfg_.version_property ? cfg_.version_property : "schema_version";
	opt.unknown = cfg_.unknown_pass ? schema::UnknownPolicy::Pass : schema::UnknownPolicy::DeadLetter;
	consumer_->SetRegistry(reg, opt);
	schemas_stamp_ = stamp;
	Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": validating against " +
	             std::to_string(reg->size()) + " registered schema versions");
}

void
Worker::ProcessBatch(std::vector<ReceivedMessage> &msgs) {
	// Messages of a connection that is gone cannot be settled: leave them to the redelivery.
	uint64_t gen = consumer_->Status().generation;
	if (gen != gen_) {
		// A new connection: what the old one carried will never be answered.
		gen_ = gen;
		fetching_.clear();
		for (auto it = awaiting_.begin(); it != awaiting_.end();)
			it = it->second.gen != gen ? awaiting_.erase(it) : std::next(it);
	}
	msgs.erase(std::remove_if(msgs.begin(), msgs.end(), [gen](const ReceivedMessage &m) { return m.connection_gen != gen; }),
	           msgs.end());
	for (auto &m : msgs)
		if (m.has_sequence_number)
			fetching_.erase(m.sequence_number);
	if (msgs.empty())
		return;
	std::vector<ApplyItem> items(msgs.size());
	for (size_t i = 0; i < msgs.size(); ++i) {
		std::memset(&items[i], 0, sizeof items[i]);
		items[i].msg = &msgs[i];
	}
	std::vector<int64> seqs;
	std::vector<const char *> ids;
	for (auto &k : confirmed_) {
		if (k.has_seq)
			seqs.push_back(k.seq);
		else if (!k.message_id.empty())
			ids.push_back(k.message_id.c_str());
	}
	BatchResult res;
	PgError err;
	stats_.received += msgs.size();
	ConsumerStatus cst = consumer_->Status();
	cfg_.can_defer = cst.management_ready;
	bool ok = PgGuard(
	    [&] {
		    ApplyBatch(&cfg_, items.data(), static_cast<int>(items.size()), seqs.data(), static_cast<int>(seqs.size()),
		               ids.data(), static_cast<int>(ids.size()), &res);
	    },
	    &err);
	// Whatever happened, nothing tenant code left in the session outlives the batch.
	PgError cleanup_err;
	if (!PgGuard([] { CleanSession(); }, &cleanup_err))
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": cannot clean the session: " +
		                 cleanup_err.message);
	std::vector<Settlement> settle;
	settle.reserve(msgs.size());
	if (!ok) {
		// The server could not record anything (what committed before is recognised when the
		// messages come again): hold the batch and try again after a growing pause, locks renewed.
		batch_backoff_ms_ = std::min<int64>(30000, batch_backoff_ms_ ? batch_backoff_ms_ * 2 : 1000);
		SetError(std::string("batch failed: ") + err.message);
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": batch of " +
		                 std::to_string(msgs.size()) + " failed and will be tried again in " +
		                 std::to_string(batch_backoff_ms_) + " ms: " + err.message);
		TimestampTz due = GetCurrentTimestamp() + batch_backoff_ms_ * 1000;
		for (auto &m : msgs)
			Hold(std::move(m), due);
		paused_until_ = due;
		return;
	}
	batch_backoff_ms_ = 0;
	confirmed_.clear();
	last_stamp_ = GetCurrentTimestamp();
	if (res.handler_unusable) {
		SetError(res.handler_error.str());
		SetState(kStatePaused);
		paused_until_ = GetCurrentTimestamp() + 5 * USECS_PER_SEC;
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": " + res.handler_error.str() +
		                 "; messages are left for later");
	}
	if (testing::Fires(testing::kExitAfterCommit)) {
		// Leave the loop before any settlement; sbpg_worker_main exits once the C++ frames are gone.
		Log(LOG, std::string("sbpg: test fault ") + testing::ArmedFault() + ": exiting after commit, before settlement");
		exit_code_ = 1;
		return;
	}
	int64_t commit_ms = WallMs();
	for (size_t i = 0; i < items.size(); ++i) {
		ApplyItem &it = items[i];
		ReceivedMessage &m = msgs[i];
		Settlement s{m.delivery_id, m.connection_gen, Outcome::Complete, "", ""};
		int effective = it.status == kDuplicate ? it.recorded : it.status;
		bool held = false;
		switch (effective) {
		case kApplied:
			s.outcome = Outcome::Complete;
			break;
		case kDeadLettered:
			s.outcome = Outcome::DeadLetter;
			s.reason = it.reason.str();
			s.description = it.description.str();
			break;
		case kTransient:
		case kDelayed:
			// Deferred when the delay is long and the broker can; held otherwise. (Giving the
			// message back would only bring it straight back: on a broker without deferral, or
			// whose locks cannot be renewed, holding it is the lesser cost, and a lock that
			// lapses brings a redelivery the retry row recognises.)
			if (it.defer) {
				s.outcome = Outcome::Defer;
				++stats_.deferred;
			} else {
				held = true;
			}
			break;
		default:
			s.outcome = Outcome::Abandon;
			break;
		}
		if (it.status == kApplied)
			++stats_.applied;
		else if (it.status == kDeadLettered)
			++stats_.dead;
		else if (it.status == kDuplicate)
			++stats_.dup;
		else if (!held && s.outcome == Outcome::Abandon)
			++stats_.abandoned;
		if (it.status == kTransient && strcmp(it.reason.c_str(), "HandlerUnusable") != 0)
			++stats_.retries;
		if ((it.status == kApplied || it.status == kDeadLettered) && it.attempts > 0)
			++stats_.retried;
		if (it.gave_up)
			++stats_.gave_up;
		if (it.status == kApplied)
			stats_.apply_ms.push_back(static_cast<float>(it.apply_ms));
		if (m.enqueued_ms > 0 && (it.status == kApplied || it.status == kDeadLettered))
			stats_.lag_ms.push_back(static_cast<float>(commit_ms - m.enqueued_ms));
		if (effective == kApplied || effective == kDeadLettered)
			awaiting_[m.delivery_id] = InboxKey{m.has_sequence_number, m.sequence_number, m.message_id, m.connection_gen};
		bool failure = it.status == kDeadLettered || it.status == kTransient ||
		               (it.status == kDuplicate && it.recorded == kDeadLettered);
		if (guc_log_messages == kLogAll || (guc_log_messages == kLogFailures && failure))
			Log(LOG, MessageLogLine(start_.name, it, res.xid));
		if (held)
			Hold(std::move(m), it.next_attempt);
		else
			settle.push_back(std::move(s));
	}
	if (res.isolated)
		Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": a batch of " + std::to_string(items.size()) +
		             " was applied message by message after: " + res.batch_error.str());
	consumer_->Settle(std::move(settle));
	Publish(stats_, true, res.committed_at);
}

void
Worker::Housekeeping() {
	TimestampTz now = GetCurrentTimestamp();
	PgError err;
	// Confirmations with no batch to ride on: stamp them after a second.
	if (!confirmed_.empty() && now - last_stamp_ > USECS_PER_SEC) {
		std::vector<int64> seqs;
		std::vector<const char *> ids;
		for (auto &k : confirmed_) {
			if (k.has_seq)
				seqs.push_back(k.seq);
			else if (!k.message_id.empty())
				ids.push_back(k.message_id.c_str());
		}
		if (PgGuard([&] { StampSettled(&cfg_, seqs.data(), static_cast<int>(seqs.size()), ids.data(),
		                               static_cast<int>(ids.size())); },
		            &err))
			confirmed_.clear();
		else
			Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": cannot stamp settled_at: " + err.message);
		last_stamp_ = now;
	}
	// Retention: small batches, each its own short transaction, at most 20 a round and a round a
	// minute (or every half retention period when that is shorter), so pruning never holds locks for
	// long or competes with applying messages.
	int64 prune_every = std::min<int64>(60 * USECS_PER_SEC, std::max<int64>(USECS_PER_SEC,
	                                                                        guc_inbox_retention_s * USECS_PER_SEC / 2));
	if (guc_inbox_retention_s > 0 && now - last_prune_ > prune_every) {
		last_prune_ = now;
		int64 removed = 0, round = 0;
		for (int i = 0; i < 20; ++i) {
			if (!PgGuard([&] { round = PruneInbox(&cfg_, guc_inbox_retention_s, 1000); }, &err)) {
				Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": cannot prune sbpg.inbox: " + err.message);
				break;
			}
			removed += round;
			if (round < 1000)
				break;
			if (consumer_->Status().in_flight > held_.size())
				break; // messages are waiting: they come first
		}
		if (removed > 0)
			Log(DEBUG1, std::string("sbpg: subscription \"") + start_.name + "\": pruned " + std::to_string(removed) +
			                " inbox and retry rows");
	}
	FetchDue();
	RefreshSchemas(false);
	ConsumerStatus cst = consumer_->Status();
	SpinLockAcquire(&g_slot->mutex);
	g_slot->waiting_retry = static_cast<int32>(held_.size());
	g_slot->lock_renewals = cst.lock_renewals;
	g_slot->locks_lost = cst.locks_lost;
	SpinLockRelease(&g_slot->mutex);
	PgGuard([&] { pgstat_report_activity(STATE_IDLE, "waiting for messages"); }, &err);
}

void
Worker::Loop() {
	std::vector<ReceivedMessage> msgs;
	PgError err;
	bool more = false;
	while (!stop_) {
		long timeout = more ? 0 : 1000;
		TimestampTz now = GetCurrentTimestamp();
		if (paused_until_ > now)
			timeout = std::max<long>(1, (paused_until_ - now) / 1000);
		else if (TimestampTz due = NextDue(); due && !more)
			timeout = std::min<long>(timeout, std::max<long>(1, (due - now) / 1000 + 1));
		WaitEvent ev;
		int nev = 0;
		PgGuard([&] { nev = WaitEventSetWait(wait_set_, timeout, &ev, 1, PG_WAIT_EXTENSION); }, &err);
		(void)nev;
		PgGuard([&] { ResetLatch(MyLatch); }, &err);
		uint64_t drained;
		while (read(efd_, &drained, sizeof drained) > 0) {
		}
		if (!Interrupts())
			continue;
		HandleEvents();
		HandleResults();
		more = false;
		if (GetCurrentTimestamp() >= paused_until_) {
			msgs.clear();
			TakeDue(&msgs, static_cast<size_t>(cfg_.batch_size));
			consumer_->TakeMessages(&msgs, static_cast<size_t>(cfg_.batch_size) - msgs.size());
			if (!msgs.empty()) {
				if (consumer_->Status().in_flight >= static_cast<uint32_t>(cfg_.batch_size))
					more = true;
				ProcessBatch(msgs);
				if (exit_code_)
					break;
			}
		}
		Publish(stats_, false, 0);
		Housekeeping();
		// Background workers report their table statistics themselves: without this, autovacuum
		// never sees the inbox grow, and never analyzes or vacuums it. (Rate-limited inside.)
		PgGuard([&] { pgstat_report_stat(false); }, &err);
	}
}

int
Worker::Run() {
	if (!Setup())
		return 0;
	Loop();
	return exit_code_;
}

} // namespace

} // namespace sbpg::pg

using namespace sbpg::pg;

void
sbpg_worker_main(Datum arg) {
	WorkerStart start;
	std::memcpy(&start, MyBgworkerEntry->bgw_extra, sizeof start);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	if (start.slot < 0 || start.slot >= shared->nslots)
		ereport(ERROR, (errmsg("sbpg worker started with an invalid slot %d", start.slot)));
	g_slot = &shared->slots[start.slot];
	SpinLockAcquire(&g_slot->mutex);
	g_slot->pid = MyProcPid;
	g_slot->state = kStateStarting;
	SpinLockRelease(&g_slot->mutex);
	before_shmem_exit(OnExit, 0);
	BackgroundWorkerInitializeConnectionByOid(start.database, start.user, 0);
	in_sbpg_worker = true;
	PinSessionSettings();
	pgstat_report_appname(start.name);
	pgstat_report_activity(STATE_IDLE, "starting");

	char error[512] = "";
	int exit_code = 0;
	try {
		Worker w(start);
		exit_code = w.Run();
	} catch (const std::exception &e) {
		sbpg::CopyUtf8(error, e.what(), sizeof error);
	} catch (...) {
		strlcpy(error, "unknown C++ exception", sizeof error);
	}
	// Past this point no C++ frame is alive.
	if (error[0]) {
		SetError(error);
		SetState(kStateFailed);
		ereport(FATAL, (errmsg("sbpg: subscription \"%s\": %s", start.name, error)));
	}
	proc_exit(exit_code);
}
