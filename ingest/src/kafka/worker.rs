//! One partition's worker: reads its partition queue, runs each record
//! through its stage's engine, holds one batch, and commits it (dead
//! letters and projections acknowledged, the Parquet file, one Postgres
//! transaction) before it reads on.
//!
//! The bookkeeping (where the partition resumes, what a batch covers, the
//! fence, retries) is the same for both stages; what a record *is* differs
//! ([`Work`]): a gateway record for stage one, a frame of projections for
//! stage two.

use super::*;

/// One dead-letter record waiting for its acknowledgement.
pub(super) struct DeadLetter {
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    offset: i64,
    /// Its index in its message's JSON array.
    element: Option<u32>,
    error: String,
}

/// Stage one's work on a partition of gateway records.
pub(super) struct GatewayWork {
    engine: Engine,
    decoder: Decoder,
    /// The format of this topic's records.
    format: Format,
    rollups: Rollups,
    lake: Vec<storage::parquet::EventRow>,
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

/// A checkpoint stored on the runtime: whether it was stored, its bytes
/// and entries.
type CheckpointTask = tokio::task::JoinHandle<Result<(bool, u64, u64), StorageError>>;

/// The state of one partition's worker.
pub(super) struct PartitionWorker<'s> {
    shared: &'s Shared,
    pub(super) topic: String,
    pub(super) partition: i32,
    stop: Arc<AtomicBool>,
    work: Work,
    /// The offset stored in Postgres: re-read records below it change no data.
    committed: Option<i64>,
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
    fenced: bool,
    /// The first batch after assignment has been opened.
    resumed: bool,
    /// The first record after assignment was the one asked for.
    resume_verified: bool,
    /// Seeks back made to get it.
    rewinds: u32,
    /// Offset of the last checkpoint this worker wrote.
    checkpoint_at: Option<i64>,
    /// A checkpoint being stored behind the batches: its offset and task
    /// (stored, bytes, entries).
    pending_checkpoint: Option<(i64, CheckpointTask)>,
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
                    lake: Vec::new(),
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
        PartitionWorker {
            shared,
            work,
            topic,
            partition,
            stop,
            committed: start.next_offset,
            next_expected,
            last_checkpoint: Instant::now(),
            first: None,
            last: 0,
            counted: 0,
            forced_end: None,
            opened: Instant::now(),
            alerts: Vec::new(),
            scratch: Vec::new(),
            dead: Vec::new(),
            fenced: false,
            resumed: false,
            resume_verified: false,
            rewinds: 0,
            checkpoint_at,
            pending_checkpoint: None,
        }
    }

    pub(super) fn run(
        &mut self,
        queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>,
    ) {
        let max_wait = Duration::from_millis(self.shared.pipeline.batch_max_ms.min(100));
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.commit(true);
                return;
            }
            match queue.poll(max_wait) {
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
            } else if self.first.is_none() {
                self.heartbeat();
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
                match &mut self.work {
                    Work::Gateway(g) => {
                        g.rebuild(origin, offset, payload, reference_ms, &mut self.scratch)
                    }
                    Work::Subjects(s) => {
                        let _ = s.engine.observe_frame(payload, &mut self.scratch, None);
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

    /// Writes the batch: dead letters and projections (acknowledged), the
    /// Parquet file, then one Postgres transaction. Retries until it
    /// succeeds, the partition is fenced, or a stop is requested (then
    /// nothing is committed and the next owner re-reads the batch).
    fn commit(&mut self, final_commit: bool) {
        // A checkpoint stored behind: its outcome first.
        self.settle_checkpoint();
        let place = decide::checkpoint_place(
            final_commit,
            self.committed.is_none(),
            self.pending_checkpoint.is_some(),
            self.last_checkpoint.elapsed(),
            Duration::from_secs(self.shared.pipeline.checkpoint_interval_secs),
        );
        let Some(CommitRange {
            start: start_offset,
            next: next_offset,
        }) = decide::commit_range(
            self.first,
            self.last,
            self.committed,
            final_commit,
            self.checkpoint_at,
            self.next_expected,
        )
        else {
            return;
        };
        if final_commit && self.rewrite() == Some(false) {
            // Leaving halfway through rewriting a crash's lake file: a file
            // for part of its records would double them; the next owner
            // re-reads the batch instead.
            return;
        }
        let started = Instant::now();
        if !self.send_dead_letters() {
            return;
        }
        if !self.send_projections() {
            return;
        }
        if let (Work::Gateway(g), Some(first)) = (&self.work, self.first) {
            if !self.write_lake(g, first) {
                return;
            }
        }
        let checkpoint = (place == Some(CheckpointPlace::InBatch)).then(|| self.work.checkpoint());
        let (rollups, budgets, addresses, sources) = match &self.work {
            Work::Gateway(g) => (g.rollups.rows(), g.budget_rows(), Vec::new(), Vec::new()),
            Work::Subjects(s) => (&[][..], Vec::new(), s.address_rows(), s.source_rows()),
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            let batch = BatchCommit {
                topic: &self.topic,
                partition: self.partition,
                start_offset,
                next_offset,
                rollups,
                alerts: &self.alerts,
                checkpoint: checkpoint.as_ref(),
                budgets: &budgets,
                addresses: &addresses,
                sources: &sources,
            };
            match self
                .shared
                .rt
                .block_on(self.shared.store.commit_batch(&batch))
            {
                Ok(()) => break,
                Err(StorageError::Fenced { stored, .. }) => {
                    self.part()
                        .fenced(&self.shared.metrics, stored, start_offset);
                    self.fenced = true;
                    return;
                }
                Err(e) if e.is_transient() => {
                    self.part().commit_retry(&e.detail());
                    if !self.backoff(&mut backoff) {
                        return;
                    }
                }
                Err(e) => {
                    // Retrying the same batch would fail the same way, and skipping
                    // it would lose data: the partition stops advancing, loudly.
                    self.part()
                        .stalled(&self.shared.metrics, start_offset, &e.detail());
                    self.fenced = true;
                    return;
                }
            }
        }
        let m = &self.shared.metrics;
        m.batches.fetch_add(1, Ordering::Relaxed);
        m.alerts
            .fetch_add(self.alerts.len() as u64, Ordering::Relaxed);
        m.last_commit_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        m.commit_seconds.observe(started.elapsed());
        if !self.alerts.is_empty() {
            let mut by_kind = m.alerts_by_kind.lock().expect("metrics lock");
            for a in &self.alerts {
                *by_kind.entry(a.kind.as_str()).or_default() += 1;
            }
        }
        if let Some(o) = m
            .offsets
            .lock()
            .expect("metrics lock")
            .get_mut(&(self.topic.clone(), self.partition))
        {
            o.committed = next_offset;
        }
        if let Some(cp) = &checkpoint {
            self.last_checkpoint = Instant::now();
            self.checkpoint_stored(next_offset, cp.bytes() as u64, cp.changed.len() as u64);
        }
        if place == Some(CheckpointPlace::Behind) {
            self.store_checkpoint_behind(next_offset);
        }
        self.committed = Some(next_offset);
        self.first = None;
        self.forced_end = None;
        self.counted = 0;
        self.alerts.clear();
        match &mut self.work {
            Work::Gateway(g) => {
                g.rollups.clear();
                g.lake.clear();
            }
            Work::Subjects(s) => s.rollups.clear(),
        }
    }

    /// Writes the batch's Parquet file (none for a batch of nothing but dead
    /// letters); false when a stop came while it kept failing.
    fn write_lake(&self, g: &GatewayWork, first: i64) -> bool {
        let Some(dir) = self
            .shared
            .pipeline
            .parquet_dir
            .as_ref()
            .filter(|_| !g.lake.is_empty())
        else {
            return true;
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match storage::parquet::write_batch(
                dir,
                &self.topic,
                self.partition,
                first,
                self.last,
                &g.lake,
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

    /// Takes a checkpoint of the engine at `at` (the batch ending there has
    /// committed) and stores it on the runtime while the worker reads on:
    /// on top of this worker's last one (`checkpoint_at`), else not at all.
    fn store_checkpoint_behind(&mut self, at: i64) {
        let cp = self.work.checkpoint();
        let store = self.shared.store.clone();
        let (topic, partition, previous) = (self.topic.clone(), self.partition, self.checkpoint_at);
        let pace = Some(self.shared.pipeline.checkpoint_write_mb_per_sec * 1_000_000);
        let task = self.shared.rt.spawn(async move {
            let w = CheckpointWrite {
                topic: &topic,
                partition,
                at,
                previous,
                checkpoint: &cp,
                bytes_per_sec: pace,
            };
            let stored = store.store_checkpoint(&w).await?;
            Ok((stored, cp.bytes() as u64, cp.changed.len() as u64))
        });
        self.pending_checkpoint = Some((at, task));
        self.last_checkpoint = Instant::now();
    }

    /// Takes in the outcome of a checkpoint stored behind, if it is done.
    /// One that was not stored makes the next checkpoint full.
    fn settle_checkpoint(&mut self) {
        let Some((at, task)) = self.pending_checkpoint.take_if(|(_, t)| t.is_finished()) else {
            return;
        };
        match self.shared.rt.block_on(task) {
            Ok(Ok((true, bytes, entries))) => return self.checkpoint_stored(at, bytes, entries),
            Ok(Ok((false, ..))) => self.part().checkpoint_superseded(at),
            Ok(Err(e)) => self.part().checkpoint_failed(at, &e.detail()),
            Err(e) => self.part().checkpoint_failed(at, &e.to_string()),
        }
        if let Work::Gateway(g) = &mut self.work {
            g.engine.checkpoint_lost();
        }
    }

    /// A checkpoint valid at `at` is stored (`bytes` and `entries` written).
    fn checkpoint_stored(&mut self, at: i64, bytes: u64, entries: u64) {
        let m = &self.shared.metrics;
        m.checkpoint_bytes.fetch_add(bytes, Ordering::Relaxed);
        m.checkpoint_entries.fetch_add(entries, Ordering::Relaxed);
        self.checkpoint_at = Some(at);
    }

    /// Writes the batch's projection frames to the second stage's topic and
    /// waits for every acknowledgement (as dead letters): the batch commits
    /// only once the second stage can see what it counted. Every stage-two
    /// partition gets a frame, empty or not: it carries this source's event
    /// time.
    fn send_projections(&mut self) -> bool {
        let Work::Gateway(g) = &mut self.work else {
            return true;
        };
        if g.frames.is_none() {
            return true;
        }
        let entries = g.frames.as_ref().map_or(0, FrameWriter::entries);
        let frames = g.finish_frames(&self.topic, self.partition, false);
        g.last_frame = Instant::now();
        g.idle_sent = false;
        let mut backoff = Duration::from_millis(50);
        while !self.shared.send_frames(&frames) {
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
    fn send_dead_letters(&mut self) -> bool {
        let mut backoff = Duration::from_millis(50);
        while !self.dead.is_empty() {
            let partition = self.partition.to_string();
            let mut pending = Vec::with_capacity(self.dead.len());
            for d in &self.dead {
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
            let mut failed = Vec::new();
            for (i, p) in pending.into_iter().enumerate() {
                let ok = match p {
                    Ok(fut) => matches!(self.shared.rt.block_on(fut), Ok(Ok(_))),
                    Err(_) => false,
                };
                if !ok {
                    failed.push(i);
                }
            }
            if failed.is_empty() {
                self.shared
                    .metrics
                    .dead_lettered
                    .fetch_add(self.dead.len() as u64, Ordering::Relaxed);
                self.dead.clear();
                return true;
            }
            self.part()
                .dead_letters_unacked(failed.len(), self.dead.len());
            // Retry the whole set: a dead letter written twice is harmless, one lost is not.
            if !self.backoff(&mut backoff) {
                return false;
            }
        }
        true
    }
}

/// A message's records that could not be counted: bytes, array element, error.
type Failed<'p> = Vec<(&'p [u8], Option<u32>, String)>;

impl Work {
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
    /// alerts go to `scratch` and are dropped).
    fn rebuild(
        &mut self,
        origin: (&str, i32),
        offset: i64,
        payload: &[u8],
        reference_ms: i64,
        scratch: &mut Vec<Alert>,
    ) {
        split_records(payload, |piece| {
            if let Piece::Record(bytes, element) = piece {
                if let Ok((ev, _)) = self.read(origin, bytes, offset, element, reference_ms) {
                    self.engine.observe(&ev, scratch);
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
            self.lake.push(event_row(ev, at, duplicate));
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
