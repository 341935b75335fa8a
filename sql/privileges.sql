-- Who may do what: superusers and sbpg_admin members configure (only for run_as roles they belong
-- to), sbpg_monitor reads stats and the inbox, nobody else sees identities or keys.
\set SHOW_CONTEXT never
CREATE EXTENSION sbpg;
CREATE ROLE sbpg_reg_app NOLOGIN;
CREATE ROLE sbpg_reg_team NOLOGIN;
CREATE ROLE sbpg_reg_admin NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE sbpg_reg_member NOLOGIN IN ROLE sbpg_admin, sbpg_reg_team;
CREATE ROLE sbpg_reg_watcher NOLOGIN IN ROLE sbpg_monitor;
CREATE ROLE sbpg_reg_nobody NOLOGIN;
GRANT sbpg_reg_app TO sbpg_reg_member;
CREATE FUNCTION reg_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
GRANT EXECUTE ON FUNCTION reg_handler(sbpg.message) TO sbpg_reg_app, sbpg_reg_team;
SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
SELECT sbpg.create_subscription('orders', 'amqp://127.0.0.1:5672', 'orders', 'reg_handler(sbpg.message)', 'sbpg_reg_app', 'emu');

-- Someone with no sbpg role.
SET ROLE sbpg_reg_nobody;
SELECT sbpg.create_identity('mine', 'anonymous');
SELECT sbpg.create_subscription('x', 'amqp://127.0.0.1', 'q', 'reg_handler(sbpg.message)', 'sbpg_reg_app');
SELECT sbpg.disable_subscription('orders');
SELECT * FROM sbpg.subscriptions;
SELECT * FROM sbpg.identities;
SELECT * FROM sbpg.identity_secrets;
SELECT * FROM sbpg.stats;
SELECT * FROM sbpg.inbox;
RESET ROLE;

-- An sbpg_admin member who does not belong to run_as.
SET ROLE sbpg_reg_admin;
SELECT sbpg.create_subscription('x', 'amqp://127.0.0.1', 'q', 'reg_handler(sbpg.message)', 'sbpg_reg_app');
SELECT sbpg.disable_subscription('orders');
SELECT sbpg.create_identity('admins-own', 'sas', '{"key_name": "k", "key_file": "/etc/passwd"}');
SELECT sbpg.create_identity('admins-own', 'sas', '{"key_name": "k", "key": "admin-literal-key"}');
-- The server's own Azure identity, and options that read server files or reach other hosts, are
-- a superuser's to configure; a client secret of the admin's own is not.
SELECT sbpg.create_identity('admins-mi', 'managed_identity');
SELECT sbpg.create_identity('admins-aks', 'workload_identity');
SELECT sbpg.create_identity('admins-chain', 'default');
SELECT sbpg.create_identity('admins-sp', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_env": "HOME"}');
SELECT sbpg.create_identity('admins-sp', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "s3", "authority_host": "https://evil.example"}');
SELECT sbpg.create_identity('admins-sp', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "admin-client-secret"}');
SELECT name, kind, options FROM sbpg.identities ORDER BY name;
SELECT * FROM sbpg.identity_secrets;
SELECT * FROM sbpg.inbox;
RESET ROLE;

-- An sbpg_admin member who belongs to run_as (and to another team role). Using an identity takes
-- a grant from its creator or a superuser; the admin may neither grant nor drop it.
SET ROLE sbpg_reg_member;
SELECT sbpg.create_subscription('team', 'amqp://127.0.0.1', 'team-q', 'reg_handler(sbpg.message)', 'sbpg_reg_team', 'emu');
SELECT sbpg.grant_identity('emu', 'sbpg_reg_member');
SELECT sbpg.drop_identity('emu');
RESET ROLE;
SELECT sbpg.grant_identity('emu', 'sbpg_reg_team');
SET ROLE sbpg_reg_member;
SELECT sbpg.create_subscription('team', 'amqp://127.0.0.1', 'team-q', 'reg_handler(sbpg.message)', 'sbpg_reg_team', 'emu');
SELECT identity, grantee, granted_by FROM sbpg.identity_usage;
SELECT sbpg.alter_subscription('orders', batch_size => 20);
SELECT sbpg.alter_subscription('orders', run_as => 'sbpg_reg_admin');
SELECT sbpg.disable_subscription('orders');
SELECT name, run_as, batch_size, enabled, created_by FROM sbpg.subscriptions ORDER BY name;
SELECT sbpg.drop_subscription('team');
RESET ROLE;

-- A monitor reads stats and the inbox, and nothing else.
SET ROLE sbpg_reg_watcher;
SELECT subscription, enabled, state FROM sbpg.stats ORDER BY subscription;
SELECT count(*) FROM sbpg.inbox;
SELECT name FROM sbpg.subscriptions ORDER BY name;
SELECT * FROM sbpg.identities;
SELECT sbpg.enable_subscription('orders');
RESET ROLE;

-- A superuser may not make a superuser the run_as role either, unless they say so explicitly;
-- an sbpg_admin member cannot say so.
SELECT sbpg.alter_subscription('orders', run_as => 'postgres');
SELECT sbpg.alter_subscription('orders', run_as => 'postgres', options => '{"allow_superuser_run_as": "yes"}');
SELECT sbpg.alter_subscription('orders', run_as => 'postgres', options => '{"allow_superuser_run_as": true}');
SELECT run_as, options FROM sbpg.subscriptions WHERE name = 'orders';
SELECT sbpg.alter_subscription('orders', run_as => 'sbpg_reg_app', options => '{}');
SET ROLE sbpg_reg_member;
SELECT sbpg.alter_subscription('orders', options => '{"allow_superuser_run_as": true}');
RESET ROLE;
-- A flag a superuser set does not stop an admin from changing the rest.
SELECT sbpg.alter_subscription('orders', options => '{"allow_superuser_run_as": true}');
SET ROLE sbpg_reg_member;
SELECT sbpg.disable_subscription('orders');
SELECT sbpg.alter_subscription('orders', options => '{}');
RESET ROLE;

-- Entra ID tokens go only to Service Bus namespaces, or to brokers the identity names.
SELECT sbpg.create_identity('mi', 'managed_identity');
SELECT sbpg.create_identity('mi-dev', 'managed_identity', '{"allowed_namespaces": ["amqps://localhost:5671"]}');
SELECT sbpg.create_identity('mi-bad', 'managed_identity', '{"allowed_namespaces": "amqps://localhost:5671"}');
SELECT sbpg.create_identity('mi-bad', 'managed_identity', '{"allowed_namespaces": ["https://localhost"]}');
SELECT sbpg.alter_subscription('orders', identity => 'mi');
SELECT sbpg.alter_subscription('orders', namespace => 'amqps://evil.example:5671', identity => 'mi');
SELECT sbpg.alter_subscription('orders', namespace => 'contoso.servicebus.windows.net', identity => 'mi');
SELECT sbpg.alter_subscription('orders', namespace => 'amqps://localhost:5671/', identity => 'mi-dev');
SELECT sbpg.alter_subscription('orders', namespace => 'amqp://localhost:5672', identity => 'mi-dev');
SELECT name, namespace, identity FROM sbpg.subscriptions WHERE name = 'orders';

DROP EXTENSION sbpg CASCADE;
DROP ROLE sbpg_reg_app, sbpg_reg_team, sbpg_reg_admin, sbpg_reg_member, sbpg_reg_watcher, sbpg_reg_nobody;
