/**
 * Real-kernel test: boots Debian's 6.1 kernel under qemu (software emulation) and runs
 * tests/kernel/mirror_test.sh inside it, where clogd serves the `userspace` dirty logs of real
 * device-mapper mirrors. Needs root, qemu-system-x86_64 and debootstrap; the guest image is
 * built once and cached (scripts/vm/build_image.sh).
 *
 * Outside CI the test is skipped when qemu or debootstrap is missing; under CI (CI set) a
 * missing tool fails it.
 */
import assert from "node:assert/strict";
import { guestImage, missingTools, readText, run, tail } from "./support/vm.ts";

/** The in-guest cases that must each print a PASS line, in the order the script runs them. */
const EXPECTED_CASES = [
  "no-daemon",
  "core",
  "core-integrated-flush",
  "core-nosync",
  "disk",
  "disk-integrated-flush",
  "restart-core",
  "restart-disk",
  "restart-idle-disk",
  "shutdown",
] as const;

/** Hard limit on the whole guest run, boot to power-off, enforced by run_guest.sh (seconds). */
const GUEST_TIMEOUT_SECONDS = 600;

/** Tools whose absence skips the test outside CI. */
const REQUIRED_TOOLS = ["qemu-system-x86_64", "debootstrap"] as const;

/** Lines of a failed command's output quoted in the assertion message. */
const FAILURE_OUTPUT_LINES = 120;

const missing = await missingTools(REQUIRED_TOOLS);
const inCi = (Deno.env.get("CI") ?? "") !== "";
if (missing.length > 0 && !inCi) {
  console.warn(
    `real_kernel_test: skipped: missing ${missing.join(", ")} (install qemu-system-x86 and ` +
      "debootstrap, run as root; under CI a missing tool is a failure)",
  );
}

Deno.test({
  name: "clogd serves userspace dirty logs of real dm mirrors under qemu (mirror_test.sh)",
  ignore: missing.length > 0 && !inCi,
  async fn(t) {
    assert.deepEqual(missing, [], `Missing tools under CI: ${missing.join(", ")}`);

    const image = await guestImage("real_kernel_test");

    const results = await Deno.makeTempDir({ prefix: "clogd-real-kernel-" });
    const guest = await run("bash", [
      "scripts/vm/run_guest.sh",
      "--image",
      image,
      "--results",
      results,
      "--timeout",
      String(GUEST_TIMEOUT_SECONDS),
      "tests/kernel/mirror_test.sh",
    ]);
    const testLog = await readText(`${results}/test.log`);
    console.log(
      `real_kernel_test: guest ran in ${guest.seconds.toFixed(1)} s, exit ${guest.code}; ` +
        `results in ${results}`,
    );
    for (const line of testLog.split("\n")) {
      if (/^(PASS|FAIL) |^mirror_test summary: /.test(line)) console.log(`  ${line}`);
    }
    const context = `Results in ${results}\n--- test.log (tail)\n${
      tail(testLog, FAILURE_OUTPUT_LINES)
    }\n--- run_guest.sh stderr (tail)\n${tail(guest.stderr, FAILURE_OUTPUT_LINES)}`;

    for (const name of EXPECTED_CASES) {
      await t.step(`case ${name} passes in the guest`, () => {
        const lines = testLog.split("\n");
        // The whole log is quoted once, by the last step; here only the verdict.
        const fail = lines.find((line) => line.startsWith(`FAIL ${name}:`));
        assert.equal(fail, undefined, `${fail}\nResults in ${results}`);
        assert.ok(
          lines.some((line) => line.startsWith(`PASS ${name} (`)),
          `No PASS line for case ${name}: the guest did not run it. Results in ${results}`,
        );
      });
    }
    await t.step("the guest test exits 0 and reports no failure", () => {
      assert.match(
        testLog,
        new RegExp(`^mirror_test summary: passed ${EXPECTED_CASES.length}, failed 0$`, "m"),
        context,
      );
      assert.equal(guest.code, 0, `run_guest.sh exited ${guest.code}\n${context}`);
    });
    if (guest.code === 0) await Deno.remove(results, { recursive: true });
  },
});
