// Option haggling (fixed newstyle) as a state machine apart from transmission: each option in, the replies
// to send and what happens next out. Pure: no socket, no awaits.
import type { BlockDevice } from '../device/block-device.js';
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  Info,
  MAX_PAYLOAD,
  Opt,
  Rep,
  TransmissionFlag as TF,
} from './constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionReply,
  encodeServerEntry,
} from './codec.js';

export interface NbdExport {
  name: string;
  description?: string;
  device: BlockDevice;
  readOnly?: boolean;
}

/** What a connection carries into transmission. */
export interface Session {
  export: NbdExport;
  flags: number;
  structured: boolean;
  /** base:allocation selected with SET_META_CONTEXT. */
  blockStatus: boolean;
}

/**
 * How a server offers TLS (proto.md "TLS support"): 'off' is NOTLS (STARTTLS gets NBD_REP_ERR_POLICY), 'on' is
 * SELECTIVETLS with no TLS-only export (a client may upgrade, or not), 'require' is FORCEDTLS (nothing but
 * STARTTLS and ABORT is answered until TLS is up, so no export is ever served or described in plain text).
 */
export type TlsMode = 'off' | 'on' | 'require';

/**
 * 'starttls': send the replies (the ACK), then initiate TLS on the socket and go on with
 * `restartUnderTls()`; nothing else may be read from the plain-text stream.
 */
export type OptionOutcome =
  | { next: 'continue'; replies: Buffer[] }
  | { next: 'close'; replies: Buffer[] }
  | { next: 'starttls'; replies: Buffer[] }
  | { next: 'transmission'; replies: Buffer[]; session: Session };

/** Preferred block size we advertise: the page size, so clients avoid read-modify-write. */
const PREFERRED_BLOCK = 4096;

export function transmissionFlags(exp: NbdExport, structured: boolean): number {
  const c = exp.device.capabilities;
  const ro = exp.readOnly || c.readOnly;
  let f = TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_CACHE;
  if (ro) f |= TF.NBD_FLAG_READ_ONLY;
  if (c.flush) f |= TF.NBD_FLAG_SEND_FLUSH | TF.NBD_FLAG_SEND_FUA;
  if (!ro) f |= TF.NBD_FLAG_SEND_TRIM | TF.NBD_FLAG_SEND_WRITE_ZEROES;
  if (!ro && c.zeroes && c.fastZero) f |= TF.NBD_FLAG_SEND_FAST_ZERO;
  if (structured) f |= TF.NBD_FLAG_SEND_DF;
  if (c.multiConn) f |= TF.NBD_FLAG_CAN_MULTI_CONN;
  return f;
}

export class Negotiation {
  private structured = false;
  private metaExport: string | undefined;
  private metaSelected = false;

  /**
   * `tls` is the mode this connection runs in (the connection owner passes 'off' to a client that did not
   * negotiate fixed newstyle: the spec allows TLS only after it); `tlsActive`: TLS is already initiated.
   */
  constructor(
    private readonly exports: NbdExport[],
    private readonly noZeroes: boolean,
    private readonly tls: TlsMode = 'off',
    private readonly tlsActive = false,
  ) {}

  /**
   * The negotiation to continue with once TLS is up. A new object on purpose: the spec says a server MUST NOT
   * preserve any negotiation state (structured replies, meta contexts) from before STARTTLS. The client's
   * handshake flags belong to the connection, not to option haggling, and carry over.
   */
  restartUnderTls(): Negotiation {
    return new Negotiation(this.exports, this.noZeroes, this.tls, true);
  }

  private find(name: string): NbdExport | undefined {
    return name === '' ? this.exports[0] : this.exports.find((e) => e.name === name);
  }

  handle(option: number, data: Buffer): OptionOutcome {
    const reply = (type: number, payload?: Buffer | string) =>
      encodeOptionReply(option, type, typeof payload === 'string' ? Buffer.from(payload) : payload);
    const invalid = (why: string): OptionOutcome => ({ next: 'continue', replies: [reply(Rep.NBD_REP_ERR_INVALID, why)] });

    if (this.tls === 'require' && !this.tlsActive) {
      // FORCEDTLS before TLS: every option but STARTTLS and ABORT (INFO and unknown ones included) is refused,
      // and EXPORT_NAME, which cannot be answered with an error, ends the connection.
      if (option === Opt.NBD_OPT_EXPORT_NAME) return { next: 'close', replies: [] };
      if (option !== Opt.NBD_OPT_STARTTLS && option !== Opt.NBD_OPT_ABORT) {
        return { next: 'continue', replies: [reply(Rep.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first')] };
      }
    }

    switch (option) {
      case Opt.NBD_OPT_EXPORT_NAME: {
        const exp = this.find(data.toString('utf8'));
        // This option cannot answer an error: the spec says to hang up.
        if (!exp) return { next: 'close', replies: [] };
        const session = this.session(exp);
        return { next: 'transmission', session, replies: [encodeExportNameReply(exp.device.size, session.flags, this.noZeroes)] };
      }
      case Opt.NBD_OPT_ABORT:
        return { next: 'close', replies: [reply(Rep.NBD_REP_ACK)] };
      case Opt.NBD_OPT_LIST: {
        if (data.length !== 0) return invalid('NBD_OPT_LIST takes no data');
        const replies = this.exports.map((e) => reply(Rep.NBD_REP_SERVER, encodeServerEntry(e.name, e.description)));
        replies.push(reply(Rep.NBD_REP_ACK));
        return { next: 'continue', replies };
      }
      case Opt.NBD_OPT_STARTTLS:
        if (this.tls === 'off') return { next: 'continue', replies: [reply(Rep.NBD_REP_ERR_POLICY, 'TLS is not configured on this server')] };
        if (this.tlsActive) return invalid('TLS is already active');
        if (data.length !== 0) return invalid('NBD_OPT_STARTTLS takes no data');
        return { next: 'starttls', replies: [reply(Rep.NBD_REP_ACK)] };
      case Opt.NBD_OPT_INFO:
      case Opt.NBD_OPT_GO: {
        const req = decodeInfoRequest(data);
        if (!req) return invalid('malformed NBD_OPT_INFO/GO data');
        const exp = this.find(req.name);
        if (!exp) return { next: 'continue', replies: [reply(Rep.NBD_REP_ERR_UNKNOWN, `no export named "${req.name}"`)] };
        const session = this.session(exp);
        const replies = [reply(Rep.NBD_REP_INFO, encodeInfoExport(exp.device.size, session.flags))];
        for (const r of new Set(req.requests)) {
          if (r === Info.NBD_INFO_NAME) replies.push(reply(Rep.NBD_REP_INFO, encodeInfoString(r, exp.name)));
          if (r === Info.NBD_INFO_DESCRIPTION && exp.description) {
            replies.push(reply(Rep.NBD_REP_INFO, encodeInfoString(r, exp.description)));
          }
        }
        // Sent even when not asked: it tells clients our 32 MiB payload limit.
        replies.push(reply(Rep.NBD_REP_INFO, encodeInfoBlockSize(1, PREFERRED_BLOCK, MAX_PAYLOAD)));
        replies.push(reply(Rep.NBD_REP_ACK));
        if (option === Opt.NBD_OPT_INFO) return { next: 'continue', replies };
        return { next: 'transmission', session, replies };
      }
      case Opt.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return invalid('NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        return { next: 'continue', replies: [reply(Rep.NBD_REP_ACK)] };
      case Opt.NBD_OPT_LIST_META_CONTEXT:
      case Opt.NBD_OPT_SET_META_CONTEXT: {
        if (option === Opt.NBD_OPT_SET_META_CONTEXT) {
          // The spec: SET replaces every earlier selection, also when it fails; a successful one sets it below.
          this.metaExport = undefined;
          this.metaSelected = false;
        }
        if (!this.structured) return invalid('negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts');
        const req = decodeMetaContextRequest(data);
        if (!req) return invalid('malformed meta context request');
        if (!this.find(req.name)) return { next: 'continue', replies: [reply(Rep.NBD_REP_ERR_UNKNOWN, `no export named "${req.name}"`)] };
        const list = option === Opt.NBD_OPT_LIST_META_CONTEXT;
        const match = req.queries.some((q) => q === BASE_ALLOCATION || (list && q === 'base:')) || (list && req.queries.length === 0);
        const replies: Buffer[] = [];
        if (match) replies.push(reply(Rep.NBD_REP_META_CONTEXT, encodeMetaContext(list ? 0 : BASE_ALLOCATION_ID, BASE_ALLOCATION)));
        if (!list) {
          this.metaExport = req.name;
          this.metaSelected = match;
        }
        replies.push(reply(Rep.NBD_REP_ACK));
        return { next: 'continue', replies };
      }
      default:
        return { next: 'continue', replies: [reply(Rep.NBD_REP_ERR_UNSUP, `option ${option} is not supported`)] };
    }
  }

  private session(exp: NbdExport): Session {
    return {
      export: exp,
      flags: transmissionFlags(exp, this.structured),
      structured: this.structured,
      blockStatus: this.metaSelected && this.find(this.metaExport ?? '') === exp,
    };
  }
}
