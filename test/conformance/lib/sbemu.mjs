// Test harness: starts sbemu on free ports, talks to its control interface, and fails the test
// if sbemu dies by a signal it was not sent.
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..", "..");
// SBEMU_BIN selects another build (test/run's sanitizer suite uses it).
export const sbemuBin = process.env.SBEMU_BIN || join(repoRoot, "test", "sbemu", "sbemu");
export const defaultKey = { name: "RootManageSharedAccessKey", key: "SAS_KEY_VALUE" };

/** Polls fn until it returns a truthy value; the timeout only guards against hanging. */
export async function waitFor(fn, { timeout = 15000, interval = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Starts sbemu. `config` is a Config.json object (or a path); `args` are extra CLI options.
 * Returns handles for the AMQP endpoint, the control interface and a stop() that asserts a
 * clean exit.
 */
export async function startSbemu({ config, args = [] } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "sbemu-"));
  let configPath = null;
  if (typeof config === "string") configPath = config;
  else if (config) {
    configPath = join(dir, "Config.json");
    writeFileSync(configPath, JSON.stringify(config, null, 2));
  }
  const logFile = join(dir, "sbemu.log");
  const argv = ["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0", "--log-file", logFile, "--log-level", "debug"];
  if (configPath) argv.push("--config", configPath);
  argv.push(...args);
  const child = spawn(sbemuBin, argv, { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  let exited = null;
  const exitPromise = new Promise((res) => child.on("exit", (code, signal) => { exited = { code, signal }; res(exited); }));
  const ready = await new Promise((res, rej) => {
    let out = "";
    const timer = setTimeout(() => rej(new Error("sbemu did not print its readiness line: " + stderr)), 10000);
    child.stdout.on("data", (d) => {
      out += d;
      const line = out.split("\n").find((l) => l.startsWith("sbemu ready"));
      if (line) { clearTimeout(timer); res(line); }
    });
    child.on("exit", (code, signal) => { clearTimeout(timer); rej(new Error(`sbemu exited (${code ?? signal}): ${stderr}`)); });
  });
  const amqp = /amqp=(amqp:\/\/[^ ]+)/.exec(ready)[1];
  const amqps = /amqps=(amqps:\/\/[^ ]+)/.exec(ready)?.[1];
  const control = /control=(http:\/\/[^ ]+)/.exec(ready)[1];
  const hostPort = amqp.replace("amqp://", "");
  let stopping = false;

  const emu = {
    dir, logFile, amqp, amqps, control, hostPort, child,
    port: Number(hostPort.split(":")[1]),
    connectionString(key = defaultKey) {
      return `Endpoint=sb://${hostPort};SharedAccessKeyName=${key.name};SharedAccessKey=${key.key};UseDevelopmentEmulator=true;`;
    },
    /** Host argument that makes the SDK use plain TCP with a TokenCredential (see lib/README). */
    credentialHost() {
      return `${hostPort};UseDevelopmentEmulator=true;Endpoint=sb://${hostPort}/`;
    },
    async ctl(method, path, query = {}, body) {
      if (exited) throw new Error(`sbemu is not running (${JSON.stringify(exited)}): ${stderr}`);
      const qs = new URLSearchParams(query).toString();
      const res = await fetch(`${control}${path}${qs ? "?" + qs : ""}`, { method, body });
      const text = await res.text();
      const json = text.trim() ? JSON.parse(text) : null;
      if (!res.ok) throw new Error(`control ${method} ${path}: ${res.status} ${text}`);
      return json;
    },
    entity(path) { return emu.ctl("GET", `/entities/${encodeURIComponent(path)}`); },
    messages(path) { return emu.ctl("GET", `/entities/${encodeURIComponent(path)}/messages`); },
    fault(name, query = {}) { return emu.ctl("POST", `/faults/${name}`, query); },
    connections() { return emu.ctl("GET", "/connections"); },
    log() { return existsSync(logFile) ? readFileSync(logFile, "utf8") : ""; },
    /** Stops sbemu and asserts it was alive and exits cleanly. */
    async stop() {
      if (stopping) return;
      stopping = true;
      if (exited) throw new Error(`sbemu died before the test ended (${JSON.stringify(exited)}): ${stderr}`);
      child.kill("SIGTERM");
      const r = await exitPromise;
      if (r.signal || r.code !== 0) throw new Error(`sbemu exited badly: ${JSON.stringify(r)} ${stderr}`);
    },
  };
  return emu;
}

/** A queue entry for Config.json. */
export function queue(name, props = {}) {
  return { Name: name, Properties: { LockDuration: "PT1M", MaxDeliveryCount: 10, ...props } };
}

export function configWith({ queues = [], topics = [] } = {}) {
  return { UserConfig: { Namespaces: [{ Name: "sbemulatorns", Queues: queues, Topics: topics }], Logging: { Type: "File" } } };
}
