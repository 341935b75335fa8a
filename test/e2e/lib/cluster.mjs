// A throwaway PostgreSQL cluster with sbpg preloaded, for end-to-end tests. Runs as the postgres
// OS user when the tests run as root (initdb refuses root). stop() fails the test when the server
// log shows a process terminated by a signal that the test did not send itself.
import { spawnSync, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync, existsSync, chmodSync, appendFileSync, readdirSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";

const PGBIN = process.env.PGBIN || "/usr/lib/postgresql/15/bin";
const asRoot = process.getuid && process.getuid() === 0;

function run(cmd, args, { allowFail = false } = {}) {
  const full = asRoot ? ["runuser", ["-u", "postgres", "--", cmd, ...args]] : [cmd, args];
  const r = spawnSync(full[0], full[1], { encoding: "utf8" });
  if (r.status !== 0 && !allowFail) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr || r.stdout}`);
  return r;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls fn until it returns a truthy value; the timeout only guards against hanging. */
export async function waitFor(fn, { timeout = 30000, interval = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
    } catch (e) {
      last = undefined;
      if (Date.now() > deadline) throw e;
    }
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(interval);
  }
}

/**
 * initdb and start a cluster. `pgbin` picks the server (default PGBIN); `start: false` leaves it
 * initialised but stopped (start() starts it), with extra `initdbArgs`.
 */
export async function startCluster({ conf = {}, env = {}, pgbin = PGBIN, start = true, initdbArgs = [] } = {}) {
  const PGBIN = pgbin; // eslint-disable-line no-shadow -- every program below comes from this server
  const dir = mkdtempSync(join(tmpdir(), "sbpg-pg-"));
  chmodSync(dir, 0o777);
  const data = join(dir, "data");
  const log = join(dir, "server.log");
  const port = await freePort();
  run(join(PGBIN, "initdb"), ["-D", data, "--no-sync", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", ...initdbArgs]);
  const settings = {
    shared_preload_libraries: "'sbpg'",
    port,
    unix_socket_directories: `'${dir}'`,
    listen_addresses: "''",
    fsync: "off",
    max_worker_processes: 40,
    "sbpg.max_workers": 16,
    "sbpg.test_hooks": "on", // lets tests arm sbpg.test_fault (src/pg/test_hooks.cpp)
    log_line_prefix: "'%m [%p] %b: '",
    ...conf,
  };
  appendFileSync(join(data, "postgresql.conf"),
    "\n" + Object.entries(settings).map(([k, v]) => `${k} = ${v}`).join("\n") + "\n");
  const cluster = clusterAt({ dir, data, log, port, pgbin: PGBIN, env });
  if (start) cluster.start();
  return cluster;
}

/** The handle of a cluster in `data` (started or not) listening on a socket in `dir`. */
function clusterAt({ dir, data, log, port, pgbin: PGBIN, env = {} }) { // eslint-disable-line no-shadow
  const cluster = {
    dir, data, log, port, pgbin: PGBIN,
    signalsSent: [], // pids the test killed on purpose
    connectionOptions() {
      return { host: dir, port, user: "postgres", database: "postgres" };
    },
    start() {
      // Variables for the server's environment (key_env identities) go through env(1).
      const vars = Object.entries(env).map(([k, v]) => `${k}=${v}`);
      if (vars.length) run("/usr/bin/env", [...vars, join(PGBIN, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "start"]);
      else run(join(PGBIN, "pg_ctl"), ["-D", data, "-l", log, "-w", "-t", "60", "start"]);
    },
    stopServer(mode = "fast") {
      run(join(PGBIN, "pg_ctl"), ["-D", data, "-m", mode, "-w", "stop"], { allowFail: mode === "immediate" });
    },
    restart(mode = "fast") {
      run(join(PGBIN, "pg_ctl"), ["-D", data, "-m", mode, "-w", "-t", "60", "restart", "-l", log]);
    },
    async client() {
      const c = new pg.Client(cluster.connectionOptions());
      // A server restart (deliberate in some tests) resets connections: the pending call rejects;
      // the client's later 'error' event must not crash the test process.
      c.on("error", () => {});
      await c.connect();
      return c;
    },
    /** One query on a fresh connection (handy across restarts). */
    async query(text, params) {
      const c = await cluster.client();
      try {
        return await c.query(text, params);
      } finally {
        await c.end();
      }
    },
    async psql(sql) {
      const args = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", dir, "-p", String(port), "-U", "postgres", "-d", "postgres", "-c", sql];
      return execFileSync(join(PGBIN, "psql"), args, { encoding: "utf8" });
    },
    /** A LISTEN client collecting notification payloads (parsed JSON). */
    async listen(channel = "sbpg_confirm") {
      const c = await cluster.client();
      const got = [];
      c.on("notification", (n) => {
        try {
          got.push(JSON.parse(n.payload));
        } catch {
          got.push({ raw: n.payload });
        }
      });
      await c.query(`LISTEN ${channel}`);
      return { client: c, got, close: () => c.end() };
    },
    /** message_id -> the full reason recorded in sbpg.inbox ("Reason: description"); NOTIFY carries the code only. */
    async inboxReasons(subscription) {
      const r = await cluster.query("SELECT message_id, reason FROM sbpg.inbox WHERE subscription = $1", [subscription]);
      return Object.fromEntries(r.rows.map((x) => [x.message_id, x.reason]));
    },
    serverLog() {
      return existsSync(log) ? readFileSync(log, "utf8") : "";
    },
    /** Sends a signal to a backend on purpose (recorded, so the log check allows it). */
    kill(pid, signal = "SIGKILL") {
      cluster.signalsSent.push(Number(pid));
      process.kill(Number(pid), signal);
    },
    /** Processes the server reports terminated by a signal, except those the test killed. */
    unexpectedSignals() {
      const lines = cluster.serverLog().split("\n").filter((l) => /terminated by signal/.test(l));
      return lines.filter((l) => !cluster.signalsSent.some((p) => l.includes(`(PID ${p})`)));
    },
    async stop() {
      cluster.stopServer("fast");
      const bad = cluster.unexpectedSignals();
      if (bad.length) throw new Error(`server log shows processes terminated by a signal:\n${bad.join("\n")}`);
    },
    /** Ends recovery of a standby (pg_ctl promote, waiting until it accepts writes). */
    promote() {
      run(join(PGBIN, "pg_ctl"), ["-D", data, "-w", "-t", "60", "promote"]);
    },
    /** The postmaster's pid (first line of postmaster.pid), or 0 when it is not running. */
    postmasterPid() {
      const f = join(data, "postmaster.pid");
      return existsSync(f) ? Number(readFileSync(f, "utf8").split("\n")[0]) : 0;
    },
    /**
     * Loses the server as a machine would: SIGKILL to the postmaster first (so it restarts
     * nothing), then to every process it had started, and waits until all are gone. All are
     * recorded as sent on purpose.
     */
    async killAll() {
      const pm = cluster.postmasterPid();
      const pids = [pm, ...childrenOf(pm)];
      for (const pid of pids) {
        try {
          cluster.kill(pid);
        } catch {} // already gone
      }
      // Until every one is reaped: a zombie postmaster's pid would stop the data directory from
      // being started again ("lock file postmaster.pid already exists").
      await waitFor(() => pids.every((pid) => !existsSync(`/proc/${pid}`)), { what: "the killed server's processes gone" });
    },
  };
  return cluster;
}

/** Pids whose parent is `pid`, from /proc (no procps needed). */
export function childrenOf(pid) {
  const out = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === Number(pid)) out.push(Number(d));
    } catch {} // exited meanwhile
  }
  return out;
}

/**
 * A streaming-replication standby of `primary`, started, connecting with application_name `name`
 * (what synchronous_standby_names refers to). Its data directory is a copy of the primary's taken
 * while the primary is stopped for a moment (a cold base backup: the servers the suite builds for
 * PostgreSQL 17 and 18 have no pg_basebackup). Settings in `conf` are added to the copied
 * configuration.
 */
export async function startStandby(primary, { name = "standby1", conf = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "sbpg-standby-"));
  chmodSync(dir, 0o777);
  const data = join(dir, "data");
  const log = join(dir, "server.log");
  const port = await freePort();
  primary.stopServer("fast");
  run("cp", ["-a", primary.data, data]);
  primary.start();
  writeFileSync(join(data, "standby.signal"), "");
  const settings = {
    port,
    unix_socket_directories: `'${dir}'`,
    primary_conninfo: `'host=${primary.dir} port=${primary.port} user=postgres application_name=${name}'`,
    ...conf,
  };
  appendFileSync(join(data, "postgresql.conf"),
    "\n" + Object.entries(settings).map(([k, v]) => `${k} = ${v}`).join("\n") + "\n");
  const standby = clusterAt({ dir, data, log, port, pgbin: primary.pgbin });
  standby.start();
  return standby;
}

/**
 * Installs sbpg with a table, a run_as role and a handler that inserts orders. Every apply also
 * adds a row to `<table>_applies`, which has no key: a message applied twice shows there as two
 * rows, with the transaction (txid_current(), the top-level one even in a subtransaction), the
 * handler's clock_timestamp() and the worker's pid of each apply. With `keyed: false` the orders
 * table has no primary key either, so a double apply is two rows rather than a failed second
 * apply (tests that claim exactly-once count there); the default keeps `id` a primary key.
 */
export async function installOrders(cluster, { table = "orders", role = "app", handler = "apply_order", keyed = true } = {}) {
  await cluster.psql(`
    CREATE EXTENSION IF NOT EXISTS sbpg;
    DO $$ BEGIN CREATE ROLE ${role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
    CREATE TABLE ${table} (id bigint ${keyed ? "PRIMARY KEY" : "NOT NULL"}, amount numeric NOT NULL CHECK (amount >= 0), message_id text, seq bigint);
    CREATE TABLE ${table}_applies (message_id text, id bigint, xid bigint, at timestamptz, pid int);
    GRANT SELECT, INSERT ON ${table}, ${table}_applies TO ${role};
    CREATE FUNCTION ${handler}(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
    BEGIN
      INSERT INTO public.${table}_applies
      VALUES (m.message_id, (m.body->>'id')::bigint, txid_current(), clock_timestamp(), pg_backend_pid());
      INSERT INTO public.${table} (id, amount, message_id, seq)
      VALUES ((m.body->>'id')::bigint, (m.body->>'amount')::numeric, m.message_id, m.sequence_number);
    END $f$;
    GRANT EXECUTE ON FUNCTION ${handler}(sbpg.message) TO ${role};
  `);
}

/**
 * How often each message of `table`_applies (within `where`) was applied: { rows, messages, twice }
 * where `twice` lists the message ids applied more than once.
 */
export async function appliesOf(cluster, where = "true", table = "orders") {
  const r = await cluster.query(`SELECT message_id, count(*)::int n FROM ${table}_applies WHERE ${where} GROUP BY message_id`);
  return {
    rows: r.rows.reduce((a, x) => a + x.n, 0),
    messages: r.rows.length,
    twice: r.rows.filter((x) => x.n > 1).map((x) => x.message_id),
  };
}
