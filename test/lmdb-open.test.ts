// LMDB's lock file made by blockferry with its blocks allocated (src/util/lmdb-open.ts): the size LMDB itself
// would give it, so LMDB neither grows it (which would leave holes again) nor reads another reader count from it;
// one left with holes is replaced only by a caller that holds its own exclusive lock.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { open } from 'lmdb';
import { LMDB_LOCK_BYTES, openLmdb } from '../src/util/lmdb-open.js';

const allocated = (file: string): boolean => {
  const st = fs.statSync(file);
  return st.size === LMDB_LOCK_BYTES && st.blocks * 512 >= st.size;
};

t.test('LMDB makes its lock file the size openLmdb makes it, and keeps the one openLmdb made', async (t) => {
  const dir = t.testdir();
  const own = open({ path: path.join(dir, 'own.mdb') });
  await own.put('k', 1);
  t.equal(fs.statSync(path.join(dir, 'own.mdb-lock')).size, LMDB_LOCK_BYTES, `lmdb-js's own lock file is ${LMDB_LOCK_BYTES} bytes`);
  await own.close();
  const db = openLmdb<number, string>({ path: path.join(dir, 'ours.mdb') });
  await db.put('k', 1);
  t.ok(allocated(path.join(dir, 'ours.mdb-lock')), 'ours is that size with every block allocated, also after LMDB opened and used it');
  await db.close();
});

t.test('a lock file with holes is replaced under an exclusive lock of the caller, never otherwise', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'state.mdb');
  const lock = `${file}-lock`;
  fs.closeSync(fs.openSync(lock, 'w'));
  fs.truncateSync(lock, LMDB_LOCK_BYTES); // as a process that died in LMDB's open left it
  let db = openLmdb({ path: file });
  t.notOk(allocated(lock), 'without the exclusive flag it is left as it is (another process may have it mapped)');
  await db.close();
  fs.truncateSync(lock, 0);
  fs.truncateSync(lock, LMDB_LOCK_BYTES);
  db = openLmdb({ path: file }, true);
  t.ok(allocated(lock), 'with it, it is replaced by one with its blocks');
  await db.put('k', 2);
  t.equal(db.get('k'), 2, 'and the environment works');
  await db.close();
});
