//! `keywatch run` end to end against a real Kafka-protocol broker (tansu)
//! and a real Postgres: what lands in Postgres equals what the detectors
//! compute over the same records, through crashes (SIGKILL) and
//! rebalances; poison records are dead-lettered and the stream goes on.

mod common;

use std::path::Path;
use std::time::Duration;

use common::check::*;
use common::services::*;
use common::*;

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
    verify(&db, &exp, &dir, &broker.addr, "gw");
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
        run.kill9();
    }
    let mut run = start_run(&cfg, &log);
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(600));
    stop_run(&mut run);
    verify(&db, &exp, &dir, &broker.addr, "gw");
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
    verify(&db, &exp, &dir, &broker.addr, "gw");
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
