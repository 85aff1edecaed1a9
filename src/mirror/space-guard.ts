// Full disks, refused cleanly: before a change is journaled, the filesystems holding the journal and the
// image must keep `reserveBytes` free. When they do not, the change is refused with ENOSPC (the NBD client
// sees ENOSPC) and nothing is journaled, so the journal stays consistent and no sequence number is spent;
// when space returns, writes are taken again. Free space is polled (statfs) and, between polls, the bytes
// taken since are subtracted, so a burst cannot run far past the reserve.
import { BlockferryError } from '../util/errors.js';
import { freeBytes } from '../util/free-space.js';
import { formatBytes } from '../util/size.js';

const POLL_MS = 250;

export class SpaceGuard {
  private readonly free = new Map<string, number>();
  private takenSincePoll = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly paths: string[],
    readonly reserveBytes: number,
  ) {
    this.poll();
    this.timer = setInterval(() => this.poll(), POLL_MS);
    this.timer.unref();
  }

  private poll(): void {
    for (const p of this.paths) {
      const free = freeBytes(p);
      // The path may be gone for a moment; keep the last figure.
      if (free !== undefined) this.free.set(p, free);
    }
    this.takenSincePoll = 0;
  }

  /** Counts `bytes` as taken, or returns ENOSPC (taking nothing) when that would eat into the reserve. */
  take(bytes: number): BlockferryError | undefined {
    for (const [p, free] of this.free) {
      if (free - this.takenSincePoll - bytes < this.reserveBytes) {
        return new BlockferryError(
          'ENOSPC',
          `no space: ${p} has ${formatBytes(Math.max(0, free - this.takenSincePoll))} free, less than the ${formatBytes(this.reserveBytes)} kept in reserve (--min-free); writes resume when space is freed`,
        );
      }
    }
    this.takenSincePoll += bytes;
    return undefined;
  }

  close(): void {
    clearInterval(this.timer);
  }
}
