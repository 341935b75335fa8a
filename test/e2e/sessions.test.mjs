// Sessions: a subscription on an entity that requires sessions receives them (detected when the
// broker refuses a receiver without a session filter, or declared), several at once, and applies
// each session's messages in sequence order. A message that fails transiently blocks its own
// session (later messages of that session wait) and no other; a permanent failure dead-letters the
// message and the session goes on.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

describe("sessions", () => {
  let emu, pg, sb, listener;

  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: ["orders-s", "blocking-s", "lost-s", "state-s", "stop-s"].map((n) => queue(n, { RequiresSession: true, MaxDeliveryCount: 100 })),
      }),
    });
    pg = await startCluster();
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE applied (pos bigserial PRIMARY KEY, sub text, session_id text, n int, message_id text, seq bigint);
      CREATE TABLE gate (closed boolean NOT NULL);
      INSERT INTO gate VALUES (true);
      GRANT INSERT ON applied TO app;
      GRANT USAGE ON SEQUENCE applied_pos_seq TO app;
      GRANT SELECT ON gate TO app;
      CREATE FUNCTION apply_s(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF m.body->>'fail' = 'transient' AND (SELECT closed FROM public.gate) THEN
          RAISE EXCEPTION 'the gate is closed' USING ERRCODE = '40001';
        END IF;
        IF m.body->>'fail' = 'permanent' OR (m.body->>'fail' = 'gated' AND (SELECT closed FROM public.gate)) THEN
          RAISE EXCEPTION 'message % cannot be applied', m.message_id USING ERRCODE = '22023';
        END IF;
        INSERT INTO public.applied (sub, session_id, n, message_id, seq)
        VALUES (m.body->>'sub', m.session_id, (m.body->>'n')::int, m.message_id, m.sequence_number);
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_s(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    listener = await pg.listen();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  // sessions × per messages, interleaved (s0-0, s1-0, ..., s0-1, ...); extra(session, n) adds fields.
  async function send(entity, sessions, per, extra = () => ({})) {
    const sender = sb.createSender(entity);
    const all = [];
    for (let n = 0; n < per; ++n)
      for (let s = 0; s < sessions; ++s)
        all.push({ messageId: `${entity}-s${s}-${n}`, sessionId: `s${s}`, body: { sub: entity, n, ...extra(s, n) } });
    for (let i = 0; i < all.length; i += 250) await sender.sendMessages(all.slice(i, i + 250));
    await sender.close();
  }

  const appliedOf = async (sub) =>
    (await pg.query("SELECT session_id, n, message_id, seq FROM applied WHERE sub = $1 ORDER BY pos", [sub])).rows;

  // Per session, the n values in apply order.
  function bySession(rows) {
    const out = {};
    for (const r of rows) (out[r.session_id] ??= []).push(r.n);
    return out;
  }

  it("detects a session-enabled queue, holds several sessions at once and applies each in order", async () => {
    const sessions = 12, per = 40;
    await send("orders-s", sessions, per);
    await pg.psql(`SELECT sbpg.create_subscription('orders-s', '${emu.amqp}', 'orders-s', 'apply_s(sbpg.message)', 'app', 'emu',
      batch_size => 20, options => '{"max_sessions": 4, "session_idle_ms": 300}');`);
    await waitFor(async () => (await appliedOf("orders-s")).length === sessions * per, { timeout: 60000, what: "every message applied" });
    const rows = await appliedOf("orders-s");
    const got = bySession(rows);
    assert.equal(Object.keys(got).length, sessions);
    for (const [sid, ns] of Object.entries(got))
      assert.deepEqual(ns, Array.from({ length: per }, (_, i) => i), `session ${sid} applied once each, in order`);
    // Sequence numbers rise within each session as applied.
    for (const sid of Object.keys(got)) {
      const seqs = rows.filter((r) => r.session_id === sid).map((r) => Number(r.seq));
      assert.ok(seqs.every((x, i) => i === 0 || x > seqs[i - 1]), `session ${sid} in sequence order`);
    }
    await waitFor(async () => (await emu.entity("orders-s")).completed === sessions * per, { what: "every message completed" });
    const e = await emu.entity("orders-s");
    assert.equal(e.messages, 0);
    assert.ok(e.max_sessions_locked >= 2 && e.max_sessions_locked <= 4,
      `sessions held concurrently, at most max_sessions (${e.max_sessions_locked})`);
    const notified = listener.got.filter((x) => x.subscription === "orders-s" && x.status === "applied");
    assert.equal(notified.length, sessions * per);
    assert.match(pg.serverLog(), /"subscription":"orders-s","state":"connected","detail":"receiving up to 4 sessions at once from orders-s/);
    const st = (await pg.query("SELECT applied FROM sbpg.stats WHERE subscription = 'orders-s'")).rows[0];
    assert.equal(Number(st.applied), sessions * per);
  });

  it("a transient failure blocks its own session, not the others; a permanent one is dead-lettered and the session goes on", async () => {
    const per = 10;
    // s0-3 fails transiently while the gate is closed; s1-2 fails permanently; s2 has no failure.
    // Credit 20 per session and batches of 3: the six messages behind s0-3 wait in the worker, more
    // than a batch takes, while s0-3 fails again and again.
    await send("blocking-s", 3, per, (s, n) => (s === 0 && n === 3 ? { fail: "transient" } : s === 1 && n === 2 ? { fail: "permanent" } : {}));
    await pg.psql(`SELECT sbpg.create_subscription('blocking-s', '${emu.amqp}', 'blocking-s', 'apply_s(sbpg.message)', 'app', 'emu',
      batch_size => 3, prefetch => 40,
      options => '{"sessions": true, "max_sessions": 2, "session_idle_ms": 300, "max_retries": 1000, "retry_base_ms": 50, "retry_cap_ms": 100}');`);
    // The other sessions finish while s0 waits at its fourth message.
    await waitFor(async () => {
      const got = bySession(await appliedOf("blocking-s"));
      return (got.s1?.length ?? 0) === per - 1 && (got.s2?.length ?? 0) === per && (got.s0?.length ?? 0) === 3;
    }, { timeout: 60000, what: "s1 and s2 done, s0 blocked at its fourth message" });
    // s0 stays blocked through retries: wait until the failing message was tried several times.
    await waitFor(async () => Number((await pg.query(
      "SELECT attempts FROM sbpg.retries WHERE subscription = 'blocking-s' AND message_id = 'blocking-s-s0-3'")).rows[0]?.attempts ?? 0) >= 3,
    { timeout: 30000, what: "the failing message retried" });
    let got = bySession(await appliedOf("blocking-s"));
    assert.deepEqual(got.s0, [0, 1, 2], "nothing of s0 after the failing message was applied");
    assert.deepEqual(got.s1, [0, 1, 3, 4, 5, 6, 7, 8, 9], "s1 went on after its dead-lettered message");
    assert.deepEqual(got.s2, Array.from({ length: per }, (_, i) => i));
    assert.equal((await emu.entity("blocking-s")).deferrals, 0, "no deferral in a session");
    await pg.query("UPDATE gate SET closed = false");
    await waitFor(async () => (bySession(await appliedOf("blocking-s")).s0?.length ?? 0) === per, { timeout: 30000, what: "s0 done" });
    got = bySession(await appliedOf("blocking-s"));
    assert.deepEqual(got.s0, Array.from({ length: per }, (_, i) => i), "s0 in order once its message applied");
    const reasons = await pg.inboxReasons("blocking-s");
    assert.match(reasons["blocking-s-s1-2"], /^HandlerError: message blocking-s-s1-2 cannot be applied/);
    await waitFor(async () => (await emu.entity("blocking-s")).messages === 0, { what: "queue drained" });
    assert.equal((await emu.entity("blocking-s")).dead_lettered, 1);
  });

  it("a lost session lock drops what the worker held of that session; the broker delivers it again, applied once and in order", async () => {
    await pg.query("UPDATE gate SET closed = true");
    const per = 6;
    await send("lost-s", 2, per, (s, n) => (s === 0 && n === 2 ? { fail: "transient" } : {}));
    await pg.psql(`SELECT sbpg.create_subscription('lost-s', '${emu.amqp}', 'lost-s', 'apply_s(sbpg.message)', 'app', 'emu',
      batch_size => 10, options => '{"max_retries": 1000, "retry_base_ms": 50, "retry_cap_ms": 100}');`);
    await waitFor(async () => {
      const got = bySession(await appliedOf("lost-s"));
      return (got.s1?.length ?? 0) === per && (got.s0?.length ?? 0) === 2;
    }, { timeout: 60000, what: "s1 done, s0 blocked at its third message" });
    await waitFor(async () => Number((await pg.query(
      "SELECT attempts FROM sbpg.retries WHERE subscription = 'lost-s' AND message_id = 'lost-s-s0-2'")).rows[0]?.attempts ?? 0) >= 2,
    { timeout: 30000, what: "the failing message retried" });
    await emu.ctl("POST", "/faults/expire-locks");
    await waitFor(() => /"subscription":"lost-s","state":"session_lost","detail":"session \\"s0\\": /.test(pg.serverLog()),
      { what: "the session's loss logged" });
    await pg.query("UPDATE gate SET closed = false");
    await waitFor(async () => (bySession(await appliedOf("lost-s")).s0?.length ?? 0) === per, { timeout: 60000, what: "s0 done" });
    const got = bySession(await appliedOf("lost-s"));
    assert.deepEqual(got.s0, Array.from({ length: per }, (_, i) => i), "s0 applied once each, in order");
    assert.deepEqual(got.s1, Array.from({ length: per }, (_, i) => i));
    await waitFor(async () => (await emu.entity("lost-s")).messages === 0, { what: "queue drained" });
    const e = await emu.entity("lost-s");
    assert.equal(e.completed, 2 * per);
    assert.ok(e.delivered > 2 * per, `the lost session's messages were delivered again (${e.delivered})`);
    const lost = (await pg.query("SELECT count(*)::int c FROM sbpg.retries WHERE subscription = 'lost-s'")).rows[0].c;
    assert.equal(lost, 0, "the retry row went with the outcome");
  });

  it("session state: a handler reads and replaces it; a later message sees it once applied, a rollback loses it; the broker gets it after commit", async () => {
    await pg.psql(`
      CREATE TABLE seen (pos bigserial PRIMARY KEY, session_id text, n int, state text);
      GRANT INSERT ON seen TO app;
      GRANT USAGE ON SEQUENCE seen_pos_seq TO app;
      CREATE FUNCTION apply_state(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      DECLARE
        old text;
      BEGIN
        IF m.body ? 'peek' THEN -- another session's state: refused
          PERFORM sbpg.session_state(m.body->>'peek');
        END IF;
        old := convert_from(sbpg.session_state(), 'UTF8');
        INSERT INTO public.seen (session_id, n, state) VALUES (m.session_id, (m.body->>'n')::int, old);
        PERFORM sbpg.set_session_state(convert_to(coalesce(old || ',', '') || (m.body->>'n'), 'UTF8'));
        IF m.body->>'fail' = 'permanent' THEN
          RAISE EXCEPTION 'failing after setting the state' USING ERRCODE = '22023';
        END IF;
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_state(sbpg.message) TO app;`);
    // s0: 0..4, the third fails after writing the state; s1: 0..2.
    await send("state-s", 2, 5, (s, n) => (s === 0 && n === 2 ? { fail: "permanent" } : {}));
    const peeker = sb.createSender("state-s");
    await peeker.sendMessages({ messageId: "state-s-peek", sessionId: "s9", body: { sub: "state-s", n: 0, peek: "s0" } });
    await peeker.close();
    await pg.psql(`SELECT sbpg.create_subscription('state-s', '${emu.amqp}', 'state-s', 'apply_state(sbpg.message)', 'app', 'emu',
      batch_size => 3, options => '{"session_idle_ms": 300}');`);
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.inbox WHERE subscription = 'state-s'")).rows[0].c) === 11,
      { timeout: 30000, what: "every message recorded" });
    assert.match((await pg.inboxReasons("state-s"))["state-s-peek"],
      /^HandlerError: sbpg.session_state\(\) is for a handler applying a message of that session \(SQLSTATE 55000; No message of session 's0' is being applied by this call/,
      "a handler reaches only the sessions of the messages it was given");
    const seen = (await pg.query("SELECT session_id, n, state FROM seen ORDER BY pos")).rows;
    const of = (sid) => seen.filter((r) => r.session_id === sid).map((r) => [r.n, r.state]);
    assert.deepEqual(of("s0"), [[0, null], [1, "0"], [3, "0,1"], [4, "0,1,3"]],
      "each message saw the state its predecessors left; the failed message's write was rolled back");
    assert.deepEqual(of("s1"), [[0, null], [1, "0"], [2, "0,1"], [3, "0,1,2"], [4, "0,1,2,3"]]);
    // Copied to the broker once committed.
    await waitFor(async () => (await pg.query(
      "SELECT count(*)::int c FROM sbpg.session_states WHERE subscription = 'state-s' AND version = synced_version")).rows[0].c === 2,
    { timeout: 30000, what: "both states accepted by the broker" });
    const db = await pg.query("SELECT session_id, convert_from(state, 'UTF8') s FROM sbpg.session_states WHERE subscription = 'state-s' ORDER BY 1");
    assert.deepEqual(db.rows.map((r) => [r.session_id, r.s]), [["s0", "0,1,3,4"], ["s1", "0,1,2,3,4"]]);
    // The worker releases idle sessions; the official SDK then reads the broker's copy.
    await waitFor(async () => (await emu.entity("state-s")).sessions_locked === 0, { what: "the sessions released" });
    await pg.query("SELECT sbpg.disable_subscription('state-s')");
    for (const [sid, want] of [["s0", "0,1,3,4"], ["s1", "0,1,2,3,4"]]) {
      const r = await sb.acceptSession("state-s", sid);
      try {
        assert.equal(Buffer.from(await r.getSessionState()).toString("utf8"), want, `the broker's state of ${sid}`);
      } finally {
        await r.close();
      }
    }
  });

  it("session_failure = stop: a message that fails for good stops its session until sbpg.resume_session tries it again or dead-letters it", async () => {
    await pg.query("UPDATE gate SET closed = true");
    const per = 5;
    // s0-1 fails while the gate is closed (fixed later); s1-2 always fails (dead-lettered on resume); s2 is fine.
    await send("stop-s", 3, per, (s, n) => (s === 0 && n === 1 ? { fail: "gated" } : s === 1 && n === 2 ? { fail: "permanent" } : {}));
    await pg.psql(`SELECT sbpg.create_subscription('stop-s', '${emu.amqp}', 'stop-s', 'apply_s(sbpg.message)', 'app', 'emu',
      batch_size => 10, options => '{"session_failure": "stop"}');`);
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.stopped_sessions WHERE subscription = 'stop-s'")).rows[0].c) === 2
      && (bySession(await appliedOf("stop-s")).s2?.length ?? 0) === per, { timeout: 30000, what: "two sessions stopped, the third done" });
    const stopped = (await pg.query("SELECT session_id, message_id, reason FROM sbpg.stopped_sessions WHERE subscription = 'stop-s' ORDER BY 1")).rows;
    assert.deepEqual(stopped.map((r) => [r.session_id, r.message_id]), [["s0", "stop-s-s0-1"], ["s1", "stop-s-s1-2"]]);
    assert.match(stopped[0].reason, /^HandlerError: message stop-s-s0-1 cannot be applied/);
    let got = bySession(await appliedOf("stop-s"));
    assert.deepEqual(got.s0, [0]);
    assert.deepEqual(got.s1, [0, 1]);
    const e = await emu.entity("stop-s");
    assert.equal(e.dead_lettered, 0, "nothing dead-lettered while stopped");
    assert.equal(e.deferrals, 0);
    const stoppedNote = listener.got.find((x) => x.subscription === "stop-s" && x.message_id === "stop-s-s0-1");
    assert.equal(stoppedNote.reason, "SessionStopped");
    assert.equal(stoppedNote.next_attempt_at, "infinity");
    // Resuming a session that is not stopped says so.
    await assert.rejects(pg.query("SELECT sbpg.resume_session('stop-s', 's2')"), /session 's2' of subscription "stop-s" is not stopped/);
    // The cause of s0's failure is fixed: try it again. s1's message is dead-lettered instead.
    await pg.query("UPDATE gate SET closed = false");
    assert.equal(Number((await pg.query("SELECT sbpg.resume_session('stop-s', 's0') n")).rows[0].n), 1);
    assert.equal(Number((await pg.query("SELECT sbpg.resume_session('stop-s', 's1', dead_letter => true) n")).rows[0].n), 1);
    await waitFor(async () => {
      const g = bySession(await appliedOf("stop-s"));
      return (g.s0?.length ?? 0) === per && (g.s1?.length ?? 0) === per - 1;
    }, { timeout: 30000, what: "both sessions done" });
    got = bySession(await appliedOf("stop-s"));
    assert.deepEqual(got.s0, [0, 1, 2, 3, 4], "s0 in order, its stopped message applied on resume");
    assert.deepEqual(got.s1, [0, 1, 3, 4], "s1 went on after its message was dead-lettered");
    assert.match((await pg.inboxReasons("stop-s"))["stop-s-s1-2"], /^HandlerError: message stop-s-s1-2 cannot be applied/);
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.stopped_sessions")).rows[0].c), 0);
    await waitFor(async () => (await emu.entity("stop-s")).messages === 0, { what: "queue drained" });
    assert.equal((await emu.entity("stop-s")).dead_lettered, 1);
  });
});
