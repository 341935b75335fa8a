// src/pg/config.cpp
//   What a worker reads from the catalog, each in a short transaction of its own: a subscription's
//   settings (with the search_path a session of run_as would get), the registered schemas and the
//   stamp that says when they changed; and the session settings sbpg's statements depend on.
//
//   Invariants: results are read by column name; every statement is schema-qualified (spi.hpp).
//   Runs inside PgGuard and owns no C++ objects with destructors; LoadSchemas fills the caller's
//   vector in one step that calls nothing of PostgreSQL and catches its own exceptions.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/schema/registry.hpp"

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
}

#include "sbpg/pg/config.hpp"
#include "sbpg/pg/spi.hpp"

#include <cstring>

namespace sbpg::pg {

namespace {

const char *const kSubscriptionSql =
    "SELECT s.namespace AS namespace, s.entity AS entity, sbpg._resolve_function(s.handler) AS handler, "
    "s.handler AS handler_name, s.handler_owner::pg_catalog.oid AS handler_owner, "
    "s.run_as::pg_catalog.oid AS run_as, s.run_as::pg_catalog.text AS run_as_name, s.identity AS identity, "
    "i.kind AS identity_kind, (i.options" OP_GETTEXT "'key_name') AS key_name, k.secret AS key, "
    "(i.options" OP_GETTEXT "'key_file') AS key_file, (i.options" OP_GETTEXT "'key_env') AS key_env, "
    "s.batch_size AS batch_size, s.prefetch AS prefetch, s.notify_channel AS notify_channel, s.enabled AS enabled, "
    "'sbpg.message'::pg_catalog.regtype::pg_catalog.oid AS message_type, "
    "i.options::pg_catalog.text AS identity_options, "
    "coalesce((s.options" OP_GETTEXT "'allow_superuser_run_as')::boolean, false) AS allow_superuser, "
    "coalesce((s.options" OP_GETTEXT "'max_retries')::integer, 5) AS max_retries, "
    "coalesce((s.options" OP_GETTEXT "'retry_base_ms')::integer, 1000) AS retry_base_ms, "
    "coalesce((s.options" OP_GETTEXT "'retry_cap_ms')::integer, 300000) AS retry_cap_ms, "
    "coalesce((s.options" OP_GETTEXT "'retry_hold_ms')::integer, 30000) AS retry_hold_ms, "
    "coalesce((s.options" OP_GETTEXT "'max_lock_renewal_s')::integer, 300) AS max_lock_renewal_s, "
    // sessions: true declares them, false never receives them, absent detects them on attach.
    "CASE WHEN (s.options" OP_GETTEXT "'sessions')" OP_EQ "'true' THEN 1 WHEN (s.options" OP_GETTEXT "'sessions')" OP_EQ
    "'false' THEN -1 ELSE 0 END AS sessions, "
    "coalesce((s.options" OP_GETTEXT "'max_sessions')::integer, 8) AS max_sessions, "
    "coalesce((s.options" OP_GETTEXT "'session_idle_ms')::integer, 5000) AS session_idle_ms, "
    "coalesce((s.options" OP_GETTEXT "'session_failure')" OP_EQ "'stop', false) AS session_stop, "
    "coalesce((s.options" OP_GETTEXT "'workers')::integer, 1) AS workers, "
    "coalesce((s.options" OP_GETTEXT "'schemas'), 'off')" OP_EQ "'validate' AS validate_schemas, "
    "coalesce((s.options" OP_GETTEXT "'unknown_types'), 'dead_letter')" OP_EQ "'pass' AS unknown_pass, "
    "coalesce((s.options" OP_GETTEXT "'version_property'), 'schema_version') AS version_property, "
    // handler_timeout_ms: 30 s by default, never past the lock renewal limit.
    "coalesce((s.options" OP_GETTEXT "'handler_timeout_ms')::integer, "
    "CASE WHEN coalesce((s.options" OP_GETTEXT "'max_lock_renewal_s')::integer, 300)" OP_EQ "0 THEN 30000 "
    "ELSE least(30000, coalesce((s.options" OP_GETTEXT
    "'max_lock_renewal_s')::integer, 300) OPERATOR(pg_catalog.*) 1000) "
    "END) AS handler_timeout_ms, "
    // An Entra ID token goes to a Service Bus namespace over TLS, or to a broker the identity lists.
    "(s.namespace OPERATOR(pg_catalog.~*) '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\\.servicebus\\."
    "(windows\\.net|chinacloudapi\\.cn|usgovcloudapi\\.net|cloudapi\\.de)(:[0-9]{1,5})?/?$' "
    "OR EXISTS (SELECT FROM pg_catalog.jsonb_array_elements_text(i.options OPERATOR(pg_catalog.->) "
    "'allowed_namespaces') a "
    "WHERE pg_catalog.lower(pg_catalog.rtrim(a, '/'))" OP_EQ "pg_catalog.lower(pg_catalog.rtrim(s.namespace, '/')))) "
    "AS token_destination_ok "
    "FROM sbpg.subscriptions s LEFT JOIN sbpg.identities i ON i.name" OP_EQ "s.identity "
    "LEFT JOIN sbpg.identity_secrets k ON k.identity" OP_EQ "s.identity WHERE s.name" OP_EQ "$1";

// The search_path a session of run_as would get: role in this database, role, database, every role
// (ALTER ROLE ALL), the configuration file, the built-in default.
const char *const kSearchPathSql =
    "SELECT coalesce("
    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
    "WHERE s.setrole" OP_EQ "$1 AND (s.setdatabase" OP_EQ "0 OR s.setdatabase" OP_EQ "$2) "
    "AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' ORDER BY s.setdatabase USING" OP_GT "LIMIT 1), "
    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
    "WHERE s.setrole" OP_EQ "0 AND s.setdatabase" OP_EQ "$2 AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' LIMIT 1), "
    "(SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c "
    "WHERE s.setrole" OP_EQ "0 AND s.setdatabase" OP_EQ "0 AND c OPERATOR(pg_catalog.~~) 'search\\_path=%' LIMIT 1), "
    "(SELECT setting FROM pg_catalog.pg_file_settings WHERE name" OP_EQ "'search_path' AND applied "
    "ORDER BY seqno USING" OP_GT "LIMIT 1), "
    "(SELECT boot_val FROM pg_catalog.pg_settings WHERE name" OP_EQ "'search_path')) AS search_path";

// Text of the result's only row, kept in TopMemoryContext (NULL stays nullptr).
char *
Kept(const spi::SpiResult &res, const char *col) {
	return res.Text(0, res.Col(col), TopMemoryContext);
}

void
ReadSubscription(const char *name, SubConfig *out) {
	Oid types[1] = {TEXTOID};
	Datum args[1] = {CStringGetTextDatum(name)};
	spi::SpiResult r = spi::ExecSql("read sbpg.subscriptions", kSubscriptionSql, 1, types, args, nullptr, SPI_OK_SELECT,
	                                1);
	if (r.rows != 1)
		return;
	out->found = true;
	out->name = MemoryContextStrdup(TopMemoryContext, name);
	out->namespace_ = Kept(r, "namespace");
	out->entity = Kept(r, "entity");
	out->handler = r.ObjectId(0, r.Col("handler"));
	out->handler_name = Kept(r, "handler_name");
	out->handler_owner = r.ObjectId(0, r.Col("handler_owner"));
	out->run_as = r.ObjectId(0, r.Col("run_as"));
	out->run_as_name = Kept(r, "run_as_name");
	out->identity = Kept(r, "identity");
	out->identity_kind = Kept(r, "identity_kind");
	out->key_name = Kept(r, "key_name");
	out->key = Kept(r, "key");
	out->key_file = Kept(r, "key_file");
	out->key_env = Kept(r, "key_env");
	out->batch_size = r.Int32(0, r.Col("batch_size"));
	out->prefetch = r.Int32(0, r.Col("prefetch"));
	out->notify_channel = Kept(r, "notify_channel");
	out->enabled = r.Bool(0, r.Col("enabled"));
	out->message_type = r.ObjectId(0, r.Col("message_type"));
	out->identity_options = Kept(r, "identity_options");
	out->allow_superuser = r.Bool(0, r.Col("allow_superuser"));
	out->max_retries = r.Int32(0, r.Col("max_retries"));
	out->retry_base_ms = r.Int32(0, r.Col("retry_base_ms"));
	out->retry_cap_ms = r.Int32(0, r.Col("retry_cap_ms"));
	out->retry_hold_ms = r.Int32(0, r.Col("retry_hold_ms"));
	out->max_lock_renewal_s = r.Int32(0, r.Col("max_lock_renewal_s"));
	out->sessions = r.Int32(0, r.Col("sessions"));
	out->max_sessions = r.Int32(0, r.Col("max_sessions"));
	out->session_idle_ms = r.Int32(0, r.Col("session_idle_ms"));
	out->session_stop = r.Bool(0, r.Col("session_stop"));
	out->workers = r.Int32(0, r.Col("workers"));
	out->validate_schemas = r.Bool(0, r.Col("validate_schemas"));
	out->unknown_pass = r.Bool(0, r.Col("unknown_pass"));
	out->version_property = Kept(r, "version_property");
	out->handler_timeout_ms = r.Int32(0, r.Col("handler_timeout_ms"));
	out->token_destination_ok = r.Bool(0, r.Col("token_destination_ok"), false);
}

void
ReadRunAsSearchPath(SubConfig *out) {
	Oid types[2] = {OIDOID, OIDOID};
	Datum args[2] = {ObjectIdGetDatum(out->run_as), ObjectIdGetDatum(MyDatabaseId)};
	spi::SpiResult r = spi::ExecSql("read run_as's search_path", kSearchPathSql, 2, types, args, nullptr, SPI_OK_SELECT,
	                                1);
	if (r.rows == 1)
		out->search_path = Kept(r, "search_path");
}

// The schema rows as read, in the transaction's memory.
struct SchemaRowsPg {
	uint64 n;
	char **types;
	int *versions;
	char **json;
};

// Copies the rows into *out. Pure C++ (no PostgreSQL call, so no longjmp can stop it half-way);
// false, with *out empty, when memory ran out.
bool
CopySchemaRows(const SchemaRowsPg &rows, std::vector<schema::SchemaRow> *out) noexcept {
	try {
		out->clear();
		out->reserve(rows.n);
		for (uint64 i = 0; i < rows.n; ++i) {
			schema::SchemaRow r;
			r.message_type = rows.types[i] ? rows.types[i] : "";
			r.version = rows.versions[i];
			r.schema_json = rows.json[i] ? rows.json[i] : "";
			out->push_back(std::move(r));
		}
		return true;
	} catch (...) {
		out->clear();
		return false;
	}
}

} // namespace

void
PinSessionSettings() {
	// What sbpg's statements and their results depend on, whatever ALTER DATABASE ... SET (which a
	// database owner may run) or the owner's role settings say. Tenant code changes none of these
	// beyond its own call (LeaveRunAs).
	static const char *const kPinned[][2] = {
	    {"search_path", "pg_catalog, pg_temp"},
	    {"role", "none"},
	    {"default_transaction_read_only", "off"},
	    {"default_transaction_isolation", "read committed"},
	    {"default_transaction_deferrable", "off"},
	    {"statement_timeout", "0"},
	    {"lock_timeout", "0"},
	    {"idle_in_transaction_session_timeout", "0"},
	    {"exit_on_error", "off"}, // an error a handler raises ends its attempt, not the worker
	    {"standard_conforming_strings", "on"},
	    {"row_security", "on"},
	    {"check_function_bodies", "on"},
	    {"DateStyle", "ISO, MDY"},
	    {"IntervalStyle", "postgres"},
	};
	for (const auto &kv : kPinned)
		SetConfigOption(kv[0], kv[1], PGC_SUSET, PGC_S_SESSION);
	// A settlement follows a commit that synchronous standbys confirmed, where they are configured.
	if (synchronous_commit < SYNCHRONOUS_COMMIT_REMOTE_FLUSH)
		SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION);
}

void
LoadSubConfig(const char *name, SubConfig *out) {
	memset(out, 0, sizeof *out);
	spi::ShortTransaction([&] {
		ReadSubscription(name, out);
		if (out->found)
			ReadRunAsSearchPath(out);
	});
}

void
LoadSchemas(std::vector<schema::SchemaRow> *out) {
	spi::ShortTransaction([&] {
		spi::SpiResult r = spi::ExecSql("read sbpg.schemas",
		                                "SELECT message_type, version, schema::pg_catalog.text AS schema_json FROM "
		                                "sbpg.schemas ORDER BY 1 USING" OP_LT ", 2 USING" OP_LT,
		                                0, nullptr, nullptr, nullptr, SPI_OK_SELECT);
		int type_col = r.Col("message_type"), version_col = r.Col("version"), json_col = r.Col("schema_json");
		SchemaRowsPg rows = {r.rows, static_cast<char **>(palloc0(sizeof(char *) * (r.rows + 1))),
		                     static_cast<int *>(palloc0(sizeof(int) * (r.rows + 1))),
		                     static_cast<char **>(palloc0(sizeof(char *) * (r.rows + 1)))};
		for (uint64 i = 0; i < r.rows; ++i) {
			rows.types[i] = r.Text(i, type_col);
			rows.versions[i] = r.Int32(i, version_col);
			rows.json[i] = r.Text(i, json_col);
		}
		if (!CopySchemaRows(rows, out))
			ereport(ERROR,
			        (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("sbpg: out of memory copying the registered schemas")));
	});
}

int64
SchemasStamp() {
	int64 stamp = 0;
	spi::ShortTransaction([&] {
		// Registering a version adds a row; dropping a type removes rows; the newest registration
		// time tells apart a drop followed by a registration.
		spi::SpiResult r = spi::ExecSql("read sbpg.schemas",
		                                "SELECT (SELECT pg_catalog.count(*) FROM sbpg.schemas) AS versions, "
		                                "(SELECT pg_catalog.count(*) FROM sbpg.message_types) AS types, "
		                                "(SELECT pg_catalog.max(registered_at) FROM sbpg.schemas) AS newest",
		                                0, nullptr, nullptr, nullptr, SPI_OK_SELECT, 1);
		if (r.rows == 1)
			stamp = r.Timestamp(0, r.Col("newest")) + r.Int64(0, r.Col("versions")) + 7 * r.Int64(0, r.Col("types"));
	});
	return stamp;
}

} // namespace sbpg::pg
