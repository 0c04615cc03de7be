/**
 * Cluster coherence: the pure core that keeps every node's log replicas identical over one
 * ordered bus (corosync CPG in a cluster), and the binary messages it multicasts.
 *
 * - {@link ClusterCore}: events in (local kernel requests, delivered messages, membership
 *   changes, disk writes made durable, ticks), effects out (replies, multicasts, disk writes,
 *   log lines). See core.ts for the design: one group for all logs, joins with checkpoints,
 *   one disk writer per log, crash handling, the lost-connection policy.
 * - messages.ts: the wire format, strictly decoded.
 *
 * Not here: the CPG adapter (ffi/cpg.ts plus an event-loop shell that feeds the core and performs
 * its effects) and the node's CTR/DTR bookkeeping; tests/sim/ drives the core in a deterministic
 * multi-node simulator.
 *
 * @module
 */

export {
  CLUSTER_TICK_MS,
  ClusterCore,
  type ClusterLogState,
  type ClusterOp,
  type ClusterOptions,
  type ClusterRequest,
  type ClusterStats,
  type Confchg,
  CONNECT_HOLD_TICKS,
  type Effect,
  type LeaveReason,
  type LogLevel,
  type LogStatus,
  MAX_INFLIGHT_MESSAGES,
  MAX_JOIN_BUFFER,
  MAX_LOGS,
  MAX_PENDING_REQUESTS,
} from "./core.ts";
export {
  BatchBuilder,
  CHECKPOINT_CHUNK_BYTES,
  type CheckpointChunk,
  type CheckpointPayload,
  decodeCheckpointPayload,
  type DecodeError,
  decodeMessage,
  encodeBatch,
  encodeCheckpointChunk,
  encodeCheckpointPayload,
  isDecodeError,
  type Item,
  itemBytes,
  type JoinRecord,
  MAX_BATCH_ITEMS,
  MAX_CHECKPOINT_CHUNKS,
  MAX_KEY_BYTES,
  MAX_MESSAGE_BYTES,
  type Message,
  MESSAGE_MAGIC,
  MESSAGE_VERSION,
  type WireOp,
} from "./messages.ts";
