import assert from "node:assert/strict";
import { Errno, RequestType } from "../src/kernel/protocol.ts";
import {
  isOpParseError,
  type OpParseError,
  parseOp,
  readS64,
  readU64,
  REGION_OUT_OF_RANGE,
  remoteRecoveringBytes,
  resyncWorkBytes,
  s64Bytes,
  statusBytes,
  u64Bytes,
} from "../src/log/ops.ts";
import type { Op } from "../src/log/types.ts";

/** Little-endian u64 payload from bigints (exact, unlike numbers above 2^53). */
function u64s(...values: bigint[]): Uint8Array {
  const out = new Uint8Array(values.length * 8);
  const view = new DataView(out.buffer);
  values.forEach((v, i) => view.setBigUint64(i * 8, v, true));
  return out;
}

function op(type: number, payload: Uint8Array = new Uint8Array(0)): Op {
  const r = parseOp(type, payload);
  if (isOpParseError(r)) throw new Error(`parseOp(${type}) failed: ${r.reason}`);
  return r;
}

function refused(type: number, payload: Uint8Array = new Uint8Array(0)): OpParseError {
  const r = parseOp(type, payload);
  assert.ok(isOpParseError(r), `parseOp(${type}) should fail, got ${JSON.stringify(r)}`);
  assert.equal(r.errno, Errno.EINVAL);
  assert.ok(r.reason.length > 0);
  return r;
}

Deno.test("parseOp() decodes every request type without a payload", () => {
  assert.deepEqual(op(RequestType.PRESUSPEND), { op: "presuspend" });
  assert.deepEqual(op(RequestType.POSTSUSPEND), { op: "postsuspend" });
  assert.deepEqual(op(RequestType.RESUME), { op: "resume" });
  assert.deepEqual(op(RequestType.GET_REGION_SIZE), { op: "get_region_size" });
  assert.deepEqual(op(RequestType.GET_RESYNC_WORK), { op: "get_resync_work" });
  assert.deepEqual(op(RequestType.GET_SYNC_COUNT), { op: "get_sync_count" });
  assert.deepEqual(op(RequestType.STATUS_INFO), { op: "status_info" });
  assert.deepEqual(op(RequestType.STATUS_TABLE), { op: "status_table" });
  assert.deepEqual(op(RequestType.FLUSH), { op: "flush", marks: [] });
});

Deno.test("parseOp() refuses a payload on a type that has none", () => {
  for (
    const type of [3, 4, 5, 6, 12, 14, 15, 16]
  ) {
    assert.match(refused(type, new Uint8Array(8)).reason, /expects no payload/);
  }
});

Deno.test("parseOp() decodes single-region requests and checks their size", () => {
  assert.deepEqual(op(RequestType.IS_CLEAN, u64s(5n)), { op: "is_clean", region: 5 });
  assert.deepEqual(op(RequestType.IN_SYNC, u64s(127n)), { op: "in_sync", region: 127 });
  assert.deepEqual(op(RequestType.IS_REMOTE_RECOVERING, u64s(64n)), {
    op: "is_remote_recovering",
    region: 64,
  });
  for (
    const type of [RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.IS_REMOTE_RECOVERING]
  ) {
    refused(type);
    refused(type, new Uint8Array(7));
    refused(type, new Uint8Array(16));
  }
});

Deno.test("parseOp() decodes region lists for MARK, CLEAR and integrated FLUSH", () => {
  assert.deepEqual(op(RequestType.MARK_REGION, u64s(1n, 2n, 3n)), {
    op: "mark",
    regions: [1, 2, 3],
  });
  assert.deepEqual(op(RequestType.CLEAR_REGION, u64s(9n)), { op: "clear", regions: [9] });
  assert.deepEqual(op(RequestType.FLUSH, u64s(4n, 0n)), { op: "flush", marks: [4, 0] });
  const max = u64s(...Array.from({ length: 32 }, (_, i) => BigInt(i)));
  assert.equal((op(RequestType.MARK_REGION, max) as { regions: number[] }).regions.length, 32);
  const tooMany = u64s(...Array.from({ length: 33 }, (_, i) => BigInt(i)));
  assert.match(refused(RequestType.MARK_REGION, tooMany).reason, /33 regions/);
  assert.match(refused(RequestType.FLUSH, tooMany).reason, /33 regions/);
  assert.match(refused(RequestType.CLEAR_REGION, new Uint8Array(12)).reason, /not a list/);
});

Deno.test("parseOp() decodes SET_REGION_SYNC with C truth for in_sync", () => {
  const payload = (region: bigint, inSync: bigint) => {
    const b = new Uint8Array(16);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, region, true);
    v.setBigInt64(8, inSync, true);
    return b;
  };
  assert.deepEqual(op(RequestType.SET_REGION_SYNC, payload(7n, 1n)), {
    op: "set_region_sync",
    region: 7,
    inSync: true,
  });
  assert.deepEqual(op(RequestType.SET_REGION_SYNC, payload(7n, 0n)), {
    op: "set_region_sync",
    region: 7,
    inSync: false,
  });
  assert.equal(
    (op(RequestType.SET_REGION_SYNC, payload(7n, 1n << 40n)) as { inSync: boolean }).inSync,
    true,
  );
  assert.equal(
    (op(RequestType.SET_REGION_SYNC, payload(7n, -1n)) as { inSync: boolean }).inSync,
    true,
  );
  refused(RequestType.SET_REGION_SYNC, new Uint8Array(8));
  refused(RequestType.SET_REGION_SYNC, new Uint8Array(24));
});

Deno.test("parseOp() keeps huge u64 regions out of range instead of wrapping them", () => {
  const region = (v: bigint) => (op(RequestType.IN_SYNC, u64s(v)) as { region: number }).region;
  assert.equal(region(2n ** 31n), 2 ** 31);
  assert.equal(region(2n ** 32n - 1n), 2 ** 32 - 1);
  assert.equal(region(2n ** 53n - 1n), 2 ** 53 - 1);
  assert.equal(region(2n ** 53n), REGION_OUT_OF_RANGE);
  assert.equal(region(2n ** 63n), REGION_OUT_OF_RANGE);
  assert.equal(region(2n ** 64n - 1n), REGION_OUT_OF_RANGE);
  // Still a valid u64 for any codec that writes it back out.
  assert.deepEqual([...u64Bytes(REGION_OUT_OF_RANGE)], [...u64s(2n ** 53n)]);
  assert.deepEqual(
    (op(RequestType.MARK_REGION, u64s(1n, 2n ** 64n - 1n)) as { regions: number[] }).regions,
    [1, REGION_OUT_OF_RANGE],
  );
});

Deno.test("parseOp() refuses CTR, DTR and unknown request types", () => {
  assert.match(
    refused(RequestType.CTR, new TextEncoder().encode("131072 clustered-core 1024")).reason,
    /node/,
  );
  refused(RequestType.DTR);
  for (const type of [0, 18, 255, 256, -1]) {
    assert.match(refused(type).reason, /Unknown request type/);
  }
});

Deno.test("u64Bytes() and s64Bytes() encode little-endian and reject what does not fit", () => {
  assert.deepEqual([...u64Bytes(1024)], [0, 4, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...u64Bytes(2 ** 32 + 1)], [1, 0, 0, 0, 1, 0, 0, 0]);
  assert.equal(readU64(u64Bytes(2 ** 53 - 1)), 2 ** 53 - 1);
  assert.deepEqual([...s64Bytes(-1)], [255, 255, 255, 255, 255, 255, 255, 255]);
  assert.equal(readS64(s64Bytes(-5)), -5);
  assert.throws(() => u64Bytes(-1), RangeError);
  assert.throws(() => u64Bytes(2 ** 64), RangeError);
  assert.deepEqual([...u64Bytes(2 ** 63)], [...u64s(2n ** 63n)]);
  assert.throws(() => u64Bytes(1.5), RangeError);
  assert.throws(() => s64Bytes(Number.NaN), RangeError);
});

Deno.test("resyncWorkBytes() and remoteRecoveringBytes() lay out {s64; u64}", () => {
  const work = resyncWorkBytes(true, 300);
  assert.equal(work.byteLength, 16);
  assert.equal(readS64(work, 0), 1);
  assert.equal(readU64(work, 8), 300);
  assert.deepEqual([...resyncWorkBytes(false, 0)], new Array(16).fill(0));
  const rr = remoteRecoveringBytes(false, 128);
  // The fixture's bytes for "is_recovering=0 in_sync_hint=128".
  assert.deepEqual(
    [...rr],
    [0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0],
  );
  assert.equal(readS64(remoteRecoveringBytes(true, 3), 0), 1);
});

Deno.test("statusBytes() NUL-terminates the text and counts the NUL", () => {
  const b = statusBytes("1 clustered-core");
  assert.equal(b.byteLength, 17);
  assert.equal(b[16], 0);
  assert.equal(new TextDecoder().decode(b.subarray(0, 16)), "1 clustered-core");
});
