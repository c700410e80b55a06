//! `keywatch replay` end to end: the real binary over real files.

mod common;

use common::*;
use std::collections::BTreeSet;

const GOOD: &str = r#"{"ts":"2026-11-23T10:15:02.481Z","request_id":"req_1","user_id":"acct_42","key_id":"key_7f3a","tier":"free","model":"gpt-4o","prompt_tokens":812,"completion_tokens":233,"cost_usd":0.6}"#;

#[test]
fn bad_lines_are_reported_with_line_numbers_and_skipped() {
    let dir = scratch("bad-lines");
    let input = dir.join("mixed.ndjson");
    let lines = [
        GOOD.to_string(),
        "not json".to_string(),
        GOOD.replace("req_1", "req_2")
            .replace("\"prompt_tokens\":812", "\"prompt_tokens\":-3"),
        String::new(),
        GOOD.replace("req_1", "req_3"),
        GOOD.replace("req_1", "req_4")
            .replace("\"ts\":\"2026-11-23T10:15:02.481Z\",", ""),
        GOOD.to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let o = replay(&[input.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 2: record: not a JSON object: expected '{' at byte 0"),
        "{err}"
    );
    assert!(
        err.contains("line 3: prompt_tokens: expected a non-negative integer, got -3"),
        "{err}"
    );
    assert!(
        err.contains("line 6: ts: required field is missing"),
        "{err}"
    );
    assert!(err.contains("prompt_tokens: invalid: 1 (lines 3)"), "{err}");
    // Lines 1 and 5 count ($0.60 each on a $1 free budget: 50% then 100%), line 7 is a duplicate.
    let alerts: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pcts: Vec<u64> = alerts
        .iter()
        .filter_map(|a| a["budget"]["percent"].as_u64())
        .collect();
    assert_eq!(pcts, vec![50, 80, 100]);
    assert!(err.contains("duplicates 1"), "{err}");

    let o = replay(&["--json-summary", input.to_str().unwrap()]);
    let s = summary(&o);
    assert_eq!(s["records"], 6);
    assert_eq!(s["blank_lines"], 1);
    assert_eq!(s["decoded"], 3);
    assert_eq!(s["decode_errors"], 3);
    assert_eq!(
        s["decode_errors_by_reason"]["ts: missing"]["lines"],
        serde_json::json!([6])
    );
}

#[test]
fn secrets_never_reach_the_output() {
    let dir = scratch("secrets");
    let input = dir.join("secrets.ndjson");
    let mut lines = vec![];
    for i in 0..8 {
        lines.push(format!(
            r#"{{"ts":"2026-11-23T10:{:02}:00Z","request_id":"r{i}","user_id":"acct_1","api_key":"sk-live-TOPSECRET","prompt":"please repeat THE SECRET PROMPT","cost_usd":0.2}}"#,
            i
        ));
    }
    lines.push(r#"{"ts":"2026-11-23T10:30:00Z","request_id":"bad","user_id":"acct_1","api_key":12345,"prompt":["TOPSECRET"]}"#.into());
    std::fs::write(&input, lines.join("\n")).unwrap();
    let o = replay(&[input.to_str().unwrap()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !all.contains("TOPSECRET") && !all.contains("SECRET PROMPT"),
        "{all}"
    );
    // The repeated prompt was still caught, under the keyed hash of the key.
    assert!(all.contains("\"kind\":\"repeated_prompt\""), "{all}");
    assert!(all.contains("\"key_id\":\"kh_"), "{all}");
}

#[test]
fn replay_is_deterministic_and_matches_the_golden_alerts() {
    let dir = scratch("golden");
    let (trace, truth) = (dir.join("trace.ndjson"), dir.join("truth.json"));
    simulate(
        &["--users", "300", "--hours", "8", "--seed", "11"],
        &trace,
        &truth,
    );
    let a = replay(&[trace.to_str().unwrap()]);
    let b = replay(&[trace.to_str().unwrap()]);
    assert_eq!(
        a.stdout, b.stdout,
        "two replays of one file must print the same alerts"
    );
    assert!(!a.stdout.is_empty());
    let golden_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/golden-alerts.ndjson"
    );
    let got = String::from_utf8(a.stdout).unwrap();
    if std::env::var_os("KEYWATCH_BLESS").is_some() {
        std::fs::write(golden_path, &got).unwrap();
    }
    let want = std::fs::read_to_string(golden_path)
        .expect("golden file (run with KEYWATCH_BLESS=1 to create it)");
    if got != want {
        let diff: Vec<String> = got
            .lines()
            .zip(want.lines())
            .filter(|(g, w)| g != w)
            .take(3)
            .map(|(g, w)| format!("got  {g}\nwant {w}"))
            .collect();
        panic!(
            "alerts differ from tests/data/golden-alerts.ndjson ({} vs {} lines); if the change is intended, rerun with KEYWATCH_BLESS=1 and review the diff:\n{}",
            got.lines().count(),
            want.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn decode_only_decodes_the_same_records() {
    let dir = scratch("decode-only");
    let (trace, truth) = (dir.join("trace.ndjson"), dir.join("truth.json"));
    simulate(
        &["--users", "100", "--hours", "2", "--seed", "5"],
        &trace,
        &truth,
    );
    let full = summary(&replay(&["--json-summary", trace.to_str().unwrap()]));
    let dec = summary(&replay(&[
        "--json-summary",
        "--decode-only",
        trace.to_str().unwrap(),
    ]));
    assert_eq!(full["records"], dec["records"]);
    assert_eq!(
        dec["decoded"], dec["records"],
        "the simulator writes only valid records"
    );
    assert_eq!(dec["alerts"], 0);
    assert!(dec.get("engine").is_none());
}

#[test]
fn stdin_and_config_errors() {
    let dir = scratch("stdin");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[engine.request_spike]\nburst_factr = 3.0\n").unwrap();
    let o = keywatch()
        .args(["replay", "--config", cfg.to_str().unwrap(), "-"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown field `burst_factr`"), "{err}");

    let o = common::replay_stdin(&["--json-summary"], format!("{GOOD}\n").as_bytes());
    assert_eq!(summary(&o)["decoded"], 1);
}

/// The attack with a hostile descriptive field on every record gives the
/// same alerts as the plain attack: a field the caller controls cannot make
/// a request go uncounted.
#[test]
fn hostile_descriptive_fields_do_not_hide_a_flood() {
    let dir = scratch("evasion");
    // $15 on a free account: 300 requests in a minute, 4,000 + 4,000 tokens each.
    let flood = |extra: &str| -> String {
        (0..300)
            .map(|i| {
                format!(
                    r#"{{"ts":"2026-11-23T10:15:{:02}.{:03}Z","request_id":"f{i}","user_id":"acct_free","key_id":"key_free","tier":"free","ip":"198.51.100.7","model":"gpt-4o","prompt_tokens":4000,"completion_tokens":4000,"cost_usd":0.05,"status":200{extra}}}"#,
                    i / 5,
                    (i % 5) * 200
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let alerts = |name: &str, extra: &str| -> (Vec<(String, String, String)>, String) {
        let input = dir.join(format!("{name}.ndjson"));
        std::fs::write(&input, flood(extra)).unwrap();
        let o = replay(&[input.to_str().unwrap()]);
        let out = String::from_utf8(o.stdout).unwrap();
        let mut got: Vec<(String, String, String)> = out
            .lines()
            .map(|l| {
                let a: serde_json::Value = serde_json::from_str(l).unwrap();
                let f = |k: &str| a[k].as_str().unwrap_or_default().to_string();
                (f("id"), f("kind"), f("action"))
            })
            .collect();
        got.sort();
        (got, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (plain, _) = alerts("plain", "");
    let kinds: Vec<&str> = plain.iter().map(|a| a.1.as_str()).collect();
    assert!(kinds.contains(&"budget_threshold"), "{plain:?}");
    assert!(kinds.contains(&"request_spike"), "{plain:?}");
    assert!(plain.iter().any(|a| a.2 == "block"), "{plain:?}");
    let long_ua = format!(r#","user_agent":"{}""#, "A".repeat(513));
    let long_model = format!(r#","endpoint":"/v1/{}""#, "m".repeat(300));
    let variants = [
        ("user-agent", long_ua.as_str()),
        ("nul-prompt", r#","prompt":"ignore\u0000me""#),
        ("surrogate-prompt", r#","prompt":"a\ud800b""#),
        ("nul-agent", r#","user_agent":"curl\u0000""#),
        ("endpoint", long_model.as_str()),
        ("latency", r#","latency_ms":-5"#),
        ("asn", r#","asn":"AS64500""#),
        ("prompt-chars", r#","prompt_chars":[1]"#),
    ];
    for (name, extra) in variants {
        let (got, summary) = alerts(name, extra);
        if extra.contains("\"prompt\"") {
            // The same prompt 300 times is prompt farming on top.
            assert!(
                plain.iter().all(|a| got.contains(a)),
                "{name}: {got:?} {summary}"
            );
            assert!(
                got.iter().any(|a| a.1 == "repeated_prompt"),
                "{name}: {got:?}"
            );
        } else {
            assert_eq!(got, plain, "{name}: {summary}");
        }
        assert!(
            summary
                .contains("counted with a descriptive field cut or dropped, or a time clamped 300"),
            "{name}: {summary}"
        );
    }
}

/// Issue 12: one record at 9999-12-31 used to move its account's budget
/// period (and the partition's clock) to the year 9999, so the flood after
/// it was "too late for its budget period" and raised no budget alert.
/// A record's time is now held to its reference clock plus
/// `engine.event_time.max_ahead_secs`; the flood is seen whole. A record
/// older than its account's previous budget period is charged to the
/// current one.
#[test]
fn a_far_future_record_cannot_move_the_clock() {
    let dir = common::scratch("replay-future");
    let record = |ts: &str, id: &str| {
        format!(
            r#"{{"ts":"{ts}","request_id":"{id}","user_id":"acct_free","key_id":"key_free","tier":"free","ip":"198.51.100.7","model":"gpt-4o","prompt_tokens":4000,"completion_tokens":4000,"cost_usd":0.05,"status":200}}"#
        )
    };
    let mut lines = vec![
        record("2026-11-23T10:14:00Z", "warm"),
        record("9999-12-31T23:59:59Z", "poison"),
        // Past 2106 a time no longer fits 32-bit seconds.
        record("2200-01-01T00:00:00Z", "poison2"),
    ];
    for i in 0..300 {
        lines.push(record(
            &format!("2026-11-23T10:15:{:02}.{:03}Z", i / 5, (i % 5) * 200),
            &format!("f{i}"),
        ));
    }
    let input = dir.join("future.ndjson");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let run = |now: &str| {
        let o = replay(&["--json-summary", "--now", now, input.to_str().unwrap()]);
        let kinds: Vec<String> = String::from_utf8(o.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| {
                let a: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {}",
                    a["kind"].as_str().unwrap(),
                    a["action"].as_str().unwrap()
                )
            })
            .collect();
        (kinds, common::summary(&o))
    };
    let (kinds, s) = run("2026-11-23T10:14:30Z");
    assert_eq!(s["engine"]["ahead"], 2, "{s}");
    assert_eq!(
        s["engine"]["late"], 0,
        "no record is too late for its period: {s}"
    );
    assert_eq!(s["decoded"], 303);
    assert_eq!(s["repaired_by_field"]["ts"]["count"], 2, "{s}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.starts_with("budget_threshold"))
            .count(),
        3,
        "50, 80 and 100% of the daily budget: {kinds:?}"
    );
    assert!(
        kinds.contains(&"budget_threshold block".to_string()),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k.starts_with("request_spike")),
        "{kinds:?}"
    );
    // A reference a week later (the wall clock, replaying history) still
    // bounds the year 9999, but the poison then lands a week after the
    // flood, which is too late for its own period (`--now` is for
    // history). Late spend is charged to the current period, so the
    // flood still crosses the budget, once per percent.
    let (later_kinds, later) = run("2026-11-30T00:00:00Z");
    assert_eq!(later["engine"]["ahead"], 2);
    assert_eq!(later["engine"]["late"], 300, "{later}");
    assert_eq!(
        later_kinds
            .iter()
            .filter(|k| k.starts_with("budget_threshold"))
            .count(),
        3,
        "late spend still crosses 50, 80 and 100%: {later_kinds:?}"
    );
}

/// Issue 12: a record's size is capped (`pipeline.max_record_bytes`); a
/// longer line is a dead letter naming its size, read from a pipe in one
/// pass and never held, and the same from a file.
#[test]
fn an_over_long_line_is_a_dead_letter_from_a_file_and_from_a_pipe() {
    let dir = common::scratch("replay-oversize");
    let cfg = dir.join("keywatch.toml");
    std::fs::write(&cfg, "[pipeline]\nmax_record_bytes = 2048\n").unwrap();
    let ok = |id: &str| {
        format!(
            r#"{{"ts":"2026-11-23T10:00:00Z","request_id":"{id}","user_id":"u","key_id":"k","prompt_tokens":5}}"#
        )
    };
    let long = format!(
        r#"{{"ts":"2026-11-23T10:00:00Z","request_id":"big","user_id":"u","key_id":"k","prompt":"{}"}}"#,
        "x".repeat(5000)
    );
    let text = format!("{}\n{long}\n{}\n", ok("a"), ok("b"));
    let input = dir.join("in.ndjson");
    std::fs::write(&input, &text).unwrap();
    let from_file = replay(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json-summary",
        input.to_str().unwrap(),
    ]);
    let from_pipe = common::replay_stdin(
        &["--config", cfg.to_str().unwrap(), "--json-summary"],
        text.as_bytes(),
    );
    for o in [&from_file, &from_pipe] {
        let s = common::summary(o);
        assert_eq!(s["records"], 3, "{s}");
        assert_eq!(s["decoded"], 2, "{s}");
        assert_eq!(
            s["decode_errors_by_reason"]["record: too_long"]["lines"][0], 2,
            "{s}"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("line 2: record: 5087 bytes, more than pipeline.max_record_bytes (2048)"),
            "{err}"
        );
    }
    // Out of range: the error names the field.
    std::fs::write(&cfg, "[pipeline]\nmax_record_bytes = 10\n").unwrap();
    let o = common::keywatch()
        .args([
            "replay",
            "--config",
            cfg.to_str().unwrap(),
            input.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pipeline.max_record_bytes: must be from 1024"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Issue 12: text from traffic in the summary is escaped, so a model name
/// cannot forge a summary line or drive the terminal.
#[test]
fn the_summary_escapes_text_from_traffic() {
    let dir = common::scratch("replay-escape");
    let input = dir.join("in.ndjson");
    std::fs::write(
        &input,
        r#"{"ts":"2026-11-23T10:00:00Z","request_id":"a","user_id":"u","key_id":"k","model":"evil\n  alerts 0\u001b[2J","prompt_tokens":5}"#,
    )
    .unwrap();
    let o = replay(&[input.to_str().unwrap()]);
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(!err.contains('\u{1b}'), "{err:?}");
    assert!(err.contains(r"evil\n  alerts 0\u{1b}[2J 1"), "{err}");
    assert_eq!(
        err.lines().filter(|l| *l == "  alerts 0").count(),
        1,
        "only the real line: {err}"
    );
}

/// Issue 12: an evasion test for every detector at once. The simulator
/// injects at least one attack of each kind; every record of the trace is
/// given hostile descriptive fields (a negative latency, a wrongly typed
/// `prompt_chars`, an over-long endpoint, and a second, hostile copy of
/// `model`, `user_agent`, `status` and `ip` after the real ones). Every
/// record must still be counted, and the alerts must be exactly the plain
/// trace's, id for id.
#[test]
fn hostile_fields_change_no_alert_of_any_detector() {
    let dir = common::scratch("replay-evasion");
    let (plain, truth) = (dir.join("plain.ndjson"), dir.join("truth.json"));
    simulate(
        &["--users", "300", "--hours", "12", "--seed", "77"],
        &plain,
        &truth,
    );
    let endpoint = format!(r#","endpoint":"/v1/{}""#, "e".repeat(300));
    let text = std::fs::read_to_string(&plain).unwrap();
    let mut hostile = String::with_capacity(text.len() * 2);
    for line in text.lines() {
        let body = line.trim_end().strip_suffix('}').expect("a JSON object");
        hostile.push_str(body);
        hostile.push_str(r#","latency_ms":-5,"prompt_chars":[1]"#);
        hostile.push_str(&endpoint);
        for (field, evil) in [
            ("model", r#""gpt-4o-mini""#),
            ("user_agent", r#""evil\u0000agent""#),
            ("status", r#""success""#),
            ("ip", r#""10.66.66.66""#),
        ] {
            // Only as a second copy: the first stands.
            if line.contains(&format!("\"{field}\":")) {
                hostile.push_str(&format!(r#","{field}":{evil}"#));
            }
        }
        hostile.push_str("}\n");
    }
    let evil = dir.join("hostile.ndjson");
    std::fs::write(&evil, hostile).unwrap();
    let run = |p: &std::path::Path| {
        let o = replay(&["--json-summary", p.to_str().unwrap()]);
        let mut alerts: Vec<String> = String::from_utf8(o.stdout.clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        alerts.sort();
        (alerts, common::summary(&o))
    };
    let (want, ps) = run(&plain);
    let (got, hs) = run(&evil);
    let kinds: BTreeSet<String> = want
        .iter()
        .map(|a| serde_json::from_str::<serde_json::Value>(a).unwrap()["kind"].to_string())
        .collect();
    for k in [
        "request_spike",
        "token_spike",
        "repeated_prompt",
        "leaked_key",
        "budget_threshold",
    ] {
        assert!(
            kinds.contains(&format!("\"{k}\"")),
            "no {k} in the plain trace: {kinds:?}"
        );
    }
    assert_eq!(hs["decoded"], ps["decoded"], "every record counted");
    assert_eq!(hs["decode_errors"], ps["decode_errors"]);
    assert_eq!(hs["repaired"], hs["decoded"], "every record flagged");
    assert!(
        got == want,
        "{} alerts plain, {} hostile",
        want.len(),
        got.len()
    );
}

#[test]
fn arrays_split_and_auto_names_every_format_it_saw() {
    let dir = scratch("arrays-auto");
    let input = dir.join("mixed.ndjson");
    let kong = |id: &str, user: &str, tokens: &str| {
        format!(
            r#"{{"request":{{"id":"{id}","uri":"/v1/chat/completions?apikey=sk-q","headers":{{"apikey":"sk-live-SECRET","user-agent":"curl"}}}},"response":{{"status":200}},"latencies":{{"request":120}},"client_ip":"198.51.100.7","started_at":1795428902000,"consumer":{{"username":"{user}"}},"ai":{{"proxy":{{"usage":{{"prompt_tokens":{tokens},"completion_tokens":5}},"meta":{{"response_model":"gpt-4o"}}}}}}}}"#
        )
    };
    let lines = [
        format!(
            "[{}, {}, {}]",
            kong("k1", "acct_7", "100"),
            kong("k2", "acct_7", "-1"),
            kong("k3", "acct_8", "50")
        ),
        GOOD.to_string(),
        "[]".to_string(),
        r#"{"hello":"world"}"#.to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let path = input.to_str().unwrap();
    let o = replay(&["--format", "auto", path]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "line 1 element 1: kong: ai.*.usage.prompt_tokens: expected a non-negative integer, got -1"
        ),
        "{err}"
    );
    assert!(
        err.contains("line 4: record: expected a record of a known format"),
        "{err}"
    );
    assert!(
        err.contains("format auto: read as canonical 1, kong 2"),
        "{err}"
    );
    assert!(!err.contains("sk-live-SECRET"), "{err}");
    let s = summary(&replay(&["--format", "auto", "--json-summary", path]));
    assert_eq!(
        s["records"], 5,
        "three elements, one canonical line, one unknown"
    );
    assert_eq!(
        (s["decoded"].as_u64(), s["decode_errors"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(
        (s["array_lines"].as_u64(), s["array_records"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(s["formats"]["kong"], 2);
    assert_eq!(s["formats"]["canonical"], 1);
    // Read as canonical, the Kong records are what they are to that contract.
    let s = summary(&replay(&["--format", "canonical", "--json-summary", path]));
    assert_eq!(
        (s["decoded"].as_u64(), s["decode_errors"].as_u64()),
        (Some(1), Some(4))
    );
    let o = keywatch()
        .args(["replay", "--format", "kongg", path])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown format \"kongg\""));
}
