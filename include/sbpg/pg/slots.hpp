// sbpg/pg/slots.hpp
//   Shared memory: one slot per subscription's worker (its state and statistics, written by the
//   worker, read by sbpg.stats) and the hand-over between launcher and workers. Include after
//   postgres.h, only from src/pg/, with sbpg/core/fixed_text.hpp included before postgres.h.
//   Error text in a slot is ErrorText, the one size from a handler's error to sbpg.stats; the
//   slots' size (SharedSize in module.cpp) follows from sizeof(WorkerSlot).
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/slots.hpp"
#endif

extern "C" {
#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
}

namespace sbpg::pg {

constexpr int kSamples = 512;    // recent latency samples kept per subscription
constexpr int kRateSeconds = 60; // throughput window
constexpr int kNameLen = 64;

enum WorkerState : int {
	kStateFree = 0,
	kStateStarting,
	kStateConnecting,
	kStateConnected,
	kStateReconnecting,
	kStateStopped,
	kStateFailed,
	kStatePaused,          // the handler cannot run; see last_error
	kStateWaitingForToken, // no Entra ID token yet (or the last one expired); see token_error
};
const char *WorkerStateName(int state);

// Statistics and state of one subscription's worker. Written by its worker, read by sbpg.stats.
struct WorkerSlot {
	slock_t mutex;
	bool in_use;
	char name[kNameLen];
	int worker; // which of the subscription's workers (0 .. workers - 1)
	int pid;
	int state;
	TimestampTz connected_since;
	TimestampTz last_error_at;
	TimestampTz last_batch_at;
	TimestampTz token_expires_at;
	uint64 received, applied, dead_lettered, duplicates, abandoned, batches, settle_failures, reconnects;
	ErrorText last_error;
	uint64 tokens_put;           // put-token requests the broker accepted
	char token_subject[64];      // the Entra ID principal (oid) of the current token
	ErrorText token_error;       // why the last token request failed; empty once one succeeds
	uint64 retries;              // transient failures that scheduled another attempt
	uint64 retried_messages;     // messages that needed more than one attempt to reach an outcome
	uint64 max_retries_exceeded; // dead-lettered with MaxRetriesExceeded
	int32 waiting_retry;         // messages the worker holds for a retry right now
	uint64 deferred;             // messages set aside on the broker (deferral) for a later retry
	uint64 lock_renewals;        // message locks renewed
	uint64 locks_lost;           // renewals refused because the lock was gone
	float apply_ms[kSamples];
	uint32 apply_next, apply_count;
	float lag_ms[kSamples];
	uint32 lag_next, lag_count;
	int64 rate_second[kRateSeconds];
	uint32 rate_count[kRateSeconds];
	Latch *latch; // a publisher's worker (name "pub:<publisher>"): set at commit by sbpg._wake_publisher
};

struct SharedState {
	LWLock *lock; // slot allocation
	Latch *launcher_latch;
	char test_fault_fired[kNameLen]; // test_hooks.cpp: the last exit_after_commit tag that fired
	int nslots;
	WorkerSlot *slots;
};

extern SharedState *shared;

// What a worker is started with (in bgw_extra).
struct WorkerStart {
	Oid database;
	Oid user;
	int slot;
	int worker; // which of the subscription's workers (option workers), from 0
	char name[kNameLen];
};

// Sets the launcher's latch (wake it now).
void WakeLauncher();
// Reserves the slot for a subscription (launcher); -1 when none is free.
int AssignSlot(const char *name, int worker);
void FreeSlot(int slot);
// Takes a consistent copy of a slot.
void CopySlot(int slot, WorkerSlot *out);

} // namespace sbpg::pg

extern "C" {
PGDLLEXPORT void sbpg_launcher_main(Datum arg);
PGDLLEXPORT void sbpg_worker_main(Datum arg);
}
