// The chaos run at suite size (10,000 messages, 10 worker kills, 2 immediate restarts and broker
// faults; about three to five minutes on two cores). SEED=n repeats a run's messages and fault
// schedule; without it the seed is random and printed in the figures line.
import { test } from "node:test";
import assert from "node:assert/strict";
import { runChaos } from "./chaos.mjs";

test("chaos: kills, immediate restarts and broker faults lose nothing and apply nothing twice", { timeout: 20 * 60 * 1000 }, async () => {
  const { figures: f, failures } = await runChaos({
    messages: process.env.MESSAGES ?? 10000,
    kills: process.env.KILLS ?? 10,
    poison: process.env.POISON ?? 0.05,
  });
  assert.deepEqual(failures, [], `seed ${f.seed}: ${failures.join("\n")}`);
  assert.equal(f.lost, 0, "lost");
  assert.equal(f.applied_twice, 0, "applied twice");
  assert.equal(f.rows, f.valid, "one row per valid message");
  assert.equal(f.dlq, f.poison, "the poisonous messages, and only they, dead-lettered");
  assert.ok(f.kills >= Number(process.env.KILLS ?? 10), `kills: ${f.kills}`);
  assert.equal(f.immediate_restarts, 2);
  assert.equal(f.unexpected_signals, 0);
  for (const k of ["drop-connections", "server-busy", "expire-locks", "delay-dispositions"]) assert.ok(f[k] >= 1, `${k} injected`);
});
