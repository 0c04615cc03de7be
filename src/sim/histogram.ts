/**
 * A fixed-size latency histogram (log-linear buckets, like HdrHistogram with 3 significant bits):
 * constant memory however long a benchmark runs, percentiles within 1/16 (6.25 %) of the value.
 *
 * @module
 */

/** Sub-buckets per power of two: the relative resolution of a percentile is 1/SUB_BUCKETS. */
export const SUB_BUCKETS = 16;
/** Powers of two covered above the linear range: values up to 2^(4+40) us (beyond any run). */
export const MAX_EXPONENT = 40;

const BUCKETS = SUB_BUCKETS * (MAX_EXPONENT + 1);

/** Summary of a histogram, in microseconds. */
export interface LatencySummary {
  count: number;
  meanUs: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  maxUs: number;
}

/** Latency histogram of non-negative microsecond values. */
export class Histogram {
  #counts = new Float64Array(BUCKETS);
  #count = 0;
  #sum = 0;
  #max = 0;

  /** Number of values recorded. */
  get count(): number {
    return this.#count;
  }

  /** Record one value (microseconds; negative values count as 0). */
  record(us: number): void {
    const v = us > 0 ? us : 0;
    this.#counts[bucketOf(v)]++;
    this.#count++;
    this.#sum += v;
    if (v > this.#max) this.#max = v;
  }

  /** Add every value of `other` (e.g. per-type histograms into a total). */
  merge(other: Histogram): void {
    for (let i = 0; i < BUCKETS; i++) this.#counts[i] += other.#counts[i];
    this.#count += other.#count;
    this.#sum += other.#sum;
    if (other.#max > this.#max) this.#max = other.#max;
  }

  /** The value at quantile `q` (0..1): the upper edge of its bucket, capped at the maximum. */
  quantile(q: number): number {
    if (this.#count === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * this.#count));
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.#counts[i];
      if (seen >= rank) return Math.min(upperEdge(i), this.#max);
    }
    return this.#max;
  }

  /** Count, mean, p50, p90, p99 and max, rounded to 0.1 us. */
  summary(): LatencySummary {
    const r = (x: number) => Math.round(x * 10) / 10;
    return {
      count: this.#count,
      meanUs: r(this.#count === 0 ? 0 : this.#sum / this.#count),
      p50Us: r(this.quantile(0.5)),
      p90Us: r(this.quantile(0.9)),
      p99Us: r(this.quantile(0.99)),
      maxUs: r(this.#max),
    };
  }
}

// Values below SUB_BUCKETS land in linear buckets of 1 us; above, bucket (e, m) holds
// [2^e * (1 + m/SUB)...) with e the exponent above the linear range.
function bucketOf(v: number): number {
  if (v < SUB_BUCKETS) return Math.floor(v);
  const e = Math.floor(Math.log2(v / SUB_BUCKETS));
  if (e >= MAX_EXPONENT) return BUCKETS - 1;
  const base = SUB_BUCKETS * 2 ** e;
  const m = Math.max(0, Math.min(SUB_BUCKETS - 1, Math.floor((v - base) / (base / SUB_BUCKETS))));
  return SUB_BUCKETS * (e + 1) + m;
}

function upperEdge(i: number): number {
  if (i < SUB_BUCKETS) return i + 1;
  const e = Math.floor(i / SUB_BUCKETS) - 1;
  const m = i % SUB_BUCKETS;
  const base = SUB_BUCKETS * 2 ** e;
  return base + (m + 1) * (base / SUB_BUCKETS);
}
