-- Upgrading an installation of 0.1 to 0.2 keeps what was registered working: 0.1 stored the
-- upcast from version N to the version after it with version N; 0.2 stores the upcast into
-- version N with version N. Then 0.2 to 0.3: handlers and upcasts kept by signature (text), with
-- the handler's owner.
\set SHOW_CONTEXT never
DROP EXTENSION IF EXISTS sbpg CASCADE;
CREATE EXTENSION sbpg VERSION '0.1';
CREATE FUNCTION up_1_2(p jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT p || '{"v": 2}' $$;
CREATE FUNCTION up_2_3(p jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT p || '{"v": 3}' $$;
CREATE FUNCTION up_next(p jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT p $$;
-- Under 0.1's reading: the upcast given with version 1 turns version 1 into version 2.
SELECT sbpg.register_schema('up.three', 1, '{"type": "object"}', upcast => 'up_1_2(jsonb)');
SELECT sbpg.register_schema('up.three', 2, '{"type": "object"}', upcast => 'up_2_3(jsonb)');
SELECT sbpg.register_schema('up.three', 3, '{"type": "object"}');
-- An upcast with the newest version: it never ran (no next version).
SELECT sbpg.register_schema('up.waiting', 1, '{"type": "object"}', upcast => 'up_next(jsonb)');
SELECT message_type, version, upcast FROM sbpg.schemas ORDER BY 1, 2;
ALTER EXTENSION sbpg UPDATE TO '0.2';
SELECT extversion FROM pg_extension WHERE extname = 'sbpg';
SELECT message_type, version, upcast, upcast_from, chain_gap FROM sbpg.schema_catalog ORDER BY 1, 2;
-- From 0.2 on, an upcast comes with the version it leads into, or later with set_upcast.
SELECT sbpg.register_schema('up.waiting', 2, '{"type": "object"}', upcast => 'up_next(jsonb)');
SELECT sbpg.register_schema('up.new', 1, '{"type": "object"}', upcast => 'up_next(jsonb)');
SELECT sbpg.register_schema('up.new', 1, '{"type": "object"}');
SELECT sbpg.register_schema('up.new', 2, '{"type": "object"}');
SELECT message_type, version, upcast_from, chain_gap FROM sbpg.schema_catalog WHERE message_type = 'up.new' ORDER BY 2;
SELECT sbpg.set_upcast('up.new', 2, 'up_1_2(jsonb)');
SELECT sbpg.set_upcast('up.new', 1, 'up_1_2(jsonb)');
SELECT sbpg.set_upcast('up.new', 3, 'up_1_2(jsonb)');
SELECT message_type, version, upcast, chain_gap FROM sbpg.schema_catalog WHERE message_type IN ('up.new', 'up.waiting') ORDER BY 1, 2;
-- 0.2 -> 0.3: subscriptions (one whose handler was dropped) and upcasts (one dropped) by signature.
CREATE ROLE upgrade_app NOLOGIN;
CREATE FUNCTION up_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION up_gone(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION up_handler(sbpg.message), up_gone(sbpg.message) TO upgrade_app;
SELECT sbpg.create_subscription('kept', 'amqp://127.0.0.1:5672', 'q1', 'up_handler(sbpg.message)', 'upgrade_app', enabled => false);
SELECT sbpg.create_subscription('orphan', 'amqp://127.0.0.1:5672', 'q2', 'up_gone(sbpg.message)', 'upgrade_app', enabled => false);
DROP FUNCTION up_gone(sbpg.message);
DROP FUNCTION up_2_3(jsonb);
ALTER EXTENSION sbpg UPDATE TO '0.3';
SELECT extversion FROM pg_extension WHERE extname = 'sbpg';
SELECT name, handler ~ '^\(dropped function [0-9]+\)$' AS dropped,
       CASE WHEN handler ~ '^\(dropped' THEN NULL ELSE handler END AS handler,
       handler_owner::text = current_user AS owner_recorded, sbpg._resolve_function(handler) IS NOT NULL AS resolves
FROM sbpg.subscriptions ORDER BY name;
SELECT message_type, version, CASE WHEN upcast ~ '^\(dropped' THEN '(dropped)' ELSE upcast END AS upcast, chain_gap
FROM sbpg.schema_catalog ORDER BY 1, 2;
SELECT pg_typeof(handler) AS handler_type FROM sbpg.subscriptions LIMIT 1;
-- 0.3 also adds the trace context to sbpg.message and the inbox, the per-minute history, and the
-- inbox's storage parameters.
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid IN ('sbpg.message'::regclass, 'sbpg.inbox'::regclass) AND attname = 'traceparent' ORDER BY attrelid::regclass::text;
SELECT reloptions FROM pg_class WHERE oid = 'sbpg.inbox'::regclass;
SELECT has_table_privilege('sbpg_monitor', 'sbpg.stats_history', 'SELECT') AS monitor_reads_history,
       has_table_privilege('sbpg_monitor', 'sbpg.stats_minutes', 'SELECT') AS monitor_reads_storage;
SELECT sbpg.drop_subscription('kept');
SELECT sbpg.drop_subscription('orphan');
DROP EXTENSION sbpg CASCADE;
DROP ROLE upgrade_app;
