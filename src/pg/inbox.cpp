// src/pg/inbox.cpp
//   sbpg.inbox: one row per decided message, found by (subscription, sequence_number), or by
//   message id when the broker gives no sequence number. A hit is a redelivery, settled again with
//   the recorded outcome and never applied twice. Rows are stamped settled_at once the broker
//   confirms the settlement, and only such rows are pruned (the others still recognise a redelivery).
//
//   Invariants: every statement is schema-qualified (spi.hpp); runs inside PgGuard and owns no C++
//   objects with destructors.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/xid8.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/inbox.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/spi.hpp"

#include <algorithm>
#include <cstring>
#include <string_view>

namespace sbpg::pg {

namespace {

// Set when InsertInbox found the message's row committed meanwhile by another worker of the
// subscription (the error it then raises is no failure of the message): TakeRecordedElsewhere.
bool recorded_elsewhere = false;

// A row that exists already (another worker of the subscription recorded the same message after
// this batch looked it up: a redelivery after a lost lock reached it while the first worker was
// still applying it) inserts nothing: the caller fails the attempt (InsertInbox), and the message
// is a duplicate when looked up again. One statement per key index, so that ON CONFLICT names it.
#define INBOX_INSERT                                                                                                   \
	"INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, correlation_id, status, reason, "              \
	"delivery_count, xid, attempts, traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
constexpr spi::PlanSpec kInsert[2] = {
    {"write sbpg.inbox",
     INBOX_INSERT "ON CONFLICT (subscription, sequence_number) WHERE sequence_number IS NOT NULL DO NOTHING",
     10,
     {TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, XID8OID, INT4OID, TEXTOID},
     false},
    {"write sbpg.inbox",
     INBOX_INSERT "ON CONFLICT (subscription, message_id) WHERE sequence_number IS NULL DO NOTHING",
     10,
     {TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, XID8OID, INT4OID, TEXTOID},
     false},
};
#undef INBOX_INSERT

// The settled_at stamp and the retry rows of confirmed settlements, by the rows' addresses, which
// ScanKeys found: a TID scan, whatever the statistics.
constexpr spi::PlanSpec kStamp = {
    "stamp settled_at",
    "UPDATE sbpg.inbox SET settled_at = pg_catalog.now() WHERE ctid" OP_EQ "ANY ($1) AND settled_at IS NULL",
    1,
    {TIDARRAYOID},
    true,
    false,
    true,
};

// A deferred message's retry row lives until its settlement is confirmed: until then the broker may
// still hold it deferred, and only the row remembers to fetch it again.
constexpr spi::PlanSpec kRetryConfirmed = {
    "update sbpg.retries", "DELETE FROM sbpg.retries WHERE ctid" OP_EQ "ANY ($1)", 1, {TIDARRAYOID}, true, false, true,
};

const char *
TableName(KeyTable t) {
	return t == KeyTable::kInbox ? "inbox" : "retries";
}

// The relation sbpg.<name>, or an error that names it (the extension is being dropped).
Oid
SbpgRelation(const char *name) {
	Oid ns = get_namespace_oid("sbpg", false);
	Oid rel = get_relname_relid(name, ns);
	if (!OidIsValid(rel))
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE), errmsg("sbpg: relation sbpg.%s does not exist", name)));
	return rel;
}

// Looks up every key of one kind (sequence numbers or message ids) through one index.
void
ScanIndex(Relation heap, const char *index_name, const char *subscription, const Datum *values, int n, Oid eq_proc,
          Snapshot snap, TupleTableSlot *slot, void (*fn)(TupleTableSlot *, void *), void *arg) {
	Relation index = index_open(SbpgRelation(index_name), AccessShareLock);
	// The index sbpg created, as it created it: a scan of anything else could miss rows, and a
	// missed row is a message applied twice.
	Form_pg_index ix = index->rd_index;
	if (ix->indrelid != RelationGetRelid(heap) || !ix->indisvalid || !ix->indisready || ix->indnkeyatts != 2)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
		                errmsg("sbpg: index sbpg.%s is not the valid two-column index of sbpg.%s it must be",
		                       index_name, RelationGetRelationName(heap)),
		                errhint("REINDEX INDEX sbpg.%s, or update the extension again.", index_name)));
	IndexScanDesc scan = compat::IndexBeginScan(heap, index, snap, 2, 0);
	Datum name = CStringGetTextDatum(subscription);
	for (int i = 0; i < n; ++i) {
		ScanKeyData key[2];
		ScanKeyEntryInitialize(&key[0], 0, 1, BTEqualStrategyNumber, InvalidOid, index->rd_indcollation[0], F_TEXTEQ,
		                       name);
		ScanKeyEntryInitialize(&key[1], 0, 2, BTEqualStrategyNumber, InvalidOid, index->rd_indcollation[1], eq_proc,
		                       values[i]);
		index_rescan(scan, key, 2, nullptr, 0);
		while (index_getnext_slot(scan, ForwardScanDirection, slot))
			fn(slot, arg);
	}
	index_endscan(scan);
	index_close(index, AccessShareLock);
}

// Text of a message's key column, or NULL.
Datum
TextOrNull(const std::string &s, char *null) {
	if (s.empty()) {
		*null = 'n';
		return 0;
	}
	return CStringGetTextDatum(s.c_str());
}

} // namespace

// The recorded reason is "Reason: description".
void
SplitRecordedReason(ApplyItem *it, const char *recorded) {
	it->reason.Clear();
	it->description.Clear();
	if (!recorded)
		return;
	const char *colon = strstr(recorded, ": ");
	if (!colon) {
		it->reason.Set(recorded);
		return;
	}
	it->reason.Set(std::string_view(recorded, static_cast<size_t>(colon - recorded)));
	it->description.Set(colon + 2);
}

void
CollectKeys(const SubConfig *cfg, const ApplyItem *items, int lo, int hi, bool skip_duplicates, KeySet *out) {
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
	*out = {cfg->name, seqs, nseqs, ids, nids};
}

void
ScanKeys(KeyTable table, const KeySet &keys, void (*fn)(TupleTableSlot *slot, void *arg), void *arg) {
	if (keys.nseqs == 0 && keys.nids == 0)
		return;
	const char *name = TableName(table);
	char by_seq[NAMEDATALEN], by_id[NAMEDATALEN];
	snprintf(by_seq, sizeof by_seq, "%s_by_sequence", name);
	snprintf(by_id, sizeof by_id, "%s_by_message_id", name);
	Relation heap = table_open(SbpgRelation(name), AccessShareLock);
	TupleTableSlot *slot = table_slot_create(heap, nullptr);
	// A fresh snapshot (READ COMMITTED), as a statement would take: it sees what committed before
	// and what this transaction wrote so far.
	Snapshot snap = RegisterSnapshot(GetLatestSnapshot());
	if (keys.nseqs > 0) {
		Datum *v = static_cast<Datum *>(palloc(sizeof(Datum) * keys.nseqs));
		for (int i = 0; i < keys.nseqs; ++i)
			v[i] = Int64GetDatum(keys.seqs[i]);
		ScanIndex(heap, by_seq, keys.name, v, keys.nseqs, F_INT8EQ, snap, slot, fn, arg);
	}
	if (keys.nids > 0) {
		Datum *v = static_cast<Datum *>(palloc(sizeof(Datum) * keys.nids));
		for (int i = 0; i < keys.nids; ++i)
			v[i] = CStringGetTextDatum(keys.ids[i]);
		ScanIndex(heap, by_id, keys.name, v, keys.nids, F_TEXTEQ, snap, slot, fn, arg);
	}
	UnregisterSnapshot(snap);
	ExecDropSingleTupleTableSlot(slot);
	table_close(heap, AccessShareLock);
}

Datum
KeyColumn(KeyTable table, TupleTableSlot *slot, const char *column, bool *isnull) {
	TupleDesc desc = slot->tts_tupleDescriptor;
	for (int i = 0; i < desc->natts; ++i) {
		Form_pg_attribute a = TupleDescAttr(desc, i);
		if (!a->attisdropped && strcmp(NameStr(a->attname), column) == 0)
			return slot_getattr(slot, i + 1, isnull);
	}
	ereport(ERROR, (errcode(ERRCODE_UNDEFINED_COLUMN),
	                errmsg("sbpg: column \"%s\" of sbpg.%s does not exist", column, TableName(table))));
	return 0;
}

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
	KeySet keys;
	CollectKeys(cfg, items, lo, hi, false, &keys);
	ForEachKeyRow(KeyTable::kInbox, keys, [&](TupleTableSlot *slot) {
		bool seq_null, null;
		int64 seq = DatumGetInt64(KeyColumn(KeyTable::kInbox, slot, "sequence_number", &seq_null));
		Datum d = KeyColumn(KeyTable::kInbox, slot, "message_id", &null);
		char *mid = null ? nullptr : TextDatumGetCString(d);
		char *status = TextDatumGetCString(KeyColumn(KeyTable::kInbox, slot, "status", &null));
		d = KeyColumn(KeyTable::kInbox, slot, "reason", &null);
		char *reason = null ? nullptr : TextDatumGetCString(d);
		for (int i = lo; i < hi; ++i) {
			KeyMatch k = MatchKey(items[i].msg, seq_null, seq, mid);
			if (k == kStale)
				items[i].stale = true;
			if (k != kSame)
				continue;
			items[i].status = kDuplicate;
			items[i].recorded = strcmp(status, StatusName(kApplied)) == 0 ? kApplied : kDeadLettered;
			SplitRecordedReason(&items[i], reason);
		}
	});
}

void
ReplaceStale(const SubConfig *cfg, ApplyItem *items, int lo, int hi) {
	for (int i = lo; i < hi; ++i) {
		ApplyItem *it = &items[i];
		if (!it->stale)
			continue;
		Oid types[2] = {TEXTOID, INT8OID};
		Datum args[2] = {CStringGetTextDatum(cfg->name), Int64GetDatum(it->msg->sequence_number)};
		spi::ExecSql("replace a stale inbox row",
		             "DELETE FROM sbpg.inbox WHERE subscription" OP_EQ "$1 AND sequence_number" OP_EQ "$2", 2, types,
		             args, nullptr, SPI_OK_DELETE);
		spi::ExecSql("replace a stale retry row",
		             "DELETE FROM sbpg.retries WHERE subscription" OP_EQ "$1 AND sequence_number" OP_EQ "$2", 2, types,
		             args, nullptr, SPI_OK_DELETE);
		ereport(WARNING,
		        (errmsg("sbpg: subscription \"%s\": sequence number " INT64_FORMAT
		                " was recorded for another message; the entity was recreated or the broker lost its state",
		                cfg->name, it->msg->sequence_number),
		         errdetail("Message \"%s\" is applied; the inbox row of the earlier message with that sequence number "
		                   "is replaced.",
		                   it->msg->message_id.c_str())));
	}
}

void
InsertInbox(const Pass *pass, const ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	Datum args[10];
	char nulls[10];
	memset(nulls, ' ', sizeof nulls);
	args[0] = CStringGetTextDatum(pass->cfg->name);
	args[1] = Int64GetDatum(m->sequence_number);
	if (!m->has_sequence_number)
		nulls[1] = 'n';
	args[2] = TextOrNull(m->message_id, &nulls[2]);
	args[3] = TextOrNull(m->correlation_id, &nulls[3]);
	args[4] = CStringGetTextDatum(StatusName(it->status == kApplied ? kApplied : kDeadLettered));
	args[5] = 0;
	if (it->status == kDeadLettered) {
		ErrorText reason;
		FormatText(&reason, "%s: %s", it->reason.c_str(), it->description.c_str());
		args[5] = CStringGetTextDatum(reason.c_str());
	} else {
		nulls[5] = 'n';
	}
	args[6] = Int32GetDatum(static_cast<int32>(m->delivery_count));
	args[7] = FullTransactionIdGetDatum(FullTransactionIdFromU64(pass->xid));
	args[8] = Int32GetDatum(it->attempts + 1);
	args[9] = TextOrNull(m->traceparent, &nulls[9]);
	spi::SpiResult r = spi::Exec(kInsert[m->has_sequence_number ? 0 : 1], args, nulls, SPI_OK_INSERT);
	if (r.rows == 0) {
		recorded_elsewhere = true;
		ereport(ERROR, (errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
		                errmsg("sbpg: message %s was recorded meanwhile by another worker of subscription \"%s\"",
		                       m->message_id.c_str(), pass->cfg->name),
		                errdetail("Its effects here are rolled back; it is settled as a duplicate of that record.")));
	}
}

bool
TakeRecordedElsewhere() {
	bool r = recorded_elsewhere;
	recorded_elsewhere = false;
	return r;
}

// The addresses of the rows ScanKeys finds, as a tid[]; *n says how many.
Datum
RowAddresses(KeyTable table, const KeySet &keys, bool unsettled_only, int *n) {
	int cap = keys.nseqs + keys.nids, count = 0;
	ItemPointerData *tids = static_cast<ItemPointerData *>(palloc(sizeof(ItemPointerData) * (cap + 1)));
	ForEachKeyRow(table, keys, [&](TupleTableSlot *slot) {
		bool isnull = true;
		if (unsettled_only)
			(void)KeyColumn(table, slot, "settled_at", &isnull);
		if (isnull && count < cap)
			tids[count++] = slot->tts_tid;
	});
	*n = count;
	return spi::TidArrayDatum(tids, count);
}

void
Stamp(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	KeySet keys = {cfg->name, seqs, nseqs, ids, nids};
	int n;
	Datum tids = RowAddresses(KeyTable::kInbox, keys, true, &n);
	if (n > 0)
		spi::Exec(kStamp, &tids, nullptr, SPI_OK_UPDATE);
	// Retry rows are kept only while a deferred message's settlement is unconfirmed.
	keys.nids = 0;
	tids = RowAddresses(KeyTable::kRetries, keys, false, &n);
	if (n > 0)
		spi::Exec(kRetryConfirmed, &tids, nullptr, SPI_OK_DELETE);
}

void
StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	spi::ShortTransaction([&] { Stamp(cfg, seqs, nseqs, ids, nids); });
}

int64
PruneInbox(const SubConfig *cfg, int retention_s, int limit, int64 *retries_removed, TimestampTz *from) {
	int64 n = 0;
	*retries_removed = 0;
	spi::ShortTransaction(
	    [&] {
		    Oid types[4] = {TEXTOID, INT4OID, INT4OID, TIMESTAMPTZOID};
		    Datum args[4] = {CStringGetTextDatum(cfg->name), Int32GetDatum(retention_s), Int32GetDatum(limit),
		                     TimestampTzGetDatum(*from ? *from : DT_NOBEGIN)};
		    // Only rows whose settlement the broker confirmed: the message is gone from the entity and
		    // cannot come back. Rows still waiting for a confirmation stay: they recognise a redelivery.
		    // Oldest first, from where the last chunk ended: rows it passed over (kept ones, another
		    // subscription's) are not read again at every chunk.
		    spi::SpiResult res = spi::ExecSql("prune sbpg.inbox",
		                                      "DELETE FROM sbpg.inbox WHERE ctid" OP_EQ
		                                      "ANY (ARRAY(SELECT ctid FROM sbpg.inbox WHERE subscription" OP_EQ
		                                      "$1 AND recorded_at" OP_LT "(pg_catalog.now()" OP_MINUS
		                                      "pg_catalog.make_interval(secs => $2)) "
		                                      "AND recorded_at" OP_GE
		                                      "$4 AND settled_at IS NOT NULL ORDER BY recorded_at LIMIT $3)) "
		                                      "RETURNING recorded_at",
		                                      4, types, args, nullptr, SPI_OK_DELETE_RETURNING);
		    n = static_cast<int64>(res.rows);
		    for (uint64 i = 0; i < res.rows; ++i)
			    *from = std::max(*from, res.Timestamp(i, 1));
		    // Retry rows of messages that never came back (expired, received elsewhere) within the period.
		    *retries_removed =
		        spi::ExecSql(
		            "prune sbpg.retries",
		            "DELETE FROM sbpg.retries WHERE ctid" OP_EQ "ANY (ARRAY(SELECT ctid FROM sbpg.retries WHERE "
		            "subscription" OP_EQ "$1 AND last_failed_at" OP_LT "(pg_catalog.now()" OP_MINUS
		            "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
		            "AND next_attempt_at" OP_LT "(pg_catalog.now()" OP_MINUS
		            "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
		            "LIMIT $3))",
		            3, types, args, nullptr, SPI_OK_DELETE)
		            .rows;
	    },
	    spi::Commit::kLazy); // a crash keeps rows that are then removed again
	return n;
}

} // namespace sbpg::pg
