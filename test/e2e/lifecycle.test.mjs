// Launcher and worker lifecycle: CREATE EXTENSION noticed without a restart; enable, disable,
// alter and drop take effect at once; DROP EXTENSION and SIGTERM stop workers; a killed worker and
// a server restart are followed by consumption again.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

describe("lifecycle", () => {
  let emu, pg, sb;
  const workers = async () =>
    (await pg.query("SELECT application_name AS name, pid, state, query FROM pg_stat_activity WHERE backend_type = 'sbpg worker'")).rows;
  const workerPid = async (name) => (await workers()).find((w) => w.name === name)?.pid;
  const rows = async () => Number((await pg.query("SELECT count(*) c FROM orders")).rows[0].c);
  let nextId = 0;
  const send = async (entity, n) => {
    const msgs = Array.from({ length: n }, () => ({ body: { id: ++nextId, amount: 1 } }));
    await sb.createSender(entity).sendMessages(msgs);
  };

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["q1", "q2"].map((n) => queue(n)) }) });
    pg = await startCluster();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("runs one launcher that notices CREATE EXTENSION and new subscriptions without a restart", async () => {
    const l = (await pg.query("SELECT application_name, state FROM pg_stat_activity WHERE backend_type = 'sbpg launcher'")).rows;
    assert.equal(l.length, 1);
    assert.equal(l[0].application_name, "sbpg launcher");
    await installOrders(pg);
    await pg.psql(`SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
                   SELECT sbpg.create_subscription('one', '${emu.amqp}', 'q1', 'apply_order(sbpg.message)', 'app', 'emu');`);
    await waitFor(async () => (await workers()).some((w) => w.name === "one"), { timeout: 5000, what: "worker one" });
    await send("q1", 10);
    await waitFor(async () => (await rows()) === 10, { what: "10 rows" });
    const w = (await workers()).find((x) => x.name === "one");
    assert.ok(["waiting for messages", "sbpg: applying a batch"].includes(w.query), w.query);
  });

  it("stops a disabled subscription's worker and starts it again when enabled", async () => {
    await pg.psql("SELECT sbpg.disable_subscription('one')");
    await waitFor(async () => !(await workers()).some((w) => w.name === "one"), { timeout: 5000, what: "worker stopped" });
    assert.equal((await pg.query("SELECT state FROM sbpg.stats WHERE subscription = 'one'")).rows[0].state, "stopped");
    await send("q1", 5);
    assert.equal((await emu.entity("q1")).active, 5, "nothing consumes while disabled");
    await pg.psql("SELECT sbpg.enable_subscription('one')");
    await waitFor(async () => (await rows()) === 15, { what: "15 rows after enabling" });
  });

  it("restarts a worker with the new settings when a subscription is altered", async () => {
    const before = await waitFor(() => workerPid("one"), { what: "worker one" });
    const logFrom = pg.serverLog().length;
    await pg.psql("SELECT sbpg.alter_subscription('one', batch_size => 10)");
    const after = await waitFor(async () => {
      const p = await workerPid("one");
      return p && p !== before ? p : null;
    }, { timeout: 5000, what: "a new worker" });
    // The new worker starts with the new batch size (prefetch stays 200, twice the default batch)...
    await waitFor(() => /subscription "one": consuming q1 from \S+ as app \(batch 10, prefetch 200\)/.test(pg.serverLog().slice(logFrom)),
      { what: "the new worker's start line with batch 10" });
    // ...and applies with it: 30 messages reach the worker while its first batch waits on a lock
    // on orders, so every later batch takes all it may. No transaction holds more than 10, full
    // ones hold 10, and the new worker applied them all.
    const blocker = await pg.client();
    await blocker.query("BEGIN");
    await blocker.query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE");
    const from = nextId;
    await send("q1", 30);
    await waitFor(async () => (await emu.entity("q1")).locked === 30, { what: "30 held by the worker" });
    await blocker.query("ROLLBACK");
    await blocker.end();
    await waitFor(async () => (await rows()) === 45, { what: "45 rows" });
    const txs = (await pg.query(`SELECT xid, count(*)::int n, min(pid) pid, max(pid) maxpid FROM orders_applies
      WHERE id > $1 GROUP BY xid ORDER BY min(at)`, [from])).rows;
    assert.equal(txs.reduce((a, t) => a + t.n, 0), 30);
    assert.ok(txs.every((t) => t.n <= 10), `transactions of ${txs.map((t) => t.n).join(", ")} messages, none over 10`);
    assert.ok(txs.length >= 3 && txs.slice(1).some((t) => t.n === 10), `full batches take 10: ${txs.map((t) => t.n).join(", ")}`);
    assert.ok(txs.every((t) => t.pid === after && t.maxpid === after), "applied by the restarted worker");
  });

  it("restarts a worker that was terminated, and keeps consuming", async () => {
    const pid = await waitFor(() => workerPid("one"), { what: "worker one" });
    await pg.query("SELECT pg_terminate_backend($1)", [pid]);
    await waitFor(async () => {
      const p = await workerPid("one");
      return p && p !== pid;
    }, { timeout: 10000, what: "restarted worker" });
    await send("q1", 5);
    await waitFor(async () => (await rows()) === 50, { what: "50 rows" });
  });

  it("consumes again within 10 seconds after a worker is killed (the server restarts every backend)", async () => {
    const pid = await waitFor(() => workerPid("one"), { what: "worker one" });
    pg.kill(pid, "SIGKILL");
    await waitFor(async () => {
      const p = await workerPid("one");
      return p && p !== pid;
    }, { timeout: 10000, interval: 200, what: "worker back within 10 s" });
    await send("q1", 5);
    await waitFor(async () => (await rows()) === 55, { what: "55 rows" });
  });

  it("consumes again within 10 seconds after a server restart", async () => {
    pg.restart("fast");
    const t0 = Date.now();
    await waitFor(async () => (await workers()).some((w) => w.name === "one"), { timeout: 10000, interval: 200, what: "worker after restart" });
    assert.ok(Date.now() - t0 < 10000);
    await send("q1", 5);
    await waitFor(async () => (await rows()) === 60, { what: "60 rows" });
  });

  it("reloads settings on SIGHUP", async () => {
    await pg.query("ALTER SYSTEM SET sbpg.log_messages = 'all'");
    await pg.query("SELECT pg_reload_conf()");
    await waitFor(async () => (await pg.query("SELECT current_setting('sbpg.log_messages') AS v")).rows[0].v === "all", { what: "reload" });
    const before = pg.serverLog().length;
    await send("q1", 1);
    await waitFor(() => pg.serverLog().slice(before).includes('"event":"message","subscription":"one"'), { what: "message log line" });
    const line = pg.serverLog().slice(before).split("\n").find((l) => l.includes('"event":"message"'));
    const json = JSON.parse(line.slice(line.indexOf("{")));
    assert.equal(json.status, "applied");
    assert.ok(json.xid && json.sequence_number && "apply_ms" in json && "delivery_count" in json);
    await pg.query("ALTER SYSTEM RESET sbpg.log_messages");
    await pg.query("SELECT pg_reload_conf()");
  });

  it("stops and forgets a dropped subscription", async () => {
    await pg.psql(`SELECT sbpg.create_subscription('two', '${emu.amqp}', 'q2', 'apply_order(sbpg.message)', 'app', 'emu');`);
    await waitFor(async () => (await workers()).some((w) => w.name === "two"), { timeout: 5000, what: "worker two" });
    await pg.psql("SELECT sbpg.drop_subscription('two')");
    await waitFor(async () => !(await workers()).some((w) => w.name === "two"), { timeout: 5000, what: "worker two stopped" });
    assert.equal((await pg.query("SELECT count(*)::int c FROM sbpg.stats WHERE subscription = 'two'")).rows[0].c, 0);
  });

  it("stops every worker on DROP EXTENSION, without blocking the drop", async () => {
    const t0 = Date.now();
    await pg.psql("DROP EXTENSION sbpg CASCADE");
    assert.ok(Date.now() - t0 < 5000, "DROP EXTENSION returned promptly");
    await waitFor(async () => (await workers()).length === 0, { timeout: 3000, what: "no workers" });
    assert.equal((await pg.query("SELECT count(*)::int c FROM pg_stat_activity WHERE backend_type = 'sbpg launcher'")).rows[0].c, 1);
  });
});

// The launcher has sbpg.max_workers entries; a disabled subscription keeps one (its last figures
// in sbpg.stats) only while no enabled subscription needs it.
describe("lifecycle with more subscriptions than sbpg.max_workers", () => {
  let emu, pg, sb;
  const running = async () =>
    (await pg.query("SELECT application_name AS name FROM pg_stat_activity WHERE backend_type = 'sbpg worker' ORDER BY 1")).rows.map((r) => r.name);
  const rows = async () => Number((await pg.query("SELECT count(*) c FROM orders")).rows[0].c);
  let nextId = 0;
  const send = async (entity, n) =>
    sb.createSender(entity).sendMessages(Array.from({ length: n }, () => ({ body: { id: ++nextId, amount: 1 } })));
  const create = (name) =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', 'apply_order(sbpg.message)', 'app', 'emu');`);

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["m1", "m2", "m3"].map((n) => queue(n)) }) });
    pg = await startCluster({ conf: { "sbpg.max_workers": 2 } });
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
    await installOrders(pg);
    await pg.psql(`SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("runs a new subscription when the others are disabled, and says 'more than sbpg.max_workers' only when it is so", async () => {
    await create("m1");
    await create("m2");
    await waitFor(async () => (await running()).join() === "m1,m2", { what: "workers m1 and m2" });
    await send("m1", 3);
    await send("m2", 3);
    await waitFor(async () => (await rows()) === 6, { what: "6 rows" });
    await pg.psql("SELECT sbpg.disable_subscription('m1'); SELECT sbpg.disable_subscription('m2');");
    await waitFor(async () => (await running()).length === 0, { what: "no workers" });
    const logFrom = pg.serverLog().length;
    await create("m3");
    await waitFor(async () => (await running()).join() === "m3", { what: "worker m3" });
    await send("m3", 4);
    await waitFor(async () => (await rows()) === 10, { what: "10 rows" });
    assert.doesNotMatch(pg.serverLog().slice(logFrom), /the enabled subscriptions need more workers than sbpg.max_workers/);
    const stats = Object.fromEntries((await pg.query("SELECT subscription, state, applied FROM sbpg.stats")).rows
      .map((r) => [r.subscription, r]));
    assert.equal(stats.m3.state, "connected");
    assert.equal(Number(stats.m3.applied), 4);
    // Two enabled, two entries: both run.
    await pg.psql("SELECT sbpg.enable_subscription('m1')");
    await waitFor(async () => (await running()).join() === "m1,m3", { what: "workers m1 and m3" });
    // Three enabled, two entries: the launcher says so, and m2 waits.
    await pg.psql("SELECT sbpg.enable_subscription('m2')");
    await waitFor(() => /the enabled subscriptions need more workers than sbpg.max_workers \(2\)/.test(pg.serverLog().slice(logFrom)),
                  { what: "the launcher's warning" });
    assert.equal((await running()).join(), "m1,m3");
  });
});
