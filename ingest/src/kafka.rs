//! The Kafka pipeline: a consumer group whose every assigned partition is
//! worked by its own thread, owning that partition's detector [`Engine`].
//!
//! **Exactly-once effects.** A partition's batch (rollups, alerts,
//! revocation actions, outbox rows, and now and then the engine's full
//! state) is committed to Postgres in one transaction together with the
//! partition's next offset; Kafka's own offset commits are not used. On
//! assignment the consumer starts the partition at its last engine
//! checkpoint and re-reads, without writing anything, up to the committed
//! offset, which rebuilds the engine exactly as it was (detectors are
//! deterministic), then goes on writing. A crash at any point therefore
//! replays from the last commit and neither loses nor double counts. The
//! offset row is fenced: a commit must start at the offset stored, so a
//! consumer that lost its partition cannot commit over the new owner.
//!
//! **Bad records** are dead-lettered with headers naming the origin topic,
//! partition, offset and the error; the batch does not commit until the
//! dead-letter writes are acknowledged, so if the dead-letter topic cannot
//! be written the partition stops advancing rather than skipping.
//!
//! **Threads, not tasks.** librdkafka calls the rebalance callback on the
//! thread that polls the consumer; doing the work there (loading offsets,
//! draining revoked partitions) needs blocking calls into Postgres, which
//! is simplest and safest from plain threads driving a tokio runtime by
//! handle. Each worker reads its own partition queue
//! (`split_partition_queue`, split off before the partition is assigned so
//! no record ever reaches the main queue), holds one batch, and does not
//! read on while that batch commits: that is the backpressure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use detectors::{Alert, Decoder, Engine, EngineConfig, EngineState, Outcome};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use storage::{Backend, BatchCommit, BudgetRow, PartitionStart, StorageError};

use crate::batch::{event_row, Rollups};
use crate::config::{KafkaConfig, PipelineConfig, StartFrom};
pub use crate::telemetry::PipelineMetrics;
use crate::telemetry::{self, Part, PartitionOffsets};

/// How long a revoke waits for a partition's last batch to commit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait between retries of a failing commit or dead-letter write.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why the pipeline could not run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The Kafka client could not be created or subscribed.
    #[error("kafka: {what}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The detector configuration was refused.
    #[error("engine config")]
    Engine(#[from] detectors::ConfigError),
    /// A Kafka setting was refused.
    #[error("kafka config")]
    Config(#[from] crate::config::PipelineConfigError),
}

/// Everything a partition worker needs, shared.
struct Shared {
    kafka: KafkaConfig,
    pipeline: PipelineConfig,
    engine: EngineConfig,
    decoder: Decoder,
    store: Backend,
    rt: tokio::runtime::Handle,
    producer: FutureProducer,
    metrics: Arc<PipelineMetrics>,
    consumer: OnceLock<Weak<BaseConsumer<PipelineContext>>>,
    workers: Mutex<HashMap<(String, i32), Worker>>,
}

/// A running partition worker.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The consumer context: does the rebalance work.
struct PipelineContext {
    shared: Arc<Shared>,
}

impl ClientContext for PipelineContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut offsets = self.shared.metrics.offsets.lock().expect("metrics lock");
        for (topic, t) in &statistics.topics {
            for (p, ps) in &t.partitions {
                if *p < 0 || ps.hi_offset < 0 {
                    continue; // librdkafka's internal UA partition, or not fetched yet
                }
                if let Some(o) = offsets.get_mut(&(topic.clone(), *p)) {
                    o.high_watermark = ps.hi_offset;
                }
            }
        }
    }
}

impl ConsumerContext for PipelineContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut starts = Vec::new();
                for el in tpl.elements() {
                    let (topic, partition) = (el.topic().to_string(), el.partition());
                    let start = self.shared.load_start(&topic, partition);
                    starts.push((topic, partition, start));
                }
                for (topic, partition, start) in &starts {
                    let offset = match (&start.checkpoint, start.next_offset) {
                        (Some((at, _)), _) => Offset::Offset(*at),
                        // Committed without a (readable) checkpoint: the first commit
                        // writes one, so only an unreadable one gets here. Rebuild the
                        // state by re-reading from offset 0.
                        (None, Some(_)) => Offset::Offset(0),
                        (None, None) if self.shared.kafka.start_from == StartFrom::Latest => {
                            Offset::End
                        }
                        // Offset 0 rather than the logical "beginning": it resolves to
                        // the log start through auto.offset.reset=earliest when
                        // retention has moved it, and avoids a lookup that
                        // librdkafka's mock cluster answers wrongly.
                        (None, None) => Offset::Offset(0),
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                }
                // Split each partition's queue off *before* assigning: librdkafka
                // then never forwards its messages to the main queue, so a worker
                // sees its partition's records in order, all of them.
                let Some(arc) = self.shared.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let queues: Vec<_> = starts
                    .iter()
                    .map(|(t, p, _)| arc.split_partition_queue(t, *p))
                    .collect();
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    telemetry::rebalance_failed("assign", &e);
                    return;
                }
                for ((topic, partition, start), queue) in starts.into_iter().zip(queues) {
                    match queue {
                        Some(q) => self.shared.spawn_worker(q, topic, partition, start),
                        None => Part {
                            topic: &topic,
                            partition,
                        }
                        .no_queue(),
                    }
                }
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                self.shared.stop_workers(&parts);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    telemetry::rebalance_failed("unassign", &e);
                }
            }
            other => {
                telemetry::rebalance_failed("rebalance", &other);
                self.shared.stop_all_workers();
                let _ = consumer.unassign();
            }
        }
    }
}

impl Shared {
    /// Loads where a partition resumes, retrying while Postgres is away.
    fn load_start(&self, topic: &str, partition: i32) -> PartitionStart {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .rt
                .block_on(self.store.load_partition(topic, partition))
            {
                Ok(mut s) => {
                    if let Some((at, bytes)) = &s.checkpoint {
                        if let Err(e) = serde_json::from_slice::<EngineState>(bytes) {
                            Part { topic, partition }.checkpoint_unreadable(*at, &e);
                            s.checkpoint = None;
                        }
                    }
                    return s;
                }
                Err(e) => {
                    Part { topic, partition }.load_retry(&self.metrics, &chain(&e));
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn spawn_worker(
        self: &Arc<Self>,
        queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>,
        topic: String,
        partition: i32,
        start: PartitionStart,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(self);
        let (t, p, s) = (topic.clone(), partition, Arc::clone(&stop));
        self.metrics.offsets.lock().expect("metrics lock").insert(
            (topic.clone(), partition),
            PartitionOffsets {
                high_watermark: -1,
                committed: start.next_offset.unwrap_or(-1),
            },
        );
        let thread = std::thread::Builder::new()
            .name(format!("kw-{topic}-{partition}"))
            .spawn(move || {
                shared.metrics.partitions.fetch_add(1, Ordering::Relaxed);
                let mut w = PartitionWorker::new(&shared, t, p, start, s);
                w.run(queue);
                shared.metrics.partitions.fetch_sub(1, Ordering::Relaxed);
                let key = (w.topic.clone(), w.partition);
                shared
                    .metrics
                    .offsets
                    .lock()
                    .expect("metrics lock")
                    .remove(&key);
            })
            .expect("spawning a partition worker");
        self.workers
            .lock()
            .expect("workers lock")
            .insert((topic, partition), Worker { stop, thread });
    }

    /// Stops every worker (shutdown, or a rebalance error).
    fn stop_all_workers(&self) {
        let all: Vec<(String, i32)> = self
            .workers
            .lock()
            .expect("workers lock")
            .keys()
            .cloned()
            .collect();
        self.stop_workers(&all);
    }

    /// Asks workers to finish their batch, commit and stop; waits for them.
    fn stop_workers(&self, parts: &[(String, i32)]) {
        let taken: Vec<Worker> = {
            let mut w = self.workers.lock().expect("workers lock");
            parts.iter().filter_map(|k| w.remove(k)).collect()
        };
        for w in &taken {
            w.stop.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for w in taken {
            while !w.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.thread.is_finished() {
                let _ = w.thread.join();
            } else {
                telemetry::worker_not_drained(DRAIN_TIMEOUT);
            }
        }
    }
}

/// One dead-letter record waiting for its acknowledgement.
struct DeadLetter {
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    offset: i64,
    error: String,
}

/// Why a record is a dead letter.
enum Rejected {
    /// Longer than `pipeline.max_record_bytes`.
    Oversize,
    /// Not a record the detectors can use.
    Invalid(detectors::DecodeError),
}

/// The state of one partition's worker.
struct PartitionWorker<'s> {
    shared: &'s Shared,
    topic: String,
    partition: i32,
    stop: Arc<AtomicBool>,
    engine: Engine,
    decoder: Decoder,
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

    fn new(
        shared: &'s Shared,
        topic: String,
        partition: i32,
        start: PartitionStart,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let checkpoint_at = start.checkpoint.as_ref().map(|c| c.0);
        let fresh = || Engine::new(&shared.engine).expect("engine config was validated");
        let (engine, next_expected) = match start.checkpoint {
            Some((at, bytes)) => match serde_json::from_slice::<EngineState>(&bytes) {
                Ok(state) => (
                    Engine::restore(&shared.engine, state).expect("engine config was validated"),
                    Some(at),
                ),
                // The assignment already checked it decodes (see `load_start`).
                Err(_) => (fresh(), None),
            },
            // A fresh start or a rebuild reads from offset 0 (see the assignment):
            // expect it, so records a broker no longer has show up as a gap.
            None if start.next_offset.is_some()
                || shared.kafka.start_from == StartFrom::Earliest =>
            {
                (fresh(), Some(0))
            }
            None => (fresh(), None),
        };
        PartitionWorker {
            shared,
            decoder: shared.decoder.clone(),
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

    fn run(&mut self, queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>) {
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
            let full = self.lake.len() + self.dead.len() >= self.shared.pipeline.batch_max_records;
            let due = self.first.is_some()
                && self.opened.elapsed()
                    >= Duration::from_millis(self.shared.pipeline.batch_max_ms);
            let at_boundary = self
                .forced_end
                .is_some_and(|end| self.first.is_some() && self.last >= end);
            if full || due || at_boundary {
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
            if let Ok(ev) = self.read(payload, reference_ms) {
                self.engine.observe(&ev, &mut self.scratch);
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
                Some(dir) if !self.resumed => {
                    self.resumed = true;
                    storage::parquet::existing_batch_end(dir, &self.topic, self.partition, offset)
                        .unwrap_or_else(|e| {
                            self.part().lake_lookup_failed(&chain(&e));
                            None
                        })
                }
                _ => None,
            };
        }
        self.last = offset;
        match self.read(payload, reference_ms) {
            Ok(ev) => {
                if ev.repaired & detectors::decode::TS_REPAIRED != 0 {
                    self.shared.metrics.ahead.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.metrics.decoded.fetch_add(1, Ordering::Relaxed);
                if ev.repaired != 0 {
                    self.shared.metrics.repaired.fetch_add(1, Ordering::Relaxed);
                }
                let outcome = self.engine.observe(&ev, &mut self.alerts);
                let duplicate = match outcome {
                    Outcome::Counted { cost_micros } => {
                        self.rollups.add(&ev, cost_micros);
                        false
                    }
                    Outcome::Duplicate => true,
                };
                if self.shared.pipeline.parquet_dir.is_some() {
                    self.lake.push(event_row(&ev, offset, duplicate));
                }
            }
            Err(why) => {
                let (kept, error) = match why {
                    Rejected::Oversize => (
                        &payload[..OVERSIZE_KEPT.min(payload.len())],
                        format!(
                            "record: {} bytes, more than pipeline.max_record_bytes ({}); the first {OVERSIZE_KEPT} kept",
                            payload.len(),
                            self.shared.pipeline.max_record_bytes
                        ),
                    ),
                    Rejected::Invalid(e) => (payload, e.to_string()),
                };
                self.dead.push(DeadLetter {
                    payload: redact(kept),
                    key: key.map(<[u8]>::to_vec),
                    offset,
                    error,
                });
            }
        }
    }

    /// A record as the detectors take it: within `pipeline.max_record_bytes`,
    /// decoded, and its time held to its message's. The first read and a
    /// rebuild's re-read go through here alike, so both decide the same.
    fn read<'p>(
        &mut self,
        payload: &'p [u8],
        reference_ms: i64,
    ) -> Result<detectors::Event<'p>, Rejected> {
        if payload.len() > self.shared.pipeline.max_record_bytes {
            return Err(Rejected::Oversize);
        }
        let mut ev = self.decoder.decode(payload).map_err(Rejected::Invalid)?;
        self.engine.bound_time(&mut ev, reference_ms);
        Ok(ev)
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
        let checkpoint_due = final_commit
            || self.committed.is_none()
            || self.last_checkpoint.elapsed()
                >= Duration::from_secs(self.shared.pipeline.checkpoint_interval_secs);
        let (start_offset, next_offset) = match (self.first, self.committed) {
            (Some(first), committed) => (committed.unwrap_or(first), self.last + 1),
            // Leaving with no open batch: still hand the next owner a checkpoint
            // at the committed offset, so it need not re-read to rebuild state,
            // but only if this engine has reached that offset.
            (None, Some(c))
                if final_commit
                    && self.checkpoint_at != Some(c)
                    && self.next_expected.is_some_and(|n| n >= c) =>
            {
                (c, c)
            }
            (None, _) => return,
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
                        self.part().parquet_retry(&chain(&e));
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
                    self.part().commit_retry(&chain(&e));
                    if !self.backoff(&mut backoff) {
                        return;
                    }
                }
                Err(e) => {
                    // Retrying the same batch would fail the same way, and skipping
                    // it would lose data: the partition stops advancing, loudly.
                    self.part()
                        .stalled(&self.shared.metrics, start_offset, &chain(&e));
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
                let headers = OwnedHeaders::new()
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

/// An error with its causes, for log lines (`top: cause: root cause`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// What replaces a secret in a dead letter.
const REDACTED: &str = "[redacted by keywatch]";
/// Most bytes of an over-long record kept in its dead letter.
const OVERSIZE_KEPT: usize = 64 << 10;

/// A bad record's payload for the dead-letter topic, with any raw secret a
/// gateway logged by mistake (`api_key`, `prompt`) removed: from the parsed
/// object when the record is one, else from the bytes (a cut or malformed
/// record may still carry a key). Other bytes go as they came.
pub fn redact(payload: &[u8]) -> Vec<u8> {
    if let Ok(serde_json::Value::Object(mut m)) =
        serde_json::from_slice::<serde_json::Value>(payload)
    {
        let mut changed = false;
        for k in ["api_key", "prompt"] {
            if let Some(v) = m.get_mut(k) {
                *v = serde_json::Value::String(REDACTED.into());
                changed = true;
            }
        }
        if changed {
            return serde_json::to_vec(&m).unwrap_or_else(|_| payload.to_vec());
        }
        return payload.to_vec();
    }
    redact_bytes(payload)
}

/// The end of the JSON string starting after the quote at `from`: the index
/// of its closing quote, or the end of the bytes.
fn string_end(b: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// A string's text with `\uXXXX` and one-letter escapes undone (enough to
/// recognise a field name however it is spelled).
fn loose_unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            if raw[i + 1] == b'u' && i + 6 <= raw.len() {
                let hex = std::str::from_utf8(&raw[i + 2..i + 6]).ok();
                if let Some(c) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(c);
                    i += 6;
                    continue;
                }
            }
            out.push(raw[i + 1]);
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// [`redact`] for bytes that are not a JSON object: every string value
/// after an `api_key` or `prompt` name is replaced, up to its closing quote
/// or the end of the bytes.
fn redact_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let end = string_end(b, i + 1);
        let name = loose_unescape(&b[i + 1..end]);
        out.extend_from_slice(&b[i..(end + 1).min(b.len())]);
        i = end + 1;
        if name != b"api_key" && name != b"prompt" {
            continue;
        }
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b':') {
            j += 1;
        }
        if j < b.len() && b[j] == b'"' {
            out.extend_from_slice(&b[i..=j]);
            out.extend_from_slice(REDACTED.as_bytes());
            let close = string_end(b, j + 1);
            if close < b.len() {
                out.push(b'"');
            }
            i = close + 1;
        }
    }
    out
}

/// The checks the fuzzer (`fuzz/fuzz_targets/redact.rs`) and the test
/// suite run on one input: [`redact`] never panics on any bytes, and a
/// secret written as the value of `api_key` or `prompt` at the start of a
/// record never reaches a dead letter, whatever bytes follow it (a cut
/// record, invalid UTF-8, more fields, another copy of the name).
#[doc(hidden)]
pub fn fuzz_redact(data: &[u8]) {
    const SECRET: &[u8] = b"sk-fuzz-7Hq2Lw9Xv4";
    let count = |b: &[u8]| b.windows(SECRET.len()).filter(|w| *w == SECRET).count();
    let _ = redact(data);
    for name in ["api_key", "prompt"] {
        let mut rec = format!("{{\"{name}\": \"").into_bytes();
        rec.extend_from_slice(SECRET);
        rec.push(b'"');
        rec.extend_from_slice(data);
        let out = redact(&rec);
        assert!(
            count(&out) <= count(data),
            "{name}'s value reached the dead letter: {}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// A handle on a running pipeline.
pub struct Pipeline {
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<PipelineContext>>,
}

impl Pipeline {
    /// Creates the consumer and the dead-letter producer and subscribes.
    pub fn start(
        kafka: KafkaConfig,
        pipeline: PipelineConfig,
        engine: EngineConfig,
        hash_key: &[u8],
        store: impl Into<Backend>,
        rt: tokio::runtime::Handle,
    ) -> Result<Pipeline, PipelineError> {
        let store = store.into();
        Engine::new(&engine)?;
        let settings = kafka.client_settings()?;
        let mut common = ClientConfig::new();
        common.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &settings {
            common.set(k, v);
        }
        let producer: FutureProducer = {
            let mut c = common.clone();
            c.set("acks", "all").set("enable.idempotence", "true");
            c.create().map_err(|source| PipelineError::Kafka {
                what: "creating the dead-letter producer",
                source,
            })?
        };
        let shared = Arc::new(Shared {
            decoder: Decoder::new(hash_key),
            kafka,
            pipeline,
            engine,
            store,
            rt,
            producer,
            metrics: Arc::new(PipelineMetrics::default()),
            consumer: OnceLock::new(),
            workers: Mutex::new(HashMap::new()),
        });
        let mut c = common;
        c.set("group.id", &shared.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", shared.kafka.start_from.as_str())
            .set("enable.partition.eof", "false");
        for (k, v) in [
            ("fetch.min.bytes", "1048576"),
            ("fetch.wait.max.ms", "100"),
            ("max.partition.fetch.bytes", "8388608"),
            ("partition.assignment.strategy", "range"),
            // librdkafka pauses fetching for up to this long once its prefetch
            // queue is full (default 1000 ms), which starves a worker that just
            // finished a commit; 10 ms keeps the queue topped up.
            ("fetch.queue.backoff.ms", "10"),
            // High watermarks for the consumer-lag metric.
            ("statistics.interval.ms", "5000"),
            // A crashed member's partitions wait for its session to lapse
            // before they are reassigned (librdkafka's default: 45 s); 10 s
            // with a heartbeat a second is what a restart waits at most
            // without `kafka.instance_id`.
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
        ] {
            if !settings.contains_key(k) {
                c.set(k, v);
            }
        }
        if let Some(id) = &shared.kafka.instance_id {
            // Static membership (KIP-345): a restarted instance with the same
            // id takes its partitions back at once, with no rebalance.
            c.set("group.instance.id", id);
        }
        let consumer: BaseConsumer<PipelineContext> = c
            .create_with_context(PipelineContext {
                shared: Arc::clone(&shared),
            })
            .map_err(|source| PipelineError::Kafka {
                what: "creating the consumer",
                source,
            })?;
        let consumer = Arc::new(consumer);
        let _ = shared.consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = shared.kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| PipelineError::Kafka {
                what: "subscribing",
                source,
            })?;
        Ok(Pipeline { shared, consumer })
    }

    /// The pipeline's counters.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Polls the consumer until `stop` is set, then drains every partition
    /// (finish the batch, commit, release) and leaves the group. Blocks: run
    /// it on its own thread.
    pub fn run_until(self, stop: &AtomicBool) -> KafkaResult<()> {
        while !stop.load(Ordering::Acquire) {
            match self.consumer.poll(Duration::from_millis(100)) {
                // Every assigned partition's queue is split off before assignment,
                // so a message here is a bug: say so rather than guess its place.
                Some(Ok(m)) => {
                    telemetry::misrouted(&self.shared.metrics, m.topic(), m.partition(), m.offset())
                }
                Some(Err(e)) => telemetry::consumer_error(&e),
                None => {}
            }
            self.reap_finished();
        }
        self.shared.stop_all_workers();
        self.consumer.unsubscribe();
        Ok(())
    }

    /// Workers that stopped on their own (fenced) are forgotten.
    fn reap_finished(&self) {
        let mut w = self.shared.workers.lock().expect("workers lock");
        let done: Vec<(String, i32)> = w
            .iter()
            .filter(|(_, v)| v.thread.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            if let Some(v) = w.remove(&k) {
                let _ = v.thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_carry_no_secrets() {
        let out = redact(
            br#"{"ts":"bad","api_key":"sk-live-SECRET","prompt":"my secret prompt","user_id":"u"}"#,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("SECRET") && !text.contains("secret prompt"),
            "{text}"
        );
        assert!(text.contains("\"ts\":\"bad\""));
        assert_eq!(redact(b"not json at all"), b"not json at all");
        // Cut or malformed records are redacted from their bytes, however
        // the name is spelled, up to the end of a cut value.
        for raw in [
            &br#"{"ts":"x","api_key":"sk-live-SECRET","user_id":"u""#[..],
            br#"{"api\u005fkey" : "sk-live-SECRET\"still" "prompt":"secret prompt"#,
            br#"garbage "prompt":"secret prompt and more"#,
        ] {
            let text = String::from_utf8(redact(raw)).unwrap();
            assert!(
                !text.contains("SECRET")
                    && !text.contains("secret prompt")
                    && !text.contains("still"),
                "{text}"
            );
            assert!(text.contains(REDACTED), "{text}");
        }
        assert_eq!(
            redact(br#"{"user_id":"u","prompt_tokens":"many""#),
            br#"{"user_id":"u","prompt_tokens":"many""#
        );
    }

    proptest::proptest! {
        /// The fuzz target's checks, on bytes rich in JSON's structure, in every test run.
        #[test]
        fn whatever_follows_a_secret_it_is_redacted(
            data in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(&b"\""[..]), proptest::prelude::Just(&b"\\"[..]),
                    proptest::prelude::Just(&b":"[..]), proptest::prelude::Just(&b","[..]),
                    proptest::prelude::Just(&b"}"[..]), proptest::prelude::Just(&b"api_key"[..]),
                    proptest::prelude::Just(&b"prompt"[..]), proptest::prelude::Just(&b"\\u0022"[..]),
                    proptest::prelude::Just(&b"\xff"[..]), proptest::prelude::Just(&b" x"[..]),
                ],
                0..40,
            ),
        ) {
            fuzz_redact(&data.concat());
        }
    }
}
