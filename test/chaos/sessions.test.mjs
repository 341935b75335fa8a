// Order under faults: 50 sessions × 200 messages, sent interleaved to a session queue, applied
// while 5% of the messages fail transiently on their first attempt, sbemu ends every lock and drops
// every connection now and then, and the worker is SIGKILLed 5 times (each a crash restart of the
// server). Every message must be applied exactly once and, per session, in strictly increasing
// sequence order with no gap: the handler appends each message to a log whose order is the order
// of application. SEED=n repeats a run's choice of failing messages.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "./lib.mjs";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor, sleep } from "../e2e/lib/cluster.mjs";

const SESSIONS = Number(process.env.SESSIONS ?? 50);
const PER = Number(process.env.PER_SESSION ?? 200);
const KILLS = Number(process.env.KILLS ?? 5);

test("sessions under faults: each message once, each session in order", { timeout: 15 * 60 * 1000 }, async (t) => {
  const seed = Number(process.env.SEED ?? Math.floor(Math.random() * 2 ** 31));
  let state = seed;
  const random = () => ((state = (Math.imul(state, 1103515245) + 12345) >>> 0) / 2 ** 32);
  const total = SESSIONS * PER;
  const flaky = [];
  for (let k = 0; k < total; ++k) if (random() < 0.05) flaky.push(k);

  const emu = await startSbemu({ config: configWith({ queues: [queue("ordered", { RequiresSession: true, MaxDeliveryCount: 1000, LockDuration: "PT5S" })] }) });
  const pg = await startCluster();
  const sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0, timeoutInMs: 20000 } });
  try {
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE applied (pos bigserial PRIMARY KEY, session_id text, n int, k int, message_id text, seq bigint);
      GRANT INSERT ON applied TO app;
      GRANT USAGE ON SEQUENCE applied_pos_seq TO app;
      CREATE SCHEMA flaky;
      GRANT USAGE ON SCHEMA flaky TO app;
      ${flaky.map((k) => `CREATE SEQUENCE flaky.k${k}; GRANT USAGE ON SEQUENCE flaky.k${k} TO app;`).join("\n")}
      -- A flaky message fails its first attempt: a sequence's nextval survives the rollback.
      CREATE FUNCTION apply_ordered(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'flaky')::boolean AND nextval(format('flaky.k%s', m.body->>'k')::regclass) = 1 THEN
          RAISE EXCEPTION 'first attempt of % fails', m.message_id USING ERRCODE = '40001';
        END IF;
        PERFORM pg_sleep(0.004); -- keeps the run longer than the faults
        INSERT INTO public.applied (session_id, n, k, message_id, seq)
        VALUES (m.session_id, (m.body->>'n')::int, (m.body->>'k')::int, m.message_id, m.sequence_number);
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_ordered(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    const isFlaky = new Set(flaky);
    const sender = sb.createSender("ordered");
    const all = [];
    for (let n = 0; n < PER; ++n)
      for (let s = 0; s < SESSIONS; ++s) {
        const k = all.length;
        all.push({ messageId: `m-${s}-${n}`, sessionId: `s${s}`, body: { n, k, flaky: isFlaky.has(k) } });
      }
    for (let i = 0; i < all.length; i += 500) await sender.sendMessages(all.slice(i, i + 500));
    await sender.close();
    await pg.psql(`SELECT sbpg.create_subscription('ordered', '${emu.amqp}', 'ordered', 'apply_ordered(sbpg.message)', 'app', 'emu',
      batch_size => 100, options => '{"session_idle_ms": 200, "max_retries": 1000, "retry_base_ms": 100, "retry_cap_ms": 500}');`);

    const applied = async () => Number((await pg.query("SELECT count(*) c FROM applied")).rows[0].c);
    const workerPid = async () =>
      (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg worker'")).rows[0]?.pid;
    // Faults, one a second, while messages remain: every kill comes with a worker that is running.
    const schedule = [];
    for (let i = 0; i < KILLS; ++i) schedule.push("kill", i % 2 ? "drop-connections" : "expire-locks");
    const done = { kill: 0, "drop-connections": 0, "expire-locks": 0 };
    for (const f of schedule) {
      await sleep(1000);
      const now = await waitFor(applied, { timeout: 60000, what: "the server back" }).catch(() => 0);
      assert.ok(now < total, `the run outlasts the faults (${now} of ${total} applied at the ${f})`);
      if (f === "kill") {
        const pid = await waitFor(workerPid, { timeout: 60000, what: "a running worker" });
        pg.kill(pid);
        await waitFor(async () => (await workerPid()) && (await workerPid()) !== pid, { timeout: 60000, what: "the worker restarted" });
      } else {
        await emu.ctl("POST", `/faults/${f}`);
      }
      ++done[f];
    }
    await waitFor(async () => (await applied()) >= total, { timeout: 600000, interval: 500, what: "every message applied" });
    await waitFor(async () => (await emu.entity("ordered")).messages === 0, { timeout: 120000, interval: 200, what: "the queue drained" });

    const rows = (await pg.query("SELECT session_id, n, message_id FROM applied ORDER BY pos")).rows;
    const twice = rows.length - new Set(rows.map((r) => r.message_id)).size;
    assert.equal(twice, 0, "no message applied twice");
    assert.equal(rows.length, total, "every message applied");
    const per = {};
    for (const r of rows) (per[r.session_id] ??= []).push(r.n);
    let inversions = 0, gaps = 0;
    for (const ns of Object.values(per))
      ns.forEach((n, i) => {
        if (i > 0 && n < ns[i - 1]) ++inversions;
        if (n !== i) ++gaps;
      });
    assert.equal(Object.keys(per).length, SESSIONS);
    assert.equal(inversions, 0, "no session applied out of order");
    assert.equal(gaps, 0, "no gap in any session");
    const e = await emu.entity("ordered");
    assert.equal(e.dead_lettered, 0);
    assert.ok(e.max_sessions_locked > 1, `sessions held concurrently (${e.max_sessions_locked})`);
    const retried = Number((await pg.query("SELECT count(*) c FROM sbpg.inbox WHERE subscription = 'ordered' AND attempts > 1")).rows[0].c);
    // A flaky message that failed in a batch's first pass behind other messages is run again at once
    // in the isolated pass (the failure is the batch's, docs/retries.md): only some count a retry.
    assert.ok(retried > 0, `some flaky messages waited for a retry (${retried} of ${flaky.length})`);
    assert.deepEqual(done, { kill: KILLS, "drop-connections": Math.floor(KILLS / 2), "expire-locks": Math.ceil(KILLS / 2) });
    t.diagnostic(`sessions figures: seed=${seed} messages=${total} sessions=${SESSIONS} flaky=${flaky.length} retried=${retried} ` +
      `kills=${done.kill} expire_locks=${done["expire-locks"]} drop_connections=${done["drop-connections"]} ` +
      `delivered=${e.delivered} lock_lost=${e.lock_lost} max_sessions_locked=${e.max_sessions_locked} inversions=0 gaps=0 twice=0`);
  } finally {
    await sb.close();
    await pg.stop();
    await emu.stop();
  }
});
