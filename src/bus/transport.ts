/**
 * The ordered transport under the cluster core: a totally ordered multicast with membership
 * changes in the order (CPG's semantics). Two implementations: {@link LocalTransport} (one node,
 * in process: `--standalone`) and `CpgTransport` (corosync CPG, `CPG_TYPE_AGREED`).
 *
 * @module
 */

import type { NodeId } from "../log/types.ts";
import type { Confchg } from "../cluster/core.ts";

/** What a transport tells its user; called from the event loop, never re-entrantly from mcast(). */
export interface TransportHandlers {
  /**
   * A message delivered in the total order (own messages included). `bytes` may be a view valid
   * only during the call.
   */
  deliver(from: NodeId, bytes: Uint8Array): void;
  /** A membership change of the group, in the order (`joined` contains this node on (re)join). */
  confchg(change: Confchg): void;
  /**
   * The connection is lost (corosync died, dispatch failed); the transport tries to reconnect by
   * itself.
   */
  disconnected(reason: string): void;
}

/** A totally ordered multicast transport. */
export interface ClusterTransport {
  readonly kind: "standalone" | "corosync";
  readonly nodeId: NodeId;
  /** Start delivering to `handlers` (joins the group). */
  start(handlers: TransportHandlers): void;
  /**
   * Multicast in total order. Never throws; keeps this node's send order even when the engine
   * says "try again" (queue and retry with backoff).
   */
  mcast(bytes: Uint8Array): void;
  /** Counters for status and benchmarks. */
  stats(): Record<string, number>;
  /** Leave the group and release everything. */
  close(): void;
}

/** CPG group every clogd joins by default (`serve --group`); the same on every node. */
export const DEFAULT_GROUP = "clogd";
