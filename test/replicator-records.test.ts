// The shipping format a primary picks from the replayer's welcome: `records` (stored journal values as they
// are) when the replayer says it takes them, msgpack `entries` maps for one that predates them. Both must carry
// the same entries, and the replayer's decoding of `records` must refuse a malformed one.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { WebSocketServer } from 'ws';
import { Journal } from '../src/journal/journal.js';
import { decodeValue } from '../src/journal/entry.js';
import { EntryKind, type JournalEntry } from '../src/journal/types.js';
import { Replicator } from '../src/replicator/replicator.js';
import { FEATURE_RECORDS, PROTOCOL_VERSION, RecordsBatch, RecordsPool, decode, encode, type Message } from '../src/replicator/protocol.js';

/** A stand-in replayer: welcomes the primary (with or without the records feature) and hands over its first batch. */
async function firstBatch(t: Test, features: string[] | undefined): Promise<{ msg: Message; datas: Buffer[] }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  t.teardown(() => new Promise<void>((r) => wss.close(() => r())));
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  const datas = [randomBytes(4096), randomBytes(100), randomBytes(65536)];
  await Promise.all(datas.map((d, i) => j.append(EntryKind.WRITE, i * 65536, d.length, d).done));
  await j.append(EntryKind.TRIM, 2 ** 20, 4096).done;
  const got = new Promise<Message>((resolve) => {
    wss.on('connection', (ws) => {
      ws.on('message', (raw: Buffer) => {
        const m = decode(raw);
        if (m.t === 'hello') ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: 0, consistentFrom: null, ...(features ? { features } : {}) }));
        else resolve(m);
      });
    });
  });
  const { port } = wss.address() as { port: number };
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 4 * 2 ** 20, journal: j });
  r.start();
  t.teardown(() => r.stop(0));
  return { msg: await got, datas };
}

function check(t: Test, entries: JournalEntry[], datas: Buffer[]): void {
  t.same(entries.map((e) => e.seq), [1, 2, 3, 4], 'seqs 1..4 in order');
  t.ok(entries.slice(0, 3).every((e, i) => e.kind === EntryKind.WRITE && e.offset === i * 65536 && e.data!.equals(datas[i])), 'write data and offsets intact');
  t.match(entries[3], { kind: EntryKind.TRIM, offset: 2 ** 20, length: 4096 });
}

t.test('a replayer that takes records gets the stored values as they are', async (t) => {
  const { msg, datas } = await firstBatch(t, [FEATURE_RECORDS]);
  t.equal(msg.t, 'records');
  if (msg.t !== 'records') return;
  t.equal(msg.first, 1);
  check(t, msg.records.map((v, i) => decodeValue(msg.first + i, v)), datas);
});

t.test('a replayer that predates records gets entries as msgpack maps', async (t) => {
  const { msg, datas } = await firstBatch(t, undefined);
  t.equal(msg.t, 'entries');
  if (msg.t !== 'entries') return;
  check(t, msg.entries, datas);
});

t.test('malformed records messages are refused by decode', async (t) => {
  t.throws(() => decode(encode({ v: 1, t: 'records', first: 0, records: [] } as unknown as Message)), { code: 'ERR_REPLICATION_PROTOCOL', message: /bad records/ });
  t.throws(() => decode(encode({ v: 1, t: 'records', first: 1, records: ['x'] } as unknown as Message)), { message: /not binary/ });
  t.throws(() => decode(encode({ v: 1, t: 'welcome', appliedSeq: 0, features: 'records' } as unknown as Message)), { message: /features/ });
  const ok = decode(encode({ v: 1, t: 'records', first: 7, records: [Buffer.alloc(40)] }));
  t.equal(ok.t, 'records');
});

t.test('entries the replica refuses as corrupt are shipped again from LMDB, verified, and the replica converges', async (t) => {
  const { ReplayServer } = await import('../src/replayer/replay-server.js');
  const { readFileSync } = await import('node:fs');
  const path = await import('node:path');
  const dir = t.testdir({ replica: {}, journal: {} });
  const server = new ReplayServer({ dataDir: path.join(dir, 'replica') });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close());
  const size = 4 * 2 ** 20;
  const j = await Journal.open({ dir: path.join(dir, 'journal') });
  t.teardown(() => j.close());
  // Registered before the writes, so the journal keeps them in its memory window.
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size, journal: j, journalFromEmpty: true });
  t.teardown(() => r.stop(0));
  const expected = Buffer.alloc(size);
  const writes = Array.from({ length: 64 }, (_, i) => ({ offset: (i * 7919 * 4096) % size, data: randomBytes(4096) }));
  await Promise.all(writes.map((w) => j.append(EntryKind.WRITE, w.offset, 4096, w.data).done));
  for (const w of writes) w.data.copy(expected, w.offset);
  // A fault in memory (the window is not re-verified before it is shipped): the replayer's CRC check finds it.
  (j as unknown as { ring: Buffer }).ring.fill(0xa5);
  const reads: boolean[] = [];
  const copyRecords = j.copyRecords.bind(j);
  j.copyRecords = (from, sink, opts) => {
    reads.push(!!opts?.stored);
    return copyRecords(from, sink, opts);
  };
  r.start();
  const deadline = Date.now() + 20_000;
  while (r.status().ackedSeq < 64 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 50));
  t.equal(r.status().ackedSeq, 64, 'the replica acknowledged every entry');
  t.equal(reads[0], false, 'the first batch was read from memory');
  t.ok(reads.includes(true), 'after the refusal the entries were read from LMDB');
  t.ok(readFileSync(path.join(dir, 'replica', 'v.img')).equals(expected), 'the replica holds exactly the written data');
});

t.test('a steady trickle of small commits is shipped in coalesced batches, and an idle link sends at once', async (t) => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  t.teardown(() => new Promise<void>((r) => wss.close(() => r())));
  const j = await Journal.open({ dir: t.testdir() });
  t.teardown(() => j.close());
  // A stand-in replayer that acknowledges every batch at once and records when each arrived.
  const batches: Array<{ at: number; first: number; count: number }> = [];
  let onBatch: (() => void) | undefined;
  wss.on('connection', (ws) => {
    ws.on('message', (raw: Buffer) => {
      const m = decode(raw);
      if (m.t === 'hello') ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: 0, consistentFrom: null, features: [FEATURE_RECORDS] }));
      else if (m.t === 'records') {
        batches.push({ at: performance.now(), first: m.first, count: m.records.length });
        const last = m.first + m.records.length - 1;
        ws.send(encode({ v: PROTOCOL_VERSION, t: 'ack', seq: last, durableSeq: last }));
        onBatch?.();
      }
    });
  });
  const { port } = wss.address() as { port: number };
  const r = new Replicator({ url: `ws://127.0.0.1:${port}`, volume: 'v', volumeId: 'vid', size: 64 * 2 ** 20, journal: j });
  r.start();
  t.teardown(() => r.stop(0));
  const data = randomBytes(4096);
  // Wait for the link: the first entry goes out alone.
  await new Promise<void>((resolve) => {
    onBatch = resolve;
    void j.append(EntryKind.WRITE, 0, 4096, data).done;
  });
  // 400 entries, one per turn of the event loop: each is its own journal commit.
  const start = performance.now();
  for (let i = 1; i <= 400; i++) {
    void j.append(EntryKind.WRITE, i * 4096, 4096, data).done;
    await new Promise((r) => setImmediate(r));
  }
  while (batches.reduce((n, b) => n + b.count, 0) < 401) await new Promise((r) => setTimeout(r, 5));
  const trickle = batches.slice(1);
  const elapsed = trickle[trickle.length - 1].at - start;
  t.same(trickle.map((b) => b.first), trickle.map((_, i) => 2 + trickle.slice(0, i).reduce((n, b) => n + b.count, 0)), 'every entry shipped once, in order');
  t.ok(trickle.length <= elapsed / 4 + 2, `${trickle.length} batches in ${elapsed.toFixed(0)} ms: at most one per 4 ms`);
  t.ok(trickle.length < 400 / 4, `400 commits went out as ${trickle.length} batches`);

  // After a quiet spell longer than the coalescing delay, a single write is shipped without waiting.
  await new Promise((r) => setTimeout(r, 50));
  const sent = performance.now();
  await new Promise<void>((resolve) => {
    onBatch = resolve;
    void j.append(EntryKind.WRITE, 0, 4096, data).done;
  });
  t.ok(performance.now() - sent < 40, `an idle link shipped the next entry in ${(performance.now() - sent).toFixed(1)} ms`);
});

t.test('RecordsPool: a buffer is handed out again only once released, and only once', async (t) => {
  const pool = new RecordsPool(64 * 1024, 2);
  const fill = (first: number) => {
    const batch = pool.records();
    randomBytes(4096).copy(batch.place(4096)!);
    return batch.finish(first);
  };
  const a = fill(7);
  const b = fill(8);
  t.not(b.data.buffer, a.data.buffer, 'a buffer not yet released is not handed out again');
  t.equal((decode(a.data) as { first: number }).first, 7, 'the first message is intact after the second was written');
  a.release();
  a.release(); // twice is harmless: the buffer must not enter the pool twice
  const c = fill(9);
  t.equal(c.data.buffer, a.data.buffer, 'a released buffer is reused');
  const d = fill(10);
  t.not(d.data.buffer, c.data.buffer, 'released once, handed out once');
  // encode() elsewhere in the process never writes into a pool's buffer (msgpackr's useBuffer target is global).
  const before = Buffer.from(c.data);
  encode({ v: PROTOCOL_VERSION, t: 'records', first: 1, records: [randomBytes(100 * 1024)] });
  t.ok(c.data.equals(before), 'a message in a pool buffer is untouched by encode()');
  b.release();
  c.release();
  d.release();
});

t.test('RecordsBatch: a records message written in place decodes as encode() of the same message', async (t) => {
  const given: Buffer[] = [];
  const pool = new RecordsPool(64 * 1024, 2);
  const fill = (batch: RecordsBatch, records: Buffer[]): number => {
    let n = 0;
    for (const r of records) {
      const dst = batch.place(r.length);
      if (!dst) break;
      r.copy(dst);
      n++;
    }
    return n;
  };
  const records = [randomBytes(40), randomBytes(4096), randomBytes(0), randomBytes(300)];
  for (const first of [1, 2 ** 32 + 5, Number.MAX_SAFE_INTEGER - 10]) {
    const batch = pool.records();
    t.equal(fill(batch, records), records.length);
    const done = batch.finish(first);
    t.same(decode(done.data), decode(encode({ v: PROTOCOL_VERSION, t: 'records', first, records })), `first ${first}: same message as encode()`);
    t.ok(done.last!.equals(records[records.length - 1]), 'last: the last record placed');
    done.release();
  }
  // A full buffer takes no further record; the message holds those placed so far.
  const many = Array.from({ length: 40 }, () => randomBytes(4000));
  const batch = pool.records();
  const n = fill(batch, many);
  t.ok(n > 10 && n < many.length, `${n} of ${many.length} records of 4000 bytes fit a 64 KiB buffer`);
  const partial = batch.finish(9);
  t.same((decode(partial.data) as { records: Buffer[] }).records, many.slice(0, n), 'the records that fit, in order');
  partial.release();
  // A first record larger than the buffer moves the message into a large buffer of its own.
  const big = randomBytes(300 * 1024);
  const b2 = new RecordsBatch(Buffer.alloc(1024), (buf) => given.push(buf));
  const dst = b2.place(big.length);
  t.equal(dst?.length, big.length, 'the first record is always placed');
  big.copy(dst!);
  const done = b2.finish(3);
  t.same(decode(done.data), decode(encode({ v: PROTOCOL_VERSION, t: 'records', first: 3, records: [big] })), 'a large first record is encoded whole');
  t.equal(given.length, 1, 'the small buffer went back to its pool at once');
  done.release();
  t.equal(given.length, 1, 'the large buffer goes back to the large pool, not the small one');
});
