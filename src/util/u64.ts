// 64-bit big-endian unsigned fields as JS numbers, shared by the NBD codec and the journal's stored format.

/** Writes a whole number below 2^53 as a u64. */
export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** Reads a u64 from the wire; values above 2^53 come back as Infinity (always out of range), never wrapped. */
export function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  return hi >= 0x200000 ? Infinity : hi * 2 ** 32 + lo;
}
