//! Issue 15: the second stage (detectors keyed by address, network, key and
//! prompt) in the service, against tansu and Postgres, with crashes.
//!
//! Two `keywatch run` processes share one consumer group on a 6-partition
//! topic of simulated traffic with attacks across accounts (key cycling,
//! credential stuffing, farming spread over many networks). One of them is
//! SIGKILLed and restarted several times while both stages work. When both
//! stages are done, the second stage's alerts must be exactly those of an
//! offline `keywatch replay` of the same records, its per-address rollups
//! exactly the offline sums (none lost, none doubled), and its offsets at
//! the end of the internal topic.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::check::{expected, trace, HASH_KEY, SECOND_STAGE_KINDS};
use common::services::*;
use common::*;
use detectors::subject::{AddressTotals, Seq};
use detectors::{Decoder, Engine, EngineConfig, Outcome};
use rdkafka::consumer::{BaseConsumer, Consumer};

const PARTITIONS: i32 = 6;
const SUBJECTS_TOPIC: &str = "keywatch.by-subject";
/// The consumers' session timeout (`session.timeout.ms` below).
const SESSION: Duration = Duration::from_secs(6);

/// Per (address, minute), what the second stage must have added up: the
/// stage-one engines of each partition, offline, decide what is counted
/// (duplicates are not), and each counted record's projection adds to its
/// address.
fn address_totals(lines: &[String]) -> HashMap<(String, i64), AddressTotals> {
    let decoder = Decoder::new(HASH_KEY.as_bytes());
    let times = message_times(lines);
    let mut out: HashMap<(String, i64), AddressTotals> = HashMap::new();
    for p in 0..PARTITIONS {
        let mut engine = Engine::new(&EngineConfig::default()).unwrap();
        let mut alerts = Vec::new();
        for (i, (line, &at)) in lines
            .iter()
            .zip(&times)
            .filter(|(l, _)| partition_of(&user_of(l), PARTITIONS) == p)
            .enumerate()
        {
            let Ok(mut ev) = decoder.decode(line.as_bytes()) else {
                continue;
            };
            engine.bound_time(&mut ev, at);
            if let Outcome::Counted { cost_micros } = engine.observe(&ev, &mut alerts) {
                let pr = engine.projection(&ev, cost_micros, Seq::new(i as i64, None));
                let Some(ip) = pr.ip else { continue };
                let minute = pr.ts_ms.div_euclid(60_000) * 60_000;
                let t = out.entry((ip.to_string(), minute)).or_default();
                t.requests += pr.counts_request() as i64;
                t.errors += (pr.phase.counts_response() && pr.status >= 400) as i64;
                t.auth_failures += (pr.phase.counts_response() && pr.auth_failure()) as i64;
                t.prompt_tokens += pr.prompt_tokens as i64;
                t.completion_tokens += pr.completion_tokens as i64;
                t.cost_micros += pr.cost_micros as i64;
            }
            alerts.clear();
        }
    }
    out
}

/// The internal topic's end offsets, from the broker.
fn subject_ends(bootstrap: &str) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "second-stage-check")
        .create()
        .unwrap();
    (0..PARTITIONS)
        .filter_map(|p| {
            consumer
                .fetch_watermarks(SUBJECTS_TOPIC, p, Duration::from_secs(10))
                .ok()
                .map(|(_, high)| (p, high))
        })
        .collect()
}

/// Waits until the second stage has taken everything stage one wrote: every
/// source says it is idle (so nothing waits for its event time) and the
/// internal topic's offsets are committed to its end, twice a second apart.
fn wait_second_stage(db: &Database, bootstrap: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut settled = 0;
    loop {
        let ends = subject_ends(bootstrap);
        let committed: HashMap<i32, i64> = db
            .try_query(&format!(
                "SELECT partition::text, next_offset::text FROM consumer_offsets WHERE topic = '{SUBJECTS_TOPIC}'"
            ))
            .unwrap_or_default()
            .iter()
            .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
            .collect();
        let busy = db
            .try_query("SELECT count(*)::text FROM stage_two_sources WHERE NOT idle")
            .ok()
            .and_then(|r| r[0][0].parse::<i64>().ok())
            .unwrap_or(1);
        let sources = db
            .try_query("SELECT count(*)::text FROM stage_two_sources")
            .ok()
            .and_then(|r| r[0][0].parse::<i64>().ok())
            .unwrap_or(0);
        let caught_up = ends.len() == PARTITIONS as usize
            && ends
                .iter()
                .all(|(p, e)| *e == 0 || committed.get(p).is_some_and(|c| c >= e));
        if caught_up && busy == 0 && sources == (PARTITIONS * PARTITIONS) as i64 {
            settled += 1;
            if settled == 2 {
                return;
            }
        } else {
            settled = 0;
        }
        if Instant::now() >= deadline {
            let rows = db.query(
                "SELECT partition::text, source_topic, source_partition::text, coalesce(source_offset::text, '-'), \
                 coalesce(frontier::text, '-'), idle::text FROM stage_two_sources ORDER BY 1, 3",
            );
            panic!(
                "the second stage did not catch up: ends {ends:?}, committed {committed:?}, {busy} of {sources} sources busy: {rows:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The second stage's alert ids of an offline `keywatch replay` of `lines`.
fn replayed_ids(dir: &Path, config: &Path, lines: &[String]) -> BTreeSet<String> {
    let file = dir.join("trace.ndjson");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let o = replay(&["--config", config.to_str().unwrap(), file.to_str().unwrap()]);
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|a| SECOND_STAGE_KINDS.contains(&format!("'{}'", a["kind"].as_str().unwrap())))
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn two_instances_killed_and_restarted_match_an_offline_replay() {
    let lines = trace(3000, 12.0, 61, 0);
    let exp = expected(&lines, PARTITIONS);
    let dir = scratch("second-stage");
    let broker = Broker::start(&dir.join("tansu.log"));
    let db = Database::create("second_stage");
    broker.create_topic("gw", PARTITIONS);
    broker.create_topic("gw-dlq", 1);
    broker.create_topic(SUBJECTS_TOPIC, PARTITIONS);
    broker.produce("gw", PARTITIONS, &lines);
    let extra = format!(
        "[privacy]\nhash_key = \"{HASH_KEY}\"\n\
         [kafka.settings]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n\
         [kafka.subjects]\nidle_after_ms = 500\n"
    );
    let cfg = run_config(&dir, &broker, "gw", &db, &extra);
    let (a_log, b_log) = (dir.join("a.log"), dir.join("b.log"));
    let mut a = start_run(&cfg, &a_log);
    // B is killed mid-batch at deterministic "random" moments, both stages
    // working, and comes back each time once the group has noticed (its
    // session timed out and A took its partitions: tansu was seen to leave
    // a dead member's partitions assigned for good when the next member
    // joined before that).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..4 {
        let mut b = start_run(&cfg, &b_log);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(1500 + x % 2500));
        eprintln!("killing B ({i})");
        b.kill9();
        std::thread::sleep(SESSION + Duration::from_secs(2));
    }
    let mut b = start_run(&cfg, &b_log);
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(600));
    wait_second_stage(&db, &broker.addr, Duration::from_secs(300));
    stop_run(&mut a);
    stop_run(&mut b);

    // The second stage's alerts: those of an offline replay, each once.
    let online: BTreeSet<String> = db
        .query(&format!(
            "SELECT id FROM alerts WHERE kind IN ({SECOND_STAGE_KINDS})"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let offline = replayed_ids(&dir, &cfg, &lines);
    let kinds: BTreeSet<String> = db
        .query(&format!(
            "SELECT DISTINCT kind FROM alerts WHERE kind IN ({SECOND_STAGE_KINDS})"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    eprintln!(
        "second stage: {} alerts online, {} offline, kinds {kinds:?}",
        online.len(),
        offline.len()
    );
    for k in ["key_cycling", "credential_stuffing", "prompt_farming"] {
        assert!(kinds.contains(k), "no {k} alert: the test needs one");
    }
    let missing: Vec<_> = offline.difference(&online).take(5).collect();
    let extra: Vec<_> = online.difference(&offline).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "second-stage alerts differ from the offline replay: missing {missing:?}, extra {extra:?}"
    );

    // Per-address rollups: exact.
    let want = address_totals(&lines);
    let got: HashMap<(String, i64), AddressTotals> = db
        .query(
            "SELECT ip, (extract(epoch FROM minute) * 1000)::int8::text, requests::text, errors::text, \
             auth_failures::text, prompt_tokens::text, completion_tokens::text, cost_micros::text \
             FROM address_minute",
        )
        .into_iter()
        .map(|r| {
            let n = |i: usize| r[i].parse::<i64>().unwrap();
            let ip: IpAddr = r[0].parse().unwrap();
            (
                (ip.to_string(), n(1)),
                AddressTotals {
                    requests: n(2),
                    errors: n(3),
                    auth_failures: n(4),
                    prompt_tokens: n(5),
                    completion_tokens: n(6),
                    cost_micros: n(7),
                },
            )
        })
        .collect();
    assert_eq!(got.len(), want.len(), "address-minute groups");
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "address rollup {k:?}");
    }

    // Address actions reach the feed with the address and no account.
    let actions = db.query(
        "SELECT r.ip, r.user_id, coalesce(r.key_id, '') FROM revocation_actions r \
         JOIN alerts a ON a.id = r.alert_id WHERE a.kind = 'credential_stuffing'",
    );
    assert!(
        !actions.is_empty(),
        "credential stuffing blocks the address"
    );
    for r in &actions {
        assert!(r[0].parse::<IpAddr>().is_ok(), "{r:?}");
        assert_eq!((r[1].as_str(), r[2].as_str()), ("", ""), "{r:?}");
    }
}
