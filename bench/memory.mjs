// bench/memory.mjs: the memory and backpressure benchmark, driven by bench/memory.sh.
//   node bench/memory.mjs AMQP CONTROL PGHOST PGPORT MESSAGES LOCK_SECONDS
//
// 1. Baselines: an idle backend (connected, one SELECT), the sbpg launcher, and the sbpg worker
//    right after it connected to an empty queue.
// 2. Drain: MESSAGES messages go through one subscription (batch 100, default prefetch). The queue
//    is topped up in chunks (kept between LOW and HIGH available messages) so that sbemu never
//    holds more than HIGH + CHUNK of them. The worker's /proc/<pid>/status is read every second
//    (series) and whenever the applied count crosses a checkpoint.
// 3. Backpressure: a session holds LOCK TABLE bench_orders IN ACCESS EXCLUSIVE MODE for
//    LOCK_SECONDS while messages keep arriving at BP_RATE msg/s; every second, the worker's RSS and
//    sbemu's count of messages locked to it (which must stay within the prefetch).
// 4. Baseline at scale: a plain backend doing the same SQL work per message (the handler, an inbox
//    row, a pg_notify; COMMIT every 100) for the same checkpoints.
// Prints the tables; the per-second series goes to SERIES_CSV when that variable is set.
import pg from "pg";
import { bulkSender } from "./lib.mjs";
import { readFileSync, writeFileSync } from "node:fs";

const [amqp, control, pghost, pgport, nArg, lockArg] = process.argv.slice(2);
const N = Number(nArg);
const LOCK_S = Number(lockArg);
const BATCH = 100;
const QUEUE = "mem";
const LOW = 25000; // top up when fewer messages than this are available
const HIGH = 50000; // ... up to this many
const BP_RATE = 1000; // msg/s sent during the backpressure check
const CHECKPOINTS = [10000, 50000, 100000, 250000, 500000, 750000, 1000000].filter((c) => c < N).concat([N]);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const mib = (kb) => (kb / 1024).toFixed(1);
const num = (x) => Number(x).toLocaleString("en-US");

function memOf(pid) {
  const out = {};
  for (const line of readFileSync(`/proc/${pid}/status`, "utf8").split("\n")) {
    const m = /^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem):\s+(\d+) kB/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

async function entity(path) {
  const r = await fetch(`${control}/entities/${encodeURIComponent(path)}`);
  if (!r.ok) throw new Error(`sbemu GET /entities/${path}: ${r.status}`);
  return r.json();
}

const connect = async () => {
  const c = new pg.Client({ host: pghost, port: Number(pgport), user: "postgres", database: "postgres" });
  await c.connect();
  return c;
};
const db = await connect();
const stats = async () =>
  (await db.query(`SELECT state, pid, received::bigint AS received, applied::bigint AS applied,
                          dead_lettered::bigint AS dead_lettered, duplicates::bigint AS duplicates,
                          abandoned::bigint AS abandoned, last_error
                   FROM sbpg.stats WHERE subscription = $1`, [QUEUE])).rows[0] || {};
const settled = (s) => Number(s.applied || 0) + Number(s.dead_lettered || 0) + Number(s.duplicates || 0);

const tx = bulkSender(amqp, QUEUE, "m-"); // its sent() is the ids (and message ids) sent so far
const send = (count) => tx.send(count);

// ---- 1. Baselines ------------------------------------------------------------------------------
const idle = await connect();
const idlePid = (await idle.query("SELECT pg_backend_pid() AS p")).rows[0].p;
const idleMem = memOf(idlePid);
const launcherPid = (await db.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg launcher'")).rows[0].pid;
const launcherMem = memOf(launcherPid);

await db.query(`SELECT sbpg.create_subscription($1, $2, $1, 'bench_handler(sbpg.message)', 'bench_writer', 'emu',
                batch_size => ${BATCH})`, [QUEUE, amqp]);
let st;
for (let i = 0; ; i++) {
  st = await stats();
  if (st.state === "connected") break;
  if (i > 600) throw new Error(`worker not connected: ${JSON.stringify(st)}`);
  await sleep(50);
}
const pid = st.pid;
const connectedMem = memOf(pid);
await sleep(3000);
const connectedLaterMem = memOf(pid);
const prefetch = Number((await db.query("SELECT coalesce(prefetch, batch_size) AS p FROM sbpg.subscriptions WHERE name = $1", [QUEUE])).rows[0].p);

// ---- 2. Drain ----------------------------------------------------------------------------------
let sendError = null;
let maxHeld = 0; // largest number of messages sbemu held for the queue
const filler = (async () => {
  while (tx.sent() < N) {
    const e = await entity(QUEUE);
    if (e.active < LOW) await send(Math.min(HIGH - e.active, N - tx.sent()));
    else await sleep(100);
  }
})().catch((e) => (sendError = e));

const series = []; // one sample a second: t, settled, worker memory
const points = []; // one per checkpoint
const t0 = Date.now();
let lastSample = 0;
let cp = 0;
for (;;) {
  st = await stats();
  if (st.pid !== pid) throw new Error(`the worker changed (pid ${pid} -> ${st.pid}, state ${st.state}, ${st.last_error})`);
  const done = settled(st);
  const now = Date.now();
  if (cp < CHECKPOINTS.length && done >= CHECKPOINTS[cp]) {
    points.push({ target: CHECKPOINTS[cp], at: done, s: (now - t0) / 1000, mem: memOf(pid) });
    while (cp < CHECKPOINTS.length && done >= CHECKPOINTS[cp]) cp++;
  }
  if (now - lastSample >= 1000) {
    lastSample = now;
    series.push({ t: (now - t0) / 1000, settled: done, ...memOf(pid) });
    maxHeld = Math.max(maxHeld, (await entity(QUEUE)).messages);
    if (series.length % 30 === 0)
      console.error(`  ${series.at(-1).t.toFixed(0)} s: ${num(done)} settled, worker VmRSS ${mib(series.at(-1).VmRSS)} MiB, RssAnon ${mib(series.at(-1).RssAnon)} MiB`);
  }
  if (done >= N) break;
  if (sendError) throw sendError;
  await sleep(100);
}
const drainSeconds = (Date.now() - t0) / 1000;
await filler;
const drained = await stats();
await sleep(5000);
const afterIdleMem = memOf(pid);
if (process.env.SERIES_CSV)
  writeFileSync(process.env.SERIES_CSV, "seconds,settled,VmRSS_kB,VmHWM_kB,RssAnon_kB,RssFile_kB,RssShmem_kB\n" +
    series.map((r) => [r.t.toFixed(1), r.settled, r.VmRSS, r.VmHWM, r.RssAnon, r.RssFile, r.RssShmem].join(",")).join("\n") + "\n");

// ---- 3. Backpressure ---------------------------------------------------------------------------
async function waitConnected(notPid) {
  for (let i = 0; ; i++) {
    const s = await stats();
    if (s.state === "connected" && s.pid !== notPid) return s;
    if (i > 600) throw new Error(`worker not connected: ${JSON.stringify(s)}`);
    await sleep(50);
  }
}
async function backpressure(wpid) {
  const locker = await connect();
  await locker.query("BEGIN");
  await locker.query("LOCK TABLE bench_orders IN ACCESS EXCLUSIVE MODE");
  const before = await stats();
  const firstId = tx.sent();
  let sending = true;
  const bpSender = (async () => {
    const tick = 100; // ms; BP_RATE/10 messages per tick
    const start = Date.now();
    for (let k = 0; sending; k++) {
      await send(BP_RATE / 10);
      const wait = start + (k + 1) * tick - Date.now();
      if (wait > 0) await sleep(wait);
    }
  })().catch((e) => (sendError = e));
  const rows = [];
  const lockT0 = Date.now();
  for (let sec = 1; sec <= LOCK_S; sec++) {
    await sleep(lockT0 + sec * 1000 - Date.now());
    const e = await entity(QUEUE);
    const s = await stats();
    rows.push({ sec, sent: tx.sent() - firstId, locked: e.locked, active: e.active, settled: settled(s) - settled(before),
                received: Number(s.received) - Number(before.received), ...memOf(wpid) });
  }
  sending = false;
  await bpSender;
  const sent = tx.sent() - firstId;
  await locker.query("COMMIT");
  await locker.end();
  const unlockT = Date.now();
  for (;;) {
    const s = await stats();
    if (settled(s) - settled(before) >= sent) break;
    if (Date.now() - unlockT > 600000) throw new Error("backlog after the lock not drained in 10 minutes");
    await sleep(100);
  }
  const drainS = (Date.now() - unlockT) / 1000;
  const after = await stats();
  if (sendError) throw sendError;
  return { rows, sent, drainS, before, after, mem: memOf(wpid) };
}
const bp1 = await backpressure(pid);
// The same with a prefetch well above the batch: the bound must follow the prefetch.
const PREFETCH2 = 1000;
await db.query(`SELECT sbpg.alter_subscription($1, prefetch => ${PREFETCH2})`, [QUEUE]);
const pid2 = (await waitConnected(pid)).pid;
await sleep(1000);
const pid2Mem = memOf(pid2);
const bp2 = await backpressure(pid2);
await db.query("SELECT sbpg.disable_subscription($1)", [QUEUE]);
await tx.close();

// ---- 4. A plain backend doing the same SQL work --------------------------------------------------
const plain = await connect();
const plainPid = (await plain.query("SELECT pg_backend_pid() AS p")).rows[0].p;
const plainStart = memOf(plainPid);
const plainPoints = [];
let doneSql = 0;
const tSql = Date.now();
for (const c of CHECKPOINTS) {
  while (doneSql < c) {
    const n = Math.min(50000, c - doneSql);
    await plain.query("CALL bench_sql($1, $2, $3)", [10000000 + doneSql, n, BATCH]);
    doneSql += n;
  }
  plainPoints.push({ at: doneSql, s: (Date.now() - tSql) / 1000, mem: memOf(plainPid) });
}
const sqlSeconds = (Date.now() - tSql) / 1000;
const idleEndMem = memOf(idlePid);

// ---- Report ------------------------------------------------------------------------------------
const pad = (s, w) => String(s).padStart(w);
const cols = (m) => [mib(m.VmRSS), mib(m.RssAnon), mib(m.RssShmem), mib(m.VmHWM)].map((x) => pad(x, 9)).join("");
const head = ["VmRSS", "RssAnon", "RssShmem", "VmHWM"].map((x) => pad(x, 9)).join("");
console.log(`\nMemory of the sbpg worker (batch ${BATCH}, prefetch ${prefetch}) beside a plain backend doing the same SQL work`);
console.log(`(handler INSERT, inbox row, pg_notify; COMMIT every ${BATCH}; CALL bench_sql in one session). MiB, from /proc/<pid>/status.`);
console.log(`VmRSS = RssAnon (private memory) + RssFile (mapped binaries) + RssShmem (shared buffers this process touched).\n`);
// msg/s between the previous checkpoint (or the start) and this one
const rate = (ps, i) => pad(num(Math.round((ps[i].at - (i ? ps[i - 1].at : 0)) / (ps[i].s - (i ? ps[i - 1].s : 0)))), 8);
console.log(`${pad("messages", 22)}  | ${pad("sbpg worker", 44)} | ${pad("plain backend, same SQL", 44)}`);
console.log(`${pad("", 22)}  | ${head}${pad("msg/s", 8)} | ${head}${pad("msg/s", 8)}`);
console.log(`${pad("0 (just connected)", 22)}  | ${cols(connectedMem)}${pad("", 8)} | ${cols(plainStart)}`);
console.log(`${pad("0 (3 s later)", 22)}  | ${cols(connectedLaterMem)}${pad("", 8)} |`);
CHECKPOINTS.forEach((c, i) => {
  const p = points[i];
  const label = p && p.at !== c ? `${num(c)} (at ${num(p.at)})` : num(c);
  console.log(`${pad(label, 22)}  | ${p ? cols(p.mem) + rate(points, i) : pad("-", 44)} | ${cols(plainPoints[i].mem)}${rate(plainPoints, i)}`);
});
console.log(`${pad("drained, 5 s idle", 22)}  | ${cols(afterIdleMem)}${pad("", 8)} |`);
console.log(`\nother processes: idle backend (connected, one SELECT) ${cols(idleMem)}`);
console.log(`                 same idle backend at the end        ${cols(idleEndMem)}`);
console.log(`                 sbpg launcher                       ${cols(launcherMem)}`);
console.log(`\ndrain: ${num(N)} messages in ${drainSeconds.toFixed(1)} s (${num(Math.round(N / drainSeconds))} msg/s), ` +
  `applied ${num(drained.applied)}, dead-lettered ${num(drained.dead_lettered)}, duplicates ${num(drained.duplicates)}, ` +
  `abandoned ${num(drained.abandoned)}; sbemu held at most ${num(maxHeld)} messages of the queue at a time`);
console.log(`plain backend: ${num(N)} messages in ${sqlSeconds.toFixed(1)} s`);
const cpAnon = points.map((p) => p.mem.RssAnon);
if (points.length >= 2) {
  const a = points[0], b = points.at(-1);
  console.log(`worker RssAnon from ${num(a.at)} to ${num(b.at)} messages: ${(b.mem.RssAnon - a.mem.RssAnon) >= 0 ? "+" : ""}${mib(b.mem.RssAnon - a.mem.RssAnon)} MiB ` +
    `(${((b.mem.RssAnon - a.mem.RssAnon) * 1024 / (b.at - a.at)).toFixed(1)} bytes per message); max over the run ${mib(Math.max(...series.map((r) => r.RssAnon), ...cpAnon))} MiB`);
  const half = series.filter((r) => r.settled >= N / 2);
  if (half.length >= 2) {
    const x = half.map((r) => r.settled), y = half.map((r) => r.RssAnon);
    const mx = x.reduce((p, q) => p + q) / x.length, my = y.reduce((p, q) => p + q) / y.length;
    const slope = x.reduce((p, xi, i) => p + (xi - mx) * (y[i] - my), 0) / x.reduce((p, xi) => p + (xi - mx) ** 2, 0);
    console.log(`worker RssAnon trend over the second half (least squares, ${half.length} samples): ${(slope * 1024).toFixed(2)} bytes per message`);
  }
}

const report = (bp, pf) => {
  console.log(`\nBackpressure, prefetch ${pf}: bench_orders locked ACCESS EXCLUSIVE by another session for ${LOCK_S} s while ${num(BP_RATE)} msg/s arrive`);
  console.log(`(sent: since the lock; locked: messages sbemu has handed to the worker and not had settled, bounded by the prefetch;`);
  console.log(`waiting: available in the queue; received/settled: sbpg.stats counters since the lock).\n`);
  console.log(`${pad("s", 4)}${pad("sent", 8)}${pad("locked", 8)}${pad("waiting", 9)}${pad("received", 10)}${pad("settled", 9)}  ${head}`);
  for (const r of bp.rows)
    console.log(`${pad(r.sec, 4)}${pad(r.sent, 8)}${pad(r.locked, 8)}${pad(r.active, 9)}${pad(r.received, 10)}${pad(r.settled, 9)}  ${cols(r)}`);
  const maxLocked = Math.max(...bp.rows.map((r) => r.locked));
  const rss = bp.rows.map((r) => r.VmRSS), anon = bp.rows.map((r) => r.RssAnon);
  console.log(`\nlock released: the ${num(bp.sent)} messages sent meanwhile were settled ${bp.drainS.toFixed(1)} s later ` +
    `(applied ${num(Number(bp.after.applied) - Number(bp.before.applied))}, dead-lettered ${num(Number(bp.after.dead_lettered) - Number(bp.before.dead_lettered))}, ` +
    `abandoned ${num(Number(bp.after.abandoned) - Number(bp.before.abandoned))}); worker afterwards ${cols(bp.mem)}`);
  console.log(`during the lock: locked at most ${maxLocked} (bound ${pf}): ${maxLocked <= pf ? "within the bound" : "EXCEEDS THE BOUND"}; ` +
    `worker VmRSS ${mib(Math.min(...rss))}-${mib(Math.max(...rss))} MiB, RssAnon ${mib(Math.min(...anon))}-${mib(Math.max(...anon))} MiB`);
  return maxLocked <= pf;
};
const ok1 = report(bp1, prefetch);
console.log(`\n(alter_subscription restarted the worker with prefetch ${PREFETCH2}; the new worker right after connecting: ${cols(pid2Mem)})`);
const ok2 = report(bp2, PREFETCH2);

await Promise.all([db.end(), idle.end(), plain.end()]);
process.exit(ok1 && ok2 ? 0 : 1);
