// Host-name verification on amqps:// namespaces. Two sbemu TLS listeners present certificates from
// the same throwaway CA, which sbpg.ca_file trusts: one issued for "wrong.example", one for
// localhost. sbpg addresses both as amqps://localhost:<port>. The first must be refused (the chain
// is valid, only the name is not), the second consumes: so the refusal is about the name, not the
// CA. (entra.test.mjs already covers a certificate that no trusted CA signed.)
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { connect as tlsConnect } from "node:tls";
import { dirname, join } from "node:path";
import { ServiceBusClient } from "@azure/service-bus";
import { startSbemu, configWith, queue } from "../conformance/lib/sbemu.mjs";
import { makeTestCa } from "../tokensvc/harness.mjs";
import { startCluster, installOrders, waitFor } from "./lib/cluster.mjs";

// The server runs as the postgres OS user: it must be able to reach sbpg.ca_file.
function openUp(path) {
  for (let d = path; d !== "/" && d.startsWith("/tmp/"); d = dirname(d)) chmodSync(d, 0o755);
}

// A server certificate for `name` only (CN and the one DNS SAN), signed by the test CA in ca.dir.
function issueServerCert(ca, name) {
  const base = join(ca.dir, `server-${name}`);
  writeFileSync(`${base}.ext`, [`subjectAltName=DNS:${name}`, "basicConstraints=CA:FALSE",
                                 "keyUsage=digitalSignature,keyEncipherment", "extendedKeyUsage=serverAuth", ""].join("\n"));
  execFileSync("openssl", ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${base}.key`, "-out", `${base}.csr`,
                           "-subj", `/CN=${name}`], { stdio: "ignore" });
  execFileSync("openssl", ["x509", "-req", "-in", `${base}.csr`, "-CA", ca.ca, "-CAkey", join(ca.dir, "ca.key"),
                           "-CAcreateserial", "-out", `${base}.pem`, "-days", "2", "-extfile", `${base}.ext`], { stdio: "ignore" });
  chmodSync(`${base}.key`, 0o600);
  return { cert: `${base}.pem`, key: `${base}.key` };
}

// Completes a TLS handshake with Node's own checks: the chain against `ca` and the certificate's
// names against `servername`. Resolves with the peer certificate's subject alternative names.
function handshake(amqps, ca, servername) {
  const { hostname, port } = new URL(amqps);
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ host: hostname, port: Number(port), ca: readFileSync(ca), servername }, () => {
      const san = s.getPeerCertificate().subjectaltname;
      s.end();
      resolve(san);
    });
    s.on("error", reject);
  });
}

describe("host-name verification on amqps:// namespaces", () => {
  let ca, wrong, right, pg, sbWrong, sbRight;
  let nextId = 1;
  // By host name: the name sbpg checks is "localhost", which only one of the certificates carries.
  const amqps = (emu) => emu.amqps.replace("127.0.0.1", "localhost");
  const send = async (sb, entity, n) => {
    const ids = Array.from({ length: n }, () => nextId++);
    const s = sb.createSender(entity);
    await s.sendMessages(ids.map((id) => ({ messageId: `m-${id}`, body: { id, amount: 1 } })));
    await s.close();
    return ids;
  };
  const rowsFor = async (ids) => Number((await pg.query("SELECT count(*) c FROM orders WHERE id = ANY($1)", [ids])).rows[0].c);
  const stats = async (name) => (await pg.query("SELECT * FROM sbpg.stats WHERE subscription = $1", [name])).rows[0];
  const subscribe = (name, emu) =>
    pg.psql(`SELECT sbpg.create_subscription('${name}', '${amqps(emu)}', '${name}', 'apply_order(sbpg.message)', 'app', 'emu')`);

  before(async () => {
    ca = makeTestCa();
    const other = issueServerCert(ca, "wrong.example");
    openUp(ca.dir);
    const config = configWith({ queues: [queue("misnamed"), queue("named")] });
    wrong = await startSbemu({ config, args: ["--tls-listen", "127.0.0.1:0", "--tls-cert", other.cert, "--tls-key", other.key] });
    right = await startSbemu({ config, args: ["--tls-listen", "127.0.0.1:0", "--tls-cert", ca.cert, "--tls-key", ca.key] });
    assert.ok(wrong.amqps && right.amqps, "both sbemu instances have a TLS listener");
    pg = await startCluster({ conf: { "sbpg.ca_file": `'${ca.ca}'` } });
    await installOrders(pg);
    await pg.psql(`SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}')`);
    // The test's own messages go over plain AMQP.
    const retryOptions = { maxRetries: 2, timeoutInMs: 20000 };
    sbWrong = new ServiceBusClient(wrong.connectionString(), { retryOptions });
    sbRight = new ServiceBusClient(right.connectionString(), { retryOptions });
  });
  after(async () => {
    // Stops everything, even when one of them reports a problem (which is then rethrown).
    const problems = [];
    for (const f of [() => sbWrong?.close(), () => sbRight?.close(), () => pg?.stop(), () => wrong?.stop(), () => right?.stop()]) {
      try {
        await f();
      } catch (e) {
        problems.push(e);
      }
    }
    if (problems.length) throw problems[0];
  });

  it("refuses a certificate from the trusted CA that was issued for another host name, and consumes nothing", async (t) => {
    // The certificate itself is sound: its chain verifies against the CA, for the name it carries.
    assert.equal(await handshake(wrong.amqps, ca.ca, "wrong.example"), "DNS:wrong.example");
    await assert.rejects(handshake(wrong.amqps, ca.ca, "localhost"), /localhost/, "Node refuses it for localhost as well");

    const ids = await send(sbWrong, "misnamed", 3);
    await subscribe("misnamed", wrong);
    const st = await waitFor(async () => {
      const s = await stats("misnamed");
      return s?.last_error && /certificate/i.test(s.last_error) ? s : null;
    }, { what: "a certificate error in sbpg.stats" });
    t.diagnostic(`last_error: ${st.last_error}`);
    assert.notEqual(st.state, "connected");
    assert.match(st.last_error, /^connection failed: .*certificate verify failed/);
    // "localhost" is a name, so sbpg adds no hint about IP addresses.
    assert.doesNotMatch(st.last_error, /IP address/);
    assert.equal(await rowsFor(ids), 0, "no row reached the table");
    const ent = await wrong.entity("misnamed");
    assert.equal(ent.active, 3, "the broker still holds every message");
    assert.equal(ent.completed ?? 0, 0);
    // No AMQP connection over TLS ever got as far as a receiver on the entity.
    const conns = await wrong.connections();
    assert.ok(!conns.some((c) => c.tls && c.links?.some((l) => l.address === "misnamed")), "no TLS link reached sbemu");
    assert.match(pg.serverLog(), /"subscription":"misnamed".*certificate verify failed/);
    await pg.psql("SELECT sbpg.disable_subscription('misnamed')");
  });

  it("consumes from a broker whose certificate, from the same CA, names localhost", async () => {
    const ids = await send(sbRight, "named", 3);
    await subscribe("named", right);
    await waitFor(async () => (await rowsFor(ids)) === 3, { what: "3 rows over TLS" });
    const st = await stats("named");
    assert.equal(st.state, "connected");
    await waitFor(async () => (await right.entity("named")).completed === 3, { what: "3 completed on the broker" });
    assert.equal((await right.entity("named")).active, 0, "the broker holds none of them");
    const conns = await right.connections();
    assert.ok(conns.some((c) => c.tls && c.links.some((l) => l.address === "named" && l.role === "receiver")),
      "sbpg's receiver came over TLS");
  });
});
