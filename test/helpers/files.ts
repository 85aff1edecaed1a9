// Image and file helpers for tests: temp images (sparse or random-filled) and streamed checksums/comparisons,
// so multi-hundred-MiB images are never read into memory whole.
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

// Streams and random fills go in 4 MiB chunks: large enough to be fast, small enough to stay off the heap's radar.
const CHUNK = 4 * 2 ** 20;

/** Creates DIR/NAME of SIZE bytes: sparse by default, or with the first `randomBytes` bytes random. */
export function makeImage(dir: string, name: string, size: number, opts: { randomBytes?: number } = {}): string {
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w');
  try {
    const buf = Buffer.alloc(CHUNK);
    const fill = Math.min(opts.randomBytes ?? 0, size);
    for (let off = 0; off < fill; off += CHUNK) fs.writeSync(fd, randomFillSync(buf), 0, Math.min(CHUNK, fill - off), off);
    fs.ftruncateSync(fd, size);
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: CHUNK })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** True when both files have the same length and bytes; compares chunk by chunk. */
export function filesEqual(a: string, b: string): boolean {
  if (fs.statSync(a).size !== fs.statSync(b).size) return false;
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.alloc(CHUNK);
    const bb = Buffer.alloc(CHUNK);
    for (;;) {
      const na = fs.readSync(fa, ba, 0, CHUNK, null);
      const nb = fs.readSync(fb, bb, 0, CHUNK, null);
      if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) return false;
      if (na === 0) return true;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

/** Polls `cond` every `everyMs` until it holds (true) or `ms` pass (false). */
export async function until(cond: () => boolean | Promise<boolean>, ms = 60_000, everyMs = 200): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return true;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  return false;
}

/** Both files exist and hold the same bytes. */
export function sameFiles(a: string, b: string): boolean {
  return fs.existsSync(a) && fs.existsSync(b) && filesEqual(a, b);
}

/** Waits until the replica file equals the primary file; false after `ms`. */
export function converges(primary: string, replica: string, ms = 60_000): Promise<boolean> {
  return until(() => sameFiles(primary, replica), ms, 250);
}
