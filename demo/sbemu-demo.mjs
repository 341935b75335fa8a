// demo/sbemu-demo.mjs: drives sbemu with the official Azure SDK for JavaScript, as an application
// would drive Azure Service Bus. Started by demo/run with: HOST:PORT CONTROL_URL JWT_PRIVATE_KEY.
import { ServiceBusClient } from "@azure/service-bus";
import { createPrivateKey, createSign } from "node:crypto";
import { readFileSync } from "node:fs";

const [hostPort, control, keyFile] = process.argv.slice(2);
const say = (s = "") => console.log(s);
const step = (n, s) => say(`\n${n}. ${s}`);
const counts = async (path) => (await fetch(`${control}/entities/${encodeURIComponent(path)}`)).json();

const connectionString =
  `Endpoint=sb://${hostPort};SharedAccessKeyName=RootManageSharedAccessKey;` +
  `SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`;
const client = new ServiceBusClient(connectionString, { retryOptions: { maxRetries: 0, timeoutInMs: 10000 } });

say(`sbemu is serving namespace sbemulatorns on amqp://${hostPort} (control interface ${control})`);
say(`connection string: ${connectionString.replace("SAS_KEY_VALUE", "<key>")}`);

step(1, "send three orders to queue.1 (one single send, one batch)");
const sender = client.createSender("queue.1");
await sender.sendMessages({ messageId: "order-1", body: { order: 1, amount: 25 }, contentType: "application/json" });
const batch = await sender.createMessageBatch();
batch.tryAddMessage({ messageId: "order-2", body: { order: 2, amount: 90 }, contentType: "application/json" });
batch.tryAddMessage({ messageId: "order-3", body: "not json at all", contentType: "text/plain" });
await sender.sendMessages(batch);
say(`   queue.1: ${(await counts("queue.1")).active} active messages`);

step(2, "receive them in peek-lock mode; complete the good ones, dead-letter the bad one");
const receiver = client.createReceiver("queue.1");
let got = [];
while (got.length < 3) got.push(...(await receiver.receiveMessages(3 - got.length, { maxWaitTimeInMs: 3000 })));
for (const m of got) {
  const lock = `lock ${m.lockToken.slice(0, 8)}…, locked until ${m.lockedUntilUtc.toISOString()}`;
  if (typeof m.body === "object") {
    await receiver.completeMessage(m);
    say(`   ${m.messageId}: seq ${m.sequenceNumber}, ${lock} -> completed`);
  } else {
    await receiver.deadLetterMessage(m, { deadLetterReason: "InvalidJson", deadLetterErrorDescription: "body is not JSON" });
    say(`   ${m.messageId}: seq ${m.sequenceNumber}, ${lock} -> dead-lettered`);
  }
}

step(3, "read the dead-letter queue");
const dlq = client.createReceiver("queue.1", { subQueueType: "deadLetter" });
const [dead] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 3000 });
say(`   ${dead.messageId}: reason ${dead.deadLetterReason} (${dead.deadLetterErrorDescription}), from ${dead.deadLetterSource}`);
await dlq.completeMessage(dead);

step(4, "abandon a message until MaxDeliveryCount (3 in Config.json) moves it to the DLQ");
await sender.sendMessages({ messageId: "poison", body: { poison: true } });
for (let i = 0; i < 3; i++) {
  const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 3000 });
  say(`   delivery ${i + 1}: deliveryCount ${m.deliveryCount}, abandoned`);
  await receiver.abandonMessage(m);
}
const [poison] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 3000 });
say(`   DLQ: ${poison.messageId}, reason ${poison.deadLetterReason}`);
await dlq.completeMessage(poison);

step(5, "publish to topic.1; subscriptions filter by their rules");
const topic = client.createSender("topic.1");
await topic.sendMessages([
  { messageId: "evt-1", body: "for everyone" },
  { messageId: "evt-2", body: "has prop3", applicationProperties: { prop3: "value3" } },
]);
for (const sub of ["subscription.1", "subscription.2", "subscription.3"]) {
  const c = await counts(`topic.1/Subscriptions/${sub}`);
  say(`   ${sub}: ${c.active} message(s)`);
}

step(6, "authenticate with an Entra ID token (a JWT signed by a key sbemu was given), no shared key");
const key = createPrivateKey(readFileSync(keyFile));
const jwt = (claims) => {
  const now = Math.floor(Date.now() / 1000);
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const data = `${enc({ alg: "RS256", typ: "JWT" })}.${enc({ aud: "https://servicebus.azure.net", oid: "demo-app", nbf: now - 5, exp: now + 600, ...claims })}`;
  return `${data}.${createSign("RSA-SHA256").update(data).sign(key).toString("base64url")}`;
};
const credential = (token) => ({ getToken: async () => ({ token, expiresOnTimestamp: Date.now() + 600_000 }) });
const host = `${hostPort};UseDevelopmentEmulator=true;Endpoint=sb://${hostPort}/`;
const entra = new ServiceBusClient(host, credential(jwt({})), { retryOptions: { maxRetries: 0 } });
await entra.createSender("queue.1").sendMessages({ body: "sent with a JWT" });
const [viaJwt] = await entra.createReceiver("queue.1", { receiveMode: "receiveAndDelete" }).receiveMessages(1, { maxWaitTimeInMs: 3000 });
say(`   token accepted: sent and received "${viaJwt.body}"`);
const wrong = new ServiceBusClient(host, credential(jwt({ aud: "https://storage.azure.com" })), { retryOptions: { maxRetries: 0 } });
try {
  await wrong.createSender("queue.1").sendMessages({ body: "nope" });
  say("   UNEXPECTED: a token for another audience was accepted");
  process.exitCode = 1;
} catch (e) {
  say(`   token for another audience refused: ${e.code}`);
}

step(7, "counts from the control interface");
for (const path of ["queue.1", "queue.1/$DeadLetterQueue", "topic.1"]) {
  const c = await counts(path);
  say(`   ${path.padEnd(26)} sent ${c.sent}, delivered ${c.delivered}, completed ${c.completed}, abandoned ${c.abandoned}, dead-lettered ${c.dead_letter_moves}, now holding ${c.messages}`);
}

await Promise.all([client.close(), entra.close(), wrong.close()]);
say("\ndemo finished");
