// Full disks, refused cleanly: before a change is journaled, the filesystems holding the journal and the
// image must keep `reserveBytes` free. When they do not, the change is refused with ENOSPC (the NBD client
// sees ENOSPC) and nothing is journaled, so the journal stays consistent and no sequence number is spent;
// when space returns, writes are taken again. Free space is polled (statfs) and, between polls, the bytes
// taken since are subtracted, so a burst cannot run far past the reserve.
import { BlockferryError } from '../util/errors.js';
import { freeBytes } from '../util/free-space.js';
import { formatBytes } from '../util/size.js';

const POLL_MS = 250;

/** While writes are refused: since when (ms since the epoch), how many so far, and why (the latest refusal). */
export interface SpaceRefusal {
  since: number;
  refused: number;
  reason: string;
}

export class SpaceGuard {
  private readonly free = new Map<string, number>();
  /** Set from the first refused write until one is taken again (status shows it; the owner logs both ends). */
  refusing: SpaceRefusal | undefined;
  /** The size of the write refused last: once it would fit, writes are no longer being refused. */
  private lastRefusedBytes = 0;
  private takenSincePoll = 0;
  private readonly timer: NodeJS.Timeout;

  /** `release`: gives back disk space held for speed (the journal's spare data files), returns the bytes freed. */
  constructor(
    private readonly paths: string[],
    readonly reserveBytes: number,
    private readonly release?: () => number,
    /** Told when writes start being refused (with the first refusal) and when they are taken again. */
    private readonly onChange?: (refusal: SpaceRefusal | undefined) => void,
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
    // Space is back (freed by someone else) for the write last refused: no longer refusing, though no write
    // has asked since.
    if (this.refusing && !this.short(this.lastRefusedBytes)) this.endRefusal();
  }

  /**
   * Counts `bytes` as taken, or returns ENOSPC (taking nothing) when that would eat into the reserve even after
   * what `release` gives back.
   */
  take(bytes: number): BlockferryError | undefined {
    let short = this.short(bytes);
    if (short) {
      // Before refusing, look again: the estimate only falls between polls, and space freed since (the journal
      // dropping a segment it had held for an absent replica) would be refused for up to a poll's time.
      this.release?.();
      this.poll();
      short = this.short(bytes);
    }
    if (short) {
      this.lastRefusedBytes = bytes;
      const reason = `no space: ${short.path} has ${formatBytes(short.free)} free, less than the ${formatBytes(this.reserveBytes)} kept in reserve (--min-free); writes resume when space is freed`;
      if (this.refusing) {
        this.refusing.refused++;
        this.refusing.reason = reason;
      } else {
        this.refusing = { since: Date.now(), refused: 1, reason };
        this.onChange?.(this.refusing);
      }
      return new BlockferryError('ENOSPC', reason);
    }
    this.takenSincePoll += bytes;
    if (this.refusing) this.endRefusal();
    return undefined;
  }

  /** Writes are taken again: the refusal ends (the owner is told). */
  private endRefusal(): void {
    this.refusing = undefined;
    this.onChange?.(undefined);
  }

  /** A filesystem where taking `bytes` would eat into the reserve. */
  private short(bytes: number): { path: string; free: number } | undefined {
    for (const [path, free] of this.free) {
      if (free - this.takenSincePoll - bytes < this.reserveBytes) return { path, free: Math.max(0, free - this.takenSincePoll) };
    }
    return undefined;
  }

  close(): void {
    clearInterval(this.timer);
  }
}
