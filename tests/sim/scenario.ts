/**
 * Scenario scripts for the cluster core: a tiny line-oriented language (like etcd raft's
 * testdata) that drives {@link ClusterCore}s directly on the simulated bus and disks of
 * {@link ClusterHarness}, with every invariant check of the harness on (a violation fails the
 * script at its line), and states what must hold. One command per line; `#` starts a comment.
 *
 * Cluster and logs:
 *   nodes 3 [chunk 64]          start n1..n3 in the group (optionally tiny checkpoint chunks)
 *   log L core 64 [sync|nosync] declare a log: core or disk, region count
 *   crash n1 [keep]             the node dies; its messages not yet ordered are lost (or, with
 *                               keep, ordered first: CPG delivers all or none of them)
 *   restart n1 | disconnect n1 | reconnect n1 | tick [N]
 *   inject n1 garbage|truncated|version|kind   a malformed message "from" n1
 *
 * Kernel requests (each may end with `as NAME` to check its reply later):
 *   resume n1 L | presuspend n1 L | postsuspend n1 L | dtr n1 L
 *   mark n1 L 5 6 | clear n1 L 5 | flush n1 L [5 6] | set-sync n1 L 5 1|0
 *   in-sync n1 L 5 | is-clean n1 L 5 | resync n1 L | sync-count n1 L | remote-recovering n1 L 5
 *
 * Time passing:
 *   deliver                     flush every core, order and deliver everything, until quiet
 *   flush [n1]                  the core(s) multicast what they have queued (not yet ordered)
 *   order [N]                   put the next N (all) multicast messages in the total order
 *   deliver n1 [N]              deliver N (all) ordered events to n1 only
 *   disk L [n1]                 every disk write of L in flight (by n1 only) becomes durable
 *   repeat N CMD [; CMD]...     run the commands N times; `$i` is the iteration (0..N-1)
 *   reset-counts                restart the message and malformed counters
 *
 * Expectations:
 *   expect reply NAME ok [nodata] | pending | EAGAIN | ESRCH | EIO | EINVAL | value V | work R | none
 *   expect marks n2 L n1 = 5 6 | none        (n2's replica: n1's marks)
 *   expect in-sync n2 L 5 = 0|1              expect clean n2 L 5 = 0|1 (IS_CLEAN, read locally)
 *   expect recoverer n2 L 5 = n1|none        expect writer n2 L = n1
 *   expect priority n2 L = 3 4 | none        expect search n2 L = 5       expect latch n2 L = 0|1
 *   expect status n3 L = member|joining|out  expect members n2 L = n1 n2
 *   expect disk L 5 = clean|dirty            (the durable image)
 *   expect disk-writes L = 3                 (writes made durable so far)
 *   expect digests L                         (every member's state, cluster bookkeeping included)
 *   expect messages n1 <= 3                  (multicasts by n1 since reset-counts; also = and >=)
 *   expect malformed n2 = 1                  (dropped: malformed, or of another version)
 *   expect logged n2 WORDS...                (a log line of n2's core contains WORDS)
 *
 * @module
 */

import { ClusterHarness, errnoName, Violation } from "./harness.ts";
import type { ClusterCore, ClusterOp } from "../../src/cluster/core.ts";
import { encodeBatch } from "../../src/cluster/messages.ts";
import { isCtrError, parseCtr } from "../../src/log/ctr.ts";
import { readS64, readU64 } from "../../src/log/ops.ts";
import type { NodeId, OpResult } from "../../src/log/types.ts";

/** Outcome of one script. */
export interface ScenarioResult {
  ok: boolean;
  steps: number;
  error?: string;
}

const REGION_SIZE = 1024;

/** Most iterations of one `repeat`. */
export const MAX_REPEAT = 100_000;

class ScriptError extends Error {}

/** Runs a scenario script (its text); `name` is used in messages. */
export function runScenario(
  text: string,
  name: string,
  options: { verbose?: boolean } = {},
): ScenarioResult {
  let h = new ClusterHarness({ throwOnViolation: true, keepLogs: true });
  if (options.verbose) {
    h.onLog = (node, level, msg) => console.log(`      n${node} ${level}: ${msg}`);
  }
  const replies = new Map<string, OpResult | "pending">();
  const sentBase = new Map<NodeId, number>();
  const malformedBase = new Map<NodeId, number>();
  let autoName = 0;
  const lines = text.split("\n");
  let steps = 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/#.*$/, "").trim();
    if (line === "") continue;
    steps++;
    if (options.verbose) console.log(`  ${i + 1}: ${line}`);
    try {
      run(line.split(/\s+/));
    } catch (err) {
      const what = err instanceof Violation
        ? "invariant violated"
        : err instanceof ScriptError
        ? "expectation failed"
        : "error";
      return {
        ok: false,
        steps,
        error: `${name}:${i + 1}: ${line}\n  ${what}: ${err instanceof Error ? err.message : err}`,
      };
    }
  }
  return { ok: true, steps };

  function nodeId(word: string | undefined): NodeId {
    const m = /^n(\d+)$/.exec(word ?? "");
    if (m === null) throw new Error(`Expected a node like n1, got ${word}`);
    return Number(m[1]);
  }

  function num(word: string | undefined): number {
    const v = Number(word);
    if (word === undefined || word === "" || !Number.isInteger(v)) {
      throw new Error(`Expected a number, got ${word}`);
    }
    return v;
  }

  function core(word: string | undefined) {
    const n = h.node(nodeId(word));
    if (!n.up || n.core === null) throw new ScriptError(`Node ${word} is down`);
    return n.core;
  }

  function replica(nodeWord: string | undefined, key: string) {
    const r = core(nodeWord).replica(key);
    if (r === undefined) throw new ScriptError(`${nodeWord} does not hold ${key}`);
    return r;
  }

  function send(args: string[], op: ClusterOp): void {
    const id = nodeId(args[1]);
    const key = args[2];
    if (!h.configs.has(key)) throw new Error(`No log ${key}`);
    const asAt = args.indexOf("as");
    const replyName = asAt >= 0 ? args[asAt + 1] : `_${++autoName}`;
    if (replies.get(replyName) === "pending") {
      throw new Error(`Request ${replyName} is still waiting: name the new one differently`);
    }
    replies.set(replyName, "pending");
    h.request(id, key, op, (r) => replies.set(replyName, r));
  }

  function regionsOf(args: string[], from: number): number[] {
    const out: number[] = [];
    for (let j = from; j < args.length && args[j] !== "as"; j++) out.push(num(args[j]));
    return out;
  }

  function messagesOf(id: NodeId): number {
    return (h.nodes.get(id)?.core?.stats.messagesSent ?? 0) - (sentBase.get(id) ?? 0);
  }

  function run(w: string[]): void {
    const cmd = w[0];
    switch (cmd) {
      case "nodes": {
        const count = num(w[1]);
        const chunk = w[2] === "chunk" ? num(w[3]) : undefined;
        if (chunk !== undefined) {
          const old = h;
          h = new ClusterHarness({
            throwOnViolation: true,
            keepLogs: true,
            core: { checkpointChunkBytes: chunk },
          });
          h.onLog = old.onLog;
          for (const [key, config] of old.configs) h.addLog(key, config);
        }
        for (let id = 1; id <= count; id++) {
          h.start(id);
          h.deliverAll();
        }
        return;
      }
      case "log": {
        const key = w[1];
        const kind = w[2] === "disk" ? "clustered-disk" : w[2] === "core" ? "clustered-core" : "";
        if (kind === "") throw new Error(`Log kind must be core or disk, got ${w[2]}`);
        const regions = num(w[3]);
        const words = [String(regions * REGION_SIZE), kind];
        if (kind === "clustered-disk") words.push("253:9");
        words.push(String(REGION_SIZE));
        if (w[4] !== undefined) words.push(w[4]);
        const args = parseCtr(words.join(" "));
        if (isCtrError(args)) throw new Error(args.error);
        h.addLog(key, { ...args, uuid: key, luid: 0n });
        return;
      }
      case "resume":
        return send(w, { op: "resume" });
      case "presuspend":
      case "postsuspend":
      case "dtr":
        return send(w, { op: cmd });
      case "mark":
        return send(w, { op: "mark", regions: regionsOf(w, 3) });
      case "clear":
        return send(w, { op: "clear", regions: regionsOf(w, 3) });
      case "flush":
        if (w.length <= 2) {
          // `flush` or `flush n1`: the core multicasts its queue.
          if (w[1] === undefined) h.flush();
          else {
            const n = h.node(nodeId(w[1]));
            h.handleEffects(n, n.core!.flush());
          }
          return;
        }
        return send(w, { op: "flush", marks: regionsOf(w, 3) });
      case "set-sync":
        return send(w, { op: "set_region_sync", region: num(w[3]), inSync: w[4] === "1" });
      case "in-sync":
        return send(w, { op: "in_sync", region: num(w[3]) });
      case "is-clean":
        return send(w, { op: "is_clean", region: num(w[3]) });
      case "remote-recovering":
        return send(w, { op: "is_remote_recovering", region: num(w[3]) });
      case "resync":
        return send(w, { op: "get_resync_work" });
      case "sync-count":
        return send(w, { op: "get_sync_count" });
      case "order":
        h.bus.orderNext(w[1] === undefined ? Infinity : num(w[1]), h.now);
        return;
      case "deliver": {
        if (w[1] === undefined) return h.deliverAll();
        const n = h.node(nodeId(w[1]));
        const count = w[2] === undefined ? Infinity : num(w[2]);
        for (let k = 0; k < count && h.deliverOne(n); k++) h.checkAll();
        return;
      }
      case "disk": {
        if (!h.disks.has(w[1])) throw new Error(`No disk log ${w[1]}`);
        h.completeDisks(w[1], w[2] === undefined ? undefined : nodeId(w[2]));
        h.checkAll();
        return;
      }
      case "crash":
        h.crash(nodeId(w[1]), w[2] === "keep");
        return;
      case "restart":
        h.start(nodeId(w[1]));
        return;
      case "disconnect":
        h.disconnect(nodeId(w[1]), w[2] === "keep");
        return;
      case "reconnect":
        h.reconnect(nodeId(w[1]));
        return;
      case "tick": {
        const count = w[1] === undefined ? 1 : num(w[1]);
        for (let k = 0; k < count; k++) h.tick();
        return;
      }
      case "inject": {
        const from = nodeId(w[1]);
        const good = encodeBatch([{
          kind: "entry",
          key: "L",
          tag: 1,
          op: { op: "mark", regions: [1] },
        }]);
        let bytes: Uint8Array;
        switch (w[2]) {
          case "garbage":
            bytes = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9]);
            break;
          case "truncated":
            bytes = good.subarray(0, good.byteLength - 1);
            break;
          case "version":
            bytes = good.slice();
            bytes[4] = 99;
            break;
          case "kind":
            bytes = good.slice();
            bytes[5] = 99;
            break;
          default:
            throw new Error(`Unknown injection ${w[2]}`);
        }
        h.bus.inject(from, bytes, h.now);
        return;
      }
      case "repeat": {
        const count = num(w[1]);
        if (count > MAX_REPEAT) throw new Error(`At most ${MAX_REPEAT} repetitions`);
        const body = w.slice(2).join(" ").split(";").map((c) => c.trim()).filter((c) => c !== "");
        for (let k = 0; k < count; k++) {
          for (const c of body) run(c.replaceAll("$i", String(k)).split(/\s+/));
        }
        return;
      }
      case "reset-counts":
        for (const n of h.nodes.values()) {
          sentBase.set(n.id, n.core?.stats.messagesSent ?? 0);
          malformedBase.set(n.id, dropped(n.core));
        }
        return;
      case "expect":
        return expect(w.slice(1));
      default:
        throw new Error(`Unknown command ${cmd}`);
    }
  }

  function expect(w: string[]): void {
    const what = w[0];
    const eq = w.indexOf("=");
    const rhs = eq >= 0 ? w.slice(eq + 1) : [];
    switch (what) {
      case "reply":
        return expectReply(w);
      case "marks": {
        const got = replica(w[1], w[2]).marksOf(nodeId(w[3]));
        const want = rhs[0] === "none" ? [] : rhs.map(num);
        if (got.join(" ") !== want.join(" ")) {
          throw new ScriptError(`Expected marks [${want}], got [${got}]`);
        }
        return;
      }
      case "in-sync": {
        const got = replica(w[1], w[2]).isInSync(num(w[3])) ? 1 : 0;
        if (got !== num(rhs[0])) throw new ScriptError(`Expected in-sync ${rhs[0]}, got ${got}`);
        return;
      }
      case "clean": {
        const r = replica(w[1], w[2]).apply(nodeId(w[1]), { op: "is_clean", region: num(w[3]) });
        const got = r.data === undefined ? -1 : readS64(r.data);
        if (got !== num(rhs[0])) throw new ScriptError(`Expected clean ${rhs[0]}, got ${got}`);
        return;
      }
      case "disk": {
        const disk = h.disks.get(w[1]);
        if (disk === undefined) throw new Error(`No disk log ${w[1]}`);
        const got = disk.clean(num(w[2])) ? "clean" : "dirty";
        if (got !== rhs[0]) throw new ScriptError(`Expected ${rhs[0]} on disk, got ${got}`);
        return;
      }
      case "recoverer": {
        const got = replica(w[1], w[2]).recovererOf(num(w[3]));
        const want = rhs[0] === "none" ? undefined : nodeId(rhs[0]);
        if (got !== want) {
          throw new ScriptError(
            `Expected recoverer ${rhs[0]}, got ${got === undefined ? "none" : `n${got}`}`,
          );
        }
        return;
      }
      case "priority": {
        const got = replica(w[1], w[2]).priorityRegions();
        const want = rhs[0] === "none" ? [] : rhs.map(num);
        if (got.join(" ") !== want.join(" ")) {
          throw new ScriptError(`Expected priority [${want}], got [${got}]`);
        }
        return;
      }
      case "search": {
        const got = replica(w[1], w[2]).searchPosition;
        if (got !== num(rhs[0])) {
          throw new ScriptError(`Expected search position ${rhs[0]}, got ${got}`);
        }
        return;
      }
      case "latch": {
        const got = replica(w[1], w[2]).inSyncLatch ? 1 : 0;
        if (got !== num(rhs[0])) throw new ScriptError(`Expected latch ${rhs[0]}, got ${got}`);
        return;
      }
      case "writer": {
        const s = core(w[1]).clusterState(w[2]);
        if (s === undefined) throw new ScriptError(`${w[1]} does not hold ${w[2]}`);
        if (s.writer !== nodeId(rhs[0])) {
          throw new ScriptError(`Expected writer ${rhs[0]}, got n${s.writer}`);
        }
        return;
      }
      case "status": {
        const got = core(w[1]).logStatus(w[2]) ?? "out";
        if (got !== rhs[0]) throw new ScriptError(`Expected status ${rhs[0]}, got ${got}`);
        return;
      }
      case "members": {
        const s = core(w[1]).clusterState(w[2]);
        const got = s === undefined ? "(not held)" : s.members.map((m) => `n${m}`).join(" ");
        if (got !== rhs.join(" ")) {
          throw new ScriptError(`Expected members ${rhs.join(" ")}, got ${got}`);
        }
        return;
      }
      case "digests": {
        const key = w[1];
        const seen = new Map<string, NodeId[]>();
        for (const n of h.upNodes()) {
          const d = n.core!.digest(key);
          if (d === undefined) continue;
          seen.set(d, [...(seen.get(d) ?? []), n.id]);
        }
        if (seen.size > 1) {
          throw new ScriptError(
            `Members disagree on ${key}: ${
              [...seen.values()].map((v) => v.join(",")).join(" vs ")
            }`,
          );
        }
        if (seen.size === 0) throw new ScriptError(`Nobody holds ${key}`);
        return;
      }
      case "messages": {
        const got = messagesOf(nodeId(w[1]));
        const limit = num(w[3]);
        const ok = w[2] === "<=" ? got <= limit : w[2] === ">=" ? got >= limit : got === limit;
        if (!ok) throw new ScriptError(`Expected messages ${w[2]} ${limit}, got ${got}`);
        return;
      }
      case "disk-writes": {
        const disk = h.disks.get(w[1]);
        if (disk === undefined) throw new Error(`No disk log ${w[1]}`);
        if (disk.writes !== num(rhs[0])) {
          throw new ScriptError(`Expected ${rhs[0]} durable writes, got ${disk.writes}`);
        }
        return;
      }
      case "malformed": {
        const n = h.node(nodeId(w[1]));
        const got = dropped(n.core) - (malformedBase.get(n.id) ?? 0);
        if (got !== num(rhs[0])) throw new ScriptError(`Expected ${rhs[0]} malformed, got ${got}`);
        return;
      }
      case "logged": {
        const n = h.node(nodeId(w[1]));
        const text = w.slice(2).join(" ");
        if (!n.logLines.some((l) => l.includes(text))) {
          throw new ScriptError(`No log line of ${w[1]} contains "${text}"`);
        }
        return;
      }
      default:
        throw new Error(`Unknown expectation ${what}`);
    }
  }

  function expectReply(w: string[]): void {
    const r = replies.get(w[1]);
    if (r === undefined) throw new Error(`No request named ${w[1]}`);
    const want = w[2];
    const got = r === "pending" ? "pending" : describe(r);
    const fail = () => {
      throw new ScriptError(`Expected ${w.slice(2).join(" ")}, got ${got}`);
    };
    if (want === "pending") {
      if (r !== "pending") fail();
      return;
    }
    if (r === "pending") return fail();
    switch (want) {
      case "value":
        if (r.errno !== 0 || r.data === undefined || readS64(r.data) !== num(w[3])) fail();
        return;
      case "work":
        if (r.errno !== 0 || r.data === undefined || readS64(r.data) !== 1) fail();
        if (readU64(r.data!, 8) !== num(w[3])) fail();
        return;
      case "none":
        if (r.errno !== 0 || r.data === undefined || readS64(r.data) !== 0) fail();
        return;
      case "ok":
        if (r.errno !== 0) fail();
        if (w[3] === "nodata" && r.data !== undefined && r.data.byteLength > 0) fail();
        return;
      default:
        if (errnoName(r.errno) !== want) fail();
    }
  }
}

function describe(r: OpResult): string {
  const base = errnoName(r.errno);
  if (r.data === undefined || r.data.byteLength === 0) return base;
  if (r.data.byteLength === 8) return `${base} value ${readS64(r.data)}`;
  if (r.data.byteLength === 16) return `${base} (${readS64(r.data)}, ${readU64(r.data, 8)})`;
  return `${base} with ${r.data.byteLength} bytes`;
}

/** Runs a scenario file. */
export function runScenarioFile(path: string, options: { verbose?: boolean } = {}): ScenarioResult {
  return runScenario(Deno.readTextFileSync(path), path, options);
}

/** Messages a core dropped: malformed ones and, by their version byte, another release's. */
function dropped(core: ClusterCore | null): number {
  return (core?.stats.malformed ?? 0) + (core?.stats.foreignVersion ?? 0);
}
