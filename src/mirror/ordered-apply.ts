// Keeps the local image in journal order: a change to a byte range may only be applied once every earlier
// (lower-seq) change that overlaps it has been applied. Non-overlapping changes run concurrently.
// Also tracks the applied watermark: the highest seq such that it and every seq before it is applied.

interface InFlight {
  seq: number;
  start: number;
  end: number;
  /** Settles once the change is applied (or has failed); later overlapping changes wait for it. */
  work: Promise<void>;
}

export class OrderedApply {
  // Kept in seq order (appended as seqs are assigned), so scans stop early and the watermark is the head.
  private readonly inflight: InFlight[] = [];
  private applied: number;
  // Completed seqs above the watermark (they finished before an earlier one did).
  private readonly doneAbove = new Set<number>();
  /** Lowest seq whose apply failed (Infinity when none). */
  failedSeq = Infinity;

  /** `onFirstFailure`: called once, with the seq and error of the first change that failed. */
  constructor(
    appliedSeq: number,
    private readonly onFirstFailure?: (seq: number, err: unknown) => void,
  ) {
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
   * once `ready` has resolved and every earlier overlapping change has settled. A zero-length range (a FLUSH
   * marker) waits for nothing. `apply` may finish synchronously (return nothing) or return a promise.
   *
   * This is on every write's path: one promise per change when nothing overlaps (ready.then), where an async
   * function with a settled-promise and a finish-promise chained to it made four, and the sampled JS heap
   * allocation per 4 KiB write with a replica was ~4.8 KB.
   */
  run(seq: number, start: number, end: number, ready: Promise<void>, apply: () => Promise<void> | void): Promise<void> {
    let deps: Promise<void>[] | undefined;
    for (const f of this.inflight) {
      if (f.start < end && start < f.end) (deps ??= []).push(f.work);
    }
    const entry: InFlight = { seq, start, end, work: undefined as unknown as Promise<void> };
    // Recorded before the caller hears of it, so no later change can slip past the failure.
    const fail = (err: unknown): never => {
      if (this.failedSeq === Infinity) this.onFirstFailure?.(seq, err);
      this.failedSeq = Math.min(this.failedSeq, seq);
      this.finish(entry, false);
      throw err;
    };
    const go = (): Promise<void> | void => {
      let pending: Promise<void> | void;
      try {
        pending = apply();
      } catch (err) {
        return fail(err);
      }
      if (pending) return pending.then(() => this.finish(entry, true), fail);
      this.finish(entry, true);
    };
    // allSettled: an earlier failure is reported to its own caller; the order is still respected.
    entry.work = deps ? ready.then(() => Promise.allSettled(deps)).then(go, fail) : ready.then(go, fail);
    this.inflight.push(entry);
    return entry.work;
  }

  /** Resolves when every change registered so far has settled. */
  async drain(): Promise<void> {
    while (this.inflight.length > 0) {
      await Promise.allSettled(this.inflight.map((f) => f.work));
    }
  }

  /** Resolves when every change registered so far that overlaps [start, end) has settled. */
  async drainRange(start: number, end: number): Promise<void> {
    const deps = this.inflight.filter((f) => f.start < end && start < f.end).map((f) => f.work);
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
