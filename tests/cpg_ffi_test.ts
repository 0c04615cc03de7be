// ffi/cpg.ts against a real corosync 3 (root): one single-node corosync in its own network
// namespace, CPG clients in this process (moved into the namespace to connect) and in child
// processes (tests/support/cpg_child.ts). Run with --v8-flags=--stack-size=2048 (the test task
// does): libcpg's dispatch calls our callbacks on top of 1 MiB of C stack.
import assert from "node:assert/strict";
import {
  CPG_ADDRESS,
  CPG_MAX_MESSAGE_BYTES,
  CPG_MAX_NAME_LENGTH,
  CPG_REASON,
  CpgCallbackError,
  type CpgCallbacks,
  CpgError,
  CpgHandle,
  CS_ERR_BAD_HANDLE,
  CS_ERR_EXIST,
  CS_ERR_LIBRARY,
  CS_OK,
  decodeCpgAddresses,
  decodeCpgName,
  decodeCpgRingId,
  encodeCpgName,
} from "../ffi/cpg.ts";
import { Corosync, dispatchUntil, joinWithRetry, waitReadable } from "./support/corosync.ts";
import { sendMessages, StreamRecorder, testMessage } from "./support/cpg_child.ts";
import { withNetns } from "./support/netns.ts";

const CHILD = new URL("./support/cpg_child.ts", import.meta.url).pathname;
// Generous: a busy shared 2-core machine; a passing test takes a fraction of it.
const TIMEOUT_MS = 20_000;
const MESSAGES = 1000;

const noCallbacks: CpgCallbacks = { onDeliver() {}, onConfchg() {} };

Deno.test("encodeCpgName() and decodeCpgName() round-trip a UTF-8 name", () => {
  const bytes = encodeCpgName("clogd-ü");
  const view = new DataView(bytes.buffer);
  assert.equal(view.getUint32(0, true), 8);
  assert.equal(decodeCpgName(Deno.UnsafePointer.of(bytes)), "clogd-ü");
  assert.equal(decodeCpgName(null), "");
  assert.equal(
    decodeCpgName(Deno.UnsafePointer.of(encodeCpgName("x".repeat(CPG_MAX_NAME_LENGTH)))),
    "x".repeat(CPG_MAX_NAME_LENGTH),
  );
});

Deno.test("encodeCpgName() rejects an empty name and one longer than 128 bytes", () => {
  assert.throws(() => encodeCpgName(""), RangeError);
  assert.throws(() => encodeCpgName("x".repeat(CPG_MAX_NAME_LENGTH + 1)), RangeError);
  // 64 two-byte characters are 128 bytes: fits; one more byte does not.
  encodeCpgName("ü".repeat(64));
  assert.throws(() => encodeCpgName("ü".repeat(64) + "x"), RangeError);
});

Deno.test("decodeCpgName() clamps a corrupt length to 128 bytes", () => {
  const bytes = encodeCpgName("a");
  bytes.fill(0x61, 4);
  new DataView(bytes.buffer).setUint32(0, 100_000, true);
  assert.equal(decodeCpgName(Deno.UnsafePointer.of(bytes)).length, CPG_MAX_NAME_LENGTH);
});

Deno.test("decodeCpgAddresses() reads struct cpg_address entries", () => {
  const bytes = new Uint8Array(new ArrayBuffer(3 * CPG_ADDRESS.size));
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < 3; i++) {
    view.setUint32(i * 12, 10 + i, true);
    view.setUint32(i * 12 + 4, 4_000_000_000 + i, true);
    view.setUint32(i * 12 + 8, i, true);
  }
  const pointer = Deno.UnsafePointer.of(bytes);
  assert.deepEqual(decodeCpgAddresses(pointer, 2), [
    { nodeid: 10, pid: 4_000_000_000, reason: 0 },
    { nodeid: 11, pid: 4_000_000_001, reason: 1 },
  ]);
  assert.deepEqual(decodeCpgAddresses(pointer, 0), []);
  assert.deepEqual(decodeCpgAddresses(null, 5), []);
});

Deno.test("decodeCpgRingId() reads nodeid at 0 and the 64-bit seq at 8", () => {
  const bytes = new Uint8Array(16);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, 7, true);
  view.setUint32(4, 0xdeadbeef, true); // padding: must be ignored
  view.setBigUint64(8, 0x1_0000_0002n, true);
  assert.deepEqual(decodeCpgRingId(bytes), { nodeid: 7, seq: 0x1_0000_0002n });
});

Deno.test("CpgError names the call, the cs_error_t and the hint", () => {
  const error = new CpgError("cpg_model_initialize", 2, { hint: "is corosync running?" });
  assert.equal(
    error.message,
    "cpg_model_initialize failed: CS_ERR_LIBRARY (2): is corosync running?",
  );
  assert.equal(error.code, CS_ERR_LIBRARY);
  assert.equal(error.codeName, "CS_ERR_LIBRARY");
  assert.equal(new CpgError("cpg_join", 99).message, "cpg_join failed: cs_error 99 (99)");
});

Deno.test("CpgHandle.open() throws CS_ERR_LIBRARY, asking whether corosync runs, in a namespace without corosync", async () => {
  await withNetns((netns) => {
    assert.throws(() => netns.enter(() => CpgHandle.open(noCallbacks)), (error: unknown) => {
      assert.ok(error instanceof CpgError);
      assert.equal(error.code, CS_ERR_LIBRARY);
      assert.equal(
        error.message,
        "cpg_model_initialize failed: CS_ERR_LIBRARY (2): is corosync running?",
      );
      return true;
    });
  }, { prefix: "clogd-cpg" });
});

Deno.test("CpgHandle works against a real corosync", async (t) => {
  await using corosync = await Corosync.start();

  await t.step(
    "delivers 1000 multicasts of 0 to 64 KiB in order, byte for byte, with our node id",
    async () => {
      const group = "ffi-order";
      const recorder = new StreamRecorder(group);
      using handle = corosync.openCpg(recorder);
      const nodeid = handle.localNodeId();
      assert.equal(nodeid, corosync.nodeid);
      await joinWithRetry(handle, group);
      // The join's confchg and the initial totem confchg come in no fixed order.
      await dispatchUntil(
        handle,
        () => recorder.confchgs.length > 0 && recorder.totemConfchgs.length > 0,
        { timeoutMs: TIMEOUT_MS, what: "our own join and the totem membership" },
      );
      const self = { nodeid, pid: Deno.pid };
      assert.deepEqual(recorder.confchgs[0], {
        group,
        members: [{ ...self, reason: 0 }],
        left: [],
        joined: [{ ...self, reason: CPG_REASON.JOIN }],
      });
      assert.deepEqual(handle.membership(group), [{ ...self, reason: 0 }]);
      // The handle asked for totem confchgs: the current ring, formed by this node, arrives on join.
      assert.equal(recorder.totemConfchgs.length, 1);
      assert.equal(recorder.totemConfchgs[0].ringId.nodeid, nodeid);
      assert.ok(recorder.totemConfchgs[0].ringId.seq > 0n);
      assert.deepEqual(recorder.totemConfchgs[0].members, [nodeid]);

      const tryAgain = await sendMessages(handle, { pid: Deno.pid, count: MESSAGES });
      await dispatchUntil(handle, () => recorder.delivered >= MESSAGES, {
        timeoutMs: TIMEOUT_MS,
        what: `${MESSAGES} deliveries`,
      });
      assert.equal(recorder.delivered, MESSAGES);
      assert.equal(recorder.mismatches(), 0);
      assert.equal(recorder.wrongGroup, 0);
      assert.ok(recorder.order.every((pid) => pid === Deno.pid));
      assert.ok(recorder.nodeids.every((id) => id === nodeid));
      const sizes = Array.from({ length: MESSAGES }, (_, i) => testMessage(Deno.pid, i).byteLength);
      assert.ok(
        sizes.includes(0) && sizes.includes(64 * 1024) && sizes.some((s) => s <= 64 && s > 0),
      );
      console.log(
        `  ${MESSAGES} messages, ${
          sizes.reduce((a, b) => a + b)
        } bytes, ${tryAgain} CS_ERR_TRY_AGAIN`,
      );
      assert.equal(handle.finalize(), CS_OK);
      assert.equal(handle.finalize(), CS_OK, "finalize() is idempotent");
      assert.throws(() => handle.mcast(new Uint8Array(1)), /after finalize/);
    },
  );

  await t.step(
    "a second client's join shows in the first's confchg, and both deliver every message in one total order",
    async () => {
      const group = "ffi-two";
      const recorder = new StreamRecorder(group);
      using handle = corosync.openCpg(recorder);
      await joinWithRetry(handle, group);
      await dispatchUntil(handle, () => recorder.members.length === 1, {
        timeoutMs: TIMEOUT_MS,
        what: "our own join",
      });
      await using child = corosync.spawnDeno(CHILD, [
        "stream",
        "--group",
        group,
        "--count",
        String(MESSAGES),
        "--peers",
        "2",
      ]);
      await dispatchUntil(handle, () => recorder.members.length === 2, {
        timeoutMs: TIMEOUT_MS,
        what: "the child's join",
      });
      const change = recorder.confchgs.at(-1)!;
      assert.deepEqual(change.joined, [{ nodeid: 1, pid: child.pid, reason: CPG_REASON.JOIN }]);
      assert.deepEqual(change.left, []);
      assert.deepEqual(
        change.members.map((m) => m.pid).sort(),
        [Deno.pid, child.pid].sort(),
      );
      await child.waitFor((line) => line.event === "ready", {
        timeoutMs: TIMEOUT_MS,
        what: "ready",
      });

      await sendMessages(handle, { pid: Deno.pid, count: MESSAGES });
      await dispatchUntil(handle, () => recorder.delivered >= 2 * MESSAGES, {
        timeoutMs: TIMEOUT_MS,
        what: `${2 * MESSAGES} deliveries`,
      });
      const done = await child.waitFor((line) => line.event === "done", {
        timeoutMs: TIMEOUT_MS,
        what: "done",
      });
      assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 0, child.stderr);
      assert.equal(recorder.mismatches(), 0);
      assert.equal(done.mismatches, 0);
      assert.deepEqual(Object.fromEntries(recorder.perSender), {
        [Deno.pid]: MESSAGES,
        [child.pid]: MESSAGES,
      });
      // Same senders in the same order, and the same bytes: one total order.
      assert.deepEqual(done.order, recorder.order);
      assert.equal(done.digest, recorder.digest());
      // Informational: how finely corosync interleaved the two concurrent streams.
      const switches = recorder.order.filter((pid, i) => i > 0 && pid !== recorder.order[i - 1]);
      console.log(
        `  total order of ${recorder.delivered} identical on both; ${switches.length} sender switches`,
      );
    },
  );

  // deno_python's approach: collect garbage between native calls and check that what C holds
  // (the callbacks, the send buffer and iovec) still works, and that delivered copies survive.
  // Measured here: Deno 2.9 never frees an UnsafeCallback that was not closed, even once its JS
  // object is collected, so this guards against Deno changing that and against buffers handed
  // to C moving or dying (messages of 1..64 bytes live on the V8 heap).
  await t.step(
    "callbacks held only by the handle keep firing with gc() between every native call",
    async () => {
      await using child = corosync.spawnDeno(
        CHILD,
        ["stream", "--group", "ffi-gc", "--count", "200", "--gc"],
        { v8Flags: ["--expose-gc"] },
      );
      const done = await child.waitFor((line) => line.event === "done", {
        timeoutMs: TIMEOUT_MS,
        what: "done",
      });
      assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 0, child.stderr);
      assert.equal(done.delivered, 200);
      assert.equal(done.mismatches, 0);
      assert.equal(done.foreignNodeids, 0);
      // Two collections per message at least (after the multicast and after the dispatch).
      assert.ok((done.gcCalls as number) >= 400, `gc() ran ${done.gcCalls} times`);
    },
  );

  await t.step(
    "a callback that throws surfaces from dispatch() as CpgCallbackError, and the handle keeps working",
    async () => {
      const group = "ffi-throw";
      const delivered: number[] = [];
      let joined = false;
      using handle = corosync.openCpg({
        onDeliver(_nodeid, _pid, _group, data) {
          delivered.push(data[0]);
          if (data[0] === 2 || data[0] === 5) throw new Error(`Bad message ${data[0]}`);
        },
        onConfchg() {
          joined = true;
        },
      });
      await joinWithRetry(handle, group);
      await dispatchUntil(handle, () => joined, { timeoutMs: TIMEOUT_MS, what: "join" });
      for (let i = 0; i < 8; i++) assert.equal(handle.mcast(new Uint8Array([i])), CS_OK);
      let caught: CpgCallbackError | undefined;
      const deadline = Date.now() + TIMEOUT_MS;
      while (delivered.length < 8 && Date.now() < deadline) {
        await waitReadable(handle, 100);
        try {
          assert.equal(handle.dispatch(), CS_OK);
        } catch (error) {
          assert.ok(error instanceof CpgCallbackError, String(error));
          caught ??= error;
          if (error !== caught) {
            caught = new CpgCallbackError([...caught.errors, ...error.errors], {
              count: caught.count + error.count,
              result: error.result,
            });
          }
        }
      }
      // Every message was delivered, the throwing ones included, and in order.
      assert.deepEqual(delivered, [0, 1, 2, 3, 4, 5, 6, 7]);
      assert.ok(caught !== undefined, "dispatch() must report the callback's exception");
      assert.equal(caught.count, 2);
      assert.deepEqual(caught.errors.map((e) => (e as Error).message), [
        "Bad message 2",
        "Bad message 5",
      ]);
      assert.equal(caught.result, CS_OK);
      assert.equal((caught.cause as Error).message, "Bad message 2");
      // Still usable.
      assert.equal(handle.mcast(new Uint8Array([9])), CS_OK);
      await dispatchUntil(handle, () => delivered.length === 9, {
        timeoutMs: TIMEOUT_MS,
        what: "9",
      });
      assert.equal(delivered[8], 9);
    },
  );

  await t.step(
    "with onError, dispatch() hands callback errors over instead of throwing",
    async () => {
      const group = "ffi-onerror";
      const errors: unknown[] = [];
      let joined = false;
      let delivered = 0;
      using handle = corosync.openCpg({
        onDeliver() {
          delivered++;
          throw new TypeError("boom");
        },
        onConfchg() {
          joined = true;
          throw new RangeError("confchg boom");
        },
        onError: (error) => errors.push(error),
      });
      await joinWithRetry(handle, group);
      await dispatchUntil(handle, () => joined, { timeoutMs: TIMEOUT_MS, what: "join" });
      assert.equal(handle.mcast(new Uint8Array(3)), CS_OK);
      await dispatchUntil(handle, () => delivered === 1, { timeoutMs: TIMEOUT_MS, what: "1" });
      assert.deepEqual(errors.map((e) => (e as Error).message), ["confchg boom", "boom"]);
    },
  );

  await t.step(
    "mcast() sends several parts as one message and refuses more than 1 MiB",
    async () => {
      const got: Uint8Array[] = [];
      let joined = false;
      using handle = corosync.openCpg({
        onDeliver: (_nodeid, _pid, _group, data) => got.push(data),
        onConfchg: () => joined = true,
      });
      await joinWithRetry(handle, "ffi-parts");
      await dispatchUntil(handle, () => joined, { timeoutMs: TIMEOUT_MS, what: "join" });
      const parts = [new Uint8Array([1, 2]), new Uint8Array(0), new Uint8Array([3])];
      assert.equal(handle.mcast(parts), CS_OK);
      // Larger than the first send buffer: it must grow, and the largest allowed size pass.
      const large = new Uint8Array(CPG_MAX_MESSAGE_BYTES).map((_, i) => i % 251);
      assert.equal(handle.mcast(large), CS_OK);
      assert.throws(() => handle.mcast(new Uint8Array(CPG_MAX_MESSAGE_BYTES + 1)), RangeError);
      await dispatchUntil(handle, () => got.length === 2, { timeoutMs: TIMEOUT_MS, what: "2" });
      assert.deepEqual(got[0], new Uint8Array([1, 2, 3]));
      assert.deepEqual(got[1], large);
    },
  );

  await t.step(
    "finalize() inside a callback ends the dispatch with CS_ERR_BAD_HANDLE",
    async () => {
      let joined = false;
      let deliveries = 0;
      const handle = corosync.openCpg({
        onDeliver() {
          deliveries++;
          handle.finalize();
        },
        onConfchg() {
          joined = true;
        },
      });
      await joinWithRetry(handle, "ffi-finalize");
      await dispatchUntil(handle, () => joined, { timeoutMs: TIMEOUT_MS, what: "join" });
      assert.equal(handle.mcast(new Uint8Array(1)), CS_OK);
      assert.equal(handle.mcast(new Uint8Array(1)), CS_OK);
      let result = CS_OK;
      while (!handle.finalized) {
        await waitReadable(handle, 100);
        result = handle.dispatch();
      }
      assert.equal(result, CS_ERR_BAD_HANDLE);
      assert.equal(deliveries, 1, "no callback runs after finalize()");
      assert.throws(() => handle.dispatch(), /after finalize/);
    },
  );

  await t.step("join() after leave() on one handle fails with CS_ERR_EXIST", async () => {
    let members = -1;
    using handle = corosync.openCpg({
      onDeliver() {},
      onConfchg(_group, list) {
        members = list.length;
      },
    });
    await joinWithRetry(handle, "ffi-rejoin");
    await dispatchUntil(handle, () => members === 1, { timeoutMs: TIMEOUT_MS, what: "join" });
    handle.leave("ffi-rejoin");
    await dispatchUntil(handle, () => members === 0, { timeoutMs: TIMEOUT_MS, what: "leave" });
    assert.throws(() => handle.join("ffi-rejoin"), (error: unknown) => {
      assert.ok(error instanceof CpgError);
      assert.equal(error.code, CS_ERR_EXIST);
      assert.match(error.message, /open a new one/);
      return true;
    });
  });

  await t.step(
    "dispatch() says to run Deno with --stack-size=2048 when the stack is too small",
    async () => {
      await using child = corosync.spawnDeno(
        CHILD,
        ["stream", "--group", "ffi-stack", "--count", "1"],
        { defaultStack: true },
      );
      const error = await child.waitFor((line) => line.event === "error", {
        timeoutMs: TIMEOUT_MS,
        what: "the stack error",
      });
      assert.match(String(error.message), /--v8-flags=--stack-size=2048/);
      assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 1);
    },
  );

  await t.step(
    "round trip, send to own delivery, one message in flight (printed, not asserted)",
    async () => {
      await using child = corosync.spawnDeno(CHILD, [
        "rtt",
        "--group",
        "ffi-rtt",
        "--count",
        "2000",
      ]);
      const line = await child.waitFor((l) => l.event === "rtt", {
        timeoutMs: TIMEOUT_MS * 2,
        what: "rtt",
      });
      assert.equal((await child.exit({ timeoutMs: TIMEOUT_MS })).code, 0, child.stderr);
      const poll = line.poll as { count: number; p50Us: number; p99Us: number; meanUs: number };
      const block = line.block as typeof poll;
      assert.equal(poll.count, 2000);
      assert.equal(block.count, 2000);
      console.log(
        `  CPG round trip, 1 node, ${line.size} B, 1 in flight: ` +
          `poll_nb+dispatch p50 ${poll.p50Us} us p99 ${poll.p99Us} us mean ${poll.meanUs} us; ` +
          `blocking dispatch p50 ${block.p50Us} us p99 ${block.p99Us} us mean ${block.meanUs} us`,
      );
    },
  );

  // Last: it kills and restarts corosync.
  await t.step(
    "dispatch() returns CS_ERR_LIBRARY when corosync is SIGKILLed; a new handle works after a restart",
    async () => {
      let joined = false;
      const handle = corosync.openCpg({
        onDeliver() {},
        onConfchg() {
          joined = true;
        },
      });
      await joinWithRetry(handle, "ffi-kill");
      await dispatchUntil(handle, () => joined, { timeoutMs: TIMEOUT_MS, what: "join" });
      const status = await corosync.kill("SIGKILL");
      assert.equal(status.signal, "SIGKILL");
      const revents = await waitReadable(handle, TIMEOUT_MS);
      assert.notEqual(revents, 0, "the CPG fd must wake the poll when corosync dies");
      assert.equal(handle.dispatch(), CS_ERR_LIBRARY);
      assert.equal(handle.mcast(new Uint8Array(1)), CS_ERR_LIBRARY);
      const finalized = handle.finalize();
      assert.ok(finalized === CS_OK || finalized === CS_ERR_LIBRARY, `finalize: ${finalized}`);
      assert.throws(() => corosync.openCpg(noCallbacks), (error: unknown) => {
        assert.ok(error instanceof CpgError);
        assert.equal(error.code, CS_ERR_LIBRARY);
        return true;
      });

      await corosync.restart();
      const recorder = new StreamRecorder("ffi-kill");
      using again = corosync.openCpg(recorder);
      await joinWithRetry(again, "ffi-kill");
      await sendMessages(again, { pid: Deno.pid, count: 3 });
      await dispatchUntil(again, () => recorder.delivered === 3, {
        timeoutMs: TIMEOUT_MS,
        what: "3",
      });
      assert.equal(recorder.mismatches(), 0);
      assert.equal(again.localNodeId(), corosync.nodeid);
    },
  );
});

Deno.test("Corosync.stop() after a SIGKILL removes its namespace, directory and /dev/shm files, and no one else's", async () => {
  const corosync = await Corosync.start();
  const decoy = `/dev/shm/qb-corosync-4000000${Deno.pid % 1000}-blackbox-data`;
  try {
    const pid = corosync.pid!;
    await corosync.kill("SIGKILL");
    const ours = () =>
      [...Deno.readDirSync("/dev/shm")].map((e) => e.name).filter((n) => n.includes(`-${pid}-`));
    assert.ok(ours().length > 0, "a SIGKILLed corosync leaves its qb files");
    // Made after the start, but another instance's by its pid: must survive.
    Deno.writeTextFileSync(decoy, "");
    await corosync.stop();
    assert.deepEqual(ours(), []);
    assert.ok(Deno.statSync(decoy).isFile);
    assert.throws(() => Deno.statSync(corosync.dir), Deno.errors.NotFound);
    const { stdout } = await new Deno.Command("ip", { args: ["netns", "list"] }).output();
    assert.ok(!new TextDecoder().decode(stdout).includes(corosync.netns.name));
  } finally {
    await corosync.stop();
    Deno.removeSync(decoy);
  }
});
