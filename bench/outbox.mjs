// bench/outbox.mjs: the measurement of bench/outbox.sh (see there).
//   node bench/outbox.mjs AMQP CONTROL PGHOST PGPORT MESSAGES PER_TX CLIENTS
import pg from "pg";
import { ServiceBusClient } from "@azure/service-bus";

const [amqp, control, pghost, pgport, nArg, perTxArg, clientsArg] = process.argv.slice(2);
const N = Number(nArg), PER_TX = Number(perTxArg), CLIENTS = Number(clientsArg);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const conn = () => new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
const pct = (v, p) => v[Math.min(v.length - 1, Math.floor((v.length * p) / 100))];
const body = (i) => ({ order: i, customer: `c-${i % 1000}`, amount: (i % 997) + 0.5, note: "benchmark message body" });
const count = async (queue) => (await (await fetch(`${control}/entities/${queue}`)).json()).messages;

const db = conn();
await db.connect();
await db.query(`SELECT sbpg.create_publisher('bench', $1, 'emu', notify_channel => NULL, options => '{"batch_size": 100, "max_pending": 20000}')`, [amqp]);
for (let i = 0; i < 100; ++i) { // the publisher's worker up and connected
  const st = (await db.query("SELECT state FROM sbpg.publisher_stats WHERE publisher = 'bench'")).rows[0];
  if (st?.state === "connected") break;
  await sleep(100);
}

// The outbox: CLIENTS sessions queue N messages; commit times as the clients saw them.
const commitAt = new Map(); // row id -> commit time (epoch ms)
const perClient = Math.ceil(N / CLIENTS / PER_TX);
let first = Infinity;
await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
  const s = conn();
  await s.connect();
  for (let t = 0; t < perClient; ++t) {
    const base = (c * perClient + t) * PER_TX;
    if (base >= N) break;
    const n = Math.min(PER_TX, N - base);
    await s.query("BEGIN");
    const ids = (await s.query("SELECT sbpg.send('bench', 'outbox', $1::jsonb -> (g OPERATOR(pg_catalog.-) 1)) AS id FROM generate_series(1, $2::int) g",
      [JSON.stringify(Array.from({ length: n }, (_, k) => body(base + k))), n])).rows.map((r) => r.id);
    await s.query("COMMIT");
    const at = Date.now();
    first = Math.min(first, at - 0);
    for (const id of ids) commitAt.set(String(id), at);
  }
  await s.end();
}));
for (;;) {
  const q = Number((await db.query("SELECT count(*) c FROM sbpg.outbox WHERE status = 'queued'")).rows[0].c);
  if (q === 0) break;
  await sleep(20);
}
const rows = (await db.query("SELECT id, (extract(epoch FROM sent_at) * 1000)::float8 AS sent_ms FROM sbpg.outbox WHERE status = 'sent'")).rows;
const lat = rows.map((r) => r.sent_ms - commitAt.get(String(r.id))).sort((a, b) => a - b);
const last = Math.max(...rows.map((r) => r.sent_ms));
const outboxRate = Math.round(rows.length / ((last - first) / 1000));
const onBroker = await count("outbox");

// The SDK: the same messages, arrays of 100, each sendMessages awaited.
const sb = new ServiceBusClient(`Endpoint=sb://${amqp.replace(/^amqp:\/\//, "")}/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true`);
const sender = sb.createSender("sdk");
await sender.sendMessages({ body: "warm-up" });
const sdkLat = [];
const t0 = Date.now();
for (let i = 0; i < N; i += 100) {
  const msgs = Array.from({ length: Math.min(100, N - i) }, (_, k) => ({ body: body(i + k), contentType: "application/json" }));
  const s0 = Date.now();
  await sender.sendMessages(msgs);
  const d = Date.now() - s0;
  for (let k = 0; k < msgs.length; ++k) sdkLat.push(d);
}
const sdkRate = Math.round(N / ((Date.now() - t0) / 1000));
await sender.close();
await sb.close();
sdkLat.sort((a, b) => a - b);
await db.end();

console.log(`\noutbox vs the JavaScript SDK, ${N} messages, PostgreSQL 15 (fsync off), sbemu on loopback`);
console.log(`outbox: ${CLIENTS} SQL sessions, ${PER_TX} sbpg.send per transaction, publisher batch_size 100; SDK: sendMessages of 100, awaited\n`);
console.log(`${"".padEnd(36)}${"outbox".padStart(10)}${"JS SDK".padStart(10)}`);
console.log(`${"messages/s".padEnd(36)}${String(outboxRate).padStart(10)}${String(sdkRate).padStart(10)}`);
console.log(`${"latency p50 (ms)".padEnd(36)}${pct(lat, 50).toFixed(1).padStart(10)}${pct(sdkLat, 50).toFixed(1).padStart(10)}`);
console.log(`${"latency p99 (ms)".padEnd(36)}${pct(lat, 99).toFixed(1).padStart(10)}${pct(sdkLat, 99).toFixed(1).padStart(10)}`);
console.log(`${"on the broker".padEnd(36)}${String(onBroker).padStart(10)}${String(await count("sdk") - 1).padStart(10)}`);
console.log("(outbox latency: commit returned -> row marked sent after the broker accepted; SDK: sendMessages call -> resolved)");
