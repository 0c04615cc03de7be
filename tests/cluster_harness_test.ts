/**
 * The cluster harness (tests/support/cluster.ts) on real parts: corosyncs in network
 * namespaces, their memberships as corosync itself reports them, every fault primitive, clogd
 * and kernel simulators per node, and cleanup (also after an owner that crashed).
 *
 * clogd's mode in the daemon test: {@link MODE}; switch it to "cluster" once cluster mode is
 * the tested default (CLOGD_HARNESS_MODE=cluster does it for one run).
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  cleanupClusterDir,
  type ClogdMode,
  Cluster,
  type FaultTiming,
  REPO,
} from "./support/cluster.ts";

/** clogd's mode in the daemon test. */
const MODE = (Deno.env.get("CLOGD_HARNESS_MODE") ?? "standalone") as ClogdMode;

/** Upper bound of corosync's failure detection with the harness's token (~0.65 s measured). */
const DETECTION_BOUND_MS = 5_000;

function sorted(ids: readonly number[] | undefined): number[] {
  return [...(ids ?? [])].sort((a, b) => a - b);
}

/** Node ids corosync-quorumtool lists inside node `id`'s namespace. */
async function quorumMembers(cluster: Cluster, id: number): Promise<number[]> {
  const { code, stdout, stderr } = await cluster.exec(id, ["corosync-quorumtool", "-l"]);
  assert.equal(code, 0, `corosync-quorumtool on node ${id}: ${stderr}`);
  const ids = [...stdout.matchAll(/^\s+(\d+)\s+\d+\s+node\d+/gm)].map((m) => Number(m[1]));
  return sorted(ids);
}

function listNamespaces(): string[] {
  try {
    return [...Deno.readDirSync("/run/netns")].map((e) => e.name);
  } catch {
    return [];
  }
}

function assertDetected(timing: FaultTiming, observers: number[]): void {
  assert.deepEqual(sorted(Object.keys(timing.detectedMs).map(Number)), observers);
  for (const ms of Object.values(timing.detectedMs)) {
    assert.ok(ms >= 0 && ms < DETECTION_BOUND_MS, `${timing.kind} observed after ${ms} ms`);
  }
}

function printTimings(faults: readonly FaultTiming[]): void {
  for (const f of faults) {
    console.log(`  ${f.kind}(${f.node}): ${JSON.stringify(f.detectedMs)} max ${f.maxMs} ms`);
  }
}

Deno.test("Cluster.start() forms one corosync membership of 3 nodes that every fault changes as injected", async (t) => {
  const cluster = await Cluster.start({ nodes: 3, maxNodes: 4 });
  try {
    await t.step("3 nodes, one membership", async () => {
      for (const node of cluster.nodes) assert.deepEqual(sorted(node.view), [1, 2, 3]);
      for (const id of [1, 2, 3]) assert.deepEqual(await quorumMembers(cluster, id), [1, 2, 3]);
      assert.equal(new Set(cluster.namespaces).size, 4);
    });

    await t.step(
      "killCorosync(3) is seen by 1 and 2 and leaves no shm; startCorosync(3) rejoins",
      async () => {
        const pid = cluster.node(3).corosync.pid!;
        const killed = await cluster.killCorosync(3);
        assertDetected(killed, [1, 2]);
        assert.deepEqual(sorted(cluster.node(1).view), [1, 2]);
        assert.deepEqual(await quorumMembers(cluster, 2), [1, 2]);
        const shm = [...Deno.readDirSync("/dev/shm")].map((e) => e.name)
          .filter((name) => name.startsWith("qb-") && name.split("-").includes(String(pid)));
        assert.deepEqual(shm, []);
        const started = await cluster.startCorosync(3);
        assertDetected(started, [1, 2, 3]);
        assert.deepEqual(await quorumMembers(cluster, 1), [1, 2, 3]);
      },
    );

    await t.step("partition(2) splits {1,3} from {2}; heal(2) merges them", async () => {
      const cut = await cluster.partition(2);
      assertDetected(cut, [1, 2, 3]);
      assert.deepEqual(sorted(cluster.node(1).view), [1, 3]);
      assert.deepEqual(sorted(cluster.node(2).view), [2]);
      assert.deepEqual(await quorumMembers(cluster, 2), [2]);
      const healed = await cluster.heal(2);
      assertDetected(healed, [1, 2, 3]);
      assert.deepEqual(await quorumMembers(cluster, 2), [1, 2, 3]);
    });

    await t.step("stopNode(1) is seen by 2 and 3; startNode(1) rejoins", async () => {
      const stopped = await cluster.stopNode(1);
      assertDetected(stopped, [2, 3]);
      assert.equal(cluster.node(1).corosyncUp, false);
      assert.deepEqual(await quorumMembers(cluster, 3), [2, 3]);
      const started = await cluster.startNode(1);
      assertDetected(started, [1, 2, 3]);
    });

    await t.step("addNode() brings up spare node 4; no spare is left after it", async () => {
      const added = await cluster.addNode();
      assert.equal(added.node, 4);
      assertDetected(added, [1, 2, 3, 4]);
      assert.deepEqual(await quorumMembers(cluster, 4), [1, 2, 3, 4]);
      await assert.rejects(() => cluster.addNode(), RangeError);
    });
    console.log("detection times (token 300, token_coefficient 0, knet):");
    printTimings(cluster.faults);
  } finally {
    await cluster.close();
  }
  const left = cluster.leftovers();
  assert.deepEqual(left, { namespaces: [], pids: [], shm: [] });
  const existing = listNamespaces();
  assert.deepEqual(existing.filter((name) => name.startsWith(`${cluster.name}-`)), []);
  assert.equal(cluster.pids.size >= 8, true, "corosyncs and monitors were started and tracked");
  await assert.rejects(() => Deno.stat(cluster.dir), Deno.errors.NotFound);
});

Deno.test(`Cluster runs clogd (${MODE}) and a kernel simulator per node, and kills and restarts daemons`, async () => {
  const cluster = await Cluster.start({ nodes: 2, clogd: true, mode: MODE });
  try {
    const loads = cluster.nodes.map((node) =>
      cluster.startLoad(node.id, { durationS: 2, logs: 2 })
    );
    for (const load of loads) {
      const { code, report } = await load.report();
      assert.equal(code, 0, JSON.stringify(report.violations));
      assert.equal(report.violations.total, 0);
      assert.ok(report.requests.sent > 100, `only ${report.requests.sent} requests`);
      assert.equal(report.requests.replied, report.requests.sent);
      assert.equal(report.requests.outstanding, 0);
    }
    const before = await cluster.statusOf(2);
    // Cluster mode reports itself as "corosync" (its bus), standalone as "standalone".
    assert.equal(before.mode === "standalone", MODE === "standalone", before.mode);
    assert.equal(before.nodeId, MODE === "cluster" ? 2 : before.nodeId);
    const killed = await cluster.killDaemon(2);
    assert.equal(cluster.node(2).clogd, undefined);
    await assert.rejects(() => cluster.statusOf(2));
    assert.ok(killed.at > 0);
    await cluster.restartDaemon(2);
    const after = await cluster.statusOf(2);
    assert.notEqual(after.pid, before.pid);
    const stopped = await cluster.stopNode(2);
    assertDetected(stopped, [1]);
    assert.equal(cluster.node(2).clogd, undefined);
    assert.equal((await cluster.statusOf(1)).pid, cluster.node(1).clogd?.pid);
  } finally {
    await cluster.close();
  }
  assert.deepEqual(cluster.leftovers(), { namespaces: [], pids: [], shm: [] });
});

/** Starts a 1-node cluster in a child process that then ends as `how` says, without close(). */
async function orphanCluster(how: "exit" | "sigkill"): Promise<{ dir: string; names: string[] }> {
  const dir = await Deno.makeTempDir({ prefix: "clogd-cluster-orphan-" });
  await Deno.remove(dir);
  const code = `
    import { Cluster } from "${REPO}tests/support/cluster.ts";
    const c = await Cluster.start({ nodes: 1, dir: ${JSON.stringify(dir)} });
    console.log(JSON.stringify(c.namespaces));
    if (${JSON.stringify(how)} === "exit") Deno.exit(1);
    await new Promise(() => {});
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--v8-flags=--stack-size=2048", code],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  if (how === "sigkill") child.kill("SIGKILL");
  const status = await child.status;
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
  assert.ok(text.includes("\n"), `The child printed no namespaces: ${stderr}`);
  assert.equal(status.success, false);
  return { dir, names: JSON.parse(text) };
}

Deno.test("Cluster's exit hook cleans up when its process exits without close()", async () => {
  const shmBefore = new Set([...Deno.readDirSync("/dev/shm")].map((e) => e.name));
  const { dir, names } = await orphanCluster("exit");
  assert.equal(names.length, 2);
  const existing = listNamespaces();
  assert.deepEqual(names.filter((name) => existing.includes(name)), []);
  await assert.rejects(() => Deno.stat(dir), Deno.errors.NotFound);
  // corosync's client connections (libqb directories) are gone too.
  const shm = [...Deno.readDirSync("/dev/shm")].map((e) => e.name).filter((name) =>
    name.startsWith("qb-") && !shmBefore.has(name)
  );
  assert.deepEqual(shm, []);
});

Deno.test("cleanupClusterDir() cleans up after an owner killed with SIGKILL", async () => {
  const { dir, names } = await orphanCluster("sigkill");
  const manifest = JSON.parse(await Deno.readTextFile(`${dir}/manifest.json`));
  assert.equal(names.every((name) => listNamespaces().includes(name)), true, "orphans exist");
  await cleanupClusterDir(dir);
  const existing = listNamespaces();
  assert.deepEqual(names.filter((name) => existing.includes(name)), []);
  const shm = [...Deno.readDirSync("/dev/shm")].map((e) => e.name).filter((name) =>
    name.startsWith("qb-") &&
    name.split("-").some((field) => manifest.corosyncPids.includes(Number(field)))
  );
  assert.deepEqual(shm, []);
  for (const pid of manifest.pids as number[]) {
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`).catch(() => "");
    // Gone, or a zombie waiting for init to reap it.
    assert.ok(stat === "" || stat.slice(stat.lastIndexOf(")") + 2)[0] === "Z", `pid ${pid} runs`);
  }
  await assert.rejects(() => Deno.stat(dir), Deno.errors.NotFound);
});
