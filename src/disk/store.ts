/**
 * The durable store of a `clustered-disk` log: reads the log area at resume and writes the
 * changed parts of the clean bitmap with group commit.
 *
 * Durability: the device is opened with O_DIRECT through libc over FFI ({@link openBlockFile}),
 * so every write reaches the device before it returns and every read comes from the device, not
 * from this host's page cache. That matters in cluster mode, where several machines share the
 * log device: a buffered write a dead daemon left in its node's page cache (clean-only writes
 * are not synced) could be written back later, over what the new writer wrote since; and a node
 * reading the log at resume would read its own possibly stale cached pages. O_DIRECT still
 * leaves data in the device's volatile cache, so a batch that must be durable still ends with
 * `fdatasync` (the cache flush the kernel's disk log gets from REQ_PREFLUSH); group commit pays
 * it once per batch, and the number of fdatasyncs per FLUSH does not depend on O_DIRECT. Writes
 * are whole logical blocks at block offsets, as O_DIRECT requires. A filesystem that refuses
 * O_DIRECT (EINVAL: ramfs, some FUSE filesystems) gets the buffered file (Deno.FsFile), and the
 * first load() says so in its warning ({@link DiskStore.openWarning}); stats() has `direct`.
 * (Deno.open cannot pass O_DIRECT, hence FFI.) Measured with `deno task bench --seconds 2`
 * (clustered-disk log on an ext4 file, integrated flush, 32 in flight, same machine, same hour):
 * O_DIRECT 44,447 and 45,332 requests/s, FLUSH p50 765 / 729 us, 1.69 and 1.70 fdatasyncs per
 * 32 FLUSHes; the buffered fallback forced 38,399 requests/s, p50 927 us, 1.73. The cost is the
 * device flush either way, and group commit pays it once per batch.
 *
 * Group commit: a write() call adds the 32-bit words it changed to the next batch and returns
 * that batch's promise. One batch runs at a time: it copies the changed logical blocks from the
 * replica's bitmap into a staging copy of the area (the replica keeps mutating its bytes while
 * the write is in flight), writes only those blocks, and syncs once. Callers arriving meanwhile
 * form the next batch. So every caller's promise resolves only after a sync that started after
 * its call, or at once if nothing it asked for differs from what is already durable.
 *
 * Bounds: at most two batches exist (one in flight, one collecting). A batch keeps no entry per
 * caller: all its callers hold the same promise, so any number of queued callers costs nothing
 * more and they all share the next sync; its only state is a set of changed logical blocks,
 * at most the area's block count ({@link logAreaSize} / logical block size, itself bounded by
 * MAX_REGION_COUNT). One write system call covers at most {@link MAX_WRITE_RUN_BYTES}.
 *
 * Ordering (a crash at any point leaves a log the kernel's rules read safely):
 * - The first batch after open (and the first after a failure) writes the whole area, not only
 *   the changes: the device may hold garbage, an older log, or pages the kernel dropped after a
 *   failed writeback, none of which the replica's changes describe. The kernel rewrites the
 *   whole area at resume for the same reason.
 * - Until a header written by us is durable, the header block goes out with a zero (invalid)
 *   magic, and the new header follows in a second write + sync after the bitmap is durable: a
 *   valid header never points at a half-written bitmap. The kernel writes both at once. So the
 *   first batch costs two syncs, as does a change of nr_regions.
 *
 * Failures: a failed write or sync rejects the batch's promise with an Error naming the device,
 * and sets {@link DiskStore.failed}, which stays set (the kernel's disk log, too, reports "D"
 * until the log is built again). Nothing is retried on its own; the next write() retries, with a
 * whole-area rewrite, which is what the kernel does: a failed log device keeps the mirror
 * running and every later flush writes again.
 *
 * @module
 */

import type { DiskChanges, SyncMode } from "../log/types.ts";
import type { LogDeviceInfo } from "./device.ts";
import { type BlockFile, openBlockFile } from "./block_file.ts";
import {
  bitmapBytes,
  decodeHeader,
  encodeHeader,
  HEADER_AREA_BYTES,
  interpretLoad,
  type LoadResult,
  logAreaSize,
} from "./format.ts";

/** Options of {@link DiskStore.open}. */
export interface DiskStoreOptions {
  /** Region count of the mirror (fixes the bitmap length and the area size). */
  regionCount: number;
  /**
   * Called right after each fdatasync is issued, before it completes, with the number of syncs
   * so far. For tests and tracing (a caller arriving now must wait for the next sync). Must not
   * throw; an exception fails the batch.
   */
  onSyncStarted?: (syncs: number) => void;
}

/** Counters of one store, for status and the benchmark (syncs per concurrent flushes). */
export interface DiskStoreStats {
  /** write() calls accepted. */
  writes: number;
  /** Batches run (each serves one or more write() calls). */
  batches: number;
  /** fdatasync calls. */
  syncs: number;
  /** Write system calls (one per run of adjacent logical blocks). */
  pwrites: number;
  /** Bytes handed to write system calls. */
  bytesWritten: number;
  /** Most write() calls one batch served. */
  maxCallersPerBatch: number;
  /** Batches that failed. */
  failures: number;
  /** 1 when reads and writes bypass the page cache (O_DIRECT), 0 on the buffered fallback. */
  direct: 0 | 1;
}

/**
 * Logical blocks one batch may leave to a single write system call. Adjacent changed blocks are
 * merged into one write up to this size, so one call never pins more than 1 MiB of staging.
 */
export const MAX_WRITE_RUN_BYTES = 1 << 20;

/** Callers waiting for the same sync, and what they changed. */
class Batch {
  /** Logical blocks holding changed words. */
  readonly blocks = new Set<number>();
  callers = 0;
  /** Some caller needs the batch on stable storage (fdatasync), not only written. */
  sync = false;
  bytes: Uint8Array;
  nrRegions: number;
  readonly done: PromiseWithResolvers<void> = Promise.withResolvers<void>();

  constructor(bytes: Uint8Array, nrRegions: number) {
    this.bytes = bytes;
    this.nrRegions = nrRegions;
  }
}

/** The clean bitmap of one `clustered-disk` log on its device, written with group commit. */
export class DiskStore {
  readonly #file: BlockFile;
  readonly #device: LogDeviceInfo;
  readonly #regionCount: number;
  readonly #bitmapLength: number;
  readonly #wordCount: number;
  readonly #blockSize: number;
  readonly #areaSize: number;
  readonly #onSyncStarted?: (syncs: number) => void;
  /** What the device holds once the batch in flight is durable (header area + bitmap + pad). */
  readonly #staging: Uint8Array;
  readonly #stats: DiskStoreStats = {
    writes: 0,
    batches: 0,
    syncs: 0,
    pwrites: 0,
    bytesWritten: 0,
    maxCallersPerBatch: 0,
    failures: 0,
    direct: 0,
  };
  #pending: Batch | undefined;
  #running: Promise<void> | undefined;
  #loading = false;
  #closed = false;
  #failed = false;
  #lastError: Error | undefined;
  /** Rewrite the whole area in the next batch (first batch, or after a failure). */
  #needFullWrite = true;
  /** nr_regions of a header we know to be valid on disk; undefined while none is. */
  #headerNrRegions: number | undefined;
  /** Why the device is not open with O_DIRECT; reported by the first load(). */
  #openWarning: string | undefined;
  #openWarningReported = false;

  private constructor(
    opened: { file: BlockFile; warning?: string },
    device: LogDeviceInfo,
    options: DiskStoreOptions,
  ) {
    this.#file = opened.file;
    this.#openWarning = opened.warning;
    this.#stats.direct = opened.file.direct ? 1 : 0;
    this.#device = device;
    this.#regionCount = options.regionCount;
    this.#bitmapLength = bitmapBytes(options.regionCount);
    this.#wordCount = this.#bitmapLength / 4;
    this.#blockSize = device.logicalBlockSize;
    this.#areaSize = logAreaSize(options.regionCount, device.logicalBlockSize);
    // Every read and write is whole logical blocks (O_DIRECT refuses anything else); the area
    // is rounded up to them, and a run of MAX_WRITE_RUN_BYTES holds whole blocks.
    if (this.#areaSize % this.#blockSize !== 0 || MAX_WRITE_RUN_BYTES % this.#blockSize !== 0) {
      throw new Error(`Log area ${this.#areaSize} is not whole blocks of ${this.#blockSize}`);
    }
    this.#staging = new Uint8Array(this.#areaSize);
    this.#onSyncStarted = options.onSyncStarted;
  }

  /**
   * Opens the log device read-write. Rejects when the area does not fit
   * ("Log device 7:3 too small: need N bytes, has M") or the device cannot be opened; the node
   * answers the CTR with -EINVAL.
   */
  static async open(device: LogDeviceInfo, options: DiskStoreOptions): Promise<DiskStore> {
    const need = logAreaSize(options.regionCount, device.logicalBlockSize);
    if (device.sizeBytes < need) {
      throw new Error(
        `Log device ${device.name} too small: need ${need} bytes, has ${device.sizeBytes}`,
      );
    }
    let opened: { file: BlockFile; warning?: string };
    try {
      opened = await openBlockFile(device.path, {
        blockSize: device.logicalBlockSize,
        maxIoBytes: MAX_WRITE_RUN_BYTES,
      });
    } catch (cause) {
      throw new Error(`Cannot open log device ${device.name} (${device.path}): ${text(cause)}`, {
        cause,
      });
    }
    return new DiskStore(opened, device, options);
  }

  /** The device this store writes. */
  get device(): LogDeviceInfo {
    return this.#device;
  }

  /** Bytes of the log area (header area + bitmap, rounded up to the logical block size). */
  get areaSize(): number {
    return this.#areaSize;
  }

  /** True once a read or write of the device failed (status "D"); stays true. */
  get failed(): boolean {
    return this.#failed;
  }

  /** The last read or write error. */
  get lastError(): Error | undefined {
    return this.#lastError;
  }

  /**
   * Why the device is not open with O_DIRECT (the filesystem refused it), or undefined. The
   * first load() reports it too, in its `warning`.
   */
  get openWarning(): string | undefined {
    return this.#openWarning;
  }

  /** A copy of the counters. */
  get stats(): DiskStoreStats {
    return { ...this.#stats };
  }

  /**
   * Reads the whole log area and interprets it by the kernel's rules
   * ({@link interpretLoad}). A read error does not reject: like the kernel, it fails the log
   * device and reports every region out of sync (an image with `failed: true`).
   * Call it before the first write(); batches wait while it reads.
   */
  async load(sync: SyncMode): Promise<LoadResult> {
    this.#checkOpen();
    if (this.#running !== undefined || this.#loading) {
      throw new Error(`Log device ${this.#device.name}: load() while writes are in flight`);
    }
    this.#loading = true;
    try {
      const area = new Uint8Array(this.#areaSize);
      try {
        await this.#readAt(0, area);
      } catch (cause) {
        const error = this.#fail(`read of the log area failed: ${text(cause)}`, cause);
        return {
          image: { nrRegions: 0, cleanBits: new Uint8Array(this.#bitmapLength), failed: true },
          warning: `${error.message}: log device failed, every region out of sync`,
        };
      }
      const result = interpretLoad(area, { regionCount: this.#regionCount, sync });
      if (this.#openWarning !== undefined && !this.#openWarningReported) {
        // Said once: the node logs a load() warning, and loads once per constructed log.
        this.#openWarningReported = true;
        const warning = result.warning === undefined
          ? this.#openWarning
          : `${result.warning}; ${this.#openWarning}`;
        return { ...result, warning };
      }
      if (this.#stats.batches === 0) {
        // The staging copy starts as the device's content; the first batch rewrites it whole
        // anyway, but keeps a header we trust in place while the bitmap goes out.
        this.#staging.set(area);
        const trusted = result.image !== undefined && result.image.failed !== true;
        this.#headerNrRegions = trusted ? Number(decodeHeader(area).nrRegions) : undefined;
      }
      return result;
    } finally {
      this.#loading = false;
      this.#kick();
    }
  }

  /**
   * Makes the changed words of `bytes` (the whole clean bitmap, owned and mutated by the
   * replica) and a header saying `nrRegions` durable. Resolves once a sync that started after
   * this call completed (or at once when nothing differs from what is durable); rejects with an
   * Error naming the device when the write or sync failed ({@link failed} is then set).
   */
  write(
    bytes: Uint8Array,
    changes: DiskChanges,
    nrRegions: number,
    options: { sync?: boolean } = {},
  ): Promise<void> {
    try {
      this.#checkOpen();
      if (bytes.length !== this.#bitmapLength) {
        throw new RangeError(
          `Clean bitmap is ${bytes.length} bytes, the log of ${this.#regionCount} regions ` +
            `needs ${this.#bitmapLength}`,
        );
      }
      if (!Number.isSafeInteger(nrRegions) || nrRegions < 0 || nrRegions > this.#regionCount) {
        throw new RangeError(`nr_regions ${nrRegions} out of range 0..${this.#regionCount}`);
      }
      for (const word of changes.words) {
        if (!Number.isSafeInteger(word) || word < 0 || word >= this.#wordCount) {
          throw new RangeError(`Changed word ${word} out of range 0..${this.#wordCount - 1}`);
        }
      }
    } catch (err) {
      return Promise.reject(err);
    }
    this.#stats.writes++;
    const batch = this.#pending ??= new Batch(bytes, nrRegions);
    batch.bytes = bytes;
    batch.nrRegions = nrRegions;
    batch.callers++;
    if (options.sync !== false) batch.sync = true;
    for (const word of changes.words) {
      batch.blocks.add(Math.floor((HEADER_AREA_BYTES + word * 4) / this.#blockSize));
    }
    this.#kick();
    return batch.done.promise;
  }

  /** Waits for the writes in flight (their promises settle as usual), then closes the device. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    while (this.#running !== undefined) await this.#running;
    await this.#file.close();
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error(`Log device ${this.#device.name} is closed`);
  }

  /** Starts the batch loop unless it runs; the first batch starts in a microtask, so every
   * write() of the same synchronous run (one netlink drain) shares it. */
  #kick(): void {
    if (this.#running !== undefined || this.#loading || this.#pending === undefined) return;
    this.#running = new Promise<void>((resolve) => queueMicrotask(resolve)).then(() =>
      this.#drain()
    ).finally(() => {
      this.#running = undefined;
      // load() may have been waiting for nothing: a write queued during the final await.
      this.#kick();
    });
  }

  async #drain(): Promise<void> {
    while (this.#pending !== undefined && !this.#loading) {
      const batch = this.#pending;
      this.#pending = undefined;
      try {
        await this.#commit(batch);
        batch.done.resolve();
      } catch (err) {
        batch.done.reject(err);
      }
    }
  }

  async #commit(batch: Batch): Promise<void> {
    const stats = this.#stats;
    stats.batches++;
    stats.maxCallersPerBatch = Math.max(stats.maxCallersPerBatch, batch.callers);
    const full = this.#needFullWrite;
    const writeHeader = full || batch.nrRegions !== this.#headerNrRegions;
    if (this.#headerNrRegions === undefined) this.#staging.fill(0, 0, HEADER_AREA_BYTES);
    // Snapshot now, synchronously: the replica may change its bytes during our awaits.
    let blocks: number[];
    if (full) {
      this.#staging.set(batch.bytes, HEADER_AREA_BYTES);
      blocks = Array.from({ length: this.#areaSize / this.#blockSize }, (_, i) => i);
    } else {
      blocks = [...batch.blocks].sort((a, b) => a - b).filter((b) => this.#stage(b, batch.bytes));
    }
    if (blocks.length === 0 && !writeHeader) return;
    try {
      if (blocks.length > 0) {
        await this.#writeBlocks(blocks);
        // A batch of clean bits only is written but not synced (the kernel's disk log skips the
        // cache flush likewise): it survives a daemon crash in the page cache, and after a power
        // loss the region reads dirty and is resynced. The header goes out after a synced
        // bitmap, always.
        if (batch.sync || full || writeHeader) await this.#sync();
      }
      if (writeHeader) {
        this.#staging.set(encodeHeader(batch.nrRegions), 0);
        await this.#writeBlocks([0]);
        await this.#sync();
        this.#headerNrRegions = batch.nrRegions;
      }
      this.#needFullWrite = false;
    } catch (cause) {
      stats.failures++;
      // Which blocks reached the device is unknown, and after a failed writeback Linux may
      // have dropped the dirty pages (reporting the error once): rewrite everything next time.
      this.#needFullWrite = true;
      throw this.#fail(text(cause), cause);
    }
  }

  /** Copies the bitmap bytes of one block into staging; true if any differed. */
  #stage(block: number, bytes: Uint8Array): boolean {
    const staging = this.#staging;
    const start = Math.max(block * this.#blockSize, HEADER_AREA_BYTES);
    const end = Math.min((block + 1) * this.#blockSize, HEADER_AREA_BYTES + this.#bitmapLength);
    let changed = false;
    for (let i = start; i < end; i++) {
      const value = bytes[i - HEADER_AREA_BYTES];
      if (staging[i] !== value) {
        staging[i] = value;
        changed = true;
      }
    }
    return changed;
  }

  /** Writes sorted blocks from staging, merging adjacent ones (up to MAX_WRITE_RUN_BYTES). */
  async #writeBlocks(blocks: number[]): Promise<void> {
    const maxRun = Math.max(1, Math.floor(MAX_WRITE_RUN_BYTES / this.#blockSize));
    let i = 0;
    while (i < blocks.length) {
      let j = i + 1;
      while (j < blocks.length && blocks[j] === blocks[j - 1] + 1 && j - i < maxRun) j++;
      const offset = blocks[i] * this.#blockSize;
      await this.#writeAt(
        offset,
        this.#staging.subarray(offset, offset + (j - i) * this.#blockSize),
      );
      i = j;
    }
  }

  async #writeAt(offset: number, data: Uint8Array): Promise<void> {
    // Whole logical blocks only: the direct file would refuse anything else.
    if (offset % this.#blockSize !== 0 || data.length % this.#blockSize !== 0) {
      throw new Error(`write of ${data.length} bytes at offset ${offset} is not whole blocks`);
    }
    try {
      await this.#file.pwrite(data, offset);
    } catch (cause) {
      throw new Error(`write of ${data.length} bytes at offset ${offset} failed: ${text(cause)}`, {
        cause,
      });
    } finally {
      this.#stats.pwrites++;
    }
    this.#stats.bytesWritten += data.length;
  }

  async #readAt(offset: number, into: Uint8Array): Promise<void> {
    await this.#file.pread(into, offset);
  }

  async #sync(): Promise<void> {
    this.#stats.syncs++;
    const pending = this.#file.datasync();
    let hookError: { error: unknown } | undefined;
    try {
      this.#onSyncStarted?.(this.#stats.syncs);
    } catch (error) {
      hookError = { error };
    }
    // Await the sync even when the hook threw, so no rejection is left unobserved.
    try {
      await pending;
    } catch (cause) {
      throw new Error(`fdatasync failed: ${text(cause)}`, { cause });
    }
    if (hookError !== undefined) throw hookError.error;
  }

  #fail(message: string, cause: unknown): Error {
    this.#failed = true;
    this.#lastError = new Error(`Log device ${this.#device.name}: ${message}`, { cause });
    return this.#lastError;
  }
}

function text(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
