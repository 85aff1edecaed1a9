// The NBD wire codec: pure functions over Buffers and an incremental byte queue. No sockets, no awaits.
import {
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  ReplyFlag,
  ReplyType,
} from './constants.js';
import { readU64, writeU64 } from '../util/u64.js';

export const REQUEST_HEADER_SIZE = 28;
export const OPTION_HEADER_SIZE = 16;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;

/**
 * Bytes received but not yet consumed. Chunks are kept as they arrived; take() copies only when a message
 * straddles chunks, so large WRITE payloads inside one chunk are sliced, never re-concatenated.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // consumed bytes of chunks[0]
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Removes and returns exactly n bytes (n <= length). */
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyTo(out, 0, n);
    return out;
  }

  /** Moves up to n bytes into dst at dstAt; returns how many were moved. */
  copyTo(dst: Buffer, dstAt: number, n: number): number {
    let moved = 0;
    while (moved < n && this.chunks.length > 0) {
      const c = this.chunks[0];
      const k = Math.min(n - moved, c.length - this.head);
      c.copy(dst, dstAt + moved, this.head, this.head + k);
      moved += k;
      this.advance(k);
    }
    return moved;
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    let dropped = 0;
    while (dropped < n && this.chunks.length > 0) {
      const k = Math.min(n - dropped, this.chunks[0].length - this.head);
      dropped += k;
      this.advance(k);
    }
    return dropped;
  }

  /** Copies what is left into a buffer of its own, so that the chunks it came from may be reused. */
  detach(): void {
    if (this.length === 0) return;
    const own = Buffer.allocUnsafe(this.length);
    this.copyTo(own, 0, this.length);
    this.chunks = [own];
    this.head = 0;
    this.length = own.length;
  }

  private advance(n: number): void {
    this.head += n;
    this.length -= n;
    if (this.head === this.chunks[0].length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}

export { readU64, writeU64 } from '../util/u64.js';

// ---- handshake ---------------------------------------------------------------------------------

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface OptionHeader {
  magicOk: boolean;
  option: number;
  length: number;
}

export function decodeOptionHeader(buf: Buffer, at = 0): OptionHeader {
  return {
    magicOk: buf.readBigUInt64BE(at) === NBD_IHAVEOPT,
    option: buf.readUInt32BE(at + 8),
    length: buf.readUInt32BE(at + 12),
  };
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, size, 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(0, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoString(type: number, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(3, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

export function encodeServerEntry(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: name and the info types asked for. null when malformed. */
export function decodeInfoRequest(data: Buffer): { name: string; requests: number[] } | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (4 + nameLen + 2 > data.length) return null;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (6 + nameLen + count * 2 !== data.length) return null;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLen + i * 2));
  return { name, requests };
}

/** Data of NBD_OPT_LIST/SET_META_CONTEXT: export name and queries. null when malformed. */
export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  let at = 4 + nameLen;
  if (at + 4 > data.length) return null;
  const name = data.toString('utf8', 4, at);
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return null;
    const len = data.readUInt32BE(at);
    at += 4;
    if (at + len > data.length) return null;
    queries.push(data.toString('utf8', at, at + len));
    at += len;
  }
  return at === data.length ? { name, queries } : null;
}

// ---- transmission ------------------------------------------------------------------------------

export interface Request {
  magicOk: boolean;
  flags: number;
  type: number;
  /** The client's 8-byte handle, echoed verbatim in the reply. */
  handle: Buffer;
  offset: number;
  length: number;
}

export function decodeRequest(buf: Buffer, at = 0): Request {
  return {
    magicOk: buf.readUInt32BE(at) === NBD_REQUEST_MAGIC,
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    handle: Buffer.from(buf.subarray(at + 8, at + 16)),
    offset: readU64(buf, at + 16),
    length: buf.readUInt32BE(at + 24),
  };
}

export function encodeRequest(r: { flags: number; type: number; handle: Buffer; offset: number; length: number }): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  r.handle.copy(b, 8);
  writeU64(b, r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

export function encodeSimpleReply(handle: Buffer, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  return b;
}

export function encodeStructuredHeader(handle: Buffer, flags: number, type: number, length: number, extra = 0): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + extra);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** Header of an OFFSET_DATA chunk (the 8-byte offset included); the data follows it on the wire. */
export function encodeOffsetDataHeader(handle: Buffer, offset: number, dataLength: number): Buffer {
  const b = encodeStructuredHeader(handle, ReplyFlag.NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength, 8);
  writeU64(b, offset, STRUCTURED_HEADER_SIZE);
  return b;
}

export function encodeStructuredError(handle: Buffer, error: number, message: string): Buffer {
  const m = Buffer.from(message.slice(0, 512), 'utf8');
  const b = encodeStructuredHeader(handle, ReplyFlag.NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_ERROR, 6 + m.length, 6 + m.length);
  b.writeUInt32BE(error, STRUCTURED_HEADER_SIZE);
  b.writeUInt16BE(m.length, STRUCTURED_HEADER_SIZE + 4);
  m.copy(b, STRUCTURED_HEADER_SIZE + 6);
  return b;
}

export function encodeStructuredDone(handle: Buffer): Buffer {
  return encodeStructuredHeader(handle, ReplyFlag.NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_NONE, 0);
}

export function encodeBlockStatus(handle: Buffer, contextId: number, extents: Array<{ length: number; flags: number }>): Buffer {
  const len = 4 + extents.length * 8;
  const b = encodeStructuredHeader(handle, ReplyFlag.NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS, len, len);
  b.writeUInt32BE(contextId, STRUCTURED_HEADER_SIZE);
  let at = STRUCTURED_HEADER_SIZE + 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}
