//! A partition's committer: writes the batch its worker closed (dead
//! letters and projections acknowledged, the Parquet file, one Postgres
//! transaction) on a thread of its own while the worker reads and counts
//! the next batch; and, on a second thread, the rollups the worker held
//! across batches (with the checkpoint that goes with them), beside the
//! batches, so that no batch's alerts wait for them.
//!
//! At most one batch is in flight per partition: the worker waits for the
//! batch before to land before it hands over the next, so memory stays
//! bounded (two batches a partition) and a slow Postgres still slows the
//! read. A batch is written in the same order of steps as before, and
//! batches land in offset order, so the fence, the lake's file names and
//! exactly-once are unchanged: a batch that does not land (fenced, stalled,
//! or a stop while it kept failing) ends the worker, and whatever it read
//! after is re-read by the next owner.

use arrow_array::RecordBatch;

use super::*;

/// Projection frames: each with the stage-two partition it goes to.
pub(super) type Frames = Vec<(u32, Vec<u8>)>;

/// A closed batch, owned, on its way to Postgres.
pub(super) struct Closed {
    /// What the commit covers.
    pub(super) range: CommitRange,
    /// The batch's first and last offsets (its lake file's name), when it
    /// read a record.
    pub(super) offsets: Option<(i64, i64)>,
    pub(super) dead: Vec<DeadLetter>,
    /// The projection frames and how many projections they carry (None:
    /// the second stage is off).
    pub(super) frames: Option<(Frames, u64)>,
    /// The lake's rows (None: no lake, or no record counted).
    pub(super) lake: Option<RecordBatch>,
    /// Whether the batch flushes the rollups, and where: `rows` then hold
    /// everything since the last flush, written in the batch's transaction
    /// (`InBatch`) or, once it has landed, handed to the flusher
    /// (`Behind`); else they are empty and held by the worker.
    pub(super) flush: Option<Place>,
    /// Where the stored rollups end, as the worker knows it (a flush is
    /// fenced on it).
    pub(super) rollups_from: Option<i64>,
    pub(super) rows: HeldRows,
    pub(super) alerts: Vec<Alert>,
    /// A checkpoint written in the batch's own transaction.
    pub(super) checkpoint: Option<Checkpoint>,
    /// A checkpoint valid at the batch's end, to be stored behind it once
    /// it has committed.
    pub(super) behind: Option<Checkpoint>,
}

/// What a partition holds between flushes: stage one's rollups and budget
/// ledger rows, stage two's address traffic and source marks.
#[derive(Default)]
pub(super) struct HeldRows {
    pub(super) rollups: Rollups,
    pub(super) budgets: Vec<BudgetRow>,
    pub(super) addresses: Vec<AddressRow>,
    pub(super) sources: Vec<SourceRow>,
}

impl HeldRows {
    /// Whether there is nothing to write.
    pub(super) fn is_empty(&self) -> bool {
        self.rollups.rows().is_empty()
            && self.budgets.is_empty()
            && self.addresses.is_empty()
            && self.sources.is_empty()
    }
}

/// Rows held since the last flush, on their way to Postgres behind the
/// batches that counted them (all committed), and the checkpoint valid
/// where they end, written after them.
pub(super) struct Held {
    /// Where the stored rollups end now (the fence).
    pub(super) from: i64,
    /// Where they end once these are written: a committed batch's end.
    pub(super) to: i64,
    pub(super) rows: HeldRows,
    /// The engine's checkpoint at `to`, and the stored one it was taken
    /// against.
    pub(super) checkpoint: Option<(Checkpoint, Option<i64>)>,
}

/// What became of a checkpoint written behind.
pub(super) enum Stored {
    /// Written: its bytes and entries.
    Yes(u64, u64),
    /// Not written, because another one was stored meanwhile.
    Superseded,
    /// Not written: why.
    Failed(String),
    /// Not written, because the partition is being let go (its last
    /// commit stores one in its batch).
    Skipped,
}

/// What became of held rows.
pub(super) enum HeldLanding {
    /// Written (handed back for reuse), and their checkpoint's fate.
    Written(Box<Held>, Option<Stored>),
    /// Not written, and the partition reads no further (as
    /// [`Landing::Abandoned`]).
    Abandoned,
}

/// What became of a closed batch.
pub(super) enum Landing {
    /// Committed (the batch is handed back: its buffers are reused).
    Committed(Box<Closed>),
    /// Not committed, and the partition reads no further: fenced by a new
    /// owner, stalled on an error that a retry cannot mend, or asked to
    /// stop while a write kept failing.
    Abandoned,
}

/// Writes one partition's closed batches, in order.
pub(super) struct Committer<'s> {
    pub(super) shared: &'s Shared,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) stop: Arc<AtomicBool>,
}

impl Committer<'_> {
    fn part(&self) -> Part<'_> {
        Part {
            topic: &self.topic,
            partition: self.partition,
        }
    }

    /// Lands every batch the worker sends, answering each, until the
    /// worker hangs up.
    pub(super) fn serve(
        &self,
        batches: std::sync::mpsc::Receiver<Box<Closed>>,
        landings: std::sync::mpsc::Sender<Landing>,
    ) {
        for closed in batches {
            if landings.send(self.land(closed)).is_err() {
                return;
            }
        }
    }

    /// Writes every set of held rows the worker sends, answering each, until
    /// the worker hangs up.
    pub(super) fn serve_held(
        &self,
        held: std::sync::mpsc::Receiver<Box<Held>>,
        landings: std::sync::mpsc::Sender<HeldLanding>,
    ) {
        for h in held {
            if landings.send(self.write_held(h)).is_err() {
                return;
            }
        }
    }

    /// Writes held rows in their own transaction (retried as a batch is),
    /// then the checkpoint that goes with them, once; a checkpoint not
    /// stored only makes the next one full.
    fn write_held(&self, h: Box<Held>) -> HeldLanding {
        let flush = RollupFlush {
            topic: &self.topic,
            partition: self.partition,
            from: h.from,
            to: h.to,
            rollups: h.rows.rollups.rows(),
            budgets: &h.rows.budgets,
            addresses: &h.rows.addresses,
            sources: &h.rows.sources,
        };
        // A checkpoint alone (the rollups went with its batch) has no rows
        // to write: the stored rollups are already past it.
        let nothing = h.from == h.to && h.rows.is_empty();
        if !nothing {
            let write = || self.shared.store.flush_rollups(&flush);
            if !self.retried(h.from, h.to, write) {
                return HeldLanding::Abandoned;
            }
            self.shared
                .metrics
                .rollup_flushes
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some((cp, previous)) = &h.checkpoint else {
            return HeldLanding::Written(h, None);
        };
        if self.stop.load(Ordering::Acquire) {
            // A paced checkpoint would hold the last commit up.
            return HeldLanding::Written(h, Some(Stored::Skipped));
        }
        let w = CheckpointWrite {
            topic: &self.topic,
            partition: self.partition,
            at: h.to,
            previous: *previous,
            checkpoint: cp,
            bytes_per_sec: Some(self.shared.pipeline.checkpoint_write_mb_per_sec * 1_000_000),
        };
        let stored = match self
            .shared
            .rt
            .block_on(self.shared.store.store_checkpoint(&w))
        {
            Ok(true) => Stored::Yes(cp.bytes() as u64, cp.changed.len() as u64),
            Ok(false) => Stored::Superseded,
            Err(e) => Stored::Failed(e.detail()),
        };
        HeldLanding::Written(h, Some(stored))
    }

    /// Writes the batch: dead letters and projections (acknowledged), the
    /// Parquet file, then one Postgres transaction. Retries until it
    /// succeeds, the partition is fenced, or a stop is requested (then
    /// nothing is committed and the next owner re-reads the batch).
    pub(super) fn land(&self, mut c: Box<Closed>) -> Landing {
        let started = Instant::now();
        let written = self.send_dead_letters(&mut c.dead)
            && c.frames
                .as_ref()
                .is_none_or(|(frames, n)| self.send_projections(frames, *n))
            && match (&c.lake, c.offsets) {
                (Some(lake), Some((first, last))) => self.write_lake(lake, first, last),
                _ => true,
            }
            && self.commit(&c);
        if !written {
            return Landing::Abandoned;
        }
        let m = &self.shared.metrics;
        m.batches.fetch_add(1, Ordering::Relaxed);
        m.alerts.fetch_add(c.alerts.len() as u64, Ordering::Relaxed);
        m.last_commit_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        m.commit_seconds.observe(started.elapsed());
        if !c.alerts.is_empty() {
            let mut by_kind = m.alerts_by_kind.lock().expect("metrics lock");
            for a in &c.alerts {
                *by_kind.entry(a.kind.as_str()).or_default() += 1;
            }
        }
        if let Some(o) = m
            .offsets
            .lock()
            .expect("metrics lock")
            .get_mut(&(self.topic.clone(), self.partition))
        {
            o.committed = c.range.next;
        }
        Landing::Committed(c)
    }

    /// The batch's Postgres transaction; false when it was fenced, stalled,
    /// or a stop came while it kept failing.
    fn commit(&self, c: &Closed) -> bool {
        let in_batch = c.flush == Some(Place::InBatch);
        let empty = HeldRows::default();
        let rows = if in_batch { &c.rows } else { &empty };
        let batch = BatchCommit {
            topic: &self.topic,
            partition: self.partition,
            start_offset: c.range.start,
            next_offset: c.range.next,
            rollups: rows.rollups.rows(),
            flush: in_batch,
            rollups_from: c.rollups_from,
            alerts: &c.alerts,
            checkpoint: c.checkpoint.as_ref(),
            budgets: &rows.budgets,
            addresses: &rows.addresses,
            sources: &rows.sources,
        };
        let write = || self.shared.store.commit_batch(&batch);
        self.retried(c.range.start, c.range.next, write)
    }

    /// Runs a Postgres write from offset `ours` to `end` until it succeeds:
    /// false when it was fenced, stalled, or a stop came while it kept
    /// failing. Fenced with the stored offset at `end` is success: a retry
    /// after a commit whose reply was lost (a Postgres restart at the wrong
    /// moment) finds what it holds stored, once.
    fn retried<F>(&self, ours: i64, end: i64, write: impl Fn() -> F) -> bool
    where
        F: std::future::Future<Output = Result<(), StorageError>>,
    {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.shared.rt.block_on(write()) {
                Ok(()) => return true,
                Err(
                    StorageError::Fenced { stored, .. }
                    | StorageError::RollupsFenced { stored, .. },
                ) if stored == end => return true,
                Err(
                    StorageError::Fenced { stored, .. }
                    | StorageError::RollupsFenced { stored, .. },
                ) => {
                    self.part().fenced(&self.shared.metrics, stored, ours);
                    return false;
                }
                Err(e) if e.is_transient() => {
                    self.part().commit_retry(&e.detail());
                    if !self.backoff(&mut backoff) {
                        return false;
                    }
                }
                Err(e) => {
                    // Retrying the same write would fail the same way, and skipping
                    // it would lose data: the partition stops advancing, loudly.
                    self.part().stalled(&self.shared.metrics, ours, &e.detail());
                    return false;
                }
            }
        }
    }

    /// Writes the batch's Parquet file; false when a stop came while it
    /// kept failing.
    fn write_lake(&self, lake: &RecordBatch, first: i64, last: i64) -> bool {
        let Some(dir) = &self.shared.pipeline.parquet_dir else {
            return true;
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match storage::parquet::write_batch(
                dir,
                &self.topic,
                self.partition,
                first,
                last,
                lake,
                0,
            ) {
                Ok(_) => return true,
                Err(e) => {
                    self.part().parquet_retry(&e.detail());
                    if !self.backoff(&mut backoff) {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps before a retry; false when a stop was requested instead.
    fn backoff(&self, backoff: &mut Duration) -> bool {
        self.shared.metrics.retries.fetch_add(1, Ordering::Relaxed);
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        true
    }

    /// Writes the batch's projection frames (`entries` projections) to the
    /// second stage's topic and waits for every acknowledgement (as dead
    /// letters): the batch commits only once the second stage can see what
    /// it counted.
    fn send_projections(&self, frames: &[(u32, Vec<u8>)], entries: u64) -> bool {
        let mut backoff = Duration::from_millis(50);
        while !self.shared.send_frames(frames) {
            self.part().projections_unacked(frames.len());
            if !self.backoff(&mut backoff) {
                return false;
            }
        }
        self.shared
            .metrics
            .projections
            .fetch_add(entries, Ordering::Relaxed);
        true
    }

    /// Produces the batch's dead letters and waits for every acknowledgement.
    fn send_dead_letters(&self, dead: &mut Vec<DeadLetter>) -> bool {
        let mut backoff = Duration::from_millis(50);
        while !dead.is_empty() {
            let partition = self.partition.to_string();
            let mut pending = Vec::with_capacity(dead.len());
            for d in dead.iter() {
                let offset = d.offset.to_string();
                let element = d.element.map(|e| e.to_string());
                let mut headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "keywatch.origin.topic",
                        value: Some(self.topic.as_bytes()),
                    })
                    .insert(Header {
                        key: "keywatch.origin.partition",
                        value: Some(partition.as_bytes()),
                    })
                    .insert(Header {
                        key: "keywatch.origin.offset",
                        value: Some(offset.as_bytes()),
                    })
                    .insert(Header {
                        key: "keywatch.error",
                        value: Some(d.error.as_bytes()),
                    });
                if let Some(e) = &element {
                    headers = headers.insert(Header {
                        key: "keywatch.origin.element",
                        value: Some(e.as_bytes()),
                    });
                }
                let mut rec = FutureRecord::to(&self.shared.kafka.dead_letter_topic)
                    .payload(&d.payload)
                    .headers(headers);
                if let Some(k) = &d.key {
                    rec = rec.key(k);
                }
                pending.push(self.shared.producer.send_result(rec).map_err(|(e, _)| e));
            }
            let mut failed = 0;
            for p in pending {
                let ok = match p {
                    Ok(fut) => matches!(self.shared.rt.block_on(fut), Ok(Ok(_))),
                    Err(_) => false,
                };
                failed += usize::from(!ok);
            }
            if failed == 0 {
                self.shared
                    .metrics
                    .dead_lettered
                    .fetch_add(dead.len() as u64, Ordering::Relaxed);
                dead.clear();
                return true;
            }
            self.part().dead_letters_unacked(failed, dead.len());
            // Retry the whole set: a dead letter written twice is harmless, one lost is not.
            if !self.backoff(&mut backoff) {
                return false;
            }
        }
        true
    }
}
