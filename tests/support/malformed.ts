/**
 * Hostile input for the kernel link: a named corpus of malformed (and borderline valid)
 * datagrams with the outcome each must have, and a seeded generator of random ones.
 *
 * Every corpus entry targets one log, set up by {@link corpusSetup} (CTR + RESUME), so that a
 * daemon-level test can replay the corpus against a live log and check replies by seq.
 *
 * @module
 */

import { encodeRequest, type RequestSpec, s64Bytes, u64Bytes } from "../../src/kernel/codec.ts";
import {
  CN_MSG_LEN,
  Errno,
  FRAME_OVERHEAD,
  HEADER_LEN_2009,
  HEADER_LEN_CURRENT,
  type HeaderLayout,
  NLMSG_HDRLEN,
  RequestType,
} from "../../src/kernel/protocol.ts";

/** Uuid of the log every corpus entry names. */
export const CORPUS_UUID = "LVM-corpus-mirror-uuid-0001";
/** Luid of that log: a kernel pointer, like the 6.1 fixture's. */
export const CORPUS_LUID = 0xff2947e5141dc000n;
/** Region size of the corpus log, in sectors. */
export const CORPUS_REGION_SIZE = 1024;
/** Region count of the corpus log (regions 0..1023 are valid). */
export const CORPUS_REGION_COUNT = 1024;
/** The corpus log's constructor string, as a first CTR sends it. */
export const CORPUS_CTR = `${CORPUS_REGION_SIZE * CORPUS_REGION_COUNT} clustered-core ` +
  `${CORPUS_REGION_SIZE} nosync`;
/** Version the corpus' current-layout requests carry (Debian 12's 6.1 kernel). */
export const CORPUS_VERSION = 3;

/** The outcome a datagram must have at the daemon. */
export type Expect = "error-reply" | "drop" | "ok";

/** One corpus datagram. */
export interface CorpusEntry {
  /** Unique, for test names and log lines. */
  name: string;
  bytes: Uint8Array;
  /** What the daemon must do: answer with an error, drop it with a log line, or serve it. */
  expect: Expect;
  /**
   * Who decides: "codec" (decodeDatagram's result is `expect`) or "replica" (the codec accepts
   * the request; the log replica must reject it, e.g. a region past region_count).
   */
  layer: "codec" | "replica";
  /** The layout setting to decode it with (the entry's outcome holds under "auto" too). */
  layout: HeaderLayout;
  /** The seq written in the request header; an error reply must carry it. */
  seq: number;
  /** For codec-layer error replies: the errno the codec answers with. */
  errno?: number;
  /** Why the entry matters, where the name does not say. */
  note?: string;
}

const HOST_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Field offsets inside the request header, per layout (kernel-abi.md). */
const HDR = {
  current: { version: 140, seq: 148, type: 152, dataSize: 156, uuid: 8 },
  "2009": { version: -1, seq: 140, type: 144, dataSize: 148, uuid: 0 },
} as const;

/** Seqs of corpus entries start here; corpusSetup uses 1 and 2. */
const FIRST_CORPUS_SEQ = 1000;

function spec(layout: HeaderLayout, seq: number, type: number, payload: Uint8Array): RequestSpec {
  return {
    layout,
    luid: CORPUS_LUID,
    uuid: CORPUS_UUID,
    version: CORPUS_VERSION,
    seq,
    type,
    payload,
  };
}

function regions(...rs: (number | bigint)[]): Uint8Array {
  const out = new Uint8Array(rs.length * 8);
  rs.forEach((r, i) => out.set(u64Bytes(r), i * 8));
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Copy `bytes` and overwrite a u16/u32 at `off` (host-endian). */
function patch(bytes: Uint8Array, off: number, value: number, size: 2 | 4 = 4): Uint8Array {
  const out = bytes.slice();
  const dv = new DataView(out.buffer);
  if (size === 2) dv.setUint16(off, value, HOST_LE);
  else dv.setUint32(off, value >>> 0, HOST_LE);
  return out;
}

/** Copy `bytes`, replacing its length fields so nlmsg_len and cn_msg.len match `bytes`' length. */
function refit(bytes: Uint8Array): Uint8Array {
  const out = patch(bytes, 0, bytes.length);
  return patch(out, NLMSG_HDRLEN + 16, bytes.length - FRAME_OVERHEAD, 2);
}

const text = (s: string) => new TextEncoder().encode(s);

/**
 * The datagrams that create and resume the corpus log (seqs 1 and 2), to send before replaying
 * the corpus against a daemon.
 */
export function corpusSetup(layout: HeaderLayout = "current"): Uint8Array[] {
  return [
    encodeRequest(spec(layout, 1, RequestType.CTR, text(CORPUS_CTR))),
    encodeRequest(spec(layout, 2, RequestType.RESUME, new Uint8Array(0))),
  ];
}

/**
 * The named corpus. Expectations follow decodeDatagram's documented policy: a datagram that is
 * not a dm-log-userspace message, or whose header is cut before the seq, is dropped; anything
 * else wrong gets an error reply (-EINVAL, or -ENOSYS for an unknown type).
 */
export function malformedCorpus(): CorpusEntry[] {
  const out: CorpusEntry[] = [];
  let seq = FIRST_CORPUS_SEQ;
  const add = (
    e: Omit<CorpusEntry, "seq" | "layout" | "bytes"> & {
      layout?: HeaderLayout;
      make: (s: number, layout: HeaderLayout) => Uint8Array;
    },
  ) => {
    const s = seq++;
    const layout = e.layout ?? "current";
    const { make, ...rest } = e;
    out.push({ ...rest, layout, seq: s, bytes: make(s, layout) });
  };
  const req = (type: number, payload: Uint8Array) => (s: number, l: HeaderLayout) =>
    encodeRequest(spec(l, s, type, payload));
  const inSync = req(RequestType.IN_SYNC, regions(5));
  const hdr = (l: HeaderLayout) => HDR[l];
  const EINVAL = Errno.EINVAL;
  const codecError = { expect: "error-reply", layer: "codec", errno: EINVAL } as const;
  const drop = { expect: "drop", layer: "codec" } as const;
  const ok = { expect: "ok", layer: "codec" } as const;
  const replica = {
    expect: "error-reply",
    layer: "replica",
    note: "Valid at the codec level: the replica rejects it (region out of range)",
  } as const;

  // Framing.
  add({ name: "empty datagram", ...drop, make: () => new Uint8Array(0) });
  add({ name: "truncated nlmsghdr", ...drop, make: (s, l) => inSync(s, l).slice(0, 10) });
  add({
    name: "nlmsghdr and cn_msg only (an ACK sent to the daemon)",
    ...drop,
    make: (s, l) => refit(inSync(s, l).slice(0, FRAME_OVERHEAD)),
  });
  add({
    name: "truncated cn_msg",
    ...drop,
    make: (s, l) => inSync(s, l).slice(0, NLMSG_HDRLEN + CN_MSG_LEN - 4),
  });
  add({
    name: "nlmsg_len larger than the datagram",
    ...codecError,
    make: (s, l) => {
      const b = inSync(s, l);
      return patch(b, 0, b.length + 8);
    },
  });
  add({
    name: "nlmsg_len smaller than the datagram",
    ...codecError,
    make: (s, l) => {
      const b = inSync(s, l);
      return patch(b, 0, b.length - 8);
    },
  });
  add({
    name: "trailing bytes beyond the 4-byte padding",
    ...codecError,
    make: (s, l) => concat(inSync(s, l), new Uint8Array(8)),
  });
  add({ name: "nlmsg_type NLMSG_ERROR", ...drop, make: (s, l) => patch(inSync(s, l), 4, 2, 2) });
  add({ name: "nlmsg_type 0", ...drop, make: (s, l) => patch(inSync(s, l), 4, 0, 2) });
  add({
    name: "cn_msg idx 4 (not device-mapper)",
    ...drop,
    make: (s, l) => patch(inSync(s, l), NLMSG_HDRLEN, 4),
  });
  add({
    name: "cn_msg val 2 (not the userspace log)",
    ...drop,
    make: (s, l) => patch(inSync(s, l), NLMSG_HDRLEN + 4, 2),
  });
  add({
    name: "cn_msg.len one more than the message",
    ...codecError,
    make: (s, l) => {
      const b = inSync(s, l);
      return patch(b, NLMSG_HDRLEN + 16, b.length - FRAME_OVERHEAD + 1, 2);
    },
  });
  add({
    name: "cn_msg.len one less than the message",
    ...codecError,
    make: (s, l) => {
      const b = inSync(s, l);
      return patch(b, NLMSG_HDRLEN + 16, b.length - FRAME_OVERHEAD - 1, 2);
    },
  });
  for (const layout of ["current", "2009"] as const) {
    const len = layout === "current" ? HEADER_LEN_CURRENT : HEADER_LEN_2009;
    add({
      name: `${layout} header truncated before the seq`,
      layout,
      ...drop,
      make: (s, l) => refit(inSync(s, l).slice(0, FRAME_OVERHEAD + 100)),
    });
    add({
      name: `${layout} header one byte short`,
      layout,
      ...drop,
      make: (s, l) => refit(inSync(s, l).slice(0, FRAME_OVERHEAD + len - 1)),
    });
  }

  // data_size.
  add({
    name: "MARK data_size 64 with 8 bytes in the datagram",
    ...codecError,
    note: "The previous daemon crashed, or stayed alive but deaf, on this",
    make: (s, l) =>
      patch(req(RequestType.MARK_REGION, regions(1))(s, l), FRAME_OVERHEAD + hdr(l).dataSize, 64),
  });
  add({
    name: "data_size 0xffffffff",
    ...codecError,
    make: (s, l) =>
      patch(req(RequestType.MARK_REGION, regions(1))(s, l), FRAME_OVERHEAD + hdr(l).dataSize, -1),
  });
  add({
    name: "data_size smaller than the payload sent",
    ...codecError,
    make: (s, l) =>
      patch(req(RequestType.MARK_REGION, regions(1, 2))(s, l), FRAME_OVERHEAD + hdr(l).dataSize, 8),
  });
  add({
    name: "CTR of 333 bytes (over the kernel's 332), lengths consistent",
    ...codecError,
    make: req(RequestType.CTR, text(CORPUS_CTR.padEnd(333, "x"))),
  });
  add({
    name: "MARK of 42 regions (336 bytes, over the kernel's 332), lengths consistent",
    ...codecError,
    make: req(RequestType.MARK_REGION, regions(...Array.from({ length: 42 }, (_, i) => i))),
  });

  // request_type.
  for (const t of [0, 18, 255]) {
    add({
      name: `unknown request type ${t}`,
      ...codecError,
      errno: Errno.ENOSYS,
      note: "The previous daemon did not answer: the kernel waited and retried forever",
      make: req(t, new Uint8Array(0)),
    });
  }
  add({
    name: "unknown request type 18 (2009 layout)",
    layout: "2009",
    ...codecError,
    errno: Errno.ENOSYS,
    make: req(18, new Uint8Array(0)),
  });
  add({
    name: "reserved upper bits set in request_type (IN_SYNC | 0x7f00)",
    ...ok,
    note: "The type is request_type & 0xFF; the upper 24 bits are reserved",
    make: req(0x7f00 | RequestType.IN_SYNC, regions(5)),
  });
  add({
    name: "reserved upper bits with an unknown low byte (0x100 | 0)",
    ...codecError,
    errno: Errno.ENOSYS,
    make: req(0x100, new Uint8Array(0)),
  });

  // uuid.
  add({
    name: "uuid without a NUL in its 129 bytes",
    ...codecError,
    make: (s, l) =>
      encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "u".repeat(129) }),
  });
  add({
    name: "uuid without a NUL (2009 layout)",
    layout: "2009",
    ...codecError,
    make: (s, l) =>
      encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "u".repeat(129) }),
  });
  add({
    name: "empty uuid",
    ...codecError,
    make: (s, l) => encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "" }),
  });
  add({
    name: "uuid with a control byte",
    ...codecError,
    make: (s, l) =>
      encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "LVM-\x01x" }),
  });
  add({
    name: "uuid with a space",
    ...codecError,
    note: "A table argument cannot hold an unescaped space; rejected rather than guessed",
    make: (s, l) =>
      encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "LVM x" }),
  });
  add({
    name: "uuid of 128 characters (the longest valid)",
    ...ok,
    make: (s, l) =>
      encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), uuid: "u".repeat(128) }),
  });

  // version.
  for (const v of [0, 99]) {
    add({
      name: `version ${v}`,
      ...codecError,
      make: (s, l) => encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), version: v }),
    });
  }
  add({
    name: "version 4 (a newer kernel)",
    ...ok,
    note: "Accepted with a warning: version bumps so far kept requests readable",
    make: (s, l) => encodeRequest({ ...spec(l, s, RequestType.IN_SYNC, regions(5)), version: 4 }),
  });

  // Payload size per type.
  const sizes: [string, number, Uint8Array][] = [
    ["MARK with 0 regions", RequestType.MARK_REGION, new Uint8Array(0)],
    [
      "MARK with 33 regions",
      RequestType.MARK_REGION,
      regions(...Array.from({ length: 33 }, (_, i) => i)),
    ],
    ["MARK with 12 bytes", RequestType.MARK_REGION, new Uint8Array(12)],
    ["CLEAR with 0 regions", RequestType.CLEAR_REGION, new Uint8Array(0)],
    ["IN_SYNC with 4 bytes", RequestType.IN_SYNC, new Uint8Array(4)],
    ["IS_CLEAN with 16 bytes", RequestType.IS_CLEAN, new Uint8Array(16)],
    ["IS_REMOTE_RECOVERING with 0 bytes", RequestType.IS_REMOTE_RECOVERING, new Uint8Array(0)],
    ["SET_REGION_SYNC with 8 bytes", RequestType.SET_REGION_SYNC, regions(5)],
    ["FLUSH with 7 bytes", RequestType.FLUSH, new Uint8Array(7)],
    [
      "FLUSH with 33 regions",
      RequestType.FLUSH,
      regions(...Array.from({ length: 33 }, (_, i) => i)),
    ],
    ["GET_REGION_SIZE with 8 bytes", RequestType.GET_REGION_SIZE, regions(0)],
    ["STATUS_INFO with 4 bytes", RequestType.STATUS_INFO, new Uint8Array(4)],
    ["RESUME with 1 byte", RequestType.RESUME, new Uint8Array(1)],
    ["CTR without a string", RequestType.CTR, new Uint8Array(0)],
    ["CTR of a lone NUL", RequestType.CTR, new Uint8Array(1)],
    ["CTR with a NUL inside", RequestType.CTR, text("1048576 clustered-core\x001024")],
  ];
  for (const [name, type, payload] of sizes) add({ name, ...codecError, make: req(type, payload) });
  add({
    name: "DTR carrying the constructor string",
    ...ok,
    note: "Lenient: the kernel ignores DTR's answer, rejecting it would only leak the log",
    make: req(RequestType.DTR, text(CORPUS_CTR)),
  });
  add({
    name: "re-CTR counting its NUL",
    ...ok,
    make: req(RequestType.CTR, text(CORPUS_CTR + "\0")),
  });
  add({
    name: "FLUSH with 32 regions (integrated flush, the largest group)",
    ...ok,
    make: req(RequestType.FLUSH, regions(...Array.from({ length: 32 }, (_, i) => i))),
  });

  // Region values: the codec accepts them, the replica (which knows region_count) must not.
  const big: [string, number, Uint8Array][] = [
    ["MARK of region 2^31", RequestType.MARK_REGION, regions(2 ** 31)],
    ["MARK of region 2^32-1", RequestType.MARK_REGION, regions(2 ** 32 - 1)],
    ["MARK of regions 1 and 2^63", RequestType.MARK_REGION, regions(1, 2n ** 63n)],
    ["CLEAR of region 2^32-1", RequestType.CLEAR_REGION, regions(2 ** 32 - 1)],
    ["integrated FLUSH marking region 2^31", RequestType.FLUSH, regions(2 ** 31)],
    ["IN_SYNC of region 2^32-1", RequestType.IN_SYNC, regions(2 ** 32 - 1)],
    [
      "IN_SYNC of region_count (one past the end)",
      RequestType.IN_SYNC,
      regions(CORPUS_REGION_COUNT),
    ],
    ["IS_CLEAN of region 2^63", RequestType.IS_CLEAN, regions(2n ** 63n)],
    ["IS_CLEAN of region 2^64-1", RequestType.IS_CLEAN, regions(2n ** 64n - 1n)],
    ["IS_REMOTE_RECOVERING of region 2^31", RequestType.IS_REMOTE_RECOVERING, regions(2 ** 31)],
    [
      "SET_REGION_SYNC of region_count",
      RequestType.SET_REGION_SYNC,
      concat(u64Bytes(CORPUS_REGION_COUNT), s64Bytes(1)),
    ],
    [
      "SET_REGION_SYNC of region 2^63",
      RequestType.SET_REGION_SYNC,
      concat(u64Bytes(2n ** 63n), s64Bytes(1)),
    ],
  ];
  for (const [name, type, payload] of big) add({ name, ...replica, make: req(type, payload) });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Random datagrams

/** A tiny seeded PRNG (mulberry32): floats in [0, 1), the same sequence for the same seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One generated datagram: how it was made, the layout it was built in, its bytes. */
export interface RandomDatagram {
  /**
   * "valid", "random", "reshaped", "framed-random", "mutated:<field>", "truncated", "bitflip",
   * "oversize" or "spliced".
   */
  kind: string;
  layout: HeaderLayout;
  bytes: Uint8Array;
}

/** Longest random datagram: the daemon's receive buffer is a bit over 16 KiB. */
const MAX_RANDOM_BYTES = 16384 + 64;

const UUID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:";

class Gen {
  readonly #rand: () => number;
  constructor(seed: number) {
    this.#rand = mulberry32(seed);
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.#rand() * n);
  }
  u32(): number {
    return this.int(0x1_0000_0000);
  }
  chance(p: number): boolean {
    return this.#rand() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }
  uuid(): string {
    const n = this.chance(0.7) ? 20 + this.int(20) : 1 + this.int(128);
    let s = "";
    for (let i = 0; i < n; i++) s += UUID_CHARS[this.int(UUID_CHARS.length)];
    return s;
  }
  luid(): bigint {
    // Kernel pointers mostly (x86_64 direct map), sometimes the small ids a test harness uses.
    if (this.chance(0.9)) {
      return 0xffff_8880_0000_0000n | (BigInt(this.u32()) << 8n) | BigInt(this.int(256) & ~7);
    }
    return BigInt(1 + this.int(0xffff));
  }
  region(): bigint {
    return this.chance(0.9)
      ? BigInt(this.int(4096))
      : this.pick([2n ** 31n, 2n ** 32n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n]);
  }
  regions(min: number, max: number): Uint8Array {
    const n = min + this.int(max - min + 1);
    const out = new Uint8Array(n * 8);
    for (let i = 0; i < n; i++) out.set(u64Bytes(this.region()), i * 8);
    return out;
  }
}

function validPayload(g: Gen, type: number): Uint8Array {
  switch (type) {
    case RequestType.CTR: {
      const size = 1 + g.int(1 << 22);
      const ctr = `${size * 1024} ${g.pick(["clustered-core", "clustered-disk 253:3"])} 1024` +
        g.pick(["", " sync", " nosync"]);
      return text(g.chance(0.2) ? ctr + "\0" : ctr);
    }
    case RequestType.IS_CLEAN:
    case RequestType.IN_SYNC:
    case RequestType.IS_REMOTE_RECOVERING:
      return g.regions(1, 1);
    case RequestType.MARK_REGION:
    case RequestType.CLEAR_REGION:
      return g.regions(1, 32);
    case RequestType.FLUSH:
      return g.chance(0.5) ? new Uint8Array(0) : g.regions(1, 32);
    case RequestType.SET_REGION_SYNC:
      return concat(u64Bytes(g.region()), s64Bytes(g.int(2)));
    default:
      return new Uint8Array(0);
  }
}

function validRequest(g: Gen): { layout: HeaderLayout; bytes: Uint8Array } {
  const layout: HeaderLayout = g.chance(0.8) ? "current" : "2009";
  const type = 1 + g.int(17);
  const bytes = encodeRequest({
    layout,
    luid: g.luid(),
    uuid: g.uuid(),
    version: 1 + g.int(3),
    seq: g.u32(),
    type: g.chance(0.05) ? type | (g.u32() & ~0xff) : type,
    payload: validPayload(g, type),
  });
  return { layout, bytes };
}

/** Offsets of interesting fields to mutate, per layout. */
function fieldOffsets(layout: HeaderLayout): [string, number, 2 | 4][] {
  const h = HDR[layout];
  const fields: [string, number, 2 | 4][] = [
    ["nlmsg_len", 0, 4],
    ["nlmsg_type", 4, 2],
    ["cn_idx", NLMSG_HDRLEN, 4],
    ["cn_val", NLMSG_HDRLEN + 4, 4],
    ["cn_len", NLMSG_HDRLEN + 16, 2],
    ["seq", FRAME_OVERHEAD + h.seq, 4],
    ["request_type", FRAME_OVERHEAD + h.type, 4],
    ["data_size", FRAME_OVERHEAD + h.dataSize, 4],
    ["uuid", FRAME_OVERHEAD + h.uuid, 4],
  ];
  if (layout === "current") {
    fields.push(["version", FRAME_OVERHEAD + h.version, 4], ["luid", FRAME_OVERHEAD, 4]);
  }
  return fields;
}

/**
 * `count` random datagrams from `seed` (the same seed gives the same datagrams): valid requests,
 * valid requests with one field mutated (often to a boundary value), truncations, bit flips,
 * oversize messages, splices of two requests, and plain random bytes.
 */
export function randomDatagrams(seed: number, count: number): RandomDatagram[] {
  const g = new Gen(seed);
  const out: RandomDatagram[] = [];
  for (let i = 0; i < count; i++) {
    const roll = g.int(100);
    const base = validRequest(g);
    const { layout } = base;
    if (roll < 15) {
      out.push({ kind: "valid", layout, bytes: base.bytes });
    } else if (roll < 20) {
      out.push({ kind: "random", layout, bytes: g.bytes(g.int(600)) });
    } else if (roll < 25) {
      // Consistent lengths, a random type and payload size: reaches the per-type size checks.
      const bytes = encodeRequest({
        layout,
        luid: g.luid(),
        uuid: g.uuid(),
        version: 1 + g.int(3),
        seq: g.u32(),
        type: 1 + g.int(17),
        payload: g.bytes(g.chance(0.5) ? 8 * g.int(34) : g.int(341)),
      });
      out.push({ kind: "reshaped", layout, bytes });
    } else if (roll < 35) {
      // Good framing, garbage after it: exercises everything past the connector checks.
      const tail = g.bytes(g.int(400));
      out.push({
        kind: "framed-random",
        layout,
        bytes: refit(concat(base.bytes.slice(0, FRAME_OVERHEAD), tail)),
      });
    } else if (roll < 60) {
      // Every offset lies inside the header, which a valid request always has in full.
      const [field, off, size] = g.pick(fieldOffsets(layout));
      const value = g.pick([0, 1, 7, 17, 18, 255, 256, 332, 333, 0xffff, 0x7fffffff, 0xffffffff]);
      const v = g.chance(0.7) ? value : g.u32();
      out.push({
        kind: `mutated:${field}`,
        layout,
        bytes: patch(base.bytes, off, size === 2 ? v & 0xffff : v, size),
      });
    } else if (roll < 72) {
      const cut = g.int(base.bytes.length);
      const b = base.bytes.slice(0, cut);
      out.push({
        kind: "truncated",
        layout,
        bytes: g.chance(0.5) && cut >= FRAME_OVERHEAD ? refit(b) : b,
      });
    } else if (roll < 87) {
      const b = base.bytes.slice();
      for (let k = 1 + g.int(8); k > 0; k--) b[g.int(b.length)] ^= 1 << g.int(8);
      out.push({ kind: "bitflip", layout, bytes: b });
    } else if (roll < 94) {
      const extra = g.chance(0.5) ? 1 + g.int(400) : g.int(MAX_RANDOM_BYTES - base.bytes.length);
      const b = concat(base.bytes, g.bytes(extra));
      out.push({ kind: "oversize", layout, bytes: g.chance(0.5) ? refit(b) : b });
    } else {
      const other = validRequest(g).bytes;
      const cut = g.int(Math.min(base.bytes.length, other.length));
      out.push({
        kind: "spliced",
        layout,
        bytes: concat(base.bytes.slice(0, cut), other.slice(cut)),
      });
    }
  }
  return out;
}
