// Ships one volume's journal to one replica: hello → the replica's applied seq → batches from there, at most
// a window of unacknowledged bytes in flight (a replica that stops reading cannot grow our heap). Acks
// advance the journal's retention. Reconnects with exponential backoff and jitter; pings find a dead link.
//
// Resync (initial sync of a new replica, or one that missed entries the journal no longer has): shipping goes
// on as usual while a second loop walks the volume, asks the replica for chunk digests (computed in order with
// the entries it has applied), compares them with the primary's, and has the mirror append each differing
// chunk's current bytes as an ordinary entry. Those entries travel in the same ordered stream as new writes, so
// the replica ends exactly equal to the primary: a chunk whose digest matched at replica seq A and primary seq
// P >= A is equal after the replica applies (A, P], because every byte a later write touches gets that write's
// bytes and every other byte already matched.
//
// Long outage (DRBD's bitmap): when the journal reaches its cap while this replica is away and is what keeps
// the journal from pruning, the replica stops holding the journal. Every change it has not acknowledged, and
// every later one, marks its chunk in a dirty bitmap instead; writes go on. When the replica returns, the
// resync compares only the dirty chunks. The bitmap is saved in the journal's meta with the seq it covers
// through, and only then does the replica's hold on the journal move up to that seq: whatever a crash loses
// from the bitmap is still in the journal, so after a restart the returning replica is again compared over
// its dirty chunks only (as DRBD keeps its bitmap in on-disk metadata).
import WebSocket from 'ws';
import type { ReplicaState, ReplicaStatus } from '../admin/status-types.js';
import type { ChangeListener, Journal } from '../journal/journal.js';
import { EntryKind } from '../journal/types.js';
import { JournalCorruptError } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/logger.js';
import { CHUNKS_PER_REQUEST, CHUNK_BYTES, chunkCount, differingChunks } from './chunk-hash.js';
import { lagBytes } from './lag-bytes.js';
import { FEATURE_RECORDS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RecordsPool, decode, encode } from './protocol.js';
import { decodeValue, valueCum } from '../journal/entry.js';

/** A batch ready to send: entries first..first+count-1 in `data`; release() once written. */
interface Batch {
  first: number;
  count: number;
  data: Buffer;
  /** The last entry's stored value (for its cumulative-size field). */
  last: Buffer | undefined;
  release: () => void;
}

/** Unacknowledged bytes in flight per replica. */
const WINDOW_BYTES = 16 * 2 ** 20;
/** Per batch: bounded so one message stays far below MAX_MESSAGE_BYTES. */
const BATCH_BYTES = 4 * 2 ** 20;
const BATCH_ENTRIES = 1024;
/**
 * A batch smaller than this waits until COALESCE_MS after the previous send, gathering what commits
 * meanwhile, so a steady write load is not shipped as one message per commit (one per event-loop turn: ~1500
 * a second at 4 KiB writes, each paying an encode, a frame, the replayer's decode, apply round and ack, and
 * the primary's ack handling). Adds at most COALESCE_MS to the lag; an idle link sends at once.
 */
const COALESCE_BYTES = 256 * 1024;
const COALESCE_MS = 4;
/**
 * A streaming replica is reported in `backlog`, not `continuous`, while it is further behind than the link
 * carries at once: more entries than four batches, more bytes than the window, or more seconds than this. By
 * entries alone, a replica 11 s and 29 MiB behind on a 4 MB/s link showed `continuous` (112 entries of 256 KiB).
 */
const BACKLOG_SECONDS = 2;
/** How often a resync held back while the link is congested (a quarter of the cap unsent) looks again (see runResync). */
const RESYNC_THROTTLE_POLL_MS = 50;
/** Reconnect backoff: first delay and ceiling. */
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 10_000;
/** A link with no pong for this long is dead. */
const PING_INTERVAL_MS = 2_000;
const PING_TIMEOUT_MS = 6_000;


/** What resync needs from the primary's volume (the mirror layer provides it). */
export interface ResyncSource {
  /** Digests of chunks [first, first+count) of the primary image, after in-flight writes there have landed. */
  hashChunks(first: number, count: number): Promise<Buffer>;
  /** Appends the current bytes of a range as a WRITE entry in the ordered stream; resolves to its seq. */
  captureRange(offset: number, length: number): Promise<number>;
}

export interface ReplicatorOptions {
  url: string;
  volume: string;
  volumeId: string;
  size: number;
  journal: Journal;
  /** Presented in the hello when the replayer checks tokens. */
  token?: string;
  /** wss:// trust: TLS options and an optional check of the replayer's certificate (pinning). */
  tls?: { options: Record<string, unknown>; checkPeer?: (socket: unknown) => string | undefined };
  /** Shipping limit in bytes per second of messages as handed to ws (before --compress shrinks them); 0 or undefined: none. */
  maxRate?: number;
  /** Negotiate permessage-deflate on the link (pays off on slow links with compressible data). */
  compress?: boolean;
  /** Needed to resync; without it a replica that needs one is reported as needs-resync. */
  source?: ResyncSource;
  /**
   * True when the journal holds every change since the image was all zeroes (serve created both): a new,
   * zero-filled replica then needs no digest comparison, only the journal from seq 1.
   */
  journalFromEmpty?: boolean;
  logger?: Logger;
}

/** The dirty bitmap as kept in the journal's meta: one bit per chunk, covering changes through `through`. */
interface SavedBitmap {
  from: number;
  through: number;
  incomplete: boolean;
  bits: Uint8Array;
  /** When seq `from` was written (ms since the epoch): the replica lacks changes since then. Absent in older saves. */
  since?: number;
}

export class Replicator {
  private ws: WebSocket | undefined;
  private state: ReplicaState = 'connecting';
  /** Durable at the replica: what the journal may drop. */
  private ackedSeq = 0;
  /** Applied at the replica (visible there, maybe not yet fsynced): what lag is measured against. */
  private appliedSeq = 0;
  private nextSeq = 0;
  private inflight: Array<{ seq: number; bytes: number }> = [];
  private inflightBytes = 0;
  private stopped = false;
  private attempt = 0;
  private wake: (() => void) | undefined;
  /** Ends ship()'s wait for new entries: the link closed or shipping stops. */
  private interrupt: (() => void) | undefined;
  /** When the last batch was sent (see COALESCE_MS). */
  private lastSendAt = 0;
  /** The last seq put in a message, and its entry's cumulative-size field (how much had been stored through it). */
  private shippedSeq = 0;
  private shippedCum: number | undefined;
  private lastError: string | undefined;
  /** A journal entry at or below this seq failed its CRC: the replica gets past it by a digest resync. */
  private corruptThrough = 0;
  /** The save of the bitmap under way (saves run one after another; see saveBitmap). */
  private bitmapSave: Promise<void> | undefined;
  /**
   * The listener whose walk over the journal's stored entries is under way: until it is done the bitmap covers
   * only the entries walked so far (and every later append), so nothing may be let go past the walk's position.
   * A listener, not a flag: a walk left behind by a replica that came back goes on until it ends, and must not
   * end a newer one's protection.
   */
  private walk: ChangeListener | undefined;
  /** The walk onJournalFull started last, until it is done and the bitmap saved (or it failed). */
  private walked: Promise<void> | undefined;
  /** The link was dropped to pull ahead (onJournalFull): its close starts the bitmap before reconnecting. */
  private pullingAhead = false;
  private resync: { doneBytes: number; totalBytes: number; sentBytes: number; startedAt: number } | undefined;
  /** Digest requests in flight, by id: told the replica's digests, or undefined once the link is gone. */
  private readonly digestWaiters = new Map<number, (digests: Buffer | undefined) => void>();
  /** Chunks that differ or may differ from the replica and are no longer in the journal for it. */
  private dirty: Uint8Array | undefined;
  /** How many chunks `dirty` marks (see dirtyBytes). */
  private dirtyChunks = 0;
  /** Installed while the replica is away and does not hold the journal. */
  private tracking: ChangeListener | undefined;
  /** A resync began and has not reached `synced`: the replica may differ anywhere. */
  private resyncIncomplete = false;
  /** The first seq the bitmap accounts for: a replica behind it needs a full comparison. */
  private dirtyFrom = 0;
  /**
   * The replica lacks changes the journal let go of for it (the bitmap's): when the oldest of them was written,
   * for the lag in seconds, until the replica has applied `untilSeq` (set once the resync over them is queued).
   * Kept in the journal's meta (behindKey) from the moment the bitmap starts until it is settled, so that a
   * restart of serve between the resync and its apply still counts the lag from there.
   */
  private missingSince: { ts: number; untilSeq: number } | undefined;
  /** The replica's first copy (initial-sync) began and has not ended: it is still its first copy on a new link. */
  private firstCopyIncomplete = false;
  /**
   * The seq the replica becomes consistent at, once a comparison has queued every differing chunk (its `synced`)
   * and until the replica has applied through it: the state stays initial-sync or resync meanwhile. (It went
   * `backlog`, then `continuous`, while the replayer still said inconsistent; found by a README review helper.)
   */
  private consistentAt: number | undefined;
  /** The comparison that set consistentAt was the replica's first copy (its state is initial-sync until then). */
  private consistentAtFirstCopy = false;
  /** --max-rate pacing: when the next message may be sent. */
  private nextSendAt = 0;
  private nextRequestId = 1;
  /**
   * The replica refused an entry as corrupt: everything committed by then is shipped from LMDB, where each
   * entry is verified before it leaves, instead of from the journal's memory window.
   */
  private storedThrough = 0;
  /** The connected replayer takes `records` messages (said in its welcome). */
  private records = false;
  /**
   * Batch messages: one batch of values plus msgpack framing (5 bytes a record at most); as many kept as the
   * window can have in flight, plus one.
   */
  private readonly batches = new RecordsPool(BATCH_BYTES + BATCH_ENTRIES * 8 + 1024, Math.ceil(WINDOW_BYTES / BATCH_BYTES) + 1);
  private readonly log: Logger;
  readonly consumerId: string;

  constructor(private readonly opts: ReplicatorOptions) {
    this.log = (opts.logger ?? silentLogger).child({ component: 'replicator', replica: opts.url, volume: opts.volume });
    this.consumerId = Replicator.consumerIdFor(opts.url, opts.volume);
    this.ackedSeq = opts.journal.registerConsumer(this.consumerId, 1).ackedSeq;
    this.appliedSeq = this.ackedSeq;
    this.loadBitmap();
    opts.journal.on('full', this.onJournalFull);
  }

  /** The journal meta key of a consumer's saved dirty bitmap. */
  static bitmapKeyFor(consumerId: string): string {
    return `dirty:${consumerId}`;
  }

  private get bitmapKey(): string {
    return Replicator.bitmapKeyFor(this.consumerId);
  }

  /** The journal meta key marking a full resync of a replica under way (kept across restarts of serve). */
  static resyncKeyFor(consumerId: string): string {
    return `resyncing:${consumerId}`;
  }

  private get resyncKey(): string {
    return Replicator.resyncKeyFor(this.consumerId);
  }

  /** The journal meta key of when the oldest change a replica lacks was written (see missingSince). */
  static behindKeyFor(consumerId: string): string {
    return `behind:${consumerId}`;
  }

  /**
   * The journal meta key of a grown volume's old size, for a replica that has not compared the new region yet
   * (set by serve when it finds the image grew; see markGrown).
   */
  static grownKeyFor(consumerId: string): string {
    return `grown:${consumerId}`;
  }

  /**
   * The volume grew from `fromSize`: the replica compares the region past it by digests when it next connects
   * (its replayer grows the replica, which reads zeroes there; the primary's new region may hold anything, a
   * block device's especially). Kept across restarts until that comparison has queued every differing chunk.
   */
  static async markGrown(journal: Journal, consumerId: string, fromSize: number): Promise<void> {
    const key = Replicator.grownKeyFor(consumerId);
    const earlier = journal.getMeta<number>(key);
    await journal.setMeta(key, typeof earlier === 'number' ? Math.min(earlier, fromSize) : fromSize);
  }

  /** Every journal meta key a replica's replicator keeps: removed with the replica. */
  static metaKeysFor(consumerId: string): string[] {
    return [Replicator.bitmapKeyFor(consumerId), Replicator.resyncKeyFor(consumerId), Replicator.behindKeyFor(consumerId), Replicator.grownKeyFor(consumerId)];
  }

  /** Sets missingSince, and records it (or its end) in the journal's meta. */
  private setMissing(value: { ts: number; untilSeq: number } | undefined): void {
    this.missingSince = value;
    const saved = value ? { since: value.ts, untilSeq: Number.isFinite(value.untilSeq) ? value.untilSeq : null } : undefined;
    this.opts.journal.setMeta(Replicator.behindKeyFor(this.consumerId), saved).catch((err) => this.log.warn({ err }, 'could not record how far behind the replica is'));
  }

  /** A bitmap saved by an earlier run: the replica is still compared over its dirty chunks only. */
  private loadBitmap(): void {
    // A full resync an earlier run of serve did not finish: the replica may differ anywhere. 'initial': it was
    // the replica's first copy.
    const resyncing = this.opts.journal.getMeta<boolean | 'initial'>(this.resyncKey);
    this.resyncIncomplete = resyncing === true || resyncing === 'initial';
    this.firstCopyIncomplete = resyncing === 'initial';
    const behind = this.opts.journal.getMeta<{ since: number; untilSeq: number | null }>(Replicator.behindKeyFor(this.consumerId));
    if (behind && typeof behind.since === 'number') this.missingSince = { ts: behind.since, untilSeq: behind.untilSeq ?? Infinity };
    const saved = this.opts.journal.getMeta<SavedBitmap>(this.bitmapKey);
    const chunks = chunkCount(this.opts.size);
    // Fewer bits than chunks: the volume grew since it was saved (the grown region is compared anyway).
    if (!saved || !(saved.bits instanceof Uint8Array) || saved.bits.length > Math.ceil(chunks / 8)) return;
    const dirty = new Uint8Array(chunks);
    let n = 0;
    for (let c = 0; c < chunks; c++) n += dirty[c] = (saved.bits[c >> 3] >> (c & 7)) & 1;
    this.dirty = dirty;
    this.dirtyChunks = n;
    this.dirtyFrom = saved.from;
    this.resyncIncomplete ||= saved.incomplete;
    // The consumer's hold stands for the bitmap: the replica itself had only what came before it.
    this.ackedSeq = this.appliedSeq = Math.min(this.ackedSeq, saved.from - 1);
    this.missingSince ??= { ts: saved.since ?? Date.now(), untilSeq: Infinity };
    this.log.info({ fromSeq: saved.from, throughSeq: saved.through, dirtyBytes: this.dirtyBytes() }, 'loaded the dirty bitmap of a replica that was away');
  }

  /**
   * Saves the bitmap as covering every change through `through` (by default the committed seq: the listener
   * marks changes as they are appended), then lets the journal prune through that seq. Called whenever the
   * journal fills up while this replica is tracked by the bitmap, and while the walk that builds it goes on
   * (through the walk's position). Saves run one after another, so the last one asked for is the one that lands.
   */
  private async saveBitmap(through?: number): Promise<void> {
    const before = this.bitmapSave;
    const save = (async () => {
      if (before) await before.catch(() => undefined);
      const dirty = this.dirty;
      if (!dirty) return;
      const j = this.opts.journal;
      const upTo = through ?? j.stats.committedSeq;
      const bits = Buffer.alloc(Math.ceil(dirty.length / 8));
      for (let c = 0; c < dirty.length; c++) if (dirty[c]) bits[c >> 3] |= 1 << (c & 7);
      const since = this.missingSince?.ts;
      await j.setMeta(this.bitmapKey, { from: this.dirtyFrom, through: upTo, incomplete: this.resyncIncomplete, bits, ...(since ? { since } : {}) } satisfies SavedBitmap);
      if (this.tracking) j.ack(this.consumerId, upTo);
    })();
    this.bitmapSave = save;
    try {
      await save;
    } finally {
      if (this.bitmapSave === save) this.bitmapSave = undefined;
    }
  }

  /** No bitmap is needed any more (the replica has every change, or gets a full comparison). */
  private dropBitmap(): void {
    if (!this.dirty) return;
    this.dirty = undefined;
    this.dirtyChunks = 0;
    this.opts.journal.setMeta(this.bitmapKey, undefined).catch((err) => this.log.warn({ err }, 'could not remove the saved dirty bitmap'));
  }

  /** The journal consumer a replica of `volume` at `url` acknowledges under. */
  static consumerIdFor(url: string, volume: string): string {
    return `replica:${url}#${volume}`;
  }

  start(): void {
    this.connect();
  }

  status(): ReplicaStatus {
    const j = this.opts.journal.stats;
    const lagEntries = Math.max(0, j.committedSeq - this.appliedSeq);
    let lagSeconds = 0;
    if (this.missingSince) {
      // The journal no longer holds the oldest changes the replica lacks: their age was noted when it let go.
      lagSeconds = Math.max(0, (Date.now() - this.missingSince.ts) / 1000);
    } else if (lagEntries > 0) {
      const ts = this.entryTime(Math.max(this.appliedSeq + 1, j.tailSeq));
      if (ts !== undefined) lagSeconds = Math.max(0, (Date.now() - ts) / 1000);
    }
    // Progress of the comparison under way (one a link left unfinished is not: the next link starts over).
    const comparing = this.state === 'resync' || this.state === 'initial-sync';
    const resync = this.resync && comparing ? { ...this.resync, percent: Math.floor((100 * this.resync.doneBytes) / this.resync.totalBytes) } : null;
    // On a bitmap: the dirty regions, then the entries the journal still holds past them (from its tail).
    const dirtyBytes = this.dirty ? this.dirtyBytes() : 0;
    const journalLag = lagBytes(this.opts.journal, this.dirty ? Math.max(this.appliedSeq, j.tailSeq - 1) : this.appliedSeq);
    // A replica that is away while the bitmap stands for its changes is on the bitmap (DESIGN.md's states).
    let state: ReplicaState = this.state === 'disconnected' && this.dirty ? 'bitmap' : this.state;
    if (state === 'continuous' || state === 'backlog') {
      const behind = lagEntries > BATCH_ENTRIES * 4 || (journalLag ?? 0) > WINDOW_BYTES || lagSeconds > BACKLOG_SECONDS;
      state = behind ? 'backlog' : 'continuous';
    }
    return {
      url: this.opts.url,
      volume: this.opts.volume,
      state,
      ackedSeq: this.ackedSeq,
      appliedSeq: this.appliedSeq,
      lagEntries,
      lagBytes: journalLag === null ? null : journalLag + dirtyBytes,
      lagSeconds,
      resync,
      dirtyBytes,
      lastError: this.lastError ?? null,
    };
  }

  private connect(): void {
    if (this.stopped) return;
    // A zero mask: masking guards browsers' traffic against cache-poisoning proxies, which does not apply to a
    // server-to-server link, and XOR-ing every 4 MiB batch in JavaScript (twice, with the replayer's unmask)
    // cost more CPU than the rest of shipping. ws skips both sides' loops for a zero mask.
    const ws = new WebSocket(this.opts.url, { maxPayload: MAX_MESSAGE_BYTES, handshakeTimeout: 10_000, generateMask: (mask) => mask.fill(0),
      perMessageDeflate: this.opts.compress ? { threshold: 1024, zlibDeflateOptions: { level: 1 } } : false,
      ...(this.opts.tls?.options ?? {}),
    });
    // Why this link was refused here (the pin), kept over the error its termination then raises in ws.
    let refused: string | undefined;
    ws.on('upgrade', (res) => {
      // Before the hello: a replayer that fails the pin never sees the token.
      const err = this.opts.tls?.checkPeer?.(res.socket);
      if (err) {
        refused = err;
        this.lastError = err;
        this.log.error(err);
        ws.terminate();
      }
    });
    this.ws = ws;
    let alive = Date.now();
    const ping = setInterval(() => {
      if (Date.now() - alive > PING_TIMEOUT_MS) {
        this.log.warn('no pong: the link is dead, reconnecting');
        ws.terminate();
      } else if (ws.readyState === ws.OPEN) ws.ping();
    }, PING_INTERVAL_MS);
    ws.on('pong', () => (alive = Date.now()));
    // The replayer pings every few seconds too, on the direction that carries only acks: those arrive while our
    // own ping (and so its pong) waits behind the batches on the wire. On a link slower than a batch in
    // PING_TIMEOUT_MS (under ~0.7 MiB/s) that wait alone took the link for dead every ~10 s, and resending the
    // same batch on the next link could stall replication for good (seen at 400 KiB/s).
    ws.on('ping', () => (alive = Date.now()));
    ws.on('open', () => {
      alive = Date.now();
      this.log.info({ extensions: ws.extensions || 'none', maxRate: this.opts.maxRate ?? null }, 'replication link open');
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume: this.opts.volume, volumeId: this.opts.volumeId, size: this.opts.size, ...(this.opts.token ? { token: this.opts.token } : {}) }));
    });
    ws.on('message', (raw: Buffer) => {
      alive = Date.now();
      let msg;
      try {
        msg = decode(raw);
      } catch (err) {
        this.log.warn({ err }, 'bad message from the replica; reconnecting');
        return ws.terminate();
      }
      if (msg.t === 'welcome') {
        this.attempt = 0;
        this.lastError = undefined;
        this.records = msg.features?.includes(FEATURE_RECORDS) ?? false;
        this.onWelcome(ws, msg.appliedSeq, msg.consistentFrom ?? null, msg.appliedCrcs ?? null, msg.seeded === true);
      } else if (msg.t === 'digests') {
        this.digestWaiters.get(msg.id)?.(msg.digests);
        this.digestWaiters.delete(msg.id);
      } else if (msg.t === 'ack') {
        this.onAck(msg.seq, msg.durableSeq ?? msg.seq);
      } else if (msg.t === 'error') {
        this.lastError = `${msg.code}: ${msg.message}`;
        // The replica was promoted to a primary: both sides may now have writes of their own.
        if (msg.code === 'ERR_VOLUME_PROMOTED') this.state = 'split-brain';
        // What left memory did not match its CRC at the replica: resend it from the verified store.
        if (msg.code === 'ERR_JOURNAL_CORRUPT' || msg.code === 'ERR_ENTRY_RANGE') this.storedThrough = this.opts.journal.stats.committedSeq;
        this.log.error({ code: msg.code }, `replica refused: ${msg.message}`);
      }
    });
    ws.on('error', (err) => {
      this.lastError = refused ?? err.message;
      this.log.debug({ err }, 'replication link error');
    });
    ws.on('close', () => {
      clearInterval(ping);
      this.ws = undefined;
      this.wake?.();
      this.interrupt?.();
      // A resync waiting for digests ends (it holds the dirty bitmap); the next link starts one over.
      for (const tell of this.digestWaiters.values()) tell(undefined);
      this.digestWaiters.clear();
      if (this.state !== 'needs-resync' && this.state !== 'split-brain') this.state = 'disconnected';
      if (this.stopped) return;
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt++);
      const reconnect = () => setTimeout(() => this.connect(), delay / 2 + Math.random() * (delay / 2)).unref();
      if (!this.pullingAhead) return void reconnect();
      // Dropped to pull ahead: onto the bitmap first, then back (onJournalFull). If that fails (the bitmap of a
      // huge volume cannot be allocated, say), the journal goes on holding the entries and the link comes back.
      this.pullingAhead = false;
      try {
        this.onJournalFull();
      } catch (err) {
        this.log.error({ err }, 'switching to the dirty bitmap failed; the journal keeps holding what the replica lacks');
      }
      void (this.walked ?? Promise.resolve()).finally(reconnect);
    });
  }

  /** The journal is full: if this absent replica is what holds it, switch it to the dirty bitmap. */
  private readonly onJournalFull = (): void => {
    const j = this.opts.journal;
    if (this.tracking) {
      // Still walking the stored entries: the walk lets go of what it has covered as it goes (onWalkStep).
      // Saving through the head now would let the journal drop entries the walk has not marked yet, and the
      // returning replica would be compared over too few regions.
      if (this.walk === this.tracking) return;
      // Full again while tracked: save the bitmap through the head so the journal can let go of it all.
      this.saveBitmap().catch((err) => this.log.error({ err }, 'saving the dirty bitmap failed; the journal keeps holding the entries'));
      return;
    }
    if (this.stopped || !this.opts.source) return;
    // What this replica holds the journal from (after a restart with a saved bitmap: the bitmap's end).
    const hold = j.consumers().find((c) => c.id === this.consumerId)?.ackedSeq ?? this.ackedSeq;
    if (hold > j.stats.ackedSeq) return; // not this replica: another consumer or the checkpoint
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      // Connected: such a replica drains the journal, unless its link is slower than
      // the writes (congested: a quarter of the cap waits to be sent). Then the writes would go at the link's pace once the journal is full, and the primary is
      // not to wait for the remote: drop the link and take the replica onto the dirty bitmap as if it were
      // away (DRBD's on-congestion pull-ahead). The close handler starts the walk, and reconnects only once
      // the bitmap stands for the changes, so the replica comes back to a resync of the dirty regions.
      if (this.pullingAhead || !this.congested()) return;
      this.pullingAhead = true;
      this.lastError = 'pulled ahead: the link was slower than the writes when the journal was full';
      this.log.warn(
        { lagBytes: lagBytes(j, this.appliedSeq), journalCapBytes: j.capBytes },
        'journal full and the replica far behind over a link slower than the writes: dropping the link and tracking its changes in the dirty bitmap, so writes go on (pull-ahead); it resyncs the dirty regions when it reconnects',
      );
      ws.terminate();
      return;
    }
    const fresh = !this.dirty;
    if (!this.dirty) {
      this.dirty = new Uint8Array(chunkCount(this.opts.size));
      this.dirtyChunks = 0;
    }
    const dirty = this.dirty;
    // A full resync was under way: the replica may differ anywhere.
    if (fresh && this.resyncIncomplete) {
      dirty.fill(1);
      this.dirtyChunks = dirty.length;
    }
    if (fresh) {
      this.dirtyFrom = hold + 1;
      if (!this.missingSince) this.setMissing({ ts: this.entryTime(hold + 1) ?? Date.now(), untilSeq: Infinity });
    }
    const size = this.opts.size;
    const mark: ChangeListener = (kind, offset, length) => {
      if (kind === EntryKind.FLUSH || length === 0) return;
      const last = Math.floor((Math.min(offset + length, size) - 1) / CHUNK_BYTES);
      for (let c = Math.floor(offset / CHUNK_BYTES); c <= last; c++) {
        if (dirty[c] === 0 && this.dirty === dirty) this.dirtyChunks++;
        dirty[c] = 1;
      }
    };
    this.tracking = mark;
    this.walk = mark;
    const from = hold + 1;
    const walked = j
      .trackChanges(from, mark, (through) => this.onWalkStep(mark, through))
      .then(async () => {
        if (this.walk === mark) this.walk = undefined;
        // The walk yields: if the replica came back meanwhile, the journal (still held) serves it instead.
        if (this.tracking !== mark) return;
        // Every change this replica lacks is now in the bitmap: save it, then let the journal go.
        await this.saveBitmap();
        this.log.warn({ fromSeq: from, dirtyBytes: this.dirtyBytes() }, 'journal full while the replica is away: tracking its dirty regions in a bitmap; writes continue');
      })
      .catch((err) => {
        if (this.walk === mark) this.walk = undefined;
        // The bitmap may lack changes the walk did not reach: the journal keeps holding them (from the last
        // step saved), and the next time it fills a new walk starts from there.
        if (this.tracking === mark) {
          j.removeChangeListener(mark);
          this.tracking = undefined;
        }
        this.log.error({ err }, 'switching to the dirty bitmap failed; the journal keeps holding what the replica lacks');
      });
    this.walked = walked;
    void walked.finally(() => {
      if (this.walked === walked) this.walked = undefined;
    });
  };

  /**
   * Whether the link is what keeps this connected replica behind: more than a quarter of the journal's cap is
   * committed and not even sent yet (the window is full of what is). Measured on unsent bytes, not unapplied
   * ones: with a small cap, a link that keeps up holds the whole journal in flight, and counting that pulled a
   * healthy replica ahead (found by a review helper: --journal-max 16M over loopback).
   */
  private congested(): boolean {
    const j = this.opts.journal;
    const unsent = lagBytes(j, Math.max(this.nextSeq - 1, this.appliedSeq));
    return unsent !== null && unsent > j.capBytes / 4;
  }

  /**
   * A step of the walk is done: every change through `through` is in the bitmap. While writes wait for room,
   * save it through there and let the journal go of those entries, so the writes go on during the rest of the
   * walk (over a full 8 GiB journal the walk takes seconds) instead of waiting for all of it.
   */
  private onWalkStep(mark: ChangeListener, through: number): void {
    if (this.tracking !== mark || this.bitmapSave || !this.opts.journal.appendsWaiting) return;
    this.saveBitmap(through).catch((err) => this.log.error({ err }, 'saving the dirty bitmap failed; the journal keeps holding the entries'));
  }

  /** The replica has applied what the resync queued for the changes the journal had let go of: its lag is the journal's again. */
  private settleMissing(): void {
    if (this.missingSince && this.appliedSeq >= this.missingSince.untilSeq) this.setMissing(undefined);
  }

  /** When entry `seq` was written (ms since the epoch), if the journal holds it and it reads. */
  private entryTime(seq: number): number | undefined {
    try {
      // Only the timestamp is needed: decoded in place, not copied out of the memory window by read().
      const { first, values } = this.opts.journal.readRecords(seq, { maxEntries: 1 });
      return values.length > 0 ? decodeValue(first, values[0]).ts : undefined;
    } catch {
      return undefined; // a corrupt entry: reported by the shipping path
    }
  }

  /**
   * Bytes the bitmap marks, from a count kept as bits are set: status asks every second, and scanning the map
   * each time blocked serve's loop for 1.2 s a call on a 64 TiB volume (found by a review helper).
   */
  private dirtyBytes(): number {
    return this.dirty ? this.dirtyChunks * CHUNK_BYTES : 0;
  }

  /**
   * Whether the replica's last applied entries are others than this journal's at those seqs: two histories with
   * the same seqs. It happens when the journal lost a tail the replica had applied (a power cut with `commit`
   * durability loses LMDB's unsynced transactions) and new writes took those seqs before the replica came back:
   * shipping on from the replica's seq would leave it with the lost writes where the primary has the new ones.
   * `crcs` end at `applied`; those whose seqs this journal no longer (or not yet) holds cannot be compared.
   */
  private historyDiffers(applied: number, crcs: number[] | null): boolean {
    const j = this.opts.journal;
    if (!crcs || crcs.length === 0 || applied < 1) return false;
    const from = Math.max(applied - crcs.length + 1, j.stats.tailSeq, 1);
    const to = Math.min(applied, j.committedSeq);
    if (from > to) return false;
    try {
      // Whole values are read (up to 64 of them, once a connection): only their headers' CRCs are compared.
      for (let seq = from; seq <= to; ) {
        const { first, values } = j.readRecords(seq, { maxEntries: to - seq + 1 });
        if (first !== seq || values.length === 0) return true;
        for (const v of values) {
          if (seq > to) break;
          if (decodeValue(seq, v).crc !== crcs[crcs.length - 1 - (applied - seq)]) return true;
          seq++;
        }
      }
      return false;
    } catch (err) {
      // Our own entries there are unreadable (corrupt): what the replica has cannot be vouched for either.
      this.log.error({ err, fromSeq: from, toSeq: to }, 'cannot read the entries the replica says it applied last');
      return true;
    }
  }

  private onWelcome(ws: WebSocket, applied: number, consistentFrom: number | null, appliedCrcs: number[] | null = null, seeded = false): void {
    const j = this.opts.journal;
    if (this.tracking) {
      // Stop marking: from here changes are shipped (the journal holds them again, below).
      j.removeChangeListener(this.tracking);
      this.tracking = undefined;
    }
    const { tailSeq, committedSeq } = j.stats;
    // Entries the replica needs are gone, it is ahead of this journal (another history), or it is new and
    // the journal does not start from an empty image, or a resync was interrupted: compare digests.
    // Recovery mended entries from the image (Journal.repair): a replica that had applied them may hold the
    // bytes the primary lost, and its last CRCs need not show it.
    const repaired = j.repairedFrom(this.consumerId);
    const mended = repaired !== undefined && applied >= repaired;
    if (repaired !== undefined) j.clearRepaired(this.consumerId).catch((err) => this.log.warn({ err }, 'could not clear the repair mark'));
    const diverged = mended || this.historyDiffers(applied, appliedCrcs);
    if (mended) {
      this.log.error({ appliedSeq: applied, repairedSeq: repaired }, `journal seq ${repaired} was repaired from the image after the replica applied it: comparing every chunk by digests`);
    } else if (diverged) {
      this.log.error(
        { appliedSeq: applied },
        `the replica's last entries through seq ${applied} are not this journal's (it applied writes this primary lost, e.g. in a power cut): comparing every chunk by digests`,
      );
    }
    // A replica waiting for a seq this journal never committed (its `synced` was lost with the journal's tail, as
    // after a power cut) would be called consistent once later writes passed that seq: compare every chunk.
    const lostSynced = consistentFrom !== null && consistentFrom > committedSeq;
    if (lostSynced) this.log.error({ consistentFrom, committedSeq }, `the replica waits for seq ${consistentFrom} to be consistent, which this journal never committed: comparing every chunk by digests`);
    const gap = applied + 1 < tailSeq || applied > committedSeq || applied < this.corruptThrough || diverged || lostSynced;
    // A replica that has had nothing from this primary: its first copy. New if its image is all zeroes too (the
    // replayer made it), not if it held data before (a demoted primary's image: seeded).
    const first = (applied === 0 || this.firstCopyIncomplete) && consistentFrom === -1;
    const isNew = first && !seeded;
    // The volume grew since this replica last compared: the region past the old size is compared too.
    const grownFrom = this.opts.journal.getMeta<number>(Replicator.grownKeyFor(this.consumerId));
    const grown = typeof grownFrom === 'number' && grownFrom < this.opts.size;
    // A replica inconsistent only because it grew (the replayer says so until the grown region is compared):
    // that region, and the bitmap's if any, is all it needs, unless a full comparison was under way.
    const grownOnly = grown && !gap && !first && !this.resyncIncomplete;
    const fromScratch = gap || (consistentFrom === -1 && !grownOnly && !(isNew && this.opts.journalFromEmpty && tailSeq <= 1));
    const needsResync = fromScratch || grown;
    // The bitmap narrows a resync only when everything outside it is known to match: not for a new replica,
    // nor one older than the point the bitmap starts from; and it is not needed if the journal suffices.
    // Nor after a corrupt entry: what it changed is not known, so every chunk is compared. Nor for another
    // history: the writes only the replica has are in no bitmap.
    if (!fromScratch || isNew || diverged || applied + 1 < this.dirtyFrom || applied < this.corruptThrough) this.dropBitmap();
    if (!needsResync && this.missingSince) {
      // Consistent: the journal holds everything it lacks again, and its lag is read from the entries. Waiting
      // for the seq a finished resync made it consistent at: the lag counts as before until it is applied.
      if (consistentFrom === null) this.setMissing(undefined);
      else if (consistentFrom >= 0 && consistentFrom !== this.missingSince.untilSeq) this.setMissing({ ts: this.missingSince.ts, untilSeq: consistentFrom });
    }
    if (needsResync && !this.opts.source) {
      this.state = 'needs-resync';
      this.lastError = `replica at seq ${applied} needs a resync (journal holds ${tailSeq}..${committedSeq})`;
      this.log.error(this.lastError);
      ws.close(1000);
      this.stopped = true;
      return;
    }
    if (needsResync) {
      const fromSeq = gap ? Math.max(tailSeq, this.corruptThrough + 1) : applied + 1;
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'resync', fromSeq }));
      applied = fromSeq - 1;
      this.ackedSeq = Math.min(this.ackedSeq, applied);
    } else if (isNew) {
      // The journal covers the image from all zeroes, and a new replica is all zeroes: shipping suffices.
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'synced', seq: 0 }));
    }
    // The journal holds again everything the replica is to be sent (a bitmap, or an earlier run of serve, may
    // have let it go further: its acknowledgement then stood for the bitmap, not for the replica).
    this.ackedSeq = j.holdFrom(this.consumerId, applied + 1);
    // What the replica has applied is not necessarily durable: retention moves only on durable acks.
    this.appliedSeq = applied;
    this.settleMissing();
    this.nextSeq = applied + 1;
    this.inflight = [];
    this.inflightBytes = 0;
    // A replica that never had a copy gets its first one; any other is brought back (DESIGN.md's states). One
    // whose resync has queued everything (an earlier link's `synced`) is in resync until it has applied that.
    this.state = needsResync ? (first ? 'initial-sync' : 'resync') : 'continuous';
    this.resync = undefined;
    const firstCopy = this.consistentAtFirstCopy && this.consistentAt === consistentFrom;
    this.consistentAt = undefined;
    this.consistentAtFirstCopy = false;
    if (!needsResync && consistentFrom !== null && consistentFrom >= 0 && applied < consistentFrom) {
      // Still its first copy if this process queued that copy (after a restart of serve it cannot tell).
      this.state = firstCopy ? 'initial-sync' : 'resync';
      this.consistentAt = consistentFrom;
      this.consistentAtFirstCopy = firstCopy;
    }
    void this.ship(ws);
    if (needsResync) {
      // Every chunk from `whole` on is compared, and before it those the bitmap marks: all of them when the
      // replica needs a full comparison, the grown region when only the volume's growth asks for one.
      const whole = fromScratch && !this.dirty ? 0 : grown ? Math.floor(grownFrom / CHUNK_BYTES) : Infinity;
      this.runResync(ws, whole, grown).catch((err) => {
        if (this.ws !== ws) return; // the link went away; the next connection starts over
        this.lastError = `resync failed: ${(err as Error).message}`;
        this.log.error({ err }, 'resync failed; reconnecting to start over');
        ws.terminate();
      });
    }
  }

  /**
   * Walks the volume comparing digests of the chunks from `whole` on and of those the bitmap marks before it;
   * differing chunks enter the journal; ends with `synced`. `grown`: this covers the volume's grown region
   * (its marker is cleared at the end).
   */
  private async runResync(ws: WebSocket, whole: number, grown: boolean): Promise<void> {
    const source = this.opts.source!;
    const total = chunkCount(this.opts.size);
    const dirty = this.dirty;
    const full = whole === 0;
    const scope = full ? this.opts.size : (dirty ? this.dirtyBytes() : 0) + Math.max(0, this.opts.size - Math.min(whole, total) * CHUNK_BYTES);
    this.resyncIncomplete = true;
    const initial = this.state === 'initial-sync';
    this.firstCopyIncomplete = initial;
    this.resync = { doneBytes: 0, totalBytes: this.opts.size, sentBytes: 0, startedAt: Date.now() };
    // A full comparison is marked in the journal: if serve restarts before it ends, a bitmap built then (only
    // changes from then on) would otherwise stand in for it, and the chunks it never reached go uncompared.
    if (full) await this.opts.journal.setMeta(this.resyncKey, initial ? 'initial' : true);
    const what = full ? '' : [dirty ? 'dirty regions' : '', grown ? 'the grown region' : ''].filter(Boolean).join(' and ');
    this.log.info({ bytes: scope, dirtyOnly: !!dirty, grown }, `resync: comparing chunk digests with the replica${what ? ` (${what} only)` : ''}`);
    for (let first = 0; first < total; first += CHUNKS_PER_REQUEST) {
      if (this.ws !== ws || this.stopped) return;
      const count = Math.min(CHUNKS_PER_REQUEST, total - first);
      if (first + count <= whole && !dirty?.subarray(first, first + count).some((d) => d === 1)) {
        this.resync.doneBytes = Math.min(this.opts.size, (first + count) * CHUNK_BYTES);
        continue;
      }
      const id = this.nextRequestId++;
      const theirs = new Promise<Buffer | undefined>((resolve) => this.digestWaiters.set(id, resolve));
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'digests?', id, first, count }));
      const [replica, primary] = await Promise.all([theirs, source.hashChunks(first, count)]);
      if (this.ws !== ws || !replica) return;
      // Adjacent differing chunks go as one capture (one entry), up to 32 chunks (8 MiB).
      const diff = differingChunks(primary, replica);
      for (let i = 0; i < diff.length; ) {
        let n = 1;
        while (i + n < diff.length && diff[i + n] === diff[i] + n && n < 32) n++;
        const offset = (first + diff[i]) * CHUNK_BYTES;
        const length = Math.min(n * CHUNK_BYTES, this.opts.size - offset);
        // The chunks go through the journal, as new writes do, but must not fill it: over a link slower than
        // the disk a resync would otherwise hold the journal full and make the writes wait for the link, or
        // (once that pulls the replica ahead) start over before the link carried much. They wait while a quarter
        // of the cap is unsent.
        while (this.ws === ws && !this.stopped && this.congested()) await new Promise((r) => setTimeout(r, RESYNC_THROTTLE_POLL_MS));
        if (this.ws !== ws || this.stopped) return;
        await source.captureRange(offset, length);
        this.resync.sentBytes += length;
        i += n;
      }
      this.resync.doneBytes = Math.min(this.opts.size, (first + count) * CHUNK_BYTES);
    }
    if (this.ws !== ws) return;
    const resync = this.resync;
    // Every differing chunk is in the journal at or below this seq: the replica is consistent once it has it.
    const seq = this.opts.journal.stats.headSeq;
    ws.send(encode({ v: PROTOCOL_VERSION, t: 'synced', seq }));
    // The changes the journal had let go of are all queued at or below `seq`: the lag is theirs until it is applied.
    if (this.missingSince) this.setMissing(this.appliedSeq >= seq ? undefined : { ts: this.missingSince.ts, untilSeq: seq });
    this.resyncIncomplete = false;
    this.firstCopyIncomplete = false;
    if (full) await this.opts.journal.setMeta(this.resyncKey, undefined);
    if (grown) await this.opts.journal.setMeta(Replicator.grownKeyFor(this.consumerId), undefined);
    if (this.dirty === dirty) this.dropBitmap();
    this.log.info({ sentBytes: resync.sentBytes, seconds: (Date.now() - resync.startedAt) / 1000, consistentAt: seq }, 'resync: every differing chunk is queued');
    // Another link may have begun meanwhile (the awaits above): its welcome says where the replica stands.
    if (this.ws !== ws) return;
    resync.doneBytes = resync.totalBytes;
    this.consistentAt = seq;
    this.consistentAtFirstCopy = initial;
    this.settleConsistent();
  }

  /** Ends initial-sync or resync once the replica has applied through the seq it is consistent at. */
  private settleConsistent(): void {
    if (this.consistentAt === undefined || this.appliedSeq < this.consistentAt) return;
    if (this.state === 'initial-sync' || this.state === 'resync') {
      this.state = 'continuous';
      this.log.info({ seq: this.consistentAt }, 'the replica is consistent again');
    }
    this.consistentAt = undefined;
    this.consistentAtFirstCopy = false;
    this.resync = undefined;
  }

  private onAck(seq: number, durableSeq: number): void {
    this.appliedSeq = Math.max(this.appliedSeq, seq);
    this.settleMissing();
    this.settleConsistent();
    if (durableSeq > this.ackedSeq) {
      this.ackedSeq = durableSeq;
      this.opts.journal.ack(this.consumerId, durableSeq);
    }
    while (this.inflight.length && this.inflight[0].seq <= seq) this.inflightBytes -= this.inflight.shift()!.bytes;
    this.wake?.();
  }

  /** Sends batches while the link is this one and the window has room; waits for new entries when caught up. */
  private async ship(ws: WebSocket): Promise<void> {
    const j = this.opts.journal;
    while (!this.stopped && this.ws === ws && ws.readyState === ws.OPEN) {
      if (this.inflightBytes >= WINDOW_BYTES || ws.bufferedAmount > WINDOW_BYTES) {
        await new Promise<void>((r) => (this.wake = r));
        continue;
      }
      const committed = j.committedSeq;
      if (this.nextSeq > committed) {
        await this.nextCommit();
        continue;
      }
      if (committed - this.nextSeq + 1 < BATCH_ENTRIES && this.shippedCum !== undefined && this.shippedSeq === this.nextSeq - 1) {
        // A small batch right after the last one: wait a little for more (a trickle of small commits goes
        // out as a few batches, not one per commit). Sizes come from the entries' cumulative-size field.
        const wait = this.lastSendAt + COALESCE_MS - Date.now();
        if (wait > 0 && j.committedCum - this.shippedCum < COALESCE_BYTES) {
          await new Promise((r) => setTimeout(r, wait));
          continue;
        }
      }
      let batch: Batch;
      try {
        batch = this.readBatch();
      } catch (err) {
        return this.cannotShip(ws, err as Error);
      }
      const { data: msg, release } = batch;
      if (batch.count === 0) {
        release();
        await this.nextCommit();
        continue;
      }
      const last = batch.first + batch.count - 1;
      this.shippedSeq = last;
      this.shippedCum = batch.last ? valueCum(batch.last) : undefined;
      this.inflight.push({ seq: last, bytes: msg.length });
      this.inflightBytes += msg.length;
      this.nextSeq = last + 1;
      if (this.opts.maxRate) await this.pace(msg.length);
      if (this.ws !== ws || ws.readyState !== ws.OPEN) {
        release();
        break;
      }
      // The callback comes once the bytes are written (or the send failed): then the buffer may be reused.
      ws.send(msg, release);
      this.lastSendAt = Date.now();
    }
  }

  /** The next batch from nextSeq on, as this replayer takes it; throws what the journal's read throws. */
  private readBatch(): Batch {
    const j = this.opts.journal;
    const opts = { maxEntries: BATCH_ENTRIES, maxBytes: BATCH_BYTES, stored: this.nextSeq <= this.storedThrough };
    if (!this.records) {
      // A replayer that predates `records` is sent the same entries as msgpack maps.
      const { first, values } = j.readRecords(this.nextSeq, opts);
      const data = encode({ v: PROTOCOL_VERSION, t: 'entries', entries: values.map((v, i) => decodeValue(first + i, v)) });
      return { first, count: values.length, data, last: values[values.length - 1], release: () => undefined };
    }
    // The journal copies each value straight into the message.
    const out = this.batches.records();
    try {
      const { first, count } = j.copyRecords(this.nextSeq, out, opts);
      return { first, count, ...out.finish(first) };
    } catch (err) {
      out.discard();
      throw err;
    }
  }

  /**
   * Caught up: waits for the next commit, or for the link to close or shipping to stop (acks change nothing
   * here). No AbortController: aborting one builds a DOMException, once per ack.
   */
  private async nextCommit(): Promise<void> {
    this.wake = undefined;
    await new Promise<void>((resolve) => {
      this.interrupt = resolve;
      void this.opts.journal.waitFor(this.nextSeq - 1).then(resolve);
    });
    this.interrupt = undefined;
  }

  /**
   * The journal could not give the next batch. A corrupt entry cannot be shipped, but the image holds the
   * right bytes: the next connection resyncs the replica by digests from past that entry. Anything else: log,
   * drop the link, and let the reconnect try again.
   */
  private cannotShip(ws: WebSocket, err: Error & { seq?: number }): void {
    if (err instanceof JournalCorruptError) {
      this.corruptThrough = Math.max(this.corruptThrough, err.seq);
      this.lastError = `journal seq ${err.seq} is corrupt (${err.message}); resyncing the replica by digests past it`;
    } else {
      this.lastError = `reading the journal failed: ${err.message}`;
    }
    this.log.error({ err }, this.lastError);
    if (this.ws === ws) ws.terminate();
  }

  /** --max-rate: each message may leave once the previous ones have had their share of the second. */
  private async pace(bytes: number): Promise<void> {
    const now = Date.now();
    const at = Math.max(now, this.nextSendAt);
    this.nextSendAt = at + (bytes / this.opts.maxRate!) * 1000;
    if (at > now) await new Promise((r) => setTimeout(r, at - now));
  }

  /** Waits up to `ms` for the replica to acknowledge everything committed, then closes the link. */
  async stop(ms = 5_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.ws && this.ackedSeq < this.opts.journal.stats.committedSeq && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    this.stopped = true;
    this.wake?.();
    this.interrupt?.();
    this.ws?.close(1001, 'primary stopping');
  }
}
