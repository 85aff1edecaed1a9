// The journal's promises: gap-free order across reopen, verified reads that name a corrupt seq, retention
// by acks and checkpoint, a cap at which appends wait, tiny TRIM/ZERO entries, and replay-local.
import t from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { open } from 'lmdb';
import { Journal } from '../src/journal/journal.js';
import { replayLocal } from '../src/journal/replay-local.js';
import { inspectJournal } from '../src/cli/commands/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { decodeValue, encodeValue, entryCrc } from '../src/journal/entry.js';
import { loadNative } from '../src/device/native.js';
import { mappedKiB } from './helpers/memory.js';
import { dataFileBytes, flipStoredByte } from './helpers/journal-store.js';
import { until } from './helpers/files.js';
import { run } from './helpers/processes.js';

t.test('appends get gap-free seqs in call order, kept across reopen', async (t) => {
  const dir = t.testdir();
  let j = await Journal.open({ dir });
  const datas = Array.from({ length: 50 }, (_, i) => randomBytes(100 + i));
  const res = datas.map((d, i) => j.append(EntryKind.WRITE, i * 1000, d.length, d));
  t.same(res.map((r) => r.seq), datas.map((_, i) => i + 1), 'seqs 1..50 assigned synchronously in call order');
  await Promise.all(res.map((r) => r.done));
  await j.close();
  j = await Journal.open({ dir });
  t.equal(j.stats.headSeq, 50);
  t.equal(j.stats.entries, 50);
  const back = j.read(1, { maxEntries: 100 });
  t.same(back.map((e) => e.seq), datas.map((_, i) => i + 1));
  t.ok(back.every((e, i) => e.data!.equals(datas[i]) && e.offset === i * 1000), 'data and offsets intact');
  t.equal(j.read(1, { maxEntries: 7 }).length, 7, 'maxEntries bounds a batch');
  t.equal(j.read(1, { maxBytes: 1 }).length, 1, 'a batch has at least one entry');
  const next = j.append(EntryKind.FLUSH, 0, 0);
  t.equal(next.seq, 51, 'seqs continue after reopen');
  await next.done;
  await j.close();
});

t.test('entries of 16 MiB and more (inline in LMDB with sync durability) reopen, read back and prune', async (t) => {
  // lmdb-js hands values over 16 MiB out of getBinaryFast as a plain Uint8Array, not a Buffer.
  for (const durability of ['sync', 'commit'] as const) {
    const dir = path.join(t.testdir(), durability);
    let j = await Journal.open({ dir, durability, maxBytes: 512 * 2 ** 20 });
    const big = [randomBytes(32 * 2 ** 20), randomBytes(16 * 2 ** 20), randomBytes(4096)];
    let offset = 0;
    for (const d of big) {
      await j.append(EntryKind.WRITE, offset, d.length, d).done;
      offset += d.length;
    }
    await j.close();
    j = await Journal.open({ dir, durability, maxBytes: 512 * 2 ** 20 });
    t.equal(j.stats.committedSeq, 3, `${durability}: reopens with its three entries`);
    const back = [1, 2, 3].map((seq) => j.read(seq, { maxEntries: 1 })[0]);
    t.ok(back.every((e, i) => e?.data?.equals(big[i])), `${durability}: read back byte for byte`);
    t.equal(j.bytesAfter(0), j.stats.storedBytes, `${durability}: sizes from the entries' headers`);
    await j.setCheckpoint(3);
    t.ok(await until(() => j.stats.tailSeq === 4, 10_000, 20), `${durability}: pruned once the image has them (tail ${j.stats.tailSeq})`);
    await j.close();
    j = await Journal.open({ dir, durability, maxBytes: 512 * 2 ** 20 });
    t.equal(j.stats.tailSeq, 4, `${durability}: and reopens pruned`);
    await j.close();
  }
});

t.test('waitFor wakes on a commit and on abort', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  let woke = false;
  const w = j.waitFor(0).then(() => (woke = true));
  await new Promise((r) => setImmediate(r));
  t.equal(woke, false, 'nothing committed yet');
  await j.append(EntryKind.ZERO, 0, 512).done;
  await w;
  t.equal(woke, true);
  const ac = new AbortController();
  const w2 = j.waitFor(5, ac.signal);
  ac.abort();
  await w2;
  t.pass('abort resolves the wait');
});

// commit durability (the default) keeps WRITE data in the segments' data files; sync durability, and journals
// written before those files, keep it in LMDB. A flipped data byte is caught in either place.
for (const [durability, where] of [['commit', 'data file'], ['sync', 'lmdb']] as const) {
  t.test(`a flipped byte in a stored entry is named by seq, never returned (${durability} durability: data in ${where})`, async (t) => {
    const dir = t.testdir();
    const j = await Journal.open({ dir, durability });
    for (let i = 0; i < 5; i++) await j.append(EntryKind.WRITE, i * 4096, 4096, randomBytes(4096)).done;
    await j.close();
    t.equal(await flipStoredByte(dir, 3, 100, 0x01), where, `entry 3's data byte is stored in the ${where}`);
    const j2 = await Journal.open({ dir, durability });
    t.teardown(() => j2.close());
    t.equal(j2.read(1, { maxEntries: 2 }).length, 2, 'entries before it still read');
    t.throws(() => j2.read(1), { code: 'ERR_JOURNAL_CORRUPT', message: /seq 3 .*CRC32C mismatch/ });
  });
}

t.test('a data file cut short: reading names the seq and how much of its data is there', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir });
  for (let i = 0; i < 3; i++) await j.append(EntryKind.WRITE, i * 4096, 4096, randomBytes(4096)).done;
  await j.close();
  fs.truncateSync(path.join(dir, 'entries.data'), 2 * 4096 + 1000);
  const j2 = await Journal.open({ dir });
  t.teardown(() => j2.close());
  t.equal(j2.read(1, { maxEntries: 2 }).length, 2, 'entries before it still read');
  t.throws(() => j2.read(1), { code: 'ERR_JOURNAL_CORRUPT', message: /seq 3 .*holds 1000 of its 4096 bytes/ });
});

t.test('stored entries are read back in runs (one preadv per run, at most 1024 buffers each), every byte in place', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir });
  const sent: Buffer[] = [];
  const appends: Array<Promise<void>> = [];
  for (let i = 0; i < 2500; i++) {
    const d = randomBytes(512 + (i % 7) * 100);
    sent.push(d);
    // A TRIM now and then: entries without data sit between the runs.
    appends.push(i % 500 === 250 ? j.append(EntryKind.TRIM, 0, 4096).done : j.append(EntryKind.WRITE, i * 4096, d.length, d).done);
  }
  await Promise.all(appends);
  await j.close();
  const again = await Journal.open({ dir });
  t.teardown(() => again.close());
  const back = again.read(1, { maxEntries: 2500, maxBytes: 64 * 2 ** 20 });
  t.equal(back.length, 2500, 'all 2500 in one read');
  const wrong = back.filter((e, i) => (i % 500 === 250 ? e.kind !== EntryKind.TRIM : !e.data!.equals(sent[i])));
  t.equal(wrong.length, 0, 'each with its own data');
  // Cut the file inside entry 2000's data: the entries before it still read, and it is named.
  const cut = back.slice(0, 1999).reduce((n, e) => n + (e.kind === EntryKind.WRITE ? e.length : 0), 0) + 100;
  fs.truncateSync(path.join(dir, 'entries.data'), cut);
  t.equal(again.read(1, { maxEntries: 1999, maxBytes: 64 * 2 ** 20 }).length, 1999, 'entries before the cut still read');
  t.throws(() => again.read(1, { maxEntries: 2500, maxBytes: 64 * 2 ** 20 }), { code: 'ERR_JOURNAL_CORRUPT', message: new RegExp(`seq 2000 .*holds 100 of its ${sent[1999].length} bytes`) });
});

t.test('a truncated last entry: the journal still opens, and reading it names the seq', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir });
  for (let i = 0; i < 3; i++) await j.append(EntryKind.WRITE, 0, 512, randomBytes(512)).done;
  await j.close();
  const raw = open({ path: path.join(dir, 'journal.mdb') });
  const entries = raw.openDB<Buffer, number>({ name: 'entries', encoding: 'binary' });
  await entries.put(3, Buffer.alloc(7)); // shorter than an entry header
  await raw.close();
  const j2 = await Journal.open({ dir });
  t.teardown(() => j2.close());
  t.equal(j2.stats.headSeq, 3, 'opened; the head is still seq 3');
  t.throws(() => j2.read(1), { code: 'ERR_JOURNAL_CORRUPT', message: /seq 3 .*shorter than its header/ });
});

t.test('a corrupt offset is caught too (the CRC covers the header)', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir });
  await j.append(EntryKind.TRIM, 4096, 4096).done;
  await j.close();
  const raw = open({ path: path.join(dir, 'journal.mdb') });
  const entries = raw.openDB<Buffer, number>({ name: 'entries', encoding: 'binary' });
  const v = Buffer.from(entries.getBinary(1)!);
  v[15] ^= 0x10; // low byte of the offset
  await entries.put(1, v);
  await raw.close();
  const j2 = await Journal.open({ dir });
  t.teardown(() => j2.close());
  t.throws(() => j2.read(1), { code: 'ERR_JOURNAL_CORRUPT', message: /seq 1 .*CRC32C mismatch/ });
});

t.test('TRIM and ZERO of 10 GiB store a few bytes', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  await j.append(EntryKind.TRIM, 0, 10 * 2 ** 30).done;
  await j.append(EntryKind.ZERO, 0, 10 * 2 ** 30).done;
  t.ok(j.stats.bytes < 100, `${j.stats.bytes} bytes for two whole-disk entries`);
});

t.test('retention: pruned only up to every consumer ack and the checkpoint', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  j.registerConsumer('a');
  j.registerConsumer('b');
  for (let i = 0; i < 20; i++) await j.append(EntryKind.WRITE, 0, 10, Buffer.alloc(10, i)).done;
  await j.setCheckpoint(15);
  j.ack('a', 12);
  j.ack('b', 8);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(j.stats.tailSeq, 9, 'kept from the slowest consumer on');
  j.ack('b', 18);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(j.stats.tailSeq, 13, 'now up to consumer a');
  j.ack('a', 20);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(j.stats.tailSeq, 16, 'never past the checkpoint (recovery needs the rest)');
  t.same(j.read(1).map((e) => e.seq)[0], 16, 'reads start at the tail');
  t.equal(j.stats.bytes, 5 * (40 + 10), 'stored bytes count exactly the 5 kept entries (40-byte header + 10 data)');
});

t.test('killed right after pruning emptied the journal: seqs go on from where they were, never reused', async (t) => {
  for (const durability of ['commit', 'sync'] as const) {
    const dir = path.join(t.testdir(), durability);
    const j = await Journal.open({ dir, durability });
    j.registerConsumer('replica');
    for (let i = 0; i < 10; i++) await j.append(EntryKind.WRITE, i * 512, 512, randomBytes(512)).done;
    await j.flush();
    j.ack('replica', 10);
    // What a SIGKILL keeps is every committed LMDB transaction: journal.mdb as it is right after the first
    // transaction that left no entry stored (the prune's), before anything else commits.
    type Txn = { transactionSync<T>(fn: () => T): T };
    const seg = (j as unknown as { segments: Array<{ db: Txn & { getKeys(o: { limit: number }): Iterable<unknown> } }> }).segments[0].db;
    const root = (j as unknown as { root: Txn }).root;
    let killedState: Buffer | undefined;
    let depth = 0; // a transaction inside another (clearSync opens one) commits with the outer one
    for (const db of [root, seg]) {
      const real = db.transactionSync.bind(db);
      db.transactionSync = <T>(fn: () => T): T => {
        depth++;
        let out: T;
        try {
          out = real(fn);
        } finally {
          depth--;
        }
        if (depth === 0 && !killedState && [...seg.getKeys({ limit: 1 })].length === 0) killedState = fs.readFileSync(path.join(dir, 'journal.mdb'));
        return out;
      };
    }
    await j.setCheckpoint(10);
    await new Promise((r) => setTimeout(r, 100));
    t.equal(j.stats.tailSeq, 11, `${durability}: every entry pruned`);
    await j.close();
    t.ok(killedState, `${durability}: the prune committed`);
    fs.writeFileSync(path.join(dir, 'journal.mdb'), killedState!);
    const again = await Journal.open({ dir, durability });
    const { seq, done } = again.append(EntryKind.WRITE, 0, 512, randomBytes(512));
    await done;
    t.equal(seq, 11, `${durability}: the next append after the restart is seq 11, not a reused one`);
    t.same(again.consumers(), [{ id: 'replica', ackedSeq: 10 }], `${durability}: the consumer is still at 10`);
    await again.close();
  }
});

t.test('retention without consumers: pruned up to the checkpoint; with keep, held until the cap needs room', async (t) => {
  const dir = t.testdir();
  const pruning = await Journal.open({ dir: path.join(dir, 'prune') });
  const keeping = await Journal.open({ dir: path.join(dir, 'keep'), keep: true, maxBytes: 4 * 1024 });
  t.teardown(async () => {
    await pruning.close();
    await keeping.close();
  });
  const block = Buffer.alloc(500, 3);
  for (const j of [pruning, keeping]) {
    for (let i = 0; i < 6; i++) await j.append(EntryKind.WRITE, i * 512, block.length, block).done;
    await j.setCheckpoint(4);
  }
  await new Promise((r) => setTimeout(r, 50));
  t.equal(pruning.stats.tailSeq, 5, 'entries the image has durably are pruned (LMDB reuses their pages)');
  t.equal(pruning.stats.ackedSeq, 4, 'ackedSeq is the checkpoint when no replica holds the journal');
  t.equal(keeping.stats.tailSeq, 1, 'keep: every entry stays for replay-local');
  t.equal(keeping.stats.ackedSeq, 4, 'keep: the same entries are done with, only not pruned');
  // 6 entries of 540 stored bytes: two more pass the 4 KiB cap, so keep gives up the checkpointed ones.
  for (let i = 0; i < 3; i++) await keeping.append(EntryKind.WRITE, 0, block.length, block).done;
  t.equal(keeping.stats.committedSeq, 9, 'appends past the cap committed once the checkpointed entries went');
  t.equal(keeping.stats.tailSeq, 5, 'keep: only what the cap needed was given up, never past the checkpoint');
});

// Three ways entries are stored: commit durability puts WRITE data in the segments' data files and LMDB holds
// headers, through writev or through LMDB's write map; sync durability keeps whole values in LMDB, where every
// read maps the data's pages and the unmapping interval is what bounds them.
for (const mode of ['writev', 'write map', 'sync'] as const) {
  const writeMap = mode === 'write map';
  const durability = mode === 'sync' ? 'sync' : 'commit';
  const how = mode === 'sync' ? 'whole in LMDB (sync durability)' : writeMap ? "in data files, headers through LMDB's write map" : 'in data files, headers with writev (the default)';
  const skip = !loadNative() ? 'the native helper is not built' : writeMap && !loadNative()?.allocate ? 'the native helper cannot allocate' : false;
  t.test(`journal entries stored ${how}: written, read and pruned, they do not pile up in RSS`, { skip }, async (t) => {
    const dir = t.testdir();
    const j = await Journal.open({ dir, writeMap, durability });
    t.equal(j.writeMap, writeMap, `the journal is written ${how}`);
    t.teardown(() => j.close());
    const file = fs.realpathSync(path.join(dir, 'journal.mdb'));
    const block = randomBytes(2 ** 20);
    // 96 MiB written while a replica is away, then read back entry by entry as its catch-up does.
    let peakWriting = 0;
    for (let i = 0; i < 96; i++) {
      await j.append(EntryKind.WRITE, i * block.length, block.length, block).done;
      peakWriting = Math.max(peakWriting, mappedKiB(file));
    }
    if (durability === 'commit') t.ok(dataFileBytes(dir) >= 96 * block.length, `the data is in the data files (${dataFileBytes(dir)} bytes), read with pread and never mapped`);
    else t.equal(dataFileBytes(dir), 0, 'sync durability writes no data files');
    let peak = 0;
    let read = 0;
    for (let seq = 1; seq <= 96; seq++) {
      const [e] = j.read(seq, { maxEntries: 1 });
      t.equal(e.seq, seq);
      if (!e.data!.equals(block)) t.fail(`seq ${seq} reads back other bytes`);
      read += e.data!.length;
      peak = Math.max(peak, mappedKiB(file));
    }
    t.equal(read, 96 * block.length, 'every entry read back, byte for byte');
    // Where reads map data (sync durability), the bound below is the unmapping at work.
    if (durability === 'sync') t.ok(peak >= 4 * 1024, `reads do map the journal in (peak ${peak} KiB), so the bounds below mean something`);
    t.ok(peak <= 16 * 1024, `no more than about the 8 MiB unmap interval (plus a batch) stays mapped while reading 96 MiB (peak ${peak} KiB)`);
    t.ok(peakWriting <= 48 * 1024, `nor while writing them (peak ${peakWriting} KiB)`);
    await j.setCheckpoint(96);
    await new Promise((r) => setTimeout(r, 100));
    t.equal(j.stats.entries, 0, 'all pruned');
    const after = mappedKiB(file);
    // What stays is the working set of the last commits, not the 96 MiB pruned: a commit maps the pages it
    // writes (through the write map, or by the kernel's fault-around next to what it reads with writev), and
    // right after pruning that is ~4 MiB of reused pages (its free list and the pages it takes from it), as in
    // a steady run of 4 KiB appends.
    t.ok(after < 8 * 1024, `after pruning ${after} KiB stay mapped`);
    // Pruned segments' files are recycled (data-files.ts): the dropped one waits as a spare, the active one
    // is written over from its start. So what stays on disk is at most those two segments (64 MiB each here),
    // and another 96 MiB written and pruned adds nothing to it.
    const SEGMENTS_KEPT = 2 * 64 * 2 ** 20 + block.length;
    if (durability === 'commit') t.ok(dataFileBytes(dir) <= SEGMENTS_KEPT, `pruned, the data files keep at most two segments (${dataFileBytes(dir)} bytes)`);
    const spares = (): string[] => fs.readdirSync(dir).filter((f) => /^spare-\d+\.data$/.test(f));
    const spareIno = durability === 'commit' ? fs.statSync(path.join(dir, spares()[0])).ino : 0;
    if (durability === 'commit') t.equal(spares().length, 1, 'the dropped segment waits as a spare');
    for (let i = 0; i < 96; i++) await j.append(EntryKind.WRITE, i * block.length, block.length, block).done;
    if (durability === 'commit') {
      const inos = fs.readdirSync(dir).filter((f) => f.endsWith('.data')).map((f) => fs.statSync(path.join(dir, f)).ino);
      t.same(spares(), [], 'the next new segment took the spare');
      t.ok(inos.includes(spareIno), 'and was written into it (the same file)');
    }
    const last = j.stats.committedSeq;
    t.same(j.read(last)[0].data, block, 'new entries write and read back');
    await j.setCheckpoint(last);
    await new Promise((r) => setTimeout(r, 100));
    t.equal(j.stats.entries, 0, 'all pruned again');
    if (durability === 'commit') t.ok(dataFileBytes(dir) <= SEGMENTS_KEPT, `and the data files still keep at most two segments (${dataFileBytes(dir)} bytes)`);
  });
}

t.test('dropped segments wait as spares up to a quarter of the cap, are reused, and are given back on demand', async (t) => {
  const dir = t.testdir();
  // A 64 MiB cap: 1 MiB segments, spares up to 16 MiB.
  const j = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 });
  t.teardown(() => j.close());
  const block = randomBytes(2 ** 20 - 4096);
  const spares = (): string[] => fs.readdirSync(dir).filter((f) => /^spare-\d+\.data$/.test(f)).sort();
  const spareBytes = (): number => spares().reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);
  const write = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) await j.append(EntryKind.WRITE, i * 2 ** 20, block.length, block).done;
  };
  await write(40);
  t.ok(j.stats.segments >= 30, `40 writes of ~1 MiB filled ${j.stats.segments} segments`);
  await j.setCheckpoint(j.stats.committedSeq);
  t.ok(await until(() => j.stats.segments === 1), `the checkpoint let the journal drop all but its active segment (${j.stats.segments} left)`);
  const kept = spares();
  t.ok(kept.length >= 8 && kept.length <= 16, `the dropped segments left ${kept.length} spares`);
  t.ok(spareBytes() <= 16 * 2 ** 20, `holding no more than a quarter of the cap (${spareBytes()} bytes)`);
  const inos = new Set(kept.map((f) => fs.statSync(path.join(dir, f)).ino));

  // The first goes into the active segment's file, written over from its start; each next one starts a segment.
  await write(kept.length + 1);
  t.same(spares(), [], 'new segments took every spare');
  const reused = fs.readdirSync(dir).filter((f) => f.endsWith('.data')).filter((f) => inos.has(fs.statSync(path.join(dir, f)).ino));
  t.equal(reused.length, kept.length, 'and were written into those files');
  const first = j.stats.tailSeq;
  const back = j.read(first, { maxEntries: kept.length + 2 });
  t.ok(back.every((e) => e.data!.equals(block)), 'entries written into recycled files read back byte for byte');

  await j.setCheckpoint(j.stats.committedSeq);
  t.ok(await until(() => j.stats.segments === 1), `pruned to one segment again (${j.stats.segments} left)`);
  const before = spareBytes();
  t.ok(before > 0, 'spares again after pruning');
  t.equal(j.releaseSpares(), before, 'releaseSpares reports the bytes the spares held');
  t.same(spares(), [], 'and deletes their files');
  await write(4);
  t.same(j.read(j.stats.committedSeq)[0].data, block, 'appends go on into new files');
});

t.test("a spare left by an earlier version (spare.data) is taken as a spare; a data file no segment names is deleted", async (t) => {
  const dir = t.testdir();
  const first = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 });
  await first.close();
  fs.writeFileSync(path.join(dir, 'spare.data'), Buffer.alloc(2 ** 20, 7));
  fs.writeFileSync(path.join(dir, 'entries.99.data'), Buffer.alloc(4096, 7));
  const ino = fs.statSync(path.join(dir, 'spare.data')).ino;
  const j = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 });
  t.teardown(() => j.close());
  t.notOk(fs.existsSync(path.join(dir, 'entries.99.data')), 'the orphan is deleted on open');
  t.ok(fs.existsSync(path.join(dir, 'spare.data')), 'the old spare is kept');
  const block = randomBytes(2 ** 20 - 4096);
  for (let i = 0; i < 3; i++) await j.append(EntryKind.WRITE, i * 2 ** 20, block.length, block).done;
  t.notOk(fs.existsSync(path.join(dir, 'spare.data')), 'a new segment took it');
  const inos = fs.readdirSync(dir).filter((f) => f.endsWith('.data')).map((f) => fs.statSync(path.join(dir, f)).ino);
  t.ok(inos.includes(ino), 'and writes into that file');
  t.ok(j.read(1, { maxEntries: 3 }).every((e) => e.data!.equals(block)), 'what it holds reads back');
});

for (const durability of ['commit', 'sync'] as const) {
t.test(`trackChanges walks a large journal in steps: every change reported, pages unmapped, the loop kept turning (${durability} durability)`, { skip: loadNative() ? false : 'the native helper is not built' }, async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir, durability });
  t.teardown(() => j.close());
  j.registerConsumer('replica'); // an absent replica holds everything, as when the journal fills
  const file = fs.realpathSync(path.join(dir, 'journal.mdb'));
  const block = randomBytes(2 ** 20);
  const n = 200;
  for (let i = 0; i < n; i++) await j.append(EntryKind.WRITE, i * 3 * block.length, block.length, block).done;
  await j.append(EntryKind.TRIM, 7 * 2 ** 30, 4096).done;
  const seen: Array<[number, number, number]> = [];
  let turns = 0;
  let walking = true;
  const spin = (): void => {
    if (!walking) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  let peak = 0;
  const walk = j.trackChanges(1, (kind, offset, length) => {
    seen.push([kind, offset, length]);
    if (seen.length % 8 === 0) peak = Math.max(peak, mappedKiB(file));
  });
  await walk;
  walking = false;
  t.equal(seen.length, n + 1, 'every stored change reported once');
  t.same(seen[0], [EntryKind.WRITE, 0, block.length], 'with its kind, offset and length');
  t.same(seen[n - 1], [EntryKind.WRITE, (n - 1) * 3 * block.length, block.length], 'up to the last write');
  t.same(seen[n], [EntryKind.TRIM, 7 * 2 ** 30, 4096], 'and the trim after it');
  t.ok(turns >= 2, `the event loop turned ${turns} times during the walk over ${n} MiB (steps of 64 MiB)`);
  // Only sync durability keeps data in LMDB, where the walk maps it; with data files it reads headers only.
  if (durability === 'sync') t.ok(peak >= 4 * 1024, `the walk maps entries in (peak ${peak} KiB), so the bound below means something`);
  t.ok(peak <= 16 * 1024, `no more than about the 8 MiB unmap interval stays mapped while walking ${n} MiB (peak ${peak} KiB)`);
  // Changes after the walk reach the listener too.
  await j.append(EntryKind.ZERO, 4096, 8192).done;
  t.same(seen[n + 1], [EntryKind.ZERO, 4096, 8192], 'a later change is reported through the installed listener');
});
}

t.test('at the cap, appends wait for space instead of failing or dropping', async (t) => {
  const j = await Journal.open({ dir: t.testdir(), maxBytes: 64 * 1024 });
  t.teardown(() => j.close());
  j.registerConsumer('replica');
  const block = Buffer.alloc(8000, 1);
  // 8 entries of 8040 stored bytes fill 64 KiB to within one entry.
  for (let i = 0; i < 8; i++) await j.append(EntryKind.WRITE, 0, block.length, block).done;
  await j.setCheckpoint(8);
  let full = false;
  j.once('full', () => (full = true));
  const blocked = j.append(EntryKind.WRITE, 0, block.length, block);
  const after = j.append(EntryKind.WRITE, 0, block.length, block);
  let settled = false;
  void blocked.done.then(() => (settled = true));
  await new Promise((r) => setTimeout(r, 100));
  t.equal(full, true, "'full' was emitted");
  t.equal(settled, false, 'the append waits while the replica holds every entry');
  t.equal(j.stats.committedSeq, 8, 'nothing past the cap was committed');
  j.ack('replica', 8);
  await blocked.done;
  await after.done;
  t.equal(j.stats.committedSeq, 10, 'both waiting appends committed, in order, once acked entries were pruned');
  t.ok(j.stats.bytes <= 64 * 1024, 'within the cap');
});

t.test('an entry larger than the cap, with appends queued behind it, is taken once the journal is empty', async (t) => {
  for (const durability of ['commit', 'sync'] as const) {
    const j = await Journal.open({ dir: path.join(t.testdir(), durability), maxBytes: 2 ** 20, durability });
    t.teardown(() => j.close());
    await j.append(EntryKind.WRITE, 0, 4096, randomBytes(4096)).done;
    // 2 MiB against a 1 MiB cap, and a small write right behind it (a client with a queue depth above one).
    const big = j.append(EntryKind.WRITE, 0, 2 ** 21, randomBytes(2 ** 21));
    const small = j.append(EntryKind.WRITE, 4096, 4096, randomBytes(4096));
    await j.setCheckpoint(1);
    const timeout = new Promise<string>((r) => setTimeout(() => r('stuck'), 3000));
    t.equal(await Promise.race([big.done.then(() => 'done'), timeout]), 'done', `${durability}: the large entry is committed`);
    // The image has it (the mirror checkpoints when the journal is full): the next one gets room.
    await j.setCheckpoint(2);
    t.equal(await Promise.race([small.done.then(() => 'done'), timeout]), 'done', `${durability}: and the one queued behind it`);
    t.equal(j.stats.committedSeq, 3, `${durability}: in order`);
  }
});

t.test('pruning large entries goes at most 16 MiB per transaction, also while appends wait for space', async (t) => {
  // Deleting an entry maps its pages until the next drop: big entries must not be pruned 256 at a time.
  const MiB = 2 ** 20;
  const steps = async (j: Journal, target: number): Promise<number[]> => {
    const out: number[] = [];
    let tail = j.stats.tailSeq;
    while (tail < target) {
      await new Promise((r) => setImmediate(r));
      if (j.stats.tailSeq !== tail) out.push(j.stats.tailSeq - tail);
      tail = j.stats.tailSeq;
    }
    return out;
  };
  const root = t.testdir();
  // sync durability deletes every pruned entry: in batches of at most 16 MiB.
  const j = await Journal.open({ dir: path.join(root, 'sync'), durability: 'sync' });
  t.teardown(() => j.close());
  j.registerConsumer('replica');
  const data = randomBytes(MiB);
  await Promise.all(Array.from({ length: 64 }, () => j.append(EntryKind.WRITE, 0, MiB, data).done));
  await j.setCheckpoint(64);
  j.ack('replica', 64);
  const free = await steps(j, 65);
  t.ok(free.length >= 4 && free.every((n) => n <= 16), `pruned in steps of ${free.join(', ')} entries of 1 MiB`);
  t.equal(j.stats.storedBytes, 0, 'sync durability: every pruned entry was deleted');

  // commit durability reclaims whole segments without reading their data: pruning 96 MiB maps little of it.
  const lazy = await Journal.open({ dir: path.join(root, 'commit') });
  t.teardown(() => lazy.close());
  lazy.registerConsumer('replica');
  for (let i = 0; i < 96; i++) await lazy.append(EntryKind.WRITE, 0, MiB, data).done;
  t.ok(lazy.stats.segments >= 2, `96 MiB of entries span ${lazy.stats.segments} segments`);
  const file = fs.realpathSync(path.join(root, 'commit', 'journal.mdb'));
  await lazy.setCheckpoint(96);
  lazy.ack('replica', 96);
  let peak = 0;
  while (lazy.stats.storedBytes > 0) {
    await new Promise((r) => setImmediate(r));
    peak = Math.max(peak, mappedKiB(file));
  }
  t.equal(lazy.stats.tailSeq, 97, 'commit durability: all pruned');
  t.equal(lazy.stats.segments, 1, 'the passed segments were dropped, the last one emptied');
  t.ok(peak <= 16 * 1024, `reclaiming 96 MiB mapped at most ${peak} KiB of the journal`);

  // A full journal: 32 entries stored, 32 waiting. The waiting ones are not counted as stored when the
  // batch is sized, or it would take entries of 1 MiB for 0.5 MiB ones.
  const full = await Journal.open({ dir: path.join(root, 'full'), maxBytes: 32 * (MiB + 64) });
  t.teardown(() => full.close());
  full.registerConsumer('replica');
  const appended = Array.from({ length: 64 }, () => full.append(EntryKind.WRITE, 0, MiB, data).done);
  await Promise.all(appended.slice(0, 32));
  t.equal(full.stats.committedSeq, 32, 'the cap holds 32 entries; 32 wait');
  await full.setCheckpoint(32);
  const stepsFull = steps(full, 33);
  full.ack('replica', 32);
  const pruned = await stepsFull;
  t.ok(pruned.every((n) => n <= 16), `pruned in steps of ${pruned.join(', ')} entries while appends waited`);
  await Promise.all(appended);
});

t.test('segments: entries span several, read back in order across reopen; passed ones are dropped, the tail persists', async (t) => {
  const dir = t.testdir();
  // A 64 MiB cap makes 1 MiB segments: 600 entries of 4 KiB fill about three.
  const cap = 64 * 2 ** 20;
  let j = await Journal.open({ dir, maxBytes: cap });
  j.registerConsumer('replica');
  const datas = Array.from({ length: 600 }, (_, i) => randomBytes(4096 - (i % 7)));
  for (let i = 0; i < datas.length; i += 20) {
    await Promise.all(datas.slice(i, i + 20).map((d, k) => j.append(EntryKind.WRITE, (i + k) * 4096, d.length, d).done));
  }
  const stored = datas.reduce((n, d) => n + d.length + 40, 0);
  t.ok(j.stats.segments >= 3, `600 entries of 4 KiB are in ${j.stats.segments} segments`);
  t.equal(j.stats.bytes, stored, 'bytes count every entry exactly');
  const check = (jj: Journal, from: number, what: string) => {
    const got: number[] = [];
    for (let seq = from; seq <= 600; ) {
      const batch = jj.read(seq, { maxEntries: 97 });
      for (const e of batch) {
        if (!e.data!.equals(datas[e.seq - 1]) || e.offset !== (e.seq - 1) * 4096) t.fail(`seq ${e.seq} differs`);
        got.push(e.seq);
      }
      seq += batch.length;
    }
    t.same(got, Array.from({ length: 601 - from }, (_, i) => from + i), what);
  };
  check(j, 1, 'every entry reads back, in order, across segment boundaries');
  await j.close();
  j = await Journal.open({ dir, maxBytes: cap });
  check(j, 1, '...and after reopen');

  // The checkpoint and the replica pass seq 400: the segments wholly before it go, the rest stays readable.
  const before = j.stats.segments;
  await j.setCheckpoint(600);
  j.ack('replica', 400);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(j.stats.tailSeq, 401, 'retained from the replica on');
  t.ok(j.stats.segments < before, `passed segments were dropped (${before} -> ${j.stats.segments})`);
  t.equal(j.stats.bytes, datas.slice(400).reduce((n, d) => n + d.length + 40, 0), 'bytes count the retained entries');
  t.ok(j.stats.storedBytes >= j.stats.bytes && j.stats.storedBytes < j.stats.bytes + 2 ** 20 + 8192, `on disk: ${j.stats.storedBytes} (at most one segment of pruned entries more)`);
  t.equal(j.read(1)[0].seq, 401, 'a read from before the tail starts at the tail');
  check(j, 401, 'the retained entries read back');
  const { storedBytes, segments } = j.stats;
  await j.close();

  j = await Journal.open({ dir, maxBytes: cap });
  t.teardown(() => j.close());
  t.equal(j.stats.tailSeq, 401, 'the tail survives a reopen, though entries before it are still stored');
  t.same([j.stats.storedBytes, j.stats.segments], [storedBytes, segments], 'the same storage is found again');
  check(j, 401, 'the retained entries read back after reopen');
  const next = j.append(EntryKind.WRITE, 0, 4096, datas[0]);
  await next.done;
  t.equal(next.seq, 601, 'seqs continue');
  await j.setCheckpoint(601);
  j.ack('replica', 601);
  await new Promise((r) => setTimeout(r, 50));
  t.same([j.stats.tailSeq, j.stats.storedBytes, j.stats.segments], [602, 0, 1], 'once everything is passed, nothing stays stored');
});

t.test('a journal written before segments (one entries database, no segment list) opens, reads, grows and drops it', async (t) => {
  const dir = t.testdir();
  // Laid out as earlier versions wrote it: seqs 1..300 in the database `entries`, and the log meta.
  const env = open({ path: path.join(dir, 'journal.mdb'), pageSize: 32 * 1024 });
  const old = env.openDB<Buffer, number>({ name: 'entries', encoding: 'binary' });
  const meta = env.openDB<unknown, string>({ name: 'meta' });
  const datas = Array.from({ length: 300 }, () => randomBytes(4096));
  let cum = 0;
  await env.transaction(() => {
    datas.forEach((d, i) => {
      const v = encodeValue(EntryKind.WRITE, i * 4096, d.length, entryCrc(EntryKind.WRITE, i * 4096, d.length, d), Date.now(), d, cum);
      cum += v.length;
      old.putSync(i + 1, v);
    });
    meta.putSync('log', { head: 300, cum });
    meta.putSync('checkpoint', 300);
  });
  await env.close();

  const cap = 64 * 2 ** 20; // 1 MiB segments
  let j = await Journal.open({ dir, maxBytes: cap });
  t.same([j.stats.headSeq, j.stats.tailSeq, j.stats.segments], [300, 1, 1], 'opened: seqs 1..300 in one segment');
  t.ok(j.read(1, { maxEntries: 300 }).every((e, i) => e.seq === i + 1 && e.data!.equals(datas[i])), 'every old entry reads back');
  j.registerConsumer('replica', 1);
  for (let i = 0; i < 600; i += 20) await Promise.all(Array.from({ length: 20 }, (_, k) => j.append(EntryKind.WRITE, 0, 4096, datas[(i + k) % 300]).done));
  t.ok(j.stats.segments >= 2, `new entries went into new segments (${j.stats.segments})`);
  // The old segment now holds old entries stored whole in LMDB and new ones with their data in its data file.
  const mixed = j.read(1, { maxEntries: 400, maxBytes: 64 * 2 ** 20 });
  t.ok(mixed.length === 400 && mixed.every((e) => e.data!.equals(datas[(e.seq - 1) % 300])), 'old entries (data in LMDB) and new ones (data in data files) read back in one read');
  t.ok(fs.existsSync(path.join(dir, 'entries.data')), "the old segment's new entries have their data in entries.data");
  await j.setCheckpoint(900);
  j.ack('replica', 700);
  await new Promise((r) => setTimeout(r, 50));
  await j.close();
  j = await Journal.open({ dir, maxBytes: cap });
  t.equal(j.stats.tailSeq, 701, 'the tail moved past the old entries');
  const back = j.read(701, { maxEntries: 200 });
  t.same(back.map((e) => e.seq), Array.from({ length: 200 }, (_, i) => 701 + i), 'the retained entries read back in order');
  t.ok(back.every((e) => e.data!.equals(datas[(e.seq - 301) % 300])), 'with their data');
  await j.close();
  const after = open({ path: path.join(dir, 'journal.mdb'), readOnly: true });
  const listed = (after.openDB<unknown, string>({ name: 'meta' }).get('segments') ?? []) as Array<[string, number]>;
  await after.close();
  t.ok(listed.length > 0 && !listed.some(([name]) => name === 'entries'), `the old database was dropped once passed (segments: ${JSON.stringify(listed)})`);
  t.notOk(fs.existsSync(path.join(dir, 'entries.data')), 'and its data file with it');
});

t.test('replay-local rebuilds the primary from base + journal, and a prefix with --until', async (t) => {
  const dir = t.testdir();
  const size = 1024 * 1024;
  const base = path.join(dir, 'base.img');
  fs.writeFileSync(base, randomBytes(size));
  const primary = Buffer.from(fs.readFileSync(base));
  const j = await Journal.open({ dir: path.join(dir, 'j') });
  let mid: Buffer | undefined;
  for (let i = 0; i < 300; i++) {
    const off = Math.floor(Math.random() * (size - 9000));
    const len = 1 + Math.floor(Math.random() * 8192);
    const r = Math.random();
    if (r < 0.7) {
      const d = randomBytes(len);
      d.copy(primary, off);
      await j.append(EntryKind.WRITE, off, len, d).done;
    } else {
      primary.fill(0, off, off + len);
      await j.append(r < 0.85 ? EntryKind.ZERO : EntryKind.TRIM, off, len).done;
    }
    if (i === 149) mid = Buffer.from(primary);
  }
  await j.close();
  const out = path.join(dir, 'out.img');
  const res = await replayLocal({ journal: path.join(dir, 'j'), base, out });
  t.equal(res.entries, 300);
  t.ok(fs.readFileSync(out).equals(primary), 'byte-identical to the primary');
  await replayLocal({ journal: path.join(dir, 'j'), base, out, until: 150 });
  t.ok(fs.readFileSync(out).equals(mid!), '--until 150 gives the state after seq 150');
});

t.test('journal inspect and replay-local only read: beside a live serve they change no file, delete none', async (t) => {
  const top = t.testdir();
  const dir = path.join(top, 'j');
  const size = 1024 * 1024;
  const live = await Journal.open({ dir, keep: true, lock: true }); // as serve opens it, and left open
  const image = Buffer.alloc(size);
  for (let i = 0; i < 200; i++) {
    const d = randomBytes(4096);
    const off = (i * 4096) % size;
    d.copy(image, off);
    await live.append(EntryKind.WRITE, off, d.length, d).done;
  }
  await live.flush();
  // A segment's data file is created just before the commit naming it: to a reader in between it looks like
  // an orphan. So does this one.
  fs.writeFileSync(path.join(dir, 'entries.77.data'), randomBytes(8192));
  // journal.mdb-lock is LMDB's table of readers, which every reader writes its slot into by design.
  const files = () =>
    fs
      .readdirSync(dir)
      .sort()
      .map((f) => (f === 'journal.mdb-lock' ? f : `${f}:${fs.readFileSync(path.join(dir, f)).toString('base64')}`));
  const before = files();

  const seen = await inspectJournal(dir, 5);
  t.equal(seen.stats.committedSeq, 200, 'inspect sees the live journal');
  t.same(seen.last.map((e) => e.seq), [196, 197, 198, 199, 200], 'and its last entries');
  const out = path.join(top, 'out.img');
  const res = await replayLocal({ journal: dir, size, out });
  t.equal(res.entries, 200);
  t.ok(fs.readFileSync(out).equals(image), 'replay-local rebuilds the image from the live journal');
  t.same(files(), before, 'every file of the journal is as it was, byte for byte, and none was deleted');

  const more = randomBytes(4096);
  await live.append(EntryKind.WRITE, 0, more.length, more).done;
  await live.flush();
  await live.close();
  const reopened = await Journal.open({ dir });
  t.equal(reopened.stats.committedSeq, 201, 'the live journal went on, and reopens with all its entries');
  t.ok(reopened.read(201)[0].data!.equals(more));
  await reopened.close();
});

t.test('a read-only open of a directory that is not there says so and creates nothing', async (t) => {
  const top = t.testdir();
  const dir = path.join(top, 'missing', 'j');
  await t.rejects(inspectJournal(dir, 5), { message: /does not exist/ }, 'inspect refuses it');
  await t.rejects(Journal.open({ dir, readOnly: true }), { code: 'ERR_NO_JOURNAL' }, 'so does a read-only Journal.open');
  t.notOk(fs.existsSync(path.join(top, 'missing')), 'and no directory was made for it');
});

for (const durability of ['commit', 'sync'] as const) {
  t.test(`repair (${durability} durability): a damaged WRITE is rewritten in place with the data given; consumers are marked`, async (t) => {
    const dir = t.testdir();
    let j = await Journal.open({ dir, durability });
    j.registerConsumer('replica');
    await j.append(EntryKind.WRITE, 8192, 4096, randomBytes(4096)).done;
    await j.append(EntryKind.TRIM, 0, 4096).done;
    await j.append(EntryKind.WRITE, 0, 512, randomBytes(512)).done;
    await j.close();
    await flipStoredByte(dir, 1, -1, 0x04);
    j = await Journal.open({ dir, durability });
    t.throws(() => j.read(1), { code: 'ERR_JOURNAL_CORRUPT', message: /seq 1 / }, 'the damage is found');
    t.same(j.storedHeader(1), { kind: EntryKind.WRITE, offset: 8192, length: 4096 }, 'its stored header is still readable');
    const mended = randomBytes(4096);
    await j.repair(1, mended);
    t.ok(j.read(1, { maxEntries: 1 })[0].data!.equals(mended), 'it reads back verified, with the data given');
    t.equal(j.repairedFrom('replica'), 1, 'the consumer is marked from seq 1');
    await t.rejects(j.repair(2, Buffer.alloc(4096)), { code: 'ERR_JOURNAL_CORRUPT', message: /cannot be repaired/ }, 'a TRIM is not a WRITE to mend');
    await t.rejects(j.repair(3, Buffer.alloc(4096)), { message: /cannot be repaired/ }, 'nor a WRITE of another length');
    await j.close();
    j = await Journal.open({ dir, durability });
    t.equal(j.read(1).length, 3, 'after reopening every entry reads back verified');
    t.equal(j.repairedFrom('replica'), 1, 'and the mark is kept');
    await j.clearRepaired('replica');
    t.equal(j.repairedFrom('replica'), undefined, 'until the consumer clears it');
    await j.close();
  });
}

t.test('replay-local refuses a pruned journal, even one with every entry pruned, instead of handing back the base', async (t) => {
  const dir = t.testdir();
  for (const pruneAll of [false, true]) {
    const jdir = path.join(dir, `j-${pruneAll}`);
    const j = await Journal.open({ dir: jdir });
    for (let i = 0; i < 4; i++) await j.append(EntryKind.WRITE, i * 4096, 4096, randomBytes(4096)).done;
    await j.setCheckpoint(pruneAll ? 4 : 2);
    for (let i = 0; i < 100 && j.stats.tailSeq === 1; i++) await new Promise((r) => setTimeout(r, 10)); // pruned in the background
    t.equal(j.stats.tailSeq, pruneAll ? 5 : 3, `pruned through seq ${pruneAll ? 4 : 2}`);
    await j.close();
    await t.rejects(replayLocal({ journal: jdir, size: 1 << 20, out: path.join(dir, 'out.img') }), { code: 'ERR_JOURNAL_PRUNED', message: /starts at seq/ }, pruneAll ? 'every entry pruned: refused' : 'refused');
  }
});

t.test('closing the journal fails appends still waiting for space instead of leaving them hanging', async (t) => {
  const j = await Journal.open({ dir: t.testdir(), maxBytes: 16 * 1024 });
  j.registerConsumer('replica');
  await j.append(EntryKind.WRITE, 0, 12000, Buffer.alloc(12000)).done;
  const waiting = j.append(EntryKind.WRITE, 0, 12000, Buffer.alloc(12000));
  const refused = t.rejects(waiting.done, { code: 'ESHUTDOWN', message: /seq 2/ });
  await j.close();
  await refused;
});

for (const durability of ['sync', 'commit'] as const) {
  t.test(`durability ${durability}: flushed appends survive a reopen`, async (t) => {
    const dir = t.testdir();
    const j = await Journal.open({ dir, durability });
    const d = randomBytes(4096);
    const done = j.append(EntryKind.WRITE, 0, d.length, d).done;
    await done;
    await j.flush();
    await j.close();
    const j2 = await Journal.open({ dir, durability });
    t.ok(j2.read(1)[0].data!.equals(d));
    await j2.close();
  });
}

t.test('bytesAfter: exact stored bytes a consumer at seq still lacks', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  for (let i = 1; i <= 10; i++) await j.append(EntryKind.WRITE, 0, i * 100, Buffer.alloc(i * 100, i)).done;
  await j.append(EntryKind.TRIM, 0, 2 ** 30).done;
  t.equal(j.bytesAfter(11), 0, 'nothing after the head');
  t.equal(j.bytesAfter(10), 40, 'a TRIM is its 40-byte header');
  t.equal(j.bytesAfter(7), 40 + (800 + 40) + (900 + 40) + (1000 + 40), 'headers plus data of 8, 9, 10 and the TRIM');
  t.equal(j.bytesAfter(0), j.stats.bytes, 'from before the tail: everything stored');
});

t.test('a released record buffer is reused once, and a stale or foreign release never hands out memory in use', async (t) => {
  const { allocData } = await import('../src/journal/entry.js');
  const { releaseBuffer } = await import('../src/util/buffer-pool.js');
  const a = allocData(4096);
  releaseBuffer(a);
  const b = allocData(4000); // the same 4 KiB capacity class
  t.equal(b.buffer, a.buffer, 'the released buffer is reused');
  t.equal(b.length, 4000);
  releaseBuffer(a); // a stale view of the buffer b now holds
  const c = allocData(4096);
  t.not(c.buffer, b.buffer, 'a second release of the same record does not put it back while b uses it');
  const plain = Buffer.allocUnsafeSlow(4096 + 40).subarray(40);
  releaseBuffer(plain);
  t.not(allocData(4096).buffer, plain.buffer, 'a buffer allocData did not make is never pooled');
  releaseBuffer(b);
  releaseBuffer(c);
});

t.test('a payload read into allocData becomes its record in place; any other buffer is copied', async (t) => {
  const { allocData, encodeValue, VALUE_HEADER } = await import('../src/journal/entry.js');
  const data = allocData(4096);
  randomBytes(4096).copy(data);
  const value = encodeValue(EntryKind.WRITE, 8192, 4096, 0, 0, data, 0);
  t.equal(value.buffer, data.buffer, 'the record is the buffer the payload was read into');
  t.equal(value.length, VALUE_HEADER + 4096);
  t.ok(decodeValue(1, value).data!.equals(data), 'and decodes to the payload');
  // Same shape, not from allocData: must be copied (it may be a view into memory someone else owns).
  const lookalike = Buffer.allocUnsafeSlow(VALUE_HEADER + 4096).subarray(VALUE_HEADER);
  randomBytes(4096).copy(lookalike);
  const copied = encodeValue(EntryKind.WRITE, 0, 4096, 0, 0, lookalike, 0);
  t.not(copied.buffer, lookalike.buffer, 'a look-alike buffer is copied, not written into');
  t.ok(decodeValue(1, copied).data!.equals(lookalike));

  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  const d = allocData(4096);
  randomBytes(4096).copy(d);
  await j.append(EntryKind.WRITE, 4096, 4096, d).done;
  t.ok(j.read(1)[0].data!.equals(d), 'an in-place record reads back intact');
});

t.test('the in-memory window serves exactly the committed bytes while it wraps with values of every size', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  j.registerConsumer('replica', 1);
  // A fixed pseudo-random sequence (xorshift): sizes from 40 bytes to 7 MiB, in batches of 1-6 per commit,
  // so values straddle the ring's end, skip over its tail and restart it.
  let x = 0x9e3779b9;
  const rand = (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  const datas: Buffer[] = [Buffer.alloc(0)];
  let checked = 0;
  let wrong = 0;
  for (let round = 0; round < 150; round++) {
    const done = [];
    for (let k = 1 + rand(6); k > 0; k--) {
      const n = rand(10) === 0 ? 1 + rand(7 * 2 ** 20) : 4096 * (1 + rand(200));
      const d = randomBytes(n);
      datas.push(d);
      done.push(j.append(EntryKind.WRITE, 0, n, d).done);
    }
    await Promise.all(done);
    const head = datas.length - 1;
    for (let from = Math.max(1, head - 40); from <= head; ) {
      const { first, values } = j.readRecords(from, { maxEntries: 1000, maxBytes: 2 ** 31 });
      values.forEach((v, i) => {
        checked++;
        if (!decodeValue(first + i, v).data!.equals(datas[first + i])) wrong++;
      });
      from = first + values.length;
    }
  }
  t.ok(checked > 3000, `${checked} values read back`);
  t.equal(wrong, 0, 'every value read right after its commit equals what was appended');
});

t.test('recent entries are read from memory, older ones from LMDB, with the same bytes either way', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir });
  // A registered consumer (a replica) is what makes the journal keep its recent values in memory.
  j.registerConsumer('replica', 1);
  // 40 MiB of 64 KiB entries, more than the in-memory ring, so the oldest are only in LMDB and the ring wraps;
  // odd sizes so values straddle the ring's end, and one 8 MiB value, too big for the ring, restarts it.
  const sizes = Array.from({ length: 640 }, (_, i) => (i === 100 ? 8 * 2 ** 20 : 64 * 1024 + ((i * 4099) % 9000)));
  const datas = sizes.map((n) => randomBytes(n));
  for (let i = 0; i < datas.length; i += 32) {
    await Promise.all(datas.slice(i, i + 32).map((d, k) => j.append(EntryKind.WRITE, (i + k) * 2 ** 24, d.length, d).done));
  }
  const all = [];
  for (let seq = 1; seq <= datas.length; ) {
    const batch = j.readRecords(seq, { maxEntries: 100 });
    t.equal(batch.first, seq, 'batches are contiguous');
    // Views into the ring are valid until the next commit: keep copies, as the replicator keeps its encoding.
    all.push(...batch.values.map((v) => Buffer.from(v)));
    seq += batch.values.length;
  }
  t.equal(all.length, datas.length);
  const entries = j.read(1, { maxEntries: 1000, maxBytes: 2 ** 30 });
  t.equal(entries.length, datas.length, 'read() crosses from LMDB into memory without a gap');
  t.ok(entries.every((e, i) => e.seq === i + 1 && e.data!.equals(datas[i]) && e.offset === i * 2 ** 24), 'every entry intact, in order');
  // Entries from read() are the caller's to keep: later commits overwrite the ring, not them.
  const last = j.read(datas.length - 1, { maxEntries: 2 });
  for (let i = 0; i < 400; i++) await j.append(EntryKind.WRITE, i * 65536, 65536, randomBytes(65536)).done;
  t.ok(last[0].data!.equals(datas[datas.length - 2]) && last[1].data!.equals(datas[datas.length - 1]), 'entries read from memory stay intact after the ring wraps');
  await j.close();
  const j2 = await Journal.open({ dir });
  t.teardown(() => j2.close());
  const stored = j2.readRecords(1, { maxEntries: all.length, maxBytes: 2 ** 30 }).values;
  t.ok(stored.length === all.length && stored.every((v, i) => v.equals(all[i])), 'what memory served equals what LMDB stored');
});

t.test('copyRecords: the same values as readRecords, from memory and from LMDB; a reader far behind stops the window and frees it', async (t) => {
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  j.registerConsumer('replica', 1);
  const internals = j as unknown as { recentOff: number[]; recentAt: number };
  const held = () => internals.recentOff.length - internals.recentAt;
  const sink = (room: number) => {
    const values: Buffer[] = [];
    let left = room;
    return {
      values,
      place(len: number) {
        if (values.length > 0 && len > left) return undefined;
        left -= len;
        const b = Buffer.alloc(len);
        values.push(b);
        return b;
      },
    };
  };
  // 40 MiB of 1 MiB entries: more than the memory window holds.
  const append = async (n: number) => {
    for (let i = 0; i < n; i += 8) await Promise.all(Array.from({ length: 8 }, (_, k) => j.append(EntryKind.WRITE, (i + k) * 2 ** 20, 2 ** 20, randomBytes(2 ** 20)).done));
  };
  await append(40);
  t.ok(held() > 0, 'recent commits are in the memory window');
  for (const from of [1, 39]) {
    const want = j.readRecords(from, { maxEntries: 5 }).values.map((v) => Buffer.from(v));
    const s = sink(2 ** 30);
    const got = j.copyRecords(from, s, { maxEntries: 5 });
    t.same({ first: got.first, count: got.count }, { first: from, count: want.length }, `from ${from}: first and count`);
    t.ok(s.values.every((v, i) => v.equals(want[i])), `from ${from}: the same bytes as readRecords (${from === 1 ? 'LMDB' : 'memory'})`);
  }
  const small = sink(3 * (2 ** 20 + 64));
  t.equal(j.copyRecords(1, small).count, 3, 'no more values than the sink has room for');
  // A reader that keeps reading far behind the window: after a while commits are no longer copied into it.
  const s1 = sink(2 ** 30);
  j.copyRecords(2, s1, { maxEntries: 4 });
  await new Promise((r) => setTimeout(r, 150));
  await append(8);
  t.equal(held(), 0, 'commits are not kept in memory while every reader is far behind');
  if (loadNative()?.releasePages) {
    // The ring held random data; its pages were given back, so they now read as zeroes (and RSS no longer counts them).
    const ring = (j as unknown as { ring: Buffer }).ring;
    t.ok(ring.subarray(2 ** 20, 2 ** 20 + 65536).every((b) => b === 0), 'the stopped window gave its memory back');
  }
  // The reader catches up (reads through the head): the window starts again with the next commit.
  let next = 6;
  while (next <= j.stats.committedSeq) next += j.copyRecords(next, sink(2 ** 30)).count;
  await append(8);
  t.equal(held(), 8, 'after the reader reached the head, the next commits are kept');
  const s2 = sink(2 ** 30);
  t.equal(j.copyRecords(next, s2).count, 8, 'the whole window is served');
  const want = j.readRecords(next, { stored: true }).values;
  t.ok(want.length === 8 && s2.values.every((v, i) => v.equals(want[i])), 'with the bytes LMDB stored');
});

t.test('a new journal directory, and a replayer data directory, are private to their owner (0700)', async (t) => {
  // The journal holds the disk's data (and, with noMemInit, page slack from serve's memory): no other local
  // user may read it. The umask cannot widen it; 0022 is the usual one.
  const old = process.umask(0o022);
  t.teardown(() => process.umask(old));
  const dir = path.join(t.testdir(), 'new', 'journal');
  const j = await Journal.open({ dir });
  t.teardown(() => j.close());
  t.equal(fs.statSync(dir).mode & 0o777, 0o700, 'the journal directory is 0700');
  const { ReplayServer } = await import('../src/replayer/replay-server.js');
  const dataDir = path.join(t.testdir(), 'replica-data');
  const server = new ReplayServer({ dataDir });
  t.teardown(() => server.close());
  t.equal(fs.statSync(dataDir).mode & 0o777, 0o700, "the replayer's data directory is 0700");
});

t.test('no file descriptor left for a new segment: appends go on in the current one, and segments start again once there are', async (t) => {
  const dir = t.testdir();
  const j = await Journal.open({ dir, maxBytes: 64 * 2 ** 20 }); // 1 MiB segments
  t.teardown(() => j.close());
  j.registerConsumer('away'); // holds every entry: segments only accumulate
  const data = randomBytes(256 * 1024);
  let seq = 0;
  const append = () => j.append(EntryKind.WRITE, (seq++ % 64) * data.length, data.length, data).done;
  await append();
  const before = j.stats.segments;
  // This process may open nothing more (EMFILE) until the limit is put back.
  const self = String(process.pid);
  const hard = (await run('prlimit', ['--pid', self, '--nofile', '--output', 'HARD', '--noheadings'])).stdout.trim();
  // Put back by a helper started beforehand and told by a signal: with no descriptor left, this process could
  // not start one (its pipes need descriptors).
  const restorer = spawn('sh', ['-c', `trap 'prlimit --pid ${self} --nofile=${hard}:${hard}; exit 0' USR1; while :; do sleep 0.05; done`], { stdio: 'ignore' });
  const restored = new Promise((r) => restorer.once('exit', r));
  t.teardown(() => restorer.kill('SIGKILL'));
  await new Promise((r) => setTimeout(r, 200)); // its trap is set
  await run('prlimit', ['--pid', self, `--nofile=${fs.readdirSync('/proc/self/fd').length + 16}:${hard}`]);
  // Then every descriptor left is taken, here.
  const held: number[] = [];
  let err: unknown;
  try {
    for (;;) held.push(fs.openSync('/dev/null', 'r'));
  } catch (e) {
    t.equal((e as NodeJS.ErrnoException).code, 'EMFILE', `no descriptor left (${held.length} taken up)`);
  }
  try {
    for (let i = 0; i < 16; i++) await append(); // 4 MiB: three segments' worth
  } catch (e) {
    err = e;
  } finally {
    for (const fd of held) fs.closeSync(fd);
    restorer.kill('SIGUSR1');
    await restored;
  }
  t.equal(err, undefined, 'every append was committed (before, the first rotation failed the journal until a restart)');
  t.equal(j.stats.segments, before, 'into the segment there was');
  for (let i = 0; i < 8; i++) await append();
  t.ok(j.stats.segments > before, `with descriptors back, new segments start again (${j.stats.segments})`);
  t.equal(j.read(1, { maxEntries: 100 }).length, seq, 'and every entry reads back');
});

t.test("a listener of the journal's full event that throws: the append still waits for room and commits, its caller never told otherwise", async (t) => {
  const j = await Journal.open({ dir: t.testdir(), maxBytes: 2 * 2 ** 20 });
  t.teardown(() => j.close());
  j.registerConsumer('r');
  j.on('full', () => {
    throw new RangeError('Array buffer allocation failed'); // as a 4 PiB volume's dirty bitmap did
  });
  const data = randomBytes(256 * 1024);
  const done: Array<Promise<void>> = [];
  let threw: unknown;
  try {
    for (let i = 0; i < 12; i++) done.push(j.append(EntryKind.WRITE, i * data.length, data.length, data).done);
  } catch (err) {
    threw = err;
  }
  t.equal(threw, undefined, 'no append threw: every one that took a seq is waiting or committed');
  t.equal(done.length, 12, 'all 12 appended (3 MiB against a 2 MiB cap: some wait for room)');
  j.ack('r', j.stats.committedSeq);
  await j.setCheckpoint(j.stats.committedSeq);
  for (let n = 0; n < 20 && j.stats.committedSeq < 12; n++) {
    j.ack('r', j.stats.committedSeq);
    await j.setCheckpoint(j.stats.committedSeq);
    await new Promise((r) => setTimeout(r, 50));
  }
  await Promise.all(done);
  t.equal(j.stats.committedSeq, 12, 'once there was room, all of them committed');
});

t.test("inspect reports the cap, durability and write map the writer opened the journal with, not its own defaults", async (t) => {
  const dir = path.join(t.testdir(), 'j');
  const w = await Journal.open({ dir, maxBytes: 64 * 2 ** 20, writeMap: true, keep: true });
  await w.append(EntryKind.WRITE, 0, 4096, randomBytes(4096)).done;
  const seen = await inspectJournal(dir, 1);
  t.equal(seen.stats.maxBytes, 64 * 2 ** 20, 'the cap it was opened with, while it is open');
  t.same(seen.openedWith, { maxBytes: 64 * 2 ** 20, writeMap: w.writeMap, durability: 'commit', keep: true }, 'and the options');
  t.equal(seen.writeMap, w.writeMap, 'the write map as the writer has it');
  await w.close();
  const again = await Journal.open({ dir, maxBytes: 128 * 2 ** 20 });
  await again.close();
  t.same((await inspectJournal(dir, 1)).openedWith, { maxBytes: 128 * 2 ** 20, writeMap: false, durability: 'commit', keep: false }, 'the last writer\'s, after another opened it');
});
