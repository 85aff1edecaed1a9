// A small promise-based NBD client for tests: fixed newstyle, NBD_OPT_GO, simple or structured replies,
// pipelined requests. Deliberately independent of src/nbd so it can catch the server's mistakes.
import { EventEmitter } from 'node:events';
import net from 'node:net';

const IHAVEOPT = Buffer.from('IHAVEOPT');
const NBD_OPT_GO = 7;
const NBD_OPT_STRUCTURED_REPLY = 8;

export class NbdError extends Error {
  constructor(readonly errno: number, what: string) {
    super(`${what} failed with NBD errno ${errno}`);
  }
}

interface Pending {
  type: number;
  length: number;
  resolve: (v: Buffer) => void;
  reject: (e: Error) => void;
}

export class NbdTestClient extends EventEmitter {
  size = 0;
  flags = 0;
  private buf = Buffer.alloc(0);
  private next = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private isClosed = false;
  private constructor(private readonly sock: net.Socket, readonly structured: boolean) {
    super();
  }

  static async connect(o: { host: string; port: number; exportName?: string; structured?: boolean }): Promise<NbdTestClient> {
    const sock = net.connect(o.port, o.host);
    sock.setNoDelay(true);
    const c = new NbdTestClient(sock, o.structured ?? false);
    // A socket error must reject the handshake or reach the client's 'error' listeners; an 'error' event
    // with no listener would kill the whole test process (and skip its teardown).
    let failed: Error | undefined;
    sock.on('error', (e) => {
      failed = e;
      if (c.listenerCount('error') > 0) c.emit('error', e);
    });
    try {
      await c.handshake(o.exportName ?? '');
    } catch (err) {
      sock.destroy();
      throw failed ?? err;
    }
    return c;
  }

  private readN(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const tryRead = () => {
        if (this.buf.length >= n) {
          const out = this.buf.subarray(0, n);
          this.buf = this.buf.subarray(n);
          this.sock.off('data', onData);
          this.sock.off('close', onClose);
          resolve(out);
          return true;
        }
        return false;
      };
      const onData = (d: Buffer) => {
        this.buf = Buffer.concat([this.buf, d]);
        tryRead();
      };
      const onClose = () => reject(new Error('server closed the connection during the handshake'));
      if (tryRead()) return;
      this.sock.on('data', onData);
      this.sock.once('close', onClose);
    });
  }

  private sendOption(opt: number, data: Buffer): void {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([h, data]));
  }

  private async optionReplies(): Promise<Array<{ type: number; data: Buffer }>> {
    const out: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const h = await this.readN(20);
      const type = h.readUInt32BE(12);
      const data = await this.readN(h.readUInt32BE(16));
      out.push({ type, data });
      if (type === 1 || type >= 2 ** 31) return out;
    }
  }

  private async handshake(name: string): Promise<void> {
    const g = await this.readN(18);
    if (!g.subarray(0, 8).equals(Buffer.from('NBDMAGIC'))) throw new Error('bad server magic');
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
    this.sock.write(cf);
    if (this.structured) {
      this.sendOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
      const r = await this.optionReplies();
      if (r[r.length - 1].type !== 1) throw new Error('structured replies refused');
    }
    const n = Buffer.from(name);
    const d = Buffer.alloc(6 + n.length);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    this.sendOption(NBD_OPT_GO, d);
    const replies = await this.optionReplies();
    const last = replies[replies.length - 1];
    if (last.type !== 1) throw new Error(`NBD_OPT_GO failed: reply 0x${last.type.toString(16)} ${last.data.subarray(0).toString()}`);
    for (const r of replies) {
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        this.size = r.data.readUInt32BE(2) * 2 ** 32 + r.data.readUInt32BE(6);
        this.flags = r.data.readUInt16BE(10);
      }
    }
    this.sock.on('data', (d: Buffer) => this.onData(d));
    this.sock.on('close', () => {
      this.isClosed = true;
      for (const p of this.pending.values()) p.reject(new Error('connection closed'));
      this.pending.clear();
    });
    if (this.buf.length) {
      const rest = this.buf;
      this.buf = Buffer.alloc(0);
      this.onData(rest);
    }
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    for (;;) {
      if (this.buf.length < 4) return;
      const magic = this.buf.readUInt32BE(0);
      if (magic === 0x67446698) {
        if (this.buf.length < 16) return;
        const err = this.buf.readUInt32BE(4);
        const handle = this.buf.readBigUInt64BE(8);
        const p = this.pending.get(handle);
        if (!p) return void this.sock.destroy(new Error(`reply for unknown handle ${handle}`));
        const dataLen = p.type === 0 && err === 0 ? p.length : 0;
        if (this.buf.length < 16 + dataLen) return;
        const data = Buffer.from(this.buf.subarray(16, 16 + dataLen));
        this.buf = this.buf.subarray(16 + dataLen);
        this.pending.delete(handle);
        if (err) p.reject(new NbdError(err, `command ${p.type}`));
        else p.resolve(data);
      } else if (magic === 0x668e33ef) {
        if (this.buf.length < 20) return;
        const flags = this.buf.readUInt16BE(4);
        const type = this.buf.readUInt16BE(6);
        const handle = this.buf.readBigUInt64BE(8);
        const len = this.buf.readUInt32BE(16);
        if (this.buf.length < 20 + len) return;
        const payload = Buffer.from(this.buf.subarray(20, 20 + len));
        this.buf = this.buf.subarray(20 + len);
        const p = this.pending.get(handle);
        if (!p) return void this.sock.destroy(new Error(`chunk for unknown handle ${handle}`));
        if (type & 0x8000) {
          this.pending.delete(handle);
          p.reject(new NbdError(payload.readUInt32BE(0), `command ${p.type}`));
          continue;
        }
        if (type === 1) (p as Pending & { data?: Buffer }).data = payload.subarray(8);
        if (type === 5) (p as Pending & { data?: Buffer }).data = payload;
        if (flags & 1) {
          this.pending.delete(handle);
          p.resolve((p as Pending & { data?: Buffer }).data ?? Buffer.alloc(0));
        }
      } else {
        this.sock.destroy(new Error(`bad reply magic 0x${magic.toString(16)}`));
        return;
      }
    }
  }

  request(type: number, offset: number, length: number, opts: { flags?: number; data?: Buffer } = {}): Promise<Buffer> {
    const handle = this.next++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
    h.writeUInt32BE(offset >>> 0, 20);
    h.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      // After 'close' nothing would ever settle it (a test's workload would hang, not fail).
      if (this.isClosed) return reject(new Error('connection closed'));
      this.pending.set(handle, { type, length, resolve, reject });
      this.sock.write(opts.data ? Buffer.concat([h, opts.data]) : h);
    });
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(0, offset, length);
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(1, offset, data.length, { data, flags: opts.fua ? 1 : 0 });
  }

  async flush(): Promise<void> {
    await this.request(3, 0, 0);
  }

  async close(): Promise<void> {
    // Closed already (by the test, then again in its teardown): 'close' will not come again.
    if (this.sock.closed) return;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(2, 6);
    this.sock.end(h);
    await new Promise((r) => this.sock.once('close', r));
  }

  destroy(): void {
    this.sock.destroy();
  }

  /** Sends FIN without NBD_CMD_DISC (a client that shuts down its sending side); replies can still arrive. */
  async halfClose(): Promise<void> {
    this.sock.end();
    await new Promise((r) => this.sock.once('close', r));
  }
}
