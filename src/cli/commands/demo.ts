// `blockferry demo` (npm start): the whole mission on one machine with embedded defaults. A backup site
// (replayer, ./data/replica) and a primary (./data/primary/disk.img, sparse, journaled, replicating to it) on
// loopback, the admin page, live status on the terminal, and the commands to try it with.
import fs from 'node:fs';
import path from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { startAdminFromFlag } from '../../admin/cli.js';
import type { AdminServer } from '../../admin/server.js';
import { ReplayServer } from '../../replayer/replay-server.js';
import { createLogger } from '../../util/logger.js';
import { formatBytes, parseSize } from '../../util/size.js';
import { parseHostPort } from '../listen.js';
import { startServe, waitForSignals, type ServeHandle } from './serve.js';

interface DemoArgs {
  'data-dir': string;
  size: string;
  listen: string;
  'replay-listen': string;
  admin: string;
}

/** One line of live status: replica state, lag, journal use, write rate. */
function statusLine(handle: ServeHandle): string {
  const v = handle.status().volumes[0];
  const r = v.replicas[0];
  const j = v.journal;
  const lag = r ? `lag ${r.lagEntries} entries / ${formatBytes(r.lagBytes ?? 0)} / ${r.lagSeconds.toFixed(1)} s` : '';
  const resync = r?.resync ? ` ${r.resync.percent}%` : '';
  const journal = j ? `journal ${formatBytes(j.bytes)} of ${formatBytes(j.maxBytes)}` : '';
  const writes = v.writes ? `writes ${formatBytes(v.writes.bytesPerSecond)}/s` : '';
  return `replica ${r?.state ?? 'none'}${resync} | ${lag} | ${journal} | ${writes}`;
}

export const command: CommandModule<object, DemoArgs> = {
  command: 'demo',
  describe: 'Run a primary and a backup site on local files under ./data, on loopback, with live status',
  builder: (y: Argv) =>
    y
      .option('data-dir', { type: 'string', default: 'data', describe: 'Where the demo keeps its images, journal and replica' })
      .option('size', { type: 'string', default: '10G', describe: 'Size of the demo volume (sparse)' })
      .option('listen', { type: 'string', default: '127.0.0.1:10809', describe: 'NBD address of the primary' })
      .option('replay-listen', { type: 'string', default: '127.0.0.1:7070', describe: 'WebSocket address of the backup site' })
      .option('admin', { type: 'string', default: '127.0.0.1:9101', describe: 'Status page, /status and /metrics of the primary' })
      .example('$0 demo', 'primary on nbd://127.0.0.1:10809/disk, replica in ./data/replica, status on http://127.0.0.1:9101/') as Argv<DemoArgs>,
  handler: async (args) => {
    const log = createLogger();
    const dataDir = path.resolve(args['data-dir']);
    const primaryDir = path.join(dataDir, 'primary');
    const replicaDir = path.join(dataDir, 'replica');
    fs.mkdirSync(primaryDir, { recursive: true });
    const image = path.join(primaryDir, 'disk.img');

    const replay = new ReplayServer({ dataDir: replicaDir, logger: log });
    const ra = await replay.listen(parseHostPort(args['replay-listen'], '--replay-listen'));
    const replicaUrl = `ws://${ra.host.includes(':') ? `[${ra.host}]` : ra.host}:${ra.port}`;
    let handle: ServeHandle;
    try {
      handle = await startServe({
        images: [{ name: 'disk', path: image }],
        size: fs.existsSync(image) ? undefined : parseSize(args.size, '--size'),
        listen: parseHostPort(args.listen, '--listen'),
        replicateTo: [replicaUrl],
        logger: log,
      });
    } catch (err) {
      await replay.close();
      throw err;
    }
    let admin: AdminServer | undefined;
    try {
      admin = await startAdminFromFlag(args.admin, { role: 'serve', status: () => handle.status() }, log);
    } catch (err) {
      await handle.close();
      await replay.close();
      throw err;
    }
    const uri = handle.uris[0];
    const u = new URL(uri);
    const rel = (p: string) => path.relative(process.cwd(), p) || '.';
    process.stdout.write(
      [
        `listening on ${uri}`,
        `blockferry demo: primary ${rel(image)} (${formatBytes(handle.volumes[0].device.size)}, journal ${rel(`${image}.journal`)})`,
        `                 replicating to the backup site at ${replicaUrl} -> ${rel(path.join(replicaDir, 'disk.img'))}`,
        `                 status page ${admin.url}/`,
        '',
        'Attach it with the Linux kernel client (as root):',
        `  modprobe nbd && nbd-client ${u.hostname} ${u.port} /dev/nbd0 -N disk`,
        '  mkfs.ext4 /dev/nbd0 && mkdir -p /mnt/demo && mount /dev/nbd0 /mnt/demo',
        '  ... write files ...; umount /mnt/demo && nbd-client -d /dev/nbd0',
        'Or without the nbd module:',
        `  nbdinfo ${uri}`,
        `  nbdfuse /mnt/nbd ${uri} &   # then losetup, mkfs.ext4, mount as usual`,
        'Check on it:',
        `  npx blockferry status --admin ${new URL(admin.url).host}`,
        `  npx blockferry verify --image disk=${rel(image)} --replica ${replicaUrl}`,
        '',
        'Ctrl-C stops it cleanly.',
        '',
      ].join('\n'),
    );
    // Live status: redrawn in place on a terminal; when piped, a line only when the replica's state changes.
    let lastState = '';
    const ticker = setInterval(() => {
      const line = statusLine(handle);
      if (process.stdout.isTTY) process.stdout.write(`\r\x1b[2K${line.slice(0, (process.stdout.columns || 120) - 1)}`);
      else {
        const state = line.split(' |')[0];
        if (state !== lastState) process.stdout.write(`${line}\n`);
        lastState = state;
      }
    }, 1000);
    ticker.unref();
    await waitForSignals(log, async () => {
      clearInterval(ticker);
      if (process.stdout.isTTY) process.stdout.write('\n');
      await admin?.close();
      await handle.close();
      await replay.close();
    });
  },
};
