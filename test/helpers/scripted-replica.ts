// A replica scripted in the test process, for in-process Replicator tests: a real ws server on a loopback port,
// speaking the replication protocol just far enough to steer the primary's side (what it welcomes at, whether
// it acknowledges, which digests it answers).
import { randomBytes } from 'node:crypto';
import { WebSocketServer, type WebSocket } from 'ws';
import { DIGEST_BYTES } from '../../src/replicator/chunk-hash.js';
import { FEATURE_RECORDS, PROTOCOL_VERSION, decode, encode } from '../../src/replicator/protocol.js';

/**
 * A replica on `port`: welcomes at `applied` (consistentFrom as given), acknowledges what it receives as durable
 * when `ack` is set, answers digest requests with digests that differ from everything (`first` of each noted).
 */
export async function scriptedReplica(port: number, opts: { applied: number; consistentFrom: number | null; ack: boolean; dropAtDigest?: number }) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port });
  await new Promise((r) => wss.once('listening', r));
  const seen = { received: opts.applied, digestFirsts: [] as number[], told: [] as string[] };
  let link: WebSocket | undefined;
  wss.on('connection', (ws) => {
    link = ws;
    ws.on('message', (raw: Buffer) => {
      const m = decode(raw);
      if (m.t === 'hello') {
        ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: opts.applied, consistentFrom: opts.consistentFrom, features: [FEATURE_RECORDS], appliedCrcs: null }));
      } else if (m.t === 'records' || m.t === 'entries') {
        const last = m.t === 'records' ? m.first + m.records.length - 1 : m.entries[m.entries.length - 1].seq;
        seen.received = Math.max(seen.received, last);
        if (opts.ack) ws.send(encode({ v: PROTOCOL_VERSION, t: 'ack', seq: last, durableSeq: last }));
      } else if (m.t === 'digests?') {
        seen.digestFirsts.push(m.first);
        if (opts.dropAtDigest !== undefined && seen.digestFirsts.length >= opts.dropAtDigest) {
          ws.terminate();
          return;
        }
        ws.send(encode({ v: PROTOCOL_VERSION, t: 'digests', id: m.id, first: m.first, appliedSeq: opts.applied, digests: randomBytes(m.count * DIGEST_BYTES) }));
      } else if (m.t === 'resync' || m.t === 'synced') {
        seen.told.push(`${m.t} ${m.t === 'resync' ? m.fromSeq : m.seq}`);
      }
    });
  });
  /** Acknowledges as durable everything received so far (for a replica that did not acknowledge until now). */
  const ackNow = () => link?.send(encode({ v: PROTOCOL_VERSION, t: 'ack', seq: seen.received, durableSeq: seen.received }));
  const close = async () => {
    link?.terminate();
    await new Promise((r) => wss.close(r));
  };
  return { seen, close, ackNow };
}
