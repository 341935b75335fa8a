// Helpers for tests that need tokensvc: start/stop it, drive its control interface, get a token
// with the official @azure/identity in a child process, verify a JWT it issued.
//
//   const svc = await startTokensvc({ lifetime: 600, tls: { cert, key } });
//   await svc.control("/control/faults", { route: "imds", status: 429, count: 1 });
//   const stats = await svc.control("/control/stats");
//   await svc.stop();
import { spawn, execFileSync } from "node:child_process";
import { createPublicKey, verify as cryptoVerify } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..");
export const tokensvcScript = join(here, "tokensvc.mjs");

/**
 * Makes a throwaway CA and a server certificate for 127.0.0.1/localhost with
 * test/lib/make-test-ca.sh; returns { dir, ca, cert, key }.
 */
export function makeTestCa(dir = join(mkdtempSync(join(tmpdir(), "tokensvc-ca-")), "ca")) {
  execFileSync("bash", [join(repoRoot, "test", "lib", "make-test-ca.sh"), dir]);
  return { dir, ca: join(dir, "ca.pem"), cert: join(dir, "server.pem"), key: join(dir, "server.key") };
}

/**
 * Starts tokensvc and resolves once it printed its readiness line.
 *
 * Options (all optional): dir (default: a fresh DIR/svc under a temporary directory), lifetime,
 * refreshIn, tls: { cert, key } (adds an HTTPS listener), tenant, clientId, clientSecret,
 * identityHeader, federatedToken, arcGroup, args (extra command-line arguments), readyTimeoutMs.
 *
 * Returns { http, https, dir, tmp, line, child, exited, stdout, stderr, files, tenant, clientSecret,
 * identityHeader, control(path, body), stats(), tokens(), config(), faults(f), reset(), stop() }.
 * control() GETs when body is undefined and POSTs it as JSON otherwise; it throws unless the
 * answer is 200. stop() sends SIGTERM and resolves with { code, signal }; it throws when tokensvc
 * had died before or exits uncleanly.
 */
export async function startTokensvc(o = {}) {
  const tmp = mkdtempSync(join(tmpdir(), "tokensvc-"));
  const svcDir = o.dir ?? join(tmp, "svc");
  const args = ["--dir", svcDir];
  const opt = (flag, v) => { if (v !== undefined && v !== null) args.push(flag, String(v)); };
  opt("--lifetime", o.lifetime);
  opt("--refresh-in", o.refreshIn);
  opt("--tenant", o.tenant);
  opt("--client-id", o.clientId);
  opt("--client-secret", o.clientSecret);
  opt("--identity-header", o.identityHeader);
  opt("--federated-token", o.federatedToken);
  opt("--arc-group", o.arcGroup);
  if (o.tls) args.push("--tls-listen", o.tls.listen ?? "127.0.0.1:0", "--tls-cert", o.tls.cert, "--tls-key", o.tls.key);
  args.push(...(o.args ?? []));

  const child = spawn(process.execPath, [tokensvcScript, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  // Never leave a tokensvc behind when the test process ends without stop().
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);
  let stdout = "", stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  let exitStatus = null;
  const exited = new Promise((res) => child.on("exit", (code, signal) => {
    exitStatus = { code, signal };
    process.off("exit", killOnExit);
    res(exitStatus);
  }));
  const line = await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`tokensvc did not get ready: ${stderr}`)), o.readyTimeoutMs ?? 15000);
    timer.unref(); // the timeout only guards against hanging; it must not keep the process alive
    const check = () => {
      const l = stdout.split("\n").find((x) => x.startsWith("tokensvc ready"));
      if (l) { clearTimeout(timer); res(l); }
    };
    child.stdout.on("data", check);
    child.on("exit", (code, signal) => { clearTimeout(timer); rej(new Error(`tokensvc exited (${code ?? signal}): ${stderr}`)); });
  });
  const m = /^tokensvc ready http=(\S+)(?: https=(\S+))? dir=(.+)$/.exec(line);
  if (!m) throw new Error(`unexpected readiness line: ${line}`);
  const dir = m[3];
  const files = {
    publicKey: join(dir, "signing.pub.pem"), jwks: join(dir, "jwks.json"), federatedToken: join(dir, "federated-token"),
    clientSecret: join(dir, "client-secret"), identityHeader: join(dir, "identity-header"), arcDir: join(dir, "arc"),
    log: join(dir, "tokensvc.log"),
  };
  const svc = {
    tmp, child, exited, line, http: m[1], https: m[2], dir, files,
    tenant: o.tenant ?? "72f988bf-0000-0000-0000-000000000001",
    clientSecret: readFileSync(files.clientSecret, "utf8"),
    identityHeader: readFileSync(files.identityHeader, "utf8"),
    get stdout() { return stdout; },
    get stderr() { return stderr; },
    async control(path, body) {
      if (exitStatus) throw new Error(`tokensvc is not running (${JSON.stringify(exitStatus)}): ${stderr}`);
      const p = path.startsWith("/") ? path : `/control/${path}`;
      const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
      const res = await fetch(`${svc.http}${p}`, init);
      const answer = await res.json();
      if (res.status !== 200) throw new Error(`${init.method ?? "GET"} ${p}: ${res.status} ${JSON.stringify(answer)}`);
      return answer;
    },
    stats() { return svc.control("/control/stats"); },
    tokens() { return svc.control("/control/tokens"); },
    config(change) { return svc.control("/control/config", change); },
    faults(f) { return svc.control("/control/faults", f); },
    reset() { return svc.control("/control/reset", {}); },
    async stop() {
      if (exitStatus) throw new Error(`tokensvc died before stop(): ${JSON.stringify(exitStatus)} ${stderr}`);
      child.kill("SIGTERM");
      const r = await exited;
      if (r.signal || r.code !== 0) throw new Error(`tokensvc exited badly: ${JSON.stringify(r)} ${stderr}`);
      return r;
    },
  };
  return svc;
}

/**
 * Runs get-token.mjs (the official @azure/identity) in a child process whose environment is
 * exactly PATH, HOME and `env`; resolves with its JSON result (see get-token.mjs).
 */
export function getToken(spec, env = {}) {
  return new Promise((res, rej) => {
    const child = spawn(process.execPath, [join(here, "get-token.mjs"), JSON.stringify(spec)], {
      cwd: here,
      env: { PATH: process.env.PATH, HOME: process.env.HOME ?? "/tmp", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "", err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    child.on("exit", (code) => {
      try {
        res(JSON.parse(out.trim().split("\n").pop()));
      } catch {
        rej(new Error(`get-token exited ${code}: ${out} ${err}`));
      }
    });
  });
}

/** Decodes a JWT without verifying it: { header, claims }. */
export function decodeJwt(jwt) {
  const [h, p] = jwt.split(".");
  return { header: JSON.parse(Buffer.from(h, "base64url")), claims: JSON.parse(Buffer.from(p, "base64url")) };
}

/**
 * Verifies an RS256 JWT against DIR/signing.pub.pem and the DIR/jwks.json key its kid names;
 * throws if either fails; returns { header, claims }.
 */
export function verifyJwt(dir, jwt) {
  const [h, p, s] = jwt.split(".");
  if (!h || !p || !s) throw new Error("not a JWT");
  const { header, claims } = decodeJwt(jwt);
  if (header.alg !== "RS256") throw new Error(`alg ${header.alg}`);
  const jwks = JSON.parse(readFileSync(join(dir, "jwks.json"), "utf8"));
  const jwk = jwks.keys.find((k) => k.kid === header.kid);
  if (!jwk) throw new Error(`kid ${header.kid} is not in jwks.json`);
  const input = Buffer.from(`${h}.${p}`);
  const sig = Buffer.from(s, "base64url");
  if (!cryptoVerify("RSA-SHA256", input, readFileSync(join(dir, "signing.pub.pem")), sig))
    throw new Error("signature does not verify with signing.pub.pem");
  if (!cryptoVerify("RSA-SHA256", input, createPublicKey({ key: jwk, format: "jwk" }), sig))
    throw new Error("signature does not verify with the JWKS key");
  return { header, claims };
}
