// How one journal entry is checked and stored. The CRC32C covers a fixed header (kind, offset, length) and
// the data, so a flipped offset or length is caught as surely as a flipped data byte. The replayer checks
// entries received over the wire with the same functions.
import { crc32c } from '../util/crc32c.js';
import { JournalCorruptError } from '../util/errors.js';
import { BufferPool } from '../util/buffer-pool.js';
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
 * How a WRITE's data can be stored: in LMDB as the value's tail (inline), or in its segment's data file (see
 * journal.ts) with LMDB holding the header and the data's place in that file. Byte 1 of the header (reserved,
 * zero in every value written inline) is then DATA_IN_FILE and a u64 file position follows the header. Values
 * handed to readers always have the data inline and byte 1 zero: the layout above.
 */
export const DATA_IN_FILE = 1;
export const FILE_REF_VALUE = VALUE_HEADER + 8;

/** The file position of a value stored as a file reference; undefined for an inline value. */
export function fileRef(v: Buffer): number | undefined {
  return v.length === FILE_REF_VALUE && v[1] === DATA_IN_FILE ? r64(v, VALUE_HEADER) : undefined;
}

/** A WRITE's length field: its data's length (a file reference's data, before it is read and checked). */
export function valueDataLength(v: Buffer): number {
  return r64(v, 16);
}

/**
 * The value's size as the journal counts it (its `cum` field, the cap, the byte lags): header plus data,
 * whether the data is inline or in the data file.
 */
export function storedLength(v: Buffer): number {
  return fileRef(v) === undefined ? v.length : VALUE_HEADER + valueDataLength(v);
}

/** Writes into `out` (FILE_REF_VALUE bytes) the LMDB value for `value` whose data is at `pos` in the data file. */
export function encodeFileRef(value: Buffer, pos: number, out: Buffer): Buffer {
  value.copy(out, 0, 0, VALUE_HEADER);
  out[1] = DATA_IN_FILE;
  writeU64(out, pos, VALUE_HEADER);
  return out;
}

/**
 * Record buffers for WRITEs, data behind room for the value header, reused once their entry is committed and
 * applied (releaseBuffer): a steady write load allocates no ArrayBuffers (see util/buffer-pool).
 */
const recordPool = new BufferPool({ unit: 4096, maxLength: 8 * 2 ** 20, maxBytes: 32 * 2 ** 20, headroom: VALUE_HEADER });

/**
 * Room for a WRITE's `length` data bytes behind a value header. The NBD connection reads the payload straight
 * into the returned view, and encodeValue then writes only the header in front of it: the payload is copied
 * once, from the socket into its journal record, instead of into a payload buffer and again into the record.
 */
export function allocData(length: number): Buffer {
  return recordPool.alloc(length);
}

export function encodeValue(kind: number, offset: number, length: number, crc: number, ts: number, data: Buffer | undefined, cum: number): Buffer {
  const around = data ? recordPool.whole(data) : undefined;
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
