// The backup site: a WebSocket server holding any number of volumes. Per batch of entries it verifies every
// CRC, applies strictly in seq order, then acknowledges what is applied and what is durable (below).
// Duplicates (seq <= applied) are ignored, so re-sent entries after a reconnect are harmless; a gap or a
// corrupt entry is refused with a close code and nothing of it is applied.
//
// Durability follows the primary's FLUSHes, as a disk's does: entries are applied in seq order to the page
// cache and acknowledged as applied at once; at every FLUSH marker the replica image is fsynced and the applied
// seq recorded before anything after the marker is applied. So after a SIGKILL the replica holds a prefix of the
// stream, and after a power cut it holds everything up to its last recorded FLUSH plus some of what followed:
// the same crash-consistency a disk gives the primary. Between FLUSHes a background sync (each second, or
// every 256 MiB, while applying goes on) makes the applied seq durable too; only durable seqs let the primary
// prune its journal.
//
// Resync: a replica that is new or missed entries the journal no longer has is inconsistent (consistentFrom
// -1) until the primary has compared chunk digests, shipped the differing chunks and said `synced`.
import fs from 'node:fs';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import type { RootDatabase } from 'lmdb';
import { openLmdb } from '../util/lmdb-open.js';
import { WebSocketServer, type WebSocket } from 'ws';
import type { ReplayStatusBody, ReplayVolumeStatus } from '../admin/status-types.js';
import { FileDevice } from '../device/file-device.js';
import { decodeValue, verifyEntry } from '../journal/entry.js';
import { EntryKind, type JournalEntry } from '../journal/types.js';
import { applyEntry } from '../mirror/mirror-device.js';
import { chunkCount, hashChunks } from '../replicator/chunk-hash.js';
import { lockDataDir, makeDataDir, unlockDataDir } from './data-dir-lock.js';
import { RECEIVED, adoptFrameReader, releaseFrame } from './frame-reader.js';
import { checkToken, type TokenTable } from '../replicator/link-auth.js';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { silentLogger, type Logger } from '../util/logger.js';
import { BlockferryError } from '../util/errors.js';
import { CloseCode, FEATURE_RECORDS, MAX_APPLIED_CRCS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode, type Message } from '../replicator/protocol.js';

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const STATE_FILE = /^(.+)\.state\.mdb$/;

export interface VolumeState {
  appliedSeq: number;
  /**
   * CRC32Cs of the last applied entries (at most MAX_APPLIED_CRCS, gap-free, the last one at appliedSeq); null
   * or absent: not known (a state from before they were kept, or after a resync began).
   */
  appliedCrcs?: number[] | null;
  volumeId: string | null;
  size: number;
  /**
   * null (or absent, in states written before resync existed): consistent. -1: inconsistent (new, or a resync
   * is under way). N >= 0: consistent once the entries through seq N are applied.
   */
  consistentFrom?: number | null;
  /** Set by `blockferry promote`: this replica became a primary and accepts no more replication. */
  promoted?: { at: string; appliedSeq: number } | null;
  /**
   * The image held data before anything was shipped to it: set by `blockferry demote`, and when a replica's
   * state is made for an image already in place. Absent: the replayer made the image, all zeroes.
   */
  seeded?: boolean;
}

/** Whether a replica in this state is a consistent earlier state of its primary (see consistentFrom). */
export function isConsistent(state: Pick<VolumeState, 'consistentFrom'>): boolean {
  return state.consistentFrom === null || state.consistentFrom === undefined;
}

class Volume {
  /** The connected primary's link: one at a time, and only its own close frees the volume. */
  owner: WebSocket | undefined;
  get busy(): boolean {
    return this.owner !== undefined;
  }
  /** Address of the connected primary (admin status). */
  peer: string | null = null;
  /** When a batch was last applied, ms since the epoch (admin status). */
  lastApplyAt: number | null = null;
  private constructor(
    readonly name: string,
    readonly device: FileDevice,
    private readonly db: RootDatabase,
    public state: VolumeState,
  ) {}

  static async open(dir: string, name: string, size: number, log?: Logger): Promise<Volume> {
    // Under the data directory's lock: a lock file with holes (left by a crash) may be replaced.
    const db = openLmdb<unknown, string>({ path: path.join(dir, `${name}.state.mdb`) }, true);
    try {
      const image = path.join(dir, `${name}.img`);
      const imageExists = fs.existsSync(image);
      const stored = db.get('state') as VolumeState | undefined;
      // A stored state no primary has claimed yet was written by demote (a hello records its volume before the
      // first sync), also by a demote from before `seeded` existed: the image holds the old primary's data.
      if (stored && stored.volumeId === null && stored.appliedSeq === 0 && !stored.promoted) stored.seeded = true;
      if (stored && !imageExists) {
        // The image is gone (deleted, or its disk replaced) but the state still says what it held: a new image
        // would be all zeroes, and taken as that state it was reported consistent and `continuous` while it
        // held none of the primary's data. It starts over as a new replica of the same volume instead.
        if (stored.promoted) throw new BlockferryError('ERR_STORAGE', `volume ${name} was promoted, but its image ${image} is missing`);
        log?.error({ volume: name, appliedSeq: stored.appliedSeq }, `volume ${name}: the replica image ${image} is missing, though its state says seq ${stored.appliedSeq} was applied: starting it over as a new replica (the primary sends it everything)`);
        stored.appliedSeq = 0;
        stored.appliedCrcs = null;
        stored.consistentFrom = -1;
        stored.seeded = false;
        // Recorded before the new image exists: a crash in between must not leave that image beside the old state.
        db.putSync('state', stored);
      }
      // An image without a state is not known to be zeroes (put there by hand, or its state file was removed).
      const state = stored ?? { appliedSeq: 0, volumeId: null, size, consistentFrom: -1, ...(imageExists ? { seeded: true } : {}) };
      // Locked while open, as serve locks its images: a `serve` of the replica image started by mistake while
      // the replayer writes it is refused instead of writing beside it. Not a promoted volume's: the replayer
      // never writes it again, and its new primary serves it while old primaries are told it was promoted.
      const lock = state.promoted ? undefined : 'exclusive';
      const device = await FileDevice.open({ path: image, size: imageExists ? undefined : size, writePiece: REPLICA_WRITE_PIECE, lock });
      return new Volume(name, device, db, state);
    } catch (err) {
      await db.close();
      throw err;
    }
  }

  /** Highest seq whose entries, and all before it, are on stable storage with the state recording it. */
  durableSeq = 0;
  /** Bytes applied since the last sync. */
  unsyncedBytes = 0;
  /** Told when durableSeq moves (the connected primary's ack). */
  onDurable: ((seq: number) => void) | undefined;
  /** Told when a background sync fails (the connected primary's link is dropped for it). */
  onSyncFailure: ((err: Error) => void) | undefined;
  private syncing: Promise<void> | undefined;
  timer: NodeJS.Timeout | undefined;

  get consistent(): boolean {
    return isConsistent(this.state);
  }

  /** A replica waiting for seq N becomes consistent once it has applied N. */
  markApplied(): void {
    const from = this.state.consistentFrom;
    if (from !== null && from !== undefined && from >= 0 && this.state.appliedSeq >= from) this.state.consistentFrom = null;
  }

  /**
   * What a sync failed with, awaited (a FLUSH marker, a resync, a new volume's first state) or started in the
   * background: the connected primary's link is dropped for it (at once, and by the next batch if one is in
   * hand), nothing more is made durable, and the next primary to connect finds the volume opened again at its
   * last durable seq. Kept for an awaited one too: its caller drops the link, but the timer's next sync would
   * otherwise succeed and record as durable an applied seq whose pages the failed fsync may have lost.
   */
  syncFailure: Error | undefined;

  /** Starts a sync without waiting for it. A failure is logged and kept (syncFailure), and the link dropped. */
  syncInBackground(log: Logger): void {
    this.sync().catch((err: Error) => {
      log.error({ err, volume: this.name }, 'syncing the replica failed');
      this.onSyncFailure?.(err);
    });
  }

  /** Resolves once no sync is running (whatever their outcome). */
  async syncsSettled(): Promise<void> {
    while (this.syncing) await this.syncing.catch(() => undefined);
  }

  /**
   * The primary's volume grew (its image was extended and served again): the replica grows to match, durably
   * (the file and the state's size, by sync). Nothing applied refers past the old end, but the new region reads
   * as zeroes here where the primary's may hold anything: the replica is not consistent (consistentFrom -1)
   * until the primary has compared that region by digests and said `synced` (a primary that died before would
   * otherwise leave a replica promotable as consistent with zeroes there; found by a review helper). A primary
   * that does not know the volume grew (no record of the old size) then compares every chunk.
   */
  async grow(size: number): Promise<void> {
    this.device.grow(size);
    this.state.size = size;
    this.state.consistentFrom = -1;
    await this.sync();
  }

  /** fsyncs the image, then records the state with everything applied so far; one at a time. */
  async sync(): Promise<void> {
    while (this.syncing) await this.syncing;
    // Nothing more is made durable on top of a failed sync (see syncFailure).
    if (this.syncFailure) throw this.syncFailure;
    this.syncing = (async () => {
      const seq = this.state.appliedSeq;
      // The CRC list goes on growing while the image is flushed: the snapshot keeps its own, as of seq.
      const snapshot = { ...this.state, appliedCrcs: this.state.appliedCrcs?.slice(-MAX_APPLIED_CRCS) ?? null };
      this.unsyncedBytes = 0;
      try {
        await this.device.flush();
        // Committed synchronously: a failed asynchronous put of lmdb-js also rejects promises of its own that
        // no caller holds, and the unhandled rejection ended the replayer with every volume (a state file on a
        // full or read-only disk). putSync throws instead; the fsync still runs off the loop (flushed).
        this.db.putSync('state', snapshot);
        await this.db.flushed;
      } catch (err) {
        this.syncFailure ??= err as Error;
        throw err;
      }
      this.durableSeq = seq;
      this.onDurable?.(seq);
    })();
    try {
      await this.syncing;
    } finally {
      this.syncing = undefined;
    }
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.sync().catch(() => undefined);
    await this.device.close();
    await this.db.close();
  }
}

/**
 * A replica's image is first written in 8 MiB chunks (initial sync, resync), then mostly by small entries. The
 * kernel sizes a page-cache folio by the write that creates it, and a 4 KiB write into a large folio walks all of
 * its buffer heads: measured here (6.18, ext4), a random 4 KiB pwrite into a file first written in 128 KiB
 * pieces costs 5.2 us, in 32 KiB pieces 3.3 us, while overwriting 1 GiB in either takes the same ~185 ms.
 * Smaller pieces trade large writes for small ones (fio against serve replicating, 3 s warm-up of the same job,
 * alternating pairs, 2026-12-06): 8 KiB pieces gave 29.6/31.2k against 24.3/29.0k IOPS of 4 KiB writes but
 * 555/586 against 658/635 MiB/s of 1 MiB writes, 4 KiB pieces 29.4/30.3/27.6k against 24.4/28.9/26.5k and
 * 556/584 against 620/613 MiB/s (the replayer's CPU per MiB up by a third). Kept at 32 KiB.
 */
const REPLICA_WRITE_PIECE = 32 * 1024;

/**
 * Background sync cadence while entries flow without FLUSHes: each second, or once this many bytes were applied
 * since the last sync began. The latter is started, not awaited, once the one before it is done: awaiting it
 * stopped the replica applying for 40-55% of the time at 1 MiB entries (it applied 250-340 MiB/s), and a sync
 * that was not even waited for when the next began made the replayer's CPU per MiB 70% higher. Started this
 * way, three alternating pairs of `node bench/run.mjs --only blockferry-replicated --jobs 1M-seq-write,
 * 4K-rand-write --rounds 1` gave 603/702/621 against 620/647/593 MiB/s and 29.2/26.0/27.0k against
 * 26.6/24.2/24.5k IOPS (serve's CPU per 1 MiB request 1.32-1.50 ms against 1.55-1.69, its journal retaining
 * less), and two of `node bench/replication.mjs --quick` a catch-up of 1162/984 against 801/893 MiB/s.
 * Only durable acknowledgements let the primary prune: syncing every 5 s or 2 GiB instead (fewer forced
 * writebacks of the replica) made replicated 1 MiB writes slower, 467-512 against 605-628 MiB/s in three
 * alternating fio pairs, with serve's CPU per MiB up 20% as its journal held more and reused fewer pages.
 */
const SYNC_INTERVAL_MS = 1000;
const SYNC_BYTES = 256 * 2 ** 20;
/**
 * A primary's link that has carried no bytes for this long is dead: a network partition sends no FIN or RST, and
 * without this its volume would stay busy (refusing the primary's reconnects) for as long as the kernel keeps the
 * socket. Pinged at a third of it, so a live but idle primary always answers in time; longer than the primary's own
 * 6 s ping timeout, so a dead link is normally noticed there first.
 */
const PEER_TIMEOUT_MS = 10_000;
/**
 * Bytes of a link's messages received and not yet handled before its socket is paused. The primary's window keeps
 * far less in flight; this bounds a peer that ignores it (messages are up to MAX_MESSAGE_BYTES each).
 */
const MAX_QUEUED_BYTES = MAX_MESSAGE_BYTES;
/** Bytes of replies a link may leave unread before its next message waits for them to drain (a peer's liveness). */
const MAX_UNREAD_REPLY_BYTES = 4 * 2 ** 20;

export interface ReplayServerOptions {
  dataDir: string;
  /** Per-volume tokens (--token-file): when set, only listed volumes with their token are accepted. */
  tokens?: TokenTable;
  /** PEM certificate and key: serve wss:// instead of ws://. */
  tls?: { cert: Buffer; key: Buffer };
  logger?: Logger;
  /** Bytes applied between background syncs (default SYNC_BYTES; smaller in tests). */
  syncBytes?: number;
  /** Period of the background sync (default SYNC_INTERVAL_MS; 0: none, only syncBytes and FLUSH markers; tests). */
  syncIntervalMs?: number;
}

export class ReplayServer {
  private wss: WebSocketServer | undefined;
  private server: http.Server | https.Server | undefined;
  private readonly volumes = new Map<string, Promise<Volume>>();
  /**
   * The replicas found in the data directory at start, as their state files recorded them: listed by status()
   * until a primary's hello opens them. Without these a restarted replayer reported no volumes, and `blockferry
   * status` "all well", while no primary came back to any of them (found by a review helper).
   */
  private readonly found = new Map<string, ReplayVolumeStatus>();
  private readonly log: Logger;

  constructor(private readonly opts: ReplayServerOptions) {
    this.log = (opts.logger ?? silentLogger).child({ component: 'replayer' });
    makeDataDir(opts.dataDir);
  }

  async listen(where: { host: string; port: number }): Promise<{ host: string; port: number }> {
    lockDataDir(this.opts.dataDir);
    await this.findVolumes();
    // permessage-deflate is used only when a primary asks for it (serve --compress).
    const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES, perMessageDeflate: { threshold: 1024 } });
    const plainHttp = (_req: http.IncomingMessage, res: http.ServerResponse) => {
      const body = http.STATUS_CODES[426]!;
      res.writeHead(426, { 'Content-Length': body.length, 'Content-Type': 'text/plain' });
      res.end(body);
    };
    const server = this.opts.tls ? https.createServer({ cert: this.opts.tls.cert, key: this.opts.tls.key }, plainHttp) : http.createServer(plainHttp);
    server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
      const peer = req.socket.remoteAddress ?? '?';
      // A plain link reads each batch whole into a reused buffer (frame-reader); a TLS one reads through its TLSSocket.
      const link = this.opts.tls || !(socket instanceof net.Socket) ? { socket, head } : adoptFrameReader(socket, head, MAX_MESSAGE_BYTES);
      wss.handleUpgrade(req, link.socket, link.head, (ws) => this.onConnection(ws, peer, link.socket));
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(where.port, where.host, () => resolve());
    });
    this.wss = wss;
    this.server = server;
    const a = server.address() as { address: string; port: number };
    return { host: a.address, port: a.port };
  }

  /** Reads the state of every replica in the data directory (read-only; nothing is opened for writing). */
  private async findVolumes(): Promise<void> {
    const dir = this.opts.dataDir;
    for (const file of fs.readdirSync(dir).sort()) {
      const name = STATE_FILE.exec(file)?.[1];
      if (!name || !VOLUME_NAME.test(name)) continue;
      // Empty: made by a hello that failed before its state was written (a crash, a full disk): nothing to report.
      if ((fs.statSync(path.join(dir, file), { throwIfNoEntry: false })?.size ?? 0) === 0) continue;
      const image = path.join(dir, `${name}.img`);
      const entry: ReplayVolumeStatus = {
        volume: name, size: 0, appliedSeq: 0, durableSeq: 0, connected: false, primary: null, volumeId: null,
        consistent: false, lastApplyAt: null, promoted: null,
      };
      try {
        const db = openLmdb<unknown, string>({ path: path.join(dir, file), readOnly: true });
        let state: VolumeState | undefined;
        try {
          state = db.get('state') as VolumeState | undefined;
        } finally {
          await db.close();
        }
        if (!state) continue; // made by a hello that failed before its state was written: nothing to report
        const imageStat = fs.statSync(image, { throwIfNoEntry: false });
        Object.assign(entry, {
          size: imageStat?.size ?? state.size,
          appliedSeq: state.appliedSeq,
          durableSeq: state.appliedSeq,
          volumeId: state.volumeId,
          consistent: isConsistent(state),
          promoted: state.promoted?.at ?? null,
        });
        if (!imageStat) {
          entry.problem = state.promoted
            ? `its image ${image} is missing, though it was promoted to a primary at ${state.promoted.at}`
            : `its image ${image} is missing: the primary will send everything again`;
        }
      } catch (err) {
        entry.problem = `its state file could not be read: ${(err as Error).message}`;
        this.log.warn({ err, volume: name }, `volume ${name}: its state file could not be read`);
      }
      this.found.set(name, entry);
    }
    if (this.found.size > 0) this.log.info({ volumes: [...this.found.keys()] }, `${this.found.size} replica volume(s) in the data directory`);
  }

  /** The open volume `name`, opened (once `after` has settled, when given) if it is not. */
  private volume(name: string, size: number, after?: Promise<void>): Promise<Volume> {
    let v = this.volumes.get(name);
    if (!v) {
      v = (after ?? Promise.resolve()).then(() => Volume.open(this.opts.dataDir, name, size, this.log)).then((vol) => {
        vol.durableSeq = vol.state.appliedSeq;
        const every = this.opts.syncIntervalMs ?? SYNC_INTERVAL_MS;
        if (every > 0) {
          vol.timer = setInterval(() => {
            if (vol.state.appliedSeq !== vol.durableSeq) vol.syncInBackground(this.log);
          }, every);
          vol.timer.unref();
        }
        return vol;
      });
      this.volumes.set(name, v);
      v.catch(() => this.volumes.delete(name));
    }
    return v;
  }

  private onConnection(ws: WebSocket, peer: string, socket: Duplex): void {
    const log = this.log.child({ peer });
    // Liveness counts every byte received, not whole messages: on a slow link a pong can queue behind a batch.
    let heard = Date.now();
    const onBytes = () => (heard = Date.now());
    socket.on('data', onBytes);
    socket.on(RECEIVED, onBytes);
    // Bytes of messages received and not yet handled: while there are any, a quiet socket is this side's doing
    // (paused, or busy applying), not a dead link.
    let queued = 0;
    const heartbeat = setInterval(() => {
      if (queued === 0 && Date.now() - heard > PEER_TIMEOUT_MS) {
        log.warn({ volume: vol?.name, silentMs: Date.now() - heard }, 'nothing heard from the primary: the link is dead, dropping it');
        ws.terminate();
      } else if (ws.readyState === ws.OPEN) ws.ping();
    }, PEER_TIMEOUT_MS / 3);
    heartbeat.unref();
    let vol: Volume | undefined;
    let verifier = false;
    let chain = Promise.resolve();
    const fail = (code: number, errCode: string, message: string) => {
      log.warn({ code: errCode }, message);
      if (ws.readyState === ws.OPEN) ws.send(encode({ v: PROTOCOL_VERSION, t: 'error', code: errCode, message }));
      // A close reason may be at most 123 bytes: keep it ASCII (peer input can put anything in a message).
      ws.close(code, message.replace(/[^\x20-\x7e]/g, '?').slice(0, 120));
    };
    ws.on('error', (err) => log.debug({ err }, 'socket error'));
    ws.on('close', () => {
      clearInterval(heartbeat);
      // The volume is free only once this link's message in hand is done: a batch still being applied would
      // otherwise go on moving the replica after the primary's next link was welcomed at an earlier seq. That
      // message may be the hello itself, still opening the volume: it takes the volume after the socket is
      // gone, so whether there is a volume to release is only known once the chain has run.
      const release = () => {
        if (!vol || verifier || vol.owner !== ws) return;
        vol.owner = undefined;
        vol.peer = null;
        vol.onDurable = undefined;
        vol.onSyncFailure = undefined;
      };
      void chain.then(release, release);
    });
    /** Waits while the peer leaves more than MAX_UNREAD_REPLY_BYTES of replies unread; cuts it off after PEER_TIMEOUT_MS. */
    const repliesRead = async (): Promise<void> => {
      if (ws.bufferedAmount <= MAX_UNREAD_REPLY_BYTES || ws.readyState !== ws.OPEN) return;
      const drained = await new Promise<boolean>((resolve) => {
        const done = (ok: boolean) => {
          clearTimeout(timer);
          socket.off('drain', onDrain);
          socket.off('close', onClose);
          resolve(ok);
        };
        const onDrain = () => done(true);
        const onClose = () => done(false);
        const timer = setTimeout(() => done(false), PEER_TIMEOUT_MS);
        socket.on('drain', onDrain);
        socket.on('close', onClose);
      });
      if (!drained && ws.readyState === ws.OPEN) {
        log.warn({ volume: vol?.name, unread: ws.bufferedAmount }, 'the primary reads none of its replies: dropping the link');
        ws.terminate();
      }
    };
    ws.on('message', (raw: Buffer, isBinary: boolean) => {
      // Bounded: past MAX_QUEUED_BYTES the socket is paused until handling catches up.
      queued += raw.length;
      if (queued > MAX_QUEUED_BYTES && !ws.isPaused) ws.pause();
      // Messages are handled one after another: a batch is applied and acknowledged before the next.
      chain = chain.then(async () => {
        await repliesRead();
        if (ws.readyState !== ws.OPEN) return;
        let msg: Message;
        try {
          if (!isBinary) throw new Error('text frame');
          msg = decode(raw);
        } catch (err) {
          return fail(CloseCode.PROTOCOL, 'ERR_REPLICATION_PROTOCOL', (err as Error).message);
        }
        if (!vol) {
          if (msg.t !== 'hello') return fail(CloseCode.PROTOCOL, 'ERR_REPLICATION_PROTOCOL', `expected hello, got ${msg.t}`);
          if (!VOLUME_NAME.test(msg.volume)) return fail(CloseCode.PROTOCOL, 'ERR_VOLUME_NAME', `invalid volume name ${JSON.stringify(msg.volume)}`);
          verifier = msg.role === 'verify';
          if (this.opts.tokens) {
            // Checked before the volume is opened or created; the token itself is never logged.
            const auth = checkToken(this.opts.tokens, msg.volume, msg.token);
            if (auth === 'unknown-volume') return fail(CloseCode.AUTH, 'ERR_UNKNOWN_VOLUME', `volume ${msg.volume} is not in this replayer's token file`);
            if (auth === 'bad-token') return fail(CloseCode.AUTH, 'ERR_AUTH', `the token for volume ${msg.volume} was refused`);
          }
          if (verifier && !this.volumes.has(msg.volume) && !fs.existsSync(path.join(this.opts.dataDir, `${msg.volume}.img`))) {
            return fail(CloseCode.VOLUME_MISMATCH, 'ERR_NO_VOLUME', `there is no replica of volume ${msg.volume} here`);
          }
          let v: Volume;
          try {
            const opening = this.volume(msg.volume, msg.size);
            v = await opening;
            if (!verifier && !v.busy && v.syncFailure) {
              // After a failed fsync the kernel may have marked pages clean that never reached the disk, and a
              // later fsync would not write them. The volume is opened again from what the last good sync
              // recorded, so the primary (which keeps everything not acknowledged durable) sends it all again.
              // The table names the reopening at once: a hello meanwhile waits for it, never meets the old one,
              // and only the first hello to find the failed volume closes it.
              if (this.volumes.get(msg.volume) === opening) {
                log.warn({ volume: msg.volume, appliedSeq: v.state.appliedSeq, durableSeq: v.durableSeq }, 'a sync of this replica failed: going back to its last durable seq');
                this.volumes.delete(msg.volume);
                const failed = v;
                v = await this.volume(msg.volume, msg.size, failed.close());
              } else v = await this.volume(msg.volume, msg.size);
            }
          } catch (err) {
            return fail(CloseCode.STORAGE, 'ERR_STORAGE', `cannot open volume ${msg.volume}: ${(err as Error).message}`);
          }
          if (verifier) {
            if (v.device.size !== msg.size) {
              return fail(CloseCode.VOLUME_MISMATCH, 'ERR_VOLUME_SIZE', `volume ${msg.volume} is ${v.device.size} bytes here, the image to verify is ${msg.size}`);
            }
            vol = v;
            ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: v.state.appliedSeq, consistentFrom: v.state.consistentFrom ?? null }));
            return;
          }
          if (v.state.promoted) {
            // Split brain guard: after a failover the old primary must not overwrite the new one.
            return fail(
              CloseCode.PROMOTED,
              'ERR_VOLUME_PROMOTED',
              `volume ${msg.volume} here was promoted to a primary at ${v.state.promoted.at} (seq ${v.state.promoted.appliedSeq}) and accepts no replication; ` +
                'if this primary is the stale side, demote its image and replicate the other way (README: failover and failback)',
            );
          }
          if (v.busy) return fail(CloseCode.BUSY, 'ERR_VOLUME_BUSY', `volume ${msg.volume} already has a primary connected`);
          // A larger primary grew its volume: the replica follows (below, once the primary is known to be its
          // own). A smaller one is never followed: the bytes past its end would be lost here too.
          if (v.device.size > msg.size) {
            return fail(CloseCode.VOLUME_MISMATCH, 'ERR_VOLUME_SIZE', `volume ${msg.volume} is ${v.device.size} bytes here, the primary says ${msg.size}: a replica is never shrunk`);
          }
          if (v.state.volumeId && v.state.volumeId !== msg.volumeId) {
            return fail(
              CloseCode.VOLUME_MISMATCH,
              'ERR_VOLUME_MISMATCH',
              `volume ${msg.volume} here replicates primary volume ${v.state.volumeId}, not ${msg.volumeId}; refusing to overwrite it`,
            );
          }
          if (v.device.size < msg.size) {
            const from = v.device.size;
            try {
              await v.grow(msg.size);
            } catch (err) {
              return fail(CloseCode.STORAGE, 'ERR_STORAGE', `volume ${msg.volume}: cannot grow the replica from ${from} to ${msg.size} bytes: ${(err as Error).message}`);
            }
            log.warn({ volume: msg.volume, fromBytes: from, toBytes: msg.size }, "the primary's volume grew: the replica grew to match");
            // Another hello may have come meanwhile (grow awaits): one primary at a time, of this size.
            if (v.busy) return fail(CloseCode.BUSY, 'ERR_VOLUME_BUSY', `volume ${msg.volume} already has a primary connected`);
            if (v.device.size !== msg.size) return fail(CloseCode.VOLUME_MISMATCH, 'ERR_VOLUME_SIZE', `volume ${msg.volume} is ${v.device.size} bytes here, the primary says ${msg.size}`);
          }
          // Taken before anything is awaited: a second primary's hello meanwhile is refused as busy.
          v.owner = ws;
          v.peer = peer;
          vol = v;
          if (!v.state.volumeId) {
            v.state.volumeId = msg.volumeId;
            await v.sync();
          }
          const self = v;
          v.onSyncFailure = (err) => fail(CloseCode.STORAGE, 'ERR_STORAGE', `volume ${self.name}: syncing the replica failed: ${err.message}`);
          v.onDurable = (seq) => {
            if (ws.readyState === ws.OPEN) ws.send(encode({ v: PROTOCOL_VERSION, t: 'ack', seq: self.state.appliedSeq, durableSeq: seq }));
          };
          log.info({ volume: v.name, appliedSeq: v.state.appliedSeq, consistent: v.consistent }, 'primary connected');
          ws.send(
            encode({
              v: PROTOCOL_VERSION,
              t: 'welcome',
              appliedSeq: v.state.appliedSeq,
              consistentFrom: v.state.consistentFrom ?? null,
              features: [FEATURE_RECORDS],
              appliedCrcs: v.state.appliedCrcs?.slice(-MAX_APPLIED_CRCS) ?? null,
              ...(v.state.seeded ? { seeded: true } : {}),
            }),
          );
          return;
        }
        if (msg.t === 'digests?') {
          // Computed here, in order with the batches: the digests describe the replica as of appliedSeq.
          if (msg.first >= chunkCount(vol.device.size)) return fail(CloseCode.PROTOCOL, 'ERR_REPLICATION_PROTOCOL', `chunk ${msg.first} is past the end of the volume`);
          let digests: Buffer;
          try {
            digests = await hashChunks(vol.device, msg.first, msg.count);
          } catch (err) {
            return fail(CloseCode.STORAGE, 'ERR_STORAGE', `volume ${vol.name}: reading the replica failed: ${(err as Error).message}`);
          }
          if (ws.readyState === ws.OPEN) ws.send(encode({ v: PROTOCOL_VERSION, t: 'digests', id: msg.id, first: msg.first, appliedSeq: vol.state.appliedSeq, digests }));
          return;
        }
        if (verifier) return fail(CloseCode.PROTOCOL, 'ERR_REPLICATION_PROTOCOL', `a verify connection cannot send ${msg.t}`);
        if (msg.t === 'resync') {
          // Entries before fromSeq will never arrive: from here the replica is inconsistent until `synced`.
          log.warn({ volume: vol.name, appliedSeq: vol.state.appliedSeq, fromSeq: msg.fromSeq }, 'resync: the replica is inconsistent until the primary has sent every differing chunk');
          vol.state.appliedSeq = msg.fromSeq - 1;
          vol.state.appliedCrcs = null;
          vol.state.consistentFrom = -1;
          await vol.sync();
          return;
        }
        if (msg.t === 'synced') {
          vol.state.consistentFrom = msg.seq;
          vol.markApplied();
          await vol.sync();
          log.info({ volume: vol.name, consistentFrom: msg.seq, consistent: vol.consistent }, 'resync finished on the primary');
          return;
        }
        let entries: JournalEntry[];
        if (msg.t === 'entries') entries = msg.entries;
        else if (msg.t === 'records') {
          try {
            entries = msg.records.map((r, i) => decodeValue(msg.first + i, r));
          } catch (err) {
            return fail(CloseCode.CORRUPT, 'ERR_JOURNAL_CORRUPT', `volume ${vol.name}: ${(err as Error).message}`);
          }
        } else return fail(CloseCode.PROTOCOL, 'ERR_REPLICATION_PROTOCOL', `unexpected ${msg.t}`);
        await this.applyBatch(vol, entries, fail);
        if (ws.readyState === ws.OPEN) ws.send(encode({ v: PROTOCOL_VERSION, t: 'ack', seq: vol.state.appliedSeq, durableSeq: vol.durableSeq }));
      }).catch((err: Error) => {
        // Anything a handler did not expect (a failed sync or state write): drop this link, keep serving others.
        log.error({ err }, 'handling a message failed');
        fail(CloseCode.STORAGE, 'ERR_STORAGE', `the replayer failed: ${err.message}`);
      }).finally(() => {
        releaseFrame(raw);
        queued -= raw.length;
        heard = Date.now();
        if (ws.isPaused && queued <= MAX_QUEUED_BYTES) ws.resume();
      });
    });
  }

  private async applyBatch(v: Volume, entries: JournalEntry[], fail: (c: number, code: string, m: string) => void): Promise<void> {
    // Verify the whole batch before touching the replica: a corrupt or gapped batch applies nothing.
    let expect = v.state.appliedSeq + 1;
    const todo = [];
    for (const e of entries) {
      if (e.seq < expect) continue; // a duplicate after a reconnect
      if (e.seq !== expect) return fail(CloseCode.GAP, 'ERR_SEQUENCE_GAP', `volume ${v.name}: expected seq ${expect}, got ${e.seq}`);
      try {
        verifyEntry(e);
      } catch (err) {
        return fail(CloseCode.CORRUPT, 'ERR_JOURNAL_CORRUPT', `volume ${v.name}: ${(err as Error).message}`);
      }
      if (e.offset + e.length > v.device.size && e.length > 0) {
        return fail(CloseCode.CORRUPT, 'ERR_ENTRY_RANGE', `volume ${v.name}: seq ${e.seq} reaches past the end of the volume`);
      }
      todo.push(e);
      expect++;
    }
    if (todo.length === 0) return;
    // The CRCs of the last entries applied, for the welcome's history check; the array stays the state's own
    // (sync copies it), trimmed once per batch rather than per entry.
    const crcs = (v.state.appliedCrcs ??= []);
    try {
      // Kept until the volume is opened again (see syncFailure).
      if (v.syncFailure) throw v.syncFailure;
      // Runs of small writes go to the replica in one call each (FileDevice.writeManyNow), in seq order; anything
      // else first writes the run before it. Measured (2026-12-07): 0.8-1.2 us less per 4 KiB write than one
      // fs.writeSync each (200k random writes from Node), and in five alternating pairs of `node bench/run.mjs
      // --only blockferry-replicated --jobs 4K-rand-write --rounds 1` the replayer's CPU per entry averaged
      // 14.6 against 16.5 us and the IOPS 23.7k against 22.1k (pairs ranging -7% to +33%: this machine's noise).
      const applied = (e: JournalEntry): void => {
        v.state.appliedSeq = e.seq;
        crcs.push(e.crc);
        if (e.kind === EntryKind.WRITE) v.unsyncedBytes += e.length;
      };
      const run: JournalEntry[] = [];
      const writeRun = (): void => {
        if (run.length === 0) return;
        try {
          v.device.writeManyNow(run.map((e) => e.offset), run.map((e) => e.data!));
          run.forEach(applied);
        } catch (err) {
          // Those before a failure are applied: the state says so, as it would after them one by one.
          run.slice(0, (err as { written?: number }).written ?? 0).forEach(applied);
          throw err;
        } finally {
          run.length = 0;
        }
      };
      for (const e of todo) {
        if (e.kind === EntryKind.WRITE && v.device.takesNow(e.length)) {
          run.push(e);
          continue;
        }
        writeRun();
        if (e.kind === EntryKind.FLUSH) {
          // Everything before the marker is on stable storage before anything after it is applied.
          applied(e);
          v.markApplied();
          await v.sync();
          continue;
        }
        const applying = applyEntry(v.device, e);
        if (applying) await applying;
        applied(e);
      }
      writeRun();
      v.lastApplyAt = Date.now();
      v.markApplied();
      if (v.unsyncedBytes >= (this.opts.syncBytes ?? SYNC_BYTES)) {
        // The previous sync is waited for (at most twice syncBytes unsynced), this one is not: batches go on being
        // applied while it runs (see SYNC_BYTES).
        await v.syncsSettled();
        v.syncInBackground(this.log);
      }
    } catch (err) {
      return fail(CloseCode.STORAGE, 'ERR_STORAGE', `volume ${v.name}: applying failed: ${(err as Error).message}`);
    } finally {
      // Also after a failure part-way: the list would otherwise outgrow what a welcome may carry.
      if (crcs.length > MAX_APPLIED_CRCS) crcs.splice(0, crcs.length - MAX_APPLIED_CRCS);
    }
  }

  /** Every volume in the data directory, and any this process has opened since, for the admin server's /status. */
  async status(): Promise<ReplayStatusBody> {
    const volumes: ReplayVolumeStatus[] = [];
    for (const p of this.volumes.values()) {
      const v = await p.catch(() => undefined);
      if (!v) continue;
      const { appliedSeq, volumeId } = v.state;
      volumes.push({
        volume: v.name,
        size: v.device.size,
        appliedSeq,
        durableSeq: v.durableSeq,
        connected: v.busy,
        primary: v.peer,
        volumeId,
        consistent: v.consistent,
        lastApplyAt: v.lastApplyAt,
        promoted: v.state.promoted?.at ?? null,
      });
    }
    // Replicas no primary has connected to since this process started, as found then.
    for (const [name, entry] of this.found) if (!volumes.some((v) => v.volume === name)) volumes.push(entry);
    return { volumes: volumes.sort((a, b) => a.volume.localeCompare(b.volume)) };
  }

  async close(): Promise<void> {
    if (this.wss) {
      for (const c of this.wss.clients) c.close(1001, 'replayer stopping');
      await new Promise<void>((resolve) => this.wss!.close(() => resolve()));
      if (this.server) await new Promise<void>((resolve) => this.server!.close(() => resolve()));
    }
    for (const v of this.volumes.values()) await (await v).close().catch(() => undefined);
    this.volumes.clear();
    unlockDataDir(this.opts.dataDir);
  }
}
