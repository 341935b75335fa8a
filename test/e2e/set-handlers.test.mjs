// Set-based handlers (issue 14): a handler declared (sbpg.message[]) RETURNS void gets the whole
// batch in one call; when the call fails, the batch is halved until the failing messages are
// alone, each dead-lettered (or retried) with its own reason, every other message applied once.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

describe("set-based handlers", () => {
  let emu, pg, sb, listener;
  const sendAll = async (entity, msgs) => {
    const s = sb.createSender(entity);
    for (let i = 0; i < msgs.length; i += 500) await s.sendMessages(msgs.slice(i, i + 500));
    await s.close();
  };
  const mine = (sub) => listener.got.filter((x) => x.subscription === sub);

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["set-bulk", "set-poison", "set-transient", "set-mixed", "set-slow"].map((n) => queue(n, { MaxDeliveryCount: 5 })) }) });
    pg = await startCluster();
    await installOrders(pg);
    // One call per batch: the calls table counts them, orders_applies counts each message's applies.
    await pg.psql(`
      CREATE TABLE set_calls (n int, xid bigint, who text);
      GRANT INSERT ON set_calls TO app;
      CREATE SEQUENCE flaky_alone;
      GRANT USAGE ON SEQUENCE flaky_alone TO app;
      CREATE SEQUENCE slow_calls;
      GRANT USAGE ON SEQUENCE slow_calls TO app;
      CREATE FUNCTION apply_orders(ms sbpg.message[]) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        INSERT INTO public.set_calls VALUES (pg_catalog.cardinality(ms), txid_current(), current_user);
        IF EXISTS (SELECT FROM pg_catalog.unnest(ms) m WHERE (m.body->>'poison')::boolean) THEN
          RAISE EXCEPTION 'poison in this set of %', pg_catalog.cardinality(ms) USING ERRCODE = 'check_violation';
        END IF;
        -- A flaky message fails every set it is in with others, and fails its first two calls
        -- alone (a sequence counts outside the transactions that roll back): halving must isolate
        -- it, and whichever pass first runs it alone, the isolated one fails too, so its failure
        -- is a retry, after which it applies.
        IF EXISTS (SELECT FROM pg_catalog.unnest(ms) m WHERE (m.body->>'flaky')::boolean) THEN
          IF pg_catalog.cardinality(ms) > 1 THEN
            RAISE EXCEPTION 'try again' USING ERRCODE = 'serialization_failure';
          ELSIF pg_catalog.nextval('public.flaky_alone') <= 2 THEN
            RAISE EXCEPTION 'try again alone' USING ERRCODE = 'serialization_failure';
          END IF;
        END IF;
        -- A slow message makes every call it is in run past the time limit (counted outside the
        -- transactions that roll back).
        IF EXISTS (SELECT FROM pg_catalog.unnest(ms) m WHERE (m.body->>'slow')::boolean) THEN
          PERFORM pg_catalog.nextval('public.slow_calls');
          PERFORM pg_catalog.pg_sleep(5);
        END IF;
        INSERT INTO public.orders_applies SELECT m.message_id, (m.body->>'id')::bigint, txid_current(), clock_timestamp(), pg_backend_pid()
          FROM pg_catalog.unnest(ms) m;
        INSERT INTO public.orders (id, amount, message_id, seq)
          SELECT (m.body->>'id')::bigint, (m.body->>'amount')::numeric, m.message_id, m.sequence_number FROM pg_catalog.unnest(ms) m;
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_orders(sbpg.message[]) TO app;
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

  const subscribe = (name, extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', 'apply_orders(sbpg.message[])', 'app', 'emu'${extra});`);

  it("accepts (sbpg.message[]) as a handler and refuses other array shapes with the reason", async () => {
    await pg.psql(`CREATE FUNCTION wrong_set(ms text[]) RETURNS void LANGUAGE sql AS 'SELECT';`);
    await assert.rejects(
      pg.psql(`SELECT sbpg.create_subscription('w', '${emu.amqp}', 'set-bulk', 'wrong_set(text[])', 'app', 'emu');`),
      /handler public\.wrong_set\(text\[\]\) has the wrong signature[\s\S]*msgs sbpg\.message\[\]/);
    assert.equal((await pg.query("SELECT count(*)::int c FROM sbpg.subscriptions WHERE name = 'w'")).rows[0].c, 0);
  });

  it("applies 5,000 messages in one call per batch, each exactly once, as run_as", async () => {
    const n = 5000;
    // Queued before the worker connects, so that batches are full whatever the pace of sending.
    await sendAll("set-bulk", Array.from({ length: n }, (_, i) => ({ messageId: `s-${i}`, body: { id: i, amount: 1 } })));
    await subscribe("set-bulk", ", batch_size => 100");
    await waitFor(() => mine("set-bulk").length >= n, { timeout: 60000, what: "5,000 notifications" });
    assert.equal(mine("set-bulk").filter((x) => x.status === "applied").length, n);
    const a = (await pg.query(`SELECT count(*)::int rows, count(DISTINCT message_id)::int msgs FROM orders_applies WHERE id < 100000`)).rows[0];
    assert.deepEqual(a, { rows: n, msgs: n }, "each applied exactly once");
    const calls = (await pg.query(`SELECT count(*)::int c, sum(n)::int s, max(n)::int mx, array_agg(DISTINCT who) who FROM set_calls`)).rows[0];
    assert.equal(calls.s, n, "every message was handed over in some call");
    assert.ok(calls.c <= n / 10, `at most one call per 10 messages on average (${calls.c} calls)`);
    assert.ok(calls.mx > 1 && calls.mx <= 100, `calls carry up to batch_size messages (${calls.mx})`);
    assert.deepEqual(calls.who, ["app"], "the handler runs as run_as");
    await waitFor(async () => (await emu.entity("set-bulk")).completed === n, { what: "all completed on the broker" });
  });

  it("isolates failing messages by halving: each poison message dead-lettered with its own reason, the others applied once", async () => {
    await pg.psql("TRUNCATE set_calls");
    await subscribe("set-poison", ", batch_size => 64");
    const n = 600;
    const poison = new Set([7, 130, 131, 377, 599]);
    await sendAll("set-poison", Array.from({ length: n }, (_, i) => ({
      messageId: `p-${i}`, body: { id: 200000 + i, amount: 1, poison: poison.has(i) } })));
    await waitFor(() => mine("set-poison").filter((x) => x.status === "applied" || x.status === "dead_lettered").length >= n,
                  { timeout: 60000, what: "600 outcomes" });
    const got = mine("set-poison");
    const dead = got.filter((x) => x.status === "dead_lettered");
    assert.deepEqual(dead.map((x) => x.message_id).sort(), [...poison].map((i) => `p-${i}`).sort());
    assert.ok(dead.every((x) => x.reason === "HandlerError"), JSON.stringify(dead.map((x) => x.reason)));
    const reasons = (await pg.query(`SELECT message_id, reason FROM sbpg.inbox WHERE subscription = 'set-poison' AND status = 'dead_lettered'`)).rows;
    assert.equal(reasons.length, poison.size);
    for (const r of reasons) assert.match(r.reason, /^HandlerError: poison in this set of 1\b/, "the failure of the message alone");
    const a = (await pg.query(`SELECT count(*)::int rows, count(DISTINCT message_id)::int msgs FROM orders_applies WHERE id BETWEEN 200000 AND 299999`)).rows[0];
    assert.deepEqual(a, { rows: n - poison.size, msgs: n - poison.size }, "every other message applied exactly once");
    await waitFor(async () => (await emu.entity("set-poison/$deadletterqueue")).messages === poison.size, { what: "the DLQ holds the poison" });
    const dlq = sb.createReceiver("set-poison", { subQueueType: "deadLetter", receiveMode: "receiveAndDelete" });
    const msgs = await dlq.receiveMessages(poison.size, { maxWaitTimeInMs: 5000 });
    await dlq.close();
    assert.equal(msgs.length, poison.size);
    for (const m of msgs) {
      assert.equal(m.deadLetterReason, "HandlerError");
      assert.match(m.deadLetterErrorDescription, /poison in this set of 1/);
    }
  });

  it("retries a transient failure of the set without dead-lettering anything", async () => {
    const n = 40;
    await sendAll("set-transient", Array.from({ length: n }, (_, i) => ({
      messageId: `t-${i}`, body: { id: 300000 + i, amount: 1, flaky: i === 5 } })));
    await subscribe("set-transient", ", batch_size => 20, options => '{\"retry_base_ms\": 10, \"retry_cap_ms\": 50}'");
    await waitFor(() => mine("set-transient").filter((x) => x.status === "applied").length >= n, { timeout: 60000, what: "40 applied" });
    assert.equal(mine("set-transient").filter((x) => x.status === "dead_lettered").length, 0);
    const a = (await pg.query(`SELECT count(*)::int rows, count(DISTINCT message_id)::int msgs FROM orders_applies WHERE id BETWEEN 300000 AND 399999`)).rows[0];
    assert.deepEqual(a, { rows: n, msgs: n });
    const retried = mine("set-transient").filter((x) => x.status === "retry");
    assert.deepEqual([...new Set(retried.map((x) => x.message_id))], ["t-5"], "only the failing message waited for another attempt");
  });

  it("runs a set that ran out of time one message per call, not halved: a hanging message costs two time limits, not one per level", async () => {
    await subscribe("set-slow", `, batch_size => 20, options => '{"handler_timeout_ms": 500, "max_retries": 0}'`);
    const n = 20;
    await sendAll("set-slow", Array.from({ length: n }, (_, i) => ({
      messageId: `w-${i}`, body: { id: 500000 + i, amount: 1, slow: i === 11 } })));
    await waitFor(() => mine("set-slow").filter((x) => x.status === "applied" || x.status === "dead_lettered").length >= n,
                  { timeout: 60000, what: "20 outcomes" });
    const slow = mine("set-slow").find((x) => x.message_id === "w-11" && x.status === "dead_lettered");
    assert.ok(slow, "the slow message is dead-lettered");
    assert.equal(slow.reason, "MaxRetriesExceeded");
    const why = (await pg.query("SELECT reason FROM sbpg.inbox WHERE subscription = 'set-slow' AND message_id = 'w-11'")).rows[0].reason;
    assert.match(why, /HandlerTimeout/);
    assert.equal(mine("set-slow").filter((x) => x.status === "applied").length, n - 1);
    const a = (await pg.query(`SELECT count(*)::int rows, count(DISTINCT message_id)::int msgs FROM orders_applies WHERE id BETWEEN 500000 AND 599999`)).rows[0];
    assert.deepEqual(a, { rows: n - 1, msgs: n - 1 });
    const calls = Number((await pg.query("SELECT last_value FROM slow_calls")).rows[0].last_value);
    assert.equal(calls, 2, "the batch's call, then the message alone");
  });

  it("keeps the set to what the handler should see: a message the worker dead-letters itself (invalid JSON) never reaches it", async () => {
    await pg.psql("TRUNCATE set_calls");
    await subscribe("set-mixed", ", batch_size => 50");
    await sendAll("set-mixed", [
      ...Array.from({ length: 10 }, (_, i) => ({ messageId: `m-${i}`, body: { id: 400000 + i, amount: 1 } })),
      { messageId: "m-bad-json", body: Buffer.from('{"id": 3,'), contentType: "application/json" },
    ]);
    await waitFor(() => mine("set-mixed").length >= 11, { timeout: 30000, what: "11 outcomes" });
    const bad = mine("set-mixed").find((x) => x.message_id === "m-bad-json");
    assert.equal(bad.status, "dead_lettered");
    assert.equal(bad.reason, "InvalidJson");
    assert.equal(mine("set-mixed").filter((x) => x.status === "applied").length, 10);
    const handed = (await pg.query("SELECT coalesce(sum(n), 0)::int s FROM set_calls")).rows[0].s;
    assert.equal(handed, 10, "only the 10 good messages were handed to the handler");
  });
});
