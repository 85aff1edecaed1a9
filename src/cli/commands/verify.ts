// `blockferry verify`: is the replica at the backup site the same as this image? Compares chunk digests
// through the replayer (online, nothing but digests on the wire) and reports matching or differing ranges.
import fs from 'node:fs';
import type { Argv, CommandModule } from 'yargs';
import { FileDevice } from '../../device/file-device.js';
import { clientTls, tokenFor } from '../../replicator/link-auth.js';
import { verifyReplica, type VerifyReport } from '../../replicator/verify.js';
import { BlockferryError } from '../../util/errors.js';
import { formatBytes } from '../../util/size.js';
import { parseImageArg } from './serve.js';

/** Exit status when the replica differs (0: identical, 1: error, 2: usage). */
export const EXIT_DIFFERS = 3;

interface VerifyArgs {
  image: string;
  replica: string;
  volume?: string;
  retries: number;
  json: boolean;
  'token-file'?: string;
  'replica-ca'?: string;
  'replica-fingerprint'?: string;
}

export function formatReport(r: VerifyReport): string {
  const head = `volume ${r.volume}: ${formatBytes(r.size)} compared in ${r.seconds.toFixed(1)} s against the replica at seq ${r.replicaSeq}`;
  if (r.identical) return `${head}: identical${r.replicaConsistent ? '' : ' (the replica was still marked inconsistent: a resync was finishing)'}\n`;
  const lines = [`${head}: ${r.differing.length} range(s), ${formatBytes(r.differingBytes)}, DIFFER`];
  for (const d of r.differing.slice(0, 50)) lines.push(`  offset ${d.offset} length ${d.length} (${formatBytes(d.offset)} +${formatBytes(d.length)})`);
  if (r.differing.length > 50) lines.push(`  ... and ${r.differing.length - 50} more (use --json for all)`);
  return `${lines.join('\n')}\n`;
}

export const command: CommandModule<object, VerifyArgs> = {
  command: 'verify',
  describe: 'Compare an image with its replica by chunk digests (online; only digests cross the wire)',
  builder: (y: Argv) =>
    y
      .option('image', { type: 'string', demandOption: true, describe: 'The primary image: [NAME=]PATH (NAME defaults to the file name)' })
      .option('replica', { type: 'string', demandOption: true, describe: 'The replayer holding the replica: ws://HOST:PORT' })
      .option('volume', { type: 'string', describe: 'Volume name at the replayer [default: the image name]' })
      .option('retries', { type: 'number', default: 5, describe: 'Re-compare differing chunks this many times, 1 s apart (the replica may be catching up)' })
      .option('json', { type: 'boolean', default: false, describe: 'Print the report as JSON' })
      .option('token-file', { type: 'string', describe: 'Token file (lines of "VOLUME TOKEN") when the replayer checks tokens' })
      .option('replica-ca', { type: 'string', describe: 'For wss://: trust this CA (PEM)' })
      .option('replica-fingerprint', { type: 'string', describe: "For wss://: pin the replayer certificate's SHA-256 fingerprint" })
      .example('$0 verify --image /srv/disk.img --replica ws://backup:7070', 'exit 0 when identical, 3 when they differ')
      .epilogue('Exit status: 0 identical, 3 differing ranges found, 1 error (unreachable, unknown volume, size mismatch), 2 usage.') as Argv<VerifyArgs>,
  handler: async (args) => {
    const img = parseImageArg(args.image);
    if (!fs.existsSync(img.path)) throw new BlockferryError('ERR_NO_IMAGE', `image ${img.path} does not exist: verify compares an existing image with its replica`);
    const device = await FileDevice.open({ path: img.path, readOnly: true });
    const tty = process.stderr.isTTY && !args.json;
    try {
      const report = await verifyReplica({
        device,
        url: args.replica,
        volume: args.volume ?? img.name,
        retries: args.retries,
        token: args['token-file'] ? tokenFor(args['token-file'], args.volume ?? img.name) : undefined,
        tls: args['replica-ca'] || args['replica-fingerprint'] ? clientTls({ ca: args['replica-ca'], fingerprint: args['replica-fingerprint'] }) : undefined,
        onProgress: tty ? (done, total) => process.stderr.write(`\rverify: ${Math.floor((100 * done) / total)}% of ${formatBytes(total)}`) : undefined,
      });
      if (tty) process.stderr.write('\n');
      process.stdout.write(args.json ? `${JSON.stringify(report, null, 2)}\n` : formatReport(report));
      process.exitCode = report.identical ? 0 : EXIT_DIFFERS;
    } finally {
      await device.close();
    }
  },
};
