// The Linux kernel's own NBD client (nbd-client + /dev/nbd0, simple replies, multi-conn, FUA, whole-disk TRIM)
// against a real `blockferry serve`, inside a small qemu VM (test/kernel-vm/) because this host has no nbd module.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { ROOT, run, startServe } from './helpers/processes.js';

const VM_SCRIPT = path.join(ROOT, 'test/kernel-vm/kernel-nbd-test');
// 256 MiB holds an ext4 with its journal and the 16 MiB blob the guest writes, and keeps mkfs's TRIM cheap.
const IMAGE_SIZE = '256M';
// Software-emulated boot + mkfs + write takes ~10 s per run here; leave room for a loaded 2-core CI box.
const VM_TIMEOUT_S = 240;

/** Runs the VM; resolves to its exit code and the serial log (the guest prints `+ step` / `STEP FAILED`). */
function runVm(port: number, conns: number, exportName: string, log: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(VM_SCRIPT, [String(port), '--conns', String(conns), '--export', exportName, '--log', log], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, KERNEL_NBD_TIMEOUT: String(VM_TIMEOUT_S) },
    });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('error', reject);
    p.on('exit', (code) => resolve({ code, out }));
  });
}

for (const conns of [1, 4]) {
  t.test(`kernel client, ${conns} connection(s): mkfs.ext4, mount, write, sync, remount, compare, disconnect`, async (t) => {
    const dir = t.testdir();
    const image = path.join(dir, 'disk.img');
    const s = await startServe(['--image', image, '--size', IMAGE_SIZE, '--listen', '127.0.0.1:0'], t.teardown);
    const exportName = decodeURIComponent(new URL(s.uri).pathname.slice(1));
    const log = path.join(dir, 'serial.log');
    const vm = await runVm(s.port, conns, exportName, log);
    const serial = fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '';
    const passed = vm.code === 0 && /NBDTEST RESULT=PASS/.test(serial);
    if (!passed) {
      // The guest's steps, ending with the one that failed, are the useful part of a failure.
      const steps = serial.split('\n').filter((l) => /^\+ \[|STEP FAILED|NBDTEST RESULT|md5|nbd|EXT4|error/i.test(l));
      t.comment(`kernel-nbd-test exited ${vm.code}:\n${vm.out}\nguest steps:\n${steps.slice(-30).join('\n')}\nserve stderr:\n${s.stderr().slice(-3000)}`);
    }
    t.ok(passed, 'guest reports NBDTEST RESULT=PASS (data identical after remount, clean disconnect)');
    t.match(serial, /md5 before=(\w+) after=\1/, 'blob checksum equal before and after remount');
    t.equal(await s.stop('SIGTERM'), 0, 'serve stops cleanly after the disconnect');
    const fsck = await run('e2fsck', ['-fn', image]);
    t.match(fsck.stdout, /clean|files/, 'host-side e2fsck -fn on the image is clean (exit 0)');
  });
}
