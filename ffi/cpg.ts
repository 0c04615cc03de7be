/**
 * corosync's Closed Process Group library (libcpg) through Deno FFI: one declarative symbol
 * table, the struct layouts of `<corosync/cpg.h>`, and {@link CpgHandle}, a handle that owns its
 * C callbacks and buffers for as long as C may use them.
 *
 * The library is loaded on first use ({@link libcpg}), so modules that merely import this one
 * still load without `--allow-ffi` or without corosync installed. `CLOGD_LIBCPG` overrides the
 * path (`libcpg.so.4` by default, found by the dynamic loader). Layouts are for Linux on x86_64
 * and aarch64 (LP64).
 *
 * Three facts about libcpg shape this module:
 * - `cpg_dispatch` keeps a 1 MiB buffer on the C stack and calls our JS callbacks on top of it,
 *   on the main thread. Deno must run with `--v8-flags=--stack-size=2048`, or V8 sees its stack
 *   limit exceeded when entering the callback; {@link CpgHandle.dispatch} turns that into an
 *   error that says so.
 * - An exception thrown by a JS callback cannot cross the C frames: every callback body is
 *   wrapped, the error is recorded, and {@link CpgHandle.dispatch} throws it once the C call
 *   has returned (or hands it to `onError`).
 * - libcpg finds corosync through abstract unix sockets, which belong to a network namespace:
 *   a process talks to the corosync of its own namespace.
 *
 * @module
 */

import { cachedDlopen } from "./dlopen.ts";
import { CallbackDispatch } from "./dispatch.ts";

/** The libcpg symbols clogd uses. Each parameter is annotated with its C type. */
export const symbols = {
  /**
   * cs_error_t cpg_model_initialize(cpg_handle_t *handle, cpg_model_t model,
   * cpg_model_data_t *model_data, void *context). Copies `*model_data`; keeps the callback
   * pointers in it.
   */
  cpg_model_initialize: {
    parameters: [
      "buffer", // cpg_handle_t *handle (uint64_t out)
      "i32", // cpg_model_t model
      "buffer", // cpg_model_data_t *model_data (a cpg_model_v1_data_t)
      "pointer", // void *context
    ],
    result: "i32",
  },
  /** cs_error_t cpg_finalize(cpg_handle_t handle) */
  cpg_finalize: { parameters: ["u64" /* cpg_handle_t handle */], result: "i32" },
  /** cs_error_t cpg_fd_get(cpg_handle_t handle, int *fd) */
  cpg_fd_get: {
    parameters: ["u64", /* cpg_handle_t handle */ "buffer" /* int *fd */],
    result: "i32",
  },
  /** cs_error_t cpg_join(cpg_handle_t handle, const struct cpg_name *group) */
  cpg_join: {
    parameters: ["u64", /* cpg_handle_t handle */ "buffer" /* const struct cpg_name *group */],
    result: "i32",
  },
  /** cs_error_t cpg_leave(cpg_handle_t handle, const struct cpg_name *group) */
  cpg_leave: {
    parameters: ["u64", /* cpg_handle_t handle */ "buffer" /* const struct cpg_name *group */],
    result: "i32",
  },
  /**
   * cs_error_t cpg_mcast_joined(cpg_handle_t handle, cpg_guarantee_t guarantee,
   * const struct iovec *iovec, unsigned int iov_len). libcpg copies the iovecs into a local
   * array of 64 entries behind its own header, so at most 63 may be passed; we pass one.
   */
  cpg_mcast_joined: {
    parameters: [
      "u64", // cpg_handle_t handle
      "i32", // cpg_guarantee_t guarantee
      "buffer", // const struct iovec *iovec
      "u32", // unsigned int iov_len
    ],
    result: "i32",
  },
  /** cs_error_t cpg_dispatch(cpg_handle_t handle, cs_dispatch_flags_t dispatch_types) */
  cpg_dispatch: {
    parameters: ["u64", /* cpg_handle_t handle */ "i32" /* cs_dispatch_flags_t */],
    result: "i32",
  },
  /** cs_error_t cpg_local_get(cpg_handle_t handle, unsigned int *local_nodeid) */
  cpg_local_get: {
    parameters: ["u64", /* cpg_handle_t handle */ "buffer" /* unsigned int *local_nodeid */],
    result: "i32",
  },
  /**
   * cs_error_t cpg_membership_get(cpg_handle_t handle, struct cpg_name *groupName,
   * struct cpg_address *member_list, int *member_list_entries). The list must hold
   * CPG_MEMBERS_MAX entries: libcpg writes as many as corosync reports, ignoring the count.
   */
  cpg_membership_get: {
    parameters: [
      "u64", // cpg_handle_t handle
      "buffer", // struct cpg_name *groupName
      "buffer", // struct cpg_address *member_list
      "buffer", // int *member_list_entries
    ],
    result: "i32",
  },
  /** cs_error_t cpg_max_atomic_msgsize_get(cpg_handle_t handle, uint32_t *size) */
  cpg_max_atomic_msgsize_get: {
    parameters: ["u64", /* cpg_handle_t handle */ "buffer" /* uint32_t *size */],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

/**
 * `cpg_deliver_fn_t`: void (cpg_handle_t handle, const struct cpg_name *group_name,
 * uint32_t nodeid, uint32_t pid, void *msg, size_t msg_len). `msg` is freed (reused) by libcpg
 * as soon as the callback returns.
 */
export const DELIVER_CALLBACK = {
  parameters: [
    "u64", // cpg_handle_t handle
    "pointer", // const struct cpg_name *group_name
    "u32", // uint32_t nodeid
    "u32", // uint32_t pid
    "pointer", // void *msg
    "usize", // size_t msg_len
  ],
  result: "void",
} as const satisfies Deno.UnsafeCallbackDefinition;

/**
 * `cpg_confchg_fn_t`: void (cpg_handle_t handle, const struct cpg_name *group_name,
 * const struct cpg_address *member_list, size_t member_list_entries,
 * const struct cpg_address *left_list, size_t left_list_entries,
 * const struct cpg_address *joined_list, size_t joined_list_entries)
 */
export const CONFCHG_CALLBACK = {
  parameters: [
    "u64", // cpg_handle_t handle
    "pointer", // const struct cpg_name *group_name
    "pointer", // const struct cpg_address *member_list
    "usize", // size_t member_list_entries
    "pointer", // const struct cpg_address *left_list
    "usize", // size_t left_list_entries
    "pointer", // const struct cpg_address *joined_list
    "usize", // size_t joined_list_entries
  ],
  result: "void",
} as const satisfies Deno.UnsafeCallbackDefinition;

/**
 * `cpg_totem_confchg_fn_t`: void (cpg_handle_t handle, struct cpg_ring_id ring_id,
 * uint32_t member_list_entries, const uint32_t *member_list). The ring id comes by value:
 * `{ uint32_t nodeid; uint64_t seq; }`, 16 bytes with padding.
 */
export const TOTEM_CONFCHG_CALLBACK = {
  parameters: [
    "u64", // cpg_handle_t handle
    { struct: ["u32", "u64"] }, // struct cpg_ring_id ring_id
    "u32", // uint32_t member_list_entries
    "pointer", // const uint32_t *member_list
  ],
  result: "void",
} as const satisfies Deno.UnsafeCallbackDefinition;

/** The loaded libcpg symbols. */
export type Libcpg = Deno.DynamicLibrary<typeof symbols>["symbols"];

/** Environment variable that overrides the path of libcpg. */
export const LIBCPG_PATH_ENV = "CLOGD_LIBCPG";
/** Default libcpg: corosync 3's soname, found by the dynamic loader. */
export const DEFAULT_LIBCPG_PATH = "libcpg.so.4";

// One handle per path: a daemon loads one library, tests may load another through the override.
const loaded = new Map<string, Libcpg>();

/**
 * libcpg's symbols, loaded on the first call for a path. `path` defaults to
 * `$CLOGD_LIBCPG`, else {@link DEFAULT_LIBCPG_PATH}.
 *
 * @throws Error naming the library path that failed to load, with the loader's error as cause
 */
export function libcpg(path?: string): Libcpg {
  return cachedDlopen(
    symbols,
    {
      env: LIBCPG_PATH_ENV,
      soname: DEFAULT_LIBCPG_PATH,
      what: "corosync's CPG library",
      pkg: "libcpg4",
    },
    loaded,
    path,
  );
}

// ---- Constants (<corosync/corotypes.h>, <corosync/cpg.h>) ----

/** cs_error_t: success. */
export const CS_OK = 1;
/** cs_error_t: no connection to corosync (not running, still starting, or died under us). */
export const CS_ERR_LIBRARY = 2;
/** cs_error_t: a call waited longer than its limit. */
export const CS_ERR_TIMEOUT = 5;
/** cs_error_t: flow control or a membership change in progress: dispatch, then retry. */
export const CS_ERR_TRY_AGAIN = 6;
/** cs_error_t: an argument was rejected. */
export const CS_ERR_INVALID_PARAM = 7;
/** cs_error_t: the handle is not (or no longer) valid, e.g. finalized inside a callback. */
export const CS_ERR_BAD_HANDLE = 9;
/** cs_error_t: the handle already joined (or left) that group. */
export const CS_ERR_EXIST = 14;
/** cs_error_t: the message is larger than corosync accepts. */
export const CS_ERR_TOO_BIG = 26;

// cs_error_t names, indexed by value (<corosync/corotypes.h>; 29 and 31..99 are unused).
const CS_ERROR_NAMES: Readonly<Record<number, string>> = {
  1: "CS_OK",
  2: "CS_ERR_LIBRARY",
  3: "CS_ERR_VERSION",
  4: "CS_ERR_INIT",
  5: "CS_ERR_TIMEOUT",
  6: "CS_ERR_TRY_AGAIN",
  7: "CS_ERR_INVALID_PARAM",
  8: "CS_ERR_NO_MEMORY",
  9: "CS_ERR_BAD_HANDLE",
  10: "CS_ERR_BUSY",
  11: "CS_ERR_ACCESS",
  12: "CS_ERR_NOT_EXIST",
  13: "CS_ERR_NAME_TOO_LONG",
  14: "CS_ERR_EXIST",
  15: "CS_ERR_NO_SPACE",
  16: "CS_ERR_INTERRUPT",
  17: "CS_ERR_NAME_NOT_FOUND",
  18: "CS_ERR_NO_RESOURCES",
  19: "CS_ERR_NOT_SUPPORTED",
  20: "CS_ERR_BAD_OPERATION",
  21: "CS_ERR_FAILED_OPERATION",
  22: "CS_ERR_MESSAGE_ERROR",
  23: "CS_ERR_QUEUE_FULL",
  24: "CS_ERR_QUEUE_NOT_AVAILABLE",
  25: "CS_ERR_BAD_FLAGS",
  26: "CS_ERR_TOO_BIG",
  27: "CS_ERR_NO_SECTIONS",
  28: "CS_ERR_CONTEXT_NOT_FOUND",
  30: "CS_ERR_TOO_MANY_GROUPS",
  100: "CS_ERR_SECURITY",
};

/** The symbolic name of a cs_error_t value, e.g. `csErrorName(2) === "CS_ERR_LIBRARY"`. */
export function csErrorName(code: number): string {
  return CS_ERROR_NAMES[code] ?? `cs_error ${code}`;
}

/** cs_dispatch_flags_t: run at most one callback, waiting for it if none is queued. */
export const CS_DISPATCH_ONE = 1;
/** cs_dispatch_flags_t: run every queued callback, then return without waiting. */
export const CS_DISPATCH_ALL = 2;
/** cs_dispatch_flags_t: run callbacks forever (until an error or finalize). */
export const CS_DISPATCH_BLOCKING = 3;
/** cs_dispatch_flags_t: run at most one queued callback; CS_ERR_TRY_AGAIN if none is queued. */
export const CS_DISPATCH_ONE_NONBLOCKING = 4;

/** cpg_guarantee_t: total order across all members (FIFO is the same, the others unimplemented). */
export const CPG_TYPE_AGREED = 2;
/** cpg_model_t: the only model, with deliver, confchg and totem confchg callbacks. */
export const CPG_MODEL_V1 = 1;
/** cpg_model_v1_data_t flag: deliver the current totem membership right after a join. */
export const CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF = 0x01;

/** cpg_reason_t: why a process appears in a joined or left list. */
export const CPG_REASON = {
  UNDEFINED: 0,
  JOIN: 1,
  LEAVE: 2,
  NODEDOWN: 3,
  NODEUP: 4,
  PROCDOWN: 5,
} as const;

/** Longest group name in bytes (CPG_MAX_NAME_LENGTH). */
export const CPG_MAX_NAME_LENGTH = 128;
/** Most processes in one group that libcpg reports (CPG_MEMBERS_MAX). */
export const CPG_MEMBERS_MAX = 128;
/**
 * Largest message clogd sends, in bytes: libcpg's IPC request size (1 MiB) less the 1024 bytes
 * it reserves for headers. Larger messages make libcpg fragment them, sleeping and retrying
 * inside the call under flow control; clogd never needs that, so {@link CpgHandle.mcast}
 * refuses them instead.
 */
export const CPG_MAX_MESSAGE_BYTES = 1_047_552;

// ---- Struct layouts ----

/** `struct cpg_name`: `uint32_t length @0, char value[128] @4`. */
export const CPG_NAME = { size: 132, length: 0, value: 4 } as const;
/** `struct cpg_address`: `uint32_t nodeid @0, uint32_t pid @4, uint32_t reason @8`. */
export const CPG_ADDRESS = { size: 12, nodeid: 0, pid: 4, reason: 8 } as const;
/** `struct iovec`: `void *iov_base @0, size_t iov_len @8`. */
export const IOVEC = { size: 16, base: 0, len: 8 } as const;
/**
 * `cpg_model_v1_data_t`: `cpg_model_t model @0, cpg_deliver_fn_t @8, cpg_confchg_fn_t @16,
 * cpg_totem_confchg_fn_t @24, unsigned int flags @32`, 40 bytes.
 */
export const CPG_MODEL_V1_DATA = {
  size: 40,
  model: 0,
  deliverFn: 8,
  confchgFn: 16,
  totemConfchgFn: 24,
  flags: 32,
} as const;
/** `struct cpg_ring_id` passed by value: `uint32_t nodeid @0, uint64_t seq @8`. */
export const CPG_RING_ID = { size: 16, nodeid: 0, seq: 8 } as const;

/** One process in a group, as `struct cpg_address` describes it. */
export interface CpgAddress {
  /** corosync node id. */
  nodeid: number;
  /** Process id on that node. */
  pid: number;
  /** Why it joined or left ({@link CPG_REASON}); 0 in a member list. */
  reason: number;
}

/** A totem ring (membership) id: the node that formed it and a sequence number. */
export interface CpgRingId {
  /** Node id of the ring's representative. */
  nodeid: number;
  /** Ring sequence number; grows with every new membership. */
  seq: bigint;
}

// ---- Struct codecs ----

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder();

/**
 * A `struct cpg_name` holding `name` (UTF-8), in its own ArrayBuffer (off the V8 heap).
 *
 * @throws RangeError if the name is empty or longer than {@link CPG_MAX_NAME_LENGTH} bytes
 */
export function encodeCpgName(name: string): Uint8Array {
  const bytes = new Uint8Array(new ArrayBuffer(CPG_NAME.size));
  const { written } = utf8Encoder.encodeInto(name, bytes.subarray(CPG_NAME.value));
  // encodeInto stops at the end of the room: compare with the full length to catch truncation.
  const length = utf8Encoder.encode(name).byteLength;
  if (length === 0 || length !== written) {
    throw new RangeError(
      `CPG group name must be 1 to ${CPG_MAX_NAME_LENGTH} bytes, got ${length}: "${name}"`,
    );
  }
  new DataView(bytes.buffer).setUint32(CPG_NAME.length, length, true);
  return bytes;
}

/**
 * The name in a `struct cpg_name` that C handed us. A length over {@link CPG_MAX_NAME_LENGTH}
 * is clamped rather than trusted, so a corrupt struct cannot make us read past it.
 */
export function decodeCpgName(pointer: Deno.PointerValue): string {
  if (pointer === null) return "";
  const view = new Deno.UnsafePointerView(pointer);
  const length = Math.min(view.getUint32(CPG_NAME.length), CPG_MAX_NAME_LENGTH);
  if (length === 0) return "";
  return utf8Decoder.decode(new Uint8Array(view.getArrayBuffer(length, CPG_NAME.value)));
}

/**
 * Copies `count` `struct cpg_address` entries out of C memory. A count over
 * {@link CPG_MEMBERS_MAX} is clamped: libcpg's own arrays hold no more.
 */
export function decodeCpgAddresses(pointer: Deno.PointerValue, count: number): CpgAddress[] {
  const entries = Math.min(count, CPG_MEMBERS_MAX);
  const result: CpgAddress[] = [];
  if (pointer === null || entries <= 0) return result;
  const view = new Deno.UnsafePointerView(pointer);
  for (let i = 0; i < entries; i++) {
    const offset = i * CPG_ADDRESS.size;
    result.push({
      nodeid: view.getUint32(offset + CPG_ADDRESS.nodeid),
      pid: view.getUint32(offset + CPG_ADDRESS.pid),
      reason: view.getUint32(offset + CPG_ADDRESS.reason),
    });
  }
  return result;
}

/** Decodes a `struct cpg_ring_id` that a callback received by value. */
export function decodeCpgRingId(bytes: Uint8Array): CpgRingId {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    nodeid: view.getUint32(CPG_RING_ID.nodeid, true),
    seq: view.getBigUint64(CPG_RING_ID.seq, true),
  };
}

// ---- Errors ----

/**
 * A corosync library call (libcpg, libquorum) failed: the cs_error_t it returned and the C
 * function. Callers that only care about the code (e.g. `CS_ERR_TRY_AGAIN` from either library)
 * test for this class; {@link CpgError} and `QuorumError` (ffi/quorum.ts) say which library.
 */
export class CsError extends Error {
  /** The cs_error_t value the call returned. */
  readonly code: number;
  /** The C function that failed, e.g. `"cpg_join"`. */
  readonly call: string;

  /**
   * `new CpgError("cpg_model_initialize", 2, { hint: "is corosync running?" })` has the
   * message "cpg_model_initialize failed: CS_ERR_LIBRARY (2): is corosync running?".
   */
  constructor(call: string, code: number, options?: ErrorOptions & { hint?: string }) {
    const hint = options?.hint ? `: ${options.hint}` : "";
    super(`${call} failed: ${csErrorName(code)} (${code})${hint}`, options);
    this.name = new.target.name;
    this.code = code;
    this.call = call;
  }

  /** The symbolic name of {@link code}, e.g. `"CS_ERR_LIBRARY"`. */
  get codeName(): string {
    return csErrorName(this.code);
  }
}

/** A libcpg call failed. */
export class CpgError extends CsError {}

/**
 * Most callback errors one dispatch records. A callback that throws on every message of a long
 * backlog would otherwise grow the list without bound; the rest are only counted.
 */
export const MAX_RECORDED_CALLBACK_ERRORS = 16;

/** One or more of our callbacks threw while libcpg was dispatching. */
export class CpgCallbackError extends Error {
  /** The errors recorded, first first, at most {@link MAX_RECORDED_CALLBACK_ERRORS}. */
  readonly errors: readonly unknown[];
  /** How many callbacks threw during the dispatch, recorded or not. */
  readonly count: number;
  /** What cpg_dispatch itself returned (a cs_error_t). */
  readonly result: number;

  /** The first error is the cause; the message says how many more there were. */
  constructor(errors: readonly unknown[], options: { count: number; result: number }) {
    const first = errors[0];
    const text = first instanceof Error ? first.message : String(first);
    const more = options.count > 1 ? ` (and ${options.count - 1} more)` : "";
    super(`A CPG callback threw: ${text}${more}`, { cause: first });
    this.name = "CpgCallbackError";
    this.errors = errors;
    this.count = options.count;
    this.result = options.result;
  }
}

// ---- The handle ----

/** What a {@link CpgHandle} calls while {@link CpgHandle.dispatch} runs. */
export interface CpgCallbacks {
  /**
   * A message, in the group's total order. `data` is a copy the callee owns; it may keep it.
   * Our own messages come back here too, with our node id and pid.
   */
  onDeliver(nodeid: number, pid: number, groupName: string, data: Uint8Array): void;
  /** The group's processes changed: the new member list, who left and who joined. */
  onConfchg(
    groupName: string,
    members: CpgAddress[],
    left: CpgAddress[],
    joined: CpgAddress[],
  ): void;
  /**
   * The totem (node) membership changed; also called right after a join with the current one.
   * Optional: without it libcpg is not asked for these.
   */
  onTotemConfchg?(ringId: CpgRingId, members: number[]): void;
  /**
   * Receives each error a callback threw, after cpg_dispatch returned. Without it,
   * {@link CpgHandle.dispatch} throws a {@link CpgCallbackError} instead.
   */
  onError?(error: unknown): void;
}

type DeliverCallback = Deno.UnsafeCallback<typeof DELIVER_CALLBACK>;
type ConfchgCallback = Deno.UnsafeCallback<typeof CONFCHG_CALLBACK>;
type TotemConfchgCallback = Deno.UnsafeCallback<typeof TOTEM_CONFCHG_CALLBACK>;

/** First size of a handle's send buffer; it doubles on demand up to the message limit. */
const INITIAL_SEND_BUFFER_BYTES = 64 * 1024;

/**
 * A connection to corosync's CPG service (a `cpg_handle_t`), on the calling thread.
 *
 * Use: {@link open}, {@link join}, then wait for {@link fd} to be readable (e.g. in the
 * daemon's poll loop) and call {@link dispatch}, which runs the callbacks; {@link mcast} sends.
 * {@link finalize} (or `using`) releases the handle and its callbacks.
 *
 * The handle holds its callbacks (`Deno.UnsafeCallback`) and every buffer it gives C in private
 * fields, so they live exactly as long as C can call or read them, whatever the caller keeps.
 */
export class CpgHandle implements Disposable {
  readonly #lib: Libcpg;
  readonly #callbacks: CpgCallbacks;
  #handle = 0n;
  #fd = -1;
  #deliverCallback: DeliverCallback | undefined;
  #confchgCallback: ConfchgCallback | undefined;
  #totemConfchgCallback: TotemConfchgCallback | undefined;
  // Outgoing messages are copied here first: a pointer into an arbitrary Uint8Array could be
  // on the V8 heap, where a garbage collection may move it before C reads it.
  #sendBuffer = new Uint8Array(new ArrayBuffer(INITIAL_SEND_BUFFER_BYTES));
  readonly #iovec = new Uint8Array(new ArrayBuffer(IOVEC.size));
  readonly #iovecView = new DataView(this.#iovec.buffer);
  readonly #u32Out = new Uint32Array(new ArrayBuffer(4));
  readonly #dispatch = new CallbackDispatch({
    who: "CpgHandle.dispatch()",
    stackAdvice: "A CPG callback overflowed the stack: libcpg's dispatch uses 1 MiB of it, run " +
      "Deno with --v8-flags=--stack-size=2048",
    maxRecorded: MAX_RECORDED_CALLBACK_ERRORS,
  });
  #finalized = false;

  /** Creates the C callbacks; {@link open} then connects. */
  private constructor(lib: Libcpg, callbacks: CpgCallbacks) {
    this.#lib = lib;
    this.#callbacks = callbacks;
    this.#deliverCallback = new Deno.UnsafeCallback(
      DELIVER_CALLBACK,
      (_handle, groupName, nodeid, pid, msg, msgLen) => {
        try {
          this.#onDeliver(groupName, nodeid, pid, msg, Number(msgLen));
        } catch (error) {
          this.#dispatch.record(error);
        }
      },
    );
    this.#confchgCallback = new Deno.UnsafeCallback(
      CONFCHG_CALLBACK,
      (_handle, groupName, members, memberCount, left, leftCount, joined, joinedCount) => {
        try {
          callbacks.onConfchg(
            decodeCpgName(groupName),
            decodeCpgAddresses(members, Number(memberCount)),
            decodeCpgAddresses(left, Number(leftCount)),
            decodeCpgAddresses(joined, Number(joinedCount)),
          );
        } catch (error) {
          this.#dispatch.record(error);
        }
      },
    );
    if (callbacks.onTotemConfchg !== undefined) {
      this.#totemConfchgCallback = new Deno.UnsafeCallback(
        TOTEM_CONFCHG_CALLBACK,
        (_handle, ringId, count, members) => {
          try {
            const ids: number[] = [];
            const entries = Math.min(count, CPG_MEMBERS_MAX);
            if (members !== null) {
              const view = new Deno.UnsafePointerView(members);
              for (let i = 0; i < entries; i++) ids.push(view.getUint32(i * 4));
            }
            callbacks.onTotemConfchg?.(decodeCpgRingId(ringId), ids);
          } catch (error) {
            this.#dispatch.record(error);
          }
        },
      );
    }
    this.#pointSendBuffer();
  }

  /**
   * Connects to the corosync of this process's network namespace.
   *
   * `libPath` overrides the library's path (see {@link libcpg}).
   *
   * @throws CpgError from cpg_model_initialize (CS_ERR_LIBRARY while corosync is not running or
   *   still starting) or cpg_fd_get
   * @throws Error if the library does not load
   */
  static open(callbacks: CpgCallbacks, options: { libPath?: string } = {}): CpgHandle {
    const self = new CpgHandle(libcpg(options.libPath), callbacks);
    try {
      self.#connect();
    } catch (error) {
      self.#closeCallbacks();
      throw error;
    }
    return self;
  }

  #connect(): void {
    const model = new Uint8Array(new ArrayBuffer(CPG_MODEL_V1_DATA.size));
    const view = new DataView(model.buffer);
    view.setInt32(CPG_MODEL_V1_DATA.model, CPG_MODEL_V1, true);
    setPointer(view, CPG_MODEL_V1_DATA.deliverFn, this.#deliverCallback!.pointer);
    setPointer(view, CPG_MODEL_V1_DATA.confchgFn, this.#confchgCallback!.pointer);
    const totem = this.#totemConfchgCallback;
    setPointer(view, CPG_MODEL_V1_DATA.totemConfchgFn, totem?.pointer ?? null);
    view.setUint32(
      CPG_MODEL_V1_DATA.flags,
      totem === undefined ? 0 : CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF,
      true,
    );
    const handleOut = new BigUint64Array(1);
    const initResult = this.#lib.cpg_model_initialize(
      new Uint8Array(handleOut.buffer),
      CPG_MODEL_V1,
      model,
      null,
    );
    if (initResult !== CS_OK) {
      throw new CpgError("cpg_model_initialize", initResult, {
        hint: initResult === CS_ERR_LIBRARY ? "is corosync running?" : undefined,
      });
    }
    this.#handle = handleOut[0];
    const fdOut = new Int32Array(1);
    const fdResult = this.#lib.cpg_fd_get(this.#handle, new Uint8Array(fdOut.buffer));
    if (fdResult !== CS_OK) {
      this.#lib.cpg_finalize(this.#handle);
      throw new CpgError("cpg_fd_get", fdResult);
    }
    this.#fd = fdOut[0];
  }

  /** The fd to wait on (readable when {@link dispatch} has work). Owned by libcpg: never close it. */
  get fd(): number {
    return this.#fd;
  }

  /** Whether {@link finalize} ran. */
  get finalized(): boolean {
    return this.#finalized;
  }

  /**
   * Joins a group. A handle that left a group cannot join it again (CS_ERR_EXIST): finalize
   * it and open a new one.
   *
   * @throws CpgError, e.g. CS_ERR_TRY_AGAIN during a membership change (retry after a
   *   dispatch) or CS_ERR_LIBRARY if corosync died
   */
  join(name: string): void {
    this.#assertOpen("join");
    const result = this.#lib.cpg_join(this.#handle, encodeCpgName(name));
    if (result !== CS_OK) {
      throw new CpgError("cpg_join", result, {
        hint: result === CS_ERR_EXIST
          ? `already joined "${name}", or left it: a handle cannot join again, open a new one`
          : undefined,
      });
    }
  }

  /** Leaves a group; our own confchg (left) still arrives through {@link dispatch}. */
  leave(name: string): void {
    this.#assertOpen("leave");
    const result = this.#lib.cpg_leave(this.#handle, encodeCpgName(name));
    if (result !== CS_OK) throw new CpgError("cpg_leave", result);
  }

  /**
   * Multicasts one message, in total order (CPG_TYPE_AGREED), to the group this handle joined.
   * Several parts are sent as one message, concatenated. Returns the cs_error_t rather than
   * throwing, because the common failures are states to act on: CS_ERR_TRY_AGAIN (flow
   * control: dispatch, then retry) and CS_ERR_LIBRARY (corosync died: reconnect).
   *
   * The bytes are copied before the call, so the caller may reuse `data` at once.
   *
   * @throws RangeError if the message is larger than {@link CPG_MAX_MESSAGE_BYTES}
   */
  mcast(data: Uint8Array | readonly Uint8Array[]): number {
    this.#assertOpen("mcast");
    const parts = data instanceof Uint8Array ? [data] : data;
    let length = 0;
    for (const part of parts) length += part.byteLength;
    if (length > CPG_MAX_MESSAGE_BYTES) {
      throw new RangeError(
        `CPG message of ${length} bytes is larger than the limit of ${CPG_MAX_MESSAGE_BYTES}`,
      );
    }
    if (length > this.#sendBuffer.byteLength) {
      let size = this.#sendBuffer.byteLength;
      while (size < length) size *= 2;
      this.#sendBuffer = new Uint8Array(new ArrayBuffer(Math.min(size, CPG_MAX_MESSAGE_BYTES)));
      this.#pointSendBuffer();
    }
    let offset = 0;
    for (const part of parts) {
      this.#sendBuffer.set(part, offset);
      offset += part.byteLength;
    }
    this.#iovecView.setBigUint64(IOVEC.len, BigInt(length), true);
    return this.#lib.cpg_mcast_joined(this.#handle, CPG_TYPE_AGREED, this.#iovec, 1);
  }

  /**
   * Runs the callbacks for what corosync queued (`CS_DISPATCH_ALL` by default: all of it,
   * without waiting). Returns cpg_dispatch's cs_error_t: CS_OK, or CS_ERR_LIBRARY when corosync
   * died (finalize and reconnect), or CS_ERR_BAD_HANDLE when a callback finalized the handle.
   *
   * `CS_DISPATCH_ONE` waits for a callback: it blocks the thread, for benchmarks and tests only.
   *
   * @throws CpgCallbackError when a callback threw and there is no `onError`
   * @throws Error when Deno's stack is too small for libcpg (run with `--v8-flags=--stack-size=2048`)
   */
  dispatch(flags: number = CS_DISPATCH_ALL): number {
    this.#assertOpen("dispatch");
    const { result, errors, count } = this.#dispatch.run(
      () => this.#lib.cpg_dispatch(this.#handle, flags),
      // finalize() called from a callback deferred this: C was still running our callbacks.
      () => {
        if (this.#finalized) this.#closeCallbacks();
      },
    );
    if (count > 0) {
      const onError = this.#callbacks.onError;
      if (onError === undefined) throw new CpgCallbackError(errors, { count, result });
      for (const error of errors) onError.call(this.#callbacks, error);
    }
    return result;
  }

  /**
   * This node's corosync node id.
   *
   * @throws CpgError
   */
  localNodeId(): number {
    this.#assertOpen("localNodeId");
    const result = this.#lib.cpg_local_get(this.#handle, new Uint8Array(this.#u32Out.buffer));
    if (result !== CS_OK) throw new CpgError("cpg_local_get", result);
    return this.#u32Out[0];
  }

  /**
   * The processes in a group, as corosync sees them now.
   *
   * @throws CpgError
   */
  membership(name: string): CpgAddress[] {
    this.#assertOpen("membership");
    const list = new Uint8Array(new ArrayBuffer(CPG_MEMBERS_MAX * CPG_ADDRESS.size));
    const count = new Int32Array(1);
    const result = this.#lib.cpg_membership_get(
      this.#handle,
      encodeCpgName(name),
      list,
      new Uint8Array(count.buffer),
    );
    if (result !== CS_OK) throw new CpgError("cpg_membership_get", result);
    return decodeCpgAddresses(Deno.UnsafePointer.of(list), count[0]);
  }

  /**
   * The largest message corosync takes without fragmenting it.
   *
   * @throws CpgError
   */
  maxMessageBytes(): number {
    this.#assertOpen("maxMessageBytes");
    const out = new Uint8Array(this.#u32Out.buffer);
    const result = this.#lib.cpg_max_atomic_msgsize_get(this.#handle, out);
    if (result !== CS_OK) throw new CpgError("cpg_max_atomic_msgsize_get", result);
    return this.#u32Out[0];
  }

  /**
   * Releases the handle. Idempotent. Returns cpg_finalize's cs_error_t: CS_ERR_LIBRARY when
   * corosync is gone, which still frees the handle locally. Safe inside a callback: the
   * callbacks are closed once the running dispatch returns.
   */
  finalize(): number {
    if (this.#finalized) return CS_OK;
    this.#finalized = true;
    const result = this.#lib.cpg_finalize(this.#handle);
    if (!this.#dispatch.running) this.#closeCallbacks();
    return result;
  }

  /** {@link finalize}, for `using`. */
  [Symbol.dispose](): void {
    this.finalize();
  }

  #onDeliver(
    groupName: Deno.PointerValue,
    nodeid: number,
    pid: number,
    msg: Deno.PointerValue,
    length: number,
  ): void {
    // libcpg reuses the message memory once we return: copy it now.
    const data = new Uint8Array(length);
    if (length > 0 && msg !== null) Deno.UnsafePointerView.copyInto(msg, data);
    this.#callbacks.onDeliver(nodeid, pid, decodeCpgName(groupName), data);
  }

  #pointSendBuffer(): void {
    setPointer(this.#iovecView, IOVEC.base, Deno.UnsafePointer.of(this.#sendBuffer));
  }

  #closeCallbacks(): void {
    this.#deliverCallback?.close();
    this.#confchgCallback?.close();
    this.#totemConfchgCallback?.close();
    this.#deliverCallback = undefined;
    this.#confchgCallback = undefined;
    this.#totemConfchgCallback = undefined;
  }

  #assertOpen(method: string): void {
    if (this.#finalized) throw new Error(`CpgHandle.${method}() called after finalize()`);
  }
}

function setPointer(view: DataView, offset: number, pointer: Deno.PointerValue): void {
  view.setBigUint64(offset, BigInt(Deno.UnsafePointer.value(pointer)), true);
}
