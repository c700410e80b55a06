//! `keywatch demo`: the whole pipeline with nothing installed.
//!
//! librdkafka's mock cluster (a real Kafka-protocol server inside this
//! process) gets simulated gateway traffic, attacks included, in real time
//! on an accelerated clock; `keywatch run`'s consumer path and detectors
//! read it and commit batches to memory (and to Postgres when
//! `DATABASE_URL` or `postgres.url` names one), write the Parquet lake
//! under `--data-dir`, and a local page shows it live: alerts as they fire,
//! top spenders, and the request rate with detected spikes marked. The
//! same server answers `/v1/revocations`, `/v1/blocklist` and `/metrics`
//! (from memory and without tokens: a demo, on localhost).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alerting::metrics::Exposition;
use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use detectors::time::format_rfc3339;
use detectors::Alert;
use ingest::kafka::{Pipeline, PipelineMetrics};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{json, Value};
use sim::{SimConfig, Simulator};
use storage::{Backend, MemoryStore};

use crate::config::Config;
use crate::run::{connect, pipeline_metrics, runtime, shutdown_signal};
use crate::ConfigArg;

const TOPIC: &str = "gateway-events";
const PARTITIONS: i32 = 4;
const PAGE: &str = include_str!("demo.html");
/// Simulated time produced at full speed before pacing starts: the hour
/// before the simulator's first attack, so baselines exist when it comes.
const WARM_UP_MS: i64 = 3_600_000;

/// Arguments of `keywatch demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Accounts in the simulated traffic.
    #[arg(long, default_value_t = 2000)]
    users: u32,
    /// Simulated hours.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Simulated seconds per real second (120: a day in 12 minutes).
    #[arg(long, default_value_t = 120.0)]
    speed: f64,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Address of the page, the feed and /metrics.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: String,
    /// Stop after this many real seconds (default: run until Ctrl-C; the
    /// traffic stops when the simulated hours are over).
    #[arg(long)]
    duration: Option<f64>,
    /// Where the Parquet lake goes (`DIR/lake/`).
    #[arg(long, default_value = "keywatch-data")]
    data_dir: PathBuf,
    /// A status line every 10 s instead of the live console view.
    #[arg(long)]
    quiet: bool,
}

/// What the page and the console read.
struct Live {
    memory: Arc<MemoryStore>,
    metrics: Arc<PipelineMetrics>,
    /// Both stages' metrics, for /metrics.
    stages: Vec<Arc<PipelineMetrics>>,
    produced: AtomicU64,
    /// Event time of the last record produced (unix ms).
    sim_now: AtomicU64,
    started: Instant,
    speed: f64,
}

/// Runs the demo.
pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    let (decoder, _) = cfg.decoder()?;
    anyhow::ensure!(args.speed > 0.0, "--speed: must be above 0");
    let rt = runtime()?;

    let mock = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
    mock.create_topic(TOPIC, PARTITIONS, 1)?;
    mock.create_topic("gateway-events-dlq", 1, 1)?;
    mock.create_topic(&cfg.kafka.subjects.topic, cfg.kafka.subjects.partitions, 1)?;
    let brokers = mock.bootstrap_servers();

    let memory = Arc::new(MemoryStore::default());
    let postgres = cfg.postgres.url().is_ok();
    let backend = if postgres {
        let store = rt.block_on(connect(&cfg))?;
        Backend::mirrored(store, Arc::clone(&memory))
    } else {
        Backend::memory(Arc::clone(&memory))
    };
    let mut kafka = cfg.kafka.clone();
    kafka.brokers = brokers.clone();
    kafka.topics = vec![TOPIC.into()];
    kafka.group_id = "keywatch-demo".into();
    kafka.dead_letter_topic = "gateway-events-dlq".into();
    kafka.start_from = ingest::config::StartFrom::Earliest;
    let mut pipeline_cfg = cfg.pipeline.clone();
    pipeline_cfg.parquet_dir = Some(args.data_dir.join("lake"));
    pipeline_cfg.batch_max_ms = pipeline_cfg.batch_max_ms.min(250);
    let pipeline = Pipeline::start(
        kafka.clone(),
        pipeline_cfg.clone(),
        cfg.engine.clone(),
        decoder,
        backend.clone(),
        rt.handle().clone(),
    )?;
    // The second stage: addresses, networks, keys and prompts across accounts.
    let subjects = kafka
        .subjects
        .enabled
        .then(|| {
            Pipeline::start_subjects(
                kafka,
                pipeline_cfg,
                cfg.engine.clone(),
                backend,
                rt.handle().clone(),
            )
        })
        .transpose()?;
    let mut stages = vec![pipeline.metrics()];
    stages.extend(subjects.as_ref().map(Pipeline::metrics));
    let live = Arc::new(Live {
        memory,
        metrics: pipeline.metrics(),
        stages,
        produced: AtomicU64::new(0),
        sim_now: AtomicU64::new(0),
        started: Instant::now(),
        speed: args.speed,
    });

    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&args.listen))
        .with_context(|| format!("--listen: binding {}", args.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/state", get(state))
        .route("/v1/revocations", get(revocations))
        .route("/v1/blocklist", get(blocklist))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::clone(&live));
    rt.spawn(async move {
        // The feed's connection rules (timeouts, caps) guard the demo too.
        let limits = alerting::listen::Limits::of(&alerting::FeedConfig::default());
        let (_never, stop) = tokio::sync::watch::channel(false);
        let conns = Arc::default();
        if let Err(e) = alerting::listen::serve(listener, app, limits, conns, stop).await {
            tracing::error!(error = %e, "demo web server stopped");
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::Release);
        });
    }
    if let Some(secs) = args.duration {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
            stop.store(true, Ordering::Release);
        });
    }
    let producer = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
        let sim = SimConfig {
            users: args.users,
            hours: args.hours,
            seed: args.seed,
            // One attack of each kind right after the first hour, which
            // goes in at full speed (baselines): alerts within seconds.
            opening: true,
            ..SimConfig::default()
        };
        std::thread::Builder::new()
            .name("kw-demo-traffic".into())
            .spawn(move || produce(&brokers, sim, &live, &stop))?
    };
    eprintln!(
        "keywatch demo: {} accounts, {} simulated hours at {}x, into an in-process Kafka ({}); lake in {}{}",
        args.users,
        args.hours,
        args.speed,
        mock.bootstrap_servers(),
        args.data_dir.join("lake").display(),
        if postgres { "; tables in Postgres" } else { "; no Postgres (set DATABASE_URL to fill the tables)" }
    );
    eprintln!("keywatch demo: open http://{addr}/  (feed: /v1/revocations, /v1/blocklist; /metrics); Ctrl-C stops");
    let console = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
        std::thread::spawn(move || console(&live, &stop, args.quiet))
    };
    let second = subjects.map(|s| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || s.run_until(&stop))
    });
    pipeline.run_until(&stop).context("consuming")?;
    stop.store(true, Ordering::Release);
    if let Some(t) = second {
        let _ = t.join();
    }
    let _ = producer.join();
    let _ = console.join();
    let s = live.memory.snapshot(0, i64::MAX, 0, 0);
    eprintln!(
        "keywatch demo: stopped: {} records produced, {} consumed, {} alerts, {} batches committed",
        live.produced.load(Ordering::Relaxed),
        live.metrics.decoded.load(Ordering::Relaxed),
        s.alerts_total,
        s.batches
    );
    Ok(ExitCode::SUCCESS)
}

/// Streams simulated records into the mock cluster, paced on event time.
fn produce(brokers: &str, sim: SimConfig, live: &Live, stop: &AtomicBool) {
    let producer: BaseProducer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "demo traffic producer could not start");
            return;
        }
    };
    let mut sim = Simulator::new(sim);
    let mut line = String::new();
    let mut first: Option<i64> = None;
    while !stop.load(Ordering::Acquire) {
        line.clear();
        let Some(ts) = sim.next_record(&mut line) else {
            break;
        };
        // The first hour (no attacks: baselines) goes in at full speed;
        // from then on, records are paced on event time.
        let t0 = *first.get_or_insert(ts) + WARM_UP_MS;
        let due = Duration::from_secs_f64(((ts - t0).max(0) as f64 / 1000.0) / live.speed);
        if let Some(wait) = due.checked_sub(live.started.elapsed()) {
            std::thread::sleep(wait.min(Duration::from_millis(200)));
        }
        let record = line.trim_end();
        let user = user_of(record);
        // Stamped with the simulated clock, as a gateway stamps its logs:
        // event times are held to the message's timestamp.
        let mut rec = BaseRecord::<str, str>::to(TOPIC)
            .payload(record)
            .key(user)
            .timestamp(ts);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    // Queue full: let it drain.
                    producer.poll(Duration::from_millis(10));
                    rec = r;
                }
            }
        }
        producer.poll(Duration::ZERO);
        live.produced.fetch_add(1, Ordering::Relaxed);
        live.sim_now.store(ts.max(0) as u64, Ordering::Relaxed);
    }
    let _ = producer.flush(Duration::from_secs(5));
}

/// The `user_id` of a simulated record (its partition key).
fn user_of(record: &str) -> &str {
    record
        .split_once("\"user_id\":\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("", |(u, _)| u)
}

/// The live console: a status block, and each new alert as it fires.
fn console(live: &Live, stop: &AtomicBool, quiet: bool) {
    let every = Duration::from_secs(if quiet { 10 } else { 2 });
    let mut last = (Instant::now(), 0u64);
    let mut shown = 0usize;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(every);
        let consumed = live.metrics.decoded.load(Ordering::Relaxed);
        let rate = (consumed - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), consumed);
        let s = live.memory.snapshot(200, i64::MAX, 0, 0);
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &s.alerts {
            *by_kind.entry(a.kind.as_str()).or_default() += 1;
        }
        let sim = live.sim_now.load(Ordering::Relaxed) as i64;
        eprintln!(
            "[{}] {consumed} events ({rate:.0}/s), {} users, {} alerts{}",
            if sim > 0 {
                format_rfc3339(sim)
            } else {
                "starting".into()
            },
            s.users,
            s.alerts_total,
            if by_kind.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    by_kind
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        if !quiet {
            let new = s.alerts_total.saturating_sub(shown);
            let from = s.alerts.len().saturating_sub(new.min(8));
            for a in &s.alerts[from..] {
                eprintln!(
                    "  ! {:<16} {:<8} {}",
                    a.kind.as_str(),
                    a.severity.as_str(),
                    a.reason
                );
            }
            if new > 8 {
                eprintln!("  ! ... and {} more", new - 8);
            }
            shown = s.alerts_total;
        }
    }
}

/// `/api/state`: what the page draws.
async fn state(State(live): State<Arc<Live>>) -> Response {
    let s = live.memory.snapshot(30, i64::MAX, 180, 10);
    let all = live.memory.snapshot(usize::MAX, i64::MAX, 0, 0);
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut spikes = Vec::new();
    let first_minute = s.per_minute.first().map_or(i64::MAX, |m| m.0);
    for a in &all.alerts {
        *by_kind.entry(a.kind.as_str()).or_default() += 1;
        let minute = a.ts - a.ts.rem_euclid(60_000);
        if minute >= first_minute {
            spikes.push(json!({"minute": minute, "kind": a.kind.as_str()}));
        }
    }
    let recent: Vec<Value> = s.alerts.iter().rev().map(alert_json).collect();
    let body = json!({
        "sim_time": format_rfc3339(live.sim_now.load(Ordering::Relaxed) as i64),
        "produced": live.produced.load(Ordering::Relaxed),
        "consumed": live.metrics.decoded.load(Ordering::Relaxed),
        "elapsed_secs": live.started.elapsed().as_secs_f64(),
        "users": s.users,
        "alerts_total": s.alerts_total,
        "alerts_by_kind": by_kind,
        "recent_alerts": recent,
        "top_spenders": s.top_spenders.iter().map(|(u, c)| json!({"user_id": u, "usd": *c as f64 / 1e6})).collect::<Vec<_>>(),
        "rate": s.per_minute.iter().map(|(m, t)| json!({"minute": m, "requests": t.requests})).collect::<Vec<_>>(),
        "marks": spikes,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn alert_json(a: &Alert) -> Value {
    serde_json::to_value(a).unwrap_or(Value::Null)
}

fn action_json(seq: i64, a: &Alert) -> Value {
    json!({
        "seq": seq,
        "key_id": a.key_id,
        "user_id": if a.key_id.is_none() && a.ip.is_some() { "" } else { a.user_id.as_str() },
        "ip": if a.key_id.is_none() { a.ip.as_deref() } else { None },
        "action": a.action,
        "reason": a.reason,
        "alert_id": a.id,
        "issued_at": format_rfc3339(a.ts),
        "expires_at": a.expires_at.map(format_rfc3339),
    })
}

/// `/v1/revocations?after=SEQ` from memory (no long poll, no token: a demo).
async fn revocations(
    State(live): State<Arc<Live>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let after = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0i64);
    let s = live.memory.snapshot(0, after, 0, 0);
    let actions: Vec<Value> = s
        .actions
        .iter()
        .map(|a| action_json(a.seq, &a.alert))
        .collect();
    let next_after = s.actions.last().map_or(after, |a| a.seq);
    let body = json!({"actions": actions, "next_after": next_after});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `/v1/blocklist` from memory: actions not expired at the simulated now.
async fn blocklist(State(live): State<Arc<Live>>) -> Response {
    let now = live.sim_now.load(Ordering::Relaxed) as i64;
    let s = live.memory.snapshot(0, 0, 0, 0);
    let entries: Vec<Value> = s
        .actions
        .iter()
        .filter(|a| a.alert.expires_at.is_none_or(|e| e > now))
        .map(|a| action_json(a.seq, &a.alert))
        .collect();
    let body = json!({ "entries": entries });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(live): State<Arc<Live>>) -> Response {
    let mut out = Exposition::default();
    pipeline_metrics(live.stages.clone())(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.finish(),
    )
        .into_response()
}
