// What this test process holds in memory, from /proc/self: for tests of what the journal maps and gives back.
import fs from 'node:fs';

/** KiB of `file` this process has mapped in (its share of RSS), from /proc/self/smaps. */
export function mappedKiB(file: string): number {
  let total = 0;
  let inFile = false;
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) inFile = head[1] === file;
    else if (inFile && line.startsWith('Rss:')) total += Number(/(\d+)/.exec(line)![1]);
  }
  return total;
}

/** KiB of anonymous memory this process has resident (RssAnon in /proc/self/status). */
export function rssAnonKiB(): number {
  return Number(/RssAnon:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
}
