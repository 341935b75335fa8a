// SAS identities given literally, by file and by environment variable; a wrong key; and the rule
// that a key or token never shows in the server log, the catalog views, stats or notifications.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

const literalKey = "literal-key-3f9c2a";
const fileKey = "file-key-81d4e7";
const envKey = "env-key-5b20c9";

describe("identities and secrets", () => {
  let emu, pg, sb, listener;
  let nextId = 0;
  const rows = async () => Number((await pg.query("SELECT count(*) c FROM orders")).rows[0].c);
  const subscribe = (name, identity) =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', 'apply_order(sbpg.message)', 'app', '${identity}');`);

  before(async () => {
    emu = await startSbemu({
      config: configWith({ queues: ["lit", "file", "env", "wrong", "listen-only"].map((n) => queue(n)) }),
      args: ["--sas-key", `RootManageSharedAccessKey=SAS_KEY_VALUE`, "--sas-key", `lit=${literalKey}:Listen`,
             "--sas-key", `fromfile=${fileKey}:Listen`, "--sas-key", `fromenv=${envKey}:Listen`],
    });
    pg = await startCluster({ env: { SBPG_TEST_KEY: envKey } });
    const keyFile = join(pg.dir, "sas.key");
    writeFileSync(keyFile, fileKey + "\n");
    chmodSync(keyFile, 0o644);
    await installOrders(pg);
    await pg.psql(`
      SELECT sbpg.create_identity('lit', 'sas', '{"key_name": "lit", "key": "${literalKey}"}');
      SELECT sbpg.create_identity('file', 'sas', '{"key_name": "fromfile", "key_file": "${keyFile}"}');
      SELECT sbpg.create_identity('env', 'sas', '{"key_name": "fromenv", "key_env": "SBPG_TEST_KEY"}');
      SELECT sbpg.create_identity('wrong', 'sas', '{"key_name": "lit", "key": "not-the-key"}');
      SELECT sbpg.create_identity('missing-env', 'sas', '{"key_name": "fromenv", "key_env": "SBPG_NOT_SET"}');`);
    // The workers run at debug5 from here on: no key may reach the log at any level. (Set after the
    // server started, since PostgreSQL itself logs its environment at debug3 when it starts, a
    // documented exception; and after the literal keys were given in SQL text.)
    await pg.query("ALTER SYSTEM SET log_min_messages = 'debug5'");
    await pg.query("SELECT pg_reload_conf()");
    listener = await pg.listen();
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0 } });
  });
  after(async () => {
    await listener?.close();
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
  });

  it("consumes with a key given literally, by file and by environment variable", async () => {
    await subscribe("lit", "lit");
    await subscribe("file", "file");
    await subscribe("env", "env");
    for (const q of ["lit", "file", "env"])
      await sb.createSender(q).sendMessages({ body: { id: ++nextId, amount: 1 } });
    await waitFor(async () => (await rows()) === 3, { what: "3 rows" });
    const conns = await emu.connections();
    const identities = conns.flatMap((c) => c.tokens.map((t) => t.identity)).sort();
    for (const k of ["sas:fromenv", "sas:fromfile", "sas:lit"]) assert.ok(identities.includes(k), `token from ${k}`);
  });

  it("reports a refused key in sbpg.stats and keeps retrying, without losing messages", async () => {
    await sb.createSender("wrong").sendMessages({ body: { id: ++nextId, amount: 1 } });
    await subscribe("wrong", "wrong");
    const st = await waitFor(async () => {
      const r = (await pg.query("SELECT state, last_error FROM sbpg.stats WHERE subscription = 'wrong'")).rows[0];
      return r && r.last_error && /put-token/.test(r.last_error) ? r : null;
    }, { what: "the refusal in stats" });
    assert.equal(st.state, "reconnecting");
    assert.match(st.last_error, /refused \(401/);
    assert.equal((await emu.entity("wrong")).active, 1, "the message waits on the broker");
    await pg.psql(`SELECT sbpg.alter_subscription('wrong', identity => 'lit')`);
    await waitFor(async () => (await emu.entity("wrong")).completed === 1, { what: "consumed after fixing the identity" });
  });

  it("reports an unset key_env in sbpg.stats", async () => {
    await pg.psql(`SELECT sbpg.create_subscription('listen-only', '${emu.amqp}', 'listen-only', 'apply_order(sbpg.message)', 'app', 'missing-env')`);
    const st = await waitFor(async () => {
      const r = (await pg.query("SELECT state, last_error FROM sbpg.stats WHERE subscription = 'listen-only'")).rows[0];
      return r && r.last_error ? r : null;
    }, { what: "the error in stats" });
    assert.match(st.last_error, /SBPG_NOT_SET is not set in the server's environment/);
  });

  it("never shows a key or token in the server log, views, stats, activity or notifications", async () => {
    const places = {
      log: pg.serverLog(),
      stats: JSON.stringify((await pg.query("SELECT * FROM sbpg.stats")).rows),
      identities: JSON.stringify((await pg.query("SELECT * FROM sbpg.identities")).rows),
      subscriptions: JSON.stringify((await pg.query("SELECT * FROM sbpg.subscriptions")).rows),
      activity: JSON.stringify((await pg.query("SELECT application_name, query FROM pg_stat_activity WHERE backend_type LIKE 'sbpg%'")).rows),
      settings: JSON.stringify((await pg.query("SELECT name, setting FROM pg_settings WHERE name LIKE 'sbpg.%'")).rows),
      notifications: JSON.stringify(listener.got),
      sbemu: emu.log(),
    };
    for (const [where, text] of Object.entries(places)) {
      for (const secret of [literalKey, fileKey, envKey, "not-the-key", "SharedAccessSignature", "sig="])
        assert.ok(!text.includes(secret), `${secret} appears in ${where}`);
    }
  });
});
