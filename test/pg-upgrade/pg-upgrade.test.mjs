// A major-version upgrade with pg_upgrade: a PostgreSQL 15 cluster with sbpg installed and a
// subscription consuming is upgraded to PostgreSQL 18 (PGBIN_OLD, PGBIN_NEW; test/run passes both
// and installs sbpg into each). The module does nothing while pg_upgrade runs the servers in binary
// upgrade mode; afterwards the same subscription resumes on 18 by itself, and a message that 15
// committed but never settled comes back from the broker and is recognised by the upgraded inbox:
// settled as a duplicate, not applied twice. The steps are the README's ("Upgrading PostgreSQL").
//
// Keeping 15 away from that redelivery: its worker exits after COMMIT (test fault
// exit_after_commit) while sbemu refuses new connections, and the server is stopped before sbemu
// accepts connections again.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, waitFor, freePort } from "../e2e/lib/cluster.mjs";
import { setUpOrders, commitWithoutSettling } from "../e2e/lib/redelivery.mjs";

const OLD = process.env.PGBIN_OLD || "/usr/lib/postgresql/15/bin";
const NEW = process.env.PGBIN_NEW;
const retryOptions = { maxRetries: 0, timeoutInMs: 20000 };
const asRoot = process.getuid && process.getuid() === 0;

/** Runs a server program as the postgres OS user when the tests run as root, in cwd. */
function pgTool(bin, args, cwd) {
  const [cmd, argv] = asRoot ? ["runuser", ["-u", "postgres", "--", bin, ...args]] : [bin, args];
  return spawnSync(cmd, argv, { encoding: "utf8", cwd });
}

const version = (bindir) => pgTool(join(bindir, "postgres"), ["--version"]).stdout.trim();

/** Every file under dir (pg_upgrade's kept logs). */
function filesUnder(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? filesUnder(p) : [p];
  });
}

describe("pg_upgrade from PostgreSQL 15 to 18", () => {
  let emu, a, b, sb, sender, listener;
  const sub = "upgraded";
  const entity = "upgraded";

  before(async () => {
    assert.ok(NEW, "PGBIN_NEW names the new server's bin directory (test/run sets it)");
    assert.match(version(OLD), /\(PostgreSQL\) 15\./);
    assert.match(version(NEW), /\(PostgreSQL\) 18\./);
    emu = await startSbemu({ config: configWith({ queues: [queue(entity, { LockDuration: "PT5S", MaxDeliveryCount: 10 })] }) });
    a = await startCluster({ pgbin: OLD });
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await listener?.close();
    await sender?.close();
    await sb?.close();
    if (a && existsSync(join(a.data, "postmaster.pid"))) await a.stop();
    if (b && existsSync(join(b.data, "postmaster.pid"))) await b.stop();
    await emu?.stop();
  });

  it("upgrades a cluster with running subscriptions; the workers resume on 18 and the inbox recognises a redelivery", async () => {
    // --- 15: configuration, and five messages applied and settled.
    await setUpOrders(a, emu, sub, entity);
    sender = sb.createSender(entity);
    await sender.sendMessages(Array.from({ length: 5 }, (_, i) => ({ messageId: `m-${i + 1}`, body: { id: i + 1, amount: 10 } })));
    const inboxCount = async (c) => Number((await c.query("SELECT count(*) n FROM sbpg.inbox WHERE subscription = $1", [sub])).rows[0].n);
    await waitFor(async () => (await inboxCount(a)) === 5, { what: "5 inbox rows on 15" });
    await waitFor(async () => (await emu.entity(entity)).completed === 5, { what: "5 completed on the broker" });

    // --- m-6: committed on 15, never settled.
    const m6 = await commitWithoutSettling(a, emu, sender, sub, { messageId: "m-6", body: { id: 6, amount: 60 } });
    await a.query("ALTER SYSTEM RESET sbpg.test_fault");
    const before = {
      subscriptions: (await a.query("SELECT name, handler, handler_owner::text, run_as::text, enabled, options FROM sbpg.subscriptions ORDER BY name")).rows,
      inbox: (await a.query("SELECT message_id, sequence_number, status FROM sbpg.inbox ORDER BY sequence_number")).rows,
      extversion: (await a.query("SELECT extversion FROM pg_extension WHERE extname = 'sbpg'")).rows[0].extversion,
    };
    await a.stop(); // the subscription stays enabled: nothing is prepared for the upgrade

    // --- 18: a new cluster, initialised like the old one (18's initdb turns data checksums on by
    // default; pg_upgrade needs both sides the same), with sbpg preloaded; then pg_upgrade.
    b = await startCluster({ pgbin: NEW, start: false, initdbArgs: ["--no-data-checksums"] });
    const [oldPort, newPort] = [await freePort(), await freePort()];
    const args = ["-b", OLD, "-B", NEW, "-d", a.data, "-D", b.data, "-U", "postgres", "-p", String(oldPort), "-P", String(newPort),
      "--socketdir", b.dir, "--retain"];
    let r = pgTool(join(NEW, "pg_upgrade"), ["--check", ...args], b.dir);
    assert.equal(r.status, 0, `pg_upgrade --check:\n${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /Clusters are compatible/);
    r = pgTool(join(NEW, "pg_upgrade"), args, b.dir);
    assert.equal(r.status, 0, `pg_upgrade:\n${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /Upgrade Complete/);
    // Both servers ran with shared_preload_libraries = 'sbpg' in binary upgrade mode: no launcher.
    const upgradeLogs = filesUnder(join(b.data, "pg_upgrade_output.d")).filter((f) => f.endsWith(".log"));
    assert.ok(upgradeLogs.some((f) => /pg_upgrade_server\.log$/.test(f)), `pg_upgrade kept its server log: ${upgradeLogs}`);
    for (const f of upgradeLogs) assert.doesNotMatch(readFileSync(f, "utf8"), /sbpg launcher|sbpg worker/, `${f} shows no sbpg process`);

    // --- 18 starts; sbemu accepts connections again; the same subscription resumes by itself.
    listener = null;
    await emu.fault("clear");
    await waitFor(async () => (await emu.ctl("GET", "/stats")).listening === true, { what: "sbemu listening again" });
    b.start();
    assert.match((await b.query("SELECT version() v")).rows[0].v, /^PostgreSQL 18\./);
    const after = {
      subscriptions: (await b.query("SELECT name, handler, handler_owner::text, run_as::text, enabled, options FROM sbpg.subscriptions ORDER BY name")).rows,
      inbox: (await b.query("SELECT message_id, sequence_number, status FROM sbpg.inbox ORDER BY sequence_number")).rows,
      extversion: (await b.query("SELECT extversion FROM pg_extension WHERE extname = 'sbpg'")).rows[0].extversion,
    };
    assert.deepEqual(after, before, "subscriptions, inbox and the extension's version carried over");
    listener = await b.listen(); // for the new work below: m-6 may be settled before this LISTEN
    // The redelivered m-6 is recognised: settled as a duplicate (sbpg.stats counts it), not applied.
    await waitFor(async () => Number((await b.query("SELECT duplicates FROM sbpg.stats WHERE subscription = $1", [sub])).rows[0]?.duplicates) === 1,
      { timeout: 60000, what: "m-6 settled as a duplicate on 18" });
    const m6After = (await b.query("SELECT sequence_number, status, settled_at FROM sbpg.inbox WHERE subscription = $1 AND message_id = 'm-6'", [sub])).rows[0];
    assert.equal(m6After.sequence_number, m6.sequence_number);
    assert.equal(m6After.status, "applied", "the inbox row 15 wrote");
    await waitFor(async () => (await emu.entity(entity)).completed === 6, { what: "m-6 completed on the broker" });
    assert.equal(Number((await b.query("SELECT count(*) n FROM orders WHERE id = 6")).rows[0].n), 1, "m-6 applied once");
    assert.equal(Number((await b.query("SELECT count(*) n FROM orders_applies")).rows[0].n), 6, "six applies in all, none twice");

    // --- New work on 18: through the handler, and through the mapping.
    await sender.sendMessages([{ messageId: "m-7", body: { id: 7, amount: 70 } },
      { messageId: "m-8", subject: "orders.created", body: { id: 8, amount: 80 } }]);
    await waitFor(() => ["m-7", "m-8"].every((id) => listener.got.some((x) => x.message_id === id)), { what: "m-7 and m-8 settled on 18" });
    assert.deepEqual(listener.got.filter((x) => /^m-[78]$/.test(x.message_id)).map((x) => x.status), ["applied", "applied"]);
    const rows = (await b.query("SELECT id, message_id FROM orders ORDER BY id")).rows;
    assert.deepEqual(rows.map((x) => [Number(x.id), x.message_id]), [[1, "m-1"], [2, "m-2"], [3, "m-3"], [4, "m-4"], [5, "m-5"], [6, "m-6"], [7, "m-7"], [8, null]]);
    await waitFor(async () => (await emu.entity(entity)).completed === 8, { what: "8 completed on the broker" });
    const st = (await b.query("SELECT state, duplicates FROM sbpg.stats WHERE subscription = $1", [sub])).rows[0];
    assert.equal(st.state, "connected");
    assert.equal(Number(st.duplicates), 1);
  });
});
