/**
 * Runs a real clogd daemon (`main.ts serve`) in a network namespace for integration tests, and
 * a kernel-role netlink peer in the same namespace that sends requests and waits for replies.
 *
 * @module
 */

import { NetworkNamespace } from "./netns.ts";
import { NetlinkSocket } from "../../src/kernel/netlink.ts";
import {
  type DecodedReply,
  decodeReply,
  encodeRequest,
  type RequestSpec,
} from "../../src/kernel/codec.ts";
import { CN_IDX_DM } from "../../src/kernel/protocol.ts";
import { controlRequest } from "../../src/control.ts";
import type { DaemonStatus } from "../../src/cli/status.ts";

/** Repository root. */
export const REPO = new URL("../../", import.meta.url).pathname;
/** Deno binary running the tests (the project's pinned one). */
export const DENO = Deno.execPath();
/** How long a test waits for a daemon to come up. */
export const START_TIMEOUT_MS = 20_000;

/** A daemon process under test. */
export class DaemonProcess {
  readonly netns: NetworkNamespace;
  readonly controlPath: string;
  readonly dir: string;
  #child: Deno.ChildProcess;
  #stderr = "";
  #stderrDone: Promise<void>;
  #exited = false;
  readonly status: Promise<Deno.CommandStatus>;

  readonly #ownsDir: boolean;

  private constructor(
    netns: NetworkNamespace,
    dir: string,
    child: Deno.ChildProcess,
    ownsDir: boolean,
  ) {
    this.netns = netns;
    this.dir = dir;
    this.#ownsDir = ownsDir;
    this.controlPath = `${dir}/clogd.sock`;
    this.#child = child;
    this.#stderrDone = this.#collect();
    this.status = child.status.then((s) => {
      this.#exited = true;
      return s;
    });
  }

  /** Start `clogd serve --standalone --accept-user-peers` in `netns`, wait until it answers. */
  static async start(
    netns: NetworkNamespace,
    options: {
      dir?: string;
      args?: string[];
      userPeers?: boolean;
      /** "standalone" (default) or "cluster" (the namespace's corosync must run). */
      mode?: "standalone" | "cluster";
    } = {},
  ): Promise<DaemonProcess> {
    const ownsDir = options.dir === undefined;
    const dir = options.dir ?? await Deno.makeTempDir({ prefix: "clogd-daemon-" });
    const args = [
      "run",
      "--allow-all",
      "--v8-flags=--stack-size=2048",
      `${REPO}main.ts`,
      "serve",
      options.mode === "cluster" ? "--cluster" : "--standalone",
      ...(options.userPeers === false ? [] : ["--accept-user-peers"]),
      "--control",
      `${dir}/clogd.sock`,
      "--pidfile",
      `${dir}/clogd.pid`,
      ...(options.args ?? []),
    ];
    const child = netns.spawn([DENO, ...args], { stdout: "null", stderr: "piped" });
    const d = new DaemonProcess(netns, dir, child, ownsDir);
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (true) {
      if (d.#exited) throw new Error(`clogd exited during start-up:\n${d.stderr}`);
      try {
        await d.query();
        return d;
      } catch {
        if (Date.now() > deadline) {
          d.kill("SIGKILL");
          throw new Error(
            `clogd did not answer on ${d.controlPath} within ${START_TIMEOUT_MS} ms:\n${d.stderr}`,
          );
        }
        await sleep(50);
      }
    }
  }

  async #collect(): Promise<void> {
    const dec = new TextDecoder();
    try {
      for await (const chunk of this.#child.stderr) {
        this.#stderr += dec.decode(chunk, { stream: true });
      }
    } catch { /* killed */ }
  }

  /** The daemon's pid. */
  get pid(): number {
    return this.#child.pid;
  }

  /** What the daemon logged so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /** True once the process exited. */
  get exited(): boolean {
    return this.#exited;
  }

  /** Ask the control socket for status. */
  async query(): Promise<DaemonStatus> {
    return await controlRequest(this.controlPath, { cmd: "status" }) as DaemonStatus;
  }

  /** Send a signal (ignored if it already exited). */
  kill(signal: Deno.Signal): void {
    if (this.#exited) return;
    try {
      this.#child.kill(signal);
    } catch { /* exited meanwhile */ }
  }

  /** Wait until stderr contains `text` (or throw after `ms`). */
  async waitLog(text: string | RegExp, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    const has = () =>
      typeof text === "string" ? this.#stderr.includes(text) : text.test(this.#stderr);
    while (!has()) {
      if (Date.now() > deadline) {
        throw new Error(`clogd did not log ${text} within ${ms} ms:\n${this.#stderr}`);
      }
      await sleep(20);
    }
  }

  /** SIGKILL and wait for exit; removes the daemon's directory if {@link start} made it. */
  async stop(): Promise<void> {
    this.kill("SIGKILL");
    await this.status;
    await this.#stderrDone;
    if (this.#ownsDir) await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }
}

/** A kernel-role peer in a namespace: sends requests to group 7, matches replies by seq. */
export class KernelPeer {
  readonly sock: NetlinkSocket;
  #buf = new Uint8Array(65536);
  #seq = 1;
  /** Replies received that nobody was waiting for, by seq. */
  readonly stray = new Map<number, DecodedReply>();

  constructor(netns: NetworkNamespace) {
    this.sock = netns.enter(() => new NetlinkSocket({ role: "kernel" }));
  }

  /** Next request seq. */
  nextSeq(): number {
    return this.#seq++;
  }

  /** Multicast raw bytes to the daemon. */
  sendRaw(bytes: Uint8Array): void {
    if (!this.sock.send(bytes, { group: CN_IDX_DM })) {
      throw new Error("Send to group 7 would block");
    }
  }

  /** Send a request built from `spec` (seq filled in if 0) and wait for its reply. */
  async request(
    spec: Omit<RequestSpec, "seq"> & { seq?: number },
    timeoutMs = 5000,
  ): Promise<DecodedReply & { ok: true }> {
    const seq = spec.seq ?? this.nextSeq();
    this.sendRaw(encodeRequest({ ...spec, seq }, { cnSeq: seq }));
    return await this.waitReply(seq, timeoutMs);
  }

  /** Wait for the reply with `seq`; throws on timeout. */
  async waitReply(seq: number, timeoutMs = 5000): Promise<DecodedReply & { ok: true }> {
    const deadline = Date.now() + timeoutMs;
    while (true) {
      const early = this.stray.get(seq);
      if (early !== undefined && early.ok) {
        this.stray.delete(seq);
        return early;
      }
      const got = this.sock.recv(this.#buf);
      if (got === null) {
        if (Date.now() > deadline) throw new Error(`No reply to seq ${seq} within ${timeoutMs} ms`);
        await sleep(1);
        continue;
      }
      const r = decodeReply(this.#buf.slice(0, got.length), { layout: "auto" });
      if (!r.ok) throw new Error(`Undecodable reply: ${r.reason}`);
      if (r.seq === seq) return r;
      this.stray.set(r.seq, r);
    }
  }

  /** True if any datagram arrives within `ms`. */
  async anyReplyWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (this.sock.recv(this.#buf) !== null) return true;
      await sleep(5);
    }
    return false;
  }

  close(): void {
    this.sock.close();
  }
}

/** Sleep `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
