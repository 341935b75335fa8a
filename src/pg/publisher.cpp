// src/pg/publisher.cpp
//   A publisher's background worker (issue 16, docs/outbox.md): it reads the rows of sbpg.outbox
//   that committed transactions queued for its publisher, hands them to the AMQP side (one group in
//   flight per entity, so the broker gets an entity's messages in the order they were read), and
//   records each verdict: sent (status, sent_at), failed for good (status, error), or back in line
//   for another try after a backoff. Each recorded row is announced with NOTIFY on the publisher's
//   channel. Sent rows older than sbpg.outbox_retention are removed.
//
//   Which rows to read. Rows are read in id order, and ids are taken when sbpg.send runs, not at
//   commit: a transaction that queued id 10 may commit after the worker already read id 11. So each
//   read takes, besides the rows past the highest id read so far, the rows whose transaction was
//   not visible to the previous complete read's snapshot (pg_visible_in_snapshot on the row's
//   top-level xid). The snapshot comes from the same statement (pg_current_snapshot). A read cut
//   short by its limit keeps the older snapshot, and rows already held in memory are skipped.
//
//   Also the SQL entry points sbpg._wake_publisher() (wake a publisher's worker at commit) and
//   sbpg._publisher_slots() (its figures for sbpg.publisher_stats).
//
//   The main thread is the only one that calls PostgreSQL, always through PgGuard; rows are copied
//   into PostgreSQL memory under the guard and into C++ objects after it.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/amqp/publisher.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <sys/eventfd.h>
#include <unistd.h>

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/wait_event.h"

PGDLLEXPORT void sbpg_publisher_main(Datum);
PGDLLEXPORT Datum sbpg_wake_publisher(PG_FUNCTION_ARGS);
PGDLLEXPORT Datum sbpg_publisher_slots(PG_FUNCTION_ARGS);
PG_FUNCTION_INFO_V1(sbpg_wake_publisher);
PG_FUNCTION_INFO_V1(sbpg_publisher_slots);
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/config.hpp"
#include "sbpg/pg/connect.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/slots.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/sql_entry.hpp"
#include "sbpg/pg/worker.hpp"

namespace sbpg::pg {

namespace {

Publisher *g_publisher = nullptr;

// ---- the statements

// The rows to read (see the file comment): past the cursor or not visible to the snapshot, not held
// in memory already ($5), not of an entity that has as many in memory as it may ($6), in id order,
// at most $4 rows and (but for the first) $7 bytes of bodies. `fetched` says how many rows the
// limit let through before the byte budget: fewer kept than fetched, or fetched = $4, means the
// read was cut short.
constexpr spi::PlanSpec kRead = {
    "read sbpg.outbox",
    "WITH s AS (SELECT CAST(pg_catalog.pg_current_snapshot() AS pg_catalog.text) AS snap) "
    "SELECT s.snap, r.* FROM s LEFT JOIN LATERAL (SELECT y.* FROM ("
    "SELECT x.*, pg_catalog.sum(x.len) OVER (ORDER BY x.id USING" OP_LT "ROWS UNBOUNDED PRECEDING) AS running, "
    "pg_catalog.count(*) OVER () AS fetched FROM ("
    "SELECT o.id, o.entity, o.message_id, o.body, o.content_type, o.correlation_id, o.session_id, o.subject, "
    "o.reply_to, CAST(o.properties AS pg_catalog.text) AS properties, "
    "CASE WHEN pg_catalog.isfinite(o.time_to_live) THEN CAST(pg_catalog.ceil(pg_catalog.date_part('epoch', "
    "o.time_to_live) OPERATOR(pg_catalog.*) 1000) AS pg_catalog.int8) END AS ttl_ms, "
    "CASE WHEN pg_catalog.isfinite(o.scheduled_at) THEN CAST(pg_catalog.date_part('epoch', o.scheduled_at) "
    "OPERATOR(pg_catalog.*) 1000 AS pg_catalog.int8) END AS scheduled_ms, "
    "CAST(pg_catalog.date_part('epoch', o.queued_at) OPERATOR(pg_catalog.*) 1000 AS pg_catalog.int8) AS queued_ms, "
    "o.traceparent, CAST(pg_catalog.octet_length(o.body) AS pg_catalog.int8) AS len "
    "FROM sbpg.outbox o WHERE o.publisher" OP_EQ "$1 AND o.status" OP_EQ "'queued' AND (o.id" OP_GT "$2 OR $3 IS NULL "
    "OR NOT pg_catalog.pg_visible_in_snapshot(o.xid, CAST($3 AS pg_catalog.pg_snapshot))) "
    "AND NOT (o.id OPERATOR(pg_catalog.=) ANY ($5)) AND NOT (o.entity OPERATOR(pg_catalog.=) ANY ($6)) "
    "ORDER BY o.id USING" OP_LT "LIMIT $4) x) y "
    "WHERE (y.running OPERATOR(pg_catalog.-) y.len)" OP_LT "$7 ORDER BY y.id USING" OP_LT ") r ON true",
    7,
    {TEXTOID, INT8OID, TEXTOID, INT4OID, INT8ARRAYOID, TEXTARRAYOID, INT8OID},
    true,
    false,
    false};

constexpr spi::PlanSpec kMarkSent = {
    "mark sbpg.outbox rows sent",
    "UPDATE sbpg.outbox o SET status = 'sent', sent_at = pg_catalog.now(), last_attempt_at = pg_catalog.now(), "
    "attempts = o.attempts OPERATOR(pg_catalog.+) 1, error = NULL "
    "WHERE o.id OPERATOR(pg_catalog.=) ANY ($1) AND o.status" OP_EQ "'queued'",
    1,
    {INT8ARRAYOID},
    true,
    false,
    false};

constexpr spi::PlanSpec kMarkFailed = {
    "mark an sbpg.outbox row failed",
    "UPDATE sbpg.outbox o SET status = 'failed', last_attempt_at = pg_catalog.now(), "
    "attempts = o.attempts OPERATOR(pg_catalog.+) 1, error = $2 "
    "WHERE o.id" OP_EQ "$1 AND o.status" OP_EQ "'queued'",
    2,
    {INT8OID, TEXTOID},
    false,
    false,
    false};

constexpr spi::PlanSpec kMarkRetry = {
    "record a failed attempt in sbpg.outbox",
    "UPDATE sbpg.outbox o SET last_attempt_at = pg_catalog.now(), attempts = o.attempts OPERATOR(pg_catalog.+) 1, "
    "error = $2 WHERE o.id OPERATOR(pg_catalog.=) ANY ($1) AND o.status" OP_EQ "'queued'",
    2,
    {INT8ARRAYOID, TEXTOID},
    true,
    false,
    false};

constexpr spi::PlanSpec kPrune = {
    "remove sent sbpg.outbox rows past sbpg.outbox_retention",
    "DELETE FROM sbpg.outbox o WHERE o.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT x.ctid FROM sbpg.outbox x "
    "WHERE x.status" OP_EQ "'sent' AND x.publisher" OP_EQ "$1 AND x.sent_at" OP_LT
    "(pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $2)) LIMIT 10000))",
    2,
    {TEXTOID, FLOAT8OID},
    true,
    false,
    false};

constexpr const char *kPublisherSql =
    "SELECT p.namespace AS namespace, p.identity AS identity, i.kind AS identity_kind, "
    "(i.options" OP_GETTEXT "'key_name') AS key_name, k.secret AS key, (i.options" OP_GETTEXT
    "'key_file') AS key_file, "
    "(i.options" OP_GETTEXT "'key_env') AS key_env, i.options::pg_catalog.text AS identity_options, "
    "p.notify_channel AS notify_channel, p.enabled AS enabled, "
    "coalesce((p.options" OP_GETTEXT "'batch_size')::integer, 100) AS batch_size, "
    "coalesce((p.options" OP_GETTEXT "'max_pending')::integer, 5000) AS max_pending, "
    "(p.namespace OPERATOR(pg_catalog.~*) '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\\.servicebus\\."
    "(windows\\.net|chinacloudapi\\.cn|usgovcloudapi\\.net|cloudapi\\.de)(:[0-9]{1,5})?/?$' "
    "OR EXISTS (SELECT FROM pg_catalog.jsonb_array_elements_text(i.options OPERATOR(pg_catalog.->) "
    "'allowed_namespaces') a "
    "WHERE pg_catalog.lower(pg_catalog.rtrim(a, '/'))" OP_EQ "pg_catalog.lower(pg_catalog.rtrim(p.namespace, '/')))) "
    "AS token_destination_ok "
    "FROM sbpg.publishers p LEFT JOIN sbpg.identities i ON i.name" OP_EQ "p.identity "
    "LEFT JOIN sbpg.identity_secrets k ON k.identity" OP_EQ "p.identity WHERE p.name" OP_EQ "$1";

// A row as read, in PostgreSQL memory (the read's context): plain data only.
struct RawRow {
	int64 id;
	char *entity, *message_id, *body, *content_type, *correlation_id, *session_id, *subject, *reply_to, *properties,
	    *traceparent;
	int body_len;
	int64 ttl_ms, scheduled_ms, queued_ms;
};

char *
Copy(const spi::SpiResult &r, uint64 row, int col, MemoryContext cxt) {
	return r.Text(row, col, cxt);
}

// The AMQP condition an error names ("... amqp:not-found: ..."), or SendFailed.
std::string
ReasonCode(const std::string &error) {
	size_t p = std::min(error.find("amqp:"), error.find("com.microsoft:"));
	if (p == std::string::npos)
		return "SendFailed";
	size_t e = error.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.", p);
	std::string code = error.substr(p, e == std::string::npos ? std::string::npos : e - p);
	while (!code.empty() && (code.back() == ':' || code.back() == '.'))
		code.pop_back();
	return code.size() <= 64 ? code : "SendFailed";
}

std::string
Str(const char *s) {
	return s ? s : "";
}

void
PublisherOnExit(int, Datum) {
	if (g_publisher)
		g_publisher->Stop();
	if (g_tokens)
		g_tokens->Abort();
	if (g_slot) {
		SpinLockAcquire(&g_slot->mutex);
		g_slot->pid = 0;
		g_slot->latch = nullptr;
		if (g_slot->state != kStateFailed)
			g_slot->state = kStateStopped;
		SpinLockRelease(&g_slot->mutex);
	}
}

class PublisherWorker {
  public:
	explicit PublisherWorker(const WorkerStart &start) : start_(start), name_(start.name + 4) {}
	~PublisherWorker() {
		if (publisher_)
			publisher_->Stop();
		g_publisher = nullptr;
		g_tokens = nullptr;
	}
	int Run();

  private:
	struct Item {
		int64_t id;
		std::string entity, message_id;
		std::string payload;
		int64_t queued_ms;
	};
	struct Entity {
		std::deque<Item> pending;
		std::vector<Item> in_flight; // the group handed to the AMQP side
		size_t answered = 0;
		std::unordered_map<int64_t, SendResult> verdicts; // of the group in flight, as they come
		int failures = 0;                                 // consecutive groups with a message to retry
		TimestampTz not_before = 0;
		TimestampTz excluded_until = 0; // its rows left memory while it backed off: not read before
	};

	bool Setup();
	bool Fail(const std::string &msg);
	bool Interrupts();
	void Read();
	void SendGroups(TimestampTz now);
	// Takes the AMQP side's verdicts: messages to retry go back in line at once; what was sent or
	// failed waits in sent_/failed_/retried_ for Record (after the next groups are on their way).
	void HandleResults();
	bool Record(std::vector<Item> &sent, std::vector<std::pair<Item, std::string>> &failed,
	            std::vector<std::pair<int64_t, std::string>> &retried);
	void Prune(TimestampTz now);
	void PublishStatus();
	void Wait(long timeout_ms);
	TimestampTz NextDue() const;

	WorkerStart start_;
	std::string name_;
	SubConfig cfg_{};
	int max_pending_ = 5000;
	std::string ca_file_;
	std::unique_ptr<TokenSource> tokens_;
	std::unique_ptr<Publisher> publisher_;
	int efd_ = -1;
	WaitEventSet *wait_set_ = nullptr;
	MemoryContext read_cxt_ = nullptr;
	std::map<std::string, Entity> entities_;
	std::unordered_map<int64_t, Entity *> by_id_; // in flight: row id -> its entity
	std::unordered_set<int64_t> held_;            // pending or in flight
	size_t held_count_ = 0;
	int64_t cursor_ = 0;   // the highest id read
	std::string snapshot_; // the last complete read's snapshot ("" before the first)
	bool read_due_ = true; // woken (a commit queued rows) or a second passed
	TimestampTz last_read_ = 0, last_prune_ = 0;
	bool stop_ = false;
	std::vector<std::string> errors_logged_;
	uint64 sent_ = 0, failed_ = 0, retries_ = 0, groups_ = 0;
	std::vector<float> accept_ms_;
	std::vector<Item> done_sent_;
	std::vector<std::pair<Item, std::string>> done_failed_;
	std::vector<std::pair<int64_t, std::string>> done_retried_;
	struct Resume {
		int64_t cursor;
		std::string snapshot;
	};
	std::map<std::string, Resume> resume_; // entities left out of the reads, and where the reads stood
	TimestampTz read_warned_ = 0, record_warned_ = 0;
	bool prune_behind_ = false; // the last pruning round removed a full chunk: another at the next turn
};

bool
PublisherWorker::Fail(const std::string &msg) {
	SetError(msg);
	SetState(kStateFailed);
	Log(WARNING, "sbpg: publisher \"" + name_ + "\": " + msg);
	return false;
}

bool
PublisherWorker::Setup() {
	PgError err;
	bool found = false, enabled = false;
	if (!PgGuard(
	        [&] {
		        spi::BeginShort();
		        Oid types[1] = {TEXTOID};
		        Datum args[1] = {CStringGetTextDatum(name_.c_str())};
		        spi::SpiResult r = spi::ExecSql("read sbpg.publishers", kPublisherSql, 1, types, args, nullptr,
		                                        SPI_OK_SELECT, 1);
		        if (r.rows == 1) {
			        found = true;
			        auto kept = [&](const char *c) { return r.Text(0, r.Col(c), TopMemoryContext); };
			        cfg_.name = MemoryContextStrdup(TopMemoryContext, name_.c_str());
			        cfg_.namespace_ = kept("namespace");
			        cfg_.identity = kept("identity");
			        cfg_.identity_kind = kept("identity_kind");
			        cfg_.key_name = kept("key_name");
			        cfg_.key = kept("key");
			        cfg_.key_file = kept("key_file");
			        cfg_.key_env = kept("key_env");
			        cfg_.identity_options = kept("identity_options");
			        cfg_.notify_channel = kept("notify_channel");
			        enabled = r.Bool(0, r.Col("enabled"));
			        cfg_.batch_size = r.Int32(0, r.Col("batch_size"), 100);
			        max_pending_ = r.Int32(0, r.Col("max_pending"), 5000);
			        cfg_.token_destination_ok = r.Bool(0, r.Col("token_destination_ok"));
		        }
		        spi::EndShort();
		        read_cxt_ = AllocSetContextCreate(TopMemoryContext, "sbpg publisher rows", ALLOCSET_DEFAULT_SIZES);
	        },
	        &err)) {
		return Fail(std::string("cannot read the publisher: ") + err.message.c_str());
	}
	if (!found || !enabled) {
		SetState(kStateStopped);
		return false;
	}
	Endpoint ep = ParseNamespace(cfg_.namespace_);
	if (!ep.error.empty())
		return Fail(ep.error);
	PublisherConfig pc;
	pc.conn.host = ep.host;
	pc.conn.port = ep.port;
	pc.conn.tls = ep.tls;
	pc.conn.audience = Audience(cfg_, ep, ""); // the namespace: one token covers every entity
	pc.conn.container_id = "sbpg-publisher-" + name_ + "-" + NewGuid().substr(0, 8);
	ca_file_ = guc_ca_file ? guc_ca_file : "";
	pc.conn.extra_ca_file = ca_file_;
	efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd_ < 0)
		return Fail(std::string("eventfd: ") + strerror(errno));
	std::string why;
	if (!SetupAuth(cfg_, ca_file_, efd_, &pc.conn, &tokens_, &why))
		return Fail(why);
	g_tokens = tokens_.get();
	if (!PgGuard(
	        [&] {
		        wait_set_ = compat::CreateLongLivedWaitSet(3);
		        AddWaitEventToSet(wait_set_, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
		        AddWaitEventToSet(wait_set_, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
		        AddWaitEventToSet(wait_set_, WL_SOCKET_READABLE, efd_, nullptr, nullptr);
	        },
	        &err))
		return Fail(std::string("cannot set up waiting: ") + err.message.c_str());
	publisher_.reset(new Publisher(pc, efd_));
	g_publisher = publisher_.get();
	if (tokens_)
		tokens_->Start();
	publisher_->Start();
	SetState(kStateConnecting);
	Log(LOG, "sbpg: publisher \"" + name_ + "\": sending to " + cfg_.namespace_ + " (groups of " +
	             std::to_string(cfg_.batch_size) + ", up to " + std::to_string(max_pending_) + " in memory)");
	return true;
}

bool
PublisherWorker::Interrupts() {
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    CHECK_FOR_INTERRUPTS();
		    if (ConfigReloadPending) {
			    ConfigReloadPending = false;
			    ProcessConfigFile(PGC_SIGHUP);
			    if (ca_file_ != (guc_ca_file ? guc_ca_file : ""))
				    stop_ = true; // the launcher starts the worker again, with the new CA file
		    }
	    },
	    &err);
	return ok;
}

// Reads the rows committed since the last read (see the file comment), into the entities' lines.
void
PublisherWorker::Read() {
	// An entity may hold a quarter of max_pending rows in memory (at least two groups) when others
	// are there too. One that has
	// that many, or that backs off after a failure while memory is full, is left out of the reads,
	// so that an entity which cannot send holds up no other. Where the reads stood when it was left
	// out is kept (resume_), and the reads go back there once it has room again and its backoff
	// is over (rows read since are skipped as held or sent).
	TimestampTz now = GetCurrentTimestamp();
	// The share matters only beside other entities: alone, an entity may fill memory (a read that
	// took more than a share, to be left out later, would be read for nothing).
	size_t cap = entities_.size() <= 1 ? static_cast<size_t>(max_pending_)
	                                   : static_cast<size_t>(std::max(2 * cfg_.batch_size, max_pending_ / 4));
	auto leave_out = [&](const std::string &entity, int64_t cursor, const std::string &snapshot) {
		auto r = resume_.find(entity);
		if (r == resume_.end())
			resume_[entity] = {cursor, snapshot};
		else
			r->second.cursor = std::min(r->second.cursor, cursor);
	};
	if (held_count_ >= static_cast<size_t>(max_pending_)) {
		// Memory is full: the rows of entities that back off leave it, to be read again later.
		for (auto &kv : entities_) {
			Entity &e = kv.second;
			if (e.not_before <= now || e.pending.empty() || !e.in_flight.empty())
				continue;
			// From before the lowest id among them: a row read late (a lower id than rows read
			// before it) sits further back in the line.
			int64_t lowest = e.pending.front().id;
			for (auto &it : e.pending)
				lowest = std::min<int64_t>(lowest, it.id);
			leave_out(kv.first, lowest - 1, snapshot_);
			e.excluded_until = e.not_before;
			for (auto &it : e.pending)
				if (held_.erase(it.id))
					--held_count_;
			e.pending.clear();
		}
		if (held_count_ >= static_cast<size_t>(max_pending_))
			return;
	}
	std::vector<std::string> saturated;
	for (auto &kv : entities_) {
		size_t inmem = kv.second.pending.size() + kv.second.in_flight.size();
		auto r = resume_.find(kv.first);
		if (inmem >= cap || kv.second.excluded_until > now) {
			saturated.push_back(kv.first);
			if (r == resume_.end())
				resume_[kv.first] = {cursor_, snapshot_};
		} else if (r != resume_.end() && inmem <= cap / 2) {
			cursor_ = std::min(cursor_, r->second.cursor);
			snapshot_ = r->second.snapshot; // older: it sees less, so more is read again
			resume_.erase(r);
		}
	}
	for (auto &kv : resume_)
		if (!entities_.count(kv.first)) { // forgotten (nothing left): read from there again
			cursor_ = std::min(cursor_, kv.second.cursor);
			snapshot_ = kv.second.snapshot;
		}
	for (auto it = resume_.begin(); it != resume_.end();)
		it = entities_.count(it->first) ? std::next(it) : resume_.erase(it);
	const std::string read_snapshot = snapshot_;
	std::vector<int64> held(held_.begin(), held_.end());
	int limit = max_pending_ - static_cast<int>(held_count_) + 1;
	constexpr int64 kByteBudget = 32 << 20; // bodies per read (a row holds at most 1 MiB)
	RawRow *rows = nullptr;
	int n = 0;
	int64 fetched = 0;
	char *snap = nullptr;
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    MemoryContextReset(read_cxt_);
		    spi::BeginShort();
		    Datum *ents = static_cast<Datum *>(palloc(sizeof(Datum) * (saturated.size() + 1)));
		    for (size_t i = 0; i < saturated.size(); ++i)
			    ents[i] = CStringGetTextDatum(saturated[i].c_str());
		    Datum args[7] = {CStringGetTextDatum(name_.c_str()),
		                     Int64GetDatum(cursor_),
		                     snapshot_.empty() ? (Datum)0 : CStringGetTextDatum(snapshot_.c_str()),
		                     Int32GetDatum(limit),
		                     PointerGetDatum(construct_array(reinterpret_cast<Datum *>(held.data()),
		                                                     static_cast<int>(held.size()), INT8OID, 8, true,
		                                                     TYPALIGN_DOUBLE)),
		                     PointerGetDatum(construct_array(ents, static_cast<int>(saturated.size()), TEXTOID, -1,
		                                                     false, TYPALIGN_INT)),
		                     Int64GetDatum(kByteBudget)};
		    char nulls[8] = {' ', ' ', snapshot_.empty() ? 'n' : ' ', ' ', ' ', ' ', ' ', '\0'};
		    spi::SpiResult r = spi::Exec(kRead, args, nulls, SPI_OK_SELECT);
		    int c_snap = r.Col("snap"), c_id = r.Col("id"), c_entity = r.Col("entity"), c_mid = r.Col("message_id"),
		        c_body = r.Col("body"), c_ct = r.Col("content_type"), c_corr = r.Col("correlation_id"),
		        c_sid = r.Col("session_id"), c_subj = r.Col("subject"), c_rt = r.Col("reply_to"),
		        c_props = r.Col("properties"), c_ttl = r.Col("ttl_ms"), c_sched = r.Col("scheduled_ms"),
		        c_q = r.Col("queued_ms"), c_tp = r.Col("traceparent"), c_fetched = r.Col("fetched");
		    rows = static_cast<RawRow *>(MemoryContextAllocZero(read_cxt_, sizeof(RawRow) * (r.rows + 1)));
		    for (uint64 i = 0; i < r.rows; ++i) {
			    if (i == 0)
				    snap = Copy(r, 0, c_snap, read_cxt_);
			    if (r.IsNull(i, c_id))
				    continue;
			    fetched = r.Int64(i, c_fetched);
			    RawRow &w = rows[n++];
			    w.id = r.Int64(i, c_id);
			    w.entity = Copy(r, i, c_entity, read_cxt_);
			    w.message_id = Copy(r, i, c_mid, read_cxt_);
			    bool isnull;
			    Datum b = r.Value(i, c_body, &isnull);
			    MemoryContext old = MemoryContextSwitchTo(read_cxt_);
			    bytea *bb = DatumGetByteaPP(b);
			    w.body_len = VARSIZE_ANY_EXHDR(bb);
			    w.body = static_cast<char *>(palloc(w.body_len + 1));
			    memcpy(w.body, VARDATA_ANY(bb), w.body_len);
			    MemoryContextSwitchTo(old);
			    w.content_type = Copy(r, i, c_ct, read_cxt_);
			    w.correlation_id = Copy(r, i, c_corr, read_cxt_);
			    w.session_id = Copy(r, i, c_sid, read_cxt_);
			    w.subject = Copy(r, i, c_subj, read_cxt_);
			    w.reply_to = Copy(r, i, c_rt, read_cxt_);
			    w.properties = Copy(r, i, c_props, read_cxt_);
			    w.traceparent = Copy(r, i, c_tp, read_cxt_);
			    w.ttl_ms = r.Int64(i, c_ttl);
			    w.scheduled_ms = r.Int64(i, c_sched);
			    w.queued_ms = r.Int64(i, c_q);
		    }
		    spi::EndShort(spi::Commit::kLazy);
	    },
	    &err);
	last_read_ = GetCurrentTimestamp();
	if (!ok) {
		if (last_read_ - read_warned_ > 60 * USECS_PER_SEC) {
			read_warned_ = last_read_;
			Log(WARNING, "sbpg: publisher \"" + name_ + "\": cannot read sbpg.outbox: " + err.message.c_str());
		}
		SetError(std::string("cannot read sbpg.outbox: ") + err.message.c_str());
		return;
	}
	read_due_ = false;
	// A complete read (nothing cut off by the limit or the byte budget) moves the snapshot on.
	if (snap && n == fetched && fetched < limit)
		snapshot_ = snap;
	std::vector<std::pair<Item, std::string>> bad;
	for (int i = 0; i < n; ++i) {
		const RawRow &w = rows[i];
		cursor_ = std::max<int64_t>(cursor_, w.id);
		if (held_.count(w.id))
			continue;
		OutgoingMessage m;
		m.message_id = Str(w.message_id);
		m.body.assign(w.body, w.body_len);
		m.content_type = Str(w.content_type);
		m.correlation_id = Str(w.correlation_id);
		m.session_id = Str(w.session_id);
		m.subject = Str(w.subject);
		m.reply_to = Str(w.reply_to);
		m.properties_json = Str(w.properties);
		m.ttl_ms = w.ttl_ms;
		m.scheduled_ms = w.scheduled_ms;
		m.traceparent = Str(w.traceparent);
		m.created_ms = w.queued_ms;
		Item it{w.id, Str(w.entity), m.message_id, "", w.queued_ms};
		std::string why;
		if (!EncodeOutgoing(m, &it.payload, &why)) {
			bad.emplace_back(std::move(it), why);
			continue;
		}
		// An entity that reaches its share in this read: the rest of its rows are read again once
		// it has room (from before the first one left out, with the snapshot this read used).
		Entity &e = entities_[it.entity];
		if (resume_.count(it.entity) || e.pending.size() + e.in_flight.size() >= cap) {
			leave_out(it.entity, it.id - 1, read_snapshot);
			continue;
		}
		held_.insert(it.id);
		++held_count_;
		e.pending.push_back(std::move(it));
	}
	if (!bad.empty()) {
		std::vector<Item> none;
		std::vector<std::pair<int64_t, std::string>> no_retry;
		Record(none, bad, no_retry);
	}
}

// A group for every entity that has none in flight and is not backing off.
void
PublisherWorker::SendGroups(TimestampTz now) {
	// Entities with nothing to send and no failure to remember are forgotten.
	for (auto it = entities_.begin(); it != entities_.end();) {
		const Entity &e = it->second;
		if (e.pending.empty() && e.in_flight.empty() && e.failures == 0)
			it = entities_.erase(it);
		else
			++it;
	}
	for (auto &kv : entities_) {
		Entity &e = kv.second;
		if (!e.in_flight.empty() || e.pending.empty() || e.not_before > now)
			continue;
		OutgoingGroup g;
		g.entity = kv.first;
		while (!e.pending.empty() && static_cast<int>(e.in_flight.size()) < cfg_.batch_size) {
			Item &it = e.pending.front();
			g.items.push_back({it.id, it.payload});
			by_id_[it.id] = &e;
			e.in_flight.push_back(std::move(it));
			e.pending.pop_front();
		}
		e.answered = 0;
		++groups_;
		publisher_->Send(std::move(g));
	}
}

void
PublisherWorker::HandleResults() {
	std::vector<SendResult> results;
	publisher_->TakeResults(&results);
	if (results.empty())
		return;
	std::vector<Item> &sent = done_sent_;
	std::vector<std::pair<Item, std::string>> &failed = done_failed_;
	std::vector<std::pair<int64_t, std::string>> &retried = done_retried_;
	std::vector<Entity *> finished;
	int64_t now_ms = WallMs();
	for (auto &r : results) {
		auto f = by_id_.find(r.id);
		if (f == by_id_.end())
			continue;
		Entity *e = f->second;
		by_id_.erase(f);
		e->verdicts[r.id] = std::move(r);
		if (++e->answered == e->in_flight.size())
			finished.push_back(e);
	}
	// A group is taken apart only once every message of it is answered: the ones to retry go back
	// to the head of their entity's line, in their order, before anything read later.
	for (Entity *e : finished) {
		std::vector<Item> again;
		bool retry = false;
		for (auto &it : e->in_flight) {
			const SendResult *r = &e->verdicts[it.id];
			switch (r->kind) {
			case SendResult::Kind::Accepted:
				accept_ms_.push_back(static_cast<float>(std::max<int64_t>(0, now_ms - it.queued_ms)));
				sent.push_back(std::move(it));
				break;
			case SendResult::Kind::Failed:
				failed.emplace_back(std::move(it), ToValidUtf8(r->error));
				break;
			case SendResult::Kind::Retry:
				retried.emplace_back(it.id, ToValidUtf8(r->error));
				again.push_back(std::move(it));
				retry = true;
				break;
			}
		}
		for (auto it = again.rbegin(); it != again.rend(); ++it)
			e->pending.push_front(std::move(*it));
		e->in_flight.clear();
		e->verdicts.clear();
		e->answered = 0;
		if (retry) {
			// Exponential backoff with full jitter: 0.5 s doubling up to 30 s.
			e->failures = std::min(e->failures + 1, 16);
			int64 cap = std::min<int64>(30000, 500LL << std::min(e->failures - 1, 6));
			e->not_before = GetCurrentTimestamp() + (static_cast<int64>(random() % (cap + 1)) + 100) * 1000;
			++retries_;
		} else {
			e->failures = 0;
			e->not_before = 0;
		}
	}
}

// Writes the verdicts in one transaction and announces each sent or failed row.
bool
PublisherWorker::Record(std::vector<Item> &sent, std::vector<std::pair<Item, std::string>> &failed,
                        std::vector<std::pair<int64_t, std::string>> &retried) {
	if (sent.empty() && failed.empty() && retried.empty())
		return true;
	// Payloads for NOTIFY, built before the guard.
	std::vector<std::string> notes;
	if (cfg_.notify_channel) {
		notes.reserve(sent.size() + failed.size());
		auto note = [&](const Item &it, const char *status, const std::string *error) {
			rapidjson::StringBuffer sb;
			rapidjson::Writer<rapidjson::StringBuffer> w(sb);
			w.StartObject();
			w.Key("publisher");
			w.String(name_.c_str());
			w.Key("id");
			w.Int64(it.id);
			w.Key("entity");
			w.String(it.entity.c_str());
			w.Key("message_id");
			w.String(it.message_id.c_str());
			w.Key("status");
			w.String(status);
			// A reason code only (the broker's condition), never the description: any role may LISTEN.
			w.Key("reason");
			if (error) {
				std::string code = ReasonCode(*error);
				w.String(code.c_str());
			} else {
				w.Null();
			}
			w.EndObject();
			notes.emplace_back(sb.GetString(), sb.GetSize());
		};
		for (auto &it : sent)
			note(it, "sent", nullptr);
		for (auto &f : failed)
			note(f.first, "failed", &f.second);
	}
	std::vector<int64> sent_ids;
	for (auto &it : sent)
		sent_ids.push_back(it.id);
	std::string retry_error = retried.empty() ? "" : retried.front().second;
	std::vector<int64> retry_ids;
	for (auto &r : retried)
		retry_ids.push_back(r.first);
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    spi::BeginShort();
		    if (!sent_ids.empty()) {
			    Datum a[1] = {PointerGetDatum(construct_array(reinterpret_cast<Datum *>(sent_ids.data()),
			                                                  static_cast<int>(sent_ids.size()), INT8OID, 8, true,
			                                                  TYPALIGN_DOUBLE))};
			    spi::Exec(kMarkSent, a, nullptr, SPI_OK_UPDATE);
		    }
		    for (auto &f : failed) {
			    Datum a[2] = {Int64GetDatum(f.first.id), CStringGetTextDatum(f.second.c_str())};
			    spi::Exec(kMarkFailed, a, nullptr, SPI_OK_UPDATE);
		    }
		    if (!retry_ids.empty()) {
			    Datum a[2] = {PointerGetDatum(construct_array(reinterpret_cast<Datum *>(retry_ids.data()),
			                                                  static_cast<int>(retry_ids.size()), INT8OID, 8, true,
			                                                  TYPALIGN_DOUBLE)),
			                  CStringGetTextDatum(retry_error.c_str())};
			    spi::Exec(kMarkRetry, a, nullptr, SPI_OK_UPDATE);
		    }
		    if (!notes.empty()) {
			    // A full NOTIFY queue would fail this transaction: past 90% the rows are recorded
			    // without notifications, as subscriptions do.
			    LOCAL_FCINFO(fcinfo, 0);
			    InitFunctionCallInfoData(*fcinfo, nullptr, 0, InvalidOid, nullptr, nullptr);
			    double usage = DatumGetFloat8(pg_notification_queue_usage(fcinfo));
			    if (usage > 0.9)
				    ereport(WARNING, (errmsg("sbpg: publisher \"%s\": the NOTIFY queue is %.0f%% full; rows are marked "
				                             "in sbpg.outbox without notifications until it drains",
				                             name_.c_str(), usage * 100),
				                      errhint("A session that LISTENs and stopped reading holds the queue; "
				                              "pg_stat_activity shows it.")));
			    else
				    for (auto &n : notes)
					    Async_Notify(cfg_.notify_channel, n.c_str());
		    }
		    spi::EndShort();
	    },
	    &err);
	if (!ok) {
		// The verdicts stay (the rows stay held, so they are neither read nor sent again) and are
		// written on the next turn.
		TimestampTz now = GetCurrentTimestamp();
		if (now - record_warned_ > 60 * USECS_PER_SEC) {
			record_warned_ = now;
			Log(WARNING, "sbpg: publisher \"" + name_ + "\": cannot record what was sent: " + err.message.c_str());
		}
		SetError(std::string("cannot record what was sent: ") + err.message.c_str());
		return false;
	}
	for (auto &it : sent) {
		held_.erase(it.id);
		--held_count_;
	}
	for (auto &f : failed) {
		if (held_.erase(f.first.id))
			--held_count_;
		Log(WARNING, "sbpg: publisher \"" + name_ + "\": message " + std::to_string(f.first.id) + " to " +
		                 f.first.entity + " failed: " + f.second);
	}
	sent_ += sent.size();
	failed_ += failed.size();
	if (!retried.empty())
		SetError(retried.front().second);
	return true;
}

void
PublisherWorker::Prune(TimestampTz now) {
	// A round every minute (or every half retention period, when that is shorter); a round that
	// removed a full chunk is followed by another chunk at every turn, so that removal keeps pace
	// with any sending rate.
	int64 every = std::clamp<int64>(static_cast<int64>(guc_outbox_retention_s) * USECS_PER_SEC / 2, USECS_PER_SEC,
	                                60 * USECS_PER_SEC);
	if (guc_outbox_retention_s <= 0 || (!prune_behind_ && now - last_prune_ < every))
		return;
	last_prune_ = now;
	uint64 removed = 0;
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    spi::BeginShort();
		    Datum a[2] = {CStringGetTextDatum(name_.c_str()),
		                  Float8GetDatum(static_cast<double>(guc_outbox_retention_s))};
		    removed = spi::Exec(kPrune, a, nullptr, SPI_OK_DELETE).rows;
		    spi::EndShort(spi::Commit::kLazy);
	    },
	    &err);
	prune_behind_ = ok && removed >= 10000;
}

void
PublisherWorker::PublishStatus() {
	PublisherStatus st = publisher_->Status();
	if (st.dead) {
		Fail("the AMQP thread stopped: " + st.last_error);
		stop_ = true;
		return;
	}
	int64 now_s = GetCurrentTimestamp() / USECS_PER_SEC;
	SpinLockAcquire(&g_slot->mutex);
	int state = st.waiting_for_token                                                      ? kStateWaitingForToken
	            : st.connected                                                            ? kStateConnected
	            : g_slot->state == kStateConnected || g_slot->state == kStateReconnecting ? kStateReconnecting
	                                                                                      : kStateConnecting;
	g_slot->state = state;
	g_slot->connected_since = st.connected ? ToTimestamp(st.connected_since_ms) : 0;
	g_slot->token_expires_at = st.token_expires_ms ? ToTimestamp(st.token_expires_ms) : 0;
	g_slot->reconnects = st.reconnects;
	g_slot->applied += sent_;
	g_slot->dead_lettered += failed_;
	g_slot->retries += retries_;
	g_slot->batches += groups_;
	g_slot->waiting_retry = static_cast<int32>(held_count_);
	for (float v : accept_ms_) {
		g_slot->apply_ms[g_slot->apply_next] = v;
		g_slot->apply_next = (g_slot->apply_next + 1) % kSamples;
		g_slot->apply_count = std::min<uint32>(g_slot->apply_count + 1, kSamples);
	}
	if (sent_) {
		int b = static_cast<int>(now_s % kRateSeconds);
		if (g_slot->rate_second[b] != now_s) {
			g_slot->rate_second[b] = now_s;
			g_slot->rate_count[b] = 0;
		}
		g_slot->rate_count[b] += static_cast<uint32>(sent_);
	}
	SpinLockRelease(&g_slot->mutex);
	sent_ = failed_ = retries_ = groups_ = 0;
	accept_ms_.clear();
	std::vector<ConsumerEvent> events;
	publisher_->TakeEvents(&events);
	for (auto &ev : events) {
		if (ev.kind == ConsumerEvent::Kind::Error || ev.kind == ConsumerEvent::Kind::Disconnected) {
			SetError(ev.text);
			Log(LOG, "sbpg: publisher \"" + name_ + "\": " + ev.text);
		} else if (ev.kind == ConsumerEvent::Kind::Connected) {
			Log(LOG, "sbpg: publisher \"" + name_ + "\": " + ev.text);
		}
	}
}

TimestampTz
PublisherWorker::NextDue() const {
	TimestampTz due = 0;
	for (auto &kv : entities_)
		if (kv.second.in_flight.empty() && !kv.second.pending.empty() && kv.second.not_before)
			due = due ? std::min(due, kv.second.not_before) : kv.second.not_before;
	return due;
}

void
PublisherWorker::Wait(long timeout_ms) {
	PgError err;
	TimestampTz now = GetCurrentTimestamp();
	if (TimestampTz due = NextDue(); due)
		timeout_ms = std::min<long>(timeout_ms, std::max<long>(1, (due - now) / 1000 + 1));
	WaitEvent ev[3];
	int got = 0;
	PgGuard([&] { got = WaitEventSetWait(wait_set_, timeout_ms, ev, 3, PG_WAIT_EXTENSION); }, &err);
	for (int i = 0; i < got; ++i)
		if (ev[i].events & WL_LATCH_SET)
			read_due_ = true; // a commit queued rows (sbpg._wake_publisher)
	PgGuard([&] { ResetLatch(MyLatch); }, &err);
	uint64_t drained;
	while (read(efd_, &drained, sizeof drained) > 0) {
	}
}

int
PublisherWorker::Run() {
	if (!Setup())
		return 0;
	while (!stop_) {
		if (!Interrupts())
			break;
		// The next groups go out before the verdicts are written, so that the broker works while
		// the database does.
		HandleResults();
		SendGroups(GetCurrentTimestamp());
		if (Record(done_sent_, done_failed_, done_retried_)) {
			done_sent_.clear();
			done_failed_.clear();
			done_retried_.clear();
		}
		TimestampTz now = GetCurrentTimestamp();
		if (read_due_ || now - last_read_ >= USECS_PER_SEC) {
			Read();
			SendGroups(GetCurrentTimestamp());
		}
		PublishStatus();
		Prune(now);
		Wait(1000);
	}
	return 0;
}

// ---- at commit: wake the publishers whose rows were queued

bool wake_registered = false;
bool wake_pending = false;

void
WakePublishersAtCommit(XactEvent event, void *) {
	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_PARALLEL_COMMIT && event != XACT_EVENT_ABORT &&
	    event != XACT_EVENT_PARALLEL_ABORT)
		return;
	bool wake = wake_pending && (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT);
	wake_pending = false;
	if (!wake || !shared)
		return;
	for (int i = 0; i < shared->nslots; ++i) {
		WorkerSlot *s = &shared->slots[i];
		Latch *l = nullptr;
		SpinLockAcquire(&s->mutex);
		if (s->in_use && strncmp(s->name, "pub:", 4) == 0)
			l = s->latch;
		SpinLockRelease(&s->mutex);
		if (l)
			SetLatch(l);
	}
}

Datum
WakePublisher(FunctionCallInfo) {
	if (!wake_registered) {
		RegisterXactCallback(WakePublishersAtCommit, nullptr);
		wake_registered = true;
	}
	wake_pending = true;
	PG_RETURN_VOID();
}

Datum
PublisherSlots(FunctionCallInfo fcinfo) {
	ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
	InitMaterializedSRF(fcinfo, 0);
	TupleDesc desc = rsinfo->setDesc;
	for (int i = 0; shared && i < shared->nslots; ++i) {
		WorkerSlot s;
		CopySlot(i, &s);
		if (!s.in_use || strncmp(s.name, "pub:", 4) != 0)
			continue;
		Datum values[15];
		bool nulls[15] = {false};
		int k = 0;
		values[k++] = CStringGetTextDatum(s.name + 4);
		values[k++] = CStringGetTextDatum(WorkerStateName(s.state));
		nulls[k] = s.pid == 0;
		values[k++] = Int32GetDatum(s.pid);
		nulls[k] = s.connected_since == 0;
		values[k++] = TimestampTzGetDatum(s.connected_since);
		values[k++] = Int64GetDatum(s.applied);
		values[k++] = Int64GetDatum(s.dead_lettered);
		values[k++] = Int64GetDatum(s.batches);
		values[k++] = Int64GetDatum(s.retries);
		values[k++] = Int64GetDatum(s.reconnects);
		nulls[k] = s.last_error.Empty();
		values[k++] = CStringGetTextDatum(s.last_error.c_str());
		nulls[k] = s.last_error_at == 0;
		values[k++] = TimestampTzGetDatum(s.last_error_at);
		nulls[k] = s.token_expires_at == 0;
		values[k++] = TimestampTzGetDatum(s.token_expires_at);
		float v[kSamples]; // no C++ object with a destructor: PostgreSQL calls below may longjmp
		uint32 nv = s.apply_count;
		std::memcpy(v, s.apply_ms, sizeof(float) * nv);
		std::sort(v, v + nv);
		nulls[k] = nv == 0;
		values[k++] = Float8GetDatum(nv ? v[nv / 2] : 0);
		nulls[k] = nv == 0;
		values[k++] = Float8GetDatum(nv ? v[std::min<uint32>(nv - 1, nv * 99 / 100)] : 0);
		int64 now_s = GetCurrentTimestamp() / USECS_PER_SEC;
		uint64 total = 0;
		for (int b = 0; b < kRateSeconds; ++b)
			if (s.rate_second[b] > now_s - kRateSeconds && s.rate_second[b] <= now_s)
				total += s.rate_count[b];
		values[k++] = Float8GetDatum(static_cast<double>(total) / kRateSeconds);
		tuplestore_putvalues(rsinfo->setResult, desc, values, nulls);
	}
	return (Datum)0;
}

} // namespace

} // namespace sbpg::pg

using namespace sbpg::pg;

Datum
sbpg_wake_publisher(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._wake_publisher()", fcinfo, WakePublisher);
}

Datum
sbpg_publisher_slots(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._publisher_slots()", fcinfo, PublisherSlots);
}

void
sbpg_publisher_main(Datum) {
	WorkerStart start;
	std::memcpy(&start, MyBgworkerEntry->bgw_extra, sizeof start);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	if (start.slot < 0 || start.slot >= shared->nslots)
		ereport(ERROR, (errmsg("sbpg publisher started with an invalid slot %d", start.slot)));
	g_slot = &shared->slots[start.slot];
	SpinLockAcquire(&g_slot->mutex);
	g_slot->pid = MyProcPid;
	g_slot->state = kStateStarting;
	g_slot->latch = MyLatch;
	SpinLockRelease(&g_slot->mutex);
	before_shmem_exit(PublisherOnExit, 0);
	BackgroundWorkerInitializeConnectionByOid(start.database, start.user, 0);
	in_sbpg_worker = true;
	PinSessionSettings();
	pgstat_report_appname(start.name);
	pgstat_report_activity(STATE_IDLE, "publishing");

	sbpg::ErrorText error{};
	int exit_code = 0;
	try {
		PublisherWorker w(start);
		exit_code = w.Run();
	} catch (const std::exception &e) {
		error.Set(e.what());
	} catch (...) {
		error.Set("unknown C++ exception");
	}
	if (!error.Empty()) {
		SetError(error.view());
		SetState(kStateFailed);
		ereport(FATAL, (errmsg("sbpg: publisher \"%s\": %s", start.name + 4, error.c_str())));
	}
	proc_exit(exit_code);
}
