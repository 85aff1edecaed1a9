// A sparse in-memory BlockDevice (pages allocated on first write) for tests and as the protocol's speed ceiling.
import type { BlockDevice, DeviceCapabilities, Extent } from './block-device.js';

/** Allocation unit: small enough that sparse tests stay small, large enough that big I/O is few copies. */
const PAGE = 64 * 1024;

export class MemoryDevice implements BlockDevice {
  readonly capabilities: DeviceCapabilities;
  private readonly pages = new Map<number, Buffer>();

  constructor(
    readonly size: number,
    opts: { readOnly?: boolean } = {},
  ) {
    this.capabilities = {
      readOnly: opts.readOnly ?? false,
      flush: true,
      fua: true,
      trim: true,
      zeroes: true,
      fastZero: true,
      blockStatus: true,
      multiConn: true,
    };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    this.each(offset, length, (page, at, n, dst) => this.pages.get(page)?.copy(out, dst, at, at + n));
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.each(offset, data.length, (page, at, n, src) => {
      let p = this.pages.get(page);
      if (!p) this.pages.set(page, (p = Buffer.alloc(PAGE)));
      data.copy(p, at, src, src + n);
    });
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.each(offset, length, (page, at, n) => {
      const p = this.pages.get(page);
      if (!p) return;
      if (n === PAGE) this.pages.delete(page);
      else p.fill(0, at, at + n);
    });
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    this.each(offset, length, (page, _at, n) => {
      const hole = !this.pages.has(page);
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.length += n;
      else out.push({ length: n, hole, zero: hole });
    });
    return out;
  }

  async close(): Promise<void> {}

  /** Calls fn(pageIndex, offsetInPage, bytes, offsetInRequest) for each page the range touches. */
  private each(offset: number, length: number, fn: (page: number, at: number, n: number, rel: number) => void): void {
    let rel = 0;
    while (rel < length) {
      const pos = offset + rel;
      const page = Math.floor(pos / PAGE);
      const at = pos - page * PAGE;
      const n = Math.min(PAGE - at, length - rel);
      fn(page, at, n, rel);
      rel += n;
    }
  }
}
