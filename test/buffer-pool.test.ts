// The I/O buffer pool: released buffers come back (no new ArrayBuffer), a buffer is never handed out twice
// while in use, foreign or doubly released buffers are ignored, and the headroom sits in front of the data.
import t from 'tap';
import { BufferPool, isPooled, releaseBuffer } from '../src/util/buffer-pool.js';

t.test('a released buffer is reused for the next request of its size class', async (t) => {
  const pool = new BufferPool({ unit: 4096, maxLength: 2 ** 20, maxBytes: 8 * 2 ** 20 });
  const a = pool.alloc(5000);
  t.equal(a.length, 5000);
  t.ok(isPooled(a));
  const ab = a.buffer;
  releaseBuffer(a);
  t.notOk(isPooled(a), 'released');
  const b = pool.alloc(8192); // same class: two 4 KiB units
  t.equal(b.buffer, ab, 'the same ArrayBuffer came back');
  t.equal(b.length, 8192);
  const c = pool.alloc(8192);
  t.not(c.buffer, ab, 'while b is in use, another request gets another buffer');
});

t.test('a second release, or a buffer from elsewhere, changes nothing', async (t) => {
  const pool = new BufferPool({ unit: 4096, maxLength: 2 ** 20, maxBytes: 8 * 2 ** 20 });
  const a = pool.alloc(4096);
  releaseBuffer(a);
  const b = pool.alloc(4096); // reuses a's ArrayBuffer
  releaseBuffer(a); // stale view: must not put b's memory back in the pool
  const c = pool.alloc(4096);
  t.not(c.buffer, b.buffer, 'b is still in use, so c is another buffer');
  releaseBuffer(Buffer.alloc(4096)); // not pooled: ignored
  t.notOk(isPooled(Buffer.alloc(16)));
});

t.test('buffers beyond maxLength are not kept, and maxBytes bounds what is kept', async (t) => {
  const pool = new BufferPool({ unit: 4096, maxLength: 16384, maxBytes: 16384 });
  const big = pool.alloc(65536);
  const ab = big.buffer;
  releaseBuffer(big);
  t.not(pool.alloc(65536).buffer, ab, 'a long one is allocated each time');
  const x = pool.alloc(16384);
  const y = pool.alloc(16384);
  releaseBuffer(x);
  releaseBuffer(y); // over maxBytes: dropped
  t.equal(pool.alloc(16384).buffer, x.buffer);
  t.not(pool.alloc(16384).buffer, y.buffer);
});

t.test('headroom sits in front of the data, in the same memory', async (t) => {
  const pool = new BufferPool({ unit: 4096, maxLength: 2 ** 20, maxBytes: 2 ** 20, headroom: 40 });
  const d = pool.alloc(100);
  const whole = pool.whole(d)!;
  t.equal(whole.length, 140);
  d.fill(7);
  t.equal(whole[40], 7);
  t.equal(whole.buffer, d.buffer);
  t.equal(new BufferPool({ unit: 4096, maxLength: 4096, maxBytes: 4096 }).whole(d), undefined, 'another pool does not claim it');
});
