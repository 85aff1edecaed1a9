// Initial sync and resync by chunk digests, and `blockferry verify`, with real processes:
// - an image that already holds data gets a new replica: only differing chunks are shipped, writes continue
//   meanwhile, and the replica ends byte-identical;
// - a replica that lost everything while the journal was pruned past it is resynced from the digests;
// - verify says identical, then finds a byte flipped in the replica and names its range (exit 3).
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { open as openLmdb } from 'lmdb';
import { converges } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, freePort, runStatus, startReplay, startServe } from './helpers/processes.js';

const SIZE = 48 * 2 ** 20;
const CHUNK = 256 * 2 ** 10;

/** `blockferry verify`, resolving to its exit code and output (it exits non-zero on purpose). */
const verify = (args: string[]) => runStatus(process.execPath, [CLI, 'verify', ...args]);

/** Random writes from two connections while something else (the resync) runs. */
async function writes(port: number, n: number): Promise<void> {
  const a = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  const b = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  for (let i = 0; i < n; i++) {
    const ops = [];
    for (let k = 0; k < 16; k++) {
      const off = Math.floor(Math.random() * (SIZE - 70_000));
      ops.push((k % 2 ? a : b).write(off, randomBytes(512 + Math.floor(Math.random() * 65_536))));
    }
    await Promise.all(ops);
  }
  await a.flush();
  await a.close();
  await b.close();
}

/** 64 KiB writes into the first 8 MiB only: `rounds` x 512 KiB, then a flush. */
async function hotWrites(port: number, rounds: number): Promise<void> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  for (let i = 0; i < rounds; i++) {
    const ops = [];
    for (let k = 0; k < 8; k++) ops.push(c.write(Math.floor(Math.random() * (8 * 2 ** 20 - 65_536)), randomBytes(65_536)));
    await Promise.all(ops);
  }
  await c.flush();
  await c.close();
}

t.test('a new replica of an image with data: digest sync while writes continue, then verify', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  // Existing contents: random data in every other 1 MiB, holes between (both paths of the digest code).
  const fd = fs.openSync(image, 'w');
  fs.ftruncateSync(fd, SIZE);
  for (let off = 0; off < SIZE; off += 2 * 2 ** 20) fs.writeSync(fd, randomBytes(2 ** 20), 0, 2 ** 20, off);
  fs.closeSync(fd);
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const s = await startServe(['--image', `disk=${image}`, '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);

  await writes(s.port, 20);
  const replica = path.join(replicaDir, 'disk.img');
  t.ok(await converges(image, replica, 90_000), 'the replica equals the primary: existing data synced, new writes applied in order');
  t.match(s.stderr(), /resync: comparing chunk digests/, 'serve ran a digest comparison for the new replica');

  const ok = await verify(['--image', `disk=${image}`, '--replica', replay.url]);
  t.equal(ok.code, 0, `verify exits 0 when identical\n${ok.stderr}`);
  t.match(ok.stdout, /identical/, 'and says so');

  // A flipped byte in the replica (bit rot at the backup site): verify finds that chunk and only that one.
  const at = 17 * CHUNK + 1234;
  const rfd = fs.openSync(replica, 'r+');
  const b = Buffer.alloc(1);
  fs.readSync(rfd, b, 0, 1, at);
  b[0] ^= 0xff;
  fs.writeSync(rfd, b, 0, 1, at);
  fs.closeSync(rfd);
  const bad = await verify(['--image', `disk=${image}`, '--replica', replay.url, '--retries', '1', '--json']);
  t.equal(bad.code, 3, `verify exits 3 when the replica differs\n${bad.stderr}`);
  const report = JSON.parse(bad.stdout);
  t.same(report.differing, [{ offset: 17 * CHUNK, length: CHUNK }], 'the differing range is the chunk holding the flipped byte');

  const unknown = await verify(['--image', `nosuch=${image}`, '--replica', replay.url]);
  t.equal(unknown.code, 1, 'verify of a volume the replayer does not have fails (exit 1)');
  t.match(unknown.stderr, /no replica of volume nosuch/, 'with a message naming it');
  const missing = await verify(['--image', `disk=${path.join(dir, 'no-such.img')}`, '--replica', replay.url]);
  t.equal(missing.code, 1, 'verify of an image that does not exist fails (exit 1)');
  t.match(missing.stderr, /no-such\.img does not exist/, 'saying so');
  t.notMatch(missing.stderr, /--size/, 'without advice verify has no option for');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a replica that lost everything after the journal was pruned past it is resynced by digests', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  const serveArgs = (url: string) => ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', url];

  let replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  let s = await startServe(serveArgs(replay.url), t.teardown);
  await writes(s.port, 20);
  t.ok(await converges(image, replica, 90_000), 'first replica converges (journal from an empty image: no digest pass needed)');
  t.equal(await s.stop(), 0, 'serve stops cleanly (the replica acknowledged everything, so the journal is pruned)');
  replay.child.kill('SIGKILL');
  await replay.exited;

  // The backup site loses its disk; a new replayer starts empty, on another port.
  fs.rmSync(replicaDir, { recursive: true, force: true });
  replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  s = await startServe(serveArgs(replay.url), t.teardown);
  await writes(s.port, 10);
  t.ok(await converges(image, replica, 90_000), 'the new, empty replica converges: everything before the journal tail came by digests');
  t.match(s.stderr(), /resync: comparing chunk digests/, 'serve resynced it by digests (the journal no longer started at seq 1)');
  const ok = await verify(['--image', `disk=${image}`, '--replica', replay.url]);
  t.equal(ok.code, 0, `verify agrees\n${ok.stdout}${ok.stderr}`);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

/** serve replicating a volume of `size` bytes with a journal cap of `journalMax` to a replayer on a fixed port. */
async function replicated(t: Test, size: number, journalMax: string) {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  // A fixed port, so the replayer can come back where serve keeps calling.
  const port = await freePort();
  const replayArgs = ['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir];
  const replay = await startReplay(replayArgs, t.teardown);
  const serveArgs = ['--image', `disk=${image}`, '--size', String(size), '--listen', '127.0.0.1:0', '--journal-max', journalMax, '--replicate-to', replay.url];
  const s = await startServe(serveArgs, t.teardown);
  return { image, replica, replayArgs, serveArgs, replay, s };
}

/**
 * A replicated volume with a 4 MiB journal cap whose replayer is then SIGKILLed, followed by ~24 MiB of writes
 * into the first 8 MiB only (six times the cap: without the bitmap they would wait for the replica forever).
 */
async function outage(t: Test) {
  const { image, replica, replayArgs, serveArgs, replay, s } = await replicated(t, SIZE, '4M');
  await writes(s.port, 4);
  t.ok(await converges(image, replica, 90_000), 'replica in step before the outage');
  replay.child.kill('SIGKILL');
  await replay.exited;
  await hotWrites(s.port, 48);
  t.match(s.stderr(), /tracking its dirty regions in a bitmap/, 'serve switched the absent replica to a dirty bitmap');
  return { image, replica, replayArgs, serveArgs, s };
}

/** The replica came back: it must converge, compared over the dirty regions only. */
async function returnsDirtyOnly(t: Test, image: string, replica: string, serve: { stderr(): string }): Promise<void> {
  t.ok(await converges(image, replica, 90_000), 'the returning replica converges byte for byte');
  // Read after converging: serve logs the resync's scope when it starts comparing.
  const m = /"bytes":(\d+),"dirtyOnly":true/.exec(serve.stderr());
  t.ok(m, 'the resync compared only the dirty regions');
  t.ok(m && Number(m[1]) <= 9 * 2 ** 20, `only about the 8 MiB that was written is dirty (${m?.[1]} bytes)`);
}

t.test('long outage: the journal fills while the replica is away; a dirty bitmap takes over and writes go on', async (t) => {
  const { image, replica, replayArgs, s } = await outage(t);
  await startReplay(replayArgs, t.teardown);
  await returnsDirtyOnly(t, image, replica, s);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('long outage across a primary crash: the saved dirty bitmap still limits the resync to the dirty regions', async (t) => {
  const o = await outage(t);
  const { image, replica, replayArgs, serveArgs } = o;
  let s = o.s;
  // More writes after the last save of the bitmap (they are only in the journal), then a crash.
  await hotWrites(s.port, 3);
  s.child.kill('SIGKILL');
  await s.exited;

  s = await startServe(serveArgs, t.teardown);
  t.match(s.stderr(), /loaded the dirty bitmap/, 'the restarted primary loaded the saved bitmap');
  await hotWrites(s.port, 24);
  await startReplay(replayArgs, t.teardown);
  await returnsDirtyOnly(t, image, replica, s);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a long outage whose bitmap walk takes several steps while writes wait: every change reaches the returning replica', async (t) => {
  // The journal's cap (640 MiB) is ten steps of the walk that builds the bitmap (64 MiB), with eight 1 MiB
  // writes in flight when it fills: the journal lets go of what the walk has covered as it goes, and the writes
  // go on meanwhile. Whatever was let go must be in the bitmap, or the returning replica, compared over the
  // bitmap's regions only, would keep stale data while reporting itself caught up (test/replicator-bitmap
  // checks that at every turn of the walk; this is the same through real processes).
  const { image, replica, replayArgs, replay, s } = await replicated(t, 1024 * 2 ** 20, '640M');
  await hotWrites(s.port, 2);
  t.ok(await converges(image, replica, 90_000), 'replica in step before the outage');
  replay.child.kill('SIGKILL');
  await replay.exited;
  // 800 MiB of distinct 1 MiB blocks, each written once: a change missed by the bitmap is never marked again.
  // A FLUSH at 600 MiB puts the image's checkpoint there, so the replica's hold is all that keeps those entries.
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const writeBlocks = async (from: number, to: number) => {
    const inflight = new Set<Promise<void>>();
    for (let mib = from; mib < to; mib++) {
      const p: Promise<void> = c.write(mib * 2 ** 20, randomBytes(2 ** 20)).then(() => void inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= 8) await Promise.race(inflight);
    }
    await Promise.all(inflight);
    await c.flush();
  };
  await writeBlocks(16, 616);
  await writeBlocks(616, 816);
  await c.close();
  t.match(s.stderr(), /tracking its dirty regions in a bitmap/, 'serve switched the absent replica to a dirty bitmap');
  await startReplay(replayArgs, t.teardown);
  t.ok(await converges(image, replica, 120_000), 'the returning replica converges byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a replica image that held data before (demoted, also by an earlier version, or put in place by hand) is compared, never taken for zeroes', async (t) => {
  // The primary is new (its journal holds every change since all zeroes): a new, empty replica needs only the
  // journal. A replica image with data of its own is no such replica, though its state says seq 0 too.
  const dir = t.testdir();
  const size = 4 * 2 ** 20;
  const replicaDir = path.join(dir, 'replica');
  fs.mkdirSync(replicaDir);
  // The old primary's image, written at 2-3 MiB, demoted into the data directory; and one put there by hand.
  const old = path.join(dir, 'old.img');
  fs.writeFileSync(old, Buffer.alloc(size));
  const ofd = fs.openSync(old, 'r+');
  fs.writeSync(ofd, Buffer.alloc(2 ** 20, 0x77), 0, 2 ** 20, 2 * 2 ** 20);
  fs.closeSync(ofd);
  const demoted = await runStatus(process.execPath, [CLI, 'demote', '--image', `disk=${old}`, '--data-dir', replicaDir]);
  t.equal(demoted.code, 0, `demote${demoted.code ? `: ${demoted.stderr}` : ''}`);
  fs.writeFileSync(path.join(replicaDir, 'byhand.img'), randomBytes(size));
  // And one demoted by a version from before the replayer state said `seeded`: the state demote wrote then.
  fs.writeFileSync(path.join(replicaDir, 'olddemote.img'), randomBytes(size));
  const oldState = openLmdb({ path: path.join(replicaDir, 'olddemote.state.mdb') });
  await oldState.put('state', { appliedSeq: 0, volumeId: null, size, consistentFrom: -1, promoted: null });
  await oldState.close();

  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const names = ['disk', 'byhand', 'olddemote'];
  const images = names.map((name) => path.join(dir, `${name}.img`));
  const s = await startServe(
    [...names.flatMap((name, i) => ['--image', `${name}=${images[i]}`]), '--size', String(size), '--listen', '127.0.0.1:0', '--replicate-to', replay.url],
    t.teardown,
  );
  for (const name of names) {
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: name });
    await c.write(0, Buffer.alloc(2 ** 20, 0x11));
    await c.flush();
    await c.close();
  }
  for (const [i, name] of names.entries()) {
    t.ok(await converges(images[i], path.join(replicaDir, `${name}.img`), 60_000), `${name}: the replica equals the primary (its own data overwritten)`);
    const v = await verify(['--image', `${name}=${images[i]}`, '--replica', replay.url, '--retries', '2']);
    t.equal(v.code, 0, `${name}: verify says identical\n${v.stdout}${v.stderr}`);
  }
  t.equal(s.stderr().match(/resync: comparing chunk digests/g)?.length, 3, 'serve compared digests with all three');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});
