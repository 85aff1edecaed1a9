// Reads a primary's plain WebSocket connection so that each large frame lands whole in one reused buffer.
//
// Left to Node and ws, a 4 MiB batch arrived as ~64 one-off 64 KiB read buffers, which ws's Receiver then
// copied into one new 4 MiB buffer: twice the data in new ArrayBuffers. Every new ArrayBuffer counts as
// external memory for V8, which starts a full mark-compact after each ~64 MiB of it, so the replayer ran ~12
// major GCs a second at 1 MiB writes and its GC threads took ~40% of its CPU. Here the socket reads in
// user-buffer mode (like the NBD connection): the kernel writes a large frame straight into a pooled buffer
// of its size, the frame goes to ws as one chunk, ws's Receiver slices it instead of copying, and the buffer
// comes back to the pool once the message built on it is handled (releaseFrame).
//
// Only frame lengths are read here; ws still parses and checks every frame (masking, opcodes, maxPayload).
import net from 'node:net';
import { BufferPool, releaseBuffer } from '../util/buffer-pool.js';

/** Frames with at least this much payload are read into a buffer of their own; smaller ones are copied through. */
const LARGE_PAYLOAD = 64 * 1024;
/** Where reads go between large frames; bytes are copied out of it. */
const STAGING_BYTES = 256 * 1024;
/** Emitted on every read, whatever it completed: a link's liveness counts bytes, not whole messages. */
export const RECEIVED = 'blockferry:received';

/** Frame buffers by the MiB: batch messages vary in size, and whole MiB classes let one serve the next. */
const framePool = new BufferPool({ unit: 2 ** 20, maxLength: 80 * 2 ** 20, maxBytes: 64 * 2 ** 20 });

/** Frame buffers handed to ws and not yet released, by the ArrayBuffer a message's Buffer views. */
const outstanding = new Map<ArrayBuffer, { owner: Buffer; link: Set<ArrayBuffer> }>();

/** Frame buffers handed on and not yet released (for tests and metrics). */
export function framesOutstanding(): number {
  return outstanding.size;
}

/**
 * Gives the buffer under a message back once the message and every view of it are done with. A message not
 * read into a frame buffer (small, compressed, fragmented, or over a TLS link) is ignored.
 */
export function releaseFrame(message: Buffer): void {
  const ab = message.buffer as ArrayBuffer;
  const o = outstanding.get(ab);
  if (!o) return;
  outstanding.delete(ab);
  o.link.delete(ab);
  releaseBuffer(o.owner);
}

/**
 * Takes over an upgraded plain socket (its HTTP request read, `head` the bytes after it) and returns the Socket
 * to give ws. Falls back to `socket` itself, unchanged, where its handle cannot read into user buffers.
 */
export function adoptFrameReader(socket: net.Socket, head: Buffer, maxPayload: number): { socket: net.Socket; head: Buffer } {
  const holder = socket as unknown as { _handle: { useUserBuffer?: unknown; readStop?: () => number } | null };
  const handle = holder._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || typeof handle.readStop !== 'function') return { socket, head };
  // More than staging holds is not from Node's HTTP server (it reads 64 KiB at a time): such a socket stays as it is.
  if (head.length + socket.readableLength > STAGING_BYTES) return { socket, head };
  // Bytes the HTTP server had read past the request and not yet handed on (read() may restart reading: the
  // handle is stopped after it, and no read can land before this function returns).
  const buffered: Buffer[] = [];
  for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null; ) buffered.push(chunk);
  handle.readStop();
  (handle as { reading?: boolean }).reading = false;
  const early = buffered.length ? Buffer.concat([head, ...buffered]) : head;
  const reader = new FrameReader(maxPayload, handle as unknown as UserBufferHandle, early);
  holder._handle = null;
  const sock = new net.Socket({
    handle: handle as never,
    readable: true,
    writable: true,
    onread: { buffer: () => reader.target(), callback: (n: number) => reader.onRead(n) },
  } as net.SocketConstructorOpts);
  socket.destroy();
  sock.setNoDelay(true);
  reader.sock = sock;
  // Frames of a link that went away are left to the GC: a message still being handled may view one.
  sock.once('close', () => reader.forget());
  // The bytes read before the takeover wait in staging, and the first reads land behind them. libuv may read
  // again as soon as this returns, so they are parsed with the first read or, if none comes, after ws has
  // attached its 'data' listener (it does so before handleUpgrade returns): ws is given no head.
  if (early.length > 0) setImmediate(() => reader.parseNow());
  return { socket: sock, head: Buffer.alloc(0) };
}

interface UserBufferHandle {
  useUserBuffer(buf: Uint8Array): void;
}

class FrameReader {
  sock: net.Socket | undefined;
  private readonly staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  /** Bytes in staging not yet handed on (a frame header split across reads waits here). */
  private staged = 0;
  /** Bytes of a copied-through frame still to come. */
  private passRemaining = 0;
  /** The large frame being filled (a framePool buffer) and the bytes in it so far. */
  private frame: Buffer | undefined;
  private filled = 0;
  /** This link's frames in `outstanding`. */
  private readonly mine = new Set<ArrayBuffer>();

  constructor(
    private readonly maxPayload: number,
    private readonly handle: UserBufferHandle,
    early: Buffer,
  ) {
    early.copy(this.staging);
    this.staged = early.length;
  }

  /** Where the next socket read goes: the rest of the large frame being filled, else staging. */
  target(): Buffer {
    if (this.frame) return this.frame.subarray(this.filled);
    return this.staging.subarray(this.staged);
  }

  /** A read of `n` bytes into target(). Returns nothing: flow control is ws's (it pauses the socket). */
  onRead(n: number): void {
    this.sock!.emit(RECEIVED);
    if (this.frame) {
      this.filled += n;
      if (this.filled === this.frame.length) this.finishFrame();
      return;
    }
    this.staged += n;
    this.parse();
  }

  /** Parses what staging holds outside a read (the bytes from before the takeover). */
  parseNow(): void {
    if (!this.sock || this.sock.destroyed || this.frame) return;
    this.parse();
    // Node asks for the next read's buffer only after a read: point the handle at where the next bytes belong now.
    this.handle.useUserBuffer(this.target());
  }

  forget(): void {
    for (const ab of this.mine) outstanding.delete(ab);
    this.mine.clear();
  }

  /** Hands bytes to ws (its 'data' listener), unless the socket is already destroyed. */
  private emit(chunk: Buffer): void {
    if (!this.sock!.destroyed) this.sock!.emit('data', chunk);
  }

  private finishFrame(): void {
    const frame = this.frame!;
    const ab = frame.buffer as ArrayBuffer;
    outstanding.set(ab, { owner: frame, link: this.mine });
    this.mine.add(ab);
    this.frame = undefined;
    this.filled = 0;
    this.emit(frame);
  }

  /** Hands on what staging holds: small frames copied out in one run, a large frame moved into its own buffer. */
  private parse(): void {
    const s = this.staging;
    let at = 0;
    let runFrom = 0;
    const flushRun = (to: number) => {
      if (to > runFrom) this.emit(Buffer.from(s.subarray(runFrom, to)));
      runFrom = to;
    };
    while (at < this.staged) {
      if (this.passRemaining > 0) {
        const n = Math.min(this.passRemaining, this.staged - at);
        this.passRemaining -= n;
        at += n;
        continue;
      }
      const avail = this.staged - at;
      if (avail < 2) break;
      const b1 = s[at + 1];
      const len7 = b1 & 0x7f;
      const headerBytes = 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0) + (b1 & 0x80 ? 4 : 0);
      if (avail < headerBytes) break;
      let payload: number;
      if (len7 === 126) payload = s.readUInt16BE(at + 2);
      else if (len7 === 127) {
        const hi = s.readUInt32BE(at + 2);
        // Beyond 2^53 or beyond the limit: copied through, and ws refuses the frame.
        payload = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + s.readUInt32BE(at + 6);
      } else payload = len7;
      const compressed = (s[at] & 0x40) !== 0;
      // A fragment (FIN clear, or a continuation) is one piece of a message ws joins into a new buffer: the
      // frame buffer would never be the message's and never come back, so fragments are copied through.
      const fragment = (s[at] & 0x80) === 0 || (s[at] & 0x0f) === 0;
      if (payload < LARGE_PAYLOAD || payload > this.maxPayload || compressed || fragment) {
        // ws inflates a compressed frame into new buffers anyway: nothing would come back to release.
        this.passRemaining = headerBytes + payload;
        continue;
      }
      flushRun(at);
      const total = headerBytes + payload;
      const frame = framePool.alloc(total);
      const have = Math.min(total, this.staged - at);
      s.copy(frame, 0, at, at + have);
      at += have;
      runFrom = at;
      this.frame = frame;
      this.filled = have;
      if (have === total) {
        this.finishFrame();
        continue;
      }
      // The rest of the frame is read straight into it; staging holds nothing more.
      break;
    }
    flushRun(at);
    // A header split across reads stays, moved to the front.
    if (at < this.staged) s.copy(s, 0, at, this.staged);
    this.staged -= at;
  }
}
