// bench/inbox_scale.mjs: does sbpg's work per batch grow with the inbox? Driven by bench/inbox_scale.sh.
//   node bench/inbox_scale.mjs AMQP CONTROL PGHOST PGPORT QUEUE MESSAGES BATCH
// Creates a subscription named QUEUE on the queue QUEUE (batch BATCH, default prefetch), keeps the
// queue topped up (between LOW and HIGH available messages, so that sbemu never holds the whole
// run) until MESSAGES were sent, and polls sbpg.stats until all are settled. Prints one line of
// key=value pairs: the whole drain's rate, and the rates of its first and last tenth.
import pg from "pg";
import { activeMessages, bulkSender } from "./lib.mjs";

const [amqp, control, pghost, pgport, QUEUE, nArg, batchArg] = process.argv.slice(2);
const N = Number(nArg);
const LOW = Math.min(25000, N);
const HIGH = Math.min(50000, N);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const db = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
await db.connect();
const stats = async () =>
  (await db.query(`SELECT state, pid, (applied + dead_lettered + duplicates)::bigint AS settled, last_error
                   FROM sbpg.stats WHERE subscription = $1`, [QUEUE])).rows[0] || {};
const active = () => activeMessages(control, QUEUE);

const tx = bulkSender(amqp, QUEUE, `${QUEUE}-`);
const send = (count) => tx.send(count);

// The queue holds HIGH messages before the clock starts, so the first batches do not wait for the sender.
await send(HIGH);
let sendError = null;
const filler = (async () => {
  while (tx.sent() < N) {
    const a = await active();
    if (a < LOW) await send(Math.min(HIGH - a, N - tx.sent()));
    else await sleep(50);
  }
})().catch((e) => (sendError = e));

const t0 = Date.now();
await db.query(`SELECT sbpg.create_subscription($1, $2, $1, 'bench_handler(sbpg.message)', 'bench_writer', 'emu',
                batch_size => ${Number(batchArg)})`, [QUEUE, amqp]);
const marks = [[0, 0]]; // [ms since create_subscription, settled]
for (;;) {
  const st = await stats();
  const done = Number(st.settled || 0);
  marks.push([Date.now() - t0, done]);
  if (done >= N) break;
  if (sendError) throw sendError;
  if (st.state === "failed") throw new Error(`worker failed: ${st.last_error}`);
  await sleep(50);
}
await filler;
await db.query("SELECT sbpg.disable_subscription($1)", [QUEUE]);
// Rate over the part of the drain between two settled counts (the clock starts at create_subscription).
const at = (count) => marks.find(([, d]) => d >= count)[0];
const rate = (from, to) => Math.round((to - from) / Math.max(0.001, (at(to) - at(from)) / 1000));
const tenth = Math.max(1, Math.floor(N / 10));
console.log(`queue=${QUEUE} messages=${N} seconds=${(at(N) / 1000).toFixed(2)} rate=${rate(0, N)} ` +
            `first_tenth=${rate(0, tenth)} last_tenth=${rate(N - tenth, N)}`);
await tx.close();
await db.end();
