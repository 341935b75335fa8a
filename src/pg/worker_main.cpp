// src/pg/worker_main.cpp
//   A worker's entry point and main loop. The main thread (the only one that calls PostgreSQL)
//   waits on its latch and on an eventfd the AMQP thread writes to; each round it reports what the
//   other threads said, takes up to batch_size messages (held ones that are due first) and applies
//   them (worker.cpp), then publishes its statistics and does its housekeeping (stamping confirmed
//   settlements, pruning the inbox, fetching due deferred messages, refreshing schemas).
//
//   The Worker owns C++ objects; every PostgreSQL call from it goes through PgGuard. The process
//   exits (proc_exit, or ereport(FATAL) for an escaped C++ exception) only in sbpg_worker_main,
//   after the Worker and every other C++ frame are gone.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <unistd.h>

extern "C" {
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"
}

#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/worker.hpp"

namespace sbpg::pg {

// Read by OnExit, which PostgreSQL calls at process exit (after FATAL too), when no Worker may be
// reachable any more: pointers to the live consumer and token source (cleared by ~Worker), and
// this worker's shared-memory slot.
Consumer *g_consumer = nullptr;
TokenSource *g_tokens = nullptr;
WorkerSlot *g_slot = nullptr;

TimestampTz
ToTimestamp(int64_t unix_ms) {
	return static_cast<TimestampTz>(unix_ms) * 1000 -
	       static_cast<TimestampTz>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * USECS_PER_SEC;
}

void
SetState(int state) {
	SpinLockAcquire(&g_slot->mutex);
	g_slot->state = state;
	SpinLockRelease(&g_slot->mutex);
}

void
SetError(std::string_view msg) {
	SpinLockAcquire(&g_slot->mutex);
	g_slot->last_error.Set(msg);
	g_slot->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&g_slot->mutex);
}

void
Log(int level, const std::string &text) {
	PgError err;
	PgGuard([&] { ereport(level, (errmsg_internal("%s", text.c_str()))); }, &err);
}

ConfirmedKeys
CollectConfirmed(const std::vector<InboxKey> &keys) {
	ConfirmedKeys out;
	for (auto &k : keys) {
		if (k.has_seq)
			out.seqs.push_back(k.seq);
		else if (!k.message_id.empty())
			out.ids.push_back(k.message_id.c_str());
	}
	return out;
}

void
Publish(Stats &st, bool batch, TimestampTz at, MinuteStats *minute) {
	if (minute->start == 0) { // the first minute starts with the first count
		TimestampTz now = GetCurrentTimestamp();
		minute->start = now - now % (60 * USECS_PER_SEC);
	}
	minute->received += st.received;
	minute->applied += st.applied;
	minute->dead += st.dead;
	minute->dup += st.dup;
	minute->retries += st.retries;
	minute->batches += batch ? 1 : 0;
	for (float v : st.apply_ms)
		minute->apply_ms.Add(v);
	for (float v : st.lag_ms)
		minute->lag_ms.Add(v);
	int64 now_s = GetCurrentTimestamp() / USECS_PER_SEC;
	SpinLockAcquire(&g_slot->mutex);
	g_slot->received += st.received;
	g_slot->applied += st.applied;
	g_slot->dead_lettered += st.dead;
	g_slot->duplicates += st.dup;
	g_slot->abandoned += st.abandoned;
	g_slot->settle_failures += st.settle_failures;
	g_slot->retries += st.retries;
	g_slot->retried_messages += st.retried;
	g_slot->max_retries_exceeded += st.gave_up;
	g_slot->deferred += st.deferred;
	if (batch) {
		++g_slot->batches;
		g_slot->last_batch_at = at;
	}
	for (float v : st.apply_ms) {
		g_slot->apply_ms[g_slot->apply_next] = v;
		g_slot->apply_next = (g_slot->apply_next + 1) % kSamples;
		g_slot->apply_count = std::min<uint32>(g_slot->apply_count + 1, kSamples);
	}
	for (float v : st.lag_ms) {
		g_slot->lag_ms[g_slot->lag_next] = v;
		g_slot->lag_next = (g_slot->lag_next + 1) % kSamples;
		g_slot->lag_count = std::min<uint32>(g_slot->lag_count + 1, kSamples);
	}
	uint64 settled = st.applied + st.dead + st.dup;
	if (settled) {
		int b = static_cast<int>(now_s % kRateSeconds);
		if (g_slot->rate_second[b] != now_s) {
			g_slot->rate_second[b] = now_s;
			g_slot->rate_count[b] = 0;
		}
		g_slot->rate_count[b] += static_cast<uint32>(settled);
	}
	SpinLockRelease(&g_slot->mutex);
	st = Stats();
}

namespace {

// Runs at process exit (also after FATAL from SIGTERM): stop the AMQP thread before exit()
// destroys static objects under it.
void
OnExit(int, Datum) {
	if (g_consumer)
		g_consumer->Stop();
	if (g_tokens)
		g_tokens->Abort();
	if (g_slot && EndedByTimeLimit()) {
		const char *why =
		    "tenant code went on past handler_timeout_ms after its statement was cancelled, so the worker "
		    "ended; the broker delivers the message again";
		ereport(LOG, (errmsg("sbpg: subscription \"%s\": %s", g_slot->name, why)));
		SetError(why);
	}
	if (g_slot) {
		SpinLockAcquire(&g_slot->mutex);
		g_slot->pid = 0;
		if (g_slot->state != kStateFailed && g_slot->state != kStatePaused)
			g_slot->state = kStateStopped;
		SpinLockRelease(&g_slot->mutex);
	}
}

} // namespace

Worker::~Worker() {
	if (consumer_)
		consumer_->Stop();
	if (tokens_)
		tokens_->Abort();
	g_consumer = nullptr;
	g_tokens = nullptr;
}

int
Worker::Run() {
	if (!Setup())
		return 0;
	Loop();
	return exit_code_;
}

void
Worker::Loop() {
	std::vector<ReceivedMessage> msgs;
	PgError err;
	bool more = false;
	while (!stop_) {
		WaitForWork(more);
		if (!Interrupts())
			continue;
		HandleEvents();
		HandleResults();
		more = false;
		if (GetCurrentTimestamp() >= paused_until_ && TakeBatch(&msgs)) {
			more = consumer_->Status().in_flight >= static_cast<uint32_t>(cfg_.batch_size);
			ProcessBatch(msgs);
			if (exit_code_)
				break;
		}
		Publish(stats_, false, 0, &minute_);
		Housekeeping();
		// Background workers report their table statistics themselves: without this, autovacuum
		// never sees the inbox grow, and never analyzes or vacuums it. (Rate-limited inside.)
		PgGuard([&] { pgstat_report_stat(false); }, &err);
	}
	// Leaving the loop by itself (a configuration change, a test fault): the open minute is written.
	// A worker ended by a signal (SIGTERM) cannot, and loses it.
	Publish(stats_, false, 0, &minute_);
	RecordHistory(GetCurrentTimestamp(), true);
}

// Waits for the latch, the eventfd, the end of a pause or the next held message's due time (at
// most a second; not at all when more messages are waiting), then drains the eventfd.
void
Worker::WaitForWork(bool more) {
	PgError err;
	long timeout = more ? 0 : 1000;
	TimestampTz now = GetCurrentTimestamp();
	if (paused_until_ > now)
		timeout = std::max<long>(1, (paused_until_ - now) / 1000);
	else if (TimestampTz due = NextDue(); due && !more)
		timeout = std::min<long>(timeout, std::max<long>(1, (due - now) / 1000 + 1));
	WaitEvent ev;
	PgGuard([&] { (void)WaitEventSetWait(wait_set_, timeout, &ev, 1, PG_WAIT_EXTENSION); }, &err);
	PgGuard([&] { ResetLatch(MyLatch); }, &err);
	uint64_t drained;
	while (read(efd_, &drained, sizeof drained) > 0) {
	}
}

// The next batch: held messages that are due, then new ones (except those of a session with a
// message held: they wait behind it), up to batch_size. False when none.
bool
Worker::TakeBatch(std::vector<ReceivedMessage> *msgs) {
	msgs->clear();
	TakeDue(msgs, static_cast<size_t>(cfg_.batch_size));
	size_t from = msgs->size();
	consumer_->TakeMessages(msgs, static_cast<size_t>(cfg_.batch_size) - msgs->size());
	QueueBehindHeld(msgs, from);
	return !msgs->empty();
}

bool
Worker::Interrupts() {
	PgError err;
	bool ok = PgGuard(
	    [&] {
		    CHECK_FOR_INTERRUPTS();
		    if (ConfigReloadPending) {
			    ConfigReloadPending = false;
			    ProcessConfigFile(PGC_SIGHUP);
			    if (ca_file_ != (guc_ca_file ? guc_ca_file : "")) {
				    ereport(LOG, (errmsg("sbpg: subscription \"%s\": sbpg.ca_file changed; restarting to use it",
				                         start_.name)));
				    stop_ = true; // the launcher starts the worker again
			    }
		    }
	    },
	    &err);
	if (!ok)
		Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": " + err.message.c_str());
	return ok;
}

void
Worker::Housekeeping() {
	TimestampTz now = GetCurrentTimestamp();
	PgError err;
	StampConfirmed(now);
	Prune(now);
	RecordHistory(now, false);
	FetchDue();
	RefreshSchemas(false);
	ConsumerStatus cst = consumer_->Status();
	// Session states the broker has not accepted (their session was not held, a request failed):
	// tried again every 10 s while sessions are received.
	if (cst.sessions && now - last_state_sync_ >= 10 * USECS_PER_SEC)
		SyncSessionStates(now);
	SpinLockAcquire(&g_slot->mutex);
	g_slot->waiting_retry = static_cast<int32>(held_.size());
	g_slot->lock_renewals = cst.lock_renewals;
	g_slot->locks_lost = cst.locks_lost;
	SpinLockRelease(&g_slot->mutex);
	PgGuard([&] { pgstat_report_activity(STATE_IDLE, "waiting for messages"); }, &err);
}

// Confirmations with no batch to ride on: stamped after a second.
void
Worker::StampConfirmed(TimestampTz now) {
	if (confirmed_.empty() || now - last_stamp_ <= USECS_PER_SEC)
		return;
	ConfirmedKeys keys = CollectConfirmed(confirmed_);
	PgError err;
	if (PgGuard(
	        [&] {
		        StampSettled(&cfg_, keys.seqs.data(), static_cast<int>(keys.seqs.size()), keys.ids.data(),
		                     static_cast<int>(keys.ids.size()));
	        },
	        &err))
		confirmed_.clear();
	else
		Log(WARNING,
		    std::string("sbpg: subscription \"") + start_.name + "\": cannot stamp settled_at: " + err.message.c_str());
	last_stamp_ = now;
}

// Retention. A round a minute (or every half retention period when that is shorter) removes
// expired rows in chunks of 1000, each its own short transaction, at most 20 chunks, and stops
// early when messages are waiting. When the round ends with expired rows left (at a sustained
// rate, a minute's expiries are far more than 20,000), the worker is behind: until it has caught
// up, every turn of the loop removes one more chunk, four times as many rows as it recorded since
// the previous chunk (at least 10, at most 10,000; 20 chunks of 1000 when no message waits), so
// that removing keeps pace with recording at any rate without ever stalling a batch for long.
// Pruning commits lazily (spi::Commit::kLazy): it costs no disk flush of its own.
void
Worker::Prune(TimestampTz now) {
	// The inbox is the subscription's: with several workers, the first one prunes it.
	if (start_.worker != 0)
		return;
	int64 prune_every = std::min<int64>(60 * USECS_PER_SEC,
	                                    std::max<int64>(USECS_PER_SEC, guc_inbox_retention_s * USECS_PER_SEC / 2));
	if (guc_inbox_retention_s <= 0) {
		prune_behind_ = false;
		return;
	}
	bool round = now - last_prune_ > prune_every;
	if (!round && !prune_behind_)
		return;
	bool waiting = consumer_->Status().in_flight > held_.size();
	int chunks = 1, limit = 1000;
	if (round || !waiting) {
		// A round, or the worker is idle: catch up in small chunks.
		chunks = 20;
	} else {
		limit = static_cast<int>(std::clamp<int64>(4 * recorded_since_prune_, 10, 10000));
	}
	if (round) {
		last_prune_ = now;
		prune_from_ = 0; // a round looks at every expired row again
	}
	recorded_since_prune_ = 0;
	PgError err;
	int64 removed = 0, retries = 0, n = 0, r = 0;
	for (int i = 0; i < chunks; ++i) {
		if (!PgGuard([&] { n = PruneInbox(&cfg_, guc_inbox_retention_s, limit, &r, &prune_from_); }, &err)) {
			Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
			                 "\": cannot prune sbpg.inbox: " + err.message.c_str());
			prune_behind_ = false; // the next round tries again
			break;
		}
		removed += n;
		retries += r;
		prune_behind_ = n >= limit;
		if (!prune_behind_)
			break;
		if (consumer_->Status().in_flight > held_.size())
			break; // messages are waiting: they come first
	}
	if (removed + retries > 0)
		Log(DEBUG1, std::string("sbpg: subscription \"") + start_.name + "\": pruned " + std::to_string(removed) +
		                " inbox and " + std::to_string(retries) + " retry rows" +
		                (prune_behind_ ? "; more are due" : ""));
}

// sbpg.stats_history: once a minute is over, its figures go to sbpg.stats_minutes (a minute with
// nothing to count too, so a chart tells an idle worker from one that was not running). A batch
// counts in the minute that is open when its figures are published, the one its commit fell in
// unless the minute turned while the batch was being settled. With `unfinished`, the open minute is
// written now (the worker is leaving its loop): the next worker adds to that row.
void
Worker::RecordHistory(TimestampTz now, bool unfinished) {
	TimestampTz this_minute = now - now % (60 * USECS_PER_SEC);
	if (guc_stats_history_min <= 0) {
		minute_ = MinuteStats{};
		minute_.start = this_minute;
		return;
	}
	if (minute_.start == 0) {
		minute_.start = this_minute;
		return;
	}
	if (this_minute <= minute_.start && !unfinished)
		return;
	MinuteRow row = {minute_.start,
	                 minute_.received,
	                 minute_.applied,
	                 minute_.dead,
	                 minute_.dup,
	                 minute_.retries,
	                 minute_.batches,
	                 minute_.apply_ms.Percentile(0.5),
	                 minute_.apply_ms.Percentile(0.99),
	                 minute_.lag_ms.Percentile(0.5),
	                 minute_.lag_ms.Percentile(0.99)};
	minute_ = MinuteStats{};
	minute_.start = this_minute;
	PgError err;
	if (!PgGuard([&] { RecordMinute(&cfg_, &row, guc_stats_history_min); }, &err))
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot write sbpg.stats_minutes: " + err.message.c_str());
}

} // namespace sbpg::pg

using namespace sbpg::pg;

// The slot travels in bgw_extra with the rest of WorkerStart; the Datum argument is unused.
void
sbpg_worker_main(Datum) {
	WorkerStart start;
	std::memcpy(&start, MyBgworkerEntry->bgw_extra, sizeof start);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	if (start.slot < 0 || start.slot >= shared->nslots)
		ereport(ERROR, (errmsg("sbpg worker started with an invalid slot %d", start.slot)));
	g_slot = &shared->slots[start.slot];
	SpinLockAcquire(&g_slot->mutex);
	g_slot->pid = MyProcPid;
	g_slot->state = kStateStarting;
	SpinLockRelease(&g_slot->mutex);
	before_shmem_exit(OnExit, 0);
	BackgroundWorkerInitializeConnectionByOid(start.database, start.user, 0);
	in_sbpg_worker = true;
	PinSessionSettings();
	pgstat_report_appname(start.name);
	pgstat_report_activity(STATE_IDLE, "starting");

	sbpg::ErrorText error{};
	int exit_code = 0;
	try {
		Worker w(start);
		exit_code = w.Run();
	} catch (const std::exception &e) {
		error.Set(e.what());
	} catch (...) {
		error.Set("unknown C++ exception");
	}
	// Past this point no C++ frame is alive.
	if (!error.Empty()) {
		SetError(error.view());
		SetState(kStateFailed);
		ereport(FATAL, (errmsg("sbpg: subscription \"%s\": %s", start.name, error.c_str())));
	}
	proc_exit(exit_code);
}
