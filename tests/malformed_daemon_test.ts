/**
 * Malformed input at the real daemon over netlink: every corpus entry gets its documented
 * outcome (error reply with the request's seq, or a drop), thousands of random datagrams never
 * crash it, and after each bad datagram a good request is still answered.
 */

import assert from "node:assert/strict";
import { withNetns } from "./support/netns.ts";
import { DaemonProcess, KernelPeer } from "./support/daemon.ts";
import {
  CORPUS_LUID,
  CORPUS_REGION_COUNT,
  CORPUS_UUID,
  CORPUS_VERSION,
  corpusSetup,
  malformedCorpus,
  randomDatagrams,
} from "./support/malformed.ts";
import { Errno, RequestType } from "../src/kernel/protocol.ts";

/** Seqs of our own good requests live far from the corpus' and the generator's. */
let goodSeq = 0x7000_0000;

async function setup(peer: KernelPeer): Promise<void> {
  for (const bytes of corpusSetup("current")) peer.sendRaw(bytes);
  // corpusSetup uses seqs 1 and 2.
  for (const seq of [1, 2]) {
    const r = await peer.waitReply(seq);
    assert.equal(r.errno, 0, `corpus setup seq ${seq}`);
  }
}

/** A good request must be answered; recreate the corpus log if a bad one destroyed it. */
async function assertServes(peer: KernelPeer, after: string): Promise<void> {
  for (let attempt = 0; attempt < 2; attempt++) {
    const r = await peer.request({
      layout: "current",
      luid: CORPUS_LUID,
      uuid: CORPUS_UUID,
      version: CORPUS_VERSION,
      type: RequestType.GET_REGION_SIZE,
      payload: new Uint8Array(0),
      seq: goodSeq++,
    }, 3000).catch((err) => {
      throw new Error(`No answer to a good request after ${after}: ${err.message}`);
    });
    if (r.errno === Errno.ESRCH) {
      await setup(peer);
      continue;
    }
    assert.equal(r.errno, 0, `good request after ${after}`);
    return;
  }
  throw new Error(`Could not recreate the corpus log after ${after}`);
}

Deno.test("daemon gives every malformed corpus entry its outcome and keeps serving", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      await setup(peer);
      const corpus = malformedCorpus();
      assert.ok(corpus.length >= 30, "corpus is substantial");
      let replied = 0;
      let dropped = 0;
      let unsendable = 0;
      for (const entry of corpus) {
        peer.stray.clear();
        try {
          peer.sendRaw(entry.bytes);
        } catch (err) {
          // The sending kernel refuses some datagrams itself (e.g. an empty one: ENODATA);
          // they cannot reach the daemon, so only "drop" entries may be among them.
          assert.equal(
            entry.expect,
            "drop",
            `${entry.name}: unsendable (${(err as Error).message})`,
          );
          unsendable++;
          continue;
        }
        if (entry.expect === "error-reply") {
          const r = await peer.waitReply(entry.seq, 3000).catch((err) => {
            throw new Error(`${entry.name}: ${err.message}`);
          });
          assert.notEqual(r.errno, 0, `${entry.name}: error reply`);
          if (entry.errno !== undefined) assert.equal(r.errno, entry.errno, entry.name);
          replied++;
        }
        await assertServes(peer, entry.name);
        if (entry.expect === "drop") {
          assert.equal(peer.stray.has(entry.seq), false, `${entry.name}: dropped, not answered`);
          dropped++;
        }
      }
      assert.ok(replied > 0 && dropped > 0);
      assert.ok(unsendable <= 2, `${unsendable} corpus entries could not be sent at all`);
      const st = await daemon.query();
      assert.ok(st.kernelLink.malformedReplied > 0, "malformed replies counted");
      assert.ok(st.kernelLink.malformedDropped > 0, "drops counted");
      assert.equal(daemon.exited, false);
      // Out-of-range regions (replica layer) never changed the corpus log's sync count.
      const sc = await peer.request({
        layout: "current",
        luid: CORPUS_LUID,
        uuid: CORPUS_UUID,
        version: CORPUS_VERSION,
        type: RequestType.GET_SYNC_COUNT,
        payload: new Uint8Array(0),
        seq: goodSeq++,
      });
      const count = Number(new DataView(sc.data.buffer, sc.data.byteOffset).getBigUint64(0, true));
      assert.ok(count <= CORPUS_REGION_COUNT, `sync count ${count} <= ${CORPUS_REGION_COUNT}`);
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("daemon survives 3,000 random datagrams, answering a good request after each", async () => {
  const seed = Number(Deno.env.get("CLOGD_FUZZ_SEED") ?? Date.now() % 1_000_000);
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      await setup(peer);
      const inputs = randomDatagrams(seed, 3000);
      let unsendable = 0;
      for (const [i, d] of inputs.entries()) {
        try {
          peer.sendRaw(d.bytes);
        } catch {
          // Refused by the sending kernel (e.g. shorter than a netlink header): never arrives.
          unsendable++;
          continue;
        }
        try {
          await assertServes(peer, `random datagram ${i} (${d.kind})`);
        } catch (err) {
          throw new Error(
            `Seed ${seed} (replay: CLOGD_FUZZ_SEED=${seed}): ${(err as Error).message}`,
          );
        }
        if (peer.stray.size > 1000) peer.stray.clear();
      }
      assert.equal(daemon.exited, false, `daemon alive after seed ${seed}`);
      const st = await daemon.query();
      assert.ok(unsendable < inputs.length / 10, `${unsendable} of ${inputs.length} unsendable`);
      assert.ok(st.kernelLink.datagrams >= 2 * (inputs.length - unsendable));
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});
