-- pgTAP: sbpg's catalog objects and who may use them. Runs in a database of its own, with the
-- extensions pgtap and sbpg created by test/pg/run.
BEGIN;
SELECT plan(52);

SELECT has_schema('sbpg');
SELECT has_role('sbpg_admin');
SELECT has_role('sbpg_monitor');
SELECT isnt_superuser('sbpg_admin');
SELECT isnt_superuser('sbpg_monitor');
SELECT ok(NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'sbpg_admin'), 'sbpg_admin cannot log in');
SELECT ok(NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'sbpg_monitor'), 'sbpg_monitor cannot log in');

SELECT has_type('sbpg', 'message', 'composite type sbpg.message');
SELECT columns_are('sbpg', 'message', ARRAY['message_id', 'correlation_id', 'session_id', 'subject', 'content_type',
    'reply_to', 'body', 'raw_body', 'properties', 'sequence_number', 'enqueued_at', 'delivery_count', 'message_type',
    'schema_version', 'subscription', 'received_schema_version', 'traceparent']);
SELECT col_type_is('sbpg', 'message', 'body', 'jsonb', 'sbpg.message.body is jsonb');
SELECT col_type_is('sbpg', 'message', 'raw_body', 'bytea', 'sbpg.message.raw_body is bytea');
SELECT col_type_is('sbpg', 'message', 'properties', 'jsonb', 'sbpg.message.properties is jsonb');
SELECT col_type_is('sbpg', 'message', 'sequence_number', 'bigint', 'sbpg.message.sequence_number is bigint');
SELECT col_type_is('sbpg', 'message', 'enqueued_at', 'timestamp with time zone', 'sbpg.message.enqueued_at is timestamp with time zone');

SELECT has_table('sbpg', 'identities', 'table sbpg.identities');
SELECT has_table('sbpg', 'identity_secrets', 'table sbpg.identity_secrets');
SELECT has_table('sbpg', 'subscriptions', 'table sbpg.subscriptions');
SELECT has_table('sbpg', 'inbox', 'table sbpg.inbox');
SELECT has_view('sbpg', 'stats', 'view sbpg.stats');
SELECT columns_are('sbpg', 'inbox', ARRAY['subscription', 'sequence_number', 'message_id', 'correlation_id', 'status',
    'reason', 'delivery_count', 'attempts', 'xid', 'recorded_at', 'settled_at', 'traceparent']);
SELECT col_type_is('sbpg', 'inbox', 'xid', 'xid8', 'sbpg.inbox.xid is xid8');
SELECT has_index('sbpg', 'inbox', 'inbox_by_sequence', ARRAY['subscription', 'sequence_number']);
SELECT index_is_unique('sbpg', 'inbox', 'inbox_by_sequence');
-- The shape of sbpg.stats. The figures themselves (latencies, lag, the token's expiry) are checked
-- with a running worker: test/e2e/core.test.mjs and test/e2e/entra.test.mjs.
SELECT columns_are('sbpg', 'stats', ARRAY['subscription', 'enabled', 'state', 'pid', 'connected_since', 'received', 'applied',
    'dead_lettered', 'duplicates', 'abandoned', 'batches', 'settle_failures', 'reconnects', 'last_error', 'last_error_at',
    'apply_ms_p50', 'apply_ms_p99', 'lag_ms_p50', 'lag_ms_p99', 'messages_per_second', 'token_expires_at', 'tokens_put',
    'token_subject', 'token_error', 'last_batch_at', 'retries', 'retried_messages', 'max_retries_exceeded', 'waiting_retry',
    'deferred', 'lock_renewals', 'locks_lost', 'workers'],
    'sbpg.stats has exactly these columns: of the token only its expiry, principal, error and how many were put, never the token');
SELECT columns_are('sbpg', 'stats_workers', ARRAY['subscription', 'worker', 'state', 'pid', 'connected_since', 'received',
    'applied', 'dead_lettered', 'duplicates', 'batches', 'reconnects', 'last_error', 'last_error_at', 'apply_ms_p50',
    'apply_ms_p99', 'lag_ms_p50', 'lag_ms_p99', 'messages_per_second', 'last_batch_at', 'retries', 'waiting_retry',
    'lock_renewals', 'locks_lost'], 'sbpg.stats_workers: one row per worker, no token');
SELECT table_privs_are('sbpg', 'stats_workers', 'sbpg_monitor', ARRAY['SELECT']);
SELECT col_type_is('sbpg', 'stats', 'apply_ms_p99', 'double precision', 'sbpg.stats.apply_ms_p99 (apply latency, ms) is double precision');
SELECT col_type_is('sbpg', 'stats', 'lag_ms_p99', 'double precision', 'sbpg.stats.lag_ms_p99 (end-to-end lag, ms) is double precision');
SELECT col_type_is('sbpg', 'stats', 'token_expires_at', 'timestamp with time zone', 'sbpg.stats.token_expires_at is a point in time');
-- The per-minute history (docs/monitoring.md); written by a worker in test/e2e/telemetry.test.mjs.
SELECT columns_are('sbpg', 'stats_history', ARRAY['subscription', 'minute', 'received', 'applied', 'dead_lettered',
    'duplicates', 'retries', 'batches', 'messages_per_second', 'apply_ms_p50', 'apply_ms_p99', 'lag_ms_p50', 'lag_ms_p99'],
    'sbpg.stats_history has exactly these columns');
SELECT col_type_is('sbpg', 'stats_history', 'minute', 'timestamp with time zone', 'sbpg.stats_history.minute is a point in time');
SELECT table_privs_are('sbpg', 'stats_history', 'sbpg_monitor', ARRAY['SELECT']);
SELECT table_privs_are('sbpg', 'stats_minutes', 'sbpg_monitor', ARRAY[]::text[]);
SELECT is(current_setting('sbpg.stats_history_retention'), '1d', 'sbpg.stats_history_retention: a day by default');

SELECT function_returns('sbpg', 'create_identity', ARRAY['text', 'text', 'jsonb'], 'void');
SELECT function_returns('sbpg', 'create_subscription',
    ARRAY['text', 'text', 'text', 'regprocedure', 'regrole', 'text', 'integer', 'integer', 'text', 'boolean', 'jsonb'], 'void');
SELECT is_definer('sbpg', 'create_subscription',
    ARRAY['text', 'text', 'text', 'regprocedure', 'regrole', 'text', 'integer', 'integer', 'text', 'boolean', 'jsonb']);
SELECT has_function('sbpg', 'alter_subscription', 'sbpg.alter_subscription exists');
SELECT has_function('sbpg', 'drop_subscription', ARRAY['text']);
SELECT has_function('sbpg', 'enable_subscription', ARRAY['text']);
SELECT has_function('sbpg', 'disable_subscription', ARRAY['text']);

-- Privileges: nobody but superusers reads secrets; admins configure; monitors read.
SELECT table_privs_are('sbpg', 'identity_secrets', 'sbpg_admin', ARRAY[]::text[]);
SELECT table_privs_are('sbpg', 'identity_secrets', 'sbpg_monitor', ARRAY[]::text[]);
SELECT table_privs_are('sbpg', 'identity_secrets', 'public', ARRAY[]::text[]);
SELECT table_privs_are('sbpg', 'identities', 'sbpg_monitor', ARRAY[]::text[]);
SELECT table_privs_are('sbpg', 'identities', 'sbpg_admin', ARRAY['SELECT']);
SELECT table_privs_are('sbpg', 'inbox', 'sbpg_monitor', ARRAY['SELECT']);
SELECT table_privs_are('sbpg', 'inbox', 'public', ARRAY[]::text[]);
SELECT table_privs_are('sbpg', 'stats', 'sbpg_monitor', ARRAY['SELECT']);
SELECT function_privs_are('sbpg', 'create_identity', ARRAY['text', 'text', 'jsonb'], 'sbpg_admin', ARRAY['EXECUTE']);
SELECT function_privs_are('sbpg', 'create_identity', ARRAY['text', 'text', 'jsonb'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('sbpg', 'drop_subscription', ARRAY['text'], 'sbpg_monitor', ARRAY[]::text[]);

SELECT * FROM finish();
ROLLBACK;
