// What a power cut can leave with `--durability commit` (the default): writes replied after the last FLUSH whose
// LMDB records reached the disk while their data (in the segment's data file) did not, and an image that kept
// some of those writes and lost others. Nothing of that was promised durable; serve must still start, keep
// every write replied before a replied FLUSH, mend the damaged entries so base + journal rebuilds the image,
// and bring a replica that had applied the lost writes back to the primary's bytes.
//
// The cut is made after a SIGKILL (which loses nothing by itself) by zeroing the data of the unflushed WRITEs
// in the data file, as blocks never written back read, and putting back zeroes in the image for half of them.
import t from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { open } from 'lmdb';
import { EntryKind } from '../src/journal/types.js';
import { converges, until } from './helpers/files.js';
import { storedEntries, zeroStoredData } from './helpers/journal-store.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, freePort, run, startReplay, startServe } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;
const BLOCK = 64 * 1024;

t.test('a power cut leaves unflushed entries without their data: serve mends them from the image and the replica follows', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  const port = await freePort();
  // --keep-journal: every entry stays, so the image can be checked against zeroes + the whole journal.
  const serveArgs = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal, '--keep-journal', '--replicate-to', `ws://127.0.0.1:${port}`];
  await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir], t.teardown);

  let s = await startServe(serveArgs, t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const flushed = new Map<number, Buffer>();
  for (let b = 0; b < 8; b++) {
    const data = randomBytes(BLOCK);
    await c.write(b * BLOCK, data);
    flushed.set(b, data);
  }
  await c.flush();
  for (let b = 8; b < 16; b++) await c.write(b * BLOCK, randomBytes(BLOCK));
  t.ok(await converges(image, replica, 20_000), 'the replica applied every write, the unflushed ones too');
  s.child.kill('SIGKILL');
  await s.exited;
  c.destroy?.();

  // The power cut, after the fact: what was not flushed loses its data in the journal, and half of it in the image.
  const { entries, checkpoint } = await storedEntries(journal);
  const lastFlush = Math.max(0, ...entries.filter((e) => e.kind === EntryKind.FLUSH).map((e) => e.seq));
  const torn = entries.filter((e) => e.kind === EntryKind.WRITE && e.seq > Math.max(lastFlush, checkpoint));
  t.equal(torn.length, 8, `the 8 unflushed writes are journal entries after the last FLUSH (seq ${lastFlush}) and checkpoint (seq ${checkpoint})`);
  const fd = fs.openSync(image, 'r+');
  torn.forEach((e, i) => {
    zeroStoredData(journal, e);
    if (i % 2 === 0) fs.writeSync(fd, Buffer.alloc(e.length), 0, e.length, e.offset);
  });
  fs.closeSync(fd);
  const afterCut = fs.readFileSync(image);

  s = await startServe(serveArgs, t.teardown);
  t.pass('serve starts');
  const damaged = [...s.stderr().matchAll(/recovery: journal seq (\d+) is damaged/g)].map((m) => Number(m[1]));
  t.same(damaged, torn.map((e) => e.seq), 'recovery names each damaged entry by its seq');
  t.ok(fs.readFileSync(image).equals(afterCut), 'the image is as the power cut left it: every write it kept, none it lost');
  const check = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  let intact = 0;
  for (const [b, data] of flushed) if ((await check.read(b * BLOCK, BLOCK)).equals(data)) intact++;
  t.equal(intact, flushed.size, 'every write replied before the replied FLUSH is there');
  await check.close();

  t.ok(await converges(image, replica, 30_000), 'the replica, which had applied the lost writes, ends byte-identical to the primary');
  const compared = await until(() => /was repaired from the image after the replica applied it: comparing every chunk by digests/.test(s.stderr()), 10_000, 50);
  t.ok(compared, 'serve compared the replica by digests because of the repair');
  t.equal(await s.stop(), 0, 'serve stops cleanly');

  const rebuilt = path.join(dir, 'rebuilt.img');
  await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', rebuilt]);
  t.ok(fs.readFileSync(rebuilt).equals(fs.readFileSync(image)), 'zeroes + the mended journal rebuild the image byte for byte');

  s = await startServe(serveArgs, t.teardown);
  t.notMatch(s.stderr(), /is damaged/, 'the next start finds nothing damaged');
  t.ok(await converges(image, replica, 20_000), 'and the replica stays identical');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a damaged entry recovery cannot mend (its header) stops serve with an error naming it', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  const serveArgs = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal];
  const s = await startServe(serveArgs, t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  for (let b = 0; b < 4; b++) await c.write(b * BLOCK, randomBytes(BLOCK));
  s.child.kill('SIGKILL');
  await s.exited;
  c.destroy?.();
  const { entries, checkpoint } = await storedEntries(journal);
  const victim = entries.filter((e) => e.kind === EntryKind.WRITE && e.seq > checkpoint)[1];
  t.ok(victim, 'an entry after the checkpoint');
  // Its length field now claims more than the image holds: a header recovery cannot trust.
  const raw = open({ path: path.join(journal, 'journal.mdb') });
  const db = raw.openDB<Buffer, number>({ name: 'entries', encoding: 'binary' });
  const v = Buffer.from(db.getBinary(victim.seq)!);
  v.writeBigUInt64BE(BigInt(SIZE) * 4n, 16);
  await db.put(victim.seq, v);
  await raw.close();
  const before = fs.readFileSync(image);
  const child = spawn(process.execPath, [CLI, 'serve', ...serveArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => (child.exitCode === null && child.signalCode === null ? child.kill('SIGKILL') : undefined));
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  child.stdout.on('data', (d) => (stderr += d));
  const code = await new Promise<number | string | null>((resolve) => {
    const timer = setTimeout(() => resolve('still running after 20 s'), 20_000);
    child.on('exit', (c) => {
      clearTimeout(timer);
      resolve(c);
    });
  });
  t.ok(typeof code === 'number' && code !== 0, `serve does not start (exit ${code})`);
  t.match(stderr, new RegExp(`seq ${victim.seq} is corrupt`), 'the error names the entry');
  t.notMatch(stderr, /listening on/, 'no client was let in');
  t.ok(fs.readFileSync(image).equals(before), 'the image is as the kill left it (the entries before it re-applied the same bytes)');
  const rebuilt = path.join(dir, 'rebuilt.img');
  const replayed = await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', rebuilt]).then(
    () => 'applied',
    (err: Error) => err.message,
  );
  t.match(replayed, new RegExp(`seq ${victim.seq}`), 'replay-local refuses the same entry rather than apply it');
});
