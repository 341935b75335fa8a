// Effectively once: a worker that dies after COMMIT and before settling, and a server stopped
// with `pg_ctl restart -m immediate` in the middle of a run (with synchronous_commit = off), lose
// nothing and apply nothing twice; redeliveries are recognised by the inbox and settled as
// duplicates.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, appliesOf, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

describe("effectively once", () => {
  let emu, pg, sb;
  const count = async (where = "") => Number((await pg.query(`SELECT count(*) c FROM orders ${where}`)).rows[0].c);

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["once", "crash"].map((n) => queue(n, { MaxDeliveryCount: 100 })) }) });
    pg = await startCluster({ conf: { synchronous_commit: "off" } });
    // No key on orders: a message applied twice would be two rows, not a failed second apply.
    await installOrders(pg, { keyed: false });
    await pg.psql(`SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("settles a batch committed by a worker that died before settling as duplicates, without applying it again", async () => {
    const tag = `exit_after_commit#${randomUUID()}`;
    await pg.query(`ALTER SYSTEM SET sbpg.test_fault = '${tag}'`);
    await pg.query("SELECT pg_reload_conf()");
    await waitFor(async () => (await pg.query("SELECT current_setting('sbpg.test_fault') v")).rows[0].v === tag, { what: "fault armed" });
    const listener = await pg.listen();
    const n = 500;
    await sb.createSender("once").sendMessages(Array.from({ length: n }, (_, i) => ({ messageId: `once-${i}`, body: { id: i, amount: 1 } })));
    await pg.psql(`SELECT sbpg.create_subscription('once', '${emu.amqp}', 'once', 'apply_order(sbpg.message)', 'app', 'emu', batch_size => 50);`);
    await waitFor(() => pg.serverLog().includes(`test fault ${tag}`), { what: "the fault to fire" });
    await waitFor(async () => (await emu.entity("once")).completed === n, { timeout: 60000, what: "every message completed" });
    assert.equal(await count("WHERE id < 1000"), n, "each message applied exactly once");
    assert.equal(Number((await pg.query("SELECT count(DISTINCT message_id) c FROM orders WHERE id < 1000")).rows[0].c), n);
    assert.deepEqual(await appliesOf(pg, "id < 1000"), { rows: n, messages: n, twice: [] });
    const dups = listener.got.filter((x) => x.subscription === "once" && x.status === "duplicate");
    assert.ok(dups.length >= 1 && dups.length <= 50, `the committed batch came back as duplicates (${dups.length})`);
    const applied = listener.got.filter((x) => x.subscription === "once" && x.status === "applied");
    assert.equal(applied.length, n);
    const st = (await pg.query("SELECT duplicates, applied FROM sbpg.stats WHERE subscription = 'once'")).rows[0];
    assert.equal(Number(st.duplicates), dups.length);
    assert.equal((await emu.entity("once")).messages, 0);
    assert.match(pg.serverLog(), /background worker "sbpg worker" \(PID \d+\) exited with exit code 1/);
    await listener.close();
    await pg.query("ALTER SYSTEM RESET sbpg.test_fault");
    await pg.query("SELECT pg_reload_conf()");
  });

  it("loses nothing and applies nothing twice across an immediate restart with synchronous_commit off", async () => {
    // The crash must come while the worker holds messages: from id 12500 on the handler waits for an
    // advisory lock the test holds, so the restart finds a batch in flight (not a race against the
    // run, which on a fast machine could end first).
    await pg.psql(`
      CREATE FUNCTION gated_order(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'id')::bigint >= 12500 THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;
        PERFORM public.apply_order(m);
      END $f$;
      GRANT EXECUTE ON FUNCTION gated_order(sbpg.message) TO app;
      SELECT sbpg.create_subscription('crash', '${emu.amqp}', 'crash', 'gated_order(sbpg.message)', 'app', 'emu', batch_size => 100);`);
    const gate = await pg.client();
    await gate.query("SELECT pg_advisory_lock(4242)");
    const n = 5000;
    const sender = sb.createSender("crash");
    for (let i = 0; i < n; i += 500)
      await sender.sendMessages(Array.from({ length: 500 }, (_, k) => ({ messageId: `crash-${i + k}`, body: { id: 10000 + i + k, amount: 1 } })));
    // Batches need not start at a multiple of 100: the one that reaches the gate may hold earlier ids.
    await waitFor(async () => (await count("WHERE id >= 10000")) >= 2000, { what: "most of the run up to the gate applied" });
    await waitFor(async () => (await pg.query(
      "SELECT count(*)::int c FROM pg_stat_activity WHERE backend_type = 'sbpg worker' AND wait_event = 'advisory'")).rows[0].c === 1,
    { what: "the worker waiting at the gate" });
    pg.restart("immediate"); // ends the gate's session too
    await gate.end().catch(() => {});
    // The crash hit work in flight: the broker saw the worker's link go with messages it had
    // received and not settled (their locks released by the detach, delivered again later).
    const atCrash = await waitFor(async () => {
      const e = await emu.entity("crash");
      return e.released_by_detach > 0 ? e : null;
    }, { what: "the dead worker's unsettled messages released" });
    await waitFor(async () => (await emu.entity("crash")).completed === n, { timeout: 90000, interval: 200, what: "every message completed" });
    const e = await emu.entity("crash");
    assert.ok(atCrash.completed < n, `the crash came before the run ended (${atCrash.completed} of ${n} completed)`);
    assert.ok(e.delivered >= n + atCrash.released_by_detach,
      `the ${atCrash.released_by_detach} messages in flight were delivered again (${e.delivered} deliveries of ${n})`);
    assert.equal(await count("WHERE id >= 10000"), n);
    assert.deepEqual(await appliesOf(pg, "id >= 10000"), { rows: n, messages: n, twice: [] }, "none lost, none applied twice");
    assert.equal(Number((await pg.query("SELECT count(DISTINCT message_id) c FROM orders WHERE id >= 10000")).rows[0].c), n);
    const inbox = (await pg.query("SELECT count(*)::int c FROM sbpg.inbox WHERE subscription = 'crash' AND status = 'applied'")).rows[0].c;
    assert.equal(inbox, n);
    assert.equal((await emu.entity("crash")).messages, 0);
    assert.equal((await emu.entity("crash")).dead_letter_moves, 0);
  });
});
