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
  if (!options.readOnly && isNew(options.path)) {
    const free = freeBytes(path.dirname(options.path));
    if (free !== undefined && free < NEW_ENV_MIN_FREE) {
      throw new BlockferryError('ENOSPC', `cannot create ${options.path}: its filesystem has ${free} bytes free (ENOSPC), and a new LMDB environment needs at least ${NEW_ENV_MIN_FREE}; free some space and start again`);
    }
  }
  readyLockFile(`${options.path}-lock`, exclusive && !options.readOnly);
  return open<V, K>(options);
}

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
