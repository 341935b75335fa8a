-- pgTAP: declarative mappings: what create_mapping accepts and refuses, and who may.
BEGIN;
SELECT plan(14);

CREATE ROLE tap_mapp NOLOGIN;
CREATE ROLE tap_madmin NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_mother NOLOGIN IN ROLE sbpg_admin;
GRANT tap_mapp TO tap_madmin;
CREATE FUNCTION tap_mhandler(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION tap_mhandler(sbpg.message) TO tap_mapp;
CREATE TABLE tap_cust (id int PRIMARY KEY, name text);
CREATE TABLE tap_nokey (id int, name text);
CREATE VIEW tap_view AS SELECT * FROM tap_cust;
GRANT SELECT, INSERT, UPDATE, DELETE ON tap_cust, tap_nokey TO tap_mapp;
SELECT sbpg.create_subscription('m-sub', 'amqp://127.0.0.1:5672', 'q', 'tap_mhandler(sbpg.message)', 'tap_mapp', enabled => false);

SELECT lives_ok($$SELECT sbpg.create_mapping('m-sub', 'cust.upserted', 'tap_cust', 'upsert', ARRAY['id'], '{"name": "full_name"}')$$, 'an upsert mapping on the primary key');
SELECT is((SELECT action FROM sbpg.mappings WHERE message_type = 'cust.upserted'), 'upsert', 'it is listed');
SELECT lives_ok($$SELECT sbpg.create_mapping('m-sub', 'cust.upserted', 'tap_cust', 'insert')$$, 'creating it again is accepted');
SELECT results_eq($$SELECT target::text, action, key_columns, column_map FROM sbpg.mappings WHERE subscription = 'm-sub'$$,
    $$VALUES ('tap_cust', 'insert', NULL::text[], '{}'::jsonb)$$, 'creating it again replaces it: one mapping, the new one');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_nokey', 'upsert', ARRAY['id'])$$, '42P17',
    'no unique index of public.tap_nokey covers exactly id', 'an upsert needs a unique index on its keys');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust', 'delete')$$, '22023', 'mapping action delete needs key_columns', 'delete needs keys');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust', 'delete', ARRAY['nope'])$$, '42703', 'table public.tap_cust has no column nope', 'keys are columns');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust', 'insert', NULL, '{"nope": "a"}')$$, '42703', 'table public.tap_cust has no column nope', 'column_map keys are columns');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_view')$$, '42809', 'mapping target public.tap_view is not a table', 'a view is not a target');
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust', 'merge')$$, '22023', 'unknown mapping action ''merge''', 'an unknown action');
REVOKE DELETE ON tap_cust FROM tap_mapp;
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust', 'delete', ARRAY['id'])$$, '42501',
    'run_as role tap_mapp may not DELETE on public.tap_cust', 'run_as needs the privileges the action uses');
SET ROLE tap_mother;
SELECT throws_ok($$SELECT sbpg.create_mapping('m-sub', 'x.y', 'tap_cust')$$, '42501', 'permission denied to create mapping', 'an admin who is not a member of run_as may not');
RESET ROLE;
SELECT lives_ok($$SELECT sbpg.drop_mapping('m-sub', 'cust.upserted')$$, 'drop_mapping');
SELECT is((SELECT count(*)::int FROM sbpg.mappings WHERE subscription = 'm-sub'), 0, 'drop_mapping removes the mapping');

SELECT * FROM finish();
ROLLBACK;
