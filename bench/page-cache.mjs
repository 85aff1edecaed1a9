// What writing into the page cache costs, by where the pages come from: the measurement behind the journal's
// recycled data files (src/journal/data-files.ts, Recycling). 64 MiB is written with pwritev in 4 MiB calls:
//   overwrite      into a file whose pages were written just before (what a recycled data file gets)
//   new, at once   into a new file right after deleting one as large (freed pages taken back at once)
//   new, 3 s later the same after 3 s: long enough for a VM with free page reporting (virtio-balloon,
//                  page_reporting_order on the kernel command line) to hand the freed memory to its host, so
//                  every page is faulted in again there
//   hole, read     into a sparse file whose holes were read first (zeroed pages already in the cache)
// Each case runs ROUNDS times, alternating, and prints the median us/MiB and its ratio to `overwrite`.
// Run: node bench/page-cache.mjs [DIR]   (DIR defaults to the system's temp directory)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const MiB = 2 ** 20;
const FILE_BYTES = 64 * MiB;
const CALL_BYTES = 4 * MiB;
const ROUNDS = Number(process.env.ROUNDS ?? 3);
const REPORT_DELAY_MS = 3000;

const dir = fs.mkdtempSync(path.join(process.argv[2] ?? os.tmpdir(), 'bf-pagecache-'));
const bufs = Array.from({ length: CALL_BYTES / MiB }, (_, i) => Buffer.alloc(MiB, i + 1));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Writes FILE_BYTES into `file` from its start; returns us per MiB. */
function writeThrough(file) {
  const fd = fs.openSync(file, 'r+');
  const t0 = process.hrtime.bigint();
  for (let pos = 0; pos < FILE_BYTES; pos += CALL_BYTES) fs.writevSync(fd, bufs, pos);
  const us = Number(process.hrtime.bigint() - t0) / 1e3 / (FILE_BYTES / MiB);
  fs.closeSync(fd);
  return us;
}

function fresh(name) {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  return file;
}

/** Deletes a file of FILE_BYTES written just now, waits `ms`, and returns a new empty file. */
async function afterDelete(name, ms) {
  const old = fresh(`${name}.old`);
  writeThrough(old);
  fs.rmSync(old);
  if (ms > 0) await sleep(ms);
  return fresh(name);
}

const cases = {
  overwrite: async () => {
    const file = fresh('overwrite');
    writeThrough(file);
    return writeThrough(file);
  },
  'new, at once': async () => writeThrough(await afterDelete('new-now', 0)),
  'new, 3 s later': async () => writeThrough(await afterDelete('new-later', REPORT_DELAY_MS)),
  'hole, read': async () => {
    const file = await afterDelete('hole', REPORT_DELAY_MS);
    fs.truncateSync(file, FILE_BYTES);
    const fd = fs.openSync(file, 'r');
    const scratch = Buffer.allocUnsafe(MiB);
    for (let pos = 0; pos < FILE_BYTES; pos += MiB) fs.readSync(fd, scratch, 0, MiB, pos);
    fs.closeSync(fd);
    return writeThrough(file);
  },
};

const results = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
try {
  for (let r = 0; r < ROUNDS; r++) {
    for (const [name, run] of Object.entries(cases)) {
      results[name].push(await run());
      for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f));
    }
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const base = median(results.overwrite);
console.log(`page cache writes, ${FILE_BYTES / MiB} MiB in ${CALL_BYTES / MiB} MiB pwritev calls, median of ${ROUNDS} alternating rounds; ${os.cpus().length} CPUs`);
console.log('| pages | us/MiB | vs overwrite | rounds |');
console.log('|---|---|---|---|');
for (const [name, xs] of Object.entries(results)) {
  console.log(`| ${name} | ${median(xs).toFixed(0)} | ${(median(xs) / base).toFixed(1)}x | ${xs.map((x) => x.toFixed(0)).join(' / ')} |`);
}
const cmd = fs.existsSync('/proc/cmdline') ? fs.readFileSync('/proc/cmdline', 'utf8') : '';
const reporting = /page_reporting\.page_reporting_order=(\d+)/.exec(cmd);
console.log(reporting ? `free page reporting: on (page_reporting_order=${reporting[1]})` : 'free page reporting: not set on the kernel command line');
