/**
 * The kernel simulator's I/O edge: runs a {@link KernelModel} over a real NETLINK_CONNECTOR
 * socket. Requests are multicast to group 7 like the kernel's, replies are the daemon's unicasts
 * to our port id. Run it inside a network namespace next to the daemon: there nothing hears
 * the real kernel, and our multicast reaches only that namespace's daemon.
 *
 * The real kernel learns at once that nobody listens (its multicast fails with -ESRCH); a
 * user-space sender does not (in a non-initial namespace every group send "fails" with
 * ECONNREFUSED, delivered or not). So the driver reads /proc/net/netlink now and then and, while
 * no socket of this namespace is in group 7, fails each send with ESRCH the way the kernel's
 * would. Requests multicast just before a daemon died are lost and time out, as in the kernel.
 *
 * Hot path: one poll per turn, then every queued reply is drained, fed to the model, and
 * everything the model wants to send is sent before waiting again. The receive buffer is
 * allocated once.
 *
 * @module
 */

import { decodeReply, encodeRequest } from "../kernel/codec.ts";
import { NetlinkSocket, type NetlinkStats } from "../kernel/netlink.ts";
import { CN_IDX_DM, Errno, NETLINK_CONNECTOR } from "../kernel/protocol.ts";
import { EventLoop } from "../loop.ts";
import type { Call } from "./call.ts";
import type { KernelModel } from "./model.ts";
import { errnoName } from "./checker.ts";

/** Driver settings. */
export interface DriverOptions {
  /** Read /proc/net/netlink this often to see whether a daemon listens (ms); 0: assume one does. */
  listenerPollMs: number;
  /** Before starting, wait up to this long for a listener on group 7 (ms). */
  waitDaemonMs: number;
  /** Give up after this long (ms of wall time): the run is reported incomplete. */
  maxRunMs: number;
  /**
   * After sending, keep reading the socket without blocking for up to this long (us) before
   * going back to poll: trades CPU for latency (a poll wake costs about 40 us).
   */
  spinUs: number;
  /** A socket to use instead of opening one (tests); left open at the end. */
  socket?: NetlinkSocket;
}

/** Defaults. */
export const DRIVER_DEFAULTS: DriverOptions = {
  listenerPollMs: 50,
  waitDaemonMs: 10_000,
  maxRunMs: 600_000,
  spinUs: 0,
};

/** What the driver saw. */
export interface DriverResult {
  /** Wall time from the first request to the end, ms. */
  elapsedMs: number;
  /** The model's work finished (else the run hit maxRunMs, was interrupted, or never started). */
  finished: boolean;
  /** SIGINT or SIGTERM stopped the run early. */
  interrupted: boolean;
  /** A listener on group 7 was seen before starting. */
  daemonSeen: boolean;
  /** Datagrams the driver could not send for now and sent later (receiver buffer full). */
  deferredSends: number;
  /** Replies that were not dm-log-userspace replies at all (e.g. a bad header). */
  undecodable: number;
  /** Event loop turns (each one poll). */
  turns: number;
  /** Errors returned by group sends, by errno name (delivery unknown: reply or timeout decides). */
  groupSendErrors: Record<string, number>;
  socket: NetlinkStats;
}

/** Largest datagram read: bigger than any reply (16 KiB connector limit plus headers). */
export const RECEIVE_BYTES = 64 * 1024;

/** Most sends deferred at once before the run is aborted (the daemon stopped reading). */
export const MAX_DEFERRED_SENDS = 65_536;

/** Longest one turn keeps going before returning to the event loop (signals, timers), ms. */
export const MAX_TURN_MS = 20;

/** Most datagrams read per turn before the model runs (keeps one turn's latency bounded). */
export const MAX_RECEIVES_PER_TURN = 4096;

/** True when a socket of this network namespace listens on NETLINK_CONNECTOR group 7. */
export function daemonListening(ownPortId: number): boolean {
  let text: string;
  try {
    text = Deno.readTextFileSync("/proc/net/netlink");
  } catch {
    return true; // Cannot tell: do not fake -ESRCH.
  }
  const lines = text.split("\n");
  const mask = 1 << (CN_IDX_DM - 1);
  for (let i = 1; i < lines.length; i++) {
    const f = lines[i].trim().split(/\s+/);
    if (f.length < 4 || Number(f[1]) !== NETLINK_CONNECTOR) continue;
    if (Number(f[2]) === ownPortId) continue;
    if ((parseInt(f[3], 16) & mask) !== 0) return true;
  }
  return false;
}

/**
 * Runs `model` until `finished()` is true (checked after every turn) or `maxRunMs` passes.
 * `start(now)` is called once the daemon is there (or the wait gave up), with the model time.
 */
export async function runDriver(
  model: KernelModel,
  hooks: { start: (now: number) => void; finished: () => boolean },
  options: Partial<DriverOptions> = {},
): Promise<DriverResult> {
  const o = { ...DRIVER_DEFAULTS, ...options };
  const sock = o.socket ?? new NetlinkSocket({ role: "kernel" });
  const loop = new EventLoop({ timeoutMs: 1000 });
  const buf = new Uint8Array(RECEIVE_BYTES);
  const layout = model.options.layout;
  const deferred: Call[] = [];
  let deferredSends = 0;
  let undecodable = 0;
  let turns = 0;
  let listening = true;
  let lastListenerCheck = 0;
  let timer: ReturnType<typeof setTimeout> | null = null;
  let timerAt = Infinity;
  let failure: unknown = null;
  /** Errors returned by group sends, by errno (see sendOne). */
  const groupSendErrors = new Map<number, number>();

  const t0 = performance.now();
  const now = () => performance.now() - t0;

  // Wait for the daemon: it is started by the caller, maybe just now.
  let daemonSeen = o.listenerPollMs === 0 || daemonListening(sock.portId);
  const waitUntil = performance.now() + o.waitDaemonMs;
  while (!daemonSeen && performance.now() < waitUntil) {
    await new Promise((r) => setTimeout(r, 10));
    daemonSeen = daemonListening(sock.portId);
  }
  listening = daemonSeen;

  const checkListener = (t: number) => {
    if (o.listenerPollMs === 0 || t - lastListenerCheck < o.listenerPollMs) return;
    lastListenerCheck = t;
    listening = daemonListening(sock.portId);
  };

  const sendOne = (c: Call, t: number): boolean => {
    if (!listening) {
      model.onSendError(c.seq, Errno.ESRCH, t);
      return true;
    }
    const bytes = encodeRequest(c, { cnSeq: c.seq });
    c.sentAt = now();
    try {
      return sock.send(bytes, { group: CN_IDX_DM });
    } catch (err) {
      // A multicast is handed to the group's listeners before the kernel tries port 0, which
      // does not exist outside the initial network namespace: an error here says nothing about
      // delivery (clogd was seen answering such a datagram). Count it and let the reply or the
      // timeout decide; a dead daemon is found by the listener check above.
      const code = (err as { errno?: number }).errno ?? Errno.EIO;
      groupSendErrors.set(code, (groupSendErrors.get(code) ?? 0) + 1);
      return true;
    }
  };

  const flushOutgoing = (t: number) => {
    while (deferred.length > 0) {
      if (!sendOne(deferred[0], t)) return false;
      deferred.shift();
    }
    // The model may add more while we send (a failed send completes a call at once).
    for (let round = 0; round < 1000; round++) {
      const out = model.takeOutgoing();
      if (out.length === 0) return true;
      for (let i = 0; i < out.length; i++) {
        if (deferred.length > 0 || !sendOne(out[i], t)) {
          deferred.push(out[i]);
          deferredSends++;
        }
      }
      if (deferred.length > MAX_DEFERRED_SENDS) {
        throw new Error(
          `More than ${MAX_DEFERRED_SENDS} requests could not be sent: the daemon stopped reading`,
        );
      }
      model.advance(now());
    }
    return true;
  };

  const drain = (): number => {
    let n = 0;
    for (; n < MAX_RECEIVES_PER_TURN; n++) {
      const got = sock.recv(buf);
      if (got === null) break;
      const t = now();
      if (got.truncated) {
        undecodable++;
        model.onUndecodable(`Datagram of more than ${buf.length} bytes`, t);
        continue;
      }
      const reply = decodeReply(buf.subarray(0, got.length), { layout });
      if (!reply.ok) {
        // The kernel drops these (incomplete message, wrong connector id): a reply that never
        // arrives, so its request will time out. Report why.
        undecodable++;
        model.onUndecodable(reply.reason, t);
        continue;
      }
      model.onReply(reply, t);
    }
    return n;
  };

  const step = (): number => {
    const t = now();
    drain();
    checkListener(t);
    model.advance(t);
    flushOutgoing(t);
    return t;
  };

  const turn = () => {
    try {
      turns++;
      const turnEnd = performance.now() + MAX_TURN_MS;
      let t = step();
      let spinEnd = o.spinUs > 0 ? performance.now() + o.spinUs / 1000 : 0;
      for (;;) {
        if (hooks.finished() || t > o.maxRunMs) return loop.stop();
        const next = deferred.length > 0 ? t + 1 : model.nextDeadline();
        if (performance.now() >= turnEnd) return schedule(next);
        if (next <= now()) {
          // Already due (bios of microseconds): go on now rather than after a timer tick.
          t = step();
          continue;
        }
        if (performance.now() < spinEnd) {
          if (drain() > 0) {
            t = step();
            spinEnd = performance.now() + o.spinUs / 1000;
          }
          continue;
        }
        return schedule(next);
      }
    } catch (err) {
      failure = err;
      loop.stop();
    }
  };

  // One timer for the model's next deadline (timeouts, sleeps, I/O latency, rate limits).
  const schedule = (at: number) => {
    const wake = Math.min(
      at,
      o.listenerPollMs > 0 ? lastListenerCheck + o.listenerPollMs : Infinity,
      o.maxRunMs,
    );
    if (wake >= timerAt && timer !== null) return;
    if (timer !== null) clearTimeout(timer);
    timerAt = wake;
    timer = setTimeout(() => {
      timer = null;
      timerAt = Infinity;
      loop.wake();
    }, Math.max(0, wake - now()));
  };

  // SIGINT/SIGTERM end the run early; the caller still reports what happened so far.
  let interrupted = false;
  const onSignal = () => {
    interrupted = true;
    loop.stop();
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);

  // Replies are drained by the turn handler, which also runs after timer wakes.
  loop.watch(sock.fd, () => {});
  loop.onTurn(turn);
  hooks.start(now());
  model.advance(now());
  try {
    flushOutgoing(now());
    schedule(model.nextDeadline());
    await loop.run();
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    if (timer !== null) clearTimeout(timer);
    loop.unwatch(sock.fd);
    loop.close();
    if (o.socket === undefined) sock.close();
  }
  if (failure !== null) throw failure;
  return {
    elapsedMs: now(),
    finished: hooks.finished(),
    interrupted,
    daemonSeen,
    deferredSends,
    undecodable,
    turns,
    groupSendErrors: Object.fromEntries([...groupSendErrors].map(([k, v]) => [errnoName(k), v])),
    socket: { ...sock.stats },
  };
}
