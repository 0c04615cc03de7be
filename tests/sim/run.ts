/**
 * Runs the cluster simulator from the command line:
 *
 *   deno run -A tests/sim/run.ts --seed 1234              replay one seed (prints what happened)
 *   deno run -A tests/sim/run.ts --seeds 100 [--start 5]  run seeds 5..104
 *   deno run -A tests/sim/run.ts --scenario tests/sim/scenarios/join_marks.txt [--verbose]
 *
 * Exit status 1 when any seed or scenario fails.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { replayCommand, runSeed } from "./cluster_sim.ts";
import { runScenarioFile } from "./scenario.ts";

function main(): number {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      seed: { type: "string" },
      seeds: { type: "string" },
      start: { type: "string" },
      scenario: { type: "string", multiple: true },
      verbose: { type: "boolean", default: false },
    },
  });
  let failed = 0;
  for (const path of values.scenario ?? []) {
    const r = runScenarioFile(path, { verbose: values.verbose });
    if (r.ok) console.log(`ok   ${path} (${r.steps} steps)`);
    else {
      failed++;
      console.log(`FAIL ${path}\n${r.error}`);
    }
  }
  if (values.seed !== undefined) {
    const r = runSeed(Number(values.seed));
    console.log(
      `seed ${r.seed}: ${r.nodes} nodes, ${r.logs} logs, ${r.simMs.toFixed(1)} ms simulated, ` +
        `${r.requests} requests, ${r.messages} messages, ${r.events} events, ` +
        `${r.checkpoints} checkpoints`,
    );
    for (const f of r.faults) console.log(`  ${f}`);
    for (const k of r.known) console.log(`KNOWN ISSUE ${k}`);
    for (const v of r.violations) console.log(`VIOLATION ${v}`);
    if (r.violations.length > 0) failed++;
  }
  if (values.seeds !== undefined) {
    const count = Number(values.seeds);
    const start = Number(values.start ?? 1);
    const t0 = performance.now();
    let known = 0;
    for (let s = start; s < start + count; s++) {
      const r = runSeed(s);
      if (r.known.length > 0) {
        known++;
        console.log(`known issue, seed ${s}: ${r.known.join("; ")}`);
      }
      if (r.violations.length > 0) {
        failed++;
        console.log(`FAIL seed ${s}: ${r.violations[0]}\n  replay: ${replayCommand(s)}`);
      }
    }
    const secs = (performance.now() - t0) / 1000;
    console.log(
      `${count} seeds in ${secs.toFixed(1)} s (${(count / secs).toFixed(1)}/s), ${failed} failed`,
    );
  }
  return failed > 0 ? 1 : 0;
}

Deno.exit(main());
