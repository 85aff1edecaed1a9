// The README's quick start, as a new user runs it: a fresh clone in a temp dir, `npm ci`, `npm start`; then
// the printed commands work: write through NBD, `blockferry status`, `blockferry verify`; Ctrl-C stops it
// cleanly and the replica holds what was written.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ROOT, run, runStatus } from './helpers/processes.js';

const DEFAULT_PORTS = [10809, 7070, 9101];

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** Runs a command in `cwd`, resolving to its exit code and output (stdout then stderr). */
async function exec(cmd: string, args: string[], cwd: string): Promise<{ code: number | null; out: string }> {
  const r = await runStatus(cmd, args, { cwd });
  return { code: r.code, out: r.stdout + r.stderr };
}

t.test('README quick start: fresh clone, npm ci, npm start; the printed commands work; Ctrl-C stops it', async (t) => {
  const dir = t.testdir();
  const clone = path.join(dir, 'blockferry');
  await run('git', ['clone', '--quiet', ROOT, clone]);
  const readme = fs.readFileSync(path.join(clone, 'README.md'), 'utf8');
  t.match(readme, /npm ci && npm start/, 'the README quick start says `npm ci && npm start`');

  const ci = await exec('npm', ['ci', '--no-audit', '--no-fund', '--prefer-offline'], clone);
  t.equal(ci.code, 0, `npm ci succeeds in the fresh clone\n${ci.out.slice(-3000)}`);
  if (ci.code !== 0) return;

  // Exactly `npm start` when its default ports are free; otherwise the same with free ports (a busy CI box).
  const free = (await Promise.all(DEFAULT_PORTS.map(portFree))).every(Boolean);
  const extra = free ? [] : ['--', '--listen', '127.0.0.1:0', '--replay-listen', '127.0.0.1:0', '--admin', '127.0.0.1:0'];
  if (!free) t.comment('default ports busy: running npm start with port 0');
  // Its own process group, so teardown can stop npm and the node it started (and nothing else) by PID.
  const child: ChildProcess = spawn('npm', ['start', ...extra], { cwd: clone, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const exited = new Promise<string>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? String(code))));
  t.teardown(async () => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
    await exited;
  });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const deadline = Date.now() + 60_000;
  while (!/Ctrl-C stops it/.test(out) && Date.now() < deadline && child.exitCode === null) await new Promise((r) => setTimeout(r, 100));
  t.match(out, /listening on nbd:\/\/127\.0\.0\.1:\d+\/disk/, `npm start serves the demo volume\n${out.slice(-2000)}`);
  const uri = /listening on (nbd:\/\/\S+)/.exec(out)?.[1];
  const status = /blockferry status --admin (\S+)/.exec(out)?.[1];
  const verify = /blockferry verify --image (\S+) --replica (\S+)/.exec(out);
  t.ok(uri && status && verify, 'it prints the attach, status and verify commands');
  t.match(out, /nbd-client 127\.0\.0\.1 \d+ \/dev\/nbd0 -N disk/, 'and the kernel client command');
  if (!uri || !status || !verify) return;

  const data = randomBytes(8 * 2 ** 20);
  const src = path.join(dir, 'data.bin');
  fs.writeFileSync(src, data);
  await run('nbdcopy', [src, uri]);
  const info = await run('nbdinfo', [uri]);
  t.match(info.stdout, /export-size: 10737418240/, 'nbdinfo sees the 10 GiB demo volume');

  const cli = path.join(clone, 'dist/cli/index.js');
  let st = { code: null as number | null, out: '' };
  for (let i = 0; i < 60; i++) {
    st = await exec(process.execPath, [cli, 'status', '--admin', status], clone);
    if (st.code === 0 && /continuous/.test(st.out)) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  t.equal(st.code, 0, `blockferry status: the replica is continuous (exit 0)\n${st.out}`);
  const v = await exec(process.execPath, [cli, 'verify', '--image', verify[1], '--replica', verify[2]], clone);
  t.equal(v.code, 0, `blockferry verify: identical (exit 0)\n${v.out}`);
  t.match(v.out, /identical/, 'verify says identical');

  // What Ctrl-C in a terminal does: SIGINT to the foreground process group (npm and the demo).
  process.kill(-child.pid!, 'SIGINT');
  const how = await exited;
  t.ok(how === '0' || how === 'SIGINT', `npm start ends on Ctrl-C (${how})`);
  t.match(out, /stopped cleanly/, `the demo stops cleanly: in-flight requests done, journal and image flushed\n${out.slice(-1500)}`);
  const replica = Buffer.alloc(data.length);
  const fd = fs.openSync(path.join(clone, 'data/replica/disk.img'), 'r');
  fs.readSync(fd, replica, 0, data.length, 0);
  fs.closeSync(fd);
  t.ok(replica.equals(data), 'the replica in ./data/replica holds what was written');
});
