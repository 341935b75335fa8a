// src/pg/pass.cpp
//   One batch, one transaction. For each message: the inbox says whether it was already decided
//   (a redelivery is settled again with the recorded outcome, never applied twice); otherwise its
//   tenant code runs as run_as (tenant.cpp); the outcome goes to sbpg.inbox and to NOTIFY in the
//   same transaction (outcome.cpp).
//
//   The batch first runs without savepoints (one subtransaction-free transaction, so the 64-entry
//   subtransaction cache never overflows in the common case). If anything fails, it is rolled
//   back and the batch runs again message by message, each in a subtransaction, at most
//   kMaxSubxacts per transaction: a failing message then undoes only its own work. A transaction
//   of that pass that fails as a whole is run again one message per transaction, and a message
//   whose own transaction fails has its failure recorded in another (RecordFailure). After COMMIT
//   the commit record is flushed before the caller may settle anything.
//
//   The state of a pass is a Pass (pass.hpp) in ApplyBatch's frame, handed to every step; the
//   error recovery of a pass reads which message was running from it. Everything here runs inside
//   PgGuard and owns no C++ objects with destructors.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/inbox.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/retry.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/tenant.hpp"
#include "sbpg/pg/test_hooks.hpp"

#include <algorithm>
#include <cstring>
#include <ctime>

namespace sbpg::pg {

namespace {

constexpr int kMaxSubxacts = 50; // per transaction in the isolated pass (the cache holds 64)

// The settlements the broker confirmed, stamped with the first pass that commits.
struct Confirmed {
	const int64 *seqs;
	int nseqs;
	const char *const *ids;
	int nids;
};

// A fresh pass over cfg's batch.
void
StartPass(Pass *pass, const SubConfig *cfg) {
	memset(pass, 0, sizeof *pass);
	pass->cfg = cfg;
	pass->applying = pass->first_applied = -1;
}

double
MsSince(const struct timespec &t0) {
	struct timespec t1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (t1.tv_sec - t0.tv_sec) * 1000.0 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
}

void
DescribeError(const ErrorData *e, ErrorText *out) {
	if (e->detail)
		FormatText(out, "%s (SQLSTATE %s; %s)", e->message, unpack_sql_state(e->sqlerrcode), e->detail);
	else
		FormatText(out, "%s (SQLSTATE %s)", e->message, unpack_sql_state(e->sqlerrcode));
}

// Dead-letters a message the worker decided on itself (it could not be decoded, its JSON is
// invalid, its schema refused it): the handler never sees it. False for the others.
bool
DecidedWithoutHandler(Pass *pass, ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	if (!m->decode_error.empty()) {
		SetReason(it, "MalformedMessage", m->decode_error.c_str());
		Record(pass, it, kDeadLettered);
		return true;
	}
	if (m->json == JsonVerdict::Invalid) {
		ErrorText desc;
		FormatText(&desc, "content type %s but the body is %s", m->content_type.c_str(), m->json_error.c_str());
		SetReason(it, "InvalidJson", desc.c_str());
		Record(pass, it, kDeadLettered);
		return true;
	}
	if (!m->schema_reason.empty()) {
		// Decided on the AMQP thread (docs/schemas.md): the handler is not called.
		SetReason(it, m->schema_reason.c_str(), m->schema_error.c_str());
		Record(pass, it, kDeadLettered);
		return true;
	}
	return false;
}

// What tenant code is applying, for pg_stat_activity and the server log (TenantActivity).
struct Applying {
	const Pass *pass;
	const ReceivedMessage *m; // one message, or
	int n;                    // a set-based call's size, with m its first message
};

// How the activity and the log name a message: by its sequence number (its id is tenant data of
// any length; the log line of its outcome has it).
void
MessageLabel(const ReceivedMessage *m, char *out, size_t size) {
	if (m->has_sequence_number)
		snprintf(out, size, "message %lld", static_cast<long long>(m->sequence_number));
	else
		snprintf(out, size, "a message without a sequence number");
}

// The message a line is logged for, with its trace context, so that one producer's request can be
// followed into the server log.
void
ApplyingContext(void *arg) {
	const Applying *a = static_cast<const Applying *>(arg);
	const ReceivedMessage *m = a->m;
	if (a->n > 1) {
		errcontext("sbpg: applying %d messages of subscription \"%s\" in one call of its set-based handler", a->n,
		           a->pass->cfg->name);
		return;
	}
	char label[64];
	MessageLabel(m, label, sizeof label);
	if (m->traceparent.empty())
		errcontext("sbpg: applying %s of subscription \"%s\"", label, a->pass->cfg->name);
	else
		errcontext("sbpg: applying %s of subscription \"%s\" (traceparent %s)", label, a->pass->cfg->name,
		           m->traceparent.c_str());
}

// While tenant code runs: pg_stat_activity's query names the message, with its trace context as a
// comment in the form sqlcommenter tools read, and every line logged meanwhile (a handler's RAISE
// WARNING, auto_explain's plans, log_lock_waits) says which message it belongs to. Pops itself
// with End; on an error, the PG_TRY of the pass or subtransaction restores the context stack.
struct TenantActivity {
	Applying what;
	ErrorContextCallback cb;

	void Begin(const Pass *pass, ApplyItem *const *set, int n) {
		const ReceivedMessage *m = set[0]->msg;
		what = {pass, m, n};
		SetApplying(pass->cfg->name, set, n);
		char text[256], label[64];
		MessageLabel(m, label, sizeof label);
		if (n > 1)
			snprintf(text, sizeof text, "sbpg: applying %d messages of subscription \"%s\" (the first: %s)", n,
			         pass->cfg->name, label);
		else if (m->traceparent.empty())
			snprintf(text, sizeof text, "sbpg: applying %s of subscription \"%s\"", label, pass->cfg->name);
		else
			snprintf(text, sizeof text, "sbpg: applying %s of subscription \"%s\" /*traceparent='%s'*/", label,
			         pass->cfg->name, m->traceparent.c_str());
		pgstat_report_activity(STATE_RUNNING, text);
		cb.callback = ApplyingContext;
		cb.arg = &what;
		cb.previous = error_context_stack;
		error_context_stack = &cb;
	}
	// Back to the batch: what follows (the inbox row, NOTIFY, COMMIT and its flush) is no message's.
	void End() {
		ClearApplying();
		error_context_stack = cb.previous;
		pgstat_report_activity(STATE_RUNNING, "sbpg: applying a batch");
	}
};

// Applies one message in the current (sub)transaction. Errors propagate.
void
ApplyOne(Pass *pass, ApplyItem *it, MemoryContext msgcxt) {
	if (DecidedWithoutHandler(pass, it))
		return;
	MemoryContext old = MemoryContextSwitchTo(msgcxt);
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	TenantActivity activity;
	ApplyItem *one[1] = {it};
	activity.Begin(pass, one, 1);
	RunTenantCode(pass, it);
	activity.End();
	MemoryContextSwitchTo(old);
	it->apply_ms = MsSince(t0);
	Record(pass, it, kApplied);
	MemoryContextReset(msgcxt);
}

// After a failed attempt in a subtransaction: when it failed because another worker of the
// subscription recorded the message meanwhile, it is a duplicate of that record (looked up again
// now that the other's commit is visible), not a failure. True when it was.
bool
RecordedElsewhere(Pass *pass, ApplyItem *it) {
	if (!TakeRecordedElsewhere())
		return false;
	it->status = kPending;
	LookupDuplicates(pass->cfg, it, 0, 1);
	if (it->status != kDuplicate)
		return false; // the other's transaction did not commit after all: an ordinary failure
	Notify(pass, it);
	return true;
}

// Applies one message in a subtransaction of its own; its failure is recorded in the enclosing
// transaction.
void
ApplyIsolated(Pass *pass, ApplyItem *it, MemoryContext msgcxt) {
	ErrorData *e = nullptr;
	if (InSubtransaction(
	        &pass->clock, [&] { ApplyOne(pass, it, msgcxt); }, &e))
		return;
	MemoryContextReset(msgcxt);
	if (RecordedElsewhere(pass, it)) {
		(void)RunAsFailed(&pass->clock, e->sqlerrcode);
		FreeErrorData(e);
		return;
	}
	it->timed_out = RunAsFailed(&pass->clock, e->sqlerrcode);
	ErrorText desc;
	DescribeError(e, &desc);
	FailItem(pass, it, e->sqlerrcode, desc.c_str());
	FreeErrorData(e);
}

// Whether items[i] must wait because an earlier message of its session in the batch (items are
// in the order the session delivered them) waits for its next attempt or is itself blocked: a
// session is applied in order. Earlier items' statuses are final here (in the isolated pass, those
// of earlier chunks were committed; those of this chunk were decided before i).
bool
BlockedBySession(const ApplyItem *items, int i) {
	const ReceivedMessage *m = items[i].msg;
	if (!m->in_session)
		return false;
	for (int j = 0; j < i; ++j) {
		const ReceivedMessage *o = items[j].msg;
		int st = items[j].status;
		if (o->in_session && (st == kTransient || st == kDelayed || st == kBlocked) && o->session_id == m->session_id)
			return true;
	}
	return false;
}

// Marks items[i] blocked when BlockedBySession says so (a pending message only: a redelivery of an
// applied one is answered as a duplicate whatever waits before it). True when it is.
bool
Block(ApplyItem *items, int i) {
	if (items[i].status != kPending || !BlockedBySession(items, i))
		return false;
	items[i].status = kBlocked;
	// A failure it had in the first pass is not recorded: it runs again once its turn comes.
	items[i].failed_errcode = 0;
	items[i].set_timed_out = false;
	return true;
}

// Whether the worker decides the item itself, without tenant code (DecidedWithoutHandler).
bool
DecidesWithoutHandler(const ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	return !m->decode_error.empty() || m->json == JsonVerdict::Invalid || !m->schema_reason.empty();
}

// What a pass does with an item before any tenant code: a redelivery is notified again, a message
// waiting for its time is left alone, and in the isolated pass a message that failed on its own in
// the first pass has that attempt recorded instead of running again. True when the item needs
// nothing more in this pass.
bool
DoneBeforeApply(Pass *pass, ApplyItem *it, bool isolate) {
	if (it->status == kDuplicate) {
		Notify(pass, it);
		return true;
	}
	if (it->status == kDelayed)
		return true;
	if (it->status == kPending && it->resume_dead_letter) {
		// sbpg.resume_session(..., dead_letter => true): the message that stopped its session is
		// dead-lettered for the reason it failed, without running again.
		SplitRecordedReason(it, it->failed_error.c_str());
		it->failed_error.Clear();
		it->resume_dead_letter = false;
		Record(pass, it, kDeadLettered);
		return true;
	}
	if (isolate && it->failed_errcode) {
		int code = it->failed_errcode;
		it->failed_errcode = 0;
		FailItem(pass, it, code, it->failed_error.c_str());
		it->timed_out = false;
		return true;
	}
	return false;
}

// One message's tenant code: in the first pass directly (its failure fails the pass, which then
// knows which message ran), in the isolated pass in a subtransaction of its own.
void
ApplyMessage(Pass *pass, ApplyItem *items, int i, bool isolate, MemoryContext msgcxt) {
	if (isolate) {
		ApplyIsolated(pass, &items[i], msgcxt);
		return;
	}
	pass->applying = i;
	if (pass->first_applied < 0)
		pass->first_applied = i;
	ApplyOne(pass, &items[i], msgcxt);
	pass->applying = -1;
}

// A set-based handler's call for set[0..n), recording each message applied.
void
ApplySetOnce(Pass *pass, ApplyItem *const *set, int n, MemoryContext msgcxt) {
	MemoryContext old = MemoryContextSwitchTo(msgcxt);
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	TenantActivity activity;
	activity.Begin(pass, set, n);
	RunSetHandler(pass, set, n);
	activity.End();
	MemoryContextSwitchTo(old);
	double ms = MsSince(t0) / n;
	for (int i = 0; i < n; ++i) {
		set[i]->apply_ms = ms;
		Record(pass, set[i], kApplied);
	}
	MemoryContextReset(msgcxt);
}

void ApplySetOneByOne(Pass *pass, ApplyItem *const *set, int n, MemoryContext msgcxt);

// The same in a subtransaction; when the call fails, the set is split in halves, each tried again
// in a subtransaction of its own, until the failing messages are alone: each of those has its
// failure recorded (dead-letter or retry, by the error), every other message is applied once.
void
ApplySetIsolated(Pass *pass, ApplyItem *const *set, int n, MemoryContext msgcxt) {
	ErrorData *e = nullptr;
	if (InSubtransaction(
	        &pass->clock, [&] { ApplySetOnce(pass, set, n, msgcxt); }, &e))
		return;
	MemoryContextReset(msgcxt);
	if (n == 1 && RecordedElsewhere(pass, set[0])) {
		(void)RunAsFailed(&pass->clock, e->sqlerrcode);
		FreeErrorData(e);
		return;
	}
	bool timed_out = RunAsFailed(&pass->clock, e->sqlerrcode);
	if (n == 1) {
		ApplyItem *it = set[0];
		it->timed_out = timed_out;
		ErrorText desc;
		DescribeError(e, &desc);
		FailItem(pass, it, e->sqlerrcode, desc.c_str());
		it->timed_out = false;
		FreeErrorData(e);
		return;
	}
	FreeErrorData(e);
	if (timed_out) {
		// Halving would give every half a fresh time limit: a message that hangs would cost one
		// limit per level. One call per message instead, each with its own limit.
		ApplySetOneByOne(pass, set, n, msgcxt);
		return;
	}
	ApplySetIsolated(pass, set, n / 2, msgcxt);
	ApplySetIsolated(pass, set + n / 2, n - n / 2, msgcxt);
}

void
ApplySetOneByOne(Pass *pass, ApplyItem *const *set, int n, MemoryContext msgcxt) {
	for (int i = 0; i < n; ++i)
		ApplySetIsolated(pass, set + i, 1, msgcxt);
}

// With a set-based handler: the messages of items[lo..hi) that go to it, in one call (in the
// first pass, whose failure fails the pass; when isolated, halved until the failures are found).
// Duplicates, delayed messages, messages the worker decides itself and mapped ones are handled
// one by one, as with a per-message handler.
void ApplyRangeSetInOrder(Pass *pass, ApplyItem *items, int lo, int hi, bool isolate, MemoryContext msgcxt,
                          ApplyItem **set);

void
ApplyRangeSet(Pass *pass, ApplyItem *items, int lo, int hi, bool isolate, MemoryContext msgcxt) {
	ApplyItem **set = static_cast<ApplyItem **>(palloc(sizeof(ApplyItem *) * (hi - lo)));
	for (int i = lo; i < hi; ++i)
		if (items[i].msg->in_session) {
			ApplyRangeSetInOrder(pass, items, lo, hi, isolate, msgcxt, set);
			return;
		}
	int n = 0;
	for (int i = lo; i < hi; ++i) {
		ApplyItem *it = &items[i];
		if (DoneBeforeApply(pass, it, isolate))
			continue;
		if (HasMapping(pass, it)) {
			ApplyMessage(pass, items, i, isolate, msgcxt);
			continue;
		}
		if (!DecidedWithoutHandler(pass, it))
			set[n++] = it;
	}
	if (n == 0)
		return;
	if (!isolate) {
		pass->set_call = true; // a failure blames no single message (NoteFailure)
		ApplySetOnce(pass, set, n, msgcxt);
		pass->set_call = false;
		return;
	}
	bool timed_out = false;
	for (int i = 0; i < n; ++i) {
		timed_out |= set[i]->set_timed_out;
		set[i]->set_timed_out = false;
	}
	if (timed_out) // the first pass's call ran out of time: no halving (see ApplySetIsolated)
		ApplySetOneByOne(pass, set, n, msgcxt);
	else
		ApplySetIsolated(pass, set, n, msgcxt);
}

// The same for a batch with session messages, which must take effect in batch order: in the first
// pass, the set-based handler's call takes the messages up to the next one that a mapping applies
// or the worker decides itself, which then follows it; in the isolated pass, one call per message
// (halving could apply a later message of a session before an earlier one that fails), each
// message blocked once an earlier one of its session waits.
void
ApplyRangeSetInOrder(Pass *pass, ApplyItem *items, int lo, int hi, bool isolate, MemoryContext msgcxt,
                     ApplyItem **set) {
	int n = 0;
	auto flush = [&] {
		if (n == 0)
			return;
		pass->set_call = true; // a failure blames no single message (NoteFailure)
		ApplySetOnce(pass, set, n, msgcxt);
		pass->set_call = false;
		n = 0;
	};
	for (int i = lo; i < hi; ++i) {
		ApplyItem *it = &items[i];
		if (Block(items, i) || DoneBeforeApply(pass, it, isolate))
			continue;
		bool mapped = HasMapping(pass, it);
		if (mapped || DecidesWithoutHandler(it)) {
			if (!isolate)
				flush();
			if (mapped)
				ApplyMessage(pass, items, i, isolate, msgcxt);
			else
				(void)DecidedWithoutHandler(pass, it);
			continue;
		}
		if (isolate) {
			it->set_timed_out = false;
			set[0] = it;
			ApplySetIsolated(pass, set, 1, msgcxt);
			continue;
		}
		set[n++] = it;
	}
	if (!isolate)
		flush();
}

// Applies items[lo..hi) in the current transaction; with isolate, each in a subtransaction whose
// failure records a dead-letter (permanent errors) or a retry (transient).
void
ApplyRange(Pass *pass, ApplyItem *items, int lo, int hi, bool isolate) {
	MemoryContext msgcxt = AllocSetContextCreate(TopTransactionContext, "sbpg message", ALLOCSET_DEFAULT_SIZES);
	if (pass->set_handler) {
		ApplyRangeSet(pass, items, lo, hi, isolate, msgcxt);
		return;
	}
	for (int i = lo; i < hi; ++i)
		if (!Block(items, i) && !DoneBeforeApply(pass, &items[i], isolate))
			ApplyMessage(pass, items, i, isolate, msgcxt);
}

// Test fault fail_commit#<message id> (test_hooks.hpp): the transaction that applied that message
// fails as a whole just before COMMIT, as a deferred constraint would.
void
TestCommitFault(const ApplyItem *items, int lo, int hi) {
	for (int i = lo; i < hi; ++i) {
		const char *id = items[i].msg->message_id.c_str();
		if (items[i].status == kApplied && testing::Fires(testing::kFailCommit, id))
			ereport(ERROR, (errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
			                errmsg("sbpg test fault: the transaction that applied message %s fails at COMMIT", id)));
	}
}

constexpr spi::PlanSpec kLockSubscription = {
    "lock the subscription's row",
    "SELECT 1 FROM sbpg.subscriptions s WHERE s.name" OP_EQ "$1 FOR KEY SHARE OF s",
    1,
    {TEXTOID},
    false,
    true,
};

// The subscription's row, locked FOR KEY SHARE until the pass ends (taken first in every pass):
// sbpg.drop_subscription (FOR UPDATE) then waits for a batch in flight and deletes its inbox rows
// too, and a batch that comes after the drop finds no row and records nothing (the launcher is
// ending the worker).
void
LockSubscription(const SubConfig *cfg) {
	Datum arg = CStringGetTextDatum(cfg->name);
	if (spi::Exec(kLockSubscription, &arg, nullptr, SPI_OK_SELECT).rows == 0)
		ereport(ERROR,
		        (errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("sbpg: subscription \"%s\" no longer exists", cfg->name),
		         errdetail("It was dropped while this batch was waiting; nothing of the batch is recorded, "
		                   "and the broker delivers its messages again to whoever consumes the entity next.")));
}

// What a pass knows before it applies anything: the transaction, whether it notifies, which
// items are redeliveries or wait for a later attempt, the mappings.
void
LookUpItems(Pass *pass, ApplyItem *items, int lo, int hi, BatchResult *out) {
	const SubConfig *cfg = pass->cfg;
	pass->xid = U64FromFullTransactionId(GetTopFullTransactionId());
	out->xid = pass->xid;
	LookupDuplicates(cfg, items, lo, hi);
	ReplaceStale(cfg, items, lo, hi);
	LookupRetries(cfg, items, lo, hi);
	LookupStoppedSessions(cfg, items, lo, hi);
	LoadMappings(pass);
}

// Forgets what an earlier pass found out about the item (`in_mapping`, `failed_errcode` stay:
// they describe the attempt that failed).
void
ResetItem(ApplyItem *it) {
	it->status = kPending;
	it->reason.Clear();
	it->description.Clear();
	it->apply_ms = 0;
	it->attempts = 0;
	it->next_attempt = 0;
	it->defer = false;
	it->gave_up = false;
	it->stale = false;
	it->resume_dead_letter = false; // LookupRetries reads it again
}

// The work of one pass, inside its transaction.
void
PassBody(Pass *pass, ApplyItem *items, int lo, int hi, bool isolate, const Confirmed *confirmed, BatchResult *out) {
	// First, before any inbox or retry row is touched: drop_subscription locks the row and then
	// deletes those rows, so taking them in the other order could deadlock with it.
	LockSubscription(pass->cfg);
	CheckNotifyQueue(pass);
	Stamp(pass->cfg, confirmed->seqs, confirmed->nseqs, confirmed->ids, confirmed->nids);
	ErrorText why;
	why.Clear();
	if (!HandlerUsable(pass, &why)) {
		out->handler_unusable = true;
		out->handler_error = why;
		for (int i = lo; i < hi; ++i) {
			items[i].status = kTransient;
			items[i].next_attempt = GetCurrentTimestamp() + 5 * USECS_PER_SEC;
			SetReason(&items[i], "HandlerUnusable", why.c_str());
		}
	} else {
		LookUpItems(pass, items, lo, hi, out);
		ApplyRange(pass, items, lo, hi, isolate);
	}
	TestCommitFault(items, lo, hi);
}

// A pass without subtransactions failed with e: when the message being applied failed by its own
// fault (a permanent error, the time limit, or a transient one before any other message of the
// pass ran), remember it, so the isolated pass records this attempt's failure instead of running
// it again. A deadlock over locks that earlier messages took is the batch's, and is tried again
// message by message.
void
NoteFailure(Pass *pass, ApplyItem *items, int lo, int hi, const ErrorData *e, BatchResult *out) {
	(void)TakeRecordedElsewhere(); // the next pass looks every message up again
	DescribeError(e, &out->batch_error);
	out->batch_sqlerrcode = e->sqlerrcode;
	bool timed_out = RunAsFailed(&pass->clock, e->sqlerrcode);
	int k = pass->applying;
	if (pass->set_call && timed_out)
		for (int i = lo; i < hi; ++i)
			items[i].set_timed_out = true;
	if (k >= lo && k < hi && (!IsTransient(e->sqlerrcode) || timed_out || k == pass->first_applied)) {
		items[k].failed_errcode = e->sqlerrcode;
		items[k].timed_out = timed_out;
		items[k].failed_error = out->batch_error;
	}
	pass->applying = -1;
}

// One transaction over items[lo..hi). isolate: each message in a subtransaction. Returns false
// (after rolling back) when the pass failed; out->batch_error says why.
bool
RunPass(Pass *pass, const SubConfig *cfg, ApplyItem *items, int lo, int hi, bool isolate, const Confirmed *confirmed,
        BatchResult *out) {
	MemoryContext caller = CurrentMemoryContext;
	volatile bool ok = true;
	for (int i = lo; i < hi; ++i)
		ResetItem(&items[i]);
	StartPass(pass, cfg);
	PG_TRY();
	{
		spi::BeginShort();
		PassBody(pass, items, lo, hi, isolate, confirmed, out);
		spi::EndShort(spi::Commit::kFlushed);
		out->committed_at = GetCurrentTimestamp();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		ErrorData *e = CopyErrorData();
		FlushErrorState();
		NoteFailure(pass, items, lo, hi, e, out);
		FreeErrorData(e);
		AbortCurrentTransaction();
		MemoryContextSwitchTo(caller);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	return ok;
}

// Records the failure of a message whose own transaction failed, in a transaction of its own.
// Errors propagate: then the server itself is in trouble and the caller retries the batch.
void
RecordFailure(Pass *pass, const SubConfig *cfg, ApplyItem *it, int sqlerrcode, const ErrorText &error,
              BatchResult *out) {
	ErrorText desc = error;
	ResetItem(it);
	StartPass(pass, cfg);
	spi::BeginShort();
	LockSubscription(cfg);
	CheckNotifyQueue(pass);
	LookUpItems(pass, it, 0, 1, out);
	if (it->status == kDuplicate)
		Notify(pass, it);
	else if (it->status == kPending)
		FailItem(pass, it, sqlerrcode, desc.c_str());
	it->timed_out = false;
	spi::EndShort(spi::Commit::kFlushed);
	out->committed_at = GetCurrentTimestamp();
}

} // namespace

void
ApplyBatch(const SubConfig *cfg, ApplyItem *items, int n, const int64 *seqs, int nseqs, const char *const *ids,
           int nids, BatchResult *out) {
	memset(out, 0, sizeof *out);
	pgstat_report_activity(STATE_RUNNING, "sbpg: applying a batch");
	Pass pass;
	const Confirmed all = {seqs, nseqs, ids, nids}, none = {nullptr, 0, nullptr, 0};
	if (RunPass(&pass, cfg, items, 0, n, false, &all, out))
		return;
	// Apply message by message, in chunks that keep subtransactions within PostgreSQL's cache.
	out->isolated = true;
	bool stamped = false;
	for (int lo = 0; lo < n; lo += kMaxSubxacts) {
		int hi = std::min(n, lo + kMaxSubxacts);
		if (RunPass(&pass, cfg, items, lo, hi, true, stamped ? &none : &all, out)) {
			stamped = true;
			continue;
		}
		// The chunk's transaction itself failed (at COMMIT: a deferred constraint, a serialization
		// failure; or the server is in trouble): one transaction per message, and a message whose
		// own transaction fails has that failure recorded in another.
		for (int i = lo; i < hi; ++i) {
			if (RunPass(&pass, cfg, items, i, i + 1, false, &none, out))
				continue;
			RecordFailure(&pass, cfg, &items[i], out->batch_sqlerrcode, out->batch_error, out);
		}
	}
}

} // namespace sbpg::pg
