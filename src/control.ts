/**
 * The control socket: a unix stream socket on which `clogd status` asks a running daemon for
 * its state. One JSON request line in, one JSON response line out, then the server closes.
 *
 * @module
 */

/** Default control socket path. */
export const DEFAULT_CONTROL_PATH = "/run/clogd/clogd.sock";

/** Longest request line accepted (a request is a small JSON object). */
export const MAX_CONTROL_REQUEST = 4096;
/** Most control connections served at once; more wait in the kernel's listen backlog. */
export const MAX_CONTROL_CONNECTIONS = 16;
/** A client that sends no complete request within this time is dropped. */
export const CONTROL_READ_TIMEOUT_MS = 5_000;

/** A control request. */
export interface ControlRequest {
  cmd: "status" | "dump";
}

/** Handles one control request, returning a JSON-serializable answer. */
export type ControlHandler = (req: ControlRequest) => unknown;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A running control server. */
export class ControlServer {
  #listener: Deno.Listener;
  #path: string;
  #active = 0;
  #done: Promise<void>;

  private constructor(listener: Deno.Listener, path: string, handler: ControlHandler) {
    this.#listener = listener;
    this.#path = path;
    this.#done = this.#serve(handler);
  }

  /** Listen on `path` (its directory is created; a stale socket file is replaced). */
  static start(path: string, handler: ControlHandler): ControlServer {
    const dir = path.slice(0, path.lastIndexOf("/"));
    if (dir !== "") Deno.mkdirSync(dir, { recursive: true, mode: 0o755 });
    try {
      Deno.removeSync(path);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
    const listener = Deno.listen({ transport: "unix", path });
    Deno.chmodSync(path, 0o600);
    return new ControlServer(listener, path, handler);
  }

  async #serve(handler: ControlHandler): Promise<void> {
    for await (const conn of this.#listener) {
      if (this.#active >= MAX_CONTROL_CONNECTIONS) {
        conn.close();
        continue;
      }
      this.#active++;
      this.#handle(conn, handler).finally(() => this.#active--);
    }
  }

  async #handle(conn: Deno.Conn, handler: ControlHandler): Promise<void> {
    const timer = setTimeout(() => {
      try {
        conn.close();
      } catch { /* already closed */ }
    }, CONTROL_READ_TIMEOUT_MS);
    try {
      const line = await readLine(conn);
      let answer: unknown;
      try {
        const req = JSON.parse(line) as ControlRequest;
        if (
          req === null || typeof req !== "object" || (req.cmd !== "status" && req.cmd !== "dump")
        ) {
          answer = { error: `Unknown control request ${JSON.stringify(line.slice(0, 80))}` };
        } else {
          answer = handler(req);
        }
      } catch (err) {
        answer = { error: err instanceof Error ? err.message : String(err) };
      }
      await writeAll(conn, encoder.encode(JSON.stringify(answer, bigintJson) + "\n"));
    } catch {
      // client went away or sent garbage: nothing to answer
    } finally {
      clearTimeout(timer);
      try {
        conn.close();
      } catch { /* already closed */ }
    }
  }

  /** Stop listening and remove the socket file. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    await this.#done.catch(() => {});
    try {
      Deno.removeSync(this.#path);
    } catch { /* gone */ }
  }
}

/** Send one request to a daemon's control socket and return its parsed answer. */
export async function controlRequest(path: string, req: ControlRequest): Promise<unknown> {
  let conn: Deno.Conn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (err) {
    throw new Error(
      `Cannot reach clogd at ${path}: ${
        err instanceof Error ? err.message : err
      } (is it running? use --control PATH)`,
      { cause: err },
    );
  }
  try {
    await writeAll(conn, encoder.encode(JSON.stringify(req) + "\n"));
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    while (true) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
    }
    const text = decoder.decode(concat(chunks));
    return JSON.parse(text);
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

async function readLine(conn: Deno.Conn): Promise<string> {
  const buf = new Uint8Array(MAX_CONTROL_REQUEST);
  let len = 0;
  while (len < buf.length) {
    const n = await conn.read(buf.subarray(len));
    if (n === null) break;
    len += n;
    const nl = buf.subarray(0, len).indexOf(10);
    if (nl >= 0) return decoder.decode(buf.subarray(0, nl));
  }
  if (len >= buf.length) throw new Error("Control request too long");
  return decoder.decode(buf.subarray(0, len));
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

function bigintJson(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? value.toString() : value;
}
