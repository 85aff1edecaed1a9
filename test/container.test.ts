// The Dockerfile's ENTRYPOINT + CMD, run directly (test/container-image.test.ts builds and runs the image): as
// they are written (only the listen addresses moved to loopback port 0 and /data to a temp dir), a primary
// replicates into it, and its HEALTHCHECK command is run against it and must pass; then it must fail once the
// replayer is gone.
import t from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { ROOT, runStatus, startServe } from './helpers/processes.js';

const dockerfile = fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');

/** The JSON array of an exec-form instruction (`ENTRYPOINT [...]`, `CMD [...]`, `HEALTHCHECK ... CMD [...]`). */
function execForm(re: RegExp): string[] {
  const m = re.exec(dockerfile);
  if (!m) throw new Error(`Dockerfile: ${re} not found`);
  return JSON.parse(m[1]) as string[];
}

const exitCode = async (cmd: string, args: string[]) => (await runStatus(cmd, args)).code;

t.test('the Dockerfile entrypoint serves replicas and its healthcheck tracks it', async (t) => {
  const entrypoint = execForm(/^ENTRYPOINT (\[.*\])$/m);
  const cmd = execForm(/^CMD (\[.*\])$/m);
  const health = execForm(/^HEALTHCHECK .*CMD (\[.*\])$/m);
  t.same(entrypoint.slice(0, 2), ['node', '/app/dist/cli/index.js'], 'entrypoint is the blockferry CLI');
  t.equal(cmd[0], 'replay', 'the default command is the replayer');
  t.match(dockerfile, /^USER node$/m, 'runs as the unprivileged node user');
  t.match(dockerfile, /^VOLUME \["\/data"\]$/m, 'data on a volume');

  const dataDir = t.testdir();
  const args = cmd.map((a) => (a === '/data' ? dataDir : a.replace(/^0\.0\.0\.0:\d+$/, '127.0.0.1:0')));
  const child = spawn(process.execPath, [path.join(ROOT, 'dist/cli/index.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
    return exited;
  });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  const deadline = Date.now() + 20_000;
  while (!(/admin on (http:\S+)/.test(out) && /listening on (ws:\S+)/.test(out)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  const admin = /admin on (http:\/\/\S+)/.exec(out)?.[1];
  const ws = /listening on (ws:\/\/\S+)/.exec(out)?.[1];
  t.ok(admin && ws, `the command starts a replayer with its admin server\n${out}`);
  if (!admin || !ws) return;

  const image = path.join(t.testdir(), 'disk.img');
  const s = await startServe(['--image', `disk=${image}`, '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', ws], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'disk' });
  const data = randomBytes(65536);
  await c.write(4096, data);
  await c.flush();
  await c.close();
  const replica = path.join(dataDir, 'disk.img');
  const ok = await until(() => fs.existsSync(replica) && fs.readFileSync(replica).subarray(4096, 4096 + data.length).equals(data), 10_000, 100);
  t.ok(ok, 'a primary replicates into the data directory');

  const port = new URL(admin).port;
  const healthArgs = health.map((a) => a.replace('127.0.0.1:9101', `127.0.0.1:${port}`));
  t.equal(await exitCode(process.execPath, healthArgs.slice(1)), 0, 'HEALTHCHECK passes while the replayer runs');
  await s.stop();
  child.kill('SIGTERM');
  t.equal(await exited, 0, 'SIGTERM (docker stop) stops it cleanly');
  t.equal(await exitCode(process.execPath, healthArgs.slice(1)), 1, 'HEALTHCHECK fails once it is gone');
});
