/**
 * The log replica: the state of one mirror log as a pure, deterministic state machine.
 *
 * Every member applies the same ops in the same total order and so holds the same state
 * (invariant 5); the originating node answers its kernel from its own replica. No I/O, clock or
 * randomness in here: effects go out as {@link OpResult}s and as the on-disk clean image, which the
 * node drains with {@link LogReplica.takeDiskChanges} and writes.
 *
 * State (DESIGN.md, "State per log"): sync bitmap and count; per-node marks (a `Set` per node
 * plus a per-region count, so every op costs O(regions in the op), never O(outstanding marks));
 * the on-disk clean image (clean = in sync and unmarked, always); recovery assignments, several
 * at once, one region per node; regions asked for first; the resync search position; the in-sync
 * latch; each member's suspend state and whether it asks for resync work; regions reserved for a
 * write answered "not recovering"; the disk failure flag.
 *
 * Decisions, where the kernel and the previous daemon leave room:
 * - A region is clean (IS_CLEAN, and on disk) only when in sync and marked by no node, so a
 *   region never goes clean on disk before it is resynced (invariants 1 and 3).
 * - Marks left behind by a node that suspends or leaves are treated like a crash's: those
 *   regions go out of sync. The kernel clears its marks before POSTSUSPEND (it even runs a
 *   delayed integrated flush early), so this only fires when something went wrong, and then being
 *   conservative costs one resync.
 * - The in-sync latch (from cmirrord): once every region has been in sync, IN_SYNC answers 1 for
 *   every region so all nodes keep writing to all legs, even if one node's failed write marks a
 *   region out of sync (SET_REGION_SYNC 0): another node sending a write to the default leg only
 *   would lose it if that leg is the one that failed. A crash is different: the dead node's writes
 *   may have reached only some legs, so those regions must be read from the default leg until
 *   resynced, and the latch is cleared when a crash (or a leftover mark) puts a region out of sync.
 * - GET_RESYNC_WORK hands out regions asked about by IS_REMOTE_RECOVERING first, then searches
 *   forward from the search position like the kernel's core log (reset to 0 at RESUME, no wrap
 *   otherwise, so a region the kernel itself failed to recover is retried at the next resume, not
 *   in a tight loop). Regions that go out of sync because a node crashed, and a freed assignment,
 *   move the search position back, so they are resynced at run time (the previous daemon never
 *   resynced them). A region another node has marked (its write may be in flight) is skipped and
 *   the search position stays on it: copying a region while another node writes to it can leave
 *   the legs different although the region is then marked in sync.
 * - IS_REMOTE_RECOVERING's `in_sync_hint` is the lowest region that is out of sync (the region
 *   count when none is): the kernel answers "not recovering" without asking for every region
 *   below the hint, so it must never exceed an out-of-sync region.
 * - IS_REMOTE_RECOVERING's answer must be safe (no write lands on a region while another node
 *   copies it) and live (the kernel requeues a write answered "recovering" and asks again, and a
 *   suspend waits for that write, so "recovering" must end). An in-sync region is not
 *   recovering. An out-of-sync region is "recovering" when (1) it is assigned to a member that is
 *   resumed (it finishes or leaves; a suspending kernel finished its recovery before PRESUSPEND,
 *   so its leftover assignment copies nothing), or (2) the asker itself is "asking": resumed and
 *   has sent GET_RESYNC_WORK since its last RESUME. Its kernel's recovery then runs, our reply's
 *   hint is at most this region, so its next pass (200 ms later) asks for resync work and gets
 *   the region (it is queued first) or another one: progress either way. Not under the in-sync
 *   latch: a region out of sync there failed a write or recovery, and recovering it again may
 *   fail forever. Otherwise (3) the answer is "not recovering", and the region is *reserved* for
 *   the asker: no other node gets it as resync work until the asker marks it (the mark then
 *   blocks it until cleared, after the write), clears it, leaves, or it is set in sync. That
 *   closes the window between the answer and the mark. "Resumed" alone proves nothing (K1): a
 *   member whose kernel saw the mirror in sync stops asking for resync work, an idle one asks
 *   only when woken, and a kernel re-CTRed inside its own suspend sends RESUME with its recovery
 *   stopped; so the rule never counts on a member other than the asker to start recovering.
 *
 * @module
 */

import { Errno, MAX_REGIONS_PER_REQUEST, MAX_STATUS_REPLY } from "../kernel/protocol.ts";
import { Bitmap } from "./bitmap.ts";
import { MAX_REGION_COUNT, MAX_REGION_SIZE, statusInfoText, statusTableText } from "./ctr.ts";
import { Digest } from "./digest.ts";
import { remoteRecoveringBytes, resyncWorkBytes, s64Bytes, statusBytes, u64Bytes } from "./ops.ts";
import type {
  DiskChanges,
  DiskImage,
  LogConfig,
  LogReplicaLike,
  NodeId,
  Op,
  OpResult,
} from "./types.ts";

/**
 * Most regions remembered from IS_REMOTE_RECOVERING. The kernel asks at most 4 times a second
 * per machine, and a write waiting on one of these regions is delayed until it is recovered, so
 * a short list covers every waiting writer; further regions are found by the forward search.
 */
export const MAX_PRIORITY_REGIONS = 64;

/**
 * Most regions reserved at once (an out-of-sync region answered "not recovering" and not yet
 * marked by the asker). The kernel sends IS_REMOTE_RECOVERING at most 4 times a second and marks
 * the region right after a "not recovering", so few are outstanding; when full, the answer is
 * "recovering" (always safe) and the kernel asks again 200 ms later.
 */
export const MAX_RESERVATIONS = 256;

/**
 * Most distinct nodes one replica tracks (members, mark holders, recoverers). Corosync itself
 * allows fewer; an op from a new node beyond this is refused with EINVAL.
 */
export const MAX_NODES = 1024;

/**
 * Most changed disk words tracked one by one between two {@link LogReplica.takeDiskChanges};
 * beyond that the replica just records "everything changed" (replicas that never write the disk
 * log would otherwise grow the set without bound).
 */
export const MAX_DIRTY_WORDS = 65536;

/** Default largest checkpoint chunk: well under corosync's ~1 MiB message limit. */
export const DEFAULT_CHECKPOINT_CHUNK_BYTES = 256 * 1024;

/** Smallest allowed checkpoint chunk (tests use tiny chunks; nothing needs less). */
export const MIN_CHECKPOINT_CHUNK_BYTES = 64;

/** Largest serialized checkpoint accepted (2^31 regions: a 256 MiB bitmap plus marks). */
export const MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024;

/** Where a member is in the kernel's suspend/resume cycle. */
export type MemberState = "resumed" | "presuspended" | "suspended";

const MEMBER_STATES: readonly MemberState[] = ["resumed", "presuspended", "suspended"];

const CHECKPOINT_MAGIC = 0x4b434c43; // "CLCK" as little-endian bytes
const CHECKPOINT_VERSION = 2;
const FLAG_INITIALIZED = 1;
const FLAG_LATCH = 2;
const FLAG_DISK_FAILED = 4;

function ok(data?: Uint8Array): OpResult {
  return data === undefined ? { errno: 0 } : { errno: 0, data };
}

function refuse(reason: string): OpResult {
  return { errno: Errno.EINVAL, reason };
}

function isNodeId(node: unknown): node is NodeId {
  return typeof node === "number" && Number.isInteger(node) && node >= 0 && node <= 0xffffffff;
}

function ascending(a: number, b: number): number {
  return a - b;
}

/** What {@link LogReplica.stats} reports. */
export interface ReplicaStats {
  syncCount: number;
  cleanCount: number;
  marks: number;
  diskFailed: boolean;
  members: NodeId[];
}

/** One log's replicated state. See the module comment for the semantics. */
export class LogReplica implements LogReplicaLike {
  readonly #config: LogConfig;
  readonly #regionCount: number;
  readonly #sync: Bitmap;
  /** The on-disk clean image: always `sync & ~marked`. */
  /**
   * The on-disk clean image, `sync & ~marked`, kept for clustered-disk logs only: a core log
   * derives it (2 MiB saved at 2^24 regions).
   */
  readonly #disk: Bitmap | null;
  #syncCount = 0;
  #initialized = false;
  #latch = false;
  #diskFailed = false;
  #searchPos = 0;
  readonly #members = new Map<NodeId, MemberState>();
  readonly #marks = new Map<NodeId, Set<number>>();
  readonly #markCounts = new Map<number, number>();
  readonly #recoverer = new Map<number, NodeId>();
  readonly #recovering = new Map<NodeId, number>();
  #priority: number[] = [];
  /** Resumed members that sent GET_RESYNC_WORK since their last RESUME (see the module comment). */
  readonly #asking = new Set<NodeId>();
  /** Region -> nodes told "not recovering" for it while out of sync, until they mark it. */
  readonly #reserved = new Map<number, Set<NodeId>>();
  #reservationCount = 0;
  // Local bookkeeping, not replicated state (not in the digest or checkpoint):
  readonly #dirtyWords = new Set<number>();
  #allDirty = false;
  /** A clean bit went to dirty (a mark) since the last take: the next flush must sync. */
  #dirtied = false;
  /** Every region below this is in sync (a cache for the in_sync_hint). */
  #lowOutOfSync = 0;

  /**
   * Why `config` cannot make a replica (region count or size out of range, unknown kind, status
   * text too long for a reply), or undefined. Allocates nothing: for checking a CTR.
   */
  static check(config: LogConfig): string | undefined {
    const { regionCount, regionSize, kind } = config;
    if (!Number.isInteger(regionCount) || regionCount < 1 || regionCount > MAX_REGION_COUNT) {
      return `Region count must be from 1 to ${MAX_REGION_COUNT}, got ${regionCount}`;
    }
    if (!Number.isInteger(regionSize) || regionSize < 1 || regionSize > MAX_REGION_SIZE) {
      return `Region size must be from 1 to ${MAX_REGION_SIZE}, got ${regionSize}`;
    }
    if (kind !== "clustered-core" && kind !== "clustered-disk") {
      return `Unknown log kind ${String(kind)}`;
    }
    const longest = Math.max(
      statusInfoText(config, { diskFailed: true }).length,
      statusTableText(config).length,
    );
    if (longest + 1 > MAX_STATUS_REPLY) {
      return `Status text of ${longest} bytes does not fit ${MAX_STATUS_REPLY} bytes`;
    }
    return undefined;
  }

  /** An uninitialized replica (state is set by the first RESUME or a checkpoint). */
  constructor(config: LogConfig) {
    const bad = LogReplica.check(config);
    if (bad !== undefined) throw new RangeError(bad);
    const { regionCount, kind } = config;
    this.#config = config;
    this.#regionCount = regionCount;
    this.#sync = new Bitmap(regionCount);
    this.#disk = kind === "clustered-disk" ? new Bitmap(regionCount) : null;
  }

  /**
   * Counters for `clogd status` and the state dump: sync count, clean count (in sync and not
   * marked), outstanding marks over all nodes, the disk-failure flag and the members by id.
   * Costs a popcount of the clean bitmap (about 1 ms for 2^24 regions): not for the hot path.
   */
  stats(): ReplicaStats {
    let marks = 0;
    for (const set of this.#marks.values()) marks += set.size;
    return {
      syncCount: this.#syncCount,
      cleanCount: this.#initialized ? this.#cleanCount() : 0,
      marks,
      diskFailed: this.#diskFailed,
      members: [...this.#members.keys()].sort(ascending),
    };
  }

  /** The configuration the replica was built from. */
  get config(): LogConfig {
    return this.#config;
  }

  /** Number of regions in sync. */
  get syncCount(): number {
    return this.#syncCount;
  }

  /** True once the first RESUME (or a checkpoint) set the state. */
  get initialized(): boolean {
    return this.#initialized;
  }

  /** True once the whole mirror was in sync and no crash put a region out of sync since. */
  get inSyncLatch(): boolean {
    return this.#latch;
  }

  /** True when the disk log failed (status D). */
  get diskFailed(): boolean {
    return this.#diskFailed;
  }

  /** Where GET_RESYNC_WORK's forward search starts. */
  get searchPosition(): number {
    return this.#searchPos;
  }

  /** A member's suspend state, or undefined for a node that never resumed or has left. */
  memberState(node: NodeId): MemberState | undefined {
    return this.#members.get(node);
  }

  /** The regions `node` holds marks on, ascending. */
  marksOf(node: NodeId): number[] {
    return [...(this.#marks.get(node) ?? [])].sort(ascending);
  }

  /** The region `node` is recovering, if any. */
  recoveryOf(node: NodeId): number | undefined {
    return this.#recovering.get(node);
  }

  /** The node recovering `region`, if any. */
  recovererOf(region: number): NodeId | undefined {
    return this.#recoverer.get(region);
  }

  /** Regions waiting to be handed out first, oldest first. */
  priorityRegions(): number[] {
    return [...this.#priority];
  }

  /**
   * True when `node` is resumed and sent GET_RESYNC_WORK since its last RESUME: its kernel runs
   * recovery, so IS_REMOTE_RECOVERING may answer it "recovering".
   */
  isAsking(node: NodeId): boolean {
    return this.#asking.has(node);
  }

  /**
   * Reservations, as `[region, node]` ascending: out-of-sync regions answered "not recovering"
   * to `node`, handed to no other node as resync work until `node` marks or clears them.
   */
  reservations(): [number, NodeId][] {
    const out: [number, NodeId][] = [];
    for (const region of [...this.#reserved.keys()].sort(ascending)) {
      for (const node of [...this.#reserved.get(region)!].sort(ascending)) out.push([region, node]);
    }
    return out;
  }

  /** True when `region` is in sync (the bit, not the latch). */
  isInSync(region: number): boolean {
    return region >= 0 && region < this.#regionCount && this.#sync.get(region);
  }

  /** Applies one op from `node`. Never throws; bad input is refused with EINVAL and changes nothing. */
  apply(node: NodeId, op: Op): OpResult {
    if (!isNodeId(node)) return refuse(`Invalid node id ${String(node)}`);
    if (typeof op !== "object" || op === null) return refuse("Op must be an object");
    switch (op.op) {
      case "resume":
        return this.#resume(node, op.diskImage);
      case "presuspend":
        if (!this.#admit(node)) return this.#tooManyNodes(node);
        this.#members.set(node, "presuspended");
        this.#asking.delete(node);
        return ok();
      case "postsuspend":
        if (!this.#admit(node)) return this.#tooManyNodes(node);
        this.#release(node);
        this.#members.set(node, "suspended");
        return ok();
      case "get_region_size":
        return ok(u64Bytes(this.#config.regionSize));
      case "is_clean": {
        const bad = this.#checkRegion(op.region);
        if (bad) return refuse(bad);
        return ok(s64Bytes(this.#isClean(op.region) ? 1 : 0));
      }
      case "in_sync": {
        const bad = this.#checkRegion(op.region);
        if (bad) return refuse(bad);
        return ok(s64Bytes(this.#latch || this.#sync.get(op.region) ? 1 : 0));
      }
      case "mark":
      case "flush": {
        const regions = op.op === "mark" ? op.regions : op.marks;
        const bad = this.#checkRegions(regions);
        if (bad) return refuse(bad);
        if (regions.length > 0 && !this.#admit(node)) return this.#tooManyNodes(node);
        for (const r of regions) this.#mark(node, r);
        if (op.op === "mark") return ok();
        return { errno: 0, needsDurable: this.#config.kind === "clustered-disk" };
      }
      case "clear": {
        const bad = this.#checkRegions(op.regions);
        if (bad) return refuse(bad);
        for (const r of op.regions) {
          // Cleared without a mark: the write answered "not recovering" is over (or never was).
          this.#unreserve(node, r);
          this.#clear(node, r);
        }
        return ok();
      }
      case "get_resync_work":
        return this.#getResyncWork(node);
      case "set_region_sync": {
        const bad = this.#checkRegion(op.region);
        if (bad) return refuse(bad);
        if (typeof op.inSync !== "boolean") return refuse("Field inSync must be a boolean");
        this.#setRegionSync(op.region, op.inSync);
        return ok();
      }
      case "get_sync_count":
        return ok(u64Bytes(this.#syncCount));
      case "status_info":
        return ok(statusBytes(statusInfoText(this.#config, { diskFailed: this.#diskFailed })));
      case "status_table":
        return ok(statusBytes(statusTableText(this.#config)));
      case "is_remote_recovering":
        return this.#isRemoteRecovering(node, op.region);
      case "disk_failed":
        this.#diskFailed = true;
        return ok();
      default:
        return refuse(`Unknown op ${JSON.stringify(String((op as { op?: unknown }).op))}`);
    }
  }

  /**
   * `node` left without POSTSUSPEND (invariant 3): its marks are dropped and those regions put
   * out of sync (its writes may have reached only some legs), which clears the in-sync latch;
   * its recovery assignment is freed. Returns the number of regions that went out of sync.
   */
  nodeCrashed(node: NodeId): number {
    if (!isNodeId(node)) return 0;
    const n = this.#release(node);
    this.#members.delete(node);
    return n;
  }

  /**
   * Every region out of sync (the whole mirror is resynced), for a log whose legs may differ
   * anywhere: after a split brain two sides recovered and wrote regions without knowing of each
   * other. Marks, members and recovery assignments stay; the disk image is rewritten whole.
   * Returns the number of regions that went out of sync.
   */
  resyncAll(): number {
    if (!this.#initialized) return 0;
    const was = this.#syncCount;
    this.#sync.fill(false);
    this.#syncCount = 0;
    this.#latch = false;
    this.#lowOutOfSync = 0;
    this.#searchPos = 0;
    if (this.#disk !== null) {
      this.#disk.fill(false);
      this.#allDirty = true;
      this.#dirtied = true;
    }
    return was;
  }

  /**
   * `node` left cleanly. Its marks should already be cleared by its kernel; any left are treated
   * as after a crash (see the module comment). Returns the number of regions that went out of sync.
   */
  nodeLeft(node: NodeId): number {
    return this.nodeCrashed(node);
  }

  /**
   * The on-disk clean-bitmap words that changed since the last call, ascending. After the first
   * RESUME, after a checkpoint is loaded, or after more than {@link MAX_DIRTY_WORDS} changes, that
   * is every word. Always empty for a clustered-core log (it has no disk).
   */
  takeDiskChanges(): DiskChanges {
    let words: number[];
    if (this.#allDirty) {
      words = new Array<number>(this.#diskImage().wordCount);
      for (let i = 0; i < words.length; i++) words[i] = i;
    } else {
      words = [...this.#dirtyWords].sort(ascending);
    }
    this.#allDirty = false;
    this.#dirtied = false;
    this.#dirtyWords.clear();
    return { words };
  }

  /**
   * True when the disk changes not yet taken include a bit that went from clean to dirty (or
   * the whole image must be written). Only then must a FLUSH wait for a new write and sync;
   * clean bits may reach the disk later, like the kernel's disk log, which skips the cache
   * flush when no bit was dirtied (a region left dirty on disk is only resynced).
   */
  get diskDirtied(): boolean {
    return this.#dirtied || this.#allDirty;
  }

  /** Word `i` (unsigned) of the on-disk clean bitmap. */
  diskWord(i: number): number {
    const disk = this.#diskImage();
    if (!Number.isInteger(i) || i < 0 || i >= disk.wordCount) {
      throw new RangeError(`Disk word ${i} is outside 0..${disk.wordCount - 1}`);
    }
    return disk.word(i);
  }

  /**
   * The on-disk clean bitmap, `round_up(regions, 32) / 8` bytes, little-endian bit order. A live
   * view on little-endian hosts: copy it before applying more ops if you need it to stay put.
   */
  diskBytes(): Uint8Array {
    return this.#diskImage().bytes();
  }

  /**
   * A hash of the complete replicated state (everything in a checkpoint, plus the on-disk image):
   * equal on every member after every delivered message (invariant 5). Not included: which disk
   * words are waiting to be written (local to the writer).
   */
  digest(): string {
    const d = new Digest();
    this.#digestScalars(d);
    d.u32(this.#members.size);
    for (const node of [...this.#members.keys()].sort(ascending)) {
      d.u32(node).u32(MEMBER_STATES.indexOf(this.#members.get(node)!));
    }
    const markNodes = [...this.#marks.keys()].sort(ascending);
    d.u32(markNodes.length);
    for (const node of markNodes) {
      const regions = this.marksOf(node);
      d.u32(node).u32(regions.length);
      for (const r of regions) d.u32(r);
    }
    const assigned = [...this.#recoverer.keys()].sort(ascending);
    d.u32(assigned.length);
    for (const r of assigned) d.u32(r).u32(this.#recoverer.get(r)!);
    d.u32(this.#priority.length);
    for (const r of this.#priority) d.u32(r);
    const asking = [...this.#asking].sort(ascending);
    d.u32(asking.length);
    for (const node of asking) d.u32(node);
    const reservations = this.reservations();
    d.u32(reservations.length);
    for (const [r, node] of reservations) d.u32(r).u32(node);
    d.words(this.#sync.words);
    if (this.#disk !== null) d.words(this.#disk.words);
    return d.hex();
  }

  /**
   * The complete replicated state, serialized and split into chunks of at most `maxChunkBytes`
   * (default {@link DEFAULT_CHECKPOINT_CHUNK_BYTES}) for the bus. The chunks are views of one
   * buffer. The serialization ends with the state's digest, checked by {@link fromCheckpoint}.
   */
  checkpoint(options: { maxChunkBytes?: number } = {}): Uint8Array[] {
    const max = options.maxChunkBytes ?? DEFAULT_CHECKPOINT_CHUNK_BYTES;
    if (!Number.isInteger(max) || max < MIN_CHECKPOINT_CHUNK_BYTES) {
      throw new RangeError(
        `Checkpoint chunk size must be at least ${MIN_CHECKPOINT_CHUNK_BYTES}, got ${max}`,
      );
    }
    const markNodes = [...this.#marks.keys()].sort(ascending);
    let size = 32 + 8 * this.#members.size + 4;
    for (const node of markNodes) size += 8 + 4 * this.#marks.get(node)!.size;
    size += 4 + 8 * this.#recoverer.size + 4 + 4 * this.#priority.length;
    size += 4 + 4 * this.#asking.size + 4 + 8 * this.#reservationCount;
    size += 4 + this.#sync.byteLength + 16;

    const buf = new Uint8Array(size);
    const w = new Writer(buf);
    w.u32(CHECKPOINT_MAGIC).u32(CHECKPOINT_VERSION);
    w.u32(this.#regionCount).u32(this.#config.regionSize);
    w.u32((this.#config.kind === "clustered-disk" ? 1 : 0) | (this.#flags() << 8));
    w.u32(this.#syncCount).u32(this.#searchPos);
    w.u32(this.#members.size);
    for (const node of [...this.#members.keys()].sort(ascending)) {
      w.u32(node).u32(MEMBER_STATES.indexOf(this.#members.get(node)!));
    }
    w.u32(markNodes.length);
    for (const node of markNodes) {
      const regions = this.marksOf(node);
      w.u32(node).u32(regions.length);
      for (const r of regions) w.u32(r);
    }
    w.u32(this.#recoverer.size);
    for (const r of [...this.#recoverer.keys()].sort(ascending)) {
      w.u32(r).u32(this.#recoverer.get(r)!);
    }
    w.u32(this.#priority.length);
    for (const r of this.#priority) w.u32(r);
    w.u32(this.#asking.size);
    for (const node of [...this.#asking].sort(ascending)) w.u32(node);
    w.u32(this.#reservationCount);
    for (const [r, node] of this.reservations()) w.u32(r).u32(node);
    w.u32(this.#sync.wordCount);
    w.bytes(this.#sync.bytes());
    w.ascii(this.digest());
    if (w.offset !== size) {
      throw new Error(`Checkpoint size mismatch: wrote ${w.offset} of ${size} bytes`);
    }

    const chunks: Uint8Array[] = [];
    for (let off = 0; off < size; off += max) {
      chunks.push(buf.subarray(off, Math.min(size, off + max)));
    }
    return chunks;
  }

  /**
   * A replica holding the state of a {@link checkpoint}, for a member joining the log. Throws an
   * Error saying what is wrong when the chunks are truncated, corrupt, or for another geometry.
   * Every disk word counts as changed, so a joiner that becomes the disk writer rewrites the image.
   */
  static fromCheckpoint(config: LogConfig, chunks: readonly Uint8Array[]): LogReplica {
    let total = 0;
    for (const c of chunks) {
      if (!(c instanceof Uint8Array)) throw new Error("Checkpoint chunk is not a Uint8Array");
      total += c.byteLength;
    }
    if (total > MAX_CHECKPOINT_BYTES) throw new Error(`Checkpoint of ${total} bytes is too large`);
    const buf = new Uint8Array(total);
    let off = 0;
    for (const c of chunks) {
      buf.set(c, off);
      off += c.byteLength;
    }
    const replica = new LogReplica(config);
    try {
      replica.#load(new Reader(buf));
    } catch (cause) {
      if (cause instanceof CheckpointError) {
        throw new Error(`Checkpoint rejected: ${cause.message}`);
      }
      throw cause;
    }
    return replica;
  }

  /**
   * Checks every internal invariant (O(regions); for tests and the simulator). Returns a
   * description of the first violation, or undefined.
   */
  checkInvariants(): string | undefined {
    const n = this.#regionCount;
    if (!this.#sync.paddingIsClear() || this.#disk?.paddingIsClear() === false) {
      return "Bitmap padding bits set";
    }
    const popcount = this.#sync.popcount();
    if (popcount !== this.#syncCount) {
      return `Sync count ${this.#syncCount} but ${popcount} bits set`;
    }
    if (this.#syncCount > n) return `Sync count ${this.#syncCount} exceeds ${n}`;
    if (this.#searchPos < 0 || this.#searchPos > n) {
      return `Search position ${this.#searchPos} out of range`;
    }
    const counts = new Map<number, number>();
    for (const [node, set] of this.#marks) {
      if (set.size === 0) return `Empty mark set kept for node ${node}`;
      for (const r of set) {
        if (!(r >= 0 && r < n)) return `Node ${node} marks region ${r} out of range`;
        counts.set(r, (counts.get(r) ?? 0) + 1);
      }
    }
    if (counts.size !== this.#markCounts.size) return "Mark counts disagree with per-node marks";
    for (const [r, c] of counts) {
      if (this.#markCounts.get(r) !== c) {
        return `Region ${r}: mark count ${this.#markCounts.get(r)} but ${c} marks`;
      }
    }
    for (let w = 0; this.#disk !== null && w < this.#disk.wordCount; w++) {
      let expect = this.#sync.word(w);
      if (expect !== 0) {
        for (let b = 0; b < 32; b++) {
          if (((expect >>> b) & 1) !== 0 && this.#markCounts.has(w * 32 + b)) expect &= ~(1 << b);
        }
      }
      if (this.#disk.word(w) !== expect >>> 0) return `Disk word ${w} is not sync & ~marked`;
    }
    if (this.#recoverer.size !== this.#recovering.size) return "Recovery maps disagree";
    for (const [r, node] of this.#recoverer) {
      if (this.#recovering.get(node) !== r) {
        return `Region ${r} recoverer ${node} does not point back`;
      }
      if (this.#sync.get(r)) return `Region ${r} is in sync but still assigned`;
    }
    if (this.#priority.length > MAX_PRIORITY_REGIONS) return "Priority list over its limit";
    if (new Set(this.#priority).size !== this.#priority.length) {
      return "Priority list has duplicates";
    }
    for (const r of this.#priority) {
      if (!(r >= 0 && r < n) || this.#sync.get(r)) {
        return `Priority region ${r} out of range or in sync`;
      }
    }
    for (const node of this.#asking) {
      if (this.#members.get(node) !== "resumed") return `Asking node ${node} is not resumed`;
    }
    let reservations = 0;
    for (const [r, nodes] of this.#reserved) {
      if (nodes.size === 0) return `Empty reservation set kept for region ${r}`;
      if (!(r >= 0 && r < n) || this.#sync.get(r)) {
        return `Reserved region ${r} out of range or in sync`;
      }
      for (const node of nodes) {
        if (this.#marks.get(node)?.has(r)) return `Region ${r} reserved and marked by node ${node}`;
      }
      reservations += nodes.size;
    }
    if (reservations !== this.#reservationCount) return "Reservation count disagrees";
    if (reservations > MAX_RESERVATIONS) return "Reservations over their limit";
    if (this.#lowOutOfSync > 0 && this.#sync.findNextZero(0) < this.#lowOutOfSync) {
      return "Out-of-sync cache is above an out-of-sync region";
    }
    return undefined;
  }

  // ---- ops ----

  #resume(node: NodeId, image: DiskImage | undefined): OpResult {
    if (image !== undefined) {
      const bad = checkDiskImage(image);
      if (bad) return refuse(bad);
    }
    if (!this.#admit(node)) return this.#tooManyNodes(node);
    // Only the log's first resume sets the state: later ones (this node after a suspend, or
    // another member joining) keep what the cluster holds, as the kernel's core log keeps its
    // bits across suspend/resume.
    if (!this.#initialized) this.#initialize(image);
    this.#members.set(node, "resumed");
    // A RESUME also comes from a kernel re-sending CTR from inside its suspend (recovery
    // stopped): only its next GET_RESYNC_WORK shows recovery runs.
    this.#asking.delete(node);
    this.#searchPos = 0;
    return ok();
  }

  #initialize(image: DiskImage | undefined): void {
    const nosync = this.#config.sync === "nosync";
    if (this.#config.kind === "clustered-core") {
      this.#sync.fill(nosync);
    } else if (image?.failed) {
      // The kernel would trust nosync here; a log device we cannot read tells us nothing.
      this.#sync.fill(false);
      this.#diskFailed = true;
    } else if (image === undefined) {
      // A fresh log: the disk layer found sync/nosync in the table or no valid header
      // (dm-log.c read_header) and sent no image.
      this.#sync.fill(nosync);
    } else {
      // The disk layer decided the image is the log's state (it also does so for a kernel
      // re-CTR after a daemon restart, whatever sync/nosync says: the table's word describes
      // the mirror's creation, not a log that already holds writes in flight). Regions past
      // the stored count (the device grew) start out of sync.
      this.#sync.loadBytes(image.cleanBits, image.nrRegions);
    }
    this.#syncCount = this.#sync.popcount();
    if (this.#disk !== null) {
      this.#disk.copyFrom(this.#sync);
      for (const r of this.#markCounts.keys()) this.#disk.clear(r);
    }
    this.#latch = this.#syncCount === this.#regionCount;
    this.#lowOutOfSync = 0;
    this.#priority = this.#priority.filter((r) => !this.#sync.get(r));
    for (const r of [...this.#recoverer.keys()]) if (this.#sync.get(r)) this.#unassign(r);
    this.#initialized = true;
    // The first flush rewrites the whole image.
    this.#allDirty = this.#config.kind === "clustered-disk";
    this.#dirtyWords.clear();
  }

  #getResyncWork(node: NodeId): OpResult {
    if (this.#members.get(node) === "resumed") this.#asking.add(node);
    if (!this.#initialized) return ok(resyncWorkBytes(false, 0));
    // A resend (the kernel retries with a new seq) gets the same region back.
    const held = this.#recovering.get(node);
    if (held !== undefined) return ok(resyncWorkBytes(true, held));
    if (!this.#admit(node)) return this.#tooManyNodes(node);
    const region = this.#pickResyncRegion(node);
    if (region === undefined) return ok(resyncWorkBytes(false, 0));
    this.#recoverer.set(region, node);
    this.#recovering.set(node, region);
    this.#dropPriority(region);
    return ok(resyncWorkBytes(true, region));
  }

  #pickResyncRegion(node: NodeId): number | undefined {
    for (const r of this.#priority) {
      if (
        !this.#recoverer.has(r) && !this.#markedByOther(r, node) && !this.#reservedByOther(r, node)
      ) {
        return r;
      }
    }
    let blocked = -1;
    let pos = this.#searchPos;
    // Each pass skips one assigned or marked region: bounded by their number.
    for (;;) {
      const r = this.#sync.findNextZero(pos);
      if (r >= this.#regionCount) {
        this.#searchPos = blocked >= 0 ? blocked : this.#regionCount;
        return undefined;
      }
      pos = r + 1;
      if (this.#recoverer.has(r)) continue;
      if (this.#markedByOther(r, node) || this.#reservedByOther(r, node)) {
        if (blocked < 0) blocked = r;
        continue;
      }
      this.#searchPos = blocked >= 0 ? blocked : r + 1;
      return r;
    }
  }

  #setRegionSync(region: number, inSync: boolean): void {
    if (inSync) {
      if (this.#sync.set(region)) {
        this.#syncCount++;
        if (!this.#markCounts.has(region)) this.#setDisk(region, true);
      }
      this.#dropPriority(region);
      this.#dropReservations(region);
      if (this.#syncCount === this.#regionCount) this.#latch = true;
    } else if (this.#sync.clear(region)) {
      this.#syncCount--;
      this.#setDisk(region, false);
      if (region < this.#lowOutOfSync) this.#lowOutOfSync = region;
    }
    this.#unassign(region);
  }

  /** The rule is in the module comment; it reads replicated state only. */
  #isRemoteRecovering(node: NodeId, region: number): OpResult {
    const bad = this.#checkRegion(region);
    if (bad) return refuse(bad);
    const hint = this.#lowestOutOfSync();
    if (!this.#initialized || this.#sync.get(region)) {
      return ok(remoteRecoveringBytes(false, hint));
    }
    const recoverer = this.#recoverer.get(region);
    if (recoverer !== undefined && this.#members.get(recoverer) === "resumed") {
      return ok(remoteRecoveringBytes(true, hint));
    }
    if (recoverer === undefined) this.#prioritize(region);
    if (recoverer === undefined && !this.#latch && this.#asking.has(node)) {
      return ok(remoteRecoveringBytes(true, hint));
    }
    // Its write goes to the default leg only (or to all under the latch) and the region is
    // resynced after it; until its mark arrives, nobody else may start copying the region.
    if (!this.#marks.get(node)?.has(region) && !this.#reserve(node, region)) {
      return ok(remoteRecoveringBytes(true, hint));
    }
    return ok(remoteRecoveringBytes(false, hint));
  }

  #prioritize(region: number): void {
    if (this.#priority.length < MAX_PRIORITY_REGIONS && !this.#priority.includes(region)) {
      this.#priority.push(region);
    }
  }

  /** False when the reservation table is full or `node` cannot be admitted. */
  #reserve(node: NodeId, region: number): boolean {
    const nodes = this.#reserved.get(region);
    if (nodes?.has(node)) return true;
    if (this.#reservationCount >= MAX_RESERVATIONS || !this.#admit(node)) return false;
    if (nodes === undefined) this.#reserved.set(region, new Set([node]));
    else nodes.add(node);
    this.#reservationCount++;
    return true;
  }

  #unreserve(node: NodeId, region: number): void {
    if (this.#reservationCount === 0) return;
    const nodes = this.#reserved.get(region);
    if (nodes === undefined || !nodes.delete(node)) return;
    this.#reservationCount--;
    if (nodes.size === 0) this.#reserved.delete(region);
  }

  #dropReservations(region: number): void {
    if (this.#reservationCount === 0) return;
    const nodes = this.#reserved.get(region);
    if (nodes === undefined) return;
    this.#reservationCount -= nodes.size;
    this.#reserved.delete(region);
  }

  #reservedByOther(region: number, node: NodeId): boolean {
    if (this.#reservationCount === 0) return false;
    const nodes = this.#reserved.get(region);
    return nodes !== undefined && nodes.size > (nodes.has(node) ? 1 : 0);
  }

  // ---- helpers ----

  /** The disk image; only clustered-disk logs have one. */
  #diskImage(): Bitmap {
    if (this.#disk === null) {
      throw new Error(`Log ${this.#config.uuid} is clustered-core: no disk image`);
    }
    return this.#disk;
  }

  /** Regions in sync and unmarked. */
  #cleanCount(): number {
    if (this.#disk !== null) return this.#disk.popcount();
    let markedInSync = 0;
    for (const r of this.#markCounts.keys()) if (this.#sync.get(r)) markedInSync++;
    return this.#syncCount - markedInSync;
  }

  #isClean(region: number): boolean {
    return this.#sync.get(region) && !this.#markCounts.has(region);
  }

  #mark(node: NodeId, region: number): void {
    let set = this.#marks.get(node);
    if (set === undefined) {
      set = new Set();
      this.#marks.set(node, set);
    }
    if (set.has(region)) return;
    set.add(region);
    // The mark now keeps the region from resync until the write is over.
    this.#unreserve(node, region);
    const count = this.#markCounts.get(region) ?? 0;
    this.#markCounts.set(region, count + 1);
    if (count === 0) this.#setDisk(region, false);
  }

  #clear(node: NodeId, region: number): void {
    const set = this.#marks.get(node);
    if (set === undefined || !set.delete(region)) return;
    if (set.size === 0) this.#marks.delete(node);
    this.#dropMarkCount(region);
  }

  #dropMarkCount(region: number): void {
    const count = this.#markCounts.get(region)! - 1;
    if (count > 0) {
      this.#markCounts.set(region, count);
      return;
    }
    this.#markCounts.delete(region);
    if (this.#sync.get(region)) this.#setDisk(region, true);
  }

  #markedByOther(region: number, node: NodeId): boolean {
    const count = this.#markCounts.get(region);
    if (count === undefined) return false;
    return count > (this.#marks.get(node)?.has(region) ? 1 : 0);
  }

  /** Drops `node`'s marks (their regions go out of sync) and its assignment; see nodeCrashed. */
  #release(node: NodeId): number {
    let wentOutOfSync = 0;
    const set = this.#marks.get(node);
    if (set !== undefined) {
      this.#marks.delete(node);
      for (const r of set) {
        if (this.#sync.clear(r)) {
          this.#syncCount--;
          wentOutOfSync++;
          if (r < this.#lowOutOfSync) this.#lowOutOfSync = r;
        }
        this.#dropMarkCount(r);
        if (r < this.#searchPos) this.#searchPos = r;
      }
    }
    this.#asking.delete(node);
    if (this.#reservationCount > 0) {
      for (const r of [...this.#reserved.keys()]) this.#unreserve(node, r);
    }
    const region = this.#recovering.get(node);
    if (region !== undefined) {
      this.#unassign(region);
      if (!this.#sync.get(region) && region < this.#searchPos) this.#searchPos = region;
    }
    if (wentOutOfSync > 0) this.#latch = false;
    return wentOutOfSync;
  }

  #unassign(region: number): void {
    const node = this.#recoverer.get(region);
    if (node === undefined) return;
    this.#recoverer.delete(region);
    this.#recovering.delete(node);
  }

  #dropPriority(region: number): void {
    const i = this.#priority.indexOf(region);
    if (i >= 0) this.#priority.splice(i, 1);
  }

  #setDisk(region: number, clean: boolean): void {
    if (this.#disk === null) return; // a core log has no disk image
    const changed = clean ? this.#disk.set(region) : this.#disk.clear(region);
    if (!changed || this.#allDirty) return;
    if (!clean) this.#dirtied = true;
    this.#dirtyWords.add(region >>> 5);
    if (this.#dirtyWords.size > MAX_DIRTY_WORDS) {
      this.#allDirty = true;
      this.#dirtyWords.clear();
    }
  }

  #lowestOutOfSync(): number {
    if (this.#syncCount === this.#regionCount) return this.#regionCount;
    this.#lowOutOfSync = this.#sync.findNextZero(this.#lowOutOfSync);
    return this.#lowOutOfSync;
  }

  #checkRegion(region: unknown): string | undefined {
    if (
      typeof region !== "number" || !Number.isInteger(region) || region < 0 ||
      region >= this.#regionCount
    ) {
      return `Region ${String(region)} is outside 0..${this.#regionCount - 1}`;
    }
    return undefined;
  }

  #checkRegions(regions: unknown): string | undefined {
    if (!Array.isArray(regions)) return "Regions must be an array";
    if (regions.length > MAX_REGIONS_PER_REQUEST) {
      return `${regions.length} regions in one request, more than ${MAX_REGIONS_PER_REQUEST}`;
    }
    for (const r of regions) {
      const bad = this.#checkRegion(r);
      if (bad) return bad;
    }
    return undefined;
  }

  /** False when `node` is new and the replica already tracks {@link MAX_NODES} nodes. */
  #admit(node: NodeId): boolean {
    if (this.#members.has(node) || this.#marks.has(node) || this.#recovering.has(node)) return true;
    for (const nodes of this.#reserved.values()) if (nodes.has(node)) return true;
    const known = new Set([
      ...this.#members.keys(),
      ...this.#marks.keys(),
      ...this.#recovering.keys(),
    ]);
    for (const nodes of this.#reserved.values()) for (const n of nodes) known.add(n);
    return known.size < MAX_NODES;
  }

  #tooManyNodes(node: NodeId): OpResult {
    return refuse(`Node ${node} refused: the log already tracks ${MAX_NODES} nodes`);
  }

  #flags(): number {
    return (this.#initialized ? FLAG_INITIALIZED : 0) | (this.#latch ? FLAG_LATCH : 0) |
      (this.#diskFailed ? FLAG_DISK_FAILED : 0);
  }

  #digestScalars(d: Digest): void {
    d.u32(this.#regionCount).u32(this.#config.regionSize);
    d.u32(this.#config.kind === "clustered-disk" ? 1 : 0).u32(this.#flags());
    d.u32(this.#syncCount).u32(this.#searchPos);
  }

  #load(r: Reader): void {
    if (r.u32() !== CHECKPOINT_MAGIC) throw new CheckpointError("bad magic");
    const version = r.u32();
    if (version !== CHECKPOINT_VERSION) throw new CheckpointError(`unknown version ${version}`);
    const regionCount = r.u32();
    const regionSize = r.u32();
    if (regionCount !== this.#regionCount || regionSize !== this.#config.regionSize) {
      throw new CheckpointError(
        `geometry ${regionCount} regions of ${regionSize} differs from ${this.#regionCount} of ${this.#config.regionSize}`,
      );
    }
    const kindAndFlags = r.u32();
    if ((kindAndFlags & 0xff) !== (this.#config.kind === "clustered-disk" ? 1 : 0)) {
      throw new CheckpointError("log kind differs");
    }
    const flags = kindAndFlags >>> 8;
    if ((flags & ~(FLAG_INITIALIZED | FLAG_LATCH | FLAG_DISK_FAILED)) !== 0) {
      throw new CheckpointError(`unknown flags ${flags}`);
    }
    const syncCount = r.u32();
    const searchPos = r.u32();
    if (searchPos > regionCount) {
      throw new CheckpointError(`search position ${searchPos} out of range`);
    }
    const nodes = new Set<NodeId>();

    const memberCount = r.count(8);
    let last = -1;
    for (let i = 0; i < memberCount; i++) {
      const node = r.u32();
      const state = MEMBER_STATES[r.u32()];
      if (state === undefined || node <= last) throw new CheckpointError("bad member entry");
      last = node;
      nodes.add(node);
      this.#members.set(node, state);
    }
    const markNodeCount = r.count(8);
    last = -1;
    for (let i = 0; i < markNodeCount; i++) {
      const node = r.u32();
      const n = r.count(4);
      if (node <= last || n === 0) throw new CheckpointError("bad mark list header");
      last = node;
      nodes.add(node);
      const set = new Set<number>();
      let prev = -1;
      for (let j = 0; j < n; j++) {
        const region = r.u32();
        if (region <= prev || region >= regionCount) throw new CheckpointError("bad marked region");
        prev = region;
        set.add(region);
        this.#markCounts.set(region, (this.#markCounts.get(region) ?? 0) + 1);
      }
      this.#marks.set(node, set);
    }
    const assignmentCount = r.count(8);
    last = -1;
    for (let i = 0; i < assignmentCount; i++) {
      const region = r.u32();
      const node = r.u32();
      if (region <= last || region >= regionCount || this.#recovering.has(node)) {
        throw new CheckpointError("bad recovery assignment");
      }
      last = region;
      nodes.add(node);
      this.#recoverer.set(region, node);
      this.#recovering.set(node, region);
    }
    if (nodes.size > MAX_NODES) throw new CheckpointError(`more than ${MAX_NODES} nodes`);
    const priorityCount = r.count(4);
    if (priorityCount > MAX_PRIORITY_REGIONS) throw new CheckpointError("priority list too long");
    const priority: number[] = [];
    for (let i = 0; i < priorityCount; i++) {
      const region = r.u32();
      if (region >= regionCount || priority.includes(region)) {
        throw new CheckpointError("bad priority region");
      }
      priority.push(region);
    }
    this.#priority = priority;
    const askingCount = r.count(4);
    last = -1;
    for (let i = 0; i < askingCount; i++) {
      const node = r.u32();
      if (node <= last || this.#members.get(node) !== "resumed") {
        throw new CheckpointError("bad asking member");
      }
      last = node;
      this.#asking.add(node);
    }
    const reservationCount = r.count(8);
    if (reservationCount > MAX_RESERVATIONS) throw new CheckpointError("too many reservations");
    let lastRegion = -1;
    last = -1;
    for (let i = 0; i < reservationCount; i++) {
      const region = r.u32();
      const node = r.u32();
      if (region >= regionCount || region < lastRegion || (region === lastRegion && node <= last)) {
        throw new CheckpointError("bad reservation");
      }
      lastRegion = region;
      last = node;
      nodes.add(node);
      if (!this.#reserve(node, region)) throw new CheckpointError("bad reservation");
    }
    if (nodes.size > MAX_NODES) throw new CheckpointError(`more than ${MAX_NODES} nodes`);
    const wordCount = r.u32();
    if (wordCount !== this.#sync.wordCount) throw new CheckpointError("sync bitmap size differs");
    const raw = r.bytes(wordCount * 4);
    if ((regionCount & 31) !== 0) {
      const lastWord = new DataView(raw.buffer, raw.byteOffset).getUint32(
        (wordCount - 1) * 4,
        true,
      );
      if (lastWord >>> (regionCount & 31) !== 0) {
        throw new CheckpointError("sync bitmap has padding bits set");
      }
    }
    this.#sync.loadBytes(raw, regionCount);
    const digest = r.ascii(16);
    if (r.remaining !== 0) throw new CheckpointError(`${r.remaining} bytes after the end`);

    this.#syncCount = syncCount;
    if (this.#sync.popcount() !== syncCount) {
      throw new CheckpointError("sync count disagrees with the bitmap");
    }
    for (const region of this.#recoverer.keys()) {
      if (this.#sync.get(region)) throw new CheckpointError(`assigned region ${region} is in sync`);
    }
    for (const region of priority) {
      if (this.#sync.get(region)) throw new CheckpointError(`priority region ${region} is in sync`);
    }
    for (const [region, holders] of this.#reserved) {
      if (this.#sync.get(region)) throw new CheckpointError(`reserved region ${region} is in sync`);
      for (const node of holders) {
        if (this.#marks.get(node)?.has(region)) {
          throw new CheckpointError(`reserved region ${region} is marked by its holder ${node}`);
        }
      }
    }
    this.#initialized = (flags & FLAG_INITIALIZED) !== 0;
    this.#latch = (flags & FLAG_LATCH) !== 0;
    this.#diskFailed = (flags & FLAG_DISK_FAILED) !== 0;
    this.#searchPos = searchPos;
    if (this.#disk !== null) {
      this.#disk.copyFrom(this.#sync);
      for (const region of this.#markCounts.keys()) this.#disk.clear(region);
    }
    this.#lowOutOfSync = 0;
    this.#allDirty = this.#config.kind === "clustered-disk";
    if (this.digest() !== digest) throw new CheckpointError("digest mismatch");
  }
}

/** A DiskImage's shape, checked because it may come from a file or another process. */
function checkDiskImage(image: DiskImage): string | undefined {
  if (typeof image !== "object" || image === null) return "Disk image must be an object";
  if (image.failed === true) return undefined;
  if (!Number.isSafeInteger(image.nrRegions) || image.nrRegions < 0) {
    return `Disk image region count ${String(image.nrRegions)} is invalid`;
  }
  if (!(image.cleanBits instanceof Uint8Array)) return "Disk image clean bits must be a Uint8Array";
  return undefined;
}

class CheckpointError extends Error {}

class Writer {
  readonly #view: DataView;
  readonly #buf: Uint8Array;
  offset = 0;
  constructor(buf: Uint8Array) {
    this.#buf = buf;
    this.#view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  u32(value: number): this {
    this.#view.setUint32(this.offset, value, true);
    this.offset += 4;
    return this;
  }
  bytes(bytes: Uint8Array): this {
    this.#buf.set(bytes, this.offset);
    this.offset += bytes.byteLength;
    return this;
  }
  ascii(text: string): this {
    for (let i = 0; i < text.length; i++) this.#buf[this.offset + i] = text.charCodeAt(i);
    this.offset += text.length;
    return this;
  }
}

class Reader {
  readonly #buf: Uint8Array;
  readonly #view: DataView;
  #offset = 0;
  constructor(buf: Uint8Array) {
    this.#buf = buf;
    this.#view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  get remaining(): number {
    return this.#buf.byteLength - this.#offset;
  }
  #need(n: number): void {
    if (this.remaining < n) throw new CheckpointError("truncated");
  }
  u32(): number {
    this.#need(4);
    const v = this.#view.getUint32(this.#offset, true);
    this.#offset += 4;
    return v;
  }
  /** A count of entries of `entryBytes` each, checked against what is left. */
  count(entryBytes: number): number {
    const n = this.u32();
    if (n * entryBytes > this.remaining) throw new CheckpointError("truncated");
    return n;
  }
  bytes(n: number): Uint8Array {
    this.#need(n);
    const out = this.#buf.subarray(this.#offset, this.#offset + n);
    this.#offset += n;
    return out;
  }
  ascii(n: number): string {
    return String.fromCharCode(...this.bytes(n));
  }
}
