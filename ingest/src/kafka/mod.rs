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

use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::{Alert, Decoder, Engine, EngineConfig, EngineState, Outcome};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use storage::{Backend, BatchCommit, BudgetRow, PartitionStart, StorageError};

use crate::batch::{event_row, Rollups, RowOrigin};
use crate::config::{KafkaConfig, PipelineConfig};
pub use crate::telemetry::PipelineMetrics;

use crate::telemetry::{self, Part, PartitionOffsets};

mod decide;
mod rebalance;
mod redact;
mod worker;

use decide::{CommitRange, Seek};
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
        decoder: Decoder,
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
            decoder,
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
        let topics = shared.kafka.topic_names();
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
