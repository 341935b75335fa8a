// sbpg/pg/inbox.hpp
//   The inbox (inbox.cpp): how a message is found again (by sequence number, or by message id when
//   the broker gives none), duplicates, inbox rows, settled_at stamping and pruning. Include after
//   postgres.h, sbpg/pg/apply.hpp and sbpg/pg/pass.hpp, only from the files that apply batches.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/inbox.hpp"
#endif

extern "C" {
#include "executor/tuptable.h"
}

namespace sbpg::pg {

struct Pass;

// The keys of items[lo..hi) for an inbox or retries search: the subscription, the sequence numbers,
// and the message ids of the messages the broker gave no sequence number. Duplicates already found
// are left out when skip_duplicates.
struct KeySet {
	const char *name;
	const int64 *seqs;
	int nseqs;
	const char *const *ids;
	int nids;
};
void CollectKeys(const SubConfig *cfg, const ApplyItem *items, int lo, int hi, bool skip_duplicates, KeySet *out);

// The two tables searched by key, each with a unique index per key: by sequence number (where it is
// not NULL) and by message id (where the sequence number is NULL).
enum class KeyTable { kInbox, kRetries };

// Finds the rows of those keys through the table's key indexes, without the planner: a plan is
// chosen by statistics, and statistics taken while the inbox was small made every search a scan
// of all the subscription's rows (issue 14). One index descent per key, whatever the table's size.
// Calls fn(slot) for each row visible to a fresh snapshot (what a statement would see under READ
// COMMITTED); the slot holds the table's columns (read them with KeyColumn). In a transaction;
// runs inside PgGuard.
void ScanKeys(KeyTable table, const KeySet &keys, void (*fn)(TupleTableSlot *slot, void *arg), void *arg);
template <typename Fn>
void
ForEachKeyRow(KeyTable table, const KeySet &keys, Fn &&fn) {
	ScanKeys(
	    table, keys, [](TupleTableSlot *slot, void *arg) { (*static_cast<Fn *>(arg))(slot); }, &fn);
}
// A column of a row ScanKeys found, by name (the table's few attributes are searched each time).
Datum KeyColumn(KeyTable table, TupleTableSlot *slot, const char *column, bool *isnull);

// How a stored row (sequence number or NULL, message id as stored) relates to a message.
enum KeyMatch { kOther, kSame, kStale /* same sequence number, another message id */ };
KeyMatch MatchKey(const ReceivedMessage *m, bool seq_null, int64 seq, const char *mid);

// Marks items[lo..hi) the inbox already decided as kDuplicate (with what it recorded), and those
// whose sequence number the inbox holds for another message as stale.
void LookupDuplicates(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// Whether the last failed attempt failed because InsertInbox found the message recorded meanwhile
// by another worker (then it is a duplicate, not a failure); clears the flag.
bool TakeRecordedElsewhere();
// Sets it's reason and description from a recorded "Reason: description".
void SplitRecordedReason(ApplyItem *it, const char *recorded);
// Inbox and retry rows left by another message with the same sequence number go, with a warning.
void ReplaceStale(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// The inbox row of an applied or dead-lettered item, in the pass's transaction.
void InsertInbox(const Pass *pass, const ApplyItem *it);
// Stamps settled_at on the rows whose settlement the broker confirmed; the retry rows of those
// messages (kept while they may still be deferred on the broker) go.
void Stamp(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids);

} // namespace sbpg::pg
