// bench/lib.mjs: what the Node drivers of the benchmarks share.
//   bulkSender(amqp, queue, idPrefix)  the official JS SDK sending the bench's order bodies to sbemu in
//                                      batches of 500, at most 4 in flight; send(count) adds count
//                                      messages (ids idPrefix0, idPrefix1, ...), sent() says how many
//   activeMessages(control, queue)     how many messages sbemu holds available on the queue now
import { ServiceBusClient } from "@azure/service-bus";

const SEND_CHUNK = 500;

// sessions: spread the messages round robin over that many session ids (s0, s1, ...), for a
// queue that requires sessions; 0 (the default): none.
export function bulkSender(amqp, queue, idPrefix, sessions = 0) {
  const sb = new ServiceBusClient(
    `Endpoint=sb://${amqp.replace("amqp://", "")};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`,
    { retryOptions: { maxRetries: 3 } });
  const sender = sb.createSender(queue);
  const body = (i) => ({ id: i, customer: `c${i % 50}`, amount: (i % 90) + 1, note: "x".repeat(60) });
  let nextId = 0; // ids (and message ids) of messages sent so far
  return {
    async send(count) {
      const calls = [];
      for (let k = 0; k < count; k += SEND_CHUNK) {
        const n = Math.min(SEND_CHUNK, count - k);
        const first = nextId;
        nextId += n;
        calls.push(sender.sendMessages(Array.from({ length: n }, (_, j) => ({
          messageId: `${idPrefix}${first + j}`,
          body: body(first + j),
          ...(sessions ? { sessionId: `s${(first + j) % sessions}` } : {}),
        }))));
        if (calls.length === 4) await Promise.all(calls.splice(0)); // at most 4 batches in flight
      }
      await Promise.all(calls);
    },
    sent: () => nextId,
    async close() {
      await sender.close();
      await sb.close();
    },
  };
}

export async function activeMessages(control, queue) {
  const r = await fetch(`${control}/entities/${encodeURIComponent(queue)}`);
  if (!r.ok) throw new Error(`sbemu GET /entities/${queue}: ${r.status}`);
  return (await r.json()).active;
}
