/**
 * Soak the cluster core in the deterministic simulator: `deno run -A scripts/soak.ts --seeds N
 * [--start S]` runs seeds S..S+N-1 (default 1..10000) and prints each failing seed with the
 * command that replays it, known issues outside the core (tests/sim/cluster_sim.ts), and the
 * rate. Exit status 1 if any seed failed.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { replayCommand, runSeed } from "../tests/sim/cluster_sim.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { seeds: { type: "string", default: "10000" }, start: { type: "string", default: "1" } },
});
const count = Number(values.seeds);
const start = Number(values.start);
if (!Number.isSafeInteger(count) || count < 1 || !Number.isSafeInteger(start)) {
  console.error("Usage: deno run -A scripts/soak.ts --seeds N [--start S]");
  Deno.exit(2);
}
const t0 = performance.now();
let failed = 0;
let known = 0;
let requests = 0;
let messages = 0;
for (let seed = start; seed < start + count; seed++) {
  const r = runSeed(seed);
  requests += r.requests;
  messages += r.messages;
  if (r.known.length > 0) {
    known++;
    console.log(`seed ${seed}: known issue: ${r.known.join("; ")}`);
  }
  if (r.violations.length > 0) {
    failed++;
    console.log(`FAIL seed ${seed}: ${r.violations[0]}\n  replay: ${replayCommand(seed)}`);
  }
  if ((seed - start + 1) % 1000 === 0) {
    const secs = (performance.now() - t0) / 1000;
    console.log(
      `... ${seed - start + 1} seeds, ${
        ((seed - start + 1) / secs).toFixed(1)
      }/s, ${failed} failed`,
    );
  }
}
const secs = (performance.now() - t0) / 1000;
console.log(
  `${count} seeds (${start}..${start + count - 1}) in ${secs.toFixed(1)} s ` +
    `(${(count / secs).toFixed(1)}/s): ${failed} failed, ${known} known issues; ` +
    `${requests} requests carried by ${messages} messages`,
);
Deno.exit(failed > 0 ? 1 : 0);
