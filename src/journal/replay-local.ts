// Rebuilds an image from a base image and the journal, entry by entry in seq order: the simplest proof that
// the journal is complete (`blockferry replay-local`).
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../device/file-device.js';
import { openLocked } from '../device/native.js';
import { applyEntry } from '../mirror/mirror-device.js';
import { BlockferryError } from '../util/errors.js';
import { Journal } from './journal.js';
import { EntryKind, entryKindName } from './types.js';

export interface ReplayLocalOptions {
  journal: string;
  /** Base image copied to `out` first; without it `out` starts as zeroes of `size` bytes. */
  base?: string;
  size?: number;
  out: string;
  /** Stop after this seq (default: the committed head). */
  until?: number;
}

export interface ReplayLocalResult {
  fromSeq: number;
  toSeq: number;
  entries: number;
  bytes: number;
}

export async function replayLocal(opts: ReplayLocalOptions): Promise<ReplayLocalResult> {
  if (!fs.existsSync(opts.journal)) throw new BlockferryError('ERR_USAGE', `journal ${opts.journal} does not exist`);
  if (opts.base === undefined && opts.size === undefined) throw new BlockferryError('ERR_USAGE', 'replay-local needs --base or --size');
  if (opts.base !== undefined && !fs.existsSync(opts.base)) throw new BlockferryError('ERR_USAGE', `base image ${opts.base} does not exist`);
  const journal = await Journal.open({ dir: opts.journal, readOnly: true });
  try {
    const st = journal.stats;
    // Also when every entry was pruned: replaying nothing would hand back the base (or zeroes) as if complete.
    if (st.tailSeq > 1) {
      throw new BlockferryError(
        'ERR_JOURNAL_PRUNED',
        `journal ${opts.journal} starts at seq ${st.tailSeq}: entries before it were pruned, so no base can be completed from it (serve --keep-journal keeps them)`,
      );
    }
    // Held until --out is replaced: a serve of it started meanwhile is refused (it would write the old file).
    const outLock = checkOut(opts);
    const until = Math.min(opts.until ?? st.committedSeq, st.committedSeq);
    const result: ReplayLocalResult = { fromSeq: st.tailSeq, toSeq: until, entries: 0, bytes: 0 };
    // Built beside --out and renamed over it once complete: a failed run (a wrong base, an entry past its end)
    // leaves whatever --out was.
    const partial = path.join(path.dirname(opts.out), `.${path.basename(opts.out)}.partial-${process.pid}`);
    // Interrupted (Ctrl-C, SIGTERM): the partial file goes too, then the process ends as the signal would.
    const onSignal = (signal: NodeJS.Signals) => {
      fs.rmSync(partial, { force: true });
      process.exit(128 + (signal === 'SIGINT' ? 2 : 15));
    };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      if (opts.base) fs.copyFileSync(opts.base, partial);
      const dev = await FileDevice.open({ path: partial, size: opts.base ? undefined : opts.size });
      try {
        let next = st.tailSeq;
        while (next <= until) {
          const batch = journal.read(next);
          if (batch.length === 0) break;
          for (const e of batch) {
            if (e.seq > until) break;
            // The journal's entries all lie within its image: one past the end means a base (or --size) that
            // is not that image's, and applying it would make an image of a third size.
            if (e.kind !== EntryKind.FLUSH && e.offset + e.length > dev.size) {
              throw new BlockferryError(
                'ERR_ENTRY_RANGE',
                `seq ${e.seq} (${entryKindName(e.kind)} of ${e.length} bytes at ${e.offset}) lies past the end of the ${dev.size}-byte ${opts.base ? `base ${opts.base}` : 'image (--size)'}: it is not the size of the image this journal was written for`,
              );
            }
            await applyEntry(dev, e);
            result.entries++;
            if (e.kind === EntryKind.WRITE) result.bytes += e.length;
            next = e.seq + 1;
          }
        }
        await dev.flush();
      } finally {
        await dev.close();
      }
      fs.renameSync(partial, opts.out);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      fs.rmSync(partial, { force: true });
      if (outLock !== undefined) fs.closeSync(outLock);
    }
    return result;
  } finally {
    await journal.close();
  }
}

/**
 * `--out` is replaced: not if it is the base itself (it would be deleted before being copied), nor an image a
 * blockferry process holds (a serve would go on writing the deleted file).
 */
function checkOut(opts: ReplayLocalOptions): number | undefined {
  const out = fs.statSync(opts.out, { throwIfNoEntry: false });
  if (!out) return undefined;
  const base = opts.base ? fs.statSync(opts.base, { throwIfNoEntry: false }) : undefined;
  if (base && base.dev === out.dev && base.ino === out.ino) {
    throw new BlockferryError('ERR_USAGE', `--out ${opts.out} is the base image ${opts.base}: replay-local writes a new file, give it another path`);
  }
  const busy = () => new BlockferryError('ERR_IMAGE_BUSY', `--out ${opts.out} is in use by another blockferry process (a serve of it?): give replay-local another path`);
  return openLocked(opts.out, 'r', busy);
}
