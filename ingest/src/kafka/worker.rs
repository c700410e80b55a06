//! One partition's worker: reads its partition queue, decodes and detects
//! each record, holds one batch, and commits it (dead letters acknowledged,
//! the Parquet file, one Postgres transaction) before it reads on.

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

/// The state of one partition's worker.
pub(super) struct PartitionWorker<'s> {
    shared: &'s Shared,
    pub(super) topic: String,
    pub(super) partition: i32,
    stop: Arc<AtomicBool>,
    engine: Engine,
    decoder: Decoder,
    /// The format of this topic's records.
    format: Format,
    /// The offset stored in Postgres: re-read records below it change no data.
    committed: Option<i64>,
    /// Next offset expected (lower ones are re-deliveries).
    next_expected: Option<i64>,
    last_checkpoint: Instant,
    // The open batch.
    first: Option<i64>,
    last: i64,
    forced_end: Option<i64>,
    opened: Instant,
    rollups: Rollups,
    alerts: Vec<Alert>,
    scratch: Vec<Alert>,
    lake: Vec<storage::parquet::EventRow>,
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
        start: PartitionStart,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let checkpoint_at = start.checkpoint.as_ref().map(|c| c.0);
        let fresh = || Engine::new(&shared.engine).expect("engine config was validated");
        // Expecting the first offset makes records a broker no longer has
        // show up as a gap.
        let (_, expected) =
            decide::resume_point(checkpoint_at, start.next_offset, shared.kafka.start_from);
        let (engine, next_expected) = match start.checkpoint {
            Some((_, bytes)) => match serde_json::from_slice::<EngineState>(&bytes) {
                Ok(state) => (
                    Engine::restore(&shared.engine, state).expect("engine config was validated"),
                    expected,
                ),
                // The assignment already checked it decodes (see `load_start`).
                Err(_) => (fresh(), None),
            },
            None => (fresh(), expected),
        };
        PartitionWorker {
            shared,
            decoder: shared.decoder.clone(),
            format: shared.kafka.format_of(&topic),
            topic,
            partition,
            stop,
            engine,
            committed: start.next_offset,
            next_expected,
            last_checkpoint: Instant::now(),
            first: None,
            last: 0,
            forced_end: None,
            opened: Instant::now(),
            rollups: Rollups::default(),
            alerts: Vec::new(),
            scratch: Vec::new(),
            lake: Vec::new(),
            dead: Vec::new(),
            fenced: false,
            resumed: false,
            resume_verified: false,
            rewinds: 0,
            checkpoint_at,
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
            let at_boundary = self
                .forced_end
                .is_some_and(|end| self.first.is_some() && self.last >= end);
            if decide::batch_closes(
                self.lake.len() + self.dead.len(),
                self.shared.pipeline.batch_max_records,
                self.first.map(|_| self.opened.elapsed()),
                Duration::from_millis(self.shared.pipeline.batch_max_ms),
                at_boundary,
            ) {
                self.commit(false);
                if self.fenced {
                    return;
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
            if payload.len() <= self.shared.pipeline.max_record_bytes {
                let format = self.format;
                split_records(payload, |piece| {
                    if let Piece::Record(bytes, element) = piece {
                        if let Ok((ev, _)) = self.read(format, bytes, offset, element, reference_ms)
                        {
                            self.engine.observe(&ev, &mut self.scratch);
                            self.scratch.clear();
                        }
                    }
                });
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
                Some(dir) if !self.resumed => {
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
        if payload.len() > self.shared.pipeline.max_record_bytes {
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
        // A message holding a JSON array is its records, each decoded,
        // counted and dead-lettered on its own. A batch closes only between
        // messages, so a message's records commit together.
        let format = self.format;
        split_records(payload, |piece| match piece {
            Piece::Record(bytes, element) => {
                if element.is_some() {
                    self.shared
                        .metrics
                        .array_records
                        .fetch_add(1, Ordering::Relaxed);
                }
                match self.read(format, bytes, offset, element, reference_ms) {
                    Ok((ev, read_as)) => self.count(&ev, offset, element, read_as),
                    Err(e) => {
                        let error = match element {
                            Some(i) => format!("element {i}: {e}"),
                            None => e.to_string(),
                        };
                        self.dead_letter(bytes, key, offset, element, error);
                    }
                }
            }
            Piece::Broken(bytes, element, e) => {
                self.shared
                    .metrics
                    .array_records
                    .fetch_add(1, Ordering::Relaxed);
                let error =
                    format!("element {element}: {e} (this element and the rest of the array)");
                let kept = &bytes[..OVERSIZE_KEPT.min(bytes.len())];
                self.dead_letter(kept, key, offset, Some(element), error);
            }
        });
    }

    /// Counts a decoded record: the detectors, the rollups, the lake row.
    fn count(
        &mut self,
        ev: &detectors::Event<'_>,
        offset: i64,
        element: Option<u32>,
        read_as: Format,
    ) {
        let m = &self.shared.metrics;
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
        let outcome = self.engine.observe(ev, &mut self.alerts);
        let duplicate = match outcome {
            Outcome::Counted { cost_micros } => {
                self.rollups.add(ev, cost_micros);
                false
            }
            Outcome::Duplicate => true,
        };
        if self.shared.pipeline.parquet_dir.is_some() {
            let at = RowOrigin {
                offset,
                element,
                format: read_as,
            };
            self.lake.push(event_row(ev, at, duplicate));
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

    /// A record as the detectors take it: decoded in the topic's format,
    /// and its time held to its message's. The first read and a rebuild's
    /// re-read go through here alike, so both decide the same.
    fn read<'p>(
        &mut self,
        format: Format,
        bytes: &'p [u8],
        offset: i64,
        element: Option<u32>,
        reference_ms: i64,
    ) -> Result<(detectors::Event<'p>, Format), detectors::DecodeError> {
        let origin = Origin {
            stream: &self.topic,
            partition: self.partition,
            offset,
            element,
        };
        let (mut ev, read_as) = self.decoder.decode_as(format, bytes, &origin)?;
        self.engine.bound_time(&mut ev, reference_ms);
        Ok((ev, read_as))
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

    /// Writes the batch: dead letters (acknowledged), the Parquet file, then
    /// one Postgres transaction. Retries until it succeeds, the partition is
    /// fenced, or a stop is requested (then nothing is committed and the next
    /// owner re-reads the batch).
    fn commit(&mut self, final_commit: bool) {
        let checkpoint_due = decide::checkpoint_due(
            final_commit,
            self.committed.is_none(),
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
        let started = Instant::now();
        if !self.send_dead_letters() {
            return;
        }
        // A batch of nothing but dead letters has no lake rows, and no file.
        if let (Some(dir), Some(first)) = (
            self.shared
                .pipeline
                .parquet_dir
                .as_ref()
                .filter(|_| !self.lake.is_empty()),
            self.first,
        ) {
            let mut backoff = Duration::from_millis(50);
            loop {
                match storage::parquet::write_batch(
                    dir,
                    &self.topic,
                    self.partition,
                    first,
                    self.last,
                    &self.lake,
                    0,
                ) {
                    Ok(_) => break,
                    Err(e) => {
                        self.part().parquet_retry(&e.detail());
                        if !self.backoff(&mut backoff) {
                            return;
                        }
                    }
                }
            }
        }
        let checkpoint = if checkpoint_due {
            Some(serde_json::to_vec(self.engine.state()).expect("engine state serializes"))
        } else {
            None
        };
        let budgets = self.budget_rows();
        let mut backoff = Duration::from_millis(50);
        loop {
            let batch = BatchCommit {
                topic: &self.topic,
                partition: self.partition,
                start_offset,
                next_offset,
                rollups: self.rollups.rows(),
                alerts: &self.alerts,
                checkpoint: checkpoint.as_deref(),
                budgets: &budgets,
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
        if checkpoint_due {
            self.last_checkpoint = Instant::now();
            self.checkpoint_at = Some(next_offset);
        }
        self.committed = Some(next_offset);
        self.first = None;
        self.forced_end = None;
        self.rollups.clear();
        self.alerts.clear();
        self.lake.clear();
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
