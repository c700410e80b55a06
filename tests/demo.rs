//! `keywatch demo` as a newcomer runs it: nothing but the binary (no
//! Postgres, no broker), then with a Postgres named by `DATABASE_URL`.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::receivers::http;
use common::services::{free_port, Database};
use serde_json::Value;

fn start(dir: &Path, port: u16, database_url: Option<&str>) -> Child {
    let mut cmd = common::keywatch();
    cmd.args([
        "demo",
        "--users",
        "600",
        "--speed",
        "3000",
        "--duration",
        "30",
        "--quiet",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(dir.join("data"))
    .env_remove("DATABASE_URL")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("demo.log")).unwrap());
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.spawn().unwrap()
}

fn get(port: u16, path: &str) -> Option<Value> {
    let r = http(port, "GET", path, &[], b"").ok()?;
    (r.status == 200).then(|| r.json())
}

/// Polls the page's state until alerts of several kinds and feed actions
/// exist, then waits for the demo to stop on its own and drain.
fn watch(dir: &Path, port: u16, mut child: Child) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen: Option<Value> = None;
    loop {
        if let Some(s) = get(port, "/api/state") {
            let kinds = s["alerts_by_kind"].as_object().map_or(0, |k| k.len());
            if kinds >= 3 && seen.is_none() {
                let feed = get(port, "/v1/revocations?after=0").unwrap();
                assert!(!feed["actions"].as_array().unwrap().is_empty(), "{feed}");
                let list = get(port, "/v1/blocklist").unwrap();
                assert!(list["entries"].is_array());
                let page = http(port, "GET", "/", &[], b"").unwrap();
                assert!(page.text().contains("keywatch demo"));
                let metrics = http(port, "GET", "/metrics", &[], b"").unwrap().text();
                for name in [
                    "keywatch_events_total",
                    "keywatch_events_ahead_total",
                    "keywatch_partitions_stalled_total 0",
                    "keywatch_offset_gaps_total",
                    "keywatch_records_misrouted_total 0",
                ] {
                    assert!(metrics.contains(name), "{name}: {metrics}");
                }
                seen = Some(s);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("demo.log")).unwrap_or_default();
            assert!(
                status.success(),
                "keywatch demo exited with {status}: {log}"
            );
            assert!(log.contains("stopped:"), "{log}");
            return seen.unwrap_or_else(|| panic!("no alerts of 3 kinds while it ran: {log}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keywatch demo did not stop after --duration");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn lake_files(dir: &Path) -> usize {
    let mut n = 0;
    for day in std::fs::read_dir(dir.join("data/lake")).unwrap() {
        for f in std::fs::read_dir(day.unwrap().path()).unwrap() {
            n += f
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "parquet") as usize;
        }
    }
    n
}

#[test]
fn the_demo_runs_with_nothing_installed() {
    let dir = common::scratch("demo-bare");
    let port = free_port();
    let state = watch(&dir, port, start(&dir, port, None));
    assert!(state["consumed"].as_u64().unwrap() > 0);
    assert!(!state["top_spenders"].as_array().unwrap().is_empty());
    assert!(state["rate"].as_array().unwrap().len() > 5);
    assert!(lake_files(&dir) > 0);
}

#[test]
fn the_demo_fills_postgres_when_database_url_is_set() {
    let dir = common::scratch("demo-pg");
    let db = Database::create("demo_pg");
    let port = free_port();
    watch(&dir, port, start(&dir, port, Some(&db.url)));
    let count = |sql: &str| db.query(sql)[0][0].parse::<i64>().unwrap();
    assert!(count("SELECT count(*)::text FROM alerts") > 0);
    assert!(count("SELECT count(*)::text FROM rollup_minute") > 0);
    assert!(count("SELECT count(*)::text FROM revocation_actions") > 0);
    assert!(lake_files(&dir) > 0);
}
