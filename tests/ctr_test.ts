import assert from "node:assert/strict";
import {
  isCtrError,
  MAX_REGION_COUNT,
  parseCtr,
  type ParseCtrOptions,
  statusInfoText,
  statusTableText,
} from "../src/log/ctr.ts";
import type { CtrArgs } from "../src/log/types.ts";

function parsed(text: string, options: ParseCtrOptions = {}): CtrArgs {
  const r = parseCtr(text, options);
  if (isCtrError(r)) throw new Error(`parseCtr(${JSON.stringify(text)}) failed: ${r.error}`);
  return r;
}

function rejected(text: string, options: ParseCtrOptions = {}): string {
  const r = parseCtr(text, options);
  assert.ok(
    isCtrError(r),
    `parseCtr(${JSON.stringify(text)}) should fail, got ${JSON.stringify(r)}`,
  );
  // House style for error messages.
  assert.match(r.error, /^[A-Z]/);
  assert.doesNotMatch(r.error, /\.$/);
  return r.error;
}

Deno.test("parseCtr() reads the current kernel's clustered-core string", () => {
  assert.deepEqual(parsed("131072 clustered-core 1024"), {
    targetSectors: 131072,
    kind: "clustered-core",
    regionSize: 1024,
    regionCount: 128,
    sync: "default",
    blockOnError: false,
    argv: ["clustered-core", "1024"],
  });
});

Deno.test("parseCtr() reads a clustered-disk string with device and nosync", () => {
  assert.deepEqual(parsed("2097152 clustered-disk 253:3 1024 nosync"), {
    targetSectors: 2097152,
    kind: "clustered-disk",
    device: "253:3",
    regionSize: 1024,
    regionCount: 2048,
    sync: "nosync",
    blockOnError: false,
    argv: ["clustered-disk", "253:3", "1024", "nosync"],
  });
});

Deno.test("parseCtr() takes sync, nosync and block_on_error in any order", () => {
  const a = parsed("4096 clustered-core 1024 block_on_error sync");
  assert.equal(a.sync, "sync");
  assert.equal(a.blockOnError, true);
  const b = parsed("4096 clustered-disk /dev/vg/log 1024 nosync block_on_error");
  assert.equal(b.sync, "nosync");
  assert.equal(b.blockOnError, true);
  assert.equal(b.device, "/dev/vg/log");
});

Deno.test("parseCtr() accepts the underscore spellings of early drafts", () => {
  assert.equal(parsed("131072 clustered_core 1024").kind, "clustered-core");
  assert.equal(parsed("131072 clustered_disk 8:16 1024").kind, "clustered-disk");
});

Deno.test("parseCtr() tolerates trailing NULs (a re-CTR counts the NUL)", () => {
  assert.equal(parsed("131072 clustered-core 1024\0").regionCount, 128);
  assert.equal(parsed("131072 clustered-core 1024\0\0").regionCount, 128);
  rejected("131072 clustered-core\0 1024");
});

Deno.test("parseCtr() rounds the region count up", () => {
  assert.equal(parsed("1000 clustered-core 512").regionCount, 2);
  assert.equal(parsed("1024 clustered-core 512").regionCount, 2);
  assert.equal(parsed("1025 clustered-core 512").regionCount, 3);
  // A region larger than the device still makes one region (the kernel's userspace log allows it).
  assert.equal(parsed("100 clustered-core 1024").regionCount, 1);
});

Deno.test("parseCtr() reads the 2009 layout with the length last and no type word", () => {
  // The 2009 kernel sent the type's own argv (region size, uuid, [no]sync) then ti->len.
  const core = parsed("1024 LVM-abcdef nosync 131072");
  assert.equal(core.kind, "clustered-core");
  assert.equal(core.targetSectors, 131072);
  assert.equal(core.regionSize, 1024);
  assert.equal(core.regionCount, 128);
  assert.equal(core.sync, "nosync");
  assert.deepEqual(core.argv, ["1024", "LVM-abcdef", "nosync"]);
  const disk = parsed("253:3 1024 LVM-abcdef 2097152");
  assert.equal(disk.kind, "clustered-disk");
  assert.equal(disk.device, "253:3");
  assert.equal(disk.regionCount, 2048);
  assert.equal(disk.sync, "default");
  // Without the uuid (which the 2009 kernel always sent) the shape is not a CTR string.
  assert.match(rejected("1024 131072"), /Unrecognized/);
  assert.match(rejected("1024 nosync 131072"), /needs the log uuid/);
});

Deno.test("parseCtr() only accepts the layouts of the header layout it is told", () => {
  assert.match(rejected("1024 LVM-abcdef nosync 131072", { layout: "current" }), /Unrecognized/);
  assert.match(rejected("clustered-core 1024 131072", { layout: "current" }), /Unrecognized/);
  assert.match(
    rejected("131072 clustered-core 1024", { layout: "2009" }),
    /larger than the target/,
  );
  assert.equal(parsed("1024 LVM-abcdef 131072", { layout: "2009" }).regionCount, 128);
  assert.equal(parsed("131072 clustered-core 1024", { layout: "current" }).regionCount, 128);
});

Deno.test("parseCtr() reads a type-first layout with the length last", () => {
  const a = parsed("clustered_core 1024 131072");
  assert.equal(a.kind, "clustered-core");
  assert.equal(a.regionCount, 128);
  const b = parsed("clustered-disk 253:3 1024 nosync 2097152");
  assert.equal(b.device, "253:3");
  assert.equal(b.sync, "nosync");
  assert.equal(b.targetSectors, 2097152);
});

Deno.test("parseCtr() rejects region sizes the kernel rejects", () => {
  assert.match(rejected("131072 clustered-core 0"), /power of two/);
  assert.match(rejected("131072 clustered-core 1"), /power of two/);
  assert.match(rejected("131072 clustered-core 1000"), /power of two/);
  assert.match(rejected("131072 clustered-core 4294967296"), /power of two/);
  assert.match(rejected("131072 clustered-core abc"), /Region size/);
  assert.match(rejected("131072 clustered-core -1024"), /Region size/);
  assert.match(rejected("131072 clustered-core 0x400"), /Region size/);
  assert.match(rejected("131072 clustered-core"), /Region size/);
  assert.equal(parsed("131072 clustered-core 2").regionCount, 65536);
  assert.equal(parsed("4294967296 clustered-core 2147483648").regionCount, 2);
});

Deno.test("parseCtr() bounds the region count at MAX_REGION_COUNT", () => {
  assert.equal(parsed(`${2 * MAX_REGION_COUNT} clustered-core 2`).regionCount, MAX_REGION_COUNT);
  assert.match(rejected(`${2 * MAX_REGION_COUNT + 1} clustered-core 2`), /more than 2147483648/);
  assert.match(rejected("0 clustered-core 1024"), /at least 1 sector/);
  assert.match(rejected("99999999999999999999 clustered-core 1024"), /too large/);
});

Deno.test("parseCtr() rejects conflicting, repeated and unknown arguments", () => {
  assert.match(rejected("131072 clustered-core 1024 sync nosync"), /Both sync and nosync/);
  assert.match(rejected("131072 clustered-core 1024 nosync nosync"), /Both nosync and nosync/);
  assert.match(rejected("131072 clustered-core 1024 block_on_error block_on_error"), /twice/);
  assert.match(rejected("131072 clustered-core 1024 integrated_flush"), /Unknown log argument/);
  assert.match(rejected("131072 clustered-core 1024 2048"), /Unknown log argument/);
  assert.match(rejected("131072 clustered-disk 1024"), /log device/);
  assert.match(rejected("131072 clustered-disk"), /log device/);
  // An unknown type word in the current layout looks like a 2009 string; the region size
  // (larger than the target) gives it away, and a known layout settles it.
  assert.match(rejected("131072 core 1024"), /larger than the target/);
  assert.match(rejected("1024 core 131072", { layout: "current" }), /Unrecognized CTR string/);
  assert.match(rejected("clustered-core 1024"), /Region size/);
  assert.match(rejected("clustered-core"), /Target length/);
  assert.match(rejected(""), /empty/);
  assert.match(rejected("   \0"), /empty/);
  assert.match(rejected("131072 clustered-disk d\u00e9v 1024"), /non-ASCII/);
  assert.match(rejected("x".repeat(400)), /more than 332/);
  assert.match(rejected(`1024 ${"u".repeat(129)} 131072`), /UUID/);
});

Deno.test("parseCtr() rejects a device name too long for the 128-byte status replies", () => {
  const dev = "/dev/" + "d".repeat(100);
  assert.match(rejected(`131072 clustered-disk ${dev} 1024 nosync block_on_error`), /too long/);
  // The longest accepted texts still fit with their NUL.
  const ok = parsed(`131072 clustered-disk /dev/${"d".repeat(80)} 1024 nosync`);
  assert.ok(statusTableText(ok).length + 1 <= 128);
  assert.ok(statusInfoText(ok, { diskFailed: true }).length + 1 <= 128);
});

Deno.test("statusInfoText() and statusTableText() follow the previous daemon and the kernel", () => {
  const core = parsed("131072 clustered-core 1024");
  assert.equal(statusInfoText(core), "1 clustered-core");
  assert.equal(statusTableText(core), "clustered-core 1 1024");
  const disk = parsed("2097152 clustered_disk 253:3 1024 nosync");
  assert.equal(statusInfoText(disk), "3 clustered-disk 253:3 A");
  assert.equal(statusInfoText(disk, { diskFailed: true }), "3 clustered-disk 253:3 D");
  assert.equal(statusTableText(disk), "clustered-disk 3 253:3 1024 nosync");
  // The 2009 kernel printed this as the log's table part: its uuid was one of the arguments.
  assert.equal(
    statusTableText(parsed("1024 LVM-x nosync 131072")),
    "clustered-core 3 1024 LVM-x nosync",
  );
});
