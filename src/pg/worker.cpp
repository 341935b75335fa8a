// src/pg/worker.cpp
//   One batch of a subscription's worker (the rest of the worker: worker.hpp). It takes up to
//   batch_size messages, applies them in one transaction (pass.cpp, through apply.hpp), and only after the commit is
//   flushed hands the settlements back to the AMQP thread. Broker confirmations of earlier
//   settlements are stamped into sbpg.inbox.settled_at with the same transaction. Also here: the
//   JSON log line of a settled message, and the schema registry handed to the AMQP thread.
//
//   This file owns C++ objects (vectors, strings); every PostgreSQL call from it goes through
//   PgGuard, so a PostgreSQL error never longjmps across these frames.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern "C" {
#include "postgres.h"

#include "utils/timestamp.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/test_hooks.hpp"
#include "sbpg/pg/worker.hpp"

namespace sbpg::pg {

namespace {

// The structured log line of one settled message (the same outcome record NOTIFY carries).
std::string
MessageLogLine(const std::string &sub, const ApplyItem &it, uint64 xid) {
	std::string s = "sbpg: ";
	WriteOutcome(
	    sub.c_str(), it, xid, OutcomeFor::kLog,
	    [](void *line, const char *text, size_t len) { static_cast<std::string *>(line)->append(text, len); }, &s);
	return s;
}

} // namespace

// Versioned schemas: compiled here (pure C++, no PostgreSQL call while C++ objects are alive in a
// guarded frame) and handed to the AMQP thread, which classifies every message with them. Checked
// every 5 s; a newly registered version applies to messages received from then on.
void
Worker::RefreshSchemas(bool force) {
	if (!cfg_.validate_schemas)
		return;
	TimestampTz now = GetCurrentTimestamp();
	if (!force && now - last_schema_check_ < 5 * USECS_PER_SEC)
		return;
	last_schema_check_ = now;
	PgError err;
	int64 stamp = 0;
	if (!PgGuard([&] { stamp = SchemasStamp(); }, &err))
		return;
	if (stamp == schemas_stamp_)
		return;
	std::vector<schema::SchemaRow> list;
	if (!PgGuard([&] { LoadSchemas(&list); }, &err)) {
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot read sbpg.schemas: " + err.message.c_str());
		return;
	}
	std::vector<std::string> errors;
	std::shared_ptr<const schema::Registry> reg = schema::Registry::Build(list, &errors);
	for (auto &e : errors)
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": schema skipped: " + e);
	schema::ClassifyOptions opt;
	opt.version_property = cfg_.version_property ? cfg_.version_property : "schema_version";
	opt.unknown = cfg_.unknown_pass ? schema::UnknownPolicy::Pass : schema::UnknownPolicy::DeadLetter;
	consumer_->SetRegistry(reg, opt);
	schemas_stamp_ = stamp;
	Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": validating against " +
	             std::to_string(reg->size()) + " registered schema versions");
}

// One batch: drop what a lost connection carried, apply the rest in one transaction, then settle.
void
Worker::ProcessBatch(std::vector<ReceivedMessage> &msgs) {
	DropStale(msgs);
	if (msgs.empty())
		return;
	std::vector<ApplyItem> items(msgs.size());
	for (size_t i = 0; i < msgs.size(); ++i) {
		std::memset(&items[i], 0, sizeof items[i]);
		items[i].msg = &msgs[i];
	}
	BatchResult res;
	PgError err;
	stats_.received += msgs.size();
	if (!Apply(items, &res, &err)) {
		HoldFailedBatch(msgs, err);
		return;
	}
	AfterCommit(res);
	if (testing::Fires(testing::kExitAfterCommit)) {
		// Leave the loop before any settlement; sbpg_worker_main exits once the C++ frames are gone.
		Log(LOG,
		    std::string("sbpg: test fault ") + testing::ArmedFault() + ": exiting after commit, before settlement");
		exit_code_ = 1;
		return;
	}
	Settle(items, msgs, res);
	// A handler wrote a session's state: the commit is durable now, so the broker gets it.
	if (TakeStateWritten())
		SyncSessionStates(GetCurrentTimestamp());
}

// Messages of a connection that is gone cannot be settled: leave them to the redelivery. A new
// connection also means that what the old one carried (fetches, settlements) will never be answered.
void
Worker::DropStale(std::vector<ReceivedMessage> &msgs) {
	uint64_t gen = consumer_->Status().generation;
	if (gen != gen_) {
		gen_ = gen;
		fetching_.clear();
		for (auto it = awaiting_.begin(); it != awaiting_.end();)
			it = it->second.gen != gen ? awaiting_.erase(it) : std::next(it);
	}
	// Also those of a session this consumer no longer holds (released or its lock lost): applied
	// now, they might overtake what another receiver of that session applies meanwhile.
	msgs.erase(std::remove_if(msgs.begin(), msgs.end(),
	                          [&](const ReceivedMessage &m) {
		                          return m.connection_gen != gen || !consumer_->LinkLive(m);
	                          }),
	           msgs.end());
	for (auto &m : msgs)
		if (m.has_sequence_number)
			fetching_.erase(m.sequence_number);
}

// The batch's transaction, with the confirmed settlements riding on it; then, whatever happened,
// nothing tenant code left in the session outlives the batch.
bool
Worker::Apply(std::vector<ApplyItem> &items, BatchResult *res, PgError *err) {
	ConfirmedKeys keys = CollectConfirmed(confirmed_);
	ConsumerStatus st = consumer_->Status();
	// Deferral would let later messages of a session overtake the deferred one: never in session mode.
	cfg_.can_defer = st.management_ready && !st.sessions;
	bool ok = PgGuard(
	    [&] {
		    ApplyBatch(&cfg_, items.data(), static_cast<int>(items.size()), keys.seqs.data(),
		               static_cast<int>(keys.seqs.size()), keys.ids.data(), static_cast<int>(keys.ids.size()), res);
	    },
	    err);
	PgError cleanup_err;
	if (!PgGuard([] { CleanSession(); }, &cleanup_err))
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot clean the session: " + cleanup_err.message.c_str());
	return ok;
}

// The server could not record anything (what committed before is recognised when the messages
// come again): hold the batch and try again after a growing pause, locks renewed.
void
Worker::HoldFailedBatch(std::vector<ReceivedMessage> &msgs, const PgError &err) {
	batch_backoff_ms_ = std::min<int64>(30000, batch_backoff_ms_ ? batch_backoff_ms_ * 2 : 1000);
	SetError(std::string("batch failed: ") + err.message.c_str());
	Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": batch of " + std::to_string(msgs.size()) +
	                 " failed and will be tried again in " + std::to_string(batch_backoff_ms_) +
	                 " ms: " + err.message.c_str());
	TimestampTz due = GetCurrentTimestamp() + batch_backoff_ms_ * 1000;
	for (auto &m : msgs)
		Hold(std::move(m), due);
	paused_until_ = due;
}

void
Worker::AfterCommit(const BatchResult &res) {
	batch_backoff_ms_ = 0;
	confirmed_.clear();
	last_stamp_ = GetCurrentTimestamp();
	if (res.handler_unusable) {
		SetError(res.handler_error.view());
		SetState(kStatePaused);
		paused_until_ = GetCurrentTimestamp() + 5 * USECS_PER_SEC;
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name + "\": " + res.handler_error.str() +
		                 "; messages are left for later");
	} else if (g_slot->state == kStatePaused) {
		// The handler is usable again: the pause is over (last_error keeps why it was).
		SetState(consumer_->Status().connected ? kStateConnected : kStateReconnecting);
	}
}

namespace {

// How the broker is to settle a message, from what the batch recorded for it; *held when the
// worker keeps it for its next attempt instead.
Settlement
SettlementFor(const ApplyItem &it, const ReceivedMessage &m, bool *held) {
	Settlement s{m.delivery_id, m.connection_gen, Outcome::Complete, "", ""};
	int effective = it.status == kDuplicate ? it.recorded : it.status;
	*held = false;
	switch (effective) {
	case kApplied:
		s.outcome = Outcome::Complete;
		break;
	case kDeadLettered:
		s.outcome = Outcome::DeadLetter;
		s.reason = it.reason.str();
		s.description = it.description.str();
		break;
	case kBlocked: // behind an earlier message of its session: waits with it
		*held = true;
		break;
	case kTransient:
	case kDelayed:
		// Deferred when the delay is long and the broker can; held otherwise. (Giving the
		// message back would only bring it straight back: on a broker without deferral, or
		// whose locks cannot be renewed, holding it is the lesser cost, and a lock that
		// lapses brings a redelivery the retry row recognises.)
		if (it.defer)
			s.outcome = Outcome::Defer;
		else
			*held = true;
		break;
	default:
		s.outcome = Outcome::Abandon;
		break;
	}
	return s;
}

} // namespace

// After the commit: settle, hold or defer each message, count it, and log it as configured.
void
Worker::Settle(std::vector<ApplyItem> &items, std::vector<ReceivedMessage> &msgs, const BatchResult &res) {
	std::vector<Settlement> settle;
	settle.reserve(msgs.size());
	int64_t commit_ms = WallMs();
	for (size_t i = 0; i < items.size(); ++i) {
		ApplyItem &it = items[i];
		ReceivedMessage &m = msgs[i];
		bool held;
		Settlement s = SettlementFor(it, m, &held);
		Count(it, m, held, s, commit_ms);
		int effective = it.status == kDuplicate ? it.recorded : it.status;
		if (it.status == kApplied || it.status == kDeadLettered)
			++recorded_since_prune_;
		if (effective == kApplied || effective == kDeadLettered)
			awaiting_[m.delivery_id] = InboxKey{m.has_sequence_number, m.sequence_number, m.message_id,
			                                    m.connection_gen};
		bool failure = it.status == kDeadLettered || it.status == kTransient ||
		               (it.status == kDuplicate && it.recorded == kDeadLettered);
		if (guc_log_messages == kLogAll || (guc_log_messages == kLogFailures && failure))
			Log(LOG, MessageLogLine(start_.name, it, res.xid));
		if (held) {
			// A stopped session's message is never due: looked at again every 2 s, to see whether
			// sbpg.resume_session released it (its retry row says; nothing runs until then).
			// A blocked message has no time of its own: Hold makes it wait as long as the message of
			// its session it waits behind (held just before it, in batch order).
			TimestampTz due = it.next_attempt == DT_NOEND ? GetCurrentTimestamp() + 2 * USECS_PER_SEC
			                  : it.status == kBlocked     ? GetCurrentTimestamp()
			                                              : it.next_attempt;
			Hold(std::move(m), due);
		} else
			settle.push_back(std::move(s));
	}
	if (res.isolated)
		Log(LOG, std::string("sbpg: subscription \"") + start_.name + "\": a batch of " + std::to_string(items.size()) +
		             " was applied message by message after: " + res.batch_error.str());
	consumer_->Settle(std::move(settle));
	Publish(stats_, true, res.committed_at, &minute_);
}

// One settled message's share of the statistics.
void
Worker::Count(const ApplyItem &it, const ReceivedMessage &m, bool held, const Settlement &s, int64_t commit_ms) {
	if (s.outcome == Outcome::Defer && !held)
		++stats_.deferred;
	if (it.status == kApplied)
		++stats_.applied;
	else if (it.status == kDeadLettered)
		++stats_.dead;
	else if (it.status == kDuplicate)
		++stats_.dup;
	else if (!held && s.outcome == Outcome::Abandon)
		++stats_.abandoned;
	if (it.status == kTransient && strcmp(it.reason.c_str(), "HandlerUnusable") != 0)
		++stats_.retries;
	if ((it.status == kApplied || it.status == kDeadLettered) && it.attempts > 0)
		++stats_.retried;
	if (it.gave_up)
		++stats_.gave_up;
	if (it.status == kApplied)
		stats_.apply_ms.push_back(static_cast<float>(it.apply_ms));
	if (m.enqueued_ms > 0 && (it.status == kApplied || it.status == kDeadLettered))
		stats_.lag_ms.push_back(static_cast<float>(commit_ms - m.enqueued_ms));
}
} // namespace sbpg::pg
