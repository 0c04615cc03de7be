/**
 * The ordering probe of tests/quorum_test.ts: what a CPG client sees of a membership change,
 * and when corosync's quorum service has decided quorum for it. Run as a child process in a
 * node's network namespace (so it talks to that node's corosync):
 *
 *     deno run --allow-all --v8-flags=--stack-size=2048 quorum_probe.ts GROUP
 *
 * It joins CPG group GROUP and tracks quorum (model v1, CS_TRACK_CHANGES), waits on both fds,
 * and prints one JSON object per line, each with `t` (`Date.now()`) and `seq`, its position in
 * the order this process handled events:
 * - `{"event":"ready","nodeid","quorumType","quorate"}` once both handles are open and joined;
 * - `{"event":"confchg","members","left","joined","quorateAtCallback"}`: a CPG confchg of GROUP,
 *   with quorum_getquorate's answer asked from inside the confchg callback, synchronously (the
 *   question this probe answers: is it already decided for the membership the confchg reports?);
 * - `{"event":"totem","ring":[nodeid,seq],"members","quorateAtCallback"}`: CPG's totem confchg;
 * - `{"event":"quorum","ring":[nodeid,seq],"quorate","members"}`: a quorum notification.
 *
 * Both fds are polled in one `poll`, and the CPG fd is dispatched first when both are readable,
 * so a quorum notification printed after a confchg was not yet queued when that confchg was
 * read, or arrived in the same wake. SIGTERM ends it.
 *
 * @module
 */

import { CPG_REASON, CpgHandle, CS_DISPATCH_ALL, CS_OK } from "../../ffi/cpg.ts";
import { libc, POLLFD, POLLIN } from "../../ffi/libc.ts";
import { CS_TRACK_CHANGES, CS_TRACK_CURRENT, QuorumHandle } from "../../ffi/quorum.ts";
import { joinWithRetry } from "./corosync.ts";

/** Longest single wait on the fds; bounds how late SIGTERM is noticed, in ms. */
const POLL_MS = 200;

let seq = 0;
function emit(line: Record<string, unknown>): void {
  console.log(JSON.stringify({ ...line, t: Date.now(), seq: seq++ }));
}

async function probe(group: string): Promise<void> {
  let stopping = false;
  Deno.addSignalListener("SIGTERM", () => stopping = true);
  const quorum = QuorumHandle.open({
    onQuorum: (n) => {
      emit({
        event: "quorum",
        ring: [n.ringId.nodeid, Number(n.ringId.seq)],
        quorate: n.quorate,
        members: n.members,
      });
    },
    onError: (error) => emit({ event: "error", message: String(error) }),
  });
  const askQuorum = () => {
    try {
      return quorum.quorate();
    } catch (error) {
      return String(error);
    }
  };
  const cpg = CpgHandle.open({
    onDeliver: () => {},
    onConfchg: (_group, members, left, joined) => {
      emit({ event: "confchg", members, left, joined, quorateAtCallback: askQuorum() });
    },
    onTotemConfchg: (ringId, members) => {
      emit({
        event: "totem",
        ring: [ringId.nodeid, Number(ringId.seq)],
        members,
        quorateAtCallback: askQuorum(),
      });
    },
    onError: (error) => emit({ event: "error", message: String(error) }),
  });
  quorum.trackStart(CS_TRACK_CHANGES);
  await joinWithRetry(cpg, group);
  emit({
    event: "ready",
    nodeid: cpg.localNodeId(),
    quorumType: quorum.quorumType,
    quorate: quorum.quorate(),
  });
  const pollfds = new Uint8Array(new ArrayBuffer(2 * POLLFD.size));
  const view = new DataView(pollfds.buffer);
  for (const [i, fd] of [cpg.fd, quorum.fd].entries()) {
    view.setInt32(i * POLLFD.size + POLLFD.fd, fd, true);
    view.setInt16(i * POLLFD.size + POLLFD.events, POLLIN, true);
  }
  while (!stopping) {
    view.setInt16(POLLFD.revents, 0, true);
    view.setInt16(POLLFD.size + POLLFD.revents, 0, true);
    await libc().poll_nb(pollfds, 2n, POLL_MS);
    if (view.getInt16(POLLFD.revents, true) !== 0) {
      const result = cpg.dispatch(CS_DISPATCH_ALL);
      if (result !== CS_OK) {
        emit({ event: "disconnected", which: "cpg", code: result });
        break;
      }
    }
    if (view.getInt16(POLLFD.size + POLLFD.revents, true) !== 0) {
      const result = quorum.dispatch(CS_DISPATCH_ALL);
      if (result !== CS_OK) {
        emit({ event: "disconnected", which: "quorum", code: result });
        break;
      }
    }
  }
  cpg.finalize();
  quorum.finalize();
}

/** What probe lines say; see {@link orderFindings}. */
export interface OrderFindings {
  /** Confchgs with a NODEDOWN or NODEUP member (corosync's sync of a new ring). */
  ringChanges: number;
  /** Of those, ones no totem confchg followed. */
  withoutTotem: number;
  /** Quorum notifications for a ring that no totem confchg of that node named. */
  verdictsWithoutTotem: number;
  /** Ring changes whose ring got a verdict that quorum_getquorate, asked in the confchg, matched. */
  getquorateAgreed: number;
  /** Ring changes whose ring got a verdict that quorum_getquorate did not match (stale). */
  getquorateDisagreed: number;
  /** Ring changes whose ring never got a verdict (corosync moved on before deciding it). */
  ringsWithoutVerdict: number;
  /** Of those, ones of a minority ring while quorum_getquorate said quorate. */
  minorityReadAsQuorate: number;
  /** Of those, ones of a majority ring while quorum_getquorate said not quorate. */
  majorityReadAsInquorate: number;
}

/**
 * Sums up the probes' lines (one array per node, as corosync.ts's DenoChild collects them) of a
 * cluster of `nodes` nodes: whether every ring change is followed by the totem confchg naming
 * its ring, whether every verdict names a ring CPG announced, and how quorum_getquorate's answer
 * at a confchg compared with that ring's verdict.
 */
export function orderFindings(
  perNode: readonly (readonly Record<string, unknown>[])[],
  options: { nodes: number },
): OrderFindings {
  const findings: OrderFindings = {
    ringChanges: 0,
    withoutTotem: 0,
    verdictsWithoutTotem: 0,
    getquorateAgreed: 0,
    getquorateDisagreed: 0,
    ringsWithoutVerdict: 0,
    minorityReadAsQuorate: 0,
    majorityReadAsInquorate: 0,
  };
  for (const lines of perNode) {
    const totems = new Set(lines.filter((l) => l.event === "totem").map((l) => String(l.ring)));
    for (const [i, line] of lines.entries()) {
      if (line.event === "quorum" && !totems.has(String(line.ring))) {
        findings.verdictsWithoutTotem++;
      }
      if (line.event !== "confchg") continue;
      const addresses = [
        ...line.left as { reason: number }[],
        ...line.joined as { reason: number }[],
      ];
      if (
        !addresses.some((a) => a.reason === CPG_REASON.NODEDOWN || a.reason === CPG_REASON.NODEUP)
      ) {
        continue;
      }
      findings.ringChanges++;
      // Several confchgs of one sync (NODEDOWN, then NODEUP) may come before its totem confchg.
      const totem = lines.slice(i + 1).find((l) => l.event === "totem");
      if (totem === undefined) {
        findings.withoutTotem++;
        continue;
      }
      const verdict = lines.find((l) =>
        l.event === "quorum" && String(l.ring) === String(totem.ring)
      );
      if (verdict !== undefined) {
        if (verdict.quorate === line.quorateAtCallback) findings.getquorateAgreed++;
        else findings.getquorateDisagreed++;
        continue;
      }
      findings.ringsWithoutVerdict++;
      const majority = (totem.members as number[]).length * 2 > options.nodes;
      if (!majority && line.quorateAtCallback === true) findings.minorityReadAsQuorate++;
      if (majority && line.quorateAtCallback === false) findings.majorityReadAsInquorate++;
    }
  }
  return findings;
}

/** Notifications {@link gcCheck} asks for, with a garbage collection before each. */
export const GC_ROUNDS = 5;

/**
 * `quorum_probe.ts --gc-check` (run with `--v8-flags=--expose-gc,--stack-size=2048`): the quorum
 * callback is referenced only by its handle; a gc() before every native call must not break it.
 * Prints `{"event":"gc","notifications":N}`: N must be {@link GC_ROUNDS}.
 */
async function gcCheck(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc === undefined) throw new Error("Run with --v8-flags=--expose-gc");
  let notifications = 0;
  const handle = QuorumHandle.open({ onQuorum: () => notifications++ });
  const pollfd = new Uint8Array(new ArrayBuffer(POLLFD.size));
  const view = new DataView(pollfd.buffer);
  view.setInt32(POLLFD.fd, handle.fd, true);
  view.setInt16(POLLFD.events, POLLIN, true);
  for (let round = 1; round <= GC_ROUNDS; round++) {
    gc();
    handle.trackStart(CS_TRACK_CURRENT);
    const deadline = Date.now() + 10_000;
    while (notifications < round && Date.now() < deadline) {
      gc();
      view.setInt16(POLLFD.revents, 0, true);
      await libc().poll_nb(pollfd, 1n, 100);
      gc();
      if (handle.dispatch(CS_DISPATCH_ALL) !== CS_OK) break;
    }
    gc();
    handle.trackStop();
  }
  handle.finalize();
  console.log(JSON.stringify({ event: "gc", notifications }));
}

if (import.meta.main) {
  const group = Deno.args[0];
  if (group === undefined) {
    console.error("Usage: quorum_probe.ts GROUP | quorum_probe.ts --gc-check");
    Deno.exit(2);
  }
  if (group === "--gc-check") await gcCheck();
  else await probe(group);
  Deno.exit(0);
}
