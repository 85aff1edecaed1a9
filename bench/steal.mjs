// CPU steal: the share of the machine's CPU time the hypervisor gave to other guests. On these VMs it moved
// between 0% and 40%+ from one job to the next, which is most of why runs differ up to 2x: figures measured
// under very different steal do not compare.
import fs from 'node:fs';

/** The machine's CPU counters from /proc/stat (undefined where there is none). */
function cpuTimes() {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1, 9).map(Number);
    return { total: f.reduce((a, b) => a + b, 0), steal: f[7] };
  } catch {
    return undefined;
  }
}

/** Starts measuring: the function returned gives the percent of CPU time stolen since (NaN where unknown). */
export function stealMeter() {
  const a = cpuTimes();
  return () => {
    const b = cpuTimes();
    return a && b && b.total > a.total ? (100 * (b.steal - a.steal)) / (b.total - a.total) : NaN;
  };
}

/** "12%", or '' where unknown. */
export function formatSteal(pct) {
  return Number.isFinite(pct) ? `${pct.toFixed(0)}%` : '';
}
