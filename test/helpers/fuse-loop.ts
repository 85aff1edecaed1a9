// Puts a kernel filesystem on an NBD export the way this machine allows (its kernel has no nbd module):
// nbdfuse exposes the export as a file, losetup makes it a block device. Teardown undoes every step that
// was done — umount, losetup -d, fusermount3 -u, stop nbdfuse by PID — even when the test failed midway.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { run } from './processes.js';

export interface LoopDisk {
  device: string;
  mount(dir: string): Promise<void>;
  umount(): Promise<void>;
  detach(): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function attachLoop(uri: string, workdir: string, teardown: (fn: () => unknown) => void): Promise<LoopDisk> {
  const fuseDir = path.join(workdir, 'fuse');
  fs.mkdirSync(fuseDir, { recursive: true });
  const pidfile = path.join(workdir, 'nbdfuse.pid');
  const fuse = spawn('nbdfuse', ['-P', pidfile, fuseDir, uri], { stdio: ['ignore', 'ignore', 'pipe'] });
  let fuseErr = '';
  fuse.stderr.on('data', (d) => (fuseErr += d));
  const fuseExit = new Promise((r) => fuse.once('exit', r));
  let mounted: string | undefined;
  let loop: string | undefined;
  let detached = false;
  const detach = async () => {
    if (detached) return;
    detached = true;
    if (mounted) await run('umount', [mounted]).catch(() => run('umount', ['-l', mounted!]).catch(() => undefined));
    mounted = undefined;
    if (loop) await run('losetup', ['-d', loop]).catch(() => undefined);
    loop = undefined;
    await run('fusermount3', ['-u', fuseDir]).catch(() => undefined);
    if (fuse.exitCode === null) fuse.kill('SIGTERM');
    await Promise.race([fuseExit, sleep(5000)]);
    if (fuse.exitCode === null) fuse.kill('SIGKILL');
  };
  teardown(detach);
  for (let i = 0; i < 200 && !fs.existsSync(pidfile); i++) {
    if (fuse.exitCode !== null) throw new Error(`nbdfuse exited: ${fuseErr}`);
    await sleep(50);
  }
  if (!fs.existsSync(pidfile)) throw new Error(`nbdfuse did not come up: ${fuseErr}`);
  loop = (await run('losetup', ['-f', '--show', '--direct-io=off', path.join(fuseDir, 'nbd')])).stdout.trim();
  return {
    device: loop,
    mount: async (dir) => {
      await run('mount', [loop!, dir]);
      mounted = dir;
    },
    umount: async () => {
      if (mounted) await run('umount', [mounted]);
      mounted = undefined;
    },
    detach,
  };
}
