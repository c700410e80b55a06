//! The partition worker's decisions, as pure functions of what it knows:
//! where a partition starts reading, when a batch closes, what range a
//! commit covers and when it carries a checkpoint. The worker and the
//! rebalance callback only act on them, so each rule is tested here
//! without a broker or a database.

use std::time::Duration;

use crate::config::StartFrom;

/// Where an assigned partition's consumer is positioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seek {
    /// At this offset (0 resolves to the log start through
    /// `auto.offset.reset=earliest` when retention has moved it).
    At(i64),
    /// After the last record (`kafka.start_from = "latest"`, nothing stored).
    End,
}

/// Where a partition resumes, given its readable checkpoint's offset, its
/// committed offset and `kafka.start_from`: the position to seek to, and
/// the first offset the worker expects there (`None`: it cannot know; a
/// known one makes records the broker no longer has show up as a gap).
///
/// A checkpoint is where the engine's state was saved: read from there
/// (records up to the committed offset rebuild state, writing nothing). A
/// committed partition without a readable checkpoint rebuilds its state
/// from offset 0. A partition never committed starts where `start_from`
/// says: offset 0 rather than the logical beginning (which librdkafka's
/// mock cluster answers wrongly), or the end.
pub(crate) fn resume_point(
    checkpoint_at: Option<i64>,
    committed: Option<i64>,
    start_from: StartFrom,
) -> (Seek, Option<i64>) {
    match (checkpoint_at, committed, start_from) {
        (Some(at), _, _) => (Seek::At(at), Some(at)),
        (None, Some(_), _) | (None, None, StartFrom::Earliest) => (Seek::At(0), Some(0)),
        (None, None, StartFrom::Latest) => (Seek::End, None),
    }
}

/// How long a batch that must end where an existing lake file ends waits
/// for that offset before it closes anyway (the file's last records are
/// then gone from the broker: retention).
pub(crate) const REWRITE_PATIENCE: Duration = Duration::from_secs(60);

/// Whether the open batch closes now: it holds `max_records` records
/// (dead letters included) or it has been open `max_age`. A batch that
/// rewrites a lake file left by a crash (`rewrite`: whether it reached the
/// file's last offset) closes there and only there: closed earlier, it
/// would write a second file over part of the same records.
pub(crate) fn batch_closes(
    records: usize,
    max_records: usize,
    open_for: Option<Duration>,
    max_age: Duration,
    rewrite: Option<bool>,
) -> bool {
    match rewrite {
        Some(reached) => reached || open_for.is_some_and(|d| d >= REWRITE_PATIENCE),
        None => records >= max_records || open_for.is_some_and(|d| d >= max_age),
    }
}

/// What a commit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CommitRange {
    /// Where the batch starts: the stored offset (the fence), or the batch's
    /// first record when nothing is stored yet.
    pub(crate) start: i64,
    /// Where the partition resumes once it is committed.
    pub(crate) next: i64,
}

/// The range a commit covers, or `None` when there is nothing to commit.
/// `first`/`last` are the open batch's first and last offsets; `committed`
/// the stored offset; `checkpoint_at` the offset of the checkpoint the
/// worker started from; `next_expected` the next offset its engine has not
/// seen. Leaving (`final_commit`) with no open batch still commits an empty
/// range at the stored offset to hand the next owner a checkpoint, so it
/// need not re-read to rebuild state, but only when the engine has reached
/// that offset and there is not already a checkpoint there.
pub(crate) fn commit_range(
    first: Option<i64>,
    last: i64,
    committed: Option<i64>,
    final_commit: bool,
    checkpoint_at: Option<i64>,
    next_expected: Option<i64>,
) -> Option<CommitRange> {
    match (first, committed) {
        (Some(first), committed) => Some(CommitRange {
            start: committed.unwrap_or(first),
            next: last + 1,
        }),
        (None, Some(c))
            if final_commit
                && checkpoint_at != Some(c)
                && next_expected.is_some_and(|n| n >= c) =>
        {
            Some(CommitRange { start: c, next: c })
        }
        (None, _) => None,
    }
}

/// Where a commit's checkpoint of the engine, or its flush of the held
/// rollups, is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// In the batch's own transaction.
    InBatch,
    /// After the batch commits, in a transaction of its own beside the
    /// batches that follow, while the worker reads on.
    Behind,
}

/// Whether a commit checkpoints the engine, and where: in the batch's
/// transaction on the partition's first commit (so a restart never has to
/// re-read from offset 0) and on the last before it is released; behind the
/// batch every `interval`. While one is still being written behind
/// (`writing`), none: the last commit does not wait for it (the next owner
/// restores from whichever is stored), and a periodic one comes later.
pub(crate) fn checkpoint_place(
    final_commit: bool,
    first_commit: bool,
    writing: bool,
    since_last: Duration,
    interval: Duration,
) -> Option<Place> {
    if writing {
        None
    } else if final_commit || first_commit {
        Some(Place::InBatch)
    } else {
        (since_last >= interval).then_some(Place::Behind)
    }
}

/// Rollup rows a partition holds at most before a flush, whatever the
/// time since the last: a batch's worth (`batch_max_records`), and at
/// least this many. A flush's transaction is then no larger than a batch
/// written with its rollups, so a partition catching up on a backlog (full
/// batches) flushes every batch or so instead of stalling behind one large
/// flush, and holding pays where batches are small and accounts recur
/// across them.
pub(crate) const MIN_HELD_ROWS: usize = 1_000;

/// Whether a commit flushes the rollups held since the last flush, and
/// where. In the batch's transaction: the last commit and a partition's
/// first, one that carries its checkpoint in the batch (so a checkpoint is
/// never past the stored rollups), and every commit when `interval` is
/// zero; before such a commit the caller waits for rows being written
/// behind (two flushes from one stored offset would fence each other;
/// `writing` is not looked at here). Behind the
/// batch, unless a write behind is still going (`writing`; the rows are
/// then held longer): one that carries a checkpoint behind (written after
/// the flush, in the same order), one `interval` after the last flush,
/// and one holding a batch's worth of rows (`held` of
/// `batch_max_records`, see [`MIN_HELD_ROWS`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn flush_place(
    final_commit: bool,
    first_commit: bool,
    writing: bool,
    checkpoint: Option<Place>,
    since_last: Duration,
    interval: Duration,
    held: usize,
    batch_max_records: usize,
) -> Option<Place> {
    if final_commit || first_commit || checkpoint == Some(Place::InBatch) || interval.is_zero() {
        return Some(Place::InBatch);
    }
    let due = checkpoint == Some(Place::Behind)
        || since_last >= interval
        || held >= batch_max_records.max(MIN_HELD_ROWS);
    (due && !writing).then_some(Place::Behind)
}

/// A partition's phase, in `[0, 1)`: the share of an interval by which
/// its periodic writes (flushes, checkpoints) are set off from the other
/// partitions'. Partitions assigned together would otherwise write all at
/// once, every interval, and Postgres would take each burst from the
/// batches' commits (with six partitions at 50,000 records/s, six 16,000-row
/// flushes at once took about 2 s). Successive multiples of the golden
/// ratio's fraction spread any number of partitions nearly evenly; the
/// topic's name moves the start, so partition 0 of every topic does not
/// share one phase.
pub(crate) fn phase(topic: &str, partition: i32) -> f64 {
    // FNV-1a of the name, cut to 20 bits so the product stays exact.
    let h = topic.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let i = (h % (1 << 20)) as f64 + f64::from(partition.max(0));
    (i * 0.618_033_988_749_895).fract()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollups_are_flushed_with_checkpoints_first_and_last_commits_on_time_and_when_many() {
        use Place::*;
        let (soon, every) = (Duration::from_secs(1), Duration::from_secs(10));
        let f = |last, first, place, since, held| {
            flush_place(last, first, false, place, since, every, held, 20_000)
        };
        assert_eq!(f(false, false, None, soon, 10), None);
        // In the batch: the last and first commits, and with a checkpoint there.
        assert_eq!(f(true, false, None, soon, 10), Some(InBatch));
        assert_eq!(f(false, true, None, soon, 10), Some(InBatch));
        assert_eq!(f(false, false, Some(InBatch), soon, 10), Some(InBatch));
        // Behind: with a checkpoint behind, on time, and when many are held.
        assert_eq!(f(false, false, Some(Behind), soon, 10), Some(Behind));
        assert_eq!(f(false, false, None, every, 10), Some(Behind));
        assert_eq!(f(false, false, None, soon, 19_999), None);
        assert_eq!(f(false, false, None, soon, 20_000), Some(Behind));
        // Small batches still hold a thousand rows before they must flush.
        let small = |held| flush_place(false, false, false, None, soon, every, held, 200);
        assert_eq!(small(999), None);
        assert_eq!(small(1_000), Some(Behind));
        // A write behind still going: the rows are held longer, even when
        // a checkpoint is due (the checkpoint waits too: checkpoint_place).
        let writing = |since, held| flush_place(false, false, true, None, since, every, held, 200);
        assert_eq!(writing(every, 5_000), None);
        let due = flush_place(false, false, true, Some(Behind), soon, every, 10, 200);
        assert_eq!(due, None);
        // rollup_flush_secs = 0: every commit flushes, in its batch.
        let zero = flush_place(false, false, false, None, soon, Duration::ZERO, 0, 20_000);
        assert_eq!(zero, Some(InBatch));
    }

    #[test]
    fn partitions_write_at_phases_spread_over_the_interval() {
        for n in [2, 6, 12, 64] {
            let mut phases: Vec<f64> = (0..n).map(|p| phase("gw", p)).collect();
            assert!(phases.iter().all(|p| (0.0..1.0).contains(p)));
            phases.sort_by(f64::total_cmp);
            phases.push(1.0);
            let gap = phases.windows(2).map(|w| w[1] - w[0]).fold(1.0, f64::min);
            // No two closer than a third of an even spread.
            assert!(gap > 1.0 / (3.0 * n as f64), "{n} partitions: gap {gap}");
        }
        assert_eq!(phase("gw", -1), phase("gw", 0));
        assert_ne!(phase("gw", 0), phase("keywatch.by-subject", 0));
    }

    #[test]
    fn a_partition_resumes_at_its_checkpoint_else_rebuilds_or_starts_as_configured() {
        use StartFrom::{Earliest, Latest};
        // The checkpoint wins whatever start_from says.
        assert_eq!(
            resume_point(Some(40), Some(90), Latest),
            (Seek::At(40), Some(40))
        );
        assert_eq!(
            resume_point(Some(40), None, Latest),
            (Seek::At(40), Some(40))
        );
        // Committed but no readable checkpoint: rebuild from 0, even for latest.
        assert_eq!(resume_point(None, Some(90), Latest), (Seek::At(0), Some(0)));
        assert_eq!(
            resume_point(None, Some(90), Earliest),
            (Seek::At(0), Some(0))
        );
        // Never committed.
        assert_eq!(resume_point(None, None, Earliest), (Seek::At(0), Some(0)));
        assert_eq!(resume_point(None, None, Latest), (Seek::End, None));
    }

    #[test]
    fn a_batch_closes_when_full_old_or_at_a_file_boundary() {
        let age = Duration::from_millis(500);
        let young = Some(Duration::from_millis(100));
        assert!(!batch_closes(9, 10, young, age, None));
        assert!(batch_closes(10, 10, young, age, None));
        assert!(batch_closes(1, 10, Some(age), age, None));
        // No open batch: nothing ages.
        assert!(!batch_closes(0, 10, None, age, None));
        // Rewriting a crash's lake file: at its end, and not before, whatever
        // the count or age (a slow re-read must not write a second file).
        assert!(batch_closes(1, 10, young, age, Some(true)));
        assert!(!batch_closes(10, 10, Some(age), age, Some(false)));
        assert!(batch_closes(
            1,
            10,
            Some(REWRITE_PATIENCE),
            age,
            Some(false)
        ));
    }

    #[test]
    fn a_commit_covers_the_batch_from_the_fence() {
        // The stored offset is the fence, not the batch's first record
        // (records up to it only rebuilt state).
        assert_eq!(
            commit_range(Some(120), 150, Some(100), false, None, Some(151)),
            Some(CommitRange {
                start: 100,
                next: 151
            })
        );
        // First commit of a partition: from its first record.
        assert_eq!(
            commit_range(Some(0), 9, None, false, None, Some(10)),
            Some(CommitRange { start: 0, next: 10 })
        );
        // Nothing open and not leaving: nothing to commit.
        assert_eq!(
            commit_range(None, 0, Some(100), false, None, Some(100)),
            None
        );
        assert_eq!(commit_range(None, 0, None, true, None, Some(0)), None);
    }

    #[test]
    fn leaving_hands_over_a_checkpoint_only_when_it_helps_and_is_true() {
        // Caught up, and the checkpoint it started from is older: commit one.
        assert_eq!(
            commit_range(None, 0, Some(100), true, Some(60), Some(100)),
            Some(CommitRange {
                start: 100,
                next: 100
            })
        );
        // Already a checkpoint at the stored offset.
        assert_eq!(
            commit_range(None, 0, Some(100), true, Some(100), Some(100)),
            None
        );
        // Still rebuilding (the engine has not reached the stored offset):
        // a checkpoint there would be a lie.
        assert_eq!(
            commit_range(None, 0, Some(100), true, Some(60), Some(80)),
            None
        );
        assert_eq!(commit_range(None, 0, Some(100), true, None, None), None);
    }

    #[test]
    fn checkpoints_go_with_the_first_and_last_commit_and_every_interval() {
        let every = Duration::from_secs(300);
        let soon = Duration::from_secs(10);
        use Place::*;
        assert_eq!(checkpoint_place(false, false, false, soon, every), None);
        assert_eq!(
            checkpoint_place(false, false, false, every, every),
            Some(Behind)
        );
        assert_eq!(
            checkpoint_place(true, false, false, soon, every),
            Some(InBatch)
        );
        assert_eq!(
            checkpoint_place(false, true, false, soon, every),
            Some(InBatch)
        );
        // One still being written behind: none, not even on the last commit.
        assert_eq!(checkpoint_place(true, false, true, soon, every), None);
        assert_eq!(checkpoint_place(false, false, true, every, every), None);
    }
}
