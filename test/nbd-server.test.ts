// The server over real loopback sockets: semantics a client relies on, errors that leave the connection
// usable, hostile input that never disturbs another client, and a bounded fuzz run.
import t from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../src/device/file-device.js';
import { MemoryDevice } from '../src/device/memory-device.js';
import { NbdServer } from '../src/nbd/server.js';
import { until } from './helpers/files.js';
import { NbdError, NbdTestClient } from './helpers/nbd-test-client.js';
import { run } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;

async function serve(t: { teardown(fn: () => unknown): void }, exports: ConstructorParameters<typeof NbdServer>[0]['exports']) {
  const server = new NbdServer({ exports });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close({ graceMs: 100 }));
  return { server, port: port! };
}

t.test('reads, writes and pipelining round-trip, simple and structured', async (t) => {
  const dev = new MemoryDevice(SIZE);
  const { port } = await serve(t, [{ name: 'a', device: dev }]);
  for (const structured of [false, true]) {
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'a', structured });
    t.equal(c.size, SIZE);
    const blocks = Array.from({ length: 64 }, () => randomBytes(4096 + 13));
    await Promise.all(blocks.map((b, i) => c.write(i * 8192 + 7, b)));
    const back = await Promise.all(blocks.map((b, i) => c.read(i * 8192 + 7, b.length)));
    t.ok(back.every((b, i) => b.equals(blocks[i])), `64 pipelined unaligned writes read back (structured=${structured})`);
    await c.close();
  }
});

t.test('large pipelined writes are read in place and read back from a file, past the in-flight budget', async (t) => {
  // Plain TCP connections read in user-buffer mode: payloads of 64 KiB and more are read by the kernel
  // straight into pooled buffers, smaller ones are copied out of the connection's read buffer, and 96 MiB in
  // flight at once exceed the 64 MiB budget, so reading pauses and resumes in the middle of payloads.
  const file = await FileDevice.open({ path: path.join(t.testdir(), 'big.img'), size: 128 * 2 ** 20 });
  t.teardown(() => file.close());
  const { port } = await serve(t, [{ name: 'f', device: file }]);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'f', structured: true });
  const sizes = [2 ** 20, 65536, 65537, 3, 4096, 200_000, 2 * 2 ** 20 + 5, 511, 131072];
  const writes: Array<{ offset: number; data: Buffer }> = [];
  let offset = 0;
  for (let i = 0; offset < 96 * 2 ** 20; i++) {
    const data = randomBytes(sizes[i % sizes.length]);
    writes.push({ offset, data });
    offset += data.length + (i % 3);
  }
  await Promise.all(writes.map((w) => c.write(w.offset, w.data)));
  const back = await Promise.all(writes.map((w) => c.read(w.offset, w.data.length)));
  t.equal(back.filter((b, i) => !b.equals(writes[i].data)).length, 0, `${writes.length} pipelined writes read back`);
  // Read again while overwriting: replies from pooled buffers must not change under a later request.
  const again = await Promise.all(writes.map((w, i) => (i % 2 ? c.write(w.offset, randomBytes(w.data.length)).then(() => null) : c.read(w.offset, w.data.length))));
  t.equal(again.filter((b, i) => b !== null && !b.equals(writes[i].data)).length, 0, 'reads interleaved with writes to other ranges');
  await c.close();
});

t.test('NBD_CMD_DISC, or a FIN without it, right behind pipelined requests: every one of them is answered before the server closes', async (t) => {
  // The spec: on NBD_CMD_DISC the server MUST handle all outstanding requests, then close. A reply dropped here
  // is a write the client cannot know was done. A client that shuts down its sending side instead (FIN) is
  // served the same way: requests received whole are answered, then the server ends the connection.
  const file = await FileDevice.open({ path: path.join(t.testdir(), 'disc.img'), size: SIZE });
  t.teardown(() => file.close());
  for (const how of ['DISC', 'FIN'] as const) {
    for (const [name, device] of [['memory', new MemoryDevice(SIZE)], ['file', file]] as const) {
      const { server, port } = await serve(t, [{ name: 'a', device }]);
      const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'a', structured: true });
      const data = randomBytes(256 * 1024);
      const requests: Array<Promise<unknown>> = [];
      for (let i = 0; i < 16; i++) requests.push(c.write(i * data.length, data), c.read(i * 4096, 4096));
      requests.push(c.flush());
      const closing = how === 'DISC' ? c.close() : c.halfClose(); // sent while all of the above are outstanding
      const settled = await Promise.allSettled(requests);
      const failed = settled.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []));
      t.same(failed, [], `${how}, ${name}: all ${requests.length} requests outstanding got their replies`);
      await closing;
      t.ok((await device.read(15 * data.length, data.length)).equals(data), `${how}, ${name}: the last write is in the image`);
      t.ok(await until(() => server.connectionCount === 0, 5_000, 20), `${how}, ${name}: and the server closed the connection`);
    }
  }
});

t.test('clients that disconnect cleanly leave no connection behind: many more of them than the connection limit', async (t) => {
  // Each client sends NBD_CMD_DISC (as nbdinfo, qemu-img and nbd-client -d do) and closes. The server once
  // kept the socket of every such client, and refused all clients after maxConnections of them.
  const server = new NbdServer({ exports: [{ name: 'a', device: new MemoryDevice(SIZE) }], maxConnections: 3 });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.close({ graceMs: 100 }));
  let served = 0;
  for (let i = 0; i < 12; i++) {
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: port!, exportName: 'a' });
    await c.write(i * 4096, Buffer.alloc(4096, i));
    if ((await c.read(i * 4096, 4096)).equals(Buffer.alloc(4096, i))) served++;
    await c.close();
  }
  t.equal(served, 12, '12 clients in turn, each served, with a limit of 3 connections');
  t.ok(await until(() => server.connectionCount === 0, 2000, 20), 'no connection is left open');
});

t.test('errors per the spec, and the connection goes on', async (t) => {
  const { port } = await serve(t, [
    { name: 'rw', device: new MemoryDevice(SIZE) },
    { name: 'ro', device: new MemoryDevice(SIZE), readOnly: true },
  ]);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'rw' });
  await t.rejects(c.read(SIZE - 100, 200), { errno: 22 }, 'read past the end: EINVAL');
  await t.rejects(c.write(SIZE - 100, Buffer.alloc(200)), { errno: 28 }, 'write past the end: ENOSPC');
  await t.rejects(c.request(99, 0, 0), { errno: 22 }, 'unknown command: EINVAL');
  await t.rejects(c.request(0, 0, 512, { flags: 1 << 3 }), { errno: 22 }, 'flag not valid for READ: EINVAL');
  await t.rejects(c.read(0, 33 * 2 ** 20), { errno: 22 }, 'read over the 32 MiB limit: EINVAL');
  await t.rejects(c.request(7, 0, 4096), { errno: 22 }, 'BLOCK_STATUS without a meta context: EINVAL');
  await c.write(0, Buffer.from('still here'));
  t.equal((await c.read(0, 10)).toString(), 'still here', 'the connection still works');
  const ro = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'ro' });
  t.ok(ro.flags & 2, 'READ_ONLY advertised');
  await t.rejects(ro.write(0, Buffer.alloc(512)), { errno: 1 }, 'write to a read-only export: EPERM');
  await t.rejects(NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'nope' }), /NBD_OPT_GO failed/);
  await c.close();
  await ro.close();
});

t.test('past the end: TRIM is EINVAL, WRITE and WRITE_ZEROES are ENOSPC; TRIM on a read-only export is EPERM', async (t) => {
  // The spec: the server SHOULD return NBD_EINVAL for a read or trim request including sectors beyond the size
  // of the device, NBD_ENOSPC for a write (and write zeroes) request beyond it.
  const { port } = await serve(t, [
    { name: 'rw', device: new MemoryDevice(SIZE) },
    { name: 'ro', device: new MemoryDevice(SIZE), readOnly: true },
  ]);
  for (const structured of [false, true]) {
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'rw', structured });
    await t.rejects(c.request(4, SIZE - 4096, 8192), { errno: 22 }, `TRIM past the end: EINVAL (structured=${structured})`);
    await t.rejects(c.request(4, SIZE, 1), { errno: 22 }, `TRIM starting at the end: EINVAL (structured=${structured})`);
    await t.rejects(c.request(6, SIZE - 4096, 8192), { errno: 28 }, `WRITE_ZEROES past the end: ENOSPC (structured=${structured})`);
    await t.rejects(c.write(SIZE - 100, Buffer.alloc(200)), { errno: 28 }, `WRITE past the end: ENOSPC (structured=${structured})`);
    await c.request(4, SIZE - 4096, 4096); // TRIM of the last block: fine
    await c.close();
  }
  const ro = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'ro' });
  await t.rejects(ro.request(4, 0, 4096), { errno: 1 }, 'TRIM on a read-only export: EPERM');
  await t.rejects(ro.request(4, SIZE - 4096, 8192), { errno: 1 }, 'TRIM past the end of a read-only export: EPERM');
  await ro.close();
});

t.test('server shutdown: requests in flight finish, every request received after it is answered NBD_ESHUTDOWN', async (t) => {
  // The spec: on a server shutdown the server SHOULD wait for inflight requests; the error for requests
  // received from then on SHOULD be NBD_ESHUTDOWN. None of them may reach the device, and none goes unanswered.
  for (const structured of [false, true]) {
    const mem = new MemoryDevice(SIZE);
    const calls: string[] = [];
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const device = Object.assign(Object.create(mem), {
      write: async (offset: number, data: Buffer) => {
        calls.push(`write ${offset}`);
        await gate; // held until after the requests sent during shutdown are answered
        return mem.write(offset, data);
      },
      writeZeroes: async (offset: number, length: number) => {
        calls.push(`writeZeroes ${offset}`);
        return mem.writeZeroes(offset, length);
      },
      trim: async (offset: number, length: number) => {
        calls.push(`trim ${offset}`);
        return mem.trim(offset, length);
      },
      flush: async () => void calls.push('flush'),
    });
    const server = new NbdServer({ exports: [{ name: 'a', device }] });
    const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
    t.teardown(() => server.close({ graceMs: 100 }));
    const c = await NbdTestClient.connect({ host: '127.0.0.1', port: port!, exportName: 'a', structured });
    c.on('error', () => undefined);
    const first = randomBytes(4096);
    const inFlight = c.write(0, first);
    t.ok(await until(() => calls.length === 1, 2000, 5), `the first write reached the device (structured=${structured})`);

    const closing = server.close({ graceMs: 5000 });
    // Sent once shutdown has begun, while the first write is still running: a small and a large write (whose
    // payloads must be skipped, keeping the framing), then every other kind of request.
    const later = [
      c.write(4096, randomBytes(4096)),
      c.write(65536, randomBytes(300_000)),
      c.read(0, 4096),
      c.flush(),
      c.request(4, 0, 4096), // TRIM
      c.request(6, 8192, 4096), // WRITE_ZEROES
      c.request(5, 0, 4096), // CACHE
      c.write(1_000_000, randomBytes(70_000), { fua: true }),
      c.read(SIZE - 4096, 4096),
    ];
    const answered = Promise.allSettled(later);
    const early = await Promise.race([answered.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))]);
    t.ok(early, `requests after shutdown began are answered without waiting for the one in flight (structured=${structured})`);
    open();
    const settled = await answered;
    t.same(
      settled.map((r) => (r.status === 'rejected' ? ((r.reason as NbdError).errno ?? String(r.reason)) : 'ok')),
      later.map(() => 108),
      `all ${later.length} requests after shutdown began: NBD_ESHUTDOWN (structured=${structured})`,
    );
    await t.resolves(inFlight, `the write in flight when shutdown began got its real reply (structured=${structured})`);
    await closing;
    t.same(calls, ['write 0'], `only the write in flight reached the device (structured=${structured})`);
    t.ok((await mem.read(0, first.length)).equals(first), `and it is in the image (structured=${structured})`);
    t.ok((await mem.read(4096, 4096)).equals(Buffer.alloc(4096)), `a write sent after shutdown began is not (structured=${structured})`);
    t.equal(server.connectionCount, 0, 'the connection is closed once the in-flight write is done');
  }
});

t.test('write-zeroes is emulated on a device that cannot zero, trim is a harmless hint', async (t) => {
  // Without the native helper the file device cannot zero, so the NBD core must emulate it.
  const file = await FileDevice.open({ path: path.join(t.testdir(), 'z.img'), size: SIZE, noNative: true });
  t.teardown(() => file.close());
  t.equal(file.capabilities.zeroes, false);
  const { port } = await serve(t, [{ name: 'f', device: file }]);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'f' });
  await c.write(4096, randomBytes(3 * 2 ** 20));
  await c.request(6, 4096 + 100, 2 * 2 ** 20); // WRITE_ZEROES
  const got = await c.read(4096, 3 * 2 ** 20);
  t.ok(got.subarray(100, 100 + 2 * 2 ** 20).equals(Buffer.alloc(2 * 2 ** 20)), 'range reads as zeroes');
  t.notOk(got.subarray(0, 100).equals(Buffer.alloc(100)), 'bytes before it untouched');
  await t.rejects(c.request(6, 0, 4096, { flags: 1 << 4 }), { errno: 22 }, 'FAST_ZERO not advertised: EINVAL');
  await c.request(4, 0, 4096); // TRIM
  await c.flush();
  await c.close();
});

t.test('hostile clients never disturb a good one', async (t) => {
  // Hostile inputs go to the default export (they may legitimately write it); the good client uses its own.
  const { port } = await serve(t, [
    { name: 'a', device: new MemoryDevice(SIZE) },
    { name: 'good', device: new MemoryDevice(SIZE) },
  ]);
  const good = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'good' });
  const expect = new Map<number, Buffer>();
  let tried = 0;
  let goodErrors = 0;
  const deadline = Date.now() + 8000;
  const templates = [
    Buffer.from('00000003' + '49484156454f5054' + '00000007' + '00000006' + '000000000000', 'hex'), // GO ""
    Buffer.from('00000003' + '49484156454f5054' + '00000003' + '00000000', 'hex'), // LIST
    Buffer.from('00000003' + '49484156454f5054' + '00000008' + '00000000' + '49484156454f5054' + '0000000a' + '0000000c' + '00000000' + '00000001' + '00000000', 'hex'),
    Buffer.from('00000003' + '49484156454f5054' + '00000007' + '00000006' + '000000000000' + '25609513' + '00010001' + '0000000000000001' + '0000000000000000' + '00000010' + 'aa'.repeat(16), 'hex'),
  ];
  const hostile = async () => {
    while (Date.now() < deadline) {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => undefined);
      await new Promise((r) => s.once('connect', r));
      const base = templates[Math.floor(Math.random() * templates.length)];
      const m = Buffer.from(Math.random() < 0.2 ? randomBytes(1 + Math.floor(Math.random() * 200)) : base);
      for (let k = 0; k < 1 + Math.floor(Math.random() * 4); k++) m[Math.floor(Math.random() * m.length)] = Math.floor(Math.random() * 256);
      s.write(m);
      tried++;
      await new Promise((r) => setTimeout(r, 2));
      s.destroy();
    }
  };
  const goodLoop = async () => {
    let i = 0;
    while (Date.now() < deadline) {
      const off = (i++ % 512) * 4096;
      const d = randomBytes(4096);
      try {
        await good.write(off, d);
        expect.set(off, d);
        const back = await good.read(off, 4096);
        if (!back.equals(d)) goodErrors++;
      } catch {
        goodErrors++;
      }
    }
  };
  await Promise.all([hostile(), hostile(), hostile(), goodLoop()]);
  t.comment(`fuzz: ${tried} mutated handshake/transmission inputs from short connections`);
  t.equal(goodErrors, 0, 'the good client saw no error and no wrong byte');
  t.ok(tried > 100, 'the fuzzer ran');
  const again = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: 'good' });
  let same = true;
  for (const [off, d] of expect) if (!(await again.read(off, 4096)).equals(d)) same = false;
  t.ok(same, 'a new client reads every byte the good client wrote');
  await again.close();
  await good.close();
});

t.test('a Unix socket: a stale file from a killed server is replaced, a live server\'s is left to it', async (t) => {
  // Short: a Unix socket path has at most 107 bytes, and the test directory's path is longer.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bf-sock-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'nbd.sock');
  // A server SIGKILLed while listening leaves its socket file behind.
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => process.stdout.write('up'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((r) => child.stdout!.once('data', r));
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  const first = new NbdServer({ exports: [{ name: 'a', device: new MemoryDevice(SIZE) }] });
  t.teardown(() => first.close({ graceMs: 100 }));
  await first.listen({ path: sock });
  const uri = `nbd+unix:///a?socket=${sock}`;
  t.equal((await run('nbdinfo', ['--size', uri])).stdout.trim(), String(SIZE), 'the stale file was replaced: the new server answers on it');

  const second = new NbdServer({ exports: [{ name: 'b', device: new MemoryDevice(SIZE) }] });
  t.teardown(() => second.close({ graceMs: 100 }));
  await t.rejects(second.listen({ path: sock }), { code: 'EADDRINUSE', message: /socket .*nbd\.sock is in use/ }, 'a second server is refused the live socket');
  t.equal((await run('nbdinfo', ['--size', uri])).stdout.trim(), String(SIZE), 'and the first still answers on it');
});

t.test('a Unix socket path too long for Linux is refused by name, not cut short', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bf-sock-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'x'.repeat(120 - dir.length), 'nbd.sock');
  fs.mkdirSync(path.dirname(sock));
  const server = new NbdServer({ exports: [{ name: 'a', device: new MemoryDevice(SIZE) }] });
  t.teardown(() => server.close({ graceMs: 100 }));
  await t.rejects(server.listen({ path: sock }), { code: 'ENAMETOOLONG', message: /socket path .*nbd\.sock is \d+ bytes; .* at most 107/ }, 'refused with its length');
  t.same([fs.readdirSync(dir), fs.readdirSync(path.dirname(sock))], [[path.basename(path.dirname(sock))], []], 'and no socket appears under a cut name');
  const ok = path.join(dir, 'y'.repeat(107 - dir.length - 1));
  await server.listen({ path: ok });
  t.equal((await run('nbdinfo', ['--size', `nbd+unix:///a?socket=${ok}`])).stdout.trim(), String(SIZE), 'a path of exactly 107 bytes is served');
});
