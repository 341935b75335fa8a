// src/pg/module.cpp
//   Module entry: _PG_init (settings, shared memory, the launcher), the SQL-callable C functions
//   and the hooks that wake the launcher when the configuration changes.
#include "sbpg/pg/pg_error.hpp"

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_proc.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PGDLLEXPORT void _PG_init(void);
PGDLLEXPORT Datum sbpg_caller(PG_FUNCTION_ARGS);
PGDLLEXPORT Datum sbpg_config_changed(PG_FUNCTION_ARGS);
PGDLLEXPORT Datum sbpg_worker_stats(PG_FUNCTION_ARGS);
PG_FUNCTION_INFO_V1(sbpg_caller);
PG_FUNCTION_INFO_V1(sbpg_config_changed);
PG_FUNCTION_INFO_V1(sbpg_worker_stats);
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/slots.hpp"
#include "sbpg/pg/sql_entry.hpp"
#include "sbpg/pg/test_hooks.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace sbpg::pg {

// File-scope state, each kept because PostgreSQL's machinery or callbacks need it:
//   guc_*: the settings' variables, which PostgreSQL's GUC code writes;
//   shared: the shared-memory segment, set by the shmem_startup_hook;
//   in_sbpg_worker, tenant_role: per process, read by sbpg._caller() (an SQL function) and the
//   object access hook, which receive no context of ours.
char *guc_database = nullptr;
int guc_max_workers = 8;
int guc_log_messages = kLogFailures;
int guc_inbox_retention_s = 7 * 24 * 3600;
int guc_outbox_retention_s = 7 * 24 * 3600;
int guc_stats_history_min = 24 * 60;
int guc_max_json_depth = 1000;
char *guc_ca_file = nullptr;
SharedState *shared = nullptr;
bool in_sbpg_worker = false;
Oid tenant_role = InvalidOid;

namespace {

const struct config_enum_entry kLogMessagesOptions[] = {{"none", kLogNone, false},
                                                        {"failures", kLogFailures, false},
                                                        {"all", kLogAll, false},
                                                        {nullptr, 0, false}};

// The hooks installed before ours, each called on by ours (PostgreSQL's hook chaining).
shmem_request_hook_type prev_shmem_request_hook = nullptr;
shmem_startup_hook_type prev_shmem_startup_hook = nullptr;
object_access_hook_type prev_object_access_hook = nullptr;
fmgr_hook_type prev_fmgr_hook = nullptr;

// The SECURITY DEFINER functions running in this process, innermost last: their owner (the role
// whose code runs inside) and schema. sbpg._caller() reads it (see there). Kept by fmgr_hook, which
// PostgreSQL calls when such a function starts, ends and fails.
struct DefinerFrame {
	Oid owner;
	Oid schema;
	const FmgrInfo *flinfo;
	bool restricted; // a security-restricted operation was in force when it started
	Oid tenant;      // tenant_role when it started
};
DefinerFrame *frames = nullptr;
int nframes = 0, maxframes = 0;

// Set by the trigger and the drop hook, read by the transaction callback at commit: the launcher is
// woken once the change is visible.
bool wake_at_commit = false;
bool xact_callback_registered = false;

Size
SharedSize() {
	return add_size(MAXALIGN(sizeof(SharedState)), mul_size(guc_max_workers, sizeof(WorkerSlot)));
}

void
ShmemRequest() {
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(SharedSize());
	RequestNamedLWLockTranche("sbpg", 1);
}

void
ShmemStartup() {
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	bool found = false;
	void *mem = ShmemInitStruct("sbpg", SharedSize(), &found);
	shared = static_cast<SharedState *>(mem);
	if (!found) {
		std::memset(mem, 0, SharedSize());
		shared->lock = &(GetNamedLWLockTranche("sbpg"))->lock;
		shared->nslots = guc_max_workers;
		shared->slots = reinterpret_cast<WorkerSlot *>(static_cast<char *>(mem) + MAXALIGN(sizeof(SharedState)));
		for (int i = 0; i < shared->nslots; ++i)
			SpinLockInit(&shared->slots[i].mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
XactCallback(XactEvent event, void *) {
	if (event == XACT_EVENT_COMMIT && wake_at_commit)
		WakeLauncher();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_COMMIT ||
	    event == XACT_EVENT_PARALLEL_ABORT)
		wake_at_commit = false;
}

// No function call outlives its transaction: whatever a frame left (it should not), it goes.
void
FramesXactCallback(XactEvent event, void *) {
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_COMMIT ||
	    event == XACT_EVENT_PARALLEL_ABORT)
		nframes = 0;
}

void
FmgrHook(FmgrHookEventType event, FmgrInfo *flinfo, Datum *arg) {
	if (event != FHET_START) {
		// End or failure: this frame closes, and any left above it (should another hook have failed
		// between a start and its end) with it.
		for (int i = nframes - 1; i >= 0; --i)
			if (frames[i].flinfo == flinfo) {
				nframes = i;
				break;
			}
		if (prev_fmgr_hook)
			prev_fmgr_hook(event, flinfo, arg);
		return;
	}
	if (prev_fmgr_hook)
		prev_fmgr_hook(event, flinfo, arg);
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(flinfo->fn_oid));
	if (!HeapTupleIsValid(tup))
		return;
	Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup));
	bool definer = proc->prosecdef;
	Oid schema = proc->pronamespace;
	ReleaseSysCache(tup);
	if (!definer)
		return;
	if (nframes == maxframes) {
		int grow = maxframes ? maxframes * 2 : 16;
		frames = static_cast<DefinerFrame *>(frames
		                                         ? repalloc(frames, sizeof(DefinerFrame) * grow)
		                                         : MemoryContextAlloc(TopMemoryContext, sizeof(DefinerFrame) * grow));
		maxframes = grow;
	}
	// fmgr_security_definer has switched to the owner already.
	frames[nframes++] = DefinerFrame{GetUserId(), schema, flinfo, InSecurityRestrictedOperation(), tenant_role};
}

void
WakeAtCommit() {
	if (!xact_callback_registered) {
		RegisterXactCallback(XactCallback, nullptr);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}

// DROP EXTENSION: wake the launcher at commit so it stops the workers at once. Tenant code in a
// worker creates no temporary object: PostgreSQL refuses temporary tables in a security-restricted
// operation but not temporary functions, operators or types, which would outlive the handler in
// the worker's session. The worker itself never creates a temporary namespace, so one that exists
// while tenant code creates an object was made by that tenant code.
void
ObjectAccess(ObjectAccessType access, Oid class_id, Oid object_id, int sub_id, void *arg) {
	if (prev_object_access_hook)
		prev_object_access_hook(access, class_id, object_id, sub_id, arg);
	if (access == OAT_DROP && class_id == ExtensionRelationId)
		WakeAtCommit();
	if (access == OAT_POST_CREATE && OidIsValid(tenant_role)) {
		Oid temp_ns = InvalidOid, temp_toast_ns = InvalidOid;
		GetTempNamespaceState(&temp_ns, &temp_toast_ns);
		if (OidIsValid(temp_ns))
			ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			                errmsg("cannot create temporary objects in code an sbpg worker runs"),
			                errdetail("Handlers, upcasts and mappings run in the worker's session; a temporary object "
			                          "would outlive the message."),
			                errhint("Create the object in a schema of run_as's own.")));
	}
}

void
RegisterLauncher() {
	BackgroundWorker w;
	std::memset(&w, 0, sizeof w);
	w.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w.bgw_start_time = BgWorkerStart_RecoveryFinished;
	w.bgw_restart_time = 5; // seconds, after a crash of the launcher itself
	snprintf(w.bgw_library_name, BGW_MAXLEN, "sbpg");
	snprintf(w.bgw_function_name, BGW_MAXLEN, "sbpg_launcher_main");
	snprintf(w.bgw_name, BGW_MAXLEN, "sbpg launcher");
	snprintf(w.bgw_type, BGW_MAXLEN, "sbpg launcher");
	RegisterBackgroundWorker(&w);
}

double
Percentile(const float *samples, uint32 count, double p) {
	if (count == 0)
		return -1;
	float copy[kSamples];
	std::memcpy(copy, samples, sizeof(float) * count);
	uint32 k = static_cast<uint32>(p * (count - 1) + 0.5);
	std::nth_element(copy, copy + k, copy + count);
	return copy[k];
}

} // namespace

const char *
WorkerStateName(int state) {
	switch (state) {
	case kStateStarting:
		return "starting";
	case kStateConnecting:
		return "connecting";
	case kStateConnected:
		return "connected";
	case kStateReconnecting:
		return "reconnecting";
	case kStateStopped:
		return "stopped";
	case kStateFailed:
		return "failed";
	case kStatePaused:
		return "paused";
	case kStateWaitingForToken:
		return "waiting_for_token";
	default:
		return "free";
	}
}

void
WakeLauncher() {
	if (shared && shared->launcher_latch)
		SetLatch(shared->launcher_latch);
}

int
AssignSlot(const char *name, int worker) {
	int found = -1;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < shared->nslots && found < 0; ++i)
		if (shared->slots[i].in_use && strncmp(shared->slots[i].name, name, kNameLen) == 0 &&
		    shared->slots[i].worker == worker)
			found = i;
	for (int i = 0; i < shared->nslots && found < 0; ++i) {
		WorkerSlot *s = &shared->slots[i];
		if (!s->in_use) {
			SpinLockAcquire(&s->mutex);
			// Everything after the spinlock starts from zero for a new subscription.
			std::memset(reinterpret_cast<char *>(s) + offsetof(WorkerSlot, in_use), 0,
			            sizeof(WorkerSlot) - offsetof(WorkerSlot, in_use));
			s->in_use = true;
			compat::CopyCString(s->name, name, kNameLen);
			s->worker = worker;
			s->state = kStateStarting;
			SpinLockRelease(&s->mutex);
			found = i;
		}
	}
	LWLockRelease(shared->lock);
	return found;
}

void
FreeSlot(int slot) {
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	WorkerSlot *s = &shared->slots[slot];
	SpinLockAcquire(&s->mutex);
	s->in_use = false;
	s->state = kStateFree;
	SpinLockRelease(&s->mutex);
	LWLockRelease(shared->lock);
}

void
CopySlot(int slot, WorkerSlot *out) {
	WorkerSlot *s = &shared->slots[slot];
	SpinLockAcquire(&s->mutex);
	std::memcpy(static_cast<void *>(out), s, sizeof *s);
	SpinLockRelease(&s->mutex);
}

} // namespace sbpg::pg

using namespace sbpg::pg;

// sbpg.ca_file must name a readable PEM file holding at least one certificate: a mistake is
// reported where it is made (SET, reload) rather than as a connection failure later.
static bool
CheckCaFile(char **newval, void **extra, GucSource source) {
	if (!*newval || !**newval)
		return true;
	if (**newval != '/') {
		GUC_check_errdetail("sbpg.ca_file must be an absolute path.");
		return false;
	}
	FILE *f = fopen(*newval, "r");
	if (!f) {
		GUC_check_errdetail("The file \"%s\" cannot be read by the server: %s.", *newval, strerror(errno));
		return false;
	}
	char line[256];
	bool found = false;
	while (!found && fgets(line, sizeof line, f))
		found = strncmp(line, "-----BEGIN CERTIFICATE-----", 27) == 0;
	fclose(f);
	if (!found) {
		GUC_check_errdetail("The file \"%s\" holds no PEM certificate.", *newval);
		return false;
	}
	return true;
}

void
_PG_init(void) {
	// pg_upgrade runs both servers in binary-upgrade mode: it loads the library to check it can,
	// and restores the extension's objects, with no data to consume and no one to answer a
	// worker. Nothing of sbpg may act then (no launcher, no hooks, no shared memory), and loading
	// must not fail for want of shared_preload_libraries. PostgreSQL's own logical replication
	// launcher and pg_cron stand down the same way.
	if (IsBinaryUpgrade)
		return;
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
		                errmsg("sbpg must be loaded with shared_preload_libraries"),
		                errhint("Add sbpg to shared_preload_libraries in postgresql.conf and restart the server.")));

	DefineCustomStringVariable("sbpg.database", "Database whose sbpg subscriptions the launcher serves.", nullptr,
	                           &guc_database, "postgres", PGC_POSTMASTER, GUC_SUPERUSER_ONLY, nullptr, nullptr,
	                           nullptr);
	DefineCustomIntVariable("sbpg.max_workers", "Most subscriptions that can run at once (one worker each).",
	                        "Each worker is a background worker: max_worker_processes must leave room for them.",
	                        &guc_max_workers, 8, 1, 256, PGC_POSTMASTER, 0, nullptr, nullptr, nullptr);
	DefineCustomEnumVariable("sbpg.log_messages", "Which settled messages get a JSON line in the server log.",
	                         "none, failures (dead-lettered and retried messages) or all.", &guc_log_messages,
	                         kLogFailures, kLogMessagesOptions, PGC_SIGHUP, 0, nullptr, nullptr, nullptr);
	DefineCustomIntVariable("sbpg.inbox_retention", "How long sbpg.inbox keeps rows whose settlement was confirmed.",
	                        "0 keeps them forever. Rows whose settlement was never confirmed are kept.",
	                        &guc_inbox_retention_s, 7 * 24 * 3600, 0, INT_MAX, PGC_SIGHUP, GUC_UNIT_S, nullptr, nullptr,
	                        nullptr);
	DefineCustomIntVariable("sbpg.outbox_retention", "How long sbpg.outbox keeps rows that were sent.",
	                        "0 keeps them forever. Queued and failed rows are always kept.", &guc_outbox_retention_s,
	                        7 * 24 * 3600, 0, INT_MAX, PGC_SIGHUP, GUC_UNIT_S, nullptr, nullptr, nullptr);
	DefineCustomIntVariable("sbpg.stats_history_retention",
	                        "How long sbpg.stats_history keeps each subscription's per-minute figures.",
	                        "0 records no history.", &guc_stats_history_min, 24 * 60, 0, 31 * 24 * 60, PGC_SIGHUP,
	                        GUC_UNIT_MIN, nullptr, nullptr, nullptr);
	DefineCustomIntVariable("sbpg.max_json_depth", "Deepest JSON nesting a message body may have.",
	                        "Deeper bodies are dead-lettered instead of reaching jsonb.", &guc_max_json_depth, 1000, 1,
	                        100000, PGC_SIGHUP, 0, nullptr, nullptr, nullptr);
	DefineCustomStringVariable("sbpg.ca_file", "A PEM file of CA certificates trusted in addition to the system's.",
	                           "Used for amqps:// connections and the HTTPS token endpoints, with host-name "
	                           "verification. Empty: only the system's CA store.",
	                           &guc_ca_file, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY, CheckCaFile, nullptr, nullptr);
	testing::DefineSettings();
	MarkGUCPrefixReserved("sbpg");

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = ShmemRequest;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = ShmemStartup;
	prev_object_access_hook = object_access_hook;
	object_access_hook = ObjectAccess;
	prev_fmgr_hook = fmgr_hook;
	fmgr_hook = FmgrHook;
	RegisterXactCallback(FramesXactCallback, nullptr);
	RegisterLauncher();
}

namespace sbpg::pg {

namespace {

// sbpg._caller(): the role whose code called a SECURITY DEFINER function of sbpg, which every
// permission check of the configuration functions judges.
//   - Inside another role's SECURITY DEFINER function, that function's owner: its code is what
//     runs, whoever called it (a superuser calling a tenant's function lends it nothing). Unless
//     something changed the user since that function started: tenant code entered (the caller is
//     then run_as), or a security-restricted operation began (a superuser's function that runs
//     ANALYZE or REFRESH MATERIALIZED VIEW on a tenant's table runs the tenant's code: refused,
//     as below).
//   - In an sbpg worker, tenant code (handler, upcast, mapping) runs as the subscription's run_as
//     while the session belongs to the extension owner: the caller is run_as. The worker itself
//     never calls the configuration functions, so outside tenant code the call is refused.
//   - In a security-restricted operation elsewhere (index expressions, materialized views, VACUUM
//     and ANALYZE run a table owner's code under another session user) the outer user is not the
//     role whose code runs, and no other is known: refused.
//   - Otherwise the session's current role (after SET ROLE), not the function's owner.
Datum
Caller(FunctionCallInfo fcinfo) {
	Oid sbpg_schema = get_namespace_oid("sbpg", true);
	const DefinerFrame *f = nullptr;
	for (int i = nframes - 1; i >= 0 && !f; --i)
		if (frames[i].schema != sbpg_schema)
			f = &frames[i];
	bool restricted_since = f && InSecurityRestrictedOperation() && !f->restricted;
	bool tenant_since = f && OidIsValid(tenant_role) && tenant_role != f->tenant;
	if (f && !restricted_since && !tenant_since)
		PG_RETURN_OID(f->owner);
	if (OidIsValid(tenant_role))
		PG_RETURN_OID(tenant_role);
	if (in_sbpg_worker)
		ereport(ERROR,
		        (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		         errmsg("sbpg's configuration functions cannot be called by an sbpg worker outside tenant code")));
	if (InSecurityRestrictedOperation())
		ereport(ERROR,
		        (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		         errmsg("sbpg's configuration functions cannot be called within a security-restricted operation"),
		         errdetail("Index expressions, materialized views and maintenance commands run a table owner's "
		                   "code under another session user, so the role calling cannot be told."),
		         errhint("Call them in a session of your own.")));
	PG_RETURN_OID(GetOuterUserId());
}

// Statement trigger on the configuration tables: wake the launcher when the transaction commits.
Datum
ConfigChanged(FunctionCallInfo fcinfo) {
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
		                errmsg("sbpg._config_changed() must be called as a trigger")));
	WakeAtCommit();
	PG_RETURN_POINTER(nullptr);
}

// One row of sbpg._worker_stats(), filled by column name: where each column goes is read from the
// result's TupleDesc (the SQL declaration's OUT parameters), so a column added there cannot shift
// the others. A name the declaration lacks, or a column left unfilled, is an error, not a shift.
struct StatsRow {
	TupleDesc desc;
	Datum *values;
	bool *nulls;
	bool *filled;

	void Set(const char *column, Datum value, bool isnull = false) {
		int k = Column(column);
		values[k] = value;
		nulls[k] = isnull;
		filled[k] = true;
	}
	void SetText(const char *column, const char *text, bool null_if_empty) {
		Set(column, CStringGetTextDatum(text), null_if_empty && text[0] == '\0');
	}
	void SetCount(const char *column, uint64 n) { Set(column, Int64GetDatum(static_cast<int64>(n))); }
	void SetTime(const char *column, TimestampTz t) { Set(column, TimestampTzGetDatum(t), t == 0); }
	void SetMs(const char *column, double ms) { Set(column, Float8GetDatum(ms), ms < 0); }

	int Column(const char *column) const {
		for (int k = 0; k < desc->natts; ++k) {
			Form_pg_attribute a = TupleDescAttr(desc, k);
			if (!a->attisdropped && strcmp(NameStr(a->attname), column) == 0)
				return k;
		}
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("sbpg._worker_stats() has no column \"%s\"", column),
		                errhint("The installed extension's version does not match the library: ALTER EXTENSION sbpg "
		                        "UPDATE.")));
		pg_unreachable();
	}
	void Start() {
		for (int k = 0; k < desc->natts; ++k)
			filled[k] = TupleDescAttr(desc, k)->attisdropped;
		std::memset(nulls, 0, sizeof(bool) * desc->natts);
	}
	void Put(Tuplestorestate *store) {
		for (int k = 0; k < desc->natts; ++k)
			if (!filled[k])
				ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR),
				                errmsg("sbpg._worker_stats(): the library does not fill column \"%s\"",
				                       NameStr(TupleDescAttr(desc, k)->attname)),
				                errhint("The installed extension's version does not match the library: ALTER "
				                        "EXTENSION sbpg UPDATE.")));
		tuplestore_putvalues(store, desc, values, nulls);
	}
};

// Messages settled per second over the last kRateSeconds.
double
MessagesPerSecond(const WorkerSlot *slot, TimestampTz now) {
	int64 now_s = now / USECS_PER_SEC;
	uint64 in_window = 0;
	for (int b = 0; b < kRateSeconds; ++b)
		if (slot->rate_second[b] > now_s - kRateSeconds && slot->rate_second[b] <= now_s)
			in_window += slot->rate_count[b];
	return static_cast<double>(in_window) / kRateSeconds;
}

void
FillStatsRow(StatsRow *row, const WorkerSlot *slot, TimestampTz now) {
	row->SetText("subscription", slot->name, false);
	row->Set("worker", Int32GetDatum(slot->worker), false);
	row->SetText("state", WorkerStateName(slot->state), false);
	row->Set("pid", Int32GetDatum(slot->pid), slot->pid == 0);
	row->SetTime("connected_since", slot->connected_since);
	row->SetCount("received", slot->received);
	row->SetCount("applied", slot->applied);
	row->SetCount("dead_lettered", slot->dead_lettered);
	row->SetCount("duplicates", slot->duplicates);
	row->SetCount("abandoned", slot->abandoned);
	row->SetCount("batches", slot->batches);
	row->SetCount("settle_failures", slot->settle_failures);
	row->SetCount("reconnects", slot->reconnects);
	row->SetText("last_error", slot->last_error.c_str(), true);
	row->SetTime("last_error_at", slot->last_error_at);
	row->SetMs("apply_ms_p50", Percentile(slot->apply_ms, slot->apply_count, 0.5));
	row->SetMs("apply_ms_p99", Percentile(slot->apply_ms, slot->apply_count, 0.99));
	row->SetMs("lag_ms_p50", Percentile(slot->lag_ms, slot->lag_count, 0.5));
	row->SetMs("lag_ms_p99", Percentile(slot->lag_ms, slot->lag_count, 0.99));
	row->Set("messages_per_second", Float8GetDatum(MessagesPerSecond(slot, now)));
	row->SetTime("token_expires_at", slot->token_expires_at);
	row->SetTime("last_batch_at", slot->last_batch_at);
	row->SetCount("tokens_put", slot->tokens_put);
	row->SetText("token_subject", slot->token_subject, true);
	row->SetText("token_error", slot->token_error.c_str(), true);
	row->SetCount("retries", slot->retries);
	row->SetCount("retried_messages", slot->retried_messages);
	row->SetCount("max_retries_exceeded", slot->max_retries_exceeded);
	row->Set("waiting_retry", Int32GetDatum(slot->waiting_retry));
	row->SetCount("deferred", slot->deferred);
	row->SetCount("lock_renewals", slot->lock_renewals);
	row->SetCount("locks_lost", slot->locks_lost);
}

// sbpg._worker_stats(): one row per subscription slot in use.
Datum
WorkerStats(FunctionCallInfo fcinfo) {
	ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
	InitMaterializedSRF(fcinfo, 0);
	if (!shared)
		PG_RETURN_VOID();
	TimestampTz now = GetCurrentTimestamp();
	int natts = rsinfo->setDesc->natts;
	StatsRow row{rsinfo->setDesc, static_cast<Datum *>(palloc(sizeof(Datum) * natts)),
	             static_cast<bool *>(palloc(sizeof(bool) * natts)), static_cast<bool *>(palloc(sizeof(bool) * natts))};
	WorkerSlot *slot = static_cast<WorkerSlot *>(palloc(sizeof(WorkerSlot)));
	for (int i = 0; i < shared->nslots; ++i) {
		CopySlot(i, slot);
		if (!slot->in_use || strncmp(slot->name, "pub:", 4) == 0) // publishers: sbpg._publisher_slots()
			continue;
		row.Start();
		FillStatsRow(&row, slot, now);
		row.Put(rsinfo->setResult);
	}
	pfree(slot);
	PG_RETURN_VOID();
}

} // namespace

} // namespace sbpg::pg

Datum
sbpg_caller(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._caller()", fcinfo, Caller);
}

Datum
sbpg_config_changed(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._config_changed()", fcinfo, ConfigChanged);
}

Datum
sbpg_worker_stats(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._worker_stats()", fcinfo, WorkerStats);
}
