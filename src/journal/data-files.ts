// The segments' data files. With commit durability a WRITE's data is not stored in LMDB but appended to a plain
// file per segment (`<segment>.data` beside journal.mdb), and LMDB stores the entry's header with the data's
// position in that file (entry.ts, fileRef). One batch of appends is one pwritev at the file's end, before the
// LMDB transaction that names it commits; a segment's file goes with its segment (recycled, below).
//
// Why: LMDB copies every value into pages it allocates for the transaction and then writes those pages out (or
// stores into its write map, faulting each page in), rewrites the leaf and branch pages around them, and reads
// values back by copying them out again; and pages freed by pruning cannot be reused while a replicator's read
// transaction still sees them. For journal data, which is written once in order and dropped in whole segments, a
// file append does the one copy that is needed and journal.mdb stays small. Measured with `node bench/run.mjs
// --jobs 1M-seq-write,4K-rand-write --rounds 1`, three runs of each alternating with the same bench built from
// the commit before (2 CPUs, same machine): serve's peak RSS journal-only 149-151 -> 102-106 MiB, replicated
// 243-259 -> 199-202 MiB, in every run; throughput moved less than the machine's noise (1 MiB journal-only
// 1011-1245 -> 1100-1198 MiB/s, replicated 504-592 -> 554-617 MiB/s; 4 KiB random writes inconclusive, runs
// of either build ranging 24k-46k IOPS over ten minutes).
//
// Durability: data is written before the LMDB commit that refers to it, so after a SIGKILL every committed
// entry has its data in the page cache. flush() fdatasyncs the files written since the last sync before
// syncing LMDB (and the directory, when a file was created since), so an entry a replied FLUSH covers has its
// data on disk before its header is. Bytes written without their commit (a kill between the two) are left
// unreferenced at the file's end and skipped: appends continue after them. A power cut can still take data
// written since the last FLUSH while LMDB kept the header: that entry then fails its CRC32C, and recovery
// mends it from the image (mirror-device.ts, mendFromImage).
//
// Recycling: a dropped segment's file is not deleted but kept as a spare a later new segment is written into,
// and the active segment's file is not cut when everything in it is pruned: appends start over at its
// beginning. Writes then land on pages the page cache already holds, as LMDB's did when it reused its own:
// appending to new files made the kernel find fresh pages for every write, and the copy into them
// (copy_folio_from_iter_atomic; on this VM first touching guest memory is slow) was 16.1% of serve's samples
// with 4 KiB random writes replicated (perf record -p, fio qd32), 2.2% with recycling. In alternating runs of
// `node bench/run.mjs --only blockferry-journal,blockferry-replicated --jobs 1M-seq-write,4K-rand-write`:
// 4 KiB journal-only 33.8/44.6/34.4k -> 41.1/47.8/35.0k IOPS, replicated 16.4/23.7/20.1k -> 24.0/20.1/24.6k
// (within this machine's noise), 1 MiB unchanged. Stale bytes past an entry's data are never read: entries
// refer only to their own.
// Up to `maxSpareBytes` of files wait (spare-<n>.data): one checkpoint of the image lets the journal drop many
// segments at once (what was written while the image's fsync ran too), and with a single spare the others were
// deleted and the next segments written into fresh pages again: with 1 MiB writes journal-only that copy was
// still 20.6% of the machine's samples (perf record -a). Fresh pages are what costs: this VM hands freed memory
// back to its host (page_reporting.page_reporting_order=11 on the kernel command line), and the first write to
// it again runs at 1.0-2.0 ms per MiB against 0.05-0.07 ms for a page-cache page written before (64 MiB
// written into a new file after deleting the last one, 3 s apart, against a file written over). Disk use is up
// to maxSpareBytes and one segment more than what is retained; releaseSpares() gives the spares back when the
// disk runs short (SpaceGuard).
import fs from 'node:fs';
import path from 'node:path';
import { BlockferryError } from '../util/errors.js';

/** Most buffers one pwritev or preadv takes (Linux's IOV_MAX). */
export const IOV_MAX = 1024;
const SUFFIX = '.data';
/** Recycled files (see Recycling above): spare-<n>.data, and spare.data from before there were several. */
const SPARE_NAME = /^spare(-\d+)?\.data$/;

export class DataFiles {
  private readonly fds = new Map<string, number>();
  /** Files appended to since their last fdatasync. */
  private readonly unsynced = new Set<string>();
  /** Descriptors of removed files, closed once no fdatasync may be using them. */
  private closeLater: number[] = [];
  private syncs = 0;
  /** A data file was created since the directory was last fsynced. */
  private newFiles = false;
  /** The segment appends go to (openActive, create). */
  private active: string | undefined;
  /** Where the active segment's next data goes. */
  pos = 0;

  /** The directory, held open to fsync it (see sync). */
  private readonly dirFd: number;
  private closed = false;
  /** Dropped segments' files waiting for new segments (names in the directory, sizes), the last one reused first. */
  private readonly spares: Array<{ name: string; size: number }> = [];
  private spareBytes = 0;

  /**
   * `maxSpareBytes`: how many bytes of dropped segments' files are kept for reuse (0: each is deleted).
   * `readOnly`: only reads (journal inspect beside a live serve): files are opened read-only, never created.
   */
  /** Whether dropped segments' files are kept as spares (off while the disk is short: see Journal.lookAtDisk). */
  keepSpares = true;

  constructor(
    private readonly dir: string,
    private readonly maxSpareBytes = 0,
    private readonly readOnly = false,
  ) {
    this.dirFd = fs.openSync(dir, 'r');
  }

  static isDataFile(file: string): boolean {
    return file.endsWith(SUFFIX);
  }

  /** A dropped segment's file kept for reuse (see Recycling above). */
  static isSpare(file: string): boolean {
    return SPARE_NAME.test(file);
  }

  file(segment: string): string {
    return path.join(this.dir, segment + SUFFIX);
  }

  /** Opens the active segment's file for appending after whatever it holds (creating it if missing). */
  openActive(segment: string): void {
    this.active = segment;
    this.pos = fs.fstatSync(this.fd(segment)).size;
    this.newFiles = true; // it may have just been created
  }

  /**
   * Starts the file of a new segment: a spare a dropped segment left (renamed over any old file of the same
   * name, and written over from its start), or a new empty file.
   */
  create(segment: string): void {
    this.release(segment);
    let flags = fs.constants.O_RDWR | fs.constants.O_CREAT;
    const spare = this.spares.pop();
    if (spare !== undefined) {
      this.spareBytes -= spare.size;
      fs.renameSync(path.join(this.dir, spare.name), this.file(segment));
    } else {
      flags |= fs.constants.O_TRUNC;
    }
    let fd: number;
    try {
      fd = fs.openSync(this.file(segment), flags, 0o600);
    } catch (err) {
      // No descriptor left (EMFILE), say: the spare stays a spare for the next try.
      if (spare !== undefined) {
        fs.renameSync(this.file(segment), path.join(this.dir, spare.name));
        this.spares.push(spare);
        this.spareBytes += spare.size;
      }
      throw err;
    }
    this.fds.set(segment, fd);
    this.active = segment;
    this.pos = 0;
    this.newFiles = true;
  }

  /** Deletes data files no segment names (left by a kill between a segment's drop and its file's removal). */
  removeOrphans(segments: Iterable<string>): void {
    const keep = new Set([...segments].map((s) => s + SUFFIX));
    this.spares.length = 0;
    this.spareBytes = 0;
    for (const f of fs.readdirSync(this.dir).sort()) {
      if (!DataFiles.isDataFile(f) || keep.has(f)) continue;
      const file = path.join(this.dir, f);
      if (DataFiles.isSpare(f) && this.keepSpare(f, fs.statSync(file).size)) continue;
      fs.rmSync(file, { force: true });
    }
  }

  /** Appends `bufs` to the active segment's file at `pos` (advancing it); returns where they start. */
  append(segment: string, bufs: Buffer[]): number {
    const start = this.pos;
    if (bufs.length === 0) return start;
    const total = bufs.reduce((n, b) => n + b.length, 0);
    if (vectored(this.fd(segment), bufs, start, fs.writevSync) < total) {
      throw new BlockferryError('EIO', `writing the journal's data file ${this.file(segment)} made no progress`);
    }
    this.pos = start + total;
    this.unsynced.add(segment);
    return start;
  }

  /** Reads a segment's file from `pos` into `bufs` in order (one preadv while it can); returns the bytes it holds. */
  readv(segment: string, pos: number, bufs: Buffer[]): number {
    return vectored(this.fd(segment), bufs, pos, fs.readvSync);
  }

  /**
   * Everything in the active segment was pruned: its appends start over at the file's beginning, over the bytes
   * already there (see Recycling above; entries refer only to what they wrote). The file is not cut, unless the
   * disk is short (keepSpares off): then its space goes back to the disk.
   */
  rewind(): void {
    this.pos = 0;
    if (!this.keepSpares && this.active !== undefined && this.fds.has(this.active)) fs.ftruncateSync(this.fds.get(this.active)!, 0);
  }

  /** Disk space the data files take (their allocated blocks; spares included). */
  footprint(): number {
    let bytes = 0;
    for (const f of fs.readdirSync(this.dir)) {
      if (!DataFiles.isDataFile(f)) continue;
      const st = fs.statSync(path.join(this.dir, f), { throwIfNoEntry: false });
      if (st) bytes += st.blocks * 512;
    }
    return bytes;
  }

  /** A dropped segment's file becomes a spare a later segment starts in, or is deleted when there are enough. */
  remove(segment: string): void {
    this.release(segment);
    const file = this.file(segment);
    let n = 0;
    while (this.spares.some((s) => s.name === `spare-${n}${SUFFIX}`)) n++;
    const spare = `spare-${n}${SUFFIX}`;
    const size = fs.statSync(file, { throwIfNoEntry: false })?.size ?? 0;
    if (size > 0 && this.keepSpare(spare, size)) fs.renameSync(file, path.join(this.dir, spare));
    else fs.rmSync(file, { force: true });
  }

  /** Counts a file as a spare if the budget has room for it. */
  private keepSpare(name: string, size: number): boolean {
    if (!this.keepSpares || this.spareBytes + size > this.maxSpareBytes) return false;
    this.spares.push({ name, size });
    this.spareBytes += size;
    return true;
  }

  /** Bytes the spare files hold (disk space the next segments reuse). */
  get spareBytesHeld(): number {
    return this.spareBytes;
  }

  /** Deletes the spares (the disk is short of space); returns the bytes their files held. */
  releaseSpares(): number {
    for (const spare of this.spares.splice(0)) fs.rmSync(path.join(this.dir, spare.name), { force: true });
    const freed = this.spareBytes;
    this.spareBytes = 0;
    return freed;
  }

  /** fdatasyncs every file appended to since its last sync. */
  async sync(): Promise<void> {
    const fds = [...this.unsynced].map((s) => this.fds.get(s)).filter((fd): fd is number => fd !== undefined);
    this.unsynced.clear();
    // A file created since the last sync is on disk only once its directory entry is: without it a power cut
    // could take a segment's whole file, flushed entries and all, while LMDB still names the segment.
    const dir = this.newFiles;
    this.newFiles = false;
    if (fds.length === 0 && !dir) return;
    this.syncs++;
    try {
      await Promise.all(fds.map((fd) => new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())))));
      if (dir) await new Promise<void>((resolve, reject) => fs.fsync(this.dirFd, (err) => (err ? reject(err) : resolve())));
    } finally {
      if (--this.syncs === 0) this.closeDeferred();
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const segment of [...this.fds.keys()]) this.release(segment);
    this.closeLater.push(this.dirFd);
    if (this.syncs === 0) this.closeDeferred();
  }

  private fd(segment: string): number {
    let fd = this.fds.get(segment);
    if (fd === undefined) {
      fd = fs.openSync(this.file(segment), this.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      this.fds.set(segment, fd);
    }
    return fd;
  }

  /** Forgets a segment's descriptor; closes it now unless an fdatasync in flight may hold its number. */
  private release(segment: string): void {
    const fd = this.fds.get(segment);
    if (fd === undefined) return;
    this.fds.delete(segment);
    this.unsynced.delete(segment);
    if (this.syncs > 0) this.closeLater.push(fd);
    else fs.closeSync(fd);
  }

  private closeDeferred(): void {
    for (const fd of this.closeLater.splice(0)) fs.closeSync(fd);
  }
}

/**
 * writev or readv of `bufs` at `pos`, IOV_MAX buffers a call, going on after a partial transfer from where it
 * stopped; returns the bytes moved (fewer than asked when a call moves nothing: the end of the file).
 */
function vectored(fd: number, bufs: Buffer[], pos: number, io: (fd: number, bufs: Buffer[], pos: number) => number): number {
  let done = 0;
  let i = 0;
  let skip = 0; // bytes of bufs[i] already moved
  while (i < bufs.length) {
    const part = bufs.slice(i, i + IOV_MAX);
    if (skip > 0) part[0] = part[0].subarray(skip);
    const n = io(fd, part, pos + done);
    if (n <= 0) break;
    done += n;
    let left = n + skip;
    skip = 0;
    while (i < bufs.length && left >= bufs[i].length) left -= bufs[i++].length;
    skip = left;
  }
  return done;
}
