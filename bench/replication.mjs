// `npm run bench` (second part): replication figures, measured end to end from outside the processes.
//   - initial sync: a 1 GiB image full of random data gets a new, empty replica (digest pass + shipping);
//   - throughput: fio 4K random writes at queue depth 32 with replication on (the maximum);
//   - lag (RPO): fio writes at half that rate while a probe writes a marker block every 100 ms and polls the
//     replica file for it; lag = time from the primary's reply to the marker being in the replica;
//   - catch-up: the replayer is stopped (SIGSTOP), 1 GiB is written, it continues (SIGCONT); rate = bytes
//     written during the outage / time until a marker written after them is in the replica.
// Prints a table and writes JSON to bench/results/.
//
//   - memory (--memory): 10 GiB of 1 MiB writes with replication on; peak RSS and anonymous memory of serve.
//     Then the same 10 GiB with the replayer stopped (SIGSTOP, a stalled replica): more than the journal's
//     8 GiB cap, so the replica is switched to the dirty bitmap; serve's peak memory over that run, the states
//     the replica went through, the time from SIGCONT until it is continuous with no lag again, and whether the
//     replica file is then byte-identical to the primary's image (the run exits 1 if not).
//
// usage: node bench/replication.mjs [--quick] [--memory]
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatSteal, stealMeter } from './steal.mjs';
import { sameBytes } from './files.mjs';
import { NbdProbe } from './nbd-probe.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist/cli/index.js');
const IMAGE_BYTES = 2 ** 30;
// fio stays below this; the probe's marker blocks live above it.
const FIO_BYTES = IMAGE_BYTES - 4 * 2 ** 20;
const PROBE_SLOTS = 1024;
const quick = process.argv.includes('--quick');
const memoryRun = process.argv.includes('--memory');
const LOAD_S = quick ? 5 : 15;

const live = new Set();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function start(args, ready, name) {
  // BENCH_PROF=DIR writes a CPU profile of each process there (node --cpu-prof) for finding where time goes.
  const prof = process.env.BENCH_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_PROF}`] : [];
  const child = spawn(process.execPath, [...prof, CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  child.err = '';
  child.stderr.on('data', (d) => (child.err = (child.err + d).slice(-200_000)));
  child.exited = new Promise((r) => child.once('exit', r));
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${name} did not start:\n${child.err}`)), 30_000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = ready.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ child, match: m });
      }
    });
    child.once('exit', (code) => reject(new Error(`${name} exited ${code}:\n${child.err}`)));
  });
}

function fio(uri, extra) {
  return new Promise((resolve, reject) => {
    const args = ['--name=load', '--ioengine=nbd', `--uri=${uri}`, '--direct=1', `--size=${FIO_BYTES}`, '--randrepeat=0', '--output-format=json', ...extra];
    const p = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}: ${err}`));
      const w = JSON.parse(out.slice(out.indexOf('{'))).jobs[0].write;
      resolve({ iops: w.iops, mibs: w.bw_bytes / 2 ** 20, bytes: w.io_bytes, maxLatencyMs: w.clat_ns.max / 1e6 });
    });
  });
}

/** Writes marker blocks and times their arrival in the replica file. */
class Probe {
  constructor(client, replicaPath) {
    this.client = client;
    this.replicaPath = replicaPath;
    this.slot = 0;
  }

  /** Writes one marker; resolves to the lag in ms once the replica holds it. */
  async mark(timeoutMs = 600_000) {
    const slot = this.slot++ % PROBE_SLOTS;
    const offset = FIO_BYTES + slot * 4096;
    const block = randomBytes(4096);
    await this.client.write(offset, block);
    const replied = performance.now();
    const fd = await this.openReplica(timeoutMs);
    const got = Buffer.alloc(32);
    try {
      while (performance.now() - replied < timeoutMs) {
        fs.readSync(fd, got, 0, 32, offset);
        if (got.equals(block.subarray(0, 32))) return performance.now() - replied;
        await sleep(2);
      }
    } finally {
      fs.closeSync(fd);
    }
    throw new Error(`marker at ${offset} did not reach the replica in ${timeoutMs} ms`);
  }

  async openReplica(timeoutMs) {
    const deadline = performance.now() + timeoutMs;
    while (!fs.existsSync(this.replicaPath)) {
      if (performance.now() > deadline) throw new Error('the replica image never appeared');
      await sleep(10);
    }
    return fs.openSync(this.replicaPath, 'r');
  }
}

function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

/** Starts a new peak for VmHWM (`5` to clear_refs resets the process's peak RSS). */
function resetPeak(pid) {
  fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

async function status(adminUrl) {
  const res = await fetch(`${adminUrl}/status`);
  if (!res.ok) throw new Error(`GET /status: ${res.status}`);
  return res.json();
}

function memory(pid) {
  try {
    const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (k) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(st)?.[1] ?? NaN) / 1024;
    return { hwm: kb('VmHWM'), anon: kb('RssAnon') };
  } catch {
    return { hwm: NaN, anon: NaN };
  }
}

async function main() {
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const work = fs.mkdtempSync(path.join(ROOT, 'bench', '.work-repl-'));
  const results = {};
  let serve;
  let replay;
  let anonPeak = 0;
  /** serve's peaks before a phase that measures its own (VmHWM reset). */
  let before = { hwm: 0, anon: 0 };
  const sampler = setInterval(() => {
    if (serve) anonPeak = Math.max(anonPeak, memory(serve.child.pid).anon || 0);
  }, 200);
  try {
    const image = path.join(work, 'disk.img');
    process.stderr.write('bench: writing a 1 GiB random image...\n');
    const fd = fs.openSync(image, 'w');
    const chunk = Buffer.alloc(16 * 2 ** 20);
    for (let off = 0; off < IMAGE_BYTES; off += chunk.length) fs.writeSync(fd, randomFillSync(chunk), 0, chunk.length, off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    // ...and dropped from the page cache, as an operator's disk is when replication starts: the initial sync
    // reads it from disk, and the writes after it meet the page cache that sync leaves behind (written in
    // 16 MiB pieces, the image would sit in large folios that make every 4 KiB write slow: see readScan).
    execFileSync('dd', ['if=/dev/null', `of=${image}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0'], { stdio: 'ignore' });

    const stolen0 = stealMeter();
    replay = await start(['replay', '--listen', '127.0.0.1:0', '--data-dir', path.join(work, 'replica')], /listening on (ws:\/\/\S+)/, 'replay');
    const t0 = performance.now();
    serve = await start(
      ['serve', '--image', `disk=${image}`, '--listen', '127.0.0.1:0', '--journal', path.join(work, 'journal'), '--replicate-to', replay.match[1], '--admin', '127.0.0.1:0'],
      /admin on (http:\/\/\S+)[\s\S]*listening on (nbd:\/\/\S+)/,
      'serve',
    );
    const adminUrl = serve.match[1];
    const uri = serve.match[2];
    const client = await NbdProbe.connect('127.0.0.1', Number(new URL(uri).port), 'disk');
    const probe = new Probe(client, path.join(work, 'replica', 'disk.img'));

    // 1. Initial sync: the digest pass has queued every chunk once serve logs it; a marker after that proves arrival.
    process.stderr.write('bench: initial sync of the 1 GiB image to a new replica...\n');
    while (!/every differing chunk is queued/.test(serve.child.err)) {
      if (performance.now() - t0 > 600_000) throw new Error('initial sync did not finish in 10 minutes');
      await sleep(50);
    }
    await probe.mark();
    const syncS = (performance.now() - t0) / 1000;
    results.initialSync = { bytes: IMAGE_BYTES, seconds: syncS, mibs: IMAGE_BYTES / 2 ** 20 / syncS, steal: stolen0() };
    // serve's peak RSS so far after each early phase (VmHWM only grows): where the early peak comes from.
    const phasePeaks = (results.phasePeaks = { initialSync: memory(serve.child.pid).hwm });

    // 2. Maximum 4K random write rate with replication on.
    process.stderr.write('bench: maximum 4K random write rate...\n');
    const stolen1 = stealMeter();
    const max = await fio(uri, ['--rw=randwrite', '--bs=4k', '--iodepth=32', '--time_based', `--runtime=${quick ? 3 : 5}`, '--ramp_time=1']);
    results.max4k = { iops: max.iops, steal: stolen1() };
    phasePeaks.max4k = memory(serve.child.pid).hwm;
    await probe.mark();

    // 3. Lag at half that rate.
    const rate = Math.max(100, Math.floor(max.iops / 2));
    process.stderr.write(`bench: lag at ${rate} IOPS (half the maximum) for ${LOAD_S} s...\n`);
    const stolen2 = stealMeter();
    const load = fio(uri, ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--rate_iops=${rate}`, '--time_based', `--runtime=${LOAD_S}`]);
    const lags = [];
    let loadDone = false;
    load.finally(() => (loadDone = true));
    await sleep(1000);
    while (!loadDone) {
      const started = performance.now();
      lags.push(await probe.mark());
      await sleep(Math.max(0, 100 - (performance.now() - started)));
    }
    const achieved = await load;
    phasePeaks.lag = memory(serve.child.pid).hwm;
    results.lag = { targetIops: rate, achievedIops: achieved.iops, samples: lags.length, p50ms: pct(lags, 50), p99ms: pct(lags, 99), maxms: Math.max(...lags), steal: stolen2() };

    // 4. Catch-up after an outage.
    process.stderr.write('bench: outage (replayer stopped) while 1 GiB is written, then catch-up...\n');
    await probe.mark();
    replay.child.kill('SIGSTOP');
    const backlog = await fio(uri, ['--rw=write', '--bs=1M', '--iodepth=16']);
    const marker = probe.mark();
    await sleep(50);
    const resumed = performance.now();
    const stolen3 = stealMeter();
    replay.child.kill('SIGCONT');
    await marker;
    const catchS = (performance.now() - resumed) / 1000;
    phasePeaks.catchUp = memory(serve.child.pid).hwm;
    results.catchUp = { backlogBytes: backlog.bytes, writtenMiBs: backlog.mibs, seconds: catchS, mibs: backlog.bytes / 2 ** 20 / catchS, steal: stolen3() };
    if (memoryRun) {
      process.stderr.write('bench: memory run: 10 GiB of 1 MiB writes with replication on...\n');
      // Its own peaks, like the stalled run's below: the phases before it (initial sync, catch-up) are kept for
      // the `serve memory` row.
      before = { hwm: memory(serve.child.pid).hwm, anon: anonPeak };
      results.earlyPhases = { serveVmHWMMiB: before.hwm, serveRssAnonPeakMiB: before.anon };
      resetPeak(serve.child.pid);
      resetPeak(replay.child.pid);
      anonPeak = 0;
      const stolen4 = stealMeter();
      const big = await fio(uri, ['--rw=write', '--bs=1M', '--iodepth=16', '--io_size=10G']);
      await probe.mark();
      results.memoryRun = { steal: stolen4(), bytes: big.bytes, mibs: big.mibs, serveVmHWMMiB: memory(serve.child.pid).hwm, serveRssAnonPeakMiB: anonPeak, replayVmHWMMiB: memory(replay.child.pid).hwm };

      // 6. A stalled replica through 10 GiB: past the journal's cap, so it must move to the dirty bitmap while
      // writes go on, and serve's memory must not grow with what the replica lacks.
      process.stderr.write('bench: stalled replica: replayer stopped (SIGSTOP) while 10 GiB is written...\n');
      // Its own peaks: the whole run's so far are kept for the `serve memory` row.
      before = { hwm: Math.max(before.hwm, memory(serve.child.pid).hwm), anon: Math.max(before.anon, anonPeak) };
      resetPeak(serve.child.pid);
      anonPeak = 0;
      const states = new Set();
      let journalPeak = 0;
      let dirtyPeak = 0;
      let watching = true;
      const watch = (async () => {
        while (watching) {
          const st = await status(adminUrl);
          const v = st.volumes[0];
          journalPeak = Math.max(journalPeak, v.journal.bytes);
          for (const rep of v.replicas) {
            states.add(rep.state);
            dirtyPeak = Math.max(dirtyPeak, rep.dirtyBytes ?? 0);
          }
          await sleep(250);
        }
      })();
      replay.child.kill('SIGSTOP');
      const stolen5 = stealMeter();
      const stalledRun = await fio(uri, ['--rw=write', '--bs=1M', '--iodepth=16', '--io_size=10G']);
      const stallSteal = stolen5();
      const stallMem = { hwm: memory(serve.child.pid).hwm, anon: anonPeak };
      const resumed2 = performance.now();
      replay.child.kill('SIGCONT');
      for (;;) {
        const rep = (await status(adminUrl)).volumes[0].replicas[0];
        states.add(rep.state);
        if (rep.state === 'continuous' && rep.lagEntries === 0) break;
        if (performance.now() - resumed2 > 600_000) throw new Error(`the stalled replica did not converge in 10 minutes (state ${rep.state})`);
        await sleep(100);
      }
      const convergeS = (performance.now() - resumed2) / 1000;
      watching = false;
      await watch;
      // "continuous with no lag" is what serve says; the bytes are what a user relies on.
      const identical = sameBytes(image, path.join(work, 'replica', 'disk.img'));
      if (!identical) process.exitCode = 1;
      results.stalledRun = {
        steal: stallSteal,
        bytes: stalledRun.bytes,
        mibs: stalledRun.mibs,
        maxLatencyMs: stalledRun.maxLatencyMs,
        serveVmHWMMiB: stallMem.hwm,
        serveRssAnonPeakMiB: stallMem.anon,
        journalPeakBytes: journalPeak,
        dirtyPeakBytes: dirtyPeak,
        states: [...states],
        convergeSeconds: convergeS,
        identical,
      };
    }
    client.close();
    results.memory = { serveVmHWMMiB: Math.max(before.hwm, memory(serve.child.pid).hwm), serveRssAnonPeakMiB: Math.max(before.anon, anonPeak) };
  } finally {
    clearInterval(sampler);
    for (const c of live) {
      if (c.exitCode === null) {
        c.kill('SIGCONT');
        c.kill('SIGTERM');
      }
    }
    await Promise.race([Promise.all([...live].map((c) => c.exited)), sleep(15_000)]);
    for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    fs.rmSync(work, { recursive: true, force: true });
  }

  const r = results;
  const lines = [
    `replication, 127.0.0.1, serve + replay on one ${os.cpus().length}-CPU machine, 1 GiB random image`,
    '| measure | figure | target | CPU steal |',
    '|---|---|---|---|',
    `| initial sync of 1 GiB (new replica, digest pass + shipping) | ${r.initialSync.seconds.toFixed(1)} s = ${r.initialSync.mibs.toFixed(0)} MiB/s | | ${formatSteal(r.initialSync.steal)} |`,
    `| 4K random write, qd32, replication on | ${r.max4k.iops.toFixed(0)} IOPS | | ${formatSteal(r.max4k.steal)} |`,
    `| lag (RPO) at ${r.lag.targetIops} IOPS (achieved ${r.lag.achievedIops.toFixed(0)}), ${r.lag.samples} probes | p50 ${(r.lag.p50ms / 1000).toFixed(3)} s, p99 ${(r.lag.p99ms / 1000).toFixed(3)} s, max ${(r.lag.maxms / 1000).toFixed(3)} s | p99 <= 1 s | ${formatSteal(r.lag.steal)} |`,
    `| catch-up after ${(r.catchUp.backlogBytes / 2 ** 20).toFixed(0)} MiB written during an outage | ${r.catchUp.seconds.toFixed(1)} s = ${r.catchUp.mibs.toFixed(0)} MiB/s | >= 300 MiB/s | ${formatSteal(r.catchUp.steal)} |`,
    `| serve memory, whole run | peak RSS ${r.memory.serveVmHWMMiB.toFixed(0)} MiB (VmHWM, includes mapped journal pages), peak anonymous ${r.memory.serveRssAnonPeakMiB.toFixed(0)} MiB | < 300 MB (286 MiB) | |`,
  ];
  if (r.phasePeaks) {
    const p = r.phasePeaks;
    const early = r.earlyPhases ?? r.memory;
    lines.push(`| serve memory before the 10 GiB runs | peak RSS ${p.catchUp.toFixed(0)} MiB (${p.initialSync.toFixed(0)} after the initial sync, ${p.max4k.toFixed(0)} after 4K writes, ${p.lag.toFixed(0)} after the lag run, ${p.catchUp.toFixed(0)} after the catch-up), peak anonymous ${early.serveRssAnonPeakMiB.toFixed(0)} MiB | | |`);
  }
  if (r.memoryRun) {
    lines.push(`| memory run: ${(r.memoryRun.bytes / 2 ** 30).toFixed(1)} GiB written at ${r.memoryRun.mibs.toFixed(0)} MiB/s, replicated | serve peak RSS ${r.memoryRun.serveVmHWMMiB.toFixed(0)} MiB, peak anonymous ${r.memoryRun.serveRssAnonPeakMiB.toFixed(0)} MiB; replay peak RSS ${r.memoryRun.replayVmHWMMiB.toFixed(0)} MiB | < 300 MB (286 MiB) | ${formatSteal(r.memoryRun.steal)} |`);
  }
  if (r.stalledRun) {
    const x = r.stalledRun;
    lines.push(
      `| stalled replica (replayer SIGSTOPped): ${(x.bytes / 2 ** 30).toFixed(1)} GiB written at ${x.mibs.toFixed(0)} MiB/s (slowest write ${(x.maxLatencyMs / 1000).toFixed(2)} s), journal peak ${(x.journalPeakBytes / 2 ** 30).toFixed(1)} GiB, dirty bitmap peak ${(x.dirtyPeakBytes / 2 ** 20).toFixed(0)} MiB, states ${x.states.join(' > ')}; continuous again ${x.convergeSeconds.toFixed(1)} s after SIGCONT, replica ${x.identical ? 'byte-identical to the primary' : 'DIFFERS FROM THE PRIMARY'} | serve peak RSS ${x.serveVmHWMMiB.toFixed(0)} MiB, peak anonymous ${x.serveRssAnonPeakMiB.toFixed(0)} MiB | < 300 MB (286 MiB) | ${formatSteal(x.steal)} |`,
    );
  }
  console.log(lines.join('\n'));
  const outDir = path.join(ROOT, 'bench', 'results');
  fs.mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `replication-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), cpus: os.cpus().length, results }, null, 2));
  console.log(`results: ${path.relative(ROOT, file)}`);
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    for (const c of live) if (c.exitCode === null) c.kill('SIGKILL');
    process.exit(130);
  });
}
main().catch((err) => {
  for (const c of live) if (c.exitCode === null) c.kill('SIGKILL');
  console.error(`bench: ${err.stack ?? err}`);
  process.exit(1);
});
