// src/pg/retry.cpp
//   Retries (docs/retries.md): a failed attempt is either transient (a retry may cure it) or
//   permanent. A transient failure writes the attempt to sbpg.retries with the next attempt's time
//   (full jitter under a doubling ceiling), or past max_retries dead-letters with
//   MaxRetriesExceeded; a permanent one dead-letters with the reason FailureReason gives. A message
//   back before its time waits again, deferred on the broker when the wait is long.
//
//   Invariants: FailItem is the only place a failed attempt's outcome and reason are decided;
//   every statement is schema-qualified (spi.hpp); runs inside PgGuard and owns no C++ objects with
//   destructors.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/inbox.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/retry.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/tenant.hpp"

#include <algorithm>

namespace sbpg::pg {

namespace {

#define RETRY_INSERT                                                                                                   \
	"INSERT INTO sbpg.retries (subscription, sequence_number, message_id, attempts, next_attempt_at, last_error, "     \
	"deferred, session_id, stopped, dead_letter) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, false) "
#define RETRY_UPDATE                                                                                                   \
	" DO UPDATE SET attempts = excluded.attempts, last_failed_at = pg_catalog.now(), next_attempt_at = "               \
	"excluded.next_attempt_at, last_error = excluded.last_error, deferred = excluded.deferred, "                       \
	"session_id = excluded.session_id, stopped = excluded.stopped, dead_letter = false"

constexpr spi::PlanSpec kUpsertBySeq = {
    "write sbpg.retries",
    RETRY_INSERT "ON CONFLICT (subscription, sequence_number) WHERE sequence_number IS NOT NULL" RETRY_UPDATE,
    9,
    {TEXTOID, INT8OID, TEXTOID, INT4OID, TIMESTAMPTZOID, TEXTOID, BOOLOID, TEXTOID, BOOLOID},
    false,
};

constexpr spi::PlanSpec kUpsertById = {
    "write sbpg.retries",
    RETRY_INSERT "ON CONFLICT (subscription, message_id) WHERE sequence_number IS NULL" RETRY_UPDATE,
    9,
    {TEXTOID, INT8OID, TEXTOID, INT4OID, TIMESTAMPTZOID, TEXTOID, BOOLOID, TEXTOID, BOOLOID},
    false,
};

#undef RETRY_INSERT
#undef RETRY_UPDATE

// The row of one message: by its sequence number or, when it has none, by its message id ($2).
// Two statements, so that each finds the row through its index (a CASE of both would not).
#define RETRY_BY_SEQ "subscription" OP_EQ "$1 AND sequence_number IS NOT NULL AND sequence_number" OP_EQ "$2"
#define RETRY_BY_ID "subscription" OP_EQ "$1 AND sequence_number IS NULL AND message_id" OP_EQ "$2"

constexpr spi::PlanSpec kDelete[2] = {
    {"update sbpg.retries", "DELETE FROM sbpg.retries WHERE " RETRY_BY_SEQ, 2, {TEXTOID, INT8OID}, true},
    {"update sbpg.retries", "DELETE FROM sbpg.retries WHERE " RETRY_BY_ID, 2, {TEXTOID, TEXTOID}, true},
};

constexpr spi::PlanSpec kMarkDeferred[2] = {
    {"update sbpg.retries", "UPDATE sbpg.retries SET deferred = true WHERE " RETRY_BY_SEQ, 2, {TEXTOID, INT8OID}, true},
    {"update sbpg.retries", "UPDATE sbpg.retries SET deferred = true WHERE " RETRY_BY_ID, 2, {TEXTOID, TEXTOID}, true},
};

#undef RETRY_BY_SEQ
#undef RETRY_BY_ID

// The stopped sessions among $2, each with the sequence number of the message that stopped it.
constexpr spi::PlanSpec kStoppedSessions = {
    "read the stopped sessions in sbpg.retries",
    "SELECT session_id, pg_catalog.min(sequence_number) AS first FROM sbpg.retries "
    "WHERE subscription" OP_EQ "$1 AND stopped AND session_id" OP_EQ "ANY ($2) AND sequence_number IS NOT NULL "
    "GROUP BY session_id",
    2,
    {TEXTOID, TEXTARRAYOID},
    true,
};

constexpr spi::PlanSpec kAwaitSettlement = {
    "update sbpg.retries",
    "UPDATE sbpg.retries SET deferred = true, next_attempt_at = pg_catalog.now()" OP_PLUS "interval '1 minute', "
    "last_error = 'outcome recorded; waiting for the broker to confirm its settlement' "
    "WHERE subscription" OP_EQ "$1 AND sequence_number IS NOT NULL AND sequence_number" OP_EQ "$2",
    2,
    {TEXTOID, INT8OID},
    true,
};

// The key columns ($2 sequence number, $3 message id) of a message's sbpg.retries row; false when
// it has neither.
bool
RetryKey(const SubConfig *cfg, const ReceivedMessage *m, Datum *args, char *nulls) {
	args[0] = CStringGetTextDatum(cfg->name);
	nulls[0] = nulls[1] = nulls[2] = ' ';
	args[1] = Int64GetDatum(m->sequence_number);
	if (!m->has_sequence_number)
		nulls[1] = 'n';
	if (m->message_id.empty()) {
		nulls[2] = 'n';
		args[2] = 0;
	} else {
		args[2] = CStringGetTextDatum(m->message_id.c_str());
	}
	return m->has_sequence_number || !m->message_id.empty();
}

// Which of a pair of one-row statements (by sequence number, by message id) finds a message's
// sbpg.retries row, with its arguments; -1 when the message has neither key.
int
RowKey(const SubConfig *cfg, const ReceivedMessage *m, Datum a[2]) {
	a[0] = CStringGetTextDatum(cfg->name);
	if (m->has_sequence_number) {
		a[1] = Int64GetDatum(m->sequence_number);
		return 0;
	}
	if (m->message_id.empty())
		return -1;
	a[1] = CStringGetTextDatum(m->message_id.c_str());
	return 1;
}

// The retry row's session_id ($8) and stopped ($9).
void
SessionColumns(const ReceivedMessage *m, bool stopped, Datum *a, char *nl) {
	a[7] = m->in_session ? CStringGetTextDatum(m->session_id.c_str()) : 0;
	nl[7] = m->in_session ? ' ' : 'n';
	a[8] = BoolGetDatum(stopped);
	nl[8] = ' ';
}

// Whether a message that failed for good stops its session instead of being dead-lettered.
bool
StopsSession(const SubConfig *cfg, const ApplyItem *it) {
	return cfg->session_stop && it->msg->in_session;
}

// session_failure = stop: the message failed for good; instead of dead-lettering it, a retry row
// that waits for ever (until sbpg.resume_session) holds back its session. It counts as a retry
// that is never due: the worker holds the message and the session, and nothing of the session
// after it is applied. Without a key to remember it by, it is dead-lettered after all.
void
StopSession(Pass *pass, ApplyItem *it, const char *reason, const char *desc) {
	const ReceivedMessage *m = it->msg;
	Datum a[9];
	char nl[9];
	if (!RetryKey(pass->cfg, m, a, nl)) {
		SetReason(it, reason, desc);
		Record(pass, it, kDeadLettered);
		return;
	}
	ErrorText err;
	FormatText(&err, "%s: %s", reason, desc);
	it->status = kTransient;
	it->attempts = it->attempts + 1;
	it->next_attempt = DT_NOEND;
	it->defer = false;
	SetReason(it, "SessionStopped", err.c_str());
	a[3] = Int32GetDatum(it->attempts);
	a[4] = TimestampTzGetDatum(DT_NOEND);
	a[5] = CStringGetTextDatum(err.c_str());
	a[6] = BoolGetDatum(false);
	SessionColumns(m, true, a, nl);
	nl[3] = nl[4] = nl[5] = nl[6] = ' ';
	spi::Exec(m->has_sequence_number ? kUpsertBySeq : kUpsertById, a, nl, SPI_OK_INSERT);
	Notify(pass, it);
}

// A transient failure: schedule another attempt (with full jitter under a doubling ceiling), or,
// past max_retries, dead-letter with MaxRetriesExceeded and the last error. In the transaction
// that records the failed attempt.
void
ScheduleRetry(Pass *pass, ApplyItem *it, const char *reason, const char *desc) {
	const SubConfig *cfg = pass->cfg;
	const ReceivedMessage *m = it->msg;
	int failed = it->attempts + 1;
	Datum a[9];
	char nl[9];
	bool keyed = RetryKey(cfg, m, a, nl);
	if (!keyed) // nothing to remember it by: the broker's delivery count stands in
		failed = std::max<int>(failed, static_cast<int>(m->delivery_count) + 1);
	if (failed > cfg->max_retries) {
		ErrorText d;
		FormatText(&d, "%d attempt%s failed; the last with %s: %s", failed, failed == 1 ? "" : "s", reason, desc);
		it->attempts = failed - 1;
		if (StopsSession(cfg, it)) {
			StopSession(pass, it, "MaxRetriesExceeded", d.c_str());
			return;
		}
		it->gave_up = true;
		SetReason(it, "MaxRetriesExceeded", d.c_str());
		Record(pass, it, kDeadLettered);
		return;
	}
	int shift = std::min(failed - 1, 30);
	int64 ceiling = std::min<int64>(cfg->retry_cap_ms, static_cast<int64>(cfg->retry_base_ms) << shift);
	int64 delay_ms = static_cast<int64>(pg_prng_uint64_range(&pg_global_prng_state, 0, static_cast<uint64>(ceiling)));
	it->status = kTransient;
	it->attempts = failed;
	it->next_attempt = GetCurrentTimestamp() + delay_ms * 1000;
	it->defer = cfg->can_defer && m->has_sequence_number && delay_ms > cfg->retry_hold_ms;
	SetReason(it, reason, desc);
	if (keyed) {
		ErrorText err;
		FormatText(&err, "%s: %s", reason, desc);
		a[3] = Int32GetDatum(failed);
		a[4] = TimestampTzGetDatum(it->next_attempt);
		a[5] = CStringGetTextDatum(err.c_str());
		a[6] = BoolGetDatum(it->defer || m->fetched); // a fetched message stays deferred on the broker
		SessionColumns(m, false, a, nl);
		nl[3] = nl[4] = nl[5] = nl[6] = ' ';
		spi::Exec(m->has_sequence_number ? kUpsertBySeq : kUpsertById, a, nl, SPI_OK_INSERT);
	}
	Notify(pass, it);
}

// The reason of a permanent failure (docs/retries.md): PermissionDenied for SQLSTATE 42501;
// MappingError when the message's declarative mapping raised it; HandlerError otherwise, which
// takes in an upcast's failure (docs/schemas.md) and a failure at COMMIT after the mapping or the
// handler returned.
const char *
FailureReason(const ApplyItem *it, int sqlerrcode) {
	if (sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE)
		return "PermissionDenied";
	return it->in_mapping ? "MappingError" : "HandlerError";
}

} // namespace

bool
IsTransient(int sqlerrcode) {
	switch (ERRCODE_TO_CATEGORY(sqlerrcode)) {
	case ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK):   // 40: serialization, deadlock
	case ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES): // 53: disk full, out of memory
	case ERRCODE_TO_CATEGORY(ERRCODE_PROGRAM_LIMIT_EXCEEDED): // 54: statement too complex, stack depth
	case ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION):  // 57: query canceled, shutdown
	case ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR):           // 58: I/O
	case ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_EXCEPTION):   // 08: remote servers
	case ERRCODE_TO_CATEGORY(ERRCODE_INTERNAL_ERROR):         // XX
		return true;
	default:
		break;
	}
	return sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE || sqlerrcode == ERRCODE_OBJECT_IN_USE; // 55P03, 55006
}

void
LookupRetries(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	KeySet keys;
	CollectKeys(cfg, items, lo, hi, true, &keys);
	TimestampTz now = GetCurrentTimestamp();
	// Rows to mark deferred, after the scan (not while it reads the table).
	int *mark = static_cast<int *>(palloc(sizeof(int) * (hi - lo + 1)));
	int nmark = 0;
	ForEachKeyRow(KeyTable::kRetries, keys, [&](TupleTableSlot *slot) {
		bool seq_null, null;
		int64 seq = DatumGetInt64(KeyColumn(KeyTable::kRetries, slot, "sequence_number", &seq_null));
		Datum d = KeyColumn(KeyTable::kRetries, slot, "message_id", &null);
		char *mid = null ? nullptr : TextDatumGetCString(d);
		int attempts = DatumGetInt32(KeyColumn(KeyTable::kRetries, slot, "attempts", &null));
		TimestampTz next = DatumGetTimestampTz(KeyColumn(KeyTable::kRetries, slot, "next_attempt_at", &null));
		bool deferred = DatumGetBool(KeyColumn(KeyTable::kRetries, slot, "deferred", &null));
		// sbpg.resume_session(..., dead_letter => true): dead-letter a stopped message, for the reason
		// it stopped its session ("Reason: description").
		bool dead_letter = DatumGetBool(KeyColumn(KeyTable::kRetries, slot, "dead_letter", &null)) && !null;
		Datum err = KeyColumn(KeyTable::kRetries, slot, "last_error", &null);
		char *last_error = dead_letter && !null ? TextDatumGetCString(err) : nullptr;
		for (int i = lo; i < hi; ++i) {
			ApplyItem *it = &items[i];
			const ReceivedMessage *m = it->msg;
			if (it->status == kDuplicate || MatchKey(m, seq_null, seq, mid) != kSame)
				continue;
			it->attempts = attempts;
			if (last_error) {
				it->resume_dead_letter = true;
				it->failed_error.Set(last_error);
			}
			if (next <= now)
				continue;
			// Back before its time (a lost lock, a restart, a deferral undone): wait again.
			it->status = kDelayed;
			it->next_attempt = next;
			it->defer = cfg->can_defer && m->has_sequence_number && (next - now) / 1000 > cfg->retry_hold_ms;
			if (it->defer && !deferred && nmark < hi - lo)
				mark[nmark++] = i;
		}
	});
	for (int k = 0; k < nmark; ++k) {
		Datum a[2];
		int which = RowKey(cfg, items[mark[k]].msg, a);
		if (which >= 0)
			spi::Exec(kMarkDeferred[which], a, nullptr, SPI_OK_UPDATE);
	}
}

void
LookupStoppedSessions(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	int n = 0;
	for (int i = lo; i < hi; ++i)
		n += items[i].msg->in_session && items[i].status == kPending;
	if (n == 0)
		return;
	Datum *sids = static_cast<Datum *>(palloc(sizeof(Datum) * n));
	int k = 0;
	for (int i = lo; i < hi; ++i)
		if (items[i].msg->in_session && items[i].status == kPending)
			sids[k++] = CStringGetTextDatum(items[i].msg->session_id.c_str());
	Datum args[2] = {CStringGetTextDatum(cfg->name),
	                 PointerGetDatum(construct_array(sids, n, TEXTOID, -1, false, TYPALIGN_INT))};
	spi::SpiResult r = spi::Exec(kStoppedSessions, args, nullptr, SPI_OK_SELECT);
	int c_sid = r.Col("session_id"), c_first = r.Col("first");
	for (uint64 row = 0; row < r.rows; ++row) {
		char *sid = r.Text(row, c_sid);
		int64 first = r.Int64(row, c_first);
		for (int i = lo; i < hi; ++i) {
			ApplyItem *it = &items[i];
			const ReceivedMessage *m = it->msg;
			if (it->status != kPending || !m->in_session || !m->has_sequence_number || m->sequence_number <= first ||
			    m->session_id != sid)
				continue;
			it->status = kDelayed;
			it->next_attempt = DT_NOEND;
			it->defer = false;
		}
	}
}

void
DeleteRetry(const SubConfig *cfg, const ApplyItem *it) {
	Datum a[2];
	int which = RowKey(cfg, it->msg, a);
	if (which < 0)
		return;
	if (it->msg->fetched && it->msg->has_sequence_number) {
		// Still deferred on the broker until the settlement is confirmed: if it is lost, the row
		// brings the message back (as a duplicate) a minute later.
		spi::Exec(kAwaitSettlement, a, nullptr, SPI_OK_UPDATE);
		return;
	}
	spi::Exec(kDelete[which], a, nullptr, SPI_OK_DELETE);
}

void
FailItem(Pass *pass, ApplyItem *it, int sqlerrcode, const char *desc) {
	const SubConfig *cfg = pass->cfg;
	if (it->timed_out) {
		ErrorText d;
		FormatText(&d, "the handler ran longer than handler_timeout_ms (%d ms) and was cancelled: %s",
		           cfg->handler_timeout_ms, desc);
		ScheduleRetry(pass, it, "HandlerTimeout", d.c_str());
		return;
	}
	if (IsTransient(sqlerrcode)) {
		ScheduleRetry(pass, it, "TransientError", desc);
		return;
	}
	ErrorText full;
	full.Set(desc);
	const char *reason = FailureReason(it, sqlerrcode);
	if (it->in_mapping && ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_TO_CATEGORY(ERRCODE_DATA_EXCEPTION)) {
		// A mapping's data error names the column and the value that failed.
		char *what = DiagnoseMapping(pass, it);
		if (what)
			FormatText(&full, "%s (SQLSTATE %s)", what, unpack_sql_state(sqlerrcode));
	}
	if (StopsSession(cfg, it)) {
		StopSession(pass, it, reason, full.c_str());
		return;
	}
	SetReason(it, reason, full.c_str());
	Record(pass, it, kDeadLettered);
}

int
DueDeferred(const SubConfig *cfg, int64 *out, int max) {
	int got = 0;
	spi::ShortTransaction([&] {
		// With several workers, each asks for its share (by sequence number), so that two do not
		// fetch the same message; a message a minute overdue (its worker is not running) is
		// anyone's.
		Oid types[4] = {TEXTOID, INT4OID, INT8OID, INT8OID};
		Datum args[4] = {CStringGetTextDatum(cfg->name), Int32GetDatum(max), Int64GetDatum(std::max(1, cfg->workers)),
		                 Int64GetDatum(cfg->worker)};
		spi::SpiResult res = spi::ExecSql("read sbpg.retries",
		                                  "SELECT sequence_number FROM sbpg.retries WHERE subscription" OP_EQ
		                                  "$1 AND deferred AND sequence_number IS "
		                                  "NOT NULL AND next_attempt_at" OP_LE
		                                  "pg_catalog.now() AND ((sequence_number OPERATOR(pg_catalog.%) $3)" OP_EQ
		                                  "$4 OR next_attempt_at" OP_LT "(pg_catalog.now()" OP_MINUS
		                                  "interval '1 minute')) ORDER BY next_attempt_at USING" OP_LT "LIMIT $2",
		                                  4, types, args, nullptr, SPI_OK_SELECT);
		int seq_col = res.Col("sequence_number");
		for (uint64 r = 0; r < res.rows && got < max; ++r)
			out[got++] = res.Int64(r, seq_col);
	});
	return got;
}

void
PostponeDeferred(const SubConfig *cfg, int64 seq) {
	spi::ShortTransaction([&] {
		Oid types[2] = {TEXTOID, INT8OID};
		Datum args[2] = {CStringGetTextDatum(cfg->name), Int64GetDatum(seq)};
		spi::ExecSql("update sbpg.retries",
		             "UPDATE sbpg.retries SET next_attempt_at = pg_catalog.now()" OP_PLUS "interval '1 minute' "
		             "WHERE subscription" OP_EQ "$1 AND sequence_number" OP_EQ "$2 AND deferred",
		             2, types, args, nullptr, SPI_OK_UPDATE);
	});
}

} // namespace sbpg::pg
