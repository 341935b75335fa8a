-- pgTAP: the SQL side of sbpg's security model (docs/security.md): Entra ID tokens only over TLS,
-- owners of message types, statistics by visibility, the handler time limit, configuration
-- functions refused where the calling role cannot be told, and what pg_dump keeps.
BEGIN;
SELECT plan(70);

CREATE ROLE tap_alice NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_bob NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_alice_w NOLOGIN;
CREATE ROLE tap_bob_w NOLOGIN;
CREATE ROLE tap_alice_team NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_watch NOLOGIN IN ROLE sbpg_monitor;
CREATE ROLE tap_nobody NOLOGIN;
GRANT tap_alice_w TO tap_alice;
GRANT tap_bob_w TO tap_bob;
GRANT tap_alice TO tap_alice_team; -- a member of alice's role
CREATE FUNCTION tap_sh(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION tap_sh(sbpg.message) TO tap_alice_w, tap_bob_w;

-- Entra ID tokens go to Service Bus over TLS, or to a broker the identity lists exactly.
SELECT sbpg.create_identity('tap-mi', 'managed_identity', '{"allowed_namespaces": ["amqp://127.0.0.1:5672"]}');
SELECT throws_ok($$SELECT sbpg.create_subscription('s-plain', 'amqp://contoso.servicebus.windows.net', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi')$$,
    '42501', 'identity "tap-mi" sends Entra ID tokens only to Service Bus namespaces over TLS, not to amqp://contoso.servicebus.windows.net',
    'no token over plain AMQP, even to a Service Bus host name');
SELECT throws_ok($$SELECT sbpg.create_subscription('s-plain', 'amqp://contoso.servicebus.windows.net:5671', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi')$$,
    '42501', 'identity "tap-mi" sends Entra ID tokens only to Service Bus namespaces over TLS, not to amqp://contoso.servicebus.windows.net:5671', 'nor with the TLS port written on a plain URL');
SELECT throws_ok($$SELECT sbpg.create_subscription('s-plain', 'amqps://evil.example', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi')$$,
    '42501', 'identity "tap-mi" sends Entra ID tokens only to Service Bus namespaces over TLS, not to amqps://evil.example', 'nor to another TLS broker that is not listed');
SELECT lives_ok($$SELECT sbpg.create_subscription('s-bare', 'contoso.servicebus.windows.net', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    'a namespace host name means TLS');
SELECT lives_ok($$SELECT sbpg.create_subscription('s-amqps', 'amqps://contoso.servicebus.windows.net', 'q2', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    'amqps:// to a namespace');
SELECT lives_ok($$SELECT sbpg.create_subscription('s-listed', 'amqp://127.0.0.1:5672', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    'a plain broker the identity lists exactly (a local emulator)');
SELECT results_eq($$SELECT name, namespace FROM sbpg.subscriptions WHERE name IN ('s-bare', 's-amqps', 's-listed') ORDER BY name$$,
    $$VALUES ('s-amqps', 'amqps://contoso.servicebus.windows.net'), ('s-bare', 'contoso.servicebus.windows.net'), ('s-listed', 'amqp://127.0.0.1:5672')$$,
    'the accepted subscriptions are stored with their namespaces; the refused ones are not');
-- One subscription per source: the same namespace (however written) and entity (any case) is refused.
SELECT throws_ok($$SELECT sbpg.create_subscription('s-dup', 'amqps://CONTOSO.servicebus.windows.net:5671/', 'Q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    '42710', 'subscription "s-bare" already consumes Q from amqps://CONTOSO.servicebus.windows.net:5671/',
    'a second subscription on the same namespace and entity is refused');
SELECT throws_ok($$SELECT sbpg.create_subscription('s-dup', 'amqp://127.0.0.1', 'q', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    '42710', NULL, 'the default port of amqp:// is the same source');
SELECT lives_ok($$SELECT sbpg.create_subscription('s-dlq', 'amqp://127.0.0.1:5672', 'q/$DeadLetterQueue', 'tap_sh(sbpg.message)', 'tap_alice_w', 'tap-mi', enabled => false)$$,
    'an entity''s dead-letter queue is another source');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-dlq', entity => 'Q')$$,
    '42710', 'subscription "s-listed" already consumes Q from amqp://127.0.0.1:5672', 'alter_subscription checks the same');
SELECT lives_ok($$SELECT sbpg.drop_subscription('s-dlq')$$, 'dropped again');
SELECT is(sbpg._source_key('amqps://CONTOSO.servicebus.windows.net.:5671/', 'Q'), sbpg._source_key('contoso.servicebus.windows.net', 'q'),
    'a source key ignores case, a trailing dot and the default TLS port');
SELECT isnt(sbpg._source_key('amqp://broker:5671', 'q'), sbpg._source_key('amqp://broker', 'q'),
    'but plain AMQP on 5671 is not plain AMQP on 5672');
INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid) VALUES ('s-amqps', 1, 'kept', 'applied', '1');
SELECT lives_ok($$SELECT sbpg.alter_subscription('s-amqps', namespace => 'amqps://contoso.servicebus.windows.net:5671/')$$,
    'another spelling of the same namespace');
SELECT is((SELECT count(*)::int FROM sbpg.inbox WHERE subscription = 's-amqps'), 1, 'is the same source: the inbox stays');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-bare', namespace => 'amqp://contoso.servicebus.windows.net')$$,
    '42501', 'identity "tap-mi" sends Entra ID tokens only to Service Bus namespaces over TLS, not to amqp://contoso.servicebus.windows.net', 'alter_subscription checks the same rule');
SELECT is((SELECT namespace FROM sbpg.subscriptions WHERE name = 's-bare'), 'contoso.servicebus.windows.net', 'and leaves the namespace as it was');

-- Code that messages drive never manages sbpg.
SELECT throws_ok($$SELECT sbpg.create_subscription('s-admin', 'amqp://127.0.0.1:5672', 'q-admin', 'tap_sh(sbpg.message)', 'sbpg_admin')$$,
    '42501', 'run_as role sbpg_admin has the privileges of sbpg_admin', 'run_as may not be sbpg_admin');
SELECT throws_ok($$SELECT sbpg.create_subscription('s-admin', 'amqp://127.0.0.1:5672', 'q-admin', 'tap_sh(sbpg.message)', 'tap_alice')$$,
    '42501', 'run_as role tap_alice has the privileges of sbpg_admin', 'nor a member of it');

-- The handler time limit: 100 ms to an hour, never past the lock renewal limit.
SELECT lives_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"handler_timeout_ms": 5000}')$$, 'handler_timeout_ms is an option');
SELECT is((SELECT options ->> 'handler_timeout_ms' FROM sbpg.subscriptions WHERE name = 's-listed'), '5000', 'and is stored');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"handler_timeout_ms": 50}')$$,
    '22023', 'subscription option "handler_timeout_ms" must be an integer from 100 to 3600000', 'not below 100 ms');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"handler_timeout_ms": 400000}')$$,
    '22023', 'handler_timeout_ms must not exceed max_lock_renewal_s', 'not past the lock renewal limit (300 s by default)');
SELECT lives_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"handler_timeout_ms": 400000, "max_lock_renewal_s": 600}')$$,
    'unless the locks are renewed for longer');
SELECT is((SELECT options FROM sbpg.subscriptions WHERE name = 's-listed'), '{"handler_timeout_ms": 400000, "max_lock_renewal_s": 600}'::jsonb,
    'both are stored together');
-- Session options (docs/scaling.md).
SELECT lives_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"sessions": true, "max_sessions": 16, "session_idle_ms": 2000}')$$,
    'sessions, max_sessions and session_idle_ms are options');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"sessions": "yes"}')$$,
    '22023', 'subscription option "sessions" must be true or false', 'sessions is a boolean');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"max_sessions": 0}')$$,
    '22023', 'subscription option "max_sessions" must be an integer from 1 to 256', 'at least one session');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"session_idle_ms": 99}')$$,
    '22023', 'subscription option "session_idle_ms" must be an integer from 100 to 3600000', 'an idle limit of at least 100 ms');

SELECT lives_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"session_failure": "stop"}')$$,
    'session_failure is an option');
SELECT throws_ok($$SELECT sbpg.alter_subscription('s-listed', options => '{"session_failure": "pause"}')$$,
    '22023', 'invalid value "pause" for subscription option "session_failure"', 'dead_letter or stop');
SELECT throws_ok($$SELECT sbpg.resume_session('s-listed', 's1')$$, '55000',
    'session ''s1'' of subscription "s-listed" is not stopped', 'resuming a session that is not stopped says so');
INSERT INTO sbpg.retries (subscription, sequence_number, message_id, attempts, next_attempt_at, last_error, session_id, stopped)
VALUES ('s-listed', 7, 'm7', 6, 'infinity', 'MaxRetriesExceeded: 6 attempts failed', 's7', true);
SELECT is((SELECT sbpg.resume_session('s-listed', 's7')), 1, 'resume_session releases the stopped message');
SELECT results_eq($$SELECT attempts, stopped, next_attempt_at <= now() FROM sbpg.retries WHERE subscription = 's-listed' AND session_id = 's7'$$,
    $$VALUES (0, false, true)$$, 'due now, with a fresh retry budget');
DELETE FROM sbpg.retries WHERE subscription = 's-listed';
SET ROLE tap_bob;
SELECT throws_ok($$SELECT sbpg.resume_session('s-listed', 's1')$$, '42501', 'permission denied to resume session',
    'only members of the subscription''s run_as resume its sessions');
RESET ROLE;

-- Session state is reachable only from a handler applying a message of that session.
SELECT throws_ok($$SELECT sbpg.session_state()$$, '55000',
    'sbpg.session_state() is for a handler applying a message of that session', 'no session state outside a handler');
SELECT throws_ok($$SELECT sbpg.set_session_state('\x01'::bytea, 's1')$$, '55000',
    'sbpg.set_session_state() is for a handler applying a message of that session', 'nor can it be written outside one');
SELECT ok(NOT has_function_privilege('tap_alice', 'sbpg._applying_session(text, boolean)', 'EXECUTE'),
    'the applying context is sbpg''s own');
SELECT ok(NOT has_table_privilege('tap_alice', 'sbpg.session_states', 'SELECT'), 'session states are not readable by admins');

-- Message types belong to whoever registers them first.
SET ROLE tap_alice;
SELECT lives_ok($$SELECT sbpg.register_schema('tap.orders', 1, '{"type": "object"}')$$, 'alice registers a type');
RESET ROLE;
SELECT is((SELECT owner::text FROM sbpg.message_types WHERE name = 'tap.orders'), 'tap_alice', 'she owns it');
SET ROLE tap_bob;
SELECT throws_ok($$SELECT sbpg.set_compatibility('tap.orders', 'none')$$, '42501',
    'permission denied to change the compatibility of message type tap.orders', 'bob may not change its compatibility');
SELECT throws_ok($$SELECT sbpg.register_schema('tap.orders', 2, '{"type": "object", "required": ["x"]}')$$, '42501',
    'permission denied to register a version of message type tap.orders', 'nor register a version of it');
SELECT lives_ok($$SELECT sbpg.register_schema('tap.invoices', 1, '{"type": "object"}')$$, 'bob registers a type of his own');
RESET ROLE;
SELECT sbpg.create_subscription('s-bob', 'amqp://127.0.0.1:5672', 'q2', 'tap_sh(sbpg.message)', 'tap_bob_w', enabled => false);
CREATE TABLE tap_bob_t (id int PRIMARY KEY);
GRANT INSERT ON tap_bob_t TO tap_bob_w;
SET ROLE tap_bob;
SELECT throws_ok($$SELECT sbpg.create_mapping('s-bob', 'tap.orders', 'tap_bob_t')$$, '42501',
    'permission denied to map message type tap.orders', 'nor map it');
RESET ROLE;
SET ROLE tap_alice_team;
SELECT lives_ok($$SELECT sbpg.set_compatibility('tap.orders', 'full')$$, 'a member of the owner role may');
RESET ROLE;
SELECT lives_ok($$SELECT sbpg.register_schema('tap.orders', 2, '{"type": "object"}')$$, 'and so may a superuser');
SELECT results_eq($$SELECT name, owner::text FROM sbpg.message_types WHERE name LIKE 'tap.%' ORDER BY name$$,
    $$VALUES ('tap.invoices', 'tap_bob'), ('tap.orders', 'tap_alice')$$, 'bob owns his type; the superuser''s version leaves tap.orders alice''s');
SELECT is((SELECT compatibility FROM sbpg.message_types WHERE name = 'tap.orders'), 'full', 'the change by the member stands');

-- Statistics by visibility: sbpg_admin members see their own subscriptions; sbpg_monitor sees all;
-- the raw slots are superusers'.
SET ROLE tap_bob;
SELECT throws_ok($$SELECT * FROM sbpg._worker_stats()$$, '42501', 'permission denied for function _worker_stats', 'sbpg_admin may not read the raw worker slots');
SELECT is((SELECT array_agg(subscription ORDER BY subscription) FROM sbpg.stats), ARRAY['s-bob'],
    'an admin sees the subscriptions whose run_as they belong to');
RESET ROLE;
SET ROLE tap_watch;
SELECT is((SELECT count(*)::int FROM sbpg.stats), (SELECT count(*)::int FROM sbpg.subscriptions), 'sbpg_monitor sees every subscription');
SELECT throws_ok($$SELECT * FROM sbpg._worker_stats()$$, '42501', 'permission denied for function _worker_stats', 'nor may sbpg_monitor');
RESET ROLE;
SELECT is((SELECT count(*)::int FROM sbpg.stats), (SELECT count(*)::int FROM sbpg.subscriptions), 'a superuser sees every subscription');

-- The per-minute history follows the same rule (rows written here as a worker would write them).
INSERT INTO sbpg.stats_minutes (subscription, minute, received, applied, dead_lettered, duplicates, retries, batches)
SELECT s.name, date_trunc('minute', now()) - interval '1 minute', 60, 60, 0, 0, 0, 1 FROM sbpg.subscriptions s;
SET ROLE tap_bob;
SELECT is((SELECT array_agg(subscription ORDER BY subscription) FROM sbpg.stats_history), ARRAY['s-bob'],
    'an admin sees the history of the subscriptions whose run_as they belong to');
SELECT throws_ok($$SELECT * FROM sbpg.stats_minutes$$, '42501', 'permission denied for table stats_minutes',
    'but not the table behind it');
RESET ROLE;
SET ROLE tap_watch;
SELECT is((SELECT count(DISTINCT subscription)::int FROM sbpg.stats_history), (SELECT count(*)::int FROM sbpg.subscriptions),
    'sbpg_monitor sees the history of every subscription');
SELECT is((SELECT messages_per_second FROM sbpg.stats_history WHERE subscription = 's-bob'), 1::float8,
    'messages_per_second is the minute''s settled messages over 60 s');
RESET ROLE;
SET ROLE tap_nobody;
SELECT throws_ok($$SELECT * FROM sbpg.stats_history$$, '42501', 'permission denied for view stats_history',
    'a role with no sbpg role reads no history');
RESET ROLE;
SELECT sbpg.create_subscription('s-gone', 'amqp://127.0.0.1:5672', 'q9', 'tap_sh(sbpg.message)', 'tap_bob_w', enabled => false);
INSERT INTO sbpg.stats_minutes (subscription, minute, received, applied, dead_lettered, duplicates, retries, batches)
VALUES ('s-gone', date_trunc('minute', now()), 1, 1, 0, 0, 0, 1);
SELECT sbpg.drop_subscription('s-gone');
SELECT is((SELECT count(*)::int FROM sbpg.stats_minutes WHERE subscription = 's-gone'), 0,
    'dropping a subscription drops its history');
SELECT throws_ok($$INSERT INTO sbpg.stats_minutes (subscription, minute, received, applied, dead_lettered, duplicates, retries, batches)
    VALUES ('s-never', now(), 0, 0, 0, 0, 0, 0)$$, '23503', NULL, 'history only for subscriptions that exist');

-- In a security-restricted operation (here CREATE INDEX, which runs the table owner's expression
-- as the owner while the session belongs to a superuser) the caller cannot be told: refused.
CREATE TABLE tap_alice_t (x int);
ALTER TABLE tap_alice_t OWNER TO tap_alice;
CREATE FUNCTION tap_pwn(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	PERFORM sbpg.alter_subscription('s-listed', run_as => 'postgres', options => '{"allow_superuser_run_as": true}');
	RETURN x;
END $$;
ALTER FUNCTION tap_pwn(int) OWNER TO tap_alice;
INSERT INTO tap_alice_t VALUES (1);
SELECT throws_ok($$CREATE INDEX ON tap_alice_t (tap_pwn(x))$$, '42501',
    'sbpg''s configuration functions cannot be called within a security-restricted operation',
    'a table owner''s index expression cannot drive the configuration functions as the superuser who builds the index');
SELECT is((SELECT run_as::text FROM sbpg.subscriptions WHERE name = 's-listed'), 'tap_alice_w', 'run_as is unchanged');
-- The same through a superuser's own SECURITY DEFINER maintenance helper: the index expression
-- is still the tenant's code.
CREATE FUNCTION tap_ops_reindex(t regclass) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
	EXECUTE format('REINDEX TABLE %s', t);
END $$;
CREATE FUNCTION tap_armed(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	IF current_setting('tap.attack', true) = 'on' THEN
		PERFORM sbpg.alter_subscription('s-listed', run_as => 'postgres', options => '{"allow_superuser_run_as": true}');
	END IF;
	RETURN x;
END $$;
ALTER FUNCTION tap_armed(int) OWNER TO tap_alice;
CREATE INDEX tap_alice_idx ON tap_alice_t (tap_armed(x));
SET tap.attack = on;
SELECT throws_ok($$SELECT tap_ops_reindex('tap_alice_t')$$, '42501',
    'sbpg''s configuration functions cannot be called within a security-restricted operation',
    'nor inside a superuser''s SECURITY DEFINER function that rebuilds the tenant''s index');
RESET tap.attack;
SELECT is((SELECT run_as::text FROM sbpg.subscriptions WHERE name = 's-listed'), 'tap_alice_w', 'run_as is still unchanged');

-- A superuser who calls an sbpg_admin member's SECURITY DEFINER function lends it nothing: the
-- configuration functions judge the function's owner, whose code runs.
CREATE FUNCTION tap_report() RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
	PERFORM sbpg.alter_subscription('s-listed', run_as => 'postgres', options => '{"allow_superuser_run_as": true}');
END $$;
ALTER FUNCTION tap_report() OWNER TO tap_alice;
SELECT throws_ok($$SELECT tap_report()$$, '42501', 'permission denied to alter subscription',
    'a superuser calling a tenant''s SECURITY DEFINER function cannot be made to change a subscription');
SELECT is((SELECT run_as::text FROM sbpg.subscriptions WHERE name = 's-listed'), 'tap_alice_w', 'run_as is still unchanged');

-- pg_dump keeps the configuration and the inbox.
SELECT set_eq($$SELECT unnest(extconfig)::regclass::text FROM pg_extension WHERE extname = 'sbpg'$$,
    ARRAY['sbpg.identities', 'sbpg.identity_secrets', 'sbpg.identity_usage', 'sbpg.subscriptions', 'sbpg.inbox',
          'sbpg.retries', 'sbpg.message_types', 'sbpg.schemas', 'sbpg.mappings', 'sbpg.stats_minutes',
          'sbpg.session_states'],
    'every configuration table, the inbox, the history and the session states are dumped with the database');

-- A worker's session is pinned to search_path = pg_catalog, pg_temp; the configuration functions
-- carry that path themselves.
SELECT is((SELECT count(*)::int FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'sbpg' AND p.prosecdef
             AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)), 0,
    'every SECURITY DEFINER function of sbpg fixes search_path = pg_catalog, pg_temp');

SELECT * FROM finish();
ROLLBACK;
