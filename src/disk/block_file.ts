/**
 * The log device as a file read and written in whole logical blocks at given offsets, with two
 * implementations: O_DIRECT through libc over FFI ({@link openBlockFile} tries it first), and
 * Deno.FsFile through the page cache, the fallback for filesystems that refuse O_DIRECT.
 *
 * Why O_DIRECT: in cluster mode several machines share the log device. A buffered write that a
 * daemon left in its node's page cache (a clean-only write is not synced) can be written back
 * by that node's kernel later, over what another node wrote since; and a node that reads the log
 * at resume would read its own, possibly stale, cached pages. With O_DIRECT every write reaches
 * the device (its volatile cache at least: fdatasync still flushes that) before it returns, and
 * every read comes from the device.
 *
 * O_DIRECT wants the offset, the length and the buffer address aligned. The direct file copies
 * through one long-lived bounce buffer aligned to max(logical block size, 4096) and rejects any
 * offset or length that is not a multiple of the logical block size. Its calls are serialized,
 * so two calls never share the buffer.
 *
 * The FFI calls run on Deno worker threads (`nonblocking`), so the JS thread keeps serving the
 * kernel while the device works. errno is then the worker's: a failed pread or pwrite is repeated
 * once on the JS thread to learn it (both are idempotent); a failed fdatasync is not (Linux
 * reports a writeback error once, so a repeat may succeed and hide it) and its error names no
 * errno.
 *
 * @module
 */

import {
  close as closeFd,
  EINVAL,
  errno,
  ErrnoError,
  libc,
  O_CLOEXEC,
  O_DIRECT,
  O_RDWR,
  open as openFd,
  sizeT,
} from "../../ffi/libc.ts";

/** A device or file read and written at byte offsets, all at once or not at all. */
export interface BlockFile {
  /** True when reads and writes bypass this host's page cache (O_DIRECT). */
  readonly direct: boolean;
  /**
   * Fills `into` from `offset`. Rejects on an error, and with "unexpected end of device at byte
   * N" when the device ends first.
   */
  pread(into: Uint8Array, offset: number): Promise<void>;
  /** Writes all of `data` at `offset`, or rejects. */
  pwrite(data: Uint8Array, offset: number): Promise<void>;
  /** fdatasync: written data and the device's volatile cache to stable storage. */
  datasync(): Promise<void>;
  /** Closes once the call in progress settled. */
  close(): Promise<void>;
}

/** Options of {@link openBlockFile}. */
export interface OpenBlockFileOptions {
  /** Logical block size: every offset and length of the direct file is a multiple of it. */
  blockSize: number;
  /**
   * Bytes of the direct file's bounce buffer, a multiple of `blockSize`: the most one system
   * call moves. Larger calls are split. Allocated once per open file.
   */
  maxIoBytes: number;
}

/** An opened {@link BlockFile}, and why it is not direct when it is not. */
export interface OpenedBlockFile {
  /** The file. */
  file: BlockFile;
  /** Set when O_DIRECT was refused and the file goes through the page cache. */
  warning?: string;
}

/**
 * Alignment of the bounce buffer at least: a page, which satisfies any device's DMA alignment
 * (never above its logical block size, itself at most 64 KiB).
 */
export const MIN_BUFFER_ALIGNMENT = 4096;

/**
 * Opens `path` read-write with O_DIRECT; when the filesystem refuses O_DIRECT (EINVAL at open,
 * or at a probe read of the first block: its alignment needs exceed `blockSize`), opens it
 * through the page cache instead and says so in `warning`. Other errors reject.
 */
export async function openBlockFile(
  path: string,
  options: OpenBlockFileOptions,
): Promise<OpenedBlockFile> {
  const { blockSize, maxIoBytes } = options;
  if (!(blockSize > 0) || (blockSize & (blockSize - 1)) !== 0) {
    throw new RangeError(`Block size ${blockSize} is not a power of two`);
  }
  if (!(maxIoBytes >= blockSize) || maxIoBytes % blockSize !== 0) {
    throw new RangeError(`I/O size ${maxIoBytes} is not a multiple of block size ${blockSize}`);
  }
  let refused: string;
  try {
    const fd = openFd(path, O_RDWR | O_DIRECT | O_CLOEXEC);
    const file = new DirectFile(fd, blockSize, maxIoBytes);
    try {
      await file.pread(new Uint8Array(blockSize), 0);
    } catch (err) {
      // Only a refusal of the alignment counts; an end of device or EIO is the caller's to see.
      if (!(err instanceof ErrnoError && err.errno === EINVAL)) return { file };
      await file.close();
      throw err;
    }
    return { file };
  } catch (err) {
    if (!(err instanceof ErrnoError && err.errno === EINVAL)) throw err;
    refused = err.message;
  }
  const file = await Deno.open(path, { read: true, write: true });
  return {
    file: new BufferedFile(file),
    warning: `O_DIRECT refused (${refused}): reads and writes go through this host's page ` +
      `cache, which another node's writes do not update`,
  };
}

/** O_DIRECT file over libc, copying through one aligned bounce buffer. */
class DirectFile implements BlockFile {
  readonly direct = true;
  readonly #fd: number;
  readonly #blockSize: number;
  /** The aligned bounce buffer: a view into an ArrayBuffer held as long as the file. */
  readonly #bounce: Uint8Array;
  /** Settles when the last queued call did: calls run one at a time (one bounce buffer). */
  #tail: Promise<unknown> = Promise.resolve();
  #closed = false;

  constructor(fd: number, blockSize: number, maxIoBytes: number) {
    this.#fd = fd;
    this.#blockSize = blockSize;
    const alignment = Math.max(blockSize, MIN_BUFFER_ALIGNMENT);
    // An explicit ArrayBuffer's backing store lives outside the V8 heap and never moves, so
    // the address computed once stays right for the file's life.
    const raw = new ArrayBuffer(maxIoBytes + alignment);
    const address = Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw));
    const pad = Number(
      (BigInt(alignment) - BigInt(address) % BigInt(alignment)) % BigInt(alignment),
    );
    this.#bounce = new Uint8Array(raw, pad, maxIoBytes);
  }

  pread(into: Uint8Array, offset: number): Promise<void> {
    return this.#exclusive(async () => {
      this.#checkAligned("read", into.length, offset);
      const bounce = this.#bounce;
      let done = 0;
      // Each round moves at least one block or throws: at most into.length / blockSize rounds.
      while (done < into.length) {
        const length = Math.min(bounce.length, into.length - done);
        const n = await this.#io("pread", bounce, length, offset + done);
        into.set(bounce.subarray(0, n), done);
        done += n;
        // A short read only happens at the end of the device (also mid-block, for a file).
        if (n < length) throw new Error(`unexpected end of device at byte ${offset + done}`);
      }
    });
  }

  pwrite(data: Uint8Array, offset: number): Promise<void> {
    return this.#exclusive(async () => {
      this.#checkAligned("write", data.length, offset);
      const bounce = this.#bounce;
      let done = 0;
      // Each round moves at least one block or throws: at most data.length / blockSize rounds.
      while (done < data.length) {
        const length = Math.min(bounce.length, data.length - done);
        bounce.set(data.subarray(done, done + length));
        const n = await this.#io("pwrite", bounce, length, offset + done);
        // A partial write that ends mid-block cannot be continued with aligned I/O.
        if (n === 0 || n % this.#blockSize !== 0) {
          throw new Error(`pwrite wrote ${n} of ${length} bytes at offset ${offset + done}`);
        }
        // A short write of whole blocks (rare) continues with the rest, copied in again.
        done += n;
      }
    });
  }

  datasync(): Promise<void> {
    return this.#exclusive(async () => {
      this.#checkOpen();
      const result = await libc().fdatasync_nb(this.#fd);
      if (result < 0) throw new Error("fdatasync failed (errno set on a worker thread, not known)");
    });
  }

  close(): Promise<void> {
    return this.#exclusive(() => {
      if (this.#closed) return Promise.resolve();
      this.#closed = true;
      closeFd(this.#fd);
      return Promise.resolve();
    });
  }

  /** One pread or pwrite of `length` bytes of the bounce buffer; returns the bytes moved. */
  async #io(
    syscall: "pread" | "pwrite",
    bounce: Uint8Array,
    length: number,
    offset: number,
  ): Promise<number> {
    const c = libc();
    const size = sizeT(length);
    const at = BigInt(offset);
    const view = bounce.subarray(0, length);
    let n = syscall === "pread"
      ? await c.pread_nb(this.#fd, view, size, at)
      : await c.pwrite_nb(this.#fd, view, size, at);
    if (n < 0) {
      // errno belongs to the worker thread: repeat on this one (same bytes, same offset).
      n = syscall === "pread"
        ? c.pread(this.#fd, view, size, at)
        : c.pwrite(this.#fd, view, size, at);
      if (n < 0) throw new ErrnoError(syscall, errno());
    }
    return Number(n);
  }

  #checkAligned(what: string, length: number, offset: number): void {
    this.#checkOpen();
    if (length % this.#blockSize !== 0 || offset % this.#blockSize !== 0) {
      throw new RangeError(
        `Unaligned direct ${what} of ${length} bytes at offset ${offset}: both must be ` +
          `multiples of ${this.#blockSize}`,
      );
    }
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error("Block file is closed");
  }

  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#tail.then(fn);
    this.#tail = run.catch(() => {});
    return run;
  }
}

/** Buffered file through the page cache (Deno.FsFile): for filesystems without O_DIRECT. */
class BufferedFile implements BlockFile {
  readonly direct = false;
  readonly #file: Deno.FsFile;
  #closed = false;

  constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  async pread(into: Uint8Array, offset: number): Promise<void> {
    await this.#file.seek(offset, Deno.SeekMode.Start);
    let done = 0;
    // Each round reads at least one byte or throws: at most into.length rounds.
    while (done < into.length) {
      const n = await this.#file.read(into.subarray(done));
      if (n === null) throw new Error(`unexpected end of device at byte ${offset + done}`);
      done += n;
    }
  }

  async pwrite(data: Uint8Array, offset: number): Promise<void> {
    await this.#file.seek(offset, Deno.SeekMode.Start);
    let done = 0;
    // Each round writes at least one byte or throws: at most data.length rounds.
    while (done < data.length) {
      const n = await this.#file.write(data.subarray(done));
      if (n <= 0) throw new Error("wrote nothing");
      done += n;
    }
  }

  datasync(): Promise<void> {
    return this.#file.syncData();
  }

  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#file.close();
    }
    return Promise.resolve();
  }
}
