// Hand-built NBD handshake frames for tests that speak the option phase byte by byte.

export const IHAVEOPT = Buffer.from('IHAVEOPT');

/** An option request: IHAVEOPT, option number, length, data. */
export function option(opt: number, data = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  IHAVEOPT.copy(h);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

/** The data of NBD_OPT_INFO / NBD_OPT_GO: the export name and no information requests. */
export function nameData(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(6 + n.length);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}
