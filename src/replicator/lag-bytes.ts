// How many journal bytes a replica still has to receive, for status: exact, from the journal's cumulative
// entry sizes (Journal.bytesAfter), so a 1 Hz status page costs two key lookups.
import type { Journal } from '../journal/journal.js';

/** Stored bytes of entries (haveSeq, committedSeq]; null when the journal cannot be read there. */
export function lagBytes(journal: Journal, haveSeq: number): number | null {
  try {
    return journal.bytesAfter(haveSeq);
  } catch {
    return null;
  }
}
