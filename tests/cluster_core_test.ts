// Unit tests of the cluster core (src/cluster/core.ts) and its wire format (messages.ts).
// Single-node behavior drives a ClusterCore directly; multi-node behavior uses the simulator's
// harness (tests/sim/harness.ts: CPG-like bus, shared disks, invariant checks on every event).
import assert from "node:assert/strict";
import {
  ClusterCore,
  type ClusterRequest,
  CONNECT_HOLD_TICKS,
  type Effect,
  MAX_INFLIGHT_MESSAGES,
} from "../src/cluster/core.ts";
import {
  BatchBuilder,
  CHECKPOINT_CHUNK_BYTES,
  decodeCheckpointPayload,
  decodeMessage,
  encodeBatch,
  encodeCheckpointChunk,
  encodeCheckpointPayload,
  isDecodeError,
  type Item,
  MAX_BATCH_ITEMS,
  MAX_KEY_BYTES,
  MAX_MESSAGE_BYTES,
  type Message,
} from "../src/cluster/messages.ts";
import { Errno } from "../src/kernel/protocol.ts";
import { isCtrError, parseCtr } from "../src/log/ctr.ts";
import { readS64, readU64 } from "../src/log/ops.ts";
import type { LogConfig, Op, OpResult } from "../src/log/types.ts";
import { Prng } from "../src/sim/prng.ts";
import { ClusterHarness } from "./sim/harness.ts";

// ---- helpers ----

function config(regions: number, kind: "core" | "disk" = "core", sync = "nosync"): LogConfig {
  const words = [String(regions * 1024), `clustered-${kind}`];
  if (kind === "disk") words.push("253:3");
  words.push("1024");
  if (sync !== "") words.push(sync);
  const args = parseCtr(words.join(" "));
  if (isCtrError(args)) throw new Error(args.error);
  return { ...args, uuid: "L", luid: 1n };
}

const ALL_ITEMS: Item[] = [
  { kind: "entry", key: "a", tag: 1, op: { op: "resume", join: true } },
  { kind: "entry", key: "a", tag: 2, op: { op: "resume", join: false } },
  { kind: "entry", key: "b", tag: 3, op: { op: "presuspend" } },
  { kind: "entry", key: "a", tag: 4, op: { op: "postsuspend" } },
  { kind: "entry", key: "a", tag: 5, op: { op: "get_region_size" } },
  { kind: "entry", key: "a", tag: 6, op: { op: "is_clean", region: 7 } },
  { kind: "entry", key: "a", tag: 7, op: { op: "in_sync", region: 0x7fffffff } },
  { kind: "entry", key: "a", tag: 8, op: { op: "flush", marks: [] } },
  { kind: "entry", key: "a", tag: 9, op: { op: "flush", marks: [1, 2, 3] } },
  {
    kind: "entry",
    key: "b",
    tag: 10,
    op: { op: "mark", regions: Array.from({ length: 32 }, (_, i) => i * 1000) },
  },
  { kind: "entry", key: "b", tag: 11, op: { op: "clear", regions: [5] } },
  { kind: "entry", key: "a", tag: 12, op: { op: "get_resync_work" } },
  { kind: "entry", key: "a", tag: 13, op: { op: "set_region_sync", region: 9, inSync: true } },
  { kind: "entry", key: "a", tag: 14, op: { op: "set_region_sync", region: 9, inSync: false } },
  { kind: "entry", key: "a", tag: 15, op: { op: "get_sync_count" } },
  { kind: "entry", key: "a", tag: 16, op: { op: "status_info" } },
  { kind: "entry", key: "a", tag: 17, op: { op: "status_table" } },
  { kind: "entry", key: "a", tag: 0xffffffff, op: { op: "is_remote_recovering", region: 3 } },
  { kind: "entry", key: "a", tag: 0, op: { op: "leave" } },
  { kind: "nack", key: "ü-uuid", joiner: 0xfffffffe, joinTag: 42 },
  { kind: "durable", key: "b", seq: 2 ** 52 + 7, failed: true, final: false },
  { kind: "durable", key: "b", seq: 0, failed: false, final: true },
];

function sampleChunk() {
  return encodeCheckpointChunk({
    key: "log-key",
    joiner: 3,
    joinTag: 77,
    cut: 5,
    index: 1,
    total: 4,
    payload: new Uint8Array([9, 8, 7, 6, 5]),
  }, 300);
}

/** Re-encodes a decoded message. */
function reencode(m: Message): Uint8Array {
  if (m.kind === "checkpoint") return encodeCheckpointChunk(m.chunk, m.number);
  const b = new BatchBuilder();
  for (const item of m.items) assert.ok(b.tryAdd(item));
  return b.finish(m.number);
}

function replies(effects: Effect[]): Map<number, OpResult> {
  const out = new Map<number, OpResult>();
  for (const e of effects) {
    if (e.kind === "reply") {
      assert.ok(!out.has(e.tag), `two replies to ${e.tag}`);
      out.set(e.tag, e.result);
    }
  }
  return out;
}

function mcasts(effects: Effect[]): Uint8Array[] {
  return effects.filter((e) => e.kind === "mcast").map((e) => (e as { bytes: Uint8Array }).bytes);
}

/** A core alone in its group, with its messages looped back in order. */
class Solo {
  readonly core: ClusterCore;
  readonly answers = new Map<number, OpResult>();
  readonly writes: Extract<Effect, { kind: "diskWrite" }>[] = [];
  readonly logs: string[] = [];
  nextTag = 1;
  #bus: Uint8Array[] = [];

  constructor(options: ConstructorParameters<typeof ClusterCore>[1] = {}) {
    this.core = new ClusterCore(1, options);
    this.take(this.core.confchg({ members: [1], left: [], joined: [1] }));
  }

  take(effects: Effect[]): Effect[] {
    for (const e of effects) {
      if (e.kind === "reply") {
        assert.ok(!this.answers.has(e.tag), `a second reply to ${e.tag}`);
        this.answers.set(e.tag, e.result);
      } else if (e.kind === "mcast") this.#bus.push(e.bytes);
      else if (e.kind === "diskWrite") this.writes.push(e);
      else this.logs.push(`${e.level}: ${e.msg}`);
    }
    return effects;
  }

  request(cfg: LogConfig, op: ClusterRequest["op"]): number {
    const tag = this.nextTag++;
    this.take(this.core.request({ key: cfg.uuid, tag, op, config: cfg }));
    return tag;
  }

  /** Flush and loop every message back until quiet; returns how many were multicast. */
  run(): number {
    let n = 0;
    this.take(this.core.flush());
    while (this.#bus.length > 0) {
      n++;
      this.take(this.core.deliver(1, this.#bus.shift()!));
    }
    return n;
  }

  get queued(): number {
    return this.#bus.length;
  }

  deliverOne(): void {
    this.take(this.core.deliver(1, this.#bus.shift()!));
  }
}

function value(r: OpResult | undefined): number {
  assert.ok(r !== undefined, "no reply");
  assert.equal(r.errno, 0, r.reason);
  return readS64(r.data!);
}

// ---- messages ----

Deno.test("encodeBatch() and decodeMessage() round-trip every item kind and op", () => {
  const bytes = encodeBatch(ALL_ITEMS);
  const m = decodeMessage(bytes);
  assert.ok(!isDecodeError(m), isDecodeError(m) ? m.error : "");
  assert.equal(m.kind, "batch");
  assert.deepEqual(m.kind === "batch" ? m.items : [], ALL_ITEMS);
  assert.deepEqual(reencode(m), bytes);
});

Deno.test("decodeMessage() refuses every truncation of a valid batch and of a chunk", () => {
  for (const good of [encodeBatch(ALL_ITEMS), sampleChunk()]) {
    for (let n = 0; n < good.byteLength; n++) {
      const m = decodeMessage(good.subarray(0, n));
      assert.ok(isDecodeError(m), `a ${n}-byte prefix of ${good.byteLength} was accepted`);
    }
    const longer = new Uint8Array(good.byteLength + 1);
    longer.set(good);
    assert.ok(isDecodeError(decodeMessage(longer)), "a trailing byte was accepted");
  }
});

Deno.test("decodeMessage() never throws, and what it accepts re-encodes to the same bytes", () => {
  const rng = new Prng(20240601);
  const goods = [encodeBatch(ALL_ITEMS), sampleChunk(), encodeBatch(ALL_ITEMS.slice(0, 3))];
  let accepted = 0;
  let refused = 0;
  for (let i = 0; i < 30_000; i++) {
    let bytes: Uint8Array;
    if (i % 3 === 0) {
      bytes = new Uint8Array(rng.int(80));
      for (let j = 0; j < bytes.length; j++) bytes[j] = rng.int(256);
    } else {
      bytes = goods[rng.int(goods.length)].slice();
      const flips = 1 + rng.int(3);
      for (let k = 0; k < flips; k++) bytes[rng.int(bytes.length)] = rng.int(256);
    }
    const m = decodeMessage(bytes);
    if (isDecodeError(m)) {
      refused++;
      continue;
    }
    accepted++;
    assert.deepEqual(reencode(m), bytes, "an accepted message is not canonical");
  }
  assert.ok(refused > 10_000 && accepted > 100, `${refused} refused, ${accepted} accepted`);
});

Deno.test("decodeMessage() refuses bad magic, version, kind, unused keys and out-of-order keys", () => {
  const good = encodeBatch([{ kind: "entry", key: "k", tag: 1, op: { op: "leave" } }]);
  for (const [offset, value] of [[0, 0], [4, 2], [5, 3]]) {
    const bad = good.slice();
    bad[offset] = value;
    assert.ok(isDecodeError(decodeMessage(bad)), `byte ${offset} = ${value} accepted`);
  }
  // A key table entry no item uses: build by hand (header, 2 keys, 1 item using key 0).
  const unused = new Uint8Array([
    ...good.subarray(0, 8),
    2,
    0,
    1,
    0,
    0x6b,
    1,
    0,
    0x6a,
    ...good.subarray(12),
  ]);
  assert.ok(isDecodeError(decodeMessage(unused)), "an unused key was accepted");
  // The same keys, the first item using the second key first.
  const ab = encodeBatch([
    { kind: "entry", key: "a", tag: 1, op: { op: "leave" } },
    { kind: "entry", key: "b", tag: 2, op: { op: "leave" } },
  ]);
  const m = decodeMessage(ab);
  assert.ok(!isDecodeError(m));
  const swapped = ab.slice();
  // Items start after header (8) + count (2) + two 1-byte keys (6) + item count (2).
  const first = 18, second = first + 3 + 4 + 1;
  swapped[first + 1] = 1;
  swapped[second + 1] = 0;
  assert.ok(isDecodeError(decodeMessage(swapped)), "keys used out of table order were accepted");
});

Deno.test("BatchBuilder stops at the byte and item limits and refuses what cannot travel", () => {
  const big = new BatchBuilder({ maxBytes: 1000 });
  const item: Item = {
    kind: "entry",
    key: "k",
    tag: 1,
    op: { op: "mark", regions: new Array(32).fill(7) },
  };
  let n = 0;
  while (big.tryAdd(item)) n++;
  assert.ok(n > 5 && n < 10, `${n} items of 137 bytes in 1000`);
  assert.ok(big.finish().byteLength <= 1000);
  const few = new BatchBuilder({ maxItems: 3 });
  for (let i = 0; i < 3; i++) assert.ok(few.tryAdd(item));
  assert.equal(few.tryAdd(item), false);
  const full = new BatchBuilder();
  for (let i = 0; i < MAX_BATCH_ITEMS; i++) assert.ok(full.tryAdd(item));
  assert.equal(full.tryAdd(item), false);
  assert.ok(full.finish().byteLength <= MAX_MESSAGE_BYTES);
  assert.throws(
    () => new BatchBuilder().tryAdd({ ...item, key: "x".repeat(MAX_KEY_BYTES + 1) }),
    RangeError,
  );
  assert.throws(
    () =>
      encodeBatch([{ kind: "entry", key: "k", tag: 1, op: { op: "in_sync", region: 2 ** 31 } }]),
    RangeError,
  );
  assert.throws(() => new BatchBuilder().finish(), Error);
});

Deno.test("encodeCheckpointPayload() round-trips; decodeCheckpointPayload() refuses damage", () => {
  const p = {
    errno: 0,
    writer: 2,
    handoffFrom: 3,
    flushSeq: 2 ** 40,
    durableSeq: 2 ** 40 - 5,
    joins: [
      { joiner: 4, tag: 9, sender: 2, cut: 3, count: 8, errno: 0 },
      { joiner: 7, tag: 1, sender: 2, cut: 0, count: 0, errno: 22 },
    ],
    replica: new Uint8Array([1, 2, 3]),
  };
  const bytes = encodeCheckpointPayload(p);
  assert.deepEqual(decodeCheckpointPayload(bytes), p);
  for (let n = 0; n < bytes.byteLength; n++) {
    assert.ok(isDecodeError(decodeCheckpointPayload(bytes.subarray(0, n))), `prefix ${n} accepted`);
  }
  const beyond = encodeCheckpointPayload({ ...p, durableSeq: p.flushSeq + 1 });
  assert.ok(isDecodeError(decodeCheckpointPayload(beyond)));
});

// ---- one node ----

Deno.test("request() alone in the group: RESUME initializes the log, requests answer once each", () => {
  const s = new Solo();
  const cfg = config(64, "core", "");
  const resume = s.request(cfg, { op: "resume" });
  const mark = s.request(cfg, { op: "mark", regions: [3, 4] });
  assert.equal(s.answers.size, 0, "answered before its turn in the order");
  s.run();
  assert.equal(s.answers.get(resume)?.errno, 0);
  assert.equal(s.answers.get(mark)?.errno, 0);
  assert.equal(s.core.logStatus("L"), "member");
  assert.deepEqual(s.core.replica("L")!.marksOf(1), [3, 4]);
  assert.ok(s.logs.some((l) => l.includes("initialized here")));
  const clean = s.request(cfg, { op: "is_clean", region: 3 });
  s.run();
  assert.equal(value(s.answers.get(clean)), 0);
  assert.equal(s.core.pendingCount, 0);
});

Deno.test("flush() sends a burst of requests as one message, at most the window in flight", () => {
  const s = new Solo({ maxInflightMessages: 2 });
  const cfg = config(1024);
  s.request(cfg, { op: "resume" });
  s.run();
  const before = s.core.stats.messagesSent;
  const tags: number[] = [];
  for (let i = 0; i < 500; i++) tags.push(s.request(cfg, { op: "mark", regions: [i] }));
  assert.equal(s.core.stats.messagesSent, before, "request() sent something");
  assert.equal(mcasts(s.take(s.core.flush())).length, 1);
  assert.equal(mcasts(s.take(s.core.flush())).length, 0, "flush() sent the queue twice");
  s.run();
  for (const t of tags) assert.equal(s.answers.get(t)?.errno, 0);
  // Three bursts while nothing comes back: two messages, the third waits for the window.
  const base = s.core.stats.messagesSent;
  for (let b = 0; b < 3; b++) {
    s.request(cfg, { op: "clear", regions: [b] });
    s.take(s.core.flush());
  }
  assert.equal(s.core.stats.messagesSent - base, 2);
  assert.equal(s.core.inflight, 2);
  s.deliverOne();
  assert.equal(s.core.stats.messagesSent - base, 3, "the window opened: the queue goes out");
  s.run();
  assert.equal(s.core.pendingCount, 0);
});

Deno.test("request() answers IN_SYNC and GET_SYNC_COUNT from the replica without a message", () => {
  const s = new Solo();
  const cfg = config(16);
  s.request(cfg, { op: "resume" });
  s.run();
  const sent = s.core.stats.messagesSent;
  const q = s.request(cfg, { op: "in_sync", region: 2 });
  const c = s.request(cfg, { op: "get_sync_count" });
  assert.equal(value(s.answers.get(q)), 1);
  assert.equal(readU64(s.answers.get(c)!.data!), 16);
  assert.equal(s.run(), 0);
  assert.equal(s.core.stats.messagesSent, sent);
});

Deno.test("request() answers GET_REGION_SIZE and refuses bad regions even with no connection", () => {
  const core = new ClusterCore(5);
  const cfg = config(16);
  const size = replies(
    core.request({ key: "L", tag: 1, op: { op: "get_region_size" }, config: cfg }),
  );
  assert.equal(readU64(size.get(1)!.data!), 1024);
  const bad = replies(
    core.request({ key: "L", tag: 2, op: { op: "in_sync", region: 16 }, config: cfg }),
  );
  assert.equal(bad.get(2)?.errno, Errno.EINVAL);
  const badConfig = replies(
    core.request({ key: "M", tag: 3, op: { op: "resume" }, config: { ...cfg, regionCount: 0 } }),
  );
  assert.equal(badConfig.get(3)?.errno, Errno.EINVAL);
});

Deno.test("disconnected(): requests are held, then answered -ESRCH (DTR 0), never from the replica", () => {
  const s = new Solo();
  const cfg = config(16);
  s.request(cfg, { op: "resume" });
  s.run();
  const queued = s.request(cfg, { op: "mark", regions: [1] });
  s.take(s.core.disconnected());
  const later = s.request(cfg, { op: "in_sync", region: 1 });
  const dtr = s.request(cfg, { op: "dtr" });
  for (let i = 0; i < CONNECT_HOLD_TICKS - 1; i++) s.take(s.core.tick());
  for (const t of [queued, later, dtr]) {
    assert.ok(!s.answers.has(t), "answered before the hold ran out");
  }
  assert.equal(s.core.replica("L"), undefined, "the stale replica is still served");
  s.take(s.core.tick());
  assert.equal(s.answers.get(queued)?.errno, Errno.ESRCH);
  assert.equal(s.answers.get(later)?.errno, Errno.ESRCH);
  assert.equal(s.answers.get(dtr)?.errno, 0);
  assert.equal(s.core.pendingCount, 0);
  // Back in the group: the log must be resumed again (the kernel does so after -ESRCH).
  s.take(s.core.confchg({ members: [1], left: [], joined: [1] }));
  const again = s.request(cfg, { op: "in_sync", region: 1 });
  assert.equal(s.answers.get(again)?.errno, Errno.ESRCH);
  const resume = s.request(cfg, { op: "resume" });
  s.run();
  assert.equal(s.answers.get(resume)?.errno, 0);
  assert.deepEqual(s.core.replica("L")!.marksOf(1), []);
});

Deno.test("request() with a tag already waiting is dropped with a log line, not answered twice", () => {
  const s = new Solo();
  const cfg = config(16);
  s.take(s.core.request({ key: "L", tag: 9, op: { op: "resume" }, config: cfg }));
  const effects = s.take(s.core.request({ key: "L", tag: 9, op: { op: "resume" }, config: cfg }));
  assert.equal(replies(effects).size, 0);
  assert.ok(s.logs.some((l) => l.includes("already waiting")));
  s.run();
  assert.equal(s.answers.get(9)?.errno, 0);
});

Deno.test("a disk log's FLUSH is answered once its write is durable, one write in flight", () => {
  const s = new Solo();
  const cfg = config(64, "disk");
  s.request(cfg, { op: "resume" });
  s.run();
  assert.equal(s.writes.length, 1);
  assert.equal(s.writes[0].full, true, "a new writer first rewrites the whole log");
  s.take(s.core.diskDurable("L", s.writes[0].token));
  s.run();
  const f = s.request(cfg, { op: "flush", marks: [5] });
  s.run();
  assert.equal(s.answers.get(f), undefined, "answered before the write was durable");
  assert.equal(s.writes.length, 2);
  const w = s.writes[1];
  assert.equal(w.full, false);
  assert.deepEqual(w.changes.words, [0]);
  assert.equal(w.bytes[0] & (1 << 5), 0, "region 5 is written dirty");
  assert.equal(w.sync, true, "a write that dirties a region is synced");
  const g = s.request(cfg, { op: "flush", marks: [40] });
  s.run();
  assert.equal(s.writes.length, 2, "a second write while one is in flight");
  s.take(s.core.diskDurable("L", w.token));
  // The writer answers its own FLUSH at once; other members wait for its "durable" message.
  assert.equal(s.answers.get(f)?.errno, 0);
  s.run();
  assert.equal(s.answers.get(g), undefined);
  assert.equal(s.writes.length, 3);
  s.take(s.core.diskFailed("L", s.writes[2].token, "EIO from the device"));
  s.run();
  assert.equal(s.answers.get(g)?.errno, Errno.EIO);
  assert.equal(s.core.replica("L")!.diskFailed, true);
});

Deno.test("a clean-only write skips the sync; a disk log's POSTSUSPEND waits for the disk", () => {
  const s = new Solo();
  const cfg = config(64, "disk");
  s.request(cfg, { op: "resume" });
  s.run();
  s.take(s.core.diskDurable("L", s.writes[0].token));
  s.run();
  s.request(cfg, { op: "flush", marks: [7] });
  s.run();
  assert.equal(s.writes.at(-1)!.sync, true);
  s.take(s.core.diskDurable("L", s.writes.at(-1)!.token));
  s.run();
  s.request(cfg, { op: "clear", regions: [7] });
  const f = s.request(cfg, { op: "flush", marks: [] });
  s.run();
  const clean = s.writes.at(-1)!;
  assert.equal(clean.sync, false, "only clean bits changed: written, not synced");
  assert.equal((clean.bytes[0] >> 7) & 1, 1, "region 7 is written clean");
  s.take(s.core.diskDurable("L", clean.token));
  s.run();
  assert.equal(s.answers.get(f)?.errno, 0);
  s.request(cfg, { op: "flush", marks: [9] });
  s.run();
  s.take(s.core.diskDurable("L", s.writes.at(-1)!.token));
  s.run();
  s.request(cfg, { op: "clear", regions: [9] });
  s.run();
  const writes = s.writes.length;
  const p = s.request(cfg, { op: "postsuspend" });
  s.run();
  assert.equal(s.answers.get(p), undefined, "POSTSUSPEND waits for the disk");
  assert.equal(s.writes.length, writes + 1, "the suspended log is written out");
  assert.equal((s.writes.at(-1)!.bytes[1] >> 1) & 1, 1, "region 9 (cleared) is written clean");
  s.take(s.core.diskDurable("L", s.writes.at(-1)!.token));
  s.run();
  assert.equal(s.answers.get(p)?.errno, 0);
});

Deno.test("deliver() drops messages of another clogd release, saying so per node, not per message", () => {
  const s = new Solo();
  const cfg = config(16);
  s.request(cfg, { op: "resume" });
  s.run();
  const digest = s.core.digest("L");
  const logsBefore = s.logs.length;
  // A header like ours (magic "CLM1", kind batch) with format version 2, then some body.
  const foreign = new Uint8Array(24);
  const view = new DataView(foreign.buffer);
  view.setUint32(0, 0x314d4c43, true);
  foreign[4] = 2;
  foreign[5] = 1;
  for (let i = 0; i < 3000; i++) s.take(s.core.deliver(2, foreign));
  s.take(s.core.deliver(3, foreign));
  assert.equal(s.core.stats.foreignVersion, 3001);
  assert.equal(s.core.stats.malformed, 0, "not counted as malformed");
  assert.equal(s.core.digest("L"), digest);
  const lines = s.logs.slice(logsBefore);
  // Node 2: its first, 1,024th and 2,048th; node 3: its first.
  assert.equal(lines.length, 4, lines.join("\n"));
  assert.match(
    lines[0],
    /Node 2 runs a clogd that speaks cluster message version 2; this one speaks 1/,
  );
  assert.match(lines[0], /same clogd release/);
  assert.match(lines[3], /Node 3 runs/);
  // The log still works.
  const m = s.request(cfg, { op: "mark", regions: [1] });
  s.run();
  assert.equal(s.answers.get(m)?.errno, 0);
});

Deno.test("deliver() drops malformed messages with a log line and changes nothing", () => {
  const s = new Solo();
  const cfg = config(16);
  s.request(cfg, { op: "resume" });
  s.run();
  const digest = s.core.digest("L");
  const rng = new Prng(7);
  for (let i = 0; i < 200; i++) {
    const junk = new Uint8Array(rng.int(40));
    for (let j = 0; j < junk.length; j++) junk[j] = rng.int(256);
    s.take(s.core.deliver(2, junk));
  }
  assert.equal(s.core.stats.malformed, 200);
  assert.equal(s.core.digest("L"), digest);
  assert.ok(s.logs.some((l) => l.includes("malformed")));
  assert.ok(s.logs.length < 40, "every malformed message logged one by one");
  // Not bytes at all: still no exception.
  assert.doesNotThrow(() => s.core.deliver(2, null as unknown as Uint8Array));
  const m = s.request(cfg, { op: "mark", regions: [1] });
  s.run();
  assert.equal(s.answers.get(m)?.errno, 0);
});

// ---- several nodes ----

function harness(options: ConstructorParameters<typeof ClusterHarness>[0] = {}) {
  return new ClusterHarness({ throwOnViolation: true, ...options });
}

function send(
  h: ClusterHarness,
  id: number,
  op: Op | { op: "dtr" },
  key = "L",
): () => OpResult | undefined {
  let got: OpResult | undefined;
  h.request(id, key, op, (r) => (got = r));
  return () => got;
}

Deno.test("a 2^24-region log's checkpoint travels in chunks under the message limit", () => {
  const h = harness();
  const cfg = config(1 << 24, "core", "");
  h.addLog("L", { ...cfg, uuid: "L" });
  h.start(1);
  h.start(2);
  h.deliverAll();
  send(h, 1, { op: "resume" });
  h.deliverAll();
  send(h, 1, { op: "mark", regions: [5, 1 << 23] });
  send(h, 1, { op: "set_region_sync", region: 7, inSync: true });
  h.deliverAll();
  const sizes: number[] = [];
  let chunks = 0;
  h.onEffect = (_n, e) => {
    if (e.kind !== "mcast") return;
    sizes.push(e.bytes.byteLength);
    const m = decodeMessage(e.bytes);
    if (!isDecodeError(m) && m.kind === "checkpoint") chunks++;
  };
  const t0 = performance.now();
  const r = send(h, 2, { op: "resume" });
  h.deliverAll();
  const ms = performance.now() - t0;
  assert.equal(r()?.errno, 0);
  assert.ok(chunks >= 9, `${chunks} chunks for a 2 MiB bitmap and the rest`);
  assert.ok(sizes.filter((n) => n > CHECKPOINT_CHUNK_BYTES).length >= 8);
  for (const n of sizes) assert.ok(n <= MAX_MESSAGE_BYTES, `a ${n}-byte message`);
  assert.equal(h.node(2).core!.digest("L"), h.node(1).core!.digest("L"));
  assert.deepEqual(h.node(2).core!.replica("L")!.marksOf(1), [5, 1 << 23]);
  assert.ok(ms < 5000, `joining took ${ms.toFixed(0)} ms`);
});

Deno.test("a joiner that buffers more than its limit leaves the log and answers -EAGAIN", () => {
  const h = harness({ core: { maxJoinBuffer: 3 } });
  h.addLog("L", config(16));
  h.start(1);
  h.start(2);
  h.deliverAll();
  send(h, 1, { op: "resume" });
  h.deliverAll();
  const r = send(h, 2, { op: "resume" });
  h.flush();
  h.bus.orderNext(Infinity, h.now);
  assert.ok(h.deliverOne(h.node(2)), "n2 sees its own RESUME first");
  for (let i = 0; i < 5; i++) send(h, 1, { op: "mark", regions: [i] });
  h.flush();
  h.bus.orderNext(Infinity, h.now);
  while (h.deliverOne(h.node(2)));
  assert.equal(r()?.errno, Errno.EAGAIN);
  assert.equal(h.node(2).core!.logStatus("L"), "out");
  h.deliverAll();
  assert.deepEqual(h.node(1).core!.clusterState("L")!.members, [1], "n1 still counts n2 as member");
  // The kernel resends: with the checkpoint right behind, the buffer stays small this time.
  const again = send(h, 2, { op: "resume" });
  h.deliverAll();
  assert.equal(again()?.errno, 0);
  assert.deepEqual(h.node(1).core!.clusterState("L")!.members, [1, 2]);
});

Deno.test("a joiner whose table has another geometry is refused with EINVAL", () => {
  const h = harness();
  h.addLog("L", config(16));
  h.start(1);
  h.start(2);
  h.deliverAll();
  send(h, 1, { op: "resume" });
  h.deliverAll();
  h.configs.set("L", config(32)); // n2's table says 32 regions
  const r = send(h, 2, { op: "resume" });
  h.deliverAll();
  assert.equal(r()?.errno, Errno.EINVAL);
  assert.ok(h.node(2).logLines.some((l) => l.includes("refusing the RESUME")));
  assert.deepEqual(h.node(1).core!.clusterState("L")!.members, [1]);
});

Deno.test("MAX_INFLIGHT_MESSAGES is the default window", () => {
  const s = new Solo();
  const cfg = config(16);
  s.request(cfg, { op: "resume" });
  s.run();
  const base = s.core.stats.messagesSent;
  for (let b = 0; b < MAX_INFLIGHT_MESSAGES + 3; b++) {
    s.request(cfg, { op: "clear", regions: [b] });
    s.take(s.core.flush());
  }
  assert.equal(s.core.stats.messagesSent - base, MAX_INFLIGHT_MESSAGES);
});

Deno.test("deliver() applies nothing from a node that is not a member of the log", () => {
  const h = harness();
  h.addLog("L", config(16));
  h.start(1);
  h.start(2);
  h.deliverAll();
  send(h, 1, { op: "resume" });
  h.deliverAll();
  const digest = h.node(1).core!.digest("L");
  // n2 never resumed L; a MARK and a GET_RESYNC_WORK "from" it change nothing anywhere.
  const bytes = encodeBatch([
    { kind: "entry", key: "L", tag: 5, op: { op: "mark", regions: [3] } },
    { kind: "entry", key: "L", tag: 6, op: { op: "get_resync_work" } },
  ]);
  h.bus.mcast(2, bytes, h.now);
  h.deliverAll();
  assert.equal(h.node(1).core!.digest("L"), digest);
  assert.deepEqual(h.node(1).core!.replica("L")!.marksOf(2), []);
  assert.equal(h.node(1).core!.stats.malformed, 0);
});

/**
 * Several cores in one simulated CPG group that can be split into parts and merged. The seeded
 * simulator's bus (tests/sim/harness.ts) has one group and models crashes, not partitions.
 */
class Group {
  readonly cores = new Map<number, ClusterCore>();
  readonly answers = new Map<number, Map<number, OpResult>>();
  readonly logs: string[] = [];
  #parts: number[][];
  #bus: { from: number; bytes: Uint8Array; to: number[] }[] = [];
  #nextTag = 1;

  constructor(nodes: number[]) {
    this.#parts = [nodes];
    for (const n of nodes) {
      this.cores.set(n, new ClusterCore(n));
      this.answers.set(n, new Map());
    }
    for (const n of nodes) {
      this.#take(n, this.core(n).confchg({ members: nodes, left: [], joined: nodes }));
    }
  }

  core(n: number): ClusterCore {
    return this.cores.get(n)!;
  }

  #part(n: number): number[] {
    return this.#parts.find((p) => p.includes(n))!;
  }

  #take(n: number, effects: Effect[]): void {
    for (const e of effects) {
      if (e.kind === "reply") {
        assert.ok(!this.answers.get(n)!.has(e.tag), `node ${n}: a second reply to ${e.tag}`);
        this.answers.get(n)!.set(e.tag, e.result);
      } else if (e.kind === "mcast") this.#bus.push({ from: n, bytes: e.bytes, to: this.#part(n) });
      else if (e.kind === "diskWrite") this.#take(n, this.core(n).diskDurable(e.key, e.token));
      else this.logs.push(`${n} ${e.level}: ${e.msg}`);
    }
  }

  request(n: number, cfg: LogConfig, op: ClusterRequest["op"]): number {
    const tag = this.#nextTag++;
    this.#take(n, this.core(n).request({ key: cfg.uuid, tag, op, config: cfg }));
    return tag;
  }

  /** Flush every core and deliver until quiet (each message to the part it was sent in). */
  run(): void {
    for (let round = 0; round < 1000; round++) {
      for (const n of this.cores.keys()) this.#take(n, this.core(n).flush());
      const m = this.#bus.shift();
      if (m === undefined) return;
      for (const to of m.to) this.#take(to, this.core(to).deliver(m.from, m.bytes));
    }
    throw new Error("The group did not quiesce");
  }

  /** Cuts the group into `parts`: each part sees the others crash. */
  split(parts: number[][]): void {
    this.run();
    this.#parts = parts;
    for (const part of parts) {
      const left = [...this.cores.keys()].filter((n) => !part.includes(n))
        .map((node) => ({ node, reason: "crash" as const }));
      for (const n of part) {
        this.#take(n, this.core(n).confchg({ members: part, left, joined: [] }));
      }
    }
  }

  /** Heals every split: each part sees the others join. */
  merge(): void {
    this.run();
    const all = [...this.cores.keys()].sort((a, b) => a - b);
    const parts = this.#parts;
    this.#parts = [all];
    for (const part of parts) {
      const joined = all.filter((n) => !part.includes(n));
      for (const n of part) this.#take(n, this.core(n).confchg({ members: all, left: [], joined }));
    }
  }
}

Deno.test("a split brain healed: the side with the lowest node id keeps the log, resyncs it all", () => {
  const g = new Group([1, 2]);
  const cfg = config(64, "disk");
  g.request(1, cfg, { op: "resume" });
  g.run();
  g.request(2, cfg, { op: "resume" });
  g.run();
  assert.deepEqual(g.core(2).clusterState("L")?.members, [1, 2]);
  // Both sides keep quorum (two_node): each serves the log alone.
  g.split([[1], [2]]);
  const m1 = g.request(1, cfg, { op: "flush", marks: [3] });
  const m2 = g.request(2, cfg, { op: "flush", marks: [9] });
  g.run();
  assert.equal(g.answers.get(1)!.get(m1)?.errno, 0);
  assert.equal(g.answers.get(2)!.get(m2)?.errno, 0);
  assert.deepEqual(g.core(1).clusterState("L")?.members, [1]);
  assert.deepEqual(g.core(2).clusterState("L")?.members, [2]);
  // Healed: both announce what they hold; every node decides alike.
  g.merge();
  g.run();
  assert.equal(
    g.core(2).logStatus("L"),
    "out",
    `node 2 side drops its state: ${g.logs.join("\n")}`,
  );
  const r1 = g.core(1).replica("L")!;
  assert.equal(r1.stats().syncCount, 0, "the kept state resyncs every region");
  assert.ok(g.logs.some((l) => /^1 error: .*split brain.*this side keeps the log/.test(l)));
  assert.ok(g.logs.some((l) => /^2 error: .*split brain.*the other side keeps the log/.test(l)));
  // The kernel on node 2 gets -ESRCH from now on, re-sends CTR and RESUME, and joins afresh.
  const again = g.request(2, cfg, { op: "in_sync", region: 1 });
  g.run();
  assert.equal(g.answers.get(2)!.get(again)?.errno, Errno.ESRCH);
  const resume = g.request(2, cfg, { op: "resume" });
  g.run();
  assert.equal(g.answers.get(2)!.get(resume)?.errno, 0);
  assert.deepEqual(g.core(1).clusterState("L")?.members, [1, 2]);
  assert.equal(g.core(2).digest("L"), g.core(1).digest("L"));
});
