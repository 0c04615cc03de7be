/**
 * The workload of the kernel simulator: what applications and the administrator do to the
 * simulated mirrors (create, I/O with a given depth and mix, suspend/resume cycles, status,
 * remove). Deterministic for a seed: the same bios in the same order per mirror; the requests
 * they cause interleave with the daemon's timing. Pure, like the model it drives.
 *
 * @module
 */

import { BAD_REQUEST_KINDS, type Command, type KernelHooks, type KernelModel } from "./model.ts";
import { Prng } from "./prng.ts";

/** Workload settings (per mirror). */
export interface WorkloadOptions {
  /** Bios per mirror (writes and reads); 0 with `durationMs` 0 means no I/O. */
  ios: number;
  /** With `ios` 0: submit bios for this long (ms of model time) instead. */
  durationMs: number;
  /** Bios in flight per mirror (the application's queue depth). */
  iodepth: number;
  /** Share of bios that are reads (0..1). */
  readShare: number;
  /** Share of the regions that are hot (0: uniform). */
  hotRegions: number;
  /** Share of the bios that go to the hot regions. */
  hotShare: number;
  /**
   * Start I/O only once the mirror is in sync. Else at once, during the resync: then, as in the
   * kernel, writes to regions the resync has not reached wait (IS_REMOTE_RECOVERING says
   * "recovering", and the kernel asks at most 4 times a second), so they crawl.
   */
  ioAfterSync: boolean;
  /** Suspend/resume cycles, spread evenly over the I/O. */
  suspendCycles: number;
  /** Time suspended per cycle, ms. */
  suspendPauseMs: number;
  /** A `dmsetup status` this often (ms; 0: never during the run). */
  statusEveryMs: number;
  /** A `dmsetup status` before the removal. */
  finalStatus: boolean;
  /** An IS_CLEAN probe (not a kernel request) this often (ms; 0: never). */
  probeCleanEveryMs: number;
  /** Deliberately bad requests per mirror after it is created. */
  badRequests: number;
  /** Before removing, wait for the resync to complete. */
  waitSync: boolean;
  /** Remove (suspend + DTR) each mirror at the end. */
  remove: boolean;
  /** Seed of the bio sequence. */
  seed: number;
}

/** Defaults: 1000 bios at depth 8 after the resync, 30 % reads, uniform, removed at the end. */
export const WORKLOAD_DEFAULTS: WorkloadOptions = {
  ios: 1000,
  durationMs: 0,
  iodepth: 8,
  readShare: 0.3,
  hotRegions: 0,
  hotShare: 0.9,
  ioAfterSync: true,
  suspendCycles: 0,
  suspendPauseMs: 0,
  statusEveryMs: 0,
  finalStatus: true,
  probeCleanEveryMs: 0,
  badRequests: 0,
  waitSync: true,
  remove: true,
  seed: 1,
};

/** Where one mirror's run is. */
export type Phase =
  | "creating"
  | "waiting-sync"
  | "io"
  | "suspending"
  | "paused"
  | "resuming"
  | "syncing"
  | "status"
  | "removing"
  | "done"
  | "failed";

/** Per-mirror progress. */
export interface RunSummary {
  phase: Phase;
  submitted: number;
  completed: number;
  suspends: number;
  /** Model time the I/O started and ended, ms (-1: not yet). */
  ioStartMs: number;
  ioEndMs: number;
}

const TAG_RESUME = 1;
const TAG_STATUS = 2;
const TAG_PROBE = 3;
const TAG_SUSPEND = 4;
const TAG_DURATION = 5;
const TAG_SYNC_POLL = 6;

/** How often a run waiting for the resync asks `dmsetup status` (as a test script would), ms. */
export const SYNC_POLL_MS = 100;

class Run {
  phase: Phase = "creating";
  submitted = 0;
  completed = 0;
  inflight = 0;
  suspends = 0;
  synced = false;
  pollPending = false;
  ioStart = -1;
  ioEnd = -1;
  hotStart = 0;
  hotCount = 1;
  constructor(readonly log: number, readonly rng: Prng) {}
}

/**
 * The stretch of a run when every mirror was doing I/O (from the last one starting to the first
 * one finishing): the throughput without creation, resync and removal.
 */
export interface SteadyWindow {
  startMs: number;
  endMs: number;
  /** Requests sent in the window (every try). */
  requests: number;
}

/** Drives a {@link KernelModel}: pass it as the model's hooks, then call {@link start}. */
export class Workload implements KernelHooks {
  readonly options: WorkloadOptions;
  #model: KernelModel | null = null;
  #runs: Run[] = [];
  #started = 0;
  #steadyStart = -1;
  #steadySent = 0;
  #steady: SteadyWindow | null = null;
  /** Set by {@link finishNow}: no more bios, no waiting for the resync. */
  #finishing = false;

  /** A workload; `options` override {@link WORKLOAD_DEFAULTS}. */
  constructor(options: Partial<WorkloadOptions> = {}) {
    this.options = { ...WORKLOAD_DEFAULTS, ...options };
    const o = this.options;
    if (!Number.isInteger(o.iodepth) || o.iodepth < 1) throw new RangeError("iodepth must be >= 1");
    if (!(o.readShare >= 0 && o.readShare <= 1)) {
      throw new RangeError("readShare must be within 0..1");
    }
    if (!(o.hotRegions >= 0 && o.hotRegions <= 1)) {
      throw new RangeError("hotRegions must be within 0..1");
    }
    if (!(o.hotShare >= 0 && o.hotShare <= 1)) throw new RangeError("hotShare must be within 0..1");
    if (!Number.isInteger(o.ios) || o.ios < 0) throw new RangeError("ios must be >= 0");
  }

  /**
   * True when every mirror is done (removed, or left as asked) or failed, and, for mirrors left
   * resumed, nothing the mirror sent in the background (a FLUSH, a CLEAR_REGION) still waits:
   * ending then would report that request unanswered.
   */
  get finished(): boolean {
    return this.#runs.length > 0 &&
      this.#runs.every((r) => r.phase === "done" || r.phase === "failed") &&
      (this.options.remove || this.#model === null || this.#model.outstanding === 0);
  }

  /** The window when every mirror did I/O, once it has closed (null before, or without I/O). */
  get steady(): SteadyWindow | null {
    return this.#steady;
  }

  /** Progress of every mirror. */
  summary(): RunSummary[] {
    return this.#runs.map((r) => ({
      phase: r.phase,
      submitted: r.submitted,
      completed: r.completed,
      suspends: r.suspends,
      ioStartMs: r.ioStart,
      ioEndMs: r.ioEnd,
    }));
  }

  /** Creates every mirror of `model` (whose hooks must be this workload) at model time `now`. */
  start(model: KernelModel, now: number): void {
    this.#model = model;
    for (let log = 0; log < model.mirrorCount; log++) {
      const run = new Run(
        log,
        new Prng((this.options.seed ^ Math.imul(log + 1, 0x9e3779b1)) >>> 0),
      );
      const n = model.regionCount(log);
      run.hotCount = Math.max(1, Math.round(this.options.hotRegions * n));
      run.hotStart = run.rng.int(n);
      this.#runs.push(run);
      model.command(log, "create");
    }
    void now;
  }

  /**
   * Ends the run early the way an administrator deactivates a mirror: no new bios, and once
   * those in flight completed, the final status and the removal (suspend, DTR) as at the end of
   * a run, without waiting for the resync. Mirrors still being created or suspended follow the
   * same path when they get there.
   */
  finishNow(now: number): void {
    this.#finishing = true;
    for (const run of this.#runs) {
      if (run.phase === "io" && run.inflight === 0) this.#ioFinished(run, now);
      else if (run.phase === "waiting-sync" || run.phase === "syncing") this.#afterSync(run);
    }
  }

  // KernelHooks

  ioDone(log: number, _write: boolean, _region: number, now: number): void {
    const run = this.#runs[log];
    run.completed++;
    run.inflight--;
    const o = this.options;
    if (run.phase === "io" && o.ios > 0 && run.suspends < o.suspendCycles) {
      const at = Math.floor((o.ios * (run.suspends + 1)) / (o.suspendCycles + 1));
      if (run.completed >= at) return this.#suspend(run);
    }
    if (run.phase === "io") this.#fill(run, now);
  }

  commandDone(log: number, command: Command, ok: boolean, now: number): void {
    const run = this.#runs[log];
    const model = this.#model!;
    switch (command) {
      case "create":
        if (!ok) {
          run.phase = "failed";
          return;
        }
        for (let i = 0; i < this.options.badRequests; i++) {
          model.sendBad(log, i % BAD_REQUEST_KINDS);
        }
        if (this.options.statusEveryMs > 0) {
          model.schedule(now + this.options.statusEveryMs, log, TAG_STATUS);
        }
        if (this.options.probeCleanEveryMs > 0) {
          model.schedule(now + this.options.probeCleanEveryMs, log, TAG_PROBE);
        }
        if (this.#finishing) {
          this.#afterSync(run);
        } else if (this.options.ioAfterSync && !run.synced) {
          run.phase = "waiting-sync";
          this.#pollSync(run, now);
        } else {
          this.#startIo(run, now);
        }
        return;
      case "suspend":
        if (run.phase !== "suspending") return;
        run.suspends++;
        run.phase = "paused";
        if (this.options.suspendPauseMs > 0) {
          model.schedule(now + this.options.suspendPauseMs, log, TAG_RESUME);
        } else this.#resume(run);
        return;
      case "resume":
        if (run.phase !== "resuming") return;
        run.phase = "io";
        this.#fill(run, now);
        return;
      case "status":
        if (run.phase === "status") this.#remove(run);
        else if (run.phase === "syncing" || run.phase === "waiting-sync") {
          this.#checkSynced(run, now);
        }
        return;
      case "remove":
        if (run.phase === "removing") run.phase = ok ? "done" : "failed";
        return;
    }
  }

  synced(log: number, now: number): void {
    const run = this.#runs[log];
    run.synced = true;
    if (run.phase === "waiting-sync") this.#startIo(run, now);
    else if (run.phase === "syncing") this.#afterSync(run);
  }

  timer(log: number, tag: number, now: number): void {
    const run = this.#runs[log];
    const model = this.#model!;
    const live = run.phase !== "done" && run.phase !== "failed" && run.phase !== "removing";
    switch (tag) {
      case TAG_RESUME:
        if (run.phase === "paused") this.#resume(run);
        return;
      case TAG_STATUS:
        if (!live) return;
        model.command(log, "status");
        model.schedule(now + this.options.statusEveryMs, log, TAG_STATUS);
        return;
      case TAG_PROBE: {
        if (!live) return;
        const n = model.regionCount(log);
        let region = model.checker(log).anyMarked(run.rng.int(n));
        if (region < 0) region = run.rng.int(n);
        model.probeClean(log, region);
        model.schedule(now + this.options.probeCleanEveryMs, log, TAG_PROBE);
        return;
      }
      case TAG_SUSPEND:
        if (run.phase === "io") this.#suspend(run);
        return;
      case TAG_DURATION:
        if (run.phase === "io" && run.inflight === 0) this.#fill(run, now);
        return;
      case TAG_SYNC_POLL:
        run.pollPending = false;
        if (run.phase === "syncing" || run.phase === "waiting-sync") model.command(log, "status");
        return;
    }
  }

  // Internals

  #sentSoFar(): number {
    let n = 0;
    for (const x of this.#model!.stats.sent) n += x;
    return n;
  }

  #startIo(run: Run, now: number): void {
    run.phase = "io";
    run.ioStart = now;
    if (++this.#started === this.#runs.length) {
      this.#steadyStart = now;
      this.#steadySent = this.#sentSoFar();
    }
    const o = this.options;
    if (o.ios === 0 && o.durationMs > 0) {
      const model = this.#model!;
      for (let k = 1; k <= o.suspendCycles; k++) {
        model.schedule(now + (o.durationMs * k) / (o.suspendCycles + 1), run.log, TAG_SUSPEND);
      }
      model.schedule(now + o.durationMs, run.log, TAG_DURATION);
    }
    this.#fill(run, now);
  }

  #more(run: Run, now: number): boolean {
    if (this.#finishing) return false;
    const o = this.options;
    if (o.ios > 0) return run.submitted < o.ios;
    if (o.durationMs > 0) return now < run.ioStart + o.durationMs;
    return false;
  }

  #fill(run: Run, now: number): void {
    const o = this.options;
    const model = this.#model!;
    while (run.inflight < o.iodepth && this.#more(run, now)) {
      const n = model.regionCount(run.log);
      const region = run.rng.chance(o.hotShare) && o.hotRegions > 0
        ? (run.hotStart + run.rng.int(run.hotCount)) % n
        : run.rng.int(n);
      const write = !run.rng.chance(o.readShare);
      run.submitted++;
      run.inflight++;
      model.submitIo(run.log, write, region);
      // The submission may complete synchronously only through timers, so inflight is exact.
    }
    if (run.inflight === 0 && !this.#more(run, now)) this.#ioFinished(run, now);
  }

  #suspend(run: Run): void {
    run.phase = "suspending";
    this.#model!.command(run.log, "suspend");
  }

  #resume(run: Run): void {
    run.phase = "resuming";
    this.#model!.command(run.log, "resume");
  }

  #ioFinished(run: Run, now: number): void {
    run.ioEnd = now;
    if (this.#steady === null && this.#steadyStart >= 0 && run.submitted > 0) {
      this.#steady = {
        startMs: this.#steadyStart,
        endMs: now,
        requests: this.#sentSoFar() - this.#steadySent,
      };
    }
    if (this.options.waitSync && !run.synced && !this.#finishing) {
      run.phase = "syncing";
      this.#pollSync(run, now);
      return;
    }
    this.#afterSync(run);
  }

  /**
   * The worker's own GET_SYNC_COUNT usually reports the end of the resync (synced hook); poll
   * status too, for a mirror whose worker has nothing left to wake it.
   */
  #pollSync(run: Run, now: number): void {
    if (run.pollPending) return;
    run.pollPending = true;
    this.#model!.schedule(now + SYNC_POLL_MS, run.log, TAG_SYNC_POLL);
  }

  /**
   * Waiting for the resync the way a script does: `dmsetup status` until the sync count reaches
   * the region count (the mirror's own in-sync flag is only updated by its worker).
   */
  #checkSynced(run: Run, now: number): void {
    const model = this.#model!;
    if (model.syncCount(run.log) >= model.regionCount(run.log)) {
      run.synced = true;
      if (run.phase === "waiting-sync") this.#startIo(run, now);
      else this.#afterSync(run);
      return;
    }
    this.#pollSync(run, now);
  }

  #afterSync(run: Run): void {
    if (this.options.finalStatus) {
      run.phase = "status";
      this.#model!.command(run.log, "status");
      return;
    }
    this.#remove(run);
  }

  #remove(run: Run): void {
    if (!this.options.remove) {
      run.phase = "done";
      return;
    }
    run.phase = "removing";
    this.#model!.command(run.log, "remove");
  }
}
