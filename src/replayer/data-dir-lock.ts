// One process per data directory: `replay` holds a lock on DIR/replay.pid while it runs, and `promote` and
// `demote` (which change volume state offline) hold it while they work, so none of them runs beside another.
// The lock is a flock through the native helper: it belongs to the open file, so a SIGKILLed replayer leaves
// none behind, and a PID reused by another process after a crash blocks nothing (the PID-file check this
// replaces refused to start then, and let two replayers started at once both pass). The file also holds the
// holder's PID, for the message. Without the helper the PID in the file is all there is to check.
import fs from 'node:fs';
import path from 'node:path';
import { tryLockFile } from '../device/native.js';
import { BlockferryError, UsageError } from '../util/errors.js';

export const DATA_DIR_LOCK = 'replay.pid';

/** Descriptors of the lock files this process holds, by real path of the directory (symlinks resolved). */
const held = new Map<string, number>();

/** The PID a lock file names, if it is a live process's (the check without the helper). */
function livePid(file: string): number | undefined {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(file, 'utf8').trim());
  } catch {
    return undefined;
  }
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
  try {
    process.kill(pid, 0);
    return pid;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' ? pid : undefined;
  }
}

/** Makes the data directory (private to its owner) if it is not there; a file in its place is a usage error. */
export function makeDataDir(dir: string): void {
  if (fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory() === false) throw new UsageError(`--data-dir ${dir} is not a directory`);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  try {
    fs.accessSync(dir, fs.constants.W_OK | fs.constants.X_OK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EACCES' && code !== 'EROFS') throw err;
    // Met first in a container: a bind-mounted host directory owned by root, the image running as its own user.
    const who = typeof process.getuid === 'function' ? ` by this user (uid ${process.getuid()})` : '';
    throw new UsageError(
      `--data-dir ${dir} is not writable${who}: ${code}` +
        (code === 'EACCES' ? '; give it to that user (chown), or in a container use a named volume or chown the host directory to the image\'s user' : ''),
    );
  }
}

/** Takes the directory for this process (`what` it is for, in the refusal); throws ERR_DATA_DIR_BUSY if another has it. */
export function lockDataDir(dir: string, what = 'a replayer'): void {
  makeDataDir(dir);
  const key = fs.realpathSync(dir);
  if (held.has(key)) throw new BlockferryError('ERR_DATA_DIR_BUSY', `${dir} is in use by this process already: stop that before running ${what} on it`);
  const file = path.join(dir, DATA_DIR_LOCK);
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  try {
    const busy = (holder: number | string) =>
      new BlockferryError('ERR_DATA_DIR_BUSY', `${dir} is in use by another process (pid ${holder}): stop it before running ${what} on it`);
    const locked = tryLockFile(fd, true);
    // A refused flock is always a refusal, even when the file names this process (the same directory by
    // another path, or a stale PID reused by us): the flock is the truth, the PID only words the message.
    if (locked === false) throw busy(livePid(file) ?? 'unknown');
    if (locked === undefined) {
      const holder = livePid(file);
      if (holder !== undefined && holder !== process.pid) throw busy(holder);
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  held.set(key, fd);
}

/**
 * Gives the directory up. The file stays, emptied (no PID for the check without the helper): deleting a lock
 * file lets a process that opened it just before lock the deleted file while another locks a new one.
 */
export function unlockDataDir(dir: string): void {
  let key: string;
  try {
    key = fs.realpathSync(dir);
  } catch {
    return;
  }
  const fd = held.get(key);
  if (fd === undefined) return;
  held.delete(key);
  try {
    fs.ftruncateSync(fd, 0);
  } finally {
    fs.closeSync(fd);
  }
}
