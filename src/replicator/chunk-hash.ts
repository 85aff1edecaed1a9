// Per-chunk digests of an image: what initial sync, resync and `blockferry verify` compare so that only
// differing chunks cross the wire. Both sides must compute them identically, so this is the one place.
// SHA-256 (hardware-accelerated here: ~1.4 GiB/s) rather than a CRC: a missed difference would leave a
// replica silently wrong, so the digest must make accidental equality out of the question.
import { createHash } from 'node:crypto';
import { scanRead, type BlockDevice } from '../device/block-device.js';
import { ioPool, releaseBuffer } from '../util/buffer-pool.js';

/** Chunk size of the comparison: a differing chunk costs this much on the wire. */
export const CHUNK_BYTES = 256 * 2 ** 10;
/** Chunks per hash request: 64 x 256 KiB = 16 MiB of image per round trip, 2 KiB of digests. */
export const CHUNKS_PER_REQUEST = 64;
export const DIGEST_BYTES = 32;

const ZERO_DIGESTS = new Map<number, Buffer>();

/** The digest of `length` zero bytes (what a hole hashes to), cached per length. */
function zeroDigest(length: number): Buffer {
  let d = ZERO_DIGESTS.get(length);
  if (!d) {
    d = createHash('sha256').update(Buffer.alloc(length)).digest();
    ZERO_DIGESTS.set(length, d);
  }
  return d;
}

/** Number of chunks in a volume of `size` bytes (the last one may be short). */
export function chunkCount(size: number): number {
  return Math.ceil(size / CHUNK_BYTES);
}

/** The byte range of chunk `i`. */
export function chunkRange(i: number, size: number): { offset: number; length: number } {
  const offset = i * CHUNK_BYTES;
  return { offset, length: Math.min(CHUNK_BYTES, size - offset) };
}

/**
 * Digests of chunks [first, first+count) of `dev`, concatenated. Chunks the device reports as holes are not
 * read: their digest is the zero digest, which a written chunk of zeroes also has.
 */
export async function hashChunks(dev: BlockDevice, first: number, count: number): Promise<Buffer> {
  const last = Math.min(first + count, chunkCount(dev.size));
  const out = Buffer.alloc(Math.max(0, last - first) * DIGEST_BYTES);
  if (last <= first) return out;
  const start = first * CHUNK_BYTES;
  const end = Math.min(last * CHUNK_BYTES, dev.size);
  // Which chunks are entirely holes: one block-status query for the whole span.
  const hole = new Uint8Array(last - first).fill(0);
  if (dev.blockStatus) {
    const holeBytes = new Float64Array(last - first);
    let at = start;
    for (const ext of await dev.blockStatus(start, end - start)) {
      if (ext.hole && ext.zero) {
        // Credit this extent's bytes to the chunks it covers.
        let from = at;
        const to = at + ext.length;
        while (from < to) {
          const i = Math.floor(from / CHUNK_BYTES) - first;
          const chunkEnd = Math.min((first + i + 1) * CHUNK_BYTES, to);
          holeBytes[i] += chunkEnd - from;
          from = chunkEnd;
        }
      }
      at += ext.length;
      if (at >= end) break;
    }
    for (let i = 0; i < hole.length; i++) hole[i] = holeBytes[i] === chunkRange(first + i, dev.size).length ? 1 : 0;
  }
  // One buffer for every chunk: each is hashed before the next is read (a new 256 KiB buffer per chunk was a
  // GiB of new ArrayBuffers per GiB scanned, and V8 runs a full GC per 64 MiB of them: see util/buffer-pool).
  const scratch = ioPool.alloc(CHUNK_BYTES);
  try {
    for (let i = 0; i < last - first; i++) {
      const { offset, length } = chunkRange(first + i, dev.size);
      const digest = hole[i] ? zeroDigest(length) : createHash('sha256').update(await scanRead(dev, offset, length, scratch)).digest();
      digest.copy(out, i * DIGEST_BYTES);
    }
  } finally {
    releaseBuffer(scratch);
  }
  return out;
}

/** Indexes (relative to the request) of chunks whose digests differ. */
export function differingChunks(a: Buffer, b: Buffer): number[] {
  const n = Math.max(a.length, b.length) / DIGEST_BYTES;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const s = i * DIGEST_BYTES;
    if (a.length < s + DIGEST_BYTES || b.length < s + DIGEST_BYTES || a.compare(b, s, s + DIGEST_BYTES, s, s + DIGEST_BYTES) !== 0) out.push(i);
  }
  return out;
}
