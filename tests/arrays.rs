//! `keywatch run` on a topic of Kong's batched logs (`format = "kong"`:
//! each Kafka message a JSON array of 50 records, as Kong's kafka-log
//! sends them, some elements bad, one array broken part-way), against a
//! real broker (tansu) and Postgres, killed (SIGKILL) twice at moments the
//! test makes certain: while a batch of array messages is open, and after
//! a batch's dead letters were acknowledged and its Parquet file written
//! but before its Postgres transaction committed. Restarted, it counts
//! every good element exactly once (rollups, lake), and dead-letters every
//! bad one at least once, naming its element.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::Decoder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};

use common::check::{walk, HASH_KEY};
use common::scratch;
use common::services::*;

const TOPIC: &str = "gw";
const PARTITIONS: i32 = 2;
/// Records per array message, as Kong's kafka-log batches them.
const PER_MESSAGE: usize = 50;
/// Messages per partition before the first kill…
const FIRST: usize = 30;
/// …and after it.
const SECOND: usize = 70;
/// A batch closes at this many records (20 array messages).
const BATCH: usize = 1000;
/// The raw key every record's `apikey` header holds a variant of: it must
/// reach no dead letter.
const SECRET: &str = "sk-TOPSECRET";

/// Where a record sits: partition, offset, index in its message's array.
type Place = (i32, i64, Option<u32>);

/// A partition's messages: bytes and timestamp.
type Messages = Vec<(Vec<u8>, i64)>;

/// A good record's identity and counts, as the decoder reads it.
#[derive(Debug, PartialEq)]
struct Good {
    request_id: String,
    user_id: String,
    key_id: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// One Kong record, in one of the AI plugins' shapes (3.6 flat, 3.7
/// singular token names, 3.9+ `ai.proxy`), with the fault `bad` names: 1
/// a time that is text, 2 negative tokens, 3 the request id twice, 4 no
/// consumer, 5 no time; 0 none.
fn kong(p: i32, o: usize, i: usize, started_at: i64, bad: u8) -> String {
    let n = (p as usize * 1_000_003 + o * 101 + i) as u64;
    let user = n % 7;
    let request_id = format!("req-{p}-{o}-{i}");
    let (pt, ct) = (20 + n * 37 % 900, n * 13 % 300);
    let consumer = format!(
        r#""consumer":{{"id":"00000000-0000-4000-8000-00000000000{user}","username":"user-{p}-{user}","custom_id":"acct-{p}-{user}"}},"#
    );
    // Some requests name their credential; the others are known by a
    // keyed hash of the raw key.
    let entity = if n.is_multiple_of(3) {
        String::new()
    } else {
        format!(
            r#""authenticated_entity":{{"id":"cred-{p}-{user}-{}"}},"#,
            n % 2
        )
    };
    let ai = match n % 3 {
        0 => format!(
            r#"{{"usage":{{"prompt_tokens":{pt},"completion_tokens":{ct},"total_tokens":{}}},"meta":{{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06","provider_name":"openai"}}}}"#,
            pt + ct
        ),
        1 => format!(
            r#"{{"ai-proxy":{{"usage":{{"prompt_token":{pt},"completion_token":{ct}}},"meta":{{"request_model":"gpt-4o-mini","response_model":"gpt-4o-mini-2024-07-18"}}}}}}"#
        ),
        _ => format!(
            r#"{{"proxy":{{"usage":{{"prompt_tokens":{pt},"completion_tokens":{ct},"cost":0}},"meta":{{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06"}},"payload":{{"request":"{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {n}\"}}]}}"}}}}}}"#
        ),
    };
    let id = match bad {
        3 => format!(r#""id":"{request_id}","id":"{request_id}-again""#),
        _ => format!(r#""id":"{request_id}""#),
    };
    let ts = match bad {
        1 => r#""started_at":"yesterday","#.to_string(),
        5 => String::new(),
        _ => format!(r#""started_at":{started_at},"#),
    };
    let ai = match bad {
        2 => ai.replace(&format!(":{pt},"), ":-5,"),
        _ => ai,
    };
    let consumer = if bad == 4 { String::new() } else { consumer };
    format!(
        r#"{{"request":{{{id},"uri":"/ai/v1/chat/completions","method":"POST","headers":{{"host":"gw.example.com","user-agent":"app/{user}","apikey":"{SECRET}-{p}-{user}","authorization":"REDACTED"}}}},"upstream_uri":"/v1/chat/completions","response":{{"status":{}}},"latencies":{{"kong":2,"proxy":{},"request":{}}},"client_ip":"203.0.113.{}",{ts}{consumer}{entity}"workspace_name":"default","ai":{ai}}}"#,
        if n.is_multiple_of(11) { 429 } else { 200 },
        100 + n % 700,
        103 + n % 700,
        1 + user,
    )
}

/// The stream of one partition: mostly arrays of 50 Kong records, every
/// 16th bad in one of six ways (a missing consumer, a time that is text,
/// negative tokens, a request id twice, a missing time, an element that is
/// no object), plus a lone record (good, and bad), an empty array, and an
/// array whose JSON breaks at element 10. Returns each message's bytes
/// and timestamp.
fn stream(p: i32, messages: std::ops::Range<usize>) -> Messages {
    const BASE: i64 = 1_795_392_000_000; // 2026-11-23, as the simulator
    let mut out = Vec::new();
    for o in messages {
        let start = BASE + (o * PER_MESSAGE) as i64 * 350;
        let at = |i: usize| start + i as i64 * 350;
        let element = |i: usize| {
            let bad = if (o * PER_MESSAGE + i) % 16 == 7 {
                ((o + i) % 6 + 1) as u8
            } else {
                0
            };
            match bad {
                6 => "42".to_string(),
                b => kong(p, o, i, at(i), b),
            }
        };
        let body = match o % 50 {
            3 => kong(p, o, 0, at(0), 0),
            27 => kong(p, o, 0, at(0), 4),
            7 => " [ ] ".to_string(),
            25 => {
                let mut e: Vec<String> = (0..PER_MESSAGE).map(element).collect();
                e[10] = r#"{"request":{"id":"broken"},"started_at":tru}"#.to_string();
                format!("[{}]", e.join(",\n"))
            }
            _ => {
                let e: Vec<String> = (0..PER_MESSAGE).map(element).collect();
                format!("[{}]", e.join(",\n"))
            }
        };
        out.push((body.into_bytes(), at(PER_MESSAGE) + 1000));
    }
    out
}

/// What `keywatch run` must make of the streams: the good records, and
/// each dead letter's error text.
#[derive(Default)]
struct Expected {
    good: BTreeMap<Place, Good>,
    dead: BTreeMap<Place, String>,
    /// Array elements (records and breaks), which `keywatch_array_records_total` counts.
    array_pieces: u64,
}

/// Reads every message as the pipeline is to (split, each record decoded
/// as Kong's), and checks the test's streams are what it meant them to be.
fn expect(streams: &[(i32, Messages)], exp: &mut Expected, from: &[usize]) {
    let decoder = Decoder::new(HASH_KEY.as_bytes());
    for (s, (p, msgs)) in streams.iter().enumerate() {
        for (k, (payload, _)) in msgs.iter().enumerate() {
            let offset = (from[s] + k) as i64;
            split_records(payload, |piece| match piece {
                Piece::Record(bytes, element) => {
                    exp.array_pieces += u64::from(element.is_some());
                    let origin = Origin {
                        stream: TOPIC,
                        partition: *p,
                        offset,
                        element,
                    };
                    let place = (*p, offset, element);
                    let got = decoder.decode_as(Format::Kong, bytes, &origin);
                    // The faults `stream` put in, and only they, are refused.
                    let text = String::from_utf8_lossy(bytes);
                    let meant_bad = ["\"yesterday\"", ":-5,", "-again\""]
                        .iter()
                        .any(|f| text.contains(f))
                        || !text.contains("\"consumer\"")
                        || !text.contains("\"started_at\"");
                    assert_eq!(got.is_err(), meant_bad, "{place:?}: {got:?}");
                    match got {
                        Ok((ev, _)) => {
                            assert!(ev.request_id.starts_with(&format!("req-{p}-")));
                            assert!(ev.user_id.starts_with(&format!("acct-{p}-")));
                            exp.good.insert(
                                place,
                                Good {
                                    request_id: ev.request_id.to_string(),
                                    user_id: ev.user_id.to_string(),
                                    key_id: ev.key_id.to_string(),
                                    prompt_tokens: ev.prompt_tokens,
                                    completion_tokens: ev.completion_tokens,
                                },
                            );
                        }
                        Err(e) => {
                            let error = match element {
                                Some(i) => format!("element {i}: {e}"),
                                None => e.to_string(),
                            };
                            exp.dead.insert(place, error);
                        }
                    }
                }
                Piece::Broken(_, i, e) => {
                    exp.array_pieces += 1;
                    exp.dead.insert(
                        (*p, offset, Some(i)),
                        format!("element {i}: {e} (this element and the rest of the array)"),
                    );
                }
            });
        }
    }
}

/// A table locked against writes, by a transaction of the test's own that
/// holds it until [`TableLock::release`].
struct TableLock {
    // Dropped before its runtime.
    conn: sqlx::PgConnection,
    rt: tokio::runtime::Runtime,
}

impl TableLock {
    fn take(db: &Database, table: &str) -> TableLock {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = rt.block_on(async {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
                .await
                .unwrap();
            for sql in [
                "BEGIN".to_string(),
                format!("LOCK TABLE {table} IN EXCLUSIVE MODE"),
            ] {
                sqlx::query(&sql).execute(&mut conn).await.unwrap();
            }
            conn
        });
        TableLock { conn, rt }
    }

    fn release(self) {
        let TableLock { mut conn, rt } = self;
        rt.block_on(async move {
            sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
            sqlx::Connection::close(conn).await.unwrap();
        });
    }
}

/// Committed offsets of [`TOPIC`] by partition.
fn committed(db: &Database) -> HashMap<i32, i64> {
    db.try_query(&format!(
        "SELECT partition::text, next_offset::text FROM consumer_offsets WHERE topic = '{TOPIC}'"
    ))
    .unwrap_or_default()
    .iter()
    .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
    .collect()
}

/// A counter from `/metrics` on `port` (0 until the server answers).
fn metric(port: u16, name: &str) -> f64 {
    let Ok(page) = common::receivers::http(port, "GET", "/metrics", &[], b"") else {
        return 0.0;
    };
    String::from_utf8_lossy(&page.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `done` until it holds, or panics with `what` after two minutes.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lake's files: (partition, first offset, last offset).
fn lake_files(dir: &Path) -> Vec<(i32, i64, i64)> {
    walk(&dir.join("lake"))
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let f: Vec<&str> = name.split('-').collect();
            (
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn sigkill_mid_array_loses_and_doubles_no_element() {
    let dir = scratch("arrays");
    let broker = Broker::start(&dir.join("tansu.log"));
    let db = Database::create("arrays");
    broker.create_topic(TOPIC, PARTITIONS);
    broker.create_topic(&format!("{TOPIC}-dlq"), 1);
    let produce = |range: std::ops::Range<usize>| {
        let streams: Vec<(i32, Messages)> = (0..PARTITIONS)
            .map(|p| (p, stream(p, range.clone())))
            .collect();
        for (p, msgs) in &streams {
            let key = format!("kong-node-{p}");
            broker.produce_messages(
                TOPIC,
                msgs.iter().map(|(payload, at)| Message {
                    partition: *p,
                    key: &key,
                    payload,
                    timestamp: *at,
                }),
            );
        }
        streams
    };
    let settings = |batch_max_ms| RunSettings {
        format: Some("kong"),
        batch_max_records: BATCH,
        batch_max_ms,
        max_record_bytes: 1 << 20,
        ..RunSettings::default()
    };
    let session = "[kafka.settings]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n";
    let log = dir.join("run.log");

    // 1. Batches close only when full: the last one stays open.
    let first = produce(0..FIRST);
    let mut exp = Expected::default();
    expect(&first, &mut exp, &[0, 0]);
    let first_pieces = exp.array_pieces;
    assert!(
        first_pieces as usize > PARTITIONS as usize * BATCH,
        "each partition fills a batch"
    );
    let port = free_port();
    let extra = format!(
        "[privacy]\nhash_key = \"{HASH_KEY}\"\n{session}[feed]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let cfg = run_config_with(&dir, &broker, TOPIC, &db, &extra, &settings(86_400_000));
    let mut run = start_run(&cfg, &log);
    // Read to the end, and each partition's first batch landed (the
    // committer writes it while the worker reads on).
    wait_until("the first run did not read every element", || {
        metric(port, "keywatch_array_records_total") >= first_pieces as f64
            && committed(&db).len() == PARTITIONS as usize
    });
    run.kill9();
    let at_kill = committed(&db);
    for p in 0..PARTITIONS {
        let c = at_kill.get(&p).copied().unwrap_or(0);
        assert!(
            c > 0 && c < FIRST as i64,
            "partition {p}: a batch committed and the next was open at the kill (committed {c} of {FIRST})"
        );
    }

    // 2. A batch's dead letters acknowledged and its Parquet file written,
    // its transaction waiting on a lock: killed there.
    let second = produce(FIRST..FIRST + SECOND);
    expect(&second, &mut exp, &[FIRST, FIRST]);
    let extra = format!("[privacy]\nhash_key = \"{HASH_KEY}\"\n{session}");
    let cfg = run_config_with(&dir, &broker, TOPIC, &db, &extra, &settings(200));
    let lock = TableLock::take(&db, "consumer_offsets");
    let mut run = start_run(&cfg, &log);
    wait_until("no batch reached its Postgres commit", || {
        lake_files(&dir)
            .iter()
            .any(|(p, first, _)| *first >= at_kill[p])
    });
    run.kill9();
    lock.release();
    assert_eq!(
        committed(&db),
        at_kill,
        "nothing committed while the lock was held"
    );

    // 3. To the end.
    let mut run = start_run(&cfg, &log);
    let ends: HashMap<i32, i64> = (0..PARTITIONS)
        .map(|p| (p, (FIRST + SECOND) as i64))
        .collect();
    wait_committed(&db, TOPIC, &ends, Duration::from_secs(300));
    stop_run(&mut run);

    verify_rollups(&db, &exp);
    verify_lake(&dir, &exp);
    verify_dead_letters(&broker.addr, &exp);
}

/// Postgres holds each good element's request and tokens once.
fn verify_rollups(db: &Database, exp: &Expected) {
    let mut want: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    for g in exp.good.values() {
        let w = want
            .entry((g.user_id.clone(), g.key_id.clone()))
            .or_default();
        w.0 += 1;
        w.1 += g.prompt_tokens as i64;
        w.2 += g.completion_tokens as i64;
    }
    let got: BTreeMap<(String, String), (i64, i64, i64)> = db
        .query(
            "SELECT user_id, key_id, sum(requests)::text, sum(prompt_tokens)::text, \
             sum(completion_tokens)::text FROM rollup_minute GROUP BY user_id, key_id",
        )
        .into_iter()
        .map(|r| {
            let n = |i: usize| r[i].parse::<i64>().unwrap();
            ((r[0].clone(), r[1].clone()), (n(2), n(3), n(4)))
        })
        .collect();
    assert_eq!(
        got, want,
        "rollups by (user, key): (requests, prompt tokens, completion tokens)"
    );
}

/// The lake holds each good element once, at its place, read as Kong's.
fn verify_lake(dir: &Path, exp: &Expected) {
    use arrow_array::{Array, BooleanArray, Int64Array, StringArray, UInt32Array};
    let mut rows: BTreeMap<Place, (String, String)> = BTreeMap::new();
    for path in walk(&dir.join("lake")) {
        let partition: i32 = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .split('-')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap_or_else(|| panic!("no {name} column"))
                    .clone()
            };
            let (offset, element, format, request, user, duplicate) = (
                col("kafka_offset"),
                col("kafka_element"),
                col("format"),
                col("request_id"),
                col("user_id"),
                col("duplicate"),
            );
            let offset = offset.as_any().downcast_ref::<Int64Array>().unwrap();
            let element = element.as_any().downcast_ref::<UInt32Array>().unwrap();
            let format = format.as_any().downcast_ref::<StringArray>().unwrap();
            let request = request.as_any().downcast_ref::<StringArray>().unwrap();
            let user = user.as_any().downcast_ref::<StringArray>().unwrap();
            let duplicate = duplicate.as_any().downcast_ref::<BooleanArray>().unwrap();
            for i in 0..batch.num_rows() {
                let place = (
                    partition,
                    offset.value(i),
                    (!element.is_null(i)).then(|| element.value(i)),
                );
                assert_eq!(format.value(i), "kong", "{place:?}");
                assert!(!duplicate.value(i), "{place:?} is marked a duplicate");
                let row = (request.value(i).to_string(), user.value(i).to_string());
                assert!(
                    rows.insert(place, row).is_none(),
                    "{place:?} is in the lake twice"
                );
            }
        }
    }
    let want: BTreeMap<Place, (String, String)> = exp
        .good
        .iter()
        .map(|(k, g)| (*k, (g.request_id.clone(), g.user_id.clone())))
        .collect();
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !rows.contains_key(k))
        .take(5)
        .collect();
    let extra: Vec<_> = rows
        .keys()
        .filter(|k| !want.contains_key(k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "lake rows: {} of {}; missing {missing:?}, extra {extra:?}",
        rows.len(),
        want.len()
    );
    assert_eq!(rows, want, "each lake row is its element's record");
}

/// Every bad element reached the dead-letter topic (at least once), with
/// its place and error, and no raw key; nothing else did.
fn verify_dead_letters(bootstrap: &str, exp: &Expected) {
    let dlq = format!("{TOPIC}-dlq");
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dlq-check-arrays")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    // tansu's high watermark may lag the records it has acknowledged for a
    // moment: read until every dead letter is in, and up to the watermark.
    let high = || {
        consumer
            .fetch_watermarks(&dlq, 0, Duration::from_secs(30))
            .unwrap()
            .1
    };
    let mut end = high();
    let mut seen: BTreeMap<Place, usize> = BTreeMap::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if next >= end {
            if exp.dead.keys().all(|k| seen.contains_key(k)) {
                break;
            }
            end = high();
        }
        let missing: Vec<_> = exp.dead.keys().filter(|k| !seen.contains_key(k)).collect();
        assert!(
            Instant::now() < deadline,
            "not dead-lettered ({} read, to offset {next} of {end}): {missing:?}",
            seen.values().sum::<usize>()
        );
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        next = next.max(m.offset() + 1);
        let h = m.headers().expect("dead letters carry headers");
        let header = |name: &str| {
            h.iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("keywatch.origin.topic").as_deref(), Some(TOPIC));
        let place: Place = (
            header("keywatch.origin.partition")
                .unwrap()
                .parse()
                .unwrap(),
            header("keywatch.origin.offset").unwrap().parse().unwrap(),
            header("keywatch.origin.element").map(|e| e.parse().unwrap()),
        );
        let error = header("keywatch.error").unwrap();
        let want = exp
            .dead
            .get(&place)
            .unwrap_or_else(|| panic!("{place:?} dead-lettered, but it is good: {error}"));
        assert_eq!(&error, want, "{place:?}");
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default());
        assert!(
            !payload.contains(SECRET) && !error.contains(SECRET),
            "a raw key reached the dead-letter topic: {payload}"
        );
        *seen.entry(place).or_default() += 1;
    }
    let twice = seen.values().filter(|&&n| n > 1).count();
    let elements = seen.keys().filter(|k| k.2.is_some()).count();
    eprintln!(
        "dead letters: {} places ({elements} array elements), {twice} written twice or more (after a crash)",
        seen.len(),
    );
}
