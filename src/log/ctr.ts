/**
 * The constructor (CTR) string the kernel sends for a userspace dirty log, and the status texts
 * derived from it.
 *
 * Current kernels (dm-log-userspace-base.c, `build_constructor_string`) send
 * `"<target sectors> <type> <type args>"`, e.g. `"131072 clustered-core 1024"` or
 * `"2097152 clustered-disk 253:3 1024 nosync"`. The 2009 patch (`../seed/`) sent the type's own
 * arguments followed by the target length, with no type word:
 * `"<region_size> <uuid> [[no]sync] <len>"` (core) or
 * `"<dev> <region_size> <uuid> [[no]sync] <len>"` (disk); the type is then told by whether the
 * first word is a number (a region size) or a device. A form with the type word first and the
 * length last (`"clustered_core 1024 131072"`) is accepted too. Early drafts spelled the types
 * with underscores; both spellings are accepted everywhere.
 *
 * The node knows the header layout a CTR came in and should pass it ({@link ParseCtrOptions});
 * without it the layout is detected, and a type-less 2009 string must carry its uuid and a region
 * no larger than the target, so that `"<len> <unknown type> <size>"` is not taken for one.
 *
 * @module
 */

import { type HeaderLayout, KERNEL_MAX_PAYLOAD, MAX_STATUS_REPLY } from "../kernel/protocol.ts";
import type { CtrArgs, LogKind } from "./types.ts";

/**
 * Most regions one log may have. Regions are numbered with 32-bit-safe integers, and the replica
 * holds two bitmaps of this many bits (sync and on-disk clean image): 2^31 regions cost 512 MiB,
 * 2^24 regions (a 8 TiB mirror with 512 KiB regions) cost 4 MiB.
 */
export const MAX_REGION_COUNT = 2 ** 31;

/** Smallest region size in sectors (dm-log.c `_check_region_size` rejects `region_size < 2`). */
export const MIN_REGION_SIZE = 2;

/** Largest region size in sectors: the kernel keeps it in a `uint32_t` and wants a power of two. */
export const MAX_REGION_SIZE = 2 ** 31;

/** Longest uuid in a 2009 CTR string (DM_UUID_LEN - 1). */
export const MAX_UUID_LENGTH = 128;

/** Longest CTR string: the kernel never sends a payload longer than this. */
export const MAX_CTR_LENGTH: number = KERNEL_MAX_PAYLOAD;

const KINDS: Record<string, LogKind> = {
  "clustered-core": "clustered-core",
  "clustered_core": "clustered-core",
  "clustered-disk": "clustered-disk",
  "clustered_disk": "clustered-disk",
};

const DECIMAL = /^[0-9]{1,20}$/;
const PRINTABLE = /^[\x21-\x7e]+$/;

function isKindWord(word: string | undefined): boolean {
  return word !== undefined && Object.hasOwn(KINDS, word);
}

function isDecimal(word: string | undefined): word is string {
  return word !== undefined && DECIMAL.test(word);
}

/** A parse failure: what was wrong, for the log line and the test. */
export interface CtrError {
  /** What is wrong, starting with a capital letter. */
  error: string;
}

/** True when {@link parseCtr} failed. */
export function isCtrError(result: CtrArgs | CtrError): result is CtrError {
  return "error" in result;
}

/** Options for {@link parseCtr}. */
export interface ParseCtrOptions {
  /**
   * The request header layout the CTR came in, when known: "current" accepts only
   * `"<len> <type> <args>"`, "2009" only the length-last layouts. Undefined: detect.
   */
  layout?: HeaderLayout;
}

/**
 * Parses a CTR string (trailing NULs tolerated: a re-CTR after ESRCH counts the NUL) and checks
 * it strictly: a power-of-two region size of at least {@link MIN_REGION_SIZE} sectors, between 1
 * and {@link MAX_REGION_COUNT} regions, at most one of `sync`/`nosync`, no unknown words, and
 * status texts that fit the kernel's 128-byte reply buffers.
 */
export function parseCtr(text: string, options: ParseCtrOptions = {}): CtrArgs | CtrError {
  if (typeof text !== "string") return { error: "CTR string must be a string" };
  const stripped = text.replace(/\0+$/, "");
  if (stripped.includes("\0")) return { error: "CTR string has a NUL before its end" };
  if (stripped.length > MAX_CTR_LENGTH) {
    return { error: `CTR string is ${stripped.length} bytes, more than ${MAX_CTR_LENGTH}` };
  }
  const words = stripped.trim().split(/[ \t\n]+/).filter((w) => w !== "");
  if (words.length === 0) return { error: "CTR string is empty" };
  const odd = words.find((w) => !PRINTABLE.test(w));
  if (odd !== undefined) {
    return {
      error: `CTR string has a non-printable or non-ASCII character in ${JSON.stringify(odd)}`,
    };
  }

  // Which of the three layouts: see the module comment.
  const current = options.layout !== "2009";
  const legacy = options.layout !== "current";
  let lengthWord: string | undefined;
  let kind: LogKind;
  let typeArgs: string[];
  let argv: string[];
  let form: "current" | "typed-2009" | "untyped-2009";
  if (legacy && isKindWord(words[0])) {
    form = "typed-2009";
    kind = KINDS[words[0]];
    lengthWord = words.length >= 2 ? words[words.length - 1] : undefined;
    typeArgs = words.slice(1, -1);
    argv = words.slice(0, -1);
  } else if (current && isDecimal(words[0]) && isKindWord(words[1])) {
    form = "current";
    lengthWord = words[0];
    kind = KINDS[words[1]];
    typeArgs = words.slice(2);
    argv = words.slice(1);
  } else if (legacy && words.length >= 3 && isDecimal(words[words.length - 1])) {
    form = "untyped-2009";
    lengthWord = words[words.length - 1];
    typeArgs = words.slice(0, -1);
    kind = isDecimal(typeArgs[0]) ? "clustered-core" : "clustered-disk";
    argv = typeArgs;
  } else {
    const expected = current
      ? `"<target sectors> clustered-core|clustered-disk <args>"`
      : `"[<dev>] <region size> <uuid> [[no]sync] <target sectors>"`;
    return { error: `Unrecognized CTR string ${JSON.stringify(stripped)}: expected ${expected}` };
  }
  if (!isDecimal(lengthWord)) {
    return {
      error: `Target length must be a decimal number of sectors, got ${lengthWord ?? "nothing"}`,
    };
  }
  const targetBig = BigInt(lengthWord);
  if (targetBig < 1n) return { error: "Target length must be at least 1 sector" };
  if (targetBig > BigInt(Number.MAX_SAFE_INTEGER)) {
    return { error: `Target length ${lengthWord} is too large` };
  }

  let i = 0;
  let device: string | undefined;
  if (kind === "clustered-disk") {
    device = typeArgs[i++];
    if (device === undefined || isDecimal(device)) {
      return { error: "A clustered-disk log needs a log device before the region size" };
    }
  }
  const regionWord = typeArgs[i++];
  if (!isDecimal(regionWord)) {
    return {
      error: `Region size must be a decimal number of sectors, got ${regionWord ?? "nothing"}`,
    };
  }
  const regionBig = BigInt(regionWord);
  if (
    regionBig < BigInt(MIN_REGION_SIZE) || regionBig > BigInt(MAX_REGION_SIZE) ||
    (regionBig & (regionBig - 1n)) !== 0n
  ) {
    return {
      error: `Region size must be a power of two from ${MIN_REGION_SIZE} to ${MAX_REGION_SIZE} ` +
        `sectors, got ${regionWord}`,
    };
  }
  const countBig = (targetBig + regionBig - 1n) / regionBig;
  if (countBig > BigInt(MAX_REGION_COUNT)) {
    return { error: `Log would have ${countBig} regions, more than ${MAX_REGION_COUNT}` };
  }

  // The 2009 kernel passed the uuid among the type's arguments, right after the region size.
  if (form !== "current" && typeArgs[i] !== undefined && !FLAGS.has(typeArgs[i])) {
    if (typeArgs[i].length > MAX_UUID_LENGTH) {
      return { error: `UUID argument is longer than ${MAX_UUID_LENGTH} characters` };
    }
    i++;
  } else if (form === "untyped-2009") {
    return { error: "A 2009-layout CTR string needs the log uuid after the region size" };
  }
  if (form === "untyped-2009" && regionBig > targetBig) {
    // Not a kernel rule for userspace logs, but what tells "<len> <unknown type> <size>" from a
    // 2009 string: dm-log.c refuses regions larger than the target.
    return { error: `Region size ${regionWord} is larger than the target (${lengthWord} sectors)` };
  }
  let sync: CtrArgs["sync"] = "default";
  let blockOnError = false;
  for (const word of typeArgs.slice(i)) {
    if (word === "sync" || word === "nosync") {
      if (sync !== "default") return { error: `Both ${sync} and ${word} given` };
      sync = word;
    } else if (word === "block_on_error") {
      if (blockOnError) return { error: "Argument block_on_error given twice" };
      blockOnError = true;
    } else {
      return { error: `Unknown log argument ${JSON.stringify(word)}` };
    }
  }

  const args: CtrArgs = {
    targetSectors: Number(targetBig),
    kind,
    regionSize: Number(regionBig),
    regionCount: Number(countBig),
    sync,
    blockOnError,
    argv,
  };
  if (device !== undefined) args.device = device;

  // Fail at CTR rather than at every STATUS request: both texts go into 128-byte buffers.
  const longest = Math.max(
    statusInfoText(args, { diskFailed: true }).length,
    statusTableText(args).length,
  );
  if (longest + 1 > MAX_STATUS_REPLY) {
    return {
      error: `Log arguments too long: status text of ${longest} bytes exceeds ${
        MAX_STATUS_REPLY - 1
      }`,
    };
  }
  return args;
}

const FLAGS = new Set(["sync", "nosync", "block_on_error"]);

/**
 * The STATUS_INFO text (without NUL): `"1 clustered-core"` or
 * `"3 clustered-disk <device> <A|D>"`, as the previous daemon answered (D: the disk log failed).
 */
export function statusInfoText(args: CtrArgs, options: { diskFailed?: boolean } = {}): string {
  const failed = options.diskFailed === true;
  if (args.kind === "clustered-core") return "1 clustered-core";
  return `3 clustered-disk ${args.device} ${failed ? "D" : "A"}`;
}

/**
 * The STATUS_TABLE text (without NUL), in the kernel's table form for a log:
 * `"<type> <#args> <args>"`, e.g. `"clustered-disk 3 253:3 1024 nosync"`. Current kernels build
 * this line themselves and never ask; the 2009 kernel printed the answer as the log's part of the
 * mirror table, so the arguments are the ones it sent (its uuid included).
 */
export function statusTableText(args: CtrArgs): string {
  const rest = isKindWord(args.argv[0]) ? args.argv.slice(1) : args.argv;
  return [args.kind, String(rest.length), ...rest].join(" ");
}
