/**
 * `clogd serve`: run the daemon in the foreground.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { DEFAULT_CONTROL_PATH } from "../control.ts";
import { type Level, LEVELS } from "../logger.ts";
import { runDaemon } from "../daemon.ts";

const HELP =
  `Usage: clogd serve [--standalone] [--accept-user-peers] [--log-level L] [--control PATH]
                   [--layout auto|current|2009] [--pidfile PATH]

Runs the daemon in the foreground, serving device-mapper's "userspace" dirty log over the
NETLINK_CONNECTOR socket (connector 7/1). Logs go to stderr (journal-friendly).

Options:
  --standalone          serve the logs on this node alone (in-process ordered bus). Cluster mode
                        (corosync CPG) is not in this build yet, so this flag is required.
  --accept-user-peers   also accept requests from netlink senders other than the kernel (port id
                        0): for the kernel simulator in tests, demos and benchmarks. Off by default.
  --log-level L         error, warn, info (default) or debug
  --control PATH        control socket for "clogd status" (default ${DEFAULT_CONTROL_PATH},
                        env CLOGD_CONTROL)
  --layout MODE         request header layout: auto (default; detected per message), current
                        (160-byte header with luid, kernels since 2.6.31+) or 2009 (152-byte header)
  --pidfile PATH        write the daemon's pid here (default /run/clogd/clogd.pid; "" for none)
  -h, --help            show this text

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
  if (!values.standalone) {
    console.error(
      "clogd serve: cluster mode (corosync CPG) is not available in this build; " +
        "pass --standalone to serve logs on this node alone. Never run standalone on nodes " +
        "that share a mirror: their logs would diverge.",
    );
    return 2;
  }
  return await runDaemon({
    mode: "standalone",
    acceptUserPeers: values["accept-user-peers"],
    logLevel: level,
    controlPath: values.control ?? Deno.env.get("CLOGD_CONTROL") ?? DEFAULT_CONTROL_PATH,
    layout,
    pidfile: values.pidfile === "" ? null : values.pidfile,
  });
}
