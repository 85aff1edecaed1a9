// Replication end to end with real processes: serve --replicate-to ships the journal to a replayer, which
// must converge to a byte-identical image — also after being SIGKILLed mid-stream and restarted on a
// fixed port — and refuses hostile peers with clear close codes while it keeps serving a good one.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import WebSocket from 'ws';
import { encodeValue, entryCrc } from '../src/journal/entry.js';
import { encode, PROTOCOL_VERSION } from '../src/replicator/protocol.js';
import { open } from 'lmdb';
import { converges, until } from './helpers/files.js';
import { flipStoredByte } from './helpers/journal-store.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { freePort, startReplay, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function workload(port: number, rounds: number): Promise<void> {
  // Two connections writing overlapping ranges: the journal's order decides, and the replica must follow it.
  const a = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  const b = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  for (let i = 0; i < rounds; i++) {
    const ops = [];
    for (let k = 0; k < 32; k++) {
      const c = k % 2 ? a : b;
      const off = Math.floor(Math.random() * 2048) * 4096 + Math.floor(Math.random() * 4096);
      ops.push(c.write(off, randomBytes(512 + Math.floor(Math.random() * 16384))));
    }
    await Promise.all(ops);
  }
  await a.flush();
  await a.close();
  await b.close();
}

t.test('the replica converges byte for byte, including after a SIGKILLed replayer', async (t) => {
  const dir = t.testdir();
  const port = await freePort();
  const replicas = path.join(dir, 'replicas');
  const r1 = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', r1.url], t.teardown);

  await workload(s.port, 40);
  t.ok(await converges(image, path.join(replicas, 'disk.img')), 'replica identical after catch-up');

  // Kill the replayer while a workload streams, restart it on the same port and data dir.
  const streaming = workload(s.port, 80);
  await sleep(300);
  r1.child.kill('SIGKILL');
  await r1.exited;
  await streaming;
  await sleep(500);
  const r2 = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  t.ok(await converges(image, path.join(replicas, 'disk.img')), 'after SIGKILL + restart the replica converges again');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  r2.child.kill('SIGTERM');
  t.equal(await r2.exited, 0, 'replay stops cleanly');
});

t.test('a replica image deleted while its state stays: not taken as the state says, but sent again whole', async (t) => {
  const dir = t.testdir();
  const port = await freePort();
  const replicas = path.join(dir, 'replicas');
  const replica = path.join(replicas, 'disk.img');
  const r1 = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', r1.url], t.teardown);
  await workload(s.port, 20);
  t.ok(await converges(image, replica), 'replica identical after catch-up');
  r1.child.kill('SIGTERM');
  t.equal(await r1.exited, 0, 'replay stops cleanly');
  fs.rmSync(replica); // its disk replaced, or deleted by mistake; disk.state.mdb stays
  const r2 = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  let log = '';
  r2.child.stderr!.on('data', (d) => (log += d));
  // Before: the new all-zero image was taken at the stored seq, reported consistent, and never sent anything.
  t.ok(await converges(image, replica), 'the primary sends it everything again: identical');
  t.match(log, /replica image .* is missing, though its state says seq \d+ was applied/, 'the replayer says what it found');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  r2.child.kill('SIGTERM');
  t.equal(await r2.exited, 0, 'replay stops cleanly');
});

t.test('fan-out to two sites: one stays at the head while the other is away, and both converge byte for byte', async (t) => {
  const dir = t.testdir();
  const [portA, portB] = [await freePort(), await freePort()];
  const dataA = path.join(dir, 'site-a');
  const dataB = path.join(dir, 'site-b');
  const a = await startReplay(['--listen', `127.0.0.1:${portA}`, '--data-dir', dataA], t.teardown);
  let b = await startReplay(['--listen', `127.0.0.1:${portB}`, '--data-dir', dataB], t.teardown);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(
    ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', a.url, '--replicate-to', b.url, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const admin = /admin on (http:\/\/\S+)/.exec(s.stdout())![1];
  await workload(s.port, 20);
  t.ok(await converges(image, path.join(dataA, 'disk.img')), 'site A identical');
  t.ok(await converges(image, path.join(dataB, 'disk.img')), 'site B identical');

  // Site B goes away while more is written than the journal keeps in memory (24 MiB): on its return it reads
  // from LMDB, far behind, while site A keeps reading at the head.
  b.child.kill('SIGKILL');
  await b.exited;
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  for (let round = 0; round < 12; round++) {
    await Promise.all(Array.from({ length: 32 }, () => c.write(Math.floor(Math.random() * (SIZE / 4096 - 32)) * 4096, randomBytes(128 * 1024))));
  }
  b = await startReplay(['--listen', `127.0.0.1:${portB}`, '--data-dir', dataB], t.teardown);
  const more = workload(s.port, 40);
  await c.flush();
  await c.close();
  await more;
  t.ok(await converges(image, path.join(dataA, 'disk.img')), 'site A identical after B returned');
  t.ok(await converges(image, path.join(dataB, 'disk.img')), 'site B caught up from far behind: identical');
  const st = await (await fetch(`${admin}/status`)).json();
  const replicas = st.volumes[0].replicas as Array<{ url: string; state: string; lagEntries: number }>;
  t.same(replicas.map((r) => r.url).sort(), [a.url, b.url].sort(), 'status lists both sites');
  t.ok(await until(async () => {
    const now = (await (await fetch(`${admin}/status`)).json()).volumes[0].replicas as typeof replicas;
    return now.every((r) => r.state === 'continuous' && r.lagEntries === 0);
  }, 30_000), 'both sites continuous with no lag');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a corrupt journal entry the replica still needs: serve keeps running and resyncs the replica past it', async (t) => {
  const dir = t.testdir();
  const port = await freePort();
  const replicas = path.join(dir, 'replicas');
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  const serveArgs = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal, '--replicate-to', `ws://127.0.0.1:${port}`];
  const r1 = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  let s = await startServe(serveArgs, t.teardown);
  await workload(s.port, 10);
  t.ok(await converges(image, path.join(replicas, 'disk.img')), 'replica identical before the fault');
  // The replica goes away; later writes are journaled and held for it; a clean stop checkpoints the image.
  r1.child.kill('SIGKILL');
  await r1.exited;
  await workload(s.port, 10);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  // Flip a data byte of an entry the replica has not acknowledged, behind the journal's back.
  const raw = open({ path: path.join(journal, 'journal.mdb') });
  const keys = [...raw.openDB<Buffer, number>({ name: 'entries', encoding: 'binary' }).getKeys()] as number[];
  await raw.close();
  const victim = keys[keys.length - 5];
  await flipStoredByte(journal, victim, -1, 0x40);

  s = await startServe(serveArgs, t.teardown);
  await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicas], t.teardown);
  const logged = await until(() => new RegExp(`seq ${victim} is corrupt`).test(s.stderr()), 20_000, 100);
  t.ok(logged, `serve names the corrupt seq ${victim}`);
  t.ok(await converges(image, path.join(replicas, 'disk.img')), 'the replica converges byte for byte (digest resync past the corrupt entry)');
  await workload(s.port, 5);
  t.ok(await converges(image, path.join(replicas, 'disk.img')), 'and keeps following new writes');
  t.equal(s.child.exitCode, null, 'serve is still running');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a primary whose link drops during its hello does not leave the volume busy', async (t) => {
  const dir = t.testdir();
  const r = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dir], t.teardown);
  const hello = (volume: string) => encode({ v: PROTOCOL_VERSION, t: 'hello', volume, volumeId: `id-${volume}`, size: 1 << 20 });
  /** Resolves with the first reply's type, or the close code if the link closes first. */
  const firstReply = (volume: string) =>
    new Promise<string>((resolve) => {
      const ws = new WebSocket(r.url);
      ws.on('open', () => ws.send(hello(volume)));
      ws.on('message', (d: Buffer) => {
        resolve(/welcome/.test(d.toString('latin1')) ? 'welcome' : d.toString('latin1').replace(/[^\x20-\x7e]/g, ''));
        ws.close();
      });
      ws.on('close', (code) => resolve(`closed ${code}`));
      ws.on('error', () => undefined);
    });
  for (let i = 0; i < 12; i++) {
    const volume = `cut${i}`;
    // The hello of a new volume makes the replayer create its image and state (several awaits, an fsync
    // among them); the link goes away 0-5 ms after the hello, while that is under way.
    await new Promise<void>((resolve) => {
      const ws = new WebSocket(r.url);
      ws.on('open', () => {
        ws.send(hello(volume));
        setTimeout(() => ws.terminate(), i % 6);
      });
      ws.on('close', () => resolve());
      ws.on('error', () => undefined);
    });
    await new Promise((res) => setTimeout(res, 50));
    t.equal(await firstReply(volume), 'welcome', `volume ${volume}: the next primary link is welcomed, not refused as busy`);
  }
});

t.test('hostile peers get clear close codes; nothing bad is applied', async (t) => {
  const dir = t.testdir();
  const r = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dir], t.teardown);
  const talk = (msgs: Buffer[]) =>
    new Promise<{ code: number; reason: string; replies: unknown[] }>((resolve) => {
      const ws = new WebSocket(r.url);
      const replies: unknown[] = [];
      ws.on('message', (d) => replies.push(d));
      ws.on('open', () => msgs.forEach((m) => ws.send(m)));
      ws.on('close', (code, reason) => resolve({ code, reason: reason.toString(), replies }));
      ws.on('error', () => undefined);
    });
  const hello = (volume: string, size = 1 << 20) => encode({ v: PROTOCOL_VERSION, t: 'hello', volume, volumeId: 'vol-1', size });
  const entry = (seq: number, data: Buffer, crc = entryCrc(1, 0, data.length, data)) => ({ seq, kind: 1 as const, offset: 0, length: data.length, crc, ts: 0, data });

  t.match(await talk([Buffer.from([0xc1, 0xff, 0x00])]), { code: 4000 }, 'malformed msgpack: 4000');
  t.match(await talk([encode({ v: 99, t: 'ack', seq: 1 } as never)]), { code: 4000 }, 'wrong version: 4000');
  t.match(await talk([hello('../etc')]), { code: 4000, reason: /invalid volume name/ }, 'path trick in the volume name refused');
  const bad = entry(1, Buffer.alloc(4096, 7), 12345);
  t.match(await talk([hello('v1'), encode({ v: PROTOCOL_VERSION, t: 'entries', entries: [bad] })]), { code: 4022 }, 'CRC mismatch: 4022');
  t.ok(fs.readFileSync(path.join(dir, 'v1.img')).subarray(0, 4096).equals(Buffer.alloc(4096)), 'the corrupt entry was not applied');
  t.match(await talk([hello('v1'), encode({ v: PROTOCOL_VERSION, t: 'entries', entries: [entry(5, Buffer.alloc(512, 1))] })]), { code: 4023 }, 'gap: 4023');
  // Larger is a grown volume (test/volume-size); smaller never: the replica would lose its end.
  t.match(await talk([hello('v1', 512 << 10)]), { code: 4009, reason: /never shrunk/ }, 'a primary smaller than the replica: 4009');
  t.match(
    await talk([encode({ v: PROTOCOL_VERSION, t: 'hello', volume: 'v1', volumeId: 'someone-else', size: 2 << 20 })]),
    { code: 4009, reason: /refusing to overwrite/ },
    'a different primary volume cannot take over a replica',
  );
  t.equal(fs.statSync(path.join(dir, 'v1.img')).size, 1 << 20, 'nor grow it');
  // The same checks hold for `records` batches (stored journal values, decoded at the replayer).
  const record = (e: ReturnType<typeof entry>) => encodeValue(e.kind, e.offset, e.length, e.crc, e.ts, e.data, 0);
  const records = (first: number, recs: Buffer[]) => encode({ v: PROTOCOL_VERSION, t: 'records', first, records: recs });
  t.match(await talk([hello('v1'), records(1, [record(bad)])]), { code: 4022, reason: /seq 1 .*CRC32C/ }, 'records: CRC mismatch: 4022');
  t.match(await talk([hello('v1'), records(1, [Buffer.alloc(7)])]), { code: 4022, reason: /seq 1 .*shorter than its header/ }, 'records: a truncated record: 4022');
  t.match(await talk([hello('v1'), records(5, [record(entry(5, Buffer.alloc(512, 1)))])]), { code: 4023 }, 'records: gap: 4023');
  t.ok(fs.readFileSync(path.join(dir, 'v1.img')).subarray(0, 4096).equals(Buffer.alloc(4096)), 'no bad record was applied');
  // Still serving: a good batch applies and is acknowledged.
  const good = Buffer.alloc(4096, 9);
  const res = await new Promise<boolean>((resolve) => {
    const ws = new WebSocket(r.url);
    ws.on('open', () => ws.send(hello('v1')));
    ws.on('message', (d: Buffer) => {
      const text = d.toString('latin1');
      if (text.includes('welcome')) ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries: [entry(1, good), entry(1, good)] }));
      if (text.includes('ack')) {
        ws.close();
        resolve(true);
      }
    });
    ws.on('close', () => resolve(false));
  });
  t.ok(res, 'a good primary is still served and acknowledged (duplicates in a batch ignored)');
  t.ok(fs.readFileSync(path.join(dir, 'v1.img')).subarray(0, 4096).equals(good), 'and its entry applied');
});
