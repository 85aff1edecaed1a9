// File helpers shared by the benchmarks.
import fs from 'node:fs';

/** Whether two files hold the same bytes (read in 16 MiB pieces). */
export function sameBytes(a, b) {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    if (fs.fstatSync(fa).size !== fs.fstatSync(fb).size) return false;
    const ba = Buffer.alloc(16 * 2 ** 20);
    const bb = Buffer.alloc(16 * 2 ** 20);
    for (let off = 0; ; off += ba.length) {
      const n = fs.readSync(fa, ba, 0, ba.length, off);
      const m = fs.readSync(fb, bb, 0, bb.length, off);
      if (n !== m || !ba.subarray(0, n).equals(bb.subarray(0, m))) return false;
      if (n === 0) return true;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}
