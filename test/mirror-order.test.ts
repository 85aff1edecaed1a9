// The mirror layer's invariants: one order (overlapping changes reach the image in journal order even when
// the image completes them out of order), write-ahead recovery, and captureRange never regressing data.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockDevice } from '../src/device/block-device.js';
import { MemoryDevice } from '../src/device/memory-device.js';
import { Journal } from '../src/journal/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { MirrorDevice, applyEntry } from '../src/mirror/mirror-device.js';

const SIZE = 4 * 2 ** 20;

/** A real MemoryDevice whose writes complete after a random delay, so completion order differs from issue order. */
function jittery(dev: MemoryDevice, rnd: () => number): BlockDevice {
  return new Proxy(dev, {
    get(target, prop, receiver) {
      if (prop === 'write' || prop === 'writeZeroes') {
        const fn = Reflect.get(target, prop, receiver) as (...a: unknown[]) => Promise<void>;
        return (...args: unknown[]) =>
          new Promise<void>((resolve, reject) => {
            // Copy the payload now: a later write must not be visible through this one's buffer.
            const copy = args.map((a) => (Buffer.isBuffer(a) ? Buffer.from(a) : a));
            setTimeout(() => fn.apply(target, copy).then(resolve, reject), Math.floor(rnd() * 4));
          });
      }
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  }) as BlockDevice;
}

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** Rebuilds an image from zeroes + every journal entry, the way replay-local and a replica do. */
async function rebuild(journal: Journal, size: number): Promise<Buffer> {
  const dev = new MemoryDevice(size);
  let next = journal.stats.tailSeq;
  for (;;) {
    const batch = journal.read(next, { maxEntries: 256 });
    if (batch.length === 0) break;
    for (const e of batch) await applyEntry(dev, e);
    next = batch[batch.length - 1].seq + 1;
  }
  return dev.read(0, size);
}

t.test('overlapping concurrent writes reach the image in journal order', async (t) => {
  const dir = t.testdir();
  // keep: the check rebuilds from every entry, which the flush's checkpoint would otherwise let go.
  const journal = await Journal.open({ dir, keep: true });
  t.teardown(() => journal.close());
  const rnd = lcg(42);
  const mem = new MemoryDevice(SIZE);
  const mirror = await MirrorDevice.open({ device: jittery(mem, rnd), journal, checkpointIntervalMs: 0 });
  // 400 changes concentrated on a 256 KiB hot zone so most of them overlap something in flight.
  const ops: Promise<void>[] = [];
  for (let i = 0; i < 400; i++) {
    const offset = Math.floor(rnd() * 256) * 1024 + Math.floor(rnd() * 512);
    const length = 1 + Math.floor(rnd() * 16 * 1024);
    const r = rnd();
    if (r < 0.8) ops.push(mirror.write(offset, randomBytes(length)));
    else if (r < 0.9) ops.push(mirror.writeZeroes(offset, length));
    else ops.push(mirror.trim(offset, length));
  }
  await Promise.all(ops);
  await mirror.flush();
  const image = await mem.read(0, SIZE);
  const replayed = await rebuild(journal, SIZE);
  t.ok(image.equals(replayed), 'image equals zeroes + journal replayed in seq order');
  t.equal(mirror.appliedSeq, journal.stats.headSeq, 'applied watermark reached the head');
  t.equal(journal.stats.checkpointSeq, journal.stats.headSeq, 'flush moved the checkpoint to the head');
  await mirror.close();
});

t.test('a run of writes checkpoints the image by itself and lets the journal prune', async (t) => {
  const journal = await Journal.open({ dir: t.testdir() });
  t.teardown(() => journal.close());
  const mem = new MemoryDevice(SIZE);
  let flushes = 0;
  const counting = new Proxy(mem, {
    get(target, prop, receiver) {
      if (prop === 'flush') return () => (flushes++, target.flush());
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  }) as BlockDevice;
  // No timer and no FLUSH from the client: only the byte count can trigger a checkpoint.
  const mirror = await MirrorDevice.open({ device: counting, journal, checkpointIntervalMs: 0, checkpointBytes: 256 * 1024 });
  for (let i = 0; i < 200; i++) await mirror.write((i % 64) * 4096, randomBytes(4096));
  await new Promise((r) => setTimeout(r, 50));
  const s = journal.stats;
  t.ok(flushes >= 2, `the image was fsynced ${flushes} times for 800 KiB of writes`);
  t.ok(s.checkpointSeq >= 128, `checkpoint advanced to seq ${s.checkpointSeq} without a FLUSH`);
  t.equal(s.tailSeq, s.checkpointSeq + 1, 'entries up to the checkpoint were pruned');
  t.equal(s.headSeq, 200, 'every write is journaled');
  await mirror.close();
  t.equal(journal.stats.checkpointSeq, 200, 'close checkpoints the rest');
});

t.test('recovery re-applies entries after the checkpoint before serving', async (t) => {
  const dir = t.testdir();
  const data = randomBytes(64 * 1024);
  {
    // A primary that journaled changes but died before they reached the image.
    const journal = await Journal.open({ dir });
    await journal.setCheckpoint(0);
    await journal.append(EntryKind.WRITE, 4096, data.length, data).done;
    await journal.append(EntryKind.ZERO, 8192, 4096).done;
    await journal.close();
  }
  const journal = await Journal.open({ dir });
  t.teardown(() => journal.close());
  const mem = new MemoryDevice(SIZE);
  const mirror = await MirrorDevice.open({ device: mem, journal, checkpointIntervalMs: 0 });
  t.same(mirror.recovery, { fromSeq: 1, toSeq: 2, entries: 2, bytes: data.length, repaired: [] }, 'both entries re-applied');
  const expect = Buffer.from(data);
  expect.fill(0, 8192 - 4096, 8192 - 4096 + 4096);
  t.ok((await mem.read(4096, data.length)).equals(expect), 'image holds the write with the later zeroing on top');
  t.equal(journal.stats.checkpointSeq, 2, 'checkpoint moved to the head after recovery');
  await mirror.close();
});

t.test('captureRange during concurrent writes never puts older data after newer', async (t) => {
  const dir = t.testdir();
  const journal = await Journal.open({ dir });
  t.teardown(() => journal.close());
  const rnd = lcg(7);
  const mem = new MemoryDevice(SIZE);
  const mirror = await MirrorDevice.open({ device: jittery(mem, rnd), journal, checkpointIntervalMs: 0 });
  const ops: Promise<unknown>[] = [];
  for (let i = 0; i < 300; i++) {
    const offset = Math.floor(rnd() * 1024) * 1024;
    if (i % 10 === 0) ops.push(mirror.captureRange(Math.floor(rnd() * 900) * 1024, 128 * 1024));
    else ops.push(mirror.write(offset, randomBytes(8192)));
  }
  await Promise.all(ops);
  await mirror.flush();
  t.ok((await mem.read(0, SIZE)).equals(await rebuild(journal, SIZE)), 'journal with captures replays to the image');
  await t.rejects(mirror.captureRange(SIZE - 10, 100), { code: 'ERR_CAPTURE_RANGE' }, 'range past the end refused');
  await mirror.close();
});

t.test('a failed image write stops the volume instead of letting later writes overtake it', async (t) => {
  const dir = t.testdir();
  const journal = await Journal.open({ dir });
  t.teardown(() => journal.close());
  const mem = new MemoryDevice(SIZE);
  let fail = false;
  const flaky = new Proxy(mem, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (prop === 'write') {
        return (o: number, d: Buffer) => {
          if (fail) return Promise.reject(Object.assign(new Error('injected'), { code: 'EIO' }));
          return target.write(o, d);
        };
      }
      return typeof v === 'function' ? v.bind(target) : v;
    },
  }) as BlockDevice;
  const mirror = await MirrorDevice.open({ device: flaky, journal, checkpointIntervalMs: 0 });
  await mirror.write(0, Buffer.alloc(512, 1));
  fail = true;
  await t.rejects(mirror.write(0, Buffer.alloc(512, 2)), { code: 'EIO' });
  fail = false;
  await t.rejects(mirror.write(0, Buffer.alloc(512, 3)), { code: 'EIO' }, 'later writes refused, not reordered');
  await t.rejects(mirror.flush(), { code: 'EIO' }, 'flush does not claim durability');
  t.equal(journal.stats.checkpointSeq < 2, true, 'checkpoint stays below the failed seq');
  // A restart recovers: the journal holds the failed write and re-applies it.
  const mem2 = new MemoryDevice(SIZE);
  await mem2.write(0, Buffer.alloc(512, 1));
  const again = await MirrorDevice.open({ device: mem2, journal, checkpointIntervalMs: 0 });
  t.ok((await mem2.read(0, 512)).equals(Buffer.alloc(512, 2)), 'recovery applied the write that failed');
  await again.close();
});

t.test('power cut after a replied FLUSH: what was flushed survives, however pruning reused the data file since', async (t) => {
  const dir = t.testdir();
  const journal = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 });
  // The "disk" keeps of LMDB only what its last sync wrote: journal.mdb as it was after each completed sync.
  // Data files and the image keep everything (the kernel may write any page back at any time).
  const root = (journal as unknown as { root: { sync(cb: (err?: Error) => void): void } }).root;
  const realSync = root.sync.bind(root);
  let onDisk: Buffer | undefined;
  let cut = false;
  root.sync = (cb) =>
    realSync((err) => {
      if (!err && !cut) onDisk = fs.readFileSync(path.join(dir, 'journal.mdb'));
      cb(err);
    });
  const mem = new MemoryDevice(SIZE);
  const mirror = await MirrorDevice.open({ device: mem, journal, checkpointIntervalMs: 0 });
  const settle = () => new Promise((r) => setTimeout(r, 50));
  const B = 64 * 1024;
  await mirror.write(0, Buffer.alloc(B, 0xaa));
  await mirror.flush();
  await settle();
  // A ZERO then a WRITE over the same range, flushed and replied: from here 0xbb at 0 must survive anything.
  await mirror.writeZeroes(0, B);
  await mirror.write(0, Buffer.alloc(B, 0xbb));
  await mirror.flush();
  await settle();
  // One more write, never flushed, whose data lands wherever pruning let the data file be written again.
  await mirror.write(2 ** 20, Buffer.alloc(B, 0xcc));
  await settle();
  // The cut: LMDB back to its last synced state; then a restart recovers.
  cut = true;
  await mirror.close();
  await journal.close();
  fs.writeFileSync(path.join(dir, 'journal.mdb'), onDisk!);
  const again = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 });
  t.teardown(() => again.close());
  const restarted = await MirrorDevice.open({ device: mem, journal: again, checkpointIntervalMs: 0 });
  t.teardown(() => restarted.close());
  t.ok((await mem.read(0, B)).equals(Buffer.alloc(B, 0xbb)), `the flushed write is in the image after recovery (${JSON.stringify(restarted.recovery)})`);
});
