/**
 * What the real-kernel tests share: finding the tools they need, and running the host-side
 * scripts (scripts/vm/) with the PATH and Deno the guests should use.
 *
 * @module
 */

/** Repository root. */
export const REPO = new URL("../../", import.meta.url).pathname;

/** PATH with the sbin directories, where qemu's helpers, losetup and ss live. */
function sbinPath(): string {
  return `${Deno.env.get("PATH") ?? ""}:/usr/sbin:/sbin`;
}

/** True when `name` is a command on the PATH (sbin included). */
export async function findTool(name: string): Promise<boolean> {
  const probe = new Deno.Command("/bin/sh", {
    args: ["-c", 'command -v "$1"', "sh", name],
    stdout: "null",
    stderr: "null",
    env: { PATH: sbinPath() },
  });
  return (await probe.output()).success;
}

/** The tools of `tools` that are not installed. */
export async function missingTools(tools: readonly string[]): Promise<string[]> {
  const missing: string[] = [];
  for (const tool of tools) {
    if (!(await findTool(tool))) missing.push(tool);
  }
  return missing;
}

/** A finished command. */
export interface Ran {
  code: number;
  stdout: string;
  stderr: string;
  seconds: number;
}

/**
 * Runs `command` in the repository, output captured. The guests run clogd with the deno that
 * runs the test (CLOGD_DENO), unless told otherwise.
 */
export async function run(command: string, args: string[]): Promise<Ran> {
  const started = performance.now();
  const output = await new Deno.Command(command, {
    args,
    cwd: REPO,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: {
      PATH: sbinPath(),
      CLOGD_DENO: Deno.env.get("CLOGD_DENO") ?? Deno.execPath(),
    },
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
    seconds: (performance.now() - started) / 1000,
  };
}

/** The last `lines` lines of `text`. */
export function tail(text: string, lines: number): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

/** A file's text, or "" when it does not exist. */
export async function readText(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "";
    throw error;
  }
}

/** Lines of build_image.sh's stderr quoted when it fails. */
const BUILD_FAILURE_LINES = 80;

/**
 * Builds the guest image (scripts/vm/build_image.sh; cached, so at once after the first time) and
 * returns its directory. `who` names the test in the line saying how long it took.
 *
 * @throws Error (an assertion) quoting the script's stderr when it fails or prints no directory
 */
export async function guestImage(who: string): Promise<string> {
  const build = await run("bash", ["scripts/vm/build_image.sh"]);
  console.log(`${who}: guest image ready in ${build.seconds.toFixed(1)} s`);
  if (build.code !== 0) {
    throw new Error(
      `build_image.sh failed (exit ${build.code}):\n${tail(build.stderr, BUILD_FAILURE_LINES)}`,
    );
  }
  const image = build.stdout.trim().split("\n").at(-1) ?? "";
  if (image.length === 0) throw new Error("build_image.sh printed no image directory");
  return image;
}
