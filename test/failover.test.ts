// The failover runbook of the README, step by step, with real processes: write at site A, lose A (SIGKILL),
// promote the replica at site B and serve it, read back what A had replicated; split brain: A comes back and
// writes too, its replication into B is refused and reported, B's data untouched; failback: demote A's image,
// replicate B -> A, and only the differing chunks travel; A's copy ends byte-identical to B.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, run, startReplay, startServe } from './helpers/processes.js';

const SIZE = 32 * 2 ** 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, ms = 60_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (cond()) return true;
    await sleep(200);
  }
  return false;
}

const same = (a: string, b: string) => fs.existsSync(a) && fs.existsSync(b) && fs.readFileSync(a).equals(fs.readFileSync(b));

async function writeAt(port: number, offset: number, data: Buffer): Promise<void> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  await c.write(offset, data);
  await c.flush();
  await c.close();
}

async function readAt(port: number, offset: number, length: number): Promise<Buffer> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  const b = await c.read(offset, length);
  await c.close();
  return b;
}

t.test('failover, split brain, failback', async (t) => {
  const dir = t.testdir();
  const imageA = path.join(dir, 'siteA', 'disk.img');
  fs.mkdirSync(path.dirname(imageA));
  const dataB = path.join(dir, 'siteB');
  const replicaB = path.join(dataB, 'disk.img');

  // Normal operation: A serves and replicates to B.
  const replayB = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dataB], t.teardown);
  const a1 = await startServe(['--image', `disk=${imageA}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', replayB.url], t.teardown);
  const before = randomBytes(4 * 2 ** 20);
  await writeAt(a1.port, 0, before);
  t.ok(await until(() => same(imageA, replicaB)), 'B has caught up with A');

  // Site A is lost.
  a1.child.kill('SIGKILL');
  await a1.exited;

  // Failover at B: stop the replayer, promote, serve the replica.
  const busy = await run(process.execPath, [CLI, 'promote', '--data-dir', dataB, '--volume', 'disk']).then(
    () => 'promoted',
    (err: Error) => err.message,
  );
  t.match(busy, /replayer \(pid \d+\) is running/, 'promote refuses while the replayer runs on the directory');
  replayB.child.kill('SIGTERM');
  t.equal(await replayB.exited, 0, 'replayer B stops cleanly');
  const promoted = await run(process.execPath, [CLI, 'promote', '--data-dir', dataB, '--volume', 'disk']);
  t.match(promoted.stdout, /volume disk promoted at seq \d+/, 'promote reports the seq the new primary starts from');
  const b = await startServe(['--image', `disk=${replicaB}`, '--listen', '127.0.0.1:0'], t.teardown);
  t.ok((await readAt(b.port, 0, before.length)).equals(before), 'the promoted replica serves what A wrote before the failure');

  // Split brain: A comes back (same image and journal, still replicating to B's address) and writes; B writes too.
  const replayB2 = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dataB], t.teardown);
  const a2 = await startServe(['--image', `disk=${imageA}`, '--listen', '127.0.0.1:0', '--replicate-to', replayB2.url], t.teardown);
  const fromA = randomBytes(1 * 2 ** 20);
  const fromB = randomBytes(1 * 2 ** 20);
  await writeAt(a2.port, 8 * 2 ** 20, fromA);
  await writeAt(b.port, 16 * 2 ** 20, fromB);
  t.ok(await until(() => /ERR_VOLUME_PROMOTED/.test(a2.stderr())), 'the old primary is told the replica was promoted');
  t.match(a2.stderr(), /promoted to a primary/, 'and reports it in its log');
  await sleep(500);
  t.ok((await readAt(b.port, 0, before.length)).equals(before), "B's data is untouched by A");
  t.ok((await readAt(b.port, 16 * 2 ** 20, fromB.length)).equals(fromB), "B's own writes are there");
  t.ok(!(await readAt(b.port, 8 * 2 ** 20, fromA.length)).equals(fromA), "A's post-failover write did not reach B");
  t.equal(await a2.stop(), 0, 'the old primary stops cleanly');
  replayB2.child.kill('SIGTERM');
  await replayB2.exited;

  // Failback: A's image becomes a replica of B; only the differing chunks are sent.
  const dataA = path.join(dir, 'siteA-replica');
  const demoted = await run(process.execPath, [CLI, 'demote', '--image', `disk=${imageA}`, '--data-dir', dataA]);
  t.match(demoted.stdout, /now the replica of volume disk/, 'demote moves the old image into a replica directory');
  const replayA = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dataA], t.teardown);
  t.equal(await b.stop(), 0, 'B stops, to restart replicating to A');
  const b2 = await startServe(['--image', `disk=${replicaB}`, '--listen', '127.0.0.1:0', '--replicate-to', replayA.url], t.teardown);
  const replicaA = path.join(dataA, 'disk.img');
  t.ok(await until(() => /every differing chunk is queued/.test(b2.stderr()) && same(replicaB, replicaA)), 'A converges to B byte for byte');
  const m = /"sentBytes":(\d+)/.exec(b2.stderr());
  t.ok(m && Number(m[1]) <= 3 * 2 ** 20, `only the differing chunks were sent (${m?.[1]} of ${SIZE} bytes)`);
  const v = await run(process.execPath, [CLI, 'verify', '--image', `disk=${replicaB}`, '--replica', replayA.url]);
  t.match(v.stdout, /identical/, 'blockferry verify agrees');
  t.equal(await b2.stop(), 0, 'B stops cleanly');
});
