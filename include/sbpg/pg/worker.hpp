// sbpg/pg/worker.hpp
//   One subscription's worker, shared by its files (only from src/pg/worker*.cpp; include after
//   postgres.h, with the C++ headers named below and sbpg/pg/pg_error.hpp included before it):
//     worker_main.cpp   the entry point, the main loop, housekeeping, the exit callback
//     worker_setup.cpp  reading the subscription and connecting (endpoint, key, tokens)
//     worker.cpp        one batch: apply, then settle; the message log line; schema refresh
//     worker_events.cpp connection events, settlement results, held and deferred messages
//   (sbpg/core/histogram.hpp is one of those C++ headers.)
//   The main thread is the only one that calls PostgreSQL, always through PgGuard; the Worker owns
//   C++ objects, so no PostgreSQL error may longjmp across its frames.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/worker.hpp"
#endif

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/slots.hpp"

namespace sbpg::pg {

// For the exit callback, which runs after FATAL too: the worker's consumer and token source while
// they exist, and its slot (worker_main.cpp).
extern Consumer *g_consumer;
extern TokenSource *g_tokens;
extern WorkerSlot *g_slot;

TimestampTz ToTimestamp(int64_t unix_ms);
void SetState(int state);
void SetError(std::string_view msg);
// Writes a line to the server log (guarded: never raises).
void Log(int level, const std::string &text);

// A message's inbox key, remembered until its settlement is confirmed.
struct InboxKey {
	bool has_seq = false;
	int64_t seq = 0;
	std::string message_id;
	uint64_t gen = 0; // the connection that carries the settlement
};

// Confirmed settlements as ApplyBatch and StampSettled take them (ids point into the keys).
struct ConfirmedKeys {
	std::vector<int64> seqs;
	std::vector<const char *> ids;
};
ConfirmedKeys CollectConfirmed(const std::vector<InboxKey> &keys);

// Counters since the last Publish, which adds them to the slot.
struct Stats {
	uint64_t received = 0, applied = 0, dead = 0, dup = 0, abandoned = 0, settle_failures = 0;
	uint64_t retries = 0, retried = 0, gave_up = 0, deferred = 0;
	std::vector<float> apply_ms, lag_ms;
};
// The minute being counted for sbpg.stats_history (plain data; written out by RecordHistory).
struct MinuteStats {
	TimestampTz start; // 0: not started
	uint64 received, applied, dead, dup, retries, batches;
	Histogram apply_ms, lag_ms;
};
// Adds st to the slot (sbpg.stats) and to the minute, then clears st.
void Publish(Stats &st, bool batch, TimestampTz at, MinuteStats *minute);

class Worker {
  public:
	explicit Worker(const WorkerStart &start) : start_(start) {}
	// The exit callback must not reach the consumer or the token source once they are gone (the
	// loop ended by itself, e.g. when sbpg.ca_file changed). Runs before the members are destroyed.
	~Worker();
	// Returns the process's exit code: 0, or 1 when a test fault ended the loop.
	int Run();

  private:
	// worker_setup.cpp
	bool Setup();
	bool ConnectionSettings(ConsumerConfig *cc);
	bool Authentication(ConsumerConfig *cc);
	bool SetupWaiting();
	bool Fail(const std::string &msg, bool log);
	// worker_main.cpp
	void Loop();
	void WaitForWork(bool more);
	bool TakeBatch(std::vector<ReceivedMessage> *msgs);
	bool Interrupts();
	void Housekeeping();
	void StampConfirmed(TimestampTz now);
	void Prune(TimestampTz now);
	void RecordHistory(TimestampTz now, bool unfinished);
	// worker.cpp
	void ProcessBatch(std::vector<ReceivedMessage> &msgs);
	void DropStale(std::vector<ReceivedMessage> &msgs);
	bool Apply(std::vector<ApplyItem> &items, BatchResult *res, PgError *err);
	void HoldFailedBatch(std::vector<ReceivedMessage> &msgs, const PgError &err);
	void AfterCommit(const BatchResult &res);
	void Settle(std::vector<ApplyItem> &items, std::vector<ReceivedMessage> &msgs, const BatchResult &res);
	void Count(const ApplyItem &it, const ReceivedMessage &m, bool held, const Settlement &s, int64_t commit_ms);
	void RefreshSchemas(bool force);
	// worker_events.cpp
	void HandleEvents();
	void LogTokenEvents();
	void LogConnectionEvents();
	void PublishConnection();
	void HandleResults();
	void Hold(ReceivedMessage &&m, TimestampTz due);
	TimestampTz NextDue() const;
	void TakeDue(std::vector<ReceivedMessage> *msgs, size_t max);
	void QueueBehindHeld(std::vector<ReceivedMessage> *msgs, size_t from);
	void SyncSessionStates(TimestampTz now);
	void FetchDue();
	void RetryUnfetched();

	WorkerStart start_;
	SubConfig cfg_{};
	std::string ca_file_;                 // sbpg.ca_file when the worker started
	std::unique_ptr<TokenSource> tokens_; // Entra ID identities; outlives the consumer
	std::unique_ptr<Consumer> consumer_;
	int efd_ = -1;
	WaitEventSet *wait_set_ = nullptr;
	Stats stats_;
	MinuteStats minute_{};
	std::unordered_map<uint64_t, InboxKey> awaiting_; // delivery id -> inbox key, until confirmed
	std::vector<InboxKey> confirmed_;                 // settlements the broker confirmed
	TimestampTz last_stamp_ = 0, last_prune_ = 0;
	bool prune_behind_ = false;      // expired inbox rows are left: prune a chunk every turn (Prune)
	int64 recorded_since_prune_ = 0; // inbox rows written since the last chunk
	TimestampTz prune_from_ = 0;     // where the last chunk ended (recorded_at); 0 at each round
	TimestampTz paused_until_ = 0;
	TimestampTz last_state_sync_ = 0; // session states last sent to the broker
	TimestampTz fetch_warned_ = 0;    // when reading the due deferred messages last failed, logged
	bool stop_ = false;
	int exit_code_ = 0; // nonzero: leave the loop at once and exit the process with it
	// Messages waiting for their next attempt while the worker holds their locks (renewed on the
	// AMQP thread), and deferred messages asked for by sequence number and not back yet.
	struct Held {
		ReceivedMessage msg;
		TimestampTz due;
	};
	std::vector<Held> held_;
	std::unordered_map<int64_t, TimestampTz> fetching_;
	TimestampTz last_fetch_ = 0;
	uint64_t gen_ = 0; // the connection generation last seen
	int64 schemas_stamp_ = -1;
	TimestampTz last_schema_check_ = 0;
	int64 batch_backoff_ms_ = 0; // after a batch failed as a whole
};

} // namespace sbpg::pg
