// `blockferry journal inspect` and `blockferry replay-local`: look into a journal and rebuild from it.
import fs from 'node:fs';
import path from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { DataFiles } from '../../journal/data-files.js';
import { Journal, type JournalOpenedWith } from '../../journal/journal.js';
import { replayLocal } from '../../journal/replay-local.js';
import { entryKindName, type JournalEntry, type JournalStats, type ConsumerState } from '../../journal/types.js';
import { UsageError } from '../../util/errors.js';
import { formatBytes, parseSize } from '../../util/size.js';

export interface JournalInspection {
  /** maxBytes: the cap the last writer opened it with (--journal-max), when recorded. */
  stats: JournalStats;
  /** Whether LMDB writes through its write map (see README, The journal), as the last writer opened it. */
  writeMap: boolean;
  /** The options the last writer (serve) opened it with: null for a journal from before they were recorded. */
  openedWith: JournalOpenedWith | null;
  /** Disk space journal.mdb takes (its allocated blocks; the file's size is the map size, sparse). */
  fileBytes: number;
  /** Disk space the segments' data files take (WRITE data, with the default commit durability). */
  dataFileBytes: number;
  /** Disk space dropped segments' files kept for reuse take (spare-N.data; deleted when the disk runs short). */
  spareFileBytes: number;
  consumers: ConsumerState[];
  last: Array<Omit<JournalEntry, 'data'> & { kindName: string }>;
}

/** Disk space the files of `dir` that `pick` selects take. */
function diskBytes(dir: string, pick: (file: string) => boolean): number {
  return fs
    .readdirSync(dir)
    .filter(pick)
    .reduce((n, f) => n + fs.statSync(path.join(dir, f)).blocks * 512, 0);
}

export async function inspectJournal(dir: string, last = 10): Promise<JournalInspection> {
  if (!fs.existsSync(dir)) throw new UsageError(`journal ${dir} does not exist`);
  const j = await Journal.open({ dir, readOnly: true });
  try {
    const openedWith = j.openedWith ?? null;
    // Opened here with no options: the cap and the write map are the writer's, not this open's defaults.
    const stats = { ...j.stats, ...(openedWith ? { maxBytes: openedWith.maxBytes } : {}) };
    const from = Math.max(stats.tailSeq, stats.committedSeq - last + 1);
    const entries = last > 0 && stats.entries > 0 ? j.read(from, { maxEntries: last }) : [];
    return {
      stats,
      writeMap: openedWith?.writeMap ?? j.writeMap,
      openedWith,
      fileBytes: fs.statSync(path.join(dir, 'journal.mdb')).blocks * 512,
      dataFileBytes: diskBytes(dir, (f) => DataFiles.isDataFile(f) && !DataFiles.isSpare(f)),
      spareFileBytes: diskBytes(dir, (f) => DataFiles.isSpare(f)),
      consumers: j.consumers(),
      last: entries.map(({ data: _d, ...e }) => ({ ...e, kindName: entryKindName(e.kind) })),
    };
  } finally {
    await j.close();
  }
}

interface InspectArgs {
  journal: string;
  last: number;
  json: boolean;
}

const inspect: CommandModule<object, InspectArgs> = {
  command: 'inspect',
  describe: 'Show head/tail sequence, entry count, bytes and the last entries',
  builder: (y: Argv) =>
    y
      .option('journal', { type: 'string', demandOption: true, describe: 'Journal directory' })
      .option('last', { type: 'number', default: 10, describe: 'How many of the newest entries to list' })
      .check((a) => {
        if (!Number.isInteger(a.last) || (a.last as number) < 0) throw new UsageError(`--last ${String(a.last)}: a count of entries (0 or more)`);
        return true;
      })
      .option('json', { type: 'boolean', default: false, describe: 'Print JSON for scripts' }) as Argv<InspectArgs>,
  handler: async (args) => {
    const r = await inspectJournal(args.journal, args.last);
    if (args.json) {
      process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
      return;
    }
    const s = r.stats;
    const lines = [
      `journal     ${args.journal}`,
      `sequence    tail ${s.tailSeq}  head ${s.headSeq}  committed ${s.committedSeq}  checkpoint ${s.checkpointSeq}  acked ${s.ackedSeq}`,
      `entries     ${s.entries}  (${formatBytes(s.bytes)} of ${formatBytes(s.maxBytes)} cap${r.openedWith ? '' : ', the default: this journal does not record the one serve was given'})`,
      ...(r.openedWith ? [`opened with --journal-max ${formatBytes(r.openedWith.maxBytes)}, --durability ${r.openedWith.durability}${r.openedWith.writeMap ? ', --journal-write-map' : ''}${r.openedWith.keep ? ', --keep-journal' : ''} (by the last serve)`] : []),
      `stored      ${formatBytes(s.storedBytes)} in ${s.segments} segment${s.segments === 1 ? '' : 's'}${s.storedBytes > s.bytes ? ' (entries before the tail are reclaimed with their segment)' : ''}`,
      `file        journal.mdb ${formatBytes(r.fileBytes)} on disk, written ${r.writeMap ? 'through LMDB\'s write map (blocks allocated ahead)' : 'with writev'}; data files ${formatBytes(r.dataFileBytes)}, spares ${formatBytes(r.spareFileBytes)}`,
      `consumers   ${r.consumers.length === 0 ? '(none)' : r.consumers.map((c) => `${c.id} @${c.ackedSeq}`).join(', ')}`,
      '',
      `${'SEQ'.padStart(10)}  ${'KIND'.padEnd(5)}  ${'OFFSET'.padStart(14)}  ${'LENGTH'.padStart(12)}  CRC32C    TIME`,
      ...r.last.map(
        (e) =>
          `${String(e.seq).padStart(10)}  ${e.kindName.padEnd(5)}  ${String(e.offset).padStart(14)}  ${String(e.length).padStart(12)}  ${e.crc
            .toString(16)
            .padStart(8, '0')}  ${new Date(e.ts).toISOString()}`,
      ),
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
  },
};

export const command: CommandModule = {
  command: 'journal <command>',
  describe: 'Inspect a journal',
  builder: (y: Argv) => y.command(inspect as CommandModule).demandCommand(1),
  handler: () => undefined,
};

interface ReplayLocalArgs {
  journal: string;
  base?: string;
  size?: string;
  out: string;
  until?: number;
  json: boolean;
}

export const replayLocalCommand: CommandModule<object, ReplayLocalArgs> = {
  command: 'replay-local',
  describe: 'Rebuild an image from a base image and the journal',
  builder: (y: Argv) =>
    y
      .option('journal', { type: 'string', demandOption: true, describe: 'Journal directory' })
      .option('base', { type: 'string', describe: 'Image as of before the first journal entry' })
      .option('size', { type: 'string', describe: 'Start from zeroes of this size instead of --base' })
      .option('out', { type: 'string', demandOption: true, describe: 'Image to write (replaced)' })
      .option('until', { type: 'number', describe: 'Stop after this sequence number' })
      .option('json', { type: 'boolean', default: false })
      .example('$0 replay-local --journal disk.img.journal --base base.img --out rebuilt.img', 'rebuild, then compare with cmp') as Argv<ReplayLocalArgs>,
  handler: async (args) => {
    const r = await replayLocal({
      journal: args.journal,
      base: args.base,
      size: args.size === undefined ? undefined : parseSize(args.size, '--size'),
      out: args.out,
      until: args.until,
    });
    if (args.json) process.stdout.write(`${JSON.stringify(r)}\n`);
    else process.stdout.write(`applied ${r.entries} entries (seq ${r.fromSeq}..${r.toSeq}, ${formatBytes(r.bytes)} of writes) to ${args.out}\n`);
  },
};
