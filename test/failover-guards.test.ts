// What failover commands refuse, with real processes: demote of an image a serve still writes; a journal that
// no longer describes a demoted image (moved aside, so a later promote + serve cannot replay its tail over the
// resynced bytes), or kept elsewhere and refused by serve once the image is promoted again; serve of a replica
// image never promoted; replay-local onto its own base; a journal file too
// short to be one (LMDB would crash the process reading it).
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Journal } from '../src/journal/journal.js';
import { CLI, run, runRefused, runStatus, startServe } from './helpers/processes.js';

const SIZE = 4 * 2 ** 20;

/** DIR/disk.img of `size` random bytes, written through a serve that keeps its whole journal (DIR/disk.img.journal). */
async function journaledImage(t: Test, dir: string, size: number): Promise<string> {
  const img = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${img}`, '--size', String(size), '--listen', '127.0.0.1:0', '--keep-journal'], t.teardown);
  await run('nbdcopy', ['-', s.uri], { input: randomBytes(size) });
  t.equal(await s.stop(), 0, 'the image was written through a journaled serve');
  return img;
}

t.test('demote: refused while a serve writes the image; its journal is moved aside; the replica is not served before promote', async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replicas');
  fs.mkdirSync(data);
  const img = path.join(data, 'disk.img');
  const args = ['--image', `disk=${img}`, '--size', String(SIZE), '--listen', '127.0.0.1:0'];
  const s = await startServe(args, t.teardown);
  await run('nbdcopy', ['-', s.uri], { input: randomBytes(SIZE) });
  const busy = await runRefused(['demote', '--image', `disk=${img}`, '--data-dir', data]);
  t.equal(busy.code, 1, 'demote of an image a serve holds exits 1');
  t.match(busy.stderr, /is in use by another blockferry process .*stop it before demoting/, 'saying so');
  t.ok(fs.existsSync(`${img}.journal`) && !fs.existsSync(path.join(data, 'disk.state.mdb')), 'and changed nothing');
  const elsewhere = path.join(dir, 'new', 'deeper', 'replicas');
  t.equal((await runRefused(['demote', '--image', `disk=${img}`, '--data-dir', elsewhere])).code, 1, 'also into a data directory not made yet');
  t.notOk(fs.existsSync(path.join(dir, 'new')), 'which it does not leave behind, nor the parents it made');
  t.equal(await s.stop(), 0);

  // Demoted in place (the image is already where the replayer keeps it).
  const demoted = await runStatus(process.execPath, [CLI, 'demote', '--image', `disk=${img}`, '--data-dir', data]);
  t.equal(demoted.code, 0, `demote in place works once serve has stopped${demoted.code ? `: ${demoted.stderr}` : ''}`);
  t.match(demoted.stdout, /its journal, which no longer describes it, was moved aside to .*disk\.img\.journal\.before-demote-/, 'and says where its journal went');
  t.notOk(fs.existsSync(`${img}.journal`), 'no journal is left beside the replica');

  // Not promoted: a serve would write a replica behind its replayer's back.
  const unpromoted = await runRefused(['serve', ...args]);
  t.equal(unpromoted.code, 1, 'serve of a replica image that was not promoted exits 1');
  t.match(unpromoted.stderr, /is a replica .* and was not promoted/, 'naming promote');
  const readOnly = await startServe(['--image', `disk=${img}`, '--read-only', '--listen', '127.0.0.1:0'], t.teardown);
  t.equal(await readOnly.stop(), 0, '--read-only may serve it (nothing is written)');
  const promoted = await runStatus(process.execPath, [CLI, 'promote', '--data-dir', data, '--volume', 'disk', '--force']);
  t.equal(promoted.code, 0, `promote (forced: a demoted replica is inconsistent until resynced)${promoted.code ? `: ${promoted.stderr}` : ''}`);
  const after = await startServe(args, t.teardown);
  t.equal(await after.stop(), 0, 'once promoted it is served');
});

t.test('a journal kept elsewhere (--journal DIR) from before a demote is refused once the image is promoted again', async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replicas');
  fs.mkdirSync(data);
  const img = path.join(data, 'disk.img');
  const journal = path.join(dir, 'journals', 'disk');
  const args = ['--image', `disk=${img}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal];
  // The old primary: written, then killed, so its journal keeps a tail past its last checkpoint.
  const old = randomBytes(SIZE);
  const s = await startServe(args, t.teardown);
  await run('nbdcopy', ['-', s.uri], { input: old });
  t.equal(await s.stop('SIGKILL'), null, 'the old primary is killed');

  // Failback: demoted (its journal is not beside it: demote cannot know it), resynced by its new primary
  // (written here as the replayer would, in place), promoted again.
  const demoted = await runStatus(process.execPath, [CLI, 'demote', '--image', `disk=${img}`, '--data-dir', data]);
  t.equal(demoted.code, 0, `demote${demoted.code ? `: ${demoted.stderr}` : ''}`);
  const resynced = randomBytes(SIZE);
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, resynced, 0, SIZE, 0);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const promoted = await runStatus(process.execPath, [CLI, 'promote', '--data-dir', data, '--volume', 'disk', '--force']);
  t.equal(promoted.code, 0, `promote${promoted.code ? `: ${promoted.stderr}` : ''}`);

  // Served with that old journal, its tail would be re-applied over the resynced bytes: refused.
  const stale = await runRefused(['serve', ...args]);
  t.equal(stale.code, 1, 'serve with the journal from before the promotion exits 1');
  t.match(stale.stderr, /journal .* was written before .* was promoted .* Move that journal aside/, 'saying why and what to do');
  // Buffers compared with equals: tap's diff of two 4 MiB buffers that differ takes many minutes.
  t.ok(fs.readFileSync(img).equals(resynced), 'and the image still holds the resynced bytes');

  // With the journal moved aside, serve starts a new one and serves the promoted image as it is; that journal
  // is its own from then on (a restart takes it).
  fs.renameSync(journal, `${journal}.old`);
  const out = path.join(dir, 'read.img');
  for (let i = 0; i < 2; i++) {
    const fresh = await startServe(args, t.teardown);
    await run('nbdcopy', [fresh.uri, out]);
    t.equal(await fresh.stop(), 0, `run ${i + 1} of serve with a journal begun after the promotion`);
    t.ok(fs.readFileSync(out).equals(resynced), `run ${i + 1} served the resynced bytes`);
  }
  // That journal as a version that did not record the promotion would have left it: begun after the
  // promotion (its file says so), it is taken.
  const j = await Journal.open({ dir: journal });
  await j.setMeta('promotedAt', undefined);
  await j.close();
  const older = await startServe(args, t.teardown);
  t.equal(await older.stop(), 0, 'a journal begun after the promotion without a record of it is served');
});

t.test('replay-local onto its own base, and a journal file too short to be one: refused with an error', async (t) => {
  const dir = t.testdir();
  const img = await journaledImage(t, dir, SIZE);
  const base = path.join(dir, 'base.img');
  fs.writeFileSync(base, Buffer.alloc(SIZE));
  const same = await runRefused(['replay-local', '--journal', `${img}.journal`, '--base', base, '--out', base]);
  t.equal(same.code, 2, 'replay-local with --out the base exits 2');
  t.match(same.stderr, /is the base image/);
  t.ok(fs.existsSync(base) && fs.statSync(base).size === SIZE, 'and the base is still there');

  const broken = path.join(dir, 'broken');
  fs.mkdirSync(broken);
  fs.writeFileSync(path.join(broken, 'journal.mdb'), '');
  const inspect = await runRefused(['journal', 'inspect', '--journal', broken]);
  t.equal(inspect.code, 1, 'journal inspect of an empty journal.mdb exits 1 (not a crash)');
  t.match(inspect.stderr, /too short to be a journal/);
});

t.test('replay-local: a wrong base or size is refused and leaves --out as it was', async (t) => {
  const dir = t.testdir();
  const img = await journaledImage(t, dir, SIZE);
  const journal = `${img}.journal`;
  const out = path.join(dir, 'precious.img');
  const precious = randomBytes(4096);
  fs.writeFileSync(out, precious);
  const kept = () => fs.readFileSync(out).equals(precious);

  const noBase = await runRefused(['replay-local', '--journal', journal, '--out', out]);
  t.equal(noBase.code, 2, 'without --base or --size: exit 2');
  t.match(noBase.stderr, /needs --base or --size/);
  t.ok(kept(), 'and --out is untouched');

  const typo = await runRefused(['replay-local', '--journal', journal, '--base', path.join(dir, 'no-such.img'), '--out', out]);
  t.equal(typo.code, 2, 'a base that does not exist: exit 2');
  t.match(typo.stderr, /base image .*no-such\.img does not exist/);
  t.ok(kept(), 'and --out is untouched');

  // The journal's writes reach the end of a 4 MiB image: a 1 MiB one cannot hold them.
  const small = await runRefused(['replay-local', '--journal', journal, '--size', String(2 ** 20), '--out', out]);
  t.equal(small.code, 1, 'an image too small for the journal\'s entries: exit 1');
  t.match(small.stderr, /seq \d+ \(WRITE of \d+ bytes at \d+\) lies past the end of the 1048576-byte image/, 'naming the entry');
  t.ok(kept(), 'and --out is untouched');
  t.same(fs.readdirSync(dir).filter((f) => f.includes('partial')), [], 'no partial file is left');

  const good = await runStatus(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', out]);
  t.equal(good.code, 0, `the right size rebuilds it${good.code ? `: ${good.stderr}` : ''}`);
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(img)), 'into --out, equal to the image');
});

t.test('replay-local holds --out while it builds, and an interrupted build leaves no partial file', async (t) => {
  const dir = t.testdir();
  const size = 128 * 2 ** 20;
  const img = await journaledImage(t, dir, size);
  const out = path.join(dir, 'out.img');
  const old = randomBytes(4096);
  fs.writeFileSync(out, old);
  const partials = () => fs.readdirSync(dir).filter((f) => f.includes('.partial-'));

  // Caught mid-build (stopped as soon as its partial file appears).
  const child = spawn(process.execPath, [CLI, 'replay-local', '--journal', `${img}.journal`, '--size', String(size), '--out', out], { stdio: 'ignore' });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  for (let i = 0; i < 2000 && partials().length === 0 && child.exitCode === null; i++) await new Promise((r) => setTimeout(r, 2));
  child.kill('SIGSTOP');
  t.equal(partials().length, 1, 'the build is under way (its partial file is there)');

  const serveOut = await runRefused(['serve', '--image', `o=${out}`, '--no-journal', '--listen', '127.0.0.1:0']);
  t.equal(serveOut.code, 1, 'a serve of --out meanwhile is refused');
  t.match(serveOut.stderr, /in use by another blockferry process/);

  child.kill('SIGTERM');
  child.kill('SIGCONT');
  t.equal(await exited, 143, 'SIGTERM ends replay-local (exit 143)');
  t.same(partials(), [], 'and takes its partial file with it');
  t.ok(fs.readFileSync(out).equals(old), '--out is as it was');
});
