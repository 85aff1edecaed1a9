// Hand-built NBD handshake frames, and a frame reader, for tests that speak the option phase byte by byte.
import type { Duplex } from 'node:stream';

export const IHAVEOPT = Buffer.from('IHAVEOPT');

/** An option request: IHAVEOPT, option number, length, data. */
export function option(opt: number, data = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  IHAVEOPT.copy(h);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

/** The data of NBD_OPT_INFO / NBD_OPT_GO: the export name and no information requests. */
export function nameData(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(6 + n.length);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}

/** Reads whole frames from one stream; `detach()` before the stream changes hands (STARTTLS). */
export function wire(stream: Duplex) {
  let buf = Buffer.alloc(0);
  let ended = false;
  const waiters: Array<() => void> = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  const onData = (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake();
  };
  const onEnd = () => {
    ended = true;
    wake();
  };
  stream.on('data', onData);
  stream.on('end', onEnd);
  stream.on('close', onEnd);
  stream.on('error', onEnd);
  return {
    stream,
    get buffered() {
      return buf.length;
    },
    async read(n: number): Promise<Buffer> {
      while (buf.length < n) {
        if (ended) throw new Error(`connection ended with ${buf.length} of ${n} bytes`);
        await new Promise<void>((r) => waiters.push(r));
      }
      const out = buf.subarray(0, n);
      buf = buf.subarray(n);
      return out;
    },
    async reply() {
      const h = await this.read(20);
      const data = await this.read(h.readUInt32BE(16));
      return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
    },
    async ask(opt: number, data?: Buffer) {
      stream.write(option(opt, data));
      return this.reply();
    },
    /** True when the peer ends the stream within `ms` (having sent nothing more). */
    async endsWithin(ms: number): Promise<boolean> {
      const deadline = Date.now() + ms;
      while (!ended && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      return ended;
    },
    detach() {
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('close', onEnd);
      stream.off('error', onEnd);
    },
  };
}
