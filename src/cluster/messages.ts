/**
 * The binary cluster messages: what one daemon multicasts to the others over the ordered bus.
 *
 * Two kinds of message share one 8-byte header (`u32 magic, u8 version, u8 kind, u16 number`,
 * the number counting the sender's messages modulo 2^16: the sender recognizes its own messages
 * coming back by it, to account for what it has in flight):
 * - a **batch**: a table of log keys, then up to {@link MAX_BATCH_ITEMS} items, each naming its
 *   log by index into that table. Items are kernel requests (entries, applied by every member in
 *   the order), "nack"s (this node does not hold the log a joiner asked for), "durable"s (the
 *   disk writer made the log durable up to a FLUSH) and "holds" (after others joined the group:
 *   the sender holds the log with these members; see split brains in the core). One message carries requests for many logs:
 *   the daemon has one group and one total order for all of them.
 * - a **checkpoint chunk**: one piece of the state of one log, sent to one joiner.
 *
 * All integers are little-endian. Decoding is strict: every count and length is checked against
 * its limit and against what is left, unknown kinds, opcodes and flag bits are refused, and the
 * message must be consumed exactly. A message that fails is dropped whole by every member alike
 * (they all run the same decoder), so a malformed message never makes replicas diverge
 * (invariant 9). {@link decodeMessage} never throws.
 *
 * Entries never carry a disk image: the RESUME that first initializes a log is applied on the
 * resuming node alone (nobody else holds the log then), so the image stays local and a 2^31-region
 * log's 256 MiB bitmap never has to fit a message.
 *
 * @module
 */

import type { NodeId, Op } from "../log/types.ts";
import { MAX_REGIONS_PER_REQUEST } from "../kernel/protocol.ts";

/** "CLM1" read as a little-endian u32: first four bytes of every cluster message. */
export const MESSAGE_MAGIC = 0x314d4c43;
/** Format version; a daemon refuses messages of any other version (a mixed-version cluster stops). */
export const MESSAGE_VERSION = 1;
/** Bytes of the common header. */
export const HEADER_BYTES = 8;

/**
 * Largest message this daemon sends or accepts. corosync CPG takes about 1 MiB per message
 * (`CPG_MAX_MESSAGE_BYTES`, 1,047,552 bytes); half of it keeps one message from holding the
 * totem token for long while still fitting ~1,000 full batch items or one 256 KiB checkpoint
 * chunk with room to spare.
 */
export const MAX_MESSAGE_BYTES = 512 * 1024;

/**
 * Most items in one batch. The kernel has at most a few hundred requests in flight per machine
 * (one per mirror worker and status thread), so a batch this size empties the queue in one go;
 * bigger would only make one message's processing time longer.
 */
export const MAX_BATCH_ITEMS = 1024;

/** Longest log key in bytes (a dm uuid is at most 128 bytes; the key adds nothing to it). */
export const MAX_KEY_BYTES = 256;

/** Default size of one checkpoint chunk's payload: a 2^24-region log (2 MiB bitmap) is 9 chunks. */
export const CHECKPOINT_CHUNK_BYTES = 256 * 1024;

/**
 * Most chunks one checkpoint may have. 2^31 regions (the largest log) need a 256 MiB sync bitmap
 * plus marks: 2,049 chunks of 256 KiB; the limit leaves room for smaller chunk sizes in tests.
 */
export const MAX_CHECKPOINT_CHUNKS = 1 << 20;

/** Largest region number a message can carry (region counts are below 2^31). */
export const MAX_WIRE_REGION = 0x7fffffff;

/** Largest sequence number of a FLUSH on one log (2^53 - 1: exact in a JS number). */
export const MAX_FLUSH_SEQ = Number.MAX_SAFE_INTEGER;

/** Message kinds (byte 5 of the header). */
export const MessageKind = { BATCH: 1, CHECKPOINT: 2 } as const;

const ITEM_ENTRY = 1;
const ITEM_NACK = 2;
const ITEM_DURABLE = 3;
const ITEM_HOLDS = 4;

/** Most members a "holds" item lists (CPG's own limit on a group's members). */
export const MAX_HOLDS_MEMBERS = 128;

const DURABLE_FAILED = 1;
const DURABLE_FINAL = 2;

/** Opcodes of entry ops on the wire. */
const OPCODES = {
  resume: 1,
  presuspend: 2,
  postsuspend: 3,
  get_region_size: 4,
  is_clean: 5,
  in_sync: 6,
  flush: 7,
  mark: 8,
  clear: 9,
  get_resync_work: 10,
  set_region_sync: 11,
  get_sync_count: 12,
  status_info: 13,
  status_table: 14,
  is_remote_recovering: 15,
  leave: 16,
} as const;

type OpName = keyof typeof OPCODES;
const OP_NAMES: Record<number, OpName> = Object.fromEntries(
  Object.entries(OPCODES).map(([name, code]) => [code, name as OpName]),
);

/**
 * One operation as it travels in the order: a kernel request (without a disk image), or
 * `leave`, which a node sends when its kernel destroys the log (DTR) and which removes it from
 * the log's members at that point in the order.
 */
export type WireOp =
  | Exclude<Op, { op: "resume" } | { op: "disk_failed" }>
  /** `join`: the sender did not hold the log when it sent this (non-holders answer with a nack). */
  | { op: "resume"; join: boolean }
  | { op: "leave" };

/** One item of a batch. */
export type Item =
  /** A request from the sending node's kernel, to apply in the order; `tag` is the sender's. */
  | { kind: "entry"; key: string; tag: number; op: WireOp }
  /** The sender does not hold `key`: it cannot send `joiner` a checkpoint for its RESUME `joinTag`. */
  | { kind: "nack"; key: string; joiner: NodeId; joinTag: number }
  /**
   * The sender (the log's disk writer) made every change up to FLUSH number `seq` durable, or
   * failed to (`failed`). `final`: it wrote its last and has stopped writing this log.
   */
  | { kind: "durable"; key: string; seq: number; failed: boolean; final: boolean }
  /**
   * After a membership change that brought other nodes in: the sender holds `key` with these
   * `members` (ascending). Two disjoint views of one log mean a split brain (see the core).
   */
  | { kind: "holds"; key: string; members: NodeId[] };

/** One piece of a checkpoint for one joiner. */
export interface CheckpointChunk {
  key: string;
  /** The node the checkpoint is for. */
  joiner: NodeId;
  /** The tag of the joiner's RESUME that started the join. */
  joinTag: number;
  /**
   * How many log events after the joiner's RESUME the state was taken at (0: right after it).
   * The joiner replays what it buffered from there on.
   */
  cut: number;
  /** This chunk's index, 0-based. */
  index: number;
  /** Number of chunks. */
  total: number;
  /** A piece of the serialized {@link CheckpointPayload}. */
  payload: Uint8Array;
}

/** A decoded message; `number` is its sender's message counter (modulo 2^16). */
export type Message =
  | { kind: "batch"; number: number; items: Item[] }
  | { kind: "checkpoint"; number: number; chunk: CheckpointChunk };

/** Why a message was refused. */
export interface DecodeError {
  error: string;
  /**
   * Set when the message is a clogd cluster message (its magic is ours) of another format
   * version: the sender runs another clogd release.
   */
  version?: number;
}

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

// ---------------------------------------------------------------------------------------------
// Sizes

function opBytes(op: WireOp): number {
  switch (op.op) {
    case "resume":
      return 2;
    case "is_clean":
    case "in_sync":
    case "is_remote_recovering":
      return 5;
    case "set_region_sync":
      return 6;
    case "flush":
      return 2 + 4 * op.marks.length;
    case "mark":
    case "clear":
      return 2 + 4 * op.regions.length;
    default:
      return 1;
  }
}

/** Encoded size of one item, not counting its key (which sits once in the batch's key table). */
export function itemBytes(item: Item): number {
  switch (item.kind) {
    case "entry":
      return 3 + 4 + opBytes(item.op);
    case "nack":
      return 3 + 8;
    case "durable":
      return 3 + 1 + 8;
    case "holds":
      return 3 + 2 + 4 * item.members.length;
  }
}

function checkMembers(members: readonly NodeId[]): void {
  if (members.length < 1 || members.length > MAX_HOLDS_MEMBERS) {
    throw new RangeError(
      `A holds item lists 1..${MAX_HOLDS_MEMBERS} members, not ${members.length}`,
    );
  }
  for (let i = 0; i < members.length; i++) {
    checkU32("Member", members[i]);
    if (members[i] === 0 || (i > 0 && members[i] <= members[i - 1])) {
      throw new RangeError("Members must be ascending node ids");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding

class Out {
  readonly buf: Uint8Array;
  readonly view: DataView;
  off = 0;
  constructor(size: number) {
    this.buf = new Uint8Array(size);
    this.view = new DataView(this.buf.buffer);
  }
  u8(v: number): void {
    this.buf[this.off++] = v;
  }
  u16(v: number): void {
    this.view.setUint16(this.off, v, true);
    this.off += 2;
  }
  u32(v: number): void {
    this.view.setUint32(this.off, v, true);
    this.off += 4;
  }
  /** A safe integer as u32 high word then u32 low word. */
  u64(v: number): void {
    this.u32(Math.floor(v / 0x1_0000_0000));
    this.u32(v >>> 0);
  }
  bytes(b: Uint8Array): void {
    this.buf.set(b, this.off);
    this.off += b.byteLength;
  }
}

function header(out: Out, kind: number, number: number): void {
  out.u32(MESSAGE_MAGIC);
  out.u8(MESSAGE_VERSION);
  out.u8(kind);
  out.u16(number & 0xffff);
}

function checkRegion(region: number): void {
  if (!Number.isInteger(region) || region < 0 || region > MAX_WIRE_REGION) {
    throw new RangeError(`Region ${region} cannot be sent (0..${MAX_WIRE_REGION})`);
  }
}

function checkU32(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`${name} ${v} is not a u32`);
  }
}

function writeRegions(out: Out, regions: number[]): void {
  if (regions.length > MAX_REGIONS_PER_REQUEST) {
    throw new RangeError(`${regions.length} regions, more than ${MAX_REGIONS_PER_REQUEST}`);
  }
  out.u8(regions.length);
  for (const r of regions) {
    checkRegion(r);
    out.u32(r);
  }
}

function writeOp(out: Out, op: WireOp): void {
  const code = OPCODES[op.op];
  if (code === undefined) throw new RangeError(`Unknown op ${String(op.op)}`);
  out.u8(code);
  switch (op.op) {
    case "resume":
      out.u8(op.join ? 1 : 0);
      return;
    case "is_clean":
    case "in_sync":
    case "is_remote_recovering":
      checkRegion(op.region);
      out.u32(op.region);
      return;
    case "set_region_sync":
      checkRegion(op.region);
      out.u32(op.region);
      out.u8(op.inSync ? 1 : 0);
      return;
    case "flush":
      return writeRegions(out, op.marks);
    case "mark":
    case "clear":
      return writeRegions(out, op.regions);
  }
}

/**
 * Collects items into one batch message within the size and count limits (`tryAdd` refuses an
 * item that would exceed them), then encodes it.
 */
export class BatchBuilder {
  readonly #maxBytes: number;
  readonly #maxItems: number;
  readonly #keys = new Map<string, { index: number; bytes: Uint8Array }>();
  readonly #items: Item[] = [];
  #size = HEADER_BYTES + 2 + 2;

  /** A builder for messages of at most `maxBytes` bytes and `maxItems` items. */
  constructor(options: { maxBytes?: number; maxItems?: number } = {}) {
    this.#maxBytes = options.maxBytes ?? MAX_MESSAGE_BYTES;
    this.#maxItems = options.maxItems ?? MAX_BATCH_ITEMS;
    if (this.#maxBytes < 64 || this.#maxBytes > MAX_MESSAGE_BYTES) {
      throw new RangeError(`Message size limit must be 64..${MAX_MESSAGE_BYTES}`);
    }
    if (this.#maxItems < 1 || this.#maxItems > MAX_BATCH_ITEMS) {
      throw new RangeError(`Batch item limit must be 1..${MAX_BATCH_ITEMS}`);
    }
  }

  /** Items added so far. */
  get count(): number {
    return this.#items.length;
  }

  /** Encoded size so far. */
  get size(): number {
    return this.#size;
  }

  /** Adds `item` if it fits; false (and nothing added) if it would exceed a limit. */
  tryAdd(item: Item): boolean {
    if (this.#items.length >= this.#maxItems) return false;
    let add = itemBytes(item);
    const known = this.#keys.get(item.key);
    let keyBytes: Uint8Array | undefined;
    if (known === undefined) {
      keyBytes = encoder.encode(item.key);
      if (keyBytes.byteLength < 1 || keyBytes.byteLength > MAX_KEY_BYTES) {
        throw new RangeError(`Log key of ${keyBytes.byteLength} bytes (1..${MAX_KEY_BYTES})`);
      }
      add += 2 + keyBytes.byteLength;
    }
    if (this.#size + add > this.#maxBytes) return false;
    if (keyBytes !== undefined) {
      this.#keys.set(item.key, { index: this.#keys.size, bytes: keyBytes });
    }
    this.#items.push(item);
    this.#size += add;
    return true;
  }

  /** The encoded message (at least one item must have been added), numbered `number`. */
  finish(number = 0): Uint8Array {
    if (this.#items.length === 0) throw new Error("An empty batch cannot be sent");
    const out = new Out(this.#size);
    header(out, MessageKind.BATCH, number);
    out.u16(this.#keys.size);
    for (const { bytes } of this.#keys.values()) {
      out.u16(bytes.byteLength);
      out.bytes(bytes);
    }
    out.u16(this.#items.length);
    for (const item of this.#items) {
      const kind = item.kind === "entry"
        ? ITEM_ENTRY
        : item.kind === "nack"
        ? ITEM_NACK
        : item.kind === "durable"
        ? ITEM_DURABLE
        : ITEM_HOLDS;
      out.u8(kind);
      out.u16(this.#keys.get(item.key)!.index);
      switch (item.kind) {
        case "entry":
          checkU32("Tag", item.tag);
          out.u32(item.tag);
          writeOp(out, item.op);
          break;
        case "nack":
          checkU32("Joiner", item.joiner);
          checkU32("Join tag", item.joinTag);
          out.u32(item.joiner);
          out.u32(item.joinTag);
          break;
        case "durable":
          if (!Number.isSafeInteger(item.seq) || item.seq < 0) {
            throw new RangeError(`Flush sequence ${item.seq} is not a safe non-negative integer`);
          }
          out.u8((item.failed ? DURABLE_FAILED : 0) | (item.final ? DURABLE_FINAL : 0));
          out.u64(item.seq);
          break;
        case "holds":
          checkMembers(item.members);
          out.u16(item.members.length);
          for (const m of item.members) out.u32(m);
          break;
      }
    }
    if (out.off !== this.#size) throw new Error(`Batch size mismatch: ${out.off} != ${this.#size}`);
    return out.buf;
  }
}

/** Encodes `items` as one batch (throws RangeError if they do not fit the limits). */
export function encodeBatch(items: readonly Item[]): Uint8Array {
  const b = new BatchBuilder();
  for (const item of items) {
    if (!b.tryAdd(item)) throw new RangeError("Items do not fit one message");
  }
  return b.finish();
}

/** Encodes one checkpoint chunk as message `number`. */
export function encodeCheckpointChunk(chunk: CheckpointChunk, number = 0): Uint8Array {
  const key = encoder.encode(chunk.key);
  if (key.byteLength < 1 || key.byteLength > MAX_KEY_BYTES) {
    throw new RangeError(`Log key of ${key.byteLength} bytes (1..${MAX_KEY_BYTES})`);
  }
  checkU32("Joiner", chunk.joiner);
  checkU32("Join tag", chunk.joinTag);
  checkU32("Cut", chunk.cut);
  if (chunk.total < 1 || chunk.total > MAX_CHECKPOINT_CHUNKS) {
    throw new RangeError(`Checkpoint of ${chunk.total} chunks (1..${MAX_CHECKPOINT_CHUNKS})`);
  }
  if (!Number.isInteger(chunk.index) || chunk.index < 0 || chunk.index >= chunk.total) {
    throw new RangeError(`Chunk index ${chunk.index} outside 0..${chunk.total - 1}`);
  }
  const size = HEADER_BYTES + 2 + key.byteLength + 6 * 4 + chunk.payload.byteLength;
  if (size > MAX_MESSAGE_BYTES) {
    throw new RangeError(`Checkpoint chunk of ${size} bytes is too big`);
  }
  const out = new Out(size);
  header(out, MessageKind.CHECKPOINT, number);
  out.u16(key.byteLength);
  out.bytes(key);
  out.u32(chunk.joiner);
  out.u32(chunk.joinTag);
  out.u32(chunk.cut);
  out.u32(chunk.index);
  out.u32(chunk.total);
  out.u32(chunk.payload.byteLength);
  out.bytes(chunk.payload);
  return out.buf;
}

// ---------------------------------------------------------------------------------------------
// Decoding

class Malformed extends Error {}

class In {
  readonly #buf: Uint8Array;
  readonly #view: DataView;
  off = 0;
  constructor(buf: Uint8Array) {
    this.#buf = buf;
    this.#view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  get remaining(): number {
    return this.#buf.byteLength - this.off;
  }
  #need(n: number, what: string): void {
    if (this.remaining < n) throw new Malformed(`truncated in ${what}`);
  }
  u8(what: string): number {
    this.#need(1, what);
    return this.#buf[this.off++];
  }
  u16(what: string): number {
    this.#need(2, what);
    const v = this.#view.getUint16(this.off, true);
    this.off += 2;
    return v;
  }
  u32(what: string): number {
    this.#need(4, what);
    const v = this.#view.getUint32(this.off, true);
    this.off += 4;
    return v;
  }
  u64(what: string): number {
    const hi = this.u32(what);
    const lo = this.u32(what);
    if (hi >= 0x200000) throw new Malformed(`${what} exceeds 2^53`);
    return hi * 0x1_0000_0000 + lo;
  }
  bytes(n: number, what: string): Uint8Array {
    this.#need(n, what);
    const b = this.#buf.subarray(this.off, this.off + n);
    this.off += n;
    return b;
  }
  key(what: string): string {
    const n = this.u16(what);
    if (n < 1 || n > MAX_KEY_BYTES) throw new Malformed(`${what} of ${n} bytes`);
    try {
      return strictDecoder.decode(this.bytes(n, what));
    } catch (err) {
      if (err instanceof Malformed) throw err;
      throw new Malformed(`${what} is not UTF-8`);
    }
  }
}

function readRegion(r: In, what: string): number {
  const v = r.u32(what);
  if (v > MAX_WIRE_REGION) throw new Malformed(`${what} ${v} out of range`);
  return v;
}

function readRegions(r: In, what: string): number[] {
  const n = r.u8(`${what} count`);
  if (n > MAX_REGIONS_PER_REQUEST) throw new Malformed(`${n} regions in ${what}`);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) out[i] = readRegion(r, what);
  return out;
}

function readOp(r: In): WireOp {
  const code = r.u8("opcode");
  const name = OP_NAMES[code];
  switch (name) {
    case "resume": {
      const flags = r.u8("resume flags");
      if (flags > 1) throw new Malformed(`resume flags ${flags}`);
      return { op: "resume", join: flags === 1 };
    }
    case "is_clean":
    case "in_sync":
    case "is_remote_recovering":
      return { op: name, region: readRegion(r, "region") };
    case "set_region_sync": {
      const region = readRegion(r, "region");
      const v = r.u8("in_sync flag");
      if (v > 1) throw new Malformed(`in_sync flag ${v}`);
      return { op: "set_region_sync", region, inSync: v === 1 };
    }
    case "flush":
      return { op: "flush", marks: readRegions(r, "flush") };
    case "mark":
    case "clear":
      return { op: name, regions: readRegions(r, name) };
    case "presuspend":
    case "postsuspend":
    case "get_region_size":
    case "get_resync_work":
    case "get_sync_count":
    case "status_info":
    case "status_table":
    case "leave":
      return { op: name };
    default:
      throw new Malformed(`unknown opcode ${code}`);
  }
}

function readBatch(r: In, number: number): Message {
  const keyCount = r.u16("key count");
  if (keyCount < 1 || keyCount > MAX_BATCH_ITEMS) throw new Malformed(`${keyCount} keys`);
  const keys: string[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < keyCount; i++) {
    const key = r.key("key");
    if (seen.has(key)) throw new Malformed("duplicate key");
    seen.add(key);
    keys.push(key);
  }
  const itemCount = r.u16("item count");
  if (itemCount < 1 || itemCount > MAX_BATCH_ITEMS) throw new Malformed(`${itemCount} items`);
  const items: Item[] = [];
  // Keys are used in table order (the encoder adds them as items first use them), and every key
  // is used: the accepted encoding of a batch is unique.
  let used = 0;
  for (let i = 0; i < itemCount; i++) {
    const kind = r.u8("item kind");
    const ki = r.u16("key index");
    if (ki > used || ki >= keyCount) throw new Malformed(`key index ${ki} out of order`);
    if (ki === used) used++;
    const key = keys[ki];
    switch (kind) {
      case ITEM_ENTRY: {
        const tag = r.u32("tag");
        items.push({ kind: "entry", key, tag, op: readOp(r) });
        break;
      }
      case ITEM_NACK:
        items.push({ kind: "nack", key, joiner: r.u32("joiner"), joinTag: r.u32("join tag") });
        break;
      case ITEM_DURABLE: {
        const flags = r.u8("durable flags");
        if ((flags & ~(DURABLE_FAILED | DURABLE_FINAL)) !== 0) {
          throw new Malformed(`durable flags ${flags}`);
        }
        const seq = r.u64("flush sequence");
        items.push({
          kind: "durable",
          key,
          seq,
          failed: (flags & DURABLE_FAILED) !== 0,
          final: (flags & DURABLE_FINAL) !== 0,
        });
        break;
      }
      case ITEM_HOLDS: {
        const count = r.u16("member count");
        if (count < 1 || count > MAX_HOLDS_MEMBERS) throw new Malformed(`${count} members`);
        const members: NodeId[] = [];
        for (let m = 0; m < count; m++) {
          const node = r.u32("member");
          if (node === 0 || (m > 0 && node <= members[m - 1])) {
            throw new Malformed("members not ascending node ids");
          }
          members.push(node);
        }
        items.push({ kind: "holds", key, members });
        break;
      }
      default:
        throw new Malformed(`unknown item kind ${kind}`);
    }
  }
  if (used !== keyCount) throw new Malformed(`${keyCount - used} keys unused`);
  return { kind: "batch", number, items };
}

function readChunk(r: In, number: number): Message {
  const key = r.key("key");
  const joiner = r.u32("joiner");
  const joinTag = r.u32("join tag");
  const cut = r.u32("cut");
  const index = r.u32("chunk index");
  const total = r.u32("chunk total");
  if (total < 1 || total > MAX_CHECKPOINT_CHUNKS) throw new Malformed(`${total} chunks`);
  if (index >= total) throw new Malformed(`chunk ${index} of ${total}`);
  const n = r.u32("payload length");
  if (n !== r.remaining) throw new Malformed(`payload length ${n}, ${r.remaining} bytes left`);
  const payload = r.bytes(n, "payload");
  return {
    kind: "checkpoint",
    number,
    chunk: { key, joiner, joinTag, cut, index, total, payload },
  };
}

/**
 * Decodes one delivered message, or says why it is malformed. Never throws. The payload of a
 * checkpoint chunk is a view into `bytes`.
 */
export function decodeMessage(bytes: Uint8Array): Message | DecodeError {
  try {
    if (!(bytes instanceof Uint8Array)) return { error: "not a byte array" };
    if (bytes.byteLength > MAX_MESSAGE_BYTES) {
      return { error: `${bytes.byteLength} bytes, more than ${MAX_MESSAGE_BYTES}` };
    }
    const r = new In(bytes);
    const magic = r.u32("header");
    if (magic !== MESSAGE_MAGIC) return { error: `bad magic 0x${magic.toString(16)}` };
    const version = r.u8("header");
    if (version !== MESSAGE_VERSION) return { error: `unknown version ${version}`, version };
    const kind = r.u8("header");
    const number = r.u16("header");
    let msg: Message;
    if (kind === MessageKind.BATCH) msg = readBatch(r, number);
    else if (kind === MessageKind.CHECKPOINT) msg = readChunk(r, number);
    else return { error: `unknown message kind ${kind}` };
    if (r.remaining !== 0) return { error: `${r.remaining} bytes after the end` };
    return msg;
  } catch (err) {
    if (err instanceof Malformed) return { error: err.message };
    return { error: `decoder failure: ${err instanceof Error ? err.message : String(err)}` };
  }
}

/** True when {@link decodeMessage} or {@link decodeCheckpointPayload} refused its input. */
export function isDecodeError<T extends object>(m: T | DecodeError): m is DecodeError {
  return "error" in m;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint payload: the cluster's per-log state, then the replica's own checkpoint.

/** "CLCS" as a little-endian u32. */
const PAYLOAD_MAGIC = 0x53434c43;
const PAYLOAD_VERSION = 1;

/** A join in progress, as every member records it (see the core). */
export interface JoinRecord {
  joiner: NodeId;
  /** Tag of the joiner's RESUME. */
  tag: number;
  /** Member that sends the checkpoint (0: none can). */
  sender: NodeId;
  /** Events after the RESUME at which the sender takes the state. */
  cut: number;
  /** Events of this log since the RESUME. */
  count: number;
  /** The RESUME's result on the members (0, or the errno the joiner answers its kernel). */
  errno: number;
}

/** What a checkpoint carries besides the replica. */
export interface CheckpointPayload {
  /** Result of the joiner's RESUME on the members; nonzero: no state follows. */
  errno: number;
  /** Disk writer (0: none, or a core log). */
  writer: NodeId;
  /** Previous writer still finishing its writes (0: none). */
  handoffFrom: NodeId;
  /** FLUSHes of this log applied so far. */
  flushSeq: number;
  /** Highest FLUSH reported durable. */
  durableSeq: number;
  /** Joins in progress, by joiner ascending. */
  joins: JoinRecord[];
  /** `LogReplica.checkpoint()` bytes, concatenated (empty when `errno` is nonzero). */
  replica: Uint8Array;
}

/** Serializes a checkpoint payload (split it into chunks for the wire). */
export function encodeCheckpointPayload(p: CheckpointPayload): Uint8Array {
  const size = 4 * 4 + 4 * 2 + 8 * 2 + 4 + p.joins.length * 24 + 4 + p.replica.byteLength;
  const out = new Out(size);
  out.u32(PAYLOAD_MAGIC);
  out.u32(PAYLOAD_VERSION);
  out.u32(p.errno);
  out.u32(p.writer);
  out.u32(p.handoffFrom);
  out.u32(0);
  out.u64(p.flushSeq);
  out.u64(p.durableSeq);
  out.u32(p.joins.length);
  for (const j of p.joins) {
    out.u32(j.joiner);
    out.u32(j.tag);
    out.u32(j.sender);
    out.u32(j.cut);
    out.u32(j.count);
    out.u32(j.errno);
  }
  out.u32(p.replica.byteLength);
  out.bytes(p.replica);
  if (out.off !== size) throw new Error(`Checkpoint payload size mismatch: ${out.off} != ${size}`);
  return out.buf;
}

/** Parses a checkpoint payload, or says why it is malformed. Never throws. */
export function decodeCheckpointPayload(bytes: Uint8Array): CheckpointPayload | DecodeError {
  try {
    const r = new In(bytes);
    if (r.u32("payload magic") !== PAYLOAD_MAGIC) return { error: "bad payload magic" };
    const version = r.u32("payload version");
    if (version !== PAYLOAD_VERSION) return { error: `unknown payload version ${version}` };
    const errno = r.u32("errno");
    const writer = r.u32("writer");
    const handoffFrom = r.u32("handoff");
    if (r.u32("reserved") !== 0) return { error: "reserved payload word set" };
    const flushSeq = r.u64("flush sequence");
    const durableSeq = r.u64("durable sequence");
    if (durableSeq > flushSeq) return { error: "durable sequence beyond flush sequence" };
    const joinCount = r.u32("join count");
    if (joinCount * 24 > r.remaining) return { error: "truncated in joins" };
    const joins: JoinRecord[] = [];
    let last = -1;
    for (let i = 0; i < joinCount; i++) {
      const j: JoinRecord = {
        joiner: r.u32("joiner"),
        tag: r.u32("join tag"),
        sender: r.u32("sender"),
        cut: r.u32("cut"),
        count: r.u32("count"),
        errno: r.u32("errno"),
      };
      if (j.joiner <= last || j.cut > j.count) return { error: "bad join record" };
      last = j.joiner;
      joins.push(j);
    }
    const n = r.u32("replica length");
    if (n !== r.remaining) return { error: `replica length ${n}, ${r.remaining} bytes left` };
    const replica = r.bytes(n, "replica");
    if (errno !== 0 && n !== 0) return { error: "state after a refused resume" };
    return { errno, writer, handoffFrom, flushSeq, durableSeq, joins, replica };
  } catch (err) {
    if (err instanceof Malformed) return { error: err.message };
    return { error: `decoder failure: ${err instanceof Error ? err.message : String(err)}` };
  }
}
