// Helpers for the chaos run (test/chaos/chaos.mjs): a seeded random generator, the message plan,
// the fault schedule, and the Azure SDK loaded from test/e2e/node_modules.
import { createRequire } from "node:module";
import { readFileSync, existsSync, statSync } from "node:fs";
import { createHash } from "node:crypto";

// The e2e suite owns the SDK and the pg driver; resolve them from there.
const requireFromE2e = createRequire(new URL("../e2e/lib/cluster.mjs", import.meta.url));
export const { ServiceBusClient } = requireFromE2e("@azure/service-bus");

/** A small seeded generator (mulberry32): the same seed gives the same messages and schedule. */
export function makeRng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const rng = {
    next,
    /** integer in [lo, hi] */
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    uniform: (lo, hi) => lo + next() * (hi - lo),
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    shuffle(arr) {
      for (let i = arr.length - 1; i > 0; i--) {
        const j = Math.floor(next() * (i + 1));
        [arr[i], arr[j]] = [arr[j], arr[i]];
      }
      return arr;
    },
  };
  return rng;
}

/**
 * The messages to send: exactly round(n * poison) poisonous ones (half a body that makes the
 * handler RAISE, half invalid JSON under a JSON content type), and a `slow` fraction of the valid
 * ones that carry a sleep of 100–600 ms for the handler.
 */
export function planMessages(n, { poison, slow }, rng) {
  const nPoison = Math.round(n * poison);
  const order = rng.shuffle(Array.from({ length: n }, (_, i) => i));
  const kind = new Array(n).fill("valid");
  for (let k = 0; k < nPoison; k++) kind[order[k]] = k % 2 === 0 ? "raise" : "badjson";
  return Array.from({ length: n }, (_, i) => {
    const m = { i, id: `chaos-${i}`, kind: kind[i] };
    if (m.kind === "valid" && rng.next() < slow) m.sleepMs = rng.int(100, 600);
    return m;
  });
}

/** The SDK message for a planned message. */
export function toSdkMessage(m) {
  const base = { messageId: m.id, contentType: "application/json", applicationProperties: { kind: m.kind } };
  if (m.kind === "badjson") return { ...base, body: Buffer.from(`{"n": ${m.i}, "broken": `) };
  const body = { n: m.i };
  if (m.kind === "raise") body.poison = true;
  if (m.sleepMs) body.sleep_ms = m.sleepMs;
  return { ...base, body };
}

/**
 * The fault schedule over a window of `windowMs`: `kills` worker kills, `immediate` immediate
 * restarts and `faults` broker faults, each at a random moment in [3%, 88%] of the window (the
 * rest of the window lets the last crash recover while messages still flow). Sorted by time.
 */
export function planEvents({ windowMs, kills, immediate, faults }, rng) {
  const at = () => Math.round(rng.uniform(0.03, 0.88) * windowMs);
  const ev = [];
  for (let k = 0; k < kills; k++) ev.push({ at: at(), type: "kill", settleMs: rng.int(0, 1500) });
  for (let k = 0; k < immediate; k++) ev.push({ at: at(), type: "immediate", settleMs: rng.int(0, 1500) });
  const kinds = ["drop-connections", "server-busy", "expire-locks", "delay-dispositions", "refuse-connections"];
  for (let k = 0; k < faults; k++) {
    const type = kinds[k % kinds.length]; // every kind comes up; the moments are random
    const e = { at: at(), type };
    if (type === "server-busy") e.count = rng.int(1, 3);
    if (type === "delay-dispositions") { e.ms = rng.int(200, 3000); e.forMs = rng.int(2000, 8000); }
    if (type === "refuse-connections") e.ms = rng.int(500, 3000);
    ev.push(e);
  }
  return ev.sort((a, b) => a.at - b.at);
}

/** Counts lines of a text file matching a pattern (0 when the file is missing). */
export function countLines(path, re) {
  if (!existsSync(path)) return 0;
  let n = 0;
  for (const line of readFileSync(path, "utf8").split("\n")) if (re.test(line)) n++;
  return n;
}

/** Whether a pid is an sbpg worker process right now (its title is "postgres: sbpg worker …"). */
export function isSbpgWorker(pid) {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("sbpg worker");
  } catch {
    return false;
  }
}

/** The installed extension library (what the run tests): path, size, mtime and a sha256 prefix. */
export function installedBuild(pgbin = process.env.PGBIN || "/usr/lib/postgresql/15/bin") {
  const path = `${pgbin}/../lib/sbpg.so`.replace(/\/bin\/\.\.\/lib\//, "/lib/");
  try {
    const buf = readFileSync(path);
    const st = statSync(path);
    return { path, size: st.size, mtime: st.mtime.toISOString(), sha256: createHash("sha256").update(buf).digest("hex").slice(0, 16) };
  } catch (e) {
    return { path, error: e.message };
  }
}
