// Reaching into a stopped journal's storage behind its back, as bit rot or a bad disk would: for the tests
// that prove a damaged entry is caught. An entry's value (header, then data, as entry.ts lays it out) is
// stored whole in LMDB, or as its header in LMDB and its data in the segment's data file (data-files.ts).
import fs from 'node:fs';
import path from 'node:path';
import { open } from 'lmdb';
import { VALUE_HEADER, fileRef } from '../../src/journal/entry.js';

/** Where a flipped byte was: in the LMDB value, or in the data file. */
export type StoredIn = 'lmdb' | 'data file';

/**
 * Flips the bits `mask` of byte `at` of entry `seq`'s value (negative: from its end) in segment `segment`,
 * wherever that byte is stored. Returns where it was.
 */
export async function flipStoredByte(dir: string, seq: number, at: number, mask: number, segment = 'entries'): Promise<StoredIn> {
  const raw = open({ path: path.join(dir, 'journal.mdb') });
  try {
    const db = raw.openDB<Buffer, number>({ name: segment, encoding: 'binary' });
    const v = Buffer.from(db.getBinary(seq)!);
    const ref = fileRef(v);
    if (ref === undefined) {
      const i = at < 0 ? v.length + at : at;
      v[i] ^= mask;
      await db.put(seq, v);
      return 'lmdb';
    }
    const dataLen = Number(v.readBigUInt64BE(16));
    const i = (at < 0 ? VALUE_HEADER + dataLen + at : at) - VALUE_HEADER;
    if (i < 0) throw new Error(`byte ${at} of seq ${seq} is in its header; flip it in LMDB instead`);
    const fd = fs.openSync(path.join(dir, `${segment}.data`), 'r+');
    try {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, ref + i);
      b[0] ^= mask;
      fs.writeSync(fd, b, 0, 1, ref + i);
    } finally {
      fs.closeSync(fd);
    }
    return 'data file';
  } finally {
    await raw.close();
  }
}

/** Bytes in the journal's data files (the WRITE data of commit durability). */
export function dataFileBytes(dir: string): number {
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.data'))
    .reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);
}

/** An entry's header as stored in segment `segment`, and where its data is (a data file position, or inline). */
export interface StoredEntry {
  seq: number;
  kind: number;
  offset: number;
  length: number;
  /** Position of the data in the segment's data file; undefined when the data (if any) is in LMDB. */
  filePos: number | undefined;
}

/** The stored entries of a stopped journal's segment, and its image checkpoint. */
export async function storedEntries(dir: string, segment = 'entries'): Promise<{ entries: StoredEntry[]; checkpoint: number }> {
  const raw = open({ path: path.join(dir, 'journal.mdb') });
  try {
    const db = raw.openDB<Buffer, number>({ name: segment, encoding: 'binary' });
    const meta = raw.openDB<unknown, string>({ name: 'meta' });
    const entries: StoredEntry[] = [];
    for (const { key, value } of db.getRange()) {
      const v = value as Buffer;
      entries.push({ seq: key as number, kind: v[0], offset: Number(v.readBigUInt64BE(8)), length: Number(v.readBigUInt64BE(16)), filePos: fileRef(v) });
    }
    return { entries, checkpoint: (meta.get('checkpoint') as number | undefined) ?? 0 };
  } finally {
    await raw.close();
  }
}

/** Overwrites with zeroes the data of a WRITE kept in its segment's data file, as a power cut can leave it. */
export function zeroStoredData(dir: string, e: StoredEntry, segment = 'entries'): void {
  if (e.filePos === undefined) throw new Error(`seq ${e.seq} has no data in the data file`);
  const fd = fs.openSync(path.join(dir, `${segment}.data`), 'r+');
  try {
    fs.writeSync(fd, Buffer.alloc(e.length), 0, e.length, e.filePos);
  } finally {
    fs.closeSync(fd);
  }
}
