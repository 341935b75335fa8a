// Versioned schemas end to end (docs/schemas.md): messages from the official SDK classified on the
// AMQP thread by type and version (Service Bus subject with a version property, CloudEvents in
// binary and structured mode), validated against the registered JSON Schema; a violation of each
// keyword class dead-lettered as SchemaViolation with the JSON pointer of the offending value;
// unknown types and versions dead-lettered or passed on per the subscription's policy; the
// handler sees the type and version.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const V1 = {
  type: "object",
  properties: {
    id: { type: "integer" },
    amount: { type: "number", minimum: 0, maximum: 1000000 },
    currency: { enum: ["EUR", "USD"] },
    code: { type: "string", pattern: "^[A-Z]{3}-[0-9]+$" },
  },
  required: ["id", "amount"],
  additionalProperties: false,
};

describe("versioned schemas", () => {
  let emu, pg, sb, listener;
  const got = (sub) => listener.got.filter((x) => x.subscription === sub);
  const send = async (q, msgs) => {
    const s = sb.createSender(q);
    await s.sendMessages(msgs);
    await s.close();
  };

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: ["checked", "lenient", "fuzzed"].map((n) => queue(n)) }) });
    pg = await startCluster();
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric, mtype text, mver text, sub text, received text, currency text);
      GRANT INSERT ON orders TO app;
      CREATE FUNCTION take(m sbpg.message) RETURNS void LANGUAGE sql AS $$
        INSERT INTO public.orders VALUES ((m.body->>'id')::bigint, (m.body->>'amount')::numeric, m.message_type, m.schema_version,
                                          m.subscription, m.received_schema_version, m.body->>'currency') $$;
      GRANT EXECUTE ON FUNCTION take(sbpg.message) TO app;
      -- The fuzz run's handler cannot fail (no key, no cast), so every failure is the validator's.
      CREATE TABLE fuzz_applied (message_id text, body jsonb);
      GRANT INSERT ON fuzz_applied TO app;
      CREATE FUNCTION take_any(m sbpg.message) RETURNS void LANGUAGE sql AS $$
        INSERT INTO public.fuzz_applied VALUES (m.message_id, m.body) $$;
      GRANT EXECUTE ON FUNCTION take_any(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.register_schema('orders.created', 1, '${JSON.stringify(V1)}');
    `);
    listener = await pg.listen();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
    await pg.psql(`
      SELECT sbpg.create_subscription('checked', '${emu.amqp}', 'checked', 'take(sbpg.message)', 'app', 'emu', options => '{"schemas": "validate"}');
      SELECT sbpg.create_subscription('lenient', '${emu.amqp}', 'lenient', 'take(sbpg.message)', 'app', 'emu', options => '{"schemas": "validate", "unknown_types": "pass"}');
      SELECT sbpg.create_subscription('fuzzed', '${emu.amqp}', 'fuzzed', 'take_any(sbpg.message)', 'app', 'emu', options => '{"schemas": "validate"}');`);
    await waitFor(() => /subscription "checked": validating against 1 registered schema versions/.test(pg.serverLog()), { what: "the registry loaded" });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("applies valid messages found by subject, CloudEvents binary and structured mode, with their type and version", async () => {
    await send("checked", [
      { messageId: "by-subject", subject: "orders.created", applicationProperties: { schema_version: 1 }, body: { id: 1, amount: 10, currency: "EUR" } },
      { messageId: "by-subject-latest", subject: "orders.created", body: { id: 2, amount: 20 } },
      { messageId: "ce-binary", body: { id: 3, amount: 30, code: "ORD-7" },
        applicationProperties: { "cloudEvents:specversion": "1.0", "cloudEvents:type": "orders.created", "cloudEvents:source": "/shop",
          "cloudEvents:id": "e-3", "cloudEvents:dataschema": "https://schemas.contoso.com/orders/created/v1" } },
      { messageId: "ce-structured", contentType: "application/cloudevents+json",
        body: Buffer.from(JSON.stringify({ specversion: "1.0", type: "orders.created", source: "/shop", id: "e-4", dataschema: "urn:orders.created:v1", data: { id: 4, amount: 40 } })) },
    ]);
    await waitFor(() => got("checked").filter((x) => x.status === "applied").length === 4, { what: "4 applied" });
    const rows = (await pg.query("SELECT id, mtype, mver FROM orders WHERE sub = 'checked' ORDER BY id")).rows;
    assert.deepEqual(rows.map((r) => [Number(r.id), r.mtype, r.mver]),
      [[1, "orders.created", "1"], [2, "orders.created", "1"], [3, "orders.created", "1"], [4, "orders.created", "1"]]);
  });

  it("dead-letters a violation of each keyword class as SchemaViolation, naming the keyword and the pointer", async () => {
    const cases = {
      "bad-type": [{ id: "x", amount: 1 }, /^"type" failed at \/id: the value is "x"/],
      "bad-required": [{ id: 11 }, /^"required" failed at \/: missing "amount"/],
      "bad-enum": [{ id: 12, amount: 1, currency: "XYZ" }, /^"enum" failed at \/currency: the value is "XYZ"/],
      "bad-pattern": [{ id: 13, amount: 1, code: "abc!" }, /^"pattern" failed at \/code: the value is "abc!"/],
      "bad-range": [{ id: 14, amount: -1 }, /^"minimum" failed at \/amount: the value is -1/],
      "bad-extra": [{ id: 15, amount: 1, colour: "red" }, /^"additionalProperties" failed at \/(colour)?/],
    };
    await send("checked", Object.entries(cases).map(([messageId, [body]]) =>
      ({ messageId, subject: "orders.created", applicationProperties: { schema_version: 1 }, body })));
    await waitFor(() => got("checked").filter((x) => x.status === "dead_lettered").length >= 6, { what: "6 dead-lettered" });
    const byId = Object.fromEntries(got("checked").map((x) => [x.message_id, x]));
    const why = await pg.inboxReasons("checked");
    for (const [id, [, pattern]] of Object.entries(cases)) {
      assert.equal(byId[id].status, "dead_lettered", id);
      assert.equal(byId[id].reason, "SchemaViolation", id);
      const [reason, ...rest] = why[id].split(": ");
      assert.equal(reason, "SchemaViolation", id);
      assert.match(rest.join(": "), pattern, id);
      assert.match(rest.join(": "), /\(message type "orders.created" version 1, schema \//, id);
    }
    await waitFor(async () => (await emu.entity("checked")).dead_letter_moves >= 6, { what: "on the DLQ" });
    const dlq = await emu.messages("checked/$deadletterqueue");
    assert.ok(dlq.filter((m) => m.dead_letter_reason === "SchemaViolation").length >= 6);
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE id BETWEEN 11 AND 15")).rows[0].count), 0, "no handler call");
  });

  it("follows the unknown-type policy: dead-letter by default, pass on when asked", async () => {
    const msgs = (p) => [
      { messageId: `${p}-unknown-type`, subject: "invoices.sent", body: { id: p === "c" ? 21 : 31, amount: 1 } },
      { messageId: `${p}-unknown-version`, subject: "orders.created", applicationProperties: { schema_version: 9 }, body: { id: p === "c" ? 22 : 32, amount: 1 } },
    ];
    await send("checked", msgs("c"));
    await send("lenient", msgs("l"));
    await waitFor(() => got("checked").some((x) => x.message_id === "c-unknown-version") && got("lenient").length >= 2, { what: "outcomes" });
    const c = await pg.inboxReasons("checked");
    assert.match(c["c-unknown-type"], /^UnknownMessageType: no schema is registered for message type "invoices.sent"/);
    assert.match(c["c-unknown-version"], /^UnknownMessageType: version 9 of message type "orders.created" is not registered \(the latest is 1\)/);
    const l = got("lenient").map((x) => x.status);
    assert.deepEqual(l, ["applied", "applied"]);
    const rows = (await pg.query("SELECT id, mtype, mver FROM orders WHERE sub = 'lenient' ORDER BY id")).rows;
    assert.deepEqual(rows.map((r) => [Number(r.id), r.mtype, r.mver]), [[31, "invoices.sent", null], [32, "orders.created", "9"]]);
  });

  it("validates against a version registered while the worker runs", async () => {
    await pg.psql(`SELECT sbpg.register_schema('orders.created', 2, '${JSON.stringify({ ...V1, properties: { ...V1.properties, note: { type: "string", maxLength: 5 } } })}');`);
    await waitFor(() => /subscription "checked": validating against 2 registered schema versions/.test(pg.serverLog()), { timeout: 20000, what: "the new version loaded" });
    await send("checked", [
      { messageId: "v2-ok", subject: "orders.created", applicationProperties: { schema_version: 2 }, body: { id: 41, amount: 1, note: "hi" } },
      { messageId: "v2-long", subject: "orders.created", contentType: "application/json; v=2", body: { id: 42, amount: 1, note: "far too long" } },
    ]);
    await waitFor(() => got("checked").some((x) => x.message_id === "v2-long"), { what: "v2 outcomes" });
    const byId = Object.fromEntries(got("checked").map((x) => [x.message_id, x]));
    assert.equal(byId["v2-ok"].status, "applied");
    assert.equal(byId["v2-long"].reason, "SchemaViolation");
    assert.match((await pg.inboxReasons("checked"))["v2-long"], /^SchemaViolation: "maxLength" failed at \/note: the value is "far too long" \(message type "orders.created" version 2/);
    assert.equal((await pg.query("SELECT mver FROM orders WHERE id = 41")).rows[0].mver, "2");
  });

  it("upcasts in the order a team writes versions: v1 used, then v2 with its upcast, then v3; every old message reaches the handler in the latest shape", async () => {
    // Version 3 requires a currency; version 1 had none, version 2 called it "cur". Each upcast is
    // given with the version it leads into, when that version is registered.
    const v1 = { type: "object", properties: { id: { type: "integer" }, amount: { type: "number" } }, required: ["id", "amount"] };
    const v2 = { ...v1, properties: { ...v1.properties, cur: { type: "string" } } };
    const v3 = { ...v1, properties: { ...v1.properties, currency: { type: "string" } } };
    const row = async (id) => {
      const r = (await pg.query("SELECT received, mver, currency FROM orders WHERE id = $1", [id])).rows[0];
      return r && [r.received, r.mver, r.currency];
    };
    const bySubject = (messageId, version, body) =>
      ({ messageId, subject: "payments.made", applicationProperties: { schema_version: version }, body });
    const ceBinary = (messageId, version, body) =>
      ({ messageId, body, applicationProperties: { "cloudEvents:specversion": "1.0", "cloudEvents:type": "payments.made",
        "cloudEvents:source": "/pay", "cloudEvents:id": messageId, "cloudEvents:dataschema": `urn:payments.made:v${version}` } });
    const ceStructured = (messageId, version, data) =>
      ({ messageId, contentType: "application/cloudevents+json", body: Buffer.from(JSON.stringify({ specversion: "1.0",
        type: "payments.made", source: "/pay", id: messageId, dataschema: `urn:payments.made:v${version}`, data })) });
    const applied = (ids) => waitFor(() => ids.every((id) => got("checked").some((x) => x.message_id === id && x.status === "applied")),
      { what: ids.join(", ") });

    // Version 1 alone, in use.
    await pg.psql(`
      CREATE FUNCTION pay_v1_v2(p jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$ SELECT p || '{"cur": "EUR"}' $$;
      CREATE FUNCTION pay_v2_v3(p jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$ SELECT (p - 'cur') || jsonb_build_object('currency', p->'cur') $$;
      GRANT EXECUTE ON FUNCTION pay_v1_v2(jsonb), pay_v2_v3(jsonb) TO app;
      SELECT sbpg.register_schema('payments.made', 1, '${JSON.stringify(v1)}', 'none');`);
    await waitFor(() => /subscription "checked": validating against 3 registered schema versions/.test(pg.serverLog()), { timeout: 20000, what: "v1 loaded" });
    await send("checked", [bySubject("pay-1a", 1, { id: 51, amount: 1 })]);
    await applied(["pay-1a"]);
    assert.deepEqual(await row(51), ["1", "1", null], "version 1 as it is");

    // Weeks later: version 2, with the upcast from version 1.
    await pg.psql(`SELECT sbpg.register_schema('payments.made', 2, '${JSON.stringify(v2)}', upcast => 'pay_v1_v2(jsonb)');`);
    await waitFor(() => /subscription "checked": validating against 4 registered schema versions/.test(pg.serverLog()), { timeout: 20000, what: "v2 loaded" });
    await send("checked", [bySubject("pay-1b", 1, { id: 52, amount: 2 }), bySubject("pay-2a", 2, { id: 53, amount: 3, cur: "USD" })]);
    await applied(["pay-1b", "pay-2a"]);
    assert.deepEqual(await row(52), ["1", "2", null], "version 1 reaches the handler as version 2");

    // Then version 3, with the upcast from version 2: every older message arrives as version 3.
    await pg.psql(`SELECT sbpg.register_schema('payments.made', 3, '${JSON.stringify(v3)}', upcast => 'pay_v2_v3(jsonb)');`);
    await waitFor(() => /subscription "checked": validating against 5 registered schema versions/.test(pg.serverLog()), { timeout: 20000, what: "v3 loaded" });
    await send("checked", [
      bySubject("pay-1c", 1, { id: 54, amount: 4 }),
      bySubject("pay-2b", 2, { id: 55, amount: 5, cur: "USD" }),
      bySubject("pay-3", 3, { id: 56, amount: 6, currency: "GBP" }),
      ceBinary("pay-ce-bin", 1, { id: 57, amount: 7 }),
      ceStructured("pay-ce-struct", 2, { id: 58, amount: 8, cur: "CHF" }),
    ]);
    await applied(["pay-1c", "pay-2b", "pay-3", "pay-ce-bin", "pay-ce-struct"]);
    assert.deepEqual(await row(54), ["1", "3", "EUR"]);
    assert.deepEqual(await row(55), ["2", "3", "USD"]);
    assert.deepEqual(await row(56), ["3", "3", "GBP"]);
    assert.deepEqual(await row(57), ["1", "3", "EUR"], "CloudEvents binary mode");
    assert.deepEqual(await row(58), ["2", "3", "CHF"], "CloudEvents structured mode");

    // A step without an upcast is a gap: the chain stops before it, and the handler is told the
    // version it got.
    await pg.psql(`SELECT sbpg.set_upcast('payments.made', 3, NULL);`);
    const gap = (await pg.query("SELECT version, chain_gap FROM sbpg.schema_catalog WHERE message_type = 'payments.made' ORDER BY version")).rows;
    assert.deepEqual(gap.map((r) => [r.version, r.chain_gap]), [[1, false], [2, false], [3, true]]);
    await send("checked", [bySubject("pay-1d", 1, { id: 59, amount: 9 })]);
    await applied(["pay-1d"]);
    assert.deepEqual(await row(59), ["1", "2", null], "upcast as far as the chain reaches");
    await pg.psql(`SELECT sbpg.set_upcast('payments.made', 3, 'pay_v2_v3(jsonb)');`);
  });

  it("applies declarative mappings without handler code: insert, upsert twice to one row, delete, conversion errors named", async () => {
    const cust = { type: "object", properties: { id: { type: "integer" } }, required: ["id"] };
    await pg.psql(`
      CREATE TABLE customers (id int PRIMARY KEY, name text, since date);
      CREATE TABLE audit (id int, note text);
      GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO app;
      GRANT INSERT ON audit TO app;
      SELECT sbpg.register_schema('customers.upserted', 1, '${JSON.stringify(cust)}');
      SELECT sbpg.register_schema('customers.deleted', 1, '${JSON.stringify(cust)}');
      SELECT sbpg.register_schema('audit.noted', 1, '{"type": "object"}');
      SELECT sbpg.create_mapping('checked', 'customers.upserted', 'customers', 'upsert', ARRAY['id'], '{"name": "full_name"}');
      SELECT sbpg.create_mapping('checked', 'customers.deleted', 'customers', 'delete', ARRAY['id']);
      SELECT sbpg.create_mapping('checked', 'audit.noted', 'audit');`);
    await waitFor(() => /subscription "checked": validating against 8 registered schema versions/.test(pg.serverLog()), { timeout: 20000, what: "the new types loaded" });
    const row = async () => (await pg.query("SELECT id, name, since::text FROM customers ORDER BY id")).rows;
    await send("checked", [{ messageId: "c-1", subject: "customers.upserted", body: { id: 7, full_name: "Ada", since: "2020-01-02" } }]);
    await waitFor(async () => (await row()).length === 1, { what: "the first upsert" });
    await send("checked", [{ messageId: "c-2", subject: "customers.upserted", body: { id: 7, full_name: "Ada Lovelace" } }]);
    await waitFor(async () => (await row())[0]?.name === "Ada Lovelace", { what: "the second upsert" });
    assert.deepEqual(await row(), [{ id: 7, name: "Ada Lovelace", since: "2020-01-02" }], "applied twice, one row; unsent columns kept");
    await send("checked", [{ messageId: "a-1", subject: "audit.noted", body: { id: 7, note: "renamed", ignored: true } }]);
    await send("checked", [{ messageId: "c-bad", subject: "customers.upserted", body: { id: 8, since: "not-a-date" } }]);
    await waitFor(() => got("checked").some((x) => x.message_id === "c-bad"), { what: "the bad date" });
    const bad = got("checked").find((x) => x.message_id === "c-bad");
    assert.equal(bad.status, "dead_lettered");
    assert.equal(bad.reason, "MappingError");
    assert.match((await pg.inboxReasons("checked"))["c-bad"], /^MappingError: column since \(date\) of public.customers cannot take "not-a-date": invalid input syntax for type date/);
    await send("checked", [{ messageId: "c-del", subject: "customers.deleted", body: { id: 7 } }]);
    await waitFor(async () => (await row()).length === 0, { what: "the delete" });
    assert.deepEqual((await pg.query("SELECT id, note FROM audit")).rows, [{ id: 7, note: "renamed" }]);
    assert.equal(Number((await pg.query("SELECT count(*) FROM orders WHERE id = 7")).rows[0].count), 0, "the handler was not called");
  });

  it("survives 2,000 fuzzed payloads against a registered schema: each applied or dead-lettered with a reason, the worker never restarts", async () => {
    let seed = 20261126;
    const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
    const values = [0, -1, 1e308, -1e-308, 123456789012345678901234567890, "", "x".repeat(300), "EUR", "ORD-1", null, true, [], {}, [1, [2, [3]]], { sku: 1 }];
    const pick = () => values[rnd(values.length)];
    const keys = ["id", "amount", "currency", "code", "items", "extra", ""];
    const payload = () => {
      switch (rnd(5)) {
        case 0: return pick();                                         // not an object at all
        case 1: return Buffer.from(JSON.stringify({ id: 1 }).slice(0, rnd(8)));  // truncated JSON
        case 2: { let v = {}; for (let d = rnd(60); d > 0; d--) v = { id: 1, amount: 1, items: [v] }; return v; }  // deep
        default: return Object.fromEntries(Array.from({ length: rnd(6) }, () => [keys[rnd(keys.length)], pick()]));
      }
    };
    await waitFor(async () => (await pg.query("SELECT pid FROM sbpg.stats WHERE subscription = 'fuzzed' AND state = 'connected'")).rows.length === 1, { what: "worker fuzzed connected" });
    const pid = (await pg.query("SELECT pid FROM sbpg.stats WHERE subscription = 'fuzzed'")).rows[0].pid;
    const n = 2000;
    const before = got("fuzzed").length;
    const s = sb.createSender("fuzzed");
    for (let i = 0; i < n; i += 250)
      await s.sendMessages(Array.from({ length: 250 }, (_, k) => {
        if (k % 50 === 0) // a valid one now and then: the run must apply these
          return { messageId: `fz-${i + k}`, subject: "orders.created", applicationProperties: { schema_version: 1 },
            contentType: "application/json", body: { id: i + k, amount: 10, currency: "EUR" } };
        const b = payload();
        return { messageId: `fz-${i + k}`, subject: rnd(10) ? "orders.created" : "deep", applicationProperties: { schema_version: rnd(3) },
          contentType: "application/json", body: b };
      }));
    await s.close();
    await waitFor(() => got("fuzzed").length - before >= n, { timeout: 120000, what: `${n} outcomes` });
    const mine = got("fuzzed").filter((x) => x.message_id?.startsWith("fz-"));
    assert.equal(mine.length, n);
    const reasons = {};
    for (const x of mine) {
      const r = x.status === "applied" ? "applied" : x.reason.split(":")[0];
      reasons[r] = (reasons[r] || 0) + 1;
    }
    // The handler cannot fail: every dead letter is the validator's or the decoder's, and every
    // applied message is in fuzz_applied exactly once (test/fuzz/pipeline.test.mjs checks each
    // outcome against an oracle).
    for (const r of Object.keys(reasons))
      assert.ok(["applied", "SchemaViolation", "UnknownMessageType", "InvalidJson"].includes(r), `reason ${r}`);
    console.log(`schema fuzz: ${JSON.stringify(reasons)}`);
    const rows = (await pg.query("SELECT message_id, count(*)::int AS n FROM fuzz_applied GROUP BY 1")).rows;
    const appliedIds = mine.filter((x) => x.status === "applied").map((x) => x.message_id).sort();
    assert.deepEqual(rows.map((r) => r.message_id).sort(), appliedIds, "applied exactly the messages reported applied");
    assert.ok(rows.every((r) => r.n === 1), "each once");
    const valid = Array.from({ length: n / 50 }, (_, j) => `fz-${j * 50}`);
    assert.ok(valid.every((id) => appliedIds.includes(id)), "every valid message applied");
    assert.ok(appliedIds.length < n, "not everything applied");
    assert.equal((await pg.query("SELECT pid FROM sbpg.stats WHERE subscription = 'fuzzed'")).rows[0].pid, pid, "the same worker throughout");
    await waitFor(async () => { const e = await emu.entity("fuzzed"); return e.active === 0 && e.locked === 0; }, { what: "nothing left on the queue" });
    assert.deepEqual(pg.unexpectedSignals(), []);
  });
});
