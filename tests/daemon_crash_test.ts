/**
 * Crash safety of clustered-disk logs at the real daemon: writes in flight over netlink, the
 * daemon SIGKILLed at a random moment, restarted, and rebuilt the way the kernel does it
 * (-ESRCH, re-CTR with the NUL counted, RESUME). No region that had an unfinished write (its
 * MARK + FLUSH acknowledged, its CLEAR not yet sent) may read clean: not on the disk right
 * after the kill, and not from the restarted daemon.
 */

import assert from "node:assert/strict";
import { withNetns } from "./support/netns.ts";
import { DaemonProcess, KernelPeer, sleep } from "./support/daemon.ts";
import { mulberry32 } from "./support/malformed.ts";
import { Errno, RequestType } from "../src/kernel/protocol.ts";

const REGIONS = 256;
const REGION_SIZE = 1024;
const ROUNDS = 8;
const IN_FLIGHT = 12;
const UUID = "crash-test-disk-log";
const LUID = 0xffff888000abc000n;
const enc = new TextEncoder();

function u64s(...ns: number[]): Uint8Array {
  const b = new Uint8Array(8 * ns.length);
  const v = new DataView(b.buffer);
  ns.forEach((n, i) => v.setBigUint64(8 * i, BigInt(n), true));
  return b;
}

function s64(b: Uint8Array): number {
  return Number(new DataView(b.buffer, b.byteOffset, b.byteLength).getBigInt64(0, true));
}

Deno.test("disk log: SIGKILL during writes never leaves a region with an unfinished write clean", async () => {
  const seed = Number(Deno.env.get("CLOGD_CRASH_SEED") ?? Date.now() % 1_000_000);
  const rand = mulberry32(seed);
  const dir = await Deno.makeTempDir({ prefix: "clogd-crash-" });
  const logFile = `${dir}/disk.log`;
  await Deno.writeFile(logFile, new Uint8Array(64 * 1024));
  const ctr = `${REGIONS * REGION_SIZE} clustered-disk ${logFile} ${REGION_SIZE} nosync`;
  const ask = (
    peer: KernelPeer,
    type: number,
    payload: Uint8Array = new Uint8Array(0),
    seq?: number,
  ) =>
    peer.request(
      { layout: "current", luid: LUID, uuid: UUID, version: 3, type, payload, seq },
      5000,
    );
  const ctx = `seed ${seed} (replay: CLOGD_CRASH_SEED=${seed})`;

  try {
    await withNetns(async (netns) => {
      /** Regions whose write was open (MARK+FLUSH acknowledged, CLEAR not sent) at the kill. */
      let openAtKill = new Set<number>();
      for (let round = 0; round < ROUNDS; round++) {
        const daemon = await DaemonProcess.start(netns, { dir: `${dir}/r${round}` });
        const peer = new KernelPeer(netns);
        try {
          if (round === 0) {
            const r = await ask(peer, RequestType.CTR, enc.encode(ctr));
            assert.equal(r.errno, 0);
            assert.equal(
              new TextDecoder().decode(r.data),
              logFile + "\0",
              "CTR names the log device",
            );
          } else {
            // The kernel's reconnect: a data-path request gets -ESRCH, then re-CTR (NUL
            // counted, no reply room) and RESUME.
            const r = await ask(peer, RequestType.IS_CLEAN, u64s(0));
            assert.equal(r.errno, Errno.ESRCH, ctx);
            const c = await ask(peer, RequestType.CTR, enc.encode(ctr + "\0"));
            assert.equal(c.errno, 0, ctx);
            assert.equal(c.data.length, 0, "no payload on a re-CTR");
          }
          assert.equal((await ask(peer, RequestType.RESUME)).errno, 0);
          for (const region of openAtKill) {
            const clean = await ask(peer, RequestType.IS_CLEAN, u64s(region));
            assert.equal(
              s64(clean.data),
              0,
              `${ctx}: round ${round}: region ${region} reported clean`,
            );
            const sync = await ask(peer, RequestType.IN_SYNC, u64s(region));
            assert.equal(
              s64(sync.data),
              0,
              `${ctx}: round ${round}: region ${region} reported in sync`,
            );
            // Recover it the way the kernel would, so later rounds start clean.
            await ask(peer, RequestType.SET_REGION_SYNC, u64s(region, 1));
            await ask(peer, RequestType.CLEAR_REGION, u64s(region));
          }
          await ask(peer, RequestType.FLUSH);

          // Writes in flight, then a kill at a random moment.
          const open = new Set<number>();
          const busy = new Set<number>();
          let stop = false;
          const writer = async () => {
            while (!stop) {
              let region = Math.floor(rand() * REGIONS);
              while (busy.has(region)) region = (region + 1) % REGIONS;
              busy.add(region);
              try {
                if (rand() < 0.5) {
                  await ask(peer, RequestType.MARK_REGION, u64s(region));
                  await ask(peer, RequestType.FLUSH);
                } else {
                  await ask(peer, RequestType.FLUSH, u64s(region)); // integrated flush
                }
                open.add(region); // the kernel now writes the data
                await sleep(rand() * 5);
                open.delete(region); // write done: from here either state is fine
                await ask(peer, RequestType.CLEAR_REGION, u64s(region));
                await ask(peer, RequestType.FLUSH);
              } finally {
                busy.delete(region);
              }
            }
          };
          const writers = Array.from({ length: IN_FLIGHT }, () => writer().catch(() => {}));
          await sleep(30 + rand() * 300);
          daemon.kill("SIGKILL");
          stop = true;
          openAtKill = new Set(open);
          await daemon.status;
          // Closing the peer's socket ends the writers' waits at once (they fail, as the
          // kernel's requests to a dead daemon would).
          peer.close();
          await Promise.all(writers);

          // Straight from the disk: every open region has its clean bit cleared.
          const disk = await Deno.readFile(logFile);
          const magic = new DataView(disk.buffer).getUint32(0, true);
          assert.equal(magic, 0x4d695272, `${ctx}: header written`);
          for (const region of openAtKill) {
            const bit = (disk[1024 + (region >> 3)] >> (region & 7)) & 1;
            assert.equal(
              bit,
              0,
              `${ctx}: round ${round}: region ${region} clean on disk with a write open`,
            );
          }
        } finally {
          peer.close();
          await daemon.stop();
        }
      }
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
