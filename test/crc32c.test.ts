// The journal's CRC32C: the native SSE4.2 version must give exactly the portable library's values for every
// length (both three-way block sizes, their remainders, unaligned starts) and every initial value.
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { crc32c, crc32cImplementation, portableCrc32c } from '../src/util/crc32c.js';

const hasSse42 = process.arch === 'x64' && /\bsse4_2\b/.test(fs.readFileSync('/proc/cpuinfo', 'utf8'));

t.test('the native version is the one in use where the CPU has SSE4.2', async (t) => {
  t.equal(crc32cImplementation, hasSse42 ? 'native-sse4.2' : 'portable');
});

t.test('the standard check value', async (t) => {
  t.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  t.equal(crc32c(Buffer.alloc(0)), 0);
  t.equal(crc32c(Buffer.alloc(0), 0x12345678), 0x12345678, 'nothing to add leaves the initial value');
});

t.test('same values as @node-rs/crc32 for lengths, offsets and initial values', async (t) => {
  const big = randomBytes(3 * 2 ** 20 + 64);
  const lengths = [1, 7, 8, 9, 511, 512, 1535, 1536, 1537, 4096, 8191, 24575, 24576, 24577, 65536, 2 ** 20, 3 * 2 ** 20];
  for (let i = 0; i < 400; i++) lengths.push(Math.floor(Math.random() ** 3 * 3 * 2 ** 20));
  let bad = 0;
  for (const len of lengths) {
    for (const off of [0, 1, 3, 8, 13]) {
      const b = big.subarray(off, off + len);
      const init = (Math.random() * 2 ** 32) >>> 0;
      if (crc32c(b, init) !== portableCrc32c(b, init) || crc32c(b) !== portableCrc32c(b)) bad++;
    }
  }
  t.equal(bad, 0, `${lengths.length * 5} inputs compared`);
});

t.test('chaining: crc32c(b, crc32c(a)) is the CRC of a + b', async (t) => {
  const a = randomBytes(100_000);
  const b = randomBytes(30_001);
  t.equal(crc32c(b, crc32c(a)), crc32c(Buffer.concat([a, b])));
});
