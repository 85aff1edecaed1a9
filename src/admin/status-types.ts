// The shapes `GET /status` returns. One snapshot feeds the JSON, the Prometheus gauges, `blockferry status`
// and the status page, so they can never disagree.

/** Changes clients made through NBD: counts since start and rates over the last few seconds. */
export interface Throughput {
  /** WRITE, TRIM and WRITE_ZEROES requests completed. */
  ops: number;
  /** Data bytes of completed WRITEs (trims and zeroing carry no data). */
  bytes: number;
  opsPerSecond: number;
  bytesPerSecond: number;
}

/**
 * Every state a replicator reports for its replica (DESIGN.md's link states, plus the two it stops in):
 * initial-sync → continuous ⇄ backlog → disconnected → (journal cap reached) bitmap → resync → continuous.
 * `initial-sync` and `resync` compare chunk digests, the replica inconsistent meanwhile; `bitmap` is a replica
 * away for so long that the journal let go of its changes and tracks their regions instead.
 */
export const REPLICA_STATES = ['connecting', 'initial-sync', 'continuous', 'backlog', 'resync', 'disconnected', 'bitmap', 'needs-resync', 'split-brain'] as const;
export type ReplicaState = (typeof REPLICA_STATES)[number];

/** One replica of one volume, as its replicator on the primary sees it. */
export interface ReplicaStatus {
  url: string;
  volume: string;
  state: ReplicaState;
  /** Highest seq the replica has applied durably and acknowledged. */
  ackedSeq: number;
  /** Highest seq the replica has applied (visible there, maybe not yet fsynced): lag is counted from it. */
  appliedSeq?: number;
  /** Committed entries the replica has not applied yet. */
  lagEntries: number;
  /**
   * Journal bytes of those entries (payload and entry headers), plus, while the replica is on a dirty bitmap,
   * the bytes of its dirty regions (what the resync compares at most); null if the journal could not be read.
   */
  lagBytes: number | null;
  /**
   * Age of the oldest change the replica lacks: what a disaster now would lose (RPO). For a replica on a dirty
   * bitmap, the age of the first change the bitmap stands for, until the resync over it has been applied.
   */
  lagSeconds: number;
  resync?: { doneBytes: number; totalBytes: number; sentBytes: number; startedAt: number; percent: number } | null;
  /** Bytes marked in the dirty-region bitmap (a replica that was away when the journal filled); 0 otherwise. */
  dirtyBytes?: number;
  lastError?: string | null;
}

export interface JournalStatus {
  headSeq: number;
  committedSeq: number;
  tailSeq: number;
  /** Retention point: every consumer (replicas, the image checkpoint) has everything up to here. */
  ackedSeq: number;
  checkpointSeq: number;
  appliedSeq: number | null;
  entries: number;
  bytes: number;
  /** --journal-max. */
  maxBytes: number;
  /** The cap in force: maxBytes, or less while the journal's filesystem has less room (it fills to there). */
  capBytes: number;
}

export interface ServeVolumeStatus {
  volume: string;
  volumeId: string | null;
  image: string;
  size: number;
  /** null when served with --no-journal or --read-only. */
  journal: JournalStatus | null;
  writes: Throughput | null;
  /** Writes are being refused with ENOSPC for want of space (--min-free): since when, how many, why; else null. */
  writesRefused?: { since: number; refused: number; reason: string } | null;
  /** Why the volume refuses every change until serve is restarted (an image write or journal commit failed); else null. */
  failure?: string | null;
  replicas: ReplicaStatus[];
}

export interface ServeStatusBody {
  volumes: ServeVolumeStatus[];
  /** All volumes together. */
  writes: Throughput;
}

export interface ReplayVolumeStatus {
  volume: string;
  size: number;
  /** Highest seq applied to the replica image (visible there; on stable storage through durableSeq). */
  appliedSeq: number;
  /**
   * Highest seq on stable storage with the state recording it: where the replica comes back after a crash or a
   * power cut, and what `promote` would make a primary of. The replica syncs every second or 256 MiB, and at
   * the primary's FLUSH markers.
   */
  durableSeq: number;
  /** A primary is connected and shipping to this volume now. */
  connected: boolean;
  /** Address of the connected primary, or null. */
  primary: string | null;
  /** The primary volume this replica belongs to (set by the first primary that connected). */
  volumeId: string | null;
  /** false while a resync is under way: the image is then not yet a consistent earlier state. */
  consistent: boolean;
  /** When the last batch was applied (ms since the epoch), or null if none since this process started. */
  lastApplyAt: number | null;
  /** When `blockferry promote` made this replica a primary (it takes no more replication), or null. */
  promoted: string | null;
  /** What was wrong with it when the replayer started, if anything (its state file unreadable, its image gone). */
  problem?: string;
}

export interface ReplayStatusBody {
  volumes: ReplayVolumeStatus[];
}

/** Fields the admin server adds around every body. */
export interface StatusEnvelope {
  role: 'serve' | 'replay';
  version: string;
  pid: number;
  /** ms since the epoch. */
  startedAt: number;
  now: number;
  /** Sentences naming what needs an operator's attention; empty when all is well. */
  attention: string[];
}

export type ServeStatus = StatusEnvelope & ServeStatusBody & { role: 'serve' };
export type ReplayStatus = StatusEnvelope & ReplayStatusBody & { role: 'replay' };
export type AdminStatus = ServeStatus | ReplayStatus;
