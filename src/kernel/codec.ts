/**
 * The dm-log-userspace wire codec, apart from any socket (mdlayher/netlink's message.go idea):
 * bytes in, validated {@link Request}s or reasons out; {@link Reply}s in, bytes out. The kernel
 * simulator uses the other direction ({@link encodeRequest}, {@link decodeReply}), which mimics
 * what the kernel accepts.
 *
 * One datagram, both directions:
 *
 * ```
 * off  size  field
 *   0    16  nlmsghdr   len u32 @0, type u16 @4 (NLMSG_DONE), flags u16 @6, seq u32 @8, pid u32 @12
 *  16    20  cn_msg     idx u32 @16, val u32 @20, seq u32 @24, ack u32 @28, len u16 @32, flags u16 @34
 *  36   160  dm_ulog_request (current)   luid u64, uuid[129], pad[3], version, error, seq, type, data_size
 *  36   152  dm_clog_request (2009)      uuid[129], pad[7], error, seq, type, data_size
 *  ...       payload (data_size bytes); the kernel pads the datagram to a multiple of 4
 * ```
 *
 * Everything is host-endian (the link never leaves the machine).
 *
 * Decoding never throws: every datagram becomes a request, an error reply to send (when the
 * request's seq could be read), or a drop with a reason for the log line.
 *
 * @module
 */

import {
  CN_IDX_DM,
  CN_VAL_DM_USERSPACE_LOG,
  CONNECTOR_MAX_MSG_SIZE,
  Errno,
  type Frame,
  FRAME_OVERHEAD,
  HEADER_LEN_2009,
  HEADER_LEN_CURRENT,
  type HeaderLayout,
  isRequestType,
  KERNEL_MAX_PAYLOAD,
  MAX_KNOWN_VERSION,
  MAX_REGIONS_PER_REQUEST,
  NLMSG_DONE,
  NLMSG_HDRLEN,
  type Reply,
  REPLY_CAPACITY,
  type Request,
  REQUEST_TYPE_MASK,
  RequestType,
  requestTypeName,
} from "./protocol.ts";

/** How to read the request header: guess per datagram, or a fixed layout. */
export type LayoutMode = "auto" | "current" | "2009";

/** What a failed decode keeps so that an error reply can still be sent. */
export interface ErrorReplyInfo {
  /** Layout the header was read in (the reply echoes it in the same layout). */
  layout: HeaderLayout;
  /** Addressing of the datagram. */
  frame: Frame;
  /** The request's seq (the kernel matches full replies on it). */
  seq: number;
  /** The raw `request_type` field, for log lines. */
  rawType: number;
  /** A copy of the request header as received, echoed back with error and data_size set. */
  header: Uint8Array;
}

/** Result of {@link decodeDatagram}. */
export type DecodeResult =
  | {
    ok: true;
    request: Request;
    /** Something the caller should log (rate-limited): a layout mismatch, an unknown version. */
    warning?: string;
  }
  | {
    ok: false;
    /** Why, for a log line. */
    reason: string;
    /** Present when the seq was readable: answer with {@link encodeErrorReply}. Else drop. */
    reply?: ErrorReplyInfo;
    /** Positive errno to answer with (meaningful with `reply`). */
    errno: number;
  };

/** Result of {@link decodeReply}: what the kernel would make of a reply datagram. */
export type DecodedReply =
  | {
    ok: true;
    /** A full reply (header echoed) or the zero-length `cn_msg` ACK form. */
    kind: "full" | "ack";
    /** The seq the kernel matches: the header's seq (full) or `cn_msg.seq` (ACK). */
    seq: number;
    /** Positive errno the kernel's call returns (0 = success). */
    errno: number;
    /** Reply payload (a view; empty for ACKs and for a reply over `capacity`). */
    data: Uint8Array;
    /** Full replies: layout the header was read in. */
    layout?: HeaderLayout;
    /** Full replies: echoed uuid (text before the first NUL). */
    uuid?: string;
    /** Full replies in the current layout: echoed luid. */
    luid?: bigint;
    /** Full replies in the current layout: echoed version. */
    version?: number;
    /** Full replies: echoed raw request_type. */
    rawType?: number;
    /** True when `data_size` exceeded the `capacity` option (the kernel returns -ENOSPC). */
    overCapacity?: boolean;
  }
  | { ok: false; reason: string };

/** A request as the kernel builds it (for the kernel simulator and the malformed corpus). */
export interface RequestSpec {
  layout: HeaderLayout;
  /** Ignored in the 2009 layout. */
  luid: bigint;
  /** Written as bytes, NUL padded; at most 129 bytes are written (129 leaves no NUL). */
  uuid: string;
  /** Ignored in the 2009 layout. */
  version: number;
  seq: number;
  /** The raw request_type field (upper bits and unknown types allowed). */
  type: number;
  payload: Uint8Array;
}

/**
 * Versions above {@link MAX_KNOWN_VERSION} and up to this are accepted with a warning: both bumps
 * so far (2: CTR may answer a device name; 3: FLUSH may carry marks, only with integrated_flush
 * in the table) left every request's layout as it was, and the per-type payload checks still
 * catch a changed payload. Rejecting them would fail every mirror on a newer kernel. A larger
 * number is not a plausible DM_ULOG_REQUEST_VERSION (two bumps since 2009): treated as garbage.
 */
export const MAX_PLAUSIBLE_VERSION = 15;

/**
 * The kernel's request buffer is 512 bytes including `cn_msg` and the header: 332 payload bytes
 * with the current header, 8 more with the 2009 one (its size check used a pointer's size, but
 * the buffer itself ends there).
 */
const MAX_PAYLOAD: Record<HeaderLayout, number> = {
  current: KERNEL_MAX_PAYLOAD,
  "2009": KERNEL_MAX_PAYLOAD + (HEADER_LEN_CURRENT - HEADER_LEN_2009),
};

/** Size of the uuid field (DM_UUID_LEN), NUL included. */
const UUID_LEN = 129;

/** Bytes of one region number (u64) in MARK/CLEAR/FLUSH/IS_CLEAN/... payloads. */
const REGION_BYTES = 8;

/** Kernel errno values stop here (MAX_ERRNO); anything larger is not an errno. */
const MAX_ERRNO = 4095;

/** The link is host-endian: read and write with the host's byte order. */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Field offsets inside the request header, per layout. */
interface HeaderOffsets {
  len: number;
  uuid: number;
  error: number;
  seq: number;
  type: number;
  dataSize: number;
}

const OFFSETS: Record<HeaderLayout, HeaderOffsets> = {
  current: { len: HEADER_LEN_CURRENT, uuid: 8, error: 144, seq: 148, type: 152, dataSize: 156 },
  "2009": { len: HEADER_LEN_2009, uuid: 0, error: 136, seq: 140, type: 144, dataSize: 148 },
};
/** Offsets only the current layout has. */
const LUID_OFF = 0;
const VERSION_OFF = 140;

/** Header length of a layout. */
export function headerLength(layout: HeaderLayout): number {
  return OFFSETS[layout].len;
}

/** The netlink alignment (NLMSG_ALIGNTO): the kernel pads each message to it. */
function nlmsgAlign(n: number): number {
  return Math.ceil(n / 4) * 4; // not `(n + 3) & ~3`: n is a u32, bit ops would wrap it
}

/** True for a byte allowed in a uuid: printable ASCII without space (a table argument). */
function isUuidByte(c: number): boolean {
  return c > 0x20 && c < 0x7f;
}

// ---------------------------------------------------------------------------------------------
// Layout detection

/**
 * Guess the header layout from the first 8 bytes of a request header.
 *
 * Heuristic: in the current layout bytes 0..7 are `luid`, the kernel's pointer to its log
 * context. Kernel pointers have the top bit set on 64-bit architectures (x86_64 and arm64
 * `0xffff...`) and with the usual 32-bit splits (`>= 0xc0000000`), so one of the 8 bytes is
 * >= 0x80 whatever the byte order; in the 2009 layout they are uuid text, which
 * {@link decodeDatagram} only accepts as printable ASCII. So:
 * - any byte >= 0x80: current;
 * - else, bytes 0..7 are text (a printable first byte, then printable bytes up to an optional
 *   NUL followed only by NULs): 2009, except when a short text is followed by a uuid at byte 8,
 *   which is a current header with a small test luid (e.g. 0x41, "A");
 * - else (a zero first byte, control bytes): current.
 *
 * An explicit layout setting should win; use this as a sanity check.
 */
export function detectLayout(header: Uint8Array): HeaderLayout {
  const n = Math.min(header.length, 8);
  for (let i = 0; i < n; i++) {
    if (header[i] >= 0x80) return "current";
  }
  if (n === 0 || !isUuidByte(header[0])) return "current";
  let textEnd = n;
  for (let i = 1; i < n; i++) {
    const c = header[i];
    if (c === 0) {
      textEnd = i;
      break;
    }
    if (!isUuidByte(c)) return "current";
  }
  for (let i = textEnd; i < n; i++) {
    if (header[i] !== 0) return "current";
  }
  if (textEnd < 8 && header.length > 8 && isUuidByte(header[8])) return "current";
  return "2009";
}

// ---------------------------------------------------------------------------------------------
// Integer helpers

/** Sentinel of {@link readU64}: the value is above Number.MAX_SAFE_INTEGER or not readable. */
export const U64_OUT_OF_RANGE = -1;

function readU32(b: Uint8Array, o: number): number {
  return LITTLE_ENDIAN
    ? (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0
    : ((b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]) >>> 0;
}

/**
 * Read a host-endian u64 (a region number, a count) as a number. Returns
 * {@link U64_OUT_OF_RANGE} (-1) when it exceeds Number.MAX_SAFE_INTEGER (e.g. 2^63) or when the
 * 8 bytes are not all inside `bytes`, so callers can reject it like any other out-of-range
 * region. Values like 2^31 and 2^32-1 come back exactly, for the replica's range check.
 */
export function readU64(bytes: Uint8Array, off: number): number {
  if (!Number.isInteger(off) || off < 0 || off + 8 > bytes.length) return U64_OUT_OF_RANGE;
  const lo = readU32(bytes, LITTLE_ENDIAN ? off : off + 4);
  const hi = readU32(bytes, LITTLE_ENDIAN ? off + 4 : off);
  // MAX_SAFE_INTEGER is 2^53 - 1: the high word may use 21 bits.
  if (hi > 0x1fffff) return U64_OUT_OF_RANGE;
  return hi * 0x1_0000_0000 + lo;
}

function checkedBigInt(n: number | bigint, min: bigint, max: bigint, what: string): bigint {
  if (typeof n === "number" && !Number.isSafeInteger(n)) {
    throw new RangeError(`Value ${n} is not a safe integer (${what})`);
  }
  const v = BigInt(n);
  if (v < min || v > max) throw new RangeError(`Value ${v} does not fit a ${what}`);
  return v;
}

/** 8 host-endian bytes of an unsigned 64-bit value. Throws RangeError outside 0..2^64-1. */
export function u64Bytes(n: number | bigint): Uint8Array {
  const out = new Uint8Array(8);
  const v = checkedBigInt(n, 0n, 0xffff_ffff_ffff_ffffn, "u64");
  new DataView(out.buffer).setBigUint64(0, v, LITTLE_ENDIAN);
  return out;
}

/** 8 host-endian bytes of a signed 64-bit value. Throws RangeError outside -2^63..2^63-1. */
export function s64Bytes(n: number | bigint): Uint8Array {
  const out = new Uint8Array(8);
  const v = checkedBigInt(n, -(2n ** 63n), 2n ** 63n - 1n, "s64");
  new DataView(out.buffer).setBigInt64(0, v, LITTLE_ENDIAN);
  return out;
}

// ---------------------------------------------------------------------------------------------
// CTR payload

const textDecoder = new TextDecoder();

/**
 * The constructor string of a CTR payload. The first CTR's data_size does not count the
 * string's NUL; the kernel's re-CTR after -ESRCH does (`strlen + 1`). `countedNul` tells them
 * apart, which matters for the reply: a re-CTR offers no room for a reply payload.
 */
export function ctrString(payload: Uint8Array): { text: string; countedNul: boolean } {
  const countedNul = payload.length > 0 && payload[payload.length - 1] === 0;
  const text = textDecoder.decode(countedNul ? payload.subarray(0, payload.length - 1) : payload);
  return { text, countedNul };
}

/**
 * Bytes of reply data the kernel accepts for `request`. Differs from {@link REPLY_CAPACITY}
 * for CTR: only a first CTR from a version >= 2 kernel offers its 128-byte device name buffer;
 * a re-CTR after -ESRCH, a version 1 kernel and the 2009 patch pass no buffer at all.
 */
export function replyCapacity(request: Request): number {
  if (request.type === RequestType.CTR) {
    const firstCtr = request.payload.length === 0 ||
      request.payload[request.payload.length - 1] !== 0;
    return request.layout === "current" && request.version >= 2 && firstCtr
      ? REPLY_CAPACITY[RequestType.CTR]
      : 0;
  }
  return REPLY_CAPACITY[request.type];
}

// ---------------------------------------------------------------------------------------------
// Decoding requests

/**
 * Most uuids kept decoded. Nearly every request names one of a few logs: hashing the bytes while
 * validating them (which reads every byte anyway) and finding the string here saves a
 * TextDecoder call and a string allocation per request (about 0.2 us). Cleared when full, so a
 * stream of garbage uuids costs only the decoding it would have cost anyway.
 */
const MAX_CACHED_UUIDS = 64;
const uuidCache = new Map<number, { bytes: Uint8Array; text: string }>();

/** Why the uuid at `off` is invalid, set when {@link readUuid} returns undefined. */
let uuidProblem = "";

/** The uuid text at `off`, or undefined (reason in {@link uuidProblem}). */
function readUuid(b: Uint8Array, off: number): string | undefined {
  let hash = 0x811c9dc5; // FNV-1a
  for (let i = 0; i < UUID_LEN; i++) {
    const c = b[off + i];
    if (c === 0) {
      if (i === 0) {
        uuidProblem = "Empty uuid";
        return undefined;
      }
      const view = b.subarray(off, off + i);
      const hit = uuidCache.get(hash);
      if (hit !== undefined && sameBytes(hit.bytes, view)) return hit.text;
      const text = textDecoder.decode(view);
      if (uuidCache.size >= MAX_CACHED_UUIDS) uuidCache.clear();
      uuidCache.set(hash, { bytes: view.slice(), text });
      return text;
    }
    if (!isUuidByte(c)) {
      uuidProblem = `Uuid byte ${i} is 0x${c.toString(16)}, not printable ASCII`;
      return undefined;
    }
    hash = Math.imul(hash ^ c, 0x01000193);
  }
  uuidProblem = `Uuid has no NUL within its ${UUID_LEN} bytes`;
  return undefined;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) return false;
  }
  return true;
}

/** Why the payload's size (or, for CTR, shape) is wrong for `type`; undefined when fine. */
function checkPayloadSize(type: RequestType, payload: Uint8Array): string | undefined {
  const n = payload.length;
  const maxRegionBytes = MAX_REGIONS_PER_REQUEST * REGION_BYTES;
  switch (type) {
    case RequestType.CTR: {
      // The first CTR has no NUL; a re-CTR ends with one. A NUL elsewhere would cut the string.
      const end = n > 0 && payload[n - 1] === 0 ? n - 1 : n;
      if (end === 0) return "CTR without a constructor string";
      const nul = payload.subarray(0, end).indexOf(0);
      if (nul >= 0) return `CTR string has a NUL at byte ${nul} of ${n}`;
      return undefined;
    }
    case RequestType.DTR:
      // Lenient: the kernel ignores DTR's answer, so rejecting one would only leak the log's
      // state in the daemon. Every kernel we know sends none; any payload is ignored.
      return undefined;
    case RequestType.PRESUSPEND:
    case RequestType.POSTSUSPEND:
    case RequestType.RESUME:
    case RequestType.GET_REGION_SIZE:
    case RequestType.GET_RESYNC_WORK:
    case RequestType.GET_SYNC_COUNT:
    case RequestType.STATUS_INFO:
    case RequestType.STATUS_TABLE:
      return n === 0 ? undefined : `${requestTypeName(type)} with ${n} payload bytes, expected 0`;
    case RequestType.IS_CLEAN:
    case RequestType.IN_SYNC:
    case RequestType.IS_REMOTE_RECOVERING:
      return n === REGION_BYTES
        ? undefined
        : `${requestTypeName(type)} with ${n} payload bytes, expected ${REGION_BYTES}`;
    case RequestType.MARK_REGION:
    case RequestType.CLEAR_REGION:
      return n >= REGION_BYTES && n <= maxRegionBytes && n % REGION_BYTES === 0
        ? undefined
        : `${requestTypeName(type)} with ${n} payload bytes, expected 1 to ` +
          `${MAX_REGIONS_PER_REQUEST} regions of ${REGION_BYTES} bytes`;
    case RequestType.FLUSH:
      // 0: a plain flush; else an integrated flush carrying up to one group of marks.
      return n <= maxRegionBytes && n % REGION_BYTES === 0
        ? undefined
        : `FLUSH with ${n} payload bytes, expected 0 to ${MAX_REGIONS_PER_REQUEST} regions of ` +
          `${REGION_BYTES} bytes`;
    case RequestType.SET_REGION_SYNC:
      return n === 2 * REGION_BYTES
        ? undefined
        : `SET_REGION_SYNC with ${n} payload bytes, expected ${2 * REGION_BYTES}`;
  }
}

/**
 * Decode and validate one datagram received on the connector socket.
 *
 * Drops (no reply possible or sensible): shorter than `nlmsghdr` or `cn_msg`, `nlmsg_type` not
 * NLMSG_DONE or `cn_msg` not idx 7/val 1 (not a dm-log-userspace message at all), or a request
 * header too short to hold the seq.
 *
 * Error replies (the seq is readable; answering lets the kernel's call fail at once instead of
 * waiting 15 s per retry): any length that disagrees with another (nlmsg_len, datagram,
 * cn_msg.len, data_size), a payload over the kernel's buffer, a bad uuid or version, a payload
 * size wrong for the type: -EINVAL. An unknown request type: -ENOSYS. The kernel acts the same
 * on every errno except two, which must not be used here: -EAGAIN makes it resend at once with
 * a new seq (a busy loop on a request that is malformed every time), -ESRCH makes it re-CTR and
 * RESUME the log. ENOSYS only reads better in the kernel log.
 *
 * The request's payload is a view into `buf` (no copy): copy `buf` first if it is reused.
 * Region numbers are not range-checked (the replica knows region_count).
 */
export function decodeDatagram(
  buf: Uint8Array,
  frame: { portId: number },
  opts: { layout: LayoutMode },
): DecodeResult {
  const drop = (reason: string): DecodeResult => ({ ok: false, reason, errno: Errno.EINVAL });
  const total = buf.length;
  if (total < NLMSG_HDRLEN) {
    return drop(`Datagram of ${total} bytes is shorter than nlmsghdr (${NLMSG_HDRLEN})`);
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, total);
  const nlmsgLen = dv.getUint32(0, LITTLE_ENDIAN);
  const nlmsgType = dv.getUint16(4, LITTLE_ENDIAN);
  if (nlmsgType !== NLMSG_DONE) {
    return drop(`nlmsg_type ${nlmsgType} is not NLMSG_DONE (${NLMSG_DONE})`);
  }
  if (total < FRAME_OVERHEAD) {
    return drop(`Datagram of ${total} bytes is shorter than nlmsghdr + cn_msg (${FRAME_OVERHEAD})`);
  }
  const idx = dv.getUint32(NLMSG_HDRLEN, LITTLE_ENDIAN);
  const val = dv.getUint32(NLMSG_HDRLEN + 4, LITTLE_ENDIAN);
  if (idx !== CN_IDX_DM || val !== CN_VAL_DM_USERSPACE_LOG) {
    return drop(
      `Connector id ${idx}/${val} is not dm-log-userspace (${CN_IDX_DM}/${CN_VAL_DM_USERSPACE_LOG})`,
    );
  }
  const cnSeq = dv.getUint32(NLMSG_HDRLEN + 8, LITTLE_ENDIAN);
  const cnAck = dv.getUint32(NLMSG_HDRLEN + 12, LITTLE_ENDIAN);
  const cnLen = dv.getUint16(NLMSG_HDRLEN + 16, LITTLE_ENDIAN);
  const available = total - FRAME_OVERHEAD;

  if (opts.layout === "auto" && available < 8) {
    return drop(`Request header truncated: ${available} bytes, too few to tell its layout`);
  }
  const guessed = available >= 8 ? detectLayout(buf.subarray(FRAME_OVERHEAD)) : undefined;
  const layout: HeaderLayout = opts.layout === "auto" ? guessed! : opts.layout;
  // With an explicit layout, a header that looks like the other one is worth a log line.
  const mismatch = guessed !== undefined && guessed !== layout
    ? `Header looks like the ${guessed} layout but is read as ${layout} (layout setting)`
    : undefined;
  const off = OFFSETS[layout];
  if (available < off.len) {
    return drop(
      `Request header truncated: ${available} bytes, the ${layout} layout needs ${off.len}` +
        (mismatch ? ` (${mismatch})` : ""),
    );
  }

  // From here on the seq is readable: every rejection carries what an error reply needs.
  const h = FRAME_OVERHEAD;
  const seq = dv.getUint32(h + off.seq, LITTLE_ENDIAN);
  const rawType = dv.getUint32(h + off.type, LITTLE_ENDIAN);
  const dataSize = dv.getUint32(h + off.dataSize, LITTLE_ENDIAN);
  const fullFrame: Frame = { portId: frame.portId, cnSeq, cnAck };
  const reject = (reason: string, errno: number = Errno.EINVAL): DecodeResult => ({
    ok: false,
    reason: `${reason} (seq ${seq}, type ${rawType})` + (mismatch ? ` (${mismatch})` : ""),
    errno,
    reply: {
      layout,
      frame: fullFrame,
      seq,
      rawType,
      header: buf.slice(h, h + off.len),
    },
  });

  if (nlmsgLen > total) {
    return reject(`nlmsg_len ${nlmsgLen} exceeds the datagram (${total} bytes)`);
  }
  if (total > nlmsgAlign(nlmsgLen)) {
    // The kernel sends one message per datagram, padded to 4 bytes; more is not from it.
    return reject(`Datagram of ${total} bytes has trailing bytes after nlmsg_len ${nlmsgLen}`);
  }
  if (cnLen !== nlmsgLen - FRAME_OVERHEAD) {
    return reject(`cn_msg.len ${cnLen} disagrees with nlmsg_len ${nlmsgLen}`);
  }
  if (dataSize > total - h - off.len) {
    return reject(`data_size ${dataSize} exceeds the datagram (${total - h - off.len} bytes left)`);
  }
  if (off.len + dataSize !== cnLen) {
    return reject(`data_size ${dataSize} disagrees with cn_msg.len ${cnLen}`);
  }
  if (dataSize > MAX_PAYLOAD[layout]) {
    return reject(`data_size ${dataSize} exceeds the kernel's ${MAX_PAYLOAD[layout]} bytes`);
  }
  const type = rawType & REQUEST_TYPE_MASK;
  if (!isRequestType(type)) return reject(`Unknown request type ${type}`, Errno.ENOSYS);

  let luid = 0n;
  let version = 0;
  let warning = mismatch;
  if (layout === "current") {
    luid = dv.getBigUint64(h + LUID_OFF, LITTLE_ENDIAN);
    version = dv.getUint32(h + VERSION_OFF, LITTLE_ENDIAN);
    if (version === 0 || version > MAX_PLAUSIBLE_VERSION) {
      return reject(`Request version ${version} is not 1 to ${MAX_PLAUSIBLE_VERSION}`);
    }
    if (version > MAX_KNOWN_VERSION) {
      const w = `Request version ${version} is newer than ${MAX_KNOWN_VERSION}: read as version ` +
        `${MAX_KNOWN_VERSION}`;
      warning = warning === undefined ? w : `${warning}; ${w}`;
    }
  }
  const uuid = readUuid(buf, h + off.uuid);
  if (uuid === undefined) return reject(uuidProblem);

  const payload = buf.subarray(h + off.len, h + off.len + dataSize);
  const bad = checkPayloadSize(type, payload);
  if (bad !== undefined) return reject(bad);

  const request: Request = {
    layout,
    luid,
    uuid,
    version,
    seq,
    type,
    rawType,
    payload,
    frame: fullFrame,
  };
  return warning === undefined ? { ok: true, request } : { ok: true, request, warning };
}

// ---------------------------------------------------------------------------------------------
// Encoding

const textEncoder = new TextEncoder();

/**
 * Encoded messages are carved out of shared 64 KiB slabs: a fresh ArrayBuffer per reply costs
 * more than encoding it (about 0.7 us against 0.3 us for the whole reply, Deno.bench here).
 * A slab is never reused, only dropped once full: a reply still queued keeps its slab alive and
 * untouched. Larger messages (only the simulator's oversize requests) get their own buffer.
 */
const SLAB_BYTES = 64 * 1024;
let slab = new Uint8Array(SLAB_BYTES);
let slabView = new DataView(slab.buffer);
let slabUsed = 0;

/** Zeroed space for one message: its bytes, and a DataView plus base offset to write them. */
const EMPTY = new Uint8Array(0);

/** A zero-filled array of `n` bytes (error replies' room; shared for the common sizes). */
function zeros(n: number): Uint8Array {
  return n === 0 ? EMPTY : n <= ZERO_BYTES.length ? ZERO_BYTES.subarray(0, n) : new Uint8Array(n);
}
const ZERO_BYTES = new Uint8Array(128);

function allocate(n: number): { out: Uint8Array; dv: DataView; base: number } {
  if (n > SLAB_BYTES / 4) {
    const out = new Uint8Array(n);
    return { out, dv: new DataView(out.buffer), base: 0 };
  }
  if (slabUsed + n > SLAB_BYTES) {
    slab = new Uint8Array(SLAB_BYTES);
    slabView = new DataView(slab.buffer);
    slabUsed = 0;
  }
  const base = slabUsed;
  // 8-byte aligned starts keep the u64 fields of one message off another's cache line edge.
  slabUsed += (n + 7) & ~7;
  return { out: slab.subarray(base, base + n), dv: slabView, base };
}

/** Write nlmsghdr + cn_msg at `b` for a message of `cnLen` bytes after cn_msg. */
function writeFrame(
  dv: DataView,
  b: number,
  cnLen: number,
  f: { nlSeq: number; cnSeq: number; cnAck: number },
): void {
  dv.setUint32(b, FRAME_OVERHEAD + cnLen, LITTLE_ENDIAN); // nlmsg_len, without padding
  dv.setUint16(b + 4, NLMSG_DONE, LITTLE_ENDIAN);
  // nlmsg_flags 0, nlmsg_pid 0 (the kernel takes the sender from the socket): left zeroed.
  dv.setUint32(b + 8, f.nlSeq >>> 0, LITTLE_ENDIAN);
  dv.setUint32(b + NLMSG_HDRLEN, CN_IDX_DM, LITTLE_ENDIAN);
  dv.setUint32(b + NLMSG_HDRLEN + 4, CN_VAL_DM_USERSPACE_LOG, LITTLE_ENDIAN);
  dv.setUint32(b + NLMSG_HDRLEN + 8, f.cnSeq >>> 0, LITTLE_ENDIAN);
  dv.setUint32(b + NLMSG_HDRLEN + 12, f.cnAck >>> 0, LITTLE_ENDIAN);
  dv.setUint16(b + NLMSG_HDRLEN + 16, cnLen, LITTLE_ENDIAN); // a u16: wraps like a C assignment
  // cn_msg.flags 0: left zeroed.
}

/** Write `text` at `at`, at most `max` bytes (ASCII fast path; TextEncoder otherwise). */
function writeText(out: Uint8Array, at: number, text: string, max: number): void {
  const n = Math.min(text.length, max);
  for (let i = 0; i < n; i++) {
    const c = text.charCodeAt(i);
    if (c >= 0x80) {
      out.fill(0, at, at + max);
      textEncoder.encodeInto(text, out.subarray(at, at + max));
      return;
    }
    out[at + i] = c;
  }
}

/** A positive errno the kernel can take; anything else is a daemon bug, reported as EIO. */
function sanitizeErrno(errno: number): number {
  return Number.isInteger(errno) && errno >= 0 && errno <= MAX_ERRNO ? errno : Errno.EIO;
}

/** The ACK form: zero-length cn_msg, seq = the request's seq, ack = positive errno. */
function encodeAck(seq: number, errno: number): Uint8Array {
  const { out, dv, base } = allocate(FRAME_OVERHEAD);
  // cn_msg.seq is what the kernel matches an ACK on; it is the request's seq (the kernel sets
  // cn_msg.seq = dm_ulog_request.seq when it sends).
  writeFrame(dv, base, 0, { nlSeq: seq, cnSeq: seq, cnAck: errno });
  return out;
}

/**
 * Encode the answer to `request`: nlmsghdr + cn_msg (idx/val 7/1, the request's cn_msg seq and
 * ack echoed) + the request header echoed in its own layout (luid, uuid, version, seq, raw type)
 * with `error` = -errno and `data_size` = data length, then the data. The kernel matches a full
 * reply on the header's seq only.
 *
 * Never produces a reply the kernel would refuse: data longer than the kernel's buffer for this
 * request ({@link replyCapacity}) becomes a -ENOSPC reply without data (what the kernel would
 * make of it anyway, minus its "Insufficient space" log line), and an errno outside 0..4095
 * becomes EIO.
 *
 * The result is a view into a shared slab: hand it on as a view (its byteOffset and length),
 * never as its `.buffer`.
 *
 * `ackOnly` sends the zero-length `cn_msg` form (`cn_msg.seq` = request seq, `ack` = errno),
 * which carries no data: a reply with data is always sent in full, since an ACK would make the
 * kernel read an unset answer as success.
 */
export function encodeReply(
  request: Request,
  reply: Reply,
  opts?: { ackOnly?: boolean },
): Uint8Array {
  let errno = sanitizeErrno(reply.errno);
  let data = reply.data ?? EMPTY;
  if (data.length > replyCapacity(request)) {
    errno = Errno.ENOSPC;
    data = EMPTY;
  }
  // The ACK form sets the kernel's reply size to 0, except for -EAGAIN: use it only where
  // that is harmless (success without data, or -EAGAIN), else send the full form.
  const ackable = errno === 0 ? data.length === 0 : errno === Errno.EAGAIN;
  if (opts?.ackOnly && ackable) return encodeAck(request.seq, errno);
  if (errno !== 0) {
    // An error reply carries data_size = the request's reply capacity (zeros). The kernel
    // stores a reply's data_size into the caller's reply-size variable, and on -ESRCH it
    // re-sends CTR and RESUME and then retries the request with that same variable: a
    // data_size of 0 here leaves the retried IN_SYNC (etc.) no room, the kernel drops its
    // answer as "Insufficient space" and the mirror reads "not in sync" (writes go to one leg).
    // Seen against the real 6.1 kernel under qemu after a daemon restart.
    data = zeros(replyCapacity(request));
  }

  const off = OFFSETS[request.layout];
  const cnLen = off.len + data.length;
  const { out, dv, base } = allocate(FRAME_OVERHEAD + cnLen);
  writeFrame(dv, base, cnLen, {
    nlSeq: request.seq,
    cnSeq: request.frame.cnSeq,
    cnAck: request.frame.cnAck,
  });
  const h = base + FRAME_OVERHEAD;
  if (request.layout === "current") {
    dv.setBigUint64(h + LUID_OFF, BigInt.asUintN(64, request.luid), LITTLE_ENDIAN);
    dv.setUint32(h + VERSION_OFF, request.version >>> 0, LITTLE_ENDIAN);
  }
  // A decoded uuid is printable ASCII of at most 128 bytes: it fits and keeps its NUL.
  writeText(out, FRAME_OVERHEAD + off.uuid, request.uuid, UUID_LEN - 1);
  dv.setInt32(h + off.error, -errno, LITTLE_ENDIAN);
  dv.setUint32(h + off.seq, request.seq >>> 0, LITTLE_ENDIAN);
  dv.setUint32(h + off.type, request.rawType >>> 0, LITTLE_ENDIAN);
  dv.setUint32(h + off.dataSize, data.length, LITTLE_ENDIAN);
  out.set(data, FRAME_OVERHEAD + off.len);
  return out;
}

/**
 * Encode the error reply to a malformed request whose seq was readable (`info` from a failed
 * {@link decodeDatagram}): the received header echoed byte for byte, with `error` = -errno and
 * `data_size` = the type's reply capacity (zeros; see {@link encodeReply}).
 */
export function encodeErrorReply(info: ErrorReplyInfo, errno: number): Uint8Array {
  const off = OFFSETS[info.layout];
  // Keep the kernel's reply-size variable intact, as encodeReply does (a CTR may be a first CTR
  // or a re-CTR: 0, which both accept).
  const type = info.rawType & REQUEST_TYPE_MASK;
  const room = isRequestType(type) && type !== RequestType.CTR ? REPLY_CAPACITY[type] : 0;
  const { out, dv, base } = allocate(FRAME_OVERHEAD + off.len + room);
  writeFrame(dv, base, off.len + room, {
    nlSeq: info.seq,
    cnSeq: info.frame.cnSeq,
    cnAck: info.frame.cnAck,
  });
  const h = base + FRAME_OVERHEAD;
  out.set(info.header.subarray(0, off.len), FRAME_OVERHEAD);
  out.fill(0, FRAME_OVERHEAD + off.len, FRAME_OVERHEAD + off.len + room);
  dv.setInt32(h + off.error, -sanitizeErrno(errno), LITTLE_ENDIAN);
  dv.setUint32(h + off.seq, info.seq >>> 0, LITTLE_ENDIAN);
  dv.setUint32(h + off.dataSize, room, LITTLE_ENDIAN);
  return out;
}

/**
 * Encode a request the way the kernel does (for the kernel simulator and tests): nlmsghdr with
 * `nlmsg_seq` and `cn_msg.seq` = `cnSeq` (default: the request's seq, as the kernel sets it),
 * pid 0, ack 0, and the datagram zero-padded to a multiple of 4 like the kernel's skb. Does not
 * validate: the malformed corpus builds bad requests with it.
 */
export function encodeRequest(req: RequestSpec, opts?: { cnSeq?: number }): Uint8Array {
  const off = OFFSETS[req.layout];
  const cnLen = off.len + req.payload.length;
  const { out, dv, base } = allocate(nlmsgAlign(FRAME_OVERHEAD + cnLen));
  const cnSeq = opts?.cnSeq ?? req.seq;
  writeFrame(dv, base, cnLen, { nlSeq: cnSeq, cnSeq, cnAck: 0 });
  const h = base + FRAME_OVERHEAD;
  if (req.layout === "current") {
    dv.setBigUint64(h + LUID_OFF, BigInt.asUintN(64, req.luid), LITTLE_ENDIAN);
    dv.setUint32(h + VERSION_OFF, req.version >>> 0, LITTLE_ENDIAN);
  }
  writeText(out, FRAME_OVERHEAD + off.uuid, req.uuid, UUID_LEN);
  dv.setUint32(h + off.seq, req.seq >>> 0, LITTLE_ENDIAN);
  dv.setUint32(h + off.type, req.type >>> 0, LITTLE_ENDIAN);
  dv.setUint32(h + off.dataSize, req.payload.length, LITTLE_ENDIAN);
  out.set(req.payload, FRAME_OVERHEAD + off.len);
  return out;
}

/**
 * Decode a reply datagram the way the kernel's connector and dm-log-userspace accept it (for the
 * kernel simulator):
 * - the connector drops a datagram shorter than nlmsghdr, with `nlmsg_len` below nlmsghdr +
 *   cn_msg, above the datagram or above 16384 bytes of connector message, or too short for
 *   `cn_msg.len`, and routes only idx 7/val 1 to dm-log-userspace;
 * - `cn_msg.len` 0 is an ACK: seq = `cn_msg.seq`, errno = `cn_msg.ack`;
 * - `cn_msg.len` 1..header-1 is dropped ("Incomplete message");
 * - else a full reply, matched on the header's seq.
 *
 * Stricter than the kernel where the kernel would misbehave: a full reply with a positive
 * `error`, or a `data_size` beyond `cn_msg.len` (the kernel would copy past the message), is
 * rejected. With `capacity` (the buffer the request offered), more data than that yields errno
 * ENOSPC and no data, as in the kernel.
 */
export function decodeReply(
  buf: Uint8Array,
  opts: { layout: LayoutMode; capacity?: number },
): DecodedReply {
  const total = buf.length;
  if (total < NLMSG_HDRLEN) return { ok: false, reason: `Datagram of ${total} bytes is too short` };
  const dv = new DataView(buf.buffer, buf.byteOffset, total);
  const nlmsgLen = dv.getUint32(0, LITTLE_ENDIAN);
  if (nlmsgLen < FRAME_OVERHEAD) {
    return { ok: false, reason: `nlmsg_len ${nlmsgLen} is shorter than nlmsghdr + cn_msg` };
  }
  if (nlmsgLen > total) {
    return { ok: false, reason: `nlmsg_len ${nlmsgLen} exceeds the datagram (${total} bytes)` };
  }
  if (nlmsgLen - NLMSG_HDRLEN > CONNECTOR_MAX_MSG_SIZE) {
    return {
      ok: false,
      reason: `Connector message of ${nlmsgLen - NLMSG_HDRLEN} bytes is too big`,
    };
  }
  const idx = dv.getUint32(NLMSG_HDRLEN, LITTLE_ENDIAN);
  const val = dv.getUint32(NLMSG_HDRLEN + 4, LITTLE_ENDIAN);
  if (idx !== CN_IDX_DM || val !== CN_VAL_DM_USERSPACE_LOG) {
    return { ok: false, reason: `Connector id ${idx}/${val} reaches no dm-log-userspace callback` };
  }
  const cnSeq = dv.getUint32(NLMSG_HDRLEN + 8, LITTLE_ENDIAN);
  const cnAck = dv.getUint32(NLMSG_HDRLEN + 12, LITTLE_ENDIAN);
  const cnLen = dv.getUint16(NLMSG_HDRLEN + 16, LITTLE_ENDIAN);
  if (nlmsgLen < FRAME_OVERHEAD + cnLen) {
    return { ok: false, reason: `cn_msg.len ${cnLen} exceeds nlmsg_len ${nlmsgLen}` };
  }
  if (cnLen === 0) {
    return { ok: true, kind: "ack", seq: cnSeq, errno: cnAck, data: buf.subarray(0, 0) };
  }
  const h = FRAME_OVERHEAD;
  const layout: HeaderLayout = opts.layout === "auto"
    ? detectLayout(buf.subarray(h, h + Math.min(cnLen, 16)))
    : opts.layout;
  const off = OFFSETS[layout];
  if (cnLen < off.len) {
    return {
      ok: false,
      reason: `Incomplete message: cn_msg.len ${cnLen}, the ${layout} header needs ${off.len}`,
    };
  }
  const error = dv.getInt32(h + off.error, LITTLE_ENDIAN);
  const seq = dv.getUint32(h + off.seq, LITTLE_ENDIAN);
  const rawType = dv.getUint32(h + off.type, LITTLE_ENDIAN);
  const dataSize = dv.getUint32(h + off.dataSize, LITTLE_ENDIAN);
  if (error > 0) return { ok: false, reason: `Full reply with a positive error ${error}` };
  if (dataSize > cnLen - off.len) {
    return { ok: false, reason: `data_size ${dataSize} exceeds cn_msg.len ${cnLen}` };
  }
  const uuidField = buf.subarray(h + off.uuid, h + off.uuid + UUID_LEN);
  const nul = uuidField.indexOf(0);
  const uuid = textDecoder.decode(nul >= 0 ? uuidField.subarray(0, nul) : uuidField);
  const result: DecodedReply & { ok: true } = {
    ok: true,
    kind: "full",
    seq,
    errno: error === 0 ? 0 : -error, // not -0
    data: buf.subarray(h + off.len, h + off.len + dataSize),
    layout,
    uuid,
    rawType,
  };
  if (layout === "current") {
    result.luid = dv.getBigUint64(h + LUID_OFF, LITTLE_ENDIAN);
    result.version = dv.getUint32(h + VERSION_OFF, LITTLE_ENDIAN);
  }
  if (opts.capacity !== undefined && dataSize > opts.capacity) {
    result.errno = Errno.ENOSPC;
    result.data = buf.subarray(0, 0);
    result.overCapacity = true;
  }
  return result;
}
