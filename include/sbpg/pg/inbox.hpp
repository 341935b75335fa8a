// sbpg/pg/inbox.hpp
//   The inbox (inbox.cpp): how a message is found again (by sequence number, or by message id when
//   the broker gives none), duplicates, inbox rows, settled_at stamping and pruning. Include after
//   postgres.h, sbpg/pg/apply.hpp and sbpg/pg/pass.hpp, only from the files that apply batches.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/inbox.hpp"
#endif

namespace sbpg::pg {

struct Pass;

// The arguments of an inbox or retries search over items[lo..hi): $1 the subscription, $2 the
// sequence numbers, $3 the message ids of messages without one. False when there is nothing to
// search for. Duplicates already found are left out when skip_duplicates.
bool KeyArgs(const SubConfig *cfg, const ApplyItem *items, int lo, int hi, bool skip_duplicates, Datum args[3]);
// The condition that finds the rows of those messages (in sbpg.inbox or sbpg.retries).
#define SBPG_KEYS_MATCH                                                                                                \
	"subscription" OP_EQ "$1 AND (sequence_number" OP_EQ "ANY ($2) OR (sequence_number IS NULL AND message_id" OP_EQ   \
	"ANY ($3)))"

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
