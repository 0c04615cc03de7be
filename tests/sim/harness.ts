/**
 * The cluster simulator's world: N {@link ClusterCore}s in one process, an ordered bus with CPG's
 * semantics, one shared simulated disk per clustered-disk log, and the invariant checks of
 * DESIGN.md run after every event. Pure and deterministic: time is a number the driver advances,
 * randomness comes from the driver's seeded {@link Prng}.
 *
 * The bus: a message multicast at time t is put in the total order at `t + orderDelay` (per
 * sender FIFO) and reaches each node that is a member at that point after that node's own lag
 * (never overtaking what it already has). Membership changes are events of the same order. A
 * crashed node's messages not yet ordered are either all ordered before its leave, or dropped
 * (CPG's guarantee), as the driver chooses.
 *
 * The disk: one per clustered-disk log, shared by the nodes; a write becomes durable after a
 * delay; a crash lands or drops the node's writes in flight (the machine is fenced: nothing it
 * issued lands later).
 *
 * The checks are done on what the cores answer (every request's reply) and on their replicas:
 * see {@link ClusterHarness} and the README in the simulator's report.
 *
 * @module
 */

import {
  ClusterCore,
  type ClusterOp,
  type ClusterOptions,
  type Confchg,
  type Effect,
  type LeaveReason,
} from "../../src/cluster/core.ts";
import { decodeMessage, isDecodeError } from "../../src/cluster/messages.ts";
import { Errno } from "../../src/kernel/protocol.ts";
import { readS64, readU64 } from "../../src/log/ops.ts";
import type { DiskImage, LogConfig, NodeId, OpResult } from "../../src/log/types.ts";

/** libcpg's largest message (ffi/cpg.ts CPG_MAX_MESSAGE_BYTES): the bus refuses bigger ones. */
export const CPG_MESSAGE_LIMIT = 1_047_552;

/** Most events handled at one instant of simulated time before the run is declared stuck. */
export const MAX_EVENTS_PER_INSTANT = 200_000;

/** A bus event in the total order. */
export interface BusEvent {
  /** Position in the total order (1, 2, ...). */
  index: number;
  kind: "msg" | "confchg";
  from: NodeId;
  bytes: Uint8Array;
  change: Confchg;
  /** Injected garbage (the cores must drop it). */
  injected: boolean;
  /** Log keys the event concerns (computed once; null: every log). */
  keys?: Set<string> | null;
}

/** The logs an event concerns: a membership change concerns all of them. */
function eventKeys(e: BusEvent): Set<string> | null {
  if (e.keys !== undefined) return e.keys;
  if (e.kind === "confchg") return (e.keys = null);
  const m = decodeMessage(e.bytes);
  if (isDecodeError(m)) e.keys = new Set();
  else if (m.kind === "checkpoint") e.keys = new Set([m.chunk.key]);
  else e.keys = new Set(m.items.map((i) => i.key));
  return e.keys;
}

interface Unordered {
  from: NodeId;
  bytes: Uint8Array;
  at: number;
  seq: number;
}

interface Queued {
  event: BusEvent;
  at: number;
}

const EMPTY = new Uint8Array(0);
const NO_CHANGE: Confchg = { members: [], left: [], joined: [] };

/** The ordered bus (see the module doc). */
export class SimBus {
  #members: NodeId[] = [];
  #unordered: Unordered[] = [];
  #lastSendAt = new Map<NodeId, number>();
  #lastDeliverAt = new Map<NodeId, number>();
  #inbox = new Map<NodeId, Queued[]>();
  #index = 0;
  #seq = 0;
  /** Delivery lag of one node for one event (ms); set by the driver. */
  lag: (node: NodeId) => number = () => 0;

  /** Current members, ascending. */
  get members(): readonly NodeId[] {
    return this.#members;
  }

  /** Position of the last event put in the order. */
  get lastIndex(): number {
    return this.#index;
  }

  /** Messages sent but not yet ordered. */
  get unorderedCount(): number {
    return this.#unordered.length;
  }

  /** A node's multicast, ordered no earlier than `at` (and after its earlier messages). */
  mcast(from: NodeId, bytes: Uint8Array, at: number): void {
    const after = this.#lastSendAt.get(from) ?? -Infinity;
    const t = Math.max(at, after);
    this.#lastSendAt.set(from, t);
    this.#unordered.push({ from, bytes, at: t, seq: this.#seq++ });
  }

  /** When the next message gets ordered (Infinity: none waiting). */
  nextOrderTime(): number {
    let t = Infinity;
    for (const u of this.#unordered) if (u.at < t) t = u.at;
    return t;
  }

  /** Puts the next `count` messages waiting (oldest first) in the order; returns how many. */
  orderNext(count: number, now: number): number {
    const all = [...this.#unordered].sort((a, b) => a.at - b.at || a.seq - b.seq);
    const take = all.slice(0, count);
    const taken = new Set(take);
    this.#unordered = this.#unordered.filter((u) => !taken.has(u));
    for (const u of take) this.#orderMessage(u.from, u.bytes, now, false);
    return take.length;
  }

  /** Puts every message due by `now` in the order. */
  orderDue(now: number): void {
    if (this.#unordered.length === 0) return;
    const due = this.#unordered.filter((u) => u.at <= now);
    if (due.length === 0) return;
    this.#unordered = this.#unordered.filter((u) => u.at > now);
    due.sort((a, b) => a.at - b.at || a.seq - b.seq);
    for (const u of due) this.#orderMessage(u.from, u.bytes, now, false);
  }

  #orderMessage(from: NodeId, bytes: Uint8Array, now: number, injected: boolean): void {
    // CPG delivers only messages of members: a node that left has nothing ordered after that.
    if (!this.#members.includes(from)) return;
    this.#append({ index: 0, kind: "msg", from, bytes, change: NO_CHANGE, injected }, now);
  }

  #append(event: BusEvent, now: number): void {
    event.index = ++this.#index;
    for (const r of this.#members) {
      const at = Math.max(this.#lastDeliverAt.get(r) ?? 0, now + this.lag(r));
      this.#lastDeliverAt.set(r, at);
      let q = this.#inbox.get(r);
      if (q === undefined) {
        q = [];
        this.#inbox.set(r, q);
      }
      q.push({ event, at });
    }
  }

  /** Injects `bytes` as if `from` had multicast them, ordered at once. */
  inject(from: NodeId, bytes: Uint8Array, now: number): void {
    this.#orderMessage(from, bytes, now, true);
  }

  /** `node` joins the group (its first event is this membership change). */
  join(node: NodeId, now: number): void {
    if (this.#members.includes(node)) throw new Error(`Node ${node} is already a member`);
    this.#members = [...this.#members, node].sort((a, b) => a - b);
    this.#inbox.set(node, []);
    this.#lastDeliverAt.set(node, now);
    this.#append({
      index: 0,
      kind: "confchg",
      from: 0,
      bytes: EMPTY,
      change: { members: this.#members, left: [], joined: [node] },
      injected: false,
    }, now);
  }

  /**
   * `node` leaves. Its messages not yet ordered are ordered first (`keep`) or dropped; what is
   * queued for it is dropped (it receives nothing more).
   */
  leave(node: NodeId, reason: LeaveReason, now: number, keep: boolean): void {
    if (!this.#members.includes(node)) return;
    const mine = this.#unordered.filter((u) => u.from === node);
    this.#unordered = this.#unordered.filter((u) => u.from !== node);
    if (keep) {
      mine.sort((a, b) => a.at - b.at || a.seq - b.seq);
      for (const u of mine) this.#orderMessage(u.from, u.bytes, now, false);
    }
    this.#lastSendAt.delete(node);
    this.#members = this.#members.filter((n) => n !== node);
    this.#inbox.delete(node);
    this.#lastDeliverAt.delete(node);
    this.#append({
      index: 0,
      kind: "confchg",
      from: 0,
      bytes: EMPTY,
      change: { members: this.#members, left: [{ node, reason }], joined: [] },
      injected: false,
    }, now);
  }

  /** When `node`'s next event arrives (Infinity: none). */
  nextDeliveryTime(node: NodeId): number {
    const q = this.#inbox.get(node);
    return q !== undefined && q.length > 0 ? q[0].at : Infinity;
  }

  /** Events queued for `node`. */
  queued(node: NodeId): number {
    return this.#inbox.get(node)?.length ?? 0;
  }

  /** Takes `node`'s next event if it has arrived by `now`. */
  take(node: NodeId, now: number): BusEvent | undefined {
    const q = this.#inbox.get(node);
    if (q === undefined || q.length === 0 || q[0].at > now) return undefined;
    return q.shift()!.event;
  }
}

/** A disk write waiting to become durable. */
interface DiskWrite {
  node: NodeId;
  life: number;
  key: string;
  token: number;
  bytes: Uint8Array;
  words: number[];
  full: boolean;
  at: number;
  seq: number;
}

/** One shared log device (the clean bitmap part; the header is implied). */
export class SimDisk {
  /** The durable clean bitmap, or null while never written (a fresh device). */
  durable: Uint8Array | null = null;
  readonly regionCount: number;
  #writes: DiskWrite[] = [];
  #seq = 0;
  /** Writes made durable. */
  writes = 0;

  constructor(regionCount: number) {
    this.regionCount = regionCount;
  }

  /** Writes in flight. */
  get inflight(): number {
    return this.#writes.length;
  }

  /** The node with writes in flight, if any. */
  writer(): NodeId | undefined {
    return this.#writes[0]?.node;
  }

  /** Queues a write that becomes durable at `at`. */
  submit(w: Omit<DiskWrite, "seq">): void {
    this.#writes.push({ ...w, seq: this.#seq++ });
  }

  /** When the next write becomes durable. */
  nextTime(): number {
    let t = Infinity;
    for (const w of this.#writes) if (w.at < t) t = w.at;
    return t;
  }

  /** Makes the writes due by `now` (of `node` only, if given) durable, in order; returns them. */
  completeDue(now: number, node?: NodeId): DiskWrite[] {
    const mine = (w: DiskWrite) => w.at <= now && (node === undefined || w.node === node);
    const due = this.#writes.filter(mine).sort((a, b) => a.at - b.at || a.seq - b.seq);
    if (due.length === 0) return [];
    this.#writes = this.#writes.filter((w) => !mine(w));
    for (const w of due) this.#apply(w);
    return due;
  }

  /** `node` crashed: each write it had in flight lands now (`land(i)`) or is lost. */
  crash(node: NodeId, land: () => boolean): void {
    const mine = this.#writes.filter((w) => w.node === node);
    this.#writes = this.#writes.filter((w) => w.node !== node);
    for (const w of mine.sort((a, b) => a.seq - b.seq)) if (land()) this.#apply(w);
  }

  #apply(w: DiskWrite): void {
    this.writes++;
    if (this.durable === null) this.durable = new Uint8Array(w.bytes.byteLength);
    if (w.full) {
      this.durable.set(w.bytes);
      return;
    }
    for (const i of w.words) this.durable.set(w.bytes.subarray(4 * i, 4 * i + 4), 4 * i);
  }

  /** What a RESUME reads: undefined for a fresh device. */
  load(): DiskImage | undefined {
    if (this.durable === null) return undefined;
    return { nrRegions: this.regionCount, cleanBits: this.durable.slice() };
  }

  /** True when the durable image says region `r` is clean. */
  clean(r: number): boolean {
    return this.durable !== null && (this.durable[r >>> 3] & (1 << (r & 7))) !== 0;
  }
}

/** A request the harness sent to a core and has not seen answered. */
interface Outstanding {
  key: string;
  op: ClusterOp;
  at: number;
  life: number;
  /** IS_CLEAN: other nodes' acknowledged marks on the region when it was sent (node, mark id). */
  heldBy?: [NodeId, number][];
  /** FLUSH: marks acknowledged by this node when it was sent. */
  marked?: number[];
  done: (result: OpResult) => void;
}

/** What one node's kernel holds about one log, seen from its requests and replies. */
interface KernelView {
  /** MARKed (acknowledged) and not cleared since, each with the id of that acknowledgement. */
  marked: Map<number, number>;
  /** Covered by an acknowledged FLUSH and not cleared: the node may write these regions. */
  flushed: Set<number>;
  /** Handed out by GET_RESYNC_WORK, not yet set in sync. */
  recovering: Set<number>;
}

/** A node of the simulated cluster. */
export class SimNode {
  readonly id: NodeId;
  /** Bumped by each new daemon process or bus connection: what it knew before is void. */
  life = 0;
  core: ClusterCore | null = null;
  /** The daemon runs (false after a crash until a restart). */
  up = false;
  /** In the bus membership. */
  connected = false;
  /** Order position of the last event it processed. */
  lastIndex = 0;
  nextTag = 1;
  readonly outstanding = new Map<number, Outstanding>();
  readonly views = new Map<string, KernelView>();
  /** Injected messages delivered to the current core (all must be dropped). */
  injectedSeen = 0;
  /** Log lines of the current core at warn or error level. */
  readonly logLines: string[] = [];

  constructor(id: NodeId) {
    this.id = id;
  }

  view(key: string): KernelView {
    let v = this.views.get(key);
    if (v === undefined) {
      v = { marked: new Map(), flushed: new Set(), recovering: new Set() };
      this.views.set(key, v);
    }
    return v;
  }
}

/** Where a region's write was last acknowledged and by whom, kept after its node is gone. */
interface DeadRegion {
  key: string;
  region: number;
  /** The order position of the node's leave (or of the POSTSUSPEND's reply). */
  index: number;
  node: NodeId;
}

/** Harness settings. */
export interface HarnessOptions {
  core?: ClusterOptions;
  /** Ordering delay of one message (ms). */
  orderDelay?: () => number;
  /** Time a disk write takes to become durable (ms). */
  diskDelay?: () => number;
  /** A crashed node's write in flight lands (true) or is lost. */
  landOnCrash?: () => boolean;
  /** Longest a request to a live, connected daemon may wait (ms) before it is a violation. */
  livenessMs?: number;
  /** Throw on the first violation (scenarios) rather than collect them. */
  throwOnViolation?: boolean;
  /** Keep the cores' log lines (scenario output). */
  keepLogs?: boolean;
}

/** A failed invariant. */
export class Violation extends Error {}

/**
 * The cluster: nodes, bus, disks, and the checks. The driver (random simulator or scenario
 * script) adds nodes, sends requests, and calls {@link step} to let things happen.
 */
export class ClusterHarness {
  now = 0;
  readonly bus = new SimBus();
  readonly nodes = new Map<NodeId, SimNode>();
  readonly disks = new Map<string, SimDisk>();
  readonly configs = new Map<string, LogConfig>();
  readonly violations: string[] = [];
  readonly options: HarnessOptions;
  /** Digest of each log after each order position, as the first member to get there saw it. */
  readonly #digests = new Map<string, Map<number, string>>();
  readonly #dead: DeadRegion[] = [];
  #markIds = 0;
  #instantEvents = 0;
  #selfChecks = 0;
  #lastInstant = -1;
  /** Counters for the report. */
  readonly counts = {
    requests: 0,
    replies: 0,
    messages: 0,
    bytes: 0,
    events: 0,
    checkpoints: 0,
    injected: 0,
    crashes: 0,
    disconnects: 0,
    restarts: 0,
  };
  /**
   * First time some node's marks were released out of sync (a crash, a lost connection, a
   * POSTSUSPEND or DTR): sync counts may go down from then on.
   */
  firstReleaseAt = Infinity;
  /** Called with each reply (after the checks). */
  onReply: (node: SimNode, tag: number, result: OpResult) => void = () => {};
  /** Called with every log line (scenario output). */
  onLog: (node: NodeId, level: string, msg: string) => void = () => {};

  constructor(options: HarnessOptions = {}) {
    this.options = options;
  }

  /** Records a violation (or throws it). */
  fail(msg: string): void {
    const text = `t=${this.now.toFixed(3)}ms: ${msg}`;
    if (this.options.throwOnViolation) throw new Violation(text);
    if (this.violations.length < 100) this.violations.push(text);
  }

  /** Declares a log shared by the nodes. */
  addLog(key: string, config: LogConfig): void {
    this.configs.set(key, config);
    if (config.kind === "clustered-disk") this.disks.set(key, new SimDisk(config.regionCount));
  }

  node(id: NodeId): SimNode {
    const n = this.nodes.get(id);
    if (n === undefined) throw new Error(`No node ${id}`);
    return n;
  }

  /** Starts a daemon on `id` (a new node, or a restart) and joins it to the group. */
  start(id: NodeId): SimNode {
    let n = this.nodes.get(id);
    if (n === undefined) {
      n = new SimNode(id);
      this.nodes.set(id, n);
    }
    if (n.up) throw new Error(`Node ${id} is already up`);
    n.life++;
    n.up = true;
    n.core = new ClusterCore(id, this.options.core);
    n.outstanding.clear();
    n.views.clear();
    n.injectedSeen = 0;
    n.lastIndex = 0;
    this.#connect(n);
    return n;
  }

  #connect(n: SimNode): void {
    n.connected = true;
    this.bus.join(n.id, this.now);
  }

  /**
   * The daemon (and with it, unless `kernelSurvives`, the machine) of `id` dies. Its messages not
   * yet ordered are ordered first (`keep`) or dropped; its disk writes in flight land or not.
   */
  crash(id: NodeId, keep: boolean): void {
    const n = this.node(id);
    if (!n.up) return;
    this.counts.crashes++;
    this.#forget(n);
    if (n.connected) this.bus.leave(id, "crash", this.now, keep);
    n.connected = false;
    n.up = false;
    n.core = null;
    for (const d of this.disks.values()) d.crash(id, this.options.landOnCrash ?? (() => false));
  }

  /** The bus connection of `id` is lost (corosync died under it); the daemon lives on. */
  disconnect(id: NodeId, keep: boolean): Effect[] {
    const n = this.node(id);
    if (!n.up || !n.connected) return [];
    this.counts.disconnects++;
    this.#forget(n);
    this.bus.leave(id, "crash", this.now, keep);
    n.connected = false;
    // The node is fenced from the shared disk like a crashed one: what it had in flight lands
    // now or never (a real write takes milliseconds, failure detection seconds).
    for (const d of this.disks.values()) d.crash(id, this.options.landOnCrash ?? (() => false));
    const effects = n.core!.disconnected();
    this.handleEffects(n, effects);
    return effects;
  }

  /** `id` gets its bus connection back (a new CPG join). */
  reconnect(id: NodeId): void {
    const n = this.node(id);
    if (!n.up || n.connected) return;
    n.life++;
    n.lastIndex = 0;
    this.#connect(n);
  }

  /**
   * The node's daemon is gone from the cluster's point of view: its acknowledged marks must
   * stay dirty on disk until resynced (the cluster put them out of sync), and its recovery
   * assignments and probes are void.
   */
  #forget(n: SimNode): void {
    this.firstReleaseAt = Math.min(this.firstReleaseAt, this.now);
    const index = this.bus.lastIndex + 1 + this.bus.unorderedCount;
    for (const [key, v] of n.views) {
      for (const r of v.flushed) this.#dead.push({ key, region: r, index, node: n.id });
      v.marked.clear();
      v.flushed.clear();
      v.recovering.clear();
    }
  }

  /** Sends a request to `id`'s core; `done` gets the reply. Returns the tag. */
  request(id: NodeId, key: string, op: ClusterOp, done: (r: OpResult) => void = () => {}): number {
    const n = this.node(id);
    if (!n.up || n.core === null) throw new Error(`Node ${id} is down`);
    const config = this.configs.get(key);
    if (config === undefined) throw new Error(`No log ${key}`);
    const tag = n.nextTag++;
    const o: Outstanding = { key, op, at: this.now, life: n.life, done };
    if (op.op === "is_clean") {
      o.heldBy = [];
      for (const m of this.nodes.values()) {
        const id = m.views.get(key)?.marked.get(op.region);
        if (m !== n && m.up && m.connected && id !== undefined) o.heldBy.push([m.id, id]);
      }
    }
    if (op.op === "flush") o.marked = [...n.view(key).marked.keys()];
    if (op.op === "clear") {
      const v = n.view(key);
      for (const r of op.regions) {
        v.marked.delete(r);
        v.flushed.delete(r);
      }
    }
    if (op.op === "set_region_sync") n.view(key).recovering.delete(op.region);
    // A POSTSUSPEND (or DTR) may release marks out of sync: from its order point on, another
    // kernel may see the sync count go down.
    if (op.op === "postsuspend" || op.op === "dtr") {
      this.firstReleaseAt = Math.min(this.firstReleaseAt, this.now);
    }
    n.outstanding.set(tag, o);
    this.counts.requests++;
    if (
      op.op === "resume" && config.kind === "clustered-disk" && n.core.logStatus(key) !== "member"
    ) {
      op.diskImage = this.disks.get(key)!.load();
    }
    this.handleEffects(n, n.core.request({ key, tag, op, config }));
    return tag;
  }

  /** Called with every effect of every core, before it is applied. */
  onEffect: (node: SimNode, effect: Effect) => void = () => {};

  /** Applies a core's effects. */
  handleEffects(n: SimNode, effects: Effect[]): void {
    for (const e of effects) {
      this.onEffect(n, e);
      switch (e.kind) {
        case "reply":
          this.#reply(n, e.tag, e.result);
          break;
        case "mcast": {
          if (e.bytes.byteLength > CPG_MESSAGE_LIMIT) {
            this.fail(`Node ${n.id} multicast ${e.bytes.byteLength} bytes, over CPG's limit`);
          }
          this.counts.messages++;
          this.counts.bytes += e.bytes.byteLength;
          this.bus.mcast(n.id, e.bytes, this.now + (this.options.orderDelay?.() ?? 0));
          break;
        }
        case "diskWrite": {
          const disk = this.disks.get(e.key);
          if (disk === undefined) {
            this.fail(`Node ${n.id} wrote the disk of core log ${e.key}`);
            break;
          }
          const other = disk.writer();
          if (other !== undefined && other !== n.id) {
            this.fail(`Node ${n.id} writes ${e.key} while node ${other}'s write is in flight`);
          }
          disk.submit({
            node: n.id,
            life: n.life,
            key: e.key,
            token: e.token,
            bytes: e.bytes,
            words: e.changes.words,
            full: e.full,
            at: this.now + (this.options.diskDelay?.() ?? 0),
          });
          break;
        }
        case "log":
          if (e.msg.startsWith("Internal error")) this.fail(`Node ${n.id}: ${e.msg}`);
          if (e.msg.includes("sent node")) this.counts.checkpoints++;
          if (this.options.keepLogs || e.level === "error" || e.level === "warn") {
            if (n.logLines.length < 1000) n.logLines.push(`${e.level}: ${e.msg}`);
          }
          this.onLog(n.id, e.level, e.msg);
          break;
      }
    }
  }

  #reply(n: SimNode, tag: number, result: OpResult): void {
    const o = n.outstanding.get(tag);
    if (o === undefined) {
      this.fail(`Node ${n.id} answered request ${tag}, which is not waiting (a second reply?)`);
      return;
    }
    n.outstanding.delete(tag);
    this.counts.replies++;
    this.#checkReply(n, o, result);
    o.done(result);
    this.onReply(n, tag, result);
  }

  /** Checks one reply against what the nodes' kernels were told before its request was sent. */
  #checkReply(n: SimNode, o: Outstanding, result: OpResult): void {
    if (result.errno !== 0) return;
    const v = n.view(o.key);
    const op = o.op;
    switch (op.op) {
      case "mark":
        for (const r of op.regions) if (!v.marked.has(r)) v.marked.set(r, ++this.#markIds);
        return;
      case "flush":
        for (const r of op.marks) if (!v.marked.has(r)) v.marked.set(r, ++this.#markIds);
        for (const r of [...(o.marked ?? []), ...op.marks]) if (v.marked.has(r)) v.flushed.add(r);
        // Invariant 7: what this FLUSH covers is on the disk now.
        this.#checkDisk(o.key);
        return;
      case "postsuspend": {
        // Marks left at POSTSUSPEND are dropped and put out of sync, like a crash's. The
        // kernel leaves some when a write's completion races with the suspend (its worker
        // clears them after dm core's postsuspend).
        if (v.marked.size > 0) this.firstReleaseAt = Math.min(this.firstReleaseAt, this.now);
        const index = n.lastIndex;
        for (const r of v.flushed) this.#dead.push({ key: o.key, region: r, index, node: n.id });
        v.marked.clear();
        v.flushed.clear();
        v.recovering.clear();
        return;
      }
      case "is_clean": {
        if (result.data === undefined || readS64(result.data) !== 1) return;
        if (v.marked.has(op.region)) {
          this.fail(
            `Invariant 1: node ${n.id} was told region ${op.region} of ${o.key} is clean while it holds a mark`,
          );
        }
        for (const [m, id] of o.heldBy ?? []) {
          // The same mark, held since before the question was sent (not cleared and re-made).
          const other = this.nodes.get(m);
          if (
            other?.up && other.connected && other.views.get(o.key)?.marked.get(op.region) === id
          ) {
            this.fail(
              `Invariant 1: node ${n.id} was told region ${op.region} of ${o.key} is clean ` +
                `while node ${m} holds a mark acknowledged before the question`,
            );
          }
        }
        return;
      }
      case "get_resync_work": {
        if (result.data === undefined || readS64(result.data) !== 1) return;
        const r = readU64(result.data, 8);
        for (const m of this.nodes.values()) {
          if (m === n || !m.up || !m.connected) continue;
          if (m.views.get(o.key)?.recovering.has(r)) {
            this.fail(
              `Invariant 4: region ${r} of ${o.key} handed to node ${n.id} while node ${m.id} recovers it`,
            );
          }
        }
        v.recovering.add(r);
        return;
      }
    }
  }

  /**
   * Invariants 3 and 7 on the shared disk: every region a live node may write to (an
   * acknowledged FLUSH covered its mark) is dirty on disk, and so is every region a dead node
   * could write to, until a member has it in sync again.
   */
  #checkDisk(key: string): void {
    const disk = this.disks.get(key);
    if (disk === undefined) return;
    for (const n of this.nodes.values()) {
      if (!n.up || !n.connected) continue;
      const v = n.views.get(key);
      if (v === undefined) continue;
      for (const r of v.flushed) {
        if (disk.clean(r)) {
          this.fail(
            `Invariant 7: region ${r} of ${key} is clean on disk although node ${n.id}'s FLUSH covering its mark was answered`,
          );
        }
      }
    }
  }

  #checkDeadRegions(): void {
    if (this.#dead.length === 0) return;
    const keep: DeadRegion[] = [];
    for (const d of this.#dead) {
      let resynced = false;
      for (const n of this.nodes.values()) {
        if (!n.up || !n.connected || n.lastIndex < d.index) continue;
        const replica = n.core!.replica(d.key);
        if (replica !== undefined && replica.isInSync(d.region)) resynced = true;
      }
      if (resynced) continue;
      keep.push(d);
      const disk = this.disks.get(d.key);
      if (disk !== undefined && disk.clean(d.region)) {
        this.fail(
          `Invariant 3: region ${d.region} of ${d.key}, written by node ${d.node} before it left, is clean on disk before any resync`,
        );
      }
    }
    this.#dead.length = 0;
    this.#dead.push(...keep);
  }

  /** Delivers `n`'s next event, if it has arrived; returns whether one was delivered. */
  deliverOne(n: SimNode): boolean {
    const e = this.bus.take(n.id, this.now);
    if (e === undefined) return false;
    this.#noteEvent();
    const core = n.core!;
    let effects: Effect[];
    if (e.kind === "confchg") {
      const left = e.change.left.map((l) => l.node);
      const before = new Map<string, Map<NodeId, number[]>>();
      if (left.length > 0) {
        for (const key of core.logKeys()) {
          const replica = core.replica(key);
          if (replica === undefined) continue;
          const m = new Map<NodeId, number[]>();
          for (const d of left) m.set(d, replica.marksOf(d));
          before.set(key, m);
        }
      }
      effects = core.confchg(e.change);
      // Invariant 3: what the dead node had marked is out of sync on every survivor.
      for (const [key, m] of before) {
        const replica = core.replica(key);
        if (replica === undefined) continue;
        for (const [d, regions] of m) {
          for (const r of regions) {
            if (replica.isInSync(r)) {
              this.fail(
                `Invariant 3: node ${n.id} still has region ${r} of ${key} in sync after node ${d}, which marked it, left`,
              );
            }
          }
        }
      }
    } else {
      if (e.injected) n.injectedSeen++;
      effects = core.deliver(e.from, e.bytes);
    }
    n.lastIndex = e.index;
    this.handleEffects(n, effects);
    this.#checkNode(n, e.index, eventKeys(e));
    return true;
  }

  #noteEvent(): void {
    this.counts.events++;
    if (this.now !== this.#lastInstant) {
      this.#lastInstant = this.now;
      this.#instantEvents = 0;
    }
    if (++this.#instantEvents > MAX_EVENTS_PER_INSTANT) {
      throw new Violation(`More than ${MAX_EVENTS_PER_INSTANT} events at t=${this.now}: livelock`);
    }
  }

  /** Invariants 5 and 6, and the core's own bookkeeping, after `n` processed event `index`. */
  #checkNode(n: SimNode, index: number, keys: Set<string> | null): void {
    const core = n.core!;
    for (const key of core.logKeys()) {
      // A message for other logs leaves this one as it was (its digest is checked when touched).
      if (keys !== null && !keys.has(key)) continue;
      const digest = core.digest(key);
      if (digest === undefined) continue;
      let m = this.#digests.get(key);
      if (m === undefined) {
        m = new Map();
        this.#digests.set(key, m);
      }
      const seen = m.get(index);
      if (seen === undefined) m.set(index, digest);
      else if (seen !== digest) {
        this.fail(
          `Invariant 5/6: node ${n.id}'s state of ${key} after event ${index} differs from another member's\n  ${digest}\n  ${seen}`,
        );
      }
      // The self-check is O(regions): every time on small logs, now and then on big ones.
      if (this.configs.get(key)!.regionCount <= 256 || (this.#selfChecks++ & 15) === 0) {
        const bad = core.checkLog(key);
        if (bad !== undefined) this.fail(`Node ${n.id}, log ${key}: ${bad}`);
      }
      // Invariant 2: nobody's clear removed a mark this node's kernel still holds.
      const replica = core.replica(key)!;
      const v = n.views.get(key);
      if (v !== undefined && v.marked.size > 0) {
        const held = new Set(replica.marksOf(n.id));
        for (const r of v.marked.keys()) {
          if (!held.has(r)) {
            this.fail(
              `Invariant 2: node ${n.id}'s acknowledged mark on region ${r} of ${key} is gone from its replica`,
            );
            break;
          }
        }
      }
    }
    // Dropped: malformed, or (a broken version byte) taken for another clogd release's.
    const dropped = core.stats.malformed + core.stats.foreignVersion;
    if (dropped !== n.injectedSeen) {
      this.fail(
        `Invariant 9: node ${n.id} dropped ${dropped} messages, ${n.injectedSeen} were injected`,
      );
      n.injectedSeen = dropped;
    }
  }

  /** Completes the disk writes due by now (of log `key`, and by `node`, only, if given). */
  completeDisks(key?: string, node?: NodeId): void {
    for (const [k, disk] of this.disks) {
      if (key !== undefined && k !== key) continue;
      for (const w of disk.completeDue(this.now, node)) {
        const n = this.nodes.get(w.node);
        if (n === undefined || !n.up || n.life !== w.life || n.core === null) continue;
        this.handleEffects(n, n.core.diskDurable(w.key, w.token));
      }
    }
  }

  /** Global checks after a step: disks, dead regions, liveness. */
  checkAll(): void {
    for (const key of this.disks.keys()) this.#checkDisk(key);
    this.#checkDeadRegions();
    const limit = this.options.livenessMs;
    if (limit === undefined) return;
    for (const n of this.nodes.values()) {
      if (!n.up) continue;
      for (const [tag, o] of n.outstanding) {
        if (o.life === n.life && this.now - o.at > limit) {
          this.fail(
            `Invariant 8: node ${n.id}'s request ${tag} (${o.op.op} on ${o.key}) waits since t=${
              o.at.toFixed(3)
            }`,
          );
          o.at = Infinity; // once
        }
      }
    }
  }

  /** Prunes digests no live node can still compare with. */
  prune(): void {
    let low = Infinity;
    for (const n of this.nodes.values()) if (n.up && n.connected) low = Math.min(low, n.lastIndex);
    if (low === Infinity) return;
    for (const m of this.#digests.values()) {
      for (const i of m.keys()) if (i < low) m.delete(i);
    }
  }

  /** Calls `tick` on every live core. */
  tick(): void {
    for (const n of this.nodes.values()) {
      if (n.up && n.core !== null) this.handleEffects(n, n.core.tick());
    }
  }

  /** Calls `flush` on every live core. */
  flush(): void {
    for (const n of this.nodes.values()) {
      if (n.up && n.core !== null) this.handleEffects(n, n.core.flush());
    }
  }

  /** Sorted ids of the nodes that are up. */
  upNodes(): SimNode[] {
    return [...this.nodes.values()].filter((n) => n.up).sort((a, b) => a.id - b.id);
  }

  /**
   * Scenario stepping: flush, order everything, deliver everything (nodes in id order, one
   * event each in turn), repeatedly until the bus is empty. Disk writes are not completed.
   */
  deliverAll(only?: NodeId): void {
    for (let round = 0; round < 100_000; round++) {
      this.flush();
      this.bus.orderNext(Infinity, this.now);
      let progress = false;
      for (const n of this.upNodes()) {
        if (!n.connected || (only !== undefined && n.id !== only)) continue;
        if (this.deliverOne(n)) progress = true;
      }
      this.checkAll();
      if (!progress && this.bus.unorderedCount === 0) return;
    }
    throw new Violation("Messages keep flowing: the cluster does not settle");
  }
}

/** Errno name for messages. */
export function errnoName(n: number): string {
  for (const [name, v] of Object.entries(Errno)) if (v === n) return name;
  return n === 0 ? "ok" : `errno ${n}`;
}
