// src/pg/apply.cpp
//   One batch, one transaction. For each message: the inbox says whether it was already decided
//   (a redelivery is settled again with the recorded outcome, never applied twice); otherwise the
//   handler runs as run_as, in a security-restricted context with run_as's search_path, with the
//   message as a parameter; the outcome goes to sbpg.inbox and to NOTIFY in the same transaction.
//
//   The batch first runs without savepoints (one subtransaction-free transaction, so the 64-entry
//   subtransaction cache never overflows in the common case). If anything fails, it is rolled
//   back and the batch runs again message by message, each in a subtransaction, at most
//   kMaxSubxacts per transaction: a failing message then undoes only its own work. After COMMIT
//   the commit record is flushed before the caller may settle anything.
//
//   Everything here runs inside PgGuard and owns no C++ objects with destructors.
#include "sbpg/core/text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "common/pg_prng.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"
#include "utils/xid8.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"

#include <algorithm>
#include <cstring>
#include <ctime>

namespace sbpg::pg {

namespace {

constexpr int kMaxSubxacts = 50; // per transaction in the isolated pass (the cache holds 64)
constexpr size_t kNotifyIdMax = 512; // bytes of an id a NOTIFY payload carries (payloads stay < 8000 bytes)

// sbpg's own statements run in a session that belongs to the extension owner: every function,
// operator and type they name is schema-qualified, so nothing anyone creates (in public, in their
// own schemas, in pg_temp) can stand in for it, whatever the search_path (docs/security.md).
// OPERATOR(...) has one precedence for every operator, left-associative: parenthesize.
#define EQ " OPERATOR(pg_catalog.=) "
#define LT " OPERATOR(pg_catalog.<) "
#define LE " OPERATOR(pg_catalog.<=) "
#define MINUS " OPERATOR(pg_catalog.-) "
#define PLUS " OPERATOR(pg_catalog.+) "
#define GETTEXT " OPERATOR(pg_catalog.->>) "

SPIPlanPtr insert_plan = nullptr;
int applying = -1;      // the item ApplyOne is applying in a pass without subtransactions
int first_applied = -1; // the first item that pass ran
SPIPlanPtr lookup_plan = nullptr;
SPIPlanPtr stamp_plan = nullptr;
SPIPlanPtr retry_lookup_plan = nullptr;
SPIPlanPtr retry_upsert_seq_plan = nullptr;
SPIPlanPtr retry_upsert_id_plan = nullptr;
SPIPlanPtr retry_delete_plan = nullptr;
SPIPlanPtr retry_settling_plan = nullptr;
SPIPlanPtr retry_confirmed_plan = nullptr;
SPIPlanPtr upcast_plan = nullptr;
SPIPlanPtr mapping_plan = nullptr;
SPIPlanPtr retry_defer_plan = nullptr;
Oid cached_handler = InvalidOid;
FmgrInfo handler_finfo;
TupleDesc message_desc = nullptr;
Oid cached_type = InvalidOid;

char *
Dup(const char *s) {
	return s ? MemoryContextStrdup(TopMemoryContext, s) : nullptr;
}

char *
GetText(HeapTuple t, TupleDesc d, int col) {
	char *v = SPI_getvalue(t, d, col);
	return v ? Dup(v) : nullptr;
}

// Statements that search the inbox or the retries are planned at every execution, with the
// batch's values (CURSOR_OPT_CUSTOM_PLAN): a plan cached while the table was empty would scan it
// sequentially for ever after, and these run once per batch, not once per message.
SPIPlanPtr
Prepare(const char *sql, int nargs, Oid *types, bool searches = true) {
	SPIPlanPtr p = SPI_prepare_cursor(sql, nargs, types, searches ? CURSOR_OPT_CUSTOM_PLAN : 0);
	if (!p)
		elog(ERROR, "sbpg: cannot prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(p) != 0)
		elog(ERROR, "sbpg: cannot keep a prepared plan");
	return p;
}

void
EnsurePlans(const SubConfig *cfg) {
	if (!insert_plan) {
		Oid types[9] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, XID8OID, INT4OID};
		insert_plan = Prepare("INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, correlation_id, "
		                      "status, reason, delivery_count, xid, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
		                      9, types, false);
	}
	if (!retry_lookup_plan) {
		Oid types[3] = {TEXTOID, INT8ARRAYOID, TEXTARRAYOID};
		retry_lookup_plan = Prepare("SELECT sequence_number, message_id, attempts, next_attempt_at, deferred FROM sbpg.retries "
		                            "WHERE subscription" EQ "$1 AND (sequence_number" EQ "ANY ($2) "
		                            "OR (sequence_number IS NULL AND message_id" EQ "ANY ($3)))",
		                            3, types);
		Oid up[7] = {TEXTOID, INT8OID, TEXTOID, INT4OID, TIMESTAMPTZOID, TEXTOID, BOOLOID};
		const char *cols = "INSERT INTO sbpg.retries (subscription, sequence_number, message_id, attempts, next_attempt_at, "
		                   "last_error, deferred) VALUES ($1, $2, $3, $4, $5, $6, $7) ";
		const char *set = " DO UPDATE SET attempts = excluded.attempts, last_failed_at = pg_catalog.now(), "
		                  "next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error, deferred = excluded.deferred";
		char sql[1024];
		snprintf(sql, sizeof sql, "%sON CONFLICT (subscription, sequence_number) WHERE sequence_number IS NOT NULL%s", cols, set);
		retry_upsert_seq_plan = Prepare(sql, 7, up, false);
		snprintf(sql, sizeof sql, "%sON CONFLICT (subscription, message_id) WHERE sequence_number IS NULL%s", cols, set);
		retry_upsert_id_plan = Prepare(sql, 7, up, false);
		Oid del[3] = {TEXTOID, INT8OID, TEXTOID};
		retry_delete_plan = Prepare("DELETE FROM sbpg.retries WHERE subscription" EQ "$1 AND CASE WHEN $2::bigint IS NOT NULL "
		                            "THEN sequence_number" EQ "$2 ELSE sequence_number IS NULL AND message_id" EQ "$3 END",
		                            3, del);
		retry_defer_plan = Prepare("UPDATE sbpg.retries SET deferred = true WHERE subscription" EQ "$1 AND CASE WHEN "
		                           "$2::bigint IS NOT NULL THEN sequence_number" EQ "$2 ELSE sequence_number IS NULL AND "
		                           "message_id" EQ "$3 END",
		                           3, del);
		retry_settling_plan = Prepare("UPDATE sbpg.retries SET deferred = true, next_attempt_at = pg_catalog.now()" PLUS
		                              "interval '1 minute', "
		                              "last_error = 'outcome recorded; waiting for the broker to confirm its settlement' "
		                              "WHERE subscription" EQ "$1 AND sequence_number" EQ "$2",
		                              3, del);
	}
	if (!lookup_plan) {
		Oid types[3] = {TEXTOID, INT8ARRAYOID, TEXTARRAYOID};
		lookup_plan = Prepare("SELECT sequence_number, message_id, status, reason FROM sbpg.inbox "
		                      "WHERE subscription" EQ "$1 AND (sequence_number" EQ "ANY ($2) "
		                      "OR (sequence_number IS NULL AND message_id" EQ "ANY ($3)))",
		                      3, types);
	}
	if (!stamp_plan) {
		Oid types[3] = {TEXTOID, INT8ARRAYOID, TEXTARRAYOID};
		stamp_plan = Prepare("UPDATE sbpg.inbox SET settled_at = pg_catalog.now() WHERE subscription" EQ "$1 AND settled_at IS NULL "
		                     "AND (sequence_number" EQ "ANY ($2) OR (sequence_number IS NULL AND message_id" EQ "ANY ($3)))",
		                     3, types);
		// A deferred message's retry row lives until its settlement is confirmed: until then the
		// broker may still hold it deferred, and only the row remembers to fetch it again.
		retry_confirmed_plan = Prepare("DELETE FROM sbpg.retries WHERE subscription" EQ "$1 AND sequence_number" EQ "ANY ($2)",
		                               2, types);
	}
	if (!upcast_plan) {
		Oid types[2] = {TEXTOID, INT4OID};
		upcast_plan = Prepare("SELECT version, upcast::pg_catalog.oid FROM sbpg.schemas WHERE message_type" EQ "$1 AND version"
		                      " OPERATOR(pg_catalog.>=) $2 ORDER BY version USING" LT,
		                      2, types, false);
	}
	if (!mapping_plan) {
		Oid types[1] = {TEXTOID};
		mapping_plan = Prepare(
		    "SELECT message_type, target::pg_catalog.oid, action, key_columns, column_map, "
		    "'sbpg._apply_mapping(pg_catalog.regclass, pg_catalog.text, pg_catalog.text[], pg_catalog.jsonb, "
		    "pg_catalog.jsonb)'::pg_catalog.regprocedure::pg_catalog.oid, "
		    "'sbpg._diagnose_mapping(pg_catalog.regclass, pg_catalog.jsonb, pg_catalog.jsonb)'::pg_catalog.regprocedure"
		    "::pg_catalog.oid FROM sbpg.mappings WHERE subscription" EQ "$1",
		    1, types, false);
	}
	if (cached_type != cfg->message_type || !message_desc) {
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		message_desc = lookup_rowtype_tupdesc_copy(cfg->message_type, -1);
		MemoryContextSwitchTo(old);
		cached_type = cfg->message_type;
	}
}

Datum
Int8Array(const int64 *v, int n) {
	Datum *d = static_cast<Datum *>(palloc(sizeof(Datum) * (n > 0 ? n : 1)));
	for (int i = 0; i < n; ++i)
		d[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

Datum
TextArray(const char *const *v, int n) {
	Datum *d = static_cast<Datum *>(palloc(sizeof(Datum) * (n > 0 ? n : 1)));
	for (int i = 0; i < n; ++i)
		d[i] = CStringGetTextDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT));
}

void
Stamp(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	if (nseqs == 0 && nids == 0)
		return;
	Datum args[3] = {CStringGetTextDatum(cfg->name), Int8Array(seqs, nseqs), TextArray(ids, nids)};
	if (SPI_execute_plan(stamp_plan, args, nullptr, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "sbpg: cannot stamp settled_at");
	if (nseqs > 0 && SPI_execute_plan(retry_confirmed_plan, args, nullptr, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "sbpg: cannot update sbpg.retries");
}

bool
HandlerIsSecurityDefiner(Oid fn) {
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		return false;
	bool secdef = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup))->prosecdef;
	ReleaseSysCache(tup);
	return secdef;
}

// Whether the handler can run at all; false fills why.
bool
HandlerUsable(const SubConfig *cfg, char *why, size_t whylen) {
	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(cfg->handler))) {
		snprintf(why, whylen, "handler function (oid %u) no longer exists", cfg->handler);
		return false;
	}
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(cfg->run_as))) {
		snprintf(why, whylen, "run_as role (oid %u) no longer exists", cfg->run_as);
		return false;
	}
	// Checked again at run time: the role or the function may have changed since the
	// subscription was created.
	if (superuser_arg(cfg->run_as) && !cfg->allow_superuser) {
		snprintf(why, whylen,
		         "run_as role %s is a superuser; handlers run with exactly run_as's rights (a superuser may allow it with "
		         "the subscription option allow_superuser_run_as)",
		         cfg->run_as_name);
		return false;
	}
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(cfg->handler));
	if (HeapTupleIsValid(tup)) {
		Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup));
		bool shape_ok = proc->prokind == PROKIND_FUNCTION && proc->pronargs == 1 &&
		                proc->proargtypes.values[0] == cfg->message_type && proc->prorettype == VOIDOID && !proc->proretset;
		ReleaseSysCache(tup);
		if (!shape_ok) {
			snprintf(why, whylen, "handler %s is no longer a function (sbpg.message) RETURNS void",
			         format_procedure(cfg->handler));
			return false;
		}
	}
	Oid admin = get_role_oid("sbpg_admin", true);
	if (OidIsValid(admin) && !superuser_arg(cfg->run_as) && has_privs_of_role(cfg->run_as, admin)) {
		snprintf(why, whylen, "run_as role %s has the privileges of sbpg_admin; code that messages drive must not manage sbpg",
		         cfg->run_as_name);
		return false;
	}
	if (HandlerIsSecurityDefiner(cfg->handler)) {
		snprintf(why, whylen, "handler %s is SECURITY DEFINER and would run as its owner, not as %s",
		         format_procedure(cfg->handler), cfg->run_as_name);
		return false;
	}
	if (pg_proc_aclcheck(cfg->handler, cfg->run_as, ACL_EXECUTE) != ACLCHECK_OK) {
		snprintf(why, whylen, "run_as role %s may not execute handler %s", cfg->run_as_name,
		         format_procedure(cfg->handler));
		return false;
	}
	if (cached_handler != cfg->handler) {
		fmgr_info_cxt(cfg->handler, &handler_finfo, TopMemoryContext);
		cached_handler = cfg->handler;
	}
	return true;
}

// The arguments of an inbox or retries search over items[lo..hi): $1 the subscription, $2 the
// sequence numbers, $3 the message ids of messages without one. False when there is nothing to
// search for. Duplicates already found are left out when skip_duplicates.
bool
KeyArgs(const SubConfig *cfg, const ApplyItem *items, int lo, int hi, bool skip_duplicates, Datum args[3]) {
	int n = hi - lo;
	int64 *seqs = static_cast<int64 *>(palloc(sizeof(int64) * (n + 1)));
	const char **ids = static_cast<const char **>(palloc(sizeof(char *) * (n + 1)));
	int nseqs = 0, nids = 0;
	for (int i = lo; i < hi; ++i) {
		const ReceivedMessage *m = items[i].msg;
		if (skip_duplicates && items[i].status == kDuplicate)
			continue;
		if (m->has_sequence_number)
			seqs[nseqs++] = m->sequence_number;
		else if (!m->message_id.empty())
			ids[nids++] = m->message_id.c_str();
	}
	if (nseqs == 0 && nids == 0)
		return false;
	args[0] = CStringGetTextDatum(cfg->name);
	args[1] = Int8Array(seqs, nseqs);
	args[2] = TextArray(ids, nids);
	return true;
}

// How a stored row (sequence number or NULL, message id as stored) relates to a message.
enum KeyMatch { kOther, kSame, kStale /* same sequence number, another message id */ };

KeyMatch
MatchKey(const ReceivedMessage *m, bool seq_null, int64 seq, const char *mid) {
	// Message ids compare as stored: text ends at the first NUL.
	const char *id = m->message_id.c_str();
	if (seq_null)
		return !m->has_sequence_number && mid && strcmp(id, mid) == 0 ? kSame : kOther;
	if (!m->has_sequence_number || m->sequence_number != seq)
		return kOther;
	// The same sequence number for another message: the entity was recreated, or the broker lost
	// its state. A redelivery always keeps its message id.
	return (mid ? strcmp(id, mid) == 0 : *id == '\0') ? kSame : kStale;
}

void
LookupDuplicates(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	Datum args[3];
	if (!KeyArgs(cfg, items, lo, hi, false, args))
		return;
	if (SPI_execute_plan(lookup_plan, args, nullptr, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "sbpg: cannot read sbpg.inbox");
	for (uint64 r = 0; r < SPI_processed; ++r) {
		HeapTuple t = SPI_tuptable->vals[r];
		TupleDesc d = SPI_tuptable->tupdesc;
		bool seq_null, isnull;
		int64 seq = DatumGetInt64(SPI_getbinval(t, d, 1, &seq_null));
		char *mid = SPI_getvalue(t, d, 2);
		char *status = SPI_getvalue(t, d, 3);
		char *reason = SPI_getvalue(t, d, 4);
		(void)isnull;
		for (int i = lo; i < hi; ++i) {
			KeyMatch k = MatchKey(items[i].msg, seq_null, seq, mid);
			if (k == kStale)
				items[i].stale = true;
			if (k != kSame)
				continue;
			items[i].status = kDuplicate;
			items[i].recorded = strcmp(status, "applied") == 0 ? kApplied : kDeadLettered;
			// The recorded reason is "Reason: description".
			items[i].reason[0] = items[i].description[0] = '\0';
			if (reason) {
				const char *colon = strstr(reason, ": ");
				if (colon) {
					size_t rl = std::min<size_t>(colon - reason, sizeof items[i].reason - 1);
					memcpy(items[i].reason, reason, rl);
					items[i].reason[rl] = '\0';
					CopyUtf8(items[i].description, colon + 2, sizeof items[i].description);
				} else {
					CopyUtf8(items[i].reason, reason, sizeof items[i].reason);
				}
			}
		}
	}
}

// The key columns ($2 sequence number, $3 message id) of a message's sbpg.retries row.
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

// Inbox and retry rows left by another message with the same sequence number go, with a warning.
void
ReplaceStale(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	for (int i = lo; i < hi; ++i) {
		ApplyItem *it = &items[i];
		if (!it->stale)
			continue;
		Oid types[2] = {TEXTOID, INT8OID};
		Datum args[2] = {CStringGetTextDatum(cfg->name), Int64GetDatum(it->msg->sequence_number)};
		SPI_execute_with_args("DELETE FROM sbpg.inbox WHERE subscription" EQ "$1 AND sequence_number" EQ "$2", 2, types,
		                      args, nullptr, false, 0);
		SPI_execute_with_args("DELETE FROM sbpg.retries WHERE subscription" EQ "$1 AND sequence_number" EQ "$2", 2, types,
		                      args, nullptr, false, 0);
		ereport(WARNING,
		        (errmsg("sbpg: subscription \"%s\": sequence number " INT64_FORMAT
		                " was recorded for another message; the entity was recreated or the broker lost its state",
		                cfg->name, it->msg->sequence_number),
		         errdetail("Message \"%s\" is applied; the inbox row of the earlier message with that sequence number is replaced.",
		                   it->msg->message_id.c_str())));
	}
}

// Loads earlier failed attempts; a message whose next attempt is still to come is kDelayed.
void
LookupRetries(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	Datum args[3];
	if (!KeyArgs(cfg, items, lo, hi, true, args))
		return;
	if (SPI_execute_plan(retry_lookup_plan, args, nullptr, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "sbpg: cannot read sbpg.retries");
	SPITupleTable *tt = SPI_tuptable;
	uint64 rows = SPI_processed;
	TimestampTz now = GetCurrentTimestamp();
	for (uint64 r = 0; r < rows; ++r) {
		HeapTuple t = tt->vals[r];
		TupleDesc d = tt->tupdesc;
		bool seq_null, isnull;
		int64 seq = DatumGetInt64(SPI_getbinval(t, d, 1, &seq_null));
		char *mid = SPI_getvalue(t, d, 2);
		int attempts = DatumGetInt32(SPI_getbinval(t, d, 3, &isnull));
		TimestampTz next = DatumGetTimestampTz(SPI_getbinval(t, d, 4, &isnull));
		bool deferred = DatumGetBool(SPI_getbinval(t, d, 5, &isnull));
		for (int i = lo; i < hi; ++i) {
			ApplyItem *it = &items[i];
			const ReceivedMessage *m = it->msg;
			if (it->status == kDuplicate || MatchKey(m, seq_null, seq, mid) != kSame)
				continue;
			it->attempts = attempts;
			if (next <= now)
				continue;
			// Back before its time (a lost lock, a restart, a deferral undone): wait again.
			it->status = kDelayed;
			it->next_attempt = next;
			it->defer = cfg->can_defer && m->has_sequence_number && (next - now) / 1000 > cfg->retry_hold_ms;
			if (it->defer && !deferred) {
				Datum a[3];
				char nl[3];
				RetryKey(cfg, m, a, nl);
				if (SPI_execute_plan(retry_defer_plan, a, nl, false, 0) != SPI_OK_UPDATE)
					elog(ERROR, "sbpg: cannot update sbpg.retries");
			}
		}
	}
}

void
DeleteRetry(const SubConfig *cfg, const ApplyItem *it) {
	Datum a[3];
	char nl[3];
	if (!RetryKey(cfg, it->msg, a, nl))
		return;
	if (it->msg->fetched && it->msg->has_sequence_number) {
		// Still deferred on the broker until the settlement is confirmed: if it is lost, the row
		// brings the message back (as a duplicate) a minute later.
		if (SPI_execute_plan(retry_settling_plan, a, nl, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "sbpg: cannot update sbpg.retries");
		return;
	}
	if (SPI_execute_plan(retry_delete_plan, a, nl, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "sbpg: cannot update sbpg.retries");
}

const char *
StatusName(int status) {
	switch (status) {
	case kApplied:
		return "applied";
	case kDeadLettered:
		return "dead_lettered";
	case kDuplicate:
		return "duplicate";
	case kDelayed:
		return "delayed";
	default:
		return "retry";
	}
}

// An id in a NOTIFY payload: JSON, at most kNotifyIdMax bytes of it (cut on a character boundary
// and marked with "…"), so a payload can never reach PostgreSQL's 8000-byte limit.
void
AppendId(StringInfo b, const std::string &id) {
	if (id.empty()) {
		appendStringInfoString(b, "null");
		return;
	}
	if (id.size() <= kNotifyIdMax) {
		escape_json(b, id.c_str());
		return;
	}
	size_t keep = Utf8Prefix(id, kNotifyIdMax);
	char *cut = static_cast<char *>(palloc(keep + 4));
	memcpy(cut, id.data(), keep);
	memcpy(cut + keep, "\xE2\x80\xA6", 4); // …
	escape_json(b, cut);
	pfree(cut);
}

// The confirmation of one message on the subscription's channel. Any database user can LISTEN
// to any channel, so it carries ids, the status, the transaction and a reason *code* only; the
// description (which may quote row data) stays in sbpg.inbox. Skipped, with a WARNING once per
// batch, while the NOTIFY queue is nearly full (a listener that stopped reading): a full queue
// would fail the COMMIT, and an outcome must always be recorded.
bool notify_skipped = false; // this pass skips notifications (queue nearly full)

void
Notify(const SubConfig *cfg, const ApplyItem *it, uint64 xid) {
	if (!cfg->notify_channel || notify_skipped)
		return;
	const ReceivedMessage *m = it->msg;
	StringInfoData b;
	initStringInfo(&b);
	appendStringInfoString(&b, "{\"subscription\":");
	escape_json(&b, cfg->name);
	appendStringInfoString(&b, ",\"message_id\":");
	AppendId(&b, m->message_id);
	appendStringInfoString(&b, ",\"correlation_id\":");
	AppendId(&b, m->correlation_id);
	if (m->has_sequence_number)
		appendStringInfo(&b, ",\"sequence_number\":" INT64_FORMAT, m->sequence_number);
	else
		appendStringInfoString(&b, ",\"sequence_number\":null");
	appendStringInfo(&b, ",\"status\":\"%s\",\"xid\":\"" UINT64_FORMAT "\"", StatusName(it->status), xid);
	if (it->status == kTransient) {
		// attempt: the one that just failed; next_attempt_at: when the next one runs.
		appendStringInfo(&b, ",\"attempt\":%d,\"next_attempt_at\":", it->attempts);
		escape_json(&b, timestamptz_to_str(it->next_attempt));
		appendStringInfo(&b, ",\"deferred\":%s", it->defer ? "true" : "false");
	} else if (it->status == kApplied || it->status == kDeadLettered) {
		appendStringInfo(&b, ",\"attempts\":%d", it->attempts + 1);
	}
	bool has_reason = it->status == kDeadLettered || it->status == kTransient ||
	                  (it->status == kDuplicate && it->recorded == kDeadLettered);
	appendStringInfoString(&b, ",\"reason\":");
	if (has_reason && it->reason[0])
		escape_json(&b, it->reason); // a code: HandlerError, InvalidJson, MaxRetriesExceeded, ...
	else
		appendStringInfoString(&b, "null");
	appendStringInfoChar(&b, '}');
	Async_Notify(cfg->notify_channel, b.data);
	pfree(b.data);
}

// Whether this pass notifies: not while the NOTIFY queue is more than 90% full.
void
CheckNotifyQueue(const SubConfig *cfg) {
	notify_skipped = false;
	if (!cfg->notify_channel)
		return;
	LOCAL_FCINFO(fcinfo, 0);
	InitFunctionCallInfoData(*fcinfo, nullptr, 0, InvalidOid, nullptr, nullptr);
	double usage = DatumGetFloat8(pg_notification_queue_usage(fcinfo));
	if (usage > 0.9 || (guc_test_fault && strcmp(guc_test_fault, "notify_queue_full") == 0)) {
		notify_skipped = true;
		ereport(WARNING, (errmsg("sbpg: subscription \"%s\": the NOTIFY queue is %.0f%% full; outcomes are recorded in "
		                         "sbpg.inbox without notifications until it drains",
		                         cfg->name, usage * 100),
		                  errhint("A session that LISTENs and stopped reading holds the queue; "
		                          "pg_stat_activity shows it.")));
	}
}

void
InsertInbox(const SubConfig *cfg, const ApplyItem *it, uint64 xid) {
	const ReceivedMessage *m = it->msg;
	Datum args[9];
	char nulls[9];
	memset(nulls, ' ', sizeof nulls);
	args[0] = CStringGetTextDatum(cfg->name);
	args[1] = Int64GetDatum(m->sequence_number);
	if (!m->has_sequence_number)
		nulls[1] = 'n';
	args[2] = m->message_id.empty() ? (nulls[2] = 'n', Datum(0)) : CStringGetTextDatum(m->message_id.c_str());
	args[3] = m->correlation_id.empty() ? (nulls[3] = 'n', Datum(0)) : CStringGetTextDatum(m->correlation_id.c_str());
	args[4] = CStringGetTextDatum(it->status == kApplied ? "applied" : "dead_lettered");
	if (it->status == kDeadLettered) {
		char reason[1200];
		snprintf(reason, sizeof reason, "%s: %s", it->reason, it->description);
		ClipUtf8(reason);
		args[5] = CStringGetTextDatum(reason);
	} else {
		nulls[5] = 'n';
		args[5] = 0;
	}
	args[6] = Int32GetDatum(static_cast<int32>(m->delivery_count));
	args[7] = FullTransactionIdGetDatum(FullTransactionIdFromU64(xid));
	args[8] = Int32GetDatum(it->attempts + 1);
	if (SPI_execute_plan(insert_plan, args, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "sbpg: cannot write sbpg.inbox");
}

void
Record(const SubConfig *cfg, ApplyItem *it, int status, uint64 xid) {
	it->status = status;
	InsertInbox(cfg, it, xid);
	if (it->attempts > 0 || it->msg->fetched)
		DeleteRetry(cfg, it);
	Notify(cfg, it, xid);
}

void
SetReason(ApplyItem *it, const char *reason, const char *description) {
	CopyUtf8(it->reason, reason, sizeof it->reason);
	CopyUtf8(it->description, description, sizeof it->description);
}

Datum
Text(const std::string &s, bool *isnull) {
	*isnull = s.empty();
	return s.empty() ? Datum(0) : PointerGetDatum(cstring_to_text_with_len(s.data(), static_cast<int>(s.size())));
}

// The sbpg.message value handed to the handler; body (when not 0) replaces the parsed body, and
// version is the schema version handed on (after upcasts).
Datum
BuildMessage(const SubConfig *cfg, const ReceivedMessage *m, Datum body, int version) {
	Datum v[16];
	bool n[16];
	memset(n, 0, sizeof n);
	v[0] = Text(m->message_id, &n[0]);
	v[1] = Text(m->correlation_id, &n[1]);
	v[2] = Text(m->session_id, &n[2]);
	v[3] = Text(m->subject, &n[3]);
	v[4] = Text(m->content_type, &n[4]);
	v[5] = Text(m->reply_to, &n[5]);
	if (body)
		v[6] = body;
	else if (m->json == JsonVerdict::Json)
		v[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	else
		n[6] = true;
	if (m->body_kind == BodyKind::None) {
		n[7] = true;
	} else {
		bytea *raw = static_cast<bytea *>(palloc(VARHDRSZ + m->raw_body.size()));
		SET_VARSIZE(raw, VARHDRSZ + m->raw_body.size());
		memcpy(VARDATA(raw), m->raw_body.data(), m->raw_body.size());
		v[7] = PointerGetDatum(raw);
	}
	v[8] = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->properties_json.c_str()));
	v[9] = Int64GetDatum(m->sequence_number);
	n[9] = !m->has_sequence_number;
	if (m->enqueued_ms > 0) {
		TimestampTz ts = static_cast<TimestampTz>(m->enqueued_ms) * 1000 -
		                 static_cast<TimestampTz>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * USECS_PER_SEC;
		v[10] = TimestampTzGetDatum(ts);
	} else {
		n[10] = true;
	}
	v[11] = Int32GetDatum(static_cast<int32>(m->delivery_count));
	v[12] = Text(m->message_type, &n[12]);
	char ver[16];
	if (version > 0) {
		snprintf(ver, sizeof ver, "%d", version);
		v[13] = CStringGetTextDatum(ver);
	} else {
		n[13] = true;
		v[13] = 0;
	}
	v[14] = CStringGetTextDatum(cfg->name);
	if (m->schema_version > 0) {
		snprintf(ver, sizeof ver, "%d", m->schema_version);
		v[15] = CStringGetTextDatum(ver);
	} else {
		n[15] = true;
		v[15] = 0;
	}
	HeapTuple t = heap_form_tuple(message_desc, v, n);
	return HeapTupleGetDatum(t);
}

// The one context all tenant code runs in (handlers, upcasts, mappings, mapping diagnosis): run_as
// as the current user, a security-restricted operation (no SET ROLE, no temporary objects, no
// deferred triggers, no cursors WITH HOLD), run_as's search_path, sbpg._caller() = run_as, and a
// time limit. Leaving it restores every setting the tenant changed, session-level SETs included
// (GUC changes are undone as at an abort, the way PostgreSQL's own maintenance commands run a
// table owner's code). An error in between is cleaned up by the (sub)transaction's abort and by
// RunAsFailed.
//
// The time limit: one budget of handler_timeout_ms per message for its upcasts and its handler or
// mapping (ApplyOne), a fresh one for a diagnosis. At the deadline the statement is cancelled, and
// again every 100 ms while tenant code goes on (it may catch query_canceled); tenant code that
// returns after the deadline has failed all the same; and tenant code still running one more
// budget (at least a second) later ends the worker: its transaction rolls back and the broker
// delivers the message again.
struct RunAs {
	Oid save_user;
	int save_sec;
	int nest;
	Oid save_tenant;
};

TimestampTz message_deadline = 0; // the budget of the message ApplyOne applies
TimestampTz run_as_deadline = 0;  // the deadline of the tenant code running now
TimeoutId end_worker_timeout = MAX_TIMEOUTS;
volatile sig_atomic_t ended_by_limit = 0;

// A timeout handler (signal context): only flags.
void
EndWorker() {
	if (proc_exit_inprogress)
		return; // ending already, for another reason
	ended_by_limit = 1;
	ProcDiePending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

void
ErrorTimedOut(const SubConfig *cfg) {
	ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
	                errmsg("canceling statement due to the time limit of sbpg (handler_timeout_ms, %d ms)",
	                       cfg->handler_timeout_ms)));
}

void
EnterRunAs(const SubConfig *cfg, RunAs *r) {
	bool outermost = !OidIsValid(tenant_role);
	if (outermost) {
		TimestampTz now = GetCurrentTimestamp();
		run_as_deadline = message_deadline ? message_deadline : now + static_cast<int64>(cfg->handler_timeout_ms) * 1000;
		if (now >= run_as_deadline)
			ErrorTimedOut(cfg); // the message's budget went to its upcasts
	}
	GetUserIdAndSecContext(&r->save_user, &r->save_sec);
	r->save_tenant = tenant_role;
	r->nest = NewGUCNestLevel();
	tenant_role = cfg->run_as;
	SetUserIdAndSecContext(cfg->run_as, r->save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	if (cfg->search_path)
		(void)set_config_option("search_path", cfg->search_path, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0,
		                        false);
	if (outermost) {
		enable_timeout_every(STATEMENT_TIMEOUT, run_as_deadline, 100);
		if (end_worker_timeout == MAX_TIMEOUTS)
			end_worker_timeout = RegisterTimeout(USER_TIMEOUT, EndWorker);
		int64 grace_us = std::max<int64>(static_cast<int64>(cfg->handler_timeout_ms) * 1000, USECS_PER_SEC);
		enable_timeout_at(end_worker_timeout, run_as_deadline + grace_us);
	}
}

// Stops the timers of tenant code; a cancel they asked for and nobody took is dropped, so it
// cannot fail the worker's own next statement.
void
StopRunAsTimers() {
	if (!run_as_deadline)
		return;
	disable_timeout(STATEMENT_TIMEOUT, true);
	if (end_worker_timeout != MAX_TIMEOUTS)
		disable_timeout(end_worker_timeout, false);
	if (get_timeout_indicator(STATEMENT_TIMEOUT, true))
		QueryCancelPending = false;
}

void
LeaveRunAs(const SubConfig *cfg, const RunAs *r) {
	if (!OidIsValid(r->save_tenant)) {
		StopRunAsTimers();
		if (GetCurrentTimestamp() >= run_as_deadline)
			ErrorTimedOut(cfg); // returned, but late (or after catching the cancel)
		run_as_deadline = 0;
	}
	AtEOXact_GUC(false, r->nest);
	SetUserIdAndSecContext(r->save_user, r->save_sec);
	tenant_role = r->save_tenant;
}

// After an error escaped tenant code: the abort restores the user and the settings; this stops the
// timers and says whether it was the time limit that ended the tenant code.
bool
RunAsFailed(int sqlerrcode) {
	StopRunAsTimers();
	bool timed_out = run_as_deadline != 0 && sqlerrcode == ERRCODE_QUERY_CANCELED && GetCurrentTimestamp() >= run_as_deadline;
	run_as_deadline = 0;
	message_deadline = 0;
	tenant_role = InvalidOid;
	return timed_out;
}

// Calls a function of tenant code (at most 5 arguments; an argument is NULL where it is 0 and
// null_if_zero says so) in the run_as context. Returns its result; *isnull says whether it is NULL.
constexpr int kMaxTenantArgs = 5;

Datum
CallAsRunAs(const SubConfig *cfg, FmgrInfo *flinfo, int nargs, const Datum *args, bool null_if_zero, bool *isnull) {
	if (nargs > kMaxTenantArgs)
		elog(ERROR, "sbpg: a tenant function called with %d arguments (at most %d)", nargs, kMaxTenantArgs);
	RunAs r;
	EnterRunAs(cfg, &r);
	LOCAL_FCINFO(fcinfo, kMaxTenantArgs);
	InitFunctionCallInfoData(*fcinfo, flinfo, nargs, InvalidOid, nullptr, nullptr);
	for (int k = 0; k < nargs && k < kMaxTenantArgs; ++k) {
		fcinfo->args[k].value = args[k];
		fcinfo->args[k].isnull = null_if_zero && args[k] == 0;
	}
	Datum res = FunctionCallInvoke(fcinfo);
	*isnull = fcinfo->isnull;
	LeaveRunAs(cfg, &r);
	return res;
}

void
CallHandler(const SubConfig *cfg, Datum msg) {
	bool isnull;
	(void)CallAsRunAs(cfg, &handler_finfo, 1, &msg, false, &isnull);
}

// Runs one upcast, (jsonb) RETURNS jsonb, as run_as in the handler's restricted context.
//
// An upcast is chosen by the message type's owner, not by the subscription's: it runs only when
// its owner could act as run_as anyway (a member of run_as, or a superuser), so no team's code
// ever runs with another team's rights (docs/security.md).
Datum
CallUpcast(const SubConfig *cfg, Oid fn, Datum body) {
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_FUNCTION), errmsg("upcast (oid %u) no longer exists", fn)));
	Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup));
	Oid owner = proc->proowner;
	bool shape_ok = proc->prokind == PROKIND_FUNCTION && proc->pronargs == 1 && proc->proargtypes.values[0] == JSONBOID &&
	                proc->prorettype == JSONBOID && !proc->proretset;
	bool definer = proc->prosecdef;
	ReleaseSysCache(tup);
	if (!shape_ok)
		ereport(ERROR, (errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
		                errmsg("upcast %s is no longer a function (jsonb) RETURNS jsonb", format_procedure(fn))));
	if (definer)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		                errmsg("upcast %s is SECURITY DEFINER and would run as its owner", format_procedure(fn))));
	if (!superuser_arg(owner) && !has_privs_of_role(owner, cfg->run_as))
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		                errmsg("upcast %s is owned by %s, who may not act as run_as role %s", format_procedure(fn),
		                       GetUserNameFromId(owner, false), cfg->run_as_name),
		                errdetail("An upcast is chosen by its message type's owner and runs with the subscription's rights."),
		                errhint("GRANT %s TO %s if that role may write what %s writes, or have the upcast owned by a "
		                        "member of %s.",
		                        cfg->run_as_name, GetUserNameFromId(owner, false), cfg->run_as_name, cfg->run_as_name)));
	if (pg_proc_aclcheck(fn, cfg->run_as, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		                errmsg("run_as role %s may not execute upcast %s", cfg->run_as_name, format_procedure(fn)),
		                errhint("GRANT EXECUTE ON FUNCTION %s TO %s.", format_procedure(fn), cfg->run_as_name)));
	FmgrInfo flinfo;
	fmgr_info(fn, &flinfo);
	bool isnull;
	Datum out = CallAsRunAs(cfg, &flinfo, 1, &body, false, &isnull);
	if (isnull)
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("upcast %s returned NULL", format_procedure(fn))));
	return out;
}

// Brings a validated body from the version it carried towards the newest version: the upcast
// registered with each later version turns the version before it into its shape; a version
// without one is a gap that ends the chain (docs/schemas.md). Returns the version handed on;
// *body holds the result.
int
Upcast(const SubConfig *cfg, const ReceivedMessage *m, Datum *body) {
	if (!cfg->validate_schemas || m->message_type.empty() || m->schema_version <= 0 ||
	    m->schema_version >= m->latest_version || m->json != JsonVerdict::Json)
		return m->schema_version; // already the newest shape: no catalog lookup for it
	Datum args[2] = {CStringGetTextDatum(m->message_type.c_str()), Int32GetDatum(m->schema_version)};
	if (SPI_execute_plan(upcast_plan, args, nullptr, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "sbpg: cannot read sbpg.schemas");
	int n = static_cast<int>(SPI_processed);
	if (n <= 1)
		return m->schema_version;
	int *versions = static_cast<int *>(palloc(sizeof(int) * n));
	Oid *fns = static_cast<Oid *>(palloc(sizeof(Oid) * n));
	for (int i = 0; i < n; ++i) {
		bool isnull;
		versions[i] = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		Datum f = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);
		fns[i] = isnull ? InvalidOid : DatumGetObjectId(f);
	}
	int version = m->schema_version;
	if (versions[0] != version)
		return version;
	Datum b = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	for (int i = 1; i < n && OidIsValid(fns[i]); ++i) {
		b = CallUpcast(cfg, fns[i], b);
		version = versions[i];
	}
	*body = b;
	return version;
}

// The subscription's declarative mappings, read once per pass (LoadMappings) into the
// transaction's memory; ApplyMapping looks a message's type up in them.
struct Mapping {
	char *message_type;
	Datum target, action, keys, column_map; // keys is 0 when NULL
};
Mapping *mappings = nullptr;
int nmappings = 0;
Oid apply_mapping_fn = InvalidOid;
Oid diagnose_mapping_fn = InvalidOid;

void
LoadMappings(const SubConfig *cfg) {
	mappings = nullptr;
	nmappings = 0;
	if (!cfg->validate_schemas) // without a type, no message can be mapped
		return;
	Datum args[1] = {CStringGetTextDatum(cfg->name)};
	if (SPI_execute_plan(mapping_plan, args, nullptr, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "sbpg: cannot read sbpg.mappings");
	if (SPI_processed == 0)
		return;
	MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
	mappings = static_cast<Mapping *>(palloc0(sizeof(Mapping) * SPI_processed));
	for (uint64 r = 0; r < SPI_processed; ++r) {
		HeapTuple t = SPI_tuptable->vals[r];
		TupleDesc d = SPI_tuptable->tupdesc;
		bool isnull;
		Mapping *mp = &mappings[nmappings++];
		mp->message_type = SPI_getvalue(t, d, 1);
		mp->target = SPI_getbinval(t, d, 2, &isnull);
		mp->action = datumCopy(SPI_getbinval(t, d, 3, &isnull), false, -1);
		Datum keys = SPI_getbinval(t, d, 4, &isnull);
		mp->keys = isnull ? 0 : datumCopy(keys, false, -1);
		mp->column_map = datumCopy(SPI_getbinval(t, d, 5, &isnull), false, -1);
		apply_mapping_fn = DatumGetObjectId(SPI_getbinval(t, d, 6, &isnull));
		diagnose_mapping_fn = DatumGetObjectId(SPI_getbinval(t, d, 7, &isnull));
	}
	MemoryContextSwitchTo(old);
}

// A declarative mapping for the message's type, if the subscription has one: applies it (as
// run_as, in the handler's restricted context) and returns true.
const Mapping *
FindMapping(const ReceivedMessage *m) {
	for (int i = 0; i < nmappings && !m->message_type.empty(); ++i)
		if (strcmp(mappings[i].message_type, m->message_type.c_str()) == 0)
			return &mappings[i];
	return nullptr;
}

bool
ApplyMapping(const SubConfig *cfg, ApplyItem *it, Datum body) {
	const ReceivedMessage *m = it->msg;
	const Mapping *mp = FindMapping(m);
	if (!mp)
		return false;
	it->mapped = true;
	if (!body && m->json == JsonVerdict::Json)
		body = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	FmgrInfo flinfo;
	fmgr_info(apply_mapping_fn, &flinfo);
	Datum args[5] = {mp->target, mp->action, mp->keys, mp->column_map, body};
	bool isnull;
	(void)CallAsRunAs(cfg, &flinfo, 5, args, true, &isnull);
	return true;
}

double
MsSince(const struct timespec &t0) {
	struct timespec t1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (t1.tv_sec - t0.tv_sec) * 1000.0 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
}

// Applies one message in the current (sub)transaction. Errors propagate.
void
ApplyOne(const SubConfig *cfg, ApplyItem *it, uint64 xid, MemoryContext msgcxt) {
	const ReceivedMessage *m = it->msg;
	if (!m->decode_error.empty()) {
		SetReason(it, "MalformedMessage", m->decode_error.c_str());
		Record(cfg, it, kDeadLettered, xid);
		return;
	}
	if (m->json == JsonVerdict::Invalid) {
		char desc[1024];
		snprintf(desc, sizeof desc, "content type %s but the body is %s", m->content_type.c_str(), m->json_error.c_str());
		ClipUtf8(desc);
		SetReason(it, "InvalidJson", desc);
		Record(cfg, it, kDeadLettered, xid);
		return;
	}
	if (!m->schema_reason.empty()) {
		// Decided on the AMQP thread (docs/schemas.md): the handler is not called.
		SetReason(it, m->schema_reason.c_str(), m->schema_error.c_str());
		Record(cfg, it, kDeadLettered, xid);
		return;
	}
	MemoryContext old = MemoryContextSwitchTo(msgcxt);
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	Datum body = 0;
	message_deadline = GetCurrentTimestamp() + static_cast<int64>(cfg->handler_timeout_ms) * 1000;
	int version = Upcast(cfg, m, &body);
	if (!ApplyMapping(cfg, it, body)) {
		Datum msg = BuildMessage(cfg, m, body, version);
		CallHandler(cfg, msg);
	}
	message_deadline = 0;
	MemoryContextSwitchTo(old);
	it->apply_ms = MsSince(t0);
	Record(cfg, it, kApplied, xid);
	MemoryContextReset(msgcxt);
}

// Errors a retry may cure: concurrency, resources, the system; everything else is permanent.
bool
IsTransient(int sqlerrcode) {
	switch (ERRCODE_TO_CATEGORY(sqlerrcode)) {
	case ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK):    // 40: serialization, deadlock
	case ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES):  // 53: disk full, out of memory
	case ERRCODE_TO_CATEGORY(ERRCODE_PROGRAM_LIMIT_EXCEEDED):  // 54: statement too complex, stack depth
	case ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION):   // 57: query canceled, shutdown
	case ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR):            // 58: I/O
	case ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_EXCEPTION):    // 08: remote servers
	case ERRCODE_TO_CATEGORY(ERRCODE_INTERNAL_ERROR):          // XX
		return true;
	default:
		break;
	}
	return sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE || sqlerrcode == ERRCODE_OBJECT_IN_USE; // 55P03, 55006
}

// A transient failure: schedule another attempt (with full jitter under a doubling ceiling), or,
// past max_retries, dead-letter with MaxRetriesExceeded and the last error. In the transaction
// that records the failed attempt.
void
ScheduleRetry(const SubConfig *cfg, ApplyItem *it, const char *reason, const char *desc, uint64 xid) {
	const ReceivedMessage *m = it->msg;
	int failed = it->attempts + 1;
	Datum a[7];
	char nl[7];
	bool keyed = RetryKey(cfg, m, a, nl);
	if (!keyed) // nothing to remember it by: the broker's delivery count stands in
		failed = std::max<int>(failed, static_cast<int>(m->delivery_count) + 1);
	if (failed > cfg->max_retries) {
		char d[1024];
		snprintf(d, sizeof d, "%d attempt%s failed; the last with %s: %s", failed, failed == 1 ? "" : "s", reason, desc);
		ClipUtf8(d);
		it->attempts = failed - 1;
		it->gave_up = true;
		SetReason(it, "MaxRetriesExceeded", d);
		Record(cfg, it, kDeadLettered, xid);
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
		char err[1200];
		snprintf(err, sizeof err, "%s: %s", reason, desc);
		ClipUtf8(err);
		a[3] = Int32GetDatum(failed);
		a[4] = TimestampTzGetDatum(it->next_attempt);
		a[5] = CStringGetTextDatum(err);
		a[6] = BoolGetDatum(it->defer || m->fetched); // a fetched message stays deferred on the broker
		nl[3] = nl[4] = nl[5] = nl[6] = ' ';
		if (SPI_execute_plan(m->has_sequence_number ? retry_upsert_seq_plan : retry_upsert_id_plan, a, nl, false, 0) !=
		    SPI_OK_INSERT)
			elog(ERROR, "sbpg: cannot write sbpg.retries");
	}
	Notify(cfg, it, xid);
}

void
DescribeError(const ErrorData *e, char *out, size_t len) {
	if (e->detail)
		snprintf(out, len, "%s (SQLSTATE %s; %s)", e->message, unpack_sql_state(e->sqlerrcode), e->detail);
	else
		snprintf(out, len, "%s (SQLSTATE %s)", e->message, unpack_sql_state(e->sqlerrcode));
	ClipUtf8(out);
}

// Runs fn in a subtransaction of its own. When it raises, the subtransaction is rolled back and
// the error handed back in *err (the caller frees it). The caller's memory context and resource
// owner are current again either way; fn runs in the caller's memory context.
template <typename Fn>
bool
InSubtransaction(Fn &&fn, ErrorData **err) {
	MemoryContext before = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;
	BeginInternalSubTransaction(nullptr);
	MemoryContextSwitchTo(before);
	PG_TRY();
	{
		fn();
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		StopRunAsTimers(); // before the rollback: a cancel must not leak past it
		MemoryContextSwitchTo(before);
		*err = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(before);
	CurrentResourceOwner = owner;
	return ok;
}

// After a mapping failed with a data error: which column could not take which value, from
// sbpg._diagnose_mapping. It evaluates the target's column types (domains and their checks are
// tenant code), so it runs as run_as, and in a subtransaction of its own: whatever goes wrong there
// (the time limit included) only costs the diagnosis. Returns NULL when there is none.
char *
DiagnoseMapping(const SubConfig *cfg, const ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	const Mapping *mp = FindMapping(m);
	if (!mp || m->json != JsonVerdict::Json || !OidIsValid(diagnose_mapping_fn))
		return nullptr;
	char *what = nullptr;
	ErrorData *e = nullptr;
	bool ok = InSubtransaction(
	    [&] {
		    Datum payload = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
		    FmgrInfo flinfo;
		    fmgr_info(diagnose_mapping_fn, &flinfo);
		    Datum args[3] = {mp->target, mp->column_map, payload};
		    bool isnull;
		    Datum res = CallAsRunAs(cfg, &flinfo, 3, args, false, &isnull);
		    if (!isnull)
			    what = TextDatumGetCString(res);
	    },
	    &e);
	if (!ok) {
		(void)RunAsFailed(e->sqlerrcode);
		FreeErrorData(e);
		return nullptr;
	}
	return what;
}

// A message's attempt failed: a transient error schedules a retry, any other dead-letters it. A
// mapping's data error names the column and the value that failed; the time limit says so.
void
FailItem(const SubConfig *cfg, ApplyItem *it, int sqlerrcode, const char *desc, uint64 xid) {
	if (it->timed_out) {
		char d[1024];
		snprintf(d, sizeof d, "the handler ran longer than handler_timeout_ms (%d ms) and was cancelled: %s",
		         cfg->handler_timeout_ms, desc);
		ClipUtf8(d);
		ScheduleRetry(cfg, it, "HandlerTimeout", d, xid);
		return;
	}
	if (IsTransient(sqlerrcode)) {
		ScheduleRetry(cfg, it, "TransientError", desc, xid);
		return;
	}
	char full[1024];
	CopyUtf8(full, desc, sizeof full);
	if (it->mapped && ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_TO_CATEGORY(ERRCODE_DATA_EXCEPTION)) {
		char *what = DiagnoseMapping(cfg, it);
		if (what) {
			snprintf(full, sizeof full, "%s (SQLSTATE %s)", what, unpack_sql_state(sqlerrcode));
			ClipUtf8(full);
		}
	}
	SetReason(it, sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE ? "PermissionDenied" : it->mapped ? "MappingError" : "HandlerError",
	          full);
	Record(cfg, it, kDeadLettered, xid);
}

// Applies one message in a subtransaction of its own; its failure is recorded in the enclosing
// transaction.
void
ApplyIsolated(const SubConfig *cfg, ApplyItem *it, uint64 xid, MemoryContext msgcxt) {
	ErrorData *e = nullptr;
	if (InSubtransaction([&] { ApplyOne(cfg, it, xid, msgcxt); }, &e))
		return;
	MemoryContextReset(msgcxt);
	it->timed_out = RunAsFailed(e->sqlerrcode);
	char desc[1024];
	DescribeError(e, desc, sizeof desc);
	FailItem(cfg, it, e->sqlerrcode, desc, xid);
	FreeErrorData(e);
}

// Applies items[lo..hi) in the current transaction; with isolate, each in a subtransaction whose
// failure records a dead-letter (permanent errors) or leaves the message for a retry (transient).
void
ApplyRange(const SubConfig *cfg, ApplyItem *items, int lo, int hi, bool isolate, uint64 xid) {
	MemoryContext msgcxt =
	    AllocSetContextCreate(TopTransactionContext, "sbpg message", ALLOCSET_DEFAULT_SIZES);
	for (int i = lo; i < hi; ++i) {
		ApplyItem *it = &items[i];
		if (it->status == kDuplicate) {
			Notify(cfg, it, xid);
			continue;
		}
		if (it->status == kDelayed)
			continue;
		if (!isolate) {
			applying = i;
			if (first_applied < 0)
				first_applied = i;
			ApplyOne(cfg, it, xid, msgcxt);
			applying = -1;
			continue;
		}
		if (it->failed_errcode) {
			// It failed in the batch's first pass: that was its attempt; record it, do not run it again.
			int code = it->failed_errcode;
			it->failed_errcode = 0;
			FailItem(cfg, it, code, it->failed_error, xid);
			it->timed_out = false;
			continue;
		}
		ApplyIsolated(cfg, it, xid, msgcxt);
	}
}

// Test-only fault point (sbpg.test_fault = 'fail_commit#<message id>'): the transaction that
// applied that message fails as a whole just before COMMIT, as a deferred constraint would.
void
TestCommitFault(const ApplyItem *items, int lo, int hi) {
	if (!guc_test_fault || strncmp(guc_test_fault, "fail_commit#", 12) != 0)
		return;
	const char *id = guc_test_fault + 12;
	for (int i = lo; i < hi; ++i)
		if (items[i].status == kApplied && items[i].msg->message_id == id)
			ereport(ERROR, (errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
			                errmsg("sbpg test fault: the transaction that applied message %s fails at COMMIT", id)));
}

// One transaction over items[lo..hi). isolate: each message in a subtransaction. Returns false
// (after rolling back) when a non-isolated pass failed.
bool
RunPass(const SubConfig *cfg, ApplyItem *items, int lo, int hi, bool isolate, const int64 *seqs, int nseqs,
        const char *const *ids, int nids, BatchResult *out) {
	MemoryContext caller = CurrentMemoryContext;
	volatile bool ok = true;
	for (int i = lo; i < hi; ++i) {
		items[i].status = kPending;
		items[i].reason[0] = items[i].description[0] = '\0';
		items[i].apply_ms = 0;
		items[i].attempts = 0;
		items[i].next_attempt = 0;
		items[i].defer = false;
		items[i].gave_up = false;
		items[i].stale = false; // `mapped` stays: whether a mapping applies depends on the type alone
	}
	applying = first_applied = -1;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		EnsurePlans(cfg);
		CheckNotifyQueue(cfg);
		Stamp(cfg, seqs, nseqs, ids, nids);
		char why[512];
		if (!HandlerUsable(cfg, why, sizeof why)) {
			out->handler_unusable = true;
			CopyUtf8(out->handler_error, why, sizeof out->handler_error);
			for (int i = lo; i < hi; ++i) {
				items[i].status = kTransient;
				items[i].next_attempt = GetCurrentTimestamp() + 5 * USECS_PER_SEC;
				SetReason(&items[i], "HandlerUnusable", why);
			}
		} else {
			uint64 xid = U64FromFullTransactionId(GetTopFullTransactionId());
			out->xid = xid;
			LookupDuplicates(cfg, items, lo, hi);
			ReplaceStale(cfg, items, lo, hi);
			LookupRetries(cfg, items, lo, hi);
			LoadMappings(cfg);
			ApplyRange(cfg, items, lo, hi, isolate, xid);
		}
		TestCommitFault(items, lo, hi);
		PopActiveSnapshot();
		SPI_finish();
		CommitTransactionCommand();
		// Settle only what is durable: flush the commit record whatever synchronous_commit says.
		XLogFlush(XactLastCommitEnd);
		out->committed_at = GetCurrentTimestamp();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		ErrorData *e = CopyErrorData();
		FlushErrorState();
		DescribeError(e, out->batch_error, sizeof out->batch_error);
		out->batch_sqlerrcode = e->sqlerrcode;
		bool timed_out = RunAsFailed(e->sqlerrcode);
		if (applying >= lo && applying < hi && (!IsTransient(e->sqlerrcode) || timed_out || applying == first_applied)) {
			// The message being applied failed, by its own fault: a permanent error, or a transient
			// one before any other message of the pass ran (a deadlock over locks that earlier
			// messages took is the batch's, and is tried again message by message). Remember it,
			// so the isolated pass records this attempt's failure instead of running it again.
			items[applying].failed_errcode = e->sqlerrcode;
			items[applying].timed_out = timed_out;
			CopyUtf8(items[applying].failed_error, out->batch_error, sizeof items[applying].failed_error);
		}
		applying = -1;
		FreeErrorData(e);
		AbortCurrentTransaction();
		MemoryContextSwitchTo(caller);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	return ok;
}

// A short transaction of its own, with SPI and a snapshot, for the worker's housekeeping.
void
BeginShort() {
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
}

void
EndShort() {
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
}

// Records the failure of a message whose own transaction failed, in a transaction of its own.
// Errors propagate: then the server itself is in trouble and the caller retries the batch.
void
RecordFailure(const SubConfig *cfg, ApplyItem *it, int sqlerrcode, const char *error, BatchResult *out) {
	char desc[1024];
	CopyUtf8(desc, error, sizeof desc);
	it->status = kPending;
	it->reason[0] = it->description[0] = '\0';
	it->attempts = 0;
	it->next_attempt = 0;
	it->defer = it->gave_up = it->stale = false;
	BeginShort();
	EnsurePlans(cfg);
	CheckNotifyQueue(cfg);
	uint64 xid = U64FromFullTransactionId(GetTopFullTransactionId());
	out->xid = xid;
	LookupDuplicates(cfg, it, 0, 1);
	ReplaceStale(cfg, it, 0, 1);
	LookupRetries(cfg, it, 0, 1);
	LoadMappings(cfg);
	if (it->status == kDuplicate)
		Notify(cfg, it, xid);
	else if (it->status == kPending)
		FailItem(cfg, it, sqlerrcode, desc, xid);
	it->timed_out = false;
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	XLogFlush(XactLastCommitEnd);
	out->committed_at = GetCurrentTimestamp();
}

} // namespace

void
LoadSubConfig(const char *name, SubConfig *out) {
	memset(out, 0, sizeof *out);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	Oid types[1] = {TEXTOID};
	Datum args[1] = {CStringGetTextDatum(name)};
	// An option's value: (s.options ->> key).
#define OPT(key) "(s.options" GETTEXT "'" key "')"
	const char *q =
	    "SELECT s.namespace, s.entity, s.handler::pg_catalog.oid, s.run_as::pg_catalog.oid, s.run_as::pg_catalog.text, "
	    "s.identity, i.kind, (i.options" GETTEXT "'key_name'), k.secret, (i.options" GETTEXT "'key_file'), "
	    "(i.options" GETTEXT "'key_env'), s.batch_size, s.prefetch, s.notify_channel, s.enabled, "
	    "'sbpg.message'::pg_catalog.regtype::pg_catalog.oid, i.options::pg_catalog.text, "
	    "coalesce(" OPT("allow_superuser_run_as") "::boolean, false), "
	    "coalesce(" OPT("max_retries") "::integer, 5), coalesce(" OPT("retry_base_ms") "::integer, 1000), "
	    "coalesce(" OPT("retry_cap_ms") "::integer, 300000), coalesce(" OPT("retry_hold_ms") "::integer, 30000), "
	    "coalesce(" OPT("max_lock_renewal_s") "::integer, 300), "
	    "coalesce(" OPT("schemas") ", 'off')" EQ "'validate', coalesce(" OPT("unknown_types") ", 'dead_letter')" EQ "'pass', "
	    "coalesce(" OPT("version_property") ", 'schema_version'), "
	    // handler_timeout_ms: 30 s by default, never past the lock renewal limit.
	    "coalesce(" OPT("handler_timeout_ms") "::integer, CASE WHEN coalesce(" OPT("max_lock_renewal_s") "::integer, 300)" EQ
	    "0 THEN 30000 ELSE least(30000, coalesce(" OPT("max_lock_renewal_s") "::integer, 300) OPERATOR(pg_catalog.*) 1000) END), "
	    // An Entra ID token goes to a Service Bus namespace over TLS, or to a broker the identity lists.
	    "s.namespace OPERATOR(pg_catalog.~*) '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\\.servicebus\\."
	    "(windows\\.net|chinacloudapi\\.cn|usgovcloudapi\\.net|cloudapi\\.de)(:[0-9]{1,5})?/?$' "
	    "OR EXISTS (SELECT FROM pg_catalog.jsonb_array_elements_text(i.options OPERATOR(pg_catalog.->) 'allowed_namespaces') a "
	    "WHERE pg_catalog.lower(pg_catalog.rtrim(a, '/'))" EQ "pg_catalog.lower(pg_catalog.rtrim(s.namespace, '/'))) "
	    "FROM sbpg.subscriptions s LEFT JOIN sbpg.identities i ON i.name" EQ "s.identity "
	    "LEFT JOIN sbpg.identity_secrets k ON k.identity" EQ "s.identity WHERE s.name" EQ "$1";
#undef OPT
	if (SPI_execute_with_args(q, 1, types, args, nullptr, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "sbpg: cannot read sbpg.subscriptions");
	if (SPI_processed == 1) {
		HeapTuple t = SPI_tuptable->vals[0];
		TupleDesc d = SPI_tuptable->tupdesc;
		bool isnull;
		out->found = true;
		out->name = Dup(name);
		out->namespace_ = GetText(t, d, 1);
		out->entity = GetText(t, d, 2);
		out->handler = DatumGetObjectId(SPI_getbinval(t, d, 3, &isnull));
		out->run_as = DatumGetObjectId(SPI_getbinval(t, d, 4, &isnull));
		out->run_as_name = GetText(t, d, 5);
		out->identity = GetText(t, d, 6);
		out->identity_kind = GetText(t, d, 7);
		out->key_name = GetText(t, d, 8);
		out->key = GetText(t, d, 9);
		out->key_file = GetText(t, d, 10);
		out->key_env = GetText(t, d, 11);
		out->batch_size = DatumGetInt32(SPI_getbinval(t, d, 12, &isnull));
		out->prefetch = DatumGetInt32(SPI_getbinval(t, d, 13, &isnull));
		out->notify_channel = GetText(t, d, 14);
		out->enabled = DatumGetBool(SPI_getbinval(t, d, 15, &isnull));
		out->message_type = DatumGetObjectId(SPI_getbinval(t, d, 16, &isnull));
		out->identity_options = GetText(t, d, 17);
		out->allow_superuser = DatumGetBool(SPI_getbinval(t, d, 18, &isnull));
		out->max_retries = DatumGetInt32(SPI_getbinval(t, d, 19, &isnull));
		out->retry_base_ms = DatumGetInt32(SPI_getbinval(t, d, 20, &isnull));
		out->retry_cap_ms = DatumGetInt32(SPI_getbinval(t, d, 21, &isnull));
		out->retry_hold_ms = DatumGetInt32(SPI_getbinval(t, d, 22, &isnull));
		out->max_lock_renewal_s = DatumGetInt32(SPI_getbinval(t, d, 23, &isnull));
		out->validate_schemas = DatumGetBool(SPI_getbinval(t, d, 24, &isnull));
		out->unknown_pass = DatumGetBool(SPI_getbinval(t, d, 25, &isnull));
		out->version_property = GetText(t, d, 26);
		out->handler_timeout_ms = DatumGetInt32(SPI_getbinval(t, d, 27, &isnull));
		bool ok = DatumGetBool(SPI_getbinval(t, d, 28, &isnull));
		out->token_destination_ok = !isnull && ok;
		// The search_path a session of run_as would get: role in this database, role, database,
		// every role (ALTER ROLE ALL), the configuration file, the built-in default.
		Oid ptypes[2] = {OIDOID, OIDOID};
		Datum pargs[2] = {ObjectIdGetDatum(out->run_as), ObjectIdGetDatum(MyDatabaseId)};
		const char *sp =
		    "SELECT coalesce("
		    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
		    "WHERE s.setrole" EQ "$1 AND (s.setdatabase" EQ "0 OR s.setdatabase" EQ "$2) "
		    "AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' ORDER BY s.setdatabase USING OPERATOR(pg_catalog.>) LIMIT 1), "
		    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
		    "WHERE s.setrole" EQ "0 AND s.setdatabase" EQ "$2 AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' LIMIT 1), "
		    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
		    "WHERE s.setrole" EQ "0 AND s.setdatabase" EQ "0 AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' LIMIT 1), "
		    "(SELECT setting FROM pg_catalog.pg_file_settings WHERE name" EQ "'search_path' AND applied "
		    "ORDER BY seqno USING OPERATOR(pg_catalog.>) LIMIT 1), "
		    "(SELECT boot_val FROM pg_catalog.pg_settings WHERE name" EQ "'search_path'))";
		if (SPI_execute_with_args(sp, 2, ptypes, pargs, nullptr, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
			out->search_path = GetText(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

void
PinSessionSettings() {
	// What sbpg's statements and their results depend on, whatever ALTER DATABASE ... SET (which a
	// database owner may run) or the owner's role settings say. Tenant code changes none of these
	// beyond its own call (LeaveRunAs).
	static const char *const kPinned[][2] = {
	    {"search_path", "pg_catalog, pg_temp"},
	    {"role", "none"},
	    {"default_transaction_read_only", "off"},
	    {"default_transaction_isolation", "read committed"},
	    {"default_transaction_deferrable", "off"},
	    {"statement_timeout", "0"},
	    {"lock_timeout", "0"},
	    {"idle_in_transaction_session_timeout", "0"},
	    {"exit_on_error", "off"}, // an error a handler raises ends its attempt, not the worker
	    {"standard_conforming_strings", "on"},
	    {"row_security", "on"},
	    {"check_function_bodies", "on"},
	    {"DateStyle", "ISO, MDY"},
	    {"IntervalStyle", "postgres"},
	};
	for (const auto &kv : kPinned)
		SetConfigOption(kv[0], kv[1], PGC_SUSET, PGC_S_SESSION);
	// A settlement follows a commit that synchronous standbys confirmed, where they are configured.
	if (synchronous_commit < SYNCHRONOUS_COMMIT_REMOTE_FLUSH)
		SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION);
}

bool
EndedByTimeLimit() {
	return ended_by_limit != 0;
}

void
CleanSession() {
	// PostgreSQL refuses the rest of a session's state in a security-restricted operation (SET
	// ROLE, temporary tables, PREPARE, LISTEN, cursors WITH HOLD); settings are restored by
	// LeaveRunAs and other temporary objects refused by sbpg's object-access hook (module.cpp).
	LockReleaseSession(USER_LOCKMETHOD); // session-level advisory locks
}

void
ApplyBatch(const SubConfig *cfg, ApplyItem *items, int n, const int64 *seqs, int nseqs, const char *const *ids,
           int nids, BatchResult *out) {
	memset(out, 0, sizeof *out);
	pgstat_report_activity(STATE_RUNNING, "sbpg: applying a batch");
	if (RunPass(cfg, items, 0, n, false, seqs, nseqs, ids, nids, out))
		return;
	// Apply message by message, in chunks that keep subtransactions within PostgreSQL's cache.
	out->isolated = true;
	bool stamped = false;
	for (int lo = 0; lo < n; lo += kMaxSubxacts) {
		int hi = std::min(n, lo + kMaxSubxacts);
		if (RunPass(cfg, items, lo, hi, true, stamped ? nullptr : seqs, stamped ? 0 : nseqs, stamped ? nullptr : ids,
		            stamped ? 0 : nids, out)) {
			stamped = true;
			continue;
		}
		// The chunk's transaction itself failed (at COMMIT: a deferred constraint, a serialization
		// failure; or the server is in trouble): one transaction per message, and a message whose
		// own transaction fails has that failure recorded in another.
		for (int i = lo; i < hi; ++i) {
			if (RunPass(cfg, items, i, i + 1, false, nullptr, 0, nullptr, 0, out))
				continue;
			RecordFailure(cfg, &items[i], out->batch_sqlerrcode, out->batch_error, out);
		}
	}
}

void
StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	BeginShort();
	EnsurePlans(cfg);
	Stamp(cfg, seqs, nseqs, ids, nids);
	EndShort();
}

int64
PruneInbox(const SubConfig *cfg, int retention_s, int limit) {
	BeginShort();
	Oid types[3] = {TEXTOID, INT4OID, INT4OID};
	Datum args[3] = {CStringGetTextDatum(cfg->name), Int32GetDatum(retention_s), Int32GetDatum(limit)};
	// Only rows whose settlement the broker confirmed: the message is gone from the entity and
	// cannot come back. Rows still waiting for a confirmation stay: they recognise a redelivery.
	int rc = SPI_execute_with_args(
	    "DELETE FROM sbpg.inbox WHERE ctid" EQ "ANY (ARRAY(SELECT ctid FROM sbpg.inbox WHERE subscription" EQ "$1 "
	    "AND recorded_at" LT "(pg_catalog.now()" MINUS "pg_catalog.make_interval(secs => $2)) AND settled_at IS NOT NULL "
	    "LIMIT $3))",
	    3, types, args, nullptr, false, 0);
	int64 n = rc == SPI_OK_DELETE ? static_cast<int64>(SPI_processed) : 0;
	// Retry rows of messages that never came back (expired, received elsewhere) within the period.
	rc = SPI_execute_with_args(
	    "DELETE FROM sbpg.retries WHERE ctid" EQ "ANY (ARRAY(SELECT ctid FROM sbpg.retries WHERE subscription" EQ "$1 "
	    "AND last_failed_at" LT "(pg_catalog.now()" MINUS
	    "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
	    "AND next_attempt_at" LT "(pg_catalog.now()" MINUS
	    "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
	    "LIMIT $3))",
	    3, types, args, nullptr, false, 0);
	n += rc == SPI_OK_DELETE ? static_cast<int64>(SPI_processed) : 0;
	EndShort();
	return n;
}

int
LoadSchemas(SchemaRowC **out) {
	*out = nullptr;
	BeginShort();
	int n = 0;
	if (SPI_execute("SELECT message_type, version, schema::pg_catalog.text FROM sbpg.schemas "
	                "ORDER BY 1 USING" LT ", 2 USING" LT,
	                true, 0) == SPI_OK_SELECT &&
	    SPI_processed > 0) {
		SchemaRowC *rows = static_cast<SchemaRowC *>(calloc(SPI_processed, sizeof(SchemaRowC)));
		if (rows) {
			for (uint64 r = 0; r < SPI_processed; ++r) {
				HeapTuple t = SPI_tuptable->vals[r];
				TupleDesc d = SPI_tuptable->tupdesc;
				bool isnull;
				char *type = SPI_getvalue(t, d, 1);
				char *json = SPI_getvalue(t, d, 3);
				rows[n].message_type = type ? strdup(type) : nullptr;
				rows[n].version = DatumGetInt32(SPI_getbinval(t, d, 2, &isnull));
				rows[n].schema_json = json ? strdup(json) : nullptr;
				++n;
			}
			*out = rows;
		}
	}
	EndShort();
	return n;
}

int64
SchemasStamp() {
	BeginShort();
	int64 stamp = 0;
	// Registering a version adds a row; dropping a type removes rows; the newest registration time
	// tells apart a drop followed by a registration.
	if (SPI_execute("SELECT (SELECT pg_catalog.count(*) FROM sbpg.schemas), (SELECT pg_catalog.count(*) FROM sbpg.message_types), "
	                "(SELECT pg_catalog.max(registered_at) FROM sbpg.schemas)",
	                true, 1) == SPI_OK_SELECT &&
	    SPI_processed == 1) {
		bool isnull;
		HeapTuple t = SPI_tuptable->vals[0];
		TupleDesc d = SPI_tuptable->tupdesc;
		int64 versions = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
		int64 types = DatumGetInt64(SPI_getbinval(t, d, 2, &isnull));
		Datum newest = SPI_getbinval(t, d, 3, &isnull);
		stamp = (isnull ? 0 : DatumGetTimestampTz(newest)) + versions + 7 * types;
	}
	EndShort();
	return stamp;
}

int
DueDeferred(const SubConfig *cfg, int64 *out, int max) {
	BeginShort();
	Oid types[2] = {TEXTOID, INT4OID};
	Datum args[2] = {CStringGetTextDatum(cfg->name), Int32GetDatum(max)};
	int got = 0;
	if (SPI_execute_with_args("SELECT sequence_number FROM sbpg.retries WHERE subscription" EQ "$1 AND deferred "
	                          "AND sequence_number IS NOT NULL AND next_attempt_at" LE "pg_catalog.now() "
	                          "ORDER BY next_attempt_at USING" LT "LIMIT $2",
	                          2, types, args, nullptr, true, 0) == SPI_OK_SELECT) {
		for (uint64 r = 0; r < SPI_processed && got < max; ++r) {
			bool isnull;
			out[got++] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		}
	}
	EndShort();
	return got;
}

void
PostponeDeferred(const SubConfig *cfg, int64 seq) {
	BeginShort();
	Oid types[2] = {TEXTOID, INT8OID};
	Datum args[2] = {CStringGetTextDatum(cfg->name), Int64GetDatum(seq)};
	SPI_execute_with_args("UPDATE sbpg.retries SET next_attempt_at = pg_catalog.now()" PLUS "interval '1 minute' "
	                      "WHERE subscription" EQ "$1 AND sequence_number" EQ "$2 AND deferred",
	                      2, types, args, nullptr, false, 0);
	EndShort();
}

} // namespace sbpg::pg
