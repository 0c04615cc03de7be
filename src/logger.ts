/**
 * Logging to stderr in a journal-friendly form: `clogd[pid] <level>: <message>`.
 *
 * systemd's journal and syslog collectors take stderr as is; levels map to syslog priorities
 * with the `<N>` prefix when CLOGD_LOG_PRIORITY_PREFIX=1 (sd-daemon convention).
 *
 * @module
 */

/** Log levels, most severe first. */
export const LEVELS = ["error", "warn", "info", "debug"] as const;
/** One log level. */
export type Level = typeof LEVELS[number];

const PRIORITY: Record<Level, number> = { error: 3, warn: 4, info: 6, debug: 7 };
const encoder = new TextEncoder();

/**
 * Rate limit for repeated messages of one key (e.g. one malformed-input class): at most this many
 * lines per {@link RATE_WINDOW_MS}, then one summary line. A flood of bad datagrams must not turn
 * into a flood of log writes (the predecessor spun writing a line per loop).
 */
export const RATE_MAX_LINES = 20;
/** Window of the per-key rate limit. */
export const RATE_WINDOW_MS = 10_000;

/** A leveled logger. */
export class Logger {
  #level: number;
  #prefix: string;
  #priorityPrefix: boolean;
  #rate = new Map<string, { start: number; count: number; suppressed: number }>();

  constructor(level: Level = "info", name = "clogd") {
    this.#level = LEVELS.indexOf(level);
    this.#prefix = `${name}[${Deno.pid}]`;
    this.#priorityPrefix = Deno.env.get("CLOGD_LOG_PRIORITY_PREFIX") === "1";
  }

  /** Change the level at run time. */
  setLevel(level: Level): void {
    this.#level = LEVELS.indexOf(level);
  }

  /** True when messages of `level` are written. */
  enabled(level: Level): boolean {
    return LEVELS.indexOf(level) <= this.#level;
  }

  error(msg: string): void {
    this.#write("error", msg);
  }
  warn(msg: string): void {
    this.#write("warn", msg);
  }
  info(msg: string): void {
    this.#write("info", msg);
  }
  debug(msg: string): void {
    if (this.#level >= 3) this.#write("debug", msg);
  }

  /** Log `msg` at `level`, at most {@link RATE_MAX_LINES} times per window for `key`. */
  limited(level: Level, key: string, msg: string): void {
    if (!this.enabled(level)) return;
    const now = Date.now();
    let r = this.#rate.get(key);
    if (r === undefined || now - r.start > RATE_WINDOW_MS) {
      if (r !== undefined && r.suppressed > 0) {
        this.#write(level, `${r.suppressed} more "${key}" messages suppressed`);
      }
      r = { start: now, count: 0, suppressed: 0 };
      this.#rate.set(key, r);
      if (this.#rate.size > 1024) this.#rate.clear(); // bounded: keys are classes, not inputs
    }
    if (r.count < RATE_MAX_LINES) {
      r.count++;
      this.#write(level, msg);
    } else {
      r.suppressed++;
    }
  }

  #write(level: Level, msg: string): void {
    if (LEVELS.indexOf(level) > this.#level) return;
    const pri = this.#priorityPrefix ? `<${PRIORITY[level]}>` : "";
    const line = `${pri}${this.#prefix} ${level}: ${msg}\n`;
    try {
      Deno.stderr.writeSync(encoder.encode(line));
    } catch {
      // stderr gone (closed pipe): nothing better to do; never crash on logging
    }
  }
}
