// Transmission-phase policy: validate a request against the session, run it on the device, and build the
// reply buffers. The connection has framed the request (and read any WRITE payload) already; nothing here
// touches the socket, and no reply header is built before the result is known.
import type { BlockDevice } from '../device/block-device.js';
import { writeZeroBuffers } from '../device/zero-fill.js';
import { BASE_ALLOCATION_ID, Cmd, CmdFlag as F, Errno, MAX_PAYLOAD, StateFlag, TransmissionFlag as TF } from './constants.js';
import {
  encodeBlockStatus,
  encodeOffsetDataHeader,
  encodeSimpleReply,
  encodeStructuredDone,
  encodeStructuredError,
  type Request,
} from './codec.js';
import { nbdErrno } from './errno.js';
import type { Session } from './negotiation.js';

/** At most this many extents per BLOCK_STATUS reply (the spec lets servers return fewer). */
const MAX_EXTENTS = 1024;
/** BLOCK_STATUS asks the device about at most this much at once. */
const MAX_STATUS_LENGTH = 2 ** 31;

const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.NBD_CMD_READ]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_DF,
  [Cmd.NBD_CMD_WRITE]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_DISC]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_FLUSH]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_TRIM]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_CACHE]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_WRITE_ZEROES]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_NO_HOLE | F.NBD_CMD_FLAG_FAST_ZERO,
  [Cmd.NBD_CMD_BLOCK_STATUS]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_REQ_ONE,
};

export class RequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** Checks a request header; returns the error to reply, or undefined when it may run. */
export function validate(s: Session, r: Request): RequestError | undefined {
  const allowed = ALLOWED_FLAGS[r.type];
  if (allowed === undefined) return new RequestError(Errno.EINVAL, `unknown command ${r.type}`);
  let ok = allowed;
  if (!(s.flags & TF.NBD_FLAG_SEND_FUA)) ok &= ~F.NBD_CMD_FLAG_FUA;
  if (!s.structured) ok &= ~F.NBD_CMD_FLAG_DF;
  if (!(s.flags & TF.NBD_FLAG_SEND_FAST_ZERO)) ok &= ~F.NBD_CMD_FLAG_FAST_ZERO;
  if (r.flags & ~ok) return new RequestError(Errno.EINVAL, `flags 0x${r.flags.toString(16)} not valid for command ${r.type}`);
  const size = s.export.device.size;
  const writes = r.type === Cmd.NBD_CMD_WRITE || r.type === Cmd.NBD_CMD_TRIM || r.type === Cmd.NBD_CMD_WRITE_ZEROES;
  if (writes && s.flags & TF.NBD_FLAG_READ_ONLY) return new RequestError(Errno.EPERM, 'the export is read-only');
  if (r.type === Cmd.NBD_CMD_FLUSH || r.type === Cmd.NBD_CMD_DISC) return undefined;
  if ((r.type === Cmd.NBD_CMD_READ || r.type === Cmd.NBD_CMD_WRITE) && r.length > MAX_PAYLOAD) {
    return new RequestError(Errno.EINVAL, `length ${r.length} is over the ${MAX_PAYLOAD}-byte payload limit`);
  }
  if (r.length === 0) return new RequestError(Errno.EINVAL, 'zero-length request');
  if (r.offset + r.length > size) {
    // The spec: ENOSPC for a WRITE or WRITE_ZEROES past the end, EINVAL for a READ or TRIM (or anything else).
    const nospc = r.type === Cmd.NBD_CMD_WRITE || r.type === Cmd.NBD_CMD_WRITE_ZEROES;
    return new RequestError(nospc ? Errno.ENOSPC : Errno.EINVAL, `offset ${r.offset} length ${r.length} is beyond the ${size}-byte export`);
  }
  if (r.type === Cmd.NBD_CMD_BLOCK_STATUS && !s.blockStatus) {
    return new RequestError(Errno.EINVAL, 'BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT');
  }
  return undefined;
}

/** The reply for an error, simple or structured as negotiated. */
export function errorReply(s: Session, handle: Buffer, err: unknown): Buffer[] {
  const errno = err instanceof RequestError ? err.errno : nbdErrno(err);
  if (!s.structured) return [encodeSimpleReply(handle, errno)];
  return [encodeStructuredError(handle, errno, err instanceof Error ? err.message : String(err))];
}

function okReply(s: Session, handle: Buffer): Buffer[] {
  return [s.structured ? encodeStructuredDone(handle) : encodeSimpleReply(handle, 0)];
}

async function afterWrite(dev: BlockDevice, fua: boolean): Promise<void> {
  // FUA emulated once here for devices that cannot do it natively.
  if (fua && !dev.capabilities.fua) await dev.flush();
}

/** Runs a validated request. Resolves with reply buffers (errors become error replies). */
export async function execute(s: Session, r: Request, payload: Buffer | undefined): Promise<Buffer[]> {
  const dev = s.export.device;
  const fua = (r.flags & F.NBD_CMD_FLAG_FUA) !== 0;
  try {
    switch (r.type) {
      case Cmd.NBD_CMD_READ: {
        const data = await dev.read(r.offset, r.length);
        if (s.structured) return [encodeOffsetDataHeader(r.handle, r.offset, data.length), data];
        return [encodeSimpleReply(r.handle, 0), data];
      }
      case Cmd.NBD_CMD_WRITE:
        // The hot path: no options object and no afterWrite call (an await each) unless FUA is asked for.
        if (!fua) {
          await dev.write(r.offset, payload!);
          return okReply(s, r.handle);
        }
        await dev.write(r.offset, payload!, { fua: dev.capabilities.fua });
        await afterWrite(dev, fua);
        return okReply(s, r.handle);
      case Cmd.NBD_CMD_FLUSH:
        await dev.flush();
        return okReply(s, r.handle);
      case Cmd.NBD_CMD_TRIM:
        if (dev.capabilities.trim) {
          await dev.trim(r.offset, r.length, { fua: fua && dev.capabilities.fua });
          await afterWrite(dev, fua);
        }
        return okReply(s, r.handle);
      case Cmd.NBD_CMD_WRITE_ZEROES: {
        const noHole = (r.flags & F.NBD_CMD_FLAG_NO_HOLE) !== 0;
        const fastZero = (r.flags & F.NBD_CMD_FLAG_FAST_ZERO) !== 0;
        if (dev.capabilities.zeroes) {
          await dev.writeZeroes(r.offset, r.length, { fua: fua && dev.capabilities.fua, noHole, fastZero });
        } else if (fastZero) {
          throw new RequestError(Errno.ENOTSUP, 'fast zeroing is not available on this export');
        } else {
          await writeZeroBuffers(dev, r.offset, r.length);
        }
        await afterWrite(dev, fua);
        return okReply(s, r.handle);
      }
      case Cmd.NBD_CMD_CACHE:
        if (dev.cache) await dev.cache(r.offset, r.length);
        return okReply(s, r.handle);
      case Cmd.NBD_CMD_BLOCK_STATUS: {
        const length = Math.min(r.length, MAX_STATUS_LENGTH);
        const found = dev.blockStatus ? await dev.blockStatus(r.offset, length) : [{ length, hole: false, zero: false }];
        const one = (r.flags & F.NBD_CMD_FLAG_REQ_ONE) !== 0;
        const extents = found.slice(0, one ? 1 : MAX_EXTENTS).map((e) => ({
          length: e.length,
          flags: (e.hole ? StateFlag.NBD_STATE_HOLE : 0) | (e.zero ? StateFlag.NBD_STATE_ZERO : 0),
        }));
        return [encodeBlockStatus(r.handle, BASE_ALLOCATION_ID, extents)];
      }
      default:
        throw new RequestError(Errno.EINVAL, `unknown command ${r.type}`);
    }
  } catch (err) {
    return errorReply(s, r.handle, err);
  }
}
