// sbpg end to end: the official SDK sends, the worker applies through SPI as run_as, LISTEN sees
// the confirmations, sbemu's DLQ holds what could not be applied, with its reason.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, appliesOf, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

describe("sbpg core", () => {
  let emu, pg, sb, listener;
  const url = () => emu.amqp;
  const subscribe = (name, entity, handler = "apply_order", extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${url()}', '${entity}', '${handler}(sbpg.message)', 'app', 'emu'${extra});`);
  const sendAll = async (entity, msgs) => {
    const s = sb.createSender(entity);
    for (let i = 0; i < msgs.length; i += 500) await s.sendMessages(msgs.slice(i, i + 500));
    await s.close();
  };

  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: ["bulk", "mixed", "chunks", "raw", "perm", "transient", "rls", "restricted", "side-a", "side-b", "fields", "promoted"].map((n) =>
          queue(n, { MaxDeliveryCount: 5 })),
        topics: [{ Name: "events", Properties: {}, Subscriptions: [{ Name: "audit", Properties: {} }] }],
      }),
    });
    pg = await startCluster();
    await installOrders(pg);
    await pg.psql(`SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    listener = await pg.listen();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("turns 20,000 valid messages into exactly 20,000 rows and 20,000 applied notifications", async () => {
    await subscribe("bulk", "bulk");
    const n = 20000;
    await sendAll("bulk", Array.from({ length: n }, (_, i) => ({ messageId: `b-${i}`, body: { id: i, amount: i % 100 } })));
    await waitFor(() => listener.got.filter((x) => x.subscription === "bulk").length >= n, { timeout: 120000, what: "20,000 notifications" });
    const mine = listener.got.filter((x) => x.subscription === "bulk");
    assert.equal(mine.length, n);
    assert.equal(mine.filter((x) => x.status === "applied").length, n);
    assert.equal(new Set(mine.map((x) => x.sequence_number)).size, n, "one notification per message");
    const rows = await pg.query("SELECT count(*)::int AS c, count(DISTINCT seq)::int AS s FROM orders WHERE id < 100000");
    assert.equal(rows.rows[0].c, n);
    assert.equal(rows.rows[0].s, n);
    assert.deepEqual(await appliesOf(pg, "id < 100000"), { rows: n, messages: n, twice: [] }, "each applied exactly once");
    const inbox = await pg.query("SELECT count(*)::int AS c FROM sbpg.inbox WHERE subscription = 'bulk' AND status = 'applied'");
    assert.equal(inbox.rows[0].c, n);
    await waitFor(async () => (await emu.entity("bulk")).completed === n, { what: "all completed on the broker" });
    assert.equal((await emu.entity("bulk")).messages, 0);
    // The worker reports its table statistics, so autovacuum sees the inbox grow (and analyzes it).
    await waitFor(async () => Number((await pg.query(
      "SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'sbpg.inbox'::regclass")).rows[0].n_tup_ins) >= n,
      { what: "the inbox inserts in pg_stat_all_tables" });
    const sample = mine[0];
    assert.deepEqual(Object.keys(sample).sort(), ["attempts", "correlation_id", "message_id", "reason", "sequence_number", "status", "subscription", "traceparent", "xid"]);
    assert.equal(sample.attempts, 1);
    assert.match(sample.xid, /^[0-9]+$/);
  });

  it("dead-letters invalid JSON and handler errors with their reason, and only those", async () => {
    await subscribe("mixed", "mixed");
    const s = sb.createSender("mixed");
    await s.sendMessages([
      { messageId: "ok-1", body: { id: 200001, amount: 5 } },
      { messageId: "bad-json", body: Buffer.from('{"id": 3,'), contentType: "application/json" },
      { messageId: "negative", body: { id: 200002, amount: -1 } },
      { messageId: "ok-2", body: { id: 200003, amount: 7 } },
      { messageId: "dup-key", body: { id: 200001, amount: 1 } },
      { messageId: "not-a-number", body: { id: 200004, amount: "lots" } },
    ]);
    await s.close();
    await waitFor(() => listener.got.filter((x) => x.subscription === "mixed").length >= 6, { what: "6 notifications" });
    const byId = Object.fromEntries(listener.got.filter((x) => x.subscription === "mixed").map((x) => [x.message_id, x]));
    assert.equal(byId["ok-1"].status, "applied");
    assert.equal(byId["ok-2"].status, "applied");
    for (const id of ["bad-json", "negative", "dup-key", "not-a-number"]) assert.equal(byId[id].status, "dead_lettered", id);
    // NOTIFY carries the reason code; the inbox keeps the description.
    assert.deepEqual(["bad-json", "negative", "dup-key", "not-a-number"].map((id) => byId[id].reason),
      ["InvalidJson", "HandlerError", "HandlerError", "HandlerError"]);
    const why = await pg.inboxReasons("mixed");
    assert.match(why["bad-json"], /^InvalidJson: /);
    assert.match(why["negative"], /check constraint "orders_amount_check"/);
    assert.match(why["dup-key"], /duplicate key value/);
    assert.match(why["not-a-number"], /invalid input syntax for type numeric/);
    const rows = await pg.query("SELECT id FROM orders WHERE id > 200000 ORDER BY id");
    assert.deepEqual(rows.rows.map((r) => Number(r.id)), [200001, 200003]);
    const dlq = sb.createReceiver("mixed", { subQueueType: "deadLetter" });
    const dead = [];
    while (dead.length < 4) dead.push(...(await dlq.receiveMessages(4 - dead.length, { maxWaitTimeInMs: 3000 })));
    const reasons = Object.fromEntries(dead.map((m) => [m.messageId, m.deadLetterReason]));
    assert.deepEqual(reasons, { "bad-json": "InvalidJson", negative: "HandlerError", "dup-key": "HandlerError", "not-a-number": "HandlerError" });
    assert.match(dead.find((m) => m.messageId === "negative").deadLetterErrorDescription, /SQLSTATE 23514/);
    for (const m of dead) await dlq.completeMessage(m);
    await dlq.close();
    assert.equal((await emu.entity("mixed")).messages, 0, "nothing left behind");
  });

  it("isolates a failing batch message by message, at most 50 subtransactions per transaction", async () => {
    // The worker takes what has arrived, so the batch sizes are made certain: the first batch
    // blocks on a lock on orders while the 120 messages reach the worker (prefetch 200), and each
    // later batch takes a full 100 of them. Whatever the first batch took, the batch holding c-59
    // (the bad one) then holds more than 50 messages.
    await sendAll("chunks", Array.from({ length: 120 }, (_, i) =>
      ({ messageId: `c-${i}`, body: { id: 300000 + i, amount: i === 59 ? -1 : 1 } })));
    const blocker = await pg.client();
    await blocker.query("BEGIN");
    await blocker.query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE");
    await subscribe("chunks", "chunks", "apply_order", ", batch_size => 100, prefetch => 200");
    await waitFor(async () => (await emu.entity("chunks")).locked === 120, { what: "all 120 held by the worker" });
    await blocker.query("ROLLBACK");
    await blocker.end();
    await waitFor(() => listener.got.filter((x) => x.subscription === "chunks").length >= 120, { what: "120 notifications" });
    const m = /subscription "chunks": a batch of (\d+) was applied message by message after: .*orders_amount_check/.exec(pg.serverLog());
    assert.ok(m, "the isolation is logged");
    const batch = Number(m[1]);
    assert.ok(batch > 50 && batch <= 100, `the isolated batch held ${batch} messages, more than 50 and at most batch_size`);
    // The transactions, in delivery order: runs of inbox rows with one xid. Those of the isolated
    // batch are consecutive runs around c-59's that hold the whole batch, each of at most 50.
    const rows = (await pg.query(
      "SELECT message_id, xid::text FROM sbpg.inbox WHERE subscription = 'chunks' ORDER BY sequence_number")).rows;
    assert.equal(rows.length, 120);
    const runs = [];
    for (const r of rows) {
      if (runs.length && runs.at(-1).xid === r.xid) runs.at(-1).ids.push(r.message_id);
      else runs.push({ xid: r.xid, ids: [r.message_id] });
    }
    assert.equal(new Set(runs.map((r) => r.xid)).size, runs.length, "each transaction holds consecutive messages");
    const bad = runs.findIndex((r) => r.ids.includes("c-59"));
    let split = null;
    for (let from = 0; from <= bad && !split; from++) {
      let n = 0;
      for (let to = from; to < runs.length && runs[to].ids.length <= 50; to++) {
        n += runs[to].ids.length;
        if (to >= bad && n === batch) {
          split = runs.slice(from, to + 1);
          break;
        }
      }
    }
    assert.ok(split, `the ${batch} messages of the isolated batch lie in transactions of at most 50: ${runs.map((r) => r.ids.length).join(", ")}`);
    assert.ok(split.length >= Math.ceil(batch / 50), `split into ${split.length} transactions`);
    // Each applied message's handler ran in the transaction the inbox names.
    const mismatched = (await pg.query(`SELECT count(*)::int n FROM sbpg.inbox i JOIN orders_applies a USING (message_id)
      WHERE i.subscription = 'chunks' AND i.xid::text <> a.xid::text`)).rows[0].n;
    assert.equal(mismatched, 0);
    const dead = listener.got.filter((x) => x.subscription === "chunks" && x.status === "dead_lettered");
    assert.deepEqual(dead.map((x) => x.message_id), ["c-59"]);
    assert.equal(Number((await pg.query("SELECT count(*) c FROM orders WHERE id >= 300000 AND id < 400000")).rows[0].c), 119);
    const applies = await appliesOf(pg, "id >= 300000 AND id < 400000");
    assert.deepEqual(applies, { rows: 119, messages: 119, twice: [] }, "each applied once");
  });

  it("hands non-JSON bodies to the handler as raw_body with body NULL", async () => {
    await pg.psql(`
      CREATE TABLE raw_seen (message_id text, body jsonb, raw text, content_type text, props jsonb, subject text);
      GRANT INSERT ON raw_seen TO app;
      CREATE FUNCTION keep_raw(m sbpg.message) RETURNS void LANGUAGE sql AS $$
        INSERT INTO public.raw_seen VALUES (m.message_id, m.body, convert_from(m.raw_body, 'UTF8'), m.content_type, m.properties, m.subject) $$;
      GRANT EXECUTE ON FUNCTION keep_raw(sbpg.message) TO app;`);
    await subscribe("raw", "raw", "keep_raw");
    const s = sb.createSender("raw");
    await s.sendMessages([
      { messageId: "plain", body: Buffer.from("hello, not json") },
      { messageId: "text", body: Buffer.from('{"looks": "like json"}'), contentType: "text/plain" },
      { messageId: "json", body: { a: [1, 2, { b: null }] }, subject: "s", applicationProperties: { region: "eu", n: 3 } },
      { messageId: "inject", body: { sql: "'); DROP TABLE orders; --" } },
    ]);
    await s.close();
    await waitFor(async () => (await pg.query("SELECT count(*)::int c FROM raw_seen")).rows[0].c === 4, { what: "4 rows" });
    const r = Object.fromEntries((await pg.query("SELECT * FROM raw_seen")).rows.map((x) => [x.message_id, x]));
    assert.equal(r.plain.body, null);
    assert.equal(r.plain.raw, "hello, not json");
    assert.equal(r.text.body, null, "a non-JSON content type is not parsed");
    assert.equal(r.text.content_type, "text/plain");
    assert.deepEqual(r.json.body, { a: [1, 2, { b: null }] });
    assert.deepEqual(r.json.props, { region: "eu", n: 3 });
    assert.equal(r.json.subject, "s");
    assert.equal(r.inject.body.sql, "'); DROP TABLE orders; --", "message content is data, never SQL");
    assert.ok((await pg.query("SELECT to_regclass('public.orders') IS NOT NULL AS ok")).rows[0].ok);
  });

  it("applies as run_as: a write without privilege dead-letters with permission denied", async () => {
    await pg.psql(`
      CREATE TABLE secret_table (x int);
      CREATE FUNCTION write_secret(m sbpg.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.secret_table VALUES (1) $$;
      GRANT EXECUTE ON FUNCTION write_secret(sbpg.message) TO app;`);
    await subscribe("perm", "perm", "write_secret");
    await sb.createSender("perm").sendMessages({ messageId: "p1", body: { any: 1 } });
    const n = await waitFor(() => listener.got.find((x) => x.subscription === "perm"), { what: "perm notification" });
    assert.equal(n.status, "dead_lettered");
    assert.equal(n.reason, "PermissionDenied");
    assert.match((await pg.inboxReasons("perm")).p1, /^PermissionDenied: permission denied for table secret_table/);
    assert.equal((await pg.query("SELECT count(*)::int c FROM secret_table")).rows[0].c, 0);
  });

  it("applies row-level security and forbids changing role inside the handler", async () => {
    await pg.psql(`
      CREATE TABLE tenant_rows (tenant text, v int);
      ALTER TABLE tenant_rows ENABLE ROW LEVEL SECURITY;
      CREATE POLICY only_acme ON tenant_rows FOR INSERT TO app WITH CHECK (tenant = 'acme');
      GRANT INSERT ON tenant_rows TO app;
      CREATE FUNCTION tenant_insert(m sbpg.message) RETURNS void LANGUAGE sql AS $$
        INSERT INTO public.tenant_rows VALUES (m.body->>'tenant', (m.body->>'v')::int) $$;
      GRANT EXECUTE ON FUNCTION tenant_insert(sbpg.message) TO app;
      CREATE FUNCTION escape_role(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
      BEGIN
        IF m.body->>'how' = 'reset' THEN RESET ROLE;
        ELSIF m.body->>'how' = 'session' THEN EXECUTE 'SET SESSION AUTHORIZATION postgres';
        ELSE EXECUTE 'SET ROLE postgres'; END IF;
        INSERT INTO public.tenant_rows VALUES ('evil', 0);
      END $$;
      GRANT EXECUTE ON FUNCTION escape_role(sbpg.message) TO app;`);
    await subscribe("rls", "rls", "tenant_insert");
    await subscribe("restricted", "restricted", "escape_role");
    await sb.createSender("rls").sendMessages([
      { messageId: "acme", body: { tenant: "acme", v: 1 } },
      { messageId: "other", body: { tenant: "globex", v: 2 } },
    ]);
    await sb.createSender("restricted").sendMessages([
      { messageId: "set", body: { how: "set" } },
      { messageId: "reset", body: { how: "reset" } },
      { messageId: "session", body: { how: "session" } },
    ]);
    await waitFor(() => listener.got.filter((x) => x.subscription === "rls" || x.subscription === "restricted").length >= 5, { what: "5 notifications" });
    const got = Object.fromEntries(listener.got.filter((x) => ["rls", "restricted"].includes(x.subscription)).map((x) => [x.message_id, x]));
    assert.equal(got.acme.status, "applied");
    assert.equal(got.other.status, "dead_lettered");
    const why = { ...(await pg.inboxReasons("rls")), ...(await pg.inboxReasons("restricted")) };
    assert.match(why.other, /row-level security policy/);
    assert.equal(got.set.status, "dead_lettered");
    assert.match(why.set, /cannot set parameter "role" within/);
    assert.equal(got.reset.status, "dead_lettered");
    assert.equal(got.session.status, "dead_lettered");
    assert.match(why.session, /cannot set parameter "session_authorization" within/);
    const rows = (await pg.query("SELECT tenant FROM tenant_rows ORDER BY tenant")).rows.map((r) => r.tenant);
    assert.deepEqual(rows, ["acme"]);
  });

  it("pauses, leaving messages on the broker, when run_as became a superuser or the handler SECURITY DEFINER", async () => {
    await pg.psql(`
      CREATE ROLE promoted NOLOGIN;
      CREATE TABLE promoted_rows (v int);
      GRANT INSERT ON promoted_rows TO promoted;
      CREATE FUNCTION promoted_insert(m sbpg.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.promoted_rows VALUES (1) $$;
      GRANT EXECUTE ON FUNCTION promoted_insert(sbpg.message) TO promoted;
      SELECT sbpg.create_subscription('promoted', '${url()}', 'promoted', 'promoted_insert(sbpg.message)', 'promoted', 'emu');
      ALTER ROLE promoted SUPERUSER;`);
    const count = async () => (await pg.query("SELECT count(*)::int c FROM promoted_rows")).rows[0].c;
    await sb.createSender("promoted").sendMessages({ messageId: "pr1", body: {} });
    let st = await waitFor(async () => {
      const r = (await pg.query("SELECT state, last_error FROM sbpg.stats WHERE subscription = 'promoted'")).rows[0];
      return r?.state === "paused" ? r : null;
    }, { what: "paused for a superuser run_as" });
    assert.match(st.last_error, /run_as role promoted is a superuser/);
    assert.equal(await count(), 0);
    assert.equal((await emu.entity("promoted")).dead_lettered, 0, "nothing dead-lettered");
    // A superuser may allow it explicitly.
    await pg.psql(`SELECT sbpg.alter_subscription('promoted', options => '{"allow_superuser_run_as": true}')`);
    await waitFor(async () => (await count()) === 1, { what: "applied once allowed" });
    await pg.psql(`
      ALTER ROLE promoted NOSUPERUSER;
      SELECT sbpg.alter_subscription('promoted', options => '{}');
      ALTER FUNCTION promoted_insert(sbpg.message) SECURITY DEFINER;`);
    await sb.createSender("promoted").sendMessages({ messageId: "pr2", body: {} });
    st = await waitFor(async () => {
      const r = (await pg.query("SELECT state, last_error FROM sbpg.stats WHERE subscription = 'promoted'")).rows[0];
      return r?.state === "paused" && /SECURITY DEFINER/.test(r.last_error) ? r : null;
    }, { what: "paused for a SECURITY DEFINER handler" });
    assert.equal(await count(), 1);
    await pg.psql("ALTER FUNCTION promoted_insert(sbpg.message) SECURITY INVOKER");
    await waitFor(async () => (await count()) === 2, { timeout: 30000, what: "applied after the fix" });
  });

  it("retries a transient error: the message is held, tried again and applied once", async () => {
    await pg.psql(`
      CREATE TABLE attempts (message_id text, delivery_count int);
      CREATE SEQUENCE flaky_calls;
      GRANT INSERT ON attempts TO app;
      GRANT USAGE ON SEQUENCE flaky_calls TO app;
      CREATE FUNCTION flaky(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
      BEGIN
        IF nextval('public.flaky_calls') = 1 THEN
          RAISE EXCEPTION 'simulated serialization failure' USING ERRCODE = 'serialization_failure';
        END IF;
        INSERT INTO public.attempts VALUES (m.message_id, m.delivery_count);
      END $$;
      GRANT EXECUTE ON FUNCTION flaky(sbpg.message) TO app;`);
    await subscribe("transient", "transient", "flaky");
    await sb.createSender("transient").sendMessages({ messageId: "t1", body: { x: 1 } });
    const n = await waitFor(() => listener.got.find((x) => x.subscription === "transient" && x.status === "applied"),
      { what: "transient applied" });
    assert.equal(n.attempts, 2);
    const retry = listener.got.filter((x) => x.subscription === "transient" && x.status === "retry");
    assert.equal(retry.length, 1);
    assert.equal(retry[0].reason, "TransientError");
    assert.match(pg.serverLog(), /"subscription":"transient","message_id":"t1".*"status":"retry","reason":"TransientError: simulated serialization failure \(SQLSTATE 40001\)/);
    assert.deepEqual((await pg.query("SELECT message_id, delivery_count FROM attempts")).rows, [{ message_id: "t1", delivery_count: 0 }],
      "the lock was held, so the broker never delivered it again");
    const st = (await pg.query("SELECT abandoned, applied, retries FROM sbpg.stats WHERE subscription = 'transient'")).rows[0];
    assert.equal(Number(st.abandoned), 0);
    assert.equal(Number(st.applied), 1);
    assert.equal(Number(st.retries), 1);
    assert.equal((await emu.entity("transient")).abandoned, 0);
  });

  it("consumes a topic subscription like a queue, and runs two subscriptions side by side", async () => {
    await pg.psql(`
      CREATE TABLE side (src text, id int);
      GRANT INSERT ON side TO app;
      CREATE FUNCTION side_a(m sbpg.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.side VALUES ('a', (m.body->>'id')::int) $$;
      CREATE FUNCTION side_b(m sbpg.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.side VALUES ('b', (m.body->>'id')::int) $$;
      CREATE FUNCTION side_topic(m sbpg.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.side VALUES ('topic', (m.body->>'id')::int) $$;
      GRANT EXECUTE ON FUNCTION side_a(sbpg.message), side_b(sbpg.message), side_topic(sbpg.message) TO app;`);
    await subscribe("side-a", "side-a", "side_a");
    await subscribe("side-b", "side-b", "side_b");
    await subscribe("audit", "events/Subscriptions/audit", "side_topic");
    const ids = Array.from({ length: 300 }, (_, i) => i);
    await Promise.all([
      sendAll("side-a", ids.map((id) => ({ body: { id } }))),
      sendAll("side-b", ids.map((id) => ({ body: { id } }))),
      sendAll("events", ids.map((id) => ({ body: { id } }))),
    ]);
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM side")).rows[0].c) === 900, { what: "900 rows" });
    const counts = (await pg.query("SELECT src, count(*)::int c, count(DISTINCT id)::int d FROM side GROUP BY src ORDER BY src")).rows;
    assert.deepEqual(counts, [{ src: "a", c: 300, d: 300 }, { src: "b", c: 300, d: 300 }, { src: "topic", c: 300, d: 300 }]);
    const act = (await pg.query(
      "SELECT application_name FROM pg_stat_activity WHERE backend_type = 'sbpg worker' ORDER BY 1")).rows.map((r) => r.application_name);
    for (const name of ["audit", "side-a", "side-b"]) assert.ok(act.includes(name), `worker ${name} in pg_stat_activity`);
    const launcher = (await pg.query("SELECT count(*)::int c FROM pg_stat_activity WHERE backend_type = 'sbpg launcher'")).rows[0].c;
    assert.equal(launcher, 1);
  });

  it("shows per-subscription statistics in sbpg.stats", async () => {
    // 300 more messages, so the throughput window (the last 60 s) and last_batch_at have
    // something of this test's own to show.
    const t0 = (await pg.query("SELECT now() t")).rows[0].t;
    const had = listener.got.filter((x) => x.subscription === "bulk").length;
    await sendAll("bulk", Array.from({ length: 300 }, (_, i) => ({ messageId: `b2-${i}`, body: { id: 20000 + i, amount: 1 } })));
    await waitFor(() => listener.got.filter((x) => x.subscription === "bulk").length >= had + 300, { what: "300 more notifications" });
    const st = (await pg.query("SELECT *, now() AS now FROM sbpg.stats WHERE subscription = 'bulk'")).rows[0];
    assert.equal(st.state, "connected");
    assert.equal(Number(st.received), 20300);
    assert.equal(Number(st.applied), 20300);
    assert.ok(Number(st.batches) >= 20300 / 100);
    for (const k of ["apply_ms_p50", "apply_ms_p99", "lag_ms_p50", "lag_ms_p99"]) {
      assert.equal(typeof st[k], "number", `${k} is set (${st[k]})`);
      assert.ok(st[k] >= 0, `${k} = ${st[k]}`);
    }
    assert.ok(st.apply_ms_p99 >= st.apply_ms_p50);
    assert.ok(st.lag_ms_p99 >= st.lag_ms_p50);
    // Messages settled in the last 60 s over 60: at least the 300 just applied, at most all.
    assert.equal(typeof st.messages_per_second, "number");
    const inWindow = Math.round(st.messages_per_second * 60);
    assert.ok(inWindow >= 300 && inWindow <= 20300, `messages_per_second ${st.messages_per_second} (${inWindow} in 60 s)`);
    assert.ok(st.last_batch_at instanceof Date);
    assert.ok(st.last_batch_at >= t0 && st.last_batch_at <= st.now, `last_batch_at ${st.last_batch_at.toISOString()} in this test`);
    assert.equal(Number(st.locks_lost), 0, "no lock was lost");
    assert.equal((await emu.entity("bulk")).lock_lost, 0);
    assert.ok(st.connected_since instanceof Date);
    assert.ok(st.token_expires_at > new Date());
    await waitFor(async () => {
      const r = (await pg.query("SELECT count(*) FILTER (WHERE settled_at IS NULL)::int n FROM sbpg.inbox WHERE subscription = 'bulk'")).rows[0];
      return r.n === 0;
    }, { what: "settled_at stamped for every confirmed settlement" });
  });
});
