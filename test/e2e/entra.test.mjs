// Entra ID identities end to end: each kind (managed identity through IMDS, App Service and Azure
// Arc; workload identity; client secret literal and by file; the default chain) gets its token
// from the test token service, puts it on sbemu's TLS listener, and applies messages. Then the
// token lifecycle: 10-second tokens for two minutes under load, an endpoint down at start,
// 429 and 500 spells, a wrong audience, a broker refusing tokens, an untrusted certificate. The
// first block runs at log_min_messages = debug5 with Proton's frame trace requested, and ends by
// grepping everything SQL can see and the whole server log for any token or secret.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, readFileSync, readdirSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { randomBytes } from "node:crypto";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startTokensvc, makeTestCa, verifyJwt } from "../tokensvc/harness.mjs";
import { startCluster, installOrders, waitFor, sleep } from "./lib/cluster.mjs";

const tenant = "5d1f7e0c-2b44-4e8a-9c61-3f0a7b2d9e14";
const clientSecret = `sp-secret-${randomBytes(8).toString("hex")}`;
const identityHeader = `hdr-${randomBytes(8).toString("hex")}`;
const jwtPattern = /eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}/;

// The server runs as the postgres OS user: the directories on the way to the files it reads must
// be traversable.
function openUp(path) {
  for (let d = path; d !== "/" && d.startsWith("/tmp/"); d = dirname(d)) chmodSync(d, 0o755);
}

async function startWorld({ lifetime = 3600, conf = {}, env = {} } = {}) {
  const ca = makeTestCa();
  openUp(ca.dir);
  const svc = await startTokensvc({
    args: ["--tls-listen", "127.0.0.1:0", "--tls-cert", ca.cert, "--tls-key", ca.key, "--lifetime", String(lifetime),
           "--tenant", tenant, "--client-secret", clientSecret, "--identity-header", identityHeader],
  });
  openUp(join(svc.dir, "arc"));
  const emu = await startSbemu({
    config: configWith({ queues: ["imds", "imds-user", "appsvc", "arc", "aks", "sp", "sp-file", "chain", "steady", "late",
                                  "throttled", "aud", "rejected", "tls"].map((n) => queue(n, { LockDuration: "PT1M" })) }),
    args: ["--tls-listen", "127.0.0.1:0", "--tls-cert", ca.cert, "--tls-key", ca.key, "--jwks", join(svc.dir, "jwks.json")],
  });
  assert.ok(emu.amqps, "sbemu has a TLS listener");
  const pg = await startCluster({
    conf: { "sbpg.ca_file": `'${ca.ca}'`, ...conf },
    env: {
      IDENTITY_ENDPOINT: `${svc.http}/msi/token`,
      IDENTITY_HEADER: identityHeader,
      AZURE_TENANT_ID: tenant,
      AZURE_CLIENT_ID: "aks-workload-client",
      AZURE_FEDERATED_TOKEN_FILE: join(svc.dir, "federated-token"),
      AZURE_AUTHORITY_HOST: svc.https,
      ...env,
    },
  });
  await installOrders(pg);
  const sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 2, timeoutInMs: 20000 } });
  const world = {
    ca, svc, emu, pg, sb,
    nextId: 1,
    async send(entity, n) {
      const ids = Array.from({ length: n }, () => world.nextId++);
      const s = sb.createSender(entity);
      await s.sendMessages(ids.map((id) => ({ messageId: `m-${id}`, body: { id, amount: 1 } })));
      await s.close();
      return ids;
    },
    async rowsFor(ids) {
      return Number((await pg.query("SELECT count(*) c FROM orders WHERE id = ANY($1)", [ids])).rows[0].c);
    },
    async stats(name) {
      return (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
    },
    // By host name: Proton checks the certificate's DNS names, never its IP addresses.
    amqps: emu.amqps.replace("127.0.0.1", "localhost"),
    subscribe(name, identity) {
      return pg.psql(`SELECT sbpg.create_subscription('${name}', '${world.amqps}', '${name}', 'apply_order(sbpg.message)', 'app', '${identity}')`);
    },
    // Stops everything, even when one of them reports a problem (which is then rethrown).
    async stop() {
      const problems = [];
      for (const f of [() => sb.close(), () => pg.stop(), () => emu.stop(),
                       async () => assert.equal((await svc.stop()).code, 0, "tokensvc exits cleanly")]) {
        try {
          await f();
        } catch (e) {
          problems.push(e);
        }
      }
      if (problems.length) throw problems[0];
    },
  };
  return world;
}

// The server log without PostgreSQL's own startup dump of the postmaster's environment (written
// at log_min_messages debug3 and below, before any extension is loaded): it shows every variable,
// IDENTITY_HEADER included, and nothing sbpg does can change that. docs/security.md says so.
// Up to 15 the dump is one log line per variable between two lines of dashes, each with the
// line prefix ("postmaster: DEBUG:  \tVAR=..."); from 16 it is one message whose continuation
// lines start with a tab and have no prefix.
const environmentDumpStart = /(PostmasterMain: )?initial environment dump:/;
function withoutEnvironmentDump(log) {
  const out = [];
  let inDump = false;
  for (const l of log.split("\n")) {
    if (environmentDumpStart.test(l)) {
      inDump = true;
      continue;
    }
    if (inDump && (/postmaster: DEBUG: {2}-{20,}$/.test(l) || /postmaster: DEBUG: {2}\t/.test(l) || /^\t/.test(l))) continue;
    inDump = false;
    out.push(l);
  }
  return out.join("\n");
}

// The sbemu connection that holds a receiver on `entity`.
async function connectionOf(emu, entity) {
  const conns = await emu.connections();
  return conns.find((c) => c.links.some((l) => l.address === entity && l.role === "receiver"));
}

describe("Entra ID identities over TLS", () => {
  let w, listener;
  before(async () => {
    w = await startWorld({
      conf: { log_min_messages: "debug5" },
      // Proton's frame trace would print put-token bodies; sbpg must silence it.
      env: { PN_TRACE_FRM: "1", PN_LOG: "all" },
    });
    listener = await w.pg.listen();
    const secretFile = join(w.pg.dir, "sp.secret");
    writeFileSync(secretFile, clientSecret + "\n");
    chmodSync(secretFile, 0o644);
    const ep = (path) => `${w.svc.http}${path}`;
    // The emulator is not a Service Bus namespace: each identity lists it, or sbpg would refuse to
    // send it a token.
    const dev = `"allowed_namespaces": ["${w.amqps}"]`;
    await w.pg.psql(`
      SELECT sbpg.create_identity('imds', 'managed_identity', '{"source": "imds", "endpoint": "${ep("/metadata/identity/oauth2/token")}", ${dev}}');
      SELECT sbpg.create_identity('imds-user', 'managed_identity', '{"source": "imds", "endpoint": "${ep("/metadata/identity/oauth2/token")}", "client_id": "9a3c5e71-0b2d-4f6e-8a1c-5d7e9f0b2c4a", ${dev}}');
      SELECT sbpg.create_identity('appsvc', 'managed_identity', '{"source": "app_service", ${dev}}');
      SELECT sbpg.create_identity('arc', 'managed_identity', '{"source": "arc", "endpoint": "${ep("/arc/token")}", "arc_key_dir": "${join(w.svc.dir, "arc")}", ${dev}}');
      SELECT sbpg.create_identity('aks', 'workload_identity', '{${dev}}');
      SELECT sbpg.create_identity('sp', 'client_secret', '{"tenant_id": "${tenant}", "client_id": "sbpg-sp", "secret": "${clientSecret}", "authority_host": "${w.svc.https}", ${dev}}');
      SELECT sbpg.create_identity('sp-file', 'client_secret', '{"tenant_id": "${tenant}", "client_id": "sbpg-sp-file", "secret_file": "${secretFile}", "authority_host": "${w.svc.https}", ${dev}}');
      SELECT sbpg.create_identity('chain', 'default', '{${dev}}');`);
  });
  after(async () => {
    await listener?.close();
    await w?.stop();
  });

  const kinds = [
    { name: "imds", route: "imds" },
    { name: "imds-user", route: "imds", clientId: "9a3c5e71-0b2d-4f6e-8a1c-5d7e9f0b2c4a" },
    { name: "appsvc", route: "app_service" },
    { name: "arc", route: "arc" },
    { name: "aks", route: "entra_assertion", clientId: "aks-workload-client" },
    { name: "sp", route: "entra_secret", clientId: "sbpg-sp" },
    { name: "sp-file", route: "entra_secret", clientId: "sbpg-sp-file" },
    { name: "chain", route: "entra_assertion", clientId: "aks-workload-client" },
  ];

  it("consumes with every identity kind over TLS, with the audience, lifetime and subject Azure would issue", async () => {
    for (const k of kinds) await w.subscribe(k.name, k.name);
    const sent = {};
    for (const k of kinds) sent[k.name] = await w.send(k.name, 5);
    for (const k of kinds)
      await waitFor(async () => (await w.rowsFor(sent[k.name])) === 5, { what: `5 rows through identity ${k.name}` });
    const issued = (await w.svc.stats()).issued;
    for (const k of kinds) {
      const st = await w.stats(k.name);
      assert.equal(st.state, "connected", k.name);
      assert.ok(Number(st.tokens_put) >= 1, `${k.name}: a put-token was accepted`);
      assert.equal(st.token_error, null, k.name);
      const mine = issued.filter((t) => t.kind === k.route && t.oid === st.token_subject);
      assert.ok(mine.length >= 1, `${k.name}: token_subject ${st.token_subject} is a principal tokensvc issued for ${k.route}`);
      const t = mine[mine.length - 1];
      assert.equal(t.aud, "https://servicebus.azure.net", `${k.name}: audience`);
      assert.equal(t.exp - t.iat, 3600, `${k.name}: lifetime`);
      if (k.clientId) assert.equal(t.client_id, k.clientId, `${k.name}: client id`);
      assert.ok(Math.abs(new Date(st.token_expires_at).getTime() - t.exp * 1000) <= 5000, `${k.name}: token_expires_at is the token's exp`);
      // The broker saw a JWT for this entity, from this principal, over TLS.
      const conn = await connectionOf(w.emu, k.name);
      assert.ok(conn, `${k.name}: a connection holds a receiver`);
      assert.equal(conn.tls, true, `${k.name}: TLS`);
      const tok = conn.tokens.find((x) => x.type === "jwt");
      assert.ok(tok, `${k.name}: a JWT was put`);
      assert.equal(tok.identity, `jwt:${st.token_subject}`);
      assert.equal(tok.scope, k.name, `${k.name}: the token covers the entity`);
    }
    // Distinct identities are distinct principals.
    const subjects = new Map();
    for (const k of kinds) subjects.set(k.name, (await w.stats(k.name)).token_subject);
    assert.notEqual(subjects.get("imds"), subjects.get("imds-user"), "a user-assigned identity is another principal");
    assert.notEqual(subjects.get("imds"), subjects.get("appsvc"));
    assert.equal(subjects.get("aks"), subjects.get("chain"), "the default chain chose the workload identity");
    // What the server log says about the choices made, with no token in it.
    const log = w.pg.serverLog();
    assert.match(log, /"event":"token","subscription":"chain".*default credential: skipped environment: AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are not all set/);
    assert.match(log, /"event":"token","subscription":"chain".*default credential: using workload identity/);
    assert.match(log, /"event":"token","subscription":"arc".*token 1 obtained from managed identity \(Azure Arc identity endpoint/);
    assert.match(log, /"event":"token","subscription":"imds".*subject [0-9a-f-]{36}, audience https:\/\/servicebus.azure.net, expires /);
  });

  it("uses one token per worker, not one per message (per connection attempt: token-rules.test.mjs)", async () => {
    const before = (await w.svc.stats()).issued.filter((t) => t.kind === "imds").length;
    const ids = await w.send("imds", 200);
    await waitFor(async () => (await w.rowsFor(ids)) === 200, { what: "200 more rows" });
    const after = (await w.svc.stats()).issued.filter((t) => t.kind === "imds").length;
    assert.equal(after, before, "no token was fetched for 200 messages");
  });

  it("never shows a token or secret in the log (debug5, Proton trace asked for), catalogs, views, activity or notifications", async () => {
    const full = w.pg.serverLog();
    assert.match(full, environmentDumpStart, "the server logged at debug3 and below");
    const log = withoutEnvironmentDump(full);
    assert.match(log, /DEBUG: {2}StartTransaction/, "the server logged at debug5");
    assert.match(log, /"event":"token".*obtained/, "token events were logged");
    const secrets = {
      "client secret": clientSecret,
      "identity header": identityHeader,
      "federated token": readFileSync(join(w.svc.dir, "federated-token"), "utf8").trim(),
    };
    for (const f of readdirSync(join(w.svc.dir, "arc"))) secrets[`arc key ${f}`] = readFileSync(join(w.svc.dir, "arc", f), "utf8").trim();
    const q = async (sql) => JSON.stringify((await w.pg.query(sql)).rows);
    const places = {
      "server log": log,
      "sbpg.stats": await q("SELECT * FROM sbpg.stats"),
      "sbpg.identities": await q("SELECT * FROM sbpg.identities"),
      "sbpg.subscriptions": await q("SELECT * FROM sbpg.subscriptions"),
      "sbpg.inbox": await q("SELECT * FROM sbpg.inbox"),
      "pg_settings": await q("SELECT name, setting, reset_val, boot_val FROM pg_settings"),
      "pg_stat_activity": await q("SELECT application_name, backend_type, query FROM pg_stat_activity"),
      "pg_db_role_setting": await q("SELECT * FROM pg_db_role_setting"),
      notifications: JSON.stringify(listener.got),
      "tokensvc log": existsSync(join(w.svc.dir, "tokensvc.log")) ? readFileSync(join(w.svc.dir, "tokensvc.log"), "utf8") : "",
    };
    for (const [where, text] of Object.entries(places)) {
      assert.ok(!jwtPattern.test(text), `a JWT appears in ${where}: ${jwtPattern.exec(text)?.[0].slice(0, 20)}...`);
      for (const [what, secret] of Object.entries(secrets)) assert.ok(!text.includes(secret), `the ${what} appears in ${where}`);
    }
    // The literal client secret is stored, readable by superusers only.
    const stored = await w.pg.query("SELECT identity FROM sbpg.identity_secrets WHERE secret = $1", [clientSecret]);
    assert.deepEqual(stored.rows.map((r) => r.identity), ["sp"]);
  });
});

describe("Entra ID token lifecycle", () => {
  let w;
  const pidOf = async (name) => (await w.stats(name)).pid;
  const done = (name) => w.pg.psql(`SELECT sbpg.disable_subscription('${name}')`);

  before(async () => {
    w = await startWorld({ lifetime: 10 });
    await w.pg.psql(`SELECT sbpg.create_identity('vm', 'managed_identity', '{"source": "imds", "endpoint": "${w.svc.http}/metadata/identity/oauth2/token", "allowed_namespaces": ["${w.amqps}"]}')`);
  });
  after(async () => {
    await w?.stop();
  });

  it("keeps one connection through two minutes of 10-second tokens at steady load, applying every message once", async (t) => {
    await w.subscribe("steady", "vm");
    await waitFor(async () => (await w.stats("steady"))?.state === "connected", { what: "steady connected" });
    const firstConn = (await connectionOf(w.emu, "steady")).id;
    const issuedBefore = (await w.svc.stats()).issued.length;
    const started = Date.now();
    const ids = [];
    // One sender for the whole run, so that sbemu's put-token count is sbpg's plus the sender's one.
    const sender = w.sb.createSender("steady");
    while (Date.now() - started < 120000) {
      const batch = Array.from({ length: 10 }, () => w.nextId++);
      await sender.sendMessages(batch.map((id) => ({ messageId: `m-${id}`, body: { id, amount: 1 } })));
      ids.push(...batch);
      await sleep(100);
    }
    await sender.close();
    await waitFor(async () => (await w.rowsFor(ids)) === ids.length, { timeout: 60000, what: `${ids.length} rows` });
    const st = await w.stats("steady");
    const ent = await w.emu.entity("steady");
    const conn = await connectionOf(w.emu, "steady");
    assert.equal(conn.id, firstConn, "the same connection throughout");
    assert.equal(Number(st.reconnects), 0, "no reconnect");
    assert.equal(Number(st.duplicates), 0);
    assert.equal(Number(st.applied), ids.length, "each message applied once");
    const inbox = await w.pg.query("SELECT count(*)::int c, count(DISTINCT sequence_number)::int d FROM sbpg.inbox WHERE subscription = 'steady'");
    assert.deepEqual(inbox.rows[0], { c: ids.length, d: ids.length });
    await waitFor(async () => (await w.emu.entity("steady")).completed === ids.length, { what: "all completed" });
    assert.equal(ent.lock_lost, 0);
    // A link without a valid token is detached: 12 10-second lifetimes need at least 12 renewals.
    assert.ok(Number(st.tokens_put) >= 13, `sbpg.stats tokens_put ${st.tokens_put}`);
    const sdkPuts = ent.put_tokens - Number(st.tokens_put);
    assert.ok(sdkPuts >= 0 && sdkPuts <= 2, `sbemu counted ${ent.put_tokens} put-tokens: sbpg's ${st.tokens_put} and the sender's`);
    // Renewed about every half-life (5 s), never more often.
    const fetched = (await w.svc.stats()).issued.length - issuedBefore;
    assert.ok(fetched <= 120 / 4 + 2, `${fetched} tokens fetched in two minutes`);
    t.diagnostic(`${ids.length} messages in ${Math.round((Date.now() - started) / 1000)} s; ${fetched} tokens fetched, ` +
      `${ent.put_tokens} put-tokens counted by sbemu, ${st.tokens_put} in sbpg.stats; connection ${conn.id} throughout`);
    assert.ok(!w.pg.serverLog().includes('"state":"disconnected"'), "no disconnection logged");
    await done("steady");
  });

  it("waits for a token while the endpoint is down at start, shows why, and consumes once it is back", async () => {
    await w.svc.faults({ down_ms: 600000 });
    await w.subscribe("late", "vm");
    const ids = await w.send("late", 5);
    const st = await waitFor(async () => {
      const s = await w.stats("late");
      return s?.state === "waiting_for_token" && s.token_error ? s : null;
    }, { what: "state waiting_for_token with token_error" });
    assert.match(st.token_error, /instance metadata endpoint/);
    assert.match(st.last_error, /^no token: /);
    assert.equal(await w.rowsFor(ids), 0);
    assert.equal((await w.emu.entity("late")).active, 5, "the messages wait on the broker");
    assert.match(w.pg.serverLog(), /"event":"token","subscription":"late".*token request failed \(attempt 1, retrying in \d+ ms\): the instance metadata endpoint/);
    const pid = st.pid;
    await w.svc.reset();
    await w.svc.ctl("POST", "/control/config", { lifetime: 10 });
    await waitFor(async () => (await w.rowsFor(ids)) === 5, { timeout: 60000, what: "5 rows after the endpoint came back" });
    const after = await w.stats("late");
    assert.equal(after.state, "connected");
    assert.equal(after.token_error, null);
    assert.equal(after.pid, pid, "recovered without a restart");
    assert.match(w.pg.serverLog(), /"subscription":"late".*token \d+ obtained from .* after \d+ failed attempts/);
    await done("late");
  });

  for (const status of [429, 500]) {
    it(`rides out ${status} answers from the token endpoint without losing a message`, async () => {
      const name = "throttled";
      if (status === 429) await w.subscribe(name, "vm");
      else await w.pg.psql(`SELECT sbpg.enable_subscription('${name}')`);
      await waitFor(async () => (await w.stats(name))?.state === "connected", { what: `${name} connected` });
      const pid = await pidOf(name);
      await w.svc.faults({ status, count: 100000 });
      const st = await waitFor(async () => {
        const s = await w.stats(name);
        return s?.token_error?.includes(`HTTP ${status}`) ? s : null;
      }, { what: `token_error with HTTP ${status}` });
      assert.match(st.token_error, new RegExp(`the instance metadata endpoint answered HTTP ${status}`));
      const ids = await w.send(name, 5);
      // Once the 10-second token runs out the broker detaches the link; the worker then waits.
      await waitFor(async () => (await w.stats(name)).state === "waiting_for_token", { what: "waiting_for_token" });
      await w.svc.reset();
      await w.svc.ctl("POST", "/control/config", { lifetime: 10 });
      await waitFor(async () => (await w.rowsFor(ids)) === 5, { timeout: 90000, what: "5 rows after the spell" });
      assert.equal(await pidOf(name), pid, "recovered without a restart");
      assert.match(w.pg.serverLog(), new RegExp(`"subscription":"${name}".*token request failed .*answered HTTP ${status}`));
      const inbox = await w.pg.query("SELECT count(*)::int c FROM sbpg.inbox WHERE subscription = $1 AND message_id = ANY($2)",
        [name, ids.map((i) => `m-${i}`)]);
      assert.equal(inbox.rows[0].c, 5, "each applied once");
      await done(name);
    });
  }

  it("asks again when the broker refuses a token with the wrong audience, and recovers when tokens are right", async () => {
    await w.svc.faults({ wrong_audience: 100000 });
    await w.subscribe("aud", "vm");
    const ids = await w.send("aud", 5);
    const st = await waitFor(async () => {
      const s = await w.stats("aud");
      return s?.last_error?.includes("refused (401") ? s : null;
    }, { what: "the refusal in stats" });
    assert.match(st.last_error, /put-token for sb:\/\/localhost:\d+\/aud was refused \(401 /);
    await waitFor(() => /"subscription":"aud".*the broker refused token 1 \(401 .*\); asking for a new one now/.test(w.pg.serverLog()),
      { what: "the refusal in the log" });
    assert.equal(await w.rowsFor(ids), 0);
    await w.svc.reset();
    await w.svc.ctl("POST", "/control/config", { lifetime: 10 });
    await waitFor(async () => (await w.rowsFor(ids)) === 5, { timeout: 120000, what: "5 rows once the audience is right" });
    await done("aud");
  });

  it("recovers when sbemu rejects put-tokens for a while", async () => {
    const refusedBefore = (await w.emu.ctl("GET", "/stats")).put_tokens_refused;
    await w.emu.fault("reject-tokens", { count: 3 });
    await w.subscribe("rejected", "vm");
    const ids = await w.send("rejected", 5);
    await waitFor(async () => (await w.rowsFor(ids)) === 5, { timeout: 120000, what: "5 rows after the rejections" });
    assert.equal((await w.emu.ctl("GET", "/stats")).put_tokens_refused - refusedBefore, 3);
    assert.match(w.pg.serverLog(), /"subscription":"rejected".*was refused \(401/);
    await done("rejected");
  });

  it("refuses a broker certificate no trusted CA signed, says so, and trusts it once sbpg.ca_file names the CA", async () => {
    await w.pg.psql(`ALTER SYSTEM SET sbpg.ca_file = '${w.ca.dir}/other-ca.pem'`);
    await w.pg.psql("SELECT pg_reload_conf()");
    await w.subscribe("tls", "vm");
    const ids = await w.send("tls", 3);
    const st = await waitFor(async () => {
      const s = await w.stats("tls");
      return s?.last_error && /certificate|SSL|TLS/i.test(s.last_error) ? s : null;
    }, { what: "a certificate error in stats" });
    assert.notEqual(st.state, "connected");
    assert.equal(await w.rowsFor(ids), 0);
    await w.pg.psql(`ALTER SYSTEM SET sbpg.ca_file = '${w.ca.ca}'`);
    await w.pg.psql("SELECT pg_reload_conf()");
    await waitFor(async () => (await w.rowsFor(ids)) === 3, { timeout: 60000, what: "3 rows with the right CA" });
    assert.match(w.pg.serverLog(), /sbpg\.ca_file changed; restarting to use it/);
  });
});
