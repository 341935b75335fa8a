#!/usr/bin/env node
// The chaos run (issue 5): a real PostgreSQL cluster with the installed sbpg consumes a queue of
// sbemu while the harness SIGKILLs the sbpg worker, restarts the server with `-m immediate`, and
// makes the broker drop connections, refuse them, answer server-busy, expire locks and delay
// dispositions, all at seeded random moments. The official @azure/service-bus SDK sends the
// messages (5% of them poisonous, a few slow) while this goes on. When the faults stop and
// everything has drained, every valid message must have been applied exactly once, every
// poisonous one must be in the dead-letter queue with its reason, nothing else there, nothing left
// on the queue, and the server log must show no process terminated by a signal the harness did not
// send.
//
//   node test/chaos/chaos.mjs                         suite size: 10,000 messages, 10 kills
//   node test/chaos/chaos.mjs --messages 50000 --kills 20   full size
//   SEED=1234 node test/chaos/chaos.mjs                the same messages and fault schedule again
//
// Every option can also be given as an environment variable (MESSAGES, KILLS, POISON, SEED, ...);
// a flag wins. Exit status 0 when every check passed. See test/chaos/README.md.
import { rmSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { startCluster, waitFor, sleep } from "../e2e/lib/cluster.mjs";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { ServiceBusClient, makeRng, planMessages, toSdkMessage, planEvents, countLines, isSbpgWorker, installedBuild } from "./lib.mjs";

const QUEUE = "chaos";
const DLQ = `${QUEUE}/$DeadLetterQueue`;

/** Options: defaults < environment < explicit values. */
export function resolveOptions(given = {}) {
  const env = process.env;
  const num = (name, def) => {
    const v = given[name] ?? env[name.replace(/[A-Z]/g, (c) => "_" + c).toUpperCase()];
    return v === undefined || v === "" ? def : Number(v);
  };
  const o = {
    messages: num("messages", 10000),
    kills: num("kills", 10),
    poison: num("poison", 0.05),
    slow: num("slow", 0.02),
    immediate: num("immediate", 2),
    batch: num("batch", 50),
    lockSeconds: num("lockSeconds", 5),
    seed: num("seed", Math.floor(Math.random() * 2 ** 31)),
    keep: given.keep ?? (env.KEEP === "1"),
    quiet: given.quiet ?? (env.QUIET === "1"),
  };
  // The fault window: at least 10 s per server crash, and room to send the messages at a pace the
  // worker keeps up with while it is being disrupted.
  o.windowSeconds = num("windowSeconds", Math.max(60, 10 * (o.kills + o.immediate), Math.ceil(o.messages / 150)));
  o.faults = num("faults", Math.max(5, Math.round(o.windowSeconds / 6)));
  o.drainSeconds = num("drainSeconds", 180 + Math.ceil(o.messages / 200));
  for (const [k, v] of Object.entries(o)) if (typeof v === "number" && !Number.isFinite(v)) throw new Error(`option ${k} is not a number`);
  return o;
}

export async function runChaos(given = {}) {
  const o = resolveOptions(given);
  const t0 = Date.now();
  const say = (...a) => { if (!o.quiet) console.log(`[chaos +${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a); };
  const rng = makeRng(o.seed);
  const plan = planMessages(o.messages, { poison: o.poison, slow: o.slow }, rng);
  const windowMs = o.windowSeconds * 1000;
  const events = planEvents({ windowMs, kills: o.kills, immediate: o.immediate, faults: o.faults }, rng);
  const valid = plan.filter((m) => m.kind === "valid");
  const poison = plan.filter((m) => m.kind !== "valid");
  const poisonKind = new Map(poison.map((m) => [m.id, m.kind]));
  const validIds = new Set(valid.map((m) => m.id));

  const f = {
    seed: o.seed, messages: o.messages, valid: valid.length, poison: poison.length,
    poison_raise: poison.filter((m) => m.kind === "raise").length,
    poison_invalid_json: poison.filter((m) => m.kind === "badjson").length,
    slow: plan.filter((m) => m.sleepMs).length,
    kills: 0, kills_mid_batch: 0, immediate_restarts: 0,
    "drop-connections": 0, "server-busy": 0, "expire-locks": 0, "delay-dispositions": 0, "refuse-connections": 0,
    send_retries: 0,
  };
  const failures = [];
  const fail = (msg) => { failures.push(msg); say("FAIL:", msg); };
  let emu, pg;
  let running = true; // false once the run is over, also after a harness error: every loop stops
  const stray = [];
  const onStray = (e) => stray.push(String(e?.stack || e));
  process.on("unhandledRejection", onStray);

  const build = installedBuild();
  const builds = [build.sha256 || "unknown"];
  say(`testing the installed build ${build.path} (${build.size} bytes, ${build.mtime}, sha256 ${build.sha256}…)${build.error ? " " + build.error : ""}`);
  say(`seed=${o.seed} messages=${o.messages} poison=${poison.length} kills=${o.kills} immediate=${o.immediate} ` +
      `faults=${o.faults} window=${o.windowSeconds}s batch=${o.batch} lock=${o.lockSeconds}s`);
  try {
    emu = await startSbemu({
      config: configWith({
        queues: [queue(QUEUE, {
          LockDuration: `PT${o.lockSeconds}S`, MaxDeliveryCount: 100,
          // The SDK's own retries after a dropped connection may send a batch twice; the broker
          // drops the repeats, so every message id is one broker message (as on Service Bus).
          RequiresDuplicateDetection: true, DuplicateDetectionHistoryTimeWindow: "PT6H",
        })],
      }),
      args: ["--log-level", "info"],
    });
    pg = await startCluster({ conf: { synchronous_commit: "off", "sbpg.log_messages": "'all'" } });
    say(`sbemu ${emu.amqp} (log ${emu.logFile}); PostgreSQL in ${pg.dir} (log ${pg.log})`);
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE chaos_app NOLOGIN;
      CREATE TABLE public.chaos_rows (n bigint NOT NULL, message_id text NOT NULL, seq bigint, delivery_count int,
                                      xid xid8 NOT NULL DEFAULT pg_current_xact_id(), applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
      GRANT INSERT ON public.chaos_rows TO chaos_app;
      CREATE FUNCTION public.chaos_apply(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'poison')::boolean THEN
          RAISE EXCEPTION 'poisonous message %', m.message_id;
        END IF;
        IF m.body ? 'sleep_ms' THEN
          PERFORM pg_sleep((m.body->>'sleep_ms')::int / 1000.0);
        END IF;
        INSERT INTO public.chaos_rows (n, message_id, seq, delivery_count)
        VALUES ((m.body->>'n')::bigint, m.message_id, m.sequence_number, m.delivery_count);
      END $f$;
      GRANT EXECUTE ON FUNCTION public.chaos_apply(sbpg.message) TO chaos_app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.create_subscription('${QUEUE}', '${emu.amqp}', '${QUEUE}', 'chaos_apply(sbpg.message)', 'chaos_app', 'emu',
                                      batch_size => ${o.batch});
    `);

    // sbpg.stats lives in shared memory and starts from zero after every crash restart: sum the
    // counters across those resets (a counter that goes down started again).
    const statNames = ["received", "applied", "dead_lettered", "duplicates", "abandoned", "settle_failures", "reconnects"];
    const statAcc = Object.fromEntries(statNames.map((k) => [k, 0]));
    const statLast = Object.fromEntries(statNames.map((k) => [k, 0]));
    const sampleStats = async () => {
      try {
        const r = (await pg.query(`SELECT ${statNames.join(", ")} FROM sbpg.stats WHERE subscription = '${QUEUE}'`)).rows[0];
        if (!r) return;
        for (const k of statNames) {
          const v = Number(r[k]);
          if (v < statLast[k]) statAcc[k] += statLast[k];
          statLast[k] = v;
        }
      } catch { /* the server is restarting */ }
    };
    const monitor = (async () => { while (running) { await sampleStats(); await sleep(500); } })();

    const workerPid = () => waitFor(async () => {
      const r = await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg worker' AND application_name = $1", [QUEUE]);
      const pid = r.rows[0]?.pid;
      return pid && isSbpgWorker(pid) ? pid : null;
    }, { timeout: 90000, interval: 100, what: "the sbpg worker" });
    await workerPid();
    const tStart = Date.now();
    const at = (ms) => sleep(Math.max(0, tStart + ms - Date.now()));

    // The producer: chunks of 100 sent at an even pace over 80% of the window, so that work is
    // in flight whenever a fault strikes. A failed send is tried again with the same message ids.
    const producer = (async () => {
      const sb = new ServiceBusClient(emu.connectionString(), {
        retryOptions: { maxRetries: 3, retryDelayInMs: 200, maxRetryDelayInMs: 2000, timeoutInMs: 10000 },
      });
      let sender = sb.createSender(QUEUE);
      const chunk = 100;
      for (let k = 0; k < plan.length; k += chunk) {
        await at((k / plan.length) * windowMs * 0.8);
        const batch = plan.slice(k, k + chunk).map(toSdkMessage);
        for (let failed = 0; ; failed++) {
          if (!running || failed >= 200) throw new Error(`the producer gave up after ${failed} failed sends of chunk ${k / chunk}`);
          try {
            await sender.sendMessages(batch);
            break;
          } catch (e) {
            f.send_retries++;
            if (f.send_retries % 10 === 1) say(`send retry (${f.send_retries}): ${e.code || ""} ${String(e.message).slice(0, 120)}`);
            await sleep(300);
            try { await sender.close(); } catch { /* already gone */ }
            sender = sb.createSender(QUEUE);
          }
        }
      }
      await sender.close().catch(() => {});
      await sb.close().catch(() => {});
      say(`all ${plan.length} messages sent`);
    })();

    // Server faults, one after the other (each waits for the worker of the previous crash).
    const serverFaults = (async () => {
      for (const e of events.filter((x) => x.type === "kill" || x.type === "immediate")) {
        await at(e.at);
        const pid = await workerPid();
        if (e.type === "kill") {
          // Mostly aim at a batch being applied; otherwise strike whenever the dice say.
          let busy = false;
          if (e.settleMs % 3 !== 0) {
            busy = await waitFor(async () => {
              const r = await pg.query("SELECT state FROM pg_stat_activity WHERE pid = $1", [pid]);
              return r.rows[0]?.state === "active";
            }, { timeout: 3000, interval: 10, what: "a batch" }).catch(() => false);
          } else await sleep(e.settleMs);
          if (!isSbpgWorker(pid)) { say(`worker ${pid} went away before the kill; taking the next one`); }
          const target = isSbpgWorker(pid) ? pid : await workerPid();
          pg.kill(target, "SIGKILL");
          f.kills++;
          if (busy) f.kills_mid_batch++;
          say(`SIGKILL sbpg worker ${target}${busy ? " (mid-batch)" : ""}; kill ${f.kills}`);
        } else {
          await sleep(e.settleMs);
          // A new postmaster loads the library installed now, which another build may have replaced.
          const b = installedBuild();
          say(`pg_ctl restart -m immediate (${f.immediate_restarts + 1}); the new server loads build ${b.sha256}`);
          if (b.sha256 && !builds.includes(b.sha256)) builds.push(b.sha256);
          pg.restart("immediate");
          f.immediate_restarts++;
        }
      }
      // Extra kills when the schedule ran short of the minimum (it never does unless a kill failed).
      while (f.kills < o.kills) {
        const pid = await workerPid();
        pg.kill(pid, "SIGKILL");
        f.kills++;
        say(`SIGKILL sbpg worker ${pid}; kill ${f.kills} (extra)`);
      }
    })();

    // Broker faults, at their own moments.
    const timers = new Set();
    const brokerFaults = (async () => {
      for (const e of events.filter((x) => x.type !== "kill" && x.type !== "immediate")) {
        await at(e.at);
        try {
          if (e.type === "server-busy") await emu.fault("server-busy", { count: e.count });
          else if (e.type === "refuse-connections") await emu.fault("refuse-connections", { ms: e.ms });
          else if (e.type === "delay-dispositions") {
            await emu.fault("delay-dispositions", { ms: e.ms });
            const t = setTimeout(() => { timers.delete(t); emu.fault("delay-dispositions", { ms: 0 }).catch(() => {}); }, e.forMs);
            timers.add(t);
          } else await emu.fault(e.type);
          f[e.type]++;
          say(`sbemu ${e.type}${e.count ? ` count=${e.count}` : ""}${e.ms ? ` ms=${e.ms}` : ""}${e.forMs ? ` for ${e.forMs} ms` : ""}`);
        } catch (err) {
          fail(`sbemu fault ${e.type} failed: ${err.message}`);
        }
      }
    })();

    // A loop that fails is reported; the others finish, and the drain shows what became of the run.
    for (const [i, r] of (await Promise.allSettled([producer, serverFaults, brokerFaults])).entries())
      if (r.status === "rejected") fail(`${["producer", "server faults", "broker faults"][i]}: ${r.reason?.message || r.reason}`);
    for (const t of timers) clearTimeout(t);
    await emu.fault("clear");
    f.fault_window_s = Math.round((Date.now() - tStart) / 1000);
    say(`faults over after ${f.fault_window_s}s; draining`);

    // Drain: nothing left on the queue, every valid message applied, every poisonous one dead-lettered.
    const countRows = async () => (await pg.query("SELECT count(*)::int c, count(DISTINCT message_id)::int d FROM public.chaos_rows")).rows[0];
    const tDrain = Date.now();
    let drained = true;
    await waitFor(async () => {
      const e = await emu.entity(QUEUE);
      const r = await countRows();
      return e.messages === 0 && e.active === 0 && e.locked === 0 && r.d >= valid.length && e.dead_lettered >= poison.length;
    }, { timeout: o.drainSeconds * 1000, interval: 1000, what: "the queue to drain" }).catch((e) => { drained = false; fail(e.message); });
    // Settlements and their confirmations are asynchronous: let the last ones land, then look.
    await sleep(3000);
    await sampleStats();
    running = false;
    await monitor;
    f.drain_s = Math.round((Date.now() - tDrain) / 1000);

    // The checks.
    const rows = await countRows();
    const doubled = (await pg.query(
      "SELECT message_id, count(*)::int c FROM public.chaos_rows GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 20")).rows;
    const appliedIds = (await pg.query("SELECT DISTINCT message_id FROM public.chaos_rows")).rows.map((x) => x.message_id);
    const strangers = appliedIds.filter((id) => !validIds.has(id));
    const appliedSet = new Set(appliedIds);
    const missing = valid.filter((m) => !appliedSet.has(m.id)).map((m) => m.id);
    f.rows = rows.c;
    f.lost = valid.length - (rows.d - strangers.length);
    f.applied_twice = rows.c - rows.d;
    if (rows.c !== valid.length || rows.d !== valid.length) fail(`rows: ${rows.c} rows, ${rows.d} distinct message ids, ${valid.length} valid messages sent`);
    if (doubled.length) fail(`applied more than once: ${doubled.map((x) => `${x.message_id}×${x.c}`).join(", ")}`);
    if (strangers.length) fail(`rows for messages that should have been dead-lettered: ${strangers.slice(0, 20).join(", ")}`);
    if (missing.length) fail(`valid messages never applied (${missing.length}): ${missing.slice(0, 20).join(", ")}`);

    const inbox = (await pg.query(
      "SELECT status, count(*)::int c, count(*) FILTER (WHERE settled_at IS NULL)::int unconfirmed FROM sbpg.inbox WHERE subscription = $1 GROUP BY 1", [QUEUE])).rows;
    const inboxOf = (s) => inbox.find((x) => x.status === s) || { c: 0, unconfirmed: 0 };
    f.inbox_applied = inboxOf("applied").c;
    f.inbox_dead_lettered = inboxOf("dead_lettered").c;
    f.inbox_unconfirmed = inboxOf("applied").unconfirmed + inboxOf("dead_lettered").unconfirmed;
    if (f.inbox_applied !== valid.length) fail(`inbox: ${f.inbox_applied} applied rows, expected ${valid.length}`);
    if (f.inbox_dead_lettered !== poison.length) fail(`inbox: ${f.inbox_dead_lettered} dead_lettered rows, expected ${poison.length}`);

    const q = await emu.entity(QUEUE);
    for (const k of ["messages", "active", "locked", "scheduled", "deferred"])
      if (q[k] !== 0) fail(`queue still holds ${q[k]} ${k} message(s)`);
    const dlq = await emu.ctl("GET", `/entities/${encodeURIComponent(DLQ)}/messages`, { limit: 10 * o.messages + 1000 });
    const expectReason = { raise: "HandlerError", badjson: "InvalidJson" };
    const seen = new Map();
    const wrong = [];
    for (const m of dlq) {
      seen.set(m.message_id, (seen.get(m.message_id) || 0) + 1);
      const kind = poisonKind.get(m.message_id);
      if (!kind) wrong.push(`${m.message_id} (${m.dead_letter_reason}: ${m.dead_letter_description})`);
      else if (m.dead_letter_reason !== expectReason[kind] || !m.dead_letter_description)
        wrong.push(`${m.message_id} has reason ${m.dead_letter_reason} (${m.dead_letter_description}), expected ${expectReason[kind]}`);
    }
    f.dlq = dlq.length;
    if (wrong.length) fail(`dead-letter queue: ${wrong.length} unexpected: ${wrong.slice(0, 10).join("; ")}`);
    const dlqTwice = [...seen].filter(([, c]) => c > 1).map(([id, c]) => `${id}×${c}`);
    if (dlqTwice.length) fail(`dead-lettered more than once: ${dlqTwice.slice(0, 20).join(", ")}`);
    const notDead = poison.filter((m) => !seen.has(m.id)).map((m) => m.id);
    if (notDead.length) fail(`poisonous messages missing from the dead-letter queue (${notDead.length}): ${notDead.slice(0, 20).join(", ")}`);
    f.broker = Object.fromEntries(["sent", "delivered", "completed", "abandoned", "dead_letter_moves", "lock_lost", "lock_expired",
      "released_by_detach", "duplicates"].map((k) => [k, q[k]]));
    f.redeliveries = q.delivered - q.completed - q.dead_letter_moves;

    // Duplicates prevented: the server log keeps one line per settled message across every restart.
    const logText = pg.serverLog();
    f.duplicates_prevented = countLines(pg.log, /"event":"message".*"status":"duplicate"/);
    f.duplicates_stats_sum = statAcc.duplicates + statLast.duplicates;
    f.settle_failed_lines = countLines(pg.log, /"event":"settle_failed"/);
    f.batches_isolated = countLines(pg.log, /was applied message by message/);
    const appliedLines = new Map();
    for (const m of logText.matchAll(/"event":"message","subscription":"chaos","message_id":"([^"]*)".*?"status":"applied"/g))
      appliedLines.set(m[1], (appliedLines.get(m[1]) || 0) + 1);
    f.log_applied_twice = [...appliedLines.values()].filter((c) => c > 1).length;
    f.crash_restarts = (logText.match(/all server processes terminated; reinitializing/g) || []).length;
    f.stats_sum = Object.fromEntries(statNames.map((k) => [k, statAcc[k] + statLast[k]]));

    if (f.kills < o.kills) fail(`only ${f.kills} kills, wanted ${o.kills}`);
    if (f.immediate_restarts !== o.immediate) fail(`${f.immediate_restarts} immediate restarts, wanted ${o.immediate}`);
    const bad = pg.unexpectedSignals();
    f.unexpected_signals = bad.length;
    if (bad.length) fail(`server log shows processes the harness did not kill ending by a signal:\n${bad.join("\n")}`);
    if (stray.length) say(`(unhandled rejections while faults ran: ${stray.length}; first: ${stray[0].split("\n")[0]})`);
    const after = installedBuild();
    if (after.sha256 !== build.sha256)
      say(`NOTE: the installed sbpg.so changed during the run (now ${after.mtime}, sha256 ${after.sha256}…); restarts after that load the new build`);
    if (!drained) say("the run did not drain; the figures above are what was reached");
  } catch (e) {
    fail(`harness error: ${e.stack || e}`);
  } finally {
    running = false;
    process.off("unhandledRejection", onStray);
    f.elapsed_s = Math.round((Date.now() - t0) / 1000);
    try { pg?.stopServer("fast"); } catch (e) { fail(`stopping PostgreSQL: ${e.message}`); }
    try { await emu?.stop(); } catch (e) { fail(`sbemu: ${e.message}`); }
    if (failures.length === 0 && !o.keep) {
      for (const d of [pg?.dir, emu?.dir]) if (d) rmSync(d, { recursive: true, force: true });
    } else if (pg) {
      say(`kept for inspection: ${pg.dir} (server log ${pg.log}), ${emu?.dir}`);
    }
  }
  f.build = builds.join("+");
  f.failures = failures.length;
  console.log(figuresLine(f));
  return { figures: f, failures, options: o };
}

export function figuresLine(f) {
  const b = f.broker || {};
  return `chaos figures: seed=${f.seed} messages=${f.messages} valid=${f.valid} poison=${f.poison} ` +
    `(raise=${f.poison_raise} invalid_json=${f.poison_invalid_json}) slow=${f.slow} ` +
    `kills=${f.kills} (mid_batch=${f.kills_mid_batch}) immediate_restarts=${f.immediate_restarts} crash_restarts_logged=${f.crash_restarts} ` +
    `drop_connections=${f["drop-connections"]} refuse_connections=${f["refuse-connections"]} server_busy=${f["server-busy"]} ` +
    `expire_locks=${f["expire-locks"]} delay_dispositions=${f["delay-dispositions"]} ` +
    `duplicates_prevented=${f.duplicates_prevented} (stats_sum=${f.duplicates_stats_sum}) settle_failed=${f.settle_failed_lines} ` +
    `redeliveries=${f.redeliveries} lock_expired=${b.lock_expired} released_by_detach=${b.released_by_detach} ` +
    `send_retries=${f.send_retries} broker_dedup=${b.duplicates} ` +
    `rows=${f.rows} dlq=${f.dlq} lost=${f.lost} applied_twice=${f.applied_twice} ` +
    `fault_window=${f.fault_window_s}s drain=${f.drain_s}s elapsed=${f.elapsed_s}s build=${f.build} failures=${f.failures}`;
}

/** Flags: --messages 50000, --kills=20, --seed 7, --keep, --quiet (camelCase or dashed names). */
function parseFlags(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/i.exec(argv[i]);
    if (!m) throw new Error(`unknown argument ${argv[i]}`);
    const key = m[1].replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (key === "keep" || key === "quiet") { out[key] = true; continue; }
    if (key === "help") { console.log("see test/chaos/README.md"); process.exit(0); }
    out[key] = m[2] ?? argv[++i];
  }
  return out;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const { failures } = await runChaos(parseFlags(process.argv.slice(2)));
  if (failures.length) {
    console.log(`chaos: ${failures.length} check(s) failed:\n- ${failures.join("\n- ")}`);
    process.exit(1);
  }
  console.log("chaos: every check passed");
  process.exit(0);
}
