// A volume's size between runs of serve, with real processes:
// - grown (the image extended, then served again): the replica grows to match, the new region is compared by
//   digests (it may hold data: here bytes written into it behind serve's back), and the replica converges byte
//   for byte; also when the replica was away on a saved dirty bitmap at the time;
// - shrunk (the image truncated): serve refuses to start, naming the sizes, and changes nothing; the replica
//   keeps what it had.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { converges } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { adminOf, freePort, getStatus, runRefused, startReplay, startServe } from './helpers/processes.js';

const MiB = 2 ** 20;

/** `mib` distinct 1 MiB blocks from `fromMiB` on, eight in flight, then a flush. */
async function writeBlocks(port: number, fromMiB: number, mib: number): Promise<void> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  const inflight = new Set<Promise<void>>();
  for (let i = fromMiB; i < fromMiB + mib; i++) {
    const p: Promise<void> = c.write(i * MiB, randomBytes(MiB)).then(() => void inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 8) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  await c.flush();
  await c.close();
}

/** Grows `image` to `size` and writes 1 MiB of random bytes at `at` (a region serve never wrote). */
function growWithData(image: string, size: number, at: number): void {
  const fd = fs.openSync(image, 'r+');
  fs.ftruncateSync(fd, size);
  fs.writeSync(fd, randomBytes(MiB), 0, MiB, at);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

for (const away of [false, true]) {
  const when = away ? 'while the replica is away on a saved dirty bitmap' : 'with the replica in step';
  t.test(`a grown volume ${when}: the replica grows, the new region is compared, and it converges byte for byte`, async (t) => {
    const dir = t.testdir();
    const image = path.join(dir, 'disk.img');
    const replicaDir = path.join(dir, 'replica');
    const replica = path.join(replicaDir, 'disk.img');
    const port = await freePort();
    const replayArgs = ['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir];
    // A 32 MiB journal, so that 48 MiB written while the replica is away puts it on the dirty bitmap.
    const serveArgs = ['--image', `disk=${image}`, '--listen', '127.0.0.1:0', '--replicate-to', `ws://127.0.0.1:${port}`, '--journal-max', '32M', '--admin', '127.0.0.1:0'];
    let replay = await startReplay(replayArgs, t.teardown);
    let s = await startServe([...serveArgs, '--size', '64M'], t.teardown);
    await writeBlocks(s.port, 0, 16);
    t.ok(await converges(image, replica), 'the replica is in step at 64 MiB');
    if (away) {
      replay.child.kill('SIGKILL');
      await replay.exited;
      await writeBlocks(s.port, 8, 48);
      t.match(s.stderr(), /tracking its dirty regions in a bitmap/, 'the absent replica went onto the dirty bitmap');
    }
    t.equal(await s.stop(), 0, 'serve stops cleanly');

    // Grown to 96 MiB, with data in the new region that serve never saw.
    growWithData(image, 96 * MiB, 80 * MiB);
    s = await startServe(serveArgs, t.teardown);
    t.match(s.stderr(), /the volume grew/, 'serve says the volume grew');
    if (away) t.match(s.stderr(), /loaded the dirty bitmap/, 'and kept the saved bitmap of the absent replica');
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
    t.equal(c.size, 96 * MiB, 'the export is 96 MiB');
    await c.close();
    if (away) replay = await startReplay(replayArgs, t.teardown);
    // Writes on both sides of the old end while the replica catches up.
    await writeBlocks(s.port, 60, 8);
    t.ok(await converges(image, replica, 60_000), 'the replica converges byte for byte, the new region too');
    t.equal(fs.statSync(replica).size, 96 * MiB, 'the replica grew to 96 MiB');
    const log = s.stderr();
    const scope = away ? /resync: comparing chunk digests with the replica \(dirty regions and the grown region only\)/ : /resync: comparing chunk digests with the replica \(the grown region only\)/;
    t.match(log, scope, `the replica was compared over the grown region${away ? ' and its dirty regions' : ''}, not all of it`);
    const st = await getStatus(adminOf(s.stdout()));
    t.equal(st.volumes[0].replicas[0].state, 'continuous', 'the replica is continuous');
    t.equal(await s.stop(), 0, 'serve stops cleanly');

    // The grown region was compared once: a restart does not compare it again.
    s = await startServe(serveArgs, t.teardown);
    t.notMatch(s.stderr(), /the volume grew/, 'a restart at the same size is no growth');
    await writeBlocks(s.port, 90, 2);
    t.ok(await converges(image, replica, 30_000), 'and the replica still follows');
    t.notMatch(s.stderr(), /grown region/, 'with no comparison of the grown region again');
    t.equal(await s.stop(), 0, 'serve stops cleanly');
  });
}

t.test('grown while its replica was left out of a run: the replica, grown at its next hello, is compared in full and converges', async (t) => {
  // Found by a review helper: serve run once without --replicate-to (after an upgrade from a version that did not
  // record the size, the same) forgets the replica and its grown marker; the replayer then grew the replica and
  // kept it consistent with zeroes where the primary had data.
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const base = ['--image', `disk=${image}`, '--listen', '127.0.0.1:0'];
  let s = await startServe([...base, '--size', '32M', '--replicate-to', replay.url], t.teardown);
  await writeBlocks(s.port, 0, 8);
  t.ok(await converges(image, replica), 'the replica is in step at 32 MiB');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  growWithData(image, 48 * MiB, 40 * MiB);
  s = await startServe(base, t.teardown);
  t.match(s.stderr(), /the volume grew/, 'serve without the replica says the volume grew');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  s = await startServe([...base, '--replicate-to', replay.url], t.teardown);
  t.ok(await converges(image, replica), 'with the replica named again, it converges byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a new replica of a volume that grew before it was ever written is compared, not taken for zeroes', async (t) => {
  // A new journal for a new image covers it from zeroes (a new replica needs only the journal), but not once the
  // image grew: the region past the old end is not in the journal (found by a review helper).
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const base = ['--image', `disk=${image}`, '--listen', '127.0.0.1:0'];
  let s = await startServe([...base, '--size', '16M'], t.teardown);
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  growWithData(image, 24 * MiB, 20 * MiB);
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  s = await startServe([...base, '--replicate-to', replay.url], t.teardown);
  t.ok(await converges(image, path.join(replicaDir, 'disk.img')), 'the new replica converges byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('a shrunk image is refused: serve names the sizes and changes nothing', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const serveArgs = ['--image', `disk=${image}`, '--listen', '127.0.0.1:0', '--replicate-to', replay.url];
  const s = await startServe([...serveArgs, '--size', '32M'], t.teardown);
  await writeBlocks(s.port, 0, 32);
  const replica = path.join(replicaDir, 'disk.img');
  t.ok(await converges(image, replica), 'the replica is in step');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  const before = fs.readFileSync(replica);

  // Truncated by mistake: the last 8 MiB are gone from the image.
  fs.truncateSync(image, 24 * MiB);
  const kept = fs.readFileSync(image);
  const r = await runRefused(['serve', ...serveArgs]);
  t.equal(r.code, 1, 'serve exits 1');
  t.match(r.stderr, /is 25165824 bytes, but was 33554432.*\(ERR_IMAGE_SHRUNK\)/, `and says why (${r.stderr.trim().slice(0, 300)})`);
  t.ok(fs.readFileSync(image).equals(kept), 'the image is unchanged');
  t.equal(fs.statSync(image).size, 24 * MiB, 'and not grown back');
  t.ok(fs.readFileSync(replica).equals(before), 'the replica is unchanged');
});
