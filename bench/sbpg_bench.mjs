// bench/sbpg_bench.mjs: end-to-end measurements of sbpg for one batch size, driven by bench/sbpg.sh.
//   node bench/sbpg_bench.mjs throughput AMQP PGHOST PGPORT BATCH N
//       fills a queue with N messages, starts a subscription, and times until N confirmations arrive
//   node bench/sbpg_bench.mjs latency AMQP PGHOST PGPORT BATCH N RATE
//       with a running subscription, sends N messages at RATE msg/s and measures, per message,
//       the time from the send to its NOTIFY at a LISTEN client
//   node bench/sbpg_bench.mjs sql PGHOST PGPORT BATCH N
//       the same handler, inbox row and NOTIFY driven from SQL alone, committing every BATCH
// Prints one line: key=value pairs.
import { ServiceBusClient } from "@azure/service-bus";
import pg from "pg";

const [mode, ...args] = process.argv.slice(2);
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(p * (s.length - 1) + 0.5))] : NaN;
};
const connect = async (host, port) => {
  const c = new pg.Client({ host, port: Number(port), user: "postgres", database: "postgres" });
  await c.connect();
  return c;
};
const sbClient = (amqp) =>
  new ServiceBusClient(
    `Endpoint=sb://${amqp.replace("amqp://", "")};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`,
    { retryOptions: { maxRetries: 0 } });
const body = (i) => ({ id: i, customer: `c${i % 50}`, amount: (i % 90) + 1, note: "x".repeat(60) });

if (mode === "throughput") {
  const [amqp, host, port, batch, n] = args;
  const N = Number(n);
  const queue = `tp-${batch}`;
  const sb = sbClient(amqp);
  const sender = sb.createSender(queue);
  for (let i = 0; i < N; i += 500)
    await sender.sendMessages(Array.from({ length: Math.min(500, N - i) }, (_, k) => ({ messageId: `${queue}-${i + k}`, body: body(i + k) })));
  const db = await connect(host, port);
  const listen = await connect(host, port);
  let got = 0;
  let done;
  const finished = new Promise((r) => (done = r));
  listen.on("notification", () => {
    if (++got === N) done(Date.now());
  });
  await listen.query(`LISTEN bench_${batch}`);
  const t0 = Date.now();
  await db.query(`SELECT sbpg.create_subscription('${queue}', '${amqp}', '${queue}', 'bench_handler(sbpg.message)', 'bench_writer', 'emu', batch_size => ${batch}, notify_channel => 'bench_${batch}')`);
  const t1 = await Promise.race([finished, new Promise((r) => setTimeout(() => r(null), 300000).unref())]);
  if (!t1) {
    console.error(`throughput run timed out with ${got} of ${N} confirmations`);
    process.exit(1);
  }
  await db.query(`SELECT sbpg.disable_subscription('${queue}')`);
  console.log(`mode=throughput batch=${batch} messages=${N} seconds=${((t1 - t0) / 1000).toFixed(3)} rate=${Math.round(N / ((t1 - t0) / 1000))}`);
  await sb.close();
  await db.end();
  await listen.end();
} else if (mode === "latency") {
  const [amqp, host, port, batch, n, rate] = args;
  const N = Number(n);
  const queue = `lat-${batch}`;
  const db = await connect(host, port);
  const listen = await connect(host, port);
  await db.query(`SELECT sbpg.create_subscription('${queue}', '${amqp}', '${queue}', 'bench_handler(sbpg.message)', 'bench_writer', 'emu', batch_size => ${batch}, notify_channel => 'lat_${batch}')`);
  // Wait for the worker to be connected before timing anything.
  for (let i = 0; i < 200; i++) {
    const st = (await db.query(`SELECT state FROM sbpg.stats WHERE subscription = '${queue}'`)).rows[0];
    if (st && st.state === "connected") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const sentAt = new Map();
  const lat = [];
  let done;
  const finished = new Promise((r) => (done = r));
  listen.on("notification", (m) => {
    const id = JSON.parse(m.payload).message_id;
    const t = sentAt.get(id);
    if (t !== undefined) lat.push(performance.now() - t);
    if (lat.length === N) done();
  });
  await listen.query(`LISTEN lat_${batch}`);
  const sb = sbClient(amqp);
  const sender = sb.createSender(queue);
  const start = performance.now();
  for (let i = 0; i < N; i++) {
    const due = start + (i * 1000) / Number(rate);
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const id = `${queue}-${i}`;
    sentAt.set(id, performance.now());
    sender.sendMessages({ messageId: id, body: body(1000000 + i) }).catch((e) => console.error(e.message));
  }
  await Promise.race([finished, new Promise((r) => setTimeout(r, 120000).unref())]);
  await db.query(`SELECT sbpg.disable_subscription('${queue}')`);
  console.log(`mode=latency batch=${batch} messages=${lat.length} rate=${rate} p50_ms=${pct(lat, 0.5).toFixed(1)} p99_ms=${pct(lat, 0.99).toFixed(1)}`);
  await sb.close();
  await db.end();
  await listen.end();
} else if (mode === "sql") {
  const [host, port, batch, n] = args;
  const db = await connect(host, port);
  const t0 = Date.now();
  await db.query(`CALL bench_sql(${n}, ${batch})`);
  const t1 = Date.now();
  console.log(`mode=sql batch=${batch} messages=${n} seconds=${((t1 - t0) / 1000).toFixed(3)} rate=${Math.round(Number(n) / ((t1 - t0) / 1000))}`);
  await db.end();
} else {
  console.error("usage: sbpg_bench.mjs throughput|latency|sql ...");
  process.exit(2);
}
