// Extension upgrade, end to end: for every earlier version V on the update chain (read from sql/,
// the current one from sbpg.control), an installation made with V's SQL API and used (identities,
// subscriptions, schemas with upcasts, mappings, inbox and retry rows as the old worker wrote
// them) is updated with ALTER EXTENSION sbpg UPDATE. Then:
//   (a) its catalog is the one a fresh CREATE EXTENSION sbpg makes, in another database of the same
//       cluster (pg_dump --binary-upgrade of the extension's members, plus the extension's row and
//       member list; a readable diff on failure);
//   (b) every row written before the update is still there, equal (except where an update script
//       changes data by design: DATA_CHANGES below, one entry per released update);
//   (c) the worker consumes again: messages sent after the update are applied by the handler, and
//       the one whose sequence number an old inbox row holds is recognised as already applied;
//   (d) while the catalog is at V, workers wait: a message sent then is applied only after the
//       update (by a transaction that started after the update's).
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor, sleep } from "./lib/cluster.mjs";
import { defaultVersion, chain, previousVersions } from "../pg/versions.mjs";
import {
  psqlIn, extensionCatalog, unifiedDiff, memberTables, snapshotRows, projectRows,
} from "./lib/extension-catalog.mjs";

const CURRENT = defaultVersion();
const CHAIN = chain().versions;
const PREVIOUS = previousVersions();
const FRESH_DB = "fresh_install";
const TENANT = "tenant"; // the test's own objects: left out of the catalog comparison

/**
 * Data an update script changes on purpose, by step "A--B": a function from the rows before the
 * step (table -> rows as to_jsonb objects) to the rows expected after it. A step not listed must
 * leave every row as it was (new columns aside).
 */
const DATA_CHANGES = {
  // 0.2 reads the upcast stored with version N as the step into N (0.1: out of N): each moves to
  // the next version of its type; the one stored with the newest version is dropped.
  "0.1--0.2": (rows) => {
    const schemas = rows["sbpg.schemas"];
    if (!schemas) return rows;
    const byType = new Map();
    for (const r of schemas) byType.set(r.message_type, [...(byType.get(r.message_type) || []), r]);
    const moved = [];
    for (const list of byType.values()) {
      list.sort((a, b) => a.version - b.version);
      list.forEach((r, i) => moved.push({ ...r, upcast: i === 0 ? null : list[i - 1].upcast }));
    }
    return { ...rows, "sbpg.schemas": moved };
  },
};

const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

function stepsFrom(v) {
  const i = CHAIN.indexOf(v);
  return CHAIN.slice(i).map((x, k, a) => (k + 1 < a.length ? `${x}--${a[k + 1]}` : null)).filter(Boolean);
}

describe("extension upgrade", () => {
  it(`has earlier versions to update from (chain ${CHAIN.join(" -> ")})`, (t) => {
    if (PREVIOUS.length === 0) t.skip(`only ${CURRENT} exists: nothing to update from`);
    assert.ok(CHAIN.at(-1) === CURRENT, `the chain reaches default_version ${CURRENT}`);
  });
});

for (const V of PREVIOUS) {
  describe(`ALTER EXTENSION sbpg UPDATE from ${V} to ${CURRENT}`, () => {
    let emu, pg, sb, listener, client;
    let rowsBefore = {}; // rows of every table before the update
    let tablesAtV = [];
    let updateXid; // the update's transaction id (xid8, as a BigInt)
    const q = (text, params) => client.query(text, params);

    before(async () => {
      emu = await startSbemu({ config: configWith({ queues: ["orders", "early", "idle", "mapped"].map((n) => queue(n)) }) });
      pg = await startCluster();
      client = await pg.client();
      sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
      listener = await pg.listen();

      // Database A (postgres, the one the launcher serves): V, used through V's API.
      await q(`CREATE EXTENSION sbpg VERSION '${V}'`);
      assert.equal((await q("SELECT extversion FROM pg_extension WHERE extname = 'sbpg'")).rows[0].extversion, V);
      await pg.psql(`
        CREATE ROLE app NOLOGIN;
        CREATE ROLE app_admin NOLOGIN IN ROLE sbpg_admin;
        CREATE SCHEMA ${TENANT};
        GRANT USAGE ON SCHEMA ${TENANT} TO app;
        CREATE TABLE ${TENANT}.orders (id bigint PRIMARY KEY, amount numeric NOT NULL, message_id text, seq bigint);
        CREATE TABLE ${TENANT}.orders_applies (message_id text, id bigint, xid xid8, at timestamptz);
        CREATE TABLE ${TENANT}.mapped (id bigint PRIMARY KEY, name text);
        GRANT SELECT, INSERT, UPDATE ON ${TENANT}.orders, ${TENANT}.orders_applies, ${TENANT}.mapped TO app;
        CREATE FUNCTION ${TENANT}.apply_order(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
          INSERT INTO ${TENANT}.orders_applies VALUES (m.message_id, (m.body->>'id')::bigint, pg_current_xact_id(), clock_timestamp());
          INSERT INTO ${TENANT}.orders VALUES ((m.body->>'id')::bigint, (m.body->>'amount')::numeric, m.message_id, m.sequence_number);
        END $f$;
        GRANT EXECUTE ON FUNCTION ${TENANT}.apply_order(sbpg.message) TO app;
        CREATE FUNCTION ${TENANT}.up_1_2(p jsonb) RETURNS jsonb LANGUAGE sql AS $f$ SELECT p || '{"v": 2}' $f$;
        CREATE FUNCTION ${TENANT}.up_2_3(p jsonb) RETURNS jsonb LANGUAGE sql AS $f$ SELECT p || '{"v": 3}' $f$;
        GRANT EXECUTE ON FUNCTION ${TENANT}.up_1_2(jsonb), ${TENANT}.up_2_3(jsonb) TO app;

        SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
        SELECT sbpg.create_identity('plain', 'anonymous');
        SELECT sbpg.grant_identity('emu', 'app_admin');
      `);
      const handler = `${TENANT}.apply_order(sbpg.message)`;
      const subscribe = (name, extra = "") =>
        q(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', '${handler}', 'app', 'emu'${extra})`);
      // Rows the old worker wrote for 'orders': the first message the broker will deliver after
      // the update (sequence number 1, o-1) is recorded as applied already; others as history.
      await q(`INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, correlation_id, status, reason, delivery_count, xid, settled_at)
               VALUES ('orders', 1, 'o-1', 'c-1', 'applied', NULL, 1, pg_current_xact_id(), now()),
                      ('orders', 900, 'o-old', NULL, 'dead_lettered', 'HandlerError: gone', 2, pg_current_xact_id(), now()),
                      ('orders', NULL, 'no-seq', NULL, 'applied', NULL, 1, pg_current_xact_id(), NULL)`);
      await q(`INSERT INTO sbpg.retries (subscription, sequence_number, message_id, attempts, next_attempt_at, last_error)
               VALUES ('idle', 7, 'i-7', 2, now() + interval '1 hour', 'SerializationFailure: 40001')`);
      await subscribe("orders", ", batch_size => 10, notify_channel => 'sbpg_confirm'");
      await subscribe("idle", ", enabled => false, options => '{\"max_retries\": 3}'");
      await subscribe("mapped", ", enabled => false");

      // Versioned schemas as V allows: an upcast with version 1 where V takes one there (0.1 read
      // it as the step out of 1), then versions 2 (with an upcast) and 3.
      const register = (type, version, upcast) =>
        q(`SELECT sbpg.register_schema($1, $2, '{"type": "object", "properties": {"id": {"type": "integer"}}}'${upcast ? `, upcast => '${upcast}'` : ""})`, [type, version]);
      try {
        await register("orders.created", 1, `${TENANT}.up_1_2(jsonb)`);
      } catch {
        await register("orders.created", 1);
      }
      await register("orders.created", 2, `${TENANT}.up_2_3(jsonb)`);
      await register("orders.created", 3);
      await register("customers.named", 1);
      await q(`SELECT sbpg.create_mapping('mapped', 'customers.named', '${TENANT}.mapped', 'upsert', ARRAY['id'], '{"name": "full_name"}')`);

      // What (b) compares: every row so far. (d)'s rows come after, so that a worker running
      // too early shows in (d) alone.
      tablesAtV = await memberTables(client);
      rowsBefore = await snapshotRows(client, [...tablesAtV, `${TENANT}.orders`, `${TENANT}.mapped`]);

      // (d): a subscription whose message arrives while the catalog is at V.
      await subscribe("early");
      const s = sb.createSender("early");
      await s.sendMessages({ messageId: "e-1", body: { id: 500, amount: 5 } });
      await s.close();

      // Workers must wait while the catalog is older than the module. The launcher says so (once
      // per version it sees) and starts none; then the time a running worker would need to apply
      // e-1 at V (well under a second), so that (d) can see it if one did.
      await waitFor(() => new RegExp(`the extension in this database is at version ${V.replace(/\./g, "\\.")}, the server's sbpg module at ${CURRENT.replace(/\./g, "\\.")}: no subscription runs until the extension is updated`).test(pg.serverLog()),
        { what: "the launcher's word that the versions differ" });
      await sleep(3000);
      assert.equal((await q("SELECT count(*)::int c FROM pg_stat_activity WHERE backend_type = 'sbpg worker'")).rows[0].c, 0,
        "no worker runs while the catalog is at the earlier version");

      await q("BEGIN");
      await q("ALTER EXTENSION sbpg UPDATE");
      updateXid = BigInt((await q("SELECT pg_current_xact_id()::text AS x")).rows[0].x);
      await q("COMMIT");

      // Database B: a fresh installation of the current version.
      psqlIn(pg, "postgres", `CREATE DATABASE ${FRESH_DB}`);
      psqlIn(pg, FRESH_DB, "CREATE EXTENSION sbpg");
    });

    after(async () => {
      await listener?.close();
      await client?.end();
      await sb?.close();
      await pg?.stop();
      await emu?.stop();
    });

    it(`is at ${CURRENT} after the update`, async () => {
      assert.equal((await q("SELECT extversion FROM pg_extension WHERE extname = 'sbpg'")).rows[0].extversion, CURRENT);
    });

    it("has the catalog a fresh CREATE EXTENSION makes", () => {
      const upgraded = extensionCatalog(pg, "postgres", { exclude: [TENANT] });
      const fresh = extensionCatalog(pg, FRESH_DB);
      assert.match(fresh, /CREATE TABLE sbpg\.inbox/, "the dump shows the extension's members");
      if (upgraded !== fresh) {
        assert.fail(`the catalog updated from ${V} differs from a fresh install of ${CURRENT}:\n` +
          unifiedDiff(upgraded, fresh, `updated from ${V}`, `fresh ${CURRENT}`));
      }
    });

    it("keeps every row written before the update", async () => {
      let expected = rowsBefore;
      for (const step of stepsFrom(V)) if (DATA_CHANGES[step]) expected = DATA_CHANGES[step](expected);
      const now = await snapshotRows(client, Object.keys(rowsBefore));
      for (const [table, rows] of Object.entries(expected)) {
        if (rows.length === 0) continue;
        // Columns an update adds are not compared; every column there was keeps its value. Rows
        // added since (the workers write inbox rows) are allowed; every old row must be found.
        const keys = Object.keys(rows[0]);
        const left = projectRows(now[table], keys);
        const missing = [];
        for (const r of projectRows(rows, keys)) {
          const i = left.indexOf(r);
          if (i < 0) missing.push(r);
          else left.splice(i, 1);
        }
        assert.deepEqual(missing, [], `${table}: rows written at ${V} missing or changed after the update; rows now:\n${left.join("\n")}`);
      }
      // Nothing was left out: every table of the extension at V was compared.
      for (const t of tablesAtV) assert.ok(t in now, `${t} compared`);
    });

    it("consumes again after the update, and recognises a message the old inbox holds as applied", async () => {
      const s = sb.createSender("orders");
      // Sequence number 1: the inbox row written at V.
      await s.sendMessages({ messageId: "o-1", body: { id: 1, amount: 1 } });
      await s.sendMessages([{ messageId: "o-2", body: { id: 2, amount: 2 } }, { messageId: "o-3", body: { id: 3, amount: 3 } }]);
      await s.close();
      const mine = () => listener.got.filter((x) => x.subscription === "orders");
      await waitFor(() => mine().length >= 3, { timeout: 60000, what: "3 notifications for orders" });
      const byId = Object.fromEntries(mine().map((x) => [x.message_id, x]));
      assert.deepEqual(Object.keys(byId).sort(), ["o-1", "o-2", "o-3"]);
      assert.equal(byId["o-1"].status, "duplicate", "o-1 was applied before the update");
      assert.equal(Number(byId["o-1"].sequence_number), 1);
      assert.equal(byId["o-2"].status, "applied");
      assert.equal(byId["o-3"].status, "applied");
      const applies = await q(`SELECT message_id FROM ${TENANT}.orders_applies WHERE message_id LIKE 'o-%' ORDER BY 1`);
      assert.deepEqual(applies.rows.map((r) => r.message_id), ["o-2", "o-3"], "the handler ran once for each new message, never for o-1");
      await waitFor(async () => (await emu.entity("orders")).completed === 3, { what: "the three completed on the broker" });
      assert.equal((await emu.entity("orders")).messages, 0);
    });

    it(`lets workers wait while the catalog is at ${V}: a message sent then is applied after the update`, async () => {
      await waitFor(async () => (await q(`SELECT count(*)::int c FROM ${TENANT}.orders_applies WHERE message_id = 'e-1'`)).rows[0].c > 0,
        { timeout: 60000, what: "e-1 applied" });
      const r = await q(`SELECT xid::text FROM ${TENANT}.orders_applies WHERE message_id = 'e-1'`);
      assert.equal(r.rows.length, 1, "e-1 applied once");
      const appliedBy = BigInt(r.rows[0].xid);
      assert.ok(appliedBy > updateXid,
        `e-1 was applied by transaction ${appliedBy}, before the update (${updateXid}) committed: a worker ran against the ${V} catalog`);
      const inbox = await q("SELECT status FROM sbpg.inbox WHERE subscription = 'early' AND message_id = 'e-1'");
      assert.deepEqual(inbox.rows, [{ status: "applied" }]);
    });
  });
}
