//! Fault injection with librdkafka's mock cluster (a real Kafka-protocol
//! server inside the test process): the pipeline runs in-process against
//! it and a real Postgres, the broker goes down mid-stream and comes back,
//! and what lands in Postgres still equals the detectors' offline result.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::check::*;
use common::scratch;
use common::services::*;
use detectors::EngineConfig;
use ingest::config::{KafkaConfig, PipelineConfig};
use ingest::kafka::Pipeline;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use storage::Store;

/// A mock cluster holding `lines` on topic `gw` (keyed and placed by
/// user over `partitions`, timed as `message_times` says) and an empty
/// `gw-dlq`.
fn mock_with(
    lines: &[String],
    partitions: i32,
) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("gw", partitions, 1).unwrap();
    mock.create_topic("gw-dlq", 1, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let times = common::services::message_times(lines);
    for (line, &at) in lines.iter().zip(&times) {
        let key = user_of(line);
        let rec = BaseRecord::to("gw")
            .payload(line.as_str())
            .key(key.as_str())
            .partition(partition_of(&key, partitions))
            .timestamp(at);
        producer.send(rec).map_err(|(e, _)| e).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    mock
}

/// A running in-process pipeline on `gw` of `bootstrap`, committing to
/// `db`, with `pipeline`'s batches.
struct Running {
    metrics: Arc<ingest::kafka::PipelineMetrics>,
    stop: Arc<AtomicBool>,
    runner: std::thread::JoinHandle<rdkafka::error::KafkaResult<()>>,
}

fn start_pipeline(
    rt: &tokio::runtime::Runtime,
    bootstrap: &str,
    db: &Database,
    group: &str,
    pipeline: PipelineConfig,
) -> Running {
    let store = rt.block_on(Store::connect(&db.url, 4)).unwrap();
    rt.block_on(store.migrate()).unwrap();
    let kafka = KafkaConfig {
        brokers: bootstrap.to_owned(),
        topics: vec!["gw".into()],
        group_id: group.into(),
        dead_letter_topic: "gw-dlq".into(),
        ..KafkaConfig::default()
    };
    let p = Pipeline::start(
        kafka,
        pipeline,
        EngineConfig::default(),
        detectors::Decoder::new(HASH_KEY.as_bytes()),
        store,
        rt.handle().clone(),
    )
    .unwrap();
    let metrics = p.metrics();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || p.run_until(&stop))
    };
    Running {
        metrics,
        stop,
        runner,
    }
}

impl Running {
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.runner.join().unwrap().unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn broker_down_mid_stream_loses_and_doubles_nothing() {
    let lines = trace(400, 6.0, 55, 1499);
    // librdkafka's mock cluster keeps a bounded log per partition (older
    // records are dropped), so the trace stays small; the tansu tests carry
    // the large ones.
    let partitions = 2;
    let exp = expected(&lines, partitions);
    let mock = mock_with(&lines, partitions);
    let bootstrap = mock.bootstrap_servers();
    let dir = scratch("faults");
    let db = Database::create("faults");
    let rt = runtime();
    let pipeline = PipelineConfig {
        // Small batches: many commits, so the outage lands mid-stream.
        batch_max_records: 200,
        batch_max_ms: 50,
        checkpoint_interval_secs: 1,
        parquet_dir: Some(dir.join("lake")),
        max_record_bytes: common::services::TEST_MAX_RECORD_BYTES,
        ..PipelineConfig::default()
    };
    let run = start_pipeline(&rt, &bootstrap, &db, "kw-faults", pipeline);
    let metrics = Arc::clone(&run.metrics);
    // Let it get going, then take the broker away for a while.
    moved(&metrics.batches, Duration::from_secs(60));
    let read_before = metrics.records.load(Ordering::Relaxed);
    mock.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    mock.broker_up(1).unwrap();
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(120));
    run.stop();
    assert!(
        read_before < lines.len() as u64,
        "the broker went down only after everything was read ({read_before})"
    );
    verify(&db, &exp, &dir, &bootstrap, "gw");
    assert_eq!(metrics.gaps.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.unexpected.load(Ordering::Relaxed), 0);
}

/// Waits until `counter` is above zero, at most `limit`.
fn moved(counter: &std::sync::atomic::AtomicU64, limit: Duration) {
    let started = std::time::Instant::now();
    while counter.load(Ordering::Relaxed) == 0 && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `counter` until it has not moved for `quiet`, at most `limit`.
fn settled(counter: &std::sync::atomic::AtomicU64, quiet: Duration, limit: Duration) -> u64 {
    let started = std::time::Instant::now();
    let mut last = counter.load(Ordering::Relaxed);
    let mut since = std::time::Instant::now();
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// While a batch's Postgres transaction cannot go through, the worker
/// reads and closes the next batch (commit while reading), and no more
/// (one batch in flight: memory stays bounded and a stuck Postgres stops
/// the read); once Postgres lets go, everything lands exactly once.
#[test]
fn a_worker_reads_the_next_batch_while_one_commits_and_no_further() {
    let batch = 500;
    let mut lines = trace(300, 3.0, 91, 0);
    assert!(lines.len() > 10 * batch, "{} records", lines.len());
    // Whole batches only: the last closes on its count too.
    lines.truncate(lines.len() / batch * batch);
    let exp = expected(&lines, 1);
    let mock = mock_with(&lines, 1);
    let bootstrap = mock.bootstrap_servers();
    let dir = scratch("commit-while-reading");
    let db = Database::create("commit_while_reading");
    let rt = runtime();
    let pipeline = PipelineConfig {
        // Batches close on their count only: the read position says how
        // many were handed over.
        batch_max_records: batch,
        batch_max_ms: 600_000,
        checkpoint_interval_secs: 1,
        parquet_dir: Some(dir.join("lake")),
        max_record_bytes: common::services::TEST_MAX_RECORD_BYTES,
        ..PipelineConfig::default()
    };
    // Commits take the partition's offset row (FOR UPDATE, or a first
    // INSERT); an EXCLUSIVE table lock held elsewhere stops every commit,
    // while reads of the table (where a partition resumes) go on.
    let store = rt.block_on(Store::connect(&db.url, 1)).unwrap();
    rt.block_on(store.migrate()).unwrap();
    let mut lock = rt
        .block_on(<sqlx::PgConnection as sqlx::Connection>::connect(&db.url))
        .unwrap();
    rt.block_on(sqlx::query("BEGIN").execute(&mut lock))
        .unwrap();
    rt.block_on(sqlx::query("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE").execute(&mut lock))
        .unwrap();
    let run = start_pipeline(&rt, &bootstrap, &db, "kw-cwr", pipeline);
    let metrics = Arc::clone(&run.metrics);
    moved(&metrics.records, Duration::from_secs(60));
    let read = settled(
        &metrics.records,
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    assert_eq!(metrics.batches.load(Ordering::Relaxed), 0);
    // The first batch is stuck in its transaction, the second was read and
    // closed behind it, and the worker waits for the first before it
    // reads a third.
    assert_eq!(
        read,
        2 * batch as u64,
        "records read while nothing could commit"
    );
    rt.block_on(sqlx::query("ROLLBACK").execute(&mut lock))
        .unwrap();
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(120));
    run.stop();
    verify(&db, &exp, &dir, &bootstrap, "gw");
    assert_eq!(metrics.gaps.load(Ordering::Relaxed), 0);
}
