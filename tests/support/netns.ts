/**
 * Network namespaces for tests: isolated netlink connector "worlds" where a test plays the
 * kernel for a daemon (see environment.md: in a non-initial namespace nothing hears the real
 * kernel, and a multicast to group 7 reaches only sockets of that namespace).
 *
 * Two ways to put code in a namespace, both kept:
 * - {@link NetworkNamespace.spawn}: a child process under `ip netns exec` (the daemon and the
 *   kernel simulator as separate processes, as in integration tests). `ip netns exec` execs the
 *   command without forking, so the child's pid is the command's own.
 * - {@link NetworkNamespace.enter}: run synchronous code of this process in the namespace.
 *   The network namespace is a per-thread attribute, and a socket belongs for life to the
 *   namespace it was created in, so `enter` moves the calling thread in with `setns()`, runs
 *   the function (which opens its sockets) and moves the thread back before returning. No other
 *   JS runs in between (the function is synchronous), and Deno's other threads never move.
 *   This is simpler and sturdier than a Worker that `unshare()`s itself: no message passing,
 *   and the sockets are used on the test's own thread like in the daemon.
 *
 * Needs root (CAP_SYS_ADMIN) and iproute2. Names carry a prefix, the pid and a counter, so
 * parallel test processes never collide; {@link withNetns} deletes the namespace and kills
 * what it spawned, also when the test fails.
 *
 * @module
 */

import { CLONE_NEWNET, close, O_CLOEXEC, O_RDONLY, open, setns } from "../../ffi/libc.ts";

/** Default prefix of namespace names. */
export const NETNS_PREFIX = "clogd-test";

/** How long {@link NetworkNamespace.delete} waits for a killed child to exit, in ms. */
export const CHILD_EXIT_TIMEOUT_MS = 5000;

/** Options of {@link NetworkNamespace.spawn}; stdout and stderr are piped by default. */
export interface SpawnOptions {
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
  /** Default "null". */
  stdin?: "piped" | "inherit" | "null";
  /** Default "piped". */
  stdout?: "piped" | "inherit" | "null";
  /** Default "piped". */
  stderr?: "piped" | "inherit" | "null";
}

/** Options of {@link NetworkNamespace.create} and {@link withNetns}. */
export interface NetnsOptions {
  /** Name prefix; default {@link NETNS_PREFIX}. */
  prefix?: string;
  /** Bring the loopback interface up (for TCP/UDP on 127.0.0.1 inside). Default false. */
  loopback?: boolean;
  /** The exact name to use instead of prefix, pid and counter (the caller keeps it unique). */
  name?: string;
}

let counter = 0;

/** A named network namespace (`/run/netns/NAME`), deleted by {@link delete}. */
export class NetworkNamespace {
  /** The namespace's name, as `ip netns` knows it. */
  readonly name: string;
  #children = new Set<Deno.ChildProcess>();
  #deleted = false;

  private constructor(name: string) {
    this.name = name;
  }

  /**
   * Creates a namespace with a unique name starting with `prefix`. Its loopback interface is
   * down (netlink needs none) unless `loopback` is true.
   */
  static async create(options: NetnsOptions = {}): Promise<NetworkNamespace> {
    const name = options.name ?? `${options.prefix ?? NETNS_PREFIX}-${Deno.pid}-${++counter}`;
    await ip(["netns", "add", name]);
    const netns = new NetworkNamespace(name);
    if (options.loopback) {
      try {
        await ip(["-n", name, "link", "set", "lo", "up"]);
      } catch (error) {
        await netns.delete();
        throw error;
      }
    }
    return netns;
  }

  /**
   * Starts `command` (program and arguments) inside the namespace. The child is killed by
   * {@link delete} if it is still running then.
   */
  spawn(command: string[], options: SpawnOptions = {}): Deno.ChildProcess {
    if (this.#deleted) throw new Error(`Network namespace ${this.name} is deleted`);
    if (command.length === 0) throw new Error("Command must name a program");
    const child = new Deno.Command("ip", {
      args: ["netns", "exec", this.name, ...command],
      env: options.env,
      cwd: options.cwd,
      stdin: options.stdin ?? "null",
      stdout: options.stdout ?? "piped",
      stderr: options.stderr ?? "piped",
    }).spawn();
    this.#children.add(child);
    child.status.finally(() => this.#children.delete(child));
    return child;
  }

  /**
   * Runs synchronous `fn` with this thread inside the namespace; sockets it opens stay there.
   *
   * @throws TypeError if `fn` returns a promise (its awaited part would run outside)
   */
  enter<T>(fn: () => T): T {
    if (this.#deleted) throw new Error(`Network namespace ${this.name} is deleted`);
    const home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    try {
      const target = open(`/run/netns/${this.name}`, O_RDONLY | O_CLOEXEC);
      try {
        setns(target, CLONE_NEWNET);
      } finally {
        close(target);
      }
      let result: T;
      try {
        result = fn();
      } finally {
        // Failing to get back would leave every later socket of this thread in the namespace.
        setns(home, CLONE_NEWNET);
      }
      if (result instanceof Promise) {
        throw new TypeError("NetworkNamespace.enter() runs synchronous functions only");
      }
      return result;
    } finally {
      close(home);
    }
  }

  /** Kills the children still running (SIGKILL), waits for them, deletes the namespace. */
  async delete(): Promise<void> {
    if (this.#deleted) return;
    this.#deleted = true;
    const children = [...this.#children];
    for (const child of children) {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already exited between the check and the kill.
      }
    }
    await Promise.all(children.map((child) => withTimeout(child.status, CHILD_EXIT_TIMEOUT_MS)));
    await Promise.all(children.map((child) => cancelPipes(child)));
    await ip(["netns", "delete", this.name]);
  }

  /** `await using` support: deletes the namespace. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.delete();
  }
}

/** Runs `fn` with a fresh namespace and always deletes the namespace afterwards. */
export async function withNetns<T>(
  fn: (netns: NetworkNamespace) => T | Promise<T>,
  options: NetnsOptions = {},
): Promise<T> {
  const netns = await NetworkNamespace.create(options);
  try {
    return await fn(netns);
  } finally {
    await netns.delete();
  }
}

async function ip(args: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command("ip", { args, stdout: "null", stderr: "piped" })
    .output();
  if (code !== 0) {
    const message = new TextDecoder().decode(stderr).trim();
    throw new Error(`ip ${args.join(" ")} exited with ${code}: ${message}`);
  }
}

async function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// Unread pipes of a killed child would keep the test's resources open.
async function cancelPipes(child: Deno.ChildProcess): Promise<void> {
  for (const which of ["stdout", "stderr"] as const) {
    try {
      // The getter itself throws for a stream that is not piped.
      await child[which].cancel();
    } catch {
      // Not piped, or already consumed by the test.
    }
  }
}
