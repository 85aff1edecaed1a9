// Opening LMDB safely (src/util/lmdb-open.ts). Its lock file is made by blockferry with its blocks allocated, at
// the size LMDB itself would give it, so LMDB neither grows it (which would leave holes again) nor reads another
// reader count from it; one left with holes is replaced only by a caller that holds its own exclusive lock.
// And what lmdb-js cannot open is refused before LMDB is asked, instead of crashing the process: a file that is
// not LMDB's, one cut short, and an open with no file descriptors left, in a replayer holding other volumes and
// in serve.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { open } from 'lmdb';
import { LMDB_LOCK_BYTES, openLmdb } from '../src/util/lmdb-open.js';
import { sameFiles, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { run, runRefused, startReplay, startServe } from './helpers/processes.js';

const allocated = (file: string): boolean => {
  const st = fs.statSync(file);
  return st.size === LMDB_LOCK_BYTES && st.blocks * 512 >= st.size;
};

t.test('LMDB makes its lock file the size openLmdb makes it, and keeps the one openLmdb made', async (t) => {
  const dir = t.testdir();
  const own = open({ path: path.join(dir, 'own.mdb') });
  await own.put('k', 1);
  t.equal(fs.statSync(path.join(dir, 'own.mdb-lock')).size, LMDB_LOCK_BYTES, `lmdb-js's own lock file is ${LMDB_LOCK_BYTES} bytes`);
  await own.close();
  const db = openLmdb<number, string>({ path: path.join(dir, 'ours.mdb') });
  await db.put('k', 1);
  t.ok(allocated(path.join(dir, 'ours.mdb-lock')), 'ours is that size with every block allocated, also after LMDB opened and used it');
  await db.close();
});

t.test('a lock file with holes is replaced under an exclusive lock of the caller, never otherwise', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'state.mdb');
  const lock = `${file}-lock`;
  fs.closeSync(fs.openSync(lock, 'w'));
  fs.truncateSync(lock, LMDB_LOCK_BYTES); // as a process that died in LMDB's open left it
  let db = openLmdb({ path: file });
  t.notOk(allocated(lock), 'without the exclusive flag it is left as it is (another process may have it mapped)');
  await db.close();
  fs.truncateSync(lock, 0);
  fs.truncateSync(lock, LMDB_LOCK_BYTES);
  db = openLmdb({ path: file }, true);
  t.ok(allocated(lock), 'with it, it is replaced by one with its blocks');
  await db.put('k', 2);
  t.equal(db.get('k'), 2, 'and the environment works');
  await db.close();
});

// What lmdb-js could not open crashed the process: a data file that is not LMDB's or a failed open (SIGSEGV: it
// frees its environment twice) and one cut short (SIGBUS on the first page read past its end). Both are errors
// now, named, before LMDB is asked; so is having no file descriptors left for it.
t.test('a file that is not LMDB, or one cut short, is refused before LMDB maps it', async (t) => {
  const dir = t.testdir();
  const garbage = path.join(dir, 'garbage.mdb');
  fs.writeFileSync(garbage, randomBytes(64 * 1024));
  t.throws(() => openLmdb({ path: garbage }), { code: 'ERR_LMDB_CORRUPT', message: /garbage\.mdb is not an LMDB file .*no meta page/ }, 'random bytes: refused, named');
  const whole = path.join(dir, 'whole.mdb');
  const db = openLmdb<Buffer, number>({ path: whole });
  for (let i = 0; i < 500; i++) db.putSync(i, randomBytes(4000));
  await db.close();
  const cut = path.join(dir, 'cut.mdb');
  fs.copyFileSync(whole, cut);
  fs.truncateSync(cut, Math.floor(fs.statSync(whole).size / 2));
  t.throws(() => openLmdb({ path: cut, readOnly: true }), { code: 'ERR_LMDB_CORRUPT', message: /cut short/ }, 'cut to half its size: refused, named');
  const again = openLmdb<Buffer, number>({ path: whole, readOnly: true });
  t.equal(again.get(499)?.length, 4000, 'the whole file still opens and reads');
  await again.close();
});

t.test('a replayer keeps its other volumes when one cannot be opened: a state file that is not LMDB, or no descriptors left', async (t) => {
  const dir = t.testdir();
  const replicas = path.join(dir, 'replicas');
  fs.mkdirSync(replicas);
  fs.writeFileSync(path.join(replicas, 'bad.state.mdb'), randomBytes(64 * 1024));
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicas], t.teardown);
  const good = path.join(dir, 'good.img');
  const a = await startServe(['--image', `good=${good}`, '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: a.port, exportName: 'good' });
  await c.write(0, randomBytes(2 ** 20));
  await c.flush();
  t.ok(await until(() => sameFiles(good, path.join(replicas, 'good.img')), 20_000, 100), 'a good volume replicates');
  const b = await startServe(['--image', `bad=${path.join(dir, 'bad.img')}`, '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  t.ok(await until(() => /cannot open volume bad: .*is not an LMDB file/.test(b.stderr()), 10_000, 100), 'the volume whose state file is garbage is refused, named');
  // Then every volume it could still open, and none it could not, with 64 descriptors.
  await run('prlimit', ['--pid', String(replay.child.pid), '--nofile=64:64']);
  const images = Array.from({ length: 16 }, (_, i) => `v${i}=${path.join(dir, `v${i}.img`)}`);
  const many = await startServe([...images.flatMap((i) => ['--image', i]), '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  t.ok(await until(() => /too many open files \(EMFILE\)/.test(many.stderr()), 20_000, 100), 'with the descriptors used up, a volume is refused with EMFILE named');
  await c.write(2 ** 20, randomBytes(2 ** 20));
  await c.flush();
  t.ok(await until(() => sameFiles(good, path.join(replicas, 'good.img')), 20_000, 100), 'the good volume still replicates');
  t.equal(replay.child.exitCode, null, 'the replayer is still running');
  t.equal(replay.child.signalCode, null, 'and was not killed by a signal (it was SIGSEGV)');
  await c.close();
  for (const s of [many, b, a]) t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('serve refuses a journal cut short with an error, instead of dying of SIGBUS', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '64M', '--listen', '127.0.0.1:0', '--keep-journal'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  for (let i = 0; i < 256; i++) await c.write((i % 64) * 2 ** 20, randomBytes(64 * 1024));
  await c.flush();
  await c.close();
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  const mdb = path.join(`${image}.journal`, 'journal.mdb');
  fs.truncateSync(mdb, Math.floor(fs.statSync(mdb).size / 2));
  const r = await runRefused(['serve', '--image', `disk=${image}`, '--listen', '127.0.0.1:0']);
  t.equal(r.code, 1, `serve exits 1 (not killed by a signal: ${r.code})`);
  t.match(r.stderr, /journal\.mdb is not an LMDB file .*cut short/, `and names the file (${r.stderr.trim()})`);
});

t.test('read-only, on a filesystem it cannot write and with no lock file: opened and read as before (journal inspect)', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  const db = openLmdb<number, string>({ path: path.join(src, 'state.mdb') });
  await db.put('k', 7);
  await db.close();
  fs.rmSync(path.join(src, 'state.mdb-lock'));
  const ro = fs.mkdtempSync(path.join(os.tmpdir(), 'blockferry-ro-'));
  await run('mount', ['--bind', src, ro]);
  t.teardown(async () => {
    await run('umount', ['-l', ro]).catch(() => undefined);
    fs.rmSync(ro, { recursive: true, force: true });
  });
  await run('mount', ['-o', 'remount,ro,bind', ro]);
  const back = openLmdb<number, string>({ path: path.join(ro, 'state.mdb'), readOnly: true });
  t.equal(back.get('k'), 7, 'the value reads back');
  await back.close();
  t.throws(() => openLmdb({ path: path.join(ro, 'new.mdb') }), /read-only|EROFS/i, 'a writable open there still fails, named');
});
