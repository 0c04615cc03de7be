// Real NETLINK_CONNECTOR sockets inside a fresh network namespace per test (needs root): a
// "kernel" socket plays the kernel, a "daemon" socket plays clogd.
import assert from "node:assert/strict";
import { ECONNREFUSED, ErrnoError } from "../ffi/libc.ts";
import { NetlinkSocket, RECEIVE_BUFFER_BYTES } from "../src/kernel/netlink.ts";
import { NetworkNamespace, withNetns } from "./support/netns.ts";

const CN_IDX_DM = 7;
const HEADERS = 36; // nlmsghdr (16) + cn_msg (20)

/** nlmsghdr + cn_msg (idx 7, val 1) + payload, little-endian: what the kernel multicasts. */
function connectorFrame(seq: number, payload: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(HEADERS + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, bytes.length, true); // nlmsg_len
  view.setUint16(4, 3, true); // nlmsg_type NLMSG_DONE
  view.setUint32(8, seq, true); // nlmsg_seq
  view.setUint32(16, CN_IDX_DM, true); // cn_msg.id.idx
  view.setUint32(20, 1, true); // cn_msg.id.val
  view.setUint32(24, seq, true); // cn_msg.seq
  view.setUint16(32, payload.length, true); // cn_msg.len
  bytes.set(payload, HEADERS);
  return bytes;
}

function cnSeq(bytes: Uint8Array): number {
  return new DataView(bytes.buffer, bytes.byteOffset).getUint32(24, true);
}

const buf = new Uint8Array(64 * 1024);

Deno.test("NetlinkSocket multicast request reaches the daemon, its reply reaches the sender's port", async () => {
  await withNetns((netns) => {
    const [kernel, daemon] = netns.enter(() => [
      new NetlinkSocket({ role: "kernel" }),
      new NetlinkSocket({ role: "daemon" }),
    ]);
    try {
      assert.notEqual(kernel.portId, daemon.portId);
      assert.equal(daemon.recv(buf), null, "nothing queued yet");

      const payload = new TextEncoder().encode("request body");
      const request = connectorFrame(41, payload);
      // In a namespace the group send gets ECONNREFUSED (no kernel connector): still "sent".
      assert.equal(kernel.send(request, { group: CN_IDX_DM }), true);

      const got = daemon.recv(buf);
      assert.ok(got !== null);
      assert.equal(got.length, request.length);
      assert.equal(got.truncated, false);
      assert.equal(got.portId, kernel.portId);
      assert.equal(got.group, CN_IDX_DM);
      assert.deepEqual(buf.subarray(0, got.length), request);
      assert.equal(daemon.recv(buf), null, "exactly one datagram");

      const reply = connectorFrame(41, new Uint8Array([1, 2, 3]));
      assert.equal(daemon.send(reply, { portId: got.portId }), true);
      const back = kernel.recv(buf);
      assert.ok(back !== null);
      assert.equal(back.portId, daemon.portId);
      assert.equal(back.group, 0, "a unicast");
      assert.equal(cnSeq(buf), 41);
      assert.deepEqual(buf.subarray(0, back.length), reply);
      assert.equal(kernel.stats.sent, 1);
      assert.equal(daemon.stats.received, 1);
    } finally {
      kernel.close();
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket gets the large receive buffer it asks for", async () => {
  await withNetns((netns) => {
    const daemon = netns.enter(() => new NetlinkSocket({ role: "daemon" }));
    try {
      // The kernel doubles the request (SO_RCVBUFFORCE as root ignores net.core.rmem_max).
      assert.equal(daemon.receiveBufferBytes, 2 * RECEIVE_BUFFER_BYTES);
    } finally {
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket holds a burst of 4096 in-flight requests without a drop", async () => {
  await withNetns((netns) => {
    const [kernel, daemon] = netns.enter(() => [
      new NetlinkSocket({ role: "kernel" }),
      new NetlinkSocket({ role: "daemon" }),
    ]);
    try {
      const burst = 4096;
      const payload = new Uint8Array(160 + 8); // a request header and one region
      for (let seq = 0; seq < burst; seq++) {
        assert.equal(kernel.send(connectorFrame(seq, payload), { group: CN_IDX_DM }), true);
      }
      let seq = 0;
      for (let got = daemon.recv(buf); got !== null; got = daemon.recv(buf)) {
        assert.equal(cnSeq(buf), seq++);
      }
      assert.equal(seq, burst);
      assert.equal(daemon.stats.overruns, 0);
    } finally {
      kernel.close();
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket.recv() survives ENOBUFS after a flood and keeps receiving", async () => {
  await withNetns((netns) => {
    const [kernel, daemon] = netns.enter(() => [
      new NetlinkSocket({ role: "kernel" }),
      new NetlinkSocket({ role: "daemon", receiveBufferBytes: 4096 }),
    ]);
    try {
      const flood = 2000;
      const payload = new Uint8Array(200);
      for (let seq = 0; seq < flood; seq++) {
        assert.equal(kernel.send(connectorFrame(seq, payload), { group: CN_IDX_DM }), true);
      }
      let received = 0;
      while (daemon.recv(buf) !== null) received++;
      assert.ok(daemon.stats.overruns >= 1, "the overrun was reported and counted");
      assert.ok(received > 0 && received < flood, `received ${received} of ${flood}`);

      assert.equal(kernel.send(connectorFrame(99_999, payload), { group: CN_IDX_DM }), true);
      const got = daemon.recv(buf);
      assert.ok(got !== null, "still receives after the overrun");
      assert.equal(cnSeq(buf), 99_999);
    } finally {
      kernel.close();
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket.send() reports a full receiver as retryable, then succeeds", async () => {
  await withNetns((netns) => {
    const [kernel, daemon] = netns.enter(() => [
      new NetlinkSocket({ role: "kernel", receiveBufferBytes: 4096 }),
      new NetlinkSocket({ role: "daemon" }),
    ]);
    try {
      const reply = connectorFrame(1, new Uint8Array(200));
      let accepted = 0;
      while (daemon.send(reply, { portId: kernel.portId })) {
        accepted++;
        assert.ok(accepted < 10_000, "a 4 KiB receiver must fill up");
      }
      assert.ok(accepted > 0);
      assert.equal(daemon.stats.sendRetries, 1);
      let drained = 0;
      while (kernel.recv(buf) !== null) drained++;
      assert.equal(drained, accepted, "every accepted unicast was delivered");
      assert.equal(daemon.send(reply, { portId: kernel.portId }), true);
      assert.ok(kernel.recv(buf) !== null);
    } finally {
      kernel.close();
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket.send() to a port nobody holds throws ECONNREFUSED", async () => {
  await withNetns((netns) => {
    const daemon = netns.enter(() => new NetlinkSocket({ role: "daemon" }));
    try {
      const reply = connectorFrame(1, new Uint8Array(8));
      assert.throws(() => daemon.send(reply, { portId: 0x7fff_fff0 }), (error: unknown) => {
        assert.ok(error instanceof ErrnoError);
        assert.equal(error.errno, ECONNREFUSED);
        assert.equal(error.syscall, "sendto");
        assert.equal(error.message, "sendto failed: ECONNREFUSED (111)");
        return true;
      });
      // Port 0 is the kernel, which exists only in the initial namespace.
      assert.throws(() => daemon.send(reply), ErrnoError);
    } finally {
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket.recv() reports a datagram longer than the buffer as truncated", async () => {
  await withNetns((netns) => {
    const [kernel, daemon] = netns.enter(() => [
      new NetlinkSocket({ role: "kernel" }),
      new NetlinkSocket({ role: "daemon" }),
    ]);
    try {
      const request = connectorFrame(5, new Uint8Array(300).fill(0xab));
      kernel.send(request, { group: CN_IDX_DM });
      const small = new Uint8Array(100);
      const got = daemon.recv(small);
      assert.ok(got !== null);
      assert.equal(got.truncated, true);
      assert.equal(got.length, small.length);
      assert.deepEqual(small, request.subarray(0, 100));
      assert.equal(daemon.stats.truncated, 1);
    } finally {
      kernel.close();
      daemon.close();
    }
  });
});

Deno.test("NetlinkSocket.close() is idempotent and later use fails with EBADF", async () => {
  await withNetns((netns) => {
    const daemon = netns.enter(() => new NetlinkSocket({ role: "daemon" }));
    assert.ok(daemon.fd >= 0);
    daemon.close();
    daemon.close();
    assert.equal(daemon.fd, -1);
    assert.throws(() => daemon.recv(buf), /recvfrom failed: EBADF \(9\)/);
  });
});

Deno.test("NetlinkSocket reaches a daemon in another process of the namespace (bench echo)", async () => {
  await withNetns(async (netns) => {
    const echo = netns.spawn([Deno.execPath(), "run", "--allow-all", ECHO_SCRIPT]);
    const stdout = echo.stdout.pipeThrough(new TextDecoderStream()).getReader();
    const ready = /^ready port=(\d+)$/.exec(((await stdout.read()).value ?? "").trim());
    assert.ok(ready, "echo prints its port id");
    const kernel = netns.enter(() => new NetlinkSocket({ role: "kernel" }));
    try {
      const received = new Uint8Array(buf.length);
      for (let seq = 1; seq <= 3; seq++) {
        const request = connectorFrame(seq, new TextEncoder().encode(`request ${seq}`));
        assert.equal(kernel.send(request, { group: CN_IDX_DM }), true);
        const got = await recvWithin(kernel, received, 5000);
        assert.equal(got.portId, Number(ready[1]), "the reply comes from the echo's port");
        assert.deepEqual(received.subarray(0, got.length), request);
      }
      echo.kill("SIGTERM");
      assert.equal((await echo.status).code, 0);
      const counters = JSON.parse(((await stdout.read()).value ?? "").trim());
      assert.equal(counters.socket.received, 3);
      assert.equal(counters.socket.sent, 3);
    } finally {
      kernel.close();
    }
  });
});

Deno.test("withNetns() deletes the namespace and kills its children when the test fails", async () => {
  let name = "";
  let child: Deno.ChildProcess | undefined;
  await assert.rejects(
    withNetns((netns: NetworkNamespace) => {
      name = netns.name;
      child = netns.spawn(["sleep", "60"]);
      throw new Error("Test body failed");
    }),
    /Test body failed/,
  );
  assert.ok(child !== undefined);
  assert.equal((await child.status).signal, "SIGKILL");
  const list = await new Deno.Command("ip", { args: ["netns", "list"] }).output();
  assert.doesNotMatch(new TextDecoder().decode(list.stdout), new RegExp(`^${name}\\b`, "m"));
  assert.ok(name.startsWith("clogd-test-"));
});

const ECHO_SCRIPT = new URL("../scripts/bench/echo.ts", import.meta.url).pathname;

/** Polls a nonblocking socket until a datagram arrives (the test has no event loop). */
async function recvWithin(socket: NetlinkSocket, into: Uint8Array, ms: number) {
  const deadline = performance.now() + ms;
  while (performance.now() < deadline) {
    const got = socket.recv(into);
    if (got !== null) return { ...got };
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  throw new Error(`Nothing received within ${ms} ms`);
}

Deno.test("libc() names the library that failed to load and keeps the cause", async () => {
  const code = `
    import { libc } from ${JSON.stringify(import.meta.resolve("../ffi/libc.ts"))};
    try {
      libc();
    } catch (error) {
      console.log(JSON.stringify({ message: error.message, cause: String(error.cause) }));
    }`;
  const { stdout } = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", code],
    env: { CLOGD_LIBC: "/nonexistent/libc-missing.so" },
  }).output();
  const { message, cause } = JSON.parse(new TextDecoder().decode(stdout));
  assert.equal(
    message,
    'Failed to load the C library from "/nonexistent/libc-missing.so" (set CLOGD_LIBC to override)',
  );
  assert.match(cause, /libc-missing\.so/);
});

Deno.test("NetworkNamespace.enter() runs inside the namespace and returns the thread home", async () => {
  const home = Deno.readLinkSync("/proc/thread-self/ns/net");
  await withNetns((netns) => {
    const inside = netns.enter(() => Deno.readLinkSync("/proc/thread-self/ns/net"));
    assert.notEqual(inside, home);
    assert.throws(() => netns.enter(() => Promise.resolve()), TypeError);
    assert.throws(() =>
      netns.enter(() => {
        throw new Error("Inside failed");
      }), /Inside failed/);
  });
  assert.equal(Deno.readLinkSync("/proc/thread-self/ns/net"), home);
});
