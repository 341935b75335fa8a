-- pgTAP: the retry policy's settings (subscription options), the retries table, and who sees it.
-- Runs in the database test/pg/run prepares (extensions pgtap and sbpg); everything is rolled back.
BEGIN;
SELECT plan(28);

CREATE ROLE tap_rapp NOLOGIN;
CREATE ROLE tap_rmon NOLOGIN IN ROLE sbpg_monitor;
CREATE ROLE tap_rnobody NOLOGIN;
CREATE FUNCTION tap_rhandler(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION tap_rhandler(sbpg.message) TO tap_rapp;

SELECT has_table('sbpg', 'retries', 'table sbpg.retries');
SELECT columns_are('sbpg', 'retries', ARRAY['subscription', 'sequence_number', 'message_id', 'attempts',
    'first_failed_at', 'last_failed_at', 'next_attempt_at', 'last_error', 'deferred', 'session_id', 'stopped', 'dead_letter']);
SELECT index_is_unique('sbpg', 'retries', 'retries_by_sequence');
SELECT col_default_is('sbpg', 'inbox', 'attempts', '1', 'an inbox row counts one attempt unless told otherwise');
-- The retry figures of sbpg.stats; a worker counts them in test/e2e/retries.test.mjs and
-- test/e2e/faults.test.mjs.
SELECT col_type_is('sbpg', 'stats', 'retries', 'bigint', 'sbpg.stats.retries (retries made) is a bigint counter');
SELECT col_type_is('sbpg', 'stats', 'max_retries_exceeded', 'bigint', 'sbpg.stats.max_retries_exceeded is a bigint counter');
SELECT col_type_is('sbpg', 'stats', 'lock_renewals', 'bigint', 'sbpg.stats.lock_renewals is a bigint counter');
SELECT col_type_is('sbpg', 'stats', 'waiting_retry', 'integer', 'sbpg.stats.waiting_retry (messages held now) is an integer');

-- Every option, in range.
SELECT lives_ok($$SELECT sbpg.create_subscription('r-ok', 'amqp://127.0.0.1:5672', 'q', 'tap_rhandler(sbpg.message)', 'tap_rapp',
    enabled => false, options => '{"max_retries": 3, "retry_base_ms": 200, "retry_cap_ms": 5000, "retry_hold_ms": 1000, "max_lock_renewal_s": 60}')$$,
    'all retry options in range are accepted');
SELECT is((SELECT options ->> 'max_retries' FROM sbpg.subscriptions WHERE name = 'r-ok'), '3', 'options are stored as given');
SELECT results_eq($$SELECT state, retries, max_retries_exceeded, lock_renewals, waiting_retry FROM sbpg.stats WHERE subscription = 'r-ok'$$,
    $$VALUES ('unserved', NULL::bigint, NULL::bigint, NULL::bigint, NULL::integer)$$,
    'a subscription no worker serves (not this database) is listed with no retry figures: NULL, not zero');
SELECT lives_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_retries": 0}')$$, 'max_retries 0 is accepted');
SELECT is((SELECT options ->> 'max_retries' FROM sbpg.subscriptions WHERE name = 'r-ok'), '0',
    'max_retries 0 is stored (the worker then dead-letters on the first transient failure)');

-- Out of range, wrong type, unknown: refused with the option named.
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_retries": -1}')$$, '22023',
    'subscription option "max_retries" must be an integer from 0 to 1000', 'a negative max_retries is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_retries": 1001}')$$, '22023',
    'subscription option "max_retries" must be an integer from 0 to 1000', 'max_retries above 1000 is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_retries": "5"}')$$, '22023',
    'subscription option "max_retries" must be an integer from 0 to 1000', 'a string is not a number');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_base_ms": 1.5}')$$, '22023',
    'subscription option "retry_base_ms" must be an integer from 1 to 3600000', 'fractions are refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_base_ms": 0}')$$, '22023',
    'subscription option "retry_base_ms" must be an integer from 1 to 3600000', 'a zero base is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_cap_ms": 86400001}')$$, '22023',
    'subscription option "retry_cap_ms" must be an integer from 1 to 86400000', 'a cap above a day is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_base_ms": 5000, "retry_cap_ms": 1000}')$$, '22023',
    'retry_cap_ms must be at least retry_base_ms', 'a cap below the base is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_hold_ms": 600001}')$$, '22023',
    'subscription option "retry_hold_ms" must be an integer from 0 to 600000', 'holding longer than 10 minutes is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_lock_renewal_s": 86401}')$$, '22023',
    'subscription option "max_lock_renewal_s" must be an integer from 0 to 86400', 'renewing locks longer than a day is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"retry_hold_ms": 120000, "max_lock_renewal_s": 60}')$$, '22023',
    'retry_hold_ms must not exceed max_lock_renewal_s', 'a hold longer than the locks are renewed is refused');
SELECT throws_ok($$SELECT sbpg.alter_subscription('r-ok', options => '{"max_retry": 3}')$$, '22023',
    'unknown subscription option "max_retry"', 'a misspelt option is refused, not ignored');

-- Who sees the retries: sbpg_monitor members yes, others no.
INSERT INTO sbpg.retries (subscription, sequence_number, attempts, next_attempt_at, last_error)
VALUES ('r-ok', 7, 2, now() + interval '1 minute', 'TransientError: deadlock detected (SQLSTATE 40P01)');
SET ROLE tap_rmon;
SELECT is((SELECT attempts FROM sbpg.retries WHERE subscription = 'r-ok'), 2, 'sbpg_monitor reads sbpg.retries');
RESET ROLE;
SET ROLE tap_rnobody;
SELECT throws_ok($$SELECT * FROM sbpg.retries$$, '42501', 'permission denied for table retries', 'others cannot read sbpg.retries');
RESET ROLE;

-- Dropping the subscription removes its retries with its inbox.
SELECT lives_ok($$SELECT sbpg.drop_subscription('r-ok')$$, 'drop_subscription');
SELECT is((SELECT count(*)::int FROM sbpg.retries WHERE subscription = 'r-ok'), 0, 'its retry rows are gone');

SELECT * FROM finish();
ROLLBACK;
