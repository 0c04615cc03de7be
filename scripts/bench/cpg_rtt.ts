/**
 * The bare CPG round trip through {@link CpgTransport}: one message out, its own delivery back,
 * one in flight, timed from `mcast()` to the `deliver` handler (the next message is sent from
 * inside that handler, as the cluster core does). This is the floor under a clustered FLUSH's
 * latency: compare FLUSH p50/p99 to it.
 *
 *     deno run -A --v8-flags=--stack-size=2048 scripts/bench/cpg_rtt.ts [--count N] [--size B]
 *       [--here] [--group G] [--dispatch]
 *
 * By default it starts a private single-node corosync in its own network namespace (root) and
 * removes it afterwards; `--here` uses the corosync of the current namespace instead (e.g. a
 * node of a benchmark cluster). `--dispatch` also measures what one CPG callback costs when a
 * backlog is drained with one `CS_DISPATCH_ALL` call against one `CS_DISPATCH_ONE_NONBLOCKING`
 * call per callback (the transport's choice). Prints one JSON line.
 *
 * {@link cpgRoundTrip} is exported for benchmarks that measure it in the same run.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  type CpgCallbacks,
  CpgHandle,
  CS_DISPATCH_ALL,
  CS_DISPATCH_ONE_NONBLOCKING,
  CS_ERR_TRY_AGAIN,
  CS_OK,
} from "../../ffi/cpg.ts";
import { CpgTransport } from "../../src/bus/cpg.ts";
import { Logger } from "../../src/logger.ts";
import { EventLoop } from "../../src/loop.ts";
import { Corosync, dispatchUntil, joinWithRetry } from "../../tests/support/corosync.ts";
import { summarize } from "../../tests/support/cpg_child.ts";

/** Group of the measurement: not the daemon's, so a running clogd sees none of it. */
export const RTT_GROUP = "clogd-rtt";
/** Round trips before measuring (JIT, corosync's buffers). */
export const RTT_WARMUP = 500;
/** Longest a whole measurement may take, in ms. */
export const RTT_TIMEOUT_MS = 120_000;
/** Messages queued for the dispatch comparison: below what corosync takes without TRY_AGAIN. */
const DISPATCH_BACKLOG = 2000;
/** Rounds of the dispatch comparison (alternating the two modes). */
const DISPATCH_ROUNDS = 5;

/** Options of {@link cpgRoundTrip}. */
export interface RoundTripOptions {
  /** The loop the transport runs on (it must be running). */
  loop: EventLoop;
  /** Measured round trips (after {@link RTT_WARMUP}). */
  count: number;
  /** Message size in bytes (at least 8). */
  size: number;
  /** Default {@link RTT_GROUP}. */
  group?: string;
  /** Opens the CPG handle (default: in this namespace). */
  open?: (callbacks: CpgCallbacks) => CpgHandle;
}

/** Round-trip percentiles in microseconds. */
export interface RoundTripResult {
  count: number;
  p50Us: number;
  p99Us: number;
  meanUs: number;
  maxUs: number;
}

/**
 * Measures `count` round trips at one in flight through a new {@link CpgTransport}.
 *
 * @throws CpgError if corosync does not answer; Error on timeout
 */
export function cpgRoundTrip(options: RoundTripOptions): Promise<RoundTripResult> {
  if (options.size < 8) throw new RangeError("Round-trip messages need at least 8 bytes");
  const transport = CpgTransport.connect({
    loop: options.loop,
    group: options.group ?? RTT_GROUP,
    logger: new Logger("warn", "cpg_rtt"),
    open: options.open,
  });
  const total = RTT_WARMUP + options.count;
  const message = new Uint8Array(options.size);
  const view = new DataView(message.buffer);
  // Other nodes may run this too in the same group: ours carry our pid.
  view.setUint32(0, Deno.pid, true);
  const samples: number[] = [];
  let seq = 0;
  let sentAt = 0;
  const send = () => {
    view.setUint32(4, seq, true);
    sentAt = performance.now();
    transport.mcast(message);
  };
  return new Promise<RoundTripResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      transport.close();
      reject(new Error(`Round trips did not finish in ${RTT_TIMEOUT_MS} ms: ${seq}/${total}`));
    }, RTT_TIMEOUT_MS);
    const finish = (error?: Error) => {
      clearTimeout(timer);
      transport.close();
      if (error) reject(error);
      else resolve(summarize(samples));
    };
    transport.start({
      deliver(from, bytes) {
        if (from !== transport.nodeId || bytes.byteLength !== options.size) return;
        const got = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        if (got.getUint32(0, true) !== Deno.pid || got.getUint32(4, true) !== seq) return;
        const us = (performance.now() - sentAt) * 1000;
        if (seq >= RTT_WARMUP) samples.push(us);
        if (++seq === total) finish();
        else send();
      },
      confchg(change) {
        if (change.joined.includes(transport.nodeId)) send();
      },
      disconnected(reason) {
        finish(new Error(`Lost corosync during the round trips: ${reason}`));
      },
    });
  });
}

/** Per-callback cost of draining a backlog, in microseconds, by dispatch mode. */
export interface DispatchCost {
  backlog: number;
  allUsPerCallback: number;
  oneNonblockingUsPerCallback: number;
}

/**
 * Queues {@link DISPATCH_BACKLOG} own messages without dispatching, then drains them with one
 * CS_DISPATCH_ALL call, or with CS_DISPATCH_ONE_NONBLOCKING calls until CS_ERR_TRY_AGAIN;
 * best of {@link DISPATCH_ROUNDS} rounds each.
 */
export async function dispatchCost(
  open: (callbacks: CpgCallbacks) => CpgHandle,
): Promise<DispatchCost> {
  let delivered = 0;
  let joined = false;
  const handle = open({
    onDeliver: () => delivered++,
    onConfchg: () => joined = true,
  });
  try {
    await joinWithRetry(handle, `${RTT_GROUP}-dispatch`);
    await dispatchUntil(handle, () => joined, { timeoutMs: RTT_TIMEOUT_MS, what: "join" });
    const message = new Uint8Array(64);
    const best = { all: Infinity, one: Infinity };
    for (let round = 0; round < 2 * DISPATCH_ROUNDS; round++) {
      const mode = round % 2 === 0 ? "all" : "one";
      const start = delivered;
      for (let i = 0; i < DISPATCH_BACKLOG; i++) {
        const result = handle.mcast(message);
        if (result !== CS_OK) throw new Error(`cpg_mcast_joined returned ${result}`);
      }
      // Let corosync deliver the whole backlog into our event ring.
      await new Promise((resolve) => setTimeout(resolve, 300));
      const began = performance.now();
      if (mode === "all") {
        handle.dispatch(CS_DISPATCH_ALL);
      } else {
        while (handle.dispatch(CS_DISPATCH_ONE_NONBLOCKING) !== CS_ERR_TRY_AGAIN) {
          // One callback per call.
        }
      }
      const us = (performance.now() - began) * 1000;
      const drained = delivered - start;
      if (drained !== DISPATCH_BACKLOG) {
        // Part of it was not in the ring yet: finish it off, skip the round.
        await dispatchUntil(handle, () => delivered - start >= DISPATCH_BACKLOG, {
          timeoutMs: RTT_TIMEOUT_MS,
          what: "the backlog",
        });
        continue;
      }
      best[mode] = Math.min(best[mode], us / drained);
    }
    const round = (x: number) => Math.round(x * 100) / 100;
    return {
      backlog: DISPATCH_BACKLOG,
      allUsPerCallback: round(best.all),
      oneNonblockingUsPerCallback: round(best.one),
    };
  } finally {
    handle.finalize();
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      count: { type: "string", default: "5000" },
      size: { type: "string", default: "64" },
      group: { type: "string", default: RTT_GROUP },
      here: { type: "boolean", default: false },
      dispatch: { type: "boolean", default: false },
    },
  });
  const corosync = values.here ? undefined : await Corosync.start();
  const open = corosync === undefined
    ? (callbacks: CpgCallbacks) => CpgHandle.open(callbacks)
    : (callbacks: CpgCallbacks) => corosync.openCpg(callbacks);
  const loop = new EventLoop({ timeoutMs: 100 });
  const running = loop.run();
  try {
    const rtt = await cpgRoundTrip({
      loop,
      count: Number(values.count),
      size: Number(values.size),
      group: values.group,
      open,
    });
    const dispatch = values.dispatch ? await dispatchCost(open) : undefined;
    console.log(JSON.stringify({
      corosync: corosync === undefined ? "this namespace" : "private, 1 node",
      size: Number(values.size),
      inflight: 1,
      rtt,
      dispatch,
    }));
  } finally {
    loop.stop();
    await running;
    loop.close();
    await corosync?.stop();
  }
}
