// Backup and restore: pg_dump of a running system, restored into a new cluster, carries sbpg's
// configuration and its inbox (pg_extension_config_dump). After the restore the subscription
// resumes, and a message that the old cluster committed but never settled comes back from the
// broker and is recognised by the restored inbox: settled as a duplicate, not applied twice.
// Identities (with their secret and grants), subscriptions, schemas, mappings and inbox rows come
// back as they were dumped; new messages are applied, through the handler and through the mapping.
//
// Keeping cluster A away from that redelivery: the worker exits after COMMIT (test fault
// exit_after_commit) while sbemu refuses new connections, so the restarted worker cannot reach
// the broker; the subscription is disabled in A before sbemu accepts connections again.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, chmodSync, statSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor } from "./lib/cluster.mjs";
import { setUpOrders, commitWithoutSettling } from "./lib/redelivery.mjs";

const PGBIN = process.env.PGBIN || "/usr/lib/postgresql/15/bin";
const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };

/** Runs a PostgreSQL client program as the postgres OS user when the tests run as root. */
function pgTool(tool, args) {
  const bin = join(PGBIN, tool);
  const asRoot = process.getuid && process.getuid() === 0;
  const [cmd, argv] = asRoot ? ["runuser", ["-u", "postgres", "--", bin, ...args]] : [bin, args];
  return spawnSync(cmd, argv, { encoding: "utf8" });
}

const at = (cluster) => ["-h", cluster.dir, "-p", String(cluster.port), "-U", "postgres"];

// The tables whose rows pg_dump must carry (pg_extension_config_dump), compared whole between the
// dumped cluster and the restored one. to_jsonb shows regprocedure, regclass and regrole columns by
// name (OIDs differ between clusters), with the same search_path on both sides.
const configTables = ["identities", "identity_secrets", "identity_usage", "subscriptions", "inbox", "retries",
  "message_types", "schemas", "mappings"];

async function snapshot(cluster) {
  const out = {};
  for (const t of configTables)
    out[t] = (await cluster.query(`SELECT to_jsonb(x) AS row FROM sbpg.${t} x ORDER BY to_jsonb(x)::text`)).rows.map((r) => r.row);
  return out;
}

describe("backup and restore", () => {
  let emu, a, b, sb, sender, listener;
  const sub = "backup";
  const entity = "backup";
  const work = mkdtempSync(join(tmpdir(), "sbpg-backup-"));
  chmodSync(work, 0o777); // pg_dump runs as postgres and writes here

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: [queue(entity, { LockDuration: "PT5S", MaxDeliveryCount: 10 })] }) });
    a = await startCluster();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sender?.close();
    await sb?.close();
    // A is stopped by the test once dumped; stop() again only if it is still running.
    if (a && statSync(join(a.data, "postmaster.pid"), { throwIfNoEntry: false })) await a.stop();
    await b?.stop();
    await emu?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  it("restores configuration and inbox into a new cluster: the subscription resumes and a redelivery is a duplicate", async () => {
    // --- Cluster A: configuration, and five messages applied and settled.
    await setUpOrders(a, emu, sub, entity);
    sender = sb.createSender(entity);
    await sender.sendMessages(Array.from({ length: 5 }, (_, i) => ({ messageId: `m-${i + 1}`, body: { id: i + 1, amount: 10 } })));
    const inboxCount = async (c) => Number((await c.query("SELECT count(*) n FROM sbpg.inbox WHERE subscription = $1", [sub])).rows[0].n);
    await waitFor(async () => (await inboxCount(a)) === 5, { what: "5 inbox rows in A" });
    await waitFor(async () => (await emu.entity(entity)).completed === 5, { what: "5 completed on the broker" });
    assert.equal(Number((await a.query("SELECT count(*) n FROM orders")).rows[0].n), 5);

    // --- m-6: committed in A, never settled. New connections to sbemu are refused first, so the
    // worker that the launcher restarts after the fault cannot take the redelivery.
    const m6 = await commitWithoutSettling(a, emu, sender, sub, { messageId: "m-6", body: { id: 6, amount: 60 } });
    await a.psql(`SELECT sbpg.disable_subscription('${sub}');`);
    await waitFor(async () => {
      const r = (await a.query("SELECT state, pid FROM sbpg.stats WHERE subscription = $1", [sub])).rows[0];
      return r.state === "disabled" || (r.state === "stopped" && !r.pid);
    }, { what: "A's worker stopped" });
    await a.query("ALTER SYSTEM RESET sbpg.test_fault");
    await a.query("SELECT pg_reload_conf()");
    await emu.fault("clear");
    await waitFor(async () => (await emu.ctl("GET", "/stats")).listening === true, { what: "sbemu listening again" });
    const broker = await emu.entity(entity);
    assert.equal(broker.completed, 5, "m-6 not completed on the broker");
    assert.equal(broker.messages, 1, "the broker still holds m-6");
    assert.equal(Number((await a.query("SELECT count(*) n FROM orders")).rows[0].n), 6);

    // --- Dump A (roles, then the database), and remember what it held.
    const dumped = await snapshot(a);
    assert.equal(dumped.subscriptions.length, 1);
    assert.equal(dumped.subscriptions[0].enabled, false);
    assert.equal(dumped.subscriptions[0].handler, "public.apply_order(sbpg.message)");
    assert.equal(dumped.subscriptions[0].run_as, "app");
    assert.equal(dumped.identity_secrets.length, 1);
    assert.deepEqual(dumped.identity_usage.map((x) => [x.identity, x.grantee]), [["emu", "app"]]);
    assert.equal(dumped.schemas.length, 1);
    assert.equal(dumped.mappings.length, 1);
    assert.equal(dumped.mappings[0].target, "orders");
    assert.equal(dumped.inbox.length, 6);
    const roles = join(work, "roles.sql");
    const dump = join(work, "postgres.dump");
    let r = pgTool("pg_dumpall", [...at(a), "--roles-only", "-f", roles]);
    assert.equal(r.status, 0, `pg_dumpall: ${r.stderr}`);
    r = pgTool("pg_dump", [...at(a), "-d", "postgres", "-Fc", "-f", dump]);
    assert.equal(r.status, 0, `pg_dump: ${r.stderr}`);
    await a.stop();

    // --- Cluster B: a fresh cluster, roles and database restored.
    b = await startCluster();
    r = pgTool("psql", [...at(b), "-X", "-q", "-d", "postgres", "-f", roles]);
    const roleErrors = r.stderr.split("\n").filter((l) => /ERROR/.test(l) && !/role "postgres" already exists/.test(l));
    assert.deepEqual(roleErrors, [], `roles restore: ${r.stderr}`);
    r = pgTool("pg_restore", [...at(b), "-d", "postgres", "--exit-on-error", dump]);
    assert.equal(r.status, 0, `pg_restore: ${r.stderr}`);
    assert.equal(r.stderr.trim(), "", "pg_restore reports nothing");

    const restored = await snapshot(b);
    for (const k of configTables) assert.deepEqual(restored[k], dumped[k], `sbpg ${k} restored as dumped`);
    assert.equal(Number((await b.query("SELECT count(*) n FROM orders")).rows[0].n), 6);

    // --- B resumes: the redelivered m-6 is a duplicate, settled and not applied again.
    listener = await b.listen();
    await b.psql(`SELECT sbpg.enable_subscription('${sub}');`);
    await waitFor(() => listener.got.some((x) => x.subscription === sub && x.message_id === "m-6"), { what: "m-6 settled by B" });
    const m6Notes = listener.got.filter((x) => x.message_id === "m-6");
    assert.deepEqual(m6Notes.map((x) => x.status), ["duplicate"]);
    assert.equal(m6Notes[0].sequence_number, Number(m6.sequence_number));
    await waitFor(async () => (await emu.entity(entity)).completed === 6, { what: "m-6 completed on the broker" });
    assert.equal((await emu.entity(entity)).messages, 0, "nothing left on the broker");
    await waitFor(async () => (await b.query("SELECT settled_at FROM sbpg.inbox WHERE subscription = $1 AND message_id = 'm-6'", [sub])).rows[0].settled_at !== null,
      { what: "m-6 stamped settled in B's inbox" });
    assert.equal(Number((await b.query("SELECT count(*) n FROM orders WHERE id = 6")).rows[0].n), 1, "m-6 applied once");
    assert.equal(Number((await b.query("SELECT count(*) n FROM orders")).rows[0].n), 6);
    const st = (await b.query("SELECT duplicates, applied FROM sbpg.stats WHERE subscription = $1", [sub])).rows[0];
    assert.equal(Number(st.duplicates), 1);
    assert.equal(Number(st.applied), 0);

    // --- New work is applied in B.
    await sender.sendMessages({ messageId: "m-7", body: { id: 7, amount: 70 } });
    await waitFor(() => listener.got.some((x) => x.message_id === "m-7"), { what: "m-7 settled by B" });
    assert.deepEqual(listener.got.filter((x) => x.message_id === "m-7").map((x) => x.status), ["applied"]);
    await waitFor(async () => (await emu.entity(entity)).completed === 7, { what: "m-7 completed on the broker" });
    const rows = (await b.query("SELECT id, message_id FROM orders ORDER BY id")).rows;
    assert.deepEqual(rows.map((x) => [Number(x.id), x.message_id]), [1, 2, 3, 4, 5, 6, 7].map((i) => [i, `m-${i}`]));
    assert.equal(await inboxCount(b), 7);

    // --- The restored schema and mapping apply a typed message without the handler.
    await sender.sendMessages({ messageId: "m-8", subject: "orders.created", body: { id: 8, amount: 80 } });
    await waitFor(() => listener.got.some((x) => x.message_id === "m-8"), { what: "m-8 settled by B" });
    assert.deepEqual(listener.got.filter((x) => x.message_id === "m-8").map((x) => x.status), ["applied"]);
    const m8 = (await b.query("SELECT amount::text, message_id FROM orders WHERE id = 8")).rows;
    assert.deepEqual(m8, [{ amount: "80", message_id: null }], "inserted by the mapping, not by apply_order");
    await waitFor(async () => (await emu.entity(entity)).completed === 8, { what: "m-8 completed on the broker" });
    assert.equal((await emu.entity(entity)).messages, 0);
    assert.equal((await emu.entity(entity)).dead_letter_moves, 0);
  });
});
