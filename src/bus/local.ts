/**
 * The standalone ordered bus: an in-process queue with the same contract as the cluster bus.
 *
 * Entries submitted during one turn of the event loop are delivered together on the next
 * microtask, in submission order, as one batch: the same batching shape the CPG bus has, so the
 * node's code path is the one a cluster runs.
 *
 * @module
 */

import type { NodeId } from "../log/types.ts";
import type { BusListener, Entry, OrderedBus } from "./types.ts";

/**
 * Largest batch delivered at once. Bounds the work done in one delivery; the rest follows on
 * the next microtask, so a burst never starves the rest of the event loop for long.
 */
export const LOCAL_MAX_BATCH = 4096;

/** In-process ordered bus for standalone mode. */
export class LocalBus implements OrderedBus {
  readonly nodeId: NodeId;
  readonly kind = "standalone";
  #queue: Entry[] = [];
  #listener: BusListener | null = null;
  #scheduled = false;
  /** Number of delivered batches (the standalone analogue of cluster messages). */
  batches = 0;

  constructor(nodeId: NodeId = 1) {
    this.nodeId = nodeId;
  }

  get pending(): number {
    return this.#queue.length;
  }

  listen(listener: BusListener): void {
    this.#listener = listener;
  }

  submit(entry: Entry): void {
    this.#queue.push(entry);
    if (!this.#scheduled) {
      this.#scheduled = true;
      queueMicrotask(() => this.#deliver());
    }
  }

  /** Deliver everything queued now (also used by tests to step deterministically). */
  flush(): void {
    while (this.#queue.length > 0) this.#deliverOne();
  }

  #deliver(): void {
    this.#scheduled = false;
    this.#deliverOne();
    if (this.#queue.length > 0 && !this.#scheduled) {
      this.#scheduled = true;
      queueMicrotask(() => this.#deliver());
    }
  }

  #deliverOne(): void {
    if (this.#queue.length === 0) return;
    const batch = this.#queue.length <= LOCAL_MAX_BATCH
      ? this.#queue
      : this.#queue.slice(0, LOCAL_MAX_BATCH);
    this.#queue = this.#queue.length <= LOCAL_MAX_BATCH ? [] : this.#queue.slice(LOCAL_MAX_BATCH);
    this.batches++;
    if (this.#listener === null) throw new Error("LocalBus has no listener");
    this.#listener.deliver(batch);
  }
}
