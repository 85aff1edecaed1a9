// NBD TLS settings: the server's certificate and key, an optional CA that client certificates must chain to,
// and the mode. Built once per server; connections only read it when a client sends NBD_OPT_STARTTLS.
import fs from 'node:fs';
import tls from 'node:tls';
import { UsageError } from '../util/errors.js';
import type { TlsMode } from './negotiation.js';

export type { TlsMode } from './negotiation.js';

/** The protocol spec asks for TLS 1.2 at least and older versions only by a configuration change: we offer none. */
const MIN_TLS_VERSION = 'TLSv1.2';

export interface NbdTlsOptions {
  mode: TlsMode;
  /** PEM contents (not paths). */
  cert?: Buffer | string;
  key?: Buffer | string;
  /** When given, clients must present a certificate issued by this CA (PEM contents). */
  ca?: Buffer | string;
}

/** What a connection needs to initiate TLS. */
export interface NbdTls {
  mode: Exclude<TlsMode, 'off'>;
  context: tls.SecureContext;
  /** Clients must present a certificate that chains to the configured CA. */
  verifyClient: boolean;
}

/** undefined for mode 'off'; otherwise the secure context, built (and so checked) once, up front. */
export function createNbdTls(opts: NbdTlsOptions): NbdTls | undefined {
  if (opts.mode === 'off') return undefined;
  if (!opts.cert || !opts.key) throw new UsageError(`NBD TLS mode "${opts.mode}" needs a certificate and its key`);
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({ cert: opts.cert, key: opts.key, ca: opts.ca, minVersion: MIN_TLS_VERSION });
  } catch (err) {
    throw new UsageError(`NBD TLS: cannot use the certificate, key or CA given: ${(err as Error).message}`);
  }
  return { mode: opts.mode, context, verifyClient: opts.ca !== undefined };
}

/**
 * The CLI's view: --tls=off|on|require (default: on when a certificate is given, else off), --tls-cert,
 * --tls-key, --tls-ca. Reads the files and builds the context, so a bad path or key fails at startup.
 */
export function loadNbdTls(flags: { tls?: string; cert?: string; key?: string; ca?: string }): NbdTls | undefined {
  const mode = (flags.tls ?? (flags.cert ? 'on' : 'off')) as TlsMode;
  if (mode !== 'off' && mode !== 'on' && mode !== 'require') throw new UsageError(`--tls=${flags.tls}: write off, on or require`);
  if (mode === 'off') {
    if (flags.ca) throw new UsageError('--tls-ca checks client certificates over TLS: it needs --tls=on or --tls=require');
    return undefined;
  }
  if (!flags.cert || !flags.key) throw new UsageError(`--tls=${mode} needs --tls-cert and --tls-key (PEM files)`);
  const read = (file: string, what: string) => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new UsageError(`${what} ${file}: ${(err as Error).message}`);
    }
  };
  return createNbdTls({
    mode,
    cert: read(flags.cert, '--tls-cert'),
    key: read(flags.key, '--tls-key'),
    ca: flags.ca ? read(flags.ca, '--tls-ca') : undefined,
  });
}
