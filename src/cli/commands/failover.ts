// `blockferry promote` and `blockferry demote`: the two offline steps of a failover and a failback
// (README: "Failover and failback").
import path from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { demoteImage, promoteVolume } from '../../replayer/failover.js';
import { parseImageArg } from './serve.js';

interface PromoteArgs {
  'data-dir': string;
  volume: string;
  force: boolean;
  json: boolean;
}

export const promoteCommand: CommandModule<object, PromoteArgs> = {
  command: 'promote',
  describe: 'Turn a replica into a primary image (backup site, replayer stopped); it refuses replication from then on',
  builder: (y: Argv) =>
    y
      .option('data-dir', { type: 'string', demandOption: true, describe: 'The replayer data directory holding the replica' })
      .option('volume', { type: 'string', demandOption: true, describe: 'Volume name (DIR/VOLUME.img)' })
      .option('force', { type: 'boolean', default: false, describe: 'Promote even an inconsistent replica (a resync had not finished)' })
      .option('json', { type: 'boolean', default: false, describe: 'Print the result as JSON' })
      .example('$0 promote --data-dir /srv/replicas --volume disk', 'then: blockferry serve --image disk=/srv/replicas/disk.img') as Argv<PromoteArgs>,
  handler: async (args) => {
    const r = await promoteVolume(args['data-dir'], args.volume, { force: args.force });
    if (args.json) process.stdout.write(`${JSON.stringify(r)}\n`);
    else {
      process.stdout.write(
        `volume ${r.volume} promoted at seq ${r.appliedSeq}${r.consistent ? '' : ' (INCONSISTENT: forced)'}; it refuses replication from now on.\n` +
          `serve it with: blockferry serve --image ${r.volume}=${r.image}\n`,
      );
    }
  },
};

interface DemoteArgs {
  image: string;
  'data-dir': string;
  volume?: string;
}

export const demoteCommand: CommandModule<object, DemoteArgs> = {
  command: 'demote',
  describe: 'Make a former primary image a replica in a data directory; the new primary then resends only what differs',
  builder: (y: Argv) =>
    y
      .option('image', { type: 'string', demandOption: true, describe: 'The old primary image: [NAME=]PATH (serve must be stopped)' })
      .option('data-dir', { type: 'string', demandOption: true, describe: 'Replayer data directory to move it into (as DIR/NAME.img)' })
      .option('volume', { type: 'string', describe: 'Volume name [default: the image name]' })
      .example('$0 demote --image disk=/srv/disk.img --data-dir /srv/replicas', 'then: blockferry replay --data-dir /srv/replicas, and the new primary --replicate-to it')
      .epilogue('Changes written on this side after the failover are overwritten by the new primary (that is what demoting means).') as Argv<DemoteArgs>,
  handler: async (args) => {
    const img = parseImageArg(args.image);
    const r = await demoteImage(img.path, args['data-dir'], args.volume ?? img.name);
    process.stdout.write(
      `${img.path} is now the replica of volume ${r.volume} at ${r.image} (inconsistent until resynced).\n` +
        (r.journalMovedTo ? `its journal, which no longer describes it, was moved aside to ${r.journalMovedTo}.\n` : '') +
        `next: blockferry replay --data-dir ${path.resolve(args['data-dir'])} ..., then serve the new primary with --replicate-to it; only differing chunks are sent.\n`,
    );
  },
};
