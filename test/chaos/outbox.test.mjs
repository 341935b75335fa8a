// The outbox under faults (issue 16): 20,000 messages queued by 4 SQL sessions over the run (a
// tenth of the transactions rolled back), half to a queue with duplicate detection and half to one
// without, while the publisher's worker is SIGKILLed 10 times (each a crash restart of the server),
// the server is restarted with an immediate shutdown twice, and sbemu drops every connection and
// answers server-busy now and then. With duplicate detection the broker must hold exactly one copy
// of every committed message; without it, every committed message at least once, and the extra
// copies (printed) at most what docs/outbox.md bounds: the groups in flight when the worker or the
// connection went, batch_size per entity per fault. Nothing of a rolled-back transaction arrives.
// KILLS, RESTARTS, TOTAL change the run's size.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "./lib.mjs";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor, sleep } from "../e2e/lib/cluster.mjs";

const TOTAL = Number(process.env.TOTAL ?? 20000);
const KILLS = Number(process.env.KILLS ?? 10);
const RESTARTS = Number(process.env.RESTARTS ?? 2);
const BATCH = 50;

test("outbox under faults: one copy with duplicate detection, bounded copies without", { timeout: 20 * 60 * 1000 }, async (t) => {
  const emu = await startSbemu({ config: configWith({ queues: [queue("dedup", { RequiresDuplicateDetection: true }), queue("plain")] }) });
  const pg = await startCluster();
  const sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 3, timeoutInMs: 20000 } });
  let faults = 0;
  let stop = false;
  try {
    await pg.psql(`
      CREATE EXTENSION sbpg;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.create_publisher('bus', '${emu.amqp}', 'emu', options => '{"batch_size": ${BATCH}}');`);
    // Slow answers keep messages in flight when the faults come.
    await emu.fault("delay-dispositions", { ms: 20 });

    // Producers: 4 sessions, transactions of 10 rows, each row to both entities in turn.
    const committed = new Set();
    const perSession = TOTAL / 4;
    const producers = Array.from({ length: 4 }, async (_, s) => {
      let c = await pg.client();
      for (let t0 = 0; t0 < perSession / 10 && !stop; ) {
        const ids = Array.from({ length: 10 }, (_, k) => `p${s}-t${t0}-k${k}`);
        try {
          await c.query("BEGIN");
          for (const [k, id] of ids.entries())
            await c.query("SELECT sbpg.send('bus', $1, $2::jsonb, message_id => $3)", [k % 2 ? "plain" : "dedup", JSON.stringify({ s, t: t0, k }), id]);
          if (t0 % 10 === 3) await c.query("ROLLBACK");
          else {
            await c.query("COMMIT");
            for (const id of ids) committed.add(id);
          }
          ++t0;
        } catch {
          // The server went away (a kill's crash restart, or a restart). Before the COMMIT that
          // loses the transaction with its rows; during it, the commit may have happened all the
          // same. Which one, the rows tell: a transaction is tried again only when they are not there.
          await c.end().catch(() => {});
          let there = 0;
          await waitFor(async () => {
            try {
              c = await pg.client();
              there = Number((await c.query("SELECT count(*) c FROM sbpg.outbox WHERE message_id = $1", [ids[0]])).rows[0].c);
              return true;
            } catch {
              await c.end().catch(() => {});
              return false;
            }
          }, { timeout: 120000, interval: 200, what: "the server back" });
          if (there > 0) {
            for (const id of ids) committed.add(id);
            ++t0;
          }
        }
      }
      await c.end().catch(() => {});
    });

    const publisherPid = async () => {
      try {
        return (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg publisher'")).rows[0]?.pid;
      } catch {
        return undefined;
      }
    };
    const sentCount = async () => {
      try {
        return Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'sent'")).rows[0].c);
      } catch {
        return -1;
      }
    };
    // Faults spread over the run: kills, restarts, connection drops and server-busy answers.
    const plan = [];
    for (let k = 0; k < KILLS; ++k) plan.push("kill");
    for (let k = 0; k < RESTARTS; ++k) plan.splice(Math.floor(((k + 1) * plan.length) / (RESTARTS + 1)), 0, "restart");
    for (const [i, what] of plan.entries()) {
      const target = Math.floor(((i + 1) * TOTAL * 0.8) / (plan.length + 1));
      await waitFor(async () => (await sentCount()) >= target || stop, { timeout: 300000, interval: 100, what: `${target} rows sent` });
      if (what === "kill") {
        const pid = await waitFor(publisherPid, { timeout: 120000, interval: 100, what: "the publisher running" });
        pg.kill(pid);
      } else {
        pg.restart("immediate");
      }
      ++faults;
      if (i % 3 === 1) await emu.fault("drop-connections").then(() => ++faults);
      if (i % 3 === 2) await emu.fault("server-busy-sends", { count: 30 });
      await waitFor(publisherPid, { timeout: 120000, interval: 100, what: "the publisher back" });
    }
    await Promise.all(producers);
    await emu.fault("clear");
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'queued'")).rows[0].c) === 0,
      { timeout: 300000, interval: 500, what: "every queued row sent" });

    const rows = Number((await pg.query("SELECT count(*) c FROM sbpg.outbox")).rows[0].c);
    assert.equal(rows, committed.size, "the outbox holds the committed rows, no more");
    const want = { dedup: new Set([...committed].filter((id) => Number(id.split("-k")[1]) % 2 === 0)) };
    want.plain = new Set([...committed].filter((id) => !want.dedup.has(id)));
    const copies = {};
    for (const entity of ["dedup", "plain"]) {
      const r = sb.createReceiver(entity, { receiveMode: "receiveAndDelete" });
      const seen = new Map();
      for (;;) {
        const got = await r.receiveMessages(2000, { maxWaitTimeInMs: 1500 });
        if (!got.length) break;
        for (const m of got) seen.set(m.messageId, (seen.get(m.messageId) ?? 0) + 1);
      }
      await r.close();
      assert.deepEqual([...want[entity]].filter((id) => !seen.has(id)), [], `${entity}: every committed message arrived`);
      assert.deepEqual([...seen.keys()].filter((id) => !want[entity].has(id)), [], `${entity}: nothing else arrived`);
      copies[entity] = [...seen.values()].reduce((a, n) => a + n - 1, 0);
    }
    const e = await emu.entity("dedup");
    t.diagnostic(`${committed.size} committed of ${TOTAL} queued; ${faults} faults (${KILLS} kills, ${RESTARTS} restarts, drops); ` +
      `dedup: ${copies.dedup} extra copies, ${e.duplicates} resends dropped by duplicate detection; plain: ${copies.plain} extra copies ` +
      `(bound ${faults * BATCH})`);
    console.log(`outbox chaos: ${committed.size} committed; ${faults} faults; dedup extra copies ${copies.dedup} (resends dropped ${e.duplicates}); plain extra copies ${copies.plain} (bound ${faults * BATCH})`);
    assert.equal(copies.dedup, 0, "with duplicate detection: exactly one copy of each");
    assert.ok(copies.plain <= faults * BATCH, `without: at most a group per fault (${copies.plain} <= ${faults * BATCH})`);
    assert.deepEqual(pg.unexpectedSignals(), [], "no process ended by a signal the test did not send");
  } finally {
    stop = true;
    await sb.close();
    await pg.stop();
    await emu.stop();
  }
});
