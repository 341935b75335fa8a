// Failover: a primary with a streaming standby on this machine. With a synchronous standby, sbpg
// settles a message only once the standby confirmed its commit (also when the commit's own wait is
// cancelled or the worker terminated), and after the primary is lost and the standby promoted, the
// standby's workers start and every message is applied exactly once. With an asynchronous standby,
// a failover loses the effects of the messages whose commits had not reached the standby: the
// broker had them settled, so nothing brings them back; the test shows that they are exactly the
// rows the old primary's inbox has and the new one lacks (docs/scaling.md, Failover).
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync } from "node:fs";
import { join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, startStandby, installOrders, appliesOf, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const names = ["held", "failover-sync", "failover-async"];

const workers = async (c) =>
  (await c.query("SELECT pid, wait_event FROM pg_stat_activity WHERE backend_type = 'sbpg worker'")).rows;
const sbpgProcesses = async (c) =>
  Number((await c.query("SELECT count(*) c FROM pg_stat_activity WHERE backend_type IN ('sbpg launcher', 'sbpg worker')")).rows[0].c);
const ordersCount = async (c) => Number((await c.query("SELECT count(*) c FROM orders")).rows[0].c);

async function makeSynchronous(primary) {
  await primary.query("ALTER SYSTEM SET synchronous_standby_names = 'standby1'");
  await primary.query("SELECT pg_reload_conf()");
  await waitFor(async () => (await primary.query(
    "SELECT 1 FROM pg_stat_replication WHERE application_name = 'standby1' AND sync_state = 'sync'")).rowCount === 1,
  { what: "the standby synchronous" });
}

// A handler that waits at advisory lock `key` (held by the test) for every id from `from` on.
async function installGated(primary, gates) {
  const checks = gates.map(([from, key]) =>
    `IF (m.body->>'id')::bigint >= ${from} THEN PERFORM pg_advisory_xact_lock_shared(${key}); END IF;`).join("\n");
  await primary.psql(`
    CREATE FUNCTION gated_order(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
    BEGIN
      ${checks}
      PERFORM public.apply_order(m);
    END $f$;
    GRANT EXECUTE ON FUNCTION gated_order(sbpg.message) TO app;
    SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
}

const atGate = async (c) => (await workers(c)).some((w) => w.wait_event === "advisory");

describe("failover", () => {
  let emu, sb;
  const clusters = [];

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: names.map((n) => queue(n, { MaxDeliveryCount: 100 })) }) });
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await sb?.close();
    for (const c of clusters) if (c.postmasterPid()) await c.stop();
    await emu?.stop();
  });

  async function send(entity, n) {
    const sender = sb.createSender(entity);
    for (let i = 0; i < n; i += 500)
      await sender.sendMessages(Array.from({ length: Math.min(500, n - i) }, (_, k) => ({
        messageId: `${entity}-${i + k}`, body: { id: i + k, amount: 1 },
      })));
    await sender.close();
  }

  it("settles nothing a synchronous standby has not confirmed, also when the commit's wait is cancelled or the worker terminated", async () => {
    const primary = await startCluster();
    const standby = await startStandby(primary);
    clusters.push(primary, standby);
    await installOrders(primary);
    await installGated(primary, []);
    await makeSynchronous(primary);
    await primary.psql(`SELECT sbpg.create_subscription('held', '${emu.amqp}', 'held', 'apply_order(sbpg.message)', 'app', 'emu');`);
    await waitFor(async () => (await primary.query("SELECT state FROM sbpg.stats WHERE subscription = 'held'")).rows[0]?.state === "connected",
      { what: "the worker connected" });
    standby.stopServer("fast"); // from now on every commit waits
    await send("held", 1);
    const [w] = await waitFor(async () => (await workers(primary)).filter((x) => x.wait_event === "SyncRep"),
      { what: "the worker's commit waiting for the standby" }).then((ws) => (ws.length ? ws : null));
    await primary.query("SELECT pg_cancel_backend($1)", [w.pid]);
    await waitFor(() => primary.serverLog().includes("canceling wait for synchronous replication due to user request"),
      { what: "the commit's wait cancelled" });
    // The commit stands locally now; the worker waits again instead of settling.
    await waitFor(async () => (await workers(primary)).some((x) => x.pid === w.pid && x.wait_event === "SyncRep"),
      { what: "the worker waiting again" });
    let e = await emu.entity("held");
    assert.equal(e.completed, 0, "not settled while the standby lacks the commit");
    assert.equal(e.locked, 1);
    assert.equal(Number((await primary.query("SELECT applied FROM sbpg.stats WHERE subscription = 'held'")).rows[0].applied), 0,
      "the worker has not gone past the commit");

    await primary.query("SELECT pg_terminate_backend($1)", [w.pid]);
    await waitFor(() => primary.serverLog().includes(
      "canceling the wait for synchronous replication and terminating connection due to administrator command"),
    { what: "the worker terminated while waiting" });
    await waitFor(() => primary.serverLog().includes(`background worker "sbpg worker" (PID ${w.pid}) exited with exit code 1`),
      { what: "the worker gone" });
    // The launcher starts it again; the redelivered message is in the inbox (committed locally),
    // and even that duplicate is settled only once the standby has the row.
    await waitFor(async () => (await workers(primary)).some((x) => x.pid !== w.pid && x.wait_event === "SyncRep"),
      { timeout: 60000, what: "the new worker waiting for the standby before settling" });
    e = await emu.entity("held");
    assert.equal(e.completed, 0);
    assert.ok(e.delivered >= 2, `the message was delivered again (${e.delivered})`);

    standby.start();
    await waitFor(async () => (await emu.entity("held")).completed === 1, { timeout: 60000, what: "settled once the standby confirmed" });
    assert.deepEqual(await appliesOf(primary), { rows: 1, messages: 1, twice: [] });
    await waitFor(async () => (await standby.query("SELECT status FROM sbpg.inbox WHERE message_id = 'held-0'")).rows[0]?.status === "applied",
      { what: "the inbox row on the standby" });
    assert.deepEqual(await appliesOf(standby), { rows: 1, messages: 1, twice: [] });
    await primary.query("SELECT sbpg.drop_subscription('held')");
  });

  it("applies every message exactly once across the loss of the primary and the promotion of its synchronous standby", async (t) => {
    const n = 20000;
    const primary = await startCluster();
    const standby = await startStandby(primary);
    clusters.push(standby); // the primary is lost below
    await installOrders(primary, { keyed: false });
    await installGated(primary, [[12000, 4243]]);
    await makeSynchronous(primary);
    const gate = await primary.client();
    await gate.query("SELECT pg_advisory_lock(4243)");
    await primary.psql(`SELECT sbpg.create_subscription('failover-sync', '${emu.amqp}', 'failover-sync', 'gated_order(sbpg.message)', 'app', 'emu', batch_size => 100);`);
    await send("failover-sync", n);
    await waitFor(() => atGate(primary), { timeout: 60000, what: "the worker at the gate, mid-run" });
    const appliedOnOld = await ordersCount(primary);
    assert.equal(await sbpgProcesses(standby), 0, "no sbpg process on a server in recovery");

    await primary.killAll();
    await gate.end().catch(() => {});
    const replicated = await ordersCount(standby);
    assert.ok(replicated >= appliedOnOld, `every commit the old primary reported is on the standby (${replicated} >= ${appliedOnOld})`);
    standby.promote();
    await waitFor(async () => (await emu.entity("failover-sync")).completed === n,
      { timeout: 120000, interval: 200, what: "every message completed after the promotion" });
    assert.ok(await sbpgProcesses(standby) >= 2, "the promoted standby runs the launcher and the worker");
    assert.deepEqual(await appliesOf(standby), { rows: n, messages: n, twice: [] }, "none lost, none applied twice");
    const e = await emu.entity("failover-sync");
    assert.equal(e.messages, 0);
    assert.equal(e.dead_letter_moves, 0);
    t.diagnostic(`${appliedOnOld} applied on the old primary before it was lost, the rest on the promoted standby`);
  });

  it("with an asynchronous standby, loses exactly the messages whose commits had not reached it, and applies none twice", async (t) => {
    const n = 20000;
    const primary = await startCluster();
    const standby = await startStandby(primary);
    clusters.push(standby);
    await installOrders(primary, { keyed: false });
    await installGated(primary, [[5000, 4244], [12000, 4245]]);
    const gate = await primary.client();
    await gate.query("SELECT pg_advisory_lock(4244), pg_advisory_lock(4245)");
    await primary.psql(`SELECT sbpg.create_subscription('failover-async', '${emu.amqp}', 'failover-async', 'gated_order(sbpg.message)', 'app', 'emu', batch_size => 100);`);
    await send("failover-async", n);
    await waitFor(() => atGate(primary), { timeout: 60000, what: "the worker at the first gate" });
    const atFirst = await ordersCount(primary);
    await waitFor(async () => (await ordersCount(standby)) === atFirst, { what: "the standby caught up" });
    // The standby stops receiving (its WAL receiver paused), as a lagging network would; the
    // primary goes on committing and settling without waiting for it.
    const receiver = Number((await standby.query("SELECT pid FROM pg_stat_wal_receiver")).rows[0].pid);
    process.kill(receiver, "SIGSTOP");
    try {
      await gate.query("SELECT pg_advisory_unlock(4244)");
      await waitFor(async () => (await atGate(primary)) && (await ordersCount(primary)) > atFirst,
        { timeout: 60000, what: "the worker at the second gate" });
      await primary.killAll();
      await gate.end().catch(() => {});
    } finally {
      process.kill(receiver, "SIGCONT");
    }
    standby.promote();
    await waitFor(async () => (await emu.entity("failover-async")).completed === n,
      { timeout: 120000, interval: 200, what: "every message completed (by the old primary or the new)" });
    const after = await appliesOf(standby);
    assert.deepEqual(after.twice, [], "none applied twice");
    const lost = n - after.messages;
    assert.ok(lost > 0, "the messages committed while the standby lagged were lost");

    // The old primary's disk still holds them: start it alone (sbpg not loaded, so it consumes
    // nothing) and compare the inboxes.
    appendFileSync(join(primary.data, "postgresql.conf"), "\nshared_preload_libraries = ''\n");
    primary.start();
    clusters.push(primary);
    const ids = async (c) => new Set((await c.query("SELECT message_id FROM sbpg.inbox WHERE subscription = 'failover-async' AND status = 'applied'")).rows.map((r) => r.message_id));
    const oldIds = await ids(primary);
    const newIds = await ids(standby);
    const missing = [...oldIds].filter((id) => !newIds.has(id));
    assert.equal(missing.length, lost, "the lost messages are exactly those only the old primary's inbox has");
    assert.equal(newIds.size + missing.length, n);
    t.diagnostic(`${lost} of ${n} messages lost by the asynchronous failover (applied and settled on the old primary only)`);
  });
});
