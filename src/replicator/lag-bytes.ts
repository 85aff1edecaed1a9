// How many journal bytes a replica still has to receive, for status. The journal knows only its total stored
// bytes, so this counts the shorter side of the seq the replica has (what it has, or what it lacks) by
// reading entries, at most LAG_SCAN_BYTES per call; past that the rest is estimated from the entries read.
import { VALUE_HEADER } from '../journal/entry.js';
import type { Journal } from '../journal/journal.js';

/** Most entry bytes one status call reads (a few ms of CRC checking); a 1 Hz status page must stay cheap. */
const LAG_SCAN_BYTES = 8 * 2 ** 20;
const SCAN_BATCH_ENTRIES = 1024;

/** Stored bytes of entries (haveSeq, committedSeq]; null when the journal cannot be read there. */
export function lagBytes(journal: Journal, haveSeq: number): number | null {
  const s = journal.stats;
  const lacking = s.committedSeq - haveSeq;
  if (lacking <= 0) return 0;
  // The replica holds the retention point (or is behind it): everything stored is what it lacks.
  if (haveSeq < s.tailSeq) return s.bytes;
  const having = haveSeq - s.tailSeq + 1;
  try {
    if (having < lacking) return Math.max(0, s.bytes - storedBytes(journal, s.tailSeq, having));
    return storedBytes(journal, haveSeq + 1, lacking);
  } catch {
    return null;
  }
}

/** Bytes of `count` entries from `fromSeq`, exact up to LAG_SCAN_BYTES, extrapolated beyond. */
function storedBytes(journal: Journal, fromSeq: number, count: number): number {
  let bytes = 0;
  let n = 0;
  while (n < count && bytes < LAG_SCAN_BYTES) {
    const batch = journal.read(fromSeq + n, { maxEntries: Math.min(SCAN_BATCH_ENTRIES, count - n), maxBytes: LAG_SCAN_BYTES - bytes });
    if (batch.length === 0) break;
    for (const e of batch) bytes += VALUE_HEADER + (e.data?.length ?? 0);
    n += batch.length;
  }
  return n === 0 || n >= count ? bytes : Math.round((bytes * count) / n);
}
