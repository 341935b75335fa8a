// Settlement as Service Bus does it: complete, abandon (delivery count + 1), dead-letter with a
// reason read back from the DLQ, MaxDeliveryCount, defer and receiveDeferredMessages, lock
// renewal past the lock duration, MessageLockLost after expiry, TTL expiry, forwarding of
// dead-lettered messages, and locks released when a receiver goes away.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue, waitFor, sleep } from "./lib/sbemu.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 15000 };

describe("settlement", () => {
  let emu, client;
  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: [
          queue("abandon", { MaxDeliveryCount: 3 }),
          queue("deadletter"),
          queue("modify"),
          queue("defer"),
          queue("renew", { LockDuration: "PT2S" }),
          queue("expire", { LockDuration: "PT1S", MaxDeliveryCount: 5 }),
          queue("lostfault"),
          queue("ttl", { DefaultMessageTimeToLive: "PT1S", DeadLetteringOnMessageExpiration: true }),
          queue("ttl-drop", { DefaultMessageTimeToLive: "PT1S" }),
          queue("fwd", { ForwardDeadLetteredMessagesTo: "fwd-target", MaxDeliveryCount: 1 }),
          queue("fwd-target"),
          queue("release"),
        ],
      }),
    });
    client = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await client?.close();
    await emu?.stop();
  });

  it("abandon returns the message with delivery count + 1 and MaxDeliveryCount dead-letters it", async () => {
    const sender = client.createSender("abandon");
    await sender.sendMessages({ body: "again", messageId: "ab-1" });
    const receiver = client.createReceiver("abandon");
    for (let attempt = 0; attempt < 3; attempt++) {
      const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
      assert.equal(m.deliveryCount, attempt, `delivery ${attempt + 1} shows ${attempt} earlier attempts`);
      await receiver.abandonMessage(m);
    }
    assert.equal((await emu.entity("abandon")).messages, 0);
    const dlq = client.createReceiver("abandon", { subQueueType: "deadLetter" });
    const [d] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(d.messageId, "ab-1");
    assert.equal(d.deadLetterReason, "MaxDeliveryCountExceeded");
    assert.match(d.deadLetterErrorDescription, /3 delivery attempts/);
    assert.equal(d.deadLetterSource, "abandon");
    await dlq.completeMessage(d);
    await Promise.all([receiver.close(), dlq.close(), sender.close()]);
  });

  it("dead-letters with a reason and description that the DLQ reader sees", async () => {
    const sender = client.createSender("deadletter");
    await sender.sendMessages({ body: { bad: true }, messageId: "dl-1", applicationProperties: { keep: "me" } });
    const receiver = client.createReceiver("deadletter");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    await receiver.deadLetterMessage(m, { deadLetterReason: "SchemaViolation", deadLetterErrorDescription: "amount must be a number" });
    const dl = await emu.entity("deadletter");
    assert.equal(dl.dead_lettered, 1);
    assert.equal(dl.messages, 0);
    const dlq = client.createReceiver("deadletter", { subQueueType: "deadLetter" });
    const [d] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.deepEqual(d.body, { bad: true });
    assert.equal(d.deadLetterReason, "SchemaViolation");
    assert.equal(d.deadLetterErrorDescription, "amount must be a number");
    assert.equal(d.applicationProperties.keep, "me");
    await dlq.completeMessage(d);
    await Promise.all([receiver.close(), dlq.close(), sender.close()]);
  });

  it("abandon applies properties to modify", async () => {
    const sender = client.createSender("modify");
    await sender.sendMessages({ body: 1, applicationProperties: { tries: 0 } });
    const receiver = client.createReceiver("modify");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    await receiver.abandonMessage(m, { tries: 1, lastError: "deadlock" });
    const [again] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.deepEqual(again.applicationProperties, { tries: 1, lastError: "deadlock" });
    assert.equal(again.deliveryCount, 1);
    await receiver.completeMessage(again);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("defers a message and receives it by sequence number", async () => {
    const sender = client.createSender("defer");
    await sender.sendMessages([{ body: "later", messageId: "df-1" }, { body: "now", messageId: "df-2" }]);
    const receiver = client.createReceiver("defer");
    const [first] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(first.body, "later");
    const seq = first.sequenceNumber;
    await receiver.deferMessage(first);
    assert.equal((await emu.entity("defer")).deferred, 1);
    const [second] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(second.body, "now", "a deferred message is not delivered again on the link");
    await receiver.completeMessage(second);
    const [deferred] = await receiver.receiveDeferredMessages([seq]);
    assert.equal(deferred.body, "later");
    assert.equal(deferred.state, "deferred");
    await receiver.completeMessage(deferred);
    const counts = await emu.entity("defer");
    assert.equal(counts.messages, 0);
    assert.equal(counts.completed, 2);
    await assert.rejects(receiver.receiveDeferredMessages([seq]), (err) => err.code === "MessageNotFound");
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("renewMessageLock keeps a message past its lock duration", async () => {
    const sender = client.createSender("renew");
    await sender.sendMessages({ body: "long job" });
    const receiver = client.createReceiver("renew", { maxAutoLockRenewalDurationInMs: 0 });
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    const firstUntil = m.lockedUntilUtc;
    // Hold the message for more than twice the 2 s lock, renewing it twice a lock period.
    for (let i = 0; i < 6; i++) {
      await sleep(800);
      const until = await receiver.renewMessageLock(m);
      assert.ok(until > firstUntil, "the lock moves forward");
    }
    await receiver.completeMessage(m);
    const counts = await emu.entity("renew");
    assert.equal(counts.completed, 1);
    assert.equal(counts.lock_expired, 0);
    assert.ok(counts.lock_renewals >= 6);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("settling after the lock expired gives MessageLockLost and the message comes back", async () => {
    const sender = client.createSender("expire");
    await sender.sendMessages({ body: "slow" });
    const receiver = client.createReceiver("expire", { maxAutoLockRenewalDurationInMs: 0 });
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    await waitFor(async () => (await emu.entity("expire")).lock_expired === 1, { what: "lock expiry" });
    await assert.rejects(receiver.completeMessage(m), (err) => err.code === "MessageLockLost");
    const [again] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(again.body, "slow");
    assert.equal(again.deliveryCount, 1);
    await receiver.completeMessage(again);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("the expire-locks fault makes the lock lost for every settlement kind", async () => {
    const sender = client.createSender("lostfault");
    await sender.sendMessages([1, 2, 3, 4].map((body) => ({ body })));
    const receiver = client.createReceiver("lostfault", { maxAutoLockRenewalDurationInMs: 0 });
    const got = [];
    while (got.length < 4) got.push(...(await receiver.receiveMessages(4 - got.length, { maxWaitTimeInMs: 3000 })));
    await emu.fault("expire-locks");
    const isLost = (err) => err.code === "MessageLockLost";
    await assert.rejects(receiver.completeMessage(got[0]), isLost);
    await assert.rejects(receiver.abandonMessage(got[1]), isLost);
    await assert.rejects(receiver.deferMessage(got[2]), isLost);
    await assert.rejects(receiver.deadLetterMessage(got[3]), isLost);
    await assert.rejects(receiver.renewMessageLock(got[0]), isLost);
    const counts = await emu.entity("lostfault");
    assert.equal(counts.active, 4, "all four are available again");
    assert.equal(counts.lock_lost, 5);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("time-to-live expiry dead-letters with TTLExpiredException when configured", async () => {
    const sender = client.createSender("ttl");
    await sender.sendMessages({ body: "stale", messageId: "ttl-1" });
    await waitFor(async () => (await emu.entity("ttl")).dead_lettered === 1, { what: "TTL dead-lettering" });
    const dlq = client.createReceiver("ttl", { subQueueType: "deadLetter" });
    const [d] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(d.messageId, "ttl-1");
    assert.equal(d.deadLetterReason, "TTLExpiredException");
    await dlq.completeMessage(d);
    await Promise.all([dlq.close(), sender.close()]);
  });

  it("time-to-live expiry drops the message when dead-lettering on expiry is off", async () => {
    const sender = client.createSender("ttl-drop");
    await sender.sendMessages({ body: "stale" });
    await waitFor(async () => (await emu.entity("ttl-drop")).expired === 1, { what: "expiry" });
    const counts = await emu.entity("ttl-drop");
    assert.equal(counts.messages, 0);
    assert.equal(counts.dead_lettered, 0);
    await sender.close();
  });

  it("forwards dead-lettered messages to ForwardDeadLetteredMessagesTo", async () => {
    const sender = client.createSender("fwd");
    await sender.sendMessages({ body: "to forward", messageId: "fw-1" });
    const receiver = client.createReceiver("fwd");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    await receiver.abandonMessage(m);
    const target = client.createReceiver("fwd-target");
    const [f] = await target.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(f.messageId, "fw-1");
    assert.equal(f.applicationProperties.DeadLetterReason, "MaxDeliveryCountExceeded");
    assert.equal((await emu.entity("fwd/$DeadLetterQueue")).messages, 0);
    await target.completeMessage(f);
    await Promise.all([receiver.close(), target.close(), sender.close()]);
  });

  it("closing a receiver releases its locks with delivery count + 1", async () => {
    const sender = client.createSender("release");
    await sender.sendMessages({ body: "held" });
    const receiver = client.createReceiver("release");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(m.deliveryCount, 0);
    await receiver.close();
    await waitFor(async () => (await emu.entity("release")).active === 1, { what: "release on detach" });
    const other = client.createReceiver("release");
    const [again] = await other.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(again.deliveryCount, 1);
    await other.completeMessage(again);
    await Promise.all([other.close(), sender.close()]);
  });
});
