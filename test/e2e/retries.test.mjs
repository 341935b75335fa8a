// The retry policy (docs/retries.md) end to end: transient errors retried with growing delays and
// counted, permanent errors dead-lettered at once, MaxRetriesExceeded after the limit, a waiting
// retry that does not hold up other messages, long delays deferred on the broker and fetched back
// by sequence number, lock renewal for a handler slower than the lock duration, the bound on
// renewal, and a failure at COMMIT (a deferred constraint) isolated to its message.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const names = ["flaky", "permanent", "exhaust", "noretry", "busy", "defer", "slow", "bound", "commit", "deferred", "survive", "keeppace", "old"];

describe("retry policy", () => {
  let emu, pg, sb, listener;
  const got = (sub) => listener.got.filter((x) => x.subscription === sub);
  const send = async (q, msgs) => {
    const s = sb.createSender(q);
    await s.sendMessages(msgs);
    await s.close();
  };
  const subscribe = (name, options, extra = "") =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', 'handle(sbpg.message)', 'app', 'emu',
             batch_size => 10, options => '${JSON.stringify(options)}'${extra});`);
  const stats = async (name) => (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
  // The server log's JSON lines for a subscription's failed attempts, in order (they survive restarts,
  // unlike a LISTEN connection).
  const retryLines = (sub) => pg.serverLog().split("\n")
    .filter((l) => l.includes(`"event":"message","subscription":"${sub}"`) && l.includes('"status":"retry"'))
    .map((l) => JSON.parse(l.slice(l.indexOf("{"))));
  // The handler's clock_timestamp() named in a failed attempt's error.
  const handlerClock = (reason) => /simulated deadlock for \S+ at (.+?) \(SQLSTATE/.exec(reason)[1];
  const calls = async () => Number((await pg.query("SELECT last_value FROM calls")).rows[0].last_value);

  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: [
          ...names.filter((n) => !["slow", "bound", "survive"].includes(n)).map((n) => queue(n, { MaxDeliveryCount: 50 })),
          queue("survive", { LockDuration: "PT2S", MaxDeliveryCount: 50 }),
          queue("slow", { LockDuration: "PT5S", MaxDeliveryCount: 50 }),
          queue("bound", { LockDuration: "PT2S", MaxDeliveryCount: 50 }),
        ],
      }),
    });
    pg = await startCluster();
    // The handler: fails transiently while a message's row in `failing` says so (a deadlock
    // error, SQLSTATE 40P01, naming the handler's clock_timestamp()), or a fixed number of times
    // counted by a sequence (sequences are not rolled back); fails permanently on a negative
    // amount; sleeps when told to. Every run is counted in the sequence `calls` too. orders has no
    // key, so a message applied twice would be two rows; `at` is the handler's clock.
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE orders (id bigint NOT NULL, amount numeric NOT NULL CHECK (amount >= 0), message_id text, at timestamptz);
      CREATE TABLE failing (message_id text PRIMARY KEY, times int);
      CREATE SEQUENCE tries;
      CREATE SEQUENCE calls;
      GRANT SELECT, INSERT ON orders TO app;
      GRANT SELECT ON failing TO app;
      GRANT USAGE ON SEQUENCE tries, calls TO app;
      CREATE FUNCTION handle(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      DECLARE f failing;
      BEGIN
        PERFORM nextval('public.calls');
        SELECT * INTO f FROM public.failing WHERE message_id = m.message_id;
        IF FOUND AND (f.times IS NULL OR nextval('public.tries') <= f.times) THEN
          RAISE EXCEPTION 'simulated deadlock for % at %', m.message_id, clock_timestamp() USING ERRCODE = '40P01';
        END IF;
        IF m.body ? 'sleep' THEN
          PERFORM pg_sleep((m.body->>'sleep')::float8);
        END IF;
        INSERT INTO public.orders VALUES ((m.body->>'id')::bigint, (m.body->>'amount')::numeric, m.message_id, clock_timestamp());
      END $f$;
      GRANT EXECUTE ON FUNCTION handle(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
    `);
    listener = await pg.listen();
    const orig = listener.got.push.bind(listener.got);
    listener.got.push = (...xs) => orig(...xs.map((x) => ({ ...x, received_at: Date.now() })));
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("retries a transient error with growing delay ceilings, holding the lock, then applies it once", async () => {
    await pg.query("INSERT INTO failing VALUES ('flaky-1', 4)");
    await subscribe("flaky", { max_retries: 5, retry_base_ms: 400, retry_cap_ms: 1600, retry_hold_ms: 30000 });
    await send("flaky", [{ messageId: "flaky-1", body: { id: 1, amount: 1 } }]);
    await waitFor(() => got("flaky").some((x) => x.status === "applied"), { timeout: 30000, what: "flaky-1 applied" });
    const events = got("flaky");
    const retries = events.filter((x) => x.status === "retry");
    assert.deepEqual(retries.map((x) => x.attempts), [1, 2, 3, 4], "four failed attempts, numbered");
    for (const r of retries) {
      assert.equal(r.reason, "TransientError", "NOTIFY carries the reason code; the description is in sbpg.retries and the log");
      assert.equal(r.deferred, false, "short delays are waited out holding the lock");
    }
    // The policy, measured on the server's clock: attempt n failed at the handler's
    // clock_timestamp() h(n) (named in its error, in the log line) and planned the next at
    // next(n), drawn from [0, min(cap, base * 2^(n-1))] = 400, 800, 1600, 1600 ms after the
    // failure. Upper bound: next(n) - h(n) is at most the ceiling (plus the time it takes to
    // record the failure). Lower bound: attempt n+1 runs no earlier than next(n). And the delay is
    // drawn, not skipped: a retry with no delay draws 0 every time, which four uniform draws do
    // all below 5% of their ceilings with a chance of 6 in a million.
    const lines = retryLines("flaky");
    assert.deepEqual(lines.map((l) => l.attempts), [1, 2, 3, 4]);
    assert.deepEqual(lines.map((l) => l.next_attempt_at), retries.map((r) => r.next_attempt_at), "the log and NOTIFY agree");
    const finalAt = (await pg.query("SELECT at::text FROM orders WHERE message_id = 'flaky-1'")).rows[0].at;
    const h = [...lines.map((l) => handlerClock(l.reason)), finalAt];
    const timing = (await pg.query(`
      SELECT n::int, extract(epoch FROM nxt - h) * 1000 AS planned_ms, extract(epoch FROM h_next - nxt) * 1000 AS late_ms
      FROM unnest($1::timestamptz[], $2::timestamptz[], $3::timestamptz[]) WITH ORDINALITY AS t(h, nxt, h_next, n)`,
      [h.slice(0, 4), lines.map((l) => l.next_attempt_at), h.slice(1)])).rows;
    const ceilings = [400, 800, 1600, 1600];
    for (const t of timing) {
      const c = ceilings[t.n - 1];
      assert.ok(t.planned_ms >= 0 && t.planned_ms <= c + 250, `delay ${t.n} planned ${t.planned_ms} ms after the failure, ceiling ${c}`);
      assert.ok(t.late_ms >= 0, `attempt ${t.n + 1} ran ${-t.late_ms} ms before its time`);
    }
    assert.ok(timing.some((t) => t.planned_ms >= 0.05 * ceilings[t.n - 1]),
      `the delays were drawn, not skipped: ${timing.map((t) => Math.round(t.planned_ms)).join(", ")} ms`);
    const applied = events.filter((x) => x.status === "applied");
    assert.equal(applied.length, 1);
    assert.equal(applied[0].attempts, 5);
    const inbox = (await pg.query("SELECT status, attempts FROM sbpg.inbox WHERE subscription = 'flaky'")).rows;
    assert.deepEqual(inbox, [{ status: "applied", attempts: 5 }]);
    assert.equal(Number((await pg.query("SELECT count(*) FROM sbpg.retries WHERE subscription = 'flaky'")).rows[0].count), 0,
      "the retry row goes with the outcome");
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id = 'flaky-1'")).rows[0].count), 1);
    await waitFor(async () => (await emu.entity("flaky")).completed === 1, { what: "completed on the broker" });
    const e = await emu.entity("flaky");
    assert.equal(e.delivered, 1, "held, not given back: the broker delivered it once");
    assert.equal(e.abandoned, 0);
    const st = await stats("flaky");
    assert.equal(Number(st.retries), 4);
    assert.equal(Number(st.retried_messages), 1);
    assert.equal(Number(st.max_retries_exceeded), 0);
    assert.match(pg.serverLog(), /"event":"message","subscription":"flaky".*"status":"retry".*"attempts":1,"next_attempt_at"/);
  });

  it("dead-letters a permanent error on the first attempt, without retrying", async () => {
    await subscribe("permanent", { max_retries: 5, retry_base_ms: 100 });
    await send("permanent", [{ messageId: "neg-1", body: { id: 2, amount: -5 } }]);
    await waitFor(() => got("permanent").some((x) => x.status === "dead_lettered"), { what: "neg-1 dead-lettered" });
    assert.equal(got("permanent").filter((x) => x.status === "retry").length, 0);
    const dl = got("permanent").find((x) => x.status === "dead_lettered");
    assert.equal(dl.attempts, 1);
    assert.equal(dl.reason, "HandlerError");
    assert.match((await pg.inboxReasons("permanent"))["neg-1"], /^HandlerError: .*orders_amount_check.*SQLSTATE 23514/);
    await waitFor(async () => (await emu.entity("permanent")).dead_letter_moves === 1, { what: "moved to the DLQ" });
    const [m] = await emu.messages("permanent/$deadletterqueue");
    assert.equal(m.dead_letter_reason, "HandlerError");
    assert.equal(Number((await stats("permanent")).retries), 0);
  });

  it("dead-letters with MaxRetriesExceeded and the last error after max_retries", async () => {
    await pg.query("INSERT INTO failing VALUES ('stuck-1', NULL)");
    await subscribe("exhaust", { max_retries: 2, retry_base_ms: 50, retry_cap_ms: 200 });
    await send("exhaust", [{ messageId: "stuck-1", body: { id: 3, amount: 1 } }]);
    await waitFor(() => got("exhaust").some((x) => x.status === "dead_lettered"), { timeout: 20000, what: "stuck-1 given up" });
    assert.deepEqual(got("exhaust").filter((x) => x.status === "retry").map((x) => x.attempts), [1, 2]);
    const dl = got("exhaust").find((x) => x.status === "dead_lettered");
    assert.equal(dl.attempts, 3);
    assert.equal(dl.reason, "MaxRetriesExceeded");
    assert.match((await pg.inboxReasons("exhaust"))["stuck-1"], /^MaxRetriesExceeded: 3 attempts failed; the last with TransientError: simulated deadlock for stuck-1/);
    await waitFor(async () => (await emu.entity("exhaust")).dead_letter_moves === 1, { what: "moved to the DLQ" });
    const [m] = await emu.messages("exhaust/$deadletterqueue");
    assert.equal(m.dead_letter_reason, "MaxRetriesExceeded");
    assert.match(m.dead_letter_description, /3 attempts failed; the last with TransientError/);
    const inbox = (await pg.query("SELECT status, attempts, reason FROM sbpg.inbox WHERE subscription = 'exhaust'")).rows;
    assert.equal(inbox.length, 1);
    assert.equal(inbox[0].attempts, 3);
    assert.equal(Number((await stats("exhaust")).max_retries_exceeded), 1);
    assert.equal(Number((await pg.query("SELECT count(*) FROM sbpg.retries WHERE subscription = 'exhaust'")).rows[0].count), 0);
  });

  it("dead-letters the first transient failure with MaxRetriesExceeded when max_retries is 0, without retrying", async () => {
    await pg.query("INSERT INTO failing VALUES ('once-1', NULL)");
    await subscribe("noretry", { max_retries: 0, retry_base_ms: 50 });
    await send("noretry", [{ messageId: "once-1", body: { id: 7, amount: 1 } }]);
    await waitFor(() => got("noretry").some((x) => x.status === "dead_lettered"), { what: "once-1 dead-lettered" });
    assert.deepEqual(got("noretry").map((x) => x.status), ["dead_lettered"], "no retry notification");
    const dl = got("noretry")[0];
    assert.equal(dl.attempts, 1);
    assert.equal(dl.reason, "MaxRetriesExceeded");
    assert.match((await pg.inboxReasons("noretry"))["once-1"],
      /^MaxRetriesExceeded: 1 attempt failed; the last with TransientError: simulated deadlock for once-1 at .* \(SQLSTATE 40P01\)$/);
    assert.deepEqual(retryLines("noretry"), [], "no failed attempt logged as a retry");
    await waitFor(async () => (await emu.entity("noretry")).dead_letter_moves === 1, { what: "moved to the DLQ" });
    const [m] = await emu.messages("noretry/$deadletterqueue");
    assert.equal(m.dead_letter_reason, "MaxRetriesExceeded");
    assert.match(m.dead_letter_description, /^1 attempt failed; the last with TransientError: simulated deadlock for once-1/);
    const e = await emu.entity("noretry");
    assert.equal(e.delivered, 1, "delivered once, never given back");
    assert.equal(e.abandoned, 0);
    const st = await stats("noretry");
    assert.equal(Number(st.retries), 0);
    assert.equal(Number(st.max_retries_exceeded), 1);
    assert.equal(Number((await pg.query("SELECT count(*) FROM sbpg.retries WHERE subscription = 'noretry'")).rows[0].count), 0);
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id = 'once-1'")).rows[0].count), 0);
  });

  it("keeps applying other messages while one waits for its retries", async () => {
    await pg.query("INSERT INTO failing VALUES ('busy-stuck', NULL)");
    await subscribe("busy", { max_retries: 1000, retry_base_ms: 100, retry_cap_ms: 300 });
    await send("busy", [{ messageId: "busy-stuck", body: { id: 100, amount: 1 } }]);
    await waitFor(() => got("busy").some((x) => x.status === "retry"), { what: "the first retry" });
    await send("busy", Array.from({ length: 50 }, (_, i) => ({ messageId: `busy-${i}`, body: { id: 101 + i, amount: 1 } })));
    await waitFor(() => got("busy").filter((x) => x.status === "applied").length === 50, { what: "the 50 others applied" });
    assert.ok(!got("busy").some((x) => x.message_id === "busy-stuck" && x.status !== "retry"), "the failing one still waits");
    const st = await stats("busy");
    assert.equal(st.waiting_retry, 1, "one message held for its retry");
    await pg.query("DELETE FROM failing WHERE message_id = 'busy-stuck'");
    await waitFor(() => got("busy").some((x) => x.message_id === "busy-stuck" && x.status === "applied"), { what: "busy-stuck applied" });
    const attempts = got("busy").find((x) => x.message_id === "busy-stuck" && x.status === "applied").attempts;
    assert.equal(attempts, got("busy").filter((x) => x.status === "retry").length + 1);
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id LIKE 'busy-%'")).rows[0].count), 51);
  });

  it("defers a message whose delay exceeds retry_hold_ms and fetches it back by sequence number", async () => {
    await pg.query("INSERT INTO failing VALUES ('later-1', 2)");
    await pg.query("ALTER SEQUENCE tries RESTART");
    await subscribe("defer", { max_retries: 5, retry_base_ms: 1500, retry_cap_ms: 1500, retry_hold_ms: 0 });
    await send("defer", [{ messageId: "later-1", body: { id: 4, amount: 1 } }]);
    await waitFor(() => got("defer").some((x) => x.status === "applied"), { timeout: 30000, what: "later-1 applied" });
    const retries = got("defer").filter((x) => x.status === "retry");
    assert.equal(retries.length, 2);
    const deferred = retries.filter((x) => x.deferred).length;
    const e = await emu.entity("defer");
    assert.equal(e.deferrals, deferred, "each deferred retry was a deferral on the broker");
    assert.ok(deferred >= 1, "a delay above 0 ms is deferred (a zero draw is held instead)");
    await waitFor(async () => (await emu.entity("defer")).completed === 1, { what: "completed over $management" });
    assert.equal((await emu.entity("defer")).messages, 0);
    assert.equal(Number((await stats("defer")).deferred), deferred);
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id = 'later-1'")).rows[0].count), 1);
    assert.equal((await pg.query("SELECT attempts FROM sbpg.inbox WHERE subscription = 'defer'")).rows[0].attempts, 3);
    // A fetched message stays deferred on the broker until its settlement is confirmed: its retry
    // row goes only then.
    await waitFor(async () => Number((await pg.query("SELECT count(*) FROM sbpg.retries WHERE subscription = 'defer'")).rows[0].count) === 0,
      { what: "the retry row removed once the broker confirmed the settlement" });
  });

  it("renews the lock of a message whose handler runs longer than the lock duration, and applies it once", async () => {
    await subscribe("slow", { max_lock_renewal_s: 300 });
    await send("slow", [{ messageId: "slow-1", body: { id: 5, amount: 1, sleep: 12 } }]);
    await waitFor(() => got("slow").some((x) => x.status === "applied"), { timeout: 40000, what: "slow-1 applied" });
    await waitFor(async () => (await emu.entity("slow")).completed === 1, { what: "completed" });
    const e = await emu.entity("slow");
    assert.ok(e.lock_renewals >= 2, `a 12-s handler under a 5-s lock needs at least 2 renewals (${e.lock_renewals})`);
    assert.equal(e.lock_lost, 0);
    assert.equal(e.delivered, 1, "never redelivered");
    assert.equal(got("slow").filter((x) => x.status === "duplicate").length, 0);
    assert.equal(Number((await stats("slow")).lock_renewals), e.lock_renewals);
  });

  it("stops renewing after max_lock_renewal_s; the redelivery is recognised, never applied twice", async () => {
    // No handler may run past the renewal limit (handler_timeout_ms defaults to it when smaller:
    // here 1 s), so the locks lapse while a batch of five 0.9-second handlers runs (4.5 s against
    // a 2-second lock renewed for at most 1 s).
    await subscribe("bound", { max_lock_renewal_s: 1, retry_hold_ms: 0 });
    const ids = [1, 2, 3, 4, 5].map((k) => `bound-${k}`);
    await send("bound", ids.map((messageId, k) => ({ messageId, body: { id: 60 + k, amount: 1, sleep: 0.9 } })));
    await waitFor(() => got("bound").some((x) => x.status === "duplicate"), { timeout: 40000, what: "a redelivery settled as a duplicate" });
    await waitFor(async () => (await emu.entity("bound")).completed === 5, { timeout: 30000, what: "all completed" });
    const e = await emu.entity("bound");
    assert.ok(e.delivered >= 6, "a lock lapsed and the broker delivered a message again");
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id LIKE 'bound-%'")).rows[0].count), 5);
    assert.equal(got("bound").filter((x) => x.status === "applied").length, 5, "each applied once");
    assert.ok(Number((await stats("bound")).settle_failures) >= 1, "a settlement found the lock gone");
  });

  it("records a failure at COMMIT against its own message, the others applied", async () => {
    // PostgreSQL refuses to queue deferred triggers in the security-restricted context handlers
    // run in, so a deferred constraint cannot fail at COMMIT; the test fault makes the COMMIT of
    // any transaction that applied "orphan" fail the way one would (SQLSTATE 23503).
    await pg.query("ALTER SYSTEM SET sbpg.test_fault = 'fail_commit#orphan'");
    await pg.query("SELECT pg_reload_conf()");
    await waitFor(async () => (await pg.query("SELECT current_setting('sbpg.test_fault') v")).rows[0].v === "fail_commit#orphan",
      { what: "fault armed" });
    await subscribe("commit", {}, ", enabled => false");
    await send("commit", [
      ...Array.from({ length: 4 }, (_, i) => ({ messageId: `c-${i}`, body: { id: 300 + i, amount: 1 } })),
      { messageId: "orphan", body: { id: 399, amount: 1 } },
      ...Array.from({ length: 4 }, (_, i) => ({ messageId: `c-${4 + i}`, body: { id: 310 + i, amount: 1 } })),
    ]);
    await pg.psql("SELECT sbpg.enable_subscription('commit')");
    await waitFor(() => got("commit").filter((x) => ["applied", "dead_lettered"].includes(x.status)).length === 9, { what: "9 outcomes" });
    const dead = got("commit").filter((x) => x.status === "dead_lettered");
    assert.deepEqual(dead.map((x) => x.message_id), ["orphan"]);
    assert.equal(dead[0].reason, "HandlerError");
    assert.match((await pg.inboxReasons("commit")).orphan, /^HandlerError: sbpg test fault: the transaction that applied message orphan fails at COMMIT \(SQLSTATE 23503\)/);
    const ids = (await pg.query("SELECT id FROM orders WHERE id >= 300 ORDER BY id")).rows.map((r) => Number(r.id));
    assert.deepEqual(ids, [300, 301, 302, 303, 310, 311, 312, 313]);
    // The worker takes what has arrived, so the nine may come as more than one batch; the one
    // holding "orphan" fails at COMMIT and is applied message by message.
    assert.match(pg.serverLog(), /subscription "commit": a batch of \d+ was applied message by message after: sbpg test fault/);
    await waitFor(async () => (await emu.entity("commit")).dead_letter_moves === 1, { what: "orphan on the DLQ" });
    await pg.query("ALTER SYSTEM RESET sbpg.test_fault");
    await pg.query("SELECT pg_reload_conf()");
  });

  it("refuses deferred constraints in handlers with a readable reason", async () => {
    await pg.psql(`
      CREATE TABLE parents (id int PRIMARY KEY);
      CREATE TABLE children (id bigint PRIMARY KEY, parent int REFERENCES parents DEFERRABLE INITIALLY DEFERRED);
      GRANT SELECT, INSERT ON parents, children TO app;
      CREATE FUNCTION handle_child(m sbpg.message) RETURNS void LANGUAGE sql AS $$
        INSERT INTO public.children VALUES ((m.body->>'id')::bigint, (m.body->>'parent')::int) $$;
      GRANT EXECUTE ON FUNCTION handle_child(sbpg.message) TO app;
      SELECT sbpg.create_subscription('deferred', '${emu.amqp}', 'deferred', 'handle_child(sbpg.message)', 'app', 'emu');
    `);
    await send("deferred", [{ messageId: "child-1", body: { id: 1, parent: 1 } }]);
    await waitFor(() => got("deferred").some((x) => x.status === "dead_lettered"), { what: "child-1 dead-lettered" });
    assert.equal(got("deferred")[0].reason, "PermissionDenied");
    assert.match((await pg.inboxReasons("deferred"))["child-1"], /^PermissionDenied: cannot fire deferred trigger within security-restricted operation/);
  });

  it("prunes confirmed inbox rows past sbpg.inbox_retention in small batches, and keeps unconfirmed ones", async () => {
    // 2,500 confirmed rows and 40 unconfirmed ones, all a day old, plus 10 recent confirmed rows and
    // two retry rows of messages not seen for a day.
    await pg.psql(`
      INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid, recorded_at, settled_at)
      SELECT 'old', g, 'm-' || g, 'applied', '1', now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, 2500) g;
      INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid, recorded_at)
      SELECT 'old', g, 'm-' || g, 'applied', '1', now() - interval '1 day' FROM generate_series(2501, 2540) g;
      INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid, recorded_at, settled_at)
      SELECT 'old', g, 'm-' || g, 'applied', '1', now(), now() FROM generate_series(2541, 2550) g;
      INSERT INTO sbpg.retries (subscription, sequence_number, attempts, first_failed_at, last_failed_at, next_attempt_at, last_error)
      VALUES ('old', 9001, 2, now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 'TransientError: x'),
             ('old', 9002, 1, now(), now(), now() + interval '1 minute', 'TransientError: y');
    `);
    await pg.query("ALTER SYSTEM SET sbpg.inbox_retention = '1h'");
    await pg.query("SELECT pg_reload_conf()");
    await pg.psql(`SELECT sbpg.create_subscription('old', '${emu.amqp}', 'old', 'handle(sbpg.message)', 'app', 'emu');`);
    await waitFor(async () => Number((await pg.query("SELECT count(*) FROM sbpg.inbox WHERE subscription = 'old'")).rows[0].count) === 50,
      { timeout: 30000, what: "the old confirmed rows pruned" });
    const left = (await pg.query(`SELECT count(*) FILTER (WHERE settled_at IS NULL)::int unconfirmed,
                                         count(*) FILTER (WHERE settled_at IS NOT NULL)::int recent
                                  FROM sbpg.inbox WHERE subscription = 'old'`)).rows[0];
    assert.deepEqual(left, { unconfirmed: 40, recent: 10 }, "unconfirmed rows recognise a redelivery at any age; recent ones stay");
    const retries = (await pg.query("SELECT sequence_number FROM sbpg.retries WHERE subscription = 'old'")).rows.map((r) => Number(r.sequence_number));
    assert.deepEqual(retries, [9002], "a retry row of a message not seen for the period goes; a live one stays");
    await pg.query("ALTER SYSTEM RESET sbpg.inbox_retention");
    await pg.query("SELECT pg_reload_conf()");
    await pg.psql("SELECT sbpg.drop_subscription('old');");
  });

  it("keeps pace: expired rows far beyond one pruning round go within seconds, while messages are applied", async () => {
    // 60,000 expired confirmed rows: three times what one round removes (20 chunks of 1000). Before,
    // the rest waited for the next round a minute later, and at a sustained rate never went.
    await pg.psql(`
      INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, xid, recorded_at, settled_at)
      SELECT 'keeppace', 1000000 + g, 'x-' || g, 'applied', '1', now() - interval '1 day', now() - interval '1 day'
      FROM generate_series(1, 60000) g;
    `);
    const msgs = [];
    for (let i = 0; i < 2000; i++) msgs.push({ messageId: `kp-${i}`, body: { id: 500000 + i, amount: 1 } });
    for (let i = 0; i < msgs.length; i += 500) await send("keeppace", msgs.slice(i, i + 500));
    await pg.query("ALTER SYSTEM SET sbpg.inbox_retention = '1h'");
    await pg.query("SELECT pg_reload_conf()");
    await subscribe("keeppace", {});
    await waitFor(async () => Number((await pg.query(
      "SELECT count(*) FROM sbpg.inbox WHERE subscription = 'keeppace' AND recorded_at < now() - interval '1 hour'")).rows[0].count) === 0,
    { timeout: 30000, interval: 200, what: "the 60,000 expired rows removed, well before a second round (a minute)" });
    await waitFor(async () => got("keeppace").length === 2000, { what: "the 2,000 messages applied" });
    assert.equal(Number((await pg.query("SELECT count(*) FROM sbpg.inbox WHERE subscription = 'keeppace'")).rows[0].count), 2000,
      "every new row stays");
    await pg.query("ALTER SYSTEM RESET sbpg.inbox_retention");
    await pg.query("SELECT pg_reload_conf()");
    await pg.psql("SELECT sbpg.drop_subscription('keeppace');");
  });

  it("keeps counting attempts across a worker killed with SIGKILL and a server restart", async () => {
    // The message fails until the test lets it through; each failed attempt is recorded in
    // sbpg.retries (and logged) before the next. The worker is killed while the message waits
    // for a retry (its lock lapses, the broker delivers it again), and later the server is
    // restarted: the attempt numbers go on from the database, never from 1 again.
    await pg.query("INSERT INTO failing VALUES ('survive-1', NULL)");
    await subscribe("survive", { max_retries: 1000, retry_base_ms: 300, retry_cap_ms: 600, retry_hold_ms: 30000 });
    await send("survive", [{ messageId: "survive-1", body: { id: 900, amount: 1 } }]);
    const recorded = async () =>
      Number((await pg.query("SELECT coalesce(max(attempts), 0) a FROM sbpg.retries WHERE subscription = 'survive'")).rows[0].a);
    await waitFor(async () => (await recorded()) >= 2, { what: "two failed attempts recorded" });
    const pid = (await pg.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sbpg worker' AND application_name = 'survive'")).rows[0].pid;
    const beforeKill = await recorded();
    pg.kill(pid, "SIGKILL"); // the server restarts every backend
    await waitFor(async () => (await recorded()) >= beforeKill + 2, { timeout: 60000, interval: 200, what: "attempts after the kill" });
    const afterKill = await recorded();
    pg.restart("fast");
    await waitFor(async () => (await recorded()) >= afterKill + 2, { timeout: 60000, interval: 200, what: "attempts after the restart" });
    await pg.query("DELETE FROM failing WHERE message_id = 'survive-1'");
    const st = await waitFor(async () => (await pg.query(
      "SELECT status, attempts FROM sbpg.inbox WHERE subscription = 'survive'")).rows[0], { timeout: 30000, what: "survive-1 applied" });
    // Every failure, in the order logged: 1, 2, 3, ... never back to a smaller number. (An attempt
    // the kill cut short between its log line and its COMMIT is run again under its number.)
    const seen = retryLines("survive").map((l) => l.attempts);
    const last = seen.at(-1);
    assert.ok(seen.every((a, i) => i === 0 || a >= seen[i - 1]), `attempt numbers counted on across the kill and the restart: ${seen.join(", ")}`);
    assert.deepEqual([...new Set(seen)], Array.from({ length: last }, (_, i) => i + 1), `each number once in order: ${seen.join(", ")}`);
    assert.ok(last >= afterKill + 2 && afterKill >= beforeKill + 2 && beforeKill >= 2);
    assert.equal(st.status, "applied");
    assert.equal(st.attempts, last + 1, "the outcome counts every attempt");
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE message_id = 'survive-1'")).rows[0].count), 1);
    assert.equal(Number((await pg.query("SELECT count(*) FROM sbpg.retries WHERE subscription = 'survive'")).rows[0].count), 0);
    const e = await emu.entity("survive");
    assert.ok(e.delivered >= 2, `the broker delivered it again after the kill (${e.delivered})`);
    // The LISTEN connection died with the server: later tests (none today) would need a new one.
    listener = await pg.listen();
  });
});
