// The replication wire protocol: msgpack messages over WebSocket, each `{ v, t, ... }`. decode() checks every
// field's type so a hostile or broken peer gets a clear error (and a close), never a crash or a bad apply.
import { Packr } from 'msgpackr';
import { BlockferryError } from '../util/errors.js';
import { BufferPool, releaseBuffer } from '../util/buffer-pool.js';
import type { JournalEntry } from '../journal/types.js';
import type { RecordSink } from '../journal/journal.js';

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
  /**
   * features: what this replayer understands beyond version 1's base (FEATURE_RECORDS).
   * appliedCrcs: the CRC32Cs of the last entries the replica applied, oldest first, the last one at appliedSeq
   * (absent or null when not known: a replayer from before they were sent, or a replica whose last step was a
   * resync). The primary compares them with its own entries at those seqs: any difference means two histories
   * (its journal lost a tail the replica has). More than one, because a FLUSH marker (or a TRIM of the same
   * range) is the same bytes in any history.
   * seeded: the replica's image held data before anything was shipped to it (a demoted primary's image, or one
   * put in its place by hand): at appliedSeq 0 it is not all zeroes, and is compared by digests like any other.
   */
  | { v: number; t: 'welcome'; appliedSeq: number; consistentFrom?: number | null; features?: string[]; appliedCrcs?: number[] | null; seeded?: boolean }
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
/** How many of its last applied entries' CRCs a replayer names in its welcome (see `welcome`). */
export const MAX_APPLIED_CRCS = 64;

/** Plain msgpack maps (no record extension): what every peer, of any version, decodes. */
const PACKR_OPTIONS = { useRecords: false, mapsAsObjects: true } as const;
const packr = new Packr(PACKR_OPTIONS);

export function encode(msg: Message): Buffer {
  return packr.pack(msg);
}

/** Room past a large record for the message's head, when it needs a buffer of its own. */
const ENCODING_SLACK = 1024;
/** Buffers for messages larger than a RecordsPool's own (a resync's 8 MiB records, a host's 32 MiB writes). */
const largeMessages = new BufferPool({ unit: 2 ** 20, maxLength: 48 * 2 ** 20, maxBytes: 20 * 2 ** 20 });

/**
 * The buffers one link writes its batches of records into, each reused once the WebSocket has written it,
 * where encoding with msgpackr would allocate a new buffer for nearly every batch. Each such buffer is
 * external memory to V8, and hundreds of MiB of them a second drove major GCs: with 1 MiB writes replicated,
 * V8's marking and sweeping were ~20% of serve's samples (perf). (Not msgpackr's useBuffer: its target
 * buffer is shared by every Packr in the process, so the next encode() anywhere would write into a buffer
 * this pool may have handed out again.)
 */
export class RecordsPool {
  private readonly free: Buffer[] = [];

  /** Buffers of `size` bytes; at most `keep` of them are kept while unused. */
  constructor(
    private readonly size: number,
    private readonly keep: number,
  ) {}

  /** A records message to fill in place (see RecordsBatch), in one of this pool's buffers. */
  records(): RecordsBatch {
    return new RecordsBatch(this.free.pop() ?? Buffer.allocUnsafeSlow(this.size), (buf) => this.put(buf));
  }

  private put(buf: Buffer): void {
    if (this.free.length < this.keep) this.free.push(buf);
  }
}

/**
 * The head of a `records` message as msgpack: a map of four, `v`, `t: 'records'`, `first` (a float64: exact
 * for any seq, and what msgpackr itself writes for numbers past 32 bits) and `records`, an array (its count,
 * a uint32, patched in at the end). decode() reads it as it reads msgpackr's own encoding of the same map.
 */
const RECORDS_HEAD = Buffer.concat([
  Buffer.from([0x84, 0xa1, 0x76, PROTOCOL_VERSION, 0xa1, 0x74, 0xa7]),
  Buffer.from('records'),
  Buffer.from([0xa5]),
  Buffer.from('first'),
  Buffer.from([0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xa7]),
  Buffer.from('records'),
  Buffer.from([0xdd, 0, 0, 0, 0]),
]);
const FIRST_AT = RECORDS_HEAD.indexOf(0xcb) + 1;
const COUNT_AT = RECORDS_HEAD.length - 4;
/** msgpack's bin 32 header before each record: 0xc6 and the length. */
const RECORD_HEAD_BYTES = 5;

/**
 * A `records` message written in place: the journal copies each value straight into the message's buffer
 * (sink.place), where encoding the values it had read into memory first cost a second copy of every shipped
 * byte (with 1 MiB writes replicated, a tenth of serve's CPU went to such copies). The buffers come from the
 * link's pool and return to it once the WebSocket has written them.
 */
export class RecordsBatch implements RecordSink {
  private pos = RECORDS_HEAD.length;
  private count = 0;
  private last: Buffer | undefined;

  constructor(
    private buf: Buffer,
    private giveBack: (buf: Buffer) => void,
  ) {
    RECORDS_HEAD.copy(buf, 0);
  }

  place(len: number): Buffer | undefined {
    const end = this.pos + RECORD_HEAD_BYTES + len;
    if (end > this.buf.length) {
      if (this.count > 0) return undefined;
      // A single record larger than the pool's buffers (a resync's 8 MiB chunks, a host's 32 MiB writes).
      const big = largeMessages.alloc(Math.ceil((end + ENCODING_SLACK) / 2 ** 20) * 2 ** 20);
      this.buf.copy(big, 0, 0, this.pos);
      this.giveBack(this.buf);
      this.buf = big;
      this.giveBack = releaseBuffer;
    }
    const buf = this.buf;
    buf[this.pos] = 0xc6;
    buf.writeUInt32BE(len, this.pos + 1);
    this.count++;
    this.pos = end;
    this.last = buf.subarray(end - len, end);
    return this.last;
  }

  /** The message, once every record is in, and the function to call when its bytes have been written. */
  finish(first: number): { data: Buffer; last: Buffer | undefined; release: () => void } {
    this.buf.writeDoubleBE(first, FIRST_AT);
    this.buf.writeUInt32BE(this.count, COUNT_AT);
    const { buf, giveBack } = this;
    let released = false;
    return {
      data: buf.subarray(0, this.pos),
      last: this.last,
      release: () => {
        if (released) return;
        released = true;
        giveBack(buf);
      },
    };
  }

  /** Gives the buffer back unsent (an empty read, or a link that closed meanwhile). */
  discard(): void {
    this.giveBack(this.buf);
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
      if ((m.size as number) < 1) throw new ProtocolError('bad hello: a volume has at least one byte');
      if (m.role !== undefined && m.role !== 'primary' && m.role !== 'verify') throw new ProtocolError('bad hello role');
      if (m.token !== undefined && (typeof m.token !== 'string' || m.token.length > 1024)) throw new ProtocolError('bad hello token');
      return m as Message;
    case 'welcome':
      if (!isInt(m.appliedSeq)) throw new ProtocolError('bad welcome');
      if (m.consistentFrom !== undefined && m.consistentFrom !== null && !(Number.isSafeInteger(m.consistentFrom) && (m.consistentFrom as number) >= -1)) {
        throw new ProtocolError('bad welcome');
      }
      if (m.features !== undefined && !(Array.isArray(m.features) && m.features.every((f) => typeof f === 'string'))) throw new ProtocolError('bad welcome features');
      if (m.seeded !== undefined && typeof m.seeded !== 'boolean') throw new ProtocolError('bad welcome seeded');
      if (m.appliedCrcs !== undefined && m.appliedCrcs !== null) {
        const crcs = m.appliedCrcs;
        if (!Array.isArray(crcs) || crcs.length > MAX_APPLIED_CRCS || !crcs.every((c) => isInt(c) && c <= 0xffffffff)) throw new ProtocolError('bad welcome crcs');
      }
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
