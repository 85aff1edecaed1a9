// The native helper's two ways of giving memory back: dropFileMappings (a journal's shared map, found once and
// re-checked on every later call) and releasePages (a buffer of our own whose contents are done with).
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { open } from 'lmdb';
import { loadNative } from '../src/device/native.js';
import { mappedKiB, rssAnonKiB } from './helpers/memory.js';

const native = loadNative();

t.test('dropFileMappings unmaps an LMDB file on every call, also after the environment is closed and mapped anew', { skip: native ? false : 'the native helper is not built' }, async (t) => {
  // LMDB directly (the journal unmaps by itself as it reads): each round maps the file afresh, wherever the
  // kernel puts it, so the ranges the helper remembered from the round before no longer name it.
  const dir = t.testdir();
  const datas = Array.from({ length: 24 }, () => randomBytes(2 ** 20));
  for (let round = 0; round < 3; round++) {
    const env = open({ path: path.join(dir, 'data.mdb'), mapSize: (round + 1) * 2 ** 30 });
    const db = env.openDB<Buffer, number>({ name: 'values', encoding: 'binary' });
    await env.transaction(() => datas.forEach((d, i) => db.put(i, d)));
    const file = fs.realpathSync(path.join(dir, 'data.mdb'));
    for (let call = 0; call < 3; call++) {
      t.ok(datas.every((d, i) => db.get(i)!.equals(d)), `round ${round}, call ${call}: values read back intact`);
      const before = mappedKiB(file);
      t.ok(before >= 16 * 1024, `round ${round}, call ${call}: reading mapped the file (${before} KiB)`);
      const advised = native!.dropFileMappings(file);
      t.ok(advised >= 2 ** 30, `round ${round}, call ${call}: the map was advised (${advised} bytes)`);
      const after = mappedKiB(file);
      t.ok(after < 1024, `round ${round}, call ${call}: ${before} KiB mapped before, ${after} KiB after`);
    }
    await env.close();
  }
  t.equal(native!.dropFileMappings(path.join(dir, 'no-such-file')), 0, 'a file this process has not mapped: nothing advised');
});

t.test('releasePages gives a buffer\'s whole pages back and leaves the partial ones at its ends alone', { skip: native?.releasePages ? false : 'the native helper is not built' }, async (t) => {
  const bytes = 32 * 2 ** 20;
  const backing = Buffer.allocUnsafeSlow(bytes + 2 * 4096);
  // A view that starts and ends inside pages: those two partial pages must keep their bytes.
  const view = backing.subarray(100, backing.length - 100);
  backing.fill(0xab);
  const before = rssAnonKiB();
  const released = native!.releasePages!(view);
  const after = rssAnonKiB();
  t.ok(released >= bytes && released % 4096 === 0, `${released} bytes released, whole pages only`);
  t.ok(before - after >= 24 * 1024, `RssAnon fell from ${before} to ${after} KiB`);
  t.equal(backing[0], 0xab, 'the byte before the view is untouched');
  t.equal(view[0], 0xab, 'the partial first page keeps its bytes');
  t.equal(view[view.length - 1], 0xab, 'the partial last page keeps its bytes');
  t.equal(view[8192], 0, 'a released page reads as zeroes');
  t.throws(() => native!.releasePages!('not a buffer' as unknown as Buffer), /releasePages needs a Buffer/);
});
