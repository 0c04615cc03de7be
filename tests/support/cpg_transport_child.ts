/**
 * A {@link CpgTransport} user for tests, run as a child process on another corosync node (see
 * tests/cpg_transport_test.ts): `Corosync.spawnDeno(this file, [scenario, ...])`. It prints one
 * JSON object per line on stdout; an `{"event":"error"}` line and exit status 1 on failure.
 *
 * Scenarios (first argument):
 * - `stream --group G --count N --peers P`: joins G, waits until P nodes are members, multicasts
 *   N {@link payload} messages in one burst, waits until it delivered N from each of those
 *   nodes, prints `done` with the delivery order and a digest, then leaves cleanly.
 * - `member --group G`: joins G, prints `joined`, every `confchg` and `disconnected`, and leaves
 *   cleanly (then exits 0) when the message `leave:<its node id>` is delivered.
 *
 * The exported pieces ({@link payload}, {@link checkPayload}, {@link TransportRecorder},
 * {@link waitUntil}) are used in-process by the test too, so both sides check the same way.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { parseArgs } from "node:util";
import { CpgTransport } from "../../src/bus/cpg.ts";
import type { TransportHandlers } from "../../src/bus/transport.ts";
import type { Confchg } from "../../src/cluster/core.ts";
import { Logger } from "../../src/logger.ts";
import { EventLoop } from "../../src/loop.ts";
import { emit, required, runScenarios } from "./child_main.ts";

/** Header of a test payload: sender node id (u32) and index (u32), little-endian. */
export const PAYLOAD_HEADER_BYTES = 8;
/** Default largest test payload. */
export const PAYLOAD_MAX_BYTES = 2048;
/** Largest test payload any caller asks for. */
const PAYLOAD_LIMIT_BYTES = 1024 * 1024;

// Byte i of a payload is (sender * 31 + index * 17 + i) & 0xff: a window of this ramp.
const RAMP = Uint8Array.from({ length: PAYLOAD_LIMIT_BYTES + 256 }, (_, i) => i & 0xff);

/**
 * The `index`-th test message of node `sender`: header, then bytes that follow from (sender,
 * index), 8..`maxBytes` bytes in all.
 */
export function payload(sender: number, index: number, maxBytes = PAYLOAD_MAX_BYTES): Uint8Array {
  if (maxBytes < 16 || maxBytes > PAYLOAD_LIMIT_BYTES) throw new RangeError(`Bad size ${maxBytes}`);
  const size = PAYLOAD_HEADER_BYTES + ((index * 7919 + sender * 104_729) % (maxBytes - 7));
  const bytes = new Uint8Array(size);
  const shift = (sender * 31 + index * 17) & 0xff;
  bytes.set(RAMP.subarray(shift, shift + size));
  const view = new DataView(bytes.buffer);
  view.setUint32(0, sender, true);
  view.setUint32(4, index, true);
  return bytes;
}

/**
 * Sender and index of a test payload, or undefined if its bytes are not {@link payload}'s (the
 * size is not checked: it depends on the `maxBytes` the sender used).
 */
export function checkPayload(bytes: Uint8Array): { sender: number; index: number } | undefined {
  if (bytes.byteLength < PAYLOAD_HEADER_BYTES) return undefined;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sender = view.getUint32(0, true);
  const index = view.getUint32(4, true);
  const shift = (sender * 31 + index * 17) & 0xff;
  for (let i = PAYLOAD_HEADER_BYTES; i < bytes.byteLength; i++) {
    if (bytes[i] !== ((shift + i) & 0xff)) return undefined;
  }
  return { sender, index };
}

/** Handlers that record everything a transport reports. */
export class TransportRecorder implements TransportHandlers {
  /** Every delivery: sender node and a copy of the bytes. */
  readonly deliveries: { from: number; bytes: Uint8Array }[] = [];
  /** Every membership change. */
  readonly confchgs: Confchg[] = [];
  /** For each membership change, how many deliveries came before it. */
  readonly confchgAt: number[] = [];
  /** Every disconnection reason. */
  readonly disconnects: string[] = [];
  /** Called after each event is recorded. */
  onEvent: ((kind: "deliver" | "confchg" | "disconnected") => void) | undefined;

  /** Records a delivery (copied: the transport may reuse `bytes`). */
  deliver(from: number, bytes: Uint8Array): void {
    this.deliveries.push({ from, bytes: bytes.slice() });
    this.onEvent?.("deliver");
  }

  /** Records a membership change. */
  confchg(change: Confchg): void {
    this.confchgs.push(change);
    this.confchgAt.push(this.deliveries.length);
    this.onEvent?.("confchg");
  }

  /** Records a lost connection. */
  disconnected(reason: string): void {
    this.disconnects.push(reason);
    this.onEvent?.("disconnected");
  }

  /** Members after the latest change (empty before the first). */
  get members(): readonly number[] {
    return this.confchgs.at(-1)?.members ?? [];
  }

  /** Deliveries from `sender` among those from index `start` on. */
  countFrom(sender: number, start = 0): number {
    let n = 0;
    for (let i = start; i < this.deliveries.length; i++) {
      if (this.deliveries[i].from === sender) n++;
    }
    return n;
  }

  /** `"sender:index"` of each delivery from `start` on ("?" for one that is not a test payload). */
  order(start = 0): string[] {
    return this.deliveries.slice(start).map(({ from, bytes }) => {
      const p = checkPayload(bytes);
      return p === undefined || p.sender !== from ? "?" : `${p.sender}:${p.index}`;
    });
  }

  /** SHA-256 over (from, length, bytes) of each delivery from `start` on, as hex. */
  digest(start = 0): string {
    const hash = createHash("sha256");
    const header = new Uint8Array(8);
    const view = new DataView(header.buffer);
    for (const { from, bytes } of this.deliveries.slice(start)) {
      view.setUint32(0, from, true);
      view.setUint32(4, bytes.byteLength, true);
      hash.update(header);
      hash.update(bytes);
    }
    return hash.digest("hex");
  }
}

/** Longest single sleep of {@link waitUntil}, in ms. */
const WAIT_POLL_MS = 5;

/**
 * Resolves once `done()` holds, checking every few ms (the event loop runs meanwhile).
 *
 * @throws Error naming `what` after `timeoutMs`
 */
export async function waitUntil(
  done: () => boolean,
  options: { timeoutMs: number; what: string },
): Promise<void> {
  const deadline = Date.now() + options.timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${options.timeoutMs} ms waiting for ${options.what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, WAIT_POLL_MS));
  }
}

// ---- The child's main ----

/** Longest any phase of a scenario waits, in ms. */
const PHASE_TIMEOUT_MS = 30_000;

async function withTransport(
  group: string,
  fn: (transport: CpgTransport, recorder: TransportRecorder) => Promise<void>,
): Promise<void> {
  const loop = new EventLoop({ timeoutMs: 100 });
  const running = loop.run();
  const transport = CpgTransport.connect({
    loop,
    group,
    logger: new Logger(Deno.env.get("CLOGD_TEST_LOG") === "1" ? "debug" : "warn", "child"),
  });
  const recorder = new TransportRecorder();
  try {
    transport.start(recorder);
    await waitUntil(() => recorder.confchgs.some((c) => c.joined.includes(transport.nodeId)), {
      timeoutMs: PHASE_TIMEOUT_MS,
      what: "our own join",
    });
    emit({ event: "joined", nodeid: transport.nodeId, pid: Deno.pid });
    await fn(transport, recorder);
  } finally {
    transport.close();
    loop.stop();
    await running;
    loop.close();
  }
}

async function stream(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      group: { type: "string" },
      count: { type: "string" },
      peers: { type: "string", default: "1" },
    },
  });
  const count = Number(required(values.count, "--count"));
  const peers = Number(values.peers);
  await withTransport(required(values.group, "--group"), async (transport, recorder) => {
    await waitUntil(() => recorder.members.length >= peers, {
      timeoutMs: PHASE_TIMEOUT_MS,
      what: `${peers} members`,
    });
    const senders = [...recorder.members];
    const start = recorder.deliveries.length;
    emit({ event: "ready", members: senders, start });
    for (let i = 0; i < count; i++) transport.mcast(payload(transport.nodeId, i));
    await waitUntil(() => senders.every((n) => recorder.countFrom(n, start) >= count), {
      timeoutMs: PHASE_TIMEOUT_MS,
      what: `${count} messages from each of ${senders}`,
    });
    emit({
      event: "done",
      nodeid: transport.nodeId,
      order: recorder.order(start),
      digest: recorder.digest(start),
      stats: transport.stats(),
    });
  });
}

async function member(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { group: { type: "string" } } });
  const group = required(values.group, "--group");
  let leave = false;
  await withTransport(group, async (transport, recorder) => {
    const bye = `leave:${transport.nodeId}`;
    const decoder = new TextDecoder();
    // Events recorded before this runs (the join, perhaps a disconnection right after it) are
    // reported by the first call: report() catches up, it does not only echo the latest.
    let confchgsSeen = 0;
    let disconnectsSeen = 0;
    const report = () => {
      for (; confchgsSeen < recorder.confchgs.length; confchgsSeen++) {
        emit({ event: "confchg", ...recorder.confchgs[confchgsSeen] });
      }
      for (; disconnectsSeen < recorder.disconnects.length; disconnectsSeen++) {
        emit({ event: "disconnected", reason: recorder.disconnects[disconnectsSeen] });
      }
    };
    recorder.onEvent = (kind) => {
      report();
      if (kind === "deliver" && decoder.decode(recorder.deliveries.at(-1)!.bytes) === bye) {
        leave = true;
      }
    };
    report();
    // Runs until told to leave (or killed: the crash case).
    await waitUntil(() => leave, { timeoutMs: 10 * PHASE_TIMEOUT_MS, what: bye });
  });
  emit({ event: "left" });
}

if (import.meta.main) await runScenarios({ stream, member });
