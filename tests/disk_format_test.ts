import assert from "node:assert/strict";
import {
  bitmapBytes,
  decodeHeader,
  encodeHeader,
  HEADER_AREA_BYTES,
  interpretLoad,
  LOG_MAGIC,
  LOG_VERSION,
  logAreaSize,
} from "../src/disk/format.ts";

/** A log area as the kernel would have written it: header fields, then bits. */
function area(
  fields: { magic?: number; version?: number; nrRegions: bigint },
  cleanRegions: number[],
  regionCount: number,
  logicalBlockSize = 512,
): Uint8Array {
  const bytes = new Uint8Array(logAreaSize(regionCount, logicalBlockSize));
  const view = new DataView(bytes.buffer);
  view.setUint32(0, fields.magic ?? LOG_MAGIC, true);
  view.setUint32(4, fields.version ?? LOG_VERSION, true);
  view.setBigUint64(8, fields.nrRegions, true);
  for (const r of cleanRegions) bytes[HEADER_AREA_BYTES + (r >> 3)] |= 1 << (r & 7);
  return bytes;
}

function setBits(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < bits.length * 8; i++) if ((bits[i >> 3] >> (i & 7)) & 1) out.push(i);
  return out;
}

Deno.test("bitmapBytes() rounds the region count up to whole 32-bit words", () => {
  assert.equal(bitmapBytes(0), 0);
  assert.equal(bitmapBytes(1), 4);
  assert.equal(bitmapBytes(32), 4);
  assert.equal(bitmapBytes(33), 8);
  assert.equal(bitmapBytes(1000), 128); // 32 words
  assert.throws(() => bitmapBytes(-1), /Region count -1 out of range/);
  assert.throws(() => bitmapBytes(1.5), /out of range/);
});

Deno.test("logAreaSize() rounds header area plus bitmap up to the logical block size", () => {
  // 1024 header bytes + 4 bitmap bytes = 1028 -> three 512-byte blocks.
  assert.equal(logAreaSize(1, 512), 1536);
  // Exactly two blocks when the bitmap is empty.
  assert.equal(logAreaSize(0, 512), 1024);
  // 1024 + 1024 bytes of bitmap (8192 regions) fits 2048 exactly.
  assert.equal(logAreaSize(8192, 512), 2048);
  assert.equal(logAreaSize(8193, 512), 2560);
  // 4096-byte blocks: header and 3072 bitmap bytes share the first block.
  assert.equal(logAreaSize(8192, 4096), 4096);
  assert.equal(logAreaSize(3072 * 8 + 1, 4096), 8192);
  assert.throws(() => logAreaSize(10, 1000), /Logical block size 1000 invalid/);
  assert.throws(() => logAreaSize(10, 256), /Logical block size 256 invalid/);
});

Deno.test("encodeHeader() writes magic, version and nr_regions little-endian at 0, 4, 8", () => {
  const nr = 2n ** 40n + 0x0102n;
  const header = encodeHeader(nr);
  assert.equal(header.length, HEADER_AREA_BYTES);
  // "MiRr" = 0x4D695272 stored least significant byte first.
  assert.deepEqual([...header.subarray(0, 4)], [0x72, 0x52, 0x69, 0x4D]);
  assert.deepEqual([...header.subarray(4, 8)], [2, 0, 0, 0]);
  assert.deepEqual([...header.subarray(8, 16)], [0x02, 0x01, 0, 0, 0, 1, 0, 0]);
  assert.ok(header.subarray(16).every((b) => b === 0), "unused header bytes are zero");
  assert.throws(() => encodeHeader(-1), /does not fit in a u64/);
  assert.throws(() => encodeHeader(2n ** 64n), /does not fit in a u64/);
});

Deno.test("decodeHeader() reads back what encodeHeader() wrote, u64 included", () => {
  for (const nr of [0n, 1n, 16384n, 2n ** 53n + 1n, 2n ** 64n - 1n]) {
    const header = decodeHeader(encodeHeader(nr));
    assert.deepEqual(header, { magic: LOG_MAGIC, version: LOG_VERSION, nrRegions: nr });
  }
  // Works on a view into a larger buffer (offset != 0).
  const big = new Uint8Array(HEADER_AREA_BYTES + 10);
  big.set(encodeHeader(77), 10);
  assert.equal(decodeHeader(big.subarray(10)).nrRegions, 77n);
  assert.throws(() => decodeHeader(new Uint8Array(15)), /needs 16 bytes, got 15/);
});

Deno.test("interpretLoad() returns the stored clean bits of a valid v2 log", () => {
  const regions = 100;
  const clean = [0, 1, 31, 32, 63, 99];
  const result = interpretLoad(area({ nrRegions: 100n }, clean, regions), {
    regionCount: regions,
    sync: "default",
  });
  assert.equal(result.warning, undefined);
  assert.ok(result.image);
  assert.equal(result.image.nrRegions, 100);
  assert.equal(result.image.failed, undefined);
  assert.equal(result.image.cleanBits.length, bitmapBytes(regions));
  assert.deepEqual(setBits(result.image.cleanBits), clean);
});

Deno.test("interpretLoad() starts a fresh log when the table says sync or nosync", () => {
  const bytes = area({ nrRegions: 64n }, [1, 2, 3], 64);
  assert.deepEqual(interpretLoad(bytes, { regionCount: 64, sync: "sync" }), {});
  assert.deepEqual(interpretLoad(bytes, { regionCount: 64, sync: "nosync" }), {});
  // The same bytes are a valid log without the sync word: the rule, not the data, decided.
  assert.ok(interpretLoad(bytes, { regionCount: 64, sync: "default" }).image);
});

Deno.test("interpretLoad() starts a fresh log on a wrong magic, whatever the version", () => {
  const zeros = new Uint8Array(logAreaSize(64, 512));
  assert.deepEqual(interpretLoad(zeros, { regionCount: 64, sync: "default" }), {});
  // An unknown version behind a wrong magic is not a failure: the kernel checks magic first.
  const other = area({ magic: 0x12345678, version: 9, nrRegions: 64n }, [5], 64);
  assert.deepEqual(interpretLoad(other, { regionCount: 64, sync: "default" }), {});
  // A magic written big-endian is a wrong magic: the format is little-endian everywhere.
  const swapped = area({ nrRegions: 64n }, [5], 64);
  new DataView(swapped.buffer).setUint32(0, LOG_MAGIC, false);
  assert.deepEqual(interpretLoad(swapped, { regionCount: 64, sync: "default" }), {});
});

Deno.test("interpretLoad() upgrades a version 1 log and keeps its bits", () => {
  const result = interpretLoad(area({ version: 1, nrRegions: 64n }, [3, 40], 64), {
    regionCount: 64,
    sync: "default",
  });
  assert.equal(result.warning, undefined);
  assert.ok(result.image);
  assert.equal(result.image.failed, undefined);
  assert.deepEqual(setBits(result.image.cleanBits), [3, 40]);
});

Deno.test("interpretLoad() fails the log device on an unknown version: all out of sync", () => {
  for (const version of [0, 3, 0x02000000 /* 2 written big-endian */]) {
    const result = interpretLoad(area({ version, nrRegions: 64n }, [0, 1, 2, 63], 64), {
      regionCount: 64,
      sync: "default",
    });
    assert.ok(result.image, `version ${version}`);
    assert.equal(result.image.failed, true);
    assert.equal(result.image.nrRegions, 0);
    assert.equal(result.image.cleanBits.length, 8);
    assert.deepEqual(setBits(result.image.cleanBits), [], "no region may read clean");
    assert.match(result.warning ?? "", new RegExp(`Incompatible disk log version ${version} `));
  }
});

Deno.test("interpretLoad() clears regions beyond a smaller stored nr_regions (grown mirror)", () => {
  // Stored for 40 regions, all clean; the mirror now has 100.
  const clean = Array.from({ length: 100 }, (_, i) => i);
  const result = interpretLoad(area({ nrRegions: 40n }, clean, 100), {
    regionCount: 100,
    sync: "default",
  });
  assert.ok(result.image);
  assert.equal(result.image.nrRegions, 40);
  assert.deepEqual(setBits(result.image.cleanBits), clean.slice(0, 40));
});

Deno.test("interpretLoad() clears bits past the region count (shrunk mirror)", () => {
  // Stored for 64 regions, all clean, read for a mirror of 40: bits 40..63 are padding now.
  const all = Array.from({ length: 64 }, (_, i) => i);
  const bytes = area({ nrRegions: 64n }, all, 64);
  const result = interpretLoad(bytes, { regionCount: 40, sync: "default" });
  assert.ok(result.image);
  assert.equal(result.image.nrRegions, 64);
  assert.equal(result.image.cleanBits.length, 8);
  assert.deepEqual(setBits(result.image.cleanBits), all.slice(0, 40));
  // The caller's buffer is not modified.
  assert.equal(bytes[HEADER_AREA_BYTES + 7], 0xFF);
});

Deno.test("interpretLoad() clamps an absurd nr_regions and rejects a short area", () => {
  const result = interpretLoad(area({ nrRegions: 2n ** 63n }, [1], 32), {
    regionCount: 32,
    sync: "default",
  });
  assert.equal(result.image?.nrRegions, Number.MAX_SAFE_INTEGER);
  assert.deepEqual(setBits(result.image?.cleanBits ?? new Uint8Array()), [1]);
  assert.throws(
    () => interpretLoad(new Uint8Array(1024), { regionCount: 32, sync: "default" }),
    /Log area too short: need 1028 bytes for 32 regions, got 1024/,
  );
});
