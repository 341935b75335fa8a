// Topics: fan-out to subscriptions through correlation and SQL filters, subscription DLQs and
// duplicate detection.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "./lib/sbemu.mjs";

const retryOptions = { maxRetries: 0, timeoutInMs: 15000 };

const corr = (name, filter) => ({ Name: name, Properties: { FilterType: "Correlation", CorrelationFilter: filter } });
const sql = (name, expr) => ({ Name: name, Properties: { FilterType: "Sql", SqlFilter: { SqlExpression: expr } } });

describe("topics and duplicate detection", () => {
  let emu, client;
  before(async () => {
    emu = await startSbemu({
      config: configWith({
        queues: [queue("dedup", { RequiresDuplicateDetection: true, DuplicateDetectionHistoryTimeWindow: "PT1M" })],
        topics: [
          {
            Name: "orders",
            Properties: { DefaultMessageTimeToLive: "PT1H" },
            Subscriptions: [
              { Name: "all", Properties: { MaxDeliveryCount: 2 } },
              { Name: "eu", Properties: {}, Rules: [corr("region-eu", { Properties: { region: "eu" } })] },
              { Name: "priority", Properties: {}, Rules: [corr("label", { Label: "priority" })] },
              { Name: "big", Properties: {}, Rules: [sql("big-orders", "amount > 100 AND sys.Label <> 'test'")] },
              {
                Name: "either",
                Properties: {},
                Rules: [corr("by-corr", { CorrelationId: "c-1" }), sql("by-sql", "region IN ('us', 'apac') OR EXISTS(vip)")],
              },
            ],
          },
          {
            Name: "dedup-topic",
            Properties: { RequiresDuplicateDetection: true, DuplicateDetectionHistoryTimeWindow: "PT1M" },
            Subscriptions: [{ Name: "s", Properties: {} }],
          },
        ],
      }),
    });
    client = new ServiceBusClient(emu.connectionString(), { retryOptions });
  });
  after(async () => {
    await client?.close();
    await emu?.stop();
  });

  const ids = async (sub) => (await emu.messages(`orders/Subscriptions/${sub}`)).map((m) => m.message_id).sort();

  it("fans out to every subscription whose rules match", async () => {
    const sender = client.createSender("orders");
    await sender.sendMessages([
      { messageId: "o1", body: 1, applicationProperties: { region: "eu", amount: 50 } },
      { messageId: "o2", body: 2, subject: "priority", applicationProperties: { region: "us", amount: 500 } },
      { messageId: "o3", body: 3, subject: "test", applicationProperties: { region: "apac", amount: 999 } },
      { messageId: "o4", body: 4, correlationId: "c-1", applicationProperties: { amount: 101 } },
      { messageId: "o5", body: 5, applicationProperties: { vip: true } },
    ]);
    assert.deepEqual(await ids("all"), ["o1", "o2", "o3", "o4", "o5"]);
    assert.deepEqual(await ids("eu"), ["o1"]);
    assert.deepEqual(await ids("priority"), ["o2"]);
    // o4 has no label: a comparison with NULL is unknown, so the AND is not true (SQL three-valued logic).
    assert.deepEqual(await ids("big"), ["o2"]);
    assert.deepEqual(await ids("either"), ["o2", "o3", "o4", "o5"]);
    // Subscriptions share the topic's sequence number.
    const seqAll = (await emu.messages("orders/Subscriptions/all")).find((m) => m.message_id === "o1").sequence_number;
    const seqEu = (await emu.messages("orders/Subscriptions/eu")).find((m) => m.message_id === "o1").sequence_number;
    assert.equal(seqAll, seqEu);
    await sender.close();
  });

  it("receives from a subscription and dead-letters into its own DLQ", async () => {
    const receiver = client.createReceiver("orders", "eu");
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 3000 });
    assert.equal(m.messageId, "o1");
    await receiver.deadLetterMessage(m, { deadLetterReason: "NotForUs", deadLetterErrorDescription: "wrong region" });
    const dlq = client.createReceiver("orders", "eu", { subQueueType: "deadLetter" });
    const [d] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 3000 });
    assert.equal(d.deadLetterReason, "NotForUs");
    assert.equal(d.deadLetterSource, "orders/Subscriptions/eu");
    await dlq.completeMessage(d);
    assert.equal((await emu.entity("orders/Subscriptions/all")).messages, 5, "other subscriptions keep their copies");
    await Promise.all([receiver.close(), dlq.close()]);
  });

  it("refuses to receive from a topic itself", async () => {
    const r = client.createReceiver("orders");
    await assert.rejects(r.receiveMessages(1, { maxWaitTimeInMs: 1000 }), (err) =>
      err.name === "ServiceBusError" && err.code === "GeneralError" &&
      /^InvalidOperationError: Cannot receive from topic 'orders': receive from one of its subscriptions/.test(err.message));
    await r.close();
  });

  it("drops a duplicate message-id within the detection window on a queue", async () => {
    const sender = client.createSender("dedup");
    await sender.sendMessages({ messageId: "same", body: 1 });
    await sender.sendMessages({ messageId: "same", body: 2 });
    await sender.sendMessages({ messageId: "other", body: 3 });
    const counts = await emu.entity("dedup");
    assert.equal(counts.duplicates, 1);
    assert.equal(counts.active, 2);
    const receiver = client.createReceiver("dedup", { receiveMode: "receiveAndDelete" });
    const got = await receiver.receiveMessages(5, { maxWaitTimeInMs: 1500 });
    assert.deepEqual(got.map((m) => m.body), [1, 3]);
    await Promise.all([receiver.close(), sender.close()]);
  });

  it("detects duplicates on a topic before fan-out", async () => {
    const sender = client.createSender("dedup-topic");
    await sender.sendMessages([{ messageId: "d", body: 1 }]);
    await sender.sendMessages([{ messageId: "d", body: 1 }]);
    assert.equal((await emu.entity("dedup-topic")).duplicates, 1);
    assert.equal((await emu.entity("dedup-topic/Subscriptions/s")).active, 1);
    await sender.close();
  });
});
