// Micro-benchmark of FileDevice alone (no NBD): 4 KiB random and 1 MiB sequential reads/writes on a fully
// allocated 1 GiB file, all synchronous (syncThreshold=Infinity) vs all thread pool (syncThreshold=0).
// Used to choose DEFAULT_SYNC_THRESHOLD. Run after `npx tsc -p .`: node bench/device-micro.mjs [DIR]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomFillSync } from 'node:crypto';
import { FileDevice } from '../dist/device/file-device.js';

const SIZE = 2 ** 30;
/** Seconds per case: long enough to smooth noise, short enough for the whole run to take ~20 s. */
const SECONDS = Number(process.env.SECONDS_PER_CASE ?? 2);
/** Requests in flight, like an NBD client with a deep queue. */
const DEPTH = 16;

const dir = fs.mkdtempSync(path.join(process.argv[2] ?? os.tmpdir(), 'bf-micro-'));
const file = path.join(dir, 'full.img');
const fd = fs.openSync(file, 'w');
const chunk = randomFillSync(Buffer.alloc(4 * 2 ** 20));
for (let off = 0; off < SIZE; off += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, off);
fs.fsyncSync(fd);
fs.closeSync(fd);

async function run(dev, kind, bs) {
  const blocks = SIZE / bs;
  let seq = 0;
  let ops = 0;
  const buf = randomFillSync(Buffer.alloc(bs));
  const end = performance.now() + SECONDS * 1000;
  const worker = async () => {
    while (performance.now() < end) {
      const blk = kind.startsWith('seq') ? seq++ % blocks : Math.floor(Math.random() * blocks);
      if (kind.endsWith('read')) await dev.read(blk * bs, bs);
      else await dev.write(blk * bs, buf);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  return ops / SECONDS;
}

const results = [];
try {
  for (const [mode, syncThreshold] of [['sync', Infinity], ['pool', 0]]) {
    const dev = await FileDevice.open({ path: file, syncThreshold });
    for (const [kind, bs] of [['rand-read', 4096], ['rand-write', 4096], ['seq-read', 2 ** 20], ['seq-write', 2 ** 20]]) {
      const iops = await run(dev, kind, bs);
      const row = { mode, kind, bs, iops: Math.round(iops), mibps: Math.round((iops * bs) / 2 ** 20) };
      results.push(row);
      console.log(JSON.stringify(row));
    }
    await dev.close();
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(`UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? 4}, depth ${DEPTH}, ${SECONDS}s per case`);
