// keepFreedMemory (the CLI calls it at start): large freed buffers are reused by malloc instead of being given
// back to the kernel and faulted in, zeroed, for the next batch. Measured in child processes, each allocating
// and freeing 64 buffers of 1 MiB ten times, counting minor page faults after the first round.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const NATIVE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../dist/device/native.js');

const CHILD = `
const keep = process.argv[1] === 'keep';
if (keep) {
  const { keepFreedMemory } = await import(${JSON.stringify(NATIVE)});
  if (!keepFreedMemory()) throw new Error('keepFreedMemory did not take effect');
}
let before = 0;
for (let round = 0; round < 10; round++) {
  if (round === 1) before = process.resourceUsage().minorPageFault;
  let bufs = [];
  for (let i = 0; i < 64; i++) bufs.push(Buffer.allocUnsafeSlow(2 ** 20).fill(round));
  bufs = null;
  globalThis.gc();
}
process.stdout.write(String((process.resourceUsage().minorPageFault - before) / 9));
`;

function faultsPerRound(mode: 'default' | 'keep'): number {
  const out = execFileSync(process.execPath, ['--expose-gc', '--single-threaded-gc', '--input-type=module', '-e', CHILD, mode], { encoding: 'utf8' });
  return Number(out);
}

t.test('with keepFreedMemory, 64 MiB of freed 1 MiB buffers are reused, not faulted in again', async (t) => {
  const isGlibc = Boolean((process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime);
  if (!isGlibc) return t.skip('malloc here is not glibc: keepFreedMemory changes nothing');
  const plain = faultsPerRound('default');
  const kept = faultsPerRound('keep');
  t.ok(Number.isFinite(plain) && Number.isFinite(kept), `measured: ${plain} faults per round by default, ${kept} kept`);
  t.ok(kept * 4 < plain, `far fewer page faults per round (${kept} against ${plain} by default)`);
});

t.test('keepFreedMemory refuses nonsense thresholds', async (t) => {
  const { loadNative } = await import('../src/device/native.js');
  const native = loadNative();
  if (!native) return t.fail('the native helper must be built (npx node-gyp rebuild)');
  t.throws(() => native.keepFreedMemory(-1, 1), TypeError);
  t.throws(() => native.keepFreedMemory(2 ** 40, 1), TypeError);
});
