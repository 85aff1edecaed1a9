// One process per replayer data directory (src/replayer/data-dir-lock.ts), with real processes: a second
// replayer, an offline promote and a serve of a replica image are refused while one runs; a SIGKILLed replayer
// leaves nothing that blocks the next one, even when its PID now belongs to another live process.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CLI, runRefused, runStatus, startReplay, startServe } from './helpers/processes.js';
import { converges } from './helpers/files.js';

t.test('a replayer data directory has one user at a time; a SIGKILLed replayer leaves nothing behind', async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replica');
  const first = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data], t.teardown);
  // A volume in it, so that promote has something to refuse to touch.
  const img = path.join(dir, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(4 * 2 ** 20, 9));
  const s = await startServe(['--image', `vol=${img}`, '--listen', '127.0.0.1:0', '--replicate-to', first.url], t.teardown);
  t.ok(await converges(img, path.join(data, 'vol.img')), 'the replica of vol is in the directory');

  const second = await runRefused(['replay', '--listen', '127.0.0.1:0', '--data-dir', data]);
  t.equal(second.code, 1, 'a second replayer on the directory exits 1');
  t.match(second.stderr, new RegExp(`in use by another process \\(pid ${first.child.pid}\\)`), 'naming the running one');
  const promote = await runRefused(['promote', '--data-dir', data, '--volume', 'vol']);
  t.equal(promote.code, 1, 'promote while the replayer runs exits 1');
  t.match(promote.stderr, /in use by another process .*: stop it before running promote/);
  const served = await runRefused(['serve', '--image', `vol=${path.join(data, 'vol.img')}`, '--no-journal', '--listen', '127.0.0.1:0']);
  t.equal(served.code, 1, 'a serve of the replica image while the replayer writes it exits 1');
  t.match(served.stderr, /vol\.img is in use by another blockferry process/, 'saying the image is in use');

  // Killed: the lock goes with it. Its PID file now names a live process that is not a replayer (this test's
  // own process, as after a reboot that handed the PID to something else): that must not block the next one.
  first.child.kill('SIGKILL');
  await first.exited;
  fs.writeFileSync(path.join(data, 'replay.pid'), `${process.pid}\n`);
  const next = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data], t.teardown);
  t.ok(next.port > 0, 'the next replayer starts on the directory');
  t.equal(fs.readFileSync(path.join(data, 'replay.pid'), 'utf8').trim(), String(next.child.pid), 'and names itself in replay.pid');
  next.child.kill('SIGTERM');
  t.equal(await next.exited, 0, 'it stops cleanly');
  t.equal(await s.stop(), 0, 'serve stops cleanly');

  const promoted = await runStatus(process.execPath, [CLI, 'promote', '--data-dir', data, '--volume', 'vol', '--json']);
  t.equal(promoted.code, 0, `promote runs once no replayer does${promoted.code ? `: ${promoted.stderr}` : ''}`);
  t.equal(JSON.parse(promoted.stdout).volume, 'vol');
});

t.test('the flock decides, not the PID in the file; a directory reached by a symlink is the same directory', async (t) => {
  const { lockDataDir, unlockDataDir } = await import('../src/replayer/data-dir-lock.js');
  const dir = t.testdir();
  const data = path.join(dir, 'replica');
  const other = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data], t.teardown);
  // The file names this process while another holds the flock (a stale PID that is now ours): still refused.
  fs.writeFileSync(path.join(data, 'replay.pid'), `${process.pid}\n`);
  t.throws(() => lockDataDir(data, 'a test'), { code: 'ERR_DATA_DIR_BUSY' }, 'refused while another process holds the lock');
  other.child.kill('SIGTERM');
  t.equal(await other.exited, 0, 'the replayer stops cleanly');

  const link = path.join(dir, 'link');
  fs.symlinkSync(data, link);
  lockDataDir(data, 'a test');
  t.teardown(() => unlockDataDir(data));
  t.throws(() => lockDataDir(link, 'a test'), { code: 'ERR_DATA_DIR_BUSY', message: /in use by this process already/ }, 'the same directory by a symlink is refused');
  unlockDataDir(link);
  lockDataDir(data, 'a test');
  t.pass('unlocking by the symlink gave the directory up');
});

t.test('a data directory the replayer\'s user cannot write (a root-owned bind mount in a container) is refused by name', { skip: process.getuid?.() === 0 ? false : 'needs root to run the replayer as another user' }, async (t) => {
  // Under the system's temp dir: the path to tap's fixtures may not be open to another user.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bf-ro-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.chmodSync(dir, 0o755);
  const p = await runStatus('setpriv', ['--reuid', '1000', '--regid', '1000', '--clear-groups', process.execPath, CLI, 'replay', '--listen', '127.0.0.1:0', '--data-dir', dir]);
  t.equal(p.code, 2, 'exits 2, as for a usage error');
  t.match(p.stderr, new RegExp(`--data-dir ${dir} is not writable by this user \\(uid 1000\\): EACCES; .*named volume`), `names the directory, the user and the way out\n${p.stderr}`);
  t.same(fs.readdirSync(dir), [], 'and leaves nothing in it');
});
