// Digest requests that get no answer. A link that goes away while a resync waits for the replica's digests must
// end that resync (it holds the dirty bitmap and the loop's closures); the next link starts one over. Before, the
// waiting request was forgotten and the resync stayed pending forever, one more per reconnect. And `verify`
// against a replayer that stalls must end with an error instead of hanging. In process, against scripted
// replicas (real ws servers on loopback).
import t from 'tap';
import net from 'node:net';
import path from 'node:path';
import { WebSocketServer } from 'ws';
import { Journal } from '../src/journal/journal.js';
import { Replicator } from '../src/replicator/replicator.js';
import { verifyReplica } from '../src/replicator/verify.js';
import { MemoryDevice } from '../src/device/memory-device.js';
import { DIGEST_BYTES } from '../src/replicator/chunk-hash.js';
import { FEATURE_RECORDS, PROTOCOL_VERSION, decode, encode } from '../src/replicator/protocol.js';

t.test('a resync waiting for digests ends when its link drops', async (t) => {
  const j = await Journal.open({ dir: path.join(t.testdir(), 'journal') });
  t.teardown(() => j.close());
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const port = (wss.address() as net.AddressInfo).port;
  let asked = 0;
  wss.on('connection', (ws) => {
    ws.on('message', (raw: Buffer) => {
      const m = decode(raw);
      if (m.t === 'hello') ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: 0, consistentFrom: -1, features: [FEATURE_RECORDS], appliedCrcs: null }));
      if (m.t === 'digests?') {
        asked++;
        // No answer: the link goes, and no replica is there any more.
        wss.close();
        ws.terminate();
      }
    });
  });
  const source = { hashChunks: async (_first: number, count: number) => Buffer.alloc(count * DIGEST_BYTES), captureRange: async () => 0 };
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 64 * 2 ** 20, journal: j, source });
  // Counts the resyncs under way (a fault-injection seam on a private method).
  let running = 0;
  const internals = r as unknown as { runResync(ws: unknown): Promise<void> };
  const real = internals.runResync.bind(r);
  internals.runResync = (ws) => {
    running++;
    return real(ws).finally(() => running--);
  };
  r.start();
  t.teardown(() => r.stop(0));
  for (let i = 0; i < 200 && asked === 0; i++) await new Promise((res) => setTimeout(res, 10));
  t.equal(asked, 1, 'the resync asked the replica for digests');
  for (let i = 0; i < 100 && running > 0; i++) await new Promise((res) => setTimeout(res, 10));
  t.equal(running, 0, 'once the link dropped, the resync ended instead of waiting forever');
});

t.test('verify against a replayer that welcomes and then stalls ends with an error, not a hang', async (t) => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  t.teardown(() => new Promise((r) => wss.close(r)));
  const port = (wss.address() as net.AddressInfo).port;
  let asked = 0;
  wss.on('connection', (ws) => {
    ws.on('message', (raw: Buffer) => {
      const m = decode(raw);
      if (m.t === 'hello' && m.volume === 'stalls') ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: 7, consistentFrom: null }));
      if (m.t === 'digests?') asked++; // and no answer, ever
      // 'silent' gets no welcome either.
    });
  });
  const device = new MemoryDevice(4 * 2 ** 20);
  const url = `ws://127.0.0.1:${port}`;
  const started = Date.now();
  await t.rejects(verifyReplica({ device, url, volume: 'stalls', replyTimeoutMs: 500 }), { code: 'ERR_REPLICA_TIMEOUT', message: /answered no digest request/ }, 'no digests: a timeout error');
  t.equal(asked, 1, 'after asking once');
  await t.rejects(verifyReplica({ device, url, volume: 'silent', replyTimeoutMs: 500 }), { code: 'ERR_REPLICA_TIMEOUT', message: /did not welcome/ }, 'no welcome: a timeout error');
  t.ok(Date.now() - started < 5000, 'both within their timeouts');
});
