// `blockferry replay`: the backup site. Accepts primaries over WebSocket and keeps DIR/<volume>.img.
import fs from 'node:fs';
import type { Argv, CommandModule } from 'yargs';
import { ADMIN_OPTION, startAdminFromFlag } from '../../admin/cli.js';
import type { AdminServer } from '../../admin/server.js';
import { ReplayServer } from '../../replayer/replay-server.js';
import { readTokenFile } from '../../replicator/link-auth.js';
import { UsageError } from '../../util/errors.js';
import { createLogger } from '../../util/logger.js';
import { isLoopback, parseHostPort } from '../listen.js';
import { waitForSignals } from './serve.js';

interface ReplayArgs {
  listen: string;
  'token-file'?: string;
  'tls-cert'?: string;
  'tls-key'?: string;
  'data-dir': string;
  admin?: string;
  'log-level'?: string;
}

export const command: CommandModule<object, ReplayArgs> = {
  command: 'replay',
  describe: 'Receive journals from primaries and keep replica images (the backup site)',
  builder: (y: Argv) =>
    y
      .option('listen', { type: 'string', default: '127.0.0.1:7070', describe: 'WebSocket address to listen on' })
      .option('data-dir', { type: 'string', demandOption: true, describe: 'Where replicas live: DIR/<volume>.img and its state' })
      .option('token-file', { type: 'string', describe: 'Accept only the volumes listed, each with its token: lines of "VOLUME TOKEN"' })
      .option('tls-cert', { type: 'string', describe: 'PEM certificate: serve wss:// (with --tls-key)' })
      .option('tls-key', { type: 'string', describe: 'PEM private key for --tls-cert' })
      .option('admin', ADMIN_OPTION)
      .option('log-level', { type: 'string', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'], describe: 'How much to log' })
      .example('$0 replay --listen 127.0.0.1:7070 --data-dir /srv/replicas', 'then: blockferry serve ... --replicate-to ws://127.0.0.1:7070') as Argv<ReplayArgs>,
  handler: async (args) => {
    const log = createLogger({ level: args['log-level'] });
    const where = parseHostPort(args.listen, '--listen');
    if (!!args['tls-cert'] !== !!args['tls-key']) throw new UsageError('--tls-cert and --tls-key go together');
    const tokens = args['token-file'] ? readTokenFile(args['token-file']) : undefined;
    const tls = args['tls-cert'] ? { cert: fs.readFileSync(args['tls-cert']), key: fs.readFileSync(args['tls-key']!) } : undefined;
    if (!isLoopback(where.host) && (!tls || !tokens)) {
      const missing = [!tls && 'TLS (--tls-cert/--tls-key)', !tokens && 'tokens (--token-file)'].filter(Boolean).join(' or ');
      log.warn({ host: where.host }, `the replayer listens beyond loopback without ${missing}: ${tokens ? 'traffic can be read and altered on the way' : 'anyone who reaches it can write replicas'}`);
    }
    const server = new ReplayServer({ dataDir: args['data-dir'], logger: log, tokens, tls });
    const addr = await server.listen(where);
    let admin: AdminServer | undefined;
    if (args.admin) {
      try {
        admin = await startAdminFromFlag(args.admin, { role: 'replay', status: () => server.status() }, log);
      } catch (err) {
        await server.close();
        throw err;
      }
    }
    const host = addr.host.includes(':') ? `[${addr.host}]` : addr.host;
    process.stdout.write(`listening on ${tls ? 'wss' : 'ws'}://${host}:${addr.port}\n`);
    await waitForSignals(log, async () => {
      await admin?.close();
      await server.close();
    });
  },
};
