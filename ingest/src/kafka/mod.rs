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
//! **Two stages.** Stage one reads the gateway's topics (keyed by
//! account) and, with `kafka.subjects.enabled`, writes every counted
//! record's projection to the internal topic `kafka.subjects.topic`,
//! routed by subject (address, network, key, prompt), as a batch's frames
//! acknowledged before the batch commits. Stage two is a second consumer
//! group on that topic ([`Pipeline::start_subjects`]), with the same
//! workers, fenced commits and checkpoints; its engine drops projections it
//! has already taken (by source offset), so a crash on either side loses
//! and doubles nothing (`detectors::subject::merge`).
//!
//! **Threads, not tasks.** librdkafka calls the rebalance callback on the
//! thread that polls the consumer; doing the work there (loading offsets,
//! draining revoked partitions) needs blocking calls into Postgres, which
//! is simplest and safest from plain threads driving a tokio runtime by
//! handle. Each worker reads its own partition queue
//! (`split_partition_queue`, split off before the partition is assigned so
//! no record ever reaches the main queue) and holds one batch; a closed
//! batch goes to the partition's committer thread, which writes it while
//! the worker reads the next. One batch in flight at most: a worker waits
//! for it to land before it hands over the next, and that is the
//! backpressure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::subject::{AddressRollups, FrameHeader, FrameWriter, Seq};
use detectors::{
    Alert, Checkpoint, Decoder, Engine, EngineConfig, EngineState, Outcome, SubjectEngine,
    SubjectState,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use storage::{
    AddressRow, Backend, BatchCommit, BudgetRow, CheckpointWrite, LakeRows, RollupFlush, RowOrigin,
    SourceRow, StorageError,
};

use crate::batch::Rollups;
use crate::config::{KafkaConfig, PipelineConfig};
pub use crate::telemetry::PipelineMetrics;

use crate::telemetry::{self, Part, PartitionOffsets};

mod committer;
mod decide;
mod rebalance;
mod redact;
mod worker;

use committer::{Closed, Committer, Held, HeldLanding, HeldRows, Landing, Stored};
use decide::{CommitRange, Place, Seek};
use rebalance::*;
use redact::OVERSIZE_KEPT;
pub use redact::{fuzz_redact, redact};
use worker::*;

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

/// Which stage a pipeline is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Gateway records, keyed by account.
    Gateway,
    /// Projections, keyed by subject.
    Subjects,
}

/// Where stage one writes projections.
struct SubjectsOut {
    topic: String,
    partitions: u32,
}

/// Everything a partition worker needs, shared.
struct Shared {
    stage: Stage,
    /// Stage one with the second stage on: its internal topic.
    subjects_out: Option<SubjectsOut>,
    /// Partitions of each topic this pipeline reads (from the broker's metadata).
    topic_partitions: Mutex<HashMap<String, u32>>,
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

/// A handle on a running pipeline.
pub struct Pipeline {
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<PipelineContext>>,
}

impl Pipeline {
    /// Stage one: creates the consumer of the gateway's topics and the
    /// dead-letter (and projection) producer, and subscribes. With
    /// `kafka.subjects.enabled`, the internal topic is created if missing.
    pub fn start(
        kafka: KafkaConfig,
        pipeline: PipelineConfig,
        engine: EngineConfig,
        decoder: Decoder,
        store: impl Into<Backend>,
        rt: tokio::runtime::Handle,
    ) -> Result<Pipeline, PipelineError> {
        Self::start_stage(
            Stage::Gateway,
            kafka,
            pipeline,
            engine,
            decoder,
            store.into(),
            rt,
        )
    }

    /// Stage two: a consumer group of its own (`kafka.subjects.group_id`)
    /// on the internal topic, judging addresses, networks, keys and prompts
    /// across every partition of stage one. Its batches commit like stage
    /// one's (no lake).
    pub fn start_subjects(
        kafka: KafkaConfig,
        pipeline: PipelineConfig,
        engine: EngineConfig,
        store: impl Into<Backend>,
        rt: tokio::runtime::Handle,
    ) -> Result<Pipeline, PipelineError> {
        // Stage two reads frames, not gateway records: its decoder is never used.
        let decoder = Decoder::new(b"unused by the second stage");
        Self::start_stage(
            Stage::Subjects,
            kafka,
            pipeline,
            engine,
            decoder,
            store.into(),
            rt,
        )
    }

    fn start_stage(
        stage: Stage,
        kafka: KafkaConfig,
        pipeline: PipelineConfig,
        engine: EngineConfig,
        decoder: Decoder,
        store: Backend,
        rt: tokio::runtime::Handle,
    ) -> Result<Pipeline, PipelineError> {
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
        let subjects_out = match stage {
            Stage::Gateway if kafka.subjects.enabled => Some(SubjectsOut {
                topic: kafka.subjects.topic.clone(),
                partitions: ensure_topic(&common, &kafka.subjects, &rt)?,
            }),
            _ => None,
        };
        let metrics = PipelineMetrics {
            stage: match stage {
                Stage::Gateway => "gateway",
                Stage::Subjects => "subjects",
            },
            ..PipelineMetrics::default()
        };
        let shared = Arc::new(Shared {
            stage,
            subjects_out,
            topic_partitions: Mutex::new(HashMap::new()),
            decoder,
            kafka,
            pipeline,
            engine,
            store,
            rt,
            producer,
            metrics: Arc::new(metrics),
            consumer: OnceLock::new(),
            workers: Mutex::new(HashMap::new()),
        });
        let group = match stage {
            Stage::Gateway => shared.kafka.group_id.clone(),
            Stage::Subjects => shared.kafka.subjects_group(),
        };
        let mut c = common;
        c.set("group.id", &group)
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
            let id = match stage {
                Stage::Gateway => id.clone(),
                Stage::Subjects => format!("{id}.subjects"),
            };
            c.set("group.instance.id", &id);
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
        let topics = match stage {
            Stage::Gateway => shared.kafka.topic_names(),
            Stage::Subjects => vec![shared.kafka.subjects.topic.as_str()],
        };
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

    /// Which stage this pipeline is: `gateway` or `subjects`.
    pub fn stage(&self) -> &'static str {
        self.shared.metrics.stage
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

/// Creates the second stage's topic when it is missing; returns how many
/// partitions it has.
fn ensure_topic(
    common: &ClientConfig,
    cfg: &crate::config::SubjectsTopicConfig,
    rt: &tokio::runtime::Handle,
) -> Result<u32, PipelineError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        common.create().map_err(|source| PipelineError::Kafka {
            what: "creating the admin client for the second stage's topic",
            source,
        })?;
    let partitions =
        |admin: &AdminClient<DefaultClientContext>| partition_count(admin.inner(), &cfg.topic);
    if let Ok(n @ 1..) = partitions(&admin) {
        return Ok(n);
    }
    let topic = NewTopic::new(
        &cfg.topic,
        cfg.partitions,
        TopicReplication::Fixed(cfg.replication),
    );
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .operation_timeout(Some(Duration::from_secs(10)));
    // Another instance may create it at the same moment: TopicAlreadyExists is fine.
    let _ = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(15),
            admin.create_topics([&topic], &opts),
        )
        .await
    });
    let mut last = None;
    for _ in 0..50 {
        match partitions(&admin) {
            Ok(n @ 1..) => return Ok(n),
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(PipelineError::Kafka {
        what: "creating or reading the second stage's topic (kafka.subjects.topic)",
        source: last.unwrap_or(KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        )),
    })
}

/// How many partitions `topic` has, from the broker's metadata (0: the
/// broker does not know it, or reports an error for it).
fn partition_count<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> KafkaResult<u32> {
    client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map(|md| {
            md.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len() as u32)
        })
}

impl Shared {
    /// How many partitions `topic` has, from the broker's metadata (0 when
    /// it cannot be read now).
    fn partitions_of(&self, topic: &str) -> u32 {
        if let Some(&n) = self
            .topic_partitions
            .lock()
            .expect("partitions lock")
            .get(topic)
        {
            return n;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return 0;
        };
        let n = partition_count(consumer.client(), topic).unwrap_or(0);
        if n > 0 {
            self.topic_partitions
                .lock()
                .expect("partitions lock")
                .insert(topic.to_owned(), n);
        }
        n
    }

    /// Writes frames to their stage-two partitions (in order, so a
    /// partition's frames keep the source's order) and waits for every
    /// acknowledgement; false if any failed (the caller
    /// writes them all again: a repeat is dropped by the second stage).
    fn send_frames(&self, frames: &[(u32, Vec<u8>)]) -> bool {
        let Some(out) = &self.subjects_out else {
            return true;
        };
        let mut pending = Vec::with_capacity(frames.len());
        for (p, f) in frames {
            let rec: FutureRecord<'_, (), [u8]> =
                FutureRecord::to(&out.topic).partition(*p as i32).payload(f);
            pending.push(self.producer.send_result(rec).map_err(|(e, _)| e));
        }
        let mut ok = true;
        for p in pending {
            ok &= match p {
                Ok(fut) => matches!(self.rt.block_on(fut), Ok(Ok(_))),
                Err(_) => false,
            };
        }
        ok
    }
}
