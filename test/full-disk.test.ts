// Full disks, on small tmpfs mounts the test makes (and unmounts, even on failure):
// - the primary's journal filesystem fills: writes get ENOSPC, reads and other clients keep working, nothing
//   half-journaled; when space is freed, writes are taken again with no restart, and the image still equals
//   zeroes + journal;
// - the journal alone (no free-space guard in front) fills its filesystem: the failing commit is an error
//   naming ENOSPC, never a SIGBUS from LMDB's write map storing into a hole; what was committed reads back;
// - through serve, in both of the journal's modes, a commit meeting the full disk reaches the NBD client as
//   ENOSPC (not EIO) and the log names the full disk;
// - LMDB meets a full disk at open (serve's new journal, a replayer's new volume): an error naming ENOSPC, not
//   SIGBUS; a replica's state file on a filesystem the kernel made read-only: that volume stops, the replayer lives;
// - the replica's filesystem fills: the replayer stops applying and says why, the replica stays what it was,
//   and once space returns it converges to the primary byte for byte.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { sameFiles, until } from './helpers/files.js';
import { NbdError, NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, adminOf, freePort, getStatus, run, runRefused, runStatus, startReplay, startServe } from './helpers/processes.js';
import { Journal } from '../src/journal/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { loadNative } from '../src/device/native.js';
import { SpaceGuard } from '../src/mirror/space-guard.js';

const ENOSPC = 28;
const MiB = 2 ** 20;

/** A tmpfs of `size` on a new mount point outside the test dir (tap removes that while mounts would pin it). */
async function tmpfs(t: { teardown(fn: () => unknown): void }, size: string): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockferry-fulldisk-'));
  await run('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]);
  t.teardown(async () => {
    // Lazy: a process being stopped may still hold a file there for a moment.
    await run('umount', ['-l', dir]).catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** Fills `dir` with a file until `leaveBytes` are left free. */
function fill(dir: string, leaveBytes: number): string {
  const s = fs.statfsSync(dir);
  const n = Math.max(0, s.bavail * s.bsize - leaveBytes);
  const file = path.join(dir, 'filler');
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(MiB, 1);
  for (let done = 0; done < n; done += MiB) fs.writeSync(fd, chunk, 0, Math.min(MiB, n - done));
  fs.closeSync(fd);
  return file;
}

/**
 * ext4 on a loop device (32 MiB, in `dir`), mounted with errors=remount-ro: `fail()` triggers a filesystem
 * error, after which the kernel makes it read-only, as it does on a real I/O error. Unmounted in teardown.
 */
async function failingExt4(t: { teardown(fn: () => unknown): void }, dir: string): Promise<{ mnt: string; fail: () => void }> {
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'blockferry-ext4-'));
  const backing = path.join(dir, 'ext4.img');
  fs.closeSync(fs.openSync(backing, 'w'));
  fs.truncateSync(backing, 32 * MiB);
  await run('mkfs.ext4', ['-q', '-F', backing]);
  await run('mount', ['-o', 'loop,errors=remount-ro', backing, mnt]);
  t.teardown(async () => {
    await run('umount', ['-l', mnt]).catch(() => undefined);
    fs.rmSync(mnt, { recursive: true, force: true });
  });
  const loop = path.basename((await run('findmnt', ['-n', '-o', 'SOURCE', mnt])).stdout.trim());
  return { mnt, fail: () => fs.writeFileSync(`/sys/fs/ext4/${loop}/trigger_fs_error`, '1') };
}

/** Writes 1 MiB blocks from offset 0 on, at most `max`, until one is refused; returns the refusal (if any). */
async function writeUntilRefused(c: NbdTestClient, max: number): Promise<unknown> {
  for (let i = 0; i < max; i++) {
    try {
      await c.write(i * MiB, randomBytes(MiB));
    } catch (err) {
      return err;
    }
  }
  return undefined;
}

t.test("the primary's journal disk fills: ENOSPC, nothing lost, writes resume when space returns", async (t) => {
  const dir = t.testdir();
  const jfs = await tmpfs(t, '64m');
  const filler = fill(jfs, 24 * MiB);
  const image = path.join(dir, 'disk.img');
  const journal = path.join(jfs, 'journal');
  const s = await startServe(['--image', `disk=${image}`, '--size', '64M', '--listen', '127.0.0.1:0', '--journal', journal, '--keep-journal', '--min-free', '8M', '--admin', '127.0.0.1:0'], t.teardown);
  const admin = /admin on (http:\/\/\S+)/.exec(s.stdout())![1];
  const status = async () => {
    const r = await runStatus(process.execPath, [CLI, 'status', '--admin', admin, '--json']);
    return { code: r.code, body: JSON.parse(r.stdout) };
  };
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });

  let accepted = 0;
  let refusal: unknown;
  for (let i = 0; i < 64 && !refusal; i++) {
    try {
      await c.write((i % 60) * MiB, randomBytes(MiB));
      accepted++;
    } catch (err) {
      refusal = err;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  t.ok(accepted > 0, `${accepted} MiB were written before the disk was nearly full`);
  t.ok(refusal instanceof NbdError && refusal.errno === ENOSPC, `then a write got ENOSPC (${String(refusal)})`);
  t.ok((await c.read(0, 4096)).length === 4096, 'reads still work');
  // The operator sees it: in the log, in status (exit 2), in what needs attention.
  t.match(s.stderr(), /writes refused with ENOSPC: no space: .* less than the 8\.00 MiB kept in reserve/, 'the log says writes are refused, and why');
  const refusing = await status();
  t.equal(refusing.code, 2, 'blockferry status exits 2 (needs attention)');
  t.ok(refusing.body.volumes[0].writesRefused?.refused >= 1, `status counts the refused writes (${JSON.stringify(refusing.body.volumes[0].writesRefused)})`);
  t.match(refusing.body.attention.join('\n'), /write\(s\) refused with ENOSPC since/, 'and names them among what needs attention');
  const other = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  t.equal((await other.read(MiB, 512)).length, 512, 'a second client is still served');
  await other.close();

  fs.rmSync(filler);
  await new Promise((r) => setTimeout(r, 600));
  // Before any write asks again: the space is back, and status and the log say so.
  t.equal((await status()).body.volumes[0].writesRefused, null, 'once space is freed, status no longer shows writes refused');
  t.match(s.stderr(), /writes are taken again/, 'and the log says so');
  await c.write(0, randomBytes(MiB));
  t.pass('writes are taken again (no restart)');
  await c.flush();
  await c.close();
  t.equal(await s.stop(), 0, 'serve stops cleanly');

  const rebuilt = path.join(dir, 'rebuilt.img');
  await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', '64M', '--out', rebuilt]);
  t.ok(fs.readFileSync(rebuilt).equals(fs.readFileSync(image)), 'the image equals zeroes + journal: no write is in one and not the other');
});

t.test("the image's filesystem fills with no free-space guard: the volume fails, serve's stop says so, a restart recovers", async (t) => {
  const dir = t.testdir();
  const ifs = await tmpfs(t, '16m');
  const image = path.join(ifs, 'disk.img');
  const journal = path.join(dir, 'journal');
  const args = ['--image', `disk=${image}`, '--size', '64M', '--listen', '127.0.0.1:0', '--journal', journal, '--keep-journal', '--min-free', '0'];
  const s = await startServe([...args, '--admin', '127.0.0.1:0'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const failure = await writeUntilRefused(c, 32);
  t.ok(failure instanceof NbdError, `a write failed once the image's 16 MiB filesystem was full (${String(failure)})`);
  // Said when it happens, and shown until the restart (before, the log was silent and status said "all well").
  const said = await until(() => /volume stopped taking writes at journal seq \d+ \(the image write failed\)/.test(s.stderr()), 5_000, 50);
  t.ok(said, 'the log says the volume stopped taking writes', { log: s.stderr().slice(-1500) });
  const status = await runStatus(process.execPath, [CLI, 'status', '--admin', adminOf(s.stdout()), '--json']);
  t.equal(status.code, 2, '`blockferry status` exits 2: needs attention');
  const body = JSON.parse(status.stdout);
  t.match(body.volumes[0].failure, /the local image failed to apply journal seq \d+/, 'its status names the failure');
  t.match(body.attention.join('\n'), /volume disk: every write fails until serve is restarted/, 'and lists it under attention');
  await c.close().catch(() => undefined);
  t.equal(await s.stop(), 1, 'serve stops, but with exit status 1, not as a clean stop');
  t.match(s.stderr(), /stopped, but a volume had failed: disk: the local image failed to apply journal seq \d+/, 'naming the volume and the entry');
  t.notMatch(s.stderr(), /stopped cleanly/);

  // Room again: the restart re-applies what the image missed, and the image equals zeroes + journal.
  await run('mount', ['-o', 'remount,size=128m', ifs]);
  const again = await startServe(args, t.teardown);
  t.equal(await again.stop(), 0, 'the restart recovers and then stops cleanly');
  const rebuilt = path.join(dir, 'rebuilt.img');
  await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', '64M', '--out', rebuilt]);
  t.ok(fs.readFileSync(rebuilt).equals(fs.readFileSync(image)), 'the image equals zeroes + journal');
});

t.test("the journal's spare data files are given back before a write is refused for space", async (t) => {
  const dir = t.testdir();
  const jfs = await tmpfs(t, '96m');
  const journal = path.join(jfs, 'journal');
  // A 64 MiB cap: 1 MiB segments, and up to 16 MiB of dropped segments' files kept for reuse.
  const s = await startServe(['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', '64M', '--listen', '127.0.0.1:0', '--journal', journal, '--journal-max', '64M', '--min-free', '8M'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  t.teardown(() => c.close().catch(() => undefined));
  const spares = (): string[] => fs.readdirSync(journal).filter((f) => /^spare-\d+\.data$/.test(f));
  for (let i = 0; i < 40; i++) await c.write(i * MiB, randomBytes(MiB));
  await c.flush(); // checkpoints the image: the journal drops what it held
  t.ok(await until(() => spares().length >= 8, 10_000), `pruned segments' files wait as spares (${spares().length})`);
  // Pruning may still be dropping segments (past the spare budget, deleting files): wait until it is done, or
  // the space it frees after the fill below would lift the disk over the reserve without the spares' help.
  let last = -1;
  t.ok(await until(() => {
    const now = fs.readdirSync(journal).length;
    const settled = now === last;
    last = now;
    return settled;
  }, 10_000, 300), 'pruning is done');
  fill(jfs, 4 * MiB);
  await new Promise((r) => setTimeout(r, 600)); // the free-space poll sees the full disk
  await c.write(0, randomBytes(MiB));
  t.pass('with 4 MiB free and 8 MiB kept in reserve, a write is still taken: the spares made room');
  t.same(spares(), [], 'their files are gone');
  await c.flush();
});

for (const mode of ['writev', 'write map', 'sync'] as const) {
  const writeMap = mode === 'write map';
  const durability = mode === 'sync' ? 'sync' : 'commit';
  const how = { writev: 'with writev (the default)', 'write map': "through LMDB's write map", sync: 'with sync durability (each commit synced)' }[mode];
  const skip = writeMap && !loadNative()?.allocate ? 'the native helper cannot allocate' : false;
  t.test(`a journal written ${how} that fills its filesystem fails the commit with ENOSPC; the process lives and keeps what it committed`, { skip }, async (t) => {
    const jfs = await tmpfs(t, '24m');
    const j = await Journal.open({ dir: path.join(jfs, 'journal'), writeMap, durability });
    let closed = false;
    t.teardown(() => (closed ? undefined : j.close().catch(() => undefined)));
    t.equal(j.writeMap, writeMap, `the journal is written ${how}`);
    j.registerConsumer('away'); // holds every entry: nothing is pruned, the file can only grow
    const block = randomBytes(MiB);
    let committed = 0;
    let failure: NodeJS.ErrnoException | undefined;
    for (let i = 0; i < 48 && !failure; i++) {
      try {
        await j.append(EntryKind.WRITE, i * MiB, MiB, block).done;
        committed++;
      } catch (err) {
        failure = err as NodeJS.ErrnoException;
      }
    }
    t.ok(committed > 4 && committed < 24, `${committed} entries of 1 MiB committed before the 24 MiB filesystem was full`);
    t.match(failure?.message, /ENOSPC/, `then the commit failed with ENOSPC named (${failure?.message})`);
    t.throws(() => j.append(EntryKind.WRITE, 0, MiB, block), /refuses further writes/, 'later appends are refused, not reordered past the gap');
    const back = [];
    while (back.length < committed) back.push(...j.read(back.length + 1));
    t.equal(back.length, committed, 'every committed entry reads back, verified');
    t.ok(back.every((e) => e.data!.equals(block)), 'with its data intact');
    await j.close();
    closed = true;
    const again = await Journal.open({ dir: path.join(jfs, 'journal'), durability });
    t.equal(again.stats.committedSeq, committed, 'reopened, the journal holds exactly what was committed');
    t.equal(again.read(committed)[0]?.seq, committed, 'and reads its last entry back');
    await again.close();
  });
}

for (const writeMap of [false, true]) {
  const how = writeMap ? 'serve --journal-write-map' : 'serve (writev)';
  const skip = writeMap && !loadNative()?.allocate ? 'the native helper cannot allocate' : false;
  t.test(`${how}: a commit that fills the journal's disk reaches the client as ENOSPC; reads go on`, { skip }, async (t) => {
    const dir = t.testdir();
    const jfs = await tmpfs(t, '24m');
    const image = path.join(dir, 'disk.img');
    // No free-space guard (--min-free 0): the commit itself meets the full disk.
    const args = ['--image', `disk=${image}`, '--size', '64M', '--listen', '127.0.0.1:0', '--journal', path.join(jfs, 'journal'), '--min-free', '0'];
    const s = await startServe(writeMap ? [...args, '--journal-write-map'] : args, t.teardown);
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
    const refusal = await writeUntilRefused(c, 48);
    t.ok(refusal instanceof NbdError && refusal.errno === ENOSPC, `a write got ENOSPC, not EIO (${String(refusal)})`);
    t.equal((await c.read(0, 4096)).length, 4096, 'reads still work');
    const log = s.stdout() + s.stderr();
    // With commit durability the write data goes to the segment's data file: its append meets the full disk,
    // or with the write map possibly the fallocate ahead of LMDB's pages; the log says the same either way.
    t.match(log, /the journal's filesystem is full, \d+ bytes free \(ENOSPC\)/, 'the log names the full disk and its free bytes');
    const said = await until(() => /volume stopped taking writes at journal seq \d+ \(its journal commit failed\)/.test(s.stdout() + s.stderr()), 5_000, 50);
    t.ok(said, 'and that the volume stopped taking writes, for its journal', { log: s.stderr().slice(-1500) });
    await c.close();
  });
}

t.test('a journal opened on a nearly full filesystem opens without the write map and refuses appends with an error', { skip: loadNative()?.allocate ? false : 'the native helper cannot allocate' }, async (t) => {
  const jfs = await tmpfs(t, '8m');
  const dir = path.join(jfs, 'journal');
  fs.mkdirSync(dir);
  fill(jfs, 256 * 1024); // room for LMDB to create its databases, not for one write transaction's reservation
  const j = await Journal.open({ dir, writeMap: true });
  t.teardown(() => j.close().catch(() => undefined));
  t.equal(j.writeMap, false, 'asked for the write map but no room to allocate ahead: LMDB writes its pages with writev instead');
  await t.rejects(j.append(EntryKind.WRITE, 0, MiB, randomBytes(MiB)).done, /could not commit/, 'an append that cannot be stored fails, named');
});

t.test("the replica's disk fills: the replayer stops applying, then converges when space returns", async (t) => {
  const dir = t.testdir();
  const rfs = await tmpfs(t, '48m');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', rfs], t.teardown);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '32M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  // Let the replica (a sparse 32 MiB file) be created, then leave it 4 MiB to grow into.
  const replica = path.join(rfs, 'disk.img');
  for (let i = 0; i < 100 && !fs.existsSync(replica); i++) await new Promise((r) => setTimeout(r, 50));
  const filler = fill(rfs, 4 * MiB);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  for (let i = 0; i < 12; i++) await c.write(i * 2 * MiB, randomBytes(MiB));
  await c.flush();
  await c.close();
  const saw = await until(() => /ERR_STORAGE/.test(s.stderr()), 10_000, 100);
  t.ok(saw, 'the replayer refused to go on (ERR_STORAGE reported to the primary)');
  t.notOk(sameFiles(image, replica), 'the replica is behind, not a mix passed off as current');

  fs.rmSync(filler);
  const same = await until(() => sameFiles(image, replica), 30_000, 100);
  t.ok(same, 'with space back, the replica converges byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

for (const durability of ['commit', 'sync'] as const) {
  t.test(`serve with a new journal on a full filesystem refuses to start, naming ENOSPC (${durability} durability)`, async (t) => {
    const dir = t.testdir();
    const jfs = await tmpfs(t, '8m');
    fill(jfs, 0);
    const image = path.join(dir, 'disk.img');
    const journal = path.join(jfs, 'journal');
    // LMDB maps its lock file: one it made on the full disk was a SIGBUS, and a data file it could not start a
    // SIGSEGV, both with no message.
    const r = await runRefused(['serve', '--image', `disk=${image}`, '--size', '16M', '--listen', '127.0.0.1:0', '--journal', journal, '--durability', durability]);
    t.equal(r.code, 1, `serve exits 1 (not killed by a signal: ${r.code})`);
    t.match(r.stderr, /filesystem has 0 bytes free \(ENOSPC\)/, `and says why (${r.stderr.trim()})`);
    t.notOk(fs.existsSync(journal), 'the journal directory it made is gone');
    t.notOk(fs.existsSync(image), 'and so is the image it made');
  });
}

t.test("a new volume at a replayer whose disk is full is refused, the replayer lives on, and the volume syncs once space returns", async (t) => {
  const dir = t.testdir();
  const rfs = await tmpfs(t, '48m');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', rfs], t.teardown);
  const filler = fill(rfs, 0);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '16M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  await c.write(MiB, randomBytes(MiB));
  await c.flush();
  const refused = await until(() => /replica refused: cannot open volume disk: .*ENOSPC/.test(s.stderr()), 10_000, 100);
  t.ok(refused, 'the primary is told the volume cannot be opened, ENOSPC named');
  await new Promise((r) => setTimeout(r, 500));
  t.equal(replay.child.exitCode, null, 'the replayer is still running (a lock file LMDB made on the full disk was a SIGBUS)');
  t.equal(replay.child.signalCode, null, 'and was not killed by a signal');
  fs.rmSync(filler);
  t.ok(await until(() => sameFiles(image, path.join(rfs, 'disk.img')), 30_000, 100), 'with space back, the new replica converges byte for byte');
  await c.close();
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test("a replica's state file on a filesystem that fails (read-only after an error): that volume stops with ERR_STORAGE, the replayer lives on", async (t) => {
  const dir = t.testdir();
  const { mnt, fail } = await failingExt4(t, dir);
  // The image elsewhere (a symlink in the data dir): only the state file's commits fail.
  const elsewhere = path.join(dir, 'replica.img');
  fs.closeSync(fs.openSync(elsewhere, 'w'));
  fs.truncateSync(elsewhere, 16 * MiB);
  fs.symlinkSync(elsewhere, path.join(mnt, 'disk.img'));
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', mnt], t.teardown);
  let replayLog = '';
  replay.child.stderr!.on('data', (d) => (replayLog += d));
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '16M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  t.teardown(() => c.destroy());
  await c.write(0, randomBytes(MiB));
  await c.flush();
  t.ok(await until(() => sameFiles(image, elsewhere), 20_000, 100), 'the replica converges');
  fail();
  for (let i = 0; i < 8; i++) await c.write(i * 4096, randomBytes(4096));
  await c.flush();
  t.ok(await until(() => /ERR_STORAGE/.test(s.stderr()), 15_000, 100), 'the primary is told the replica could not be synced (ERR_STORAGE)', { serve: s.stderr().slice(-1500) });
  await new Promise((r) => setTimeout(r, 1000));
  t.equal(replay.child.exitCode, null, "the replayer is still running (lmdb-js's unhandled rejection ended it)");
  await c.close();
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  replay.child.kill('SIGTERM');
  // Not 0: its data directory is read-only, so it cannot release its lock file, and says so.
  t.not(await replay.exited, null, 'the replayer stops when told, with an exit code', { replay: replayLog.slice(-1500) });
});

for (const durability of ['commit', 'sync'] as const) {
  t.test(`the journal's filesystem fails under writes (${durability} durability): writes get errors, other volumes go on, serve stops when told`, async (t) => {
    const dir = t.testdir();
    const { mnt, fail } = await failingExt4(t, dir);
    // Two volumes, their journals on the failing filesystem; a third journaled elsewhere.
    const args = ['--listen', '127.0.0.1:0', '--size', '16M', '--durability', durability, '--journal-max', '8M', '--min-free', '1M'];
    const s = await startServe(['--image', `a=${path.join(dir, 'a.img')}`, '--journal', path.join(mnt, 'a'), ...args], t.teardown);
    const other = await startServe(['--image', `b=${path.join(dir, 'b.img')}`, ...args], t.teardown);
    const a = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'a' });
    const b = await NbdTestClient.connect({ host: '127.0.0.1', port: other.port, exportName: 'b' });
    t.teardown(() => a.destroy());
    t.teardown(() => b.destroy());
    await a.write(0, randomBytes(64 * 1024));
    await a.flush();
    // Writes in flight (32 at a time) when the filesystem fails: every one must be answered.
    let answered = 0;
    let failed = 0;
    const inflight = new Set<Promise<void>>();
    const deadline = Date.now() + 4000;
    let failedAt = 0;
    for (let i = 0; Date.now() < deadline; i++) {
      if (i === 200) {
        fail();
        failedAt = Date.now();
      }
      const p = a.write((i % 256) * 4096, randomBytes(4096)).then(
        () => void answered++,
        () => void failed++,
      );
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
      if (inflight.size >= 32) await Promise.race([...inflight, new Promise((r) => setTimeout(r, 5000))]);
      if (failed > 0 && Date.now() - failedAt > 1000) break;
    }
    const settled = await Promise.race([Promise.all(inflight).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000))]);
    t.ok(settled, `every write in flight was answered (${answered} taken, ${failed} refused)`);
    t.ok(failed > 0, 'writes after the failure get errors');
    t.equal(s.child.exitCode, null, 'serve is still running');
    t.equal(s.child.signalCode, null, 'and was not killed by a signal');
    const within = <T>(p: Promise<T>, what: string) => Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in 10 s`)), 10_000))]);
    t.equal((await within(a.read(0, 4096), 'a read')).length, 4096, 'reads of the volume still work');
    await within(b.write(0, randomBytes(4096)), 'a write elsewhere');
    t.pass('another serve, journaled elsewhere, takes writes');
    await a.close().catch(() => undefined);
    s.child.kill('SIGTERM');
    const code = await Promise.race([s.exited, new Promise<string>((r) => setTimeout(() => r('still running after 15 s'), 15_000))]);
    t.equal(code, 1, 'told to stop, serve stops, saying a volume had failed (exit 1)', { log: s.stderr().slice(-3000) });
    await b.close();
    t.equal(await other.stop(), 0, 'the other serve stops cleanly');
  });
}

t.test('space freed since the last look is not refused: the free-space guard looks again before it refuses', async (t) => {
  // The guard estimates between looks (every 250 ms) by counting what it took: the estimate only falls. When the
  // journal dropped a segment's file meanwhile, writes were refused with ENOSPC while the disk had room.
  const jfs = await tmpfs(t, '32m');
  const filler = fill(jfs, 4 * MiB);
  const guard = new SpaceGuard([jfs], 8 * MiB);
  t.teardown(() => guard.close());
  t.match(guard.take(MiB)?.message, /no space: .* less than the 8\.00 MiB kept in reserve/, 'with 4 MiB free and 8 kept in reserve, a write is refused');
  fs.rmSync(filler);
  t.equal(guard.take(MiB), undefined, 'the space freed just after is taken at once, not after the next look');
  t.equal(guard.refusing, undefined, 'and the refusal has ended');
});

t.test("a journal filesystem with less room than a checkpoint's worth of writes, and no replica: every write is taken", async (t) => {
  // The image is checkpointed every 256 MiB of writes, and the journal keeps what came since: on a 96 MiB
  // filesystem that filled the disk and writes were refused with ENOSPC, with no replica at all (nbdcopy of 1 GiB
  // failed after 0.4 s onto a journal with 156 MiB free). Counting the disk's room as full checkpoints earlier.
  const dir = t.testdir();
  const jfs = await tmpfs(t, '96m');
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '256M', '--listen', '127.0.0.1:0', '--journal', path.join(jfs, 'journal'), '--min-free', '16M'], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  t.teardown(() => c.close());
  const blocks: Buffer[] = [];
  let refusal: unknown;
  for (let mib = 0; mib < 256 && !refusal; mib++) {
    const block = randomBytes(MiB);
    blocks.push(block.subarray(0, 64));
    await c.write(mib * MiB, block).catch((err) => (refusal = err));
  }
  t.equal(refusal, undefined, `256 MiB of writes were all taken (${String(refusal)})`);
  await c.flush();
  const fd = fs.openSync(image, 'r');
  const head = Buffer.alloc(64);
  let same = 0;
  for (let mib = 0; mib < blocks.length; mib++) {
    fs.readSync(fd, head, 0, 64, mib * MiB);
    if (head.equals(blocks[mib])) same++;
  }
  fs.closeSync(fd);
  t.equal(same, 256, 'and every block is in the image');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

for (const [writeMiB, inFlight, count] of [
  [16, 4, 24],
  [1, 16, 400],
] as const) {
  t.test(`a small journal disk (88 MiB free) with the replica away, ${count} writes of ${writeMiB} MiB, ${inFlight} in flight: none left waiting, all taken`, async (t) => {
    // Found by a review helper: with 16 MiB writes the last three waited for good (the replica's bitmap was saved
    // through the seq committed when the journal first filled, and nothing asked again); with 1 MiB writes the
    // guard refused every write for good, as a few entries the replica still held kept a whole segment's file.
    const dir = t.testdir();
    const jfs = await tmpfs(t, '256m');
    fill(jfs, 88 * MiB);
    const port = await freePort(); // nobody listens: the replica is away
    const s = await startServe(['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', '512M', '--listen', '127.0.0.1:0', '--journal', path.join(jfs, 'journal'), '--min-free', '16M', '--replicate-to', `ws://127.0.0.1:${port}`], t.teardown);
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
    t.teardown(() => c.close());
    const inflight = new Set<Promise<void>>();
    let taken = 0;
    let refused = 0;
    let refusal: unknown;
    for (let i = 0; i < count && !refusal; i++) {
      const write = c.write(((i * writeMiB) % 512) * MiB, randomBytes(writeMiB * MiB)).then(
        () => void taken++,
        (err) => {
          refused++;
          refusal ??= err;
        },
      );
      const p: Promise<void> = write.finally(() => inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= inFlight) await Promise.race(inflight);
    }
    const settled = await Promise.race([Promise.all(inflight).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 30_000))]);
    t.ok(settled, 'no write is left waiting');
    t.equal(taken + refused, count, `every write was answered (${taken} taken, ${refused} refused)`);
    // (With 16 MiB writes a look at the disk from an append forgot the entries admitted but not yet written,
    // and a few writes were refused in about a third of the runs.)
    t.equal(refusal, undefined, `no write was refused (${String(refusal)})`);
    t.equal(await s.stop(), 0, 'serve stops cleanly');
  });
}

for (const how of ['away', 'behind a slow link'] as const) {
  t.test(`the journal's filesystem is smaller than its cap while the replica is ${how}: the replica goes onto the dirty bitmap, writes go on, and it converges`, async (t) => {
    // The default cap (8 GiB) on a 160 MiB filesystem: without looking at the disk, the journal kept every entry
    // for the replica until the free-space guard refused writes with ENOSPC, which a filesystem on the volume
    // takes for an I/O error. A disk nearly full counts as the journal full: an absent replica is switched to the
    // bitmap, a connected one far behind is pulled ahead, as at the cap, and the journal lets go of what it held.
    const dir = t.testdir();
    const jfs = await tmpfs(t, '160m');
    const image = path.join(dir, 'disk.img');
    const replicaDir = path.join(dir, 'replica');
    fs.mkdirSync(replicaDir);
    const away = how === 'away';
    const port = await freePort();
    // The slow link: 16 MB/s, where 256 MiB takes 17 s.
    if (!away) await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir], t.teardown);
    const link = away ? [] : ['--max-rate', '16MB/s'];
    const s = await startServe(['--image', `disk=${image}`, '--size', '256M', '--listen', '127.0.0.1:0', '--journal', path.join(jfs, 'journal'), '--min-free', '16M', '--replicate-to', `ws://127.0.0.1:${port}`, ...link, '--admin', '127.0.0.1:0'], t.teardown);
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
    t.teardown(() => c.close());
    let refusal: unknown;
    const inflight = new Set<Promise<void>>();
    const started = Date.now();
    // 256 MiB of distinct 1 MiB blocks, written once each: more than the filesystem holds.
    for (let mib = 0; mib < 256 && !refusal; mib++) {
      const p: Promise<void> = c.write(mib * MiB, randomBytes(MiB)).then(
        () => void inflight.delete(p),
        (err) => {
          inflight.delete(p);
          refusal ??= err;
        },
      );
      inflight.add(p);
      if (inflight.size >= 8) await Promise.race(inflight);
    }
    await Promise.all(inflight);
    await c.flush();
    const seconds = (Date.now() - started) / 1000;
    t.equal(refusal, undefined, `every write was taken (${String(refusal)})`);
    if (away) {
      t.match(s.stderr(), /tracking its dirty regions in a bitmap/, 'the absent replica was switched to the dirty bitmap');
    } else {
      t.match(s.stderr(), /pull-ahead/, 'the replica behind the slow link was pulled ahead');
      t.ok(seconds < 8, `256 MiB written in ${seconds.toFixed(1)} s, not at the link's pace (17 s)`);
    }
    const st = await getStatus(adminOf(s.stdout()));
    t.equal(st.volumes[0].writesRefused, null, 'status shows no refused writes');
    t.ok(st.volumes[0].journal.capBytes < 160 * MiB, `status shows the journal's cap as the disk allows (${st.volumes[0].journal.capBytes} of ${st.volumes[0].journal.maxBytes})`);
    t.match(s.stderr(), /the journal's filesystem has room for less than the journal's cap: it counts as full at/, 'serve logs that its disk holds the cap down');
    t.match(s.stderr(), /the journal \S+ is on tmpfs \(memory\): it is lost at a reboot/, 'and warns that a journal on tmpfs does not survive a reboot');
    const metrics = await (await fetch(`${adminOf(s.stdout())}/metrics`)).text();
    const capMetric = Number(/^blockferry_journal_cap_bytes\{volume="disk"\} (\d+)$/m.exec(metrics)?.[1]);
    t.ok(capMetric > 0 && capMetric < 160 * MiB, `/metrics has the cap in force (${capMetric})`);
    t.match(metrics, /^blockferry_journal_max_bytes\{volume="disk"\} 8589934592$/m, 'beside --journal-max');
    const table = await runStatus(process.execPath, [CLI, 'status', '--admin', adminOf(s.stdout())]);
    t.match(table.stdout, /\/ [\d.]+ MiB disk \(\d+%\)/, `blockferry status marks the cap as the disk's\n${table.stdout}`);

    if (away) await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', replicaDir], t.teardown);
    t.ok(await until(() => sameFiles(image, path.join(replicaDir, 'disk.img')), 120_000, 200), 'the replica converges byte for byte');
    await c.close();
    t.equal(await s.stop(), 0, 'serve stops cleanly');
  });
}
