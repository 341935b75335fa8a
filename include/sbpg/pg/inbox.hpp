// sbpg/pg/inbox.hpp
//   The inbox (inbox.cpp): how a message is found again (by sequence number, or by message id when
//   the broker gives none), duplicates, inbox rows, settled_at stamping and pruning. Include after
//   postgres.h, sbpg/pg/apply.hpp, sbpg/pg/pass.hpp and sbpg/pg/spi.hpp, only from the files that
//   apply batches.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/inbox.hpp"
#endif

#include "sbpg/pg/spi.hpp"

namespace sbpg::pg {

struct Pass;

// The keys of items[lo..hi) for an inbox or retries search: the subscription, the sequence numbers,
// and the message ids of the messages the broker gave no sequence number. Duplicates already found
// are left out when skip_duplicates.
struct KeySet {
	Datum name;
	Datum seqs; // int8[]
	Datum ids;  // text[]
	int nseqs;
	int nids;
};
void CollectKeys(const SubConfig *cfg, const ApplyItem *items, int lo, int hi, bool skip_duplicates, KeySet *out);

// A search is two statements, one per partial unique index ($1 the subscription, $2 the array of
// keys), so that each finds its rows through its index whatever the table's statistics say: an
// OR of both conditions in one statement is planned as a scan of every row of the subscription
// once the statistics were taken while the table was small (issue 14).
#define SBPG_BY_SEQUENCES "subscription" OP_EQ "$1 AND sequence_number IS NOT NULL AND sequence_number" OP_EQ "ANY ($2)"
#define SBPG_BY_MESSAGE_IDS "subscription" OP_EQ "$1 AND sequence_number IS NULL AND message_id" OP_EQ "ANY ($2)"

// Runs by_seq with the sequence numbers and by_id with the message ids, each only when there is a
// key for it, expecting SPI result code `expect`; calls fn(result) after each. Returns the rows
// the statements processed.
template <typename Fn>
uint64
ForEachKeySearch(const spi::PlanSpec &by_seq, const spi::PlanSpec &by_id, const KeySet &k, int expect, Fn &&fn) {
	uint64 rows = 0;
	if (k.nseqs > 0) {
		Datum a[2] = {k.name, k.seqs};
		spi::SpiResult r = spi::Exec(by_seq, a, nullptr, expect);
		rows += r.rows;
		fn(r);
	}
	if (k.nids > 0) {
		Datum a[2] = {k.name, k.ids};
		spi::SpiResult r = spi::Exec(by_id, a, nullptr, expect);
		rows += r.rows;
		fn(r);
	}
	return rows;
}

// How a stored row (sequence number or NULL, message id as stored) relates to a message.
enum KeyMatch { kOther, kSame, kStale /* same sequence number, another message id */ };
KeyMatch MatchKey(const ReceivedMessage *m, bool seq_null, int64 seq, const char *mid);

// Marks items[lo..hi) the inbox already decided as kDuplicate (with what it recorded), and those
// whose sequence number the inbox holds for another message as stale.
void LookupDuplicates(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// Inbox and retry rows left by another message with the same sequence number go, with a warning.
void ReplaceStale(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// The inbox row of an applied or dead-lettered item, in the pass's transaction.
void InsertInbox(const Pass *pass, const ApplyItem *it);
// Stamps settled_at on the rows whose settlement the broker confirmed; the retry rows of those
// messages (kept while they may still be deferred on the broker) go.
void Stamp(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids);

} // namespace sbpg::pg
