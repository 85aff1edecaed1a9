// Option haggling byte by byte over a real socket and over an in-memory duplex: what each option answers,
// that the next option is still parsed after an unsupported one, and which violations close the connection.
import t from 'tap';
import net from 'node:net';
import { Duplex, PassThrough } from 'node:stream';
import { MemoryDevice } from '../src/device/memory-device.js';
import { NbdServer } from '../src/nbd/server.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { until } from './helpers/files.js';
import { IHAVEOPT, nameData, option, wire } from './helpers/nbd-wire.js';

const SIZE = 2 ** 20;

async function tcp(t: { teardown(fn: () => unknown): void }) {
  const server = new NbdServer({
    exports: [
      { name: 'disk', description: 'the disk', device: new MemoryDevice(SIZE) },
      { name: 'other', device: new MemoryDevice(2 * SIZE) },
    ],
  });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close({ graceMs: 100 }));
  return { server, port: port! };
}

async function connect(port: number, clientFlags = 3) {
  const s = net.connect(port, '127.0.0.1');
  const r = wire(s);
  const greet = await r.read(18);
  const f = Buffer.alloc(4);
  f.writeUInt32BE(clientFlags, 0);
  s.write(f);
  return { s, r, greet };
}

t.test('options sent whole before the client\'s FIN are answered, then the server ends the connection', async (t) => {
  const { server, port } = await tcp(t);
  const { s, r } = await connect(port);
  s.end(option(3)); // NBD_OPT_LIST, then FIN without NBD_OPT_ABORT
  const names: string[] = [];
  for (;;) {
    const rep = await r.reply();
    if (rep.type === 1) break;
    names.push(rep.data.toString('utf8', 4, 4 + rep.data.readUInt32BE(0)));
  }
  t.same(names, ['disk', 'other'], 'the LIST is answered');
  t.ok(await r.endsWithin(5_000), 'then the server ends the connection');
  t.ok(await until(() => server.connectionCount === 0, 5_000, 20), 'and holds nothing for it');
});

t.test('greeting, LIST, unknown option then GO, INFO replies', async (t) => {
  const { port } = await tcp(t);
  const { s, r, greet } = await connect(port);
  t.equal(greet.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
  t.equal(greet.readUInt16BE(16), 3, 'FIXED_NEWSTYLE | NO_ZEROES offered');
  s.write(option(3));
  const names: string[] = [];
  for (;;) {
    const rep = await r.reply();
    if (rep.type === 1) break;
    t.equal(rep.type, 2, 'NBD_REP_SERVER');
    names.push(rep.data.toString('utf8', 4, 4 + rep.data.readUInt32BE(0)));
  }
  t.same(names, ['disk', 'other'], 'LIST names every export');
  s.write(option(4242, Buffer.from('junk')));
  const unsup = await r.reply();
  t.same([unsup.option, unsup.type], [4242, 2 ** 31 + 1], 'unknown option: NBD_REP_ERR_UNSUP');
  s.write(option(6, nameData('nope')));
  t.equal((await r.reply()).type, 2 ** 31 + 6, 'INFO for an unknown export: NBD_REP_ERR_UNKNOWN');
  s.write(option(6, nameData('other')));
  const infos = [];
  for (;;) {
    const rep = await r.reply();
    if (rep.type === 1) break;
    infos.push(rep);
  }
  const exp = infos.find((i) => i.data.readUInt16BE(0) === 0)!;
  t.equal(exp.data.readUInt32BE(6), 2 * SIZE, 'INFO reports the export size');
  t.ok(infos.some((i) => i.data.readUInt16BE(0) === 3), 'block sizes sent unasked');
  s.write(option(7, nameData('')));
  for (;;) if ((await r.reply()).type === 1) break;
  t.pass('GO with the empty name picks the default export, after all of the above');
  s.destroy();
});

t.test('EXPORT_NAME with and without NO_ZEROES', async (t) => {
  const { port } = await tcp(t);
  for (const [flags, len] of [[3, 10], [1, 134]] as const) {
    const { s, r } = await connect(port, flags);
    s.write(option(1, Buffer.from('disk')));
    const rep = await r.read(len);
    t.equal(rep.readUInt32BE(4), SIZE, `size (client flags ${flags})`);
    if (len === 134) t.ok(rep.subarray(10).equals(Buffer.alloc(124)), '124 zero bytes when NO_ZEROES was not agreed');
    s.destroy();
  }
  const { s, r } = await connect(port);
  s.write(option(1, Buffer.from('missing')));
  t.equal(await r.endsWithin(1000), true, 'EXPORT_NAME of a missing export hangs up (it cannot answer an error)');
  s.destroy();
});

t.test('violations close the connection; ABORT is acknowledged', async (t) => {
  const { server, port } = await tcp(t);
  {
    const { s, r } = await connect(port);
    s.write(option(2));
    t.equal((await r.reply()).type, 1, 'ABORT: ACK');
    t.equal(await r.endsWithin(1000), true, 'then closed');
    // The client keeps its side open: the server must not keep its own waiting for the client's FIN.
    t.ok(await until(() => server.connectionCount === 0, 2000, 20), 'and the server holds no connection for it');
    s.destroy();
  }
  {
    const { s, r } = await connect(port, 0x80);
    t.equal(await r.endsWithin(1000), true, 'unknown client flags: closed');
    s.destroy();
  }
  {
    const { s, r } = await connect(port);
    const bad = option(3);
    bad.write('XXXXXXXX', 0);
    s.write(bad);
    t.equal(await r.endsWithin(1000), true, 'bad option magic: closed');
    s.destroy();
  }
  {
    const { s, r } = await connect(port);
    s.write(option(10, Buffer.alloc(8)));
    t.equal((await r.reply()).type, 2 ** 31 + 3, 'SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID');
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h);
    h.writeUInt32BE(3, 8);
    h.writeUInt32BE(2 ** 31, 12);
    s.write(h);
    t.equal(await r.endsWithin(1000), true, 'a 2 GiB option: closed');
    s.destroy();
  }
});

t.test('negotiation over an in-memory duplex pair', async (t) => {
  const server = new NbdServer({ exports: [{ name: 'm', device: new MemoryDevice(SIZE) }] });
  const toServer = new PassThrough();
  const toClient = new PassThrough();
  const serverSide = Duplex.from({ readable: toServer, writable: toClient });
  const clientSide = Duplex.from({ readable: toClient, writable: toServer });
  // Destroying a Duplex.from pair reports an AbortError on the other side: expected at the end here.
  clientSide.on('error', () => undefined);
  server.handleConnection(serverSide);
  const r = wire(clientSide);
  await r.read(18);
  clientSide.write(Buffer.from([0, 0, 0, 3]));
  clientSide.write(option(8));
  t.equal((await r.reply()).type, 1, 'STRUCTURED_REPLY: ACK');
  const q = Buffer.from('base:allocation');
  const meta = Buffer.alloc(12 + q.length);
  meta.writeUInt32BE(0, 0);
  meta.writeUInt32BE(1, 4);
  meta.writeUInt32BE(q.length, 8);
  q.copy(meta, 12);
  clientSide.write(option(10, meta));
  const ctx = await r.reply();
  t.equal(ctx.type, 4, 'NBD_REP_META_CONTEXT');
  t.equal(ctx.data.toString('utf8', 4), 'base:allocation');
  t.not(ctx.data.readUInt32BE(0), 0, 'with a nonzero context id');
  t.equal((await r.reply()).type, 1, 'then ACK');
  clientSide.destroy();
  serverSide.destroy();
});

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: export name, then the queries. */
function metaData(name: string, queries: string[]): Buffer {
  const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
  parts[0].writeUInt32BE(parts[1].length, 0);
  parts[2].writeUInt32BE(queries.length, 0);
  for (const q of queries) {
    const l = Buffer.alloc(4);
    l.writeUInt32BE(Buffer.byteLength(q), 0);
    parts.push(l, Buffer.from(q));
  }
  return Buffer.concat(parts);
}

t.test('a failed SET_META_CONTEXT still replaces the earlier selection: BLOCK_STATUS is then refused', async (t) => {
  // The spec: issuing NBD_OPT_SET_META_CONTEXT replaces all previously-set metadata contexts (including when
  // this command fails).
  const { port } = await tcp(t);
  const failures: Array<[string, Buffer, number]> = [
    ['unknown export', metaData('nope', ['base:allocation']), 2 ** 31 + 6],
    ['malformed data', Buffer.from([0, 0, 0, 99]), 2 ** 31 + 3],
  ];
  for (const [what, data, expected] of failures) {
    const { s, r } = await connect(port);
    t.equal((await r.ask(8)).type, 1, 'STRUCTURED_REPLY: ACK');
    s.write(option(10, metaData('disk', ['base:allocation'])));
    t.equal((await r.reply()).type, 4, 'base:allocation selected');
    t.equal((await r.reply()).type, 1, 'then ACK');
    t.equal((await r.ask(10, data)).type, expected, `SET_META_CONTEXT with ${what}: refused`);
    s.write(option(7, nameData('disk')));
    for (;;) if ((await r.reply()).type === 1) break;
    const req = Buffer.alloc(28);
    req.writeUInt32BE(0x25609513, 0);
    req.writeUInt16BE(7, 6); // BLOCK_STATUS
    req.writeBigUInt64BE(42n, 8);
    req.writeUInt32BE(4096, 24);
    s.write(req);
    const h = await r.read(20);
    const payload = await r.read(h.readUInt32BE(16));
    t.equal(h.readUInt32BE(0), 0x668e33ef, 'a structured reply');
    t.equal(h.readBigUInt64BE(8), 42n);
    t.equal(h.readUInt16BE(6), 2 ** 15 + 1, `BLOCK_STATUS after the failed SET (${what}): an error chunk`);
    if (h.readUInt16BE(6) === 2 ** 15 + 1) t.equal(payload.readUInt32BE(0), 22, 'EINVAL');
    s.destroy();
  }
});

t.test('FLUSH on one connection covers writes made on another (CAN_MULTI_CONN)', async (t) => {
  let flushes = 0;
  const mem = new MemoryDevice(SIZE);
  const recording = Object.assign(Object.create(mem), { flush: async () => void flushes++ });
  const server = new NbdServer({ exports: [{ name: 'd', device: recording }] });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close({ graceMs: 100 }));
  const a = await NbdTestClient.connect({ host: '127.0.0.1', port: port!, exportName: 'd' });
  const b = await NbdTestClient.connect({ host: '127.0.0.1', port: port!, exportName: 'd' });
  t.ok(a.flags & (1 << 8), 'CAN_MULTI_CONN advertised');
  await a.write(0, Buffer.alloc(4096, 9));
  await b.flush();
  t.equal(flushes, 1, 'the shared device was flushed by the other connection');
  t.ok((await b.read(0, 4096)).equals(Buffer.alloc(4096, 9)), 'and the write is visible there');
  await a.write(4096, Buffer.alloc(512, 1), { fua: true });
  t.equal(flushes, 1, 'FUA on a device with native FUA does not need a flush');
  await a.close();
  await b.close();
});
