/**
 * The node: turns decoded kernel requests into ordered bus entries, applies what the bus
 * delivers to the log replicas, and answers its own kernel's requests from its own replica once
 * they come back in the order (one ordered message per request).
 *
 * I/O enters here only through injected functions (send a reply, open a disk log), so the same
 * code runs over the real netlink socket, in tests and in the simulator.
 *
 * @module
 */

import { Errno, logKey, type Reply, type Request, RequestType } from "./kernel/protocol.ts";
import { requestTypeName } from "./kernel/protocol.ts";
import type { Entry, OrderedBus } from "./bus/types.ts";
import type { LogConfig, NodeId, Op, OpResult } from "./log/types.ts";
import { LogReplica } from "./log/replica.ts";
import { parseCtr } from "./log/ctr.ts";
import { parseOp } from "./log/ops.ts";
import { ctrString } from "./kernel/codec.ts";
import type { Logger } from "./logger.ts";
import type { DiskLog, OpenDiskLog } from "./disk_log.ts";

/**
 * Most kernel requests waiting for their turn in the order or for the disk. The kernel has at
 * most one request in flight per calling thread, so this is never reached by a real kernel; a
 * runaway user peer gets -EAGAIN instead of growing memory without bound.
 */
export const MAX_PENDING_REQUESTS = 65_536;

/** Most logs one daemon serves (each CTR beyond this gets -ENOMEM). */
export const MAX_LOGS = 4096;

/** What the node needs from the outside world. */
export interface NodeIo {
  /** Send a reply to the kernel (or user peer) that made `request`. */
  reply(request: Request, reply: Reply): void;
  /** Open a clustered-disk log device (real files and block devices). */
  openDisk: OpenDiskLog;
}

/** Lifecycle of one log on this node. */
export type LogState = "opening" | "constructed" | "resumed" | "suspended";

/** One log this node serves. */
interface LogSlot {
  key: string;
  config: LogConfig;
  state: LogState;
  replica: LogReplica;
  disk: DiskLog | null;
  /** Set while a clustered-disk log's device is being opened. */
  opening: Promise<void> | null;
  /** True once the replica was initialized by a delivered RESUME. */
  initialized: boolean;
  /** CTR string as received (for the log and status). */
  ctr: string;
  /**
   * Built by the kernel's reconnect path (a re-CTR after -ESRCH: the NUL is counted). The log
   * existed before this daemon started, so its disk log is read whatever `sync`/`nosync` the
   * table says: starting it fresh would report regions clean that had writes in flight.
   */
  reconnect: boolean;
}

interface Pending {
  request: Request;
  slot: LogSlot;
}

/** Per-node counters for status and benchmarks. */
export interface NodeStats {
  requests: number;
  replies: number;
  errors: number;
  unknownLog: number;
  /** FLUSHes (and POSTSUSPENDs) of disk logs answered after the disk. */
  durableWaits: number;
  /** Of those, FLUSHes that dirtied nothing and so started no sync of their own. */
  lazyFlushes: number;
}

/** Node options. */
export interface NodeOptions {
  bus: OrderedBus;
  io: NodeIo;
  logger: Logger;
}

/** The node: kernel requests in, ordered entries out, replies back. */
export class Node {
  readonly #bus: OrderedBus;
  readonly #io: NodeIo;
  readonly #log: Logger;
  readonly #logs = new Map<string, LogSlot>();
  readonly #pending = new Map<number, Pending>();
  #nextTag = 1;
  /** Disk writes in flight (awaited on shutdown so nothing acknowledged is lost). */
  readonly #inflightWrites = new Set<Promise<unknown>>();
  readonly stats: NodeStats = {
    requests: 0,
    replies: 0,
    errors: 0,
    unknownLog: 0,
    durableWaits: 0,
    lazyFlushes: 0,
  };

  constructor(options: NodeOptions) {
    this.#bus = options.bus;
    this.#io = options.io;
    this.#log = options.logger;
    this.#bus.listen({ deliver: (entries) => this.#deliver(entries) });
  }

  /** This node's id on the bus. */
  get nodeId(): NodeId {
    return this.#bus.nodeId;
  }

  /** Number of logs known (any state). */
  get logCount(): number {
    return this.#logs.size;
  }

  /** Number of logs resumed on this node (an exit now would stall their I/O). */
  get activeLogCount(): number {
    let n = 0;
    for (const s of this.#logs.values()) if (s.state === "resumed") n++;
    return n;
  }

  /** Requests waiting for order or disk. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Handle one decoded kernel request. Never throws. */
  handle(request: Request): void {
    this.stats.requests++;
    this.#dispatch(request);
  }

  #dispatch(request: Request): void {
    try {
      this.#handle(request);
    } catch (err) {
      // A bug must not kill the daemon or other logs: answer this one request and log it.
      this.#log.error(
        `Internal error on ${
          requestTypeName(request.type)
        } seq ${request.seq} for ${request.uuid}: ${errText(err)}`,
      );
      this.#answer(request, { errno: Errno.EIO });
    }
  }

  #handle(request: Request): void {
    if (request.type === RequestType.CTR) return this.#ctr(request);
    const slot = this.#find(request);
    if (slot === undefined) {
      if (request.type === RequestType.DTR) {
        // DTR of a log we do not know (e.g. after a restart): nothing to destroy.
        return this.#answer(request, { errno: 0 });
      }
      // -ESRCH makes the kernel re-send CTR and RESUME, then this request: the way a restarted
      // daemon learns the logs it lost. Any other error reaches the mirror as a failed log call.
      this.stats.unknownLog++;
      this.#log.limited(
        "info",
        "unknown-log",
        `${
          requestTypeName(request.type)
        } for unknown log ${request.uuid}: answering -ESRCH so the kernel re-sends CTR`,
      );
      return this.#answer(request, { errno: Errno.ESRCH });
    }
    if (slot.opening !== null) {
      // The kernel sends nothing else before the CTR is answered; a user peer might. Wait for it.
      slot.opening.then(() => this.#dispatch(request));
      return;
    }
    switch (request.type) {
      case RequestType.DTR:
        return this.#dtr(request, slot);
      case RequestType.GET_REGION_SIZE: {
        // Fixed at CTR: answered locally, no order needed.
        const r = slot.replica.apply(this.nodeId, { op: "get_region_size" });
        return this.#answer(request, r);
      }
    }
    const parsed = parseOp(request.type, request.payload);
    if ("errno" in parsed) {
      this.#log.limited(
        "warn",
        "bad-payload",
        `Rejected ${
          requestTypeName(request.type)
        } seq ${request.seq} for ${request.uuid}: ${parsed.reason}`,
      );
      return this.#answer(request, { errno: parsed.errno });
    }
    if (parsed.op === "resume") return this.#resume(request, slot);
    this.#submit(request, slot, parsed);
  }

  #submit(request: Request, slot: LogSlot, op: Op): void {
    if (this.#pending.size >= MAX_PENDING_REQUESTS) {
      this.#log.limited("warn", "pending-full", `Too many pending requests; answering -EAGAIN`);
      return this.#answer(request, { errno: Errno.EAGAIN });
    }
    const tag = this.#nextTag;
    this.#nextTag = this.#nextTag >= 0x3fff_ffff ? 1 : this.#nextTag + 1;
    this.#pending.set(tag, { request, slot });
    const entry: Entry = { key: slot.key, node: this.nodeId, tag, op };
    this.#bus.submit(entry);
  }

  #deliver(entries: readonly Entry[]): void {
    for (const entry of entries) {
      const slot = this.#logs.get(entry.key);
      const mine = entry.node === this.nodeId ? this.#pending.get(entry.tag) : undefined;
      if (mine !== undefined) this.#pending.delete(entry.tag);
      if (slot === undefined || (mine !== undefined && mine.slot !== slot)) {
        // The log was destroyed (DTR) between submit and delivery.
        if (mine !== undefined) this.#answer(mine.request, { errno: Errno.ESRCH });
        continue;
      }
      let result: OpResult;
      try {
        result = slot.replica.apply(entry.node, entry.op);
      } catch (err) {
        this.#log.error(
          `Replica error applying ${entry.op.op} to ${slot.config.uuid}: ${errText(err)}`,
        );
        result = { errno: Errno.EIO };
      }
      if (entry.op.op === "resume" && result.errno === 0) slot.initialized = true;
      if (mine === undefined) continue;
      this.#afterApply(mine.request, slot, entry.op, result);
    }
  }

  #afterApply(request: Request, slot: LogSlot, op: Op, result: OpResult): void {
    if (op.op === "resume" && result.errno === 0) slot.state = "resumed";
    if (op.op === "postsuspend" && result.errno === 0) slot.state = "suspended";
    const flushing = result.needsDurable === true && slot.disk !== null && result.errno === 0;
    const suspending = op.op === "postsuspend" && slot.disk !== null && result.errno === 0;
    if (flushing && !slot.replica.diskDirtied) {
      // Invariant 7 needs only the marks delivered before this FLUSH on disk, and earlier
      // FLUSHes handed them to the store, whose batches complete in order. This one only cleans:
      // its bits are written (a daemon crash keeps them, in the page cache) but not synced, like
      // the kernel's disk log, which skips the cache flush when nothing was dirtied. Writing
      // them matters: a restarted daemon reading stale dirty bits would send writes to one leg
      // until the kernel's next suspend/resume lets it resync (seen under qemu).
      this.stats.durableWaits++;
      this.stats.lazyFlushes++;
      const changes = slot.replica.takeDiskChanges();
      const write = slot.disk!.write(slot.replica.diskBytes(), changes, { sync: false });
      this.#afterDisk(request, result, slot, write);
      return;
    }
    if (flushing || suspending) {
      // Invariant 7: answer a FLUSH only when every change delivered before it is durable. A
      // suspended log is written out whole (clean bits included), so a clean shutdown leaves a
      // clean log.
      this.stats.durableWaits++;
      const changes = slot.replica.takeDiskChanges();
      this.#afterDisk(request, result, slot, slot.disk!.write(slot.replica.diskBytes(), changes));
      return;
    }
    this.#answer(request, result);
  }

  /** Answer `request` once `write` is durable; a failed write fails the log device (status D). */
  #afterDisk(request: Request, result: OpResult, slot: LogSlot, write: Promise<void>): void {
    this.#inflightWrites.add(write);
    write.then(
      () => {
        this.#inflightWrites.delete(write);
        this.#answer(request, result);
      },
      (err) => {
        this.#inflightWrites.delete(write);
        this.#log.error(`Disk log ${slot.config.device} write failed: ${errText(err)}`);
        this.#bus.submit({ key: slot.key, node: this.nodeId, tag: 0, op: { op: "disk_failed" } });
        this.#answer(request, { errno: Errno.EIO });
      },
    );
  }

  #ctr(request: Request): void {
    const { text, countedNul } = ctrString(request.payload);
    const key = logKey(request.uuid, request.luid);
    const known = this.#logs.get(key);
    if (known !== undefined) {
      // A CTR for a log we already serve: a kernel resend or a re-CTR. Answer without payload
      // (a re-CTR offers no room for one) and keep the state.
      if (known.ctr !== text) {
        this.#log.warn(
          `CTR for known log ${request.uuid} with different arguments "${text}" (had "${known.ctr}"); keeping the existing log`,
        );
      }
      const after = known.opening ?? Promise.resolve();
      after.then(() => this.#answer(request, { errno: 0 }));
      return;
    }
    if (this.#logs.size >= MAX_LOGS) {
      this.#log.error(`CTR for ${request.uuid} refused: already serving ${MAX_LOGS} logs`);
      return this.#answer(request, { errno: Errno.ENOMEM });
    }
    const args = parseCtr(text);
    if ("error" in args) {
      this.#log.error(`CTR for ${request.uuid} rejected: ${args.error} (arguments "${text}")`);
      return this.#answer(request, { errno: Errno.EINVAL });
    }
    const config: LogConfig = { ...args, uuid: request.uuid, luid: request.luid };
    const slot: LogSlot = {
      key,
      config,
      state: "opening",
      replica: new LogReplica(config),
      disk: null,
      opening: null,
      initialized: false,
      ctr: text,
      reconnect: countedNul,
    };
    this.#logs.set(key, slot);
    if (config.kind === "clustered-core") {
      slot.state = "constructed";
      this.#log.info(`Log ${request.uuid} constructed: ${text} (${config.regionCount} regions)`);
      return this.#answer(request, { errno: 0 });
    }
    slot.opening = this.#io.openDisk(config).then(
      (disk) => {
        slot.disk = disk;
        slot.opening = null;
        slot.state = "constructed";
        this.#log.info(
          `Log ${request.uuid} constructed: ${text} (${config.regionCount} regions, disk ${disk.describe()})`,
        );
        // The kernel holds the named device open for as long as the log exists (version >= 2).
        // A re-CTR (NUL counted) offers no reply room, and the 2009 protocol had no reply data.
        const wantsName = request.layout === "current" && request.version >= 2 && !countedNul;
        const data = wantsName ? cString(disk.kernelName) : undefined;
        this.#answer(request, { errno: 0, data });
      },
      (err) => {
        this.#logs.delete(key);
        slot.opening = null;
        this.#log.error(`CTR for ${request.uuid} failed: ${errText(err)}`);
        this.#answer(request, { errno: Errno.EINVAL });
      },
    );
  }

  #resume(request: Request, slot: LogSlot): void {
    if (slot.disk !== null && !slot.initialized) {
      // The first RESUME of a disk log reads the disk before entering the order, so every member
      // (one, standalone) starts from the same image.
      const disk = slot.disk;
      const mode = slot.reconnect ? "default" : slot.config.sync;
      if (slot.reconnect && slot.config.sync !== "default") {
        this.#log.info(
          `Log ${slot.config.uuid} rebuilt by the kernel after a daemon restart: reading its disk log despite "${slot.config.sync}" in the table`,
        );
      }
      disk.load(mode).then(
        ({ image, warning }) => {
          if (warning !== undefined) this.#log.warn(`Disk log ${disk.describe()}: ${warning}`);
          this.#submit(request, slot, { op: "resume", diskImage: image });
        },
        (err) => {
          this.#log.error(
            `Disk log ${disk.describe()} unreadable: ${errText(err)}; every region out of sync`,
          );
          this.#submit(request, slot, {
            op: "resume",
            diskImage: { nrRegions: 0, cleanBits: new Uint8Array(0), failed: true },
          });
        },
      );
      return;
    }
    this.#submit(request, slot, { op: "resume" });
  }

  #dtr(request: Request, slot: LogSlot): void {
    this.#logs.delete(slot.key);
    this.#log.info(`Log ${slot.config.uuid} destroyed`);
    const disk = slot.disk;
    if (disk === null) return this.#answer(request, { errno: 0 });
    Promise.allSettled([...this.#inflightWrites]).then(() => disk.close()).then(
      () => this.#answer(request, { errno: 0 }),
      (err) => {
        this.#log.warn(`Closing disk log ${disk.describe()}: ${errText(err)}`);
        this.#answer(request, { errno: 0 });
      },
    );
  }

  #find(request: Request): LogSlot | undefined {
    const exact = this.#logs.get(logKey(request.uuid, request.luid));
    if (exact !== undefined || request.layout === "current") return exact;
    // The 2009 layout has no luid: match by uuid alone.
    for (const slot of this.#logs.values()) if (slot.config.uuid === request.uuid) return slot;
    return undefined;
  }

  #answer(request: Request, reply: Reply): void {
    this.stats.replies++;
    if (reply.errno !== 0) this.stats.errors++;
    this.#io.reply(request, reply);
  }

  /** Wait for disk writes in flight (used before exit). */
  async drain(): Promise<void> {
    while (this.#inflightWrites.size > 0) await Promise.allSettled([...this.#inflightWrites]);
  }

  /** Close every disk log (after {@link drain}). */
  async close(): Promise<void> {
    await this.drain();
    for (const slot of this.#logs.values()) {
      if (slot.disk !== null) await slot.disk.close().catch(() => {});
    }
  }

  /** Status of every log, for `clogd status` and the SIGUSR1 dump. */
  status(): LogStatus[] {
    const out: LogStatus[] = [];
    for (const slot of this.#logs.values()) {
      const s = slot.replica.stats();
      out.push({
        uuid: slot.config.uuid,
        luid: "0x" + slot.config.luid.toString(16),
        type: slot.config.kind,
        device: slot.disk?.describe() ?? null,
        regionSize: slot.config.regionSize,
        regionCount: slot.config.regionCount,
        syncCount: s.syncCount,
        cleanCount: s.cleanCount,
        outstandingMarks: s.marks,
        state: slot.state,
        diskFailed: s.diskFailed,
        nodeId: this.nodeId,
        members: s.members,
        digest: slot.replica.digest(),
        diskStats: slot.disk?.stats() ?? null,
      });
    }
    return out;
  }
}

/** What `clogd status` shows per log. */
export interface LogStatus {
  uuid: string;
  luid: string;
  type: string;
  device: string | null;
  regionSize: number;
  regionCount: number;
  syncCount: number;
  cleanCount: number;
  outstandingMarks: number;
  state: LogState;
  diskFailed: boolean;
  nodeId: NodeId;
  members: NodeId[];
  digest: string;
  diskStats: Record<string, number> | null;
}

const encoder = new TextEncoder();

function cString(s: string): Uint8Array {
  const b = encoder.encode(s);
  const out = new Uint8Array(b.length + 1);
  out.set(b);
  return out;
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
