/**
 * The daemon's event loop: waits for its raw file descriptors (the netlink socket, later the
 * corosync fd) without spinning and without blocking Deno.
 *
 * Deno cannot wrap a raw fd, so the loop keeps exactly one nonblocking FFI `poll()` pending
 * over every watched fd plus an eventfd. While that call waits on a worker thread, Deno's own
 * event loop keeps running timers, unix sockets and promises (control socket, disk writes), so
 * the daemon's other work interleaves with it. Each hop through the worker thread costs about
 * 40 us, so every wake drains everything: each readable fd's handler reads until EAGAIN, then
 * the turn handlers run once (flush what the turn batched).
 *
 * `wake()` writes to the eventfd, so code outside the loop (signal listeners, promise
 * callbacks that queued work) makes the pending poll return at once. The poll timeout is
 * bounded ({@link POLL_TIMEOUT_MS}) so a missed wake delays work, never hangs it; when idle the
 * loop costs one wakeup per timeout.
 *
 * @module
 */

import {
  close,
  EAGAIN,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  errno,
  ErrnoError,
  eventfd,
  ignoreSignal,
  type Libc,
  libc,
  POLLERR,
  POLLFD,
  POLLHUP,
  POLLIN,
  POLLNVAL,
  SIG_IGN,
  signalDisposition,
  SIGUSR1,
} from "../ffi/libc.ts";

/** Longest a single poll waits, in milliseconds: bounds the delay of a missed wake. */
export const POLL_TIMEOUT_MS = 1000;

/**
 * Most fds one loop watches (the eventfd not counted). The daemon watches a handful: the
 * netlink socket and the cluster's fds.
 */
export const MAX_WATCHED_FDS = 64;

/** Most turn handlers (see {@link EventLoop.onTurn}). */
export const MAX_TURN_HANDLERS = 16;

/**
 * How often {@link EventLoop.installSignals} checks whether Deno has armed its SIGUSR1
 * inspector trigger yet, in milliseconds: the window in which a SIGUSR1 could still open it.
 */
export const INSPECTOR_SIGNAL_CHECK_MS = 25;

/**
 * How many checks before concluding this Deno arms no SIGUSR1 trigger (400 x 25 ms = 10 s; Deno
 * 2.9.6 arms it about 0.5 s after start).
 */
export const INSPECTOR_SIGNAL_CHECKS = 400;

/** Called when a watched fd is readable (or has an error); must read it until EAGAIN. */
export type ReadableHandler = () => void;

/** Options of {@link EventLoop}. */
export interface EventLoopOptions {
  /** Poll timeout in milliseconds; default {@link POLL_TIMEOUT_MS}. */
  timeoutMs?: number;
}

/** Callbacks of {@link EventLoop.installSignals}. */
export interface SignalHandlers {
  /** SIGTERM or SIGINT: shut down cleanly (typically ends with {@link EventLoop.stop}). */
  onTerminate: (signal: "SIGTERM" | "SIGINT") => void;
  /** SIGUSR2: dump the daemon's state. */
  onDump: () => void;
}

/** Counters since the loop was created. */
export interface EventLoopStats {
  /** Polls completed (each one a hop through a worker thread). */
  polls: number;
  /** Polls that ended by timeout with nothing ready. */
  timeouts: number;
  /** Times the eventfd was found signalled (one or more `wake()` calls). */
  wakes: number;
  /** Readable handler calls. */
  dispatches: number;
  /** Signals received through {@link EventLoop.installSignals}. */
  signals: number;
  /** True once SIGUSR1 was set to "ignore" after Deno armed its inspector trigger on it. */
  inspectorSignalDisarmed: boolean;
  /** Polls that failed on the worker thread (a signal landed there) and were redone here. */
  interrupted: number;
}

/** One pending `poll()` over many fds and an eventfd; see the module doc. */
export class EventLoop {
  #c: Libc;
  #timeoutMs: number;
  #eventFd: number;
  #handlers = new Map<number, ReadableHandler>();
  #turnHandlers: (() => void)[] = [];
  // The pollfd array handed to C: entry 0 is the eventfd. It has its own ArrayBuffer (off the
  // V8 heap, so it cannot move while the worker thread's poll reads it) and is replaced, never
  // modified, when the watched set changes, and only between polls.
  #pollfds = new Uint8Array(0);
  #fds = new Int32Array(0);
  #shorts = new Int16Array(0);
  #entries = 0;
  #pollCount = 0n;
  #watchChanged = true;
  #running = false;
  #stopping = false;
  #wakePending = false;
  #one = new BigUint64Array([1n]);
  #drain = new BigUint64Array(1);
  #oneBytes = new Uint8Array(this.#one.buffer);
  #drainBytes = new Uint8Array(this.#drain.buffer);

  /** Counters since the loop was created. */
  readonly stats: EventLoopStats = {
    polls: 0,
    timeouts: 0,
    wakes: 0,
    dispatches: 0,
    signals: 0,
    interrupted: 0,
    inspectorSignalDisarmed: false,
  };

  /** Creates the loop and its eventfd. */
  constructor(options: EventLoopOptions = {}) {
    const timeoutMs = options.timeoutMs ?? POLL_TIMEOUT_MS;
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2 ** 31 - 1) {
      throw new RangeError(`Poll timeout must be 0..2^31-1 ms, got ${timeoutMs}`);
    }
    this.#c = libc();
    this.#timeoutMs = timeoutMs;
    this.#eventFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }

  /** True while {@link run} is running. */
  get running(): boolean {
    return this.#running;
  }

  /**
   * Calls `onReadable` whenever `fd` is readable (or reports an error or hangup). Replaces an
   * earlier handler of the same fd; takes effect at once, also while a poll is pending.
   */
  watch(fd: number, onReadable: ReadableHandler): void {
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`Invalid fd ${fd}`);
    if (!this.#handlers.has(fd) && this.#handlers.size >= MAX_WATCHED_FDS) {
      throw new Error(`Cannot watch more than ${MAX_WATCHED_FDS} fds`);
    }
    this.#handlers.set(fd, onReadable);
    this.#changed();
  }

  /** Stops watching `fd`. Call it before closing the fd. */
  unwatch(fd: number): void {
    if (this.#handlers.delete(fd)) this.#changed();
  }

  /**
   * Calls `handler` once per turn, after the readable handlers: the place to flush what the
   * turn batched (e.g. send one bus message for all the requests just read).
   */
  onTurn(handler: () => void): void {
    if (this.#turnHandlers.length >= MAX_TURN_HANDLERS) {
      throw new Error(`Cannot add more than ${MAX_TURN_HANDLERS} turn handlers`);
    }
    this.#turnHandlers.push(handler);
  }

  /**
   * Makes the pending (or next) poll return at once. Cheap when a wake is already pending; a
   * no-op once the loop is closed (a late signal must not throw).
   */
  wake(): void {
    if (this.#wakePending || this.#eventFd < 0) return;
    const written = this.#c.write(this.#eventFd, this.#oneBytes, 8n);
    // EAGAIN means the counter is saturated: the eventfd is readable already.
    if (written < 0n) {
      const code = errno();
      if (code !== EAGAIN) throw new ErrnoError("write", code);
    }
    this.#wakePending = true;
  }

  /** Makes {@link run} return after the current turn; sticky until it does. */
  stop(): void {
    this.#stopping = true;
    this.wake();
  }

  /**
   * Runs turns until {@link stop}: poll, drain the eventfd, call the handlers of the readable
   * fds, call the turn handlers.
   *
   * @throws whatever a handler throws (the loop stops first), or ErrnoError if poll fails
   */
  async run(): Promise<void> {
    if (this.#running) throw new Error("EventLoop is already running");
    if (this.#eventFd < 0) throw new Error("EventLoop is closed");
    this.#running = true;
    try {
      while (!this.#stopping) {
        if (this.#watchChanged) this.#rebuild();
        // Held in locals: the array must stay referenced while the worker thread's poll uses it.
        const pollfds = this.#pollfds;
        const count = this.#pollCount;
        const ready = await this.#c.poll_nb(pollfds, count, this.#timeoutMs);
        this.stats.polls++;
        if (ready > 0) {
          this.#dispatch();
        } else if (ready === 0) {
          this.stats.timeouts++;
        } else {
          // errno belongs to the worker thread. Most likely EINTR (a signal landed there); a
          // poll without waiting, on this thread, either refreshes revents or fails again, and
          // then its errno is ours to read.
          this.stats.interrupted++;
          const again = this.#c.poll(pollfds, count, 0);
          if (again < 0) throw new ErrnoError("poll", errno());
          if (again > 0) this.#dispatch();
        }
        for (const handler of this.#turnHandlers) handler();
      }
    } finally {
      this.#running = false;
      this.#stopping = false;
    }
  }

  /**
   * Listens for SIGTERM and SIGINT (`onTerminate`) and SIGUSR2 (`onDump`); each signal calls
   * its callback, then wakes the loop. Returns a function that removes the listeners. The
   * callbacks run from Deno's signal listeners: an exception there is uncaught.
   *
   * SIGUSR1 is set to be ignored. Since 2.9.2, Deno answers SIGUSR1 (about 0.5 s after start)
   * by opening a V8 inspector on 127.0.0.1:9229 that any local user can connect to: code
   * execution as root. Its trigger shares the signal with JS listeners and cannot be turned
   * off, so the dump uses SIGUSR2, and SIGUSR1 is ignored from now on; once Deno arms its
   * trigger (it replaces our "ignore"), the next check sets "ignore" again.
   */
  installSignals(handlers: SignalHandlers): () => void {
    const onTerm = () => this.#signal(() => handlers.onTerminate("SIGTERM"));
    const onInt = () => this.#signal(() => handlers.onTerminate("SIGINT"));
    const onUsr2 = () => this.#signal(handlers.onDump);
    Deno.addSignalListener("SIGTERM", onTerm);
    Deno.addSignalListener("SIGINT", onInt);
    Deno.addSignalListener("SIGUSR2", onUsr2);
    ignoreSignal(SIGUSR1);
    let checks = 0;
    const timer = setInterval(() => {
      if (signalDisposition(SIGUSR1) !== SIG_IGN) {
        ignoreSignal(SIGUSR1);
        this.stats.inspectorSignalDisarmed = true;
        clearInterval(timer);
      } else if (++checks >= INSPECTOR_SIGNAL_CHECKS) {
        clearInterval(timer);
      }
    }, INSPECTOR_SIGNAL_CHECK_MS);
    // The check alone must not keep the process alive.
    Deno.unrefTimer(Number(timer));
    return () => {
      clearInterval(timer);
      Deno.removeSignalListener("SIGTERM", onTerm);
      Deno.removeSignalListener("SIGINT", onInt);
      Deno.removeSignalListener("SIGUSR2", onUsr2);
    };
  }

  /** Closes the eventfd. The loop must not be running; watched fds are not closed. */
  close(): void {
    if (this.#running) throw new Error("Cannot close a running EventLoop: stop() it first");
    if (this.#eventFd < 0) return;
    const fd = this.#eventFd;
    this.#eventFd = -1;
    this.#handlers.clear();
    close(fd);
  }

  #signal(callback: () => void): void {
    this.stats.signals++;
    try {
      callback();
    } finally {
      this.wake();
    }
  }

  #changed(): void {
    this.#watchChanged = true;
    // A pending poll still watches the old set: make it return so the next one uses the new.
    if (this.#running) this.wake();
  }

  #rebuild(): void {
    const count = this.#handlers.size + 1;
    const buffer = new ArrayBuffer(count * POLLFD.size);
    const fds = new Int32Array(buffer);
    const shorts = new Int16Array(buffer);
    const perEntry = POLLFD.size / 4;
    let i = 0;
    for (const fd of [this.#eventFd, ...this.#handlers.keys()]) {
      fds[i * perEntry] = fd;
      shorts[(i * POLLFD.size + POLLFD.events) / 2] = POLLIN;
      i++;
    }
    this.#pollfds = new Uint8Array(buffer);
    this.#fds = fds;
    this.#shorts = shorts;
    this.#entries = count;
    this.#pollCount = BigInt(count);
    this.#watchChanged = false;
  }

  #dispatch(): void {
    const fds = this.#fds;
    const shorts = this.#shorts;
    const perEntry = POLLFD.size / 4;
    for (let i = 0; i < this.#entries; i++) {
      const revents = shorts[(i * POLLFD.size + POLLFD.revents) / 2];
      if (revents === 0) continue;
      const fd = fds[i * perEntry];
      if (i === 0) {
        this.#drainWakes(revents);
        continue;
      }
      // A handler earlier in this turn may have unwatched (and closed) this fd.
      const handler = this.#handlers.get(fd);
      if (handler === undefined) continue;
      if (revents & POLLNVAL) {
        // The fd may have been closed and its number reused since this poll began.
        if (this.#watchChanged) continue;
        throw new Error(`Watched fd ${fd} is not open: unwatch() it before closing it`);
      }
      if (revents & (POLLIN | POLLERR | POLLHUP)) {
        this.stats.dispatches++;
        handler();
      }
    }
  }

  #drainWakes(revents: number): void {
    if (revents & POLLNVAL) throw new Error("The EventLoop's eventfd is not open");
    // An eventfd read returns the whole counter and resets it: one read drains every wake().
    const result = this.#c.read(this.#eventFd, this.#drainBytes, 8n);
    if (result < 0n) {
      const code = errno();
      if (code !== EAGAIN) throw new ErrnoError("read", code);
    }
    this.#wakePending = false;
    this.stats.wakes++;
  }
}
