// demo/sbpg-demo.mjs: the producer and the observer of demo/run. Sends orders with the official
// Azure SDK (with the emulator's key: the producer is not sbpg), watches them arrive in PostgreSQL
// and through LISTEN, then reads the dead-letter queue.
// Arguments: AMQP_URL PGHOST PGPORT.
import { ServiceBusClient } from "@azure/service-bus";
import pg from "pg";

const [amqp, pghost, pgport] = process.argv.slice(2);
const hostPort = amqp.replace("amqp://", "");
const say = (s = "") => console.log(s);
const db = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
await db.connect();
const listener = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
await listener.connect();

const confirmations = [];
let shown = 0;
listener.on("notification", (n) => {
  const c = JSON.parse(n.payload);
  confirmations.push(c);
  if (c.status !== "applied" || shown < 3) {
    if (c.status === "applied") shown++;
    say(`   NOTIFY sbpg_confirm ${n.payload}`);
  }
});
await listener.query("LISTEN sbpg_confirm");
say("== LISTEN sbpg_confirm (showing the first applied confirmations and every failure)");

const N = 3000;
const bad = new Map(); // message id -> what is wrong with it
const messages = [];
for (let i = 1; i <= N; i++) {
  const id = `order-${i}`;
  if (i % 500 === 0) {
    bad.set(id, "not JSON");
    messages.push({ messageId: id, body: Buffer.from(`{"id": ${i}, "customer": `), contentType: "application/json" });
  } else if (i % 500 === 250) {
    bad.set(id, "negative amount");
    messages.push({ messageId: id, body: { id: i, customer: `c${i % 17}`, amount: -5 } });
  } else if (i % 1000 === 777) {
    bad.set(id, "duplicate order id");
    messages.push({ messageId: id, body: { id: 1, customer: "again", amount: 10 } });
  } else {
    messages.push({ messageId: id, correlationId: `cart-${i % 97}`, body: { id: i, customer: `c${i % 17}`, amount: (i % 90) + 1 } });
  }
}

const sb = new ServiceBusClient(
  `Endpoint=sb://${hostPort};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`,
  { retryOptions: { maxRetries: 0 } });
const sender = sb.createSender("orders");
const t0 = Date.now();
for (let i = 0; i < N; i += 250) await sender.sendMessages(messages.slice(i, i + 250));
say(`\n== sent ${N} orders with @azure/service-bus in ${Date.now() - t0} ms (${bad.size} of them bad: ${[...new Set(bad.values())].join(", ")})`);

say("\n== rows arriving in public.orders");
let last = -1;
for (;;) {
  const n = Number((await db.query("SELECT count(*) c FROM orders")).rows[0].c);
  if (n !== last) say(`   ${String(Date.now() - t0).padStart(5)} ms: ${n} rows`);
  last = n;
  if (confirmations.length >= N) break;
  if (Date.now() - t0 > 60000) {
    say("   (stopped waiting after 60 s)");
    process.exitCode = 1;
    break;
  }
  await new Promise((r) => setTimeout(r, 250));
}

const count = (s) => confirmations.filter((c) => c.status === s).length;
say(`\n== ${confirmations.length} confirmations: ${count("applied")} applied, ${count("dead_lettered")} dead-lettered, ${count("duplicate")} duplicates`);
const rows = Number((await db.query("SELECT count(*) c FROM orders")).rows[0].c);
say(`   public.orders holds ${rows} rows (${N - bad.size} good orders sent)`);
if (rows !== N - bad.size) process.exitCode = 1;

const stats = (await db.query(
  "SELECT state, received, applied, dead_lettered, batches, round(apply_ms_p50::numeric, 3) AS apply_ms_p50, " +
  "round(apply_ms_p99::numeric, 3) AS apply_ms_p99, round(lag_ms_p50::numeric) AS lag_ms_p50, round(lag_ms_p99::numeric) AS lag_ms_p99, " +
  "token_subject, token_expires_at, tokens_put " +
  "FROM sbpg.stats WHERE subscription = 'orders'")).rows[0];
say("\n== SELECT ... FROM sbpg.stats");
for (const [k, v] of Object.entries(stats)) say(`   ${k.padEnd(16)} ${v instanceof Date ? v.toISOString() : v}`);
say("   (the worker authenticated with a managed identity token; no key or secret was given to sbpg)");

say("\n== the dead-letter queue, read back with the SDK");
const dlq = sb.createReceiver("orders", { subQueueType: "deadLetter" });
const dead = [];
while (dead.length < bad.size) {
  const got = await dlq.receiveMessages(bad.size - dead.length, { maxWaitTimeInMs: 3000 });
  if (!got.length) break;
  dead.push(...got);
}
for (const m of dead.sort((a, b) => Number(a.sequenceNumber) - Number(b.sequenceNumber))) {
  say(`   ${m.messageId.padEnd(11)} (${bad.get(m.messageId)}) -> ${m.deadLetterReason}: ${m.deadLetterErrorDescription}`);
  await dlq.completeMessage(m);
}
if (dead.length !== bad.size) {
  say(`   expected ${bad.size} dead-lettered messages, found ${dead.length}`);
  process.exitCode = 1;
}

await sb.close();
await listener.end();
await db.end();
say(process.exitCode ? "\ndemo FAILED" : "\ndemo finished: every good order applied once, every bad one dead-lettered with its reason");
