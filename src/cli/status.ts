/**
 * `clogd status [--json] [--control PATH]`: the state of every log of a running daemon.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { controlRequest, DEFAULT_CONTROL_PATH } from "../control.ts";
import type { LogStatus } from "../node.ts";
import type { QuorumState } from "../bus/cpg.ts";

const HELP = `Usage: clogd status [--json] [--control PATH]

Asks a running clogd (over its unix control socket) for its mode and node id, and for every log:
uuid, luid, type, region size and count, sync count, clean count, outstanding marks, state, the
cluster members holding it, the disk writer (clustered-disk), and the digest of the replicated
state (equal on every member once traffic settles: compare it across nodes).

Options:
  --json          print the daemon's answer as JSON
  --control PATH  control socket (default ${DEFAULT_CONTROL_PATH}, env CLOGD_CONTROL)
  -h, --help      show this text
`;

/** The daemon's answer to a status request. */
export interface DaemonStatus {
  pid: number;
  mode: string;
  nodeId: number;
  /** True while this node is a member of the group (standalone: always). */
  connected: boolean;
  uptimeSeconds: number;
  logs: LogStatus[];
  kernelLink: Record<string, number>;
  loop: Record<string, number | boolean>;
  node: Record<string, number>;
  cluster: Record<string, number>;
  transport: Record<string, number>;
  /** corosync's quorum as this node sees it (null standalone). */
  quorum: QuorumState | null;
}

/** Runs the status command; returns the exit code. */
export async function statusCommand(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        json: { type: "boolean", default: false },
        control: { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
    }));
  } catch (err) {
    console.error(`clogd status: ${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const path = values.control ?? Deno.env.get("CLOGD_CONTROL") ?? DEFAULT_CONTROL_PATH;
  let answer: DaemonStatus;
  try {
    answer = await controlRequest(path, { cmd: "status" }) as DaemonStatus;
  } catch (err) {
    console.error(`clogd status: ${(err as Error).message}`);
    return 1;
  }
  if (values.json) {
    console.log(JSON.stringify(answer, null, 2));
    return 0;
  }
  console.log(formatStatus(answer));
  return 0;
}

/** Human-readable status table. */
export function formatStatus(s: DaemonStatus): string {
  const lines = [
    `clogd pid ${s.pid}, ${s.mode} mode, node ${s.nodeId}${
      s.connected ? "" : " (NOT CONNECTED to the cluster)"
    }, up ${s.uptimeSeconds.toFixed(0)} s, ${s.logs.length} log(s)`,
  ];
  if (s.quorum !== null) {
    lines.push(
      `quorum: ${
        s.quorum.quorate ? "quorate" : "NOT QUORATE (not serving)"
      }, provider ${s.quorum.provider}` +
        (s.quorum.ring !== null ? `, ring ${s.quorum.ring} [${s.quorum.members.join(",")}]` : ""),
    );
  }
  for (const l of s.logs) {
    lines.push(
      `  ${l.uuid} luid ${l.luid} ${l.type}${l.device ? ` ${l.device}` : ""} ${l.state}${
        l.diskFailed ? " DISK-FAILED" : ""
      }`,
      `    regions ${l.regionCount} x ${l.regionSize} sectors, in sync ${l.syncCount}, clean ${l.cleanCount}, outstanding marks ${l.outstandingMarks}`,
      `    cluster: ${l.cluster}, members [${l.members.join(",")}]${
        l.writer !== null ? `, disk writer node ${l.writer}` : ""
      }, digest ${l.digest ?? "-"}`,
    );
  }
  return lines.join("\n");
}
