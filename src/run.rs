//! `keywatch run` (the service) and `keywatch migrate`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alerting::metrics::{Exposition, Render};
use anyhow::{Context, Result};
use ingest::kafka::{Pipeline, PipelineMetrics};
use ingest::telemetry::{Kind, COMMIT_SECONDS};
use storage::Store;
use tracing::{info, warn};

use crate::config::Config;
use crate::serve::Outward;
use crate::ConfigArg;

/// Arguments of `keywatch run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 10)]
    progress_secs: u64,
    /// Which stages this instance runs: `both`, `gateway` (stage one only:
    /// it still writes projections when `kafka.subjects.enabled`) or
    /// `subjects` (the second stage only). Each stage is its own consumer
    /// group, so they can be scaled apart.
    #[arg(long, value_enum, default_value_t = Stages::Both)]
    stage: Stages,
}

/// The stages a `keywatch run` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stages {
    /// Stage one and, with `kafka.subjects.enabled`, the second stage.
    Both,
    /// Stage one only.
    Gateway,
    /// The second stage only.
    Subjects,
}

/// Arguments of `keywatch migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    config: ConfigArg,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kw-io")
        .build()
        .context("starting the async runtime")
}

pub(crate) async fn connect(cfg: &Config) -> Result<Store> {
    let url = cfg.postgres.url()?;
    let store = Store::connect(&url, cfg.postgres.max_connections)
        .await
        .context("connecting to Postgres (postgres.url / DATABASE_URL)")?;
    store.migrate().await.context("migrating the schema")?;
    Ok(store)
}

/// Runs `keywatch migrate`.
pub fn migrate(args: MigrateArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    runtime()?.block_on(connect(&cfg))?;
    info!("schema is up to date");
    Ok(ExitCode::SUCCESS)
}

/// Runs the service until SIGINT or SIGTERM, then drains every partition
/// (finish the batch, commit, release) and exits.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    let (decoder, built_in) = cfg.decoder()?;
    if built_in {
        warn!("privacy.hash_key is not set; raw api_key/prompt fields are hashed with the built-in key");
    }
    let rt = runtime()?;
    let store = rt.block_on(connect(&cfg))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            shutdown_signal().await;
            info!("stopping: finishing and committing every partition's batch");
            stop.store(true, Ordering::Release);
        });
    }
    // Receivers and the feed's address first: a config error stops start-up
    // before any partition is taken.
    let prepared = Outward::prepare(&rt, &cfg)?;
    let pool = store.pool().clone();
    anyhow::ensure!(
        args.stage != Stages::Subjects || cfg.kafka.subjects.enabled,
        "--stage subjects: kafka.subjects.enabled is false"
    );
    let pipeline = (args.stage != Stages::Subjects)
        .then(|| {
            Pipeline::start(
                cfg.kafka.clone(),
                cfg.pipeline.clone(),
                cfg.engine.clone(),
                decoder,
                store.clone(),
                rt.handle().clone(),
            )
        })
        .transpose()?;
    // The second stage, in this process: its own consumer group on the
    // internal topic, its own workers and commits.
    let subjects = (cfg.kafka.subjects.enabled && args.stage != Stages::Gateway)
        .then(|| {
            Pipeline::start_subjects(
                cfg.kafka.clone(),
                cfg.pipeline.clone(),
                cfg.engine.clone(),
                store,
                rt.handle().clone(),
            )
        })
        .transpose()?;
    let pipelines: Vec<Pipeline> = pipeline.into_iter().chain(subjects).collect();
    let stages: Vec<Arc<PipelineMetrics>> = pipelines.iter().map(Pipeline::metrics).collect();
    let metrics = Arc::clone(&stages[0]);
    let outward = Outward::start(&rt, &cfg, prepared, pool, Some(pipeline_metrics(stages)))?;
    if let Some(a) = outward.addr {
        info!(address = %a, "feed and /metrics on http://{a}");
    }
    info!(
        topics = %cfg
            .kafka
            .topic_names()
            .iter()
            .map(|t| format!("{t} ({})", cfg.kafka.format_of(t)))
            .collect::<Vec<_>>()
            .join(","),
        brokers = %cfg.kafka.brokers,
        group = %cfg.kafka.group_id,
        stages = %pipelines.iter().map(Pipeline::stage).collect::<Vec<_>>().join(","),
        "consuming"
    );
    let progress = (args.progress_secs > 0).then(|| {
        let (m, stop, every) = (
            Arc::clone(&metrics),
            Arc::clone(&stop),
            Duration::from_secs(args.progress_secs),
        );
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(every);
                let r = m.records.load(Ordering::Relaxed);
                let rate = (r - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), r);
                let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                info!(
                    records = r,
                    rate = rate.round(),
                    partitions = c(&m.partitions),
                    dead_lettered = c(&m.dead_lettered),
                    alerts = c(&m.alerts),
                    batches = c(&m.batches),
                    last_commit_ms = c(&m.last_commit_ms),
                    retries = c(&m.retries),
                    formats = %m.formats_seen(),
                    "progress"
                );
            }
        })
    });
    // Each stage polls its consumer on a thread of its own; when one stops
    // (a signal, or an error), the others are stopped too.
    let running: Vec<_> = pipelines
        .into_iter()
        .map(|p| {
            let stop = Arc::clone(&stop);
            let stage = p.stage();
            let t = std::thread::spawn(move || {
                let r = p.run_until(&stop);
                stop.store(true, Ordering::Release);
                r
            });
            (stage, t)
        })
        .collect();
    let mut result = Ok(());
    for (stage, t) in running {
        let r = match t.join() {
            Ok(r) => r.with_context(|| format!("consuming ({stage} stage)")),
            Err(_) => Err(anyhow::anyhow!(
                "the {stage} stage's consumer thread panicked"
            )),
        };
        if result.is_ok() {
            result = r;
        }
    }
    result?;
    if let Some(p) = progress {
        let _ = p.join();
    }
    outward.stop(&rt);
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    info!(
        rebuilt = c(&metrics.caught_up),
        dead_lettered = c(&metrics.dead_lettered),
        batches = c(&metrics.batches),
        rollup_flushes = c(&metrics.rollup_flushes),
        gaps = c(&metrics.gaps),
        stalled = c(&metrics.stalled),
        formats = %metrics.formats_seen(),
        "stopped after {} records",
        c(&metrics.records)
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The pipelines' part of `/metrics` (stage one's, and the second stage's
/// with a `stage` label), each family's samples together.
pub(crate) fn pipeline_metrics(stages: Vec<Arc<PipelineMetrics>>) -> Render {
    // Names and help are the pipeline's own (ingest::telemetry).
    Arc::new(move |out: &mut Exposition| {
        let mut samples: Vec<_> = stages.iter().flat_map(|m| m.samples()).collect();
        // Stable: each family's samples keep their order.
        samples.sort_by_key(|s| s.name);
        let m = &stages[0];
        for s in samples {
            let labels: Vec<(&str, &str)> =
                s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            match s.kind {
                Kind::Counter => out.counter(s.name, s.help, &labels, s.value),
                Kind::Gauge => out.gauge(s.name, s.help, &labels, s.value),
            }
        }
        let (buckets, sum, count) = m.commit_seconds.snapshot();
        let (name, help) = COMMIT_SECONDS;
        out.histogram(name, help, &buckets, sum, count);
    })
}
