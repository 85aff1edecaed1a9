// A replayer that accepts the link and then stops reading must not grow the primary's memory: the replicator
// keeps at most its window of bytes in flight, so writes keep flowing into the journal while the heap stays
// flat. Measured on the real serve process (RssAnon: heap and buffers, not the page cache).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { WebSocketServer } from 'ws';
import { decode, encode, PROTOCOL_VERSION } from '../src/replicator/protocol.js';
import { run, startServe } from './helpers/processes.js';

function rssAnonMiB(pid: number): number {
  const m = /RssAnon:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

t.test('a replayer that stops reading cannot grow the primary heap', async (t) => {
  const dir = t.testdir();
  // The stalled peer: says welcome, then never reads again.
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  t.teardown(
    () =>
      new Promise<void>((r) => {
        for (const c of wss.clients) c.terminate(); // paused sockets would never see the close
        wss.close(() => r());
      }),
  );
  let stalled = false;
  wss.on('connection', (ws) => {
    ws.once('message', (raw: Buffer) => {
      const hello = decode(raw);
      if (hello.t !== 'hello') return ws.terminate();
      ws.send(encode({ v: PROTOCOL_VERSION, t: 'welcome', appliedSeq: 0, consistentFrom: null }));
      // Stop reading: TCP buffers fill and the primary's sends back up.
      (ws as unknown as { _socket: { pause(): void } })._socket.pause();
      stalled = true;
    });
  });
  const port = (wss.address() as { port: number }).port;
  const image = path.join(dir, 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '512M', '--listen', '127.0.0.1:0', '--replicate-to', `ws://127.0.0.1:${port}`], t.teardown);
  const before = rssAnonMiB(s.child.pid!);

  // 384 MiB of writes: 24 times the replicator's 16 MiB window.
  const src = path.join(dir, 'src.bin');
  const fd = fs.openSync(src, 'w');
  const chunk = Buffer.alloc(16 * 2 ** 20);
  for (let i = 0; i < 24; i++) fs.writeSync(fd, chunk.fill(i + 1));
  fs.closeSync(fd);
  await run('nbdcopy', [src, s.uri]);
  const after = rssAnonMiB(s.child.pid!);
  t.ok(stalled, 'the replica link was established and then stalled');
  t.ok(after - before < 128, `serve's anonymous memory grew ${(after - before).toFixed(0)} MiB (from ${before.toFixed(0)} to ${after.toFixed(0)}) for 384 MiB written`);
  const status = s.stderr();
  t.notMatch(status, /FATAL|heap out of memory/i, 'no memory trouble in the log');
  t.equal(await s.stop('SIGKILL'), null, 'serve is killed (it would wait for the stalled replica)');
});
