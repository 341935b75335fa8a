-- sbpg 0.2 -> 0.3: functions named by their signature, so that pg_upgrade can carry sbpg across
-- PostgreSQL major versions.
--
-- pg_upgrade refuses a cluster whose user tables hold regprocedure values, because function OIDs
-- are not kept across the upgrade. sbpg.subscriptions.handler and sbpg.schemas.upcast were
-- regprocedure columns; they now hold the function's schema-qualified signature as text
-- ('public.apply_order(sbpg.message)'), written the way regprocedure prints it under
-- search_path = pg_catalog. The worker looks the function up by that text (sbpg._resolve_function)
-- when it loads the subscription, and again after the function was dropped (it may be created
-- again).
--
-- A name can be taken by someone else once its function is dropped, which an OID could not.
-- So the subscription also records who owned its handler when it was named (handler_owner, a
-- regrole: role OIDs survive pg_upgrade), and the worker runs only a function of that owner; a
-- handler now owned by anyone else pauses the subscription until an administrator names it again
-- with sbpg.alter_subscription. Upcasts already carry that check (their owner must have run_as's
-- privileges, checked each time one runs).

-- The text kept for a function: its signature as regprocedure prints it with only pg_catalog on the
-- search path (every other schema written out), or, for an OID whose function no longer exists, a
-- text that never resolves (a bare number would: regprocedure input takes OIDs).
CREATE FUNCTION sbpg._function_text(fn regprocedure) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
	SELECT CASE WHEN fn IS NULL THEN NULL
	            WHEN EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) fn) THEN fn::pg_catalog.text
	            ELSE pg_catalog.format('(dropped function %s)', fn::pg_catalog.oid) END
$$;

-- The function a signature names now, or NULL: none, a dropped one's text, a bare number, or text
-- that does not parse (to_regprocedure raises for an unknown argument type before PostgreSQL 16).
CREATE FUNCTION sbpg._resolve_function(signature text) RETURNS oid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	IF signature IS NULL OR signature OPERATOR(pg_catalog.!~) '\(' THEN
		RETURN NULL;
	END IF;
	RETURN pg_catalog.to_regprocedure(signature)::pg_catalog.oid;
EXCEPTION WHEN OTHERS THEN
	RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION sbpg._function_text(regprocedure), sbpg._resolve_function(text) FROM PUBLIC;

DROP VIEW sbpg.schema_catalog;

ALTER TABLE sbpg.subscriptions
	ALTER COLUMN handler TYPE text USING sbpg._function_text(handler),
	ADD COLUMN handler_owner regrole;
UPDATE sbpg.subscriptions s SET handler_owner = p.proowner
FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) sbpg._resolve_function(s.handler);
COMMENT ON COLUMN sbpg.subscriptions.handler IS 'The handler''s schema-qualified signature (looked up by it, so it survives pg_upgrade and pg_dump)';
COMMENT ON COLUMN sbpg.subscriptions.handler_owner IS 'Who owned the handler when the subscription named it: a function of that name owned by anyone else is not run';

ALTER TABLE sbpg.schemas ALTER COLUMN upcast TYPE text USING sbpg._function_text(upcast);
COMMENT ON COLUMN sbpg.schemas.upcast IS 'Schema-qualified signature of the function that turns the version before into this one';

-- As in 0.2, with upcast as text.
CREATE VIEW sbpg.schema_catalog AS
SELECT s.message_type, s.version, t.compatibility,
       s.version = max(s.version) OVER (PARTITION BY s.message_type) AS latest,
       s.upcast, s.registered_at, s.registered_by, s.schema,
       lag(s.version) OVER (PARTITION BY s.message_type ORDER BY s.version) AS upcast_from,
       s.upcast IS NULL AND lag(s.version) OVER (PARTITION BY s.message_type ORDER BY s.version) IS NOT NULL AS chain_gap
FROM sbpg.schemas s JOIN sbpg.message_types t ON t.name = s.message_type;
COMMENT ON VIEW sbpg.schema_catalog IS 'Every registered schema version, with its type''s compatibility mode and whether it is the latest';
GRANT SELECT ON sbpg.schema_catalog TO sbpg_admin, sbpg_monitor;

-- register_schema and set_upcast store their regprocedure argument into the text column by
-- assignment, under their own search_path = pg_catalog, pg_temp: the same text as _function_text.

-- What identifies a subscription's source: transport (TLS or not), host (lower case, without a
-- trailing dot), port (the transport's default when none is written: 5671 with TLS, 5672 without;
-- a host name alone means TLS) and entity (lower case). Aliases of one namespace (a private-link or
-- CNAME name) are not recognised here.
CREATE FUNCTION sbpg._source_key(namespace text, entity text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT CASE WHEN p[1] IS NULL OR p[1] = 'amqps' THEN 'amqps' ELSE 'amqp' END || '://' || rtrim(p[2], '.') || ':'
       || coalesce(p[4]::int, CASE WHEN p[1] IS NULL OR p[1] = 'amqps' THEN 5671 ELSE 5672 END) || '/' || lower(entity)
FROM (SELECT regexp_match(lower(rtrim(namespace, '/')), '^(?:(amqps?)://)?(\[[^\]]+\]|[^/:]+)(:([0-9]{1,5}))?$') AS p) m
$$;
REVOKE ALL ON FUNCTION sbpg._source_key(text, text) FROM PUBLIC;
DO $$
DECLARE
	pair record;
BEGIN
	FOR pair IN
		SELECT a.name AS one, b.name AS other FROM sbpg.subscriptions a JOIN sbpg.subscriptions b
		  ON a.name < b.name AND sbpg._source_key(a.namespace, a.entity) = sbpg._source_key(b.namespace, b.entity)
	LOOP
		RAISE WARNING 'subscriptions "%" and "%" consume the same entity', pair.one, pair.other
			USING DETAIL = 'Each recognises redeliveries by its own inbox: a message redelivered from one to the other is applied by both.',
			      HINT = 'Drop one of them, or move it to another entity; give the other more workers instead (docs/scaling.md).';
	END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION sbpg.create_subscription(name text, namespace text, entity text, handler regprocedure,
	run_as regrole, identity text DEFAULT NULL, batch_size integer DEFAULT 100, prefetch integer DEFAULT NULL,
	notify_channel text DEFAULT 'sbpg_confirm', enabled boolean DEFAULT true, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('create subscription', run_as);
	-- One subscription per source (_validate_subscription checks): concurrent creations and
	-- changes of the source take their turns.
	LOCK TABLE sbpg.subscriptions IN SHARE ROW EXCLUSIVE MODE;
	IF EXISTS (SELECT 1 FROM sbpg.subscriptions s WHERE s.name = create_subscription.name) THEN
		RAISE EXCEPTION 'subscription "%" already exists', name
			USING ERRCODE = 'duplicate_object', HINT = 'Change it with sbpg.alter_subscription, or drop it first.';
	END IF;
	-- By default hold two batches: the next one is received while one applies, so transactions
	-- are full (see the docs on prefetch; bench/README.md has the figures).
	prefetch := coalesce(prefetch, least(batch_size, 2500) * 2);
	PERFORM sbpg._validate_subscription(name, namespace, entity, handler, run_as, identity, batch_size, prefetch,
	                                    notify_channel, options);
	IF identity IS NOT NULL THEN
		PERFORM sbpg._check_identity_usage(identity);
	END IF;
	INSERT INTO sbpg.subscriptions (name, namespace, entity, handler, handler_owner, run_as, identity, batch_size,
	                                prefetch, notify_channel, enabled, options, created_by)
	VALUES (name, namespace, entity, sbpg._function_text(handler),
	        (SELECT p.proowner FROM pg_proc p WHERE p.oid = handler), run_as, identity, batch_size, prefetch,
	        notify_channel, coalesce(enabled, true), coalesce(options, '{}'), sbpg._caller()::text);
END
$$;

CREATE OR REPLACE FUNCTION sbpg.alter_subscription(name text, namespace text DEFAULT NULL, entity text DEFAULT NULL,
	handler regprocedure DEFAULT NULL, run_as regrole DEFAULT NULL, identity text DEFAULT NULL,
	batch_size integer DEFAULT NULL, prefetch integer DEFAULT NULL, notify_channel text DEFAULT NULL,
	enabled boolean DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
	new_identity text;
	new_channel text;
	inbox_rows bigint;
	-- The handler kept when none is given: the function its text names now. Validation refuses it
	-- when there is none (dropped or renamed) or when another role owns it now: name it again.
	current_handler regprocedure;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = alter_subscription.name FOR UPDATE;
	-- One subscription per source: after the row lock (drop_subscription takes the row first too),
	-- so that the two never wait for each other in opposite orders.
	IF namespace IS NOT NULL OR entity IS NOT NULL THEN
		LOCK TABLE sbpg.subscriptions IN SHARE ROW EXCLUSIVE MODE;
	END IF;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', name
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin('alter subscription', s.run_as);
	IF run_as IS NOT NULL THEN
		PERFORM sbpg._check_admin('alter subscription', run_as);
	END IF;
	IF handler IS NULL THEN
		current_handler := sbpg._resolve_function(s.handler);
		IF current_handler IS NULL THEN
			RAISE EXCEPTION 'handler % of subscription "%" does not exist', s.handler, s.name
				USING ERRCODE = 'undefined_function',
				      HINT = 'Name the handler again: sbpg.alter_subscription(name, handler => ...).';
		END IF;
		IF (SELECT p.proowner FROM pg_proc p WHERE p.oid = current_handler) IS DISTINCT FROM s.handler_owner THEN
			RAISE EXCEPTION 'handler % of subscription "%" is now owned by another role', s.handler, s.name
				USING ERRCODE = 'insufficient_privilege',
				      DETAIL = format('It was owned by %s when the subscription named it.', coalesce(s.handler_owner::text, 'nobody known')),
				      HINT = 'If that function is the one to run, name it again: sbpg.alter_subscription(name, handler => ...).';
		END IF;
	END IF;
	-- '' clears identity and notify_channel (NULL means "unchanged" here).
	new_identity := CASE WHEN identity IS NULL THEN s.identity WHEN identity = '' THEN NULL ELSE identity END;
	new_channel := CASE WHEN notify_channel IS NULL THEN s.notify_channel WHEN notify_channel = '' THEN NULL ELSE notify_channel END;
	IF batch_size IS NOT NULL AND prefetch IS NULL AND s.prefetch < batch_size THEN
		prefetch := least(batch_size, 2500) * 2;
	END IF;
	PERFORM sbpg._validate_subscription(s.name, coalesce(namespace, s.namespace), coalesce(entity, s.entity),
		coalesce(handler, current_handler), coalesce(run_as, s.run_as), new_identity, coalesce(batch_size, s.batch_size),
		coalesce(prefetch, s.prefetch), new_channel, coalesce(options, s.options), s.options);
	IF new_identity IS DISTINCT FROM s.identity THEN
		PERFORM sbpg._check_identity_usage(new_identity);
	END IF;
	-- The inbox is keyed by the source's sequence numbers: a new source starts a new inbox.
	IF sbpg._source_key(coalesce(namespace, s.namespace), coalesce(entity, s.entity))
	   IS DISTINCT FROM sbpg._source_key(s.namespace, s.entity) THEN
		DELETE FROM sbpg.inbox i WHERE i.subscription = s.name;
		GET DIAGNOSTICS inbox_rows = ROW_COUNT;
		DELETE FROM sbpg.retries r WHERE r.subscription = s.name;
		DELETE FROM sbpg.session_states t WHERE t.subscription = s.name;
		RAISE NOTICE 'subscription "%" now reads another source; its % inbox rows were removed', s.name, inbox_rows;
	END IF;
	UPDATE sbpg.subscriptions x SET
		namespace = coalesce(alter_subscription.namespace, s.namespace),
		entity = coalesce(alter_subscription.entity, s.entity),
		handler = CASE WHEN alter_subscription.handler IS NULL THEN s.handler
		               ELSE sbpg._function_text(alter_subscription.handler) END,
		handler_owner = CASE WHEN alter_subscription.handler IS NULL THEN s.handler_owner
		                     ELSE (SELECT p.proowner FROM pg_proc p WHERE p.oid = alter_subscription.handler) END,
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

-- A namespace as subscriptions and publishers accept it: a Service Bus host name, or an AMQP URL.
CREATE FUNCTION sbpg._check_namespace(namespace text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;
REVOKE ALL ON FUNCTION sbpg._check_namespace(text) FROM PUBLIC;

-- A handler may take the whole batch: (sbpg.message[]) RETURNS void (issue 14). The rest of the
-- validation is 0.1's, unchanged (the namespace checked by sbpg._check_namespace, which publishers
-- share).
CREATE OR REPLACE FUNCTION sbpg._validate_subscription(name text, namespace text, entity text, handler regprocedure,
	run_as regrole, identity text, batch_size integer, prefetch integer, notify_channel text, options jsonb,
	old_options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	p pg_proc;
	ident sbpg.identities;
	k text;
	lim record;
	other text;
	caller regrole := sbpg._caller();
BEGIN
	IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid subscription name %', coalesce(quote_literal(name), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	PERFORM sbpg._check_namespace(namespace);
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
	-- One subscription per source in a database: each recognises redeliveries by its own inbox, so
	-- two on one entity would each apply what the other had applied (docs/scaling.md).
	SELECT o.name INTO other FROM sbpg.subscriptions o
	WHERE o.name <> _validate_subscription.name
	  AND sbpg._source_key(o.namespace, o.entity) = sbpg._source_key(_validate_subscription.namespace, _validate_subscription.entity);
	IF FOUND THEN
		RAISE EXCEPTION 'subscription "%" already consumes % from %', other, entity, namespace
			USING ERRCODE = 'duplicate_object',
			      DETAIL = 'Each subscription recognises redelivered messages by its own inbox: a second one on the same entity would apply again messages the first had applied.',
			      HINT = format('To consume the entity faster, give subscription "%s" more workers (options => ''{"workers": 4}''); for another handler, give it a topic subscription of its own.', other);
	END IF;
	SELECT * INTO p FROM pg_proc WHERE oid = handler;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'handler function does not exist' USING ERRCODE = 'undefined_function';
	END IF;
	IF p.prokind <> 'f' OR p.pronargs <> 1 OR p.proargtypes[0] NOT IN ('sbpg.message'::regtype, 'sbpg.message[]'::regtype)
	   OR p.prorettype <> 'void'::regtype OR p.proretset THEN
		RAISE EXCEPTION 'handler % has the wrong signature', handler
			USING ERRCODE = 'invalid_function_definition',
			      DETAIL = format('It takes (%s) and returns %s%s.', pg_get_function_identity_arguments(handler),
			                      CASE WHEN p.proretset THEN 'setof ' ELSE '' END, p.prorettype::regtype),
			      HINT = 'A handler is declared as CREATE FUNCTION name(msg sbpg.message) RETURNS void, or, to take a whole batch, CREATE FUNCTION name(msgs sbpg.message[]) RETURNS void.';
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
		IF k = 'sessions' THEN
			IF jsonb_typeof(options -> k) <> 'boolean' THEN
				RAISE EXCEPTION 'subscription option "sessions" must be true or false'
					USING ERRCODE = 'invalid_parameter_value',
					      DETAIL = 'true receives sessions from the start; false never does; without it, sessions are received when the entity requires them.',
					      HINT = 'docs/scaling.md explains sessions.';
			END IF;
			CONTINUE;
		END IF;
		IF k = 'session_failure' THEN
			IF jsonb_typeof(options -> k) <> 'string' OR options ->> k NOT IN ('dead_letter', 'stop') THEN
				RAISE EXCEPTION 'invalid value % for subscription option "session_failure"', options -> k
					USING ERRCODE = 'invalid_parameter_value',
					      DETAIL = 'session_failure is "dead_letter" (the default: the message is dead-lettered and its session goes on) or "stop" (the session stops until sbpg.resume_session).',
					      HINT = 'docs/scaling.md explains sessions.';
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
			('handler_timeout_ms', 100, 3600000, 'how long tenant code (handler, upcasts, mapping) may run for one message, in milliseconds', 30000),
			('max_sessions', 1, 256, 'how many sessions the worker holds at once', 8),
			('session_idle_ms', 100, 3600000, 'how long a session without messages is held before it is released for the next, in milliseconds', 5000),
			('workers', 1, 64, 'how many background workers consume the subscription''s entity together', 1))
			AS t(key, lo, hi, what, dflt) WHERE t.key = k;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'unknown subscription option "%"', k
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'Subscription options: max_retries, retry_base_ms, retry_cap_ms, retry_hold_ms, max_lock_renewal_s, handler_timeout_ms, schemas, unknown_types, version_property, sessions, max_sessions, session_idle_ms, session_failure, workers, allow_superuser_run_as.';
		END IF;
		IF jsonb_typeof(options -> k) <> 'number' OR (options ->> k) !~ '^[0-9]+$' OR (options ->> k)::numeric NOT BETWEEN lim.lo AND lim.hi THEN
			RAISE EXCEPTION 'subscription option "%" must be an integer from % to %', k, lim.lo, lim.hi
				USING ERRCODE = 'invalid_parameter_value', DETAIL = format('%s is %s; %s was given.', k, lim.what, options -> k),
				      HINT = format('Leave it out for the default, %s. %s', lim.dflt,
				                    CASE WHEN k IN ('max_sessions', 'session_idle_ms', 'workers') THEN 'docs/scaling.md explains sessions and workers.'
				                         ELSE 'docs/retries.md explains the retry policy.' END);
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

-- W3C trace context (docs/monitoring.md): the traceparent a producer attached (the application
-- property "traceparent", else the Azure SDKs' "Diagnostic-Id" of the same form), handed to the
-- handler and kept with the message's outcome. NULL when the message carried none.
-- CASCADE: a table a user created OF sbpg.message gets the column too.
ALTER TYPE sbpg.message ADD ATTRIBUTE traceparent text CASCADE;
ALTER TABLE sbpg.inbox ADD COLUMN traceparent text;
COMMENT ON COLUMN sbpg.inbox.traceparent IS 'W3C traceparent the message carried (traceparent or Diagnostic-Id application property)';

-- Per subscription and minute, what its worker did: written by the worker when the minute is over,
-- removed by it after sbpg.stats_history_retention (24 hours by default). Readable through
-- sbpg.stats_history, which shows each caller what sbpg.stats shows it.
CREATE TABLE sbpg.stats_minutes (
	subscription text NOT NULL REFERENCES sbpg.subscriptions (name) ON DELETE CASCADE,
	minute timestamptz NOT NULL, -- its start
	received bigint NOT NULL,
	applied bigint NOT NULL,
	dead_lettered bigint NOT NULL,
	duplicates bigint NOT NULL,
	retries bigint NOT NULL,
	batches bigint NOT NULL,
	apply_ms_p50 double precision,
	apply_ms_p99 double precision,
	lag_ms_p50 double precision,
	lag_ms_p99 double precision,
	PRIMARY KEY (subscription, minute)
);
COMMENT ON TABLE sbpg.stats_minutes IS 'Storage of sbpg.stats_history: one row per subscription and minute, written by its worker';
REVOKE ALL ON sbpg.stats_minutes FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('sbpg.stats_minutes', '');

CREATE FUNCTION sbpg._stats_history(
	OUT subscription text, OUT minute timestamptz, OUT received bigint, OUT applied bigint,
	OUT dead_lettered bigint, OUT duplicates bigint, OUT retries bigint, OUT batches bigint,
	OUT messages_per_second double precision,
	OUT apply_ms_p50 double precision, OUT apply_ms_p99 double precision,
	OUT lag_ms_p50 double precision, OUT lag_ms_p99 double precision)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT h.subscription, h.minute, h.received, h.applied, h.dead_lettered, h.duplicates, h.retries, h.batches,
       (h.applied OPERATOR(pg_catalog.+) h.dead_lettered OPERATOR(pg_catalog.+) h.duplicates)::pg_catalog.float8
           OPERATOR(pg_catalog./) 60,
       h.apply_ms_p50, h.apply_ms_p99, h.lag_ms_p50, h.lag_ms_p99
FROM sbpg.stats_minutes h
JOIN sbpg.subscriptions s ON s.name OPERATOR(pg_catalog.=) h.subscription
CROSS JOIN (SELECT sbpg._caller() AS who) c
-- Only the period the setting keeps (rows of a subscription whose worker no longer runs, or
-- written before the period was shortened, stay in the table until a worker removes them).
WHERE h.minute OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(mins =>
          coalesce((SELECT g.setting::pg_catalog.int4 FROM pg_catalog.pg_settings g
                    WHERE g.name OPERATOR(pg_catalog.=) 'sbpg.stats_history_retention'), 1440)))
  AND ((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) c.who)
   OR pg_catalog.pg_has_role(c.who, 'sbpg_monitor', 'MEMBER')
   OR pg_catalog.pg_has_role(c.who, s.run_as, 'MEMBER'))
$$;
REVOKE ALL ON FUNCTION sbpg._stats_history() FROM PUBLIC;
CREATE VIEW sbpg.stats_history AS SELECT * FROM sbpg._stats_history();
COMMENT ON VIEW sbpg.stats_history IS 'Per subscription and minute (the last 24 hours by default): received, applied, dead-lettered, retries, messages/s, apply and lag percentiles';
GRANT SELECT ON sbpg.stats_history TO sbpg_monitor, sbpg_admin;
GRANT EXECUTE ON FUNCTION sbpg._stats_history() TO sbpg_monitor, sbpg_admin;

-- The inbox churns: every message inserts a row, stamps it once the broker confirms the
-- settlement, and retention deletes it. Half-full pages leave room for the stamp on the row's own
-- page, so it is a HOT update (no new index entries; the old version is pruned on the page without
-- VACUUM), and autovacuum starts early and runs unthrottled on this table, so that dead rows from
-- retention do not pile up at sustained rates (bench/retention.sh; docs/retries.md, Retention).
-- Pages written before this update keep their fill.
ALTER TABLE sbpg.inbox SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02,
                            autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);

-- Session state (issue 15, docs/scaling.md "Session state"): what a handler keeps for the session of
-- the message it applies. Written in the handler's transaction (so the next message of the session
-- sees it only after that commit, and a rollback loses it), then copied to the broker's session
-- state (set-session-state) once the commit is durable: `version` counts the writes, `synced_version`
-- is the last one the broker accepted.
CREATE TABLE sbpg.session_states (
	subscription text NOT NULL REFERENCES sbpg.subscriptions (name) ON DELETE CASCADE,
	session_id text NOT NULL,
	state bytea,
	version bigint NOT NULL DEFAULT 1,
	synced_version bigint NOT NULL DEFAULT 0,
	updated_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (subscription, session_id)
);
CREATE INDEX session_states_unsynced ON sbpg.session_states (subscription) WHERE version <> synced_version;
COMMENT ON TABLE sbpg.session_states IS 'Session state set by handlers (sbpg.set_session_state), mirrored to the broker after commit';
REVOKE ALL ON sbpg.session_states FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('sbpg.session_states', '');

-- The subscription and session of a message the calling worker is applying now ({subscription,
-- session_id}), or NULL: outside a worker's handler call, or a session that is not among the
-- messages of the call. session_id NULL: the session of the call's messages, when they have one.
-- for_write tells the worker to copy changed states to the broker after the commit.
CREATE FUNCTION sbpg._applying_session(session_id text, for_write boolean) RETURNS text[]
	LANGUAGE C VOLATILE AS 'MODULE_PATHNAME', 'sbpg_applying_session';
REVOKE ALL ON FUNCTION sbpg._applying_session(text, boolean) FROM PUBLIC;

CREATE FUNCTION sbpg.session_state(session_id text DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	k text[] := sbpg._applying_session(session_id, false);
BEGIN
	IF k IS NULL THEN
		RAISE EXCEPTION 'sbpg.session_state() is for a handler applying a message of that session'
			USING ERRCODE = 'object_not_in_prerequisite_state',
			      DETAIL = CASE WHEN session_id IS NULL THEN 'No message of one session is being applied by this call.'
			                    ELSE format('No message of session %s is being applied by this call.', quote_literal(session_id)) END,
			      HINT = 'Call it from a handler of a subscription on a session-enabled entity; a set-based handler whose batch holds several sessions names one: sbpg.session_state(m.session_id).';
	END IF;
	RETURN (SELECT t.state FROM sbpg.session_states t WHERE t.subscription = k[1] AND t.session_id = k[2]);
END
$$;
COMMENT ON FUNCTION sbpg.session_state(text) IS 'The state of the session of the message being applied (as of this transaction), or NULL';

CREATE FUNCTION sbpg.set_session_state(state bytea, session_id text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
	k text[] := sbpg._applying_session(set_session_state.session_id, true);
BEGIN
	IF k IS NULL THEN
		RAISE EXCEPTION 'sbpg.set_session_state() is for a handler applying a message of that session'
			USING ERRCODE = 'object_not_in_prerequisite_state',
			      DETAIL = CASE WHEN set_session_state.session_id IS NULL THEN 'No message of one session is being applied by this call.'
			                    ELSE format('No message of session %s is being applied by this call.', quote_literal(set_session_state.session_id)) END,
			      HINT = 'Call it from a handler of a subscription on a session-enabled entity; a set-based handler whose batch holds several sessions names one: sbpg.set_session_state(state, m.session_id).';
	END IF;
	INSERT INTO sbpg.session_states AS t (subscription, session_id, state)
	VALUES (k[1], k[2], set_session_state.state)
	ON CONFLICT (subscription, session_id) DO UPDATE
		SET state = excluded.state, version = t.version OPERATOR(pg_catalog.+) 1, updated_at = now();
END
$$;
COMMENT ON FUNCTION sbpg.set_session_state(bytea, text) IS 'Replaces the state of the session of the message being applied; the broker''s copy follows after commit';

-- Stopped sessions (issue 15, docs/scaling.md "When a session's message fails for good"): with the
-- subscription option session_failure = 'stop', a message of a session that fails permanently is
-- not dead-lettered; its retry row waits for ever (next_attempt_at = infinity, stopped) and holds
-- back its session until sbpg.resume_session tries it again (or dead-letters it).
ALTER TABLE sbpg.retries ADD COLUMN session_id text, ADD COLUMN stopped boolean NOT NULL DEFAULT false,
	ADD COLUMN dead_letter boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN sbpg.retries.stopped IS 'the message failed for good and stopped its session (session_failure = stop) until sbpg.resume_session';
COMMENT ON COLUMN sbpg.retries.dead_letter IS 'sbpg.resume_session(..., dead_letter => true) asked for the stopped message to be dead-lettered';
CREATE INDEX retries_stopped ON sbpg.retries (subscription, session_id) WHERE stopped;

CREATE FUNCTION sbpg._stopped_sessions(OUT subscription text, OUT session_id text, OUT sequence_number bigint,
	OUT message_id text, OUT attempts integer, OUT stopped_at timestamptz, OUT reason text)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT r.subscription, r.session_id, r.sequence_number, r.message_id, r.attempts, r.last_failed_at, r.last_error
FROM sbpg.retries r
JOIN sbpg.subscriptions s ON s.name OPERATOR(pg_catalog.=) r.subscription
CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE r.stopped
  AND ((SELECT g.rolsuper FROM pg_catalog.pg_roles g WHERE g.oid OPERATOR(pg_catalog.=) c.who)
   OR pg_catalog.pg_has_role(c.who, 'sbpg_monitor', 'MEMBER')
   OR pg_catalog.pg_has_role(c.who, s.run_as, 'MEMBER'))
$$;
REVOKE ALL ON FUNCTION sbpg._stopped_sessions() FROM PUBLIC;
CREATE VIEW sbpg.stopped_sessions AS SELECT * FROM sbpg._stopped_sessions();
COMMENT ON VIEW sbpg.stopped_sessions IS 'Sessions stopped by a message that failed for good (session_failure = stop), until sbpg.resume_session';
GRANT SELECT ON sbpg.stopped_sessions TO sbpg_monitor, sbpg_admin;
GRANT EXECUTE ON FUNCTION sbpg._stopped_sessions() TO sbpg_monitor, sbpg_admin;

CREATE FUNCTION sbpg.resume_session(subscription text, session_id text, dead_letter boolean DEFAULT false)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
	s sbpg.subscriptions;
	n integer;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = resume_session.subscription;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', resume_session.subscription
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin('resume session', s.run_as);
	-- Tried again with a fresh retry budget (a message stopped by MaxRetriesExceeded would
	-- otherwise get one attempt), or dead-lettered.
	UPDATE sbpg.retries r
	SET next_attempt_at = now(), stopped = false, dead_letter = coalesce(resume_session.dead_letter, false),
	    attempts = CASE WHEN coalesce(resume_session.dead_letter, false) THEN r.attempts ELSE 0 END
	WHERE r.subscription = s.name AND r.session_id = resume_session.session_id AND r.stopped;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n = 0 THEN
		RAISE EXCEPTION 'session % of subscription "%" is not stopped', quote_literal(resume_session.session_id), s.name
			USING ERRCODE = 'object_not_in_prerequisite_state',
			      HINT = 'SELECT * FROM sbpg.stopped_sessions lists the stopped sessions.';
	END IF;
	RETURN n;
END
$$;
COMMENT ON FUNCTION sbpg.resume_session(text, text, boolean) IS 'Tries the message that stopped a session again (or dead-letters it, with dead_letter => true); the session then goes on';
REVOKE ALL ON FUNCTION sbpg.resume_session(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg.resume_session(text, text, boolean) TO sbpg_admin;

-- Several workers per subscription (issue 15, docs/scaling.md "Several workers"): the slots name
-- their worker's number; sbpg.stats keeps one row per subscription, its workers' totals, and
-- sbpg.stats_workers shows each worker.
DROP VIEW sbpg.stats;
DROP FUNCTION sbpg._stats();
DROP FUNCTION sbpg._worker_stats();
CREATE FUNCTION sbpg._worker_stats(
	OUT subscription text, OUT worker integer, OUT state text, OUT pid integer, OUT connected_since timestamptz,
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
REVOKE ALL ON FUNCTION sbpg._worker_stats() FROM PUBLIC;

-- One row per subscription: its workers summed (counters, rates), the state of the worker that
-- most needs attention (one not connected, the lowest number first), worker 0's pid, the latest
-- error, and the highest of the workers' percentiles (percentiles of parts do not combine).
CREATE FUNCTION sbpg._stats(
	OUT subscription text, OUT enabled boolean, OUT state text, OUT pid integer, OUT connected_since timestamptz,
	OUT received bigint, OUT applied bigint, OUT dead_lettered bigint, OUT duplicates bigint, OUT abandoned bigint,
	OUT batches bigint, OUT settle_failures bigint, OUT reconnects bigint, OUT last_error text, OUT last_error_at timestamptz,
	OUT apply_ms_p50 double precision, OUT apply_ms_p99 double precision,
	OUT lag_ms_p50 double precision, OUT lag_ms_p99 double precision, OUT messages_per_second double precision,
	OUT token_expires_at timestamptz, OUT tokens_put bigint, OUT token_subject text, OUT token_error text,
	OUT last_batch_at timestamptz, OUT retries bigint, OUT retried_messages bigint, OUT max_retries_exceeded bigint,
	OUT waiting_retry integer, OUT deferred bigint, OUT lock_renewals bigint, OUT locks_lost bigint,
	OUT workers integer)
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
       w.lock_renewals, w.locks_lost, w.workers
FROM sbpg.subscriptions s
CROSS JOIN LATERAL (
	SELECT (array_agg(x.state ORDER BY x.state = 'connected', x.worker))[1] AS state,
	       (array_agg(x.pid ORDER BY x.worker))[1] AS pid,
	       min(x.connected_since) AS connected_since,
	       sum(x.received)::bigint AS received, sum(x.applied)::bigint AS applied,
	       sum(x.dead_lettered)::bigint AS dead_lettered, sum(x.duplicates)::bigint AS duplicates,
	       sum(x.abandoned)::bigint AS abandoned, sum(x.batches)::bigint AS batches,
	       sum(x.settle_failures)::bigint AS settle_failures, sum(x.reconnects)::bigint AS reconnects,
	       (array_agg(x.last_error ORDER BY x.last_error_at DESC NULLS LAST))[1] AS last_error,
	       max(x.last_error_at) AS last_error_at,
	       max(x.apply_ms_p50) AS apply_ms_p50, max(x.apply_ms_p99) AS apply_ms_p99,
	       max(x.lag_ms_p50) AS lag_ms_p50, max(x.lag_ms_p99) AS lag_ms_p99,
	       sum(x.messages_per_second) AS messages_per_second,
	       min(x.token_expires_at) AS token_expires_at, sum(x.tokens_put)::bigint AS tokens_put,
	       (array_agg(x.token_subject ORDER BY x.worker))[1] AS token_subject,
	       (array_agg(x.token_error ORDER BY x.token_error IS NULL, x.worker))[1] AS token_error,
	       max(x.last_batch_at) AS last_batch_at,
	       sum(x.retries)::bigint AS retries, sum(x.retried_messages)::bigint AS retried_messages,
	       sum(x.max_retries_exceeded)::bigint AS max_retries_exceeded,
	       sum(x.waiting_retry)::integer AS waiting_retry, sum(x.deferred)::bigint AS deferred,
	       sum(x.lock_renewals)::bigint AS lock_renewals, sum(x.locks_lost)::bigint AS locks_lost,
	       count(*)::integer AS workers
	FROM sbpg._worker_stats() x
	WHERE x.subscription = s.name) w
CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE (SELECT rolsuper FROM pg_roles WHERE oid = c.who)
   OR pg_has_role(c.who, 'sbpg_monitor', 'MEMBER')
   OR pg_has_role(c.who, s.run_as, 'MEMBER')
$$;
REVOKE ALL ON FUNCTION sbpg._stats() FROM PUBLIC;
CREATE VIEW sbpg.stats AS SELECT * FROM sbpg._stats();
COMMENT ON VIEW sbpg.stats IS 'Per subscription (its workers together): worker state, counters, latency and lag percentiles, throughput';
GRANT SELECT ON sbpg.stats TO sbpg_monitor, sbpg_admin;
GRANT EXECUTE ON FUNCTION sbpg._stats() TO sbpg_monitor, sbpg_admin;

CREATE FUNCTION sbpg._stats_workers(
	OUT subscription text, OUT worker integer, OUT state text, OUT pid integer, OUT connected_since timestamptz,
	OUT received bigint, OUT applied bigint, OUT dead_lettered bigint, OUT duplicates bigint,
	OUT batches bigint, OUT reconnects bigint, OUT last_error text, OUT last_error_at timestamptz,
	OUT apply_ms_p50 double precision, OUT apply_ms_p99 double precision,
	OUT lag_ms_p50 double precision, OUT lag_ms_p99 double precision,
	OUT messages_per_second double precision, OUT last_batch_at timestamptz, OUT retries bigint,
	OUT waiting_retry integer, OUT lock_renewals bigint, OUT locks_lost bigint)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT x.subscription, x.worker, x.state, x.pid, x.connected_since, x.received, x.applied, x.dead_lettered,
       x.duplicates, x.batches, x.reconnects, x.last_error, x.last_error_at, x.apply_ms_p50, x.apply_ms_p99,
       x.lag_ms_p50, x.lag_ms_p99, x.messages_per_second, x.last_batch_at, x.retries, x.waiting_retry,
       x.lock_renewals, x.locks_lost
FROM sbpg._worker_stats() x
JOIN sbpg.subscriptions s ON s.name = x.subscription
CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE (SELECT rolsuper FROM pg_roles WHERE oid = c.who)
   OR pg_has_role(c.who, 'sbpg_monitor', 'MEMBER')
   OR pg_has_role(c.who, s.run_as, 'MEMBER')
ORDER BY x.subscription, x.worker
$$;
REVOKE ALL ON FUNCTION sbpg._stats_workers() FROM PUBLIC;
CREATE VIEW sbpg.stats_workers AS SELECT * FROM sbpg._stats_workers();
COMMENT ON VIEW sbpg.stats_workers IS 'Per worker of each subscription (the option workers): state, counters, latency, throughput';
GRANT SELECT ON sbpg.stats_workers TO sbpg_monitor, sbpg_admin;
GRANT EXECUTE ON FUNCTION sbpg._stats_workers() TO sbpg_monitor, sbpg_admin;

-- ---------------------------------------------------------------------------------------------
-- The way back (issue 16): a transactional outbox. sbpg.send queues a message in the caller's
-- transaction (one row in sbpg.outbox, no network); a publisher's background worker sends the rows
-- of committed transactions to Service Bus in AMQP batches, in commit order per entity, and marks
-- each sent (or failed, with the reason) once the broker answered. docs/outbox.md.


CREATE TABLE sbpg.publishers (
	name text PRIMARY KEY,
	namespace text NOT NULL,
	identity text REFERENCES sbpg.identities (name),
	notify_channel text,
	enabled boolean NOT NULL DEFAULT true,
	options jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
	created_at timestamptz NOT NULL DEFAULT now(),
	updated_at timestamptz NOT NULL DEFAULT now(),
	created_by name NOT NULL
);
COMMENT ON TABLE sbpg.publishers IS 'Namespaces sbpg sends to (sbpg.send), each with its identity and background worker';
CREATE TRIGGER publishers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sbpg.publishers
	FOR EACH STATEMENT EXECUTE FUNCTION sbpg._config_changed();
REVOKE ALL ON sbpg.publishers FROM PUBLIC;
GRANT SELECT ON sbpg.publishers TO sbpg_admin, sbpg_monitor;

-- Who besides superusers and the publisher's creator may send through it.
CREATE TABLE sbpg.publisher_grants (
	publisher text NOT NULL REFERENCES sbpg.publishers (name) ON DELETE CASCADE ON UPDATE CASCADE,
	grantee regrole NOT NULL,
	granted_by name NOT NULL,
	granted_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (publisher, grantee)
);
COMMENT ON TABLE sbpg.publisher_grants IS 'Roles whose members may send through a publisher (sbpg.grant_publisher)';
REVOKE ALL ON sbpg.publisher_grants FROM PUBLIC;
GRANT SELECT ON sbpg.publisher_grants TO sbpg_admin, sbpg_monitor;

-- One row per queued message. status: queued (waits for its transaction's commit, then for the
-- publisher), sent (the broker accepted it), failed (for good: error says why). xid is the queuing
-- transaction's top-level id, which the publisher uses to find rows whose transactions committed
-- after it last looked (src/pg/publisher.cpp).
CREATE TABLE sbpg.outbox (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	publisher text NOT NULL REFERENCES sbpg.publishers (name) ON DELETE CASCADE ON UPDATE CASCADE,
	entity text NOT NULL,
	message_id text NOT NULL,
	body bytea NOT NULL,
	content_type text,
	correlation_id text,
	session_id text,
	subject text,
	reply_to text,
	properties jsonb,
	time_to_live interval,
	scheduled_at timestamptz,
	traceparent text,
	queued_by regrole NOT NULL,
	queued_at timestamptz NOT NULL DEFAULT now(),
	xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
	status text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
	attempts integer NOT NULL DEFAULT 0,
	last_attempt_at timestamptz,
	sent_at timestamptz,
	sequence_number bigint,
	error text
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
CREATE INDEX outbox_queued ON sbpg.outbox (publisher, id) WHERE status = 'queued';
CREATE INDEX outbox_sent ON sbpg.outbox (sent_at) WHERE status = 'sent';
COMMENT ON TABLE sbpg.outbox IS 'Messages queued by sbpg.send: queued until their transaction commits and the broker accepts them, then sent (or failed, with the reason)';
REVOKE ALL ON sbpg.outbox FROM PUBLIC;
GRANT SELECT ON sbpg.outbox TO sbpg_monitor, sbpg_admin;

CREATE FUNCTION sbpg._check_publisher_options(opts jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	k text;
BEGIN
	IF opts IS NULL OR jsonb_typeof(opts) <> 'object' THEN
		RAISE EXCEPTION 'publisher options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	FOR k IN SELECT jsonb_object_keys(opts) LOOP
		IF k NOT IN ('batch_size', 'max_pending') THEN
			RAISE EXCEPTION 'unknown publisher option "%"', k
				USING ERRCODE = 'invalid_parameter_value',
				      HINT = 'Publisher options: batch_size (messages sent back to back before waiting for the broker''s answers, 1 to 1000), max_pending (rows held in memory, 100 to 100000).';
		END IF;
	END LOOP;
	IF opts ? 'batch_size' AND (jsonb_typeof(opts -> 'batch_size') <> 'number' OR (opts ->> 'batch_size')::numeric NOT BETWEEN 1 AND 1000
	                            OR (opts ->> 'batch_size')::numeric % 1 <> 0) THEN
		RAISE EXCEPTION 'option batch_size must be an integer from 1 to 1000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF opts ? 'max_pending' AND (jsonb_typeof(opts -> 'max_pending') <> 'number' OR (opts ->> 'max_pending')::numeric NOT BETWEEN 100 AND 100000
	                             OR (opts ->> 'max_pending')::numeric % 1 <> 0) THEN
		RAISE EXCEPTION 'option max_pending must be an integer from 100 to 100000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
END
$$;
REVOKE ALL ON FUNCTION sbpg._check_publisher_options(jsonb) FROM PUBLIC;

-- Raises unless the publisher exists and the caller is a superuser or the role that created it.
CREATE FUNCTION sbpg._check_publisher_owner(publisher text, action text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
	creator name;
BEGIN
	SELECT p.created_by INTO creator FROM sbpg.publishers p WHERE p.name = publisher;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'publisher "%" does not exist', publisher
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.publishers lists them.';
	END IF;
	IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.oid = caller) AND creator IS DISTINCT FROM caller::text THEN
		RAISE EXCEPTION 'permission denied to % publisher "%"', action, publisher
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = format('Publisher "%s" was created by %s; only its creator and superusers may %s it.', publisher, creator, action);
	END IF;
END
$$;
REVOKE ALL ON FUNCTION sbpg._check_publisher_owner(text, text) FROM PUBLIC;

CREATE FUNCTION sbpg._validate_publisher(name text, namespace text, identity text, notify_channel text, options jsonb)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	ident sbpg.identities;
BEGIN
	IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]{1,48}$' THEN
		RAISE EXCEPTION 'invalid publisher name %', coalesce(quote_literal(name), 'NULL')
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 48 letters, digits, "_", "." or "-".';
	END IF;
	PERFORM sbpg._check_namespace(namespace);
	IF notify_channel IS NOT NULL AND (notify_channel = '' OR octet_length(notify_channel) > 63) THEN
		RAISE EXCEPTION 'invalid notify channel %', quote_literal(notify_channel)
			USING ERRCODE = 'invalid_parameter_value', HINT = 'A channel name has 1 to 63 bytes; NULL sends no notifications.';
	END IF;
	PERFORM sbpg._check_publisher_options(options);
	IF identity IS NOT NULL THEN
		SELECT * INTO ident FROM sbpg.identities i WHERE i.name = identity;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'identity "%" does not exist', identity
				USING ERRCODE = 'undefined_object', HINT = 'Create it with sbpg.create_identity first.';
		END IF;
		-- An Entra ID token goes only to Service Bus over TLS, or to a broker the identity lists.
		IF ident.kind IN ('managed_identity', 'workload_identity', 'client_secret', 'default')
		   AND NOT (namespace ~* '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\.servicebus\.(windows\.net|chinacloudapi\.cn|usgovcloudapi\.net|cloudapi\.de)(:[0-9]{1,5})?/?$'
		            OR EXISTS (SELECT FROM jsonb_array_elements_text(ident.options -> 'allowed_namespaces') a
		                       WHERE lower(rtrim(a, '/')) = lower(rtrim(namespace, '/')))) THEN
			RAISE EXCEPTION 'identity "%" sends Entra ID tokens only to Service Bus namespaces', identity
				USING ERRCODE = 'insufficient_privilege',
				      DETAIL = format('%s is neither a Service Bus namespace reached over TLS nor listed in the identity''s allowed_namespaces.', namespace),
				      HINT = 'A superuser can list the broker in the identity''s option allowed_namespaces.';
		END IF;
	END IF;
END
$$;
REVOKE ALL ON FUNCTION sbpg._validate_publisher(text, text, text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION sbpg.create_publisher(name text, namespace text, identity text DEFAULT NULL,
	notify_channel text DEFAULT 'sbpg_sent', enabled boolean DEFAULT true, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('create publisher');
	IF EXISTS (SELECT 1 FROM sbpg.publishers p WHERE p.name = create_publisher.name) THEN
		RAISE EXCEPTION 'publisher "%" already exists', name
			USING ERRCODE = 'duplicate_object', HINT = 'Change it with sbpg.alter_publisher, or drop it first.';
	END IF;
	PERFORM sbpg._validate_publisher(name, namespace, identity, notify_channel, coalesce(options, '{}'));
	PERFORM sbpg._check_identity_usage(identity);
	INSERT INTO sbpg.publishers (name, namespace, identity, notify_channel, enabled, options, created_by)
	VALUES (name, namespace, identity, notify_channel, coalesce(enabled, true), coalesce(options, '{}'), sbpg._caller()::text);
END
$$;
COMMENT ON FUNCTION sbpg.create_publisher(text, text, text, text, boolean, jsonb)
	IS 'Registers a namespace sbpg.send can queue messages for, with the identity its worker sends as';

CREATE FUNCTION sbpg.alter_publisher(name text, namespace text DEFAULT NULL, identity text DEFAULT NULL,
	notify_channel text DEFAULT NULL, enabled boolean DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	p sbpg.publishers;
	new_identity text;
	new_channel text;
BEGIN
	PERFORM sbpg._check_admin('alter publisher');
	SELECT * INTO p FROM sbpg.publishers x WHERE x.name = alter_publisher.name FOR UPDATE;
	PERFORM sbpg._check_publisher_owner(name, 'alter');
	-- '' clears identity and notify_channel (NULL means "unchanged" here).
	new_identity := CASE WHEN identity IS NULL THEN p.identity WHEN identity = '' THEN NULL ELSE identity END;
	new_channel := CASE WHEN notify_channel IS NULL THEN p.notify_channel WHEN notify_channel = '' THEN NULL ELSE notify_channel END;
	PERFORM sbpg._validate_publisher(p.name, coalesce(namespace, p.namespace), new_identity, new_channel, coalesce(options, p.options));
	IF new_identity IS DISTINCT FROM p.identity THEN
		PERFORM sbpg._check_identity_usage(new_identity);
	END IF;
	UPDATE sbpg.publishers x SET namespace = coalesce(alter_publisher.namespace, p.namespace), identity = new_identity,
		notify_channel = new_channel, enabled = coalesce(alter_publisher.enabled, p.enabled),
		options = coalesce(alter_publisher.options, p.options), updated_at = now()
	WHERE x.name = p.name;
END
$$;

-- Refused while messages wait (nothing is dropped silently) unless discard_queued says so.
CREATE FUNCTION sbpg.drop_publisher(name text, discard_queued boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	waiting bigint;
BEGIN
	PERFORM sbpg._check_admin('drop publisher');
	PERFORM 1 FROM sbpg.publishers x WHERE x.name = drop_publisher.name FOR UPDATE;
	PERFORM sbpg._check_publisher_owner(name, 'drop');
	SELECT count(*) INTO waiting FROM sbpg.outbox o WHERE o.publisher = drop_publisher.name AND o.status = 'queued';
	IF waiting > 0 AND NOT coalesce(discard_queued, false) THEN
		RAISE EXCEPTION 'publisher "%" has % messages waiting to be sent', name, waiting
			USING ERRCODE = 'dependent_objects_still_exist',
			      DETAIL = 'Dropping the publisher would discard them; they are listed in sbpg.outbox with status queued.',
			      HINT = 'Wait until they are sent, or drop it with discard_queued => true.';
	END IF;
	IF waiting > 0 THEN
		RAISE WARNING 'publisher "%": % queued messages discarded', name, waiting;
	END IF;
	DELETE FROM sbpg.publishers x WHERE x.name = drop_publisher.name;
END
$$;

CREATE FUNCTION sbpg.grant_publisher(publisher text, grantee regrole)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('grant publisher');
	PERFORM sbpg._check_publisher_owner(publisher, 'grant');
	IF grantee IS NULL THEN
		RAISE EXCEPTION 'grantee must be given' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	INSERT INTO sbpg.publisher_grants (publisher, grantee, granted_by) VALUES (publisher, grantee, sbpg._caller()::text)
	ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION sbpg.grant_publisher(text, regrole) IS 'Lets members of a role send through a publisher (sbpg.send)';

CREATE FUNCTION sbpg.revoke_publisher(publisher text, grantee regrole)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('revoke publisher');
	PERFORM sbpg._check_publisher_owner(publisher, 'revoke');
	DELETE FROM sbpg.publisher_grants g WHERE g.publisher = revoke_publisher.publisher AND g.grantee = revoke_publisher.grantee;
END
$$;

-- The message a worker's handler applies now (one message: a per-message handler, or a set-based
-- call of one): {traceparent, message_id}; NULL elsewhere (src/pg/session_state.cpp).
CREATE FUNCTION sbpg._applying_message() RETURNS text[]
	AS 'MODULE_PATHNAME', 'sbpg_applying_message' LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION sbpg._applying_message() FROM PUBLIC;

-- Wakes the publisher's worker when the transaction commits (src/pg/publisher.cpp).
CREATE FUNCTION sbpg._wake_publisher(publisher text) RETURNS void
	AS 'MODULE_PATHNAME', 'sbpg_wake_publisher' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION sbpg._wake_publisher(text) FROM PUBLIC;

-- The one place a row enters the outbox. The overloads of sbpg.send call it with the body as bytes.
CREATE FUNCTION sbpg._queue(publisher text, entity text, body bytea, message_id text, content_type text,
	correlation_id text, session_id text, subject text, reply_to text, properties jsonb, time_to_live interval,
	scheduled_at timestamptz)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole := sbpg._caller();
	pub sbpg.publishers;
	applying text[];
	tp text;
	new_id bigint;
	k text;
BEGIN
	SELECT * INTO pub FROM sbpg.publishers p WHERE p.name = _queue.publisher;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'publisher "%" does not exist', publisher
			USING ERRCODE = 'undefined_object', HINT = 'An administrator creates publishers with sbpg.create_publisher.';
	END IF;
	IF NOT ((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = caller)
	        OR pub.created_by = caller::text
	        OR EXISTS (SELECT 1 FROM sbpg.publisher_grants g
	                   WHERE g.publisher = pub.name AND pg_has_role(caller, g.grantee, 'MEMBER'))) THEN
		RAISE EXCEPTION 'permission denied to send through publisher "%"', publisher
			USING ERRCODE = 'insufficient_privilege',
			      DETAIL = format('%s did not create publisher "%s" and belongs to no role it was granted to.', caller, publisher),
			      HINT = format('Its creator or a superuser can run SELECT sbpg.grant_publisher(%L, %L).', publisher, caller::text);
	END IF;
	IF entity IS NULL OR NOT (entity ~ '^[A-Za-z0-9][A-Za-z0-9._~/-]*$' AND length(entity) <= 260 AND entity !~ '//'
	                          AND entity !~ '/$' AND entity !~* '/(subscriptions|\$deadletterqueue)(/|$)') THEN
		RAISE EXCEPTION 'invalid entity %', coalesce(quote_literal(entity), 'NULL')
			USING ERRCODE = 'invalid_parameter_value',
			      DETAIL = 'Messages are sent to a queue or a topic.',
			      HINT = 'Name the queue or topic, e.g. ''orders'' (not a subscription or a dead-letter queue).';
	END IF;
	IF body IS NULL THEN
		RAISE EXCEPTION 'body must not be NULL' USING ERRCODE = 'null_value_not_allowed',
			HINT = 'Send an empty body as '''' or ''\x''::bytea.';
	END IF;
	IF properties IS NOT NULL THEN
		IF jsonb_typeof(properties) <> 'object' THEN
			RAISE EXCEPTION 'properties must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
				HINT = 'Application properties are names with string, number, boolean or null values, e.g. {"tenant": "eu"}.';
		END IF;
		FOR k IN SELECT e.key FROM jsonb_each(properties) e WHERE jsonb_typeof(e.value) IN ('object', 'array') LOOP
			RAISE EXCEPTION 'application property "%" is not a string, number, boolean or null', k
				USING ERRCODE = 'invalid_parameter_value', HINT = 'Service Bus application properties are simple values; send structure in the body.';
		END LOOP;
	END IF;
	IF message_id = '' OR octet_length(message_id) > 128 OR octet_length(session_id) > 128 OR session_id = ''
	   OR octet_length(correlation_id) > 128 OR octet_length(subject) > 128 OR octet_length(reply_to) > 128 THEN
		RAISE EXCEPTION 'message_id, session_id, correlation_id, subject and reply_to take 1 to 128 bytes'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'These are Service Bus''s limits; NULL leaves one out.';
	END IF;
	IF time_to_live IS NOT NULL AND (time_to_live <= interval '0' OR NOT isfinite(time_to_live)
	                                 OR time_to_live > interval '10000 days') THEN
		RAISE EXCEPTION 'time_to_live must be positive and finite' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Leave it NULL for the entity''s default time to live.';
	END IF;
	IF scheduled_at IS NOT NULL AND NOT isfinite(scheduled_at) THEN
		RAISE EXCEPTION 'scheduled_at must be a finite time' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Leave it NULL to send at once.';
	END IF;
	IF octet_length(content_type) > 128 OR content_type !~ '^[\x21-\x7e][\x20-\x7e]*$' THEN
		RAISE EXCEPTION 'content_type must be 1 to 128 printable ASCII characters' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'A MIME type such as application/json.';
	END IF;
	-- The publisher holds messages in memory while it sends them: one row is at most 1 MiB, the
	-- largest message a Premium namespace takes by default (Standard takes 256 KB).
	IF octet_length(body) > 1048576 THEN
		RAISE EXCEPTION 'body is % bytes; sbpg.send takes at most 1 MiB', octet_length(body)
			USING ERRCODE = 'program_limit_exceeded',
			      HINT = 'Store a large payload elsewhere and send a reference to it (the claim-check pattern).';
	END IF;
	-- Sent while a handler applies a message: carry its trace context and, unless given, its
	-- message id as correlation id.
	applying := sbpg._applying_message();
	IF applying IS NOT NULL THEN
		tp := applying[1];
		correlation_id := coalesce(correlation_id, applying[2]);
	END IF;
	INSERT INTO sbpg.outbox (publisher, entity, message_id, body, content_type, correlation_id, session_id, subject,
	                         reply_to, properties, time_to_live, scheduled_at, traceparent, queued_by)
	-- Service Bus entity names are case-insensitive: one spelling, so one line per entity.
	VALUES (pub.name, lower(entity), coalesce(message_id, gen_random_uuid()::text), body, content_type, correlation_id, session_id,
	        subject, reply_to, properties, time_to_live, scheduled_at, tp, caller)
	RETURNING id INTO new_id;
	PERFORM sbpg._wake_publisher(pub.name);
	RETURN new_id;
END
$$;
REVOKE ALL ON FUNCTION sbpg._queue(text, text, bytea, text, text, text, text, text, text, jsonb, interval, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg._queue(text, text, bytea, text, text, text, text, text, text, jsonb, interval, timestamptz) TO PUBLIC;

CREATE FUNCTION sbpg.send(publisher text, entity text, body jsonb, message_id text DEFAULT NULL,
	content_type text DEFAULT 'application/json', correlation_id text DEFAULT NULL, session_id text DEFAULT NULL,
	subject text DEFAULT NULL, reply_to text DEFAULT NULL, properties jsonb DEFAULT NULL,
	time_to_live interval DEFAULT NULL, scheduled_at timestamptz DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
	SELECT sbpg._queue(publisher, entity, convert_to(body::text, 'UTF8'), message_id, content_type, correlation_id,
	                   session_id, subject, reply_to, properties, time_to_live, scheduled_at)
$$;
CREATE FUNCTION sbpg.send(publisher text, entity text, body text, message_id text DEFAULT NULL,
	content_type text DEFAULT 'text/plain; charset=utf-8', correlation_id text DEFAULT NULL, session_id text DEFAULT NULL,
	subject text DEFAULT NULL, reply_to text DEFAULT NULL, properties jsonb DEFAULT NULL,
	time_to_live interval DEFAULT NULL, scheduled_at timestamptz DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
	SELECT sbpg._queue(publisher, entity, convert_to(body, 'UTF8'), message_id, content_type, correlation_id,
	                   session_id, subject, reply_to, properties, time_to_live, scheduled_at)
$$;
CREATE FUNCTION sbpg.send(publisher text, entity text, body bytea, message_id text DEFAULT NULL,
	content_type text DEFAULT NULL, correlation_id text DEFAULT NULL, session_id text DEFAULT NULL,
	subject text DEFAULT NULL, reply_to text DEFAULT NULL, properties jsonb DEFAULT NULL,
	time_to_live interval DEFAULT NULL, scheduled_at timestamptz DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
	SELECT sbpg._queue(publisher, entity, body, message_id, content_type, correlation_id,
	                   session_id, subject, reply_to, properties, time_to_live, scheduled_at)
$$;
COMMENT ON FUNCTION sbpg.send(text, text, jsonb, text, text, text, text, text, text, jsonb, interval, timestamptz)
	IS 'Queues a message for a publisher''s entity; sent after the transaction commits (docs/outbox.md). Returns the outbox row''s id';
GRANT EXECUTE ON FUNCTION sbpg.send(text, text, jsonb, text, text, text, text, text, text, jsonb, interval, timestamptz),
	sbpg.send(text, text, text, text, text, text, text, text, text, jsonb, interval, timestamptz),
	sbpg.send(text, text, bytea, text, text, text, text, text, text, jsonb, interval, timestamptz) TO PUBLIC;

-- A failed row queued again (after its cause was fixed), keeping its message id.
CREATE FUNCTION sbpg.requeue(publisher text, ids bigint[])
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	n bigint;
BEGIN
	PERFORM sbpg._check_admin('requeue outbox rows');
	PERFORM sbpg._check_publisher_owner(publisher, 'requeue for');
	UPDATE sbpg.outbox o SET status = 'queued', error = NULL, xid = pg_current_xact_id()
	WHERE o.publisher = requeue.publisher AND o.id = ANY (ids) AND o.status = 'failed';
	GET DIAGNOSTICS n = ROW_COUNT;
	PERFORM sbpg._wake_publisher(publisher);
	RETURN n;
END
$$;

-- Per-worker figures of the publishers (shared memory; src/pg/module.cpp).
CREATE FUNCTION sbpg._publisher_slots(
	OUT publisher text, OUT state text, OUT pid integer, OUT connected_since timestamptz, OUT sent bigint,
	OUT failed bigint, OUT batches bigint, OUT retries bigint, OUT reconnects bigint, OUT last_error text,
	OUT last_error_at timestamptz, OUT token_expires_at timestamptz, OUT accept_ms_p50 double precision,
	OUT accept_ms_p99 double precision, OUT messages_per_second double precision)
RETURNS SETOF record AS 'MODULE_PATHNAME', 'sbpg_publisher_slots' LANGUAGE C STABLE;
REVOKE ALL ON FUNCTION sbpg._publisher_slots() FROM PUBLIC;

-- What sbpg.publisher_stats shows a caller: every publisher to superusers, sbpg_monitor and
-- sbpg_admin members; to others the publishers they may send through.
CREATE FUNCTION sbpg._publisher_stats(
	OUT publisher text, OUT namespace text, OUT enabled boolean, OUT state text, OUT pid integer,
	OUT connected_since timestamptz, OUT queued bigint, OUT oldest_queued_at timestamptz, OUT oldest_age interval,
	OUT failed_rows bigint, OUT sent bigint, OUT failed bigint, OUT batches bigint, OUT retries bigint,
	OUT reconnects bigint, OUT last_error text, OUT last_error_at timestamptz, OUT token_expires_at timestamptz,
	OUT accept_ms_p50 double precision, OUT accept_ms_p99 double precision, OUT messages_per_second double precision)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT p.name, p.namespace, p.enabled, coalesce(w.state, CASE WHEN p.enabled THEN 'starting' ELSE 'stopped' END), w.pid,
       w.connected_since, q.queued, q.oldest, now() - q.oldest, f.failed_rows, coalesce(w.sent, 0), coalesce(w.failed, 0),
       coalesce(w.batches, 0), coalesce(w.retries, 0), coalesce(w.reconnects, 0), w.last_error, w.last_error_at,
       w.token_expires_at, w.accept_ms_p50, w.accept_ms_p99, coalesce(w.messages_per_second, 0)
FROM sbpg.publishers p
LEFT JOIN sbpg._publisher_slots() w ON w.publisher = p.name
CROSS JOIN LATERAL (SELECT count(*) AS queued, min(o.queued_at) AS oldest FROM sbpg.outbox o
                    WHERE o.publisher = p.name AND o.status = 'queued') q
CROSS JOIN LATERAL (SELECT count(*) AS failed_rows FROM sbpg.outbox o WHERE o.publisher = p.name AND o.status = 'failed') f
CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE (SELECT r.rolsuper FROM pg_roles r WHERE r.oid = c.who)
   OR pg_has_role(c.who, 'sbpg_monitor', 'MEMBER') OR pg_has_role(c.who, 'sbpg_admin', 'MEMBER')
   OR p.created_by = c.who::text
   OR EXISTS (SELECT 1 FROM sbpg.publisher_grants g WHERE g.publisher = p.name AND pg_has_role(c.who, g.grantee, 'MEMBER'))
ORDER BY p.name
$$;
REVOKE ALL ON FUNCTION sbpg._publisher_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg._publisher_stats() TO PUBLIC;
CREATE VIEW sbpg.publisher_stats AS SELECT * FROM sbpg._publisher_stats();
COMMENT ON VIEW sbpg.publisher_stats IS 'Per publisher: worker state, messages waiting and the oldest one''s age, failed rows, counters, commit-to-accepted latency';
GRANT SELECT ON sbpg.publisher_stats TO PUBLIC;

-- Rows that failed for good, with the reason: to superusers, sbpg_monitor and sbpg_admin members
-- every row; to others the rows their own roles queued.
CREATE FUNCTION sbpg._outbox_failures(
	OUT id bigint, OUT publisher text, OUT entity text, OUT message_id text, OUT session_id text,
	OUT queued_by regrole, OUT queued_at timestamptz, OUT attempts integer, OUT failed_at timestamptz, OUT error text)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT o.id, o.publisher, o.entity, o.message_id, o.session_id, o.queued_by, o.queued_at, o.attempts,
       o.last_attempt_at, o.error
FROM sbpg.outbox o CROSS JOIN (SELECT sbpg._caller() AS who) c
WHERE o.status = 'failed'
  AND ((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = c.who)
       OR pg_has_role(c.who, 'sbpg_monitor', 'MEMBER') OR pg_has_role(c.who, 'sbpg_admin', 'MEMBER')
       OR pg_has_role(c.who, o.queued_by, 'MEMBER'))
ORDER BY o.id
$$;
REVOKE ALL ON FUNCTION sbpg._outbox_failures() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg._outbox_failures() TO PUBLIC;
CREATE VIEW sbpg.outbox_failures AS SELECT * FROM sbpg._outbox_failures();
COMMENT ON VIEW sbpg.outbox_failures IS 'Queued messages the broker refused for good (unknown entity, not authorised, too large), with the reason';
GRANT SELECT ON sbpg.outbox_failures TO PUBLIC;

REVOKE ALL ON FUNCTION sbpg.create_publisher(text, text, text, text, boolean, jsonb),
	sbpg.alter_publisher(text, text, text, text, boolean, jsonb), sbpg.drop_publisher(text, boolean),
	sbpg.grant_publisher(text, regrole), sbpg.revoke_publisher(text, regrole), sbpg.requeue(text, bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg.create_publisher(text, text, text, text, boolean, jsonb),
	sbpg.alter_publisher(text, text, text, text, boolean, jsonb), sbpg.drop_publisher(text, boolean),
	sbpg.grant_publisher(text, regrole), sbpg.revoke_publisher(text, regrole), sbpg.requeue(text, bigint[]) TO sbpg_admin;

-- An identity that a publisher uses cannot be dropped either.
CREATE OR REPLACE FUNCTION sbpg.drop_identity(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	users text;
BEGIN
	PERFORM sbpg._check_admin('drop identity');
	PERFORM sbpg._check_identity_owner(name, 'drop');
	SELECT string_agg(u, ', ' ORDER BY u) INTO users FROM (
		SELECT 'subscription ' || s.name AS u FROM sbpg.subscriptions s WHERE s.identity = drop_identity.name
		UNION ALL
		SELECT 'publisher ' || p.name FROM sbpg.publishers p WHERE p.identity = drop_identity.name) x;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'identity "%" is used by subscriptions or publishers', name
			USING ERRCODE = 'dependent_objects_still_exist', DETAIL = format('Used by: %s.', users),
			      HINT = 'Drop them or move them to another identity first.';
	END IF;
	DELETE FROM sbpg.identities i WHERE i.name = drop_identity.name;
END
$$;

-- Dead-letter queues read and replayed from SQL (issue 16; docs/outbox.md, "Dead-letter replay").
-- The work is done in the calling backend by a connection of its own (src/pg/dead_letters.cpp).
CREATE FUNCTION sbpg._dead_letter_op(subscription text, op text, sequence_numbers bigint[], dead_letter_reason text,
	max_count integer, from_sequence bigint, timeout_ms integer)
RETURNS TABLE (sequence_number bigint, message_id text, reason text, description text, enqueued_at timestamptz,
	delivery_count integer, body bytea, properties jsonb, session_id text, outcome text)
	AS 'MODULE_PATHNAME', 'sbpg_dead_letter_op' LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION sbpg._dead_letter_op(text, text, bigint[], text, integer, bigint, integer) FROM PUBLIC;

-- The subscription, for a caller who may manage it (superusers, sbpg_admin members of its run_as).
CREATE FUNCTION sbpg._dead_letter_subscription(subscription text, action text) RETURNS sbpg.subscriptions
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions;
BEGIN
	SELECT * INTO s FROM sbpg.subscriptions x WHERE x.name = _dead_letter_subscription.subscription;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', subscription
			USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM sbpg.subscriptions lists them.';
	END IF;
	PERFORM sbpg._check_admin(action, s.run_as);
	RETURN s;
END
$$;
REVOKE ALL ON FUNCTION sbpg._dead_letter_subscription(text, text) FROM PUBLIC;

CREATE FUNCTION sbpg.dead_letters(subscription text, max_count integer DEFAULT 100, from_sequence bigint DEFAULT 0)
RETURNS TABLE (sequence_number bigint, message_id text, reason text, description text, enqueued_at timestamptz,
	delivery_count integer, body bytea, properties jsonb, session_id text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions := sbpg._dead_letter_subscription(subscription, 'read the dead-letter queue');
BEGIN
	IF max_count IS NULL OR max_count NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'max_count must be from 1 to 1000' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Page on with from_sequence => the last sequence number + 1.';
	END IF;
	RETURN QUERY SELECT d.sequence_number, d.message_id, d.reason, d.description, d.enqueued_at, d.delivery_count, d.body,
	                    d.properties, d.session_id
	FROM sbpg._dead_letter_op(s.name, 'peek', NULL, NULL, max_count, coalesce(from_sequence, 0), 60000) d;
END
$$;
COMMENT ON FUNCTION sbpg.dead_letters(text, integer, bigint)
	IS 'Peeks at a subscription''s dead-lettered messages (nothing is locked or removed)';

CREATE FUNCTION sbpg.replay_dead_letters(subscription text, sequence_numbers bigint[] DEFAULT NULL,
	reason text DEFAULT NULL, max_count integer DEFAULT 1000)
RETURNS TABLE (sequence_number bigint, message_id text, dead_letter_reason text, outcome text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	s sbpg.subscriptions := sbpg._dead_letter_subscription(subscription, 'replay dead-lettered messages');
BEGIN
	IF (sequence_numbers IS NULL) = (reason IS NULL) THEN
		RAISE EXCEPTION 'give either sequence_numbers or reason'
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'sequence_numbers => ARRAY[...] (from sbpg.dead_letters), or reason => ''MaxRetriesExceeded'' for every message dead-lettered with that reason.';
	END IF;
	IF max_count IS NULL OR max_count NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'max_count must be from 1 to 1000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF s.entity ~* '/subscriptions/' THEN
		RAISE EXCEPTION 'subscription "%" reads a topic subscription: its dead-lettered messages cannot be replayed to it', s.name
			USING ERRCODE = 'feature_not_supported',
			      DETAIL = 'Service Bus takes messages for a topic, not for one of its subscriptions; a copy sent to the topic would reach every subscription whose rule matches.',
			      HINT = 'Read them with sbpg.dead_letters and send what you choose with sbpg.send.';
	END IF;
	RETURN QUERY SELECT d.sequence_number, d.message_id, d.reason, d.outcome
	FROM sbpg._dead_letter_op(s.name, 'replay', sequence_numbers, reason, max_count, 0, 120000) d;
END
$$;
COMMENT ON FUNCTION sbpg.replay_dead_letters(text, bigint[], text, integer)
	IS 'Sends chosen dead-lettered messages back to the subscription''s entity and removes each dead-letter copy once its resend was accepted';
REVOKE ALL ON FUNCTION sbpg.dead_letters(text, integer, bigint), sbpg.replay_dead_letters(text, bigint[], text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg.dead_letters(text, integer, bigint), sbpg.replay_dead_letters(text, bigint[], text, integer) TO sbpg_admin;
