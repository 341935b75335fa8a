// bench/schemas.mjs: sbpg throughput with schema validation off and on, in the same run: a
// throwaway PostgreSQL cluster and sbemu, N messages per queue (bench/sbpg_bench.mjs's bodies, with
// subject and version), one subscription each (batch 100), timed from create_subscription to the
// last NOTIFY. Driven by bench/schemas.sh.
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../test/conformance/lib/sbemu.mjs";
import { startCluster } from "../test/e2e/lib/cluster.mjs";

const N = Number(process.argv[2] || 20000);
const schema = {
  type: "object",
  properties: { id: { type: "integer" }, customer: { type: "string", pattern: "^c[0-9]+$" },
    amount: { type: "number", minimum: 0, maximum: 1000 }, note: { type: "string", maxLength: 200 } },
  required: ["id", "customer", "amount"], additionalProperties: false,
};
const emu = await startSbemu({ config: configWith({ queues: ["off1", "on1", "off2", "on2"].map((q) => queue(q, { MaxDeliveryCount: 100 })) }) });
const pg = await startCluster({ conf: { "sbpg.log_messages": "none" } });
try {
  await pg.psql(`
    CREATE EXTENSION sbpg;
    CREATE ROLE bench_writer NOLOGIN;
    CREATE TABLE bench_orders (id bigint, customer text, amount numeric, note text);
    GRANT INSERT ON bench_orders TO bench_writer;
    CREATE FUNCTION bench_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$
      INSERT INTO public.bench_orders VALUES ((m.body->>'id')::bigint, m.body->>'customer', (m.body->>'amount')::numeric, m.body->>'note') $$;
    GRANT EXECUTE ON FUNCTION bench_handler(sbpg.message) TO bench_writer;
    SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
    SELECT sbpg.register_schema('orders.created', 1, '${JSON.stringify(schema)}');`);
  const sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0 } });
  const body = (i) => ({ id: i, customer: `c${i % 50}`, amount: (i % 90) + 1, note: "x".repeat(60) });
  const run = async (q, validate) => {
    const s = sb.createSender(q);
    for (let i = 0; i < N; i += 500)
      await s.sendMessages(Array.from({ length: Math.min(500, N - i) }, (_, k) =>
        ({ messageId: `${q}-${i + k}`, subject: "orders.created", applicationProperties: { schema_version: 1 }, body: body(i + k) })));
    await s.close();
    const l = await pg.listen(`ch_${q}`);
    const t0 = Date.now();
    await pg.psql(`SELECT sbpg.create_subscription('${q}', '${emu.amqp}', '${q}', 'bench_handler(sbpg.message)', 'bench_writer', 'emu',
                   batch_size => 100, notify_channel => 'ch_${q}', options => '${JSON.stringify(validate ? { schemas: "validate" } : {})}');`);
    while (l.got.length < N) {
      if (Date.now() - t0 > 300000) throw new Error(`${q}: ${l.got.length} of ${N} after 300 s`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const secs = (Date.now() - t0) / 1000;
    const bad = l.got.filter((x) => x.status !== "applied").length;
    await l.close();
    await pg.psql(`SELECT sbpg.disable_subscription('${q}');`);
    if (bad) throw new Error(`${q}: ${bad} messages not applied`);
    return N / secs;
  };
  // Alternate, twice each, so a warm-up or a noisy neighbour does not favour one side.
  const off = [await run("off1", false)];
  const on = [await run("on1", true)];
  off.push(await run("off2", false));
  on.push(await run("on2", true));
  const rOff = Math.max(...off), rOn = Math.max(...on);
  console.log(`messages=${N} off_msg_s=${Math.round(rOff)} on_msg_s=${Math.round(rOn)} off_runs=${off.map(Math.round).join("/")} on_runs=${on.map(Math.round).join("/")} cost_us_per_message=${((1 / rOn - 1 / rOff) * 1e6).toFixed(1)}`);
  await sb.close();
} finally {
  await pg.stop();
  await emu.stop();
}
