// FileDevice against real temp files: creation and sizing, positional I/O, real hole punching and zero ranges
// (checked through st_blocks and SEEK_DATA), block status, read-only refusal, and the no-native fallback.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../src/device/file-device.js';

const MiB = 2 ** 20;
/** The two things a helper needs from a tap test. */
type Test = { testdir(): string; teardown(fn: () => unknown): void };

async function openTemp(t: Test, opts: { size?: number; noNative?: boolean; readOnly?: boolean } = {}) {
  const dir = t.testdir();
  const file = path.join(dir, 'disk.img');
  const dev = await FileDevice.open({ path: file, size: opts.size ?? 8 * MiB, noNative: opts.noNative });
  t.teardown(() => dev.close());
  return { dev, file, dir };
}

t.test('creates a sparse file of the given size; reopening keeps it; a different size is a usage error', async (t) => {
  const { dev, file } = await openTemp(t, { size: 64 * MiB });
  t.equal(dev.size, 64 * MiB);
  t.equal(fs.statSync(file).size, 64 * MiB);
  t.equal(fs.statSync(file).blocks, 0, 'created sparse');
  t.equal(dev.isBlockDevice, false);
  const again = await FileDevice.open({ path: file });
  t.equal(again.size, 64 * MiB);
  await again.close();
  await t.rejects(FileDevice.open({ path: file, size: 32 * MiB }), { code: 'ERR_USAGE', message: /exists with 67108864 bytes/ });
  await t.rejects(FileDevice.open({ path: path.join(path.dirname(file), 'missing.img') }), {
    code: 'ERR_USAGE',
    message: /does not exist; pass --size to create it/,
  });
  const empty = path.join(path.dirname(file), 'empty.img');
  await t.rejects(FileDevice.open({ path: empty, size: 0 }), { code: 'ERR_USAGE', message: /--size must be at least 1 byte/ }, 'size 0 is a usage error');
  t.notOk(fs.existsSync(empty), 'and leaves no empty file that later opens would refuse');
});

// ext4's files end at 16 TiB (4 KiB blocks): a larger --size failed with a bare "EFBIG: file too large, ftruncate".
const EXT4_MAGIC = 0xef53;
t.test('a size larger than the filesystem allows for one file is a usage error naming the image', { skip: fs.statfsSync('.').type === EXT4_MAGIC ? false : 'the test directory is not on ext4' }, async (t) => {
  const file = path.join(t.testdir(), 'huge.img');
  await t.rejects(FileDevice.open({ path: file, size: 2 ** 50 }), { code: 'ERR_USAGE', message: /cannot create image .*huge\.img of 1125899906842624 bytes: its filesystem's files cannot be that large \(EFBIG\)/ });
  t.notOk(fs.existsSync(file), 'and leaves no file behind');
});

t.test('native helper is loaded and capabilities say so', async (t) => {
  const { dev } = await openTemp(t);
  t.equal(dev.nativeAvailable, true, 'build/Release/blockferry_native.node must be built (npx node-gyp rebuild)');
  t.match(dev.capabilities, { trim: true, zeroes: true, fastZero: true, blockStatus: true, fua: true, flush: true, multiConn: true, readOnly: false });
});

t.test('write/read round-trip at unaligned offsets, small (sync) and large (thread pool)', async (t) => {
  const { dev, file } = await openTemp(t);
  const small = randomBytes(1000);
  const large = randomBytes(3 * MiB + 7);
  await dev.write(4097, small);
  await dev.write(MiB + 3, large, { fua: true });
  t.same(await dev.read(4097, small.length), small);
  t.same(await dev.read(MiB + 3, large.length), large);
  t.same(await dev.read(4000, 97), Buffer.alloc(97), 'unwritten range reads as zeroes');
  await dev.flush();
  const disk = fs.readFileSync(file);
  t.same(disk.subarray(MiB + 3, MiB + 3 + large.length), large, 'data reached the file');
});

t.test('trim punches a real hole; blockStatus reports it', async (t) => {
  const { dev, file } = await openTemp(t);
  await dev.write(0, randomBytes(4 * MiB));
  await dev.flush();
  const before = fs.statSync(file).blocks;
  t.same(await dev.blockStatus(0, 4 * MiB), [{ length: 4 * MiB, hole: false, zero: false }]);
  await dev.trim(MiB, 2 * MiB);
  t.same(await dev.read(MiB, 2 * MiB), Buffer.alloc(2 * MiB));
  const after = fs.statSync(file).blocks;
  t.ok(after <= before - (2 * MiB) / 512, `blocks dropped by 2 MiB (${before} -> ${after})`);
  t.same(await dev.blockStatus(0, 8 * MiB), [
    { length: MiB, hole: false, zero: false },
    { length: 2 * MiB, hole: true, zero: true },
    { length: MiB, hole: false, zero: false },
    { length: 4 * MiB, hole: true, zero: true },
  ]);
  t.same(await dev.blockStatus(MiB + 4096, 4096), [{ length: 4096, hole: true, zero: true }], 'clipped to the request');
});

t.test('writeZeroes punches by default and keeps blocks allocated with noHole', async (t) => {
  const { dev, file } = await openTemp(t);
  await dev.write(0, randomBytes(4 * MiB));
  await dev.flush();
  const full = fs.statSync(file).blocks;
  await dev.writeZeroes(0, MiB, { noHole: true });
  t.same(await dev.read(0, MiB), Buffer.alloc(MiB));
  t.equal(fs.statSync(file).blocks, full, 'zero-range kept the blocks');
  t.same((await dev.blockStatus(0, MiB))[0], { length: MiB, hole: false, zero: false }, 'still allocated');
  await dev.writeZeroes(2 * MiB, MiB, { fastZero: true, fua: true });
  t.same(await dev.read(2 * MiB, MiB), Buffer.alloc(MiB));
  t.ok(fs.statSync(file).blocks < full, 'default zeroing punched a hole');
  t.same(await dev.read(MiB, MiB).then((b) => b.equals(Buffer.alloc(MiB))), false, 'neighbours untouched');
});

t.test('read-only refuses writes, trims and zeroing with EROFS', async (t) => {
  const { dev, file } = await openTemp(t);
  await dev.write(0, Buffer.from('hello'));
  const ro = await FileDevice.open({ path: file, readOnly: true });
  t.teardown(() => ro.close());
  t.equal(ro.capabilities.readOnly, true);
  t.same(await ro.read(0, 5), Buffer.from('hello'));
  await t.rejects(ro.write(0, Buffer.from('x')), { code: 'EROFS' });
  await t.rejects(ro.trim(0, 4096), { code: 'EROFS' });
  await t.rejects(ro.writeZeroes(0, 4096), { code: 'EROFS' });
});

t.test('short read at EOF of a file returns zeroes, not garbage', async (t) => {
  const { dev, file } = await openTemp(t, { size: MiB });
  await dev.write(MiB - 10, Buffer.alloc(10, 0xaa));
  fs.truncateSync(file, MiB - 5); // the file shrank under us: the tail must read as zeroes
  const buf = await dev.read(MiB - 10, 10);
  t.same(buf, Buffer.concat([Buffer.alloc(5, 0xaa), Buffer.alloc(5)]));
});

t.test('without the native helper: fewer capabilities, I/O still works, zeroing by writing', async (t) => {
  const { dev, file } = await openTemp(t, { noNative: true });
  t.equal(dev.nativeAvailable, false);
  t.match(dev.capabilities, { trim: false, zeroes: false, fastZero: false, blockStatus: false, fua: false, flush: true });
  const data = randomBytes(10000);
  await dev.write(123, data);
  t.same(await dev.read(123, data.length), data);
  await dev.writeZeroes(100, 5000);
  t.same(await dev.read(100, 5000), Buffer.alloc(5000));
  await t.rejects(dev.writeZeroes(0, 4096, { fastZero: true }), { code: 'ENOTSUP' });
  await dev.trim(0, 4096); // a hint, ignored
  t.same(await dev.read(5100, 100), data.subarray(5100 - 123, 5200 - 123));
  t.ok(fs.statSync(file).size === 8 * MiB);
});

t.test('BLOCKFERRY_NO_NATIVE=1 disables the helper', async (t) => {
  process.env.BLOCKFERRY_NO_NATIVE = '1';
  t.teardown(() => { delete process.env.BLOCKFERRY_NO_NATIVE; });
  const { dev } = await openTemp(t);
  t.equal(dev.nativeAvailable, false);
  t.equal(dev.capabilities.trim, false);
});

t.test('whole-disk trim of a 10 GiB sparse image is one cheap call', async (t) => {
  const { dev, file } = await openTemp(t, { size: 10 * 2 ** 30 });
  await dev.write(5 * 2 ** 30, randomBytes(MiB));
  await dev.trim(0, dev.size);
  t.equal(fs.statSync(file).blocks, 0);
  t.same(await dev.blockStatus(0, dev.size), [{ length: dev.size, hole: true, zero: true }]);
});

t.test('large writes go out in pieces, byte-exact at odd offsets, with and without the helper; errors carry their code', async (t) => {
  for (const noNative of [false, true]) {
    const { dev, file } = await openTemp(t, { size: 16 * MiB, noNative });
    // 3 MiB + 12345 bytes (many 128 KiB pieces and a short last one) at an offset that is not page aligned.
    const data = randomBytes(3 * MiB + 12345);
    const offset = 5 * MiB + 777;
    await dev.write(offset, data);
    const back = Buffer.alloc(data.length);
    const fd = fs.openSync(file, 'r');
    fs.readSync(fd, back, 0, back.length, offset);
    const before = Buffer.alloc(777 + MiB);
    fs.readSync(fd, before, 0, before.length, 4 * MiB);
    fs.closeSync(fd);
    t.ok(back.equals(data), `${noNative ? 'fallback' : 'native pieces'}: every byte of the 3 MiB write is in place`);
    t.ok(before.equals(Buffer.alloc(before.length)), `${noNative ? 'fallback' : 'native pieces'}: nothing before it was touched`);
    t.ok((await dev.read(offset, data.length)).equals(data), 'and reads back through the device');
  }
  const { loadNative } = await import('../src/device/native.js');
  const native = loadNative()!;
  const err = await new Promise<NodeJS.ErrnoException | null>((resolve) => native.pwritePieces(-1, Buffer.alloc(10), 0, 4, resolve));
  t.match(err, { code: 'EBADF', syscall: 'pwrite' }, 'a failed pwrite reaches the callback as a coded error');
});

t.test('writeNow writes small buffers at once and leaves larger ones to write(); a read-only image refuses it', async (t) => {
  const { dev, file } = await openTemp(t);
  const small = randomBytes(4096);
  t.equal(dev.writeNow(3 * 4096 + 5, small), true, 'a 4 KiB write is done synchronously');
  const fd = fs.openSync(file, 'r');
  const back = Buffer.alloc(small.length);
  fs.readSync(fd, back, 0, back.length, 3 * 4096 + 5);
  t.ok(back.equals(small), 'and is in the file when writeNow returns');
  const big = randomBytes(MiB);
  t.equal(dev.writeNow(2 * MiB, big), false, 'a 1 MiB write is not taken');
  const untouched = Buffer.alloc(big.length);
  fs.readSync(fd, untouched, 0, untouched.length, 2 * MiB);
  fs.closeSync(fd);
  t.ok(untouched.equals(Buffer.alloc(big.length)), 'and nothing of it was written');
  const ro = await FileDevice.open({ path: file, readOnly: true });
  t.teardown(() => ro.close());
  t.throws(() => ro.writeNow(0, small), { code: 'EROFS' });
});

t.test('writeManyNow writes a run of small writes in order, with and without the helper, and says how many a failure left written', async (t) => {
  for (const noNative of [false, true]) {
    const how = noNative ? 'fallback' : 'native';
    const { dev, file } = await openTemp(t, { noNative });
    // Overlapping writes: the later one in the run must win, as it would applied one by one.
    const a = randomBytes(4096);
    const b = randomBytes(4096);
    const c = randomBytes(100);
    dev.writeManyNow([8192, 8192 + 2048, 5 * MiB + 3], [a, b, c]);
    const expect = Buffer.alloc(8 * MiB);
    a.copy(expect, 8192);
    b.copy(expect, 8192 + 2048);
    c.copy(expect, 5 * MiB + 3);
    t.ok(fs.readFileSync(file).equals(expect), `${how}: every write in place, the later of two overlapping ones on top`);
    t.throws(() => dev.writeManyNow([0], [randomBytes(MiB)]), RangeError, `${how}: a write larger than writeNow takes is refused`);
    t.equal(dev.takesNow(4096), true);
    t.equal(dev.takesNow(MiB), false);
    // The third write is past the largest file ext4 holds (16 TiB with 4 KiB blocks): two are written, then the
    // error says so.
    const d = randomBytes(512);
    const err = (() => {
      try {
        dev.writeManyNow([0, 4096, 2 ** 50, 12288], [d, d, d, d]);
      } catch (e) {
        return e as NodeJS.ErrnoException & { written?: number };
      }
      return undefined;
    })();
    t.match(err, { code: 'EFBIG' }, `${how}: the failure is a coded error (${err?.code})`);
    t.equal(err?.written, 2, `${how}: written counts the writes before the failing one`);
    const back = fs.readFileSync(file);
    t.ok(back.subarray(0, 512).equals(d) && back.subarray(4096, 4096 + 512).equals(d), `${how}: those two are in the file`);
    t.ok(back.subarray(12288, 12288 + 512).equals(expect.subarray(12288, 12288 + 512)), `${how}: the one after the failure was not written`);
  }
  const { dev: ro0, file } = await openTemp(t);
  await ro0.close();
  const ro = await FileDevice.open({ path: file, readOnly: true });
  t.teardown(() => ro.close());
  t.throws(() => ro.writeManyNow([0], [Buffer.alloc(512)]), { code: 'EROFS', written: 0 });
});

t.test('writePiece: a large write in 32 KiB pieces lands byte-exact', async (t) => {
  const dir = t.testdir();
  const dev = await FileDevice.open({ path: path.join(dir, 'replica.img'), size: 16 * MiB, writePiece: 32 * 1024 });
  t.teardown(() => dev.close());
  const data = randomBytes(8 * MiB + 321);
  await dev.write(MiB + 3, data);
  t.ok((await dev.read(MiB + 3, data.length)).equals(data), 'every byte of the 8 MiB write reads back');
  t.ok((await dev.read(0, MiB + 3)).equals(Buffer.alloc(MiB + 3)), 'nothing before it was touched');
});

t.test('readScan reads what read() reads, sees later writes, and its descriptor closes with the device', async (t) => {
  for (const noNative of [false, true]) {
    const { dev } = await openTemp(t, { noNative });
    const data = randomBytes(3 * MiB);
    await dev.write(MiB + 7, data);
    const fdsBefore = fs.readdirSync('/proc/self/fd').length;
    const scanned = await dev.readScan(MiB + 7, data.length);
    t.ok(scanned.equals(data), `noNative=${noNative}: a 3 MiB scan read returns the written bytes`);
    t.ok(scanned.equals(await dev.read(MiB + 7, data.length)), 'the same as read()');
    const later = randomBytes(4096);
    t.equal(dev.writeNow(2 * MiB, later), true);
    t.ok((await dev.readScan(2 * MiB, 4096)).equals(later), 'a write made after the scan descriptor opened is seen by the next scan');
    t.ok((await dev.readScan(0, 4096)).equals(Buffer.alloc(4096)), 'an unwritten range scans as zeroes');
    t.equal(fs.readdirSync('/proc/self/fd').length, fdsBefore + (noNative ? 0 : 1), noNative ? 'without the helper it reads through the main descriptor' : 'with the helper one more descriptor is open');
    await dev.close();
    t.equal(fs.readdirSync('/proc/self/fd').length, fdsBefore - 1, 'close() closes both descriptors');
  }
});
