/**
 * The kernel simulator's answer checker: what one simulated kernel knows about one log, and
 * whether each reply of the daemon is consistent with it. Pure: no I/O, no clock (times come
 * in with the calls).
 *
 * Knowledge is built only from what this kernel did and was told, and a reply is compared only
 * with what was known before its request was sent (the daemon may apply concurrent requests in
 * any order, but never one that was acknowledged before this one was sent after it). A daemon
 * restart (an -ESRCH answer) starts a new epoch: replies to requests of an older epoch get
 * the structural checks only.
 *
 * With `exclusive` (standalone: this kernel is the log's only user) the checker also knows
 * which regions are out of sync, and holds the daemon to it; in a cluster another node may
 * recover or dirty regions, so only this kernel's own marks and the structure are checked.
 *
 * @module
 */

import { Errno, type HeaderLayout, RequestType, requestTypeName } from "../kernel/protocol.ts";
import type { LogKind, SyncMode } from "../log/types.ts";
import { type Call, CallKind, EXPECT_ERROR_OR_DROP } from "./call.ts";

/** Kinds of violation the checker reports. */
export type ViolationKind =
  | "unknown-seq"
  | "duplicate-reply"
  | "undecodable-reply"
  | "header-mismatch"
  | "too-large"
  | "bad-size"
  | "bad-value"
  | "unexpected-error"
  | "accepted-bad-request"
  | "wrong-errno"
  | "no-reply"
  | "ctr-reply"
  | "region-size"
  | "sync-regressed"
  | "sync-without-recovery"
  | "clean-while-marked"
  | "clean-but-out-of-sync"
  | "resync-out-of-range"
  | "resync-in-sync"
  | "resync-duplicate"
  | "resync-stalled"
  | "sync-count-range"
  | "sync-count-regressed"
  | "hint-too-high"
  | "recovering-while-suspended"
  | "status-format"
  | "create-failed"
  | "incomplete";

/** One detected inconsistency. */
export interface Violation {
  kind: ViolationKind;
  /** Log uuid ("" when not tied to a log). */
  uuid: string;
  /** Request seq (-1 when not tied to one request). */
  seq: number;
  /** Request type name ("" when not tied to one request). */
  type: string;
  /** What was expected and what came. */
  detail: string;
  /** Model time, ms. */
  atMs: number;
}

/**
 * Most violations kept with details; more are only counted (a broken daemon would otherwise
 * fill memory with a million copies of one mistake).
 */
export const MAX_VIOLATIONS_KEPT = 1000;

/** Collects violations of every checker of one model. */
export class ViolationLog {
  readonly kept: Violation[] = [];
  /** Violations by kind, all of them (kept or not). */
  readonly byKind: Partial<Record<ViolationKind, number>> = {};
  #total = 0;

  /** Total violations seen. */
  get total(): number {
    return this.#total;
  }

  /** Record one violation. */
  add(v: Violation): void {
    this.#total++;
    this.byKind[v.kind] = (this.byKind[v.kind] ?? 0) + 1;
    if (this.kept.length < MAX_VIOLATIONS_KEPT) this.kept.push(v);
  }
}

/** Sync knowledge of one region. */
export const Sync = {
  UNKNOWN: 0,
  IN: 1,
  OUT: 2,
  /** A SET_REGION_SYNC is in flight: either answer is possible. */
  CHANGING: 3,
} as const;

/** Mark knowledge of one region. */
export const Mark = {
  NONE: 0,
  /** MARK (or integrated FLUSH) sent, not yet acknowledged. */
  PENDING: 1,
  /** Acknowledged and not cleared since: must never be reported clean. */
  MARKED: 2,
} as const;

/** Largest region count the checker tracks (two bytes of knowledge per region). */
export const MAX_CHECKED_REGIONS = 2 ** 26;

/** What the checker is told about one log. */
export interface CheckerConfig {
  uuid: string;
  luid: bigint;
  layout: HeaderLayout;
  version: number;
  kind: LogKind;
  /** Disk log device as put in the table. */
  device?: string;
  regionSize: number;
  regionCount: number;
  sync: SyncMode;
  /**
   * What a fresh daemon must report at the first RESUME: every region in sync ("in": nosync),
   * none ("out": core log or sync, or a fresh disk), or it depends on the disk ("unknown").
   */
  initialSync: "in" | "out" | "unknown";
  /**
   * This kernel is the log's only user (standalone daemon): holds the daemon to which regions
   * are out of sync. False in a cluster, where other nodes change the state too.
   */
  exclusive: boolean;
  /**
   * What a daemon that lost the log (answered -ESRCH) knows after the re-CTR: nothing we can
   * check ("unknown", e.g. a disk log, whose state depends on what reached the disk), or the
   * state of a fresh log ("fresh": a standalone core log starts over).
   */
  afterRestart: "fresh" | "unknown";
  /** Also accept this device in a disk log's STATUS_INFO (e.g. its major:minor). */
  statusDevice?: string;
  /**
   * Keep {@link LogChecker.holds} and {@link LogChecker.syncedAt}, for a test that compares this
   * kernel's marks with a disk log (a map update per mark, clear, FLUSH and SET_REGION_SYNC).
   * Default false.
   */
  trackHolds?: boolean;
}

/** Reply fields the checker looks at beyond the call's outcome. */
export interface ReplyFacts {
  /** A full reply (header echoed) or a zero-length ACK. */
  kind: "full" | "ack";
  /** Reply data (a view valid during the call only). */
  data: Uint8Array;
  /** Echoed uuid (full replies). */
  uuid?: string;
  /** Echoed luid (full replies, current layout). */
  luid?: bigint;
  /** The data did not fit the kernel's buffer (the kernel made it -ENOSPC). */
  overCapacity?: boolean;
}

const STATUS_DISK = /^3 clustered-disk (\S+) ([AD])$/;
const textDecoder = new TextDecoder();

/** Knowledge about one log and the checks of every reply about it. */
export class LogChecker {
  readonly config: CheckerConfig;
  /** Per-region {@link Sync} knowledge (only maintained with `exclusive`). */
  readonly sync: Uint8Array;
  /** Per-region {@link Mark} knowledge. */
  readonly mark: Uint8Array;
  /** Regions handed out by GET_RESYNC_WORK and not yet set in sync by this kernel. */
  readonly handedOut = new Set<number>();
  /**
   * With {@link CheckerConfig.trackHolds}: every region whose mark is durable, and the model time
   * (ms) it became so: marked (acknowledged), then covered by a FLUSH that was sent after that
   * acknowledgement and answered with success (invariant 7: a disk log then holds the region
   * dirty), and not cleared since. The kernel writes to the region only from then on, so a disk
   * log showing it clean while it is here is a broken invariant 1. A region leaves the map when
   * this kernel sends its CLEAR (the daemon may apply it any time after) or the daemon loses the
   * log (-ESRCH).
   */
  readonly holds = new Map<number, number>();
  /**
   * With {@link CheckerConfig.trackHolds}: per region, the model time (ms) this kernel last sent
   * SET_REGION_SYNC with in_sync 1 (from then on the region may be clean on disk legitimately).
   */
  readonly syncedAt = new Map<number, number>();
  /** With trackHolds: regions marked (acknowledged) but not yet covered by a FLUSH, by generation. */
  readonly #unflushed = new Map<number, number>();
  /** With trackHolds: counts mark acknowledgements; a FLUSH covers those counted before it. */
  #markGeneration = 0;
  #violations: ViolationLog;
  #knownIn = 0;
  #knownOut = 0;
  #marked = 0;
  #epoch = 0;
  #active = false;
  #lastSyncCount = -1;
  #countGeneration = 0;
  /** PRESUSPEND acknowledged and no RESUME sent since: this kernel's recovery is stopped. */
  #presuspended = false;

  /** A checker reporting into `violations`. */
  constructor(config: CheckerConfig, violations: ViolationLog) {
    if (!Number.isSafeInteger(config.regionCount) || config.regionCount < 1) {
      throw new RangeError(`Region count must be a positive integer, got ${config.regionCount}`);
    }
    if (config.regionCount > MAX_CHECKED_REGIONS) {
      throw new RangeError(
        `The checker tracks at most ${MAX_CHECKED_REGIONS} regions, got ${config.regionCount}`,
      );
    }
    this.config = config;
    this.sync = new Uint8Array(config.regionCount);
    this.mark = new Uint8Array(config.regionCount);
    this.#violations = violations;
  }

  /** Current knowledge epoch (bumped by each daemon restart). */
  get epoch(): number {
    return this.#epoch;
  }

  /** Regions known in sync. */
  get knownIn(): number {
    return this.#knownIn;
  }

  /** Regions known out of sync. */
  get knownOut(): number {
    return this.#knownOut;
  }

  /** Regions marked (acknowledged) and not cleared. */
  get marked(): number {
    return this.#marked;
  }

  /** True once the first RESUME was acknowledged (knowledge initialized). */
  get active(): boolean {
    return this.#active;
  }

  /** Some region marked by this kernel (acknowledged, not cleared), or -1. */
  anyMarked(start: number): number {
    if (this.#marked === 0) return -1;
    const n = this.config.regionCount;
    const s = start % n;
    let i = this.mark.indexOf(Mark.MARKED, s);
    if (i < 0) i = this.mark.subarray(0, s).indexOf(Mark.MARKED);
    return i;
  }

  /** Record a violation about this log. */
  violation(kind: ViolationKind, call: Call | null, detail: string, atMs: number): void {
    this.#violations.add({
      kind,
      uuid: this.config.uuid,
      seq: call === null ? -1 : call.seq,
      type: call === null ? "" : requestTypeName(call.type),
      detail,
      atMs,
    });
  }

  /** A request is about to be sent: snapshot what is known and note what it changes. */
  onSend(call: Call): void {
    call.epoch = this.#epoch;
    if (call.kind === CallKind.BAD) return;
    const r = call.region;
    switch (call.type) {
      case RequestType.IN_SYNC:
        call.snap0 = this.#inRange(r) ? this.sync[r] : Sync.UNKNOWN;
        break;
      case RequestType.IS_CLEAN:
        call.snap0 = this.#inRange(r) ? this.mark[r] : Mark.NONE;
        call.snap1 = this.#inRange(r) ? this.sync[r] : Sync.UNKNOWN;
        break;
      case RequestType.MARK_REGION:
      case RequestType.FLUSH:
        if (call.regions !== null) {
          for (const region of call.regions) this.#setMark(region, Mark.PENDING);
        }
        // The marks acknowledged so far are the ones this FLUSH makes durable.
        if (call.type === RequestType.FLUSH) call.snap0 = this.#markGeneration;
        break;
      case RequestType.CLEAR_REGION:
        if (call.regions !== null) {
          for (const region of call.regions) this.#setMark(region, Mark.NONE);
        }
        break;
      case RequestType.SET_REGION_SYNC:
        call.snap0 = call.v0; // the in_sync value sent (the model puts it in v0 before sending)
        if (this.#inRange(r)) {
          this.#setSync(r, Sync.CHANGING);
          this.handedOut.delete(r);
          if (this.config.trackHolds && call.v0 !== 0) this.syncedAt.set(r, call.sentAt);
        }
        if (call.v0 === 0) this.#resetSyncCountFloor(); // our own change: the count may drop
        break;
      case RequestType.GET_SYNC_COUNT:
        call.snap0 = this.#knownIn;
        call.snap1 = this.#knownOut;
        call.snap2 = this.#lastSyncCount;
        call.snap3 = this.#countGeneration;
        break;
      case RequestType.GET_RESYNC_WORK:
        call.snap0 = this.#knownOut;
        break;
      case RequestType.IS_REMOTE_RECOVERING:
        call.snap0 = this.#presuspended ? 1 : 0;
        break;
      case RequestType.RESUME:
        this.#presuspended = false;
        break;
    }
  }

  /**
   * The reply to `call` arrived; `call.errno` holds what the kernel acts on. Parses the data into
   * `call.v0`, `call.v1` and `call.text` (the kernel's reading of it) and checks it.
   */
  onReply(call: Call, facts: ReplyFacts, atMs: number): void {
    call.dataLength = facts.data.length;
    call.v0 = 0;
    call.v1 = 0;
    call.text = "";
    if (facts.kind === "full") this.#checkHeader(call, facts, atMs);
    if (facts.overCapacity === true) {
      this.violation(
        "too-large",
        call,
        `Reply data does not fit the kernel's ${call.cap}-byte buffer` +
          (call.reCtr
            ? " (a re-CTR offers none: the kernel fails it with Insufficient space)"
            : ""),
        atMs,
      );
    }
    if (call.kind === CallKind.BAD) return this.#checkBad(call, atMs);
    if (call.errno !== 0) return this.#failed(call, facts.overCapacity !== true, atMs);
    this.#parse(call, facts.data, atMs);
    const current = call.epoch === this.#epoch;
    switch (call.type) {
      case RequestType.CTR:
        return this.#checkCtr(call, facts.data, atMs);
      case RequestType.RESUME:
        if (!this.#active && current) this.#activate();
        return;
      case RequestType.PRESUSPEND:
        this.#presuspended = true;
        return;
      case RequestType.GET_REGION_SIZE:
        if (call.v0 !== this.config.regionSize) {
          this.violation(
            "region-size",
            call,
            `Expected ${this.config.regionSize}, got ${call.v0}`,
            atMs,
          );
        }
        return;
      case RequestType.IN_SYNC:
        return this.#checkInSync(call, current, atMs);
      case RequestType.IS_CLEAN:
        return this.#checkIsClean(call, current, atMs);
      case RequestType.MARK_REGION:
      case RequestType.FLUSH:
        if (call.regions !== null) {
          for (const region of call.regions) {
            if (this.#inRange(region) && this.mark[region] === Mark.PENDING) {
              this.#setMark(region, Mark.MARKED);
            }
          }
        }
        if (call.type === RequestType.FLUSH && this.config.trackHolds) this.#flushed(call, atMs);
        return;
      case RequestType.SET_REGION_SYNC: {
        const r = call.region;
        if (this.#inRange(r) && this.sync[r] === Sync.CHANGING) {
          this.#setSync(
            r,
            this.config.exclusive ? (call.snap0 !== 0 ? Sync.IN : Sync.OUT) : Sync.UNKNOWN,
          );
        }
        return;
      }
      case RequestType.GET_SYNC_COUNT:
        return this.#checkSyncCount(call, current, atMs);
      case RequestType.GET_RESYNC_WORK:
        return this.#checkResyncWork(call, current, atMs);
      case RequestType.IS_REMOTE_RECOVERING:
        return this.#checkRemoteRecovering(call, current, atMs);
      case RequestType.STATUS_INFO:
        return this.#checkStatus(call, facts.data, atMs);
    }
  }

  /** A try timed out (the kernel resends with a new seq; a probe gives up). */
  onTimeout(call: Call, atMs: number): void {
    if (call.kind === CallKind.BAD && call.expect !== EXPECT_ERROR_OR_DROP) {
      this.violation(
        "no-reply",
        call,
        "No reply to a malformed request that needs an error reply",
        atMs,
      );
    }
  }

  /**
   * `call` got -ESRCH: the daemon does not know the log any more (it restarted or is gone).
   * What it knows after the re-CTR and RESUME depends on {@link CheckerConfig.afterRestart};
   * marks are gone either way. A call sent before the restart was already noted (another
   * kernel thread saw it first) changes nothing: knowledge learned since is from the new daemon.
   */
  onRestart(call: Call): void {
    if (call.epoch !== this.#epoch) return;
    this.#epoch++;
    this.mark.fill(Mark.NONE);
    this.#marked = 0;
    this.holds.clear();
    this.#unflushed.clear();
    this.#resetSyncCountFloor();
    this.sync.fill(Sync.UNKNOWN);
    this.#knownIn = 0;
    this.#knownOut = 0;
    if (this.#active && this.config.afterRestart === "fresh") this.#initialize();
  }

  #resetSyncCountFloor(): void {
    this.#lastSyncCount = -1;
    this.#countGeneration++;
  }

  #activate(): void {
    this.#active = true;
    this.#initialize();
  }

  #initialize(): void {
    if (!this.config.exclusive) return;
    const n = this.config.regionCount;
    if (this.config.initialSync === "in") {
      this.sync.fill(Sync.IN);
      this.#knownIn = n;
      this.#knownOut = 0;
    } else if (this.config.initialSync === "out") {
      this.sync.fill(Sync.OUT);
      this.#knownIn = 0;
      this.#knownOut = n;
    }
    // Regions this kernel is recovering right now may be set in sync any moment.
    for (const r of this.handedOut) this.#setSync(r, Sync.UNKNOWN);
  }

  #inRange(r: number): boolean {
    return r >= 0 && r < this.config.regionCount;
  }

  #setSync(r: number, value: number): void {
    const old = this.sync[r];
    if (old === value) return;
    if (old === Sync.IN) this.#knownIn--;
    else if (old === Sync.OUT) this.#knownOut--;
    if (value === Sync.IN) this.#knownIn++;
    else if (value === Sync.OUT) this.#knownOut++;
    this.sync[r] = value;
  }

  #setMark(r: number, value: number): void {
    if (!this.#inRange(r)) return;
    const old = this.mark[r];
    if (old === Mark.MARKED) this.#marked--;
    if (value === Mark.MARKED) this.#marked++;
    this.mark[r] = value;
    if (!this.config.trackHolds) return;
    if (value !== Mark.MARKED) {
      this.#unflushed.delete(r);
      this.holds.delete(r);
    } else if (old !== Mark.MARKED) {
      this.#unflushed.set(r, ++this.#markGeneration);
    }
  }

  /**
   * A FLUSH was answered with success: the marks acknowledged before it was sent are durable,
   * and so are the marks it carried itself (integrated flush).
   */
  #flushed(call: Call, atMs: number): void {
    for (const [r, generation] of this.#unflushed) {
      if (generation <= call.snap0) {
        this.#unflushed.delete(r);
        this.holds.set(r, atMs);
      }
    }
    if (call.regions === null) return;
    for (const r of call.regions) {
      if (this.#unflushed.delete(r)) this.holds.set(r, atMs);
    }
  }

  #checkHeader(call: Call, facts: ReplyFacts, atMs: number): void {
    if (facts.uuid !== undefined && facts.uuid !== call.uuid) {
      this.violation(
        "header-mismatch",
        call,
        `Reply uuid "${facts.uuid}", request "${call.uuid}"`,
        atMs,
      );
    }
    if (call.layout === "current" && facts.luid !== undefined && facts.luid !== call.luid) {
      this.violation(
        "header-mismatch",
        call,
        `Reply luid 0x${facts.luid.toString(16)}, request 0x${call.luid.toString(16)}`,
        atMs,
      );
    }
  }

  #checkBad(call: Call, atMs: number): void {
    if (call.errno === 0) {
      this.violation(
        "accepted-bad-request",
        call,
        "A malformed request was answered with success",
        atMs,
      );
    } else if (call.expect > 0 && call.errno !== call.expect) {
      this.violation("wrong-errno", call, `Expected errno ${call.expect}, got ${call.errno}`, atMs);
    }
  }

  #failed(call: Call, report: boolean, atMs: number): void {
    // EAGAIN and ESRCH are part of the protocol (resend; re-CTR): the model counts them. An
    // -ENOSPC the kernel made of a too-large reply was reported as such.
    if (report && call.errno !== Errno.EAGAIN && call.errno !== Errno.ESRCH) {
      this.violation(
        "unexpected-error",
        call,
        `Error ${call.errno} (${errnoName(call.errno)})`,
        atMs,
      );
    }
    // What the failed request was about to change is now unknown.
    if (call.type === RequestType.MARK_REGION || call.type === RequestType.FLUSH) {
      if (call.regions !== null) { for (const r of call.regions) this.#setMark(r, Mark.NONE); }
    } else if (call.type === RequestType.SET_REGION_SYNC && this.#inRange(call.region)) {
      this.#setSync(call.region, Sync.UNKNOWN);
    }
  }

  #parse(call: Call, data: Uint8Array, atMs: number): void {
    const want = fixedReplySize(call.type);
    if (want >= 0 && data.length !== want) {
      this.violation(
        "bad-size",
        call,
        `Expected ${want} bytes of reply data, got ${data.length}`,
        atMs,
      );
      return;
    }
    if (want <= 0) return;
    const dv = new DataView(data.buffer, data.byteOffset, data.length);
    switch (call.type) {
      case RequestType.IS_CLEAN:
      case RequestType.IN_SYNC:
        call.v0 = this.#flag(call, dv, 0, atMs);
        break;
      case RequestType.GET_RESYNC_WORK:
      case RequestType.IS_REMOTE_RECOVERING:
        call.v0 = this.#flag(call, dv, 0, atMs);
        call.v1 = u64(dv, 8);
        break;
      default:
        call.v0 = u64(dv, 0);
    }
  }

  /** An s64 that must be 0 or 1; the kernel reads its low 32 bits as an int. */
  #flag(call: Call, dv: DataView, off: number, atMs: number): number {
    const lo = dv.getInt32(off, true);
    const hi = dv.getInt32(off + 4, true);
    if (hi !== 0 || (lo !== 0 && lo !== 1)) {
      this.violation("bad-value", call, `Flag at offset ${off} is ${hi}:${lo}, not 0 or 1`, atMs);
    }
    return lo;
  }

  #checkCtr(call: Call, data: Uint8Array, atMs: number): void {
    if (data.length === 0) return;
    // A payload at all: only a first CTR of a version >= 2 kernel offers room (cap > 0), and
    // only a disk log names a device.
    if (call.cap === 0 || call.reCtr) {
      this.violation(
        "ctr-reply",
        call,
        `${data.length} bytes of reply to a CTR that offers no room`,
        atMs,
      );
      return;
    }
    if (this.config.kind !== "clustered-disk") {
      this.violation(
        "ctr-reply",
        call,
        `A core log's CTR answered with ${data.length} bytes`,
        atMs,
      );
      return;
    }
    const nul = data.indexOf(0);
    if (nul !== data.length - 1 || nul === 0) {
      this.violation(
        "ctr-reply",
        call,
        "Device name is not one NUL-terminated non-empty string",
        atMs,
      );
      return;
    }
    call.text = textDecoder.decode(data.subarray(0, nul));
  }

  #checkInSync(call: Call, current: boolean, atMs: number): void {
    const r = call.region;
    if (!this.config.exclusive || !current || !this.#inRange(r)) return;
    const now = this.sync[r];
    if (now !== call.snap0 || now === Sync.CHANGING) return;
    if (call.v0 === 1) {
      if (now === Sync.OUT) {
        this.violation(
          "sync-without-recovery",
          call,
          `Region ${r} reported in sync; it is out of sync and was never set in sync since`,
          atMs,
        );
      }
      this.#setSync(r, Sync.IN);
    } else if (call.v0 === 0) {
      if (now === Sync.IN) {
        this.violation(
          "sync-regressed",
          call,
          `Region ${r} was in sync and is now reported out of sync`,
          atMs,
        );
      }
      this.#setSync(r, Sync.OUT);
    }
  }

  #checkIsClean(call: Call, current: boolean, atMs: number): void {
    const r = call.region;
    if (call.v0 !== 1 || !current || !this.#inRange(r)) return;
    if (call.snap0 === Mark.MARKED && this.mark[r] === Mark.MARKED) {
      this.violation(
        "clean-while-marked",
        call,
        `Region ${r} reported clean while marked by this kernel`,
        atMs,
      );
    }
    if (this.config.exclusive && call.snap1 === Sync.OUT && this.sync[r] === Sync.OUT) {
      this.violation(
        "clean-but-out-of-sync",
        call,
        `Region ${r} reported clean but it is out of sync`,
        atMs,
      );
    }
  }

  #checkSyncCount(call: Call, current: boolean, atMs: number): void {
    const n = this.config.regionCount;
    const count = call.v0;
    if (count > n) {
      this.violation(
        "sync-count-range",
        call,
        `Sync count ${count} exceeds the ${n} regions`,
        atMs,
      );
    }
    if (!current) return;
    // Shared with other nodes, the count legitimately drops: a node's crash puts the regions it
    // had marked out of sync (invariant 3), a healed split brain resyncs everything.
    if (this.config.exclusive && call.snap2 >= 0 && count < call.snap2) {
      this.violation(
        "sync-count-regressed",
        call,
        `Sync count went from ${call.snap2} to ${count}`,
        atMs,
      );
    }
    // Only a count asked after the last reset (our own SET_REGION_SYNC 0) may become the floor.
    if (call.snap3 === this.#countGeneration && count > this.#lastSyncCount) {
      this.#lastSyncCount = count;
    }
    if (!this.config.exclusive || !this.#active) return;
    const low = Math.min(call.snap0, this.#knownIn);
    const high = n - Math.min(call.snap1, this.#knownOut);
    if (count < low || count > high) {
      this.violation(
        "sync-count-range",
        call,
        `Sync count ${count}, but at least ${low} regions are in sync and at most ${high} can be`,
        atMs,
      );
    }
  }

  #checkResyncWork(call: Call, current: boolean, atMs: number): void {
    if (call.v0 !== 1) {
      if (
        call.v0 === 0 && this.config.exclusive && this.#active && current &&
        this.handedOut.size === 0 &&
        Math.min(call.snap0, this.#knownOut) > 0
      ) {
        const r = this.sync.indexOf(Sync.OUT);
        this.violation(
          "resync-stalled",
          call,
          `No resync work handed out, but ${this.#knownOut} regions (e.g. ${r}) are out of sync ` +
            `and none is being recovered`,
          atMs,
        );
      }
      return;
    }
    const r = call.v1;
    if (!this.#inRange(r)) {
      this.violation(
        "resync-out-of-range",
        call,
        `Region ${r} of ${this.config.regionCount}`,
        atMs,
      );
      return;
    }
    if (this.handedOut.has(r)) {
      this.violation("resync-duplicate", call, `Region ${r} is already being recovered`, atMs);
    } else if (this.config.exclusive && current && this.sync[r] === Sync.IN) {
      this.violation("resync-in-sync", call, `Region ${r} is in sync`, atMs);
    }
    this.handedOut.add(r);
  }

  #checkRemoteRecovering(call: Call, current: boolean, atMs: number): void {
    const hint = call.v1;
    const n = this.config.regionCount;
    if (call.v0 === 1 && call.snap0 === 1 && this.config.exclusive) {
      // Suspending, this kernel stopped its recovery and waits for its writes in flight; the
      // mirror holds a write as long as the log says "recovering", so the suspend never ends.
      // cmirrord halts recovery at PRESUSPEND and answers 0 from then on.
      this.violation(
        "recovering-while-suspended",
        call,
        `Region ${call.region} reported recovering after PRESUSPEND: nobody recovers it until ` +
          `RESUME, and the suspend waits for this write forever`,
        atMs,
      );
    }
    if (hint > n) {
      this.violation("bad-value", call, `in_sync_hint ${hint} exceeds the ${n} regions`, atMs);
      return;
    }
    if (!this.config.exclusive || !current || !this.#active || this.#knownOut === 0) return;
    const r = this.sync.subarray(0, hint).indexOf(Sync.OUT);
    if (r >= 0) {
      this.violation(
        "hint-too-high",
        call,
        `in_sync_hint ${hint}, but region ${r} below it is out of sync (the kernel would stop resyncing)`,
        atMs,
      );
    }
  }

  #checkStatus(call: Call, data: Uint8Array, atMs: number): void {
    // The text may end with one NUL (the previous daemon sent it), with no NUL before that.
    const body = data.length > 0 && data[data.length - 1] === 0
      ? data.subarray(0, data.length - 1)
      : data;
    if (body.indexOf(0) >= 0) {
      this.violation("status-format", call, "Status text has a NUL before its end", atMs);
      return;
    }
    const text = textDecoder.decode(body);
    call.text = text;
    const cfg = this.config;
    if (cfg.kind === "clustered-core") {
      if (text !== "1 clustered-core") {
        this.violation(
          "status-format",
          call,
          `Expected "1 clustered-core", got ${JSON.stringify(text)}`,
          atMs,
        );
      }
      return;
    }
    const m = STATUS_DISK.exec(text);
    const devices = [cfg.device, cfg.statusDevice].filter((d) => d !== undefined);
    if (m === null || !devices.includes(m[1])) {
      this.violation(
        "status-format",
        call,
        `Expected "3 clustered-disk <${devices.join("|")}> <A|D>", got ${JSON.stringify(text)}`,
        atMs,
      );
    }
  }
}

/** Exact reply data size of a successful reply, -1 when variable (CTR, STATUS_*). */
export function fixedReplySize(type: number): number {
  switch (type) {
    case RequestType.GET_REGION_SIZE:
    case RequestType.IS_CLEAN:
    case RequestType.IN_SYNC:
    case RequestType.GET_SYNC_COUNT:
      return 8;
    case RequestType.GET_RESYNC_WORK:
    case RequestType.IS_REMOTE_RECOVERING:
      return 16;
    case RequestType.CTR:
    case RequestType.STATUS_INFO:
    case RequestType.STATUS_TABLE:
      return -1;
    default:
      return 0;
  }
}

function u64(dv: DataView, off: number): number {
  return dv.getUint32(off + 4, true) * 0x1_0000_0000 + dv.getUint32(off, true);
}

const ERRNO_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Errno).map(([name, n]) => [n, name]),
);

/** "EINVAL" for 22, "errno 99" for numbers we do not name. */
export function errnoName(n: number): string {
  return ERRNO_NAMES[n] ?? `errno ${n}`;
}
