// The local storage under an export: a regular file (created sparse with --size) or a block device.
// Small requests use synchronous syscalls: page-cache hits then cost no thread-pool round trip, which
// PERF-NOTES measured at 2x for 4 KiB reads. Large ones go through the libuv pool so the loop keeps serving.
import fs from 'node:fs';
import { ioPool, releaseBuffer } from '../util/buffer-pool.js';
import { BlockferryError, UsageError } from '../util/errors.js';
import type { BlockDevice, DeviceCapabilities, Extent, WriteOptions, ZeroOptions } from './block-device.js';
import { loadNative, type NativeHelper } from './native.js';
import { writeZeroBuffers } from './zero-fill.js';

/** Most extents one blockStatus reply carries: NBD lets us answer a prefix, and a badly fragmented file
 *  must not make one request walk (and encode) millions of holes. */
const MAX_EXTENTS = 1024;

/** Requests up to this size are done synchronously. bench/device-micro.mjs (1 GiB allocated, page-cached,
 *  depth 16, UV_THREADPOOL_SIZE=8): 4K rand read 128k vs 63k IOPS sync/pool, 4K rand write 37k vs 26k, but
 *  1M seq read 5.9 vs 5.2 GiB/s and write 9.1 vs 8.2 GiB/s: small requests gain 1.4-2x, large ones ~12%, while
 *  a synchronous cache miss stalls every connection for a whole device read. 128 KiB covers typical guest I/O
 *  sizes and bounds such a stall to one modest read; larger requests go to the pool. Handing a whole group
 *  commit's small writes to the pool in one trip (one native call doing all their pwrites) was tried for the
 *  journal and lost: fio 4 KiB random writes, journaled, 42.5k / 46.4k IOPS sync against 34.4k / 38.7k batched,
 *  and serve's CPU per write rose from ~25 to ~34 us. */
const DEFAULT_SYNC_THRESHOLD = 128 * 1024;
/**
 * Larger writes reach the file as pwrite calls of at most this size (with the native helper; one thread-pool
 * trip). The kernel sizes a page-cache folio by the write that creates it, and on kernels with large folios
 * (ext4 since 6.16) a later small write into a large folio walks all of its buffer heads. Measured on this
 * machine (6.18, ext4): a 4 KiB pwrite into a file written in 8 MiB calls costs 34 us, in 1 MiB calls 13.7 us,
 * in 128 KiB calls 4.2 us; overwriting in 128 KiB calls instead of 1 MiB costs ~15% of a 12-14 GiB/s memcpy
 * rate. So a 1 MiB write no longer makes every later 4 KiB write there 3x dearer (a replica after an 8 MiB-chunk
 * resync: 40 -> 13 us of replayer CPU per 4 KiB entry).
 */
const WRITE_PIECE = 128 * 1024;

export interface FileDeviceOptions {
  path: string;
  /** Create a sparse file of this size when `path` does not exist. */
  size?: number;
  readOnly?: boolean;
  syncThreshold?: number;
  /**
   * Largest pwrite a big write is split into (default WRITE_PIECE). Smaller pieces make smaller page-cache
   * folios: a replica, written in 8 MiB chunks by its initial sync and then by 4 KiB entries, uses 32 KiB.
   */
  writePiece?: number;
  /** Do not use the native helper even if it is built (tests; same as BLOCKFERRY_NO_NATIVE=1). */
  noNative?: boolean;
  /**
   * Hold a lock on the image while open (flock, through the helper): 'exclusive' for a server that writes it,
   * 'shared' for one that only reads it. A second server of the same image is refused with ERR_IMAGE_BUSY
   * rather than writing beside the first. Without the helper nothing is locked.
   */
  lock?: 'exclusive' | 'shared';
}

/** An error with a Node-style errno `code`, for failures raised here rather than by a syscall. */
function codedError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

function blockDeviceSize(path: string, fd: number, st: fs.Stats, native: NativeHelper | null): number {
  if (native) return native.blockDeviceSize(fd);
  const major = Math.floor(st.rdev / 256) & 0xfff;
  const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
  const sectors = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  const size = Number(sectors.trim()) * 512;
  if (!Number.isSafeInteger(size) || size <= 0) throw new UsageError(`cannot read the size of block device ${path}`);
  return size;
}

/**
 * What BLKDISCARD and BLKZEROOUT ranges are aligned to: a multiple of every logical block size in use (512 and
 * 4096 bytes).
 */
const BLOCK_ALIGN = 4096;

/** The whole BLOCK_ALIGN blocks inside [offset, offset + length): [from, to), empty when to <= from. */
function blockAlignedInside(offset: number, length: number): { from: number; to: number } {
  return { from: Math.ceil(offset / BLOCK_ALIGN) * BLOCK_ALIGN, to: Math.floor((offset + length) / BLOCK_ALIGN) * BLOCK_ALIGN };
}

/** How far ahead of a scan's reads readScan asks for data (POSIX_FADV_WILLNEED). */
const SCAN_AHEAD = 8 * 2 ** 20;

export class FileDevice implements BlockDevice {
  readonly capabilities: DeviceCapabilities;
  private closed = false;
  /** The descriptor readScan reads through, opened on first use. */
  private scanFd: number | undefined;
  /** The range readScan last asked the kernel to read ahead. */
  private scanAheadFrom = 0;
  private scanAheadTo = 0;
  readonly nativeAvailable: boolean;

  get size(): number {
    return this.currentSize;
  }

  /**
   * Grows a regular file to `size` bytes (the new region reads as zeroes): a replica following its primary's
   * grown volume. Durable with the next flush (fdatasync covers the size). A block device is not grown here.
   */
  grow(size: number): void {
    if (size <= this.currentSize) return;
    if (this.isBlockDevice) throw new BlockferryError('ERR_VOLUME_SIZE', `${this.path} is a block device of ${this.currentSize} bytes and cannot be grown to ${size} here`);
    fs.ftruncateSync(this.fd, size);
    this.currentSize = size;
  }

  private constructor(
    readonly path: string,
    private readonly fd: number,
    private currentSize: number,
    readonly isBlockDevice: boolean,
    readOnly: boolean,
    private readonly syncThreshold: number,
    private readonly native: NativeHelper | null,
    private readonly writePiece: number,
  ) {
    this.nativeAvailable = native !== null;
    const n = native !== null;
    this.capabilities = {
      readOnly,
      flush: true,
      // FUA is done here as write + fdatasync of the one fd; without the helper the core emulates it the same way.
      fua: n,
      // Punching holes and zeroing ranges need fallocate/ioctls, which only the native helper provides:
      // without it the NBD core emulates zeroing by writing, and TRIM (only a hint) is ignored.
      trim: n,
      zeroes: n,
      // BLKZEROOUT falls back to writing zero pages in the kernel where the device cannot zero itself, and
      // nothing here asks it not to: fast zeroing is only promised for files (fallocate).
      fastZero: n && !isBlockDevice,
      // SEEK_DATA/SEEK_HOLE describe files only; a block device has no holes to report.
      blockStatus: n && !isBlockDevice,
      multiConn: true,
    };
  }

  static async open(opts: FileDeviceOptions): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    if (fs.statSync(opts.path, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`image ${opts.path} is a directory: give an image file or a block device`);
    if (!fs.existsSync(opts.path)) {
      if (readOnly) throw new UsageError(`image ${opts.path} does not exist and --read-only cannot create it`);
      if (opts.size === undefined) throw new UsageError(`image ${opts.path} does not exist; pass --size to create it`);
      if (!(opts.size >= 1)) throw new UsageError(`cannot create image ${opts.path} of ${opts.size} bytes: --size must be at least 1 byte`);
      const fd = fs.openSync(opts.path, 'wx', 0o600);
      try {
        fs.ftruncateSync(fd, opts.size);
      } catch (err) {
        // Not left behind half made (an empty file would be refused as an image from then on).
        fs.unlinkSync(opts.path);
        if ((err as NodeJS.ErrnoException).code === 'EFBIG') {
          throw new UsageError(`cannot create image ${opts.path} of ${opts.size} bytes: its filesystem's files cannot be that large (EFBIG); use a smaller --size or another filesystem`);
        }
        throw err;
      } finally {
        fs.closeSync(fd);
      }
    }
    const native = opts.noNative ? null : loadNative();
    const fd = fs.openSync(opts.path, readOnly ? 'r' : 'r+');
    try {
      const st = fs.fstatSync(fd);
      const isBlock = st.isBlockDevice();
      if (!isBlock && !st.isFile()) throw new UsageError(`${opts.path} is neither a regular file nor a block device`);
      const size = isBlock ? blockDeviceSize(opts.path, fd, st, native) : st.size;
      if (!isBlock && opts.size !== undefined && opts.size !== size) {
        throw new UsageError(`image ${opts.path} exists with ${size} bytes, not the ${opts.size} asked for with --size; drop --size to serve it as it is`);
      }
      if (size === 0) throw new UsageError(`image ${opts.path} is empty`);
      if (opts.lock && native?.tryLock && !native.tryLock(fd, opts.lock === 'exclusive')) {
        throw new BlockferryError(
          'ERR_IMAGE_BUSY',
          `image ${opts.path} is in use by another blockferry process (a serve of it, or a replayer applying to it; it holds a lock on the file): stop that one first`,
        );
      }
      return new FileDevice(opts.path, fd, size, isBlock, readOnly, opts.syncThreshold ?? DEFAULT_SYNC_THRESHOLD, native, opts.writePiece ?? WRITE_PIECE);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /**
   * Pooled (util/buffer-pool): whoever is done with it last may releaseBuffer it, as the NBD connection does
   * once the reply is on the wire; one never released is simply collected.
   */
  read(offset: number, length: number): Promise<Buffer> {
    const buf = ioPool.alloc(length);
    if (length <= this.syncThreshold) {
      try {
        this.fill(this.fd, fs.readSync(this.fd, buf, 0, length, offset), buf, offset);
        return Promise.resolve(buf);
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.readPool(this.fd, buf, offset);
  }

  /** Fills `buf` from `fd` at `offset` with one thread-pool read (a short one completed by fill). */
  private readPool(fd: number, buf: Buffer, offset: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      fs.read(fd, buf, 0, buf.length, offset, (err, n) => {
        if (err) return reject(err);
        try {
          this.fill(fd, n, buf, offset);
          resolve(buf);
        } catch (e) {
          reject(e);
        }
      });
    });
  }

  /**
   * read() through a second descriptor with readahead off (POSIX_FADV_RANDOM), for whole-image scans. Read with
   * readahead, an uncached file is brought into the page cache in large folios (ext4 on Linux 6.x), and every
   * later 4 KiB write into such a folio costs far more in the kernel: measured here 28-31 us per 4 KiB pwrite
   * after a sequential read of a 1 GiB image, 2.4 us after the same read with POSIX_FADV_RANDOM (2.3 us never
   * read). A digest pass over the primary (initial sync, resync, verify) would otherwise slow every small
   * write the host makes afterwards. Same page cache as the main descriptor, so it sees every write. What is
   * read next is asked for ahead with POSIX_FADV_WILLNEED, which reads in small folios: a 1 GiB scan in 256 KiB
   * reads of an evicted image measured 1203-1379 MiB/s that way, 671-829 without it, 427-719 with readahead.
   */
  readScan(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (!this.native) return this.read(offset, length);
    if (this.scanFd === undefined) {
      if (this.closed) return Promise.reject(codedError('EBADF', `${this.path} is closed`));
      const fd = fs.openSync(this.path, 'r');
      try {
        this.native.fadviseRandom(fd);
      } catch (err) {
        fs.closeSync(fd);
        return Promise.reject(err);
      }
      this.scanFd = fd;
    }
    const fd = this.scanFd;
    const end = offset + length;
    if (end + SCAN_AHEAD / 2 > this.scanAheadTo || offset < this.scanAheadFrom) {
      // A new pass, or past half of the range asked for: ask for the next SCAN_AHEAD bytes (a hint; errors ignored).
      const from = offset < this.scanAheadFrom || offset > this.scanAheadTo ? offset : this.scanAheadTo;
      try {
        this.native.fadviseWillNeed(fd, from, end + SCAN_AHEAD - from);
      } catch {
        // only a hint
      }
      this.scanAheadFrom = offset;
      this.scanAheadTo = end + SCAN_AHEAD;
    }
    return this.readPool(fd, into ? into.subarray(0, length) : Buffer.allocUnsafe(length), offset);
  }

  /** Completes a short read synchronously (rare: only at EOF or on signals); past EOF reads as zeroes. */
  private fill(fd: number, got: number, buf: Buffer, offset: number): void {
    while (got < buf.length) {
      const n = fs.readSync(fd, buf, got, buf.length - got, offset + got);
      if (n === 0) {
        buf.fill(0, got);
        return;
      }
      got += n;
    }
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (this.capabilities.readOnly) return Promise.reject(this.readOnlyError('write', offset, data.length));
    const p = opts?.fua ? this.writeRaw(offset, data).then(() => this.flush()) : this.writeRaw(offset, data);
    // A payload from writeBuffer is this device's again once written (the BlockDevice contract): reuse it.
    if (ioPool.whole(data) === undefined) return p;
    if (data.length <= this.syncThreshold) {
      releaseBuffer(data); // written (or failed) already, on this thread
      return p;
    }
    return p.finally(() => releaseBuffer(data));
  }

  private readOnlyError(what: string, offset: number, length: number): Error {
    return codedError('EROFS', `${what} of ${length} bytes at offset ${offset} refused: ${this.path} is open read-only`);
  }

  /**
   * Writes `data` at `offset` now, on this thread, when it is small enough for the synchronous path (see
   * DEFAULT_SYNC_THRESHOLD) and returns true; returns false, having written nothing, for a larger one (use
   * write()). Throws what pwrite throws. For a caller applying thousands of small writes in order (the
   * replayer), without a promise per write.
   */
  writeNow(offset: number, data: Buffer): boolean {
    if (!this.takesNow(data.length)) return false;
    if (this.capabilities.readOnly) throw this.readOnlyError('write', offset, data.length);
    this.writeSyncAll(offset, data);
    return true;
  }

  /** Whether writeNow and writeManyNow take a write of `length` bytes. */
  takesNow(length: number): boolean {
    return length <= this.syncThreshold;
  }

  /**
   * Writes each of `datas` at the same index of `offsets`, in that order, now, on this thread: a run of writes
   * that each pass takesNow, in one call into the native helper rather than one fs.writeSync each (see
   * pwriteMany there; one fs.writeSync each without the helper). Throws what pwrite throws, with `written` set
   * to how many of them were written before the failure.
   */
  writeManyNow(offsets: number[], datas: Buffer[]): void {
    if (this.capabilities.readOnly) throw Object.assign(this.readOnlyError('write', offsets[0] ?? 0, datas[0]?.length ?? 0), { written: 0 });
    for (const d of datas) if (!this.takesNow(d.length)) throw new RangeError(`writeManyNow takes writes of at most ${this.syncThreshold} bytes, not ${d.length}`);
    if (this.native) {
      this.native.pwriteMany(this.fd, datas, offsets);
      return;
    }
    for (let i = 0; i < datas.length; i++) {
      try {
        this.writeSyncAll(offsets[i], datas[i]);
      } catch (err) {
        throw Object.assign(err as Error, { written: i });
      }
    }
  }

  private writeSyncAll(offset: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) done += fs.writeSync(this.fd, data, done, data.length - done, offset + done);
  }

  /** A pooled buffer for a WRITE's payload (util/buffer-pool); write() gives it back once it is written. */
  writeBuffer(length: number): Buffer {
    return ioPool.alloc(length);
  }

  private writeRaw(offset: number, data: Buffer): Promise<void> {
    if (data.length <= this.syncThreshold) {
      try {
        this.writeSyncAll(offset, data);
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(err);
      }
    }
    const native = this.native;
    if (native) {
      return new Promise((resolve, reject) => native.pwritePieces(this.fd, data, offset, this.writePiece, (err) => (err ? reject(err) : resolve())));
    }
    return new Promise((resolve, reject) => {
      const step = (done: number) => {
        if (done >= data.length) return resolve();
        fs.write(this.fd, data, done, data.length - done, offset + done, (err, n) => (err ? reject(err) : step(done + n)));
      };
      step(0);
    });
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (this.capabilities.readOnly) throw this.readOnlyError('trim', offset, length);
    const native = this.native;
    if (!native) return; // TRIM is a hint; ignoring it is correct
    try {
      if (this.isBlockDevice) {
        // BLKDISCARD takes whole logical blocks only (EINVAL otherwise), and clients may trim any range: the
        // blocks inside it are discarded, the partial ones at its edges left as they are (TRIM is a hint).
        const { from, to } = blockAlignedInside(offset, length);
        if (to > from) native.blkDiscard(this.fd, from, to - from);
      } else native.punchHole(this.fd, offset, length);
    } catch (err) {
      // A filesystem or device that cannot discard: the hint is dropped, as the spec allows.
      if ((err as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw err;
      return;
    }
    if (opts?.fua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (this.capabilities.readOnly) throw this.readOnlyError('write-zeroes', offset, length);
    const native = this.native;
    let done = false;
    if (native) {
      try {
        if (this.isBlockDevice) done = await this.zeroBlocks(native, offset, length);
        else {
          if (opts?.noHole) native.zeroRange(this.fd, offset, length);
          else native.punchHole(this.fd, offset, length); // punched ranges read as zeroes
          done = true;
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw err;
      }
    }
    if (!done) {
      if (opts?.fastZero) {
        throw codedError('ENOTSUP', `write-zeroes of ${length} bytes at offset ${offset} on ${this.path}: no fast zeroing here (fast-zero requested)`);
      }
      await writeZeroBuffers({ write: (o, d) => this.writeRaw(o, d) }, offset, length);
    }
    if (opts?.fua) await this.flush();
  }

  /**
   * Zeroes a block device's range: BLKZEROOUT takes whole logical blocks only (EINVAL otherwise), so the blocks
   * inside the range go through it and the partial ones at its edges are written with zeroes. False when the
   * range holds no whole block (the caller writes it all).
   */
  private async zeroBlocks(native: NativeHelper, offset: number, length: number): Promise<boolean> {
    const { from, to } = blockAlignedInside(offset, length);
    if (to <= from) return false;
    native.blkZeroOut(this.fd, from, to - from);
    const zeroes = { write: (o: number, d: Buffer) => this.writeRaw(o, d) };
    if (from > offset) await writeZeroBuffers(zeroes, offset, from - offset);
    if (offset + length > to) await writeZeroBuffers(zeroes, to, offset + length - to);
    return true;
  }

  async cache(offset: number, length: number): Promise<void> {
    this.native?.fadviseWillNeed(this.fd, offset, length);
  }

  /** base:allocation from SEEK_DATA/SEEK_HOLE: holes are hole+zero, data is neither; a prefix of the range. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const native = this.native;
    const end = Math.min(offset + length, this.size);
    if (!native || this.isBlockDevice) return [{ length: end - offset, hole: false, zero: false }];
    const out: Extent[] = [];
    const push = (len: number, hole: boolean) => {
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.length += len;
      else out.push({ length: len, hole, zero: hole });
    };
    let at = offset;
    while (at < end && out.length < MAX_EXTENTS) {
      let data = native.seekData(this.fd, at);
      if (data < 0 || data > end) data = end; // no data before the end: all hole
      if (data > at) {
        push(data - at, true);
        at = data;
        continue;
      }
      let hole = native.seekHole(this.fd, at);
      if (hole < 0 || hole > end) hole = end;
      push(hole - at, false);
      at = hole;
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.scanFd !== undefined) fs.closeSync(this.scanFd);
    this.scanFd = undefined;
    fs.closeSync(this.fd);
  }
}
