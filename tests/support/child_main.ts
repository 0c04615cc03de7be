/**
 * The child side of `Corosync.spawnDeno()` scenario scripts (tests/support/cpg_child.ts,
 * tests/support/cpg_transport_child.ts): one JSON object per stdout line, and a main that runs
 * the scenario named by the first argument, turning a failure into an `{"event":"error"}` line
 * (with the cs_error_t of a failed corosync call) and exit status 1.
 *
 * @module
 */

import { CsError } from "../../ffi/cpg.ts";

/** Prints `line` as one JSON line on stdout (what `DenoChild.waitFor` reads). */
export function emit(line: Record<string, unknown>): void {
  console.log(JSON.stringify(line));
}

/** `value`, or an Error naming the missing option `name`. */
export function required(value: string | undefined, name: string): string {
  if (value === undefined) throw new Error(`Missing ${name}`);
  return value;
}

/** Runs `scenarios[Deno.args[0]]` with the other arguments; on failure emits an error line and exits 1. */
export async function runScenarios(
  scenarios: Record<string, (args: string[]) => Promise<void>>,
): Promise<void> {
  const [scenario, ...args] = Deno.args;
  try {
    const run = scenarios[scenario];
    if (run === undefined) {
      throw new Error(
        `Unknown scenario "${scenario}" (${Object.keys(scenarios).join(", ")})`,
      );
    }
    await run(args);
  } catch (error) {
    emit({
      event: "error",
      message: error instanceof Error ? error.message : String(error),
      code: error instanceof CsError ? error.code : undefined,
      stack: error instanceof Error ? error.stack : undefined,
    });
    Deno.exit(1);
  }
}
