/**
 * Closed-loop write-cycle load over real netlink, for benchmarks: N I/O slots each run the
 * kernel's write cycle on its own region (MARK + FLUSH, then CLEAR + FLUSH; or with
 * --integrated one FLUSH carrying the mark, then CLEAR + FLUSH) as fast as replies come back.
 * Works against clogd and against the bare echo responder (it checks seq and error only), so
 * both are measured with the same client in the same run.
 *
 *   deno run --allow-all scripts/bench/load.ts --inflight 32 --seconds 5 [--integrated]
 *     [--uuid U] [--ctr "<ctr string>"] [--setup]   (--setup: CTR + RESUME first, for clogd)
 *     [--region-base N] [--start-at EPOCH_MS] [--timeout-ms N] [--trace PATH]
 *
 * For cluster benchmarks (scripts/bench/cluster.ts), where one such client runs per node on one
 * shared log: --region-base offsets the slots' regions (nodes write distinct regions, as the
 * kernels of a shared mirror mostly do); --start-at starts the measured window at a wall-clock
 * time (after setup), so that clients started one after the other load the cluster at once;
 * --timeout-ms gives up on a request after that long (counted in `timeouts` and in `errors`; the
 * slot goes on), so that a lost answer cannot hang the run; --trace writes every request as four
 * float64 (the machine's byte order, read back by the same machine): request type, the answer's
 * errno (0: success), wall-clock ms it was sent, wall-clock ms it was answered (NaN: timed out).
 * The instance is always luid {@link LUID} (0xffff888077770000), so a peer can set up the log
 * for it.
 *
 * Prints one JSON line: requests, requests/s, FLUSH latency p50/p99 (us).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { NetlinkSocket } from "../../src/kernel/netlink.ts";
import { EventLoop } from "../../src/loop.ts";
import { decodeReply, encodeRequest } from "../../src/kernel/codec.ts";
import { CN_IDX_DM, CONNECTOR_MAX_MSG_SIZE, RequestType } from "../../src/kernel/protocol.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    inflight: { type: "string", default: "1" },
    seconds: { type: "string", default: "5" },
    integrated: { type: "boolean", default: false },
    uuid: { type: "string", default: "bench-mirror-uuid" },
    ctr: { type: "string", default: "" },
    setup: { type: "boolean", default: false },
    regions: { type: "string", default: "4096" },
    "region-base": { type: "string", default: "0" },
    "start-at": { type: "string", default: "0" },
    "timeout-ms": { type: "string", default: "0" },
    trace: { type: "string", default: "" },
  },
});
const inflight = Number(values.inflight);
const seconds = Number(values.seconds);
const regionCount = Number(values.regions);
const regionBase = Number(values["region-base"]);
const startAt = Number(values["start-at"]);
const timeoutMs = Number(values["timeout-ms"]);
const ctr = values.ctr || `${regionCount * 1024} clustered-core 1024 nosync`;
const LUID = 0xffff888077770000n;

const sock = new NetlinkSocket({ role: "kernel" });
const loop = new EventLoop();
const buf = new Uint8Array(CONNECTOR_MAX_MSG_SIZE + 64);
let seq = 1;

function u64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
}
const EMPTY = new Uint8Array(0);

/** Waiters by seq. */
const waiters = new Map<number, (errno: number) => void>();
/** The errno a request that timed out resolves with (no real errno is this). */
const TIMED_OUT = -100_000;
/** Per request with --trace: type, errno, sent and answered wall-clock ms (NaN: timed out). */
const trace: number[] = [];
const tracing = values.trace !== "";
/** Wall clock in ms with sub-ms resolution (comparable across processes of this machine). */
const wallMs = () => performance.timeOrigin + performance.now();
let timeouts = 0;

function send(type: number, payload: Uint8Array): Promise<number> {
  if (!tracing && timeoutMs <= 0) return sendPlain(type, payload);
  const sentAt = wallMs();
  return new Promise((resolve) => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let done = false;
    const finish = (errno: number) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (tracing) trace.push(type, errno, sentAt, errno === TIMED_OUT ? NaN : wallMs());
      if (errno === TIMED_OUT) timeouts++;
      resolve(errno);
    };
    const s = seq;
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        waiters.delete(s);
        finish(TIMED_OUT);
      }, timeoutMs);
    }
    sendPlain(type, payload).then(finish);
  });
}

function sendPlain(type: number, payload: Uint8Array): Promise<number> {
  const s = seq++;
  const bytes = encodeRequest({
    layout: "current",
    luid: LUID,
    uuid: values.uuid,
    version: 3,
    seq: s,
    type,
    payload,
  }, {
    cnSeq: s,
  });
  return new Promise((resolve) => {
    waiters.set(s, resolve);
    if (!sock.send(bytes, { group: CN_IDX_DM })) {
      waiters.delete(s);
      resolve(-1);
    }
  });
}

loop.watch(sock.fd, () => {
  for (let got = sock.recv(buf); got !== null; got = sock.recv(buf)) {
    const r = decodeReply(buf.subarray(0, got.length), { layout: "auto" });
    if (!r.ok) continue;
    const w = waiters.get(r.seq);
    if (w !== undefined) {
      waiters.delete(r.seq);
      w(r.errno);
    }
  }
});
const running = loop.run();

if (values.setup) {
  const e1 = await send(RequestType.CTR, new TextEncoder().encode(ctr));
  const e2 = await send(RequestType.RESUME, EMPTY);
  if (e1 !== 0 || e2 !== 0) {
    console.error(`setup failed: CTR ${e1} RESUME ${e2}`);
    Deno.exit(1);
  }
}

let requests = 0;
let errors = 0;
const flushLat: number[] = [];
if (startAt > 0) {
  const wait = startAt - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
}
trace.length = 0; // setup is not part of the run
const deadline = performance.now() + seconds * 1000;

async function timedFlush(payload: Uint8Array): Promise<void> {
  const t0 = performance.now();
  const e = await send(RequestType.FLUSH, payload);
  flushLat.push(performance.now() - t0);
  requests++;
  if (e !== 0) errors++;
}

async function slot(i: number): Promise<void> {
  const region = (regionBase + i) % regionCount;
  while (performance.now() < deadline) {
    if (values.integrated) {
      await timedFlush(u64(region));
    } else {
      if (await send(RequestType.MARK_REGION, u64(region)) !== 0) errors++;
      requests++;
      await timedFlush(EMPTY);
    }
    if (await send(RequestType.CLEAR_REGION, u64(region)) !== 0) errors++;
    requests++;
    await timedFlush(EMPTY);
  }
}

const t0 = performance.now();
const startedAt = wallMs();
await Promise.all(Array.from({ length: inflight }, (_, i) => slot(i)));
const elapsed = (performance.now() - t0) / 1000;
loop.stop();
await running;
flushLat.sort((a, b) => a - b);
if (tracing) {
  Deno.writeFileSync(values.trace, new Uint8Array(new Float64Array(trace).buffer));
}
const q = (p: number) =>
  flushLat.length
    ? Math.round(flushLat[Math.min(flushLat.length - 1, Math.floor(p * flushLat.length))] * 1000)
    : 0;
console.log(JSON.stringify({
  inflight,
  integrated: values.integrated,
  requests,
  errors,
  timeouts,
  startedAt: Math.round(startedAt),
  seconds: Number(elapsed.toFixed(2)),
  requestsPerSecond: Math.round(requests / elapsed),
  flushP50us: q(0.5),
  flushP99us: q(0.99),
}));
loop.close();
sock.close();
