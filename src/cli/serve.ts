/**
 * `clogd serve`: run the daemon in the foreground.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { DEFAULT_CONTROL_PATH } from "../control.ts";
import { type Level, LEVELS } from "../logger.ts";
import { runDaemon } from "../daemon.ts";
import { DEFAULT_GROUP } from "../bus/transport.ts";
import { CPG_MAX_NAME_LENGTH } from "../../ffi/cpg.ts";

const HELP = `Usage: clogd serve [--standalone | --cluster] [--group NAME] [--accept-user-peers]
                   [--log-level L] [--control PATH] [--layout auto|current|2009] [--pidfile PATH]

Runs the daemon in the foreground, serving device-mapper's "userspace" dirty log over the
NETLINK_CONNECTOR socket (connector 7/1). Logs go to stderr (journal-friendly).

Mode: by default clogd joins the cluster through the local corosync (CPG group "clogd") and keeps
every log coherent with the other nodes' daemons. If corosync does not answer it refuses to start
(exit 7) rather than order shared logs alone.
  --standalone          serve the logs on this node alone (no corosync): only for mirrors no other
                        node activates
  --cluster             require corosync (the default, said explicitly)
  --group NAME          CPG group name, the same on every node (default "${DEFAULT_GROUP}")

Options:
  --accept-user-peers   also accept requests from netlink senders other than the kernel (port id
                        0): for the kernel simulator in tests, demos and benchmarks. Off by default.
  --log-level L         error, warn, info (default) or debug
  --control PATH        control socket for "clogd status" (default ${DEFAULT_CONTROL_PATH},
                        env CLOGD_CONTROL)
  --layout MODE         request header layout: auto (default; detected per message), current
                        (160-byte header with luid, kernels since 2.6.31+) or 2009 (152-byte header)
  --pidfile PATH        write the daemon's pid here (default /run/clogd/clogd.pid; "" for none)
  -h, --help            show this text

Environment: CLOGD_LIBCPG overrides the path of libcpg (default libcpg.so.4).

Signals: SIGTERM/SIGINT exit cleanly when no log is resumed (with resumed logs, a second signal
within 10 s forces the exit); SIGUSR2 writes every log's state to the log. SIGUSR1 is ignored:
Deno >= 2.9.2 opens a V8 inspector on 127.0.0.1:9229 on SIGUSR1 (code execution as root).
`;

/** Runs the serve command; returns the exit code. */
export async function serveCommand(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        standalone: { type: "boolean", default: false },
        cluster: { type: "boolean", default: false },
        group: { type: "string", default: DEFAULT_GROUP },
        "accept-user-peers": { type: "boolean", default: false },
        "log-level": { type: "string", default: "info" },
        control: { type: "string" },
        layout: { type: "string", default: "auto" },
        pidfile: { type: "string", default: "/run/clogd/clogd.pid" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
    }));
  } catch (err) {
    console.error(`clogd serve: ${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const level = values["log-level"] as Level;
  if (!LEVELS.includes(level)) {
    console.error(`clogd serve: --log-level must be one of ${LEVELS.join(", ")}`);
    return 2;
  }
  const layout = values.layout;
  if (layout !== "auto" && layout !== "current" && layout !== "2009") {
    console.error(`clogd serve: --layout must be auto, current or 2009`);
    return 2;
  }
  if (values.standalone && values.cluster) {
    console.error("clogd serve: --standalone and --cluster exclude each other");
    return 2;
  }
  if (values.group === "" || new TextEncoder().encode(values.group).length > CPG_MAX_NAME_LENGTH) {
    console.error(`clogd serve: --group must be 1..${CPG_MAX_NAME_LENGTH} bytes`);
    return 2;
  }
  return await runDaemon({
    mode: values.standalone ? "standalone" : values.cluster ? "cluster" : "auto",
    group: values.group,
    acceptUserPeers: values["accept-user-peers"],
    logLevel: level,
    controlPath: values.control ?? Deno.env.get("CLOGD_CONTROL") ?? DEFAULT_CONTROL_PATH,
    layout,
    pidfile: values.pidfile === "" ? null : values.pidfile,
  });
}
