//! One partition's worker: reads its partition queue, runs each record
//! through its stage's engine, holds one batch, and hands it, closed, to
//! its committer ([`super::committer`]: dead letters and projections
//! acknowledged, the Parquet file, one Postgres transaction), reading on
//! while it is written; the next batch waits for that one to land. The
//! rollups it counts are held across batches and, every few seconds,
//! handed to its flusher, which writes them (and then the checkpoint that
//! goes with them) beside the batches; one such write at a time.
//!
//! The bookkeeping (where the partition resumes, what a batch covers, the
//! fence, retries) is the same for both stages; what a record *is* differs
//! ([`Work`]): a gateway record for stage one, a frame of projections for
//! stage two.

use super::*;

/// One dead-letter record waiting for its acknowledgement.
pub(super) struct DeadLetter {
    pub(super) payload: Vec<u8>,
    pub(super) key: Option<Vec<u8>>,
    pub(super) offset: i64,
    /// Its index in its message's JSON array.
    pub(super) element: Option<u32>,
    pub(super) error: String,
}

/// Stage one's work on a partition of gateway records.
pub(super) struct GatewayWork {
    engine: Engine,
    decoder: Decoder,
    /// The format of this topic's records.
    format: Format,
    rollups: Rollups,
    /// The rollups of the batch last landed, emptied, for the next batch.
    spare_rollups: Option<Rollups>,
    lake: LakeRows,
    /// Whether there is a lake (`pipeline.parquet_dir`).
    lake_on: bool,
    /// The batch's projections for the second stage (None: it is off).
    frames: Option<FrameWriter>,
    /// How many partitions this topic has (for the frames' header).
    topic_partitions: u32,
    /// When frames were last written, and whether the last said "idle".
    last_frame: Instant,
    idle_sent: bool,
}

/// Stage two's work on a partition of the internal topic.
pub(super) struct SubjectWork {
    engine: SubjectEngine,
    rollups: AddressRollups,
}

/// What a partition's records are and what is done with them.
pub(super) enum Work {
    /// Gateway records (stage one).
    Gateway(Box<GatewayWork>),
    /// Projection frames (stage two).
    Subjects(Box<SubjectWork>),
}

/// Where a partition resumes, its checkpoint decoded (`Shared::load_start`).
pub(super) struct Start {
    /// The first offset not yet committed (None: never committed).
    pub(super) next_offset: Option<i64>,
    /// The first offset whose rollups are not stored (None: never committed).
    pub(super) rollups_offset: Option<i64>,
    /// The checkpoint's offset and state (None: none stored, or it did not
    /// decode).
    pub(super) checkpoint: Option<(i64, Restored)>,
}

/// A decoded checkpoint, of the stage that wrote it.
pub(super) enum Restored {
    /// A stage-one engine's state and the minute its entries were written
    /// at (None: its accounts were inside its core).
    Gateway(Box<EngineState>, Option<u32>),
    /// A stage-two engine's state.
    Subjects(Box<SubjectState>),
}

/// The worker's lines to its committer and its flusher.
struct Link {
    batches: std::sync::mpsc::SyncSender<Box<Closed>>,
    landings: std::sync::mpsc::Receiver<Landing>,
    /// A batch was handed over and has not landed yet.
    in_flight: bool,
    held: std::sync::mpsc::SyncSender<Box<Held>>,
    held_landings: std::sync::mpsc::Receiver<HeldLanding>,
    /// Held rows (or a checkpoint alone) were handed to the flusher and
    /// are not written yet.
    writing: bool,
    /// What is being written holds rows (not only a checkpoint).
    writing_rows: bool,
}

/// The state of one partition's worker.
pub(super) struct PartitionWorker<'s> {
    shared: &'s Shared,
    pub(super) topic: String,
    pub(super) partition: i32,
    stop: Arc<AtomicBool>,
    work: Work,
    /// The offset stored in Postgres: re-read records below it change no data.
    committed: Option<i64>,
    /// How far the stored rollups go: re-read records from here on are
    /// added to the rollups held for the next flush.
    rollups_at: Option<i64>,
    /// When the rollups were last flushed (handed over with a batch).
    last_flush: Instant,
    /// When the queue last gave a record (or an error).
    last_read: Instant,
    /// Next offset expected (lower ones are re-deliveries).
    next_expected: Option<i64>,
    last_checkpoint: Instant,
    // The open batch.
    first: Option<i64>,
    last: i64,
    /// Records counted in the open batch.
    counted: usize,
    forced_end: Option<i64>,
    opened: Instant,
    alerts: Vec<Alert>,
    scratch: Vec<Alert>,
    dead: Vec<DeadLetter>,
    /// The partition reads no further: a batch was fenced, stalled, or
    /// left unwritten at a stop.
    fenced: bool,
    /// The committer, while [`PartitionWorker::run`] runs.
    link: Option<Link>,
    /// The first batch after assignment has been opened.
    resumed: bool,
    /// The first record after assignment was the one asked for.
    resume_verified: bool,
    /// Seeks back made to get it.
    rewinds: u32,
    /// Offset of the last checkpoint this worker wrote.
    checkpoint_at: Option<i64>,
}

impl<'s> PartitionWorker<'s> {
    /// This worker's partition, as events name it.
    fn part(&self) -> Part<'_> {
        Part {
            topic: &self.topic,
            partition: self.partition,
        }
    }

    pub(super) fn new(
        shared: &'s Shared,
        topic: String,
        partition: i32,
        start: Start,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let checkpoint_at = start.checkpoint.as_ref().map(|c| c.0);
        // Expecting the first offset makes records a broker no longer has
        // show up as a gap.
        let (_, next_expected) =
            decide::resume_point(checkpoint_at, start.next_offset, shared.kafka.start_from);
        let work = match shared.stage {
            Stage::Gateway => {
                let (state, since) = match start.checkpoint {
                    Some((_, Restored::Gateway(st, since))) => (*st, since),
                    _ => (EngineState::default(), None),
                };
                let mut engine =
                    Engine::restore(&shared.engine, state).expect("engine config was validated");
                engine.track_changes(since);
                let frames = shared
                    .subjects_out
                    .as_ref()
                    .map(|o| FrameWriter::new(o.partitions));
                let work = GatewayWork {
                    engine,
                    decoder: shared.decoder.clone(),
                    format: shared.kafka.format_of(&topic),
                    rollups: Rollups::default(),
                    spare_rollups: None,
                    lake: LakeRows::default(),
                    lake_on: shared.pipeline.parquet_dir.is_some(),
                    frames,
                    topic_partitions: shared.partitions_of(&topic).max(partition as u32 + 1),
                    last_frame: Instant::now(),
                    idle_sent: false,
                };
                Work::Gateway(Box::new(work))
            }
            Stage::Subjects => {
                let state = match start.checkpoint {
                    Some((_, Restored::Subjects(st))) => *st,
                    _ => SubjectState::default(),
                };
                let engine = SubjectEngine::restore(&shared.engine, state)
                    .expect("engine config was validated");
                let work = SubjectWork {
                    engine,
                    rollups: AddressRollups::default(),
                };
                Work::Subjects(Box::new(work))
            }
        };
        // Periodic flushes and checkpoints start at this partition's phase.
        let last_flush = staggered(&topic, partition, shared.pipeline.rollup_flush_secs);
        let last_checkpoint =
            staggered(&topic, partition, shared.pipeline.checkpoint_interval_secs);
        PartitionWorker {
            shared,
            work,
            topic,
            partition,
            stop,
            committed: start.next_offset,
            rollups_at: start.rollups_offset,
            last_flush,
            last_read: Instant::now(),
            next_expected,
            last_checkpoint,
            first: None,
            last: 0,
            counted: 0,
            forced_end: None,
            opened: Instant::now(),
            alerts: Vec::new(),
            scratch: Vec::new(),
            dead: Vec::new(),
            fenced: false,
            link: None,
            resumed: false,
            resume_verified: false,
            rewinds: 0,
            checkpoint_at,
        }
    }

    /// Reads the partition until it is stopped or fenced, its batches
    /// written by a committer thread of its own.
    pub(super) fn run(
        &mut self,
        queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>,
    ) {
        // One batch waits in the channel at most, and the worker sends one
        // only after the one before landed.
        let (batches, inbox) = std::sync::mpsc::sync_channel(1);
        let (outbox, landings) = std::sync::mpsc::channel();
        let (held, held_inbox) = std::sync::mpsc::sync_channel(1);
        let (held_outbox, held_landings) = std::sync::mpsc::channel();
        let committer = || Committer {
            shared: self.shared,
            topic: self.topic.clone(),
            partition: self.partition,
            stop: Arc::clone(&self.stop),
        };
        let (committer, flusher) = (committer(), committer());
        let read = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(format!("kw-{}-{}-c", self.topic, self.partition))
                .spawn_scoped(s, move || committer.serve(inbox, outbox))
                .expect("spawning a partition's committer");
            std::thread::Builder::new()
                .name(format!("kw-{}-{}-f", self.topic, self.partition))
                .spawn_scoped(s, move || flusher.serve_held(held_inbox, held_outbox))
                .expect("spawning a partition's flusher");
            self.link = Some(Link {
                batches,
                landings,
                in_flight: false,
                held,
                held_landings,
                writing: false,
                writing_rows: false,
            });
            // A panic on the read path must still hang up: the scope waits
            // for the committer, whose loop ends only when the worker does.
            let read =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.consume(queue)));
            // Hanging up ends the committer's and the flusher's loops
            // (nothing is in flight after a normal return; after a panic,
            // what is lands or not).
            self.link = None;
            read
        });
        if let Err(panic) = read {
            std::panic::resume_unwind(panic);
        }
    }

    /// The read loop: records into batches, batches to the committer.
    fn consume(
        &mut self,
        queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>,
    ) {
        let max_wait = Duration::from_millis(self.shared.pipeline.batch_max_ms.min(100));
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.commit(true);
                return;
            }
            let polled = queue.poll(max_wait);
            if polled.is_some() {
                self.last_read = Instant::now();
            }
            match polled {
                Some(Ok(m)) => {
                    // The record's time is held to the message's (see EventTimeConfig).
                    let reference = m
                        .timestamp()
                        .to_millis()
                        .filter(|&t| t > 0)
                        .unwrap_or_else(detectors::time::wall_clock_ms);
                    self.handle(m.offset(), m.payload(), m.key(), reference)
                }
                Some(Err(e)) => self.part().consume_error(&e),
                None => {}
            }
            self.settle(false);
            self.settle_held(false);
            if self.fenced {
                return;
            }
            if decide::batch_closes(
                self.counted + self.dead.len(),
                self.shared.pipeline.batch_max_records,
                self.first.map(|_| self.opened.elapsed()),
                Duration::from_millis(self.shared.pipeline.batch_max_ms),
                self.rewrite(),
            ) {
                self.commit(false);
                if self.fenced {
                    return;
                }
            } else if self.first.is_none() && !self.in_flight() {
                if self.last_read.elapsed() >= QUIET && self.holds_rollups() && !self.writing() {
                    // Nothing to read for a while: what is held is written
                    // now, so a quiet partition's rollups are not left behind.
                    self.flush_quiet();
                    if self.fenced {
                        return;
                    }
                } else {
                    self.heartbeat();
                }
            }
        }
    }

    fn handle(
        &mut self,
        offset: i64,
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        reference_ms: i64,
    ) {
        if let Some(n) = self.next_expected {
            if offset < n {
                return; // a re-delivery after a seek
            }
            if offset > n && !self.resume_verified && self.rewind(n) {
                return;
            }
            self.resume_verified = true;
            if offset > n {
                // Compaction and transaction markers leave gaps; so would a bug.
                self.part().offset_gap(&self.shared.metrics, n, offset);
            }
        }
        self.next_expected = Some(offset + 1);
        self.shared.metrics.records.fetch_add(1, Ordering::Relaxed);
        let payload = payload.unwrap_or(&[]);
        if self.committed.is_some_and(|c| offset < c) {
            // Re-reading to rebuild state: the effects of these records are committed.
            self.shared
                .metrics
                .caught_up
                .fetch_add(1, Ordering::Relaxed);
            if payload.len() <= self.max_record() {
                let origin = (self.topic.as_str(), self.partition);
                // Past the stored rollups, its rollups are rebuilt too.
                let unflushed = self.rollups_at.is_some_and(|r| offset >= r);
                match &mut self.work {
                    Work::Gateway(g) => g.rebuild(
                        origin,
                        offset,
                        payload,
                        reference_ms,
                        unflushed,
                        &mut self.scratch,
                    ),
                    Work::Subjects(s) => {
                        let rollups = unflushed.then_some(&mut s.rollups);
                        let _ = s.engine.observe_frame(payload, &mut self.scratch, rollups);
                    }
                }
                self.scratch.clear();
            }
            return;
        }
        if self.first.is_none() {
            self.first = Some(offset);
            self.opened = Instant::now();
            // A crash after the Parquet file of a batch but before its commit:
            // end this batch where that file ends, so it is rewritten, not doubled.
            // Only the first batch after an assignment can meet such a file.
            self.forced_end = match &self.shared.pipeline.parquet_dir {
                Some(dir) if !self.resumed && self.shared.stage == Stage::Gateway => {
                    self.resumed = true;
                    storage::parquet::existing_batch_end(dir, &self.topic, self.partition, offset)
                        .unwrap_or_else(|e| {
                            self.part().lake_lookup_failed(&e.detail());
                            None
                        })
                }
                _ => None,
            };
        }
        self.last = offset;
        if payload.len() > self.max_record() {
            let error = format!(
                "record: {} bytes, more than pipeline.max_record_bytes ({}); the first {OVERSIZE_KEPT} kept",
                payload.len(),
                self.shared.pipeline.max_record_bytes
            );
            self.dead_letter(
                &payload[..OVERSIZE_KEPT.min(payload.len())],
                key,
                offset,
                None,
                error,
            );
            return;
        }
        let origin = (self.topic.as_str(), self.partition);
        let mut failed = Vec::new();
        match &mut self.work {
            Work::Gateway(g) => {
                self.counted += g.count_message(
                    &self.shared.metrics,
                    origin,
                    offset,
                    payload,
                    reference_ms,
                    &mut self.alerts,
                    &mut failed,
                );
            }
            Work::Subjects(s) => {
                self.shared.metrics.decoded.fetch_add(1, Ordering::Relaxed);
                if let Err(e) =
                    s.engine
                        .observe_frame(payload, &mut self.alerts, Some(&mut s.rollups))
                {
                    failed.push((payload, None, format!("projection frame: {e}")));
                }
                self.counted += 1;
            }
        }
        for (bytes, element, error) in failed {
            self.dead_letter(bytes, key, offset, element, error);
        }
    }

    /// Whether the open batch rewrites a lake file left by a crash, and if
    /// so whether it has reached that file's last offset.
    fn rewrite(&self) -> Option<bool> {
        self.forced_end
            .filter(|_| self.first.is_some())
            .map(|end| self.last >= end)
    }

    /// The largest record taken: `pipeline.max_record_bytes` for gateway
    /// records; the second stage's frames are keywatch's own, cut to about
    /// `FRAME_BYTES` by stage one (only a broken one is bigger).
    fn max_record(&self) -> usize {
        match self.work {
            Work::Gateway(_) => self.shared.pipeline.max_record_bytes,
            Work::Subjects(_) => 64 << 20,
        }
    }

    /// Holds a record for the dead-letter topic, its secrets removed.
    fn dead_letter(
        &mut self,
        kept: &[u8],
        key: Option<&[u8]>,
        offset: i64,
        element: Option<u32>,
        error: String,
    ) {
        self.dead.push(DeadLetter {
            payload: redact(kept),
            key: key.map(<[u8]>::to_vec),
            offset,
            element,
            error,
        });
    }

    /// The first record after a resume is past the one asked for. Some
    /// brokers (tansu) answer a fetch from the middle of a stored record batch
    /// with the *next* batch; asking from further back gets the whole batch,
    /// and the records before the resume point are skipped. Returns false when
    /// rewinding is exhausted (the gap is then real: retention or compaction).
    fn rewind(&mut self, want: i64) -> bool {
        if self.rewinds >= 6 {
            return false;
        }
        let back = (want - (1000i64 << (2 * self.rewinds))).max(0);
        self.rewinds += 1;
        let Some(consumer) = self.shared.consumer.get().and_then(Weak::upgrade) else {
            return false;
        };
        match consumer.seek(
            &self.topic,
            self.partition,
            Offset::Offset(back),
            Duration::from_secs(10),
        ) {
            Ok(()) => true,
            Err(e) => {
                self.part().seek_failed(back, &e);
                false
            }
        }
    }

    /// Between batches, a stage-one partition that has read nothing for
    /// `kafka.subjects.idle_after_ms` *and* has read everything the broker
    /// holds tells the second stage it is idle (and says so again every ten
    /// times that), so its event time is not waited for. A partition whose
    /// reads merely stalled (a slow fetch, a busy machine) is not idle: the
    /// second stage waits for it rather than take its records out of order.
    /// Best effort: a heartbeat not written now is written next time.
    fn heartbeat(&mut self) {
        let idle_after = Duration::from_millis(self.shared.kafka.subjects.idle_after_ms);
        let Work::Gateway(g) = &mut self.work else {
            return;
        };
        if g.frames.is_none() {
            return;
        }
        let due = if g.idle_sent {
            g.last_frame.elapsed() >= 10 * idle_after
        } else {
            g.last_frame.elapsed() >= idle_after
        };
        if !due {
            return;
        }
        g.last_frame = Instant::now();
        let caught_up = match self.shared.consumer.get().and_then(Weak::upgrade) {
            Some(c) => c
                .fetch_watermarks(&self.topic, self.partition, Duration::from_secs(2))
                .is_ok_and(|(low, high)| self.next_expected.unwrap_or(low) >= high),
            None => false,
        };
        if !caught_up {
            return;
        }
        let frames = g.finish_frames(&self.topic, self.partition, true);
        if self.shared.send_frames(&frames) {
            g.idle_sent = true;
        }
    }

    /// Whether rollups counted since the last flush are held: the committed
    /// offset is past the stored rollups, and the engine has re-read up to
    /// it (while it rebuilds, a flush could not cover the records before).
    fn holds_rollups(&self) -> bool {
        match (self.committed, self.rollups_at) {
            (Some(c), Some(r)) => r < c && self.next_expected.is_some_and(|n| n >= c),
            _ => false,
        }
    }

    /// Hands the rollups held, up to the committed offset, to the flusher.
    fn flush_quiet(&mut self) {
        let Some(c) = self.committed else {
            return;
        };
        let rows = self.take_held();
        self.write_behind(c, rows, None);
    }

    /// Everything held since the last flush, taken out of the worker.
    fn take_held(&mut self) -> HeldRows {
        self.last_flush = self.restart_clock(self.shared.pipeline.rollup_flush_secs);
        let mut rows = HeldRows::default();
        match &mut self.work {
            Work::Gateway(g) => {
                rows.budgets = g.budget_rows();
                let next = g.spare_rollups.take().unwrap_or_default();
                rows.rollups = std::mem::replace(&mut g.rollups, next);
            }
            Work::Subjects(s) => {
                rows.addresses = s.address_rows();
                rows.sources = s.source_rows();
                s.rollups.clear();
            }
        }
        rows
    }

    /// Hands held rows ending at `to` (every batch up to there has
    /// committed) to the flusher, with the checkpoint valid there; with the
    /// flusher gone, the worker stops.
    fn write_behind(&mut self, to: i64, rows: HeldRows, checkpoint: Option<Checkpoint>) {
        let Some(from) = self.rollups_at else {
            unreachable!("a partition flushes behind only after its first commit");
        };
        if checkpoint.is_some() {
            self.last_checkpoint = Instant::now();
        }
        let held = Held {
            from,
            to,
            checkpoint: checkpoint.map(|cp| (cp, self.checkpoint_at)),
            rows,
        };
        let with_rows = held.from != held.to || !held.rows.is_empty();
        let link = self.link.as_mut().expect("rows are handed over inside run");
        if link.held.send(Box::new(held)).is_err() {
            self.fenced = true;
            return;
        }
        link.writing = true;
        link.writing_rows = with_rows;
    }

    /// Whether held rows were handed to the flusher and are not written yet.
    fn writing(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.writing)
    }

    /// Sends a closed batch to the committer; with the committer gone (it
    /// panicked), nothing more can land and the worker stops.
    fn hand_over(&mut self, closed: Box<Closed>) {
        let link = self
            .link
            .as_mut()
            .expect("batches are handed over inside run");
        if link.batches.send(closed).is_err() {
            self.fenced = true;
            return;
        }
        link.in_flight = true;
    }

    /// Whether a batch was handed to the committer and has not landed.
    fn in_flight(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.in_flight)
    }

    /// Closes the open batch and hands it to the committer, after the one
    /// before has landed (if that one did not, the worker stops: see
    /// [`Landing::Abandoned`]). The last commit (`final_commit`) also waits
    /// for its own.
    fn commit(&mut self, final_commit: bool) {
        self.settle(true);
        if self.fenced {
            return;
        }
        // Rows written behind: their outcome first. The last commit waits
        // for them (it flushes what is held after them), and so does one
        // that flushes in its batch (rollups with every batch) while rows
        // are written: two flushes from one stored rollups offset would
        // fence each other.
        let every_batch = self.shared.pipeline.rollup_flush_secs == 0;
        let rows_going = self.link.as_ref().is_some_and(|l| l.writing_rows);
        self.settle_held(final_commit || (every_batch && rows_going));
        if self.fenced {
            return;
        }
        let place = decide::checkpoint_place(
            final_commit,
            self.committed.is_none(),
            self.writing(),
            self.last_checkpoint.elapsed(),
            Duration::from_secs(self.shared.pipeline.checkpoint_interval_secs),
        );
        let Some(range) = decide::commit_range(
            self.first,
            self.last,
            self.committed,
            final_commit,
            self.checkpoint_at,
            self.next_expected,
        ) else {
            return;
        };
        if final_commit && self.rewrite() == Some(false) {
            // Leaving halfway through rewriting a crash's lake file: a file
            // for part of its records would double them; the next owner
            // re-reads the batch instead.
            return;
        }
        let flush = decide::flush_place(
            final_commit,
            self.committed.is_none(),
            self.writing(),
            place,
            self.last_flush.elapsed(),
            Duration::from_secs(self.shared.pipeline.rollup_flush_secs),
            self.work.held_rows(),
            self.shared.pipeline.batch_max_records,
        );
        let closed = self.close(range, place, flush);
        self.hand_over(closed);
        if final_commit && !self.fenced {
            self.settle(true);
        }
    }

    /// Takes the open batch out of the worker, owned, and opens the next;
    /// with `flush`, the rollups held since the last flush go with it (to
    /// be written in its transaction, or behind it once it has landed).
    fn close(
        &mut self,
        range: CommitRange,
        place: Option<Place>,
        flush: Option<Place>,
    ) -> Box<Closed> {
        debug_assert!(
            place.is_none() || flush.is_some(),
            "a checkpoint goes with a flush"
        );
        debug_assert!(
            place != Some(Place::InBatch) || flush == Some(Place::InBatch),
            "a checkpoint in the batch goes with a flush in the batch"
        );
        debug_assert!(
            flush != Some(Place::InBatch) || !self.link.as_ref().is_some_and(|l| l.writing_rows),
            "a flush in the batch while rows are written behind"
        );
        let offsets = self.first.map(|first| (first, self.last));
        let checkpoint = (place == Some(Place::InBatch)).then(|| self.checkpoint(range.next));
        let behind = (place == Some(Place::Behind)).then(|| self.checkpoint(range.next));
        let rows = if flush.is_some() {
            self.take_held()
        } else {
            HeldRows::default()
        };
        let mut c = Closed {
            range,
            offsets,
            dead: std::mem::take(&mut self.dead),
            frames: None,
            lake: None,
            rows,
            flush,
            rollups_from: self.rollups_at,
            alerts: std::mem::take(&mut self.alerts),
            checkpoint,
            behind,
        };
        match &mut self.work {
            Work::Gateway(g) => {
                // A batch that read nothing (a last or a quiet flush's) has
                // no projections to send.
                if g.frames.is_some() && self.first.is_some() {
                    let entries = g.frames.as_ref().map_or(0, FrameWriter::entries);
                    c.frames = Some((g.finish_frames(&self.topic, self.partition, false), entries));
                    g.last_frame = Instant::now();
                    g.idle_sent = false;
                }
                c.lake = (!g.lake.is_empty()).then(|| g.lake.finish());
            }
            Work::Subjects(_) => {}
        }
        self.first = None;
        self.forced_end = None;
        self.counted = 0;
        Box::new(c)
    }

    /// Takes in the landing of the batch in flight: waits for it (`wait`)
    /// or only looks. A committed batch moves the partition's offset (and
    /// its checkpoint); one that did not land stops the worker.
    fn settle(&mut self, wait: bool) {
        let Some(link) = self.link.as_mut().filter(|l| l.in_flight) else {
            return;
        };
        let Some(landing) = receive(&link.landings, wait) else {
            return;
        };
        link.in_flight = false;
        let Some(Landing::Committed(mut c)) = landing else {
            self.fenced = true;
            return;
        };
        let at = c.range.next;
        if let Some(cp) = &c.checkpoint {
            self.last_checkpoint =
                self.restart_clock(self.shared.pipeline.checkpoint_interval_secs);
            self.checkpoint_stored(at, cp.bytes() as u64, cp.changed.len() as u64);
        }
        self.committed = Some(at);
        let rows = std::mem::take(&mut c.rows);
        match c.flush {
            Some(Place::InBatch) => {
                self.rollups_at = Some(at);
                self.spare(rows.rollups);
                // Rollups with every batch (`rollup_flush_secs = 0`), and a
                // periodic checkpoint: stored behind all the same.
                if let Some(cp) = c.behind.take() {
                    self.write_behind(at, HeldRows::default(), Some(cp));
                }
            }
            Some(Place::Behind) => self.write_behind(at, rows, c.behind.take()),
            None => {}
        }
    }

    /// Takes in what became of rows written behind: waits for it (`wait`)
    /// or only looks. Written, the stored rollups end where they do; not
    /// written (fenced, stalled, a stop while it kept failing), the worker
    /// stops and the next owner counts them again from `rollups_offset`.
    fn settle_held(&mut self, wait: bool) {
        let Some(link) = self.link.as_mut().filter(|l| l.writing) else {
            return;
        };
        let Some(landing) = receive(&link.held_landings, wait) else {
            return;
        };
        link.writing = false;
        link.writing_rows = false;
        let Some(HeldLanding::Written(h, stored)) = landing else {
            self.fenced = true;
            return;
        };
        let Held { to, rows, .. } = *h;
        // A checkpoint alone (rollups with every batch) may land after
        // batches that moved the stored rollups further.
        self.rollups_at = self.rollups_at.max(Some(to));
        self.spare(rows.rollups);
        // A checkpoint not stored makes the next one full.
        match stored {
            None => {}
            Some(Stored::Yes(bytes, entries)) => self.checkpoint_stored(to, bytes, entries),
            Some(Stored::Superseded) => {
                self.part().checkpoint_superseded(to);
                self.work.checkpoint_lost();
            }
            Some(Stored::Failed(e)) => {
                self.part().checkpoint_failed(to, &e);
                self.work.checkpoint_lost();
            }
            Some(Stored::Skipped) => self.work.checkpoint_lost(),
        }
    }

    /// When a periodic flush or checkpoint (every `interval_secs`) was
    /// last done, as of one done now: now, or on a partition's first
    /// commit its phase ([`staggered`]), which the later ones keep.
    fn restart_clock(&self, interval_secs: u64) -> Instant {
        match self.committed {
            None => staggered(&self.topic, self.partition, interval_secs),
            Some(_) => Instant::now(),
        }
    }

    /// The engine's checkpoint at `at`, timed.
    fn checkpoint(&mut self, at: i64) -> Checkpoint {
        let started = Instant::now();
        let cp = self.work.checkpoint();
        let bytes = cp.bytes();
        self.part()
            .checkpoint_taken(at, started.elapsed(), cp.changed.len(), bytes);
        cp
    }

    /// Keeps written rollups, emptied, for reuse.
    fn spare(&mut self, mut rollups: Rollups) {
        if let Work::Gateway(g) = &mut self.work {
            rollups.clear();
            g.spare_rollups = Some(rollups);
        }
    }

    /// A checkpoint valid at `at` is stored (`bytes` and `entries` written).
    fn checkpoint_stored(&mut self, at: i64, bytes: u64, entries: u64) {
        let m = &self.shared.metrics;
        m.checkpoint_bytes.fetch_add(bytes, Ordering::Relaxed);
        m.checkpoint_entries.fetch_add(entries, Ordering::Relaxed);
        self.checkpoint_at = Some(at);
    }
}

/// What a committer or the flusher answered: waited for (`wait`) or only
/// looked at. `None`: nothing yet; `Some(None)`: it hung up (it panicked),
/// which the worker takes as a write that did not land.
fn receive<T>(answers: &std::sync::mpsc::Receiver<T>, wait: bool) -> Option<Option<T>> {
    if wait {
        return Some(answers.recv().ok());
    }
    match answers.try_recv() {
        Ok(answer) => Some(Some(answer)),
        Err(std::sync::mpsc::TryRecvError::Empty) => None,
        Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(None),
    }
}

/// Now, moved back by `partition`'s share of `interval_secs`
/// ([`decide::phase`]): the start of its periodic flushes and checkpoints
/// (set when it is assigned and at its first commit), so that partitions
/// assigned together write at different moments instead of all at once.
fn staggered(topic: &str, partition: i32, interval_secs: u64) -> Instant {
    let back = Duration::from_secs(interval_secs).mul_f64(decide::phase(topic, partition));
    Instant::now()
        .checked_sub(back)
        .unwrap_or_else(Instant::now)
}

/// A message's records that could not be counted: bytes, array element, error.
type Failed<'p> = Vec<(&'p [u8], Option<u32>, String)>;

/// How long a partition has had nothing to read before the rollups it
/// holds are written anyway.
const QUIET: Duration = Duration::from_millis(250);

impl Work {
    /// How many rollup rows are held for the next flush.
    fn held_rows(&self) -> usize {
        match self {
            Work::Gateway(g) => g.rollups.rows().len(),
            Work::Subjects(s) => s.rollups.len(),
        }
    }

    /// The last checkpoint taken was not stored: stage one's next writes
    /// every account (stage two's are always whole).
    fn checkpoint_lost(&mut self) {
        if let Work::Gateway(g) = self {
            g.engine.checkpoint_lost();
        }
    }

    /// A checkpoint of the engine (stage one: what changed since the last;
    /// stage two: its whole state).
    fn checkpoint(&mut self) -> Checkpoint {
        match self {
            Work::Gateway(g) => g.engine.checkpoint(),
            Work::Subjects(s) => Checkpoint::whole(
                serde_json::to_vec(s.engine.state()).expect("engine state serializes"),
            ),
        }
    }
}

impl GatewayWork {
    /// A record as the detectors take it: decoded in the topic's format,
    /// and its time held to its message's. The first read and a rebuild's
    /// re-read go through here alike, so both decide the same.
    fn read<'p>(
        &mut self,
        (topic, partition): (&str, i32),
        bytes: &'p [u8],
        offset: i64,
        element: Option<u32>,
        reference_ms: i64,
    ) -> Result<(detectors::Event<'p>, Format), detectors::DecodeError> {
        let origin = Origin {
            stream: topic,
            partition,
            offset,
            element,
        };
        let (mut ev, read_as) = self.decoder.decode_as(self.format, bytes, &origin)?;
        self.engine.bound_time(&mut ev, reference_ms);
        Ok((ev, read_as))
    }

    /// Re-reads a committed message to rebuild the engine: no effects (its
    /// alerts go to `scratch` and are dropped), but its rollups are held
    /// again when they were not flushed (`unflushed`).
    fn rebuild(
        &mut self,
        origin: (&str, i32),
        offset: i64,
        payload: &[u8],
        reference_ms: i64,
        unflushed: bool,
        scratch: &mut Vec<Alert>,
    ) {
        split_records(payload, |piece| {
            if let Piece::Record(bytes, element) = piece {
                if let Ok((ev, _)) = self.read(origin, bytes, offset, element, reference_ms) {
                    let outcome = self.engine.observe(&ev, scratch);
                    if let (true, Outcome::Counted { cost_micros }) = (unflushed, outcome) {
                        self.rollups.add(&ev, cost_micros);
                    }
                    scratch.clear();
                }
            }
        });
    }

    /// Counts a message's records (a JSON array's one by one): the
    /// detectors, the rollups, the lake row, the projection. What cannot be
    /// read goes to `failed`. Returns how many records the message held.
    #[allow(clippy::too_many_arguments)]
    fn count_message<'p>(
        &mut self,
        m: &PipelineMetrics,
        origin: (&str, i32),
        offset: i64,
        payload: &'p [u8],
        reference_ms: i64,
        alerts: &mut Vec<Alert>,
        failed: &mut Failed<'p>,
    ) -> usize {
        let mut records = 0;
        // A message holding a JSON array is its records, each decoded,
        // counted and dead-lettered on its own. A batch closes only between
        // messages, so a message's records commit together.
        split_records(payload, |piece| {
            records += 1;
            match piece {
                Piece::Record(bytes, element) => {
                    if element.is_some() {
                        m.array_records.fetch_add(1, Ordering::Relaxed);
                    }
                    match self.read(origin, bytes, offset, element, reference_ms) {
                        Ok((ev, read_as)) => self.count(m, &ev, offset, element, read_as, alerts),
                        Err(e) => {
                            let error = match element {
                                Some(i) => format!("element {i}: {e}"),
                                None => e.to_string(),
                            };
                            failed.push((bytes, element, error));
                        }
                    }
                }
                Piece::Broken(bytes, element, e) => {
                    m.array_records.fetch_add(1, Ordering::Relaxed);
                    let error =
                        format!("element {element}: {e} (this element and the rest of the array)");
                    let kept = &bytes[..OVERSIZE_KEPT.min(bytes.len())];
                    failed.push((kept, Some(element), error));
                }
            }
        });
        records
    }

    /// Counts a decoded record: the detectors, the rollups, the lake row,
    /// the projection.
    fn count(
        &mut self,
        m: &PipelineMetrics,
        ev: &detectors::Event<'_>,
        offset: i64,
        element: Option<u32>,
        read_as: Format,
        alerts: &mut Vec<Alert>,
    ) {
        if ev.repaired & detectors::decode::TS_REPAIRED != 0 {
            m.ahead.fetch_add(1, Ordering::Relaxed);
        }
        m.decoded.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = Format::CONCRETE.iter().position(|f| *f == read_as) {
            m.by_format[i].fetch_add(1, Ordering::Relaxed);
        }
        if ev.repaired != 0 {
            m.repaired.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = self.engine.observe(ev, alerts);
        let duplicate = match outcome {
            Outcome::Counted { cost_micros } => {
                self.rollups.add(ev, cost_micros);
                if let Some(w) = &mut self.frames {
                    w.add(
                        &self
                            .engine
                            .projection(ev, cost_micros, Seq::new(offset, element)),
                    );
                }
                false
            }
            Outcome::Duplicate => true,
        };
        if self.lake_on {
            let at = RowOrigin {
                offset,
                element,
                format: read_as,
            };
            self.lake.push(ev, at, duplicate);
        }
    }

    /// The frames of the projections gathered so far, one per stage-two
    /// partition (the writer is empty again after).
    fn finish_frames(&mut self, topic: &str, partition: i32, idle: bool) -> Vec<(u32, Vec<u8>)> {
        let now = self.engine.state().now_ms;
        let h = FrameHeader {
            topic,
            partition,
            partitions: self.topic_partitions,
            frontier_ms: if now == 0 { i64::MIN } else { now },
            idle,
        };
        self.frames
            .as_mut()
            .map(|w| w.finish(&h))
            .unwrap_or_default()
    }

    /// The budget ledger (day, and month when it applies) of every user this
    /// batch counted, as the engine has it now.
    fn budget_rows(&self) -> Vec<BudgetRow> {
        let mut seen = std::collections::HashSet::new();
        let mut rows = Vec::new();
        for r in self.rollups.rows() {
            if !seen.insert(r.user_id.as_str()) {
                continue;
            }
            let Some(u) = self.engine.user(&r.user_id) else {
                continue;
            };
            let months = u.ledger.month.as_deref().map(|m| &m[..]).unwrap_or(&[]);
            let periods = u
                .ledger
                .day
                .iter()
                .map(|p| ("day", p))
                .chain(months.iter().map(|p| ("month", p)));
            for (period, p) in periods.filter(|(_, p)| p.start_ms != 0) {
                rows.push(BudgetRow {
                    user_id: r.user_id.clone(),
                    period,
                    period_start_ms: p.start_ms,
                    limit_micros: p.limit_micros as i64,
                    spent_micros: p.micros as i64,
                    tokens: p.tokens as i64,
                });
            }
        }
        rows
    }
}

impl SubjectWork {
    /// The batch's traffic per address and minute.
    fn address_rows(&self) -> Vec<AddressRow> {
        self.rollups
            .iter()
            .map(|((ip, minute_ms), t)| AddressRow {
                ip: ip.to_string(),
                minute_ms: *minute_ms,
                requests: t.requests,
                errors: t.errors,
                auth_failures: t.auth_failures,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                cost_micros: t.cost_micros,
            })
            .collect()
    }

    /// Where the partition stands in every source.
    fn source_rows(&self) -> Vec<SourceRow> {
        self.engine
            .state()
            .merge
            .sources()
            .map(|(topic, partition, s)| SourceRow {
                source_topic: topic.to_owned(),
                source_partition: partition,
                mark: s.mark.map(|m| (m.offset, m.element as i32)),
                frontier_ms: (s.frontier_ms != i64::MIN).then_some(s.frontier_ms),
                idle: s.idle,
            })
            .collect()
    }
}
