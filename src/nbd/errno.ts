// The one place where OS and blockferry errors become NBD errnos (nbdkit does the same in one function).
import { Errno } from './constants.js';

export function nbdErrno(err: unknown): number {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return Errno.ENOSPC;
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
    case 'EBADF':
      return Errno.EPERM;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return Errno.ENOTSUP;
    case 'EINVAL':
      return Errno.EINVAL;
    case 'ENOMEM':
      return Errno.ENOMEM;
    case 'ESHUTDOWN':
      return Errno.ESHUTDOWN;
    case 'EOVERFLOW':
      return Errno.EOVERFLOW;
    default:
      return Errno.EIO;
  }
}
