// sbpg/pg/apply.hpp
//   The worker's transactions: loading a subscription's settings, and applying a batch of
//   messages (inbox check, handler as run_as, inbox row, NOTIFY) in one durable commit. Include
//   after postgres.h, only from src/pg/. Every function here must be called inside PgGuard and is
//   written without C++ objects that have destructors.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/apply.hpp"
#endif

namespace sbpg {
struct ReceivedMessage;
}

namespace sbpg::pg {

// A subscription's settings, palloc'd in TopMemoryContext.
struct SubConfig {
	bool found;
	bool enabled;
	char *name;
	char *namespace_;
	char *entity;
	Oid handler;
	Oid run_as;
	char *run_as_name;
	char *identity;      // NULL: anonymous
	char *identity_kind; // "anonymous", "sas", "managed_identity", "workload_identity", "client_secret", "default"
	char *identity_options; // the identity's options as JSON text (never holds a literal secret)
	char *key_name;
	char *key;      // literal key or client secret (from sbpg.identity_secrets), NULL otherwise
	char *key_file;
	char *key_env;
	int batch_size;
	int prefetch;
	char *notify_channel; // NULL: no notifications
	char *search_path;    // what a session of run_as would have
	Oid message_type;
	bool allow_superuser; // subscription option allow_superuser_run_as (set by a superuser)
};

void LoadSubConfig(const char *name, SubConfig *out);

enum ItemStatus : int { kPending = 0, kApplied, kDeadLettered, kDuplicate, kTransient };

struct ApplyItem {
	const ReceivedMessage *msg; // owned by the caller
	int status;
	int recorded;      // kDuplicate: what the inbox recorded (kApplied or kDeadLettered)
	char reason[64];   // dead-letter reason, or why a retry is needed
	char description[1024];
	double apply_ms;
};

struct BatchResult {
	uint64 xid;                // the (last) transaction that recorded the batch
	bool handler_unusable;     // the handler is missing or run_as may not execute it
	char handler_error[512];
	bool isolated;             // the batch failed as a whole and was applied message by message
	char batch_error[512];     // the error that made it isolate
	TimestampTz committed_at;
};

// Applies items[0..n) and commits durably (flushed whatever synchronous_commit says). Also
// stamps settled_at on inbox rows whose settlement the broker confirmed (seqs / message ids).
void ApplyBatch(const SubConfig *cfg, ApplyItem *items, int n, const int64 *confirmed_seqs, int nseqs,
                const char *const *confirmed_ids, int nids, BatchResult *out);

// Only the settled_at stamping, in its own transaction.
void StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids);

// Deletes confirmed inbox rows older than sbpg.inbox_retention; returns how many.
int64 PruneInbox(const SubConfig *cfg, int retention_s);

} // namespace sbpg::pg
