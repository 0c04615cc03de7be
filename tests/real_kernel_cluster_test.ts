/**
 * Real-kernel cluster test: two qemu guests (Debian's 6.1 kernel, software emulation) share a
 * mirror's legs and its clustered-disk log, run corosync over a qemu UDP link on 127.0.0.1 and
 * clogd in cluster mode, write to distinct and shared regions, and one guest is SIGKILLed in the
 * middle of its writes (scripts/vm/run_cluster.sh, tests/kernel/cluster_test.sh): in one run the
 * guest writing the disk log, in another the other one. Needs root,
 * qemu-system-x86_64 and debootstrap; the guest image is built once and cached
 * (scripts/vm/build_image.sh), the same one tests/real_kernel_test.ts uses.
 *
 * Outside CI the test is skipped when a tool is missing; under CI (CI set) a missing tool fails
 * it.
 */
import assert from "node:assert/strict";
import { guestImage, missingTools, readText, run, tail } from "./support/vm.ts";

/** Steps both guests run before the kill, each printing a PASS line, in order. */
const SHARED_STEPS = [
  "corosync",
  "clogd-start",
  "create",
  "initial-resync",
  "writes",
  "verify-writes",
  "status",
] as const;

/** Steps only the survivor runs, in order (kill-writes is the last one the victim starts). */
const SURVIVOR_STEPS = [
  "kill-writes",
  "membership",
  "out-of-sync",
  "resync",
  "verify-data",
  "remove",
] as const;

/** Checks run_cluster.sh makes on the host after both guests ended. */
const HOST_CHECKS = [
  "victim-killed",
  "survivor-passed",
  "survivor-done",
  "legs-identical",
  "disk-log-clean",
] as const;

/** Hard limit per guest, boot to power-off, enforced by run_guest.sh (seconds). */
const GUEST_TIMEOUT_SECONDS = 480;

/** Tools whose absence skips the test outside CI. */
const REQUIRED_TOOLS = ["qemu-system-x86_64", "debootstrap", "ss"] as const;

/** Lines of a log quoted in an assertion message. */
const FAILURE_OUTPUT_LINES = 80;

/** The verdict lines of one guest's test log: step name to "PASS" or the FAIL line. */
function verdicts(log: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of log.split("\n")) {
    const pass = /^PASS (\S+) \(/.exec(line);
    if (pass) out.set(pass[1], "PASS");
    const fail = /^FAIL (\S+): /.exec(line);
    if (fail) out.set(fail[1], line);
  }
  return out;
}

function assertPassed(node: string, steps: Map<string, string>, step: string, where: string) {
  const verdict = steps.get(step);
  assert.ok(verdict !== undefined, `${node} never ran step ${step}. ${where}`);
  assert.equal(verdict, "PASS", `${node}: ${verdict}\n${where}`);
}

const missing = await missingTools(REQUIRED_TOOLS);
const inCi = (Deno.env.get("CI") ?? "") !== "";
if (missing.length > 0 && !inCi) {
  console.warn(
    `real_kernel_cluster_test: skipped: missing ${missing.join(", ")} (install qemu-system-x86, ` +
      "debootstrap and iproute2, run as root; under CI a missing tool is a failure)",
  );
}

/**
 * One run of the two guests; `victim` is the node killed: "writer" (the one writing the disk log:
 * the survivor takes the writing over) or "other" (the survivor already writes it).
 */
async function clusterRun(t: Deno.TestContext, victim: "writer" | "other"): Promise<void> {
  assert.deepEqual(missing, [], `Missing tools under CI: ${missing.join(", ")}`);

  const image = await guestImage("real_kernel_cluster_test");

  const results = await Deno.makeTempDir({ prefix: "clogd-real-cluster-" });
  const cluster = await run("bash", [
    "scripts/vm/run_cluster.sh",
    "--image",
    image,
    "--results",
    results,
    "--timeout",
    String(GUEST_TIMEOUT_SECONDS),
    "--victim",
    victim,
  ]);
  const logs = [1, 2].map((n) => readText(`${results}/node${n}/test.log`));
  const [log1, log2] = await Promise.all(logs);
  const killRequest = (await readText(`${results}/coord/kill-request`)).trim();
  console.log(
    `real_kernel_cluster_test: cluster ran in ${cluster.seconds.toFixed(1)} s, exit ` +
      `${cluster.code}, node ${killRequest || "?"} (the ${victim}) killed; results in ${results}`,
  );
  for (const [n, log] of [[1, log1], [2, log2]] as const) {
    for (const line of log.split("\n")) {
      if (
        /^(PASS|FAIL) |^cluster_test summary: |corosync: 1 node|completed .* after the kill|failover: |legs differ/
          .test(
            line,
          )
      ) {
        console.log(`  node${n}: ${line}`);
      }
    }
  }
  for (const line of cluster.stdout.split("\n")) {
    if (/^(PASS|FAIL) |summary/.test(line)) console.log(`  host: ${line}`);
  }
  const where = `Results in ${results}\n--- run_cluster.sh stderr (tail)\n${
    tail(cluster.stderr, FAILURE_OUTPUT_LINES)
  }`;

  const killed = Number(killRequest);
  await t.step("a guest asked to be killed in the middle of its writes", () => {
    assert.ok(killed === 1 || killed === 2, `No kill request from a guest. ${where}`);
  });
  if (killed !== 1 && killed !== 2) return;
  const survivor = 3 - killed;
  const byNode = new Map([[1, verdicts(log1)], [2, verdicts(log2)]]);

  for (const step of SHARED_STEPS) {
    await t.step(`both guests pass ${step}`, () => {
      for (const n of [1, 2]) assertPassed(`node${n}`, byNode.get(n)!, step, where);
    });
  }
  for (const step of SURVIVOR_STEPS) {
    await t.step(`the survivor passes ${step}`, () => {
      assertPassed(`node${survivor} (the survivor)`, byNode.get(survivor)!, step, where);
    });
  }
  for (const check of HOST_CHECKS) {
    await t.step(`host check ${check} passes`, () => {
      const lines = cluster.stdout.split("\n");
      const fail = lines.find((line) => line.startsWith(`FAIL host-${check}:`));
      assert.equal(fail, undefined, `${fail}\n${where}`);
      assert.ok(lines.includes(`PASS host-${check}`), `No PASS line for ${check}. ${where}`);
    });
  }
  await t.step("run_cluster.sh exits 0", () => {
    const survivorLog = survivor === 1 ? log1 : log2;
    assert.equal(
      cluster.code,
      0,
      `run_cluster.sh exited ${cluster.code}\n${where}\n--- survivor's test.log (tail)\n${
        tail(survivorLog, FAILURE_OUTPUT_LINES)
      }`,
    );
  });
  if (cluster.code === 0) await Deno.remove(results, { recursive: true });
}

Deno.test({
  name:
    "two clogd nodes serve one clustered-disk mirror under qemu and survive the disk writer's kill",
  ignore: missing.length > 0 && !inCi,
  fn: (t) => clusterRun(t, "writer"),
});

Deno.test({
  name:
    "two clogd nodes serve one clustered-disk mirror under qemu and survive the other node's kill",
  ignore: missing.length > 0 && !inCi,
  fn: (t) => clusterRun(t, "other"),
});
