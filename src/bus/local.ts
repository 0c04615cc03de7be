/**
 * The standalone transport: this node is the whole group, and a message is delivered back to
 * it in the order it was multicast. The same cluster core runs over it as over corosync, so the
 * standalone daemon exercises the cluster code path (batching, ordered answers, the disk
 * writer) with a zero-latency bus.
 *
 * @module
 */

import type { NodeId } from "../log/types.ts";
import type { ClusterTransport, TransportHandlers } from "./transport.ts";

/**
 * Most messages delivered in one microtask run before yielding to the event loop: the core's
 * in-flight window keeps the queue short, this bounds a run of control messages (durables,
 * checkpoint chunks) so the kernel socket is not starved.
 */
export const LOCAL_MAX_DELIVER_PER_RUN = 256;

/** One node alone, in process. */
export class LocalTransport implements ClusterTransport {
  readonly kind = "standalone";
  readonly nodeId: NodeId;
  #queue: Uint8Array[] = [];
  #handlers: TransportHandlers | null = null;
  #scheduled = false;
  #closed = false;
  #messages = 0;
  #bytes = 0;

  constructor(nodeId: NodeId = 1) {
    this.nodeId = nodeId;
  }

  start(handlers: TransportHandlers): void {
    this.#handlers = handlers;
    handlers.confchg({ members: [this.nodeId], joined: [this.nodeId], left: [] });
    this.#schedule();
  }

  mcast(bytes: Uint8Array): void {
    if (this.#closed) return;
    this.#queue.push(bytes);
    this.#messages++;
    this.#bytes += bytes.byteLength;
    this.#schedule();
  }

  /** Deliver everything queued now (tests step with this; the daemon calls it each loop turn). */
  flush(): void {
    while (this.#queue.length > 0 && this.#handlers !== null && !this.#closed) {
      this.#handlers.deliver(this.nodeId, this.#queue.shift()!);
    }
  }

  stats(): Record<string, number> {
    return { messages: this.#messages, bytes: this.#bytes, queued: this.#queue.length };
  }

  close(): void {
    this.#closed = true;
    this.#queue = [];
  }

  #schedule(): void {
    if (this.#scheduled || this.#queue.length === 0 || this.#handlers === null) return;
    this.#scheduled = true;
    queueMicrotask(() => {
      this.#scheduled = false;
      for (let n = 0; n < LOCAL_MAX_DELIVER_PER_RUN && this.#queue.length > 0; n++) {
        if (this.#closed) return;
        this.#handlers!.deliver(this.nodeId, this.#queue.shift()!);
      }
      // More left: continue after other work (a macrotask, so timers and I/O get their turn).
      if (this.#queue.length > 0 && !this.#scheduled) {
        this.#scheduled = true;
        setTimeout(() => {
          this.#scheduled = false;
          this.flush();
        }, 0);
      }
    });
  }
}
