// The transactional outbox (issue 16, docs/outbox.md): sbpg.send queues a message in the caller's
// transaction; the publisher's worker sends what committed transactions queued, in commit order per
// entity and session, marks each row sent or failed, and says so with NOTIFY. Read back with the
// official JavaScript SDK.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

// Every message of an entity, with the SDK (receive-and-delete), until `n` came.
async function drain(sb, entity, n, { session = false, timeout = 120000 } = {}) {
  const out = [];
  const deadline = Date.now() + timeout;
  if (!session) {
    const r = sb.createReceiver(entity, { receiveMode: "receiveAndDelete" });
    while (out.length < n && Date.now() < deadline)
      out.push(...(await r.receiveMessages(Math.min(2000, n - out.length), { maxWaitTimeInMs: 1000 })));
    await r.close();
    return out;
  }
  while (out.length < n && Date.now() < deadline) {
    let r;
    try {
      r = await sb.acceptNextSession(entity, { receiveMode: "receiveAndDelete", maxAutoLockRenewalDurationInMs: 0 });
    } catch {
      continue; // no session free yet
    }
    for (;;) {
      const got = await r.receiveMessages(2000, { maxWaitTimeInMs: 500 });
      if (!got.length) break;
      out.push(...got);
    }
    await r.close();
  }
  return out;
}

describe("transactional outbox", () => {
  let emu, pg, sb;

  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: [
          queue("events"),
          queue("many", { RequiresDuplicateDetection: true }),
          queue("bysession", { RequiresSession: true }),
          queue("dedup", { RequiresDuplicateDetection: true }),
          queue("replies"),
          queue("requests"),
          queue("mixed"),
          queue("replayq"),
          queue("stuck"),
          queue("free"),
        ],
      }),
      args: ["--sas-key", "RootManageSharedAccessKey=SAS_KEY_VALUE:Manage", "--sas-key", "listener=LISTEN_ONLY:Listen"],
    });
    pg = await startCluster();
    await installOrders(pg);
    await pg.psql(`
      CREATE ROLE writer LOGIN;
      CREATE ROLE stranger LOGIN;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.create_identity('listen-only', 'sas', '{"key_name": "listener", "key": "LISTEN_ONLY"}');
      SELECT sbpg.create_publisher('bus', '${emu.amqp}', 'emu', notify_channel => 'sent');
      SELECT sbpg.grant_publisher('bus', 'writer');
      CREATE TABLE ledger (id bigint PRIMARY KEY, note text);
      GRANT INSERT, SELECT ON ledger TO writer;`);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 3, timeoutInMs: 20000 } });
  });
  after(async () => {
    await sb?.close();
    const bad = pg?.unexpectedSignals?.() ?? [];
    await pg?.stop();
    await emu?.stop();
    assert.deepEqual(bad, [], "no process ended by a signal the test did not send");
  });

  it("sends what committed, with every field; nothing of a rolled-back transaction; NOTIFY and sent rows", { timeout: 120000 }, async () => {
    const listener = await pg.listen("sent");
    const c = await pg.client();
    await c.query("SET ROLE writer");
    await c.query("BEGIN");
    const ids = [];
    ids.push((await c.query(`SELECT sbpg.send('bus', 'events', '{"kind": "created", "n": 1}'::jsonb, message_id => 'm-json',
      correlation_id => 'corr-1', subject => 'order.created', reply_to => 'replies',
      properties => '{"tenant": "eu", "count": 3, "ratio": 0.5, "urgent": true, "none": null}',
      time_to_live => interval '1 hour') AS id`)).rows[0].id);
    ids.push((await c.query(`SELECT sbpg.send('bus', 'events', 'plain text body', message_id => 'm-text') AS id`)).rows[0].id);
    ids.push((await c.query(`SELECT sbpg.send('bus', 'events', '\\x00ff10'::bytea, content_type => 'application/octet-stream') AS id`)).rows[0].id);
    // What a message carries is data, never SQL: this body is sent byte for byte.
    ids.push((await c.query(`SELECT sbpg.send('bus', 'events', $1::text, message_id => 'm-sql') AS id`, ["'); DROP TABLE ledger; --"])).rows[0].id);
    await c.query("INSERT INTO ledger VALUES (1, 'with four messages')");
    // Nothing leaves before the commit.
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal((await emu.entity("events")).messages, 0, "nothing sent before the commit");
    await c.query("COMMIT");
    await c.query("BEGIN");
    await c.query(`SELECT sbpg.send('bus', 'events', '{"kind": "never"}'::jsonb, message_id => 'm-rolled-back')`);
    await c.query("ROLLBACK");
    await c.end();

    const got = await drain(sb, "events", 4);
    assert.equal(got.length, 4);
    const byId = Object.fromEntries(got.map((m) => [m.messageId, m]));
    const j = byId["m-json"];
    assert.deepEqual(j.body, { kind: "created", n: 1 }, "a jsonb body arrives as JSON");
    assert.equal(j.contentType, "application/json");
    assert.equal(j.correlationId, "corr-1");
    assert.equal(j.subject, "order.created");
    assert.equal(j.replyTo, "replies");
    assert.deepEqual({ ...j.applicationProperties }, { tenant: "eu", count: 3, ratio: 0.5, urgent: true, none: null });
    assert.equal(j.timeToLive, 3600000);
    assert.equal(String(byId["m-text"].body), "plain text body");
    assert.equal(byId["m-text"].contentType, "text/plain; charset=utf-8");
    assert.equal(String(byId["m-sql"].body), "'); DROP TABLE ledger; --");
    const bin = got.find((m) => !["m-json", "m-text", "m-sql"].includes(m.messageId));
    assert.deepEqual([...Buffer.from(bin.body)], [0x00, 0xff, 0x10], "a bytea body arrives byte for byte");
    assert.match(bin.messageId, /^[0-9a-f-]{36}$/, "a message id of its own when none is given");
    assert.ok(!got.some((m) => m.messageId === "m-rolled-back"));
    assert.equal(Number((await pg.query("SELECT count(*) c FROM ledger")).rows[0].c), 1, "the ledger is still there");

    const rows = (await pg.query("SELECT id, status, sent_at IS NOT NULL AS stamped, message_id FROM sbpg.outbox WHERE id = ANY($1) ORDER BY id", [ids])).rows;
    assert.deepEqual(rows.map((r) => [r.status, r.stamped]), ids.map(() => ["sent", true]));
    await waitFor(() => listener.got.length >= 4, { what: "four NOTIFYs" });
    assert.deepEqual(listener.got.map((n) => [n.publisher, n.entity, n.status, n.reason]), ids.map(() => ["bus", "events", "sent", null]));
    assert.deepEqual(listener.got.map((n) => String(n.id)).sort(), ids.map(String).sort());
    await listener.close();
    const st = (await pg.query("SELECT state, queued, sent, failed FROM sbpg.publisher_stats WHERE publisher = 'bus'")).rows[0];
    assert.equal(st.state, "connected");
    assert.equal(Number(st.queued), 0);
    assert.ok(Number(st.sent) >= 4);
  });

  it("20,000 messages from 8 concurrent sessions arrive once each, only committed ones, in commit order per entity and session", { timeout: 600000 }, async () => {
    const sessions = 8, txPerSession = 125, perTx = 20; // 8 × 125 × 20 = 20,000 queued, some rolled back
    const committed = []; // { s, t, begin, end, ids: [message ids] }
    let rolledBack = 0;
    await Promise.all(Array.from({ length: sessions }, async (_, s) => {
      const c = await pg.client();
      await c.query("SET ROLE writer");
      for (let t = 0; t < txPerSession; ++t) {
        const begin = performance.now();
        await c.query("BEGIN");
        const ids = [];
        for (let k = 0; k < perTx; ++k) {
          const mid = `s${s}-t${t}-k${k}`;
          ids.push(mid);
          // Even messages to a plain queue (order per entity), odd ones to a session queue with a
          // session per SQL session (order per session id).
          if (k % 2 === 0)
            await c.query("SELECT sbpg.send('bus', 'many', $1::jsonb, message_id => $2)", [JSON.stringify({ s, t, k }), mid]);
          else
            await c.query("SELECT sbpg.send('bus', 'bysession', $1::jsonb, message_id => $2, session_id => $3)", [JSON.stringify({ s, t, k }), mid, `sql-${s}`]);
        }
        if (t % 10 === 7) {
          await c.query("ROLLBACK");
          rolledBack += perTx;
        } else {
          await c.query("COMMIT");
          committed.push({ s, t, begin, end: performance.now(), ids });
        }
      }
      await c.end();
    }));
    const expected = committed.length * perTx;
    assert.equal(expected + rolledBack, 20000);
    const plain = await drain(sb, "many", expected / 2, { timeout: 300000 });
    const bySession = await drain(sb, "bysession", expected / 2, { session: true, timeout: 300000 });
    const all = [...plain, ...bySession];
    const seen = new Map();
    for (const m of all) seen.set(m.messageId, (seen.get(m.messageId) ?? 0) + 1);
    const want = new Set(committed.flatMap((x) => x.ids));
    assert.equal(all.length, expected, `every committed message arrived (${all.length} of ${expected})`);
    assert.deepEqual([...seen.values()].filter((n) => n > 1), [], "none twice");
    assert.deepEqual([...seen.keys()].filter((id) => !want.has(id)), [], "none from a rolled-back transaction");

    // Order: a message's broker sequence number is larger than that of every message (of the same
    // entity, or of the same session) queued before it in its transaction, or by a transaction that
    // committed before its own began.
    const seqOf = new Map(all.map((m) => [m.messageId, BigInt(m.sequenceNumber.toString())]));
    const check = (entityOf) => {
      const txs = committed.map((x) => ({ ...x, ids: x.ids.filter(entityOf) }));
      let inversions = 0;
      for (const x of txs)
        for (let i = 1; i < x.ids.length; ++i) if (seqOf.get(x.ids[i - 1]) >= seqOf.get(x.ids[i])) ++inversions;
      const byEnd = [...txs].sort((a, b) => a.end - b.end);
      let maxSoFar = -1n, j = 0;
      for (const x of [...txs].sort((a, b) => a.begin - b.begin)) {
        while (j < byEnd.length && byEnd[j].end < x.begin) {
          for (const id of byEnd[j].ids) if (seqOf.get(id) > maxSoFar) maxSoFar = seqOf.get(id);
          ++j;
        }
        for (const id of x.ids) if (seqOf.get(id) <= maxSoFar) ++inversions;
      }
      return inversions;
    };
    const k = (id) => Number(id.split("-k")[1]);
    assert.equal(check((id) => k(id) % 2 === 0), 0, "commit order on the plain queue");
    for (let s = 0; s < sessions; ++s)
      assert.equal(check((id) => k(id) % 2 === 1 && id.startsWith(`s${s}-`)), 0, `commit order in session sql-${s}`);
    assert.ok(bySession.every((m) => m.sessionId === `sql-${m.messageId.split("-")[0].slice(1)}`), "session ids as given");
    const counts = (await pg.query("SELECT status, count(*)::int n FROM sbpg.outbox WHERE entity IN ('many', 'bysession') GROUP BY status")).rows;
    assert.deepEqual(counts, [{ status: "sent", n: expected }]);
  });

  it("a permanent failure fails only its row, with the reason; the others are delivered", { timeout: 120000 }, async () => {
    await pg.psql(`SELECT sbpg.create_publisher('listen-only', '${emu.amqp}', 'listen-only', notify_channel => 'sent')`);
    const listener = await pg.listen("sent");
    const big = "x".repeat(300000); // over sbemu's (and the Standard tier's) 256 KB
    const r = (await pg.query(`SELECT
        sbpg.send('bus', 'mixed', 'first') AS a,
        sbpg.send('bus', 'no-such-queue', 'lost') AS b,
        sbpg.send('bus', 'mixed', $1::text, message_id => 'too-big') AS c,
        sbpg.send('bus', 'mixed', 'last') AS d,
        sbpg.send('listen-only', 'mixed', 'unauthorised') AS e`, [big])).rows[0];
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE id = ANY($1) AND status <> 'queued'", [Object.values(r)])).rows[0].c) === 5,
      { timeout: 60000, what: "a verdict for each" }).catch(async (e) => {
      console.log(JSON.stringify((await pg.query("SELECT id, publisher, entity, status, attempts, error FROM sbpg.outbox WHERE id = ANY($1)", [Object.values(r)])).rows));
      console.log(JSON.stringify((await pg.query("SELECT * FROM sbpg.publisher_stats")).rows));
      throw e;
    });
    const rows = Object.fromEntries((await pg.query("SELECT id, status, error FROM sbpg.outbox WHERE id = ANY($1)", [Object.values(r)])).rows.map((x) => [x.id, x]));
    assert.equal(rows[r.a].status, "sent");
    assert.equal(rows[r.d].status, "sent");
    assert.equal(rows[r.b].status, "failed");
    assert.match(rows[r.b].error, /not-found|does not exist|no-such-queue/i);
    assert.equal(rows[r.c].status, "failed");
    assert.match(rows[r.c].error, /message-size-exceeded/);
    assert.equal(rows[r.e].status, "failed");
    assert.match(rows[r.e].error, /unauthorized-access/);
    const view = (await pg.query("SELECT id, publisher, entity, error FROM sbpg.outbox_failures WHERE id = ANY($1) ORDER BY id", [Object.values(r)])).rows;
    assert.deepEqual(view.map((x) => x.id).sort(), [r.b, r.c, r.e].sort());
    await waitFor(() => listener.got.filter((n) => n.status === "failed").length >= 3, { what: "NOTIFYs of the failures" });
    // A notification carries the reason code only, never the broker's description.
    const codes = listener.got.filter((n) => n.status === "failed").map((n) => n.reason).sort();
    assert.deepEqual(codes, ["amqp:link:message-size-exceeded", "amqp:not-found", "amqp:unauthorized-access"].sort());
    assert.ok(listener.got.every((n) => !("error" in n)));
    const got = await drain(sb, "mixed", 2);
    assert.deepEqual(got.map((m) => String(m.body)), ["first", "last"]);
    await listener.close();
    // A failed row can be queued again once its cause is fixed (here: nothing will fix it).
    assert.equal(Number((await pg.query("SELECT sbpg.requeue('bus', ARRAY[$1::bigint]) n", [r.c])).rows[0].n), 1);
    await waitFor(async () => (await pg.query("SELECT status FROM sbpg.outbox WHERE id = $1", [r.c])).rows[0].status === "failed", { what: "failed again" });
  });

  it("only roles the publisher was granted to may send through it", async () => {
    const c = await pg.client();
    await c.query("SET ROLE stranger");
    await assert.rejects(c.query("SELECT sbpg.send('bus', 'events', 'no')"), (e) => e.code === "42501" && /permission denied to send through publisher "bus"/.test(e.message) && /grant_publisher/.test(e.hint));
    await assert.rejects(c.query("SELECT * FROM sbpg.outbox"), (e) => e.code === "42501");
    await assert.rejects(c.query("SELECT sbpg.create_publisher('mine', 'amqp://127.0.0.1:1')"), (e) => e.code === "42501");
    await c.query("RESET ROLE");
    await c.query("SELECT sbpg.grant_publisher('bus', 'stranger')");
    await c.query("SET ROLE stranger");
    assert.ok((await c.query("SELECT sbpg.send('bus', 'events', 'now yes') id")).rows[0].id);
    await c.query("RESET ROLE");
    await c.query("SELECT sbpg.revoke_publisher('bus', 'stranger')");
    await c.query("SET ROLE stranger");
    await assert.rejects(c.query("SELECT sbpg.send('bus', 'events', 'no again')"), (e) => e.code === "42501");
    await assert.rejects(c.query("SELECT sbpg.send('nope', 'events', 'x')"), (e) => e.code === "42704");
    await c.end();
    await assert.rejects(pg.query("SELECT sbpg.send('bus', 'events/subscriptions/x', 'x')"), (e) => e.code === "22023");
    await assert.rejects(pg.query(`SELECT sbpg.send('bus', 'events', 'x', properties => '{"a": [1]}')`), (e) => e.code === "22023");
    // Values the worker could not send are refused when queued (one such row would otherwise stop
    // the publisher's reads for everyone).
    await assert.rejects(pg.query("SELECT sbpg.send('bus', 'events', 'x', scheduled_at => 'infinity')"), (e) => e.code === "22023");
    await assert.rejects(pg.query("SELECT sbpg.send('bus', 'events', 'x', time_to_live => 'infinity')"), (e) => ["22023", "22007", "22008"].includes(e.code));
    await assert.rejects(pg.query("SELECT sbpg.send('bus', 'events', pg_catalog.repeat('x', 1048577))"), (e) => e.code === "54000");
    await assert.rejects(pg.query("SELECT sbpg.send('bus', 'events', 'x', content_type => E'text/\\x01')"), (e) => e.code === "22023");
    // Dropping a publisher with messages waiting is refused unless they are discarded on purpose.
    await pg.psql(`SELECT sbpg.create_publisher('idle', 'amqp://127.0.0.1:1', enabled => false); SELECT sbpg.send('idle', 'q', 'waits');`);
    await assert.rejects(pg.query("SELECT sbpg.drop_publisher('idle')"), (e) => e.code === "2BP01" && /1 messages waiting/.test(e.message));
    await pg.query("SELECT sbpg.drop_publisher('idle', discard_queued => true)");
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE publisher = 'idle'")).rows[0].c), 0);
    await drain(sb, "events", 1);
  });

  it("a handler's sends carry the incoming message's trace context, and its message id as correlation id", { timeout: 60000 }, async () => {
    await pg.psql(`
      SELECT sbpg.grant_publisher('bus', 'app');
      CREATE FUNCTION answer(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        PERFORM sbpg.send('bus', 'replies', pg_catalog.jsonb_build_object('answer', m.body->>'q'));
        PERFORM sbpg.send('bus', 'replies', '{"second": true}'::jsonb, correlation_id => 'given');
      END $f$;
      GRANT EXECUTE ON FUNCTION answer(sbpg.message) TO app;
      SELECT sbpg.create_subscription('requests', '${emu.amqp}', 'requests', 'answer(sbpg.message)', 'app', 'emu');`);
    const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const s = sb.createSender("requests");
    await s.sendMessages({ messageId: "req-1", body: { q: "why" }, applicationProperties: { traceparent: tp } });
    await s.close();
    const got = await drain(sb, "replies", 2, { timeout: 60000 });
    const first = got.find((m) => m.body.answer === "why");
    const second = got.find((m) => m.body.second === true);
    assert.equal(first.correlationId, "req-1");
    assert.equal(first.applicationProperties.traceparent, tp);
    assert.equal(first.applicationProperties["Diagnostic-Id"], tp);
    assert.equal(second.correlationId, "given", "a correlation id given wins");
    assert.equal(second.applicationProperties.traceparent, tp);
    // Outside a handler there is none.
    await pg.query("SELECT sbpg.send('bus', 'replies', 'plain')");
    const third = (await drain(sb, "replies", 1))[0];
    assert.equal(third.applicationProperties?.traceparent, undefined);
    assert.equal(third.correlationId, undefined);
    await pg.psql("SELECT sbpg.drop_subscription('requests')");
  });

  it("with duplicate detection the broker keeps one copy through publisher kills and server-busy", { timeout: 300000 }, async () => {
    const n = 5000;
    await emu.fault("server-busy-sends", { count: 20 });
    // Slow answers keep messages in flight, so that the kills come while the broker holds messages
    // whose rows are not marked sent yet: those are sent again, and dropped as duplicates.
    await emu.fault("delay-dispositions", { ms: 100 });
    const c = await pg.client();
    for (let i = 0; i < n; i += 500)
      await c.query("SELECT sbpg.send('bus', 'dedup', pg_catalog.jsonb_build_object('i', g), message_id => 'd-' || g) FROM generate_series($1::int, $2::int) g", [i, i + 499]);
    await c.end();
    const publisherPid = async () => (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg publisher'")).rows[0]?.pid;
    for (let k = 0; k < 3; ++k) {
      const pid = await waitFor(publisherPid, { timeout: 60000, what: "the publisher running" });
      await waitFor(async () => (await emu.entity("dedup")).messages >= (k + 1) * 600, { timeout: 60000, what: "some sent" });
      pg.kill(pid);
      await waitFor(async () => { const p = await publisherPid(); return p && p !== pid; }, { timeout: 60000, what: "the publisher back" });
      await emu.fault("drop-connections");
    }
    await emu.fault("clear");
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE entity = 'dedup' AND status = 'sent'")).rows[0].c) === n,
      { timeout: 240000, interval: 500, what: "every row sent" });
    const e = await emu.entity("dedup");
    assert.equal(e.messages, n, `one copy of each on the broker (${e.messages}; ${e.duplicates} resends dropped as duplicates)`);
    const tries = (await pg.query("SELECT max(attempts) m, count(*) FILTER (WHERE attempts > 1) n FROM sbpg.outbox WHERE entity = 'dedup'")).rows[0];
    assert.ok(Number(tries.m) > 1, `server-busy answers were retried (${tries.n} rows needed more than one attempt)`);
    console.log(`dedup: ${n} messages, ${e.duplicates} resends dropped by duplicate detection, ${tries.n} rows sent more than once`);
  });

  it("an entity that cannot send holds up no other; its rows go out, once each and in order, when it can", { timeout: 240000 }, async () => {
    await pg.psql(`SELECT sbpg.create_publisher('small', '${emu.amqp}', 'emu', notify_channel => NULL, options => '{"batch_size": 10, "max_pending": 100}')`);
    await emu.fault("server-busy-sends", { count: 1000000, entity: "stuck" });
    // Three times what the worker may hold in memory for the stuck entity, queued first.
    await pg.query("SELECT sbpg.send('small', 'stuck', pg_catalog.jsonb_build_object('i', g), message_id => 'stuck-' || g) FROM generate_series(1, 300) g");
    await pg.query("SELECT sbpg.send('small', 'free', pg_catalog.jsonb_build_object('i', g), message_id => 'free-' || g) FROM generate_series(1, 100) g");
    await waitFor(async () => (await emu.entity("free")).messages === 100, { timeout: 60000, what: "the other entity's 100 sent" });
    assert.equal((await emu.entity("stuck")).messages, 0, "nothing got through to the stuck entity");
    const st = (await pg.query("SELECT queued, last_error FROM sbpg.publisher_stats WHERE publisher = 'small'")).rows[0];
    assert.equal(Number(st.queued), 300);
    assert.match(st.last_error, /server-busy/);
    await emu.fault("clear");
    await waitFor(async () => (await emu.entity("stuck")).messages === 300, { timeout: 180000, interval: 500, what: "the stuck entity's 300 sent" });
    const got = await drain(sb, "stuck", 300);
    assert.equal(got.length, 300);
    assert.equal(new Set(got.map((m) => m.messageId)).size, 300, "once each");
    const bySeq = [...got].sort((a, b) => (BigInt(a.sequenceNumber.toString()) < BigInt(b.sequenceNumber.toString()) ? -1 : 1));
    assert.deepEqual(bySeq.map((m) => m.body.i), [...Array(300).keys()].map((i) => i + 1), "in the order queued");
    await drain(sb, "free", 100);
    await pg.psql("SELECT sbpg.drop_publisher('small')");
  });

  it("a refused token and lost connections are retried: nothing is lost or failed", { timeout: 150000 }, async () => {
    const before = Number((await pg.query("SELECT reconnects FROM sbpg.publisher_stats WHERE publisher = 'bus'")).rows[0].reconnects);
    await emu.fault("reject-tokens", { count: 3 });
    await emu.fault("drop-connections");
    await pg.query("SELECT sbpg.send('bus', 'events', pg_catalog.jsonb_build_object('n', g), message_id => 'tok-' || g) FROM generate_series(1, 50) g");
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE message_id LIKE 'tok-%' AND status = 'sent'")).rows[0].c) === 50,
      { timeout: 120000, interval: 500, what: "the 50 sent after the refusals" });
    const got = await drain(sb, "events", 50);
    assert.equal(new Set(got.map((m) => m.messageId)).size, 50);
    const st = (await pg.query("SELECT reconnects, failed_rows FROM sbpg.publisher_stats WHERE publisher = 'bus'")).rows[0];
    assert.ok(Number(st.reconnects) > before, `reconnected (${st.reconnects})`);
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE message_id LIKE 'tok-%' AND status = 'failed'")).rows[0].c), 0);
    assert.match(pg.serverLog(), /put-token for sb:\/\/[^ ]+ was refused \(401/, "the refusal is in the server log");
  });

  it("sent rows are removed after sbpg.outbox_retention; queued and failed ones are kept", { timeout: 120000 }, async () => {
    const before = Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'sent'")).rows[0].c);
    assert.ok(before > 20000, `sent rows from the earlier tests (${before})`);
    const failed = Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'failed'")).rows[0].c);
    assert.ok(failed > 0);
    await pg.query("ALTER SYSTEM SET sbpg.outbox_retention = '2s'");
    await pg.query("SELECT pg_reload_conf()");
    try {
      await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'sent'")).rows[0].c) === 0,
        { timeout: 90000, interval: 500, what: "every sent row removed" });
      assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'failed'")).rows[0].c), failed, "failed rows kept");
    } finally {
      await pg.query("ALTER SYSTEM RESET sbpg.outbox_retention");
      await pg.query("SELECT pg_reload_conf()");
    }
  });

  it("dead-letter replay: 50 dead-lettered by a failing handler, listed, replayed once the handler is fixed, each applied once", { timeout: 180000 }, async () => {
    await pg.psql(`
      CREATE TABLE replay_gate (broken boolean NOT NULL);
      INSERT INTO replay_gate VALUES (true);
      CREATE TABLE replayed (message_id text, dl_seq bigint, seq bigint, body jsonb);
      GRANT SELECT ON replay_gate TO app;
      GRANT INSERT ON replayed TO app;
      CREATE FUNCTION apply_replay(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (SELECT broken FROM public.replay_gate) THEN
          RAISE EXCEPTION 'the handler is broken' USING ERRCODE = '22023';
        END IF;
        INSERT INTO public.replayed VALUES (m.message_id, (m.properties->>'DeadLetterSequenceNumber')::bigint, m.sequence_number, m.body);
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_replay(sbpg.message) TO app;
      SELECT sbpg.create_subscription('replayq', '${emu.amqp}', 'replayq', 'apply_replay(sbpg.message)', 'app', 'emu');`);
    const s = sb.createSender("replayq");
    await s.sendMessages(Array.from({ length: 50 }, (_, i) => ({ messageId: `r-${i}`, body: { i }, applicationProperties: { origin: "test", n: i } })));
    await s.close();
    await waitFor(async () => (await emu.entity("replayq")).dead_lettered === 50, { timeout: 60000, what: "50 dead-lettered" });

    const listed = (await pg.query("SELECT * FROM sbpg.dead_letters('replayq', 100)")).rows;
    assert.equal(listed.length, 50, "all 50 listed");
    assert.ok(listed.every((r) => r.reason && /22023|broken/i.test(`${r.reason} ${r.description}`)), "with the reason and description sbpg gave");
    assert.deepEqual(listed.map((r) => JSON.parse(Buffer.from(r.body).toString()).i).sort((a, b) => a - b), [...Array(50).keys()]);
    assert.ok(listed.every((r) => r.properties.origin === "test"));
    assert.equal((await emu.entity("replayq")).dead_lettered, 50, "peeking removed nothing");
    const paged = (await pg.query("SELECT sequence_number FROM sbpg.dead_letters('replayq', 10, from_sequence => $1)", [Number(listed[45].sequence_number)])).rows;
    assert.ok(paged.length >= 5 && paged.every((r) => Number(r.sequence_number) >= Number(listed[45].sequence_number)), "paged by sequence number");

    await pg.query("UPDATE replay_gate SET broken = false");
    const seqs = listed.slice(0, 25).map((r) => r.sequence_number);
    const bySeq = (await pg.query("SELECT * FROM sbpg.replay_dead_letters('replayq', sequence_numbers => $1::bigint[])", [seqs])).rows;
    assert.equal(bySeq.length, 25);
    assert.ok(bySeq.every((r) => r.outcome === "replayed"), JSON.stringify(bySeq.filter((r) => r.outcome !== "replayed")));
    const byReason = (await pg.query("SELECT * FROM sbpg.replay_dead_letters('replayq', reason => $1)", [listed[0].reason])).rows;
    assert.equal(byReason.length, 25, "the other 25 by their reason");
    assert.ok(byReason.every((r) => r.outcome === "replayed"));
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM replayed")).rows[0].c) >= 50, { timeout: 60000, what: "50 applied" });
    assert.equal((await emu.entity("replayq")).dead_lettered, 0, "the dead-letter queue is empty");
    // Replaying again finds nothing: nothing is applied twice.
    assert.equal((await pg.query("SELECT * FROM sbpg.replay_dead_letters('replayq', reason => $1)", [listed[0].reason])).rows.length, 0);
    assert.equal((await pg.query("SELECT * FROM sbpg.replay_dead_letters('replayq', sequence_numbers => $1::bigint[])", [seqs])).rows.length, 0);
    await new Promise((r) => setTimeout(r, 1000));
    const rows = (await pg.query("SELECT message_id, dl_seq, body FROM replayed ORDER BY message_id")).rows;
    assert.equal(rows.length, 50, "each applied exactly once");
    assert.equal(new Set(rows.map((r) => r.message_id)).size, 50);
    const dlSeqs = new Set(listed.map((r) => String(r.sequence_number)));
    assert.ok(rows.every((r) => dlSeqs.has(String(r.dl_seq))), "each names its dead-letter sequence number");
    assert.ok(rows.every((r) => typeof r.body.i === "number"), "with its original body");
    // Who may: only who manages the subscription.
    const c = await pg.client();
    await c.query("SET ROLE stranger");
    await assert.rejects(c.query("SELECT * FROM sbpg.dead_letters('replayq')"), (e) => e.code === "42501");
    await assert.rejects(c.query("SELECT * FROM sbpg.replay_dead_letters('replayq', reason => 'x')"), (e) => e.code === "42501");
    await c.end();
    await assert.rejects(pg.query("SELECT * FROM sbpg.replay_dead_letters('replayq')"), (e) => e.code === "22023");
    await pg.psql("SELECT sbpg.drop_subscription('replayq')");
  });
});
