// NBD over TLS (STARTTLS): the option rules of proto.md's FORCEDTLS and SELECTIVETLS modes byte by byte, then
// `blockferry serve --tls=...` with real clients: nbdinfo/nbdcopy over nbds:// and qemu-img/qemu-io with
// tls-creds-x509. A throwaway CA, server and client certificates are made with openssl in the test directory.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { MemoryDevice } from '../src/device/memory-device.js';
import { Opt, Rep } from '../src/nbd/constants.js';
import { Negotiation } from '../src/nbd/negotiation.js';
import { NbdServer } from '../src/nbd/server.js';
import { createNbdTls } from '../src/nbd/tls.js';
import { nameData, option, wire } from './helpers/nbd-wire.js';
import { CLI, run } from './helpers/processes.js';

const SIZE = 16 * 2 ** 20;
const NBD_FLAG_SEND_DF = 1 << 7;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---------------------------------------------------------------------------------------------------------
// Certificates

interface Pki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** Directories in the layout libnbd's tls-certificates= and qemu's tls-creds-x509 dir= expect. */
  clientDir: string; // ca-cert.pem, client-cert.pem, client-key.pem
  anonDir: string; // ca-cert.pem only: trusts the server, has no certificate of its own
  pem(name: string): Buffer;
}

function openssl(args: string[], cwd: string): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve({ stdout, stderr }) : reject(new Error(`openssl ${args.join(' ')}: ${stderr}`))));
  });
}

/** A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second CA's client certificate. */
async function makePki(dir: string): Promise<Pki> {
  const key = (file: string) => openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file], dir);
  const ca = async (name: string) => {
    await key(`${name}-key.pem`);
    const caExt = ['-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'];
    await openssl(['req', '-x509', '-new', '-key', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '2', '-subj', `/CN=blockferry test ${name}`, ...caExt], dir);
  };
  const leaf = async (name: string, caName: string, usage: string, san?: string) => {
    await key(`${name}-key.pem`);
    await openssl(['req', '-new', '-key', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=blockferry test ${name}`], dir);
    const ext = ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature', `extendedKeyUsage=${usage}`];
    if (san) ext.push(`subjectAltName=${san}`);
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext.join('\n') + '\n');
    await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${caName}-cert.pem`, '-CAkey', `${caName}-key.pem`, '-CAcreateserial',
      '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`], dir);
  };
  await ca('ca');
  await ca('rogue-ca');
  await leaf('server', 'ca', 'serverAuth', 'IP:127.0.0.1,DNS:localhost');
  await leaf('client', 'ca', 'clientAuth');
  await leaf('rogue-client', 'rogue-ca', 'clientAuth');
  const p = (f: string) => path.join(dir, f);
  const clientDir = p('client-creds');
  const anonDir = p('anon-creds');
  for (const d of [clientDir, anonDir]) {
    fs.mkdirSync(d);
    fs.copyFileSync(p('ca-cert.pem'), path.join(d, 'ca-cert.pem'));
  }
  fs.copyFileSync(p('client-cert.pem'), path.join(clientDir, 'client-cert.pem'));
  fs.copyFileSync(p('client-key.pem'), path.join(clientDir, 'client-key.pem'));
  return {
    dir,
    caCert: p('ca-cert.pem'),
    serverCert: p('server-cert.pem'),
    serverKey: p('server-key.pem'),
    clientDir,
    anonDir,
    pem: (name) => fs.readFileSync(p(name)),
  };
}

// ---------------------------------------------------------------------------------------------------------
// A raw client: option haggling by hand, and the TLS upgrade with node:tls.

async function handshake(port: number, teardown: (fn: () => unknown) => void) {
  const sock = net.connect(port, '127.0.0.1');
  sock.on('error', () => undefined);
  teardown(() => sock.destroy());
  const w = wire(sock);
  const greeting = await w.read(18);
  sock.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
  return { sock, w, greeting };
}

/** STARTTLS (already acknowledged) → a TLS client on the same socket; resolves once the client side is up. */
async function upgrade(sock: net.Socket, pki: Pki, creds: { cert?: Buffer; key?: Buffer } = {}) {
  const secure = tls.connect({ socket: sock, ca: pki.pem('ca-cert.pem'), servername: 'localhost', ...creds });
  secure.on('error', () => undefined);
  await once(secure, 'secureConnect');
  return { secure, w: wire(secure) };
}

/** GO to `name`: returns the transmission flags from NBD_REP_INFO. */
async function go(w: ReturnType<typeof wire>, name: string): Promise<number> {
  w.stream.write(option(Opt.NBD_OPT_GO, nameData(name)));
  let flags = -1;
  for (;;) {
    const r = await w.reply();
    if (r.type === Rep.NBD_REP_ACK) return flags;
    if (r.type !== Rep.NBD_REP_INFO) throw new Error(`GO answered ${r.type}`);
    if (r.data.readUInt16BE(0) === 0) flags = r.data.readUInt16BE(10);
  }
}

function request(type: number, handle: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(BigInt(handle), 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length, 24);
  return b;
}

function tlsServer(pki: Pki, mode: 'on' | 'require', withCa: boolean, t: { teardown(fn: () => unknown): void }, handshakeTimeoutMs?: number) {
  const server = new NbdServer({
    exports: [{ name: 'disk', device: new MemoryDevice(SIZE) }],
    tls: createNbdTls({ mode, cert: pki.pem('server-cert.pem'), key: pki.pem('server-key.pem'), ca: withCa ? pki.pem('ca-cert.pem') : undefined }),
    handshakeTimeoutMs,
  });
  t.teardown(() => server.close({ graceMs: 100 }));
  return server;
}

// ---------------------------------------------------------------------------------------------------------

const pkiDir = t.testdir();
let pki: Pki;
t.before(async () => {
  pki = await makePki(pkiDir);
});

t.test('the negotiation state machine (pure): FORCEDTLS before and after STARTTLS', async (t) => {
  const exports = [{ name: 'disk', device: new MemoryDevice(SIZE) }];
  const before = new Negotiation(exports, true, 'require');
  for (const opt of [Opt.NBD_OPT_LIST, Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO, Opt.NBD_OPT_STRUCTURED_REPLY, Opt.NBD_OPT_SET_META_CONTEXT, 4242]) {
    const out = before.handle(opt, opt === Opt.NBD_OPT_GO || opt === Opt.NBD_OPT_INFO ? nameData('disk') : Buffer.alloc(0));
    t.equal(out.next, 'continue', `option ${opt} before TLS: haggling goes on`);
    t.equal(out.replies[0].readUInt32BE(12), Rep.NBD_REP_ERR_TLS_REQD, `option ${opt} before TLS: NBD_REP_ERR_TLS_REQD`);
  }
  t.same(before.handle(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('disk')), { next: 'close', replies: [] }, 'EXPORT_NAME before TLS: hang up, nothing sent');
  t.equal(before.handle(Opt.NBD_OPT_STARTTLS, Buffer.from('x')).replies[0].readUInt32BE(12), Rep.NBD_REP_ERR_INVALID, 'STARTTLS with data: ERR_INVALID');
  const start = before.handle(Opt.NBD_OPT_STARTTLS, Buffer.alloc(0));
  t.equal(start.next, 'starttls', 'STARTTLS: initiate TLS');
  t.equal(start.replies[0].readUInt32BE(12), Rep.NBD_REP_ACK, 'after an ACK');
  const after = before.restartUnderTls();
  t.equal(after.handle(Opt.NBD_OPT_STARTTLS, Buffer.alloc(0)).replies[0].readUInt32BE(12), Rep.NBD_REP_ERR_INVALID, 'a second STARTTLS: ERR_INVALID');
  t.equal(after.handle(Opt.NBD_OPT_LIST, Buffer.alloc(0)).replies.at(-1)!.readUInt32BE(12), Rep.NBD_REP_ACK, 'under TLS, LIST is answered');

  const selective = new Negotiation(exports, true, 'on');
  selective.handle(Opt.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
  t.equal(selective.handle(Opt.NBD_OPT_GO, nameData('disk')).next, 'transmission', 'tls=on: a plain-text client may go straight to transmission');
  const fresh = selective.restartUnderTls();
  const out = fresh.handle(Opt.NBD_OPT_GO, nameData('disk'));
  t.equal(out.next === 'transmission' && out.session.structured, false, 'STRUCTURED_REPLY from before STARTTLS is forgotten');
  t.equal(new Negotiation(exports, true).handle(Opt.NBD_OPT_STARTTLS, Buffer.alloc(0)).replies[0].readUInt32BE(12), Rep.NBD_REP_ERR_POLICY, 'no TLS configured: ERR_POLICY');
});

t.test('--tls=require over a socket: every option but STARTTLS refused, then everything served over TLS', async (t) => {
  const server = tlsServer(pki, 'require', false, t);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });

  const { sock, w } = await handshake(port, t.teardown.bind(t));
  for (const [opt, data] of [[Opt.NBD_OPT_LIST, undefined], [Opt.NBD_OPT_INFO, nameData('disk')], [Opt.NBD_OPT_GO, nameData('disk')], [Opt.NBD_OPT_STRUCTURED_REPLY, undefined], [4242, Buffer.from('junk')]] as const) {
    const r = await w.ask(opt, data);
    t.same([r.option, r.type], [opt, Rep.NBD_REP_ERR_TLS_REQD], `option ${opt} in plain text: NBD_REP_ERR_TLS_REQD`);
  }
  t.equal((await w.ask(Opt.NBD_OPT_STARTTLS, Buffer.from('x'))).type, Rep.NBD_REP_ERR_INVALID, 'STARTTLS with data: ERR_INVALID');
  t.equal((await w.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ACK, 'STARTTLS: ACK');
  w.detach();
  const { secure, w: tw } = await upgrade(sock, pki);
  t.ok(secure.getProtocol() === 'TLSv1.3' || secure.getProtocol() === 'TLSv1.2', `TLS is up (${secure.getProtocol()})`);
  t.equal((await tw.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ERR_INVALID, 'STARTTLS again under TLS: ERR_INVALID');
  const list = await tw.ask(Opt.NBD_OPT_LIST);
  t.equal(list.type, Rep.NBD_REP_SERVER, 'LIST is answered under TLS');
  t.equal((await tw.reply()).type, Rep.NBD_REP_ACK);
  await go(tw, 'disk');
  const data = randomBytes(4096);
  secure.write(Buffer.concat([request(1, 7, 8192, data.length), data]));
  const wr = await tw.read(16);
  t.same([wr.readUInt32BE(0), wr.readUInt32BE(4)], [SIMPLE_REPLY_MAGIC, 0], 'WRITE over TLS: simple reply, no error');
  secure.write(request(0, 8, 8192, data.length));
  const rd = await tw.read(16);
  t.equal(rd.readUInt32BE(4), 0, 'READ over TLS: no error');
  t.ok((await tw.read(data.length)).equals(data), 'and it reads back what was written');
  secure.write(request(2, 9, 0, 0)); // DISC
  t.ok(await tw.endsWithin(2000), 'DISC closes the TLS connection');
});

t.test('--tls=require: EXPORT_NAME in plain text hangs up; the server keeps serving TLS clients', async (t) => {
  const server = tlsServer(pki, 'require', false, t);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const { sock, w } = await handshake(port, t.teardown.bind(t));
  sock.write(option(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  t.ok(await w.endsWithin(2000), 'EXPORT_NAME before TLS: the connection is closed');
  t.equal(w.buffered, 0, 'and nothing of the export was sent');

  const old = await handshake(port, t.teardown.bind(t));
  old.sock.end(Buffer.from([0, 0, 0, 0])); // no FIXED_NEWSTYLE: TLS is impossible, so nothing can be served
  t.ok(await old.w.endsWithin(2000), 'a client without fixed newstyle is closed');

  const c = await handshake(port, t.teardown.bind(t));
  t.equal((await c.w.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ACK);
  c.w.detach();
  const { w: tw } = await upgrade(c.sock, pki);
  t.not(await go(tw, 'disk'), -1, 'a TLS client still gets in');
});

t.test('--tls=on: plain and TLS clients both served, and STARTTLS forgets what was negotiated before it', async (t) => {
  const server = tlsServer(pki, 'on', false, t);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });

  const plain = await handshake(port, t.teardown.bind(t));
  t.equal((await plain.w.ask(Opt.NBD_OPT_STRUCTURED_REPLY)).type, Rep.NBD_REP_ACK);
  t.ok((await go(plain.w, 'disk')) & NBD_FLAG_SEND_DF, 'a plain-text client is served (structured replies on)');

  const c = await handshake(port, t.teardown.bind(t));
  t.equal((await c.w.ask(Opt.NBD_OPT_STRUCTURED_REPLY)).type, Rep.NBD_REP_ACK, 'STRUCTURED_REPLY in plain text: ACK');
  t.equal((await c.w.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ACK, 'STARTTLS: ACK');
  c.w.detach();
  const { secure, w: tw } = await upgrade(c.sock, pki);
  const flags = await go(tw, 'disk');
  t.equal(flags & NBD_FLAG_SEND_DF, 0, 'after STARTTLS, structured replies are not on (the earlier request is forgotten)');
  secure.write(request(0, 1, 0, 512));
  t.equal((await tw.read(16)).readUInt32BE(0), SIMPLE_REPLY_MAGIC, 'so a READ gets a simple reply');

  const d = await handshake(port, t.teardown.bind(t));
  t.equal((await d.w.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ACK);
  d.w.detach();
  const again = await upgrade(d.sock, pki);
  t.equal((await again.w.ask(Opt.NBD_OPT_STRUCTURED_REPLY)).type, Rep.NBD_REP_ACK, 'STRUCTURED_REPLY asked under TLS');
  t.ok((await go(again.w, 'disk')) & NBD_FLAG_SEND_DF, 'is kept');
  again.secure.write(request(0, 2, 0, 512));
  t.equal((await again.w.read(4)).readUInt32BE(0), STRUCTURED_REPLY_MAGIC, 'and READs get structured replies');
});

t.test('client certificates (--tls-ca): none or another CA\'s is refused; a stalled or bogus TLS handshake is closed', async (t) => {
  const server = tlsServer(pki, 'require', true, t, 1500);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const starttls = async () => {
    const c = await handshake(port, t.teardown.bind(t));
    t.equal((await c.w.ask(Opt.NBD_OPT_STARTTLS)).type, Rep.NBD_REP_ACK);
    c.w.detach();
    return c;
  };

  {
    const c = await starttls();
    const { secure, w } = await upgrade(c.sock, pki, { cert: pki.pem('client-cert.pem'), key: pki.pem('client-key.pem') });
    t.not(await go(w, 'disk'), -1, 'a certificate from the CA: served');
    secure.write(request(2, 1, 0, 0)); // DISC
    t.ok(await w.endsWithin(2000), 'and disconnects cleanly');
  }
  for (const [what, creds] of [
    ['no certificate', {}],
    ["another CA's certificate", { cert: pki.pem('rogue-client-cert.pem'), key: pki.pem('rogue-client-key.pem') }],
  ] as const) {
    const c = await starttls();
    // Under TLS 1.3 the client finishes its side before the server has judged its certificate: it may send.
    const secure = tls.connect({ socket: c.sock, ca: pki.pem('ca-cert.pem'), servername: 'localhost', ...creds });
    secure.on('error', () => undefined);
    const w = wire(secure);
    secure.once('secureConnect', () => secure.write(option(Opt.NBD_OPT_LIST)));
    t.ok(await w.endsWithin(3000), `${what}: the connection is closed`);
    t.equal(w.buffered, 0, `${what}: not one option was answered`);
  }
  {
    const c = await starttls();
    t.ok(await wire(c.sock).endsWithin(4000), 'a client that never starts its TLS handshake is closed by the handshake deadline');
  }
  {
    const c = await starttls();
    c.sock.write(Buffer.from('this is not a TLS ClientHello\r\n'));
    t.ok(await wire(c.sock).endsWithin(2000), 'garbage instead of a ClientHello: closed');
  }
  {
    const c = await handshake(port, t.teardown.bind(t));
    c.sock.write(Buffer.concat([option(Opt.NBD_OPT_STARTTLS), Buffer.from('\x16\x03\x01 pipelined')]));
    const r = await c.w.reply();
    t.equal(r.type, Rep.NBD_REP_ACK, 'STARTTLS with bytes pipelined after it: the ACK is sent');
    t.ok(await c.w.endsWithin(2000), 'and the connection closed (a client must wait for the ACK)');
  }
  for (let i = 0; i < 20 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
  t.equal(server.connectionCount, 0, 'no connection is left over');
});

// ---------------------------------------------------------------------------------------------------------
// The CLI with real clients.

interface Serving {
  child: ChildProcess;
  port: number;
  stdout(): string;
  stderr(): string;
}

/** `blockferry serve ARGS`; resolves on its first `listening on` line. Killed by PID in teardown. */
function serve(args: string[], t: { teardown(fn: () => unknown): void }, opts: { wrap?: string[] } = {}): Promise<Serving> {
  const argv = [...(opts.wrap ?? []), process.execPath, CLI, 'serve', ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    return exited;
  });
  let out = '';
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not start in 20 s:\n${err}`)), 20_000);
    child.stdout!.on('data', (d) => {
      out += d;
      const m = /listening on nbds?:\/\/[^:]+:(\d+)\//.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ child, port: Number(m[1]), stdout: () => out, stderr: () => err });
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(Object.assign(new Error(`serve exited (${code ?? signal}) before listening:\n${err}`), { stderr: err }));
    });
  });
}

function fails(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let output = '';
    p.stdout.on('data', (d) => (output += d));
    p.stderr.on('data', (d) => (output += d));
    p.on('error', reject);
    p.on('exit', (code) => resolve({ code, output }));
  });
}

const qemuCreds = (dir: string) => ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}`];
const qemuImage = (port: number) => `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`;

t.test('serve --tls=require --tls-ca: nbdinfo, nbdcopy, qemu-img and qemu-io over TLS; plain text and anonymous clients refused', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const s = await serve(
    ['--image', `disk=${image}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--tls=require',
      '--tls-cert', pki.serverCert, '--tls-key', pki.serverKey, '--tls-ca', pki.caCert],
    t,
  );
  t.match(s.stdout(), `listening on nbds://127.0.0.1:${s.port}/disk`, 'the printed URI says nbds://');
  const uri = `nbds://127.0.0.1:${s.port}/disk?tls-certificates=${pki.clientDir}`;

  const info = await run('nbdinfo', [uri]);
  t.match(info.stdout, /with TLS/, 'nbdinfo negotiates TLS');
  t.match(info.stdout, `export-size: ${SIZE}`, 'and sees the export');

  const data = randomBytes(4 * 2 ** 20);
  fs.writeFileSync(path.join(dir, 'in'), data);
  await run('nbdcopy', [path.join(dir, 'in'), uri]);
  await run('nbdcopy', [uri, path.join(dir, 'out')]);
  t.ok(fs.readFileSync(path.join(dir, 'out')).subarray(0, data.length).equals(data), 'nbdcopy writes 4 MiB over TLS and reads them back');

  const qinfo = await run('qemu-img', ['info', ...qemuCreds(pki.clientDir), '--image-opts', qemuImage(s.port)]);
  t.match(qinfo.stdout, `virtual size: 16 MiB (${SIZE} bytes)`, 'qemu-img info over TLS');
  const off = 6 * 2 ** 20;
  await run('qemu-io', [...qemuCreds(pki.clientDir), '--image-opts', qemuImage(s.port), '-c', `write -P 0x5a ${off} 1M`, '-c', 'flush']);
  const check = await run('qemu-io', [...qemuCreds(pki.clientDir), '--image-opts', qemuImage(s.port), '-c', `read -P 0x5a ${off} 1M`, '-c', 'read -P 0 12M 4M']);
  t.match(check.stdout, /read 1048576\/1048576 bytes/, 'qemu-io writes a pattern over TLS and reads it back (read -P checks it)');
  const onDisk = fs.readFileSync(image);
  t.ok(onDisk.subarray(0, data.length).equals(data), "nbdcopy's data is in the image file");
  t.ok(onDisk.subarray(off, off + 2 ** 20).equals(Buffer.alloc(2 ** 20, 0x5a)), "and so is qemu-io's pattern");

  const plain = await fails('nbdinfo', [`nbd://127.0.0.1:${s.port}/disk`], { LIBNBD_DEBUG: '1' });
  t.not(plain.code, 0, 'plain-text nbdinfo fails');
  t.match(plain.output, /requires TLS/, 'told that the server requires TLS (NBD_REP_ERR_TLS_REQD)');
  t.notMatch(plain.output, /export-size/, 'and learns nothing about the export');
  const qplain = await fails('qemu-io', ['--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},export=disk`, '-c', 'read 0 4k']);
  t.not(qplain.code, 0, 'plain-text qemu-io fails');
  t.match(qplain.output, /TLS negotiation required/, 'qemu says TLS is required');

  const anon = await fails('nbdinfo', [`nbds://127.0.0.1:${s.port}/disk?tls-certificates=${pki.anonDir}`]);
  t.not(anon.code, 0, 'nbdinfo over TLS without a client certificate is refused');
  const qanon = await fails('qemu-io', [...qemuCreds(pki.anonDir), '--image-opts', qemuImage(s.port), '-c', 'read 0 4k']);
  t.not(qanon.code, 0, 'so is qemu-io without one');
  t.match(s.stderr(), /TLS handshake failed/, 'the server logs the refused handshakes');

  const after = await run('nbdinfo', ['--size', uri]);
  t.equal(after.stdout.trim(), String(SIZE), 'TLS clients are still served after the refusals');
});

t.test('serve --tls-cert alone: TLS on (no client certificates needed), plain text still served', async (t) => {
  const dir = t.testdir();
  const s = await serve(['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', String(SIZE), '--listen', '127.0.0.1:0',
    '--no-journal', '--tls-cert', pki.serverCert, '--tls-key', pki.serverKey], t);
  t.match(s.stdout(), 'listening on nbds://', 'a certificate turns TLS on');
  const viaTls = await run('nbdinfo', [`nbds://127.0.0.1:${s.port}/disk?tls-certificates=${pki.anonDir}`]);
  t.match(viaTls.stdout, /with TLS/, 'a client without a certificate of its own negotiates TLS');
  const viaPlain = await run('nbdinfo', [`nbd://127.0.0.1:${s.port}/disk`]);
  t.match(viaPlain.stdout, /without TLS/, 'and a plain-text client is served too (--tls=on)');
  const q = await run('qemu-img', ['info', ...qemuCreds(pki.anonDir), '--image-opts', qemuImage(s.port)]);
  t.match(q.stdout, /virtual size: 16 MiB/, 'qemu-img over TLS');
});

t.test('serve: TLS flags that cannot work are refused at startup; plain text beyond loopback is warned about', async (t) => {
  const dir = t.testdir();
  const img = ['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', '1M', '--no-journal', '--listen', '127.0.0.1:0'];
  for (const [why, args, expect] of [
    ['--tls=require without a certificate', ['--tls=require'], /--tls=require needs --tls-cert and --tls-key/],
    ['--tls-ca with --tls=off', ['--tls=off', '--tls-ca', pki.caCert], /--tls-ca/],
    ['a key that is not the certificate\'s', ['--tls-cert', pki.serverCert, '--tls-key', path.join(pki.dir, 'client-key.pem')], /NBD TLS/],
    ['a missing certificate file', ['--tls-cert', path.join(dir, 'nope.pem'), '--tls-key', pki.serverKey], /--tls-cert .*nope\.pem/],
  ] as const) {
    const err = await serve([...img, ...args], t).then(
      () => undefined,
      (e: Error & { stderr?: string }) => e.stderr ?? e.message,
    );
    t.match(err, expect, `${why}: refused with a clear message`);
  }

  // 0.0.0.0 inside a fresh network namespace: nothing but a loopback that is down, so no one else can connect.
  const open = await serve(['--image', `disk=${path.join(dir, 'open.img')}`, '--size', '1M', '--no-journal', '--listen', '0.0.0.0:0'], t, { wrap: ['unshare', '--net'] });
  t.match(open.stderr(), /WARNING: NBD is listening beyond loopback without TLS/, 'no TLS beyond loopback: a plain stderr warning');
  t.match(open.stderr(), /"level":40.*beyond loopback without TLS/, 'and a logged warning');
  const on = await serve(['--image', `disk=${path.join(dir, 'on.img')}`, '--size', '1M', '--no-journal', '--listen', '0.0.0.0:0',
    '--tls-cert', pki.serverCert, '--tls-key', pki.serverKey], t, { wrap: ['unshare', '--net'] });
  t.match(on.stderr(), /WARNING: .*--tls=on.*--tls=require/, '--tls=on beyond loopback: warned that plain text is still served');
  const req = await serve(['--image', `disk=${path.join(dir, 'req.img')}`, '--size', '1M', '--no-journal', '--listen', '0.0.0.0:0',
    '--tls=require', '--tls-cert', pki.serverCert, '--tls-key', pki.serverKey], t, { wrap: ['unshare', '--net'] });
  await new Promise((r) => setTimeout(r, 200));
  t.notMatch(req.stderr(), /WARNING/, '--tls=require beyond loopback: no warning');
});
