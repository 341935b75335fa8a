// sbpg/pg/retry.hpp
//   Retries (retry.cpp): which failures are transient, sbpg.retries rows, the schedule of the next
//   attempt, deferral, and the one place that decides what a failed attempt becomes. Include after
//   postgres.h, sbpg/pg/apply.hpp and sbpg/pg/pass.hpp, only from the files that apply batches.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/retry.hpp"
#endif

namespace sbpg::pg {

struct Pass;

// Errors a retry may cure: concurrency, resources, the system; everything else is permanent.
bool IsTransient(int sqlerrcode);

// Loads earlier failed attempts of items[lo..hi); a message whose next attempt is still to come
// becomes kDelayed (and is marked deferred when it will be set aside on the broker).
void LookupRetries(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// A session stopped by one of its messages (session_failure = stop) holds back its later messages
// even when that message does not come again (the broker dead-lettered or expired it): each
// pending message of such a session with a higher sequence number becomes kDelayed, never due.
void LookupStoppedSessions(const SubConfig *cfg, ApplyItem *items, int lo, int hi);
// The item reached an outcome: its retry row goes (or, for a fetched deferred message, waits for
// the broker's confirmation of the settlement).
void DeleteRetry(const SubConfig *cfg, const ApplyItem *it);

// A message's attempt failed with sqlerrcode (desc describes the error): a transient error
// schedules a retry (or dead-letters with MaxRetriesExceeded past max_retries), any other
// dead-letters it with the reason FailureReason gives. Recorded in the pass's transaction.
void FailItem(Pass *pass, ApplyItem *it, int sqlerrcode, const char *desc);

} // namespace sbpg::pg
