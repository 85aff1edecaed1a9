// Structured logs (pino): JSON when piped, human-readable on a terminal. Components take a child logger
// (`logger.child({ component: 'nbd' })`) so every line says where it came from.
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(opts: { level?: string; pretty?: boolean } = {}): Logger {
  const level = opts.level ?? process.env.BLOCKFERRY_LOG ?? 'info';
  const pretty = opts.pretty ?? (process.stderr.isTTY && process.env.BLOCKFERRY_LOG_FORMAT !== 'json');
  if (pretty) {
    return pino({ level, transport: { target: 'pino-pretty', options: { destination: 2, translateTime: 'HH:MM:ss.l' } } });
  }
  // Synchronous: a line is on stderr when it is logged. pino's default destination writes through the thread
  // pool, where a resync's image reads queued it: an error logged at a replica's welcome reached stderr only after
  // the whole resync, and a SIGKILL would lose whatever was still queued. Lines are few (none per request).
  return pino({ level }, pino.destination({ dest: 2, sync: true }));
}

/** A logger that drops everything: the default for library use and unit tests. */
export const silentLogger: Logger = pino({ level: 'silent' });
