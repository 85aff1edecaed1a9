// The replayer's frame reader (src/replayer/frame-reader.ts) sits between a primary's socket and ws: it must
// hand ws exactly the bytes that arrived, in order, however the frames are cut into reads, read large frames
// into reused buffers, and leave every check (size limit, compression) to ws.
import t, { type Test } from 'tap';
import http from 'node:http';
import net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { WebSocket, WebSocketServer } from 'ws';
import { adoptFrameReader, framesOutstanding, releaseFrame } from '../src/replayer/frame-reader.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

interface Got {
  hash: string;
  length: number;
  /** The message viewed a frame buffer of its own (not a copy ws made). */
  framed: boolean;
  buffer: ArrayBuffer;
}

/** A server like the replayer's: plain HTTP, upgrades through adoptFrameReader, releases each message once handled. */
async function server(t: Test, opts: { maxPayload?: number; deflate?: boolean } = {}) {
  const maxPayload = opts.maxPayload ?? 64 * 2 ** 20;
  const wss = new WebSocketServer({ noServer: true, maxPayload, perMessageDeflate: opts.deflate ? { threshold: 1024 } : false });
  const links: Array<{ got: Got[]; closed: Promise<number> }> = [];
  const http1 = http.createServer((_req, res) => res.writeHead(426).end());
  http1.on('upgrade', (req, socket: net.Socket, head: Buffer) => {
    const link = adoptFrameReader(socket, head, maxPayload);
    wss.handleUpgrade(req, link.socket, link.head, (ws) => {
      const got: Got[] = [];
      const closed = new Promise<number>((resolve) => ws.on('close', (code) => resolve(code)));
      ws.on('error', () => undefined);
      ws.on('message', (raw: Buffer) => {
        const before = framesOutstanding();
        got.push({ hash: sha(raw), length: raw.length, framed: before > 0 && raw.buffer.byteLength % 2 ** 20 === 0 && raw.byteOffset <= 14, buffer: raw.buffer as ArrayBuffer });
        releaseFrame(raw);
        ws.send(String(got.length));
      });
      links.push({ got, closed });
    });
  });
  await new Promise<void>((r) => http1.listen(0, '127.0.0.1', r));
  t.teardown(async () => {
    for (const c of wss.clients) c.terminate();
    await new Promise((r) => http1.close(r));
  });
  return { port: (http1.address() as net.AddressInfo).port, links };
}

/** Sends `payloads` from a ws client and waits until the server has counted them all. */
async function sendAll(port: number, payloads: Buffer[], opts: { deflate?: boolean } = {}): Promise<void> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}`, { perMessageDeflate: opts.deflate ?? false, maxPayload: 64 * 2 ** 20 });
  await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
  const done = new Promise<void>((resolve) => ws.on('message', (m) => Number(m.toString()) === payloads.length && resolve()));
  for (const p of payloads) ws.send(p);
  await done;
  ws.close();
}

function sizes(n: number): number[] {
  const pick = [0, 1, 125, 126, 65535, 65536, 65537, 100_000, 2 ** 20 - 7, 2 ** 20 + 3, 4 * 2 ** 20 + 214, 9 * 2 ** 20];
  return Array.from({ length: n }, (_, i) => (i < pick.length ? pick[i] : pick[Math.floor(Math.random() * pick.length)]));
}

t.test('messages of every size arrive whole and in order; large ones in reused frame buffers', async (t) => {
  const s = await server(t);
  const payloads = sizes(80).map((n) => randomBytes(n));
  await sendAll(s.port, payloads);
  const got = s.links[0].got;
  t.same(got.map((g) => g.hash), payloads.map(sha), 'every message byte for byte, in order');
  const large = got.filter((g) => g.length >= 65536);
  t.ok(large.length > 20, `${large.length} large messages`);
  t.ok(large.every((g) => g.framed), 'each large message is a view of a frame buffer, not a copy');
  t.ok(got.filter((g) => g.length < 65536).every((g) => !g.framed), 'small ones are plain copies');
  const distinct = new Set(large.map((g) => g.buffer)).size;
  t.ok(distinct <= 8, `frame buffers were reused: ${distinct} buffers for ${large.length} large messages`);
  t.equal(framesOutstanding(), 0, 'every frame buffer came back');
});

/** A client frame as a browser sends it: masked with a random key. */
function frame(payload: Buffer): Buffer {
  const n = payload.length;
  let hdr: Buffer;
  if (n < 126) hdr = Buffer.from([0x82, 0x80 | n]);
  else if (n < 65536) {
    hdr = Buffer.from([0x82, 0x80 | 126, 0, 0]);
    hdr.writeUInt16BE(n, 2);
  } else {
    hdr = Buffer.alloc(10);
    hdr[0] = 0x82;
    hdr[1] = 0x80 | 127;
    hdr.writeBigUInt64BE(BigInt(n), 2);
  }
  const mask = randomBytes(4);
  const body = Buffer.from(payload);
  for (let i = 0; i < n; i++) body[i] ^= mask[i & 3];
  return Buffer.concat([hdr, mask, body]);
}

const HANDSHAKE =
  'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
  'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n';

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test('frames cut anywhere into reads, headers split byte by byte, bytes right behind the request', async (t) => {
  const s = await server(t);
  const payloads = [randomBytes(70_000), randomBytes(10), randomBytes(3 * 2 ** 20 + 5), randomBytes(65536), randomBytes(200), randomBytes(2 ** 20)];
  const sock = net.connect(s.port, '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  sock.setNoDelay(true);
  t.teardown(() => sock.destroy());
  const frames = payloads.map(frame);
  // The first frame's first 7 bytes travel with the request: they reach the server as the upgrade's head.
  sock.write(Buffer.concat([Buffer.from(HANDSHAKE), frames[0].subarray(0, 7)]));
  await pause(20);
  for (const [i, f] of frames.entries()) {
    let at = i === 0 ? 7 : 0;
    // One byte, then two, then the rest of the header region, each read on its own.
    for (const step of [1, 2, 11]) {
      if (at >= f.length) break;
      sock.write(f.subarray(at, Math.min(f.length, at + step)));
      at += step;
      await pause(10);
    }
    while (at < f.length) {
      const n = 1 + Math.floor(Math.random() * 300_000);
      sock.write(f.subarray(at, Math.min(f.length, at + n)));
      at += n;
      if (Math.random() < 0.3) await pause(1);
    }
  }
  for (let i = 0; i < 500 && (s.links[0]?.got.length ?? 0) < payloads.length; i++) await pause(10);
  t.same(s.links[0].got.map((g) => g.hash), payloads.map(sha), 'every message byte for byte, in order');
  t.equal(framesOutstanding(), 0);
});

t.test('a frame over the size limit is refused by ws, and the server goes on serving other links', async (t) => {
  const s = await server(t, { maxPayload: 2 ** 20 });
  const sock = net.connect(s.port, '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  t.teardown(() => sock.destroy());
  let heard = Buffer.alloc(0);
  sock.on('data', (d: Buffer) => (heard = Buffer.concat([heard, d])));
  const hostile = frame(randomBytes(2 ** 20 + 1));
  sock.write(Buffer.concat([Buffer.from(HANDSHAKE), hostile.subarray(0, 100_000)]));
  // After the 101 response ws sends a close frame: 0x88, length 2, status 1009 (message too big).
  const closeFrame = () => {
    const end = heard.indexOf('\r\n\r\n');
    return end < 0 ? undefined : heard.subarray(end + 4);
  };
  for (let i = 0; i < 300 && (closeFrame()?.length ?? 0) < 4; i++) await pause(10);
  const cf = closeFrame();
  t.ok(cf && cf[0] === 0x88, 'the server sent a close frame');
  t.equal(cf?.readUInt16BE(2), 1009, `with status 1009 (message too big): ${cf?.toString('hex')}`);
  sock.destroy();
  t.equal(await s.links[0].closed, 1006, 'and the link is gone');
  const payloads = [randomBytes(2 ** 20), randomBytes(5)];
  await sendAll(s.port, payloads);
  t.same(s.links[1].got.map((g) => g.hash), payloads.map(sha), 'another link still works');
  t.equal(framesOutstanding(), 0);
});

t.test('compressed messages go through as they came (ws inflates them)', async (t) => {
  const s = await server(t, { deflate: true });
  const payloads = sizes(30).map((n) => (n % 2 ? randomBytes(n) : Buffer.alloc(n, 'blockferry ')));
  await sendAll(s.port, payloads, { deflate: true });
  t.same(s.links[0].got.map((g) => g.hash), payloads.map(sha), 'every message byte for byte, in order');
  t.equal(framesOutstanding(), 0);
});

t.test('fragmented messages arrive whole, and leave no frame buffer behind', async (t) => {
  const s = await server(t);
  const payloads = Array.from({ length: 12 }, (_, i) => randomBytes(2 ** 20 + i * 70_001));
  const ws = new WebSocket(`ws://127.0.0.1:${s.port}`, { perMessageDeflate: false, maxPayload: 64 * 2 ** 20 });
  await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
  t.teardown(() => ws.terminate());
  const done = new Promise<void>((resolve) => ws.on('message', (m) => Number(m.toString()) === payloads.length && resolve()));
  // Each message in three fragments of at least 64 KiB: a first frame, a continuation, a final continuation.
  for (const p of payloads) {
    const a = Math.floor(p.length / 3);
    ws.send(p.subarray(0, a), { fin: false });
    ws.send(p.subarray(a, 2 * a), { fin: false });
    ws.send(p.subarray(2 * a), { fin: true });
  }
  await done;
  t.same(s.links[0].got.map((g) => g.hash), payloads.map(sha), 'every message byte for byte, in order');
  t.equal(framesOutstanding(), 0, 'no fragment holds a frame buffer while the link stays open');
  ws.close();
});
