/**
 * The daemon: wires the netlink kernel link, the event loop, the ordered bus, the node, the
 * disk logs and the control socket together, and handles signals.
 *
 * @module
 */

import { type Level, Logger } from "./logger.ts";
import { NetlinkSocket } from "./kernel/netlink.ts";
import { EventLoop } from "./loop.ts";
import { KernelLink } from "./kernel/link.ts";
import type { LayoutMode } from "./kernel/codec.ts";
import { LocalTransport } from "./bus/local.ts";
import { CONNECT_TRY_AGAIN_LIMIT_MS, CpgTransport } from "./bus/cpg.ts";
import { CS_ERR_TRY_AGAIN, CsError } from "../ffi/cpg.ts";
import type { ClusterTransport } from "./bus/transport.ts";
import { Node } from "./node.ts";
import { ControlServer } from "./control.ts";
import { openDiskLog } from "./disk_open.ts";

/** Daemon options (from `clogd serve`). */
export interface DaemonOptions {
  /**
   * "cluster": order every log over corosync CPG (corosync must be running); "standalone": this
   * node alone orders its logs; "auto": cluster when corosync answers, else refuse to start.
   */
  mode: "standalone" | "cluster" | "auto";
  /** CPG group name (every node of the cluster must use the same). */
  group: string;
  acceptUserPeers: boolean;
  logLevel: Level;
  controlPath: string;
  layout: LayoutMode;
  pidfile: string | null;
}

/** A second SIGTERM/SIGINT within this window exits even with resumed logs. */
export const FORCE_EXIT_WINDOW_MS = 10_000;

/** Exit codes (documented in the README). */
export const ExitCode = {
  OK: 0,
  USAGE: 2,
  NETLINK: 3,
  CONTROL: 4,
  PIDFILE: 5,
  INTERNAL: 6,
  CLUSTER: 7,
} as const;

/** Run the daemon until told to stop; returns the exit code. */
export async function runDaemon(opts: DaemonOptions): Promise<number> {
  const log = new Logger(opts.logLevel);
  const started = Date.now();
  const loop = new EventLoop();
  const transport = await openTransport(opts, loop, log);
  if (transport === null) {
    loop.close();
    return ExitCode.CLUSTER;
  }

  let sock: NetlinkSocket;
  try {
    sock = new NetlinkSocket({ role: "daemon" });
  } catch (err) {
    log.error(`Cannot open the netlink connector socket: ${(err as Error).message}`);
    transport.close();
    loop.close();
    return ExitCode.NETLINK;
  }
  log.info(
    `Listening on NETLINK_CONNECTOR group 7 (port id ${sock.portId}), header layout ${opts.layout}${
      opts.acceptUserPeers ? ", accepting user-space peers" : ""
    }`,
  );

  let retryTimer: ReturnType<typeof setTimeout> | null = null;
  // deno-lint-ignore prefer-const
  let link: KernelLink;
  const scheduleOutboxRetry = () => {
    if (retryTimer !== null || !link.backlogged) return;
    retryTimer = setTimeout(() => {
      retryTimer = null;
      link.flushOutbox();
      scheduleOutboxRetry();
    }, 1);
  };
  const node = new Node({
    transport,
    logger: log,
    io: {
      reply: (request, reply) => {
        link.reply(request, reply);
        scheduleOutboxRetry();
      },
      openDisk: openDiskLog,
    },
  });
  link = new KernelLink({
    recv: (buf) => sock.recv(buf),
    send: (bytes, to) => sock.send(bytes, { portId: to.portId }),
  }, {
    layout: opts.layout,
    acceptUserPeers: opts.acceptUserPeers,
    logger: log,
    onRequest: (r) => node.handle(r),
  });
  loop.watch(sock.fd, () => {
    link.drain();
  });
  // Batch what this turn's requests queued into cluster messages before the next poll, and
  // (standalone) deliver them: replies go out in the same turn.
  loop.onTurn(() => {
    node.flush();
    if (transport instanceof LocalTransport) transport.flush();
  });
  node.start();

  const statusOf = () => ({
    pid: Deno.pid,
    mode: node.mode,
    nodeId: node.nodeId,
    connected: node.connected,
    uptimeSeconds: (Date.now() - started) / 1000,
    logs: node.status(),
    kernelLink: { ...link.stats, ...sock.stats },
    loop: { ...loop.stats },
    node: { ...node.stats, pending: node.pendingCount },
    cluster: { ...node.clusterStats },
    transport: transport.stats(),
    quorum: transport instanceof CpgTransport ? transport.quorumState : null,
  });

  let control: ControlServer;
  try {
    control = ControlServer.start(opts.controlPath, () => statusOf());
  } catch (err) {
    log.error(`Cannot listen on control socket ${opts.controlPath}: ${(err as Error).message}`);
    sock.close();
    transport.close();
    return ExitCode.CONTROL;
  }

  if (opts.pidfile !== null) {
    try {
      const dir = opts.pidfile.slice(0, opts.pidfile.lastIndexOf("/"));
      if (dir !== "") Deno.mkdirSync(dir, { recursive: true });
      Deno.writeTextFileSync(opts.pidfile, `${Deno.pid}\n`);
    } catch (err) {
      log.error(`Cannot write pidfile ${opts.pidfile}: ${(err as Error).message}`);
      await control.close();
      sock.close();
      transport.close();
      return ExitCode.PIDFILE;
    }
  }

  let lastTerm = 0;
  const onTerminate = (sig: string) => {
    const active = node.activeLogCount;
    const now = Date.now();
    if (active > 0 && now - lastTerm > FORCE_EXIT_WINDOW_MS) {
      lastTerm = now;
      log.warn(
        `${sig}: ${active} log(s) still resumed; not exiting (their I/O would stall until clogd returns). ` +
          `Send ${sig} again within ${FORCE_EXIT_WINDOW_MS / 1000} s to exit anyway.`,
      );
      return;
    }
    log.info(`${sig}: shutting down`);
    loop.stop();
  };
  const onDump = () => {
    const s = statusOf();
    log.info(
      `State dump (SIGUSR2): ${s.logs.length} log(s), ${node.pendingCount} pending, link ${
        JSON.stringify(s.kernelLink)
      }`,
    );
    for (const l of s.logs) log.info(`  ${JSON.stringify(l)}`);
  };
  const removeSignals = loop.installSignals({ onTerminate, onDump });

  let code: number = ExitCode.OK;
  try {
    await loop.run();
  } catch (err) {
    log.error(`Event loop failed: ${(err as Error).stack ?? err}`);
    code = ExitCode.INTERNAL;
  }
  removeSignals();
  if (retryTimer !== null) clearTimeout(retryTimer);
  await node.close();
  await control.close();
  sock.close();
  loop.close();
  if (opts.pidfile !== null) {
    try {
      Deno.removeSync(opts.pidfile);
    } catch { /* gone */ }
  }
  log.info(`clogd ${Deno.pid} stopped`);
  return code;
}

/**
 * The transport for `opts.mode`, or null (logged) when the daemon must not start. A node that
 * shares mirrors with others must never order its logs alone: their states would diverge and a
 * region another node writes could be reported clean. So without --standalone, a corosync that
 * does not answer is an error, not a reason to fall back.
 */
async function openTransport(
  opts: DaemonOptions,
  loop: EventLoop,
  log: Logger,
): Promise<ClusterTransport | null> {
  if (opts.mode === "standalone") {
    let corosync = false;
    try {
      CpgTransport.connect({ loop, group: opts.group, logger: log }).close();
      corosync = true;
    } catch { /* not running: as expected */ }
    log.info(
      `clogd ${Deno.pid} starting in standalone mode (--standalone given: this node alone orders its logs)`,
    );
    if (corosync) {
      log.warn(
        "corosync is running on this node, yet --standalone was given: these logs are NOT " +
          "coordinated with any other node; never activate a mirror served this way on two nodes",
      );
    }
    return new LocalTransport(1);
  }
  try {
    let retries = 0;
    const t = await CpgTransport.connectPatiently({ loop, group: opts.group, logger: log }, {
      onRetry: (error, attempt) => {
        retries = attempt;
        const text = `corosync is busy (${error.message}); trying again for up to ${
          CONNECT_TRY_AGAIN_LIMIT_MS / 1000
        } s`;
        if (attempt === 1) log.info(text);
        else log.debug(text);
      },
    });
    if (retries > 0) log.info(`corosync took the connection after ${retries + 1} attempts`);
    log.info(
      `clogd ${Deno.pid} starting in cluster mode: corosync answered, node id ${t.nodeId}, ` +
        `CPG group "${opts.group}"${opts.mode === "auto" ? " (default when corosync runs)" : ""}`,
    );
    return t;
  } catch (err) {
    log.error(
      `Cluster mode needs corosync, which did not answer${
        err instanceof CsError && err.code === CS_ERR_TRY_AGAIN
          ? ` within ${CONNECT_TRY_AGAIN_LIMIT_MS / 1000} s`
          : ""
      }: ${(err as Error).message}. ` +
        "Start corosync (systemctl start corosync), or pass --standalone if no other node " +
        "shares this node's mirrors",
    );
    return null;
  }
}
