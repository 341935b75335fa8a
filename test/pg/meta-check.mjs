#!/usr/bin/env node
// test/pg/meta-check.mjs: checks META.json against the PGXN Meta Spec 1.0.0 (no validator is
// packaged for Debian or npm, so the spec's rules are written out here), and against the tree:
// its versions are sbpg.control's default_version as SemVer, the files it names exist.
//   node test/pg/meta-check.mjs [META.json]   prints each problem; exit status 1 when there is one
import { readFileSync, existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { root, defaultVersion, semver, EXTENSION } from "./versions.mjs";

const LICENSES = new Set([
  "agpl_3", "apache_1_1", "apache_2_0", "artistic_1", "artistic_2", "bsd", "freebsd", "gfdl_1_2",
  "gfdl_1_3", "gpl_1", "gpl_2", "gpl_3", "lgpl_2_1", "lgpl_3_0", "mit", "mozilla_1_0", "mozilla_1_1",
  "openssl", "perl_5", "postgresql", "qpl_1_0", "ssleay", "sun", "zlib", "open_source", "restricted",
  "unrestricted", "unknown",
]);
const PHASES = ["configure", "build", "test", "runtime", "develop"];
const RELATIONSHIPS = ["requires", "recommends", "suggests", "conflicts"];
const SEMVER = /^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$/;
// A version range: 0, or comma-separated SemVers each with an optional operator.
const RANGE_PART = /^\s*((==|!=|<=|>=|<|>)\s*)?(\S+)\s*$/;
const TERM = /^[^\s/\\\p{Cc}]{2,}$/u; // two or more characters, no slash, backslash, space or control
const TAG = /^[^/\\\p{Cc}]{2,255}$/u;
const URI = /^[A-Za-z][A-Za-z0-9+.-]*:\S+$/;
const EMAIL = /^[^\s@]+@[^\s@]+$/;
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const custom = (k) => /^x_/i.test(k); // the spec reserves x_ / X_ keys for custom use

export function validate(meta, { dir = root } = {}) {
  const errors = [];
  const err = (path, msg) => errors.push(`${path}: ${msg}`);
  const nonEmpty = (path, v) => (typeof v === "string" && v.length > 0) || err(path, "must be a non-empty string");
  const version = (path, v) => (typeof v === "string" && SEMVER.test(v)) || err(path, `must be a SemVer version (x.y.z), not ${JSON.stringify(v)}`);
  const uri = (path, v) => (typeof v === "string" && URI.test(v)) || err(path, `must be a URI, not ${JSON.stringify(v)}`);
  const only = (path, obj, keys) => {
    for (const k of Object.keys(obj)) if (!keys.includes(k) && !custom(k)) err(`${path}.${k}`, "is not a key the spec defines (custom keys start with x_)");
  };
  const path = (p, v) => {
    if (typeof v !== "string" || v.length < 2) return err(p, "must be a relative path of at least 2 characters");
    if (v.startsWith("/") || v.split("/").includes("..") || v.includes("\\")) err(p, `must be a relative Unix path inside the distribution, not ${v}`);
  };

  if (!isObject(meta)) return ["META.json: must be a JSON object"];
  for (const k of ["name", "abstract", "maintainer", "license", "provides", "meta-spec", "version"])
    if (!(k in meta)) err(k, "is required");
  only("META", meta, ["name", "abstract", "description", "version", "maintainer", "license", "provides", "meta-spec",
    "generated_by", "tags", "no_index", "prereqs", "release_status", "resources"]);

  if ("name" in meta && !(typeof meta.name === "string" && TERM.test(meta.name))) err("name", "must be a term: 2+ characters without slash, backslash, space or control characters");
  if ("abstract" in meta) nonEmpty("abstract", meta.abstract);
  if ("description" in meta) nonEmpty("description", meta.description);
  if ("generated_by" in meta) nonEmpty("generated_by", meta.generated_by);
  if ("version" in meta) version("version", meta.version);

  if ("maintainer" in meta) {
    const m = meta.maintainer;
    if (typeof m === "string") nonEmpty("maintainer", m);
    else if (Array.isArray(m) && m.length > 0) {
      m.forEach((x, i) => nonEmpty(`maintainer[${i}]`, x));
      if (new Set(m).size !== m.length) err("maintainer", "lists a maintainer twice");
    } else err("maintainer", "must be a string or a non-empty list of strings");
  }

  if ("license" in meta) {
    const l = meta.license;
    if (typeof l === "string") LICENSES.has(l) || err("license", `${l} is not one of the spec's license strings`);
    else if (Array.isArray(l) && l.length > 0) {
      l.forEach((x, i) => LICENSES.has(x) || err(`license[${i}]`, `${JSON.stringify(x)} is not one of the spec's license strings`));
      if (new Set(l).size !== l.length) err("license", "lists a license twice");
    } else if (isObject(l) && Object.keys(l).length > 0) {
      for (const [k, v] of Object.entries(l)) uri(`license.${k}`, v);
    } else err("license", "must be a license string, a non-empty list of them, or an object of names to URLs");
  }

  if ("meta-spec" in meta) {
    const s = meta["meta-spec"];
    if (!isObject(s)) err("meta-spec", "must be an object");
    else {
      only("meta-spec", s, ["version", "url"]);
      if (!(typeof s.version === "string" && /^1\.0\.\d+$/.test(s.version))) err("meta-spec.version", "must be 1.0.x");
      if ("url" in s && !["https://pgxn.org/meta/spec.txt", "http://pgxn.org/meta/spec.txt"].includes(s.url))
        err("meta-spec.url", "must be the spec's URL, https://pgxn.org/meta/spec.txt");
    }
  }

  if ("provides" in meta) {
    const p = meta.provides;
    if (!isObject(p) || Object.keys(p).length === 0) err("provides", "must be an object with at least one extension");
    else for (const [name, ext] of Object.entries(p)) {
      const at = `provides.${name}`;
      if (!TERM.test(name)) err(at, "the extension name must be a term");
      if (!isObject(ext)) { err(at, "must be an object"); continue; }
      only(at, ext, ["file", "version", "abstract", "docfile", "docpath"]);
      if (!("file" in ext)) err(`${at}.file`, "is required");
      else { path(`${at}.file`, ext.file); if (!existsSync(join(dir, String(ext.file)))) err(`${at}.file`, `${ext.file} is not in the tree`); }
      if (!("version" in ext)) err(`${at}.version`, "is required");
      else version(`${at}.version`, ext.version);
      if ("abstract" in ext) nonEmpty(`${at}.abstract`, ext.abstract);
      if ("docfile" in ext) { path(`${at}.docfile`, ext.docfile); if (!existsSync(join(dir, String(ext.docfile)))) err(`${at}.docfile`, `${ext.docfile} is not in the tree`); }
      if ("docpath" in ext) nonEmpty(`${at}.docpath`, ext.docpath);
    }
  }

  if ("prereqs" in meta) {
    const p = meta.prereqs;
    if (!isObject(p) || Object.keys(p).filter((k) => !custom(k)).length === 0) err("prereqs", "must be an object with at least one phase");
    else {
      only("prereqs", p, PHASES);
      for (const phase of PHASES.filter((x) => x in p)) {
        const ph = p[phase];
        if (!isObject(ph) || !RELATIONSHIPS.some((r) => r in ph)) { err(`prereqs.${phase}`, `must be an object with one of ${RELATIONSHIPS.join(", ")}`); continue; }
        only(`prereqs.${phase}`, ph, RELATIONSHIPS);
        for (const rel of RELATIONSHIPS.filter((x) => x in ph)) {
          const r = ph[rel];
          const at = `prereqs.${phase}.${rel}`;
          if (!isObject(r) || Object.keys(r).length === 0) { err(at, "must be an object of prerequisites to version ranges"); continue; }
          for (const [dep, range] of Object.entries(r)) {
            if (!TERM.test(dep)) err(`${at}.${dep}`, "the prerequisite's name must be a term");
            if (range === 0 || range === "0") continue;
            const ok = typeof range === "string" && range.split(",").every((part) => {
              const m = RANGE_PART.exec(part);
              return m && SEMVER.test(m[3]);
            });
            if (!ok) err(`${at}.${dep}`, `must be 0 or a version range of SemVers (">= 1.2.0, < 2.0.0"), not ${JSON.stringify(range)}`);
          }
        }
      }
    }
  }

  if ("resources" in meta) {
    const r = meta.resources;
    if (!isObject(r) || !["homepage", "bugtracker", "repository"].some((k) => k in r)) err("resources", "must be an object with homepage, bugtracker or repository");
    else {
      only("resources", r, ["homepage", "bugtracker", "repository"]);
      if ("homepage" in r) uri("resources.homepage", r.homepage);
      if ("bugtracker" in r) {
        const b = r.bugtracker;
        if (!isObject(b) || !("web" in b || "mailto" in b)) err("resources.bugtracker", "must be an object with web or mailto");
        else {
          only("resources.bugtracker", b, ["web", "mailto"]);
          if ("web" in b) uri("resources.bugtracker.web", b.web);
          if ("mailto" in b && !(typeof b.mailto === "string" && EMAIL.test(b.mailto))) err("resources.bugtracker.mailto", "must be an email address");
        }
      }
      if ("repository" in r) {
        const g = r.repository;
        if (!isObject(g) || !(("url" in g && "type" in g) || "web" in g)) err("resources.repository", "must be an object with url and type, or web");
        else {
          only("resources.repository", g, ["url", "web", "type"]);
          if ("url" in g) uri("resources.repository.url", g.url);
          if ("web" in g) uri("resources.repository.web", g.web);
          if ("type" in g && !(typeof g.type === "string" && /^\p{Ll}+$/u.test(g.type))) err("resources.repository.type", "must be a lower-case word such as git");
        }
      }
    }
  }

  if ("tags" in meta) {
    const t = meta.tags;
    if (!Array.isArray(t) || t.length === 0) err("tags", "must be a non-empty list of strings");
    else {
      t.forEach((x, i) => (typeof x === "string" && TAG.test(x)) || err(`tags[${i}]`, "must be a string of 2 to 255 characters without slash, backslash or control characters"));
      if (new Set(t).size !== t.length) err("tags", "lists a tag twice");
    }
  }

  if ("no_index" in meta) {
    const n = meta.no_index;
    if (!isObject(n) || !("file" in n || "directory" in n)) err("no_index", "must be an object with file or directory");
    else {
      only("no_index", n, ["file", "directory"]);
      for (const k of ["file", "directory"].filter((x) => x in n)) {
        const list = Array.isArray(n[k]) ? n[k] : [n[k]];
        if (list.length === 0) err(`no_index.${k}`, "must not be empty");
        list.forEach((x, i) => path(`no_index.${k}[${i}]`, x));
      }
    }
  }

  if ("release_status" in meta && !["stable", "testing", "unstable"].includes(meta.release_status))
    err("release_status", "must be stable, testing or unstable");
  return errors;
}

/** The project's own rules: one version, sbpg.control's, in every version field. */
export function checkVersions(meta, { dir = root } = {}) {
  const errors = [];
  const want = semver(defaultVersion(dir));
  if (meta.name !== EXTENSION) errors.push(`name: ${JSON.stringify(meta.name)}, not ${EXTENSION}`);
  if (meta.version !== want) errors.push(`version: ${JSON.stringify(meta.version)}, but ${EXTENSION}.control's default_version is ${defaultVersion(dir)} (${want})`);
  const ext = meta.provides?.[EXTENSION];
  if (!ext) errors.push(`provides.${EXTENSION}: missing`);
  else if (ext.version !== want) errors.push(`provides.${EXTENSION}.version: ${JSON.stringify(ext.version)}, but ${EXTENSION}.control's default_version is ${defaultVersion(dir)} (${want})`);
  return errors;
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith("meta-check.mjs")) {
  const file = resolve(process.argv[2] || join(root, "META.json"));
  let meta;
  try {
    meta = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    console.log(`${file}: not valid JSON: ${e.message}`);
    process.exit(1);
  }
  const mode = process.env.META_CHECK || "all"; // spec | versions | all
  const errors = [
    ...(mode !== "versions" ? validate(meta).map((e) => `spec: ${e}`) : []),
    ...(mode !== "spec" ? checkVersions(meta).map((e) => `versions: ${e}`) : []),
  ];
  for (const e of errors) console.log(`META.json ${e}`);
  if (errors.length === 0) console.log(`META.json is valid (PGXN Meta Spec 1.0.0) and names version ${meta.version}`);
  process.exit(errors.length ? 1 : 0);
}
