/**
 * A bare echo responder over the daemon's own NetlinkSocket and EventLoop: every datagram
 * received on the device-mapper group goes back unchanged to its sender's port id. It is the
 * floor clogd is compared against in benchmarks (same FFI, same loop, no decoding or state).
 *
 * Run it inside a network namespace, next to a kernel simulator in the same namespace:
 *   ip netns exec NAME deno run --allow-all scripts/bench/echo.ts
 * It prints `ready port=<port id>` once it listens, and its counters as JSON on SIGTERM/SIGINT
 * (then exits 0) or on SIGUSR2.
 *
 * @module
 */

import { NetlinkSocket } from "../../src/kernel/netlink.ts";
import { CONNECTOR_MAX_MSG_SIZE, FRAME_OVERHEAD } from "../../src/kernel/protocol.ts";
import { EventLoop } from "../../src/loop.ts";

/** Delay before retrying a reply the receiver had no room for, in milliseconds. */
const RETRY_DELAY_MS = 1;

const socket = new NetlinkSocket({ role: "daemon" });
const loop = new EventLoop();
const buf = new Uint8Array(CONNECTOR_MAX_MSG_SIZE + FRAME_OVERHEAD);
// The one reply the receiver could not take; reading pauses until it is sent.
let pending: { bytes: Uint8Array; portId: number } | null = null;
let retries = 0;

function drain(): void {
  for (let got = socket.recv(buf); got !== null; got = socket.recv(buf)) {
    const reply = buf.subarray(0, got.length);
    if (!socket.send(reply, { portId: got.portId })) {
      pending = { bytes: reply.slice(), portId: got.portId };
      loop.unwatch(socket.fd);
      setTimeout(retry, RETRY_DELAY_MS);
      return;
    }
  }
}

function retry(): void {
  if (pending === null) return;
  retries++;
  if (!socket.send(pending.bytes, { portId: pending.portId })) {
    setTimeout(retry, RETRY_DELAY_MS);
    return;
  }
  pending = null;
  loop.watch(socket.fd, drain);
}

function counters(): string {
  return JSON.stringify({ socket: socket.stats, loop: loop.stats, retries });
}

loop.watch(socket.fd, drain);
loop.installSignals({
  onTerminate: () => loop.stop(),
  onDump: () => console.log(counters()),
});
console.log(`ready port=${socket.portId}`);
await loop.run();
console.log(counters());
loop.close();
socket.close();
