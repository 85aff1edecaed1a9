// The journal's contract, shared by the mirror layer (writer), the replicator (reader, consumer) and the
// CLI tools (inspect, replay-local). The implementation lives in journal.ts; this file holds only types.
//
// Words as lmdb-js uses them: an entry is *committed* when it is visible and ordered in LMDB; it is
// *flushed* when it is on stable storage. Sequence numbers start at 1, are gap-free and never reused.

/** What one journal entry records. Numeric codes are what is stored and shipped; keep them stable. */
export const EntryKind = {
  WRITE: 1, // data at offset (data present, crc = CRC32C(data))
  TRIM: 2, // discard range (no data)
  ZERO: 3, // range reads as zeroes (no data)
  FLUSH: 4, // a durability marker: everything before it was flushed on the primary (offset = length = 0)
} as const;
export type EntryKind = (typeof EntryKind)[keyof typeof EntryKind];

export function entryKindName(kind: number): string {
  for (const [name, value] of Object.entries(EntryKind)) if (value === kind) return name;
  return `UNKNOWN(${kind})`;
}

export interface JournalEntry {
  seq: number;
  kind: EntryKind;
  offset: number;
  length: number;
  /** CRC32C of `data` for WRITE; CRC32C of the 8+4 byte (offset,length) record for the other kinds. */
  crc: number;
  /** Milliseconds since the epoch when the entry was appended on the primary. */
  ts: number;
  /** WRITE only. May be a view into LMDB-owned memory valid until the next read: copy to keep it. */
  data?: Buffer;
}

export interface JournalStats {
  /** Last sequence number assigned (0 when nothing was ever written). */
  headSeq: number;
  /** Last sequence number such that it and everything before it is committed. */
  committedSeq: number;
  /** Oldest sequence number still stored (headSeq + 1 when empty). */
  tailSeq: number;
  /** Highest sequence number the image checkpoint and every registered consumer have (entries up to it may be pruned). */
  ackedSeq: number;
  /** Local image is known durable up to this sequence (recovery re-applies entries after it). */
  checkpointSeq: number;
  entries: number;
  /** Payload + header bytes of the entries from tailSeq on. */
  bytes: number;
  /** Bytes on disk: `bytes` plus entries before the tail whose segment is not reclaimed yet (counted against the cap). */
  storedBytes: number;
  /** LMDB databases the entries are stored in (see SEGMENT_SHARE in journal.ts). */
  segments: number;
  /** Configured cap (--journal-max). */
  maxBytes: number;
  /** The cap in force: maxBytes, or less while the journal's filesystem has less room (JournalOptions.keepFree). */
  capBytes: number;
}

export interface ConsumerState {
  id: string;
  ackedSeq: number;
}
