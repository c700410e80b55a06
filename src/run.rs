//! `keywatch run` (the service) and `keywatch migrate`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alerting::metrics::{Exposition, Render};
use anyhow::{Context, Result};
use ingest::kafka::{Pipeline, PipelineMetrics};
use storage::Store;

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
    eprintln!("keywatch migrate: schema is up to date");
    Ok(ExitCode::SUCCESS)
}

/// Runs the service until SIGINT or SIGTERM, then drains every partition
/// (finish the batch, commit, release) and exits.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    let (key, built_in) = cfg.hash_key()?;
    if built_in {
        eprintln!("keywatch run: warning: privacy.hash_key is not set; raw api_key/prompt fields are hashed with the built-in key");
    }
    let rt = runtime()?;
    let store = rt.block_on(connect(&cfg))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            shutdown_signal().await;
            eprintln!("keywatch run: stopping: finishing and committing every partition's batch");
            stop.store(true, Ordering::Release);
        });
    }
    // Receivers and the feed's address first: a config error stops start-up
    // before any partition is taken.
    let prepared = Outward::prepare(&rt, &cfg)?;
    let pool = store.pool().clone();
    let pipeline = Pipeline::start(
        cfg.kafka.clone(),
        cfg.pipeline.clone(),
        cfg.engine.clone(),
        &key,
        store,
        rt.handle().clone(),
    )?;
    let metrics = pipeline.metrics();
    let outward = Outward::start(
        &rt,
        &cfg,
        prepared,
        pool,
        Some(pipeline_metrics(Arc::clone(&metrics))),
    )?;
    if let Some(a) = outward.addr {
        eprintln!("keywatch run: feed and /metrics on http://{a}");
    }
    eprintln!(
        "keywatch run: consuming {} from {} as group {}",
        cfg.kafka.topics.join(", "),
        cfg.kafka.brokers,
        cfg.kafka.group_id
    );
    let progress = (args.progress_secs > 0).then(|| {
        let (m, stop, every) = (Arc::clone(&metrics), Arc::clone(&stop), Duration::from_secs(args.progress_secs));
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(every);
                let r = m.records.load(Ordering::Relaxed);
                let rate = (r - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), r);
                eprintln!(
                    "keywatch run: {r} records ({rate:.0}/s), {} partitions, {} dead-lettered, {} alerts, {} batches (last commit {} ms), {} retries",
                    m.partitions.load(Ordering::Relaxed),
                    m.dead_lettered.load(Ordering::Relaxed),
                    m.alerts.load(Ordering::Relaxed),
                    m.batches.load(Ordering::Relaxed),
                    m.last_commit_ms.load(Ordering::Relaxed),
                    m.retries.load(Ordering::Relaxed),
                );
            }
        })
    });
    pipeline.run_until(&stop).context("consuming")?;
    stop.store(true, Ordering::Release);
    if let Some(p) = progress {
        let _ = p.join();
    }
    outward.stop(&rt);
    eprintln!(
        "keywatch run: stopped after {} records ({} re-read to rebuild state, {} dead-lettered, {} batches, {} offset gaps, {} stalled partitions)",
        metrics.records.load(Ordering::Relaxed),
        metrics.caught_up.load(Ordering::Relaxed),
        metrics.dead_lettered.load(Ordering::Relaxed),
        metrics.batches.load(Ordering::Relaxed),
        metrics.gaps.load(Ordering::Relaxed),
        metrics.stalled.load(Ordering::Relaxed),
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

/// The pipeline's part of `/metrics`.
pub(crate) fn pipeline_metrics(m: Arc<PipelineMetrics>) -> Render {
    Arc::new(move |out: &mut Exposition| {
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.counter(
            "keywatch_events_total",
            "Gateway records read from Kafka (including re-reads after a restart).",
            &[],
            c(&m.records),
        );
        out.counter(
            "keywatch_events_decoded_total",
            "Records decoded and run through the detectors.",
            &[],
            c(&m.decoded),
        );
        out.counter(
            "keywatch_events_repaired_total",
            "Records counted with a descriptive field cut or dropped, or a time clamped (the lake's `repaired` column names which).",
            &[],
            c(&m.repaired),
        );
        out.counter(
            "keywatch_events_ahead_total",
            "Records whose time was past their Kafka message's timestamp by more than engine.event_time.max_ahead_secs (counted at that bound).",
            &[],
            c(&m.ahead),
        );
        out.counter(
            "keywatch_decode_errors_total",
            "Records that could not be decoded (dead-lettered).",
            &[],
            c(&m.dead_lettered),
        );
        for (kind, n) in m.alerts_by_kind.lock().expect("metrics lock").iter() {
            out.counter(
                "keywatch_alerts_total",
                "Alerts committed, by kind (a replayed batch counts again; the alerts table has each once).",
                &[("kind", kind)],
                *n as f64,
            );
        }
        out.counter(
            "keywatch_batches_total",
            "Batches committed.",
            &[],
            c(&m.batches),
        );
        out.counter(
            "keywatch_commit_retries_total",
            "Commit or dead-letter attempts that failed and were retried.",
            &[],
            c(&m.retries),
        );
        out.counter(
            "keywatch_partitions_stalled_total",
            "Partitions stopped by a commit the database refused for its content (logged; an operator acts).",
            &[],
            c(&m.stalled),
        );
        out.counter(
            "keywatch_offset_gaps_total",
            "Offset gaps a partition's worker saw (compaction or transaction markers; otherwise a bug).",
            &[],
            c(&m.gaps),
        );
        out.counter(
            "keywatch_records_rebuilt_total",
            "Records re-read up to the committed offset to rebuild state after an assignment (nothing written).",
            &[],
            c(&m.caught_up),
        );
        out.counter(
            "keywatch_records_misrouted_total",
            "Records that arrived on the consumer's main queue instead of their partition's (should stay 0).",
            &[],
            c(&m.unexpected),
        );
        out.counter(
            "keywatch_fenced_total",
            "Commits refused because another consumer owns the partition now.",
            &[],
            c(&m.fenced),
        );
        out.gauge(
            "keywatch_partitions",
            "Partitions this instance is working.",
            &[],
            c(&m.partitions),
        );
        for ((topic, partition), o) in m.offsets.lock().expect("metrics lock").iter() {
            if let Some(lag) = o.lag() {
                out.gauge(
                    "keywatch_consumer_lag",
                    "Records on the broker not yet committed to Postgres, per partition.",
                    &[("topic", topic), ("partition", &partition.to_string())],
                    lag as f64,
                );
            }
        }
        let (buckets, sum, count) = m.commit_seconds.snapshot();
        out.histogram(
            "keywatch_batch_commit_seconds",
            "Time to commit a batch: dead letters, Parquet and the Postgres transaction.",
            &buckets,
            sum,
            count,
        );
    })
}
