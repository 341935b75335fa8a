-- pgTAP: the schema registry: registering versions, the catalog, every compatibility rule class
-- of docs/schemas.md accepted and refused, schemas refused for what RapidJSON would ignore, and
-- who may register. Runs in the database test/pg/run prepares; everything is rolled back.
BEGIN;
SELECT plan(56);

CREATE ROLE tap_sadmin NOLOGIN IN ROLE sbpg_admin;
CREATE ROLE tap_snobody NOLOGIN;
CREATE FUNCTION tap_upcast(p jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT p || '{"currency": "EUR"}' $$;
CREATE FUNCTION tap_bad_upcast(p text) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;

-- A function to register version 1 of a fresh type with one schema, then try version 2.
CREATE FUNCTION tap_try(mode text, v1 jsonb, v2 jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE t text := 'tap.' || md5(random()::text);
BEGIN
	PERFORM sbpg.register_schema(t, 1, v1, mode);
	BEGIN
		PERFORM sbpg.register_schema(t, 2, v2);
		RETURN 'ok';
	EXCEPTION WHEN invalid_parameter_value THEN
		RETURN SQLERRM || ' | ' || coalesce((SELECT string_agg(rule, ',' ORDER BY rule) FROM sbpg._schema_violations(v1, v2, mode)), '');
	END;
END $$;

-- Registration and the catalog.
SELECT lives_ok($$SELECT sbpg.register_schema('orders.created', 1,
    '{"type": "object", "properties": {"id": {"type": "integer"}, "amount": {"type": "number"}}, "required": ["id", "amount"], "additionalProperties": false}')$$,
    'version 1 of a new type is registered');
SELECT is((SELECT compatibility FROM sbpg.message_types WHERE name = 'orders.created'), 'backward', 'backward is the default mode');
SELECT lives_ok($$SELECT sbpg.register_schema('orders.created', 2,
    '{"type": "object", "properties": {"id": {"type": "integer"}, "amount": {"type": "number"}, "currency": {"type": "string"}}, "required": ["id", "amount"], "additionalProperties": false}',
    upcast => 'tap_upcast(jsonb)')$$,
    'version 2 adds an optional property to a closed object: backward compatible');
SELECT results_eq($$SELECT version, latest FROM sbpg.schema_catalog WHERE message_type = 'orders.created' ORDER BY version$$,
    $$VALUES (1, false), (2, true)$$, 'the catalog lists both versions and marks the latest');
SELECT is((SELECT upcast::text FROM sbpg.schemas WHERE message_type = 'orders.created' AND version = 2), 'public.tap_upcast(jsonb)', 'the upcast is kept, by its schema-qualified signature');
SELECT throws_ok($$SELECT sbpg.register_schema('orders.created', 2, '{"type": "object"}')$$, '42710',
    'version 2 of message type orders.created is already registered', 'versions are immutable');
SELECT throws_ok($$SELECT sbpg.register_schema('orders.created', 1, '{"type": "object"}')$$, '42710',
    'version 1 of message type orders.created is already registered', 'an old version number cannot be reused');
SELECT lives_ok($$SELECT sbpg.register_schema('orders.gap', 5, '{"type": "object"}')$$, 'versions need not start at 1');
SELECT throws_ok($$SELECT sbpg.register_schema('orders.gap', 3, '{"type": "object"}')$$, '22023',
    'version 3 of message type orders.gap is older than its latest version 5', 'versions increase');

-- Bad input to register_schema.
SELECT throws_ok($$SELECT sbpg.register_schema('bad type!', 1, '{}')$$, '22023', 'invalid message type ''bad type!''', 'a bad type name');
SELECT throws_ok($$SELECT sbpg.register_schema('t.v0', 0, '{}')$$, '22023', 'invalid version 0 of message type t.v0', 'version 0');
SELECT throws_ok($$SELECT sbpg.register_schema('t.arr', 1, '[]')$$, '22023', 'the schema of t.arr version 1 must be a JSON object', 'a schema is an object');
SELECT throws_ok($$SELECT sbpg.register_schema('t.fmt', 1, '{"type": "string", "format": "date-time"}')$$, '22023',
    'the schema of t.fmt version 1 is not supported', 'format is refused: RapidJSON would ignore it');
SELECT throws_ok($$SELECT sbpg.register_schema('t.const', 1, '{"properties": {"a": {"const": 1}}}')$$, '22023',
    'the schema of t.const version 1 is not supported', 'const (draft-06) is refused');
SELECT throws_ok($$SELECT sbpg.register_schema('t.ref', 1, '{"$ref": "https://example.com/s.json"}')$$, '22023',
    'the schema of t.ref version 1 is not supported', 'a remote $ref is refused');
SELECT throws_ok($$SELECT sbpg.register_schema('t.mode', 1, '{}', 'sideways')$$, '22023', 'unknown compatibility mode ''sideways''', 'an unknown mode');
SELECT throws_ok($$SELECT sbpg.register_schema('t.up', 1, '{}', upcast => 'tap_bad_upcast(text)')$$, '42P13',
    'upcast public.tap_bad_upcast(text) has the wrong signature', 'an upcast takes and returns jsonb');
SELECT is((SELECT count(*)::int FROM sbpg.message_types WHERE name LIKE 't.%'), 0, 'nothing refused was registered');

-- The DETAIL of a refused version names the rule and where.
SELECT throws_like($$SELECT sbpg.register_schema('orders.created', 3,
    '{"type": "object", "properties": {"id": {"type": "integer"}, "amount": {"type": "number"}, "currency": {"type": "string"}}, "required": ["id", "amount", "currency"], "additionalProperties": false}')$$,
    'version 3 of message type orders.created is not backward compatible with version 2', 'a new required property breaks backward');

-- Each rule class, in the mode it breaks and in the mode it does not.
SELECT is(tap_try('backward', '{"type": "object"}', '{"type": "object", "required": ["id"]}') ~ '^version 2 .* not backward compatible', true, 'required added: breaks backward');
SELECT is(tap_try('forward', '{"type": "object"}', '{"type": "object", "required": ["id"]}'), 'ok', 'required added: forward compatible');
SELECT is(tap_try('forward', '{"type": "object", "required": ["id"]}', '{"type": "object"}') ~ 'not forward compatible', true, 'required removed: breaks forward');
SELECT is(tap_try('backward', '{"type": "object", "required": ["id"]}', '{"type": "object"}'), 'ok', 'required removed: backward compatible');
SELECT is(tap_try('backward', '{"type": "number"}', '{"type": "integer"}') ~ 'not backward compatible', true, 'type narrowed (number to integer): breaks backward');
SELECT is(tap_try('backward', '{"type": "integer"}', '{"type": "number"}'), 'ok', 'type widened (integer to number): backward compatible');
SELECT is(tap_try('forward', '{"type": "integer"}', '{"type": "number"}') ~ 'not forward compatible', true, 'type widened: breaks forward');
SELECT is(tap_try('full', '{"type": "string"}', '{"type": "boolean"}') ~ 'not full compatible', true, 'type changed: breaks full');
SELECT is(tap_try('backward', '{"enum": ["a", "b"]}', '{"enum": ["a", "b", "c"]}'), 'ok', 'enum value added: backward compatible');
SELECT is(tap_try('backward', '{"enum": ["a", "b"]}', '{"enum": ["a"]}') ~ 'not backward compatible', true, 'enum value removed: breaks backward');
SELECT is(tap_try('forward', '{"enum": ["a", "b"]}', '{"enum": ["a", "b", "c"]}') ~ 'not forward compatible', true, 'enum value added: breaks forward');
SELECT is(tap_try('backward', '{"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": true}',
    '{"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}') ~ 'not backward compatible', true, 'additionalProperties closed: breaks backward');
SELECT is(tap_try('backward', '{"type": "object", "additionalProperties": false}', '{"type": "object", "additionalProperties": true}'), 'ok', 'additionalProperties opened: backward compatible');
SELECT is(tap_try('backward', '{"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}',
    '{"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "additionalProperties": false}'), 'ok',
    'a property added to a closed object: backward compatible');
SELECT is(tap_try('forward', '{"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}',
    '{"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "additionalProperties": false}') ~ 'not forward compatible', true,
    'a property added to a closed object: breaks forward');
SELECT is(tap_try('backward', '{"type": "array", "items": {"type": "integer"}}', '{"type": "array", "items": {"type": "number"}}'), 'ok', 'items widened: backward compatible');
SELECT is(tap_try('backward', '{"type": "array", "items": {"type": "number"}}', '{"type": "array", "items": {"type": "integer"}}') ~ 'not backward compatible', true, 'items narrowed: breaks backward');
SELECT is(tap_try('backward', '{"type": "number", "maximum": 100}', '{"type": "number", "maximum": 1000}'), 'ok', 'maximum raised: backward compatible');
SELECT is(tap_try('backward', '{"type": "number", "minimum": 0}', '{"type": "number", "minimum": 10}') ~ 'not backward compatible', true, 'minimum raised: breaks backward');
SELECT is(tap_try('forward', '{"type": "number", "maximum": 100}', '{"type": "number", "maximum": 1000}') ~ 'not forward compatible', true, 'maximum raised: breaks forward');
SELECT is(tap_try('backward', '{"type": "string", "maxLength": 10}', '{"type": "string", "maxLength": 20}'), 'ok', 'maxLength raised: backward compatible');
SELECT is(tap_try('backward', '{"type": "string", "minLength": 1, "maxLength": 20}', '{"type": "string", "minLength": 1, "maxLength": 10}') ~ 'not backward compatible', true, 'maxLength lowered: breaks backward');
SELECT is(tap_try('backward', '{"type": "string", "pattern": "^[a-z]+$"}', '{"type": "string"}'), 'ok', 'pattern removed: backward compatible');
SELECT is(tap_try('backward', '{"type": "string"}', '{"type": "string", "pattern": "^[a-z]+$"}') ~ 'not backward compatible', true, 'pattern added: breaks backward');
SELECT is(tap_try('full', '{"type": "string", "pattern": "^[a-z]+$"}', '{"type": "string", "pattern": "^[a-z0-9]+$"}') ~ 'not full compatible', true, 'pattern changed: breaks full');
SELECT is(tap_try('none', '{"type": "string"}', '{"type": "object", "required": ["x"]}'), 'ok', 'mode none accepts any change');

-- An upcast comes with the version it leads into, or later with set_upcast, by the type's owner.
SELECT lives_ok($$SELECT sbpg.set_upcast('orders.created', 2, NULL)$$, 'set_upcast with NULL is accepted');
SELECT is((SELECT upcast FROM sbpg.schemas WHERE message_type = 'orders.created' AND version = 2), NULL, 'set_upcast removes an upcast');
SELECT is((SELECT chain_gap FROM sbpg.schema_catalog WHERE message_type = 'orders.created' AND version = 2), true,
    'a step without an upcast shows as a gap in the catalog');
SELECT lives_ok($$SELECT sbpg.set_upcast('orders.created', 2, 'tap_upcast(jsonb)')$$, 'and attaches one to a registered version');
SELECT throws_ok($$SELECT sbpg.set_upcast('orders.created', 2, 'tap_bad_upcast(text)')$$, '42P13',
    'upcast public.tap_bad_upcast(text) has the wrong signature', 'set_upcast checks the signature');
CREATE ROLE tap_sother NOLOGIN IN ROLE sbpg_admin;
SET ROLE tap_sother;
SELECT throws_ok($$SELECT sbpg.set_upcast('orders.created', 2, NULL)$$, '42501',
    'permission denied to set an upcast of message type orders.created', 'only the type''s owner may');
RESET ROLE;
SELECT is((SELECT upcast::text FROM sbpg.schemas WHERE message_type = 'orders.created' AND version = 2), 'public.tap_upcast(jsonb)',
    'the upcast stays');

-- Changing the mode, and who may register.
SELECT lives_ok($$SELECT sbpg.set_compatibility('orders.created', 'full')$$, 'set_compatibility is accepted');
SELECT is((SELECT compatibility FROM sbpg.message_types WHERE name = 'orders.created'), 'full', 'set_compatibility changes the mode');
SELECT throws_ok($$SELECT sbpg.set_compatibility('no.such.type', 'full')$$, '42704', 'message type ''no.such.type'' has no registered schema', 'set_compatibility of an unknown type');
SET ROLE tap_snobody;
SELECT throws_ok($$SELECT sbpg.register_schema('x.y', 1, '{}')$$, '42501', 'permission denied for function register_schema', 'a role without sbpg_admin cannot register');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
