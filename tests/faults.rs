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

#[test]
fn broker_down_mid_stream_loses_and_doubles_nothing() {
    let lines = trace(400, 6.0, 55, 1499);
    // librdkafka's mock cluster keeps a bounded log per partition (older
    // records are dropped), so the trace stays small; the tansu tests carry
    // the large ones.
    let partitions = 2;
    let exp = expected(&lines, partitions);
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("gw", partitions, 1).unwrap();
    mock.create_topic("gw-dlq", 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let times = common::services::message_times(&lines);
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

    let dir = scratch("faults");
    let db = Database::create("faults");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Store::connect(&db.url, 4)).unwrap();
    rt.block_on(store.migrate()).unwrap();
    let kafka = KafkaConfig {
        brokers: bootstrap.clone(),
        topics: vec!["gw".into()],
        group_id: "kw-faults".into(),
        dead_letter_topic: "gw-dlq".into(),
        ..KafkaConfig::default()
    };
    let pipeline = PipelineConfig {
        // Small batches: many commits, so the outage lands mid-stream.
        batch_max_records: 200,
        batch_max_ms: 50,
        checkpoint_interval_secs: 1,
        parquet_dir: Some(dir.join("lake")),
        max_record_bytes: common::services::TEST_MAX_RECORD_BYTES,
        ..PipelineConfig::default()
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
    // Let it get going, then take the broker away for a while.
    let started = std::time::Instant::now();
    while metrics.batches.load(Ordering::Relaxed) == 0
        && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let read_before = metrics.records.load(Ordering::Relaxed);
    mock.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    mock.broker_up(1).unwrap();
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(120));
    stop.store(true, Ordering::Release);
    runner.join().unwrap().unwrap();
    assert!(
        read_before < lines.len() as u64,
        "the broker went down only after everything was read ({read_before})"
    );
    verify(&db, &exp, &dir, &bootstrap, "gw");
    assert_eq!(metrics.gaps.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.unexpected.load(Ordering::Relaxed), 0);
}
