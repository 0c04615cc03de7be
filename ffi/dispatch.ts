/**
 * What every corosync handle (ffi/cpg.ts, ffi/quorum.ts) needs around its library's dispatch
 * call: the callbacks C runs during it must not throw into C, so they record their errors here;
 * a dispatch must not start inside another (each puts a large buffer on the C stack); V8's
 * refusal to enter a callback on a too-small stack becomes an error that says what to do; and
 * the handle learns when the native call returned (a finalize() from a callback closes the
 * callbacks only then).
 *
 * @module
 */

/** What a handle's dispatch returns besides the library's result: what its callbacks threw. */
export interface DispatchOutcome {
  /** The cs_error_t the library's dispatch returned. */
  result: number;
  /** The errors recorded, first first, at most `maxRecorded`. */
  errors: unknown[];
  /** How many callbacks threw, recorded or not. */
  count: number;
}

/** The dispatch bookkeeping of one handle; see the module doc. */
export class CallbackDispatch {
  readonly #who: string;
  readonly #stackAdvice: string;
  readonly #maxRecorded: number;
  #errors: unknown[] = [];
  #count = 0;
  #running = false;

  /**
   * `who` names the handle's dispatch in the nesting error (e.g. "CpgHandle.dispatch()");
   * `stackAdvice` is the message for a callback that overflowed the stack; at most
   * `maxRecorded` errors are kept per dispatch (all are counted).
   */
  constructor(options: { who: string; stackAdvice: string; maxRecorded: number }) {
    this.#who = options.who;
    this.#stackAdvice = options.stackAdvice;
    this.#maxRecorded = options.maxRecorded;
  }

  /** True while the native dispatch runs (a callback is on the stack). */
  get running(): boolean {
    return this.#running;
  }

  /** Records an error a callback threw (called from the callback's catch). */
  record(error: unknown): void {
    if (this.#errors.length < this.#maxRecorded) this.#errors.push(error);
    this.#count++;
  }

  /**
   * Runs the native `dispatch`, then `returned()` (also when it threw), and hands over what the
   * callbacks threw meanwhile.
   *
   * @throws Error when called from a callback, or when a callback overflowed the stack
   */
  run(dispatch: () => number, returned: () => void): DispatchOutcome {
    if (this.#running) throw new Error(`${this.#who} called from inside a callback`);
    this.#running = true;
    let result: number;
    try {
      result = dispatch();
    } catch (error) {
      // Only a callback that V8 refused to enter gets here: every callback body catches.
      if (error instanceof RangeError && /call stack/i.test(error.message)) {
        throw new Error(this.#stackAdvice, { cause: error });
      }
      throw error;
    } finally {
      this.#running = false;
      returned();
    }
    const outcome = { result, errors: this.#errors, count: this.#count };
    this.#errors = [];
    this.#count = 0;
    return outcome;
  }
}
