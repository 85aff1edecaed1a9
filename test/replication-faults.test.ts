// Replication under faults (issue #4), with real processes and real clients: the link cut over and over by a
// TCP proxy in this test (and once black-holed, so only ping timeouts can notice), the primary SIGKILLed and
// restarted mid-workload, the replayer SIGKILLed mid-stream under large writes. Every time, once serve reports
// the replica caught up, the replica image is byte-identical to the primary's; and while the faults happen the
// replica is never ahead of the primary's journal.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import WebSocket from 'ws';
import { entryCrc } from '../src/journal/entry.js';
import { EntryKind } from '../src/journal/types.js';
import { ReplayServer } from '../src/replayer/replay-server.js';
import { PROTOCOL_VERSION, decode, encode } from '../src/replicator/protocol.js';
import { sha256File } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { adminOf, getStatus, startReplay, startServe, type Replaying, type Served } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
/** How long catching up may take after the workload stops (a loaded 2-core box ships a few hundred MiB). */
const CATCH_UP_MS = 90_000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const between = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo));

type Teardown = (fn: () => unknown) => void;

/**
 * A TCP proxy on loopback between serve's replicator and the replayer. `cut()` destroys every proxied
 * connection (both sockets, as a dropped link looks to both ends); `stall()` black-holes them: nothing is
 * forwarded any more and nothing is closed, on either side, as in a network partition.
 */
class LinkProxy {
  private readonly pairs = new Set<{ client: net.Socket; upstream: net.Socket; stalled: boolean }>();
  /** Connections accepted so far (the replicator's connection attempts). */
  accepted = 0;
  /** Bytes forwarded from serve to the replayer. */
  forwarded = 0;
  private constructor(private readonly server: net.Server, public target: number) {}

  static async start(target: number, teardown: Teardown): Promise<LinkProxy> {
    const server = net.createServer();
    const proxy = new LinkProxy(server, target);
    server.on('connection', (c) => proxy.onConnection(c));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    teardown(() => proxy.close());
    return proxy;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Pairs that still forward. */
  get live(): number {
    let n = 0;
    for (const p of this.pairs) if (!p.stalled) n++;
    return n;
  }

  private onConnection(client: net.Socket): void {
    this.accepted++;
    const upstream = net.connect(this.target, '127.0.0.1');
    const pair = { client, upstream, stalled: false };
    this.pairs.add(pair);
    client.on('data', (d: Buffer) => (this.forwarded += d.length));
    client.pipe(upstream);
    upstream.pipe(client);
    // One side gone: the other goes too, unless the pair is black-holed (then nothing reaches the other side).
    const drop = () => {
      if (pair.stalled) return;
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', () => undefined);
      s.on('close', drop);
    }
  }

  cut(): number {
    let n = 0;
    for (const p of this.pairs) {
      if (p.stalled) continue;
      this.pairs.delete(p);
      p.client.destroy();
      p.upstream.destroy();
      n++;
    }
    return n;
  }

  stall(): number {
    let n = 0;
    for (const p of this.pairs) {
      if (p.stalled) continue;
      p.stalled = true;
      p.client.unpipe(p.upstream);
      p.upstream.unpipe(p.client);
      p.client.pause();
      p.upstream.pause();
      n++;
    }
    return n;
  }

  /** Waits until a connection is forwarding (the replicator has (re)connected through us). */
  async waitLive(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (this.live === 0 && Date.now() < deadline) await sleep(20);
    return this.live > 0;
  }

  close(): Promise<void> {
    for (const p of this.pairs) {
      p.client.destroy();
      p.upstream.destroy();
    }
    this.pairs.clear();
    return new Promise((r) => this.server.close(() => r()));
  }
}


/** The replica's applied seq as the replayer's /status says (0 before the volume is open). */
async function replicaApplied(admin: string): Promise<number> {
  return (await getStatus(admin)).volumes.find((v: { volume: string }) => v.volume === 'disk')?.appliedSeq ?? 0;
}

/** Polls serve's /status until its replica has applied everything committed; returns the last status seen. */
async function caughtUp(admin: string, ms = CATCH_UP_MS): Promise<{ ok: boolean; last: unknown }> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = (await getStatus(admin)).volumes[0];
      last = { journal: v.journal, replica: v.replicas[0] };
      const r = v.replicas[0];
      if (r.state === 'continuous' && r.lagEntries === 0 && r.appliedSeq === v.journal.committedSeq) return { ok: true, last };
    } catch (err) {
      last = String(err);
    }
    await sleep(200);
  }
  return { ok: false, last };
}

/**
 * Samples, until stopped, that the replica's applied seq (replayer /status) is never past the primary's
 * committed seq (serve /status, read after it: the primary's seq only grows, so the order makes it fair).
 * Samples are skipped while either process is down.
 */
function neverAhead(t: { teardown: Teardown }, serveAdmin: () => string | undefined, replayAdmin: () => string | undefined) {
  let stopped = false;
  t.teardown(() => void (stopped = true));
  let samples = 0;
  const violations: string[] = [];
  const loop = (async () => {
    while (!stopped) {
      await sleep(150);
      const s = serveAdmin();
      const r = replayAdmin();
      if (!s || !r) continue;
      try {
        const rv = (await getStatus(r)).volumes.find((v: { volume: string }) => v.volume === 'disk');
        if (!rv) continue;
        const committed = (await getStatus(s)).volumes[0].journal.committedSeq;
        samples++;
        if (rv.appliedSeq > committed) violations.push(`replica applied ${rv.appliedSeq} > primary committed ${committed}`);
      } catch {
        // one of them was just killed or restarted
      }
    }
  })();
  return async () => {
    stopped = true;
    await loop;
    return { samples, violations };
  };
}

/**
 * One fio run of random writes (plus a few trims) from two NBD connections over the same range, so writes
 * overlap and only the journal's order decides the result; fsyncs put FLUSH markers in the stream.
 */
function fio(t: { teardown: Teardown }, uri: string, o: { seconds: number; bs: string; size: number; iodepth: number }): Promise<{ code: number | null; out: string }> {
  const args = [
    '--ioengine=nbd', `--uri=${uri}`, `--size=${o.size}`, '--time_based', `--runtime=${o.seconds}`, '--randrepeat=0', '--group_reporting',
    '--name=writes', '--rw=randwrite', `--bsrange=${o.bs}`, `--iodepth=${o.iodepth}`, '--numjobs=2', '--refill_buffers', '--fsync=64',
    '--name=trims', '--rw=randtrim', '--bs=64k', '--iodepth=1', '--rate_iops=20',
  ];
  const p = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<{ code: number | null; out: string }>((resolve) => {
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('exit', (code) => resolve({ code, out }));
  });
  t.teardown(() => {
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    return exited;
  });
  return exited;
}

/** Runs fio again and again until `done()`; resolves to the failed runs' output (none expected). */
async function fioUntil(t: { teardown: Teardown }, uri: string, done: () => boolean, o: { bs: string; size: number; iodepth: number }): Promise<{ runs: number; failures: string[] }> {
  let runs = 0;
  const failures: string[] = [];
  while (!done()) {
    const r = await fio(t, uri, { ...o, seconds: 2 });
    runs++;
    if (r.code !== 0) failures.push(`fio exited ${r.code}:\n${r.out.slice(-2000)}`);
  }
  return { runs, failures };
}

async function assertIdentical(t: Test, image: string, replica: string, serve: Served): Promise<void> {
  const c = await caughtUp(adminOf(serve.stdout()));
  t.ok(c.ok, 'serve reports the replica caught up (continuous, lag 0, applied = committed)', { last: c.last });
  if (!c.ok) t.comment(`serve stderr:\n${serve.stderr().slice(-4000)}`);
  t.equal(await sha256File(replica), await sha256File(image), 'the replica is byte-identical to the primary');
}

t.test('link cut 14 times and black-holed once while fio writes from two connections: identical after catch-up', async (t) => {
  const dir = t.testdir();
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir, '--admin', '127.0.0.1:0'], t.teardown);
  const proxy = await LinkProxy.start(replay.port, t.teardown);
  const image = path.join(dir, 'disk.img');
  const s = await startServe(
    ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', `ws://127.0.0.1:${proxy.port}`, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const watch = neverAhead(t, () => adminOf(s.stdout()), () => adminOf(replay.stdout()));
  let faultsDone = false;
  t.teardown(() => void (faultsDone = true));
  const writing = fioUntil(t, s.uri, () => faultsDone, { bs: '4k-64k', size: 48 * 2 ** 20, iodepth: 16 });

  let cuts = 0;
  const cut = async (n: number) => {
    // Counts only cuts that hit a live link (a refused reconnect may close by itself in the meantime).
    for (const target = cuts + n; cuts < target; ) {
      if (!(await proxy.waitLive(30_000))) return t.fail(`the replicator did not reconnect through the proxy after ${cuts} cuts`);
      // From 0 ms (mid-handshake) to over a second into the stream.
      await sleep(between(0, 1200));
      if (proxy.cut() > 0) cuts++;
    }
  };
  await cut(10);

  // A black hole: no close, no RST, on either side. Only the replicator's ping timeout can find it, and the
  // replayer must not keep the volume busy forever for a primary it cannot hear from any more.
  let stalled = 0;
  for (const until = Date.now() + 30_000; stalled === 0 && Date.now() < until; ) {
    if (!(await proxy.waitLive(until - Date.now()))) break;
    await sleep(500);
    stalled = proxy.stall();
  }
  t.equal(stalled, 1, 'a live link is black-holed');
  const before = proxy.accepted;
  const stalledAt = Date.now();
  while (proxy.accepted === before && Date.now() - stalledAt < 30_000) await sleep(50);
  t.ok(proxy.accepted > before, `the replicator notices the dead link and reconnects (after ${Date.now() - stalledAt} ms)`);
  // The old link is still open at the replayer (nothing told it otherwise): replication must resume anyway.
  const appliedAtStall = await replicaApplied(adminOf(replay.stdout()));
  while ((await replicaApplied(adminOf(replay.stdout()))) <= appliedAtStall && Date.now() - stalledAt < 60_000) await sleep(100);
  t.ok((await replicaApplied(adminOf(replay.stdout()))) > appliedAtStall, `replication resumes after the black hole (${Date.now() - stalledAt} ms after it began)`);
  await cut(4);
  faultsDone = true;

  const w = await writing;
  t.same(w.failures, [], `fio ran ${w.runs} times without an error`);
  await assertIdentical(t, image, path.join(replicaDir, 'disk.img'), s);
  const ahead = await watch();
  t.ok(ahead.samples > 10, `replica vs primary sampled ${ahead.samples} times during the faults`);
  t.same(ahead.violations, [], 'the replica was never ahead of the primary journal');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

/** Pipelined random writes (overlapping, unaligned) from two connections until `stop()` or the server dies. */
function hammer(port: number): { stop: () => Promise<number> } {
  let stopped = false;
  let replied = 0;
  // Requests fail when serve is killed under them: that is the point, not an error.
  const run = (async () => {
    const conns = await Promise.all([0, 1].map(() => NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' })));
    for (const c of conns) c.on('error', () => undefined);
    try {
      const inflight = new Set<Promise<void>>();
      for (let i = 0; !stopped; i++) {
        const c = conns[i % 2];
        // Hot first 4 MiB (many overlaps) and the whole volume; sizes from 512 B to 256 KiB.
        const span = Math.random() < 0.5 ? 4 * 2 ** 20 : SIZE;
        const len = between(512, 256 * 1024);
        const off = between(0, span - len);
        const p: Promise<void> = (i % 97 === 96 ? c.flush() : c.write(off, randomBytes(len))).then(() => void replied++);
        inflight.add(p);
        void p.finally(() => inflight.delete(p)).catch(() => undefined);
        if (inflight.size >= 16) await Promise.race(inflight);
      }
      await Promise.all(inflight);
      await conns[0].flush();
    } finally {
      for (const c of conns) c.destroy();
    }
  })().catch(() => undefined);
  return {
    stop: async () => {
      stopped = true;
      await run;
      return replied;
    },
  };
}

t.test('primary SIGKILLed and restarted 6 times mid-workload: identical after the final catch-up', async (t) => {
  const dir = t.testdir();
  const replicaDir = path.join(dir, 'replica');
  const replica = path.join(replicaDir, 'disk.img');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir, '--admin', '127.0.0.1:0'], t.teardown);
  const image = path.join(dir, 'disk.img');
  const args = ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal', path.join(dir, 'journal'), '--replicate-to', replay.url, '--admin', '127.0.0.1:0'];
  let s: Served | undefined;
  const watch = neverAhead(t, () => (s ? adminOf(s.stdout()) : undefined), () => adminOf(replay.stdout()));

  const KILLS = 6;
  let replied = 0;
  for (let round = 0; round < KILLS; round++) {
    s = await startServe(args, t.teardown);
    // What the replica holds must still be in the restarted primary's journal (nothing it applied was lost).
    const committed = (await getStatus(adminOf(s.stdout()))).volumes[0].journal.committedSeq;
    const rv = (await getStatus(adminOf(replay.stdout()))).volumes.find((v: { volume: string }) => v.volume === 'disk');
    if (rv && rv.appliedSeq > committed) t.fail(`round ${round}: replica applied ${rv.appliedSeq}, restarted primary committed only ${committed}`);
    const h = hammer(s.port);
    await sleep(between(600, 2000));
    const victim = s;
    s = undefined;
    victim.child.kill('SIGKILL');
    await victim.exited;
    replied += await h.stop();
  }
  t.ok(replied > 200, `the workload got ${replied} replies between ${KILLS} SIGKILLs`);

  s = await startServe(args, t.teardown);
  const h = hammer(s.port);
  await sleep(1500);
  await h.stop();
  await assertIdentical(t, image, replica, s);
  const ahead = await watch();
  t.ok(ahead.samples > 10, `replica vs primary sampled ${ahead.samples} times`);
  t.same(ahead.violations, [], 'the replica was never ahead of the primary journal');
  t.notMatch(s.stderr(), /resync: comparing/, 'no digest resync was needed: the journal kept everything the replica lacked');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});

t.test('replayer SIGKILLed 8 times mid-stream under large writes: identical after catch-up', async (t) => {
  const dir = t.testdir();
  const replicaDir = path.join(dir, 'replica');
  const replayArgs = ['--listen', '127.0.0.1:0', '--data-dir', replicaDir, '--admin', '127.0.0.1:0'];
  let replay: Replaying | undefined = await startReplay(replayArgs, t.teardown);
  // The proxy gives the replayer a fixed address while each restart takes a fresh port.
  const proxy = await LinkProxy.start(replay.port, t.teardown);
  const image = path.join(dir, 'disk.img');
  const size = 96 * 2 ** 20;
  const s = await startServe(
    ['--image', `disk=${image}`, '--size', String(size), '--listen', '127.0.0.1:0', '--replicate-to', `ws://127.0.0.1:${proxy.port}`, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const watch = neverAhead(t, () => adminOf(s.stdout()), () => (replay ? adminOf(replay.stdout()) : undefined));
  let faultsDone = false;
  t.teardown(() => void (faultsDone = true));
  const writing = fioUntil(t, s.uri, () => faultsDone, { bs: '256k-4m', size, iodepth: 8 });

  const KILLS = 8;
  for (let k = 0; k < KILLS; k++) {
    t.ok(await proxy.waitLive(30_000), `the replicator reaches replayer #${k + 1}`);
    // Kill while batches flow: after at least 4 MiB more has crossed, plus a random moment.
    const from = proxy.forwarded;
    const deadline = Date.now() + 20_000;
    while (proxy.forwarded - from < 4 * 2 ** 20 && Date.now() < deadline) await sleep(10);
    await sleep(between(0, 400));
    const victim: Replaying = replay!;
    replay = undefined;
    victim.child.kill('SIGKILL');
    await victim.exited;
    await sleep(between(0, 1000));
    replay = await startReplay(replayArgs, t.teardown);
    proxy.target = replay.port;
  }
  faultsDone = true;
  const w = await writing;
  t.same(w.failures, [], `fio ran ${w.runs} times without an error`);
  await assertIdentical(t, image, path.join(replicaDir, 'disk.img'), s);
  const ahead = await watch();
  t.ok(ahead.samples > 10, `replica vs primary sampled ${ahead.samples} times`);
  t.same(ahead.violations, [], 'the replica was never ahead of the primary journal');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
  replay!.child.kill('SIGTERM');
  t.equal(await replay!.exited, 0, 'the last replayer stops cleanly');
});

t.test('a link dropped while the replayer applies a batch: the next link is welcomed where that batch really ended', async (t) => {
  // In process, so the moment is exact: the primary's connection dies while a large batch is being applied,
  // and the primary reconnects at once. Whatever seq the welcome names is where the primary resumes shipping;
  // the dropped link must not go on moving the replica behind the new link's back (two appliers, one image).
  const dir = t.testdir();
  const server = new ReplayServer({ dataDir: dir });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close());
  const url = `ws://127.0.0.1:${port}`;
  // Writes over 128 KiB go through the thread pool (smaller ones are applied synchronously): the batch takes
  // many event-loop turns, as large guest writes do.
  const N = 190;
  const LEN = 256 * 1024;
  const entries = Array.from({ length: N }, (_, i) => {
    const data = randomBytes(LEN);
    return { seq: i + 1, kind: EntryKind.WRITE, offset: i * LEN, length: LEN, crc: entryCrc(EntryKind.WRITE, i * LEN, LEN, data), ts: Date.now(), data };
  });
  const hello = encode({ v: PROTOCOL_VERSION, t: 'hello', volume: 'disk', volumeId: 'vol-race', size: SIZE });
  const applied = async () => (await server.status()).volumes.find((v) => v.volume === 'disk')?.appliedSeq ?? 0;
  /** Opens a link and says hello; resolves to the welcome's seq, or null if refused (e.g. busy). */
  const link = () =>
    new Promise<{ ws: WebSocket; welcome: number | null }>((resolve) => {
      const ws = new WebSocket(url);
      ws.on('error', () => undefined);
      ws.on('open', () => ws.send(hello));
      ws.on('message', (raw: Buffer) => {
        const m = decode(raw);
        if (m.t === 'welcome') resolve({ ws, welcome: m.appliedSeq });
      });
      ws.on('close', () => resolve({ ws, welcome: null }));
    });

  const first = await link();
  t.equal(first.welcome, 0, 'a new replica welcomes at seq 0');
  first.ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries }));
  const deadline = Date.now() + 20_000;
  while ((await applied()) === 0 && Date.now() < deadline) await sleep(1);
  const at = await applied();
  t.ok(at > 0 && at < N, `the batch is being applied (seq ${at} of ${N}) when the link drops`);
  first.ws.terminate();

  let second: { ws: WebSocket; welcome: number | null };
  for (;;) {
    second = await link();
    if (second.welcome !== null || Date.now() > deadline) break;
    await sleep(5);
  }
  t.not(second.welcome, null, 'the primary gets a link again');
  t.teardown(() => second.ws.terminate());
  await sleep(1000);
  t.equal(await applied(), second.welcome, `the replica stays at the welcomed seq ${second.welcome}: nothing of the dropped link is applied after it`);
});
