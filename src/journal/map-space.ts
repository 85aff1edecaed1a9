// Disk blocks allocated ahead of LMDB's write map, so that a full filesystem is an error and not a SIGBUS.
//
// With a write map LMDB stores pages by writing into a shared mapping of its file instead of building them in
// malloc'd memory and writing them out: one copy of each value instead of two (a memcpy and a writev). The file
// is sparse past what has been written (LMDB extends it to the map size with ftruncate), and a store into a hole
// on a full filesystem raises SIGBUS, which kills the process. So every write transaction first calls
// reserve(bound): blocks stay allocated (fallocate) ahead of the last page LMDB uses, and a full disk fails that
// fallocate with ENOSPC, which the journal reports like any failed commit.
import fs from 'node:fs';
import { loadNative, type NativeHelper } from '../device/native.js';
import { BlockferryError } from '../util/errors.js';

/** Pages a write transaction may add besides its values: branches, the main database, the free list, meta. */
const TXN_PAGES = 32;

type Allocate = NonNullable<NativeHelper['allocate']>;

export class MapSpace {
  /** Bytes from the file's start known to have blocks. */
  private allocatedTo = 0;
  /** End of LMDB's last used page when last asked, and the most the transactions since can have added. */
  private knownEnd = 0;
  private growth = 0;

  private constructor(
    private readonly fd: number,
    private readonly allocate: Allocate,
    private readonly pageSize: number,
    private readonly ahead: number,
    private readonly lastPage: () => number,
  ) {}

  /**
   * The native fallocate, unless the helper lacks it: then the journal does without a write map. Whether the
   * filesystem supports it, open() finds out.
   */
  static allocator(): Allocate | undefined {
    return loadNative()?.allocate;
  }

  /**
   * Opens the LMDB file for allocating and allocates ahead of its last page at once (before anything writes).
   * `lastPage` reports LMDB's last used page number. Throws (ENOSPC, EOPNOTSUPP and the like) when that first
   * allocation fails.
   */
  static open(allocate: Allocate, file: string, pageSize: number, ahead: number, lastPage: () => number): MapSpace {
    const fd = fs.openSync(file, 'r+');
    const space = new MapSpace(fd, allocate, pageSize, ahead, lastPage);
    try {
      space.reserve(0);
    } catch (err) {
      space.close();
      throw err;
    }
    return space;
  }

  /** The most bytes of new pages storing values of these sizes can take in one transaction. */
  boundFor(values: number, bytes: number): number {
    // Each value takes at most its size rounded up to whole pages (overflow pages) or, small, a place in a leaf
    // that may be a new page.
    return bytes + values * this.pageSize;
  }

  /**
   * Makes sure the next write transaction, which adds at most `bytes` of new pages (see boundFor), writes only
   * into allocated blocks. Throws the fallocate error (ENOSPC) when the disk has no room.
   */
  reserve(bytes: number): void {
    const need = bytes + TXN_PAGES * this.pageSize;
    if (this.knownEnd + this.growth + need <= this.allocatedTo) {
      this.growth += need;
      return;
    }
    this.knownEnd = (this.lastPage() + 1) * this.pageSize;
    this.growth = 0;
    if (this.knownEnd + need > this.allocatedTo) {
      // Ahead by `ahead` where the disk has it; else only what this transaction needs.
      const least = this.knownEnd + need;
      try {
        this.allocate(this.fd, this.allocatedTo, least + this.ahead - this.allocatedTo);
        this.allocatedTo = least + this.ahead;
      } catch {
        try {
          this.allocate(this.fd, this.allocatedTo, least - this.allocatedTo);
        } catch (err) {
          const e = err as NodeJS.ErrnoException;
          throw new BlockferryError(e.code ?? 'EIO', `cannot allocate ${least - this.allocatedTo} bytes of journal space: ${e.message}`, { cause: err });
        }
        this.allocatedTo = least;
      }
    }
    this.growth = need;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
