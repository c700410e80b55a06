//! The HTTP intake (`POST /v1/logs`) as a gateway without a Kafka sink sees
//! it: a real `keywatch run` or `keywatch serve` producing to a real broker
//! (tansu), read back from the topic.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::receivers::{http, HttpResponse};
use common::services::{free_port, start_serve, wait_committed, Broker, Database, Running};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};

const TOKEN: &str = "kwi_the-intake-token-for-tests";
const FEED_TOKEN: &str = "kwf_a-gateway-polling-the-feed";
const PARTITIONS: i32 = 2;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A broker with the intake topic `gw` (two partitions) and its dead-letter topic.
fn broker(dir: &Path, persistent: bool) -> Broker {
    let log = dir.join("tansu.log");
    let b = if persistent {
        Broker::start_persistent(&dir.join("tansu"), &log)
    } else {
        Broker::start(&log)
    };
    b.create_topic("gw", PARTITIONS);
    b.create_topic("gw-dlq", 1);
    b
}

/// A config with the intake on `port`; `intake` adds `[intake]` settings.
/// The token comes from a file, the way a secret is mounted.
fn config(dir: &Path, broker: &Broker, db: &Database, port: u16, intake: &str) -> PathBuf {
    let token_file = dir.join("intake-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let p = dir.join("keywatch.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[kafka]
brokers = "{}"
topics = ["gw"]
format = "auto"
group_id = "kw-intake"
dead_letter_topic = "gw-dlq"

[pipeline]
batch_max_ms = 100
checkpoint_interval_secs = 2
parquet_dir = "{}"

[postgres]
url = "{}"
max_connections = 4

[feed]
listen = "127.0.0.1:{port}"

[[feed.clients]]
name = "gw-feed"
token_sha256 = "{}"

[intake]
enabled = true
token_file = "{}"
{intake}
"#,
            broker.addr,
            dir.join("lake").display(),
            db.url,
            sha256_hex(FEED_TOKEN),
            token_file.display(),
        ),
    )
    .unwrap();
    p
}

fn post(port: u16, token: Option<&str>, body: &[u8], extra: &[(&str, &str)]) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    http(port, "POST", "/v1/logs", &headers, body).unwrap()
}

fn metrics(port: u16) -> String {
    http(port, "GET", "/metrics", &[], b"").unwrap().text()
}

/// The value of the sample `line` (a metric name with its labels) on the page.
fn sample(page: &str, line: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

/// A message of the topic.
#[derive(Clone, Debug)]
struct Msg {
    partition: i32,
    offset: i64,
    key: Option<String>,
    payload: String,
}

/// Every message of `topic` up to its end, read from the start.
fn read_topic(bootstrap: &str, topic: &str, partitions: i32) -> Vec<Msg> {
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("intake-check-{}", free_port()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(30))
            .unwrap();
        ends.insert(p, high);
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    let mut out = Vec::new();
    consumer.assign(&tpl).unwrap();
    let mut next: HashMap<i32, i64> = ends.keys().map(|&p| (p, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Up to the watermarks, then on until nothing more comes for a while:
    // a broker's watermark can trail what it acknowledged (seen with
    // tansu under load), and a record past it must still be seen, once.
    let mut idle_since = Instant::now();
    loop {
        let reached = next.iter().all(|(p, n)| *n >= ends[p]);
        if reached && idle_since.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: read up to {next:?} of {ends:?}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            idle_since = Instant::now();
            next.insert(m.partition(), m.offset() + 1);
            out.push(Msg {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                payload: String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap(),
            });
        }
    }
    out
}

/// The topic's end offsets, as `wait_committed` takes them.
fn ends(msgs: &[Msg]) -> HashMap<i32, i64> {
    let mut e = HashMap::new();
    for m in msgs {
        let end = e.entry(m.partition).or_insert(0);
        *end = (*end).max(m.offset + 1);
    }
    e
}

fn now_s() -> f64 {
    detectors::time::wall_clock_ms() as f64 / 1000.0
}

/// A canonical record, one line.
fn canonical(id: &str, user: &str) -> String {
    let ts = detectors::time::format_rfc3339(detectors::time::wall_clock_ms());
    json!({"ts": ts, "request_id": id, "user_id": user, "key_id": format!("key-{user}"),
           "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.001})
    .to_string()
}

/// A LiteLLM StandardLoggingPayload, as its generic_api callback posts it.
fn litellm(id: &str, user: &str) -> Value {
    let t = now_s();
    json!({
        "id": id, "litellm_call_id": format!("call-{id}"), "call_type": "acompletion",
        "stream": false, "response_cost": 0.00042, "status": "success",
        "custom_llm_provider": "openai", "total_tokens": 60, "prompt_tokens": 45,
        "completion_tokens": 15, "startTime": t - 1.25, "endTime": t,
        "model": "gpt-4o-mini-2024-07-18", "model_group": "gpt-4o-mini",
        "metadata": {
            "user_api_key_hash": sha256_hex(&format!("sk-{user}")),
            "user_api_key_alias": "ci-bot", "user_api_key_user_id": user,
            "user_api_key_team_id": "team-a", "user_api_key_org_id": null,
            "user_agent": "OpenAI/Python 1.54.0"
        },
        "cache_hit": false, "end_user": "", "requester_ip_address": "203.0.113.50",
        "messages": [{"role": "user", "content": "Say hi"}], "response": {"choices": []},
        "hidden_params": {"litellm_model_name": "gpt-4o-mini"}
    })
}

/// The user a record decodes to, as the pipeline reads it (`auto`).
fn user_of(record: &str) -> String {
    let dec = detectors::Decoder::new(b"any key");
    let (ev, _) = dec
        .decode_as(
            detectors::decode::Format::Auto,
            record.as_bytes(),
            &detectors::decode::Origin::NOWHERE,
        )
        .unwrap_or_else(|e| panic!("the test's record does not decode ({e}): {record}"));
    ev.user_id.into_owned()
}

/// Starts `keywatch run` and waits until its feed listener answers.
fn start_run(config: &Path, log: &Path, port: u16) -> Running {
    let err = std::fs::File::create(log).unwrap();
    let child = common::keywatch()
        .args(["run", "--progress-secs", "0", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut run = Running(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            run.is_running(),
            "keywatch run exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "keywatch run did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run
}

/// NDJSON (canonical, with blank lines, CRLF and a broken line) and a
/// pretty-printed JSON array and a single object (LiteLLM): every record
/// lands once, unchanged, keyed by its user, a user's records in one
/// partition; the undecodable one without a key, dead-lettered by the
/// pipeline; and `keywatch run` counts the rest.
#[test]
fn posted_records_land_once_each_unchanged_and_keyed_by_their_user() {
    let dir = common::scratch("intake-land");
    let broker = broker(&dir, false);
    let db = Database::create("intake_land");
    let port = free_port();
    let cfg = config(&dir, &broker, &db, port, "");
    let _run = start_run(&cfg, &dir.join("run.log"), port);

    let lines: Vec<String> = (0..6)
        .map(|i| canonical(&format!("c-{i}"), &format!("acct-{}", i % 3)))
        .collect();
    let ndjson = format!(
        "{}\r\n\r\n{}\n  \n{}\n{}\nnot a record\n{}\n{}",
        lines[0], lines[1], lines[2], lines[3], lines[4], lines[5]
    );
    let r = post(port, Some(TOKEN), ndjson.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"accepted": 7, "undecodable": 1, "topic": "gw"})
    );

    let batch: Vec<Value> = (0..4)
        .map(|i| litellm(&format!("chatcmpl-{i}"), &format!("acct-{}", i % 2)))
        .collect();
    for (i, v) in batch.iter().enumerate() {
        assert_eq!(user_of(&v.to_string()), format!("acct-{}", i % 2));
    }
    let array = serde_json::to_string_pretty(&batch).unwrap();
    let r = post(port, Some(TOKEN), array.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"accepted": 4, "undecodable": 0, "topic": "gw"})
    );
    let single = serde_json::to_string_pretty(&litellm("chatcmpl-single", "acct-9")).unwrap();
    let r = post(port, Some(TOKEN), single.as_bytes(), &[]);
    assert_eq!(
        (r.status, r.json()["accepted"].clone()),
        (200, json!(1)),
        "{}",
        r.text()
    );

    // A body far larger than the listener's read buffer (16 KiB).
    let bulk: Vec<String> = (0..4000)
        .map(|i| canonical(&format!("bulk-{i}"), &format!("acct-{}", i % 3)))
        .collect();
    let body = bulk.join("\n");
    assert!(body.len() > 500_000);
    let r = post(port, Some(TOKEN), body.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], json!(4000));

    let msgs = read_topic(&broker.addr, "gw", PARTITIONS);
    assert_eq!(msgs.len(), 12 + 4000);
    // NDJSON lines go as they were posted, byte for byte; array elements
    // are the bytes of the element in the body.
    let mut want: Vec<(String, Option<String>)> = lines
        .iter()
        .map(|l| (l.clone(), Some(user_of(l))))
        .collect();
    want.push(("not a record".into(), None));
    want.extend(bulk.iter().map(|l| (l.clone(), Some(user_of(l)))));
    for (i, v) in batch.iter().enumerate() {
        let got = msgs
            .iter()
            .find(|m| serde_json::from_str::<Value>(&m.payload).ok().as_ref() == Some(v))
            .unwrap_or_else(|| panic!("LiteLLM record {i} is not on the topic"));
        assert!(
            array.contains(&got.payload),
            "not the posted bytes: {}",
            got.payload
        );
        want.push((got.payload.clone(), Some(format!("acct-{}", i % 2))));
    }
    want.push((single.clone(), Some("acct-9".into())));
    let mut got: Vec<(String, Option<String>)> = msgs
        .iter()
        .map(|m| (m.payload.clone(), m.key.clone()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each record once, keyed by its user");
    let mut partition_of: BTreeMap<&str, i32> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.key.is_some()) {
        let p = *partition_of
            .entry(m.key.as_deref().unwrap())
            .or_insert(m.partition);
        assert_eq!(p, m.partition, "{:?} is in two partitions", m.key);
    }

    // The pipeline reads them as any Kafka record: counted per user, the
    // broken line dead-lettered.
    wait_committed(&db, "gw", &ends(&msgs), Duration::from_secs(120));
    let counted: BTreeMap<String, i64> = db
        .query("SELECT user_id, sum(requests)::text FROM rollup_minute GROUP BY user_id")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .collect();
    let expected: BTreeMap<String, i64> = [
        ("acct-0", 2 + 2 + 1334),
        ("acct-1", 2 + 2 + 1333),
        ("acct-2", 2 + 1333),
        ("acct-9", 1),
    ]
    .into_iter()
    .map(|(u, n)| (u.to_string(), n))
    .collect();
    assert_eq!(counted, expected);
    let dead = read_topic(&broker.addr, "gw-dlq", 1);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].payload, "not a record");

    let page = metrics(port);
    assert_eq!(
        sample(
            &page,
            "keywatch_intake_requests_total{outcome=\"accepted\"}"
        ),
        Some(4.0),
        "{page}"
    );
    assert_eq!(sample(&page, "keywatch_intake_records_total"), Some(4012.0));
    assert_eq!(
        sample(&page, "keywatch_intake_records_undecodable_total"),
        Some(1.0)
    );
    // Pipeline metrics are still there beside the intake's.
    assert!(page.contains("keywatch_events_total"), "{page}");
}

/// Sends raw request bytes and reads the answer's status and headers
/// (tolerating a server that closes once it has answered).
fn raw(port: u16, request: &[u8], pause_after_head: bool) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head_end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    s.write_all(&request[..head_end]).unwrap();
    if !pause_after_head {
        let _ = s.write_all(&request[head_end..]);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    (status, text)
}

/// What the intake refuses, it refuses before producing: a missing, wrong
/// or feed token (401), a compressed body (415), a body over
/// `max_body_bytes` by its length or as it is read (413), a body that does
/// not arrive (408), and a request past `max_concurrent_requests` (503 +
/// Retry-After). The feed on the same listener keeps its own tokens.
#[test]
fn the_intake_refuses_before_producing_anything() {
    let dir = common::scratch("intake-refuse");
    let broker = broker(&dir, false);
    let db = Database::create("intake_refuse");
    let port = free_port();
    let cfg = config(
        &dir,
        &broker,
        &db,
        port,
        "max_body_bytes = 4096\nmax_concurrent_requests = 1\nbody_timeout_secs = 3\n",
    );
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));
    let refused = canonical("refused", "acct-x");

    let answers = [
        post(port, None, refused.as_bytes(), &[]),
        post(
            port,
            Some("kwi_not-the-intake-token"),
            refused.as_bytes(),
            &[],
        ),
        post(
            port,
            Some(&TOKEN[..TOKEN.len() - 1]),
            refused.as_bytes(),
            &[],
        ),
        post(port, Some(FEED_TOKEN), refused.as_bytes(), &[]),
        post(
            port,
            None,
            refused.as_bytes(),
            &[("Authorization", "Basic a2V5OndhdGNo")],
        ),
    ];
    for r in &answers {
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.json(), json!({"error": "unauthorized"}));
    }
    // The feed and the intake do not take each other's tokens.
    let auth = |t: &str| format!("Bearer {t}");
    let feed = http(
        port,
        "GET",
        "/v1/blocklist",
        &[("Authorization", &auth(FEED_TOKEN))],
        b"",
    )
    .unwrap();
    assert_eq!(feed.status, 200, "{}", feed.text());
    let feed = http(
        port,
        "GET",
        "/v1/blocklist",
        &[("Authorization", &auth(TOKEN))],
        b"",
    )
    .unwrap();
    assert_eq!(feed.status, 401);

    let r = post(
        port,
        Some(TOKEN),
        refused.as_bytes(),
        &[("Content-Encoding", "gzip")],
    );
    assert_eq!(r.status, 415, "{}", r.text());

    let head = |extra: &str| {
        format!(
            "POST /v1/logs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n{extra}\r\n"
        )
    };
    // Too long by its Content-Length: answered before a byte of the body is sent.
    let (status, text) = raw(port, head("Content-Length: 100000\r\n").as_bytes(), true);
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains("intake.max_body_bytes (4096 bytes)"),
        "{text}"
    );
    // Too long as it is read: a chunked body with no length.
    let big = format!("{}\n", refused).repeat(6000 / refused.len() + 1);
    let chunked = format!(
        "{}{:x}\r\n{big}\r\n0\r\n\r\n",
        head("Transfer-Encoding: chunked\r\n"),
        big.len()
    );
    let (status, text) = raw(port, chunked.as_bytes(), false);
    assert_eq!(status, 413, "{text}");

    // A body that never arrives holds its slot until body_timeout_secs;
    // meanwhile another request finds no slot.
    let holder = std::thread::spawn(move || {
        raw(
            port,
            format!("{}{{\"partial\"", head("Content-Length: 1000\r\n")).as_bytes(),
            false,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(&metrics(port), "keywatch_intake_requests_in_flight") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the holding request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = post(port, Some(TOKEN), refused.as_bytes(), &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let (status, text) = holder.join().unwrap();
    assert_eq!(status, 408, "{text}");

    // Nothing of it was produced; a good request after it is.
    let ok = canonical("accepted", "acct-ok");
    let r = post(port, Some(TOKEN), ok.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let msgs = read_topic(&broker.addr, "gw", PARTITIONS);
    let payloads: Vec<&str> = msgs.iter().map(|m| m.payload.as_str()).collect();
    assert_eq!(payloads, [ok.as_str()]);
    assert_eq!(msgs[0].key.as_deref(), Some("acct-ok"));

    let page = metrics(port);
    for (outcome, n) in [
        ("unauthorized", 5.0),
        ("unsupported_encoding", 1.0),
        ("too_large", 2.0),
        ("busy", 1.0),
        ("body_incomplete", 1.0),
        ("accepted", 1.0),
    ] {
        assert_eq!(
            sample(
                &page,
                &format!("keywatch_intake_requests_total{{outcome=\"{outcome}\"}}")
            ),
            Some(n),
            "{outcome}: {page}"
        );
    }
}

/// Past `max_requests_per_second` (over all callers) a request gets 429
/// with Retry-After, and what it carried is not produced.
#[test]
fn past_the_rate_a_request_gets_429_and_produces_nothing() {
    let dir = common::scratch("intake-rate");
    let broker = broker(&dir, false);
    let db = Database::create("intake_rate");
    let port = free_port();
    let cfg = config(&dir, &broker, &db, port, "max_requests_per_second = 1\n");
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));

    let mut answered = BTreeMap::new();
    let mut limited = 0;
    for i in 0..10 {
        let line = canonical(&format!("rate-{i}"), "acct-rate");
        let r = post(port, Some(TOKEN), line.as_bytes(), &[]);
        match r.status {
            200 => {
                answered.insert(line, ());
            }
            429 => {
                limited += 1;
                let secs: u64 = r
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers));
                assert!(secs >= 1, "{secs}");
            }
            s => panic!("{s}: {}", r.text()),
        }
    }
    assert!(
        limited > 0,
        "ten requests in a row at one a second, none limited"
    );
    assert!(!answered.is_empty());
    let produced: BTreeMap<String, ()> = read_topic(&broker.addr, "gw", PARTITIONS)
        .into_iter()
        .map(|m| (m.payload, ()))
        .collect();
    assert_eq!(produced, answered, "exactly the records of the 200s");
    let page = metrics(port);
    assert_eq!(
        sample(
            &page,
            "keywatch_intake_requests_total{outcome=\"rate_limited\"}"
        ),
        Some(limited as f64)
    );
}

/// With the broker down a request waits at most `produce_timeout_ms` and
/// gets 503 with Retry-After; once the broker is back, the retried request
/// lands, and the records acknowledged before the outage are there once.
#[test]
fn broker_down_gives_503_and_the_retry_lands_with_nothing_lost() {
    let dir = common::scratch("intake-down");
    let mut broker = broker(&dir, true);
    let db = Database::create("intake_down");
    let port = free_port();
    let cfg = config(&dir, &broker, &db, port, "produce_timeout_ms = 2000\n");
    let _serve = start_serve(&cfg, &dir.join("serve.log"), Some(port));

    let before: Vec<String> = (0..5)
        .map(|i| canonical(&format!("before-{i}"), &format!("acct-{i}")))
        .collect();
    let r = post(port, Some(TOKEN), before.join("\n").as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());

    broker.kill();
    let during: Vec<String> = (0..5)
        .map(|i| canonical(&format!("during-{i}"), &format!("acct-{i}")))
        .collect();
    let body = during.join("\n");
    let r = post(port, Some(TOKEN), body.as_bytes(), &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("503 with Retry-After");
    assert_eq!(
        (
            r.json()["acknowledged"].clone(),
            r.json()["records"].clone()
        ),
        (json!(0), json!(5)),
        "{}",
        r.text()
    );

    broker.restart();
    // The gateway retries as told until it is answered 200.
    let mut failed_with_acks = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        std::thread::sleep(Duration::from_secs(retry));
        let r = post(port, Some(TOKEN), body.as_bytes(), &[]);
        if r.status == 200 {
            assert_eq!(r.json()["accepted"], json!(5));
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        if r.json()["acknowledged"] != json!(0) {
            failed_with_acks += 1;
        }
        assert!(
            Instant::now() < deadline,
            "no 200 after the broker came back"
        );
    }

    let msgs = read_topic(&broker.addr, "gw", PARTITIONS);
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &msgs {
        *count.entry(m.payload.as_str()).or_default() += 1;
    }
    for line in &before {
        assert_eq!(
            count.get(line.as_str()),
            Some(&1),
            "acknowledged before the outage: {line}"
        );
    }
    for line in &during {
        let n = count.get(line.as_str()).copied().unwrap_or(0);
        assert!(n >= 1, "lost: {line}");
        if failed_with_acks == 0 {
            assert_eq!(n, 1, "no failed attempt had a record acknowledged: {line}");
        }
    }
    assert_eq!(msgs.len(), count.values().sum::<usize>());
    let page = metrics(port);
    assert!(
        sample(
            &page,
            "keywatch_intake_requests_total{outcome=\"unavailable\"}"
        )
        .unwrap()
            >= 1.0,
        "{page}"
    );
}
