#!/usr/bin/env node
// tokensvc: a test-only stand-in for the Azure identity endpoints (IMDS, App Service, Azure Arc,
// Entra ID v2 token endpoint). It issues RS256 JWTs signed with a throwaway key so that sbpg's
// token providers and sbemu's JWT verification can be exercised without Azure. See README.md.
//
// Nothing but the standard library. Secrets (client secret, identity header, federated token, Arc
// keys, issued tokens) never go to stdout, stderr or DIR/tokensvc.log; GET /control/tokens is the
// one place that lists them (for leak tests).
import http from "node:http";
import https from "node:https";
import { createHash, createHmac, generateKeyPairSync, randomBytes, randomUUID, sign as cryptoSign, verify as cryptoVerify } from "node:crypto";
import { appendFileSync, chmodSync, chownSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

// ---------------------------------------------------------------------------------------------
// Options

const USAGE = `usage: node test/tokensvc/tokensvc.mjs --dir DIR [options]

  --dir DIR                 created if missing; gets the key material and secrets (see README.md)
  --listen HOST:PORT        plain HTTP listener (default 127.0.0.1:0)
  --tls-listen HOST:PORT    HTTPS listener (default 127.0.0.1:0 when --tls-cert is given)
  --tls-cert FILE           PEM certificate chain for the HTTPS listener
  --tls-key FILE            PEM private key for the HTTPS listener
  --lifetime SECONDS        token lifetime, exp = iat + lifetime (default 3600)
  --refresh-in SECONDS      add refresh_in to every token answer (default: not sent)
  --tenant TENANT           the one tenant the Entra routes know (default 72f988bf-0000-0000-0000-000000000001)
  --client-id ID            the only client id the Entra token endpoint accepts (default: any)
  --client-secret SECRET    the accepted client_secret (default test-client-secret)
  --identity-header VALUE   the App Service X-IDENTITY-HEADER (default test-identity-header)
  --federated-token TOKEN   use this literal as DIR/federated-token and accept exactly the file's
                            content as client_assertion (default: a JWT signed by tokensvc)
  --arc-group GROUP         give DIR/arc (0750) and the Arc key files (0640) to this group, like the
                            himds group of a real Arc agent (default: DIR/arc 0700, keys 0600)
  --help                    this text

Prints "tokensvc ready http=URL [https=URL] dir=DIR" when listening; SIGTERM or SIGINT stops it.
`;

const DEFAULTS = {
  listen: "127.0.0.1:0",
  lifetime: 3600,
  tenant: "72f988bf-0000-0000-0000-000000000001",
  clientSecret: "test-client-secret",
  identityHeader: "test-identity-header",
};

function usage(msg) {
  process.stderr.write(`tokensvc: ${msg}\n${USAGE}`);
  process.exit(2);
}

function parseArgs(argv) {
  const names = {
    "--dir": "dir", "--listen": "listen", "--tls-listen": "tlsListen", "--tls-cert": "tlsCert",
    "--tls-key": "tlsKey", "--lifetime": "lifetime", "--refresh-in": "refreshIn", "--tenant": "tenant",
    "--client-id": "clientId", "--client-secret": "clientSecret", "--identity-header": "identityHeader",
    "--federated-token": "federatedToken", "--arc-group": "arcGroup",
  };
  const o = { ...DEFAULTS };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i], v;
    const eq = a.indexOf("=");
    if (a.startsWith("--") && eq > 0) { v = a.slice(eq + 1); a = a.slice(0, eq); }
    if (a === "--help" || a === "-h") {
      process.stdout.write(USAGE);
      process.exit(0);
    }
    const key = names[a];
    if (!key) usage(`unknown option ${a}`);
    if (v === undefined) {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      v = argv[++i];
    }
    o[key] = v;
  }
  if (!o.dir) usage("--dir is required");
  const posInt = (name, v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) usage(`${name} must be a positive integer (seconds)`);
    return n;
  };
  o.lifetime = posInt("--lifetime", o.lifetime);
  o.refreshIn = o.refreshIn === undefined ? null : posInt("--refresh-in", o.refreshIn);
  if (Boolean(o.tlsCert) !== Boolean(o.tlsKey)) usage("--tls-cert and --tls-key go together");
  if (o.tlsListen && !o.tlsCert) usage("--tls-listen needs --tls-cert and --tls-key");
  if (o.tlsCert && !o.tlsListen) o.tlsListen = "127.0.0.1:0";
  if (!o.tenant) usage("--tenant must not be empty");
  if (o.clientId === "") usage("--client-id must not be empty");
  return o;
}

function parseHostPort(s, what) {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(s);
  if (!m) usage(`${what} must be HOST:PORT, got ${s}`);
  return { host: m[1] ?? m[2], port: Number(m[3]) };
}

/** A numeric gid, or a group name looked up in /etc/group. */
function groupId(g) {
  if (/^\d+$/.test(g)) return Number(g);
  const line = readFileSync("/etc/group", "utf8").split("\n").find((l) => l.split(":")[0] === g);
  if (!line) usage(`--arc-group: no group ${g}`);
  return Number(line.split(":")[2]);
}

const opts = parseArgs(process.argv.slice(2));
const dir = resolve(opts.dir);
const arcGid = opts.arcGroup === undefined ? null : groupId(opts.arcGroup);

// ---------------------------------------------------------------------------------------------
// Key material and files

const b64u = (buf) => Buffer.from(buf).toString("base64url");
const nowS = () => Math.floor(Date.now() / 1000);

const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const jwk = publicKey.export({ format: "jwk" });
// RFC 7638 thumbprint as key id.
const kid = b64u(createHash("sha256").update(JSON.stringify({ e: jwk.e, kty: "RSA", n: jwk.n })).digest());
const jwks = { keys: [{ kty: "RSA", use: "sig", alg: "RS256", kid, n: jwk.n, e: jwk.e }] };

const files = {
  publicKey: join(dir, "signing.pub.pem"),
  jwks: join(dir, "jwks.json"),
  federatedToken: join(dir, "federated-token"),
  clientSecret: join(dir, "client-secret"),
  identityHeader: join(dir, "identity-header"),
  arcDir: join(dir, "arc"),
  log: join(dir, "tokensvc.log"),
};

// Fixtures are readable by other local users: sbpg's backends run as the postgres user and read
// the federated token (and a client secret given as secret_file) themselves. Files are replaced
// atomically so that a reader never sees half a token.
function writeFixture(path, text, mode = 0o644, gid = null) {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, text, { mode });
  chmodSync(tmp, mode); // the umask may have narrowed it
  if (gid !== null) chownSync(tmp, -1, gid);
  renameSync(tmp, path);
}

mkdirSync(dir, { recursive: true });
mkdirSync(files.arcDir, { recursive: true });
chmodSync(files.arcDir, arcGid === null ? 0o700 : 0o750);
if (arcGid !== null) chownSync(files.arcDir, -1, arcGid);
writeFixture(files.publicKey, publicKey.export({ type: "spki", format: "pem" }));
writeFixture(files.jwks, JSON.stringify(jwks, null, 2) + "\n");
writeFixture(files.clientSecret, opts.clientSecret);
writeFixture(files.identityHeader, opts.identityHeader);
writeFileSync(files.log, "");

// Everything secret this process ever handed out, for GET /control/tokens. Never cleared.
const vault = { tokens: [], arcKeys: new Map() /* secret -> key file */, federated: [] };

function signJwt(payload, header = {}) {
  const input = `${b64u(JSON.stringify({ typ: "JWT", alg: "RS256", kid, ...header }))}.${b64u(JSON.stringify(payload))}`;
  return `${input}.${b64u(cryptoSign("RSA-SHA256", Buffer.from(input), privateKey))}`;
}

/**
 * Checks that `jwt` is an RS256 JWT signed by this process's key. Returns { claims } or
 * { error: "malformed" | "signature" }. Time and audience are the caller's business.
 */
function verifyOwnJwt(jwt) {
  const parts = String(jwt).split(".");
  if (parts.length !== 3) return { error: "malformed" };
  let header, claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], "base64url"));
    claims = JSON.parse(Buffer.from(parts[1], "base64url"));
  } catch {
    return { error: "malformed" };
  }
  if (!header || typeof claims !== "object" || claims === null) return { error: "malformed" };
  if (header.alg !== "RS256" || (header.kid !== undefined && header.kid !== kid)) return { error: "signature" };
  const ok = cryptoVerify("RSA-SHA256", Buffer.from(`${parts[0]}.${parts[1]}`), publicKey, Buffer.from(parts[2], "base64url"));
  return ok ? { claims } : { error: "signature" };
}

// The federated token plays an AKS projected service account token: issuer = the cluster's OIDC
// issuer, audience api://AzureADTokenExchange, subject = the service account. Real ones live 1 h
// and kubelet rewrites the file; this one lives 24 h unless POST /control/federated-token says so.
const FEDERATED_AUDIENCE = "api://AzureADTokenExchange";
const FEDERATED_ISSUER = `https://oidc.tokensvc.test/${opts.tenant}/`;
const FEDERATED_SUBJECT = "system:serviceaccount:default:sbpg";

function federatedClaims(lifetime = 86400, extra = {}) {
  const now = nowS();
  return {
    aud: [FEDERATED_AUDIENCE],
    exp: now + lifetime,
    iat: now,
    nbf: now,
    iss: FEDERATED_ISSUER,
    sub: FEDERATED_SUBJECT,
    jti: randomUUID(),
    "kubernetes.io": { namespace: "default", serviceaccount: { name: "sbpg", uid: guidFrom("serviceaccount|default|sbpg") } },
    ...extra,
  };
}

function writeFederatedToken(token) {
  writeFixture(files.federatedToken, token);
  vault.federated.push(token);
}

// ---------------------------------------------------------------------------------------------
// State: counters, issued tokens, faults, runtime config

const ROUTES = ["imds", "app_service", "arc", "entra"];
const WRONG_AUDIENCE = "https://storage.azure.com";
const KEEP = 10000; // issued tokens remembered (a guard against unbounded growth, never reached in tests)

const state = { config: null, counters: null, issued: [], faults: [], timed: null, nextFaultId: 1 };

function resetState() {
  state.config = { lifetime: opts.lifetime, refresh_in: opts.refreshIn };
  const c = {};
  for (const r of ROUTES) c[r] = { requests: 0, issued: 0, failed: {} };
  c.arc.challenges = 0; // 401 answers to requests without Authorization: protocol, not failure
  c.entra.client_secret = 0; // token requests by credential type
  c.entra.client_assertion = 0;
  c.openid = { requests: 0 };
  state.counters = c;
  state.issued = [];
  state.faults = [];
  state.timed = { delay_ms: 0, down_until: 0 }; // the legacy query form's time-based faults
}
resetState();

const urls = { http: null, https: null };

function configView() {
  return {
    tenant: opts.tenant,
    client_id: opts.clientId ?? null,
    lifetime: state.config.lifetime,
    refresh_in: state.config.refresh_in,
    start_lifetime: opts.lifetime,
    issuer: issuer(),
    kid,
    dir,
    http: urls.http,
    https: urls.https,
    federated_literal: opts.federatedToken !== undefined,
    system_identities: Object.fromEntries(["imds", "app_service", "arc"].map((r) => {
      const id = managedIdentity(r, new URLSearchParams(), {});
      return [r, { oid: id.oid, client_id: id.clientId }];
    })),
    files: {
      public_key: files.publicKey, jwks: files.jwks, federated_token: files.federatedToken,
      client_secret: files.clientSecret, identity_header: files.identityHeader, arc_dir: files.arcDir, log: files.log,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Tokens and identities

const issuer = () => `https://sts.windows.net/${opts.tenant}/`;

/** A stable GUID-formatted id derived from a string (the same across runs). */
function guidFrom(s) {
  const h = createHmac("sha256", "tokensvc").update(s).digest("hex");
  // Shape it like a version-4/variant-1 UUID.
  const v = ((parseInt(h[16], 16) & 0x3) | 0x8).toString(16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-${v}${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

const GUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** "https://servicebus.azure.net//.default" -> "https://servicebus.azure.net". */
function audienceOf(resourceOrScope) {
  let a = resourceOrScope.trim();
  if (a.endsWith("/.default")) a = a.slice(0, -"/.default".length);
  return a.replace(/\/+$/, "");
}

/**
 * Issues a token for `identity` = { clientId, oid, appidacr, miResId? }. `fault` is the token fault
 * taken for this request, if any (wrong_audience, lifetime). Returns { token, now, exp, lifetime }.
 */
function issue(route, kind, identity, resourceOrScope, fault) {
  const lifetime = fault?.lifetime ?? state.config.lifetime;
  const now = nowS();
  const exp = now + lifetime;
  let aud = audienceOf(resourceOrScope);
  if (fault?.wrong_audience) aud = typeof fault.wrong_audience === "string" ? fault.wrong_audience : WRONG_AUDIENCE;
  const uti = b64u(randomBytes(16)); // unique per token, as in Entra's v1 tokens
  const payload = {
    aud,
    iss: issuer(),
    iat: now,
    nbf: now,
    exp,
    aio: b64u(randomBytes(24)),
    appid: identity.clientId,
    appidacr: identity.appidacr,
    azp: identity.clientId,
    idp: issuer(),
    idtyp: "app",
    oid: identity.oid,
    rh: b64u(randomBytes(12)) + ".",
    sub: identity.oid,
    tid: opts.tenant,
    uti,
    ver: "1.0",
  };
  if (identity.miResId) payload.xms_mirid = identity.miResId;
  const token = signJwt(payload);
  state.counters[route].issued++;
  state.issued.push({ route, kind, sub: payload.sub, oid: payload.oid, aud, iat: now, exp, lifetime, client_id: identity.clientId, jti: uti });
  if (state.issued.length > KEEP) state.issued.splice(0, state.issued.length - KEEP);
  vault.tokens.push({ route, jti: uti, token });
  if (vault.tokens.length > KEEP) vault.tokens.splice(0, vault.tokens.length - KEEP);
  return { token, now, exp, lifetime };
}

/**
 * The managed identity a request selects. `selectors` maps query names to their meaning
 * ("client_id" | "object_id" | "resource_id"). System-assigned when none is given: one per source.
 * A user-assigned identity is the same whichever source asks for it.
 */
function managedIdentity(source, query, selectors) {
  const given = Object.keys(selectors).filter((k) => query.get(k));
  if (given.length > 1) return { error: `Only one of ${Object.keys(selectors).join(", ")} may be given` };
  if (given.length === 0)
    return { clientId: guidFrom(`${source}|system|client_id`), oid: guidFrom(`${source}|system|oid`), appidacr: "2" };
  const name = given[0];
  const value = query.get(name);
  const id = { appidacr: "2" };
  switch (selectors[name]) {
  case "client_id":
    id.clientId = value;
    id.oid = guidFrom(`user|client_id|${value.toLowerCase()}`);
    break;
  case "object_id":
    id.oid = GUID_RE.test(value) ? value.toLowerCase() : guidFrom(`user|object_id|${value}`);
    id.clientId = guidFrom(`user|object_id|${value.toLowerCase()}|client_id`);
    break;
  default:
    id.miResId = value;
    id.oid = guidFrom(`user|resource_id|${value.toLowerCase()}`);
    id.clientId = guidFrom(`user|resource_id|${value.toLowerCase()}|client_id`);
  }
  return id;
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

function log(req, status, started, listener) {
  const path = (req.url || "").split("?")[0];
  try {
    appendFileSync(files.log, `${new Date().toISOString()} ${listener} ${req.method} ${path} ${status} ${Date.now() - started}ms\n`);
  } catch { /* the log is best effort */ }
}

/** Answers JSON and counts failures of token routes. */
function send(ctx, status, body, headers = {}) {
  const { res } = ctx;
  if (ctx.answered || res.destroyed) return;
  ctx.answered = true;
  if (ctx.route && status >= 400) {
    const c = state.counters[ctx.route];
    if (ctx.challenge) c.challenges++;
    else c.failed[status] = (c.failed[status] || 0) + 1;
  }
  const text = body === undefined ? "" : JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json; charset=utf-8",
    "Content-Length": Buffer.byteLength(text),
    "Cache-Control": "no-store",
    ...headers,
  });
  res.end(text);
  log(ctx.req, status, ctx.started, ctx.listener);
}

/** Closes the connection without an answer (fault "down"). */
function drop(ctx) {
  ctx.answered = true;
  const c = state.counters[ctx.route];
  c.failed.down = (c.failed.down || 0) + 1;
  log(ctx.req, "dropped", ctx.started, ctx.listener);
  ctx.req.socket.destroy();
}

const oauthError = (error, description) => ({ error, error_description: description });

/** App Service's error shape (msal-node reads message and correlationId). */
const appServiceError = (status, message) => ({ statusCode: status, message, correlationId: randomUUID() });

/** An Entra-style error body (MSAL reads error_codes, timestamp, trace_id, correlation_id). */
function entraError(error, code, description, req) {
  const timestamp = new Date().toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  const traceId = randomUUID();
  const correlationId = req.headers["client-request-id"] || randomUUID();
  return {
    error,
    error_description: `AADSTS${code}: ${description} Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${timestamp}`,
    error_codes: [code],
    timestamp,
    trace_id: traceId,
    correlation_id: correlationId,
    error_uri: `https://login.microsoftonline.com/error?code=${code}`,
  };
}

function readBody(req, limit = 64 * 1024) {
  return new Promise((res, rej) => {
    const chunks = [];
    let size = 0;
    req.on("data", (c) => {
      size += c.length;
      if (size > limit) { rej(Object.assign(new Error("request body too large"), { status: 413 })); req.destroy(); return; }
      chunks.push(c);
    });
    req.on("end", () => res(Buffer.concat(chunks).toString("utf8")));
    req.on("error", rej);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Faults
//
// A fault is { route, count, ... }. Two kinds:
//  - an answer fault (has `status` or `down`) is taken by the next matching request on arrival,
//    before any validation: it waits delay_ms, then answers `status` (with Retry-After) or drops
//    the connection;
//  - a token fault (only delay_ms / wrong_audience / lifetime) is taken by the next matching
//    request that is about to get a token: it waits delay_ms, then issues the modified token.
// Within a kind the first matching fault in the list wins; `count` decrements per request taken
// ("forever" never does) and a fault is removed when it reaches 0.

const FAULT_FIELDS = new Set(["route", "status", "count", "retry_after", "delay_ms", "wrong_audience", "lifetime", "down"]);

function badRequest(msg) {
  return Object.assign(new Error(msg), { status: 400 });
}

function parseFault(f) {
  if (!f || typeof f !== "object" || Array.isArray(f)) throw badRequest("a fault is a JSON object");
  for (const k of Object.keys(f)) if (!FAULT_FIELDS.has(k)) throw badRequest(`unknown fault field ${k}`);
  const int = (name, min, max = Infinity) => {
    const v = f[name];
    if (!Number.isInteger(v) || v < min || v > max) throw badRequest(`${name} must be an integer from ${min}${max < Infinity ? ` to ${max}` : ""}`);
    return v;
  };
  const out = { id: state.nextFaultId, route: f.route ?? "any" };
  if (out.route !== "any" && !ROUTES.includes(out.route)) throw badRequest(`route must be one of any, ${ROUTES.join(", ")}`);
  out.count = f.count === "forever" ? "forever" : f.count === undefined ? 1 : int("count", 1);
  if (f.status !== undefined) out.status = int("status", 400, 599);
  if (f.retry_after !== undefined) out.retry_after = int("retry_after", 0);
  if (f.delay_ms !== undefined) out.delay_ms = int("delay_ms", 0);
  if (f.lifetime !== undefined) out.lifetime = int("lifetime", 1);
  if (f.wrong_audience !== undefined) {
    if (f.wrong_audience !== true && !(typeof f.wrong_audience === "string" && f.wrong_audience))
      throw badRequest("wrong_audience is true or an audience string");
    out.wrong_audience = f.wrong_audience;
  }
  if (f.down !== undefined) {
    if (f.down !== true) throw badRequest("down must be true");
    out.down = true;
  }
  const modifiesToken = out.wrong_audience !== undefined || out.lifetime !== undefined;
  if (out.down && (out.status !== undefined || out.retry_after !== undefined || modifiesToken))
    throw badRequest("down goes with delay_ms only");
  if (out.status !== undefined && modifiesToken) throw badRequest("a status fault issues no token: no wrong_audience or lifetime");
  if (out.retry_after !== undefined && out.status === undefined) throw badRequest("retry_after needs status");
  if (out.status === undefined && !out.down && !modifiesToken && out.delay_ms === undefined)
    throw badRequest("a fault needs status, down, delay_ms, wrong_audience or lifetime");
  out.kind = out.status !== undefined || out.down ? "answer" : "token";
  out.applied = 0;
  state.nextFaultId++;
  return out;
}

function takeFault(route, kind) {
  const i = state.faults.findIndex((f) => f.kind === kind && (f.route === "any" || f.route === route));
  if (i < 0) return null;
  const f = state.faults[i];
  f.applied++;
  if (f.count !== "forever" && --f.count === 0) state.faults.splice(i, 1);
  return f;
}

const FAULT_REASONS = {
  404: ["not_found", "identity not found (IMDS is updating)"],
  410: ["gone", "IMDS is upgrading"],
  429: ["too_many_requests", "too many requests"],
  500: ["server_error", "internal server error"],
  502: ["bad_gateway", "bad gateway"],
  503: ["temporarily_unavailable", "service unavailable"],
  504: ["gateway_timeout", "gateway timeout"],
};

function faultBody(route, status, req) {
  const [error, reason] = FAULT_REASONS[status] ?? [status >= 500 ? "server_error" : "invalid_request", `status ${status}`];
  const description = `tokensvc fault: ${reason}`;
  if (route === "app_service") return appServiceError(status, description);
  if (route === "entra") {
    const entraName = status === 429 || status === 503 ? "temporarily_unavailable" : status >= 500 ? "server_error" : error;
    return entraError(entraName, 90033, `${description}.`, req);
  }
  return oauthError(error, description);
}

/**
 * Applies the answer fault of a token route, if any. Returns true when the request was dealt with
 * (dropped or answered).
 */
async function answerFault(ctx) {
  if (state.timed.down_until > Date.now()) {
    drop(ctx);
    return true;
  }
  if (state.timed.delay_ms) await sleep(state.timed.delay_ms);
  const f = takeFault(ctx.route, "answer");
  if (!f) return false;
  if (f.delay_ms) await sleep(f.delay_ms);
  if (f.down) {
    drop(ctx);
    return true;
  }
  const retryAfter = f.retry_after ?? (f.status === 429 ? 1 : undefined);
  send(ctx, f.status, faultBody(ctx.route, f.status, ctx.req), retryAfter === undefined ? {} : { "Retry-After": String(retryAfter) });
  return true;
}

/**
 * The legacy query form of POST /control/faults, kept for callers written against it (see
 * harness.mjs): ?status=S[&count=N] adds {route: any, status, count}; ?wrong_audience=N adds
 * {route: any, wrong_audience: true, count: N}; ?delay_ms=M delays every token-route answer until
 * reset (0 ends it); ?down_ms=M drops token-route connections for the next M ms.
 */
function legacyFaults(q) {
  const int = (name, min) => {
    const v = Number(q.get(name));
    if (!Number.isInteger(v) || v < min) throw badRequest(`${name} must be an integer >= ${min}`);
    return v;
  };
  for (const k of q.keys())
    if (!["status", "count", "wrong_audience", "delay_ms", "down_ms"].includes(k)) throw badRequest(`unknown fault parameter ${k}`);
  if (q.has("count") && !q.has("status")) throw badRequest("count needs status");
  const added = [];
  if (q.has("status")) {
    const status = int("status", 400);
    const count = q.has("count") ? int("count", 0) : 1;
    if (count > 0) added.push(parseFault({ status, count }));
  }
  if (q.has("wrong_audience")) {
    const n = int("wrong_audience", 0);
    if (n > 0) added.push(parseFault({ wrong_audience: true, count: n }));
  }
  const delay = q.has("delay_ms") ? int("delay_ms", 0) : null;
  const down = q.has("down_ms") ? int("down_ms", 0) : null;
  state.faults.push(...added);
  if (delay !== null) state.timed.delay_ms = delay;
  if (down !== null) state.timed.down_until = Date.now() + down;
}

/** Takes the token fault of a request that is about to get a token; waits its delay. */
async function tokenFault(ctx) {
  const f = takeFault(ctx.route, "token");
  if (f?.delay_ms) await sleep(f.delay_ms);
  return f;
}

// ---------------------------------------------------------------------------------------------
// Managed identity routes

/** IMDS-shaped answer (IMDS and Arc): numbers as strings, as IMDS sends them. */
function imdsBody(t, resource, clientId) {
  const body = {
    access_token: t.token,
    refresh_token: "",
    expires_in: String(t.lifetime),
    expires_on: String(t.exp),
    ext_expires_in: String(t.lifetime),
    not_before: String(t.now),
    resource,
    token_type: "Bearer",
  };
  if (clientId) body.client_id = clientId;
  if (state.config.refresh_in) body.refresh_in = String(state.config.refresh_in);
  return body;
}

async function imds(ctx, url) {
  const q = url.searchParams;
  if (ctx.req.headers["metadata"] !== "true")
    return send(ctx, 400, oauthError("invalid_request", "Required metadata header not specified"));
  if (!q.get("api-version"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'api-version' is missing"));
  if (!q.get("resource"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'resource' is missing"));
  const id = managedIdentity("imds", q, { client_id: "client_id", object_id: "object_id", msi_res_id: "resource_id", mi_res_id: "resource_id" });
  if (id.error) return send(ctx, 400, oauthError("invalid_request", id.error));
  const fault = await tokenFault(ctx);
  const t = issue("imds", "imds", id, q.get("resource"), fault);
  send(ctx, 200, imdsBody(t, q.get("resource"), id.clientId));
}

async function appService(ctx, url) {
  const q = url.searchParams;
  const header = ctx.req.headers["x-identity-header"];
  if (header === undefined)
    return send(ctx, 400, appServiceError(400, "Required header X-IDENTITY-HEADER is missing"));
  if (header !== opts.identityHeader)
    return send(ctx, 401, appServiceError(401, "X-IDENTITY-HEADER does not match"));
  if (!q.get("api-version"))
    return send(ctx, 400, appServiceError(400, "Required query variable 'api-version' is missing"));
  if (!q.get("resource"))
    return send(ctx, 400, appServiceError(400, "Required query variable 'resource' is missing"));
  const id = managedIdentity("app_service", q, { client_id: "client_id", principal_id: "object_id", object_id: "object_id", mi_res_id: "resource_id" });
  if (id.error) return send(ctx, 400, appServiceError(400, id.error));
  const fault = await tokenFault(ctx);
  const t = issue("app_service", "app_service", id, q.get("resource"), fault);
  const body = { access_token: t.token, expires_on: String(t.exp), resource: q.get("resource"), token_type: "Bearer", client_id: id.clientId };
  if (state.config.refresh_in) body.refresh_in = String(state.config.refresh_in);
  send(ctx, 200, body);
}

/** 2019-11-01 or a later date-versioned api-version (with an optional suffix such as -preview). */
function arcApiVersionOk(v) {
  const m = /^(\d{4}-\d{2}-\d{2})(-[A-Za-z0-9.]+)?$/.exec(v || "");
  return Boolean(m) && m[1] >= "2019-11-01";
}

/** Writes a fresh Arc key file, as the agent does for every challenge; returns the header. */
function arcChallenge() {
  const path = join(files.arcDir, `${randomUUID()}.key`);
  const secret = randomBytes(32).toString("hex");
  writeFixture(path, secret, arcGid === null ? 0o600 : 0o640, arcGid);
  vault.arcKeys.set(secret, path);
  return { "WWW-Authenticate": `Basic realm=${path}` };
}

async function arc(ctx, url) {
  const q = url.searchParams;
  if (ctx.req.headers["metadata"] !== "true")
    return send(ctx, 400, oauthError("invalid_request", "Required metadata header not specified"));
  if (!arcApiVersionOk(q.get("api-version")))
    return send(ctx, 400, oauthError("invalid_request", "api-version must be 2019-11-01 or later"));
  if (!q.get("resource"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'resource' is missing"));
  const auth = ctx.req.headers["authorization"];
  if (auth === undefined) {
    ctx.challenge = true;
    return send(ctx, 401, oauthError("unauthorized_client", "Authorization header is required; send the content of the key file named in WWW-Authenticate"), arcChallenge());
  }
  const m = /^Basic (.+)$/.exec(auth);
  if (!m || !vault.arcKeys.has(m[1]))
    return send(ctx, 401, oauthError("unauthorized_client", "The Authorization header does not carry a key this agent wrote"), arcChallenge());
  // Azure Arc only has a system-assigned identity; selectors are ignored.
  const id = managedIdentity("arc", new URLSearchParams(), {});
  const fault = await tokenFault(ctx);
  const t = issue("arc", "arc", id, q.get("resource"), fault);
  send(ctx, 200, imdsBody(t, q.get("resource"), null));
}

// ---------------------------------------------------------------------------------------------
// Entra ID routes

const ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const OIDC_SCOPES = new Set(["openid", "profile", "offline_access", "email"]);

const tenantMatches = (t) => t.toLowerCase() === opts.tenant.toLowerCase();

/**
 * Checks a client assertion. With --federated-token it must equal the current content of
 * DIR/federated-token; otherwise it must be a JWT this process signed, within its validity, for
 * the audience api://AzureADTokenExchange (what a federated identity credential requires).
 * Returns null when accepted, else [status, error, code, description].
 */
function assertionProblem(assertion) {
  if (opts.federatedToken !== undefined) {
    let current = null;
    try { current = readFileSync(files.federatedToken, "utf8").replace(/\r?\n$/, ""); } catch { /* refused below */ }
    return assertion === current ? null : [401, "invalid_client", 700211, "No matching federated identity record found for presented assertion."];
  }
  const v = verifyOwnJwt(assertion);
  if (v.error === "malformed") return [400, "invalid_request", 50027, "JWT token is invalid or malformed."];
  if (v.error) return [401, "invalid_client", 700027, "Client assertion failed signature validation."];
  const now = nowS();
  const { exp, nbf, aud } = v.claims;
  if (typeof exp !== "number" || exp <= now || (typeof nbf === "number" && nbf > now))
    return [400, "invalid_client", 700024, `Client assertion is not within its valid time range. Current time: ${new Date(now * 1000).toISOString()}, expiry time of assertion ${typeof exp === "number" ? new Date(exp * 1000).toISOString() : "(none)"}.`];
  const auds = Array.isArray(aud) ? aud : [aud];
  if (!auds.includes(FEDERATED_AUDIENCE))
    return [400, "invalid_request", 700212, `No matching federated identity record found for presented assertion audience '${auds.join(",")}'.`];
  return null;
}

async function entraToken(ctx, tenant) {
  const { req } = ctx;
  let body;
  try {
    body = await readBody(req);
  } catch (e) {
    return send(ctx, e.status || 400, oauthError("invalid_request", e.message));
  }
  const p = new URLSearchParams(body);
  const isAssertion = p.has("client_assertion") || p.has("client_assertion_type");
  state.counters.entra[isAssertion ? "client_assertion" : "client_secret"]++;
  if (await answerFault(ctx)) return;
  const err = (status, error, code, description) => send(ctx, status, entraError(error, code, description, req));
  if (!tenantMatches(tenant))
    return err(400, "invalid_request", 90002, `Tenant '${tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.`);
  const ctype = (req.headers["content-type"] || "").split(";")[0].trim().toLowerCase();
  const grant = ctype === "application/x-www-form-urlencoded" ? p.get("grant_type") : null;
  if (!grant) return err(400, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.");
  if (grant !== "client_credentials")
    return err(400, "unsupported_grant_type", 70003, `The app requested an unsupported grant type '${grant}'.`);
  const clientId = p.get("client_id");
  if (!clientId) return err(400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_id'.");
  const scopes = (p.get("scope") || "").split(/\s+/).filter((s) => s && !OIDC_SCOPES.has(s));
  if (scopes.length === 0) return err(400, "invalid_request", 900144, "The request body must contain the following parameter: 'scope'.");
  if (scopes.length > 1)
    return err(400, "invalid_scope", 70011, `The provided value for the input parameter 'scope' is not valid. The scope ${scopes.join(" ")} is not valid: client credential flows take one resource.`);
  if (!scopes[0].endsWith("/.default") || audienceOf(scopes[0]) === "")
    return err(400, "invalid_scope", 1002012, `The provided value for scope ${scopes[0]} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).`);
  if (opts.clientId !== undefined && clientId.toLowerCase() !== opts.clientId.toLowerCase())
    return err(400, "unauthorized_client", 700016, `Application with identifier '${clientId}' was not found in the directory '${opts.tenant}'.`);
  let kind;
  if (isAssertion) {
    if (p.get("client_assertion_type") !== ASSERTION_TYPE)
      return err(400, "invalid_request", 700010, `client_assertion_type must be ${ASSERTION_TYPE}.`);
    const problem = assertionProblem(p.get("client_assertion") ?? "");
    if (problem) return err(...problem);
    kind = "entra_assertion";
  } else if (p.has("client_secret")) {
    if (p.get("client_secret") !== opts.clientSecret)
      return err(401, "invalid_client", 7000215, `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${clientId}'.`);
    kind = "entra_secret";
  } else {
    return err(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.");
  }
  // One app registration per (tenant, client id): the secret and the federated credential are two
  // ways to sign in as the same service principal, whose object id is derived from the client id.
  const id = { clientId, oid: guidFrom(`entra|${opts.tenant.toLowerCase()}|${clientId.toLowerCase()}`), appidacr: kind === "entra_secret" ? "1" : "2" };
  const fault = await tokenFault(ctx);
  const t = issue("entra", kind, id, scopes[0], fault);
  const answer = { token_type: "Bearer", expires_in: t.lifetime, ext_expires_in: t.lifetime, access_token: t.token };
  if (state.config.refresh_in) answer.refresh_in = state.config.refresh_in;
  send(ctx, 200, answer);
}

function baseUrl(req) {
  const scheme = req.socket.encrypted ? "https" : "http";
  const host = req.headers.host || new URL(scheme === "https" ? urls.https : urls.http).host;
  return `${scheme}://${host}`;
}

function openidConfiguration(ctx, tenantSeg, v2) {
  state.counters.openid.requests++;
  const { req } = ctx;
  const known = tenantMatches(tenantSeg) || ["common", "organizations"].includes(tenantSeg.toLowerCase());
  if (!known)
    return send(ctx, 400, entraError("invalid_tenant", 90002, `Tenant '${tenantSeg}' not found.`, req));
  // Like Entra: the tenant-independent authorities answer with a {tenantid} placeholder.
  const t = tenantMatches(tenantSeg) ? opts.tenant : "{tenantid}";
  const base = baseUrl(req);
  const v = v2 ? "/v2.0" : "";
  send(ctx, 200, {
    token_endpoint: `${base}/${t}/oauth2${v}/token`,
    token_endpoint_auth_methods_supported: ["client_secret_post", "private_key_jwt", "client_secret_basic"],
    jwks_uri: `${base}/${t}/discovery${v}/keys`,
    response_modes_supported: ["query", "fragment", "form_post"],
    subject_types_supported: ["pairwise"],
    id_token_signing_alg_values_supported: ["RS256"],
    response_types_supported: ["code", "id_token", "code id_token", "id_token token"],
    scopes_supported: ["openid", "profile", "email", "offline_access"],
    issuer: v2 ? `${base}/${t}/v2.0` : `https://sts.windows.net/${t}/`,
    request_uri_parameter_supported: false,
    userinfo_endpoint: `${base}/oidc/userinfo`,
    authorization_endpoint: `${base}/${t}/oauth2${v}/authorize`,
    device_authorization_endpoint: `${base}/${t}/oauth2${v}/devicecode`,
    http_logout_supported: true,
    frontchannel_logout_supported: true,
    end_session_endpoint: `${base}/${t}/oauth2${v}/logout`,
    claims_supported: ["sub", "iss", "aud", "exp", "iat", "nbf", "oid", "tid", "ver", "appid", "azp", "idtyp"],
    kerberos_endpoint: `${base}/${t}/kerberos`,
    tenant_region_scope: "WW",
    cloud_instance_name: "microsoftonline.com",
    cloud_graph_host_name: "graph.windows.net",
    msgraph_host: "graph.microsoft.com",
    rbac_url: "https://pas.windows.net",
  });
}

function instanceDiscovery(ctx) {
  const host = new URL(baseUrl(ctx.req)).host;
  send(ctx, 200, {
    tenant_discovery_endpoint: `${baseUrl(ctx.req)}/${opts.tenant}/v2.0/.well-known/openid-configuration`,
    "api-version": "1.1",
    metadata: [{ preferred_network: host, preferred_cache: host, aliases: [host] }],
  });
}

// ---------------------------------------------------------------------------------------------
// Control

async function jsonBody(req) {
  const text = await readBody(req);
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw badRequest("the body is not JSON");
  }
}

const faultsView = () => state.faults.map(({ kind, applied, ...f }) => ({ ...f, type: kind, applied }));
const timedView = () => ({ delay_ms: state.timed.delay_ms, down_ms_remaining: Math.max(0, state.timed.down_until - Date.now()) });

async function control(ctx, path, query) {
  const { req } = ctx;
  const routes = {
    "/control/stats": ["GET"], "/control/tokens": ["GET"], "/control/config": ["GET", "POST"],
    "/control/faults": ["GET", "POST"], "/control/reset": ["POST"], "/control/sign": ["POST"],
    "/control/federated-token": ["POST"],
  };
  if (!routes[path]) return send(ctx, 404, oauthError("not_found", `no control route ${path}`));
  if (!routes[path].includes(req.method))
    return send(ctx, 405, oauthError("method_not_allowed", `use ${routes[path].join(" or ")}`), { Allow: routes[path].join(", ") });
  try {
    const body = req.method === "POST" ? await jsonBody(req) : null;
    // POST with a query string and no body: the legacy form (faults, config).
    const legacy = req.method === "POST" && [...query.keys()].length > 0;
    if (legacy && !["/control/faults", "/control/config"].includes(path)) throw badRequest("this route takes a JSON body");
    if (legacy && !(typeof body === "object" && body !== null && Object.keys(body).length === 0))
      throw badRequest("give either a query string or a JSON body");
    const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
    const obj = () => {
      if (!isObject(body)) throw badRequest("the body must be a JSON object");
      if (body.claims !== undefined && !isObject(body.claims)) throw badRequest("claims must be a JSON object");
      return body;
    };
    switch (path) {
    case "/control/stats":
      return send(ctx, 200, { ...state.counters, issued: state.issued, faults: faultsView(), timed: timedView(), config: configView() });
    case "/control/tokens":
      return send(ctx, 200, {
        tokens: vault.tokens,
        secrets: {
          client_secret: opts.clientSecret,
          identity_header: opts.identityHeader,
          arc_keys: [...vault.arcKeys].map(([secret, file]) => ({ file, secret })),
          federated_tokens: vault.federated,
        },
      });
    case "/control/config": {
      if (req.method === "POST") {
        const b = legacy ? Object.fromEntries([...query].map(([k, v]) => [k, v === "" || v === "null" ? null : Number(v)])) : obj();
        for (const k of Object.keys(b)) if (k !== "lifetime" && k !== "refresh_in") throw badRequest(`unknown config field ${k}`);
        const ok = (v) => Number.isInteger(v) && v >= 1;
        if (b.lifetime !== undefined && !ok(b.lifetime)) throw badRequest("lifetime must be an integer >= 1");
        if (b.refresh_in !== undefined && b.refresh_in !== null && !ok(b.refresh_in)) throw badRequest("refresh_in must be an integer >= 1 or null");
        if (b.lifetime !== undefined) state.config.lifetime = b.lifetime;
        if (b.refresh_in !== undefined) state.config.refresh_in = b.refresh_in;
      }
      return send(ctx, 200, configView());
    }
    case "/control/faults":
      if (legacy) {
        legacyFaults(query);
      } else if (req.method === "POST") {
        // Validate all before adding any.
        const added = (Array.isArray(body) ? body : [obj()]).map(parseFault);
        state.faults.push(...added);
      }
      return send(ctx, 200, { faults: faultsView(), timed: timedView() });
    case "/control/reset":
      resetState();
      return send(ctx, 200, { ok: true, config: configView() });
    case "/control/sign": {
      // A JWT signed by tokensvc's key: the federated token's claims, overridden by `claims`.
      const b = obj();
      const lifetime = b.lifetime ?? 3600;
      if (!Number.isInteger(lifetime)) throw badRequest("lifetime must be an integer (may be negative)");
      const token = signJwt(federatedClaims(lifetime, b.claims ?? {}));
      vault.tokens.push({ route: "control", jti: null, token });
      return send(ctx, 200, { token });
    }
    case "/control/federated-token": {
      // Rewrites DIR/federated-token the way kubelet rotates a projected token.
      const b = obj();
      const lifetime = b.lifetime ?? 86400;
      if (!Number.isInteger(lifetime)) throw badRequest("lifetime must be an integer (may be negative)");
      const token = signJwt(federatedClaims(lifetime, b.claims ?? {}));
      writeFederatedToken(token);
      return send(ctx, 200, { token, file: files.federatedToken });
    }
    }
  } catch (e) {
    return send(ctx, e.status || 500, oauthError("invalid_request", e.message));
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

const TOKEN_ROUTES = {
  "/metadata/identity/oauth2/token": ["imds", "GET", imds],
  "/msi/token": ["app_service", "GET", appService],
  "/arc/token": ["arc", "GET", arc],
};

async function handle(req, res, listener) {
  const ctx = { req, res, listener, started: Date.now(), answered: false, route: null, challenge: false };
  try {
    const url = new URL(req.url || "/", "http://tokensvc.invalid");
    // msal-node appends a slash to the IMDS endpoint (".../oauth2/token/?api-version=...").
    const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, "") : url.pathname;
    const lower = path.toLowerCase();
    let m;

    const tr = TOKEN_ROUTES[lower];
    if (tr) {
      const [route, method, handler] = tr;
      if (req.method !== method) return send(ctx, 405, oauthError("invalid_request", `use ${method}`), { Allow: method });
      ctx.route = route;
      state.counters[route].requests++;
      if (await answerFault(ctx)) return;
      return await handler(ctx, url);
    }
    if ((m = /^\/([^/]+)\/oauth2\/v2\.0\/token$/i.exec(path))) {
      if (req.method !== "POST") return send(ctx, 405, oauthError("invalid_request", "use POST"), { Allow: "POST" });
      ctx.route = "entra";
      state.counters.entra.requests++;
      return await entraToken(ctx, decodeURIComponent(m[1])); // takes its fault after reading the body
    }
    if ((m = /^\/([^/]+)\/(v2\.0\/)?\.well-known\/openid-configuration$/i.exec(path)) && req.method === "GET")
      return openidConfiguration(ctx, decodeURIComponent(m[1]), Boolean(m[2]));
    if (/^\/[^/]+\/discovery(\/v2\.0)?\/keys$/i.test(path) && req.method === "GET")
      return send(ctx, 200, jwks);
    if (lower === "/common/discovery/instance" && req.method === "GET")
      return instanceDiscovery(ctx);
    if (lower.startsWith("/control/"))
      return await control(ctx, lower, url.searchParams);
    return send(ctx, 404, oauthError("not_found", `no route ${req.method} ${path}`));
  } catch (e) {
    process.stderr.write(`tokensvc: ${req.method} ${(req.url || "").split("?")[0]}: ${e && e.message}\n`);
    send(ctx, 500, oauthError("server_error", "tokensvc internal error"));
  }
}

// ---------------------------------------------------------------------------------------------
// Start

writeFederatedToken(opts.federatedToken ?? signJwt(federatedClaims()));

function listen(server, hp) {
  return new Promise((res, rej) => {
    server.once("error", rej);
    server.listen(hp.port, hp.host, () => { server.off("error", rej); res(server.address()); });
  });
}

const fmtUrl = (scheme, a) => `${scheme}://${a.family === "IPv6" ? `[${a.address}]` : a.address}:${a.port}`;

const servers = [];
try {
  const plain = http.createServer((req, res) => handle(req, res, "http"));
  servers.push(plain);
  urls.http = fmtUrl("http", await listen(plain, parseHostPort(opts.listen, "--listen")));
  if (opts.tlsListen) {
    const tls = https.createServer({ cert: readFileSync(opts.tlsCert), key: readFileSync(opts.tlsKey) }, (req, res) => handle(req, res, "https"));
    servers.push(tls);
    urls.https = fmtUrl("https", await listen(tls, parseHostPort(opts.tlsListen, "--tls-listen")));
  }
} catch (e) {
  process.stderr.write(`tokensvc: cannot listen: ${e.message}\n`);
  process.exit(1);
}
for (const s of servers) s.on("clientError", (err, socket) => socket.destroy());

function stop() {
  for (const s of servers) {
    s.close();
    s.closeAllConnections();
  }
  // Exit even if a delayed answer is still pending.
  setImmediate(() => process.exit(0));
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
// A parent that went away must not kill us with EPIPE on the one line we print.
process.stdout.on("error", () => {});

process.stdout.write(`tokensvc ready http=${urls.http}${urls.https ? ` https=${urls.https}` : ""} dir=${dir}\n`);
