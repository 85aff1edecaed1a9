// FileDevice over a real block device (a loop device over a temp file): size via BLKGETSIZE64 and via sysfs,
// BLKDISCARD and BLKZEROOUT, and no block status (a block device has no holes to report).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../src/device/file-device.js';
import { run, runRefused, startServe } from './helpers/processes.js';

const MiB = 2 ** 20;
/** Backing file size: big enough for several MiB-aligned ranges, small enough to be instant. */
const LOOP_SIZE = 16 * MiB;

function attachLoop(t: { testdir(): string; teardown(fn: () => unknown): void }): string {
  const dir = t.testdir();
  const file = path.join(dir, 'backing.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, LOOP_SIZE);
  const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
  t.teardown(() => execFileSync('losetup', ['-d', dev]));
  return dev;
}

t.test('block device: size, read/write, discard and zero-out', async (t) => {
  const loop = attachLoop(t);
  const dev = await FileDevice.open({ path: loop });
  t.teardown(() => dev.close());
  t.equal(dev.isBlockDevice, true);
  t.equal(dev.size, LOOP_SIZE, 'BLKGETSIZE64');
  t.equal(dev.nativeAvailable, true);
  t.match(dev.capabilities, { trim: true, zeroes: true, blockStatus: false });
  const again = await FileDevice.open({ path: loop, size: LOOP_SIZE }); // --size never creates or resizes a device
  t.equal(again.size, LOOP_SIZE);
  await again.close();
  const data = randomBytes(4 * MiB);
  await dev.write(0, data);
  t.same(await dev.read(0, data.length), data);
  await dev.writeZeroes(MiB, MiB);
  t.same(await dev.read(MiB, MiB), Buffer.alloc(MiB), 'BLKZEROOUT zeroed the range');
  t.same(await dev.read(0, MiB), data.subarray(0, MiB), 'neighbour untouched');
  await dev.trim(2 * MiB, MiB); // loop devices discard by punching the backing file: reads as zeroes
  t.same(await dev.read(2 * MiB, MiB), Buffer.alloc(MiB), 'BLKDISCARD');
  t.same(await dev.read(3 * MiB, MiB), data.subarray(3 * MiB), 'neighbour untouched');
  await dev.flush();
});

t.test('block device: TRIM and WRITE_ZEROES of any range, not only whole logical blocks', async (t) => {
  const loop = attachLoop(t);
  const dev = await FileDevice.open({ path: loop });
  t.teardown(() => dev.close());
  t.equal(dev.capabilities.fastZero, false, 'fast zeroing is not promised (BLKZEROOUT may write zeroes itself)');
  const data = randomBytes(64 * 1024);
  await dev.write(0, data);
  const expect = Buffer.from(data);
  // Unaligned at both ends and spanning whole blocks; inside one block; ending on a boundary.
  for (const [offset, length] of [[100, 10_000], [20_000, 300], [30_001, 2_767]]) {
    await dev.writeZeroes(offset, length);
    expect.fill(0, offset, offset + length);
    t.same(await dev.read(0, data.length), expect, `write-zeroes of ${length} at ${offset}: exactly that range reads as zeroes`);
  }
  // TRIM is a hint: whatever it discards, it must not fail, and it must not touch bytes outside the range.
  await dev.trim(40_100, 9_000);
  const after = await dev.read(0, data.length);
  t.same(after.subarray(0, 40_100), expect.subarray(0, 40_100), 'trim left everything before its range alone');
  t.same(after.subarray(49_100), expect.subarray(49_100), 'and everything after it');
});

t.test('block device size from sysfs without the native helper', async (t) => {
  const loop = attachLoop(t);
  const dev = await FileDevice.open({ path: loop, noNative: true });
  t.teardown(() => dev.close());
  t.equal(dev.isBlockDevice, true);
  t.equal(dev.size, LOOP_SIZE);
  t.equal(dev.capabilities.trim, false);
});

const devInMemory = Number(fs.statfsSync('/dev').type) === 0x01021994; // devtmpfs, as on any systemd or udev host
t.test("serve of a block device wants --journal: the default beside it would be in /dev, in memory (one already there is used)", { skip: devInMemory ? false : '/dev is not devtmpfs here' }, async (t) => {
  const loop = attachLoop(t);
  const refused = await runRefused(['serve', '--image', `db=${loop}`, '--listen', '127.0.0.1:0']);
  t.equal(refused.code, 2, 'a usage error (exit 2)');
  t.match(refused.stderr, new RegExp(`--image ${loop} is a block device, and its journal would go beside it in ${loop}\\.journal, on tmpfs \\(memory\\): lost at the next reboot\\. Pass --journal DIR`), refused.stderr);
  t.notOk(fs.existsSync(`${loop}.journal`), 'nothing was made in /dev');
  const journal = path.join(t.testdir(), 'db.journal');
  const s = await startServe(['--image', `db=${loop}`, '--journal', journal, '--listen', '127.0.0.1:0'], t.teardown);
  t.equal((await run('nbdinfo', ['--size', s.uri])).stdout.trim(), String(LOOP_SIZE), 'with --journal on a disk it serves the device');
  t.notMatch(s.stderr(), /is on tmpfs/, 'and says nothing of memory');
  t.equal(await s.stop(), 0);

  // A journal an earlier version left there is used (a new one elsewhere would be another volume to every
  // replica), with the way to move it.
  const left = `${loop}.journal`;
  t.teardown(() => fs.rmSync(left, { recursive: true, force: true }));
  fs.cpSync(journal, left, { recursive: true });
  const old = await startServe(['--image', `db=${loop}`, '--listen', '127.0.0.1:0'], t.teardown);
  t.match(old.stderr(), new RegExp(`the journal ${loop}\\.journal is on tmpfs \\(memory\\) and is lost at the next reboot: stop serve, move the directory`), 'an existing journal beside it is used, with a warning saying how to move it');
  t.equal(await old.stop(), 0);
});
