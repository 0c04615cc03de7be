/**
 * The real NETLINK_CONNECTOR socket, through libc FFI.
 *
 * Two roles: the daemon's socket joins the device-mapper multicast group (the kernel sends
 * requests there) and answers each requester's port id; a kernel-simulator socket (tests,
 * benchmarks) joins nothing, multicasts requests to the group and reads the unicast replies.
 *
 * The socket is nonblocking: {@link NetlinkSocket.recv} returns null when nothing is queued and
 * {@link NetlinkSocket.send} returns false when the datagram could not be queued for now. The
 * event loop (src/loop.ts) polls {@link NetlinkSocket.fd} and the owner drains it on each wake.
 *
 * Hot path: recv and send allocate nothing. The sockaddr buffers are allocated once, off the V8
 * heap, and passed to C as pointers taken once; the result of recv is one reused object.
 *
 * @module
 */

import {
  AF_NETLINK,
  bind,
  close,
  EAGAIN,
  EBADF,
  ECONNREFUSED,
  EFAULT,
  EINTR,
  EINVAL,
  ENOBUFS,
  ENOTSOCK,
  EPERM,
  errno,
  ErrnoError,
  getsockname,
  getsockoptInt,
  type Libc,
  libc,
  MSG_DONTWAIT,
  MSG_TRUNC,
  NETLINK_ADD_MEMBERSHIP,
  setsockoptInt,
  sizeT,
  SO_RCVBUF,
  SO_RCVBUFFORCE,
  SOCK_CLOEXEC,
  SOCK_DGRAM,
  SOCK_NONBLOCK,
  SOCKADDR_NL,
  sockaddrNl,
  socket,
  SOL_NETLINK,
  SOL_SOCKET,
} from "../../ffi/libc.ts";
import { CN_IDX_DM, NETLINK_CONNECTOR } from "./protocol.ts";

/**
 * Receive buffer we ask for (the kernel doubles it for its bookkeeping). A queued request costs
 * its size plus the kernel's per-packet overhead: measured here, 16 MiB granted holds about
 * 20,000 requests of one region and 13,000 of the largest kind, where the default (net.core.
 * rmem_default) holds about 500. The predecessor overflowed at about 1,024 in flight, each
 * dropped request a 15 s stall for the mirror. Set with SO_RCVBUFFORCE (root), falling back to
 * SO_RCVBUF (capped by net.core.rmem_max) without CAP_NET_ADMIN.
 */
export const RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024;

/**
 * Most consecutive ENOBUFS/EINTR results one {@link NetlinkSocket.recv} call skips before it
 * reports "nothing now". ENOBUFS is reported once per overrun, so more than a few in a row
 * means a sender is flooding us; returning lets the loop serve its other work.
 */
export const MAX_SKIPPED_RECV_ERRORS = 16;

/** Which side of the connector link a socket plays. */
export type NetlinkRole = "daemon" | "kernel";

/** Options of {@link NetlinkSocket}. */
export interface NetlinkSocketOptions {
  /**
   * "daemon" joins multicast group {@link CN_IDX_DM}, where the kernel sends requests;
   * "kernel" (a simulator for tests and benchmarks) joins no group. Default "daemon".
   */
  role?: NetlinkRole;
  /** Receive buffer to ask for; default {@link RECEIVE_BUFFER_BYTES}. */
  receiveBufferBytes?: number;
}

/** One received datagram; the object is reused by the next {@link NetlinkSocket.recv}. */
export interface Received {
  /** Bytes stored in the caller's buffer. */
  length: number;
  /** True when the datagram was longer than the buffer (only `length` bytes were kept). */
  truncated: boolean;
  /** Sender's netlink port id: 0 for the kernel. */
  portId: number;
  /** Multicast group the datagram was sent to, or 0 for a unicast. */
  group: number;
}

/** Where {@link NetlinkSocket.send} sends a datagram. */
export interface SendTarget {
  /** Destination port id; default 0, the kernel. */
  portId?: number;
  /** Multicast group number (1..32), or 0 (default) for a unicast only. */
  group?: number;
}

/** Counters of one socket, for the state dump and tests. */
export interface NetlinkStats {
  /** Datagrams received. */
  received: number;
  /** Datagrams handed to the kernel. */
  sent: number;
  /** ENOBUFS on receive: the kernel dropped datagrams because our buffer was full. */
  overruns: number;
  /** Datagrams longer than the receive buffer (cut to fit). */
  truncated: number;
  /** Sends refused for now (EAGAIN/ENOBUFS), reported to the caller as retryable. */
  sendRetries: number;
  /**
   * Pending socket errors reported by a receive (e.g. ENOENT, ECONNREFUSED left by an earlier
   * multicast in a namespace): the kernel clears them by reporting them once; skipped.
   */
  asyncErrors: number;
}

/** A nonblocking NETLINK_CONNECTOR socket. */
export class NetlinkSocket {
  #c: Libc;
  #fd: number;
  #portId: number;
  #role: NetlinkRole;
  // Source address of the last recvfrom, and its in/out length; written by C through pointers.
  #source = sockaddrNl(0, 0);
  #sourceView = new DataView(this.#source.buffer);
  #sourcePtr: Deno.PointerObject;
  #sourceLength = new Uint32Array(new ArrayBuffer(4));
  #sourceLengthPtr: Deno.PointerObject;
  // Destination address, rewritten before each sendto.
  #dest = sockaddrNl(0, 0);
  #destView = new DataView(this.#dest.buffer);
  #destPtr: Deno.PointerObject;
  #received: Received = { length: 0, truncated: false, portId: 0, group: 0 };

  /** Counters since the socket was opened. */
  readonly stats: NetlinkStats = {
    received: 0,
    sent: 0,
    overruns: 0,
    asyncErrors: 0,
    truncated: 0,
    sendRetries: 0,
  };

  /**
   * Opens and binds the socket; the kernel assigns the port id.
   *
   * @throws ErrnoError when a socket call fails (e.g. EPERM joining a group without privileges)
   */
  constructor(options: NetlinkSocketOptions = {}) {
    this.#c = libc();
    this.#role = options.role ?? "daemon";
    this.#sourcePtr = pointerOf(this.#source);
    this.#sourceLengthPtr = pointerOf(this.#sourceLength);
    this.#destPtr = pointerOf(this.#dest);
    this.#fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, {
      protocol: NETLINK_CONNECTOR,
    });
    try {
      setReceiveBuffer(this.#fd, options.receiveBufferBytes ?? RECEIVE_BUFFER_BYTES);
      const daemon = this.#role === "daemon";
      bind(this.#fd, sockaddrNl(0, daemon ? groupMask(CN_IDX_DM) : 0));
      if (daemon) {
        // The bind mask already subscribes (the legacy way, groups 1..32); the option is the
        // current one. kernel-abi.md and cmirrord do both, so we match what was proven.
        setsockoptInt(this.#fd, {
          level: SOL_NETLINK,
          name: NETLINK_ADD_MEMBERSHIP,
          value: CN_IDX_DM,
        });
      }
      const local = sockaddrNl(0, 0);
      getsockname(this.#fd, local);
      this.#portId = new DataView(local.buffer).getUint32(SOCKADDR_NL.pid, true);
    } catch (error) {
      this.#c.close(this.#fd);
      throw error;
    }
  }

  /** The socket's file descriptor (for poll), or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** Our netlink port id, assigned by the kernel at bind. */
  get portId(): number {
    return this.#portId;
  }

  /** The role the socket was opened for. */
  get role(): NetlinkRole {
    return this.#role;
  }

  /** The receive buffer the kernel granted, in bytes (double what was asked for). */
  get receiveBufferBytes(): number {
    return getsockoptInt(this.#fd, { level: SOL_SOCKET, name: SO_RCVBUF });
  }

  /**
   * Receives one datagram into `buf` without blocking.
   *
   * Returns null when nothing is queued. An ENOBUFS (datagrams dropped because we fell
   * behind) is counted in {@link NetlinkStats.overruns} and skipped, never thrown; so is a
   * pending socket error ({@link NetlinkStats.asyncErrors}). The result object is reused by
   * the next call.
   *
   * @throws ErrnoError on a misuse (EBADF after close, EINVAL, EFAULT, ENOTSOCK)
   */
  recv(buf: Uint8Array): Received | null {
    for (let skipped = 0; skipped < MAX_SKIPPED_RECV_ERRORS; skipped++) {
      this.#sourceLength[0] = SOCKADDR_NL.size;
      const result = this.#c.recvfrom(
        this.#fd,
        buf,
        sizeT(buf.byteLength),
        MSG_DONTWAIT | MSG_TRUNC,
        this.#sourcePtr,
        this.#sourceLengthPtr,
      );
      if (result >= 0n) {
        const length = Number(result);
        const received = this.#received;
        received.truncated = length > buf.byteLength;
        received.length = received.truncated ? buf.byteLength : length;
        received.portId = this.#sourceView.getUint32(SOCKADDR_NL.pid, true);
        received.group = groupNumber(this.#sourceView.getUint32(SOCKADDR_NL.groups, true));
        this.stats.received++;
        if (received.truncated) this.stats.truncated++;
        return received;
      }
      const code = errno();
      if (code === EAGAIN) return null;
      if (code === ENOBUFS) {
        this.stats.overruns++;
      } else if (code === EBADF || code === EINVAL || code === EFAULT || code === ENOTSOCK) {
        throw new ErrnoError("recvfrom", code);
      } else if (code !== EINTR) {
        // A pending error of the socket (sk_err), reported by this call and cleared by it.
        this.stats.asyncErrors++;
      }
    }
    return null;
  }

  /**
   * Sends one datagram without blocking: to `target.portId` (default 0, the kernel) and, with
   * `target.group`, to that multicast group.
   *
   * Returns true when the kernel took it, false when it could not be queued for now
   * (EAGAIN/ENOBUFS, e.g. the receiver's buffer is full): the caller keeps it and retries.
   * A group send that gets ECONNREFUSED counts as sent: outside the initial network namespace
   * the connector's kernel socket (port 0) does not exist, so the unicast half of the send
   * fails after the multicast half was delivered.
   *
   * @throws ErrnoError on any other failure (e.g. ECONNREFUSED: nobody holds that port id)
   */
  send(bytes: Uint8Array, target: SendTarget = {}): boolean {
    const group = target.group ?? 0;
    this.#destView.setUint32(SOCKADDR_NL.pid, target.portId ?? 0, true);
    this.#destView.setUint32(SOCKADDR_NL.groups, group === 0 ? 0 : groupMask(group), true);
    for (;;) {
      const result = this.#c.sendto(
        this.#fd,
        bytes,
        sizeT(bytes.byteLength),
        MSG_DONTWAIT,
        this.#destPtr,
        SOCKADDR_NL.size,
      );
      if (result >= 0n) break;
      const code = errno();
      if (code === ECONNREFUSED && group !== 0) break;
      if (code === EAGAIN || code === ENOBUFS) {
        this.stats.sendRetries++;
        return false;
      }
      // A signal before anything was queued: nothing was sent, so sending again is safe.
      if (code !== EINTR) throw new ErrnoError("sendto", code);
    }
    this.stats.sent++;
    return true;
  }

  /** Closes the socket; later calls are no-ops. Unwatch it from the event loop first. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    close(fd);
  }
}

/** `nl_groups` bit of multicast group `group` (1..32). */
function groupMask(group: number): number {
  if (!Number.isInteger(group) || group < 1 || group > 32) {
    throw new RangeError(`Netlink group must be 1..32, got ${group}`);
  }
  return (1 << (group - 1)) >>> 0;
}

/** The lowest group number in an `nl_groups` mask, 0 for none. */
function groupNumber(mask: number): number {
  return mask === 0 ? 0 : 32 - Math.clz32(mask & -mask);
}

function pointerOf(bytes: Uint8Array | Uint32Array): Deno.PointerObject {
  const pointer = Deno.UnsafePointer.of(bytes);
  if (pointer === null) throw new Error("Cannot take the address of an empty buffer");
  return pointer;
}

function setReceiveBuffer(fd: number, bytes: number): void {
  try {
    setsockoptInt(fd, { level: SOL_SOCKET, name: SO_RCVBUFFORCE, value: bytes });
  } catch (error) {
    // Without CAP_NET_ADMIN only the capped option is allowed; the cap is a host setting.
    if (!(error instanceof ErrnoError) || error.errno !== EPERM) throw error;
    setsockoptInt(fd, { level: SOL_SOCKET, name: SO_RCVBUF, value: bytes });
  }
}
