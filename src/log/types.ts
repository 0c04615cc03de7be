/**
 * Types shared by the log replica, the node and the ordered buses.
 *
 * A log replica is a pure state machine: {@link Op}s in (delivered in one total order to every
 * member), {@link OpResult}s out. No I/O, no clock, no randomness inside.
 *
 * @module
 */

/** Cluster node id (corosync nodeid; 1 in standalone mode). */
export type NodeId = number;

/** Log type from the CTR string. */
export type LogKind = "clustered-core" | "clustered-disk";

/** `sync` (force a full resync), `nosync` (start in sync) or neither. */
export type SyncMode = "default" | "sync" | "nosync";

/** A parsed constructor string (`"<target sectors> <type> [<dev>] <region_size> [sync|nosync] [block_on_error]"`). */
export interface CtrArgs {
  /** Target length in sectors. */
  targetSectors: number;
  /** Log type. */
  kind: LogKind;
  /** Log device as given (path or major:minor); clustered-disk only. */
  device?: string;
  /** Region size in sectors. */
  regionSize: number;
  /** ceil(targetSectors / regionSize). */
  regionCount: number;
  /** Sync mode. */
  sync: SyncMode;
  /** `block_on_error` given. */
  blockOnError: boolean;
  /** The words after the target length, as the kernel sent them (for STATUS_TABLE). */
  argv: string[];
}

/** Identity and geometry of one log, fixed at CTR time. */
export interface LogConfig extends CtrArgs {
  uuid: string;
  luid: bigint;
}

/** One operation on a log replica: a decoded kernel request (payload parsed) or a cluster event. */
export type Op =
  | { op: "resume"; diskImage?: DiskImage }
  | { op: "presuspend" }
  | { op: "postsuspend" }
  | { op: "get_region_size" }
  | { op: "is_clean"; region: number }
  | { op: "in_sync"; region: number }
  | { op: "flush"; marks: number[] }
  | { op: "mark"; regions: number[] }
  | { op: "clear"; regions: number[] }
  | { op: "get_resync_work" }
  | { op: "set_region_sync"; region: number; inSync: boolean }
  | { op: "get_sync_count" }
  | { op: "status_info" }
  | { op: "status_table" }
  | { op: "is_remote_recovering"; region: number }
  | { op: "disk_failed" };

/**
 * What the disk held when the log was resumed: the clean bitmap as stored (little-endian bit
 * order, bit i of byte i/8 is region i), and the number of regions the header recorded. Absent
 * (undefined) for a fresh log (sync/nosync in the table, wrong magic, or a core log).
 */
export interface DiskImage {
  nrRegions: number;
  cleanBits: Uint8Array;
  /** The log device could not be read or held an unknown version: every region out of sync, status D. */
  failed?: boolean;
}

/** The result of applying one {@link Op}. */
export interface OpResult {
  /** 0 or a positive errno, sent to the kernel negated. */
  errno: number;
  /** Reply payload, if the request type has one. */
  data?: Uint8Array;
  /**
   * True when the reply may only be sent after every disk-log change so far is durable (FLUSH on
   * a clustered-disk log). The node drains {@link LogReplicaLike.takeDiskChanges} and waits.
   */
  needsDurable?: boolean;
  /** Why the op was refused (errno != 0), for the log line. */
  reason?: string;
}

/** The clean-bitmap words (32-bit, index into the on-disk bitmap) changed since the last take. */
export interface DiskChanges {
  /** Indexes of 32-bit words of the on-disk clean bitmap that changed. */
  words: number[];
}

/**
 * What the node and the buses need from a log replica ({@link Op}s in, {@link OpResult}s out,
 * plus the cluster hooks). Implemented by `LogReplica` in replica.ts.
 */
export interface LogReplicaLike {
  /** Applies one op from `node`, in the total order; pure and deterministic. */
  apply(node: NodeId, op: Op): OpResult;
  /** `node` left without POSTSUSPEND: its marks become out-of-sync regions. Returns how many went out of sync. */
  nodeCrashed(node: NodeId): number;
  /** `node` left the log cleanly (after POSTSUSPEND). Returns how many regions went out of sync. */
  nodeLeft(node: NodeId): number;
  /** The on-disk clean-bitmap words changed since the last call. */
  takeDiskChanges(): DiskChanges;
  /** Word `i` of the on-disk clean bitmap. */
  diskWord(i: number): number;
  /** The whole on-disk clean bitmap (little-endian bit order). */
  diskBytes(): Uint8Array;
  /** The complete state in chunks of at most `maxChunkBytes` bytes. */
  checkpoint(options?: { maxChunkBytes?: number }): Uint8Array[];
  /** A hash of the complete replicated state. */
  digest(): string;
}
