//! What the pipeline tests compare: the detectors run offline over the
//! same records, partition by partition, against what `keywatch run`
//! committed to Postgres, wrote to the lake and dead-lettered.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use detectors::{Decoder, Engine, EngineConfig, Outcome};
use ingest::batch::Rollups;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use sim::{SimConfig, Simulator};
use storage::RollupRow;

use super::services::{partition_of, user_of, Database};

pub const HASH_KEY: &str = "pipeline-test-key";

/// The second stage's alert kinds, as an SQL list.
pub const SECOND_STAGE_KINDS: &str =
    "'prompt_farming', 'key_cycling', 'credential_stuffing', 'key_sharing', 'data_center_share'";

/// Simulated records plus a few poison ones, as lines.
pub fn trace(users: u32, hours: f64, seed: u64, poison_every: usize) -> Vec<String> {
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
        r#"{"ts":"2026-11-23T01:00:00Z","request_id":"p3","user_id":"acct_poison","key_id":"k","api_key":"sk-live-TOPSECRET","cost_usd":-1}"#.to_string(),
        // Counted, but at its message's timestamp + 5 minutes, not in 9999.
        r#"{"ts":"9999-12-31T23:59:59Z","request_id":"p4","user_id":"acct_poison","key_id":"k","prompt_tokens":10,"cost_usd":0.01}"#.to_string(),
        // Valid, but longer than pipeline.max_record_bytes: a dead letter, redacted.
        format!(
            r#"{{"ts":"2026-11-23T01:00:00Z","request_id":"p5","user_id":"acct_poison","key_id":"k","prompt_tokens":1,"prompt":"TOPSECRET {}"}}"#,
            "x".repeat(super::services::TEST_MAX_RECORD_BYTES)
        ),
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
pub struct Expected {
    pub rollups: HashMap<(String, String, i64), RollupRow>,
    pub alert_ids: BTreeSet<String>,
    pub decoded: usize,
    pub poison: usize,
    /// Records counted at their message's timestamp + 5 minutes.
    pub ahead: usize,
    pub ends: HashMap<i32, i64>,
    /// (user, day start) -> (limit, spent) micro-dollars, from the engines' ledgers.
    pub budgets: HashMap<(String, i64), (i64, i64)>,
}

pub fn expected(lines: &[String], partitions: i32) -> Expected {
    let decoder = Decoder::new(HASH_KEY.as_bytes());
    let mut exp = Expected {
        rollups: HashMap::new(),
        alert_ids: BTreeSet::new(),
        decoded: 0,
        poison: 0,
        ahead: 0,
        ends: HashMap::new(),
        budgets: HashMap::new(),
    };
    // The pipeline holds each record's time to its message's timestamp.
    let times = super::services::message_times(lines);
    for p in 0..partitions {
        let mut engine = Engine::new(&EngineConfig::default()).unwrap();
        let mut rollups = Rollups::default();
        let mut alerts = Vec::new();
        let mut n = 0i64;
        for (line, &at) in lines
            .iter()
            .zip(&times)
            .filter(|(l, _)| partition_of(&user_of(l), partitions) == p)
        {
            n += 1;
            if line.len() > super::services::TEST_MAX_RECORD_BYTES {
                exp.poison += 1;
                continue;
            }
            match decoder.decode(line.as_bytes()) {
                Ok(mut ev) => {
                    exp.decoded += 1;
                    if engine.bound_time(&mut ev, at) {
                        exp.ahead += 1;
                    }
                    if let Outcome::Counted { cost_micros } = engine.observe(&ev, &mut alerts) {
                        rollups.add(&ev, cost_micros);
                    }
                }
                Err(_) => exp.poison += 1,
            }
        }
        exp.ends.insert(p, n);
        for (user, state) in &engine.state().users {
            for d in state.ledger.day.iter().filter(|d| d.start_ms != 0) {
                exp.budgets.insert(
                    (user.to_string(), d.start_ms),
                    (d.limit_micros as i64, d.micros as i64),
                );
            }
        }
        Rollups::merge_into(rollups.rows(), &mut exp.rollups);
        exp.alert_ids.extend(alerts.into_iter().map(|a| a.id));
    }
    exp
}

/// Checks Postgres (and the lake and the dead-letter topic) against `exp`.
pub fn verify(db: &Database, exp: &Expected, dir: &Path, bootstrap: &str, topic: &str) {
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
    let rows = db.query(
        "SELECT user_id, (extract(epoch from period_start) * 1000)::bigint::text, limit_micros::text, spent_micros::text \
         FROM budget_periods WHERE period = 'day'",
    );
    let got: HashMap<(String, i64), (i64, i64)> = rows
        .into_iter()
        .map(|r| {
            (
                (r[0].clone(), r[1].parse().unwrap()),
                (r[2].parse().unwrap(), r[3].parse().unwrap()),
            )
        })
        .collect();
    for (k, want) in &exp.budgets {
        // Users whose every record was a duplicate or dead letter have nothing to write.
        if want.1 > 0 {
            assert_eq!(got.get(k), Some(want), "budget period {k:?}");
        }
    }

    // Stage one's alerts (the second stage's are checked by tests/second_stage.rs).
    let ids: BTreeSet<String> = db
        .query(&format!(
            "SELECT id FROM alerts WHERE kind NOT IN ({SECOND_STAGE_KINDS})"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let missing: Vec<_> = exp.alert_ids.difference(&ids).take(5).collect();
    let extra: Vec<_> = ids.difference(&exp.alert_ids).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "alerts differ: missing {missing:?}, extra {extra:?}"
    );
    let outbox = db.query(&format!(
        "SELECT count(*)::text FROM alert_outbox o JOIN alerts a ON a.id = o.alert_id \
         WHERE a.kind NOT IN ({SECOND_STAGE_KINDS})"
    ));
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
        .set("bootstrap.servers", bootstrap)
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

pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
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
