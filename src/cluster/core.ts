/**
 * The cluster core: one daemon's part of keeping every mirror log coherent across nodes, as a
 * pure state machine. Events in (a local kernel request, a message delivered in the total order,
 * a membership change, a disk write made durable, a tick), effects out (a reply to the kernel, a
 * message to multicast, a disk write, a log line). No I/O, clock or randomness inside: the same
 * code runs over corosync CPG, and in the deterministic simulator (tests/sim/).
 *
 * ## One group, one order
 *
 * A daemon joins ONE CPG group and multicasts every log's traffic in it (the previous daemon used
 * one group per log). One total order for all logs means: requests for many logs travel in one
 * message (the kernel's mirror workers issue them concurrently); a node crash is one membership
 * change, handled at one point of the order for every log; RESUME and POSTSUSPEND cost no CPG
 * join or leave (the previous daemon's fast suspend/resume slept up to 3 s in that path); and
 * CPG's limits on groups per process do not cap the number of logs. The cost is that every
 * daemon sees every message; it skips items for logs it does not hold by their key.
 *
 * ## Who holds a log
 *
 * A node holds a log (its replica is current) from the point in the order where its RESUME was
 * delivered until its DTR (a `leave` entry) or its crash. POSTSUSPEND keeps it holding: it stays
 * in the replica's members in state "suspended" and keeps applying, so it can answer status
 * requests while suspended and needs no checkpoint to resume. When its kernel destroys the log,
 * the node multicasts `leave` and stops at that point.
 *
 * A node whose RESUME is delivered while it does not hold the log is a **joiner**: it buffers
 * every later event of that log until it has a checkpoint, then replays the buffer. Exactly one
 * member sends the checkpoint: the lowest-id member that is not itself still joining, decided
 * by every member at the same point of the order and recorded as a {@link JoinRecord}. Its
 * state is taken right after applying the RESUME (or, if that sender crashes before its last
 * chunk is delivered, by the next one right after the crash: the record's `cut` says how many of
 * the log's events the state already contains, so the joiner skips those in its buffer).
 *
 * A joiner cannot know by itself whether anybody holds the log. So every node that does not hold
 * it answers such a RESUME with a "nack"; holders stay silent, and a node that is itself still
 * joining answers once its own join is decided. When every group member (as of the RESUME) has
 * nacked, nobody holds the log, and the joiner initializes it from its own RESUME (disk image or
 * fresh). If a member left before nacking, the joiner cannot tell a crashed holder from a
 * crashed non-holder: it gives up and answers its kernel -EAGAIN, which resends the RESUME at
 * once (and the disk image is read again, now that the dead node's writes are settled).
 *
 * ## The disk writer
 *
 * Each clustered-disk log has one writer, chosen at the same point of the order by everyone: the
 * initializing node, then it stays writer until it leaves or crashes (a joiner with a lower id
 * does not take over: two writers must never have writes in flight at once). On a crash the
 * lowest-id member takes over at once; on a clean leave the new writer waits for the old one's
 * "final" durable (its last write done). A new writer rewrites the whole bitmap first. Every
 * FLUSH on a disk log gets a number in the order; the writer writes after applying FLUSHes (one
 * write at a time, covering every FLUSH applied so far: group commit) and multicasts "durable up
 * to FLUSH n"; a node answers its kernel's FLUSH only when such a message covers it (invariant 7).
 *
 * ## Answers
 *
 * The originator answers its kernel from its own replica when its own entry comes back in the
 * order: one multicast per request. Reads that cannot be stale in a harmful way (IN_SYNC,
 * GET_SYNC_COUNT, STATUS_*, GET_REGION_SIZE) are answered at once from the local replica: they
 * reflect a prefix of the order, as an ordered answer would, and IN_SYNC is on every I/O path.
 * IS_CLEAN, IS_REMOTE_RECOVERING and GET_RESYNC_WORK go through the order.
 *
 * Every request gets exactly one reply (invariant 8). Nothing waits on a node that is gone:
 * a crash re-chooses the writer and the checkpoint sender at the crash point; requests a joiner
 * cannot answer (its checkpoint already contains them) get -EAGAIN, which the kernel resends.
 * When the node loses the bus ({@link ClusterCore.disconnected}), the cluster has already
 * declared it dead and dropped its marks, so its replicas are stale: they are dropped, and every
 * request is held at most {@link CONNECT_HOLD_TICKS} ticks, then answered -ESRCH. -ESRCH (not
 * -EAGAIN) is what the kernel understands as "the daemon lost this log": it sleeps 2 s, resends
 * CTR until it succeeds, RESUMEs (a fresh join, with a checkpoint) and only then retries the
 * request. -EAGAIN would make it resend at once, forever, against a node that cannot serve it.
 *
 * @module
 */

import { Errno } from "../kernel/protocol.ts";
import { LogReplica, MAX_CHECKPOINT_BYTES } from "../log/replica.ts";
import type { DiskChanges, DiskImage, LogConfig, NodeId, Op, OpResult } from "../log/types.ts";
import {
  BatchBuilder,
  CHECKPOINT_CHUNK_BYTES,
  decodeCheckpointPayload,
  decodeMessage,
  encodeCheckpointChunk,
  encodeCheckpointPayload,
  isDecodeError,
  type Item,
  type JoinRecord,
  MAX_BATCH_ITEMS,
  MAX_CHECKPOINT_CHUNKS,
  MAX_HOLDS_MEMBERS,
  MAX_MESSAGE_BYTES,
  MAX_WIRE_REGION,
  MESSAGE_VERSION,
  type WireOp,
} from "./messages.ts";

/**
 * Most own messages in flight (multicast, not yet delivered back) before request batches wait.
 * While they wait, new requests pile into the next batch: under load a handful of messages carry
 * thousands of requests, and CPG's flow control (CS_ERR_TRY_AGAIN) is rarely reached.
 */
export const MAX_INFLIGHT_MESSAGES = 4;

/**
 * Most local requests waiting at once (queued, in the order, or for the disk). The kernel has at
 * most one request in flight per thread; a runaway user peer gets -EAGAIN instead.
 */
export const MAX_PENDING_REQUESTS = 65_536;

/** Most logs one daemon serves (as the standalone node). */
export const MAX_LOGS = 4096;

/**
 * Most events a joiner buffers for one log while its checkpoint travels. A checkpoint of the
 * largest log takes well under a second to arrive; beyond this the joiner gives up (leaves the
 * log, answers -EAGAIN) rather than grow without bound.
 */
export const MAX_JOIN_BUFFER = 1 << 20;

/**
 * Ticks a request waits for a bus connection (at startup, or after losing it) before it is
 * answered -ESRCH. With the suggested {@link CLUSTER_TICK_MS}, one second: the CPG join at
 * startup takes milliseconds; a lost connection does not come back with the node's state.
 */
export const CONNECT_HOLD_TICKS = 100;

/** Suggested interval between {@link ClusterCore.tick} calls, in milliseconds. */
export const CLUSTER_TICK_MS = 10;

/** Malformed messages logged one by one before only every {@link MALFORMED_LOG_EVERY}th is. */
export const MALFORMED_LOG_FIRST = 16;
/** After the first few, one log line per this many malformed messages. */
export const MALFORMED_LOG_EVERY = 1024;
/** Nodes whose messages of another clogd release are counted apart (for their log lines). */
export const MAX_FOREIGN_VERSION_NODES = 64;

/** A local request: a kernel request already decoded (CTR is handled outside), or DTR. */
export type ClusterOp = Op | { op: "dtr" };

/** One local request. */
export interface ClusterRequest {
  /** Cluster-wide log key: the same on every node (the uuid; luids differ between nodes). */
  key: string;
  /** Caller's handle for the reply, unique among requests not yet answered, 1..2^32-1. */
  tag: number;
  op: ClusterOp;
  /** The log's configuration (from the CTR), to create a replica the first time. */
  config: LogConfig;
}

/** Why a node left the group. */
export type LeaveReason = "leave" | "crash";

/** A membership change of the group, delivered in the total order. */
export interface Confchg {
  /** Members after the change. */
  members: readonly NodeId[];
  left: readonly { node: NodeId; reason: LeaveReason }[];
  joined: readonly NodeId[];
}

/** Log line level. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** What the core asks its caller to do. */
export type Effect =
  /** Answer the local request `tag` (exactly once per request). */
  | { kind: "reply"; tag: number; result: OpResult }
  /** Multicast `bytes` to the group (in the order effects are given: per-sender FIFO matters). */
  | { kind: "mcast"; bytes: Uint8Array }
  /**
   * Write the log's clean bitmap: `bytes` is the whole bitmap (a copy), `changes` the 32-bit words
   * to write (all of them when `full`). Call {@link ClusterCore.diskDurable} with `token` once it
   * is durable, or {@link ClusterCore.diskFailed}.
   */
  | {
    kind: "diskWrite";
    key: string;
    bytes: Uint8Array;
    changes: DiskChanges;
    token: number;
    full: boolean;
    /** Make the write durable (fdatasync); false when it only sets clean bits. */
    sync: boolean;
  }
  | { kind: "log"; level: LogLevel; msg: string };

/** Tunables (defaults are the named limits). */
export interface ClusterOptions {
  maxInflightMessages?: number;
  maxBatchItems?: number;
  maxMessageBytes?: number;
  checkpointChunkBytes?: number;
  maxPendingRequests?: number;
  maxJoinBuffer?: number;
  connectHoldTicks?: number;
}

/** Where this node is with one log. */
export type LogStatus = "out" | "joining" | "member";

/** Counters for status and benchmarks. */
export interface ClusterStats {
  requests: number;
  replies: number;
  localReplies: number;
  messagesSent: number;
  batchesSent: number;
  itemsSent: number;
  entriesSent: number;
  checkpointsSent: number;
  checkpointChunksSent: number;
  malformed: number;
  /** Messages from a clogd of another release (another message format version), dropped. */
  foreignVersion: number;
  joinsByInit: number;
  joinsByCheckpoint: number;
  joinsAbandoned: number;
  diskWrites: number;
  fullDiskWrites: number;
}

/** The replicated per-log state besides the replica, for tests and status. */
export interface ClusterLogState {
  status: LogStatus;
  members: NodeId[];
  writer: NodeId;
  handoffFrom: NodeId;
  flushSeq: number;
  durableSeq: number;
  joins: JoinRecord[];
}

interface Pending {
  tag: number;
  key: string;
  op: ClusterOp;
  config: LogConfig;
  state: "queued" | "sent" | "durable" | "held" | "waiting";
  heldSince: number;
  /** Was waiting when the bus connection was lost: answered -ESRCH (DTR: 0). */
  lost: boolean;
}

/** One event of one log, as a joiner buffers it. */
type Buffered =
  /** `group`: for our own RESUME, the group when it was delivered (who must nack). */
  | { kind: "item"; from: NodeId; item: Item; group?: readonly NodeId[] }
  | {
    kind: "chunk";
    from: NodeId;
    joiner: NodeId;
    joinTag: number;
    cut: number;
    index: number;
    total: number;
    /** Kept for chunks addressed to this node only. */
    payload?: Uint8Array;
  }
  | { kind: "confchg"; left: NodeId[] };

interface Assembly {
  sender: NodeId;
  cut: number;
  total: number;
  chunks: Uint8Array[];
  bytes: number;
}

/** This node's own join of a log. */
interface OwnJoin {
  tag: number;
  image: DiskImage | undefined;
  /** False if the RESUME came back without a local request (then it cannot initialize). */
  haveRequest: boolean;
  /** Group members (at the RESUME) that have neither nacked nor left. */
  outstanding: Set<NodeId>;
  /** One of them left before nacking: it may have held the log. */
  lostResponder: boolean;
  buffer: Buffered[];
  assembly: Assembly | null;
}

interface LogState {
  key: string;
  config: LogConfig;
  disk: boolean;
  status: LogStatus;
  /** This node started a join of the log since it first saw it (so the kernel has resumed it). */
  everResumed: boolean;
  /** Answers for a log not resumed here yet. */
  scratch: LogReplica | null;
  replica: LogReplica | null;
  // Replicated (members only; carried in checkpoints).
  members: Set<NodeId>;
  writer: NodeId;
  handoffFrom: NodeId;
  flushSeq: number;
  durableSeq: number;
  joins: Map<NodeId, JoinRecord>;
  // Local.
  flushWaits: { tag: number; seq: number; result: OpResult }[];
  write: { token: number; covers: number } | null;
  issuedUpTo: number;
  needFull: boolean;
  /** Left the log while its writer: finishing the last write, then "final". */
  retiring: boolean;
  /** The DTR waiting for that (0: none). */
  retireTag: number;
  join: OwnJoin | null;
}

/** Reads a member answers from its own replica at once (see the module doc). */
const LOCAL_READS = new Set(["in_sync", "get_sync_count", "status_info"]);

function ascending(a: number, b: number): number {
  return a - b;
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The cluster core of one node. See the module doc. */
export class ClusterCore {
  readonly nodeId: NodeId;
  readonly stats: ClusterStats = {
    requests: 0,
    replies: 0,
    localReplies: 0,
    messagesSent: 0,
    batchesSent: 0,
    itemsSent: 0,
    entriesSent: 0,
    checkpointsSent: 0,
    checkpointChunksSent: 0,
    malformed: 0,
    foreignVersion: 0,
    joinsByInit: 0,
    joinsByCheckpoint: 0,
    joinsAbandoned: 0,
    diskWrites: 0,
    fullDiskWrites: 0,
  };
  readonly #maxInflight: number;
  readonly #maxItems: number;
  readonly #maxBytes: number;
  readonly #chunkBytes: number;
  readonly #maxPending: number;
  readonly #maxJoinBuffer: number;
  readonly #holdTicks: number;

  #out: Effect[] = [];
  readonly #pending = new Map<number, Pending>();
  /** Own request entries not yet sent, in arrival order. */
  #queue: Item[] = [];
  /** Nacks and durables to send; they do not wait for the in-flight window. */
  #control: Item[] = [];
  #inflight = 0;
  /** Numbers of own messages in flight, oldest first. */
  #sent: number[] = [];
  #nextNumber = 0;
  readonly #logs = new Map<string, LogState>();
  /** Messages of another release seen per sender (at most {@link MAX_FOREIGN_VERSION_NODES}). */
  readonly #foreignVersions = new Map<NodeId, number>();
  #connected = false;
  #group: NodeId[] = [];
  #ticks = 0;
  #nextToken = 1;

  /** The core of node `nodeId` (not connected until a membership change includes it). */
  constructor(nodeId: NodeId, options: ClusterOptions = {}) {
    if (!Number.isInteger(nodeId) || nodeId < 1 || nodeId > 0xffffffff) {
      throw new RangeError(`Node id must be 1..2^32-1, got ${nodeId}`);
    }
    this.nodeId = nodeId;
    this.#maxInflight = options.maxInflightMessages ?? MAX_INFLIGHT_MESSAGES;
    this.#maxItems = options.maxBatchItems ?? MAX_BATCH_ITEMS;
    this.#maxBytes = options.maxMessageBytes ?? MAX_MESSAGE_BYTES;
    this.#chunkBytes = options.checkpointChunkBytes ?? CHECKPOINT_CHUNK_BYTES;
    this.#maxPending = options.maxPendingRequests ?? MAX_PENDING_REQUESTS;
    this.#maxJoinBuffer = options.maxJoinBuffer ?? MAX_JOIN_BUFFER;
    this.#holdTicks = options.connectHoldTicks ?? CONNECT_HOLD_TICKS;
    if (!(this.#maxInflight >= 1)) throw new RangeError("maxInflightMessages must be >= 1");
    if (this.#chunkBytes < 64 || this.#chunkBytes > this.#maxBytes - 1024) {
      throw new RangeError(`Checkpoint chunks must be 64..${this.#maxBytes - 1024} bytes`);
    }
    // Validates the batch limits once, here.
    new BatchBuilder({ maxBytes: this.#maxBytes, maxItems: this.#maxItems });
  }

  // ---------------------------------------------------------------------------------------------
  // Queries

  /** True while the node is a member of the group. */
  get connected(): boolean {
    return this.#connected;
  }

  /** Local requests not answered yet. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Own messages multicast and not yet delivered back. */
  get inflight(): number {
    return this.#inflight;
  }

  /** Keys of the logs this node knows. */
  logKeys(): string[] {
    return [...this.#logs.keys()].sort();
  }

  /** Where this node is with log `key` (undefined: unknown). */
  logStatus(key: string): LogStatus | undefined {
    return this.#logs.get(key)?.status;
  }

  /** The current replica of `key` when this node holds it (read it; never apply to it). */
  replica(key: string): LogReplica | undefined {
    const log = this.#logs.get(key);
    return log?.status === "member" && log.replica !== null ? log.replica : undefined;
  }

  /** The replicated cluster state of `key`, when held. */
  clusterState(key: string): ClusterLogState | undefined {
    const log = this.#logs.get(key);
    if (log === undefined || log.status !== "member") return undefined;
    return {
      status: log.status,
      members: [...log.members].sort(ascending),
      writer: log.writer,
      handoffFrom: log.handoffFrom,
      flushSeq: log.flushSeq,
      durableSeq: log.durableSeq,
      joins: this.#sortedJoins(log).map((j) => ({ ...j })),
    };
  }

  /**
   * A hash of everything replicated about `key` (replica and cluster state): equal on every
   * member at the same point of the order. Undefined when not held.
   */
  digest(key: string): string | undefined {
    const s = this.clusterState(key);
    const replica = this.replica(key);
    if (s === undefined || replica === undefined) return undefined;
    const joins = s.joins.map((j) =>
      `${j.joiner}:${j.tag}:${j.sender}:${j.cut}:${j.count}:${j.errno}`
    );
    return `${replica.digest()}|${
      s.members.join(",")
    }|w${s.writer}|h${s.handoffFrom}|f${s.flushSeq}` +
      `|d${s.durableSeq}|${joins.join(";")}`;
  }

  /**
   * Checks the core's own bookkeeping of `key` against its replica (O(regions); tests and the
   * simulator). Returns the first problem found, or undefined.
   */
  checkLog(key: string): string | undefined {
    const log = this.#logs.get(key);
    if (log === undefined || log.status !== "member" || log.replica === null) return undefined;
    const bad = log.replica.checkInvariants();
    if (bad !== undefined) return bad;
    const members = log.replica.stats().members;
    const mine = [...log.members].sort(ascending);
    if (members.join(",") !== mine.join(",")) {
      return `Members ${mine.join(",")} but the replica has ${members.join(",")}`;
    }
    if (log.durableSeq > log.flushSeq) return "Durable beyond the last FLUSH";
    if (log.disk && log.members.size > 0 && !log.members.has(log.writer)) {
      return `Writer ${log.writer} is not a member`;
    }
    if (!log.members.has(this.nodeId)) return "This node holds the log but is not a member";
    for (const j of log.joins.values()) {
      if (j.errno === 0 && !log.members.has(j.joiner)) return `Joiner ${j.joiner} is not a member`;
    }
    return undefined;
  }

  // ---------------------------------------------------------------------------------------------
  // Inputs

  /** A local kernel request. Does not send anything: call {@link flush} after a burst. */
  request(req: ClusterRequest): Effect[] {
    this.#out = [];
    try {
      this.#request(req);
    } catch (err) {
      this.#log("error", `Internal error on request ${req.tag} (${req.op?.op}): ${errText(err)}`);
      if (this.#pending.has(req.tag)) this.#reply(req.tag, { errno: Errno.EIO });
    }
    return this.#take();
  }

  /** A message delivered by the bus, in the total order (own messages included). */
  deliver(from: NodeId, bytes: Uint8Array): Effect[] {
    this.#out = [];
    try {
      this.#deliver(from, bytes);
      this.#flush();
    } catch (err) {
      this.#log("error", `Internal error delivering a message from node ${from}: ${errText(err)}`);
    }
    return this.#take();
  }

  /** A membership change, in the total order. */
  confchg(change: Confchg): Effect[] {
    this.#out = [];
    try {
      this.#confchg(change);
      this.#flush();
    } catch (err) {
      this.#log("error", `Internal error in a membership change: ${errText(err)}`);
    }
    return this.#take();
  }

  /** The disk write `token` of log `key` is durable. */
  diskDurable(key: string, token: number): Effect[] {
    this.#out = [];
    try {
      this.#writeDone(key, token, false);
      this.#flush();
    } catch (err) {
      this.#log("error", `Internal error after a disk write of ${key}: ${errText(err)}`);
    }
    return this.#take();
  }

  /** The disk write `token` of log `key` failed: the FLUSHes it covered fail with -EIO. */
  diskFailed(key: string, token: number, reason: string): Effect[] {
    this.#out = [];
    try {
      this.#log("error", `Disk log write of ${key} failed: ${reason}`);
      this.#writeDone(key, token, true);
      this.#flush();
    } catch (err) {
      this.#log("error", `Internal error after a failed disk write of ${key}: ${errText(err)}`);
    }
    return this.#take();
  }

  /** Send what is queued, within the in-flight window. Call after each burst of requests. */
  flush(): Effect[] {
    this.#out = [];
    this.#flush();
    return this.#take();
  }

  /** Time passes by one tick: expires held requests, then flushes. */
  tick(): Effect[] {
    this.#out = [];
    this.#ticks++;
    for (const p of [...this.#pending.values()]) {
      if (p.state === "held" && this.#ticks - p.heldSince >= this.#holdTicks) {
        this.#answerHeld(p);
      }
    }
    this.#flush();
    return this.#take();
  }

  /**
   * The bus connection is gone (corosync died under us, or CPG dispatch failed). The others see
   * this node leave and drop its marks; its replicas are stale from now on and are dropped.
   */
  disconnected(): Effect[] {
    this.#out = [];
    this.#disconnect("the bus connection was lost");
    return this.#take();
  }

  // ---------------------------------------------------------------------------------------------
  // Requests

  #take(): Effect[] {
    const out = this.#out;
    this.#out = [];
    return out;
  }

  #log(level: LogLevel, msg: string): void {
    this.#out.push({ kind: "log", level, msg });
  }

  #reply(tag: number, result: OpResult): void {
    const p = this.#pending.get(tag);
    if (p === undefined) {
      this.#log("error", `Internal error: a second answer for request ${tag}`);
      return;
    }
    this.#pending.delete(tag);
    this.stats.replies++;
    this.#out.push({ kind: "reply", tag, result });
  }

  #request(req: ClusterRequest): void {
    this.stats.requests++;
    const { tag } = req;
    if (!Number.isInteger(tag) || tag < 1 || tag > 0xffffffff || this.#pending.has(tag)) {
      // Answering would answer the other request with this tag: log it and drop this one.
      this.#log("error", `Request tag ${tag} is invalid or already waiting; request dropped`);
      return;
    }
    const p: Pending = {
      tag,
      key: req.key,
      op: req.op,
      config: req.config,
      state: "waiting",
      heldSince: 0,
      lost: false,
    };
    this.#pending.set(tag, p);
    if (this.#pending.size > this.#maxPending) {
      this.#log("warn", `More than ${this.#maxPending} requests waiting: answering -EAGAIN`);
      return this.#reply(tag, { errno: Errno.EAGAIN });
    }
    if (typeof req.op !== "object" || req.op === null || typeof req.op.op !== "string") {
      return this.#reply(tag, { errno: Errno.EINVAL, reason: "Request without an op" });
    }
    let log = this.#logs.get(req.key);
    if (log === undefined) {
      if (this.#logs.size >= MAX_LOGS) {
        this.#log("error", `Request for ${req.key} refused: already serving ${MAX_LOGS} logs`);
        return this.#reply(tag, { errno: Errno.ENOMEM });
      }
      const made = this.#newLog(req.key, req.config);
      if (typeof made === "string") {
        this.#log("error", `Log ${req.key} has a bad configuration: ${made}`);
        return this.#reply(tag, { errno: Errno.EINVAL, reason: made });
      }
      log = made;
    }
    if (req.op.op !== "dtr" && req.op.op !== "resume") {
      const bad = validate(req.op, log.config.regionCount);
      if (bad !== undefined) return this.#reply(tag, { errno: Errno.EINVAL, reason: bad });
    }
    if (req.op.op === "get_region_size" || req.op.op === "status_table") {
      // Fixed at CTR: answered whatever the cluster does. The kernel asks GET_REGION_SIZE while
      // loading the table, on a path that does not retry: an error there fails the table load.
      this.stats.localReplies++;
      return this.#reply(tag, log.scratch!.apply(this.nodeId, req.op));
    }
    if (!this.#connected) {
      p.state = "held";
      p.heldSince = this.#ticks;
      return;
    }
    this.#dispatch(p);
  }

  #newLog(key: string, config: LogConfig): LogState | string {
    let scratch: LogReplica;
    try {
      scratch = new LogReplica(config);
    } catch (err) {
      return errText(err);
    }
    const log: LogState = {
      key,
      config,
      disk: config.kind === "clustered-disk",
      status: "out",
      everResumed: false,
      scratch,
      replica: null,
      members: new Set(),
      writer: 0,
      handoffFrom: 0,
      flushSeq: 0,
      durableSeq: 0,
      joins: new Map(),
      flushWaits: [],
      write: null,
      issuedUpTo: 0,
      needFull: false,
      retiring: false,
      retireTag: 0,
      join: null,
    };
    this.#logs.set(key, log);
    return log;
  }

  /** Routes a request once connected. */
  #dispatch(p: Pending): void {
    let log = this.#logs.get(p.key);
    if (log === undefined) {
      const made = this.#newLog(p.key, p.config);
      if (typeof made === "string") {
        return this.#reply(p.tag, { errno: Errno.EINVAL, reason: made });
      }
      log = made;
    }
    const op = p.op;
    if (op.op === "dtr") {
      if (log.status === "out" && !this.#ownTraffic(log.key)) {
        if (log.retiring) {
          log.retireTag = p.tag;
          return;
        }
        this.#logs.delete(log.key);
        return this.#reply(p.tag, { errno: 0 });
      }
      return this.#enqueue(p, { op: "leave" });
    }
    if (op.op === "resume") {
      return this.#enqueue(p, { op: "resume", join: log.status !== "member" });
    }
    if (log.status === "member") {
      if (LOCAL_READS.has(op.op)) {
        this.stats.localReplies++;
        return this.#reply(p.tag, log.replica!.apply(this.nodeId, op));
      }
      return this.#enqueue(p, toWire(op));
    }
    // Joining, or our RESUME is on its way: the request follows it in the order (and is answered
    // once the log is held here, or -EAGAIN if the join fails).
    if (log.status === "joining" || this.#resumeOnItsWay(log.key)) {
      return this.#enqueue(p, toWire(op));
    }
    // Not held here. Before this node's first RESUME of the log the kernel only asks status
    // questions (GET_SYNC_COUNT before the resume, dmsetup status): answer them as a log not yet
    // resumed. Once it has resumed, the kernel believes the log is active: -ESRCH makes it
    // re-CTR and RESUME (a new join) before retrying. A guess ("not in sync") would send its
    // writes to one leg while the status says in sync.
    if (log.everResumed) return this.#reply(p.tag, { errno: Errno.ESRCH });
    switch (op.op) {
      case "mark":
      case "set_region_sync":
        return this.#reply(p.tag, { errno: Errno.ESRCH });
      case "flush":
        if (op.marks.length > 0) return this.#reply(p.tag, { errno: Errno.ESRCH });
        return this.#reply(p.tag, { errno: 0 });
      case "clear":
      case "presuspend":
      case "postsuspend":
        return this.#reply(p.tag, { errno: 0 });
      default:
        this.stats.localReplies++;
        return this.#reply(p.tag, log.scratch!.apply(this.nodeId, op));
    }
  }

  /** True when an own RESUME of `key` is queued or in the order. */
  #resumeOnItsWay(key: string): boolean {
    for (const p of this.#pending.values()) {
      if (p.key === key && p.op.op === "resume" && (p.state === "queued" || p.state === "sent")) {
        return true;
      }
    }
    return false;
  }

  /** True when own entries for `key` are queued or in the order. */
  #ownTraffic(key: string): boolean {
    for (const p of this.#pending.values()) {
      if (p.key === key && (p.state === "queued" || p.state === "sent")) return true;
    }
    return false;
  }

  #enqueue(p: Pending, op: WireOp): void {
    p.state = "queued";
    this.#queue.push({ kind: "entry", key: p.key, tag: p.tag, op });
  }

  #answerHeld(p: Pending): void {
    if (p.op.op === "dtr") return this.#reply(p.tag, { errno: 0 });
    this.#reply(p.tag, { errno: Errno.ESRCH });
  }

  // ---------------------------------------------------------------------------------------------
  // Sending

  #flush(): void {
    if (!this.#connected) return;
    for (;;) {
      const canSendRequests = this.#queue.length > 0 && this.#inflight < this.#maxInflight;
      if (this.#control.length === 0 && !canSendRequests) return;
      const b = new BatchBuilder({ maxBytes: this.#maxBytes, maxItems: this.#maxItems });
      let c = 0;
      while (c < this.#control.length && b.tryAdd(this.#control[c])) c++;
      this.#control = this.#control.slice(c);
      let q = 0;
      if (canSendRequests) {
        while (q < this.#queue.length && b.tryAdd(this.#queue[q])) {
          const item = this.#queue[q] as Extract<Item, { kind: "entry" }>;
          const p = this.#pending.get(item.tag);
          if (p !== undefined && p.state === "queued") p.state = "sent";
          q++;
        }
        this.#queue = this.#queue.slice(q);
      }
      if (b.count === 0) throw new Error("An item does not fit an empty message");
      this.stats.batchesSent++;
      this.stats.itemsSent += b.count;
      this.stats.entriesSent += q;
      this.#mcast((n) => b.finish(n));
    }
  }

  /** Multicasts the message `encode` makes with the next message number. */
  #mcast(encode: (number: number) => Uint8Array): void {
    const number = this.#nextNumber;
    this.#nextNumber = (this.#nextNumber + 1) & 0xffff;
    const bytes = encode(number);
    this.#inflight++;
    this.#sent.push(number);
    this.stats.messagesSent++;
    this.#out.push({ kind: "mcast", bytes });
  }

  // ---------------------------------------------------------------------------------------------
  // Delivery

  /**
   * A message from a clogd of another release (its format version is not ours). Every member of
   * our version drops it alike, so our replicas stay equal; but the sender orders the same logs
   * apart from us, so a mixed-version cluster must not run: said loudly, first per node and then
   * every {@link MALFORMED_LOG_EVERY}-th time.
   */
  #foreignVersion(from: NodeId, version: number): void {
    this.stats.foreignVersion++;
    let seen: number;
    if (this.#foreignVersions.has(from) || this.#foreignVersions.size < MAX_FOREIGN_VERSION_NODES) {
      seen = (this.#foreignVersions.get(from) ?? 0) + 1;
      this.#foreignVersions.set(from, seen);
    } else {
      seen = this.stats.foreignVersion; // beyond the nodes counted apart: limited on the total
    }
    if (seen !== 1 && seen % MALFORMED_LOG_EVERY !== 0) return;
    this.#log(
      "error",
      `Node ${from} runs a clogd that speaks cluster message version ${version}; this one speaks ` +
        `${MESSAGE_VERSION}: its messages are ignored (${seen} so far). Every node of the cluster ` +
        "must run the same clogd release: logs it serves are NOT coordinated with this node's",
    );
  }

  #deliver(from: NodeId, bytes: Uint8Array): void {
    if (!this.#connected) return;
    const msg = decodeMessage(bytes);
    // One of ours coming back (CPG delivers our own messages to us, in order): one fewer in
    // flight. Matched by number, so that nothing else claiming to be from us upsets the count.
    if (from === this.nodeId && !isDecodeError(msg) && this.#sent[0] === msg.number) {
      this.#sent.shift();
      this.#inflight = Math.max(0, this.#inflight - 1);
    }
    if (isDecodeError(msg) && msg.version !== undefined) {
      this.#foreignVersion(from, msg.version);
      return;
    }
    if (isDecodeError(msg)) {
      this.stats.malformed++;
      const n = this.stats.malformed;
      if (n <= MALFORMED_LOG_FIRST || n % MALFORMED_LOG_EVERY === 0) {
        this.#log(
          "warn",
          `Dropped a malformed cluster message from node ${from} (${bytes?.byteLength} bytes): ` +
            `${msg.error} (${n} so far)`,
        );
      }
      return;
    }
    if (msg.kind === "checkpoint") {
      const c = msg.chunk;
      const log = this.#logs.get(c.key);
      if (log === undefined) return;
      return this.#route(log, {
        kind: "chunk",
        from,
        joiner: c.joiner,
        joinTag: c.joinTag,
        cut: c.cut,
        index: c.index,
        total: c.total,
        // The bus owns the delivered bytes (CPG reuses its buffer): keep a copy of ours only.
        payload: c.joiner === this.nodeId ? c.payload.slice() : undefined,
      });
    }
    for (const item of msg.items) {
      let log = this.#logs.get(item.key);
      if (log === undefined) {
        const p = item.kind === "entry" && from === this.nodeId
          ? this.#pending.get(item.tag)
          : undefined;
        if (p === undefined || item.kind !== "entry" || item.op.op !== "resume") {
          // A log this node does not know: it holds nothing, so it only nacks joins.
          if (
            item.kind === "entry" && item.op.op === "resume" && item.op.join && from !== this.nodeId
          ) {
            this.#nack(item.key, from, item.tag);
          } else if (p !== undefined) {
            this.#ownWhileOut(undefined, item as Extract<Item, { kind: "entry" }>);
          }
          continue;
        }
        const made = this.#newLog(item.key, p.config);
        if (typeof made === "string") {
          this.#reply(p.tag, { errno: Errno.EINVAL, reason: made });
          continue;
        }
        log = made;
      }
      const b: Buffered = { kind: "item", from, item };
      if (from === this.nodeId && item.kind === "entry" && item.op.op === "resume") {
        b.group = this.#group;
      }
      this.#route(log, b);
    }
  }

  #nack(key: string, joiner: NodeId, joinTag: number): void {
    this.#control.push({ kind: "nack", key, joiner, joinTag });
  }

  /**
   * One event of one log, delivered now or replayed from a joiner's buffer (a replay can reach
   * this node's own leave, and after it its own next RESUME: so every event goes through here).
   */
  #route(log: LogState, b: Buffered): void {
    if (log.status === "member") return this.#applyEvent(log, b);
    if (log.status === "joining") return this.#joiningEvent(log, b);
    // Not held here: nack joins, start our own, answer our own leftovers.
    if (b.kind !== "item" || b.item.kind !== "entry") return;
    const item = b.item;
    if (b.from !== this.nodeId) {
      if (item.op.op === "resume" && item.op.join) this.#nack(log.key, b.from, item.tag);
      return;
    }
    if (item.op.op !== "resume") return this.#ownWhileOut(log, item);
    const p = this.#pending.get(item.tag);
    if (!item.op.join) {
      // Sent as a member, delivered after we stopped being one: the members skip it too.
      if (p !== undefined) this.#reply(item.tag, { errno: Errno.EAGAIN });
      return;
    }
    this.#startJoin(log, item.tag, p, b.group ?? this.#group);
  }

  #joiningEvent(log: LogState, b: Buffered): void {
    const j = log.join!;
    this.#buffer(log, b);
    if (log.status !== "joining" || log.join !== j) return;
    switch (b.kind) {
      case "item": {
        const item = b.item;
        if (item.kind === "nack") {
          if (
            item.joiner === this.nodeId && item.joinTag === j.tag && j.outstanding.delete(b.from)
          ) {
            if (j.outstanding.size === 0) this.#resolveAlone(log);
          }
        } else if (
          item.kind === "entry" && item.op.op === "leave" && b.from === this.nodeId &&
          item.tag !== 0
        ) {
          // Our DTR came back while joining: the members drop us here; we stop joining.
          this.#abandonJoin(log, Errno.EAGAIN, "its DTR came first");
          this.#afterOwnLeave(log, this.#pending.has(item.tag) ? item.tag : -1, false);
        }
        return;
      }
      case "chunk":
        if (b.joiner === this.nodeId && b.joinTag === j.tag && b.payload !== undefined) {
          this.#assemble(log, b);
        }
        return;
      case "confchg":
        for (const d of b.left) {
          if (j.outstanding.delete(d)) j.lostResponder = true;
        }
        if (j.outstanding.size === 0) this.#resolveAlone(log);
        return;
    }
  }

  /** An own entry (not a RESUME) delivered for a log this node does not hold (any more). */
  #ownWhileOut(log: LogState | undefined, item: Extract<Item, { kind: "entry" }>): void {
    if (!this.#pending.has(item.tag)) return;
    if (item.op.op === "leave") {
      if (log?.retiring === true) {
        log.retireTag = item.tag;
        return;
      }
      this.#reply(item.tag, { errno: 0 });
      if (log !== undefined && !this.#ownTraffic(log.key)) this.#logs.delete(log.key);
      return;
    }
    // Sent while this node held or joined the log, which it no longer does: the kernel resends
    // it and it takes the right path then.
    this.#reply(item.tag, { errno: Errno.EAGAIN });
  }

  #startJoin(log: LogState, tag: number, p: Pending | undefined, group: readonly NodeId[]): void {
    if (p === undefined) {
      // Cannot happen (our own RESUME without its request). The others see a join: join anyway,
      // but never initialize without the disk image.
      this.#log("error", `Own RESUME ${tag} for ${log.key} came back without its request`);
    }
    const image = p !== undefined && p.op.op === "resume" ? p.op.diskImage : undefined;
    this.#logs.set(log.key, log);
    log.everResumed = true;
    log.status = "joining";
    log.replica = null;
    log.join = {
      tag,
      image,
      haveRequest: p !== undefined,
      outstanding: new Set(group.filter((n) => n !== this.nodeId)),
      lostResponder: false,
      buffer: [],
      assembly: null,
    };
    if (log.join.outstanding.size === 0) this.#resolveAlone(log);
  }

  #buffer(log: LogState, b: Buffered): void {
    const j = log.join!;
    if (j.buffer.length >= this.#maxJoinBuffer) {
      this.#log(
        "error",
        `Log ${log.key}: more than ${this.#maxJoinBuffer} events while waiting for a checkpoint; ` +
          `leaving the log (the kernel resends its RESUME)`,
      );
      this.#giveUpJoin(log);
      return;
    }
    j.buffer.push(b);
  }

  #confchg(change: Confchg): void {
    const members = [...new Set(change.members)].sort(ascending);
    const joinedSelf = change.joined.includes(this.nodeId);
    if (!members.includes(this.nodeId)) {
      if (this.#connected) this.#disconnect("this node is no longer in the group");
      return;
    }
    if (!this.#connected) {
      if (!joinedSelf) return; // stale event from before we (re)joined
      this.#connected = true;
      this.#group = members;
      this.#log("info", `Joined the group: members ${members.join(",")}`);
      for (const p of [...this.#pending.values()]) {
        if (p.state !== "held") continue;
        if (p.lost) this.#answerHeld(p);
        else this.#dispatch(p);
      }
      return;
    }
    this.#group = members;
    if (change.joined.some((n) => n !== this.nodeId)) this.#announceHolds();
    const left = [...new Set(change.left.map((l) => l.node))]
      .filter((n) => n !== this.nodeId)
      .sort(ascending);
    for (const l of change.left) {
      if (l.node === this.nodeId) continue;
      this.#log(
        l.reason === "crash" ? "warn" : "info",
        `Node ${l.node} left the group (${l.reason}): its marks are dropped, its regions resynced`,
      );
    }
    for (const key of [...this.#logs.keys()].sort()) {
      const log = this.#logs.get(key);
      if (log !== undefined) this.#route(log, { kind: "confchg", left });
    }
  }

  /**
   * Others joined the group: a fresh daemon, or the other side of a healed partition. Say which
   * logs this node holds, and with whom: a node that held one of them in a view disjoint from
   * ours served it without us (a split brain), and the two states must not both go on.
   */
  #announceHolds(): void {
    for (const key of [...this.#logs.keys()].sort()) {
      const log = this.#logs.get(key)!;
      if (log.status !== "member" || log.members.size === 0) continue;
      const members = [...log.members].sort(ascending).slice(0, MAX_HOLDS_MEMBERS);
      this.#control.push({ kind: "holds", key, members });
    }
  }

  /**
   * Node `from` holds the log with `members`. If neither view contains the other node, both
   * sides served the log alone (a partition both of whose sides kept quorum: a two-node cluster
   * without fencing). Every node decides alike at this point of the order: the side with the
   * lowest node id keeps its state; the other side drops its replicas (its kernels get -ESRCH,
   * re-CTR and RESUME, and join with a checkpoint). Both sides may have resynced regions the
   * other was writing, so the kept state puts every region out of sync: the whole mirror is
   * resynced from its default leg.
   */
  #applyHolds(log: LogState, from: NodeId, members: readonly NodeId[]): void {
    if (from === this.nodeId || log.members.has(from) || members.includes(this.nodeId)) return;
    if (log.members.size === 0 || members.length === 0) return;
    const ours = [...log.members].sort(ascending);
    const split = `Log ${log.key}: split brain: node ${from} held it with members ` +
      `[${members.join(",")}] while this side held it with [${ours.join(",")}] (both sides of a ` +
      `partition kept quorum: a two-node cluster needs fencing)`;
    if (members[0] < ours[0]) {
      this.#log("error", `${split}; the other side keeps the log, this node drops its state`);
      return this.#dropLog(log);
    }
    const n = log.replica!.resyncAll();
    this.#log(
      "error",
      `${split}; this side keeps the log, every region is resynced (${n} were in sync)`,
    );
    if (log.disk && log.writer === this.nodeId && log.handoffFrom === 0) {
      log.needFull = true;
      this.#maybeWrite(log);
    }
  }

  /**
   * Stops holding `log` at once (its state lost a split brain): what waits on it is answered
   * -ESRCH, so the kernel re-sends CTR and RESUME and joins afresh.
   */
  #dropLog(log: LogState): void {
    for (const w of log.flushWaits) {
      if (this.#pending.has(w.tag)) this.#reply(w.tag, { errno: Errno.ESRCH });
    }
    const fresh = this.#newLog(log.key, log.config);
    if (typeof fresh !== "string") fresh.everResumed = true;
  }

  #disconnect(why: string): void {
    this.#log(
      "error",
      `Cluster connection lost (${why}): every log is dropped until the kernel resumes it`,
    );
    this.#connected = false;
    this.#group = [];
    this.#queue = [];
    this.#control = [];
    this.#inflight = 0;
    this.#sent = [];
    for (const p of this.#pending.values()) {
      p.state = "held";
      p.heldSince = this.#ticks;
      p.lost = true;
    }
    for (const [key, log] of [...this.#logs]) {
      const fresh = this.#newLog(key, log.config);
      if (typeof fresh !== "string") fresh.everResumed = log.everResumed || log.status !== "out";
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Applying (members, and joiners replaying their buffer)

  /** Every event of a log advances the count of each join in progress (for `cut`). */
  #count(log: LogState): void {
    for (const j of log.joins.values()) j.count++;
  }

  #applyItem(log: LogState, from: NodeId, item: Item): void {
    this.#count(log);
    switch (item.kind) {
      case "nack":
        return;
      case "durable":
        return this.#applyDurable(log, from, item);
      case "holds":
        return this.#applyHolds(log, from, item.members);
      case "entry":
        return this.#applyEntry(log, from, item);
    }
  }

  /** True when `e` is our own entry whose request still waits for it. */
  #isMine(from: NodeId, e: Extract<Item, { kind: "entry" }>): boolean {
    if (from !== this.nodeId) return false;
    const p = this.#pending.get(e.tag);
    if (p === undefined || p.state !== "sent") return false;
    return p.op.op === e.op.op || (p.op.op === "dtr" && e.op.op === "leave");
  }

  /** A member applies one event of the log. */
  #applyEvent(log: LogState, b: Buffered): void {
    if (b.kind === "item") return this.#applyItem(log, b.from, b.item);
    if (b.kind === "chunk") return this.#applyChunk(log, b);
    this.#applyConfchg(log, b.left);
  }

  #applyEntry(log: LogState, from: NodeId, e: Extract<Item, { kind: "entry" }>): void {
    const replica = log.replica!;
    const mine = this.#isMine(from, e) ? e.tag : -1;
    const op = e.op;
    if (op.op === "resume") {
      const wasMember = log.members.has(from);
      if (!wasMember && !op.join) {
        if (mine >= 0) this.#reply(mine, { errno: Errno.EAGAIN });
        return;
      }
      const result = replica.apply(from, { op: "resume" });
      if (!wasMember) {
        if (result.errno === 0) log.members.add(from);
        const rec: JoinRecord = {
          joiner: from,
          tag: e.tag,
          sender: this.#pickSender(log, from),
          cut: 0,
          count: 0,
          errno: result.errno,
        };
        log.joins.set(from, rec);
        if (rec.sender === this.nodeId) this.#sendCheckpoint(log, rec);
      }
      if (mine >= 0) this.#reply(mine, result);
      return;
    }
    if (op.op === "leave") return this.#applyLeave(log, from, mine);
    if (!log.members.has(from)) {
      // Only members' requests change the log (a node that left, or never joined, cannot).
      if (mine >= 0) this.#reply(mine, { errno: Errno.EAGAIN });
      return;
    }
    const result = replica.apply(from, fromWire(op));
    // A disk log's FLUSH waits for the disk (invariant 7); so does its POSTSUSPEND, which
    // releases the node's marks: a clean shutdown of the last member leaves a clean log.
    const durable = op.op === "flush"
      ? result.needsDurable === true
      : log.disk && op.op === "postsuspend";
    if (durable && result.errno === 0) {
      log.flushSeq++;
      if (mine >= 0) {
        this.#pending.get(mine)!.state = "durable";
        log.flushWaits.push({ tag: mine, seq: log.flushSeq, result });
      }
      this.#maybeWrite(log);
      return;
    }
    if (mine >= 0) this.#reply(mine, result);
  }

  #applyLeave(log: LogState, node: NodeId, mine: number): void {
    const wasMember = log.members.has(node) || log.joins.has(node);
    if (!wasMember) {
      if (mine >= 0) this.#reply(mine, { errno: 0 });
      return;
    }
    const activeWriter = log.disk && log.writer === node && log.handoffFrom === 0;
    log.replica!.nodeLeft(node);
    log.members.delete(node);
    log.joins.delete(node);
    if (log.disk && log.writer === node) {
      log.writer = this.#pickWriter(log);
      // The old writer may still have a write in flight: the new one waits for its "final".
      if (activeWriter) log.handoffFrom = node;
      this.#log(
        "info",
        `Log ${log.key}: disk writer node ${node} left; node ${log.writer} writes from now on` +
          (activeWriter ? " (after node " + node + "'s last write)" : ""),
      );
      this.#writerChanged(log);
    }
    // A member that left was perhaps a checkpoint sender: it emitted every chunk when it applied
    // the RESUME, before its leave, so they still arrive (and if it crashes, we re-choose).
    if (node === this.nodeId) this.#afterOwnLeave(log, mine, activeWriter);
  }

  /** This node's own leave was applied (or its join ended by its DTR). */
  #afterOwnLeave(log: LogState, dtrTag: number, activeWriter: boolean): void {
    for (const w of log.flushWaits) {
      if (this.#pending.has(w.tag)) this.#reply(w.tag, { errno: Errno.EAGAIN });
    }
    log.flushWaits = [];
    log.status = "out";
    log.replica = null;
    log.members = new Set();
    log.joins = new Map();
    log.join = null;
    if (activeWriter) {
      log.retiring = true;
      if (log.write === null) this.#retire(log, log.issuedUpTo);
    }
    if (log.retiring) {
      if (dtrTag >= 0) log.retireTag = dtrTag;
      return;
    }
    if (dtrTag >= 0 && this.#pending.has(dtrTag)) this.#reply(dtrTag, { errno: 0 });
    if (!this.#ownTraffic(log.key)) this.#logs.delete(log.key);
  }

  /** A leaving writer's last write is done: tell the new writer it may start. */
  #retire(log: LogState, covers: number): void {
    this.#control.push({ kind: "durable", key: log.key, seq: covers, failed: false, final: true });
    log.retiring = false;
    if (log.retireTag > 0 && this.#pending.has(log.retireTag)) {
      this.#reply(log.retireTag, { errno: 0 });
    }
    log.retireTag = 0;
    if (log.status === "out" && !this.#ownTraffic(log.key)) this.#logs.delete(log.key);
  }

  #applyDurable(log: LogState, from: NodeId, d: Extract<Item, { kind: "durable" }>): void {
    if (!log.disk) return;
    const fromWriter = from === log.writer && log.handoffFrom === 0;
    if (!fromWriter && from !== log.handoffFrom) return;
    if (d.failed) log.replica!.apply(from, { op: "disk_failed" });
    if (d.seq > log.durableSeq) log.durableSeq = Math.min(d.seq, log.flushSeq);
    while (log.flushWaits.length > 0 && log.flushWaits[0].seq <= d.seq) {
      const w = log.flushWaits.shift()!;
      if (!this.#pending.has(w.tag)) continue;
      this.#reply(
        w.tag,
        d.failed ? { errno: Errno.EIO, reason: "The disk log write failed" } : w.result,
      );
    }
    if (d.final && from === log.handoffFrom) {
      log.handoffFrom = 0;
      this.#writerChanged(log);
    }
  }

  #applyChunk(log: LogState, c: Extract<Buffered, { kind: "chunk" }>): void {
    this.#count(log);
    const rec = log.joins.get(c.joiner);
    if (
      rec !== undefined && rec.tag === c.joinTag && rec.sender === c.from && rec.cut === c.cut &&
      c.index === c.total - 1
    ) {
      log.joins.delete(c.joiner);
    }
  }

  #applyConfchg(log: LogState, left: NodeId[]): void {
    this.#count(log);
    if (left.length === 0) return;
    const replica = log.replica!;
    for (const d of left) {
      replica.nodeCrashed(d);
      log.members.delete(d);
      log.joins.delete(d);
    }
    if (log.disk) {
      let changed = false;
      if (left.includes(log.handoffFrom)) {
        log.handoffFrom = 0;
        changed = true;
      }
      if (left.includes(log.writer)) {
        const dead = log.writer;
        log.writer = this.#pickWriter(log);
        changed = true;
        this.#log(
          "info",
          `Log ${log.key}: disk writer node ${dead} is gone; node ${log.writer} rewrites the log`,
        );
      }
      if (changed) this.#writerChanged(log);
    }
    // Every orphaned join gets its new sender first, and only then are checkpoints taken: a
    // checkpoint carries the other joins' records, which must already name their new senders.
    const orphaned = this.#sortedJoins(log).filter((r) =>
      r.sender === 0 || left.includes(r.sender)
    );
    for (const rec of orphaned) {
      const dead = rec.sender;
      rec.sender = this.#pickSender(log, rec.joiner);
      rec.cut = rec.count;
      this.#log(
        "info",
        `Log ${log.key}: node ${dead} left before its checkpoint for node ${rec.joiner} arrived; ` +
          `node ${rec.sender} sends one (cut ${rec.cut})`,
      );
    }
    for (const rec of orphaned) if (rec.sender === this.nodeId) this.#sendCheckpoint(log, rec);
  }

  #sortedJoins(log: LogState): JoinRecord[] {
    return [...log.joins.values()].sort((a, b) => a.joiner - b.joiner);
  }

  /** The lowest member that holds the state already (is not joining), other than `joiner`. */
  #pickSender(log: LogState, joiner: NodeId): NodeId {
    let best = 0;
    for (const m of log.members) {
      if (m === joiner || log.joins.has(m)) continue;
      if (best === 0 || m < best) best = m;
    }
    return best;
  }

  #pickWriter(log: LogState): NodeId {
    let best = 0;
    let fallback = 0;
    for (const m of log.members) {
      if (fallback === 0 || m < fallback) fallback = m;
      if (log.joins.has(m)) continue;
      if (best === 0 || m < best) best = m;
    }
    return best !== 0 ? best : fallback;
  }

  // ---------------------------------------------------------------------------------------------
  // The disk writer

  #writerChanged(log: LogState): void {
    if (!log.disk || log.writer !== this.nodeId || log.handoffFrom !== 0) return;
    log.needFull = true;
    this.#maybeWrite(log);
  }

  #maybeWrite(log: LogState): void {
    if (!log.disk || log.writer !== this.nodeId || log.handoffFrom !== 0) return;
    if (log.status !== "member" || log.replica === null || log.write !== null) return;
    if (!log.needFull && log.issuedUpTo >= log.flushSeq) return;
    const replica = log.replica;
    // Only a bit that went from clean to dirty needs the sync: clean bits may reach the disk
    // later, like the kernel's disk log, which skips the cache flush when nothing was dirtied.
    // Earlier writes (one at a time) already synced every dirty bit before them.
    const sync = log.needFull || replica.diskDirtied;
    const changes = replica.takeDiskChanges();
    if (!log.needFull && changes.words.length === 0) {
      // Nothing changed since the last write, which is durable (none is in flight): say so.
      log.issuedUpTo = log.flushSeq;
      this.#answerOwnFlushes(log, log.flushSeq);
      this.#control.push({
        kind: "durable",
        key: log.key,
        seq: log.flushSeq,
        failed: false,
        final: false,
      });
      return;
    }
    const bytes = replica.diskBytes().slice();
    const full = log.needFull;
    let words = changes;
    if (full) {
      const all = new Array<number>(bytes.byteLength >>> 2);
      for (let i = 0; i < all.length; i++) all[i] = i;
      words = { words: all };
    }
    log.needFull = false;
    const token = this.#nextToken++;
    log.write = { token, covers: log.flushSeq };
    log.issuedUpTo = log.flushSeq;
    this.stats.diskWrites++;
    if (full) this.stats.fullDiskWrites++;
    this.#out.push({ kind: "diskWrite", key: log.key, bytes, changes: words, token, full, sync });
  }

  #writeDone(key: string, token: number, failed: boolean): void {
    const log = this.#logs.get(key);
    if (log === undefined || log.write === null || log.write.token !== token) {
      this.#log("debug", `Disk write ${token} of ${key} completed after the log was dropped`);
      return;
    }
    const covers = log.write.covers;
    log.write = null;
    if (log.retiring) {
      if (failed) {
        this.#control.push({ kind: "durable", key, seq: covers, failed: true, final: false });
      }
      return this.#retire(log, covers);
    }
    this.#control.push({ kind: "durable", key, seq: covers, failed, final: false });
    if (!failed) this.#answerOwnFlushes(log, covers);
    this.#maybeWrite(log);
  }

  /**
   * The writer answers its own FLUSHes up to `seq` as soon as its write is durable, without
   * waiting for its "durable" message to come back in the order (the others must: they learn of
   * the write only from it). Invariant 7 holds either way; this saves one round trip.
   */
  #answerOwnFlushes(log: LogState, seq: number): void {
    while (log.flushWaits.length > 0 && log.flushWaits[0].seq <= seq) {
      const w = log.flushWaits.shift()!;
      if (this.#pending.has(w.tag)) this.#reply(w.tag, w.result);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Checkpoints

  #sendCheckpoint(log: LogState, rec: JoinRecord): void {
    let replicaBytes: Uint8Array = new Uint8Array(0);
    if (rec.errno === 0) {
      const chunks = log.replica!.checkpoint({ maxChunkBytes: MAX_CHECKPOINT_BYTES });
      replicaBytes = chunks.length === 1 ? chunks[0] : concat(chunks);
    }
    const payload = encodeCheckpointPayload({
      errno: rec.errno,
      writer: log.writer,
      handoffFrom: log.handoffFrom,
      flushSeq: log.flushSeq,
      durableSeq: log.durableSeq,
      joins: this.#sortedJoins(log),
      replica: replicaBytes,
    });
    const total = Math.max(1, Math.ceil(payload.byteLength / this.#chunkBytes));
    if (total > MAX_CHECKPOINT_CHUNKS) {
      this.#log("error", `Checkpoint of ${log.key} needs ${total} chunks; not sent`);
      return;
    }
    for (let i = 0; i < total; i++) {
      const piece = payload.subarray(
        i * this.#chunkBytes,
        Math.min(payload.byteLength, (i + 1) * this.#chunkBytes),
      );
      const chunk = {
        key: log.key,
        joiner: rec.joiner,
        joinTag: rec.tag,
        cut: rec.cut,
        index: i,
        total,
        payload: piece,
      };
      this.#mcast((n) => encodeCheckpointChunk(chunk, n));
      this.stats.checkpointChunksSent++;
    }
    this.stats.checkpointsSent++;
    this.#log(
      "info",
      `Log ${log.key}: sent node ${rec.joiner} a checkpoint of ${payload.byteLength} bytes in ` +
        `${total} chunks (cut ${rec.cut})`,
    );
  }

  #assemble(log: LogState, c: Extract<Buffered, { kind: "chunk" }>): void {
    const j = log.join!;
    if (c.index === 0) {
      j.assembly = { sender: c.from, cut: c.cut, total: c.total, chunks: [], bytes: 0 };
    }
    const a = j.assembly;
    if (
      a === null || a.sender !== c.from || a.cut !== c.cut || a.total !== c.total ||
      a.chunks.length !== c.index || c.payload === undefined
    ) {
      return;
    }
    a.bytes += c.payload.byteLength;
    if (a.bytes > MAX_CHECKPOINT_BYTES + 1024 * 1024) {
      this.#log("error", `Log ${log.key}: checkpoint larger than any log; leaving the log`);
      return this.#giveUpJoin(log);
    }
    a.chunks.push(c.payload);
    if (a.chunks.length === a.total) this.#loadCheckpoint(log, a);
  }

  #loadCheckpoint(log: LogState, a: Assembly): void {
    const j = log.join!;
    const payload = decodeCheckpointPayload(concat(a.chunks));
    if (isDecodeError(payload)) {
      this.#log("error", `Log ${log.key}: bad checkpoint from node ${a.sender}: ${payload.error}`);
      return this.#giveUpJoin(log);
    }
    if (payload.errno !== 0) {
      this.#log(
        "warn",
        `Log ${log.key}: the members refused this node's RESUME (errno ${payload.errno})`,
      );
      return this.#abandonJoin(log, payload.errno, "its RESUME was refused");
    }
    const geometry = checkpointGeometry(payload.replica);
    if (
      geometry === undefined || geometry.regionCount !== log.config.regionCount ||
      geometry.regionSize !== log.config.regionSize
    ) {
      this.#log(
        "error",
        `Log ${log.key}: the cluster's log has ${geometry?.regionCount} regions of ` +
          `${geometry?.regionSize} sectors, this node's table ${log.config.regionCount} of ` +
          `${log.config.regionSize}: refusing the RESUME`,
      );
      return this.#giveUpJoin(log, Errno.EINVAL);
    }
    let replica: LogReplica;
    try {
      replica = LogReplica.fromCheckpoint(log.config, [payload.replica]);
    } catch (err) {
      this.#log(
        "error",
        `Log ${log.key}: checkpoint from node ${a.sender} rejected: ${errText(err)}`,
      );
      return this.#giveUpJoin(log);
    }
    log.replica = replica;
    log.members = new Set(replica.stats().members);
    log.writer = payload.writer;
    log.handoffFrom = payload.handoffFrom;
    log.flushSeq = payload.flushSeq;
    log.durableSeq = payload.durableSeq;
    log.joins = new Map(payload.joins.map((r) => [r.joiner, { ...r }]));
    log.status = "member";
    log.join = null;
    log.needFull = false;
    log.issuedUpTo = payload.flushSeq;
    this.stats.joinsByCheckpoint++;
    this.#log(
      "info",
      `Log ${log.key}: joined with a checkpoint from node ${a.sender} (cut ${a.cut}, ` +
        `${j.buffer.length - a.cut} events to replay)`,
    );
    if (this.#pending.has(j.tag)) this.#reply(j.tag, { errno: 0 });
    // What came before the cut is in the state already; own requests among it cannot be answered
    // from here (their results are gone): the kernel resends them.
    for (let i = 0; i < a.cut && i < j.buffer.length; i++) {
      const b = j.buffer[i];
      if (b.kind === "item" && b.from === this.nodeId && b.item.kind === "entry") {
        if (this.#pending.has(b.item.tag)) this.#reply(b.item.tag, { errno: Errno.EAGAIN });
      }
    }
    this.#writerChanged(log);
    for (let i = a.cut; i < j.buffer.length; i++) this.#route(log, j.buffer[i]);
  }

  /** Every group member nacked (or left): nobody else holds the log. */
  #resolveAlone(log: LogState): void {
    const j = log.join!;
    if (j.lostResponder || !j.haveRequest) {
      this.#log(
        "warn",
        `Log ${log.key}: a node left before saying whether it holds the log; this node does ` +
          `not initialize it from a possibly stale image (-EAGAIN: the kernel resends RESUME)`,
      );
      return this.#abandonJoin(log, Errno.EAGAIN, "a possible holder left");
    }
    const replica = new LogReplica(log.config);
    const result = replica.apply(this.nodeId, { op: "resume", diskImage: j.image });
    if (result.errno !== 0) {
      this.#log("error", `Log ${log.key}: RESUME refused: ${result.reason}`);
      return this.#abandonJoin(log, result.errno, "its RESUME was refused");
    }
    log.replica = replica;
    log.members = new Set([this.nodeId]);
    log.writer = log.disk ? this.nodeId : 0;
    log.handoffFrom = 0;
    log.flushSeq = 0;
    log.durableSeq = 0;
    log.joins = new Map();
    log.status = "member";
    log.join = null;
    log.issuedUpTo = 0;
    this.stats.joinsByInit++;
    this.#log("info", `Log ${log.key}: no other node holds it; initialized here`);
    if (this.#pending.has(j.tag)) this.#reply(j.tag, result);
    this.#writerChanged(log);
    for (const b of j.buffer) this.#route(log, b);
  }

  /**
   * Stop joining where no member can be waiting on us (nobody holds the log, or the members
   * refused us): answer the RESUME with `errno`, our own later requests -EAGAIN, and nack the
   * joins we were keeping others waiting on.
   */
  #abandonJoin(log: LogState, errno: number, why: string): void {
    const j = log.join!;
    this.stats.joinsAbandoned++;
    this.#log("info", `Log ${log.key}: join given up (${why})`);
    log.status = "out";
    log.join = null;
    log.replica = null;
    if (this.#pending.has(j.tag)) this.#reply(j.tag, { errno });
    const nacked = new Set<string>();
    for (const b of j.buffer) {
      if (b.kind !== "item" || b.item.kind !== "entry") continue;
      if (b.from === this.nodeId) {
        if (b.item.op.op === "leave") continue;
        if (this.#pending.has(b.item.tag)) this.#reply(b.item.tag, { errno: Errno.EAGAIN });
      } else if (b.item.op.op === "resume" && b.item.op.join) {
        const id = `${b.from}/${b.item.tag}`;
        if (nacked.has(id)) continue;
        nacked.add(id);
        this.#control.push({ kind: "nack", key: log.key, joiner: b.from, joinTag: b.item.tag });
      }
    }
  }

  /**
   * Stop joining while members may count us as one: multicast a leave so they drop us at one
   * point of the order, then abandon locally.
   */
  #giveUpJoin(log: LogState, errno: number = Errno.EAGAIN): void {
    this.#control.push({ kind: "entry", key: log.key, tag: 0, op: { op: "leave" } });
    this.#abandonJoin(log, errno, "leaving the log");
  }
}

// -----------------------------------------------------------------------------------------------
// Helpers

function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.byteLength;
  const out = new Uint8Array(n);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

/** Region count and size from a replica checkpoint's header (see replica.ts), if long enough. */
function checkpointGeometry(
  bytes: Uint8Array,
): { regionCount: number; regionSize: number } | undefined {
  if (bytes.byteLength < 16) return undefined;
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { regionCount: v.getUint32(8, true), regionSize: v.getUint32(12, true) };
}

function isRegion(r: unknown, count: number): boolean {
  return typeof r === "number" && Number.isInteger(r) && r >= 0 && r < count &&
    r <= MAX_WIRE_REGION;
}

/** Why `op` cannot be applied to a log of `count` regions, or undefined. */
function validate(op: Op, count: number): string | undefined {
  switch (op.op) {
    case "is_clean":
    case "in_sync":
    case "is_remote_recovering":
    case "set_region_sync":
      if (!isRegion(op.region, count)) {
        return `Region ${String(op.region)} is outside 0..${count - 1}`;
      }
      if (op.op === "set_region_sync" && typeof op.inSync !== "boolean") {
        return "Field inSync must be a boolean";
      }
      return undefined;
    case "flush":
    case "mark":
    case "clear": {
      const regions = op.op === "flush" ? op.marks : op.regions;
      if (!Array.isArray(regions) || regions.length > 32) return "Bad region list";
      for (const r of regions) {
        if (!isRegion(r, count)) return `Region ${String(r)} is outside 0..${count - 1}`;
      }
      return undefined;
    }
    case "presuspend":
    case "postsuspend":
    case "get_region_size":
    case "get_resync_work":
    case "get_sync_count":
    case "status_info":
    case "status_table":
      return undefined;
    default:
      return `Op ${String((op as { op: unknown }).op)} cannot be requested`;
  }
}

function toWire(op: Op): WireOp {
  switch (op.op) {
    case "flush":
      return { op: "flush", marks: [...op.marks] };
    case "mark":
    case "clear":
      return { op: op.op, regions: [...op.regions] };
    case "is_clean":
    case "in_sync":
    case "is_remote_recovering":
      return { op: op.op, region: op.region };
    case "set_region_sync":
      return { op: "set_region_sync", region: op.region, inSync: op.inSync };
    case "resume":
      return { op: "resume", join: false };
    case "disk_failed":
      throw new Error("disk_failed is not a request");
    default:
      return { op: op.op };
  }
}

function fromWire(op: WireOp): Op {
  switch (op.op) {
    case "resume":
      return { op: "resume" };
    case "leave":
      throw new Error("leave is not a replica op");
    default:
      return op;
  }
}
