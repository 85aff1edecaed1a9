// Opening an LMDB environment without risking SIGBUS on a full filesystem.
//
// LMDB maps its lock file (`<path>-lock`, the reader table) shared and stores into it. A new one is made with
// ftruncate, a file of holes: on a full filesystem the first store into the map finds no block to back the
// page and the kernel sends SIGBUS, which ends the process with no message (measured here on tmpfs and ext4:
// `serve` with a new journal, or a replayer taking a new volume, on a full disk died with "Bus error", the
// replayer with every other volume it held). So the lock file is made beforehand with real zeroes, whose
// blocks the write itself allocates: on a full disk that write fails with ENOSPC, named, and nothing is mapped.
// A new environment's data file is the other trap: LMDB (lmdb-js 3.5) ended the process with SIGSEGV when it could
// not write its first meta pages (a new journal with 32 KiB free; 64 KiB was enough), so one is only made with
// NEW_ENV_MIN_FREE free.
import fs from 'node:fs';
import path from 'node:path';
import { open, type Key, type RootDatabase, type RootDatabaseOptionsWithPath } from 'lmdb';
import { BlockferryError } from './errors.js';
import { freeBytes } from './free-space.js';

/**
 * The size LMDB gives a new lock file with lmdb-js's default of 126 readers (its header with the first reader
 * slot, then 125 more of 64 bytes). A larger file only gives LMDB more reader slots; test/lmdb-open.test.ts
 * checks that LMDB neither grows nor shrinks the one made here.
 */
export const LMDB_LOCK_BYTES = 8272;

/**
 * Opens an LMDB environment as lmdb-js's `open` does, after making sure its lock file is backed by disk blocks.
 * `exclusive`: the caller holds a lock of its own that keeps other writers of this environment out, so a lock
 * file left with holes (a process that died making it, as earlier versions could) may be replaced. Without it
 * only a missing lock file is made: one in use by another process is never touched.
 */
export function openLmdb<V = unknown, K extends Key = Key>(options: RootDatabaseOptionsWithPath & { path: string }, exclusive = false): RootDatabase<V, K> {
  const fresh = isNew(options.path);
  if (!options.readOnly && fresh) {
    const free = freeBytes(path.dirname(options.path));
    if (free !== undefined && free < NEW_ENV_MIN_FREE) {
      throw new BlockferryError('ENOSPC', `cannot create ${options.path}: its filesystem has ${free} bytes free (ENOSPC), and a new LMDB environment needs at least ${NEW_ENV_MIN_FREE}; free some space and start again`);
    }
  }
  // Nothing to read in an empty or missing file, and LMDB's failed read-only open of one ends the process
  // (SIGSEGV, see checkEnvFile; a replayer listing an empty NAME.state.mdb at start, found by a review helper).
  if (options.readOnly && fresh) throw new BlockferryError('ERR_LMDB_EMPTY', `${options.path} is empty or missing: there is nothing in it to read`);
  if (!fresh) checkEnvFile(options.path);
  ensureDescriptors(options.path);
  try {
    readyLockFile(`${options.path}-lock`, exclusive && !options.readOnly);
  } catch (err) {
    // Read-only on a filesystem it cannot write: LMDB reads such an environment without a lock file (journal
    // inspect of a read-only mount). Full is another matter: LMDB would make the lock file itself.
    const code = (err as NodeJS.ErrnoException).code;
    if (!options.readOnly || (code !== 'EROFS' && code !== 'EACCES' && code !== 'EPERM')) throw err;
  }
  return open<V, K>(options);
}

/**
 * lmdb-js 3.5 frees its environment twice when LMDB's open fails after the lock file is open (a data file that is
 * not LMDB's, a failed map, no descriptor left): the process ends with SIGSEGV, and a replayer takes every other
 * volume down with it (found by a review helper: EMFILE, 64 KiB of random bytes as a volume's state file). And a
 * data file cut short is mapped as it is, so reading a page past its end is a SIGBUS. So what can be checked
 * beforehand is: the two meta pages, and that the file holds every page the newer one says is in use.
 */
export function checkEnvFile(file: string): void {
  const bad = (why: string) =>
    new BlockferryError('ERR_LMDB_CORRUPT', `${file} is not an LMDB file blockferry can open (${why}); nothing was read from it. Move it aside to start that store anew, or restore it from a copy`);
  const size = fs.statSync(file).size;
  const head = Buffer.alloc(2 * MAX_PAGE_BYTES);
  const fd = fs.openSync(file, 'r');
  let got: number;
  try {
    got = fs.readSync(fd, head, 0, head.length, 0);
  } finally {
    fs.closeSync(fd);
  }
  const pageBytes = got >= META_END ? head.readUInt32LE(META_PAGE_SIZE) : 0;
  if (pageBytes < MIN_PAGE_BYTES || pageBytes > MAX_PAGE_BYTES || (pageBytes & (pageBytes - 1)) !== 0) throw bad(`no meta page at its start; ${size} bytes`);
  if (size < 2 * pageBytes) throw bad(`${size} bytes, shorter than its two meta pages of ${pageBytes}`);
  let newest: { txnid: bigint; lastPage: bigint } | undefined;
  for (const at of [0, pageBytes]) {
    const m = head.subarray(at, at + META_END);
    if ((m.readUInt16LE(META_PAGE_FLAGS) & P_META) === 0 || m.readUInt32LE(META_MAGIC) !== LMDB_MAGIC) throw bad(`meta page ${at / pageBytes} is damaged`);
    if (m.readUInt32LE(META_VERSION) !== LMDB_DATA_VERSION) throw bad(`data format version ${m.readUInt32LE(META_VERSION)}, not ${LMDB_DATA_VERSION}`);
    const meta = { txnid: m.readBigUInt64LE(META_TXNID), lastPage: m.readBigUInt64LE(META_LAST_PAGE) };
    if (!newest || meta.txnid > newest.txnid) newest = meta;
  }
  const need = (newest!.lastPage + 1n) * BigInt(pageBytes);
  if (BigInt(size) < need) throw bad(`${size} bytes where its pages in use need ${need}: cut short`);
}

/**
 * Descriptors LMDB's open takes (the data file, the lock file, one for synced meta writes), with some to spare:
 * checked by taking them first, so running out is an error here instead of inside LMDB (see checkEnvFile).
 */
const DESCRIPTORS_NEEDED = 8;

function ensureDescriptors(file: string): void {
  const fds: number[] = [];
  try {
    for (let i = 0; i < DESCRIPTORS_NEEDED; i++) fds.push(fs.openSync('/dev/null', 'r'));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EMFILE' || code === 'ENFILE') {
      throw new BlockferryError(code, `cannot open ${file}: too many open files (${code}); raise the limit (ulimit -n, LimitNOFILE=) or serve fewer volumes`, { cause: err });
    }
    throw err;
  } finally {
    for (const fd of fds) fs.closeSync(fd);
  }
}

// Where LMDB (lmdb-js 3.5's, data format 2) keeps its meta page's fields: a 24-byte page header (page number,
// txnid, pad, flags, lower, upper), then the meta. Read back from files lmdb-js made (4 and 16 KiB pages).
const P_META = 0x08;
const LMDB_MAGIC = 0xbeefc0de;
const LMDB_DATA_VERSION = 2;
const META_PAGE_FLAGS = 0x12;
const META_MAGIC = 0x18;
const META_VERSION = 0x1c;
/** The free-page database's md_pad, where LMDB records the page size. */
const META_PAGE_SIZE = 0x30;
const META_LAST_PAGE = 0x90;
const META_TXNID = 0x98;
const META_END = 0xa0;
const MIN_PAGE_BYTES = 512;
const MAX_PAGE_BYTES = 65536;

/** Free bytes a new environment is made with at least: its lock file, meta pages and first commit, four times over. */
export const NEW_ENV_MIN_FREE = 256 * 1024;

/** Whether LMDB would make a new environment at `file` (none there, or an empty file). */
function isNew(file: string): boolean {
  try {
    return fs.statSync(file).size === 0;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return true;
    throw err;
  }
}

/** Makes `lock` a file of LMDB_LOCK_BYTES zeroes with its blocks allocated, unless a usable one is there. */
export function readyLockFile(lock: string, replaceSparse: boolean): void {
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(lock);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  if (st && (!replaceSparse || !sparse(st))) return;
  // Written whole under a temporary name and then put in place, so no other process ever maps it half made.
  const tmp = `${lock}.${process.pid}.new`;
  try {
    fs.writeFileSync(tmp, Buffer.alloc(Math.max(st?.size ?? 0, LMDB_LOCK_BYTES)), { mode: 0o644 });
    if (st) fs.renameSync(tmp, lock);
    else {
      try {
        fs.linkSync(tmp, lock); // never over one another process made meanwhile
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
    }
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      throw new BlockferryError(
        'ENOSPC',
        `cannot create ${lock}: its filesystem is full (${code}). LMDB maps that file, and one made on a full disk would end the process with SIGBUS; free some space and start again`,
        { cause: err },
      );
    }
    throw err;
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

/** Whether a file has fewer blocks than its size needs (holes: pages the kernel must find blocks for on a store). */
function sparse(st: fs.Stats): boolean {
  return st.blocks * 512 < st.size;
}
