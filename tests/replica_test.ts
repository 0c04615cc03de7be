import assert from "node:assert/strict";
import { Errno, MAX_REGIONS_PER_REQUEST, RequestType } from "../src/kernel/protocol.ts";
import { Bitmap, popcount32 } from "../src/log/bitmap.ts";
import { isCtrError, parseCtr } from "../src/log/ctr.ts";
import { Digest } from "../src/log/digest.ts";
import { isOpParseError, parseOp, readS64, readU64 } from "../src/log/ops.ts";
import {
  LogReplica,
  MAX_DIRTY_WORDS,
  MAX_NODES,
  MAX_PRIORITY_REGIONS,
  MAX_RESERVATIONS,
} from "../src/log/replica.ts";
import type { DiskImage, LogConfig, NodeId, Op, OpResult } from "../src/log/types.ts";

// ---- helpers ----

const REGION_SIZE = 1024;

function config(
  regions: number,
  options: { kind?: "core" | "disk"; sync?: "" | "sync" | "nosync" } = {},
): LogConfig {
  const kind = options.kind ?? "core";
  const words = [String(regions * REGION_SIZE), `clustered-${kind}`];
  if (kind === "disk") words.push("253:3");
  words.push(String(REGION_SIZE));
  if (options.sync) words.push(options.sync);
  const args = parseCtr(words.join(" "));
  if (isCtrError(args)) throw new Error(args.error);
  assert.equal(args.regionCount, regions);
  return { ...args, uuid: "test-uuid", luid: 1n };
}

function ok(result: OpResult): OpResult {
  assert.equal(result.errno, 0, result.reason);
  return result;
}

/** The s64/u64 answer of a single-value request. */
function value(r: LogReplica, node: NodeId, op: Op): number {
  const data = ok(r.apply(node, op)).data;
  assert.ok(data && data.byteLength === 8);
  return readS64(data);
}

const isClean = (r: LogReplica, region: number, node = 1) =>
  value(r, node, { op: "is_clean", region });
const inSync = (r: LogReplica, region: number, node = 1) =>
  value(r, node, { op: "in_sync", region });
const syncCount = (r: LogReplica) => value(r, 1, { op: "get_sync_count" });

/** GET_RESYNC_WORK: the region handed out, or undefined for "no work". */
function work(r: LogReplica, node: NodeId): number | undefined {
  const data = ok(r.apply(node, { op: "get_resync_work" })).data!;
  assert.equal(data.byteLength, 16);
  const i = readS64(data, 0);
  assert.ok(i === 0 || i === 1);
  if (i === 0) {
    assert.equal(readU64(data, 8), 0);
    return undefined;
  }
  return readU64(data, 8);
}

function remoteRecovering(
  r: LogReplica,
  region: number,
  node: NodeId = 1,
): { recovering: number; hint: number } {
  const data = ok(r.apply(node, { op: "is_remote_recovering", region })).data!;
  assert.equal(data.byteLength, 16);
  return { recovering: readS64(data, 0), hint: readU64(data, 8) };
}

function setSync(r: LogReplica, node: NodeId, region: number, inSync = true): void {
  ok(r.apply(node, { op: "set_region_sync", region, inSync }));
}

/** The clean-image bit of `region`: stored for disk logs, derived (is_clean) for core logs. */
function diskBit(r: LogReplica, region: number): boolean {
  if (r.config.kind === "clustered-core") {
    return readS64(ok(r.apply(1, { op: "is_clean", region })).data!) === 1;
  }
  return ((r.diskWord(region >>> 5) >>> (region & 31)) & 1) === 1;
}

function text(result: OpResult): string {
  const data = ok(result).data!;
  assert.equal(data[data.byteLength - 1], 0, "NUL-terminated");
  return new TextDecoder().decode(data.subarray(0, -1));
}

/** A replica resumed by `nodes`, with every region but those in `outOfSync` recovered. */
function syncedReplica(
  regions: number,
  nodes: NodeId[] = [1],
  outOfSync: number[] = [],
): LogReplica {
  const r = new LogReplica(config(regions));
  for (const n of nodes) ok(r.apply(n, { op: "resume" }));
  for (let i = 0; i < regions; i++) if (!outOfSync.includes(i)) setSync(r, nodes[0], i);
  return r;
}

function assertConsistent(r: LogReplica): void {
  assert.equal(r.checkInvariants(), undefined);
}

// ---- resume ----

Deno.test("new LogReplica() refuses a geometry or device no CTR check would let through", () => {
  const good = config(70, { kind: "disk" });
  assert.throws(() => new LogReplica({ ...good, regionCount: 0 }), RangeError);
  assert.throws(() => new LogReplica({ ...good, regionCount: 2 ** 31 + 1 }), RangeError);
  assert.throws(() => new LogReplica({ ...good, regionSize: 0 }), RangeError);
  assert.throws(() => new LogReplica({ ...good, device: "d".repeat(120) }), /does not fit/);
});

Deno.test("apply(resume) starts a core log out of sync, or in sync and latched under nosync", () => {
  const r = new LogReplica(config(70));
  assert.equal(r.initialized, false);
  assert.equal(syncCount(r), 0); // GET_SYNC_COUNT before RESUME (the fixture's kernel asks)
  ok(r.apply(1, { op: "resume" }));
  assert.equal(r.initialized, true);
  assert.equal(syncCount(r), 0);
  assert.equal(inSync(r, 69), 0);
  assert.equal(r.inSyncLatch, false);
  assert.deepEqual(r.takeDiskChanges().words, [], "a core log has no disk");

  const n = new LogReplica(config(70, { sync: "nosync" }));
  ok(n.apply(1, { op: "resume" }));
  assert.equal(syncCount(n), 70);
  assert.equal(isClean(n, 69), 1);
  assert.equal(n.inSyncLatch, true);
  assert.equal(work(n, 1), undefined);
  assertConsistent(n);
});

Deno.test("apply(resume) loads a disk log's clean bits; the whole image counts as changed", () => {
  const r = new LogReplica(config(70, { kind: "disk" }));
  const cleanBits = new Uint8Array(12);
  cleanBits[0] = 0xff; // regions 0..7
  cleanBits[4] = 0x08; // region 35
  cleanBits[5] = 0xff; // regions 40..47: past nrRegions, must be ignored
  const image: DiskImage = { nrRegions: 40, cleanBits };
  ok(r.apply(1, { op: "resume", diskImage: image }));
  assert.equal(syncCount(r), 9);
  for (let i = 0; i < 70; i++) {
    const expect = i < 8 || i === 35;
    assert.equal(inSync(r, i), expect ? 1 : 0, `region ${i}`);
    assert.equal(diskBit(r, i), expect, `disk bit ${i}`);
  }
  assert.equal(r.diskBytes().byteLength, 12); // round_up(70, 32) / 8
  assert.deepEqual(r.takeDiskChanges().words, [0, 1, 2]);
  assert.deepEqual(r.takeDiskChanges().words, []);
  assertConsistent(r);
});

Deno.test("apply(resume) of a disk log: fresh without an image, the image otherwise, short images read as dirty", () => {
  const fresh = new LogReplica(config(70, { kind: "disk", sync: "sync" }));
  ok(fresh.apply(1, { op: "resume" }));
  assert.equal(syncCount(fresh), 0, "sync in the table and no image: a full resync");
  // The disk layer decides whether the image counts (interpretLoad; a kernel re-CTR after a
  // daemon restart); an image given is the state, whatever the table's sync mode.
  const image: DiskImage = { nrRegions: 70, cleanBits: new Uint8Array(12).fill(0xff) };
  image.cleanBits[1] = 0xfe; // region 8 dirty
  const reconnected = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(reconnected.apply(1, { op: "resume", diskImage: image }));
  assert.equal(syncCount(reconnected), 69);
  assert.equal(
    reconnected.isInSync(8),
    false,
    "a dirty region from disk stays out of sync under nosync",
  );
  const nosync = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(nosync.apply(1, { op: "resume" }));
  assert.equal(syncCount(nosync), 70);
  const short = new LogReplica(config(70, { kind: "disk" }));
  ok(
    short.apply(1, {
      op: "resume",
      diskImage: { nrRegions: 70, cleanBits: new Uint8Array([0xff, 0x01]) },
    }),
  );
  assert.equal(syncCount(short), 9);
  assertConsistent(short);
});

Deno.test("apply(resume) with a failed disk image: all out of sync and status D", () => {
  const r = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  assert.equal(text(r.apply(1, { op: "status_info" })), "3 clustered-disk 253:3 A");
  ok(
    r.apply(1, {
      op: "resume",
      diskImage: { nrRegions: 0, cleanBits: new Uint8Array(0), failed: true },
    }),
  );
  assert.equal(syncCount(r), 0);
  assert.equal(r.diskFailed, true);
  assert.equal(text(r.apply(1, { op: "status_info" })), "3 clustered-disk 253:3 D");
});

Deno.test("apply(resume) by a later member keeps the state and resets the search position", () => {
  const r = new LogReplica(config(70, { kind: "disk" }));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(work(r, 1), 0);
  setSync(r, 1, 0);
  assert.equal(work(r, 1), 1);
  assert.equal(r.searchPosition, 2);
  // A second member, or the same one after suspend: no reload, even with a stale image.
  ok(r.apply(2, { op: "resume", diskImage: { nrRegions: 70, cleanBits: new Uint8Array(12) } }));
  assert.equal(syncCount(r), 1);
  assert.equal(inSync(r, 0), 1);
  assert.equal(r.searchPosition, 0);
  assert.equal(r.memberState(2), "resumed");
  assert.equal(r.recoveryOf(1), 1, "node 1 keeps its assignment");
  assert.equal(work(r, 2), 2, "search restarts at 0, skips in-sync and assigned regions");
  ok(r.apply(1, { op: "presuspend" }));
  assert.equal(r.memberState(1), "presuspended");
  ok(r.apply(1, { op: "postsuspend" }));
  assert.equal(r.memberState(1), "suspended");
  ok(r.apply(1, { op: "resume" }));
  assert.equal(syncCount(r), 1);
  assertConsistent(r);
});

// ---- marks ----

Deno.test("apply(mark) before the first resume keeps the region dirty after it", () => {
  const r = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(r.apply(1, { op: "mark", regions: [3] }));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(isClean(r, 3), 0);
  assert.equal(diskBit(r, 3), false);
  assert.equal(diskBit(r, 4), true);
  assertConsistent(r);
});

Deno.test("apply(mark/clear): a region is clean only when no node holds a mark (invariants 1, 2)", () => {
  const r = syncedReplica(70, [1, 2]);
  assert.equal(isClean(r, 5), 1);
  ok(r.apply(1, { op: "mark", regions: [5] }));
  ok(r.apply(2, { op: "mark", regions: [5, 6] }));
  assert.equal(isClean(r, 5), 0);
  assert.equal(diskBit(r, 5), false);
  ok(r.apply(1, { op: "clear", regions: [5] }));
  assert.equal(isClean(r, 5), 0, "node 2 still holds its mark");
  assert.equal(diskBit(r, 5), false);
  assert.deepEqual(r.marksOf(2), [5, 6]);
  // Node 1 clearing a region only node 2 marked removes nothing.
  ok(r.apply(1, { op: "clear", regions: [6] }));
  assert.deepEqual(r.marksOf(2), [5, 6]);
  assert.equal(isClean(r, 6), 0);
  ok(r.apply(2, { op: "clear", regions: [5, 6] }));
  assert.equal(isClean(r, 5), 1);
  assert.equal(isClean(r, 6), 1);
  assert.equal(diskBit(r, 5), true);
  // Marking twice and clearing once leaves it clean: a node holds one mark per region.
  ok(r.apply(1, { op: "mark", regions: [7, 7] }));
  ok(r.apply(1, { op: "mark", regions: [7] }));
  ok(r.apply(1, { op: "clear", regions: [7] }));
  assert.equal(isClean(r, 7), 1);
  assertConsistent(r);
});

Deno.test("apply(clear) of an out-of-sync region keeps it dirty on disk", () => {
  const r = syncedReplica(70, [1], [9]);
  ok(r.apply(1, { op: "mark", regions: [9] }));
  ok(r.apply(1, { op: "clear", regions: [9] }));
  assert.equal(isClean(r, 9), 0);
  assert.equal(diskBit(r, 9), false);
  setSync(r, 1, 9);
  assert.equal(isClean(r, 9), 1);
  assert.equal(diskBit(r, 9), true);
});

Deno.test("apply(flush) with regions marks them; needsDurable only for a disk log", () => {
  const disk = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(disk.apply(1, { op: "resume" }));
  disk.takeDiskChanges();
  const res = ok(disk.apply(1, { op: "flush", marks: [33, 40] }));
  assert.equal(res.needsDurable, true);
  assert.equal(res.data, undefined);
  assert.deepEqual(disk.marksOf(1), [33, 40]);
  assert.equal(isClean(disk, 33), 0);
  assert.deepEqual(disk.takeDiskChanges().words, [1]);
  assert.equal(ok(disk.apply(1, { op: "flush", marks: [] })).needsDurable, true);
  assert.equal(ok(disk.apply(1, { op: "mark", regions: [1] })).needsDurable, undefined);

  const core = new LogReplica(config(70, { sync: "nosync" }));
  ok(core.apply(1, { op: "resume" }));
  assert.equal(ok(core.apply(1, { op: "flush", marks: [3] })).needsDurable, false);
  assert.equal(isClean(core, 3), 0);
});

Deno.test("takeDiskChanges() reports each changed word once, ascending", () => {
  const r = new LogReplica(config(200, { kind: "disk", sync: "nosync" }));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(r.takeDiskChanges().words.length, 7);
  ok(r.apply(1, { op: "mark", regions: [199, 3, 4] }));
  ok(r.apply(2, { op: "mark", regions: [3] })); // already dirty on disk: no change
  assert.deepEqual(r.takeDiskChanges().words, [0, 6]);
  assert.equal(r.diskWord(0) >>> 0, (0xffffffff & ~(1 << 3) & ~(1 << 4)) >>> 0);
  ok(r.apply(1, { op: "clear", regions: [3, 4] }));
  assert.deepEqual(r.takeDiskChanges().words, [0], "region 4 went clean");
  assert.equal(diskBit(r, 3), false);
  assert.equal(diskBit(r, 4), true);
  assert.throws(() => r.diskWord(7), RangeError);
});

Deno.test("takeDiskChanges() falls back to every word past MAX_DIRTY_WORDS", () => {
  const regions = (MAX_DIRTY_WORDS + 10) * 32;
  const r = new LogReplica(config(regions, { kind: "disk", sync: "nosync" }));
  ok(r.apply(1, { op: "resume" }));
  r.takeDiskChanges();
  for (let w = 0; w <= MAX_DIRTY_WORDS; w++) {
    ok(r.apply(1, { op: "mark", regions: [w * 32] }));
  }
  const words = r.takeDiskChanges().words;
  assert.equal(words.length, MAX_DIRTY_WORDS + 10);
  assert.deepEqual(r.takeDiskChanges().words, []);
});

// ---- sync, latch, crash ----

Deno.test("apply(in_sync) latches at full sync; a failed write leaves it latched, is_clean not", () => {
  const r = syncedReplica(70, [1], [69]);
  assert.equal(r.inSyncLatch, false);
  assert.equal(inSync(r, 69), 0);
  setSync(r, 1, 69);
  assert.equal(r.inSyncLatch, true);
  // A node's write to one leg failed: the kernel sets the region out of sync.
  setSync(r, 2, 10, false);
  assert.equal(syncCount(r), 69);
  assert.equal(inSync(r, 10), 1, "latched: every node keeps writing to every leg");
  assert.equal(isClean(r, 10), 0);
  assert.equal(diskBit(r, 10), false);
  assert.deepEqual(remoteRecovering(r, 10), { recovering: 0, hint: 10 });
});

Deno.test("nodeCrashed() puts the dead node's regions out of sync and clears the latch (invariant 3)", () => {
  const r = syncedReplica(70, [1, 2, 3]);
  assert.equal(r.inSyncLatch, true);
  ok(r.apply(2, { op: "mark", regions: [10, 11, 40] }));
  ok(r.apply(3, { op: "mark", regions: [11] }));
  ok(r.apply(2, { op: "clear", regions: [40] }));
  assert.equal(r.nodeCrashed(2), 2);
  assert.equal(r.memberState(2), undefined);
  assert.deepEqual(r.marksOf(2), []);
  assert.equal(r.inSyncLatch, false);
  assert.equal(syncCount(r), 68);
  for (const region of [10, 11]) {
    assert.equal(inSync(r, region), 0);
    assert.equal(isClean(r, region), 0);
    assert.equal(diskBit(r, region), false);
  }
  assert.equal(inSync(r, 40), 1, "cleared before the crash");
  assert.deepEqual(r.marksOf(3), [11], "node 3's mark survives");
  // Node 3's clear does not make 11 clean: it needs a resync first.
  ok(r.apply(3, { op: "clear", regions: [11] }));
  assert.equal(isClean(r, 11), 0);
  assert.equal(diskBit(r, 11), false);
  // The search went back: both regions are resynced at run time, without a resume.
  assert.equal(work(r, 1), 10);
  assert.deepEqual(remoteRecovering(r, 11), { recovering: 1, hint: 10 });
  assert.equal(work(r, 3), 11, "asked-about region first");
  setSync(r, 1, 11);
  setSync(r, 3, 10);
  assert.equal(isClean(r, 10), 1);
  assert.equal(diskBit(r, 11), true);
  assert.equal(r.inSyncLatch, true);
  assertConsistent(r);
});

Deno.test("nodeCrashed() frees the dead recoverer's region for another node (invariant 4)", () => {
  const r = syncedReplica(70, [1, 2], [20, 21]);
  assert.equal(work(r, 2), 20);
  assert.equal(work(r, 1), 21);
  assert.equal(r.searchPosition, 22);
  assert.equal(r.nodeCrashed(2), 0);
  assert.equal(r.recovererOf(20), undefined);
  assert.equal(r.searchPosition, 20);
  assert.equal(work(r, 1), 21, "node 1 still holds 21");
  setSync(r, 1, 21);
  assert.equal(work(r, 1), 20);
  assert.equal(r.nodeCrashed(99), 0, "unknown node: nothing to do");
  assertConsistent(r);
});

Deno.test("apply(postsuspend) treats marks left behind like a crash's and frees the assignment", () => {
  const r = syncedReplica(70, [1, 2], [30]);
  ok(r.apply(2, { op: "mark", regions: [3] }));
  assert.equal(work(r, 2), 30);
  ok(r.apply(2, { op: "presuspend" }));
  ok(r.apply(2, { op: "postsuspend" }));
  assert.equal(inSync(r, 3), 0);
  assert.equal(r.recovererOf(30), undefined);
  assert.equal(r.memberState(2), "suspended");
  assert.equal(r.nodeLeft(2), 0);
  assert.equal(r.memberState(2), undefined);
  assert.equal(work(r, 1), 3);
  assertConsistent(r);
});

// ---- resync ----

Deno.test("apply(get_resync_work) gives each node its own region, the same one on a resend", () => {
  const r = new LogReplica(config(70));
  assert.equal(work(r, 1), undefined, "nothing before the log is resumed");
  for (const n of [1, 2, 3]) ok(r.apply(n, { op: "resume" }));
  assert.equal(work(r, 1), 0);
  assert.equal(work(r, 2), 1);
  assert.equal(work(r, 3), 2);
  assert.equal(work(r, 1), 0, "resend: same region");
  assert.equal(work(r, 2), 1);
  assert.equal(r.recovererOf(1), 2);
  setSync(r, 2, 1);
  assert.equal(r.recovererOf(1), undefined);
  assert.equal(work(r, 2), 3);
  // A failed recovery frees the region; like the kernel, the search does not come back to it.
  setSync(r, 1, 0, false);
  assert.equal(r.recoveryOf(1), undefined);
  assert.equal(work(r, 1), 4);
  assertConsistent(r);
});

Deno.test("apply(get_resync_work) hands out every region once, then none until resume", () => {
  const r = new LogReplica(config(70));
  ok(r.apply(1, { op: "resume" }));
  ok(r.apply(2, { op: "resume" }));
  const seen = new Set<number>();
  for (let i = 0; i < 35; i++) {
    for (const n of [1, 2]) {
      const region = work(r, n)!;
      assert.ok(!seen.has(region));
      seen.add(region);
      setSync(r, n, region, region !== 7);
    }
  }
  assert.equal(seen.size, 70);
  assert.equal(work(r, 1), undefined);
  assert.equal(syncCount(r), 69);
  ok(r.apply(1, { op: "resume" }));
  assert.equal(work(r, 2), 7, "a resume restarts the search");
});

Deno.test("apply(get_resync_work) skips a region another node has marked and comes back to it", () => {
  const r = syncedReplica(70, [1, 2], [5, 6]);
  ok(r.apply(2, { op: "mark", regions: [5] }));
  ok(r.apply(1, { op: "mark", regions: [6] }));
  assert.equal(work(r, 1), 6, "own marks do not block");
  assert.equal(r.searchPosition, 5, "the search stays on the blocked region");
  assert.equal(work(r, 3), undefined);
  ok(r.apply(2, { op: "clear", regions: [5] }));
  assert.equal(work(r, 3), 5);
  assert.equal(r.searchPosition, 6);
  assert.equal(work(r, 2), undefined, "6 is node 1's");
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) hints the lowest out-of-sync region and prioritizes it", () => {
  const r = syncedReplica(300, [1, 2], [7, 250, 260]);
  assert.equal(work(r, 2), 7);
  assert.deepEqual(remoteRecovering(r, 100, 2), { recovering: 0, hint: 7 });
  assert.deepEqual(remoteRecovering(r, 260, 2), { recovering: 1, hint: 7 });
  assert.deepEqual(remoteRecovering(r, 260, 2), { recovering: 1, hint: 7 });
  assert.deepEqual(r.priorityRegions(), [260], "deduplicated");
  assert.equal(work(r, 1), 260);
  setSync(r, 2, 7);
  assert.deepEqual(remoteRecovering(r, 0), { recovering: 0, hint: 250 });
  setSync(r, 1, 260);
  assert.equal(work(r, 1), 250);
  setSync(r, 1, 250);
  assert.deepEqual(remoteRecovering(r, 250), { recovering: 0, hint: 300 });
  assert.deepEqual(r.priorityRegions(), []);
});

Deno.test("apply(is_remote_recovering) keeps at most MAX_PRIORITY_REGIONS regions", () => {
  const r = new LogReplica(config(1000));
  ok(r.apply(1, { op: "resume" }));
  ok(r.apply(2, { op: "resume" }));
  assert.equal(work(r, 2), 0);
  for (let i = 0; i < MAX_PRIORITY_REGIONS + 20; i++) remoteRecovering(r, 999 - i, 2);
  assert.equal(r.priorityRegions().length, MAX_PRIORITY_REGIONS);
  assert.equal(work(r, 1), 999, "oldest first");
  assertConsistent(r);
});

Deno.test("apply(set_region_sync) never counts past the region count", () => {
  const r = new LogReplica(config(70));
  ok(r.apply(1, { op: "resume" }));
  setSync(r, 1, 3);
  setSync(r, 1, 3);
  assert.equal(syncCount(r), 1);
  setSync(r, 1, 4, false);
  assert.equal(syncCount(r), 1);
  assert.equal(r.apply(1, { op: "set_region_sync", region: 70, inSync: true }).errno, Errno.EINVAL);
  for (let i = 0; i < 70; i++) setSync(r, 1, i);
  setSync(r, 1, 69);
  assert.equal(syncCount(r), 70);
  assertConsistent(r);
});

// ---- plain answers ----

Deno.test("apply() answers region size, sync count and status texts", () => {
  const r = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(readU64(ok(r.apply(1, { op: "get_region_size" })).data!), REGION_SIZE);
  assert.equal(syncCount(r), 70);
  assert.equal(text(r.apply(1, { op: "status_info" })), "3 clustered-disk 253:3 A");
  assert.equal(text(r.apply(1, { op: "status_table" })), "clustered-disk 3 253:3 1024 nosync");
  ok(r.apply(1, { op: "disk_failed" }));
  assert.equal(text(r.apply(1, { op: "status_info" })), "3 clustered-disk 253:3 D");
  const core = new LogReplica(config(70));
  assert.equal(text(core.apply(1, { op: "status_info" })), "1 clustered-core");
  assert.equal(text(core.apply(1, { op: "status_table" })), "clustered-core 1 1024");
});

// ---- bad input ----

Deno.test("apply() refuses out-of-range regions and malformed ops without changing state", () => {
  const r = syncedReplica(70, [1, 2], [60]);
  ok(r.apply(1, { op: "mark", regions: [4] }));
  const before = r.digest();
  const huge = parseOp(RequestType.IN_SYNC, new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0x80])); // 2^63
  assert.ok(!isOpParseError(huge));
  const badRegions: unknown[] = [
    70,
    2 ** 31,
    2 ** 32 - 1,
    (huge as { region: number }).region,
    -1,
    1.5,
    NaN,
    "3",
    undefined,
  ];
  for (const region of badRegions) {
    const ops = [
      { op: "is_clean", region },
      { op: "in_sync", region },
      { op: "is_remote_recovering", region },
      { op: "set_region_sync", region, inSync: true },
      { op: "mark", regions: [0, region] },
      { op: "clear", regions: [4, region] },
      { op: "flush", marks: [1, region] },
    ];
    for (const op of ops) {
      const res = r.apply(1, op as Op);
      assert.equal(res.errno, Errno.EINVAL, `${JSON.stringify(op)}`);
      assert.match(res.reason!, /^Region .* is outside 0\.\.69$/);
      assert.equal(r.digest(), before, `${JSON.stringify(op)} changed the state`);
    }
  }
  const malformed: unknown[] = [
    null,
    42,
    {},
    { op: "nonsense" },
    { op: "mark" },
    { op: "mark", regions: "1,2" },
    { op: "mark", regions: Array.from({ length: MAX_REGIONS_PER_REQUEST + 1 }, (_, i) => i) },
    { op: "set_region_sync", region: 1, inSync: 1 },
    { op: "resume", diskImage: { nrRegions: -1, cleanBits: new Uint8Array(1) } },
    { op: "resume", diskImage: { nrRegions: 3, cleanBits: [1, 2] } },
  ];
  for (const op of malformed) {
    const res = r.apply(1, op as Op);
    assert.equal(res.errno, Errno.EINVAL, JSON.stringify(op));
    assert.match(res.reason!, /^[A-Z0-9]/);
    assert.equal(r.digest(), before);
  }
  for (const node of [-1, 1.5, 2 ** 32, NaN]) {
    assert.equal(r.apply(node, { op: "mark", regions: [1] }).errno, Errno.EINVAL);
  }
  assert.equal(r.digest(), before);
  assertConsistent(r);
});

Deno.test("apply() refuses a new node once MAX_NODES are tracked", () => {
  const r = new LogReplica(config(70));
  for (let n = 1; n <= MAX_NODES; n++) ok(r.apply(n, { op: "resume" }));
  const before = r.digest();
  assert.equal(r.apply(MAX_NODES + 1, { op: "resume" }).errno, Errno.EINVAL);
  assert.equal(r.apply(MAX_NODES + 1, { op: "mark", regions: [1] }).errno, Errno.EINVAL);
  assert.equal(r.digest(), before);
  ok(r.apply(MAX_NODES, { op: "mark", regions: [1] }));
  r.nodeLeft(1);
  ok(r.apply(MAX_NODES + 1, { op: "resume" }));
});

// ---- digest and checkpoint ----

Deno.test("digest() depends on the state, not on the order it was built in", () => {
  const a = syncedReplica(70, [1, 2]);
  const b = syncedReplica(70, [2, 1]);
  assert.equal(a.digest(), b.digest());
  ok(a.apply(1, { op: "mark", regions: [5, 3] }));
  ok(b.apply(1, { op: "mark", regions: [3] }));
  assert.notEqual(a.digest(), b.digest());
  ok(b.apply(1, { op: "mark", regions: [5] }));
  assert.equal(a.digest(), b.digest());
  ok(a.apply(2, { op: "mark", regions: [5] }));
  ok(b.apply(1, { op: "mark", regions: [6] }));
  assert.notEqual(a.digest(), b.digest(), "same regions dirty, different holders");
  assert.match(a.digest(), /^[0-9a-f]{16}$/);
});

function busyReplica(regions: number, kind: "core" | "disk" = "disk"): LogReplica {
  const r = new LogReplica(config(regions, { kind }));
  for (const n of [1, 2, 3]) ok(r.apply(n, { op: "resume" }));
  for (let i = 0; i < Math.min(regions, 100); i += 2) setSync(r, 1, i);
  ok(r.apply(1, { op: "mark", regions: [0, 2, 9] }));
  ok(r.apply(3, { op: "mark", regions: [2, regions - 1] }));
  work(r, 1);
  work(r, 2);
  remoteRecovering(r, regions - 3);
  ok(r.apply(2, { op: "presuspend" }));
  ok(r.apply(1, { op: "disk_failed" }));
  return r;
}

Deno.test("checkpoint() round-trips the complete state in small chunks", () => {
  const a = busyReplica(1000);
  const chunks = a.checkpoint({ maxChunkBytes: 64 });
  assert.ok(chunks.length > 2);
  for (const c of chunks) assert.ok(c.byteLength <= 64);
  const b = LogReplica.fromCheckpoint(a.config, chunks);
  assert.equal(b.digest(), a.digest());
  assertConsistent(b);
  assert.deepEqual(b.marksOf(3), a.marksOf(3));
  assert.equal(b.recoveryOf(2), a.recoveryOf(2));
  assert.deepEqual(b.priorityRegions(), a.priorityRegions());
  assert.equal(b.memberState(2), "presuspended");
  assert.equal(b.diskFailed, true);
  assert.equal(b.searchPosition, a.searchPosition);
  assert.deepEqual([...b.diskBytes()], [...a.diskBytes()]);
  // A joiner that becomes the disk writer rewrites everything.
  assert.equal(b.takeDiskChanges().words.length, 32);
  // Both go on identically.
  const held = a.recoveryOf(1)!;
  for (const r of [a, b]) {
    assert.equal(r.nodeCrashed(3), 1);
    work(r, 3);
    setSync(r, 1, held);
  }
  assert.equal(b.digest(), a.digest());
});

Deno.test("fromCheckpoint() rejects truncated, corrupt or foreign checkpoints", () => {
  const a = busyReplica(1000);
  const whole = a.checkpoint()[0];
  assert.equal(a.checkpoint().length, 1);
  const reject = (
    chunks: Uint8Array[],
    cfg: LogConfig = a.config,
    pattern = /Checkpoint rejected: /,
  ) => assert.throws(() => LogReplica.fromCheckpoint(cfg, chunks), pattern);
  reject([whole.subarray(0, whole.byteLength - 1)]);
  reject([whole.subarray(0, 40)]);
  reject([]);
  reject([whole, new Uint8Array(1)]);
  for (const offset of [0, 4, 8, 20, 40, 100, whole.byteLength - 20, whole.byteLength - 1]) {
    const bad = whole.slice();
    bad[offset] ^= 0x10;
    reject([bad]);
  }
  reject([whole], config(1001, { kind: "disk" }), /geometry/);
  reject([whole], config(1000, { kind: "core" }), /kind/);
  // Padding bits past region 999 set, with a digest that would otherwise match.
  const c = new LogReplica(config(999, { kind: "disk", sync: "nosync" }));
  ok(c.apply(1, { op: "resume" }));
  const cp = c.checkpoint()[0].slice();
  cp[cp.byteLength - 17] |= 0x80;
  reject([cp], c.config, /padding/);
  assert.throws(() => a.checkpoint({ maxChunkBytes: 10 }), RangeError);
});

const BIG = 2 ** 24;

Deno.test("checkpoint() of 2^24 regions round-trips well under 2 s", () => {
  const a = busyReplica(BIG);
  // Half the regions in sync, word-wise patterns that a shifted copy would get wrong.
  for (let i = 0; i < BIG; i += 3) setSync(a, 1, i);
  const t0 = performance.now();
  const chunks = a.checkpoint();
  const t1 = performance.now();
  const b = LogReplica.fromCheckpoint(a.config, chunks);
  const t2 = performance.now();
  const da = a.digest();
  const t3 = performance.now();
  assert.equal(b.digest(), da);
  const total = chunks.reduce((n, c) => n + c.byteLength, 0);
  console.log(
    `2^24 regions: checkpoint ${
      (t1 - t0).toFixed(1)
    } ms (${chunks.length} chunks, ${total} bytes), ` +
      `fromCheckpoint ${(t2 - t1).toFixed(1)} ms, digest ${(t3 - t2).toFixed(1)} ms`,
  );
  assert.ok(t2 - t0 < 2000, `checkpoint round trip took ${t2 - t0} ms`);
  assert.ok(t3 - t2 < 500, `digest took ${t3 - t2} ms`);
  assert.ok(chunks.every((c) => c.byteLength <= 256 * 1024));
});

/** Measures what one 2^24-region replica retains, in a child Deno with `gc()` exposed. */
const MEMORY_PROBE = `
import { LogReplica } from "${new URL("../src/log/replica.ts", import.meta.url)}";
import { parseCtr } from "${new URL("../src/log/ctr.ts", import.meta.url)}";
const gc = globalThis.gc;
gc();
const before = Deno.memoryUsage();
const args = parseCtr("${BIG * REGION_SIZE} clustered-disk 253:3 ${REGION_SIZE}");
const r = new LogReplica({ ...args, uuid: "m", luid: 1n });
for (const n of [1, 2, 3]) r.apply(n, { op: "resume" });
for (let i = 0; i < 3000; i++) r.apply(1 + (i % 3), { op: "mark", regions: [(i * 16381) % ${BIG}] });
r.takeDiskChanges();
gc();
const after = Deno.memoryUsage();
console.log(JSON.stringify({
  retained: after.heapUsed + after.external - before.heapUsed - before.external,
  marks: r.marksOf(1).length,
}));
`;

Deno.test("a replica of 2^24 regions retains about 4 MiB", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=js", "--v8-flags=--expose-gc", MEMORY_PROBE],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert.equal(out.code, 0);
  const { retained, marks } = JSON.parse(new TextDecoder().decode(out.stdout));
  console.log(`2^24 regions, 3000 marks: ${(retained / 2 ** 20).toFixed(2)} MiB retained`);
  assert.equal(marks, 1000);
  // Two 2 MiB bitmaps (sync, on-disk image), then small change.
  assert.ok(retained >= 4 * 2 ** 20, `retained ${retained} bytes: are the bitmaps there?`);
  assert.ok(retained < 8 * 2 ** 20, `retained ${retained} bytes`);
});

Deno.test("a replica of 2^24 regions answers without scanning its regions", () => {
  const r = new LogReplica(config(BIG, { kind: "disk" }));
  for (const n of [1, 2, 3]) ok(r.apply(n, { op: "resume" }));
  // Per-op costs must not scale with the region count (first flush's full list aside).
  r.takeDiskChanges();
  const t0 = performance.now();
  for (let i = 0; i < 10000; i++) {
    const region = (i * 7919) % BIG;
    ok(r.apply(1 + (i % 3), { op: "mark", regions: [region] }));
    ok(r.apply(1 + (i % 3), { op: "clear", regions: [region] }));
    remoteRecovering(r, region);
    const got = work(r, 1 + (i % 3))!;
    setSync(r, 1 + (i % 3), got);
  }
  const ms = performance.now() - t0;
  console.log(
    `2^24 regions: 10000 x (mark, clear, is_remote_recovering, get_resync_work, set_region_sync) in ${
      ms.toFixed(0)
    } ms`,
  );
  assert.ok(ms < 3000);
  assert.equal(syncCount(r), 10000);
});

// ---- randomized: two replicas in lockstep, a joiner from a checkpoint, and a model ----

function mulberry32(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What the spec says, kept naively: plain arrays and sets. */
class Model {
  readonly sync: boolean[];
  readonly marks = new Map<NodeId, Set<number>>();
  readonly assigned = new Map<number, NodeId>();
  /** Member states: resumed, presuspended, suspended (crashed members are removed). */
  readonly states = new Map<NodeId, string>();
  /** Resumed members that asked for resync work since their last resume. */
  readonly asking = new Set<NodeId>();
  /** "region:node" for each out-of-sync region answered "not recovering" and not yet marked. */
  readonly reserved = new Set<string>();
  latch = false;
  initialized = false;
  constructor(readonly n: number, readonly nosync: boolean) {
    this.sync = new Array(n).fill(false);
  }
  marked(r: number): boolean {
    for (const s of this.marks.values()) if (s.has(r)) return true;
    return false;
  }
  markedByOther(r: number, node: NodeId): boolean {
    for (const [n, s] of this.marks) if (n !== node && s.has(r)) return true;
    return false;
  }
  count(): number {
    return this.sync.filter((x) => x).length;
  }
  heldBy(node: NodeId): number | undefined {
    for (const [r, n] of this.assigned) if (n === node) return r;
    return undefined;
  }
  reservedByOther(r: number, node: NodeId): boolean {
    for (const key of this.reserved) {
      const [region, holder] = key.split(":").map(Number);
      if (region === r && holder !== node) return true;
    }
    return false;
  }
  unreserveRegion(r: number): void {
    for (const key of [...this.reserved]) if (key.startsWith(`${r}:`)) this.reserved.delete(key);
  }
  release(node: NodeId): number {
    this.asking.delete(node);
    for (const key of [...this.reserved]) if (key.endsWith(`:${node}`)) this.reserved.delete(key);
    let went = 0;
    for (const r of this.marks.get(node) ?? []) {
      if (this.sync[r]) went++;
      this.sync[r] = false;
    }
    this.marks.delete(node);
    const held = this.heldBy(node);
    if (held !== undefined) this.assigned.delete(held);
    if (went > 0) this.latch = false;
    return went;
  }
}

function randomRun(seed: number, nosync: boolean): void {
  const rand = mulberry32(seed);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  const n = 70;
  const cfg = config(n, { kind: "disk", sync: nosync ? "nosync" : "" });
  const a = new LogReplica(cfg);
  const b = new LogReplica(cfg);
  let joiner: LogReplica | undefined;
  const model = new Model(n, nosync);
  let latchedSteps = 0;
  const nodes = [1, 2, 3];
  const region = () => Math.floor(rand() * n);
  let handedOut = 0;
  let crashes = 0;
  let notRecovering = 0;
  let recoveringAnswers = 0;

  for (let step = 0; step < 4000; step++) {
    const where = `seed ${seed} step ${step}`;
    const node = pick(nodes);
    const roll = rand();
    let op: Op | "crash";
    if (!model.initialized || roll < 0.02) op = { op: "resume" };
    else if (roll < 0.2) {
      op = { op: "mark", regions: Array.from({ length: 1 + Math.floor(rand() * 3) }, region) };
    } else if (roll < 0.35) {
      const mine = [...(model.marks.get(node) ?? [])];
      op = { op: "clear", regions: mine.length > 0 && rand() < 0.8 ? [pick(mine)] : [region()] };
    } else if (roll < 0.42) op = { op: "flush", marks: rand() < 0.5 ? [] : [region()] };
    else if (roll < 0.5) op = { op: "is_clean", region: region() };
    else if (roll < 0.58) op = { op: "in_sync", region: region() };
    else if (roll < 0.7) op = { op: "get_resync_work" };
    else if (roll < 0.82) {
      const held = model.heldBy(node);
      op = held !== undefined && rand() < 0.9
        ? { op: "set_region_sync", region: held, inSync: rand() < 0.9 }
        : { op: "set_region_sync", region: region(), inSync: rand() < (nosync ? 0.9 : 0.5) };
    } else if (roll < 0.86) op = { op: "get_sync_count" };
    else if (roll < 0.9) op = { op: "is_remote_recovering", region: region() };
    else if (roll < 0.93) op = { op: "is_clean", region: n + Math.floor(rand() * 3) };
    else if (roll < 0.95) {
      // With nosync, mostly like the kernel: marks cleared before POSTSUSPEND.
      const mine = [...(model.marks.get(node) ?? [])].slice(0, 32);
      op = nosync && mine.length > 0 && rand() < 0.9
        ? { op: "clear", regions: mine }
        : { op: "postsuspend" };
    } // With nosync, crash less so the latch (set at full sync, cleared by a crash) is exercised.
    else if (roll < 0.965) op = !nosync || rand() < 0.2 ? "crash" : { op: "get_sync_count" };
    else op = { op: "presuspend" };

    if (op === "crash") {
      const expect = model.release(node);
      model.states.delete(node);
      crashes++;
      assert.equal(a.nodeCrashed(node), expect, where);
      assert.equal(b.nodeCrashed(node), expect, where);
      joiner?.nodeCrashed(node);
    } else {
      const res = a.apply(node, op);
      assert.deepEqual(b.apply(node, op), res, where);
      if (joiner) assert.deepEqual(joiner.apply(node, op), res, where);
      const answer = res.data && res.data.byteLength === 8 ? readS64(res.data) : undefined;
      switch (op.op) {
        case "presuspend":
          model.states.set(node, "presuspended");
          model.asking.delete(node);
          break;
        case "resume":
          model.states.set(node, "resumed");
          model.asking.delete(node);
          if (!model.initialized) {
            model.initialized = true;
            model.sync.fill(nosync);
            // Marks taken before the first resume keep their regions dirty on disk.
            model.latch = nosync;
          }
          break;
        case "postsuspend":
          model.release(node);
          model.states.set(node, "suspended");
          break;
        case "mark":
        case "flush": {
          const regions = op.op === "mark" ? op.regions : op.marks;
          if (!model.marks.has(node) && regions.length > 0) model.marks.set(node, new Set());
          for (const r of regions) {
            model.marks.get(node)!.add(r);
            model.reserved.delete(`${r}:${node}`);
          }
          break;
        }
        case "clear":
          for (const r of op.regions) {
            model.marks.get(node)?.delete(r);
            model.reserved.delete(`${r}:${node}`);
          }
          if (model.marks.get(node)?.size === 0) model.marks.delete(node);
          break;
        case "is_clean":
          if (op.region >= n) {
            assert.equal(res.errno, Errno.EINVAL, where);
            break;
          }
          assert.equal(answer, model.sync[op.region] && !model.marked(op.region) ? 1 : 0, where);
          break;
        case "in_sync":
          assert.equal(answer, model.latch || model.sync[op.region] ? 1 : 0, where);
          break;
        case "get_sync_count":
          assert.equal(answer, model.count(), where);
          break;
        case "get_resync_work": {
          const i = readS64(res.data!, 0);
          const r = readU64(res.data!, 8);
          const held = model.heldBy(node);
          if (model.states.get(node) === "resumed") model.asking.add(node);
          if (held !== undefined) {
            assert.deepEqual([i, r], [1, held], `${where}: resend gets the same region`);
          } else if (i === 1) {
            assert.equal(model.sync[r], false, `${where}: handed out an in-sync region`);
            assert.equal(model.assigned.get(r), undefined, `${where}: region ${r} has a recoverer`);
            assert.equal(model.markedByOther(r, node), false, `${where}: region marked elsewhere`);
            assert.equal(
              model.reservedByOther(r, node),
              false,
              `${where}: region ${r} handed out while another node's write may land on it`,
            );
            model.assigned.set(r, node);
            handedOut++;
          }
          break;
        }
        case "set_region_sync":
          model.sync[op.region] = op.inSync;
          model.assigned.delete(op.region);
          if (op.inSync) model.unreserveRegion(op.region);
          if (model.count() === n) model.latch = true;
          break;
        case "is_remote_recovering": {
          const rec = readS64(res.data!, 0);
          const hint = readU64(res.data!, 8);
          const r = op.region;
          const recoverer = model.assigned.get(r);
          let expect = 0;
          if (model.initialized && !model.sync[r]) {
            if (recoverer !== undefined && model.states.get(recoverer) === "resumed") expect = 1;
            else if (recoverer === undefined && !model.latch && model.asking.has(node)) expect = 1;
            else if (!model.marks.get(node)?.has(r)) model.reserved.add(`${r}:${node}`);
          }
          assert.equal(rec, expect, where);
          if (rec === 0 && recoverer !== undefined && recoverer !== node) {
            // Safety: a write may now land on the region, so nobody may be copying it.
            assert.notEqual(model.states.get(recoverer), "resumed", `${where}: copy races write`);
          }
          if (rec === 0) notRecovering++;
          else recoveringAnswers++;
          const lowest = model.sync.indexOf(false);
          assert.equal(hint, lowest < 0 ? n : lowest, where);
          break;
        }
      }
    }
    assert.equal(a.digest(), b.digest(), where);
    if (joiner) assert.equal(joiner.digest(), a.digest(), where);
    assert.equal(a.checkInvariants(), undefined, where);
    assert.equal(a.inSyncLatch, model.latch, where);
    assert.deepEqual(
      a.reservations().map(([r, n]) => `${r}:${n}`).sort(),
      [...model.reserved].sort(),
      where,
    );
    for (const node of nodes) assert.equal(a.isAsking(node), model.asking.has(node), where);
    for (let r = 0; r < n; r++) {
      assert.equal(diskBit(a, r), model.sync[r] && !model.marked(r), `${where}: disk bit ${r}`);
    }
    if (model.latch) latchedSteps++;
    if (step === 1500 || step === 3000) {
      joiner = LogReplica.fromCheckpoint(cfg, a.checkpoint({ maxChunkBytes: 64 }));
      assert.equal(joiner.digest(), a.digest(), where);
    }
  }
  // The run exercised what it claims to.
  assert.ok(handedOut > 50, `only ${handedOut} regions handed out`);
  assert.ok(crashes > 10, `only ${crashes} crashes`);
  assert.ok(notRecovering > 20 && recoveringAnswers > 2, `${notRecovering}/${recoveringAnswers}`);
  if (nosync) assert.ok(latchedSteps > 100, `latched in only ${latchedSteps} steps`);
}

Deno.test("random ops from 3 nodes keep replicas identical and match the model (resync)", () => {
  randomRun(20240607, false);
});

Deno.test("random ops from 3 nodes keep replicas identical and match the model (nosync)", () => {
  randomRun(7, true);
});

// ---- the replica's building blocks: Bitmap and Digest ----

Deno.test("Bitmap uses the on-disk bit order: bit i is bit i%8 of byte i/8", () => {
  const b = new Bitmap(70);
  assert.equal(b.byteLength, 12);
  for (const i of [0, 9, 31, 32, 69]) assert.equal(b.set(i), true);
  assert.equal(b.set(9), false);
  const bytes = b.bytes();
  assert.deepEqual([...bytes], [0x01, 0x02, 0, 0x80, 0x01, 0, 0, 0, 0x20, 0, 0, 0]);
  const copy = new Bitmap(70);
  copy.loadBytes(bytes, 70);
  assert.ok(copy.equals(b));
  assert.equal(b.clear(9), true);
  assert.equal(b.clear(9), false);
  assert.equal(b.get(9), false);
  assert.equal(b.get(69), true);
  assert.equal(b.popcount(), 4);
});

Deno.test("Bitmap.findNextZero() and findNextOne() scan word-wise and never return padding", () => {
  const b = new Bitmap(70);
  b.fill(true);
  assert.ok(b.paddingIsClear());
  assert.equal(b.popcount(), 70);
  assert.equal(b.findNextZero(0), 70);
  b.clear(33);
  b.clear(64);
  assert.equal(b.findNextZero(0), 33);
  assert.equal(b.findNextZero(33), 33);
  assert.equal(b.findNextZero(34), 64);
  assert.equal(b.findNextZero(65), 70);
  assert.equal(b.findNextZero(500), 70);
  b.fill(false);
  assert.equal(b.findNextOne(0), 70);
  b.set(31);
  b.set(69);
  assert.equal(b.findNextOne(0), 31);
  assert.equal(b.findNextOne(32), 69);
  assert.equal(b.findNextOne(70), 70);
});

Deno.test("Bitmap.setRange() and loadBytes() set exactly the bits asked for", () => {
  const b = new Bitmap(100);
  b.setRange(30, 67);
  for (let i = 0; i < 100; i++) assert.equal(b.get(i), i >= 30 && i < 67, `bit ${i}`);
  b.setRange(90, 1000);
  assert.equal(b.popcount(), 37 + 10);
  assert.ok(b.paddingIsClear());
  // Only the first 13 bits of a longer image count; bytes missing from a short one read as 0.
  b.loadBytes(new Uint8Array(16).fill(0xff), 13);
  assert.equal(b.popcount(), 13);
  assert.equal(b.findNextZero(0), 13);
  b.loadBytes(new Uint8Array([0xff, 0xff]), 100);
  assert.equal(b.popcount(), 16);
  const other = new Bitmap(100);
  other.copyFrom(b);
  assert.ok(other.equals(b));
  other.set(99);
  assert.ok(!other.equals(b));
  assert.ok(!new Bitmap(99).equals(new Bitmap(100)));
  assert.throws(() => new Bitmap(-1), RangeError);
});

Deno.test("popcount32() counts the bits of any 32-bit word", () => {
  for (const [w, n] of [[0, 0], [1, 1], [0xffffffff, 32], [0x80000000, 1], [0x0f0f0f0f, 16]]) {
    assert.equal(popcount32(w), n);
  }
});

Deno.test("Digest tells apart word sequences that differ in a value, the order or the length", () => {
  const h = (...words: number[]) => new Digest().words(Uint32Array.from(words)).hex();
  assert.equal(h(1, 2, 3), h(1, 2, 3));
  assert.equal(new Digest().u32(1).u32(2).u32(3).hex(), h(1, 2, 3));
  assert.notEqual(h(1, 2, 3), h(1, 3, 2));
  assert.notEqual(h(1, 2, 3), h(1, 2, 3, 0));
  assert.notEqual(h(0), h());
  assert.notEqual(h(0x80000000), h(0));
  assert.notEqual(new Digest().text("ab").hex(), new Digest().text("ba").hex());
  const seen = new Set<string>();
  for (let i = 0; i < 10000; i++) seen.add(h(i));
  assert.equal(seen.size, 10000);
});

// ---- IS_REMOTE_RECOVERING: safe (no write during another node's copy) and live (K1) ----

const RR_REGIONS = 70;

/** A replica resumed by nodes 1 and 2 with region 9 (and 40) out of sync. */
function recoveringReplica(): LogReplica {
  return syncedReplica(RR_REGIONS, [1, 2], [9, 40]);
}

Deno.test("apply(is_remote_recovering) answers not recovering once every member is suspending", () => {
  // A suspending kernel waits for its held writes, which wait for "not recovering": with no
  // resumed member left nobody recovers, so "recovering" would hang the suspend forever.
  const r = new LogReplica(config(70));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(work(r, 1), 0);
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 1, hint: 0 }, "out of sync, asking");
  setSync(r, 1, 0);
  ok(r.apply(1, { op: "presuspend" }));
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 0, hint: 1 }, "hint still truthful");
  ok(r.apply(1, { op: "resume" }));
  assert.equal(r.isAsking(1), false, "a RESUME alone does not show recovery runs");
  assert.equal(work(r, 1), 9, "asked about while it was resumed");
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 1, hint: 1 }, "it copies 9 now");
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) answers a suspending node not recovering while another member is resumed (K1)", () => {
  // Node 2 is resumed but may never recover region 9 (its kernel saw the mirror in sync, or it
  // is idle): "recovering" would hold node 1's write, and node 1's suspend, forever.
  const r = recoveringReplica();
  assert.equal(work(r, 2), 9);
  setSync(r, 2, 9, false); // its copy failed; nobody holds 9 now
  ok(r.apply(1, { op: "presuspend" }));
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 0, hint: 9 });
  assert.deepEqual(r.reservations(), [[9, 1]]);
  // The write/recovery race stays closed: until node 1's mark (then its clear), nobody else
  // gets region 9, not even a node that asks for work right now.
  assert.equal(work(r, 2), 40);
  setSync(r, 2, 40);
  assert.equal(work(r, 2), undefined, "9 is reserved for node 1's write");
  ok(r.apply(1, { op: "flush", marks: [9] }));
  assert.deepEqual(r.reservations(), [], "the mark takes over");
  assert.equal(work(r, 2), undefined, "9 is marked by node 1");
  ok(r.apply(1, { op: "clear", regions: [9] }));
  assert.equal(work(r, 2), 9, "resynced after the write");
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) does not count on a member re-resumed from inside its suspend (K1)", () => {
  // A kernel whose daemon lost the log re-sends CTR and RESUME from inside its own suspend: it
  // is "resumed" again, but its recovery is stopped and it never asks for resync work.
  const r = recoveringReplica();
  assert.equal(work(r, 1), 9);
  setSync(r, 1, 9);
  ok(r.apply(1, { op: "presuspend" }));
  r.nodeCrashed(2); // node 2 held a mark on nothing: nothing goes out of sync
  ok(r.apply(2, { op: "resume" }));
  ok(r.apply(1, { op: "resume" })); // the re-CTR's RESUME
  assert.equal(r.memberState(1), "resumed");
  assert.deepEqual(remoteRecovering(r, 40), { recovering: 0, hint: 40 });
  assert.deepEqual(remoteRecovering(r, 40, 2), { recovering: 0, hint: 40 });
  assert.equal(r.isAsking(1), false);
  assert.deepEqual(r.reservations(), [[40, 1], [40, 2]]);
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) answers an asking node recovering, and it then gets the region", () => {
  const r = recoveringReplica();
  assert.equal(work(r, 1), 9);
  assert.equal(r.isAsking(1), true);
  assert.deepEqual(remoteRecovering(r, 40), { recovering: 1, hint: 9 }, "its own pass recovers it");
  assert.deepEqual(r.priorityRegions(), [40]);
  assert.deepEqual(r.reservations(), []);
  setSync(r, 1, 9);
  assert.equal(work(r, 1), 40, "its next GET_RESYNC_WORK");
  assert.deepEqual(remoteRecovering(r, 40), { recovering: 1, hint: 40 }, "while it copies");
  setSync(r, 1, 40);
  assert.deepEqual(remoteRecovering(r, 40), { recovering: 0, hint: RR_REGIONS });
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) answers recovering while a resumed member holds the region, latched or not", () => {
  // Under the in-sync latch every node writes to all legs: a copy in progress still must not
  // race a write.
  const l = syncedReplica(RR_REGIONS, [1, 2]);
  setSync(l, 1, 5, false); // a failed write, the latch stays
  assert.equal(l.inSyncLatch, true);
  assert.equal(work(l, 2), 5);
  assert.deepEqual(remoteRecovering(l, 5), { recovering: 1, hint: 5 });
  setSync(l, 2, 5, false); // its copy failed too: nobody retries it forever on a write's behalf
  assert.equal(work(l, 1), undefined);
  assert.deepEqual(remoteRecovering(l, 5), { recovering: 0, hint: 5 }, "latched: not recovering");
  const r = recoveringReplica();
  assert.equal(work(r, 2), 9);
  ok(r.apply(1, { op: "presuspend" }));
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 1, hint: 9 }, "node 2 copies it");
  assert.deepEqual(r.reservations(), []);
  // A suspending recoverer finished its copies before PRESUSPEND: its assignment copies nothing.
  ok(r.apply(2, { op: "presuspend" }));
  assert.deepEqual(remoteRecovering(r, 9), { recovering: 0, hint: 9 });
  assert.deepEqual(r.reservations(), [[9, 1]]);
  assertConsistent(r);
  assertConsistent(l);
});

Deno.test("apply(is_remote_recovering) reservations end at a clear, a leave, a crash or a resync", () => {
  const r = syncedReplica(RR_REGIONS, [1, 2, 3], [9, 40, 41]);
  for (const n of [1, 2, 3]) ok(r.apply(n, { op: "presuspend" }));
  for (const n of [1, 2, 3]) remoteRecovering(r, 40, n);
  remoteRecovering(r, 41, 1);
  remoteRecovering(r, 9, 2);
  ok(r.apply(3, { op: "mark", regions: [9] }));
  assert.deepEqual(remoteRecovering(r, 9, 3), { recovering: 0, hint: 9 });
  assert.deepEqual(
    r.reservations(),
    [[9, 2], [40, 1], [40, 2], [40, 3], [41, 1]],
    "a marker needs none",
  );
  ok(r.apply(1, { op: "clear", regions: [40] }));
  ok(r.apply(2, { op: "postsuspend" }));
  assert.deepEqual(r.reservations(), [[40, 3], [41, 1]]);
  assert.equal(r.nodeCrashed(3), 0, "its mark was on a region already out of sync");
  assert.deepEqual(r.reservations(), [[41, 1]]);
  ok(r.apply(2, { op: "resume" }));
  setSync(r, 2, 41);
  assert.deepEqual(r.reservations(), []);
  assertConsistent(r);
});

Deno.test("apply(is_remote_recovering) answers recovering once MAX_RESERVATIONS regions are reserved", () => {
  const regions = MAX_RESERVATIONS + 10;
  const r = new LogReplica(config(regions));
  ok(r.apply(1, { op: "resume" }));
  ok(r.apply(1, { op: "presuspend" }));
  for (let i = 0; i < MAX_RESERVATIONS; i++) {
    assert.equal(remoteRecovering(r, i).recovering, 0);
  }
  assert.equal(remoteRecovering(r, MAX_RESERVATIONS).recovering, 1, "full: the safe answer");
  assert.equal(remoteRecovering(r, 0).recovering, 0, "an existing reservation still answers");
  ok(r.apply(1, { op: "mark", regions: [0] }));
  assert.equal(remoteRecovering(r, MAX_RESERVATIONS).recovering, 0);
  assertConsistent(r);
});

Deno.test("checkpoint() carries asking members and reservations; digest() tells them apart", () => {
  const a = recoveringReplica();
  const b = recoveringReplica();
  assert.equal(a.digest(), b.digest());
  assert.equal(work(a, 2), 9);
  assert.equal(work(b, 2), 9);
  ok(a.apply(1, { op: "presuspend" }));
  ok(b.apply(1, { op: "presuspend" }));
  remoteRecovering(a, 40);
  assert.notEqual(a.digest(), b.digest(), "a reservation is state");
  remoteRecovering(b, 40);
  assert.equal(a.digest(), b.digest());
  ok(b.apply(2, { op: "resume" }));
  assert.notEqual(a.digest(), b.digest(), "whether a member is asking is state");
  const c = LogReplica.fromCheckpoint(a.config, a.checkpoint({ maxChunkBytes: 64 }));
  assert.equal(c.digest(), a.digest());
  assert.deepEqual(c.reservations(), [[40, 1]]);
  assert.equal(c.isAsking(2), true);
  assert.equal(c.isAsking(1), false);
  // And both go on identically: the joiner keeps 40 from node 2 until node 1's write is over.
  for (const x of [a, c]) {
    setSync(x, 2, 9);
    assert.equal(work(x, 2), undefined);
    ok(x.apply(1, { op: "clear", regions: [40] }));
    assert.equal(work(x, 2), 40);
  }
  assert.equal(c.digest(), a.digest());
  assertConsistent(c);
});

Deno.test("diskDirtied says whether the untaken disk changes include a newly dirty bit", () => {
  const r = new LogReplica(config(70, { kind: "disk", sync: "nosync" }));
  ok(r.apply(1, { op: "resume" }));
  assert.equal(r.diskDirtied, true, "after the first resume the whole image must be written");
  r.takeDiskChanges();
  assert.equal(r.diskDirtied, false);
  ok(r.apply(1, { op: "mark", regions: [3] }));
  assert.equal(r.diskDirtied, true, "a mark dirties a clean bit");
  assert.deepEqual(r.takeDiskChanges().words, [0]);
  ok(r.apply(1, { op: "clear", regions: [3] }));
  assert.equal(r.diskDirtied, false, "a clear only cleans");
  assert.deepEqual(r.takeDiskChanges().words, [0], "but the change is still there to write");
  const core = new LogReplica(config(70, { sync: "nosync" }));
  ok(core.apply(1, { op: "resume" }));
  ok(core.apply(1, { op: "mark", regions: [3] }));
  assert.equal(core.diskDirtied, false, "a core log has no disk");
});

Deno.test("a clustered-core log keeps no disk image; its clean count is derived", () => {
  const r = new LogReplica(config(70, { sync: "nosync" }));
  ok(r.apply(1, { op: "resume" }));
  ok(r.apply(1, { op: "mark", regions: [1, 2] }));
  ok(r.apply(2, { op: "mark", regions: [2] }));
  assert.equal(r.stats().cleanCount, 68);
  assert.throws(() => r.diskBytes(), /no disk image/);
  assert.deepEqual(r.takeDiskChanges().words, []);
  assert.equal(r.checkInvariants(), undefined);
});
