// Failover and failback on the replica side, done offline on a data directory (no replayer running on it):
// promote turns a replica into an image a `serve` can take over; demote turns a (former primary's) image into
// a replica volume that a new primary brings up to date by digest comparison, sending only what differs.
import fs from 'node:fs';
import path from 'node:path';
import { openLmdb } from '../util/lmdb-open.js';
import { openLocked } from '../device/native.js';
import { BlockferryError } from '../util/errors.js';
import { DATA_DIR_LOCK, lockDataDir, unlockDataDir } from './data-dir-lock.js';
import { isConsistent, type VolumeState } from './replay-server.js';

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

function checkName(volume: string): void {
  if (!VOLUME_NAME.test(volume)) throw new BlockferryError('ERR_USAGE', `invalid volume name ${JSON.stringify(volume)}`);
}

/** Runs `work` holding the data directory (no replayer, promote or demote runs on it meanwhile). */
async function withDataDir<T>(dataDir: string, what: string, work: () => Promise<T>): Promise<T> {
  lockDataDir(dataDir, what);
  try {
    return await work();
  } finally {
    unlockDataDir(dataDir);
  }
}

export interface PromoteResult {
  volume: string;
  image: string;
  appliedSeq: number;
  consistent: boolean;
}

export async function promoteVolume(dataDir: string, volume: string, opts: { force?: boolean } = {}): Promise<PromoteResult> {
  checkName(volume);
  if (!fs.existsSync(dataDir)) throw new BlockferryError('ERR_NO_VOLUME', `there is no replica of volume ${volume} in ${dataDir}`);
  return withDataDir(dataDir, 'promote', () => promoteLocked(dataDir, volume, opts));
}

async function promoteLocked(dataDir: string, volume: string, opts: { force?: boolean }): Promise<PromoteResult> {
  const image = path.join(dataDir, `${volume}.img`);
  const statePath = path.join(dataDir, `${volume}.state.mdb`);
  if (!fs.existsSync(image) || !fs.existsSync(statePath)) throw new BlockferryError('ERR_NO_VOLUME', `there is no replica of volume ${volume} in ${dataDir}`);
  const db = openLmdb<unknown, string>({ path: statePath }, true);
  try {
    const state = db.get('state') as VolumeState | undefined;
    if (!state) throw new BlockferryError('ERR_NO_VOLUME', `volume ${volume} in ${dataDir} has no recorded state`);
    if (state.promoted) throw new BlockferryError('ERR_VOLUME_PROMOTED', `volume ${volume} was already promoted at ${state.promoted.at}`);
    const consistent = isConsistent(state);
    if (!consistent && !opts.force) {
      throw new BlockferryError(
        'ERR_REPLICA_INCONSISTENT',
        `volume ${volume} is inconsistent (a resync had not finished): it is not a state the primary ever had. Use --force only if nothing better exists`,
      );
    }
    state.promoted = { at: new Date().toISOString(), appliedSeq: state.appliedSeq };
    db.putSync('state', state); // synchronous: see Volume.sync
    await db.flushed;
    return { volume, image, appliedSeq: state.appliedSeq, consistent };
  } finally {
    await db.close();
  }
}

export interface DemoteResult {
  volume: string;
  image: string;
  /** Where the image's own journal (IMAGE.journal) was moved aside to, if it had one. */
  journalMovedTo?: string;
}

/**
 * Moves `image` into `dataDir` as the replica of `volume`, marked inconsistent: the next primary to replicate
 * into it compares digests and sends only the chunks that differ (this side's own changes are overwritten:
 * that is what demoting means).
 */
export async function demoteImage(imagePath: string, dataDir: string, volume: string): Promise<DemoteResult> {
  checkName(volume);
  // The outermost directory of dataDir's path that is not there yet (the lock makes all of them).
  let made: string | undefined;
  for (let d = path.resolve(dataDir); !fs.existsSync(d) && d !== path.dirname(d); d = path.dirname(d)) made = d;
  try {
    return await withDataDir(dataDir, 'demote', () => demoteLocked(imagePath, dataDir, volume));
  } catch (err) {
    // A refused demote leaves behind no directory it made: the data directory (empty but for the lock file),
    // then its parents up to the first that was there, each only if empty.
    if (made && fs.existsSync(dataDir) && fs.readdirSync(dataDir).every((f) => f === DATA_DIR_LOCK)) {
      fs.rmSync(dataDir, { recursive: true, force: true });
      for (let d = path.dirname(path.resolve(dataDir)); made.length <= d.length && fs.existsSync(d); d = path.dirname(d)) {
        if (fs.readdirSync(d).length > 0) break;
        fs.rmdirSync(d);
      }
    }
    throw err;
  }
}

async function demoteLocked(imagePath: string, dataDir: string, volume: string): Promise<DemoteResult> {
  const image = path.join(dataDir, `${volume}.img`);
  const statePath = path.join(dataDir, `${volume}.state.mdb`);
  if (!fs.existsSync(imagePath)) throw new BlockferryError('ERR_NO_IMAGE', `${imagePath} does not exist`);
  // The image's lock, as serve takes it: a serve still writing it would go on writing the replica.
  const busy = () => new BlockferryError('ERR_IMAGE_BUSY', `${imagePath} is in use by another blockferry process (a serve of it?): stop it before demoting the image`);
  const fd = openLocked(imagePath, 'r', busy);
  try {
    if (path.resolve(imagePath) !== path.resolve(image)) {
      if (fs.existsSync(image)) throw new BlockferryError('ERR_EXISTS', `${image} already exists; move it away first`);
      fs.renameSync(imagePath, image);
    }
    const journalMovedTo = moveJournalAside(imagePath);
    await writeDemotedState(image, statePath);
    return journalMovedTo ? { volume, image, journalMovedTo } : { volume, image };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The image's own journal (serve's default, IMAGE.journal) describes the image as it was: once the image is a
 * replica, and later promoted and served again, its tail would be re-applied over what the resync brought.
 * Moved aside (not deleted: it is the record of this side's writes after the failover). A journal kept
 * elsewhere (serve --journal DIR) is not known here.
 */
function moveJournalAside(imagePath: string): string | undefined {
  const journal = `${imagePath}.journal`;
  if (!fs.existsSync(journal)) return undefined;
  const aside = `${journal}.before-demote-${new Date().toISOString().replace(/[:.]/g, '-')}`;
  fs.renameSync(journal, aside);
  return aside;
}

async function writeDemotedState(image: string, statePath: string): Promise<void> {
  for (const f of [statePath, `${statePath}-lock`]) fs.rmSync(f, { force: true });
  const db = openLmdb<unknown, string>({ path: statePath }, true);
  try {
    const size = fs.statSync(image).size;
    // seeded: the image holds the old primary's data, which the new primary must compare, never take for zeroes.
    const state: VolumeState = { appliedSeq: 0, volumeId: null, size, consistentFrom: -1, promoted: null, seeded: true };
    db.putSync('state', state); // synchronous: see Volume.sync
    await db.flushed;
  } finally {
    await db.close();
  }
}
