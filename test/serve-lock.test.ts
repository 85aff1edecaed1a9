// One writer per image and per journal: a second `serve` of an image (or of a journal) that one is serving is
// refused before it touches anything, as qemu refuses an image another qemu writes. Real processes; the locks
// are flock()s, so a SIGKILLed serve leaves none behind.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { run, runRefused, startServe } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;

/** `blockferry serve ARGS` on any port, expected to refuse to start. */
function serveOnce(args: string[]) {
  return runRefused(['serve', ...args, '--listen', '127.0.0.1:0']);
}

t.test('a second serve of a served image, or of its journal, is refused and changes nothing', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'disk.img');
  const other = path.join(dir, 'other.img');
  fs.writeFileSync(other, Buffer.alloc(SIZE));
  const first = await startServe(['--image', `disk=${img}`, '--size', String(SIZE), '--listen', '127.0.0.1:0'], t.teardown);
  const data = randomBytes(SIZE);
  await run('nbdcopy', ['-', first.uri], { input: data });

  const twin = await serveOnce(['--image', `disk=${img}`]);
  t.equal(twin.code, 1, 'serve of the same image exits 1');
  t.match(twin.stderr, /image .*disk\.img is in use by another blockferry process/, 'and says the image is in use');
  const readOnly = await serveOnce(['--image', `disk=${img}`, '--read-only']);
  t.equal(readOnly.code, 1, 'a read-only serve of it is refused too (the first one writes it)');
  t.match(readOnly.stderr, /is in use by another blockferry process/);
  const sharing = await serveOnce(['--image', `other=${other}`, '--journal', `${img}.journal`]);
  t.equal(sharing.code, 1, 'serve of another image with the same journal exits 1');
  t.match(sharing.stderr, /journal .*disk\.img\.journal is in use by another blockferry serve/, 'and says the journal is in use');

  const copy = path.join(dir, 'copy.img');
  await run('nbdcopy', [first.uri, copy]);
  t.ok(fs.readFileSync(copy).equals(data), 'the first serve still serves what was written');
  t.ok(fs.readFileSync(other).equals(Buffer.alloc(SIZE)), 'the other image was not touched');

  // A SIGKILLed serve holds no lock: the next one starts, recovers and serves the same bytes.
  first.child.kill('SIGKILL');
  await first.exited;
  const next = await startServe(['--image', `disk=${img}`, '--listen', '127.0.0.1:0'], t.teardown);
  fs.rmSync(copy);
  await run('nbdcopy', [next.uri, copy]);
  t.ok(fs.readFileSync(copy).equals(data), 'after SIGKILL the next serve starts and serves the same bytes');
  t.equal(await next.stop(), 0, 'and stops cleanly');
});

t.test('read-only serves of one image share it; a writer waits for them to go', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'ro.img');
  fs.writeFileSync(img, Buffer.alloc(SIZE, 5));
  const a = await startServe(['--image', `ro=${img}`, '--read-only', '--listen', '127.0.0.1:0'], t.teardown);
  const b = await startServe(['--image', `ro=${img}`, '--read-only', '--listen', '127.0.0.1:0'], t.teardown);
  for (const s of [a, b]) t.match((await run('nbdinfo', ['--size', s.uri])).stdout.trim(), String(SIZE), `${s.uri} serves the image`);
  const writer = await serveOnce(['--image', `ro=${img}`]);
  t.equal(writer.code, 1, 'a writing serve is refused while they run');
  t.match(writer.stderr, /is in use by another blockferry process/);
  t.equal(await a.stop(), 0);
  t.equal(await b.stop(), 0);
  const after = await startServe(['--image', `ro=${img}`, '--listen', '127.0.0.1:0'], t.teardown);
  t.match((await run('nbdinfo', ['--size', after.uri])).stdout.trim(), String(SIZE), 'once they are gone, a writing serve starts');
  t.equal(await after.stop(), 0);
});

t.test('one image under two export names (here through a symlink) is refused at once as a usage error', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'x.img');
  fs.writeFileSync(img, Buffer.alloc(SIZE));
  fs.symlinkSync(img, path.join(dir, 'y.img'));
  const twice = await serveOnce(['--image', `a=${img}`, '--image', `b=${path.join(dir, 'y.img')}`]);
  t.equal(twice.code, 2, 'serve exits 2 (usage)');
  t.match(twice.stderr, /--image b=.*y\.img is the image exported as "a" already/, 'naming both exports');
  t.notOk(fs.existsSync(`${img}.journal`), 'and opened nothing (no journal was created)');
});

t.test('a journal refuses an image other than its own: made anew, or another file put in its place', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'disk.img');
  const args = ['--image', `disk=${img}`, '--size', String(SIZE)];
  const first = await startServe([...args, '--listen', '127.0.0.1:0'], t.teardown);
  const data = randomBytes(SIZE);
  await run('nbdcopy', ['-', first.uri], { input: data });
  t.equal(await first.stop(), 0, 'the first serve stops cleanly');

  // Deleted: serve --size would make a new, all-zero image beside the old journal.
  fs.rmSync(img);
  const anew = await serveOnce(args);
  t.equal(anew.code, 1, 'serve exits 1 rather than serve a new image with the old journal');
  t.match(anew.stderr, /did not exist and was made new, but journal .*disk\.img\.journal was written for an earlier image/, `saying why: ${anew.stderr.trim()}`);
  t.notOk(fs.existsSync(img), 'and the image it made is not left behind');

  // Another file of the same size put in its place.
  fs.writeFileSync(img, Buffer.alloc(SIZE, 7));
  const other = await serveOnce(args);
  t.equal(other.code, 1, 'another file in its place is refused too');
  t.match(other.stderr, /is not the file its journal was written for .* pass --image-moved/, 'naming the way to take a moved image');

  // The real image, moved here with its journal (a copy: a new file): taken with --image-moved, then as its own.
  fs.writeFileSync(img + '.tmp', data);
  fs.renameSync(img + '.tmp', img);
  const moved = await startServe([...args, '--image-moved', '--listen', '127.0.0.1:0'], t.teardown);
  t.equal(await moved.stop(), 0, '--image-moved serves it');
  const again = await startServe([...args, '--listen', '127.0.0.1:0'], t.teardown);
  const copy = path.join(dir, 'copy.img');
  await run('nbdcopy', [again.uri, copy]);
  t.ok(fs.readFileSync(copy).equals(data), 'and from then on it is the journal\'s image, served without the flag');
  t.equal(await again.stop(), 0);
});

t.test('an option given twice (but --image and --replicate-to) is a usage error naming it; nothing is made', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'z.img');
  const twice = await serveOnce(['--image', img, '--size', '1M', '--listen', '127.0.0.1:10809']);
  t.equal(twice.code, 2, 'serve with --listen twice exits 2 (usage)');
  t.match(twice.stderr, /--listen is given 2 times; give it once/, 'naming it');
  t.notOk(fs.existsSync(img), 'and made no image');
  const replay = await runRefused(['replay', '--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'r1'), '--data-dir', path.join(dir, 'r2')]);
  t.equal(replay.code, 2, 'replay with --data-dir twice exits 2');
  t.match(replay.stderr, /--data-dir is given 2 times/);
  t.notOk(fs.existsSync(path.join(dir, 'r1')) || fs.existsSync(path.join(dir, 'r2')), 'and made no data directory');
});

t.test('an image that has a journal is not served with --no-journal (it would part from its replicas unnoticed)', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'j.img');
  const s = await startServe(['--image', img, '--size', String(SIZE), '--listen', '127.0.0.1:0']);
  await run('nbdcopy', ['-', s.uri], { input: randomBytes(SIZE) });
  t.equal(await s.stop(), 0);
  const before = fs.readFileSync(img);
  const bare = await serveOnce(['--image', img, '--no-journal']);
  t.equal(bare.code, 1, 'serve --no-journal of it exits 1');
  t.match(bare.stderr, /has a journal .* --no-journal it would differ from that journal and from its replicas/, 'saying why');
  t.ok(fs.readFileSync(img).equals(before), 'and the image is untouched');
  const readOnly = await startServe(['--image', img, '--no-journal', '--read-only', '--listen', '127.0.0.1:0']);
  t.equal(await readOnly.stop(), 0, '--read-only may serve it (nothing is written)');
});

t.test('wrong kinds of paths and values are usage errors that name them; a refused serve leaves no new image', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'a-file');
  fs.writeFileSync(file, 'x');
  const asImage = await serveOnce(['--image', dir]);
  t.equal(asImage.code, 2, 'a directory as --image: exit 2');
  t.match(asImage.stderr, /is a directory: give an image file or a block device/);
  const asDataDir = await runRefused(['replay', '--listen', '127.0.0.1:0', '--data-dir', file]);
  t.equal(asDataDir.code, 2, 'a file as --data-dir: exit 2');
  t.match(asDataDir.stderr, /--data-dir .*a-file is not a directory/);
  const level = await serveOnce(['--image', path.join(dir, 'l.img'), '--size', '1M', '--log-level', 'bogus']);
  t.equal(level.code, 2, 'an unknown --log-level: exit 2');
  t.match(level.stderr, /log-level.*bogus/);
  const last = await runRefused(['journal', 'inspect', '--journal', dir, '--last', 'abc']);
  t.equal(last.code, 2, 'journal inspect --last abc: exit 2');
  const twoImages = await runRefused(['verify', '--image', path.join(dir, 'a.img'), '--image', path.join(dir, 'b.img'), '--replica', 'ws://127.0.0.1:1']);
  t.equal(twoImages.code, 2, 'verify takes one --image: twice is exit 2');
  t.match(twoImages.stderr, /--image is given 2 times/);

  // Refused after its new image and journal were made (a token file without the volume): neither is left,
  // so the next serve, with the cause fixed, makes them anew.
  const tokens = path.join(dir, 'tokens');
  fs.writeFileSync(tokens, `other ${'x'.repeat(24)}\n`);
  const fresh = path.join(dir, 'fresh.img');
  const noToken = await serveOnce(['--image', fresh, '--size', '1M', '--replicate-to', 'ws://127.0.0.1:1', '--token-file', tokens]);
  t.equal(noToken.code, 2, 'serve with no token for its volume exits 2');
  t.notOk(fs.existsSync(fresh) || fs.existsSync(`${fresh}.journal`), 'and leaves neither the image nor the journal it made');
  const fixed = await startServe(['--image', fresh, '--size', '1M', '--listen', '127.0.0.1:0']);
  t.equal(await fixed.stop(), 0, 'the next serve makes and serves them');

  // A journal in use by another serve: the second serve, which would make its image, makes none.
  const journal = path.join(dir, 'shared-journal');
  const first = await startServe(['--image', path.join(dir, 'ja.img'), '--size', String(SIZE), '--journal', journal, '--listen', '127.0.0.1:0']);
  t.teardown(() => first.stop());
  const second = await serveOnce(['--image', path.join(dir, 'jb.img'), '--size', String(SIZE), '--journal', journal]);
  t.equal(second.code, 1, 'a serve of a journal in use exits 1');
  t.notOk(fs.existsSync(path.join(dir, 'jb.img')), 'and leaves no image it made');
  t.equal(await first.stop(), 0);
});
