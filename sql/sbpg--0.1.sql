-- sbpg 0.1: catalog, SQL surface and privileges.
\echo Use "CREATE EXTENSION sbpg" to load this file. \quit

-- Roles are cluster-wide and outlive the extension; create them only when missing.
DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sbpg_admin') THEN
		CREATE ROLE sbpg_admin NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sbpg_monitor') THEN
		CREATE ROLE sbpg_monitor NOLOGIN;
	END IF;
END
$$;
COMMENT ON ROLE sbpg_admin IS 'sbpg: may manage identities and the subscriptions whose run_as role it belongs to';
COMMENT ON ROLE sbpg_monitor IS 'sbpg: may read sbpg.stats and sbpg.inbox';

-- What a handler receives.
CREATE TYPE sbpg.message AS (
	message_id text,
	correlation_id text,
	session_id text,
	subject text,
	content_type text,
	reply_to text,
	body jsonb,            -- the body parsed as JSON, when it is JSON
	raw_body bytea,        -- the body as sent
	properties jsonb,      -- application properties
	sequence_number bigint,
	enqueued_at timestamptz,
	delivery_count integer,
	message_type text,     -- versioned schemas (docs/schemas.md): the type the message carries
	schema_version text,   -- the version handed to the handler (after upcasts)
	subscription text,     -- the sbpg subscription that received it
	received_schema_version text -- the version the message carried
);
COMMENT ON TYPE sbpg.message IS 'A Service Bus message as an sbpg handler receives it';

-- How a worker obtains AMQP credentials. Secrets live in sbpg.identity_secrets, readable only by
-- superusers (the extension owner).
CREATE TABLE sbpg.identities (
	name text PRIMARY KEY,
	kind text NOT NULL CHECK (kind IN ('managed_identity', 'workload_identity', 'client_secret', 'default', 'sas', 'anonymous')),
	options jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
	created_at timestamptz NOT NULL DEFAULT now(),
	created_by name NOT NULL
);
COMMENT ON TABLE sbpg.identities IS 'Credentials a worker uses; secrets are kept apart in sbpg.identity_secrets';

CREATE TABLE sbpg.identity_secrets (
	identity text PRIMARY KEY REFERENCES sbpg.identities (name) ON DELETE CASCADE,
	secret text NOT NULL
);
COMMENT ON TABLE sbpg.identity_secrets IS 'Shared access keys and client secrets given literally; readable by superusers only';

-- Who besides superusers and its creator may use an identity in subscriptions (sbpg.grant_identity).
CREATE TABLE sbpg.identity_usage (
	identity text NOT NULL REFERENCES sbpg.identities (name) ON DELETE CASCADE,
	grantee regrole NOT NULL,
	granted_by name NOT NULL,
	granted_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (identity, grantee)
);
COMMENT ON TABLE sbpg.identity_usage IS 'Roles whose members may use an identity in the subscriptions they manage';

CREATE TABLE sbpg.subscriptions (
	name text PRIMARY KEY,
	namespace text NOT NULL,
	entity text NOT NULL,
	handler regprocedure NOT NULL,
	run_as regrole NOT NULL,
	identity text REFERENCES sbpg.identities (name),
	batch_size integer NOT NULL,
	prefetch integer NOT NULL,
	notify_channel text,
	enabled boolean NOT NULL DEFAULT true,
	options jsonb NOT NULL DEFAULT '{}',
	created_at timestamptz NOT NULL DEFAULT now(),
	updated_at timestamptz NOT NULL DEFAULT now(),
	created_by name NOT NULL
);
COMMENT ON TABLE sbpg.subscriptions IS 'One row per consumed entity; managed with sbpg.create_subscription and friends';

-- One row per message with a final outcome, written in the transaction that applied it.
CREATE TABLE sbpg.inbox (
	subscription text NOT NULL,
	sequence_number bigint,
	message_id text,
	correlation_id text,
	status text NOT NULL CHECK (status IN ('applied', 'dead_lettered')),
	reason text,
	delivery_count integer,
	attempts integer NOT NULL DEFAULT 1, -- how many times sbpg ran the handler (1 + retries)
	xid xid8 NOT NULL,
	recorded_at timestamptz NOT NULL DEFAULT now(),
	settled_at timestamptz
);
CREATE UNIQUE INDEX inbox_by_sequence ON sbpg.inbox (subscription, sequence_number) WHERE sequence_number IS NOT NULL;
CREATE UNIQUE INDEX inbox_by_message_id ON sbpg.inbox (subscription, message_id) WHERE sequence_number IS NULL;
CREATE INDEX inbox_by_time ON sbpg.inbox (recorded_at);
COMMENT ON TABLE sbpg.inbox IS 'Outcome of every message (applied or dead_lettered); settled_at is set once the broker confirmed the settlement';

-- Messages whose last attempt failed with a transient error and that wait for their next one.
-- Written in the transaction of the failed attempt; removed in the one that records the outcome.
CREATE TABLE sbpg.retries (
	subscription text NOT NULL,
	sequence_number bigint,
	message_id text,
	attempts integer NOT NULL,           -- failed attempts so far
	first_failed_at timestamptz NOT NULL DEFAULT now(),
	last_failed_at timestamptz NOT NULL DEFAULT now(),
	next_attempt_at timestamptz NOT NULL,
	last_error text NOT NULL,
	deferred boolean NOT NULL DEFAULT false -- set aside on the broker (Service Bus deferral) until next_attempt_at
);
CREATE UNIQUE INDEX retries_by_sequence ON sbpg.retries (subscription, sequence_number) WHERE sequence_number IS NOT NULL;
CREATE UNIQUE INDEX retries_by_message_id ON sbpg.retries (subscription, message_id) WHERE sequence_number IS NULL;
CREATE INDEX retries_due ON sbpg.retries (subscription, next_attempt_at) WHERE deferred;
COMMENT ON TABLE sbpg.retries IS 'Messages waiting for another attempt after a transient error: how often tried, why, and when next';

-- Whose code called sbpg's SECURITY DEFINER functions: the owner of another SECURITY DEFINER
-- function that called them, run_as in an sbpg worker's tenant code, the role after SET ROLE
-- otherwise; refused where that cannot be told (src/pg/module.cpp, docs/security.md).
CREATE FUNCTION sbpg._caller() RETURNS regrole
	AS 'MODULE_PATHNAME', 'sbpg_caller' LANGUAGE C STABLE STRICT;

-- Wakes the launcher when the transaction commits (subscription or identity changes).
CREATE FUNCTION sbpg._config_changed() RETURNS trigger
	AS 'MODULE_PATHNAME', 'sbpg_config_changed' LANGUAGE C;

CREATE FUNCTION sbpg._worker_stats(
	OUT subscription text, OUT state text, OUT pid integer, OUT connected_since timestamptz,
	OUT received bigint, OUT applied bigint, OUT dead_lettered bigint, OUT duplicates bigint,
	OUT abandoned bigint, OUT batches bigint, OUT settle_failures bigint, OUT reconnects bigint,
	OUT last_error text, OUT last_error_at timestamptz,
	OUT apply_ms_p50 double precision, OUT apply_ms_p99 double precision,
	OUT lag_ms_p50 double precision, OUT lag_ms_p99 double precision,
	OUT messages_per_second double precision, OUT token_expires_at timestamptz,
	OUT last_batch_at timestamptz, OUT tokens_put bigint, OUT token_subject text, OUT token_error text,
	OUT retries bigint, OUT retried_messages bigint, OUT max_retries_exceeded bigint, OUT waiting_retry integer,
	OUT deferred bigint, OUT lock_renewals bigint, OUT locks_lost bigint)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbpg_worker_stats' LANGUAGE C STRICT;

CREATE TRIGGER subscriptions_changed AFTER INSERT OR UPDATE OR DELETE ON sbpg.subscriptions
	FOR EACH STATEMENT EXECUTE FUNCTION sbpg._config_changed();
CREATE TRIGGER identities_changed AFTER INSERT OR UPDATE OR DELETE ON sbpg.identities
	FOR EACH STATEMENT EXECUTE FUNCTION sbpg._config_changed();
CREATE TRIGGER identity_secrets_changed AFTER INSERT OR UPDATE OR DELETE ON sbpg.identity_secrets
	FOR EACH STATEMENT EXECUTE FUNCTION sbpg._config_changed();

-- Raises insufficient_privilege unless the caller is a superuser or an sbpg_admin member (and,
-- when run_as is given, a member of run_as).
CREATE FUNCTION sbpg._check_admin(action text, run_as regrole DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
BEGIN
	IF (SELECT rolsuper FROM pg_roles WHERE oid = caller) THEN
		RETURN;
	END IF;
	IF NOT pg_has_role(caller, 'sbpg_admin', 'MEMBER') THEN
		RAISE EXCEPTION 'permission denied to %', action
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = format('Role %s is neither a superuser nor a member of sbpg_admin.', caller),
			      HINT = 'A superuser can GRANT sbpg_admin TO the role that manages subscriptions.';
	END IF;
	IF run_as IS NOT NULL AND NOT pg_has_role(caller, run_as, 'MEMBER') THEN
		RAISE EXCEPTION 'permission denied to %', action
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = format('sbpg_admin members manage only subscriptions whose run_as role they belong to; %s is not a member of %s.', caller, run_as),
			      HINT = format('GRANT %s TO %s, or ask a superuser.', run_as, caller);
	END IF;
END
$$;

-- Checks that every option is known and a non-empty string (or, for `allowed_bool`, a boolean).
CREATE FUNCTION sbpg._check_options(kind text, opts jsonb, allowed text[], hint text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	k text;
BEGIN
	FOR k IN SELECT jsonb_object_keys(opts) LOOP
		IF NOT k = ANY (allowed) THEN
			RAISE EXCEPTION 'unknown option "%" for identity kind %', k, kind
				USING ERRCODE = 'invalid_parameter_value', HINT = hint;
		END IF;
		IF k = 'allowed_namespaces' THEN
			IF jsonb_typeof(opts -> k) <> 'array' OR EXISTS (
				SELECT 1 FROM jsonb_array_elements(opts -> k) e
				WHERE jsonb_typeof(e) <> 'string' OR e #>> '{}' !~* '^amqps?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?/?$') THEN
				RAISE EXCEPTION 'option allowed_namespaces must be an array of AMQP URLs'
					USING ERRCODE = 'invalid_parameter_value',
					      HINT = 'For example ["amqps://localhost:5671"]: brokers other than Service Bus namespaces this identity''s tokens may be sent to.';
			END IF;
			CONTINUE;
		END IF;
		IF jsonb_typeof(opts -> k) <> 'string' OR opts ->> k = '' THEN
			RAISE EXCEPTION 'option "%" of identity kind % must be a non-empty string', k, kind
				USING ERRCODE = 'invalid_parameter_value';
		END IF;
	END LOOP;
END
$$;

-- Raises insufficient_privilege when a non-superuser gives an option only superusers may give.
CREATE FUNCTION sbpg._superuser_options(kind text, opts jsonb, guarded text[], is_super boolean, why text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	k text;
BEGIN
	IF is_super THEN
		RETURN;
	END IF;
	FOR k IN SELECT x FROM jsonb_object_keys(opts) x WHERE x = ANY (guarded) ORDER BY 1 LOOP
		RAISE EXCEPTION 'only superusers may give option "%" of identity kind %', k, kind
			USING ERRCODE = 'insufficient_privilege', DETAIL = why,
			      HINT = 'Ask a superuser to create this identity; sbpg_admin members can then use it in subscriptions.';
	END LOOP;
END
$$;

CREATE FUNCTION sbpg.create_identity(name text, kind text, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
	is_super boolean;
	opts jsonb := coalesce(options, '{}');
	refs int;
	secret text;
	k text;
BEGIN
	PERFORM sbpg._check_admin('create identity');
	SELECT rolsuper INTO is_super FROM pg_roles WHERE oid = caller;
	IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid identity name %', coalesce(quote_literal(name), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF EXISTS (SELECT 1 FROM sbpg.identities i WHERE i.name = create_identity.name) THEN
		RAISE EXCEPTION 'identity "%" already exists', name
			USING ERRCODE = 'duplicate_object', HINT = 'Drop it with sbpg.drop_identity first, or choose another name.';
	END IF;
	IF jsonb_typeof(opts) <> 'object' THEN
		RAISE EXCEPTION 'identity options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF kind = 'anonymous' THEN
		IF opts <> '{}' THEN
			RAISE EXCEPTION 'identity kind anonymous takes no options'
				USING ERRCODE = 'invalid_parameter_value',
				      DETAIL = format('Options given: %s.', (SELECT string_agg(x, ', ') FROM jsonb_object_keys(opts) x));
		END IF;
	ELSIF kind = 'sas' THEN
		PERFORM sbpg._check_options(kind, opts, ARRAY['key_name', 'key', 'key_file', 'key_env'],
			'Options of kind sas: key_name, and one of key, key_file, key_env.');
		IF NOT opts ? 'key_name' THEN
			RAISE EXCEPTION 'identity kind sas needs option key_name'
				USING ERRCODE = 'invalid_parameter_value', HINT = 'key_name is the shared access policy name, e.g. RootManageSharedAccessKey.';
		END IF;
		refs := (opts ? 'key')::int + (opts ? 'key_file')::int + (opts ? 'key_env')::int;
		IF refs <> 1 THEN
			RAISE EXCEPTION 'identity kind sas needs exactly one of key, key_file, key_env'
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'Prefer key_file or key_env: a literal key in SQL text can appear in statement logs.';
		END IF;
		PERFORM sbpg._superuser_options(kind, opts, ARRAY['key_file', 'key_env'], is_super,
			'key_file and key_env make the server read its own files and environment.');
		secret := opts ->> 'key';
		opts := opts - 'key';
	ELSIF kind = 'client_secret' THEN
		PERFORM sbpg._check_options(kind, opts,
			ARRAY['tenant_id', 'client_id', 'secret', 'secret_file', 'secret_env', 'authority_host', 'allowed_namespaces'],
			'Options of kind client_secret: tenant_id, client_id, one of secret, secret_file, secret_env, and optionally authority_host.');
		IF NOT (opts ? 'tenant_id' AND opts ? 'client_id') THEN
			RAISE EXCEPTION 'identity kind client_secret needs options tenant_id and client_id'
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'They are the Directory (tenant) ID and the Application (client) ID of the app registration.';
		END IF;
		refs := (opts ? 'secret')::int + (opts ? 'secret_file')::int + (opts ? 'secret_env')::int;
		IF refs <> 1 THEN
			RAISE EXCEPTION 'identity kind client_secret needs exactly one of secret, secret_file, secret_env'
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'Prefer secret_file or secret_env: a literal secret in SQL text can appear in statement logs.';
		END IF;
		PERFORM sbpg._superuser_options(kind, opts, ARRAY['secret_file', 'secret_env', 'authority_host'], is_super,
			'secret_file and secret_env make the server read its own files and environment; authority_host makes it send the secret to another host.');
		secret := opts ->> 'secret';
		opts := opts - 'secret';
	ELSIF kind IN ('managed_identity', 'workload_identity', 'default') THEN
		IF NOT is_super THEN
			RAISE EXCEPTION 'only superusers may create identities of kind %', kind
				USING ERRCODE = 'insufficient_privilege',
				      DETAIL = format('Kind %s uses the server''s own Azure identity, which may reach more than one team''s queues.', kind),
				      HINT = 'Ask a superuser to create it; sbpg_admin members can then use it in subscriptions.';
		END IF;
		IF kind = 'managed_identity' THEN
			PERFORM sbpg._check_options(kind, opts,
				ARRAY['client_id', 'object_id', 'resource_id', 'source', 'endpoint', 'arc_key_dir', 'allowed_namespaces'],
				'Options of kind managed_identity: at most one of client_id, object_id, resource_id (a user-assigned identity), and source, endpoint, arc_key_dir.');
			IF (opts ? 'client_id')::int + (opts ? 'object_id')::int + (opts ? 'resource_id')::int > 1 THEN
				RAISE EXCEPTION 'give at most one of client_id, object_id, resource_id'
					USING ERRCODE = 'invalid_parameter_value',
					      HINT = 'Each names the same user-assigned identity in a different way; without any, the system-assigned identity is used.';
			END IF;
			IF opts ? 'source' AND opts ->> 'source' NOT IN ('auto', 'imds', 'app_service', 'arc') THEN
				RAISE EXCEPTION 'invalid managed identity source %', quote_literal(opts ->> 'source')
					USING ERRCODE = 'invalid_parameter_value',
					      HINT = 'Sources: auto (detect as the Azure SDKs do), imds, app_service, arc.';
			END IF;
			IF opts ->> 'source' = 'arc' AND (opts ? 'client_id' OR opts ? 'object_id' OR opts ? 'resource_id') THEN
				RAISE EXCEPTION 'Azure Arc supports only the system-assigned identity'
					USING ERRCODE = 'invalid_parameter_value', HINT = 'Remove client_id, object_id and resource_id.';
			END IF;
		ELSIF kind = 'workload_identity' THEN
			PERFORM sbpg._check_options(kind, opts, ARRAY['tenant_id', 'client_id', 'token_file', 'authority_host', 'allowed_namespaces'],
				'Options of kind workload_identity: tenant_id, client_id, token_file, authority_host (each defaults to the AZURE_* variable AKS sets).');
		ELSE
			PERFORM sbpg._check_options(kind, opts, ARRAY['client_id', 'allowed_namespaces'],
				'Kind default takes only client_id (a user-assigned managed identity for its managed identity step).');
		END IF;
		IF opts ? 'endpoint' AND opts ->> 'endpoint' !~* '^https?://[^/?#\s]+(/[^?#\s]*)?$' THEN
			RAISE EXCEPTION 'invalid endpoint %', quote_literal(opts ->> 'endpoint')
				USING ERRCODE = 'invalid_parameter_value', HINT = 'An http(s) URL without query, e.g. http://169.254.169.254/metadata/identity/oauth2/token.';
		END IF;
		FOREACH k IN ARRAY ARRAY['arc_key_dir', 'token_file'] LOOP
			IF opts ? k AND opts ->> k !~ '^/' THEN
				RAISE EXCEPTION '% must be an absolute path', k USING ERRCODE = 'invalid_parameter_value';
			END IF;
		END LOOP;
	ELSE
		RAISE EXCEPTION 'unknown identity kind %', coalesce(quote_literal(kind), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'Kinds: managed_identity, workload_identity, client_secret, default, sas, anonymous.';
	END IF;
	IF opts ? 'authority_host' AND opts ->> 'authority_host' !~* '^https://[^/?#\s]+/?$' THEN
		RAISE EXCEPTION 'invalid authority_host %', quote_literal(opts ->> 'authority_host')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'An https URL with a host only, e.g. https://login.microsoftonline.com.';
	END IF;
	FOREACH k IN ARRAY ARRAY['tenant_id', 'client_id', 'object_id'] LOOP
		IF opts ? k AND opts ->> k !~ '^[A-Za-z0-9._-]{1,128}$' THEN
			RAISE EXCEPTION 'invalid %: %', k, quote_literal(opts ->> k)
				USING ERRCODE = 'invalid_parameter_value', HINT = 'Tenant, client and object IDs are GUIDs (a tenant may also be a domain name).';
		END IF;
	END LOOP;
	IF opts ? 'key_file' AND opts ->> 'key_file' !~ '^/' OR opts ? 'secret_file' AND opts ->> 'secret_file' !~ '^/' THEN
		RAISE EXCEPTION '% must be an absolute path', CASE WHEN opts ? 'key_file' THEN 'key_file' ELSE 'secret_file' END
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'For example /etc/sbpg/orders.key, readable by the operating system user that runs the server.';
	END IF;
	IF coalesce(opts ->> 'key_env', opts ->> 'secret_env') !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
		RAISE EXCEPTION '% must be an environment variable name', CASE WHEN opts ? 'key_env' THEN 'key_env' ELSE 'secret_env' END
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'The variable must be set in the environment the server was started with.';
	END IF;
	INSERT INTO sbpg.identities (name, kind, options, created_by) VALUES (name, kind, opts, caller::text);
	IF secret IS NOT NULL THEN
		INSERT INTO sbpg.identity_secrets (identity, secret) VALUES (name, secret);
	END IF;
END
$$;
COMMENT ON FUNCTION sbpg.create_identity(text, text, jsonb)
	IS 'Registers how workers authenticate (kinds: managed_identity, workload_identity, client_secret, default, sas, anonymous)';

-- Raises unless the identity exists and the caller is a superuser or the role that created it.
CREATE FUNCTION sbpg._check_identity_owner(identity text, action text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
	creator name;
BEGIN
	SELECT i.created_by INTO creator FROM sbpg.identities i WHERE i.name = identity;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'identity "%" does not exist', identity
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.identities lists them.';
	END IF;
	IF NOT (SELECT rolsuper FROM pg_roles WHERE oid = caller) AND creator IS DISTINCT FROM caller::text THEN
		RAISE EXCEPTION 'permission denied to % identity "%"', action, identity
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = format('Identity "%s" was created by %s; only its creator and superusers may %s it.', identity, creator, action);
	END IF;
END
$$;

-- Whether the caller may use an identity in a subscription: superusers, the identity's creator,
-- and members of a role it was granted to.
CREATE FUNCTION sbpg._check_identity_usage(identity text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
BEGIN
	IF (SELECT rolsuper FROM pg_roles WHERE oid = caller)
	   OR EXISTS (SELECT 1 FROM sbpg.identities i WHERE i.name = identity AND i.created_by = caller::text)
	   OR EXISTS (SELECT 1 FROM sbpg.identity_usage u JOIN pg_roles r ON r.oid = u.grantee
	              WHERE u.identity = _check_identity_usage.identity AND pg_has_role(caller, r.oid, 'MEMBER')) THEN
		RETURN;
	END IF;
	RAISE EXCEPTION 'permission denied to use identity "%"', identity
		USING ERRCODE = 'insufficient_privilege',
		      DETAIL = format('%s did not create identity "%s" and belongs to no role it was granted to.', caller, identity),
		      HINT = format('Its creator or a superuser can run SELECT sbpg.grant_identity(%L, %L).', identity, caller::text);
END
$$;

CREATE FUNCTION sbpg.grant_identity(identity text, grantee regrole)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('grant identity');
	PERFORM sbpg._check_identity_owner(identity, 'grant');
	IF grantee IS NULL THEN
		RAISE EXCEPTION 'grantee must be given' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	INSERT INTO sbpg.identity_usage (identity, grantee, granted_by) VALUES (identity, grantee, sbpg._caller()::text)
	ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION sbpg.grant_identity(text, regrole)
	IS 'Lets members of a role use an identity in the subscriptions they manage';

CREATE FUNCTION sbpg.revoke_identity(identity text, grantee regrole)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('revoke identity');
	PERFORM sbpg._check_identity_owner(identity, 'revoke');
	DELETE FROM sbpg.identity_usage u WHERE u.identity = revoke_identity.identity AND u.grantee = revoke_identity.grantee;
END
$$;
COMMENT ON FUNCTION sbpg.revoke_identity(text, regrole)
	IS 'Stops members of a role from putting an identity into new or changed subscriptions';

CREATE FUNCTION sbpg.drop_identity(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	users text;
BEGIN
	PERFORM sbpg._check_admin('drop identity');
	PERFORM sbpg._check_identity_owner(name, 'drop');
	SELECT string_agg(s.name, ', ' ORDER BY s.name) INTO users FROM sbpg.subscriptions s WHERE s.identity = drop_identity.name;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'identity "%" is used by subscriptions', name
			USING ERRCODE = 'dependent_objects_still_exist', DETAIL = format('Used by: %s.', users),
			      HINT = 'Drop those subscriptions or move them to another identity first.';
	END IF;
	DELETE FROM sbpg.identities i WHERE i.name = drop_identity.name;
END
$$;

-- Validates a subscription's settings; raises a clear error for the first problem found.
CREATE FUNCTION sbpg._validate_subscription(name text, namespace text, entity text, handler regprocedure,
	run_as regrole, identity text, batch_size integer, prefetch integer, notify_channel text, options jsonb,
	old_options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	p pg_proc;
	ident sbpg.identities;
	k text;
	lim record;
	caller regrole := sbpg._caller();
BEGIN
	IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid subscription name %', coalesce(quote_literal(name), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF namespace IS NULL OR NOT (
		namespace ~* '^[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\.servicebus\.(windows\.net|chinacloudapi\.cn|usgovcloudapi\.net|cloudapi\.de)$'
		OR namespace ~* '^amqps?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?/?$') THEN
		RAISE EXCEPTION 'invalid namespace %', coalesce(quote_literal(namespace), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = 'A namespace is a Service Bus namespace host name or an AMQP URL with host and optional port.',
			      HINT = 'For example contoso.servicebus.windows.net (TLS on port 5671), amqp://127.0.0.1:5672 or amqps://broker.example:5671.';
	END IF;
	IF namespace ~* '^amqps?://' AND coalesce(substring(namespace from ':([0-9]+)/?$')::int, 1) NOT BETWEEN 1 AND 65535 THEN
		RAISE EXCEPTION 'invalid port in namespace %', quote_literal(namespace)
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Ports run from 1 to 65535.';
	END IF;
	IF entity IS NULL OR NOT (
		entity ~ '^[A-Za-z0-9][A-Za-z0-9._~/-]*$' AND length(entity) <= 260 AND entity !~ '//' AND entity !~ '/$'
		OR entity ~* '^[A-Za-z0-9][A-Za-z0-9._~/-]*/\$deadletterqueue$') THEN
		RAISE EXCEPTION 'invalid entity %', coalesce(quote_literal(entity), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'An entity is a queue name (orders) or a topic subscription (orders/subscriptions/audit).';
	END IF;
	IF entity ~* '/subscriptions/' AND entity !~* '^[^/]+/subscriptions/[^/]+(/\$deadletterqueue)?$' THEN
		RAISE EXCEPTION 'invalid topic subscription %', quote_literal(entity)
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Write it as topic/subscriptions/name.';
	END IF;
	SELECT * INTO p FROM pg_proc WHERE oid = handler;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'handler function does not exist' USING ERRCODE = 'undefined_function';
	END IF;
	IF p.prokind <> 'f' OR p.pronargs <> 1 OR p.proargtypes[0] <> 'sbpg.message'::regtype
	   OR p.prorettype <> 'void'::regtype OR p.proretset THEN
		RAISE EXCEPTION 'handler % has the wrong signature', handler
			USING ERRCODE = 'invalid_function_definition',
			      DETAIL = format('It takes (%s) and returns %s%s.', pg_get_function_identity_arguments(handler),
			                      CASE WHEN p.proretset THEN 'setof ' ELSE '' END, p.prorettype::regtype),
			      HINT = 'A handler is declared as CREATE FUNCTION name(msg sbpg.message) RETURNS void.';
	END IF;
	IF p.prosecdef THEN
		RAISE EXCEPTION 'handler % is SECURITY DEFINER', handler
			USING ERRCODE = 'invalid_function_definition',
			      DETAIL = 'A SECURITY DEFINER handler would run as its owner, not as the subscription''s run_as role.',
			      HINT = 'Declare the handler SECURITY INVOKER (the default) and grant run_as what it needs.';
	END IF;
	IF run_as IS NULL THEN
		RAISE EXCEPTION 'run_as must be given' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF jsonb_typeof(coalesce(options, '{}')) <> 'object' THEN
		RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	FOR k IN SELECT jsonb_object_keys(coalesce(options, '{}')) LOOP
		IF k = 'allow_superuser_run_as' THEN
			IF jsonb_typeof(options -> k) <> 'boolean' THEN
				RAISE EXCEPTION 'subscription option "%" must be true or false', k USING ERRCODE = 'invalid_parameter_value';
			END IF;
			CONTINUE;
		END IF;
		IF k IN ('schemas', 'unknown_types', 'version_property') THEN
			IF jsonb_typeof(options -> k) <> 'string'
			   OR (k = 'schemas' AND options ->> k NOT IN ('off', 'validate'))
			   OR (k = 'unknown_types' AND options ->> k NOT IN ('dead_letter', 'pass'))
			   OR (k = 'version_property' AND options ->> k !~ '^[^\s]{1,128}$') THEN
				RAISE EXCEPTION 'invalid value % for subscription option "%"', options -> k, k
					USING ERRCODE = 'invalid_parameter_value',
					      DETAIL = CASE k WHEN 'schemas' THEN 'schemas is "off" (the default) or "validate".'
					                      WHEN 'unknown_types' THEN 'unknown_types is "dead_letter" (the default) or "pass".'
					                      ELSE 'version_property names an application property: 1 to 128 characters without white space.' END,
					      HINT = 'docs/schemas.md explains how a message''s type and version are found and validated.';
			END IF;
			CONTINUE;
		END IF;
		SELECT lo, hi, what, dflt INTO lim FROM (VALUES
			('max_retries', 0::bigint, 1000::bigint, 'how many times a transient failure is retried after the first attempt', 5),
			('retry_base_ms', 1, 3600000, 'the ceiling of the first retry''s delay, in milliseconds', 1000),
			('retry_cap_ms', 1, 86400000, 'the largest delay ceiling, in milliseconds', 300000),
			('retry_hold_ms', 0, 600000, 'delays up to this many milliseconds are waited out holding the lock; longer ones defer the message', 30000),
			('max_lock_renewal_s', 0, 86400, 'how long after receipt a held message''s lock is renewed at most, in seconds', 300),
			('handler_timeout_ms', 100, 3600000, 'how long tenant code (handler, upcasts, mapping) may run for one message, in milliseconds', 30000))
			AS t(key, lo, hi, what, dflt) WHERE t.key = k;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'unknown subscription option "%"', k
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'Subscription options: max_retries, retry_base_ms, retry_cap_ms, retry_hold_ms, max_lock_renewal_s, handler_timeout_ms, schemas, unknown_types, version_property, allow_superuser_run_as.';
		END IF;
		IF jsonb_typeof(options -> k) <> 'number' OR (options ->> k) !~ '^[0-9]+$' OR (options ->> k)::numeric NOT BETWEEN lim.lo AND lim.hi THEN
			RAISE EXCEPTION 'subscription option "%" must be an integer from % to %', k, lim.lo, lim.hi
				USING ERRCODE = 'invalid_parameter_value', DETAIL = format('%s is %s; %s was given.', k, lim.what, options -> k),
				      HINT = format('Leave it out for the default, %s. docs/retries.md explains the retry policy.', lim.dflt);
		END IF;
	END LOOP;
	IF coalesce((options ->> 'retry_hold_ms')::bigint, 30000) > coalesce((options ->> 'max_lock_renewal_s')::bigint, 300) * 1000 THEN
		RAISE EXCEPTION 'retry_hold_ms must not exceed max_lock_renewal_s'
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = format('retry_hold_ms is %s ms and max_lock_renewal_s is %s s (defaults 30000 and 300): a held message''s lock would lapse while it waits.',
			                      coalesce(options ->> 'retry_hold_ms', '30000'), coalesce(options ->> 'max_lock_renewal_s', '300')),
			      HINT = 'Lower retry_hold_ms (longer delays defer the message instead) or raise max_lock_renewal_s.';
	END IF;
	IF (options ->> 'handler_timeout_ms')::bigint > coalesce((options ->> 'max_lock_renewal_s')::bigint, 300) * 1000
	   AND coalesce((options ->> 'max_lock_renewal_s')::bigint, 300) > 0 THEN
		RAISE EXCEPTION 'handler_timeout_ms must not exceed max_lock_renewal_s'
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = format('handler_timeout_ms is %s ms and max_lock_renewal_s is %s s (default 300): the message''s lock would lapse while its handler still runs.',
			                      options ->> 'handler_timeout_ms', coalesce(options ->> 'max_lock_renewal_s', '300')),
			      HINT = 'Lower handler_timeout_ms or raise max_lock_renewal_s.';
	END IF;
	IF coalesce((options ->> 'retry_cap_ms')::bigint, 300000) < coalesce((options ->> 'retry_base_ms')::bigint, 1000) THEN
		RAISE EXCEPTION 'retry_cap_ms must be at least retry_base_ms'
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = format('retry_base_ms is %s and retry_cap_ms is %s (defaults 1000 and 300000).',
			                      coalesce(options ->> 'retry_base_ms', '1000'), coalesce(options ->> 'retry_cap_ms', '300000')),
			      HINT = 'Each retry''s delay is drawn at random below min(retry_cap_ms, retry_base_ms * 2^(attempt - 1)).';
	END IF;
	-- Setting the flag is a superuser's decision; keeping a flag a superuser set is not.
	IF (options -> 'allow_superuser_run_as') = 'true' AND (old_options -> 'allow_superuser_run_as') IS DISTINCT FROM 'true'
	   AND NOT (SELECT rolsuper FROM pg_roles WHERE oid = caller) THEN
		RAISE EXCEPTION 'only superusers may set allow_superuser_run_as'
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = 'A handler running as a superuser can do anything in the server.';
	END IF;
	IF (SELECT rolsuper FROM pg_roles WHERE oid = run_as) AND (options -> 'allow_superuser_run_as') IS DISTINCT FROM 'true' THEN
		RAISE EXCEPTION 'run_as role % is a superuser', run_as
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = 'Handlers run with exactly the rights of run_as; a superuser has every right.',
			      HINT = 'Create a NOLOGIN role with only the privileges the handler needs (a superuser may override this with the subscription option allow_superuser_run_as).';
	END IF;
	-- Code a message drives never manages sbpg: a run_as with sbpg_admin's privileges is refused.
	IF NOT (SELECT rolsuper FROM pg_roles WHERE oid = run_as) AND pg_has_role(run_as, 'sbpg_admin', 'USAGE') THEN
		RAISE EXCEPTION 'run_as role % has the privileges of sbpg_admin', run_as
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = 'Its handlers could then create and change subscriptions: code that messages drive must not manage sbpg.',
			      HINT = 'Create a NOLOGIN role with only the privileges the handler needs.';
	END IF;
	IF NOT has_function_privilege(run_as, handler, 'EXECUTE') THEN
		RAISE EXCEPTION 'run_as role % may not execute handler %', run_as, handler
			USING ERRCODE = 'insufficient_privilege', HINT = format('GRANT EXECUTE ON FUNCTION %s TO %s.', handler, run_as);
	END IF;
	IF identity IS NOT NULL THEN
		SELECT * INTO ident FROM sbpg.identities i WHERE i.name = identity;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'identity "%" does not exist', identity
				USING ERRCODE = 'undefined_object', HINT = 'Create it with sbpg.create_identity(name, kind, options).';
		END IF;
		-- An Entra ID token is a bearer token valid at every namespace its principal may reach:
		-- it goes only to Service Bus namespaces, or to brokers the identity names.
		-- A Service Bus namespace qualifies by its host name and TLS (no scheme, or amqps://); an
		-- amqp:// URL never does, whatever its host, unless the identity lists exactly that URL.
		IF ident.kind IN ('managed_identity', 'workload_identity', 'client_secret', 'default')
		   AND namespace !~* '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\.servicebus\.(windows\.net|chinacloudapi\.cn|usgovcloudapi\.net|cloudapi\.de)(:[0-9]{1,5})?/?$'
		   AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(coalesce(ident.options -> 'allowed_namespaces', '[]')) a
		                   WHERE lower(rtrim(a, '/')) = lower(rtrim(namespace, '/'))) THEN
			RAISE EXCEPTION 'identity "%" sends Entra ID tokens only to Service Bus namespaces over TLS, not to %', identity, namespace
				USING ERRCODE = 'insufficient_privilege',
				      DETAIL = 'A token is valid at every namespace its principal may read: any other broker, or anyone on the path of a plain amqp:// connection, would receive it.',
				      HINT = format('To use a development broker, the identity''s creator lists it when creating the identity: {"allowed_namespaces": ["%s"]}.', rtrim(namespace, '/'));
		END IF;
	END IF;
	IF identity IS NULL AND namespace ~* '\.servicebus\.' THEN
		RAISE EXCEPTION 'a Service Bus namespace needs an identity'
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'Create one with sbpg.create_identity and pass it as identity.';
	END IF;
	IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'batch_size % is out of range', coalesce(batch_size::text, 'NULL')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 1000 messages per transaction.';
	END IF;
	IF prefetch IS NULL OR prefetch NOT BETWEEN batch_size AND 5000 THEN
		RAISE EXCEPTION 'prefetch % is out of range', coalesce(prefetch::text, 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = format('prefetch must be at least batch_size (%s) and at most 5000.', batch_size),
			      HINT = 'Locks run from the moment the broker hands a message over; prefetch only what is applied well within the lock duration.';
	END IF;
	IF notify_channel IS NOT NULL AND (notify_channel = '' OR octet_length(notify_channel) > 63) THEN
		RAISE EXCEPTION 'invalid notify_channel %', quote_literal(notify_channel)
			USING ERRCODE = 'invalid_parameter_value', HINT = 'A channel name has 1 to 63 bytes; NULL turns notifications off.';
	END IF;
END
$$;

CREATE FUNCTION sbpg.create_subscription(name text, namespace text, entity text, handler regprocedure,
	run_as regrole, identity text DEFAULT NULL, batch_size integer DEFAULT 100, prefetch integer DEFAULT NULL,
	notify_channel text DEFAULT 'sbpg_confirm', enabled boolean DEFAULT true, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('create subscription', run_as);
	IF EXISTS (SELECT 1 FROM sbpg.subscriptions s WHERE s.name = create_subscription.name) THEN
		RAISE EXCEPTION 'subscription "%" already exists', name
			USING ERRCODE = 'duplicate_object', HINT = 'Change it with sbpg.alter_subscription, or drop it first.';
	END IF;
	-- By default hold no more messages than one transaction applies (see the docs on prefetch).
	prefetch := coalesce(prefetch, batch_size);
	PERFORM sbpg._validate_subscription(name, namespace, entity, handler, run_as, identity, batch_size, prefetch,
	                                    notify_channel, options);
	IF identity IS NOT NULL THEN
		PERFORM sbpg._check_identity_usage(identity);
	END IF;
	INSERT INTO sbpg.subscriptions (name, namespace, entity, handler, run_as, identity, batch_size, prefetch,
	                                notify_channel, enabled, options, created_by)
	VALUES (name, namespace, entity, handler, run_as, identity, batch_size, prefetch, notify_channel,
	        coalesce(enabled, true), coalesce(options, '{}'), sbpg._caller()::text);
END
$$;
COMMENT ON FUNCTION sbpg.create_subscription(text, text, text, regprocedure, regrole, text, integer, integer, text, boolean, jsonb)
	IS 'Consumes a queue or topic subscription and applies each message with handler as run_as';

CREATE FUNCTION sbpg.alter_subscription(name text, namespace text DEFAULT NULL, entity text DEFAULT NULL,
	handler regprocedure DEFAULT NULL, run_as regrole DEFAULT NULL, identity text DEFAULT NULL,
	batch_size integer DEFAULT NULL, prefetch integer DEFAULT NULL, notify_channel text DEFAULT NULL,
	enabled boolean DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
	new_identity text;
	new_channel text;
	inbox_rows bigint;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = alter_subscription.name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', name
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin('alter subscription', s.run_as);
	IF run_as IS NOT NULL THEN
		PERFORM sbpg._check_admin('alter subscription', run_as);
	END IF;
	-- '' clears identity and notify_channel (NULL means "unchanged" here).
	new_identity := CASE WHEN identity IS NULL THEN s.identity WHEN identity = '' THEN NULL ELSE identity END;
	new_channel := CASE WHEN notify_channel IS NULL THEN s.notify_channel WHEN notify_channel = '' THEN NULL ELSE notify_channel END;
	IF batch_size IS NOT NULL AND prefetch IS NULL AND s.prefetch < batch_size THEN
		prefetch := batch_size;
	END IF;
	PERFORM sbpg._validate_subscription(s.name, coalesce(namespace, s.namespace), coalesce(entity, s.entity),
		coalesce(handler, s.handler), coalesce(run_as, s.run_as), new_identity, coalesce(batch_size, s.batch_size),
		coalesce(prefetch, s.prefetch), new_channel, coalesce(options, s.options), s.options);
	IF new_identity IS DISTINCT FROM s.identity THEN
		PERFORM sbpg._check_identity_usage(new_identity);
	END IF;
	-- The inbox is keyed by the source's sequence numbers: a new source starts a new inbox.
	IF coalesce(namespace, s.namespace) IS DISTINCT FROM s.namespace OR lower(coalesce(entity, s.entity)) IS DISTINCT FROM lower(s.entity) THEN
		DELETE FROM sbpg.inbox i WHERE i.subscription = s.name;
		GET DIAGNOSTICS inbox_rows = ROW_COUNT;
		DELETE FROM sbpg.retries r WHERE r.subscription = s.name;
		RAISE NOTICE 'subscription "%" now reads another source; its % inbox rows were removed', s.name, inbox_rows;
	END IF;
	UPDATE sbpg.subscriptions x SET
		namespace = coalesce(alter_subscription.namespace, s.namespace),
		entity = coalesce(alter_subscription.entity, s.entity),
		handler = coalesce(alter_subscription.handler, s.handler),
		run_as = coalesce(alter_subscription.run_as, s.run_as),
		identity = new_identity,
		batch_size = coalesce(alter_subscription.batch_size, s.batch_size),
		prefetch = coalesce(alter_subscription.prefetch, s.prefetch),
		notify_channel = new_channel,
		enabled = coalesce(alter_subscription.enabled, s.enabled),
		options = coalesce(alter_subscription.options, s.options),
		updated_at = now()
	WHERE x.name = s.name;
END
$$;

CREATE FUNCTION sbpg.drop_subscription(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = drop_subscription.name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', name
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin('drop subscription', s.run_as);
	DELETE FROM sbpg.inbox i WHERE i.subscription = s.name;
	DELETE FROM sbpg.retries r WHERE r.subscription = s.name;
	DELETE FROM sbpg.subscriptions x WHERE x.name = s.name;
END
$$;

CREATE FUNCTION sbpg.enable_subscription(name text)
RETURNS void LANGUAGE sql AS $$ SELECT sbpg.alter_subscription(name, enabled => true) $$;
CREATE FUNCTION sbpg.disable_subscription(name text)
RETURNS void LANGUAGE sql AS $$ SELECT sbpg.alter_subscription(name, enabled => false) $$;

-- What sbpg.stats shows a caller: everything to superusers and sbpg_monitor members; to anyone
-- else (sbpg_admin members), the subscriptions whose run_as role they belong to, since last_error
-- may quote a tenant's data. sbpg._worker_stats() itself is for superusers only.
CREATE FUNCTION sbpg._stats(
	OUT subscription text, OUT enabled boolean, OUT state text, OUT pid integer, OUT connected_since timestamptz,
	OUT received bigint, OUT applied bigint, OUT dead_lettered bigint, OUT duplicates bigint, OUT abandoned bigint,
	OUT batches bigint, OUT settle_failures bigint, OUT reconnects bigint, OUT last_error text, OUT last_error_at timestamptz,
	OUT apply_ms_p50 double precision, OUT apply_ms_p99 double precision,
	OUT lag_ms_p50 double precision, OUT lag_ms_p99 double precision, OUT messages_per_second double precision,
	OUT token_expires_at timestamptz, OUT tokens_put bigint, OUT token_subject text, OUT token_error text,
	OUT last_batch_at timestamptz, OUT retries bigint, OUT retried_messages bigint, OUT max_retries_exceeded bigint,
	OUT waiting_retry integer, OUT deferred bigint, OUT lock_renewals bigint, OUT locks_lost bigint)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT s.name,
       s.enabled,
       CASE WHEN current_database() <> current_setting('sbpg.database', true) THEN 'unserved'
            ELSE coalesce(w.state, CASE WHEN s.enabled THEN 'starting' ELSE 'disabled' END) END,
       w.pid, w.connected_since, w.received, w.applied, w.dead_lettered, w.duplicates, w.abandoned,
       w.batches, w.settle_failures, w.reconnects, w.last_error, w.last_error_at,
       w.apply_ms_p50, w.apply_ms_p99, w.lag_ms_p50, w.lag_ms_p99, w.messages_per_second,
       w.token_expires_at, w.tokens_put, w.token_subject, w.token_error, w.last_batch_at,
       w.retries, w.retried_messages, w.max_retries_exceeded, w.waiting_retry, w.deferred,
       w.lock_renewals, w.locks_lost
FROM sbpg.subscriptions s
LEFT JOIN sbpg._worker_stats() w ON w.subscription = s.name
CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE (SELECT rolsuper FROM pg_roles WHERE oid = c.who)
   OR pg_has_role(c.who, 'sbpg_monitor', 'MEMBER')
   OR pg_has_role(c.who, s.run_as, 'MEMBER')
$$;

CREATE VIEW sbpg.stats AS SELECT * FROM sbpg._stats();
COMMENT ON VIEW sbpg.stats IS 'Per subscription: worker state, counters, latency and lag percentiles, throughput';

-- The schema registry (docs/schemas.md): message types, their compatibility mode, and their
-- schema versions (JSON Schema draft-04 as RapidJSON implements it). Versions are immutable.
CREATE TABLE sbpg.message_types (
	name text PRIMARY KEY,
	compatibility text NOT NULL DEFAULT 'backward' CHECK (compatibility IN ('none', 'backward', 'forward', 'full')),
	created_at timestamptz NOT NULL DEFAULT now(),
	created_by name NOT NULL,
	owner regrole NOT NULL -- who registered it first: only its members and superusers change it
);
COMMENT ON TABLE sbpg.message_types IS 'Message types with registered schemas, and how their versions must stay compatible';

CREATE TABLE sbpg.schemas (
	message_type text NOT NULL REFERENCES sbpg.message_types (name) ON DELETE CASCADE,
	version integer NOT NULL CHECK (version > 0),
	schema jsonb NOT NULL,
	upcast regprocedure,          -- turns a payload of this version into the next version's shape
	registered_at timestamptz NOT NULL DEFAULT now(),
	registered_by name NOT NULL,
	PRIMARY KEY (message_type, version)
);
COMMENT ON TABLE sbpg.schemas IS 'Registered JSON Schemas, one per message type and version';

-- Raises insufficient_privilege unless the caller may change a registered message type (its
-- versions, compatibility, upcasts, the mappings that apply it): superusers, and members of the
-- role that registered it first. A type not registered yet has no owner.
CREATE FUNCTION sbpg._check_type_owner(message_type text, action text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
	type_owner regrole;
BEGIN
	SELECT t.owner INTO type_owner FROM sbpg.message_types t WHERE t.name = message_type;
	IF NOT FOUND OR (SELECT rolsuper FROM pg_roles WHERE oid = caller)
	   OR (EXISTS (SELECT FROM pg_roles WHERE oid = type_owner) AND pg_has_role(caller, type_owner, 'MEMBER')) THEN
		RETURN;
	END IF;
	RAISE EXCEPTION 'permission denied to % message type %', action, message_type
		USING ERRCODE = 'insufficient_privilege',
		      DETAIL = format('Message type %s belongs to %s: only members of that role and superusers may %s it.', message_type, type_owner, action),
		      HINT = format('A member of %s can register it, or GRANT %s TO %s.', type_owner, type_owner, caller);
END
$$;

CREATE FUNCTION sbpg._schema_unsupported(schema jsonb) RETURNS text
	AS 'MODULE_PATHNAME', 'sbpg_schema_unsupported' LANGUAGE C IMMUTABLE STRICT;
CREATE FUNCTION sbpg._schema_violations(old_schema jsonb, new_schema jsonb, mode text,
	OUT rule text, OUT pointer text, OUT detail text) RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbpg_schema_violations' LANGUAGE C IMMUTABLE STRICT;

CREATE FUNCTION sbpg.register_schema(message_type text, version integer, schema jsonb,
	compatibility text DEFAULT NULL, upcast regprocedure DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	t sbpg.message_types;
	prev sbpg.schemas;
	why text;
	broken text;
	p pg_proc;
BEGIN
	PERFORM sbpg._check_admin('register schema');
	IF message_type IS NULL OR message_type !~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$' THEN
		RAISE EXCEPTION 'invalid message type %', coalesce(quote_literal(message_type), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = 'A message type has 1 to 255 letters, digits, ".", "_", ":", "/" or "-", and starts with a letter or digit.',
			      HINT = 'For example com.contoso.orders.created, as a CloudEvents type or a Service Bus subject.';
	END IF;
	IF version IS NULL OR version < 1 THEN
		RAISE EXCEPTION 'invalid version % of message type %', coalesce(version::text, 'NULL'), message_type
			USING ERRCODE = 'invalid_parameter_value', DETAIL = 'Versions are positive integers.',
			      HINT = 'Number versions 1, 2, 3, … in the order they are registered.';
	END IF;
	IF compatibility IS NOT NULL AND lower(compatibility) NOT IN ('none', 'backward', 'forward', 'full') THEN
		RAISE EXCEPTION 'unknown compatibility mode %', quote_literal(compatibility)
			USING ERRCODE = 'invalid_parameter_value', DETAIL = 'The modes are none, backward, forward and full.',
			      HINT = 'backward: consumers of the new version read old messages; forward: consumers of the old version read new ones; full: both.';
	END IF;
	IF schema IS NULL OR jsonb_typeof(schema) <> 'object' THEN
		RAISE EXCEPTION 'the schema of % version % must be a JSON object', message_type, version
			USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', coalesce(jsonb_typeof(schema), 'NULL')),
			      HINT = 'Give a JSON Schema (draft-04), e.g. {"type": "object", "required": ["id"]}.';
	END IF;
	why := sbpg._schema_unsupported(schema);
	IF why IS NOT NULL THEN
		RAISE EXCEPTION 'the schema of % version % is not supported', message_type, version
			USING ERRCODE = 'invalid_parameter_value', DETAIL = why,
			      HINT = 'sbpg validates with JSON Schema draft-04 as RapidJSON implements it and refuses what it would silently ignore; docs/schemas.md lists the keywords.';
	END IF;
	IF upcast IS NOT NULL THEN
		SELECT * INTO p FROM pg_proc WHERE oid = upcast;
		IF p.pronargs <> 1 OR p.proargtypes[0] <> 'jsonb'::regtype OR p.prorettype <> 'jsonb'::regtype OR p.proretset OR p.prokind <> 'f' THEN
			RAISE EXCEPTION 'upcast % has the wrong signature', upcast
				USING ERRCODE = 'invalid_function_definition',
				      DETAIL = format('It takes (%s) and returns %s.', pg_get_function_identity_arguments(upcast), p.prorettype::regtype),
				      HINT = 'An upcast is declared as CREATE FUNCTION name(payload jsonb) RETURNS jsonb: it turns a payload of this version into the next version''s shape.';
		END IF;
		IF p.prosecdef THEN
			RAISE EXCEPTION 'upcast % is SECURITY DEFINER', upcast
				USING ERRCODE = 'invalid_function_definition',
				      DETAIL = 'It would run as its owner, not as the subscription''s run_as role.',
				      HINT = 'Declare it SECURITY INVOKER (the default).';
		END IF;
	END IF;
	-- One registration of a type at a time: versions are checked against the latest.
	PERFORM pg_advisory_xact_lock(hashtext('sbpg.register_schema'), hashtext(message_type));
	PERFORM sbpg._check_type_owner(message_type, 'register a version of');
	SELECT * INTO t FROM sbpg.message_types m WHERE m.name = message_type FOR UPDATE;
	IF NOT FOUND THEN
		INSERT INTO sbpg.message_types (name, compatibility, created_by, owner)
		VALUES (message_type, lower(coalesce(compatibility, 'backward')), sbpg._caller()::text, sbpg._caller())
		RETURNING * INTO t;
	ELSIF compatibility IS NOT NULL AND lower(compatibility) <> t.compatibility THEN
		RAISE EXCEPTION 'message type % has compatibility mode %, not %', message_type, t.compatibility, lower(compatibility)
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = 'The mode is set when the first version is registered.',
			      HINT = format('Change it with SELECT sbpg.set_compatibility(%L, %L), then register.', message_type, lower(compatibility));
	END IF;
	IF EXISTS (SELECT 1 FROM sbpg.schemas s WHERE s.message_type = register_schema.message_type AND s.version = register_schema.version) THEN
		RAISE EXCEPTION 'version % of message type % is already registered', version, message_type
			USING ERRCODE = 'duplicate_object', DETAIL = 'Registered versions never change: messages already validated against them stay valid.',
			      HINT = format('Register the change as version %s.', (SELECT max(s.version) + 1 FROM sbpg.schemas s WHERE s.message_type = register_schema.message_type));
	END IF;
	SELECT * INTO prev FROM sbpg.schemas s WHERE s.message_type = register_schema.message_type ORDER BY s.version DESC LIMIT 1;
	IF FOUND AND prev.version > version THEN
		RAISE EXCEPTION 'version % of message type % is older than its latest version %', version, message_type, prev.version
			USING ERRCODE = 'invalid_parameter_value', DETAIL = 'Versions are registered in increasing order, each checked against the one before.',
			      HINT = format('Register it as version %s.', prev.version + 1);
	END IF;
	IF FOUND AND t.compatibility <> 'none' THEN
		SELECT string_agg(v.detail, E'\n' ORDER BY v.pointer, v.rule)
		INTO broken FROM sbpg._schema_violations(prev.schema, schema, t.compatibility) v;
		IF broken IS NOT NULL THEN
			RAISE EXCEPTION 'version % of message type % is not % compatible with version %', version, message_type, t.compatibility, prev.version
				USING ERRCODE = 'invalid_parameter_value', DETAIL = broken,
				      HINT = 'Make the change compatible (docs/schemas.md has the rules), register it as a new message type, or change the mode with sbpg.set_compatibility if every consumer can take it.';
		END IF;
	END IF;
	INSERT INTO sbpg.schemas (message_type, version, schema, upcast, registered_by)
	VALUES (message_type, version, schema, upcast, sbpg._caller()::text);
END
$$;
COMMENT ON FUNCTION sbpg.register_schema(text, integer, jsonb, text, regprocedure)
	IS 'Registers a JSON Schema (draft-04) as a version of a message type, checked against the previous version';

CREATE FUNCTION sbpg.set_compatibility(message_type text, compatibility text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('set compatibility');
	PERFORM sbpg._check_type_owner(message_type, 'change the compatibility of');
	IF compatibility IS NULL OR lower(compatibility) NOT IN ('none', 'backward', 'forward', 'full') THEN
		RAISE EXCEPTION 'unknown compatibility mode %', coalesce(quote_literal(compatibility), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', DETAIL = 'The modes are none, backward, forward and full.',
			      HINT = 'backward: consumers of the new version read old messages; forward: consumers of the old version read new ones; full: both.';
	END IF;
	UPDATE sbpg.message_types m SET compatibility = lower(set_compatibility.compatibility) WHERE m.name = message_type;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'message type % has no registered schema', coalesce(quote_literal(message_type), 'NULL')
			USING ERRCODE = 'undefined_object', DETAIL = 'A message type exists once its first version is registered.',
			      HINT = 'Register a version with sbpg.register_schema(message_type, 1, schema, compatibility).';
	END IF;
END
$$;
COMMENT ON FUNCTION sbpg.set_compatibility(text, text)
	IS 'Changes how later versions of a message type must stay compatible (none, backward, forward, full); registered versions are not checked again';

CREATE VIEW sbpg.schema_catalog AS
SELECT s.message_type, s.version, t.compatibility,
       s.version = max(s.version) OVER (PARTITION BY s.message_type) AS latest,
       s.upcast, s.registered_at, s.registered_by, s.schema
FROM sbpg.schemas s JOIN sbpg.message_types t ON t.name = s.message_type;
COMMENT ON VIEW sbpg.schema_catalog IS 'Every registered schema version, with its type''s compatibility mode and whether it is the latest';

-- Declarative mappings (docs/schemas.md): messages of a type applied to a table without handler
-- code: insert, upsert on key columns, or delete; JSON fields map to columns by name or through
-- column_map. Run as the subscription's run_as role.
CREATE TABLE sbpg.mappings (
	subscription text NOT NULL REFERENCES sbpg.subscriptions (name) ON DELETE CASCADE,
	message_type text NOT NULL,
	target regclass NOT NULL,
	action text NOT NULL CHECK (action IN ('insert', 'upsert', 'delete')),
	key_columns text[],
	column_map jsonb NOT NULL DEFAULT '{}',
	created_at timestamptz NOT NULL DEFAULT now(),
	created_by name NOT NULL,
	PRIMARY KEY (subscription, message_type)
);
COMMENT ON TABLE sbpg.mappings IS 'Message types a subscription applies to a table without a handler';

-- The payload with column_map applied: {"column": value, ...} for the target's columns present.
CREATE FUNCTION sbpg._mapped(target regclass, column_map jsonb, payload jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
	SELECT coalesce(jsonb_object_agg(a.attname, payload -> coalesce(column_map ->> a.attname, a.attname)), '{}')
	FROM pg_attribute a
	WHERE a.attrelid = target AND a.attnum > 0 AND NOT a.attisdropped
	  AND payload ? coalesce(column_map ->> a.attname, a.attname)
$$;

-- Applies one message through a mapping. Called by the worker as run_as, so the table's grants
-- and row-level security apply.
CREATE FUNCTION sbpg._apply_mapping(target regclass, action text, key_columns text[], column_map jsonb, payload jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	rec jsonb;
	cols text;
	sets text;
	cond text;
	k text;
BEGIN
	IF jsonb_typeof(payload) IS DISTINCT FROM 'object' THEN
		RAISE EXCEPTION 'the message body is not a JSON object' USING ERRCODE = 'invalid_parameter_value',
			DETAIL = format('A mapping to %s needs an object whose fields name columns; the body is %s.', target, coalesce(jsonb_typeof(payload), 'missing'));
	END IF;
	rec := sbpg._mapped(target, column_map, payload);
	IF action = 'delete' OR action = 'upsert' THEN
		FOREACH k IN ARRAY key_columns LOOP
			IF NOT rec ? k OR rec -> k = 'null' THEN
				RAISE EXCEPTION 'the message has no value for key column %', k USING ERRCODE = 'not_null_violation',
					DETAIL = format('Mapping to %s (%s) identifies rows by %s.', target, action, array_to_string(key_columns, ', '));
			END IF;
		END LOOP;
	END IF;
	IF action = 'delete' THEN
		SELECT string_agg(format('t.%1$I = r.%1$I', c), ' AND ') INTO cond FROM unnest(key_columns) c;
		EXECUTE format('DELETE FROM %s t USING jsonb_populate_record(NULL::%s, $1) r WHERE %s', target, target, cond) USING rec;
		RETURN;
	END IF;
	SELECT string_agg(quote_ident(c), ', ') INTO cols FROM jsonb_object_keys(rec) c;
	IF cols IS NULL THEN
		RAISE EXCEPTION 'the message has no field for any column of %', target USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Fields map to columns by name, or through the mapping''s column_map.';
	END IF;
	IF action = 'insert' THEN
		EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_record(NULL::%s, $1)', target, cols, cols, target) USING rec;
	ELSE
		SELECT string_agg(format('%1$I = excluded.%1$I', c), ', ') INTO sets FROM jsonb_object_keys(rec) c WHERE c <> ALL (key_columns);
		EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_record(NULL::%s, $1) ON CONFLICT (%s) DO %s',
			target, cols, cols, target, (SELECT string_agg(quote_ident(c), ', ') FROM unnest(key_columns) c),
			CASE WHEN sets IS NULL THEN 'NOTHING' ELSE 'UPDATE SET ' || sets END) USING rec;
	END IF;
END
$$;

-- After a mapping failed with a data error: which column could not take which value.
CREATE FUNCTION sbpg._diagnose_mapping(target regclass, column_map jsonb, payload jsonb) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	rec jsonb := sbpg._mapped(target, column_map, payload);
	a record;
BEGIN
	FOR a IN SELECT attname, format_type(atttypid, atttypmod) AS typ FROM pg_attribute
	         WHERE attrelid = target AND attnum > 0 AND NOT attisdropped AND rec ? attname ORDER BY attnum LOOP
		BEGIN
			EXECUTE format('SELECT (jsonb_populate_record(NULL::%s, $1)).%I', target, a.attname) USING jsonb_build_object(a.attname, rec -> a.attname);
		EXCEPTION WHEN OTHERS THEN
			RETURN format('column %I (%s) of %s cannot take %s: %s', a.attname, a.typ, target, left((rec -> a.attname)::text, 200), SQLERRM);
		END;
	END LOOP;
	RETURN NULL;
END
$$;

CREATE FUNCTION sbpg.create_mapping(subscription text, message_type text, target regclass, action text DEFAULT 'insert',
	key_columns text[] DEFAULT NULL, column_map jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
	k text;
	missing text;
	needs text[];
	priv text;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = create_mapping.subscription;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', subscription
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin('create mapping', s.run_as);
	PERFORM sbpg._check_type_owner(message_type, 'map');
	IF message_type IS NULL OR message_type !~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$' THEN
		RAISE EXCEPTION 'invalid message type %', coalesce(quote_literal(message_type), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'The type a message carries (docs/schemas.md), e.g. com.contoso.orders.created.';
	END IF;
	IF target IS NULL OR NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = target AND relkind IN ('r', 'p')) THEN
		RAISE EXCEPTION 'mapping target % is not a table', coalesce(target::text, 'NULL')
			USING ERRCODE = 'wrong_object_type', HINT = 'Map to an ordinary or partitioned table.';
	END IF;
	IF action IS NULL OR action NOT IN ('insert', 'upsert', 'delete') THEN
		RAISE EXCEPTION 'unknown mapping action %', coalesce(quote_literal(action), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', DETAIL = 'The actions are insert, upsert and delete.',
			      HINT = 'upsert and delete name the key columns that identify a row.';
	END IF;
	IF action IN ('upsert', 'delete') AND coalesce(cardinality(key_columns), 0) = 0 THEN
		RAISE EXCEPTION 'mapping action % needs key_columns', action
			USING ERRCODE = 'invalid_parameter_value', HINT = 'For example key_columns => ARRAY[''id''].';
	END IF;
	SELECT string_agg(c, ', ') INTO missing FROM unnest(coalesce(key_columns, '{}')) c
	WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = target AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
	IF missing IS NOT NULL THEN
		RAISE EXCEPTION 'table % has no column %', target, missing USING ERRCODE = 'undefined_column',
			HINT = 'key_columns name columns of the target table.';
	END IF;
	IF action = 'upsert' AND NOT EXISTS (
		SELECT 1 FROM pg_index i WHERE i.indrelid = target AND i.indisunique AND i.indpred IS NULL
		  AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a WHERE a.attrelid = target AND a.attnum = ANY (i.indkey))
		      = (SELECT array_agg(c ORDER BY c) FROM unnest(key_columns) c)) THEN
		RAISE EXCEPTION 'no unique index of % covers exactly %', target, array_to_string(key_columns, ', ')
			USING ERRCODE = 'invalid_object_definition', DETAIL = 'An upsert needs a unique index or constraint on its key columns.',
			      HINT = format('ALTER TABLE %s ADD UNIQUE (%s).', target, array_to_string(key_columns, ', '));
	END IF;
	IF column_map IS NOT NULL THEN
		IF jsonb_typeof(column_map) <> 'object' OR EXISTS (SELECT 1 FROM jsonb_each(column_map) e WHERE jsonb_typeof(e.value) <> 'string') THEN
			RAISE EXCEPTION 'column_map must be a JSON object of column names to field names'
				USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"amount_eur": "amount"}.';
		END IF;
		SELECT string_agg(c, ', ') INTO missing FROM jsonb_object_keys(column_map) c
		WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = target AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
		IF missing IS NOT NULL THEN
			RAISE EXCEPTION 'table % has no column %', target, missing USING ERRCODE = 'undefined_column',
				HINT = 'column_map''s keys are columns of the target table, its values the message''s field names.';
		END IF;
	END IF;
	needs := CASE action WHEN 'insert' THEN ARRAY['INSERT'] WHEN 'upsert' THEN ARRAY['INSERT', 'UPDATE', 'SELECT'] ELSE ARRAY['DELETE', 'SELECT'] END;
	FOREACH priv IN ARRAY needs LOOP
		IF NOT has_table_privilege(s.run_as, target, priv) THEN
			RAISE EXCEPTION 'run_as role % may not % on %', s.run_as, priv, target
				USING ERRCODE = 'insufficient_privilege', DETAIL = format('A mapping runs as the subscription''s run_as role; %s needs %s.', action, array_to_string(needs, ', ')),
				      HINT = format('GRANT %s ON %s TO %s.', array_to_string(needs, ', '), target, s.run_as);
		END IF;
	END LOOP;
	INSERT INTO sbpg.mappings (subscription, message_type, target, action, key_columns, column_map, created_by)
	VALUES (subscription, message_type, target, action, key_columns, coalesce(column_map, '{}'), sbpg._caller()::text)
	ON CONFLICT ON CONSTRAINT mappings_pkey DO UPDATE SET target = excluded.target, action = excluded.action,
		key_columns = excluded.key_columns, column_map = excluded.column_map, created_at = now(), created_by = excluded.created_by;
END
$$;
COMMENT ON FUNCTION sbpg.create_mapping(text, text, regclass, text, text[], jsonb)
	IS 'Applies a subscription''s messages of one type to a table (insert, upsert on key columns, delete) instead of its handler';

CREATE FUNCTION sbpg.drop_mapping(subscription text, message_type text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = drop_mapping.subscription;
	IF FOUND THEN
		PERFORM sbpg._check_admin('drop mapping', s.run_as);
		PERFORM sbpg._check_type_owner(message_type, 'unmap');
	END IF;
	DELETE FROM sbpg.mappings m WHERE m.subscription = drop_mapping.subscription AND m.message_type = drop_mapping.message_type;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" has no mapping for message type %', subscription, message_type
			USING ERRCODE = 'undefined_object', HINT = 'SELECT * FROM sbpg.mappings lists them.';
	END IF;
END
$$;

-- Privileges: configuration through the functions above only.
REVOKE ALL ON ALL TABLES IN SCHEMA sbpg FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sbpg FROM PUBLIC;
-- Handler authors write `m sbpg.message`: the schema is visible to all, its tables and functions
-- are not.
GRANT USAGE ON SCHEMA sbpg TO PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg.create_identity(text, text, jsonb), sbpg.drop_identity(text),
	sbpg.grant_identity(text, regrole), sbpg.revoke_identity(text, regrole),
	sbpg.create_subscription(text, text, text, regprocedure, regrole, text, integer, integer, text, boolean, jsonb),
	sbpg.alter_subscription(text, text, text, regprocedure, regrole, text, integer, integer, text, boolean, jsonb),
	sbpg.drop_subscription(text), sbpg.enable_subscription(text), sbpg.disable_subscription(text),
	sbpg.register_schema(text, integer, jsonb, text, regprocedure), sbpg.set_compatibility(text, text),
	sbpg.create_mapping(text, text, regclass, text, text[], jsonb), sbpg.drop_mapping(text, text)
	TO sbpg_admin;
GRANT SELECT ON sbpg.message_types, sbpg.schemas, sbpg.schema_catalog, sbpg.mappings TO sbpg_admin, sbpg_monitor;
-- A mapping runs as run_as and uses this helper (it reads only pg_attribute).
GRANT EXECUTE ON FUNCTION sbpg._mapped(regclass, jsonb, jsonb) TO PUBLIC;
GRANT SELECT ON sbpg.identities, sbpg.identity_usage, sbpg.subscriptions TO sbpg_admin;
GRANT SELECT ON sbpg.subscriptions, sbpg.stats, sbpg.inbox, sbpg.retries TO sbpg_monitor;
-- sbpg.stats filters by visibility (sbpg._stats); the raw slots (sbpg._worker_stats) are superusers'.
GRANT SELECT ON sbpg.stats TO sbpg_admin;
GRANT EXECUTE ON FUNCTION sbpg._stats() TO sbpg_monitor, sbpg_admin;

-- pg_dump keeps sbpg's configuration and its inbox (which recognises redeliveries after a
-- restore): their rows are dumped with the database. sbpg.identity_secrets is readable by
-- superusers only, so only a superuser's dump holds (and needs) it.
SELECT pg_catalog.pg_extension_config_dump('sbpg.identities', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.identity_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.identity_usage', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.retries', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.message_types', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.schemas', '');
SELECT pg_catalog.pg_extension_config_dump('sbpg.mappings', '');
