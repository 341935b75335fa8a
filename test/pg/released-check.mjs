#!/usr/bin/env node
// test/pg/released-check.mjs: released extension scripts never change. sql/released.sha256
// (sha256sum's format: "<hex>  sql/<script>", one a line; `sha256sum -c sql/released.sha256` reads
// it too) lists every script of a released version. Checks:
//   - every script whose target version is below default_version is listed (those versions are
//     released: installations of them exist), and every listed script exists and still has its sum;
//   - the update chain from the first version to default_version is complete (versions.mjs).
// Scripts of default_version itself may change until it is released; once its lines are in the
// manifest, they may not (a later change goes into the next version's update script).
//   node test/pg/released-check.mjs            prints each problem; exit status 1 when there is one
//   node test/pg/released-check.mjs --print V  prints the manifest lines for version V's scripts
import { readFileSync, existsSync } from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { root, defaultVersion, scripts, chain, compareVersions } from "./versions.mjs";

export const MANIFEST = "sql/released.sha256";
const sum = (file, dir = root) => createHash("sha256").update(readFileSync(join(dir, file))).digest("hex");

export function readManifest(dir = root) {
  const entries = new Map();
  const problems = [];
  if (!existsSync(join(dir, MANIFEST))) return { entries, problems: [`${MANIFEST} is missing`] };
  readFileSync(join(dir, MANIFEST), "utf8").split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    const m = /^([0-9a-f]{64}) [ *](sql\/\S+)$/.exec(line);
    if (!m) problems.push(`${MANIFEST}:${i + 1}: not "<sha256>  sql/<script>"`);
    else if (entries.has(m[2])) problems.push(`${MANIFEST}:${i + 1}: ${m[2]} listed twice`);
    else entries.set(m[2], m[1]);
  });
  return { entries, problems };
}

/** { released: [problems], chain: [problems] } */
export function check(dir = root) {
  const current = defaultVersion(dir);
  const { entries, problems } = readManifest(dir);
  const released = [...problems];
  for (const s of scripts(dir).filter((x) => !x.bad)) {
    if (compareVersions(s.to, current) < 0 && !entries.has(s.file))
      released.push(`${s.file} leads to ${s.to}, a released version (below ${current}), but is not in ${MANIFEST}`);
  }
  for (const [file, hex] of entries) {
    if (!existsSync(join(dir, file))) released.push(`${file} is released (in ${MANIFEST}) but missing from the tree`);
    else if (sum(file, dir) !== hex)
      released.push(`${file} changed after its release (sha256 ${sum(file, dir)}, released as ${hex}): put the change into the update script of ${current} or of a new version`);
  }
  return { released, chain: chain(dir).problems };
}

if (process.argv[1]?.endsWith("released-check.mjs")) {
  if (process.argv[2] === "--print") {
    const v = process.argv[3];
    for (const s of scripts().filter((x) => !x.bad && x.to === v)) console.log(`${sum(s.file)}  ${s.file}`);
    process.exit(0);
  }
  const only = process.env.RELEASED_CHECK; // released | chain | (both)
  const r = check();
  const errors = [...(only !== "chain" ? r.released : []), ...(only !== "released" ? r.chain : [])];
  for (const e of errors) console.log(e);
  if (errors.length === 0) console.log(`released scripts unchanged; update chain ${chain().versions.join(" -> ")} complete`);
  process.exit(errors.length ? 1 : 0);
}
