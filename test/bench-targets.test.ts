// The benchmark's target check (bench/targets.mjs): the issues' targets are judged by what it prints, so a
// wrong ratio, a latency bound read the wrong way round or rounds paired across servers wrongly would misreport.
import t from 'tap';
// @ts-expect-error: a plain ES module of the benchmark, without type declarations
import { evaluateTargets, formatTargets, TARGETS } from '../bench/targets.mjs';

interface Run { mibs: number; iops: number; p99ms: number }
interface Target { issue: number; num: string; den: string; job: string; metric: keyof Run; min?: number; max?: number }
interface Row { target: Target; ratio: number; rounds: number[]; met: boolean; roundsMet: number }

const run = (iops: number, p99ms = 1, mibs = 0): Run => ({ mibs, iops, p99ms });
const find = (rows: Row[], num: string, den: string, job: string, metric: string) =>
  rows.find((r) => r.target.num === num && r.target.den === den && r.target.job === job && r.target.metric === metric);

t.test('ratios of the means and of each round, for the targets whose servers ran', async (t) => {
  const results = {
    'blockferry-nojournal': { '4K rand write': [run(60000), run(40000)] },
    'blockferry-journal': { '4K rand write': [run(45000), run(30000)] },
  };
  const rows: Row[] = evaluateTargets(results);
  t.equal(rows.length, 1, 'only journal on / off at 4 KiB: no other pair ran the job');
  const r = rows[0];
  t.equal(r.target.issue, 3);
  t.equal(r.ratio, 75000 / 100000, 'the ratio of the means (not the mean of the ratios)');
  t.same(r.rounds, [0.75, 0.75], 'each round against the same round of the other server');
  t.equal(r.met, true, '0.75 meets the 0.7 target');
  t.equal(r.roundsMet, 2);
});

t.test('a target missed by the means, met in one round', async (t) => {
  const results = {
    'blockferry-nojournal': { '4K rand write': [run(50000), run(70000)] },
    'blockferry-journal': { '4K rand write': [run(40000), run(35000)] },
  };
  const [r]: Row[] = evaluateTargets(results);
  t.equal(r.met, false, `75000 / 120000 = ${r.ratio.toFixed(3)} is below 0.7`);
  t.same(r.rounds, [0.8, 0.5]);
  t.equal(r.roundsMet, 1);
  const text = formatTargets([r]).join('\n');
  t.match(text, /#3 4K rand write, journal on \/ off \(IOPS\): 0\.625× ≥ 0\.70: NOT met \(rounds 0\.800 \/ 0\.500: met in 1 of 2\)/);
});

t.test('latency is an upper bound: a lower p99 than twice the peer\'s is met', async (t) => {
  const results = {
    'blockferry-replicated': { '4K rand write': [run(20000, 5)] },
    nbdkit: { '4K rand write': [run(50000, 4)] },
    'qemu-nbd': { '4K rand write': [run(25000, 9)] },
  };
  const rows: Row[] = evaluateTargets(results);
  const p99 = find(rows, 'blockferry-replicated', 'nbdkit', '4K rand write', 'p99ms')!;
  t.equal(p99.ratio, 1.25);
  t.equal(p99.met, true, '1.25x nbdkit\'s p99 is within 2x');
  const iops = find(rows, 'blockferry-replicated', 'nbdkit', '4K rand write', 'iops')!;
  t.equal(iops.ratio, 0.4);
  t.equal(iops.met, false, '0.4x nbdkit\'s IOPS is below 0.8x');
  const qemu = find(rows, 'blockferry-replicated', 'qemu-nbd', '4K rand write', 'iops')!;
  t.equal(qemu.met, false, '0.8x qemu-nbd is below 1.0x');
  t.match(formatTargets(rows).join('\n'), /p99 latency: 1\.250× ≤ 2\.00: met/);
});

t.test('rounds only one server completed are left out of the per-round ratios', async (t) => {
  const results = {
    'blockferry-journal': { '1M seq write': [run(0, 1, 1000), run(0, 1, 1100), run(0, 1, 900)] },
    'blockferry-replicated': { '1M seq write': [run(0, 1, 500), run(0, 1, 550)] },
  };
  const [r]: Row[] = evaluateTargets(results);
  t.same(r.rounds, [0.5, 0.5]);
  t.equal(r.target.issue, 4);
});

t.test('every target names a job run.mjs runs and a metric it records', async (t) => {
  const jobs = ['1M seq write', '1M seq read', '4K rand write', '4K rand read'];
  for (const target of TARGETS as Target[]) {
    t.ok(jobs.includes(target.job), `${target.job} is a bench job`);
    t.ok(['mibs', 'iops', 'p99ms'].includes(target.metric), `${target.metric} is recorded`);
    t.ok((target.min === undefined) !== (target.max === undefined), 'exactly one bound');
  }
});
