// Crash safety of the primary (issue #3): a real `blockferry serve` process is SIGKILLed at random points of a
// pipelined write workload, many times. After every restart: every write replied before the kill is present,
// and the image equals zeroes + the journal replayed (nothing in the image the journal lacks, and nothing in the
// journal the image lacks). Some kills must leave the image behind its journal (large writes reach the image
// through the thread pool, after their journal commit), so that recovery has work to do. A SIGKILL keeps the
// page cache: that a replied FLUSH survives a power cut is checked by test/power-cut and test/mirror-order.
import t from 'tap';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, run, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
const BLOCK = 4096;
const ROUNDS = Number(process.env.CRASH_ROUNDS ?? 8);
/** Writes kept in flight by the workload (the kernel client keeps up to 128). */
const PIPELINE = 16;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Both durability modes: `commit` (the default: group commit in the OS cache, fsync on FLUSH) and `sync`
// (every commit fsynced); the sync run is shorter because the same promises are checked.
for (const [durability, rounds] of [['commit', ROUNDS], ['sync', Math.ceil(ROUNDS / 2)]] as const)
t.test(`--durability ${durability}: serve survives SIGKILL at random points: replied writes kept, image = base + journal`, async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const journal = path.join(dir, 'journal');
  // --keep-journal: every entry stays, so the image can be checked against zeroes + the whole journal.
  // A 1 GiB cap makes 16 MiB segments: the kills also land while a new segment starts.
  const args = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', journal, '--journal-max', '4G', '--keep-journal', '--durability', durability];
  const live = new Set<ChildProcess>();
  t.teardown(() => {
    for (const c of live) if (c.exitCode === null) c.kill('SIGKILL');
  });

  // Blocks 0..HOT-1 are rewritten over and over (overlaps, order matters); blocks above get one write each,
  // so a replied write there can be checked byte for byte after a crash. The last BIG_AREA bytes take 512 KiB
  // writes, rewritten too: the mirror hands writes that large to the thread pool after their journal commit.
  const HOT = 64;
  const BIG = 512 * 1024;
  const BIG_AREA = 8 * 2 ** 20;
  let nextUnique = HOT;
  const replied = new Map<number, Buffer>();
  let flushed = 0;
  let kills = 0;
  let mismatches = 0;
  let behind = 0;

  // More rounds (up to three times as many) while no kill has yet left the image behind its journal, and while
  // the kept journal stays well under its cap: past the cap it lets go of its oldest entries, and replay-local
  // can no longer rebuild from zeroes (a CI run met that with 1G: entries before seq 413 pruned).
  const journalBytes = () => (fs.existsSync(journal) ? fs.readdirSync(journal).reduce((n, f) => n + fs.statSync(path.join(journal, f)).size, 0) : 0);
  for (let round = 0; round < rounds || (behind === 0 && round < 3 * rounds && journalBytes() < 2 * 2 ** 30); round++) {
    const s = await startServe(args);
    live.add(s.child);
    const client = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
    client.on?.('error', () => undefined);

    // Check every write replied so far survived the previous crash and recovery.
    for (const [block, data] of replied) {
      const got = await client.read(block * BLOCK, BLOCK);
      if (!got.equals(data)) t.fail(`round ${round}: replied block ${block} lost after a crash`);
    }

    let stop = false;
    const killAfter = 150 + Math.floor(Math.random() * 900);
    const workload = (async () => {
      const inflight = new Set<Promise<void>>();
      let writes = 0;
      while (!stop) {
        const dice = Math.random();
        let p: Promise<void>;
        if (dice < 0.3) {
          const offset = SIZE - BIG_AREA + Math.floor(Math.random() * (BIG_AREA / BIG)) * BIG;
          p = client.write(offset, randomBytes(BIG)).then(() => undefined, () => undefined);
        } else {
          const hot = dice < 0.5;
          const block = hot ? Math.floor(Math.random() * HOT) : nextUnique++;
          if (block * BLOCK >= SIZE - BIG_AREA) break;
          const data = randomBytes(BLOCK);
          p = client.write(block * BLOCK, data).then(
            () => {
              if (!hot) replied.set(block, data);
            },
            () => undefined,
          );
        }
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
        if (inflight.size >= PIPELINE) await Promise.race(inflight);
        if (++writes % 40 === 0) {
          // FLUSHes among the writes, as a file system sends them (their checkpoints move the journal's tail).
          try {
            await client.flush();
            flushed++;
          } catch {
            return;
          }
        }
      }
    })();
    await sleep(killAfter);
    s.child.kill('SIGKILL');
    kills++;
    stop = true;
    await s.exited;
    live.delete(s.child);
    await workload.catch(() => undefined);
    client.destroy?.();

    // What the kill left: the image is never ahead of its journal, and is behind it when writes were between
    // their journal commit and the image (recovery's work).
    const rebuilt = path.join(dir, 'rebuilt.img');
    fs.rmSync(rebuilt, { force: true });
    await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', rebuilt]);
    if (!fs.readFileSync(image).equals(fs.readFileSync(rebuilt))) behind++;

    // Restart: recovery re-applies the journal tail. Stop cleanly and compare with a replay from zeroes.
    const r = await startServe(args);
    live.add(r.child);
    r.child.kill('SIGTERM');
    if ((await r.exited) !== 0) t.fail(`round ${round}: serve did not stop cleanly after recovery`);
    live.delete(r.child);
    fs.rmSync(rebuilt, { force: true });
    await run(process.execPath, [CLI, 'replay-local', '--journal', journal, '--size', String(SIZE), '--out', rebuilt]);
    if (!fs.readFileSync(image).equals(fs.readFileSync(rebuilt))) {
      mismatches++;
      t.fail(`round ${round}: image differs from zeroes + journal after recovery`);
    }
  }

  // A last start: every write replied, in any round, is still there.
  const s = await startServe(args);
  live.add(s.child);
  const client = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  let lost = 0;
  for (const [block, data] of replied) if (!(await client.read(block * BLOCK, BLOCK)).equals(data)) lost++;
  await client.close();
  t.equal(lost, 0, `all ${replied.size} replied writes survived ${kills} SIGKILLs`);
  s.child.kill('SIGTERM');
  t.equal(await s.exited, 0, 'serve stops cleanly on SIGTERM');
  live.delete(s.child);

  t.ok(flushed > 0, `the workload got ${flushed} flushes through between kills`);
  // That recovery had work to do is required where kills land there reliably. With sync durability each group
  // commit is synced on the loop thread, and the image writes after it take a millisecond or so of the time in
  // between (0 of 12 kills in a CI run of 16ec16e); its recovery path is the same code as commit durability's.
  if (durability === 'commit') t.ok(behind > 0, `${behind} of ${kills} kills left the image behind its journal, and recovery brought it level`);
  else t.comment(`${behind} of ${kills} kills left the image behind its journal`);
  const inspected = JSON.parse((await run(process.execPath, [CLI, 'journal', 'inspect', '--journal', journal, '--json'])).stdout);
  if (durability === 'commit') t.ok(inspected.stats.segments > 1, `the journal grew into ${inspected.stats.segments} segments across the kills`);
  t.equal(mismatches, 0, `after each of ${kills} SIGKILLs, recovery left the image equal to zeroes + journal`);
});
