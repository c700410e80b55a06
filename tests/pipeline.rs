//! `keywatch run` end to end against a real Kafka-protocol broker (tansu)
//! and a real Postgres: what lands in Postgres equals what the detectors
//! compute over the same records, through crashes (SIGKILL) and
//! rebalances; poison records are dead-lettered and the stream goes on.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::services::*;
use common::*;
use detectors::{Decoder, Engine, EngineConfig, Outcome};
use ingest::batch::Rollups;
use ingest::simulate::{SimConfig, Simulator};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use storage::RollupRow;

const HASH_KEY: &str = "pipeline-test-key";

/// Simulated records plus a few poison ones, as lines.
fn trace(users: u32, hours: f64, seed: u64, poison_every: usize) -> Vec<String> {
    let mut sim = Simulator::new(SimConfig {
        users,
        hours,
        seed,
        ..SimConfig::default()
    });
    let mut buf = String::new();
    let mut lines = Vec::new();
    let poison = [
        "this is not json".to_string(),
        r#"{"ts":"2026-11-23T01:00:00Z","request_id":"p1","user_id":"acct_poison","key_id":"k","prompt_tokens":"many"}"#.to_string(),
        format!(r#"{{"ts":"2026-11-23T01:00:00Z","request_id":"p2","user_id":"acct_poison","key_id":"{}"}}"#, "k".repeat(100_000)),
        r#"{"ts":"2026-11-23T01:00:00Z","request_id":"p3","user_id":"acct_poison","key_id":"k","api_key":"sk-live-TOPSECRET","status":99}"#.to_string(),
    ];
    while sim.next_record(&mut buf).is_some() {
        lines.push(buf.trim_end().to_string());
        buf.clear();
        if poison_every > 0 && lines.len() % poison_every == 0 {
            lines.push(poison[(lines.len() / poison_every) % poison.len()].clone());
        }
    }
    lines
}

/// What the detectors compute over the same records, partition by partition.
struct Expected {
    rollups: HashMap<(String, String, i64), RollupRow>,
    alert_ids: BTreeSet<String>,
    decoded: usize,
    poison: usize,
    ends: HashMap<i32, i64>,
}

fn expected(lines: &[String], partitions: i32) -> Expected {
    let decoder = Decoder::new(HASH_KEY.as_bytes());
    let mut exp = Expected {
        rollups: HashMap::new(),
        alert_ids: BTreeSet::new(),
        decoded: 0,
        poison: 0,
        ends: HashMap::new(),
    };
    for p in 0..partitions {
        let mut engine = Engine::new(&EngineConfig::default()).unwrap();
        let mut rollups = Rollups::default();
        let mut alerts = Vec::new();
        let mut n = 0i64;
        for line in lines
            .iter()
            .filter(|l| partition_of(&user_of(l), partitions) == p)
        {
            n += 1;
            match decoder.decode(line.as_bytes()) {
                Ok(ev) => {
                    exp.decoded += 1;
                    if let Outcome::Counted { cost_micros } = engine.observe(&ev, &mut alerts) {
                        rollups.add(&ev, cost_micros);
                    }
                }
                Err(_) => exp.poison += 1,
            }
        }
        exp.ends.insert(p, n);
        Rollups::merge_into(rollups.rows(), &mut exp.rollups);
        exp.alert_ids.extend(alerts.into_iter().map(|a| a.id));
    }
    exp
}

/// Checks Postgres (and the lake and the dead-letter topic) against `exp`.
fn verify(db: &Database, exp: &Expected, dir: &Path, broker: &Broker, topic: &str) {
    let rows = db.query(
        "SELECT user_id, key_id, (extract(epoch from minute) * 1000)::bigint::text, requests::text, prompt_tokens::text, \
         completion_tokens::text, cost_micros::text, errors::text, latency_sum_ms::text, latency_max_ms::text FROM rollup_minute",
    );
    let got: HashMap<(String, String, i64), RollupRow> = rows
        .into_iter()
        .map(|r| {
            let n = |i: usize| r[i].parse::<i64>().unwrap();
            let row = RollupRow {
                user_id: r[0].clone(),
                key_id: r[1].clone(),
                minute_ms: n(2),
                requests: n(3),
                prompt_tokens: n(4),
                completion_tokens: n(5),
                cost_micros: n(6),
                errors: n(7),
                latency_sum_ms: n(8),
                latency_max_ms: n(9),
            };
            (
                (row.user_id.clone(), row.key_id.clone(), row.minute_ms),
                row,
            )
        })
        .collect();
    assert_eq!(got.len(), exp.rollups.len(), "rollup groups");
    for (k, want) in &exp.rollups {
        assert_eq!(got.get(k), Some(want), "rollup {k:?}");
    }
    let ids: BTreeSet<String> = db
        .query("SELECT id FROM alerts")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let missing: Vec<_> = exp.alert_ids.difference(&ids).take(5).collect();
    let extra: Vec<_> = ids.difference(&exp.alert_ids).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "alerts differ: missing {missing:?}, extra {extra:?}"
    );
    let outbox = db.query("SELECT count(*)::text FROM alert_outbox");
    assert_eq!(
        outbox[0][0].parse::<usize>().unwrap(),
        exp.alert_ids.len(),
        "one outbox row per alert"
    );

    // The lake: every decoded record exactly once, whatever was rewritten.
    let mut offsets = BTreeSet::new();
    let mut rows = 0usize;
    for path in walk(&dir.join("lake")) {
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows();
            let partition: i64 = path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .split('-')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let col = batch
                .column_by_name("kafka_offset")
                .expect("kafka_offset column");
            let col = col
                .as_any()
                .downcast_ref::<arrow_array::Int64Array>()
                .expect("offset is Int64");
            for o in col.values() {
                assert!(
                    offsets.insert((partition, *o)),
                    "offset {o} of partition {partition} is in the lake twice"
                );
            }
        }
    }
    assert_eq!(
        rows, exp.decoded,
        "Parquet rows (decoded records, each once)"
    );

    // The dead-letter topic: every poison record, with its origin and error.
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "dlq-check")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{topic}-dlq")]).unwrap();
    let mut dead = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead < exp.poison && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let h = m.headers().expect("dead letters carry headers");
            let names: Vec<&str> = h.iter().map(|h| h.key).collect();
            for want in [
                "keywatch.origin.topic",
                "keywatch.origin.partition",
                "keywatch.origin.offset",
                "keywatch.error",
            ] {
                assert!(names.contains(&want), "{want} missing: {names:?}");
            }
            let payload = m.payload().unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(payload).contains("TOPSECRET"),
                "a raw key reached the dead-letter topic"
            );
            dead += 1;
        }
    }
    assert!(dead >= exp.poison, "dead letters: {dead} of {}", exp.poison);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

fn setup(
    name: &str,
    partitions: i32,
    lines: &[String],
) -> (Broker, Database, std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    let broker = Broker::start(&dir.join("tansu.log"));
    broker.create_topic("gw", partitions);
    broker.create_topic("gw-dlq", 1);
    broker.produce("gw", partitions, lines);
    let db = Database::create(name);
    // A killed consumer's membership lapses after the session timeout; keep
    // it short so restarts do not wait for ghosts.
    let extra = format!(
        "[privacy]\nhash_key = \"{HASH_KEY}\"\n[kafka.settings]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n"
    );
    let cfg = run_config(&dir, &broker, "gw", &db, &extra);
    (broker, db, dir, cfg)
}

#[test]
fn end_to_end_matches_the_detectors_and_dead_letters_poison() {
    let lines = trace(300, 6.0, 21, 997);
    let exp = expected(&lines, 2);
    assert!(exp.poison >= 4 && !exp.alert_ids.is_empty());
    let (broker, db, dir, cfg) = setup("e2e", 2, &lines);
    let mut run = start_run(&cfg, &dir.join("run.log"));
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(300));
    stop_run(&mut run);
    verify(&db, &exp, &dir, &broker, "gw");
}

#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let lines = trace(5000, 24.0, 33, 4001);
    assert!(lines.len() >= 200_000, "{} records", lines.len());
    let exp = expected(&lines, 2);
    let (broker, db, dir, cfg) = setup("crash", 2, &lines);
    let log = dir.join("run.log");
    // Deterministic "random" moments: 0.3-2.0 s of running between kills.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..5 {
        let mut run = start_run(&cfg, &log);
        eprintln!("started run {}", run.id());
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(300 + x % 1700));
        kill9(&mut run);
    }
    let mut run = start_run(&cfg, &log);
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(600));
    stop_run(&mut run);
    verify(&db, &exp, &dir, &broker, "gw");
}

#[test]
fn two_consumers_in_one_group_split_and_hand_over_partitions() {
    let lines = trace(5000, 24.0, 44, 0);
    let exp = expected(&lines, 4);
    let (broker, db, dir, cfg) = setup("rebalance", 4, &lines);
    let (a_log, b_log) = (dir.join("a.log"), dir.join("b.log"));
    let mut a = start_run(&cfg, &a_log);
    std::thread::sleep(Duration::from_millis(300));
    let mut b = start_run(&cfg, &b_log);
    std::thread::sleep(Duration::from_millis(2500));
    // A leaves mid-stream: its partitions are drained, committed and handed to B.
    stop_run(&mut a);
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(300));
    stop_run(&mut b);
    verify(&db, &exp, &dir, &broker, "gw");
    let (ra, rb) = (records_read(&a_log), records_read(&b_log));
    assert!(
        ra > 0 && rb > 0,
        "both consumers worked: A read {ra}, B read {rb}"
    );
    assert!(
        ra + rb > lines.len() as u64 / 2,
        "A {ra} + B {rb} of {}",
        lines.len()
    );
}

/// The record count a `keywatch run` reported when it stopped.
fn records_read(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("stopped after"))
        .expect("a stop line");
    line.split("stopped after ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
