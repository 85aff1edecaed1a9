// The LMDB write log: gap-free sequence numbers assigned synchronously (call order is journal order),
// group commit, retention by consumer acks and the image checkpoint, a size cap at which appends wait, and
// verified reads for recovery and replication.
//
// Group commit has two shapes. `commit` durability (the default) gathers every append made during one turn
// of the event loop and commits them in one synchronous LMDB transaction at the end of that turn (noSync:
// the OS cache holds them, so a SIGKILL loses nothing); flush() fsyncs. Committing on the loop thread
// costs a few microseconds per entry and no thread hand-off, which measured 3-4x faster than lmdb-js's
// asynchronous batches for 4 KiB writes at queue depth 32. For values of 64 KiB and up the asynchronous path
// (LMDB's copy done on its write thread, off the loop thread) lost too: fio 1 MiB journaled writes, five
// alternating pairs, serve's CPU per MiB 0.150-0.193 ticks synchronous against 0.187-0.247, and lower
// throughput in four pairs of five. `sync` durability commits the same way, each transaction synced before it
// returns (see openEnv), and keeps write data in LMDB (no data files).
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type { Database, RootDatabase } from 'lmdb';
import { openLmdb } from '../util/lmdb-open.js';
import { BlockferryError, JournalCorruptError } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/logger.js';
import { loadNative, openLocked } from '../device/native.js';
import { freeBytes } from '../util/free-space.js';
import { formatBytes } from '../util/size.js';
import { MapSpace } from './map-space.js';
import { FILE_REF_VALUE, VALUE_HEADER, decodeValue, encodeFileRef, encodeValue, entryCrc, fileRef, storedLength, valueCum, valueDataLength, verifyEntry } from './entry.js';
import { DataFiles, IOV_MAX } from './data-files.js';
import { EntryKind, type ConsumerState, type JournalEntry, type JournalStats } from './types.js';

/** Default cap on stored bytes. */
export const DEFAULT_MAX_BYTES = 8 * 2 ** 30;
/** LMDB map size: the cap plus a quarter and this headroom for B-tree pages and free-list growth (a larger map measured slower). */
const MAP_HEADROOM = 2 ** 30;
/** LMDB page size of new journals. */
const JOURNAL_PAGE_SIZE = 16 * 1024;
/** Pages a commit reads through the map besides the data (see commitBatch). */
const PAGES_READ_PER_COMMIT = 4;
/** Seqs only grow: MDB_APPEND skips the B-tree search and leaves full pages behind instead of half-full ones. */
const APPEND = { append: true };
/**
 * Entries are stored in segments: LMDB databases of consecutive seqs, the last one taking appends. Retention
 * moves a logical tail; a segment is then dropped whole once the tail has passed all of it. Deleting entries one
 * by one from the front of a B-tree makes LMDB rebalance on nearly every delete (it moves the neighbour's first
 * entry, 4 KiB of data, into the emptied leaf): measured from Node, appending 4 KiB entries and pruning them
 * cost 5.4 us per entry that way and 2.6 us with whole-database drops, and in serve the deletes were ~10% of its
 * CPU at 4 KiB writes. A new segment starts once the active one holds this share of the cap (within bounds).
 */
const SEGMENT_SHARE = 1 / 64;
const SEGMENT_MIN_BYTES = 2 ** 20;
const SEGMENT_MAX_BYTES = 64 * 2 ** 20;
/**
 * Bytes of dropped segments' data files kept for reuse (data-files.ts, Recycling): enough for what the journal
 * drops at once after a checkpoint (the mirror's CHECKPOINT_BYTES of changes, 256 MiB, and what was written while
 * that checkpoint's fsync ran: up to 1 GiB with 1 MiB writes), and at most a quarter of the journal's cap.
 */
const SPARE_BYTES = 2 ** 30;
/** Live segments stay below this (the cap divided by the segment size, plus two); LMDB needs a slot for each. */
const MAX_SEGMENTS = 256;
/** The first segment keeps the name of the single database earlier journals used. */
const FIRST_SEGMENT = 'entries';
/** Entries removed per synchronous prune transaction: small, so pruning never holds up requests for long (2000 measured p99 8 ms at 4 KiB, 256 3.5 ms). */
const PRUNE_BATCH = 256;
/**
 * ...and about this many stored bytes: deleting an entry maps its pages, and the mappings are only dropped
 * between transactions, so 256 entries of 1 MiB raised serve's peak RSS (VmHWM) from 162 to 321 MB.
 */
const PRUNE_BYTES = 16 * 2 ** 20;
/** Stored bytes trackChanges reads between turns of the event loop (see there). */
const TRACK_STEP_BYTES = 64 * 2 ** 20;
/** A file reference claiming more data than this is corrupt (no WRITE serve takes comes near it). */
const MAX_DATA_BYTES = 2 ** 30;
/** Default read batch limits. */
const READ_MAX_ENTRIES = 1024;
const READ_MAX_BYTES = 16 * 2 ** 20;
/**
 * Committed values kept in memory, so a replica that is keeping up is shipped its entries without reading them
 * back from LMDB (a B-tree walk, a copy and a CRC pass each). A little above the replicator's window of
 * unacknowledged bytes: a caught-up replica always reads within it. The values are copied into one ring buffer
 * at commit rather than kept as the appended Buffers: thousands of retained 4 KiB Buffers a second were
 * promoted to V8's old generation and collected by major GCs, which measured ~25% more CPU per 4 KiB write.
 * Filled only while a consumer (a replica) is registered: a journal nobody reads from memory keeps nothing.
 */
const RECENT_BYTES = 24 * 2 ** 20;
/** The buffer stored values are read into for readRecords (a batch of READ_MAX_BYTES and more). */
const READ_ARENA_BYTES = 8 * 2 ** 20;
/** Larger values are not copied into the ring (they would evict most of it): the window restarts after them. */
const RECENT_MAX_VALUE = RECENT_BYTES / 4;
/** How long reads may all come from behind the window before commits stop being copied into it. */
const RECENT_IDLE_MS = 100;
/**
 * After this many bytes appended or pruned, drop the process's mappings of the journal file. LMDB reads through
 * a shared mmap, so every page it reads stays counted in RSS until unmapped: appending reads the last leaf page
 * of each transaction, pruning walks the leaves, replicas' batches read entries (all three are counted). Without this a 10 GiB
 * replicated run showed ~1.3 GiB RSS of which 166 MiB was the process's own memory. LMDB maps about twice
 * what is counted (B-tree and free-list pages, the kernel's fault-around): with 16 MiB the mapped journal ran
 * up to 40 MiB under 4 KiB replicated writes and 42 MiB under 1 MiB ones; 8 MiB took the 1 MiB case to 34 MiB
 * and moved most samples under 16 MiB, at no cost measurable in fio (4 KiB journaled, alternating pairs
 * 55.7k/56.1k, 52.7k/48.2k, 53.3k/63.9k IOPS): unmapping no longer parses /proc/self/maps (see dropFileMappings).
 */
const UNMAP_AFTER_BYTES = 8 * 2 ** 20;

/**
 * Whether the journal stores through LMDB's write map unless told otherwise. The write map saves a copy of each
 * value (one memcpy into the mapped file, against a memcpy into LMDB's page buffers and their writev) and
 * measured ahead on the machines of 2026-12-03. On Linux 6.18 (2026-12-06) the mapped copy costs more than the
 * two: every page it stores into faults in (zero-filling a large folio of the blocks allocated ahead), and
 * keeping RSS bounded unmaps the journal every UNMAP_AFTER_BYTES, so the same pages fault in again.
 * fio against serve, alternating runs, write map against writev. On a new journal (the file still growing):
 * journaled 1 MiB writes 914/900 against 1056/997 MiB/s, replicated 1 MiB 579/528/661 against 642/583/672 MiB/s,
 * journaled 4 KiB 26.3/32.8/30.0k against 39.6/40.7/33.5k IOPS, replicated 4 KiB 20.3/16.5/20.2k against
 * 24.5/24.0/24.9k. After a 4 s warm-up of the same job: journaled 1 MiB 1175/1111 against 1329/1263 MiB/s;
 * replicated 1 MiB 623/657/670 against 630/631/511, journaled 4 KiB 39.6/48.0/47.1k against 42.7/45.3/46.1k,
 * replicated 4 KiB 21.8/25.1/28.7k against 23.4/24.6/29.2k (a wash). bench/replication.mjs --quick --memory:
 * 10 GiB replicated at 437 against 491 MiB/s, stalled 370 against 428 MiB/s; serve's peak anonymous memory
 * 148-156 against 174-183 MiB (LMDB's page buffers), peak RSS 230-235 against 238-247 MiB.
 */
const WRITE_MAP_DEFAULT = false;

/** Blocks allocated ahead of LMDB's last page (see MapSpace): a sixteenth of the cap, within bounds. */
function allocateAhead(maxBytes: number): number {
  return Math.min(64 * 2 ** 20, Math.max(4 * 2 ** 20, Math.floor(maxBytes / 16)));
}
/**
 * The least a full disk shrinks the cap to (JournalOptions.keepFree): a disk filled by others leaves the journal
 * room for a run of writes between checkpoints, not one entry per checkpoint; beyond that the free-space guard
 * in front of the journal refuses writes (ENOSPC).
 */
const DISK_CAP_FLOOR = 32 * 2 ** 20;
/** The least time between two calls for room because the disk is short (diskShort). */
const RELIEF_MS = 50;
/** How often appends waiting for room ask the holders again ('full'). */
const WAIT_RECALL_MS = 250;
/** Meta key of the options the last writer opened the journal with. */
const OPENED_WITH = 'openedWith';

/** The options a writer (serve) opened the journal with, recorded in it. */
export interface JournalOpenedWith {
  maxBytes: number;
  writeMap: boolean;
  durability: 'sync' | 'commit';
  keep: boolean;
}

/** Spare data files are given back while the journal's disk has less room than this many segments (lookAtDisk). */
const SPARE_ROOM_SEGMENTS = 4;
/** How often the free space of the journal's filesystem is looked at (with keepFree), besides while appends wait. */
const DISK_POLL_MS = 250;
/** Room reserved for a transaction that only prunes or drops (the free list grows by 8 bytes per freed page). */
const PRUNE_TXN_BYTES = 2 ** 20;

export interface JournalOptions {
  dir: string;
  maxBytes?: number;
  /** sync: `done` means on stable storage. commit: `done` means committed (ordered, visible); flush() syncs. */
  durability?: 'sync' | 'commit';
  /**
   * Keep entries after the image checkpoint and every consumer have them, until the cap needs room (for
   * replay-local and audits). Default: prune them at once, so LMDB reuses their pages instead of growing.
   */
  keep?: boolean;
  /**
   * Store through LMDB's write map, with disk blocks allocated ahead (commit durability only; see MapSpace).
   * Default off: LMDB then builds each commit's pages in memory and writes them with writev, which measured
   * faster on Linux 6.18 (see WRITE_MAP_DEFAULT).
   */
  writeMap?: boolean;
  /**
   * Hold DIR/serve.lock (flock, through the helper) while open: a second `serve` of the same journal is refused
   * with ERR_JOURNAL_BUSY before it touches anything. `journal inspect` opens without it.
   */
  lock?: boolean;
  /**
   * Only read (journal inspect, replay-local), which may run beside a live serve: LMDB is opened read-only and
   * no file is changed, not even on close (a read-write open deleted data files it took for orphans, among
   * them a new segment's file between its creation and the commit naming it, and wrote its own, soon stale,
   * head and tail into the journal on close). Appends and other changes throw.
   */
  readOnly?: boolean;
  /**
   * Bytes to leave free on the journal's filesystem. When the disk holds less than the cap, the journal counts
   * as full once only this much would be left (never below DISK_CAP_FLOOR): appends wait, and the 'full' event
   * lets a replica that holds the journal go onto its dirty bitmap, as at the cap. Without it (0), a journal on
   * a disk smaller than its cap grows until the disk is full. serve passes a little more than --min-free, so
   * the journal lets go before writes are refused for space.
   */
  keepFree?: number;
  /**
   * What the free-space guard in front keeps free (serve's --min-free, below keepFree): under DISK_CAP_FLOOR the
   * journal still leaves it room for a write like the one it takes, so that its own entries do not get writes
   * refused while a holder could let go.
   */
  guardReserve?: number;
  logger?: Logger;
}

/** The file Journal.open({ lock }) locks. */
const LOCK_FILE = 'serve.lock';

/** Written when pruning, so seqs and `cum` continue even when every entry has been pruned. */
interface LogMeta {
  head: number;
  cum: number;
  /** The retention tail: entries before it may still be stored (in a segment not yet dropped) but are gone. */
  tail?: number;
}

/** One LMDB database holding the entries from `first` up to the next segment's first (see SEGMENT_SHARE). */
interface Segment {
  name: string;
  first: number;
  db: Database<Buffer, number>;
}

interface Pending {
  seq: number;
  value: Buffer;
  resolve: () => void;
  reject: (err: Error) => void;
}

/** Where copyRecords puts values: a buffer of `len` bytes for the next, or undefined when full (never for the first). */
export interface RecordSink {
  place(len: number): Buffer | undefined;
}

export interface RecordsOptions {
  maxEntries?: number;
  maxBytes?: number;
  /** Read from LMDB (verified by CRC) even where the memory window has the entries. */
  stored?: boolean;
}

/** A change's kind and byte range, as a dirty-region tracker needs it. */
export type ChangeListener = (kind: EntryKind, offset: number, length: number) => void;

/** Entries per prune step for entries of about `perEntry` stored bytes (PRUNE_BATCH and PRUNE_BYTES). */
function pruneBatch(perEntry: number): number {
  return Math.max(1, Math.min(PRUNE_BATCH, Math.floor(PRUNE_BYTES / perEntry)));
}

function openSegment(root: RootDatabase, name: string): Database<Buffer, number> {
  return root.openDB<Buffer, number>({ name, encoding: 'binary' });
}

/**
 * A stored value through lmdb-js's getBinaryFast (no copy for small values: a reused buffer). Values over 16 MiB
 * come back as a plain Uint8Array, without Buffer's read methods the entry code uses: viewed as a Buffer here.
 * (A 16 MiB NBD write is one such entry where the data is stored inline: sync durability.)
 */
function fastBinary(db: Database<Buffer, number>, key: number): Buffer | undefined {
  const v = db.getBinaryFast(key) as Uint8Array | undefined;
  return v === undefined || Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
}

export class Journal extends EventEmitter {
  private head: number;
  private committed: number;
  private tail: number;
  private bytes: number;
  private cum: number;
  private cumCommitted: number;
  private checkpoint: number;
  /** The highest checkpoint whose record is committed to LMDB (not necessarily on stable storage yet). */
  private checkpointCommitted: number;
  /**
   * The highest checkpoint whose record is on stable storage. Retention goes by this one, not `checkpoint`: with
   * commit durability LMDB's commits are not synced, and pruning reuses the data files' space at once, so after a
   * power cut a journal whose last synced checkpoint is older would replay entries whose data was overwritten
   * (a TRIM or ZERO replayed exactly, then a WRITE after it mended from the zeroed image: a flushed write lost).
   */
  private checkpointDurable: number;
  /** The background sync that makes a committed checkpoint durable (commit durability), and whether another is due. */
  private checkpointSync: Promise<void> | undefined;
  private checkpointSyncAgain = false;
  private syncing: Promise<void> | undefined;
  private syncAgain = false;
  private readonly acks = new Map<string, number>();
  private readonly waiters: Array<{ after: number; resolve: () => void }> = [];
  private readonly waitingForSpace: Pending[] = [];
  private pruning = false;
  private isClosed = false;
  // commit durability: appends and meta updates waiting for the end-of-turn transaction.
  private batch: Pending[] = [];
  /** A new segment's file could not be made (see commitBatch): logged once until one is. */
  private segmentStuck = false;
  private readonly batchMeta = new Map<string, unknown>();
  private batchScheduled = false;
  private batchWaiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  /** Told of every change as it is appended (a replica tracking dirty regions while it is away). */
  private readonly changeListeners = new Set<ChangeListener>();
  /** Set when a commit failed: the journal then refuses appends (its seqs would have a gap). */
  private failure: BlockferryError | undefined;
  private readonly log: Logger;
  /** The LMDB file as /proc/self/maps names it, for dropping its mappings (undefined: cannot). */
  private mapPath: string | undefined;
  /** With a write map: the blocks allocated ahead of LMDB's pages; every write transaction reserves first. */
  private space: MapSpace | undefined;
  /** The journal's directory (the filesystem a failed commit may have filled). */
  private dir: string | undefined;
  /** JournalOptions.keepFree (0: the disk is not looked at). */
  private keepFree = 0;
  /** JournalOptions.guardReserve. */
  private guardReserve = 0;
  /** The journal filesystem's free bytes at the last look (see lookAtDisk); Infinity when not looked at. */
  private diskFree = Infinity;
  /** Bytes of entries admitted since that look: they take the disk's space as they are written. */
  private admittedSinceLook = 0;
  /** The data files' disk space at that look (commit durability; see hasRoom's floor). */
  private dataAtLook: number | undefined;
  private diskTimer: NodeJS.Timeout | undefined;
  /** A look at the disk failed (logged once). */
  private diskLookFailed = false;
  /** When relieve() last asked the holders for room. */
  private reliefAt = 0;
  /** While appends wait for room: asks the holders again every WAIT_RECALL_MS (see append). */
  private waitTimer: NodeJS.Timeout | undefined;
  /** Whether the last look found the disk holding the cap down (logged when that changes). */
  private diskLimited = false;
  /** The segments' data files (see data-files.ts): commit durability appends WRITE data there. */
  private data: DataFiles | undefined;
  private touchedSinceUnmap = 0;
  /** DIR/serve.lock, held open (and locked) while this journal is (JournalOptions.lock). */
  private lockFd: number | undefined;
  /** Opened to read only (JournalOptions.readOnly). */
  private readOnly = false;
  /**
   * commit durability: the values of the last committed seqs (see RECENT_BYTES), in `ring` at
   * recentOff/recentLen, oldest at recentAt; the window always ends at `committed`.
   */
  private ring: Buffer | undefined;
  /** What readStored copies stored values into (see there). */
  private readArena: Buffer | undefined;
  private ringPos = 0;
  private recentOff: number[] = [];
  private recentLen: number[] = [];
  private recentAt = 0;
  /** Since when reads have all come from far behind the window (undefined: a recent read was near the head). */
  private farReadsSince: number | undefined;
  /** In seq order; the last one takes appends. Never empty. */
  private readonly segments: Segment[];
  /** First seq stored: the tail, or earlier while entries before the tail wait for their segment to be dropped. */
  private physTail: number;
  /** Stored bytes of the entries before the tail (see physTail): they count against the cap until reclaimed. */
  private garbage = 0;
  /** Stored bytes committed into the active (last) segment. */
  private activeBytes = 0;
  private readonly segmentBytes: number;
  /**
   * commit durability reclaims lazily: whole segments once the tail has passed them, single entries only when an
   * append waits for room. sync durability (appends through lmdb-js's asynchronous batches) deletes every entry
   * the tail passes, in the background, as before, and keeps one segment.
   */
  private readonly lazy: boolean;

  private constructor(
    private readonly root: RootDatabase,
    segments: Segment[],
    private readonly meta: Database<unknown, string>,
    readonly maxBytes: number,
    private readonly durability: 'sync' | 'commit',
    private readonly keep: boolean,
    log: Logger,
  ) {
    super();
    this.log = log;
    this.segments = segments;
    this.lazy = durability === 'commit';
    this.segmentBytes = Math.max(
      Math.min(SEGMENT_MAX_BYTES, Math.max(SEGMENT_MIN_BYTES, Math.floor(maxBytes * SEGMENT_SHARE))),
      Math.ceil(maxBytes / (MAX_SEGMENTS / 2)),
    );
    const m = meta.get('log') as LogMeta | undefined;
    let last: { key: number; value: Buffer } | undefined;
    for (let i = segments.length - 1; i >= 0 && !last; i--) {
      for (const e of segments[i].db.getRange({ reverse: true, limit: 1 })) last = e as { key: number; value: Buffer };
    }
    let first: { key: number; value: Buffer } | undefined;
    for (let i = 0; i < segments.length && !first; i++) {
      for (const e of segments[i].db.getRange({ limit: 1 })) first = e as { key: number; value: Buffer };
    }
    this.head = Math.max(last?.key ?? 0, m?.head ?? 0);
    this.committed = this.head;
    this.physTail = first?.key ?? this.head + 1;
    this.tail = Math.max(this.physTail, Math.min(m?.tail ?? 0, this.head + 1));
    // A value too short to hold its header is corrupt: the sizes fall back to what can be known, and
    // checkTail names the entry; the journal still opens so that inspect can look at it.
    const cumOf = (v: Buffer) => (v.length >= VALUE_HEADER ? valueCum(v) : NaN);
    const lastCum = last ? cumOf(last.value) : NaN;
    this.cum = Number.isFinite(lastCum) ? lastCum : (m?.cum ?? 0);
    this.cumCommitted = this.cum;
    const firstCum = first ? cumOf(first.value) : NaN;
    const stored = last && first && Number.isFinite(lastCum) && Number.isFinite(firstCum) ? this.cum - firstCum + storedLength(first.value) : 0;
    if (this.tail > this.physTail) {
      this.garbage = this.tail > this.head ? stored : Math.max(0, this.spanBytes(this.physTail, this.tail - 1));
    }
    this.bytes = Math.max(0, stored - this.garbage);
    const active = segments[segments.length - 1];
    const activeFrom = Math.max(active.first, this.physTail);
    this.activeBytes = activeFrom <= this.head ? Math.max(0, this.spanBytes(activeFrom, this.head)) : 0;
    this.checkpoint = (meta.get('checkpoint') as number | undefined) ?? 0;
    this.checkpointCommitted = this.checkpointDurable = this.checkpoint;
    for (const { key, value } of meta.getRange({ start: 'consumer:', end: 'consumer;' })) {
      this.acks.set(String(key).slice('consumer:'.length), value as number);
    }
  }

  static async open(opts: JournalOptions): Promise<Journal> {
    if (!opts.readOnly) fs.mkdirSync(opts.dir, { recursive: true, mode: 0o700 });
    const lockFd = opts.lock ? lockDir(opts.dir) : undefined;
    try {
      const j = await Journal.openLocked(opts);
      j.lockFd = lockFd;
      return j;
    } catch (err) {
      if (lockFd !== undefined) fs.closeSync(lockFd);
      throw err;
    }
  }

  private static async openLocked(opts: JournalOptions): Promise<Journal> {
    const maxBytes = opts.maxBytes ?? DEFAULT_MAX_BYTES;
    const durability = opts.durability ?? 'commit';
    // A write map only when asked for, where blocks can be allocated ahead of it, and for commit durability
    // (sync durability commits on lmdb-js's writer thread, where no allocation can come first).
    const allocate = durability === 'commit' && !opts.readOnly && (opts.writeMap ?? WRITE_MAP_DEFAULT) ? MapSpace.allocator() : undefined;
    let root = openEnv(opts.dir, maxBytes, durability, allocate !== undefined, opts.readOnly ?? false, opts.lock === true);
    let space: MapSpace | undefined;
    if (allocate) {
      const env = (root as unknown as { env: { stat(): { pageSize: number }; info(): { lastPageNumber: number } } }).env;
      try {
        space = MapSpace.open(allocate, path.join(opts.dir, 'journal.mdb'), env.stat().pageSize, allocateAhead(maxBytes), () => env.info().lastPageNumber);
      } catch (err) {
        // The filesystem cannot allocate (no fallocate there, or no room): open without the write map (on a full
        // disk appends then fail as writes).
        (opts.logger ?? silentLogger).warn({ err }, 'journal: cannot allocate space ahead; opening without a write map');
        await root.close();
        root = openEnv(opts.dir, maxBytes, durability, false, false, opts.lock === true);
      }
    }
    const meta = root.openDB<unknown, string>({ name: 'meta' });
    const listed = (meta.get('segments') as Array<[string, number]> | undefined) ?? [[FIRST_SEGMENT, 0]];
    const segments = listed.map(([name, first]) => ({ name, first, db: openSegment(root, name) }));
    const j = new Journal(root, segments, meta, maxBytes, durability, opts.keep ?? false, (opts.logger ?? silentLogger).child({ component: 'journal' }));
    j.space = space;
    j.dir = opts.dir;
    j.readOnly = opts.readOnly ?? false;
    if (j.readOnly) j.failure = new BlockferryError('ERR_JOURNAL_READ_ONLY', `journal ${opts.dir} is open read-only`);
    j.data = new DataFiles(opts.dir, Math.min(SPARE_BYTES, Math.floor(maxBytes / 4)), j.readOnly);
    if (!j.readOnly) {
      j.data.removeOrphans(segments.map((g) => g.name));
      if (durability === 'commit') j.data.openActive(segments[segments.length - 1].name);
    }
    j.checkTail();
    if (!j.readOnly && (opts.keepFree ?? 0) > 0) {
      j.keepFree = opts.keepFree!;
      j.guardReserve = opts.guardReserve ?? 0;
      j.lookAtDisk();
      j.diskTimer = setInterval(() => j.lookAtDisk(), DISK_POLL_MS);
      j.diskTimer.unref();
    }
    if (loadNative()) j.mapPath = fs.realpathSync(path.join(opts.dir, 'journal.mdb'));
    if (!j.readOnly) {
      // For `journal inspect`, which opens it with none of the writer's options. With the first commit (an
      // append's, or close's), not one of its own here: on a full disk that would fail the journal at open.
      const openedWith: JournalOpenedWith = { maxBytes, writeMap: j.writeMap, durability, keep: opts.keep ?? false };
      const was = j.meta.get(OPENED_WITH) as JournalOpenedWith | undefined;
      if (JSON.stringify(was) !== JSON.stringify(openedWith)) j.batchMeta.set(OPENED_WITH, openedWith);
    }
    return j;
  }

  /** The options the last writer opened this journal with (see JournalOpenedWith), if recorded. */
  get openedWith(): JournalOpenedWith | undefined {
    return this.meta.get(OPENED_WITH) as JournalOpenedWith | undefined;
  }

  /**
   * Verifies the last few entries on open so a corrupt tail is named at once in the log. The journal still
   * opens (inspect must work on it); every read of that entry throws.
   */
  private checkTail(): void {
    const from = Math.max(this.tail, this.head - 7);
    try {
      if (from <= this.head) this.read(from, { maxEntries: 8 });
    } catch (err) {
      this.log.error({ err }, 'the journal has a corrupt entry near its head');
    }
  }

  /** Whether LMDB stores through a write map (with blocks allocated ahead; see MapSpace). */
  get writeMap(): boolean {
    return this.space !== undefined;
  }

  /** Whether appends are waiting for room (the journal is at its cap). */
  get appendsWaiting(): boolean {
    return this.waitingForSpace.length > 0;
  }

  /** Deletes the data files kept for reuse (the disk is short of space); returns the bytes they held. */
  releaseSpares(): number {
    return this.data?.releaseSpares() ?? 0;
  }

  /**
   * The disk is short (the free-space guard is refusing writes): gives back the spare files, and if entries are
   * held past the checkpoint (an absent replica's, kept until its bitmap is saved again) asks the holders to let
   * go, as when full. Returns the bytes freed at once (the spares'); what the holders let go of follows.
   */
  relieve(): number {
    // Called from the guard in a write's path: a failing filesystem (EROFS deleting a spare) must not throw there.
    try {
      const freed = this.releaseSpares();
      this.diskShort();
      return freed;
    } catch (err) {
      this.log.warn({ err }, 'giving space back to a short disk failed');
      return 0;
    }
  }

  /**
   * The disk is down to keepFree (or the guard is refusing writes): if entries are held past the checkpoint,
   * asks the holders to let go, as when full. Under the floor the journal goes on whatever the disk says, but
   * the disk gets space back only a whole segment's file at a time: a few entries an absent replica still held
   * kept a 64 MiB file there while the guard refused every write (found by a review helper). At most once per
   * RELIEF_MS: appends and refused writes call this as they come.
   */
  private diskShort(): void {
    const now = Date.now();
    if (now - this.reliefAt < RELIEF_MS) return;
    this.reliefAt = now;
    this.lookAtDisk();
    if (this.doneWith() < this.committed) this.callForRoom();
  }

  /** Tells the holders (replicas, the checkpoint) the journal needs room ('full'), then prunes what they let go. */
  private callForRoom(): void {
    // A listener's error must not reach an append's caller, who would take the write for refused while it is
    // still committed later (found with a 4 PiB volume, whose dirty bitmap could not be allocated in the
    // replicator's listener).
    try {
      this.emit('full', this.stats);
    } catch (err) {
      this.log.error({ err }, "a listener of the journal's full event failed; the append waits for room as it would");
    }
    this.prune();
  }

  /** The last committed seq (what stats.committedSeq says, without building the rest). */
  get committedSeq(): number {
    return this.committed;
  }

  /** Stored bytes appended through the last committed seq, ever (its entry's cumulative-size field). */
  get committedCum(): number {
    return this.cumCommitted;
  }

  get stats(): JournalStats {
    return {
      headSeq: this.head,
      committedSeq: this.committed,
      tailSeq: this.tail,
      ackedSeq: this.doneWith(),
      checkpointSeq: this.checkpoint,
      entries: this.head >= this.tail ? this.head - this.tail + 1 : 0,
      bytes: this.bytes,
      storedBytes: this.bytes + this.garbage,
      segments: this.segments.length,
      maxBytes: this.maxBytes,
      capBytes: this.capBytes,
    };
  }

  /** The cap in force: maxBytes, or less when the journal's filesystem has less room (JournalOptions.keepFree). */
  get capBytes(): number {
    const room = this.bytes + this.garbage + this.diskFree - this.admittedSinceLook - this.keepFree;
    return Math.min(this.maxBytes, Math.max(DISK_CAP_FLOOR, room));
  }

  /**
   * Looks at the free space of the journal's filesystem, which appends may take down to keepFree (hasRoom);
   * between looks, the entries admitted count against it. The disk, not the journal's count of what it stores:
   * a pruned entry's data stays on disk until its segment's file goes (found by this change's test, where
   * counting stored bytes let the journal run 15 MiB past its room and writes were refused for space).
   * While the disk is down to a few segments' room (SPARE_ROOM_SEGMENTS), no spare files are kept (see
   * data-files.ts): a spare is space the journal let go of that the disk does not get back, and only a new
   * segment reuses one while the active segment's file grows.
   */
  private lookAtDisk(): void {
    // Runs from appends (after their seq is taken), timers and the guard: a failing filesystem must not throw
    // out of it (a write would be answered with an error it was not refused for, or a timer end the process).
    try {
      this.lookAtDiskNow();
    } catch (err) {
      if (!this.diskLookFailed) this.log.warn({ err }, "looking at the journal's disk failed; keeping the last figures");
      this.diskLookFailed = true;
    }
  }

  private lookAtDiskNow(): void {
    if (this.keepFree <= 0 || !this.dir || this.isClosed) return;
    let free = freeBytes(this.dir);
    if (free === undefined) return; // the directory gone for a moment: keep the last figure
    const limited = this.bytes + this.garbage + free + (this.data?.spareBytesHeld ?? 0) - this.keepFree < this.maxBytes;
    if (this.data) {
      const short = free - this.keepFree < SPARE_ROOM_SEGMENTS * this.segmentBytes;
      this.data.keepSpares = !short;
      if (short && this.data.spareBytesHeld > 0) {
        this.data.releaseSpares();
        free = freeBytes(this.dir) ?? free;
      }
    }
    this.diskFree = free;
    // Entries admitted but not written yet (this turn's batch) take their space after this look: still counted.
    // (Forgetting them here, with a look from an append, let 16 MiB entries take the disk down to 7.8 MiB free.)
    let pending = 0;
    for (const p of this.batch) pending += p.value.length;
    this.admittedSinceLook = pending;
    this.dataAtLook = this.data && this.durability === 'commit' ? this.data.footprint() : undefined;
    if (limited !== this.diskLimited) {
      this.diskLimited = limited;
      if (limited) {
        this.log.warn(
          { freeBytes: free, capBytes: this.capBytes, maxBytes: this.maxBytes },
          `the journal's filesystem has room for less than the journal's cap: it counts as full at ${formatBytes(this.capBytes)} (a replica holding it then goes onto its dirty bitmap)`,
        );
      } else {
        this.log.info({ freeBytes: free, maxBytes: this.maxBytes }, "the journal's filesystem has room for the whole cap again");
      }
    }
  }

  append(kind: EntryKind, offset: number, length: number, data?: Buffer): { seq: number; done: Promise<void> } {
    if (this.isClosed) throw new BlockferryError('ESHUTDOWN', 'the journal is closed');
    if (this.failure) throw this.failure;
    const seq = ++this.head;
    if (this.changeListeners.size > 0) for (const fn of this.changeListeners) fn(kind, offset, length);
    const value = encodeValue(kind, offset, length, entryCrc(kind, offset, length, data), Date.now(), data, this.cum);
    this.cum = valueCum(value);
    let resolve!: () => void;
    let reject!: (err: Error) => void;
    const done = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const p: Pending = { seq, value, resolve, reject };
    if (this.waitingForSpace.length > 0 || !this.hasRoom(p)) {
      // Order is kept: once one append waits, every later one queues behind it.
      this.waitingForSpace.push(p);
      this.callForRoom();
      // Asked again while appends wait: a holder may have let go of only part (a replica's bitmap saved through
      // the seq committed then), and with the last writes of a burst all waiting no append would ask again
      // (found by a review helper: three 16 MiB writes waited for good behind an absent replica).
      if (!this.waitTimer) {
        this.waitTimer = setInterval(() => {
          if (this.waitingForSpace.length === 0 || this.isClosed) {
            clearInterval(this.waitTimer);
            this.waitTimer = undefined;
          } else this.callForRoom();
        }, WAIT_RECALL_MS);
        this.waitTimer.unref();
      }
    } else {
      this.bytes += value.length;
      this.admittedSinceLook += value.length;
      this.enqueue(p);
      // Taken under the floor though the disk is down to keepFree: ask the holders to let go now, not at the
      // next look, before the free-space guard in front refuses writes (keepFree is above its reserve).
      if (this.diskFree - this.admittedSinceLook < this.keepFree) this.diskShort();
    }
    return { seq, done };
  }

  /** Called in seq order: directly from append, or from admitWaiting once there is room. */
  private enqueue(p: Pending): void {
    this.batch.push(p);
    this.scheduleBatch();
  }

  private scheduleBatch(): void {
    if (this.batchScheduled) return;
    this.batchScheduled = true;
    // setImmediate, not nextTick: every socket read of this loop turn joins the same transaction.
    setImmediate(this.commitBatch);
  }

  /**
   * One synchronous transaction for everything appended during this loop turn (group commit). With sync
   * durability LMDB syncs it before transactionSync returns, so every append it resolves is on stable storage.
   */
  private readonly commitBatch = (): void => {
    this.batchScheduled = false;
    const batch = this.batch;
    this.batch = [];
    const metaWrites = [...this.batchMeta];
    this.batchMeta.clear();
    const waiters = this.batchWaiters;
    this.batchWaiters = [];
    let rotated: Segment | undefined;
    let bytes = 0;
    for (const p of batch) bytes += p.value.length;
    // What LMDB stores of each entry: its value, or with data in the data file, a reference (see data-files.ts).
    let stored: Buffer[] = batch.map((p) => p.value);
    let lmdbBytes = bytes;
    try {
      if (this.failure) throw this.failure;
      const active = this.segments[this.segments.length - 1];
      if (this.lazy && batch.length > 0 && this.activeBytes > 0 && this.activeBytes + bytes > this.segmentBytes && this.segments.length < MAX_SEGMENTS - 2) {
        // A new segment; it, its first entries and the list naming it commit together. It starts before the
        // active one would outgrow segmentBytes, so a recycled file (data-files.ts) is reused with no fresh pages.
        rotated = { name: this.freeSegmentName(), first: batch[0].seq, db: undefined as unknown as Database<Buffer, number> };
        try {
          this.data?.create(rotated.name);
        } catch (err) {
          // Its file could not be made (no descriptor left, say): the active segment takes this batch too, and
          // the next one tries again. Failing the commit would stop the journal until a restart.
          if (!this.segmentStuck) this.log.warn({ err }, 'could not start a new journal segment; the current one goes on growing until it can');
          this.segmentStuck = true;
          rotated = undefined;
        }
      }
      if (this.lazy && this.data) ({ stored, lmdbBytes } = this.writeData((rotated ?? active).name, batch));
      // Through the write map a commit maps the pages it writes (the mapped journal peaked at 41 MiB
      // journal-only and 64 MiB replicated with 1 MiB writes when only the total after was checked). With writev
      // it maps none itself, but the kernel's fault-around maps the freshly written pages next to any it reads:
      // not counting commits let 82 MiB of journal stay mapped after 1 GiB written with the replica away, and
      // serve's peak RSS in bench/replication.mjs --memory reach 550 MiB. So both count them.
      this.beforeTouching(lmdbBytes);
      this.space?.reserve(this.space.boundFor(batch.length + metaWrites.length, lmdbBytes));
      this.root.transactionSync(() => {
        let seg = active;
        if (rotated) {
          seg = rotated;
          seg.db = openSegment(this.root, seg.name);
          this.meta.putSync('segments', [...this.segments, seg].map((g) => [g.name, g.first]));
        }
        for (let i = 0; i < batch.length; i++) seg.db.putSync(batch[i].seq, stored[i], APPEND);
        for (const [key, value] of metaWrites) {
          if (value === undefined) this.meta.removeSync(key);
          else this.meta.putSync(key, value);
        }
      });
    } catch (err) {
      const failure = this.fail(batch[0]?.seq, err as Error, bytes);
      for (const p of batch) p.reject(failure);
      for (const w of waiters) w.reject(failure);
      return;
    }
    if (rotated) {
      this.segments.push(rotated);
      this.activeBytes = 0;
      if (this.segmentStuck) this.log.info('a new journal segment was started again');
      this.segmentStuck = false;
    }
    if (batch.length > 0) {
      this.committed = batch[batch.length - 1].seq;
      this.cumCommitted = valueCum(batch[batch.length - 1].value);
      this.activeBytes += bytes;
      this.remember(batch);
      this.touched(lmdbBytes);
      this.wake();
    }
    // Every commit also reads B-tree pages through the map (the last leaf and the branches above it, the free
    // list, the main database's record of each touched database), and LMDB's copy-on-write puts them at new
    // places in the file each time, so they add up: counting only the data bytes, 4 KiB writes with a replica
    // peaked at 65 MB of mapped journal against the 32 MiB meant.
    this.touched(PAGES_READ_PER_COMMIT * JOURNAL_PAGE_SIZE);
    for (const p of batch) p.resolve();
    for (const w of waiters) w.resolve();
  };

  /**
   * Appends the data of a batch's WRITEs to `segment`'s data file in one pwritev, and returns what LMDB is to
   * store for each entry (a file reference for those, the value itself for entries without data) and its size.
   */
  private writeData(segment: string, batch: Pending[]): { stored: Buffer[]; lmdbBytes: number } {
    const data: Buffer[] = [];
    for (const p of batch) if (p.value.length > VALUE_HEADER) data.push(p.value.subarray(VALUE_HEADER));
    let pos = this.data!.append(segment, data);
    const refs = data.length > 0 ? Buffer.allocUnsafe(data.length * FILE_REF_VALUE) : undefined;
    const stored: Buffer[] = [];
    let lmdbBytes = 0;
    let k = 0;
    for (const p of batch) {
      let v = p.value;
      if (v.length > VALUE_HEADER) {
        v = encodeFileRef(v, pos, refs!.subarray(k * FILE_REF_VALUE, ++k * FILE_REF_VALUE));
        pos += p.value.length - VALUE_HEADER;
      }
      stored.push(v);
      lmdbBytes += v.length;
    }
    return { stored, lmdbBytes };
  }

  /** Copies a committed batch's values into the ring for readRecords, evicting the oldest they overwrite. */
  private remember(batch: Pending[]): void {
    if (this.acks.size === 0) {
      // Nobody reads from memory: keep nothing (and let the ring go).
      if (this.ring) this.forgetRecent();
      return;
    }
    if (this.farReadsSince !== undefined && performance.now() - this.farReadsSince > RECENT_IDLE_MS) {
      // Every reader is further behind than the window holds: they read from LMDB, and copying each commit
      // here would only be overwritten unread (with 1 MiB writes replicated, that copy was 7% of serve's CPU).
      // The window restarts with the first commit after a reader reaches the head.
      if (this.recentOff.length) {
        this.forgetRecent();
        this.releaseRing();
      }
      return;
    }
    const ring = (this.ring ??= Buffer.allocUnsafeSlow(RECENT_BYTES));
    // Batches commit in seq order, each right after the one before, so the window stays gap-free.
    for (const p of batch) {
      const n = p.value.length;
      if (n > RECENT_MAX_VALUE) {
        this.forgetRecent(); // the window restarts after this seq
        continue;
      }
      let at = this.ringPos;
      const wrap = at + n > RECENT_BYTES;
      if (wrap) at = 0;
      // Values lie in the ring in seq order, so the ones this overwrites are the oldest: on a wrap, first all
      // of those between the write position and the ring's end (skipped over), then those under [at, at+n).
      const off = this.recentOff;
      const len = this.recentLen;
      while (this.recentAt < off.length && ((wrap && off[this.recentAt] >= this.ringPos) || (off[this.recentAt] < at + n && off[this.recentAt] + len[this.recentAt] > at))) {
        this.recentAt++;
      }
      p.value.copy(ring, at);
      this.recentOff.push(at);
      this.recentLen.push(n);
      this.ringPos = at + n;
    }
    // Compact the index once its dropped head outweighs what it still holds.
    if (this.recentAt > 4096 && this.recentAt * 2 > this.recentOff.length) {
      this.recentOff = this.recentOff.slice(this.recentAt);
      this.recentLen = this.recentLen.slice(this.recentAt);
      this.recentAt = 0;
    }
  }

  /**
   * Gives the ring's pages back to the kernel while the window is stopped (nothing in it is read again before it
   * is written): RECENT_BYTES less in RSS exactly when replicas are far behind, which is also when serve's other
   * buffers peak (large batches read from LMDB, a resync's messages). They fault back in, zeroed, as the
   * restarted window fills. Without the native helper the ring stays resident.
   */
  private releaseRing(): void {
    if (!this.ring) return;
    try {
      loadNative()?.releasePages?.(this.ring);
    } catch (err) {
      this.log.warn({ err }, 'could not release the memory window; RSS keeps counting it');
    }
  }

  private forgetRecent(): void {
    this.recentOff = [];
    this.recentLen = [];
    this.recentAt = 0;
    this.ringPos = 0;
    if (this.acks.size === 0) this.ring = undefined;
  }

  /**
   * A commit failed (disk full, I/O error): seqs already handed out can no longer be stored in order, so the
   * journal stops taking appends; the mirror above stops too, and a restart recovers from what is committed.
   */
  private fail(seq: number | undefined, err: Error, bytes = 0): BlockferryError {
    if (!this.failure) {
      // ENOSPC named by the error (the write map's fallocate), or found by looking (a short writev is EIO).
      // The data file's append (data-files.ts) meets a full disk as ENOSPC too.
      const named = (err as NodeJS.ErrnoException).code === 'ENOSPC' || /ENOSPC/.test(err.message);
      const free = named ? (this.dir ? freeBytes(this.dir) : undefined) : this.fullDisk(bytes);
      const full = named || free !== undefined;
      const cause = full ? `${err.message}: the journal's filesystem is full${free === undefined ? '' : `, ${free} bytes free`} (ENOSPC)` : err.message;
      this.failure = new BlockferryError(
        full ? 'ENOSPC' : 'EIO',
        `the journal could not commit${seq === undefined ? '' : ` seq ${seq}`} (${cause}); it refuses further writes until restarted`,
      );
      this.log.error({ err, seq }, this.failure.message);
      for (const p of this.waitingForSpace.splice(0)) p.reject(this.failure);
    }
    return this.failure;
  }

  /**
   * The free bytes of the journal's filesystem when it is too full for a commit of `bytes` (LMDB reports a
   * short writev, the disk filled part-way, as EIO). Undefined otherwise.
   */
  private fullDisk(bytes: number): number | undefined {
    if (!this.dir) return undefined;
    const free = freeBytes(this.dir);
    return free !== undefined && free < Math.max(bytes, 2 ** 20) ? free : undefined;
  }

  /** Why the journal refuses appends for good (a failed commit), if it does; not set for a read-only journal. */
  get failed(): BlockferryError | undefined {
    return this.readOnly ? undefined : this.failure;
  }

  /** Writes a meta key (undefined removes it) in order with the entries. */
  private putMeta(key: string, value: unknown): Promise<void> {
    this.batchMeta.set(key, value);
    this.scheduleBatch();
    return new Promise((resolve, reject) => this.batchWaiters.push({ resolve, reject }));
  }

  /** Whether append `p` fits under the cap now. */
  private hasRoom(p: Pending): boolean {
    // An entry larger than the whole cap is still taken into an empty journal (every entry before it pruned and
    // its storage given back), or nothing could ever pass. Empty before `p.seq`, not before the head: appends
    // queued behind it must not keep it out for good.
    if (p.seq - 1 < this.tail && this.physTail >= this.tail) return true;
    const stored = this.bytes + this.garbage + p.value.length;
    if (stored > this.maxBytes) return false;
    if (this.diskFree - this.admittedSinceLook - p.value.length >= this.keepFree) return true;
    // Short of the disk's room (keepFree): a journal taking under DISK_CAP_FLOOR of the disk goes on regardless,
    // or a disk others filled would let it take one entry per checkpoint; the free-space guard in front refuses
    // writes there. Measured on disk where the data files are (commit durability): the active one keeps the
    // data of pruned entries until it is rewound (and then cut, the disk being short), and counting stored bytes
    // let it fill the disk past the guard's reserve (found by a review helper).
    const used = this.dataAtLook === undefined ? stored : this.dataAtLook + this.admittedSinceLook + p.value.length;
    return used <= DISK_CAP_FLOOR && this.diskFree - this.admittedSinceLook - 2 * p.value.length >= this.guardReserve;
  }

  private wake(): void {
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      if (this.committed > this.waiters[i].after) this.waiters.splice(i, 1)[0].resolve();
    }
  }

  async flush(): Promise<void> {
    // Wait until everything assigned so far is committed, then until it is on stable storage.
    if (this.committed < this.head) await this.waitFor(this.head - 1);
    if (this.durability === 'sync') await this.root.flushed;
    else await this.syncEnv();
  }

  /** One fsync of the environment at a time; callers arriving meanwhile share the next one. */
  private async syncEnv(): Promise<void> {
    if (this.syncing) {
      this.syncAgain = true;
      while (this.syncing) await this.syncing;
      if (!this.syncAgain) return;
    }
    this.syncAgain = false;
    this.syncing = (async () => {
      // Data before the headers that refer to it (data-files.ts).
      await this.data?.sync();
      const checkpoint = this.checkpointCommitted;
      await this.syncRoot();
      this.checkpointDurable = Math.max(this.checkpointDurable, checkpoint);
    })();
    try {
      await this.syncing;
    } finally {
      this.syncing = undefined;
    }
  }

  /** Verified entries from `fromSeq` (or the tail, if that is later) on, at least one if any is committed. */
  read(fromSeq: number, opts: { maxEntries?: number; maxBytes?: number } = {}): JournalEntry[] {
    const { first, values } = this.readRecords(fromSeq, opts);
    // Entries outlive the turn: values (views into the ring or the read arena) are copied out.
    return values.map((v, i) => decodeValue(first + i, Buffer.from(v)));
  }

  /**
   * The stored values (header and data, as entry.ts lays them out) of the committed entries from `fromSeq`
   * (or the tail) on. Recent ones come from memory, as they were committed; older ones are read from LMDB and
   * verified, so a corrupt entry raises JournalCorruptError naming its seq.
   * The values are views that stay valid only until the next commit (a later turn of the event loop) or the
   * next read of this journal: encode or copy them before reading again or awaiting anything.
   */
  readRecords(fromSeq: number, opts: RecordsOptions = {}): { first: number; values: Buffer[] } {
    const values: Buffer[] = [];
    const maxEntries = opts.maxEntries ?? READ_MAX_ENTRIES;
    const maxBytes = opts.maxBytes ?? READ_MAX_BYTES;
    const from = Math.max(fromSeq, this.tail);
    if (this.fromMemory(from, opts)) {
      const end = this.recentEnd(from, maxEntries, maxBytes);
      for (let i = this.recentIndex(from); i < end; i++) values.push(this.ring!.subarray(this.recentOff[i], this.recentOff[i] + this.recentLen[i]));
      return { first: from, values };
    }
    let used = 0; // of the arena
    const arenaSink: RecordSink = {
      place: (len) => {
        if (!this.readArena || this.readArena.length < used + len) {
          // Views already handed out keep the old arena alive; the new one serves the rest of this read and later ones.
          this.readArena = Buffer.allocUnsafeSlow(Math.max(READ_ARENA_BYTES, 2 * len));
          used = 0;
        }
        const value = this.readArena.subarray(used, used + len);
        used += len;
        values.push(value);
        return value;
      },
    };
    this.readStored(from, maxEntries, maxBytes, arenaSink, !opts.stored);
    return { first: from, values };
  }

  /**
   * What the replicator ships: the values readRecords would return, copied straight into `sink` (the message
   * being built) instead of into views, from the memory window or, verified, from LMDB. Returns the first seq
   * and how many values went in; fewer than asked when the sink had no room for the next.
   */
  copyRecords(fromSeq: number, sink: RecordSink, opts: RecordsOptions = {}): { first: number; count: number } {
    const maxEntries = opts.maxEntries ?? READ_MAX_ENTRIES;
    const maxBytes = opts.maxBytes ?? READ_MAX_BYTES;
    const from = Math.max(fromSeq, this.tail);
    if (this.fromMemory(from, opts)) {
      const start = this.recentIndex(from);
      const end = this.recentEnd(from, maxEntries, maxBytes);
      let i = start;
      for (; i < end; i++) {
        const dst = sink.place(this.recentLen[i]);
        if (!dst) break;
        this.ring!.copy(dst, 0, this.recentOff[i], this.recentOff[i] + this.recentLen[i]);
      }
      return { first: from, count: i - start };
    }
    return { first: from, count: this.readStored(from, maxEntries, maxBytes, sink, !opts.stored) };
  }

  /** Where seq `from` (held in the memory window) is in recentOff/recentLen. */
  private recentIndex(from: number): number {
    return this.recentOff.length - (this.committed - from + 1);
  }

  /** The end (exclusive index) of a read from `from` in the memory window: up to the limits, at least one value. */
  private recentEnd(from: number, maxEntries: number, maxBytes: number): number {
    const start = this.recentIndex(from);
    let bytes = 0;
    let i = start;
    while (i < this.recentOff.length) {
      bytes += this.recentLen[i++];
      if (i - start >= maxEntries || bytes >= maxBytes) break;
    }
    return i;
  }

  /**
   * Whether a read from `from` comes from the memory window. Also keeps the window worth its copy: a read
   * served from it, or one that reaches the last commit, is near the head; once only reads far behind the
   * window have come for RECENT_IDLE_MS, commits stop being copied into it (see remember).
   */
  private fromMemory(from: number, opts: RecordsOptions): boolean {
    const held = this.recentOff.length - this.recentAt;
    const hit = !opts.stored && !!this.ring && from > this.committed - held && from <= this.committed;
    if (hit) this.farReadsSince = undefined;
    return hit;
  }

  /**
   * Stored values, verified, copied into the buffers `sink` places them in: getBinaryFast reads each into
   * lmdb-js's own reused buffer (or maps it), and the value is copied from there before the next get
   * overwrites it. (getRange would hand out every value in a new, zero-filled buffer: per 1 MiB entry a
   * memset, a copy and an ArrayBuffer, and a full GC every ~64 MiB of them; see util/buffer-pool.)
   * `reader`: a reader's own read (not a forced re-read), which tells whether it is near the head.
   */
  private readStored(from: number, maxEntries: number, maxBytes: number, sink: RecordSink, reader: boolean): number {
    let count = 0;
    let total = 0;
    let expect = from;
    // Placed values, checked once their data is read. The data of consecutive WRITEs lies back to back in their
    // segment's data file: each such run is read with one preadv into the values' data parts (a pread per
    // entry made far reads of 4 KiB entries cost serve a syscall each).
    const placed: Array<{ seq: number; value: Buffer; short?: JournalCorruptError }> = [];
    let run: { name: string; start: number; end: number; bufs: Buffer[]; placed: number[] } | undefined;
    const readRun = (): void => {
      if (!run) return;
      const got = this.data!.readv(run.name, run.start, run.bufs);
      if (got < run.end - run.start) {
        // The file ends inside the run: the first entry it cuts short is reported (after those before it are checked).
        let at = run.start;
        for (let i = 0; i < run.bufs.length; i++) {
          const len = run.bufs[i].length;
          if (at + len > run.start + got) {
            const p = placed[run.placed[i]];
            const has = Math.max(0, run.start + got - at);
            p.short = new JournalCorruptError(p.seq, `its data file ${this.data!.file(run.name)} holds ${has} of its ${len} bytes at ${at}`);
            break;
          }
          at += len;
        }
      }
      run = undefined;
    };
    try {
      for (const { key, db, name } of this.storedKeys(expect, this.committed)) {
        const seq = key;
        const fast = seq === expect ? fastBinary(db, seq) : undefined;
        if (!fast) throw new JournalCorruptError(expect, `missing from the journal (next stored entry is ${seq})`);
        // lmdb-js's reused buffer is longer than the value: its `length` property says how much is the value.
        const stored = fast.length;
        const ref = fileRef(fast);
        const dataLen = ref === undefined ? 0 : valueDataLength(fast);
        if (dataLen > MAX_DATA_BYTES) throw new JournalCorruptError(seq, `stored header claims ${dataLen} bytes of data`);
        const len = ref === undefined ? stored : VALUE_HEADER + dataLen;
        const value = sink.place(len);
        if (!value) break;
        if (ref === undefined) {
          value.set(fast.subarray(0, len));
        } else {
          value.set(fast.subarray(0, VALUE_HEADER));
          value[1] = 0; // handed out with the data inline (entry.ts)
          if (run && (run.name !== name || run.end !== ref || run.bufs.length >= IOV_MAX)) readRun();
          run ??= { name, start: ref, end: ref, bufs: [], placed: [] };
          run.bufs.push(value.subarray(VALUE_HEADER, len));
          run.placed.push(placed.length); // entries without data (TRIM, FLUSH) may sit between a run's
          run.end += dataLen;
        }
        placed.push({ seq, value });
        count++;
        total += len;
        expect++;
        // Counted as it goes: a 16 MiB batch is unmapped midway rather than after, on top of what was mapped.
        this.touched(stored);
        if (count >= maxEntries || total >= maxBytes) break;
      }
      readRun();
      for (const p of placed) {
        if (p.short) throw p.short;
        verifyEntry(decodeValue(p.seq, p.value));
      }
    } catch (err) {
      this.emit('corrupt', err);
      throw err;
    }
    if (reader) {
      if (expect > this.committed) this.farReadsSince = undefined;
      else this.farReadsSince ??= performance.now();
    }
    return count;
  }

  /**
   * Reports every change from `fromSeq` on: those stored, those still waiting for space, and, through
   * `listener` (which stays installed until removeChangeListener), every later one. Used when a replica stops
   * holding the journal and switches to a dirty-region bitmap.
   *
   * The stored entries are read in steps of TRACK_STEP_BYTES with a turn of the event loop between them, and
   * their pages are unmapped as they go (touched): this runs when the journal is full, over up to its whole
   * cap. Read in one synchronous pass, 8 GiB of stored entries kept serve's loop busy for that long and left
   * all 8 GiB mapped (`bench/replication.mjs --memory`, stalled replica: serve's peak RSS 8540 MiB).
   * `onStep(seq)` is called after each step: every change through `seq` has been reported by then, so a caller
   * holding the journal for these changes may let go of that much (and no more) while the walk goes on.
   */
  async trackChanges(fromSeq: number, listener: ChangeListener, onStep?: (throughSeq: number) => void): Promise<void> {
    this.changeListeners.add(listener);
    // Appends already admitted commit without needing room: wait for them, then read them back.
    const admitted = this.head - this.waitingForSpace.length;
    if (this.committed < admitted) await this.waitFor(admitted - 1);
    const from = Math.max(fromSeq, this.tail);
    const to = this.committed;
    // Those waiting now may be admitted, committed and leave the queue while the walk below yields: now.
    for (const p of this.waitingForSpace) {
      if (p.seq < from) continue;
      const e = decodeValue(p.seq, p.value);
      listener(e.kind, e.offset, e.length);
    }
    let next = from;
    while (next <= to && !this.isClosed) {
      let bytes = 0;
      let stepEnded = false;
      // The entries stay: this replica's ack holds them until its bitmap is saved (after this returns).
      for (const { key, db } of this.storedKeys(next, to)) {
        const value = fastBinary(db, key);
        if (!value) continue;
        const e = decodeValue(key, value);
        listener(e.kind, e.offset, e.length);
        this.touched(value.length);
        next = key + 1;
        bytes += storedLength(value);
        if (bytes >= TRACK_STEP_BYTES) {
          stepEnded = true;
          break;
        }
      }
      if (!stepEnded) break;
      // Everything through next - 1 has been reported (and every change after `to`, by the listener).
      onStep?.(next - 1);
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  removeChangeListener(listener: ChangeListener): void {
    this.changeListeners.delete(listener);
  }

  waitFor(afterSeq: number, signal?: AbortSignal): Promise<void> {
    if (this.committed > afterSeq || this.isClosed || signal?.aborted) return Promise.resolve();
    return new Promise((resolve) => {
      const w = { after: afterSeq, resolve };
      this.waiters.push(w);
      signal?.addEventListener('abort', () => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve();
      });
    });
  }

  // ---- retention -------------------------------------------------------------------------------

  registerConsumer(id: string, startSeq?: number): ConsumerState {
    let acked = this.acks.get(id);
    if (acked === undefined) {
      acked = startSeq !== undefined ? startSeq - 1 : this.tail - 1;
      this.acks.set(id, acked);
      void this.putMeta(`consumer:${id}`, acked).catch(() => undefined);
    }
    return { id, ackedSeq: acked };
  }

  /**
   * Makes consumer `id` hold the entries from `seq` on again, lower than its acknowledgement too (a replica that
   * came back behind the point its dirty bitmap let the journal go of), but never below what is still stored.
   * Returns its acknowledged seq.
   */
  holdFrom(id: string, seq: number): number {
    const acked = Math.max(Math.min(seq - 1, this.committed), this.tail - 1);
    if (this.acks.get(id) !== acked) {
      this.acks.set(id, acked);
      void this.putMeta(`consumer:${id}`, acked).catch(() => undefined);
    }
    this.prune();
    return acked;
  }

  ack(id: string, seq: number): void {
    const prev = this.acks.get(id);
    if (prev === undefined || seq <= prev) return;
    this.acks.set(id, Math.min(seq, this.committed));
    void this.putMeta(`consumer:${id}`, this.acks.get(id)).catch(() => undefined);
    this.prune();
  }

  removeConsumer(id: string): void {
    if (this.acks.delete(id)) void this.putMeta(`consumer:${id}`, undefined).catch(() => undefined);
    this.prune();
  }

  consumers(): ConsumerState[] {
    return [...this.acks].map(([id, ackedSeq]) => ({ id, ackedSeq }));
  }

  /**
   * Records that the image holds every entry through `seq` durably. Resolves once the record is on stable
   * storage too (retention goes by that), or with `durable: false` once it is committed: the mirror's FLUSH
   * does not wait for that sync (the flush made the entries durable already; only pruning waits for it).
   */
  async setCheckpoint(seq: number, opts: { durable?: boolean } = {}): Promise<void> {
    this.checkpoint = Math.max(this.checkpoint, seq);
    const value = this.checkpoint;
    await this.putMeta('checkpoint', value);
    this.checkpointCommitted = Math.max(this.checkpointCommitted, value);
    // Sync durability commits each transaction durably; commit durability needs a sync of LMDB.
    if (this.durability === 'sync') this.checkpointDurable = this.checkpointCommitted;
    else this.syncCheckpoint();
    this.prune();
    if (opts.durable === false) return;
    // Each background sync starts the next one it was asked for before it settles.
    while (this.checkpointDurable < value && this.checkpointSync) await this.checkpointSync;
  }

  /** Syncs LMDB in the background so the committed checkpoint becomes durable, then prunes up to it. */
  private syncCheckpoint(): void {
    if (this.checkpointSync) {
      this.checkpointSyncAgain = true;
      return;
    }
    if (this.isClosed || this.checkpointDurable >= this.checkpointCommitted) return;
    const target = this.checkpointCommitted;
    this.checkpointSync = this.syncRoot()
      .then(
        () => {
          this.checkpointDurable = Math.max(this.checkpointDurable, target);
        },
        (err: Error) => this.log.error({ err }, 'syncing the journal for a checkpoint failed'),
      )
      .finally(() => {
        this.checkpointSync = undefined;
        if (this.checkpointSyncAgain) {
          this.checkpointSyncAgain = false;
          this.syncCheckpoint();
        }
        this.prune();
      });
  }

  /** LMDB's fsync (its own commits only: not the data files). */
  private syncRoot(): Promise<void> {
    return new Promise<void>((resolve, reject) =>
      (this.root as unknown as { sync(cb: (err?: Error) => void): void }).sync((err) => (err ? reject(err) : resolve())),
    );
  }

  /**
   * The kind and range of a committed entry as stored, unverified (its data may be what is damaged): for
   * recovery deciding whether repair() can mend it. Undefined if the seq is not held.
   */
  storedHeader(seq: number): { kind: EntryKind; offset: number; length: number } | undefined {
    const header = this.headerBytes(seq);
    if (!header) return undefined;
    const e = decodeValue(seq, header);
    return { kind: e.kind, offset: e.offset, length: e.length };
  }

  /** The stored value header of a committed entry (a copy), or undefined if the seq is not held. */
  private headerBytes(seq: number): Buffer | undefined {
    if (seq < this.tail || seq > this.committed) return undefined;
    const v = this.segmentOf(seq).db.getBinary(seq);
    return v && v.length >= VALUE_HEADER ? v.subarray(0, VALUE_HEADER) : undefined;
  }

  /**
   * Recovery's mend for a WRITE whose data is lost or damaged. With commit durability a power cut can leave an
   * entry committed after the last FLUSH without its data on disk (data-files.ts); nothing replied for it was
   * promised durable, and the image holds some state of that range. The entry is rewritten in place (same seq,
   * kind, range, size and place in the order) with `data`, what the image holds there, stored inline with a
   * new CRC, and synced: base + journal rebuilds the image again. Every registered consumer is marked
   * (repairedFrom): its replica may hold the lost bytes, so it is compared by digests when it next connects.
   */
  async repair(seq: number, data: Buffer): Promise<void> {
    const header = this.headerBytes(seq);
    const h = header && decodeValue(seq, header);
    if (!h || h.kind !== EntryKind.WRITE || h.length !== data.length) {
      throw new JournalCorruptError(seq, `its header is not a WRITE of ${data.length} bytes this journal holds, so it cannot be repaired`);
    }
    const seg = this.segmentOf(seq);
    const value = Buffer.allocUnsafe(VALUE_HEADER + data.length);
    header!.copy(value);
    value[1] = 0;
    value.writeUInt32BE(entryCrc(EntryKind.WRITE, h.offset, h.length, data), 4);
    data.copy(value, VALUE_HEADER);
    this.root.transactionSync(() => {
      seg.db.putSync(seq, value);
      for (const id of this.acks.keys()) {
        const marked = this.meta.get(`repaired:${id}`) as number | undefined;
        this.meta.putSync(`repaired:${id}`, Math.min(marked ?? seq, seq));
      }
    });
    this.forgetRecent();
    if (this.durability === 'commit') await this.syncEnv();
    else await this.root.flushed;
    this.log.warn({ seq, offset: h.offset, length: h.length }, `journal seq ${seq} was repaired from the image`);
  }

  /** The lowest seq repaired (repair()) since consumer `id` last took note, if any. */
  repairedFrom(id: string): number | undefined {
    return this.meta.get(`repaired:${id}`) as number | undefined;
  }

  /** Consumer `id` has taken note of the repairs (its replica is compared, or will receive them). */
  async clearRepaired(id: string): Promise<void> {
    if (this.repairedFrom(id) !== undefined) await this.putMeta(`repaired:${id}`, undefined);
  }

  getMeta<T = unknown>(key: string): T | undefined {
    return this.meta.get(`user:${key}`) as T | undefined;
  }

  async setMeta(key: string, value: unknown): Promise<void> {
    await this.putMeta(`user:${key}`, value);
  }

  /**
   * Last seq that every holder is done with: the image checkpoint as durably recorded (recovery needs what
   * follows it) and each consumer's acknowledgement.
   */
  private doneWith(): number {
    let seq = this.checkpointDurable;
    for (const a of this.acks.values()) seq = Math.min(seq, a);
    return seq;
  }

  /** First seq to keep: after doneWith, or with `keep` everything until the cap needs room. */
  private retainFrom(): number {
    return this.keep && this.waitingForSpace.length === 0 ? this.tail : this.doneWith() + 1;
  }

  private prune(): void {
    if (this.pruning || this.isClosed) return;
    if (this.pruneBound() < this.tail && !this.reclaimable()) return this.admitWaiting();
    this.pruning = true;
    setImmediate(() => {
      try {
        // Taken now, not when scheduled: a hold may have been lowered meanwhile (holdFrom).
        const upTo = this.pruneBound();
        if (upTo >= this.tail) this.advanceTail(upTo);
        this.reclaim();
        // Appends waiting for room take it as soon as there is some, not once the whole backlog is pruned (a
        // step prunes at most PRUNE_BYTES while appends wait, so 8 GiB let go at once is 512 steps, one a turn).
        this.admitWaiting();
      } catch (err) {
        this.log.error({ err }, 'pruning the journal failed');
      } finally {
        this.pruning = false;
      }
      this.prune();
    });
  }

  /** The last seq retention lets go of now. */
  private pruneBound(): number {
    return Math.min(this.retainFrom() - 1, this.committed);
  }

  /** An append waits and the cap has no room for it. */
  private pressed(): boolean {
    return this.waitingForSpace.length > 0 && !this.hasRoom(this.waitingForSpace[0]);
  }

  /** reclaim() would give back some storage now (so prune makes progress whenever it runs for it). */
  private reclaimable(): boolean {
    if (this.segments.length > 1 && this.segments[1].first <= this.tail) return true;
    if (this.physTail >= this.tail) return false;
    if (!this.lazy || this.pressed()) return true;
    return this.segments.length === 1 && this.tail > this.committed;
  }

  /** Moves the retention tail to upTo + 1 (in batches while appends wait, so keep gives up only what is needed). */
  private advanceTail(upTo: number): void {
    let end = upTo;
    if (!this.lazy || this.waitingForSpace.length > 0) {
      // `bytes` counts the admitted entries only: those waiting for space are not stored yet.
      const stored = this.head - this.waitingForSpace.length - this.tail + 1;
      end = Math.min(upTo, this.tail + pruneBatch(stored > 0 && this.bytes > 0 ? this.bytes / stored : 1) - 1);
    }
    const freed = this.storedSpan(this.tail, end);
    this.tail = end + 1;
    this.bytes -= freed;
    this.garbage += freed;
    void this.putMeta('log', { head: this.committed, cum: this.cum, tail: this.tail } satisfies LogMeta).catch(() => undefined);
  }

  /** Writes the position (LogMeta) as of the last commit, inside the caller's transaction. */
  private putLogSync(): void {
    this.meta.putSync('log', { head: this.committed, cum: this.cumCommitted, tail: this.tail } satisfies LogMeta);
  }

  /** Gives back the storage of entries before the tail: whole segments, or single entries when needed. */
  private reclaim(): void {
    for (let drops = 0; drops < 16 && this.segments.length > 1 && this.segments[1].first <= this.tail; drops++) this.dropOldest();
    if (this.physTail >= this.tail) return;
    if (this.lazy && this.segments.length === 1 && this.tail > this.committed) {
      // Everything stored is past retention: empty the one segment (its pages are reused by the next appends).
      const seg = this.segments[0];
      this.space?.reserve(PRUNE_TXN_BYTES);
      // The position goes with it: with no entry left, it alone tells a reopen where seqs go on (advanceTail's
      // write of it waits for the next batch, and a kill before that batch would hand out used seqs again).
      this.root.transactionSync(() => {
        seg.db.clearSync();
        this.putLogSync();
      });
      // After the commit: a kill between the two leaves data no entry refers to, which the next appends follow.
      this.data?.rewind();
      this.physTail = this.tail;
      this.touched(this.garbage);
      this.garbage = 0;
      this.activeBytes = 0;
    } else if (!this.lazy || this.pressed()) {
      this.deleteGarbage();
    }
  }

  /** Drops the oldest segment, all of whose entries are before the tail, and the list entry naming it, together. */
  private dropOldest(): void {
    const [old, next] = this.segments;
    const freed = this.physTail < next.first ? this.storedSpan(this.physTail, next.first - 1) : 0;
    this.space?.reserve(PRUNE_TXN_BYTES);
    // Dropping maps every leaf page of the segment (LMDB reads each leaf for the overflow runs it must free):
    // with 4 KiB entries about the segment's size, not known ahead. Unmap first, so it is not added on top.
    this.beforeTouching(Infinity);
    this.root.transactionSync(() => {
      old.db.dropSync();
      this.meta.putSync('segments', this.segments.slice(1).map((g) => [g.name, g.first]));
    });
    this.segments.shift();
    this.data?.remove(old.name);
    this.physTail = Math.max(this.physTail, next.first);
    this.garbage = Math.max(0, this.garbage - freed);
    // Dropping reads the leaf pages and each overflow run's first page through the map.
    this.touched(freed);
  }

  /** Deletes a batch of the entries before the tail from the oldest segment (how sync durability prunes). */
  private deleteGarbage(): void {
    const seg = this.segments[0];
    const limit = Math.min(this.tail - 1, this.segments.length > 1 ? this.segments[1].first - 1 : Infinity);
    if (limit < this.physTail) return;
    const end = Math.min(limit, this.physTail + pruneBatch(this.garbage > 0 ? this.garbage / (this.tail - this.physTail) : 1) - 1);
    let freed = this.spanBytes(this.physTail, end);
    this.space?.reserve(PRUNE_TXN_BYTES);
    this.root.transactionSync(() => {
      // The position in the same transaction, for when this removes the last entries stored (see reclaim).
      this.putLogSync();
      let sum = 0;
      for (const key of seg.db.getKeys({ start: this.physTail, end: end + 1 })) {
        if (freed < 0) {
          const v = fastBinary(seg.db, key as number);
          sum += v ? storedLength(v) : 0;
        }
        seg.db.removeSync(key as number);
      }
      if (freed < 0) freed = sum;
    });
    this.physTail = end + 1;
    this.garbage = Math.max(0, this.garbage - freed);
    this.touched(freed);
  }

  /** The segment that holds (or would hold) `seq`. */
  private segmentOf(seq: number): Segment {
    const segs = this.segments;
    for (let i = segs.length - 1; i > 0; i--) if (segs[i].first <= seq) return segs[i];
    return segs[0];
  }

  /** The part of [from, to] each segment holds, in seq order. */
  private *spans(from: number, to: number): Generator<{ db: Segment['db']; name: string; start: number; end: number }> {
    const segs = this.segments;
    for (let i = 0; i < segs.length; i++) {
      const start = Math.max(from, segs[i].first);
      const end = i + 1 < segs.length ? Math.min(to, segs[i + 1].first - 1) : to;
      if (end >= start) yield { db: segs[i].db, name: segs[i].name, start, end };
    }
  }

  /** Stored entries with seqs in [from, to], in seq order across segments. */
  private *range(from: number, to: number): Generator<{ key: number; value: Buffer }> {
    for (const { db, start, end } of this.spans(from, to)) {
      for (const e of db.getRange({ start, end: end + 1 })) yield e as { key: number; value: Buffer };
    }
  }

  /** The stored keys in [from, to] in seq order across segments, each with its segment's database. */
  private *storedKeys(from: number, to: number): Generator<{ key: number; db: Segment['db']; name: string }> {
    for (const { db, name, start, end } of this.spans(from, to)) {
      for (const key of db.getKeys({ start, end: end + 1 })) yield { key: key as number, db, name };
    }
  }

  /** The lowest numbered segment name not in use (names are reused: lmdb-js keeps a handle per name). */
  private freeSegmentName(): string {
    const used = new Set(this.segments.map((g) => g.name));
    for (let k = 1; ; k++) if (!used.has(`${FIRST_SEGMENT}.${k}`)) return `${FIRST_SEGMENT}.${k}`;
  }

  /**
   * Before something maps about `bytes` of the journal: drop what is mapped first if the two together would
   * pass the unmap interval, so a large batch or a segment drop does not pile on top of a full one.
   */
  private beforeTouching(bytes: number): void {
    if (this.touchedSinceUnmap > 0 && this.touchedSinceUnmap + bytes > UNMAP_AFTER_BYTES) this.unmapRead();
  }

  private touched(bytes: number): void {
    this.touchedSinceUnmap += bytes;
    if (this.touchedSinceUnmap >= UNMAP_AFTER_BYTES) this.unmapRead();
  }

  /** Drops the process's mappings of journal pages (they stay in the page cache); a failure only costs RSS. */
  private unmapRead(): void {
    this.touchedSinceUnmap = 0;
    if (!this.mapPath) return;
    try {
      loadNative()?.dropFileMappings(this.mapPath);
    } catch (err) {
      this.log.warn({ err }, 'could not drop mapped journal pages; RSS will count them');
      this.mapPath = undefined;
    }
  }

  /**
   * Stored bytes of the committed entries after `seq` (what a replica at `seq` still lacks), exact and O(1)
   * from the entries' cumulative-size field. Everything stored when `seq` is before the tail.
   */
  bytesAfter(seq: number): number {
    if (seq >= this.committed) return 0;
    if (seq < this.tail) return this.bytes;
    const n = this.spanBytes(seq + 1, this.committed);
    return n < 0 ? this.bytes : n;
  }

  /**
   * Stored bytes of entries [from, to]: from the two ends' `cum` fields, so the data pages between are never
   * read (pruning gigabytes must not pull them into memory); summed entry by entry if an end is unreadable.
   */
  private storedSpan(from: number, to: number): number {
    const n = this.spanBytes(from, to);
    if (n >= 0) return n;
    let sum = 0;
    for (const { value } of this.range(from, to)) sum += storedLength(value);
    return sum;
  }

  /** Stored bytes of entries [from, to] from their `cum` fields; -1 if either end is missing. */
  private spanBytes(from: number, to: number): number {
    const first = fastBinary(this.segmentOf(from).db, from);
    if (!first || first.length < VALUE_HEADER) return -1;
    const firstLen = storedLength(first);
    const firstMapped = first.length;
    const firstCum = valueCum(first);
    const last = fastBinary(this.segmentOf(to).db, to);
    if (!last || last.length < VALUE_HEADER) return -1;
    // Both whole values were read through the map (an 8 MiB resync entry maps 8 MiB): count them.
    this.touched(firstMapped + last.length);
    return valueCum(last) - firstCum + firstLen;
  }

  private admitWaiting(): void {
    // Pruning may have freed the disk's space (dropped segments' files): look again before refusing room.
    if (this.waitingForSpace.length > 0) this.lookAtDisk();
    let admitted = false;
    while (this.waitingForSpace.length > 0 && this.hasRoom(this.waitingForSpace[0])) {
      const p = this.waitingForSpace.shift()!;
      this.bytes += p.value.length;
      this.admittedSinceLook += p.value.length;
      this.enqueue(p);
      admitted = true;
    }
    if (admitted) this.emit('space', this.stats);
  }

  async close(): Promise<void> {
    if (this.isClosed) return;
    this.isClosed = true;
    if (this.diskTimer) clearInterval(this.diskTimer);
    if (this.waitTimer) clearInterval(this.waitTimer);
    for (const w of this.waiters.splice(0)) w.resolve();
    if (!this.readOnly) {
      // Appends waiting for space cannot complete now: fail them rather than leave their callers hanging.
      for (const p of this.waitingForSpace.splice(0)) p.reject(new BlockferryError('ESHUTDOWN', `journal closed before seq ${p.seq} had room to be written`));
      // Commits whatever this loop turn appended, together with the final position.
      // The last seq that will be stored: the refused appends above never are, so they must not count.
      const last = this.batch.length > 0 ? this.batch[this.batch.length - 1].seq : this.committed;
      await this.putMeta('log', { head: last, cum: this.cum, tail: this.tail } satisfies LogMeta).catch(() => undefined);
      if (this.durability === 'sync') await this.root.flushed;
      else await this.syncEnv();
    }
    await this.checkpointSync;
    await this.root.close();
    this.space?.close();
    this.data?.close();
    if (this.lockFd !== undefined) fs.closeSync(this.lockFd);
    this.lockFd = undefined;
  }
}

/** Locks DIR/serve.lock for this process (see JournalOptions.lock); returns its descriptor. */
function lockDir(dir: string): number {
  const busy = () => new BlockferryError('ERR_JOURNAL_BUSY', `journal ${dir} is in use by another blockferry serve (it holds ${LOCK_FILE}); stop that one first`);
  return openLocked(path.join(dir, LOCK_FILE), 'a', busy, 0o600);
}

/** Opens the LMDB environment of a journal (see Journal.open for the settings' reasons). */
function openEnv(dir: string, maxBytes: number, durability: 'sync' | 'commit', writeMap: boolean, readOnly: boolean, locked: boolean): RootDatabase {
  if (readOnly && !fs.existsSync(path.join(dir, 'journal.mdb'))) throw new BlockferryError('ERR_NO_JOURNAL', `${dir} holds no journal`);
  // LMDB trusts its file: read, one too short for its two meta pages (truncated, or emptied) crashes the
  // process. (A writable open of an empty file makes a new environment in it.)
  const file = readOnly ? fs.statSync(path.join(dir, 'journal.mdb')) : undefined;
  if (file && file.size < 2 * 4096) {
    throw new BlockferryError('ERR_JOURNAL_CORRUPT', `${path.join(dir, 'journal.mdb')} is ${file.size} bytes, too short to be a journal (an LMDB file has two meta pages first)`);
  }
  // The lock file made with its blocks first (lmdb-open.ts): on a full disk LMDB's own would be a SIGBUS.
  return openLmdb({
    readOnly,
    // lmdb-js opens a file path (plus its -lock file): keep both inside the journal directory.
    path: path.join(dir, 'journal.mdb'),
    mapSize: Math.ceil(maxBytes * 1.25) + MAP_HEADROOM,
    // 16 KiB pages (for a new journal; an existing one keeps its own): a 4 KiB write's entry fits in a leaf
    // page beside others instead of taking two 4 KiB overflow pages (4 KiB pages measured 1.2-1.5x slower,
    // 8.2 KB of file per entry). Not larger: every commit also rewrites the segment's branch page, the main
    // database's page, a free-list page and the last, partly filled leaf, whole. At 4 KiB random writes,
    // queue depth 32 (one commit per 32 entries), 32 KiB pages wrote 8.8 KB to the file per entry and 16 KiB
    // pages 8.0 KB; fio measured 59-66k -> 63-75k IOPS journaled, serve's CPU per write 15-17 -> 13-16 us,
    // and 1 MiB sequential writes 558-660 -> 629-697 MiB/s.
    pageSize: JOURNAL_PAGE_SIZE,
    // The segments' databases and the meta one.
    maxDbs: MAX_SEGMENTS + 4,
    // LMDB builds each commit's pages in malloc'd memory and zeroes them first; noMemInit skips that. Value
    // bytes are all overwritten; only a page's unused slack can keep stale heap bytes of this process, in a
    // file that already holds the disk's data (SECURITY.md). fio 1 MiB journaled writes measured 309 ->
    // 363 MiB/s, serve's CPU per MiB 0.49 -> 0.38 ticks.
    noMemInit: true,
    // Readahead stays on. With the write map, a page LMDB takes at the end of its file faults in with readahead,
    // which zero-fills a large folio of the allocated-ahead blocks (3.7% of serve's loop thread at 4 KiB
    // journaled writes, perf); noReadAhead (MADV_RANDOM on the map) zero-fills one page instead but measured
    // slower: 47-50k against 52-61k IOPS in three alternating fio pairs (p99 1.7-1.8 against 2.6-2.8 ms).
    // With a write map (opt-in since it measured slower on Linux 6.18: see WRITE_MAP_DEFAULT) LMDB stores
    // values straight into its mapped file: one copy per value instead of a memcpy into malloc'd pages and a
    // writev of them, and no malloc'd pages in RSS. MapSpace allocates the file's blocks ahead of it, since a
    // store into a hole of a full filesystem would be a SIGBUS. Measured on 2026-12-03 (alternating runs): LMDB alone appending 1 MiB values 1.4 -> 0.25 ms CPU per MiB, 4 KiB
    // ones 0.76 -> 0.52; in serve, fio 1 MiB journaled writes 0.163 -> 0.150 CPU ticks per MiB (throughput
    // within the noise, 709-788 vs 674-856 MiB/s); bench/replication.mjs --quick --memory: 10 GiB replicated
    // at 254-344 -> 369-374 MiB/s, serve's peak anonymous memory 179-181 -> 161 MiB, peak RSS 277-310 -> 269-273.
    useWritemap: writeMap,
    ...(durability === 'sync'
      ? {
          // Every commit synced (data pages, then the meta page) before transactionSync returns: the group commit
          // of a loop turn is on stable storage when its appends resolve. It used lmdb-js's asynchronous batches
          // (overlappingSync, each put's `flushed`) until 2026-12-07; on a journal filesystem that failed under
          // writes (ext4 remounted read-only) those left writes unanswered, serve exiting 0 or not at all, and
          // glibc aborting on a corrupted heap (found by a review helper, reproduced in full-disk.test). Committing
          // on the loop thread the syncs hold it (one fdatasync per transaction, the meta page through LMDB's O_DSYNC
          // descriptor), and it measured no slower: `node bench/journal-append.mjs sync`, 20000 4 KiB appends at
          // depth 32, alternating with the old code: 15.6k/17.3k against 16.7k/13.5k appends/s (1 MiB: 128/138
          // against 145/119 MiB/s); an earlier pair of runs 28.6-29.6k against 17.8-18.7k.
          overlappingSync: false,
          eventTurnBatching: false,
        }
      : {
          // Commits only reach the OS cache (a SIGKILL loses nothing); flush() syncs the environment.
          noSync: true,
          overlappingSync: false,
        }),
  }, locked);
}
