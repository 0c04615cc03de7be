/**
 * `deno task bench`: clogd's benchmarks, every number from one run on this machine.
 *
 * 1. Write cycle over real netlink (MARK + FLUSH, CLEAR + FLUSH per I/O) at 1 and 32 I/Os in
 *    flight against a bare FFI echo responder and against clogd (core log), same client, same
 *    sockets, same run: requests/s and FLUSH p50/p99; clogd/echo ratio.
 * 2. clustered-disk log (a file, real fdatasync), integrated flush, 32 in flight: fdatasyncs per
 *    32 FLUSHes answered (group commit).
 * 3. Memory: resident set of the daemon before and after a log of 2^24 regions is resumed.
 *
 * Each phase runs in its own network namespace. Options: --seconds N (per load run, default 5).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { NetworkNamespace } from "../../tests/support/netns.ts";
import { DaemonProcess, KernelPeer, REPO, sleep } from "../../tests/support/daemon.ts";
import { RequestType } from "../../src/kernel/protocol.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { seconds: { type: "string", default: "5" } },
});
const seconds = values.seconds;
const DENO = Deno.execPath();

interface LoadResult {
  inflight: number;
  requests: number;
  errors: number;
  requestsPerSecond: number;
  flushP50us: number;
  flushP99us: number;
}

async function load(netns: NetworkNamespace, args: string[]): Promise<LoadResult> {
  const child = netns.spawn([
    DENO,
    "run",
    "--allow-all",
    `${REPO}scripts/bench/load.ts`,
    "--seconds",
    seconds,
    ...args,
  ]);
  const out = await child.output();
  const text = new TextDecoder().decode(out.stdout).trim();
  if (out.code !== 0) throw new Error(`load.ts failed: ${new TextDecoder().decode(out.stderr)}`);
  const r = JSON.parse(text.split("\n").pop()!) as LoadResult;
  if (r.errors !== 0) throw new Error(`load.ts saw ${r.errors} error replies`);
  return r;
}

function row(name: string, r: LoadResult): string {
  return `| ${name} | ${r.inflight} | ${
    r.requestsPerSecond.toLocaleString("en")
  } | ${r.flushP50us} / ${r.flushP99us} |`;
}

function rssKiB(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
}

const lines: string[] = [];
const say = (s: string) => {
  lines.push(s);
  console.log(s);
};

// 1. Echo against clogd, core log.
{
  const netns = await NetworkNamespace.create({ prefix: "clogd-bench" });
  try {
    const echo = netns.spawn([DENO, "run", "--allow-all", `${REPO}scripts/bench/echo.ts`], {
      stdout: "piped",
    });
    await sleep(1500); // echo prints "ready" at once; give Deno its start-up
    const e1 = await load(netns, ["--inflight", "1"]);
    const e32 = await load(netns, ["--inflight", "32"]);
    echo.kill("SIGTERM");
    await echo.status;
    const daemon = await DaemonProcess.start(netns, { args: ["--log-level", "warn"] });
    const c1 = await load(netns, ["--inflight", "1", "--setup", "--uuid", "bench-core-1"]);
    const c32 = await load(netns, ["--inflight", "32", "--setup", "--uuid", "bench-core-32"]);
    const ci32 = await load(netns, [
      "--inflight",
      "32",
      "--setup",
      "--integrated",
      "--uuid",
      "bench-core-i32",
    ]);
    await daemon.stop();
    say(
      `Write cycle over netlink, ${seconds} s per run (requests/s counts MARK, CLEAR and FLUSH):`,
    );
    say("");
    say("| responder | in flight | requests/s | FLUSH p50 / p99 (us) |");
    say("|---|---|---|---|");
    say(row("bare FFI echo", e1));
    say(row("clogd, clustered-core", c1));
    say(row("bare FFI echo", e32));
    say(row("clogd, clustered-core", c32));
    say(row("clogd, clustered-core, integrated flush", ci32));
    say("");
    say(
      `clogd / echo throughput: ${
        (c1.requestsPerSecond / e1.requestsPerSecond).toFixed(2)
      } at 1 in flight, ` +
        `${(c32.requestsPerSecond / e32.requestsPerSecond).toFixed(2)} at 32 (goal: >= 0.5)`,
    );
  } finally {
    await netns.delete();
  }
}

// 2. Disk log group commit.
{
  const netns = await NetworkNamespace.create({ prefix: "clogd-bench" });
  const dir = await Deno.makeTempDir({ prefix: "clogd-bench-" });
  try {
    const logFile = `${dir}/disk.log`;
    await Deno.writeFile(logFile, new Uint8Array(1 << 20));
    const daemon = await DaemonProcess.start(netns, { args: ["--log-level", "warn"] });
    const ctr = `${4096 * 1024} clustered-disk ${logFile} 1024 nosync`;
    const d32 = await load(netns, [
      "--inflight",
      "32",
      "--setup",
      "--integrated",
      "--uuid",
      "bench-disk",
      "--ctr",
      ctr,
    ]);
    const st = await daemon.query();
    const ds = st.logs[0].diskStats!;
    // Integrated flush: FLUSH(mark), CLEAR, FLUSH per I/O, so two requests in three are FLUSHes.
    const flushCount = Math.round((d32.requests * 2) / 3);
    await daemon.stop();
    say("");
    say(`clustered-disk log on a file in ${dir}, integrated flush, 32 in flight:`);
    say("");
    say(
      "| in flight | requests/s | FLUSH p50 / p99 (us) | FLUSHes | fdatasyncs | fdatasyncs per 32 FLUSHes |",
    );
    say("|---|---|---|---|---|---|");
    say(
      `| 32 | ${
        d32.requestsPerSecond.toLocaleString("en")
      } | ${d32.flushP50us} / ${d32.flushP99us} | ${flushCount} | ${ds.syncs} | ${
        (ds.syncs / (flushCount / 32)).toFixed(2)
      } |`,
    );
  } finally {
    await netns.delete();
    await Deno.remove(dir, { recursive: true });
  }
}

// 3. Memory for 2^24 regions.
{
  const netns = await NetworkNamespace.create({ prefix: "clogd-bench" });
  try {
    const daemon = await DaemonProcess.start(netns, { args: ["--log-level", "warn"] });
    const peer = new KernelPeer(netns);
    const enc = new TextEncoder();
    // The same requests on a log of 1,024 regions first: the baseline includes the code paths
    // (JIT, heap) that serving any log brings, so the difference is the big log's own cost.
    const exercise = async (uuid: string, regions: number) => {
      const base = { layout: "current" as const, luid: 0xffff888066660000n, uuid, version: 3 };
      let r = await peer.request({
        ...base,
        type: RequestType.CTR,
        payload: enc.encode(`${regions * 8} clustered-core 8`),
      });
      if (r.errno !== 0) throw new Error(`CTR of ${regions} regions failed: ${r.errno}`);
      r = await peer.request({ ...base, type: RequestType.RESUME, payload: new Uint8Array(0) });
      for (let i = 0; i < 64; i++) {
        const p = new Uint8Array(8);
        new DataView(p.buffer).setBigUint64(0, BigInt((i * 4099) % regions), true);
        await peer.request({ ...base, type: RequestType.MARK_REGION, payload: p });
        await peer.request({ ...base, type: RequestType.IN_SYNC, payload: p });
      }
      await daemon.query(); // status: digest and popcount over the whole log
      await sleep(500);
    };
    await exercise("bench-small", 1024);
    const before = rssKiB(daemon.pid);
    const regions = 2 ** 24;
    await exercise("bench-big", regions);
    const after = rssKiB(daemon.pid);
    peer.close();
    await daemon.stop();
    say("");
    say(
      `Memory: daemon RSS ${(before / 1024).toFixed(1)} MiB serving a log of 1,024 regions, ${
        (after / 1024).toFixed(1)
      } MiB with a resumed ` +
        `log of 2^24 regions added: ${
          ((after - before) / 1024).toFixed(1)
        } MiB for that log (goal: <= 8 MiB)`,
    );
  } finally {
    await netns.delete();
  }
}
