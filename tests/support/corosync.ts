/**
 * A real corosync for tests, one per network namespace, started and stopped by the test.
 *
 * Why a namespace: libcpg finds corosync through abstract unix sockets, which belong to a
 * network namespace, so a corosync in namespace X serves exactly the CPG clients in X, and
 * several can run on one host without seeing each other (or the host's). corosync also
 * hard-codes `/var/run/corosync.pid`, so each instance gets a private `/run`: it runs as
 *
 *     ip netns exec NS unshare --mount --propagation slave \
 *       sh -c 'mount --bind DIR/run /run && exec corosync -f -c DIR/corosync.conf'
 *
 * with its config, state (`state_dir`), log and pid file in its own directory DIR. `ip netns
 * exec`, `unshare` and `exec` all replace the process, so the child's pid is corosync's.
 *
 * How CPG client code reaches that corosync:
 * - In this process: {@link Corosync.openCpg} opens the handle with the calling thread moved
 *   into the namespace for the duration of `cpg_model_initialize` (`NetworkNamespace.enter`).
 *   The connection's sockets stay in the namespace for life; later calls need nothing special.
 * - In a child process: {@link Corosync.spawnDeno} runs
 *   `ip netns exec NS deno run --allow-all --v8-flags=--stack-size=2048 SCRIPT ARGS...`
 *   (`--stack-size=2048` because libcpg's dispatch puts 1 MiB on the C stack; add
 *   `--expose-gc` for GC tests). The child's pid is deno's own, which is also the pid corosync
 *   reports for its CPG messages. {@link DenoChild} reads the JSON lines it prints.
 *
 * Stopping removes what the instance left behind: the namespace (when it created it), its
 * directory and its `/dev/shm/qb-*` files. A SIGKILLed corosync leaves about 9 MB there per
 * instance; only files that appeared after the start and carry one of this instance's corosync
 * pids are removed, so other tests' corosyncs are never touched.
 *
 * A cluster of N nodes later: one namespace per node wired by the caller (veth pairs into a
 * bridge), passed as `netns`, with the same `nodes` list and each node's own `nodeid`.
 *
 * Needs root, corosync 3 (`corosync-cpgtool` for the readiness check) and iproute2.
 *
 * @module
 */

import {
  type CpgCallbacks,
  CpgError,
  CpgHandle,
  CS_DISPATCH_ALL,
  CS_ERR_TRY_AGAIN,
  CS_OK,
} from "../../ffi/cpg.ts";
import { libc, POLLFD, POLLIN } from "../../ffi/libc.ts";
import { type QuorumCallbacks, QuorumHandle } from "../../ffi/quorum.ts";
import { NetworkNamespace } from "./netns.ts";

/** Prefix of the namespaces and directories this helper creates. */
export const COROSYNC_PREFIX = "clogd-cpg";
/** Longest wait for a started corosync to accept CPG clients, in ms (it needs ~0.3 s). */
export const START_TIMEOUT_MS = 10_000;
/** Pause between two readiness checks, in ms. */
export const READY_POLL_INTERVAL_MS = 50;
/** Longest wait for corosync to exit after SIGTERM before it gets SIGKILL, in ms. */
export const STOP_TIMEOUT_MS = 5_000;
/** Totem token timeout, in ms: short, so membership changes settle fast in tests. */
export const TEST_TOKEN_MS = 300;
/** Lines of corosync's log quoted in an error when it fails to start. */
const LOG_TAIL_LINES = 20;

/** A node of the cluster's nodelist. */
export interface CorosyncNodeAddress {
  /** corosync node id (1 or more). */
  nodeid: number;
  /** ring0 address: an address of that node's namespace. */
  address: string;
}

/** Options of {@link corosyncConf}. */
export interface CorosyncConfOptions {
  /** totem cluster_name. */
  clusterName: string;
  /** The instance's directory: state_dir and log file live there. */
  dir: string;
  /** Every node of the cluster. */
  nodes: readonly CorosyncNodeAddress[];
  /** Default "knet". */
  transport?: "knet" | "udpu" | "udp";
  /** Default {@link TEST_TOKEN_MS}. */
  tokenMs?: number;
  /**
   * totem token_coefficient, in ms: corosync adds it to the token timeout once per node beyond
   * two in the nodelist (default 650), so 3 nodes with `token: 300` time out after 950 ms. A
   * cluster harness sets 0 to get failure detection of about token + consensus (1.2 x token).
   * Default: corosync's.
   */
  tokenCoefficientMs?: number;
  /** Log timestamps: "on" (seconds, the default) or "hires" (milliseconds). */
  timestamp?: "on" | "hires";
  /** The quorum section; default {@link DEFAULT_TEST_QUORUM}. */
  quorum?: CorosyncQuorum;
}

/**
 * How the test cluster decides quorum (corosync.conf's `quorum` section):
 * - `{ provider: "votequorum", expectedVotes: N }`: votequorum with `expected_votes: N`, one vote
 *   per node: a partition is quorate with more than half of the expected votes. votequorum
 *   raises its expected votes to the most votes it has seen present, and never lowers them by
 *   itself: `expected_votes: 1` ({@link DEFAULT_TEST_QUORUM}) makes a lone node quorate, but
 *   once 3 nodes met, a partition needs 2 of them (checked with corosync-quorumtool: "Expected
 *   votes: 3", "Quorum: 2" after the start, node 2 cut off "Quorate: No"). Without
 *   `expectedVotes` the section has no `expected_votes` and votequorum counts every nodelist
 *   entry, spares included (3 nodes of a 4-entry nodelist: "Expected votes: 4", "Quorum: 3").
 * - `{ provider: "votequorum", twoNode: true }`: `two_node: 1` (and `expected_votes: 2`): each of
 *   two nodes stays quorate when the other is lost. Only safe with fencing: a partition leaves
 *   both halves quorate, and the node that should stop must be powered off by the other.
 *   votequorum also turns on `wait_for_all` (after a start, quorate only once both nodes were
 *   seen) unless `waitForAll: false`.
 * - `{ provider: "none" }`: no quorum section at all (`quorum_type` QUORUM_FREE): corosync
 *   reports every partition quorate and cannot tell a partition from a crash.
 */
export type CorosyncQuorum =
  | { provider: "votequorum"; expectedVotes?: number; twoNode?: false }
  | { provider: "votequorum"; twoNode: true; waitForAll?: boolean }
  | { provider: "none" };

/**
 * The default of {@link corosyncConf}: votequorum with `expected_votes: 1`. A lone node is
 * quorate; several nodes, once they met, need a majority of them (see {@link CorosyncQuorum}).
 */
export const DEFAULT_TEST_QUORUM: CorosyncQuorum = { provider: "votequorum", expectedVotes: 1 };

/** The `quorum { ... }` lines of a corosync.conf (none for `provider: "none"`). */
export function quorumSection(quorum: CorosyncQuorum): string[] {
  if (quorum.provider === "none") return [];
  if (quorum.twoNode) {
    return [
      "quorum {",
      "  provider: corosync_votequorum",
      "  expected_votes: 2",
      "  two_node: 1",
      ...(quorum.waitForAll === false ? ["  wait_for_all: 0"] : []),
      "}",
    ];
  }
  const expected = quorum.expectedVotes;
  if (expected === undefined) return ["quorum {", "  provider: corosync_votequorum", "}"];
  if (!Number.isInteger(expected) || expected < 1) {
    throw new RangeError(`expected_votes must be a positive integer, got ${expected}`);
  }
  return ["quorum {", "  provider: corosync_votequorum", `  expected_votes: ${expected}`, "}"];
}

/**
 * A corosync.conf for tests: totem version 2 without crypto, a short token, scheduling left to
 * the kernel (`sched_rr: no`: real-time priority would starve the other processes of a shared
 * 2-core machine), quorum as `options.quorum` says (default {@link DEFAULT_TEST_QUORUM}),
 * logging only to DIR/corosync.log.
 */
export function corosyncConf(options: CorosyncConfOptions): string {
  if (options.nodes.length === 0) throw new RangeError("corosync needs at least one node");
  const nodes = options.nodes.map((node) =>
    [
      "  node {",
      `    name: node${node.nodeid}`,
      `    nodeid: ${node.nodeid}`,
      `    ring0_addr: ${node.address}`,
      "  }",
    ].join("\n")
  );
  return [
    "totem {",
    "  version: 2",
    `  cluster_name: ${options.clusterName}`,
    `  transport: ${options.transport ?? "knet"}`,
    "  crypto_cipher: none",
    "  crypto_hash: none",
    `  token: ${options.tokenMs ?? TEST_TOKEN_MS}`,
    ...(options.tokenCoefficientMs === undefined
      ? []
      : [`  token_coefficient: ${options.tokenCoefficientMs}`]),
    "}",
    "system {",
    `  state_dir: ${options.dir}/state`,
    "  sched_rr: no",
    "}",
    "logging {",
    "  to_logfile: yes",
    `  logfile: ${options.dir}/corosync.log`,
    "  to_syslog: no",
    "  to_stderr: no",
    `  timestamp: ${options.timestamp ?? "on"}`,
    "}",
    ...quorumSection(options.quorum ?? DEFAULT_TEST_QUORUM),
    "nodelist {",
    ...nodes,
    "}",
    "",
  ].join("\n");
}

/** Options of {@link Corosync.start}. */
export interface CorosyncOptions {
  /**
   * Namespace to run in (e.g. one a cluster test wired up); the caller deletes it. Default: a
   * new one with only `lo`, up, deleted by {@link Corosync.stop}.
   */
  netns?: NetworkNamespace;
  /** This node's id; default 1. */
  nodeid?: number;
  /** The nodelist; default this node alone on 127.0.0.1. */
  nodes?: readonly CorosyncNodeAddress[];
  /** totem cluster_name; default the namespace's name. */
  clusterName?: string;
  /** Default "knet". */
  transport?: "knet" | "udpu" | "udp";
  /** Default {@link TEST_TOKEN_MS}. */
  tokenMs?: number;
  /** See {@link CorosyncConfOptions.tokenCoefficientMs}. */
  tokenCoefficientMs?: number;
  /** See {@link CorosyncConfOptions.timestamp}. */
  timestamp?: "on" | "hires";
  /** See {@link CorosyncConfOptions.quorum}. */
  quorum?: CorosyncQuorum;
  /**
   * The instance's directory (created; must not exist yet, or be empty); removed by
   * {@link Corosync.stop} like the default, a new temporary directory.
   */
  dir?: string;
}

/** Options of {@link Corosync.spawnDeno}. */
export interface SpawnDenoOptions {
  /** V8 flags besides `--stack-size=2048` (e.g. `["--expose-gc"]`). */
  v8Flags?: string[];
  /** Leave out `--stack-size=2048` (to test what happens without it). */
  defaultStack?: boolean;
  /** Extra environment variables. */
  env?: Record<string, string>;
}

/** One corosync process in its own namespace and directory; see the module doc. */
export class Corosync implements AsyncDisposable {
  /** The namespace corosync runs in; CPG clients must run there too. */
  readonly netns: NetworkNamespace;
  /** The instance's directory: corosync.conf, corosync.log, stderr.log, run/, state/. */
  readonly dir: string;
  /** This node's corosync node id. */
  readonly nodeid: number;
  readonly #ownsNetns: boolean;
  readonly #shmBefore: ReadonlySet<string>;
  readonly #pids = new Set<number>();
  #process: Deno.ChildProcess | undefined;
  #exited: Promise<Deno.CommandStatus> | undefined;
  #stopped = false;

  private constructor(
    netns: NetworkNamespace,
    dir: string,
    options: { nodeid: number; ownsNetns: boolean; shmBefore: ReadonlySet<string> },
  ) {
    this.netns = netns;
    this.dir = dir;
    this.nodeid = options.nodeid;
    this.#ownsNetns = options.ownsNetns;
    this.#shmBefore = options.shmBefore;
  }

  /**
   * Writes the config, starts corosync and waits until it accepts CPG clients. On failure
   * everything created so far is removed again.
   *
   * @throws Error quoting corosync's log if it exits or is not ready within {@link START_TIMEOUT_MS}
   */
  static async start(options: CorosyncOptions = {}): Promise<Corosync> {
    const shmBefore = listShm();
    const ownsNetns = options.netns === undefined;
    const netns = options.netns ?? await NetworkNamespace.create({ prefix: COROSYNC_PREFIX });
    let dir: string | undefined;
    try {
      if (ownsNetns) await run(["ip", "-n", netns.name, "link", "set", "lo", "up"]);
      if (options.dir === undefined) {
        dir = await Deno.makeTempDir({ prefix: `${COROSYNC_PREFIX}-` });
      } else {
        dir = options.dir;
        await Deno.mkdir(dir, { recursive: true });
      }
      await Deno.mkdir(`${dir}/run`);
      await Deno.mkdir(`${dir}/state`);
      const nodeid = options.nodeid ?? 1;
      await Deno.writeTextFile(
        `${dir}/corosync.conf`,
        corosyncConf({
          clusterName: options.clusterName ?? netns.name,
          dir,
          nodes: options.nodes ?? [{ nodeid, address: "127.0.0.1" }],
          transport: options.transport,
          tokenMs: options.tokenMs,
          tokenCoefficientMs: options.tokenCoefficientMs,
          timestamp: options.timestamp,
          quorum: options.quorum,
        }),
      );
      const corosync = new Corosync(netns, dir, { nodeid, ownsNetns, shmBefore });
      try {
        await corosync.restart();
      } catch (error) {
        await corosync.stop();
        throw error;
      }
      return corosync;
    } catch (error) {
      if (ownsNetns) await netns.delete();
      if (dir !== undefined) await Deno.remove(dir, { recursive: true }).catch(() => {});
      throw error;
    }
  }

  /** corosync's pid while it runs. */
  get pid(): number | undefined {
    return this.#process?.pid;
  }

  /** Whether the corosync process is running (started and not yet seen exiting). */
  get running(): boolean {
    return this.#process !== undefined;
  }

  /**
   * Starts corosync again (after {@link kill}) with the same config, namespace and directory,
   * and waits until it accepts CPG clients.
   *
   * @throws Error if it is running already, exits, or is not ready in time
   */
  async restart(): Promise<void> {
    if (this.#stopped) throw new Error("Corosync was stopped");
    if (this.#process !== undefined) throw new Error(`corosync is running (pid ${this.pid})`);
    const script = `mount --bind ${quote(`${this.dir}/run`)} /run && exec corosync -f -c ${
      quote(`${this.dir}/corosync.conf`)
    } >>${quote(`${this.dir}/stderr.log`)} 2>&1`;
    const process = this.netns.spawn(
      ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
      { stdout: "null", stderr: "null" },
    );
    this.#process = process;
    this.#pids.add(process.pid);
    const exited = process.status;
    this.#exited = exited;
    exited.then(() => {
      if (this.#process === process) this.#process = undefined;
    });
    await this.#waitReady(exited);
  }

  /**
   * Sends `signal` to corosync and waits for it to exit. SIGKILL (the default) is a crash: it
   * leaves its shared memory files behind (removed by {@link stop}).
   */
  async kill(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    const process = this.#process;
    const exited = this.#exited;
    if (process === undefined || exited === undefined) throw new Error("corosync is not running");
    process.kill(signal);
    const status = await exited;
    this.#process = undefined;
    return status;
  }

  /**
   * Stops corosync (SIGTERM, then SIGKILL after {@link STOP_TIMEOUT_MS}), deletes the namespace
   * if this instance created it, and removes the directory and the instance's /dev/shm files.
   * Idempotent. Keeps the directory when `CLOGD_KEEP_COROSYNC_DIR` is set (for debugging).
   */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    const process = this.#process;
    const exited = this.#exited;
    if (process !== undefined && exited !== undefined) {
      try {
        process.kill("SIGTERM");
      } catch {
        // It exited between the check and the kill.
      }
      const timer = setTimeout(() => {
        try {
          process.kill("SIGKILL");
        } catch {
          // Exited meanwhile.
        }
      }, STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
      this.#process = undefined;
    }
    if (this.#ownsNetns) await this.netns.delete();
    this.#removeShm();
    if (!Deno.env.get("CLOGD_KEEP_COROSYNC_DIR")) {
      await Deno.remove(this.dir, { recursive: true }).catch(() => {});
    }
  }

  /** `await using` support: {@link stop}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  /**
   * Removes the /dev/shm files of this instance's exited corosyncs (e.g. right after a
   * SIGKILL, which leaves about 9 MB there); the running one's files stay.
   */
  removeStaleShm(): void {
    this.#removeShm(this.#process?.pid);
  }

  /** corosync's log so far. */
  async log(): Promise<string> {
    const parts = await Promise.all(
      ["corosync.log", "stderr.log"].map((name) =>
        Deno.readTextFile(`${this.dir}/${name}`).catch(() => "")
      ),
    );
    return parts.join("");
  }

  /**
   * Opens a CPG handle in this process, connected to this corosync (see the module doc).
   *
   * @throws CpgError as {@link CpgHandle.open} does
   */
  openCpg(callbacks: CpgCallbacks): CpgHandle {
    return this.netns.enter(() => CpgHandle.open(callbacks));
  }

  /**
   * Opens a quorum handle in this process, connected to this corosync (like {@link openCpg}).
   *
   * @throws QuorumError as {@link QuorumHandle.open} does
   */
  openQuorum(callbacks: QuorumCallbacks = {}): QuorumHandle {
    return this.netns.enter(() => QuorumHandle.open(callbacks));
  }

  /**
   * Runs a Deno script inside the namespace, with stdout and stderr piped; the child's pid is
   * its CPG pid. Killed by {@link stop} if still running (when this instance owns the namespace).
   */
  spawnDeno(script: string, args: string[], options: SpawnDenoOptions = {}): DenoChild {
    const v8Flags = [
      ...(options.defaultStack ? [] : ["--stack-size=2048"]),
      ...(options.v8Flags ?? []),
    ];
    const command = [
      Deno.execPath(),
      "run",
      "--allow-all",
      ...(v8Flags.length > 0 ? [`--v8-flags=${v8Flags.join(",")}`] : []),
      script,
      ...args,
    ];
    return new DenoChild(this.netns.spawn(command, { env: options.env }));
  }

  async #waitReady(exited: Promise<Deno.CommandStatus>): Promise<void> {
    let status: Deno.CommandStatus | undefined;
    exited.then((s) => status = s);
    const deadline = Date.now() + START_TIMEOUT_MS;
    // corosync-cpgtool is a C CPG client: it exits 0 once cpg_initialize succeeds, i.e. once
    // cpg_initialize stops returning CS_ERR_LIBRARY for clients of this namespace.
    while (true) {
      if (status !== undefined) {
        throw new Error(
          `corosync exited with ${status.code} (signal ${status.signal}) while starting:\n${await this
            .#logTail()}`,
        );
      }
      const probe = this.netns.spawn(["corosync-cpgtool"], { stdout: "null", stderr: "null" });
      if ((await probe.status).success) return;
      if (Date.now() > deadline) {
        throw new Error(
          `corosync did not accept CPG clients within ${START_TIMEOUT_MS} ms:\n${await this
            .#logTail()}`,
        );
      }
      await delay(READY_POLL_INTERVAL_MS);
    }
  }

  async #logTail(): Promise<string> {
    return (await this.log()).trimEnd().split("\n").slice(-LOG_TAIL_LINES).join("\n");
  }

  #removeShm(keep?: number): void {
    const pids = [...this.#pids].filter((pid) => pid !== keep).join("|");
    if (pids === "") return;
    // qb-corosync-PID-blackbox-*, and qb-PID-CLIENTPID-* (one per client connection).
    const ours = new RegExp(`^qb-(corosync-)?(${pids})-`);
    for (const name of listShm()) {
      if (this.#shmBefore.has(name) || !ours.test(name)) continue;
      try {
        Deno.removeSync(`/dev/shm/${name}`, { recursive: true });
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
      }
    }
  }
}

/**
 * A Deno child process that prints one JSON object per line on stdout (as
 * tests/support/cpg_child.ts does). Its stderr is collected for error messages.
 */
export class DenoChild implements AsyncDisposable {
  /** The process; its pid is also its CPG pid. */
  readonly process: Deno.ChildProcess;
  /** Every line read so far, parsed. */
  readonly lines: Record<string, unknown>[] = [];
  #stderr = "";
  #stderrDone: Promise<void>;
  #reader: ReadableStreamDefaultReader<string>;
  #buffer = "";
  #ended = false;
  #pending: Promise<ReadableStreamReadResult<string>> | undefined;

  /** Wraps a spawned process whose stdout and stderr are piped. */
  constructor(process: Deno.ChildProcess) {
    this.process = process;
    this.#reader = process.stdout.pipeThrough(new TextDecoderStream()).getReader();
    this.#stderrDone = (async () => {
      try {
        for await (const chunk of process.stderr.pipeThrough(new TextDecoderStream())) {
          this.#stderr += chunk;
        }
      } catch {
        // The pipe was cancelled (the namespace deleted under a killed child): nothing to read.
      }
    })();
  }

  /** The child's pid. */
  get pid(): number {
    return this.process.pid;
  }

  /** What the child wrote to stderr so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /**
   * The first line (already read or still to come) for which `match` holds.
   *
   * @throws Error quoting the child's stderr if it ends its output first or `timeoutMs` passes
   */
  async waitFor(
    match: (line: Record<string, unknown>) => boolean,
    options: { timeoutMs: number; what?: string },
  ): Promise<Record<string, unknown>> {
    const found = this.lines.find(match);
    if (found !== undefined) return found;
    const deadline = Date.now() + options.timeoutMs;
    while (true) {
      const line = await this.#nextLine(deadline - Date.now());
      if (line === "timeout" || line === "end") {
        await (line === "end" ? this.#stderrDone : Promise.resolve());
        throw new Error(
          `Child ${this.pid} ${
            line === "end" ? "ended its output" : `timed out after ${options.timeoutMs} ms`
          } before ${options.what ?? "the expected line"}; stdout: ${
            JSON.stringify(this.lines).slice(-2000)
          }; stderr: ${headAndTail(this.#stderr, 2000)}`,
        );
      }
      if (match(line)) return line;
    }
  }

  /** Waits for the child to exit; kills it after `timeoutMs`. */
  async exit(options: { timeoutMs: number }): Promise<Deno.CommandStatus> {
    const timer = setTimeout(() => this.kill(), options.timeoutMs);
    try {
      // Drain stdout so the child never blocks on a full pipe.
      while ((await this.#nextLine(options.timeoutMs)) !== "end") {
        // Lines are kept in `lines`.
      }
      await this.#stderrDone;
      return await this.process.status;
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGKILL, if still running. */
  kill(): void {
    try {
      this.process.kill("SIGKILL");
    } catch {
      // Already exited.
    }
  }

  /** `await using` support: kills the child and waits for it. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.kill();
    await this.exit({ timeoutMs: STOP_TIMEOUT_MS });
  }

  async #nextLine(timeoutMs: number): Promise<Record<string, unknown> | "timeout" | "end"> {
    while (true) {
      const newline = this.#buffer.indexOf("\n");
      if (newline >= 0) {
        const text = this.#buffer.slice(0, newline);
        this.#buffer = this.#buffer.slice(newline + 1);
        if (text.trim() === "") continue;
        let line: Record<string, unknown>;
        try {
          line = JSON.parse(text);
        } catch {
          line = { event: "text", text };
        }
        this.lines.push(line);
        return line;
      }
      if (this.#ended) return "end";
      if (timeoutMs <= 0) return "timeout";
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), timeoutMs);
      });
      // A pending read survives a timeout: the next call's read would race it, so keep one.
      this.#pending ??= this.#reader.read();
      const result = await Promise.race([this.#pending, timeout]);
      clearTimeout(timer);
      if (result === "timeout") return "timeout";
      this.#pending = undefined;
      if (result.done) this.#ended = true;
      else this.#buffer += result.value;
    }
  }
}

/** Options of {@link dispatchUntil}. */
export interface DispatchUntilOptions {
  /** Give up after this many ms. */
  timeoutMs: number;
  /** Says what was awaited, in the timeout error. */
  what: string;
}

/** Longest single wait for the CPG fd in {@link dispatchUntil}, in ms. */
const DISPATCH_POLL_MS = 100;

/**
 * Dispatches `handle` until `done()` holds, waiting for its fd with a nonblocking FFI poll
 * between dispatches (so timers and child pipes keep running).
 *
 * @throws CpgError if a dispatch returns anything but CS_OK (e.g. CS_ERR_LIBRARY)
 * @throws Error after `timeoutMs`
 */
export async function dispatchUntil(
  handle: CpgHandle,
  done: () => boolean,
  options: DispatchUntilOptions,
): Promise<void> {
  const deadline = Date.now() + options.timeoutMs;
  const pollfd = new Uint8Array(new ArrayBuffer(POLLFD.size));
  const view = new DataView(pollfd.buffer);
  view.setInt32(POLLFD.fd, handle.fd, true);
  view.setInt16(POLLFD.events, POLLIN, true);
  while (true) {
    const result = handle.dispatch(CS_DISPATCH_ALL);
    if (result !== CS_OK) throw new CpgError("cpg_dispatch", result);
    if (done()) return;
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new Error(`Timed out after ${options.timeoutMs} ms waiting for ${options.what}`);
    }
    view.setInt16(POLLFD.revents, 0, true);
    await libc().poll_nb(pollfd, 1n, Math.min(left, DISPATCH_POLL_MS));
  }
}

/**
 * Waits up to `timeoutMs` for `handle`'s fd to be readable (or hung up); returns the poll
 * revents (0 on timeout).
 */
export async function waitReadable(handle: CpgHandle, timeoutMs: number): Promise<number> {
  const pollfd = new Uint8Array(new ArrayBuffer(POLLFD.size));
  const view = new DataView(pollfd.buffer);
  view.setInt32(POLLFD.fd, handle.fd, true);
  view.setInt16(POLLFD.events, POLLIN, true);
  await libc().poll_nb(pollfd, 1n, timeoutMs);
  return view.getInt16(POLLFD.revents, true);
}

/** Most joins retried on CS_ERR_TRY_AGAIN by {@link joinWithRetry} (corosync is syncing). */
export const JOIN_RETRIES = 100;
/** Pause between two join attempts, in ms. */
const JOIN_RETRY_MS = 20;

/** {@link CpgHandle.join}, retried while corosync answers CS_ERR_TRY_AGAIN. */
export async function joinWithRetry(handle: CpgHandle, group: string): Promise<void> {
  for (let attempt = 1;; attempt++) {
    try {
      handle.join(group);
      return;
    } catch (error) {
      if (!(error instanceof CpgError) || error.code !== CS_ERR_TRY_AGAIN) throw error;
      if (attempt >= JOIN_RETRIES) throw error;
      await delay(JOIN_RETRY_MS);
    }
  }
}

function listShm(): Set<string> {
  const names = new Set<string>();
  for (const entry of Deno.readDirSync("/dev/shm")) names.add(entry.name);
  return names;
}

/** Runs `command` (output discarded); throws with its stderr when it exits non-zero. */
export async function run(command: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command(command[0], {
    args: command.slice(1),
    stdout: "null",
    stderr: "piped",
  }).output();
  if (code !== 0) {
    throw new Error(
      `${command.join(" ")} exited with ${code}: ${new TextDecoder().decode(stderr).trim()}`,
    );
  }
}

/** `text` quoted for sh. */
export function quote(text: string): string {
  return `'${text.replaceAll("'", `'"'"'`)}'`;
}

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** `text` if at most 2 * `keep` characters, else its first and last `keep` with "[...]" between. */
function headAndTail(text: string, keep: number): string {
  if (text.length <= 2 * keep) return text;
  return `${text.slice(0, keep)}[...]${text.slice(-keep)}`;
}
