// The privilege-escalation suite (docs/security.md): sbpg's worker session belongs to the
// extension owner, a superuser, and runs tenants' code. Roles as an attacker would have them:
// alice and bob are LOGIN members of sbpg_admin with NOLOGIN writer roles (alice_w, bob_w);
// mallory has no sbpg role, only CREATE on schema public. Every way tenant code runs (handler,
// upcast, mapping, mapping diagnosis, domain check, trigger, default expression) and every shadowing
// object (functions and operators in public and in a tenant's schema, put on the worker's path by
// a handler's SET) calls public.observe(), which writes current_user to the server log (a record
// no rollback undoes) and, if it ever runs as a superuser, makes mallory one. At the end no role
// but postgres is a superuser, tenant code only ever observed current_user = run_as, and no
// shadowing object ever ran.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "../e2e/lib/cluster.mjs";
import pg from "pg";

const queues = ["victim", "bobq", "slow", "notes", "odd", "stubborn", "gone", "sets", "senders", "outq"];
const notifyKeys = new Set(["traceparent", "subscription", "message_id", "correlation_id", "sequence_number", "status", "xid", "attempts",
  "next_attempt_at", "deferred", "reason"]);

describe("privilege escalation", () => {
  let emu, db, sb, listener, spy;
  const got = (sub) => listener.got.filter((x) => x.subscription === sub);
  const byId = (sub) => Object.fromEntries(got(sub).map((x) => [x.message_id, x]));
  const send = async (entity, msgs) => {
    const s = sb.createSender(entity);
    await s.sendMessages(msgs);
    await s.close();
  };
  const asRole = async (role, sql) => {
    const c = new pg.Client({ ...db.connectionOptions(), user: role });
    await c.connect();
    try {
      return await c.query(sql);
    } finally {
      await c.end();
    }
  };
  const observed = async () => [...db.serverLog().matchAll(/sbpg-observed who=(\S+) super=(\S+) what=(.*)$/gm)]
    .map((m) => ({ who: m[1], super: m[2], what: m[3] }));

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: queues.map((n) => queue(n, { MaxDeliveryCount: 10 })) }) });
    db = await startCluster({ conf: { "sbpg.inbox_retention": "'2s'" } });
    await db.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE alice LOGIN IN ROLE sbpg_admin;
      CREATE ROLE bob LOGIN IN ROLE sbpg_admin;
      CREATE ROLE alice_w NOLOGIN;
      CREATE ROLE bob_w NOLOGIN;
      GRANT alice_w TO alice;
      GRANT bob_w TO bob;
      CREATE ROLE mallory LOGIN;
      GRANT CREATE ON SCHEMA public TO mallory;
      CREATE SCHEMA team_a AUTHORIZATION alice;
      CREATE SCHEMA team_b AUTHORIZATION bob;
      GRANT USAGE, CREATE ON SCHEMA team_a TO alice_w;
      GRANT USAGE ON SCHEMA team_b TO bob_w;
      ALTER ROLE alice_w SET search_path = team_a, public;
      -- What a database owner may set for every session of the database, the workers' included:
      -- a tenant's schema first on the path, and every error fatal.
      ALTER DATABASE postgres SET search_path = team_a, public;
      ALTER DATABASE postgres SET exit_on_error = on;
      -- What every tenant and shadowing function calls.
      CREATE FUNCTION public.observe(what text) RETURNS void LANGUAGE plpgsql AS $$
      DECLARE
        super boolean := (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user);
      BEGIN
        RAISE LOG 'sbpg-observed who=% super=% what=%', current_user, super, what;
        IF super THEN
          EXECUTE 'ALTER ROLE mallory SUPERUSER';
        END IF;
      END $$;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.grant_identity('emu', 'sbpg_admin');
      -- A careless grant: run_as itself may call a configuration function.
      GRANT EXECUTE ON FUNCTION sbpg.alter_subscription(text, text, text, regprocedure, regrole, text, integer, integer, text, boolean, jsonb) TO PUBLIC;
    `);

    // mallory: functions and an operator in public that beat pg_catalog's for the argument types
    // the worker's own statements once used (make_interval(secs => int), unnest(text[]),
    // numeric * integer), and a few that would win with public first on the path.
    await asRole("mallory", `
      CREATE FUNCTION public.make_interval(secs integer) RETURNS interval LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow make_interval'); RETURN pg_catalog.make_interval(secs => secs::float8); END $$;
      CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow unnest'); RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
      CREATE FUNCTION public.shadow_mul(numeric, integer) RETURNS numeric LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow *'); RETURN $1 OPERATOR(pg_catalog.*) $2::numeric; END $$;
      CREATE OPERATOR public.* (LEFTARG = numeric, RIGHTARG = integer, FUNCTION = public.shadow_mul);
      CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow now'); RETURN pg_catalog.now(); END $$;
      CREATE FUNCTION public.md5(text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow md5'); RETURN pg_catalog.md5($1); END $$;
      CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('shadow lower'); RETURN pg_catalog.lower($1); END $$;
    `);

    // alice: a schema of hijacking objects (every name and operator the worker's statements use),
    // put first on the session's path by her handler; a handler that tries each escape; a mapping
    // to a table whose domain check, default and trigger are hers; an upcast.
    await asRole("alice", `
      CREATE FUNCTION team_a.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack now'); RETURN pg_catalog.now(); END $$;
      CREATE FUNCTION team_a.make_interval(secs integer) RETURNS interval LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack make_interval'); RETURN pg_catalog.make_interval(secs => secs::float8); END $$;
      CREATE FUNCTION team_a.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack unnest'); RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
      CREATE FUNCTION team_a.md5(text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack md5'); RETURN pg_catalog.md5($1); END $$;
      CREATE FUNCTION team_a.substr(text, integer) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack substr'); RETURN pg_catalog.substr($1, $2); END $$;
      CREATE FUNCTION team_a.eq_text(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack = text'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
      CREATE OPERATOR team_a.= (LEFTARG = text, RIGHTARG = text, FUNCTION = team_a.eq_text);
      CREATE FUNCTION team_a.eq_int8(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack = bigint'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
      CREATE OPERATOR team_a.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = team_a.eq_int8);
      CREATE FUNCTION team_a.lt_ts(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack < timestamptz'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $$;
      CREATE OPERATOR team_a.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = team_a.lt_ts);
      CREATE FUNCTION team_a.get_text(jsonb, text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack ->>'); RETURN $1 OPERATOR(pg_catalog.->>) $2; END $$;
      CREATE OPERATOR team_a.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = team_a.get_text);
      CREATE FUNCTION team_a.minus_ts(timestamptz, interval) RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack - interval'); RETURN $1 OPERATOR(pg_catalog.-) $2; END $$;
      CREATE OPERATOR team_a.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = team_a.minus_ts);
      -- Types named like the ones the worker's statements cast to, whose checks would report a use.
      CREATE FUNCTION team_a.seen(v pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('hijack type ' || v); RETURN true; END $$;
      CREATE DOMAIN team_a.text AS pg_catalog.text CHECK (team_a.seen('text'));
      CREATE DOMAIN team_a.oid AS pg_catalog.oid CHECK (team_a.seen('oid'));
      CREATE DOMAIN team_a.jsonb AS pg_catalog.jsonb CHECK (team_a.seen('jsonb'));
      CREATE DOMAIN team_a.regtype AS pg_catalog.regtype CHECK (team_a.seen('regtype'));

      CREATE TABLE team_a.applied (message_id text PRIMARY KEY);
      -- alice may manage subscriptions; her handler reaches the configuration functions through a
      -- SECURITY DEFINER function of hers (run_as itself may not execute them).
      CREATE FUNCTION team_a.as_alice(how text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
      BEGIN
        IF how = 'alter' THEN
          PERFORM sbpg.alter_subscription('victim', run_as => 'postgres', handler => 'team_a.stage2(sbpg.message)',
                                          options => '{"allow_superuser_run_as": true}');
        ELSIF how = 'admin' THEN
          PERFORM sbpg.alter_subscription('victim', run_as => 'sbpg_admin');
        ELSE
          PERFORM sbpg.create_identity('mine', 'managed_identity');
        END IF;
      END $$;
      CREATE FUNCTION team_a.stage2(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('stage2'); EXECUTE 'ALTER ROLE alice SUPERUSER'; END $$;
      CREATE FUNCTION team_a.attack(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
      DECLARE
        how text := m.body OPERATOR(pg_catalog.->>) 'how';
      BEGIN
        PERFORM public.observe('handler ' || coalesce(how, 'plain'));
        IF how = 'settings' THEN
          PERFORM pg_catalog.set_config('search_path', 'team_a, pg_catalog', false);
          PERFORM pg_catalog.set_config('default_transaction_read_only', 'on', false);
          PERFORM pg_catalog.set_config('lock_timeout', '1', false);
          PERFORM pg_catalog.set_config('statement_timeout', '1', false);
          PERFORM pg_catalog.pg_advisory_lock(4242);
        ELSIF how = 'prepare' THEN
          EXECUTE 'PREPARE sneaky AS SELECT 1';
        ELSIF how = 'reuse' THEN
          PERFORM public.observe('search_path ' || pg_catalog.current_setting('search_path'));
          PERFORM public.observe('read only ' || pg_catalog.current_setting('transaction_read_only'));
        ELSIF how IN ('alter', 'admin', 'identity') THEN
          PERFORM team_a.as_alice(how);
        ELSIF how = 'direct' THEN
          PERFORM sbpg.alter_subscription('victim', run_as => 'postgres', options => '{"allow_superuser_run_as": true}');
        ELSIF how = 'temp' THEN
          CREATE TEMP TABLE scratch (x int);
        ELSIF how = 'temp_fn' THEN
          EXECUTE 'CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS ''SELECT 1''';
        ELSIF how = 'role' THEN
          PERFORM pg_catalog.set_config('role', 'postgres', false);
        END IF;
        INSERT INTO team_a.applied VALUES (m.message_id);
      END $$;
      CREATE FUNCTION team_a.check_v(v text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('domain check'); RETURN v <> 'forbidden'; END $$;
      CREATE DOMAIN team_a.checked AS text CHECK (team_a.check_v(VALUE));
      CREATE FUNCTION team_a.note_default() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('default'); RETURN 'd'; END $$;
      CREATE TABLE team_a.notes (id int PRIMARY KEY, v team_a.checked, n int, d text DEFAULT team_a.note_default());
      CREATE FUNCTION team_a.note_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('trigger'); RETURN NEW; END $$;
      CREATE TRIGGER note_trigger BEFORE INSERT ON team_a.notes FOR EACH ROW EXECUTE FUNCTION team_a.note_trigger();
      CREATE FUNCTION team_a.up(p jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('upcast'); RETURN p || '{"upcast": true}'; END $$;
      CREATE FUNCTION team_a.noted(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('noted handler ' || coalesce(m.body ->> 'upcast', 'none')); END $$;
      GRANT SELECT, INSERT, UPDATE ON team_a.applied, team_a.notes TO alice_w;
      GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA team_a TO alice_w;
      GRANT USAGE ON TYPE team_a.checked TO alice_w;
      SELECT sbpg.create_subscription('victim', '${emu.amqp}', 'victim', 'team_a.attack(sbpg.message)', 'alice_w', 'emu', batch_size => 10);
      SELECT sbpg.create_subscription('notes', '${emu.amqp}', 'notes', 'team_a.noted(sbpg.message)', 'alice_w', 'emu',
        options => '{"schemas": "validate", "unknown_types": "pass"}');
      SELECT sbpg.register_schema('team.up', 1, '{"type": "object"}');
      SELECT sbpg.register_schema('team.up', 2, '{"type": "object"}', upcast => 'team_a.up(jsonb)');
      SELECT sbpg.create_mapping('notes', 'team.note', 'team_a.notes');
    `);

    // bob: an ordinary subscription, a slow handler under a time limit, and a table whose check
    // constraint quotes its row in the error.
    await asRole("bob", `
      CREATE TABLE team_b.secrets (id int PRIMARY KEY, secret text CHECK (secret <> 'leak-me'));
      CREATE FUNCTION team_b.take(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM public.observe('bob handler');
        IF (m.body ->> 'sleep') IS NOT NULL THEN PERFORM pg_catalog.pg_sleep((m.body ->> 'sleep')::float8); END IF;
        IF (m.body ->> 'stubborn') IS NOT NULL THEN
          LOOP
            BEGIN
              PERFORM pg_catalog.pg_sleep(1);
            EXCEPTION WHEN query_canceled THEN
              PERFORM public.observe('caught the cancel');
            END;
          END LOOP;
        END IF;
        INSERT INTO team_b.secrets VALUES ((m.body ->> 'id')::int, m.body ->> 'secret');
      END $$;
      GRANT SELECT, INSERT ON team_b.secrets TO bob_w;
      GRANT EXECUTE ON FUNCTION team_b.take(sbpg.message) TO bob_w;
      SELECT sbpg.create_subscription('bobq', '${emu.amqp}', 'bobq', 'team_b.take(sbpg.message)', 'bob_w', 'emu');
      SELECT sbpg.create_subscription('slow', '${emu.amqp}', 'slow', 'team_b.take(sbpg.message)', 'bob_w', 'emu',
        options => '{"handler_timeout_ms": 300, "max_retries": 1, "retry_base_ms": 10, "retry_cap_ms": 20}');
      SELECT sbpg.create_subscription('odd', '${emu.amqp}', 'odd', 'team_b.take(sbpg.message)', 'bob_w', 'emu');
      SELECT sbpg.create_subscription('stubborn', '${emu.amqp}', 'stubborn', 'team_b.take(sbpg.message)', 'bob_w', 'emu',
        options => '{"handler_timeout_ms": 300}');
      -- bob registers a type alice's subscription validates, with an upcast of his: it must never
      -- run with alice_w's rights.
      CREATE FUNCTION team_b.squat(p jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('squat upcast'); RETURN p; END $$;
      SELECT sbpg.register_schema('team.squat', 1, '{"type": "object"}');
      SELECT sbpg.register_schema('team.squat', 2, '{"type": "object"}', upcast => 'team_b.squat(jsonb)');
    `);
    listener = await db.listen();
    // mallory listens too: any database user can.
    spy = { client: new pg.Client({ ...db.connectionOptions(), user: "mallory" }), got: [] };
    await spy.client.connect();
    spy.client.on("notification", (n) => spy.got.push(n.payload));
    await spy.client.query("LISTEN sbpg_confirm");
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 1, timeoutInMs: 20000 } });
    await waitFor(async () => Number((await db.query("SELECT count(*) FROM sbpg.stats WHERE state = 'connected'")).rows[0].count) === 6,
      { timeout: 30000, what: "six workers connected" });
  });

  after(async () => {
    await spy?.client.end();
    await listener?.close();
    await sb?.close();
    await db?.stop();
    await emu?.stop();
  });

  it("a handler's settings and locks do not outlive it", async () => {
    await send("victim", [{ messageId: "settings", body: { how: "settings" } }]);
    await waitFor(() => byId("victim").settings, { what: "the settings message" });
    assert.equal(byId("victim").settings.status, "applied", (await db.inboxReasons("victim")).settings);
    // The session-level advisory lock is released after the batch.
    await waitFor(async () => (await db.query("SELECT pg_try_advisory_lock(4242) AS ok")).rows[0].ok,
      { what: "advisory lock 4242 released by the worker" });
    await db.query("SELECT pg_advisory_unlock_all()");
    // The next batch: not read-only, with run_as's own search_path.
    await send("victim", [{ messageId: "reuse", body: { how: "reuse" } }]);
    await waitFor(() => byId("victim").reuse, { what: "the reuse message" });
    assert.equal(byId("victim").reuse.status, "applied");
    const seen = (await observed()).map((r) => r.what);
    assert.ok(seen.includes("search_path team_a, public"), "the handler runs with run_as's search_path");
    assert.ok(seen.includes("read only off"));
    // Another tenant's subscription behaves as before.
    await send("bobq", [{ messageId: "b-1", body: { id: 1, secret: "fine" } }]);
    await waitFor(() => byId("bobq")["b-1"], { what: "bob's message" });
    assert.equal(byId("bobq")["b-1"].status, "applied");
    // Retention passes (every second at a 2 s retention) and the schema refresh ran since the
    // handler set its search_path: the worker's own statements never picked up a tenant object.
    await waitFor(async () => Number((await db.query("SELECT count(*) FROM sbpg.inbox WHERE subscription = 'victim' AND message_id = 'settings'")).rows[0].count) === 0,
      { timeout: 30000, what: "the settings row pruned by retention" });
  });

  it("a handler cannot drive the configuration functions, change role or create temporary objects", async () => {
    await send("victim", ["alter", "admin", "identity", "direct", "temp", "temp_fn", "role", "prepare"].map((how) => ({ messageId: how, body: { how } })));
    await waitFor(() => ["alter", "admin", "identity", "direct", "temp", "temp_fn", "role", "prepare"].every((id) => byId("victim")[id]), { what: "eight outcomes" });
    const why = await db.inboxReasons("victim");
    for (const id of ["alter", "admin", "identity", "direct", "temp", "temp_fn", "role", "prepare"]) {
      assert.equal(byId("victim")[id].status, "dead_lettered", id);
      assert.equal(byId("victim")[id].reason, "PermissionDenied", `${id}: ${why[id]}`);
    }
    assert.match(why.alter, /permission denied to alter subscription.*alice is not a member of postgres/);
    // Through alice's SECURITY DEFINER function the configuration functions judge alice, whose
    // code it is, never the worker's owner: she may not do what only a superuser may.
    assert.match(why.identity, /only superusers may create identities of kind managed_identity/);
    assert.match(why.admin, /run_as role sbpg_admin has the privileges of sbpg_admin/);
    // Called by the handler itself, they judge run_as.
    assert.match(why.direct, /permission denied to alter subscription.*alice_w is neither a superuser nor a member of sbpg_admin/);
    assert.match(why.temp, /cannot create temporary table within security-restricted operation/);
    assert.match(why.temp_fn, /cannot create temporary objects in code an sbpg worker runs/);
    assert.match(why.prepare, /cannot execute PREPARE within security-restricted operation/);
    assert.match(why.role, /cannot set parameter "role" within security-(definer function|restricted operation)/);
    const victim = (await db.query(`SELECT run_as::text, handler = 'team_a.attack(sbpg.message)' AS same_handler, options
                                    FROM sbpg.subscriptions WHERE name = 'victim'`)).rows[0];
    assert.deepEqual(victim, { run_as: "alice_w", same_handler: true, options: {} });
    assert.equal((await db.query("SELECT count(*)::int c FROM sbpg.identities WHERE name = 'mine'")).rows[0].c, 0);
  });

  it("upcasts, mappings, mapping diagnosis, domain checks, triggers and defaults run as run_as", async () => {
    await send("notes", [
      { messageId: "up-1", subject: "team.up", applicationProperties: { schema_version: 1 }, body: { a: 1 } },
      { messageId: "note-1", subject: "team.note", body: { id: 1, v: "ok", n: 1 } },
      // n cannot be an integer: the mapping fails and is diagnosed column by column (v's domain
      // check runs again there).
      { messageId: "note-bad", subject: "team.note", body: { id: 2, v: "ok", n: "many" } },
      { messageId: "note-forbidden", subject: "team.note", body: { id: 3, v: "forbidden", n: 1 } },
    ]);
    await waitFor(() => ["up-1", "note-1", "note-bad", "note-forbidden"].every((id) => byId("notes")[id]), { what: "four outcomes" });
    assert.equal(byId("notes")["up-1"].status, "applied");
    assert.equal(byId("notes")["note-1"].status, "applied");
    assert.equal(byId("notes")["note-bad"].reason, "MappingError");
    assert.match((await db.inboxReasons("notes"))["note-bad"], /column n \(integer\) of team_a.notes cannot take "many"/);
    assert.equal(byId("notes")["note-forbidden"].status, "dead_lettered");
    const rows = await observed();
    const whats = new Set(rows.map((r) => r.what));
    for (const w of ["upcast", "noted handler true", "domain check", "default", "trigger"]) assert.ok(whats.has(w), `${w} ran`);
    const domainChecks = rows.filter((r) => r.what === "domain check");
    assert.ok(domainChecks.length >= 3, "the domain check ran for the mappings and for the diagnosis");
    assert.deepEqual([...new Set(domainChecks.map((r) => r.who))], ["alice_w"]);
  });

  it("a handler is stopped at handler_timeout_ms, retried, then dead-lettered; the messages behind it go on", async () => {
    await send("slow", [
      { messageId: "sleepy", body: { id: 100, secret: "s", sleep: 3600 } },
      { messageId: "after-1", body: { id: 101, secret: "s" } },
      { messageId: "after-2", body: { id: 102, secret: "s" } },
    ]);
    await waitFor(() => byId("slow").sleepy?.status === "dead_lettered", { timeout: 30000, what: "sleepy given up" });
    assert.equal(byId("slow").sleepy.reason, "MaxRetriesExceeded");
    assert.deepEqual(got("slow").filter((x) => x.message_id === "sleepy" && x.status === "retry").map((x) => x.reason), ["HandlerTimeout"]);
    assert.match((await db.inboxReasons("slow")).sleepy,
      /^MaxRetriesExceeded: 2 attempts failed; the last with HandlerTimeout: the handler ran longer than handler_timeout_ms \(300 ms\)/);
    await waitFor(() => byId("slow")["after-2"]?.status === "applied" && byId("slow")["after-1"]?.status === "applied",
      { what: "the messages behind it" });
  });

  it("NOTIFY carries no row data, a 9,000-character id cannot stop it, and invalid UTF-8 becomes valid text", async () => {
    const long = "c".repeat(9000);
    await send("bobq", [
      { messageId: "leak", body: { id: 2, secret: "leak-me" } },
      { messageId: "long", correlationId: long, body: { id: 3, secret: "x" } },
      { messageId: "behind-1", body: { id: 4, secret: "x" } },
      { messageId: "behind-2", body: { id: 5, secret: "x" } },
    ]);
    // Invalid UTF-8 in every property, sent raw through sbemu's control API.
    const q = "message_id=ab%FF%FEcd&subject=s%C0%80&correlation_id=%ED%A0%80x&session_id=%F4%90%80%80";
    const res = await fetch(`${emu.control}/entities/odd/messages?${q}`, { method: "POST", body: '{"id": 9, "secret": "x"}' });
    assert.equal(res.status, 200, await res.text());
    await send("odd", [{ messageId: "odd-behind", body: { id: 10, secret: "x" } }]);
    await waitFor(() => ["leak", "long", "behind-1", "behind-2"].every((id) => byId("bobq")[id]) && got("odd").length >= 2,
      { what: "the outcomes" });
    assert.equal(byId("bobq").leak.reason, "HandlerError");
    assert.match((await db.inboxReasons("bobq")).leak, /Failing row contains \(2, leak-me\)/, "the inbox keeps the description");
    for (const id of ["long", "behind-1", "behind-2"]) assert.equal(byId("bobq")[id].status, "applied", id);
    const longNote = byId("bobq").long;
    assert.ok(longNote.correlation_id.length < 600 && longNote.correlation_id.endsWith("…"), "a long id is shortened in NOTIFY");
    const stored = (await db.query("SELECT length(correlation_id) AS n FROM sbpg.inbox WHERE message_id = 'long'")).rows[0];
    assert.equal(stored.n, 9000, "and kept whole in the inbox");
    // mallory heard everything, but no row data and nothing but the documented fields.
    await waitFor(() => spy.got.some((p) => p.includes('"leak"')), { what: "mallory's copy" });
    for (const p of spy.got) {
      assert.ok(!p.includes("leak-me") && !p.includes("Failing row"), p);
      for (const k of Object.keys(JSON.parse(p))) assert.ok(notifyKeys.has(k), `${k} in ${p}`);
    }
    // The invalid message: dead-lettered, its properties stored as valid text, the one behind applied.
    const odd = got("odd");
    const bad = odd.find((x) => x.status === "dead_lettered");
    assert.ok(bad, JSON.stringify(odd));
    assert.equal(bad.reason, "MalformedMessage");
    assert.equal(bad.message_id, "ab\uFFFD\uFFFDcd");
    assert.equal(odd.find((x) => x.message_id === "odd-behind").status, "applied");
    const row = (await db.query("SELECT message_id, correlation_id, reason, convert_to(reason, 'UTF8') IS NOT NULL AS ok FROM sbpg.inbox WHERE subscription = 'odd' AND status = 'dead_lettered'")).rows[0];
    assert.equal(row.message_id, "ab\uFFFD\uFFFDcd");
    assert.match(row.reason, /^MalformedMessage: properties message_id, subject, correlation_id, session_id are not valid UTF-8 text/);
    await waitFor(async () => (await emu.entity("odd")).dead_letter_moves === 1, { what: "on the DLQ" });
  });

  it("another team's upcast never runs with run_as's rights", async () => {
    await waitFor(() => /subscription "notes": validating against 4 registered schema versions/.test(db.serverLog()),
      { timeout: 20000, what: "bob's type loaded by alice's worker" });
    await send("notes", [{ messageId: "squat-1", subject: "team.squat", applicationProperties: { schema_version: 1 }, body: { a: 1 } }]);
    await waitFor(() => byId("notes")["squat-1"], { what: "the squatted type's message" });
    assert.equal(byId("notes")["squat-1"].status, "dead_lettered",
      db.serverLog().split("\n").filter((l) => /"notes"|squat/.test(l)).join("\n"));
    assert.equal(byId("notes")["squat-1"].reason, "PermissionDenied");
    assert.match((await db.inboxReasons("notes"))["squat-1"], /upcast team_b.squat\(jsonb\) is owned by bob, who may not act as run_as role alice_w/);
    assert.ok(!(await observed()).some((r) => r.what === "squat upcast"), "the upcast never ran");
  });

  it("tenant code that catches the cancel is cancelled again, then its worker ends", async () => {
    await send("stubborn", [{ messageId: "stubborn-1", body: { id: 300, secret: "x", stubborn: true } }]);
    await waitFor(() => /subscription "stubborn": tenant code went on past handler_timeout_ms after its statement was cancelled/.test(db.serverLog()),
      { timeout: 30000, what: "the stubborn worker ended" });
    assert.ok((await observed()).filter((r) => r.what === "caught the cancel").length >= 2, "cancelled again after catching it");
    await db.psql("SELECT sbpg.disable_subscription('stubborn')");
    assert.equal(Number((await db.query("SELECT count(*) FROM team_b.secrets WHERE id = 300")).rows[0].count), 0);
    assert.equal(Number((await emu.entity("stubborn")).completed), 0, "nothing settled: the broker still holds the message");
  });

  it("records outcomes without notifications while the NOTIFY queue is nearly full", async () => {
    // A listener that stopped reading fills the queue (8 GB); the test fault stands in for that.
    await db.query("ALTER SYSTEM SET sbpg.test_fault = 'notify_queue_full'");
    await db.query("SELECT pg_reload_conf()");
    await waitFor(async () => (await db.query("SELECT count(*)::int c FROM pg_settings WHERE name = 'sbpg.test_fault' AND setting = 'notify_queue_full'")).rows[0].c === 1,
      { what: "the fault armed" });
    await send("bobq", [{ messageId: "quiet-1", body: { id: 50, secret: "x" } }, { messageId: "quiet-2", body: { id: 51, secret: "x" } }]);
    await waitFor(async () => Number((await db.query("SELECT count(*) FROM sbpg.inbox WHERE message_id IN ('quiet-1', 'quiet-2') AND status = 'applied'")).rows[0].count) === 2,
      { what: "both recorded" });
    await waitFor(async () => (await emu.entity("bobq")).messages === 0, { what: "both settled" });
    assert.match(db.serverLog(), /subscription "bobq": the NOTIFY queue is \d+% full; outcomes are recorded in sbpg.inbox without notifications/);
    assert.equal(listener.got.filter((x) => /^quiet-/.test(x.message_id)).length, 0);
    await db.query("ALTER SYSTEM RESET sbpg.test_fault");
    await db.query("SELECT pg_reload_conf()");
  });

  it("a worker refuses to send an Entra ID token over plain AMQP even when the catalog says so", async () => {
    // The SQL functions refuse it; a row changed behind their back is refused again by the worker
    // before it asks for a token.
    await db.psql(`
      SELECT sbpg.create_identity('mi', 'managed_identity', '{"allowed_namespaces": ["${emu.amqp}"]}');
      SELECT sbpg.create_subscription('plain', '${emu.amqp}', 'plain-q', 'team_b.take(sbpg.message)', 'bob_w', 'mi', enabled => false);
      UPDATE sbpg.subscriptions SET namespace = 'amqp://contoso.servicebus.windows.net', enabled = true WHERE name = 'plain';
    `);
    const st = await waitFor(async () => (await db.query("SELECT state, last_error FROM sbpg.stats WHERE subscription = 'plain' AND state = 'failed'")).rows[0],
      { what: "the plain subscription refused" });
    assert.match(st.last_error, /identity "mi" sends Entra ID tokens only over TLS to Service Bus namespaces or to brokers it lists in allowed_namespaces, not to amqp:\/\/contoso/);
    await db.psql("SELECT sbpg.drop_subscription('plain'); SELECT sbpg.drop_identity('mi');");
  });

  it("a dropped handler's name taken by another role never runs with run_as's rights", async () => {
    // Subscriptions name their handler by signature (so that pg_upgrade can carry them); the
    // worker looks a dropped one up again by that name, but runs only a function of the owner it
    // had when the subscription named it. A schema both may create in: public.
    await db.psql("GRANT CREATE ON SCHEMA public TO alice");
    await asRole("alice", `
      CREATE FUNCTION public.alice_gone(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('alice_gone'); END $$;
      GRANT EXECUTE ON FUNCTION public.alice_gone(sbpg.message) TO alice_w;
      SELECT sbpg.create_subscription('gone', '${emu.amqp}', 'gone', 'public.alice_gone(sbpg.message)', 'alice_w', 'emu');`);
    await send("gone", [{ messageId: "gone-1", body: { id: 400 } }]);
    await waitFor(() => byId("gone")["gone-1"], { what: "gone-1 applied by alice's handler" });
    await asRole("alice", "DROP FUNCTION public.alice_gone(sbpg.message)");
    await asRole("mallory", `
      CREATE FUNCTION public.alice_gone(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.observe('stage2 squatted handler'); END $$;
      GRANT EXECUTE ON FUNCTION public.alice_gone(sbpg.message) TO PUBLIC;`);
    await send("gone", [{ messageId: "gone-2", body: { id: 401 } }]);
    const st = await waitFor(async () => (await db.query(
      "SELECT state, last_error FROM sbpg.stats WHERE subscription = 'gone' AND state = 'paused' AND last_error ~ 'mallory'")).rows[0],
    { what: "the subscription paused on mallory's function" });
    assert.match(st.last_error, /handler public\.alice_gone\(sbpg\.message\) is owned by mallory, not by alice who owned it when the subscription named it/);
    assert.equal(byId("gone")["gone-2"], undefined, "gone-2 not applied");
    assert.ok(!(await observed()).some((r) => r.what === "stage2 squatted handler"), "mallory's function never ran");
    await db.psql("SELECT sbpg.drop_subscription('gone')");
  });

  it("a set-based handler runs as run_as in the same restricted context; halving keeps each attack to its message", async () => {
    await asRole("alice", `
      CREATE FUNCTION team_a.set_attack(ms sbpg.message[]) RETURNS void LANGUAGE plpgsql AS $$
      DECLARE m sbpg.message;
      BEGIN
        PERFORM public.observe('set handler of ' || pg_catalog.cardinality(ms));
        FOREACH m IN ARRAY ms LOOP
          IF m.body->>'how' = 'role' THEN
            EXECUTE 'SET ROLE postgres';
          ELSIF m.body->>'how' = 'temp' THEN
            EXECUTE 'CREATE TEMP TABLE set_t (x int)';
          ELSIF m.body->>'how' = 'alter' THEN
            PERFORM sbpg.alter_subscription('sets', options => '{"allow_superuser_run_as": true}');
          ELSIF m.body->>'how' = 'super' THEN
            EXECUTE 'ALTER ROLE mallory SUPERUSER';
          END IF;
        END LOOP;
      END $$;
      GRANT EXECUTE ON FUNCTION team_a.set_attack(sbpg.message[]) TO alice_w;
      SELECT sbpg.create_subscription('sets', '${emu.amqp}', 'sets', 'team_a.set_attack(sbpg.message[])', 'alice_w', 'emu',
                                      batch_size => 10);`);
    const ids = ["ok-1", "role", "ok-2", "temp", "alter", "ok-3", "super", "ok-4"];
    await send("sets", ids.map((id) => ({ messageId: id, body: { how: id.startsWith("ok") ? "nothing" : id } })));
    await waitFor(() => ids.every((id) => byId("sets")[id]?.status === "applied" || byId("sets")[id]?.status === "dead_lettered"),
      { what: "eight outcomes" });
    const why = await db.inboxReasons("sets");
    for (const id of ["ok-1", "ok-2", "ok-3", "ok-4"]) assert.equal(byId("sets")[id].status, "applied", `${id}: ${why[id]}`);
    for (const id of ["role", "temp", "alter", "super"]) {
      assert.equal(byId("sets")[id].status, "dead_lettered", id);
      assert.equal(byId("sets")[id].reason, "PermissionDenied", `${id}: ${why[id]}`);
    }
    assert.match(why.role, /cannot set parameter "role" within security-(definer function|restricted operation)/);
    assert.match(why.temp, /cannot create temporary table within security-restricted operation/);
    assert.match(why.alter, /alice_w is neither a superuser nor a member of sbpg_admin/);
    assert.match(why.super, /must be superuser to alter superuser roles|permission denied/);
    const sets = (await db.query("SELECT options FROM sbpg.subscriptions WHERE name = 'sets'")).rows[0];
    assert.deepEqual(sets.options, {});
    const calls = (await observed()).filter((r) => r.what.startsWith("set handler of "));
    assert.ok(calls.length >= 2 && calls.every((r) => r.who === "alice_w" && r.super === "f"), JSON.stringify(calls));
    await db.psql("SELECT sbpg.drop_subscription('sets')");
  });

  it("the outbox: a handler sends only through publishers granted to run_as, reaches no internal function, and the publisher's statements use nothing a user created", async () => {
    await asRole("bob", `SELECT sbpg.create_publisher('bob_pub', '${emu.amqp}', 'emu')`);
    await asRole("alice", `
      SELECT sbpg.create_publisher('alice_pub', '${emu.amqp}', 'emu');
      SELECT sbpg.grant_publisher('alice_pub', 'alice_w');
      CREATE FUNCTION team_a.sender(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      DECLARE
        how text := m.body OPERATOR(pg_catalog.->>) 'how';
      BEGIN
        PERFORM public.observe('sender ' || how);
        IF how = 'granted' THEN
          PERFORM sbpg.send('alice_pub', 'outq', m.body);
        ELSIF how = 'other' THEN
          PERFORM sbpg.send('bob_pub', 'outq', m.body);
        ELSIF how = 'queue' THEN
          PERFORM sbpg._queue('bob_pub', 'outq', '\\x00'::bytea, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        ELSIF how = 'applying' THEN
          PERFORM sbpg._applying_message();
        ELSIF how = 'dlq' THEN
          PERFORM * FROM sbpg.dead_letters('bobq');
        ELSIF how = 'dlop' THEN
          PERFORM * FROM sbpg._dead_letter_op('bobq', 'peek', NULL, NULL, 1, 0, 1000);
        ELSIF how = 'requeue' THEN
          PERFORM sbpg.requeue('bob_pub', ARRAY[1]::bigint[]);
        ELSIF how = 'grant' THEN
          PERFORM sbpg.grant_publisher('bob_pub', 'alice_w');
        END IF;
      END $f$;
      GRANT EXECUTE ON FUNCTION team_a.sender(sbpg.message) TO alice_w;
      SELECT sbpg.create_subscription('senders', '${emu.amqp}', 'senders', 'team_a.sender(sbpg.message)', 'alice_w', 'emu');`);
    const hows = ["granted", "other", "queue", "applying", "dlq", "dlop", "requeue", "grant"];
    await send("senders", hows.map((how) => ({ messageId: `send-${how}`, body: { how } })));
    await waitFor(() => hows.every((h) => byId("senders")[`send-${h}`]), { timeout: 60000, what: "an outcome for each" });
    const why = await db.inboxReasons("senders");
    assert.equal(byId("senders")["send-granted"].status, "applied");
    for (const h of hows.filter((x) => x !== "granted")) {
      assert.equal(byId("senders")[`send-${h}`].status, "dead_lettered", h);
      assert.equal(byId("senders")[`send-${h}`].reason, "PermissionDenied", `${h}: ${why[`send-${h}`]}`);
    }
    assert.match(why["send-other"], /permission denied to send through publisher "bob_pub"/);
    assert.match(why["send-queue"], /permission denied to send through publisher "bob_pub"/);
    assert.match(why["send-grant"], /permission denied for function grant_publisher/);
    // The granted one went out, sent by the publisher's worker under this database's settings
    // (a tenant's schema first on the path, every error fatal).
    await waitFor(async () => (await emu.entity("outq")).messages === 1, { timeout: 60000, what: "the granted message on the broker" });
    const rows = (await db.query("SELECT publisher, status, queued_by::text FROM sbpg.outbox")).rows;
    assert.deepEqual(rows, [{ publisher: "alice_pub", status: "sent", queued_by: "alice_w" }]);
    // mallory, granted nothing: cannot send, sees no row and no publisher.
    await assert.rejects(asRole("mallory", "SELECT sbpg.send('alice_pub', 'outq', 'x')"), (e) => e.code === "42501");
    await assert.rejects(asRole("mallory", "SELECT * FROM sbpg.outbox"), (e) => e.code === "42501");
    assert.equal((await asRole("mallory", "SELECT * FROM sbpg.outbox_failures")).rows.length, 0);
    assert.equal((await asRole("mallory", "SELECT * FROM sbpg.publisher_stats")).rows.length, 0);
    assert.equal((await asRole("alice", "SELECT publisher FROM sbpg.publisher_stats")).rows.length, 2, "sbpg_admin sees both");
    await db.psql("SELECT sbpg.drop_subscription('senders')");
  });

  it("no role became a superuser, tenant code only ever ran as run_as, no shadowing object ever ran", async () => {
    const supers = (await db.query("SELECT rolname FROM pg_roles WHERE rolsuper ORDER BY 1")).rows.map((r) => r.rolname);
    assert.deepEqual(supers, ["postgres"]);
    const rows = await observed();
    assert.ok(rows.length > 20, `${rows.length} observations`);
    const who = [...new Set(rows.map((r) => `${r.who} super=${r.super}`))].sort();
    assert.deepEqual(who, ["alice_w super=f", "bob_w super=f"]);
    const shadows = rows.filter((r) => /^(shadow|hijack|stage2)/.test(r.what));
    assert.deepEqual(shadows, []);
    assert.doesNotMatch(db.serverLog(), /terminated by signal/);
  });

  it("DROP EXTENSION waits for a handler no longer than handler_timeout_ms", async () => {
    await db.psql(`SELECT sbpg.alter_subscription('slow', options => '{"handler_timeout_ms": 2000, "max_retries": 100, "retry_base_ms": 10, "retry_cap_ms": 20}')`);
    await waitFor(async () => (await db.query("SELECT state FROM sbpg.stats WHERE subscription = 'slow'")).rows[0]?.state === "connected",
      { what: "the slow worker restarted" });
    await send("slow", [{ messageId: "forever", body: { id: 200, secret: "s", sleep: 3600 } }]);
    await waitFor(async () => (await db.query("SELECT count(*)::int c FROM pg_stat_activity WHERE wait_event = 'PgSleep'")).rows[0].c > 0,
      { what: "the handler asleep" });
    // Without the time limit this DROP would wait an hour; the client's own limit is only a guard.
    const c = await db.client();
    try {
      await c.query("SET statement_timeout = '60s'");
      await c.query("DROP EXTENSION sbpg CASCADE");
    } finally {
      await c.end();
    }
    assert.equal((await db.query("SELECT count(*)::int c FROM pg_extension WHERE extname = 'sbpg'")).rows[0].c, 0);
  });
});
