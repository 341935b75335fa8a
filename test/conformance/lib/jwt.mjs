// Entra ID style tokens for tests: an RSA key pair made per run, RS256 JWTs signed with it, and a
// TokenCredential for the Azure SDK.
import { generateKeyPairSync, createSign } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

export function makeSigningKey(dir, name = "jwt") {
  const { publicKey, privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const pubPath = join(dir, `${name}.pub.pem`);
  writeFileSync(pubPath, publicKey.export({ type: "spki", format: "pem" }));
  const jwk = publicKey.export({ format: "jwk" });
  const jwksPath = join(dir, `${name}.jwks.json`);
  writeFileSync(jwksPath, JSON.stringify({ keys: [{ ...jwk, kid: name, use: "sig", alg: "RS256" }] }));
  return { publicKey, privateKey, pubPath, jwksPath, kid: name };
}

const b64url = (buf) => Buffer.from(buf).toString("base64url");

export function signJwt(key, claims = {}, { kid } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = { alg: "RS256", typ: "JWT", ...(kid ? { kid } : {}) };
  const payload = {
    aud: "https://servicebus.azure.net",
    iss: "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
    oid: "11111111-2222-3333-4444-555555555555",
    iat: now,
    nbf: now - 5,
    exp: now + 3600,
    ...claims,
  };
  const data = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  const sig = createSign("RSA-SHA256").update(data).sign(key.privateKey);
  return `${data}.${b64url(sig)}`;
}

/** A TokenCredential that hands out the given JWT (or the result of a function). */
export function staticCredential(tokenOrFn, expiresInMs = 3600_000) {
  const calls = [];
  return {
    calls,
    async getToken(scopes) {
      calls.push(scopes);
      const token = typeof tokenOrFn === "function" ? tokenOrFn() : tokenOrFn;
      return { token, expiresOnTimestamp: Date.now() + expiresInMs };
    },
  };
}
