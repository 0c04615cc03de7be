/**
 * A pure model of the kernel's side of dm-log-userspace: the mirror target (dm-raid1.c), its
 * region hash (dm-region-hash.c), the userspace log (dm-log-userspace-base.c) and its transport
 * (dm-log-userspace-transfer.c), driven by a workload, with every answer checked by
 * {@link LogChecker}. No I/O, no clock: time comes in with each call (`now`, in ms), requests go
 * out through {@link KernelModel.takeOutgoing} and replies come in through
 * {@link KernelModel.onReply}. The netlink driver (src/sim/driver.ts) does the I/O; the cluster
 * simulator can run several models (one kernel per node) against its own transport.
 *
 * The kernel's blocking code paths are written as generators that yield what they wait for (a
 * reply, a sleep, a wait queue), so each one reads like the C function it follows:
 * - the mirror's worker (kmirrord, `do_mirror`): one request at a time per mirror, in the
 *   kernel's order (update states: SET_REGION_SYNC, clears, flush; recovery: GET_RESYNC_WORK,
 *   IN_SYNC, GET_SYNC_COUNT; reads: IN_SYNC; writes: IS_REMOTE_RECOVERING, IN_SYNC, marks, flush);
 * - the table's lifecycle (dmsetup create, suspend, resume, remove) on its own thread;
 * - status queries and the integrated-flush delayed work, each on its own thread.
 * `userspace_do_request` (the -ESRCH re-CTR, RESUME, retry sequence) and `dm_consult_userspace`
 * (15 s timeout and -EAGAIN resends, each with a new seq) wrap every request as in the kernel.
 *
 * @module
 */

import {
  Errno,
  type HeaderLayout,
  MAX_REGIONS_PER_REQUEST,
  RequestType,
} from "../kernel/protocol.ts";
import type { LogKind, SyncMode } from "../log/types.ts";
import { Call, CallKind, CallState, EMPTY, EXPECT_ERROR, EXPECT_ERROR_OR_DROP } from "./call.ts";
import { type CheckerConfig, LogChecker, type ReplyFacts, ViolationLog } from "./checker.ts";
import { Histogram, type LatencySummary } from "./histogram.ts";

/** Kernel constants and tunables (defaults are the kernel's). */
export interface KernelOptions {
  /** Request header layout: "current" (struct dm_ulog_request) or "2009" (the cluster-log patch). */
  layout: HeaderLayout;
  /** DM_ULOG_REQUEST_VERSION in the header (current layout): 3 on 6.1; 2 and 1 on older kernels. */
  version: number;
  /** DM_ULOG_RETRY_TIMEOUT: a try without reply is resent with a new seq after this. */
  timeoutMs: number;
  /** `userspace_do_request` sleeps this long before each re-CTR after -ESRCH. */
  esrchRetryMs: number;
  /** IS_REMOTE_RECOVERING is sent at most once per this interval, shared by all logs. */
  remoteRecoveringIntervalMs: number;
  /** `delayed_wake`: writes held back as "remote recovering" are retried after this. */
  delayedWakeMs: number;
  /** With integrated flush, a flush that only clears is sent this much later. */
  integratedFlushDelayMs: number;
  /** Probes and bad requests are not resent: each waits this long for its one reply. */
  probeTimeoutMs: number;
  /** Seq of the first request (the kernel's counter starts at 0 when the module loads). */
  firstSeq: number;
  /**
   * Time a data write or read takes on the legs. Must be positive: a bio that needs no log
   * request (a read or write of a region the region hash holds) would otherwise complete, and
   * be replaced by the workload, endlessly in no time.
   */
  ioLatencyMs: number;
  /** Time kcopyd takes to copy one region during resync. */
  recoveryLatencyMs: number;
  /** MAX_RECOVERY in dm-raid1.c: regions one mirror recovers at a time. */
  maxRecovery: number;
  /**
   * Not the kernel's: kernel tries answered after at least this long, or timed out, are listed
   * in {@link KernelModel.slow} (Infinity: none are).
   */
  slowRequestMs: number;
}

/** The kernel's values. */
export const KERNEL_DEFAULTS: KernelOptions = {
  layout: "current",
  version: 3,
  timeoutMs: 15_000,
  esrchRetryMs: 2_000,
  remoteRecoveringIntervalMs: 250,
  delayedWakeMs: 200,
  integratedFlushDelayMs: 3_000,
  probeTimeoutMs: 1_000,
  firstSeq: 0,
  ioLatencyMs: 0.001,
  recoveryLatencyMs: 0,
  maxRecovery: 1,
  slowRequestMs: Infinity,
};

/** One simulated mirror with a userspace log, as a table would create it. */
export interface MirrorSpec {
  uuid: string;
  /** The kernel's log pointer (current layout); must differ between logs of one uuid. */
  luid: bigint;
  kind: LogKind;
  /** Log device as written in the table (clustered-disk). */
  device?: string;
  /** Region size in sectors. */
  regionSize: number;
  /** Target length in sectors (region count = ceil(target / region size)). */
  targetSectors: number;
  sync: SyncMode;
  /** `integrated_flush` in the table (version >= 3): marks travel in the FLUSH. */
  integratedFlush: boolean;
  /** Checker: see {@link CheckerConfig.initialSync}. */
  initialSync: CheckerConfig["initialSync"];
  /** Checker: see {@link CheckerConfig.exclusive}. */
  exclusive: boolean;
  /** Checker: see {@link CheckerConfig.afterRestart}. */
  afterRestart: CheckerConfig["afterRestart"];
  /** Checker: see {@link CheckerConfig.statusDevice}. */
  statusDevice?: string;
  /** Checker: see {@link CheckerConfig.trackHolds}. */
  trackHolds?: boolean;
}

/** dmsetup-level operations on one mirror. */
export type Command = "create" | "suspend" | "resume" | "status" | "remove";

/** Life of one mirror as dmsetup sees it. */
export type MirrorState = "new" | "loaded" | "active" | "suspended" | "removed" | "failed";

/** What the model tells its user (the workload). All optional. */
export interface KernelHooks {
  /** A bio the workload submitted completed. */
  ioDone?(log: number, write: boolean, region: number, now: number): void;
  /** A command finished (`ok` false: it failed or was not possible in this state). */
  commandDone?(log: number, command: Command, ok: boolean, now: number): void;
  /** The mirror became in sync (GET_SYNC_COUNT reached the region count). */
  synced?(log: number, now: number): void;
  /** A timer set with {@link KernelModel.schedule} fired. */
  timer?(log: number, tag: number, now: number): void;
}

/** A reply as the codec decodes it (`decodeReply` in src/kernel/codec.ts, ok branch). */
export interface ModelReply extends ReplyFacts {
  seq: number;
  /** Positive errno (0 = success). */
  errno: number;
}

/** Deliberately bad requests (each must get an error reply). */
export const BadRequest = {
  /** IN_SYNC of a region past the end. */
  REGION_OUT_OF_RANGE: 0,
  /** IN_SYNC with a 4-byte payload. */
  SHORT_PAYLOAD: 1,
  /** MARK_REGION with 12 bytes (not a multiple of 8). */
  RAGGED_REGIONS: 2,
  /** SET_REGION_SYNC with 8 bytes instead of 16. */
  SHORT_SET_SYNC: 3,
  /** CLEAR_REGION of a region past the end. */
  CLEAR_OUT_OF_RANGE: 4,
  /** IN_SYNC for a log that was never constructed: must be -ESRCH. */
  UNKNOWN_LOG: 5,
  /** Request type 0 (no such type): an error, or dropped. */
  UNKNOWN_TYPE: 6,
} as const;

/** Number of {@link BadRequest} kinds. */
export const BAD_REQUEST_KINDS = 7;

/** Per-mirror summary. */
export interface MirrorSummary {
  uuid: string;
  luid: string;
  kind: LogKind;
  regionCount: number;
  state: MirrorState;
  /** The mirror saw GET_SYNC_COUNT reach the region count. */
  inSync: boolean;
  /** Last sync count answered. */
  syncCount: number;
  regionsRecovered: number;
  reads: number;
  writes: number;
  lastStatus: string;
}

/** A kernel try that took at least {@link KernelOptions.slowRequestMs}, or timed out. */
export interface SlowRequest {
  seq: number;
  /** Request type number. */
  type: number;
  /** Mirror index. */
  log: number;
  /** Model time it was sent, ms. */
  sentAt: number;
  /** Model time it was answered or timed out, ms. */
  doneAt: number;
  outcome: "reply" | "timeout";
  /** The reply's errno (0 for success and for a timeout). */
  errno: number;
}

/**
 * Most {@link SlowRequest}s kept; when full, the older half is dropped (and counted in
 * {@link KernelModel.slowDropped}), so a long run with a slow daemon keeps the latest ones.
 */
export const MAX_SLOW_REQUESTS = 8192;

/** Counters of one model. */
export interface KernelStats {
  /** Requests sent (every try), by type number (index 0: numbers that are no request type). */
  sent: number[];
  /** Replies matched to a waiting request, by type number. */
  replied: number[];
  /** Replies with an error (EAGAIN and ESRCH included). */
  errorReplies: number;
  /** Tries without a reply in time. */
  timeouts: number;
  /** Requests sent again (after a timeout or -EAGAIN). */
  resends: number;
  eagain: number;
  /** -ESRCH results (reply or failed send) that started a re-CTR sequence. */
  esrch: number;
  /** CTRs sent again after -ESRCH. */
  reCtr: number;
  /** Sends that failed (no daemon listening). */
  sendFailures: number;
  /** Replies to tries that had already timed out. */
  lateReplies: number;
  /** RESUME or PRESUSPEND/POSTSUSPEND/DTR that failed (the kernel only warns). */
  lifecycleFailures: number;
  /** Bios completed. */
  readsDone: number;
  writesDone: number;
  /** Regions copied by resync. */
  regionsRecovered: number;
}

// Region states, as in dm-region-hash.c.
const RH_CLEAN = 1;
const RH_DIRTY = 2;
const RH_NOSYNC = 4;
const RH_RECOVERING = 8;

// Timer kinds.
const T_THREAD = 0;
const T_IO_DONE = 1;
const T_RECOVERY_DONE = 2;
const T_DELAYED_WAKE = 3;
const T_FLUSH_WORK = 4;
const T_HOOK = 5;

/** Seq states remembered for duplicate and late reply detection. */
const SEQ_NONE = 0;
const SEQ_WAITING = 1;
const SEQ_REPLIED = 2;
const SEQ_TIMED_OUT = 3;
const SEQ_LATE = 4;
const SEQ_SEND_FAILED = 5;

/**
 * How many recent seqs are remembered (1 byte each): replies older than this many requests are
 * counted as late without telling duplicates apart.
 */
export const SEQ_MEMORY = 1 << 20;

/** Bytes of status text the kernel offers (the rest of dmsetup's status buffer; 1 KiB here). */
export const STATUS_REPLY_ROOM = 1024;

/** DM_NAME_LEN: room for the device name a first CTR may answer (version >= 2). */
export const CTR_REPLY_ROOM = 128;

/** Most timers one {@link KernelModel.advance} fires before returning to its caller. */
export const MAX_TIMERS_PER_ADVANCE = 65_536;

/** Most mirrors one model simulates. */
export const MAX_MIRRORS = 4096;

const encoder = new TextEncoder();

/**
 * Payloads are built and read little-endian (the link is host-endian, and every host this runs
 * on, x86_64 and aarch64, is little-endian).
 */
const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

class Bio {
  constructor(readonly log: number, readonly write: boolean, readonly region: number) {}
}

class Region {
  state = RH_CLEAN;
  pending = 0;
  delayed: Bio[] = [];
  constructor(readonly key: number) {}
}

/** A wait queue: threads wait on it and re-check their condition when notified. */
class Chan {
  waiters: Thread[] = [];
}

class Sleep {
  constructor(readonly until: number) {}
}

type Wait = Call | Chan | Sleep;
type Gen<T> = Generator<Wait, T, void>;

class Thread {
  queued = false;
  done = false;
  constructor(readonly name: string, readonly gen: Gen<void>) {}
}

interface Timer {
  at: number;
  order: number;
  kind: number;
  obj: unknown;
  n: number;
}

class Mirror {
  readonly checker: LogChecker;
  readonly regionCount: number;
  readonly ctrBytes: Uint8Array;
  readonly reCtrBytes: Uint8Array;
  state: MirrorState = "new";
  // dm-log-userspace's log context.
  inSyncHint = 0;
  schedFlush = false;
  flushTimerGeneration = 0;
  markList: number[] = [];
  clearList: number[] = [];
  // The 2009 patch kept one list of marks and clears, sent one region per request.
  legacyTypes: number[] = [];
  legacyRegions: number[] = [];
  // dm-region-hash.
  hash = new Map<number, Region>();
  clean = new Set<Region>();
  quiesced: Region[] = [];
  recovered: Region[] = [];
  recoveryTokens = 0;
  recoveryInFlight = 0;
  /** The region the last GET_RESYNC_WORK handed out. */
  resyncRegion = 0;
  // dm-raid1's mirror set.
  msInSync = false;
  logFailure = false;
  reads: Bio[] = [];
  writes: Bio[] = [];
  workPending = false;
  workerBusy = false;
  timerPending = false;
  timerGeneration = 0;
  dead = false;
  /** Bios mapped and not completed (what dm core waits for at suspend). */
  inflight = 0;
  /** Bios dm core holds back while the device is suspended. */
  held: Bio[] = [];
  ioBlocked = false;
  commands: Command[] = [];
  readonly workChan = new Chan();
  readonly idleChan = new Chan();
  readonly ioChan = new Chan();
  readonly recoveryChan = new Chan();
  readonly commandChan = new Chan();
  // Summary.
  syncCount = 0;
  regionsRecovered = 0;
  readsDone = 0;
  writesDone = 0;
  lastStatus = "";

  constructor(
    readonly index: number,
    readonly spec: MirrorSpec,
    readonly legacy: boolean,
    checker: LogChecker,
  ) {
    this.checker = checker;
    this.regionCount = checker.config.regionCount;
    const ctr = ctrString(spec, legacy);
    this.ctrBytes = encoder.encode(ctr);
    // The re-CTR counts the string's NUL (strlen + 1); the 2009 patch resent ctr_size bytes.
    this.reCtrBytes = legacy ? this.ctrBytes : encoder.encode(ctr + "\0");
  }
}

/**
 * The constructor string the kernel sends: `"<sectors> <type> [<dev>] <region_size> [sync|nosync]"`
 * (current; `integrated_flush` is removed by the kernel), or in the 2009 patch the type's own
 * arguments, uuid included, then the length: `"[<dev>] <region_size> <uuid> [sync|nosync] <sectors>"`.
 */
export function ctrString(spec: MirrorSpec, legacy: boolean): string {
  const sync = spec.sync === "default" ? "" : ` ${spec.sync}`;
  const dev = spec.kind === "clustered-disk" ? `${spec.device ?? ""} ` : "";
  if (legacy) return `${dev}${spec.regionSize} ${spec.uuid}${sync} ${spec.targetSectors}`;
  return `${spec.targetSectors} ${spec.kind} ${dev}${spec.regionSize}${sync}`;
}

/** The kernel model; see the module doc. */
export class KernelModel {
  readonly options: KernelOptions;
  readonly violations = new ViolationLog();
  readonly stats: KernelStats = {
    sent: new Array(18).fill(0),
    replied: new Array(18).fill(0),
    errorReplies: 0,
    timeouts: 0,
    resends: 0,
    eagain: 0,
    esrch: 0,
    reCtr: 0,
    sendFailures: 0,
    lateReplies: 0,
    lifecycleFailures: 0,
    readsDone: 0,
    writesDone: 0,
    regionsRecovered: 0,
  };
  /** Reply latency per request type (index = type number), microseconds. */
  readonly latency: Histogram[] = Array.from({ length: 18 }, () => new Histogram());
  /** Slow or timed-out kernel tries (see {@link KernelOptions.slowRequestMs}), oldest first. */
  readonly slow: SlowRequest[] = [];
  /** {@link SlowRequest}s dropped to stay within {@link MAX_SLOW_REQUESTS}. */
  slowDropped = 0;
  #hooks: KernelHooks;
  #legacy: boolean;
  #now = 0;
  #mirrors: Mirror[] = [];
  #nextSeq: number;
  #issued = 0;
  #seqState = new Uint8Array(SEQ_MEMORY);
  #calls = new Map<number, Call>();
  #outgoing: Call[] = [];
  #spare: Call[] = [];
  // Tries in send order: the kernel's timeouts are all equal, so deadlines come in order.
  #kernelTries: Call[] = [];
  #kernelTriesHead = 0;
  #probeTries: Call[] = [];
  #probeTriesHead = 0;
  #runQueue: Thread[] = [];
  #runHead = 0;
  #timers: Timer[] = [];
  #timerOrder = 0;
  #remoteRecoveringLimit = -Infinity;
  #threads = 0;

  /** A kernel with no mirrors yet; `options` override {@link KERNEL_DEFAULTS}. */
  constructor(options: Partial<KernelOptions> = {}, hooks: KernelHooks = {}) {
    if (!LITTLE_ENDIAN_HOST) {
      throw new Error("The kernel simulator supports little-endian hosts only");
    }
    this.options = { ...KERNEL_DEFAULTS, ...options };
    const o = this.options;
    if (o.layout === "current" && (!Number.isInteger(o.version) || o.version < 1)) {
      throw new RangeError(`Request version must be a positive integer, got ${o.version}`);
    }
    if (!(o.timeoutMs > 0) || !(o.probeTimeoutMs > 0)) {
      throw new RangeError("Timeouts must be positive");
    }
    if (!Number.isInteger(o.maxRecovery) || o.maxRecovery < 1) {
      throw new RangeError("maxRecovery must be >= 1");
    }
    if (!(o.ioLatencyMs > 0)) throw new RangeError("I/O latency must be positive");
    if (!(o.recoveryLatencyMs >= 0)) throw new RangeError("Recovery latency must be >= 0");
    this.#hooks = hooks;
    this.#legacy = o.layout === "2009";
    this.#nextSeq = o.firstSeq >>> 0;
  }

  /** Model time of the last event, ms. */
  get now(): number {
    return this.#now;
  }

  /** Number of mirrors. */
  get mirrorCount(): number {
    return this.#mirrors.length;
  }

  /** Requests sent and not yet answered, timed out or failed. */
  get outstanding(): number {
    return this.#calls.size;
  }

  /** Model time (ms) the oldest kernel try still waiting for its reply was sent, or null. */
  oldestWaiting(): number | null {
    let oldest: number | null = null;
    for (const c of this.#calls.values()) {
      if (c.kind === CallKind.KERNEL && (oldest === null || c.sentAt < oldest)) oldest = c.sentAt;
    }
    return oldest;
  }

  /** Kernel threads still alive (workers, lifecycles, status, flush work). */
  get threads(): number {
    return this.#threads;
  }

  /** Adds a mirror (not yet created: send it the "create" command). Returns its index. */
  addMirror(spec: MirrorSpec): number {
    if (this.#mirrors.length >= MAX_MIRRORS) throw new Error(`At most ${MAX_MIRRORS} mirrors`);
    if (!Number.isSafeInteger(spec.regionSize) || spec.regionSize < 1) {
      throw new RangeError(`Region size must be a positive integer, got ${spec.regionSize}`);
    }
    if (!Number.isSafeInteger(spec.targetSectors) || spec.targetSectors < 1) {
      throw new RangeError(`Target length must be a positive integer, got ${spec.targetSectors}`);
    }
    if (spec.integratedFlush && (this.#legacy || this.options.version < 3)) {
      throw new Error("Integrated flush needs the current layout and request version >= 3");
    }
    if (spec.kind === "clustered-disk" && (spec.device === undefined || spec.device === "")) {
      throw new Error("A clustered-disk log needs a device");
    }
    const regionCount = Math.ceil(spec.targetSectors / spec.regionSize);
    const checker = new LogChecker({
      uuid: spec.uuid,
      luid: spec.luid,
      layout: this.options.layout,
      version: this.options.version,
      kind: spec.kind,
      device: spec.device,
      regionSize: spec.regionSize,
      regionCount,
      sync: spec.sync,
      initialSync: spec.initialSync,
      exclusive: spec.exclusive,
      afterRestart: spec.afterRestart,
      statusDevice: spec.statusDevice,
      trackHolds: spec.trackHolds,
    }, this.violations);
    const m = new Mirror(this.#mirrors.length, spec, this.#legacy, checker);
    this.#mirrors.push(m);
    this.#spawn(`kmirrord/${m.index}`, this.#worker(m));
    this.#spawn(`dmsetup/${m.index}`, this.#lifecycle(m));
    return m.index;
  }

  /** The checker of mirror `log`. */
  checker(log: number): LogChecker {
    return this.#mirror(log).checker;
  }

  /** State of mirror `log`. */
  state(log: number): MirrorState {
    return this.#mirror(log).state;
  }

  /** True once mirror `log` saw its sync count reach the region count. */
  inSync(log: number): boolean {
    return this.#mirror(log).msInSync;
  }

  /** The sync count mirror `log` was last told (GET_SYNC_COUNT, from its worker or a status). */
  syncCount(log: number): number {
    return this.#mirror(log).syncCount;
  }

  /** Region count of mirror `log`. */
  regionCount(log: number): number {
    return this.#mirror(log).regionCount;
  }

  /**
   * Queues a dmsetup operation on mirror `log`. create, suspend, resume and remove run one after
   * another on the mirror's lifecycle thread; status runs at once on its own thread, like a
   * concurrent `dmsetup status`. {@link KernelHooks.commandDone} reports the end.
   */
  command(log: number, command: Command): void {
    const m = this.#mirror(log);
    if (command === "status") {
      this.#spawn(`status/${m.index}`, this.#statusThread(m));
    } else {
      m.commands.push(command);
      this.#notify(m.commandChan);
    }
  }

  /** Submits one bio (a write or a read of one region) to mirror `log`. */
  submitIo(log: number, write: boolean, region: number): void {
    const m = this.#mirror(log);
    if (!Number.isInteger(region) || region < 0 || region >= m.regionCount) {
      throw new RangeError(`Region ${region} is outside 0..${m.regionCount - 1}`);
    }
    const bio = new Bio(log, write, region);
    if (m.ioBlocked) m.held.push(bio);
    else this.#mapBio(m, bio);
  }

  /** Sends IS_CLEAN for `region` (the kernel never asks; the checker checks the answer). */
  probeClean(log: number, region: number): void {
    const m = this.#mirror(log);
    this.#spawn(`probe/${m.index}`, this.#probe(m, region));
  }

  /** Sends one deliberately bad request of kind `kind` ({@link BadRequest}) about mirror `log`. */
  sendBad(log: number, kind: number): void {
    const m = this.#mirror(log);
    this.#spawn(`bad/${m.index}`, this.#bad(m, kind));
  }

  /** Calls {@link KernelHooks.timer}(log, tag) at model time `at`. */
  schedule(at: number, log: number, tag: number): void {
    this.#addTimer(at, T_HOOK, null, log * 65536 + tag);
  }

  /** Earliest pending timer or timeout (ms), Infinity when none: the driver's next wake-up. */
  nextDeadline(): number {
    let t = this.#timers.length > 0 ? this.#timers[0].at : Infinity;
    const k = this.#firstWaiting(this.#kernelTries, this.#kernelTriesHead);
    if (k !== null && k.deadline < t) t = k.deadline;
    const p = this.#firstWaiting(this.#probeTries, this.#probeTriesHead);
    if (p !== null && p.deadline < t) t = p.deadline;
    return t;
  }

  /**
   * Runs timers and timeouts due by `now`, and every thread that can run; at most
   * {@link MAX_TIMERS_PER_ADVANCE} timers, after which {@link nextDeadline} is already due and
   * the caller comes back (bios that need no log request, e.g. reads of a region the hash
   * holds, can complete in zero model time forever).
   */
  advance(now: number): void {
    if (now > this.#now) this.#now = now;
    this.#expire(this.#kernelTries, true);
    this.#expire(this.#probeTries, false);
    let fired = 0;
    for (;;) {
      this.#runThreads();
      if (this.#timers.length === 0 || this.#timers[0].at > this.#now) break;
      if (fired >= MAX_TIMERS_PER_ADVANCE) break;
      while (
        this.#timers.length > 0 && this.#timers[0].at <= this.#now && fired < MAX_TIMERS_PER_ADVANCE
      ) {
        fired++;
        this.#fire(popTimer(this.#timers));
      }
    }
  }

  /**
   * Requests to send now, in order. The array is reused by the next call: send them before
   * calling again. The driver may set each call's `sentAt` to the real send time.
   */
  takeOutgoing(): Call[] {
    const out = this.#outgoing;
    this.#outgoing = this.#spare;
    this.#outgoing.length = 0;
    this.#spare = out;
    return out;
  }

  /** A reply arrived at `now`; it is matched on its seq like the kernel does. */
  onReply(reply: ModelReply, now: number): void {
    if (now > this.#now) this.#now = now;
    const seq = reply.seq >>> 0;
    const call = this.#calls.get(seq);
    if (call === undefined) return this.#strayReply(reply, seq);
    this.#calls.delete(seq);
    this.#seqState[seq & (SEQ_MEMORY - 1)] = SEQ_REPLIED;
    this.stats.replied[typeIndex(call.type)]++;
    this.latency[typeIndex(call.type)].record((this.#now - call.sentAt) * 1000);
    if (call.kind === CallKind.KERNEL && this.#now - call.sentAt >= this.options.slowRequestMs) {
      this.#slow(call, "reply", reply.errno);
    }
    // The kernel's reading: an ACK carries only an errno; a full reply with more data than the
    // buffer fails with -ENOSPC.
    let facts: ReplyFacts = reply;
    if (reply.kind === "full" && reply.data.length > call.cap) {
      facts = { ...reply, data: EMPTY, overCapacity: true };
      call.errno = Errno.ENOSPC;
      call.capAfter = 0;
    } else {
      call.errno = reply.errno;
      call.capAfter = reply.kind === "full"
        ? reply.data.length
        : reply.errno === Errno.EAGAIN
        ? call.cap
        : 0;
    }
    if (call.errno !== 0) this.stats.errorReplies++;
    call.state = CallState.REPLIED;
    this.#mirrors[call.logIndex].checker.onReply(call, facts, this.#now);
    this.#complete(call);
    this.#runThreads();
  }

  /** Sending `seq` failed with positive `errno` (ESRCH: nobody listens on the group). */
  onSendError(seq: number, errno: number, now: number): void {
    if (now > this.#now) this.#now = now;
    const call = this.#calls.get(seq >>> 0);
    if (call === undefined) return;
    this.#calls.delete(seq >>> 0);
    this.#seqState[seq & (SEQ_MEMORY - 1)] = SEQ_SEND_FAILED;
    this.stats.sendFailures++;
    call.capAfter = call.cap; // dm_consult_userspace leaves the reply size alone on a failed send
    call.state = CallState.SEND_FAILED;
    call.errno = errno;
    this.#complete(call);
    this.#runThreads();
  }

  /** A datagram that the kernel would drop arrived (the driver could not decode it). */
  onUndecodable(reason: string, now: number): void {
    if (now > this.#now) this.#now = now;
    this.violations.add({
      kind: "undecodable-reply",
      uuid: "",
      seq: -1,
      type: "",
      detail: reason,
      atMs: this.#now,
    });
  }

  /**
   * Ends the run at `now`: every request still waiting and every mirror not removed is
   * reported ("incomplete"), so a stuck run never passes silently.
   */
  finish(now: number, expectRemoved: boolean): void {
    if (now > this.#now) this.#now = now;
    for (const call of this.#calls.values()) {
      this.#mirrors[call.logIndex].checker.violation(
        "incomplete",
        call,
        `Still waiting for a reply at the end (sent at ${call.sentAt.toFixed(1)} ms)`,
        this.#now,
      );
    }
    if (!expectRemoved) return;
    for (const m of this.#mirrors) {
      if (m.state !== "removed" && m.state !== "failed") {
        m.checker.violation("incomplete", null, `Mirror still ${m.state} at the end`, this.#now);
      }
    }
  }

  /** Per-mirror summaries. */
  mirrors(): MirrorSummary[] {
    return this.#mirrors.map((m) => ({
      uuid: m.spec.uuid,
      luid: "0x" + m.spec.luid.toString(16),
      kind: m.spec.kind,
      regionCount: m.regionCount,
      state: m.state,
      inSync: m.msInSync,
      syncCount: m.syncCount,
      regionsRecovered: m.regionsRecovered,
      reads: m.readsDone,
      writes: m.writesDone,
      lastStatus: m.lastStatus,
    }));
  }

  /** Latency summaries of every type with replies, by type name. */
  latencySummaries(names: (type: number) => string): Record<string, LatencySummary> {
    const out: Record<string, LatencySummary> = {};
    for (let t = 0; t < this.latency.length; t++) {
      if (this.latency[t].count > 0) out[names(t)] = this.latency[t].summary();
    }
    return out;
  }

  // ------------------------------------------------------------------------------------------
  // Scheduler

  #mirror(log: number): Mirror {
    const m = this.#mirrors[log];
    if (m === undefined) throw new RangeError(`No mirror ${log}`);
    return m;
  }

  #spawn(name: string, gen: Gen<void>): void {
    const t = new Thread(name, gen);
    this.#threads++;
    this.#ready(t);
  }

  #ready(t: Thread): void {
    if (t.queued || t.done) return;
    t.queued = true;
    this.#runQueue.push(t);
  }

  #notify(chan: Chan): void {
    if (chan.waiters.length === 0) return;
    const waiters = chan.waiters;
    chan.waiters = [];
    for (const t of waiters) this.#ready(t);
  }

  #runThreads(): void {
    const q = this.#runQueue;
    while (this.#runHead < q.length) {
      const t = q[this.#runHead++];
      t.queued = false;
      const r = t.gen.next();
      if (r.done === true) {
        t.done = true;
        this.#threads--;
        continue;
      }
      const w = r.value;
      if (w instanceof Call) w.waiter = t;
      else if (w instanceof Chan) w.waiters.push(t);
      else this.#addTimer(w.until, T_THREAD, t, 0);
    }
    q.length = 0;
    this.#runHead = 0;
  }

  #addTimer(at: number, kind: number, obj: unknown, n: number): void {
    pushTimer(this.#timers, { at, order: this.#timerOrder++, kind, obj, n });
  }

  #fire(timer: Timer): void {
    switch (timer.kind) {
      case T_THREAD:
        return this.#ready(timer.obj as Thread);
      case T_IO_DONE:
        return this.#endIo(timer.obj as Bio);
      case T_RECOVERY_DONE: {
        // dm_rh_recovery_end: onto the recovered list, wake the worker.
        const m = this.#mirrors[timer.n];
        m.recovered.push(timer.obj as Region);
        return this.#wake(m);
      }
      case T_DELAYED_WAKE: {
        const m = timer.obj as Mirror;
        if (timer.n !== m.timerGeneration) return;
        m.timerPending = false;
        return this.#wake(m);
      }
      case T_FLUSH_WORK: {
        const m = timer.obj as Mirror;
        if (timer.n !== m.flushTimerGeneration || !m.schedFlush || m.dead) return;
        return this.#spawn(`dmlogd/${m.index}`, this.#flushWork(m));
      }
      case T_HOOK:
        return this.#hooks.timer?.(Math.floor(timer.n / 65536), timer.n % 65536, this.#now);
    }
  }

  // ------------------------------------------------------------------------------------------
  // Transport: dm_consult_userspace, userspace_do_request

  #newCall(m: Mirror, type: number, payload: Uint8Array, cap: number): Call {
    const c = new Call();
    c.layout = this.options.layout;
    c.luid = this.#legacy ? 0n : m.spec.luid;
    c.uuid = m.spec.uuid;
    c.version = this.#legacy ? 0 : this.options.version;
    c.type = type;
    c.payload = payload;
    c.cap = cap;
    c.capAfter = cap;
    c.logIndex = m.index;
    return c;
  }

  #send(c: Call, probe: boolean): void {
    c.seq = this.#nextSeq;
    this.#nextSeq = (this.#nextSeq + 1) >>> 0;
    this.#issued++;
    this.#seqState[c.seq & (SEQ_MEMORY - 1)] = SEQ_WAITING;
    c.sentAt = this.#now;
    c.deadline = this.#now + (probe ? this.options.probeTimeoutMs : this.options.timeoutMs);
    c.state = CallState.WAITING;
    this.#mirrors[c.logIndex].checker.onSend(c);
    this.stats.sent[typeIndex(c.type)]++;
    this.#calls.set(c.seq, c);
    this.#outgoing.push(c);
    if (probe) this.#probeTries.push(c);
    else this.#kernelTries.push(c);
  }

  /**
   * dm_consult_userspace: send, wait; on timeout or -EAGAIN send again with a new seq. Returns
   * the answered (or failed-to-send) call.
   */
  *#consult(
    m: Mirror,
    type: number,
    payload: Uint8Array,
    cap: number,
    region: number,
    regions: number[] | null,
    reCtr: boolean,
  ): Gen<Call> {
    for (;;) {
      const c = this.#newCall(m, type, payload, cap);
      c.region = region;
      c.regions = regions;
      c.reCtr = reCtr;
      if (type === RequestType.SET_REGION_SYNC) c.v0 = payload[8]; // in_sync value, for the checker
      this.#send(c, false);
      yield c;
      if (c.state === CallState.TIMED_OUT) {
        this.stats.timeouts++;
        this.stats.resends++;
        continue;
      }
      if (c.state === CallState.REPLIED && c.errno === Errno.EAGAIN) {
        this.stats.eagain++;
        this.stats.resends++;
        cap = c.capAfter; // the same reply-size variable, as fill_pkg left it
        continue;
      }
      return c;
    }
  }

  /**
   * userspace_do_request: on -ESRCH (the daemon lost the log or is gone) sleep, resend the saved
   * CTR until it succeeds, RESUME, then the original request again.
   */
  *#request(
    m: Mirror,
    type: number,
    payload: Uint8Array,
    cap: number,
    region: number,
    regions: number[] | null,
  ): Gen<Call> {
    for (;;) {
      const c = yield* this.#consult(m, type, payload, cap, region, regions, false);
      if (c.errno !== Errno.ESRCH) return c;
      // The retry below reuses the caller's reply-size variable as the -ESRCH reply left it: a
      // daemon that answers an error with data_size 0 leaves the retry no room (the real 6.1
      // kernel then logs "Insufficient space to receive package" and fails the call).
      cap = c.capAfter;
      this.stats.esrch++;
      m.checker.onRestart(c);
      for (;;) {
        yield new Sleep(this.#now + this.options.esrchRetryMs);
        this.stats.reCtr++;
        const ctr = yield* this.#consult(m, RequestType.CTR, m.reCtrBytes, 0, -1, null, true);
        if (ctr.errno === 0) break;
      }
      const resume = yield* this.#consult(m, RequestType.RESUME, EMPTY, 0, -1, null, false);
      if (resume.errno !== 0) return c;
    }
  }

  #complete(c: Call): void {
    const t = c.waiter as Thread | null;
    c.waiter = null;
    if (t !== null) this.#ready(t);
  }

  #firstWaiting(list: Call[], head: number): Call | null {
    for (let i = head; i < list.length; i++) {
      if (list[i].state === CallState.WAITING) return list[i];
    }
    return null;
  }

  #expire(list: Call[], kernel: boolean): void {
    let head = kernel ? this.#kernelTriesHead : this.#probeTriesHead;
    while (head < list.length) {
      const c = list[head];
      if (c.state === CallState.WAITING) {
        if (c.deadline > this.#now) break;
        this.#calls.delete(c.seq);
        this.#seqState[c.seq & (SEQ_MEMORY - 1)] = SEQ_TIMED_OUT;
        c.state = CallState.TIMED_OUT;
        this.#mirrors[c.logIndex].checker.onTimeout(c, this.#now);
        if (!kernel) this.stats.timeouts++;
        if (kernel && this.options.slowRequestMs < Infinity) this.#slow(c, "timeout", 0);
        this.#complete(c);
      }
      head++;
    }
    // Compact now and then so the arrays stay as small as the tries in flight.
    if (head > 1024 && head * 2 > list.length) {
      list.splice(0, head);
      head = 0;
    }
    if (kernel) this.#kernelTriesHead = head;
    else this.#probeTriesHead = head;
  }

  #slow(c: Call, outcome: SlowRequest["outcome"], errno: number): void {
    if (this.slow.length >= MAX_SLOW_REQUESTS) {
      const drop = MAX_SLOW_REQUESTS / 2;
      this.slow.splice(0, drop);
      this.slowDropped += drop;
    }
    this.slow.push({
      seq: c.seq,
      type: c.type,
      log: c.logIndex,
      sentAt: c.sentAt,
      doneAt: this.#now,
      outcome,
      errno,
    });
  }

  #strayReply(reply: ModelReply, seq: number): void {
    const dist = (this.#nextSeq - seq) >>> 0;
    const idx = seq & (SEQ_MEMORY - 1);
    const known = dist >= 1 && dist <= this.#issued;
    const state = known && dist <= SEQ_MEMORY ? this.#seqState[idx] : SEQ_NONE;
    if (known && dist > SEQ_MEMORY) {
      this.stats.lateReplies++;
    } else if (state === SEQ_TIMED_OUT) {
      this.#seqState[idx] = SEQ_LATE;
      this.stats.lateReplies++;
    } else if (state === SEQ_REPLIED || state === SEQ_LATE) {
      this.violations.add({
        kind: "duplicate-reply",
        uuid: reply.uuid ?? "",
        seq,
        type: "",
        detail: `A second reply to seq ${seq} (errno ${reply.errno}, ${reply.data.length} bytes)`,
        atMs: this.#now,
      });
    } else {
      this.violations.add({
        kind: "unknown-seq",
        uuid: reply.uuid ?? "",
        seq,
        type: "",
        detail: state === SEQ_SEND_FAILED
          ? `Reply to seq ${seq}, whose send had failed`
          : `Reply to seq ${seq}, which was never sent (next seq ${this.#nextSeq})`,
        atMs: this.#now,
      });
    }
  }

  // ------------------------------------------------------------------------------------------
  // The log (dm-log-userspace-base.c)

  /** userspace_in_sync: 1, 0, or 0 on any failure. */
  *#inSync(m: Mirror, region: number): Gen<number> {
    const c = yield* this.#request(m, RequestType.IN_SYNC, u64s1(region), 8, region, null);
    return c.errno !== 0 ? 0 : c.v0;
  }

  /** userspace_is_remote_recovering (rate limited across every log of the kernel). */
  *#isRemoteRecovering(m: Mirror, region: number): Gen<boolean> {
    if (region < m.inSyncHint) return false;
    if (this.#remoteRecoveringLimit > this.#now) return true;
    this.#remoteRecoveringLimit = this.#now + this.options.remoteRecoveringIntervalMs;
    const c = yield* this.#request(
      m,
      RequestType.IS_REMOTE_RECOVERING,
      u64s1(region),
      16,
      region,
      null,
    );
    if (c.errno !== 0) return true;
    m.inSyncHint = c.v1;
    return c.v0 !== 0;
  }

  /** userspace_get_resync_work: 1 and the region, 0, or a negative errno. */
  *#getResyncWork(m: Mirror): Gen<number> {
    if (m.inSyncHint >= m.regionCount) return 0;
    const c = yield* this.#request(m, RequestType.GET_RESYNC_WORK, EMPTY, 16, -1, null);
    if (c.errno !== 0) return -c.errno;
    if (c.v0 === 1 && (c.v1 >= m.regionCount || !Number.isSafeInteger(c.v1))) {
      // The real kernel would copy past the device's end; the checker reported it. Carry on.
      return 0;
    }
    m.resyncRegion = c.v1;
    return c.v0;
  }

  /** userspace_get_sync_count (0 on failure; sets the hint when complete). */
  *#getSyncCount(m: Mirror): Gen<number> {
    const c = yield* this.#request(m, RequestType.GET_SYNC_COUNT, EMPTY, 8, -1, null);
    if (c.errno !== 0) return 0;
    m.syncCount = c.v0;
    if (c.v0 >= m.regionCount) m.inSyncHint = m.regionCount;
    return c.v0;
  }

  *#setRegionSync(m: Mirror, region: number, inSync: boolean): Gen<void> {
    const p = new Uint8Array(16);
    putU64(p, 0, region);
    p[8] = inSync ? 1 : 0;
    yield* this.#request(m, RequestType.SET_REGION_SYNC, p, 0, region, null);
  }

  #markRegion(m: Mirror, region: number): void {
    if (this.#legacy) {
      m.legacyTypes.push(RequestType.MARK_REGION);
      m.legacyRegions.push(region);
    } else {
      m.markList.push(region);
    }
  }

  #clearRegion(m: Mirror, region: number): void {
    if (this.#legacy) {
      m.legacyTypes.push(RequestType.CLEAR_REGION);
      m.legacyRegions.push(region);
    } else {
      m.clearList.push(region);
    }
  }

  /**
   * userspace_flush: clear groups, then mark groups (or integrated FLUSHes carrying the marks),
   * then FLUSH. Returns 0 or a positive errno.
   */
  *#flush(m: Mirror): Gen<number> {
    if (this.#legacy) return yield* this.#legacyFlush(m);
    if (m.markList.length === 0 && m.clearList.length === 0) return 0;
    // mark_region and clear_region add at the list head: the lists run newest first.
    const marks = m.markList.reverse();
    const clears = m.clearList.reverse();
    m.markList = [];
    m.clearList = [];
    let r = yield* this.#flushByGroup(m, clears, RequestType.CLEAR_REGION, false);
    if (r !== 0) return r;
    if (!m.spec.integratedFlush) {
      r = yield* this.#flushByGroup(m, marks, RequestType.MARK_REGION, false);
      if (r !== 0) return r;
      const c = yield* this.#request(m, RequestType.FLUSH, EMPTY, 0, -1, null);
      return c.errno;
    }
    r = yield* this.#flushByGroup(m, marks, RequestType.FLUSH, true);
    if (r !== 0) return r;
    if (marks.length === 0 && !m.schedFlush) {
      // Only clears: their FLUSH can wait (nothing is written before it).
      m.schedFlush = true;
      this.#addTimer(
        this.#now + this.options.integratedFlushDelayMs,
        T_FLUSH_WORK,
        m,
        ++m.flushTimerGeneration,
      );
    } else {
      // As the kernel does: cancel the scheduled flush (also when this flush only cleared).
      m.flushTimerGeneration++;
      m.schedFlush = false;
    }
    return 0;
  }

  /** flush_by_group: up to 32 regions per request; a failed group is retried one by one. */
  *#flushByGroup(m: Mirror, list: number[], type: number, withPayload: boolean): Gen<number> {
    for (let i = 0; i < list.length;) {
      const n = Math.min(MAX_REGIONS_PER_REQUEST, list.length - i);
      const group = list.slice(i, i + n);
      const c = yield* this.#request(m, type, u64s(group), 0, -1, group);
      if (c.errno !== 0) {
        if (withPayload) return c.errno;
        // flush_one_by_one over this group and everything after it.
        for (let j = i; j < list.length; j++) {
          const one = [list[j]];
          const d = yield* this.#request(m, type, u64s(one), 0, -1, one);
          if (d.errno !== 0) return d.errno;
        }
        return 0;
      }
      i += n;
    }
    return 0;
  }

  /** cluster_flush of the 2009 patch: every mark and clear alone, newest first, then FLUSH. */
  *#legacyFlush(m: Mirror): Gen<number> {
    if (m.legacyTypes.length === 0) return 0;
    const types = m.legacyTypes.reverse();
    const regions = m.legacyRegions.reverse();
    m.legacyTypes = [];
    m.legacyRegions = [];
    for (let i = 0; i < types.length; i++) {
      const one = [regions[i]];
      const c = yield* this.#request(m, types[i], u64s(one), 0, -1, one);
      if (c.errno !== 0) return c.errno;
    }
    const c = yield* this.#request(m, RequestType.FLUSH, EMPTY, 0, -1, null);
    return c.errno;
  }

  /** The integrated-flush delayed work (do_flush). */
  *#flushWork(m: Mirror): Gen<void> {
    m.schedFlush = false;
    yield* this.#request(m, RequestType.FLUSH, EMPTY, 0, -1, null);
  }

  // ------------------------------------------------------------------------------------------
  // The region hash (dm-region-hash.c)

  /** __rh_find: the region's entry, allocated (asking IN_SYNC) when absent. */
  *#rhFind(m: Mirror, key: number): Gen<Region> {
    const found = m.hash.get(key);
    if (found !== undefined) return found;
    const inSync = yield* this.#inSync(m, key);
    const again = m.hash.get(key);
    if (again !== undefined) return again; // lost the race
    const reg = new Region(key);
    reg.state = inSync === 1 ? RH_CLEAN : RH_NOSYNC;
    m.hash.set(key, reg);
    if (reg.state === RH_CLEAN) m.clean.add(reg);
    return reg;
  }

  /** dm_rh_get_state: the hash's state, else the log's answer (not entered in the hash). */
  *#getState(m: Mirror, key: number): Gen<number> {
    const reg = m.hash.get(key);
    if (reg !== undefined) return reg.state;
    const r = yield* this.#inSync(m, key);
    return r === 1 ? RH_CLEAN : RH_NOSYNC;
  }

  /** rh_inc: one more write pending; a clean region becomes dirty and is marked. */
  *#rhInc(m: Mirror, key: number): Gen<void> {
    const reg = yield* this.#rhFind(m, key);
    reg.pending++;
    if (reg.state === RH_CLEAN) {
      reg.state = RH_DIRTY;
      m.clean.delete(reg);
      this.#markRegion(m, key);
    }
  }

  /** dm_rh_dec: the last write of a region done: dirty becomes clean (cleared later). */
  #rhDec(m: Mirror, key: number): void {
    const reg = m.hash.get(key);
    if (reg === undefined) {
      throw new Error(`Region ${key} completed a write but is not in the hash`);
    }
    if (--reg.pending > 0) return;
    if (reg.state === RH_RECOVERING) m.quiesced.push(reg);
    else if (reg.state === RH_DIRTY) {
      reg.state = RH_CLEAN;
      m.clean.add(reg);
    }
    this.#wake(m);
  }

  /** dm_rh_update_states: recovered regions are set in sync, clean ones cleared; then flush. */
  *#updateStates(m: Mirror): Gen<void> {
    let clean: Region[] | null = null;
    let recovered: Region[] | null = null;
    if (m.clean.size > 0) {
      clean = [...m.clean].reverse();
      m.clean.clear();
      for (const reg of clean) m.hash.delete(reg.key);
    }
    if (m.recovered.length > 0) {
      recovered = m.recovered.reverse();
      m.recovered = [];
      for (const reg of recovered) m.hash.delete(reg.key);
    }
    if (recovered !== null) {
      for (const reg of recovered) {
        this.#clearRegion(m, reg.key);
        yield* this.#completeResyncWork(m, reg);
      }
    }
    if (clean !== null) { for (const reg of clean) this.#clearRegion(m, reg.key); }
    const r = yield* this.#flush(m);
    if (r !== 0) m.logFailure = true;
  }

  *#completeResyncWork(m: Mirror, reg: Region): Gen<void> {
    yield* this.#setRegionSync(m, reg.key, true);
    m.regionsRecovered++;
    this.stats.regionsRecovered++;
    if (reg.delayed.length > 0) {
      // dispatch_bios: the writes held during recovery go back to the worker.
      for (const bio of reg.delayed) m.writes.push(bio);
      reg.delayed = [];
      this.#wake(m);
    }
    m.recoveryInFlight--;
    m.recoveryTokens++;
    this.#notify(m.recoveryChan);
  }

  // ------------------------------------------------------------------------------------------
  // The mirror (dm-raid1.c)

  #wake(m: Mirror): void {
    if (m.dead) return;
    m.workPending = true;
    this.#notify(m.workChan);
  }

  #delayedWake(m: Mirror): void {
    if (m.timerPending || m.dead) return;
    m.timerPending = true;
    this.#addTimer(this.#now + this.options.delayedWakeMs, T_DELAYED_WAKE, m, m.timerGeneration);
  }

  #mapBio(m: Mirror, bio: Bio): void {
    m.inflight++;
    // mirror_map: a write is queued; a read asks in_sync(can_block=0), which a userspace log
    // always answers "would block", so it is queued too.
    if (bio.write) m.writes.push(bio);
    else m.reads.push(bio);
    this.#wake(m);
  }

  #endIo(bio: Bio): void {
    const m = this.#mirrors[bio.log];
    if (bio.write) {
      this.#rhDec(m, bio.region);
      m.writesDone++;
      this.stats.writesDone++;
    } else {
      m.readsDone++;
      this.stats.readsDone++;
    }
    m.inflight--;
    this.#notify(m.ioChan);
    this.#hooks.ioDone?.(bio.log, bio.write, bio.region, this.#now);
  }

  #issue(bio: Bio): void {
    this.#addTimer(this.#now + this.options.ioLatencyMs, T_IO_DONE, bio, 0);
  }

  /** kmirrord: one do_mirror pass per wake. */
  *#worker(m: Mirror): Gen<void> {
    for (;;) {
      while (!m.workPending) {
        if (m.dead) return;
        yield m.workChan;
      }
      m.workPending = false;
      m.workerBusy = true;
      const reads = m.reads;
      const writes = m.writes;
      m.reads = [];
      m.writes = [];
      yield* this.#updateStates(m);
      yield* this.#doRecovery(m);
      yield* this.#doReads(m, reads);
      yield* this.#doWrites(m, writes);
      m.workerBusy = false;
      this.#notify(m.idleChan);
    }
  }

  *#doRecovery(m: Mirror): Gen<void> {
    // dm_rh_recovery_prepare (with its extra reference against a concurrent stop).
    m.recoveryInFlight++;
    while (m.recoveryTokens > 0) {
      m.recoveryTokens--;
      m.recoveryInFlight++;
      const r = yield* this.#getResyncWork(m);
      if (r <= 0) {
        m.recoveryInFlight--;
        m.recoveryTokens++;
        break;
      }
      const reg = yield* this.#rhFind(m, m.resyncRegion);
      reg.state = RH_RECOVERING;
      m.clean.delete(reg);
      if (reg.pending === 0) m.quiesced.push(reg);
    }
    if (--m.recoveryInFlight === 0) this.#notify(m.recoveryChan);
    // dm_rh_recovery_start: copy the quiesced regions.
    while (m.quiesced.length > 0) {
      const reg = m.quiesced.shift()!;
      this.#addTimer(this.#now + this.options.recoveryLatencyMs, T_RECOVERY_DONE, reg, m.index);
    }
    if (!m.msInSync) {
      const count = yield* this.#getSyncCount(m);
      if (count === m.regionCount) {
        m.msInSync = true;
        this.#hooks.synced?.(m.index, this.#now);
      }
    }
  }

  *#doReads(m: Mirror, reads: Bio[]): Gen<void> {
    for (const bio of reads) {
      // region_in_sync decides which leg may serve it; the model only needs the question asked.
      yield* this.#getState(m, bio.region);
      this.#issue(bio);
    }
  }

  *#doWrites(m: Mirror, writes: Bio[]): Gen<void> {
    if (writes.length === 0) return;
    const sync: Bio[] = [];
    const nosync: Bio[] = [];
    const recover: Bio[] = [];
    let requeue = false;
    for (const bio of writes) {
      if (yield* this.#isRemoteRecovering(m, bio.region)) {
        m.writes.push(bio);
        requeue = true;
        continue;
      }
      const state = yield* this.#getState(m, bio.region);
      if (state === RH_NOSYNC) nosync.push(bio);
      else if (state === RH_RECOVERING) recover.push(bio);
      else sync.push(bio);
    }
    if (requeue) this.#delayedWake(m);
    for (const bio of sync) yield* this.#rhInc(m, bio.region);
    for (const bio of nosync) yield* this.#rhInc(m, bio.region);
    const r = yield* this.#flush(m);
    if (r !== 0) m.logFailure = true;
    for (const bio of sync) this.#issue(bio);
    for (const bio of recover) {
      // dm_rh_delay: wait in the region until its recovery is done.
      const reg = m.hash.get(bio.region);
      if (reg === undefined) m.writes.push(bio);
      else reg.delayed.push(bio);
    }
    for (const bio of nosync) this.#issue(bio);
  }

  // ------------------------------------------------------------------------------------------
  // Lifecycle (dmsetup), status, probes

  *#lifecycle(m: Mirror): Gen<void> {
    for (;;) {
      while (m.commands.length === 0) {
        if (m.state === "removed" || m.state === "failed") return;
        yield m.commandChan;
      }
      const command = m.commands.shift()!;
      let ok: boolean;
      switch (command) {
        case "create":
          ok = yield* this.#create(m);
          break;
        case "suspend":
          ok = yield* this.#suspend(m);
          break;
        case "resume":
          ok = yield* this.#resume(m);
          break;
        case "remove":
          ok = yield* this.#remove(m);
          break;
        default:
          ok = false;
      }
      this.#hooks.commandDone?.(m.index, command, ok, this.#now);
      if (m.state === "removed" || m.state === "failed") {
        // Anything queued after the end fails.
        for (const c of m.commands.splice(0)) {
          this.#hooks.commandDone?.(m.index, c, false, this.#now);
        }
        return;
      }
    }
  }

  /** Table load (userspace_ctr, mirror_ctr), then resume. */
  *#create(m: Mirror): Gen<boolean> {
    if (m.state !== "new") return false;
    const cap = !this.#legacy && this.options.version >= 2 ? CTR_REPLY_ROOM : 0;
    const ctr = yield* this.#consult(m, RequestType.CTR, m.ctrBytes, cap, -1, null, false);
    if (ctr.errno !== 0) return this.#createFailed(m, ctr);
    if (!this.#legacy) {
      // userspace_ctr asks once; the 2009 patch knew it from the table.
      const rs = yield* this.#consult(m, RequestType.GET_REGION_SIZE, EMPTY, 8, -1, null, false);
      if (rs.errno !== 0) return this.#createFailed(m, rs);
    }
    m.state = "loaded";
    // mirror_ctr wakes the worker: its first pass asks GET_SYNC_COUNT before the resume.
    this.#wake(m);
    while (m.workPending || m.workerBusy) yield m.idleChan;
    return yield* this.#resume(m);
  }

  /** The table load failed (dmsetup create would fail): never silent, even with no daemon. */
  #createFailed(m: Mirror, c: Call): false {
    m.state = "failed";
    m.dead = true;
    this.#notify(m.workChan);
    const why = c.state === CallState.SEND_FAILED ? "could not be sent" : "was answered";
    m.checker.violation(
      "create-failed",
      c,
      `The table load failed: the request ${why} with errno ${c.errno}`,
      this.#now,
    );
    return false;
  }

  /** mirror_resume: log resume (RESUME, hint reset), then recovery starts. */
  *#resume(m: Mirror): Gen<boolean> {
    if (m.state !== "loaded" && m.state !== "suspended") return false;
    m.inSyncHint = 0;
    const c = yield* this.#consult(m, RequestType.RESUME, EMPTY, 0, -1, null, false);
    if (c.errno !== 0) this.stats.lifecycleFailures++;
    m.recoveryTokens += this.options.maxRecovery;
    this.#notify(m.recoveryChan);
    this.#wake(m);
    m.state = "active";
    m.ioBlocked = false;
    for (const bio of m.held.splice(0)) this.#mapBio(m, bio);
    return c.errno === 0;
  }

  /**
   * dm suspend: mirror_presuspend (stop recovery, PRESUSPEND, flush the worker), wait for the
   * I/O in flight, then postsuspend (run a scheduled integrated flush now, POSTSUSPEND). The
   * worker may still clear and flush regions whose writes just ended, as in the kernel.
   */
  *#suspend(m: Mirror): Gen<boolean> {
    if (m.state !== "active") return false;
    for (let i = 0; i < this.options.maxRecovery; i++) {
      while (m.recoveryTokens === 0) yield m.recoveryChan;
      m.recoveryTokens--;
    }
    while (m.recoveryInFlight > 0) yield m.recoveryChan;
    const pre = yield* this.#consult(m, RequestType.PRESUSPEND, EMPTY, 0, -1, null, false);
    if (pre.errno !== 0) this.stats.lifecycleFailures++;
    while (m.workPending || m.workerBusy) yield m.idleChan;
    // __dm_suspend: only now are new bios held back; then the ones in flight are waited for.
    m.ioBlocked = true;
    while (m.inflight > 0) yield m.ioChan;
    yield* this.#runScheduledFlush(m);
    const post = yield* this.#consult(m, RequestType.POSTSUSPEND, EMPTY, 0, -1, null, false);
    if (post.errno !== 0) this.stats.lifecycleFailures++;
    m.state = "suspended";
    return pre.errno === 0 && post.errno === 0;
  }

  *#runScheduledFlush(m: Mirror): Gen<void> {
    if (!m.spec.integratedFlush || !m.schedFlush) return;
    m.flushTimerGeneration++;
    yield* this.#flushWork(m);
  }

  /** dmsetup remove: suspend if active, stop the worker, then DTR. */
  *#remove(m: Mirror): Gen<boolean> {
    let ok = true;
    if (m.state === "active") ok = yield* this.#suspend(m);
    if (m.state !== "loaded" && m.state !== "suspended") return false;
    while (m.workPending || m.workerBusy) yield m.idleChan;
    m.dead = true;
    m.timerGeneration++;
    this.#notify(m.workChan);
    yield* this.#runScheduledFlush(m);
    const c = yield* this.#consult(m, RequestType.DTR, EMPTY, 0, -1, null, false);
    if (c.errno !== 0) this.stats.lifecycleFailures++;
    m.state = "removed";
    return ok && c.errno === 0;
  }

  /** mirror_status (INFO): GET_SYNC_COUNT, then the log's STATUS_INFO. */
  *#statusThread(m: Mirror): Gen<void> {
    if (m.state === "new" || m.state === "removed" || m.state === "failed") {
      this.#hooks.commandDone?.(m.index, "status", false, this.#now);
      return;
    }
    yield* this.#getSyncCount(m);
    const c = yield* this.#request(m, RequestType.STATUS_INFO, EMPTY, STATUS_REPLY_ROOM, -1, null);
    if (c.errno === 0) m.lastStatus = c.text;
    this.#hooks.commandDone?.(m.index, "status", c.errno === 0, this.#now);
  }

  *#probe(m: Mirror, region: number): Gen<void> {
    const c = this.#newCall(m, RequestType.IS_CLEAN, u64s1(region), 8);
    c.kind = CallKind.PROBE;
    c.region = region;
    this.#send(c, true);
    yield c;
  }

  *#bad(m: Mirror, kind: number): Gen<void> {
    let type: number = RequestType.IN_SYNC;
    let payload: Uint8Array;
    let expect = EXPECT_ERROR;
    let uuid = m.spec.uuid;
    switch (kind) {
      case BadRequest.REGION_OUT_OF_RANGE:
        payload = u64s1(m.regionCount + 7);
        break;
      case BadRequest.SHORT_PAYLOAD:
        payload = new Uint8Array(4);
        break;
      case BadRequest.RAGGED_REGIONS:
        type = RequestType.MARK_REGION;
        payload = new Uint8Array(12);
        break;
      case BadRequest.SHORT_SET_SYNC:
        type = RequestType.SET_REGION_SYNC;
        payload = new Uint8Array(8);
        break;
      case BadRequest.CLEAR_OUT_OF_RANGE:
        type = RequestType.CLEAR_REGION;
        payload = u64s1(m.regionCount);
        break;
      case BadRequest.UNKNOWN_LOG:
        payload = u64s1(0);
        uuid = `${m.spec.uuid}-never-constructed`.slice(0, 128);
        expect = Errno.ESRCH;
        break;
      case BadRequest.UNKNOWN_TYPE:
        type = 0;
        payload = EMPTY;
        expect = EXPECT_ERROR_OR_DROP;
        break;
      default:
        throw new RangeError(`Unknown bad request kind ${kind}`);
    }
    const c = this.#newCall(m, type, payload, 16);
    c.kind = CallKind.BAD;
    c.expect = expect;
    c.uuid = uuid;
    this.#send(c, true);
    yield c;
  }
}

/** Index of a request type in the per-type counters: 1..17, and 0 for any other number. */
function typeIndex(type: number): number {
  return type >= 1 && type <= RequestType.IS_REMOTE_RECOVERING ? type : 0;
}

function putU64(p: Uint8Array, off: number, n: number): void {
  // Little-endian by hand: a DataView per payload costs an allocation on the hot path.
  const lo = n >>> 0;
  const hi = Math.floor(n / 0x1_0000_0000) >>> 0;
  p[off] = lo & 0xff;
  p[off + 1] = (lo >>> 8) & 0xff;
  p[off + 2] = (lo >>> 16) & 0xff;
  p[off + 3] = lo >>> 24;
  p[off + 4] = hi & 0xff;
  p[off + 5] = (hi >>> 8) & 0xff;
  p[off + 6] = (hi >>> 16) & 0xff;
  p[off + 7] = hi >>> 24;
}

/** One region as a u64 payload. */
function u64s1(region: number): Uint8Array {
  const p = new Uint8Array(8);
  putU64(p, 0, region);
  return p;
}

/** Regions as a u64[] payload. */
function u64s(regions: number[]): Uint8Array {
  const p = new Uint8Array(8 * regions.length);
  for (let i = 0; i < regions.length; i++) putU64(p, 8 * i, regions[i]);
  return p;
}

function pushTimer(heap: Timer[], t: Timer): void {
  heap.push(t);
  let i = heap.length - 1;
  while (i > 0) {
    const parent = (i - 1) >> 1;
    if (!before(heap[i], heap[parent])) break;
    [heap[i], heap[parent]] = [heap[parent], heap[i]];
    i = parent;
  }
}

function popTimer(heap: Timer[]): Timer {
  const top = heap[0];
  const last = heap.pop()!;
  if (heap.length > 0) {
    heap[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < heap.length && before(heap[l], heap[m])) m = l;
      if (r < heap.length && before(heap[r], heap[m])) m = r;
      if (m === i) break;
      [heap[i], heap[m]] = [heap[m], heap[i]];
      i = m;
    }
  }
  return top;
}

function before(a: Timer, b: Timer): boolean {
  return a.at < b.at || (a.at === b.at && a.order < b.order);
}
