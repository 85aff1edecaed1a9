// Ships one volume's journal to one replica: hello → the replica's applied seq → batches from there, at most
// a window of unacknowledged bytes in flight (a replica that stops reading cannot grow our heap). Acks
// advance the journal's retention. Reconnects with exponential backoff and jitter; pings find a dead link.
import WebSocket from 'ws';
import type { Journal } from '../journal/journal.js';
import { silentLogger, type Logger } from '../util/logger.js';
import { MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode } from './protocol.js';

/** Unacknowledged bytes in flight per replica. */
const WINDOW_BYTES = 16 * 2 ** 20;
/** Per batch: bounded so one message stays far below MAX_MESSAGE_BYTES. */
const BATCH_BYTES = 4 * 2 ** 20;
const BATCH_ENTRIES = 1024;
/** Reconnect backoff: first delay and ceiling. */
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 10_000;
/** A link with no pong for this long is dead. */
const PING_INTERVAL_MS = 2_000;
const PING_TIMEOUT_MS = 6_000;

export type ReplicaState = 'connecting' | 'continuous' | 'backlog' | 'disconnected' | 'needs-resync';

export interface ReplicatorOptions {
  url: string;
  volume: string;
  volumeId: string;
  size: number;
  journal: Journal;
  logger?: Logger;
}

export class Replicator {
  private ws: WebSocket | undefined;
  private state: ReplicaState = 'connecting';
  private ackedSeq = 0;
  private nextSeq = 0;
  private inflight: Array<{ seq: number; bytes: number }> = [];
  private inflightBytes = 0;
  private stopped = false;
  private attempt = 0;
  private wake: (() => void) | undefined;
  private lastError: string | undefined;
  private readonly log: Logger;
  readonly consumerId: string;

  constructor(private readonly opts: ReplicatorOptions) {
    this.log = (opts.logger ?? silentLogger).child({ component: 'replicator', replica: opts.url, volume: opts.volume });
    this.consumerId = `replica:${opts.url}#${opts.volume}`;
    this.ackedSeq = opts.journal.registerConsumer(this.consumerId, 1).ackedSeq;
  }

  start(): void {
    this.connect();
  }

  status(): Record<string, unknown> {
    const j = this.opts.journal.stats;
    const lagEntries = Math.max(0, j.committedSeq - this.ackedSeq);
    let lagSeconds = 0;
    if (lagEntries > 0) {
      const oldest = this.opts.journal.read(this.ackedSeq + 1, { maxEntries: 1 })[0];
      if (oldest) lagSeconds = Math.max(0, (Date.now() - oldest.ts) / 1000);
    }
    return { url: this.opts.url, volume: this.opts.volume, state: this.state, ackedSeq: this.ackedSeq, lagEntries, lagSeconds, lastError: this.lastError ?? null };
  }

  private connect(): void {
    if (this.stopped) return;
    const ws = new WebSocket(this.opts.url, { maxPayload: MAX_MESSAGE_BYTES, handshakeTimeout: 10_000 });
    this.ws = ws;
    let alive = Date.now();
    const ping = setInterval(() => {
      if (Date.now() - alive > PING_TIMEOUT_MS) {
        this.log.warn('no pong: the link is dead, reconnecting');
        ws.terminate();
      } else if (ws.readyState === ws.OPEN) ws.ping();
    }, PING_INTERVAL_MS);
    ws.on('pong', () => (alive = Date.now()));
    ws.on('open', () => {
      alive = Date.now();
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume: this.opts.volume, volumeId: this.opts.volumeId, size: this.opts.size }));
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
        this.onWelcome(ws, msg.appliedSeq);
      } else if (msg.t === 'ack') {
        this.onAck(msg.seq);
      } else if (msg.t === 'error') {
        this.lastError = `${msg.code}: ${msg.message}`;
        this.log.error({ code: msg.code }, `replica refused: ${msg.message}`);
      }
    });
    ws.on('error', (err) => {
      this.lastError = err.message;
      this.log.debug({ err }, 'replication link error');
    });
    ws.on('close', () => {
      clearInterval(ping);
      this.ws = undefined;
      this.wake?.();
      if (this.state !== 'needs-resync') this.state = 'disconnected';
      if (this.stopped) return;
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt++);
      setTimeout(() => this.connect(), delay / 2 + Math.random() * (delay / 2)).unref();
    });
  }

  private onWelcome(ws: WebSocket, applied: number): void {
    const j = this.opts.journal;
    if (applied + 1 < j.stats.tailSeq) {
      // The journal no longer has what this replica needs: a hash-compare resync is required (not built yet).
      this.state = 'needs-resync';
      this.lastError = `replica is at seq ${applied} but the journal starts at ${j.stats.tailSeq}`;
      this.log.error(this.lastError);
      ws.close(1000);
      this.stopped = true;
      return;
    }
    if (applied > this.ackedSeq) {
      this.ackedSeq = applied;
      j.ack(this.consumerId, applied);
    }
    this.nextSeq = applied + 1;
    this.inflight = [];
    this.inflightBytes = 0;
    this.state = 'continuous';
    void this.ship(ws);
  }

  private onAck(seq: number): void {
    if (seq > this.ackedSeq) {
      this.ackedSeq = seq;
      this.opts.journal.ack(this.consumerId, seq);
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
      const batch = j.read(this.nextSeq, { maxEntries: BATCH_ENTRIES, maxBytes: BATCH_BYTES });
      if (batch.length === 0) {
        const ac = new AbortController();
        this.wake = () => ac.abort();
        await j.waitFor(this.nextSeq - 1, ac.signal);
        continue;
      }
      const msg = encode({ v: PROTOCOL_VERSION, t: 'entries', entries: batch });
      const last = batch[batch.length - 1].seq;
      this.inflight.push({ seq: last, bytes: msg.length });
      this.inflightBytes += msg.length;
      this.nextSeq = last + 1;
      this.state = j.stats.committedSeq - this.ackedSeq > BATCH_ENTRIES * 4 ? 'backlog' : 'continuous';
      ws.send(msg);
    }
  }

  /** Waits up to `ms` for the replica to acknowledge everything committed, then closes the link. */
  async stop(ms = 5_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.ws && this.ackedSeq < this.opts.journal.stats.committedSeq && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    this.stopped = true;
    this.wake?.();
    this.ws?.close(1001, 'primary stopping');
  }
}
