// Replication link options through a --config file: --max-rate paces shipping, --compress negotiates
// permessage-deflate, and the replica still ends byte-identical. Also: a config key that is not a flag is
// refused, as a mistyped flag is.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { sameFiles, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, run, startReplay, startServe } from './helpers/processes.js';

const SIZE = 32 * 2 ** 20;

t.test('--config with max-rate and compress: paced, compressed, identical', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const config = path.join(dir, 'blockferry.json');
  fs.writeFileSync(config, JSON.stringify({ image: [`disk=${image}`], size: String(SIZE), listen: '127.0.0.1:0', 'replicate-to': [replay.url], 'max-rate': '4MB/s', compress: true }));
  const s = await startServe(['--config', config], t.teardown);

  // 12 MiB, half of it compressible (a repeated pattern), half random.
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const started = Date.now();
  for (let i = 0; i < 12; i++) {
    const block = i % 2 ? randomBytes(2 ** 20) : Buffer.alloc(2 ** 20, `block ${i} `);
    await c.write(i * 2 ** 20, block);
  }
  await c.flush();
  await c.close();
  const replica = path.join(replicaDir, 'disk.img');
  const same = await until(() => sameFiles(image, replica), 60_000 - (Date.now() - started), 100);
  const seconds = (Date.now() - started) / 1000;
  t.ok(same, 'the replica converges byte for byte');
  // 12 MiB of entries at 4 MiB/s cannot arrive in much under 3 s (less what compression saves on half of it).
  t.ok(seconds >= 1.4, `shipping was paced by --max-rate (${seconds.toFixed(1)} s for 12 MiB at 4 MiB/s)`);
  t.match(s.stderr(), /"extensions":"permessage-deflate/, 'the link negotiated permessage-deflate');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a config key that is not a flag is refused', async (t) => {
  const dir = t.testdir();
  const config = path.join(dir, 'bad.json');
  fs.writeFileSync(config, JSON.stringify({ image: [`disk=${path.join(dir, 'd.img')}`], size: '1M', 'replicate-too': ['ws://127.0.0.1:1'] }));
  const err = await run(process.execPath, [CLI, 'serve', '--config', config]).then(
    () => '',
    (e: Error) => e.message,
  );
  t.match(err, /replicate-too/, 'the unknown key is named');
});

t.test('a link slower than the writes: the replica is pulled ahead onto the bitmap when the journal fills, writes go on at disk speed, and it resyncs to identical', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const s = await startServe(['--image', `disk=${image}`, '--size', '256M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--max-rate', '8MB/s', '--journal-max', '64M'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const bytes = 128 * 2 ** 20;
  const started = Date.now();
  for (let off = 0; off < bytes; off += 2 ** 20) await c.write(off, randomBytes(2 ** 20));
  await c.flush();
  const seconds = (Date.now() - started) / 1000;
  const linkSeconds = bytes / (8 * 1e6);
  // Waiting for the link once the 64 MiB journal was full, the writes would take ~8 s (64 MiB at 8 MB/s).
  t.ok(seconds < linkSeconds / 3, `128 MiB written in ${seconds.toFixed(1)} s, not at the link's pace (${linkSeconds.toFixed(0)} s)`);
  t.match(s.stderr(), /pull-ahead/, 'serve says it pulled the replica ahead');
  await c.close();
  const replica = path.join(replicaDir, 'disk.img');
  t.ok(await until(() => sameFiles(image, replica), 90_000, 200), 'the replica resyncs the dirty regions and converges byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a link that keeps up is not pulled ahead, even with a journal no larger than the window in flight', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const s = await startServe(['--image', `disk=${image}`, '--size', '128M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--journal-max', '16M'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const inflight = new Set<Promise<void>>();
  for (let i = 0; i < 96; i++) {
    const p = c.write((i % 128) * 2 ** 20, randomBytes(2 ** 20));
    inflight.add(p);
    void p.finally(() => inflight.delete(p));
    if (inflight.size >= 8) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  await c.flush();
  await c.close();
  t.ok(await until(() => sameFiles(image, path.join(replicaDir, 'disk.img')), 60_000, 100), 'the replica converges');
  // Counting what was in flight as backlog pulled such a replica ahead (a needless drop and resync).
  t.notMatch(s.stderr(), /pull-ahead/, 'it was never pulled ahead');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});
