// Fidelity tests for tokensvc: the official @azure/identity (4.13.0, with msal-node) obtains tokens
// from every route, over plain HTTP (managed identity sources) and HTTPS with a throwaway CA
// (Entra ID token endpoint), and its retries cope with the injected faults.
// Run: node --test test/tokensvc/
import { describe, it, before, after, beforeEach } from "node:test";
import assert from "node:assert/strict";
import { createPublicKey, randomUUID } from "node:crypto";
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, isAbsolute, join } from "node:path";
import { startTokensvc, getToken, verifyJwt as verifyJwtIn, makeTestCa } from "./harness.mjs";
import { startSbemu, configWith, queue, sbemuBin } from "../conformance/lib/sbemu.mjs";

const TENANT = "72f988bf-0000-0000-0000-000000000001";
const SB = "https://servicebus.azure.net";
const SCOPE = `${SB}/.default`;
const CLIENT_SECRET = "test-client-secret";
const IDENTITY_HEADER = "test-identity-header";

const verifyJwt = (svc, jwt) => verifyJwtIn(svc.dir, jwt);

/** Checks the claims common to every token; returns them. */
function checkClaims(svc, result, { aud = SB, lifetime = 3600, appid } = {}) {
  assert.equal(result.ok, true, `token obtained: ${JSON.stringify(result)}`);
  const { claims } = verifyJwt(svc, result.token);
  const now = Math.floor(Date.now() / 1000);
  assert.equal(claims.aud, aud);
  assert.equal(claims.iss, `https://sts.windows.net/${TENANT}/`);
  assert.equal(claims.tid, TENANT);
  assert.equal(claims.idtyp, "app");
  assert.ok(claims.ver);
  assert.equal(claims.exp - claims.iat, lifetime);
  assert.ok(claims.nbf <= now + 1 && claims.iat <= now + 1 && claims.iat >= now - 60);
  assert.match(claims.oid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.equal(claims.sub, claims.oid);
  assert.equal(claims.azp, claims.appid);
  if (appid) assert.equal(claims.appid, appid);
  // What @azure/identity reports as the expiry is the token's exp. MSAL counts expires_in from the
  // moment it sent the first request, so time spent in retries makes it report a little earlier.
  const skew = claims.exp * 1000 - result.expiresOnTimestamp;
  assert.ok(skew >= -1500 && skew <= result.ms + 2000, `expiresOnTimestamp ${result.expiresOnTimestamp} vs exp ${claims.exp} (took ${result.ms} ms)`);
  return claims;
}

describe("tokensvc", () => {
  let svc, ca;
  const imdsEnv = () => ({ AZURE_POD_IDENTITY_AUTHORITY_HOST: svc.http });
  const appServiceEnv = (header = IDENTITY_HEADER) => ({ IDENTITY_ENDPOINT: `${svc.http}/msi/token`, IDENTITY_HEADER: header });
  const tlsEnv = () => ({ NODE_EXTRA_CA_CERTS: join(ca, "ca.pem") });
  const entraOptions = (extra = {}) => ({ authorityHost: svc.https, disableInstanceDiscovery: true, ...extra });
  const secretCred = (secret = CLIENT_SECRET, clientId = "app-secret-client") => ({
    credential: "ClientSecretCredential", args: [TENANT, clientId, secret], options: entraOptions(),
  });
  const workloadCred = (clientId = "app-workload-client") => ({
    credential: "WorkloadIdentityCredential",
    options: entraOptions({ tenantId: TENANT, clientId, tokenFilePath: join(svc.dir, "federated-token") }),
  });
  const imdsUrl = (q = "") => `${svc.http}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${encodeURIComponent(SB)}${q}`;
  const tokenUrl = (base, tenant = TENANT) => `${base}/${tenant}/oauth2/v2.0/token`;
  const form = (fields) => ({
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(fields).toString(),
  });

  before(async () => {
    ca = makeTestCa().dir;
    svc = await startTokensvc({ args: ["--tls-listen", "127.0.0.1:0", "--tls-cert", join(ca, "server.pem"), "--tls-key", join(ca, "server.key")] });
  });
  after(async () => {
    if (svc) {
      const { code, signal } = await svc.stop();
      assert.equal(signal, null);
      assert.equal(code, 0, "SIGTERM ends tokensvc with exit code 0");
      rmSync(svc.tmp, { recursive: true, force: true });
    }
    if (ca) rmSync(dirname(ca), { recursive: true, force: true });
  });
  beforeEach(async () => {
    if (svc) await svc.ctl("POST", "/control/reset");
  });

  it("writes its key material and prints one readiness line", async () => {
    assert.match(svc.line, /^tokensvc ready http=http:\/\/127\.0\.0\.1:\d+ https=https:\/\/127\.0\.0\.1:\d+ dir=\/\S+$/);
    assert.ok(isAbsolute(svc.dir));
    assert.equal(svc.stdout, svc.line + "\n", "exactly one line on stdout");
    const pem = readFileSync(join(svc.dir, "signing.pub.pem"), "utf8");
    assert.match(pem, /^-----BEGIN PUBLIC KEY-----/);
    const jwks = JSON.parse(readFileSync(join(svc.dir, "jwks.json"), "utf8"));
    assert.equal(jwks.keys.length, 1);
    const k = jwks.keys[0];
    for (const f of ["kty", "n", "e", "kid", "use", "alg"]) assert.ok(k[f], `jwks key has ${f}`);
    assert.deepEqual([k.kty, k.use, k.alg], ["RSA", "sig", "RS256"]);
    assert.equal(createPublicKey({ key: k, format: "jwk" }).export({ type: "spki", format: "pem" }), pem);
    assert.match(readFileSync(join(svc.dir, "federated-token"), "utf8"), /^[\w-]+\.[\w-]+\.[\w-]+$/);
    const st = await svc.stats();
    assert.ok(st.config.arc_key_file.startsWith(join(svc.dir, "arc") + "/") && st.config.arc_key_file.endsWith(".key"));
    assert.ok(statSync(st.config.arc_key_file).size > 0);
    assert.equal(st.config.lifetime, 3600);
    assert.equal(st.config.tenant, TENANT);
    assert.deepEqual(Object.keys(st.requests).sort(), ["app_service", "arc", "arc_challenge", "entra_assertion", "entra_secret", "imds", "openid"]);
  });

  describe("IMDS", () => {
    it("ManagedIdentityCredential (system-assigned) gets a token via AZURE_POD_IDENTITY_AUTHORITY_HOST", async () => {
      const r = await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv());
      const c = checkClaims(svc, r);
      const again = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()));
      assert.equal(again.oid, c.oid, "the system-assigned identity has a stable oid");
      const st = await svc.stats();
      assert.equal(st.requests.imds, 2);
      assert.equal(st.errors_served, 0);
      assert.equal(st.issued.length, 2);
      assert.deepEqual(
        { kind: st.issued[0].kind, sub: st.issued[0].sub, aud: st.issued[0].aud, exp: st.issued[0].exp, lifetime: st.issued[0].lifetime, client_id: st.issued[0].client_id },
        { kind: "imds", sub: c.oid, aud: SB, exp: c.exp, lifetime: 3600, client_id: c.appid });
    });

    it("ManagedIdentityCredential with clientId, objectId and resourceId selects a user-assigned identity", async () => {
      const system = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()));
      const clientId = "11111111-2222-3333-4444-555555555555";
      const user = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential", options: { clientId } }, imdsEnv()), { appid: clientId });
      assert.notEqual(user.oid, system.oid);
      const user2 = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential", options: { clientId } }, imdsEnv()), { appid: clientId });
      assert.equal(user2.oid, user.oid, "stable oid per client id");
      const objectId = "99999999-8888-7777-6666-555555555555";
      const byObject = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential", options: { objectId } }, imdsEnv()));
      assert.equal(byObject.oid, objectId);
      const resourceId = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/sbpg";
      const byRes = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential", options: { resourceId } }, imdsEnv()));
      assert.equal(byRes.xms_mirid, resourceId, "msi_res_id reached the service");
      const st = await svc.stats();
      assert.equal(st.issued[1].client_id, clientId);
    });

    it("answers the documented errors to hand-made requests", async () => {
      let res = await fetch(imdsUrl());
      assert.equal(res.status, 400);
      assert.deepEqual(await res.json(), { error: "invalid_request", error_description: "Required metadata header not specified" });
      res = await fetch(`${svc.http}/metadata/identity/oauth2/token?resource=${SB}`, { headers: { Metadata: "true" } });
      assert.equal(res.status, 400);
      res = await fetch(imdsUrl(), { headers: { Metadata: "true" } });
      assert.equal(res.status, 200);
      const b = await res.json();
      assert.deepEqual(Object.keys(b).sort(), ["access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before", "refresh_token", "resource", "token_type"]);
      for (const f of ["expires_in", "expires_on", "ext_expires_in", "not_before"]) assert.match(b[f], /^\d+$/, `${f} is a string of digits`);
      assert.equal(b.expires_in, "3600");
      assert.equal(Number(b.expires_on) - Number(b.not_before), 3600);
      assert.equal(b.resource, SB);
      assert.equal(b.token_type, "Bearer");
      // A resource with a trailing slash still yields the bare audience.
      res = await fetch(`${svc.http}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${SB}/`, { headers: { Metadata: "true" } });
      assert.equal(verifyJwt(svc, (await res.json()).access_token).claims.aud, SB);
      const st = await svc.stats();
      assert.equal(st.requests.imds, 4);
      assert.equal(st.errors_served, 2);
    });
  });

  describe("App Service", () => {
    it("ManagedIdentityCredential gets a token via IDENTITY_ENDPOINT + IDENTITY_HEADER", async () => {
      const sys = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, appServiceEnv()));
      const clientId = "22222222-3333-4444-5555-666666666666";
      const user = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential", options: { clientId } }, appServiceEnv()), { appid: clientId });
      assert.notEqual(sys.oid, user.oid);
      const imdsSys = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()));
      assert.notEqual(imdsSys.oid, sys.oid, "each source has its own system-assigned identity");
      const st = await svc.stats();
      assert.equal(st.requests.app_service, 2);
      assert.deepEqual(st.issued.map((i) => i.kind), ["app_service", "app_service", "imds"]);
    });

    it("refuses a wrong identity header (401) and a missing one (400)", async () => {
      const r = await getToken({ credential: "ManagedIdentityCredential", options: { retryOptions: { maxRetries: 0 } } }, appServiceEnv("not-the-header"));
      assert.equal(r.ok, false);
      let res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`);
      assert.equal(res.status, 400);
      res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": "nope" } });
      assert.equal(res.status, 401);
      res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": IDENTITY_HEADER } });
      assert.equal(res.status, 200);
      assert.deepEqual(Object.keys(await res.json()).sort(), ["access_token", "client_id", "expires_on", "resource", "token_type"]);
      const st = await svc.stats();
      assert.equal(st.requests.app_service, 4);
      assert.equal(st.issued.length, 1);
      assert.equal(st.errors_served, 3);
    });
  });

  describe("Azure Arc", () => {
    const arcEnv = () => ({ IDENTITY_ENDPOINT: `${svc.http}/arc/token`, IMDS_ENDPOINT: svc.http });

    it("follows the challenge protocol (plain fetch)", async () => {
      const url = `${svc.http}/arc/token?api-version=2020-06-01&resource=${encodeURIComponent(SB)}`;
      let res = await fetch(url, { headers: { Metadata: "true" } });
      assert.equal(res.status, 401);
      const realm = /^Basic realm=(.+)$/.exec(res.headers.get("www-authenticate"))?.[1];
      assert.ok(realm && isAbsolute(realm) && realm.endsWith(".key"), `realm ${realm}`);
      assert.equal(realm, (await svc.stats()).config.arc_key_file);
      const secret = readFileSync(realm, "utf8");
      res = await fetch(url, { headers: { Metadata: "true", Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 200);
      const body = await res.json();
      assert.equal(body.expires_in, "3600");
      assert.equal(verifyJwt(svc, body.access_token).claims.aud, SB);
      res = await fetch(url, { headers: { Metadata: "true", Authorization: "Basic wrong" } });
      assert.equal(res.status, 401);
      res = await fetch(url.replace("2020-06-01", "2019-11-01"), { headers: { Metadata: "true", Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 200, "api-version 2019-11-01 (msal-node, C++) is accepted");
      res = await fetch(url.replace("2020-06-01", "2019-08-01"), { headers: { Metadata: "true", Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 400, "an older api-version is refused");
      res = await fetch(url, { headers: { Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 400, "Metadata: true is required");
      const st = await svc.stats();
      assert.equal(st.requests.arc_challenge, 1);
      assert.equal(st.requests.arc, 5);
      assert.equal(st.errors_served, 3, "the challenge itself is not counted as an error");
      assert.deepEqual(st.issued.map((i) => i.kind), ["arc", "arc"]);
    });

    it("stock msal-node refuses a key file outside /var/opt/azcmagent/tokens (a documented limit)", async () => {
      const r = await getToken({ credential: "ManagedIdentityCredential" }, arcEnv());
      assert.equal(r.ok, false);
      assert.match(r.message, /invalid_file_path/);
      const st = await svc.stats();
      assert.equal(st.requests.arc_challenge, 1, "it got as far as the challenge");
      assert.equal(st.requests.arc, 0);
    });

    it("ManagedIdentityCredential gets a token when msal-node's key directory is redirected to DIR/arc", async () => {
      const r = await getToken({ credential: "ManagedIdentityCredential", arcKeyDir: join(svc.dir, "arc") }, arcEnv());
      checkClaims(svc, r);
      const st = await svc.stats();
      assert.equal(st.requests.arc_challenge, 1);
      assert.equal(st.requests.arc, 1);
      assert.equal(st.issued[0].kind, "arc");
    });
  });

  describe("Entra ID token endpoint (HTTPS)", () => {
    it("WorkloadIdentityCredential gets a token with the federated token file", async () => {
      const r = await getToken(workloadCred(), tlsEnv());
      const c = checkClaims(svc, r, { appid: "app-workload-client" });
      assert.equal(c.appidacr, "2");
      const st = await svc.stats();
      assert.equal(st.requests.entra_assertion, 1);
      assert.equal(st.requests.openid, 1, "MSAL read the OpenID configuration");
      assert.equal(st.issued[0].kind, "entra_assertion");
      assert.equal(st.issued[0].client_id, "app-workload-client");
    });

    it("WorkloadIdentityCredential and ManagedIdentityCredential (AKS token exchange) work from the webhook's environment variables", async () => {
      const env = {
        ...tlsEnv(),
        AZURE_CLIENT_ID: "app-env-client",
        AZURE_TENANT_ID: TENANT,
        AZURE_FEDERATED_TOKEN_FILE: join(svc.dir, "federated-token"),
        AZURE_AUTHORITY_HOST: svc.https,
      };
      const a = checkClaims(svc, await getToken({ credential: "WorkloadIdentityCredential", options: { disableInstanceDiscovery: true } }, env), { appid: "app-env-client" });
      // ManagedIdentityCredential switches to the token exchange (and disables instance discovery itself).
      const b = checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, env), { appid: "app-env-client" });
      assert.equal(a.oid, b.oid, "the same app registration");
      const st = await svc.stats();
      assert.equal(st.requests.entra_assertion, 2);
      assert.equal(st.requests.imds, 0);
    });

    it("accepts the rotated content of DIR/federated-token and refuses the old one", async () => {
      const file = join(svc.dir, "federated-token");
      const old = readFileSync(file, "utf8");
      const rotated = old.split(".").map((p, i) => (i === 2 ? Buffer.from("rotated").toString("base64url") : p)).join(".");
      writeFileSync(file, rotated);
      try {
        checkClaims(svc, await getToken(workloadCred(), tlsEnv()));
        const res = await fetch(tokenUrl(svc.http), form({
          grant_type: "client_credentials", client_id: "x", scope: SCOPE,
          client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", client_assertion: old,
        }));
        assert.equal(res.status, 401);
        assert.equal((await res.json()).error, "invalid_client");
      } finally {
        writeFileSync(file, old);
      }
    });

    it("ClientSecretCredential gets a token; a wrong secret is refused", async () => {
      const c = checkClaims(svc, await getToken(secretCred(), tlsEnv()), { appid: "app-secret-client" });
      assert.equal(c.appidacr, "1");
      const bad = await getToken(secretCred("not-the-secret"), tlsEnv());
      assert.equal(bad.ok, false);
      // @azure/identity turns MSAL's ServerError into AuthenticationRequiredError (as with real Entra ID).
      assert.equal(bad.name, "AuthenticationRequiredError");
      assert.match(bad.message, /invalid_client/);
      assert.match(bad.message, /AADSTS7000215/);
      const st = await svc.stats();
      assert.equal(st.requests.entra_secret, 2);
      assert.equal(st.issued.length, 1);
      assert.equal(st.errors_served, 1);
    });

    it("is refused by a client that does not trust the test CA", async () => {
      const r = await getToken(secretCred(), {});
      assert.equal(r.ok, false);
      // MSAL swallows the TLS error of the OpenID configuration request and reports this:
      assert.match(r.message, /endpoints_resolution_error/);
      const st = await svc.stats();
      assert.equal(st.requests.openid, 0, "no request got through the TLS handshake");
      assert.equal(st.requests.entra_secret, 0);
      const e = await fetch(`${svc.https}/${TENANT}/v2.0/.well-known/openid-configuration`).catch((err) => err);
      assert.ok(e instanceof Error);
      assert.match(String(e.cause?.code), /CERT|SIGN|VERIFY|ISSUER/, `TLS error: ${e.cause?.code}`);
    });

    it("validates tenant, scope, grant and client credentials like Entra ID", async () => {
      const ok = { grant_type: "client_credentials", client_id: "c", client_secret: CLIENT_SECRET, scope: SCOPE };
      let res = await fetch(tokenUrl(svc.http), form(ok));
      assert.equal(res.status, 200);
      const b = await res.json();
      assert.deepEqual(Object.keys(b).sort(), ["access_token", "expires_in", "ext_expires_in", "token_type"]);
      assert.equal(b.expires_in, 3600);
      assert.equal(b.token_type, "Bearer");
      res = await fetch(tokenUrl(svc.http), form({ ...ok, scope: `${SB}//.default` }));
      assert.equal(res.status, 200, "the double-slash scope of some SDKs");
      assert.equal(verifyJwt(svc, (await res.json()).access_token).claims.aud, SB);
      res = await fetch(tokenUrl(svc.http), form({ ...ok, scope: "https://storage.azure.com/.default" }));
      assert.equal(res.status, 400);
      assert.equal((await res.json()).error, "invalid_scope");
      res = await fetch(tokenUrl(svc.http, "00000000-0000-0000-0000-00000000dead"), form(ok));
      assert.equal(res.status, 400);
      res = await fetch(tokenUrl(svc.http), form({ ...ok, grant_type: "password" }));
      assert.equal(res.status, 400);
      assert.equal((await res.json()).error, "unsupported_grant_type");
      const { client_secret, ...noCred } = ok;
      res = await fetch(tokenUrl(svc.http), form(noCred));
      assert.equal(res.status, 401);
      res = await fetch(tokenUrl(svc.http), form({ ...ok, client_secret: "wrong" }));
      assert.equal(res.status, 401);
      const err = await res.json();
      assert.equal(err.error, "invalid_client");
      assert.ok(Array.isArray(err.error_codes) && err.error_description);
      // OpenID configuration points back at the scheme and host the request came in on.
      res = await fetch(`${svc.http}/${TENANT}/v2.0/.well-known/openid-configuration`);
      const oidc = await res.json();
      assert.equal(oidc.token_endpoint, tokenUrl(svc.http));
      res = await fetch(`${svc.http}/nope/v2.0/.well-known/openid-configuration`);
      assert.equal(res.status, 400);
      const st = await svc.stats();
      assert.equal(st.requests.entra_secret, 7);
      assert.equal(st.requests.openid, 2);
      assert.equal(st.issued.length, 2);
    });
  });

  describe("faults and control", () => {
    it("429 twice, then @azure/identity's retry gets a token (IMDS)", async () => {
      await svc.ctl("POST", "/control/faults", { status: 429, count: 2 });
      const res = await fetch(imdsUrl(), { headers: { Metadata: "true" } });
      assert.equal(res.status, 429);
      assert.equal(res.headers.get("retry-after"), "1");
      assert.equal((await res.json()).error, "too_many_requests");
      const r = await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv());
      checkClaims(svc, r);
      assert.ok(r.ms >= 900, `waited for Retry-After (${r.ms} ms)`);
      const st = await svc.stats();
      assert.equal(st.requests.imds, 3);
      assert.equal(st.errors_served, 2);
      assert.equal(st.issued.length, 1);
      assert.equal(st.faults.count, 0);
    });

    it("500 twice, then ClientSecretCredential's retry gets a token (HTTPS)", async () => {
      await svc.ctl("POST", "/control/faults", { status: 500, count: 2 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
      const st = await svc.stats();
      assert.equal(st.requests.entra_secret, 3);
      assert.equal(st.errors_served, 2);
      assert.equal(st.issued.length, 1);
    });

    it("404 and 503 on IMDS are retried too", async () => {
      await svc.ctl("POST", "/control/faults", { status: 404, count: 1 });
      checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()));
      await svc.ctl("POST", "/control/faults", { status: 503, count: 1 });
      checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, appServiceEnv()));
      const st = await svc.stats();
      assert.equal(st.requests.imds, 2);
      assert.equal(st.requests.app_service, 2);
      assert.equal(st.errors_served, 2);
    });

    it("wrong_audience yields a token for https://storage.azure.com, then correct ones", async () => {
      await svc.ctl("POST", "/control/faults", { wrong_audience: 1 });
      checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()), { aud: "https://storage.azure.com" });
      checkClaims(svc, await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv()), { aud: SB });
      const st = await svc.stats();
      assert.deepEqual(st.issued.map((i) => i.aud), ["https://storage.azure.com", SB]);
    });

    it("down_ms drops connections without an answer until it is over", async () => {
      await svc.ctl("POST", "/control/faults", { down_ms: 4000 });
      await assert.rejects(fetch(imdsUrl(), { headers: { Metadata: "true" } }), TypeError);
      const r = await getToken({ credential: "ManagedIdentityCredential", options: { retryOptions: { maxRetries: 0 } } }, imdsEnv());
      assert.equal(r.ok, false);
      let st = await svc.stats();
      assert.equal(st.dropped, 2);
      assert.equal(st.issued.length, 0);
      assert.ok(st.faults.down_ms_remaining > 0);
      // Control stays available; once the window is over tokens flow again.
      await new Promise((res) => setTimeout(res, st.faults.down_ms_remaining + 50));
      const res = await fetch(imdsUrl(), { headers: { Metadata: "true" } });
      assert.equal(res.status, 200);
      // A short outage is ridden out by @azure/identity's own retries (ECONNRESET is retriable).
      await svc.ctl("POST", "/control/faults", { down_ms: 1200 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
      st = await svc.stats();
      assert.ok(st.dropped >= 3, `dropped ${st.dropped}`);
    });

    it("delay_ms delays every token answer until reset", async () => {
      await svc.ctl("POST", "/control/faults", { delay_ms: 600 });
      let t0 = Date.now();
      assert.equal((await fetch(imdsUrl(), { headers: { Metadata: "true" } })).status, 200);
      assert.ok(Date.now() - t0 >= 550);
      t0 = Date.now();
      assert.equal((await fetch(imdsUrl(), { headers: { Metadata: "true" } })).status, 200);
      assert.ok(Date.now() - t0 >= 550, "still delayed");
      await svc.ctl("POST", "/control/reset");
      t0 = Date.now();
      assert.equal((await fetch(imdsUrl(), { headers: { Metadata: "true" } })).status, 200);
      assert.ok(Date.now() - t0 < 500, "not delayed after reset");
    });

    it("lifetime is configurable; @azure/identity honours expires_on (and refreshes at half-life beyond 2 h)", async () => {
      await svc.ctl("POST", "/control/config", { lifetime: 600 });
      let r = await getToken({ credential: "ManagedIdentityCredential" }, imdsEnv());
      checkClaims(svc, r, { lifetime: 600 });
      assert.ok(Math.abs(r.expiresOnTimestamp - (Date.now() + 600_000)) < 5000);
      r = await getToken(secretCred(), tlsEnv());
      checkClaims(svc, r, { lifetime: 600 });
      await svc.ctl("POST", "/control/config", { lifetime: 3 * 3600 });
      r = await getToken({ credential: "ManagedIdentityCredential" }, appServiceEnv());
      checkClaims(svc, r, { lifetime: 3 * 3600 });
      assert.ok(r.refreshAfterTimestamp && Math.abs(r.refreshAfterTimestamp - (Date.now() + 1.5 * 3600_000)) < 5000, `refreshAfterTimestamp ${r.refreshAfterTimestamp}`);
      let st = await svc.stats();
      assert.deepEqual(st.issued.map((i) => i.lifetime), [600, 600, 10800]);
      assert.equal(st.config.lifetime, 10800);
      await svc.ctl("POST", "/control/reset");
      st = await svc.stats();
      assert.equal(st.config.lifetime, 3600, "reset restores the start lifetime");
      assert.equal(st.issued.length, 0);
      assert.equal(Object.values(st.requests).reduce((a, b) => a + b, 0), 0);
    });

    it("control rejects bad input", async () => {
      let res = await fetch(`${svc.http}/control/faults?status=abc`, { method: "POST" });
      assert.equal(res.status, 400);
      res = await fetch(`${svc.http}/control/config?lifetime=0`, { method: "POST" });
      assert.equal(res.status, 400);
      res = await fetch(`${svc.http}/control/reset`);
      assert.equal(res.status, 405);
    });

    it("the same routes answer on both listeners", async () => {
      const res = await fetch(`${svc.https}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${SB}`, { headers: { Metadata: "true" } }).catch((e) => e);
      // This process does not trust the test CA: a TLS failure proves HTTPS is served there.
      assert.ok(res instanceof Error);
      const r = await getToken(secretCred(), tlsEnv());
      checkClaims(svc, r);
      const viaHttp = await fetch(`${svc.http}/${TENANT}/v2.0/.well-known/openid-configuration`);
      assert.equal(viaHttp.status, 200);
    });
  });

  it("never prints or logs secrets or tokens", async () => {
    // Produce some traffic with secrets in query strings, headers and bodies first.
    await fetch(imdsUrl("&client_id=secret-in-query"), { headers: { Metadata: "true" } });
    await getToken(secretCred(), tlsEnv());
    await getToken(workloadCred(), tlsEnv());
    const log = readFileSync(join(svc.dir, "tokensvc.log"), "utf8");
    assert.ok(log.split("\n").length > 10);
    const secrets = [CLIENT_SECRET, IDENTITY_HEADER, readFileSync(join(svc.dir, "federated-token"), "utf8"),
      readFileSync((await svc.stats()).config.arc_key_file, "utf8"), "secret-in-query", "eyJ"];
    for (const text of [log, svc.stdout, svc.stderr])
      for (const s of secrets) assert.ok(!text.includes(s), `no ${s.slice(0, 12)}... in output`);
    assert.ok(!log.includes("?"), "no query strings in the log");
  });
});

describe("tokensvc process", () => {
  it("starts without TLS, honours the options and exits 0 on SIGTERM", async () => {
    const svc = await startTokensvc({ args: ["--lifetime", "120", "--tenant", "tenant-b", "--client-secret", "s2", "--federated-token", "a.b.c", "--identity-header", "h2"] });
    try {
      assert.equal(svc.https, undefined);
      assert.match(svc.line, /^tokensvc ready http=http:\/\/127\.0\.0\.1:\d+ dir=\S+$/);
      assert.equal(readFileSync(join(svc.dir, "federated-token"), "utf8"), "a.b.c");
      let res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": "h2" } });
      assert.equal(res.status, 200);
      const claims = JSON.parse(Buffer.from((await res.json()).access_token.split(".")[1], "base64url"));
      assert.equal(claims.exp - claims.iat, 120);
      assert.equal(claims.tid, "tenant-b");
      assert.equal(claims.iss, "https://sts.windows.net/tenant-b/");
      res = await fetch(`${svc.http}/tenant-b/oauth2/v2.0/token`, {
        method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ grant_type: "client_credentials", client_id: "c", client_secret: "s2", scope: SCOPE }).toString(),
      });
      assert.equal(res.status, 200);
      res = await fetch(`${svc.http}/tenant-b/oauth2/v2.0/token`, {
        method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ grant_type: "client_credentials", client_id: "c", scope: SCOPE,
          client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", client_assertion: "a.b.c" }).toString(),
      });
      assert.equal(res.status, 200);
    } finally {
      const { code, signal } = await svc.stop();
      assert.equal(signal, null);
      assert.equal(code, 0);
      assert.ok(existsSync(svc.dir));
      rmSync(svc.tmp, { recursive: true, force: true });
    }
  });
});

// The tokens are accepted by sbemu configured with DIR/jwks.json or DIR/signing.pub.pem, when
// @azure/service-bus gets them through @azure/identity's ManagedIdentityCredential (IMDS route).
describe("tokensvc with sbemu", { skip: !existsSync(sbemuBin) && `no sbemu binary at ${sbemuBin}` }, () => {
  let svc;
  const saved = process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
  before(async () => {
    svc = await startTokensvc();
    // msal-node reads this when the credential is made; this file runs in its own process.
    process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = svc.http;
  });
  after(async () => {
    if (saved === undefined) delete process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
    else process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = saved;
    if (svc) {
      assert.equal((await svc.stop()).code, 0);
      rmSync(svc.tmp, { recursive: true, force: true });
    }
  });

  for (const [name, flag, file] of [["--jwks", "--jwks", "jwks.json"], ["--jwt-public-key", "--jwt-public-key", "signing.pub.pem"]]) {
    it(`sbemu ${name} accepts the tokens; a wrong-audience token is refused`, async () => {
      await svc.reset();
      const emu = await startSbemu({ config: configWith({ queues: [queue("q")] }), args: [flag, join(svc.dir, file)] });
      const { ServiceBusClient } = await import("@azure/service-bus");
      const { ManagedIdentityCredential } = await import("@azure/identity");
      const clients = [];
      // msal-node keeps managed identity tokens in one process-wide cache keyed by the identity:
      // a fresh user-assigned client id per credential makes each one fetch its own token.
      const credential = () => new ManagedIdentityCredential({ clientId: randomUUID() });
      try {
        const client = new ServiceBusClient(emu.credentialHost(), credential(), { retryOptions: { maxRetries: 0, timeoutInMs: 10000 } });
        clients.push(client);
        await client.createSender("q").sendMessages({ body: "via tokensvc" });
        assert.equal((await emu.entity("q")).active, 1);
        const st = await svc.stats();
        assert.ok(st.requests.imds >= 1);
        const identities = (await emu.connections()).flatMap((c) => c.tokens.map((t) => t.identity));
        assert.ok(identities.includes(`jwt:${st.issued[0].sub}`), `sbemu saw identity jwt:${st.issued[0].sub}: ${identities}`);

        await svc.faults({ wrong_audience: 5 });
        const wrong = new ServiceBusClient(emu.credentialHost(), credential(), { retryOptions: { maxRetries: 0, timeoutInMs: 10000 } });
        clients.push(wrong);
        await assert.rejects(wrong.createSender("q").sendMessages({ body: "refused" }), (e) => {
          assert.match(`${e.code} ${e.message}`, /unauthori[sz]ed|audience/i);
          return true;
        });
        assert.equal((await emu.entity("q")).active, 1, "nothing sent with the wrong audience");
        assert.ok((await svc.stats()).issued.some((i) => i.aud === "https://storage.azure.com"));
      } finally {
        for (const c of clients) await c.close().catch(() => {});
        await emu.stop();
        rmSync(emu.dir, { recursive: true, force: true });
      }
    });
  }
});
