import assert from "node:assert/strict";
import {
  ctrString,
  decodeDatagram,
  decodeReply,
  detectLayout,
  encodeErrorReply,
  encodeReply,
  encodeRequest,
  type LayoutMode,
  MAX_PLAUSIBLE_VERSION,
  readU64,
  replyCapacity,
  type RequestSpec,
  s64Bytes,
  U64_OUT_OF_RANGE,
  u64Bytes,
} from "../src/kernel/codec.ts";
import {
  Errno,
  type HeaderLayout,
  KERNEL_MAX_PAYLOAD,
  REPLY_CAPACITY,
  type Request,
  RequestType,
} from "../src/kernel/protocol.ts";
import { malformedCorpus, randomDatagrams } from "./support/malformed.ts";

const HOST_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const FIXTURE_LUID = 0xff2947e5141dc000n;
const FIXTURE_UUID = "harness-basic-mirror-uuid-0001";
const enc = new TextEncoder();

/** Host-endian reads at absolute offsets, written independently of the codec. */
function reader(bytes: Uint8Array) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    u16: (o: number) => dv.getUint16(o, HOST_LE),
    u32: (o: number) => dv.getUint32(o, HOST_LE),
    i32: (o: number) => dv.getInt32(o, HOST_LE),
    u64: (o: number) => dv.getBigUint64(o, HOST_LE),
  };
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function fromHex(s: string): Uint8Array {
  return new Uint8Array(s.match(/../g)!.map((h) => parseInt(h, 16)));
}

function spec(layout: HeaderLayout, over: Partial<RequestSpec> = {}): RequestSpec {
  return {
    layout,
    luid: FIXTURE_LUID,
    uuid: FIXTURE_UUID,
    version: 3,
    seq: 5,
    type: RequestType.IN_SYNC,
    payload: u64Bytes(5),
    ...over,
  };
}

function decodeOk(bytes: Uint8Array, layout: LayoutMode, portId = 0) {
  const res = decodeDatagram(bytes, { portId }, { layout });
  if (!res.ok) assert.fail(`Expected a request, got: ${res.reason}`);
  return res;
}

function regions(...rs: number[]): Uint8Array {
  const out = new Uint8Array(rs.length * 8);
  rs.forEach((r, i) => out.set(u64Bytes(r), i * 8));
  return out;
}

/** Per type: a valid request payload, and a reply payload within the kernel's buffer. */
function cases(layout: HeaderLayout): [number, Uint8Array, Uint8Array][] {
  const none = new Uint8Array(0);
  return [
    [
      RequestType.CTR,
      enc.encode("131072 clustered-core 1024"),
      layout === "current" ? enc.encode("253:3\0") : none,
    ],
    [RequestType.DTR, none, none],
    [RequestType.PRESUSPEND, none, none],
    [RequestType.POSTSUSPEND, none, none],
    [RequestType.RESUME, none, none],
    [RequestType.GET_REGION_SIZE, none, u64Bytes(1024)],
    [RequestType.IS_CLEAN, regions(7), s64Bytes(1)],
    [RequestType.IN_SYNC, regions(2 ** 32 - 1), s64Bytes(0)],
    [RequestType.FLUSH, regions(1, 2, 3), none],
    [RequestType.MARK_REGION, regions(...Array.from({ length: 32 }, (_, i) => i * 3)), none],
    [RequestType.CLEAR_REGION, regions(9), none],
    [RequestType.GET_RESYNC_WORK, none, new Uint8Array([...s64Bytes(1), ...u64Bytes(77)])],
    [RequestType.SET_REGION_SYNC, new Uint8Array([...u64Bytes(4), ...s64Bytes(1)]), none],
    [RequestType.GET_SYNC_COUNT, none, u64Bytes(128)],
    [RequestType.STATUS_INFO, none, enc.encode("1 clustered-core\0")],
    [RequestType.STATUS_TABLE, none, enc.encode("clustered-core 1024\0")],
    [
      RequestType.IS_REMOTE_RECOVERING,
      regions(64),
      new Uint8Array([...s64Bytes(0), ...u64Bytes(128)]),
    ],
  ];
}

for (const layout of ["current", "2009"] as const) {
  Deno.test(`encodeRequest(), decodeDatagram(), encodeReply() and decodeReply() round-trip every type in the ${layout} layout`, () => {
    const all = cases(layout);
    assert.equal(all.length, 17);
    for (const [type, payload, data] of all) {
      const seq = 0x8000_0000 + type;
      const bytes = encodeRequest(spec(layout, { seq, type, payload }), { cnSeq: 7000 + type });
      assert.equal(bytes.length % 4, 0, "the kernel pads datagrams to 4 bytes");
      for (const mode of [layout, "auto"] as const) {
        const { request, warning } = decodeOk(bytes, mode, 123);
        assert.equal(warning, undefined);
        assert.equal(request.layout, layout);
        assert.equal(request.luid, layout === "current" ? FIXTURE_LUID : 0n);
        assert.equal(request.version, layout === "current" ? 3 : 0);
        assert.equal(request.uuid, FIXTURE_UUID);
        assert.equal(request.seq, seq);
        assert.equal(request.type, type);
        assert.equal(request.rawType, type);
        assert.deepEqual(request.frame, { portId: 123, cnSeq: 7000 + type, cnAck: 0 });
        assert.deepEqual(request.payload, payload);
        assert.equal(request.payload.buffer, bytes.buffer, "the payload is a view, not a copy");

        const reply = encodeReply(request, { errno: 0, data });
        const back = decodeReply(reply, { layout: mode, capacity: replyCapacity(request) });
        if (!back.ok) assert.fail(back.reason);
        assert.equal(back.kind, "full");
        assert.equal(back.seq, seq);
        assert.equal(back.errno, 0);
        assert.deepEqual(back.data, data);
        assert.equal(back.uuid, FIXTURE_UUID);
        assert.equal(back.rawType, type);
        assert.equal(back.layout, layout);
        if (layout === "current") {
          assert.equal(back.luid, FIXTURE_LUID);
          assert.equal(back.version, 3);
        }
      }
    }
  });
}

Deno.test("decodeDatagram() reads the fixture's first CTR and ctrString() tells it from a re-CTR", () => {
  // Line 1 of kernel-6.1-clustered-core-basic.txt: data_size 26, no NUL counted.
  const payload = fromHex("31333130373220636c757374657265642d636f72652031303234");
  const first = encodeRequest(spec("current", { seq: 0, type: RequestType.CTR, payload }));
  assert.equal(reader(first).u32(0), 16 + 20 + 160 + 26, "nlmsg_len counts no padding");
  assert.equal(first.length, 224, "the datagram is padded to 4 bytes");
  const { request } = decodeOk(first, "current");
  assert.deepEqual(ctrString(request.payload), {
    text: "131072 clustered-core 1024",
    countedNul: false,
  });
  assert.equal(replyCapacity(request), REPLY_CAPACITY[RequestType.CTR]);

  const withNul = new Uint8Array([...payload, 0]);
  const again = decodeOk(
    encodeRequest(spec("current", { type: RequestType.CTR, payload: withNul })),
    "current",
  );
  assert.deepEqual(ctrString(again.request.payload), {
    text: "131072 clustered-core 1024",
    countedNul: true,
  });
  assert.equal(replyCapacity(again.request), 0, "a re-CTR offers no reply buffer");

  const v1 = decodeOk(
    encodeRequest(spec("current", { type: RequestType.CTR, payload, version: 1 })),
    "current",
  );
  assert.equal(replyCapacity(v1.request), 0, "version 1 kernels offer no CTR reply buffer");
  const old = decodeOk(encodeRequest(spec("2009", { type: RequestType.CTR, payload })), "2009");
  assert.equal(replyCapacity(old.request), 0, "the 2009 patch offers no CTR reply buffer");
});

Deno.test("detectLayout() tells a current header from a 2009 one", () => {
  const header = (bytes: Uint8Array) => bytes.subarray(36);
  // A real 6.1 header: luid 0xff2947e5141dc000 at offset 0.
  const current = encodeRequest(spec("current"));
  assert.equal(header(current)[HOST_LE ? 7 : 0], 0xff);
  assert.equal(detectLayout(header(current)), "current");
  assert.equal(detectLayout(header(encodeRequest(spec("2009")))), "2009");
  assert.equal(
    detectLayout(header(encodeRequest(spec("2009", { uuid: "abc" })))),
    "2009",
    "short 2009 uuid",
  );
  // 32-bit kernel pointer: only one high byte set.
  assert.equal(
    detectLayout(header(encodeRequest(spec("current", { luid: 0xc1234500n })))),
    "current",
  );
  // Small test-harness luids: "A" then NULs, followed by the uuid at byte 8.
  assert.equal(detectLayout(header(encodeRequest(spec("current", { luid: 0x41n })))), "current");
  assert.equal(detectLayout(header(encodeRequest(spec("current", { luid: 1n })))), "current");
  assert.equal(detectLayout(new Uint8Array(0)), "current");
});

Deno.test("decodeDatagram() honours an explicit layout and warns when the header looks like the other", () => {
  // A luid of printable bytes "ABCDEFGH" looks like 2009 uuid text; no kernel pointer does.
  const textLuid = 0x4847464544434241n;
  const bytes = encodeRequest(spec("current", { luid: textLuid }));
  assert.equal(detectLayout(bytes.subarray(36)), "2009");
  const res = decodeOk(bytes, "current");
  assert.equal(res.request.luid, textLuid);
  assert.match(res.warning ?? "", /looks like the 2009 layout/);

  const wrong = decodeDatagram(encodeRequest(spec("current")), { portId: 0 }, { layout: "2009" });
  assert.equal(wrong.ok, false);
  if (wrong.ok) return;
  assert.match(wrong.reason, /looks like the current layout/);
});

Deno.test("decodeDatagram() accepts versions up to MAX_PLAUSIBLE_VERSION with a warning and rejects the rest", () => {
  assert.equal(
    decodeOk(encodeRequest(spec("current", { version: 3 })), "current").warning,
    undefined,
  );
  const newer = decodeOk(
    encodeRequest(spec("current", { version: MAX_PLAUSIBLE_VERSION })),
    "current",
  );
  assert.match(newer.warning ?? "", /newer than 3/);
  for (const version of [0, MAX_PLAUSIBLE_VERSION + 1, 0xffffffff]) {
    const res = decodeDatagram(encodeRequest(spec("current", { version })), { portId: 0 }, {
      layout: "current",
    });
    assert.equal(res.ok, false, `version ${version}`);
    if (!res.ok) assert.equal(res.errno, Errno.EINVAL);
  }
});

Deno.test("decodeDatagram() keeps distinct uuids apart while caching them", () => {
  // Same length, one byte apart, interleaved, then enough others to overflow the cache.
  const uuids = ["LVM-aaaa1", "LVM-aaaa2", ...Array.from({ length: 150 }, (_, i) => `log-${i}`)];
  for (let round = 0; round < 3; round++) {
    for (const uuid of uuids) {
      assert.equal(decodeOk(encodeRequest(spec("current", { uuid })), "auto").request.uuid, uuid);
    }
  }
});

Deno.test("encodeReply() lays out a current full reply byte for byte", () => {
  const bytes = encodeRequest(
    spec("current", { seq: 0x01020304, type: 0x300 | RequestType.IN_SYNC }),
    {
      cnSeq: 0x0a0b0c0d,
    },
  );
  // cn_msg.ack of a kernel request is 0; give it a value to see it echoed.
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(28, 9, HOST_LE);
  const { request } = decodeOk(bytes, "current");
  const out = encodeReply(request, { errno: 0, data: s64Bytes(1) });
  const r = reader(out);
  assert.equal(out.length, 16 + 20 + 160 + 8);
  // nlmsghdr
  assert.equal(r.u32(0), out.length);
  assert.equal(r.u16(4), 3, "NLMSG_DONE");
  assert.equal(r.u16(6), 0);
  assert.equal(r.u32(12), 0);
  // cn_msg
  assert.equal(r.u32(16), 7);
  assert.equal(r.u32(20), 1);
  assert.equal(r.u32(24), 0x0a0b0c0d, "cn_msg.seq echoed");
  assert.equal(r.u32(28), 9, "cn_msg.ack echoed");
  assert.equal(r.u16(32), 168);
  assert.equal(r.u16(34), 0);
  // dm_ulog_request at 36
  assert.equal(r.u64(36), FIXTURE_LUID);
  assert.equal(new TextDecoder().decode(out.subarray(44, 44 + FIXTURE_UUID.length)), FIXTURE_UUID);
  assert.ok(
    out.subarray(44 + FIXTURE_UUID.length, 176).every((b) => b === 0),
    "uuid NUL padded, padding zero",
  );
  assert.equal(r.u32(176), 3, "version");
  assert.equal(r.i32(180), 0, "error");
  assert.equal(r.u32(184), 0x01020304, "seq");
  assert.equal(r.u32(188), 0x308, "request_type echoed raw");
  assert.equal(r.u32(192), 8, "data_size");
  assert.deepEqual(out.subarray(196), s64Bytes(1));

  const failed = reader(encodeReply(request, { errno: Errno.EIO }));
  assert.equal(failed.i32(180), -Errno.EIO, "error is the negated errno");
  // The kernel copies data_size into the caller's reply-size variable, which its -ESRCH retry
  // reuses: an error reply keeps it at the request's capacity (zeros), never 0.
  assert.equal(failed.u32(192), 8, "error reply data_size = IN_SYNC's reply capacity");
  assert.equal(hex(encodeReply(request, { errno: Errno.ESRCH }).subarray(196)), "0000000000000000");
});

Deno.test("encodeReply() lays out a 2009 full reply byte for byte", () => {
  const bytes = encodeRequest(
    spec("2009", { seq: 77, type: RequestType.GET_SYNC_COUNT, payload: new Uint8Array(0) }),
  );
  const { request } = decodeOk(bytes, "2009");
  const out = encodeReply(request, { errno: 0, data: u64Bytes(1024) });
  const r = reader(out);
  assert.equal(out.length, 16 + 20 + 152 + 8);
  assert.equal(r.u32(0), out.length);
  assert.equal(r.u16(32), 160);
  assert.equal(new TextDecoder().decode(out.subarray(36, 36 + FIXTURE_UUID.length)), FIXTURE_UUID);
  assert.ok(out.subarray(36 + FIXTURE_UUID.length, 172).every((b) => b === 0));
  assert.equal(r.i32(172), 0, "error");
  assert.equal(r.u32(176), 77, "seq");
  assert.equal(r.u32(180), RequestType.GET_SYNC_COUNT);
  assert.equal(r.u32(184), 8, "data_size");
  // The fixture's GET_REGION_SIZE reply bytes for 1024 (host-endian x86_64).
  if (HOST_LE) assert.equal(hex(out.subarray(188)), "0004000000000000");
});

Deno.test("encodeReply() with ackOnly sends a zero-length cn_msg carrying seq and errno", () => {
  const { request } = decodeOk(
    encodeRequest(spec("current", { seq: 4242 }), { cnSeq: 99 }),
    "current",
  );
  const out = encodeReply(request, { errno: Errno.EAGAIN }, { ackOnly: true });
  const r = reader(out);
  assert.equal(out.length, 36);
  assert.equal(r.u32(0), 36);
  assert.equal(r.u16(4), 3);
  assert.equal(r.u32(16), 7);
  assert.equal(r.u32(20), 1);
  assert.equal(
    r.u32(24),
    4242,
    "cn_msg.seq is the request's seq, which the kernel matches ACKs on",
  );
  assert.equal(r.u32(28), Errno.EAGAIN, "cn_msg.ack is the positive errno");
  assert.equal(r.u16(32), 0);
  assert.deepEqual(decodeReply(out, { layout: "current" }), {
    ok: true,
    kind: "ack",
    seq: 4242,
    errno: Errno.EAGAIN,
    data: new Uint8Array(0),
  });
  // An ACK sets the kernel's reply size to 0 (except for -EAGAIN), which an -ESRCH retry
  // would reuse: other errors go out in full, with the capacity as data_size.
  const esrch = decodeReply(encodeReply(request, { errno: Errno.ESRCH }, { ackOnly: true }), {
    layout: "current",
  });
  assert.ok(esrch.ok && esrch.kind === "full" && esrch.errno === Errno.ESRCH);
  // An ACK cannot carry data: a reply with data goes out in full.
  const full = decodeReply(
    encodeReply(request, { errno: 0, data: s64Bytes(1) }, { ackOnly: true }),
    {
      layout: "current",
    },
  );
  assert.ok(full.ok && full.kind === "full" && full.data.length === 8);
});

Deno.test("encodeReply() turns data over the kernel's buffer into a -ENOSPC reply without data", () => {
  const over: [number, Uint8Array, Uint8Array][] = [
    [RequestType.GET_REGION_SIZE, new Uint8Array(0), new Uint8Array(16)],
    [RequestType.FLUSH, regions(1), regions(1)], // the predecessor echoed integrated-flush payloads
    [
      RequestType.STATUS_INFO,
      new Uint8Array(0),
      new Uint8Array(REPLY_CAPACITY[RequestType.STATUS_INFO] + 1),
    ],
    [RequestType.CTR, enc.encode("100 clustered-disk 253:3 8\0"), enc.encode("253:3\0")], // re-CTR
  ];
  for (const [type, payload, data] of over) {
    const { request } = decodeOk(
      encodeRequest(spec("current", { type, payload, seq: 31 })),
      "current",
    );
    const back = decodeReply(encodeReply(request, { errno: 0, data }), { layout: "current" });
    assert.ok(back.ok && back.kind === "full", `type ${type}`);
    assert.equal(back.seq, 31);
    assert.equal(back.errno, Errno.ENOSPC, `type ${type}`);
    assert.equal(back.data.length, replyCapacity(request), "error replies keep the capacity");
    assert.ok(back.data.every((b) => b === 0));
  }
  // Exactly the capacity is fine.
  const { request } = decodeOk(
    encodeRequest(spec("current", { type: RequestType.STATUS_INFO, payload: new Uint8Array(0) })),
    "current",
  );
  const fits = new Uint8Array(REPLY_CAPACITY[RequestType.STATUS_INFO]).fill(0x41);
  const back = decodeReply(encodeReply(request, { errno: 0, data: fits }), { layout: "current" });
  assert.ok(back.ok && back.errno === 0 && back.data.length === fits.length);
});

Deno.test("encodeReply() reports an errno outside 0..4095 as EIO", () => {
  const { request } = decodeOk(encodeRequest(spec("current")), "current");
  for (const errno of [-5, 4096, 1.5, NaN]) {
    const back = decodeReply(encodeReply(request, { errno }), { layout: "current" });
    assert.ok(back.ok && back.errno === Errno.EIO, `errno ${errno}`);
  }
});

Deno.test("decodeReply() applies the kernel's acceptance rules", () => {
  const { request } = decodeOk(encodeRequest(spec("current", { seq: 50 })), "current");
  const good = encodeReply(request, { errno: 0, data: s64Bytes(1) });
  const withCnLen = (bytes: Uint8Array, cnLen: number) => {
    const out = bytes.slice(0, 36 + cnLen);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, out.length, HOST_LE);
    dv.setUint16(32, cnLen, HOST_LE);
    return out;
  };
  for (const cnLen of [1, 100, 159]) {
    const res = decodeReply(withCnLen(good, cnLen), { layout: "current" });
    assert.ok(!res.ok && /Incomplete message/.test(res.reason), `cn_msg.len ${cnLen}`);
  }
  const { request: old } = decodeOk(encodeRequest(spec("2009", { seq: 51 })), "2009");
  const good2009 = encodeReply(old, { errno: 0, data: s64Bytes(1) });
  const short2009 = decodeReply(withCnLen(good2009, 151), { layout: "2009" });
  assert.ok(!short2009.ok && /Incomplete message/.test(short2009.reason));
  const exact2009 = decodeReply(encodeReply(old, { errno: 0 }), { layout: "auto" });
  assert.ok(exact2009.ok && exact2009.kind === "full");
  assert.equal(exact2009.layout, "2009");
  assert.equal(exact2009.seq, 51);
  assert.equal(exact2009.data.length, 0);

  const positive = good.slice();
  new DataView(positive.buffer).setInt32(36 + 144, 5, HOST_LE);
  assert.equal(
    decodeReply(positive, { layout: "current" }).ok,
    false,
    "a positive error is a daemon bug",
  );
  const negative = good.slice();
  new DataView(negative.buffer).setInt32(36 + 144, -Errno.EIO, HOST_LE);
  const neg = decodeReply(negative, { layout: "current" });
  assert.ok(neg.ok && neg.errno === Errno.EIO);

  const wrongId = good.slice();
  new DataView(wrongId.buffer).setUint32(16, 4, HOST_LE);
  assert.equal(decodeReply(wrongId, { layout: "current" }).ok, false);
  assert.equal(
    decodeReply(good.subarray(0, good.length - 4), { layout: "current" }).ok,
    false,
    "nlmsg_len over the datagram",
  );
  const overData = good.slice();
  new DataView(overData.buffer).setUint32(36 + 156, 9, HOST_LE);
  assert.equal(decodeReply(overData, { layout: "current" }).ok, false, "data_size past cn_msg.len");
  assert.equal(decodeReply(new Uint8Array(10), { layout: "current" }).ok, false);

  const capped = decodeReply(good, { layout: "current", capacity: 4 });
  assert.ok(
    capped.ok && capped.errno === Errno.ENOSPC && capped.overCapacity && capped.data.length === 0,
  );
});

Deno.test("decodeDatagram() gives each malformed corpus entry its expected outcome", async (t) => {
  const corpus = malformedCorpus();
  assert.equal(new Set(corpus.map((e) => e.name)).size, corpus.length, "names are unique");
  for (const entry of corpus) {
    await t.step(entry.name, () => {
      for (const layout of [entry.layout, "auto"] as const) {
        const res = decodeDatagram(entry.bytes, { portId: 0 }, { layout });
        const where = `${entry.name} (layout ${layout})`;
        if (entry.expect === "ok" || entry.layer === "replica") {
          if (!res.ok) assert.fail(`${where}: ${res.reason}`);
          assert.equal(res.request.seq, entry.seq);
          continue;
        }
        assert.equal(res.ok, false, where);
        if (res.ok) continue;
        assert.ok(res.reason.length > 0);
        if (entry.expect === "drop") {
          assert.equal(res.reply, undefined, `${where}: ${res.reason}`);
          continue;
        }
        assert.ok(res.reply, `${where} has no reply: ${res.reason}`);
        assert.equal(res.errno, entry.errno, `${where}: ${res.reason}`);
        assert.equal(res.reply.seq, entry.seq);
        const back = decodeReply(encodeErrorReply(res.reply, res.errno), { layout: entry.layout });
        if (!back.ok) assert.fail(`${where}: error reply refused: ${back.reason}`);
        assert.equal(back.kind, "full");
        assert.equal(back.seq, entry.seq);
        assert.equal(back.errno, entry.errno);
        const type = res.reply.rawType & 0xff;
        const room = type >= 2 && type <= 17 ? REPLY_CAPACITY[type as RequestType] : 0;
        assert.equal(back.data.length, room, `${where}: error reply keeps the type's capacity`);
      }
    });
  }
});

Deno.test("decodeDatagram() survives 10,000 random datagrams and explains every rejection", () => {
  const seed = 0xc10cd;
  const datagrams = randomDatagrams(seed, 10_000);
  assert.equal(datagrams.length, 10_000);
  const outcomes = { ok: 0, reply: 0, drop: 0 };
  for (const [i, d] of datagrams.entries()) {
    for (const layout of [d.layout, "auto"] as const) {
      let res;
      try {
        res = decodeDatagram(d.bytes, { portId: 0 }, { layout });
      } catch (e) {
        assert.fail(`Seed ${seed} datagram ${i} (${d.kind}, layout ${layout}) threw: ${e}`);
      }
      if (res.ok) {
        outcomes.ok++;
        const r = res.request;
        assert.ok(r.payload.length <= KERNEL_MAX_PAYLOAD + 8);
        const back = decodeReply(encodeReply(r, { errno: 0 }), { layout: r.layout });
        assert.ok(back.ok && back.seq === r.seq && back.errno === 0, `datagram ${i}`);
      } else {
        assert.ok(res.reason.length > 0, `datagram ${i} rejected without a reason`);
        if (res.reply === undefined) {
          outcomes.drop++;
          continue;
        }
        outcomes.reply++;
        const back = decodeReply(encodeErrorReply(res.reply, res.errno), {
          layout: res.reply.layout,
        });
        assert.ok(back.ok && back.kind === "full", `datagram ${i}: ${back.ok || back.reason}`);
        assert.equal(back.seq, res.reply.seq);
        assert.equal(back.errno, res.errno);
        assert.ok(res.errno > 0);
      }
    }
    if (d.kind === "valid") {
      assert.ok(
        decodeDatagram(d.bytes, { portId: 0 }, { layout: d.layout }).ok,
        `valid datagram ${i}`,
      );
      assert.ok(
        decodeDatagram(d.bytes, { portId: 0 }, { layout: "auto" }).ok,
        `valid datagram ${i} (auto)`,
      );
    }
  }
  // The mix reaches every outcome in quantity, not just the drops at the front door.
  for (const [k, n] of Object.entries(outcomes)) assert.ok(n > 1000, `${k}: ${n}`);
});

Deno.test("randomDatagrams() is deterministic per seed", () => {
  const a = randomDatagrams(7, 200);
  const b = randomDatagrams(7, 200);
  const c = randomDatagrams(8, 200);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  assert.ok(
    new Set(a.map((d) => d.kind.split(":")[0])).size >= 7,
    "every kind of mutation appears",
  );
});

Deno.test("readU64() returns regions exactly up to 2^53-1 and U64_OUT_OF_RANGE beyond", () => {
  const at = (n: number | bigint) => readU64(u64Bytes(n), 0);
  assert.equal(at(0), 0);
  assert.equal(at(2 ** 31), 2 ** 31);
  assert.equal(at(2 ** 32 - 1), 2 ** 32 - 1);
  assert.equal(at(2 ** 32), 2 ** 32);
  assert.equal(at(Number.MAX_SAFE_INTEGER), Number.MAX_SAFE_INTEGER);
  assert.equal(at(2n ** 53n), U64_OUT_OF_RANGE);
  assert.equal(at(2n ** 63n), U64_OUT_OF_RANGE);
  assert.equal(at(2n ** 64n - 1n), U64_OUT_OF_RANGE);
  const two = regions(3, 4);
  assert.equal(readU64(two, 8), 4);
  assert.equal(readU64(two, 9), U64_OUT_OF_RANGE, "past the end");
  assert.equal(readU64(two, -1), U64_OUT_OF_RANGE);
});

Deno.test("u64Bytes() and s64Bytes() write host-endian and refuse values out of range", () => {
  assert.deepEqual(s64Bytes(-1), new Uint8Array(8).fill(0xff));
  assert.deepEqual(u64Bytes(2n ** 64n - 1n), new Uint8Array(8).fill(0xff));
  const one = u64Bytes(1);
  assert.equal(one[HOST_LE ? 0 : 7], 1);
  assert.equal(new DataView(s64Bytes(-2).buffer).getBigInt64(0, HOST_LE), -2n);
  assert.throws(() => u64Bytes(-1), RangeError);
  assert.throws(() => u64Bytes(2n ** 64n), RangeError);
  assert.throws(() => s64Bytes(2n ** 63n), RangeError);
  assert.throws(() => u64Bytes(0.5), RangeError);
});

Deno.test("encodeErrorReply() echoes the received header with error and data_size set", () => {
  const bytes = encodeRequest(spec("current", { seq: 606, type: 18, payload: new Uint8Array(0) }), {
    cnSeq: 5,
  });
  const res = decodeDatagram(bytes, { portId: 9 }, { layout: "current" });
  assert.ok(!res.ok && res.reply !== undefined);
  assert.equal(res.errno, Errno.ENOSYS);
  assert.deepEqual(res.reply.frame, { portId: 9, cnSeq: 5, cnAck: 0 });
  const out = encodeErrorReply(res.reply, res.errno);
  const r = reader(out);
  assert.equal(out.length, 36 + 160);
  assert.equal(r.u32(24), 5);
  assert.deepEqual(
    out.subarray(36, 36 + 144),
    bytes.subarray(36, 36 + 144),
    "luid, uuid, version echoed",
  );
  assert.equal(r.i32(180), -Errno.ENOSYS);
  assert.equal(r.u32(184), 606);
  assert.equal(r.u32(188), 18);
  assert.equal(r.u32(192), 0);
  // The info is a copy: reusing the receive buffer does not change the reply.
  bytes.fill(0);
  assert.deepEqual(encodeErrorReply(res.reply, res.errno), out);
});

Deno.test("replyCapacity() follows REPLY_CAPACITY for every type but CTR", () => {
  for (const [type, payload] of cases("current").map(([t, p]) => [t, p] as const)) {
    const { request } = decodeOk(encodeRequest(spec("current", { type, payload })), "current");
    const expected = type === RequestType.CTR ? 128 : REPLY_CAPACITY[type as Request["type"]];
    assert.equal(replyCapacity(request), expected, `type ${type}`);
  }
});
