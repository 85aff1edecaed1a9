// What the primary reports about a replica through the cases where the journal alone cannot say it: a replica
// away so long that a dirty bitmap stands for its changes (DESIGN.md's `bitmap` state), the same after a restart
// of serve, its return through a resync, and a new replica's first copy (`initial-sync`). The lag in seconds is
// the operator's RPO: it must count from the first change the replica lacks, not from whatever entry the
// journal still holds. In process: a Journal and Replicator against a scripted replica on a loopback port.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { Journal } from '../src/journal/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { Replicator } from '../src/replicator/replicator.js';
import { CHUNK_BYTES, DIGEST_BYTES } from '../src/replicator/chunk-hash.js';
import { freePort } from './helpers/processes.js';
import { until as untilEvery } from './helpers/files.js';
import { scriptedReplica } from './helpers/scripted-replica.js';

const until = (pred: () => boolean, ms: number) => untilEvery(pred, ms, 10);

const MiB = 2 ** 20;
const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A resync source whose digest reads wait until `open()`: the comparison stays under way meanwhile. */
function gatedSource() {
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  return {
    source: {
      hashChunks: async (_first: number, count: number) => {
        await gate;
        return Buffer.alloc(count * DIGEST_BYTES);
      },
      captureRange: async () => 0,
    },
    open,
  };
}

/** A primary of 64 chunks whose journal holds 10 writes of 4 KiB (seqs 1..10), its comparisons gated (not started). */
async function tenWritesPrimary(t: Test) {
  const j = await Journal.open({ dir: path.join(t.testdir(), 'journal'), maxBytes: 64 * MiB });
  t.teardown(() => j.close());
  const data = randomBytes(4096);
  for (let i = 0; i < 10; i++) await j.append(EntryKind.WRITE, i * data.length, data.length, data).done;
  const port = await freePort();
  const gated = gatedSource();
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 64 * CHUNK_BYTES, journal: j, source: gated.source });
  return { j, r, port, gated };
}

/**
 * The replica on `port` receives and acknowledges 1..100 and goes away; seq 101 is written, then, 1.5 s later,
 * enough to fill the journal, until the bitmap stands for the replica's changes and the journal let them go.
 * Resolves to when seq 101 was written (the first change the replica lacks).
 */
async function awayOnBitmap(t: Test, port: number, j: Journal, r: Replicator, append: () => Promise<void>): Promise<number> {
  const there = await scriptedReplica(port, { applied: 0, consistentFrom: null, ack: true });
  r.start();
  for (let i = 0; i < 100; i++) await append();
  t.ok(await until(() => r.status().ackedSeq === 100, 10_000), 'the replica acknowledged 1..100');
  await there.close();
  t.ok(await until(() => r.status().state === 'disconnected', 5_000), 'then it is disconnected');
  await append();
  const firstMissingAt = Date.now();
  await wait(1500);
  const internals = () => r as unknown as { dirty?: Uint8Array; walk?: unknown };
  const pending: Array<Promise<void>> = [];
  while (!internals().dirty && pending.length < 2000) {
    pending.push(append());
    await new Promise((res) => setImmediate(res));
    await j.setCheckpoint(j.stats.committedSeq);
  }
  t.ok(await until(() => !internals().walk && j.stats.tailSeq > 101, 20_000), `the bitmap stands for the replica's changes; the journal let them go (tail ${j.stats.tailSeq})`);
  await Promise.all(pending);
  return firstMissingAt;
}

/** serve restarts: `r` and its journal stop, a new journal and replicator open in their place and try the replica. */
async function restartServe(t: Test, dir: string, opts: Omit<ConstructorParameters<typeof Replicator>[0], 'journal'>, j: Journal, r: Replicator) {
  await r.stop(0);
  await j.close();
  const journal = await Journal.open({ dir, maxBytes: 64 * MiB });
  const replicator = new Replicator({ ...opts, journal });
  replicator.start();
  t.ok(await until(() => replicator.status().state !== 'connecting', 5_000), 'the restarted primary tried the replica');
  return { j: journal, r: replicator };
}

t.test('a replica on the dirty bitmap is reported as such, lagging from its first missing change, across a restart and until its resync is applied', async (t) => {
  const dir = path.join(t.testdir(), 'journal');
  let j = await Journal.open({ dir, maxBytes: 64 * MiB });
  t.teardown(() => j.close());
  const port = await freePort();
  const url = `ws://127.0.0.1:${port}`;
  const size = 1024 * MiB;
  const gated = gatedSource();
  const opts = { url, volume: 'v', volumeId: 'vid', size, source: gated.source };
  let r = new Replicator({ ...opts, journal: j });
  let stopped = false;
  t.teardown(() => (stopped ? undefined : r.stop(0)));
  let seq = 0;
  const data = randomBytes(256 * 1024);
  const append = () => j.append(EntryKind.WRITE, (seq++ % 4000) * 256 * 1024, data.length, data).done;

  const firstMissingAt = await awayOnBitmap(t, port, j, r, append);

  const onBitmap = (label: string) => {
    const s = r.status();
    const age = (Date.now() - firstMissingAt) / 1000;
    t.equal(s.state, 'bitmap', `${label}: state bitmap`);
    t.equal(s.appliedSeq, 100, `${label}: the replica has applied 100, not what the bitmap let the journal go of`);
    t.equal(s.lagEntries, j.stats.committedSeq - 100, `${label}: it lacks every entry after 100`);
    t.ok(s.lagSeconds >= age - 0.25, `${label}: lag ${s.lagSeconds.toFixed(2)} s counts from seq 101, written ${age.toFixed(2)} s ago`);
    t.ok(s.dirtyBytes! > 0 && s.lagBytes !== null && s.lagBytes >= s.dirtyBytes!, `${label}: lag bytes (${s.lagBytes}) include the dirty regions (${s.dirtyBytes})`);
  };
  onBitmap('away');

  // serve restarts: the saved bitmap is loaded, and the status says the same.
  ({ j, r } = await restartServe(t, dir, opts, j, r));
  onBitmap('after a restart of serve');

  // Back at 100: a resync over the dirty regions is under way (digest reads held), still lagging from seq 101.
  const back = await scriptedReplica(port, { applied: 100, consistentFrom: null, ack: true });
  t.teardown(() => back.close());
  t.ok(await until(() => r.status().state === 'resync', 10_000), `back: state resync (${r.status().state})`);
  const during = r.status();
  t.ok(during.lagSeconds >= (Date.now() - firstMissingAt) / 1000 - 0.25, `during the resync the lag still counts from seq 101 (${during.lagSeconds.toFixed(2)} s)`);
  t.ok(during.resync && during.resync.totalBytes === size, 'with its progress');

  // The comparison ends and the replica applies it all: continuous, no lag.
  gated.open();
  t.ok(await until(() => back.seen.told.some((m) => m.startsWith('synced')), 20_000), `the resync ended (${back.seen.told.join(', ')})`);
  t.ok(await until(() => r.status().state === 'continuous' && r.status().lagEntries === 0, 20_000), 'continuous once caught up');
  const after = r.status();
  t.equal(after.lagSeconds, 0, 'no lag once it has everything');
  t.equal(after.dirtyBytes, 0, 'no dirty regions');
  t.equal(after.lagBytes, 0, 'no lag bytes');
  await r.stop(0);
  stopped = true;
});

t.test('a new replica getting its first copy by digests is in initial-sync, then continuous', async (t) => {
  const j = await Journal.open({ dir: path.join(t.testdir(), 'journal'), maxBytes: 64 * MiB });
  t.teardown(() => j.close());
  const data = randomBytes(64 * 1024);
  for (let i = 0; i < 10; i++) await j.append(EntryKind.WRITE, i * data.length, data.length, data).done;
  const port = await freePort();
  const gated = gatedSource();
  // The image had data before its journal (journalFromEmpty unset): the first copy compares every chunk.
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 128 * CHUNK_BYTES, journal: j, source: gated.source });
  const replica = await scriptedReplica(port, { applied: 0, consistentFrom: -1, ack: true });
  t.teardown(() => replica.close());
  r.start();
  t.teardown(() => r.stop(0));
  t.ok(await until(() => r.status().resync !== null, 10_000), 'the comparison started');
  t.equal(r.status().state, 'initial-sync', 'a replica that never had a copy is in initial-sync');
  // Writes shipped meanwhile do not make it look continuous.
  for (let i = 0; i < 5; i++) await j.append(EntryKind.WRITE, 0, data.length, data).done;
  t.ok(await until(() => replica.seen.received >= 15, 10_000), 'new writes were shipped during the comparison');
  t.equal(r.status().state, 'initial-sync', 'and it is still initial-sync');
  gated.open();
  t.ok(await until(() => r.status().state === 'continuous', 10_000), `continuous once the comparison is done (${r.status().state})`);
});

t.test('a replica that drops after its resync over the bitmap was queued still lags from its first missing change until it applies it, across a restart', async (t) => {
  const dir = path.join(t.testdir(), 'journal');
  let j = await Journal.open({ dir, maxBytes: 64 * MiB });
  t.teardown(() => j.close());
  const port = await freePort();
  const source = { hashChunks: async (_first: number, count: number) => Buffer.alloc(count * DIGEST_BYTES), captureRange: async () => 0 };
  const opts = { url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 1024 * MiB, source };
  let r = new Replicator({ ...opts, journal: j });
  t.teardown(() => r.stop(0));
  let seq = 0;
  const data = randomBytes(256 * 1024);
  const append = () => j.append(EntryKind.WRITE, (seq++ % 4000) * 256 * 1024, data.length, data).done;
  const firstMissingAt = await awayOnBitmap(t, port, j, r, append);
  const ageOk = (label: string) => {
    const lag = r.status().lagSeconds;
    const age = (Date.now() - firstMissingAt) / 1000;
    t.ok(lag >= age - 0.25, `${label}: lag ${lag.toFixed(2)} s counts from seq 101, written ${age.toFixed(2)} s ago`);
  };

  // Back: the resync over the bitmap runs and ends (synced S), and the link drops before anything is applied.
  const back = await scriptedReplica(port, { applied: 100, consistentFrom: null, ack: false });
  t.ok(await until(() => back.seen.told.some((m) => m.startsWith('synced')), 20_000), `the resync was queued (${back.seen.told.join(', ')})`);
  await back.close();
  const fromSeq = Number(back.seen.told.find((m) => m.startsWith('resync'))!.split(' ')[1]);
  const synced = Number(back.seen.told.find((m) => m.startsWith('synced'))!.split(' ')[1]);
  ageOk('dropped before applying it');

  // It returns inconsistent (consistent once it has applied `synced`), applying nothing yet.
  const again = await scriptedReplica(port, { applied: fromSeq - 1, consistentFrom: synced, ack: false });
  t.ok(await until(() => again.seen.received > fromSeq - 1, 10_000), 'shipping resumed');
  ageOk('back, not yet consistent');
  await again.close();

  // serve restarts meanwhile.
  ({ j, r } = await restartServe(t, dir, opts, j, r));
  ageOk('after a restart of serve');

  // It applies through `synced`: the lag is the journal's again.
  const caught = await scriptedReplica(port, { applied: fromSeq - 1, consistentFrom: synced, ack: true });
  t.teardown(() => caught.close());
  t.ok(await until(() => r.status().lagEntries === 0, 20_000), 'it caught up');
  t.equal(r.status().lagSeconds, 0, 'and its lag is 0 once it has applied what the resync queued');
});

t.test('a first copy cut short is still the first copy when the replica returns, also after a restart of serve', async (t) => {
  const dir = path.join(t.testdir(), 'journal');
  let j = await Journal.open({ dir, maxBytes: 64 * MiB });
  t.teardown(() => j.close());
  const data = randomBytes(64 * 1024);
  for (let i = 0; i < 20; i++) await j.append(EntryKind.WRITE, i * data.length, data.length, data).done;
  // The journal was pruned: a new replica's copy starts past seq 1 (the replayer records fromSeq - 1).
  await j.setCheckpoint(10);
  t.ok(await until(() => j.stats.tailSeq === 11, 5_000), `the journal holds 11.. (tail ${j.stats.tailSeq})`);
  const port = await freePort();
  // Digest reads held: each comparison stays under way until its link goes.
  const opts = { url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 128 * CHUNK_BYTES, source: gatedSource().source };
  let r = new Replicator({ ...opts, journal: j });
  t.teardown(() => r.stop(0));
  const cut = await scriptedReplica(port, { applied: 0, consistentFrom: -1, ack: false, dropAtDigest: 1 });
  r.start();
  t.ok(await until(() => cut.seen.digestFirsts.length === 1, 10_000), 'the first copy began, and the link dropped at its first digest request');
  await cut.close();
  const back = await scriptedReplica(port, { applied: 10, consistentFrom: -1, ack: false });
  t.ok(await until(() => r.status().resync !== null, 10_000), 'back: the comparison starts over');
  t.equal(r.status().state, 'initial-sync', 'still the first copy');
  await back.close();

  // Cut short again, then serve restarts: the journal remembers it was the first copy.
  await r.stop(0);
  await j.close();
  j = await Journal.open({ dir, maxBytes: 64 * MiB });
  r = new Replicator({ ...opts, journal: j });
  const later = await scriptedReplica(port, { applied: 10, consistentFrom: -1, ack: false });
  t.teardown(() => later.close());
  r.start();
  t.ok(await until(() => r.status().resync !== null, 10_000), 'after the restart the comparison starts over');
  t.equal(r.status().state, 'initial-sync', 'still the first copy after a restart of serve');
});

t.test('a connected replica further behind than the link carries at once is in backlog, with few large entries too; caught up, continuous', async (t) => {
  const dir = path.join(t.testdir(), 'journal');
  const j = await Journal.open({ dir, maxBytes: 256 * MiB });
  t.teardown(() => j.close());
  const port = await freePort();
  // Receives everything the window lets through, acknowledges nothing until told.
  const script = { applied: 0, consistentFrom: null, ack: false };
  const there = await scriptedReplica(port, script);
  t.teardown(() => there.close());
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 1024 * MiB, journal: j });
  t.teardown(() => r.stop(0));
  r.start();
  const data = randomBytes(MiB);
  for (let i = 0; i < 40; i++) await j.append(EntryKind.WRITE, i * MiB, MiB, data).done;
  t.ok(await until(() => there.seen.received > 0, 5_000), 'the replica receives entries');
  const behind = r.status();
  t.equal(behind.state, 'backlog', `40 MiB unacknowledged, more than the window: backlog (${behind.lagEntries} entries, ${behind.lagBytes} bytes behind)`);
  t.ok(behind.lagEntries < 4 * 1024, 'though far fewer entries than four batches');
  script.ack = true;
  there.ackNow();
  t.ok(await until(() => r.status().lagEntries === 0, 10_000), 'acknowledged, it catches up');
  t.equal(r.status().state, 'continuous', 'and is continuous again');
});

t.test("a replica waiting for a synced seq this journal never committed (lost with its tail) is compared in full, not taken as consistent later", async (t) => {
  const { r, port, gated } = await tenWritesPrimary(t);
  // It applied 9 and was told `synced 12`: seqs 11 and 12 were lost with the journal's tail (committed is 10).
  const replica = await scriptedReplica(port, { applied: 9, consistentFrom: 12, ack: true });
  t.teardown(() => replica.close());
  r.start();
  t.teardown(() => r.stop(0));
  t.ok(await until(() => replica.seen.told.length > 0, 10_000), 'the primary answered the welcome');
  t.same(replica.seen.told, ['resync 1'], `it asked for a resync from its journal's tail on (${replica.seen.told.join(', ')})`);
  t.ok(await until(() => r.status().resync !== null, 10_000), 'and compares by digests');
  t.equal(r.status().state, 'resync');
  gated.open();
  t.ok(await until(() => replica.seen.digestFirsts.length > 0 && r.status().state === 'continuous', 10_000), `every chunk compared, then continuous (${r.status().state})`);
  t.same(replica.seen.digestFirsts[0], 0, 'from the first chunk: a full comparison');
});

t.test('a first copy queued but not yet applied is still initial-sync when the replica comes back, then continuous once applied', async (t) => {
  const { r, port, gated } = await tenWritesPrimary(t);
  gated.open();
  t.teardown(() => r.stop(0));
  // A replica that receives but does not acknowledge: the copy is queued, never applied.
  const first = await scriptedReplica(port, { applied: 0, consistentFrom: -1, ack: false });
  r.start();
  t.ok(await until(() => first.seen.told.some((m) => m.startsWith('synced')), 10_000), `the copy was queued (${first.seen.told.join(', ')})`);
  const synced = Number(first.seen.told.find((m) => m.startsWith('synced'))!.split(' ')[1]);
  t.equal(r.status().state, 'initial-sync', 'queued is not applied: still initial-sync');
  await first.close();
  t.ok(await until(() => r.status().state === 'disconnected', 5_000), 'the replica went away');
  // Back, having applied part of it and waiting for the rest (its consistentFrom is the synced seq).
  const back = await scriptedReplica(port, { applied: 3, consistentFrom: synced, ack: false });
  t.teardown(() => back.close());
  t.ok(await until(() => r.status().state !== 'disconnected' && r.status().state !== 'connecting', 10_000), 'it reconnected');
  t.equal(r.status().state, 'initial-sync', 'still its first copy, not resync');
  t.ok(await until(() => back.seen.received >= synced, 10_000), 'the rest was shipped');
  back.ackNow();
  t.ok(await until(() => r.status().state === 'continuous', 10_000), `continuous once applied through ${synced} (${r.status().state})`);
});
