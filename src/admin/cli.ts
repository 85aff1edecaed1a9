// The `--admin HOST:PORT` flag of `serve` and `replay`: parse it, start the admin server, print where it is.
import type { Options } from 'yargs';
import { isLoopback, parseHostPort } from '../cli/listen.js';
import type { Logger } from '../util/logger.js';
import { startAdmin, type AdminServer, type StatusSource } from './server.js';

export const ADMIN_OPTION: Options = {
  type: 'string',
  describe:
    'Serve read-only HTTP on HOST:PORT: GET /status (JSON), /metrics (Prometheus), / (status page). ' +
    'A bare PORT or :PORT binds 127.0.0.1; port 0 picks a free one [default: off]',
};

/** "9101", ":9101", "127.0.0.1:9101", "[::1]:9101". Without a host: loopback. */
export function parseAdminAddress(text: string): { host: string; port: number } {
  return parseHostPort(/^\d+$/.test(text.trim()) ? `:${text.trim()}` : text, '--admin', '127.0.0.1');
}

/** Starts the admin server for a --admin flag and prints `admin on http://HOST:PORT` on stdout. */
export async function startAdminFromFlag(flag: string, source: StatusSource, log: Logger): Promise<AdminServer> {
  const where = parseAdminAddress(flag);
  if (!isLoopback(where.host)) {
    log.warn({ host: where.host }, '--admin listens beyond loopback: the status (volume names, image paths, replica addresses) is readable by anyone who reaches it; it cannot change anything');
  }
  const admin = await startAdmin({ ...source, ...where, logger: log });
  process.stdout.write(`admin on ${admin.url}\n`);
  return admin;
}
