// The replayer's background durability sync (every syncBytes applied; the 1 s timer is off here, so which sync
// covers what is exact): it must not stop the replica applying while the fsync runs, must not let more than two
// SYNC_BYTES go unsynced, must not acknowledge as durable what the fsync did not cover, and a failed sync must
// drop the link with ERR_STORAGE and take the replica back to its last durable seq. Also here: a failed fsync
// at a FLUSH marker, a write failing part-way through a batch, and two primaries racing for a new volume. In
// process, with the replica's real FileDevice whose flush (or write) the test holds back (then lets the real
// one run) or makes fail once.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import WebSocket from 'ws';
import { entryCrc } from '../src/journal/entry.js';
import { EntryKind, type JournalEntry } from '../src/journal/types.js';
import { ReplayServer } from '../src/replayer/replay-server.js';
import { CloseCode, MAX_APPLIED_CRCS, PROTOCOL_VERSION, decode, encode } from '../src/replicator/protocol.js';

const SIZE = 64 * 2 ** 20;
const ENTRY = 2 ** 20;
/** Entries per message (4 MiB). */
const PER_MESSAGE = 4;
/** The replayer's bytes between background syncs, set small here (256 MiB by default). */
const SYNC_BYTES = 32 * 2 ** 20;

interface ReplicaVolume {
  device: { flush(): Promise<void> };
  state: { appliedSeq: number };
}

/**
 * Makes the replica's fsyncs that begin once `fromSeq` is applied go through `hook` (which then runs the real
 * one, or throws); earlier ones run as they are. The volume is reached through the server's volume table:
 * private, this is a fault-injection seam.
 */
async function hookFlush(server: ReplayServer, volume: string, fromSeq: number, hook: (real: () => Promise<void>) => Promise<void>): Promise<void> {
  const volumes = (server as unknown as { volumes: Map<string, Promise<ReplicaVolume>> }).volumes;
  const v = await volumes.get(volume);
  if (!v) throw new Error(`no volume ${volume}`);
  const real = v.device.flush.bind(v.device);
  v.device.flush = () => (v.state.appliedSeq >= fromSeq ? hook(real) : real());
}

/** A replay server on loopback (small SYNC_BYTES, no timer), closed at teardown. */
async function replayServer(t: Test) {
  const dir = t.testdir();
  const server = new ReplayServer({ dataDir: dir, syncBytes: SYNC_BYTES, syncIntervalMs: 0 });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close());
  return { dir, server, url: `ws://127.0.0.1:${port}` };
}

/** A hookFlush hook whose first fsync fails with EIO; the ones after it run for real. */
function failingOnce(): (real: () => Promise<void>) => Promise<void> {
  let failed = false;
  return async (real) => {
    if (!failed) {
      failed = true;
      throw Object.assign(new Error('fdatasync: input/output error (injected)'), { code: 'EIO' });
    }
    return real();
  };
}

/** A primary's side of one link: hello, then batches; records every ack and how the link closed. */
async function connect(url: string, volume: string) {
  const ws = new WebSocket(url);
  const acks: Array<{ seq: number; durableSeq: number }> = [];
  let closed: { code: number; reason: string } | undefined;
  const waiters = new Set<() => void>();
  const poke = () => waiters.forEach((w) => w());
  ws.on('error', () => undefined);
  ws.on('close', (code, reason) => {
    closed = { code, reason: reason.toString() };
    poke();
  });
  const welcome = await new Promise<number>((resolve, reject) => {
    ws.on('open', () => ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume, volumeId: `vol-${volume}`, size: SIZE })));
    ws.on('message', (raw: Buffer) => {
      const m = decode(raw);
      if (m.t === 'welcome') resolve(m.appliedSeq);
      if (m.t === 'ack') {
        acks.push({ seq: m.seq, durableSeq: m.durableSeq ?? 0 });
        poke();
      }
    });
    ws.on('close', () => reject(new Error('closed before the welcome')));
  });
  /** Resolves true once `pred` holds, false after `ms`. */
  const until = (pred: () => boolean, ms: number) =>
    new Promise<boolean>((resolve) => {
      if (pred()) return resolve(true);
      const check = () => {
        if (!pred()) return;
        waiters.delete(check);
        clearTimeout(timer);
        clearInterval(poll);
        resolve(true);
      };
      // Re-checked on every ack and close, and every 20 ms for conditions that are not about the link.
      const poll = setInterval(check, 20);
      const timer = setTimeout(() => {
        waiters.delete(check);
        clearInterval(poll);
        resolve(false);
      }, ms);
      waiters.add(check);
    });
  const applied = () => acks.reduce((m, a) => Math.max(m, a.seq), 0);
  const durable = () => acks.reduce((m, a) => Math.max(m, a.durableSeq), 0);
  return { ws, welcome, acks, applied, durable, until, closed: () => closed };
}

/** Entries first..last, 1 MiB each, cycling over the volume; the image they leave is tracked in `image`. */
function entries(first: number, last: number, data: Buffer, image: Buffer): JournalEntry[] {
  const out: JournalEntry[] = [];
  for (let seq = first; seq <= last; seq++) {
    const offset = ((seq * 7) % (SIZE / ENTRY)) * ENTRY;
    // Each entry's bytes differ (its seq in the first 8 bytes), so a lost or reordered one shows.
    const d = Buffer.from(data);
    d.writeBigUInt64BE(BigInt(seq), 0);
    d.copy(image, offset);
    out.push({ seq, kind: EntryKind.WRITE, offset, length: ENTRY, crc: entryCrc(EntryKind.WRITE, offset, ENTRY, d), ts: Date.now(), data: d });
  }
  return out;
}

function send(ws: WebSocket, list: JournalEntry[]): void {
  for (let i = 0; i < list.length; i += PER_MESSAGE) {
    ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries: list.slice(i, i + PER_MESSAGE) }));
  }
}

t.test('a sync after SYNC_BYTES runs while later batches are applied; at most two go unsynced; acks stay behind the fsync', async (t) => {
  const dir = t.testdir();
  const server = new ReplayServer({ dataDir: dir, syncBytes: SYNC_BYTES, syncIntervalMs: 0 });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  let open: () => void = () => undefined;
  const gate = new Promise<void>((r) => (open = r));
  t.teardown(async () => {
    open();
    await server.close();
  });
  const link = await connect(`ws://127.0.0.1:${port}`, 'disk');
  t.teardown(() => link.ws.terminate());
  t.equal(link.welcome, 0, 'a new replica');

  const perSync = SYNC_BYTES / ENTRY;
  // Every fsync of the replica from the end of batch A on waits for the gate, then runs for real.
  let flushes = 0;
  await hookFlush(server, 'disk', perSync, async (real) => {
    flushes++;
    await gate;
    return real();
  });

  const data = randomBytes(ENTRY);
  const image = Buffer.alloc(SIZE);
  // A: one SYNC_BYTES worth; its end starts a sync, which the gate holds.
  send(link.ws, entries(1, perSync, data, image));
  t.ok(await link.until(() => link.applied() >= perSync, 60_000), `batch A applied (seq ${link.applied()})`);
  t.ok(await link.until(() => flushes > 0, 10_000), 'a sync of the replica began');
  // B: one more message, while that sync cannot finish. It is applied (and acknowledged as applied, not durable).
  const b = perSync + PER_MESSAGE;
  send(link.ws, entries(perSync + 1, b, data, image));
  t.ok(await link.until(() => link.applied() >= b, 20_000), `batch B applied while the sync runs (acked seq ${link.applied()})`);
  t.equal(link.durable(), 0, 'nothing is acknowledged durable while the only sync is held');
  // C: with B, another SYNC_BYTES. At the end of its last message the apply path waits for the running sync:
  // that message is applied but not yet acknowledged, and D is not applied.
  const c = perSync * 2;
  send(link.ws, entries(b + 1, c, data, image));
  t.ok(await link.until(() => link.applied() >= c - PER_MESSAGE, 60_000), 'batch C applied up to its last message');
  const d = c + PER_MESSAGE;
  send(link.ws, entries(c + 1, d, data, image));
  t.notOk(await link.until(() => link.applied() >= c, 1500), 'then the apply path waits for the held sync: at most two SYNC_BYTES go unsynced');
  t.equal(link.applied(), c - PER_MESSAGE, 'acknowledged: everything before the message that reached the second SYNC_BYTES');
  t.equal(link.durable(), 0, 'still nothing acknowledged durable');

  open();
  t.ok(await link.until(() => link.applied() >= d, 30_000), 'with the sync done, D is applied');
  t.ok(await link.until(() => link.durable() >= c, 30_000), `then A's sync and C's are acknowledged durable (durable seq ${link.durable()})`);
  for (const a of link.acks) if (a.durableSeq > a.seq) t.fail(`an ack says durable ${a.durableSeq} beyond applied ${a.seq}`);
  t.ok(link.acks.some((a) => a.durableSeq === perSync), "A's sync was acknowledged at A's last seq");
  t.ok(link.durable() <= c, 'D (less than SYNC_BYTES, no timer here) is not claimed durable');
  t.ok(fs.readFileSync(path.join(dir, 'disk.img')).equals(image), 'the replica holds every entry in order');
});

t.test('a background sync that fails drops the link with ERR_STORAGE at once; the next link starts again from the last durable seq', async (t) => {
  const { dir, server, url } = await replayServer(t);
  const link = await connect(url, 'disk');
  t.teardown(() => link.ws.terminate());
  const perSync = SYNC_BYTES / ENTRY;
  // The fsync that begins once one SYNC_BYTES is applied fails, once.
  await hookFlush(server, 'disk', perSync, failingOnce());
  const data = randomBytes(ENTRY);
  const image = Buffer.alloc(SIZE);
  send(link.ws, entries(1, perSync, data, image));
  t.ok(await link.until(() => link.applied() >= perSync, 60_000), 'one SYNC_BYTES applied; its sync fails');
  t.ok(await link.until(() => link.closed() !== undefined, 10_000), 'the link is dropped without waiting for another batch');
  t.equal(link.closed()?.code, CloseCode.STORAGE, 'with the storage close code');
  t.match(link.closed()?.reason ?? '', /input\/output error/, 'naming the failure');
  t.ok(link.applied() <= perSync, `nothing after the failed sync was applied (acked seq ${link.applied()})`);
  t.equal(link.durable(), 0, 'nothing was acknowledged durable');

  // The primary reconnects. The failed fsync may have lost pages the kernel will not write again, so the replica
  // starts over from its last durable seq (0 here) and the primary sends everything after it again.
  const again = await connect(url, 'disk');
  t.teardown(() => again.ws.terminate());
  t.equal(again.welcome, 0, 'the next link is welcomed at the last durable seq, not the applied one');
  const end = perSync * 2;
  send(again.ws, entries(1, end, data, image));
  t.ok(await again.until(() => again.durable() >= end, 30_000), `the next SYNC_BYTES is synced and acknowledged durable (durable seq ${again.durable()})`);
  t.ok(fs.readFileSync(path.join(dir, 'disk.img')).equals(image), 'the replica holds every entry in order');
});

t.test('a FLUSH marker whose fsync fails drops the link; the next link starts from the last durable seq, not the marker', async (t) => {
  const { dir, server, url } = await replayServer(t);
  const link = await connect(url, 'disk');
  t.teardown(() => link.ws.terminate());
  const data = randomBytes(ENTRY);
  const image = Buffer.alloc(SIZE);
  // The marker's fsync (it begins once the marker is counted applied, at seq 5) fails, once.
  await hookFlush(server, 'disk', 5, failingOnce());
  const flush: JournalEntry = { seq: 5, kind: EntryKind.FLUSH, offset: 0, length: 0, crc: entryCrc(EntryKind.FLUSH, 0, 0), ts: Date.now() };
  link.ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries: [...entries(1, 4, data, image), flush] }));
  t.ok(await link.until(() => link.closed() !== undefined, 10_000), 'the link is dropped');
  t.equal(link.closed()?.code, CloseCode.STORAGE, 'with the storage close code');
  t.equal(link.durable(), 0, 'nothing was acknowledged durable');
  // A sync that works now (the timer's, say) must not record the marker's seq as durable: its pages may be lost.
  const again = await connect(url, 'disk');
  t.teardown(() => again.ws.terminate());
  t.equal(again.welcome, 0, 'the next link is welcomed at the last durable seq (0), not at the failed marker (5)');
  again.ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries: [...entries(1, 4, data, image), flush] }));
  t.ok(await again.until(() => again.durable() >= 5, 30_000), 'sent again, the marker is synced and acknowledged durable');
  t.ok(fs.readFileSync(path.join(dir, 'disk.img')).equals(image), 'the replica holds every entry');
});

t.test('a write that fails part-way through a large batch: the next welcome carries a history the primary accepts', async (t) => {
  const { server, url } = await replayServer(t);
  const link = await connect(url, 'disk');
  t.teardown(() => link.ws.terminate());
  // The replica's disk fills after 150 of a batch's 300 small writes, once.
  const volumes = (server as unknown as { volumes: Map<string, Promise<{ device: { writeManyNow(o: number[], d: Buffer[]): void } }>> }).volumes;
  const device = (await volumes.get('disk'))!.device;
  const real = device.writeManyNow.bind(device);
  let full = true;
  device.writeManyNow = (offsets, datas) => {
    if (!full || offsets.length < 150) return real(offsets, datas);
    full = false;
    real(offsets.slice(0, 150), datas.slice(0, 150));
    throw Object.assign(new Error('ENOSPC: no space left on device (injected)'), { code: 'ENOSPC', written: 150 });
  };
  const small: JournalEntry[] = [];
  for (let seq = 1; seq <= 300; seq++) {
    const d = randomBytes(4096);
    const offset = seq * 4096;
    small.push({ seq, kind: EntryKind.WRITE, offset, length: 4096, crc: entryCrc(EntryKind.WRITE, offset, 4096, d), ts: Date.now(), data: d });
  }
  link.ws.send(encode({ v: PROTOCOL_VERSION, t: 'entries', entries: small }));
  t.ok(await link.until(() => link.closed() !== undefined, 10_000), 'the link is dropped');
  t.equal(link.closed()?.code, CloseCode.STORAGE, 'with the storage close code');

  // The primary's next link: its welcome must decode (at most MAX_APPLIED_CRCS CRCs), or it never reconnects.
  const ws = new WebSocket(url);
  t.teardown(() => ws.terminate());
  const raw = await new Promise<Buffer>((resolve, reject) => {
    ws.on('open', () => ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume: 'disk', volumeId: 'vol-disk', size: SIZE })));
    ws.once('message', (m: Buffer) => resolve(m));
    ws.on('error', reject);
  });
  let welcome: ReturnType<typeof decode> | undefined;
  t.doesNotThrow(() => (welcome = decode(raw)), 'the welcome is one the primary accepts');
  t.equal(welcome?.t, 'welcome');
  if (welcome?.t !== 'welcome') return;
  t.equal(welcome.appliedSeq, 150, 'at the last write that reached the replica');
  t.ok((welcome.appliedCrcs?.length ?? 0) <= MAX_APPLIED_CRCS, `carrying ${welcome.appliedCrcs?.length} CRCs`);
  t.equal(welcome.appliedCrcs?.at(-1), small[149].crc, "the last one is seq 150's");
});

t.test('two primaries saying hello to a new volume at once: one is welcomed, the other refused as busy', async (t) => {
  const { url } = await replayServer(t);
  const hello = () =>
    new Promise<{ ws: WebSocket; t: string; code?: string }>((resolve) => {
      const ws = new WebSocket(url);
      t.teardown(() => ws.terminate());
      ws.on('error', () => undefined);
      ws.on('open', () => ws.send(encode({ v: PROTOCOL_VERSION, t: 'hello', volume: 'disk', volumeId: 'vol-disk', size: SIZE })));
      ws.once('message', (m: Buffer) => {
        const msg = decode(m);
        resolve({ ws, t: msg.t, code: msg.t === 'error' ? msg.code : undefined });
      });
    });
  const [a, b] = await Promise.all([hello(), hello()]);
  t.same([a, b].map((x) => x.code ?? x.t).sort(), ['ERR_VOLUME_BUSY', 'welcome'], 'one welcome, one refusal');
  const winner = a.t === 'welcome' ? a : b;
  const loser = winner === a ? b : a;
  // The refused link's close must not free the volume its rival holds.
  loser.ws.terminate();
  await new Promise((r) => setTimeout(r, 200));
  const third = await hello();
  t.equal(third.code, 'ERR_VOLUME_BUSY', 'a third primary is refused while the first is connected');
  winner.ws.close();
  await new Promise((r) => winner.ws.once('close', r));
  await new Promise((r) => setTimeout(r, 200));
  const fourth = await hello();
  t.equal(fourth.t, 'welcome', 'once the first has gone, the next is welcomed');
});
