// Replication over a slow, far "Internet" link, with real processes: a TCP proxy in this test delays every
// chunk ~25 ms each way (~50 ms RTT) and lets serve→replayer traffic through at ~4 MiB/s (the replayer's acks
// are only delayed). A client writes 48 MiB (1 MiB and 4 KiB writes, overlapping) and FLUSHes. What a user
// relies on: the client's writes and FLUSH finish long before the link could carry them (the primary never
// waits for the remote); meanwhile serve's status shows the lag, with a believable age; the replica becomes
// byte-identical to the primary; the saturated link is never taken for dead (one connection from start to end,
// no "link is dead"/"reconnecting" lines); and afterwards the replica is `continuous` with lag 0. The second
// test queues 20k small (1 KiB) writes behind 24 MiB of large ones: tens of thousands of entries in flight,
// and still `continuous` with lag 0 once they are applied (on 2b1fdb6 it stayed `backlog` at lag 0).
// BLOCKFERRY_WAN_RATE=BYTES_PER_SECOND runs both over another rate (e.g. 524288 for a 4 Mbit/s uplink).
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { sameFiles, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { adminOf, getStatus, startReplay, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
/** One-way delay added to every chunk, in each direction. */
const DELAY_MS = 25;
/** The primary→replica rate, bytes per second. */
const RATE = Number(process.env.BLOCKFERRY_WAN_RATE ?? 4 * 2 ** 20);
/** What the token bucket lets through at once (a little burst, as a real link's queue gives). */
const BURST = 32 * 1024;
/** Bytes a direction may hold (waiting for tokens or for their delay) before it stops reading its source. */
const QUEUE_HIGH = 512 * 1024;
/** Pieces the rate-limited direction schedules at a time, so the rate is smooth even for 64 KiB reads. */
const PIECE = 16 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const DEAD_LINK = /link is dead|reconnecting|nothing heard|dropping the link|reads none of its replies/i;

type Teardown = (fn: () => unknown) => void;

/**
 * One direction of the link: bytes read from `src` are written to `dst` in order, each chunk `delayMs` after
 * the token bucket (`rate` bytes/s, `burst` bytes deep; no limit when rate is 0) let it onto the wire. Reading
 * `src` pauses while more than QUEUE_HIGH bytes wait here or `dst` asks to drain, so nothing buffers unboundedly.
 */
class Direction {
  private readonly queue: Array<{ at: number; buf: Buffer }> = [];
  private queued = 0;
  /** GCRA form of the token bucket: when the bucket is next "empty" (ms, performance.now() clock). */
  private tat = 0;
  private timer: NodeJS.Timeout | undefined;
  forwarded = 0;
  maxQueued = 0;
  constructor(
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
    private readonly o: { delayMs: number; rate: number; burst: number },
  ) {
    src.on('data', (d: Buffer) => this.take(d));
    dst.on('drain', () => this.maybeResume());
  }

  private take(d: Buffer): void {
    for (let off = 0; off < d.length; off += PIECE) {
      const buf = d.subarray(off, Math.min(d.length, off + PIECE));
      const now = performance.now();
      let onWire = now;
      if (this.o.rate > 0) {
        // The piece leaves once the bucket holds its tokens; the bucket never holds more than `burst`.
        const start = Math.max(this.tat, now - (this.o.burst / this.o.rate) * 1000);
        this.tat = start + (buf.length / this.o.rate) * 1000;
        onWire = Math.max(now, this.tat);
      }
      this.queue.push({ at: onWire + this.o.delayMs, buf });
      this.queued += buf.length;
    }
    this.maxQueued = Math.max(this.maxQueued, this.queued);
    if (this.queued > QUEUE_HIGH) this.src.pause();
    this.schedule();
  }

  private schedule(): void {
    if (this.timer || this.queue.length === 0) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.pump();
    }, Math.max(0, this.queue[0].at - performance.now()));
  }

  private pump(): void {
    const now = performance.now();
    while (this.queue.length > 0 && this.queue[0].at <= now) {
      const { buf } = this.queue.shift()!;
      this.queued -= buf.length;
      this.forwarded += buf.length;
      if (!this.dst.destroyed) this.dst.write(buf);
    }
    this.maybeResume();
    this.schedule();
  }

  private maybeResume(): void {
    if (this.src.isPaused() && this.queued <= QUEUE_HIGH / 2 && !this.dst.writableNeedDrain && !this.src.destroyed) this.src.resume();
  }

  close(): void {
    clearTimeout(this.timer);
    this.queue.length = 0;
  }
}

/** A TCP proxy on loopback playing a WAN link between serve's replicator and the replayer. */
class WanLink {
  private readonly links = new Set<{ a: net.Socket; b: net.Socket; up: Direction; down: Direction }>();
  /** Connections accepted (the replicator's connection attempts) and connections that ended. */
  accepted = 0;
  closed = 0;
  /** Totals over every connection: primary→replica and back. */
  private upDone = 0;
  private upMaxQueued = 0;
  private constructor(
    private readonly server: net.Server,
    private readonly rate: number,
  ) {}

  static async start(target: number, teardown: Teardown, rate: number): Promise<WanLink> {
    const server = net.createServer();
    const link = new WanLink(server, rate);
    server.on('connection', (a) => link.onConnection(a, target));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    teardown(() => link.close());
    return link;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  get up(): number {
    let n = this.upDone;
    for (const l of this.links) n += l.up.forwarded;
    return n;
  }

  get maxQueuedUp(): number {
    let n = this.upMaxQueued;
    for (const l of this.links) n = Math.max(n, l.up.maxQueued);
    return n;
  }

  private onConnection(a: net.Socket, target: number): void {
    this.accepted++;
    const b = net.connect(target, '127.0.0.1');
    a.setNoDelay(true);
    b.setNoDelay(true);
    const link = { a, b, up: new Direction(a, b, { delayMs: DELAY_MS, rate: this.rate, burst: BURST }), down: new Direction(b, a, { delayMs: DELAY_MS, rate: 0, burst: 0 }) };
    this.links.add(link);
    const drop = () => {
      if (!this.links.delete(link)) return;
      this.closed++;
      this.upDone += link.up.forwarded;
      this.upMaxQueued = Math.max(this.upMaxQueued, link.up.maxQueued);
      link.up.close();
      link.down.close();
      a.destroy();
      b.destroy();
    };
    for (const s of [a, b]) {
      s.on('error', () => undefined);
      s.on('close', drop);
    }
  }

  close(): Promise<void> {
    for (const l of this.links) {
      l.up.close();
      l.down.close();
      l.a.destroy();
      l.b.destroy();
    }
    this.links.clear();
    return new Promise((r) => this.server.close(() => r()));
  }
}


/** Serve's view of its one volume and replica. */
async function replicaStatus(admin: string): Promise<{ journal: any; replica: any }> {
  const v = (await getStatus(admin)).volumes[0];
  return { journal: v.journal, replica: v.replicas[0] };
}

/** replay, the WAN proxy in front of it, and serve replicating through the proxy; all stopped in teardown. */
async function setup(t: { testdir(): string; teardown: Teardown }, rate = RATE) {
  const dir = t.testdir();
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir, '--admin', '127.0.0.1:0'], t.teardown);
  // Its log is on stderr (the helper keeps only stdout for replay): from here on, before any link exists.
  let replayLog = '';
  replay.child.stderr!.on('data', (d) => (replayLog += d));
  const wan = await WanLink.start(replay.port, t.teardown, rate);
  const image = path.join(dir, 'disk.img');
  const serve = await startServe(
    ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', `ws://127.0.0.1:${wan.port}`, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const serveAdmin = adminOf(serve.stdout());
  // The link is up (over the proxy) before any workload: a new replica of a new image needs no digest pass.
  let last: unknown;
  const linked = await until(
    async () => {
      last = await replicaStatus(serveAdmin);
      return (last as { replica: { state: string } }).replica.state === 'continuous';
    },
    20_000,
    100,
  );
  return { replay, replayLog: () => replayLog, wan, serve, serveAdmin, replayAdmin: adminOf(replay.stdout()), image, replica: path.join(replicaDir, 'disk.img'), linked, last };
}

/** Sends `ops` pipelined 32 deep on one connection, then a FLUSH; resolves to the seconds it all took. */
async function writeAll(t: { teardown: Teardown }, port: number, ops: Array<{ off: number; len: number }>, data: Buffer): Promise<number> {
  const client = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  t.teardown(() => client.destroy());
  const t0 = performance.now();
  const inflight = new Set<Promise<void>>();
  let at = 0;
  for (const o of ops) {
    const p = client.write(o.off, data.subarray(at, at + o.len));
    at += o.len;
    inflight.add(p);
    void p.finally(() => inflight.delete(p)).catch(() => undefined);
    if (inflight.size >= 32) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  await client.flush();
  const seconds = (performance.now() - t0) / 1000;
  await client.close();
  return seconds;
}

type Env = Awaited<ReturnType<typeof setup>>;

/**
 * What every run ends with: serve says the replica applied everything, the files are byte-identical, then
 * (acks may take a moment) `continuous` with lag 0; the link was never dropped or taken for dead.
 */
async function assertConverged(t: Test, e: Env, o: { writesEnd: number; linkSeconds: number; states: Set<string> }): Promise<number> {
  const convergeMs = (o.linkSeconds * 2 + 15) * 1000;
  let last: unknown;
  const caughtUp = await until(
    async () => {
      const s = await replicaStatus(e.serveAdmin);
      last = s;
      o.states.add(s.replica.state);
      return s.replica.appliedSeq === s.journal.committedSeq;
    },
    convergeMs,
    250,
  );
  const catchUpSeconds = (Date.now() - o.writesEnd) / 1000;
  t.ok(caughtUp, `serve reports the replica applied everything ${catchUpSeconds.toFixed(1)} s after the FLUSH (allowed ${(convergeMs / 1000).toFixed(0)} s)`, { last });
  t.ok(await until(() => sameFiles(e.image, e.replica), 10_000, 250), 'the replica is byte-identical to the primary image');

  const settled = await until(
    async () => {
      const s = await replicaStatus(e.serveAdmin);
      last = s;
      return s.replica.state === 'continuous' && s.replica.lagEntries === 0 && s.replica.lagBytes === 0 && s.replica.lagSeconds === 0;
    },
    5_000,
    100,
  );
  t.ok(settled, 'then serve reports the replica continuous with lag 0 entries, 0 bytes, 0 s', { last });
  t.comment(`replica states seen after the FLUSH: ${[...o.states].join(', ')}`);
  const rv = (await getStatus(e.replayAdmin)).volumes.find((v: { volume: string }) => v.volume === 'disk');
  t.match(rv, { connected: true, consistent: true }, 'the replayer has the primary connected and the replica consistent');

  // The saturated link was never taken for dead, by either side.
  t.equal(e.wan.accepted, 1, 'one connection through the proxy from start to end (never reconnected)');
  t.equal(e.wan.closed, 0, 'the link never closed');
  const serveDead = e.serve.stderr().split('\n').filter((l) => DEAD_LINK.test(l));
  const replayDead = e.replayLog().split('\n').filter((l) => DEAD_LINK.test(l));
  t.same(serveDead, [], "serve's log has no dead-link or reconnect line");
  t.same(replayDead, [], "replay's log has no dead-link line");
  t.ok(e.wan.maxQueuedUp <= QUEUE_HIGH + 64 * 1024 + PIECE, `the proxy held at most ${(e.wan.maxQueuedUp / 1024).toFixed(0)} KiB (backpressure, not buffering)`);
  return catchUpSeconds;
}

async function stopBoth(t: Test, e: Env): Promise<void> {
  t.equal(await e.serve.stop(), 0, 'serve stops cleanly');
  e.replay.child.kill('SIGTERM');
  t.equal(await e.replay.exited, 0, 'replay stops cleanly');
}

const MiB = (n: number) => (n / 2 ** 20).toFixed(1);
const LINK = `a saturated ${MiB(RATE)} MiB/s, ${2 * DELAY_MS} ms RTT link`;

t.test(`${LINK}: the primary never waits, the link stays up, the replica converges`, async (t) => {
  const e = await setup(t);
  t.ok(e.linked, 'the replica link comes up through the WAN proxy (state continuous)', { last: e.last });
  if (!e.linked) return;

  // 4 rounds of 10 x 1 MiB (every 1.5 MiB, up to 59.5 MiB) and 512 x 4 KiB (random, anywhere, overlapping the big
  // ones). Data made beforehand: only the writes are timed.
  const ops: Array<{ off: number; len: number }> = [];
  for (let round = 0; round < 4; round++) {
    for (let i = 0; i < 10; i++) ops.push({ off: (round * 10 + i) * 1.5 * 2 ** 20, len: 2 ** 20 });
    for (let i = 0; i < 512; i++) ops.push({ off: Math.floor(Math.random() * (SIZE / 4096)) * 4096, len: 4096 });
  }
  const total = ops.reduce((n, o) => n + o.len, 0);
  const data = randomBytes(total);
  const linkSeconds = total / RATE;

  const upBefore = e.wan.up;
  const writesStart = Date.now();
  const writeSeconds = await writeAll(t, e.serve.port, ops, data);
  const writesEnd = Date.now();
  const carriedAtFlush = e.wan.up - upBefore;

  // (1) The primary did not wait for the link: a primary that waited for the replica's acks (synchronous
  // replication) would take the link's time here, and its FLUSH reply would come after the bytes crossed.
  t.ok(
    writeSeconds < linkSeconds / 3,
    `${ops.length} writes (${MiB(total)} MiB) and a FLUSH took ${writeSeconds.toFixed(2)} s; the link needs ${linkSeconds.toFixed(1)} s to carry them`,
  );
  t.ok(carriedAtFlush < total / 2, `when the FLUSH was answered the link had carried ${MiB(carriedAtFlush)} of ${MiB(total)} MiB`);

  // (2) While the link is behind, status says so, with a believable age: the oldest change the replica lacks
  // was written between writesStart and writesEnd. Sampled until a sample at least 2 s after the FLUSH.
  const behind: Array<{ ms: number; state: string; lagEntries: number; lagBytes: number | null; lagSeconds: number; lo: number; hi: number }> = [];
  const states = new Set<string>();
  for (;;) {
    const before = Date.now();
    const { replica: r } = await replicaStatus(e.serveAdmin);
    const after = Date.now();
    states.add(r.state);
    if (r.lagEntries === 0) break;
    behind.push({
      ms: after - writesEnd,
      state: r.state,
      lagEntries: r.lagEntries,
      lagBytes: r.lagBytes,
      lagSeconds: r.lagSeconds,
      lo: (before - writesEnd) / 1000 - 0.25,
      hi: (after - writesStart) / 1000 + 0.25,
    });
    if (after - writesEnd >= 2_000) break;
    await sleep(250);
  }
  t.ok(behind.length > 0, `serve's status showed the replica behind after the FLUSH (${behind.length} samples, states: ${[...states].join(', ')})`);
  const late = behind[behind.length - 1];
  if (late) {
    t.ok(late.ms >= 2_000, `${(late.ms / 1000).toFixed(1)} s after the FLUSH the replica still lags (the link is the bottleneck)`, late);
    t.ok(late.lagEntries > 0 && (late.lagBytes ?? 0) > 0, `lag shown: ${late.lagEntries} entries, ${MiB(late.lagBytes ?? 0)} MiB, ${late.lagSeconds} s`, late);
    // Seconds and more than a window of bytes behind, with the lag only shrinking at the link's pace: backlog.
    t.equal(late.state, 'backlog', 'the replica is reported in backlog while it is that far behind', late);
    t.ok((late.lagBytes ?? 0) <= total * 1.1, 'lagBytes is no more than was written (plus entry headers)', late);
  }
  const badAges = behind.filter((s) => !(s.lagSeconds >= s.lo && s.lagSeconds <= s.hi));
  t.same(badAges, [], 'every lagSeconds lies between the age of the last write and the age of the first', { samples: behind });

  // (3), (4), (5): convergence, byte-identical, link never dropped, continuous with lag 0 after.
  const catchUpSeconds = await assertConverged(t, e, { writesEnd, linkSeconds, states });
  // The proxy really was the bottleneck: the link carried the data no faster than its rate allows.
  const carried = e.wan.up - upBefore;
  t.ok(
    catchUpSeconds + writeSeconds >= (carried / RATE) * 0.9,
    `the link carried ${MiB(carried)} MiB in ${(catchUpSeconds + writeSeconds).toFixed(1)} s (${(carried / RATE).toFixed(1)} s at the rate)`,
  );
  await stopBoth(t, e);
});

t.test(`${LINK}, 1 KiB writes queued behind 1 MiB ones: once caught up the replica is continuous again`, async (t) => {
  // Small writes make many entries per byte. Queued behind 24 MiB of large writes, thousands of them are still
  // in flight when the last batch leaves; once they are applied the status must say so, not keep the state it
  // had while they travelled.
  const e = await setup(t);
  t.ok(e.linked, 'the replica link comes up through the WAN proxy (state continuous)', { last: e.last });
  if (!e.linked) return;
  const ops = [
    ...Array.from({ length: 24 }, (_, i) => ({ off: i * 2 * 2 ** 20, len: 2 ** 20 })),
    ...Array.from({ length: 20_480 }, () => ({ off: Math.floor(Math.random() * (SIZE / 1024)) * 1024, len: 1024 })),
  ];
  const total = ops.reduce((n, o) => n + o.len, 0);
  const writeSeconds = await writeAll(t, e.serve.port, ops, randomBytes(total));
  const writesEnd = Date.now();
  t.comment(`${ops.length} writes (${MiB(total)} MiB) and a FLUSH took ${writeSeconds.toFixed(2)} s`);
  const states = new Set<string>();
  const { replica: r } = await replicaStatus(e.serveAdmin);
  states.add(r.state);
  t.ok(r.lagEntries > 0, `right after the FLUSH the replica lags ${r.lagEntries} entries, ${MiB(r.lagBytes ?? 0)} MiB (${r.state})`, r);
  await assertConverged(t, e, { writesEnd, linkSeconds: total / RATE, states });
  await stopBoth(t, e);
});

/** Below this a 4 MiB batch takes longer to cross than the primary's 6 s ping timeout. */
const SLOW_RATE = 400 * 1024;

t.test(`a ${(SLOW_RATE / 1024).toFixed(0)} KiB/s link, slower than one batch in the ping timeout: never taken for dead, the replica converges`, async (t) => {
  // Serve's ping waits behind the batches on the wire, and the replica acknowledges a batch only once all of it
  // arrived: at this rate serve took the link for dead every ~10 s, and the resent batch could stall for good.
  const e = await setup(t, SLOW_RATE);
  t.ok(e.linked, 'the replica link comes up through the WAN proxy (state continuous)', { last: e.last });
  if (!e.linked) return;
  const ops = Array.from({ length: 10 }, (_, i) => ({ off: i * 3 * 2 ** 20, len: 2 ** 20 }));
  const total = ops.reduce((n, o) => n + o.len, 0);
  const writeSeconds = await writeAll(t, e.serve.port, ops, randomBytes(total));
  const writesEnd = Date.now();
  const linkSeconds = total / SLOW_RATE;
  t.ok(writeSeconds < linkSeconds / 3, `${MiB(total)} MiB and a FLUSH took ${writeSeconds.toFixed(2)} s; the link needs ${linkSeconds.toFixed(0)} s`);
  await assertConverged(t, e, { writesEnd, linkSeconds, states: new Set() });
  await stopBoth(t, e);
});
