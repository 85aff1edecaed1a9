// A kernel filesystem on blockferry: nbdfuse + losetup + mkfs.ext4 + mount + a tree of files + umount, then
// e2fsck finds it clean, a remount reads every file back, and the journal replays to the same image.
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { attachLoop } from './helpers/fuse-loop.js';
import { CLI, run, startServe } from './helpers/processes.js';

const SIZE = 512 * 2 ** 20;

t.test('mkfs.ext4, mount, write files, umount, e2fsck clean, journal replays to the image', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  const s = await startServe(['--image', `disk=${image}`, '--size', String(SIZE), '--journal', journal, '--keep-journal', '--listen', '127.0.0.1:0'], t.teardown);
  const disk = await attachLoop(s.uri, dir, t.teardown);
  await run('mkfs.ext4', ['-q', '-F', disk.device]);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  await disk.mount(mnt);
  const files = new Map<string, string>();
  for (let d = 0; d < 5; d++) {
    fs.mkdirSync(path.join(mnt, `dir${d}`, 'sub'), { recursive: true });
    for (let f = 0; f < 8; f++) {
      const rel = path.join(`dir${d}`, f % 2 ? 'sub' : '', `file${f}.bin`);
      const data = randomBytes(1 + Math.floor(Math.random() * 3 * 2 ** 20));
      fs.writeFileSync(path.join(mnt, rel), data);
      files.set(rel, createHash('sha256').update(data).digest('hex'));
    }
  }
  await run('sync', []);
  await disk.umount();
  await run('blockdev', ['--flushbufs', disk.device]);
  const fsck = await run('e2fsck', ['-fn', disk.device]);
  t.match(fsck.stdout, /clean|files/, 'e2fsck -fn: no errors (exit 0)');
  await disk.mount(mnt);
  let same = 0;
  for (const [rel, sum] of files) if (createHash('sha256').update(fs.readFileSync(path.join(mnt, rel))).digest('hex') === sum) same++;
  t.equal(same, files.size, `all ${files.size} files read back after a remount`);
  await disk.detach();
  t.equal(await s.stop(), 0, 'serve stops cleanly');

  const rebuilt = path.join(dir, 'rebuilt.img');
  await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', rebuilt]);
  const sum = (f: string) => createHash('sha256').update(fs.readFileSync(f)).digest('hex');
  t.equal(sum(rebuilt), sum(image), 'zeroes + journal replayed = the image the filesystem lives on');
  fs.rmSync(rebuilt);
});
