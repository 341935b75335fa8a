// What the extension upgrade test compares: the catalog an installation of sbpg has (every member
// object with its full definition, as pg_dump --binary-upgrade writes it, plus the extension's own
// row and member list), and the rows of its tables. Uses the PostgreSQL of PGBIN, like cluster.mjs
// (pg_dump must be the server's own major version).
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const PGBIN = process.env.PGBIN || "/usr/lib/postgresql/15/bin";

function connArgs(cluster, db) {
  return ["-h", cluster.dir, "-p", String(cluster.port), "-U", "postgres", "-d", db];
}

/** psql -c in database db of the cluster (cluster.psql always uses postgres). */
export function psqlIn(cluster, db, sql) {
  return execFileSync(join(PGBIN, "psql"), ["-X", "-q", "-v", "ON_ERROR_STOP=1", ...connArgs(cluster, db), "-c", sql],
    { encoding: "utf8" });
}

/** One query's rows as text, tab separated, one line a row (psql -At). */
function rowsIn(cluster, db, sql) {
  return execFileSync(join(PGBIN, "psql"), ["-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", ...connArgs(cluster, db), "-c", sql],
    { encoding: "utf8" });
}

// Lines of a binary-upgrade dump that differ between two databases without meaning anything about
// the catalog: OIDs pg_upgrade would preserve, frozen transaction ids, psql's per-dump \restrict
// key, pg_dump's own version line.
const NOISE = [
  /^SELECT pg_catalog\.binary_upgrade_set_next_/,
  /^\\(un)?restrict /,
  /^-- Dumped (from|by) /,
];
// Statements, possibly over several lines up to the ";", that only carry such values.
const NOISE_STATEMENTS = [/^UPDATE pg_catalog\.pg_(class|database)\b/];

/**
 * The schema of database db as pg_dump --schema-only --binary-upgrade writes it, without the
 * schemas in `exclude` (the test's own objects). Binary-upgrade mode dumps each extension member
 * on its own (a plain dump writes only CREATE EXTENSION): tables with their columns in attnum
 * order (dropped ones included), defaults, constraints, indexes, triggers, functions with their
 * bodies and settings, views, types, comments, owners, the initial privileges the extension
 * script set (pg_init_privs) and the current ones. binary_upgrade_create_empty_extension names
 * the configuration tables by OID: that line is replaced by their names (extensionRow below).
 */
export function schemaDump(cluster, db, { exclude = [] } = {}) {
  const args = ["--schema-only", "--binary-upgrade", "--no-tablespaces", ...exclude.flatMap((s) => ["-N", s]), ...connArgs(cluster, db)];
  const r = spawnSync(join(PGBIN, "pg_dump"), args, { encoding: "utf8", maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`pg_dump of ${db} failed: ${r.stderr}`);
  const out = [];
  const lines = r.stdout.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i];
    if (NOISE.some((re) => re.test(l))) continue;
    if (NOISE_STATEMENTS.some((re) => re.test(l))) {
      while (!/;\s*$/.test(lines[i]) && i < lines.length - 1) i++;
      continue;
    }
    if (/^SELECT pg_catalog\.binary_upgrade_create_empty_extension\(/.test(l)) {
      // Spans to the closing ");": extension name, schema, relocatable, version, config OIDs, conditions, requires.
      while (!/\);\s*$/.test(lines[i]) && i < lines.length - 1) i++;
      out.push("-- binary_upgrade_create_empty_extension(...): see the extension row below");
      continue;
    }
    out.push(l);
  }
  // Runs of blank lines left where noise was dropped would differ only in length.
  return out.join("\n").replace(/\n{3,}/g, "\n\n");
}

/**
 * What the dump does not show by name: the extension's row (version, schema, owner, relocatable,
 * configuration tables by name with their dump conditions), and every member object as
 * pg_describe_object names it, with its owner where it has one.
 */
export function extensionRow(cluster, db, ext = "sbpg") {
  const row = rowsIn(cluster, db, `
    SELECT 'extension ' || e.extname || ' version ' || e.extversion || ' schema ' || e.extnamespace::regnamespace::text
           || ' owner ' || e.extowner::regrole::text || ' relocatable ' || e.extrelocatable::text
    FROM pg_extension e WHERE e.extname = '${ext}'
    UNION ALL
    SELECT * FROM (
      SELECT 'config table ' || c.relid::regclass::text || ' condition ' || quote_literal(coalesce(c.cond, ''))
      FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS c(relid, cond)
      WHERE e.extname = '${ext}' ORDER BY 1) x
    UNION ALL
    SELECT * FROM (
      SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
      FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
      WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = '${ext}'
      ORDER BY 1) y`);
  return row;
}

/** The extension's catalog in db, as one text to compare. */
export function extensionCatalog(cluster, db, { exclude = [] } = {}) {
  return `${extensionRow(cluster, db)}\n${schemaDump(cluster, db, { exclude })}`;
}

/** A unified diff of two texts (diff -u), for an assertion message. */
export function unifiedDiff(a, b, labelA, labelB) {
  const dir = mkdtempSync(join(tmpdir(), "sbpg-diff-"));
  try {
    writeFileSync(join(dir, "a"), a);
    writeFileSync(join(dir, "b"), b);
    const r = spawnSync("diff", ["-u", "--label", labelA, "--label", labelB, join(dir, "a"), join(dir, "b")], { encoding: "utf8" });
    return r.stdout;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The tables (relkind r or p) that are members of the extension, by qualified name. */
export async function memberTables(client, ext = "sbpg") {
  const r = await client.query(`
    SELECT c.oid::regclass::text AS name FROM pg_depend d
    JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
    JOIN pg_extension e ON d.refclassid = 'pg_extension'::regclass AND e.oid = d.refobjid
    WHERE d.deptype = 'e' AND e.extname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1`, [ext]);
  return r.rows.map((x) => x.name);
}

/**
 * Every row of each table as a JSON object of its columns (values as to_jsonb writes them: the
 * text form of regprocedure, regclass, xid8, timestamps), the rows of a table sorted.
 */
export async function snapshotRows(client, tables) {
  const out = {};
  for (const t of tables) {
    const r = await client.query(`SELECT to_jsonb(t) AS j FROM ${t} t`);
    out[t] = r.rows.map((x) => x.j);
  }
  return out;
}

/** Each row cut to the given columns, rows sorted: to compare what existed before an update. */
export function projectRows(rows, keys) {
  return rows.map((r) => Object.fromEntries(keys.map((k) => [k, k in r ? r[k] : "<column missing>"])))
    .map((r) => JSON.stringify(r)).sort();
}
