// A replica that was away while the journal filled comes back: the journal must hold, again, every entry it is
// to be sent (its acknowledgement had stood for the dirty bitmap, not for the replica), and a full resync that
// an earlier run of serve left unfinished must not be narrowed to a bitmap built after the restart. In process:
// a Journal and Replicator against a scripted replica (a real ws server on a loopback port it leaves and
// comes back to).
import t from 'tap';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { Journal } from '../src/journal/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { Replicator } from '../src/replicator/replicator.js';
import { CHUNK_BYTES, DIGEST_BYTES } from '../src/replicator/chunk-hash.js';
import { freePort } from './helpers/processes.js';
import { until as untilEvery } from './helpers/files.js';
import { scriptedReplica as replica } from './helpers/scripted-replica.js';

const until = (pred: () => boolean, ms: number) => untilEvery(pred, ms, 10);

const MiB = 2 ** 20;
t.test('a replica back after its bitmap let the journal go is held from where it is, not from the bitmap\'s end', async (t) => {
  const j = await Journal.open({ dir: path.join(t.testdir(), 'journal'), maxBytes: 64 * MiB, keep: true });
  t.teardown(() => j.close());
  const port = await freePort();
  const source = { hashChunks: async (_first: number, count: number) => Buffer.alloc(count * DIGEST_BYTES), captureRange: async () => 0 };
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 1024 * MiB, journal: j, source });
  const hold = () => j.consumers().find((c) => c.id === r.consumerId)!.ackedSeq;
  let seq = 0;
  const data = randomBytes(256 * 1024);
  const append = () => j.append(EntryKind.WRITE, (seq++ % 4000) * 256 * 1024, data.length, data).done;

  // There: it receives and acknowledges 1..100.
  let there = await replica(port, { applied: 0, consistentFrom: null, ack: true });
  r.start();
  t.teardown(() => r.stop(0));
  for (let i = 0; i < 100; i++) await append();
  t.ok(await until(() => hold() === 100, 10_000), 'the replica acknowledged 1..100');
  await there.close();

  // Away: the journal fills, the bitmap is built and the journal let go of what it covers.
  await j.setCheckpoint(j.stats.committedSeq);
  const internals = r as unknown as { dirty?: Uint8Array; walk?: unknown };
  const pending: Array<Promise<void>> = [];
  while (!internals.dirty && pending.length < 2000) {
    pending.push(append());
    await new Promise((res) => setImmediate(res));
    await j.setCheckpoint(j.stats.committedSeq);
  }
  t.ok(await until(() => !internals.walk && hold() > 100, 20_000), `the bitmap stands for the entries the replica lacks (hold moved to ${hold()})`);
  await Promise.all(pending);
  const bitmapEnd = hold();

  // Back, at 100 (what it has durably), acknowledging nothing yet.
  there = await replica(port, { applied: 100, consistentFrom: null, ack: false });
  t.teardown(() => there.close());
  t.ok(await until(() => hold() < bitmapEnd, 15_000), `once it is back the journal holds from where it is (hold ${hold()}, was ${bitmapEnd})`);
  t.ok(hold() <= Math.max(100, j.stats.tailSeq - 1), `never past what it has or the journal's tail (hold ${hold()}, tail ${j.stats.tailSeq})`);
});

t.test('a full resync left unfinished by a restart of serve is not narrowed to a bitmap built after it', async (t) => {
  const dir = path.join(t.testdir(), 'journal');
  const size = 128 * CHUNK_BYTES; // two digest requests of 64 chunks
  const port = await freePort();
  const source = { hashChunks: async (_first: number, count: number) => Buffer.alloc(count * DIGEST_BYTES), captureRange: async () => 0 };
  const data = randomBytes(256 * 1024);

  // Run 1: the replica (at 2, inconsistent) gets a full comparison, and goes away at its second digest request.
  let j = await Journal.open({ dir, maxBytes: 32 * MiB });
  for (let i = 0; i < 2; i++) await j.append(EntryKind.WRITE, 0, data.length, data).done;
  const first = await replica(port, { applied: 2, consistentFrom: -1, ack: false, dropAtDigest: 2 });
  let r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size, journal: j, source });
  r.start();
  t.ok(await until(() => first.seen.digestFirsts.length === 2, 10_000), `run 1 compared chunks from ${first.seen.digestFirsts.join(' and ')}, then lost the link`);
  await first.close();
  await r.stop(0);
  await j.close();

  // Run 2 (serve restarted): while the replica is away the journal fills with writes to chunk 0 only.
  j = await Journal.open({ dir, maxBytes: 32 * MiB });
  t.teardown(() => j.close());
  r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size, journal: j, source });
  r.start();
  t.teardown(() => r.stop(0));
  const internals = r as unknown as { dirty?: Uint8Array; walk?: unknown };
  const pending: Array<Promise<void>> = [];
  while (!internals.dirty && pending.length < 1000) {
    pending.push(j.append(EntryKind.WRITE, 0, data.length, data).done);
    await new Promise((res) => setImmediate(res));
    await j.setCheckpoint(j.stats.committedSeq);
  }
  t.ok(await until(() => !!internals.dirty && !internals.walk, 20_000), 'the journal filled and a bitmap was built');
  await Promise.all(pending);

  // Back, still inconsistent: every chunk must be compared, not only chunk 0's request.
  const back = await replica(port, { applied: 2, consistentFrom: -1, ack: false });
  t.teardown(() => back.close());
  t.ok(await until(() => back.seen.told.some((m) => m.startsWith('synced')), 20_000), `the resync ended (${back.seen.told.join(', ')})`);
  t.same(back.seen.digestFirsts, [0, 64], 'both digest requests were made: the chunks run 1 never reached were compared');
});
