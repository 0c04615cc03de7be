/**
 * A fixed-size bitmap over a `Uint32Array`, in the bit order of the kernel's on-disk dirty log:
 * bit i is bit `i % 8` of byte `i / 8` (little-endian). On a little-endian host (x86_64, the only
 * place the kernel link exists in practice) that is bit `i & 31` of word `i >>> 5`, so the words
 * can be written to disk as they are; {@link Bitmap.bytes} converts on a big-endian host.
 *
 * Bits past {@link Bitmap.size} in the last word ("padding") are always zero: the kernel clears
 * them on load, and {@link Bitmap.popcount} and equality rely on it.
 *
 * @module
 */

/** True when the host stores a `Uint32Array` word least significant byte first. */
export const HOST_LITTLE_ENDIAN: boolean = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Number of set bits in a 32-bit word. */
export function popcount32(word: number): number {
  let x = word - ((word >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Index (0..31) of the lowest set bit of a non-zero word. */
function lowestBit(word: number): number {
  return 31 - Math.clz32(word & -word);
}

/** Mask of the bits at and above `bit` (0..31) in one word. */
function maskFrom(bit: number): number {
  return (0xffffffff << bit) >>> 0;
}

/** A fixed-size bitmap of `size` bits. */
export class Bitmap {
  /** Number of valid bits. */
  readonly size: number;
  /** The words; bits at and above {@link size} are zero. */
  readonly words: Uint32Array;

  /** An all-zero bitmap of `size` bits (`size` a non-negative safe integer). */
  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`Bitmap size must be a non-negative integer, got ${size}`);
    }
    this.size = size;
    this.words = new Uint32Array(Math.ceil(size / 32));
  }

  /** Number of 32-bit words (`round_up(size, 32) / 32`). */
  get wordCount(): number {
    return this.words.length;
  }

  /** Number of bytes of the on-disk image (`round_up(size, 32) / 8`). */
  get byteLength(): number {
    return this.words.length * 4;
  }

  /** Bit `i` (caller checks `0 <= i < size`). */
  get(i: number): boolean {
    return ((this.words[i >>> 5] >>> (i & 31)) & 1) === 1;
  }

  /** Sets bit `i`; returns true when it was clear. */
  set(i: number): boolean {
    const w = i >>> 5;
    const m = 1 << (i & 31);
    const old = this.words[w];
    if ((old & m) !== 0) return false;
    this.words[w] = old | m;
    return true;
  }

  /** Clears bit `i`; returns true when it was set. */
  clear(i: number): boolean {
    const w = i >>> 5;
    const m = 1 << (i & 31);
    const old = this.words[w];
    if ((old & m) === 0) return false;
    this.words[w] = old & ~m;
    return true;
  }

  /** Word `w` as an unsigned 32-bit number. */
  word(w: number): number {
    return this.words[w];
  }

  /** Sets or clears every bit. */
  fill(value: boolean): void {
    this.words.fill(value ? 0xffffffff : 0);
    if (value) this.#clearPadding();
  }

  /** Sets bits `from` (inclusive) to `to` (exclusive), a word at a time. */
  setRange(from: number, to: number): void {
    to = Math.min(to, this.size);
    if (from >= to) return;
    const firstWord = from >>> 5;
    const lastWord = (to - 1) >>> 5;
    for (let w = firstWord; w <= lastWord; w++) {
      let m = 0xffffffff;
      if (w === firstWord) m &= maskFrom(from & 31);
      if (w === lastWord && (to & 31) !== 0) m &= ~maskFrom(to & 31);
      this.words[w] |= m;
    }
  }

  /** Number of set bits. */
  popcount(): number {
    let n = 0;
    const words = this.words;
    for (let w = 0; w < words.length; w++) {
      const x = words[w];
      if (x !== 0) n += popcount32(x);
    }
    return n;
  }

  /** Lowest clear bit at or after `from`, or {@link size} when there is none. */
  findNextZero(from: number): number {
    return this.#find(from, 0xffffffff);
  }

  /** Lowest set bit at or after `from`, or {@link size} when there is none. */
  findNextOne(from: number): number {
    return this.#find(from, 0);
  }

  /** Scans for a bit that differs from the all-equal pattern `invert` (0: ones, ~0: zeros). */
  #find(from: number, invert: number): number {
    if (!(from >= 0)) from = 0;
    if (from >= this.size) return this.size;
    const words = this.words;
    let w = from >>> 5;
    let x = ((words[w] ^ invert) & maskFrom(from & 31)) >>> 0;
    while (x === 0) {
      w++;
      if (w >= words.length) return this.size;
      x = (words[w] ^ invert) >>> 0;
    }
    // A zero found in the padding of the last word means "none".
    return Math.min(w * 32 + lowestBit(x), this.size);
  }

  /**
   * The bitmap as on-disk bytes (little-endian bit order), {@link byteLength} long. On a
   * little-endian host this is a live view of the words: do not modify it, and copy it if the
   * bitmap may change before you are done with it.
   */
  bytes(): Uint8Array {
    if (HOST_LITTLE_ENDIAN) {
      return new Uint8Array(this.words.buffer, this.words.byteOffset, this.byteLength);
    }
    const out = new Uint8Array(this.byteLength);
    const view = new DataView(out.buffer);
    for (let w = 0; w < this.words.length; w++) view.setUint32(w * 4, this.words[w], true);
    return out;
  }

  /**
   * Replaces bits `0..bits-1` with those of an on-disk image (little-endian bit order) and clears
   * the rest. Bytes missing from a short image read as zero.
   */
  loadBytes(image: Uint8Array, bits: number): void {
    bits = Math.max(0, Math.min(bits, this.size));
    this.words.fill(0);
    const nbytes = Math.min(image.byteLength, Math.ceil(bits / 8));
    const whole = nbytes >>> 2;
    const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
    for (let w = 0; w < whole; w++) this.words[w] = view.getUint32(w * 4, true);
    for (let byte = whole * 4; byte < nbytes; byte++) {
      this.words[byte >>> 2] |= image[byte] << ((byte & 3) * 8);
    }
    // The last byte taken may hold bits at and past `bits`.
    if ((bits & 31) !== 0) this.words[bits >>> 5] &= ~maskFrom(bits & 31);
  }

  /** Copies every word from a bitmap of the same size. */
  copyFrom(other: Bitmap): void {
    if (other.size !== this.size) {
      throw new RangeError(`Bitmap sizes differ: ${other.size} and ${this.size}`);
    }
    this.words.set(other.words);
  }

  /** True when both bitmaps have the same size and bits. */
  equals(other: Bitmap): boolean {
    if (other.size !== this.size) return false;
    const a = this.words;
    const b = other.words;
    for (let w = 0; w < a.length; w++) if (a[w] !== b[w]) return false;
    return true;
  }

  /** True when no bit past {@link size} is set (checked by tests and invariant checks). */
  paddingIsClear(): boolean {
    if ((this.size & 31) === 0) return true;
    return (this.words[this.words.length - 1] & maskFrom(this.size & 31)) === 0;
  }

  #clearPadding(): void {
    if ((this.size & 31) !== 0) this.words[this.words.length - 1] &= ~maskFrom(this.size & 31);
  }
}
