// The deterministic cluster simulator (tests/sim/): the scenario scripts of
// tests/sim/scenarios/, then 1,000 seeded random runs (N nodes with simulated kernels on shared
// logs, crashes, restarts, joins under load, lost connections, malformed messages, slow and
// bursty delivery), every invariant of DESIGN.md checked after every event. A failing seed
// prints the one-line command that replays it exactly; `deno run -A scripts/soak.ts` runs more.
import assert from "node:assert/strict";
import { replayCommand, runSeed } from "./sim/cluster_sim.ts";
import { runScenario, runScenarioFile } from "./sim/scenario.ts";

/** Seeds run by the test (about a minute on a shared 2-core machine). */
const SEEDS = 1000;

const scenarioDir = new URL("./sim/scenarios/", import.meta.url);

Deno.test("every scenario script of tests/sim/scenarios/ holds", async (t) => {
  const files = [...Deno.readDirSync(scenarioDir)]
    .filter((e) => e.isFile && e.name.endsWith(".txt"))
    .map((e) => e.name)
    .sort();
  assert.ok(files.length >= 10, `only ${files.length} scenarios`);
  for (const name of files) {
    await t.step(name, () => {
      const r = runScenarioFile(new URL(name, scenarioDir).pathname);
      assert.ok(r.ok, r.error);
    });
  }
});

Deno.test("runScenario() reports a failed expectation with its line", () => {
  const r = runScenario(
    "nodes 2\nlog L core 8 nosync\nresume n1 L as r\ndeliver\nexpect reply r EAGAIN\n",
    "inline",
  );
  assert.equal(r.ok, false);
  assert.match(
    r.error ?? "",
    /inline:5: expect reply r EAGAIN\n {2}expectation failed: Expected EAGAIN, got ok/,
  );
});

Deno.test("runSeed() replays a seed exactly", () => {
  const a = runSeed(4242);
  const b = runSeed(4242);
  assert.deepEqual(a, b);
  assert.ok(a.requests > 100 && a.messages > 10, `${a.requests} requests, ${a.messages} messages`);
  assert.ok(a.messages < a.requests, "no batching: a message per request");
});

Deno.test("the seeds that found K1 (a suspend hung on IS_REMOTE_RECOVERING) now pass", () => {
  for (const seed of [1619, 1764, 1941, 11444, 15067]) {
    const r = runSeed(seed);
    assert.deepEqual(r.known, [], `seed ${seed}: nothing is tolerated`);
    assert.deepEqual(r.violations, [], `seed ${seed}; replay: ${replayCommand(seed)}`);
  }
});

Deno.test(`${SEEDS} seeded cluster runs keep every invariant`, () => {
  const t0 = performance.now();
  const failures: string[] = [];
  let requests = 0;
  let messages = 0;
  for (let seed = 1; seed <= SEEDS; seed++) {
    const r = runSeed(seed);
    requests += r.requests;
    messages += r.messages;
    const problems = [...r.known, ...r.violations];
    if (problems.length > 0) {
      failures.push(`seed ${seed}: ${problems[0]}\n  replay: ${replayCommand(seed)}`);
      if (failures.length >= 5) break;
    }
  }
  const secs = (performance.now() - t0) / 1000;
  console.log(
    `${SEEDS} seeds in ${secs.toFixed(1)} s (${(SEEDS / secs).toFixed(1)}/s); ` +
      `${requests} requests in ${messages} messages`,
  );
  assert.deepEqual(failures, []);
});
