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

#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/xid8.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/inbox.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/spi.hpp"

#include <cstring>
#include <string_view>

namespace sbpg::pg {

namespace {

#define INBOX_LOOKUP "SELECT sequence_number, message_id, status, reason FROM sbpg.inbox WHERE "
constexpr spi::PlanSpec kLookupBySeq = {
    "read sbpg.inbox", INBOX_LOOKUP SBPG_BY_SEQUENCES, 2, {TEXTOID, INT8ARRAYOID}, true};
constexpr spi::PlanSpec kLookupById = {
    "read sbpg.inbox", INBOX_LOOKUP SBPG_BY_MESSAGE_IDS, 2, {TEXTOID, TEXTARRAYOID}, true};
#undef INBOX_LOOKUP

constexpr spi::PlanSpec kInsert = {
    "write sbpg.inbox",
    "INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, correlation_id, status, reason, "
    "delivery_count, xid, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    9,
    {TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, XID8OID, INT4OID},
    false,
};

#define INBOX_STAMP "UPDATE sbpg.inbox SET settled_at = pg_catalog.now() WHERE settled_at IS NULL AND "
constexpr spi::PlanSpec kStampBySeq = {
    "stamp settled_at", INBOX_STAMP SBPG_BY_SEQUENCES, 2, {TEXTOID, INT8ARRAYOID}, true};
constexpr spi::PlanSpec kStampById = {
    "stamp settled_at", INBOX_STAMP SBPG_BY_MESSAGE_IDS, 2, {TEXTOID, TEXTARRAYOID}, true};
#undef INBOX_STAMP

// A deferred message's retry row lives until its settlement is confirmed: until then the broker may
// still hold it deferred, and only the row remembers to fetch it again.
constexpr spi::PlanSpec kRetryConfirmed = {
    "update sbpg.retries", "DELETE FROM sbpg.retries WHERE " SBPG_BY_SEQUENCES, 2, {TEXTOID, INT8ARRAYOID}, true,
};

// Text of a message's key column, or NULL.
Datum
TextOrNull(const std::string &s, char *null) {
	if (s.empty()) {
		*null = 'n';
		return 0;
	}
	return CStringGetTextDatum(s.c_str());
}

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

} // namespace

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
	out->name = CStringGetTextDatum(cfg->name);
	out->seqs = nseqs > 0 ? spi::Int8ArrayDatum(seqs, nseqs) : 0;
	out->ids = nids > 0 ? spi::TextArrayDatum(ids, nids) : 0;
	out->nseqs = nseqs;
	out->nids = nids;
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
	ForEachKeySearch(kLookupBySeq, kLookupById, keys, SPI_OK_SELECT, [&](spi::SpiResult &res) {
		int seq_col = res.Col("sequence_number"), id_col = res.Col("message_id");
		int status_col = res.Col("status"), reason_col = res.Col("reason");
		for (uint64 r = 0; r < res.rows; ++r) {
			bool seq_null;
			int64 seq = DatumGetInt64(res.Value(r, seq_col, &seq_null));
			char *mid = res.Text(r, id_col);
			char *status = res.Text(r, status_col);
			char *reason = res.Text(r, reason_col);
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
	Datum args[9];
	char nulls[9];
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
	spi::Exec(kInsert, args, nulls, SPI_OK_INSERT);
}

void
Stamp(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	if (nseqs == 0 && nids == 0)
		return;
	KeySet keys = {CStringGetTextDatum(cfg->name), nseqs > 0 ? spi::Int8ArrayDatum(seqs, nseqs) : 0,
	               nids > 0 ? spi::TextArrayDatum(ids, nids) : 0, nseqs, nids};
	ForEachKeySearch(kStampBySeq, kStampById, keys, SPI_OK_UPDATE, [](spi::SpiResult &) {});
	if (nseqs > 0) {
		Datum args[2] = {keys.name, keys.seqs};
		spi::Exec(kRetryConfirmed, args, nullptr, SPI_OK_DELETE);
	}
}

void
StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids) {
	spi::ShortTransaction([&] { Stamp(cfg, seqs, nseqs, ids, nids); });
}

int64
PruneInbox(const SubConfig *cfg, int retention_s, int limit) {
	int64 n = 0;
	spi::ShortTransaction([&] {
		Oid types[3] = {TEXTOID, INT4OID, INT4OID};
		Datum args[3] = {CStringGetTextDatum(cfg->name), Int32GetDatum(retention_s), Int32GetDatum(limit)};
		// Only rows whose settlement the broker confirmed: the message is gone from the entity and
		// cannot come back. Rows still waiting for a confirmation stay: they recognise a redelivery.
		n += spi::ExecSql("prune sbpg.inbox",
		                  "DELETE FROM sbpg.inbox WHERE ctid" OP_EQ
		                  "ANY (ARRAY(SELECT ctid FROM sbpg.inbox WHERE subscription" OP_EQ "$1 AND recorded_at" OP_LT
		                  "(pg_catalog.now()" OP_MINUS "pg_catalog.make_interval(secs => $2)) "
		                  "AND settled_at IS NOT NULL LIMIT $3))",
		                  3, types, args, nullptr, SPI_OK_DELETE)
		         .rows;
		// Retry rows of messages that never came back (expired, received elsewhere) within the period.
		n += spi::ExecSql("prune sbpg.retries",
		                  "DELETE FROM sbpg.retries WHERE ctid" OP_EQ "ANY (ARRAY(SELECT ctid FROM sbpg.retries WHERE "
		                  "subscription" OP_EQ "$1 AND last_failed_at" OP_LT "(pg_catalog.now()" OP_MINUS
		                  "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
		                  "AND next_attempt_at" OP_LT "(pg_catalog.now()" OP_MINUS
		                  "pg_catalog.make_interval(secs => CASE WHEN deferred THEN greatest($2, 604800) ELSE $2 END)) "
		                  "LIMIT $3))",
		                  3, types, args, nullptr, SPI_OK_DELETE)
		         .rows;
	});
	return n;
}

} // namespace sbpg::pg
