// Unit tests of the kernel simulator's pure model (src/sim/model.ts), its checker and workload.
// The daemon side is a small in-process responder written here from the protocol description
// (the real daemon is exercised over netlink by the integration tests and the demo); each
// violation test tampers with one kind of answer and checks that the checker names it.
import assert from "node:assert/strict";
import { Errno, RequestType, requestTypeName } from "../src/kernel/protocol.ts";
import { Call, CallKind } from "../src/sim/call.ts";
import { LogChecker, type ViolationKind, ViolationLog } from "../src/sim/checker.ts";
import { Histogram } from "../src/sim/histogram.ts";
import {
  BAD_REQUEST_KINDS,
  ctrString,
  KernelModel,
  type KernelOptions,
  type MirrorSpec,
  type ModelReply,
} from "../src/sim/model.ts";
import { Prng } from "../src/sim/prng.ts";
import { Workload, type WorkloadOptions } from "../src/sim/workload.ts";

// ---------------------------------------------------------------------------------------------
// A responder with the semantics of a correct standalone daemon.

const dec = new TextDecoder();
const enc = new TextEncoder();

function u64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, n >>> 0, true);
  dv.setUint32(4, Math.floor(n / 2 ** 32), true);
  return b;
}

function pair(a: number, b: number): Uint8Array {
  const out = new Uint8Array(16);
  out.set(u64(a), 0);
  out.set(u64(b), 8);
  return out;
}

function readU64(p: Uint8Array, off: number): number {
  const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
  return dv.getUint32(off + 4, true) * 2 ** 32 + dv.getUint32(off, true);
}

class FakeLog {
  sync: Uint8Array;
  marks: Uint8Array;
  recovering = -1;
  resumed = false;
  constructor(
    readonly regionSize: number,
    readonly count: number,
    readonly mode: string,
    readonly device?: string,
  ) {
    this.sync = new Uint8Array(count);
    this.marks = new Uint8Array(count);
  }
  syncCount(): number {
    let n = 0;
    for (const b of this.sync) n += b;
    return n;
  }
  lowestOut(): number {
    const i = this.sync.indexOf(0);
    return i < 0 ? this.count : i;
  }
}

class FakeDaemon {
  logs = new Map<string, FakeLog>();
  /** Every request seen, in order. */
  seen: Call[] = [];

  answer(c: Call): ModelReply {
    this.seen.push(c);
    const ok = (data: Uint8Array = new Uint8Array(0)): ModelReply => ({
      seq: c.seq,
      errno: 0,
      kind: "full",
      data,
      uuid: c.uuid,
      luid: c.luid,
    });
    // Errors go out in full with data_size = the kernel's reply room, as clogd answers them:
    // an ACK or an empty full reply would zero the kernel's reply size for its -ESRCH retry.
    const err = (errno: number): ModelReply => ({
      seq: c.seq,
      errno,
      kind: "full",
      data: new Uint8Array(c.cap),
    });
    if (c.type === RequestType.CTR) {
      const text = dec.decode(c.payload).replace(/\0$/, "");
      const known = this.logs.get(c.uuid);
      if (known !== undefined) return ok();
      const w = text.split(" ");
      let log: FakeLog;
      if (c.layout === "2009") {
        const disk = !/^[0-9]+$/.test(w[0]);
        const rs = Number(w[disk ? 1 : 0]);
        log = new FakeLog(
          rs,
          Math.ceil(Number(w[w.length - 1]) / rs),
          w.includes("nosync") ? "nosync" : "x",
        );
      } else {
        const disk = w[1] === "clustered-disk";
        const rs = Number(w[disk ? 3 : 2]);
        log = new FakeLog(
          rs,
          Math.ceil(Number(w[0]) / rs),
          w.includes("nosync") ? "nosync" : "x",
          disk ? w[2] : undefined,
        );
      }
      // nosync: every region in sync from the constructor on (cmirrord does the same).
      if (log.mode === "nosync") log.sync.fill(1);
      this.logs.set(c.uuid, log);
      if (log.device !== undefined && c.cap > 0) return ok(enc.encode(log.device + "\0"));
      return ok();
    }
    const log = this.logs.get(c.uuid);
    if (log === undefined) return c.type === RequestType.DTR ? ok() : err(Errno.ESRCH);
    const p = c.payload;
    const region = p.length >= 8 ? readU64(p, 0) : -1;
    const inRange = (r: number) => r >= 0 && r < log.count;
    switch (c.type) {
      case RequestType.DTR:
        this.logs.delete(c.uuid);
        return ok();
      case RequestType.RESUME:
        log.resumed = true;
        log.recovering = -1;
        return ok();
      case RequestType.PRESUSPEND:
      case RequestType.POSTSUSPEND:
        return ok();
      case RequestType.GET_REGION_SIZE:
        return ok(u64(log.regionSize));
      case RequestType.IN_SYNC:
      case RequestType.IS_CLEAN:
        if (p.length !== 8 || !inRange(region)) return err(Errno.EINVAL);
        return ok(
          u64(
            c.type === RequestType.IN_SYNC
              ? log.sync[region]
              : (log.sync[region] && !log.marks[region] ? 1 : 0),
          ),
        );
      case RequestType.MARK_REGION:
      case RequestType.CLEAR_REGION:
      case RequestType.FLUSH: {
        if (p.length % 8 !== 0) return err(Errno.EINVAL);
        for (let i = 0; i < p.length; i += 8) if (!inRange(readU64(p, i))) return err(Errno.EINVAL);
        for (let i = 0; i < p.length; i += 8) {
          log.marks[readU64(p, i)] = c.type === RequestType.CLEAR_REGION ? 0 : 1;
        }
        return ok();
      }
      case RequestType.GET_RESYNC_WORK: {
        // Like cmirrord: the same requester asking again (its reply was lost) gets the same work.
        if (log.recovering >= 0) return ok(pair(1, log.recovering));
        const r = log.lowestOut();
        if (r >= log.count) return ok(pair(0, 0));
        log.recovering = r;
        return ok(pair(1, r));
      }
      case RequestType.SET_REGION_SYNC: {
        if (p.length !== 16 || !inRange(region)) return err(Errno.EINVAL);
        log.sync[region] = p[8] === 1 ? 1 : 0;
        if (log.recovering === region) log.recovering = -1;
        return ok();
      }
      case RequestType.GET_SYNC_COUNT:
        return ok(u64(log.syncCount()));
      case RequestType.IS_REMOTE_RECOVERING:
        if (!inRange(region)) return err(Errno.EINVAL);
        return ok(pair(log.recovering === region ? 1 : 0, log.lowestOut()));
      case RequestType.STATUS_INFO:
        return ok(
          enc.encode(
            (log.device === undefined ? "1 clustered-core" : `3 clustered-disk ${log.device} A`) +
              "\0",
          ),
        );
      default:
        return err(Errno.EINVAL);
    }
  }
}

/** What a tamper function may do with one answer: change it, or drop it (null). */
type Tamper = (call: Call, reply: ModelReply, model: KernelModel) => ModelReply | null;

interface Harness {
  model: KernelModel;
  daemon: FakeDaemon;
  workload: Workload | null;
  /** Every request sent, in order. */
  sent: Call[];
  now: number;
}

function spec(over: Partial<MirrorSpec> = {}): MirrorSpec {
  return {
    uuid: "sim-test-uuid-0001",
    luid: 0xffff888012345600n,
    kind: "clustered-core",
    regionSize: 1024,
    targetSectors: 16 * 1024,
    sync: "default",
    integratedFlush: false,
    initialSync: "out",
    exclusive: true,
    afterRestart: "fresh",
    ...over,
  };
}

function harness(
  opts: {
    kernel?: Partial<KernelOptions>;
    mirrors?: Partial<MirrorSpec>[];
    workload?: Partial<WorkloadOptions> | null;
  } = {},
): Harness {
  const workload = opts.workload === null ? null : new Workload({ ios: 0, ...opts.workload });
  const model = new KernelModel(opts.kernel ?? {}, workload ?? {});
  for (const [i, m] of (opts.mirrors ?? [{}]).entries()) {
    model.addMirror(
      spec({ uuid: `sim-test-uuid-${i}`, luid: 0xffff888012345600n + BigInt(i * 64), ...m }),
    );
  }
  const h: Harness = { model, daemon: new FakeDaemon(), workload, sent: [], now: 0 };
  workload?.start(model, 0);
  return h;
}

/**
 * Runs the model against the fake daemon until nothing is left to do or `maxMs` of model time
 * passes. Replies come back at once (each round advances time by 10 us); time jumps to the
 * next timer when idle.
 */
function pump(
  h: Harness,
  opts: { tamper?: Tamper; maxMs?: number; until?: () => boolean } = {},
): void {
  const maxMs = opts.maxMs ?? 600_000;
  for (let round = 0; round < 2_000_000; round++) {
    if (opts.until?.() === true) return;
    h.model.advance(h.now);
    const out = h.model.takeOutgoing();
    if (out.length === 0) {
      const next = h.model.nextDeadline();
      if (next === Infinity || next > maxMs) return;
      h.now = Math.max(h.now, next);
      continue;
    }
    h.now += 0.01;
    const batch = [...out];
    for (const c of batch) {
      h.sent.push(c);
      let reply: ModelReply | null = h.daemon.answer(c);
      if (opts.tamper !== undefined) reply = opts.tamper(c, reply, h.model);
      if (reply !== null) h.model.onReply(reply, h.now);
    }
  }
  throw new Error("pump did not settle");
}

/** Only the mirror's own activity: no status, no removal (the mirror stays active). */
const QUIET: Partial<WorkloadOptions> = {
  ios: 0,
  ioAfterSync: false,
  waitSync: false,
  finalStatus: false,
  remove: false,
};

function types(calls: Call[]): string[] {
  return calls.map((c) => requestTypeName(c.type));
}

function kinds(model: KernelModel): ViolationKind[] {
  return model.violations.kept.map((v) => v.kind);
}

function assertClean(model: KernelModel): void {
  assert.deepEqual(model.violations.kept, [], "no violations expected");
}

// ---------------------------------------------------------------------------------------------
// Kernel behaviour

Deno.test("KernelModel creates, resyncs and removes a mirror in the order the 6.1 kernel did", () => {
  // The fixture (kernel-6.1-clustered-core-basic.txt) with 128 regions: CTR, GET_REGION_SIZE,
  // GET_SYNC_COUNT, RESUME, then per region GET_RESYNC_WORK, IN_SYNC, GET_SYNC_COUNT,
  // SET_REGION_SYNC, CLEAR_REGION, FLUSH; the last GET_RESYNC_WORK finds no work and
  // GET_SYNC_COUNT reaches 128; then status (GET_SYNC_COUNT, STATUS_INFO) and remove.
  const h = harness({ mirrors: [{ targetSectors: 131072 }], workload: { ios: 0 } });
  pump(h);
  const expected = ["CTR", "GET_REGION_SIZE", "GET_SYNC_COUNT", "RESUME"];
  for (let r = 0; r < 128; r++) {
    expected.push(
      "GET_RESYNC_WORK",
      "IN_SYNC",
      "GET_SYNC_COUNT",
      "SET_REGION_SYNC",
      "CLEAR_REGION",
      "FLUSH",
    );
  }
  expected.push("GET_RESYNC_WORK", "GET_SYNC_COUNT", "GET_SYNC_COUNT", "STATUS_INFO");
  expected.push("PRESUSPEND", "POSTSUSPEND", "DTR");
  assert.deepEqual(types(h.sent), expected);
  // Seqs count up from 0 like the kernel's counter; the CTR string does not count its NUL.
  assert.deepEqual(h.sent.map((c) => c.seq), h.sent.map((_, i) => i));
  assert.equal(dec.decode(h.sent[0].payload), "131072 clustered-core 1024");
  assert.equal(h.sent[0].cap, 128);
  assert.equal(h.sent[0].luid, 0xffff888012345600n);
  assert.equal(h.sent[0].version, 3);
  const work = h.sent.filter((c) => c.type === RequestType.SET_REGION_SYNC).map((c) =>
    readU64(c.payload, 0)
  );
  assert.deepEqual(work, Array.from({ length: 128 }, (_, i) => i));
  assertClean(h.model);
  assert.equal(h.model.stats.regionsRecovered, 128);
  assert.equal(h.workload!.finished, true);
  assert.equal(h.model.mirrors()[0].lastStatus, "1 clustered-core");
  assert.equal(h.model.state(0), "removed");
  assert.equal(h.model.threads, 0, "every kernel thread ended");
});

Deno.test("KernelModel write path: IN_SYNC twice, MARK, FLUSH before the write, CLEAR and FLUSH after", () => {
  const h = harness({ mirrors: [{ sync: "nosync", initialSync: "in" }], workload: null });
  h.model.command(0, "create");
  pump(h);
  const before = h.sent.length;
  h.model.submitIo(0, true, 5);
  pump(h);
  // nosync: the first GET_SYNC_COUNT saw every region in sync (the mirror is in sync), but
  // RESUME resets in_sync_hint: the kernel asks GET_RESYNC_WORK (none) and, for the write,
  // IS_REMOTE_RECOVERING once (its hint then covers everything).
  assert.deepEqual(types(h.sent.slice(0, before)), [
    "CTR",
    "GET_REGION_SIZE",
    "GET_SYNC_COUNT",
    "RESUME",
    "GET_RESYNC_WORK",
  ]);
  assert.deepEqual(types(h.sent.slice(before)), [
    "GET_RESYNC_WORK",
    "IS_REMOTE_RECOVERING",
    "IN_SYNC",
    "IN_SYNC",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "FLUSH",
  ]);
  const mark = h.sent.find((c) => c.type === RequestType.MARK_REGION)!;
  assert.deepEqual(mark.regions, [5]);
  // A second write, now with the hint at the region count: no IS_REMOTE_RECOVERING, no resync.
  const n = h.sent.length;
  h.model.submitIo(0, true, 6);
  h.model.submitIo(0, false, 7);
  pump(h);
  assert.deepEqual(types(h.sent.slice(n)), [
    "IN_SYNC", // read of 7 (reads before writes in one pass)
    "IN_SYNC",
    "IN_SYNC",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "FLUSH",
  ]);
  assert.equal(h.model.stats.writesDone, 2);
  assert.equal(h.model.stats.readsDone, 1);
  assertClean(h.model);
});

Deno.test("KernelModel keeps a region marked until its last write completes and groups by 32", () => {
  const h = harness({
    kernel: { ioLatencyMs: 5 },
    mirrors: [{ sync: "nosync", initialSync: "in", targetSectors: 64 * 1024 }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  const start = h.sent.length;
  // 40 regions plus two more writes to region 0, all in one worker pass.
  for (let r = 0; r < 40; r++) h.model.submitIo(0, true, r);
  h.model.submitIo(0, true, 0);
  h.model.submitIo(0, true, 0);
  pump(h);
  const after = h.sent.slice(start);
  const marks = after.filter((c) => c.type === RequestType.MARK_REGION);
  const clears = after.filter((c) => c.type === RequestType.CLEAR_REGION);
  assert.deepEqual(marks.map((c) => c.regions!.length), [32, 8]);
  assert.deepEqual(clears.map((c) => c.regions!.length), [32, 8]);
  assert.deepEqual(new Set(marks.flatMap((c) => c.regions!)).size, 40, "each region marked once");
  assert.deepEqual(new Set(clears.flatMap((c) => c.regions!)).size, 40, "each region cleared once");
  // Order: marks, FLUSH, (writes), clears, FLUSH.
  const t = types(after).filter((x) =>
    x !== "IN_SYNC" && x !== "IS_REMOTE_RECOVERING" && x !== "GET_RESYNC_WORK"
  );
  assert.deepEqual(t, [
    "MARK_REGION",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "CLEAR_REGION",
    "FLUSH",
  ]);
  assertClean(h.model);
});

Deno.test("KernelModel with integrated flush carries marks in FLUSH and delays a clear-only flush 3 s", () => {
  const h = harness({
    mirrors: [{
      sync: "nosync",
      initialSync: "in",
      integratedFlush: true,
      targetSectors: 64 * 1024,
    }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  const start = h.sent.length;
  for (let r = 0; r < 33; r++) h.model.submitIo(0, true, r);
  pump(h, { maxMs: h.now + 1 });
  const first = h.sent.slice(start).filter((c) => c.type !== RequestType.IN_SYNC);
  // Two FLUSHes with payloads (32 + 1), no MARK_REGION; after the writes the clears, and no
  // FLUSH yet.
  assert.deepEqual(
    first.map((c) => `${requestTypeName(c.type)}:${c.payload.length / 8}`).filter((s) =>
      !s.startsWith("GET_RESYNC") && !s.startsWith("IS_REMOTE")
    ),
    ["FLUSH:32", "FLUSH:1", "CLEAR_REGION:32", "CLEAR_REGION:1"],
  );
  const clearAt = h.now;
  pump(h);
  const last = h.sent[h.sent.length - 1];
  assert.equal(last.type, RequestType.FLUSH);
  assert.equal(last.payload.length, 0);
  assert.ok(last.sentAt - clearAt >= 2999, `delayed flush came after ${last.sentAt - clearAt} ms`);
  assertClean(h.model);
});

Deno.test("KernelModel rate-limits IS_REMOTE_RECOVERING to one per 250 ms across logs", () => {
  const h = harness({
    kernel: { recoveryLatencyMs: 50 },
    mirrors: [{}, {}],
    workload: {
      ios: 40,
      iodepth: 4,
      readShare: 0,
      ioAfterSync: false,
      waitSync: false,
      finalStatus: false,
    },
  });
  pump(h);
  const rr = h.sent.filter((c) => c.type === RequestType.IS_REMOTE_RECOVERING);
  assert.ok(rr.length >= 2, `expected several IS_REMOTE_RECOVERING, got ${rr.length}`);
  for (let i = 1; i < rr.length; i++) {
    assert.ok(
      rr[i].sentAt - rr[i - 1].sentAt >= 250 - 1e-6,
      `gap ${rr[i].sentAt - rr[i - 1].sentAt} ms`,
    );
  }
  assert.equal(h.model.stats.writesDone, 80);
  assertClean(h.model);
});

Deno.test("KernelModel suspend waits for recovery and I/O, then PRESUSPEND/POSTSUSPEND; resume sends RESUME", () => {
  const h = harness({
    kernel: { ioLatencyMs: 1, recoveryLatencyMs: 1 },
    workload: { ios: 200, iodepth: 8, suspendCycles: 2, suspendPauseMs: 10 },
  });
  pump(h);
  assertClean(h.model);
  const t = types(h.sent);
  assert.equal(t.filter((x) => x === "PRESUSPEND").length, 3, "two cycles and the removal");
  assert.equal(t.filter((x) => x === "POSTSUSPEND").length, 3);
  assert.equal(t.filter((x) => x === "RESUME").length, 3);
  // Between each PRESUSPEND and its POSTSUSPEND no SET_REGION_SYNC or GET_RESYNC_WORK
  // (recovery is stopped), and after RESUME the kernel asks for resync work again.
  for (let i = 0; i < t.length; i++) {
    if (t[i] !== "PRESUSPEND") continue;
    const j = t.indexOf("POSTSUSPEND", i);
    const inside = t.slice(i, j);
    assert.ok(
      !inside.includes("GET_RESYNC_WORK") && !inside.includes("SET_REGION_SYNC"),
      inside.join(","),
    );
  }
  assert.equal(h.workload!.summary()[0].suspends, 2);
  assert.equal(h.workload!.summary()[0].completed, 200);
  assert.equal(h.model.state(0), "removed");
});

Deno.test("KernelModel in the 2009 layout sends no GET_REGION_SIZE, the length last, one region per mark", () => {
  const h = harness({
    kernel: { layout: "2009" },
    mirrors: [{ sync: "nosync", initialSync: "in" }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  h.model.submitIo(0, true, 1);
  h.model.submitIo(0, true, 2);
  pump(h);
  assert.equal(dec.decode(h.sent[0].payload), "1024 sim-test-uuid-0 nosync 16384");
  assert.equal(h.sent[0].cap, 0, "the 2009 CTR offered no reply buffer");
  assert.equal(h.sent[0].layout, "2009");
  const t = types(h.sent);
  assert.ok(!t.includes("GET_REGION_SIZE"));
  const marks = h.sent.filter((c) => c.type === RequestType.MARK_REGION);
  assert.deepEqual(marks.map((c) => c.payload.length), [8, 8]);
  assertClean(h.model);
});

Deno.test("ctrString() builds the current and 2009 constructor strings", () => {
  const disk = spec({
    kind: "clustered-disk",
    device: "253:3",
    sync: "nosync",
    targetSectors: 2097152,
  });
  assert.equal(ctrString(disk, false), "2097152 clustered-disk 253:3 1024 nosync");
  assert.equal(ctrString(disk, true), "253:3 1024 sim-test-uuid-0001 nosync 2097152");
  assert.equal(ctrString(spec(), false), "16384 clustered-core 1024");
});

// ---------------------------------------------------------------------------------------------
// Timeouts, resends, -EAGAIN, -ESRCH

Deno.test("KernelModel resends a timed-out request with a new seq and counts the late reply", () => {
  const h = harness({ kernel: { timeoutMs: 100 }, workload: { ios: 0 } });
  let dropped: { call: Call; reply: ModelReply } | null = null;
  let resend: Call | null = null;
  pump(h, {
    tamper: (call, reply, model) => {
      if (call.type !== RequestType.GET_RESYNC_WORK) return reply;
      if (dropped === null) {
        dropped = { call, reply };
        return null;
      }
      if (resend === null) {
        resend = call;
        // The lost reply shows up late (fine), then once more (a duplicate).
        model.onReply(dropped.reply, h.now);
        assert.equal(model.stats.lateReplies, 1);
        assert.equal(model.violations.total, 0);
        model.onReply(dropped.reply, h.now);
      }
      return reply;
    },
  });
  assert.ok(dropped !== null && resend !== null);
  const d = dropped as { call: Call; reply: ModelReply };
  const again = resend as Call;
  assert.ok(again.seq > d.call.seq, "resent with a new seq");
  assert.ok(again.sentAt - d.call.sentAt >= 100, "after the timeout");
  assert.deepEqual(kinds(h.model), ["duplicate-reply"]);
  assert.equal(h.model.stats.timeouts, 1);
  assert.equal(h.model.stats.resends, 1);
  assert.equal(h.model.state(0), "removed");
});

Deno.test("KernelModel resends after -EAGAIN with a new seq", () => {
  const h = harness({ workload: { ios: 0 } });
  let eagains = 0;
  pump(h, {
    tamper: (call, reply) => {
      if (call.type === RequestType.SET_REGION_SYNC && eagains < 2) {
        eagains++;
        return { seq: call.seq, errno: Errno.EAGAIN, kind: "ack", data: new Uint8Array(0) };
      }
      return reply;
    },
  });
  const srs = h.sent.filter((c) => c.type === RequestType.SET_REGION_SYNC);
  assert.equal(srs.length, 16 + 2);
  assert.equal(new Set(srs.map((c) => c.seq)).size, srs.length, "every try has its own seq");
  assert.deepEqual(
    srs.slice(0, 3).map((c) => readU64(c.payload, 0)),
    [0, 0, 0],
    "the same request thrice",
  );
  assert.equal(h.model.stats.eagain, 2);
  assertClean(h.model);
});

Deno.test("KernelModel answers -ESRCH with the kernel's re-CTR (NUL counted, no room), RESUME, retry", () => {
  const h = harness({ kernel: { esrchRetryMs: 2000 }, workload: QUIET });
  let restarted = false;
  pump(h, {
    tamper: (call, reply) => {
      // The daemon restarts once, just before the fourth region's SET_REGION_SYNC.
      if (
        !restarted && call.type === RequestType.SET_REGION_SYNC && readU64(call.payload, 0) === 3
      ) {
        restarted = true;
        h.daemon.logs.clear();
        return h.daemon.answer(call);
      }
      return reply;
    },
  });
  const i = h.sent.findIndex((c) =>
    c.type === RequestType.SET_REGION_SYNC && readU64(c.payload, 0) === 3
  );
  const seq = types(h.sent.slice(i, i + 4));
  assert.deepEqual(seq, ["SET_REGION_SYNC", "CTR", "RESUME", "SET_REGION_SYNC"]);
  const reCtr = h.sent[i + 1];
  assert.equal(dec.decode(reCtr.payload), "16384 clustered-core 1024\0", "NUL counted");
  assert.equal(reCtr.cap, 0, "no reply room");
  assert.equal(reCtr.reCtr, true);
  assert.ok(reCtr.sentAt - h.sent[i].sentAt >= 2000, "after the 2 s sleep");
  assert.deepEqual(h.sent[i + 3].payload, h.sent[i].payload, "the original request again");
  assert.ok(h.sent[i + 3].seq > h.sent[i].seq);
  assert.equal(h.model.stats.esrch, 1);
  assert.equal(h.model.stats.reCtr, 1);
  // The restarted (fresh, core) daemon had every region out of sync again: the kernel resyncs
  // all 16, and the checker held the new daemon to its fresh state without complaint.
  assertClean(h.model);
  assert.equal(h.model.checker(0).knownIn, 16);
});

Deno.test("KernelModel repeats the re-CTR every 2 s while it fails, and rejects a re-CTR payload", () => {
  const h = harness({
    mirrors: [{
      kind: "clustered-disk",
      device: "7:3",
      initialSync: "unknown",
      afterRestart: "unknown",
    }],
    workload: QUIET,
  });
  let phase = 0;
  pump(h, {
    tamper: (call, reply) => {
      if (
        phase === 0 && call.type === RequestType.GET_SYNC_COUNT &&
        h.daemon.logs.get(call.uuid)?.resumed
      ) {
        phase = 1;
        h.daemon.logs.clear();
        return h.daemon.answer(call);
      }
      if (phase >= 1 && phase < 3 && call.type === RequestType.CTR) {
        phase++;
        // First attempt: nobody there (ESRCH). Second: a device name where none fits.
        if (phase === 2) {
          return { seq: call.seq, errno: Errno.ESRCH, kind: "ack", data: new Uint8Array(0) };
        }
        h.daemon.logs.clear();
        return { ...h.daemon.answer(call), data: enc.encode("7:3\0") };
      }
      return reply;
    },
  });
  const ctrs = h.sent.filter((c) => c.type === RequestType.CTR);
  assert.equal(ctrs.length, 4, "first CTR, two failed re-CTRs, one good");
  assert.ok(ctrs[2].sentAt - ctrs[1].sentAt >= 2000 && ctrs[3].sentAt - ctrs[2].sentAt >= 2000);
  // The answered payload made the kernel fail it (ENOSPC) and is reported.
  assert.deepEqual(kinds(h.model), ["too-large"]);
  assert.equal(h.model.stats.reCtr, 3);
  assert.equal(h.model.syncCount(0), 16, "the resync went on after the restart");
});

Deno.test("KernelModel treats a failed send (-ESRCH, nobody listening) like the kernel does", () => {
  const h = harness({ workload: QUIET });
  let failed = 0;
  // Drive by hand: the first GET_RESYNC_WORK and the next re-CTR cannot be sent.
  for (let round = 0; round < 100_000; round++) {
    h.model.advance(h.now);
    const out = [...h.model.takeOutgoing()];
    if (out.length === 0) {
      h.now = h.model.nextDeadline();
      if (h.now === Infinity) break;
      continue;
    }
    h.now += 0.01;
    for (const c of out) {
      h.sent.push(c);
      if ((c.type === RequestType.GET_RESYNC_WORK && failed === 0) || (c.reCtr && failed === 1)) {
        failed++;
        h.model.onSendError(c.seq, Errno.ESRCH, h.now);
      } else {
        h.model.onReply(h.daemon.answer(c), h.now);
      }
    }
  }
  assert.equal(h.model.stats.sendFailures, 2);
  assert.equal(h.model.stats.reCtr, 2);
  const i = h.sent.findIndex((c) => c.type === RequestType.GET_RESYNC_WORK);
  assert.deepEqual(types(h.sent.slice(i, i + 5)), [
    "GET_RESYNC_WORK",
    "CTR",
    "CTR",
    "RESUME",
    "GET_RESYNC_WORK",
  ]);
  assert.ok(h.sent[i + 2].sentAt - h.sent[i + 1].sentAt >= 2000);
  assertClean(h.model);
  assert.equal(h.model.syncCount(0), 16);
});

// ---------------------------------------------------------------------------------------------
// The checker names each kind of wrong answer

function runTampered(
  tamper: Tamper,
  opts: {
    kernel?: Partial<KernelOptions>;
    mirrors?: Partial<MirrorSpec>[];
    workload?: Partial<WorkloadOptions>;
  } = {},
): KernelModel {
  // I/O during the resync: IS_REMOTE_RECOVERING is asked too.
  const h = harness({
    workload: { ios: 30, iodepth: 4, ioAfterSync: false, ...opts.workload },
    kernel: opts.kernel,
    mirrors: opts.mirrors,
  });
  pump(h, { tamper, maxMs: 120_000 });
  h.model.finish(h.now, false);
  return h.model;
}

/** Tamper with the first call matching `match` only. */
function once(
  match: (c: Call, m: KernelModel) => boolean,
  change: (c: Call, r: ModelReply) => ModelReply | null,
): Tamper {
  let done = false;
  return (c, r, m) => {
    if (done || !match(c, m)) return r;
    done = true;
    return change(c, r);
  };
}

const isType = (t: number) => (c: Call) => c.type === t && c.kind === CallKind.KERNEL;

Deno.test("LogChecker accepts a correct daemon: no violations under writes, reads, probes and bad requests", () => {
  const m = runTampered((_c, r) => r, {
    kernel: { ioLatencyMs: 0.5, recoveryLatencyMs: 0.2 },
    workload: {
      ios: 300,
      iodepth: 8,
      probeCleanEveryMs: 0.5,
      badRequests: BAD_REQUEST_KINDS,
      hotRegions: 0.2,
    },
  });
  assertClean(m);
  assert.ok(m.stats.sent[RequestType.IS_CLEAN] > 0, "probes were sent");
  assert.equal(m.stats.writesDone + m.stats.readsDone, 300);
});

const cases: [string, ViolationKind, Tamper, Parameters<typeof runTampered>[1]?][] = [
  [
    "a reply to a seq never sent",
    "unknown-seq",
    once(isType(RequestType.FLUSH), (_c, r) => ({ ...r, seq: r.seq + 100000 })),
  ],
  [
    "the wrong amount of data",
    "bad-size",
    once(isType(RequestType.IN_SYNC), (_c, r) => ({ ...r, data: r.data.subarray(0, 4) })),
  ],
  [
    "data beyond the kernel's buffer",
    "too-large",
    once(isType(RequestType.FLUSH), (_c, r) => ({ ...r, data: new Uint8Array(8) })),
  ],
  [
    "a flag that is not 0 or 1",
    "bad-value",
    once(isType(RequestType.IN_SYNC), (_c, r) => ({ ...r, data: u64(2) })),
  ],
  [
    "another log's uuid echoed",
    "header-mismatch",
    once(isType(RequestType.FLUSH), (_c, r) => ({ ...r, uuid: "someone-else" })),
  ],
  [
    "another luid echoed",
    "header-mismatch",
    once(isType(RequestType.FLUSH), (_c, r) => ({ ...r, luid: 1n })),
  ],
  [
    "an error reply to a MARK",
    "unexpected-error",
    once(
      isType(RequestType.MARK_REGION),
      (c) => ({ seq: c.seq, errno: Errno.EIO, kind: "ack", data: new Uint8Array(0) }),
    ),
  ],
  [
    "a wrong region size",
    "region-size",
    once(isType(RequestType.GET_REGION_SIZE), (_c, r) => ({ ...r, data: u64(512) })),
  ],
  [
    "a device name for a core log",
    "ctr-reply",
    once(isType(RequestType.CTR), (_c, r) => ({ ...r, data: enc.encode("7:1\0") })),
  ],
  [
    "a recovered region reported out of sync",
    "sync-regressed",
    (c, r, m) =>
      c.type === RequestType.IN_SYNC && m.checker(0).sync[c.region] === 1
        ? { ...r, data: u64(0) }
        : r,
  ],
  [
    "a never-recovered region reported in sync",
    "sync-without-recovery",
    once(
      (c, m) => isType(RequestType.IN_SYNC)(c) && m.checker(0).active,
      (_c, r) => ({ ...r, data: u64(1) }),
    ),
  ],
  [
    "a region in sync handed out for resync",
    "resync-in-sync",
    once(
      (c, m) => isType(RequestType.GET_RESYNC_WORK)(c) && m.checker(0).knownIn > 0,
      (_c, r) => ({ ...r, data: pair(1, 0) }),
    ),
  ],
  [
    "a region past the end handed out",
    "resync-out-of-range",
    once(isType(RequestType.GET_RESYNC_WORK), (_c, r) => ({ ...r, data: pair(1, 999) })),
  ],
  [
    "no resync work while regions are out of sync",
    "resync-stalled",
    once(
      (c, m) => isType(RequestType.GET_RESYNC_WORK)(c) && m.checker(0).active,
      (_c, r) => ({ ...r, data: pair(0, 0) }),
    ),
  ],
  [
    "a sync count that drops",
    "sync-count-regressed",
    (c, r, m) =>
      c.type === RequestType.GET_SYNC_COUNT && m.syncCount(0) > 3 ? { ...r, data: u64(1) } : r,
  ],
  [
    "a sync count above the region count",
    "sync-count-range",
    once(isType(RequestType.GET_SYNC_COUNT), (_c, r) => ({ ...r, data: u64(17) })),
  ],
  [
    "an in_sync_hint above an out-of-sync region",
    "hint-too-high",
    once(isType(RequestType.IS_REMOTE_RECOVERING), (_c, r) => ({ ...r, data: pair(0, 16) })),
  ],
  [
    "a wrong status text",
    "status-format",
    once(isType(RequestType.STATUS_INFO), (_c, r) => ({ ...r, data: enc.encode("1 core\0") })),
  ],
];

for (const [what, kind, tamper, opts] of cases) {
  Deno.test(`LogChecker reports ${kind} for ${what}`, () => {
    const m = runTampered(tamper, opts);
    assert.ok(
      kinds(m).includes(kind),
      `expected ${kind}, got ${JSON.stringify(m.violations.kept)}`,
    );
  });
}

Deno.test("LogChecker reports clean-while-marked for an IS_CLEAN probe of a marked region", () => {
  const h = harness({
    kernel: { ioLatencyMs: 5 },
    mirrors: [{ sync: "nosync", initialSync: "in" }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  h.model.submitIo(0, true, 9);
  pump(h, { until: () => h.model.checker(0).marked > 0 });
  h.model.probeClean(0, 9);
  pump(h, { tamper: (c, r) => c.type === RequestType.IS_CLEAN ? { ...r, data: u64(1) } : r });
  assert.deepEqual(kinds(h.model), ["clean-while-marked"]);
  // After the write is done and cleared, clean is the right answer.
  h.model.probeClean(0, 9);
  pump(h);
  assert.equal(h.model.violations.total, 1);
});

Deno.test("LogChecker reports clean-but-out-of-sync for a clean answer about an out-of-sync region", () => {
  const h = harness({ workload: null });
  h.model.command(0, "create");
  pump(h, { until: () => h.model.checker(0).active });
  h.model.probeClean(0, 15);
  pump(h, {
    tamper: (c, r) => c.type === RequestType.IS_CLEAN ? { ...r, data: u64(1) } : r,
    until: () => h.model.stats.replied[RequestType.IS_CLEAN] > 0,
  });
  assert.deepEqual(kinds(h.model), ["clean-but-out-of-sync"]);
});

Deno.test("LogChecker reports bad requests that were accepted, answered with the wrong error, or dropped", () => {
  const h = harness({ workload: { ios: 0, badRequests: BAD_REQUEST_KINDS } });
  pump(h, {
    tamper: (c, r) => {
      if (c.kind !== CallKind.BAD) return r;
      if (c.type === RequestType.IN_SYNC && c.uuid.endsWith("never-constructed")) {
        return { ...r, errno: Errno.EINVAL };
      }
      if (c.type === RequestType.CLEAR_REGION) return { ...r, errno: 0 };
      if (c.type === RequestType.SET_REGION_SYNC) return null;
      if (c.type === 0) return null; // dropping an unknown type is allowed
      return r;
    },
  });
  assert.deepEqual(kinds(h.model).sort(), ["accepted-bad-request", "no-reply", "wrong-errno"]);
});

Deno.test("resync-duplicate: a region handed out twice while the first recovery runs", () => {
  const m = runTampered(
    (c, r, m) =>
      c.type === RequestType.GET_RESYNC_WORK && m.checker(0).handedOut.size > 0
        ? { ...r, data: pair(1, [...m.checker(0).handedOut][0]) }
        : r,
    { kernel: { maxRecovery: 2, recoveryLatencyMs: 1 } },
  );
  assert.ok(kinds(m).includes("resync-duplicate"), JSON.stringify(m.violations.kept.slice(0, 3)));
});

Deno.test("KernelModel.finish() reports requests without reply and mirrors left behind", () => {
  const h = harness({ workload: { ios: 10 } });
  pump(h, { tamper: (c, r) => (c.type === RequestType.RESUME ? null : r), maxMs: 1000 });
  h.model.finish(h.now, true);
  assert.deepEqual(kinds(h.model), ["incomplete", "incomplete"]);
  assert.equal(h.model.outstanding, 1);
});

// ---------------------------------------------------------------------------------------------
// Workload, histogram, PRNG

Deno.test("Workload is deterministic for a seed and differs between seeds", () => {
  const run = (seed: number) => {
    const h = harness({
      kernel: { ioLatencyMs: 0.3 },
      workload: { ios: 100, iodepth: 4, seed, hotRegions: 0.25 },
    });
    pump(h);
    assertClean(h.model);
    return h.sent.map((c) => `${c.type}:${Array.from(c.payload).join(",")}`).join(" ");
  };
  assert.equal(run(7), run(7));
  assert.notEqual(run(7), run(8));
});

Deno.test("Workload with several logs, reads, suspends and status polling finishes every log", () => {
  const h = harness({
    kernel: { ioLatencyMs: 0.2, recoveryLatencyMs: 0.1 },
    mirrors: [{}, { sync: "nosync", initialSync: "in" }, {
      kind: "clustered-disk",
      device: "/dev/loop9",
      initialSync: "unknown",
      afterRestart: "unknown",
    }],
    workload: { ios: 150, iodepth: 8, readShare: 0.5, suspendCycles: 1, statusEveryMs: 0.5 },
  });
  pump(h);
  assertClean(h.model);
  assert.equal(h.workload!.finished, true);
  for (const s of h.workload!.summary()) {
    assert.equal(s.phase, "done");
    assert.equal(s.completed, 150);
    assert.equal(s.suspends, 1);
  }
  assert.equal(h.model.mirrors()[2].lastStatus, "3 clustered-disk /dev/loop9 A");
  const steady = h.workload!.steady;
  assert.ok(
    steady !== null && steady.requests > 0 && steady.endMs > steady.startMs,
    "a window with every log doing I/O",
  );
  // The disk log's first CTR got its device name back.
  const ctr = h.sent.find((c) => c.type === RequestType.CTR && c.uuid === "sim-test-uuid-2")!;
  assert.equal(ctr.cap, 128);
});

Deno.test("Histogram quantiles stay within 1/16 of the true value", () => {
  const hist = new Histogram();
  for (let i = 1; i <= 10000; i++) hist.record(i);
  const s = hist.summary();
  assert.equal(s.count, 10000);
  assert.ok(Math.abs(s.p50Us - 5000) / 5000 <= 1 / 16, `p50 ${s.p50Us}`);
  assert.ok(Math.abs(s.p99Us - 9900) / 9900 <= 1 / 16, `p99 ${s.p99Us}`);
  assert.equal(s.maxUs, 10000);
  assert.equal(new Histogram().summary().p99Us, 0);
});

Deno.test("Prng gives the same sequence for a seed", () => {
  const a = new Prng(42);
  const b = new Prng(42);
  const c = new Prng(43);
  const xs = Array.from({ length: 5 }, () => a.u32());
  assert.deepEqual(xs, Array.from({ length: 5 }, () => b.u32()));
  assert.notDeepEqual(xs, Array.from({ length: 5 }, () => c.u32()));
  for (let i = 0; i < 1000; i++) {
    const v = a.int(10);
    assert.ok(v >= 0 && v < 10 && Number.isInteger(v));
  }
});

Deno.test("KernelModel reports a failed create (no daemon: the CTR cannot be sent)", () => {
  const h = harness({ workload: { ios: 10 } });
  h.model.advance(0);
  const [ctr] = h.model.takeOutgoing();
  assert.equal(ctr.type, RequestType.CTR);
  h.model.onSendError(ctr.seq, Errno.ESRCH, 0);
  h.model.advance(1);
  assert.deepEqual(kinds(h.model), ["create-failed"]);
  assert.equal(h.model.state(0), "failed");
  assert.equal(h.workload!.finished, true);
  assert.equal(h.model.takeOutgoing().length, 0, "nothing more is sent for a failed mirror");
});

Deno.test("LogChecker.onRestart() resets knowledge once per restart, not for a stale -ESRCH", () => {
  const violations = new ViolationLog();
  const checker = new LogChecker({
    uuid: "u",
    luid: 1n,
    layout: "current",
    version: 3,
    kind: "clustered-core",
    regionSize: 8,
    regionCount: 4,
    sync: "default",
    initialSync: "out",
    exclusive: true,
    afterRestart: "fresh",
  }, violations);
  const call = (type: number, payload: Uint8Array, region = -1, v0 = 0): Call => {
    const c = new Call();
    c.type = type;
    c.uuid = "u";
    c.luid = 1n;
    c.payload = payload;
    c.region = region;
    c.v0 = v0;
    checker.onSend(c);
    return c;
  };
  const reply = (c: Call, data = new Uint8Array(0), errno = 0) => {
    c.errno = errno;
    checker.onReply(c, { kind: "full", data, uuid: "u", luid: 1n }, 0);
  };
  reply(call(RequestType.RESUME, new Uint8Array(0)));
  assert.equal(checker.knownOut, 4, "a fresh core log: every region out of sync");
  const srs = new Uint8Array(16);
  srs[8] = 1;
  reply(call(RequestType.SET_REGION_SYNC, srs, 0, 1));
  assert.equal(checker.knownIn, 1);
  // Two kernel threads had requests out when the daemon restarted.
  const a = call(RequestType.IN_SYNC, u64(1), 1);
  const b = call(RequestType.GET_SYNC_COUNT, new Uint8Array(0));
  reply(a, new Uint8Array(0), Errno.ESRCH);
  checker.onRestart(a);
  assert.equal(checker.knownIn, 0, "the fresh daemon has nothing in sync");
  // After the re-CTR the new daemon's resync sets region 0 in sync again ...
  reply(call(RequestType.SET_REGION_SYNC, srs, 0, 1));
  assert.equal(checker.knownIn, 1);
  // ... and the other thread's -ESRCH, from before, arrives only now: nothing is forgotten.
  reply(b, new Uint8Array(0), Errno.ESRCH);
  checker.onRestart(b);
  assert.equal(checker.knownIn, 1);
  assert.equal(checker.epoch, 1);
  assert.equal(violations.total, 0);
});

Deno.test("LogChecker reports recovering-while-suspended: the kernel's suspend would never end", () => {
  // A write to a region the resync has not reached waits while the log says "recovering" (as
  // cmirrord and clogd answer for any out-of-sync region). Suspending stops the resync; a
  // daemon that keeps answering "recovering" after PRESUSPEND holds that write forever.
  const h = harness({ kernel: { recoveryLatencyMs: 10_000 }, workload: null });
  const tamper: Tamper = (c, r) => {
    if (c.type !== RequestType.IS_REMOTE_RECOVERING) return r;
    const log = h.daemon.logs.get(c.uuid)!;
    return { ...r, data: pair(log.sync[readU64(c.payload, 0)] === 1 ? 0 : 1, log.lowestOut()) };
  };
  h.model.command(0, "create");
  pump(h, { tamper, until: () => h.model.state(0) === "active" });
  h.model.submitIo(0, true, 15);
  pump(h, { tamper, maxMs: h.now + 600 });
  assert.equal(h.model.stats.writesDone, 0, "the write waits for the resync");
  h.model.command(0, "suspend");
  // The suspend first waits for the region being copied (10 s), then sends PRESUSPEND.
  pump(h, { tamper, maxMs: h.now + 30_000 });
  assert.equal(h.model.state(0), "active", "the suspend is stuck, as it would be in the kernel");
  assert.equal(h.model.stats.sent[RequestType.PRESUSPEND], 1);
  assert.equal(h.model.stats.sent[RequestType.POSTSUSPEND], 0);
  assert.ok(
    kinds(h.model).includes("recovering-while-suspended"),
    JSON.stringify(h.model.violations.kept),
  );
});

Deno.test("KernelModel seqs wrap around 2^32 like the kernel's u32 counter", () => {
  const h = harness({ kernel: { firstSeq: 2 ** 32 - 5 }, workload: { ios: 20 } });
  pump(h);
  assert.deepEqual(h.sent.slice(0, 7).map((c) => c.seq), [
    2 ** 32 - 5,
    2 ** 32 - 4,
    2 ** 32 - 3,
    2 ** 32 - 2,
    2 ** 32 - 1,
    0,
    1,
  ]);
  assertClean(h.model);
  // A reply to a seq from before the wrap that was answered already is a duplicate.
  h.model.onReply({ seq: 2 ** 32 - 5, errno: 0, kind: "ack", data: new Uint8Array(0) }, h.now);
  assert.deepEqual(kinds(h.model), ["duplicate-reply"]);
});

Deno.test("KernelModel retries after -ESRCH with the reply room the -ESRCH reply left (fill_pkg)", () => {
  // The real 6.1 kernel stores a reply's data_size in the caller's reply-size variable and
  // reuses it for the retry after re-CTR and RESUME: an -ESRCH reply with data_size 0 makes
  // the retried GET_SYNC_COUNT's 8-byte answer "Insufficient space" (seen under qemu).
  const h = harness({
    mirrors: [{ kind: "clustered-core", initialSync: "unknown" }],
    workload: QUIET,
  });
  let tampered = false;
  pump(h, {
    tamper: (call, reply) => {
      if (
        !tampered && call.type === RequestType.GET_SYNC_COUNT &&
        h.daemon.logs.get(call.uuid)?.resumed
      ) {
        tampered = true;
        h.daemon.logs.clear();
        return { seq: call.seq, errno: Errno.ESRCH, kind: "full", data: new Uint8Array(0) };
      }
      return reply;
    },
  });
  assert.ok(tampered);
  assert.deepEqual(kinds(h.model), ["too-large"], "the retried request's answer no longer fits");
});

// ---------------------------------------------------------------------------------------------
// Holds and slow requests (kernel-sim --snapshot, for the cluster tests' disk log check)

Deno.test("LogChecker.holds gets a mark once a later FLUSH is answered and loses it at its CLEAR", () => {
  const h = harness({
    kernel: { ioLatencyMs: 5 },
    mirrors: [{ sync: "nosync", initialSync: "in", trackHolds: true }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  const checker = h.model.checker(0);
  h.model.submitIo(0, true, 9);
  pump(h, { until: () => checker.marked > 0 });
  assert.equal(checker.holds.has(9), false, "acknowledged, not yet flushed");
  pump(h, { until: () => checker.holds.has(9) });
  const last = h.sent.at(-1)!;
  assert.equal(requestTypeName(last.type), "FLUSH");
  assert.equal(checker.holds.get(9), h.now, "held from the FLUSH's answer");
  pump(h, { until: () => h.sent.at(-1)!.type === RequestType.CLEAR_REGION });
  assert.equal(checker.holds.size, 0, "released when the CLEAR is sent");
  pump(h);
  assert.equal(h.model.stats.writesDone, 1);
  assertClean(h.model);
});

Deno.test("LogChecker.holds with integrated flush: the FLUSH carrying the mark makes it durable", () => {
  const h = harness({
    kernel: { ioLatencyMs: 5 },
    mirrors: [{ sync: "nosync", initialSync: "in", integratedFlush: true, trackHolds: true }],
    workload: null,
  });
  h.model.command(0, "create");
  pump(h);
  const checker = h.model.checker(0);
  h.model.submitIo(0, true, 3);
  pump(h, { until: () => checker.holds.has(3) });
  assert.equal(requestTypeName(h.sent.at(-1)!.type), "FLUSH");
  assert.deepEqual(h.sent.at(-1)!.regions, [3]);
});

Deno.test("LogChecker.holds and syncedAt stay empty without trackHolds and are reset by -ESRCH", () => {
  const plain = harness({ kernel: { ioLatencyMs: 5 }, workload: QUIET });
  pump(plain, { maxMs: 1000 });
  plain.model.submitIo(0, true, 1);
  pump(plain, { until: () => plain.model.checker(0).marked > 0 });
  pump(plain, { until: () => plain.sent.at(-1)!.type === RequestType.CLEAR_REGION });
  assert.equal(plain.model.checker(0).holds.size, 0);
  assert.equal(plain.model.checker(0).syncedAt.size, 0);

  const h = harness({
    kernel: { ioLatencyMs: 50 },
    mirrors: [{ trackHolds: true }],
    workload: QUIET,
  });
  pump(h, { maxMs: 1000 });
  const checker = h.model.checker(0);
  // The resync set every region of the fresh core log in sync.
  assert.equal(checker.syncedAt.size, h.model.regionCount(0));
  h.model.submitIo(0, true, 2);
  pump(h, { until: () => checker.holds.has(2) });
  // A read's IN_SYNC, while the write's mark on region 2 is held, gets -ESRCH.
  h.model.submitIo(0, false, 5);
  let heldAtRestart = false;
  pump(h, {
    until: () => heldAtRestart,
    tamper: (call, reply) => {
      if (heldAtRestart || call.type !== RequestType.IN_SYNC) return reply;
      heldAtRestart = checker.holds.has(2);
      h.daemon.logs.clear();
      return { seq: call.seq, errno: Errno.ESRCH, kind: "ack", data: new Uint8Array(0) };
    },
  });
  assert.ok(heldAtRestart);
  assert.equal(checker.holds.size, 0, "the daemon lost the log, and the mark with it");
});

Deno.test("KernelModel.slow lists answers slower than slowRequestMs and timeouts", () => {
  const h = harness({ kernel: { timeoutMs: 100, slowRequestMs: 40 }, workload: { ios: 0 } });
  let held: { reply: ModelReply; at: number } | null = null;
  let dropped = false;
  pump(h, {
    tamper: (call, reply) => {
      if (call.type === RequestType.GET_SYNC_COUNT && held === null && reply !== null) {
        held = { reply, at: h.now };
        return null;
      }
      if (held !== null && h.now - held.at > 50 && h.now - held.at < 100 && !dropped) {
        dropped = true;
        h.model.onReply(held.reply, h.now); // answered late, but before the timeout
      }
      if (call.type === RequestType.GET_RESYNC_WORK && !dropped) return null; // times out
      return reply;
    },
  });
  const outcomes = h.model.slow.map((s) => `${requestTypeName(s.type)} ${s.outcome}`);
  assert.ok(outcomes.includes("GET_RESYNC_WORK timeout"), outcomes.join(", "));
  for (const s of h.model.slow) {
    assert.ok(s.doneAt - s.sentAt >= 40, `${s.doneAt - s.sentAt} ms is not slow`);
  }
  const quick = harness({ kernel: { slowRequestMs: 40 }, workload: { ios: 0 } });
  pump(quick);
  assert.deepEqual(quick.model.slow, [], "replies at once are not slow");
  assert.equal(quick.model.oldestWaiting(), null);
});

Deno.test("Workload.finishNow() ends a timed run early with the removal, without waiting for the resync", () => {
  const h = harness({
    kernel: { ioLatencyMs: 5 },
    mirrors: [{}, {}],
    workload: { durationMs: 3_600_000, iodepth: 4, ioAfterSync: false, waitSync: true },
  });
  pump(h, { until: () => h.model.stats.writesDone > 20 });
  const mid = h.workload!.summary();
  assert.deepEqual(mid.map((r) => r.phase), ["io", "io"]);
  h.workload!.finishNow(h.now);
  pump(h, { maxMs: h.now + 60_000 });
  assert.equal(h.workload!.finished, true);
  assert.deepEqual(h.workload!.summary().map((r) => r.phase), ["done", "done"]);
  assert.equal(h.model.state(0), "removed");
  const after = h.workload!.summary();
  for (const [i, r] of after.entries()) assert.equal(r.completed, r.submitted, `log ${i}`);
  assert.ok(h.now < 60_000, "did not run for the hour it was given");
  assertClean(h.model);
});
