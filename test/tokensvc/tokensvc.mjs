#!/usr/bin/env node
// tokensvc: a test-only stand-in for the Azure identity endpoints (IMDS, App Service, Azure Arc,
// Entra ID v2 token endpoint). It issues RS256 JWTs signed with a throwaway key so that sbpg's
// token providers and sbemu's JWT verification can be exercised without Azure. See README.md.
//
//   node test/tokensvc/tokensvc.mjs --dir DIR [--listen 127.0.0.1:0]
//        [--tls-listen 127.0.0.1:0 --tls-cert FILE --tls-key FILE] [--lifetime SECONDS]
//        [--tenant TENANT] [--client-secret S] [--federated-token T] [--identity-header H]
//
// Writes DIR/signing.pub.pem, DIR/jwks.json, DIR/federated-token, DIR/arc/<random>.key, then prints
//   tokensvc ready http=http://127.0.0.1:P [https=https://127.0.0.1:Q] dir=DIR
// Secrets (client secret, identity header, federated token, Arc key, issued tokens) are never
// printed; DIR/tokensvc.log gets one line per request, without query strings or bodies.
import http from "node:http";
import https from "node:https";
import { createHash, createHmac, generateKeyPairSync, randomBytes, randomUUID, sign as cryptoSign } from "node:crypto";
import { appendFileSync, chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

// ---------------------------------------------------------------------------------------------
// Options

const DEFAULTS = {
  listen: "127.0.0.1:0",
  lifetime: 3600,
  tenant: "72f988bf-0000-0000-0000-000000000001",
  clientSecret: "test-client-secret",
  identityHeader: "test-identity-header",
};

// A fixed, JWT-shaped projected service account token (header.payload.signature, base64url). It is
// never verified; the token endpoint only compares it with the content of DIR/federated-token.
const b64u = (buf) => Buffer.from(buf).toString("base64url");
const DEFAULT_FEDERATED_TOKEN = [
  b64u(JSON.stringify({ alg: "RS256", kid: "tokensvc-federation", typ: "JWT" })),
  b64u(JSON.stringify({
    aud: ["api://AzureADTokenExchange"],
    exp: 4102444800,
    iat: 1700000000,
    iss: "https://oidc.tokensvc.test/",
    nbf: 1700000000,
    sub: "system:serviceaccount:default:sbpg",
  })),
  b64u(createHash("sha256").update("tokensvc federated token signature").digest()),
].join(".");

function usage(msg) {
  process.stderr.write(`tokensvc: ${msg}\n` +
    "usage: tokensvc.mjs --dir DIR [--listen HOST:PORT] [--tls-listen HOST:PORT --tls-cert FILE --tls-key FILE]\n" +
    "       [--lifetime SECONDS] [--tenant TENANT] [--client-secret S] [--federated-token T] [--identity-header H]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const names = {
    "--dir": "dir", "--listen": "listen", "--tls-listen": "tlsListen", "--tls-cert": "tlsCert",
    "--tls-key": "tlsKey", "--lifetime": "lifetime", "--tenant": "tenant", "--client-secret": "clientSecret",
    "--federated-token": "federatedToken", "--identity-header": "identityHeader",
  };
  const o = { ...DEFAULTS };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i], v;
    const eq = a.indexOf("=");
    if (a.startsWith("--") && eq > 0) { v = a.slice(eq + 1); a = a.slice(0, eq); }
    if (a === "--help" || a === "-h") usage("help");
    const key = names[a];
    if (!key) usage(`unknown option ${a}`);
    if (v === undefined) {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      v = argv[++i];
    }
    o[key] = v;
  }
  if (!o.dir) usage("--dir is required");
  o.lifetime = Number(o.lifetime);
  if (!Number.isInteger(o.lifetime) || o.lifetime < 1) usage("--lifetime must be a positive integer (seconds)");
  if (o.tlsListen && (!o.tlsCert || !o.tlsKey)) usage("--tls-listen needs --tls-cert and --tls-key");
  if (!o.tenant) usage("--tenant must not be empty");
  return o;
}

function parseHostPort(s, what) {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(s);
  if (!m) usage(`${what} must be HOST:PORT, got ${s}`);
  return { host: m[1] ?? m[2], port: Number(m[3]) };
}

const opts = parseArgs(process.argv.slice(2));
const dir = resolve(opts.dir);

// ---------------------------------------------------------------------------------------------
// Key material and files

const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const jwk = publicKey.export({ format: "jwk" });
// RFC 7638 thumbprint as key id.
const kid = b64u(createHash("sha256").update(JSON.stringify({ e: jwk.e, kty: "RSA", n: jwk.n })).digest());
const jwks = { keys: [{ kty: "RSA", use: "sig", alg: "RS256", kid, n: jwk.n, e: jwk.e }] };

mkdirSync(join(dir, "arc"), { recursive: true, mode: 0o755 });
const files = {
  publicKey: join(dir, "signing.pub.pem"),
  jwks: join(dir, "jwks.json"),
  federatedToken: join(dir, "federated-token"),
  arcKey: join(dir, "arc", `${randomBytes(8).toString("hex")}.key`),
  log: join(dir, "tokensvc.log"),
};
// Test fixture: readable by other local users (sbpg's backend runs as the postgres user).
const writePublic = (path, text) => { writeFileSync(path, text); chmodSync(path, 0o644); };
writePublic(files.publicKey, publicKey.export({ type: "spki", format: "pem" }));
writePublic(files.jwks, JSON.stringify(jwks, null, 2) + "\n");
writePublic(files.federatedToken, opts.federatedToken ?? DEFAULT_FEDERATED_TOKEN);
const arcSecret = randomBytes(32).toString("hex");
writePublic(files.arcKey, arcSecret);
writeFileSync(files.log, "");

// The accepted client assertion is what DIR/federated-token holds now (re-read per request, so a
// test can rotate it the way kubelet does); the start value if the file cannot be read.
function currentFederatedToken() {
  try {
    return readFileSync(files.federatedToken, "utf8").replace(/\r?\n$/, "");
  } catch {
    return opts.federatedToken ?? DEFAULT_FEDERATED_TOKEN;
  }
}

// ---------------------------------------------------------------------------------------------
// State: counters, issued tokens, faults, runtime config

const AUDIENCE_SB = "https://servicebus.azure.net";
const WRONG_AUDIENCE = "https://storage.azure.com";
const ISSUED_KEEP = 200;

const state = {
  lifetime: opts.lifetime,
  requests: null,
  errorsServed: 0,
  dropped: 0,
  issued: [],
  faults: null,
};
function resetState() {
  state.lifetime = opts.lifetime;
  state.requests = { imds: 0, app_service: 0, arc_challenge: 0, arc: 0, entra_secret: 0, entra_assertion: 0, openid: 0 };
  state.errorsServed = 0;
  state.dropped = 0;
  state.issued = [];
  state.faults = { status: 0, count: 0, delay_ms: 0, wrong_audience: 0, down_until: 0 };
}
resetState();

const urls = { http: null, https: null };

function faultsView() {
  const f = state.faults;
  return {
    status: f.count > 0 ? f.status : null,
    count: f.count,
    delay_ms: f.delay_ms,
    wrong_audience: f.wrong_audience,
    down_ms_remaining: Math.max(0, f.down_until - Date.now()),
  };
}

function configView() {
  return {
    tenant: opts.tenant,
    lifetime: state.lifetime,
    start_lifetime: opts.lifetime,
    issuer: issuer(),
    kid,
    dir,
    http: urls.http,
    https: urls.https,
    public_key_file: files.publicKey,
    jwks_file: files.jwks,
    federated_token_file: files.federatedToken,
    arc_key_file: files.arcKey,
    log_file: files.log,
  };
}

// ---------------------------------------------------------------------------------------------
// Tokens

const issuer = () => `https://sts.windows.net/${opts.tenant}/`;

/** A stable GUID-formatted id derived from a string. */
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

function signJwt(header, payload) {
  const input = `${b64u(JSON.stringify(header))}.${b64u(JSON.stringify(payload))}`;
  return `${input}.${b64u(cryptoSign("RSA-SHA256", Buffer.from(input), privateKey))}`;
}

/**
 * Issues a token. `identity` = { kind, clientId, oid, appidacr, miResId? }.
 * Returns { token, now, exp, lifetime, aud }.
 */
function issue(kind, identity, resourceOrScope) {
  const lifetime = state.lifetime;
  const now = Math.floor(Date.now() / 1000);
  const exp = now + lifetime;
  let aud = audienceOf(resourceOrScope);
  if (state.faults.wrong_audience > 0) {
    state.faults.wrong_audience--;
    aud = WRONG_AUDIENCE;
  }
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
    uti: b64u(randomBytes(16)),
    ver: "1.0",
  };
  if (identity.miResId) payload.xms_mirid = identity.miResId;
  const token = signJwt({ typ: "JWT", alg: "RS256", kid }, payload);
  state.issued.push({ kind, sub: payload.sub, oid: payload.oid, aud, iat: now, exp, lifetime, client_id: identity.clientId });
  if (state.issued.length > ISSUED_KEEP) state.issued.splice(0, state.issued.length - ISSUED_KEEP);
  return { token, now, exp, lifetime, aud };
}

/**
 * The managed identity a request selects. `selectors` maps query names to their meaning
 * ("client_id" | "object_id" | "resource_id"). System-assigned when none is given.
 */
function managedIdentity(kind, query, selectors) {
  const given = Object.keys(selectors).filter((k) => query.get(k));
  if (given.length > 1) return { error: `Only one of ${Object.keys(selectors).join(", ")} may be given` };
  if (given.length === 0) {
    const oid = guidFrom(`${kind}|system|oid`);
    return { kind, system: true, clientId: guidFrom(`${kind}|system|client_id`), oid, appidacr: "2" };
  }
  const name = given[0];
  const value = query.get(name);
  const meaning = selectors[name];
  const id = { kind, system: false, appidacr: "2" };
  if (meaning === "client_id") {
    id.clientId = value;
    id.oid = guidFrom(`${kind}|client_id|${value.toLowerCase()}`);
  } else if (meaning === "object_id") {
    id.oid = GUID_RE.test(value) ? value.toLowerCase() : guidFrom(`${kind}|object_id|${value}`);
    id.clientId = guidFrom(`${kind}|object_id|${value.toLowerCase()}|client_id`);
  } else {
    id.miResId = value;
    id.oid = guidFrom(`${kind}|resource_id|${value.toLowerCase()}`);
    id.clientId = guidFrom(`${kind}|resource_id|${value.toLowerCase()}|client_id`);
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

function send(ctx, status, body, headers = {}) {
  const { res } = ctx;
  if (ctx.answered || res.destroyed) return;
  ctx.answered = true;
  if (ctx.tokenRoute && status >= 400 && !ctx.challenge) state.errorsServed++;
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

const oauthError = (error, description, extra = {}) => ({ error, error_description: description, ...extra });

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

const FAULT_BODIES = {
  404: ["not_found", "tokensvc fault: identity not found (IMDS is updating)"],
  410: ["gone", "tokensvc fault: IMDS is upgrading"],
  429: ["too_many_requests", "tokensvc fault: too many requests"],
  500: ["server_error", "tokensvc fault: internal server error"],
  502: ["bad_gateway", "tokensvc fault: bad gateway"],
  503: ["temporarily_unavailable", "tokensvc fault: service unavailable"],
  504: ["gateway_timeout", "tokensvc fault: gateway timeout"],
};

/**
 * Applies the faults to a token-route request. Returns true when the request has been dealt with
 * (dropped or answered with a fault status).
 */
async function applyFaults(ctx) {
  const f = state.faults;
  if (f.down_until > Date.now()) {
    state.dropped++;
    ctx.answered = true;
    log(ctx.req, "dropped", ctx.started, ctx.listener);
    ctx.req.socket.destroy();
    return true;
  }
  if (f.delay_ms > 0) await sleep(f.delay_ms);
  if (f.count > 0) {
    f.count--;
    const [error, description] = FAULT_BODIES[f.status] ?? ["fault", `tokensvc fault: status ${f.status}`];
    send(ctx, f.status, oauthError(error, description), f.status === 429 ? { "Retry-After": "1" } : {});
    return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Routes

/** 2019-11-01 or a later date-versioned api-version (with an optional suffix such as -preview). */
function arcApiVersionOk(v) {
  const m = /^(\d{4}-\d{2}-\d{2})(-[A-Za-z0-9.]+)?$/.exec(v || "");
  return Boolean(m) && m[1] >= "2019-11-01";
}

async function imds(ctx, url) {
  state.requests.imds++;
  if (await applyFaults(ctx)) return;
  const q = url.searchParams;
  if (ctx.req.headers["metadata"] !== "true")
    return send(ctx, 400, oauthError("invalid_request", "Required metadata header not specified"));
  if (!q.get("api-version"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'api-version' is missing"));
  if (!q.get("resource"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'resource' is missing"));
  const id = managedIdentity("imds", q, { client_id: "client_id", object_id: "object_id", msi_res_id: "resource_id", mi_res_id: "resource_id" });
  if (id.error) return send(ctx, 400, oauthError("invalid_request", id.error));
  const t = issue("imds", id, q.get("resource"));
  send(ctx, 200, imdsBody(t, q.get("resource"), id));
}

function imdsBody(t, resource, id) {
  return {
    access_token: t.token,
    refresh_token: "",
    expires_in: String(t.lifetime),
    expires_on: String(t.exp),
    ext_expires_in: String(t.lifetime),
    not_before: String(t.now),
    resource,
    token_type: "Bearer",
    client_id: id.clientId,
  };
}

async function appService(ctx, url) {
  state.requests.app_service++;
  if (await applyFaults(ctx)) return;
  const q = url.searchParams;
  const header = ctx.req.headers["x-identity-header"];
  if (header === undefined)
    return send(ctx, 400, oauthError("invalid_request", "Required header X-IDENTITY-HEADER is missing"));
  if (header !== opts.identityHeader)
    return send(ctx, 401, oauthError("unauthorized", "X-IDENTITY-HEADER does not match"));
  if (!q.get("api-version"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'api-version' is missing"));
  if (!q.get("resource"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'resource' is missing"));
  const id = managedIdentity("app_service", q, { client_id: "client_id", principal_id: "object_id", object_id: "object_id", mi_res_id: "resource_id" });
  if (id.error) return send(ctx, 400, oauthError("invalid_request", id.error));
  const t = issue("app_service", id, q.get("resource"));
  send(ctx, 200, {
    access_token: t.token,
    expires_on: String(t.exp),
    resource: q.get("resource"),
    token_type: "Bearer",
    client_id: id.clientId,
  });
}

async function arc(ctx, url) {
  const auth = ctx.req.headers["authorization"];
  if (auth === undefined) state.requests.arc_challenge++;
  else state.requests.arc++;
  if (await applyFaults(ctx)) return;
  const q = url.searchParams;
  if (ctx.req.headers["metadata"] !== "true")
    return send(ctx, 400, oauthError("invalid_request", "Required metadata header not specified"));
  if (!arcApiVersionOk(q.get("api-version")))
    return send(ctx, 400, oauthError("invalid_request", "api-version must be 2019-11-01 or later"));
  if (!q.get("resource"))
    return send(ctx, 400, oauthError("invalid_request", "Required query variable 'resource' is missing"));
  const challenge = { "WWW-Authenticate": `Basic realm=${files.arcKey}` };
  if (auth === undefined) {
    ctx.challenge = true;
    return send(ctx, 401, oauthError("unauthorized", "Authorization header is required; read the key file named in WWW-Authenticate"), challenge);
  }
  if (auth !== `Basic ${arcSecret}`)
    return send(ctx, 401, oauthError("unauthorized", "The Authorization header does not carry the current key"), challenge);
  // Azure Arc only has a system-assigned identity.
  const id = managedIdentity("arc", new URLSearchParams(), {});
  const t = issue("arc", id, q.get("resource"));
  send(ctx, 200, imdsBody(t, q.get("resource"), id));
}

const ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ALLOWED_SCOPES = new Set([`${AUDIENCE_SB}/.default`, `${AUDIENCE_SB}//.default`]);
const OIDC_SCOPES = new Set(["openid", "profile", "offline_access", "email"]);

const tenantMatches = (t) => t.toLowerCase() === opts.tenant.toLowerCase();

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
  if (isAssertion) state.requests.entra_assertion++;
  else state.requests.entra_secret++;
  if (await applyFaults(ctx)) return;
  if (!tenantMatches(tenant))
    return send(ctx, 400, entraError("invalid_request", 90002, `Tenant '${tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.`, req));
  const ctype = (req.headers["content-type"] || "").split(";")[0].trim().toLowerCase();
  if (ctype !== "application/x-www-form-urlencoded")
    return send(ctx, 400, entraError("invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.", req));
  const grant = p.get("grant_type");
  if (!grant) return send(ctx, 400, entraError("invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.", req));
  if (grant !== "client_credentials")
    return send(ctx, 400, entraError("unsupported_grant_type", 70003, `The app requested an unsupported grant type '${grant}'.`, req));
  const clientId = p.get("client_id");
  if (!clientId) return send(ctx, 400, entraError("invalid_request", 900144, "The request body must contain the following parameter: 'client_id'.", req));
  const scopes = (p.get("scope") || "").split(/\s+/).filter((s) => s && !OIDC_SCOPES.has(s));
  if (scopes.length !== 1 || !ALLOWED_SCOPES.has(scopes[0]))
    return send(ctx, 400, entraError("invalid_scope", 1002012, `The provided value for scope ${p.get("scope") || "(none)"} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI); this service only knows ${AUDIENCE_SB}.`, req));
  let kind;
  if (isAssertion) {
    if (p.get("client_assertion_type") !== ASSERTION_TYPE)
      return send(ctx, 400, entraError("invalid_request", 700010, `client_assertion_type must be ${ASSERTION_TYPE}.`, req));
    if (p.get("client_assertion") !== currentFederatedToken())
      return send(ctx, 401, entraError("invalid_client", 700211, "No matching federated identity record found for presented assertion.", req));
    kind = "entra_assertion";
  } else if (p.has("client_secret")) {
    if (p.get("client_secret") !== opts.clientSecret)
      return send(ctx, 401, entraError("invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.", req));
    kind = "entra_secret";
  } else {
    return send(ctx, 401, entraError("invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.", req));
  }
  // One app registration per (tenant, client id): the secret and the federated credential are two
  // ways to authenticate the same service principal.
  const id = { clientId, oid: guidFrom(`entra|${opts.tenant.toLowerCase()}|${clientId.toLowerCase()}`), appidacr: kind === "entra_secret" ? "1" : "2" };
  const t = issue(kind, id, scopes[0]);
  send(ctx, 200, {
    token_type: "Bearer",
    expires_in: t.lifetime,
    ext_expires_in: t.lifetime,
    access_token: t.token,
  });
}

function baseUrl(req) {
  const scheme = req.socket.encrypted ? "https" : "http";
  const host = req.headers.host || (scheme === "https" ? new URL(urls.https).host : new URL(urls.http).host);
  return `${scheme}://${host}`;
}

function openidConfiguration(ctx, tenantSeg, v2) {
  state.requests.openid++;
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

function control(ctx, url, path) {
  const { req } = ctx;
  const q = url.searchParams;
  const int = (name, min = 0) => {
    const v = Number(q.get(name));
    if (!Number.isInteger(v) || v < min) throw Object.assign(new Error(`${name} must be an integer >= ${min}`), { status: 400 });
    return v;
  };
  try {
    if (path === "/control/stats") {
      if (req.method !== "GET") return send(ctx, 405, oauthError("method_not_allowed", "use GET"), { Allow: "GET" });
      return send(ctx, 200, {
        requests: state.requests,
        errors_served: state.errorsServed,
        dropped: state.dropped,
        issued: state.issued,
        config: configView(),
        faults: faultsView(),
      });
    }
    if (req.method !== "POST") return send(ctx, 405, oauthError("method_not_allowed", "use POST"), { Allow: "POST" });
    if (path === "/control/config") {
      if (q.has("lifetime")) state.lifetime = int("lifetime", 1);
      return send(ctx, 200, configView());
    }
    if (path === "/control/faults") {
      const f = state.faults;
      if (q.has("status")) {
        const status = int("status", 400);
        if (status > 599) throw Object.assign(new Error("status must be 400..599"), { status: 400 });
        f.status = status;
        f.count = q.has("count") ? int("count") : 1;
      } else if (q.has("count")) {
        throw Object.assign(new Error("count needs status"), { status: 400 });
      }
      if (q.has("delay_ms")) f.delay_ms = int("delay_ms");
      if (q.has("wrong_audience")) f.wrong_audience = int("wrong_audience");
      if (q.has("down_ms")) f.down_until = Date.now() + int("down_ms");
      return send(ctx, 200, faultsView());
    }
    if (path === "/control/reset") {
      resetState();
      return send(ctx, 200, { ok: true, config: configView(), faults: faultsView() });
    }
    return send(ctx, 404, oauthError("not_found", `no control route ${path}`));
  } catch (e) {
    return send(ctx, e.status || 500, oauthError("invalid_request", e.message));
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

async function handle(req, res, listener) {
  const ctx = { req, res, listener, started: Date.now(), answered: false, tokenRoute: false, challenge: false };
  try {
    const url = new URL(req.url || "/", "http://tokensvc.invalid");
    // msal-node appends a slash to the IMDS endpoint (".../oauth2/token/?api-version=...").
    const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, "") : url.pathname;
    const lower = path.toLowerCase();
    let m;

    if (lower === "/metadata/identity/oauth2/token") {
      ctx.tokenRoute = true;
      if (req.method !== "GET") return send(ctx, 405, oauthError("invalid_request", "use GET"), { Allow: "GET" });
      return await imds(ctx, url);
    }
    if (lower === "/msi/token") {
      ctx.tokenRoute = true;
      if (req.method !== "GET") return send(ctx, 405, oauthError("invalid_request", "use GET"), { Allow: "GET" });
      return await appService(ctx, url);
    }
    if (lower === "/arc/token") {
      ctx.tokenRoute = true;
      if (req.method !== "GET") return send(ctx, 405, oauthError("invalid_request", "use GET"), { Allow: "GET" });
      return await arc(ctx, url);
    }
    if ((m = /^\/([^/]+)\/oauth2\/v2\.0\/token$/i.exec(path))) {
      ctx.tokenRoute = true;
      if (req.method !== "POST") return send(ctx, 405, oauthError("invalid_request", "use POST"), { Allow: "POST" });
      return await entraToken(ctx, decodeURIComponent(m[1]));
    }
    if ((m = /^\/([^/]+)\/(v2\.0\/)?\.well-known\/openid-configuration$/i.exec(path)) && req.method === "GET")
      return openidConfiguration(ctx, decodeURIComponent(m[1]), Boolean(m[2]));
    if (/^\/[^/]+\/discovery(\/v2\.0)?\/keys$/i.test(path) && req.method === "GET")
      return send(ctx, 200, jwks);
    if (lower === "/common/discovery/instance" && req.method === "GET")
      return instanceDiscovery(ctx);
    if (lower.startsWith("/control/"))
      return control(ctx, url, lower);
    return send(ctx, 404, oauthError("not_found", `no route ${req.method} ${path}`));
  } catch (e) {
    process.stderr.write(`tokensvc: ${req.method} ${(req.url || "").split("?")[0]}: ${e && e.message}\n`);
    send(ctx, 500, oauthError("server_error", "tokensvc internal error"));
  }
}

// ---------------------------------------------------------------------------------------------
// Listeners

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

process.stdout.write(`tokensvc ready http=${urls.http}${urls.https ? ` https=${urls.https}` : ""} dir=${dir}\n`);
