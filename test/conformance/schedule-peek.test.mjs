// Scheduled messages (send-time annotation and $management schedule/cancel) and peek.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue, waitFor } from "./lib/sbemu.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 15000 };

describe("schedule and peek", () => {
  let emu, client;
  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: ["sched", "cancel", "annot", "peek", "peek-empty"].map((n) => queue(n)),
        topics: [{ Name: "sched-topic", Properties: {}, Subscriptions: [{ Name: "a", Properties: {} }, { Name: "b", Properties: {} }] }],
      }),
    });
    client = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await client?.close();
    await emu?.stop();
  });

  it("scheduleMessages holds a message until its time, then delivers it", async () => {
    const sender = client.createSender("sched");
    const at = new Date(Date.now() + 1500);
    const [seq] = await sender.scheduleMessages({ body: "on time", messageId: "s-1" }, at);
    assert.ok(seq.toNumber() >= 1);
    let counts = await emu.entity("sched");
    assert.equal(counts.scheduled, 1);
    assert.equal(counts.active, 0);
    const [peeked] = await client.createReceiver("sched").peekMessages(1);
    assert.equal(peeked.state, "scheduled");
    assert.equal(peeked.scheduledEnqueueTimeUtc.getTime(), at.getTime());
    await waitFor(async () => (await emu.entity("sched")).active === 1, { what: "activation" });
    const receiver = client.createReceiver("sched");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.equal(m.messageId, "s-1");
    assert.ok(Date.now() >= at.getTime(), "not delivered before its time");
    await receiver.completeMessage(m);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("cancelScheduledMessages removes a scheduled message", async () => {
    const sender = client.createSender("cancel");
    const seqs = await sender.scheduleMessages([{ body: 1 }, { body: 2 }], new Date(Date.now() + 3600_000));
    assert.equal(seqs.length, 2);
    assert.equal((await emu.entity("cancel")).scheduled, 2);
    await sender.cancelScheduledMessages(seqs[0]);
    const counts = await emu.entity("cancel");
    assert.equal(counts.scheduled, 1);
    assert.equal(counts.cancelled, 1);
    await assert.rejects(sender.cancelScheduledMessages(seqs[0]), (err) => err.code === "MessageNotFound");
    await sender.close();
  });

  it("a send with scheduledEnqueueTimeUtc is scheduled too", async () => {
    const sender = client.createSender("annot");
    await sender.sendMessages({ body: "later", scheduledEnqueueTimeUtc: new Date(Date.now() + 3600_000) });
    const counts = await emu.entity("annot");
    assert.equal(counts.scheduled, 1);
    assert.equal(counts.active, 0);
    await sender.close();
  });

  it("scheduling on a topic reaches every subscription and cancelling removes it everywhere", async () => {
    const sender = client.createSender("sched-topic");
    const [seq] = await sender.scheduleMessages({ body: "fan" }, new Date(Date.now() + 3600_000));
    assert.equal((await emu.entity("sched-topic/Subscriptions/a")).scheduled, 1);
    assert.equal((await emu.entity("sched-topic/Subscriptions/b")).scheduled, 1);
    await sender.cancelScheduledMessages(seq);
    assert.equal((await emu.entity("sched-topic/Subscriptions/a")).scheduled, 0);
    assert.equal((await emu.entity("sched-topic/Subscriptions/b")).scheduled, 0);
    await sender.close();
  });

  it("peekMessages browses without locking, from a sequence number", async () => {
    const sender = client.createSender("peek");
    await sender.sendMessages(Array.from({ length: 5 }, (_, i) => ({ body: i, messageId: `p-${i}` })));
    const receiver = client.createReceiver("peek");
    const peeked = await receiver.peekMessages(3);
    assert.deepEqual(peeked.map((m) => m.body), [0, 1, 2]);
    assert.equal(peeked[0].lockToken, undefined);
    const next = await receiver.peekMessages(10);
    assert.deepEqual(next.map((m) => m.body), [3, 4], "the next peek continues after the last one");
    const from = await receiver.peekMessages(2, { fromSequenceNumber: peeked[1].sequenceNumber });
    assert.deepEqual(from.map((m) => m.body), [1, 2]);
    const counts = await emu.entity("peek");
    assert.equal(counts.locked, 0);
    assert.equal(counts.active, 5);
    // A locked message still shows in peek, its delivery count unchanged by peeking.
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    const again = await receiver.peekMessages(1, { fromSequenceNumber: m.sequenceNumber });
    assert.equal(again[0].messageId, m.messageId);
    assert.equal(again[0].deliveryCount, 0);
    await receiver.completeMessage(m);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("peek on an empty queue returns nothing", async () => {
    const receiver = client.createReceiver("peek-empty");
    assert.deepEqual(await receiver.peekMessages(5), []);
    await receiver.close();
  });
});
