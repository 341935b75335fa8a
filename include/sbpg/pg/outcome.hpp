// sbpg/pg/outcome.hpp
//   A message's outcome (outcome.cpp): the status names, the one builder of the outcome JSON that
//   both the NOTIFY payload and the worker's log line are made of, the reason an item carries, and
//   Record, which writes an outcome in the pass's transaction. Include after postgres.h and
//   sbpg/pg/apply.hpp, only from src/pg/.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/outcome.hpp"
#endif

#include <cstddef>

namespace sbpg::pg {

struct Pass;

// The name of an ItemStatus, as sbpg.inbox, NOTIFY and the log write it: applied, dead_lettered,
// duplicate, delayed, retry (kTransient; kPending never leaves the worker).
const char *StatusName(int status);

// Who reads the outcome JSON.
enum class OutcomeFor {
	// A NOTIFY payload, which any database user may LISTEN to: ids (each cut at 512 bytes, so a
	// payload stays far below PostgreSQL's 8000-byte limit), the status, the transaction, attempt
	// counts and a reason *code*; the description (which may quote row data) stays in sbpg.inbox.
	kNotify,
	// The server log's line: also "event", delivery_count, apply_ms, and the reason with its
	// description.
	kLog,
};

// Receives the JSON in pieces (a std::string's append, a StringInfo's appendBinaryStringInfo).
using OutcomeSink = void (*)(void *sink, const char *text, size_t len);

// Writes the outcome of one message as one JSON object. Calls no PostgreSQL function that can
// raise and allocates nothing itself, so the worker's C++ code may call it outside PgGuard.
// "attempts" is the number of attempts made so far: for retry (and delayed) the failed ones, for
// applied and dead_lettered the one that decided included.
void WriteOutcome(const char *subscription, const ApplyItem &it, uint64 xid, OutcomeFor who, OutcomeSink write,
                  void *sink);

// Sets the item's reason code and description.
void SetReason(ApplyItem *it, const char *reason, const char *description);
// Formats into *out (cut on a character boundary).
void FormatText(ErrorText *out, const char *fmt, ...) pg_attribute_printf(2, 3);

// Whether the pass notifies: a channel, and its queue not more than 90% full (otherwise a WARNING;
// a full queue would fail the COMMIT, and an outcome must always be recorded).
void CheckNotifyQueue(Pass *pass);
// The outcome's NOTIFY on the subscription's channel, when the pass notifies.
void Notify(const Pass *pass, const ApplyItem *it);
// Records status (kApplied or kDeadLettered) in the pass's transaction: the inbox row, the retry
// row gone (or kept until the broker confirms a fetched message's settlement), the NOTIFY.
void Record(Pass *pass, ApplyItem *it, int status);

} // namespace sbpg::pg
