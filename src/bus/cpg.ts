/**
 * The corosync transport: {@link CpgTransport} runs the cluster core's ordered bus over CPG
 * (`CPG_TYPE_AGREED`) with the handle of ffi/cpg.ts, driven by the daemon's {@link EventLoop}.
 *
 * What it adds to the bare handle:
 * - **Dispatch without starving the loop.** On every wake it runs at most
 *   {@link MAX_DISPATCH_PER_WAKE} callbacks, one `CS_DISPATCH_ONE_NONBLOCKING` call each, then
 *   returns to the loop (which then reads the netlink socket) and wakes it to continue.
 *   `CS_DISPATCH_ALL` returns only when corosync's event ring is momentarily empty: under a flood
 *   from other nodes that may be never. Each event is handed to the handlers after cpg_dispatch
 *   returned, never from inside the C call: the handlers run on a normal stack (not on top of
 *   libcpg's 1 MiB dispatch buffer), their exceptions never come near native frames, and what
 *   they multicast is sent outside the dispatch.
 * - **Send order under flow control.** {@link CpgTransport.mcast} never throws. When corosync
 *   answers `CS_ERR_TRY_AGAIN`, the message and every later one wait in a bounded queue, retried
 *   with exponential backoff ({@link TRY_AGAIN_INITIAL_MS} to {@link TRY_AGAIN_MAX_MS}) and after
 *   every dispatch (deliveries are what frees corosync's queues). A full queue
 *   ({@link MAX_SEND_QUEUE_MESSAGES}, {@link MAX_SEND_QUEUE_BYTES}) or any other send error ends
 *   the session: dropping one message silently would break the order every member relies on.
 * - **Reconnect.** When the session is lost (dispatch or send says `CS_ERR_LIBRARY` or
 *   `CS_ERR_BAD_HANDLE`, a join keeps failing, the queue overflows), the transport drops the send
 *   queue (the core drops its state of a dead session and resends nothing), finalizes the handle,
 *   tells the handlers once (`disconnected`), and connects again with backoff
 *   ({@link RECONNECT_INITIAL_MS} to {@link RECONNECT_MAX_MS}) until corosync answers; then it
 *   joins again, and the membership change with this node in `joined` arrives as usual. If
 *   corosync then reports another node id, it stays disconnected: the core's id is fixed.
 * - **Nodes, not processes.** CPG members are (node id, pid) pairs; the core knows node ids. A
 *   node runs one clogd: a second process of one node id in the group is logged as a warning
 *   (it is a misconfiguration), and a node counts as a member while any of its processes is, except
 *   this node, which is a member exactly while this process is. Reasons: `CPG_REASON_LEAVE` is a
 *   clean "leave"; `NODEDOWN`, `PROCDOWN` (and anything unexpected) are a "crash".
 *
 * @module
 */

import {
  CPG_MAX_MESSAGE_BYTES,
  CPG_REASON,
  type CpgAddress,
  type CpgCallbacks,
  CpgError,
  CpgHandle,
  CS_DISPATCH_ONE_NONBLOCKING,
  CS_ERR_LIBRARY,
  CS_ERR_TRY_AGAIN,
  CS_OK,
  csErrorName,
  encodeCpgName,
} from "../../ffi/cpg.ts";
import type { Confchg, LeaveReason } from "../cluster/core.ts";
import type { NodeId } from "../log/types.ts";
import type { Logger } from "../logger.ts";
import type { EventLoop } from "../loop.ts";
import type { ClusterTransport, TransportHandlers } from "./transport.ts";

/** The CPG group every clogd joins (one group per daemon: see src/cluster/core.ts). */
export const DEFAULT_CPG_GROUP = "clogd";

/**
 * Most CPG callbacks run in one wake of the loop before it gets back to its other fds (the
 * netlink socket). Measured here (scripts/bench/cpg_rtt.ts `--dispatch`, a backlog of 2000
 * 64-byte messages): 2.7 us per callback with one `CS_DISPATCH_ONE_NONBLOCKING` call each,
 * 2.0 us inside one `CS_DISPATCH_ALL`. The 0.7 us per message buys a bound: 256 callbacks are
 * 0.7 ms of dispatch itself, plus what the core does with each message (a batch of up to 1024
 * requests). Each wake delivers at most this many, so a flood from other nodes delays the next
 * netlink read by one such slice, not indefinitely.
 */
export const MAX_DISPATCH_PER_WAKE = 256;

/**
 * Most messages waiting for corosync to take them (`CS_ERR_TRY_AGAIN`). The core keeps at most a
 * few request batches in flight; bursts come from checkpoints (one message per 256 KiB chunk, all
 * at once), so this is far above any legitimate backlog and bounds a runaway.
 */
export const MAX_SEND_QUEUE_MESSAGES = 65_536;

/**
 * Most bytes waiting for corosync. A checkpoint of a log of 2^24 regions is a few MiB; many logs
 * resumed at once by a joining node multiply that. Beyond this the session is ended (see module).
 */
export const MAX_SEND_QUEUE_BYTES = 128 * 1024 * 1024;

/** First wait before resending after `CS_ERR_TRY_AGAIN`, in ms (doubles up to the max). */
export const TRY_AGAIN_INITIAL_MS = 1;
/** Longest wait between two resends under flow control, in ms. */
export const TRY_AGAIN_MAX_MS = 64;

/** First wait before retrying a join that got `CS_ERR_TRY_AGAIN` (corosync syncing), in ms. */
export const JOIN_RETRY_INITIAL_MS = 5;
/** Longest wait between two join attempts, in ms. */
export const JOIN_RETRY_MAX_MS = 500;
/**
 * Join attempts before the session is given up and a new connection tried (about 45 s with the
 * waits above: corosync syncs for a second or two after a membership change).
 */
export const MAX_JOIN_ATTEMPTS = 100;

/** First wait before reconnecting after the connection was lost, in ms (doubles up to the max). */
export const RECONNECT_INITIAL_MS = 100;
/**
 * Longest wait between two reconnection attempts, in ms. Short: while down, the node's kernel
 * requests are held (then failed) by the core, and a failed attempt costs only a refused connect
 * on a unix socket.
 */
export const RECONNECT_MAX_MS = 500;

/**
 * Consecutive wakes with nothing to dispatch before the transport asks corosync whether the
 * connection still lives. A hung-up fd stays readable; if cpg_dispatch ever answered "nothing
 * queued" instead of `CS_ERR_LIBRARY` for it, the loop would otherwise spin.
 */
export const EMPTY_WAKES_BEFORE_PROBE = 64;

/** The limits of one transport (defaults: the constants above). */
export interface CpgLimits {
  /** {@link MAX_DISPATCH_PER_WAKE} */
  maxDispatchPerWake: number;
  /** {@link MAX_SEND_QUEUE_MESSAGES} */
  maxQueueMessages: number;
  /** {@link MAX_SEND_QUEUE_BYTES} */
  maxQueueBytes: number;
  /** {@link TRY_AGAIN_INITIAL_MS} */
  tryAgainInitialMs: number;
  /** {@link TRY_AGAIN_MAX_MS} */
  tryAgainMaxMs: number;
  /** {@link JOIN_RETRY_INITIAL_MS} */
  joinRetryInitialMs: number;
  /** {@link JOIN_RETRY_MAX_MS} */
  joinRetryMaxMs: number;
  /** {@link MAX_JOIN_ATTEMPTS} */
  maxJoinAttempts: number;
  /** {@link RECONNECT_INITIAL_MS} */
  reconnectInitialMs: number;
  /** {@link RECONNECT_MAX_MS} */
  reconnectMaxMs: number;
}

/** The default {@link CpgLimits}. */
export const DEFAULT_CPG_LIMITS: Readonly<CpgLimits> = Object.freeze({
  maxDispatchPerWake: MAX_DISPATCH_PER_WAKE,
  maxQueueMessages: MAX_SEND_QUEUE_MESSAGES,
  maxQueueBytes: MAX_SEND_QUEUE_BYTES,
  tryAgainInitialMs: TRY_AGAIN_INITIAL_MS,
  tryAgainMaxMs: TRY_AGAIN_MAX_MS,
  joinRetryInitialMs: JOIN_RETRY_INITIAL_MS,
  joinRetryMaxMs: JOIN_RETRY_MAX_MS,
  maxJoinAttempts: MAX_JOIN_ATTEMPTS,
  reconnectInitialMs: RECONNECT_INITIAL_MS,
  reconnectMaxMs: RECONNECT_MAX_MS,
});

/** Options of {@link CpgTransport.connect}. */
export interface CpgTransportOptions {
  /** The loop that watches the CPG fd. */
  loop: EventLoop;
  /** CPG group name; default {@link DEFAULT_CPG_GROUP}. */
  group?: string;
  /** Where connection events go. */
  logger: Logger;
  /** libcpg's path (default `$CLOGD_LIBCPG`, else `libcpg.so.4`). */
  libPath?: string;
  /**
   * Opens a CPG handle; default `CpgHandle.open`. Used for every (re)connection: tests pass one
   * that opens it inside a network namespace (`Corosync.openCpg`).
   */
  open?: (callbacks: CpgCallbacks) => CpgHandle;
  /** Overrides of the default limits (tests use small ones). */
  limits?: Partial<CpgLimits>;
}

type State =
  /** Connected, not started. */
  | "idle"
  /** Started; cpg_join not yet accepted (retrying on CS_ERR_TRY_AGAIN). */
  | "joining"
  /** cpg_join accepted: sending allowed. */
  | "joined"
  /** The session was lost; a reconnection is scheduled. */
  | "down"
  /** corosync came back with another node id: stays disconnected. */
  | "failed"
  | "closed";

type CpgEvent =
  | { kind: "deliver"; nodeid: number; pid: number; data: Uint8Array }
  | { kind: "confchg"; members: CpgAddress[]; left: CpgAddress[]; joined: CpgAddress[] };

/** Counters of {@link CpgTransport.stats}. */
interface Counters {
  /** Messages handed to corosync. */
  sent: number;
  /** Their bytes. */
  sentBytes: number;
  /** Messages delivered to the handlers. */
  delivered: number;
  /** Their bytes. */
  deliveredBytes: number;
  /** Membership changes delivered to the handlers. */
  confchgs: number;
  /** CPG confchgs that changed no node (a second process of a node, see module). */
  confchgsSkipped: number;
  /** CS_ERR_TRY_AGAIN answers to cpg_mcast_joined. */
  tryAgain: number;
  /** CS_ERR_TRY_AGAIN answers to cpg_join. */
  joinTryAgain: number;
  /** Resends scheduled by timer (backoff). */
  retryTimers: number;
  /** Most messages queued at once. */
  maxQueueLength: number;
  /** Most bytes queued at once. */
  maxQueueBytes: number;
  /** Messages given to mcast() while there was no joined session (the core's state is gone). */
  droppedDisconnected: number;
  /** Queued messages dropped when a session was lost. */
  droppedOnLoss: number;
  /** Sessions lost. */
  disconnects: number;
  /** Successful reconnections. */
  reconnects: number;
  /** Failed connection attempts while down. */
  reconnectFailures: number;
  /** Loop wakes that ran the CPG dispatch. */
  wakes: number;
  /** Wakes that stopped at {@link MAX_DISPATCH_PER_WAKE}. */
  dispatchLimitHits: number;
  /** Wakes that found nothing to dispatch. */
  emptyWakes: number;
  /** Exceptions thrown by the handlers (caught and logged). */
  handlerErrors: number;
  /** Events for another group name (never expected: one handle, one group). */
  foreignGroup: number;
}

/** Multicast over corosync CPG; see the module doc. */
export class CpgTransport implements ClusterTransport {
  /** Always "corosync". */
  readonly kind = "corosync" as const;
  /** This node's corosync node id. */
  readonly nodeId: NodeId;
  /** The CPG group name. */
  readonly group: string;
  readonly #loop: EventLoop;
  readonly #log: Logger;
  readonly #open: (callbacks: CpgCallbacks) => CpgHandle;
  readonly #limits: CpgLimits;
  // corosync identifies a client process by the pid it sees on the IPC socket: ours, as long as
  // corosync and clogd share a pid namespace (they do: both run on the host).
  readonly #pid = Deno.pid;
  #state: State = "idle";
  #handle: CpgHandle | undefined;
  #fd = -1;
  /** Bumped when a session ends: events and timers of an older session are ignored. */
  #session = 0;
  #handlers: TransportHandlers | undefined;
  /** Events of the running cpg_dispatch, handed to the handlers once it returned. */
  #events: CpgEvent[] = [];
  /** Processes in the group after the last confchg of this session. */
  #members: CpgAddress[] = [];
  /** Nodes whose duplicate processes were already warned about (bounded by the member count). */
  #warnedDuplicates = new Set<string>();
  #queue: Uint8Array[] = [];
  #queueHead = 0;
  #queueBytes = 0;
  #tryAgainDelay: number;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #joinAttempts = 0;
  #joinTimer: ReturnType<typeof setTimeout> | undefined;
  #reconnectDelay: number;
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #emptyWakes = 0;
  readonly #stats: Counters = {
    sent: 0,
    sentBytes: 0,
    delivered: 0,
    deliveredBytes: 0,
    confchgs: 0,
    confchgsSkipped: 0,
    tryAgain: 0,
    joinTryAgain: 0,
    retryTimers: 0,
    maxQueueLength: 0,
    maxQueueBytes: 0,
    droppedDisconnected: 0,
    droppedOnLoss: 0,
    disconnects: 0,
    reconnects: 0,
    reconnectFailures: 0,
    wakes: 0,
    dispatchLimitHits: 0,
    emptyWakes: 0,
    handlerErrors: 0,
    foreignGroup: 0,
  };

  private constructor(options: CpgTransportOptions, open: (c: CpgCallbacks) => CpgHandle) {
    this.#loop = options.loop;
    this.#log = options.logger;
    this.group = options.group ?? DEFAULT_CPG_GROUP;
    this.#open = open;
    this.#limits = { ...DEFAULT_CPG_LIMITS, ...options.limits };
    for (const [name, value] of Object.entries(this.#limits)) {
      if (!Number.isInteger(value) || value < 1) {
        throw new RangeError(`CPG limit ${name} must be a positive integer, got ${value}`);
      }
    }
    this.#tryAgainDelay = this.#limits.tryAgainInitialMs;
    this.#reconnectDelay = this.#limits.reconnectInitialMs;
    this.#handle = open(this.#callbacks(0));
    try {
      this.nodeId = this.#handle.localNodeId();
    } catch (error) {
      this.#handle.finalize();
      throw error;
    }
    this.#fd = this.#handle.fd;
  }

  /**
   * Connects to the corosync of this process's network namespace (cpg_initialize) and reads
   * this node's id. Does not join the group yet: {@link start} does.
   *
   * @throws CpgError with code CS_ERR_LIBRARY ("is corosync running?") when corosync does not
   *   run (or is still starting); Error when libcpg does not load; RangeError for a bad group
   *   name or limit
   */
  static connect(options: CpgTransportOptions): CpgTransport {
    // Fails here, not at the first join, on a name CPG cannot carry.
    encodeCpgName(options.group ?? DEFAULT_CPG_GROUP);
    const open = options.open ??
      ((callbacks: CpgCallbacks) => CpgHandle.open(callbacks, { libPath: options.libPath }));
    return new CpgTransport(options, open);
  }

  /**
   * Joins the group and starts dispatching to `handlers`. The join is retried by timer while
   * corosync answers CS_ERR_TRY_AGAIN; the first membership change that contains this node in
   * `joined` says the node is in.
   *
   * @throws Error if already started or closed
   */
  start(handlers: TransportHandlers): void {
    if (this.#state !== "idle" || this.#handlers !== undefined) {
      throw new Error(`CpgTransport.start() called when ${this.#state}`);
    }
    this.#handlers = handlers;
    this.#attach();
  }

  /**
   * Multicasts `bytes` (sent as is) in total order. Never throws. Keeps this node's send order:
   * once corosync said CS_ERR_TRY_AGAIN, this and later messages queue (copied) until it takes
   * them. Without a joined session the message is dropped and counted: the core's state of a
   * lost session is gone, and it sends nothing before it has joined again.
   */
  mcast(bytes: Uint8Array): void {
    if (this.#state !== "joined") {
      this.#stats.droppedDisconnected++;
      return;
    }
    if (bytes.byteLength > CPG_MAX_MESSAGE_BYTES) {
      this.#lose(
        `A message of ${bytes.byteLength} bytes exceeds CPG's limit of ${CPG_MAX_MESSAGE_BYTES}`,
      );
      return;
    }
    if (this.#queueLength() === 0) {
      const result = this.#send(bytes);
      if (result === CS_OK) return;
      if (result !== CS_ERR_TRY_AGAIN) {
        this.#lose(`cpg_mcast_joined returned ${csErrorName(result)}`);
        return;
      }
    }
    if (
      this.#queueLength() >= this.#limits.maxQueueMessages ||
      this.#queueBytes + bytes.byteLength > this.#limits.maxQueueBytes
    ) {
      this.#lose(
        `The send queue is full (${this.#queueLength()} messages, ${this.#queueBytes} bytes; ` +
          `limits ${this.#limits.maxQueueMessages} and ${this.#limits.maxQueueBytes}): ` +
          "corosync has not taken a message for too long",
      );
      return;
    }
    // The caller may reuse its buffer once mcast() returns.
    this.#queue.push(bytes.slice());
    this.#queueBytes += bytes.byteLength;
    const length = this.#queueLength();
    if (length > this.#stats.maxQueueLength) this.#stats.maxQueueLength = length;
    if (this.#queueBytes > this.#stats.maxQueueBytes) this.#stats.maxQueueBytes = this.#queueBytes;
    this.#scheduleRetry();
  }

  /** Counters, plus the current queue, state and session. */
  stats(): Record<string, number> {
    return {
      ...this.#stats,
      queueLength: this.#queueLength(),
      queueBytes: this.#queueBytes,
      joined: this.#state === "joined" ? 1 : 0,
      sessions: this.#session + 1,
    };
  }

  /** "idle", "joining", "joined", "down", "failed" or "closed" (for status and tests). */
  get state(): string {
    return this.#state;
  }

  /**
   * Leaves the group (the others see a clean leave), drops what is queued and finalizes.
   * Idempotent; no handler is called afterwards.
   */
  close(): void {
    if (this.#state === "closed") return;
    const handle = this.#handle;
    if (handle !== undefined && this.#state === "joined") {
      try {
        handle.leave(this.group);
      } catch (error) {
        // corosync is gone, or busy: the others see a crash then, which is safe.
        this.#log.debug(`cpg_leave on close: ${errorText(error)}`);
      }
    }
    this.#endSession();
    this.#state = "closed";
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = undefined;
  }

  // ---- Sessions ----

  /** Watches the current handle's fd and starts joining. */
  #attach(): void {
    this.#state = "joining";
    this.#joinAttempts = 0;
    this.#members = [];
    this.#emptyWakes = 0;
    this.#loop.watch(this.#fd, () => this.#onReadable());
    this.#tryJoin(this.#session, this.#limits.joinRetryInitialMs);
  }

  #tryJoin(session: number, delay: number): void {
    this.#joinTimer = undefined;
    if (session !== this.#session || this.#state !== "joining") return;
    this.#joinAttempts++;
    try {
      this.#handle!.join(this.group);
    } catch (error) {
      if (
        error instanceof CpgError && error.code === CS_ERR_TRY_AGAIN &&
        this.#joinAttempts < this.#limits.maxJoinAttempts
      ) {
        this.#stats.joinTryAgain++;
        const next = Math.min(delay * 2, this.#limits.joinRetryMaxMs);
        this.#joinTimer = setTimeout(() => this.#tryJoin(session, next), delay);
        return;
      }
      this.#lose(`Joining CPG group "${this.group}" failed: ${errorText(error)}`);
      return;
    }
    this.#state = "joined";
    this.#log.debug(`Joined CPG group "${this.group}" as node ${this.nodeId}`);
  }

  /**
   * Ends the session: the handlers hear `disconnected(reason)` once (from a microtask, so never
   * from inside a mcast() call of theirs), the queue is dropped, the handle finalized, and a
   * reconnection scheduled.
   */
  #lose(reason: string): void {
    if (this.#state !== "joining" && this.#state !== "joined") return;
    const dropped = this.#queueLength();
    this.#stats.droppedOnLoss += dropped;
    this.#stats.disconnects++;
    this.#endSession();
    this.#state = "down";
    this.#log.warn(
      `Lost the corosync CPG session: ${reason}; dropped ${dropped} queued messages; reconnecting`,
    );
    queueMicrotask(() => {
      if (this.#state === "closed") return;
      try {
        this.#handlers?.disconnected(reason);
      } catch (error) {
        this.#handlerError("disconnected", error);
      }
    });
    this.#reconnectDelay = this.#limits.reconnectInitialMs;
    this.#scheduleReconnect();
  }

  /** Releases the handle, its fd watch, timers and queue; later events of it are ignored. */
  #endSession(): void {
    this.#session++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#joinTimer);
    this.#retryTimer = undefined;
    this.#joinTimer = undefined;
    this.#queue = [];
    this.#queueHead = 0;
    this.#queueBytes = 0;
    this.#tryAgainDelay = this.#limits.tryAgainInitialMs;
    this.#events = [];
    this.#members = [];
    const handle = this.#handle;
    this.#handle = undefined;
    if (handle !== undefined) {
      this.#loop.unwatch(this.#fd);
      this.#fd = -1;
      // CS_ERR_LIBRARY when corosync is gone; the handle is freed locally all the same.
      handle.finalize();
    }
  }

  #scheduleReconnect(): void {
    const delay = this.#reconnectDelay;
    this.#reconnectDelay = Math.min(delay * 2, this.#limits.reconnectMaxMs);
    this.#reconnectTimer = setTimeout(() => this.#reconnect(), delay);
  }

  #reconnect(): void {
    this.#reconnectTimer = undefined;
    if (this.#state !== "down") return;
    let handle: CpgHandle;
    let nodeId: number;
    try {
      handle = this.#open(this.#callbacks(this.#session));
    } catch (error) {
      this.#stats.reconnectFailures++;
      this.#log.limited("debug", "cpg-reconnect", `Reconnecting to corosync: ${errorText(error)}`);
      this.#scheduleReconnect();
      return;
    }
    try {
      nodeId = handle.localNodeId();
    } catch (error) {
      handle.finalize();
      this.#stats.reconnectFailures++;
      this.#log.limited("debug", "cpg-reconnect", `Reconnecting to corosync: ${errorText(error)}`);
      this.#scheduleReconnect();
      return;
    }
    if (nodeId !== this.nodeId) {
      handle.finalize();
      this.#state = "failed";
      this.#log.error(
        `corosync came back with node id ${nodeId}, but this daemon is node ${this.nodeId}: ` +
          "staying disconnected (restart clogd to serve as the new node)",
      );
      return;
    }
    this.#stats.reconnects++;
    this.#handle = handle;
    this.#fd = handle.fd;
    this.#log.info(`Reconnected to corosync as node ${nodeId}; joining "${this.group}" again`);
    this.#attach();
  }

  // ---- Receiving ----

  /** Callbacks of the handle of `session`: they only record; {@link #onReadable} hands over. */
  #callbacks(session: number): CpgCallbacks {
    return {
      onDeliver: (nodeid, pid, group, data) => {
        if (session !== this.#session) return;
        if (group !== this.group) {
          this.#stats.foreignGroup++;
          return;
        }
        this.#events.push({ kind: "deliver", nodeid, pid, data });
      },
      onConfchg: (group, members, left, joined) => {
        if (session !== this.#session) return;
        if (group !== this.group) {
          this.#stats.foreignGroup++;
          return;
        }
        this.#events.push({ kind: "confchg", members, left, joined });
      },
      // Only a bug in the two callbacks above gets here.
      onError: (error) => this.#log.error(`CPG callback failed: ${errorText(error)}`),
    };
  }

  #onReadable(): void {
    const session = this.#session;
    const handle = this.#handle;
    if (handle === undefined || (this.#state !== "joining" && this.#state !== "joined")) return;
    this.#stats.wakes++;
    let callbacks = 0;
    while (callbacks < this.#limits.maxDispatchPerWake) {
      let result: number;
      try {
        result = handle.dispatch(CS_DISPATCH_ONE_NONBLOCKING);
      } catch (error) {
        // Only a stack too small for libcpg gets here: no later dispatch can do better.
        this.#lose(`cpg_dispatch failed: ${errorText(error)}`);
        return;
      }
      if (result === CS_ERR_TRY_AGAIN) break; // nothing queued
      const events = this.#events;
      this.#events = [];
      for (const event of events) {
        this.#handOver(event);
        // A handler closed the transport, or its mcast() lost the session.
        if (session !== this.#session) return;
      }
      if (result !== CS_OK) {
        this.#lose(`cpg_dispatch returned ${csErrorName(result)}`);
        return;
      }
      callbacks++;
    }
    if (callbacks >= this.#limits.maxDispatchPerWake) {
      // More may be queued: let the loop serve its other fds, then come back at once.
      this.#stats.dispatchLimitHits++;
      this.#loop.wake();
    }
    if (callbacks === 0) this.#onEmptyWake(handle);
    else this.#emptyWakes = 0;
    // Deliveries free room in corosync: a good moment to send what waits.
    if (this.#queueLength() > 0 && this.#state === "joined") this.#drain();
  }

  #onEmptyWake(handle: CpgHandle): void {
    this.#stats.emptyWakes++;
    if (++this.#emptyWakes < EMPTY_WAKES_BEFORE_PROBE) return;
    this.#emptyWakes = 0;
    try {
      handle.localNodeId();
    } catch (error) {
      if (error instanceof CpgError) this.#lose(`Probing corosync: ${error.message}`);
    }
  }

  #handOver(event: CpgEvent): void {
    if (event.kind === "deliver") {
      this.#stats.delivered++;
      this.#stats.deliveredBytes += event.data.byteLength;
      try {
        this.#handlers!.deliver(event.nodeid, event.data);
      } catch (error) {
        this.#handlerError("deliver", error);
      }
      return;
    }
    const change = this.#nodeChange(event.members, event.left, event.joined);
    if (change === undefined) {
      this.#stats.confchgsSkipped++;
      return;
    }
    this.#stats.confchgs++;
    try {
      this.#handlers!.confchg(change);
    } catch (error) {
      this.#handlerError("confchg", error);
    }
  }

  /**
   * The node-level change of a CPG confchg (see the module doc), or undefined when no node
   * joined, left or changed membership (only a second process of some node did).
   */
  #nodeChange(
    members: CpgAddress[],
    left: CpgAddress[],
    joined: CpgAddress[],
  ): Confchg | undefined {
    const before = this.#members;
    this.#members = members;
    const isSelf = (a: CpgAddress) => a.nodeid === this.nodeId && a.pid === this.#pid;
    const counts = (list: CpgAddress[]) => {
      const map = new Map<number, number>();
      for (const a of list) map.set(a.nodeid, (map.get(a.nodeid) ?? 0) + 1);
      return map;
    };
    const nodesAfter = counts(members);
    const nodesBefore = counts(before);
    for (const [nodeid, processes] of nodesAfter) {
      if (processes < 2) continue;
      const pids = members.filter((a) => a.nodeid === nodeid).map((a) => a.pid).join(",");
      const key = `${nodeid}:${pids}`;
      if (this.#warnedDuplicates.has(key)) continue;
      if (this.#warnedDuplicates.size > 2 * members.length + 16) this.#warnedDuplicates.clear();
      this.#warnedDuplicates.add(key);
      this.#log.warn(
        `Node ${nodeid} has ${processes} processes (pids ${pids}) in CPG group "${this.group}": ` +
          "a node must run one clogd; they are treated as one node",
      );
    }
    const selfIn = (list: CpgAddress[]) => list.some(isSelf);
    const memberNodes = new Set<NodeId>();
    for (const a of members) if (a.nodeid !== this.nodeId || isSelf(a)) memberNodes.add(a.nodeid);
    const leftNodes = new Map<NodeId, LeaveReason>();
    for (const a of left) {
      const gone = a.nodeid === this.nodeId ? isSelf(a) : !nodesAfter.has(a.nodeid);
      if (!gone) continue;
      // One process of the node leaving cleanly and another crashing: a crash.
      if (leftNodes.get(a.nodeid) === "crash") continue;
      leftNodes.set(a.nodeid, leaveReason(a.reason));
    }
    const joinedNodes: NodeId[] = [];
    for (const a of joined) {
      const isNew = a.nodeid === this.nodeId ? isSelf(a) : !nodesBefore.has(a.nodeid);
      if (isNew && !joinedNodes.includes(a.nodeid)) joinedNodes.push(a.nodeid);
    }
    const membersChanged = before.length === 0 ||
      selfIn(before) !== selfIn(members) ||
      [...nodesBefore.keys()].some((n) => !nodesAfter.has(n)) ||
      [...nodesAfter.keys()].some((n) => !nodesBefore.has(n));
    if (leftNodes.size === 0 && joinedNodes.length === 0 && !membersChanged) return undefined;
    return {
      members: [...memberNodes].sort((a, b) => a - b),
      left: [...leftNodes].map(([node, reason]) => ({ node, reason })),
      joined: joinedNodes.sort((a, b) => a - b),
    };
  }

  #handlerError(which: string, error: unknown): void {
    this.#stats.handlerErrors++;
    this.#log.limited(
      "error",
      `cpg-handler-${which}`,
      `The ${which} handler threw: ${errorText(error)}`,
    );
  }

  // ---- Sending ----

  #queueLength(): number {
    return this.#queue.length - this.#queueHead;
  }

  #send(bytes: Uint8Array): number {
    let result: number;
    try {
      result = this.#handle!.mcast(bytes);
    } catch (error) {
      // The size was checked; only a finalized handle throws, which is a lost session too.
      this.#log.error(`cpg_mcast_joined threw: ${errorText(error)}`);
      return CS_ERR_LIBRARY;
    }
    if (result === CS_OK) {
      this.#stats.sent++;
      this.#stats.sentBytes += bytes.byteLength;
    } else if (result === CS_ERR_TRY_AGAIN) {
      this.#stats.tryAgain++;
    }
    return result;
  }

  /** Sends queued messages, oldest first, until corosync says try again or the queue is empty. */
  #drain(): void {
    while (this.#queueLength() > 0) {
      const bytes = this.#queue[this.#queueHead];
      const result = this.#send(bytes);
      if (result === CS_ERR_TRY_AGAIN) {
        this.#scheduleRetry();
        return;
      }
      if (result !== CS_OK) {
        this.#lose(`cpg_mcast_joined returned ${csErrorName(result)}`);
        return;
      }
      this.#queue[this.#queueHead++] = EMPTY;
      this.#queueBytes -= bytes.byteLength;
      // Shift out the sent part now and then, not per message: shift() is O(n).
      if (this.#queueHead >= 1024 && this.#queueHead * 2 >= this.#queue.length) {
        this.#queue = this.#queue.slice(this.#queueHead);
        this.#queueHead = 0;
      }
    }
    this.#queue = [];
    this.#queueHead = 0;
    this.#tryAgainDelay = this.#limits.tryAgainInitialMs;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
  }

  #scheduleRetry(): void {
    if (this.#retryTimer !== undefined) return;
    const session = this.#session;
    const delay = this.#tryAgainDelay;
    this.#tryAgainDelay = Math.min(delay * 2, this.#limits.tryAgainMaxMs);
    this.#stats.retryTimers++;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      if (session !== this.#session || this.#state !== "joined") return;
      this.#drain();
    }, delay);
  }
}

const EMPTY = new Uint8Array(0);

function leaveReason(reason: number): LeaveReason {
  // NODEDOWN and PROCDOWN are crashes; anything unexpected is treated as one too: a crash makes
  // the survivors resync the node's regions, a wrong "leave" would lose that.
  return reason === CPG_REASON.LEAVE ? "leave" : "crash";
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
