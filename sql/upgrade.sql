-- Upgrading an installation of 0.1 to 0.2 keeps what was registered working: 0.1 stored the
-- upcast from version N to the version after it with version N; 0.2 stores the upcast into
-- version N with version N.
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
DROP EXTENSION sbpg CASCADE;
