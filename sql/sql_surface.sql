-- The SQL surface of sbpg and its errors (pg_regress; runs in a database no launcher serves, so
-- no worker starts).
\set SHOW_CONTEXT never
CREATE EXTENSION sbpg;
SELECT extname, extversion, nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE extname = 'sbpg';

-- Identities: validation.
SELECT sbpg.create_identity('bad name!', 'sas', '{}');
SELECT sbpg.create_identity('x', 'oauth');
SELECT sbpg.create_identity('x', 'sas', '{}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k"}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k", "key": "a", "key_env": "B"}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k", "token": "a"}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k", "key": 42}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k", "key_file": "relative/path"}');
SELECT sbpg.create_identity('x', 'sas', '{"key_name": "k", "key_env": "not-a-name"}');
SELECT sbpg.create_identity('x', 'anonymous', '{"user": "u"}');
SELECT sbpg.create_identity('x', 'sas', '[1]');
-- Entra ID kinds: validation.
SELECT sbpg.create_identity('x', 'managed_identity', '{"client_id": "a", "object_id": "b"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"source": "cloud-shell"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"source": "arc", "client_id": "a"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"endpoint": "ftp://example/token"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"arc_key_dir": "tokens"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"tenant_id": "t"}');
SELECT sbpg.create_identity('x', 'managed_identity', '{"client_id": "a b"}');
SELECT sbpg.create_identity('x', 'workload_identity', '{"token_file": "token"}');
SELECT sbpg.create_identity('x', 'workload_identity', '{"authority_host": "http://login.example"}');
SELECT sbpg.create_identity('x', 'client_secret', '{"client_id": "c", "secret": "s"}');
SELECT sbpg.create_identity('x', 'client_secret', '{"tenant_id": "t", "client_id": "c"}');
SELECT sbpg.create_identity('x', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret": "s", "secret_env": "S"}');
SELECT sbpg.create_identity('x', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_file": "s.txt"}');
SELECT sbpg.create_identity('x', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_env": "1X"}');
SELECT sbpg.create_identity('x', 'default', '{"tenant_id": "t"}');

-- Identities that work; the literal key is kept apart from the options.
SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
SELECT sbpg.create_identity('from-file', 'sas', '{"key_name": "listen", "key_file": "/etc/sbpg/listen.key"}');
SELECT sbpg.create_identity('from-env', 'sas', '{"key_name": "listen", "key_env": "SBPG_LISTEN_KEY"}');
SELECT sbpg.create_identity('plain', 'anonymous');
SELECT sbpg.create_identity('vm', 'managed_identity');
SELECT sbpg.create_identity('vm-user', 'managed_identity', '{"client_id": "6e0b3a6c-3f2e-4a43-9d36-2c1a4f5e8b71"}');
SELECT sbpg.create_identity('app-service', 'managed_identity', '{"source": "app_service"}');
SELECT sbpg.create_identity('aks', 'workload_identity');
SELECT sbpg.create_identity('sp', 'client_secret', '{"tenant_id": "contoso.onmicrosoft.com", "client_id": "c", "secret": "client-secret-value"}');
SELECT sbpg.create_identity('sp-file', 'client_secret', '{"tenant_id": "t", "client_id": "c", "secret_file": "/etc/sbpg/sp.secret"}');
SELECT sbpg.create_identity('chain', 'default');
SELECT sbpg.create_identity('emu', 'anonymous');
SELECT name, kind, options FROM sbpg.identities ORDER BY name;
SELECT identity, secret IN ('SAS_KEY_VALUE', 'client-secret-value') AS stored FROM sbpg.identity_secrets ORDER BY 1;

-- Handlers and roles for the subscriptions below.
CREATE ROLE sbpg_reg_app NOLOGIN;
CREATE ROLE sbpg_reg_other NOLOGIN;
CREATE ROLE sbpg_reg_boss NOLOGIN SUPERUSER;
CREATE TABLE reg_orders (id int PRIMARY KEY);
CREATE FUNCTION reg_good(m sbpg.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION reg_args(x integer) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION reg_ret(m sbpg.message) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION reg_definer(m sbpg.message) RETURNS void LANGUAGE sql SECURITY DEFINER AS $$ SELECT $$;
REVOKE EXECUTE ON FUNCTION reg_good(sbpg.message) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION reg_good(sbpg.message) TO sbpg_reg_app;

-- Subscriptions: validation of every argument.
SELECT sbpg.create_subscription('bad name!', 'amqp://127.0.0.1:5672', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'http://127.0.0.1:5672', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'contoso.example.com', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://host:70000', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'a//b', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders/', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 't/subscriptions/a/b', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_args(integer)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_ret(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_definer(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_boss', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'nobody_at_all', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_other', 'emu');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'nope');
SELECT sbpg.create_subscription('s', 'contoso.servicebus.windows.net', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', batch_size => 0);
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', batch_size => 1001);
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', batch_size => 50, prefetch => 10);
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', prefetch => 5001);
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', notify_channel => '');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', options => '{"speed": "fast"}');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', options => '{"max_retries": -2}');
SELECT sbpg.create_subscription('s', 'amqp://127.0.0.1', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', options => '{"retry_base_ms": 60000, "retry_cap_ms": 1000}');

-- Subscriptions that work: queues, topic subscriptions, Service Bus namespaces, IPv6, defaults.
SELECT sbpg.create_subscription('orders', 'amqp://127.0.0.1:5672', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT sbpg.create_subscription('audit', 'amqps://broker.example:5671/', 'events/Subscriptions/audit', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu', batch_size => 10, enabled => false);
SELECT sbpg.create_subscription('cloud', 'contoso.servicebus.windows.net', 'orders/subscriptions/eu', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'from-env', notify_channel => NULL);
SELECT sbpg.create_subscription('v6', 'amqp://[::1]:5672', 'q.with-dots_and~tilde', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'plain');
SELECT sbpg.create_subscription('orders', 'amqp://127.0.0.1:5672', 'orders', 'reg_good(sbpg.message)', 'sbpg_reg_app', 'emu');
SELECT name, namespace, entity, handler, run_as, identity, batch_size, prefetch, notify_channel, enabled
FROM sbpg.subscriptions ORDER BY name;

-- Changes.
SELECT sbpg.alter_subscription('orders', batch_size => 500);
SELECT sbpg.alter_subscription('orders', batch_size => 10);
SELECT sbpg.alter_subscription('orders', notify_channel => 'orders_done', identity => '');
SELECT sbpg.alter_subscription('orders', run_as => 'sbpg_reg_boss');
SELECT sbpg.alter_subscription('nope', batch_size => 10);
INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid) VALUES ('orders', 1, 'm1', 'applied', '1');
SELECT sbpg.alter_subscription('orders', entity => 'orders2');
SELECT count(*) AS inbox_rows FROM sbpg.inbox;
SELECT sbpg.disable_subscription('orders');
SELECT sbpg.enable_subscription('audit');
SELECT name, entity, identity, batch_size, prefetch, notify_channel, enabled FROM sbpg.subscriptions ORDER BY name;
SELECT subscription, enabled, state, received FROM sbpg.stats ORDER BY subscription;

-- Drops.
SELECT sbpg.drop_identity('emu');
SELECT sbpg.drop_subscription('audit');
SELECT sbpg.drop_subscription('audit');
SELECT sbpg.drop_identity('nope');
SELECT sbpg.drop_subscription('orders');
SELECT sbpg.drop_identity('emu');
SELECT name FROM sbpg.identities ORDER BY name;
SELECT count(*) AS secrets FROM sbpg.identity_secrets;
SELECT name FROM sbpg.subscriptions ORDER BY name;

-- sbpg.ca_file is checked where it is set.
ALTER SYSTEM SET sbpg.ca_file = 'relative/ca.pem';
ALTER SYSTEM SET sbpg.ca_file = '/nonexistent/ca.pem';
ALTER SYSTEM SET sbpg.ca_file = '/etc/passwd';

-- The schema registry: a version checked against the one before, schemas refused with a reason.
SELECT sbpg.register_schema('reg.orders', 1, '{"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"], "additionalProperties": false}');
SELECT sbpg.register_schema('reg.orders', 2, '{"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string", "maxLength": 10}}, "required": ["id"], "additionalProperties": false}');
SELECT sbpg.register_schema('reg.orders', 3, '{"type": "object", "properties": {"id": {"type": "string"}, "note": {"type": "string", "maxLength": 5}}, "required": ["id", "note"], "additionalProperties": false}');
SELECT sbpg.register_schema('reg.orders', 3, '{"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}}}');
SELECT sbpg.register_schema('reg.orders', 2, '{"type": "object"}');
SELECT message_type, version, compatibility, latest FROM sbpg.schema_catalog WHERE message_type = 'reg.orders' ORDER BY version;

-- Publishers and sbpg.send (docs/outbox.md): every refusal with its errcode, detail and hint.
SELECT sbpg.create_identity('pub-mi', 'managed_identity');
SELECT sbpg.create_publisher('bad name!', 'amqp://127.0.0.1:5672');
SELECT sbpg.create_publisher('p', 'not a namespace');
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', 'nobody');
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', 'pub-mi');
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', options => '{"batch_size": 0}');
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', options => '{"colour": "red"}');
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', notify_channel => '', enabled => false);
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672', enabled => false);
SELECT sbpg.create_publisher('p', 'amqp://127.0.0.1:5672');
SELECT sbpg.send('nope', 'q', 'x');
SELECT sbpg.send('p', 'q/$DeadLetterQueue', 'x');
SELECT sbpg.send('p', 'topic/Subscriptions/s', 'x');
SELECT sbpg.send('p', 'q', 'x', properties => '[1]');
SELECT sbpg.send('p', 'q', 'x', properties => '{"nested": {"a": 1}}');
SELECT sbpg.send('p', 'q', 'x', message_id => '');
SELECT sbpg.send('p', 'q', 'x', time_to_live => interval '-1 second');
SELECT sbpg.send('p', 'q', NULL::bytea);
SELECT sbpg.send('p', 'q', 'x', scheduled_at => 'infinity');
SELECT sbpg.send('p', 'q', 'x', content_type => '');
SELECT sbpg.send('p', 'q', repeat('x', 1048577));
SELECT sbpg.send('p', 'q', '{"a": 1}'::jsonb) > 0 AS queued;
SELECT entity, convert_from(body, 'UTF8') AS body, content_type, status FROM sbpg.outbox;
SET ROLE sbpg_reg_app;
SELECT sbpg.send('p', 'q', 'x');
SELECT count(*) FROM sbpg.publisher_stats;
RESET ROLE;
SELECT sbpg.drop_publisher('p');
SELECT sbpg.drop_publisher('p', discard_queued => true);
SELECT sbpg.drop_identity('pub-mi');
-- Dead-letter replay: the refusals that need no broker.
SELECT sbpg.create_subscription('dlq', 'amqp://127.0.0.1:5672', 'events/Subscriptions/dlq', 'reg_good(sbpg.message)', 'sbpg_reg_app', enabled => false);
SELECT * FROM sbpg.dead_letters('nope');
SELECT * FROM sbpg.dead_letters('dlq', max_count => 0);
SELECT * FROM sbpg.replay_dead_letters('dlq');
SELECT * FROM sbpg.replay_dead_letters('dlq', ARRAY[1]::bigint[], 'reason');
SELECT * FROM sbpg.replay_dead_letters('dlq', reason => 'MaxRetriesExceeded');
SET ROLE sbpg_reg_app;
SELECT * FROM sbpg.dead_letters('dlq');
RESET ROLE;
SELECT sbpg.drop_subscription('dlq');
DROP EXTENSION sbpg CASCADE;
DROP TABLE reg_orders;
DROP FUNCTION reg_args(integer);
DROP ROLE sbpg_reg_app, sbpg_reg_other, sbpg_reg_boss;
