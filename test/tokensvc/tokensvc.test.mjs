// Fidelity tests for tokensvc: the official @azure/identity (4.13.0, with msal-node) obtains tokens
// from every route, over plain HTTP (managed identity sources) and HTTPS with a throwaway CA
// (Entra ID token endpoint); its retries cope with the injected faults; the counters add up; every
// token verifies against DIR/jwks.json; sbemu accepts the tokens.
// Run: node --test test/tokensvc/
//
// @azure/identity and msal-node read their settings from the environment when a credential is
// made (and NODE_EXTRA_CA_CERTS at process start), so the credentials run in child processes
// (get-token.mjs) with an environment of their own. No assertion depends on how long something
// took, except lower bounds that tokensvc or the SDK guarantee (a delay, a Retry-After).
import { describe, it, before, after, beforeEach } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createPublicKey, generateKeyPairSync, randomUUID, sign as cryptoSign } from "node:crypto";
import { existsSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { dirname, isAbsolute, join } from "node:path";
import { startTokensvc, getToken, verifyJwt as verifyJwtIn, decodeJwt, makeTestCa, tokensvcScript } from "./lib.mjs";
import { startSbemu, configWith, queue, sbemuBin, repoRoot } from "../conformance/lib/sbemu.mjs";

const TENANT = "72f988bf-0000-0000-0000-000000000001";
const SB = "https://servicebus.azure.net";
const SCOPE = `${SB}/.default`;
const CLIENT_SECRET = "test-client-secret";
const IDENTITY_HEADER = "test-identity-header";
const LIFETIME = 2700; // not the default, so that honouring --lifetime is what makes the tests pass
const ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

const verifyJwt = (svc, jwt) => verifyJwtIn(svc.dir, jwt);

/** Checks the claims common to every token and the expiry the SDK reported; returns the claims. */
function checkClaims(svc, result, { aud = SB, lifetime = LIFETIME, appid } = {}) {
  assert.equal(result.ok, true, `token obtained: ${JSON.stringify(result)}`);
  const { claims } = verifyJwt(svc, result.token);
  const now = Math.floor(Date.now() / 1000);
  assert.equal(claims.aud, aud);
  assert.equal(claims.iss, `https://sts.windows.net/${TENANT}/`);
  assert.equal(claims.tid, TENANT);
  assert.equal(claims.idtyp, "app");
  assert.equal(claims.ver, "1.0");
  assert.equal(claims.exp - claims.iat, lifetime);
  assert.ok(claims.nbf <= now + 1 && claims.iat <= now + 1 && claims.iat >= now - 60);
  assert.match(claims.oid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.equal(claims.sub, claims.oid);
  assert.equal(claims.azp, claims.appid);
  assert.ok(claims.uti);
  if (appid) assert.equal(claims.appid, appid);
  // What @azure/identity reports as the expiry is the token's exp. MSAL counts expires_in from the
  // moment it sent the first request, so time spent in retries makes it report a little earlier.
  const skew = claims.exp * 1000 - result.expiresOnTimestamp;
  assert.ok(skew >= -1500 && skew <= result.ms + 2000, `expiresOnTimestamp ${result.expiresOnTimestamp} vs exp ${claims.exp} (took ${result.ms} ms)`);
  return claims;
}

const form = (fields) => ({
  method: "POST",
  headers: { "Content-Type": "application/x-www-form-urlencoded" },
  body: new URLSearchParams(fields).toString(),
});

/** Measures how long fn() took, in ms. */
async function timed(fn) {
  const t0 = performance.now();
  const value = await fn();
  return { value, ms: performance.now() - t0 };
}

describe("tokensvc", () => {
  let svc, ca;
  const imdsEnv = () => ({ AZURE_POD_IDENTITY_AUTHORITY_HOST: svc.http });
  const appServiceEnv = (header = IDENTITY_HEADER) => ({ IDENTITY_ENDPOINT: `${svc.http}/msi/token`, IDENTITY_HEADER: header });
  const tlsEnv = () => ({ NODE_EXTRA_CA_CERTS: ca.ca });
  const entraOptions = (extra = {}) => ({ authorityHost: svc.https, disableInstanceDiscovery: true, ...extra });
  const secretCred = (secret = CLIENT_SECRET, clientId = "app-secret-client") => ({
    credential: "ClientSecretCredential", args: [TENANT, clientId, secret], options: entraOptions(),
  });
  const workloadCred = (clientId = "app-workload-client") => ({
    credential: "WorkloadIdentityCredential",
    options: entraOptions({ tenantId: TENANT, clientId, tokenFilePath: svc.files.federatedToken }),
  });
  const managed = (options = {}) => ({ credential: "ManagedIdentityCredential", options });
  const imdsUrl = (q = "") => `${svc.http}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${encodeURIComponent(SB)}${q}`;
  const imdsFetch = (q) => fetch(imdsUrl(q), { headers: { Metadata: "true" } });
  const tokenUrl = (base, tenant = TENANT) => `${base}/${tenant}/oauth2/v2.0/token`;
  const assertionForm = (assertion, clientId = "app-workload-client") =>
    form({ grant_type: "client_credentials", client_id: clientId, scope: SCOPE, client_assertion_type: ASSERTION_TYPE, client_assertion: assertion });

  before(async () => {
    ca = makeTestCa();
    svc = await startTokensvc({ lifetime: LIFETIME, tls: { cert: ca.cert, key: ca.key } });
  });
  after(async () => {
    if (svc) {
      const { code, signal } = await svc.stop();
      assert.equal(signal, null);
      assert.equal(code, 0, "SIGTERM ends tokensvc with exit code 0");
      rmSync(svc.tmp, { recursive: true, force: true });
    }
    if (ca) rmSync(dirname(ca.dir), { recursive: true, force: true });
  });
  beforeEach(async () => {
    if (svc) await svc.reset();
  });

  it("writes its key material and secrets and prints one readiness line", async () => {
    assert.match(svc.line, /^tokensvc ready http=http:\/\/127\.0\.0\.1:\d+ https=https:\/\/127\.0\.0\.1:\d+ dir=\/\S+$/);
    assert.ok(isAbsolute(svc.dir));
    assert.equal(svc.stdout, svc.line + "\n", "exactly one line on stdout");
    const pem = readFileSync(svc.files.publicKey, "utf8");
    assert.match(pem, /^-----BEGIN PUBLIC KEY-----/);
    const jwks = JSON.parse(readFileSync(svc.files.jwks, "utf8"));
    assert.equal(jwks.keys.length, 1);
    const k = jwks.keys[0];
    for (const f of ["kty", "n", "e", "kid", "use", "alg"]) assert.ok(k[f], `jwks key has ${f}`);
    assert.deepEqual([k.kty, k.use, k.alg], ["RSA", "sig", "RS256"]);
    assert.equal(createPublicKey({ key: k, format: "jwk" }).export({ type: "spki", format: "pem" }), pem);
    // The federated token is a projected service account token signed by tokensvc.
    const fed = verifyJwt(svc, readFileSync(svc.files.federatedToken, "utf8"));
    assert.deepEqual(fed.claims.aud, ["api://AzureADTokenExchange"]);
    assert.equal(fed.claims.sub, "system:serviceaccount:default:sbpg");
    assert.ok(fed.claims.exp > Math.floor(Date.now() / 1000) + 3600);
    assert.equal(readFileSync(svc.files.clientSecret, "utf8"), CLIENT_SECRET);
    assert.equal(readFileSync(svc.files.identityHeader, "utf8"), IDENTITY_HEADER);
    assert.equal(statSync(svc.files.arcDir).mode & 0o777, 0o700);
    const cfg = await svc.config();
    assert.equal(cfg.lifetime, LIFETIME);
    assert.equal(cfg.tenant, TENANT);
    assert.equal(cfg.refresh_in, null);
    assert.equal(cfg.kid, k.kid);
    assert.deepEqual(Object.keys(cfg.system_identities).sort(), ["app_service", "arc", "imds"]);
    const st = await svc.stats();
    for (const r of ["imds", "app_service", "arc", "entra"]) assert.deepEqual([st[r].requests, st[r].issued, st[r].failed], [0, 0, {}], r);
  });

  describe("IMDS", () => {
    it("ManagedIdentityCredential (system-assigned) gets a token via AZURE_POD_IDENTITY_AUTHORITY_HOST", async () => {
      const c = checkClaims(svc, await getToken(managed(), imdsEnv()));
      const { system_identities: sys } = await svc.config();
      assert.equal(c.sub, sys.imds.oid);
      assert.equal(c.appid, sys.imds.client_id);
      const again = checkClaims(svc, await getToken(managed(), imdsEnv()));
      assert.equal(again.oid, c.oid, "the system-assigned identity has a stable oid");
      assert.notEqual(again.uti, c.uti, "every token is unique");
      const st = await svc.stats();
      assert.deepEqual(st.imds, { requests: 2, issued: 2, failed: {} });
      assert.deepEqual(
        { route: st.issued[0].route, sub: st.issued[0].sub, aud: st.issued[0].aud, exp: st.issued[0].exp, iat: st.issued[0].iat, jti: st.issued[0].jti },
        { route: "imds", sub: c.oid, aud: SB, exp: c.exp, iat: c.iat, jti: c.uti });
    });

    it("ManagedIdentityCredential with clientId, objectId and resourceId selects a user-assigned identity", async () => {
      const system = checkClaims(svc, await getToken(managed(), imdsEnv()));
      const clientId = "11111111-2222-3333-4444-555555555555";
      const user = checkClaims(svc, await getToken(managed({ clientId }), imdsEnv()), { appid: clientId });
      assert.notEqual(user.oid, system.oid);
      const user2 = checkClaims(svc, await getToken(managed({ clientId }), imdsEnv()), { appid: clientId });
      assert.equal(user2.oid, user.oid, "stable oid per client id");
      const objectId = "99999999-8888-7777-6666-555555555555";
      const byObject = checkClaims(svc, await getToken(managed({ objectId }), imdsEnv()));
      assert.equal(byObject.oid, objectId);
      const resourceId = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/sbpg";
      const byRes = checkClaims(svc, await getToken(managed({ resourceId }), imdsEnv()));
      assert.equal(byRes.xms_mirid, resourceId, "msi_res_id reached the service");
      assert.equal(new Set([system.oid, user.oid, byObject.oid, byRes.oid]).size, 4, "distinct identities");
      const st = await svc.stats();
      assert.equal(st.issued[1].client_id, clientId);
    });

    it("answers the documented errors to hand-made requests", async () => {
      // What @azure/identity's IMDS probe sends: no Metadata header. IMDS answers 400.
      let res = await fetch(imdsUrl());
      assert.equal(res.status, 400);
      assert.deepEqual(await res.json(), { error: "invalid_request", error_description: "Required metadata header not specified" });
      res = await fetch(`${svc.http}/metadata/identity/oauth2/token?resource=${SB}`, { headers: { Metadata: "true" } });
      assert.equal(res.status, 400);
      res = await imdsFetch();
      assert.equal(res.status, 200);
      const b = await res.json();
      assert.deepEqual(Object.keys(b).sort(), ["access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before", "refresh_token", "resource", "token_type"]);
      for (const f of ["expires_in", "expires_on", "ext_expires_in", "not_before"]) assert.match(b[f], /^\d+$/, `${f} is a string of digits`);
      assert.equal(b.expires_in, String(LIFETIME));
      assert.equal(Number(b.expires_on) - Number(b.not_before), LIFETIME);
      assert.equal(b.resource, SB);
      assert.equal(b.token_type, "Bearer");
      // A resource with a trailing slash still yields the bare audience.
      res = await fetch(`${svc.http}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${SB}/`, { headers: { Metadata: "true" } });
      assert.equal(verifyJwt(svc, (await res.json()).access_token).claims.aud, SB);
      const st = await svc.stats();
      assert.deepEqual(st.imds, { requests: 4, issued: 2, failed: { 400: 2 } });
    });
  });

  describe("App Service", () => {
    it("ManagedIdentityCredential gets a token via IDENTITY_ENDPOINT + IDENTITY_HEADER", async () => {
      const sys = checkClaims(svc, await getToken(managed(), appServiceEnv()));
      assert.equal(sys.oid, (await svc.config()).system_identities.app_service.oid);
      const clientId = "22222222-3333-4444-5555-666666666666";
      const user = checkClaims(svc, await getToken(managed({ clientId }), appServiceEnv()), { appid: clientId });
      assert.notEqual(sys.oid, user.oid);
      const imdsSys = checkClaims(svc, await getToken(managed(), imdsEnv()));
      assert.notEqual(imdsSys.oid, sys.oid, "each source has its own system-assigned identity");
      const imdsUser = checkClaims(svc, await getToken(managed({ clientId }), imdsEnv()), { appid: clientId });
      assert.equal(imdsUser.oid, user.oid, "a user-assigned identity is the same whichever source asks");
      const st = await svc.stats();
      assert.deepEqual(st.app_service, { requests: 2, issued: 2, failed: {} });
      assert.deepEqual(st.issued.map((i) => i.route), ["app_service", "app_service", "imds", "imds"]);
    });

    it("refuses a wrong identity header (401) and a missing one (400), in App Service's error shape", async () => {
      const r = await getToken(managed({ retryOptions: { maxRetries: 0 } }), appServiceEnv("not-the-header"));
      assert.equal(r.ok, false);
      const url = `${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`;
      let res = await fetch(url);
      assert.equal(res.status, 400);
      res = await fetch(url, { headers: { "X-IDENTITY-HEADER": "nope" } });
      assert.equal(res.status, 401);
      const err = await res.json();
      assert.equal(err.statusCode, 401);
      assert.ok(err.message && err.correlationId);
      res = await fetch(url, { headers: { "X-IDENTITY-HEADER": IDENTITY_HEADER } });
      assert.equal(res.status, 200);
      assert.deepEqual(Object.keys(await res.json()).sort(), ["access_token", "client_id", "expires_on", "resource", "token_type"]);
      const st = await svc.stats();
      assert.deepEqual(st.app_service, { requests: 4, issued: 1, failed: { 400: 1, 401: 2 } });
    });
  });

  describe("Azure Arc", () => {
    const arcEnv = () => ({ IDENTITY_ENDPOINT: `${svc.http}/arc/token`, IMDS_ENDPOINT: svc.http });

    it("follows the challenge protocol (plain fetch)", async () => {
      const url = `${svc.http}/arc/token?api-version=2020-06-01&resource=${encodeURIComponent(SB)}`;
      const realmOf = (res) => /^Basic realm=(.+)$/.exec(res.headers.get("www-authenticate"))?.[1];
      let res = await fetch(url, { headers: { Metadata: "true" } });
      assert.equal(res.status, 401);
      const realm = realmOf(res);
      assert.ok(realm && isAbsolute(realm) && realm.endsWith(".key"), `realm ${realm}`);
      assert.equal(dirname(realm), svc.files.arcDir);
      assert.equal(statSync(realm).mode & 0o777, 0o600, "the key file is private to the agent's user");
      const secret = readFileSync(realm, "utf8");
      res = await fetch(url, { headers: { Metadata: "true", Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 200);
      const body = await res.json();
      assert.equal(body.expires_in, String(LIFETIME));
      const c = verifyJwt(svc, body.access_token).claims;
      assert.equal(c.aud, SB);
      assert.equal(c.oid, (await svc.config()).system_identities.arc.oid);
      res = await fetch(url, { headers: { Metadata: "true", Authorization: "Basic wrong" } });
      assert.equal(res.status, 401);
      const second = realmOf(res);
      assert.ok(second && second !== realm, "every challenge writes a new key file");
      res = await fetch(url.replace("2020-06-01", "2019-11-01"), { headers: { Metadata: "true", Authorization: `Basic ${readFileSync(second, "utf8")}` } });
      assert.equal(res.status, 200, "api-version 2019-11-01 (msal-node, C++) is accepted");
      res = await fetch(url.replace("2020-06-01", "2019-08-01"), { headers: { Metadata: "true", Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 400, "an older api-version is refused");
      res = await fetch(url, { headers: { Authorization: `Basic ${secret}` } });
      assert.equal(res.status, 400, "Metadata: true is required");
      const st = await svc.stats();
      assert.deepEqual(st.arc, { requests: 6, issued: 2, failed: { 400: 2, 401: 1 }, challenges: 1 });
      assert.deepEqual(st.issued.map((i) => i.route), ["arc", "arc"]);
      const listed = (await svc.tokens()).secrets.arc_keys;
      assert.ok(listed.some((a) => a.file === realm && a.secret === secret));
    });

    it("stock msal-node refuses a key file outside /var/opt/azcmagent/tokens (a documented limit)", async () => {
      const r = await getToken(managed(), arcEnv());
      assert.equal(r.ok, false);
      assert.match(r.message, /invalid_file_path/);
      const st = await svc.stats();
      assert.equal(st.arc.challenges, 1, "it got as far as the challenge");
      assert.equal(st.arc.issued, 0);
    });

    it("ManagedIdentityCredential gets a token when msal-node's key directory is redirected to DIR/arc", async () => {
      const r = await getToken({ ...managed(), arcKeyDir: svc.files.arcDir }, arcEnv());
      checkClaims(svc, r);
      const st = await svc.stats();
      assert.deepEqual(st.arc, { requests: 2, issued: 1, failed: {}, challenges: 1 });
    });
  });

  describe("Entra ID token endpoint (HTTPS)", () => {
    it("WorkloadIdentityCredential gets a token with the federated token file", async () => {
      const c = checkClaims(svc, await getToken(workloadCred(), tlsEnv()), { appid: "app-workload-client" });
      assert.equal(c.appidacr, "2");
      // The service principal of the secret and of the federated credential is the same app.
      const s = checkClaims(svc, await getToken(secretCred(CLIENT_SECRET, "app-workload-client"), tlsEnv()), { appid: "app-workload-client" });
      assert.equal(s.oid, c.oid);
      const st = await svc.stats();
      assert.deepEqual([st.entra.requests, st.entra.issued, st.entra.client_assertion, st.entra.client_secret], [2, 2, 1, 1]);
      assert.equal(st.openid.requests, 2, "MSAL read the OpenID configuration (once per process)");
      assert.deepEqual(st.issued.map((i) => i.kind), ["entra_assertion", "entra_secret"]);
      assert.equal(st.issued[0].client_id, "app-workload-client");
    });

    it("WorkloadIdentityCredential and ManagedIdentityCredential (AKS token exchange) work from the webhook's environment variables", async () => {
      const env = {
        ...tlsEnv(),
        AZURE_CLIENT_ID: "app-env-client",
        AZURE_TENANT_ID: TENANT,
        AZURE_FEDERATED_TOKEN_FILE: svc.files.federatedToken,
        AZURE_AUTHORITY_HOST: svc.https,
      };
      const a = checkClaims(svc, await getToken({ credential: "WorkloadIdentityCredential", options: { disableInstanceDiscovery: true } }, env), { appid: "app-env-client" });
      // ManagedIdentityCredential switches to the token exchange (and disables instance discovery itself).
      const b = checkClaims(svc, await getToken(managed(), env), { appid: "app-env-client" });
      assert.equal(a.oid, b.oid, "the same app registration");
      const st = await svc.stats();
      assert.equal(st.entra.client_assertion, 2);
      assert.equal(st.imds.requests, 0);
    });

    it("accepts a rotated federated token; the old one stays valid until it expires, as with Entra", async () => {
      const old = readFileSync(svc.files.federatedToken, "utf8");
      const { token } = await svc.control("/control/federated-token", { lifetime: 3600 });
      assert.notEqual(token, old);
      assert.equal(readFileSync(svc.files.federatedToken, "utf8"), token);
      checkClaims(svc, await getToken(workloadCred(), tlsEnv()));
      const res = await fetch(tokenUrl(svc.http), assertionForm(old));
      assert.equal(res.status, 200);
      assert.ok((await svc.tokens()).secrets.federated_tokens.includes(token));
    });

    it("checks client assertions: signature, validity time and audience", async () => {
      const expect = async (assertion, status, code) => {
        const res = await fetch(tokenUrl(svc.http), assertionForm(assertion));
        const body = await res.json();
        assert.equal(res.status, status, JSON.stringify(body));
        assert.deepEqual(body.error_codes, [code]);
        assert.match(body.error_description, new RegExp(`^AADSTS${code}: `));
      };
      const expired = (await svc.control("/control/sign", { lifetime: -60 })).token;
      await expect(expired, 400, 700024);
      const early = (await svc.control("/control/sign", { claims: { nbf: Math.floor(Date.now() / 1000) + 600 } })).token;
      await expect(early, 400, 700024);
      const otherAud = (await svc.control("/control/sign", { claims: { aud: "api://somewhere-else" } })).token;
      await expect(otherAud, 400, 700212);
      // An access token tokensvc issued is not a federated credential.
      const access = (await (await imdsFetch()).json()).access_token;
      await expect(access, 400, 700212);
      // Signed by a key tokensvc does not know, or tampered with.
      const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
      const [h, p] = readFileSync(svc.files.federatedToken, "utf8").split(".");
      const stranger = `${h}.${p}.${cryptoSign("RSA-SHA256", Buffer.from(`${h}.${p}`), privateKey).toString("base64url")}`;
      await expect(stranger, 401, 700027);
      await expect("not-a-jwt", 400, 50027);
      const good = (await svc.control("/control/sign", {})).token;
      assert.equal((await fetch(tokenUrl(svc.http), assertionForm(good))).status, 200);
      const st = await svc.stats();
      assert.deepEqual(st.entra.failed, { 400: 5, 401: 1 });
      assert.equal(st.entra.issued, 1);
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
      assert.deepEqual([st.entra.requests, st.entra.issued, st.entra.failed], [2, 1, { 401: 1 }]);
    });

    it("is refused by a client that does not trust the test CA", async () => {
      const r = await getToken(secretCred(), {});
      assert.equal(r.ok, false);
      // MSAL swallows the TLS error of the OpenID configuration request and reports this:
      assert.match(r.message, /endpoints_resolution_error/);
      const st = await svc.stats();
      assert.equal(st.openid.requests, 0, "no request got through the TLS handshake");
      assert.equal(st.entra.requests, 0);
      const e = await fetch(`${svc.https}/${TENANT}/v2.0/.well-known/openid-configuration`).catch((err) => err);
      assert.ok(e instanceof Error);
      assert.match(String(e.cause?.code), /CERT|SIGN|VERIFY|ISSUER/, `TLS error: ${e.cause?.code}`);
    });

    it("validates tenant, scope, grant and client credentials like Entra ID", async () => {
      const ok = { grant_type: "client_credentials", client_id: "c", client_secret: CLIENT_SECRET, scope: SCOPE };
      const post = (fields, tenant) => fetch(tokenUrl(svc.http, tenant), form(fields));
      let res = await post(ok);
      assert.equal(res.status, 200);
      const b = await res.json();
      assert.deepEqual(Object.keys(b).sort(), ["access_token", "expires_in", "ext_expires_in", "token_type"]);
      assert.equal(b.expires_in, LIFETIME);
      assert.equal(b.token_type, "Bearer");
      res = await post({ ...ok, scope: `${SB}//.default` });
      assert.equal(res.status, 200, "the double-slash scope of the Service Bus SDKs");
      assert.equal(verifyJwt(svc, (await res.json()).access_token).claims.aud, SB);
      res = await post({ ...ok, scope: "https://storage.azure.com/.default openid profile offline_access" });
      assert.equal(res.status, 200, "the resource is the scope without /.default; OIDC scopes are ignored");
      assert.equal(verifyJwt(svc, (await res.json()).access_token).claims.aud, "https://storage.azure.com");
      const refused = async (fields, status, error, code, tenant) => {
        const r = await post(fields, tenant);
        const e = await r.json();
        assert.equal(r.status, status, JSON.stringify(e));
        assert.equal(e.error, error);
        assert.deepEqual(e.error_codes, [code]);
        for (const f of ["timestamp", "trace_id", "correlation_id", "error_uri"]) assert.ok(e[f], f);
      };
      await refused(ok, 400, "invalid_request", 90002, "00000000-0000-0000-0000-00000000dead");
      await refused({ ...ok, scope: SB }, 400, "invalid_scope", 1002012);
      await refused({ ...ok, scope: `${SB}/.default https://storage.azure.com/.default` }, 400, "invalid_scope", 70011);
      await refused({ ...ok, grant_type: "password" }, 400, "unsupported_grant_type", 70003);
      const { client_secret: _s, ...noCred } = ok;
      await refused(noCred, 401, "invalid_client", 7000218);
      await refused({ ...ok, client_secret: "wrong" }, 401, "invalid_client", 7000215);
      // OpenID configuration points back at the scheme and host the request came in on.
      res = await fetch(`${svc.http}/${TENANT}/v2.0/.well-known/openid-configuration`);
      const oidc = await res.json();
      assert.equal(oidc.token_endpoint, tokenUrl(svc.http));
      assert.equal(oidc.jwks_uri, `${svc.http}/${TENANT}/discovery/v2.0/keys`);
      assert.deepEqual(await (await fetch(oidc.jwks_uri)).json(), JSON.parse(readFileSync(svc.files.jwks, "utf8")));
      res = await fetch(`${svc.http}/nope/v2.0/.well-known/openid-configuration`);
      assert.equal(res.status, 400);
      const st = await svc.stats();
      assert.deepEqual([st.entra.requests, st.entra.issued, st.openid.requests], [9, 3, 2]);
      assert.deepEqual(st.entra.failed, { 400: 4, 401: 2 });
    });

    it("sends refresh_in when configured; MSAL takes it as the refresh time", async () => {
      await svc.config({ refresh_in: 600 });
      const r = await getToken(secretCred(), tlsEnv());
      const c = checkClaims(svc, r);
      // MSAL: refreshOn = (second it sent the request) + refresh_in, and iat >= that second.
      const d = r.refreshAfterTimestamp / 1000 - (c.iat + 600);
      assert.ok(d <= 1 && d >= -(r.ms / 1000 + 2), `refreshAfterTimestamp ${r.refreshAfterTimestamp} vs iat ${c.iat}`);
      const imds = await (await imdsFetch()).json();
      assert.equal(imds.refresh_in, "600");
      await svc.config({ refresh_in: null });
      assert.equal((await (await imdsFetch()).json()).refresh_in, undefined);
    });
  });

  describe("faults and control", () => {
    it("429 with Retry-After twice, then @azure/identity's retry gets a token (IMDS)", async () => {
      await svc.faults({ route: "imds", status: 429, count: 2 });
      const res = await imdsFetch();
      assert.equal(res.status, 429);
      assert.equal(res.headers.get("retry-after"), "1");
      assert.equal((await res.json()).error, "too_many_requests");
      const r = await getToken(managed(), imdsEnv());
      checkClaims(svc, r);
      assert.ok(r.ms >= 900, `waited for Retry-After (${r.ms} ms)`);
      const st = await svc.stats();
      assert.deepEqual(st.imds, { requests: 3, issued: 1, failed: { 429: 2 } });
      assert.deepEqual(st.faults, [], "the fault is used up");
    });

    it("retry_after sets the header; fault bodies have each route's error shape", async () => {
      await svc.faults([
        { route: "entra", status: 503, retry_after: 7 },
        { route: "app_service", status: 500 },
        { route: "imds", status: 500 },
      ]);
      let res = await fetch(tokenUrl(svc.http), form({ grant_type: "client_credentials", client_id: "c", client_secret: CLIENT_SECRET, scope: SCOPE }));
      assert.equal(res.status, 503);
      assert.equal(res.headers.get("retry-after"), "7");
      const e = await res.json();
      assert.equal(e.error, "temporarily_unavailable");
      assert.match(e.error_description, /^AADSTS\d+: /);
      res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": IDENTITY_HEADER } });
      assert.equal(res.status, 500);
      assert.equal((await res.json()).statusCode, 500);
      res = await imdsFetch();
      assert.equal(res.status, 500);
      assert.equal(res.headers.get("retry-after"), null);
      assert.equal((await res.json()).error, "server_error");
    });

    it("500 twice, then ClientSecretCredential's retry gets a token (HTTPS)", async () => {
      await svc.faults({ route: "entra", status: 500, count: 2 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
      const st = await svc.stats();
      assert.deepEqual([st.entra.requests, st.entra.issued, st.entra.failed], [3, 1, { 500: 2 }]);
    });

    it("404 on IMDS and 503 on App Service are retried too", async () => {
      await svc.faults([{ route: "imds", status: 404 }, { route: "app_service", status: 503 }]);
      checkClaims(svc, await getToken(managed(), imdsEnv()));
      checkClaims(svc, await getToken(managed(), appServiceEnv()));
      const st = await svc.stats();
      assert.deepEqual(st.imds, { requests: 2, issued: 1, failed: { 404: 1 } });
      assert.deepEqual(st.app_service, { requests: 2, issued: 1, failed: { 503: 1 } });
    });

    it("a fault hits only its route; faults apply in order; forever lasts until reset", async () => {
      await svc.faults([
        { route: "app_service", status: 500, count: "forever" },
        { route: "any", status: 502 },
        { route: "any", status: 503 },
      ]);
      const appSvc = () => fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": IDENTITY_HEADER } });
      assert.equal((await appSvc()).status, 500);
      assert.equal((await imdsFetch()).status, 502);
      assert.equal((await imdsFetch()).status, 503);
      assert.equal((await imdsFetch()).status, 200);
      assert.equal((await appSvc()).status, 500);
      const { faults } = await svc.control("/control/faults");
      assert.deepEqual(faults.map((f) => [f.route, f.status, f.count, f.applied]), [["app_service", 500, "forever", 2]]);
      await svc.reset();
      assert.equal((await appSvc()).status, 200);
      assert.deepEqual((await svc.stats()).faults, []);
    });

    it("wrong_audience yields a token for another audience, then correct ones", async () => {
      await svc.faults([{ wrong_audience: true }, { route: "imds", wrong_audience: "https://vault.azure.net" }]);
      checkClaims(svc, await getToken(managed(), imdsEnv()), { aud: "https://storage.azure.com" });
      checkClaims(svc, await getToken(managed(), imdsEnv()), { aud: "https://vault.azure.net" });
      checkClaims(svc, await getToken(managed(), imdsEnv()), { aud: SB });
      const st = await svc.stats();
      assert.deepEqual(st.issued.map((i) => i.aud), ["https://storage.azure.com", "https://vault.azure.net", SB]);
    });

    it("a token fault waits for a request that gets a token (the Arc challenge does not take it)", async () => {
      await svc.faults({ route: "arc", lifetime: 120 });
      const url = `${svc.http}/arc/token?api-version=2019-11-01&resource=${encodeURIComponent(SB)}`;
      const challenge = await fetch(url, { headers: { Metadata: "true" } });
      assert.equal(challenge.status, 401);
      assert.equal((await svc.stats()).faults.length, 1, "still pending");
      const realm = /realm=(.+)$/.exec(challenge.headers.get("www-authenticate"))[1];
      const res = await fetch(url, { headers: { Metadata: "true", Authorization: `Basic ${readFileSync(realm, "utf8")}` } });
      const claims = verifyJwt(svc, (await res.json()).access_token).claims;
      assert.equal(claims.exp - claims.iat, 120);
      assert.deepEqual((await svc.stats()).faults, []);
    });

    it("lifetime fault, then the configured lifetime again", async () => {
      await svc.faults({ route: "entra", lifetime: 300 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()), { lifetime: 300 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
    });

    it("delay_ms slows a token answer or a fault answer down by at least that much", async () => {
      await svc.faults([{ route: "imds", delay_ms: 400 }, { route: "imds", status: 500, delay_ms: 300 }]);
      const slowError = await timed(() => imdsFetch());
      assert.equal(slowError.value.status, 500);
      assert.ok(slowError.ms >= 295, `${slowError.ms} ms`);
      const slowToken = await timed(() => imdsFetch());
      assert.equal(slowToken.value.status, 200);
      assert.ok(slowToken.ms >= 395, `${slowToken.ms} ms`);
      assert.deepEqual((await svc.stats()).faults, []);
    });

    it("down drops connections without an answer", async () => {
      await svc.faults({ route: "imds", down: true, count: 2 });
      await assert.rejects(imdsFetch(), TypeError);
      const r = await getToken(managed({ retryOptions: { maxRetries: 0 } }), imdsEnv());
      assert.equal(r.ok, false);
      let st = await svc.stats();
      assert.deepEqual(st.imds, { requests: 2, issued: 0, failed: { down: 2 } });
      // Control stays available, and the next request gets its token.
      assert.equal((await imdsFetch()).status, 200);
      // One dropped connection is ridden out by @azure/identity's retries (ECONNRESET is retriable).
      await svc.faults({ route: "entra", down: true });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
      st = await svc.stats();
      assert.deepEqual([st.entra.issued, st.entra.failed], [1, { down: 1 }]);
    });

    it("lifetime is configurable; @azure/identity honours expires_on (and refreshes at half-life beyond 2 h)", async () => {
      await svc.config({ lifetime: 600 });
      checkClaims(svc, await getToken(managed(), imdsEnv()), { lifetime: 600 });
      checkClaims(svc, await getToken(secretCred(), tlsEnv()), { lifetime: 600 });
      await svc.config({ lifetime: 3 * 3600 });
      const r = await getToken(managed(), appServiceEnv());
      const c = checkClaims(svc, r, { lifetime: 3 * 3600 });
      // msal-node: refresh at half of (expires_on - the second it sent the request).
      const d = r.refreshAfterTimestamp / 1000 - (c.iat + 1.5 * 3600);
      assert.ok(d <= 1 && d >= -(r.ms / 1000 + 2), `refreshAfterTimestamp ${r.refreshAfterTimestamp} vs iat ${c.iat}`);
      let st = await svc.stats();
      assert.deepEqual(st.issued.map((i) => i.lifetime), [600, 600, 10800]);
      assert.equal(st.config.lifetime, 10800);
      await svc.reset();
      st = await svc.stats();
      assert.equal(st.config.lifetime, LIFETIME, "reset restores the start lifetime");
      assert.equal(st.issued.length, 0);
      assert.equal(st.imds.requests + st.app_service.requests + st.entra.requests, 0);
    });

    it("control rejects bad input and adds none of a batch with a bad fault", async () => {
      const post = (path, body) => fetch(`${svc.http}${path}`, { method: "POST", body: typeof body === "string" ? body : JSON.stringify(body) });
      for (const bad of [{ status: "abc" }, { status: 200 }, { status: 500, count: 0 }, { route: "nope", status: 500 },
        { down: true, status: 500 }, { retry_after: 3 }, { status: 500, wrong_audience: true }, { colour: "red" }, {}]) {
        const res = await post("/control/faults", bad);
        assert.equal(res.status, 400, JSON.stringify(bad));
      }
      assert.equal((await post("/control/faults", [{ status: 500 }, { status: 42 }])).status, 400);
      assert.equal((await post("/control/faults", "{not json")).status, 400);
      assert.equal((await post("/control/config", { lifetime: 0 })).status, 400);
      assert.equal((await post("/control/config", { color: 1 })).status, 400);
      assert.equal((await fetch(`${svc.http}/control/reset`)).status, 405);
      assert.equal((await fetch(`${svc.http}/control/nope`)).status, 404);
      assert.deepEqual((await svc.stats()).faults, []);
    });

    it("the same routes answer on both listeners", async () => {
      const res = await fetch(`${svc.https}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${SB}`, { headers: { Metadata: "true" } }).catch((e) => e);
      // This process does not trust the test CA: a TLS failure proves HTTPS is served there.
      assert.ok(res instanceof Error);
      checkClaims(svc, await getToken(secretCred(), tlsEnv()));
      const viaHttp = await fetch(`${svc.http}/${TENANT}/v2.0/.well-known/openid-configuration`);
      assert.equal(viaHttp.status, 200);
    });
  });

  it("lists every token and secret in /control/tokens; every token is unique and verifies against DIR/jwks.json", async () => {
    await imdsFetch();
    await imdsFetch();
    await getToken(secretCred(), tlsEnv());
    await getToken(managed(), appServiceEnv());
    const st = await svc.stats();
    assert.deepEqual([st.imds.issued, st.entra.issued, st.app_service.issued], [2, 1, 1]);
    const { tokens, secrets } = await svc.tokens();
    // The list keeps every token since start (reset does not clear it).
    assert.ok(tokens.length >= 4);
    for (const i of st.issued) assert.ok(tokens.some((t) => t.jti === i.jti && decodeJwt(t.token).claims.uti === i.jti), `token ${i.jti} listed`);
    assert.equal(new Set(tokens.map((t) => t.token)).size, tokens.length, "no token issued twice");
    const jtis = tokens.filter((t) => t.jti).map((t) => t.jti);
    assert.equal(new Set(jtis).size, jtis.length, "unique ids");
    // (d) with node crypto only: every token verifies with the JWKS key its kid names.
    const jwks = JSON.parse(readFileSync(svc.files.jwks, "utf8"));
    for (const { token } of tokens) {
      const { header } = decodeJwt(token);
      const jwk = jwks.keys.find((k) => k.kid === header.kid);
      assert.ok(jwk, `kid ${header.kid}`);
      verifyJwt(svc, token);
    }
    assert.equal(secrets.client_secret, CLIENT_SECRET);
    assert.equal(secrets.identity_header, IDENTITY_HEADER);
    assert.ok(secrets.federated_tokens.includes(readFileSync(svc.files.federatedToken, "utf8")));
    assert.ok(Array.isArray(secrets.arc_keys));
  });

  it("never prints or logs secrets or tokens", async () => {
    // Produce some traffic with secrets in query strings, headers and bodies first.
    await imdsFetch("&client_id=secret-in-query");
    await getToken(secretCred(), tlsEnv());
    await getToken(workloadCred(), tlsEnv());
    await getToken({ ...managed(), arcKeyDir: svc.files.arcDir }, { IDENTITY_ENDPOINT: `${svc.http}/arc/token`, IMDS_ENDPOINT: svc.http });
    const log = readFileSync(svc.files.log, "utf8");
    assert.ok(log.split("\n").length > 10);
    const { tokens, secrets } = await svc.tokens();
    const all = [secrets.client_secret, secrets.identity_header, ...secrets.federated_tokens, ...secrets.arc_keys.map((a) => a.secret),
      ...tokens.map((t) => t.token), "secret-in-query", "eyJ"];
    assert.ok(secrets.arc_keys.length > 0 && tokens.length > 3);
    for (const text of [log, svc.stdout, svc.stderr])
      for (const s of all) assert.ok(!text.includes(s), `no ${s.slice(0, 12)}... in output`);
    assert.ok(!log.includes("?"), "no query strings in the log");
  });
});

describe("tokensvc process", () => {
  it("--help prints the usage on stdout and exits 0; a bad option exits 2", () => {
    let r = spawnSync(process.execPath, [tokensvcScript, "--help"], { encoding: "utf8" });
    assert.equal(r.status, 0);
    assert.match(r.stdout, /^usage: /);
    for (const o of ["--dir", "--listen", "--tls-listen", "--tls-cert", "--tls-key", "--lifetime", "--refresh-in", "--tenant", "--client-id", "--client-secret", "--identity-header"])
      assert.ok(r.stdout.includes(o), o);
    r = spawnSync(process.execPath, [tokensvcScript, "--dir", "/tmp/x", "--bogus", "1"], { encoding: "utf8" });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /unknown option --bogus/);
    assert.equal(r.stdout, "");
  });

  it("starts without TLS, honours the options and exits 0 on SIGTERM", async () => {
    const svc = await startTokensvc({
      lifetime: 120, tenant: "tenant-b", clientSecret: "s2", federatedToken: "a.b.c", identityHeader: "h2",
      clientId: "app-1", refreshIn: 60,
    });
    try {
      assert.equal(svc.https, undefined);
      assert.match(svc.line, /^tokensvc ready http=http:\/\/127\.0\.0\.1:\d+ dir=\S+$/);
      assert.equal(readFileSync(svc.files.federatedToken, "utf8"), "a.b.c");
      assert.equal(svc.clientSecret, "s2");
      assert.equal(svc.identityHeader, "h2");
      let res = await fetch(`${svc.http}/msi/token?api-version=2019-08-01&resource=${SB}`, { headers: { "X-IDENTITY-HEADER": "h2" } });
      assert.equal(res.status, 200);
      const body = await res.json();
      assert.equal(body.refresh_in, "60");
      const claims = decodeJwt(body.access_token).claims;
      assert.equal(claims.exp - claims.iat, 120);
      assert.equal(claims.tid, "tenant-b");
      assert.equal(claims.iss, "https://sts.windows.net/tenant-b/");
      const entra = (fields) => fetch(`${svc.http}/tenant-b/oauth2/v2.0/token`, form({ grant_type: "client_credentials", scope: SCOPE, ...fields }));
      res = await entra({ client_id: "app-1", client_secret: "s2" });
      assert.equal(res.status, 200);
      assert.equal((await res.json()).refresh_in, 60);
      // --federated-token: exactly the file's content is the accepted assertion.
      res = await entra({ client_id: "app-1", client_assertion_type: ASSERTION_TYPE, client_assertion: "a.b.c" });
      assert.equal(res.status, 200);
      res = await entra({ client_id: "app-1", client_assertion_type: ASSERTION_TYPE, client_assertion: "a.b.d" });
      assert.equal(res.status, 401);
      // --client-id: other applications are unknown in the tenant.
      res = await entra({ client_id: "app-2", client_secret: "s2" });
      assert.equal(res.status, 400);
      const e = await res.json();
      assert.equal(e.error, "unauthorized_client");
      assert.deepEqual(e.error_codes, [700016]);
    } finally {
      const { code, signal } = await svc.stop();
      assert.equal(signal, null);
      assert.equal(code, 0);
      assert.ok(existsSync(svc.dir));
      rmSync(svc.tmp, { recursive: true, force: true });
    }
  });

  it("--arc-group hands DIR/arc and the key files to a group (0750/0640); --tls-cert alone adds an HTTPS listener", async () => {
    const ca = makeTestCa();
    const gid = process.getgid();
    const svc = await startTokensvc({ arcGroup: gid, args: ["--tls-cert", ca.cert, "--tls-key", ca.key] });
    try {
      assert.match(svc.https, /^https:\/\/127\.0\.0\.1:\d+$/);
      const st = statSync(svc.files.arcDir);
      assert.equal(st.mode & 0o777, 0o750);
      assert.equal(st.gid, gid);
      const res = await fetch(`${svc.http}/arc/token?api-version=2019-11-01&resource=${SB}`, { headers: { Metadata: "true" } });
      assert.equal(res.status, 401);
      const [key] = readdirSync(svc.files.arcDir);
      const ks = statSync(join(svc.files.arcDir, key));
      assert.equal(ks.mode & 0o777, 0o640);
      assert.equal(ks.gid, gid);
    } finally {
      await svc.stop();
      rmSync(svc.tmp, { recursive: true, force: true });
      rmSync(dirname(ca.dir), { recursive: true, force: true });
    }
  });
});

// harness.mjs is what test/e2e was written against: the legacy query form and postgres-readable
// Arc keys must keep working.
describe("tokensvc legacy harness (harness.mjs)", () => {
  let svc;
  const postgresGid = (() => {
    const l = readFileSync("/etc/group", "utf8").split("\n").find((x) => x.startsWith("postgres:"));
    return l ? Number(l.split(":")[2]) : null;
  })();
  before(async () => {
    const legacy = await import("./harness.mjs");
    svc = await legacy.startTokensvc({ args: ["--lifetime", "900"] });
  });
  after(async () => {
    if (svc) {
      await svc.stop();
      rmSync(svc.tmp, { recursive: true, force: true });
    }
  });
  const imds = () => fetch(`${svc.http}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${SB}`, { headers: { Metadata: "true" } });
  const lifetimeOf = async (res) => { const c = decodeJwt((await res.json()).access_token).claims; return [c.exp - c.iat, c.aud]; };

  it("ctl() and faults() take the query-string form", async () => {
    await svc.ctl("POST", "/control/config", { lifetime: 10 });
    assert.deepEqual(await lifetimeOf(await imds()), [10, SB]);
    await svc.faults({ status: 503, count: 2 });
    assert.equal((await imds()).status, 503);
    assert.equal((await imds()).status, 503);
    await svc.faults({ wrong_audience: 1 });
    assert.deepEqual(await lifetimeOf(await imds()), [10, "https://storage.azure.com"]);
    assert.deepEqual(await lifetimeOf(await imds()), [10, SB]);
    await svc.faults({ delay_ms: 250 });
    for (let i = 0; i < 2; i++) {
      const { value, ms } = await timed(() => imds());
      assert.equal(value.status, 200);
      assert.ok(ms >= 245, `delayed until reset (${ms} ms)`);
    }
    await svc.faults({ down_ms: 600000 });
    await assert.rejects(imds(), TypeError);
    let st = await svc.stats();
    assert.ok(st.timed.down_ms_remaining > 0 && st.timed.delay_ms === 250);
    assert.deepEqual(st.imds.failed, { 503: 2, down: 1 });
    await svc.reset();
    st = await svc.stats();
    assert.deepEqual(st.timed, { delay_ms: 0, down_ms_remaining: 0 });
    assert.deepEqual(await lifetimeOf(await imds()), [900, SB]);
    await assert.rejects(svc.faults({ count: 3 }), /400/);
    await assert.rejects(svc.faults({ colour: "red" }), /400/);
    await assert.rejects(svc.ctl("POST", "/control/config", { lifetime: 0 }), /400/);
  });

  it("writes the Arc key files for the postgres group when it runs as root", { skip: !(process.getuid() === 0 && postgresGid !== null) && "not root or no postgres group" }, async () => {
    const res = await fetch(`${svc.http}/arc/token?api-version=2019-11-01&resource=${SB}`, { headers: { Metadata: "true" } });
    const realm = /realm=(.+)$/.exec(res.headers.get("www-authenticate"))[1];
    const ks = statSync(realm);
    assert.deepEqual([ks.mode & 0o777, ks.gid], [0o640, postgresGid]);
    const ds = statSync(svc.files.arcDir);
    assert.deepEqual([ds.mode & 0o777, ds.gid], [0o750, postgresGid]);
  });
});

// The tokens are accepted by sbemu configured with DIR/jwks.json or DIR/signing.pub.pem.
// A missing emulator is built (the default path) or fails the group: these tests never skip.
describe("tokensvc with sbemu", () => {
  let svc, ca;
  const saved = process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
  before(async () => {
    if (!existsSync(sbemuBin) && !process.env.SBEMU_BIN) {
      const b = spawnSync("make", ["-s", "-C", join(repoRoot, "test", "sbemu"), "all"], { encoding: "utf8", timeout: 900000 });
      assert.equal(b.status, 0, `building sbemu failed: ${b.stderr || b.stdout || b.error}`);
    }
    assert.ok(existsSync(sbemuBin), `no sbemu binary at ${sbemuBin}: build it with make (test/run does), or set SBEMU_BIN`);
    ca = makeTestCa();
    svc = await startTokensvc({ tls: { cert: ca.cert, key: ca.key } });
    // msal-node reads this when a credential is made; restored in after().
    process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = svc.http;
  });
  after(async () => {
    if (saved === undefined) delete process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
    else process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = saved;
    if (svc) {
      await svc.stop();
      rmSync(svc.tmp, { recursive: true, force: true });
    }
    if (ca) rmSync(dirname(ca.dir), { recursive: true, force: true });
  });

  it("@azure/service-bus with ClientSecretCredential through tokensvc sends and receives a message via sbemu --jwks", async () => {
    await svc.reset();
    const emu = await startSbemu({ config: configWith({ queues: [queue("q")] }), args: ["--jwks", svc.files.jwks] });
    try {
      const r = await getToken({
        credential: "ClientSecretCredential",
        args: [TENANT, "app-sb-client", CLIENT_SECRET],
        options: { authorityHost: svc.https, disableInstanceDiscovery: true },
        serviceBus: { host: emu.credentialHost(), queue: "q", body: "hello via tokensvc" },
      }, { NODE_EXTRA_CA_CERTS: ca.ca });
      assert.deepEqual(r.ok && r.received, "hello via tokensvc", JSON.stringify(r));
      const st = await svc.stats();
      assert.ok(st.entra.issued >= 1);
      assert.ok(st.issued.every((i) => i.client_id === "app-sb-client" && i.aud === SB));
      const identities = (await emu.connections()).flatMap((c) => c.tokens.map((t) => t.identity));
      // The client closed its connection; sbemu's log names the identity it accepted.
      assert.ok(identities.length === 0 || identities.includes(`jwt:${st.issued[0].sub}`));
      assert.ok(emu.log().includes(st.issued[0].sub), "sbemu saw the service principal's oid");
      assert.equal((await emu.entity("q")).active, 0, "received and completed");
    } finally {
      await emu.stop();
      rmSync(emu.dir, { recursive: true, force: true });
    }
  });

  for (const [name, flag, file] of [["--jwks", "--jwks", "jwks.json"], ["--jwt-public-key", "--jwt-public-key", "signing.pub.pem"]]) {
    it(`sbemu ${name} accepts ManagedIdentityCredential's tokens (in process); a wrong-audience token is refused`, async () => {
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
        assert.ok(st.imds.issued >= 1);
        const identities = (await emu.connections()).flatMap((c) => c.tokens.map((t) => t.identity));
        assert.ok(identities.includes(`jwt:${st.issued[0].sub}`), `sbemu saw identity jwt:${st.issued[0].sub}: ${identities}`);

        await svc.faults({ wrong_audience: true, count: "forever" });
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
