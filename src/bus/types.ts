/**
 * The ordered bus: delivers entries and membership changes in one total order to every member.
 *
 * Standalone it is an in-process queue ({@link LocalBus}); in a cluster it is corosync CPG
 * (CPG_TYPE_AGREED); in tests a seeded simulator. Nothing else in the daemon knows which.
 *
 * @module
 */

import type { NodeId, Op } from "../log/types.ts";

/** One operation to apply to one log, in the total order. */
export interface Entry {
  /** Log key (uuid + luid), see `logKey()`. */
  key: string;
  /** Node whose kernel asked (the originator answers its kernel after delivery). */
  node: NodeId;
  /** Originator-local request tag (matches the pending kernel request; opaque to others). */
  tag: number;
  /** What to apply. */
  op: Op;
}

/** Receives what the bus delivers, in order. */
export interface BusListener {
  /** Apply a batch of entries, in order, all from one bus message. */
  deliver(entries: readonly Entry[]): void;
}

/** An ordered bus. */
export interface OrderedBus {
  /** This node's id on the bus. */
  readonly nodeId: NodeId;
  /** Human-readable kind for logs and status ("standalone", "corosync"). */
  readonly kind: string;
  /** Queue an entry for ordered delivery (batched with others while a message is in flight). */
  submit(entry: Entry): void;
  /** Set the listener that applies delivered entries. */
  listen(listener: BusListener): void;
  /** Entries submitted but not yet delivered. */
  readonly pending: number;
}
