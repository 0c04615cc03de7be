/**
 * Crash safety of the disk store: a child process (tests/support/disk_crash_child.ts) marks and
 * clears regions through DiskStore with group commit and reports what it made durable; we
 * SIGKILL it at seeded random moments, reload the log and check that nothing it reported durable
 * was lost: every region reported dirty (and not since announced for clearing) is dirty on disk,
 * and every region reported clean (and not since announced for marking) is clean.
 *
 * A SIGKILL loses what the process had not written yet, not the page cache; power loss is the
 * kernel's and the device's part of the contract (fdatasync), tested in disk_store_test.ts only
 * as far as "a sync was issued after the write".
 *
 * Replay a failing run with CLOGD_DISK_CRASH_SEED=<seed printed in the failure>.
 */
import assert from "node:assert/strict";
import { resolveLogDevice } from "../src/disk/device.ts";
import { DiskStore } from "../src/disk/store.ts";

/** Kill rounds; each costs a Deno start (~60 ms) plus up to KILL_AFTER_MAX_MS of work. */
const ROUNDS = 24;
/** Regions of the log: 20000 -> a 2500-byte bitmap over six 512-byte blocks. */
const REGIONS = 20000;
/** Concurrent writers in the child, so group commit batches are in flight when it dies. */
const WORKERS = 8;
/** Upper bound of the random delay between "ready" and SIGKILL. */
const KILL_AFTER_MAX_MS = 60;
/** Share of rounds killed at a random moment from spawn on (during load or the first write). */
const EARLY_KILL_SHARE = 0.15;
/** A child that has not said "I" by then is broken, not slow. */
const READY_TIMEOUT_MS = 10_000;

const CHILD = new URL("./support/disk_crash_child.ts", import.meta.url).pathname;

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6D2B79F5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Round {
  lines: string[];
  ready: boolean;
  exitedOnItsOwn: boolean;
  stderr: string;
}

async function runChild(path: string, seed: number, random: () => number): Promise<Round> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      "--quiet",
      CHILD,
      path,
      String(REGIONS),
      String(seed),
      String(WORKERS),
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const ready = Promise.withResolvers<boolean>();
  const readAll = (async () => {
    let buffered = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        lines.push(line);
        if (line === "I") ready.resolve(true);
      }
    }
    // A line cut by the kill cannot happen (one write(2) each), but would be dropped here.
    ready.resolve(false);
  })();
  const stderr = new Response(child.stderr).text();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  if (random() < EARLY_KILL_SHARE) {
    await new Promise((r) => setTimeout(r, random() * 150));
  } else {
    const timer = setTimeout(() => ready.resolve(false), READY_TIMEOUT_MS);
    const isReady = await ready.promise;
    clearTimeout(timer);
    if (isReady) await new Promise((r) => setTimeout(r, random() * KILL_AFTER_MAX_MS));
  }
  const exitedOnItsOwn = exited;
  if (!exited) child.kill("SIGKILL");
  await status;
  await readAll;
  return { lines, ready: lines.includes("I"), exitedOnItsOwn, stderr: await stderr };
}

async function loadBits(path: string): Promise<Uint8Array | undefined> {
  const store = await DiskStore.open(resolveLogDevice(path), { regionCount: REGIONS });
  try {
    const { image } = await store.load("default");
    assert.notEqual(image?.failed, true);
    return image?.cleanBits;
  } finally {
    await store.close();
  }
}

Deno.test("disk store: regions reported durable survive SIGKILL at random moments", async () => {
  const seed = Number(Deno.env.get("CLOGD_DISK_CRASH_SEED") ?? Date.now() % 2 ** 31);
  const random = rng(seed);
  const dir = await Deno.makeTempDir({ prefix: "clogd-disk-crash-" });
  const path = `${dir}/log.img`;
  const file = Deno.openSync(path, { create: true, write: true });
  file.truncateSync(64 * 1024);
  file.close();
  const started = performance.now();
  let everReady = false;
  let roundsWithWritesInFlight = 0;
  let checkedDirty = 0;
  let checkedClean = 0;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const context = `seed ${seed}, round ${round}`;
      // What the child starts from: the disk now (a fresh log counts as all clean).
      const base = await loadBits(path);
      assert.ok(base !== undefined || !everReady, `${context}: formatted log read as fresh`);
      const mustBeDirty = new Uint8Array(REGIONS);
      const mustBeClean = new Uint8Array(REGIONS);
      for (let r = 0; r < REGIONS; r++) {
        const clean = base === undefined || ((base[r >> 3] >> (r & 7)) & 1) === 1;
        (clean ? mustBeClean : mustBeDirty)[r] = 1;
      }

      const result = await runChild(path, Math.floor(random() * 2 ** 31), random);
      assert.ok(!result.exitedOnItsOwn, `${context}: child exited on its own: ${result.stderr}`);
      everReady ||= result.ready;
      const inFlight = new Set<string>();
      for (const line of result.lines) {
        if (line === "I") continue;
        const [kind, ...rest] = line.split(" ");
        const regions = rest.map(Number);
        for (const r of regions) {
          assert.ok(Number.isInteger(r) && r >= 0 && r < REGIONS, `${context}: line "${line}"`);
          if (kind === "m") mustBeClean[r] = 0;
          else if (kind === "D") mustBeDirty[r] = 1;
          else if (kind === "c") mustBeDirty[r] = 0;
          else if (kind === "C") mustBeClean[r] = 1;
          else assert.fail(`${context}: unexpected line "${line}"`);
        }
        const key = rest.join(" ");
        if (kind === "m" || kind === "c") inFlight.add(`${kind}${key}`);
        else inFlight.delete(`${kind === "D" ? "m" : "c"}${key}`);
      }
      if (inFlight.size > 0) roundsWithWritesInFlight++;

      const disk = await loadBits(path);
      if (disk === undefined) {
        // Killed before the first header was durable: nothing was ever reported.
        assert.ok(!everReady, `${context}: log reads as fresh after "I"`);
        continue;
      }
      for (let r = 0; r < REGIONS; r++) {
        const clean = ((disk[r >> 3] >> (r & 7)) & 1) === 1;
        if (mustBeDirty[r] === 1) {
          assert.ok(!clean, `${context}: region ${r} reported dirty but reads clean`);
          checkedDirty++;
        }
        if (mustBeClean[r] === 1) {
          assert.ok(clean, `${context}: region ${r} reported clean but reads dirty`);
          checkedClean++;
        }
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const seconds = (performance.now() - started) / 1000;
  console.log(
    `seed ${seed}: ${ROUNDS} kills in ${seconds.toFixed(1)} s, ${roundsWithWritesInFlight} ` +
      `with writes in flight, ${checkedDirty} dirty and ${checkedClean} clean checks`,
  );
  assert.ok(everReady, "the child became ready at least once");
  assert.ok(
    roundsWithWritesInFlight >= ROUNDS / 2,
    `only ${roundsWithWritesInFlight} kills hit writes in flight`,
  );
  assert.ok(checkedDirty > 0, "some regions were dirty at a kill");
  assert.ok(seconds < 20, `took ${seconds} s`);
});
