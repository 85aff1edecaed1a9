// A bounded fuzz run against the replayer's port: random frames, mutated hellos, mutated batches (wrong
// types, huge and negative numbers, bad CRCs, gaps, duplicates, data of the wrong length), text frames and one
// oversized frame. Every hostile connection must end in a close, the replayer must stay up, nothing may be
// written outside its data directory, and afterwards a real primary still replicates to byte-identity.
import t from 'tap';
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import WebSocket from 'ws';
import { entryCrc } from '../src/journal/entry.js';
import { encode, PROTOCOL_VERSION } from '../src/replicator/protocol.js';
import { Packr } from 'msgpackr';
import { sameFiles, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { startReplay, startServe } from './helpers/processes.js';

const packr = new Packr({ useRecords: false, mapsAsObjects: true });
const INPUTS = Number(process.env.FUZZ_INPUTS ?? 3000);
const VOLUME_SIZE = 4 * 2 ** 20;

const pick = <T>(xs: T[]): T => xs[randomInt(xs.length)];
const weird = (): unknown =>
  pick<unknown>([
    -1, 0, 1, 2 ** 53, -(2 ** 31), 1.5, NaN, null, true, '', 'x'.repeat(300), '../../etc/passwd', [], {}, randomBytes(randomInt(64)),
    { nested: { deep: [1, 2, 3] } }, VOLUME_SIZE, VOLUME_SIZE + 1,
  ]);

function goodEntry(seq: number): Record<string, unknown> {
  const data = randomBytes(512);
  const offset = randomInt(0, VOLUME_SIZE - 512);
  return { seq, kind: 1, offset, length: 512, crc: entryCrc(1, offset, 512, data), ts: Date.now(), data };
}

/** One hostile input: a list of frames to send on a fresh connection. */
function input(volume: string): Array<Buffer | string> {
  const hello = { v: PROTOCOL_VERSION, t: 'hello', volume, volumeId: 'fuzz-primary', size: VOLUME_SIZE };
  switch (randomInt(8)) {
    case 0:
      return [randomBytes(randomInt(1, 200))];
    case 1:
      return ['{"v":1,"t":"hello"}']; // a text frame
    case 2: {
      const h: Record<string, unknown> = { ...hello };
      h[pick(['v', 't', 'volume', 'volumeId', 'size', 'role', 'token'])] = weird();
      return [packr.pack(h)];
    }
    case 3: {
      const e = goodEntry(1);
      e[pick(['seq', 'kind', 'offset', 'length', 'crc', 'data'])] = weird();
      return [encode(hello as never), packr.pack({ v: 1, t: 'entries', entries: [e] })];
    }
    case 4: {
      const e = goodEntry(1);
      (e.data as Buffer)[randomInt(512)] ^= 0xff; // bad CRC
      return [encode(hello as never), packr.pack({ v: 1, t: 'entries', entries: [e] })];
    }
    case 5:
      return [encode(hello as never), packr.pack({ v: 1, t: 'entries', entries: [goodEntry(randomInt(2, 1000))] })]; // gap
    case 6:
      return [encode(hello as never), packr.pack({ v: 1, t: pick(['digests?', 'resync', 'synced', 'ack', 'nope']), id: weird(), first: weird(), count: weird(), fromSeq: weird(), seq: weird() })];
    default: {
      const b = Buffer.from(packr.pack({ v: 1, t: 'entries', entries: [goodEntry(1), goodEntry(2)] }));
      for (let i = 0; i < 4; i++) b[randomInt(b.length)] = randomInt(256);
      return [encode(hello as never), b];
    }
  }
}

function send(url: string, frames: Array<Buffer | string>): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => ws.terminate(), 5000);
    ws.on('open', () => {
      for (const f of frames) ws.send(f);
      // Well-formed but unanswerable inputs leave the connection open: close from our side after a moment.
      setTimeout(() => ws.close(), 200);
    });
    ws.on('error', () => undefined);
    ws.on('close', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

t.test(`fuzz the replayer port with ${INPUTS} hostile inputs; it stays up and still replicates exactly`, async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replicas');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data], t.teardown);
  const codes = new Map<number, number>();
  let sent = 0;
  const volumes = ['fuzzvol', 'fuzz.two', '../escape', 'a/b', ''];
  for (let i = 0; i < INPUTS; i += 8) {
    const batch = [];
    for (let k = 0; k < 8 && i + k < INPUTS; k++) batch.push(send(replay.url, input(pick(volumes))));
    for (const code of await Promise.all(batch)) codes.set(code, (codes.get(code) ?? 0) + 1);
    sent += batch.length;
  }
  // One frame over the 64 MiB message limit.
  const big = await send(replay.url, [Buffer.alloc(65 * 2 ** 20)]);
  t.equal(big, 1009, 'an oversized frame is refused with 1009 (message too big)');
  t.comment(`fuzz: ${sent} inputs; close codes ${JSON.stringify(Object.fromEntries(codes))}`);
  t.equal(replay.child.exitCode, null, `the replayer is still running after ${sent + 1} hostile inputs`);
  const names = fs.readdirSync(data).filter((f) => !/^[A-Za-z0-9][A-Za-z0-9._-]*\.(img|state\.mdb|state\.mdb-lock)$|^replay\.pid$/.test(f));
  t.same(names, [], 'nothing but valid volume files in the data directory');
  t.notOk(fs.existsSync(path.join(dir, 'escape.img')) || fs.existsSync(path.join(dir, 'escape.state.mdb')), 'no path escaped the data directory');

  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `real=${image}`, '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', replay.url], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'real' });
  for (let i = 0; i < 32; i++) await c.write(randomInt(0, 8 * 2 ** 20 - 8192), randomBytes(randomInt(1, 8192)));
  await c.flush();
  await c.close();
  const replica = path.join(data, 'real.img');
  const same = await until(() => sameFiles(image, replica), 20_000, 100);
  t.ok(same, 'afterwards a real primary replicates and the replica equals it byte for byte');
  t.equal(await s.stop(), 0, 'serve stops cleanly');
});
