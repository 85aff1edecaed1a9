// The replication link secured: wss:// with a pinned certificate or a trusted CA, per-volume tokens compared
// in constant time and never logged. A wrong token, a token for another volume, an unknown volume, plain ws://
// to a TLS replayer and a certificate that is not the pinned one are all refused with clear reasons, and
// nothing reaches the replica.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, run, runStatus, startReplay, startServe } from './helpers/processes.js';

const SIZE = 8 * 2 ** 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function writeSome(port: number, name: string): Promise<Buffer> {
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port, exportName: name });
  const data = randomBytes(256 * 1024);
  await c.write(0, data);
  await c.flush();
  await c.close();
  return data;
}

function replicaHas(file: string, data: Buffer): boolean {
  if (!fs.existsSync(file)) return false;
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(data.length);
  fs.readSync(fd, b, 0, b.length, 0);
  fs.closeSync(fd);
  return b.equals(data);
}

t.test('wss + tokens: the right volume with the right token replicates; everything else is refused', async (t) => {
  const dir = t.testdir();
  // A self-signed certificate for the replayer, and a second one it does not have (for a wrong pin).
  const cert = path.join(dir, 'replay.crt');
  const key = path.join(dir, 'replay.key');
  await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1']);
  const other = path.join(dir, 'other.crt');
  await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(dir, 'other.key'), '-out', other, '-days', '2', '-subj', '/CN=other']);
  const fingerprint = (await run('openssl', ['x509', '-in', cert, '-noout', '-fingerprint', '-sha256'])).stdout.trim().split('=')[1];
  const wrongPin = (await run('openssl', ['x509', '-in', other, '-noout', '-fingerprint', '-sha256'])).stdout.trim().split('=')[1];

  const tokenA = randomBytes(24).toString('hex');
  const tokenB = randomBytes(24).toString('hex');
  const replayTokens = path.join(dir, 'replay.tokens');
  fs.writeFileSync(replayTokens, `# volume token\na ${tokenA}\nb ${tokenB}\n`);
  const data = path.join(dir, 'replicas');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data, '--token-file', replayTokens, '--tls-cert', cert, '--tls-key', key], t.teardown);
  t.match(replay.url, /^wss:\/\//, 'the replayer listens on wss://');

  // Volume a, its own token, the certificate pinned: replicates.
  const primaryTokens = path.join(dir, 'primary.tokens');
  fs.writeFileSync(primaryTokens, `a ${tokenA}\nb ${tokenA}\nc ${tokenA}\n`); // b and c get a's token: must not work
  const img = (n: string) => path.join(dir, `${n}.img`);
  const serve = (n: string, extra: string[]) =>
    startServe(['--image', `${n}=${img(n)}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--token-file', primaryTokens, ...extra], t.teardown);
  const a = await serve('a', ['--replica-fingerprint', fingerprint]);
  const da = await writeSome(a.port, 'a');
  t.ok(await until(() => replicaHas(path.join(data, 'a.img'), da), 30_000, 100), 'volume a replicates over wss with its token and the pinned certificate');
  const v = await run(process.execPath, [CLI, 'verify', '--image', `a=${img('a')}`, '--replica', replay.url, '--token-file', primaryTokens, '--replica-ca', cert]);
  t.match(v.stdout, /identical/, 'verify works over wss with the CA and the token');
  t.equal(await a.stop(), 0, 'serve stops cleanly');

  // Volume b with a's token: refused; nothing written.
  const b = await serve('b', ['--replica-ca', cert]);
  await writeSome(b.port, 'b');
  t.ok(await until(() => /ERR_AUTH/.test(b.stderr()), 30_000, 100), "a token for volume a never grants volume b");
  t.notOk(fs.existsSync(path.join(data, 'b.img')), 'no replica of b was created');
  t.equal(await b.stop(), 0, 'serve stops cleanly');

  // Volume c is not in the replayer's token file at all.
  const c = await serve('c', ['--replica-ca', cert]);
  await writeSome(c.port, 'c');
  t.ok(await until(() => /ERR_UNKNOWN_VOLUME/.test(c.stderr()), 30_000, 100), 'an unknown volume is refused');
  t.equal(await c.stop(), 0, 'serve stops cleanly');

  // A wrong pin: the link is dropped before the hello, so the token never leaves.
  const a2 = await serve('a', ['--replica-fingerprint', wrongPin, '--admin', '127.0.0.1:0']);
  t.ok(await until(() => /is not the pinned/.test(a2.stderr()), 30_000, 100), 'a certificate that is not the pinned one is refused');
  // And the operator is told why, where they look first (not only in the log).
  const admin = /admin on (http:\/\/\S+)/.exec(a2.stdout())![1];
  const st = await runStatus(process.execPath, [CLI, 'status', '--admin', admin, '--json']);
  t.match(JSON.parse(st.stdout).volumes[0].replicas[0].lastError, /is not the pinned/, 'status names the pin mismatch as the replica\'s last error');
  t.equal(await a2.stop(), 0, 'serve stops cleanly');

  // Plain ws:// to the TLS port fails; an untrusted certificate (no CA, no pin) fails.
  const a3 = await startServe(['--image', `a=${img('a')}`, '--listen', '127.0.0.1:0', '--replicate-to', replay.url.replace('wss:', 'ws:'), '--token-file', primaryTokens], t.teardown);
  const a4 = await startServe(['--image', `a=${img('a')}.copy`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--token-file', primaryTokens], t.teardown);
  await sleep(1500);
  for (const s of [a3, a4]) {
    const st = s.stderr();
    t.notMatch(st, /replication link open/, 'no link is established');
  }
  t.equal(await a3.stop(), 0, 'serve stops cleanly');
  t.equal(await a4.stop(), 0, 'serve stops cleanly');

  // Tokens never appear in any log.
  for (const s of [a, b, c, a2, a3, a4]) t.notMatch(s.stderr(), new RegExp(`${tokenA}|${tokenB}`), 'no token in the primary log');
});
