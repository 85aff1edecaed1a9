// The NBD server: listens on TCP or a Unix socket, hands each client to a Connection, and closes gracefully.
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { BlockferryError } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/logger.js';
import { Connection } from './connection.js';
import type { NbdExport } from './negotiation.js';
import type { NbdTls } from './tls.js';

export type { NbdExport } from './negotiation.js';

export interface NbdServerOptions {
  exports: NbdExport[];
  logger?: Logger;
  /** Simultaneous clients [default 512]. */
  maxConnections?: number;
  /** Time from accept to the end of the handshake, TLS included [default 30 s]. */
  handshakeTimeoutMs?: number;
  /** STARTTLS (from createNbdTls / loadNbdTls); undefined: no TLS, STARTTLS is refused with NBD_REP_ERR_POLICY. */
  tls?: NbdTls;
}

/** Simultaneous clients accepted; beyond it new sockets are closed at once (a flood must not exhaust fds). */
const MAX_CONNECTIONS = 512;
/** The longest Unix socket path Linux takes (sizeof sun_path, 108, less its NUL). */
const MAX_SOCKET_PATH = 107;

export class NbdServer extends EventEmitter {
  private readonly servers: net.Server[] = [];
  private readonly conns = new Set<Connection>();
  private readonly log: Logger;
  private readonly exports: NbdExport[];
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number | undefined;
  private readonly tls: NbdTls | undefined;

  constructor(opts: NbdServerOptions) {
    super();
    if (opts.exports.length === 0) throw new Error('NbdServer needs at least one export');
    this.exports = opts.exports;
    this.maxConnections = opts.maxConnections ?? MAX_CONNECTIONS;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs;
    this.tls = opts.tls;
    this.log = (opts.logger ?? silentLogger).child({ component: 'nbd' });
  }

  /** 'off', 'on' (clients may upgrade) or 'require' (nothing is served before TLS). */
  get tlsMode(): 'off' | 'on' | 'require' {
    return this.tls?.mode ?? 'off';
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  async listen(target: { host: string; port: number } | { path: string }): Promise<{ host?: string; port?: number; path?: string }> {
    // Paused on connect: a plain connection's socket is taken over in user-buffer mode (Connection.adopt)
    // before anything is read.
    // Half-open allowed: a client's FIN does not end our side before its last replies leave (Connection.afterEof).
    const server = net.createServer({ noDelay: true, pauseOnConnect: true, allowHalfOpen: true }, (sock) => this.accept(sock));
    server.on('error', (err) => this.log.error({ err }, 'listener error'));
    // Linux keeps at most 107 bytes of a Unix socket's path (sun_path, with its NUL), and Node cuts a longer one
    // without a word: the socket would appear under another name than the one clients are told.
    if ('path' in target && Buffer.byteLength(target.path) > MAX_SOCKET_PATH) {
      throw new BlockferryError('ENAMETOOLONG', `socket path ${target.path} is ${Buffer.byteLength(target.path)} bytes; a Unix socket path can have at most ${MAX_SOCKET_PATH}: pass a shorter --socket`);
    }
    if ('path' in target && fs.existsSync(target.path) && fs.statSync(target.path).isSocket()) {
      // A stale socket file from a killed run would make listen fail with EADDRINUSE: removed, but only if
      // nothing answers on it. A live server's socket is its own (unlinking it would take its clients' path).
      if (await answers(target.path)) {
        throw new BlockferryError('EADDRINUSE', `socket ${target.path} is in use: another server listens on it; stop it or pass another --socket`);
      }
      fs.unlinkSync(target.path);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if ('path' in target) server.listen(target.path, () => resolve());
      else server.listen(target.port, target.host, () => resolve());
    });
    this.servers.push(server);
    const addr = server.address();
    if (typeof addr === 'string') return { path: addr };
    return { host: addr!.address, port: addr!.port };
  }

  private accept(sock: net.Socket): void {
    if (this.conns.size >= this.maxConnections) {
      this.log.warn({ peer: sock.remoteAddress }, 'too many connections; refusing one');
      sock.destroy();
      return;
    }
    sock.setNoDelay(true);
    if (this.tls) sock.resume(); // STARTTLS needs Node's own stream reading
    this.handleConnection(sock, !this.tls);
  }

  /**
   * Serves one already-connected stream (a TCP/Unix socket, or an in-memory duplex in tests). `userBuffer`: the
   * stream is an accepted socket that has not started reading, to be read in user-buffer mode.
   */
  handleConnection(stream: Duplex, userBuffer = false): void {
    const peer = (stream as net.Socket).remoteAddress ?? 'local';
    const conn = new Connection(stream, this.exports, this.log.child({ peer }), this.handshakeTimeoutMs, this.tls, { userBuffer });
    this.conns.add(conn);
    void conn.closed.then(() => this.conns.delete(conn));
  }

  /** Stops accepting, lets in-flight requests finish (up to graceMs), closes every client. */
  async close(opts: { graceMs?: number } = {}): Promise<void> {
    const grace = opts.graceMs ?? 10_000;
    // net.Server.close() calls back only once every connection has ended, so shut connections down meanwhile.
    const stopped = this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.servers.length = 0;
    await Promise.all([...this.conns].map((c) => c.shutdown(grace)));
    await Promise.all(stopped);
  }
}

/** Whether something accepts connections on the Unix socket at `file` (refused or gone: a stale file). */
function answers(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(file);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}
