// CRC32C for journal entries and their verification on both sides of the link. The native helper's version
// runs the SSE4.2 crc32 instruction on three interleaved streams: measured here on 1 MiB buffers 8.0-13.0 GB/s
// against 1.8-3.5 GB/s for @node-rs/crc32 (node, 3000 calls each, same run), which had been 16% of a
// replicating serve's main thread at 1 MiB writes. Elsewhere (no helper, no SSE4.2) @node-rs/crc32, which
// gives the same values: test/crc32c.test.ts compares the two.
import { crc32c as portable } from '@node-rs/crc32';
import { loadNative } from '../device/native.js';

const native = loadNative()?.crc32c;

/** CRC32C of `data`, continuing from `initial` (a previous result): crc32c(b, crc32c(a)) === crc32c(a + b). */
export const crc32c: (data: Uint8Array, initial?: number) => number = native ?? ((data, initial) => portable(data as Buffer, initial));

/** Which implementation crc32c is (for tests and the bench). */
export const crc32cImplementation: 'native-sse4.2' | 'portable' = native ? 'native-sse4.2' : 'portable';

export { portable as portableCrc32c };
