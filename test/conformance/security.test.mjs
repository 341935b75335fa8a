// Claims-based security: SAS keys with rights, Entra ID style JWTs (audience, expiry, signature),
// SAS and JWT side by side, and no secret in sbemu's log.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue, defaultKey } from "./lib/sbemu.mjs";
import { makeSigningKey, signJwt, staticCredential } from "./lib/jwt.mjs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const retryOptions = { maxRetries: 0, timeoutInMs: 10000 };
const listenKey = { name: "listen-only", key: "listen-secret-7c1f" };
const sendKey = { name: "send-only", key: "send-secret-91ab" };

describe("security", () => {
  let emu, client, key, otherKey, jwksKey;
  before(async () => {
    const dir = mkdtempSync(join(tmpdir(), "sbemu-keys-"));
    key = makeSigningKey(dir, "main");
    otherKey = makeSigningKey(dir, "other"); // not configured in sbemu
    jwksKey = makeSigningKey(dir, "rotated");
    emu = await startSbemu({
      config: configWith({ queues: ["secure", "mixed", "jwks", "rights"].map((n) => queue(n)) }),
      args: [
        "--sas-key", `${defaultKey.name}=${defaultKey.key}`,
        "--sas-key", `${listenKey.name}=${listenKey.key}:Listen`,
        "--sas-key", `${sendKey.name}=${sendKey.key}:Send`,
        "--jwt-public-key", key.pubPath,
        "--jwks", jwksKey.jwksPath,
      ],
    });
    client = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await client?.close();
    await emu?.stop();
  });

  const jwtClient = (token) => new ServiceBusClient(emu.credentialHost(), staticCredential(token), { retryOptions });

  it("refuses a wrong SAS key", async () => {
    const bad = new ServiceBusClient(emu.connectionString({ name: defaultKey.name, key: "wrong-key" }), { retryOptions });
    await assert.rejects(bad.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    const unknown = new ServiceBusClient(emu.connectionString({ name: "nobody", key: "x" }), { retryOptions });
    await assert.rejects(unknown.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await Promise.all([bad.close(), unknown.close()]);
    assert.equal((await emu.entity("secure")).messages, 0);
  });

  it("enforces the rights of a SAS key: Listen cannot send, Send cannot receive", async () => {
    const listen = new ServiceBusClient(emu.connectionString(listenKey), { retryOptions });
    const send = new ServiceBusClient(emu.connectionString(sendKey), { retryOptions });
    await assert.rejects(listen.createSender("rights").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await send.createSender("rights").sendMessages({ body: "ok" });
    await assert.rejects(send.createReceiver("rights").receiveMessages(1, { maxWaitTimeInMs: 1000 }), (err) => err.code === "UnauthorizedAccess");
    const [m] = await listen.createReceiver("rights").receiveMessages(1, { maxWaitTimeInMs: 3000 });
    assert.equal(m.body, "ok");
    await Promise.all([listen.close(), send.close()]);
  });

  it("accepts a valid JWT for sending and receiving, asking for the Service Bus scope", async () => {
    const cred = staticCredential(signJwt(key));
    const c = new ServiceBusClient(emu.credentialHost(), cred, { retryOptions });
    await c.createSender("secure").sendMessages({ body: "via jwt" });
    const r = c.createReceiver("secure");
    const [m] = await r.receiveMessages(1, { maxWaitTimeInMs: 3000 });
    assert.equal(m.body, "via jwt");
    await r.completeMessage(m);
    assert.ok(cred.calls.length > 0);
    assert.match(String(cred.calls[0]), /^https:\/\/servicebus\.azure\.net\/+\.default$/);
    const conns = await emu.connections();
    assert.ok(conns.some((cn) => cn.tokens.some((t) => t.type === "jwt" && t.identity.startsWith("jwt:"))));
    await c.close();
  });

  it("accepts the audience with a trailing slash", async () => {
    const c = jwtClient(signJwt(key, { aud: "https://servicebus.azure.net/" }));
    await c.createSender("secure").sendMessages({ body: 1 });
    await c.close();
    await client.createReceiver("secure", { receiveMode: "receiveAndDelete" }).receiveMessages(1, { maxWaitTimeInMs: 2000 });
  });

  it("refuses a JWT with the wrong audience", async () => {
    const c = jwtClient(signJwt(key, { aud: "https://storage.azure.com" }));
    await assert.rejects(c.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await c.close();
  });

  it("refuses an expired JWT and one not yet valid", async () => {
    const now = Math.floor(Date.now() / 1000);
    const expired = jwtClient(signJwt(key, { exp: now - 10, nbf: now - 3600 }));
    await assert.rejects(expired.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    const early = jwtClient(signJwt(key, { nbf: now + 600 }));
    await assert.rejects(early.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await Promise.all([expired.close(), early.close()]);
  });

  it("refuses a JWT signed by a key it does not know, and a tampered one", async () => {
    const stranger = jwtClient(signJwt(otherKey));
    await assert.rejects(stranger.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    const good = signJwt(key);
    const [h, p, s] = good.split(".");
    const claims = JSON.parse(Buffer.from(p, "base64url"));
    claims.oid = "someone-else";
    const tampered = jwtClient(`${h}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.${s}`);
    await assert.rejects(tampered.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await Promise.all([stranger.close(), tampered.close()]);
  });

  it("accepts a JWT signed by a key from a JWKS file", async () => {
    const c = jwtClient(signJwt(jwksKey, {}, { kid: jwksKey.kid }));
    await c.createSender("jwks").sendMessages({ body: "jwks" });
    assert.equal((await emu.entity("jwks")).active, 1);
    await c.close();
  });

  it("lets a SAS sender and a JWT consumer work side by side", async () => {
    await client.createSender("mixed").sendMessages({ body: "from sas" });
    const c = jwtClient(signJwt(key));
    const r = c.createReceiver("mixed");
    const [m] = await r.receiveMessages(1, { maxWaitTimeInMs: 3000 });
    assert.equal(m.body, "from sas");
    await r.completeMessage(m);
    await c.close();
  });

  it("refuses the next tokens when the reject-tokens fault is on", async () => {
    await emu.fault("reject-tokens", { count: 1 });
    const c = new ServiceBusClient(emu.connectionString(), { retryOptions });
    await assert.rejects(c.createSender("secure").sendMessages({ body: 1 }), (err) => err.code === "UnauthorizedAccess");
    await c.createSender("secure").sendMessages({ body: 2 });
    await c.close();
  });

  it("never writes a key or token to its log", async () => {
    const log = emu.log();
    assert.ok(log.includes("token for"), "the log has token lines to check");
    for (const secret of [defaultKey.key, listenKey.key, sendKey.key, "SharedAccessSignature", "sig="]) {
      assert.ok(!log.includes(secret), `log contains ${secret}`);
    }
    assert.ok(!/eyJ[A-Za-z0-9_-]{10,}\./.test(log), "log contains a JWT");
    const conns = JSON.stringify(await emu.connections());
    assert.ok(!conns.includes("eyJ") && !conns.includes("sig="), "control interface shows no token");
  });
});
