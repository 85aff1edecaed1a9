// Clients that attack by numbers or by silence, against a real NbdServer on loopback, while real clients
// (nbdinfo, nbdcopy) keep being served: a flood of connections beyond the cap, and connections that never
// finish (or never start) their handshake, which the handshake deadline closes.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { MemoryDevice } from '../src/device/memory-device.js';
import { NbdServer } from '../src/nbd/server.js';
import { run } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;

function open(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.on('error', reject);
    s.resume(); // read (and drop) the greeting, so the server's close is seen
  });
}

const closedWithin = (s: net.Socket, ms: number) =>
  new Promise<boolean>((resolve) => {
    if (s.destroyed) return resolve(true);
    const timer = setTimeout(() => resolve(false), ms);
    s.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });

t.test('a flood of connections beyond the cap and silent handshakes: real clients are still served', async (t) => {
  const server = new NbdServer({ exports: [{ name: 'disk', device: new MemoryDevice(SIZE) }], maxConnections: 64, handshakeTimeoutMs: 1500 });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const sockets: net.Socket[] = [];
  t.teardown(async () => {
    for (const s of sockets) s.destroy();
    await server.close({ graceMs: 100 });
  });

  // 600 connections that never say anything after the greeting (and 100 that send half an option).
  for (let i = 0; i < 600; i++) {
    const s = await open(port).catch(() => undefined);
    if (s) {
      s.on('error', () => undefined);
      sockets.push(s);
    }
  }
  for (const s of sockets.slice(0, 100)) s.write(Buffer.from([0, 0, 0, 3, 0x49, 0x48, 0x41])); // flags + a partial IHAVEOPT
  await new Promise((r) => setTimeout(r, 300));
  t.ok(server.connectionCount <= 64, `the server holds at most its cap of 64 connections (${server.connectionCount}) out of 600 opened`);
  const refused = (await Promise.all(sockets.map((s) => closedWithin(s, 0)))).filter(Boolean).length;
  t.ok(refused >= 600 - 64, `connections over the cap were closed at once (${refused})`);

  // Every silent one is closed by the handshake deadline, freeing room for real clients.
  const closed = (await Promise.all(sockets.map((s) => closedWithin(s, 5000)))).filter(Boolean).length;
  t.equal(closed, sockets.length, `the handshake deadline closed every silent connection (${closed}/${sockets.length})`);
  for (let i = 0; i < 40 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
  t.equal(server.connectionCount, 0, 'no connection is left over');

  const info = await run('nbdinfo', [`nbd://127.0.0.1:${port}/disk`]);
  t.match(info.stdout, new RegExp(`export-size: ${SIZE}`), 'nbdinfo is served afterwards');
  const data = randomBytes(2 ** 20);
  const dir = t.testdir();
  fs.writeFileSync(path.join(dir, 'in'), data);
  await run('nbdcopy', [path.join(dir, 'in'), `nbd://127.0.0.1:${port}/disk`]);
  await run('nbdcopy', [`nbd://127.0.0.1:${port}/disk`, path.join(dir, 'out')]);
  t.ok(fs.readFileSync(path.join(dir, 'out')).subarray(0, data.length).equals(data), 'and nbdcopy writes and reads back data');
});

t.test('while silent connections hold the server, a real client still gets in', async (t) => {
  const server = new NbdServer({ exports: [{ name: 'disk', device: new MemoryDevice(SIZE) }], maxConnections: 64, handshakeTimeoutMs: 60_000 });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const sockets: net.Socket[] = [];
  t.teardown(async () => {
    for (const s of sockets) s.destroy();
    await server.close({ graceMs: 100 });
  });
  for (let i = 0; i < 40; i++) {
    const s = await open(port);
    s.on('error', () => undefined);
    sockets.push(s);
  }
  const info = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk`]);
  t.equal(info.stdout.trim(), String(SIZE), 'nbdinfo is served while 40 silent handshakes are open');
});
