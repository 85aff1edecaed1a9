// Online verify (DRBD's `verify`): compares an image with its replica by chunk digests through the replayer,
// with no copy over the wire. While the primary keeps writing, a chunk can differ only because the replica
// has not applied the latest writes yet, so differing chunks are compared again after a pause; what still
// differs after every retry is reported as differing ranges.
import WebSocket from 'ws';
import type { BlockDevice } from '../device/block-device.js';
import { BlockferryError } from '../util/errors.js';
import { CHUNKS_PER_REQUEST, CHUNK_BYTES, chunkCount, differingChunks, hashChunks } from './chunk-hash.js';
import { MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode, type Message } from './protocol.js';

export interface VerifyOptions {
  device: BlockDevice;
  url: string;
  volume: string;
  /** Extra comparisons of differing chunks, `retryDelayMs` apart, before they count as different. */
  retries?: number;
  token?: string;
  tls?: { options: Record<string, unknown>; checkPeer?: (socket: unknown) => string | undefined };
  retryDelayMs?: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** How long the replayer may take to welcome the verify link, or to answer one digest request (default 60 s). */
  replyTimeoutMs?: number;
}

/**
 * A replayer answers a digest request (64 chunks, 16 MiB read) in well under a second when it is well; one that
 * accepted the link and then stalls (stopped, its disk hung) would otherwise hold `verify` forever.
 */
const REPLY_TIMEOUT_MS = 60_000;

export interface VerifyReport {
  volume: string;
  size: number;
  chunkBytes: number;
  identical: boolean;
  /** Merged byte ranges that still differed after every retry. */
  differing: Array<{ offset: number; length: number }>;
  differingBytes: number;
  /** The replica's applied seq at the last comparison. */
  replicaSeq: number;
  replicaConsistent: boolean;
  seconds: number;
}

/** One verify connection to a replayer: hello as `verify`, then digest requests answered in order. */
class DigestClient {
  private readonly waiters = new Map<number, { resolve: (m: Extract<Message, { t: 'digests' }>) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private failure: Error | undefined;

  private constructor(
    private readonly ws: WebSocket,
    private readonly replyTimeoutMs: number,
  ) {
    ws.on('message', (raw: Buffer) => {
      let msg: Message;
      try {
        msg = decode(raw);
      } catch (err) {
        return this.abort(err as Error);
      }
      if (msg.t === 'digests') {
        this.waiters.get(msg.id)?.resolve(msg);
        this.waiters.delete(msg.id);
      } else if (msg.t === 'error') {
        this.abort(new BlockferryError(msg.code, `the replayer refused: ${msg.message}`));
      }
    });
    ws.on('close', (code, reason) => this.abort(new BlockferryError('ERR_REPLICA_CLOSED', `the replayer closed the connection (${code} ${reason.toString()})`)));
    ws.on('error', (err) => this.abort(err));
  }

  static connect(
    url: string,
    volume: string,
    size: number,
    auth: { token?: string; tls?: VerifyOptions['tls'] } = {},
    replyTimeoutMs = REPLY_TIMEOUT_MS,
  ): Promise<{ client: DigestClient; welcome: Extract<Message, { t: 'welcome' }> }> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { maxPayload: MAX_MESSAGE_BYTES, handshakeTimeout: 10_000, perMessageDeflate: false, ...(auth.tls?.options ?? {}) });
      const silent = setTimeout(() => {
        ws.terminate();
        reject(new BlockferryError('ERR_REPLICA_TIMEOUT', `the replayer at ${url} did not welcome the verify link within ${replyTimeoutMs / 1000} s`));
      }, replyTimeoutMs);
      ws.once('close', () => clearTimeout(silent));
      ws.on('upgrade', (res) => {
        const err = auth.tls?.checkPeer?.(res.socket);
        if (err) {
          ws.terminate();
          reject(new BlockferryError('ERR_REPLICA_CERTIFICATE', err));
        }
      });
      const onError = (err: Error) => reject(new BlockferryError('ERR_REPLICA_UNREACHABLE', `cannot reach the replayer at ${url}: ${err.message}`));
      ws.once('error', onError);
      ws.once('open', () => ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume, volumeId: '', size, role: 'verify', ...(auth.token ? { token: auth.token } : {}) })));
      ws.once('message', (raw: Buffer) => {
        clearTimeout(silent);
        ws.off('error', onError);
        let msg: Message;
        try {
          msg = decode(raw);
        } catch (err) {
          ws.terminate();
          return reject(err);
        }
        if (msg.t === 'error') {
          ws.terminate();
          return reject(new BlockferryError(msg.code, `the replayer refused: ${msg.message}`));
        }
        if (msg.t !== 'welcome') {
          ws.terminate();
          return reject(new BlockferryError('ERR_REPLICATION_PROTOCOL', `expected welcome, got ${msg.t}`));
        }
        resolve({ client: new DigestClient(ws, replyTimeoutMs), welcome: msg });
      });
      ws.once('close', (code, reason) => reject(new BlockferryError('ERR_REPLICA_CLOSED', `the replayer closed the connection (${code} ${reason.toString()})`)));
    });
  }

  digests(first: number, count: number): Promise<Extract<Message, { t: 'digests' }>> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.abort(new BlockferryError('ERR_REPLICA_TIMEOUT', `the replayer answered no digest request (chunks ${first}-${first + count - 1}) within ${this.replyTimeoutMs / 1000} s`));
        this.ws.terminate();
      }, this.replyTimeoutMs);
      const done = () => clearTimeout(timer);
      this.waiters.set(id, {
        resolve: (m) => {
          done();
          resolve(m);
        },
        reject: (e) => {
          done();
          reject(e);
        },
      });
      this.ws.send(encode({ v: PROTOCOL_VERSION, t: 'digests?', id, first, count }));
    });
  }

  private abort(err: Error): void {
    this.failure ??= err;
    for (const w of this.waiters.values()) w.reject(this.failure);
    this.waiters.clear();
  }

  close(): void {
    this.ws.close(1000);
  }
}

export async function verifyReplica(opts: VerifyOptions): Promise<VerifyReport> {
  const started = Date.now();
  const { device: dev } = opts;
  const retries = opts.retries ?? 5;
  const delay = opts.retryDelayMs ?? 1000;
  const { client, welcome } = await DigestClient.connect(opts.url, opts.volume, dev.size, { token: opts.token, tls: opts.tls }, opts.replyTimeoutMs);
  let replicaSeq = welcome.appliedSeq;
  try {
    const total = chunkCount(dev.size);
    let suspects: number[] = [];
    for (let first = 0; first < total; first += CHUNKS_PER_REQUEST) {
      const count = Math.min(CHUNKS_PER_REQUEST, total - first);
      const [theirs, ours] = await Promise.all([client.digests(first, count), hashChunks(dev, first, count)]);
      replicaSeq = theirs.appliedSeq;
      for (const i of differingChunks(ours, theirs.digests)) suspects.push(first + i);
      opts.onProgress?.(Math.min(dev.size, (first + count) * CHUNK_BYTES), dev.size);
    }
    for (let attempt = 0; attempt < retries && suspects.length > 0; attempt++) {
      await new Promise((r) => setTimeout(r, delay));
      const still: number[] = [];
      for (const c of suspects) {
        const [theirs, ours] = await Promise.all([client.digests(c, 1), hashChunks(dev, c, 1)]);
        replicaSeq = theirs.appliedSeq;
        if (differingChunks(ours, theirs.digests).length > 0) still.push(c);
      }
      suspects = still;
    }
    const differing: VerifyReport['differing'] = [];
    for (const c of suspects) {
      const offset = c * CHUNK_BYTES;
      const length = Math.min(CHUNK_BYTES, dev.size - offset);
      const prev = differing[differing.length - 1];
      if (prev && prev.offset + prev.length === offset) prev.length += length;
      else differing.push({ offset, length });
    }
    const final = await client.digests(0, 1);
    return {
      volume: opts.volume,
      size: dev.size,
      chunkBytes: CHUNK_BYTES,
      identical: differing.length === 0,
      differing,
      differingBytes: differing.reduce((a, r) => a + r.length, 0),
      replicaSeq: final.appliedSeq,
      replicaConsistent: welcome.consistentFrom === null || welcome.consistentFrom === undefined,
      seconds: (Date.now() - started) / 1000,
    };
  } finally {
    client.close();
  }
}
