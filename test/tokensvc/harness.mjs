// Helpers for tests that need tokensvc: start/stop it, drive its control interface, get a token
// with the official @azure/identity in a child process, verify a JWT it issued.
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
 * Starts tokensvc with `args` (and --dir DIR/svc under a fresh temporary directory unless `dir`
 * is given); resolves once it printed its readiness line. Returns
 * { http, https, dir, tmp, line, child, stdout, stderr, ctl(method, path, query), stats(), stop() }.
 * stop() sends SIGTERM and resolves with { code, signal }.
 */
export async function startTokensvc({ args = [], dir } = {}) {
  const tmp = mkdtempSync(join(tmpdir(), "tokensvc-"));
  const svcDir = dir ?? join(tmp, "svc");
  const child = spawn(process.execPath, [tokensvcScript, "--dir", svcDir, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "", stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const exited = new Promise((res) => child.on("exit", (code, signal) => res({ code, signal })));
  const line = await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`tokensvc did not get ready: ${stderr}`)), 15000);
    const check = () => {
      const l = stdout.split("\n").find((x) => x.startsWith("tokensvc ready"));
      if (l) { clearTimeout(timer); res(l); }
    };
    child.stdout.on("data", check);
    child.on("exit", (code) => { clearTimeout(timer); rej(new Error(`tokensvc exited (${code}): ${stderr}`)); });
  });
  const m = /^tokensvc ready http=(\S+)(?: https=(\S+))? dir=(.+)$/.exec(line);
  if (!m) throw new Error(`unexpected readiness line: ${line}`);
  const svc = {
    tmp, child, exited, line, http: m[1], https: m[2], dir: m[3],
    get stdout() { return stdout; },
    get stderr() { return stderr; },
    /** Calls a control route; throws unless it answers 200. */
    async ctl(method, path, query = {}) {
      const qs = new URLSearchParams(query).toString();
      const res = await fetch(`${svc.http}${path}${qs ? "?" + qs : ""}`, { method });
      const body = await res.json();
      if (res.status !== 200) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(body)}`);
      return body;
    },
    stats() { return svc.ctl("GET", "/control/stats"); },
    reset() { return svc.ctl("POST", "/control/reset"); },
    faults(query) { return svc.ctl("POST", "/control/faults", query); },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      return exited;
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
