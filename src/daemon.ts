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
import { LocalBus } from "./bus/local.ts";
import { Node } from "./node.ts";
import { ControlServer } from "./control.ts";
import { openDiskLog } from "./disk_open.ts";

/** Daemon options (from `clogd serve`). */
export interface DaemonOptions {
  mode: "standalone";
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
} as const;

/** Run the daemon until told to stop; returns the exit code. */
export async function runDaemon(opts: DaemonOptions): Promise<number> {
  const log = new Logger(opts.logLevel);
  const started = Date.now();
  log.info(
    `clogd ${Deno.pid} starting in standalone mode (--standalone given: this node alone orders its logs)`,
  );

  let sock: NetlinkSocket;
  try {
    sock = new NetlinkSocket({ role: "daemon" });
  } catch (err) {
    log.error(`Cannot open the netlink connector socket: ${(err as Error).message}`);
    return ExitCode.NETLINK;
  }
  log.info(
    `Listening on NETLINK_CONNECTOR group 7 (port id ${sock.portId}), header layout ${opts.layout}${
      opts.acceptUserPeers ? ", accepting user-space peers" : ""
    }`,
  );

  const loop = new EventLoop();
  const bus = new LocalBus(1);
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
    bus,
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
  // Deliver what this turn submitted before the next poll: replies go out in the same turn.
  loop.onTurn(() => bus.flush());

  const statusOf = () => ({
    pid: Deno.pid,
    mode: bus.kind,
    nodeId: node.nodeId,
    uptimeSeconds: (Date.now() - started) / 1000,
    logs: node.status(),
    kernelLink: { ...link.stats, ...sock.stats },
    node: { ...node.stats, pending: node.pendingCount, busBatches: bus.batches },
  });

  let control: ControlServer;
  try {
    control = ControlServer.start(opts.controlPath, () => statusOf());
  } catch (err) {
    log.error(`Cannot listen on control socket ${opts.controlPath}: ${(err as Error).message}`);
    sock.close();
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
