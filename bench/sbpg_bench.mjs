// bench/sbpg_bench.mjs: end-to-end measurements of sbpg for one batch size, driven by bench/sbpg.sh.
//   node bench/sbpg_bench.mjs throughput AMQP PGHOST PGPORT BATCH N QUEUE [HANDLER]
//       fills QUEUE with N messages, starts a subscription on it (HANDLER, default
//       bench_handler(sbpg.message)), and times until N NOTIFYs arrive
//   node bench/sbpg_bench.mjs latency AMQP PGHOST PGPORT BATCH N RATE QUEUE
//       with a running subscription, sends N messages at RATE msg/s and measures, per message,
//       the time from the send to its NOTIFY at a LISTEN client (LAT_CSV=file keeps every message)
//   node bench/sbpg_bench.mjs paced AMQP PGHOST PGPORT BATCH N RATE QUEUE SENDER
//       latency at a high rate: with a running subscription, SENDER (bench/bin/amqp_throughput
//       paced) sends N messages at RATE msg/s, each carrying its send time (wall clock) in the
//       body's "note", which the handler stores; per message, send to NOTIFY at a LISTEN client
//   node bench/sbpg_bench.mjs ceiling PGHOST PGPORT BATCH N
//       the database ceiling: CALL sbpg_bench_ceiling (bench/ceiling), a COMMIT every BATCH
//   node bench/sbpg_bench.mjs handwritten AMQP PGHOST PGPORT QUEUE N
//       a typical hand-written consumer of N messages: the JS SDK's subscribe() with 16 concurrent
//       calls, a pg pool of 16, per message one transaction (bench_handler's insert and a hw_inbox
//       row), then completeMessage
// Prints one line: key=value pairs.
import { ServiceBusClient } from "@azure/service-bus";
import pg from "pg";
import { writeFileSync } from "node:fs";
import { spawn } from "node:child_process";

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

const channelOf = (queue) => queue.replace(/-/g, "_");
const wall = () => performance.timeOrigin + performance.now(); // wall-clock ms, fractional
// A subscription on QUEUE (bench_handler, notifying on the queue's channel) whose worker is
// connected before anything is timed.
async function subscribeConnected(db, amqp, queue, batch) {
  await db.query(`SELECT sbpg.create_subscription('${queue}', '${amqp}', '${queue}', 'bench_handler(sbpg.message)', 'bench_writer', 'emu', batch_size => ${batch}, notify_channel => '${channelOf(queue)}')`);
  for (let i = 0; i < 200; i++) {
    const st = (await db.query(`SELECT state FROM sbpg.stats WHERE subscription = '${queue}'`)).rows[0];
    if (st && st.state === "connected") return;
    await new Promise((r) => setTimeout(r, 50));
  }
  console.error(`the worker of ${queue} did not connect within 10 s`);
  process.exit(1);
}

if (mode === "throughput") {
  const [amqp, host, port, batch, n, queue, handler = "bench_handler(sbpg.message)"] = args;
  const N = Number(n);
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
  await listen.query(`LISTEN ${channelOf(queue)}`);
  const t0 = Date.now();
  await db.query(`SELECT sbpg.create_subscription('${queue}', '${amqp}', '${queue}', '${handler}', 'bench_writer', 'emu', batch_size => ${batch}, notify_channel => '${channelOf(queue)}')`);
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
  const [amqp, host, port, batch, n, rate, queue] = args;
  const N = Number(n);
  const db = await connect(host, port);
  const listen = await connect(host, port);
  await subscribeConnected(db, amqp, queue, batch);
  const sentAt = new Map(); // message id -> wall-clock ms of its send call
  const gotAt = new Map(); // message id -> wall-clock ms of its NOTIFY
  let done;
  let expect = 1;
  let finished = new Promise((r) => (done = r));
  listen.on("notification", (m) => {
    const id = JSON.parse(m.payload).message_id;
    if (sentAt.has(id) && !gotAt.has(id)) gotAt.set(id, wall());
    if (gotAt.size === expect) done();
  });
  await listen.query(`LISTEN ${channelOf(queue)}`);
  const sb = sbClient(amqp);
  const sender = sb.createSender(queue);
  // One message first, untimed: the sender link opens on the first send, and the worker's
  // receiver may still be getting its first credit; neither is a per-message cost.
  sentAt.set(`${queue}-warm`, wall());
  await sender.sendMessages({ messageId: `${queue}-warm`, body: body(999999) });
  await Promise.race([finished, new Promise((r) => setTimeout(r, 30000).unref())]);
  sentAt.clear();
  gotAt.clear();
  expect = N;
  finished = new Promise((r) => (done = r));
  const start = performance.now();
  for (let i = 0; i < N; i++) {
    const due = start + (i * 1000) / Number(rate);
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const id = `${queue}-${i}`;
    sentAt.set(id, wall());
    sender.sendMessages({ messageId: id, body: body(1000000 + i) }).catch((e) => console.error(e.message));
  }
  await Promise.race([finished, new Promise((r) => setTimeout(r, 120000).unref())]);
  await db.query(`SELECT sbpg.disable_subscription('${queue}')`);
  if (gotAt.size < N) {
    console.error(`latency run: ${gotAt.size} of ${N} notifications within 120 s`);
    process.exit(1);
  }
  // Where the time goes: send call -> the start of the transaction that applied the message
  // (sbpg.inbox.recorded_at, its now()) and from there -> the NOTIFY at the client.
  const rows = (await db.query(`SELECT message_id, extract(epoch FROM recorded_at) * 1000 AS at FROM sbpg.inbox
                                WHERE subscription = $1`, [queue])).rows;
  const started = new Map(rows.map((r) => [r.message_id, Number(r.at)]));
  const lat = [], toTx = [], txToNotify = [];
  for (const [id, t] of gotAt) {
    lat.push(t - sentAt.get(id));
    if (started.has(id)) {
      toTx.push(started.get(id) - sentAt.get(id));
      txToNotify.push(t - started.get(id));
    }
  }
  if (process.env.LAT_CSV)
    writeFileSync(process.env.LAT_CSV, "message_id,sent_ms,tx_start_ms,notify_ms\n" +
      [...gotAt.keys()].map((id) => [id, sentAt.get(id).toFixed(3), (started.get(id) ?? NaN).toFixed(3),
                                     gotAt.get(id).toFixed(3)].join(",")).join("\n") + "\n");
  console.log(`mode=latency batch=${batch} messages=${lat.length} rate=${rate} p50_ms=${pct(lat, 0.5).toFixed(1)} ` +
              `p99_ms=${pct(lat, 0.99).toFixed(1)} max_ms=${Math.max(...lat).toFixed(1)} ` +
              `to_tx_p50_ms=${pct(toTx, 0.5).toFixed(1)} to_tx_p99_ms=${pct(toTx, 0.99).toFixed(1)} ` +
              `tx_to_notify_p50_ms=${pct(txToNotify, 0.5).toFixed(1)} tx_to_notify_p99_ms=${pct(txToNotify, 0.99).toFixed(1)}`);
  await sb.close();
  await db.end();
  await listen.end();
} else if (mode === "paced") {
  const [amqp, host, port, batch, n, rate, queue, senderBin] = args;
  const N = Number(n);
  const db = await connect(host, port);
  const listen = await connect(host, port);
  await subscribeConnected(db, amqp, queue, batch);
  const gotAt = new Map(); // message id -> wall-clock ms of its NOTIFY
  let done;
  const finished = new Promise((r) => (done = r));
  listen.on("notification", (m) => {
    const id = JSON.parse(m.payload).message_id;
    if (!gotAt.has(id)) gotAt.set(id, wall());
    if (gotAt.size === N) done(true);
  });
  await listen.query(`LISTEN ${channelOf(queue)}`);
  let sendLine = "";
  const sender = spawn(senderBin, ["paced", `amqp://${amqp.replace("amqp://", "")}`, queue, String(N), String(rate)]);
  sender.stdout.on("data", (d) => (sendLine += d));
  sender.stderr.on("data", (d) => process.stderr.write(d));
  const senderExit = new Promise((r) => sender.on("exit", r));
  const ok = await Promise.race([finished, new Promise((r) => setTimeout(() => r(false), 120000).unref())]);
  const code = await senderExit;
  await db.query(`SELECT sbpg.disable_subscription('${queue}')`);
  if (!ok || code !== 0) {
    console.error(`paced run: ${gotAt.size} of ${N} notifications, sender exit ${code}`);
    process.exit(1);
  }
  const rows = (await db.query("SELECT message_id, note FROM bench_orders WHERE message_id LIKE 'paced-%'")).rows;
  const lat = rows.filter((r) => gotAt.has(r.message_id)).map((r) => gotAt.get(r.message_id) - Number(r.note) / 1000);
  const sentRate = (/rate=(\d+)/.exec(sendLine) || [])[1];
  console.log(`mode=paced batch=${batch} messages=${lat.length} rate=${rate} sent_rate=${sentRate} p50_ms=${pct(lat, 0.5).toFixed(1)} ` +
              `p99_ms=${pct(lat, 0.99).toFixed(1)} max_ms=${Math.max(...lat).toFixed(1)}`);
  await db.end();
  await listen.end();
} else if (mode === "ceiling") {
  const [host, port, batch, n] = args;
  const db = await connect(host, port);
  const t0 = Date.now();
  await db.query(`CALL sbpg_bench_ceiling(${Number(n)}, ${Number(batch)}, 'bench_handler(sbpg.message)', 'bench_writer',
                                          'ceiling', 'bench_ceiling')`);
  const t1 = Date.now();
  console.log(`mode=ceiling batch=${batch} messages=${n} seconds=${((t1 - t0) / 1000).toFixed(3)} rate=${Math.round(Number(n) / ((t1 - t0) / 1000))}`);
  await db.end();
} else if (mode === "handwritten") {
  const [amqp, host, port, queue, n] = args;
  const N = Number(n);
  const sb = sbClient(amqp);
  const sender = sb.createSender(queue);
  for (let i = 0; i < N; i += 500)
    await sender.sendMessages(Array.from({ length: Math.min(500, N - i) }, (_, k) => ({ messageId: `${queue}-${i + k}`, body: body(3000000 + i + k) })));
  const pool = new pg.Pool({ host, port: Number(port), user: "postgres", database: "postgres", max: 16 });
  const receiver = sb.createReceiver(queue, { receiveMode: "peekLock" });
  let got = 0;
  let failed = null;
  let done;
  const finished = new Promise((r) => (done = r));
  const t0 = Date.now();
  const sub = receiver.subscribe({
    async processMessage(m) {
      const c = await pool.connect();
      try {
        await c.query("BEGIN");
        const dup = await c.query("INSERT INTO hw_inbox (message_id, sequence_number) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                  [m.messageId, Number(m.sequenceNumber)]);
        if (dup.rowCount === 1)
          await c.query("INSERT INTO bench_orders VALUES ($1, $2, $3, $4, $5)",
                        [m.body.id, m.body.customer, m.body.amount, m.body.note, m.messageId]);
        await c.query("COMMIT");
      } catch (e) {
        await c.query("ROLLBACK").catch(() => {});
        throw e;
      } finally {
        c.release();
      }
      await receiver.completeMessage(m);
      if (++got === N) done(Date.now());
    },
    async processError(args) {
      failed = args.error;
      done(null);
    },
  }, { autoCompleteMessages: false, maxConcurrentCalls: 16 });
  const t1 = await Promise.race([finished, new Promise((r) => setTimeout(() => r(null), 300000).unref())]);
  await sub.close();
  if (!t1) {
    console.error(`hand-written consumer: ${got} of ${N} messages${failed ? `: ${failed.message}` : " (timed out)"}`);
    process.exit(1);
  }
  console.log(`mode=handwritten messages=${N} seconds=${((t1 - t0) / 1000).toFixed(3)} rate=${Math.round(N / ((t1 - t0) / 1000))}`);
  await receiver.close();
  await sb.close();
  await pool.end();
} else {
  console.error("usage: sbpg_bench.mjs throughput|latency|paced|ceiling|handwritten ...");
  process.exit(2);
}
