//! The service's log lines: structured through `tracing`, text by default,
//! one JSON object per line with `KEYWATCH_LOG_FORMAT=json`, filtered by
//! `RUST_LOG`; a bad setting is refused at start, naming it.

mod common;

use common::services::Database;

fn migrate(db: &Database, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = common::keywatch();
    cmd.arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env_remove("RUST_LOG")
        .env_remove("KEYWATCH_LOG_FORMAT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn log_lines_are_text_or_json_and_filtered() {
    let db = Database::create("logging");
    let text = migrate(&db, &[]);
    assert!(text.status.success());
    let err = String::from_utf8_lossy(&text.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("schema is up to date"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(" INFO keywatch::run: "), "{line}");

    let json = migrate(&db, &[("KEYWATCH_LOG_FORMAT", "json")]);
    assert!(json.status.success());
    let err = String::from_utf8_lossy(&json.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let up = events
        .iter()
        .find(|e| e["fields"]["message"] == "schema is up to date")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(up["level"], "INFO");
    assert_eq!(up["target"], "keywatch::run");
    assert!(up["timestamp"].as_str().unwrap().ends_with('Z'));

    let quiet = migrate(&db, &[("RUST_LOG", "warn")]);
    assert!(quiet.status.success());
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );

    for (k, v, says) in [
        (
            "KEYWATCH_LOG_FORMAT",
            "xml",
            "KEYWATCH_LOG_FORMAT: expected text or json",
        ),
        ("RUST_LOG", "ingest=loud", "RUST_LOG: "),
    ] {
        let o = migrate(&db, &[(k, v)]);
        assert_eq!(o.status.code(), Some(2), "{k}={v}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{k}={v}: {err}");
    }
}
