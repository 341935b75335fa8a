// bench/retention.mjs: a sustained drain with retention active. Driven by bench/retention.sh.
//   node bench/retention.mjs AMQP CONTROL PGHOST PGPORT SECONDS RETENTION_S BATCH
// Creates the subscription "sustained" (batch BATCH, default prefetch), keeps its queue between LOW
// and HIGH available messages for SECONDS, and samples sbpg.stats and the inbox's statistics every
// interval. Prints a table, one row per interval, and a summary line.
import pg from "pg";
import { activeMessages, bulkSender } from "./lib.mjs";

const [amqp, control, pghost, pgport, secondsArg, retentionArg, batchArg] = process.argv.slice(2);
const TOTAL_MS = Number(secondsArg) * 1000;
const RETENTION_MS = Number(retentionArg) * 1000;
const INTERVAL_MS = Math.min(60000, Math.max(1000, TOTAL_MS / 4));
const LOW = 25000, HIGH = 50000, QUEUE = "sustained";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const db = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
await db.connect();
const active = () => activeMessages(control, QUEUE);
async function sample() {
  const s = (await db.query(`SELECT state, last_error, (applied + dead_lettered + duplicates)::bigint AS settled
                             FROM sbpg.stats WHERE subscription = $1`, [QUEUE])).rows[0] || {};
  const t = (await db.query(`SELECT n_live_tup, n_dead_tup, autovacuum_count, n_tup_del,
                                    pg_relation_size('sbpg.inbox') AS heap, pg_indexes_size('sbpg.inbox') AS idx
                             FROM pg_stat_all_tables WHERE relid = 'sbpg.inbox'::regclass`)).rows[0];
  return { at: Date.now(), settled: Number(s.settled ?? 0), state: s.state, error: s.last_error, depth: await active(),
           live: Number(t.n_live_tup), dead: Number(t.n_dead_tup), deleted: Number(t.n_tup_del),
           vacuums: Number(t.autovacuum_count), mb: (Number(t.heap) + Number(t.idx)) / 1048576 };
}

const tx = bulkSender(amqp, QUEUE, "m-");
const send = (count) => tx.send(count);

await send(HIGH);
let stop = false, sendError = null;
const filler = (async () => {
  while (!stop) {
    const a = await active();
    if (a < LOW) await send(HIGH - a);
    else await sleep(20);
  }
})().catch((e) => (sendError = e));

const t0 = Date.now();
await db.query(`SELECT sbpg.create_subscription($1, $2, $1, 'bench_handler(sbpg.message)', 'bench_writer', 'emu',
                batch_size => ${Number(batchArg)})`, [QUEUE, amqp]);
const rows = [];
let prev = { ...(await sample()), at: t0, settled: 0 };
const pad = (v, w) => String(v).padStart(w);
console.log(`${pad("minute", 8)} ${pad("msg/s", 8)} ${pad("queue", 7)} ${pad("inbox rows", 11)} ${pad("dead rows", 10)} ${pad("deleted", 10)} ${pad("MB", 7)} ${pad("autovacuums", 12)}`);
while (Date.now() - t0 < TOTAL_MS) {
  await sleep(Math.min(INTERVAL_MS, TOTAL_MS - (Date.now() - t0)));
  if (sendError) throw sendError;
  const s = await sample();
  if (s.state !== "connected") throw new Error(`worker ${s.state}: ${s.error}`);
  const rate = Math.round(((s.settled - prev.settled) * 1000) / (s.at - prev.at));
  const row = { end: (s.at - t0) / 60000, rate, ...s };
  rows.push(row);
  console.log(`${pad(row.end.toFixed(1), 8)} ${pad(rate, 8)} ${pad(s.depth, 7)} ${pad(s.live, 11)} ${pad(s.dead, 10)} ${pad(s.deleted, 10)} ${pad(s.mb.toFixed(0), 7)} ${pad(s.vacuums, 12)}`);
  prev = s;
}
stop = true;
await filler;
await tx.close();

// The part of the run during which retention removed rows: from the first interval that deleted.
const pruning = rows.filter((r, i) => r.deleted > (i ? rows[i - 1].deleted : 0) || (i && rows[i - 1].deleted > 0));
const part = pruning.length >= 2 ? pruning : rows;
const sixth = Math.max(1, Math.floor(part.length / 6));
const avg = (xs) => Math.round(xs.reduce((a, r) => a + r.rate, 0) / xs.length);
const first = avg(part.slice(0, sixth)), last = avg(part.slice(-sixth));
const all = Math.round((prev.settled * 1000) / (prev.at - t0));
console.log(`\nsettled=${prev.settled} rate=${all} retention_intervals=${pruning.length} first_sixth=${first} last_sixth=${last}` +
            ` min=${Math.min(...part.map((r) => r.rate))} max=${Math.max(...part.map((r) => r.rate))}`);
console.log(`last/first: ${Math.round((100 * last) / Math.max(1, first))}% (goal: within 10%), ` +
            `inbox at the end: ${prev.live} rows, ${prev.dead} dead, ${prev.mb.toFixed(0)} MB`);
await db.end();
