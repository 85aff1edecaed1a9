// `blockferry status`: asks a running `serve` or `replay` for GET /status on its admin port and prints it for
// people (a table per replica or replica volume, then what needs attention) or as JSON.
import type { Argv, CommandModule } from 'yargs';
import { replayAttention, serveAttention } from '../../admin/attention.js';
import type { AdminStatus, ReplayStatus, ServeStatus } from '../../admin/status-types.js';
import { BlockferryError, UsageError } from '../../util/errors.js';
import { formatBytes } from '../../util/size.js';
import { parseHostPort } from '../listen.js';

/** Exit status when the process answered and something needs attention (0: all continuous, 1: error). */
export const EXIT_ATTENTION = 2;
/** How long to wait for the admin server's answer. */
const FETCH_TIMEOUT_MS = 5_000;

interface StatusArgs {
  admin: string;
  json: boolean;
}

/**
 * "http://h:p[/prefix]" as given (its /status, or itself when it already ends in /status: the URL copied from a
 * browser); "h:p", ":p" or "p" → http://h:p (loopback without a host).
 */
export function statusUrl(admin: string): URL {
  const text = admin.trim();
  if (/^https?:\/\//i.test(text)) {
    const base = new URL(text);
    if (/\/status\/?$/.test(base.pathname)) return new URL(base.pathname.replace(/\/$/, ''), base);
    if (!base.pathname.endsWith('/')) base.pathname += '/';
    return new URL('status', base);
  }
  const { host, port } = parseHostPort(/^\d+$/.test(text) ? `:${text}` : text, '--admin', '127.0.0.1');
  return new URL(`http://${host.includes(':') ? `[${host}]` : host}:${port}/status`);
}

function table(head: string[], rows: string[][], rightAligned: Set<number>): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (rightAligned.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

function ago(ms: number | null, now: number): string {
  if (ms === null) return 'never';
  return `${Math.max(0, (now - ms) / 1000).toFixed(1)} s ago`;
}

function formatServe(s: ServeStatus): string {
  const rows: string[][] = [];
  for (const v of s.volumes) {
    const j = v.journal;
    // The cap in force: less than --journal-max while the journal's disk has less room ("disk" says so).
    // (A serve from before capBytes: its cap is --journal-max.)
    const cap = j ? (j.capBytes ?? j.maxBytes) : 0;
    const journal = j ? `${formatBytes(j.bytes)} / ${formatBytes(cap)}${cap < j.maxBytes ? ' disk' : ''} (${cap > 0 ? Math.floor((100 * j.bytes) / cap) : 0}%)` : 'no journal';
    if (v.replicas.length === 0) rows.push([v.volume, '-', 'no replica', '-', '-', '-', journal]);
    for (const r of v.replicas) {
      const state = r.resync ? `${r.state} ${r.resync.percent}%` : r.state;
      rows.push([v.volume, r.url, state, String(r.lagEntries), r.lagBytes === null ? '?' : formatBytes(r.lagBytes), r.lagSeconds.toFixed(1), journal]);
    }
  }
  const w = s.writes;
  const head = `blockferry serve ${s.version} (pid ${s.pid}): ${s.volumes.length} volume(s), writes ${formatBytes(Math.round(w.bytesPerSecond))}/s, ${Math.round(w.opsPerSecond)} ops/s`;
  return `${head}\n${table(['VOLUME', 'REPLICA', 'STATE', 'LAG ENTRIES', 'LAG BYTES', 'LAG SECONDS', 'JOURNAL USED / CAP'], rows, new Set([3, 4, 5]))}`;
}

function formatReplay(s: ReplayStatus): string {
  const rows = s.volumes.map((v) => [
    v.volume,
    v.promoted ? 'promoted' : v.connected ? 'connected' : 'disconnected',
    v.consistent ? 'yes' : 'NO (resync)',
    String(v.appliedSeq),
    String(v.durableSeq),
    v.primary ?? '-',
    ago(v.lastApplyAt, s.now),
    formatBytes(v.size),
  ]);
  const head = `blockferry replay ${s.version} (pid ${s.pid}): ${s.volumes.length} volume(s)`;
  if (rows.length === 0) return `${head}\n(no replica in the data directory yet: no primary has connected)`;
  return `${head}\n${table(['VOLUME', 'STATE', 'CONSISTENT', 'APPLIED SEQ', 'DURABLE SEQ', 'PRIMARY', 'LAST APPLY', 'SIZE'], rows, new Set([3, 4, 7]))}`;
}

/** The human report: table, then what needs attention (or that all is well). */
export function formatStatus(s: AdminStatus, attention: string[]): string {
  const body = s.role === 'serve' ? formatServe(s) : formatReplay(s);
  const tail = attention.length === 0 ? 'all well: nothing needs attention' : `needs attention:\n${attention.map((a) => `  - ${a}`).join('\n')}`;
  return `${body}\n\n${tail}\n`;
}

export const command: CommandModule<object, StatusArgs> = {
  command: 'status',
  describe: 'Show replication status of a running serve or replay (from its --admin port)',
  builder: (y: Argv) =>
    y
      .option('admin', {
        type: 'string',
        demandOption: true,
        describe: 'Admin address of the process: http://HOST:PORT, HOST:PORT, or PORT (127.0.0.1)',
      })
      .option('json', { type: 'boolean', default: false, describe: 'Print the /status JSON as the server sent it' })
      .example('$0 status --admin 127.0.0.1:9101', 'a table of every volume and replica, then what needs attention')
      .example('$0 status --admin http://127.0.0.1:9101 --json', 'the raw /status JSON')
      .example('$0 status --admin 9101 >/dev/null || echo "replication needs a look"', 'in a health check: non-zero unless all is well')
      .epilogue(
        'Exit status: 0 every replica is continuous (nothing needs attention), 2 something needs attention ' +
          '(a replica disconnected, in backlog or resync, a journal near its cap, a replica volume without its primary), ' +
          '1 error (admin port unreachable, bad answer). A usage error also exits 2.',
      ) as Argv<StatusArgs>,
  handler: async (args) => {
    let url: URL;
    try {
      url = statusUrl(args.admin);
    } catch (err) {
      throw err instanceof UsageError ? err : new UsageError(`--admin ${args.admin}: ${(err as Error).message}`);
    }
    let text: string;
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(FETCH_TIMEOUT_MS), headers: { accept: 'application/json' } });
      text = await res.text();
      if (!res.ok) throw new Error(`HTTP ${res.status}: ${text.trim().slice(0, 200)}`);
    } catch (err) {
      const e = err as Error & { cause?: { code?: string; message?: string } };
      const why = e.cause?.code ?? e.cause?.message ?? e.message;
      throw new BlockferryError('ERR_ADMIN_UNREACHABLE', `cannot read ${url.href}: ${why}; is blockferry running with --admin there?`);
    }
    let status: AdminStatus;
    try {
      status = JSON.parse(text) as AdminStatus;
      if (status.role !== 'serve' && status.role !== 'replay') throw new Error('no "role" field');
    } catch (err) {
      throw new BlockferryError('ERR_ADMIN_ANSWER', `${url.href} did not answer with blockferry status JSON (${(err as Error).message})`);
    }
    // Judged here with the same functions the server uses, so an older server's answer is judged alike.
    const attention = status.role === 'serve' ? serveAttention(status) : replayAttention(status);
    process.stdout.write(args.json ? (text.endsWith('\n') ? text : `${text}\n`) : formatStatus(status, attention));
    process.exitCode = attention.length > 0 ? EXIT_ATTENTION : 0;
  },
};
