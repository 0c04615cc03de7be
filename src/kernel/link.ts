/**
 * The kernel link: receives datagrams from the connector socket, decodes and validates them,
 * hands good requests to the node, answers malformed ones with an error reply where their seq is
 * readable (else drops them with a log line), and sends replies to the requester's port id.
 *
 * The socket is an interface so the link's framing and validation can be driven by a test socket
 * as well as the real netlink one (mdlayher/netlink's nltest idea).
 *
 * @module
 */

import type { LayoutMode } from "./codec.ts";
import { decodeDatagram, encodeErrorReply, encodeReply } from "./codec.ts";
import { CONNECTOR_MAX_MSG_SIZE, type Reply, type Request, requestTypeName } from "./protocol.ts";
import type { Logger } from "../logger.ts";
import { ECONNREFUSED, ErrnoError } from "../../ffi/libc.ts";

/** The part of a datagram socket the link uses. */
export interface DatagramSocket {
  /** Receive one datagram without blocking; null when none is waiting. */
  recv(buf: Uint8Array): { length: number; portId: number } | null;
  /** Send one datagram to a netlink port id; false when it would block (retry later). */
  send(bytes: Uint8Array, to: { portId: number }): boolean;
}

/**
 * Most datagrams handled per drain before yielding to the rest of the event loop (timers,
 * disk completions, the control socket). The socket is drained again on the next wake.
 */
export const MAX_DATAGRAMS_PER_DRAIN = 4096;

/**
 * Most replies held back because the peer's socket was full. Only user peers (tests) can fill
 * up; the kernel consumes replies synchronously. Beyond this, replies are dropped with a log line
 * (the kernel resends after its 15 s timeout with a new seq).
 */
export const MAX_OUTBOX = 8192;

/** Kernel link options. */
export interface KernelLinkOptions {
  layout: LayoutMode;
  /** Accept requests from netlink senders other than the kernel (port id 0). */
  acceptUserPeers: boolean;
  logger: Logger;
  /** Called with every valid request. */
  onRequest(request: Request): void;
}

/** Counters shown by `clogd status`. */
export interface LinkStats {
  datagrams: number;
  requests: number;
  malformedReplied: number;
  malformedDropped: number;
  foreignDropped: number;
  replies: number;
  sendRetries: number;
  sendDropped: number;
  /** Replies to a peer that is gone (its socket closed: ECONNREFUSED), dropped. */
  peerGone: number;
}

/** Owns the receive side and reply framing of one connector socket. */
export class KernelLink {
  readonly #sock: DatagramSocket;
  readonly #opts: KernelLinkOptions;
  readonly #buf = new Uint8Array(CONNECTOR_MAX_MSG_SIZE + 64);
  #outbox: { bytes: Uint8Array; portId: number }[] = [];
  readonly stats: LinkStats = {
    datagrams: 0,
    requests: 0,
    malformedReplied: 0,
    malformedDropped: 0,
    foreignDropped: 0,
    replies: 0,
    sendRetries: 0,
    sendDropped: 0,
    peerGone: 0,
  };

  constructor(sock: DatagramSocket, opts: KernelLinkOptions) {
    this.#sock = sock;
    this.#opts = opts;
  }

  /** True when replies are waiting for the peer's socket to drain. */
  get backlogged(): boolean {
    return this.#outbox.length > 0;
  }

  /** Receive and dispatch everything waiting (up to {@link MAX_DATAGRAMS_PER_DRAIN}). Returns the count. */
  drain(): number {
    this.flushOutbox();
    let n = 0;
    while (n < MAX_DATAGRAMS_PER_DRAIN) {
      const got = this.#sock.recv(this.#buf);
      if (got === null) break;
      n++;
      this.stats.datagrams++;
      this.#dispatch(got.length, got.portId);
    }
    return n;
  }

  #dispatch(length: number, portId: number): void {
    const log = this.#opts.logger;
    if (portId !== 0 && !this.#opts.acceptUserPeers) {
      // Any root process can multicast on group 7; only the kernel (port 0) is a real requester.
      this.stats.foreignDropped++;
      log.limited(
        "warn",
        "foreign-peer",
        `Dropped a datagram from netlink port ${portId}: not the kernel (start with --accept-user-peers to serve user-space peers)`,
      );
      return;
    }
    // Copy out of the shared receive buffer: requests outlive this call (ordering, disk waits).
    const bytes = this.#buf.slice(0, length);
    const res = decodeDatagram(bytes, { portId }, { layout: this.#opts.layout });
    if (!res.ok) {
      if (res.reply !== undefined) {
        this.stats.malformedReplied++;
        log.limited(
          "warn",
          "malformed",
          `Malformed request from port ${portId}: ${res.reason}; answering -errno ${res.errno}`,
        );
        this.#send(encodeErrorReply(res.reply, res.errno), portId);
      } else {
        this.stats.malformedDropped++;
        log.limited(
          "warn",
          "malformed-drop",
          `Dropped malformed datagram from port ${portId}: ${res.reason}`,
        );
      }
      return;
    }
    if (res.warning !== undefined) log.limited("warn", "layout", res.warning);
    this.stats.requests++;
    const req = res.request;
    if (log.enabled("debug")) {
      log.debug(
        `<- ${
          requestTypeName(req.type)
        } seq ${req.seq} ${req.uuid} size ${req.payload.length} port ${portId}`,
      );
    }
    this.#opts.onRequest(req);
  }

  /** Send the reply to `request` to the port it came from. */
  reply(request: Request, reply: Reply): void {
    this.stats.replies++;
    this.#send(encodeReply(request, reply), request.frame.portId);
  }

  #send(bytes: Uint8Array, portId: number): void {
    if (this.#outbox.length > 0 || !this.#trySend(bytes, portId)) {
      if (this.#outbox.length >= MAX_OUTBOX) {
        this.stats.sendDropped++;
        this.#opts.logger.limited(
          "error",
          "outbox-full",
          `Reply to port ${portId} dropped: peer not reading (outbox full)`,
        );
        return;
      }
      this.stats.sendRetries++;
      // Encoded replies are views into the codec's shared buffer: keep a copy.
      this.#outbox.push({ bytes: bytes.slice(), portId });
    }
  }

  /** Retry held-back replies in order; stops at the first that would still block. */
  flushOutbox(): void {
    let i = 0;
    while (i < this.#outbox.length) {
      const { bytes, portId } = this.#outbox[i];
      if (!this.#trySend(bytes, portId)) break;
      i++;
    }
    if (i > 0) this.#outbox = this.#outbox.slice(i);
  }

  /**
   * One send: true when it is done with (sent, or dropped because the peer is gone), false
   * when the socket cannot take it now. A user-space peer may close its socket with requests
   * in flight (the kernel never does): that reply has nobody to go to, and must not become an
   * exception in the middle of the cluster core's effects.
   */
  #trySend(bytes: Uint8Array, portId: number): boolean {
    try {
      return this.#sock.send(bytes, { portId });
    } catch (err) {
      if (!(err instanceof ErrnoError) || err.errno !== ECONNREFUSED) throw err;
      this.stats.peerGone++;
      this.#opts.logger.limited(
        "info",
        "peer-gone",
        `Reply to port ${portId} dropped: the peer closed its socket (ECONNREFUSED)`,
      );
      return true;
    }
  }
}
