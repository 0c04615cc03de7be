/**
 * corosync's quorum library (libquorum) through Deno FFI: one declarative symbol table, the
 * struct layouts of `<corosync/quorum.h>`, and {@link QuorumHandle}, a handle that owns its C
 * callbacks and buffers for as long as C may use them. Same shape as ffi/cpg.ts.
 *
 * The library is loaded on first use ({@link libquorum}); `CLOGD_LIBQUORUM` overrides the path
 * (`libquorum.so.5` by default, found by the dynamic loader). Layouts are for Linux on x86_64
 * and aarch64 (LP64).
 *
 * What libquorum tells:
 * - Whether a quorum provider is configured (`quorum_type`, {@link QUORUM_SET}) or not
 *   ({@link QUORUM_FREE}): without one corosync reports every partition quorate, so it cannot
 *   tell a partition from a crash.
 * - Whether this node's partition is quorate now ({@link QuorumHandle.quorate}), and, once
 *   tracking ({@link QuorumHandle.trackStart}), a notification per change with the totem ring id
 *   it was decided for (model v1). corosync sends one after every membership change, when its
 *   quorum provider (votequorum) has synchronized that membership.
 *
 * Like libcpg, `quorum_dispatch` keeps a large buffer on the C stack and calls our JS callbacks
 * on top of it: run Deno with `--v8-flags=--stack-size=2048`. Callback bodies never throw into
 * C: errors are recorded and thrown (or handed to `onError`) after the C call returned. libquorum
 * finds corosync through abstract unix sockets, which belong to a network namespace.
 *
 * @module
 */

import { cachedDlopen } from "./dlopen.ts";
import { CallbackDispatch } from "./dispatch.ts";
import { CS_DISPATCH_ALL, CS_ERR_LIBRARY, CS_OK, CsError } from "./cpg.ts";

/** The libquorum symbols clogd uses. Each parameter is annotated with its C type. */
export const symbols = {
  /**
   * cs_error_t quorum_model_initialize(quorum_handle_t *handle, quorum_model_t model,
   * quorum_model_data_t *model_data, uint32_t *quorum_type, void *context). Copies
   * `*model_data` (a quorum_model_v1_data_t); keeps the callback pointers in it.
   */
  quorum_model_initialize: {
    parameters: [
      "buffer", // quorum_handle_t *handle (uint64_t out)
      "i32", // quorum_model_t model
      "buffer", // quorum_model_data_t *model_data
      "buffer", // uint32_t *quorum_type (out)
      "pointer", // void *context
    ],
    result: "i32",
  },
  /** cs_error_t quorum_finalize(quorum_handle_t handle) */
  quorum_finalize: { parameters: ["u64" /* quorum_handle_t handle */], result: "i32" },
  /** cs_error_t quorum_fd_get(quorum_handle_t handle, int *fd) */
  quorum_fd_get: {
    parameters: ["u64", /* quorum_handle_t handle */ "buffer" /* int *fd */],
    result: "i32",
  },
  /** cs_error_t quorum_getquorate(quorum_handle_t handle, int *quorate) */
  quorum_getquorate: {
    parameters: ["u64", /* quorum_handle_t handle */ "buffer" /* int *quorate */],
    result: "i32",
  },
  /** cs_error_t quorum_trackstart(quorum_handle_t handle, unsigned int flags) */
  quorum_trackstart: {
    parameters: ["u64", /* quorum_handle_t handle */ "u32" /* unsigned int flags */],
    result: "i32",
  },
  /** cs_error_t quorum_trackstop(quorum_handle_t handle) */
  quorum_trackstop: { parameters: ["u64" /* quorum_handle_t handle */], result: "i32" },
  /** cs_error_t quorum_dispatch(quorum_handle_t handle, cs_dispatch_flags_t dispatch_types) */
  quorum_dispatch: {
    parameters: ["u64", /* quorum_handle_t handle */ "i32" /* cs_dispatch_flags_t */],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

/**
 * `quorum_v1_quorum_notification_fn_t`: void (quorum_handle_t handle, uint32_t quorate,
 * struct quorum_ring_id ring_id, uint32_t member_list_entries, const uint32_t *member_list).
 * The ring id comes by value: `{ uint32_t nodeid; uint64_t seq; }`, 16 bytes with padding.
 */
export const QUORUM_NOTIFY_V1_CALLBACK = {
  parameters: [
    "u64", // quorum_handle_t handle
    "u32", // uint32_t quorate
    { struct: ["u32", "u64"] }, // struct quorum_ring_id ring_id
    "u32", // uint32_t member_list_entries
    "pointer", // const uint32_t *member_list
  ],
  result: "void",
} as const satisfies Deno.UnsafeCallbackDefinition;

/**
 * `quorum_v1_nodelist_notification_fn_t`: void (quorum_handle_t handle,
 * struct quorum_ring_id ring_id, uint32_t member_list_entries, const uint32_t *member_list,
 * uint32_t joined_list_entries, const uint32_t *joined_list, uint32_t left_list_entries,
 * const uint32_t *left_list)
 */
export const NODELIST_NOTIFY_V1_CALLBACK = {
  parameters: [
    "u64", // quorum_handle_t handle
    { struct: ["u32", "u64"] }, // struct quorum_ring_id ring_id
    "u32", // uint32_t member_list_entries
    "pointer", // const uint32_t *member_list
    "u32", // uint32_t joined_list_entries
    "pointer", // const uint32_t *joined_list
    "u32", // uint32_t left_list_entries
    "pointer", // const uint32_t *left_list
  ],
  result: "void",
} as const satisfies Deno.UnsafeCallbackDefinition;

/** The loaded libquorum symbols. */
export type Libquorum = Deno.DynamicLibrary<typeof symbols>["symbols"];

/** Environment variable that overrides the path of libquorum. */
export const LIBQUORUM_PATH_ENV = "CLOGD_LIBQUORUM";
/** Default libquorum: corosync 3's soname, found by the dynamic loader. */
export const DEFAULT_LIBQUORUM_PATH = "libquorum.so.5";

const loaded = new Map<string, Libquorum>();

/**
 * libquorum's symbols, loaded on the first call for a path. `path` defaults to
 * `$CLOGD_LIBQUORUM`, else {@link DEFAULT_LIBQUORUM_PATH}.
 *
 * @throws Error naming the library path that failed to load, with the loader's error as cause
 */
export function libquorum(path?: string): Libquorum {
  return cachedDlopen(
    symbols,
    {
      env: LIBQUORUM_PATH_ENV,
      soname: DEFAULT_LIBQUORUM_PATH,
      what: "corosync's quorum library",
      pkg: "libquorum5",
    },
    loaded,
    path,
  );
}

// ---- Constants (<corosync/quorum.h>, <corosync/corotypes.h>) ----

/** quorum_model_t: notifications with the ring sequence number only. */
export const QUORUM_MODEL_V0 = 0;
/** quorum_model_t: notifications with the full ring id, plus node list notifications. */
export const QUORUM_MODEL_V1 = 1;
/** quorum_type: no quorum provider configured; corosync reports every partition quorate. */
export const QUORUM_FREE = 0;
/** quorum_type: a quorum provider (votequorum) decides. */
export const QUORUM_SET = 1;
/** quorum_trackstart flag: send the current state at once. */
export const CS_TRACK_CURRENT = 0x01;
/** quorum_trackstart flag: send every change. */
export const CS_TRACK_CHANGES = 0x02;
/** quorum_trackstart flag: send every change, not the current state. */
export const CS_TRACK_CHANGES_ONLY = 0x04;
/** Most node ids a notification carries that we read (PROCESSOR_COUNT_MAX in corosync). */
export const QUORUM_MEMBERS_MAX = 384;

// ---- Struct layouts ----

/**
 * `quorum_model_v1_data_t`: `quorum_model_t model @0, quorum_v1_quorum_notification_fn_t @8,
 * quorum_v1_nodelist_notification_fn_t @16`, 24 bytes.
 */
export const QUORUM_MODEL_V1_DATA = {
  size: 24,
  model: 0,
  quorumNotifyFn: 8,
  nodelistNotifyFn: 16,
} as const;
/** `struct quorum_ring_id` passed by value: `uint32_t nodeid @0, uint64_t seq @8`. */
export const QUORUM_RING_ID = { size: 16, nodeid: 0, seq: 8 } as const;

/** A totem ring (membership) id, as quorum notifications carry it. */
export interface QuorumRingId {
  /** Node id of the ring's representative. */
  nodeid: number;
  /** Ring sequence number; grows with every new membership. */
  seq: bigint;
}

/** Decodes a `struct quorum_ring_id` that a callback received by value. */
export function decodeQuorumRingId(bytes: Uint8Array): QuorumRingId {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    nodeid: view.getUint32(QUORUM_RING_ID.nodeid, true),
    seq: view.getBigUint64(QUORUM_RING_ID.seq, true),
  };
}

/**
 * Copies `count` node ids (uint32_t) out of C memory. A count over {@link QUORUM_MEMBERS_MAX}
 * is clamped: corosync's arrays hold no more.
 */
export function decodeNodeIds(pointer: Deno.PointerValue, count: number): number[] {
  const entries = Math.min(count, QUORUM_MEMBERS_MAX);
  const ids: number[] = [];
  if (pointer === null || entries <= 0) return ids;
  const view = new Deno.UnsafePointerView(pointer);
  for (let i = 0; i < entries; i++) ids.push(view.getUint32(i * 4));
  return ids;
}

// ---- Errors ----

/** A libquorum call failed. */
export class QuorumError extends CsError {}

/** Most callback errors one dispatch records; the rest are only counted. */
export const MAX_RECORDED_QUORUM_CALLBACK_ERRORS = 16;

/** One or more of our callbacks threw while libquorum was dispatching. */
export class QuorumCallbackError extends Error {
  /** The errors recorded, first first. */
  readonly errors: readonly unknown[];
  /** How many callbacks threw during the dispatch. */
  readonly count: number;

  /** The first error is the cause; the message says how many more there were. */
  constructor(errors: readonly unknown[], count: number) {
    const first = errors[0];
    const text = first instanceof Error ? first.message : String(first);
    const more = count > 1 ? ` (and ${count - 1} more)` : "";
    super(`A quorum callback threw: ${text}${more}`, { cause: first });
    this.name = "QuorumCallbackError";
    this.errors = errors;
    this.count = count;
  }
}

// ---- The handle ----

/** A quorum notification: the verdict for a ring, and the members of that ring. */
export interface QuorumNotification {
  /** Whether this node's partition is quorate. */
  quorate: boolean;
  /** The totem ring the verdict is for. */
  ringId: QuorumRingId;
  /** Node ids in that ring. */
  members: number[];
}

/** A node list notification (model v1): the ring's members, who joined and who left. */
export interface NodelistNotification {
  ringId: QuorumRingId;
  members: number[];
  joined: number[];
  left: number[];
}

/** What a {@link QuorumHandle} calls while {@link QuorumHandle.dispatch} runs. */
export interface QuorumCallbacks {
  /** Quorum changed, or a new ring was synchronized (only while tracking). */
  onQuorum?(notification: QuorumNotification): void;
  /** The node list changed (only while tracking). Without it libquorum is not asked. */
  onNodelist?(notification: NodelistNotification): void;
  /**
   * Receives each error a callback threw, after quorum_dispatch returned. Without it,
   * {@link QuorumHandle.dispatch} throws a {@link QuorumCallbackError} instead.
   */
  onError?(error: unknown): void;
}

type QuorumNotifyCallback = Deno.UnsafeCallback<typeof QUORUM_NOTIFY_V1_CALLBACK>;
type NodelistNotifyCallback = Deno.UnsafeCallback<typeof NODELIST_NOTIFY_V1_CALLBACK>;

/**
 * A connection to corosync's quorum service (a `quorum_handle_t`, model v1), on the calling
 * thread. Use: {@link open}, {@link quorate}; for notifications {@link trackStart}, then wait
 * for {@link fd} to be readable and call {@link dispatch}. {@link finalize} (or `using`)
 * releases the handle and its callbacks.
 */
export class QuorumHandle implements Disposable {
  readonly #lib: Libquorum;
  readonly #callbacks: QuorumCallbacks;
  #handle = 0n;
  #fd = -1;
  #type = QUORUM_FREE;
  #quorumCallback: QuorumNotifyCallback | undefined;
  #nodelistCallback: NodelistNotifyCallback | undefined;
  readonly #i32Out = new Int32Array(new ArrayBuffer(4));
  readonly #dispatch = new CallbackDispatch({
    who: "QuorumHandle.dispatch()",
    stackAdvice: "A quorum callback overflowed the stack: libquorum's dispatch uses a large C " +
      "stack buffer, run Deno with --v8-flags=--stack-size=2048",
    maxRecorded: MAX_RECORDED_QUORUM_CALLBACK_ERRORS,
  });
  #finalized = false;

  private constructor(lib: Libquorum, callbacks: QuorumCallbacks) {
    this.#lib = lib;
    this.#callbacks = callbacks;
    this.#quorumCallback = new Deno.UnsafeCallback(
      QUORUM_NOTIFY_V1_CALLBACK,
      (_handle, quorate, ringId, count, members) => {
        try {
          callbacks.onQuorum?.({
            quorate: quorate !== 0,
            ringId: decodeQuorumRingId(ringId),
            members: decodeNodeIds(members, count),
          });
        } catch (error) {
          this.#dispatch.record(error);
        }
      },
    );
    if (callbacks.onNodelist !== undefined) {
      this.#nodelistCallback = new Deno.UnsafeCallback(
        NODELIST_NOTIFY_V1_CALLBACK,
        (_handle, ringId, memberCount, members, joinedCount, joined, leftCount, left) => {
          try {
            callbacks.onNodelist?.({
              ringId: decodeQuorumRingId(ringId),
              members: decodeNodeIds(members, memberCount),
              joined: decodeNodeIds(joined, joinedCount),
              left: decodeNodeIds(left, leftCount),
            });
          } catch (error) {
            this.#dispatch.record(error);
          }
        },
      );
    }
  }

  /**
   * Connects to the corosync of this process's network namespace (model v1).
   *
   * @throws QuorumError from quorum_model_initialize (CS_ERR_LIBRARY while corosync is not
   *   running or still starting) or quorum_fd_get
   * @throws Error if the library does not load
   */
  static open(callbacks: QuorumCallbacks = {}, options: { libPath?: string } = {}): QuorumHandle {
    const self = new QuorumHandle(libquorum(options.libPath), callbacks);
    try {
      self.#connect();
    } catch (error) {
      self.#closeCallbacks();
      throw error;
    }
    return self;
  }

  #connect(): void {
    const model = new Uint8Array(new ArrayBuffer(QUORUM_MODEL_V1_DATA.size));
    const view = new DataView(model.buffer);
    view.setInt32(QUORUM_MODEL_V1_DATA.model, QUORUM_MODEL_V1, true);
    setPointer(view, QUORUM_MODEL_V1_DATA.quorumNotifyFn, this.#quorumCallback!.pointer);
    setPointer(
      view,
      QUORUM_MODEL_V1_DATA.nodelistNotifyFn,
      this.#nodelistCallback?.pointer ?? null,
    );
    const handleOut = new BigUint64Array(1);
    const typeOut = new Uint32Array(1);
    const result = this.#lib.quorum_model_initialize(
      new Uint8Array(handleOut.buffer),
      QUORUM_MODEL_V1,
      model,
      new Uint8Array(typeOut.buffer),
      null,
    );
    if (result !== CS_OK) {
      throw new QuorumError("quorum_model_initialize", result, {
        hint: result === CS_ERR_LIBRARY ? "is corosync running?" : undefined,
      });
    }
    this.#handle = handleOut[0];
    this.#type = typeOut[0];
    const fdOut = new Int32Array(1);
    const fdResult = this.#lib.quorum_fd_get(this.#handle, new Uint8Array(fdOut.buffer));
    if (fdResult !== CS_OK) {
      this.#lib.quorum_finalize(this.#handle);
      throw new QuorumError("quorum_fd_get", fdResult);
    }
    this.#fd = fdOut[0];
  }

  /** {@link QUORUM_SET} when a quorum provider is configured, {@link QUORUM_FREE} when not. */
  get quorumType(): number {
    return this.#type;
  }

  /** Whether a quorum provider decides (false: every partition is reported quorate). */
  get hasProvider(): boolean {
    return this.#type !== QUORUM_FREE;
  }

  /** The fd to wait on (readable when {@link dispatch} has work). Owned by libquorum. */
  get fd(): number {
    return this.#fd;
  }

  /** Whether {@link finalize} ran. */
  get finalized(): boolean {
    return this.#finalized;
  }

  /**
   * Whether this node's partition is quorate, as corosync's quorum service says now (one IPC
   * round trip).
   *
   * @throws QuorumError, e.g. CS_ERR_LIBRARY when corosync died
   */
  quorate(): boolean {
    this.#assertOpen("quorate");
    const result = this.#lib.quorum_getquorate(this.#handle, new Uint8Array(this.#i32Out.buffer));
    if (result !== CS_OK) throw new QuorumError("quorum_getquorate", result);
    return this.#i32Out[0] !== 0;
  }

  /**
   * Asks for notifications ({@link CS_TRACK_CHANGES} by default; add {@link CS_TRACK_CURRENT}
   * for the current state at once). They arrive through {@link dispatch}.
   *
   * @throws QuorumError
   */
  trackStart(flags: number = CS_TRACK_CHANGES): void {
    this.#assertOpen("trackStart");
    const result = this.#lib.quorum_trackstart(this.#handle, flags);
    if (result !== CS_OK) throw new QuorumError("quorum_trackstart", result);
  }

  /**
   * Stops notifications.
   *
   * @throws QuorumError
   */
  trackStop(): void {
    this.#assertOpen("trackStop");
    const result = this.#lib.quorum_trackstop(this.#handle);
    if (result !== CS_OK) throw new QuorumError("quorum_trackstop", result);
  }

  /**
   * Runs the callbacks for what corosync queued (`CS_DISPATCH_ALL` by default: all of it,
   * without waiting). Returns quorum_dispatch's cs_error_t: CS_OK, or CS_ERR_LIBRARY when
   * corosync died (finalize and reconnect).
   *
   * @throws QuorumCallbackError when a callback threw and there is no `onError`
   * @throws Error when Deno's stack is too small for libquorum
   */
  dispatch(flags: number = CS_DISPATCH_ALL): number {
    this.#assertOpen("dispatch");
    const { result, errors, count } = this.#dispatch.run(
      () => this.#lib.quorum_dispatch(this.#handle, flags),
      () => {
        if (this.#finalized) this.#closeCallbacks();
      },
    );
    if (count > 0) {
      const onError = this.#callbacks.onError;
      if (onError === undefined) throw new QuorumCallbackError(errors, count);
      for (const error of errors) onError.call(this.#callbacks, error);
    }
    return result;
  }

  /**
   * Releases the handle. Idempotent. Returns quorum_finalize's cs_error_t. Safe inside a
   * callback: the callbacks are closed once the running dispatch returns.
   */
  finalize(): number {
    if (this.#finalized) return CS_OK;
    this.#finalized = true;
    const result = this.#lib.quorum_finalize(this.#handle);
    if (!this.#dispatch.running) this.#closeCallbacks();
    return result;
  }

  /** {@link finalize}, for `using`. */
  [Symbol.dispose](): void {
    this.finalize();
  }

  #closeCallbacks(): void {
    this.#quorumCallback?.close();
    this.#nodelistCallback?.close();
    this.#quorumCallback = undefined;
    this.#nodelistCallback = undefined;
  }

  #assertOpen(method: string): void {
    if (this.#finalized) throw new Error(`QuorumHandle.${method}() called after finalize()`);
  }
}

function setPointer(view: DataView, offset: number, pointer: Deno.PointerValue): void {
  view.setBigUint64(offset, BigInt(Deno.UnsafePointer.value(pointer)), true);
}
