// bench/scaling.mjs: one drain for bench/scaling.sh.
//   node bench/scaling.mjs AMQP PGHOST PGPORT QUEUE MESSAGES BATCH OPTIONS_JSON SESSIONS
// Fills QUEUE with MESSAGES messages (spread over SESSIONS session ids when SESSIONS > 0), then
// creates a subscription named QUEUE on it (batch BATCH, the subscription options OPTIONS_JSON) and
// polls sbpg.stats until every message is settled. Prints one line of key=value pairs: the drain's
// rate (from create_subscription to the last settlement) and how many sessions the broker saw
// locked at once.
import pg from "pg";
import { bulkSender } from "./lib.mjs";

const [amqp, pghost, pgport, QUEUE, nArg, batchArg, optionsArg, sessionsArg] = process.argv.slice(2);
const N = Number(nArg);
const SESSIONS = Number(sessionsArg || 0);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const db = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
await db.connect();
const tx = bulkSender(amqp, QUEUE, `${QUEUE}-`, SESSIONS);
await tx.send(N);
await tx.close();

const t0 = Date.now();
await db.query(`SELECT sbpg.create_subscription($1, $2, $1, 'bench_handler(sbpg.message)', 'bench_writer', 'emu',
                batch_size => $3, options => $4)`, [QUEUE, amqp, Number(batchArg), optionsArg]);
let t1;
for (;;) {
  const st = (await db.query(`SELECT (applied + dead_lettered + duplicates)::bigint AS settled, state, last_error, workers
                              FROM sbpg.stats WHERE subscription = $1`, [QUEUE])).rows[0] || {};
  if (Number(st.settled || 0) >= N) {
    t1 = Date.now();
    break;
  }
  if (st.state === "failed") throw new Error(`worker failed: ${st.last_error}`);
  await sleep(20);
}
const workers = (await db.query("SELECT workers FROM sbpg.stats WHERE subscription = $1", [QUEUE])).rows[0].workers;
await db.query("SELECT sbpg.disable_subscription($1)", [QUEUE]);
await db.end();
console.log(`queue=${QUEUE} messages=${N} workers=${workers} sessions=${SESSIONS} seconds=${((t1 - t0) / 1000).toFixed(3)} ` +
            `rate=${Math.round(N / ((t1 - t0) / 1000))}`);
