// NBD wire constants, spelled as in the spec (NetworkBlockDevice/nbd doc/proto.md), with nameOf() for logs.

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_REP_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { NBD_FLAG_FIXED_NEWSTYLE: 1 << 0, NBD_FLAG_NO_ZEROES: 1 << 1 } as const;
export const ClientFlag = { NBD_FLAG_C_FIXED_NEWSTYLE: 1 << 0, NBD_FLAG_C_NO_ZEROES: 1 << 1 } as const;

export const TransmissionFlag = {
  NBD_FLAG_HAS_FLAGS: 1 << 0,
  NBD_FLAG_READ_ONLY: 1 << 1,
  NBD_FLAG_SEND_FLUSH: 1 << 2,
  NBD_FLAG_SEND_FUA: 1 << 3,
  NBD_FLAG_ROTATIONAL: 1 << 4,
  NBD_FLAG_SEND_TRIM: 1 << 5,
  NBD_FLAG_SEND_WRITE_ZEROES: 1 << 6,
  NBD_FLAG_SEND_DF: 1 << 7,
  NBD_FLAG_CAN_MULTI_CONN: 1 << 8,
  NBD_FLAG_SEND_RESIZE: 1 << 9,
  NBD_FLAG_SEND_CACHE: 1 << 10,
  NBD_FLAG_SEND_FAST_ZERO: 1 << 11,
} as const;

export const Opt = {
  NBD_OPT_EXPORT_NAME: 1,
  NBD_OPT_ABORT: 2,
  NBD_OPT_LIST: 3,
  NBD_OPT_PEEK_EXPORT: 4,
  NBD_OPT_STARTTLS: 5,
  NBD_OPT_INFO: 6,
  NBD_OPT_GO: 7,
  NBD_OPT_STRUCTURED_REPLY: 8,
  // The values libnbd, qemu and nbdkit use (older drafts of proto.md reserved 9 for NBD_OPT_BLOCK_SIZE).
  NBD_OPT_LIST_META_CONTEXT: 9,
  NBD_OPT_SET_META_CONTEXT: 10,
  NBD_OPT_EXTENDED_HEADERS: 11,
} as const;

export const Rep = {
  NBD_REP_ACK: 1,
  NBD_REP_SERVER: 2,
  NBD_REP_INFO: 3,
  NBD_REP_META_CONTEXT: 4,
  NBD_REP_ERR_UNSUP: 2 ** 31 + 1,
  NBD_REP_ERR_POLICY: 2 ** 31 + 2,
  NBD_REP_ERR_INVALID: 2 ** 31 + 3,
  NBD_REP_ERR_PLATFORM: 2 ** 31 + 4,
  NBD_REP_ERR_TLS_REQD: 2 ** 31 + 5,
  NBD_REP_ERR_UNKNOWN: 2 ** 31 + 6,
  NBD_REP_ERR_SHUTDOWN: 2 ** 31 + 7,
  NBD_REP_ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
} as const;

export const Info = { NBD_INFO_EXPORT: 0, NBD_INFO_NAME: 1, NBD_INFO_DESCRIPTION: 2, NBD_INFO_BLOCK_SIZE: 3 } as const;

export const Cmd = {
  NBD_CMD_READ: 0,
  NBD_CMD_WRITE: 1,
  NBD_CMD_DISC: 2,
  NBD_CMD_FLUSH: 3,
  NBD_CMD_TRIM: 4,
  NBD_CMD_CACHE: 5,
  NBD_CMD_WRITE_ZEROES: 6,
  NBD_CMD_BLOCK_STATUS: 7,
} as const;

export const CmdFlag = {
  NBD_CMD_FLAG_FUA: 1 << 0,
  NBD_CMD_FLAG_NO_HOLE: 1 << 1,
  NBD_CMD_FLAG_DF: 1 << 2,
  NBD_CMD_FLAG_REQ_ONE: 1 << 3,
  NBD_CMD_FLAG_FAST_ZERO: 1 << 4,
} as const;

export const ReplyFlag = { NBD_REPLY_FLAG_DONE: 1 << 0 } as const;

export const ReplyType = {
  NBD_REPLY_TYPE_NONE: 0,
  NBD_REPLY_TYPE_OFFSET_DATA: 1,
  NBD_REPLY_TYPE_OFFSET_HOLE: 2,
  NBD_REPLY_TYPE_BLOCK_STATUS: 5,
  NBD_REPLY_TYPE_ERROR: 2 ** 15 + 1,
  NBD_REPLY_TYPE_ERROR_OFFSET: 2 ** 15 + 2,
} as const;

export const StateFlag = { NBD_STATE_HOLE: 1 << 0, NBD_STATE_ZERO: 1 << 1 } as const;

export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const BASE_ALLOCATION = 'base:allocation';
/** The id we give base:allocation when a client selects it (any nonzero value is allowed). */
export const BASE_ALLOCATION_ID = 1;

/** Largest READ/WRITE payload: the 32 MiB nbdkit and qemu also use; bounds per-request memory. */
export const MAX_PAYLOAD = 32 * 2 ** 20;
/** Option data larger than this is refused: names are at most 4 KiB, plus meta-context queries. */
export const MAX_OPTION_LENGTH = 64 * 1024;

export function nameOf(table: Record<string, number>, value: number): string {
  for (const [k, v] of Object.entries(table)) if (v === value) return k;
  return `UNKNOWN(${value})`;
}
