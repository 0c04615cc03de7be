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
 * - **Quorum.** A node serves only while its partition is quorate (corosync's quorum service,
 *   ffi/quorum.ts): when a partition cuts a node off, CPG reports the other side as crashed on both
 *   sides, and without quorum both would keep answering their kernels from diverging replicas. What
 *   CPG does not give is the quorum verdict for the membership a confchg reports: corosync
 *   synchronizes its services one after the other after a membership change, CPG (service 2) before
 *   votequorum (5), and CPG hands the NODEDOWN/NODEUP confchgs (then the totem confchg naming the
 *   new ring) to its clients when its own sync ends, before votequorum has decided quorum for that
 *   ring. So `quorum_getquorate` asked when such a confchg is read may answer for the previous ring
 *   (if read quickly) or for a later one (if read from a backlog: measured with
 *   scripts/quorum_order.ts, NODEDOWN confchgs of a minority ring that corosync never decided, read
 *   while `quorum_getquorate` already said "quorate" for a later one).
 *   The transport therefore tracks quorum notifications, each the verdict for one ring id, and
 *   **holds** a confchg with NODEDOWN or NODEUP members, and every CPG event after it (and this
 *   node's sends), until the totem confchg that follows names its ring and the verdict for that
 *   exact ring is in: quorate, and everything held is handed over in order; not quorate, or no
 *   verdict for that ring while one for a later ring arrived (corosync aborted that ring's sync),
 *   or none within {@link VERDICT_TIMEOUT_MS}, and the session ends as **lost quorum** without
 *   handing any of it over. (A confchg of processes that crashed or left, PROCDOWN or LEAVE, is an
 *   ordinary event in the total order, not part of a new ring: it is not held.) A verdict "not
 *   quorate" ends the session at once, also without any confchg (e.g. when no other clogd ran in
 *   the lost part of the cluster). Then the CPG handle is finalized (no clean leave: the others
 *   must treat this node as crashed) and the transport waits, on notifications and by polling
 *   `quorum_getquorate` with backoff ({@link QUORUM_POLL_INITIAL_MS} to {@link
 *   QUORUM_POLL_MAX_MS}), until the partition is quorate again; only then does it open a new CPG
 *   handle and join. Without a quorum provider (`quorum_type` QUORUM_FREE) corosync calls every
 *   partition quorate: clogd warns loudly and serves as before. A transport given its own `open`
 *   but no `openQuorum` (benchmarks, some tests) tracks no quorum either.
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
  type CpgRingId,
  CS_DISPATCH_ALL,
  CS_DISPATCH_ONE_NONBLOCKING,
  CS_ERR_LIBRARY,
  CS_ERR_TRY_AGAIN,
  CS_OK,
  CsError,
  csErrorName,
  encodeCpgName,
} from "../../ffi/cpg.ts";
import {
  CS_TRACK_CHANGES,
  QUORUM_FREE,
  type QuorumCallbacks,
  QuorumError,
  QuorumHandle,
  type QuorumNotification,
} from "../../ffi/quorum.ts";
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

/**
 * Longest wait for corosync's quorum verdict on the ring of a held membership change, in ms;
 * then the session ends as lost quorum. corosync sends the verdict a few barrier rounds after
 * the CPG confchg (measured: 1 to 5 ms), or, if that ring's sync was cut short, a verdict for a
 * later ring, which ends the wait too. It may legitimately take longer only with a quorum
 * device: votequorum then waits for the device's poll up to `quorum.device.sync_timeout`
 * (30 s by default), and nobody can send meanwhile anyway. So this is above that, and bounds
 * only a corosync that hangs.
 */
export const VERDICT_TIMEOUT_MS = 35_000;
/**
 * Most CPG events held while a verdict is awaited. Little can arrive meanwhile: corosync lets
 * no one send until all of its services synchronized the new ring, votequorum included, so only
 * deliveries read in the moment between that and reading the verdict queue here.
 */
export const MAX_HELD_EVENTS = 65_536;
/** Most bytes of deliveries held while a verdict is awaited. */
export const MAX_HELD_BYTES = 128 * 1024 * 1024;
/** First wait between two quorum checks while inquorate, in ms (doubles up to the max). */
export const QUORUM_POLL_INITIAL_MS = 100;
/**
 * Longest wait between two quorum checks while inquorate, in ms. The check is a fallback:
 * corosync's notification that quorum is back rejoins at once.
 */
export const QUORUM_POLL_MAX_MS = 1_000;
/** Verdicts remembered, by ring (a verdict may be read before the ring's CPG events). */
export const MAX_TRACKED_RINGS = 64;

/**
 * Longest {@link connectPatiently} waits out `CS_ERR_TRY_AGAIN` from cpg_initialize or
 * quorum_initialize, in ms: corosync answers so while it starts or syncs (clogd started right
 * after it, by systemd or by hand), and libqb answers so for a connection handshake a signal
 * interrupted. A corosync that does not run (`CS_ERR_LIBRARY`) fails at once.
 */
export const CONNECT_TRY_AGAIN_LIMIT_MS = 10_000;
/** First wait between two such connection attempts, in ms (doubles up to the max). */
export const CONNECT_RETRY_INITIAL_MS = 10;
/** Longest wait between two such connection attempts, in ms. */
export const CONNECT_RETRY_MAX_MS = 500;

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
  /** {@link VERDICT_TIMEOUT_MS} */
  verdictTimeoutMs: number;
  /** {@link MAX_HELD_EVENTS} */
  maxHeldEvents: number;
  /** {@link MAX_HELD_BYTES} */
  maxHeldBytes: number;
  /** {@link QUORUM_POLL_INITIAL_MS} */
  quorumPollInitialMs: number;
  /** {@link QUORUM_POLL_MAX_MS} */
  quorumPollMaxMs: number;
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
  verdictTimeoutMs: VERDICT_TIMEOUT_MS,
  maxHeldEvents: MAX_HELD_EVENTS,
  maxHeldBytes: MAX_HELD_BYTES,
  quorumPollInitialMs: QUORUM_POLL_INITIAL_MS,
  quorumPollMaxMs: QUORUM_POLL_MAX_MS,
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
  /** libquorum's path (default `$CLOGD_LIBQUORUM`, else `libquorum.so.5`). */
  quorumLibPath?: string;
  /**
   * Opens a quorum handle, for every (re)connection; default `QuorumHandle.open`, unless `open`
   * is given: then quorum is tracked only if this is given too (tests pass
   * `Corosync.openQuorum`), because a handle opened elsewhere may belong to another corosync.
   */
  openQuorum?: (callbacks: QuorumCallbacks) => QuorumHandle;
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
  /** The partition is not quorate: no CPG session until it is again. */
  | "inquorate"
  /** corosync came back with another node id: stays disconnected. */
  | "failed"
  | "closed";

type CpgEvent =
  | { kind: "deliver"; nodeid: number; pid: number; data: Uint8Array }
  | { kind: "confchg"; members: CpgAddress[]; left: CpgAddress[]; joined: CpgAddress[] }
  | { kind: "totem"; ring: CpgRingId; members: number[] };

/** The quorum state of a transport, for `clogd status` ({@link CpgTransport.quorumState}). */
export interface QuorumState {
  /** Whether this node's partition is quorate (always true without a provider or tracking). */
  quorate: boolean;
  /**
   * "votequorum" (a provider decides: QUORUM_SET), "none" (QUORUM_FREE: every partition is
   * called quorate), or "untracked" (a transport opened without quorum tracking).
   */
  provider: "votequorum" | "none" | "untracked";
  /** The ring of the last verdict, "nodeid.seq" in hex as corosync-quorumtool prints it. */
  ring: string | null;
  /** Node ids of that ring. */
  members: number[];
  /** Whether a membership change is held, waiting for its verdict. */
  holding: boolean;
}

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
  /** Quorum notifications read. */
  quorumNotifications: number;
  /** Sessions ended because the partition was not quorate (or its verdict never came). */
  quorumLosses: number;
  /** Membership changes held until their quorum verdict. */
  quorumHolds: number;
  /** Longest such hold, in ms. */
  quorumHoldMaxMs: number;
  /** Most events held at once. */
  maxHeldEvents: number;
  /** Checks of quorum while inquorate (polls and notifications) that found it still lost. */
  quorumPolls: number;
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
  readonly #openQuorum: ((callbacks: QuorumCallbacks) => QuorumHandle) | undefined;
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
  /** Events of the running cpg_dispatch, moved to {@link #pending} once it returned. */
  #events: CpgEvent[] = [];
  /** Events read but not yet handed over (held while a quorum verdict is awaited). */
  #pending: CpgEvent[] = [];
  #pendingHead = 0;
  #pendingBytes = 0;
  /** Since when (ms) the first pending event waits for a quorum verdict; undefined: not held. */
  #heldSince: number | undefined;
  #verdictTimer: ReturnType<typeof setTimeout> | undefined;
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
  // ---- Quorum (see the module doc) ----
  /** The quorum connection; undefined when not tracking or while corosync is unreachable. */
  #quorum: QuorumHandle | undefined;
  #quorumFd = -1;
  /** quorum_type of the connection: QUORUM_SET or QUORUM_FREE (-1: untracked). */
  #quorumType = -1;
  /** The latest verdict (true while untracked or without a provider). */
  #quorate = true;
  #lastVerdict: QuorumNotification | undefined;
  /** Verdicts by ring ("nodeid:seq"), the newest {@link MAX_TRACKED_RINGS}. */
  #verdicts = new Map<string, boolean>();
  /** Sequence number of the newest ring with a verdict. */
  #newestVerdictSeq = -1n;
  /** Notifications of the running quorum_dispatch, handled once it returned. */
  #quorumEvents: QuorumNotification[] = [];
  #quorumPollDelay: number;
  #quorumPollTimer: ReturnType<typeof setTimeout> | undefined;
  #quorumEmptyWakes = 0;
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
    quorumNotifications: 0,
    quorumLosses: 0,
    quorumHolds: 0,
    quorumHoldMaxMs: 0,
    maxHeldEvents: 0,
    quorumPolls: 0,
  };

  private constructor(
    options: CpgTransportOptions,
    opens: {
      cpg: (c: CpgCallbacks) => CpgHandle;
      quorum: ((c: QuorumCallbacks) => QuorumHandle) | undefined;
    },
  ) {
    this.#loop = options.loop;
    this.#log = options.logger;
    this.group = options.group ?? DEFAULT_CPG_GROUP;
    this.#open = opens.cpg;
    this.#openQuorum = opens.quorum;
    this.#limits = { ...DEFAULT_CPG_LIMITS, ...options.limits };
    for (const [name, value] of Object.entries(this.#limits)) {
      if (!Number.isInteger(value) || value < 1) {
        throw new RangeError(`CPG limit ${name} must be a positive integer, got ${value}`);
      }
    }
    this.#tryAgainDelay = this.#limits.tryAgainInitialMs;
    this.#reconnectDelay = this.#limits.reconnectInitialMs;
    this.#quorumPollDelay = this.#limits.quorumPollInitialMs;
    this.#handle = opens.cpg(this.#callbacks(0));
    try {
      this.nodeId = this.#handle.localNodeId();
      // CPG first: its errors (CS_ERR_LIBRARY when corosync does not run) are what callers see.
      if (opens.quorum !== undefined) this.#openQuorumHandle(opens.quorum);
    } catch (error) {
      this.#handle.finalize();
      throw error;
    }
    this.#fd = this.#handle.fd;
  }

  /**
   * Connects to the corosync of this process's network namespace (cpg_initialize and the quorum
   * service) and reads this node's id. Does not join the group yet: {@link start} does.
   *
   * @throws CpgError with code CS_ERR_LIBRARY ("is corosync running?") when corosync does not
   *   run (or is still starting); QuorumError when its quorum service does not answer; Error
   *   when libcpg or libquorum does not load; RangeError for a bad group name or limit
   */
  static connect(options: CpgTransportOptions): CpgTransport {
    // Fails here, not at the first join, on a name CPG cannot carry.
    encodeCpgName(options.group ?? DEFAULT_CPG_GROUP);
    const cpg = options.open ??
      ((callbacks: CpgCallbacks) => CpgHandle.open(callbacks, { libPath: options.libPath }));
    const quorum = options.openQuorum ??
      (options.open === undefined
        ? (callbacks: QuorumCallbacks) =>
          QuorumHandle.open(callbacks, { libPath: options.quorumLibPath })
        : undefined);
    return new CpgTransport(options, { cpg, quorum });
  }

  /**
   * {@link connect}, tried again while corosync answers `CS_ERR_TRY_AGAIN` (see
   * {@link CONNECT_TRY_AGAIN_LIMIT_MS}), with backoff; the event loop runs meanwhile.
   *
   * @throws what {@link connect} throws: at once for anything but `CS_ERR_TRY_AGAIN`, and that
   *   too once `limitMs` passed
   */
  static async connectPatiently(
    options: CpgTransportOptions,
    patience: { limitMs?: number; onRetry?: (error: Error, attempt: number) => void } = {},
  ): Promise<CpgTransport> {
    const limitMs = patience.limitMs ?? CONNECT_TRY_AGAIN_LIMIT_MS;
    const deadline = Date.now() + limitMs;
    let delay = CONNECT_RETRY_INITIAL_MS;
    for (let attempt = 1;; attempt++) {
      try {
        return CpgTransport.connect(options);
      } catch (error) {
        const tryAgain = error instanceof CsError && error.code === CS_ERR_TRY_AGAIN;
        if (!tryAgain || Date.now() + delay > deadline) throw error;
        patience.onRetry?.(error, attempt);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, CONNECT_RETRY_MAX_MS);
    }
  }

  /**
   * Joins the group and starts dispatching to `handlers`. The join is retried by timer while
   * corosync answers CS_ERR_TRY_AGAIN, and waits for quorum when the partition is not quorate;
   * the first membership change that contains this node in `joined` says the node is in.
   *
   * @throws Error if already started or closed
   */
  start(handlers: TransportHandlers): void {
    if (this.#state !== "idle" || this.#handlers !== undefined) {
      throw new Error(`CpgTransport.start() called when ${this.#state}`);
    }
    this.#handlers = handlers;
    if (this.#quorumType === QUORUM_FREE) {
      this.#log.warn(
        "corosync has NO QUORUM PROVIDER (quorum_type QUORUM_FREE): it cannot tell a network " +
          "partition from a crash, so every partition counts as quorate and each side keeps " +
          "serving the shared mirrors from its own replica (split brain). Configure " +
          "`quorum { provider: corosync_votequorum }` in corosync.conf",
      );
    } else if (this.#quorumType === -1) {
      this.#log.debug("CPG transport without quorum tracking (its CPG handles are opened for it)");
    }
    if (!this.#quorateNow()) {
      // Not quorate from the start: no session until it is.
      this.#handle?.finalize();
      this.#handle = undefined;
      this.#fd = -1;
      this.#waitForQuorum(`the partition is not quorate${this.#ringText()}`);
      return;
    }
    this.#attach();
  }

  /**
   * Multicasts `bytes` (sent as is) in total order. Never throws. Keeps this node's send order:
   * once corosync said CS_ERR_TRY_AGAIN, or while a membership change waits for its quorum
   * verdict, this and later messages queue (copied) until they can go. Without a joined session
   * the message is dropped and counted: the core's state of a lost session is gone, and it
   * sends nothing before it has joined again.
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
    if (this.#queueLength() === 0 && this.#heldSince === undefined) {
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
    // While held, the release drains the queue.
    if (this.#heldSince === undefined) this.#scheduleRetry();
  }

  /**
   * Counters, plus the current queue, state and session, and quorum: `quorate` (1 or 0) and
   * `quorumType` (1 QUORUM_SET, 0 QUORUM_FREE, -1 untracked); {@link quorumState} has more.
   */
  stats(): Record<string, number> {
    return {
      ...this.#stats,
      queueLength: this.#queueLength(),
      queueBytes: this.#queueBytes,
      joined: this.#state === "joined" ? 1 : 0,
      sessions: this.#session + 1,
      quorate: this.#quorate ? 1 : 0,
      quorumType: this.#quorumType,
      heldEvents: this.#pendingLength(),
    };
  }

  /** The quorum state, for `clogd status` (the lead wires it in as `quorum`). */
  get quorumState(): QuorumState {
    const verdict = this.#lastVerdict;
    return {
      quorate: this.#quorate,
      provider: this.#quorumType === -1
        ? "untracked"
        : this.#quorumType === QUORUM_FREE
        ? "none"
        : "votequorum",
      ring: verdict === undefined ? null : ringName(verdict.ringId),
      members: verdict?.members ?? [],
      holding: this.#heldSince !== undefined,
    };
  }

  /**
   * "idle", "joining", "joined", "down", "inquorate", "failed" or "closed" (for status and
   * tests).
   */
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
    clearTimeout(this.#quorumPollTimer);
    this.#quorumPollTimer = undefined;
    this.#closeQuorumHandle();
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
   * from inside a mcast() call of theirs), the queue and held events are dropped, the handle
   * finalized, and a reconnection scheduled: at once (with backoff) when the connection failed,
   * once quorate again when `quorum` says the partition lost quorum.
   */
  #lose(reason: string, options: { quorum?: boolean } = {}): void {
    if (this.#state !== "joining" && this.#state !== "joined") return;
    const dropped = this.#queueLength();
    const held = this.#pendingLength();
    this.#stats.droppedOnLoss += dropped;
    this.#stats.disconnects++;
    if (options.quorum) this.#stats.quorumLosses++;
    this.#endSession();
    this.#log.warn(
      `Lost the corosync CPG session: ${reason}; dropped ${dropped} queued messages` +
        `${held > 0 ? ` and ${held} events held for a quorum verdict` : ""}; ${
          options.quorum ? "rejoining once the partition is quorate" : "reconnecting"
        }`,
    );
    queueMicrotask(() => {
      if (this.#state === "closed") return;
      try {
        this.#handlers?.disconnected(reason);
      } catch (error) {
        this.#handlerError("disconnected", error);
      }
    });
    if (options.quorum) {
      this.#enterInquorate(reason);
      return;
    }
    this.#state = "down";
    this.#reconnectDelay = this.#limits.reconnectInitialMs;
    this.#scheduleReconnect();
  }

  /** Releases the handle, its fd watch, timers, queue and held events; later events are ignored. */
  #endSession(): void {
    this.#session++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#joinTimer);
    clearTimeout(this.#verdictTimer);
    this.#retryTimer = undefined;
    this.#joinTimer = undefined;
    this.#verdictTimer = undefined;
    this.#queue = [];
    this.#queueHead = 0;
    this.#queueBytes = 0;
    this.#tryAgainDelay = this.#limits.tryAgainInitialMs;
    this.#events = [];
    this.#pending = [];
    this.#pendingHead = 0;
    this.#pendingBytes = 0;
    this.#heldSince = undefined;
    this.#members = [];
    const handle = this.#handle;
    this.#handle = undefined;
    if (handle !== undefined) {
      if (this.#fd >= 0) this.#loop.unwatch(this.#fd);
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
    if (this.#openQuorum !== undefined && this.#quorum === undefined) {
      try {
        this.#openQuorumHandle(this.#openQuorum);
      } catch (error) {
        this.#stats.reconnectFailures++;
        this.#log.limited(
          "debug",
          "cpg-reconnect",
          `Reconnecting to corosync: ${errorText(error)}`,
        );
        this.#scheduleReconnect();
        return;
      }
    }
    if (!this.#quorateNow()) {
      if (this.#quorum === undefined) {
        this.#stats.reconnectFailures++;
        this.#scheduleReconnect();
        return;
      }
      this.#enterInquorate(`the partition is not quorate${this.#ringText()}`);
      return;
    }
    this.#openSession();
  }

  /** Opens a CPG handle, checks the node id and joins; on failure schedules a reconnection. */
  #openSession(): void {
    let handle: CpgHandle;
    let nodeId: number;
    try {
      handle = this.#open(this.#callbacks(this.#session));
    } catch (error) {
      this.#stats.reconnectFailures++;
      this.#log.limited("debug", "cpg-reconnect", `Reconnecting to corosync: ${errorText(error)}`);
      this.#state = "down";
      this.#scheduleReconnect();
      return;
    }
    try {
      nodeId = handle.localNodeId();
    } catch (error) {
      handle.finalize();
      this.#stats.reconnectFailures++;
      this.#log.limited("debug", "cpg-reconnect", `Reconnecting to corosync: ${errorText(error)}`);
      this.#state = "down";
      this.#scheduleReconnect();
      return;
    }
    if (nodeId !== this.nodeId) {
      handle.finalize();
      this.#state = "failed";
      this.#closeQuorumHandle();
      this.#log.error(
        `corosync came back with node id ${nodeId}, but this daemon is node ${this.nodeId}: ` +
          "staying disconnected (restart clogd to serve as the new node)",
      );
      return;
    }
    this.#stats.reconnects++;
    this.#handle = handle;
    this.#fd = handle.fd;
    this.#log.info(`Connected to corosync as node ${nodeId}; joining "${this.group}" again`);
    this.#attach();
  }

  // ---- Quorum ----

  #openQuorumHandle(open: (callbacks: QuorumCallbacks) => QuorumHandle): void {
    const handle = open({
      onQuorum: (notification) => this.#quorumEvents.push(notification),
      // Only a bug in the callback above gets here.
      onError: (error) => this.#log.error(`Quorum callback failed: ${errorText(error)}`),
    });
    try {
      handle.trackStart(CS_TRACK_CHANGES);
      this.#quorumType = handle.quorumType;
      this.#quorate = handle.hasProvider ? handle.quorate() : true;
    } catch (error) {
      handle.finalize();
      throw error;
    }
    // A new connection may be a new corosync, whose ring numbers may have started over.
    this.#verdicts.clear();
    this.#newestVerdictSeq = -1n;
    this.#lastVerdict = undefined;
    this.#quorum = handle;
    this.#quorumFd = handle.fd;
    this.#loop.watch(this.#quorumFd, () => this.#onQuorumReadable());
  }

  #closeQuorumHandle(): void {
    const handle = this.#quorum;
    this.#quorum = undefined;
    this.#quorumEvents = [];
    if (handle === undefined) return;
    this.#loop.unwatch(this.#quorumFd);
    this.#quorumFd = -1;
    handle.finalize();
  }

  /** Whether tracking is on and a provider decides quorum. */
  get #gating(): boolean {
    return this.#quorumType !== -1 && this.#quorumType !== QUORUM_FREE;
  }

  /**
   * Whether the partition is quorate now, asking corosync (a current answer is what counts
   * before a join; membership changes are judged by their own ring's verdict instead).
   */
  #quorateNow(): boolean {
    if (this.#openQuorum === undefined || this.#quorumType === QUORUM_FREE) return true;
    const handle = this.#quorum;
    if (handle === undefined) return false;
    try {
      this.#quorate = handle.quorate();
    } catch (error) {
      // corosync went away: the connection is of no more use (see #waitForQuorum).
      this.#log.limited("debug", "quorum-poll", `quorum_getquorate: ${errorText(error)}`);
      this.#closeQuorumHandle();
      return false;
    }
    return this.#quorate;
  }

  /**
   * After {@link #quorateNow} said no: wait for quorum, or, when the quorum connection is gone
   * (corosync died), reconnect as after any lost connection.
   */
  #waitForQuorum(reason: string): void {
    if (this.#quorum !== undefined) {
      this.#enterInquorate(reason);
      return;
    }
    this.#state = "down";
    this.#reconnectDelay = this.#limits.reconnectInitialMs;
    this.#scheduleReconnect();
  }

  /** No CPG session until quorate: wait for a notification, and poll with backoff. */
  #enterInquorate(reason: string): void {
    this.#state = "inquorate";
    this.#quorumPollDelay = this.#limits.quorumPollInitialMs;
    this.#log.limited(
      "warn",
      "inquorate",
      `Not serving: ${reason}; waiting for quorum before joining CPG group "${this.group}"`,
    );
    this.#scheduleQuorumPoll();
  }

  #scheduleQuorumPoll(): void {
    clearTimeout(this.#quorumPollTimer);
    const delay = this.#quorumPollDelay;
    this.#quorumPollDelay = Math.min(delay * 2, this.#limits.quorumPollMaxMs);
    this.#quorumPollTimer = setTimeout(() => {
      this.#quorumPollTimer = undefined;
      this.#checkRejoin();
    }, delay);
  }

  /** While inquorate: rejoin if quorate now, else keep polling. */
  #checkRejoin(): void {
    if (this.#state !== "inquorate") return;
    if (!this.#quorateNow()) {
      this.#stats.quorumPolls++;
      if (this.#quorum === undefined) {
        clearTimeout(this.#quorumPollTimer);
        this.#quorumPollTimer = undefined;
        this.#waitForQuorum("the quorum service is gone");
        return;
      }
      this.#scheduleQuorumPoll();
      return;
    }
    clearTimeout(this.#quorumPollTimer);
    this.#quorumPollTimer = undefined;
    this.#log.info(`The partition is quorate again${this.#ringText()}`);
    this.#openSession();
  }

  #onQuorumReadable(): void {
    const handle = this.#quorum;
    if (handle === undefined) return;
    let result: number;
    try {
      result = handle.dispatch(CS_DISPATCH_ALL);
    } catch (error) {
      result = CS_ERR_LIBRARY;
      this.#log.error(`quorum_dispatch failed: ${errorText(error)}`);
    }
    const events = this.#quorumEvents;
    this.#quorumEvents = [];
    for (const notification of events) this.#onVerdict(notification);
    if (result === CS_OK && events.length === 0) {
      // As for CPG's fd (EMPTY_WAKES_BEFORE_PROBE): a hung-up fd must not make the loop spin.
      if (++this.#quorumEmptyWakes >= EMPTY_WAKES_BEFORE_PROBE) {
        this.#quorumEmptyWakes = 0;
        try {
          handle.quorate();
        } catch (error) {
          result = error instanceof QuorumError ? error.code : CS_ERR_LIBRARY;
        }
      }
    } else {
      this.#quorumEmptyWakes = 0;
    }
    if (result !== CS_OK && this.#quorum === handle) {
      this.#closeQuorumHandle();
      const reason = `quorum_dispatch returned ${csErrorName(result)}`;
      if (this.#state === "joining" || this.#state === "joined") {
        this.#lose(reason);
      } else if (this.#state === "inquorate") {
        this.#checkRejoin();
      }
    }
  }

  #onVerdict(notification: QuorumNotification): void {
    this.#stats.quorumNotifications++;
    this.#lastVerdict = notification;
    this.#quorate = notification.quorate;
    const { ringId } = notification;
    const key = ringKey(ringId);
    this.#verdicts.delete(key);
    this.#verdicts.set(key, notification.quorate);
    if (this.#verdicts.size > MAX_TRACKED_RINGS) {
      this.#verdicts.delete(this.#verdicts.keys().next().value!);
    }
    if (ringId.seq > this.#newestVerdictSeq) this.#newestVerdictSeq = ringId.seq;
    this.#log.debug(
      `Quorum verdict for ring ${ringName(ringId)} (members ${notification.members.join(",")}): ${
        notification.quorate ? "quorate" : "NOT quorate"
      }`,
    );
    if (!this.#gating) return;
    if (!notification.quorate) {
      this.#lose(
        `lost quorum: ring ${ringName(ringId)} has members [${notification.members.join(",")}]`,
        { quorum: true },
      );
      return;
    }
    if (this.#state === "inquorate") {
      this.#checkRejoin();
    } else if (this.#heldSince !== undefined) {
      this.#pump();
    }
  }

  #ringText(): string {
    const verdict = this.#lastVerdict;
    return verdict === undefined
      ? ""
      : ` (ring ${ringName(verdict.ringId)}, members [${verdict.members.join(",")}])`;
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
      // Names the ring of the NODEDOWN/NODEUP confchgs just before it (see the module doc).
      onTotemConfchg: (ring, members) => {
        if (session !== this.#session) return;
        this.#events.push({ kind: "totem", ring, members });
      },
      // Only a bug in the callbacks above gets here.
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
        if (!this.#hold(event)) return;
      }
      this.#pump();
      // A handler closed the transport, or its mcast() lost the session.
      if (session !== this.#session) return;
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
    if (this.#queueLength() > 0 && this.#state === "joined" && this.#heldSince === undefined) {
      this.#drain();
    }
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

  #pendingLength(): number {
    return this.#pending.length - this.#pendingHead;
  }

  /** Queues an event for {@link #pump}; false (session lost) when the hold limits are exceeded. */
  #hold(event: CpgEvent): boolean {
    this.#pending.push(event);
    if (event.kind === "deliver") this.#pendingBytes += event.data.byteLength;
    const length = this.#pendingLength();
    if (length > this.#stats.maxHeldEvents) this.#stats.maxHeldEvents = length;
    if (length > this.#limits.maxHeldEvents || this.#pendingBytes > this.#limits.maxHeldBytes) {
      this.#lose(
        `More than ${this.#limits.maxHeldEvents} events or ${this.#limits.maxHeldBytes} bytes ` +
          "arrived while a membership change waited for its quorum verdict",
        { quorum: true },
      );
      return false;
    }
    return true;
  }

  /**
   * Hands pending events over in order, stopping at a membership change of another node
   * (NODEDOWN or NODEUP) until the verdict for its ring is in: that ring is named by the next
   * totem confchg. See the module doc.
   */
  #pump(): void {
    const session = this.#session;
    while (this.#pendingLength() > 0) {
      const first = this.#pending[this.#pendingHead];
      if (this.#gating && this.#heldSince === undefined && isRingChange(first)) {
        this.#heldSince = Date.now();
        this.#stats.quorumHolds++;
        const timeout = this.#limits.verdictTimeoutMs;
        this.#verdictTimer = setTimeout(() => {
          this.#verdictTimer = undefined;
          if (session !== this.#session) return;
          this.#lose(`lost quorum: no quorum verdict for a membership change in ${timeout} ms`, {
            quorum: true,
          });
        }, timeout);
      }
      if (this.#heldSince !== undefined) {
        const decision = this.#decide();
        if (decision.kind === "wait") return;
        if (decision.kind === "lost") {
          this.#lose(decision.reason, { quorum: true });
          return;
        }
        // Quorate: hand over everything up to and including that ring's totem confchg.
        const held = Date.now() - this.#heldSince;
        if (held > this.#stats.quorumHoldMaxMs) this.#stats.quorumHoldMaxMs = held;
        clearTimeout(this.#verdictTimer);
        this.#verdictTimer = undefined;
        this.#heldSince = undefined;
        // #take() may compact the array: count, do not index.
        for (let count = decision.through - this.#pendingHead + 1; count > 0; count--) {
          this.#handOver(this.#take());
          if (session !== this.#session) return;
        }
        if (this.#queueLength() > 0 && this.#state === "joined") this.#drain();
        if (session !== this.#session) return;
        continue;
      }
      this.#handOver(this.#take());
      if (session !== this.#session) return;
    }
    this.#pending = [];
    this.#pendingHead = 0;
    this.#pendingBytes = 0;
  }

  #take(): CpgEvent {
    const event = this.#pending[this.#pendingHead];
    this.#pending[this.#pendingHead++] = EMPTY_EVENT;
    if (event.kind === "deliver") this.#pendingBytes -= event.data.byteLength;
    // Shift out the handed-over part now and then, not per event: shift() is O(n).
    if (this.#pendingHead >= 1024 && this.#pendingHead * 2 >= this.#pending.length) {
      this.#pending = this.#pending.slice(this.#pendingHead);
      this.#pendingHead = 0;
    }
    return event;
  }

  /**
   * The verdict on the held events: wait (their ring is not named yet, or its verdict not in),
   * lost, or quorate through the index of the totem confchg naming their ring.
   */
  #decide():
    | { kind: "wait" }
    | { kind: "lost"; reason: string }
    | { kind: "quorate"; through: number } {
    let totem = -1;
    for (let i = this.#pendingHead; i < this.#pending.length; i++) {
      if (this.#pending[i].kind === "totem") {
        totem = i;
        break;
      }
    }
    if (totem < 0) return { kind: "wait" };
    const { ring } = this.#pending[totem] as Extract<CpgEvent, { kind: "totem" }>;
    const verdict = this.#verdicts.get(ringKey(ring));
    if (verdict === true) return { kind: "quorate", through: totem };
    if (verdict === false) {
      return { kind: "lost", reason: `lost quorum: ring ${ringName(ring)} is not quorate` };
    }
    if (this.#newestVerdictSeq > ring.seq) {
      // corosync moved on before deciding this ring (its sync was aborted): no proof of quorum.
      return {
        kind: "lost",
        reason: `lost quorum: no quorum verdict for ring ${ringName(ring)}, one for a later ring`,
      };
    }
    return { kind: "wait" };
  }

  #handOver(event: CpgEvent): void {
    if (event.kind === "totem") return;
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

  /**
   * Sends queued messages, oldest first, until corosync says try again or the queue is empty.
   * Nothing goes out while a membership change waits for its quorum verdict.
   */
  #drain(): void {
    if (this.#heldSince !== undefined) return;
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
const EMPTY_EVENT: CpgEvent = { kind: "deliver", nodeid: 0, pid: 0, data: EMPTY };

/**
 * Whether a confchg comes from corosync's synchronization of a new ring (another node's
 * processes lost or found with it): those wait for the ring's quorum verdict.
 */
function isRingChange(event: CpgEvent): boolean {
  return event.kind === "confchg" && (
    event.left.some((a) => a.reason === CPG_REASON.NODEDOWN) ||
    event.joined.some((a) => a.reason === CPG_REASON.NODEUP)
  );
}

function ringKey(ring: { nodeid: number; seq: bigint }): string {
  return `${ring.nodeid}:${ring.seq}`;
}

/** A ring id as corosync-quorumtool prints it: "nodeid.seq" in hex. */
function ringName(ring: { nodeid: number; seq: bigint }): string {
  return `${ring.nodeid.toString(16)}.${ring.seq.toString(16)}`;
}

function leaveReason(reason: number): LeaveReason {
  // NODEDOWN and PROCDOWN are crashes; anything unexpected is treated as one too: a crash makes
  // the survivors resync the node's regions, a wrong "leave" would lose that.
  return reason === CPG_REASON.LEAVE ? "leave" : "crash";
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
