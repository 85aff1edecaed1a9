// `GET /metrics`: Prometheus text from a per-process prom-client Registry. Every gauge is set from the same
// status snapshot that `GET /status` returns (reset first, so a volume or replica that went away drops out).
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { REPLICA_STATES, type AdminStatus } from './status-types.js';

export class StatusMetrics {
  readonly registry = new Registry();
  readonly contentType: string;
  private readonly g: Record<string, Gauge<string>>;
  private readonly c: Record<string, Counter<string>>;

  constructor() {
    const r = this.registry;
    this.contentType = r.contentType;
    collectDefaultMetrics({ register: r, prefix: 'blockferry_' });
    const gauge = (name: string, help: string, labelNames: string[]) => new Gauge({ name, help, labelNames, registers: [r] });
    const counter = (name: string, help: string, labelNames: string[]) => new Counter({ name, help, labelNames, registers: [r] });
    const vol = ['volume'];
    const rep = ['volume', 'replica'];
    this.g = {
      info: gauge('blockferry_info', 'Always 1; the labels say which process this is', ['role', 'version']),
      attention: gauge('blockferry_attention', 'Number of things that need an operator (see /status "attention"); 0 when all is well', []),
      size: gauge('blockferry_volume_size_bytes', 'Volume size in bytes', vol),
      headSeq: gauge('blockferry_journal_head_seq', 'Last sequence number the journal assigned', vol),
      journalAcked: gauge('blockferry_journal_acked_seq', 'Retention point: every consumer has everything up to this seq', vol),
      entries: gauge('blockferry_journal_entries', 'Entries stored in the journal', vol),
      journalBytes: gauge('blockferry_journal_bytes', 'Bytes stored in the journal', vol),
      journalMax: gauge('blockferry_journal_max_bytes', 'Journal size cap (--journal-max)', vol),
      journalCap: gauge('blockferry_journal_cap_bytes', "Journal size cap in force: --journal-max, or less while the journal's disk has less room", vol),
      writeRate: gauge('blockferry_write_bytes_per_second', 'Data bytes written by clients per second, over the last seconds', vol),
      replicaAcked: gauge('blockferry_replica_acked_seq', 'Highest seq the replica has durably applied and acknowledged', rep),
      lagEntries: gauge('blockferry_replica_lag_entries', 'Committed entries the replica has not acknowledged', rep),
      lagBytes: gauge('blockferry_replica_lag_bytes', 'Journal bytes the replica has not acknowledged', rep),
      lagSeconds: gauge('blockferry_replica_lag_seconds', 'Age of the oldest entry the replica has not acknowledged (RPO)', rep),
      replicaState: gauge('blockferry_replica_state', '1 for the replica link state the replica is in, 0 for the others', [...rep, 'state']),
      appliedSeq: gauge('blockferry_replay_applied_seq', 'Highest seq applied to the replica image (durable through blockferry_replay_durable_seq)', vol),
      durableSeq: gauge('blockferry_replay_durable_seq', 'Highest seq on stable storage in the replica: where it comes back after a crash', vol),
      connected: gauge('blockferry_replay_connected', '1 while a primary is connected for this volume', vol),
      consistent: gauge('blockferry_replay_consistent', '1 when the replica is a consistent earlier state of the primary (0 during a resync)', vol),
      lastApply: gauge('blockferry_replay_last_apply_timestamp_seconds', 'When the last batch was applied (Unix time)', vol),
    };
    this.c = {
      writeOps: counter('blockferry_write_ops_total', 'WRITE, TRIM and WRITE_ZEROES requests completed since start', vol),
      writeBytes: counter('blockferry_write_bytes_total', 'Data bytes written by clients since start', vol),
    };
  }

  /** Sets every metric from one status snapshot and renders the Prometheus text. */
  async render(s: AdminStatus): Promise<string> {
    for (const m of Object.values(this.g)) m.reset();
    for (const m of Object.values(this.c)) m.reset();
    const { g, c } = this;
    g.info.set({ role: s.role, version: s.version }, 1);
    g.attention.set(s.attention.length);
    if (s.role === 'serve') {
      for (const v of s.volumes) {
        const volume = v.volume;
        g.size.set({ volume }, v.size);
        if (v.journal) {
          g.headSeq.set({ volume }, v.journal.headSeq);
          g.journalAcked.set({ volume }, v.journal.ackedSeq);
          g.entries.set({ volume }, v.journal.entries);
          g.journalBytes.set({ volume }, v.journal.bytes);
          g.journalMax.set({ volume }, v.journal.maxBytes);
          g.journalCap.set({ volume }, v.journal.capBytes);
        }
        if (v.writes) {
          c.writeOps.inc({ volume }, v.writes.ops);
          c.writeBytes.inc({ volume }, v.writes.bytes);
          g.writeRate.set({ volume }, v.writes.bytesPerSecond);
        }
        for (const r of v.replicas) {
          const l = { volume, replica: r.url };
          g.replicaAcked.set(l, r.ackedSeq);
          g.lagEntries.set(l, r.lagEntries);
          if (r.lagBytes !== null) g.lagBytes.set(l, r.lagBytes);
          g.lagSeconds.set(l, r.lagSeconds);
          for (const state of REPLICA_STATES) g.replicaState.set({ ...l, state }, state === r.state ? 1 : 0);
        }
      }
    } else {
      for (const v of s.volumes) {
        const volume = v.volume;
        g.size.set({ volume }, v.size);
        g.appliedSeq.set({ volume }, v.appliedSeq);
        g.durableSeq.set({ volume }, v.durableSeq);
        g.connected.set({ volume }, v.connected ? 1 : 0);
        g.consistent.set({ volume }, v.consistent ? 1 : 0);
        if (v.lastApplyAt !== null) g.lastApply.set({ volume }, v.lastApplyAt / 1000);
      }
    }
    return this.registry.metrics();
  }
}
