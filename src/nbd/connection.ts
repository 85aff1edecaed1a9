// The one place that owns a client socket: greeting, framing options and requests out of the byte stream,
// the STARTTLS upgrade, backpressure (bounded in-flight requests and bytes), out-of-order replies, and shutdown.
import net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import { isPooled, releaseBuffer } from '../util/buffer-pool.js';
import type { Logger } from '../util/logger.js';
import {
  ClientFlag,
  Cmd,
  Errno,
  HandshakeFlag,
  MAX_OPTION_LENGTH,
  Opt,
  nameOf,
} from './constants.js';
import {
  ByteQueue,
  OPTION_HEADER_SIZE,
  REQUEST_HEADER_SIZE,
  decodeOptionHeader,
  decodeRequest,
  encodeServerGreeting,
  type Request,
} from './codec.js';
import { Negotiation, type NbdExport, type Session } from './negotiation.js';
import type { NbdTls } from './tls.js';
import { RequestError, errorReply, execute, validate } from './transmission.js';

/** Requests in flight per connection before we stop reading (the kernel client keeps up to 128). */
const MAX_INFLIGHT_REQUESTS = 256;
/** Payload bytes in flight per connection before we stop reading: bounds memory per client. */
const MAX_INFLIGHT_BYTES = 64 * 2 ** 20;
/** Socket reads in user-buffer mode land in one buffer of this size per connection, reused for every read. */
const READ_BUFFER_BYTES = 256 * 1024;
/** In user-buffer mode, a WRITE payload still this many bytes short is read by the kernel straight into it. */
const DIRECT_READ_MIN = 64 * 1024;
/** Options per connection: a client that keeps haggling forever is a denial of service. */
const MAX_OPTIONS = 1024;
/** Time allowed from accept to the end of the handshake (NbdServer's handshakeTimeoutMs overrides it). */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Time allowed for the last replies to leave once the connection is ending, before it is closed regardless. */
const END_TIMEOUT_MS = 30_000;

/** 'disconnecting': NBD_CMD_DISC received; the requests before it are answered, then the connection closes. */
type Phase = 'flags' | 'option-header' | 'option-data' | 'tls-handshake' | 'request' | 'payload' | 'discard' | 'disconnecting' | 'closed';

export class Connection {
  private readonly queue = new ByteQueue();
  private phase: Phase = 'flags';
  private negotiation!: Negotiation;
  private session: Session | undefined;
  private optHeader = { option: 0, length: 0 };
  private options = 0;
  private current: Request | undefined;
  private payload: Buffer | undefined;
  private payloadFilled = 0;
  private discardLeft = 0;
  /** The error replied to the WRITE whose payload is being discarded. */
  private discardError: RequestError | undefined;
  private inflight = 0;
  private inflightBytes = 0;
  private writeBlocked = false;
  private paused = false;
  private draining = false; // DISC received or server closing: no new requests
  /** shutdown() began: every request received from now on (but DISC) is answered NBD_ESHUTDOWN, never run. */
  private shuttingDown = false;
  /** Frame what is already received even while paused (the last pass before the connection ends). */
  private flushing = false;
  private readonly idle: Array<() => void> = [];
  private handshakeTimer: NodeJS.Timeout | undefined;
  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
  private resolveClosed!: () => void;
  readonly closed = new Promise<void>((resolve) => (this.resolveClosed = resolve));
  private readonly onSocketData = (chunk: Buffer): void => this.onData(chunk);
  private readonly onSocketError = (err: Error): void => {
    // A failed TLS handshake (no or a refused client certificate, a plain-text client) is worth a warning.
    if (this.phase === 'tls-handshake') this.log.warn({ err }, `TLS handshake failed: ${err.message}`);
    else this.log.debug({ err }, 'socket error');
  };
  private readonly onSocketClose = (): void => this.onClose();
  /** The client sent FIN: nothing more arrives, but replies can still leave (the server allows half-open). */
  private eof = false;
  private readonly onSocketEnd = (): void => {
    this.eof = true;
    this.pump();
  };
  /** User-buffer mode (see adopt): the buffer socket reads go to unless a payload is read in place. */
  private readBuf: Buffer | undefined;
  private readonly onSocketDrain = (): void => {
    this.writeBlocked = false;
    this.updateFlow();
  };

  /** `socket` becomes a TLSSocket over the same stream after NBD_OPT_STARTTLS; `tls` undefined: NOTLS. */
  constructor(
    private socket: Duplex,
    private readonly exports: NbdExport[],
    private readonly log: Logger,
    handshakeTimeoutMs = HANDSHAKE_TIMEOUT_MS,
    private readonly tls?: NbdTls,
    opts: { userBuffer?: boolean } = {},
  ) {
    if (opts.userBuffer && !tls && socket instanceof net.Socket) this.socket = socket = this.adopt(socket);
    this.attach(socket);
    this.handshakeTimer = setTimeout(() => {
      this.log.warn('handshake not finished in time; closing');
      this.destroy();
    }, handshakeTimeoutMs);
    this.handshakeTimer.unref();
    this.send([encodeServerGreeting(HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | HandshakeFlag.NBD_FLAG_NO_ZEROES)]);
  }

  /**
   * Stop taking requests, let in-flight ones finish and their replies leave (up to graceMs), then close. The
   * spec: requests received meanwhile are answered NBD_ESHUTDOWN (a WRITE's payload is read and dropped), and
   * so is every complete request already received when the last in-flight one is done.
   */
  async shutdown(graceMs: number): Promise<void> {
    this.draining = true;
    if (this.phase !== 'request' && this.phase !== 'payload' && this.phase !== 'discard' && this.phase !== 'disconnecting') return this.destroy();
    this.shuttingDown = true;
    this.updateFlow(); // no in-flight budget applies to ESHUTDOWN replies: resume if that was what held reading
    const timer = setTimeout(() => this.destroy(), graceMs);
    await Promise.race([this.whenIdle(), this.closed]);
    if (this.phase === 'request' || this.phase === 'payload' || this.phase === 'discard') {
      this.flushing = true;
      this.pump();
      this.flushing = false;
      const now = this.phase as Phase; // pump() may have closed it, or met an NBD_CMD_DISC
      if (now !== 'closed' && now !== 'disconnecting') {
        this.phase = 'disconnecting'; // nothing read from now on is answered: the socket is ending
        this.socket.pause();
      }
    }
    this.endThenClose();
    await this.closed;
    clearTimeout(timer);
  }

  destroy(): void {
    this.phase = 'closed';
    this.socket.destroy();
  }

  /**
   * Ends the connection from this side: once every reply is written, FIN (after TLS's close_notify), and then the
   * socket is closed without waiting for the client's FIN. Waiting for it kept the socket of every client that
   * sent NBD_CMD_DISC (reading is paused from then on, so its FIN was never read): 512 clean disconnects, say
   * 512 runs of nbdinfo, and every later client was refused as one too many. A client that stops reading its
   * last replies is cut off after END_TIMEOUT_MS.
   */
  private endThenClose(): void {
    if (this.phase === 'closed' || this.socket.destroyed) return;
    const timer = setTimeout(() => this.destroy(), END_TIMEOUT_MS);
    timer.unref();
    this.socket.end(() => {
      clearTimeout(timer);
      this.destroy();
    });
  }

  private whenIdle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /**
   * Takes a freshly accepted socket (not yet reading: the server pauses on connect) over in user-buffer mode:
   * the kernel reads into this connection's own buffer, or straight into the WRITE payload being filled,
   * instead of into a new ArrayBuffer per read. Every new ArrayBuffer is external memory for V8, which starts
   * a full mark-compact after each ~64 MiB of it: at 1 MiB writes that was ~9 major GCs a second. Node offers
   * this (`onread`) only to sockets it creates, so the accepted socket's handle moves to a new Socket, and the
   * husk, left without a handle, is destroyed (which also keeps the server's connection count right). Without
   * TLS only: a TLSSocket reads through its own stream.
   */
  private adopt(accepted: net.Socket): net.Socket {
    const holder = accepted as unknown as { _handle: { useUserBuffer?: unknown } | null };
    const handle = holder._handle;
    if (!handle || typeof handle.useUserBuffer !== 'function' || accepted.readableLength > 0) {
      accepted.resume();
      return accepted;
    }
    this.readBuf = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
    holder._handle = null;
    const sock = new net.Socket({
      handle: handle as never,
      readable: true,
      writable: true,
      onread: { buffer: () => this.readTarget(), callback: (n: number, buf: Uint8Array) => this.onUserRead(n, buf as Buffer) },
      allowHalfOpen: true, // as the server's: a client's FIN does not end our side (see afterEof)
    } as net.SocketConstructorOpts);
    accepted.destroy();
    sock.setNoDelay(true);
    return sock;
  }

  /** Where the next socket read goes: the rest of the payload being read when it is large, else readBuf. */
  private readTarget(): Buffer {
    if (this.phase === 'payload' && this.queue.length === 0) {
      const p = this.payload!;
      if (p.length - this.payloadFilled >= DIRECT_READ_MIN) return p.subarray(this.payloadFilled);
    }
    return this.readBuf!;
  }

  private onUserRead(n: number, buf: Buffer): boolean {
    if (this.phase === 'closed') return false;
    if (buf === this.readBuf) {
      this.queue.push(buf.subarray(0, n));
      this.pump();
      // The next read reuses readBuf: keep a copy of what is still unconsumed (a partial header, as a rule).
      this.queue.detach();
    } else {
      this.payloadFilled += n; // read in place, into the payload's rest (readTarget)
      this.pump();
    }
    return true;
  }

  private attach(socket: Duplex): void {
    socket.on('data', this.onSocketData);
    socket.on('error', this.onSocketError);
    socket.on('close', this.onSocketClose);
    socket.on('end', this.onSocketEnd);
    socket.on('drain', this.onSocketDrain);
  }

  private onClose(): void {
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.resolveClosed();
  }

  /**
   * Replies produced in the same turn (a group commit resolves dozens of writes at once) leave in one
   * writev: the socket stays corked until the current tick and its promise jobs are done.
   */
  private send(bufs: Buffer[]): void {
    if (this.phase === 'closed' || this.socket.destroyed) return;
    let ok = true;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    // A pooled read reply goes back to its pool once the socket is done with it.
    for (const b of bufs) ok = (isPooled(b) ? this.socket.write(b, () => releaseBuffer(b)) : this.socket.write(b)) && ok;
    if (!ok) {
      this.writeBlocked = true;
      this.updateFlow();
    }
  }

  /** Reads only while the client is within its in-flight budget and its replies are being consumed. */
  private updateFlow(): void {
    if (this.phase === 'disconnecting') return; // stopped reading for good
    const overBudget = this.inflight >= MAX_INFLIGHT_REQUESTS || this.inflightBytes >= MAX_INFLIGHT_BYTES;
    // Once shutting down no request adds to the budget (each is answered ESHUTDOWN at once).
    const stop = this.writeBlocked || (overBudget && !this.shuttingDown);
    if (stop && !this.paused) {
      this.paused = true;
      this.socket.pause();
    } else if (!stop && this.paused) {
      this.paused = false;
      this.socket.resume();
      // Frames already queued may now be processed.
      setImmediate(() => this.pump());
    }
  }

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed') return;
    this.queue.push(chunk);
    this.pump();
  }

  private protocolError(what: string): void {
    this.log.warn({ phase: this.phase }, `protocol violation, closing: ${what}`);
    this.destroy();
  }

  private pump(): void {
    try {
      this.pumpFrames();
      if (this.eof) this.afterEof();
    } catch (err) {
      this.log.error({ err }, 'internal error while framing; closing the connection');
      this.destroy();
    }
  }

  /**
   * The client sent FIN without NBD_CMD_DISC. Every request it sent whole is handled and answered, as for
   * NBD_CMD_DISC, then the connection ends; a request cut short by the FIN is dropped. In the option phase the
   * replies to the options it sent whole leave first (they are written as each is handled); a TLS handshake
   * cut short has nothing to answer.
   */
  private afterEof(): void {
    switch (this.phase) {
      case 'closed':
      case 'disconnecting':
        return;
      case 'request':
      case 'payload':
      case 'discard':
        // Paused (in-flight budget, or replies not read yet): frames may still wait; pump comes back on resume.
        if (this.paused && !this.flushing) return;
        this.draining = true;
        this.phase = 'disconnecting';
        void this.whenIdle().then(() => this.endThenClose());
        return;
      case 'tls-handshake':
        return this.destroy();
      default:
        this.endThenClose();
        this.phase = 'closed';
    }
  }

  private pumpFrames(): void {
    for (;;) {
      if (this.paused && !this.flushing && (this.phase === 'request' || this.phase === 'payload')) return;
      switch (this.phase) {
        case 'closed':
        case 'disconnecting':
          return; // a client sends nothing after NBD_CMD_DISC: anything it does is ignored
        case 'flags': {
          if (this.queue.length < 4) return;
          const flags = this.queue.take(4).readUInt32BE(0);
          const known = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES;
          if (flags & ~known) return this.protocolError(`unknown client flags 0x${flags.toString(16)}`);
          // The spec allows TLS only once fixed newstyle is agreed: without it a TLS-only server has nothing to offer.
          const fixed = (flags & ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
          if (!fixed && this.tls?.mode === 'require') {
            this.log.warn('this server requires TLS, which needs fixed newstyle, and the client did not agree to it; closing');
            return this.destroy();
          }
          const tlsMode = fixed && this.tls ? this.tls.mode : 'off';
          this.negotiation = new Negotiation(this.exports, (flags & ClientFlag.NBD_FLAG_C_NO_ZEROES) !== 0, tlsMode);
          this.phase = 'option-header';
          break;
        }
        case 'option-header': {
          if (this.queue.length < OPTION_HEADER_SIZE) return;
          const h = decodeOptionHeader(this.queue.take(OPTION_HEADER_SIZE));
          if (!h.magicOk) return this.protocolError('bad option magic');
          if (++this.options > MAX_OPTIONS) return this.protocolError('too many options');
          if (h.length > MAX_OPTION_LENGTH) return this.protocolError(`option data of ${h.length} bytes`);
          this.optHeader = h;
          this.phase = 'option-data';
          break;
        }
        case 'option-data': {
          if (this.queue.length < this.optHeader.length) return;
          const data = Buffer.from(this.queue.take(this.optHeader.length));
          const { option } = this.optHeader;
          if (this.draining && option !== Opt.NBD_OPT_ABORT) return this.destroy();
          const out = this.negotiation.handle(option, data);
          this.log.debug({ option: nameOf(Opt, option) }, 'option');
          if (out.next === 'starttls') return this.startTls(out.replies);
          this.send(out.replies);
          if (out.next === 'close') {
            this.endThenClose();
            this.phase = 'closed';
            return;
          }
          if (out.next === 'transmission') {
            this.session = out.session;
            if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
            this.log.debug({ export: out.session.export.name, structured: out.session.structured }, 'transmission');
            this.phase = 'request';
          } else {
            this.phase = 'option-header';
          }
          break;
        }
        case 'tls-handshake':
          return;
        case 'request': {
          if (this.queue.length < REQUEST_HEADER_SIZE) return;
          const r = decodeRequest(this.queue.take(REQUEST_HEADER_SIZE));
          if (!r.magicOk) return this.protocolError('bad request magic');
          this.onRequest(r);
          break;
        }
        case 'payload': {
          // Copied once, into the buffer the device asked for (the mirror's journal record): a slice of the
          // socket's chunk would pin the whole chunk and be copied into the record anyway. In user-buffer mode
          // most of a large payload is read into it in place (readTarget) and the queue is empty.
          const need = this.payload!.length - this.payloadFilled;
          if (this.queue.length > 0) this.payloadFilled += this.queue.copyTo(this.payload!, this.payloadFilled, need);
          if (this.payloadFilled < this.payload!.length) return;
          const r = this.current!;
          const data = this.payload!;
          this.current = this.payload = undefined;
          this.phase = 'request';
          if (this.shuttingDown) {
            // Its payload was still arriving when shutdown began: not run, like every request after it.
            releaseBuffer(data);
            this.send(errorReply(this.session!, r.handle, shutdownError()));
            break;
          }
          this.start(r, data);
          break;
        }
        case 'discard': {
          this.discardLeft -= this.queue.skip(this.discardLeft);
          if (this.discardLeft > 0) return;
          const r = this.current!;
          const err = this.discardError!;
          this.current = this.discardError = undefined;
          this.phase = 'request';
          this.send(errorReply(this.session!, r.handle, err));
          break;
        }
      }
    }
  }

  /**
   * NBD_OPT_STARTTLS was acknowledged: once the ACK (and every reply before it) is on the wire, the same stream
   * carries TLS. Nothing the client sent before it read the ACK may be taken as NBD (or TLS) data.
   */
  private startTls(replies: Buffer[]): void {
    const plain = this.socket;
    this.phase = 'tls-handshake';
    if (this.corked) {
      this.corked = false;
      plain.uncork();
    }
    plain.write(Buffer.concat(replies), (err) => {
      if (err || this.phase === 'closed') return this.destroy();
      if (this.queue.length > 0 || plain.readableLength > 0) {
        return this.protocolError('data sent after NBD_OPT_STARTTLS before its reply was read');
      }
      plain.off('data', this.onSocketData);
      plain.off('drain', this.onSocketDrain);
      const secure = new tls.TLSSocket(plain, {
        isServer: true,
        secureContext: this.tls!.context,
        // With a CA, a client without a certificate fails the handshake itself; one whose certificate does
        // not chain to the CA is refused in onTlsUp.
        requestCert: this.tls!.verifyClient,
        rejectUnauthorized: this.tls!.verifyClient,
      });
      this.socket = secure;
      this.attach(secure);
      secure.once('secure', () => this.onTlsUp(secure));
    });
  }

  private onTlsUp(secure: tls.TLSSocket): void {
    if (this.phase !== 'tls-handshake') return;
    if (this.tls!.verifyClient) {
      const refused = clientCertificateError(secure);
      if (refused) {
        this.log.warn({ reason: refused }, `client certificate refused (${refused}); closing`);
        return this.destroy();
      }
    }
    this.log.debug({ protocol: secure.getProtocol(), cipher: secure.getCipher()?.name }, 'TLS established');
    this.negotiation = this.negotiation.restartUnderTls();
    this.phase = 'option-header';
    this.pump();
  }

  private onRequest(r: Request): void {
    const s = this.session!;
    if (r.type === Cmd.NBD_CMD_DISC) {
      // The spec: the server MUST handle all outstanding requests, then close. Their replies still go out.
      this.draining = true;
      this.phase = 'disconnecting';
      this.socket.pause();
      void this.whenIdle().then(() => this.endThenClose());
      return;
    }
    const bad = this.shuttingDown ? shutdownError() : validate(s, r);
    if (r.type === Cmd.NBD_CMD_WRITE) {
      if (bad) {
        // The payload still follows on the wire: skip it (no memory), then reply the error.
        this.current = r;
        this.discardError = bad;
        this.discardLeft = r.length;
        this.phase = 'discard';
        return;
      }
      this.current = r;
      const dev = s.export.device;
      this.payload = dev.writeBuffer ? dev.writeBuffer(r.length) : Buffer.allocUnsafe(r.length);
      this.payloadFilled = 0;
      this.phase = 'payload';
      return;
    }
    if (bad) return this.send(errorReply(s, r.handle, bad));
    this.start(r, undefined);
  }

  private start(r: Request, payload: Buffer | undefined): void {
    const bytes = r.type === Cmd.NBD_CMD_READ || r.type === Cmd.NBD_CMD_WRITE ? r.length : 0;
    this.inflight++;
    this.inflightBytes += bytes;
    this.updateFlow();
    execute(this.session!, r, payload).then(
      (bufs) => this.finish(bufs, bytes),
      (err) => this.finish(errorReply(this.session!, r.handle, err), bytes),
    );
  }

  private finish(bufs: Buffer[], bytes: number): void {
    this.send(bufs);
    this.inflight--;
    this.inflightBytes -= bytes;
    if (this.inflight === 0) for (const f of this.idle.splice(0)) f();
    this.updateFlow();
  }
}

function shutdownError(): RequestError {
  return new RequestError(Errno.ESHUTDOWN, 'the server is shutting down');
}

/**
 * Why a client's certificate does not chain to the configured CA, or undefined when it does. Node checks this
 * itself only for sockets a tls.Server accepted: for a TLSSocket built over an existing stream (STARTTLS) the
 * handshake lets any certificate through, and OpenSSL's verdict must be read, as tls.Server does, from the
 * TLS handle. Fails closed if that ever goes away.
 */
function clientCertificateError(secure: tls.TLSSocket): string | undefined {
  const handle = (secure as unknown as { ssl?: { verifyError?: () => (Error & { code?: string }) | null } }).ssl;
  if (typeof handle?.verifyError !== 'function') return 'cannot read the certificate verification result';
  const err = handle.verifyError();
  return err ? (err.code ?? err.message) : undefined;
}
