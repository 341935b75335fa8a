// The token rules of docs/security.md ("Tokens"), each against a real worker, the emulator sbemu
// (which checks the JWTs with the test token service's keys) and tokensvc playing the instance
// metadata endpoint:
//   - no token fetch per connection attempt: a worker that reconnects many times fetches once while
//     its token is valid;
//   - a renewal the broker refuses keeps the connection: the links stay, the old token holds, and a
//     new token is put on the same connection;
//   - the worker connects only with a token that has a quarter of its life left (at most 30 s):
//     an older one is not used, a new one is fetched first;
//   - a connection whose put-token goes unanswered for 60 s is dropped.
// The evidence is the emulator's log (each put-token with its connection, time and the token's
// expiry; each refusal), its connection list, tokensvc's list of issued tokens, sbpg.stats and the
// rows applied. No assertion depends on how long something took.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { startTokensvc } from "../tokensvc/lib.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

// The JWT put-tokens sbemu accepted (its debug log), oldest first: { at, conn, entity, identity, expires }.
function acceptedJwts(emu, entity) {
  const out = [];
  const re = /^(\S+) sbemu DEBUG: connection (\d+): token for '([^']*)' accepted \((jwt:[^,]+), (?:[A-Za-z]+,?)+, expires (\S+)\)$/;
  for (const line of emu.log().split("\n")) {
    const m = re.exec(line);
    if (!m || !m[3].endsWith(`/${entity}`)) continue;
    out.push({ at: Date.parse(m[1]), conn: Number(m[2]), entity, identity: m[4], expires: Date.parse(m[5]) });
  }
  return out;
}

// The put-tokens sbemu refused for `entity`: { at, conn, why }.
function refusedPuts(emu, entity) {
  const out = [];
  const re = /^(\S+) sbemu INFO: connection (\d+): put-token for '([^']*)' \(jwt\) refused: (.*)$/;
  for (const line of emu.log().split("\n")) {
    const m = re.exec(line);
    if (m && m[3].endsWith(`/${entity}`)) out.push({ at: Date.parse(m[1]), conn: Number(m[2]), why: m[4] });
  }
  return out;
}

// The first put-token on each connection: the token the worker connected with.
function connectPuts(puts) {
  const seen = new Set();
  return puts.filter((p) => !seen.has(p.conn) && seen.add(p.conn));
}

// The sbemu connection that holds a receiver on `entity`.
async function receiverConnection(emu, entity) {
  return (await emu.connections()).find((c) => c.links.some((l) => l.address === entity && l.role === "receiver" && !l.closed));
}

describe("token rules (docs/security.md, Tokens)", () => {
  let svc, emu, pg, sb;
  let nextId = 1;
  const stats = async (name) => (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
  const subscribe = (name) =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${emu.amqp}', '${name}', 'apply_order(sbpg.message)', 'app', 'vm')`);
  const connected = (name) => waitFor(async () => ((await stats(name))?.state === "connected" ? stats(name) : null),
    { timeout: 60000, what: `${name} connected` });
  const send = async (entity, n) => {
    const ids = Array.from({ length: n }, () => nextId++);
    const s = sb.createSender(entity);
    await s.sendMessages(ids.map((id) => ({ messageId: `m-${id}`, body: { id, amount: 1 } })));
    await s.close();
    return ids;
  };
  const applied = async (ids) => Number((await pg.query("SELECT count(*) c FROM orders WHERE id = ANY($1)", [ids])).rows[0].c);
  // Tokens tokensvc issued to the workers (the instance metadata route).
  const issued = async () => (await svc.stats()).issued.filter((t) => t.kind === "imds");

  before(async () => {
    svc = await startTokensvc({ lifetime: 3600 });
    emu = await startSbemu({
      config: configWith({ queues: ["reconnects", "refused", "quarter", "unanswered"].map((n) => queue(n)) }),
      // A grace period longer than the worker's 60 s put-token time-out, so that the last test
      // sees the worker give up on an unanswered put-token before the broker closes the connection.
      args: ["--jwks", join(svc.dir, "jwks.json"), "--cbs-grace", "120"],
    });
    pg = await startCluster();
    await installOrders(pg);
    // The emulator is a plain broker: the identity lists it, or sbpg would not send it a token.
    await pg.psql(`SELECT sbpg.create_identity('vm', 'managed_identity', '{"source": "imds",
      "endpoint": "${svc.http}/metadata/identity/oauth2/token", "allowed_namespaces": ["${emu.amqp}"]}')`);
    sb = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 2, timeoutInMs: 20000 } });
  });
  after(async () => {
    await sb?.close();
    await pg?.stop();
    await emu?.stop();
    await svc?.stop();
  });

  it("fetches no token per connection attempt: reconnecting many times on a valid token fetches it once", async () => {
    await svc.config({ lifetime: 3600, refresh_in: null });
    const before = (await issued()).length;
    await subscribe("reconnects");
    const st0 = await connected("reconnects");
    assert.equal((await issued()).length, before + 1, "one token for the worker");
    // Five dropped connections, each followed by a reconnection.
    let reconnects = Number(st0.reconnects);
    for (let i = 0; i < 5; i++) {
      const conn = (await receiverConnection(emu, "reconnects")).id;
      await emu.fault("drop-connections");
      await waitFor(async () => {
        const s = await stats("reconnects");
        const c = await receiverConnection(emu, "reconnects");
        return Number(s.reconnects) > reconnects && s.state === "connected" && c && c.id !== conn;
      }, { timeout: 60000, what: `reconnection ${i + 1}` });
      reconnects = Number((await stats("reconnects")).reconnects);
    }
    // Then the broker refuses connections for a while: several failed attempts.
    await emu.fault("refuse-connections", { seconds: 3 });
    await emu.fault("drop-connections");
    await waitFor(async () => !(await emu.ctl("GET", "/stats")).refusing_connections, { what: "the listeners open again" });
    await connected("reconnects");
    const ids = await send("reconnects", 5);
    await waitFor(async () => (await applied(ids)) === 5, { timeout: 60000, what: "5 rows" });
    const st = await stats("reconnects");
    assert.ok(Number(st.reconnects) >= Number(st0.reconnects) + 6, `reconnects ${st0.reconnects} -> ${st.reconnects}`);
    assert.equal((await issued()).length, before + 1, "no token was fetched for any reconnection");
    const puts = connectPuts(acceptedJwts(emu, "reconnects"));
    assert.ok(puts.length >= 7, `${puts.length} connections put a token; sbemu logged: ` +
      emu.log().split("\n").filter((l) => l.includes("token for")).slice(-3).join(" | "));
    assert.equal(new Set(puts.map((p) => p.expires)).size, 1, "every connection was made with the one token");
    await pg.psql("SELECT sbpg.disable_subscription('reconnects')");
  });

  it("keeps the connection when the broker refuses a renewal: links stay, the old token holds, a new one is put", async () => {
    await svc.config({ lifetime: 20, refresh_in: null }); // renewed at about 10 s
    await subscribe("refused");
    await connected("refused");
    const conn = (await receiverConnection(emu, "refused")).id;
    const first = acceptedJwts(emu, "refused");
    assert.equal(first.length, 1, "one put-token so far");
    // The next put-token anywhere is refused: the worker's renewal (nothing else puts tokens now).
    await emu.fault("reject-tokens", { count: 1 });
    const refusal = await waitFor(() => refusedPuts(emu, "refused")[0], { timeout: 60000, what: "the renewal refused" });
    assert.equal(refusal.conn, conn, "the renewal was put on the live connection");
    assert.ok(refusal.at < first[0].expires, "it was refused while the first token still held");
    // A new token is fetched and put on the same connection.
    const renewed = await waitFor(() => acceptedJwts(emu, "refused").find((p) => p.at > refusal.at),
      { timeout: 60000, what: "a token accepted after the refusal" });
    assert.equal(renewed.conn, conn, "the new token went on the same connection");
    assert.ok(renewed.expires > first[0].expires, "a new token");
    assert.ok(renewed.at < first[0].expires, "before the old token expired: the links never lacked a token");
    const ids = await send("refused", 5);
    await waitFor(async () => (await applied(ids)) === 5, { timeout: 60000, what: "5 rows" });
    const st = await stats("refused");
    assert.equal(st.state, "connected");
    assert.equal(Number(st.reconnects), 0, "no reconnection");
    assert.equal((await receiverConnection(emu, "refused")).id, conn, "the same connection holds the receiver");
    const log = emu.log();
    assert.doesNotMatch(log, new RegExp(`connection ${conn}: token for \\S*refused expired; detaching`), "no link was detached");
    assert.doesNotMatch(log, new RegExp(`connection ${conn}: closing`), "the connection was not closed");
    await pg.psql("SELECT sbpg.disable_subscription('refused')");
  });

  it("connects only with a token that has a quarter of its life left, fetching a new one first", async () => {
    const life = 40; // a quarter: 10 s
    await svc.config({ lifetime: life, refresh_in: null });
    await subscribe("quarter");
    const st0 = await connected("quarter");
    const exp1 = new Date(st0.token_expires_at).getTime();
    // From now on every token request fails: the renewal at half-life does not come.
    await svc.faults({ route: "any", status: 500, count: 100000 });
    // Less than an eighth of the token's life left: then the connection drops.
    await waitFor(() => exp1 - Date.now() < (life * 1000) / 8, { timeout: 60000, interval: 100, what: "the token in its last eighth" });
    assert.equal(new Date((await stats("quarter")).token_expires_at).getTime(), exp1, "no renewal succeeded");
    const dropped = Date.now();
    await emu.fault("drop-connections");
    // The old token runs out; only then does the endpoint come back.
    await waitFor(() => Date.now() > exp1 + 1000, { timeout: 60000, interval: 100, what: "the old token expired" });
    await svc.reset();
    await svc.config({ lifetime: life, refresh_in: null });
    const ids = await send("quarter", 3);
    await waitFor(async () => (await applied(ids)) === 3, { timeout: 90000, what: "3 rows with a new token" });
    const puts = acceptedJwts(emu, "quarter");
    const late = puts.filter((p) => p.at >= dropped && p.expires === exp1);
    assert.deepEqual(late, [], "the old token was not used to connect after the drop");
    for (const p of connectPuts(puts)) {
      // tokensvc's exp is in whole seconds: allow a second of rounding.
      assert.ok(p.expires - p.at >= (life * 1000) / 4 - 1000,
        `connection ${p.conn} connected with a token ${p.expires - p.at} ms from expiry (a quarter of its life is ${(life * 1000) / 4} ms)`);
    }
    assert.ok(connectPuts(puts).some((p) => p.at > exp1), "the worker connected again, with the new token");
    await pg.psql("SELECT sbpg.disable_subscription('quarter')");
  });

  // The emulator takes a put-token and never answers it (fault hold-tokens): here the one on the
  // connection made after a drop (a renewal's is the same request on the same timer, but renewals
  // come no sooner than half a token's life). The worker's request time-out (60 s, before the
  // emulator's grace of 120 s) drops that connection, and it connects again with the token it holds.
  it("drops a connection whose put-token goes unanswered for 60 s, and reconnects", async () => {
    await svc.config({ lifetime: 3600, refresh_in: null });
    await subscribe("unanswered");
    const st0 = await connected("unanswered");
    const conn = (await receiverConnection(emu, "unanswered")).id;
    const fetched = (await issued()).length;
    await emu.fault("hold-tokens", { count: 1 });
    await emu.fault("drop-connections"); // the next connection's put-token goes unanswered
    const unanswered = /"subscription":"unanswered".*no answer to put-token for \S+ within 60 s/;
    await waitFor(() => unanswered.test(pg.serverLog()), { timeout: 120000, interval: 500, what: "the unanswered put-token given up" });
    assert.equal((await emu.ctl("GET", "/stats")).faults.hold_tokens, 0, "the emulator held one put-token");
    const st = await waitFor(async () => {
      const s = await stats("unanswered");
      const c = await receiverConnection(emu, "unanswered");
      return s.state === "connected" && Number(s.reconnects) >= Number(st0.reconnects) + 2 && c && c.id !== conn ? s : null;
    }, { timeout: 60000, interval: 500, what: "connected again after the unanswered put-token" });
    assert.equal(st.pid, st0.pid, "the same worker");
    assert.equal((await issued()).length, fetched, "no new token fetched: the held one was still good");
    const ids = await send("unanswered", 3);
    await waitFor(async () => (await applied(ids)) === 3, { timeout: 60000, what: "3 rows on the new connection" });
    await pg.psql("SELECT sbpg.disable_subscription('unanswered')");
  });
});
