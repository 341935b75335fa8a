// Sessions: a given session or the next available one, FIFO within a session, the session lock,
// session state, and the errors the SDK maps.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue, waitFor } from "./lib/sbemu.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 15000 };

describe("sessions", () => {
  let emu, client;
  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: [
          queue("sess", { RequiresSession: true }),
          queue("sess-next", { RequiresSession: true }),
          queue("sess-state", { RequiresSession: true }),
          queue("sess-none", { RequiresSession: true }),
          queue("sess-lock", { RequiresSession: true, LockDuration: "PT2S" }),
          queue("plain"),
        ],
      }),
    });
    client = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await client?.close();
    await emu?.stop();
  });

  it("refuses a message without a session id on a session queue", async () => {
    const sender = client.createSender("sess");
    await assert.rejects(sender.sendMessages({ body: "no session" }), (err) =>
      err.name === "ServiceBusError" && err.code === "GeneralError" &&
      /^InvalidOperationError: The SessionId was not set on a message, and it cannot be sent to the entity 'sess'/.test(err.message));
    await sender.close();
  });

  it("acceptSession receives only that session, in order", async () => {
    const sender = client.createSender("sess");
    const msgs = [];
    for (let i = 0; i < 4; i++) {
      msgs.push({ body: `a${i}`, sessionId: "A" });
      msgs.push({ body: `b${i}`, sessionId: "B" });
    }
    await sender.sendMessages(msgs);
    const a = await client.acceptSession("sess", "A");
    assert.equal(a.sessionId, "A");
    assert.ok(a.sessionLockedUntilUtc > new Date());
    const got = [];
    while (got.length < 4) got.push(...(await a.receiveMessages(4, { maxWaitTimeInMs: 2000 })));
    assert.deepEqual(got.map((m) => m.body), ["a0", "a1", "a2", "a3"]);
    assert.ok(got.every((m) => m.sessionId === "A"));
    for (const m of got) await a.completeMessage(m);
    // While A holds session A, another receiver cannot take it.
    await assert.rejects(client.acceptSession("sess", "A"), (err) => err.code === "SessionCannotBeLocked");
    await a.close();
    const b = await client.acceptSession("sess", "B");
    const gotB = await b.receiveMessages(4, { maxWaitTimeInMs: 2000 });
    assert.deepEqual(gotB.map((m) => m.body), ["b0", "b1", "b2", "b3"]);
    for (const m of gotB) await b.completeMessage(m);
    await b.close();
    await sender.close();
  });

  it("acceptNextSession takes the session with the oldest available message", async () => {
    const sender = client.createSender("sess-next");
    await sender.sendMessages([{ body: 1, sessionId: "first" }, { body: 2, sessionId: "second" }]);
    const r1 = await client.acceptNextSession("sess-next");
    assert.equal(r1.sessionId, "first");
    const r2 = await client.acceptNextSession("sess-next");
    assert.equal(r2.sessionId, "second");
    const [m2] = await r2.receiveMessages(1, { maxWaitTimeInMs: 2000 });
    assert.equal(m2.body, 2);
    await r2.completeMessage(m2);
    await Promise.all([r1.close(), r2.close(), sender.close()]);
  });

  it("acceptNextSession gives ServiceTimeout when no session is available", async () => {
    const shortClient = new ServiceBusClient(emu.connectionString(), { retryOptions: { maxRetries: 0, timeoutInMs: 1500 } });
    await assert.rejects(shortClient.acceptNextSession("sess-none"), (err) => err.code === "ServiceTimeout");
    await shortClient.close();
  });

  it("a waiting acceptNextSession gets a session that appears while it waits", async () => {
    const waiting = client.acceptNextSession("sess-none");
    await waitFor(async () => (await emu.connections()).some((c) => c.links.some((l) => l.address === "sess-none")), { what: "pending attach" });
    const sender = client.createSender("sess-none");
    await sender.sendMessages({ body: "arrives", sessionId: "late" });
    const r = await waiting;
    assert.equal(r.sessionId, "late");
    const [m] = await r.receiveMessages(1, { maxWaitTimeInMs: 2000 });
    await r.completeMessage(m);
    await Promise.all([r.close(), sender.close()]);
  });

  it("keeps session state", async () => {
    const sender = client.createSender("sess-state");
    await sender.sendMessages({ body: "x", sessionId: "S" });
    const r = await client.acceptSession("sess-state", "S");
    assert.equal(await r.getSessionState(), null);
    await r.setSessionState({ step: 3 });
    assert.deepEqual(await r.getSessionState(), { step: 3 });
    await r.close();
    const again = await client.acceptSession("sess-state", "S");
    assert.deepEqual(await again.getSessionState(), { step: 3 }, "state outlives the receiver");
    const [m] = await again.receiveMessages(1, { maxWaitTimeInMs: 2000 });
    await again.completeMessage(m);
    await again.setSessionState(null);
    await Promise.all([again.close(), sender.close()]);
  });

  it("renewSessionLock extends the session lock past its duration", async () => {
    const sender = client.createSender("sess-lock");
    await sender.sendMessages({ body: "held", sessionId: "L" });
    const r = await client.acceptSession("sess-lock", "L", { maxAutoLockRenewalDurationInMs: 0 });
    const [m] = await r.receiveMessages(1, { maxWaitTimeInMs: 2000 });
    const first = r.sessionLockedUntilUtc;
    for (let i = 0; i < 4; i++) {
      await new Promise((res) => setTimeout(res, 800));
      const until = await r.renewSessionLock();
      assert.ok(until > first);
    }
    await r.completeMessage(m);
    assert.equal((await emu.entity("sess-lock")).completed, 1);
    await Promise.all([r.close(), sender.close()]);
  });

  it("a session receiver on a queue without sessions is refused", async () => {
    // The SDK reports any refused session link as SessionCannotBeLocked; the emulator's log shows
    // it was refused for the reason under test, not a lock held elsewhere or a timeout.
    await assert.rejects(client.acceptSession("plain", "x"), (err) => err.name === "ServiceBusError" && err.code === "SessionCannotBeLocked");
    assert.match(emu.log(), /attach '[^']*' to 'plain' refused: amqp:not-allowed: Entity 'plain' does not require sessions/);
  });
});
