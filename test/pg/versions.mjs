// test/pg/versions.mjs: the extension's versions as the tree defines them, for the packaging checks
// and the extension upgrade test. The one source of the current version is sbpg.control's
// default_version; the versions that exist are read from the script names in sql/:
// sbpg--V.sql installs V from nothing, sbpg--A--B.sql updates A to B. Nothing here names a version.
import { readFileSync, readdirSync } from "node:fs";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const EXTENSION = "sbpg";

/** default_version from the control file (throws when it is missing or given twice). */
export function defaultVersion(dir = root) {
  const text = readFileSync(join(dir, `${EXTENSION}.control`), "utf8");
  const found = [...text.matchAll(/^\s*default_version\s*=\s*'([^']*)'\s*(#.*)?$/gm)].map((m) => m[1]);
  if (found.length !== 1) throw new Error(`${EXTENSION}.control: expected one default_version line, found ${found.length}`);
  return found[0];
}

/** Compares two dotted versions numerically, component by component ("0.10" > "0.9"). */
export function compareVersions(a, b) {
  const pa = a.split(".").map(Number), pb = b.split(".").map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

/** The extension version written as SemVer, as PGXN wants it: 0.2 -> 0.2.0. */
export function semver(v) {
  const parts = v.split(".");
  if (!parts.every((p) => /^(0|[1-9][0-9]*)$/.test(p)) || parts.length > 3) throw new Error(`version ${v} is not numeric`);
  while (parts.length < 3) parts.push("0");
  return parts.join(".");
}

/**
 * The scripts in sql/: [{ file, from, to }] where from is null for a full install script.
 * A file that starts with sbpg-- but does not parse is reported as { file, bad: true }.
 */
export function scripts(dir = root) {
  const out = [];
  const num = "[0-9]+(?:\\.[0-9]+)*";
  for (const f of readdirSync(join(dir, "sql")).sort()) {
    if (!f.startsWith(`${EXTENSION}--`) || !f.endsWith(".sql")) continue;
    const full = new RegExp(`^${EXTENSION}--(${num})\\.sql$`).exec(f);
    const update = new RegExp(`^${EXTENSION}--(${num})--(${num})\\.sql$`).exec(f);
    if (full) out.push({ file: `sql/${f}`, from: null, to: full[1] });
    else if (update) out.push({ file: `sql/${f}`, from: update[1], to: update[2] });
    else out.push({ file: `sql/${f}`, bad: true });
  }
  return out;
}

/**
 * The path CREATE EXTENSION takes to the default version: from the lowest version that has a full
 * script, one update script at a time, each to the next higher version reachable. Returns
 * { versions: [first, ..., default], problems: [text] }; a problem is a version below the default
 * that has no way on, a fork (two updates from one version), or a full script missing.
 */
export function chain(dir = root) {
  const current = defaultVersion(dir);
  const all = scripts(dir);
  const problems = all.filter((s) => s.bad).map((s) => `${s.file}: not named ${EXTENSION}--V.sql or ${EXTENSION}--A--B.sql`);
  const fulls = all.filter((s) => !s.bad && s.from === null).map((s) => s.to).sort(compareVersions);
  if (fulls.length === 0) return { versions: [], problems: [...problems, `no full install script sql/${EXTENSION}--V.sql`] };
  const versions = [fulls[0]];
  const seen = new Set(versions);
  for (let v = fulls[0]; v !== current;) {
    const next = all.filter((s) => !s.bad && s.from === v).sort((a, b) => compareVersions(a.to, b.to));
    if (next.length === 0) {
      problems.push(`no update script from ${v}: the chain ${versions.join(" -> ")} stops before default_version ${current}`);
      break;
    }
    if (next.length > 1) problems.push(`more than one update from ${v}: ${next.map((s) => s.file).join(", ")}`);
    const to = next[0].to;
    if (compareVersions(to, v) <= 0) problems.push(`${next[0].file} goes back to a version not above ${v}`);
    if (seen.has(to)) { problems.push(`the update scripts loop at ${to}`); break; }
    if (compareVersions(to, current) > 0) {
      problems.push(`${next[0].file} leads past default_version ${current}`);
      break;
    }
    versions.push(to);
    seen.add(to);
    v = to;
  }
  // Every version a script names below the default must be on the path (an older release that
  // cannot reach the current version would strand its installations).
  for (const s of all.filter((x) => !x.bad)) {
    for (const v of [s.from, s.to]) {
      if (v !== null && compareVersions(v, current) < 0 && !seen.has(v))
        problems.push(`version ${v} (${s.file}) has no update path to ${current}`);
    }
  }
  return { versions, problems: [...new Set(problems)] };
}

/** The versions below the default on the chain: the ones an installation can be updated from. */
export function previousVersions(dir = root) {
  const current = defaultVersion(dir);
  return chain(dir).versions.filter((v) => v !== current);
}
