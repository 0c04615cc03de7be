/**
 * The node: the I/O shell around the pure {@link ClusterCore}. It turns decoded kernel requests
 * into core requests, carries out the core's effects (answer the kernel, multicast on the
 * transport, write the disk log) and feeds back what happens (deliveries, membership changes,
 * finished disk writes, ticks).
 *
 * The same node runs standalone (over {@link LocalTransport}: this node is the whole group) and
 * in a cluster (over corosync CPG): one code path, the one the simulator checks.
 *
 * The node keeps what is local to this machine: the kernel's log instances (uuid + luid), their
 * CTR arguments, and their open disk log devices. Instances of one log (same uuid and geometry:
 * a table reload constructs the new table's log before the old one is destroyed) share one
 * cluster log; the cluster hears of this node leaving it only when the last instance goes.
 *
 * @module
 */

import { Errno, logKey, type Reply, type Request, RequestType } from "./kernel/protocol.ts";
import { requestTypeName } from "./kernel/protocol.ts";
import type { DiskImage, LogConfig, NodeId, OpResult } from "./log/types.ts";
import { LogReplica } from "./log/replica.ts";
import { Digest } from "./log/digest.ts";
import { parseCtr } from "./log/ctr.ts";
import { parseOp } from "./log/ops.ts";
import { ctrString } from "./kernel/codec.ts";
import type { Logger } from "./logger.ts";
import type { DiskLog, OpenDiskLog } from "./disk_log.ts";
import {
  CLUSTER_TICK_MS,
  ClusterCore,
  type ClusterOp,
  type ClusterOptions,
  type Effect,
  MAX_LOGS,
  MAX_PENDING_REQUESTS,
} from "./cluster/core.ts";
import type { ClusterTransport } from "./bus/transport.ts";

export { MAX_LOGS, MAX_PENDING_REQUESTS };

/** What the node needs from the outside world. */
export interface NodeIo {
  /** Send a reply to the kernel (or user peer) that made `request`. */
  reply(request: Request, reply: Reply): void;
  /** Open a clustered-disk log device (real files and block devices). */
  openDisk: OpenDiskLog;
}

/** Lifecycle of one log instance on this node. */
export type LogState = "opening" | "constructed" | "resumed" | "suspended" | "destroying";

/** One log instance the kernel constructed on this node. */
interface LogSlot {
  /** uuid + luid: the kernel's instance. */
  key: string;
  /** The cluster-wide log (same on every node): see {@link clusterKey}. */
  clusterKey: string;
  config: LogConfig;
  state: LogState;
  disk: DiskLog | null;
  /** Set while a clustered-disk log's device is being opened. */
  opening: Promise<void> | null;
  /** Set while the disk log is being read for a RESUME. */
  loading: Promise<DiskImage | undefined> | null;
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
  op: ClusterOp["op"];
}

/** Per-node counters for status and benchmarks. */
export interface NodeStats {
  requests: number;
  replies: number;
  errors: number;
  unknownLog: number;
  diskWrites: number;
  diskWriteErrors: number;
}

/** Node options. */
export interface NodeOptions {
  transport: ClusterTransport;
  io: NodeIo;
  logger: Logger;
  cluster?: ClusterOptions;
}

/**
 * The cluster-wide key of a log: its uuid (luids differ between nodes and between a table's
 * old and new instance) and its geometry, so that a reload which changes the geometry (a resize)
 * starts a new log, as the kernel's own logs do.
 */
export function clusterKey(config: LogConfig): string {
  return `${config.uuid}:${config.kind}:${config.regionSize}:${config.regionCount}`;
}

/** The node: kernel requests in, core effects out, replies back. */
export class Node {
  readonly #transport: ClusterTransport;
  readonly #io: NodeIo;
  readonly #log: Logger;
  readonly #core: ClusterCore;
  readonly #logs = new Map<string, LogSlot>();
  readonly #pending = new Map<number, Pending>();
  #nextTag = 1;
  #ticker: ReturnType<typeof setInterval> | null = null;
  /** Disk writes in flight (awaited on shutdown so nothing acknowledged is lost). */
  readonly #inflightWrites = new Set<Promise<unknown>>();
  readonly stats: NodeStats = {
    requests: 0,
    replies: 0,
    errors: 0,
    unknownLog: 0,
    diskWrites: 0,
    diskWriteErrors: 0,
  };

  constructor(options: NodeOptions) {
    this.#transport = options.transport;
    this.#io = options.io;
    this.#log = options.logger;
    this.#core = new ClusterCore(options.transport.nodeId, options.cluster);
  }

  /** Connect the core to the transport and start the tick. */
  start(): void {
    this.#transport.start({
      deliver: (from, bytes) => this.#run(this.#core.deliver(from, bytes)),
      confchg: (change) => this.#run(this.#core.confchg(change)),
      disconnected: (reason) => {
        this.#log.error(`Cluster transport lost: ${reason}`);
        this.#run(this.#core.disconnected());
      },
    });
    this.#ticker = setInterval(() => {
      if (this.#pending.size > 0 || !this.#core.connected) this.#run(this.#core.tick());
    }, CLUSTER_TICK_MS);
  }

  /** This node's id in the group. */
  get nodeId(): NodeId {
    return this.#core.nodeId;
  }

  /** The transport's kind ("standalone", "corosync"). */
  get mode(): string {
    return this.#transport.kind;
  }

  /** True while this node is a member of the group. */
  get connected(): boolean {
    return this.#core.connected;
  }

  /** The core's counters (messages, batches, checkpoints, disk writes). */
  get clusterStats(): ClusterCore["stats"] {
    return this.#core.stats;
  }

  /** Number of log instances known (any state). */
  get logCount(): number {
    return this.#logs.size;
  }

  /** Number of logs resumed on this node (an exit now would stall their I/O). */
  get activeLogCount(): number {
    let n = 0;
    for (const s of this.#logs.values()) if (s.state === "resumed") n++;
    return n;
  }

  /** Requests waiting for the order or the disk. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Handle one decoded kernel request. Never throws. */
  handle(request: Request): void {
    this.stats.requests++;
    this.#dispatch(request);
  }

  /** Send what the core has queued (call once per event-loop turn, after draining the kernel). */
  flush(): void {
    this.#run(this.#core.flush());
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
    if (slot === undefined || slot.state === "destroying") {
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
    if (request.type === RequestType.DTR) return this.#dtr(request, slot);
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
    if (parsed.op === "resume" && slot.disk !== null) return this.#resumeDisk(request, slot);
    this.#submit(request, slot, parsed);
  }

  #submit(request: Request, slot: LogSlot, op: ClusterOp): void {
    const tag = this.#nextTag;
    this.#nextTag = this.#nextTag >= 0xffff_fffe ? 1 : this.#nextTag + 1;
    this.#pending.set(tag, { request, slot, op: op.op });
    this.#run(this.#core.request({ key: slot.clusterKey, tag, op, config: slot.config }));
  }

  /** Carries out the core's effects, in order. */
  #run(effects: Effect[]): void {
    // Every effect is carried out even if one fails: a skipped multicast or disk write would
    // leave the cluster waiting on this node.
    for (const e of effects) {
      try {
        this.#effect(e);
      } catch (err) {
        this.#log.error(`Internal error carrying out a ${e.kind} effect: ${errText(err)}`);
      }
    }
  }

  #effect(e: Effect): void {
    switch (e.kind) {
      case "reply":
        this.#replied(e.tag, e.result);
        break;
      case "mcast":
        this.#transport.mcast(e.bytes);
        break;
      case "diskWrite":
        this.#diskWrite(e);
        break;
      case "log":
        if (e.level === "debug") this.#log.debug(e.msg);
        else if (e.level === "info") this.#log.info(e.msg);
        else if (e.level === "warn") this.#log.warn(e.msg);
        else this.#log.error(e.msg);
        break;
    }
  }

  #replied(tag: number, result: OpResult): void {
    const p = this.#pending.get(tag);
    if (p === undefined) {
      this.#log.error(`Internal error: the core answered unknown request ${tag}`);
      return;
    }
    this.#pending.delete(tag);
    const { request, slot } = p;
    if (result.errno === 0) {
      if (p.op === "resume") slot.state = "resumed";
      if (p.op === "postsuspend") slot.state = "suspended";
    }
    if (p.op === "dtr") return this.#destroyed(request, slot);
    this.#answer(request, { errno: result.errno, data: result.data });
  }

  #diskWrite(e: Extract<Effect, { kind: "diskWrite" }>): void {
    const disk = this.#diskFor(e.key);
    if (disk === null) {
      this.#run(
        this.#core.diskFailed(e.key, e.token, "no instance of the log has its device open"),
      );
      return;
    }
    this.stats.diskWrites++;
    const write = disk.write(e.bytes, e.changes, { sync: e.sync });
    this.#inflightWrites.add(write);
    write.then(
      () => {
        this.#inflightWrites.delete(write);
        this.#run(this.#core.diskDurable(e.key, e.token));
      },
      (err) => {
        this.#inflightWrites.delete(write);
        this.stats.diskWriteErrors++;
        this.#run(this.#core.diskFailed(e.key, e.token, `${disk.describe()}: ${errText(err)}`));
      },
    );
  }

  /** The open device of the newest instance of cluster log `key`. */
  #diskFor(key: string): DiskLog | null {
    let disk: DiskLog | null = null;
    for (const s of this.#logs.values()) if (s.clusterKey === key && s.disk !== null) disk = s.disk;
    return disk;
  }

  #ctr(request: Request): void {
    const { text, countedNul } = ctrString(request.payload);
    const key = logKey(request.uuid, request.luid);
    const known = this.#logs.get(key);
    if (known !== undefined && known.state !== "destroying") {
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
    const bad = LogReplica.check(config);
    if (bad !== undefined) {
      this.#log.error(`CTR for ${request.uuid} rejected: ${bad}`);
      return this.#answer(request, { errno: Errno.EINVAL });
    }
    const slot: LogSlot = {
      key,
      clusterKey: clusterKey(config),
      config,
      state: "opening",
      disk: null,
      opening: null,
      loading: null,
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

  /**
   * A disk log's RESUME on a node that does not hold the log reads the disk first: if nobody in
   * the cluster holds it, this node initializes it from what the disk says. A member resumes
   * from the cluster's state (the disk is only as new as the last flush).
   */
  #resumeDisk(request: Request, slot: LogSlot): void {
    if (this.#core.logStatus(slot.clusterKey) === "member") {
      return this.#submit(request, slot, { op: "resume" });
    }
    // Every kernel thread that got -ESRCH resends CTR and RESUME on its own: RESUMEs arriving
    // while the disk is being read share that read (a second concurrent load is refused by the
    // store, and must not be mistaken for an unreadable device).
    slot.loading ??= this.#loadDisk(slot).finally(() => slot.loading = null);
    slot.loading.then((diskImage) => this.#submit(request, slot, { op: "resume", diskImage }));
  }

  /** Reads the disk log for a RESUME: the image, or a failed one (every region out of sync). */
  async #loadDisk(slot: LogSlot): Promise<DiskImage | undefined> {
    const disk = slot.disk!;
    const mode = slot.reconnect ? "default" : slot.config.sync;
    if (slot.reconnect && slot.config.sync !== "default") {
      this.#log.info(
        `Log ${slot.config.uuid} rebuilt by the kernel after a daemon restart: reading its disk log despite "${slot.config.sync}" in the table`,
      );
    }
    try {
      const { image, warning } = await disk.load(mode);
      if (warning !== undefined) this.#log.warn(`Disk log ${disk.describe()}: ${warning}`);
      return image;
    } catch (err) {
      this.#log.error(
        `Disk log ${disk.describe()} unreadable: ${errText(err)}; every region out of sync`,
      );
      return { nrRegions: 0, cleanBits: new Uint8Array(0), failed: true };
    }
  }

  #dtr(request: Request, slot: LogSlot): void {
    slot.state = "destroying";
    const shared = [...this.#logs.values()].some((s) =>
      s !== slot && s.clusterKey === slot.clusterKey && s.state !== "destroying"
    );
    // Another instance of the log (a reloaded table) keeps this node in the cluster log.
    if (shared) return this.#destroyed(request, slot);
    this.#submit(request, slot, { op: "dtr" });
  }

  /** The core let go of the instance (or another instance keeps the log): close and answer. */
  #destroyed(request: Request, slot: LogSlot): void {
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
    try {
      this.#io.reply(request, reply);
    } catch (err) {
      this.#log.limited(
        "error",
        "reply-failed",
        `Reply to ${requestTypeName(request.type)} seq ${request.seq} failed: ${errText(err)}`,
      );
    }
  }

  /** Wait for disk writes in flight (used before exit). */
  async drain(): Promise<void> {
    while (this.#inflightWrites.size > 0) await Promise.allSettled([...this.#inflightWrites]);
  }

  /** Stop the tick, leave the group, close every disk log (after {@link drain}). */
  async close(): Promise<void> {
    if (this.#ticker !== null) clearInterval(this.#ticker);
    this.#ticker = null;
    await this.drain();
    this.#transport.close();
    for (const slot of this.#logs.values()) {
      if (slot.disk !== null) await slot.disk.close().catch(() => {});
    }
  }

  /** Status of every log instance, for `clogd status` and the SIGUSR2 dump. */
  status(): LogStatus[] {
    const out: LogStatus[] = [];
    for (const slot of this.#logs.values()) {
      const key = slot.clusterKey;
      const replica = this.#core.replica(key);
      const cluster = this.#core.clusterState(key);
      const s = replica?.stats();
      out.push({
        uuid: slot.config.uuid,
        luid: "0x" + slot.config.luid.toString(16),
        clusterKey: key,
        type: slot.config.kind,
        device: slot.disk?.describe() ?? null,
        regionSize: slot.config.regionSize,
        regionCount: slot.config.regionCount,
        state: slot.state,
        cluster: this.#core.logStatus(key) ?? "out",
        nodeId: this.nodeId,
        members: cluster?.members ?? [],
        writer: slot.config.kind === "clustered-disk" ? (cluster?.writer ?? null) : null,
        syncCount: s?.syncCount ?? null,
        cleanCount: s?.cleanCount ?? null,
        outstandingMarks: s?.marks ?? null,
        diskFailed: s?.diskFailed ?? null,
        digest: digestOf(this.#core.digest(key)),
        diskStats: slot.disk?.stats() ?? null,
      });
    }
    return out;
  }
}

/** What `clogd status` shows per log instance. */
export interface LogStatus {
  uuid: string;
  luid: string;
  /** The cluster-wide log this instance belongs to (uuid:kind:regionSize:regionCount). */
  clusterKey: string;
  type: string;
  device: string | null;
  regionSize: number;
  regionCount: number;
  /** The kernel's view of this instance. */
  state: LogState;
  /** This node's place in the cluster log: "member" (holds it), "joining", "out". */
  cluster: string;
  nodeId: NodeId;
  /** Nodes holding the log (empty unless this node is a member). */
  members: NodeId[];
  /** The node writing a clustered-disk log (null for clustered-core or not a member). */
  writer: NodeId | null;
  syncCount: number | null;
  cleanCount: number | null;
  outstandingMarks: number | null;
  diskFailed: boolean | null;
  /** Hash of the replicated state: equal on every member at the same point of the order. */
  digest: string | null;
  diskStats: Record<string, number> | null;
}

const encoder = new TextEncoder();

function cString(s: string): Uint8Array {
  const b = encoder.encode(s);
  const out = new Uint8Array(b.length + 1);
  out.set(b);
  return out;
}

/** The core's digest (long: replica hash and cluster state) as 16 hex digits. */
function digestOf(full: string | undefined): string | null {
  return full === undefined ? null : new Digest().text(full).hex();
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
