// Zeroing by writing, for devices that cannot zero a range natively: one bounded zero buffer, reused.
import type { BlockDevice } from './block-device.js';

/** Largest zero buffer written at once (bounded memory whatever the range). */
const ZERO_CHUNK = 1 * 2 ** 20;

export async function writeZeroBuffers(dev: Pick<BlockDevice, 'write'>, offset: number, length: number): Promise<void> {
  const zero = Buffer.alloc(Math.min(length, ZERO_CHUNK));
  for (let at = offset; at < offset + length; at += zero.length) {
    const n = Math.min(zero.length, offset + length - at);
    await dev.write(at, n === zero.length ? zero : zero.subarray(0, n));
  }
}
