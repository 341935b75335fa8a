// Several workers per subscription (option workers): they compete on the entity, each applies
// some, and together they apply every message exactly once, also when single workers are
// SIGKILLed mid-run (each a crash restart of the server). sbpg.stats shows the subscription's total
// and sbpg.stats_workers each worker.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, appliesOf, waitFor } from "./lib/cluster.mjs";

describe("several workers per subscription", () => {
  let emu, pg, sb;

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: [queue("many", { MaxDeliveryCount: 1000 }), queue("race", { MaxDeliveryCount: 10 })] }) });
    pg = await startCluster();
    // No key on orders: a message applied twice would be two rows.
    await installOrders(pg, { keyed: false });
    await pg.psql(`
      CREATE TABLE gate (open boolean NOT NULL);
      INSERT INTO gate VALUES (false);
      GRANT SELECT ON gate TO app;
      -- From id 10000 on, a transient failure until the test opens the gate: those messages wait
      -- (held and retried by whichever worker received them) across the kills.
      CREATE FUNCTION gated_order(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'id')::bigint >= 10000 AND NOT (SELECT open FROM public.gate) THEN
          RAISE EXCEPTION 'the gate is closed' USING ERRCODE = '40001';
        END IF;
        PERFORM public.apply_order(m);
      END $f$;
      GRANT EXECUTE ON FUNCTION gated_order(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 3, timeoutInMs: 20000 } });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  const workerPids = async () =>
    (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg worker' ORDER BY pid")).rows.map((r) => r.pid);

  it("workers = 3: each applies some, together exactly once, through SIGKILLs of single workers", { timeout: 300000 }, async (t) => {
    const n = 30000;
    await pg.psql(`SELECT sbpg.create_subscription('many', '${emu.amqp}', 'many', 'gated_order(sbpg.message)', 'app', 'emu',
      batch_size => 100, options => '{"workers": 3, "max_retries": 1000, "retry_base_ms": 500, "retry_cap_ms": 1000}');`);
    const sender = sb.createSender("many");
    for (let i = 0; i < n; i += 500)
      await sender.sendMessages(Array.from({ length: 500 }, (_, k) => ({ messageId: `many-${i + k}`, body: { id: i + k, amount: 1 } })));
    await sender.close();

    // Phase 1: the first 10,000 go through, shared among the three workers.
    await waitFor(async () => (await appliesOf(pg)).messages === 10000, { timeout: 120000, interval: 200, what: "the first 10,000 applied" });
    const perWorker = (await pg.query("SELECT worker, applied, state FROM sbpg.stats_workers WHERE subscription = 'many' ORDER BY worker")).rows;
    assert.deepEqual(perWorker.map((r) => r.worker), [0, 1, 2], "one row per worker");
    for (const w of perWorker) assert.ok(Number(w.applied) > 0, `worker ${w.worker} applied some (${w.applied})`);
    const total = (await pg.query("SELECT applied, workers FROM sbpg.stats WHERE subscription = 'many'")).rows[0];
    assert.equal(total.workers, 3);
    assert.equal(Number(total.applied), perWorker.reduce((a, w) => a + Number(w.applied), 0), "sbpg.stats is the workers' total");
    assert.equal(Number(total.applied), 10000);

    // Two SIGKILLs of single workers while messages are held for retries.
    for (let k = 0; k < 2; ++k) {
      const pids = await waitFor(async () => ((await workerPids()).length === 3 ? workerPids() : null), { timeout: 60000, what: "three workers" });
      pg.kill(pids[k]);
      await waitFor(async () => {
        const now = await workerPids();
        return now.length === 3 && !now.includes(pids[k]);
      }, { timeout: 60000, what: "the workers back after the crash restart" });
    }

    await pg.query("UPDATE gate SET open = true");
    await waitFor(async () => (await emu.entity("many")).completed === n, { timeout: 180000, interval: 500, what: "every message completed" });
    const a = await appliesOf(pg);
    assert.deepEqual(a, { rows: n, messages: n, twice: [] }, "every message applied exactly once");
    const pids = Number((await pg.query("SELECT count(DISTINCT pid) c FROM orders_applies")).rows[0].c);
    assert.ok(pids >= 3, `applied by several worker processes (${pids})`);
    const e = await emu.entity("many");
    assert.equal(e.messages, 0);
    assert.equal(e.dead_letter_moves, 0);
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.inbox WHERE subscription = 'many' AND status = 'applied'")).rows[0].c), n);
    assert.match(pg.serverLog(), /background worker "sbpg worker" \(PID \d+\) was terminated by signal 9/);
    t.diagnostic(`${n} messages by 3 workers, ${pids} worker processes over the run (2 SIGKILLs), ${e.delivered} deliveries`);
  });

  it("a message redelivered to a second worker while the first still applies it is applied once: the first rolls back and settles a duplicate", async () => {
    // prefetch 1: the first worker, holding the message, has no credit, so the redelivery after
    // the lock ends can only go to the second. The first attempt waits at a gate the test holds.
    await pg.psql(`
      CREATE SEQUENCE race_attempts;
      GRANT USAGE ON SEQUENCE race_attempts TO app;
      CREATE FUNCTION race_order(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF nextval('public.race_attempts') = 1 THEN PERFORM pg_advisory_xact_lock_shared(4250); END IF;
        PERFORM public.apply_order(m);
      END $f$;
      GRANT EXECUTE ON FUNCTION race_order(sbpg.message) TO app;`);
    const gate = await pg.client();
    await gate.query("SELECT pg_advisory_lock(4250)");
    const listener = await pg.listen();
    await pg.psql(`SELECT sbpg.create_subscription('race', '${emu.amqp}', 'race', 'race_order(sbpg.message)', 'app', 'emu',
      batch_size => 1, prefetch => 1, options => '{"workers": 2}');`);
    await waitFor(async () => (await pg.query("SELECT workers FROM sbpg.stats WHERE subscription = 'race'")).rows[0]?.workers === 2,
      { what: "two workers" });
    const sender = sb.createSender("race");
    await sender.sendMessages({ messageId: "race-1", body: { id: 900001, amount: 1 } });
    await sender.close();
    await waitFor(async () => (await pg.query(
      "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'sbpg worker' AND wait_event = 'advisory'")).rowCount === 1,
    { what: "the first worker at the gate" });
    await emu.ctl("POST", "/faults/expire-locks");
    await waitFor(async () => (await appliesOf(pg, "id = 900001")).rows === 1, { what: "the second worker applied it" });
    await gate.query("SELECT pg_advisory_unlock(4250)");
    await waitFor(() => /sbpg: message race-1 was recorded meanwhile by another worker of subscription "race"/.test(pg.serverLog()),
      { what: "the first worker's insert found the other's row" });
    await waitFor(() => listener.got.some((x) => x.subscription === "race" && x.status === "duplicate"), { what: "a duplicate notified" });
    assert.deepEqual(await appliesOf(pg, "id = 900001"), { rows: 1, messages: 1, twice: [] }, "applied once");
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.inbox WHERE subscription = 'race'")).rows[0].c), 1);
    assert.equal(listener.got.filter((x) => x.subscription === "race" && x.status === "applied").length, 1);
    assert.equal(Number((await pg.query("SELECT count(*) c FROM sbpg.retries WHERE subscription = 'race'")).rows[0].c), 0,
      "no retry row for a message another worker applied");
    await waitFor(async () => (await emu.entity("race")).completed === 1, { what: "settled once" });
    await listener.close();
    await gate.end();
  });
});
