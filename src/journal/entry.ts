// How one journal entry is checked and stored. The CRC32C covers a fixed header (kind, offset, length) and
// the data, so a flipped offset or length is caught as surely as a flipped data byte. The replayer checks
// entries received over the wire with the same functions.
import { crc32c } from '@node-rs/crc32';
import { JournalCorruptError } from '../util/errors.js';
import { writeU64 } from '../util/u64.js';
import { EntryKind, type JournalEntry } from './types.js';

const CRC_HEADER = 17; // kind u8 + offset u64 + length u64

/** Stored fields are read as written (unguarded): a corrupt value is caught by the CRC, not here. */
function r64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}

/** The CRC header is built here each time: one module-level buffer instead of an allocation per entry. */
const crcHeader = Buffer.alloc(CRC_HEADER);

export function entryCrc(kind: number, offset: number, length: number, data?: Buffer): number {
  crcHeader.writeUInt8(kind, 0);
  writeU64(crcHeader, offset, 1);
  writeU64(crcHeader, length, 9);
  const c = crc32c(crcHeader);
  return data ? crc32c(data, c) : c;
}

const KINDS = new Set<number>(Object.values(EntryKind));

/** Throws JournalCorruptError naming the seq when the entry is malformed or fails its CRC. */
export function verifyEntry(e: JournalEntry): void {
  if (!KINDS.has(e.kind)) throw new JournalCorruptError(e.seq, `unknown kind ${e.kind}`);
  if (e.kind === EntryKind.WRITE) {
    if (!e.data || e.data.length !== e.length) throw new JournalCorruptError(e.seq, `WRITE of ${e.length} bytes carries ${e.data?.length ?? 0}`);
  } else if (e.data && e.data.length > 0) {
    throw new JournalCorruptError(e.seq, `${e.kind} entry carries data`);
  }
  const crc = entryCrc(e.kind, e.offset, e.length, e.data);
  if (crc !== e.crc) throw new JournalCorruptError(e.seq, `CRC32C mismatch (stored ${e.crc.toString(16)}, computed ${crc.toString(16)})`);
}

// Stored value: kind u8, 3 reserved, crc u32, offset u64, length u64, ts f64, cum f64, then data (WRITE
// only). `cum` is the total of stored value bytes appended since the journal began, this one included: the
// journal's size is last.cum - first.cum + first size, with no counter to rewrite on every append.
export const VALUE_HEADER = 40;

export function valueCum(v: Buffer): number {
  return v.readDoubleBE(32);
}

/**
 * Marks the data views allocData made, pointing at their whole value. A property on the view rather than a
 * WeakSet of ArrayBuffers: every entry in a WeakSet is an ephemeron that V8's GC must process, which showed in
 * profiles of 4 KiB writes; a view nobody else made can never carry this module's symbol.
 */
const VALUE = Symbol('journal value');
type InPlaceData = Buffer & { [VALUE]?: Buffer };

/**
 * Free record buffers for allocData, by data capacity in POOL_UNIT steps. Every new ArrayBuffer counts as
 * external memory for V8, which starts a full mark-compact after each ~64 MiB of it: at 1 MiB writes that was
 * several major GCs a second and a third of serve's CPU. Records whose write has been journaled and applied
 * come back here (releaseData) and are reused, so a steady write load allocates nothing.
 */
const POOL_UNIT = 4096;
const POOL_MAX_DATA = 2 ** 20;
const POOL_MAX_BYTES = 32 * 2 ** 20;
const pool: ArrayBuffer[][] = [];
let pooledBytes = 0;

/**
 * Room for a WRITE's `length` data bytes behind a value header. The NBD connection reads the payload straight
 * into the returned view, and encodeValue then writes only the header in front of it: the payload is copied
 * once, from the socket into its journal record, instead of into a payload buffer and again into the record.
 */
export function allocData(length: number): Buffer {
  const units = Math.ceil(length / POOL_UNIT);
  let ab: ArrayBuffer | undefined;
  if (length > 0 && length <= POOL_MAX_DATA) {
    ab = pool[units]?.pop();
    if (ab) pooledBytes -= ab.byteLength;
    else ab = Buffer.allocUnsafeSlow(VALUE_HEADER + units * POOL_UNIT).buffer as ArrayBuffer;
  } else {
    ab = Buffer.allocUnsafeSlow(VALUE_HEADER + length).buffer as ArrayBuffer;
  }
  const value = Buffer.from(ab, 0, VALUE_HEADER + length);
  const data = value.subarray(VALUE_HEADER) as InPlaceData;
  data[VALUE] = value;
  return data;
}

/**
 * Gives a buffer from allocData back for reuse, once nothing reads it any more: its entry is committed (the
 * journal and its memory window hold copies) and written to the image. Any other buffer, or a second release
 * of the same one, is ignored.
 */
export function releaseData(data: Buffer): void {
  const value = (data as InPlaceData)[VALUE];
  if (!value) return;
  (data as InPlaceData)[VALUE] = undefined;
  const ab = value.buffer as ArrayBuffer;
  const units = (ab.byteLength - VALUE_HEADER) / POOL_UNIT;
  if (!Number.isInteger(units) || units < 1 || units * POOL_UNIT > POOL_MAX_DATA || pooledBytes + ab.byteLength > POOL_MAX_BYTES) return;
  (pool[units] ??= []).push(ab);
  pooledBytes += ab.byteLength;
}

/** The whole value around `data` when allocData made it; undefined for any other buffer. */
function valueAround(data: Buffer): Buffer | undefined {
  return (data as InPlaceData)[VALUE];
}

export function encodeValue(kind: number, offset: number, length: number, crc: number, ts: number, data: Buffer | undefined, cum: number): Buffer {
  const around = data ? valueAround(data) : undefined;
  const b = around ?? Buffer.allocUnsafe(VALUE_HEADER + (data?.length ?? 0));
  b.writeUInt32BE(kind << 24, 0);
  b.writeUInt32BE(crc, 4);
  writeU64(b, offset, 8);
  writeU64(b, length, 16);
  b.writeDoubleBE(ts, 24);
  b.writeDoubleBE(cum + b.length, 32);
  if (data && !around) data.copy(b, VALUE_HEADER);
  return b;
}

export function decodeValue(seq: number, v: Buffer): JournalEntry {
  if (v.length < VALUE_HEADER) throw new JournalCorruptError(seq, `stored value of ${v.length} bytes is shorter than its header`);
  const kind = v.readUInt8(0) as JournalEntry['kind'];
  const e: JournalEntry = {
    seq,
    kind,
    crc: v.readUInt32BE(4),
    offset: r64(v, 8),
    length: r64(v, 16),
    ts: v.readDoubleBE(24),
  };
  if (v.length > VALUE_HEADER || kind === EntryKind.WRITE) e.data = v.subarray(VALUE_HEADER);
  return e;
}
