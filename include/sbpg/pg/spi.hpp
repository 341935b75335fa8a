// sbpg/pg/spi.hpp
//   The one small SPI toolkit of sbpg's PostgreSQL layer (include after postgres.h, only from src/pg/):
//   - BeginShort / EndShort (or ShortTransaction): the one bracket of a transaction the worker runs
//     itself, StartTransactionCommand, SPI_connect, PushActiveSnapshot and the exact reverse;
//   - PlanSpec and Exec: a statement written once as a constant, prepared on its own the first time
//     it runs and kept for the life of the process; a Prepare that fails raises its error, stores
//     nothing, and is tried again the next time, the other plans untouched;
//   - Exec / ExecSql: an SPI result code other than the expected one is an ERROR that names what
//     failed; "no rows" is an explicit SpiResult::rows == 0, never a failure code read as empty;
//   - SpiResult: columns found by name (SPI_fnumber, once per result), never by position.
//   Everything here runs inside PgGuard (errors longjmp) and owns no C++ objects with destructors.
//
//   sbpg's statements run in a superuser's session: every function, operator and type they name
//   is schema-qualified, so nothing anyone creates can stand in for it (docs/security.md). The
//   OP_ macros spell the operators; OPERATOR(...) has one precedence for every operator,
//   left-associative: parenthesize.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/spi.hpp"
#endif

extern "C" {
#include "executor/spi.h"
#include "utils/timestamp.h"
}

#define OP_EQ " OPERATOR(pg_catalog.=) "
#define OP_LT " OPERATOR(pg_catalog.<) "
#define OP_LE " OPERATOR(pg_catalog.<=) "
#define OP_GE " OPERATOR(pg_catalog.>=) "
#define OP_GT " OPERATOR(pg_catalog.>) "
#define OP_MINUS " OPERATOR(pg_catalog.-) "
#define OP_PLUS " OPERATOR(pg_catalog.+) "
#define OP_GETTEXT " OPERATOR(pg_catalog.->>) "

namespace sbpg::pg::spi {

// How EndShort commits.
enum class Commit {
	kAsConfigured, // as synchronous_commit says
	kFlushed,      // the commit record flushed (and confirmed by synchronous standbys, where there are any)
	               // before returning: what the caller settles on it is durable
	kLazy,         // synchronous_commit off for this commit: housekeeping that a crash may undo harmlessly
	               // (it is done again), which then costs no disk flush of its own
};

// A short transaction of the worker's own, with SPI connected and a snapshot pushed.
void BeginShort();
void EndShort(Commit how = Commit::kAsConfigured);

template <typename Fn>
void
ShortTransaction(Fn &&fn, Commit how = Commit::kAsConfigured) {
	BeginShort();
	fn();
	EndShort(how);
}

constexpr int kMaxPlanArgs = 12;

// A statement sbpg prepares once per process. Declare it `constexpr` (or const) with static storage:
// its address is its key in the plan cache.
struct PlanSpec {
	const char *what; // what it does, for error messages: "read sbpg.inbox"
	const char *sql;
	int nargs;
	Oid types[kMaxPlanArgs];
	// Planned again at every execution with that execution's values (CURSOR_OPT_CUSTOM_PLAN): for
	// statements that search the inbox or the retries, which a generic plan made while the table
	// was empty would scan sequentially for ever after.
	bool custom_plan;
	// A SELECT that locks rows (FOR KEY SHARE ...): run read-write, as row locks require. Other
	// SELECTs run read-only.
	bool locks_rows;
	// Rows named by their addresses (ctid = ANY ($1)): planned with enable_seqscan off and
	// enable_tidscan on, so that it is a TID scan whatever the statistics or the database's
	// settings say (with custom_plan; a sequential scan of a mid-sized inbox would cost
	// milliseconds per batch).
	bool by_address;
};

// A result of a statement; its table stays valid until SPI_finish (or the end of the subtransaction
// it was read in): the next statement replaces SPI_tuptable, not this table.
struct SpiResult {
	SPITupleTable *table;
	uint64 rows;

	// The number of the column called name; ERROR when the result has none.
	int Col(const char *name) const;
	bool IsNull(uint64 row, int col) const;
	Datum Value(uint64 row, int col, bool *isnull) const;
	// Whether the value is not NULL; *value is set either way.
	bool Get(uint64 row, int col, Datum *value) const;
	// The value, or if_null when it is NULL.
	int32 Int32(uint64 row, int col, int32 if_null = 0) const;
	int64 Int64(uint64 row, int col, int64 if_null = 0) const;
	bool Bool(uint64 row, int col, bool if_null = false) const;
	Oid ObjectId(uint64 row, int col) const; // InvalidOid when NULL
	TimestampTz Timestamp(uint64 row, int col, TimestampTz if_null = 0) const;
	// The value as text (its type's output function); nullptr when NULL. Allocated in cxt, or in
	// the current memory context (SPI's, freed by SPI_finish) when cxt is nullptr.
	char *Text(uint64 row, int col, MemoryContext cxt = nullptr) const;
};

// Runs spec's kept plan with args (nulls as SPI takes them, ' ' or 'n'; nullptr: none is NULL).
// A SELECT runs read-only. ERROR ("sbpg: cannot <what>: <SPI code>") unless SPI returns expect.
SpiResult Exec(const PlanSpec &spec, const Datum *args, const char *nulls, int expect, long limit = 0);
// The same for a statement run once, unprepared.
SpiResult ExecSql(const char *what, const char *sql, int nargs, const Oid *types, const Datum *args, const char *nulls,
                  int expect, long limit = 0);

// A tid[] argument (n may be 0), for statements by_address.
Datum TidArrayDatum(const ItemPointerData *v, int n);

} // namespace sbpg::pg::spi
