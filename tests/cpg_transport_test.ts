// src/bus/cpg.ts against real corosync 3 (root): a two-node cluster, each corosync in its own
// network namespace, joined by a veth pair. Node 1's transport runs in this process (its handle
// opened inside node 1's namespace, also on every reconnection); node 2's run in child processes
// (tests/support/cpg_transport_child.ts). Run with --v8-flags=--stack-size=2048.
import assert from "node:assert/strict";
import { CpgError, CpgHandle, CS_ERR_LIBRARY, CS_ERR_TRY_AGAIN } from "../ffi/cpg.ts";
import { QuorumError } from "../ffi/quorum.ts";
import { CpgTransport, DEFAULT_CPG_GROUP } from "../src/bus/cpg.ts";
import { Logger } from "../src/logger.ts";
import { EventLoop } from "../src/loop.ts";
import { Corosync } from "./support/corosync.ts";
import {
  checkPayload,
  payload,
  TransportRecorder,
  waitUntil,
} from "./support/cpg_transport_child.ts";
import { NetworkNamespace, withNetns } from "./support/netns.ts";
import { TransportHarness } from "./support/transport_harness.ts";

const CHILD = new URL("./support/cpg_transport_child.ts", import.meta.url).pathname;
// Generous: a busy shared 2-core machine; a passing step takes a fraction of it.
const TIMEOUT_MS = 20_000;
/** Prefix of this test's namespaces. */
const PREFIX = "clogd-cpgt";
/** Largest message of the floods: big enough to fill corosync's IPC ring at once. */
const FLOOD_MAX_BYTES = 64 * 1024;
const logger = new Logger(Deno.env.get("CLOGD_TEST_LOG") === "1" ? "debug" : "error", "test");

async function ip(netns: NetworkNamespace, args: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command("ip", {
    args: ["-n", netns.name, ...args],
    stdout: "null",
    stderr: "piped",
  }).output();
  if (code !== 0) {
    throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(stderr).trim()}`);
  }
}

/**
 * Two corosync nodes (ids 1 and 2) in two namespaces joined by a veth pair, with `two_node`
 * quorum and no `wait_for_all`: each node alone is quorate.
 */
class TwoNodes implements AsyncDisposable {
  readonly namespaces: NetworkNamespace[];
  readonly nodes: Corosync[] = [];

  private constructor(namespaces: NetworkNamespace[]) {
    this.namespaces = namespaces;
  }

  static async start(): Promise<TwoNodes> {
    const a = await NetworkNamespace.create({ prefix: PREFIX, loopback: true });
    const b = await NetworkNamespace.create({ prefix: PREFIX, loopback: true });
    const cluster = new TwoNodes([a, b]);
    try {
      // Created inside a, peer moved to b: the host namespace never sees the names.
      await ip(a, ["link", "add", "cpg0", "type", "veth", "peer", "name", "cpg0", "netns", b.name]);
      const addresses = ["10.77.0.1", "10.77.0.2"];
      for (const [i, ns] of [a, b].entries()) {
        await ip(ns, ["addr", "add", `${addresses[i]}/24`, "dev", "cpg0"]);
        await ip(ns, ["link", "set", "cpg0", "up"]);
      }
      const nodes = addresses.map((address, i) => ({ nodeid: i + 1, address }));
      const started = await Promise.allSettled(
        [a, b].map((netns, i) =>
          Corosync.start({
            netns,
            nodeid: i + 1,
            nodes,
            clusterName: "cpgt",
            // Either node alone stays quorate (it is killed and restarted alone below); with
            // votequorum's default, the survivor of two nodes that met would not be.
            quorum: { provider: "votequorum", twoNode: true, waitForAll: false },
          })
        ),
      );
      for (const s of started) if (s.status === "fulfilled") cluster.nodes.push(s.value);
      for (const s of started) if (s.status === "rejected") throw s.reason;
      return cluster;
    } catch (error) {
      await cluster.stop();
      throw error;
    }
  }

  async stop(): Promise<void> {
    await Promise.all(this.nodes.map((n) => n.stop()));
    await Promise.all(this.namespaces.map((ns) => ns.delete()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** Starts `transport` with a new recorder and waits for the change in which it joined. */
async function startAndJoin(transport: CpgTransport): Promise<TransportRecorder> {
  const recorder = new TransportRecorder();
  transport.start(recorder);
  await waitUntil(() => recorder.confchgs.some((c) => c.joined.includes(transport.nodeId)), {
    timeoutMs: TIMEOUT_MS,
    what: `node ${transport.nodeId} joining "${transport.group}"`,
  });
  return recorder;
}

Deno.test("CpgTransport.connect() throws CpgError CS_ERR_LIBRARY when corosync is not running", async () => {
  await withNetns((netns) => {
    const loop = new EventLoop();
    try {
      assert.throws(
        () =>
          CpgTransport.connect({
            loop,
            logger,
            open: (callbacks) => netns.enter(() => CpgHandle.open(callbacks)),
          }),
        (error: unknown) => {
          assert.ok(error instanceof CpgError, String(error));
          assert.equal(error.code, CS_ERR_LIBRARY);
          assert.match(error.message, /CS_ERR_LIBRARY.*is corosync running\?/);
          return true;
        },
      );
      // A name CPG cannot carry fails at once, before any connection.
      assert.throws(() => CpgTransport.connect({ loop, logger, group: "" }), RangeError);
    } finally {
      loop.close();
    }
  }, { prefix: PREFIX });
});

Deno.test("CpgTransport.connectPatiently() retries only CS_ERR_TRY_AGAIN, and only so long", async () => {
  const loop = new EventLoop();
  try {
    // Busy twice, then not running: the third error is thrown at once.
    const codes = [CS_ERR_TRY_AGAIN, CS_ERR_TRY_AGAIN, CS_ERR_LIBRARY];
    const retries: number[] = [];
    let calls = 0;
    await assert.rejects(
      CpgTransport.connectPatiently({
        loop,
        logger,
        open: () => {
          throw new CpgError("cpg_model_initialize", codes[calls++]);
        },
      }, { onRetry: (_error, attempt) => retries.push(attempt) }),
      (error: unknown) => error instanceof CpgError && error.code === CS_ERR_LIBRARY,
    );
    assert.equal(calls, 3);
    assert.deepEqual(retries, [1, 2]);
    // The quorum service busy counts the same; forever busy gives up after the limit.
    const started = performance.now();
    let quorumCalls = 0;
    await assert.rejects(
      CpgTransport.connectPatiently({
        loop,
        logger,
        open: () => {
          throw new QuorumError("quorum_model_initialize", CS_ERR_TRY_AGAIN);
        },
      }, { limitMs: 300, onRetry: () => quorumCalls++ }),
      (error: unknown) => error instanceof QuorumError && error.code === CS_ERR_TRY_AGAIN,
    );
    const elapsed = performance.now() - started;
    assert.ok(quorumCalls >= 3, `${quorumCalls} retries`);
    assert.ok(elapsed >= 100 && elapsed < 2_000, `gave up after ${elapsed} ms`);
  } finally {
    loop.close();
  }
});

Deno.test("CpgTransport over a two-node corosync cluster", async (t) => {
  const started = performance.now();
  await using cluster = await TwoNodes.start();
  const [node1, node2] = cluster.nodes;
  await using harness = new TransportHarness(logger);
  const t1 = harness.connect(node1);
  assert.equal(t1.nodeId, 1);
  assert.equal(t1.group, DEFAULT_CPG_GROUP);
  assert.equal(t1.kind, "corosync");
  const r1 = await startAndJoin(t1);
  assert.deepEqual(r1.confchgs[0], { members: [1], left: [], joined: [1] });
  console.log(`  cluster up and node 1 joined in ${Math.round(performance.now() - started)} ms`);

  await t.step("connectPatiently() gets through a busy corosync to the real one", async () => {
    let busy = 2;
    const transport = await CpgTransport.connectPatiently({
      loop: harness.loop,
      logger,
      group: "cpgt-patient",
      open: (callbacks) => {
        if (busy-- > 0) throw new CpgError("cpg_model_initialize", CS_ERR_TRY_AGAIN);
        return node1.openCpg(callbacks);
      },
      openQuorum: (callbacks) => node1.openQuorum(callbacks),
    });
    try {
      assert.equal(busy, -1, "two busy answers, then the real connection");
      assert.equal(transport.nodeId, 1);
      const recorder = await startAndJoin(transport);
      assert.deepEqual(recorder.confchgs[0], { members: [1], left: [], joined: [1] });
    } finally {
      transport.close();
    }
  });

  await t.step("two nodes deliver interleaved bursts in one total order", async () => {
    const count = 3000;
    await using child = node2.spawnDeno(CHILD, [
      "stream",
      "--group",
      DEFAULT_CPG_GROUP,
      "--count",
      String(count),
      "--peers",
      "2",
    ]);
    await waitUntil(() => r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "node 2" });
    const joinedAt = r1.confchgs.findLastIndex((c) => c.joined.includes(2));
    assert.deepEqual(r1.confchgs[joinedAt], { members: [1, 2], left: [], joined: [2] });
    // The child sends once it saw that change: everything of its burst is delivered after it
    // (some of it perhaps before we read its "ready" line).
    const start = r1.confchgAt[joinedAt];
    const ready = await child.waitFor((l) => l.event === "ready", {
      timeoutMs: TIMEOUT_MS,
      what: "ready",
    });
    assert.deepEqual(ready.members, [1, 2]);
    for (let i = 0; i < count; i++) t1.mcast(payload(1, i));
    await waitUntil(() => r1.countFrom(1, start) >= count && r1.countFrom(2, start) >= count, {
      timeoutMs: TIMEOUT_MS,
      what: `${count} messages from each node`,
    });
    const done = await child.waitFor((l) => l.event === "done", {
      timeoutMs: TIMEOUT_MS,
      what: "done",
    });
    assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 0, child.stderr);
    // The child counted from its own "ready"; ours may hold some of its messages before `start`
    // (it can send before we do): align on the child's first delivery.
    const ours = r1.order(0);
    const theirs = done.order as string[];
    const offset = ours.indexOf(theirs[0]);
    assert.ok(offset >= 0, `the child's first delivery ${theirs[0]} is in ours`);
    assert.deepEqual(ours.slice(offset, offset + theirs.length), theirs);
    assert.equal(r1.digest(offset), done.digest);
    assert.ok(!theirs.includes("?"), "every delivered payload is byte-exact");
    for (const node of [1, 2]) {
      const indices = theirs.filter((o) => o.startsWith(`${node}:`)).map((o) => +o.split(":")[1]);
      assert.deepEqual(indices, Array.from({ length: count }, (_, i) => i), `node ${node} FIFO`);
    }
    const switches = theirs.filter((o, i) => i > 0 && o[0] !== theirs[i - 1][0]).length;
    // The child left cleanly after its report.
    await waitUntil(() => !r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "node 2 gone" });
    assert.deepEqual(r1.confchgs.at(-1), {
      members: [1],
      left: [{ node: 2, reason: "leave" }],
      joined: [],
    });
    console.log(
      `  ${theirs.length} deliveries identical on both nodes; ${switches} sender switches; ` +
        `node 1 stats ${JSON.stringify(pick(t1.stats(), ["sent", "tryAgain", "maxQueueLength"]))}`,
    );
  });

  await t.step("own send order holds under a flood that hits CS_ERR_TRY_AGAIN", async () => {
    // Up to 64 KiB (1 KiB messages never fill corosync's IPC ring here: it keeps up).
    const count = 3000;
    const messages = Array.from({ length: count }, (_, i) => payload(1, i, FLOOD_MAX_BYTES));
    const before = t1.stats();
    const start = r1.deliveries.length;
    const began = performance.now();
    for (const message of messages) t1.mcast(message);
    const queued = t1.stats().queueLength;
    await waitUntil(() => r1.deliveries.length - start >= count, {
      timeoutMs: TIMEOUT_MS,
      what: `${count} own deliveries`,
    });
    const ms = performance.now() - began;
    const after = t1.stats();
    const order = r1.order(start);
    assert.deepEqual(order, Array.from({ length: count }, (_, i) => `1:${i}`));
    assert.ok(after.tryAgain > before.tryAgain, `CS_ERR_TRY_AGAIN seen: ${JSON.stringify(after)}`);
    assert.ok(queued > 0, "the burst queued behind CS_ERR_TRY_AGAIN");
    assert.equal(after.queueLength, 0);
    assert.equal(after.queueBytes, 0);
    assert.equal(after.sent - before.sent, count);
    assert.equal(after.disconnects, 0);
    console.log(
      `  ${count} messages in ${Math.round(ms)} ms; ${after.tryAgain - before.tryAgain} ` +
        `CS_ERR_TRY_AGAIN, ${after.retryTimers - before.retryTimers} backoff timers, ` +
        `queue peak ${after.maxQueueLength} messages / ${after.maxQueueBytes} bytes, ` +
        `${after.dispatchLimitHits - before.dispatchLimitHits} dispatch limit hits`,
    );
  });

  await t.step(
    "a full send queue ends the session: disconnected(), then a rejoin with itself in joined",
    async () => {
      const t2 = harness.connect(node1, {
        group: "cpgt-queue",
        limits: { maxQueueMessages: 8, reconnectInitialMs: 20 },
      });
      const r2 = await startAndJoin(t2);
      let sent = 0;
      while (t2.stats().disconnects === 0 && sent < 10_000) {
        t2.mcast(payload(1, sent++, FLOOD_MAX_BYTES));
      }
      const stats = t2.stats();
      assert.equal(stats.disconnects, 1, JSON.stringify(stats));
      assert.equal(stats.queueLength, 0, "the queue is dropped with the session");
      assert.ok(stats.droppedOnLoss >= 8);
      // Told once, and never from inside mcast(): from a microtask after it.
      assert.equal(r2.disconnects.length, 0);
      await waitUntil(() => r2.disconnects.length === 1, { timeoutMs: TIMEOUT_MS, what: "told" });
      assert.match(r2.disconnects[0], /^The send queue is full \(8 messages/);
      t2.mcast(payload(1, 0));
      assert.equal(t2.stats().droppedDisconnected, 1, "nothing is sent without a session");
      const joins = r2.confchgs.length;
      await waitUntil(() => r2.confchgs.length > joins, { timeoutMs: TIMEOUT_MS, what: "rejoin" });
      assert.deepEqual(r2.confchgs.at(-1), { members: [1], left: [], joined: [1] });
      assert.equal(t2.stats().reconnects, 1);
      assert.equal(r2.disconnects.length, 1);
      // The new session delivers what is sent in it.
      const start = r2.deliveries.length;
      t2.mcast(payload(1, 7));
      await waitUntil(() => r2.deliveries.length > start, { timeoutMs: TIMEOUT_MS, what: "7" });
      assert.deepEqual(checkPayload(r2.deliveries.at(-1)!.bytes), { sender: 1, index: 7 });
      t2.close();
      assert.equal(t2.state, "closed");
    },
  );

  await t.step(
    "a handler that throws is counted and logged, and later events still arrive in order",
    async () => {
      const t3 = harness.connect(node1, { group: "cpgt-throw" });
      const r3 = await startAndJoin(t3);
      const deliver = r3.deliver.bind(r3);
      r3.deliver = (from, bytes) => {
        deliver(from, bytes);
        if (checkPayload(bytes)!.index % 2 === 0) throw new Error("Handler failure");
      };
      for (let i = 0; i < 10; i++) t3.mcast(payload(1, i));
      await waitUntil(() => r3.deliveries.length === 10, { timeoutMs: TIMEOUT_MS, what: "10" });
      assert.deepEqual(r3.order(), Array.from({ length: 10 }, (_, i) => `1:${i}`));
      assert.equal(t3.stats().handlerErrors, 5);
      assert.equal(t3.state, "joined");
      t3.close();
    },
  );

  await t.step("dispatch yields to the loop every maxDispatchPerWake callbacks", async () => {
    const t4 = harness.connect(node1, { group: "cpgt-limit", limits: { maxDispatchPerWake: 4 } });
    const r4 = await startAndJoin(t4);
    const polls = harness.loop.stats.polls;
    for (let i = 0; i < 400; i++) t4.mcast(payload(1, i));
    await waitUntil(() => r4.deliveries.length === 400, { timeoutMs: TIMEOUT_MS, what: "400" });
    assert.deepEqual(r4.order(), Array.from({ length: 400 }, (_, i) => `1:${i}`));
    const stats = t4.stats();
    assert.ok(stats.dispatchLimitHits > 0, JSON.stringify(stats));
    // At most 4 callbacks per wake: at least 100 wakes, each one a poll of the loop.
    assert.ok(stats.wakes >= 100, `${stats.wakes} wakes`);
    assert.ok(harness.loop.stats.polls - polls >= 100);
    t4.close();
  });

  await t.step("a clean leave is reported as leave, a killed member as crash", async () => {
    {
      await using child = node2.spawnDeno(CHILD, ["member", "--group", DEFAULT_CPG_GROUP]);
      await child.waitFor((l) => l.event === "joined", { timeoutMs: TIMEOUT_MS, what: "joined" });
      await waitUntil(() => r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "node 2" });
      assert.deepEqual(r1.confchgs.at(-1), { members: [1, 2], left: [], joined: [2] });
      t1.mcast(new TextEncoder().encode("leave:2"));
      await waitUntil(() => !r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "leave" });
      assert.deepEqual(r1.confchgs.at(-1), {
        members: [1],
        left: [{ node: 2, reason: "leave" }],
        joined: [],
      });
      assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 0, child.stderr);
    }
    {
      await using child = node2.spawnDeno(CHILD, ["member", "--group", DEFAULT_CPG_GROUP]);
      await waitUntil(() => r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "node 2" });
      // The child saw the same change: both members, itself joined.
      const seen = await child.waitFor((l) => l.event === "confchg", {
        timeoutMs: TIMEOUT_MS,
        what: "confchg",
      });
      assert.deepEqual(seen.members, [1, 2]);
      assert.deepEqual(seen.joined, [2]);
      child.kill();
      await waitUntil(() => !r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "crash" });
      assert.deepEqual(r1.confchgs.at(-1), {
        members: [1],
        left: [{ node: 2, reason: "crash" }],
        joined: [],
      });
    }
  });

  await t.step("a node whose corosync dies is reported as crash (NODEDOWN)", async () => {
    await using child = node2.spawnDeno(CHILD, ["member", "--group", DEFAULT_CPG_GROUP]);
    await waitUntil(() => r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "node 2" });
    const killed = performance.now();
    await node2.kill("SIGKILL");
    await waitUntil(() => !r1.members.includes(2), { timeoutMs: TIMEOUT_MS, what: "nodedown" });
    assert.deepEqual(r1.confchgs.at(-1), {
      members: [1],
      left: [{ node: 2, reason: "crash" }],
      joined: [],
    });
    // The child's own transport lost its corosync.
    const lost = await child.waitFor((l) => l.event === "disconnected", {
      timeoutMs: TIMEOUT_MS,
      what: "the child's disconnected",
    });
    assert.match(String(lost.reason), /CS_ERR_LIBRARY/);
    console.log(`  node 2 seen down ${Math.round(performance.now() - killed)} ms after the kill`);
  });

  // Last two: they kill this node's corosync.
  await t.step(
    "a SIGKILLed corosync: disconnected() once, then reconnect and rejoin after a restart",
    async () => {
      const before = t1.stats();
      const joins = r1.confchgs.length;
      await node1.kill("SIGKILL");
      await waitUntil(() => r1.disconnects.length === 1, {
        timeoutMs: TIMEOUT_MS,
        what: "disconnected()",
      });
      assert.match(r1.disconnects[0], /CS_ERR_LIBRARY/);
      assert.equal(t1.state, "down");
      t1.mcast(payload(1, 0));
      assert.equal(t1.stats().droppedDisconnected, before.droppedDisconnected + 1);
      // Let it fail to reconnect a few times.
      await waitUntil(() => t1.stats().reconnectFailures >= 2, {
        timeoutMs: TIMEOUT_MS,
        what: "failed reconnections",
      });
      const restarted = performance.now();
      await node1.restart();
      await waitUntil(() => r1.confchgs.length > joins, { timeoutMs: TIMEOUT_MS, what: "rejoin" });
      const rejoined = performance.now() - restarted;
      assert.deepEqual(r1.confchgs.at(-1), { members: [1], left: [], joined: [1] });
      assert.equal(r1.disconnects.length, 1, "told once");
      const after = t1.stats();
      assert.equal(after.reconnects, before.reconnects + 1);
      assert.equal(after.disconnects, before.disconnects + 1);
      assert.equal(t1.state, "joined");
      const start = r1.deliveries.length;
      for (let i = 0; i < 10; i++) t1.mcast(payload(1, i));
      await waitUntil(() => r1.deliveries.length - start >= 10, {
        timeoutMs: TIMEOUT_MS,
        what: "10 after the restart",
      });
      assert.deepEqual(r1.order(start), Array.from({ length: 10 }, (_, i) => `1:${i}`));
      console.log(
        `  rejoined ${Math.round(rejoined)} ms after corosync was ready again; ` +
          `${after.reconnectFailures} failed reconnections meanwhile, ` +
          `${after.joinTryAgain - before.joinTryAgain} joins answered CS_ERR_TRY_AGAIN`,
      );
    },
  );

  await t.step(
    "corosync back with another node id: the transport stays disconnected",
    async () => {
      const joins = r1.confchgs.length;
      await node1.stop();
      await waitUntil(() => r1.disconnects.length === 2, {
        timeoutMs: TIMEOUT_MS,
        what: "disconnected()",
      });
      // Same namespace (the transport's open() enters it), new identity.
      cluster.nodes.push(
        await Corosync.start({
          netns: node1.netns,
          nodeid: 3,
          nodes: [{ nodeid: 3, address: "10.77.0.1" }],
          clusterName: "cpgt-other",
        }),
      );
      await waitUntil(() => t1.state === "failed", { timeoutMs: TIMEOUT_MS, what: "failed" });
      const failures = t1.stats().reconnectFailures;
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(t1.stats().reconnectFailures, failures, "no more attempts");
      assert.equal(r1.confchgs.length, joins);
      assert.equal(t1.nodeId, 1);
      t1.mcast(payload(1, 0));
      assert.equal(t1.stats().joined, 0);
    },
  );
});

function pick(stats: Record<string, number>, keys: string[]): Record<string, number> {
  return Object.fromEntries(keys.map((k) => [k, stats[k]]));
}
