// sbpg/pg/config.hpp
//   What a worker reads from the catalog: a subscription's settings (LoadSubConfig), the registered
//   schemas (LoadSchemas, SchemasStamp), and the session settings sbpg's statements depend on
//   (PinSessionSettings). Include after postgres.h, only from src/pg/. Every function here must be
//   called inside PgGuard; each runs its own short transaction.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/config.hpp"
#endif

#include <vector>

namespace sbpg::schema {
struct SchemaRow;
}

namespace sbpg::pg {

// A subscription's settings, palloc'd in TopMemoryContext.
struct SubConfig {
	bool found;
	bool enabled;
	char *name;
	char *namespace_;
	char *entity;
	// The handler is named by its signature (handler_name); handler is the function that name
	// found, looked up again by HandlerUsable once it is gone (it may be created again). Only a
	// function owned by handler_owner runs.
	mutable Oid handler;
	char *handler_name;
	Oid handler_owner; // InvalidOid: unknown (the function was missing at the update to 0.3)
	Oid run_as;
	char *run_as_name;
	char *identity;         // NULL: anonymous
	char *identity_kind;    // "anonymous", "sas", "managed_identity", "workload_identity", "client_secret", "default"
	char *identity_options; // the identity's options as JSON text (never holds a literal secret)
	char *key_name;
	char *key; // literal key or client secret (from sbpg.identity_secrets), NULL otherwise
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
	                        // and the entity has no sessions (a deferral would reorder one)
	// Sessions (subscription options; docs/scaling.md).
	int sessions;        // 1: declared, -1: never, 0: detected when the broker asks for them
	int max_sessions;    // sessions held at once (default 8)
	int session_idle_ms; // a session without messages this long is released (default 5000)
	bool session_stop;   // "session_failure": "stop": a message that fails for good stops its session
	int workers;         // how many workers the subscription has (option workers, default 1)
	int worker;          // set by the worker: which of them it is (0 .. workers - 1)
	// Versioned schemas (subscription options; docs/schemas.md).
	bool validate_schemas;     // "schemas": "validate"
	bool unknown_pass;         // "unknown_types": "pass" (default: dead_letter)
	char *version_property;    // "version_property" (default schema_version)
	int handler_timeout_ms;    // how long tenant code may run for one message (default 30000)
	bool token_destination_ok; // the namespace may receive an Entra ID token (TLS Service Bus, or listed)
};

// Pins the settings sbpg's own statements depend on (search_path = pg_catalog, pg_temp among
// them) at session level, over whatever the database's or the owner's defaults say. Called once by
// the launcher and each worker after connecting.
void PinSessionSettings();

// Reads subscription `name`; out->found says whether it exists.
void LoadSubConfig(const char *name, SubConfig *out);

// Replaces *out with the registered schemas, ordered by type and version. The rows are read into
// PostgreSQL memory first and copied into *out only after every SPI call of the read succeeded, in
// one step no PostgreSQL error can interrupt; an ERROR leaves *out empty or untouched (the caller's
// PgGuard returns false).
void LoadSchemas(std::vector<schema::SchemaRow> *out);
// Changes whenever a schema is registered (or a type dropped).
int64 SchemasStamp();

} // namespace sbpg::pg
