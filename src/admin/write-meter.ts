// A layer around the BlockDevice that NBD serves (like an nbdkit filter) that counts the changes clients make,
// so status can show write throughput. Each call is passed down unchanged and counted when it completes.
import type { BlockDevice, DeviceCapabilities, Extent, WriteOptions, ZeroOptions } from '../device/block-device.js';
import type { Throughput } from './status-types.js';

/** How often totals are sampled, and how many samples the rate spans (rate = change over the last ~5 s). */
const SAMPLE_MS = 1_000;
const SAMPLES = 5;

interface Sample {
  t: number;
  ops: number;
  bytes: number;
}

export class WriteMeter implements BlockDevice {
  readonly size: number;
  readonly capabilities: DeviceCapabilities;
  readonly cache?: (offset: number, length: number) => Promise<void>;
  readonly blockStatus?: (offset: number, length: number) => Promise<Extent[]>;
  readonly writeBuffer?: (length: number) => Buffer;
  private ops = 0;
  private bytes = 0;
  private readonly samples: Sample[] = [];
  private readonly timer: NodeJS.Timeout;

  constructor(readonly inner: BlockDevice) {
    this.size = inner.size;
    this.capabilities = inner.capabilities;
    // Optional methods exist here only when the device below has them (the NBD core tests for them).
    if (inner.cache) this.cache = (offset, length) => inner.cache!(offset, length);
    if (inner.blockStatus) this.blockStatus = (offset, length) => inner.blockStatus!(offset, length);
    if (inner.writeBuffer) this.writeBuffer = (length) => inner.writeBuffer!(length);
    this.samples.push({ t: Date.now(), ops: 0, bytes: 0 });
    this.timer = setInterval(() => {
      this.samples.push({ t: Date.now(), ops: this.ops, bytes: this.bytes });
      if (this.samples.length > SAMPLES + 1) this.samples.shift();
    }, SAMPLE_MS).unref();
  }

  /** Counts `p` once it succeeds; a rejection passes through to the caller uncounted (it changed nothing). */
  private count(p: Promise<void>, bytes: number): Promise<void> {
    return p.then(() => {
      this.ops++;
      this.bytes += bytes;
    });
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    return this.count(this.inner.write(offset, data, opts), data.length);
  }

  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.count(this.inner.trim(offset, length, opts), 0);
  }

  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.count(this.inner.writeZeroes(offset, length, opts), 0);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  status(): Throughput {
    const now = Date.now();
    const first = this.samples[0];
    const seconds = (now - first.t) / 1000;
    return {
      ops: this.ops,
      bytes: this.bytes,
      opsPerSecond: seconds > 0 ? (this.ops - first.ops) / seconds : 0,
      bytesPerSecond: seconds > 0 ? (this.bytes - first.bytes) / seconds : 0,
    };
  }

  /** Stops sampling and closes the device below. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.inner.close();
  }

  /** Stops sampling only (the device below is closed by its owner). */
  stop(): void {
    clearInterval(this.timer);
  }
}

/** The sum of several volumes' throughput. */
export function sumThroughput(all: Array<Throughput | null>): Throughput {
  const t: Throughput = { ops: 0, bytes: 0, opsPerSecond: 0, bytesPerSecond: 0 };
  for (const x of all) {
    if (!x) continue;
    t.ops += x.ops;
    t.bytes += x.bytes;
    t.opsPerSecond += x.opsPerSecond;
    t.bytesPerSecond += x.bytesPerSecond;
  }
  return t;
}
