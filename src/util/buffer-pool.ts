// Reusable I/O buffers. Every new ArrayBuffer counts as external memory for V8, which starts a full
// mark-compact after each ~64 MiB of it (whatever the heap's size): at 1 MiB requests that was several major GCs
// a second and up to a third of a process's CPU. A buffer whose last reader is done comes back here and is
// handed out again, so a steady load allocates nothing.

const OWNER = Symbol('pooled buffer');
type Pooled = Buffer & { [OWNER]?: { pool: BufferPool; whole: Buffer } };

export interface BufferPoolOptions {
  /** Capacities are rounded up to a multiple of this many bytes. */
  unit: number;
  /** Longest buffer kept for reuse; longer ones are allocated each time (and still marked as this pool's). */
  maxLength: number;
  /** Bytes of free buffers kept at most; beyond it released buffers are left to the GC. */
  maxBytes: number;
  /** Bytes reserved in front of every buffer (a record header written later, in place). */
  headroom?: number;
}

export class BufferPool {
  private readonly free: ArrayBuffer[][] = [];
  private freeBytes = 0;
  private readonly headroom: number;

  constructor(private readonly opts: BufferPoolOptions) {
    this.headroom = opts.headroom ?? 0;
  }

  /** A buffer of exactly `length` bytes (contents undefined), with `headroom` bytes before it in `whole()`. */
  alloc(length: number): Buffer {
    const { unit, maxLength } = this.opts;
    const units = Math.ceil(length / unit);
    let ab: ArrayBuffer | undefined;
    if (length > 0 && length <= maxLength) {
      ab = this.free[units]?.pop();
      if (ab) this.freeBytes -= ab.byteLength;
      else ab = Buffer.allocUnsafeSlow(this.headroom + units * unit).buffer as ArrayBuffer;
    } else {
      ab = Buffer.allocUnsafeSlow(this.headroom + length).buffer as ArrayBuffer;
    }
    const whole = Buffer.from(ab, 0, this.headroom + length);
    const view = whole.subarray(this.headroom) as Pooled;
    view[OWNER] = { pool: this, whole };
    return view;
  }

  /** The headroom and the buffer together, for a buffer this pool made; undefined for any other. */
  whole(buf: Buffer): Buffer | undefined {
    const o = (buf as Pooled)[OWNER];
    return o?.pool === this ? o.whole : undefined;
  }

  /** @internal */
  take(ab: ArrayBuffer): void {
    const units = (ab.byteLength - this.headroom) / this.opts.unit;
    if (!Number.isInteger(units) || units < 1 || units * this.opts.unit > this.opts.maxLength) return;
    if (this.freeBytes + ab.byteLength > this.opts.maxBytes) return;
    (this.free[units] ??= []).push(ab);
    this.freeBytes += ab.byteLength;
  }
}

/**
 * Gives a pooled buffer back to its pool once nothing reads it any more. Any other buffer, or a second release
 * of the same one, is ignored: the mark lives on the view, and a reused ArrayBuffer gets a new view.
 * A property on the view rather than a WeakSet of ArrayBuffers: every entry in a WeakSet is an ephemeron that
 * V8's GC must process, which showed in profiles of 4 KiB writes.
 */
export function releaseBuffer(buf: Buffer): void {
  const o = (buf as Pooled)[OWNER];
  if (!o) return;
  (buf as Pooled)[OWNER] = undefined;
  o.pool.take(o.whole.buffer as ArrayBuffer);
}

/** True for a buffer a pool made and that has not been released yet. */
export function isPooled(buf: Buffer): boolean {
  return (buf as Pooled)[OWNER] !== undefined;
}

/** Data buffers without headroom (request payloads and read replies of plain devices). */
export const ioPool = new BufferPool({ unit: 4096, maxLength: 2 ** 20, maxBytes: 32 * 2 ** 20 });
