// The issues' throughput and latency targets, checked against one run of bench/run.mjs: each target is a ratio
// between two servers measured in that run (never against a figure from another run or machine). Besides the
// ratio of the means, every round's own ratio is given, since the two servers of a round ran minutes apart at
// most and this machine's runs spread by up to 2x: a target met by the means but missed in most rounds is not
// one to close an issue on.

/**
 * Each target: `num` over `den` for `job`'s `metric`, at least `min` (or, for latency, at most `max`).
 * Metrics are those run.mjs records per fio run: mibs, iops, p99ms.
 */
export const TARGETS = [
  { issue: 3, what: 'journal on / off', num: 'blockferry-journal', den: 'blockferry-nojournal', job: '1M seq write', metric: 'mibs', min: 0.6 },
  { issue: 3, what: 'journal on / off', num: 'blockferry-journal', den: 'blockferry-nojournal', job: '4K rand write', metric: 'iops', min: 0.7 },
  { issue: 3, what: 'journal on vs qemu-nbd', num: 'blockferry-journal', den: 'qemu-nbd', job: '4K rand write', metric: 'iops', min: 1.0 },
  { issue: 4, what: 'replicated / journal only', num: 'blockferry-replicated', den: 'blockferry-journal', job: '1M seq write', metric: 'mibs', min: 0.9 },
  { issue: 4, what: 'replicated / journal only', num: 'blockferry-replicated', den: 'blockferry-journal', job: '4K rand write', metric: 'iops', min: 0.9 },
  { issue: 8, what: 'replicated vs qemu-nbd', num: 'blockferry-replicated', den: 'qemu-nbd', job: '4K rand write', metric: 'iops', min: 1.0 },
  { issue: 8, what: 'replicated vs nbdkit', num: 'blockferry-replicated', den: 'nbdkit', job: '4K rand write', metric: 'iops', min: 0.8 },
  { issue: 8, what: 'replicated vs nbdkit', num: 'blockferry-replicated', den: 'nbdkit', job: '4K rand read', metric: 'iops', min: 1.0 },
  { issue: 8, what: 'replicated vs qemu-nbd', num: 'blockferry-replicated', den: 'qemu-nbd', job: '1M seq write', metric: 'mibs', min: 1.0 },
  { issue: 8, what: 'replicated vs nbdkit', num: 'blockferry-replicated', den: 'nbdkit', job: '1M seq read', metric: 'mibs', min: 0.7 },
  { issue: 8, what: 'replicated vs nbdkit, p99 latency', num: 'blockferry-replicated', den: 'nbdkit', job: '4K rand write', metric: 'p99ms', max: 2.0 },
];

/** The arithmetic mean (run.mjs's table uses it too). */
export const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

const meets = (t, ratio) => (t.max !== undefined ? ratio <= t.max : ratio >= t.min);

/**
 * `results`: server -> job name -> [one record per round, in round order] (as run.mjs keeps them). Returns one
 * row per target whose two servers both ran its job: the ratio of the means, each round's ratio (rounds both
 * servers completed), and whether the means meet the target.
 */
export function evaluateTargets(results, targets = TARGETS) {
  const rows = [];
  for (const t of targets) {
    const num = results[t.num]?.[t.job];
    const den = results[t.den]?.[t.job];
    if (!num?.length || !den?.length) continue;
    const ratio = mean(num.map((r) => r[t.metric])) / mean(den.map((r) => r[t.metric]));
    const rounds = [];
    for (let i = 0; i < Math.min(num.length, den.length); i++) rounds.push(num[i][t.metric] / den[i][t.metric]);
    rows.push({ target: t, ratio, rounds, met: meets(t, ratio), roundsMet: rounds.filter((r) => meets(t, r)).length });
  }
  return rows;
}

/** The rows as lines for run.mjs's report (three decimals: a ratio printed as the bound itself may be just below it). */
export function formatTargets(rows) {
  if (rows.length === 0) return [];
  const lines = ['targets (the issues\'; ratio of the means, then each round\'s own ratio):'];
  for (const { target: t, ratio, rounds, met, roundsMet } of rows) {
    const bound = t.max !== undefined ? `≤ ${t.max.toFixed(2)}` : `≥ ${t.min.toFixed(2)}`;
    const each = rounds.map((r) => r.toFixed(3)).join(' / ');
    lines.push(`  #${t.issue} ${t.job}, ${t.what}${t.metric === 'p99ms' ? '' : ` (${t.metric === 'mibs' ? 'MiB/s' : 'IOPS'})`}: ${ratio.toFixed(3)}× ${bound}: ${met ? 'met' : 'NOT met'} (rounds ${each}: met in ${roundsMet} of ${rounds.length})`);
  }
  return lines;
}
