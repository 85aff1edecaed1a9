// Real NBD clients against a real `blockferry serve` process (journaled): nbdinfo, nbdcopy, qemu-img,
// qemu-io and fio's nbd engine. These tools are installed by scripts/install-test-deps.sh, never skipped.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CLI, run, startServe } from './helpers/processes.js';
import { filesEqual, sha256File } from './helpers/files.js';

const SIZE = 256 * 2 ** 20;

t.test('nbdinfo, nbdcopy, qemu-img, qemu-io and fio against serve', async (t) => {
  const dir = t.testdir();
  const s = await startServe(
    ['--image', `disk=${path.join(dir, 'disk.img')}`, '--image', `two=${path.join(dir, 'two.img')}`, '--size', String(SIZE), '--listen', '127.0.0.1:0'],
    t.teardown,
  );
  const base = `nbd://127.0.0.1:${s.port}`;

  const info = JSON.parse((await run('nbdinfo', ['--json', `${base}/disk`])).stdout);
  const e = info.exports[0];
  t.equal(e['export-size'], SIZE, 'size');
  t.match(e, { can_flush: true, can_fua: true, can_multi_conn: true, is_read_only: false, can_zero: true, can_cache: true }, 'flags');
  t.match(e, { block_size_minimum: 1, block_size_preferred: 4096, block_size_maximum: 32 * 2 ** 20 }, 'block sizes');
  const list = (await run('nbdinfo', ['--list', '--json', base])).stdout;
  t.same(JSON.parse(list).exports.map((x: { 'export-name': string }) => x['export-name']).sort(), ['disk', 'two'], 'export list');
  const map = (await run('nbdinfo', ['--map', `${base}/disk`])).stdout;
  t.match(map, /^\s*0\s+268435456\s+3\s+hole,zero\s*$/, 'base:allocation: a new sparse image is one hole that reads as zeroes');

  // nbdcopy round trip of random data, compared by checksum and by qemu-img compare.
  const src = path.join(dir, 'src.bin');
  const head = randomBytes(40 * 2 ** 20);
  fs.writeFileSync(src, head);
  fs.truncateSync(src, SIZE);
  await run('nbdcopy', [src, `${base}/two`]);
  const back = path.join(dir, 'back.bin');
  await run('nbdcopy', [`${base}/two`, back]);
  t.equal(await sha256File(back), await sha256File(src), 'nbdcopy there and back: same sha256');
  t.ok(filesEqual(back, src), 'nbdcopy there and back: same bytes');
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, `${base}/two`]);
  t.pass('qemu-img compare: identical');
  const map2 = (await run('nbdinfo', ['--map', `${base}/two`])).stdout;
  t.match(map2, /^\s*0\s+41943040\s+0\s+data\s*$/m, 'base:allocation: the 40 MiB copied are data');
  t.match(map2, /^\s*41943040\s+\d+\s+3\s+hole,zero\s*$/m, 'and the zero tail stayed a hole (nbdcopy skipped it)');

  // qemu-io patterns at aligned and unaligned offsets, zeroes, discard, flush.
  const io = await run('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0xa5 0 1M',
    '-c', 'write -P 0x5a 1000 3000',
    '-c', 'write -z 2M 512k',
    '-c', 'write -P 0x11 2M 4096',
    '-c', 'flush',
    '-c', 'read -P 0xa5 0 1000',
    '-c', 'read -P 0x5a 1000 3000',
    '-c', 'read -P 0xa5 4000 1044576',
    '-c', 'read -P 0x11 2M 4096',
    '-c', 'read -P 0 2101248 520192',
    '-c', 'discard 8M 1M',
    `${base}/disk`,
  ]);
  t.notMatch(io.stdout + io.stderr, /Pattern verification failed|error/i, 'qemu-io patterns verified');

  // fio's nbd engine: random writes from two jobs with CRC32C verification.
  const fio = await run('fio', [
    '--name=verify', '--ioengine=nbd', `--uri=${base}/disk`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
    '--size=32M', '--offset=64M', '--numjobs=2', '--offset_increment=32M', '--verify=crc32c', '--do_verify=1', '--verify_state_save=0', '--output-format=json',
  ]);
  const jobs = JSON.parse(fio.stdout.slice(fio.stdout.indexOf('{'))).jobs;
  t.equal(jobs.length, 2);
  t.ok(jobs.every((j: { error: number }) => j.error === 0), 'fio wrote and verified without error');

  t.equal(await s.stop('SIGTERM'), 0, 'serve stops cleanly');
  const inspect = JSON.parse((await run(process.execPath, [CLI, 'journal', 'inspect', '--journal', path.join(dir, 'disk.img.journal'), '--json'])).stdout);
  t.ok(inspect.stats.headSeq > 16000, `every write journaled (${inspect.stats.headSeq} entries appended)`);
  t.equal(inspect.stats.checkpointSeq, inspect.stats.headSeq, 'clean stop checkpointed the image at the head');
  t.equal(inspect.writeMap, false, 'inspect says the journal writes its pages with writev (the default), not through the write map');
  const fileSize = fs.statSync(path.join(dir, 'disk.img.journal', 'journal.mdb')).size;
  if (inspect.writeMap) t.ok(inspect.fileBytes > 0 && inspect.fileBytes < fileSize, `the write-map file is sparse: ${inspect.fileBytes} of ${fileSize} bytes on disk`);
  else t.ok(inspect.fileBytes > 0, `the journal takes ${inspect.fileBytes} bytes on disk`);
  // The clients' WRITE data went to the segments' data files, and pruned segments' files wait as spares:
  // inspect counts both, apart.
  const jdir = path.join(dir, 'disk.img.journal');
  const onDisk = (spare: boolean): number =>
    fs.readdirSync(jdir).filter((f) => f.endsWith('.data') && /^spare(-\d+)?\.data$/.test(f) === spare).reduce((n, f) => n + fs.statSync(path.join(jdir, f)).blocks * 512, 0);
  t.ok(inspect.dataFileBytes > 0 && inspect.dataFileBytes === onDisk(false), `inspect counts the segments' data files' ${onDisk(false)} bytes on disk (${inspect.dataFileBytes})`);
  t.equal(inspect.spareFileBytes, onDisk(true), `and the spares' ${onDisk(true)} bytes`);
});

t.test('read-only export refuses writes as qemu-io sees them', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'ro.img');
  fs.writeFileSync(img, Buffer.alloc(2 ** 20, 7));
  const s = await startServe(['--image', `ro=${img}`, '--read-only', '--listen', '127.0.0.1:0'], t.teardown);
  const info = JSON.parse((await run('nbdinfo', ['--json', s.uri])).stdout);
  t.equal(info.exports[0].is_read_only, true);
  await t.rejects(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', s.uri]), /Operation not permitted|Permission denied|read-only/i);
  await s.stop();
});

t.test('serve keeps nothing of clients that came and went: 40 runs of nbdinfo and qemu-img', async (t) => {
  // Each of these clients ends with NBD_CMD_DISC. serve once kept every such socket open (reading was paused
  // at DISC, so it never saw the client's FIN): 512 of them and it refused every later client.
  const dir = t.testdir();
  const img = path.join(dir, 'probe.img');
  fs.writeFileSync(img, Buffer.alloc(2 ** 20, 3));
  const s = await startServe(['--image', `probe=${img}`, '--listen', '127.0.0.1:0'], t.teardown);
  const sockets = () => fs.readdirSync(`/proc/${s.child.pid}/fd`).filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/${s.child.pid}/fd/${fd}`).startsWith('socket:');
    } catch {
      return false; // closed while listing
    }
  }).length;
  const before = sockets();
  for (let i = 0; i < 20; i++) {
    t.match((await run('nbdinfo', ['--size', s.uri])).stdout.trim(), /^1048576$/, `nbdinfo #${i + 1}`, { diagnostic: false });
    t.match((await run('qemu-img', ['info', '-f', 'raw', s.uri])).stdout, /virtual size: 1 MiB/, `qemu-img info #${i + 1}`, { diagnostic: false });
  }
  let after = sockets();
  for (const deadline = Date.now() + 3000; after > before && Date.now() < deadline; after = sockets()) await new Promise((r) => setTimeout(r, 50));
  t.equal(after, before, `serve holds as many sockets as before the 40 clients (${before})`);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});
