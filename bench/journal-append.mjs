// Micro-benchmark of the journal alone (no NBD, no image): N appends of SIZE bytes at depth 32, checkpointed every
// 4096 so the journal prunes as serve's would, in either durability. Prints appends/s and MiB/s.
// Run after `npm run build`: node bench/journal-append.mjs [sync|commit] [N] [SIZE] [DIR]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { Journal } from '../dist/journal/journal.js';
import { EntryKind } from '../dist/journal/types.js';

const durability = process.argv[2] ?? 'sync';
const n = Number(process.argv[3] ?? 20000);
const size = Number(process.argv[4] ?? 4096);
const dir = fs.mkdtempSync(path.join(process.argv[5] ?? os.tmpdir(), 'bf-journal-'));
const j = await Journal.open({ dir, durability });
const data = randomBytes(size);
const inflight = new Set();
const t0 = performance.now();
for (let i = 0; i < n; i++) {
  const p = j.append(EntryKind.WRITE, (i % 4096) * size, size, data).done;
  inflight.add(p);
  void p.finally(() => inflight.delete(p));
  if (inflight.size >= 32) await Promise.race(inflight);
  if (i % 4096 === 4095) await j.setCheckpoint(j.stats.committedSeq);
}
await Promise.all(inflight);
const s = (performance.now() - t0) / 1000;
console.log(`${durability} durability, ${n} appends of ${size} bytes at depth 32: ${(n / s).toFixed(0)} appends/s, ${((n * size) / s / 2 ** 20).toFixed(0)} MiB/s`);
await j.close();
fs.rmSync(dir, { recursive: true, force: true });
