// The failover runbook of the README, step by step, with real processes: an ext4 filesystem with files at
// site A, lose A (SIGKILL), promote the replica at site B, serve it, mount it (nbdfuse + loop) and read every
// file back; split brain: A comes back and
// writes too, its replication into B is refused and reported, B's data untouched; failback: demote A's image,
// replicate B -> A, and only the differing chunks travel; A's copy ends byte-identical to B.
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { attachLoop } from './helpers/fuse-loop.js';
import { sameFiles, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, run, runStatus, startReplay, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

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
  // A filesystem with files on A, through the kernel (nbdfuse + loop device).
  const work = path.join(dir, 'work');
  fs.mkdirSync(work);
  const diskA = await attachLoop(a1.uri, path.join(work, 'a'), t.teardown);
  await run('mkfs.ext4', ['-q', '-F', diskA.device]);
  const mnt = path.join(work, 'mnt');
  fs.mkdirSync(mnt);
  await diskA.mount(mnt);
  const files = new Map<string, string>();
  for (let f = 0; f < 12; f++) {
    const data = randomBytes(1 + Math.floor(Math.random() * 2 ** 20));
    fs.writeFileSync(path.join(mnt, `file${f}.bin`), data);
    files.set(`file${f}.bin`, sha(data));
  }
  await diskA.umount();
  await diskA.detach();
  t.ok(await until(() => sameFiles(imageA, replicaB)), 'B has caught up with A');

  // Site A is lost.
  a1.child.kill('SIGKILL');
  await a1.exited;

  // Failover at B: stop the replayer, promote, serve the replica.
  const busy = await run(process.execPath, [CLI, 'promote', '--data-dir', dataB, '--volume', 'disk']).then(
    () => 'promoted',
    (err: Error) => err.message,
  );
  t.match(busy, /in use by another process \(pid \d+\): stop it before running promote/, 'promote refuses while the replayer runs on the directory');
  replayB.child.kill('SIGTERM');
  t.equal(await replayB.exited, 0, 'replayer B stops cleanly');
  const promoted = await run(process.execPath, [CLI, 'promote', '--data-dir', dataB, '--volume', 'disk']);
  t.match(promoted.stdout, /volume disk promoted at seq \d+/, 'promote reports the seq the new primary starts from');
  const b = await startServe(['--image', `disk=${replicaB}`, '--listen', '127.0.0.1:0'], t.teardown);
  const diskB = await attachLoop(b.uri, path.join(work, 'b'), t.teardown);
  t.match((await run('e2fsck', ['-fn', diskB.device])).stdout, /clean|files/, 'the promoted replica has a clean filesystem (e2fsck -fn)');
  await diskB.mount(mnt);
  let readBack = 0;
  for (const [name, sum] of files) if (sha(fs.readFileSync(path.join(mnt, name))) === sum) readBack++;
  t.equal(readBack, files.size, `every file written at A before the failure reads back from the promoted replica (${readBack}/${files.size})`);
  await diskB.umount();
  await diskB.detach();
  const before = await readAt(b.port, 0, 4 * 2 ** 20);

  // Split brain: A comes back (same image and journal, still replicating to B's address) and writes; B writes too.
  const replayB2 = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', dataB, '--admin', '127.0.0.1:0'], t.teardown);
  const a2 = await startServe(['--image', `disk=${imageA}`, '--listen', '127.0.0.1:0', '--replicate-to', replayB2.url], t.teardown);
  const fromA = randomBytes(1 * 2 ** 20);
  const fromB = randomBytes(1 * 2 ** 20);
  const b8 = await readAt(b.port, 8 * 2 ** 20, fromA.length);
  await writeAt(a2.port, 8 * 2 ** 20, fromA);
  await writeAt(b.port, 16 * 2 ** 20, fromB);
  t.ok(await until(() => /ERR_VOLUME_PROMOTED/.test(a2.stderr())), 'the old primary is told the replica was promoted');
  t.match(a2.stderr(), /promoted to a primary/, 'and reports it in its log');
  await sleep(500);
  t.ok((await readAt(b.port, 0, before.length)).equals(before), "B's data is untouched by A");
  t.ok((await readAt(b.port, 16 * 2 ** 20, fromB.length)).equals(fromB), "B's own writes are there");
  t.ok((await readAt(b.port, 8 * 2 ** 20, fromA.length)).equals(b8), "A's post-failover write did not reach B");
  // B's replayer says the volume is promoted, and counts that as nothing to attend to (it is a primary now).
  const admin = /admin on (http:\/\/\S+)/.exec(replayB2.stdout())![1];
  const st = await runStatus(process.execPath, [CLI, 'status', '--admin', admin, '--json']);
  t.equal(st.code, 0, `blockferry status of B's replayer exits 0${st.code ? `: ${st.stdout}${st.stderr}` : ''}`);
  const vol = JSON.parse(st.stdout).volumes.find((v: { volume: string }) => v.volume === 'disk');
  t.ok(vol && typeof vol.promoted === 'string', `the volume is shown promoted (${vol?.promoted})`);
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
  t.ok(await until(() => /every differing chunk is queued/.test(b2.stderr()) && sameFiles(replicaB, replicaA)), 'A converges to B byte for byte');
  const m = /"sentBytes":(\d+)/.exec(b2.stderr());
  t.ok(m && Number(m[1]) <= 3 * 2 ** 20, `only the differing chunks were sent (${m?.[1]} of ${SIZE} bytes)`);
  const v = await run(process.execPath, [CLI, 'verify', '--image', `disk=${replicaB}`, '--replica', replayA.url]);
  t.match(v.stdout, /identical/, 'blockferry verify agrees');
  t.equal(await b2.stop(), 0, 'B stops cleanly');
});
