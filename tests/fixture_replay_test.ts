/**
 * Replays what a real 6.1 kernel sent (recorded under qemu, answered by a minimal responder)
 * through parseCtr, parseOp and LogReplica.apply, and checks every answer against the recorded
 * one in meaning.
 */
import assert from "node:assert/strict";
import { RequestType } from "../src/kernel/protocol.ts";
import { isCtrError, parseCtr } from "../src/log/ctr.ts";
import { isOpParseError, parseOp, readS64, readU64 } from "../src/log/ops.ts";
import { LogReplica } from "../src/log/replica.ts";
import type { LogConfig } from "../src/log/types.ts";
import { FIXTURE_REQUESTS, loadFixture } from "./support/fixture.ts";

Deno.test("fixture replay: every request of the 6.1 kernel gets the recorded answer", async () => {
  const requests = await loadFixture();
  assert.equal(requests.length, FIXTURE_REQUESTS);
  assert.deepEqual(requests.map((r) => r.n), requests.map((_, i) => i + 1));

  const node = 1;
  let replica: LogReplica | undefined;
  let checked = 0;
  const resyncRegions: number[] = [];
  for (const req of requests) {
    const where = `request ${req.n} (${req.typeName})`;
    if (req.type === RequestType.CTR) {
      const args = parseCtr(new TextDecoder().decode(req.payload));
      assert.ok(!isCtrError(args), `${where}: ${JSON.stringify(args)}`);
      assert.equal(args.kind, "clustered-core");
      assert.equal(args.regionCount, 128);
      const config: LogConfig = { ...args, uuid: req.uuid, luid: req.luid };
      replica = new LogReplica(config);
      // A core log's CTR reply carries nothing (no device for the kernel to hold open).
      assert.equal(req.error, 0);
      assert.equal(req.replySize, 0);
      checked++;
      continue;
    }
    assert.ok(replica, `${where}: before CTR`);
    const op = parseOp(req.type, req.payload);
    if (req.type === RequestType.DTR) {
      // DTR drops the replica in the node; the replica itself has nothing to answer.
      assert.ok(isOpParseError(op), `${where}: DTR is not a replica op`);
      assert.equal(req.error, 0);
      assert.equal(req.replySize, 0);
      replica = undefined;
      checked++;
      continue;
    }
    assert.ok(!isOpParseError(op), `${where}: ${JSON.stringify(op)}`);
    if (op.op === "postsuspend") {
      // The kernel clears its marks before POSTSUSPEND: leftovers would be treated as a crash's.
      assert.deepEqual(replica.marksOf(node), [], `${where}: marks left at suspend`);
    }
    const result = replica.apply(node, op);
    assert.equal(result.errno === 0 ? 0 : -result.errno, req.error, `${where}: error`);
    const data = result.data ?? new Uint8Array(0);
    switch (req.type) {
      case RequestType.STATUS_INFO:
      case RequestType.STATUS_TABLE: {
        const text = (b: Uint8Array) => new TextDecoder().decode(b).replace(/\0$/, "");
        assert.equal(text(data), text(req.reply), `${where}: status text`);
        assert.equal(data[data.byteLength - 1], 0, `${where}: status text NUL-terminated`);
        break;
      }
      case RequestType.GET_RESYNC_WORK:
        assert.equal(data.byteLength, 16, `${where}: reply size`);
        assert.equal(readS64(data, 0), readS64(req.reply, 0), `${where}: work`);
        assert.equal(readU64(data, 8), readU64(req.reply, 8), `${where}: region`);
        if (readS64(data, 0) === 1) resyncRegions.push(readU64(data, 8));
        break;
      default:
        assert.deepEqual([...data], [...req.reply], `${where}: reply data`);
    }
    assert.equal(replica.checkInvariants(), undefined, `${where}: invariants`);
    checked++;
  }
  assert.equal(checked, FIXTURE_REQUESTS);
  // The responder handed out regions in order, and so do we.
  assert.deepEqual(resyncRegions, Array.from({ length: 128 }, (_, i) => i));
});
