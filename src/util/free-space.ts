// Free space of a filesystem, as an unprivileged writer sees it (statfs's bavail, not bfree).
import fs from 'node:fs';

/** Bytes free to this process on the filesystem holding `path`; undefined when statfs fails (path gone). */
export function freeBytes(path: string): number | undefined {
  try {
    const s = fs.statfsSync(path);
    return s.bavail * s.bsize;
  } catch {
    return undefined;
  }
}
