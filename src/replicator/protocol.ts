// The replication wire protocol: msgpack messages over WebSocket, each `{ v, t, ... }`. decode() checks every
// field's type so a hostile or broken peer gets a clear error (and a close), never a crash or a bad apply.
import { Packr } from 'msgpackr';
import { BlockferryError } from '../util/errors.js';
import { BufferPool, releaseBuffer } from '../util/buffer-pool.js';
import type { JournalEntry } from '../journal/types.js';

export const PROTOCOL_VERSION = 1;
/** Largest WebSocket message either side accepts: one batch of entries plus framing. */
export const MAX_MESSAGE_BYTES = 64 * 2 ** 20;
/** WebSocket close codes (4000-4999 are for applications). */
export const CloseCode = {
  PROTOCOL: 4000,
  VOLUME_MISMATCH: 4009,
  BUSY: 4010,
  CORRUPT: 4022,
  GAP: 4023,
  STORAGE: 4028,
  PROMOTED: 4030,
  /** Unknown volume or wrong token (replayer --token-file). */
  AUTH: 4001,
} as const;

/**
 * hello/welcome open a link. A `verify` peer (blockferry verify) may only ask for digests. Resync: the primary
 * sends `resync` (entries before fromSeq will never come: the replica is inconsistent from now on), compares
 * digests (`digests?` → `digests`, computed at the replica's applied seq, in order with the entries), ships the
 * differing chunks as ordinary entries, and ends with `synced` (consistent again once applied through seq).
 */
export type Message =
  | { v: number; t: 'hello'; volume: string; volumeId: string; size: number; role?: 'primary' | 'verify'; token?: string }
  /** features: what this replayer understands beyond version 1's base (FEATURE_RECORDS). */
  | { v: number; t: 'welcome'; appliedSeq: number; consistentFrom?: number | null; features?: string[] }
  | { v: number; t: 'entries'; entries: JournalEntry[] }
  /** Entries first, first+1, ... as the journal stores them (entry.ts: a 40-byte header, then any data). */
  | { v: number; t: 'records'; first: number; records: Buffer[] }
  /** seq: applied (visible in the replica); durableSeq: on its stable storage (what retention may drop). */
  | { v: number; t: 'ack'; seq: number; durableSeq?: number }
  | { v: number; t: 'resync'; fromSeq: number }
  | { v: number; t: 'synced'; seq: number }
  | { v: number; t: 'digests?'; id: number; first: number; count: number }
  | { v: number; t: 'digests'; id: number; first: number; appliedSeq: number; digests: Buffer }
  | { v: number; t: 'error'; code: string; message: string };

/**
 * The replayer takes `records`: batches of stored journal values, which the primary ships as they are instead
 * of re-encoding every entry as a msgpack map (and the replayer decodes with the journal's own decodeValue).
 */
export const FEATURE_RECORDS = 'records';

/** Most chunks one digest request may ask for (bounds the replayer's work per message). */
export const MAX_DIGEST_CHUNKS = 4096;

/** Plain msgpack maps (no record extension): what every peer, of any version, decodes. */
const PACKR_OPTIONS = { useRecords: false, mapsAsObjects: true } as const;
const packr = new Packr(PACKR_OPTIONS);

export function encode(msg: Message): Buffer {
  return packr.pack(msg);
}

/**
 * Room for a message's fields beyond the bytes encode() is told of (records plus 8 per record for their
 * framing). Small: a batch of 1 MiB records just over BATCH_BYTES still fits a regular buffer.
 */
const ENCODING_SLACK = 1024;
/** Buffers for messages larger than a PooledEncoder's own. */
const largeMessages = new BufferPool({ unit: 2 ** 20, maxLength: 48 * 2 ** 20, maxBytes: 20 * 2 ** 20 });

/**
 * Encodes the large messages one link sends (batches of records) into buffers it reuses once the WebSocket
 * has written them, where encode() leaves msgpackr to allocate a new buffer for nearly every batch. Each such
 * buffer is external memory to V8, and hundreds of MiB of them a second drove major GCs: with 1 MiB writes
 * replicated, V8's marking and sweeping were ~20% of serve's samples (perf).
 */
export class PooledEncoder {
  private readonly packr = new Packr(PACKR_OPTIONS);
  private readonly free: Buffer[] = [];

  /** Buffers of `size` bytes; at most `keep` of them are kept while unused. */
  constructor(
    private readonly size: number,
    private readonly keep: number,
  ) {}

  /**
   * `msg` encoded, and the function to call once its bytes have been written (the buffer returns to the
   * pool). `bytes`: about how large the encoding will be (the records' bytes); a message larger than the
   * pool's buffers is encoded into one from a pool of large buffers by the MiB (a resync's 8 MiB records, a
   * host's 32 MiB writes), which msgpackr would otherwise grow to four times the size, anew each time.
   */
  encode(msg: Message, bytes = 0): { data: Buffer; release: () => void } {
    const need = bytes + ENCODING_SLACK;
    const big = need > this.size;
    const buf = big ? largeMessages.alloc(Math.ceil(need / 2 ** 20) * 2 ** 20) : (this.free.pop() ?? Buffer.allocUnsafeSlow(this.size));
    const giveBack = () => (big ? releaseBuffer(buf) : this.put(buf));
    this.packr.useBuffer(buf);
    const data = this.packr.pack(msg);
    if (data.buffer !== buf.buffer) {
      giveBack();
      return { data, release: () => undefined };
    }
    let released = false;
    return {
      data,
      release: () => {
        if (released) return;
        released = true;
        giveBack();
      },
    };
  }

  private put(buf: Buffer): void {
    if (this.free.length < this.keep) this.free.push(buf);
  }
}

export class ProtocolError extends BlockferryError {
  constructor(message: string) {
    super('ERR_REPLICATION_PROTOCOL', message);
  }
}

/** msgpack binary as a Buffer over the same memory (msgpackr may hand back a plain Uint8Array). */
const asBuffer = (u: Uint8Array): Buffer => (Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength));

const isInt = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

export function decode(buf: Buffer): Message {
  let m: Record<string, unknown>;
  try {
    m = packr.unpack(buf) as Record<string, unknown>;
  } catch (err) {
    throw new ProtocolError(`malformed message: ${(err as Error).message}`);
  }
  if (typeof m !== 'object' || m === null) throw new ProtocolError('message is not a map');
  if (m.v !== PROTOCOL_VERSION) throw new ProtocolError(`protocol version ${String(m.v)} is not ${PROTOCOL_VERSION}`);
  switch (m.t) {
    case 'hello':
      if (typeof m.volume !== 'string' || typeof m.volumeId !== 'string' || !isInt(m.size)) throw new ProtocolError('bad hello');
      if (m.role !== undefined && m.role !== 'primary' && m.role !== 'verify') throw new ProtocolError('bad hello role');
      if (m.token !== undefined && (typeof m.token !== 'string' || m.token.length > 1024)) throw new ProtocolError('bad hello token');
      return m as Message;
    case 'welcome':
      if (!isInt(m.appliedSeq)) throw new ProtocolError('bad welcome');
      if (m.consistentFrom !== undefined && m.consistentFrom !== null && !(Number.isSafeInteger(m.consistentFrom) && (m.consistentFrom as number) >= -1)) {
        throw new ProtocolError('bad welcome');
      }
      if (m.features !== undefined && !(Array.isArray(m.features) && m.features.every((f) => typeof f === 'string'))) throw new ProtocolError('bad welcome features');
      return m as Message;
    case 'resync':
      if (!isInt(m.fromSeq) || m.fromSeq < 1) throw new ProtocolError('bad resync');
      return m as Message;
    case 'synced':
      if (!isInt(m.seq)) throw new ProtocolError('bad synced');
      return m as Message;
    case 'digests?':
      if (!isInt(m.id) || !isInt(m.first) || !isInt(m.count) || m.count < 1 || m.count > MAX_DIGEST_CHUNKS) throw new ProtocolError('bad digest request');
      return m as Message;
    case 'digests':
      if (!isInt(m.id) || !isInt(m.first) || !isInt(m.appliedSeq) || !(m.digests instanceof Uint8Array)) throw new ProtocolError('bad digests');
      m.digests = asBuffer(m.digests);
      return m as Message;
    case 'ack':
      if (!isInt(m.seq) || (m.durableSeq !== undefined && !isInt(m.durableSeq))) throw new ProtocolError('bad ack');
      return m as Message;
    case 'error':
      if (typeof m.code !== 'string' || typeof m.message !== 'string') throw new ProtocolError('bad error message');
      return m as Message;
    case 'entries': {
      if (!Array.isArray(m.entries)) throw new ProtocolError('entries is not an array');
      for (const e of m.entries as Array<Record<string, unknown>>) {
        if (typeof e !== 'object' || e === null || !isInt(e.seq) || !isInt(e.kind) || !isInt(e.offset) || !isInt(e.length) || !isInt(e.crc)) {
          throw new ProtocolError('malformed entry');
        }
        if (e.data !== undefined && !Buffer.isBuffer(e.data) && !(e.data instanceof Uint8Array)) throw new ProtocolError('entry data is not binary');
        if (e.data instanceof Uint8Array) e.data = asBuffer(e.data);
      }
      return m as Message;
    }
    case 'records': {
      if (!isInt(m.first) || m.first < 1 || !Array.isArray(m.records)) throw new ProtocolError('bad records');
      const recs = m.records as unknown[];
      for (let i = 0; i < recs.length; i++) {
        const r = recs[i];
        if (!(r instanceof Uint8Array)) throw new ProtocolError('a record is not binary');
        recs[i] = asBuffer(r);
      }
      return m as Message;
    }
    default:
      throw new ProtocolError(`unknown message type ${String(m.t)}`);
  }
}
