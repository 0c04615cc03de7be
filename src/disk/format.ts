/**
 * The on-disk layout of the kernel's `disk` dirty log (drivers/md/dm-log.c), kept unchanged for
 * `clustered-disk` so a log written by clogd reads the same to the kernel's own log, cmirrord and
 * us:
 *
 * ```
 * byte 0     magic      u32 LE  0x4D695272 ("MiRr")
 * byte 4     version    u32 LE  2
 * byte 8     nr_regions u64 LE  regions the bitmap describes
 * byte 16    unused up to byte 1024 (LOG_OFFSET = 2 sectors); written as zeros
 * byte 1024  clean bitmap, round_up(region_count, 32) / 8 bytes, bit i = byte i/8, bit i%8;
 *            set = clean and in sync
 * the whole area is rounded up to the device's logical block size
 * ```
 *
 * Every integer is read and written through a little-endian DataView: the kernel's v2 format is
 * little-endian whatever the host (cmirrord wrote host order, predecessor defect 8).
 *
 * @module
 */

import type { DiskImage, SyncMode } from "../log/types.ts";

/** `MIRROR_MAGIC`: "MiRr" read as a little-endian u32. */
export const LOG_MAGIC = 0x4D695272;
/** `MIRROR_DISK_VERSION`: the only version the kernel accepts (1 is upgraded on little-endian). */
export const LOG_VERSION = 2;
/** Bytes of the header struct proper (magic, version, nr_regions). */
export const HEADER_BYTES = 16;
/** The bitmap starts after `LOG_OFFSET` = 2 sectors; the bytes between are unused. */
export const HEADER_AREA_BYTES = 1024;
/** Smallest logical block size Linux reports (and the kernel's sector). */
export const MIN_LOGICAL_BLOCK_SIZE = 512;
/** Largest logical block size we accept: Linux allows up to 64 KiB with large-block support. */
export const MAX_LOGICAL_BLOCK_SIZE = 65536;
/**
 * Largest region count we lay out: a 512 MiB bitmap. Far above any real mirror (a 1 PiB mirror
 * with 512 KiB regions needs 2^31 regions, a 256 MiB bitmap) and still inside what one process
 * can hold twice (replica + staging copy).
 */
export const MAX_REGION_COUNT = 2 ** 32;

/** A decoded log header. */
export interface LogHeader {
  /** Should be {@link LOG_MAGIC}; anything else means "no log here yet". */
  magic: number;
  /** {@link LOG_VERSION}, 1 (upgraded) or an unknown version (log device failed). */
  version: number;
  /** `nr_regions` as stored (u64). */
  nrRegions: bigint;
}

/** What {@link interpretLoad} concluded from a log area. */
export interface LoadResult {
  /** Absent for a fresh log: the replica starts from the table's sync mode. */
  image?: DiskImage;
  /** Set when the log device is treated as failed; say it in the log and in the status (D). */
  warning?: string;
}

/** Options of {@link interpretLoad}. */
export interface InterpretOptions {
  /** Region count of the mirror now (from the CTR), not the one stored on disk. */
  regionCount: number;
  /** Sync mode from the table. */
  sync: SyncMode;
}

function checkRegionCount(regionCount: number): void {
  if (!Number.isSafeInteger(regionCount) || regionCount < 0 || regionCount > MAX_REGION_COUNT) {
    throw new RangeError(
      `Region count ${regionCount} out of range: must be an integer in 0..${MAX_REGION_COUNT}`,
    );
  }
}

/** Bytes of the clean bitmap for `regionCount` regions: round_up(regionCount, 32) / 8. */
export function bitmapBytes(regionCount: number): number {
  checkRegionCount(regionCount);
  return Math.ceil(regionCount / 32) * 4;
}

/** Whether `size` is a logical block size Linux can report (a power of two in 512..64 KiB). */
export function isValidLogicalBlockSize(size: number): boolean {
  return Number.isSafeInteger(size) && size >= MIN_LOGICAL_BLOCK_SIZE &&
    size <= MAX_LOGICAL_BLOCK_SIZE && (size & (size - 1)) === 0;
}

/**
 * Bytes the log occupies at the start of the device: header area plus bitmap, rounded up to the
 * logical block size, because the kernel reads and writes it in whole logical blocks.
 */
export function logAreaSize(regionCount: number, logicalBlockSize: number): number {
  if (!isValidLogicalBlockSize(logicalBlockSize)) {
    throw new RangeError(
      `Logical block size ${logicalBlockSize} invalid: must be a power of two in ` +
        `${MIN_LOGICAL_BLOCK_SIZE}..${MAX_LOGICAL_BLOCK_SIZE}`,
    );
  }
  const raw = HEADER_AREA_BYTES + bitmapBytes(regionCount);
  return Math.ceil(raw / logicalBlockSize) * logicalBlockSize;
}

/**
 * The header area (1024 bytes) for a version-2 log of `nrRegions` regions: the 16-byte header,
 * then zeros.
 */
export function encodeHeader(nrRegions: number | bigint): Uint8Array {
  const n = BigInt(nrRegions);
  if (n < 0n || n > 0xFFFF_FFFF_FFFF_FFFFn) {
    throw new RangeError(`nr_regions ${n} does not fit in a u64`);
  }
  const area = new Uint8Array(HEADER_AREA_BYTES);
  const view = new DataView(area.buffer);
  view.setUint32(0, LOG_MAGIC, true);
  view.setUint32(4, LOG_VERSION, true);
  view.setBigUint64(8, n, true);
  return area;
}

/** Reads the 16-byte header at the start of `bytes` (at least {@link HEADER_BYTES} long). */
export function decodeHeader(bytes: Uint8Array): LogHeader {
  if (bytes.length < HEADER_BYTES) {
    throw new RangeError(`Log header needs ${HEADER_BYTES} bytes, got ${bytes.length}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES);
  return {
    magic: view.getUint32(0, true),
    version: view.getUint32(4, true),
    nrRegions: view.getBigUint64(8, true),
  };
}

/**
 * Interprets a log area read from the device by the kernel's rules (dm-log.c read_header and
 * disk_resume):
 *
 * - `sync` or `nosync` in the table, or a wrong magic: a fresh log (no image); the replica
 *   starts every region out of sync (`sync`, default) or in sync (`nosync`).
 * - Version 1 is read as version 2: the kernel upgrades it on little-endian hosts, the only
 *   ones where the two layouts agree (v1 was host-endian; we read little-endian).
 * - Any other version: the kernel warns "incompatible disk log version", fails the log device
 *   and, since it cannot trust the bitmap, takes `nr_regions` as 0 so every region is out of
 *   sync. We return that as an image with `failed: true`, `nrRegions: 0`, all bits clear, and a
 *   warning. (The kernel then still writes a fresh v2 header; so does our store.)
 * - Otherwise an image with the stored `nr_regions` (clamped to a safe integer) and the stored
 *   bits, with the kernel's resume rules already applied to the copy: regions from `nr_regions`
 *   up to the region count are cleared (grown device; the table has no sync word here, so the
 *   kernel's "clear" branch applies) and bits past the region count are cleared (shrunk
 *   device). Applying them again in the replica changes nothing.
 *
 * `area` must hold at least the header area and the bitmap for `regionCount` regions.
 */
export function interpretLoad(area: Uint8Array, options: InterpretOptions): LoadResult {
  const { regionCount, sync } = options;
  const length = bitmapBytes(regionCount);
  if (area.length < HEADER_AREA_BYTES + length) {
    throw new RangeError(
      `Log area too short: need ${HEADER_AREA_BYTES + length} bytes for ${regionCount} regions, ` +
        `got ${area.length}`,
    );
  }
  if (sync !== "default") return {};
  const header = decodeHeader(area);
  if (header.magic !== LOG_MAGIC) return {};
  const version = header.version === 1 ? LOG_VERSION : header.version;
  if (version !== LOG_VERSION) {
    return {
      image: { nrRegions: 0, cleanBits: new Uint8Array(length), failed: true },
      warning: `Incompatible disk log version ${header.version} (expected ${LOG_VERSION}): ` +
        `log device failed, every region out of sync`,
    };
  }
  const stored = header.nrRegions > BigInt(Number.MAX_SAFE_INTEGER)
    ? Number.MAX_SAFE_INTEGER
    : Number(header.nrRegions);
  const cleanBits = area.slice(HEADER_AREA_BYTES, HEADER_AREA_BYTES + length);
  clearBits(cleanBits, Math.min(stored, regionCount), length * 8);
  return { image: { nrRegions: stored, cleanBits } };
}

/** Clears bits [from, to) of a little-endian bitmap, a byte at a time where it can. */
function clearBits(bits: Uint8Array, from: number, to: number): void {
  let i = from;
  for (; i < to && i % 8 !== 0; i++) bits[i >> 3] &= ~(1 << (i & 7));
  if (i < to) bits.fill(0, i >> 3, to >> 3);
  for (i = Math.max(i, to & ~7); i < to; i++) bits[i >> 3] &= ~(1 << (i & 7));
}
