-- pgTAP: functions named by signature (0.3). sbpg.subscriptions.handler and sbpg.schemas.upcast
-- hold a schema-qualified signature as text (pg_upgrade refuses regprocedure columns), looked up by
-- sbpg._resolve_function; a subscription records its handler's owner (docs/security.md).
-- Runs in the database test/pg/run prepares (extensions pgtap and sbpg); everything is rolled back.
BEGIN;
SELECT plan(20);

CREATE SCHEMA tap_sig;
CREATE ROLE tap_sig_app NOLOGIN;
CREATE ROLE tap_sig_other NOLOGIN;
CREATE TYPE tap_sig.kind AS (a int);
CREATE FUNCTION tap_sig.handle(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION tap_sig.two(a tap_sig.kind, b jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION tap_sig.handle(sbpg.message) TO tap_sig_app;

-- The text kept for a function.
SELECT is(sbpg._function_text('tap_sig.handle(sbpg.message)'), 'tap_sig.handle(sbpg.message)',
    'a function is kept by its schema-qualified signature');
SET search_path = tap_sig, sbpg, public;
SELECT is(sbpg._function_text('handle(message)'), 'tap_sig.handle(sbpg.message)',
    'whatever the caller''s search_path: every schema but pg_catalog written out');
SELECT is(sbpg._function_text('two(kind, jsonb)'), 'tap_sig.two(tap_sig.kind,jsonb)', 'argument types too');
RESET search_path;
SELECT is(sbpg._function_text(NULL), NULL, 'NULL stays NULL');
SELECT is(sbpg._function_text(999999::oid::regprocedure), '(dropped function 999999)',
    'an OID without a function: a text that does not resolve');

-- Looking it up.
SELECT is(sbpg._resolve_function('tap_sig.handle(sbpg.message)'), 'tap_sig.handle(sbpg.message)'::regprocedure::oid,
    'a kept signature finds its function');
SET search_path = tap_sig, public;
SELECT is(sbpg._resolve_function('tap_sig.two(tap_sig.kind,jsonb)'), 'tap_sig.two(tap_sig.kind,jsonb)'::regprocedure::oid,
    'whatever the caller''s search_path');
RESET search_path;
SELECT is(sbpg._resolve_function('(dropped function 999999)'), NULL, 'a dropped function''s text finds nothing');
SELECT is(sbpg._resolve_function((SELECT oid::text FROM pg_proc WHERE proname = 'now')), NULL,
    'a bare OID finds nothing (regprocedure input would take it)');
SELECT is(sbpg._resolve_function('tap_sig.nosuch(sbpg.message)'), NULL, 'an unknown function finds nothing');
SELECT is(sbpg._resolve_function('tap_sig.handle(tap_sig.nosuchtype)'), NULL,
    'an unknown argument type finds nothing (no error)');
SELECT is(sbpg._resolve_function('not a signature ('), NULL, 'text that does not parse finds nothing (no error)');

-- Subscriptions.
SELECT sbpg.create_subscription('tap-sig', 'amqp://127.0.0.1:5672', 'q', 'tap_sig.handle(sbpg.message)', 'tap_sig_app', enabled => false);
SELECT is((SELECT handler FROM sbpg.subscriptions WHERE name = 'tap-sig'), 'tap_sig.handle(sbpg.message)',
    'create_subscription keeps the handler''s signature');
SELECT is((SELECT handler_owner::text FROM sbpg.subscriptions WHERE name = 'tap-sig'), current_user::text,
    'and the role that owns the handler');
ALTER FUNCTION tap_sig.handle(sbpg.message) OWNER TO tap_sig_other;
SELECT throws_ok($$SELECT sbpg.alter_subscription('tap-sig', batch_size => 5)$$, '42501',
    'handler tap_sig.handle(sbpg.message) of subscription "tap-sig" is now owned by another role',
    'a handler now owned by another role is not kept silently');
SELECT lives_ok($$SELECT sbpg.alter_subscription('tap-sig', handler => 'tap_sig.handle(sbpg.message)', batch_size => 5)$$,
    'naming it again accepts it');
SELECT is((SELECT handler_owner::text FROM sbpg.subscriptions WHERE name = 'tap-sig'), 'tap_sig_other',
    'with its new owner');
DROP FUNCTION tap_sig.handle(sbpg.message);
SELECT throws_ok($$SELECT sbpg.alter_subscription('tap-sig', batch_size => 6)$$, '42883',
    'handler tap_sig.handle(sbpg.message) of subscription "tap-sig" does not exist',
    'altering a subscription whose handler is gone says so');

-- No column of sbpg's tables has a type pg_upgrade refuses (it checks every user table).
SELECT is((SELECT count(*)::int FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           WHERE c.relnamespace = 'sbpg'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
             AND a.atttypid IN ('regproc'::regtype, 'regprocedure'::regtype, 'regoper'::regtype, 'regoperator'::regtype,
                                'regconfig'::regtype, 'regdictionary'::regtype, 'regnamespace'::regtype,
                                'regcollation'::regtype)), 0,
    'no sbpg table column is of a reg* type pg_upgrade refuses');
SELECT is((SELECT upcast FROM sbpg.schema_catalog LIMIT 0), NULL, 'schema_catalog still reads');

SELECT * FROM finish();
ROLLBACK;
