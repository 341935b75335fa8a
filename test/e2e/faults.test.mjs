// Connection-level faults (docs/retries.md): a worker started while the broker refuses
// connections, dropped connections mid-stream, server-busy on attach, a broker that restarts,
// settlements lost between COMMIT and the broker's answer, locks that expire under a slow
// handler, and backpressure when PostgreSQL is slow. Each ends with every message applied once.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, appliesOf, waitFor, freePort, sleep } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const QUEUES = ["late", "dns", "drop", "busy", "restart", "unsettled", "expire", "pressure"];

describe("faults", () => {
  let emu, pg, sb, listener, port;
  const got = (sub, status) => listener.got.filter((x) => x.subscription === sub && (!status || x.status === status));
  const count = async (lo, hi) =>
    Number((await pg.query("SELECT count(DISTINCT message_id) d, count(*) c FROM orders WHERE id >= $1 AND id < $2", [lo, hi])).rows[0].c);
  const distinct = async (lo, hi) =>
    Number((await pg.query("SELECT count(DISTINCT message_id) d FROM orders WHERE id >= $1 AND id < $2", [lo, hi])).rows[0].d);
  const stats = async (name) => (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
  const config = () => configWith({
    queues: QUEUES.map((n) => queue(n, { MaxDeliveryCount: 100, LockDuration: ["expire", "pressure"].includes(n) ? "PT5S" : "PT30S" })),
  });
  const startEmu = () => startSbemu({ config: config(), args: ["--listen", `127.0.0.1:${port}`] });
  // The fixed port: the ephemeral listener moves when listeners reopen or sbemu restarts.
  const client = () => new ServiceBusClient(
    `Endpoint=sb://127.0.0.1:${port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`,
    { retryOptions });
  const sendRange = async (q, lo, n, extra = {}) => {
    const s = sb.createSender(q);
    for (let i = 0; i < n; i += 500)
      await s.sendMessages(Array.from({ length: Math.min(500, n - i) }, (_, k) => ({
        messageId: `${q}-${lo + i + k}`, body: { id: lo + i + k, amount: 1, ...extra },
      })));
    await s.close();
  };
  const subscribe = (name, extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', 'amqp://127.0.0.1:${port}', '${name}', 'apply_slow(sbpg.message)', 'app', 'emu'${extra});`);

  before(async () => {
    port = await freePort();
    emu = await startEmu();
    pg = await startCluster();
    // No key on orders: a message applied twice would be two rows (count(*) > count(DISTINCT)),
    // not a failed second apply.
    await installOrders(pg, { keyed: false });
    await pg.psql(`
      CREATE FUNCTION apply_slow(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF m.body ? 'sleep' THEN PERFORM pg_sleep((m.body->>'sleep')::float8); END IF;
        PERFORM apply_order(m);
      END $f$;
      GRANT EXECUTE ON FUNCTION apply_slow(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');`);
    listener = await pg.listen();
    sb = client();
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("waits for a broker that refuses connections, then consumes", async () => {
    await emu.fault("refuse-connections", { seconds: 4 });
    await subscribe("late");
    await waitFor(async () => Number((await stats("late")).reconnects) >= 1, { what: "a refused attempt" });
    const st = await stats("late");
    assert.match(st.state, /reconnecting|connecting/);
    assert.match(st.last_error, /connect|refused|closed/i);
    await waitFor(async () => !(await emu.ctl("GET", "/stats")).faults.refusing_connections, { timeout: 20000, what: "the listeners reopen" });
    await sendRange("late", 1000, 50);
    await waitFor(async () => (await count(1000, 1050)) === 50, { timeout: 60000, what: "50 rows" });
    assert.equal((await stats("late")).state, "connected");
  });

  it("keeps retrying a host name that does not resolve, and consumes once it is corrected", async () => {
    await pg.psql(`SELECT sbpg.create_subscription('dns', 'amqp://sbpg-no-such-host.invalid:${port}', 'dns', 'apply_slow(sbpg.message)', 'app', 'emu');`);
    await waitFor(async () => Number((await stats("dns")).reconnects) >= 2, { timeout: 30000, what: "two failed attempts" });
    const st = await stats("dns");
    assert.notEqual(st.state, "connected");
    assert.match(st.last_error, /sbpg-no-such-host\.invalid|resolve|Name or service not known|not known/i);
    await sendRange("dns", 1100, 5);
    await pg.psql(`SELECT sbpg.alter_subscription('dns', namespace => 'amqp://127.0.0.1:${port}');`);
    await waitFor(async () => (await count(1100, 1105)) === 5, { timeout: 60000, what: "5 rows once the name is right" });
    await pg.psql("SELECT sbpg.drop_subscription('dns');");
  });

  it("loses nothing and applies nothing twice while connections are dropped mid-stream", async () => {
    const n = 3000;
    await sendRange("drop", 10000, n); // before: drop-connections drops the sender's connection too
    await subscribe("drop", ", batch_size => 50");
    for (let k = 1; k <= 3; k++) {
      await waitFor(async () => (await count(10000, 10000 + n)) >= k * 500, { timeout: 60000, what: `${k * 500} rows` });
      const before = Number((await stats("drop")).reconnects);
      await emu.fault("drop-connections");
      await waitFor(async () => Number((await stats("drop")).reconnects) > before, { what: "the disconnect noticed" });
      await waitFor(async () => (await stats("drop")).state === "connected", { what: "connected again" });
    }
    await waitFor(async () => (await emu.entity("drop")).completed === n, { timeout: 90000, what: "every message completed" });
    assert.equal(await count(10000, 10000 + n), n, "each applied exactly once");
    assert.equal(await distinct(10000, 10000 + n), n);
    assert.equal(got("drop", "applied").length, n);
    assert.deepEqual(await appliesOf(pg, "id >= 10000 AND id < 13000"), { rows: n, messages: n, twice: [] });
    assert.ok(Number((await stats("drop")).reconnects) >= 3);
    assert.equal((await emu.entity("drop")).messages, 0);
    assert.equal((await emu.entity("drop")).dead_letter_moves, 0);
  });

  it("reconnects through server-busy answers to its attach", async () => {
    await sendRange("busy", 20000, 20);
    await emu.fault("server-busy", { count: 3 });
    await subscribe("busy");
    await waitFor(() => /"subscription":"busy".*server-busy/.test(pg.serverLog()), { timeout: 30000, what: "a server-busy refusal logged" });
    await waitFor(async () => (await count(20000, 20020)) === 20, { timeout: 60000, what: "20 rows" });
    // sbemu refuses the next three entity attaches of any link: the $management links and other
    // workers reconnecting at the same time may take some, so only one reconnect is certain.
    assert.ok(Number((await stats("busy")).reconnects) >= 1);
  });

  it("consumes from a broker that restarted on the same address", async () => {
    await subscribe("restart");
    await sendRange("restart", 30000, 10);
    await waitFor(async () => (await count(30000, 30010)) === 10, { what: "10 rows before the restart" });
    await sb.close();
    await emu.stop();
    await sleep(500);
    emu = await startEmu();
    sb = client();
    await sendRange("restart", 30010, 10);
    await waitFor(async () => (await count(30000, 30020)) === 20, { timeout: 60000, what: "10 more rows after the restart" });
    assert.equal(await distinct(30000, 30020), 20);
    // The new broker numbers its messages from 1 again: same sequence numbers, other message ids.
    assert.match(pg.serverLog(), /subscription "restart": sequence number 1 was recorded for another message/);
    assert.equal(got("restart", "duplicate").length, 0, "a reused sequence number is not mistaken for a redelivery");
  });

  it("settles again, as duplicates, messages whose settlement was lost after COMMIT", async () => {
    await subscribe("unsettled", ", batch_size => 50");
    await emu.fault("delay-dispositions", { ms: 3000 });
    const n = 200;
    await sendRange("unsettled", 40000, n);
    await waitFor(async () => (await count(40000, 40000 + n)) >= 50, { what: "a committed batch" });
    await emu.fault("drop-connections"); // the delayed settlements die with the connection
    await emu.fault("delay-dispositions", { ms: 0 });
    await waitFor(async () => (await emu.entity("unsettled")).completed === n, { timeout: 60000, what: "every message completed" });
    assert.equal(await count(40000, 40000 + n), n);
    assert.equal(await distinct(40000, 40000 + n), n);
    assert.ok(got("unsettled", "duplicate").length >= 1, "the redeliveries were recognised");
    assert.equal(got("unsettled", "applied").length, n);
    assert.deepEqual(await appliesOf(pg, "id >= 40000 AND id < 40200"), { rows: n, messages: n, twice: [] });
  });

  it("recognises the redelivery when a lock expires under a slow handler", async () => {
    // The handler runs 4.5 s under a 5-s lock: the renewal, due with 2.5 s left, finds the lock gone.
    await subscribe("expire", ", batch_size => 1");
    await sendRange("expire", 50000, 1, { sleep: 4.5 });
    await waitFor(async () => (await emu.entity("expire")).locked === 1, { what: "the message locked" });
    await emu.fault("expire-locks");
    await waitFor(() => got("expire", "duplicate").length === 1, { timeout: 30000, what: "the redelivery settled as a duplicate" });
    await waitFor(async () => (await emu.entity("expire")).completed === 1, { what: "completed" });
    assert.equal(await count(50000, 50001), 1);
    assert.deepEqual(await appliesOf(pg, "id >= 50000 AND id < 50001"), { rows: 1, messages: 1, twice: [] });
    assert.equal(got("expire", "applied").length, 1);
    const st = await stats("expire");
    assert.ok(Number(st.locks_lost) >= 1, `the refused renewal counted in locks_lost (${st.locks_lost})`);
    assert.ok(Number(st.locks_lost) <= (await emu.entity("expire")).lock_lost, "no more than the broker refused");
  });

  it("stops taking messages while PostgreSQL is blocked: at most prefetch held, locks renewed, nothing lost", async () => {
    await subscribe("pressure", ", batch_size => 10, prefetch => 40");
    await waitFor(async () => (await stats("pressure")).state === "connected", { what: "connected" });
    const blocker = await pg.client();
    await blocker.query("BEGIN");
    await blocker.query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE");
    const n = 500;
    await sendRange("pressure", 60000, n);
    await waitFor(async () => (await emu.entity("pressure")).locked === 40, { what: "prefetch filled" });
    // Hold the table past two lock durations (5 s): the worker must neither take more nor lose
    // locks. The broker keeps the most messages its link ever held locked at once, so a breach
    // between two looks would still show.
    await waitFor(async () => (await emu.entity("pressure")).lock_renewals >= 80, { timeout: 20000, what: "two rounds of renewals" });
    let e = await emu.entity("pressure");
    assert.equal(e.max_locked_by_link, 40, "never more than prefetch messages held");
    assert.equal(e.lock_lost, 0);
    assert.equal(e.lock_expired, 0);
    await blocker.query("ROLLBACK");
    await blocker.end();
    await waitFor(async () => (await emu.entity("pressure")).completed === n, { timeout: 60000, what: "all completed" });
    e = await emu.entity("pressure");
    assert.equal(e.max_locked_by_link, 40, "nor while the backlog drained");
    assert.equal(await count(60000, 60000 + n), n);
    assert.equal(await distinct(60000, 60000 + n), n);
    assert.deepEqual(await appliesOf(pg, "id >= 60000 AND id < 60500"), { rows: n, messages: n, twice: [] });
    assert.equal(got("pressure", "duplicate").length, 0, "no lock was lost, so nothing came back");
  });
});
