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
	// Retry policy (subscription options; see docs/retries.md).
	int max_retries;        // retries after the first attempt (default 5)
	int retry_base_ms;      // ceiling of the first retry's delay (default 1000)
	int retry_cap_ms;       // largest ceiling (default 300000)
	int retry_hold_ms;      // delays up to this are waited out holding the lock (default 30000)
	int max_lock_renewal_s; // how long a held message's lock is renewed at most (default 300)
	bool can_defer;         // set by the worker: the broker defers (Service Bus $management is up)
	// Versioned schemas (subscription options; docs/schemas.md).
	bool validate_schemas;  // "schemas": "validate"
	bool unknown_pass;      // "unknown_types": "pass" (default: dead_letter)
	char *version_property; // "version_property" (default schema_version)
	int handler_timeout_ms; // how long tenant code may run for one message (default 30000)
	bool token_destination_ok; // the namespace may receive an Entra ID token (TLS Service Bus, or listed)
};

// Pins the settings sbpg's own statements depend on (search_path = pg_catalog, pg_temp among
// them) at session level, over whatever the database's or the owner's defaults say. Called once by
// the launcher and each worker after connecting.
void PinSessionSettings();

// Drops what tenant code may leave in the session beyond a transaction: session-level advisory
// locks. Called after every batch, whatever its outcome.
void CleanSession();

// Whether the worker is ending because tenant code went on past its time limit after the cancel
// (its exit callback says so in sbpg.stats and the log).
bool EndedByTimeLimit();

void LoadSubConfig(const char *name, SubConfig *out);

// kTransient: this attempt failed with a transient error and another is scheduled (next_attempt).
// kDelayed: not attempted; an earlier attempt scheduled the next one for later (a redelivery or a
// deferred message that came back early).
enum ItemStatus : int { kPending = 0, kApplied, kDeadLettered, kDuplicate, kTransient, kDelayed };

struct ApplyItem {
	const ReceivedMessage *msg; // owned by the caller
	int status;
	int recorded;      // kDuplicate: what the inbox recorded (kApplied or kDeadLettered)
	char reason[64];   // dead-letter reason, or why a retry is needed
	char description[1024];
	double apply_ms;
	int attempts;             // failed attempts before this one (from sbpg.retries)
	TimestampTz next_attempt; // kTransient, kDelayed: when to try again
	bool defer;               // kTransient, kDelayed: set the message aside on the broker until then
	bool gave_up;             // kDeadLettered with MaxRetriesExceeded
	bool stale;               // its sequence number is recorded for another message (entity recreated)
	bool mapped;              // applied through a declarative mapping, not the handler
	bool timed_out;           // its failure was the handler time limit (handler_timeout_ms)
	int failed_errcode;       // set when it failed in a pass without subtransactions
	char failed_error[512];
};

struct BatchResult {
	uint64 xid;                // the (last) transaction that recorded the batch
	bool handler_unusable;     // the handler is missing or run_as may not execute it
	char handler_error[512];
	bool isolated;             // the batch failed as a whole and was applied message by message
	char batch_error[512];     // the error that made it isolate
	int batch_sqlerrcode;      // its SQLSTATE
	TimestampTz committed_at;
};

// Applies items[0..n) and commits durably (flushed whatever synchronous_commit says). Also
// stamps settled_at on inbox rows whose settlement the broker confirmed (seqs / message ids).
void ApplyBatch(const SubConfig *cfg, ApplyItem *items, int n, const int64 *confirmed_seqs, int nseqs,
                const char *const *confirmed_ids, int nids, BatchResult *out);

// Only the settled_at stamping, in its own transaction.
void StampSettled(const SubConfig *cfg, const int64 *seqs, int nseqs, const char *const *ids, int nids);

// Deletes up to `limit` confirmed inbox rows older than retention_s, and retry rows of messages
// not seen for that long, in one short transaction; returns how many.
int64 PruneInbox(const SubConfig *cfg, int retention_s, int limit);

// The registered schemas, malloc'd (the caller frees each string and the array); returns how many.
struct SchemaRowC {
	char *message_type;
	int version;
	char *schema_json;
};
int LoadSchemas(SchemaRowC **out);
// Changes whenever a schema is registered (or a type dropped).
int64 SchemasStamp();

// Deferred messages due for their next attempt (up to max, soonest first).
int DueDeferred(const SubConfig *cfg, int64 *out, int max);

// The broker did not hand over a deferred message (locked elsewhere, not deferred yet, gone):
// ask again in a minute. Rows of messages never found go with retention (after a week at least).
void PostponeDeferred(const SubConfig *cfg, int64 seq);

} // namespace sbpg::pg
