/**
 * The cluster harness's membership observer (tests/support/cluster.ts): one per node, run as a
 * child process in the node's network namespace, so it talks to that node's corosync.
 *
 *     deno run --allow-all --v8-flags=--stack-size=2048 cluster_monitor.ts GROUP
 *
 * It joins the CPG group GROUP (never clogd's group: a foreign member there would change clogd's
 * membership) and prints one JSON object per line on stdout, each with `t`, the wall clock in ms
 * (`Date.now()`: every process on the machine shares that clock, so the harness can subtract
 * the time it injected a fault):
 * - `{"event":"connected","t","nodeid"}` once a handle to corosync is open;
 * - `{"event":"totem","t","members":[nodeids],"ring":[nodeid,seq]}` for every totem (node)
 *   membership: this is corosync's failure detection as seen from this node;
 * - `{"event":"confchg","t","members":[{nodeid,pid}],"left":[...],"joined":[...]}` for GROUP;
 * - `{"event":"disconnected","t","code"}` when corosync goes away (e.g. it was killed).
 *
 * It outlives its corosync: after a disconnect it opens a new handle every
 * {@link RECONNECT_INTERVAL_MS} until corosync answers again, so a restarted corosync is
 * observed without restarting the monitor. SIGTERM ends it.
 *
 * @module
 */

import { CpgHandle, CS_OK } from "../../ffi/cpg.ts";
import { joinWithRetry, waitReadable } from "./corosync.ts";

/** Pause between two attempts to reach a corosync that is down or starting, in ms. */
export const RECONNECT_INTERVAL_MS = 50;
/** Longest single wait for the CPG fd; bounds how late a stop request is noticed, in ms. */
const POLL_MS = 500;

function emit(line: Record<string, unknown>): void {
  console.log(JSON.stringify({ ...line, t: Date.now() }));
}

async function monitor(group: string): Promise<void> {
  let stopping = false;
  Deno.addSignalListener("SIGTERM", () => stopping = true);
  while (!stopping) {
    let handle: CpgHandle;
    try {
      handle = CpgHandle.open({
        onDeliver: () => {},
        onConfchg: (_group, members, left, joined) => {
          emit({ event: "confchg", members, left, joined });
        },
        onTotemConfchg: (ringId, members) => {
          emit({ event: "totem", members, ring: [ringId.nodeid, Number(ringId.seq)] });
        },
        onError: (error) => emit({ event: "error", message: String(error) }),
      });
    } catch {
      // CS_ERR_LIBRARY: corosync is down or not ready yet.
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_INTERVAL_MS));
      continue;
    }
    try {
      emit({ event: "connected", nodeid: handle.localNodeId() });
      await joinWithRetry(handle, group);
      while (!stopping) {
        const result = handle.dispatch();
        if (result !== CS_OK) {
          emit({ event: "disconnected", code: result });
          break;
        }
        await waitReadable(handle, POLL_MS);
      }
    } catch (error) {
      emit({ event: "disconnected", message: String(error) });
    } finally {
      handle.finalize();
    }
  }
}

if (import.meta.main) {
  const group = Deno.args[0];
  if (group === undefined) {
    console.error("Usage: cluster_monitor.ts GROUP");
    Deno.exit(2);
  }
  await monitor(group);
  Deno.exit(0);
}
