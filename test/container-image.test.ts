// The Dockerfile built with podman and run as the backup site runs it: its default command (0.0.0.0:7070 and
// :9101, inside a network namespace this test makes, so nothing listens beyond it), a named volume for /data,
// the ulimits a small host gives, runc. A primary (serve, in the same namespace, on a Unix socket the test's NBD
// client reaches) replicates into it through a SIGKILL of the container, and `podman stop` must stop it cleanly.
// No container registry is reachable here, so the base is Debian bookworm with this machine's Node.js 20
// (scripts/container-base.sh), passed as NODE_IMAGE; the build fetches from Debian's archive and npm as
// `npm ci` does.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { converges, until } from './helpers/files.js';
import { CLI, ROOT, run, runStatus } from './helpers/processes.js';

const BASE = 'localhost/blockferry-test-base:bookworm';
const id = `bfct-${process.pid}`;
const tag = `localhost/blockferry-test:${process.pid}`;
const netns = id;
const MiB = 1024 * 1024;

const podman = (...args: string[]) => runStatus('podman', args);
/** `podman healthcheck run`: the image's own HEALTHCHECK command, run inside the container. */
const healthy = async () => (await podman('healthcheck', 'run', id)).code === 0;

/** A network namespace of the test's own with its loopback up, deleted in teardown. */
async function makeNetns(t: Test, name: string): Promise<void> {
  await run('ip', ['netns', 'add', name]);
  t.teardown(() => runStatus('ip', ['netns', 'del', name]));
  await run('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
}

let built = false;
t.teardown(() => podman('rmi', '-f', tag));

t.test('the image builds, serves replicas from a volume and stops cleanly', async (t) => {
  await run('bash', [path.join(ROOT, 'scripts/container-base.sh'), BASE]);

  const started = Date.now();
  const build = await runStatus('podman', [
    'build', '--format', 'docker', '--network', 'host', '--pull=never', '--layers=false',
    '--build-arg', `NODE_IMAGE=${BASE}`, '-t', tag, ROOT,
  ]);
  t.equal(build.code, 0, `podman build of the Dockerfile succeeds (${((Date.now() - started) / 1000).toFixed(0)} s)`);
  if (build.code !== 0) {
    t.comment(build.stdout.slice(-4000) + build.stderr.slice(-4000));
    return;
  }
  built = true;

  await makeNetns(t, netns);
  await run('podman', ['volume', 'create', id]);
  t.teardown(() => podman('volume', 'rm', '-f', id));
  t.teardown(() => podman('rm', '-f', '-v', '-t', '0', id));
  await run('podman', [
    'run', '-d', '--name', id, '--runtime', 'runc', '--network', `ns:/run/netns/${netns}`,
    '--ulimit', 'nofile=1024:1024', '--ulimit', 'nproc=1000:1000', '--health-interval', 'disable',
    '-v', `${id}:/data`, tag,
  ]);
  t.ok(await until(healthy, 30_000, 250), 'its HEALTHCHECK passes once the replayer is up');
  t.equal((await run('podman', ['exec', id, 'id', '-u'])).stdout.trim(), '1000', 'it runs as the unprivileged node user');
  const helper = await podman('exec', id, 'node', '-e', "require('/app/build/Release/blockferry_native.node')");
  t.equal(helper.code, 0, `the native helper was built into the image and loads there ${helper.stderr}`);

  // The primary, in the container's network namespace; its NBD socket is a file the test reaches from outside.
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  // Short: a Unix socket path has at most 107 bytes, and the test directory's path is longer.
  const sockDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bf-ctr-'));
  t.teardown(() => fs.rmSync(sockDir, { recursive: true, force: true }));
  const socket = path.join(sockDir, 'nbd.sock');
  const serve = spawn('ip', ['netns', 'exec', netns, process.execPath, CLI, 'serve', '--image', `disk=${image}`, '--size', '64M',
    '--socket', socket, '--replicate-to', 'ws://127.0.0.1:7070'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const serveExited = new Promise<number | null>((r) => serve.once('exit', (code) => r(code)));
  t.teardown(() => {
    if (serve.exitCode === null && serve.signalCode === null) serve.kill('SIGKILL');
    return serveExited;
  });
  let serveOut = '';
  serve.stdout!.on('data', (d) => (serveOut += d));
  serve.stderr!.on('data', (d) => (serveOut += d));
  const serving = await until(() => serveOut.includes('listening on'), 20_000, 50);
  t.ok(serving, 'serve starts in the namespace');
  if (!serving) return t.comment(serveOut);
  const uri = `nbd+unix:///disk?socket=${socket}`;
  const write = async (name: string, offset: number, length: number) => {
    const src = path.join(dir, name);
    fs.writeFileSync(src, randomBytes(length));
    await run('qemu-io', ['-f', 'raw', '-c', `write -s ${src} ${offset} ${length}`, uri]);
  };

  await write('a.bin', 0, 24 * MiB);
  const mountpoint = (await run('podman', ['volume', 'inspect', '--format', '{{.Mountpoint}}', id])).stdout.trim();
  const replica = path.join(mountpoint, 'disk.img');
  t.ok(await converges(image, replica, 60_000), 'the replica in the volume becomes byte-identical to the primary');
  t.equal(fs.statSync(replica).uid, 1000, 'the replica is owned by the node user');

  // SIGKILL the container: writes go on into the journal, and the restarted replayer resumes from its state.
  await run('podman', ['kill', '--signal', 'KILL', id]);
  await write('b.bin', 20 * MiB, 16 * MiB);
  await run('podman', ['start', id]);
  t.ok(await until(healthy, 30_000, 250), 'healthy again after a SIGKILL and a start');
  await write('c.bin', 48 * MiB, 8 * MiB);
  t.ok(await converges(image, replica, 60_000), 'the replica catches up after the restart');
  const verify = await runStatus('ip', ['netns', 'exec', netns, process.execPath, CLI, 'verify', '--image', `disk=${image}`, '--replica', 'ws://127.0.0.1:7070']);
  t.equal(verify.code, 0, `blockferry verify finds the replica identical\n${verify.stdout}${verify.stderr}`);

  // `podman stop` sends SIGTERM to the replayer, which is PID 1 there: it must stop by itself, not at the
  // timeout's SIGKILL.
  const stopAt = Date.now();
  await run('podman', ['stop', '-t', '20', id]);
  const took = Date.now() - stopAt;
  const exit = (await run('podman', ['inspect', '--format', '{{.State.ExitCode}}', id])).stdout.trim();
  t.equal(exit, '0', 'exits 0 on podman stop');
  t.ok(took < 15_000, `stops on SIGTERM, before the stop timeout (${took} ms)`);
  const logs = await run('podman', ['logs', id]);
  t.match(logs.stdout + logs.stderr, /"msg":"stopped cleanly"/, 'and logs, as JSON, that it stopped cleanly');
  serve.kill('SIGTERM');
  t.equal(await serveExited, 0, 'serve stops cleanly too');
});

// deploy/systemd's units as an operator installs them (their header comments), run by systemd as PID 1 in a
// container made from the image above: the replayer as its own user under ProtectSystem=strict, a serve@disk
// instance replicating to it, Restart=on-failure after a SIGKILL, and clean stops.
t.test('the systemd units run the replayer and a primary, restart after a SIGKILL and stop cleanly', async (t) => {
  if (!built) return t.skip('the image did not build');
  const ctx = fs.mkdtempSync(path.join(os.tmpdir(), 'bf-sd-'));
  t.teardown(() => fs.rmSync(ctx, { recursive: true, force: true }));
  for (const f of fs.readdirSync(path.join(ROOT, 'deploy/systemd'))) fs.copyFileSync(path.join(ROOT, 'deploy/systemd', f), path.join(ctx, f));
  fs.writeFileSync(path.join(ctx, 'serve-disk.env'), 'BLOCKFERRY_ARGS="--size 64M --replicate-to ws://127.0.0.1:7070"\n');
  fs.writeFileSync(path.join(ctx, 'Containerfile'), [
    `FROM ${tag}`,
    'USER root',
    'RUN apt-get update && apt-get install -y --no-install-recommends systemd && rm -rf /var/lib/apt/lists/*',
    // The units' layout: the checkout in /opt/blockferry, node at /usr/bin/node, the replayer's user and directory.
    'RUN ln -s /app /opt/blockferry && ln -s /usr/local/bin/node /usr/bin/node'
      + ' && useradd --system --user-group --no-create-home blockferry'
      + ' && install -d -o blockferry -g blockferry -m 0700 /srv/blockferry-replicas && install -d /srv/blockferry /etc/blockferry',
    'COPY blockferry-replay.service blockferry-serve@.service /etc/systemd/system/',
    'COPY serve-disk.env /etc/blockferry/',
    'RUN systemctl enable blockferry-replay blockferry-serve@disk',
    'ENTRYPOINT []',
    'CMD ["/lib/systemd/systemd"]',
    '',
  ].join('\n'));
  const sdTag = `${tag}-systemd`;
  t.teardown(() => podman('rmi', '-f', sdTag));
  const build = await runStatus('podman', ['build', '--network', 'host', '--pull=never', '--layers=false', '-t', sdTag, ctx]);
  t.equal(build.code, 0, 'an image with systemd and the units builds');
  if (build.code !== 0) return t.comment(build.stdout.slice(-4000) + build.stderr.slice(-4000));

  const ns = `${id}-sd`;
  const name = `${id}-sd`;
  await makeNetns(t, ns);
  t.teardown(() => podman('rm', '-f', '-v', '-t', '0', name));
  await run('podman', [
    'run', '-d', '--name', name, '--runtime', 'runc', '--systemd', 'always', '--network', `ns:/run/netns/${ns}`,
    '--ulimit', 'nofile=1024:1024', '--ulimit', 'nproc=1000:1000', sdTag,
  ]);
  const sh = (cmd: string) => runStatus('podman', ['exec', name, 'sh', '-c', cmd]);
  const show = async (unit: string, prop: string) => (await sh(`systemctl show -P ${prop} ${unit}`)).stdout.trim();
  const units = ['blockferry-replay', 'blockferry-serve@disk'];
  const active = async () => (await sh(`systemctl is-active ${units.join(' ')}`)).code === 0;
  const up = await until(active, 60_000, 500);
  t.ok(up, 'both units become active');
  if (!up) return t.comment((await sh(`systemctl status --no-pager -n 30 ${units.join(' ')}`)).stdout);
  // Type=simple units are active once started, before serve listens: wait for its NBD port to answer.
  const nbd = 'nbd://127.0.0.1:10809/disk';
  const answers = await until(async () => (await runStatus('ip', ['netns', 'exec', ns, 'nbdinfo', '--size', nbd])).code === 0, 30_000, 250);
  t.ok(answers, 'serve@disk answers on its NBD port');
  if (!answers) return t.comment((await sh(`journalctl --no-pager -n 30 -u blockferry-serve@disk`)).stdout);
  const rootfs = (await run('podman', ['mount', name])).stdout.trim();
  t.teardown(() => podman('unmount', name));
  const primary = path.join(rootfs, 'srv/blockferry/disk.img');
  const replica = path.join(rootfs, 'srv/blockferry-replicas/disk.img');

  const dir = t.testdir();
  const write = async (file: string, offset: number, length: number) => {
    const src = path.join(dir, file);
    fs.writeFileSync(src, randomBytes(length));
    await run('ip', ['netns', 'exec', ns, 'qemu-io', '-f', 'raw', '-c', `write -s ${src} ${offset} ${length}`, nbd]);
  };
  await write('a.bin', 0, 16 * MiB);
  t.ok(await converges(primary, replica, 60_000), 'the replica under /srv/blockferry-replicas becomes byte-identical to the primary');
  t.equal((await sh('stat -c %U /srv/blockferry-replicas/disk.img')).stdout.trim(), 'blockferry', 'written by the replayer as its own user');

  const pid = await show('blockferry-replay', 'MainPID');
  await run('podman', ['exec', name, 'systemctl', 'kill', '--signal', 'KILL', 'blockferry-replay']);
  await write('b.bin', 8 * MiB, 16 * MiB);
  const back = await until(async () => (await active()) && !['0', pid].includes(await show('blockferry-replay', 'MainPID')), 30_000, 250);
  t.ok(back, 'Restart=on-failure starts the replayer again after a SIGKILL');
  await write('c.bin', 40 * MiB, 8 * MiB);
  t.ok(await converges(primary, replica, 60_000), 'and the replica catches up');

  for (const unit of [...units].reverse()) {
    const at = Date.now();
    await run('podman', ['exec', name, 'systemctl', 'stop', unit]);
    const took = Date.now() - at;
    t.same([await show(unit, 'Result'), await show(unit, 'ExecMainStatus')], ['success', '0'], `systemctl stop ${unit}: a clean exit`);
    t.ok(took < 30_000, `${unit} stops on SIGTERM before TimeoutStopSec (${took} ms)`);
  }
});
