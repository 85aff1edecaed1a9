// Parses human sizes and rates ("10G", "512MiB", "50MB/s") for flags and config. Binary units throughout:
// 1K = 1024, as dd, qemu-img and nbdkit read them; "B" and "iB" suffixes are accepted and mean the same.
import { UsageError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

export function parseSize(text: string | number, what = 'size'): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text) || text < 0) throw new UsageError(`${what}: ${text} is not a whole number of bytes`);
    return text;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`${what}: cannot read "${text}"; write a number with an optional unit, like 10G or 512M`);
  const value = Math.round(Number(m[1]) * UNITS[m[2].toUpperCase()]);
  if (!Number.isSafeInteger(value)) throw new UsageError(`${what}: "${text}" is too large`);
  return value;
}

/** "50MB/s" → bytes per second. */
export function parseRate(text: string | number, what = 'rate'): number {
  if (typeof text === 'number') return parseSize(text, what);
  return parseSize(text.replace(/\/s(ec)?$/i, ''), what);
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}
