-- pgTAP: who may create which identity, where secrets go, and who may let a superuser be run_as.
-- Runs in the database test/pg/run prepares (extensions pgtap and sbpg); everything is rolled back.
BEGIN;
SELECT plan(33);

CREATE ROLE tap_nobody NOLOGIN;
CREATE ROLE tap_admin NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_app NOLOGIN;
GRANT tap_app TO tap_admin;
CREATE FUNCTION tap_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION tap_handler(sbpg.message) TO tap_app, postgres;

-- Someone without an sbpg role can do nothing.
SET ROLE tap_nobody;
SELECT throws_ok($$SELECT sbpg.create_identity('n1', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "s"}')$$,
    '42501', 'permission denied for function create_identity', 'a non-member cannot create a client_secret identity');
SELECT throws_ok($$SELECT sbpg.create_identity('n2', 'managed_identity')$$, '42501', 'permission denied for function create_identity',
    'a non-member cannot create a managed_identity');
SELECT throws_ok($$SELECT * FROM sbpg.identities$$, '42501', 'permission denied for table identities', 'a non-member cannot read sbpg.identities');
SELECT throws_ok($$SELECT * FROM sbpg.identity_secrets$$, '42501', 'permission denied for table identity_secrets', 'a non-member cannot read sbpg.identity_secrets');
SELECT throws_ok($$SELECT sbpg.create_subscription('n3', 'amqp://127.0.0.1', 'q', 'tap_handler(sbpg.message)', 'tap_app')$$,
    '42501', 'permission denied for function create_subscription', 'a non-member cannot create a subscription');
RESET ROLE;

-- An sbpg_admin member: their own literal secrets, not the server's identity or files.
SET ROLE tap_admin;
SELECT lives_ok($$SELECT sbpg.create_identity('a-sp', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "tap-admin-secret"}')$$,
    'an admin creates a client_secret identity with a literal secret');
SELECT throws_ok($$SELECT sbpg.create_identity('a-mi', 'managed_identity')$$, '42501',
    'only superusers may create identities of kind managed_identity', 'an admin cannot use the server''s managed identity');
SELECT throws_ok($$SELECT sbpg.create_identity('a-wi', 'workload_identity')$$, '42501', 'only superusers may create identities of kind workload_identity',
    'an admin cannot use the server''s workload identity');
SELECT throws_ok($$SELECT sbpg.create_identity('a-df', 'default')$$, '42501', 'only superusers may create identities of kind default', 'an admin cannot use the default chain');
SELECT throws_ok($$SELECT sbpg.create_identity('a-env', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_env": "HOME"}')$$,
    '42501', 'only superusers may give option "secret_env" of identity kind client_secret', 'an admin cannot make the server read its environment');
SELECT throws_ok($$SELECT sbpg.create_identity('a-file', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_file": "/etc/shadow"}')$$,
    '42501', 'only superusers may give option "secret_file" of identity kind client_secret', 'an admin cannot make the server read its files');
SELECT throws_ok($$SELECT sbpg.create_identity('a-auth', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "x", "authority_host": "https://attacker.example"}')$$,
    '42501', 'only superusers may give option "authority_host" of identity kind client_secret', 'an admin cannot send a secret to another authority');
SELECT throws_ok($$SELECT * FROM sbpg.identity_secrets$$, '42501', 'permission denied for table identity_secrets', 'an admin cannot read sbpg.identity_secrets');
SELECT is((SELECT options FROM sbpg.identities WHERE name = 'a-sp'), '{"client_id": "c", "tenant_id": "t"}'::jsonb,
    'the literal secret is not among the options an admin can read');
RESET ROLE;

-- A superuser creates the server's identities; admins then use them.
SELECT lives_ok($$SELECT sbpg.create_identity('s-mi', 'managed_identity', '{"client_id": "6e0b3a6c-3f2e-4a43-9d36-2c1a4f5e8b71"}')$$,
    'a superuser creates a managed_identity');
SELECT lives_ok($$SELECT sbpg.create_identity('s-wi', 'workload_identity')$$, 'a superuser creates a workload_identity');
SELECT lives_ok($$SELECT sbpg.create_identity('s-df', 'default')$$, 'a superuser creates a default identity');
SELECT lives_ok($$SELECT sbpg.create_identity('s-sp', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_file": "/etc/sbpg/sp.secret"}')$$,
    'a superuser creates a client_secret identity by file');
SELECT results_eq($$SELECT name, kind, options FROM sbpg.identities WHERE name LIKE 's-%' ORDER BY name$$,
    $$VALUES ('s-df', 'default', '{}'::jsonb), ('s-mi', 'managed_identity', '{"client_id": "6e0b3a6c-3f2e-4a43-9d36-2c1a4f5e8b71"}'::jsonb),
             ('s-sp', 'client_secret', '{"client_id": "c", "tenant_id": "t", "secret_file": "/etc/sbpg/sp.secret"}'::jsonb),
             ('s-wi', 'workload_identity', '{}'::jsonb)$$,
    'the superuser''s identities are stored with their kinds and options');
SELECT is((SELECT secret FROM sbpg.identity_secrets WHERE identity = 'a-sp'), 'tap-admin-secret',
    'the literal secret is kept in sbpg.identity_secrets');
SELECT is((SELECT count(*)::int FROM sbpg.identity_secrets WHERE identity = 's-sp'), 0, 'a secret by file stores only the path');
SET ROLE tap_admin;
SELECT throws_ok($$SELECT sbpg.create_subscription('a-sub', 'contoso.servicebus.windows.net', 'orders', 'tap_handler(sbpg.message)', 'tap_app', 's-mi')$$,
    '42501', 'permission denied to use identity "s-mi"', 'an admin may not use a superuser''s identity without a grant');
SELECT throws_ok($$SELECT sbpg.grant_identity('s-mi', 'tap_admin')$$, '42501', 'permission denied to grant identity "s-mi"', 'an admin cannot grant themselves an identity');
SELECT throws_ok($$SELECT sbpg.drop_identity('s-mi')$$, '42501', 'permission denied to drop identity "s-mi"', 'an admin cannot drop a superuser''s identity');
RESET ROLE;
SELECT lives_ok($$SELECT sbpg.grant_identity('s-mi', 'tap_app')$$, 'a superuser grants the identity to a team role');
SELECT results_eq($$SELECT identity, grantee::text FROM sbpg.identity_usage$$, $$VALUES ('s-mi', 'tap_app')$$,
    'the grant is recorded for that role only');
SET ROLE tap_admin;
SELECT lives_ok($$SELECT sbpg.create_subscription('a-sub', 'contoso.servicebus.windows.net', 'orders', 'tap_handler(sbpg.message)', 'tap_app', 's-mi')$$,
    'a member of the grantee subscribes with the managed identity a superuser created');
SELECT results_eq($$SELECT identity, run_as::text FROM sbpg.subscriptions WHERE name = 'a-sub'$$, $$VALUES ('s-mi', 'tap_app')$$,
    'the subscription uses that identity and runs as the grantee');
SELECT throws_ok($$SELECT sbpg.alter_subscription('a-sub', namespace => 'amqps://attacker.example:5671')$$, '42501', 'identity "s-mi" sends Entra ID tokens only to Service Bus namespaces over TLS, not to amqps://attacker.example:5671',
    'the server''s token is never sent to a broker that is not a Service Bus namespace');
SELECT throws_ok($$SELECT sbpg.alter_subscription('a-sub', options => '{"allow_superuser_run_as": true}')$$, '42501',
    'only superusers may set allow_superuser_run_as', 'an admin cannot allow a superuser run_as');
RESET ROLE;
SELECT throws_ok($$SELECT sbpg.alter_subscription('a-sub', run_as => 'postgres')$$, '42501', 'run_as role postgres is a superuser',
    'a superuser run_as is refused by default');
SELECT lives_ok($$SELECT sbpg.alter_subscription('a-sub', run_as => 'postgres', options => '{"allow_superuser_run_as": true}')$$,
    'a superuser may allow a superuser run_as explicitly');
SELECT results_eq($$SELECT run_as::text, (options ->> 'allow_superuser_run_as')::boolean FROM sbpg.subscriptions WHERE name = 'a-sub'$$,
    $$VALUES ('postgres', true)$$, 'the subscription then runs as the superuser, with the permission recorded');

SELECT * FROM finish();
ROLLBACK;
