/**
 * An N-node clogd cluster on one machine, to try clogd by hand (root, corosync installed):
 *
 *     deno run -A --v8-flags=--stack-size=2048 scripts/cluster.ts up 3
 *     deno run -A ... scripts/cluster.ts status
 *     deno run -A ... scripts/cluster.ts load all --duration 10 --logs 2
 *     deno run -A ... scripts/cluster.ts fault partition 2
 *     deno run -A ... scripts/cluster.ts exec 1 -- deno task clogd status
 *     deno run -A ... scripts/cluster.ts down
 *
 * `up` starts a supervisor process in the background that owns the cluster (the
 * tests/support/cluster.ts harness: namespaces, corosyncs, clogd daemons, monitors) and answers
 * the other commands over a unix socket in the state directory (default
 * {@link DEFAULT_DIR}, or --dir). `down` asks it to clean everything up; if the supervisor is
 * gone, `down` cleans up from the directory's manifest instead (namespaces, processes found in
 * them, /dev/shm leftovers).
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  cleanupClusterDir,
  type ClogdMode,
  Cluster,
  type FaultTiming,
  type LoadOptions,
} from "../tests/support/cluster.ts";
import { quote } from "../tests/support/corosync.ts";

/** Default state directory. */
export const DEFAULT_DIR = "/run/clogd-cluster";
/** Longest wait for `up` to bring the cluster up, in ms. */
/**
 * Default totem token of a cluster brought up by hand, in ms: longer than the tests' 300 ms,
 * because here three nodes, their loads and the user's other work share the machine's cores;
 * with 300 ms a loaded node was seen losing the token and its quorum (the demo, 2 cores).
 * Failure detection then takes about 2.2 s.
 */
export const SCRIPT_TOKEN_MS = 1000;

const UP_TIMEOUT_MS = 120_000;
/** Largest request or answer on the supervisor socket, in bytes. */
const MAX_MESSAGE_BYTES = 1 << 20;

const HELP = `Usage: cluster.ts COMMAND [options]

Commands:
  up N [--mode cluster|standalone] [--no-clogd] [--spares K] [--transport knet|udpu] [--token MS (default 1000)]
                      bring up N nodes (corosync, clogd) in network namespaces
  status [--json]     nodes, memberships, daemons and their logs
  fault KIND NODE     inject a fault and print when the others saw it. KIND: kill-daemon,
                      restart-daemon, kill-corosync, start-corosync, partition, heal, stop, start,
                      add (NODE ignored: the next spare; needs --spares at up)
  load NODE|all [--duration S] [--logs N] [--iodepth N] [--type core|disk] [-- KERNEL-SIM ARGS]
                      run the kernel simulator on nodes against their clogd; print the reports
                      (exit 1 if a simulated kernel saw a wrong answer)
  exec NODE -- CMD... run CMD inside node NODE's namespace, with CLOGD_CONTROL set to its clogd
  down                stop everything and clean up

Common option: --dir DIR  state directory (default ${DEFAULT_DIR})
`;

const FAULTS = {
  "kill-daemon": (c: Cluster, n: number) => c.killDaemon(n),
  "restart-daemon": (c: Cluster, n: number) => c.restartDaemon(n),
  "kill-corosync": (c: Cluster, n: number) => c.killCorosync(n),
  "start-corosync": (c: Cluster, n: number) => c.startCorosync(n),
  "partition": (c: Cluster, n: number) => c.partition(n),
  "heal": (c: Cluster, n: number) => c.heal(n),
  "stop": (c: Cluster, n: number) => c.stopNode(n),
  "start": (c: Cluster, n: number) => c.startNode(n),
  "add": (c: Cluster, _n: number) => c.addNode(),
} as const satisfies Record<string, (c: Cluster, n: number) => Promise<FaultTiming>>;

type Request =
  | { cmd: "status" }
  | { cmd: "fault"; kind: keyof typeof FAULTS; node: number }
  | { cmd: "load"; nodes: number[]; options: LoadOptions }
  | { cmd: "down" };

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      dir: { type: "string", default: DEFAULT_DIR },
      mode: { type: "string", default: "cluster" },
      "no-clogd": { type: "boolean", default: false },
      spares: { type: "string", default: "0" },
      transport: { type: "string", default: "knet" },
      token: { type: "string" },
      json: { type: "boolean", default: false },
      duration: { type: "string", default: "10" },
      logs: { type: "string", default: "1" },
      iodepth: { type: "string", default: "8" },
      type: { type: "string", default: "core" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const [command, ...rest] = positionals;
  if (values.help || command === undefined) {
    console.log(HELP);
    return command === undefined && !values.help ? 2 : 0;
  }
  const dir = values.dir;
  const socket = `${dir}/supervisor.sock`;
  switch (command) {
    case "up": {
      const nodes = Number(rest[0]);
      if (!Number.isInteger(nodes) || nodes < 1) throw new Error("up needs a node count");
      if (await ask(socket, { cmd: "status" }).then(() => true, () => false)) {
        throw new Error(`A cluster runs already in ${dir}: "down" first`);
      }
      await cleanupClusterDir(dir);
      await Deno.mkdir(dir, { recursive: true });
      const args = [
        Deno.execPath(),
        "run",
        "--allow-all",
        "--v8-flags=--stack-size=2048",
        new URL(import.meta.url).pathname,
        "supervise",
        String(nodes),
        "--dir",
        dir,
        "--mode",
        values.mode,
        "--spares",
        values.spares,
        "--transport",
        values.transport,
        ...(values["no-clogd"] ? ["--no-clogd"] : []),
        ...(values.token === undefined ? [] : ["--token", values.token]),
      ];
      const log = `${dir}/supervisor.log`;
      // setsid: the supervisor outlives this command and the terminal's Ctrl-C.
      const script = `setsid -f ${args.map(quote).join(" ")} </dev/null >>${quote(log)} 2>&1`;
      await new Deno.Command("sh", { args: ["-c", script] }).output();
      const deadline = Date.now() + UP_TIMEOUT_MS;
      while (true) {
        try {
          print(await ask(socket, { cmd: "status" }), values.json);
          return 0;
        } catch {
          const text = await Deno.readTextFile(log).catch(() => "");
          if (text.includes("supervisor failed") || Date.now() > deadline) {
            console.error(text.slice(-4000));
            await cleanupClusterDir(dir);
            return 1;
          }
          await new Promise((r) => setTimeout(r, 200));
        }
      }
    }
    case "supervise":
      return await supervise(dir, Number(rest[0]), {
        mode: values.mode as ClogdMode,
        clogd: !values["no-clogd"],
        spares: Number(values.spares),
        transport: values.transport as "knet" | "udpu",
        tokenMs: values.token === undefined ? SCRIPT_TOKEN_MS : Number(values.token),
      });
    case "status":
      print(await ask(socket, { cmd: "status" }), values.json);
      return 0;
    case "fault": {
      const kind = rest[0] as keyof typeof FAULTS;
      if (!(kind in FAULTS)) throw new Error(`Unknown fault "${rest[0]}"; see --help`);
      const node = Number(rest[1] ?? 0);
      console.log(JSON.stringify(await ask(socket, { cmd: "fault", kind, node })));
      return 0;
    }
    case "load": {
      const status = await ask(socket, { cmd: "status" }) as { nodes: { id: number }[] };
      const nodes = rest[0] === "all" ? status.nodes.map((n) => n.id) : [Number(rest[0])];
      const options: LoadOptions = {
        durationS: Number(values.duration),
        logs: Number(values.logs),
        iodepth: Number(values.iodepth),
        type: values.type as "core" | "disk",
        args: rest.slice(1),
      };
      const reports = await ask(socket, { cmd: "load", nodes, options }) as {
        ok: boolean;
        violations: number;
      }[];
      console.log(JSON.stringify(reports, null, 2));
      // Exit 1 when a simulated kernel saw a wrong answer (the reports say which).
      return reports.every((r) => r.ok && r.violations === 0) ? 0 : 1;
    }
    case "exec": {
      const manifest = JSON.parse(await Deno.readTextFile(`${dir}/manifest.json`));
      const node = Number(rest[0]);
      const name = `${manifest.name}-n${node}`;
      if (!manifest.namespaces.includes(name)) throw new Error(`No node ${rest[0]}`);
      const cmd = rest.slice(1);
      if (cmd.length === 0) throw new Error("exec needs a command after --");
      const { code } = await new Deno.Command("ip", {
        args: ["netns", "exec", name, ...cmd],
        env: { CLOGD_CONTROL: `${dir}/n${node}/clogd.sock` },
        stdin: "inherit",
        stdout: "inherit",
        stderr: "inherit",
      }).output();
      return code;
    }
    case "down": {
      try {
        await ask(socket, { cmd: "down" });
      } catch {
        // No supervisor: clean up from the manifest.
      }
      await cleanupClusterDir(dir);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      console.log(`Cluster in ${dir} is down`);
      return 0;
    }
    default:
      console.error(`Unknown command "${command}"\n\n${HELP}`);
      return 2;
  }
}

async function supervise(
  dir: string,
  nodes: number,
  options: {
    mode: ClogdMode;
    clogd: boolean;
    spares: number;
    transport: "knet" | "udpu";
    tokenMs?: number;
  },
): Promise<number> {
  let cluster: Cluster;
  try {
    cluster = await Cluster.start({
      nodes,
      maxNodes: nodes + options.spares,
      dir,
      keepDir: true,
      clogd: options.clogd,
      mode: options.mode,
      transport: options.transport,
      tokenMs: options.tokenMs,
    });
  } catch (error) {
    console.error(`supervisor failed: ${error instanceof Error ? error.stack : error}`);
    return 1;
  }
  console.error(`supervisor ${Deno.pid}: cluster ${cluster.name} up with ${nodes} nodes`);
  const socket = `${dir}/supervisor.sock`;
  await Deno.remove(socket).catch(() => {});
  const listener = Deno.listen({ transport: "unix", path: socket });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    listener.close();
    await cluster.close().catch((e) => console.error(`cleanup: ${e}`));
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  const serve = async (conn: Deno.Conn) => {
    let answer: unknown;
    let request: Request | undefined;
    try {
      request = JSON.parse(new TextDecoder().decode(await readAll(conn))) as Request;
      answer = { ok: true, result: await handle(cluster, request) };
    } catch (error) {
      answer = { ok: false, error: error instanceof Error ? error.message : String(error) };
    }
    try {
      await writeAll(conn, new TextEncoder().encode(JSON.stringify(answer)));
    } catch {
      // The client went away.
    }
    conn.close();
    if (request?.cmd === "down") await stop();
  };
  // Concurrently: a fault must be injectable while a load runs (e.g. adding a node under load).
  for await (const conn of listener) serve(conn);
  return 0;
}

async function handle(cluster: Cluster, request: Request): Promise<unknown> {
  switch (request.cmd) {
    case "status":
      return {
        name: cluster.name,
        dir: cluster.dir,
        mode: cluster.mode,
        maxNodes: cluster.maxNodes,
        nodes: await Promise.all(cluster.nodes.map(async (n) => ({
          id: n.id,
          address: n.address,
          netns: n.netns.name,
          corosync: n.corosync.pid ?? null,
          membership: n.view ?? null,
          partitioned: n.partitioned,
          stopped: n.stopped,
          clogd: n.clogd?.pid ?? null,
          control: n.controlPath,
          logs: n.clogd === undefined ? null : await cluster.statusOf(n.id).then(
            (s) =>
              s.logs.map((l) => ({
                uuid: l.uuid,
                members: l.members,
                writer: l.writer,
                digest: l.digest,
                state: l.state,
              })),
            (e) => `status failed: ${e}`,
          ),
        }))),
        faults: cluster.faults,
      };
    case "fault":
      return await FAULTS[request.kind](cluster, request.node);
    case "load": {
      const runs = request.nodes.map((id) => cluster.startLoad(id, request.options));
      return await Promise.all(runs.map(async (run) => {
        const { code, report } = await run.report();
        return {
          node: run.node,
          code,
          ok: report.ok,
          requests: report.requests.sent,
          answered: report.requests.replied,
          violations: report.violations.total,
          requestsPerSec: report.requestsPerSec,
          flushLatencyUs: report.flushLatencyUs,
        };
      }));
    }
    case "down":
      return "down";
  }
}

async function ask(socket: string, request: Request): Promise<unknown> {
  const conn = await Deno.connect({ transport: "unix", path: socket });
  try {
    await writeAll(conn, new TextEncoder().encode(JSON.stringify(request)));
    await conn.closeWrite();
    const answer = JSON.parse(new TextDecoder().decode(await readAll(conn)));
    if (!answer.ok) throw new Error(answer.error);
    return answer.result;
  } finally {
    conn.close();
  }
}

async function readAll(conn: Deno.Conn): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const buf = new Uint8Array(64 * 1024);
  while (true) {
    const n = await conn.read(buf);
    if (n === null) break;
    chunks.push(buf.slice(0, n));
    size += n;
    if (size > MAX_MESSAGE_BYTES) throw new Error(`Message over ${MAX_MESSAGE_BYTES} bytes`);
    // A request is one JSON document: stop at its end without waiting for EOF.
    try {
      JSON.parse(new TextDecoder().decode(concat(chunks, size)));
      break;
    } catch {
      // Not complete yet.
    }
  }
  return concat(chunks, size);
}

function concat(chunks: Uint8Array[], size: number): Uint8Array {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let offset = 0; offset < data.length;) offset += await conn.write(data.subarray(offset));
}

function print(status: unknown, json: boolean): void {
  if (json) {
    console.log(JSON.stringify(status, null, 2));
    return;
  }
  const s = status as {
    name: string;
    dir: string;
    mode: string;
    nodes: {
      id: number;
      address: string;
      netns: string;
      corosync: number | null;
      membership: number[] | null;
      partitioned: boolean;
      clogd: number | null;
      logs: { uuid: string; members: number[]; digest: string | null }[] | string | null;
    }[];
  };
  console.log(`cluster ${s.name} in ${s.dir}, clogd mode ${s.mode}`);
  for (const n of s.nodes) {
    console.log(
      `  node ${n.id} ${n.address} netns ${n.netns}: corosync ${
        n.corosync ?? "down"
      }, membership [${n.membership ?? ""}]${n.partitioned ? " CUT OFF" : ""}, clogd ${
        n.clogd ?? "down"
      }`,
    );
    if (typeof n.logs === "string") console.log(`    ${n.logs}`);
    for (const l of Array.isArray(n.logs) ? n.logs : []) {
      console.log(`    ${l.uuid} members [${l.members}] digest ${l.digest}`);
    }
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    console.error(`cluster: ${error instanceof Error ? error.message : error}`);
    Deno.exit(1);
  }
}
