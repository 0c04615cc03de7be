/**
 * Resolving the log device argument of a `clustered-disk` CTR ("253:3", "/dev/vg/log",
 * "/var/lib/clogd/test.img") to a path we can open, the name the kernel should hold open, the
 * logical block size and the size.
 *
 * `major:minor` is looked up through `/sys/dev/block/MAJ:MIN/uevent` (DEVNAME) and so finds any
 * block device with a node under /dev: loop, dm, nvme, sd... (cmirrord looked only under
 * /dev/mapper, predecessor defect 10).
 *
 * Deno refuses to stat /dev nodes without `--allow-all` (clogd runs with it); /sys needs only
 * `--allow-read`.
 *
 * @module
 */

import { isValidLogicalBlockSize } from "./format.ts";

/** What the store needs to know about the log device. */
export interface LogDeviceInfo {
  /** Path to open: the /dev node of a block device, or the regular file. */
  path: string;
  /**
   * The name to hand back to the kernel in the CTR reply, for it to hold the device open.
   * For a block device "major:minor": the kernel's dm_get_device() parses "%u:%u" before trying a
   * path lookup, and a device number does not depend on the daemon's mount namespace, /dev
   * symlinks or udev naming (cmirrord, too, answered with the `major:minor` LVM gave it). For a
   * regular file (tests only) the absolute path: the kernel cannot hold a file and would fail
   * the CTR, which is right since dm would not use it anyway.
   */
  name: string;
  /** Logical block size in bytes: the unit the log area is read and written in. */
  logicalBlockSize: number;
  /** Device (or file) size in bytes. */
  sizeBytes: number;
  /** True for a block device, false for a regular file. */
  isBlockDevice: boolean;
  /** Device number (block devices only). */
  major?: number;
  /** Device number (block devices only). */
  minor?: number;
}

/** Options of {@link resolveLogDevice}. */
export interface ResolveOptions {
  /** Root of sysfs (tests: a fake tree for hardware this host lacks, e.g. partitions). */
  sysfsRoot?: string;
  /** Where device nodes live. */
  devRoot?: string;
  /**
   * Logical block size assumed for a regular file: 512 by default, the smallest any device has
   * and the kernel's own unit, so a file-backed log has the same layout a 512-byte disk gets.
   */
  fileLogicalBlockSize?: number;
}

/** Default logical block size for a regular file; see {@link ResolveOptions.fileLogicalBlockSize}. */
export const FILE_LOGICAL_BLOCK_SIZE = 512;

/** Bytes per sector in sysfs `size` files (always 512, whatever the logical block size). */
const SYSFS_SECTOR_BYTES = 512;

/** A parsed "major:minor". */
export interface DeviceNumber {
  major: number;
  minor: number;
}

/** Parses "major:minor" (decimal, as the kernel's `%u:%u`); undefined for anything else. */
export function parseMajorMinor(text: string): DeviceNumber | undefined {
  const m = /^(\d{1,10}):(\d{1,10})$/.exec(text);
  if (m === null) return undefined;
  const major = Number(m[1]);
  const minor = Number(m[2]);
  // Linux dev_t: 12-bit major, 20-bit minor (MINORBITS); the kernel rejects larger ones.
  if (major >= 2 ** 12 || minor >= 2 ** 20) return undefined;
  return { major, minor };
}

/**
 * Splits a stat `rdev` into major and minor the way glibc's gnu_dev_major/minor do
 * (major: bits 8-19 and 32-43, minor: bits 0-7 and 20-31 and 44-63).
 */
export function decodeRdev(rdev: number): DeviceNumber {
  const dev = BigInt(rdev);
  const major = ((dev >> 8n) & 0xFFFn) | ((dev >> 32n) & ~0xFFFn);
  const minor = (dev & 0xFFn) | ((dev >> 12n) & ~0xFFn);
  return { major: Number(major), minor: Number(minor) };
}

/**
 * Resolves a log device argument. Throws an Error whose message says what is wrong
 * (the node turns it into -EINVAL for the CTR), e.g.
 * "Log device 253:3 not found: no /sys/dev/block/253:3".
 */
export function resolveLogDevice(arg: string, options: ResolveOptions = {}): LogDeviceInfo {
  const sysfsRoot = options.sysfsRoot ?? "/sys";
  const devRoot = options.devRoot ?? "/dev";
  const number = parseMajorMinor(arg);
  if (number !== undefined) return resolveNumber(arg, number, sysfsRoot, devRoot);
  if (/^\d+:\d+$/.test(arg)) {
    throw new Error(`Log device ${arg} invalid: major must be < 4096 and minor < 1048576`);
  }
  if (arg === "") throw new Error("Log device missing: empty argument");
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(arg);
  } catch (cause) {
    throw new Error(`Log device ${arg} not found: ${errorText(cause)}`, { cause });
  }
  if (info.isBlockDevice === true) {
    if (info.rdev === null) throw new Error(`Log device ${arg}: stat gave no device number`);
    const dev = decodeRdev(info.rdev);
    return blockDeviceInfo(arg, absolute(arg), dev, sysfsRoot);
  }
  if (info.isFile) {
    const logicalBlockSize = options.fileLogicalBlockSize ?? FILE_LOGICAL_BLOCK_SIZE;
    if (!isValidLogicalBlockSize(logicalBlockSize)) {
      throw new RangeError(`Logical block size ${logicalBlockSize} invalid for file ${arg}`);
    }
    const path = absolute(arg);
    return {
      path,
      name: path,
      logicalBlockSize,
      sizeBytes: info.size,
      isBlockDevice: false,
    };
  }
  throw new Error(`Log device ${arg} is neither a block device nor a regular file`);
}

function resolveNumber(
  arg: string,
  dev: DeviceNumber,
  sysfsRoot: string,
  devRoot: string,
): LogDeviceInfo {
  const sysDir = `${sysfsRoot}/dev/block/${dev.major}:${dev.minor}`;
  let uevent: string;
  try {
    uevent = Deno.readTextFileSync(`${sysDir}/uevent`);
  } catch (cause) {
    if (cause instanceof Deno.errors.NotFound) {
      throw new Error(`Log device ${arg} not found: no ${sysDir}`, { cause });
    }
    throw new Error(`Log device ${arg}: cannot read ${sysDir}/uevent: ${errorText(cause)}`, {
      cause,
    });
  }
  const devName = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
  if (devName === undefined || devName.includes("..")) {
    throw new Error(`Log device ${arg}: no usable DEVNAME in ${sysDir}/uevent`);
  }
  const path = `${devRoot}/${devName}`;
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (cause) {
    throw new Error(`Log device ${arg} has no device node ${path}: ${errorText(cause)}`, {
      cause,
    });
  }
  if (info.isBlockDevice !== true || info.rdev === null) {
    throw new Error(`Log device ${arg}: ${path} is not a block device`);
  }
  const found = decodeRdev(info.rdev);
  if (found.major !== dev.major || found.minor !== dev.minor) {
    throw new Error(
      `Log device ${arg}: ${path} is ${found.major}:${found.minor}, not ${dev.major}:${dev.minor}`,
    );
  }
  return blockDeviceInfo(arg, path, dev, sysfsRoot);
}

function blockDeviceInfo(
  arg: string,
  path: string,
  dev: DeviceNumber,
  sysfsRoot: string,
): LogDeviceInfo {
  const link = `${sysfsRoot}/dev/block/${dev.major}:${dev.minor}`;
  let sysDir: string;
  try {
    sysDir = Deno.realPathSync(link);
  } catch (cause) {
    throw new Error(`Log device ${arg} not found: no ${link}`, { cause });
  }
  // A partition has no queue/ of its own: its limits are the whole disk's, one level up.
  const isPartition = exists(`${sysDir}/partition`);
  const queueDir = isPartition ? `${parentDir(sysDir)}/queue` : `${sysDir}/queue`;
  const logicalBlockSize = readSysInt(arg, `${queueDir}/logical_block_size`);
  if (!isValidLogicalBlockSize(logicalBlockSize)) {
    throw new Error(`Log device ${arg}: unexpected logical block size ${logicalBlockSize}`);
  }
  const sectors = readSysInt(arg, `${sysDir}/size`);
  return {
    path,
    name: `${dev.major}:${dev.minor}`,
    logicalBlockSize,
    sizeBytes: sectors * SYSFS_SECTOR_BYTES,
    isBlockDevice: true,
    major: dev.major,
    minor: dev.minor,
  };
}

function readSysInt(arg: string, file: string): number {
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (cause) {
    throw new Error(`Log device ${arg}: cannot read ${file}: ${errorText(cause)}`, { cause });
  }
  const value = Number(text.trim());
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Error(`Log device ${arg}: ${file} holds ${JSON.stringify(text.trim())}`);
  }
  return value;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

function parentDir(path: string): string {
  const i = path.lastIndexOf("/");
  return i <= 0 ? "/" : path.slice(0, i);
}

function absolute(path: string): string {
  return path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
