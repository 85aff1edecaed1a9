// Parses listen addresses ("127.0.0.1:10809", "[::1]:10809", ":10809") for the CLI's --listen/--admin flags.
import { UsageError } from '../util/errors.js';

export interface HostPort {
  host: string;
  port: number;
}

export function parseHostPort(text: string, what: string, defaultHost = '127.0.0.1'): HostPort {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim());
  if (!m) throw new UsageError(`${what}: "${text}" is not HOST:PORT (for example 127.0.0.1:10809)`);
  const port = Number(m[3]);
  if (port > 65535) throw new UsageError(`${what}: port ${port} is out of range`);
  return { host: m[1] ?? (m[2] || defaultHost), port };
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}
