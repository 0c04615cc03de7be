/**
 * The log device resolver and the durable store, on real files (real fdatasync), a real loop
 * device when the host has one, and a small tmpfs filled up to get real write errors.
 */
import assert from "node:assert/strict";
import { decodeRdev, resolveLogDevice } from "../src/disk/device.ts";
import { bitmapBytes, decodeHeader, HEADER_AREA_BYTES, LOG_MAGIC } from "../src/disk/format.ts";
import { openBlockFile } from "../src/disk/block_file.ts";
import { DiskStore, MAX_WRITE_RUN_BYTES } from "../src/disk/store.ts";

const decoder = new TextDecoder();

function run(cmd: string, args: string[]): { ok: boolean; stdout: string; stderr: string } {
  try {
    const out = new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).outputSync();
    return {
      ok: out.success,
      stdout: decoder.decode(out.stdout).trim(),
      stderr: decoder.decode(out.stderr).trim(),
    };
  } catch (err) {
    return { ok: false, stdout: "", stderr: String(err) };
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

const HAVE_LOOP = exists("/dev/loop-control") && run("losetup", ["--version"]).ok;
if (!HAVE_LOOP) {
  console.warn("disk_store_test: /dev/loop-control or losetup absent: loop device tests skipped");
}

async function withTempDir(fn: (dir: string) => void | Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "clogd-disk-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function makeFile(path: string, size: number): string {
  const file = Deno.openSync(path, { create: true, write: true, truncate: true });
  file.truncateSync(size);
  file.close();
  return path;
}

/** A clean bitmap with every region clean (regionCount is a multiple of 32 in these tests). */
function allClean(regionCount: number): Uint8Array {
  return new Uint8Array(bitmapBytes(regionCount)).fill(0xFF);
}

/** Marks region r dirty in the clean bitmap; returns its 32-bit word index. */
function dirty(bits: Uint8Array, r: number): number {
  bits[r >> 3] &= ~(1 << (r & 7));
  return r >> 5;
}

function isClean(bits: Uint8Array, r: number): boolean {
  return ((bits[r >> 3] >> (r & 7)) & 1) === 1;
}

function readBytes(path: string, offset: number, length: number): Uint8Array {
  return Deno.readFileSync(path).slice(offset, offset + length);
}

async function openFileStore(
  path: string,
  regionCount: number,
  onSyncStarted?: (syncs: number) => void,
): Promise<DiskStore> {
  return await DiskStore.open(resolveLogDevice(path), { regionCount, onSyncStarted });
}

// 32000 regions: a 4000-byte bitmap, area 1024 + 4000 -> 5120 bytes = ten 512-byte blocks,
// word w in block 2 + floor(w / 128).
const REGIONS = 32000;
const AREA = 5120;

/** Opens a store on a new zeroed file and formats it (first write, all regions clean). */
async function formatted(
  dir: string,
  onSyncStarted?: (syncs: number) => void,
): Promise<{ store: DiskStore; bits: Uint8Array; path: string }> {
  const path = makeFile(`${dir}/log.img`, 8192);
  const store = await openFileStore(path, REGIONS, onSyncStarted);
  assert.deepEqual(await store.load("default"), {});
  const bits = allClean(REGIONS);
  await store.write(bits, { words: [] }, REGIONS);
  return { store, bits, path };
}

Deno.test("resolveLogDevice() takes a regular file with 512-byte blocks by default", async () => {
  await withTempDir((dir) => {
    const path = makeFile(`${dir}/x.img`, 12345);
    const info = resolveLogDevice(path);
    assert.deepEqual(info, {
      path,
      name: path,
      logicalBlockSize: 512,
      sizeBytes: 12345,
      isBlockDevice: false,
    });
    assert.equal(resolveLogDevice(path, { fileLogicalBlockSize: 4096 }).logicalBlockSize, 4096);
    assert.throws(
      () => resolveLogDevice(path, { fileLogicalBlockSize: 1000 }),
      /Logical block size 1000 invalid/,
    );
  });
});

Deno.test("resolveLogDevice() says clearly what is wrong with a bad argument", async () => {
  await withTempDir((dir) => {
    assert.throws(() => resolveLogDevice(`${dir}/missing`), /Log device .*missing not found/);
    assert.throws(() => resolveLogDevice(dir), /is neither a block device nor a regular file/);
    assert.throws(() => resolveLogDevice(""), /Log device missing/);
  });
  // A device number no block device uses (majors near 4095 are unassigned).
  const unused = "4094:54321";
  assert.ok(!exists(`/sys/dev/block/${unused}`));
  assert.throws(
    () => resolveLogDevice(unused),
    new RegExp(`^Error: Log device ${unused} not found: no /sys/dev/block/${unused}$`),
  );
  assert.throws(() => resolveLogDevice("5000:1"), /Log device 5000:1 invalid/);
});

Deno.test("decodeRdev() inverts glibc makedev() for small and large numbers", () => {
  const makedev = (major: number, minor: number): number =>
    Number(
      ((BigInt(major) & 0xFFFn) << 8n) | ((BigInt(major) & ~0xFFFn) << 32n) |
        (BigInt(minor) & 0xFFn) | ((BigInt(minor) & ~0xFFn) << 12n),
    );
  for (const [major, minor] of [[7, 0], [8, 17], [253, 3], [259, 1048575], [4095, 256]]) {
    assert.deepEqual(decodeRdev(makedev(major, minor)), { major, minor });
  }
});

Deno.test("resolveLogDevice() finds a present block device by major:minor and by path", () => {
  // Read-only: whatever disks this host has (root disk, zram, loop...).
  const entries = [...Deno.readDirSync("/sys/dev/block")].map((e) => e.name).sort();
  let checked = 0;
  for (const number of entries) {
    const devName = /^DEVNAME=(.+)$/m.exec(
      Deno.readTextFileSync(`/sys/dev/block/${number}/uevent`),
    )?.[1];
    if (devName === undefined || !exists(`/dev/${devName}`)) continue;
    const sys = Deno.realPathSync(`/sys/dev/block/${number}`);
    const queue = exists(`${sys}/partition`) ? `${sys}/../queue` : `${sys}/queue`;
    const info = resolveLogDevice(number);
    assert.deepEqual(info, {
      path: `/dev/${devName}`,
      name: number,
      logicalBlockSize: Number(Deno.readTextFileSync(`${queue}/logical_block_size`)),
      sizeBytes: Number(Deno.readTextFileSync(`${sys}/size`)) * 512,
      isBlockDevice: true,
      major: Number(number.split(":")[0]),
      minor: Number(number.split(":")[1]),
    });
    assert.deepEqual(resolveLogDevice(`/dev/${devName}`), info);
    checked++;
  }
  assert.ok(checked > 0, "this host has at least one block device with a /dev node");
});

Deno.test("resolveLogDevice() uses the parent disk's queue for a partition", async () => {
  // This host's kernel has no partition table parsers, so no real partition can exist here:
  // a sysfs tree shaped like the real one (/sys/dev/block/259:7 -> .../loop9/loop9p1) and a
  // real device node made with mknod stand in for it.
  await withTempDir((dir) => {
    const disk = `${dir}/sys/devices/virtual/block/loop9`;
    Deno.mkdirSync(`${disk}/queue`, { recursive: true });
    Deno.mkdirSync(`${disk}/loop9p1`);
    Deno.mkdirSync(`${dir}/sys/dev/block`, { recursive: true });
    Deno.mkdirSync(`${dir}/dev`);
    Deno.writeTextFileSync(`${disk}/queue/logical_block_size`, "4096\n");
    Deno.writeTextFileSync(`${disk}/loop9p1/partition`, "1\n");
    Deno.writeTextFileSync(`${disk}/loop9p1/size`, "2048\n");
    Deno.writeTextFileSync(
      `${disk}/loop9p1/uevent`,
      "MAJOR=259\nMINOR=7\nDEVNAME=loop9p1\nDEVTYPE=partition\n",
    );
    Deno.symlinkSync("../../devices/virtual/block/loop9/loop9p1", `${dir}/sys/dev/block/259:7`);
    if (!run("mknod", [`${dir}/dev/loop9p1`, "b", "259", "7"]).ok) {
      console.warn("disk_store_test: mknod failed (not root?): partition case skipped");
      return;
    }
    const options = { sysfsRoot: `${dir}/sys`, devRoot: `${dir}/dev` };
    assert.deepEqual(resolveLogDevice("259:7", options), {
      path: `${dir}/dev/loop9p1`,
      name: "259:7",
      logicalBlockSize: 4096,
      sizeBytes: 2048 * 512,
      isBlockDevice: true,
      major: 259,
      minor: 7,
    });
    // A node whose number disagrees with sysfs is refused, not opened.
    Deno.removeSync(`${dir}/dev/loop9p1`);
    run("mknod", [`${dir}/dev/loop9p1`, "b", "259", "8"]);
    assert.throws(() => resolveLogDevice("259:7", options), /loop9p1 is 259:8, not 259:7/);
  });
});

Deno.test("DiskStore.open() rejects a device too small for the log area", async () => {
  await withTempDir(async (dir) => {
    const path = makeFile(`${dir}/small.img`, 1024);
    // One region: 1024 + 4 bytes -> 1536 with 512-byte blocks.
    await assert.rejects(
      openFileStore(path, 1),
      new RegExp(`^Error: Log device ${path} too small: need 1536 bytes, has 1024$`),
    );
  });
});

Deno.test("write() formats a blank device: whole bitmap first, valid header last", async () => {
  await withTempDir(async (dir) => {
    const path = makeFile(`${dir}/log.img`, 8192);
    const seen: { magic: number; bitmap: Uint8Array }[] = [];
    const store = await openFileStore(path, REGIONS, () => {
      // What the device (page cache) holds when each sync is issued.
      seen.push({
        magic: decodeHeader(readBytes(path, 0, 16)).magic,
        bitmap: readBytes(path, HEADER_AREA_BYTES, bitmapBytes(REGIONS)),
      });
    });
    assert.deepEqual(await store.load("default"), {}, "zeros are a fresh log");
    const bits = allClean(REGIONS);
    dirty(bits, 0);
    dirty(bits, 31999);
    const expected = bits.slice();
    await store.write(bits, { words: [] }, REGIONS);
    assert.equal(seen.length, 2);
    assert.equal(seen[0].magic, 0, "no valid header while the bitmap is not durable");
    assert.deepEqual(seen[0].bitmap, expected);
    assert.equal(seen[1].magic, LOG_MAGIC);
    const stats = store.stats;
    assert.equal(stats.syncs, 2);
    assert.equal(stats.bytesWritten, AREA + 512, "whole area, then the header block");
    const header = decodeHeader(readBytes(path, 0, 16));
    assert.equal(header.nrRegions, BigInt(REGIONS));
    await store.close();

    const again = await openFileStore(path, REGIONS);
    const loaded = await again.load("default");
    assert.equal(loaded.image?.nrRegions, REGIONS);
    assert.deepEqual(loaded.image?.cleanBits, expected);
    assert.deepEqual(await again.load("sync"), {});
    assert.deepEqual(await again.load("nosync"), {});
    await again.close();
  });
});

Deno.test("write() writes only the logical blocks holding changed words", async () => {
  await withTempDir(async (dir) => {
    const { store, bits, path } = await formatted(dir);
    // Scribble on every bitmap block behind the store's back: what it rewrites shows.
    const file = Deno.openSync(path, { write: true });
    file.seekSync(1024, Deno.SeekMode.Start);
    file.writeSync(new Uint8Array(AREA - 1024).fill(0xEE));
    file.close();
    const before = store.stats;
    const words = [dirty(bits, 0), dirty(bits, 130 * 32), dirty(bits, 900 * 32 + 5)];
    await store.write(bits, { words }, REGIONS);
    const after = store.stats;
    assert.equal(after.syncs - before.syncs, 1);
    assert.equal(after.bytesWritten - before.bytesWritten, 3 * 512);
    assert.equal(after.pwrites - before.pwrites, 2, "blocks 2 and 3 go out as one write");
    const disk = readBytes(path, 0, AREA);
    // What the area would hold if every block had been rewritten (bitmap, zero padding).
    const full = new Uint8Array(AREA);
    full.set(bits, HEADER_AREA_BYTES);
    for (let block = 2; block < 10; block++) {
      const got = disk.subarray(block * 512, block * 512 + 512);
      const written = block === 2 || block === 3 || block === 9;
      const want = written
        ? full.subarray(block * 512, block * 512 + 512)
        : new Uint8Array(512).fill(0xEE);
      assert.deepEqual(got, want, `block ${block}`);
    }
    assert.equal(decodeHeader(disk).magic, LOG_MAGIC, "header untouched");
    await store.close();
  });
});

Deno.test("write() does not sync when the changed words already hold what is durable", async () => {
  await withTempDir(async (dir) => {
    const { store, bits } = await formatted(dir);
    const before = store.stats;
    const word = dirty(bits, 77);
    bits[77 >> 3] |= 1 << (77 & 7); // clean again before the write happens
    await store.write(bits, { words: [word] }, REGIONS);
    await store.write(bits, { words: [] }, REGIONS);
    assert.equal(store.stats.syncs, before.syncs);
    assert.equal(store.stats.bytesWritten, before.bytesWritten);
    assert.equal(store.stats.writes, before.writes + 2);
    await store.close();
  });
});

Deno.test("write() rewrites the header when nr_regions changes", async () => {
  await withTempDir(async (dir) => {
    const { store, bits, path } = await formatted(dir);
    const before = store.stats;
    await store.write(bits, { words: [] }, REGIONS - 64);
    assert.equal(decodeHeader(readBytes(path, 0, 16)).nrRegions, BigInt(REGIONS - 64));
    assert.equal(store.stats.syncs - before.syncs, 1);
    assert.equal(store.stats.bytesWritten - before.bytesWritten, 512);
    await store.close();
  });
});

Deno.test("32 write() calls in one synchronous run share one fdatasync", async () => {
  await withTempDir(async (dir) => {
    const { store, bits, path } = await formatted(dir);
    const before = store.stats;
    const regions = Array.from({ length: 32 }, (_, i) => i * 997);
    let resolved = 0;
    const calls = regions.map((r) =>
      store.write(bits, { words: [dirty(bits, r)] }, REGIONS).then(() => resolved++)
    );
    await Promise.all(calls);
    assert.equal(resolved, 32);
    assert.ok(store.stats.syncs - before.syncs <= 2, `syncs ${store.stats.syncs - before.syncs}`);
    assert.equal(store.stats.writes - before.writes, 32);
    const disk = readBytes(path, HEADER_AREA_BYTES, bitmapBytes(REGIONS));
    for (const r of regions) assert.ok(!isClean(disk, r), `region ${r} dirty on disk`);
    await store.close();
  });
});

Deno.test("32 write() calls arriving while a sync runs cost two fdatasyncs in all", async () => {
  await withTempDir(async (dir) => {
    let later: (() => void) | undefined;
    const { store, bits, path } = await formatted(dir, () => {
      const fn = later;
      later = undefined;
      fn?.();
    });
    const before = store.stats;
    const regions = Array.from({ length: 32 }, (_, i) => 31999 - i * 1001);
    const calls: Promise<void>[] = [];
    // The first flush starts a sync; the other 31 arrive while it is in flight.
    later = () => {
      for (const r of regions.slice(1)) {
        calls.push(store.write(bits, { words: [dirty(bits, r)] }, REGIONS));
      }
    };
    calls.push(store.write(bits, { words: [dirty(bits, regions[0])] }, REGIONS));
    await calls[0];
    assert.equal(calls.length, 32);
    await Promise.all(calls);
    assert.equal(store.stats.syncs - before.syncs, 2);
    assert.equal(store.stats.batches - before.batches, 2);
    assert.equal(store.stats.maxCallersPerBatch, 31);
    const disk = readBytes(path, HEADER_AREA_BYTES, bitmapBytes(REGIONS));
    for (const r of regions) assert.ok(!isClean(disk, r), `region ${r} dirty on disk`);
    await store.close();
  });
});

Deno.test("a write() arriving during an in-progress sync waits for the next sync", async () => {
  await withTempDir(async (dir) => {
    let duringSync: (() => void) | undefined;
    const { store, bits, path } = await formatted(dir, () => {
      const fn = duringSync;
      duringSync = undefined;
      fn?.();
    });
    const syncs0 = store.stats.syncs;
    const order: string[] = [];
    let second: Promise<void> | undefined;
    let secondSyncs = -1;
    duringSync = () => {
      second = store.write(bits, { words: [dirty(bits, 5000)] }, REGIONS).then(() => {
        order.push("B");
        secondSyncs = store.stats.syncs;
      });
    };
    let firstSyncs = -1;
    const first = store.write(bits, { words: [dirty(bits, 10)] }, REGIONS).then(() => {
      order.push("A");
      firstSyncs = store.stats.syncs;
    });
    await first;
    assert.ok(second, "B was issued while A's sync was in flight");
    assert.deepEqual(order, ["A"], "B is not served by the sync that started before it");
    await second;
    assert.deepEqual(order, ["A", "B"]);
    assert.equal(firstSyncs, syncs0 + 1);
    assert.equal(secondSyncs, syncs0 + 2);
    const disk = readBytes(path, HEADER_AREA_BYTES, bitmapBytes(REGIONS));
    assert.ok(!isClean(disk, 10) && !isClean(disk, 5000));
    await store.close();
  });
});

Deno.test("write() rejects malformed input without touching the device", async () => {
  await withTempDir(async (dir) => {
    const { store, bits } = await formatted(dir);
    const before = store.stats;
    await assert.rejects(
      store.write(new Uint8Array(8), { words: [] }, REGIONS),
      /Clean bitmap is 8 bytes, the log of 32000 regions needs 4000/,
    );
    await assert.rejects(store.write(bits, { words: [1000] }, REGIONS), /word 1000 out of range/);
    await assert.rejects(store.write(bits, { words: [-1] }, REGIONS), /word -1 out of range/);
    await assert.rejects(store.write(bits, { words: [] }, REGIONS + 1), /nr_regions 32001/);
    assert.deepEqual(store.stats, before);
    await store.close();
  });
});

Deno.test("close() lets writes in flight finish; write() after close() rejects", async () => {
  await withTempDir(async (dir) => {
    const { store, bits, path } = await formatted(dir);
    const pending = store.write(bits, { words: [dirty(bits, 64)] }, REGIONS);
    await store.close();
    await pending;
    assert.ok(!isClean(readBytes(path, HEADER_AREA_BYTES, 16), 64));
    await assert.rejects(store.write(bits, { words: [] }, REGIONS), /Log device .* is closed/);
  });
});

Deno.test("load() of an unreadable area fails the log device: all out of sync", async () => {
  await withTempDir(async (dir) => {
    const path = makeFile(`${dir}/log.img`, 8192);
    const store = await openFileStore(path, REGIONS);
    Deno.truncateSync(path, 100); // the device shrank under us: the read hits its end
    const result = await store.load("default");
    assert.equal(result.image?.failed, true);
    assert.equal(result.image?.nrRegions, 0);
    assert.equal(result.image?.cleanBits.length, bitmapBytes(REGIONS));
    assert.ok(result.image?.cleanBits.every((b) => b === 0));
    assert.match(result.warning ?? "", /unexpected end of device at byte 100/);
    assert.equal(store.failed, true);
    await store.close();
  });
});

Deno.test("a failed write rejects, sets failed, and the next write() rewrites everything", async () => {
  await withTempDir(async (dir) => {
    // A tiny tmpfs filled up: writing into the log file's holes fails with ENOSPC for real.
    const mnt = `${dir}/mnt`;
    Deno.mkdirSync(mnt);
    if (!run("mount", ["-t", "tmpfs", "-o", "size=64k", "clogd-disk-test", mnt]).ok) {
      console.warn("disk_store_test: cannot mount tmpfs (not root?): write failure case skipped");
      return;
    }
    // Closed in finally even when an assertion fails: an open file would keep the mount busy.
    const opened: DiskStore[] = [];
    try {
      const path = makeFile(`${mnt}/log.img`, 8192); // sparse: no page allocated yet
      const store = await openFileStore(path, REGIONS);
      opened.push(store);
      assert.deepEqual(await store.load("default"), {});
      const filler = Deno.openSync(`${mnt}/filler`, { create: true, write: true });
      const chunk = new Uint8Array(4096);
      // At most 64 KiB / 4 KiB rounds before the filesystem is full.
      for (let i = 0; i <= 16; i++) {
        try {
          filler.writeSync(chunk);
        } catch {
          break;
        }
      }
      filler.close();
      const bits = allClean(REGIONS);
      await assert.rejects(
        store.write(bits, { words: [] }, REGIONS),
        // ENOSPC through O_DIRECT (tmpfs has it since Linux 6.6), the text through Deno.FsFile.
        /^Error: Log device .*log\.img: write of \d+ bytes at offset \d+ failed: .*(ENOSPC \(28\)|No space left)/,
      );
      assert.equal(store.failed, true);
      assert.match(store.lastError?.message ?? "", /ENOSPC \(28\)|No space left/);
      assert.equal(store.stats.failures, 1);

      Deno.removeSync(`${mnt}/filler`);
      const before = store.stats;
      await store.write(bits, { words: [dirty(bits, 3)] }, REGIONS);
      assert.equal(store.stats.bytesWritten - before.bytesWritten, AREA + 512);
      assert.equal(store.failed, true, "a failed log device stays failed (status D)");
      await store.close();
      const again = await openFileStore(path, REGIONS);
      opened.push(again);
      assert.deepEqual((await again.load("default")).image?.cleanBits, bits);
      await again.close();
    } finally {
      for (const store of opened) await store.close().catch(() => {});
      if (!run("umount", [mnt]).ok) run("umount", ["-l", mnt]);
    }
  });
});

/** Attaches a loop device over `file`; undefined (with a message) when that is impossible. */
function attachLoop(file: string, blockSize: number): string | undefined {
  // Other processes may grab the free device between lookup and attach: try a few times.
  for (let attempt = 0; attempt < 3; attempt++) {
    const out = run("losetup", ["-f", "--show", "-b", String(blockSize), file]);
    if (out.ok) return out.stdout;
    if (attempt === 2) console.warn(`disk_store_test: losetup failed: ${out.stderr}`);
  }
  return undefined;
}

Deno.test({
  name: "DiskStore on a loop device with 4096-byte blocks: major:minor, block writes, reload",
  ignore: !HAVE_LOOP,
  fn: async () => {
    await withTempDir(async (dir) => {
      const backing = makeFile(`${dir}/loop.img`, 1 << 20);
      const loop = attachLoop(backing, 4096);
      if (loop === undefined) return;
      try {
        const { rdev } = Deno.statSync(loop);
        const { major, minor } = decodeRdev(rdev ?? -1);
        const number = `${major}:${minor}`;
        const info = resolveLogDevice(number);
        assert.deepEqual(info, {
          path: loop,
          name: number,
          logicalBlockSize: 4096,
          sizeBytes: 1 << 20,
          isBlockDevice: true,
          major,
          minor,
        });
        // 100000 regions: 12500 bitmap bytes; 1024 + 12500 -> 16384 = four 4 KiB blocks.
        const regions = 100000;
        const store = await DiskStore.open(info, { regionCount: regions });
        assert.equal(store.stats.direct, 1, "a block device takes O_DIRECT");
        assert.equal(store.areaSize, 16384);
        assert.deepEqual(await store.load("default"), {});
        const bits = new Uint8Array(bitmapBytes(regions)).fill(0xFF);
        await store.write(bits, { words: [] }, regions);
        const before = store.stats;
        // Byte 1024 + 4 * 1100 = 5424: block 1.
        await store.write(bits, { words: [dirty(bits, 1100 * 32)] }, regions);
        assert.equal(store.stats.bytesWritten - before.bytesWritten, 4096);
        assert.equal(store.stats.syncs - before.syncs, 1);
        await store.close();
        // The sync went through the loop driver to its backing file.
        assert.deepEqual(readBytes(backing, HEADER_AREA_BYTES, bits.length), bits);

        const again = await DiskStore.open(resolveLogDevice(loop), { regionCount: regions });
        const loaded = await again.load("default");
        assert.equal(loaded.image?.nrRegions, regions);
        assert.deepEqual(loaded.image?.cleanBits, bits);
        await again.close();
      } finally {
        run("losetup", ["-d", loop]);
      }
    });
  },
});

Deno.test("write() with sync: false writes the blocks but issues no fdatasync", async () => {
  const dir = await Deno.makeTempDir({ prefix: "clogd-store-lazy-" });
  try {
    const path = `${dir}/log.img`;
    await Deno.writeFile(path, new Uint8Array(64 * 1024));
    const device = resolveLogDevice(path);
    const store = await DiskStore.open(device, { regionCount: 1024 });
    await store.load("nosync");
    const bytes = new Uint8Array(128).fill(0xff);
    await store.write(bytes, { words: [] }, 1024); // first write: whole area, synced
    const synced = store.stats.syncs;
    bytes[3] = 0x7f; // region 31 dirty
    await store.write(bytes, { words: [0] }, 1024, { sync: false });
    assert.equal(store.stats.syncs, synced, "no sync for a lazy write");
    const onDisk = await Deno.readFile(path);
    assert.equal(onDisk[1024 + 3], 0x7f, "but the block is written");
    bytes[3] = 0x3f;
    await store.write(bytes, { words: [0] }, 1024);
    assert.equal(store.stats.syncs, synced + 1, "a default write syncs");
    await store.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** The filesystem type of `dir` as stat(1) names it ("ext2/ext3" for ext4, "tmpfs", ...). */
function fsType(dir: string): string {
  return run("stat", ["-f", "-c", "%T", dir]).stdout;
}

/** Filesystems known to take O_DIRECT (tmpfs since Linux 6.6). */
const DIRECT_FILESYSTEMS = ["ext2/ext3", "xfs", "btrfs"];

Deno.test("DiskStore.open() uses O_DIRECT on an ext4 file; a direct read sees each write", async () => {
  await withTempDir(async (dir) => {
    const type = fsType(dir);
    if (!DIRECT_FILESYSTEMS.includes(type)) {
      console.warn(`disk_store_test: temp dir on ${type}: O_DIRECT file case skipped`);
      return;
    }
    const { store, bits, path } = await formatted(dir);
    try {
      assert.equal(store.stats.direct, 1);
      assert.equal(store.openWarning, undefined);
      await store.write(bits, { words: [dirty(bits, 5000)] }, REGIONS, { sync: false });
      // Read with O_DIRECT by another process: the device's content, not a page cache.
      const out = new Deno.Command("dd", {
        args: [`if=${path}`, "iflag=direct", "bs=512", `count=${AREA / 512}`, "status=none"],
        stdout: "piped",
      }).outputSync();
      assert.ok(out.success, "dd iflag=direct");
      assert.equal(out.stdout.length, AREA);
      assert.equal(decodeHeader(out.stdout).magic, LOG_MAGIC);
      assert.deepEqual(
        out.stdout.subarray(HEADER_AREA_BYTES, HEADER_AREA_BYTES + bits.length),
        bits,
      );
    } finally {
      await store.close();
    }
  });
});

Deno.test({
  name: "DiskStore on a loop device bypasses its page cache both ways (another node's view)",
  ignore: !HAVE_LOOP,
  fn: async () => {
    await withTempDir(async (dir) => {
      const backing = makeFile(`${dir}/loop.img`, 1 << 20);
      const loop = attachLoop(backing, 512);
      if (loop === undefined) return;
      try {
        const store = await DiskStore.open(resolveLogDevice(loop), { regionCount: REGIONS });
        try {
          assert.equal(store.stats.direct, 1);
          assert.deepEqual(await store.load("default"), {});
          const bits = allClean(REGIONS);
          await store.write(bits, { words: [] }, REGIONS);
          // A clean-only write is not synced; it must still be on the device, not in this
          // host's cache of /dev/loopN, when write() resolves: the backing file is the device.
          const before = store.stats.syncs;
          dirty(bits, 100);
          const word = dirty(bits, 200);
          await store.write(bits, { words: [word] }, REGIONS, { sync: false });
          assert.equal(store.stats.syncs, before, "no sync");
          assert.deepEqual(readBytes(backing, HEADER_AREA_BYTES, bits.length), bits);

          // Another node rewrites the log under this host's page cache of /dev/loopN: fill
          // that cache with a buffered read first, then change the device behind it.
          const cached = new Deno.Command("dd", {
            args: [`if=${loop}`, "bs=4096", "count=4", "status=none"],
            stdout: "null",
          }).outputSync();
          assert.ok(cached.success, "buffered read of the loop device");
          const other = allClean(REGIONS);
          dirty(other, 31999);
          const file = Deno.openSync(backing, { write: true });
          file.seekSync(HEADER_AREA_BYTES, Deno.SeekMode.Start);
          file.writeSync(other);
          file.syncSync();
          file.close();
          // The batch loop ends a tick after the write's promise resolved.
          await new Promise((resolve) => setTimeout(resolve, 0));
          const loaded = await store.load("default");
          assert.deepEqual(loaded.image?.cleanBits, other, "load() reads the device, not a cache");
        } finally {
          await store.close();
        }
      } finally {
        run("losetup", ["-d", loop]);
      }
    });
  },
});

Deno.test("DiskStore.open() falls back to buffered I/O with a warning where O_DIRECT is refused", async () => {
  await withTempDir(async (dir) => {
    // ramfs has no direct I/O: open(O_DIRECT) fails with EINVAL (tmpfs accepts it since 6.6).
    const mnt = `${dir}/mnt`;
    Deno.mkdirSync(mnt);
    if (!run("mount", ["-t", "ramfs", "clogd-disk-test", mnt]).ok) {
      console.warn("disk_store_test: cannot mount ramfs (not root?): fallback case skipped");
      return;
    }
    const opened: DiskStore[] = [];
    try {
      const path = makeFile(`${mnt}/log.img`, 8192);
      const store = await openFileStore(path, REGIONS);
      opened.push(store);
      assert.equal(store.stats.direct, 0);
      assert.match(store.openWarning ?? "", /^O_DIRECT refused \(open failed: EINVAL \(22\)\)/);
      const first = await store.load("default");
      assert.equal(first.image, undefined, "a fresh log, not a failed one");
      assert.equal(first.warning, store.openWarning, "the first load() reports it");
      assert.equal((await store.load("default")).warning, undefined, "once");
      const bits = allClean(REGIONS);
      await store.write(bits, { words: [] }, REGIONS);
      await store.write(bits, { words: [dirty(bits, 7)] }, REGIONS);
      assert.equal(store.failed, false);
      await store.close();
      const again = await openFileStore(path, REGIONS);
      opened.push(again);
      const loaded = await again.load("default");
      assert.equal(loaded.image?.nrRegions, REGIONS);
      assert.deepEqual(loaded.image?.cleanBits, bits);
      assert.equal(loaded.warning, again.openWarning);
      await again.close();
    } finally {
      for (const store of opened) await store.close().catch(() => {});
      if (!run("umount", [mnt]).ok) run("umount", ["-l", mnt]);
    }
  });
});

Deno.test("openBlockFile() refuses unaligned direct I/O and splits I/O at its buffer size", async () => {
  await withTempDir(async (dir) => {
    if (!DIRECT_FILESYSTEMS.includes(fsType(dir))) return;
    const path = makeFile(`${dir}/f.img`, 8192);
    const { file, warning } = await openBlockFile(path, { blockSize: 512, maxIoBytes: 2048 });
    try {
      assert.equal(file.direct, true);
      assert.equal(warning, undefined);
      await assert.rejects(file.pwrite(new Uint8Array(100), 0), /Unaligned direct write/);
      await assert.rejects(file.pread(new Uint8Array(512), 100), /Unaligned direct read/);
      // 5 KiB through a 2 KiB buffer: three system calls each way, one after another.
      const data = new Uint8Array(5120).map((_, i) => (i * 7) & 0xFF);
      await Promise.all([file.pwrite(data, 512), file.datasync()]);
      const back = new Uint8Array(5120);
      await file.pread(back, 512);
      assert.deepEqual(back, data);
      assert.deepEqual(readBytes(path, 512, 5120), data);
      await assert.rejects(
        file.pread(new Uint8Array(4096), 4096 + 2048),
        /end of device at byte 8192/,
      );
    } finally {
      await file.close();
    }
    assert.equal(MAX_WRITE_RUN_BYTES % 65536, 0, "a write run holds whole blocks of any size");
  });
});
