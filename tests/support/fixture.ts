/**
 * Parser of the recorded real-kernel session in shared/fixtures/ (one request and its answer
 * per line), shared by the replica-level and the netlink-level replay tests.
 *
 * @module
 */

/** The 6.1 kernel session: create, resync, write, read, suspend, resume, remove. */
export const FIXTURE_URL = new URL(
  "../../../shared/fixtures/kernel-6.1-clustered-core-basic.txt",
  import.meta.url,
);

/** Request lines in the fixture (its own summary line says so too). */
export const FIXTURE_REQUESTS = 1245;

const LINE = new RegExp(
  String.raw`^\s*(\d+) t=\S+ seq=(\d+) type=([A-Z_]+)\((\d+)\) uuid=(\S+) luid=0x([0-9a-f]+) ` +
    String.raw`version=(\d+) error=(-?\d+) data_size=(\d+) payload=(\S+) .*-> ` +
    String.raw`error=(-?\d+) data_size=(\d+) reply=(\S+)`,
);

/** One recorded request and its answer. */
export interface Recorded {
  n: number;
  seq: number;
  typeName: string;
  type: number;
  uuid: string;
  luid: bigint;
  version: number;
  payload: Uint8Array;
  /** The answer's error field (0 or a negative errno). */
  error: number;
  replySize: number;
  reply: Uint8Array;
}

/** Hex string ("-" for none) to bytes. */
export function hex(text: string): Uint8Array {
  if (text === "-") return new Uint8Array(0);
  if (!/^([0-9a-f]{2})+$/.test(text)) throw new Error(`Bad hex in fixture: ${text.slice(0, 40)}`);
  return Uint8Array.from(text.match(/../g)!, (b) => parseInt(b, 16));
}

/** Parse the fixture text; throws on any line it cannot read (nothing is skipped silently). */
export function parseFixture(text: string): Recorded[] {
  const out: Recorded[] = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("#") || line.trim() === "") continue;
    const m = LINE.exec(line);
    if (m === null) throw new Error(`Unparsed fixture line: ${line.slice(0, 120)}`);
    const payload = hex(m[10]);
    const reply = hex(m[13]);
    if (payload.byteLength !== Number(m[9]) || reply.byteLength !== Number(m[12])) {
      throw new Error(`Fixture line ${m[1]}: sizes do not match the hex`);
    }
    out.push({
      n: Number(m[1]),
      seq: Number(m[2]),
      typeName: m[3],
      type: Number(m[4]),
      uuid: m[5],
      luid: BigInt("0x" + m[6]),
      version: Number(m[7]),
      payload,
      error: Number(m[11]),
      replySize: Number(m[12]),
      reply,
    });
  }
  return out;
}

/** Read and parse the fixture. */
export async function loadFixture(): Promise<Recorded[]> {
  return parseFixture(await Deno.readTextFile(FIXTURE_URL));
}
