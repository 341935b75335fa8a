// Telemetry side by side (issue 14, item 6): a producer's W3C trace context followed into the
// PostgreSQL transaction (the handler's sbpg.message, sbpg.inbox, the NOTIFY payload, the log line,
// pg_stat_activity and the CONTEXT of lines logged while its message applies, such as a lock
// wait), and the per-minute history in sbpg.stats_history.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const DIAG = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const LOCKED = "00-11112222333344445555666677778888-1234567890abcdef-01";

describe("telemetry", () => {
  let emu, pg, sb, listener;
  const send = async (entity, msgs) => {
    const s = sb.createSender(entity);
    await s.sendMessages(msgs);
    await s.close();
  };
  const mine = (sub) => listener.got.filter((x) => x.subscription === sub);

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["trace", "trace-lock", "history"].map((n) => queue(n)) }) });
    pg = await startCluster({
      conf: { "sbpg.log_messages": "all", log_lock_waits: "on", deadlock_timeout: "'100ms'" },
    });
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE seen (message_id text, traceparent text, pid int, property text);
      CREATE TABLE gate (id int PRIMARY KEY);
      INSERT INTO gate VALUES (1);
      GRANT INSERT ON seen TO app;
      GRANT SELECT, UPDATE ON gate TO app;
      CREATE FUNCTION record_trace(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'fail')::boolean THEN
          RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation';
        END IF;
        IF (m.body->>'gate')::boolean THEN
          PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; -- waits while the test holds the row
        END IF;
        INSERT INTO public.seen VALUES (m.message_id, m.traceparent, pg_backend_pid(), m.properties->>'traceparent');
      END $f$;
      GRANT EXECUTE ON FUNCTION record_trace(sbpg.message) TO app;
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

  const subscribe = (name, entity = name, extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${entity}', 'record_trace(sbpg.message)', 'app', 'emu'${extra});`);

  it("a JS SDK producer's traceparent reaches the handler, sbpg.inbox, the NOTIFY and the log line", async () => {
    await send("trace", [
      { messageId: "t-w3c", body: { n: 1 }, applicationProperties: { traceparent: TP, "Diagnostic-Id": DIAG } },
      { messageId: "t-diag", body: { n: 2 }, applicationProperties: { "Diagnostic-Id": DIAG } },
      { messageId: "t-none", body: { n: 3 } },
      // A hostile value: a valid one with text after it, which would end the activity's comment.
      { messageId: "t-bad", body: { n: 4 }, applicationProperties: { traceparent: `${TP}'*/ SELECT 1 /*` } },
      { messageId: "t-fail", body: { fail: true }, applicationProperties: { traceparent: TP } },
    ]);
    await subscribe("trace");
    await waitFor(async () => mine("trace").length === 5, { what: "five outcomes notified" });
    const want = { "t-w3c": TP, "t-diag": DIAG, "t-none": null, "t-bad": null, "t-fail": TP };
    // The handler's sbpg.message (the failed message's handler rolled back: not in seen).
    const seen = await pg.query("SELECT message_id, traceparent FROM seen ORDER BY message_id");
    assert.deepEqual(Object.fromEntries(seen.rows.map((r) => [r.message_id, r.traceparent])),
      { "t-bad": null, "t-diag": DIAG, "t-none": null, "t-w3c": TP });
    // sbpg.inbox, applied and dead-lettered alike.
    const inbox = await pg.query("SELECT message_id, traceparent, status FROM sbpg.inbox WHERE subscription = 'trace'");
    assert.deepEqual(Object.fromEntries(inbox.rows.map((r) => [r.message_id, r.traceparent])), want);
    assert.equal(inbox.rows.find((r) => r.message_id === "t-fail").status, "dead_lettered");
    // NOTIFY: always the key, null when the message carried no trace context.
    for (const n of mine("trace")) assert.equal(n.traceparent, want[n.message_id], `NOTIFY of ${n.message_id}`);
    // The JSON log line of every settled message (sbpg.log_messages = all).
    const lines = pg.serverLog().split("\n").filter((l) => l.includes('"event":"message","subscription":"trace"'));
    assert.equal(lines.length, 5);
    for (const l of lines) {
      const rec = JSON.parse(l.slice(l.indexOf("{")));
      assert.equal(rec.traceparent, want[rec.message_id], `log line of ${rec.message_id}`);
    }
    // A refused value is not trace context, but the property itself reaches the handler as sent.
    const props = await pg.query("SELECT property FROM seen WHERE message_id = 't-bad'");
    assert.equal(props.rows[0].property, `${TP}'*/ SELECT 1 /*`);
  });

  it("while its message applies, pg_stat_activity and lines logged meanwhile (a lock wait) carry its traceparent", async () => {
    const holder = await pg.client();
    try {
      await holder.query("BEGIN");
      await holder.query("SELECT 1 FROM gate WHERE id = 1 FOR UPDATE");
      await send("trace-lock", [{ messageId: "gated", body: { gate: true }, applicationProperties: { traceparent: LOCKED } }]);
      await subscribe("trace-lock");
      // The worker waits on the row lock: its activity names the message and its trace context.
      let activity;
      await waitFor(async () => {
        const r = await pg.query(`SELECT query, state, wait_event_type, backend_type FROM pg_stat_activity
                                  WHERE backend_type = 'sbpg worker' AND application_name = 'trace-lock'`);
        activity = r.rows[0];
        return activity && activity.wait_event_type === "Lock";
      }, { what: "the worker waiting on the gate's row lock" });
      assert.equal(activity.state, "active");
      assert.match(activity.query, /^sbpg: applying message \d+ of subscription "trace-lock" \/\*traceparent='00-11112222333344445555666677778888-1234567890abcdef-01'\*\/$/);
      // log_lock_waits (after deadlock_timeout): the wait's log line has the message as CONTEXT.
      await waitFor(async () => /still waiting for/.test(pg.serverLog()), { what: "the lock wait logged" });
      const log = pg.serverLog().split("\n");
      const at = log.findIndex((l) => /still waiting for/.test(l));
      const context = log.slice(at, at + 12).find((l) => /CONTEXT:/.test(l) || /sbpg: applying message/.test(l));
      assert.ok(context, `a CONTEXT after the wait line:\n${log.slice(at, at + 12).join("\n")}`);
      assert.ok(log.slice(at, at + 12).join("\n").includes(`of subscription "trace-lock" (traceparent ${LOCKED})`),
        log.slice(at, at + 12).join("\n"));
    } finally {
      await holder.query("ROLLBACK");
      await holder.end();
    }
    await waitFor(async () => mine("trace-lock").length === 1, { what: "the gated message applied" });
    assert.equal(mine("trace-lock")[0].traceparent, LOCKED);
    // Once the batch is over, the activity no longer names the message.
    await waitFor(async () => (await pg.query(`SELECT query FROM pg_stat_activity WHERE application_name = 'trace-lock'`))
      .rows[0]?.query === "waiting for messages", { what: "the worker idle again" });
  });

  it("sbpg.stats_history: a row per minute with counts, rate and percentiles; old rows removed", { timeout: 240000 }, async () => {
    await subscribe("history");
    // A row older than the retention (a day): the worker removes it when it writes a minute.
    await pg.psql(`INSERT INTO sbpg.stats_minutes (subscription, minute, received, applied, dead_lettered, duplicates, retries, batches)
                   VALUES ('history', date_trunc('minute', now()) - interval '2 days', 5, 5, 0, 0, 0, 1);`);
    const msgs = [];
    for (let i = 0; i < 40; i++) msgs.push({ messageId: `h-${i}`, body: i % 10 === 9 ? { fail: true } : { n: i } });
    await send("history", msgs);
    await waitFor(async () => mine("history").length === 40, { what: "forty outcomes" });
    // The minutes those messages fell in are written once they are over (within about a minute).
    let rows;
    await waitFor(async () => {
      rows = (await pg.query(`SELECT * FROM sbpg.stats_history WHERE subscription = 'history' ORDER BY minute`)).rows;
      return rows.reduce((a, r) => a + Number(r.applied) + Number(r.dead_lettered), 0) === 40;
    }, { timeout: 150000, interval: 1000, what: "the minutes of the forty messages in sbpg.stats_history" });
    assert.ok(rows.every((r) => Date.now() - r.minute.getTime() < 24 * 3600e3), "the two-day-old row is gone");
    const sum = (k) => rows.reduce((a, r) => a + Number(r[k]), 0);
    assert.equal(sum("applied"), 36);
    assert.equal(sum("dead_lettered"), 4);
    assert.equal(sum("received"), 40);
    assert.ok(sum("batches") >= 1);
    for (const r of rows) {
      assert.equal(r.minute.getUTCSeconds(), 0, "a row per whole minute");
      assert.equal(r.messages_per_second, (Number(r.applied) + Number(r.dead_lettered) + Number(r.duplicates)) / 60);
      if (Number(r.applied) > 0) {
        assert.ok(r.apply_ms_p50 > 0 && r.apply_ms_p50 <= r.apply_ms_p99, `apply p50 ${r.apply_ms_p50} <= p99 ${r.apply_ms_p99}`);
        assert.ok(r.lag_ms_p50 >= 0 && r.lag_ms_p50 <= r.lag_ms_p99, `lag p50 ${r.lag_ms_p50} <= p99 ${r.lag_ms_p99}`);
      }
    }
    // Minutes with nothing to count are written too (an idle worker is not a stopped one).
    await waitFor(async () => (await pg.query(`SELECT count(*)::int AS c FROM sbpg.stats_history
                                               WHERE subscription = 'history' AND received = 0`)).rows[0].c >= 1,
    { timeout: 150000, interval: 1000, what: "an idle minute recorded" });
    const idle = (await pg.query(`SELECT * FROM sbpg.stats_history WHERE subscription = 'history' AND received = 0 LIMIT 1`)).rows[0];
    assert.equal(idle.apply_ms_p50, null);
    assert.equal(idle.messages_per_second, 0);
  });
});
