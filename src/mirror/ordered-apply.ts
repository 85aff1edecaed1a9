// Keeps the local image in journal order: a change to a byte range may only be applied once every earlier
// (lower-seq) change that overlaps it has been applied. Non-overlapping changes run concurrently.
// Also tracks the applied watermark: the highest seq such that it and every seq before it is applied.

interface InFlight {
  seq: number;
  start: number;
  end: number;
  settled: Promise<boolean>;
}

export class OrderedApply {
  // Kept in seq order (appended as seqs are assigned), so scans stop early and the watermark is the head.
  private readonly inflight: InFlight[] = [];
  private applied: number;
  // Completed seqs above the watermark (they finished before an earlier one did).
  private readonly doneAbove = new Set<number>();
  /** Lowest seq whose apply failed (Infinity when none). */
  failedSeq = Infinity;

  constructor(appliedSeq: number) {
    this.applied = appliedSeq;
  }

  /** Highest seq with it and all earlier seqs applied. */
  get appliedSeq(): number {
    return this.applied;
  }

  get pending(): number {
    return this.inflight.length;
  }

  /**
   * Registers seq (which must be larger than every seq registered before) for [start, end) and runs `apply`
   * once every earlier overlapping change has settled. A zero-length range (a FLUSH marker) waits for nothing.
   */
  run(seq: number, start: number, end: number, ready: Promise<void>, apply: () => Promise<void>): Promise<void> {
    const deps: Promise<unknown>[] = [];
    for (const f of this.inflight) {
      if (f.start < end && start < f.end) deps.push(f.settled);
    }
    const work = (async () => {
      try {
        await ready;
        // allSettled: an earlier failure is reported to its own caller; the order is still respected.
        if (deps.length > 0) await Promise.allSettled(deps);
        await apply();
      } catch (err) {
        // Recorded before the caller hears of it, so no later change can slip past the failure.
        this.failedSeq = Math.min(this.failedSeq, seq);
        throw err;
      }
    })();
    const settled = work.then(
      () => true,
      () => false,
    );
    const entry: InFlight = { seq, start, end, settled };
    this.inflight.push(entry);
    void settled.then((ok) => this.finish(entry, ok));
    return work;
  }

  /** Resolves when every change registered so far has settled. */
  async drain(): Promise<void> {
    while (this.inflight.length > 0) {
      await Promise.allSettled(this.inflight.map((f) => f.settled));
    }
  }

  /** Resolves when every change registered so far that overlaps [start, end) has settled. */
  async drainRange(start: number, end: number): Promise<void> {
    const deps = this.inflight.filter((f) => f.start < end && start < f.end).map((f) => f.settled);
    await Promise.allSettled(deps);
  }

  private finish(entry: InFlight, ok: boolean): void {
    const i = this.inflight.indexOf(entry);
    if (i >= 0) this.inflight.splice(i, 1);
    // A failed change is not applied: the watermark stops below it for good, so the checkpoint never passes
    // it and recovery re-applies it (and everything after it, in order) on the next start.
    if (!ok) return;
    if (entry.seq > this.failedSeq) return;
    if (entry.seq === this.applied + 1) {
      this.applied = entry.seq;
      while (this.doneAbove.delete(this.applied + 1)) this.applied++;
    } else if (entry.seq > this.applied) {
      this.doneAbove.add(entry.seq);
    }
  }
}
