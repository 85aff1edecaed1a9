// One replayer per data directory: `replay` holds DIR/replay.pid while it runs, so `promote` and `demote`
// (which change volume state offline) and a second replayer can tell that the directory is in use.
import fs from 'node:fs';
import path from 'node:path';
import { BlockferryError } from '../util/errors.js';

const LOCK = 'replay.pid';

/** The PID of a live process holding the directory, or undefined (no lock, or a stale one). */
export function dataDirHolder(dir: string): number | undefined {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(path.join(dir, LOCK), 'utf8').trim());
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

export function lockDataDir(dir: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const holder = dataDirHolder(dir);
  if (holder !== undefined && holder !== process.pid) {
    throw new BlockferryError('ERR_DATA_DIR_BUSY', `${dir} is in use by another replayer (pid ${holder}); stop it first`);
  }
  fs.writeFileSync(path.join(dir, LOCK), `${process.pid}\n`);
}

export function unlockDataDir(dir: string): void {
  if (dataDirHolder(dir) === process.pid) fs.rmSync(path.join(dir, LOCK), { force: true });
}
