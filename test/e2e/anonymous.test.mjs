// The anonymous identity kind (and no identity at all): plain AMQP 1.0 peers that need no token,
// here sbemu with --no-auth. Such brokers have no $management: a message waiting for a retry is
// held (never deferred), whatever its delay.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

describe("anonymous identity", () => {
  let emu, pg, sb;
  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: [queue("plain"), queue("none"), queue("flaky")] }), args: ["--no-auth"] });
    pg = await startCluster();
    await installOrders(pg);
    await pg.psql(`
      SELECT sbpg.create_identity('anon', 'anonymous');
      CREATE SEQUENCE flaky_calls;
      GRANT USAGE ON SEQUENCE flaky_calls TO app;
      CREATE FUNCTION flaky_once(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $$
      BEGIN
        IF nextval('public.flaky_calls') = 1 THEN RAISE EXCEPTION 'try again' USING ERRCODE = 'deadlock_detected'; END IF;
        PERFORM apply_order(m);
      END $$;
      GRANT EXECUTE ON FUNCTION flaky_once(sbpg.message) TO app;
      SELECT sbpg.create_subscription('plain', '${emu.amqp}', 'plain', 'apply_order(sbpg.message)', 'app', 'anon');
      SELECT sbpg.create_subscription('none', '${emu.amqp}', 'none', 'apply_order(sbpg.message)', 'app');
      SELECT sbpg.create_subscription('flaky', '${emu.amqp}', 'flaky', 'flaky_once(sbpg.message)', 'app', 'anon',
                                      options => '{"retry_base_ms": 500, "retry_hold_ms": 0}');`);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0 } });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("consumes without putting any token", async () => {
    await sb.createSender("plain").sendMessages({ body: { id: 1, amount: 1 } });
    await sb.createSender("none").sendMessages({ body: { id: 2, amount: 1 } });
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM orders")).rows[0].c) === 2, { what: "2 rows" });
    const conns = await emu.connections();
    const sbpgConns = conns.filter((c) => c.links.some((l) => l.role === "receiver" && ["plain", "none"].includes(l.address)));
    assert.equal(sbpgConns.length, 2);
    assert.ok(sbpgConns.every((c) => c.tokens.length === 0), "no token was put");
    const st = (await pg.query("SELECT subscription, state, token_expires_at FROM sbpg.stats WHERE subscription IN ('plain', 'none') ORDER BY 1")).rows;
    assert.deepEqual(st.map((r) => [r.subscription, r.state, r.token_expires_at]), [["none", "connected", null], ["plain", "connected", null]]);
  });

  it("holds a message for its retry on a broker that cannot defer, and applies it once", async () => {
    await sb.createSender("flaky").sendMessages({ body: { id: 3, amount: 1 } });
    await waitFor(async () => Number((await pg.query("SELECT count(*) c FROM orders WHERE id = 3")).rows[0].c) === 1, { what: "row 3" });
    await waitFor(async () => (await emu.entity("flaky")).completed === 1, { what: "completed" });
    const c = await emu.entity("flaky");
    assert.equal(c.abandoned, 0, "not given back: held until its retry");
    assert.equal(c.deferrals, 0, "no $management, no deferral");
    assert.equal(c.delivered, 1);
    const st = (await pg.query("SELECT retries, deferred, abandoned FROM sbpg.stats WHERE subscription = 'flaky'")).rows[0];
    assert.deepEqual([Number(st.retries), Number(st.deferred), Number(st.abandoned)], [1, 0, 0]);
    assert.equal((await pg.query("SELECT attempts FROM sbpg.inbox WHERE subscription = 'flaky'")).rows[0].attempts, 2);
  });
});
