// A primary whose journal lost a tail the replica had already applied (what a power cut does to LMDB's unsynced
// transactions with `--durability commit`), and whose new writes took those seqs before the replica came back.
// The replica must not be shipped on from its seq as if the histories were one: it is compared by digests and
// ends byte-identical to the primary. The lost tail is made by putting back a copy of the journal taken earlier.
// The new writes come as the lost ones did, so the entry at the replica's last seq is a FLUSH marker in both
// histories (the same bytes): comparing that one entry alone would not see the difference.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { converges, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { freePort, startReplay, startServe } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;
const BLOCK = 64 * 1024;

/** Writes blocks [from, to) with fresh random data, then flushes. */
async function writeBlocks(port: number, from: number, to: number): Promise<void> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  for (let b = from; b < to; b++) await c.write(b * BLOCK, randomBytes(BLOCK));
  await c.flush();
  await c.close();
}

t.test('a replica that applied writes the primary lost is resynced, not shipped on from its seq', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  const snapshot = path.join(dir, 'journal-earlier');
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  const port = await freePort();
  const replayArgs = ['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir];
  const serveArgs = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal, '--journal-max', '64M', '--replicate-to', `ws://127.0.0.1:${port}`];

  let replay = await startReplay(replayArgs, t.teardown);
  let s = await startServe(serveArgs, t.teardown);
  await writeBlocks(s.port, 0, 8);
  t.ok(await converges(image, replica, 60_000), 'the replica is in step');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  fs.cpSync(journal, snapshot, { recursive: true });

  // These writes reach the replica, then the primary's journal loses them.
  s = await startServe(serveArgs, t.teardown);
  await writeBlocks(s.port, 8, 16);
  t.ok(await converges(image, replica, 60_000), 'the replica applied the writes that will be lost');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  replay.child.kill('SIGTERM');
  await replay.exited;
  fs.rmSync(journal, { recursive: true, force: true });
  fs.cpSync(snapshot, journal, { recursive: true });

  // Back with the earlier journal and the replica away: new writes, twice as many, take the lost seqs and more.
  // Written as the lost ones were (eight blocks, then a FLUSH), so the entry at the replica's last seq is a
  // FLUSH marker here too, the same bytes: only the entries before it tell the histories apart.
  s = await startServe(serveArgs, t.teardown);
  await writeBlocks(s.port, 16, 24);
  await writeBlocks(s.port, 24, 32);
  replay = await startReplay(replayArgs, t.teardown);
  t.ok(await converges(image, replica, 60_000), 'the replica ends byte-identical to the primary');
  // Polled, as the other tests read logs: the line can be in the pipe, unread, while the comparison above reads
  // the two files synchronously and finds them equal.
  const named = await until(() => /last entries through seq \d+ are not this journal's/.test(s.stderr()), 10_000, 50);
  t.ok(named, "serve named the replica's other history");
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});
