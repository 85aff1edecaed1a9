// The codec alone: hex fixtures for what we send, and the framer fed every message split at every offset.
import t from 'tap';
import { ByteQueue, decodeInfoRequest, decodeMetaContextRequest, decodeRequest, encodeBlockStatus, encodeExportNameReply, encodeInfoExport, encodeOffsetDataHeader, encodeOptionReply, encodeRequest, encodeServerGreeting, encodeSimpleReply, encodeStructuredError, readU64 } from '../src/nbd/codec.js';

const handle = Buffer.from('0102030405060708', 'hex');

t.test('fixtures', async (t) => {
  t.equal(encodeServerGreeting(3).toString('hex'), '4e42444d41474943' + '49484156454f5054' + '0003');
  t.equal(encodeOptionReply(7, 1).toString('hex'), '0003e889045565a9' + '00000007' + '00000001' + '00000000');
  t.equal(encodeSimpleReply(handle, 22).toString('hex'), '67446698' + '00000016' + '0102030405060708');
  t.equal(encodeExportNameReply(2 ** 33, 0x1ed, true).toString('hex'), '0000000200000000' + '01ed');
  t.equal(encodeExportNameReply(512, 1, false).length, 134, '124 zero bytes without NO_ZEROES');
  t.equal(encodeInfoExport(1024, 0x0d).toString('hex'), '0000' + '0000000000000400' + '000d');
  t.equal(encodeOffsetDataHeader(handle, 4096, 512).toString('hex'), '668e33ef' + '0001' + '0001' + '0102030405060708' + '00000208' + '0000000000001000');
  t.equal(encodeStructuredError(handle, 5, 'x').toString('hex'), '668e33ef' + '0001' + '8001' + '0102030405060708' + '00000007' + '00000005' + '0001' + '78');
  t.equal(encodeBlockStatus(handle, 1, [{ length: 4096, flags: 3 }]).toString('hex'), '668e33ef' + '0001' + '0005' + '0102030405060708' + '0000000c' + '00000001' + '00001000' + '00000003');
});

t.test('request round trip, 64-bit offsets and the 2^53 guard', async (t) => {
  const r = decodeRequest(encodeRequest({ flags: 1, type: 1, handle, offset: 2 ** 40 + 5, length: 4096 }));
  t.same({ ...r, handle: r.handle.toString('hex') }, { magicOk: true, flags: 1, type: 1, handle: '0102030405060708', offset: 2 ** 40 + 5, length: 4096 });
  const huge = Buffer.alloc(8, 0xff);
  t.equal(readU64(huge, 0), Infinity, 'offsets past 2^53 decode as out of range, never wrap');
});

t.test('option data decoders reject malformed input', async (t) => {
  const good = Buffer.from('00000004' + Buffer.from('disk').toString('hex') + '0002' + '0001' + '0003', 'hex');
  t.same(decodeInfoRequest(good), { name: 'disk', requests: [1, 3] });
  t.equal(decodeInfoRequest(good.subarray(0, good.length - 1)), null, 'short');
  t.equal(decodeInfoRequest(Buffer.from('ffffffff0000', 'hex')), null, 'name length past the end');
  const meta = Buffer.from('00000000' + '00000001' + '0000000f' + Buffer.from('base:allocation').toString('hex'), 'hex');
  t.same(decodeMetaContextRequest(meta), { name: '', queries: ['base:allocation'] });
  t.equal(decodeMetaContextRequest(Buffer.concat([meta, Buffer.from([0])])), null, 'trailing garbage');
});

t.test('the framer yields identical requests however the stream is split', async (t) => {
  const msgs = [
    encodeRequest({ flags: 0, type: 0, handle, offset: 0, length: 512 }),
    Buffer.concat([encodeRequest({ flags: 1, type: 1, handle, offset: 4096, length: 37 }), Buffer.alloc(37, 0xab)]),
    encodeRequest({ flags: 0, type: 3, handle, offset: 0, length: 0 }),
  ];
  const stream = Buffer.concat(msgs);
  const parse = (chunks: Buffer[]) => {
    const q = new ByteQueue();
    const out: string[] = [];
    let need: number | undefined;
    for (const c of chunks) {
      q.push(c);
      for (;;) {
        if (need === undefined) {
          if (q.length < 28) break;
          const r = decodeRequest(q.take(28));
          out.push(`${r.type}:${r.offset}:${r.length}`);
          need = r.type === 1 ? r.length : 0;
        }
        if (q.length < need) break;
        if (need > 0) out.push(q.take(need).toString('hex'));
        need = undefined;
      }
    }
    return out;
  };
  const whole = parse([stream]);
  t.equal(whole.length, 4);
  let ok = true;
  for (let i = 0; i <= stream.length; i++) {
    if (parse([stream.subarray(0, i), stream.subarray(i)]).join() !== whole.join()) ok = false;
  }
  t.ok(ok, 'split at every offset');
  for (let size = 1; size <= 128; size++) {
    const chunks: Buffer[] = [];
    for (let i = 0; i < stream.length; i += size) chunks.push(stream.subarray(i, i + size));
    if (parse(chunks).join() !== whole.join()) ok = false;
  }
  t.ok(ok, 'fed in 1..128-byte chunks');
});
