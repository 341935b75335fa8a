// Promises the documentation makes that no other test checked (issue 11): revoking an identity
// refuses new subscriptions and leaves running ones alone (README, docs/security.md); a handler that
// is dropped, or that run_as may no longer execute, pauses the worker without counting against the
// messages (docs/operator-guide.md, docs/retries.md); a deferred message the broker did not hand
// over is asked for again later (docs/retries.md); the inbox recognises a redelivery by message id
// when the broker gives no sequence number (docs/architecture.md); drop_subscription removes the
// subscription's inbox and retry rows (README), also those of a batch in flight when it runs.
//
// Every handler here also appends to `applies`, a table without a key, so a message applied twice
// shows as two rows there.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const queues = ["revoke", "noexec", "dropped", "lostdefer", "noseq", "dropme", "droprace"];

describe("documented promises", () => {
  let emu, pg, sb, listener;
  const got = (sub) => listener.got.filter((x) => x.subscription === sub);
  const send = async (q, msgs) => {
    const s = sb.createSender(q);
    await s.sendMessages(msgs);
    await s.close();
  };
  const stats = async (name) => (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
  const count = async (sql, params) => Number((await pg.query(sql, params)).rows[0].count);
  const applies = (sub) => count("SELECT count(*) FROM applies WHERE sub = $1", [sub]);
  const appliesOf = (mid) => count("SELECT count(*) FROM applies WHERE message_id = $1", [mid]);
  const inboxRows = (sub) => count("SELECT count(*) FROM sbpg.inbox WHERE subscription = $1", [sub]);
  const retryRows = (sub) => count("SELECT count(*) FROM sbpg.retries WHERE subscription = $1", [sub]);
  const workerPid = async (name) =>
    (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg worker' AND application_name = $1", [name]))
      .rows[0]?.pid;
  const subscribe = (name, handler, extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', '${handler}(sbpg.message)', 'app', 'emu'${extra});`);
  // Runs statements on one connection as `role` (SET ROLE), so errors can be checked.
  const asRole = async (role, sql) => {
    const c = await pg.client();
    try {
      await c.query(`SET ROLE ${role}`);
      return await c.query(sql);
    } finally {
      await c.end();
    }
  };

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: queues.map((n) => queue(n, { MaxDeliveryCount: 50 })) }) });
    pg = await startCluster();
    // handle: fails transiently while the message's row in `failing` is there, else records the
    // apply in `applies`. Its EXECUTE is revoked from PUBLIC (functions are executable by PUBLIC
    // by default), so revoking it from app takes it away.
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE applies (sub text, message_id text, sequence_number bigint, body jsonb);
      CREATE TABLE failing (message_id text PRIMARY KEY);
      GRANT SELECT, INSERT ON applies TO app;
      GRANT SELECT ON failing TO app;
      CREATE FUNCTION handle(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF EXISTS (SELECT 1 FROM public.failing WHERE message_id = m.message_id) THEN
          RAISE EXCEPTION 'simulated deadlock for %', m.message_id USING ERRCODE = '40P01';
        END IF;
        INSERT INTO public.applies VALUES (m.subscription, m.message_id, m.sequence_number, m.body);
      END $f$;
      REVOKE EXECUTE ON FUNCTION handle(sbpg.message) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION handle(sbpg.message) TO app;
      CREATE FUNCTION handle_noexec(m sbpg.message) RETURNS void LANGUAGE sql AS $f$ SELECT public.handle(m) $f$;
      REVOKE EXECUTE ON FUNCTION handle_noexec(sbpg.message) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION handle_noexec(sbpg.message) TO app;
      CREATE FUNCTION handle_dropped(m sbpg.message) RETURNS void LANGUAGE sql AS $f$ SELECT public.handle(m) $f$;
      GRANT EXECUTE ON FUNCTION handle_dropped(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
    `);
    listener = await pg.listen();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("revoke_identity refuses new subscriptions with the identity; a running one goes on, also after a restart", async () => {
    // docs/security.md: "The right is checked when a subscription is created or moved to the
    // identity; revoking it leaves existing subscriptions running (alter or drop them)."
    await pg.psql(`
      CREATE ROLE team_admin NOLOGIN IN ROLE sbpg_admin;
      GRANT app TO team_admin;
      SELECT sbpg.grant_identity('emu', 'team_admin');`);
    await asRole("team_admin", `SELECT sbpg.create_subscription('revoke', '${emu.amqp}', 'revoke', 'handle(sbpg.message)', 'app', 'emu')`);
    await asRole("team_admin", `SELECT sbpg.create_subscription('moved', '${emu.amqp}', 'revoke-moved', 'handle(sbpg.message)', 'app', enabled => false)`);
    await send("revoke", [{ messageId: "rv-1", body: { n: 1 } }]);
    await waitFor(async () => (await appliesOf("rv-1")) === 1, { what: "rv-1 applied" });
    const pid = await waitFor(() => workerPid("revoke"), { what: "worker revoke" });

    await pg.psql("SELECT sbpg.revoke_identity('emu', 'team_admin');");
    assert.equal(await count("SELECT count(*) FROM sbpg.identity_usage WHERE identity = 'emu'"), 0, "the grant is gone");
    const refused = (e) => e.code === "42501" && /permission denied to use identity "emu"/.test(e.message);
    await assert.rejects(
      asRole("team_admin", `SELECT sbpg.create_subscription('revoke2', '${emu.amqp}', 'revoke2', 'handle(sbpg.message)', 'app', 'emu')`),
      refused, "a new subscription with the revoked identity is refused");
    await assert.rejects(asRole("team_admin", "SELECT sbpg.alter_subscription('moved', identity => 'emu')"), refused,
      "moving a subscription to the revoked identity is refused");
    assert.equal(await count("SELECT count(*) FROM sbpg.subscriptions WHERE name = 'revoke2' OR identity = 'emu' AND name = 'moved'"), 0);

    // The running subscription goes on, with the same worker...
    assert.equal((await pg.query("SELECT identity FROM sbpg.subscriptions WHERE name = 'revoke'")).rows[0].identity, "emu");
    await send("revoke", [{ messageId: "rv-2", body: { n: 2 } }]);
    await waitFor(async () => (await appliesOf("rv-2")) === 1, { what: "rv-2 applied after the revoke" });
    assert.equal(await workerPid("revoke"), pid, "the running worker was not disturbed");
    // ...and after a change that is not a move to the identity restarts its worker.
    await asRole("team_admin", "SELECT sbpg.alter_subscription('revoke', batch_size => 5)");
    await waitFor(async () => { const p = await workerPid("revoke"); return p && p !== pid; }, { what: "worker restarted" });
    await send("revoke", [{ messageId: "rv-3", body: { n: 3 } }]);
    await waitFor(async () => (await appliesOf("rv-3")) === 1, { what: "rv-3 applied by the restarted worker" });
    const st = await stats("revoke");
    assert.equal(st.state, "connected");
    assert.equal(Number(st.dead_lettered), 0);
    assert.equal(await applies("revoke"), 3);
    await waitFor(async () => (await emu.entity("revoke")).completed === 3, { what: "3 completed on the broker" });
    await pg.psql("SELECT sbpg.drop_subscription('revoke'); SELECT sbpg.drop_subscription('moved');");
  });

  // Waits until the paused worker has tried its batch again at least once more (last_error_at moves
  // on each try), so "not counted" is checked across tries, not after the first alone.
  const pausedTwice = async (name, why) => {
    const first = await waitFor(async () => {
      const st = await stats(name);
      return st.state === "paused" && why.test(st.last_error || "") && st.last_error_at;
    }, { what: `${name} paused` });
    await waitFor(async () => {
      const st = await stats(name);
      return st.state === "paused" && st.last_error_at > first;
    }, { what: `${name} tried again while paused` });
  };

  it("pauses when run_as loses EXECUTE on the handler, counts nothing against the messages, applies them once granted", async () => {
    await subscribe("noexec", "handle_noexec");
    await send("noexec", [{ messageId: "nx-1", body: { n: 1 } }]);
    await waitFor(async () => (await appliesOf("nx-1")) === 1, { what: "nx-1 applied" });

    await pg.psql("REVOKE EXECUTE ON FUNCTION handle_noexec(sbpg.message) FROM app;");
    await send("noexec", [{ messageId: "nx-2", body: { n: 2 } }, { messageId: "nx-3", body: { n: 3 } }]);
    await pausedTwice("noexec", /run_as role app may not execute handler (public\.)?handle_noexec\(sbpg\.message\)/);
    assert.match(pg.serverLog(), /subscription "noexec": run_as role app may not execute handler (public\.)?handle_noexec\(sbpg\.message\); messages are left for later/);
    // Held, not settled, not counted: no inbox or retry row, no notification, nothing on the DLQ.
    assert.equal(await inboxRows("noexec"), 1);
    assert.equal(await retryRows("noexec"), 0);
    assert.deepEqual(got("noexec").map((x) => x.message_id), ["nx-1"]);
    let e = await emu.entity("noexec");
    assert.equal(e.locked, 2, "both held by the worker");
    assert.deepEqual([e.dead_letter_moves, e.abandoned, e.deferrals, e.delivered], [0, 0, 0, 3]);
    let st = await stats("noexec");
    assert.deepEqual([st.retries, st.dead_lettered, st.abandoned].map(Number), [0, 0, 0]);

    await pg.psql("GRANT EXECUTE ON FUNCTION handle_noexec(sbpg.message) TO app;");
    await waitFor(async () => (await applies("noexec")) === 3, { what: "nx-2 and nx-3 applied" });
    await waitFor(async () => (await emu.entity("noexec")).completed === 3, { what: "3 completed" });
    const inbox = (await pg.query("SELECT message_id, status, attempts FROM sbpg.inbox WHERE subscription = 'noexec' ORDER BY 1")).rows;
    assert.deepEqual(inbox.map((r) => [r.message_id, r.status, r.attempts]),
      [["nx-1", "applied", 1], ["nx-2", "applied", 1], ["nx-3", "applied", 1]], "the pause cost no attempt");
    assert.deepEqual(got("noexec").map((x) => [x.message_id, x.status, x.attempts]),
      [["nx-1", "applied", 1], ["nx-2", "applied", 1], ["nx-3", "applied", 1]]);
    e = await emu.entity("noexec");
    assert.deepEqual([e.delivered, e.dead_letter_moves, e.abandoned], [3, 0, 0], "held throughout: delivered once each");
    st = await stats("noexec");
    assert.deepEqual([st.retries, st.retried_messages, st.dead_lettered, st.abandoned].map(Number), [0, 0, 0, 0]);
    // The pause ends with the first batch that finds the handler usable (Worker::AfterCommit).
    await waitFor(async () => (await stats("noexec")).state === "connected", { timeout: 10000, what: "state connected again" });
  });

  it("pauses when the handler is dropped, counts nothing against the messages, applies them once it is back", async () => {
    await subscribe("dropped", "handle_dropped");
    await send("dropped", [{ messageId: "dr-1", body: { n: 1 } }]);
    await waitFor(async () => (await appliesOf("dr-1")) === 1, { what: "dr-1 applied" });
    const stored = (await pg.query("SELECT handler, handler_owner::text AS owner FROM sbpg.subscriptions WHERE name = 'dropped'")).rows[0];
    assert.deepEqual(stored, { handler: "public.handle_dropped(sbpg.message)", owner: "postgres" },
      "named by its schema-qualified signature, with the owner it had");

    await pg.psql("DROP FUNCTION handle_dropped(sbpg.message);");
    await send("dropped", [{ messageId: "dr-2", body: { n: 2 } }]);
    await pausedTwice("dropped", /handler public\.handle_dropped\(sbpg\.message\) does not exist \(dropped or renamed\)/);
    assert.equal(await inboxRows("dropped"), 1);
    assert.equal(await retryRows("dropped"), 0);
    assert.deepEqual(got("dropped").map((x) => x.message_id), ["dr-1"]);
    let e = await emu.entity("dropped");
    assert.deepEqual([e.locked, e.dead_letter_moves, e.abandoned], [1, 0, 0]);
    const deliveredWhilePaused = e.delivered;
    assert.deepEqual([(await stats("dropped")).retries, (await stats("dropped")).dead_lettered].map(Number), [0, 0]);

    // The same signature created again by another role is not run: the subscription named a
    // function of postgres's (docs/security.md).
    await pg.psql(`
      CREATE ROLE squatter NOLOGIN;
      CREATE FUNCTION handle_dropped(m sbpg.message) RETURNS void LANGUAGE sql AS $f$ SELECT public.handle(m) $f$;
      GRANT EXECUTE ON FUNCTION handle_dropped(sbpg.message) TO app;
      ALTER FUNCTION handle_dropped(sbpg.message) OWNER TO squatter;`);
    await pausedTwice("dropped", /handler public\.handle_dropped\(sbpg\.message\) is owned by squatter, not by postgres who owned it when the subscription named it/);
    assert.equal(await appliesOf("dr-2"), 0, "not run");
    await assert.rejects(pg.psql("SELECT sbpg.alter_subscription('dropped', batch_size => 10)"),
      /handler public\.handle_dropped\(sbpg\.message\) of subscription "dropped" is now owned by another role/);

    // Back with its owner: the worker finds it by name, without a restart, and applies what it held.
    await pg.psql("ALTER FUNCTION handle_dropped(sbpg.message) OWNER TO postgres;");
    await waitFor(async () => (await appliesOf("dr-2")) === 1, { what: "dr-2 applied" });
    await waitFor(async () => (await emu.entity("dropped")).completed === 2, { what: "2 completed" });
    const row = (await pg.query("SELECT status, attempts, delivery_count FROM sbpg.inbox WHERE subscription = 'dropped' AND message_id = 'dr-2'")).rows[0];
    assert.deepEqual([row.status, row.attempts], ["applied", 1], "the pause cost no attempt");
    assert.deepEqual(got("dropped").map((x) => [x.message_id, x.status, x.attempts]), [["dr-1", "applied", 1], ["dr-2", "applied", 1]]);
    e = await emu.entity("dropped");
    assert.equal(e.dead_letter_moves, 0);
    assert.equal(await applies("dropped"), 2);
    // The launcher's version of a subscription counts the handler by the text that names it
    // (src/pg/launcher.cpp), so neither the drop nor the new function restarted the worker: the
    // held message kept its lock and was delivered once.
    assert.equal(deliveredWhilePaused, 2, "dr-1 and dr-2 delivered once each while paused: held, not given back");
    assert.equal(row.delivery_count, 0, "dr-2 delivered once (a first delivery counts 0): held throughout");

    // A function owned by someone else is accepted when an administrator names it again.
    await pg.psql(`ALTER FUNCTION handle_dropped(sbpg.message) OWNER TO squatter;
      SELECT sbpg.alter_subscription('dropped', handler => 'handle_dropped(sbpg.message)');`);
    assert.equal((await pg.query("SELECT handler_owner::text AS o FROM sbpg.subscriptions WHERE name = 'dropped'")).rows[0].o, "squatter");
    await send("dropped", [{ messageId: "dr-3", body: { n: 3 } }]);
    await waitFor(async () => (await appliesOf("dr-3")) === 1, { what: "dr-3 applied" });
  });

  it("asks again for a deferred message the broker did not hand over, and applies it", async () => {
    // docs/retries.md: "When the broker does not hand over a deferred message (still locked by an
    // earlier connection, ...), the worker asks again a minute later."
    await pg.query("INSERT INTO failing VALUES ('ld-1')");
    // A ceiling of an hour: the first retry is deferred (a zero draw is all but impossible).
    await subscribe("lostdefer", "handle", `, options => '{"retry_base_ms": 3600000, "retry_cap_ms": 3600000, "retry_hold_ms": 0}'`);
    await send("lostdefer", [{ messageId: "ld-1", body: { n: 1 } }]);
    await waitFor(async () => (await emu.entity("lostdefer")).deferred === 1, { what: "ld-1 deferred on the broker" });
    const r0 = (await pg.query("SELECT sequence_number, attempts, deferred FROM sbpg.retries WHERE subscription = 'lostdefer'")).rows[0];
    assert.deepEqual([r0.attempts, r0.deferred], [1, true]);
    const seq = Number(r0.sequence_number);

    // Someone else holds the deferred message's lock: sbpg's fetch is answered "not found".
    const other = sb.createReceiver("lostdefer");
    const [peeked] = await other.peekMessages(1); // the SDK takes sequence numbers as Long
    assert.equal(peeked.sequenceNumber.toNumber(), seq);
    const [held] = await other.receiveDeferredMessages([peeked.sequenceNumber]);
    assert.equal(held.messageId, "ld-1");
    await pg.query("DELETE FROM failing WHERE message_id = 'ld-1'");
    await pg.query("UPDATE sbpg.retries SET next_attempt_at = now() WHERE subscription = 'lostdefer'");
    // The refusal postpones the next request by a minute; the row stays, nothing is counted.
    await waitFor(async () => (await pg.query(
      "SELECT next_attempt_at > now() + interval '30 seconds' AS later FROM sbpg.retries WHERE subscription = 'lostdefer'")).rows[0]?.later,
      { what: "the next request postponed" });
    const r1 = (await pg.query("SELECT attempts, deferred FROM sbpg.retries WHERE subscription = 'lostdefer'")).rows[0];
    assert.deepEqual([r1.attempts, r1.deferred], [1, true]);
    assert.equal(await inboxRows("lostdefer"), 0);
    assert.equal(await applies("lostdefer"), 0);
    assert.match(emu.log(), /com\.microsoft:receive-by-sequence-number on lostdefer failed: 404/, "the broker refused the request");

    // The other holder gives it back (it returns to the deferred state); when the minute is up
    // (brought forward here) the worker asks again and applies it.
    await other.abandonMessage(held);
    await other.close();
    assert.equal((await emu.entity("lostdefer")).deferred, 1);
    await pg.query("UPDATE sbpg.retries SET next_attempt_at = now() WHERE subscription = 'lostdefer'");
    await waitFor(async () => (await appliesOf("ld-1")) === 1, { what: "ld-1 applied" });
    await waitFor(async () => (await emu.entity("lostdefer")).completed === 1, { what: "completed over $management" });
    const inbox = (await pg.query("SELECT status, attempts FROM sbpg.inbox WHERE subscription = 'lostdefer'")).rows;
    assert.deepEqual(inbox.map((r) => [r.status, r.attempts]), [["applied", 2]]);
    assert.equal((await emu.entity("lostdefer")).messages, 0);
    await waitFor(async () => (await retryRows("lostdefer")) === 0, { what: "the retry row removed once the settlement is confirmed" });
    assert.equal(await applies("lostdefer"), 1);
  });

  it("recognises a redelivery by message id when the broker gives no sequence number", async () => {
    // docs/architecture.md: "Look the batch up in the inbox by (subscription, sequence_number) (by
    // message-id when the broker gives no sequence number)".
    // TODO(sbemu: no way to omit x-opt-sequence-number): this needs an emulator fault that sends
    // deliveries of an entity without the x-opt-sequence-number annotation, e.g.
    // `POST /faults/omit-sequence-numbers?entity=<path>` (off with /faults/clear); see the report of
    // issue 11 item 0. Until sbemu has it, this test fails at the call below.
    await emu.fault("omit-sequence-numbers", { entity: "noseq" });
    await subscribe("noseq", "handle");
    await send("noseq", [{ messageId: "ns-1", body: { n: 1 } }]);
    await waitFor(async () => (await appliesOf("ns-1")) === 1, { what: "ns-1 applied" });
    const row = (await pg.query("SELECT sequence_number, message_id, status FROM sbpg.inbox WHERE subscription = 'noseq'")).rows;
    assert.deepEqual(row.map((r) => [r.sequence_number, r.message_id, r.status]), [[null, "ns-1", "applied"]]);
    // The same message id again (a redelivery as a broker without sequence numbers shows it).
    await send("noseq", [{ messageId: "ns-1", body: { n: 1, again: true } }, { messageId: "ns-2", body: { n: 2 } }]);
    await waitFor(async () => (await emu.entity("noseq")).completed === 3, { what: "3 completed" });
    assert.deepEqual(got("noseq").map((x) => [x.message_id, x.status]), [["ns-1", "applied"], ["ns-1", "duplicate"], ["ns-2", "applied"]]);
    assert.equal(await appliesOf("ns-1"), 1, "applied once");
    assert.equal(await appliesOf("ns-2"), 1);
    assert.equal(Number((await stats("noseq")).duplicates), 1);
    await emu.fault("clear");
  });

  it("drop_subscription removes its inbox and retry rows", async () => {
    await pg.query("INSERT INTO failing VALUES ('dm-stuck')");
    await subscribe("dropme", "handle", `, options => '{"retry_base_ms": 3600000, "retry_cap_ms": 3600000, "retry_hold_ms": 0}'`);
    await send("dropme", [1, 2, 3].map((n) => ({ messageId: `dm-${n}`, body: { n } })));
    await send("dropme", [{ messageId: "dm-stuck", body: {} }]);
    await waitFor(async () => (await inboxRows("dropme")) === 3 && (await retryRows("dropme")) === 1, { what: "3 inbox rows, 1 retry row" });
    await waitFor(async () => (await emu.entity("dropme")).deferred === 1, { what: "dm-stuck deferred" });
    const untouched = await count("SELECT count(*) FROM sbpg.inbox WHERE subscription <> 'dropme'");
    await pg.psql("SELECT sbpg.drop_subscription('dropme');");
    assert.equal(await inboxRows("dropme"), 0);
    assert.equal(await retryRows("dropme"), 0);
    await waitFor(async () => !(await workerPid("dropme")), { what: "worker dropme ended" });
    assert.equal(await inboxRows("dropme"), 0, "none written back by the ending worker");
    assert.equal(await retryRows("dropme"), 0);
    assert.equal(await count("SELECT count(*) FROM sbpg.inbox WHERE subscription <> 'dropme'"), untouched, "other subscriptions' rows stay");
    assert.equal((await stats("dropme")), undefined);
  });

  it("drop_subscription removes the inbox row of a batch that commits while it runs", async () => {
    // The worker's commit waits for a synchronous standby that never answers (the worker forces
    // synchronous_commit on), so its batch is committed but not yet visible when the drop runs;
    // the launcher's SIGTERM then ends the wait and the batch becomes visible. Either the drop
    // waits for the batch and removes its row, or the row must not outlive the drop.
    await subscribe("droprace", "handle");
    await send("droprace", [{ messageId: "rc-1", body: { n: 1 } }]);
    await waitFor(async () => (await appliesOf("rc-1")) === 1, { what: "rc-1 applied" });
    const wpid = await waitFor(() => workerPid("droprace"), { what: "worker droprace" });
    const c = await pg.client();
    let dropDone = false;
    try {
      await c.query("SET synchronous_commit = local");
      await c.query("ALTER SYSTEM SET synchronous_standby_names = 'sbpg_no_such_standby'");
      await c.query("SELECT pg_reload_conf()");
      await send("droprace", [{ messageId: "rc-2", body: { n: 2 } }]);
      await waitFor(async () => (await pg.query("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", [wpid])).rows[0]?.wait_event === "SyncRep",
        { what: "the batch of rc-2 waiting for the standby" });
      const dropper = await pg.client();
      await dropper.query("SET synchronous_commit = local");
      const dpid = (await dropper.query("SELECT pg_backend_pid() p")).rows[0].p;
      const drop = dropper.query("SELECT sbpg.drop_subscription('droprace')").then(() => (dropDone = true));
      await waitFor(async () => dropDone ||
        (await pg.query("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", [dpid])).rows[0]?.wait_event_type === "Lock",
        { what: "the drop done, or waiting for the batch" });
      if (dropDone) await waitFor(async () => !(await workerPid("droprace")), { what: "worker droprace ended by the launcher" });
      await c.query("ALTER SYSTEM RESET synchronous_standby_names");
      await c.query("SELECT pg_reload_conf()");
      await drop;
      await dropper.end();
    } finally {
      await c.query("ALTER SYSTEM RESET synchronous_standby_names").catch(() => {});
      await c.query("SELECT pg_reload_conf()").catch(() => {});
      await c.end();
    }
    await waitFor(async () => !(await workerPid("droprace")), { what: "worker droprace ended" });
    assert.equal(await retryRows("droprace"), 0);
    // Each pass of a batch locks its subscription's row (FOR KEY SHARE, src/pg/pass.cpp), so the
    // drop (FOR UPDATE) waited for the batch in flight and deleted its inbox row too.
    assert.equal(await inboxRows("droprace"), 0, "no inbox row outlives drop_subscription");
  });
});
