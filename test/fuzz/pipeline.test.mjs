// Pipeline fuzz run: SBPG_FUZZ_MESSAGES (default 10,000) generated malformed or awkward messages
// sent with the official SDK to sbemu over AMQP, consumed by a real sbpg worker in a throwaway
// PostgreSQL cluster whose handler reads body and raw_body. At the end every message must be
// accounted for exactly once (a handler row, or a dead-letter in sbemu's DLQ with the reason its
// class calls for and a description), nothing may be left on the queue, and no process may have
// died. SBPG_FUZZ_SEED makes the run repeatable (default: a fixed seed).
//
// The schema run: SBPG_FUZZ_SCHEMA_MESSAGES (default 2,000) fuzzed payloads, subjects and version
// properties against a registered JSON Schema, on a subscription that validates. An oracle written
// here, independently of sbpg, decides each message's one outcome (applied; InvalidJson;
// UnknownMessageType; SchemaViolation with the keyword and JSON pointer of a rule the payload
// breaks), and the run asserts exactly that outcome for every message. The handler cannot fail, so a
// validator that lets everything through shows as applied messages the oracle refused.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "../e2e/lib/cluster.mjs";

// The SDK is installed for the end-to-end tests.
const { ServiceBusClient } = createRequire(new URL("../e2e/lib/cluster.mjs", import.meta.url))("@azure/service-bus");

const N = Number(process.env.SBPG_FUZZ_MESSAGES || 10000);
const SEED = Number(process.env.SBPG_FUZZ_SEED || 20240605);
const MAX_MESSAGE = 4 * 1024 * 1024;

// A small deterministic PRNG (mulberry32).
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const rnd = prng(SEED);
const int = (n) => Math.floor(rnd() * n);
const pick = (a) => a[int(a.length)];
const md5 = (b) => createHash("md5").update(b).digest("hex");
const JSON_CT = "application/json";

// What jsonb would make of a body, independently of sbpg: strict UTF-8, JSON.parse, no \u0000,
// no unpaired surrogates (depth and numeric range are not reached by the generated mutations).
function jsonbAccepts(buf) {
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(buf);
  } catch {
    return false;
  }
  if (text.length === 0 || text.includes("\0")) return false;
  if (text.charCodeAt(0) === 0xfeff) return false; // JSON has no BOM; jsonb refuses it
  let v;
  try {
    v = JSON.parse(text);
  } catch {
    return false;
  }
  const stack = [v];
  while (stack.length) {
    const x = stack.pop();
    if (typeof x === "string" && (x.includes("\0") || !x.isWellFormed())) return false;
    if (x && typeof x === "object") for (const [k, y] of Object.entries(x)) {
      if (k.includes("\0") || !k.isWellFormed()) return false;
      stack.push(y);
    }
  }
  return true;
}

// Outcome codes: "applied" (a handler row; raw: body NULL, md5 of raw_body checked), or a
// DeadLetterReason. A class may allow several (mutations: valid JSON of either shape).
const order = (k, extra = {}) => ({ id: k, amount: 1 + (k % 7), ...extra });
const CLASSES = {
  ok: { w: 6, make: (k) => data(JSON.stringify(order(k)), JSON_CT), expect: ["applied"] },
  "invalid-utf8": {
    w: 6,
    make: (k) => data(Buffer.concat([Buffer.from(`{"id":${k},"amount":1,"c":"`), Buffer.from(pick([[0xff], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82]])), Buffer.from('"}')]), JSON_CT),
    expect: ["InvalidJson"],
  },
  "invalid-utf8-no-ct": {
    w: 3,
    make: (k) => data(Buffer.concat([Buffer.from(`{"id":${k},"c":"`), Buffer.from([0xfe, 0x80 + int(60)]), Buffer.from('"}')])),
    expect: ["raw"],
  },
  "invalid-json": {
    w: 8,
    make: (k) => data(pick([`{"id": ${k},`, `{id:${k}}`, "[1,2,,]", "nul", `{"id":${k}} trailing`, "'single'", `{"id":0${k}}`, "[1e]", '"unterminated', "{\"a\":1,}", "\t", "[\"\\x\"]"]), JSON_CT),
    expect: ["InvalidJson"],
  },
  "text-no-ct": { w: 4, make: (k) => data(`hello ${k} <not json>`), expect: ["raw"] },
  "text-plain-ct": { w: 2, make: (k) => data(`{"id":${k},"amount":1}`, "text/plain"), expect: ["raw"] },
  "wrong-shape": {
    w: 8,
    make: (k) => data(JSON.stringify(pick([{ id: "abc", amount: 1 }, { id: k, amount: "lots" }, [k, 1], k, "a string", { amount: 1 }, { id: k + 0.5, amount: 1 }, null, true])), JSON_CT),
    expect: ["HandlerError"],
  },
  "value-map": { w: 3, make: (k) => ann({ body: order(k), bodyType: "value" }), expect: ["applied"] },
  "value-string": { w: 2, make: (k) => ann({ body: JSON.stringify(order(k)), bodyType: "value" }), expect: ["applied"] },
  "value-number": { w: 2, make: (k) => ann({ body: k * 1.5, bodyType: "value" }), expect: ["HandlerError"] },
  "value-list": { w: 2, make: (k) => ann({ body: [k, "x", null, { a: 1 }], bodyType: "value" }), expect: ["HandlerError"] },
  "value-binary": { w: 2, make: () => ann({ body: Buffer.from([0xff, 0x00, 0x01, int(256)]), bodyType: "value" }), expect: ["raw"] },
  sequence: { w: 3, make: (k) => ann({ body: [[k, 1], ["a", { b: 2 }]], bodyType: "sequence" }), expect: ["HandlerError"] },
  "binary-json-ct": { w: 5, make: () => data(Buffer.from([0xff, ...Array.from({ length: 1 + int(40) }, () => int(256))]), JSON_CT), expect: ["InvalidJson"] },
  "empty-json-ct": { w: 1, make: () => data(Buffer.alloc(0), JSON_CT), expect: ["InvalidJson"] },
  "no-message-id": { w: 3, make: (k) => ann({ body: Buffer.from(JSON.stringify(order(k))), bodyType: "data", properties: { contentType: JSON_CT } }, true), expect: ["applied"] },
  "nul-escape": { w: 3, make: (k) => data(`{"id":${k},"amount":1,"s":"a\\u0000b"}`, JSON_CT), expect: ["InvalidJson"] },
  "nul-escape-no-ct": { w: 2, make: (k) => data(`{"id":${k},"s":"\\u0000"}`), expect: ["raw"] },
  "nul-byte-no-ct": { w: 2, make: (k) => data(Buffer.from(`{"id":${k}}\0tail`)), expect: ["raw"] },
  // jsonb refuses an unpaired low surrogate escape; sbpg checks it before jsonb_in (fixed with
  // this suite: an older build lets jsonb_in refuse it, a HandlerError).
  "lone-surrogate": { w: 2, make: (k) => data(`{"id":${k},"amount":1,"s":"\\udc00"}`, JSON_CT), expect: ["InvalidJson"], older: ["HandlerError"] },
  // Numbers beyond a double are valid JSON and numeric stores them (fixed with this suite: an
  // older build refuses them as InvalidJson).
  "huge-number": { w: 2, make: (k) => data(`{"id":${k},"amount":1e400}`, JSON_CT), expect: ["applied"], older: ["InvalidJson"] },
  "numeric-overflow": { w: 1, make: (k) => data(`{"id":${k},"amount":1e131072}`, JSON_CT), expect: ["InvalidJson"] },
  "many-properties": {
    w: 1,
    make: (k) => ann({ body: Buffer.from(JSON.stringify(order(k))), bodyType: "data", properties: { contentType: JSON_CT },
      applicationProperties: Object.fromEntries(Array.from({ length: 3000 }, (_, i) => [`p${i}`, i % 2 ? `v${i}` : i])) }),
    expect: ["applied"],
    props: 3000,
  },
  "big-annotations": {
    w: 1,
    make: (k) => ann({ body: Buffer.from(JSON.stringify(order(k))), bodyType: "data", properties: { contentType: JSON_CT },
      messageAnnotations: { "x-fz-big": "a".repeat(100000), ...Object.fromEntries(Array.from({ length: 500 }, (_, i) => [`x-fz-${i}`, i])) } }),
    expect: ["applied"],
  },
  mutation: {
    w: 20,
    make: (k) => {
      const b = Buffer.from(JSON.stringify(order(k, { c: "caf\u00e9 \u20ac", t: [1, true, null] })));
      for (let m = 1 + int(4); m > 0; m--) b[int(b.length)] = pick([int(256), 0x22, 0x5c, 0x7b, 0x7d, 0x2c, 0x30 + int(10), 0x80 + int(64), 0xc0, 0xed]);
      return data(b, JSON_CT);
    },
    expect: null, // decided per message by jsonbAccepts
  },
};
// Few but heavy: fixed counts.
const HEAVY = {
  "deep-100k": { n: 3, make: () => data("[".repeat(100000) + "]".repeat(100000), JSON_CT), expect: ["InvalidJson"] },
  "deep-100k-no-ct": { n: 3, make: () => data("{\"a\":".repeat(100000) + "1" + "}".repeat(100000)), expect: ["raw"] },
  "huge-string": { n: 4, make: (k) => data(JSON.stringify(order(k, { pad: "x".repeat(1500000) + "\u00e9" })), JSON_CT), expect: ["applied"] },
  "huge-string-wrong-shape": { n: 2, make: () => data(JSON.stringify(["y".repeat(1000000)]), JSON_CT), expect: ["HandlerError"] },
};

function data(body, contentType) {
  return { body: Buffer.isBuffer(body) ? body : Buffer.from(body), bodyType: "data", contentType };
}
function ann(m, noId = false) {
  return { ...m, noId };
}

// Builds message k of class cls as an AmqpAnnotatedMessage.
function build(k, cls, spec) {
  const g = spec.make(k);
  const props = { ...(g.properties || {}) };
  if (!g.noId) props.messageId = `fz-${k}`;
  if (g.contentType) props.contentType = g.contentType;
  const msg = {
    body: g.body,
    bodyType: g.bodyType,
    properties: props,
    applicationProperties: { ...(g.applicationProperties || {}), fz: k, cls },
  };
  if (g.messageAnnotations) msg.messageAnnotations = g.messageAnnotations;
  let expect = spec.expect;
  if (!expect) expect = jsonbAccepts(g.body) ? ["applied", "HandlerError"] : ["InvalidJson"];
  const raw = g.bodyType === "data" ? g.body : null;
  return { k, cls, msg, expect, older: spec.older, raw, props: spec.props };
}

// The schema run. The registered schema (draft-04, as RapidJSON validates it):
const NS = Number(process.env.SBPG_FUZZ_SCHEMA_MESSAGES || 2000);
const ORDER_SCHEMA = {
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
const SCHEMA_VALUES = [0, 7, -1, 2.5, 1e308, -1e-308, 1234567, 1e6, 1000000.5, "", "EUR", "USD", "eur", "ORD-12", "ord-1", "AB-1",
  "x".repeat(300), null, true, false, [], {}, [1, [2]], { sku: 1 }];
const SCHEMA_KEYS = ["id", "amount", "currency", "code", "items", "extra", ""];

// A JSON number's kind as RapidJSON parses it: "integer" only for a literal without fraction or
// exponent that fits 64 bits; JSON.stringify writes every JavaScript number the way it is sent.
const isIntegerLiteral = (v) => typeof v === "number" && /^-?\d+$/.test(JSON.stringify(v)) && Math.abs(v) < 2 ** 63;

// The rules of ORDER_SCHEMA a JSON value breaks, each as "keyword pointer"; none when it conforms.
// additionalProperties is reported at the object or at the extra member, so both are listed.
function orderViolations(v) {
  if (v === null || typeof v !== "object" || Array.isArray(v)) return ["type /"];
  const out = [];
  for (const k of Object.keys(v))
    if (!(k in ORDER_SCHEMA.properties)) out.push("additionalProperties /", `additionalProperties /${k}`);
  if (!("id" in v) || !("amount" in v)) out.push("required /");
  if ("id" in v && !isIntegerLiteral(v.id)) out.push("type /id");
  if ("amount" in v) {
    if (typeof v.amount !== "number") out.push("type /amount");
    else if (v.amount < 0) out.push("minimum /amount");
    else if (v.amount > 1000000) out.push("maximum /amount");
  }
  if ("currency" in v && !ORDER_SCHEMA.properties.currency.enum.includes(v.currency)) out.push("enum /currency");
  if ("code" in v) {
    if (typeof v.code !== "string") out.push("type /code");
    else if (!/^[A-Z]{3}-[0-9]+$/.test(v.code)) out.push("pattern /code");
  }
  return out;
}

// Message k of the schema run, and the one outcome the documented rules give it (docs/schemas.md):
// a body that is not JSON under a JSON content type is InvalidJson before anything else; then the
// type (the subject) and version (the schema_version property, else v= of the content type, else
// the latest) must be registered, else UnknownMessageType; then the body is validated.
function schemaMessage(k) {
  let value;
  switch (int(6)) {
    case 0: value = pick(SCHEMA_VALUES); break; // any JSON value
    case 1: { value = { id: k, amount: 1 }; for (let d = int(40); d > 0; d--) value = { id: k, amount: 1, items: [value] }; break; }
    case 2: value = { id: k, amount: int(1000), ...(int(2) ? { currency: pick(["EUR", "USD"]) } : {}), ...(int(2) ? { code: `ORD-${k}` } : {}) }; break;
    default: value = Object.fromEntries(Array.from({ length: int(6) }, () => [pick(SCHEMA_KEYS), pick(SCHEMA_VALUES)]));
  }
  let text = JSON.stringify(value);
  const truncated = int(8) === 0;
  if (truncated) text = text.slice(0, int(text.length)); // a proper prefix: never JSON (objects and arrays are open)
  const subject = pick(["orders.created", "orders.created", "orders.created", "orders.created", "orders.created", "orders.unknown", null]);
  const version = pick([undefined, undefined, undefined, 1, 1, 0, 2]);
  const contentType = int(6) === 0 ? "application/json; v=2" : JSON_CT;
  let parsed, json = true;
  try { parsed = JSON.parse(text); } catch { json = false; }
  let expect, violations = [];
  const effective = version > 0 ? version : contentType.endsWith("v=2") ? 2 : 1;
  if (!json) expect = "InvalidJson";
  else if (subject !== "orders.created") expect = "UnknownMessageType";
  else if (effective !== 1) expect = "UnknownMessageType";
  else {
    violations = orderViolations(parsed);
    expect = violations.length ? "SchemaViolation" : "applied";
  }
  const props = { fz: k, ...(version === undefined ? {} : { schema_version: version }) };
  const msg = { messageId: `fzs-${k}`, contentType, body: Buffer.from(text), applicationProperties: props };
  if (subject) msg.subject = subject;
  return { k, msg, text, parsed, subject, effective, expect, violations };
}

describe(`pipeline fuzz: ${N} malformed messages through sbemu and sbpg`, () => {
  let emu, pg, sb;
  before(async () => {
    emu = await startSbemu({
      config: configWith({ queues: ["fz", "fzs"].map((n) => queue(n, { MaxDeliveryCount: 100, LockDuration: "PT5M" })) }),
      args: ["--max-message-size", String(MAX_MESSAGE), "--log-level", "info"],
    });
    pg = await startCluster({ conf: { "sbpg.log_messages": "'none'" } });
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE fz_app NOLOGIN;
      CREATE TABLE fz_applied (k int PRIMARY KEY, cls text, message_id text, body_type text, raw_md5 text, raw_len int, nprops int);
      GRANT INSERT ON fz_applied TO fz_app;
      CREATE FUNCTION fz_handle(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      DECLARE
        k int := (m.properties->>'fz')::int;
        n int := (SELECT count(*) FROM jsonb_object_keys(m.properties));
      BEGIN
        IF m.body IS NULL THEN  -- not JSON: the handler reads raw_body
          INSERT INTO public.fz_applied VALUES (k, m.properties->>'cls', m.message_id, NULL, md5(m.raw_body), length(m.raw_body), n);
          RETURN;
        END IF;
        IF jsonb_typeof(m.body) <> 'object' OR m.body->'id' IS NULL THEN
          RAISE EXCEPTION 'fz: the body is a JSON %, not an order', jsonb_typeof(m.body) USING ERRCODE = '22023';
        END IF;
        INSERT INTO public.fz_applied VALUES ((m.body->>'id')::bigint, m.properties->>'cls', m.message_id,
          jsonb_typeof(m.body), md5(m.raw_body), length(m.raw_body), n);
        PERFORM (m.body->>'amount')::numeric;
        IF (m.body->>'id')::bigint <> k THEN RAISE EXCEPTION 'fz: id % in message %', m.body->>'id', k USING ERRCODE = '22023'; END IF;
      END $f$;
      GRANT EXECUTE ON FUNCTION fz_handle(sbpg.message) TO fz_app;
      -- The schema run: no key, so a message applied twice shows as two rows.
      CREATE TABLE fzs_applied (k int, message_type text, schema_version text, body jsonb);
      GRANT INSERT ON fzs_applied TO fz_app;
      CREATE FUNCTION fzs_handle(m sbpg.message) RETURNS void LANGUAGE sql AS $f$
        INSERT INTO public.fzs_applied VALUES ((m.properties->>'fz')::int, m.message_type, m.schema_version, m.body) $f$;
      GRANT EXECUTE ON FUNCTION fzs_handle(sbpg.message) TO fz_app;
      SELECT sbpg.register_schema('orders.created', 1, '${JSON.stringify(ORDER_SCHEMA)}');
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
    `);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 2, timeoutInMs: 60000 } });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("accounts for every message exactly once, with the right reason, and nothing dies", async () => {
    const t0 = Date.now();
    // Plan: heavy classes at fixed counts, the rest drawn by weight.
    const plan = [];
    for (const [cls, h] of Object.entries(HEAVY)) for (let i = 0; i < h.n; i++) plan.push([cls, h]);
    const names = Object.keys(CLASSES);
    const total = names.reduce((s, c) => s + CLASSES[c].w, 0);
    while (plan.length < N) {
      let r = rnd() * total;
      const cls = names.find((c) => (r -= CLASSES[c].w) < 0) || names[0];
      plan.push([cls, CLASSES[cls]]);
    }
    for (let i = plan.length - 1; i > 0; i--) { const j = int(i + 1); [plan[i], plan[j]] = [plan[j], plan[i]]; }
    const msgs = plan.map(([cls, spec], k) => build(k, cls, spec));

    // The worker starts first, so messages are consumed while they are sent.
    await pg.psql(`SELECT sbpg.create_subscription('fz', '${emu.amqp}', 'fz', 'fz_handle(sbpg.message)', 'fz_app', 'emu', batch_size => 100);`);
    await waitFor(async () => (await pg.query("SELECT state FROM sbpg.stats WHERE subscription = 'fz'")).rows[0]?.state === "connected", { what: "worker connected" });
    const pid0 = (await pg.query("SELECT pid FROM sbpg.stats WHERE subscription = 'fz'")).rows[0].pid;

    const sender = sb.createSender("fz");
    let batch = await sender.createMessageBatch();
    for (const m of msgs) {
      if (!batch.tryAddMessage(m.msg)) {
        if (batch.count > 0) await sender.sendMessages(batch);
        batch = await sender.createMessageBatch();
        if (!batch.tryAddMessage(m.msg)) throw new Error(`message ${m.k} (${m.cls}) does not fit a batch`);
      }
    }
    if (batch.count > 0) await sender.sendMessages(batch);
    await sender.close();
    const tSent = Date.now();

    await waitFor(async () => {
      const e = await emu.entity("fz");
      return e.sent === N && e.messages === 0 && e.completed + e.dead_lettered === N;
    }, { timeout: 600000, interval: 250, what: "every message settled" });
    const tDone = Date.now();

    // Accounting.
    const rows = (await pg.query("SELECT k, cls, message_id, body_type, raw_md5, raw_len, nprops FROM fz_applied")).rows;
    const dlqPath = encodeURIComponent("fz/$DeadLetterQueue");
    const dead = await emu.ctl("GET", `/entities/${dlqPath}/messages`, { limit: 10 * N });
    const outcome = new Map(); // k -> [outcome, detail]
    const problems = [];
    for (const r of rows) {
      if (outcome.has(r.k)) problems.push(`message ${r.k} applied twice`);
      outcome.set(r.k, { what: r.body_type === null ? "raw" : "applied", row: r });
    }
    for (const d of dead) {
      const k = d.application_properties?.fz;
      if (typeof k !== "number") { problems.push(`a dead-letter without its fz property: ${JSON.stringify(d).slice(0, 300)}`); continue; }
      if (outcome.has(k)) problems.push(`message ${k} accounted twice (${outcome.get(k).what} and dead-lettered)`);
      if (!d.dead_letter_description) problems.push(`message ${k} dead-lettered without a description`);
      outcome.set(k, { what: d.dead_letter_reason, desc: d.dead_letter_description });
    }
    const perClass = {};
    let olderBuild = 0;
    for (const m of msgs) {
      const o = outcome.get(m.k);
      const c = (perClass[m.cls] ||= { sent: 0 });
      c.sent++;
      if (!o) { problems.push(`message ${m.k} (${m.cls}) lost`); continue; }
      c[o.what] = (c[o.what] || 0) + 1;
      const ok = m.expect.includes(o.what);
      // The build under test has the fixes: an older build's outcome is a regression.
      const older = !ok && m.older?.includes(o.what);
      if (older) olderBuild++;
      if (!ok) problems.push(`message ${m.k} (${m.cls}): ${o.what} ${o.desc || ""}, expected ${m.expect.join(" or ")}`);
      if ((o.what === "raw" || o.what === "applied") && m.raw && o.row.raw_md5 !== md5(m.raw))
        problems.push(`message ${m.k} (${m.cls}): raw_body differs from what was sent`);
      if (o.row && m.cls === "no-message-id" && !o.row.message_id) problems.push(`message ${m.k}: no message_id given to the handler`);
      if (o.row && m.props && o.row.nprops !== m.props + 2) problems.push(`message ${m.k}: ${o.row.nprops} properties`);
    }
    const e = await emu.entity("fz");
    const stats = (await pg.query("SELECT state, pid, received, applied, dead_lettered, duplicates, abandoned, reconnects FROM sbpg.stats WHERE subscription = 'fz'")).rows[0];
    const inbox = (await pg.query("SELECT status, split_part(reason, ':', 1) AS reason, count(*)::int AS n FROM sbpg.inbox WHERE subscription = 'fz' GROUP BY 1, 2 ORDER BY 1, 2")).rows;
    const applied = rows.length;

    const fig = {
      messages: N, seed: SEED, send_s: (tSent - t0) / 1000, total_s: (tDone - t0) / 1000,
      applied, dead_lettered: dead.length, older_build_outcomes: olderBuild,
      sbemu: { sent: e.sent, completed: e.completed, dead_lettered: e.dead_lettered, abandoned: e.abandoned, active: e.active, locked: e.locked },
      stats, inbox, per_class: perClass,
    };
    const { per_class: _, ...head } = fig;
    console.log(`pipeline fuzz: ${JSON.stringify(head)}`);
    for (const [cls, c] of Object.entries(perClass).sort()) console.log(`pipeline fuzz: class ${cls} ${JSON.stringify(c)}`);

    assert.deepEqual(problems.slice(0, 30), [], `${problems.length} problems`);
    assert.equal(applied + dead.length, N, "applied + dead-lettered == sent");
    assert.equal(e.sent, N);
    assert.equal(e.messages, 0, "nothing left on the queue");
    assert.equal(e.locked ?? 0, 0);
    assert.equal(e.dead_lettered, dead.length);
    assert.equal(stats.state, "connected");
    assert.equal(stats.pid, pid0, "the same worker process ran the whole time");
    assert.equal(Number(stats.applied), applied, "sbpg.stats applied");
    assert.equal(Number(stats.dead_lettered), dead.length, "sbpg.stats dead_lettered");
    assert.equal(Number(stats.duplicates), 0);
    assert.deepEqual(pg.unexpectedSignals(), []);
    assert.doesNotMatch(pg.serverLog(), /terminated by signal|PANIC|server process .* was terminated/);
  });

  it(`gives each of ${NS} fuzzed payloads against a registered schema exactly the outcome an independent oracle expects`, async () => {
    await pg.psql(`SELECT sbpg.create_subscription('fzs', '${emu.amqp}', 'fzs', 'fzs_handle(sbpg.message)', 'fz_app', 'emu',
      batch_size => 100, options => '{"schemas": "validate"}')`);
    await waitFor(() => /subscription "fzs": validating against 1 registered schema versions/.test(pg.serverLog()), { what: "the registry loaded" });
    const pid0 = (await pg.query("SELECT pid FROM sbpg.stats WHERE subscription = 'fzs'")).rows[0].pid;
    const msgs = Array.from({ length: NS }, (_, k) => schemaMessage(k));
    const sender = sb.createSender("fzs");
    for (let i = 0; i < NS; i += 200) await sender.sendMessages(msgs.slice(i, i + 200).map((m) => m.msg));
    await sender.close();
    await waitFor(async () => {
      const e = await emu.entity("fzs");
      return e.sent === NS && e.messages === 0 && e.completed + e.dead_lettered === NS;
    }, { timeout: 300000, interval: 250, what: "every schema message settled" });

    const outcome = new Map();
    const problems = [];
    for (const r of (await pg.query("SELECT k, message_type, schema_version, body FROM fzs_applied")).rows) {
      if (outcome.has(r.k)) problems.push(`message ${r.k} applied twice`);
      outcome.set(r.k, { what: "applied", row: r });
    }
    const dead = await emu.ctl("GET", `/entities/${encodeURIComponent("fzs/$DeadLetterQueue")}/messages`, { limit: 10 * NS });
    for (const d of dead) {
      const k = d.application_properties?.fz;
      if (outcome.has(k)) problems.push(`message ${k} accounted twice`);
      outcome.set(k, { what: d.dead_letter_reason, desc: d.dead_letter_description || "" });
    }
    const counts = {};
    for (const m of msgs) {
      const o = outcome.get(m.k);
      const tag = `message ${m.k} (subject ${m.subject}, version ${m.effective}, body ${m.text.slice(0, 80)})`;
      if (!o) { problems.push(`${tag} lost`); continue; }
      counts[o.what] = (counts[o.what] || 0) + 1;
      if (o.what !== m.expect) { problems.push(`${tag}: ${o.what} ${o.desc || ""}, expected ${m.expect} ${m.violations.join("; ")}`); continue; }
      if (o.what === "applied") {
        if (o.row.message_type !== "orders.created" || o.row.schema_version !== "1") problems.push(`${tag}: handed on as ${o.row.message_type} v${o.row.schema_version}`);
        try { assert.deepEqual(o.row.body, m.parsed); } catch { problems.push(`${tag}: the handler got ${JSON.stringify(o.row.body).slice(0, 80)}`); }
      } else if (o.what === "SchemaViolation") {
        const d = /^"(\w+)" failed at (\S*?):? .*\(message type "orders\.created" version 1, schema \S+\)$/.exec(o.desc);
        if (!d || !m.violations.includes(`${d[1]} ${d[2]}`)) problems.push(`${tag}: described as "${o.desc}", which is none of: ${m.violations.join("; ")}`);
      } else if (o.what === "UnknownMessageType") {
        const want = m.subject === null ? "the message names no type (no CloudEvents type, no subject)"
          : m.subject !== "orders.created" ? `no schema is registered for message type "${m.subject}"`
            : `version ${m.effective} of message type "orders.created" is not registered (the latest is 1)`;
        if (o.desc !== want) problems.push(`${tag}: described as "${o.desc}", expected "${want}"`);
      } else if (!o.desc) problems.push(`${tag}: ${o.what} without a description`);
    }
    const expected = {};
    for (const m of msgs) expected[m.expect] = (expected[m.expect] || 0) + 1;
    console.log(`pipeline fuzz: schema run ${JSON.stringify({ messages: NS, expected, outcomes: counts })}`);
    assert.deepEqual(problems.slice(0, 30), [], `${problems.length} problems`);
    for (const r of ["applied", "SchemaViolation", "UnknownMessageType", "InvalidJson"])
      assert.ok(expected[r] >= 10, `the run exercised ${r} (${expected[r] || 0} messages)`);
    const stats = (await pg.query("SELECT pid, applied, dead_lettered, duplicates FROM sbpg.stats WHERE subscription = 'fzs'")).rows[0];
    assert.equal(stats.pid, pid0, "the same worker throughout");
    assert.equal(Number(stats.applied), expected.applied);
    assert.equal(Number(stats.dead_lettered), NS - expected.applied);
    assert.equal(Number(stats.duplicates), 0);
    assert.deepEqual(pg.unexpectedSignals(), []);
  });
});
