// src/pg/history.cpp
//   sbpg.stats_minutes, the storage of sbpg.stats_history: one row per subscription and minute,
//   written by the subscription's worker when the minute is over (worker_main.cpp keeps the
//   minute's counters and latency histograms), and removed by it once older than
//   sbpg.stats_history_retention. Rows live in a table, not in shared memory, so the history
//   survives restarts, follows the database to a standby and can be joined with anything in SQL.
//
//   Invariants: every statement is schema-qualified (spi.hpp); runs inside PgGuard and owns no C++
//   objects with destructors.
#include "sbpg/core/fixed_text.hpp"

extern "C" {
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/builtins.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/spi.hpp"

namespace sbpg::pg {

namespace {

// A restarted worker adds to the row of the minute its predecessor wrote: counts add up, and each
// percentile is the higher of the two parts' (the samples themselves are gone).
constexpr spi::PlanSpec kAddMinute = {
    "write sbpg.stats_minutes",
    "INSERT INTO sbpg.stats_minutes AS h (subscription, minute, received, applied, dead_lettered, duplicates, "
    "retries, batches, apply_ms_p50, apply_ms_p99, lag_ms_p50, lag_ms_p99) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
    "ON CONFLICT (subscription, minute) DO UPDATE SET "
    "received = h.received" OP_PLUS "EXCLUDED.received, applied = h.applied" OP_PLUS "EXCLUDED.applied, "
    "dead_lettered = h.dead_lettered" OP_PLUS "EXCLUDED.dead_lettered, "
    "duplicates = h.duplicates" OP_PLUS "EXCLUDED.duplicates, retries = h.retries" OP_PLUS "EXCLUDED.retries, "
    "batches = h.batches" OP_PLUS "EXCLUDED.batches, "
    "apply_ms_p50 = GREATEST(h.apply_ms_p50, EXCLUDED.apply_ms_p50), "
    "apply_ms_p99 = GREATEST(h.apply_ms_p99, EXCLUDED.apply_ms_p99), "
    "lag_ms_p50 = GREATEST(h.lag_ms_p50, EXCLUDED.lag_ms_p50), "
    "lag_ms_p99 = GREATEST(h.lag_ms_p99, EXCLUDED.lag_ms_p99)",
    12,
    {TEXTOID, TIMESTAMPTZOID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, FLOAT8OID, FLOAT8OID, FLOAT8OID,
     FLOAT8OID},
    false,
};

constexpr spi::PlanSpec kPruneMinutes = {
    "prune sbpg.stats_minutes",
    "DELETE FROM sbpg.stats_minutes WHERE subscription" OP_EQ "$1 AND minute" OP_LT "(pg_catalog.now()" OP_MINUS
    "pg_catalog.make_interval(mins => $2))",
    2,
    {TEXTOID, INT4OID},
    false,
};

Datum
Count(uint64 v) {
	return Int64GetDatum(static_cast<int64>(v));
}

} // namespace

void
RecordMinute(const SubConfig *cfg, const MinuteRow *row, int keep_min) {
	spi::ShortTransaction(
	    [&] {
		    Datum args[12] = {CStringGetTextDatum(cfg->name),
		                      TimestampTzGetDatum(row->minute),
		                      Count(row->received),
		                      Count(row->applied),
		                      Count(row->dead_lettered),
		                      Count(row->duplicates),
		                      Count(row->retries),
		                      Count(row->batches)};
		    char nulls[13] = "            ";
		    const double pct[4] = {row->apply_p50, row->apply_p99, row->lag_p50, row->lag_p99};
		    for (int i = 0; i < 4; ++i) {
			    args[8 + i] = Float8GetDatum(pct[i] < 0 ? 0 : pct[i]);
			    if (pct[i] < 0)
				    nulls[8 + i] = 'n';
		    }
		    spi::Exec(kAddMinute, args, nulls, SPI_OK_INSERT);
		    Datum prune[2] = {args[0], Int32GetDatum(keep_min)};
		    spi::Exec(kPruneMinutes, prune, nullptr, SPI_OK_DELETE);
	    },
	    spi::Commit::kLazy); // a crash loses at most this minute's row
}

} // namespace sbpg::pg
