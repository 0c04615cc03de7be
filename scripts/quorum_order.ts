/**
 * The experiment behind src/bus/cpg.ts's quorum gate: is corosync's quorum already decided for
 * the membership a CPG confchg reports, when the confchg is read? Root, corosync installed:
 *
 *     deno run -A --v8-flags=--stack-size=2048 scripts/quorum_order.ts [--nodes 5] \
 *       [--minority 2] [--rounds 4] [--token 300]
 *
 * Brings up a cluster (tests/support/cluster.ts, votequorum expecting every node), runs
 * tests/support/quorum_probe.ts on every node, then `--rounds` times cuts nodes
 * 1..`--minority` off the others (nftables in their namespaces, both directions) and heals,
 * and prints the probes' findings ({@link orderFindings}) as JSON: how often
 * `quorum_getquorate`, asked inside a NODEDOWN/NODEUP confchg callback, agreed with the verdict
 * corosync later sent for that confchg's ring, and how often that ring got no verdict at all
 * (and what `quorum_getquorate` said then). `--lines` prints every probe line too.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { Cluster, REPO } from "../tests/support/cluster.ts";
import { DenoChild } from "../tests/support/corosync.ts";
import { orderFindings } from "../tests/support/quorum_probe.ts";

/** Longest wait for a probe to be ready or for a split to be seen, in ms. */
const WAIT_MS = 30_000;
/** Time each split and each healed state is kept, in ms. */
const HOLD_MS = 1_500;
/** nftables table of the split. */
const TABLE = "clogd_quorum_order";

async function nft(cluster: Cluster, id: number, rules: string | null): Promise<void> {
  const args = rules === null ? ["nft", "delete", "table", "inet", TABLE] : ["nft", "-f", "-"];
  const child = new Deno.Command("ip", {
    args: ["netns", "exec", cluster.node(id).netns.name, ...args],
    stdin: "piped",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  if (rules !== null) await writer.write(new TextEncoder().encode(rules));
  await writer.close();
  const { code, stderr } = await child.output();
  if (code !== 0) throw new Error(`nft on node ${id}: ${new TextDecoder().decode(stderr)}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      nodes: { type: "string", default: "5" },
      minority: { type: "string", default: "2" },
      rounds: { type: "string", default: "4" },
      token: { type: "string", default: "300" },
      lines: { type: "boolean", default: false },
    },
  });
  const nodes = Number(values.nodes);
  const minority = Number(values.minority);
  if (!(minority >= 1 && minority * 2 < nodes)) {
    throw new RangeError("Need 1 <= minority < nodes/2");
  }
  const cluster = await Cluster.start({
    nodes,
    quorum: "majority",
    tokenMs: Number(values.token),
    name: `clogd-qo${Deno.pid}`,
  });
  const probes: DenoChild[] = [];
  try {
    for (const node of cluster.nodes) {
      probes.push(
        new DenoChild(node.netns.spawn([
          Deno.execPath(),
          "run",
          "--allow-all",
          "--v8-flags=--stack-size=2048",
          `${REPO}tests/support/quorum_probe.ts`,
          "clogd-quorum-order",
        ])),
      );
    }
    for (const probe of probes) {
      await probe.waitFor((l) => l.event === "ready", { timeoutMs: WAIT_MS, what: "ready" });
    }
    const others = cluster.nodes.slice(minority).map((n) => n.address).join(", ");
    const rules = [
      `table inet ${TABLE} {`,
      `  chain input { type filter hook input priority -10; ip saddr { ${others} } drop; }`,
      `  chain output { type filter hook output priority -10; ip daddr { ${others} } drop; }`,
      "}",
      "",
    ].join("\n");
    const cut = Array.from({ length: minority }, (_, i) => i + 1);
    for (let round = 0; round < Number(values.rounds); round++) {
      const from = probes[0].lines.length;
      for (const id of cut) await nft(cluster, id, rules);
      await probes[0].waitFor(
        (l) => l.event === "quorum" && l.quorate === false && probes[0].lines.indexOf(l) >= from,
        { timeoutMs: WAIT_MS, what: "node 1 losing quorum" },
      ).catch((error) => console.error(`round ${round}: ${error.message.slice(0, 200)}`));
      await new Promise((resolve) => setTimeout(resolve, HOLD_MS));
      for (const id of cut) await nft(cluster, id, null);
      await new Promise((resolve) => setTimeout(resolve, 2 * HOLD_MS));
    }
    // Read what is left of the probes' output.
    for (const probe of probes) {
      await probe.waitFor(() => false, { timeoutMs: 500 }).catch(() => {});
    }
    if (values.lines) {
      for (const [i, probe] of probes.entries()) {
        for (const line of probe.lines) console.log(JSON.stringify({ node: i + 1, ...line }));
      }
    }
    console.log(JSON.stringify({
      nodes,
      minority,
      rounds: Number(values.rounds),
      tokenMs: Number(values.token),
      findings: orderFindings(probes.map((p) => p.lines), { nodes }),
    }));
  } finally {
    for (const probe of probes) probe.kill();
    await cluster.close();
  }
}

if (import.meta.main) await main();
