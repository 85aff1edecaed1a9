// One base error class for blockferry; each failure a subclass with a stable `code` (as undici and ws do),
// so callers and tests branch on `code`, never on message text. Messages name the thing and what to do.

export class BlockferryError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A journal entry failed its CRC32C check or could not be decoded. Never applied. */
export class JournalCorruptError extends BlockferryError {
  constructor(readonly seq: number, detail: string) {
    super('ERR_JOURNAL_CORRUPT', `journal entry seq ${seq} is corrupt: ${detail}; it was not applied`);
  }
}

/** A sequence number is missing where the order demands it. */
export class SequenceGapError extends BlockferryError {
  constructor(readonly expected: number, readonly got: number, where: string) {
    super('ERR_SEQUENCE_GAP', `${where}: expected sequence ${expected}, got ${got}`);
  }
}

/** Bad command-line or config input. The CLI prints the message and exits with status 2. */
export class UsageError extends BlockferryError {
  constructor(message: string) {
    super('ERR_USAGE', message);
  }
}
