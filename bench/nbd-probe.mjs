// A minimal NBD client for the benchmarks' probes (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies,
// one request at a time): enough to write a marker block and time when it reaches a replica.
import net from 'node:net';

export class NbdProbe {
  static connect(host, port, name) {
    return new Promise((resolve, reject) => {
      const sock = net.connect(port, host);
      let buf = Buffer.alloc(0);
      let stage = 0;
      sock.on('error', reject);
      sock.on('data', (d) => {
        buf = Buffer.concat([buf, d]);
        if (stage === 0 && buf.length >= 18) {
          if (buf.toString('latin1', 0, 16) !== 'NBDMAGICIHAVEOPT') return reject(new Error('not an NBD server'));
          buf = buf.subarray(18);
          const flags = Buffer.alloc(4);
          flags.writeUInt32BE(3); // FIXED_NEWSTYLE | NO_ZEROES
          const opt = Buffer.alloc(16);
          opt.write('IHAVEOPT', 0, 'latin1');
          opt.writeUInt32BE(1, 8); // NBD_OPT_EXPORT_NAME
          opt.writeUInt32BE(Buffer.byteLength(name), 12);
          sock.write(Buffer.concat([flags, opt, Buffer.from(name)]));
          stage = 1;
        }
        if (stage === 1 && buf.length >= 10) {
          const size = Number(buf.readBigUInt64BE(0));
          sock.removeAllListeners('data');
          resolve(new NbdProbe(sock, size));
        }
      });
    });
  }

  constructor(sock, size) {
    this.sock = sock;
    this.size = size;
    this.pending = undefined;
    this.handle = 0n;
    let buf = Buffer.alloc(0);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 16) {
        const err = buf.readUInt32BE(4);
        buf = buf.subarray(16);
        const p = this.pending;
        this.pending = undefined;
        if (err) p?.reject(new Error(`NBD error ${err}`));
        else p?.resolve();
      }
    });
  }

  request(type, offset, data, length = data ? data.length : 0) {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(++this.handle, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.sock.write(data ? Buffer.concat([h, data]) : h);
    });
  }

  write(offset, data) {
    return this.request(1, offset, data);
  }

  flush() {
    return this.request(3, 0, undefined, 0);
  }

  close() {
    this.sock.end(Buffer.from('2560951300000002000000000000000000000000000000000000000000000000'.slice(0, 56), 'hex'));
    this.sock.destroy();
  }
}
