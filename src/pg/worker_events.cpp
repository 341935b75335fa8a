// src/pg/worker_events.cpp
//   What the AMQP and token threads report to a worker's main thread, and the messages it keeps
//   for later: connection events and token log lines (to the server log and the slot), broker
//   confirmations of settlements (stamped into sbpg.inbox later), messages held for their next
//   attempt with their locks renewed, and deferred messages asked back from the broker when due.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/histogram.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <algorithm>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

extern "C" {
#include "postgres.h"

#include "utils/memutils.h"
#include "utils/timestamp.h"
}

#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/worker.hpp"

namespace sbpg::pg {

void
Worker::HandleEvents() {
	LogTokenEvents();
	LogConnectionEvents();
	PublishConnection();
}

void
Worker::LogTokenEvents() {
	if (!tokens_)
		return;
	for (auto &l : tokens_->TakeLog())
		Log(l.routine ? DEBUG1 : LOG, std::string("sbpg: {\"event\":\"token\",\"subscription\":\"") +
		                                  JsonEscape(start_.name) + "\",\"identity\":\"" + JsonEscape(cfg_.identity) +
		                                  "\",\"detail\":\"" + JsonEscape(l.text) + "\"}");
}

void
Worker::LogConnectionEvents() {
	std::vector<ConsumerEvent> events;
	consumer_->TakeEvents(&events);
	for (auto &e : events) {
		int level = LOG;
		std::string line = std::string("sbpg: {\"event\":\"connection\",\"subscription\":\"") +
		                   JsonEscape(start_.name) + "\",\"state\":\"";
		switch (e.kind) {
		case ConsumerEvent::Kind::Connected:
			line += "connected";
			SetState(kStateConnected);
			break;
		case ConsumerEvent::Kind::Disconnected:
			line += "disconnected";
			SetState(kStateReconnecting);
			SetError(e.text);
			break;
		case ConsumerEvent::Kind::TokenRenewed:
			line += "token_renewed";
			level = DEBUG1; // routine
			break;
		case ConsumerEvent::Kind::TokenRefused:
			line += "token_refused";
			SetError(e.text);
			break;
		case ConsumerEvent::Kind::Error:
			line += "error";
			SetState(kStateReconnecting);
			SetError(e.text);
			break;
		case ConsumerEvent::Kind::SessionAccepted:
			line += "session_accepted";
			level = DEBUG1; // routine: sessions come and go
			break;
		case ConsumerEvent::Kind::SessionReleased:
			line += "session_released";
			level = DEBUG1;
			break;
		case ConsumerEvent::Kind::SessionLost:
			line += "session_lost";
			break;
		}
		line += "\",\"detail\":\"" + JsonEscape(e.text) + "\"}";
		Log(level, line);
	}
}

// The connection's and the token's state, into the slot; a consumer that gave up ends the worker.
void
Worker::PublishConnection() {
	ConsumerStatus st = consumer_->Status();
	TokenSource::Status ts;
	if (tokens_)
		ts = tokens_->GetStatus();
	std::string no_token = ts.last_error.empty() ? "" : "no token: " + ts.last_error;
	SpinLockAcquire(&g_slot->mutex);
	g_slot->connected_since = st.connected ? ToTimestamp(st.connected_since_ms) : 0;
	g_slot->token_expires_at = st.token_expires_ms ? ToTimestamp(st.token_expires_ms) : 0;
	g_slot->reconnects = st.reconnects;
	g_slot->tokens_put = st.tokens_put;
	CopyUtf8(g_slot->token_subject, ts.subject.c_str(), sizeof g_slot->token_subject);
	g_slot->token_error.Set(ts.last_error);
	if (!st.connected && st.waiting_for_token && g_slot->state != kStateFailed && g_slot->state != kStatePaused) {
		g_slot->state = kStateWaitingForToken;
		if (!no_token.empty()) {
			g_slot->last_error.Set(no_token);
			g_slot->last_error_at = ToTimestamp(ts.last_error_ms);
		}
	} else if (!st.connected && g_slot->state == kStateWaitingForToken) {
		g_slot->state = kStateConnecting;
	}
	SpinLockRelease(&g_slot->mutex);
	if (st.dead) {
		SetState(kStateFailed);
		stop_ = true; // the launcher restarts the worker
	}
}

void
Worker::HandleResults() {
	std::vector<SettleResult> results;
	consumer_->TakeResults(&results);
	for (auto &r : results) {
		auto it = awaiting_.find(r.delivery_id);
		if (it == awaiting_.end())
			continue;
		if (r.ok) {
			confirmed_.push_back(std::move(it->second));
		} else {
			// The broker will deliver the message again; the inbox recognises it then.
			++stats_.settle_failures;
			if (guc_log_messages != kLogNone)
				Log(LOG, std::string("sbpg: {\"event\":\"settle_failed\",\"subscription\":\"") +
				             JsonEscape(start_.name) + "\",\"detail\":\"" + JsonEscape(r.error) + "\"}");
		}
		awaiting_.erase(it);
	}
	// Session states the broker accepted: recorded, so they are not sent again.
	std::vector<SessionStateResult> states;
	consumer_->TakeSessionStateResults(&states);
	std::vector<const char *> ids;
	std::vector<int64> versions;
	for (auto &r : states) {
		if (r.ok) {
			ids.push_back(r.session_id.c_str());
			versions.push_back(r.version);
		} else {
			Log(DEBUG1, std::string("sbpg: subscription \"") + start_.name + "\": the state of session \"" +
			                r.session_id + "\" was not set on the broker (" + r.error + "); tried again later");
		}
	}
	PgError err;
	if (!ids.empty() &&
	    !PgGuard([&] { MarkSessionStatesSynced(&cfg_, ids.data(), versions.data(), static_cast<int>(ids.size())); },
	             &err))
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot record the session states the broker accepted: " + err.message.c_str());
}

// Sends the session states the broker has not accepted (up to 100, oldest write first).
void
Worker::SyncSessionStates(TimestampTz now) {
	constexpr int kMax = 100;
	SessionStateRow rows[kMax];
	int n = 0;
	MemoryContext cxt = nullptr;
	PgError err;
	last_state_sync_ = now;
	bool ok = PgGuard(
	    [&] {
		    cxt = AllocSetContextCreate(TopMemoryContext, "sbpg session states", ALLOCSET_SMALL_SIZES);
		    n = UnsyncedSessionStates(&cfg_, kMax, cxt, rows);
	    },
	    &err);
	std::vector<SessionStateUpdate> updates;
	if (ok)
		for (int i = 0; i < n; ++i)
			updates.push_back(SessionStateUpdate{rows[i].session_id, rows[i].has_state,
			                                     rows[i].has_state ? std::string(rows[i].state, rows[i].state_len) : "",
			                                     rows[i].version});
	else
		Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
		                 "\": cannot read the session states to set on the broker: " + err.message.c_str());
	PgError cleanup;
	PgGuard(
	    [&] {
		    if (cxt)
			    MemoryContextDelete(cxt);
	    },
	    &cleanup);
	if (!updates.empty())
		consumer_->SetSessionStates(std::move(updates));
}

// A session's held messages wait together: each is due when the last of them is (a message that
// waits longer holds back the rest of its session; see TakeDue for their order).
void
Worker::Hold(ReceivedMessage &&m, TimestampTz due) {
	if (m.in_session) {
		for (auto &h : held_)
			if (h.msg.in_session && h.msg.session_id == m.session_id)
				due = std::max(due, h.due);
		for (auto &h : held_)
			if (h.msg.in_session && h.msg.session_id == m.session_id)
				h.due = due;
	}
	held_.push_back(Held{std::move(m), due});
}

TimestampTz
Worker::NextDue() const {
	TimestampTz next = 0;
	for (auto &h : held_)
		if (!next || h.due < next)
			next = h.due;
	return next;
}

namespace {

// A session message's place in its session.
int64_t
SessionOrder(const ReceivedMessage &m) {
	return m.has_sequence_number ? m.sequence_number : static_cast<int64_t>(m.delivery_id);
}

} // namespace

// Moves held messages that are due (oldest due first) into msgs, up to max; drops those of a
// connection that is gone (their locks went with it: the broker delivers them again) and of a
// session no longer held. A session's messages come out in sequence order, and once one of them
// stays behind (not due, or no room), so do the later ones: a batch never takes a later message
// of a session without the earlier ones.
void
Worker::TakeDue(std::vector<ReceivedMessage> *msgs, size_t max) {
	if (held_.empty())
		return;
	uint64_t gen = consumer_->Status().generation;
	TimestampTz now = GetCurrentTimestamp();
	std::vector<Held> live;
	live.reserve(held_.size());
	for (auto &h : held_)
		if (h.msg.connection_gen == gen && consumer_->LinkLive(h.msg))
			live.push_back(std::move(h));
	std::stable_sort(live.begin(), live.end(), [](const Held &a, const Held &b) { return a.due < b.due; });
	// Within each session, the places its messages took are refilled in sequence order.
	std::unordered_map<std::string, std::vector<size_t>> places;
	for (size_t i = 0; i < live.size(); ++i)
		if (live[i].msg.in_session)
			places[live[i].msg.session_id].push_back(i);
	for (auto &kv : places) {
		std::vector<Held> group;
		for (size_t i : kv.second)
			group.push_back(std::move(live[i]));
		std::stable_sort(group.begin(), group.end(),
		                 [](const Held &a, const Held &b) { return SessionOrder(a.msg) < SessionOrder(b.msg); });
		for (size_t k = 0; k < kv.second.size(); ++k)
			live[kv.second[k]] = std::move(group[k]);
	}
	std::unordered_set<std::string> behind; // sessions with a message left behind
	std::vector<Held> keep;
	for (auto &h : live) {
		bool session_behind = h.msg.in_session && behind.count(h.msg.session_id);
		if (!session_behind && h.due <= now && msgs->size() < max) {
			msgs->push_back(std::move(h.msg));
			continue;
		}
		if (h.msg.in_session)
			behind.insert(h.msg.session_id);
		keep.push_back(std::move(h));
	}
	held_.swap(keep);
}

// A session is applied in order: a new message (msgs[from..]) of a session with a message held for
// its next attempt waits behind it, due when the last of them is.
void
Worker::QueueBehindHeld(std::vector<ReceivedMessage> *msgs, size_t from) {
	std::unordered_map<std::string, TimestampTz> waiting;
	for (auto &h : held_)
		if (h.msg.in_session) {
			auto [at, added] = waiting.emplace(h.msg.session_id, h.due);
			if (!added)
				at->second = std::max(at->second, h.due);
		}
	if (waiting.empty())
		return;
	size_t out = from;
	for (size_t i = from; i < msgs->size(); ++i) {
		ReceivedMessage &m = (*msgs)[i];
		auto at = m.in_session ? waiting.find(m.session_id) : waiting.end();
		if (at != waiting.end())
			Hold(std::move(m), at->second);
		else if (out != i)
			(*msgs)[out++] = std::move(m);
		else
			++out;
	}
	msgs->resize(out);
}

// Deferred messages the broker did not hand over (still locked by an earlier connection, their
// deferral not yet in effect, or gone): asked for again in a minute; the row stays until retention.
void
Worker::RetryUnfetched() {
	std::vector<Consumer::FetchFailure> failures;
	consumer_->TakeFetchFailures(&failures);
	PgError err;
	for (auto &f : failures) {
		fetching_.erase(f.sequence_number);
		if (!f.not_found)
			continue;
		int64 seq = f.sequence_number;
		PgGuard([&] { PostponeDeferred(&cfg_, seq); }, &err);
		Log(DEBUG1, std::string("sbpg: subscription \"") + start_.name + "\": deferred message " + std::to_string(seq) +
		                " was not handed over: " + f.error + "; asking again in a minute");
	}
}

// Asks the broker for deferred messages whose next attempt is due.
void
Worker::FetchDue() {
	RetryUnfetched();
	TimestampTz now = GetCurrentTimestamp();
	PgError err;
	ConsumerStatus st = consumer_->Status();
	if (!st.management_ready || now - last_fetch_ < USECS_PER_SEC)
		return;
	last_fetch_ = now;
	int room = cfg_.prefetch - static_cast<int>(st.in_flight) - static_cast<int>(held_.size()) -
	           static_cast<int>(fetching_.size());
	if (room <= 0)
		return;
	// Never ask for what the worker holds or has asked for: the broker would refuse a locked
	// message, and the answer must not be taken for "gone".
	std::unordered_set<int64_t> mine;
	for (auto &h : held_)
		if (h.msg.has_sequence_number)
			mine.insert(h.msg.sequence_number);
	int want = std::min(room, 100) + static_cast<int>(fetching_.size() + mine.size());
	std::vector<int64> due(static_cast<size_t>(want));
	int n = 0;
	if (!PgGuard([&] { n = DueDeferred(&cfg_, due.data(), want); }, &err)) {
		// Said at most once a minute: deferred messages wait until it works again.
		if (GetCurrentTimestamp() - fetch_warned_ > 60 * USECS_PER_SEC) {
			fetch_warned_ = GetCurrentTimestamp();
			Log(WARNING, std::string("sbpg: subscription \"") + start_.name +
			                 "\": cannot read the deferred messages that are due: " + err.message.c_str());
		}
		return;
	}
	std::vector<int64_t> ask;
	for (int i = 0; i < n && static_cast<int>(ask.size()) < room; ++i) {
		if (fetching_.count(due[i]) || mine.count(due[i]))
			continue;
		fetching_[due[i]] = now;
		ask.push_back(due[i]);
	}
	if (!ask.empty())
		consumer_->FetchDeferred(std::move(ask));
}

} // namespace sbpg::pg
