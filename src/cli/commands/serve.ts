// `blockferry serve`: the primary. Opens each image (creating a sparse one with --size), wraps it in the
// mirror layer with its journal (recovering first), serves it over NBD, and ships the journal to replicas.
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { ADMIN_OPTION, startAdminFromFlag } from '../../admin/cli.js';
import type { AdminServer } from '../../admin/server.js';
import type { ServeStatusBody, ServeVolumeStatus } from '../../admin/status-types.js';
import { WriteMeter, sumThroughput } from '../../admin/write-meter.js';
import type { BlockDevice } from '../../device/block-device.js';
import { FileDevice } from '../../device/file-device.js';
import { Journal } from '../../journal/journal.js';
import { openLmdb } from '../../util/lmdb-open.js';
import { MirrorDevice } from '../../mirror/mirror-device.js';
import { NbdServer } from '../../nbd/server.js';
import { loadNbdTls, type NbdTls } from '../../nbd/tls.js';
import { clientTls, tokenFor } from '../../replicator/link-auth.js';
import type { VolumeState } from '../../replayer/replay-server.js';
import { Replicator } from '../../replicator/replicator.js';
import { BlockferryError, UsageError } from '../../util/errors.js';
import { createLogger, type Logger } from '../../util/logger.js';
import { formatBytes, parseRate, parseSize } from '../../util/size.js';
import { isLoopback, parseHostPort, type HostPort } from '../listen.js';

/** Default journal cap: large enough to ride out an afternoon's outage of a busy disk. */
const DEFAULT_JOURNAL_MAX = '8G';
/** How long a graceful stop lets in-flight NBD requests finish. */
const SHUTDOWN_GRACE_MS = 10_000;
/** How long a graceful stop waits for replicas to acknowledge what is journaled. */
const REPLICATION_DRAIN_MS = 10_000;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface ServeImage {
  name: string;
  path: string;
}

export interface ServeOptions {
  images: ServeImage[];
  size?: number;
  listen?: HostPort;
  socket?: string;
  readOnly?: boolean;
  /** Journal directory (one image) or parent directory (several); false = no journal; undefined = beside the image. */
  journal?: string | false;
  journalMax?: number;
  /** Keep journal entries until the cap needs room, not only until the image and replicas have them. */
  keepJournal?: boolean;
  /** Store the journal through LMDB's write map (see Journal's writeMap option). */
  journalWriteMap?: boolean;
  /** The image file was moved or copied together with its journal: take it and record its new identity. */
  imageMoved?: boolean;
  durability?: 'sync' | 'commit';
  /** Replayer URLs (ws://HOST:PORT); every journaled volume is shipped to each. */
  replicateTo?: string[];
  /** Token file (lines of "VOLUME TOKEN"): each volume presents its token to the replayer. */
  tokenFile?: string;
  /** wss:// trust: a CA file and/or the replayer certificate's SHA-256 fingerprint. */
  replicaCa?: string;
  replicaFingerprint?: string;
  /** Free space kept on the journal's and image's filesystems; below it writes get ENOSPC. 0: no check. */
  minFree?: number;
  /** Per replica link, bytes per second; undefined: unlimited. */
  maxRate?: number;
  compress?: boolean;
  /** NBD STARTTLS (see loadNbdTls); undefined: plain text only. */
  tls?: NbdTls;
  logger?: Logger;
}

export interface ServedVolume {
  name: string;
  path: string;
  device: BlockDevice;
  journal?: Journal;
  mirror?: MirrorDevice;
  volumeId?: string;
  replicators: Replicator[];
  /** Counts what clients change, for status (wraps `device` as NBD serves it). */
  meter?: WriteMeter;
}

export interface ServeHandle {
  volumes: ServedVolume[];
  /** URIs clients use, e.g. nbd://127.0.0.1:10809/disk. */
  uris: string[];
  status(): ServeStatusBody;
  close(): Promise<void>;
}

/** "disk=/path/disk.img" or "/path/disk.img" (name = file name without extension). */
export function parseImageArg(arg: string): ServeImage {
  const eq = arg.indexOf('=');
  const named = eq > 0 && NAME_RE.test(arg.slice(0, eq));
  const file = named ? arg.slice(eq + 1) : arg;
  const name = named ? arg.slice(0, eq) : path.basename(file).replace(/\.[^.]*$/, '') || 'disk';
  if (!NAME_RE.test(name)) {
    throw new UsageError(`--image ${arg}: cannot use "${name}" as an export name; write --image NAME=PATH with NAME of letters, digits, . _ -`);
  }
  return { name, path: file };
}

function journalDirFor(opts: ServeOptions, img: ServeImage): string | undefined {
  if (opts.journal === false || opts.readOnly) return undefined;
  if (opts.journal === undefined) return `${img.path}.journal`;
  return opts.images.length === 1 ? opts.journal : path.join(opts.journal, img.name);
}

/** statfs f_type of filesystems held in memory: tmpfs (also devtmpfs, /dev) and ramfs. */
const MEMORY_FS = new Map([
  [0x01021994, 'tmpfs'],
  [0x858458f6, 'ramfs'],
]);

/** 'tmpfs' or 'ramfs' when `dir` (or the nearest existing parent) is on a filesystem in memory. */
function memoryFs(dir: string): string | undefined {
  let d = path.resolve(dir);
  while (!fs.existsSync(d) && path.dirname(d) !== d) d = path.dirname(d);
  try {
    return MEMORY_FS.get(Number(fs.statfsSync(d).type));
  } catch {
    return undefined;
  }
}

/**
 * A journal that would not survive a reboot: refused where it is only the default beside a block device (in
 * /dev, which is memory: the README's `--image db=/dev/vdb` example led there), warned of where it was asked for.
 */
function checkJournalHome(opts: ServeOptions, img: ServeImage, dir: string, log: Logger): void {
  const kind = memoryFs(dir);
  if (!kind) return;
  const defaultByDevice = opts.journal === undefined && fs.statSync(img.path, { throwIfNoEntry: false })?.isBlockDevice();
  if (defaultByDevice && fs.existsSync(path.join(dir, 'journal.mdb'))) {
    // Made there by a version before this check: a new journal elsewhere would be another volume to every replica
    // (found by a review helper), so it is used, and the way to move it is said.
    log.warn(
      { volume: img.name, journal: dir, fs: kind },
      `the journal ${dir} is on ${kind} (memory) and is lost at the next reboot: stop serve, move the directory to a disk (mv ${dir} /var/lib/blockferry/${img.name}.journal) and serve with --journal at its new place`,
    );
    return;
  }
  if (defaultByDevice) {
    throw new UsageError(
      `--image ${img.path} is a block device, and its journal would go beside it in ${dir}, on ${kind} (memory): lost at the next reboot. ` +
        'Pass --journal DIR on a disk that keeps it (not the volume itself)',
    );
  }
  log.warn({ volume: img.name, journal: dir, fs: kind }, `the journal ${dir} is on ${kind} (memory): it is lost at a reboot, and with it crash recovery and the replicas' place in the stream`);
}

async function openVolume(opts: ServeOptions, img: ServeImage, log: Logger): Promise<ServedVolume> {
  // Written without its journal, the image would part from the journal and from every replica of it, which
  // would then report themselves caught up (the next journaled serve knows nothing of those writes).
  if (opts.journal === false && !opts.readOnly && fs.existsSync(`${img.path}.journal`)) {
    throw new BlockferryError(
      'ERR_IMAGE_HAS_JOURNAL',
      `image ${img.path} has a journal (${img.path}.journal): written with --no-journal it would differ from that journal and from its replicas unnoticed. ` +
        'Serve it with its journal, or --read-only; or move the journal away first (its replicas then need a new volume name)',
    );
  }
  const dir = journalDirFor(opts, img);
  if (dir) checkJournalHome(opts, img, dir, log);
  const imageIsNew = !fs.existsSync(img.path);
  const file = await FileDevice.open({ path: img.path, size: opts.size, readOnly: opts.readOnly, lock: opts.readOnly ? 'shared' : 'exclusive' });
  let promotedAt: string | undefined;
  try {
    if (!opts.readOnly) promotedAt = refuseUnpromotedReplica(img.path);
  } catch (err) {
    await file.close();
    throw err;
  }
  if (!dir) return { name: img.name, path: img.path, device: file, replicators: [] };
  let journal: Journal | undefined;
  const journalIsNew = !fs.existsSync(dir);
  try {
    // The journal lets go (replicas onto their bitmaps) before its disk is down to --min-free, where writes
    // would be refused.
    // Not with --keep-journal: kept entries are its point (an audit trail, replay-local from a base), and a disk
    // that cannot hold them refuses writes (ENOSPC) rather than lose them.
    const keepFree = opts.minFree && !opts.keepJournal ? opts.minFree + Math.max(16 * 2 ** 20, opts.minFree) : 0;
    journal = await Journal.open({ dir, maxBytes: opts.journalMax, durability: opts.durability, keep: opts.keepJournal, writeMap: opts.journalWriteMap, keepFree, guardReserve: opts.minFree ?? 0, lock: true, logger: log });
    let volumeId = journal.getMeta<string>('volumeId');
    await claimImage(img, dir, journal, { journalIsNew: !volumeId, imageIsNew, moved: opts.imageMoved ?? false });
    if (promotedAt) await claimPromotion(img, dir, journal, { journalIsNew: !volumeId, promotedAt });
    if (!volumeId) {
      volumeId = randomUUID();
      await journal.setMeta('volumeId', volumeId);
      // A new journal for an image created just now holds every change since all zeroes: a new replica needs
      // only the journal. Any other image's existing contents reach replicas by digest comparison.
      await journal.setMeta('fromEmpty', imageIsNew && journal.stats.headSeq === 0);
    }
    await checkImageSize(img, dir, journal, file.size, log);
    // The image's filesystem matters only for a file (holes fill up); a block device has its size.
    const spacePaths = file.isBlockDevice ? [dir] : [dir, img.path];
    const mirror = await MirrorDevice.open({
      device: file,
      journal,
      logger: log,
      space: opts.minFree ? { paths: spacePaths, reserveBytes: opts.minFree } : undefined,
    });
    if (mirror.recovery.entries > 0) {
      log.warn({ volume: img.name, ...mirror.recovery }, 'the last run did not stop cleanly; re-applied the journal tail');
    }
    // A replica no longer named by --replicate-to must not hold the journal's retention forever.
    const consumerIds = new Set((opts.replicateTo ?? []).map((url) => Replicator.consumerIdFor(url, img.name)));
    for (const c of journal.consumers()) {
      if (c.id.startsWith('replica:') && !consumerIds.has(c.id)) {
        log.info({ volume: img.name, consumer: c.id, ackedSeq: c.ackedSeq }, 'forgetting a replica no longer in --replicate-to');
        journal.removeConsumer(c.id);
        for (const key of Replicator.metaKeysFor(c.id)) await journal.setMeta(key, undefined);
      }
    }
    const replicators = (opts.replicateTo ?? []).map(
      (url) =>
        new Replicator({
          url,
          volume: img.name,
          volumeId: volumeId!,
          size: file.size,
          journal: journal!,
          source: mirror,
          journalFromEmpty: journal!.getMeta<boolean>('fromEmpty') === true,
          maxRate: opts.maxRate,
          token: opts.tokenFile ? tokenFor(opts.tokenFile, img.name) : undefined,
          tls: opts.replicaCa || opts.replicaFingerprint ? clientTls({ ca: opts.replicaCa, fingerprint: opts.replicaFingerprint }) : undefined,
          compress: opts.compress,
          logger: log,
        }),
    );
    return { name: img.name, path: img.path, device: mirror, journal, mirror, volumeId, replicators };
  } catch (err) {
    await journal?.close().catch(() => undefined);
    await file.close().catch(() => undefined);
    // An image made just now is not left behind when its volume cannot open (a journal that refused it, or one
    // in use): the next serve would take it for an existing image. Nor a journal made just now for it, which
    // would refuse the image the next serve makes (it was claimed for this one).
    if (imageIsNew) fs.rmSync(img.path, { force: true });
    if (imageIsNew && journalIsNew) fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/**
 * A replica image in a replayer's data directory (DIR/V.img beside DIR/V.state.mdb) is written by its primary
 * only: served and written before `promote` marks it, it would differ from the primary while its replayer
 * state still says it holds the primary's seq N, and the next replication would go on from N as if it did.
 * Returns when a promoted one was promoted (see claimPromotion).
 */
function refuseUnpromotedReplica(image: string): string | undefined {
  if (!image.endsWith('.img')) return undefined;
  const statePath = `${image.slice(0, -'.img'.length)}.state.mdb`;
  if (!fs.existsSync(statePath)) return undefined;
  let state: VolumeState | undefined;
  const db = openLmdb({ path: statePath, readOnly: true });
  try {
    state = db.get('state') as VolumeState | undefined;
  } finally {
    void db.close();
  }
  if (state && !state.promoted) {
    throw new BlockferryError(
      'ERR_IMAGE_IS_REPLICA',
      `${image} is a replica (its replayer state ${statePath} is beside it) and was not promoted: written here it would part from its primary unnoticed. ` +
        'Promote it first (blockferry promote --data-dir DIR --volume NAME, with its replayer stopped), or serve it --read-only',
    );
  }
  return state?.promoted?.at;
}

/**
 * A promoted replica is served with a journal begun after its promotion. An older one was written for this file
 * before it became a replica (a failback: `demote` moves the default IMAGE.journal aside, but cannot know one kept
 * elsewhere with --journal DIR): its entries describe the image as it was, and recovery would re-apply its tail
 * over what the replica received since. The journal records the promotion it was begun after.
 */
async function claimPromotion(img: ServeImage, dir: string, journal: Journal, how: { journalIsNew: boolean; promotedAt: string }): Promise<void> {
  const known = journal.getMeta<string>('promotedAt');
  if (known === how.promotedAt) return;
  // A journal from a version that did not record its promotion is its own if its file was made after it.
  const madeAt = Number(fs.statSync(path.join(dir, 'journal.mdb'), { bigint: true }).birthtimeNs / 1_000_000n);
  const begunAfter = known === undefined && madeAt > 0 && madeAt > Date.parse(how.promotedAt);
  if (!how.journalIsNew && !begunAfter) {
    throw new BlockferryError(
      'ERR_JOURNAL_STALE',
      `journal ${dir} was written before ${img.path} was promoted (${how.promotedAt}${known ? `; the journal follows the promotion of ${known}` : ''}): ` +
        'it describes the image as it was before it became a replica, and its tail would be replayed over what the replica received. ' +
        'Move that journal aside (serve then starts a new one)',
    );
  }
  await journal.setMeta('promotedAt', how.promotedAt);
}

/** Which file an image is (see imageIdentity): inode (a string, as it may pass 2^53) and birth time in us. */
interface ImageIdentity {
  ino: string;
  birth: number;
}

/**
 * Which file an image is, as far as its journal can tell: its inode and birth time (a file deleted and made
 * again, or another file put in its place, differs in one of them, while a reboot changes neither). Not the
 * device number, which may change across reboots (device-mapper); none for a block device, whose node may be
 * renumbered and which cannot be made anew by serve.
 */
function imageIdentity(img: ServeImage): ImageIdentity | undefined {
  const st = fs.statSync(img.path, { bigint: true });
  if (st.isBlockDevice()) return undefined;
  return { ino: st.ino.toString(), birth: Number(st.birthtimeNs / 1000n) }; // microseconds
}

/**
 * A journal's entries, checkpoint and replicas' positions describe the image it was written for. Served with a
 * new image (made just now) or another file, recovery would re-apply its tail onto unrelated bytes and every
 * replica would go on as if it matched: refused, with what to do. Otherwise the image's identity is recorded
 * in the journal (when it is not what is recorded: a new journal, one from before identities, a moved image).
 */
async function claimImage(img: ServeImage, dir: string, journal: Journal, how: { journalIsNew: boolean; imageIsNew: boolean; moved: boolean }): Promise<void> {
  const known = journal.getMeta<ImageIdentity>('image');
  const now = imageIdentity(img);
  const same = !!known && !!now && known.ino === now.ino && known.birth === now.birth;
  if (!how.journalIsNew) {
    const what = `journal ${dir} was written for an earlier image ${img.path}: its entries and its replicas' positions describe that image`;
    const remedy = `restore that image, or move the journal away to start a new one (its replicas then need a new volume name, or their replica removed)`;
    if (how.imageIsNew) throw new BlockferryError('ERR_IMAGE_CHANGED', `image ${img.path} did not exist and was made new, but ${what}; ${remedy}`);
    if (known && now && !same && !how.moved) {
      throw new BlockferryError(
        'ERR_IMAGE_CHANGED',
        `image ${img.path} is not the file its journal was written for (inode ${now.ino} made ${when(now.birth)}, not inode ${known.ino} made ${when(known.birth)}): ${what}; ` +
          `if the image was moved or copied together with its journal, pass --image-moved; otherwise ${remedy}`,
      );
    }
  }
  if (now && !same) await journal.setMeta('image', now);
}

/**
 * The image's size against the size it was last served with (journal meta `imageSize`). Smaller is refused:
 * a truncated file or a shrunk device has lost the bytes past its end, which the journal's entries and every
 * replica still hold. Larger is a grown volume: each replica grows and compares the new region by digests
 * when it next connects (Replicator.markGrown).
 */
async function checkImageSize(img: ServeImage, dir: string, journal: Journal, size: number, log: Logger): Promise<void> {
  const known = journal.getMeta<number>('imageSize');
  if (typeof known === 'number' && size < known) {
    throw new BlockferryError(
      'ERR_IMAGE_SHRUNK',
      `image ${img.path} is ${size} bytes, but was ${known} when journal ${dir} last served it: it was truncated or shrunk, and the bytes past its end are lost to it while its journal and replicas hold them. ` +
        'Restore the image (a replica has it: README, failover), or grow it back to its size; blockferry does not shrink volumes',
    );
  }
  if (typeof known === 'number' && size > known) {
    const replicas = journal.consumers().filter((c) => c.id.startsWith('replica:'));
    for (const c of replicas) await Replicator.markGrown(journal, c.id, known);
    // The journal no longer covers the whole image from zeroes: a replica added later compares it all.
    if (journal.getMeta<boolean>('fromEmpty')) await journal.setMeta('fromEmpty', false);
    log.warn({ volume: img.name, fromBytes: known, toBytes: size, replicas: replicas.length }, 'the volume grew: each replica grows to match and compares the new region by digests when it connects');
  }
  if (known !== size) await journal.setMeta('imageSize', size);
}

/** A birth time in microseconds, for people. */
function when(birthUs: number): string {
  return birthUs > 0 ? new Date(Math.floor(birthUs / 1000)).toISOString() : 'at an unknown time';
}

export async function startServe(opts: ServeOptions): Promise<ServeHandle> {
  const log = opts.logger ?? createLogger();
  const names = new Set<string>();
  const files = new Map<string, string>(); // device:inode -> export name
  for (const img of opts.images) {
    if (names.has(img.name)) throw new UsageError(`two images are named "${img.name}"; name them with --image NAME=PATH`);
    names.add(img.name);
    // One file under two names would be two writers of it, each with its own journal (and its lock refuses it).
    const st = fs.statSync(img.path, { throwIfNoEntry: false });
    const id = st && `${st.dev}:${st.ino}`;
    if (id && files.has(id)) throw new UsageError(`--image ${img.name}=${img.path} is the image exported as "${files.get(id)}" already; export each image once`);
    if (id) files.set(id, img.name);
  }
  const volumes: ServedVolume[] = [];
  try {
    for (const img of opts.images) volumes.push(await openVolume(opts, img, log));
  } catch (err) {
    await closeVolumes(volumes);
    throw err;
  }
  for (const v of volumes) v.meter = new WriteMeter(v.device);
  const server = new NbdServer({
    logger: log,
    tls: opts.tls,
    exports: volumes.map((v) => ({
      name: v.name,
      description: `blockferry volume ${v.name}${v.journal ? ' (journaled)' : ''}`,
      device: v.meter ?? v.device,
      readOnly: opts.readOnly,
    })),
  });
  if (opts.replicateTo?.length && volumes.every((v) => !v.journal)) {
    await closeVolumes(volumes);
    throw new UsageError('--replicate-to needs the journal: drop --no-journal / --read-only');
  }
  for (const v of volumes) for (const r of v.replicators) r.start();
  const uris: string[] = [];
  // nbds: clients that should use TLS (with --tls=on plain nbd:// is still accepted).
  const scheme = server.tlsMode === 'off' ? 'nbd' : 'nbds';
  try {
    if (opts.socket) {
      await server.listen({ path: opts.socket });
      for (const v of volumes) uris.push(`${scheme}+unix:///${v.name}?socket=${opts.socket}`);
    }
    if (opts.listen || !opts.socket) {
      const where = opts.listen ?? { host: '127.0.0.1', port: 10809 };
      if (!isLoopback(where.host) && server.tlsMode !== 'require') warnPlainText(log, where.host, server.tlsMode);
      const addr = await server.listen(where);
      const host = (addr.host ?? where.host).includes(':') ? `[${addr.host ?? where.host}]` : (addr.host ?? where.host);
      for (const v of volumes) uris.push(`${scheme}://${host}:${addr.port}/${v.name}`);
    }
  } catch (err) {
    await server.close({ graceMs: 0 }).catch(() => undefined);
    await closeVolumes(volumes);
    throw err;
  }

  let closing: Promise<void> | undefined;
  return {
    volumes,
    uris,
    status: () => serveStatus(volumes),
    close: () =>
      (closing ??= (async () => {
        await server.close({ graceMs: SHUTDOWN_GRACE_MS });
        // Give replicas a bounded time to take what is journaled; what they miss is resent on reconnect.
        await Promise.all(volumes.flatMap((v) => v.replicators.map((r) => r.stop(REPLICATION_DRAIN_MS))));
        await closeVolumes(volumes);
      })()),
  };
}

/** Loud on purpose: in the log and as a plain line on stderr, which a JSON log pipeline might not show. */
function warnPlainText(log: Logger, host: string, mode: 'off' | 'on'): void {
  const why =
    mode === 'off'
      ? 'NBD is listening beyond loopback without TLS: anyone who can reach this port can read and write the disk'
      : 'NBD is listening beyond loopback with --tls=on, which still serves clients that do not start TLS: use --tls=require';
  log.warn({ host }, why);
  process.stderr.write(`WARNING: ${why} (${host})\n`);
}

async function closeVolumes(volumes: ServedVolume[]): Promise<void> {
  for (const v of volumes) {
    v.meter?.stop();
    for (const r of v.replicators) await r.stop(0);
    // The mirror closes the image it wraps after draining and checkpointing.
    await v.device.close().catch(() => undefined);
    await v.journal?.close().catch(() => undefined);
  }
}

function volumeStatus(v: ServedVolume): ServeVolumeStatus {
  const j = v.journal?.stats;
  return {
    volume: v.name,
    volumeId: v.volumeId ?? null,
    image: v.path,
    size: v.device.size,
    journal: j
      ? {
          headSeq: j.headSeq,
          committedSeq: j.committedSeq,
          tailSeq: j.tailSeq,
          ackedSeq: j.ackedSeq,
          checkpointSeq: j.checkpointSeq,
          appliedSeq: v.mirror?.appliedSeq ?? null,
          entries: j.entries,
          bytes: j.bytes,
          maxBytes: j.maxBytes,
          capBytes: j.capBytes,
        }
      : null,
    writes: v.meter?.status() ?? null,
    writesRefused: v.mirror?.spaceRefusal ? { ...v.mirror.spaceRefusal } : null,
    failure: (v.mirror?.failure ?? v.journal?.failed)?.message ?? null,
    replicas: v.replicators.map((r) => r.status()),
  };
}

export function serveStatus(volumes: ServedVolume[]): ServeStatusBody {
  const all = volumes.map(volumeStatus);
  return { volumes: all, writes: sumThroughput(all.map((v) => v.writes)) };
}

interface ServeArgs {
  image: string[];
  size?: string;
  listen?: string;
  socket?: string;
  'read-only': boolean;
  journal?: string | boolean;
  'journal-max': string;
  'keep-journal': boolean;
  'journal-write-map': boolean;
  'image-moved': boolean;
  durability: 'sync' | 'commit';
  'replicate-to'?: string[];
  'max-rate'?: string;
  'min-free': string;
  'token-file'?: string;
  'replica-ca'?: string;
  'replica-fingerprint'?: string;
  tls?: string;
  'tls-cert'?: string;
  'tls-key'?: string;
  'tls-ca'?: string;
  compress: boolean;
  admin?: string;
  'log-level'?: string;
}

export const command: CommandModule<object, ServeArgs> = {
  command: 'serve',
  describe: 'Serve images over NBD, journaling every write (the primary site)',
  builder: (y: Argv) =>
    y
      .option('image', {
        type: 'string',
        array: true,
        demandOption: true,
        describe: 'Image file or block device to serve; NAME=PATH names the export (repeat for several exports)',
      })
      .option('size', { type: 'string', describe: 'Create a sparse image of this size if PATH does not exist (e.g. 10G)' })
      .option('listen', { type: 'string', describe: 'TCP address to listen on [default: 127.0.0.1:10809]' })
      .option('socket', { type: 'string', describe: 'Unix socket path to listen on (instead of TCP unless --listen is given too)' })
      .option('read-only', { type: 'boolean', default: false, describe: 'Refuse writes (no journal is opened)' })
      .option('journal', {
        describe: 'Journal directory (LMDB) [default: IMAGE.journal beside the image]; --no-journal serves without one',
      })
      .option('min-free', { type: 'string', default: '64M', describe: "Free space kept on the journal's and image's filesystems: below it writes get ENOSPC (nothing is journaled) until space returns; 0 disables" })
      .option('journal-max', { type: 'string', default: DEFAULT_JOURNAL_MAX, describe: 'Journal size cap; writes wait for space beyond it' })
      .option('keep-journal', {
        type: 'boolean',
        default: false,
        describe: 'Keep journal entries until --journal-max needs room (for replay-local and audits) instead of pruning them once the image and every replica have them',
      })
      .option('journal-write-map', {
        type: 'boolean',
        default: false,
        describe: "Store the journal through LMDB's write map (one copy of each write instead of two, but page faults; measured slower on Linux 6.18)",
      })
      .option('image-moved', {
        type: 'boolean',
        default: false,
        describe: 'The image file was moved or copied together with its journal: serve it with that journal (otherwise a journal refuses an image file other than its own)',
      })
      .option('durability', {
        choices: ['sync', 'commit'] as const,
        default: 'commit' as const,
        describe: 'commit: writes of one loop turn committed together (OS cache) before the image changes, fsynced on FLUSH/FUA; sync: every commit fsynced first (power-cut safe at every instant, slower)',
      })
      .option('replicate-to', { type: 'string', array: true, describe: 'Ship the journal to a replayer (ws://HOST:PORT); repeat for several sites' })
      .option('max-rate', { type: 'string', describe: 'Limit each replication link, e.g. 50MB/s (0: no limit) [default: unlimited]' })
      .option('token-file', { type: 'string', describe: 'Tokens for the replayers: lines of "VOLUME TOKEN" (the same file format as replay --token-file)' })
      .option('replica-ca', { type: 'string', describe: 'For wss:// replayers: trust this CA (PEM)' })
      .option('replica-fingerprint', { type: 'string', describe: "For wss:// replayers: pin the replayer certificate's SHA-256 fingerprint" })
      .option('tls', {
        type: 'string',
        choices: ['off', 'on', 'require'],
        describe: 'NBD over TLS (STARTTLS): on lets clients upgrade, require serves nothing in plain text [default: on with --tls-cert, else off]',
      })
      .option('tls-cert', { type: 'string', describe: "NBD TLS: the server's certificate (PEM), with --tls-key" })
      .option('tls-key', { type: 'string', describe: 'NBD TLS: the private key (PEM) for --tls-cert' })
      .option('tls-ca', { type: 'string', describe: 'NBD TLS: require client certificates issued by this CA (PEM)' })
      .option('compress', { type: 'boolean', default: false, describe: 'Compress the replication link (permessage-deflate): for slow links and compressible data' })
      .option('admin', ADMIN_OPTION)
      .option('log-level', { type: 'string', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'], describe: 'How much to log [default: info, or $BLOCKFERRY_LOG]' })
      .example('$0 serve --image disk.img --size 10G --replicate-to ws://backup:7070', 'serve and replicate to a backup site')
      .example('$0 serve --image disk.img --replicate-to ws://backup:7070 --admin 127.0.0.1:9101', 'with status at http://127.0.0.1:9101/ (page, /status, /metrics)')
      .example('$0 serve --image disk.img --size 10G', 'serve a new 10 GiB sparse image on 127.0.0.1:10809 as export "disk"')
      .example('$0 serve --image a=/srv/a.img --image b=/dev/vdb --listen 127.0.0.1:10809', 'two exports from one server')
      .example('$0 serve --image disk.img --tls=require --tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem', 'NBD over TLS only, clients need a certificate from ca-cert.pem')
      .example('nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk', 'attach it with the Linux kernel client') as Argv<ServeArgs>,
  handler: async (args) => {
    const log = createLogger({ level: args['log-level'] });
    const journal = args.journal === false ? false : typeof args.journal === 'string' ? args.journal : undefined;
    const tls = loadNbdTls({ tls: args.tls, cert: args['tls-cert'], key: args['tls-key'], ca: args['tls-ca'] });
    const handle = await startServe({
      images: args.image.map(parseImageArg),
      size: args.size === undefined ? undefined : parseSize(args.size, '--size'),
      listen: args.listen ? parseHostPort(args.listen, '--listen') : undefined,
      socket: args.socket,
      readOnly: args['read-only'],
      journal,
      journalMax: parseSize(args['journal-max'], '--journal-max'),
      keepJournal: args['keep-journal'],
      journalWriteMap: args['journal-write-map'],
      imageMoved: args['image-moved'],
      durability: args.durability,
      replicateTo: args['replicate-to'],
      maxRate: args['max-rate'] === undefined ? undefined : parseRate(args['max-rate'], '--max-rate'),
      compress: args.compress,
      minFree: parseSize(args['min-free'], '--min-free'),
      tokenFile: args['token-file'],
      replicaCa: args['replica-ca'],
      replicaFingerprint: args['replica-fingerprint'],
      tls,
      logger: log,
    });
    // Printed before the `listening on` lines, so whoever waits for those knows the admin address too.
    let admin: AdminServer | undefined;
    if (args.admin) {
      try {
        admin = await startAdminFromFlag(args.admin, { role: 'serve', status: () => handle.status() }, log);
      } catch (err) {
        await handle.close();
        throw err;
      }
    }
    for (const uri of handle.uris) process.stdout.write(`listening on ${uri}\n`);
    const first = handle.volumes[0];
    const tcp = handle.uris.find((u) => u.startsWith('nbd://'));
    if (tcp) {
      const u = new URL(tcp);
      process.stdout.write(
        `attach with the kernel client: nbd-client ${u.hostname.replace(/^\[|\]$/g, '')} ${u.port} /dev/nbd0 -N ${first.name}` +
          `   (${formatBytes(first.device.size)}${first.journal ? ', journaled' : ''})\n`,
      );
    }
    await waitForSignals(log, async () => {
      await admin?.close();
      // A volume whose image failed to apply an entry stops like the others, but not as "stopped cleanly":
      // its restart has recovery to do, and whoever runs serve (a unit manager, a script) is told by the status.
      const failed = handle.volumes.flatMap((v) => (v.mirror?.failure ? [`${v.name}: ${v.mirror.failure.message}`] : []));
      await handle.close();
      if (failed.length > 0) throw new BlockferryError('EIO', `stopped, but ${failed.length === 1 ? 'a volume had' : `${failed.length} volumes had`} failed: ${failed.join('; ')}`);
    });
  },
};

/** First SIGINT/SIGTERM: graceful close. A second one: exit at once (journal commits are already ordered). */
export function waitForSignals(log: Logger, close: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (sig: NodeJS.Signals) => {
      if (stopping) {
        log.warn({ signal: sig }, 'second signal: exiting now');
        process.exit(130);
      }
      stopping = true;
      log.info({ signal: sig }, 'stopping: finishing in-flight requests, flushing journal and image');
      close().then(
        () => {
          log.info('stopped cleanly');
          resolve();
          process.exit(0);
        },
        (err) => {
          log.error({ err }, 'error while stopping');
          process.exit(1);
        },
      );
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
