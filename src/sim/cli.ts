/**
 * `clogd kernel-sim`: play the kernel's side of dm-log-userspace against a running daemon over
 * netlink, check every answer, and report throughput and latency. Run it in the daemon's
 * network namespace (the caller sets that up; this command only opens sockets).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type HeaderLayout, requestTypeName } from "../kernel/protocol.ts";
import type { LogKind, SyncMode } from "../log/types.ts";
import type { Violation } from "./checker.ts";
import { type DriverResult, runDriver } from "./driver.ts";
import { KERNEL_DEFAULTS, KernelModel, type MirrorSpec, type SlowRequest } from "./model.ts";
import { Prng } from "./prng.ts";
import { Workload, WORKLOAD_DEFAULTS } from "./workload.ts";

const HELP = `Usage: clogd kernel-sim [options]

Plays the Linux kernel's side of dm-log-userspace (mirror target, region hash, userspace log,
netlink transport) against a running clogd: multicasts requests to NETLINK_CONNECTOR group 7 and
reads the daemon's replies on its own port id. Checks every reply against its own model of the
log and reports violations, throughput and latency. Run it inside a network namespace next to
the daemon (started with --accept-user-peers); it does no namespace handling itself.

Mirrors:
  --logs N                 mirrors (logs) to simulate at once (default 1)
  --regions N              regions per log (default 1024)
  --region-size S          region size in sectors (default 1024)
  --sectors N              target length in sectors (default regions x region size)
  --type core|disk         clustered-core (default) or clustered-disk
  --device DEV             disk log device as put in the table; "%d" is replaced by the log
                           number (one device per log), e.g. /tmp/logs/log%d.img
  --status-device DEV      also accept DEV in a disk log's status (e.g. its major:minor)
  --disk-fresh             the disk logs are fresh (zeroed): expect every region out of sync
  --sync default|sync|nosync  resync mode in the table (default: default)
  --integrated-flush       integrated_flush in the table (marks travel in FLUSH; version >= 3)
  --uuid PREFIX            log uuids are PREFIX-<n> (default ksim-<pid>)
  --layout current|2009    request header layout (default current)
  --version N              DM_ULOG_REQUEST_VERSION (default 3)

Workload (per log):
  --ios N                  bios (writes and reads) per log (default ${WORKLOAD_DEFAULTS.ios})
  --duration S             instead of --ios: submit bios for S seconds
  --iodepth N              bios in flight per log (default ${WORKLOAD_DEFAULTS.iodepth})
  --read-share F           share of reads, 0..1 (default ${WORKLOAD_DEFAULTS.readShare})
  --hot-regions F          share of regions that are hot, 0..1 (default 0: uniform)
  --hot-share F            share of bios to the hot regions (default ${WORKLOAD_DEFAULTS.hotShare})
  --io-during-resync       start the I/O at once, during the resync (default: after it). As in
                           the kernel, writes to regions not yet resynced then wait for them:
                           IS_REMOTE_RECOVERING is asked at most every 250 ms
  --suspend-cycles N       suspend/resume cycles spread over the I/O (default 0)
  --suspend-pause-ms MS    time suspended per cycle (default 0)
  --status-every-ms MS     a dmsetup status (GET_SYNC_COUNT + STATUS_INFO) this often
  --probe-clean-every-ms MS  an IS_CLEAN probe (not a kernel request) this often
  --bad-requests N         deliberately bad requests per log (each must get an error)
  --no-wait-sync           remove without waiting for the resync to finish
  --no-final-status        no status before the removal
  --no-remove              leave the logs resumed at the end (no suspend, no DTR)
  --seed N                 seed of the workload (default 1)

Kernel timing:
  --timeout-ms MS          request timeout before a resend (default ${KERNEL_DEFAULTS.timeoutMs})
  --esrch-retry-ms MS      sleep before each re-CTR after -ESRCH (default ${KERNEL_DEFAULTS.esrchRetryMs})
  --rr-interval-ms MS      IS_REMOTE_RECOVERING rate limit, shared by all logs (default ${KERNEL_DEFAULTS.remoteRecoveringIntervalMs}).
                           After each RESUME a log's first writes wait for one such answer, so
                           with many logs the start is slow: benchmarks use 0
  --io-latency-us US       time a bio takes on the legs (default 1; must be > 0)
  --recovery-latency-us US time to copy one region during resync (default 0)
  --first-seq N            seq of the first request (default 0)

Checking:
  --shared                 the logs are also used by other nodes: check only this kernel's
                           own marks and the protocol, not which regions are in sync
  --after-restart fresh|unknown  what a daemon that answered -ESRCH knows afterwards
                           (default: fresh for core logs, unknown for disk logs)

Run:
  --wait-daemon-ms MS      wait this long for a daemon on group 7 (default 10000)
  --max-run-ms MS          give up after this long (default 600000)
  --listener-poll-ms MS    how often to check that a daemon listens (default 50; 0: never)
  --spin-us US             busy-read replies this long after sending (default 0)
  --json                   print the report as JSON

Signals:
  SIGINT, SIGTERM          stop at once and report (logs left as they are)
  SIGHUP                   finish: no new bios; once those in flight are done, the final
                           status and the removal (suspend, DTR), without waiting for the
                           resync; then report

Snapshots (for cluster tests that check the simulator while it runs):
  --snapshot PATH          at the start (from then on SIGUSR2 is handled), on every SIGUSR2
                           and at the end, write a JSON snapshot to PATH (atomically):
                           counters, violations, slow requests, and per log the regions whose
                           marks are durable (acknowledged, then flushed, not cleared) and the
                           regions this kernel set in sync, with wall-clock times in ms
  --slow-ms MS             list kernel requests answered after at least MS, and timeouts, in
                           the snapshot (default 100)
  -h, --help               show this text

Exit status: 0 when the run finished without violations, 1 otherwise, 2 on a usage error,
3 when the netlink socket could not be opened.
`;

/** A request in a {@link KernelSimSnapshot} that took long or timed out (times: wall-clock ms). */
export interface SnapshotSlowRequest {
  seq: number;
  type: string;
  /** Log uuid. */
  uuid: string;
  sentMs: number;
  doneMs: number;
  waitMs: number;
  outcome: SlowRequest["outcome"];
  errno: number;
}

/** One log in a {@link KernelSimSnapshot}. */
export interface SnapshotLog {
  uuid: string;
  kind: LogKind;
  state: string;
  phase: string;
  /** [region, wall-clock ms its mark became durable] (see LogChecker.holds). */
  holds: [number, number][];
  /** [region, wall-clock ms of this kernel's latest SET_REGION_SYNC 1]. */
  synced: [number, number][];
}

/**
 * What `kernel-sim --snapshot PATH` writes on SIGUSR2 and at the end. Times are wall-clock ms
 * (`Date.now()`), comparable across the processes of one machine.
 */
export interface KernelSimSnapshot {
  /** Snapshots written before this one (0 for the first). */
  index: number;
  /** Written at the end of the run (no more follow). */
  final: boolean;
  /** Wall clock when written. */
  wallMs: number;
  requests: KernelSimReport["requests"];
  /** When the oldest kernel request still waiting was sent, or null. */
  oldestWaitingMs: number | null;
  violations: { total: number; byKind: Record<string, number>; first: Violation[] };
  slow: { thresholdMs: number; dropped: number; list: SnapshotSlowRequest[] };
  logs: SnapshotLog[];
}

/** Violations listed one by one in a snapshot (all are counted). */
export const MAX_SNAPSHOT_VIOLATIONS = 50;

/** Default of `--slow-ms`. */
export const DEFAULT_SLOW_MS = 100;

/** Everything `kernel-sim` reports (the `--json` output). */
export interface KernelSimReport {
  ok: boolean;
  finished: boolean;
  config: Record<string, unknown>;
  elapsedMs: number;
  /** Every request over the whole run (creation, resync and removal included). */
  requestsPerSec: number;
  /** Requests while every log did I/O (see SteadyWindow), or null. */
  ioPhase: { ms: number; requests: number; requestsPerSec: number } | null;
  requests: {
    sent: number;
    byType: Record<string, number>;
    replied: number;
    errorReplies: number;
    resends: number;
    timeouts: number;
    eagain: number;
    esrch: number;
    reCtr: number;
    sendFailures: number;
    lateReplies: number;
    outstanding: number;
  };
  io: { writes: number; reads: number; regionsRecovered: number };
  flushLatencyUs: ReturnType<KernelModel["latency"][number]["summary"]>;
  latencyUs: ReturnType<KernelModel["latencySummaries"]>;
  violations: { total: number; byKind: Record<string, number>; first: Violation[] };
  logs: (ReturnType<KernelModel["mirrors"]>[number] & ReturnType<Workload["summary"]>[number])[];
  driver: Omit<DriverResult, "elapsedMs" | "finished">;
}

/** Logs listed one by one in the human summary (beyond that, a tally). */
export const MAX_LOGS_PRINTED = 8;

/** DM_UUID_LEN - 1: the longest uuid the header holds with its NUL. */
export const MAX_UUID_LENGTH = 128;

/** Violations printed in the human summary. */
export const MAX_VIOLATIONS_PRINTED = 20;

class UsageError extends Error {}

/** Runs `clogd kernel-sim`; returns the exit code. */
export async function runKernelSim(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parse(args);
  } catch (err) {
    // Everything parse() throws is about the arguments (parseArgs' TypeError, our range checks,
    // the model refusing a combination such as integrated flush with version 2).
    const message = (err as Error).message;
    console.error(`clogd kernel-sim: ${message}\n\nRun "clogd kernel-sim --help" for the options.`);
    return 2;
  }
  if (parsed === "help") {
    console.log(HELP);
    return 0;
  }
  const { model, workload, driver, json, config, snapshotPath } = parsed;
  // Wall clock of model time 0, set when the driver starts the model.
  let wallZero = Date.now();
  let snapshots = 0;
  const snapshot = (final: boolean) => {
    if (snapshotPath === undefined) return;
    const text = JSON.stringify(
      buildSnapshot(model, workload, { index: snapshots++, final, wallZero }),
    );
    // Written aside and renamed: a reader never sees half a snapshot.
    const tmp = `${snapshotPath}.tmp`;
    Deno.writeTextFileSync(tmp, text + "\n");
    Deno.renameSync(tmp, snapshotPath);
  };
  const onSnapshotSignal = () => snapshot(false);
  if (snapshotPath !== undefined) {
    Deno.addSignalListener("SIGUSR2", onSnapshotSignal);
    // SIGUSR2, as SIGUSR1 starts Deno's inspector. A first snapshot tells the reader that the
    // signal is handled now (its default action kills).
    snapshot(false);
  }
  const onFinishSignal = () => workload.finishNow(model.now);
  Deno.addSignalListener("SIGHUP", onFinishSignal);
  let result: DriverResult;
  try {
    result = await runDriver(model, {
      start: (now) => {
        wallZero = Date.now() - now;
        workload.start(model, now);
      },
      finished: () => workload.finished,
    }, driver);
  } catch (err) {
    const e = err as { errno?: number; message: string };
    if (e.errno !== undefined) {
      console.error(`clogd kernel-sim: Cannot use the netlink socket: ${e.message}`);
      return 3;
    }
    throw err;
  } finally {
    Deno.removeSignalListener("SIGHUP", onFinishSignal);
    if (snapshotPath !== undefined) Deno.removeSignalListener("SIGUSR2", onSnapshotSignal);
  }
  snapshot(true);
  model.finish(result.elapsedMs, workload.options.remove);
  const report = buildReport(model, workload, result, config);
  if (json) console.log(JSON.stringify(report, null, 2));
  else printReport(report);
  return report.ok ? 0 : 1;
}

interface Parsed {
  model: KernelModel;
  workload: Workload;
  driver: Parameters<typeof runDriver>[2];
  json: boolean;
  config: Record<string, unknown>;
  snapshotPath: string | undefined;
}

function parse(args: string[]): Parsed | "help" {
  const { values } = parseArgs({
    args,
    strict: true,
    options: {
      logs: { type: "string", default: "1" },
      regions: { type: "string", default: "1024" },
      "region-size": { type: "string", default: "1024" },
      sectors: { type: "string" },
      type: { type: "string", default: "core" },
      device: { type: "string" },
      "status-device": { type: "string" },
      "disk-fresh": { type: "boolean", default: false },
      sync: { type: "string", default: "default" },
      "integrated-flush": { type: "boolean", default: false },
      uuid: { type: "string" },
      layout: { type: "string", default: "current" },
      version: { type: "string", default: "3" },
      ios: { type: "string" },
      duration: { type: "string" },
      iodepth: { type: "string", default: String(WORKLOAD_DEFAULTS.iodepth) },
      "read-share": { type: "string", default: String(WORKLOAD_DEFAULTS.readShare) },
      "hot-regions": { type: "string", default: "0" },
      "hot-share": { type: "string", default: String(WORKLOAD_DEFAULTS.hotShare) },
      "io-during-resync": { type: "boolean", default: false },
      "suspend-cycles": { type: "string", default: "0" },
      "suspend-pause-ms": { type: "string", default: "0" },
      "status-every-ms": { type: "string", default: "0" },
      "probe-clean-every-ms": { type: "string", default: "0" },
      "bad-requests": { type: "string", default: "0" },
      "no-wait-sync": { type: "boolean", default: false },
      "no-final-status": { type: "boolean", default: false },
      "no-remove": { type: "boolean", default: false },
      seed: { type: "string", default: "1" },
      "timeout-ms": { type: "string", default: String(KERNEL_DEFAULTS.timeoutMs) },
      "esrch-retry-ms": { type: "string", default: String(KERNEL_DEFAULTS.esrchRetryMs) },
      "rr-interval-ms": {
        type: "string",
        default: String(KERNEL_DEFAULTS.remoteRecoveringIntervalMs),
      },
      "io-latency-us": { type: "string", default: "1" },
      "recovery-latency-us": { type: "string", default: "0" },
      "first-seq": { type: "string", default: "0" },
      shared: { type: "boolean", default: false },
      "after-restart": { type: "string" },
      "wait-daemon-ms": { type: "string", default: "10000" },
      "max-run-ms": { type: "string", default: "600000" },
      "listener-poll-ms": { type: "string", default: "50" },
      "spin-us": { type: "string", default: "0" },
      json: { type: "boolean", default: false },
      snapshot: { type: "string" },
      "slow-ms": { type: "string", default: String(DEFAULT_SLOW_MS) },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return "help";

  const logs = int(values.logs, "--logs", 1, 4096);
  const regions = int(values.regions, "--regions", 1, 2 ** 26);
  const regionSize = int(values["region-size"], "--region-size", 1, 2 ** 31);
  const sectors = values.sectors === undefined
    ? regions * regionSize
    : int(values.sectors, "--sectors", 1, 2 ** 53);
  const kind: LogKind = oneOf(values.type, "--type", {
    core: "clustered-core",
    disk: "clustered-disk",
  });
  const sync = oneOf<SyncMode>(values.sync, "--sync", {
    default: "default",
    sync: "sync",
    nosync: "nosync",
  });
  const layout = oneOf<HeaderLayout>(values.layout, "--layout", {
    current: "current",
    "2009": "2009",
  });
  const version = int(values.version, "--version", 1, 255);
  if (kind === "clustered-disk" && values.device === undefined) {
    throw new UsageError("--type disk needs --device");
  }
  if (kind === "clustered-disk" && logs > 1 && !values.device!.includes("%d")) {
    throw new UsageError("With several disk logs, --device must contain %d (one device per log)");
  }
  if (values.ios !== undefined && values.duration !== undefined) {
    throw new UsageError("Give --ios or --duration, not both");
  }
  const afterRestart = values["after-restart"] === undefined
    ? (kind === "clustered-core" ? "fresh" : "unknown")
    : oneOf<"fresh" | "unknown">(values["after-restart"], "--after-restart", {
      fresh: "fresh",
      unknown: "unknown",
    });
  const seed = int(values.seed, "--seed", 0, 2 ** 32 - 1);
  const durationMs = values.duration === undefined
    ? 0
    : num(values.duration, "--duration", 0.001, 1e6) * 1000;
  const ios = values.duration !== undefined
    ? 0
    : int(values.ios ?? String(WORKLOAD_DEFAULTS.ios), "--ios", 0, 2 ** 40);

  const kernelOptions = {
    layout,
    version,
    timeoutMs: num(values["timeout-ms"], "--timeout-ms", 1, 1e9),
    esrchRetryMs: num(values["esrch-retry-ms"], "--esrch-retry-ms", 0, 1e9),
    remoteRecoveringIntervalMs: num(values["rr-interval-ms"], "--rr-interval-ms", 0, 1e9),
    ioLatencyMs: num(values["io-latency-us"], "--io-latency-us", 0.001, 1e9) / 1000,
    recoveryLatencyMs: num(values["recovery-latency-us"], "--recovery-latency-us", 0, 1e9) / 1000,
    firstSeq: int(values["first-seq"], "--first-seq", 0, 2 ** 32 - 1),
    slowRequestMs: values.snapshot === undefined
      ? Infinity
      : num(values["slow-ms"], "--slow-ms", 0, 1e9),
  };
  const workload = new Workload({
    ios,
    durationMs,
    iodepth: int(values.iodepth, "--iodepth", 1, 1 << 20),
    readShare: num(values["read-share"], "--read-share", 0, 1),
    hotRegions: num(values["hot-regions"], "--hot-regions", 0, 1),
    hotShare: num(values["hot-share"], "--hot-share", 0, 1),
    ioAfterSync: !values["io-during-resync"],
    suspendCycles: int(values["suspend-cycles"], "--suspend-cycles", 0, 1 << 20),
    suspendPauseMs: num(values["suspend-pause-ms"], "--suspend-pause-ms", 0, 1e9),
    statusEveryMs: num(values["status-every-ms"], "--status-every-ms", 0, 1e9),
    probeCleanEveryMs: num(values["probe-clean-every-ms"], "--probe-clean-every-ms", 0, 1e9),
    badRequests: int(values["bad-requests"], "--bad-requests", 0, 1 << 20),
    waitSync: !values["no-wait-sync"],
    finalStatus: !values["no-final-status"],
    remove: !values["no-remove"],
    seed,
  });
  const model = new KernelModel(kernelOptions, workload);
  const prng = new Prng(seed ^ 0x5a5a5a5a);
  const prefix = values.uuid ?? `ksim-${Deno.pid}`;
  if (`${prefix}-${logs - 1}`.length > MAX_UUID_LENGTH) {
    throw new UsageError(`--uuid makes uuids longer than ${MAX_UUID_LENGTH} bytes`);
  }
  const usedLuids = new Set<bigint>();
  const initialSync: MirrorSpec["initialSync"] = sync === "nosync"
    ? "in"
    : (kind === "clustered-core" || sync === "sync" || values["disk-fresh"])
    ? "out"
    : "unknown";
  for (let i = 0; i < logs; i++) {
    // A kernel pointer in the direct map, 64-byte aligned, different for every log.
    let luid: bigint;
    do {
      luid = 0xffff888000000000n | (BigInt(prng.u32()) << 6n);
    } while (usedLuids.has(luid));
    usedLuids.add(luid);
    const device = values.device?.replaceAll("%d", String(i));
    model.addMirror({
      uuid: `${prefix}-${i}`,
      luid,
      kind,
      device,
      regionSize,
      targetSectors: sectors,
      sync,
      integratedFlush: values["integrated-flush"],
      initialSync,
      exclusive: !values.shared,
      afterRestart,
      statusDevice: values["status-device"],
      trackHolds: values.snapshot !== undefined,
    });
  }
  const config = {
    logs,
    regions: Math.ceil(sectors / regionSize),
    regionSize,
    sectors,
    type: kind,
    sync,
    integratedFlush: values["integrated-flush"],
    layout,
    version,
    ...workload.options,
    timeoutMs: model.options.timeoutMs,
    exclusive: !values.shared,
    afterRestart,
  };
  return {
    model,
    workload,
    json: values.json,
    config,
    snapshotPath: values.snapshot,
    driver: {
      waitDaemonMs: num(values["wait-daemon-ms"], "--wait-daemon-ms", 0, 1e9),
      maxRunMs: num(values["max-run-ms"], "--max-run-ms", 1, 1e10),
      listenerPollMs: num(values["listener-poll-ms"], "--listener-poll-ms", 0, 1e9),
      spinUs: num(values["spin-us"], "--spin-us", 0, 1e6),
    },
  };
}

/** The request counters of a report or snapshot. */
function requestCounts(model: KernelModel): KernelSimReport["requests"] {
  const s = model.stats;
  const byType: Record<string, number> = {};
  let sent = 0;
  let replied = 0;
  for (let t = 0; t < s.sent.length; t++) {
    if (s.sent[t] > 0) byType[requestTypeName(t)] = s.sent[t];
    sent += s.sent[t];
    replied += s.replied[t];
  }
  return {
    sent,
    byType,
    replied,
    errorReplies: s.errorReplies,
    resends: s.resends,
    timeouts: s.timeouts,
    eagain: s.eagain,
    esrch: s.esrch,
    reCtr: s.reCtr,
    sendFailures: s.sendFailures,
    lateReplies: s.lateReplies,
    outstanding: model.outstanding,
  };
}

function buildReport(
  model: KernelModel,
  workload: Workload,
  result: DriverResult,
  config: Record<string, unknown>,
): KernelSimReport {
  const requests = requestCounts(model);
  const runs = workload.summary();
  const v = model.violations;
  const elapsedMs = Math.round(result.elapsedMs * 1000) / 1000;
  const { elapsedMs: _e, finished: _f, ...driver } = result;
  return {
    ok: v.total === 0 && result.finished,
    finished: result.finished,
    config,
    elapsedMs,
    requestsPerSec: result.elapsedMs > 0
      ? Math.round((requests.sent / result.elapsedMs) * 1000)
      : 0,
    ioPhase: steadyReport(workload),
    requests,
    io: {
      writes: model.stats.writesDone,
      reads: model.stats.readsDone,
      regionsRecovered: model.stats.regionsRecovered,
    },
    flushLatencyUs: model.latency[9].summary(),
    latencyUs: model.latencySummaries(requestTypeName),
    violations: { total: v.total, byKind: { ...v.byKind }, first: v.kept.slice(0, 100) },
    logs: model.mirrors().map((m, i) => ({ ...m, ...runs[i] })),
    driver,
  };
}

function buildSnapshot(
  model: KernelModel,
  workload: Workload,
  at: { index: number; final: boolean; wallZero: number },
): KernelSimSnapshot {
  const wall = (ms: number) => Math.round((at.wallZero + ms) * 1000) / 1000;
  const runs = workload.summary();
  const mirrors = model.mirrors();
  const oldest = model.oldestWaiting();
  const v = model.violations;
  return {
    index: at.index,
    final: at.final,
    wallMs: Date.now(),
    requests: requestCounts(model),
    oldestWaitingMs: oldest === null ? null : wall(oldest),
    violations: {
      total: v.total,
      byKind: { ...v.byKind },
      first: v.kept.slice(0, MAX_SNAPSHOT_VIOLATIONS),
    },
    slow: {
      thresholdMs: model.options.slowRequestMs,
      dropped: model.slowDropped,
      list: model.slow.map((r) => ({
        seq: r.seq,
        type: requestTypeName(r.type),
        uuid: mirrors[r.log]?.uuid ?? "",
        sentMs: wall(r.sentAt),
        doneMs: wall(r.doneAt),
        waitMs: Math.round((r.doneAt - r.sentAt) * 1000) / 1000,
        outcome: r.outcome,
        errno: r.errno,
      })),
    },
    logs: mirrors.map((m, i) => {
      const checker = model.checker(i);
      return {
        uuid: m.uuid,
        kind: m.kind,
        state: m.state,
        phase: runs[i]?.phase ?? "new",
        holds: [...checker.holds].map(([r, ms]): [number, number] => [r, wall(ms)]),
        synced: [...checker.syncedAt].map(([r, ms]): [number, number] => [r, wall(ms)]),
      };
    }),
  };
}

function steadyReport(workload: Workload): KernelSimReport["ioPhase"] {
  const w = workload.steady;
  if (w === null) return null;
  const ms = Math.round((w.endMs - w.startMs) * 1000) / 1000;
  return {
    ms,
    requests: w.requests,
    requestsPerSec: ms > 0 ? Math.round((w.requests / ms) * 1000) : 0,
  };
}

function printReport(r: KernelSimReport): void {
  const c = r.config;
  const q = r.requests;
  const lines: string[] = [];
  lines.push(
    `kernel-sim: ${c.logs} ${c.type} log(s) of ${c.regions} regions x ${c.regionSize} sectors, ` +
      `iodepth ${c.iodepth}, ${c.layout === "2009" ? "2009 layout" : `version ${c.version}`}` +
      `${c.integratedFlush ? ", integrated flush" : ""}, seed ${c.seed}`,
  );
  lines.push(
    `  requests   ${q.sent} sent, ${q.replied} answered (${q.errorReplies} errors), ${q.resends} resends, ` +
      `${q.timeouts} timeouts, ${q.esrch} ESRCH, ${q.reCtr} re-CTR, ${q.lateReplies} late, ${q.outstanding} unanswered`,
  );
  lines.push(
    `  rate       ${r.requestsPerSec} requests/s over ${(r.elapsedMs / 1000).toFixed(3)} s`,
  );
  if (r.ioPhase !== null) {
    lines.push(
      `  io phase   ${r.ioPhase.requestsPerSec} requests/s over ${
        (r.ioPhase.ms / 1000).toFixed(3)
      } s ` +
        `(every log doing I/O)`,
    );
  }
  lines.push(
    `  io         ${r.io.writes} writes, ${r.io.reads} reads, ${r.io.regionsRecovered} regions resynced`,
  );
  const f = r.flushLatencyUs;
  lines.push(`  FLUSH      p50 ${f.p50Us} us  p99 ${f.p99Us} us  max ${f.maxUs} us  (${f.count})`);
  for (const [name, l] of Object.entries(r.latencyUs)) {
    lines.push(
      `  ${name.padEnd(20)} ${
        String(l.count).padStart(8)
      }  p50 ${l.p50Us} us  p99 ${l.p99Us} us  max ${l.maxUs} us`,
    );
  }
  // Every log when few; else a tally and the ones that did not end well.
  const states = new Map<string, number>();
  for (const log of r.logs) {
    const key = `${log.state}/${log.phase}`;
    states.set(key, (states.get(key) ?? 0) + 1);
  }
  if (r.logs.length > MAX_LOGS_PRINTED) {
    lines.push(`  logs       ${[...states].map(([k, n]) => `${n} ${k}`).join(", ")}`);
  }
  for (const log of r.logs) {
    if (r.logs.length > MAX_LOGS_PRINTED && log.phase === "done") continue;
    lines.push(
      `  log ${log.uuid} ${log.state}, ${log.phase}, sync ${log.syncCount}/${log.regionCount}` +
        `${
          log.lastStatus === "" ? "" : `, status "${log.lastStatus}"`
        }, ${log.completed}/${log.submitted} bios`,
    );
  }
  lines.push(
    `  violations ${r.violations.total}${
      r.violations.total > 0 ? " " + JSON.stringify(r.violations.byKind) : ""
    }`,
  );
  for (const v of r.violations.first.slice(0, MAX_VIOLATIONS_PRINTED)) {
    lines.push(
      `    ${v.kind} ${v.uuid} seq ${v.seq} ${v.type} at ${v.atMs.toFixed(1)} ms: ${v.detail}`,
    );
  }
  if (r.driver.interrupted) lines.push("  INTERRUPTED by a signal");
  else if (!r.finished) lines.push("  NOT FINISHED: the run hit --max-run-ms");
  if (!r.driver.daemonSeen) {
    lines.push("  No daemon listened on NETLINK_CONNECTOR group 7 at the start");
  }
  lines.push(r.ok ? "  result     OK" : "  result     FAILED");
  console.log(lines.join("\n"));
}

function int(s: string, name: string, min: number, max: number): number {
  const n = Number(s);
  if (!/^[0-9]+$/.test(s.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(`${name} must be an integer from ${min} to ${max}, got "${s}"`);
  }
  return n;
}

function num(s: string, name: string, min: number, max: number): number {
  const n = Number(s);
  if (s.trim() === "" || !Number.isFinite(n) || n < min || n > max) {
    throw new UsageError(`${name} must be a number from ${min} to ${max}, got "${s}"`);
  }
  return n;
}

function oneOf<T>(s: string, name: string, options: Record<string, T>): T {
  if (!Object.hasOwn(options, s)) {
    throw new UsageError(`${name} must be one of ${Object.keys(options).join(", ")}, got "${s}"`);
  }
  return options[s];
}
