// docs/monitoring.md checked against a running worker: every `sql` block of the page runs as a
// member of sbpg_monitor; the alert rules pass promtool's check and their unit tests; Debian's
// postgres_exporter, given docs/monitoring/postgres_exporter.yml, exports sbpg.stats with the
// figures sbpg.stats shows, every metric the alert rules use, and nothing secret.
// The tools come from test/monitoring/tools.sh (Debian's packages, unpacked, not installed).
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, freePort, waitFor } from "../e2e/lib/cluster.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const DOCS = join(ROOT, "docs");
const BIN = execFileSync(join(ROOT, "test/monitoring/tools.sh"), ["bindir"], { encoding: "utf8" }).trim();
const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/** The fenced blocks of a Markdown text in a language. */
function blocks(md, lang) {
  const out = [];
  const re = new RegExp("```" + lang + "\\n([\\s\\S]*?)```", "g");
  for (let m; (m = re.exec(md)); ) out.push(m[1]);
  return out;
}

/** name{labels} value lines of a Prometheus text exposition, for names starting with prefix. */
function samples(text, prefix) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m || !m[1].startsWith(prefix)) continue;
    const labels = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

describe("monitoring (docs/monitoring.md)", () => {
  let emu, pg, exporter, exporterLog = "", metricsPort;

  before(async () => {
    emu = await startSbemu({ config: configWith({ queues: [queue("watched")] }) });
    pg = await startCluster();
    await pg.psql(`
      CREATE EXTENSION sbpg;
      CREATE ROLE app NOLOGIN;
      CREATE ROLE sbpg_exporter LOGIN IN ROLE sbpg_monitor;
      CREATE TABLE got (id int);
      GRANT INSERT ON got TO app;
      CREATE FUNCTION take(m sbpg.message) RETURNS void LANGUAGE plpgsql AS $f$
      BEGIN
        IF (m.body->>'fail')::boolean THEN RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END IF;
        INSERT INTO public.got VALUES ((m.body->>'id')::int);
      END $f$;
      GRANT EXECUTE ON FUNCTION take(sbpg.message) TO app;
      SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
      SELECT sbpg.create_subscription('watched', '${emu.amqp}', 'watched', 'take(sbpg.message)', 'app', 'emu');
    `);
    const sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0, timeoutInMs: 20000 } });
    const s = sb.createSender("watched");
    const msgs = [];
    for (let i = 0; i < 20; i++) msgs.push({ messageId: `w-${i}`, body: i === 7 ? { fail: true } : { id: i }, applicationProperties: { traceparent: TP } });
    await s.sendMessages(msgs);
    await s.close();
    await sb.close();
    await waitFor(async () => (await pg.query("SELECT applied + dead_lettered AS n FROM sbpg.stats")).rows[0].n === "20",
      { what: "twenty messages settled" });
  });
  after(async () => {
    exporter?.kill("SIGTERM");
    await pg?.stop();
    await emu?.stop();
  });

  it("every sql block of docs/monitoring.md runs as a member of sbpg_monitor", async () => {
    const sql = blocks(readFileSync(join(DOCS, "monitoring.md"), "utf8"), "sql");
    assert.ok(sql.length >= 8, `found ${sql.length} blocks`);
    // Minutes as the worker writes them once they are over (the run is younger than that).
    await pg.psql(`INSERT INTO sbpg.stats_minutes (subscription, minute, received, applied, dead_lettered, duplicates,
                     retries, batches, apply_ms_p50, apply_ms_p99, lag_ms_p50, lag_ms_p99)
                   SELECT 'watched', date_trunc('minute', now()) - m * interval '1 minute', 600, 594, 6, 0, 2, 10, 0.2, 1.5, 3, 9
                   FROM generate_series(1, 90) m ON CONFLICT DO NOTHING;`);
    const c = await pg.client();
    try {
      await c.query("SET ROLE sbpg_exporter");
      for (const q of sql) await c.query(q); // throws with the query's error
      // The trace lookup finds the messages of the trace id it names.
      const trace = sql.find((q) => q.includes("traceparent LIKE"));
      assert.equal((await c.query(trace)).rows.length, 20);
      // The history queries see those minutes: the chart's last hour, the worst minutes, the hours.
      const history = sql.filter((q) => q.includes("FROM sbpg.stats_history") && !q.includes("NOT EXISTS") && !q.includes("UNION ALL"));
      assert.ok(history.length >= 3);
      for (const q of history) assert.ok((await c.query(q)).rows.length > 0, q);
      const chart = (await c.query(sql.find((q) => q.includes("AS time")))).rows;
      assert.ok(chart.length >= 59 && chart.every((r) => r.messages_per_second === 10), JSON.stringify(chart[0]));
      const health = (await c.query(sql[0])).rows;
      assert.deepEqual(health.map((r) => [r.subscription, r.state]), [["watched", "connected"]]);
    } finally {
      await c.end();
    }
  });

  it("the alert rules pass promtool's check and their unit tests", () => {
    const dir = join(DOCS, "monitoring");
    const check = execFileSync(join(BIN, "promtool"), ["check", "rules", "alerts.yml"], { cwd: dir, encoding: "utf8" });
    assert.match(check, /SUCCESS: 8 rules found/);
    const test = execFileSync(join(BIN, "promtool"), ["test", "rules", "alerts.test.yml"], { cwd: dir, encoding: "utf8" });
    assert.match(test, /SUCCESS/);
  });

  it("postgres_exporter exports sbpg.stats as the alert rules expect, and nothing secret", async () => {
    metricsPort = await freePort();
    exporter = spawn(join(BIN, "prometheus-postgres-exporter"), [
      `--extend.query-path=${join(DOCS, "monitoring/postgres_exporter.yml")}`,
      `--web.listen-address=127.0.0.1:${metricsPort}`,
      "--disable-default-metrics", "--disable-settings-metrics",
    ], {
      env: { ...process.env, DATA_SOURCE_NAME: `host=${pg.dir} port=${pg.port} dbname=postgres user=sbpg_exporter sslmode=disable` },
      stdio: ["ignore", "pipe", "pipe"],
    });
    exporter.stdout.on("data", (d) => { exporterLog += d; });
    exporter.stderr.on("data", (d) => { exporterLog += d; });
    let text = "";
    await waitFor(async () => {
      try {
        text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      } catch {
        return false;
      }
      return /^sbpg_stats_applied\{/m.test(text);
    }, { what: `sbpg metrics from the exporter (its log: ${exporterLog})` });
    const got = samples(text, "sbpg_stats_").filter((s) => s.labels.subscription === "watched");
    const value = (name) => got.find((s) => s.name === name)?.value;
    const stats = (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = 'watched'")).rows[0];
    assert.equal(value("sbpg_stats_applied"), Number(stats.applied));
    assert.equal(value("sbpg_stats_applied"), 19);
    assert.equal(value("sbpg_stats_dead_lettered"), 1);
    assert.equal(value("sbpg_stats_received"), 20);
    assert.equal(value("sbpg_stats_connected"), 1);
    assert.equal(value("sbpg_stats_enabled"), 1);
    assert.equal(value("sbpg_stats_paused"), 0);
    assert.ok(value("sbpg_stats_apply_ms_p99") > 0);
    assert.ok(Math.abs(value("sbpg_stats_token_expires_at_seconds") - stats.token_expires_at.getTime() / 1000) < 1);
    assert.match(text, /# TYPE sbpg_stats_applied counter/);
    // Every metric an alert rule names is exported.
    const rules = readFileSync(join(DOCS, "monitoring/alerts.yml"), "utf8");
    const used = new Set(rules.match(/sbpg_stats_[a-z_0-9]+/g));
    for (const name of used) assert.ok(got.some((s) => s.name === name), `${name} (used by an alert rule) is exported`);
    // The query ran without error, and no token, key or message content is exported.
    assert.doesNotMatch(exporterLog, /level=error/, exporterLog);
    assert.doesNotMatch(text, /SAS_KEY_VALUE|SharedAccessSignature|w-7|refused/);
  });
});
