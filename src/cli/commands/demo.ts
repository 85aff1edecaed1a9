// `blockferry demo` (npm start): the whole mission on one machine with embedded defaults — a primary serving
// a sparse 10 GiB image under ./data on loopback, journaled — and the commands to try it with.
import fs from 'node:fs';
import path from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { createLogger } from '../../util/logger.js';
import { parseSize } from '../../util/size.js';
import { parseHostPort } from '../listen.js';
import { startServe, waitForSignals } from './serve.js';

interface DemoArgs {
  'data-dir': string;
  size: string;
  listen: string;
}

export const command: CommandModule<object, DemoArgs> = {
  command: 'demo',
  describe: 'Run a primary on local files under ./data on loopback and print how to use it',
  builder: (y: Argv) =>
    y
      .option('data-dir', { type: 'string', default: 'data', describe: 'Where the demo keeps its images and journal' })
      .option('size', { type: 'string', default: '10G', describe: 'Size of the demo volume (sparse)' })
      .option('listen', { type: 'string', default: '127.0.0.1:10809', describe: 'NBD address' })
      .example('$0 demo', 'serve ./data/primary/disk.img on 127.0.0.1:10809') as Argv<DemoArgs>,
  handler: async (args) => {
    const log = createLogger();
    const primaryDir = path.resolve(args['data-dir'], 'primary');
    fs.mkdirSync(primaryDir, { recursive: true });
    const image = path.join(primaryDir, 'disk.img');
    const handle = await startServe({
      images: [{ name: 'disk', path: image }],
      size: fs.existsSync(image) ? undefined : parseSize(args.size, '--size'),
      listen: parseHostPort(args.listen, '--listen'),
      logger: log,
    });
    const uri = handle.uris[0];
    const u = new URL(uri);
    const journal = handle.volumes[0].journal ? `${image}.journal` : '(none)';
    process.stdout.write(
      [
        `blockferry demo: serving ${image} as ${uri}`,
        `  journal: ${journal}`,
        '',
        'Attach it with the Linux kernel client (as root):',
        `  modprobe nbd && nbd-client ${u.hostname} ${u.port} /dev/nbd0 -N disk`,
        '  mkfs.ext4 /dev/nbd0 && mkdir -p /mnt/demo && mount /dev/nbd0 /mnt/demo',
        '  ... write files ...; umount /mnt/demo && nbd-client -d /dev/nbd0',
        'Or with libnbd tools:',
        `  nbdinfo ${uri}`,
        `  npx blockferry journal inspect --journal ${journal}`,
        '',
        'Ctrl-C stops it cleanly.',
        '',
      ].join('\n'),
    );
    await waitForSignals(log, () => handle.close());
  },
};
