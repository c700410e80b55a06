//! The revocation feed as a gateway sees it: a real `keywatch serve` over a
//! real Postgres, spoken to over HTTP.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receivers::{http, HttpResponse};
use common::services::{free_port, start_serve, Database, PgServer};
use serde_json::Value;

const TOKEN: &str = "kwf_test-token-for-the-feed";
const OTHER_TOKEN: &str = "kwf_second-gateway";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config(dir: &Path, db: &Database, port: u16, per_minute: u32) -> std::path::PathBuf {
    config_with(dir, db, port, per_minute, "")
}

/// [`config`] with more `[feed]` settings.
fn config_with(
    dir: &Path,
    db: &Database,
    port: u16,
    per_minute: u32,
    feed: &str,
) -> std::path::PathBuf {
    let p = dir.join("keywatch.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[postgres]
url = "{}"
max_connections = 4

[feed]
listen = "127.0.0.1:{port}"
requests_per_minute = {per_minute}
max_wait_secs = 15
{feed}

[[feed.clients]]
name = "gw-a"
token_sha256 = "{}"

[[feed.clients]]
name = "gw-b"
token_sha256 = "{}"
"#,
            db.url,
            sha256_hex(TOKEN),
            sha256_hex(OTHER_TOKEN)
        ),
    )
    .unwrap();
    p
}

fn get(port: u16, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    http(port, "GET", path, &headers, b"").unwrap()
}

fn keys(config: &Path, args: &[&str]) -> String {
    let o = common::keywatch()
        .arg("keys")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("USER", "tester")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "keys {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn feed_contract() {
    let dir = common::scratch("feed-contract");
    let db = Database::create("feed_contract");
    let port = free_port();
    let cfg = config(&dir, &db, port, 600);
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));

    // Health needs no token; everything else does, with one 401 for every failure.
    assert_eq!(get(port, "/healthz", None, &[]).status, 200);
    let bodies: BTreeSet<String> = [
        get(port, "/v1/revocations", None, &[]),
        get(port, "/v1/revocations", Some("wrong"), &[]),
        get(port, "/v1/blocklist", Some(&TOKEN[..TOKEN.len() - 1]), &[]),
        get(
            port,
            "/v1/blocklist",
            None,
            &[("Authorization", "Basic Zm9vOmJhcg==")],
        ),
    ]
    .into_iter()
    .map(|r| {
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        r.text()
    })
    .collect();
    assert_eq!(bodies.len(), 1, "401 bodies differ: {bodies:?}");

    let empty = get(port, "/v1/revocations", Some(TOKEN), &[]).json();
    assert_eq!(empty, serde_json::json!({"actions": [], "next_after": 0}));
    let bad = get(port, "/v1/revocations?after=-1", Some(TOKEN), &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("after"), "{}", bad.text());

    // Manual actions land in the feed in order, with every contract field.
    keys(
        &cfg,
        &[
            "block",
            "key_1",
            "--user",
            "acct_1",
            "--reason",
            "leaked in a repo",
        ],
    );
    keys(
        &cfg,
        &[
            "block",
            "key_2",
            "--user",
            "acct_1",
            "--reason",
            "trial",
            "--hours",
            "1",
            "--throttle",
        ],
    );
    keys(&cfg, &["block", "--user", "acct_2", "--reason", "fraud"]);
    let page = get(port, "/v1/revocations?after=0", Some(TOKEN), &[]).json();
    let actions = page["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 3);
    let seqs: Vec<i64> = actions.iter().map(|a| a["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(page["next_after"].as_i64(), seqs.last().copied());
    for field in [
        "seq",
        "key_id",
        "user_id",
        "action",
        "reason",
        "alert_id",
        "issued_at",
        "expires_at",
    ] {
        assert!(
            actions[0].get(field).is_some(),
            "action lacks {field}: {}",
            actions[0]
        );
    }
    assert_eq!(actions[0]["action"], "block");
    assert_eq!(actions[1]["action"], "throttle");
    assert!(actions[1]["expires_at"].is_string());
    assert!(
        actions[2]["key_id"].is_null(),
        "a user-level block has key_id null"
    );
    let after_two = get(
        port,
        &format!("/v1/revocations?after={}", seqs[1]),
        Some(TOKEN),
        &[],
    )
    .json();
    assert_eq!(after_two["actions"].as_array().unwrap().len(), 1);

    // Blocklist: ETag, 304, and an unblock (key-level, then user-level) lifts.
    let list = get(port, "/v1/blocklist", Some(TOKEN), &[]);
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["entries"].as_array().unwrap().len(), 3);
    let etag = list.header("etag").unwrap().to_string();
    let same = get(
        port,
        "/v1/blocklist",
        Some(OTHER_TOKEN),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(same.status, 304);
    assert!(same.body.is_empty());
    // A weak validator (as some proxies rewrite it) and a list match too.
    let weak = format!("\"other\", W/{etag}");
    let same = get(
        port,
        "/v1/blocklist",
        Some(TOKEN),
        &[("If-None-Match", &weak)],
    );
    assert_eq!(same.status, 304);
    // Unblocking a key under a user it was not blocked under is refused, so
    // the feed and the blocklist cannot disagree.
    let o = common::keywatch()
        .args(["keys", "--config"])
        .arg(&cfg)
        .args([
            "unblock",
            "key_1",
            "--user",
            "acct_2",
            "--reason",
            "wrong user",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("key_1 is blocked under user acct_1, not acct_2"),
        "{err}"
    );
    keys(
        &cfg,
        &[
            "unblock", "key_1", "--user", "acct_1", "--reason", "rotated",
        ],
    );
    let list = get(
        port,
        "/v1/blocklist",
        Some(TOKEN),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(list.status, 200, "the ETag must change when the list does");
    let left: Vec<Value> = list.json()["entries"].as_array().unwrap().clone();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|e| e["key_id"] != "key_1"));
    keys(&cfg, &["unblock", "--user", "acct_1", "--reason", "paid"]);
    keys(
        &cfg,
        &["unblock", "--user", "acct_2", "--reason", "cleared"],
    );
    assert_eq!(
        get(port, "/v1/blocklist", Some(TOKEN), &[]).json()["entries"],
        serde_json::json!([])
    );
    // An expired block is not on the list (but stays in the feed's history).
    db.query(
        "INSERT INTO revocation_actions (key_id, user_id, action, reason, issued_at, expires_at)
         VALUES ('key_9', 'acct_9', 'block', 'old', now() - interval '2 days', now() - interval '1 day')",
    );
    assert_eq!(
        get(port, "/v1/blocklist", Some(TOKEN), &[]).json()["entries"],
        serde_json::json!([])
    );

    // Long poll: held open, answered as soon as a new action commits.
    let last = get(port, "/v1/revocations?after=0", Some(TOKEN), &[]).json()["next_after"]
        .as_i64()
        .unwrap();
    let started = Instant::now();
    let cfg2 = cfg.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        keys(
            &cfg2,
            &["block", "key_7", "--user", "acct_7", "--reason", "late"],
        );
    });
    let waited = get(
        port,
        &format!("/v1/revocations?after={last}&wait=10"),
        Some(TOKEN),
        &[],
    )
    .json();
    writer.join().unwrap();
    let took = started.elapsed();
    assert_eq!(waited["actions"][0]["key_id"], "key_7", "{waited}");
    assert!(
        took >= Duration::from_millis(600),
        "answered before the action existed: {took:?}"
    );
    // A wait that sees nothing ends empty at its deadline.
    let next = waited["next_after"].as_i64().unwrap();
    let quiet = get(
        port,
        &format!("/v1/revocations?after={next}&wait=1"),
        Some(TOKEN),
        &[],
    )
    .json();
    assert_eq!(
        quiet,
        serde_json::json!({"actions": [], "next_after": next})
    );
    // A cursor past the feed (a restored database) is answered at once with
    // the newest sequence number and a flag, not echoed back; so is the
    // largest cursor a query can hold.
    for ahead in [next + 5, i64::MAX] {
        let started = Instant::now();
        let page = get(
            port,
            &format!("/v1/revocations?after={ahead}&wait=10"),
            Some(TOKEN),
            &[],
        )
        .json();
        assert_eq!(
            page,
            serde_json::json!({"actions": [], "next_after": next, "cursor_ahead": true})
        );
        assert!(started.elapsed() < Duration::from_secs(5), "it waited");
    }

    let metrics = get(port, "/metrics", None, &[]).text();
    assert!(
        metrics.contains("keywatch_feed_requests_total{endpoint=\"revocations\",status=\"401\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE keywatch_deliveries_total")
            || metrics.contains("keywatch_alerts_routed_total")
    );
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let dir = common::scratch("feed-limit");
    let db = Database::create("feed_limit");
    let port = free_port();
    let cfg = config(&dir, &db, port, 10);
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));
    let answers: Vec<HttpResponse> = (0..12)
        .map(|_| get(port, "/v1/revocations", Some(TOKEN), &[]))
        .collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&HttpResponse> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 10, "the bucket holds requests_per_minute");
    assert_eq!(limited.len(), 2);
    let after: u64 = limited[0].header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&after), "Retry-After {after}");
    // Another client has its own bucket.
    assert_eq!(
        get(port, "/v1/revocations", Some(OTHER_TOKEN), &[]).status,
        200
    );
    // Wrong tokens are limited per address: a guesser is slowed down too.
    let guesses: Vec<u16> = (0..12)
        .map(|i| get(port, "/v1/revocations", Some(&format!("guess{i}")), &[]).status)
        .collect();
    assert!(
        guesses.contains(&429) && guesses.contains(&401),
        "{guesses:?}"
    );
}

/// Writers commit out of order (the later sequence number first) while a
/// gateway polls; the gateway's cursor must never step over an action.
#[test]
fn a_cursor_never_skips_an_action_committed_late() {
    let dir = common::scratch("feed-order");
    let db = Database::create("feed_order");
    let port = free_port();
    let cfg = config(&dir, &db, port, 100_000);
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));

    const WRITERS: usize = 6;
    const PER_WRITER: usize = 40;
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = get(
                    port,
                    &format!("/v1/revocations?after={after}&wait=1"),
                    Some(TOKEN),
                    &[],
                )
                .json();
                for a in page["actions"].as_array().unwrap() {
                    seen.push(a["seq"].as_i64().unwrap());
                }
                after = page["next_after"].as_i64().unwrap();
                if finished && page["actions"].as_array().unwrap().is_empty() {
                    return seen;
                }
            }
        })
    };
    let url = db.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(WRITERS as u32)
            .connect(&url)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query(
                        "INSERT INTO revocation_actions (key_id, user_id, action, reason, issued_at)
                         VALUES ($1, $2, 'block', 'order test', now())",
                    )
                    .bind(format!("k{w}-{i}"))
                    .bind(format!("u{w}"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    // Hold the transaction open for a varying while, so commits
                    // would interleave out of sequence order without the feed lock.
                    tokio::time::sleep(Duration::from_millis(((w * 7 + i * 13) % 9) as u64)).await;
                    tx.commit().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    done.store(true, Ordering::Release);
    let seen = poller.join().unwrap();
    let all: Vec<i64> = db
        .query("SELECT seq::text FROM revocation_actions ORDER BY revocation_actions.seq")
        .into_iter()
        .map(|r| r[0].parse().unwrap())
        .collect();
    assert_eq!(all.len(), WRITERS * PER_WRITER);
    assert_eq!(
        seen, all,
        "the poller saw a different sequence than was committed"
    );
}

#[test]
fn token_output_redirected_into_the_config_holds_only_the_hash() {
    // `keywatch token NAME >> keywatch.toml`: standard output is the config
    // lines, the secret goes to the terminal (standard error) only.
    let out = common::keywatch()
        .args(["token", "gateway-eu"])
        .output()
        .expect("keywatch token runs");
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let token = stderr
        .split_whitespace()
        .find(|w| w.starts_with("kwf_"))
        .expect("the token is shown on the terminal");
    assert!(
        !stdout.contains(token),
        "the secret leaked into stdout: {stdout}"
    );
    let parsed: toml::Value = toml::from_str(&stdout).expect("stdout is config");
    let client = &parsed["feed"]["clients"][0];
    assert_eq!(client["name"].as_str(), Some("gateway-eu"));
    assert_eq!(
        client["token_sha256"].as_str(),
        Some(sha256_hex(token).as_str())
    );
}

/// A socket from a chosen loopback address (127.0.0.0/8 is all loopback),
/// so attackers come from addresses other than the gateway's.
fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::from((src, 0)).into())?;
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(s.into())
}

/// The starvation the hostile review found (issue 12): 300 idle sockets
/// under `ulimit -n 256` made the feed and `/healthz` time out. Here a
/// server with 256 descriptors holds hundreds of idle, slow-header and
/// never-reading sockets from 21 addresses, and a gateway must get every
/// answer at its first try; afterwards the server has closed every one of
/// them by a rule and counted it.
#[test]
fn a_gateway_is_served_while_hundreds_of_sockets_are_idle_slow_or_unread() {
    use std::io::{Read, Write};
    let dir = common::scratch("feed-starve");
    let db = Database::create("feed_starve");
    let port = free_port();
    let cfg = config_with(
        &dir,
        &db,
        port,
        100_000,
        "header_timeout_secs = 2\nwrite_timeout_secs = 2\nmax_connections_per_address = 16",
    );
    let log = dir.join("serve.log");
    let _serve = common::services::start_serve_with_fd_limit(&cfg, &log, port, 256);
    let attacker = |i: usize| [127, 0, 0, 2 + (i % 20) as u8];

    // 300 idle sockets: 15 from each of 20 addresses, and 40 more from the gateway's own.
    let mut idle = Vec::new();
    for i in 0..300 {
        idle.push(connect_from(attacker(i), port).expect("idle connect"));
    }
    for _ in 0..40 {
        idle.push(connect_from([127, 0, 0, 1], port).expect("idle connect"));
    }
    // 40 slow headers: a byte every 200 ms, never finishing.
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for i in 0..40 {
        let mut s = connect_from(attacker(i), port).unwrap();
        let stop = Arc::clone(&stop);
        slow.push(std::thread::spawn(move || {
            let _ = s.write_all(b"GET /v1/revocations HTTP/1.1\r\nHost: x\r\n");
            let mut cut = false;
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(b"X").is_err() {
                    cut = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // Cut by the server, or at least never answered.
            let mut buf = [0u8; 1];
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            cut || matches!(s.read(&mut buf), Ok(0) | Err(_))
        }));
    }
    // 20 clients that ask for thousands of pages and read none of them.
    let mut unread = Vec::new();
    for i in 0..20u8 {
        let mut s = connect_from([127, 0, 1, i], port).unwrap();
        unread.push(std::thread::spawn(move || {
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            for _ in 0..3000 {
                if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .is_err()
                {
                    break;
                }
            }
            s
        }));
    }
    std::thread::sleep(Duration::from_millis(300));

    // The gateway, from 127.0.0.1, polls and long-polls through it all.
    let started = Instant::now();
    let mut polls = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let auth = format!("Bearer {TOKEN}");
        let r = common::receivers::http_timeout(
            port,
            "GET",
            "/v1/revocations?after=0",
            &[("Authorization", &auth)],
            b"",
            Duration::from_secs(5),
        )
        .expect("the gateway's poll was not answered");
        assert_eq!(r.status, 200, "{}", r.text());
        let h = common::receivers::http_timeout(
            port,
            "GET",
            "/healthz",
            &[],
            b"",
            Duration::from_secs(5),
        )
        .expect("/healthz was not answered");
        assert_eq!(h.status, 200);
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let auth = format!("Bearer {TOKEN}");
    let long = common::receivers::http_timeout(
        port,
        "GET",
        "/v1/revocations?after=0&wait=3",
        &[("Authorization", &auth)],
        b"",
        Duration::from_secs(10),
    )
    .expect("the long poll was not answered");
    assert_eq!(long.status, 200);
    assert!(polls >= 10, "only {polls} polls in 4 s");

    // Every idle socket has been closed by the server: evicted for a newer
    // one or timed out waiting for its request head.
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("idle socket {i} still open: {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        assert!(
            t.join().unwrap(),
            "a slow-header socket was answered or kept"
        );
    }
    for t in unread {
        drop(t.join().unwrap());
    }
    let metrics = get(port, "/metrics", None, &[]).text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
    };
    assert_eq!(
        value("keywatch_feed_connections_max "),
        128.0,
        "256 descriptors leave room for 128 connections"
    );
    for reason in [
        "header_timeout",
        "write_timeout",
        "evicted_per_address",
        "evicted_max_connections",
    ] {
        let n = value(&format!(
            "keywatch_feed_connections_closed_total{{reason=\"{reason}\"}}"
        ));
        assert!(n > 0.0, "no connection closed for {reason}:\n{metrics}");
    }
    assert_eq!(
        value("keywatch_feed_connections_closed_total{reason=\"refused_all_authenticated\"}"),
        0.0
    );
}

/// Issue 12 (outages): the feed's Postgres server stops at once (every
/// connection cut, new ones refused) and starts again. `/healthz` says so
/// while it is down, polls get `503` rather than hanging, and afterwards a
/// gateway's long poll hears of a new block again (the feed's LISTEN
/// connection was re-made).
#[test]
fn the_feed_rides_out_a_postgres_restart() {
    let dir = common::scratch("feed-outage");
    let server = PgServer::start(&dir.join("postgres"));
    let db = Database::create_at(server.admin_url.clone(), "feed_outage");
    let port = free_port();
    let cfg = config(&dir, &db, port, 100_000);
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));
    let status = |path: &str| {
        common::receivers::http_timeout(
            port,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            b"",
            Duration::from_secs(15),
        )
        .map(|r| r.status)
        .unwrap_or(0)
    };
    let wait_for = |path: &str, want: u16, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while status(path) != want {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("/healthz", 200, "healthy at start");
    server.down();
    wait_for("/healthz", 503, "/healthz did not report the outage");
    assert_eq!(
        status("/v1/revocations?after=0"),
        503,
        "a poll during the outage"
    );
    server.up();
    wait_for("/healthz", 200, "not healthy after the outage");
    wait_for(
        "/v1/revocations?after=0",
        200,
        "polls not answered after the outage",
    );
    // A long poll waiting now hears of a block committed after the outage.
    let waiting = std::thread::spawn(move || {
        common::receivers::http_timeout(
            port,
            "GET",
            "/v1/revocations?after=0&wait=15",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            b"",
            Duration::from_secs(30),
        )
        .unwrap()
        .json()
    });
    std::thread::sleep(Duration::from_millis(300));
    keys(
        &cfg,
        &[
            "block",
            "key_after",
            "--user",
            "acct_after",
            "--reason",
            "after the outage",
        ],
    );
    let page = waiting.join().unwrap();
    assert_eq!(page["actions"][0]["key_id"], "key_after", "{page}");
}

/// Issue 15: an address action (the second stage's credential stuffing)
/// reaches the feed with its address, no key and no account, and the
/// blocklist lists it; a key's alert that carries an address as context
/// (a leaked key) stays a key action.
#[test]
fn an_address_block_reaches_the_feed_with_its_address_and_no_account() {
    use detectors::{Action, Alert, AlertKind, Severity};
    use storage::{BatchCommit, Store};
    let dir = common::scratch("feed-address");
    let db = Database::create("feed_address");
    let port = free_port();
    let cfg = config(&dir, &db, port, 600);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async {
        let s = Store::connect(&db.url, 2).await.unwrap();
        s.migrate().await.unwrap();
        s
    });
    let ts = 4_102_444_800_000; // 2100-01-01: the blocks have not lapsed yet.
    let base = |kind, subject: &str| Alert {
        id: Alert::make_id(kind, subject, "m1"),
        kind,
        severity: Severity::Critical,
        action: Action::Block,
        user_id: "kh_guess_1".into(),
        key_id: None,
        ip: None,
        ts,
        observed: None,
        baseline: None,
        threshold: None,
        budget: None,
        expires_at: Some(ts + 86_400_000),
        tier: None,
        reason: format!("{} test", kind.as_str()),
    };
    let stuffing = Alert {
        ip: Some("45.79.1.2".into()),
        ..base(AlertKind::CredentialStuffing, "ip:45.79.1.2")
    };
    let leaked = Alert {
        user_id: "acct_9".into(),
        key_id: Some("key_9".into()),
        ip: Some("203.0.113.9".into()),
        expires_at: None,
        ..base(AlertKind::LeakedKey, "key:key_9")
    };
    let alerts = [stuffing, leaked];
    let batch = BatchCommit {
        topic: "keywatch.by-subject",
        partition: 0,
        start_offset: 0,
        next_offset: 1,
        rollups: &[],
        flush: true,
        rollups_from: None,
        alerts: &alerts,
        checkpoint: None,
        budgets: &[],
        addresses: &[],
        sources: &[],
    };
    rt.block_on(store.commit_batch(&batch)).unwrap();
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));
    let page = get(port, "/v1/revocations?after=0", Some(TOKEN), &[]).json();
    let actions = page["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 2, "{page}");
    let address = actions
        .iter()
        .find(|a| a["ip"].is_string())
        .expect("an address action");
    assert_eq!(address["ip"], "45.79.1.2");
    assert_eq!(address["user_id"], "", "an address action names no account");
    assert!(address["key_id"].is_null());
    assert_eq!(address["action"], "block");
    assert!(address["expires_at"].is_string());
    let key = actions
        .iter()
        .find(|a| a["key_id"] == "key_9")
        .expect("the key's block");
    assert!(
        key.get("ip").is_none(),
        "a key's action carries no address: {key}"
    );
    assert_eq!(key["user_id"], "acct_9");
    let list = get(port, "/v1/blocklist", Some(TOKEN), &[]).json();
    let ips: Vec<&Value> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("ip"))
        .collect();
    assert_eq!(ips, vec![&Value::from("45.79.1.2")]);

    // An operator blocks and lifts addresses by hand too.
    let listed = keys(&cfg, &["list"]);
    assert!(listed.contains("(address 45.79.1.2)"), "{listed}");
    keys(
        &cfg,
        &[
            "block",
            "--ip",
            "198.51.100.7",
            "--hours",
            "2",
            "--reason",
            "scraper",
        ],
    );
    keys(
        &cfg,
        &["unblock", "--ip", "45.79.1.2", "--reason", "a shared proxy"],
    );
    let list = get(port, "/v1/blocklist", Some(TOKEN), &[]).json();
    let ips: Vec<&Value> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("ip"))
        .collect();
    assert_eq!(ips, vec![&Value::from("198.51.100.7")]);
    let page = get(port, "/v1/revocations?after=0", Some(TOKEN), &[]).json();
    let last = page["actions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["action"].as_str(),
            last["ip"].as_str(),
            last["user_id"].as_str()
        ),
        (Some("unblock"), Some("45.79.1.2"), Some(""))
    );
}
