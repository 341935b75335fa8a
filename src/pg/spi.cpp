// src/pg/spi.cpp
//   The SPI toolkit (sbpg/pg/spi.hpp): the short-transaction bracket, the plan cache, statement
//   execution with one handling of SPI result codes, and results read by column name.
//
//   Invariants: the bracket opens in one order (StartTransactionCommand, SPI_connect,
//   PushActiveSnapshot) and closes in its exact reverse; a plan is in the cache only once it was
//   prepared and kept, so a failed Prepare leaves no trace; runs inside PgGuard and owns no C++
//   objects with destructors.
extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
}

#include "sbpg/pg/spi.hpp"

namespace sbpg::pg::spi {

namespace {

// The process's kept plans, one per PlanSpec. File-scope because a kept plan belongs to the
// process (SPI_keepplan: it outlives every transaction) and is shared by all of its batches.
constexpr int kMaxKeptPlans = 32;
struct KeptPlan {
	const PlanSpec *spec;
	SPIPlanPtr plan;
};
KeptPlan kept_plans[kMaxKeptPlans];
int nkept_plans = 0;

SPIPlanPtr
PlanFor(const PlanSpec &spec) {
	for (int i = 0; i < nkept_plans; ++i)
		if (kept_plans[i].spec == &spec)
			return kept_plans[i].plan;
	if (nkept_plans == kMaxKeptPlans)
		elog(ERROR, "sbpg: more than %d kept plans", kMaxKeptPlans);
	SPIPlanPtr p = SPI_prepare_cursor(spec.sql, spec.nargs, const_cast<Oid *>(spec.types),
	                                  spec.custom_plan ? CURSOR_OPT_CUSTOM_PLAN : 0);
	if (!p)
		elog(ERROR, "sbpg: cannot prepare the statement to %s: %s", spec.what, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(p) != 0)
		elog(ERROR, "sbpg: cannot keep the plan of the statement to %s", spec.what);
	kept_plans[nkept_plans++] = KeptPlan{&spec, p};
	return p;
}

SpiResult
Checked(int rc, int expect, const char *what) {
	if (rc != expect)
		elog(ERROR, "sbpg: cannot %s: %s", what, SPI_result_code_string(rc));
	return SpiResult{SPI_tuptable, SPI_processed};
}

// A settlement must survive the loss of this server where synchronous standbys are configured, not
// only a crash. A commit already waits for them (synchronous_commit is pinned at least 'on', see
// config.cpp), but that wait ends early on a cancel request (pg_cancel_backend), termination or the
// postmaster's death, and the commit then stands locally though no standby has it. So the worker
// waits again, for its own commit record and everything flushed before it (which covers every
// commit it could have read, such as a terminated predecessor's inbox row that a redelivery finds),
// with cancel requests ignored: a commit cannot be cancelled any more. Only termination ends that
// wait, and then the process exits before anything is settled.
void
WaitForSynchronousStandbys() {
	if (!SyncRepRequested())
		return;
	XLogRecPtr flushed = GetFlushRecPtr(nullptr);
	pqsignal(SIGINT, SIG_IGN);
	QueryCancelPending = false;
	// As PostgreSQL's own commit does it: with interrupts held (SyncRepWaitForLSN expects that and
	// checks for termination itself). First the commit record, confirmed as synchronous_commit asks
	// (remote_apply included); then everything flushed before, as far as a flush (a position that is
	// no commit would wait for remote_apply until the standby's next status message).
	HOLD_INTERRUPTS();
	SyncRepWaitForLSN(XactLastCommitEnd, true);
	if (!ProcDiePending && flushed > XactLastCommitEnd)
		SyncRepWaitForLSN(flushed, false);
	RESUME_INTERRUPTS();
	pqsignal(SIGINT, StatementCancelHandler);
	if (ProcDiePending)
		ereport(FATAL, (errcode(ERRCODE_ADMIN_SHUTDOWN),
		                errmsg("sbpg: terminating before the synchronous standbys confirmed a commit"),
		                errdetail("The messages of that commit stay unsettled: the broker delivers them again "
		                          "and the inbox recognises them.")));
}

} // namespace

void
BeginShort() {
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "sbpg: cannot connect to SPI");
	PushActiveSnapshot(GetTransactionSnapshot());
}

void
EndShort(Commit how) {
	PopActiveSnapshot();
	SPI_finish();
	// For this transaction only (GUC_ACTION_LOCAL): its commit does not wait for the disk.
	if (how == Commit::kLazy)
		(void)set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0,
		                        false);
	CommitTransactionCommand();
	// Settle only what is durable: flush the commit record whatever synchronous_commit says, and
	// have the synchronous standbys confirm it where there are any.
	if (how == Commit::kFlushed) {
		XLogFlush(XactLastCommitEnd);
		WaitForSynchronousStandbys();
	}
}

int
SpiResult::Col(const char *name) const {
	int col = table ? SPI_fnumber(table->tupdesc, name) : SPI_ERROR_NOATTRIBUTE;
	if (col <= 0)
		elog(ERROR, "sbpg: a result without the column \"%s\"", name);
	return col;
}

Datum
SpiResult::Value(uint64 row, int col, bool *isnull) const {
	return SPI_getbinval(table->vals[row], table->tupdesc, col, isnull);
}

bool
SpiResult::IsNull(uint64 row, int col) const {
	bool isnull;
	(void)Value(row, col, &isnull);
	return isnull;
}

bool
SpiResult::Get(uint64 row, int col, Datum *value) const {
	bool isnull;
	*value = Value(row, col, &isnull);
	return !isnull;
}

int32
SpiResult::Int32(uint64 row, int col, int32 if_null) const {
	Datum d;
	return Get(row, col, &d) ? DatumGetInt32(d) : if_null;
}

int64
SpiResult::Int64(uint64 row, int col, int64 if_null) const {
	Datum d;
	return Get(row, col, &d) ? DatumGetInt64(d) : if_null;
}

bool
SpiResult::Bool(uint64 row, int col, bool if_null) const {
	Datum d;
	return Get(row, col, &d) ? DatumGetBool(d) : if_null;
}

Oid
SpiResult::ObjectId(uint64 row, int col) const {
	Datum d;
	return Get(row, col, &d) ? DatumGetObjectId(d) : InvalidOid;
}

TimestampTz
SpiResult::Timestamp(uint64 row, int col, TimestampTz if_null) const {
	Datum d;
	return Get(row, col, &d) ? DatumGetTimestampTz(d) : if_null;
}

char *
SpiResult::Text(uint64 row, int col, MemoryContext cxt) const {
	char *v = SPI_getvalue(table->vals[row], table->tupdesc, col);
	return v && cxt ? MemoryContextStrdup(cxt, v) : v;
}

SpiResult
Exec(const PlanSpec &spec, const Datum *args, const char *nulls, int expect, long limit) {
	SPIPlanPtr plan = PlanFor(spec);
	int nest = 0;
	if (spec.by_address) {
		nest = NewGUCNestLevel();
		// Both: a database may have turned TID scans off for its sessions, the worker's included.
		(void)set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
		(void)set_config_option("enable_tidscan", "on", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	}
	int rc = SPI_execute_plan(plan, const_cast<Datum *>(args), nulls, expect == SPI_OK_SELECT && !spec.locks_rows,
	                          limit);
	if (spec.by_address)
		AtEOXact_GUC(true, nest);
	return Checked(rc, expect, spec.what);
}

SpiResult
ExecSql(const char *what, const char *sql, int nargs, const Oid *types, const Datum *args, const char *nulls,
        int expect, long limit) {
	int rc = nargs == 0 ? SPI_execute(sql, expect == SPI_OK_SELECT, limit)
	                    : SPI_execute_with_args(sql, nargs, const_cast<Oid *>(types), const_cast<Datum *>(args), nulls,
	                                            expect == SPI_OK_SELECT, limit);
	return Checked(rc, expect, what);
}

Datum
TidArrayDatum(const ItemPointerData *v, int n) {
	Datum *d = static_cast<Datum *>(palloc(sizeof(Datum) * (n > 0 ? n : 1)));
	for (int i = 0; i < n; ++i)
		d[i] = PointerGetDatum(&v[i]);
	return PointerGetDatum(construct_array(d, n, TIDOID, sizeof(ItemPointerData), false, TYPALIGN_SHORT));
}

} // namespace sbpg::pg::spi
