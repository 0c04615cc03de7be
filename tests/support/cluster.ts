/**
 * An N-node corosync cluster on one machine, for cluster tests, benchmarks and
 * scripts/cluster.ts: real corosyncs, real clogd daemons, real kernel simulators, and faults.
 *
 * Layout (see ../../../shared/reference/environment.md):
 * - One network namespace per node, `<name>-n<i>` (name defaults to `clogd-c<pid>`), holding an
 *   interface `eth0` with address `10.213.0.<i>/24`, and a bridge `br0` in a namespace of its
 *   own, `<name>-br`, with one veth port `p<i>` per node. The addresses exist only inside these
 *   namespaces: nothing of the host's network is touched.
 * - Node i has corosync node id i. Its corosync runs with a private /run (unshare --mount, see
 *   corosync.ts) and a directory `<dir>/n<i>/corosync`. The nodelist holds `maxNodes` nodes from
 *   the start: nodes beyond `nodes` are spares that {@link Cluster.addNode} brings up later.
 *   Why spares rather than a config reload: corosync 3 can add a node with
 *   `corosync-cfgtool -R` after rewriting every node's corosync.conf, but that is a second,
 *   cluster-wide operation racing the fault under test; a spare entry costs nothing while its
 *   node is absent (knet marks its link down, totem never waits for it).
 * - Quorum ({@link ClusterOptions.quorum}): by default votequorum with `expected_votes` set to
 *   the number of nodes started, so a majority partition stays quorate and a minority does not,
 *   as in a real storage cluster (clogd serves only while quorate). It is set explicitly: left
 *   to itself votequorum counts every nodelist entry, spares included, so 3 nodes of a 4-entry
 *   nodelist would need 3 votes (corosync-quorumtool: "Expected votes: 4", "Quorum: 3"). A node
 *   added later raises votequorum's expected votes by itself (it keeps the most votes it has
 *   seen: that is also why the former `expected_votes: 1` was no "always quorate" once the
 *   nodes had met). "two_node" is the two-guest setting (either node alone stays quorate: it
 *   relies on fencing); "none" (no provider) is for tests that want every partition quorate.
 * - Totem: `token` {@link CLUSTER_TOKEN_MS} and `token_coefficient: 0`. corosync adds the
 *   coefficient (650 ms by default) to the token timeout per node beyond two, spares included,
 *   so without it 3 nodes with `token: 300` detect a failure after ~2 s instead of ~0.65 s.
 *   Measured here (3 nodes, kill -9 of one corosync to the survivors' new membership, consensus
 *   left at its default 1.2 x token): token 300: 0.64 s; 200: 0.44 s (knet and udpu alike);
 *   150: 0.32 s. corosync refuses token 100 ("Not appropriate token or
 *   token_retransmits_before_loss_const value": token / 4.2 retransmits must be at least 30 ms).
 *   300 is the default because corosync is not real-time scheduled here (`sched_rr: no`) and
 *   shares 2 cores with Deno processes: a shorter token risks memberships lost to CPU stalls.
 * - Per node, optionally: clogd (`main.ts serve`, control socket `<dir>/n<i>/clogd.sock`, log
 *   `<dir>/n<i>/clogd.log`), in mode "cluster" (no `--standalone`: it joins CPG group "clogd")
 *   or "standalone"; kernel simulators ({@link Cluster.startLoad}); and a membership monitor
 *   (cluster_monitor.ts), which prints every totem membership with a timestamp: that is how the
 *   fault primitives time corosync's failure detection.
 *
 * Faults ({@link Cluster.killDaemon}, {@link Cluster.killCorosync}, {@link Cluster.partition},
 * ...) act at once and, unless told not to wait, return when the survivors observed the change,
 * with a {@link FaultTiming}. A partition drops every packet but loopback's with nftables inside
 * the node's namespace (input and output hooks): the interface, its address and its routes stay
 * as they are, so corosync sees silent loss like a dead switch port. `ip link set down` would
 * instead remove the connected route, and corosync and knet react to the interface event itself
 * (sending fails with ENETUNREACH), which tests something other than a network split.
 *
 * Cleanup: {@link Cluster.close} kills every process it started (by pid, plus whatever still runs
 * inside its namespaces, found with `ip netns pids`), deletes the namespaces, removes corosync's
 * /dev/shm files and the directory. It is idempotent and works after any failure. A process-exit
 * hook does the same synchronously if a test process ends without closing, and
 * `<dir>/manifest.json` lets {@link cleanupClusterDir} clean up after an owner that was killed.
 *
 * Needs root, corosync 3, iproute2 and nftables.
 *
 * @module
 */

import { controlRequest } from "../../src/control.ts";
import type { DaemonStatus } from "../../src/cli/status.ts";
import type { KernelSimReport } from "../../src/sim/cli.ts";
import { Corosync, type CorosyncQuorum, delay as sleep, quote, run as sh } from "./corosync.ts";
import { NetworkNamespace } from "./netns.ts";

/** Repository root. */
export const REPO = new URL("../../", import.meta.url).pathname;
/** Default totem token timeout of a harness cluster, in ms (see the module doc). */
export const CLUSTER_TOKEN_MS = 300;
/** Most nodes in one cluster (addresses 10.213.0.1 .. 10.213.0.N of one /24). */
export const MAX_CLUSTER_NODES = 32;
/** Default longest wait for a fault to be observed by every observer, in ms. */
export const DETECT_TIMEOUT_MS = 15_000;
/** Longest wait for a started clogd to answer on its control socket, in ms. */
export const DAEMON_START_TIMEOUT_MS = 30_000;
/** After a SIGTERM to clogd, the wait before the second SIGTERM (it forces the exit), in ms. */
export const DAEMON_STOP_GRACE_MS = 3_000;
/** After the second SIGTERM, the wait before SIGKILL, in ms. */
export const DAEMON_KILL_AFTER_MS = 5_000;
/** Longest wait for a SIGKILLed process to be reaped, in ms. */
export const EXIT_TIMEOUT_MS = 5_000;
/** Poll interval of {@link Cluster.waitFor} and of status-based detection, in ms. */
export const POLL_INTERVAL_MS = 10;
/** CPG group of the membership monitors (never clogd's group). */
export const MONITOR_GROUP = "clogd-harness-monitor";
/** Lines of a process's log quoted in an error. */
const LOG_TAIL_CHARS = 3000;
/** Address prefix of the nodes (a private range, only inside the cluster's namespaces). */
const SUBNET = "10.213.0";
/** nftables table that cuts a node off. */
const PARTITION_TABLE = "clogd_partition";

/** How clogd runs on each node. */
export type ClogdMode = "cluster" | "standalone";

/** Options of {@link Cluster.start}. */
export interface ClusterOptions {
  /** Nodes started now (1..maxNodes). */
  nodes: number;
  /** Nodes in corosync's nodelist: `nodes` plus spares for {@link Cluster.addNode}. Default `nodes`. */
  maxNodes?: number;
  /** Name prefix of the namespaces; default `clogd-c<pid>` (plus a counter after the first). */
  name?: string;
  /** Working directory (created; removed by close unless `keepDir`). Default a new temp dir. */
  dir?: string;
  /** Keep the directory (logs) after {@link Cluster.close}. Default false. */
  keepDir?: boolean;
  /**
   * corosync transport; default "udpu": knet with the short test token re-formed the membership
   * 9-15 times in 25 s on an idle 3-node cluster on this loaded 2-core machine (its link
   * heartbeats time out at token/2); udpu saw none under the same load.
   */
  transport?: "knet" | "udpu";
  /** totem token in ms; default {@link CLUSTER_TOKEN_MS}. */
  tokenMs?: number;
  /** Start clogd on every node. Default false. */
  clogd?: boolean;
  /** clogd's mode; default "cluster" (no --standalone). */
  mode?: ClogdMode;
  /** Extra arguments of `clogd serve`. */
  clogdArgs?: string[];
  /** Start a membership monitor per node (needed for detection times). Default true. */
  monitor?: boolean;
  /** Install the synchronous process-exit cleanup hook. Default true. */
  exitHook?: boolean;
  /**
   * How corosync decides quorum (see the module doc); default "majority".
   * - "majority": votequorum with `expected_votes` = `nodes` (spares in the nodelist do not
   *   count until they join): 3 nodes are quorate with 2, a node cut off alone is not.
   * - "two_node": votequorum `two_node: 1` (needs `nodes: 2` and no spares): either node alone
   *   stays quorate. Only safe with fencing, which this harness does not do: a partition leaves
   *   both sides quorate.
   * - "none": no quorum provider (QUORUM_FREE): every partition is quorate, corosync cannot
   *   tell a partition from a crash (clogd warns, and serves on both sides of a partition).
   */
  quorum?: ClusterQuorum;
}

/** See {@link ClusterOptions.quorum}. */
export type ClusterQuorum = "majority" | "two_node" | "none";

/** Options of {@link Cluster.startLoad}: a `clogd kernel-sim` run on one node. */
export interface LoadOptions {
  /** `--logs`; default 1. */
  logs?: number;
  /** `--duration` in seconds; default 10. */
  durationS?: number;
  /** `--iodepth`; default 8. */
  iodepth?: number;
  /** `--regions`; default 1024. */
  regions?: number;
  /** `--type`; default "core". */
  type?: "core" | "disk";
  /**
   * Whether the logs are shared with other nodes (same uuids on every node, `--shared`
   * checking). Default: true in cluster mode, false in standalone mode (each node's own uuids).
   */
  shared?: boolean;
  /** `--seed`; default the node number. */
  seed?: number;
  /** More kernel-sim arguments (e.g. `--device`, `--timeout-ms`). */
  args?: string[];
}

/** When a fault happened and when each observer saw its effect. */
export interface FaultTiming {
  kind: string;
  node: number;
  /** Wall clock (ms) right before the fault was injected. */
  at: number;
  /**
   * Per observing node: ms from `at` to the first observation of the expected state (a totem
   * membership from its monitor, or for daemon faults its clogd's status). Empty when nothing
   * was awaited.
   */
  detectedMs: Record<number, number>;
  /** The slowest observer, or null when nothing was awaited. */
  maxMs: number | null;
}

/** Options of the fault primitives. */
export interface FaultOptions {
  /** Wait for the survivors to observe the fault. Default true. */
  wait?: boolean;
  /** Longest wait; default {@link DETECT_TIMEOUT_MS}. */
  timeoutMs?: number;
}

/** What {@link Cluster.leftovers} found. */
export interface Leftovers {
  namespaces: string[];
  pids: number[];
  shm: string[];
}

/** A line-oriented child whose stdout lines (JSON where possible) are collected as they come. */
class LineChild {
  readonly process: Deno.ChildProcess;
  readonly lines: Record<string, unknown>[] = [];
  readonly done: Promise<void>;
  exited = false;

  constructor(process: Deno.ChildProcess) {
    this.process = process;
    this.done = this.#pump();
    process.status.then(() => this.exited = true);
  }

  get pid(): number {
    return this.process.pid;
  }

  async #pump(): Promise<void> {
    let buffer = "";
    try {
      for await (const chunk of this.process.stdout.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const text = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (text.trim() === "") continue;
          try {
            this.lines.push(JSON.parse(text));
          } catch {
            this.lines.push({ event: "text", text });
          }
        }
      }
    } catch {
      // Cancelled when the namespace was deleted under the child.
    }
  }
}

/** A kernel simulator run on one node; {@link report} is its `--json` report. */
export class LoadRun {
  /** The node it runs on. */
  readonly node: number;
  readonly #process: Deno.ChildProcess;
  readonly #logPath: string;
  readonly #stdout: Promise<string>;
  readonly status: Promise<Deno.CommandStatus>;

  /** Wraps a spawned kernel-sim whose stdout is piped and stderr goes to `logPath`. */
  constructor(node: number, process: Deno.ChildProcess, logPath: string) {
    this.node = node;
    this.#process = process;
    this.#logPath = logPath;
    this.#stdout = new Response(process.stdout).text().catch(() => "");
    this.status = process.status;
  }

  /** The simulator's pid. */
  get pid(): number {
    return this.#process.pid;
  }

  /**
   * Waits for the run to end and parses its report.
   *
   * @throws Error quoting its stderr if it printed no JSON report (usage error, crash, killed)
   */
  async report(): Promise<{ code: number; report: KernelSimReport }> {
    const [text, status] = await Promise.all([this.#stdout, this.status]);
    try {
      return { code: status.code, report: JSON.parse(text) as KernelSimReport };
    } catch {
      const log = await Deno.readTextFile(this.#logPath).catch(() => "");
      throw new Error(
        `kernel-sim on node ${this.node} exited with ${status.code} (signal ${status.signal}) without a report:\n${
          log.slice(-LOG_TAIL_CHARS)
        }${text.slice(-LOG_TAIL_CHARS)}`,
      );
    }
  }

  /** SIGTERM: the simulator stops early and still reports. */
  stop(): void {
    signal(this.#process, "SIGTERM");
  }

  /** SIGKILL. */
  kill(): void {
    signal(this.#process, "SIGKILL");
  }
}

/** One node of a {@link Cluster}. */
export class ClusterNode {
  /** Node number, also its corosync node id. */
  readonly id: number;
  /** Its network namespace. */
  readonly netns: NetworkNamespace;
  /** Its address on the cluster network. */
  readonly address: string;
  /** Its directory: corosync/, clogd.sock, clogd.log, monitor.log, load-*.log. */
  readonly dir: string;
  /** Its corosync (running or not). */
  readonly corosync: Corosync;
  /** Its clogd, while one runs. */
  clogd: Deno.ChildProcess | undefined;
  /** Its kernel simulators started by {@link Cluster.startLoad}. */
  readonly loads: LoadRun[] = [];
  /** Whether {@link Cluster.partition} cut it off. */
  partitioned = false;
  /** Whether it is stopped ({@link Cluster.stopNode}). */
  stopped = false;
  #monitor: LineChild | undefined;

  /** Wraps the parts {@link Cluster} created. */
  constructor(parts: { id: number; netns: NetworkNamespace; dir: string; corosync: Corosync }) {
    this.id = parts.id;
    this.netns = parts.netns;
    this.address = `${SUBNET}.${parts.id}`;
    this.dir = parts.dir;
    this.corosync = parts.corosync;
  }

  /** clogd's control socket. */
  get controlPath(): string {
    return `${this.dir}/clogd.sock`;
  }

  /** clogd's log (its stderr, across restarts). */
  get clogdLogPath(): string {
    return `${this.dir}/clogd.log`;
  }

  /** Whether its corosync runs. */
  get corosyncUp(): boolean {
    return this.corosync.running;
  }

  /** Every line its membership monitor printed so far. */
  get monitorLines(): readonly Record<string, unknown>[] {
    return this.#monitor?.lines ?? [];
  }

  /** The latest totem membership its monitor saw (node ids), or undefined. */
  get view(): number[] | undefined {
    const lines = this.#monitor?.lines ?? [];
    for (let i = lines.length - 1; i >= 0; i--) {
      if (lines[i].event === "totem") return lines[i].members as number[];
      if (lines[i].event === "disconnected") return undefined;
    }
    return undefined;
  }

  /** @internal */
  setMonitor(monitor: LineChild | undefined): void {
    this.#monitor = monitor;
  }

  /** @internal */
  get monitor(): LineChild | undefined {
    return this.#monitor;
  }
}

let clusterCounter = 0;
const openClusters = new Set<Cluster>();
let exitHookInstalled = false;

/** An N-node cluster on this machine; see the module doc. */
export class Cluster implements AsyncDisposable {
  /** Name prefix of its namespaces. */
  readonly name: string;
  /** Its working directory. */
  readonly dir: string;
  /** Nodes in corosync's nodelist (the most {@link addNode} can reach). */
  readonly maxNodes: number;
  /** The nodes started so far, node i at index i - 1. */
  readonly nodes: ClusterNode[] = [];
  /** clogd's mode. */
  readonly mode: ClogdMode;
  /** Every fault injected, in order, with its timing. */
  readonly faults: FaultTiming[] = [];
  readonly #options: ClusterOptions;
  readonly #bridge: NetworkNamespace;
  readonly #pids = new Set<number>();
  readonly #corosyncPids = new Set<number>();
  #closed = false;

  private constructor(
    options: ClusterOptions,
    parts: { name: string; dir: string; bridge: NetworkNamespace },
  ) {
    this.#options = options;
    this.name = parts.name;
    this.dir = parts.dir;
    this.#bridge = parts.bridge;
    this.maxNodes = options.maxNodes ?? options.nodes;
    this.mode = options.mode ?? "cluster";
  }

  /**
   * Brings up the bridge and `options.nodes` nodes (corosync, monitor, clogd if asked) and
   * waits until every monitor sees one membership of all of them. On failure, everything
   * created so far is removed again.
   */
  static async start(options: ClusterOptions): Promise<Cluster> {
    const maxNodes = options.maxNodes ?? options.nodes;
    if (!Number.isInteger(options.nodes) || options.nodes < 1) {
      throw new RangeError(`A cluster needs at least one node, not ${options.nodes}`);
    }
    if (!Number.isInteger(maxNodes) || maxNodes < options.nodes || maxNodes > MAX_CLUSTER_NODES) {
      throw new RangeError(`maxNodes must be in ${options.nodes}..${MAX_CLUSTER_NODES}`);
    }
    if (options.quorum === "two_node" && (options.nodes !== 2 || maxNodes !== 2)) {
      throw new RangeError("quorum two_node needs exactly 2 nodes and no spares");
    }
    const suffix = clusterCounter++ === 0 ? "" : `x${clusterCounter}`;
    const name = options.name ?? `clogd-c${Deno.pid}${suffix}`;
    const dir = options.dir ?? await Deno.makeTempDir({ prefix: `clogd-cluster-${Deno.pid}-` });
    await Deno.mkdir(dir, { recursive: true });
    const bridge = await NetworkNamespace.create({ name: `${name}-br` });
    const cluster = new Cluster(options, { name, dir, bridge });
    openClusters.add(cluster);
    if (options.exitHook !== false) installExitHook();
    try {
      await cluster.#writeManifest();
      await sh(["ip", "-n", bridge.name, "link", "add", "br0", "type", "bridge"]);
      await sh(["ip", "-n", bridge.name, "link", "set", "br0", "up"]);
      const ids = Array.from({ length: options.nodes }, (_, i) => i + 1);
      // Sequentially: each start is mostly waiting, and parallel deno start-ups on 2 cores
      // only make each other slower.
      for (const id of ids) await cluster.#createNode(id);
      await cluster.#waitViews(ids, DETECT_TIMEOUT_MS);
      if (options.clogd) await Promise.all(ids.map((id) => cluster.startDaemon(id)));
      return cluster;
    } catch (error) {
      await cluster.close().catch(() => {});
      throw error;
    }
  }

  /** Node `id` (1-based). */
  node(id: number): ClusterNode {
    const node = this.nodes[id - 1];
    if (node === undefined) throw new RangeError(`No node ${id} (nodes 1..${this.nodes.length})`);
    return node;
  }

  /** Every pid this cluster ever started (corosync, clogd, monitors, simulators). */
  get pids(): ReadonlySet<number> {
    return this.#pids;
  }

  /** The namespaces of this cluster (bridge and nodes). */
  get namespaces(): string[] {
    return [this.#bridge.name, ...this.nodes.map((n) => n.netns.name)];
  }

  // ---- Processes ----

  /** Starts clogd on node `id` and waits until it answers on its control socket. */
  async startDaemon(id: number): Promise<void> {
    const node = this.node(id);
    if (node.clogd !== undefined) throw new Error(`clogd runs on node ${id} already`);
    await Deno.remove(node.controlPath).catch(() => {});
    const args = [
      Deno.execPath(),
      "run",
      "--allow-all",
      "--v8-flags=--stack-size=2048",
      `${REPO}main.ts`,
      "serve",
      ...(this.mode === "standalone" ? ["--standalone"] : []),
      "--accept-user-peers",
      "--control",
      node.controlPath,
      "--pidfile",
      `${node.dir}/clogd.pid`,
      ...(this.#options.clogdArgs ?? []),
    ];
    const child = this.#spawnLogged(node, args, node.clogdLogPath, "null");
    node.clogd = child;
    let exited = false;
    child.status.then(() => {
      exited = true;
      if (node.clogd === child) node.clogd = undefined;
    });
    await this.#writeManifest();
    const deadline = Date.now() + DAEMON_START_TIMEOUT_MS;
    while (true) {
      if (exited) {
        throw new Error(`clogd on node ${id} exited while starting:\n${await this.#tail(node)}`);
      }
      try {
        await controlRequest(node.controlPath, { cmd: "status" });
        return;
      } catch {
        if (Date.now() > deadline) {
          signal(child, "SIGKILL");
          throw new Error(
            `clogd on node ${id} did not answer within ${DAEMON_START_TIMEOUT_MS} ms:\n${await this
              .#tail(node)}`,
          );
        }
        await sleep(50);
      }
    }
  }

  /** clogd's status on node `id` (what `clogd status --json` prints). */
  async statusOf(id: number): Promise<DaemonStatus> {
    return await controlRequest(this.node(id).controlPath, { cmd: "status" }) as DaemonStatus;
  }

  /**
   * Starts a kernel simulator (`main.ts kernel-sim --json`) on node `id` against its clogd.
   * Its stderr goes to `<node dir>/load-<n>.log`.
   */
  startLoad(id: number, options: LoadOptions = {}): LoadRun {
    const node = this.node(id);
    const shared = options.shared ?? this.mode === "cluster";
    const args = [
      Deno.execPath(),
      "run",
      "--allow-all",
      "--v8-flags=--stack-size=2048",
      `${REPO}main.ts`,
      "kernel-sim",
      "--json",
      "--uuid",
      shared ? this.name : `${this.name}-n${id}`,
      "--logs",
      String(options.logs ?? 1),
      "--regions",
      String(options.regions ?? 1024),
      "--type",
      options.type ?? "core",
      "--duration",
      String(options.durationS ?? 10),
      "--iodepth",
      String(options.iodepth ?? 8),
      "--seed",
      String(options.seed ?? id),
      ...(shared ? ["--shared"] : []),
      ...(options.args ?? []),
    ];
    const log = `${node.dir}/load-${node.loads.length + 1}.log`;
    const load = new LoadRun(id, this.#spawnLogged(node, args, log, "piped"), log);
    node.loads.push(load);
    this.#writeManifest().catch(() => {});
    return load;
  }

  /**
   * Runs `command` inside node `id`'s namespace (e.g. `corosync-quorumtool -l`) and returns
   * its exit code and output.
   */
  async exec(
    id: number,
    command: string[],
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    const out = await new Deno.Command("ip", {
      args: ["netns", "exec", this.node(id).netns.name, ...command],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const decoder = new TextDecoder();
    return {
      code: out.code,
      stdout: decoder.decode(out.stdout),
      stderr: decoder.decode(out.stderr),
    };
  }

  // ---- Waiting ----

  /**
   * Polls `predicate` (which may throw: that counts as false) until it holds; returns the ms
   * it took.
   *
   * @throws Error naming `what` after `timeoutMs`, with the predicate's last error
   */
  async waitFor(
    predicate: () => boolean | Promise<boolean>,
    options: { timeoutMs?: number; what?: string; intervalMs?: number } = {},
  ): Promise<number> {
    const start = Date.now();
    const timeoutMs = options.timeoutMs ?? DETECT_TIMEOUT_MS;
    let lastError: unknown;
    while (true) {
      try {
        if (await predicate()) return Date.now() - start;
      } catch (error) {
        lastError = error;
      }
      if (Date.now() - start > timeoutMs) {
        throw new Error(
          `Timed out after ${timeoutMs} ms waiting for ${options.what ?? "a condition"}${
            lastError === undefined ? "" : ` (last error: ${lastError})`
          }`,
        );
      }
      await sleep(options.intervalMs ?? POLL_INTERVAL_MS);
    }
  }

  /**
   * The totem membership node `id` should see now: itself alone when cut off, else every
   * running corosync that is not cut off.
   */
  expectedView(id: number): number[] {
    const node = this.node(id);
    if (node.partitioned) return [id];
    return this.nodes.filter((n) => n.corosyncUp && !n.partitioned).map((n) => n.id);
  }

  /**
   * Waits until every monitor of `ids` reports a totem membership at or after `since` equal to
   * its {@link expectedView}; returns ms from `since` per node.
   */
  async waitViews(ids: number[], options: { since?: number; timeoutMs?: number } = {}) {
    return await this.#waitViews(ids, options.timeoutMs ?? DETECT_TIMEOUT_MS, options.since ?? 0);
  }

  // ---- Faults ----

  /**
   * kill -9 of node `id`'s clogd. In cluster mode, waits until every other daemon that shared a
   * log with it lists it in no log's members (polling their status every
   * {@link POLL_INTERVAL_MS}): CPG reports a dead client within milliseconds, so this times
   * clogd's own reaction.
   */
  async killDaemon(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    const child = node.clogd;
    if (child === undefined) throw new Error(`No clogd runs on node ${id}`);
    // Only daemons that share a log with it now can observe its death.
    const observers: ClusterNode[] = [];
    if (this.mode === "cluster" && options.wait !== false) {
      for (const n of this.nodes) {
        if (n.id === id || n.clogd === undefined || !n.corosyncUp) continue;
        const status = await this.statusOf(n.id).catch(() => undefined);
        if (status?.logs.some((log) => log.members.includes(id))) observers.push(n);
      }
    }
    const at = Date.now();
    signal(child, "SIGKILL");
    await child.status;
    return await this.#record("killDaemon", id, at, async () => {
      const detected: Record<number, number> = {};
      await Promise.all(observers.map(async (n) => {
        await this.waitFor(async () => {
          const status = await this.statusOf(n.id);
          return status.logs.every((log) => !log.members.includes(id));
        }, { timeoutMs: options.timeoutMs, what: `node ${n.id}'s clogd to drop node ${id}` });
        detected[n.id] = Date.now() - at;
      }));
      return detected;
    });
  }

  /** Starts node `id`'s clogd again after {@link killDaemon}; the timing is its start-up. */
  async restartDaemon(id: number): Promise<FaultTiming> {
    const at = Date.now();
    await this.startDaemon(id);
    return await this.#record("restartDaemon", id, at, () => ({ [id]: Date.now() - at }));
  }

  /** kill -9 of node `id`'s corosync, then removes its /dev/shm files. */
  async killCorosync(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    if (!node.corosyncUp) throw new Error(`corosync is not running on node ${id}`);
    const at = Date.now();
    await node.corosync.kill("SIGKILL");
    node.corosync.removeStaleShm();
    return await this.#faultViews("killCorosync", id, at, this.#others(id), options);
  }

  /** Starts node `id`'s corosync again; waits until every node sees it rejoin. */
  async startCorosync(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    const at = Date.now();
    await node.corosync.restart();
    this.#corosyncPids.add(node.corosync.pid!);
    await this.#writeManifest();
    return await this.#faultViews("startCorosync", id, at, this.#up(), options);
  }

  /** Cuts node `id` off the network (nftables drop in its namespace); see the module doc. */
  async partition(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    if (node.partitioned) throw new Error(`Node ${id} is cut off already`);
    const rules = [
      `table inet ${PARTITION_TABLE} {`,
      `  chain input { type filter hook input priority -10; policy drop; iifname "lo" accept; }`,
      `  chain output { type filter hook output priority -10; policy drop; oifname "lo" accept; }`,
      "}",
    ].join("\n");
    const file = `${node.dir}/partition.nft`;
    await Deno.writeTextFile(file, rules + "\n");
    const at = Date.now();
    await sh(["ip", "netns", "exec", node.netns.name, "nft", "-f", file]);
    node.partitioned = true;
    const observers = node.corosyncUp ? this.#up() : this.#others(id);
    return await this.#faultViews("partition", id, at, observers, options);
  }

  /** Undoes {@link partition}; waits until the membership is whole again. */
  async heal(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    if (!node.partitioned) throw new Error(`Node ${id} is not cut off`);
    const at = Date.now();
    await sh([
      "ip",
      "netns",
      "exec",
      node.netns.name,
      "nft",
      "delete",
      "table",
      "inet",
      PARTITION_TABLE,
    ]);
    node.partitioned = false;
    return await this.#faultViews("heal", id, at, this.#up(), options);
  }

  /**
   * Clean stop of node `id`: its kernel simulators get SIGTERM (they report what they did),
   * clogd gets SIGTERM (a second one after {@link DAEMON_STOP_GRACE_MS}: with resumed logs the
   * first only asks), corosync gets SIGTERM (it leaves the membership). Waits until the others
   * see it gone.
   */
  async stopNode(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    for (const load of node.loads) load.stop();
    await Promise.all(node.loads.map((load) => load.status));
    const at = Date.now();
    if (node.clogd !== undefined) await stopDaemon(node.clogd);
    if (node.corosyncUp) await node.corosync.kill("SIGTERM");
    node.stopped = true;
    return await this.#faultViews("stopNode", id, at, this.#others(id), options);
  }

  /** Starts a stopped node again: corosync (waiting for the membership), then clogd if used. */
  async startNode(id: number, options: FaultOptions = {}): Promise<FaultTiming> {
    const node = this.node(id);
    const at = Date.now();
    if (!node.corosyncUp) {
      await node.corosync.restart();
      this.#corosyncPids.add(node.corosync.pid!);
    }
    node.stopped = false;
    const timing = await this.#faultViews("startNode", id, at, this.#up(), options);
    if (this.#options.clogd && node.clogd === undefined) await this.startDaemon(id);
    return timing;
  }

  /**
   * Brings up the next spare node of the nodelist (its namespace, corosync, monitor, and clogd
   * if used) while the others keep running; waits until every node sees it. Returns its timing;
   * the new node is `this.nodes.at(-1)`.
   *
   * @throws RangeError when the nodelist has no spare left (start with a larger `maxNodes`)
   */
  async addNode(options: FaultOptions = {}): Promise<FaultTiming> {
    const id = this.nodes.length + 1;
    if (id > this.maxNodes) {
      throw new RangeError(
        `No spare node in the nodelist (maxNodes ${this.maxNodes}): start the cluster with a larger maxNodes`,
      );
    }
    const at = Date.now();
    await this.#createNode(id);
    const timing = await this.#faultViews("addNode", id, at, this.#up(), options);
    if (this.#options.clogd) await this.startDaemon(id);
    return timing;
  }

  // ---- Cleanup ----

  /**
   * Kills every process of the cluster, deletes its namespaces, corosync's /dev/shm files and
   * the directory (unless `keepDir`). Idempotent; safe after any failure.
   *
   * @throws AggregateError listing what could not be cleaned (after trying everything)
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const errors: unknown[] = [];
    const attempt = async (fn: () => Promise<unknown> | unknown) => {
      try {
        await fn();
      } catch (error) {
        errors.push(error);
      }
    };
    for (const node of this.nodes) {
      for (const load of node.loads) load.kill();
      if (node.clogd !== undefined) signal(node.clogd, "SIGKILL");
      if (node.monitor !== undefined) signal(node.monitor.process, "SIGKILL");
      if (node.corosyncUp) await attempt(() => node.corosync.kill("SIGKILL"));
    }
    for (const name of this.namespaces) await attempt(() => killNamespacePids(name));
    for (const node of this.nodes) {
      // Deletes the instance directory and every /dev/shm file of its corosyncs.
      await attempt(() => node.corosync.stop());
      await attempt(() => node.netns.delete());
    }
    await attempt(() => this.#bridge.delete());
    await attempt(() => removeShmOf(this.#corosyncPids));
    if (!this.#options.keepDir) {
      await attempt(() => Deno.remove(this.dir, { recursive: true }));
    }
    openClusters.delete(this);
    if (errors.length > 0) throw new AggregateError(errors, `Cluster ${this.name} cleanup failed`);
  }

  /** `await using` support: {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /**
   * What of this cluster still exists: its namespaces, live pids (not zombies), and /dev/shm
   * files of its corosyncs. All empty after {@link close}.
   */
  leftovers(): Leftovers {
    const existing = new Set(listNamespaces());
    return {
      namespaces: this.namespaces.filter((name) => existing.has(name)),
      pids: [...this.#pids].filter(alive),
      shm: shmOf(this.#corosyncPids),
    };
  }

  // ---- Internals ----

  async #createNode(id: number): Promise<void> {
    const netns = await NetworkNamespace.create({ name: `${this.name}-n${id}`, loopback: true });
    const dir = `${this.dir}/n${id}`;
    try {
      await Deno.mkdir(dir, { recursive: true });
      const br = this.#bridge.name;
      await sh([
        "ip",
        "-n",
        br,
        "link",
        "add",
        `p${id}`,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns.name,
      ]);
      await sh(["ip", "-n", br, "link", "set", `p${id}`, "master", "br0", "up"]);
      await sh(["ip", "-n", netns.name, "addr", "add", `${SUBNET}.${id}/24`, "dev", "eth0"]);
      await sh(["ip", "-n", netns.name, "link", "set", "eth0", "up"]);
    } catch (error) {
      await netns.delete().catch(() => {});
      throw error;
    }
    const nodelist = Array.from({ length: this.maxNodes }, (_, i) => ({
      nodeid: i + 1,
      address: `${SUBNET}.${i + 1}`,
    }));
    let corosync: Corosync;
    try {
      corosync = await Corosync.start({
        netns,
        nodeid: id,
        nodes: nodelist,
        clusterName: this.name.slice(0, 32),
        transport: this.#options.transport ?? "udpu",
        tokenMs: this.#options.tokenMs ?? CLUSTER_TOKEN_MS,
        tokenCoefficientMs: 0,
        timestamp: "hires",
        dir: `${dir}/corosync`,
        quorum: this.#corosyncQuorum(),
      });
    } catch (error) {
      await netns.delete().catch(() => {});
      throw error;
    }
    const node = new ClusterNode({ id, netns, dir, corosync });
    this.nodes[id - 1] = node;
    this.#corosyncPids.add(corosync.pid!);
    this.#pids.add(corosync.pid!);
    if (this.#options.monitor !== false) {
      const monitor = new LineChild(
        this.#spawnLogged(
          node,
          [
            Deno.execPath(),
            "run",
            "--allow-all",
            "--v8-flags=--stack-size=2048",
            `${REPO}tests/support/cluster_monitor.ts`,
            MONITOR_GROUP,
          ],
          `${dir}/monitor.log`,
          "piped",
        ),
      );
      node.setMonitor(monitor);
    }
    await this.#writeManifest();
  }

  /** corosync's quorum section for {@link ClusterOptions.quorum}. */
  #corosyncQuorum(): CorosyncQuorum {
    switch (this.#options.quorum ?? "majority") {
      case "majority":
        return { provider: "votequorum", expectedVotes: this.#options.nodes };
      case "two_node":
        return { provider: "votequorum", twoNode: true };
      case "none":
        return { provider: "none" };
    }
  }

  /** Spawns `command` in the node's namespace with stderr appended to `logPath`. */
  #spawnLogged(
    node: ClusterNode,
    command: string[],
    logPath: string,
    stdout: "piped" | "null",
  ): Deno.ChildProcess {
    // `ip netns exec` and `exec` replace the process: the pid is the command's own.
    const script = `exec ${command.map(quote).join(" ")} 2>>${quote(logPath)}`;
    const child = node.netns.spawn(["sh", "-c", script], { stdout, stderr: "null" });
    this.#pids.add(child.pid);
    return child;
  }

  #others(id: number): number[] {
    return this.#up().filter((n) => n !== id);
  }

  #up(): number[] {
    return this.nodes.filter((n) => n.corosyncUp).map((n) => n.id);
  }

  async #faultViews(
    kind: string,
    id: number,
    at: number,
    observers: number[],
    options: FaultOptions,
  ): Promise<FaultTiming> {
    await this.#writeManifest();
    const wait = options.wait !== false && this.#options.monitor !== false;
    return await this.#record(
      kind,
      id,
      at,
      () => wait ? this.#waitViews(observers, options.timeoutMs ?? DETECT_TIMEOUT_MS, at) : {},
    );
  }

  async #record(
    kind: string,
    node: number,
    at: number,
    detect: () => Promise<Record<number, number>> | Record<number, number>,
  ): Promise<FaultTiming> {
    const detectedMs = await detect();
    const values = Object.values(detectedMs);
    const timing = {
      kind,
      node,
      at,
      detectedMs,
      maxMs: values.length ? Math.max(...values) : null,
    };
    this.faults.push(timing);
    return timing;
  }

  async #waitViews(ids: number[], timeoutMs: number, since = 0): Promise<Record<number, number>> {
    const detected: Record<number, number> = {};
    if (this.#options.monitor === false) return detected;
    await Promise.all(ids.map(async (id) => {
      const node = this.node(id);
      const match = () => {
        const want = this.expectedView(id).join(",");
        const line = node.monitorLines.find((l) =>
          l.event === "totem" && (l.t as number) >= since &&
          [...(l.members as number[])].sort((a, b) => a - b).join(",") === want
        );
        if (line !== undefined) detected[id] = (line.t as number) - since;
        return line !== undefined;
      };
      await this.waitFor(match, {
        timeoutMs,
        what: `node ${id}'s membership [${this.expectedView(id)}] (saw ${
          JSON.stringify(node.monitorLines.filter((l) => l.event === "totem").slice(-3))
        })`,
      });
    }));
    return since === 0 ? {} : detected;
  }

  async #tail(node: ClusterNode): Promise<string> {
    return (await Deno.readTextFile(node.clogdLogPath).catch(() => "")).slice(-LOG_TAIL_CHARS);
  }

  async #writeManifest(): Promise<void> {
    const manifest = {
      owner: Deno.pid,
      name: this.name,
      namespaces: this.namespaces,
      pids: [...this.#pids],
      corosyncPids: [...this.#corosyncPids],
    };
    await Deno.writeTextFile(`${this.dir}/manifest.json`, JSON.stringify(manifest) + "\n");
  }

  /** @internal Synchronous last-resort cleanup for the process-exit hook. */
  closeSync(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const pid of this.#pids) killPid(pid);
    for (const name of this.namespaces) {
      for (const pid of namespacePidsSync(name)) killPid(pid);
      new Deno.Command("ip", { args: ["netns", "delete", name], stdout: "null", stderr: "null" })
        .outputSync();
    }
    for (const file of shmOf(this.#corosyncPids)) {
      try {
        // libqb keeps one directory per connection (qb-SERVERPID-CLIENTPID-*).
        Deno.removeSync(`/dev/shm/${file}`, { recursive: true });
      } catch {
        // Gone already.
      }
    }
    if (!this.#options.keepDir) {
      try {
        Deno.removeSync(this.dir, { recursive: true });
      } catch {
        // Gone already.
      }
    }
  }
}

/**
 * Cleans up after a cluster whose owner died (or any cluster) from its directory's
 * manifest.json: kills what runs in its namespaces and every recorded pid still in them,
 * deletes the namespaces and corosync's /dev/shm files, removes the directory.
 */
export async function cleanupClusterDir(dir: string): Promise<void> {
  let manifest: { namespaces: string[]; corosyncPids: number[] };
  try {
    manifest = JSON.parse(await Deno.readTextFile(`${dir}/manifest.json`));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  const existing = new Set(listNamespaces());
  for (const name of manifest.namespaces) {
    if (!existing.has(name)) continue;
    await killNamespacePids(name);
    await sh(["ip", "netns", "delete", name]);
  }
  await removeShmOf(new Set(manifest.corosyncPids));
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

// ---- Helpers ----

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  globalThis.addEventListener("unload", () => {
    for (const cluster of openClusters) cluster.closeSync();
  });
}

/** SIGTERM, a second SIGTERM after a grace period, SIGKILL as the last resort. */
async function stopDaemon(child: Deno.ChildProcess): Promise<void> {
  signal(child, "SIGTERM");
  if (await exitedWithin(child, DAEMON_STOP_GRACE_MS)) return;
  signal(child, "SIGTERM");
  if (await exitedWithin(child, DAEMON_KILL_AFTER_MS)) return;
  signal(child, "SIGKILL");
  await child.status;
}

async function exitedWithin(child: Deno.ChildProcess, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), ms));
  try {
    return await Promise.race([child.status.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function signal(child: Deno.ChildProcess, name: Deno.Signal): void {
  try {
    child.kill(name);
  } catch {
    // Exited already.
  }
}

function killPid(pid: number): void {
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    // Exited already.
  }
}

/** Whether `pid` runs (a zombie does not count). */
function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

function namespacePidsSync(name: string): number[] {
  const out = new Deno.Command("ip", {
    args: ["netns", "pids", name],
    stdout: "piped",
    stderr: "null",
  })
    .outputSync();
  return new TextDecoder().decode(out.stdout).split(/\s+/).filter((s) => s !== "").map(Number);
}

/** SIGKILLs whatever runs in namespace `name` and waits (bounded) until it is gone. */
async function killNamespacePids(name: string): Promise<void> {
  const deadline = Date.now() + EXIT_TIMEOUT_MS;
  while (true) {
    const pids = namespacePidsSync(name).filter(alive);
    if (pids.length === 0) return;
    if (Date.now() > deadline) {
      throw new Error(`Processes ${pids.join(",")} in namespace ${name} survived SIGKILL`);
    }
    for (const pid of pids) killPid(pid);
    await sleep(20);
  }
}

function listNamespaces(): string[] {
  try {
    return [...Deno.readDirSync("/run/netns")].map((entry) => entry.name);
  } catch {
    return [];
  }
}

/** /dev/shm files that carry one of `pids` as a dash-separated field (libqb's naming). */
function shmOf(pids: ReadonlySet<number>): string[] {
  if (pids.size === 0) return [];
  return [...Deno.readDirSync("/dev/shm")].map((e) => e.name).filter((name) =>
    name.startsWith("qb-") && name.split("-").some((field) => pids.has(Number(field)))
  );
}

async function removeShmOf(pids: ReadonlySet<number>): Promise<void> {
  for (const file of shmOf(pids)) {
    await Deno.remove(`/dev/shm/${file}`, { recursive: true }).catch(() => {});
  }
}
