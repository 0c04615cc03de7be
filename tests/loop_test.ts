// The event loop over real fds: netlink connector sockets in a fresh network namespace (root),
// and a child Deno process for signals.
import assert from "node:assert/strict";
import { SIGUSR2, tgkill } from "../ffi/libc.ts";
import { EventLoop } from "../src/loop.ts";
import { NetlinkSocket } from "../src/kernel/netlink.ts";
import { type NetworkNamespace, withNetns } from "./support/netns.ts";

const CN_IDX_DM = 7;
// Long enough that a test passing within it proves something other than the timeout woke it.
const LONG_TIMEOUT_MS = 10_000;
const buf = new Uint8Array(4096);

function datagram(n: number): Uint8Array {
  const bytes = new Uint8Array(40);
  new DataView(bytes.buffer).setUint32(36, n, true);
  return bytes;
}

function lastNumber(): number {
  return new DataView(buf.buffer).getUint32(36, true);
}

/** A kernel-role and a daemon-role socket in `netns`, closed by the returned dispose. */
function socketPair(netns: NetworkNamespace) {
  const [kernel, daemon] = netns.enter(() => [
    new NetlinkSocket({ role: "kernel" }),
    new NetlinkSocket({ role: "daemon" }),
  ]);
  return {
    kernel,
    daemon,
    [Symbol.dispose]() {
      kernel.close();
      daemon.close();
    },
  };
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

Deno.test("EventLoop.run() drains every queued datagram in one handler call", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
    const burst = 500;
    for (let n = 0; n < burst; n++) pair.kernel.send(datagram(n), { group: CN_IDX_DM });
    let calls = 0;
    const seen: number[] = [];
    loop.watch(pair.daemon.fd, () => {
      calls++;
      while (pair.daemon.recv(buf) !== null) seen.push(lastNumber());
      if (seen.length === burst) loop.stop();
    });
    await loop.run();
    loop.close();
    assert.equal(calls, 1);
    assert.deepEqual(seen, Array.from({ length: burst }, (_, n) => n));
    assert.equal(loop.stats.dispatches, 1);
    assert.equal(loop.stats.polls, 1);
  });
});

Deno.test("EventLoop.run() wakes when a watched fd becomes readable", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
    let received = -1;
    loop.watch(pair.daemon.fd, () => {
      while (pair.daemon.recv(buf) !== null) received = lastNumber();
      loop.stop();
    });
    setTimeout(() => pair.kernel.send(datagram(77), { group: CN_IDX_DM }), 50);
    const start = performance.now();
    await loop.run();
    const elapsed = performance.now() - start;
    loop.close();
    assert.equal(received, 77);
    assert.ok(elapsed < LONG_TIMEOUT_MS / 4, `woke after ${elapsed} ms`);
    assert.equal(loop.stats.timeouts, 0);
  });
});

Deno.test("EventLoop.watch() during a pending poll takes effect at once", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
    let received = -1;
    const running = loop.run();
    await delay(20); // the poll over the eventfd alone is pending now
    loop.watch(pair.daemon.fd, () => {
      while (pair.daemon.recv(buf) !== null) received = lastNumber();
      loop.stop();
    });
    const start = performance.now();
    await delay(20);
    pair.kernel.send(datagram(5), { group: CN_IDX_DM });
    await running;
    loop.close();
    assert.equal(received, 5);
    assert.ok(performance.now() - start < LONG_TIMEOUT_MS / 4);
  });
});

Deno.test("EventLoop.unwatch() stops calling the handler", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: 20 });
    let calls = 0;
    loop.watch(pair.daemon.fd, () => {
      calls++;
      loop.unwatch(pair.daemon.fd); // leaves the datagram unread: the fd stays readable
    });
    pair.kernel.send(datagram(1), { group: CN_IDX_DM });
    setTimeout(() => loop.stop(), 150);
    await loop.run();
    loop.close();
    assert.equal(calls, 1);
    assert.ok(loop.stats.timeouts >= 2, "kept polling without the readable fd");
    assert.ok(pair.daemon.recv(buf) !== null, "the datagram is still queued");
  });
});

Deno.test("EventLoop.wake() ends a pending poll and runs the turn handlers", async () => {
  const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
  let work = 0;
  let done = 0;
  loop.onTurn(() => {
    done += work;
    work = 0;
    if (done >= 3) loop.stop();
  });
  // Work queued from outside the loop (a timer here, a promise callback in the daemon).
  setTimeout(() => {
    work = 3;
    loop.wake();
    loop.wake(); // coalesced with the first
  }, 50);
  const start = performance.now();
  await loop.run();
  const elapsed = performance.now() - start;
  loop.close();
  assert.equal(done, 3);
  assert.ok(elapsed < LONG_TIMEOUT_MS / 4, `woke after ${elapsed} ms`);
  assert.equal(loop.stats.timeouts, 0);
  assert.ok(loop.stats.wakes >= 1);
});

Deno.test("EventLoop.stop() ends run() while a poll is pending, and Deno timers run meanwhile", async () => {
  const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
  let ticks = 0;
  const interval = setInterval(() => ticks++, 5);
  setTimeout(() => loop.stop(), 100);
  const start = performance.now();
  try {
    await loop.run();
  } finally {
    clearInterval(interval);
  }
  const elapsed = performance.now() - start;
  assert.equal(loop.running, false);
  assert.ok(elapsed < LONG_TIMEOUT_MS / 4, `stopped after ${elapsed} ms`);
  assert.ok(ticks >= 5, `timers ran ${ticks} times while the poll was pending`);
  assert.ok(loop.stats.polls <= 3, `${loop.stats.polls} polls: no spinning`);
  // stop() before run() is sticky: run() returns at once.
  loop.stop();
  await loop.run();
  loop.close();
});

Deno.test("EventLoop.run() times out when idle instead of hanging", async () => {
  const loop = new EventLoop({ timeoutMs: 20 });
  setTimeout(() => loop.stop(), 150);
  await loop.run();
  loop.close();
  assert.ok(loop.stats.timeouts >= 3, `${loop.stats.timeouts} timeouts`);
});

Deno.test("EventLoop.run() rejects when a handler throws, and refuses to run twice", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
    loop.watch(pair.daemon.fd, () => {
      throw new Error("Handler failed");
    });
    pair.kernel.send(datagram(1), { group: CN_IDX_DM });
    const running = loop.run();
    await assert.rejects(loop.run(), /already running/);
    await assert.rejects(running, /Handler failed/);
    assert.equal(loop.running, false);
    loop.close();
  });
});

Deno.test("EventLoop.run() rejects a watched fd that was closed without unwatch()", async () => {
  await withNetns(async (netns) => {
    using pair = socketPair(netns);
    const loop = new EventLoop({ timeoutMs: LONG_TIMEOUT_MS });
    loop.watch(pair.daemon.fd, () => {});
    pair.daemon.close();
    await assert.rejects(loop.run(), /is not open: unwatch\(\) it before closing it/);
    loop.close();
  });
});

// The loop in a child process: the signals have to come from outside.
const CHILD = `
import { EventLoop } from ${JSON.stringify(import.meta.resolve("../src/loop.ts"))};
const loop = new EventLoop({ timeoutMs: ${LONG_TIMEOUT_MS} });
loop.installSignals({
  onTerminate: (signal) => { console.log("terminate " + signal); loop.stop(); },
  onDump: () => console.log("dump"),
});
const running = loop.run();
// Deno arms its SIGUSR1 inspector trigger about 0.5 s after start; wait until it is disarmed.
const deadline = performance.now() + 5000;
while (!loop.stats.inspectorSignalDisarmed && performance.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 20));
}
console.log("ready disarmed=" + loop.stats.inspectorSignalDisarmed);
await running;
console.log("stopped signals=" + loop.stats.signals + " timeouts=" + loop.stats.timeouts +
  " interrupted=" + loop.stats.interrupted);
`;

async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let pending = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    let end;
    while ((end = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, end);
      pending = pending.slice(end + 1);
    }
  }
  if (pending) yield pending;
}

Deno.test("EventLoop.installSignals() dumps on SIGUSR2, stops on SIGTERM, and SIGUSR1 opens no inspector", async () => {
  // Loopback up: an inspector started by SIGUSR1 could listen there, and the test would see it.
  await withNetns(async (netns) => {
    const child = netns.spawn([Deno.execPath(), "eval", "--ext=ts", CHILD]);
    const stderr = new Response(child.stderr).text();
    const output = lines(child.stdout);
    const next = async () => (await output.next()).value;
    assert.equal(await next(), "ready disarmed=true");
    child.kill("SIGUSR1");
    child.kill("SIGUSR1");
    await delay(200);
    child.kill("SIGUSR2");
    assert.equal(await next(), "dump");
    child.kill("SIGUSR2");
    assert.equal(await next(), "dump");
    child.kill("SIGTERM");
    assert.equal(await next(), "terminate SIGTERM");
    // A process-directed signal may land on the poll's thread too: any interrupted count is ok.
    assert.match(await next() ?? "", /^stopped signals=3 timeouts=0 interrupted=\d+$/);
    assert.equal((await child.status).code, 0);
    assert.doesNotMatch(await stderr, /Debugger listening/);
  }, { loopback: true });
});

const POLL_SYSCALL_X86_64 = 7;

Deno.test({
  name: "EventLoop.run() survives its poll being interrupted by a signal on the worker thread",
  ignore: Deno.build.arch !== "x86_64", // the syscall number below is x86_64's
  fn: async () => {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=ts", CHILD],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    try {
      const output = lines(child.stdout);
      const next = async () => (await output.next()).value;
      assert.equal(await next(), "ready disarmed=true");
      // The thread blocked in poll(2) is the worker running the loop's nonblocking poll.
      const tasks = [];
      for await (const entry of Deno.readDir(`/proc/${child.pid}/task`)) {
        const syscall = await Deno.readTextFile(`/proc/${child.pid}/task/${entry.name}/syscall`);
        if (Number(syscall.split(" ")[0]) === POLL_SYSCALL_X86_64) tasks.push(Number(entry.name));
      }
      assert.equal(tasks.length, 1, "one thread waits in poll");
      tgkill(child.pid, tasks[0], { signal: SIGUSR2 });
      assert.equal(await next(), "dump");
      child.kill("SIGTERM");
      assert.equal(await next(), "terminate SIGTERM");
      const stopped = /^stopped signals=2 timeouts=0 interrupted=(\d+)$/.exec(await next() ?? "");
      assert.ok(stopped, "the loop ran on and stopped");
      assert.ok(Number(stopped[1]) >= 1, "the poll was interrupted and redone");
      assert.equal((await child.status).code, 0);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // Exited already, as it should.
      }
    }
  },
});
