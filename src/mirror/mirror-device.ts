// The mirror layer: a BlockDevice that wraps the local image (like an nbdkit filter wraps `next`) and makes
// every change journal-first. Per change: 1. append to the journal (the seq is the order of truth),
// 2. once committed, apply to the image in seq order for overlapping ranges, 3. resolve (the NBD reply).
// On open it recovers: entries after the last checkpoint are re-applied before anyone can connect.
import { scanRead, type BlockDevice, type DeviceCapabilities, type Extent, type WriteOptions, type ZeroOptions } from '../device/block-device.js';
import { writeZeroBuffers } from '../device/zero-fill.js';
import type { Journal } from '../journal/journal.js';
import { allocData } from '../journal/entry.js';
import { releaseBuffer } from '../util/buffer-pool.js';
import { EntryKind, type JournalEntry } from '../journal/types.js';
import { BlockferryError, JournalCorruptError } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/logger.js';
import { OrderedApply } from './ordered-apply.js';
import { SpaceGuard, type SpaceRefusal } from './space-guard.js';
import { CHUNK_BYTES, hashChunks } from '../replicator/chunk-hash.js';

/** Checkpoint (fsync image + record seq) this often while writes flow, so recovery and pruning stay short. */
const CHECKPOINT_INTERVAL_MS = 5_000;
/**
 * ...and after this many bytes of changes: the journal prunes up to the checkpoint, and LMDB reuses pages it
 * freed (already in the page cache) instead of growing its file, which measured 1.7x faster for 1 MiB writes.
 * Each checkpoint's fsync writes the image's dirty pages out (a journaled 1 MiB fio run over a 1 GiB image wrote
 * 6-8 GiB to disk, an unjournaled one none). Skipping it while a replica's acknowledgement, not the checkpoint,
 * held the journal changed nothing measurable (replicated 1 MiB writes, three alternating pairs, 597-634 against
 * 625-637 MiB/s, the same bytes written to disk).
 */
const CHECKPOINT_BYTES = 256 * 2 ** 20;
/** Largest range captureRange reads in one go: one NBD payload. */
export const MAX_CAPTURE_BYTES = 32 * 2 ** 20;
/** Entries re-applied per journal read during recovery (bounded memory). */
const RECOVERY_BATCH_BYTES = 64 * 2 ** 20;

export interface MirrorOptions {
  device: BlockDevice;
  journal: Journal;
  logger?: Logger;
  /** Refuse changes with ENOSPC while these paths' filesystems have less than reserveBytes free. */
  space?: { paths: string[]; reserveBytes: number };
  /** Checkpoint period; 0 disables the timer (checkpoints then happen on flush and close only). */
  checkpointIntervalMs?: number;
  /** Checkpoint after this many bytes of changes (0: only by time, flush and close). */
  checkpointBytes?: number;
}

export interface RecoveryReport {
  fromSeq: number;
  toSeq: number;
  entries: number;
  bytes: number;
  /** Entries whose data was lost or damaged, rewritten with what the image holds (see mendFromImage). */
  repaired: number[];
}

export class MirrorDevice implements BlockDevice {
  readonly journal: Journal;
  readonly inner: BlockDevice;
  readonly size: number;
  readonly capabilities: DeviceCapabilities;
  readonly recovery: RecoveryReport;

  private readonly log: Logger;
  private readonly order: OrderedApply;
  private checkpointSeq: number;
  private checkpointTimer: NodeJS.Timeout | undefined;
  private checkpointing: Promise<void> | undefined;
  private readonly checkpointBytes: number;
  /** Bytes of changes journaled since the last checkpoint began. */
  private sinceCheckpoint = 0;
  // While captureRange reads the image, new changes wait here so that none gets a seq below the capture's.
  private gate: Promise<void> | undefined;
  private closed = false;
  private readonly space: SpaceGuard | undefined;

  static async open(opts: MirrorOptions): Promise<MirrorDevice> {
    const log = (opts.logger ?? silentLogger).child({ component: 'mirror' });
    const recovery = await recover(opts.device, opts.journal, log);
    return new MirrorDevice(opts, log, recovery);
  }

  private constructor(opts: MirrorOptions, log: Logger, recovery: RecoveryReport) {
    this.journal = opts.journal;
    this.inner = opts.device;
    this.space = opts.space
      ? new SpaceGuard(
          opts.space.paths,
          opts.space.reserveBytes,
          () => this.journal.relieve(),
          (refusal) => {
            if (refusal) this.log.error(`writes refused with ENOSPC: ${refusal.reason}`);
            else this.log.warn('space is back above the reserve: writes are taken again');
          },
        )
      : undefined;
    this.size = opts.device.size;
    this.log = log;
    this.recovery = recovery;
    const head = this.journal.stats.committedSeq;
    // Once it happens every later write is refused until a restart: said at once, not only at shutdown.
    this.order = new OrderedApply(head, (seq, err) => {
      if (this.closed) return; // appends the closing journal refused: not a failure of the volume
      const why = this.journal.failed ? 'its journal commit failed' : 'the image write failed';
      this.log.error({ err, seq }, `volume stopped taking writes at journal seq ${seq} (${why}); they are answered EIO until serve is restarted`);
    });
    this.checkpointSeq = head;
    const inner = opts.device.capabilities;
    this.capabilities = {
      ...inner,
      // FUA is emulated by the NBD core with flush(), which covers journal and image together.
      fua: false,
      flush: true,
      // TRIM is journaled and applied as "reads as zeroes" so the replica can reproduce it byte for byte;
      // that is only affordable when the image zeroes natively. Otherwise TRIM is an ignored hint.
      trim: inner.zeroes,
    };
    // A full journal may only be waiting for the checkpoint to pass what it holds: checkpoint now.
    this.journal.on('full', this.onJournalFull);
    this.checkpointBytes = opts.checkpointBytes ?? CHECKPOINT_BYTES;
    const interval = opts.checkpointIntervalMs ?? CHECKPOINT_INTERVAL_MS;
    if (interval > 0) {
      this.checkpointTimer = setInterval(() => {
        if (this.order.appliedSeq > this.checkpointSeq && !this.checkpointing) {
          this.checkpoint().catch((err) => this.log.error({ err }, 'background checkpoint failed'));
        }
      }, interval);
      this.checkpointTimer.unref();
    }
  }

  private readonly onJournalFull = (): void => {
    if (this.closed || this.checkpointing || this.order.appliedSeq <= this.checkpointSeq) return;
    this.checkpoint().catch((err) => this.log.error({ err }, 'checkpoint for a full journal failed'));
  };

  /** Highest seq applied to the image with all before it. */
  get appliedSeq(): number {
    return this.order.appliedSeq;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }

  /** The payload lands inside its journal record: append() then adds only the header (one copy, not two). */
  writeBuffer(length: number): Buffer {
    return allocData(length);
  }

  write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    if (this.gate) return this.gate.then(() => this.write(offset, data));
    const err = this.unusable() ?? this.noSpace(data.length);
    if (err) return Promise.reject(err);
    const { seq, done } = this.journal.append(EntryKind.WRITE, offset, data.length, data);
    this.sinceCheckpoint += data.length;
    if (this.checkpointBytes > 0 && this.sinceCheckpoint >= this.checkpointBytes && !this.checkpointing && !this.closed) {
      this.checkpoint().catch((err) => this.log.error({ err }, 'checkpoint after a run of writes failed'));
    }
    return this.order.run(seq, offset, offset + data.length, done, () => this.applyWrite(offset, data));
  }

  /**
   * Writes a journaled change to the image; its record buffer (from allocData) then goes back to its pool: the
   * entry is committed, and the journal and its memory window hold copies.
   * A small write into a file is done at once (writeNow), without a promise.
   */
  private applyWrite(offset: number, data: Buffer): Promise<void> | void {
    let done = false;
    try {
      done = this.inner.writeNow?.(offset, data) ?? false;
    } catch (err) {
      releaseBuffer(data);
      throw err;
    }
    if (done) return releaseBuffer(data);
    return this.inner.write(offset, data).finally(() => releaseBuffer(data));
  }

  trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    if (!this.capabilities.trim) return Promise.resolve();
    if (this.gate) return this.gate.then(() => this.trim(offset, length));
    const err = this.unusable() ?? this.noSpace(0);
    if (err) return Promise.reject(err);
    const { seq, done } = this.journal.append(EntryKind.TRIM, offset, length);
    return this.order.run(seq, offset, offset + length, done, () => applyZero(this.inner, offset, length));
  }

  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (this.gate) return this.gate.then(() => this.writeZeroes(offset, length, opts));
    const err = this.unusable() ?? this.noSpace(0);
    if (err) return Promise.reject(err);
    const { seq, done } = this.journal.append(EntryKind.ZERO, offset, length);
    // The range must read as zeroes on every copy; NO_HOLE/FAST_ZERO are local allocation policy only.
    return this.order.run(seq, offset, offset + length, done, () => applyZero(this.inner, offset, length, opts?.noHole));
  }

  /**
   * Every write replied before this call is durable in journal and image when it resolves. A FLUSH marker
   * enters the journal so a replica can stop at a flush boundary.
   */
  async flush(): Promise<void> {
    if (this.gate) await this.gate;
    this.assertUsable();
    const { seq, done } = this.journal.append(EntryKind.FLUSH, 0, 0);
    await this.order.run(seq, 0, 0, done, () => undefined);
    await this.journal.flush();
    await this.checkpoint();
  }

  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache ? this.inner.cache(offset, length) : Promise.resolve();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.inner.blockStatus) return Promise.resolve([{ length, hole: false, zero: false }]);
    return this.inner.blockStatus(offset, length);
  }

  /**
   * Appends the current contents of [offset, offset+length) as an ordinary WRITE entry: the way initial sync
   * and resync put image chunks into the same ordered stream as new writes. New changes wait while the range
   * is read, so none of them can get a seq below the capture's and be overwritten by older data on a replica.
   */
  async captureRange(offset: number, length: number): Promise<number> {
    if (length <= 0 || length > MAX_CAPTURE_BYTES || offset < 0 || offset + length > this.size) {
      throw new BlockferryError('ERR_CAPTURE_RANGE', `captureRange: offset ${offset} length ${length} is outside 1..${MAX_CAPTURE_BYTES} bytes within the ${this.size}-byte volume`);
    }
    while (this.gate) await this.gate;
    this.assertUsable();
    let open!: () => void;
    this.gate = new Promise<void>((resolve) => (open = resolve));
    try {
      await this.order.drainRange(offset, offset + length);
      // A resync reads most of the image: through readScan, which leaves the page cache fit for small writes.
      // Read into a record buffer, which becomes the journal record in place; it goes back once committed.
      const record = allocData(length);
      const got = await scanRead(this.inner, offset, length, record);
      const data = got.buffer === record.buffer && got.byteOffset === record.byteOffset ? record : got;
      const { seq, done } = this.journal.append(EntryKind.WRITE, offset, length, data);
      done.then(() => releaseBuffer(record), () => releaseBuffer(record));
      // The image already holds these bytes; registering keeps the watermark gap-free.
      // Its failure is the journal's, reported to every caller after it; nothing here waits for it.
      this.order.run(seq, offset, offset + length, done, () => undefined).catch(() => undefined);
      await done;
      return seq;
    } finally {
      this.gate = undefined;
      open();
    }
  }

  /**
   * Digests of chunks [first, first+count) of the image, once the changes in flight there have landed (the
   * resync comparison; a chunk written meanwhile is fine either way: see Replicator).
   */
  async hashChunks(first: number, count: number): Promise<Buffer> {
    await this.order.drainRange(first * CHUNK_BYTES, Math.min(this.size, (first + count) * CHUNK_BYTES));
    return hashChunks(this.inner, first, count);
  }

  /** fsync the image and record that it is durable up to the applied watermark. */
  async checkpoint(): Promise<void> {
    while (this.checkpointing) await this.checkpointing;
    const seq = this.order.appliedSeq;
    this.sinceCheckpoint = 0;
    this.checkpointing = (async () => {
      await this.inner.flush();
      if (seq > this.checkpointSeq) {
        await this.journal.setCheckpoint(seq, { durable: false });
        this.checkpointSeq = seq;
      }
    })();
    try {
      await this.checkpointing;
    } finally {
      this.checkpointing = undefined;
    }
    if (this.order.failedSeq !== Infinity) this.assertUsable();
  }

  /** Waits for in-flight changes, checkpoints, and closes the image. The journal is the caller's to close. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.journal.off('full', this.onJournalFull);
    this.space?.close();
    if (this.checkpointTimer) clearInterval(this.checkpointTimer);
    await this.order.drain();
    if (this.order.failedSeq === Infinity) await this.checkpoint();
    await this.inner.close();
  }

  /** Why the volume refuses changes for good (the image failed to apply an entry, or the journal a commit), if it does. */
  get failure(): BlockferryError | undefined {
    return this.journal.failed ?? (this.order.failedSeq === Infinity ? undefined : this.unusable());
  }

  private assertUsable(): void {
    const err = this.unusable();
    if (err) throw err;
  }

  /** While writes are refused for want of space (--min-free), since when and why; undefined otherwise. */
  get spaceRefusal(): SpaceRefusal | undefined {
    return this.space?.refusing;
  }

  /** ENOSPC when the journal's or image's filesystem is down to its reserve (the change is not journaled). */
  private noSpace(bytes: number): BlockferryError | undefined {
    return this.space?.take(bytes + 64);
  }

  private unusable(): BlockferryError | undefined {
    if (this.closed) return new BlockferryError('ESHUTDOWN', 'the volume is closing');
    // A commit that failed stops the order too (its change never reached the image): the journal says why.
    const journal = this.journal.failed;
    if (journal) return journal;
    if (this.order.failedSeq !== Infinity) {
      return new BlockferryError(
        'EIO',
        `the local image failed to apply journal seq ${this.order.failedSeq}; the journal holds it and every later change. ` +
          'Fix the image storage (space, device errors) and restart: recovery re-applies them in order',
      );
    }
    return undefined;
  }
}

/** Makes a range read as zeroes on the image, natively when it can. */
async function applyZero(dev: BlockDevice, offset: number, length: number, noHole?: boolean): Promise<void> {
  if (dev.capabilities.zeroes) return dev.writeZeroes(offset, length, { noHole });
  return writeZeroBuffers(dev, offset, length);
}

/**
 * Applies one journal entry to an image (recovery; the replayer and replay-local apply the same way). A small
 * write into a file is done at once (writeNow) and nothing is returned: callers applying thousands of entries
 * in order skip a promise each.
 */
export function applyEntry(dev: BlockDevice, e: JournalEntry): Promise<void> | void {
  switch (e.kind) {
    case EntryKind.WRITE:
      if (dev.writeNow?.(e.offset, e.data!)) return;
      return dev.write(e.offset, e.data!);
    case EntryKind.TRIM:
    case EntryKind.ZERO:
      return applyZero(dev, e.offset, e.length);
    case EntryKind.FLUSH:
      return;
  }
}

/**
 * A WRITE after the last checkpoint whose data fails its check. With commit durability that is what a power
 * cut leaves when an entry's LMDB record reached the disk and its data (in the segment's data file) did not:
 * the write was never promised durable (no FLUSH after it was replied), and the image, brought up to the
 * entry before it, holds some state of its range: old bytes, new ones, or a mix, as any write-back disk may
 * after a power cut. The entry is rewritten with those bytes, so base + journal rebuilds this image, and
 * replicas are compared by digests when they next connect (Journal.repair). A damaged entry of another kind, or
 * with a damaged header, cannot be mended this way: recovery stops with the error and serve does not start.
 */
async function mendFromImage(dev: BlockDevice, journal: Journal, err: JournalCorruptError, log: Logger): Promise<void> {
  const h = journal.storedHeader(err.seq);
  if (!h || h.kind !== EntryKind.WRITE || h.offset + h.length > dev.size) throw err;
  log.error({ err, seq: err.seq, offset: h.offset, length: h.length }, `recovery: journal seq ${err.seq} is damaged (${err.message}); rewriting it with the image's bytes of its range`);
  await journal.repair(err.seq, await dev.read(h.offset, h.length));
}

/**
 * Brings the image to "base + journal up to the committed head": re-applies, in order, every entry after the
 * last checkpoint. Re-applying an entry the image already has is harmless because the tail is replayed in
 * order. Then fsyncs and moves the checkpoint to the head.
 */
async function recover(dev: BlockDevice, journal: Journal, log: Logger): Promise<RecoveryReport> {
  const stats = journal.stats;
  const from = stats.checkpointSeq + 1;
  const to = stats.committedSeq;
  const report: RecoveryReport = { fromSeq: from, toSeq: to, entries: 0, bytes: 0, repaired: [] };
  if (from > to) return report;
  if (from < stats.tailSeq) {
    throw new BlockferryError(
      'ERR_JOURNAL_BEHIND_CHECKPOINT',
      `cannot recover: the image is durable only up to seq ${stats.checkpointSeq} but the journal starts at seq ${stats.tailSeq}`,
    );
  }
  log.info({ from, to }, 'recovering: re-applying journal entries after the last checkpoint');
  let next = from;
  while (next <= to) {
    let batch: JournalEntry[];
    try {
      batch = journal.read(next, { maxBytes: RECOVERY_BATCH_BYTES });
    } catch (err) {
      if (!(err instanceof JournalCorruptError) || err.seq < next || err.seq > to) throw err;
      if (err.seq > next) {
        // Apply what precedes it first: the image must hold those writes when the damaged one is mended.
        batch = journal.read(next, { maxBytes: RECOVERY_BATCH_BYTES, maxEntries: err.seq - next });
      } else {
        await mendFromImage(dev, journal, err, log);
        report.repaired.push(err.seq);
        continue; // read again: the entry now holds what the image holds, and applying it changes nothing
      }
    }
    if (batch.length === 0) break;
    for (const e of batch) {
      if (e.seq > to) break;
      if (e.seq !== next) {
        throw new BlockferryError('ERR_SEQUENCE_GAP', `recovery: journal seq ${next} is missing (found ${e.seq})`);
      }
      await applyEntry(dev, e);
      report.entries++;
      report.bytes += e.kind === EntryKind.WRITE ? e.length : 0;
      next++;
    }
  }
  await dev.flush();
  await journal.setCheckpoint(to);
  log.info(report, 'recovery complete');
  return report;
}
