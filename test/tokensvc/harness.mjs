// Former helper module, kept for the callers written against it (test/e2e). New code: lib.mjs.
//
// The same as lib.mjs, except for what those callers rely on:
//  - svc.ctl(method, path, query) and svc.faults(query) use the legacy query-string form of the
//    control routes (e.g. faults({ status: 429, count: 2 }), faults({ down_ms: 5000 }),
//    faults({ wrong_audience: 3 }), ctl("POST", "/control/config", { lifetime: 10 }));
//  - the Azure Arc key files are readable by the postgres OS user (sbpg's backends), as they were
//    before tokensvc wrote them 0600: when running as root and a postgres group exists, it passes
//    --arc-group postgres unless the caller chose a group.
import { existsSync, readFileSync } from "node:fs";
import { startTokensvc as startTokensvcLib } from "./lib.mjs";

export * from "./lib.mjs";

function postgresGroupExists() {
  return existsSync("/etc/group") && readFileSync("/etc/group", "utf8").split("\n").some((l) => l.startsWith("postgres:"));
}

export async function startTokensvc(o = {}) {
  const args = [...(o.args ?? [])];
  const asRoot = process.getuid && process.getuid() === 0;
  const o2 = { ...o, args };
  if (o.arcGroup === undefined && !args.some((a) => a.startsWith("--arc-group")) && asRoot && postgresGroupExists())
    o2.arcGroup = "postgres";
  const svc = await startTokensvcLib(o2);
  /** Calls a control route with a query string; throws unless it answers 200. */
  svc.ctl = async (method, path, query = {}) => {
    const qs = new URLSearchParams(query).toString();
    const res = await fetch(`${svc.http}${path}${qs ? "?" + qs : ""}`, { method });
    const body = await res.json();
    if (res.status !== 200) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(body)}`);
    return body;
  };
  svc.faults = (query) => svc.ctl("POST", "/control/faults", query);
  return svc;
}
