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

const REPO = new URL("../", import.meta.url).pathname;

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

async function findTool(name: string): Promise<boolean> {
  const probe = new Deno.Command("/bin/sh", {
    args: ["-c", 'command -v "$1"', "sh", name],
    stdout: "null",
    stderr: "null",
    env: { PATH: `${Deno.env.get("PATH") ?? ""}:/usr/sbin:/sbin` },
  });
  return (await probe.output()).success;
}

async function missingTools(): Promise<string[]> {
  const missing: string[] = [];
  for (const tool of REQUIRED_TOOLS) {
    if (!(await findTool(tool))) missing.push(tool);
  }
  return missing;
}

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
  seconds: number;
}

async function run(command: string, args: string[]): Promise<Ran> {
  const started = performance.now();
  const output = await new Deno.Command(command, {
    args,
    cwd: REPO,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: {
      PATH: `${Deno.env.get("PATH") ?? ""}:/usr/sbin:/sbin`,
      // The guest runs clogd with the deno that runs this test, unless told otherwise.
      CLOGD_DENO: Deno.env.get("CLOGD_DENO") ?? Deno.execPath(),
    },
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
    seconds: (performance.now() - started) / 1000,
  };
}

function tail(text: string, lines: number): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

async function readText(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "";
    throw error;
  }
}

const missing = await missingTools();
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

    const build = await run("bash", ["scripts/vm/build_image.sh"]);
    console.log(`real_kernel_test: guest image ready in ${build.seconds.toFixed(1)} s`);
    assert.equal(
      build.code,
      0,
      `build_image.sh failed (exit ${build.code}):\n${tail(build.stderr, FAILURE_OUTPUT_LINES)}`,
    );
    const image = build.stdout.trim().split("\n").at(-1) ?? "";
    assert.ok(image.length > 0, "build_image.sh printed no image directory");

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
