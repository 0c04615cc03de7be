/**
 * Request payloads to replica {@link Op}s, and replica answers to reply payloads.
 *
 * Payload layouts from include/uapi/linux/dm-log-userspace.h (see kernel-abi.md). The link is
 * host-endian and only exists on little-endian x86_64 in practice; this codec reads and writes
 * little-endian explicitly. Region numbers arrive as `u64`: a value of 2^53 or more cannot be held
 * exactly in a JS number, so it becomes {@link REGION_OUT_OF_RANGE}, which no log accepts (the
 * previous daemon crashed on regions 2^31 and 2^32-1; nothing here may wrap such a value into a
 * valid region).
 *
 * @module
 */

import { readU64 as codecReadU64, U64_OUT_OF_RANGE } from "../kernel/codec.ts";
import {
  Errno,
  MAX_REGIONS_PER_REQUEST,
  RequestType,
  requestTypeName,
} from "../kernel/protocol.ts";
import type { Op } from "./types.ts";

/**
 * What a `u64` region of 2^53 or more becomes: exactly representable, above every valid region
 * (at most 2^31 - 1), and still a valid `u64` if some codec writes it back out.
 */
export const REGION_OUT_OF_RANGE = 2 ** 53;

/** A request whose payload does not fit its type. */
export interface OpParseError {
  /** Positive errno for the reply (EINVAL). */
  errno: number;
  /** Why, for the log line. */
  reason: string;
}

/** True when {@link parseOp} failed. */
export function isOpParseError(result: Op | OpParseError): result is OpParseError {
  return "errno" in result;
}

/**
 * Reads a `u64` as a number (the codec's reader), mapping values of 2^53 and above, and bytes
 * past the end, to {@link REGION_OUT_OF_RANGE}, which no log accepts.
 */
export function readU64(bytes: Uint8Array, offset = 0): number {
  const v = codecReadU64(bytes, offset);
  return v === U64_OUT_OF_RANGE ? REGION_OUT_OF_RANGE : v;
}

/** Reads a little-endian `s64` as a number (values outside the safe range are clamped to it). */
export function readS64(bytes: Uint8Array, offset = 0): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const v = view.getBigInt64(offset, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) return Number.MAX_SAFE_INTEGER;
  if (v < BigInt(Number.MIN_SAFE_INTEGER)) return Number.MIN_SAFE_INTEGER;
  return Number(v);
}

function invalid(type: number, reason: string): OpParseError {
  return { errno: Errno.EINVAL, reason: `${requestTypeName(type)}: ${reason}` };
}

function regionList(type: number, payload: Uint8Array): number[] | OpParseError {
  if (payload.byteLength % 8 !== 0) {
    return invalid(type, `payload of ${payload.byteLength} bytes is not a list of u64 regions`);
  }
  const n = payload.byteLength / 8;
  if (n > MAX_REGIONS_PER_REQUEST) {
    return invalid(type, `${n} regions, more than ${MAX_REGIONS_PER_REQUEST}`);
  }
  const regions = new Array<number>(n);
  for (let i = 0; i < n; i++) regions[i] = readU64(payload, i * 8);
  return regions;
}

/**
 * Decodes one request (type already masked with 0xFF) into a replica op. Payload sizes are
 * checked exactly: the kernel never sends anything else, so anything else is malformed. CTR and
 * DTR are not replica ops (the node creates and drops replicas) and are refused here.
 */
export function parseOp(type: number, payload: Uint8Array): Op | OpParseError {
  const size = payload.byteLength;
  const empty = (op: Op): Op | OpParseError =>
    size === 0 ? op : invalid(type, `expects no payload, got ${size} bytes`);
  const oneRegion = (): number | OpParseError =>
    size === 8
      ? readU64(payload)
      : invalid(type, `expects an 8-byte u64 region, got ${size} bytes`);

  switch (type) {
    case RequestType.CTR:
    case RequestType.DTR:
      return invalid(type, "handled by the node, not by a log replica");
    case RequestType.PRESUSPEND:
      return empty({ op: "presuspend" });
    case RequestType.POSTSUSPEND:
      return empty({ op: "postsuspend" });
    case RequestType.RESUME:
      return empty({ op: "resume" });
    case RequestType.GET_REGION_SIZE:
      return empty({ op: "get_region_size" });
    case RequestType.GET_RESYNC_WORK:
      return empty({ op: "get_resync_work" });
    case RequestType.GET_SYNC_COUNT:
      return empty({ op: "get_sync_count" });
    case RequestType.STATUS_INFO:
      return empty({ op: "status_info" });
    case RequestType.STATUS_TABLE:
      return empty({ op: "status_table" });
    case RequestType.IS_CLEAN:
    case RequestType.IN_SYNC:
    case RequestType.IS_REMOTE_RECOVERING: {
      const region = oneRegion();
      if (typeof region !== "number") return region;
      const op = type === RequestType.IS_CLEAN
        ? "is_clean"
        : type === RequestType.IN_SYNC
        ? "in_sync"
        : "is_remote_recovering";
      return { op, region };
    }
    case RequestType.FLUSH: {
      const marks = regionList(type, payload);
      return Array.isArray(marks) ? { op: "flush", marks } : marks;
    }
    case RequestType.MARK_REGION: {
      const regions = regionList(type, payload);
      return Array.isArray(regions) ? { op: "mark", regions } : regions;
    }
    case RequestType.CLEAR_REGION: {
      const regions = regionList(type, payload);
      return Array.isArray(regions) ? { op: "clear", regions } : regions;
    }
    case RequestType.SET_REGION_SYNC: {
      if (size !== 16) {
        return invalid(type, `expects {u64 region; s64 in_sync} (16 bytes), got ${size} bytes`);
      }
      // The kernel sends 0 or 1; like C, any non-zero value means "in sync".
      const view = new DataView(payload.buffer, payload.byteOffset, 16);
      const inSync = view.getUint32(8, true) !== 0 || view.getUint32(12, true) !== 0;
      return { op: "set_region_sync", region: readU64(payload), inSync };
    }
    default:
      return { errno: Errno.EINVAL, reason: `Unknown request type ${type}` };
  }
}

/** An unsigned 64-bit little-endian value (`value` an integer from 0 to below 2^64). */
export function u64Bytes(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** 64) {
    throw new RangeError(`u64 value must be an integer from 0 to below 2^64, got ${value}`);
  }
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value), true);
  return out;
}

/** A signed 64-bit little-endian value (`value` a safe integer). */
export function s64Bytes(value: number): Uint8Array {
  if (!Number.isSafeInteger(value)) {
    throw new RangeError(`s64 value must be a safe integer, got ${value}`);
  }
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigInt64(0, BigInt(value), true);
  return out;
}

/** GET_RESYNC_WORK reply `{s64 i; u64 r}`: `i = 1` means "recover region r". */
export function resyncWorkBytes(found: boolean, region: number): Uint8Array {
  const out = new Uint8Array(16);
  out.set(s64Bytes(found ? 1 : 0), 0);
  out.set(u64Bytes(region), 8);
  return out;
}

/** IS_REMOTE_RECOVERING reply `{s64 is_recovering; u64 in_sync_hint}`. */
export function remoteRecoveringBytes(isRecovering: boolean, inSyncHint: number): Uint8Array {
  const out = new Uint8Array(16);
  out.set(s64Bytes(isRecovering ? 1 : 0), 0);
  out.set(u64Bytes(inSyncHint), 8);
  return out;
}

/** Status text as the kernel reads it: the bytes plus a terminating NUL (counted in data_size). */
export function statusBytes(text: string): Uint8Array {
  const encoded = new TextEncoder().encode(text);
  const out = new Uint8Array(encoded.byteLength + 1);
  out.set(encoded);
  return out;
}
