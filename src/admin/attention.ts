// What needs an operator's attention, in words. Used by the admin server (the `attention` field of /status,
// which the page shows) and by `blockferry status` (its exit code), so both judge the same way.
import type { ReplayStatusBody, ServeStatusBody } from './status-types.js';
import { formatBytes } from '../util/size.js';

/** A journal this full is close to making writes wait (or, later, to switching a replica to a bitmap). */
export const JOURNAL_ATTENTION_RATIO = 0.9;

/** The one replica state that needs nothing: shipping as fast as entries are written. */
export const HEALTHY_STATE = 'continuous';

export function serveAttention(s: ServeStatusBody): string[] {
  const out: string[] = [];
  for (const v of s.volumes) {
    if (v.failure) out.push(`volume ${v.volume}: every write fails until serve is restarted: ${v.failure}`);
    for (const r of v.replicas) {
      if (r.state === HEALTHY_STATE) continue;
      const lag = `${r.lagEntries} entries, ${r.lagSeconds.toFixed(1)} s behind`;
      out.push(`volume ${v.volume}: replica ${r.url} is ${r.state} (${lag})${r.lastError ? `: ${r.lastError}` : ''}`);
    }
    if (v.writesRefused) {
      out.push(`volume ${v.volume}: ${v.writesRefused.refused} write(s) refused with ENOSPC since ${new Date(v.writesRefused.since).toISOString()}: ${v.writesRefused.reason}`);
    }
    const j = v.journal;
    const cap = j ? (j.capBytes ?? j.maxBytes) : 0; // a serve from before capBytes: --journal-max
    if (j && cap > 0 && j.bytes >= JOURNAL_ATTENTION_RATIO * cap) {
      const disk = cap < j.maxBytes ? ` (${formatBytes(cap)}, less than --journal-max: its disk has no more room)` : '';
      out.push(`volume ${v.volume}: the journal holds ${Math.floor((100 * j.bytes) / cap)}% of its cap${disk}; writes wait when it is full`);
    }
  }
  return out;
}

export function replayAttention(s: ReplayStatusBody): string[] {
  const out: string[] = [];
  for (const v of s.volumes) {
    if (v.problem) {
      out.push(`volume ${v.volume}: ${v.problem}`);
      continue;
    }
    // A promoted replica is a primary now: that no primary replicates into it is how it should be.
    if (v.promoted) continue;
    if (!v.connected) out.push(`volume ${v.volume}: no primary is connected (replica at seq ${v.appliedSeq})`);
    if (!v.consistent) out.push(`volume ${v.volume}: the replica is inconsistent until the primary finishes its resync`);
  }
  return out;
}
