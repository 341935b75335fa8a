#!/usr/bin/env node
// Gets one token with the official @azure/identity package and prints the outcome as one JSON line.
// The tests run it as a child process because @azure/identity and msal-node read their settings
// (IDENTITY_ENDPOINT, AZURE_POD_IDENTITY_AUTHORITY_HOST, NODE_EXTRA_CA_CERTS, ...) from the
// environment of the process.
//
//   node test/tokensvc/get-token.mjs '{"credential":"ManagedIdentityCredential","options":{...},
//        "args":[...], "scopes":"https://servicebus.azure.net/.default", "arcKeyDir":"/dir/"}'
//
// credential: ManagedIdentityCredential | WorkloadIdentityCredential | ClientSecretCredential |
//             ClientAssertionCredential (args: tenantId, clientId; options.assertionFile is read on
//             every call) | DefaultAzureCredential | EnvironmentCredential.
// args:       positional constructor arguments before `options` (e.g. tenantId, clientId, secret).
// arcKeyDir:  test-only patch: msal-node insists that the Azure Arc key file lives in
//             /var/opt/azcmagent/tokens/ on Linux; this replaces that directory for this process.
// serviceBus: {"host": H, "queue": Q} — instead of calling getToken itself, hand the credential to
//             @azure/service-bus's ServiceBusClient(H, credential), send one message to Q and
//             receive it back (H as sbemu's credentialHost()); adds "received" to the result.
// Prints {"ok":true,"token":..,"expiresOnTimestamp":..,"refreshAfterTimestamp":..,"ms":..} or
// {"ok":false,"name":..,"message":..,"statusCode":..,"errorCode":..}.
import { readFileSync } from "node:fs";

const spec = JSON.parse(process.argv[2] || "{}");

if (spec.arcKeyDir) {
  const msalUrl = import.meta.resolve("@azure/msal-node");
  const arc = await import(new URL("./client/ManagedIdentitySources/AzureArc.mjs", msalUrl).href);
  arc.SUPPORTED_AZURE_ARC_PLATFORMS[process.platform] = spec.arcKeyDir.endsWith("/") ? spec.arcKeyDir : spec.arcKeyDir + "/";
}

const identity = await import("@azure/identity");
const started = Date.now();
let out;
try {
  const Cred = identity[spec.credential];
  if (typeof Cred !== "function") throw new Error(`unknown credential ${spec.credential}`);
  const options = { ...(spec.options || {}) };
  let cred;
  if (spec.credential === "ClientAssertionCredential") {
    const file = options.assertionFile;
    delete options.assertionFile;
    cred = new Cred(...(spec.args || []), async () => readFileSync(file, "utf8"), options);
  } else {
    cred = new Cred(...(spec.args || []), options);
  }
  if (spec.serviceBus) {
    out = { ok: true, received: await sendAndReceive(cred, spec.serviceBus) };
  } else {
    const t = await cred.getToken(spec.scopes || "https://servicebus.azure.net/.default", spec.getTokenOptions || {});
    out = { ok: true, token: t.token, expiresOnTimestamp: t.expiresOnTimestamp, refreshAfterTimestamp: t.refreshAfterTimestamp ?? null, tokenType: t.tokenType };
  }
} catch (e) {
  out = {
    ok: false,
    name: e?.name,
    message: String(e?.message ?? e),
    statusCode: e?.statusCode ?? e?.cause?.statusCode ?? null,
    errorCode: e?.errorResponse?.error ?? e?.cause?.errorCode ?? e?.errorCode ?? null,
    causeMessage: e?.cause ? String(e.cause.message ?? e.cause) : null,
  };
}
out.ms = Date.now() - started;
process.stdout.write(JSON.stringify(out) + "\n");

/** Sends one message to the queue with the credential and receives it back; returns its body. */
async function sendAndReceive(credential, { host, queue, body = "via tokensvc" }) {
  const { ServiceBusClient } = await import("@azure/service-bus");
  const client = new ServiceBusClient(host, credential, { retryOptions: { maxRetries: 0, timeoutInMs: 10000 } });
  try {
    await client.createSender(queue).sendMessages({ body });
    const receiver = client.createReceiver(queue);
    const [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
    if (!m) throw new Error("no message received");
    await receiver.completeMessage(m);
    return m.body;
  } finally {
    await client.close();
  }
}
