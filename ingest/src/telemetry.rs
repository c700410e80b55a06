//! The pipeline's telemetry in one place: its counters ([`PipelineMetrics`]),
//! the name and help of every metric they are exposed as
//! ([`PipelineMetrics::samples`], the only place those names are written),
//! and the events a partition worker or the consumer reports (`Part`'s
//! methods and the free functions below), each of which logs through
//! `tracing` and bumps its counter together, so a log line and its metric
//! cannot drift apart (as Vector's `internal_events` do).
//!
//! Log fields are structured (`topic`, `partition`, `offset`, `error`); the
//! binary chooses text or JSON output and the level filter (`RUST_LOG`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{debug, error, info, warn};

/// Counters of a running pipeline (one place, so a metric and a log line agree).
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    /// Which stage these are: `gateway` (stage one; also the default) or
    /// `subjects` (stage two, whose samples carry a `stage` label).
    pub stage: &'static str,
    /// Projections written for the second stage (one per subject partition a record reaches).
    pub projections: AtomicU64,
    /// Records read from Kafka (including those re-read after a restart).
    pub records: AtomicU64,
    /// Records re-read up to the committed offset to rebuild state (no writes).
    pub caught_up: AtomicU64,
    /// Records decoded and observed.
    pub decoded: AtomicU64,
    /// Records dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Records decoded, by the format they were read as (in
    /// [`detectors::decode::Format::CONCRETE`] order).
    pub by_format: [AtomicU64; 5],
    /// Records that were elements of a message's JSON array.
    pub array_records: AtomicU64,
    /// Records counted with a descriptive field cut or dropped.
    pub repaired: AtomicU64,
    /// Records whose time was past their message's timestamp by more than
    /// `engine.event_time.max_ahead_secs` (counted at that bound).
    pub ahead: AtomicU64,
    /// Alerts committed (before de-duplication by id).
    pub alerts: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Rollup flushes written behind the batches.
    pub rollup_flushes: AtomicU64,
    /// Bytes of engine checkpoints committed (core and entries written).
    pub checkpoint_bytes: AtomicU64,
    /// Checkpoint entries (accounts and keys) written.
    pub checkpoint_entries: AtomicU64,
    /// Commits refused because another consumer owns the partition now.
    pub fenced: AtomicU64,
    /// Commit or dead-letter attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Partitions stopped by a commit that cannot succeed (a bug or a data error).
    pub stalled: AtomicU64,
    /// Records that arrived on the consumer's main queue instead of their partition's (should stay 0).
    pub unexpected: AtomicU64,
    /// Offset gaps a partition's worker saw (compaction or transactions; else a bug).
    pub gaps: AtomicU64,
    /// Partitions being worked right now.
    pub partitions: AtomicU64,
    /// Milliseconds the last batch commit took.
    pub last_commit_ms: AtomicU64,
    /// Batch commit durations (dead letters, Parquet and the Postgres transaction).
    pub commit_seconds: Histogram,
    /// Alerts committed, by kind (before de-duplication by id).
    pub alerts_by_kind: Mutex<BTreeMap<&'static str, u64>>,
    /// Per partition: the broker's high watermark (from librdkafka's
    /// statistics, every 5 s) and the offset committed to Postgres.
    pub offsets: Mutex<BTreeMap<(String, i32), PartitionOffsets>>,
}

/// Where a partition stands, for the consumer-lag metric.
#[derive(Clone, Copy, Debug, Default)]
pub struct PartitionOffsets {
    /// The broker's high watermark (next offset to be written); -1: not known yet.
    pub high_watermark: i64,
    /// The next offset keywatch has yet to commit; -1: nothing committed this run.
    pub committed: i64,
}

impl PartitionOffsets {
    /// Records not yet committed, when both ends are known.
    pub fn lag(&self) -> Option<i64> {
        (self.high_watermark >= 0 && self.committed >= 0)
            .then(|| (self.high_watermark - self.committed).max(0))
    }
}

/// A fixed-bucket latency histogram (seconds), lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; Histogram::BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Upper bounds of the buckets, in seconds.
    pub const BOUNDS: [f64; 12] = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in Self::BOUNDS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative `(upper bound, count)` pairs, the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let buckets = Self::BOUNDS
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        (
            buckets,
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
        )
    }
}

/// What kind of metric a [`Sample`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (its name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One exposed value: its metric's name and help, labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: &'static str,
    /// What it counts, for `# HELP`.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label pairs.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// The batch-commit histogram's name and help.
pub const COMMIT_SECONDS: (&str, &str) = (
    "keywatch_batch_commit_seconds",
    "Time to commit a batch: dead letters, Parquet and the Postgres transaction.",
);

impl PipelineMetrics {
    /// The formats records were read as so far, with their counts
    /// (`kong 1200, litellm 30`; `none` before any record decoded).
    pub fn formats_seen(&self) -> String {
        let seen: Vec<String> = detectors::decode::Format::CONCRETE
            .iter()
            .zip(&self.by_format)
            .map(|(f, n)| (f, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .map(|(f, n)| format!("{} {n}", f.as_str()))
            .collect();
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    }

    /// Every counter and gauge, named (the histogram is
    /// [`PipelineMetrics::commit_seconds`], exposed as [`COMMIT_SECONDS`]).
    pub fn samples(&self) -> Vec<Sample> {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let one = |name, help, kind, value| Sample {
            name,
            help,
            kind,
            labels: Vec::new(),
            value,
        };
        let mut out = vec![
            one("keywatch_events_total", "Gateway records read from Kafka (including re-reads after a restart).", Kind::Counter, c(&self.records)),
            one("keywatch_events_decoded_total", "Records decoded and run through the detectors.", Kind::Counter, c(&self.decoded)),
            one("keywatch_events_repaired_total", "Records counted with a descriptive field cut or dropped, or a time clamped (the lake's `repaired` column names which).", Kind::Counter, c(&self.repaired)),
            one("keywatch_events_ahead_total", "Records whose time was past their Kafka message's timestamp by more than engine.event_time.max_ahead_secs (counted at that bound).", Kind::Counter, c(&self.ahead)),
            one("keywatch_decode_errors_total", "Records that could not be decoded (dead-lettered).", Kind::Counter, c(&self.dead_lettered)),
            one("keywatch_array_records_total", "Records read as elements of a message holding a JSON array (each decoded, counted and dead-lettered on its own).", Kind::Counter, c(&self.array_records)),
        ];
        for (f, n) in detectors::decode::Format::CONCRETE
            .iter()
            .zip(&self.by_format)
        {
            out.push(Sample {
                labels: vec![("format", f.as_str().to_owned())],
                ..one("keywatch_records_by_format_total", "Records decoded, by the log format they were read as (with format = \"auto\", the formats it saw).", Kind::Counter, c(n))
            });
        }
        for (kind, n) in self.alerts_by_kind.lock().expect("metrics lock").iter() {
            out.push(Sample {
                labels: vec![("kind", (*kind).to_owned())],
                ..one("keywatch_alerts_total", "Alerts committed, by kind (a replayed batch counts again; the alerts table has each once).", Kind::Counter, *n as f64)
            });
        }
        out.extend([
            one("keywatch_batches_total", "Batches committed.", Kind::Counter, c(&self.batches)),
            one("keywatch_rollup_flushes_total", "Held rollups written in a transaction of their own, beside the batches (those written with a partition's first and last batch are not counted).", Kind::Counter, c(&self.rollup_flushes)),
            one("keywatch_commit_retries_total", "Commit or dead-letter attempts that failed and were retried.", Kind::Counter, c(&self.retries)),
            one("keywatch_partitions_stalled_total", "Partitions stopped by a commit the database refused for its content (logged; an operator acts).", Kind::Counter, c(&self.stalled)),
            one("keywatch_offset_gaps_total", "Offset gaps a partition's worker saw (compaction or transaction markers; otherwise a bug).", Kind::Counter, c(&self.gaps)),
            one("keywatch_records_rebuilt_total", "Records re-read up to the committed offset to rebuild state after an assignment (nothing written).", Kind::Counter, c(&self.caught_up)),
            one("keywatch_records_misrouted_total", "Records that arrived on the consumer's main queue instead of their partition's (should stay 0).", Kind::Counter, c(&self.unexpected)),
            one("keywatch_fenced_total", "Commits refused because another consumer owns the partition now.", Kind::Counter, c(&self.fenced)),
            one("keywatch_partitions", "Partitions this instance is working.", Kind::Gauge, c(&self.partitions)),
            one("keywatch_checkpoint_bytes_total", "Bytes of engine checkpoints committed (a checkpoint writes the accounts and keys that changed since the last).", Kind::Counter, c(&self.checkpoint_bytes)),
            one("keywatch_checkpoint_entries_total", "Accounts and keys written by engine checkpoints.", Kind::Counter, c(&self.checkpoint_entries)),
        ]);
        if self.stage != "subjects" {
            out.push(one("keywatch_projections_total", "Projections written to the second stage's topic (a record reaches up to four subjects; one copy per stage-two partition).", Kind::Counter, c(&self.projections)));
        }
        for ((topic, partition), o) in self.offsets.lock().expect("metrics lock").iter() {
            if let Some(lag) = o.lag() {
                out.push(Sample {
                    labels: vec![
                        ("topic", topic.clone()),
                        ("partition", partition.to_string()),
                    ],
                    ..one(
                        "keywatch_consumer_lag",
                        "Records on the broker not yet committed to Postgres, per partition.",
                        Kind::Gauge,
                        lag as f64,
                    )
                });
            }
        }
        if self.stage == "subjects" {
            for s in &mut out {
                s.labels.push(("stage", "subjects".to_owned()));
            }
        }
        out
    }
}

/// A partition, as events name it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
}

impl Part<'_> {
    /// Offsets `from..to` never arrived (compaction, transaction markers, or a bug).
    pub(crate) fn offset_gap(self, m: &PipelineMetrics, from: i64, to: i64) {
        m.gaps.fetch_add(1, Ordering::Relaxed);
        warn!(
            topic = self.topic,
            partition = self.partition,
            from,
            to,
            "offsets were not delivered"
        );
    }

    /// The stored checkpoint does not decode: the state is rebuilt from offset 0.
    pub(crate) fn checkpoint_unreadable(self, at: i64, error: &dyn std::fmt::Display) {
        warn!(topic = self.topic, partition = self.partition, checkpoint_offset = at, %error, "checkpoint unreadable; rebuilding from offset 0");
    }

    /// Loading the partition's offset and checkpoint failed; it is retried.
    pub(crate) fn load_retry(self, m: &PipelineMetrics, error: &str) {
        m.retries.fetch_add(1, Ordering::Relaxed);
        warn!(
            topic = self.topic,
            partition = self.partition,
            error,
            "loading offset and checkpoint failed; retrying"
        );
    }

    /// No queue could be split off for an assigned partition.
    pub(crate) fn no_queue(self) {
        error!(
            topic = self.topic,
            partition = self.partition,
            "no partition queue; the partition is not worked"
        );
    }

    /// The broker reported an error reading this partition.
    pub(crate) fn consume_error(self, error: &dyn std::fmt::Display) {
        warn!(topic = self.topic, partition = self.partition, %error, "consume error");
    }

    /// Looking for a lake file to rewrite after a restart failed (a new file is written).
    pub(crate) fn lake_lookup_failed(self, error: &str) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            error,
            "looking for a lake file to rewrite failed"
        );
    }

    /// Seeking back to re-read an uncommitted batch failed.
    pub(crate) fn seek_failed(self, offset: i64, error: &dyn std::fmt::Display) {
        error!(topic = self.topic, partition = self.partition, offset, %error, "seeking back failed");
    }

    /// Writing the batch's Parquet file failed; it is retried (the wait
    /// counts the retry).
    pub(crate) fn parquet_retry(self, error: &str) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            error,
            "writing Parquet failed; retrying"
        );
    }

    /// Another consumer committed this partition: this one stops.
    pub(crate) fn fenced(self, m: &PipelineMetrics, stored: i64, ours: i64) {
        m.fenced.fetch_add(1, Ordering::Relaxed);
        info!(
            topic = self.topic,
            partition = self.partition,
            stored,
            ours,
            "another consumer owns this partition now; stopping"
        );
    }

    /// A batch commit failed for a reason worth waiting out; it is retried
    /// (the wait counts the retry).
    pub(crate) fn commit_retry(self, error: &str) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            error,
            "commit failed; retrying"
        );
    }

    /// The database refused the batch for its content: the partition stops
    /// at `offset` until an operator acts.
    pub(crate) fn stalled(self, m: &PipelineMetrics, offset: i64, error: &str) {
        m.stalled.fetch_add(1, Ordering::Relaxed);
        error!(
            topic = self.topic,
            partition = self.partition,
            offset,
            error,
            "commit refused; this partition stops here until an operator acts"
        );
    }

    /// Some dead letters were not acknowledged: the partition waits and
    /// retries them all (the wait counts the retry).
    pub(crate) fn dead_letters_unacked(self, failed: usize, total: usize) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            failed,
            total,
            "dead letters not acknowledged; the partition waits"
        );
    }

    /// A checkpoint of the engine was taken at `at` (on the worker's
    /// thread, which reads nothing meanwhile): how long that took and what
    /// it holds.
    pub(crate) fn checkpoint_taken(self, at: i64, took: Duration, entries: usize, bytes: usize) {
        debug!(
            topic = self.topic,
            partition = self.partition,
            checkpoint_offset = at,
            took_ms = took.as_millis() as u64,
            entries,
            bytes,
            "checkpoint taken"
        );
    }

    /// A checkpoint stored behind the batches found another one stored
    /// meanwhile (a new owner's): it is dropped and the next is full.
    pub(crate) fn checkpoint_superseded(self, at: i64) {
        info!(
            topic = self.topic,
            partition = self.partition,
            checkpoint_offset = at,
            "checkpoint not stored: another one was stored meanwhile; the next is full"
        );
    }

    /// Storing a checkpoint behind the batches failed: the next is full
    /// (the batches themselves are committed; a restart re-reads more).
    pub(crate) fn checkpoint_failed(self, at: i64, error: &str) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            checkpoint_offset = at,
            error,
            "checkpoint not stored; the next is full"
        );
    }

    /// Some projection frames were not acknowledged by the second stage's
    /// topic: the batch waits and sends them all again (the wait counts the
    /// retry).
    pub(crate) fn projections_unacked(self, frames: usize) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            frames,
            "projection frames not acknowledged; the partition waits"
        );
    }
}

/// A record reached the consumer's main queue instead of its partition's (a bug).
pub(crate) fn misrouted(m: &PipelineMetrics, topic: &str, partition: i32, offset: i64) {
    m.unexpected.fetch_add(1, Ordering::Relaxed);
    error!(
        topic,
        partition, offset, "BUG: a record reached the main queue and was not processed"
    );
}

/// The consumer reported an error outside any partition.
pub(crate) fn consumer_error(error: &dyn std::fmt::Display) {
    warn!(%error, "consumer error");
}

/// A rebalance step failed (`what`: assigning, unassigning, or the
/// rebalance itself); every worker is stopped.
pub(crate) fn rebalance_failed(what: &'static str, error: &dyn std::fmt::Debug) {
    error!(step = what, error = ?error, "rebalance failed");
}

/// Partitions given to this instance, or taken from it, by a rebalance.
pub(crate) fn rebalanced(stage: &str, what: &'static str, parts: &[(String, i32)]) {
    let list: Vec<String> = parts.iter().map(|(t, p)| format!("{t}/{p}")).collect();
    info!(stage, partitions = %list.join(","), "{what}");
}

/// A worker did not finish its batch in time at shutdown or revocation;
/// the next owner re-reads that batch.
pub(crate) fn worker_not_drained(within: Duration) {
    warn!(within = ?within, "a partition worker did not finish; its batch will be re-read by the next owner");
}
