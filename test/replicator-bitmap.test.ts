// Switching an absent replica to the dirty bitmap over a journal too large to walk in one step: at no moment
// may the journal let go of an entry whose change the bitmap does not hold yet (the returning replica is then
// compared over the bitmap's regions only, and a change outside them would never reach it). And the writes
// that wait for room meanwhile get it as the walk goes, not only when all of it is done.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { Journal } from '../src/journal/journal.js';
import { EntryKind } from '../src/journal/types.js';
import { Replicator } from '../src/replicator/replicator.js';
import { CHUNK_BYTES } from '../src/replicator/chunk-hash.js';

const MiB = 2 ** 20;

/** A port with nothing listening: the replica stays away. */
async function closedPort(): Promise<number> {
  const srv = net.createServer().listen(0, '127.0.0.1');
  await new Promise((r) => srv.once('listening', r));
  const { port } = srv.address() as net.AddressInfo;
  await new Promise((r) => srv.close(r));
  return port;
}

t.test('the bitmap walk lets the journal go only of what it has marked, and waiting writes go on during it', async (t) => {
  // 640 MiB of 1 MiB entries: ten of the walk's 64 MiB steps.
  const j = await Journal.open({ dir: path.join(t.testdir(), 'journal'), maxBytes: 640 * MiB });
  t.teardown(() => j.close());
  const size = 1024 * MiB;
  const source = { hashChunks: async () => Buffer.alloc(0), captureRange: async () => 0 };
  const r = new Replicator({ url: `ws://127.0.0.1:${await closedPort()}`, volume: 'v', volumeId: 'vid', size, journal: j, source });
  r.start();
  t.teardown(() => r.stop(0));
  const internals = r as unknown as { dirty?: Uint8Array; walk?: unknown };
  // Entry seq n writes MiB n - 1: its first chunk tells whether the bitmap holds it.
  const chunkOf = (seq: number) => ((seq - 1) * MiB) / CHUNK_BYTES;
  let seq = 0;
  const data = randomBytes(MiB);
  const append = () => {
    seq++;
    return j.append(EntryKind.WRITE, (seq - 1) * MiB, MiB, data).done;
  };
  // Fill the journal to just below its cap (nothing waits yet), keeping the image's checkpoint at the head:
  // only the replica's hold keeps the entries.
  const room = (n: number) => j.stats.storedBytes + n * (MiB + 64) <= j.maxBytes;
  while (room(8)) await Promise.all(Array.from({ length: 8 }, append));
  while (room(1)) await append();
  await j.setCheckpoint(j.stats.committedSeq);
  const held = () => j.consumers().find((c) => c.id === r.consumerId)!.ackedSeq;
  t.equal(held(), 0, 'the away replica holds the whole journal');

  // The journal fills: the walk starts. More writes arrive while it runs, and wait for room.
  const waiting = Array.from({ length: 24 }, append);
  let violations = 0;
  let firstViolation = '';
  let admittedDuringWalk = 0;
  let done = 0;
  for (const w of waiting) void w.then(() => done++);
  let turns = 0;
  while ((internals.walk || !internals.dirty) && turns++ < 10_000) {
    const through = held();
    const dirty = internals.dirty;
    for (let s = 1; s <= through; s++) {
      if (!dirty || !dirty[chunkOf(s)]) {
        if (violations++ === 0) firstViolation = `seq ${s} let go (held through ${through}) but not in the bitmap`;
        break;
      }
    }
    if (internals.walk) admittedDuringWalk = Math.max(admittedDuringWalk, done);
    await new Promise((r) => setImmediate(r));
  }
  t.equal(violations, 0, `the journal never let go of an entry the bitmap lacked${firstViolation ? ` (${firstViolation})` : ''}`);
  t.ok(admittedDuringWalk > 0, `writes waiting for room went on during the walk (${admittedDuringWalk} of 24 done before it ended)`);
  await Promise.all(waiting);
  const dirty = internals.dirty!;
  const missing = Array.from({ length: seq }, (_, i) => i + 1).filter((s) => !dirty[chunkOf(s)]);
  t.same(missing, [], 'every change is in the bitmap');
  t.equal(j.stats.committedSeq, seq, 'every write was committed');
});
