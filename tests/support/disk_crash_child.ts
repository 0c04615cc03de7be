/**
 * Child process of tests/disk_crash_test.ts: plays a mirror hammering a clustered-disk log until
 * it is SIGKILLed. Usage: `disk_crash_child.ts <log file> <region count> <seed> <workers>`.
 *
 * Each worker owns the regions r with r % workers == worker and loops: announce marks
 * ("m r..."), clear their clean bits, write; once durable report "D r..." (the kernel may now
 * write their data); later announce clears ("c r..."), set the bits, write; once durable report
 * "C r...". "I" means the first (formatting) write is durable. Every line goes out with one
 * write(2) to a pipe before the state it announces can reach the device (lines are far below
 * PIPE_BUF, so they arrive whole), so the parent knows a superset of what may be on disk.
 *
 * @module
 */

import { resolveLogDevice } from "../../src/disk/device.ts";
import { bitmapBytes } from "../../src/disk/format.ts";
import { DiskStore } from "../../src/disk/store.ts";

/** Regions one worker marks at once (the kernel marks at most 32 per request). */
const MAX_REGIONS_PER_STEP = 4;

const [path, regionText, seedText, workerText] = Deno.args;
const regionCount = Number(regionText);
const workers = Number(workerText);
let seed = Number(seedText) >>> 0;

/** mulberry32: small, seeded, good enough to pick regions. */
function random(): number {
  seed = (seed + 0x6D2B79F5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

const encoder = new TextEncoder();
function say(line: string): void {
  const bytes = encoder.encode(line + "\n");
  let done = 0;
  while (done < bytes.length) done += Deno.stdout.writeSync(bytes.subarray(done));
}

const store = await DiskStore.open(resolveLogDevice(path), { regionCount });
const loaded = await store.load("default");
if (loaded.image?.failed === true) throw new Error(`Unexpected failed image: ${loaded.warning}`);
// A fresh log starts with every region clean (as with "nosync").
const bits = loaded.image?.cleanBits ?? new Uint8Array(bitmapBytes(regionCount)).fill(0xFF);
await store.write(bits, { words: [] }, regionCount);
say("I");

function setClean(r: number, clean: boolean): number {
  if (clean) bits[r >> 3] |= 1 << (r & 7);
  else bits[r >> 3] &= ~(1 << (r & 7));
  return r >> 5;
}

async function worker(w: number): Promise<never> {
  const owned = Math.ceil((regionCount - w) / workers);
  while (true) {
    const count = 1 + Math.floor(random() * MAX_REGIONS_PER_STEP);
    const regions = new Set<number>();
    for (let i = 0; i < count; i++) regions.add(w + workers * Math.floor(random() * owned));
    const list = [...regions].join(" ");
    say(`m ${list}`);
    const marked = [...regions].map((r) => setClean(r, false));
    await store.write(bits, { words: marked }, regionCount);
    say(`D ${list}`);
    // The data write of the mirror; some regions stay dirty for a later round to clean.
    await new Promise((resolve) => setTimeout(resolve, random() * 2));
    if (random() < 0.2) continue;
    say(`c ${list}`);
    const cleared = [...regions].map((r) => setClean(r, true));
    await store.write(bits, { words: cleared }, regionCount);
    say(`C ${list}`);
  }
}

await Promise.all(Array.from({ length: workers }, (_, w) => worker(w)));
