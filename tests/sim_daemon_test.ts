/**
 * The kernel simulator against the real daemon over netlink in a network namespace: full mirror
 * lifecycles (create, resync under I/O, suspend/resume, status, remove) for core and disk logs,
 * with and without integrated flush, in both header layouts; every answer is checked by the
 * simulator's model. Also the kernel's reconnect after a daemon kill, driven by the simulator.
 */

import assert from "node:assert/strict";
import { withNetns } from "./support/netns.ts";
import { DaemonProcess, DENO, REPO, sleep } from "./support/daemon.ts";
import type { KernelSimReport } from "../src/sim/cli.ts";
import type { NetworkNamespace } from "./support/netns.ts";

async function sim(netns: NetworkNamespace, args: string[]): Promise<KernelSimReport> {
  const child = netns.spawn([
    DENO,
    "run",
    "--allow-all",
    `${REPO}main.ts`,
    "kernel-sim",
    "--json",
    ...args,
  ]);
  const out = await child.output();
  const text = new TextDecoder().decode(out.stdout);
  let report: KernelSimReport;
  try {
    report = JSON.parse(text);
  } catch {
    throw new Error(
      `kernel-sim exited ${out.code} without a JSON report:\n${text}\n${
        new TextDecoder().decode(out.stderr)
      }`,
    );
  }
  return report;
}

function assertClean(report: KernelSimReport, what: string, minReplies = 1000): void {
  assert.equal(
    report.violations.total,
    0,
    `${what}: violations ${JSON.stringify(report.violations.first.slice(0, 5), null, 1)}`,
  );
  assert.equal(report.requests.outstanding, 0, `${what}: unanswered requests`);
  assert.equal(report.requests.timeouts, 0, `${what}: timeouts`);
  assert.equal(report.ok, true, what);
  assert.ok(
    report.requests.replied > minReplies,
    `${what}: a real workload ran (${report.requests.replied} replies)`,
  );
}

const CASES: { name: string; args: string[]; disk?: boolean; minReplies?: number }[] = [
  {
    name: "two core logs, resync during I/O, suspend/resume cycles, status, bad requests",
    args: [
      "--logs",
      "2",
      "--regions",
      "512",
      "--ios",
      "1500",
      "--iodepth",
      "8",
      "--suspend-cycles",
      "2",
      "--status-every-ms",
      "200",
      "--bad-requests",
      "20",
      "--seed",
      "11",
    ],
  },
  {
    // Found by the simulator: IS_REMOTE_RECOVERING kept answering "recovering" after
    // PRESUSPEND, so held writes never drained and the suspend hung.
    name: "suspend while writes wait for regions the resync has not reached",
    args: [
      "--regions",
      "256",
      "--ios",
      "40",
      "--iodepth",
      "16",
      "--io-during-resync",
      "--suspend-cycles",
      "1",
      "--recovery-latency-us",
      "20000",
      "--max-run-ms",
      "30000",
      "--seed",
      "17",
    ],
    minReplies: 100,
  },
  {
    name: "core log with integrated flush, 32 bios in flight, hot regions",
    args: [
      "--regions",
      "1024",
      "--ios",
      "3000",
      "--iodepth",
      "32",
      "--integrated-flush",
      "--hot-regions",
      "0.02",
      "--sync",
      "nosync",
      "--seed",
      "12",
    ],
  },
  {
    name: "disk log on a file, fresh, integrated flush",
    args: [
      "--type",
      "disk",
      "--disk-fresh",
      "--regions",
      "2048",
      "--region-size",
      "256",
      "--ios",
      "1500",
      "--iodepth",
      "16",
      "--integrated-flush",
      "--seed",
      "13",
    ],
    disk: true,
  },
  {
    name: "disk log on a file, separate MARK and FLUSH, suspend/resume",
    args: [
      "--type",
      "disk",
      "--disk-fresh",
      "--regions",
      "1024",
      "--ios",
      "1500",
      "--iodepth",
      "8",
      "--suspend-cycles",
      "1",
      "--seed",
      "14",
    ],
    disk: true,
  },
  {
    name: "2009 header layout (152-byte header, no luid), core log",
    args: [
      "--layout",
      "2009",
      "--regions",
      "256",
      "--ios",
      "1500",
      "--iodepth",
      "8",
      "--seed",
      "15",
    ],
  },
];

for (const c of CASES) {
  Deno.test(`kernel-sim against clogd: ${c.name}`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "clogd-sim-" });
    try {
      await withNetns(async (netns) => {
        const daemon = await DaemonProcess.start(netns, { dir });
        try {
          // The daemon stays up here: no polling of /proc/net/netlink for a dead daemon (under
          // heavy load that check can misfire and fail a send the daemon then answers).
          const args = [...c.args, "--listener-poll-ms", "0"];
          if (c.disk) {
            await Deno.writeFile(`${dir}/log0.img`, new Uint8Array(256 * 1024));
            args.push("--device", `${dir}/log%d.img`);
          }
          const report = await sim(netns, args);
          assertClean(report, c.name, c.minReplies);
          const st = await daemon.query();
          assert.equal(st.logs.length, 0, "every log removed at the end");
          assert.equal(daemon.exited, false);
        } finally {
          await daemon.stop();
        }
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("kernel-sim against clogd: daemon killed during disk writes, the kernel reconnects", async () => {
  const dir = await Deno.makeTempDir({ prefix: "clogd-sim-" });
  try {
    await withNetns(async (netns) => {
      await Deno.writeFile(`${dir}/log0.img`, new Uint8Array(256 * 1024));
      let daemon = await DaemonProcess.start(netns, { dir: `${dir}/a` });
      const run = sim(netns, [
        "--type",
        "disk",
        "--sync",
        "nosync",
        "--device",
        `${dir}/log%d.img`,
        "--regions",
        "1024",
        "--integrated-flush",
        "--duration",
        "5",
        "--iodepth",
        "16",
        "--timeout-ms",
        "1500",
        "--esrch-retry-ms",
        "200",
        "--seed",
        "16",
      ]);
      await sleep(2000);
      await daemon.stop(); // SIGKILL
      await sleep(300);
      daemon = await DaemonProcess.start(netns, { dir: `${dir}/b` });
      try {
        const report = await run;
        assert.equal(
          report.violations.total,
          0,
          JSON.stringify(report.violations.first.slice(0, 5)),
        );
        assert.ok(report.requests.esrch >= 1, "the restarted daemon answered -ESRCH");
        assert.ok(report.requests.reCtr >= 1, "the kernel re-sent CTR");
        assert.equal(report.requests.outstanding, 0);
        assert.equal(report.ok, true);
        await daemon.waitLog("rebuilt by the kernel after a daemon restart");
      } finally {
        await daemon.stop();
      }
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
