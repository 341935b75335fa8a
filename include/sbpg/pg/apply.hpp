// sbpg/pg/apply.hpp
//   The worker's transactions, the narrow API worker.cpp uses: applying a batch of messages (inbox
//   check, tenant code as run_as, inbox row, NOTIFY) in one durable commit, and the housekeeping
//   of the inbox and the retries. Include after postgres.h, and after sbpg/core/fixed_text.hpp
//   (a pure C++ header: before postgres.h), only from src/pg/. Every function here must be called
//   inside PgGuard and is written without C++ objects that have destructors.
//
//   Where it is done: pass.cpp (batch passes), inbox.cpp, retry.cpp, tenant.cpp (code run as
//   run_as), outcome.cpp (outcome records and their JSON), config.cpp (settings, schemas).
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/apply.hpp"
#endif

extern "C" {
#include "datatype/timestamp.h"
#include "utils/palloc.h"
}

#include "sbpg/pg/config.hpp"

namespace sbpg {
struct ReceivedMessage;
}

namespace sbpg::pg {

// Drops what tenant code may leave in the session beyond a transaction: session-level advisory
// locks. Called after every batch, whatever its outcome.
void CleanSession();

// Whether the worker is ending because tenant code went on past its time limit after the cancel
// (its exit callback says so in sbpg.stats and the log).
bool EndedByTimeLimit();

// kTransient: this attempt failed with a transient error and another is scheduled (next_attempt).
// kDelayed: not attempted; an earlier attempt scheduled the next one for later (a redelivery or a
// deferred message that came back early). kBlocked: not attempted, because an earlier message of
// its session in the batch waits for its next attempt (a session is applied in order). Their
// names are StatusName's (outcome.hpp).
enum ItemStatus : int { kPending = 0, kApplied, kDeadLettered, kDuplicate, kTransient, kDelayed, kBlocked };

// One message of a batch. Plain data (zero-initialised by the caller): PostgreSQL's error recovery
// may longjmp over it.
struct ApplyItem {
	const ReceivedMessage *msg; // owned by the caller
	int status;
	int recorded;      // kDuplicate: what the inbox recorded (kApplied or kDeadLettered)
	ReasonText reason; // dead-letter reason, or why a retry is needed
	ErrorText description;
	double apply_ms;
	int attempts;             // failed attempts before this one (from sbpg.retries)
	TimestampTz next_attempt; // kTransient, kDelayed: when to try again
	bool defer;               // kTransient, kDelayed: set the message aside on the broker until then
	bool gave_up;             // kDeadLettered with MaxRetriesExceeded
	bool stale;               // its sequence number is recorded for another message (entity recreated)
	bool in_mapping;          // its declarative mapping was running when its attempt failed
	bool timed_out;           // its failure was the handler time limit (handler_timeout_ms)
	int failed_errcode;       // set when it failed in a pass without subtransactions
	bool set_timed_out;       // a set-based handler's call with it ran out of time in such a pass
	ErrorText failed_error;   // also, with resume_dead_letter: the recorded "Reason: description"
	bool resume_dead_letter;  // a stopped message sbpg.resume_session asked to dead-letter
};

struct BatchResult {
	uint64 xid;            // the (last) transaction that recorded the batch
	bool handler_unusable; // the handler is missing or run_as may not execute it
	ErrorText handler_error;
	bool isolated;         // the batch failed as a whole and was applied message by message
	ErrorText batch_error; // the error that made it isolate
	int batch_sqlerrcode;  // its SQLSTATE
	TimestampTz committed_at;
};

// Applies items[0..n) and commits durably (flushed whatever synchronous_commit says). Also
// stamps settled_at on inbox rows whose settlement the broker confirmed (seqs / message ids).
void ApplyBatch(const SubConfig *cfg, ApplyItem *items, int n, const int64 *confirmed_seqs, int nseqs,
                const char *const *confirmed_ids, int nids, BatchResult *out);

// Only the settled_at stamping, in its own transaction.
void StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids);

// Deletes up to `limit` confirmed inbox rows older than retention_s, oldest first and recorded at
// *from or later (0: any), and up to `limit` retry rows of messages not seen for that long, in one
// short transaction; returns how many inbox rows (*retries_removed: retry rows) and moves *from to
// the newest recorded_at it removed.
int64 PruneInbox(const SubConfig *cfg, int retention_s, int limit, int64 *retries_removed, TimestampTz *from);

// One minute of a subscription's history (sbpg.stats_history); a percentile below 0 is unknown
// (no sample in that minute).
struct MinuteRow {
	TimestampTz minute; // its start
	uint64 received, applied, dead_lettered, duplicates, retries, batches;
	double apply_p50, apply_p99, lag_p50, lag_p99;
};

// Adds the minute to sbpg.stats_minutes (a worker restarted within the minute adds to the row its
// predecessor wrote) and removes the subscription's rows older than keep_min minutes, in one short
// transaction.
void RecordMinute(const SubConfig *cfg, const MinuteRow *row, int keep_min);

// A session state the broker has not accepted yet (sbpg.session_states), copied into cxt.
struct SessionStateRow {
	char *session_id;
	bool has_state; // false: the state is NULL (the broker's is removed)
	char *state;
	size_t state_len;
	int64 version;
};
// Whether a handler wrote a session's state since the last call (then the worker sends the
// states the broker has not accepted; session_state.cpp).
bool TakeStateWritten();
// Up to max such rows of the subscription, oldest write first, in their own short transaction.
int UnsyncedSessionStates(const SubConfig *cfg, int max, MemoryContext cxt, SessionStateRow *out);
// Records that the broker accepted these versions (a later write stays unsynced); committed lazily:
// a lost record only sends the state again.
void MarkSessionStatesSynced(const SubConfig *cfg, const char *const *session_ids, const int64 *versions, int n);

// Deferred messages due for their next attempt (up to max, soonest first).
int DueDeferred(const SubConfig *cfg, int64 *out, int max);

// The broker did not hand over a deferred message (locked elsewhere, not deferred yet, gone):
// ask again in a minute. Rows of messages never found go with retention (after a week at least).
void PostponeDeferred(const SubConfig *cfg, int64 seq);

} // namespace sbpg::pg
