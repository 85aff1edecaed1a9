// Loads the optional C helper (build/Release/blockferry_native.node) that exposes fallocate, SEEK_DATA/HOLE,
// block-device ioctls, fadvise, madvise and glibc's mallopt. Missing or disabled (BLOCKFERRY_NO_NATIVE=1) → null, and callers fall back.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export interface NativeHelper {
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
  /**
   * Allocates disk blocks for the range without changing the file's size (fallocate mode KEEP_SIZE). Optional:
   * a helper built before it was added lacks it, and the journal then does without a write map.
   */
  allocate?(fd: number, offset: number, length: number): void;
  /** Next data offset at or after `offset`, or -1 when there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** Next hole offset at or after `offset`, or -1 (ENXIO: offset at or past EOF). */
  seekHole(fd: number, offset: number): number;
  blockDeviceSize(fd: number): number;
  blkDiscard(fd: number, offset: number, length: number): void;
  blkZeroOut(fd: number, offset: number, length: number): void;
  fadviseWillNeed(fd: number, offset: number, length: number): void;
  /** Turns readahead off for this open file (POSIX_FADV_RANDOM). */
  fadviseRandom(fd: number): void;
  /**
   * Drops this process's page-table entries for every shared mapping of `path` (MADV_DONTNEED): the pages stay
   * in the page cache and read back unchanged; RSS stops counting them. Returns the bytes of mappings advised.
   */
  dropFileMappings(path: string): number;
  /**
   * Gives the pages wholly inside `buffer` back to the kernel (MADV_DONTNEED): RSS stops counting them and they
   * read as zeroes when next touched. Only for a buffer of the caller's own whose contents are no longer needed.
   * Optional: a helper built before it was added lacks it, and callers then keep the memory.
   */
  releasePages?(buffer: Buffer): number;
  /**
   * Writes all of `data` at `offset` as pwrite calls of at most `piece` bytes, in one thread-pool trip; the
   * callback gets a Node-style error (code, errno, syscall) or null.
   */
  pwritePieces(fd: number, data: Buffer, offset: number, piece: number, cb: (err: NodeJS.ErrnoException | null) => void): void;
  /**
   * Writes each of `buffers` at the same index of `offsets`, in order, synchronously; returns how many (all).
   * On a failure throws the errno error with `written`: how many were fully written before it.
   */
  pwriteMany(fd: number, buffers: Buffer[], offsets: number[]): number;
  /**
   * flock(LOCK_EX or LOCK_SH, non-blocking) on an open file: true when taken, false when another open file holds
   * a conflicting lock. Released with the descriptor (or the process). Optional: a helper built before it was
   * added lacks it.
   */
  tryLock?(fd: number, exclusive: boolean): boolean;
  /** glibc's mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; false where malloc is not glibc's. */
  keepFreedMemory(mmapThreshold: number, trimThreshold: number): boolean;
  /**
   * CRC32C of `data` continuing from `initial` (a previous result), as @node-rs/crc32's crc32c. Present only
   * where the CPU has SSE4.2's crc32 instruction (see util/crc32c).
   */
  crc32c?(data: Uint8Array, initial?: number): number;
}

let cached: NativeHelper | null | undefined;

/** Every function NativeHelper declares: a helper built from older sources lacks some and is not used. */
const FUNCTIONS: ReadonlyArray<keyof NativeHelper> = [
  'punchHole', 'zeroRange', 'seekData', 'seekHole', 'blockDeviceSize', 'blkDiscard', 'blkZeroOut',
  'fadviseWillNeed', 'fadviseRandom', 'dropFileMappings', 'pwritePieces', 'pwriteMany', 'keepFreedMemory',
];

/** The package root: the nearest ancestor holding package.json (works from dist/device and src/device). */
function packageRoot(): string | null {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

export function loadNative(): NativeHelper | null {
  if (process.env.BLOCKFERRY_NO_NATIVE === '1') return null;
  if (cached !== undefined) return cached;
  cached = null;
  const root = packageRoot();
  if (root) {
    try {
      const helper = createRequire(import.meta.url)(path.join(root, 'build', 'Release', 'blockferry_native.node')) as NativeHelper;
      const missing = FUNCTIONS.filter((f) => typeof helper[f] !== 'function');
      if (missing.length === 0) cached = helper;
      else process.emitWarning(`build/Release/blockferry_native.node is out of date (no ${missing.join(', ')}): using fallbacks; rebuild it with npm rebuild blockferry or npx node-gyp rebuild`);
    } catch {
      // Not built (no compiler at install time): the device reports fewer capabilities and the core emulates.
    }
  }
  return cached;
}

/**
 * Locks an open file for this process (NativeHelper.tryLock): true when taken, false when another holds it,
 * undefined when it cannot be checked (no helper, or one built without tryLock).
 */
export function tryLockFile(fd: number, exclusive: boolean): boolean | undefined {
  const native = loadNative();
  return native?.tryLock ? native.tryLock(fd, exclusive) : undefined;
}

/**
 * Opens `file` with `flags` and locks it exclusively for this process; the descriptor returned holds the lock
 * until it is closed. When another open file holds the lock, the descriptor is closed and `busy()` is thrown.
 * Without the helper the lock cannot be checked and the file is opened unlocked.
 */
export function openLocked(file: string, flags: string, busy: () => Error, mode?: number): number {
  const fd = fs.openSync(file, flags, mode);
  if (tryLockFile(fd, true) === false) {
    fs.closeSync(fd);
    throw busy();
  }
  return fd;
}

/** Allocations below this come from malloc's heap (glibc's largest allowed value), so freed ones are reused. */
const MALLOC_MMAP_THRESHOLD = 32 * 2 ** 20;
/**
 * Freed heap memory kept for reuse before malloc gives it back: a group commit of 16 requests of 1 MiB and
 * their buffers. 128 MiB was no faster and raised a replicating serve's peak RSS by ~50 MiB.
 */
const MALLOC_TRIM_THRESHOLD = 32 * 2 ** 20;

/**
 * Makes glibc malloc keep large freed blocks for reuse instead of returning them to the kernel (see
 * keepFreedMemory in the helper). With its default, every group commit of 1 MiB entries had LMDB's malloc'd
 * pages faulted in and zeroed afresh: page faults were 18% of serve's CPU at 1 MiB journaled writes. Measured
 * with fio (1 MiB sequential, queue depth 16, journaled): 358-484 -> 567-645 MiB/s, serve's CPU per request
 * 2.7-3.4 -> 2.1-2.3 ms; 4 KiB random writes 57-61k -> 67-74k IOPS. Peak RSS grew ~10-20 MiB. Process-wide, so
 * the CLI calls it once at start. Returns whether it took effect.
 */
export function keepFreedMemory(): boolean {
  return loadNative()?.keepFreedMemory(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD) ?? false;
}
