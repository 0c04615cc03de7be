/**
 * The node's view of a clustered-disk log device: load at first RESUME, durable writes of the
 * changed clean bits (group commit), close at DTR. Implemented over {@link DiskStore}.
 *
 * @module
 */

import type { DiskChanges, DiskImage, LogConfig, SyncMode } from "./log/types.ts";

/** An open clustered-disk log. */
export interface DiskLog {
  /** The device name the kernel should hold open (CTR reply), e.g. "7:3". */
  readonly kernelName: string;
  /** Read the log area and interpret it by the kernel's rules. */
  load(sync: SyncMode): Promise<{ image?: DiskImage; warning?: string }>;
  /**
   * Write the changed words of `bytes` (the whole clean bitmap) and make them durable; with
   * `sync: false` (clean bits only) written, not synced. Settles after every earlier write.
   */
  write(bytes: Uint8Array, changes: DiskChanges, options?: { sync?: boolean }): Promise<void>;
  /** Close the device once every write settled. */
  close(): Promise<void>;
  /** "path (major:minor)" for log lines and status. */
  describe(): string;
  /** Counters: writes, syncs, bytes. */
  stats(): Record<string, number>;
}

/** Opens the disk log of a constructed log (rejects with a clear error: too small, missing). */
export type OpenDiskLog = (config: LogConfig) => Promise<DiskLog>;
