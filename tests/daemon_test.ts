/**
 * The daemon over a real NETLINK_CONNECTOR socket, in a network namespace: the recorded 6.1
 * kernel session replayed request by request, the CTR/ESRCH restart protocol, peer filtering,
 * the control socket and `clogd status`, and signals.
 */

import assert from "node:assert/strict";
import { withNetns } from "./support/netns.ts";
import { DaemonProcess, DENO, KernelPeer, REPO, sleep } from "./support/daemon.ts";
import { FIXTURE_REQUESTS, loadFixture } from "./support/fixture.ts";
import { Errno, RequestType } from "../src/kernel/protocol.ts";
import { encodeRequest, type RequestSpec } from "../src/kernel/codec.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const LUID = 0xffff888012345000n;

function spec(
  uuid: string,
  type: number,
  payload: Uint8Array = new Uint8Array(0),
  luid = LUID,
): Omit<RequestSpec, "seq"> {
  return { layout: "current", luid, uuid, version: 3, type, payload };
}

function u64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
}

function readS64(b: Uint8Array, off = 0): number {
  return Number(new DataView(b.buffer, b.byteOffset, b.byteLength).getBigInt64(off, true));
}

Deno.test("daemon answers every request of the recorded 6.1 kernel session as the kernel expects", async () => {
  const recorded = await loadFixture();
  assert.equal(recorded.length, FIXTURE_REQUESTS);
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      let checked = 0;
      for (const r of recorded) {
        const reply = await peer.request({
          layout: "current",
          luid: r.luid,
          uuid: r.uuid,
          version: r.version,
          type: r.type,
          payload: r.payload,
          seq: r.seq + 1, // the recording starts at seq 0; any seq is echoed
        });
        const where = `request ${r.n} ${r.typeName}`;
        assert.equal(reply.kind, "full", where);
        assert.equal(reply.seq, r.seq + 1, where);
        assert.equal(reply.errno === 0 ? 0 : -reply.errno, r.error, `${where}: error`);
        if (r.type === RequestType.STATUS_INFO) {
          assert.equal(
            dec.decode(reply.data).replace(/\0+$/, ""),
            dec.decode(r.reply).replace(/\0+$/, ""),
            where,
          );
        } else {
          assert.deepEqual([...reply.data], [...r.reply], `${where}: reply data`);
        }
        checked++;
      }
      assert.equal(checked, FIXTURE_REQUESTS);
      const st = await daemon.query();
      assert.equal(st.logs.length, 0, "DTR at the end removed the log");
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("daemon answers -ESRCH for unknown logs, and a re-CTR then RESUME restores service", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      const uuid = "esrch-test-uuid";
      let r = await peer.request(spec(uuid, RequestType.IN_SYNC, u64(3)));
      assert.equal(r.errno, Errno.ESRCH);
      // The kernel keeps this reply's data_size as the room for its retry after re-CTR and
      // RESUME: it must be IN_SYNC's 8 bytes, or the retried answer is dropped (ENOSPC).
      assert.equal(r.kind, "full");
      assert.equal(r.data.length, 8, "-ESRCH reply keeps the request's reply room");
      r = await peer.request(spec(uuid, RequestType.GET_RESYNC_WORK));
      assert.equal(r.errno, Errno.ESRCH);
      assert.equal(r.data.length, 16);
      // The kernel's re-CTR counts the NUL and offers no reply room.
      r = await peer.request(
        spec(uuid, RequestType.CTR, enc.encode("65536 clustered-core 1024 nosync\0")),
      );
      assert.equal(r.errno, 0);
      assert.equal(r.data.length, 0, "re-CTR answered without payload");
      r = await peer.request(spec(uuid, RequestType.RESUME));
      assert.equal(r.errno, 0);
      r = await peer.request(spec(uuid, RequestType.IN_SYNC, u64(3)));
      assert.equal(r.errno, 0);
      assert.equal(readS64(r.data), 1, "nosync: region in sync");
      // Out of range regions are rejected, not answered (the predecessor answered region_count).
      r = await peer.request(spec(uuid, RequestType.IN_SYNC, u64(64)));
      assert.equal(r.errno, Errno.EINVAL);
      // A CTR for a known log: answered, state kept.
      r = await peer.request(
        spec(uuid, RequestType.CTR, enc.encode("65536 clustered-core 1024 nosync")),
      );
      assert.equal(r.errno, 0);
      r = await peer.request(spec(uuid, RequestType.GET_SYNC_COUNT));
      assert.equal(readS64(r.data), 64);
      // Same uuid, another luid: a different log (live and inactive table).
      r = await peer.request(spec(uuid, RequestType.GET_SYNC_COUNT, undefined, LUID + 0x100n));
      assert.equal(r.errno, Errno.ESRCH);
      // A CTR the daemon cannot parse gets -EINVAL and creates nothing.
      r = await peer.request(
        spec("bad-ctr", RequestType.CTR, enc.encode("65536 clustered-core notanumber")),
      );
      assert.equal(r.errno, Errno.EINVAL);
      const st = await daemon.query();
      assert.deepEqual(st.logs.map((l) => l.uuid), [uuid]);
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("daemon ignores netlink senders other than the kernel unless --accept-user-peers", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns, { userPeers: false });
    const peer = new KernelPeer(netns);
    try {
      const seq = peer.nextSeq();
      peer.sendRaw(
        (await import("../src/kernel/codec.ts")).encodeRequest({
          ...spec("x", RequestType.GET_SYNC_COUNT),
          seq,
        }),
      );
      assert.equal(await peer.anyReplyWithin(500), false, "no reply to a user-space peer");
      await daemon.waitLog("not the kernel");
      const st = await daemon.query();
      assert.equal(st.kernelLink.foreignDropped, 1);
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("clogd status shows every log's fields, in text and JSON", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      const uuid = "status-test-uuid";
      await peer.request(spec(uuid, RequestType.CTR, enc.encode("2048 clustered-core 64")));
      await peer.request(spec(uuid, RequestType.RESUME));
      const work = await peer.request(spec(uuid, RequestType.GET_RESYNC_WORK));
      assert.equal(readS64(work.data), 1);
      await peer.request(spec(uuid, RequestType.SET_REGION_SYNC, concat(u64(0), u64(1))));
      await peer.request(spec(uuid, RequestType.MARK_REGION, concat(u64(5), u64(7))));
      const run = async (...args: string[]) => {
        const out = await new Deno.Command(DENO, {
          args: [
            "run",
            "--allow-all",
            `${REPO}main.ts`,
            "status",
            "--control",
            daemon.controlPath,
            ...args,
          ],
        }).output();
        assert.equal(out.code, 0, dec.decode(out.stderr));
        return dec.decode(out.stdout);
      };
      const json = JSON.parse(await run("--json"));
      assert.equal(json.logs.length, 1);
      const l = json.logs[0];
      assert.equal(l.uuid, uuid);
      assert.equal(l.luid, "0x" + LUID.toString(16));
      assert.equal(l.type, "clustered-core");
      assert.equal(l.regionSize, 64);
      assert.equal(l.regionCount, 32);
      assert.equal(l.syncCount, 1);
      assert.equal(l.cleanCount, 1, `region 0 in sync and unmarked: ${JSON.stringify(l)}`);
      assert.equal(l.outstandingMarks, 2);
      assert.equal(l.state, "resumed");
      assert.match(l.digest, /^[0-9a-f]{8,}$/);
      const text = await run();
      assert.match(text, new RegExp(`${uuid} luid 0x${LUID.toString(16)} clustered-core resumed`));
      assert.match(text, /regions 32 x 64 sectors, in sync 1, clean 1, outstanding marks 2/);
      // A missing daemon is a clear error, exit 1.
      const out = await new Deno.Command(DENO, {
        args: [
          "run",
          "--allow-all",
          `${REPO}main.ts`,
          "status",
          "--control",
          `${daemon.dir}/nope.sock`,
        ],
      }).output();
      assert.equal(out.code, 1);
      assert.match(dec.decode(out.stderr), /Cannot reach clogd/);
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("SIGUSR2 dumps state; SIGTERM waits while a log is resumed, and exits on a second", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    const peer = new KernelPeer(netns);
    try {
      const uuid = "signal-test-uuid";
      await peer.request(spec(uuid, RequestType.CTR, enc.encode("2048 clustered-core 64")));
      await peer.request(spec(uuid, RequestType.RESUME));
      daemon.kill("SIGUSR2");
      await daemon.waitLog("State dump");
      await daemon.waitLog(uuid);
      daemon.kill("SIGTERM");
      await daemon.waitLog("still resumed");
      await sleep(200);
      assert.equal(daemon.exited, false);
      // It still serves.
      const r = await peer.request(spec(uuid, RequestType.GET_SYNC_COUNT));
      assert.equal(r.errno, 0);
      daemon.kill("SIGTERM");
      const status = await daemon.status;
      assert.equal(status.code, 0);
      await assert.rejects(Deno.stat(`${daemon.dir}/clogd.pid`), "pidfile removed");
    } finally {
      peer.close();
      await daemon.stop();
    }
  });
});

Deno.test("SIGTERM with no resumed log exits at once with status 0", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    try {
      daemon.kill("SIGTERM");
      const status = await daemon.status;
      assert.equal(status.code, 0);
      await daemon.waitLog("stopped");
    } finally {
      await daemon.stop();
    }
  });
});

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

Deno.test("disk log: a FLUSH that dirtied nothing writes its clean bits without a sync", async () => {
  const dir = await Deno.makeTempDir({ prefix: "clogd-lazy-" });
  const file = `${dir}/log.img`;
  await Deno.writeFile(file, new Uint8Array(64 * 1024));
  const cleanBit = async (region: number) => {
    const b = await Deno.readFile(file);
    return (b[1024 + (region >> 3)] >> (region & 7)) & 1;
  };
  try {
    await withNetns(async (netns) => {
      const daemon = await DaemonProcess.start(netns, { dir });
      const peer = new KernelPeer(netns);
      try {
        const uuid = "lazy-flush-uuid";
        const ask = async (type: number, payload: Uint8Array = new Uint8Array(0)) => {
          const r = await peer.request(spec(uuid, type, payload));
          assert.equal(r.errno, 0, `type ${type}`);
          return r;
        };
        await ask(RequestType.CTR, enc.encode(`${64 * 1024} clustered-disk ${file} 1024 nosync`));
        await ask(RequestType.RESUME);
        await ask(RequestType.FLUSH); // writes the whole fresh log
        await ask(RequestType.MARK_REGION, u64(9));
        await ask(RequestType.FLUSH);
        assert.equal(await cleanBit(9), 0, "the mark is on disk when FLUSH is answered");
        const { syncs: before, writes: writesBefore } = (await daemon.query()).logs[0].diskStats!;
        await ask(RequestType.CLEAR_REGION, u64(9));
        await ask(RequestType.FLUSH);
        const st = await daemon.query();
        assert.equal(st.logs[0].diskStats!.syncs, before, "a clear-only FLUSH starts no sync");
        assert.equal(st.logs[0].diskStats!.writes, writesBefore + 1, "but it writes");
        // Written (a restarted daemon must not find it dirty: writes would go to one leg until
        // the kernel's next suspend/resume), only not synced.
        assert.equal(await cleanBit(9), 1, "the clean bit is written");
        await ask(RequestType.MARK_REGION, u64(9));
        await ask(RequestType.FLUSH);
        assert.equal(await cleanBit(9), 0);
        assert.equal(
          (await daemon.query()).logs[0].diskStats!.syncs,
          before + 1,
          "a marking FLUSH syncs",
        );
      } finally {
        peer.close();
        await daemon.stop();
      }
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a peer that closes its socket with requests in flight does not stop the daemon", async () => {
  await withNetns(async (netns) => {
    const daemon = await DaemonProcess.start(netns);
    try {
      const peer = new KernelPeer(netns);
      // A burst the daemon answers at once (-ESRCH: unknown log), then the socket goes away
      // before the daemon has sent every reply: its sends get ECONNREFUSED.
      for (let i = 0; i < 2000; i++) {
        const seq = peer.nextSeq();
        try {
          peer.sendRaw(encodeRequest(
            { ...spec("gone-peer", RequestType.IN_SYNC, u64(1)), seq },
            { cnSeq: seq },
          ));
        } catch {
          break;
        }
      }
      peer.close();
      await sleep(500);
      assert.equal(daemon.exited, false, daemon.stderr);
      const st = await daemon.query();
      assert.ok(
        st.kernelLink.peerGone > 0,
        `replies to the closed port dropped: ${JSON.stringify(st.kernelLink)}`,
      );
      const next = new KernelPeer(netns);
      try {
        const r = await next.request(spec("after", RequestType.IN_SYNC, u64(1)));
        assert.equal(r.errno, Errno.ESRCH, "a new peer is still served");
      } finally {
        next.close();
      }
    } finally {
      await daemon.stop();
    }
  });
});

Deno.test("disk log: two RESUMEs in flight at once share one read of the disk", async () => {
  const dir = await Deno.makeTempDir({ prefix: "clogd-double-resume-" });
  try {
    await withNetns(async (netns) => {
      const file = `${dir}/log.img`;
      await Deno.writeFile(file, new Uint8Array(64 * 1024));
      const daemon = await DaemonProcess.start(netns, { dir });
      const peer = new KernelPeer(netns);
      try {
        const uuid = "double-resume";
        const ctr = await peer.request(
          spec(uuid, RequestType.CTR, enc.encode(`${1024 * 1024} clustered-disk ${file} 1024`)),
        );
        assert.equal(ctr.errno, 0);
        // The kernel's -ESRCH path does this: every thread re-sends CTR and RESUME.
        const seqs = [peer.nextSeq(), peer.nextSeq()];
        for (const seq of seqs) {
          peer.sendRaw(
            encodeRequest({ ...spec(uuid, RequestType.RESUME), seq }, { cnSeq: seq }),
          );
        }
        for (const seq of seqs) assert.equal((await peer.waitReply(seq)).errno, 0);
        const l = (await daemon.query()).logs[0];
        assert.equal(l.diskFailed, false, daemon.stderr);
        assert.equal(l.state, "resumed");
        assert.doesNotMatch(daemon.stderr, /unreadable/);
      } finally {
        peer.close();
        await daemon.stop();
      }
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
