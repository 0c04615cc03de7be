/**
 * A CPG client for tests, run as a child process inside a corosync's network namespace (see
 * tests/support/corosync.ts, `Corosync.spawnDeno`). It prints one JSON object per line on
 * stdout; an `{"event":"error"}` line and exit status 1 on failure.
 *
 * Scenarios (first argument):
 * - `stream --group G --count N --peers P [--gc]`: joins G, waits until P processes are in it,
 *   multicasts N test messages ({@link testMessage}) and dispatches until it has delivered
 *   N from every one of the P senders. Prints `joined`, every `confchg`, `ready`, then `done`
 *   with the delivery order, a digest of every delivered byte, and the count of messages whose
 *   bytes differed from what the sender must have sent. `--gc` calls `gc()` (needs
 *   `--v8-flags=--expose-gc`) after every multicast and every dispatch: the callbacks libcpg
 *   holds must survive collections and still fire.
 * - `rtt --group G --count N --size B`: one message in flight, send to own delivery, measured
 *   twice: waiting with a nonblocking FFI poll then `CS_DISPATCH_ALL` (as the daemon's loop
 *   will), and with a blocking `CS_DISPATCH_ONE` (the floor). Prints `rtt` with percentiles.
 *
 * The exported pieces ({@link testMessage}, {@link StreamRecorder}, {@link sendMessages}) are
 * also used in-process by tests/cpg_ffi_test.ts, so both sides check messages the same way.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { parseArgs } from "node:util";
import {
  type CpgAddress,
  type CpgCallbacks,
  CpgError,
  CpgHandle,
  type CpgRingId,
  CS_DISPATCH_ONE,
  CS_ERR_TRY_AGAIN,
  CS_OK,
} from "../../ffi/cpg.ts";
import { Prng } from "../../src/sim/prng.ts";
import { dispatchUntil, joinWithRetry, waitReadable } from "./corosync.ts";
import { emit, required, runScenarios } from "./child_main.ts";

/** Largest test message: 64 KiB, far above an MTU, so corosync fragments it on the wire. */
export const TEST_MESSAGE_MAX_BYTES = 64 * 1024;
/** Most CS_ERR_TRY_AGAIN answers {@link sendMessages} waits out for one message. */
export const MAX_TRY_AGAIN_PER_MESSAGE = 1000;
/** Longest wait for the fd while backing off from CS_ERR_TRY_AGAIN, in ms. */
const TRY_AGAIN_WAIT_MS = 10;

/**
 * The `index`-th message a process with pid `sender` sends: its size and bytes follow from
 * (sender, index) alone, so a receiver can check every byte without a header (0-byte messages
 * have no room for one; CPG delivers each sender's messages in the order sent). Sizes mix 0,
 * 1..64 (small arrays live on the V8 heap, where a GC may move them), up to 4 KiB, and 64 KiB.
 */
export function testMessage(sender: number, index: number): Uint8Array {
  const prng = new Prng(Math.imul(sender, 0x9e3779b1) ^ index);
  const roll = prng.float();
  let size: number;
  if (index === 0) size = 0;
  else if (index === 1) size = TEST_MESSAGE_MAX_BYTES;
  else if (roll < 0.05) size = 0;
  else if (roll < 0.1) size = TEST_MESSAGE_MAX_BYTES;
  else if (roll < 0.4) size = 1 + prng.int(64);
  else size = prng.int(4097);
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += 4) {
    const word = prng.u32();
    for (let b = 0; b < 4 && i + b < size; b++) bytes[i + b] = (word >>> (8 * b)) & 0xff;
  }
  return bytes;
}

/** One confchg, as {@link StreamRecorder} keeps it. */
export interface RecordedConfchg {
  group: string;
  members: CpgAddress[];
  left: CpgAddress[];
  joined: CpgAddress[];
}

/**
 * Callbacks that record every delivery: order, senders and the bytes themselves. The bytes are
 * checked later ({@link mismatches}, {@link digest}), after the dispatch returned and libcpg
 * reused its buffer: a delivery that was not copied out of C memory shows up as a mismatch.
 */
export class StreamRecorder implements CpgCallbacks {
  /** Sender pid of every delivery, in delivery order. */
  readonly order: number[] = [];
  /** Sender node id of every delivery. */
  readonly nodeids: number[] = [];
  /** The delivered bytes, in delivery order. */
  readonly messages: Uint8Array[] = [];
  /** Deliveries per sender pid. */
  readonly perSender = new Map<number, number>();
  /** Every confchg. */
  readonly confchgs: RecordedConfchg[] = [];
  /** Every totem confchg. */
  readonly totemConfchgs: { ringId: CpgRingId; members: number[] }[] = [];
  /** Deliveries for a group other than the one expected. */
  wrongGroup = 0;
  /** Called after each confchg is recorded. */
  onConfchgRecorded: ((confchg: RecordedConfchg) => void) | undefined;
  readonly #group: string;

  /** Records deliveries for `group`. */
  constructor(group: string) {
    this.#group = group;
  }

  /** Records the delivery. */
  onDeliver(nodeid: number, pid: number, groupName: string, data: Uint8Array): void {
    this.perSender.set(pid, (this.perSender.get(pid) ?? 0) + 1);
    this.order.push(pid);
    this.nodeids.push(nodeid);
    this.messages.push(data);
    if (groupName !== this.#group) this.wrongGroup++;
  }

  /** Records the change. */
  onConfchg(group: string, members: CpgAddress[], left: CpgAddress[], joined: CpgAddress[]) {
    const confchg = { group, members, left, joined };
    this.confchgs.push(confchg);
    this.onConfchgRecorded?.(confchg);
  }

  /** Records the totem membership. */
  onTotemConfchg(ringId: CpgRingId, members: number[]): void {
    this.totemConfchgs.push({ ringId, members });
  }

  /** Total deliveries so far. */
  get delivered(): number {
    return this.order.length;
  }

  /** The members after the latest confchg (empty before the first). */
  get members(): CpgAddress[] {
    return this.confchgs.at(-1)?.members ?? [];
  }

  /**
   * Deliveries whose bytes differ from what their sender sent ({@link testMessage} of the
   * sender's pid and the delivery's rank among that sender's deliveries).
   */
  mismatches(): number {
    const seen = new Map<number, number>();
    let bad = 0;
    for (let i = 0; i < this.order.length; i++) {
      const pid = this.order[i];
      const index = seen.get(pid) ?? 0;
      seen.set(pid, index + 1);
      if (!equalBytes(this.messages[i], testMessage(pid, index))) bad++;
    }
    return bad;
  }

  /** SHA-256 over (nodeid, pid, length, bytes) of every delivery in order, as hex. */
  digest(): string {
    const hash = createHash("sha256");
    const header = new Uint8Array(12);
    const view = new DataView(header.buffer);
    for (let i = 0; i < this.order.length; i++) {
      view.setUint32(0, this.nodeids[i], true);
      view.setUint32(4, this.order[i], true);
      view.setUint32(8, this.messages[i].byteLength, true);
      hash.update(header);
      hash.update(this.messages[i]);
    }
    return hash.digest("hex");
  }
}

/** Options of {@link sendMessages}. */
export interface SendOptions {
  /** Sender pid for {@link testMessage}: this process's pid. */
  pid: number;
  /** How many messages. */
  count: number;
  /** Call `gc()` after every multicast and every dispatch. */
  gc?: () => void;
}

/**
 * Multicasts `count` test messages, dispatching after each one so deliveries never pile up, and
 * backing off on CS_ERR_TRY_AGAIN (wait for the fd, dispatch, retry). Returns how many times
 * corosync answered CS_ERR_TRY_AGAIN.
 *
 * @throws CpgError on any other failure
 */
export async function sendMessages(handle: CpgHandle, options: SendOptions): Promise<number> {
  let tryAgain = 0;
  for (let index = 0; index < options.count; index++) {
    const message = testMessage(options.pid, index);
    for (let attempt = 0;; attempt++) {
      const result = handle.mcast(message);
      options.gc?.();
      if (result === CS_OK) break;
      if (result !== CS_ERR_TRY_AGAIN || attempt >= MAX_TRY_AGAIN_PER_MESSAGE) {
        throw new CpgError("cpg_mcast_joined", result);
      }
      tryAgain++;
      await waitReadable(handle, TRY_AGAIN_WAIT_MS);
      checkDispatch(handle.dispatch());
      options.gc?.();
    }
    checkDispatch(handle.dispatch());
    options.gc?.();
  }
  return tryAgain;
}

function checkDispatch(result: number): void {
  if (result !== CS_OK) throw new CpgError("cpg_dispatch", result);
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false;
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** The p-th percentile (0..100) of sorted values. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

/** p50, p99, mean and max of microsecond samples, rounded to 0.1 us. */
export function summarize(samples: readonly number[]) {
  const sorted = [...samples].sort((a, b) => a - b);
  const round = (x: number) => Math.round(x * 10) / 10;
  return {
    count: sorted.length,
    p50Us: round(percentile(sorted, 50)),
    p99Us: round(percentile(sorted, 99)),
    meanUs: round(sorted.reduce((sum, x) => sum + x, 0) / Math.max(1, sorted.length)),
    maxUs: round(sorted.at(-1) ?? 0),
  };
}

// ---- The child's main ----

/** Longest any phase of a scenario waits, in ms. */
const PHASE_TIMEOUT_MS = 30_000;

/** Opens a handle with `recorder` as its only reference to the callbacks' owner. */
function openHandle(recorder: StreamRecorder): CpgHandle {
  // An object literal made here, referenced only by the handle: a GC test proves the handle
  // keeps what C calls alive, not some variable of ours.
  return CpgHandle.open({
    onDeliver: (nodeid, pid, group, data) => recorder.onDeliver(nodeid, pid, group, data),
    onConfchg: (group, members, left, joined) => recorder.onConfchg(group, members, left, joined),
  });
}

async function stream(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      group: { type: "string" },
      count: { type: "string" },
      peers: { type: "string", default: "1" },
      gc: { type: "boolean", default: false },
    },
  });
  const group = required(values.group, "--group");
  const count = Number(required(values.count, "--count"));
  const peers = Number(values.peers);
  let gc: (() => void) | undefined;
  let gcCalls = 0;
  if (values.gc) {
    const collect = (globalThis as { gc?: () => void }).gc;
    if (collect === undefined) throw new Error("--gc needs --v8-flags=--expose-gc");
    gc = () => {
      collect();
      gcCalls++;
    };
  }
  const recorder = new StreamRecorder(group);
  recorder.onConfchgRecorded = (confchg) => emit({ event: "confchg", ...confchg });
  const handle = openHandle(recorder);
  try {
    const nodeid = handle.localNodeId();
    await joinWithRetry(handle, group);
    await dispatchUntil(
      handle,
      () => recorder.members.some((m) => m.pid === Deno.pid),
      { timeoutMs: PHASE_TIMEOUT_MS, what: "our own join" },
    );
    emit({ event: "joined", nodeid, pid: Deno.pid });
    await dispatchUntil(handle, () => recorder.members.length >= peers, {
      timeoutMs: PHASE_TIMEOUT_MS,
      what: `${peers} members`,
    });
    const senders = recorder.members.map((m) => m.pid);
    emit({ event: "ready", members: recorder.members });
    gc?.();
    const tryAgain = await sendMessages(handle, { pid: Deno.pid, count, gc });
    await dispatchUntil(
      handle,
      () => senders.every((pid) => (recorder.perSender.get(pid) ?? 0) >= count),
      { timeoutMs: PHASE_TIMEOUT_MS, what: `${count} messages from each of ${senders}` },
    );
    emit({
      event: "done",
      nodeid,
      pid: Deno.pid,
      delivered: recorder.delivered,
      perSender: Object.fromEntries(recorder.perSender),
      mismatches: recorder.mismatches(),
      wrongGroup: recorder.wrongGroup,
      foreignNodeids: recorder.nodeids.filter((id) => id !== nodeid).length,
      order: recorder.order,
      digest: recorder.digest(),
      tryAgain,
      gcCalls,
    });
  } finally {
    handle.finalize();
  }
}

async function rtt(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      group: { type: "string" },
      count: { type: "string", default: "2000" },
      size: { type: "string", default: "64" },
    },
  });
  const group = required(values.group, "--group");
  const count = Number(values.count);
  const message = new Uint8Array(Number(values.size));
  let delivered = 0;
  let joined = false;
  const handle = CpgHandle.open({
    onDeliver: (_nodeid, pid) => {
      if (pid === Deno.pid) delivered++;
    },
    onConfchg: (_group, members) => {
      joined = members.some((m) => m.pid === Deno.pid);
    },
  });
  try {
    await joinWithRetry(handle, group);
    await dispatchUntil(handle, () => joined, { timeoutMs: PHASE_TIMEOUT_MS, what: "join" });
    const send = () => {
      const result = handle.mcast(message);
      if (result !== CS_OK) throw new CpgError("cpg_mcast_joined", result);
    };
    // Warm up both paths (JIT, corosync's buffers) before measuring.
    const warmup = Math.min(200, count);
    const measure = async (mode: "poll" | "block", n: number): Promise<number[]> => {
      const samples: number[] = [];
      for (let i = 0; i < n; i++) {
        const want = delivered + 1;
        const start = performance.now();
        send();
        if (mode === "poll") {
          await dispatchUntil(handle, () => delivered >= want, {
            timeoutMs: PHASE_TIMEOUT_MS,
            what: "own delivery",
          });
        } else {
          while (delivered < want) checkDispatch(handle.dispatch(CS_DISPATCH_ONE));
        }
        samples.push((performance.now() - start) * 1000);
      }
      return samples;
    };
    await measure("poll", warmup);
    const poll = summarize(await measure("poll", count));
    await measure("block", warmup);
    const block = summarize(await measure("block", count));
    emit({ event: "rtt", size: message.byteLength, poll, block });
  } finally {
    handle.finalize();
  }
}

if (import.meta.main) await runScenarios({ stream, rtt });
