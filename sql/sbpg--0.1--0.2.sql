-- sbpg 0.1 -> 0.2 (docs/schemas.md): the upcast given with version N turns a payload of the
-- version before N into version N's shape, as the documentation always read (0.1 took it as N to
-- the version after N, so no upcast could be added once a version was registered); upcasts can be
-- attached to or replaced on a registered version later with sbpg.set_upcast; sbpg.schema_catalog
-- shows each step of the chain and its gaps.
\echo Use "ALTER EXTENSION sbpg UPDATE TO '0.2'" to load this file. \quit

-- What was registered keeps working: the upcast stored with a version moves to the version after
-- it, the step it always performed. One stored with the newest version of its type never ran (there
-- was no next version); it is dropped, with a warning, to be attached when that version comes.
DO $$
DECLARE
	r record;
BEGIN
	FOR r IN SELECT s.message_type, s.version, s.upcast FROM sbpg.schemas s
	         WHERE s.upcast IS NOT NULL
	           AND NOT EXISTS (SELECT FROM sbpg.schemas n WHERE n.message_type OPERATOR(pg_catalog.=) s.message_type
	                                                        AND n.version OPERATOR(pg_catalog.>) s.version)
	         ORDER BY 1, 2 LOOP
		RAISE WARNING 'upcast % of message type % version % had no next version and is dropped', r.upcast, r.message_type, r.version
			USING HINT = format('Attach it when version %s is registered: register_schema(..., upcast => %L), or sbpg.set_upcast.',
			                    r.version OPERATOR(pg_catalog.+) 1, r.upcast::pg_catalog.text);
	END LOOP;
END
$$;
WITH moved AS (
	SELECT message_type, version, pg_catalog.lag(upcast) OVER (PARTITION BY message_type ORDER BY version) AS up
	FROM sbpg.schemas)
UPDATE sbpg.schemas s SET upcast = m.up
FROM moved m WHERE m.message_type OPERATOR(pg_catalog.=) s.message_type AND m.version OPERATOR(pg_catalog.=) s.version;
COMMENT ON COLUMN sbpg.schemas.upcast IS 'turns a payload of the version before this one into this version''s shape';

-- Raises unless upcast is a function (jsonb) RETURNS jsonb, not SECURITY DEFINER.
CREATE FUNCTION sbpg._check_upcast(upcast regprocedure) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	p pg_proc;
BEGIN
	SELECT * INTO p FROM pg_proc WHERE oid = upcast;
	IF NOT FOUND OR p.pronargs <> 1 OR p.proargtypes[0] <> 'jsonb'::regtype OR p.prorettype <> 'jsonb'::regtype OR p.proretset OR p.prokind <> 'f' THEN
		RAISE EXCEPTION 'upcast % has the wrong signature', upcast
			USING ERRCODE = 'invalid_function_definition',
			      DETAIL = format('It takes (%s) and returns %s.', pg_get_function_identity_arguments(upcast), p.prorettype::regtype),
			      HINT = 'An upcast is declared as CREATE FUNCTION name(payload jsonb) RETURNS jsonb: it turns a payload of the version before into this version''s shape.';
	END IF;
	IF p.prosecdef THEN
		RAISE EXCEPTION 'upcast % is SECURITY DEFINER', upcast
			USING ERRCODE = 'invalid_function_definition',
			      DETAIL = 'It would run as its owner, not as the subscription''s run_as role.',
			      HINT = 'Declare it SECURITY INVOKER (the default).';
	END IF;
END
$$;

CREATE OR REPLACE FUNCTION sbpg.register_schema(message_type text, version integer, schema jsonb,
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
		PERFORM sbpg._check_upcast(upcast);
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
	IF upcast IS NOT NULL AND prev.version IS NULL THEN
		RAISE EXCEPTION 'version % is the first version of message type %: there is no earlier version to upcast from', version, message_type
			USING ERRCODE = 'invalid_parameter_value',
			      HINT = 'The upcast given with version N turns a payload of the version before N into version N''s shape: give it when registering the next version.';
	END IF;
	INSERT INTO sbpg.schemas (message_type, version, schema, upcast, registered_by)
	VALUES (message_type, version, schema, upcast, sbpg._caller()::text);
END
$$;
COMMENT ON FUNCTION sbpg.register_schema(text, integer, jsonb, text, regprocedure)
	IS 'Registers a JSON Schema (draft-04) as a version of a message type, checked against the previous version; upcast turns the previous version into this one';

CREATE FUNCTION sbpg.set_upcast(message_type text, version integer, upcast regprocedure)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM sbpg._check_admin('set an upcast');
	PERFORM sbpg._check_type_owner(message_type, 'set an upcast of');
	IF NOT EXISTS (SELECT FROM sbpg.schemas s WHERE s.message_type = set_upcast.message_type AND s.version = set_upcast.version) THEN
		RAISE EXCEPTION 'version % of message type % is not registered', coalesce(version::text, 'NULL'), coalesce(quote_literal(message_type), 'NULL')
			USING ERRCODE = 'undefined_object', HINT = 'SELECT * FROM sbpg.schema_catalog lists the registered versions.';
	END IF;
	IF NOT EXISTS (SELECT FROM sbpg.schemas s WHERE s.message_type = set_upcast.message_type AND s.version < set_upcast.version) THEN
		RAISE EXCEPTION 'version % is the first version of message type %: there is no earlier version to upcast from', version, message_type
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF upcast IS NOT NULL THEN
		PERFORM sbpg._check_upcast(upcast);
	END IF;
	UPDATE sbpg.schemas s SET upcast = set_upcast.upcast
	WHERE s.message_type = set_upcast.message_type AND s.version = set_upcast.version;
END
$$;
COMMENT ON FUNCTION sbpg.set_upcast(text, integer, regprocedure)
	IS 'Attaches (or, with NULL, removes) the upcast that turns the version before into this version';
REVOKE ALL ON FUNCTION sbpg.set_upcast(text, integer, regprocedure), sbpg._check_upcast(regprocedure) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sbpg.set_upcast(text, integer, regprocedure) TO sbpg_admin;

-- The chain, step by step: upcast_from is the version a payload is upcast from into this one; a
-- version after the first without an upcast is a gap (older payloads reach the handler as the
-- version before it).
CREATE OR REPLACE VIEW sbpg.schema_catalog AS
SELECT s.message_type, s.version, t.compatibility,
       s.version = max(s.version) OVER (PARTITION BY s.message_type) AS latest,
       s.upcast, s.registered_at, s.registered_by, s.schema,
       lag(s.version) OVER (PARTITION BY s.message_type ORDER BY s.version) AS upcast_from,
       s.upcast IS NULL AND lag(s.version) OVER (PARTITION BY s.message_type ORDER BY s.version) IS NOT NULL AS chain_gap
FROM sbpg.schemas s JOIN sbpg.message_types t ON t.name = s.message_type;

-- Clearing a subscription's identity (alter_subscription(identity => '')) checked the caller's
-- right to use "no identity" and refused every non-superuser: no identity needs no permission. This
-- is also how a subscription is moved off a revoked identity.
CREATE OR REPLACE FUNCTION sbpg._check_identity_usage(identity text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	caller regrole;
BEGIN
	IF identity IS NULL THEN
		RETURN;
	END IF;
	caller := sbpg._caller();
	IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) caller)
	   OR EXISTS (SELECT 1 FROM sbpg.identities i WHERE i.name OPERATOR(pg_catalog.=) identity
	              AND i.created_by OPERATOR(pg_catalog.=) caller::text)
	   OR EXISTS (SELECT 1 FROM sbpg.identity_usage u JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) u.grantee
	              WHERE u.identity OPERATOR(pg_catalog.=) _check_identity_usage.identity
	              AND pg_catalog.pg_has_role(caller, r.oid, 'MEMBER')) THEN
		RETURN;
	END IF;
	RAISE EXCEPTION 'permission denied to use identity "%"', identity
		USING ERRCODE = 'insufficient_privilege',
		      DETAIL = pg_catalog.format('%s did not create identity "%s" and belongs to no role it was granted to.', caller, identity),
		      HINT = pg_catalog.format('Its creator or a superuser can run SELECT sbpg.grant_identity(%L, %L).', identity, caller::text);
END
$$;
