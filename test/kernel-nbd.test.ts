// The Linux kernel's own NBD client (nbd-client + /dev/nbd0, simple replies, multi-conn, FUA, whole-disk TRIM)
// against a real `blockferry serve`, inside a small qemu VM (test/kernel-vm/) because this host has no nbd module.
// The guest does what the README's "Attaching with the Linux kernel client" says: nbd-client [-C 4] -N NAME,
// mkfs.ext4, mount, write, umount, nbd-client -d. Once more with replication on: after the guest has unmounted and
// disconnected and blockferry reports the replica caught up, the replica is the primary byte for byte and fsck-clean.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { sha256File } from './helpers/files.js';
import { CLI, ROOT, run, startReplay, startServe, type Served } from './helpers/processes.js';

const VM_SCRIPT = path.join(ROOT, 'test/kernel-vm/kernel-nbd-test');
// 256 MiB holds an ext4 with its journal and the 16 MiB blob the guest writes, and keeps mkfs's TRIM cheap.
const IMAGE_SIZE = '256M';
// Software-emulated boot + mkfs + write takes ~10 s per run here; leave room for a loaded 2-core CI box.
const VM_TIMEOUT_S = 240;
/** After the guest disconnects, the replica has at most the blob and the filesystem's metadata to apply. */
const CATCH_UP_MS = 60_000;

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

/** Boots the VM against `s` and asserts the guest passed; on failure prints the guest's steps and serve's log. */
async function guestPasses(t: Test, s: Served, conns: number, dir: string): Promise<void> {
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
}

for (const conns of [1, 4]) {
  t.test(`kernel client, ${conns} connection(s): mkfs.ext4, mount, write, sync, remount, compare, disconnect`, async (t) => {
    const dir = t.testdir();
    const image = path.join(dir, 'disk.img');
    const s = await startServe(['--image', image, '--size', IMAGE_SIZE, '--listen', '127.0.0.1:0'], t.teardown);
    await guestPasses(t, s, conns, dir);
    t.equal(await s.stop('SIGTERM'), 0, 'serve stops cleanly after the disconnect');
    const fsck = await run('e2fsck', ['-fn', image]);
    t.match(fsck.stdout, /clean|files/, 'host-side e2fsck -fn on the image is clean (exit 0)');
  });
}

/** `blockferry status --json` until the replica has applied everything committed; the last answer either way. */
async function caughtUp(admin: string): Promise<{ ok: boolean; last: unknown }> {
  const deadline = Date.now() + CATCH_UP_MS;
  let last: unknown;
  while (Date.now() < deadline) {
    // Exit 2 means "needs attention" (e.g. still in backlog): keep asking.
    const st = await run(process.execPath, [CLI, 'status', '--admin', admin, '--json']).catch((err: Error) => ({ stdout: '', err }));
    try {
      const v = JSON.parse(st.stdout).volumes[0];
      last = { journal: v.journal, replica: v.replicas[0] };
      const r = v.replicas[0];
      if (r.state === 'continuous' && r.lagEntries === 0 && r.appliedSeq === v.journal.committedSeq) return { ok: true, last };
    } catch {
      last = 'err' in st ? st.err.message : st.stdout;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  return { ok: false, last };
}

t.test('kernel client, 4 connections, replicating: after the disconnect the replica is byte-identical and e2fsck-clean', async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  const replicaDir = path.join(dir, 'replica');
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', replicaDir], t.teardown);
  const s = await startServe(
    ['--image', `disk=${image}`, '--size', IMAGE_SIZE, '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const admin = /admin on (http:\/\/\S+)/.exec(s.stdout())![1];
  await guestPasses(t, s, 4, dir);

  const c = await caughtUp(admin);
  t.ok(c.ok, 'blockferry status reports the replica caught up (continuous, lag 0, applied = committed)', { last: c.last });
  const replica = path.join(replicaDir, 'disk.img');
  t.equal(await sha256File(replica), await sha256File(image), 'the replica is byte-identical to the primary');
  const fsck = await run('e2fsck', ['-fn', replica]);
  t.match(fsck.stdout, /clean|files/, 'e2fsck -fn on the replica is clean (exit 0)');
  t.equal(await s.stop('SIGTERM'), 0, 'serve stops cleanly');
  replay.child.kill('SIGTERM');
  t.equal(await replay.exited, 0, 'replay stops cleanly');
});
