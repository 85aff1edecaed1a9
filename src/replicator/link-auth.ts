// Replication link security: per-volume tokens and TLS trust for wss://.
// Token file: one `VOLUME TOKEN` pair per line (# comments, blank lines ignored); the same file format on
// both sides. Tokens are compared in constant time (digests of equal length) and never logged.
import { createHash, timingSafeEqual, X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import type { PeerCertificate } from 'node:tls';
import { UsageError } from '../util/errors.js';

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** Shortest token accepted: guessing must be out of the question. */
const MIN_TOKEN_LENGTH = 16;

export type TokenTable = Map<string, Buffer>;

/** Volume → token, validated line by line; the tokens themselves never appear in an error. */
function parseTokenFile(file: string): Map<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new UsageError(`--token-file ${file}: ${(err as Error).message}`);
  }
  const table = new Map<string, string>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const [volume, token, extra] = line.split(/\s+/);
    if (!VOLUME_NAME.test(volume) || !token || extra !== undefined) {
      throw new UsageError(`--token-file ${file}, line ${i + 1}: write "VOLUME TOKEN" (the token itself is not shown here)`);
    }
    if (token.length < MIN_TOKEN_LENGTH) throw new UsageError(`--token-file ${file}, line ${i + 1}: the token for ${volume} is shorter than ${MIN_TOKEN_LENGTH} characters`);
    table.set(volume, token);
  });
  if (table.size === 0) throw new UsageError(`--token-file ${file} names no volume`);
  return table;
}

/** The replayer's table: volume → digest of its token. */
export function readTokenFile(file: string): TokenTable {
  return new Map([...parseTokenFile(file)].map(([volume, token]) => [volume, digest(token)]));
}

function digest(token: string): Buffer {
  return createHash('sha256').update(token, 'utf8').digest();
}

/** The token a primary presents for `volume`, from its own token file. */
export function tokenFor(file: string, volume: string): string {
  const token = parseTokenFile(file).get(volume);
  if (token === undefined) throw new UsageError(`--token-file ${file} has no token for volume ${volume}`);
  return token;
}

/** 'ok', or why not: the volume is not in the table, or the token does not match. */
export function checkToken(table: TokenTable, volume: string, token: unknown): 'ok' | 'unknown-volume' | 'bad-token' {
  const want = table.get(volume);
  if (!want) return 'unknown-volume';
  const got = digest(typeof token === 'string' ? token : '');
  return timingSafeEqual(want, got) ? 'ok' : 'bad-token';
}

/** "AB:CD:..." or "abcd..." → the canonical upper-case colon form Node reports as fingerprint256. */
export function normalizeFingerprint(text: string): string {
  const hex = text.replace(/^sha256[:=]/i, '').replace(/:/g, '').toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex)) throw new UsageError(`--replica-fingerprint: expected a SHA-256 fingerprint (64 hex digits), got ${text}`);
  return hex.match(/../g)!.join(':');
}

/** The SHA-256 fingerprint of a PEM certificate file (what to pin). */
export function certificateFingerprint(pemFile: string): string {
  return new X509Certificate(fs.readFileSync(pemFile)).fingerprint256;
}

/**
 * TLS for a wss:// client: trust `ca` (PEM file) and/or pin the server certificate's SHA-256 fingerprint.
 * Pinning alone accepts a certificate no CA vouches for (self-signed) when its fingerprint matches; the pin is
 * checked on the upgrade response, before the hello (and its token) is sent.
 */
export function clientTls(opts: { ca?: string; fingerprint?: string }): { options: Record<string, unknown>; checkPeer?: (socket: unknown) => string | undefined } {
  const options: Record<string, unknown> = {};
  if (opts.ca) options.ca = fs.readFileSync(opts.ca);
  if (!opts.fingerprint) return { options };
  const want = normalizeFingerprint(opts.fingerprint);
  if (!opts.ca) options.rejectUnauthorized = false; // the pin is then the whole trust decision
  return {
    options,
    checkPeer: (socket) => {
      const cert = (socket as { getPeerCertificate?: () => PeerCertificate }).getPeerCertificate?.();
      if (!cert?.fingerprint256) return 'the replayer presented no certificate (is the URL wss://?)';
      return cert.fingerprint256 === want ? undefined : `the replayer's certificate ${cert.fingerprint256} is not the pinned ${want}`;
    },
  };
}
