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

CREATE OR REPLACE FUNCTION sbpg.create_subscription(name text, namespace text, entity text, handler regprocedure,
	run_as regrole, identity text DEFAULT NULL, batch_size integer DEFAULT 100, prefetch integer DEFAULT NULL,
	notify_channel text DEFAULT 'sbpg_confirm', enabled boolean DEFAULT true, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('create subscription', run_as);
	IF EXISTS (SELECT 1 FROM sbpg.subscriptions s WHERE s.name = create_subscription.name) THEN
		RAISE EXCEPTION 'subscription "%" already exists', name
			USING ERRCODE = 'duplicate_object', HINT = 'Change it with sbpg.alter_subscription, or drop it first.';
	END IF;
	-- By default hold two batches: the next one is received while one applies, so transactions
	-- are full (see the docs on prefetch; bench/README.md has the figures).
	prefetch := coalesce(prefetch, least(2 * batch_size, 5000));
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
		prefetch := least(2 * batch_size, 5000);
	END IF;
	PERFORM sbpg._validate_subscription(s.name, coalesce(namespace, s.namespace), coalesce(entity, s.entity),
		coalesce(handler, current_handler), coalesce(run_as, s.run_as), new_identity, coalesce(batch_size, s.batch_size),
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
