//! `keywatch`: the command line. Wiring only; the logic lives in the crates.

#[cfg(feature = "heap-stats")]
mod alloc;
mod config;
mod demo;
mod replay;
mod run;
mod serve;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Production allocations pay nothing for this: the counting allocator is
// built in only with `--features heap-stats` (replay's heap figure).
#[cfg(feature = "heap-stats")]
#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Live heap bytes, when built with the counting allocator.
fn live_heap_bytes() -> Option<usize> {
    #[cfg(feature = "heap-stats")]
    let live = Some(alloc::live_bytes());
    #[cfg(not(feature = "heap-stats"))]
    let live = None;
    live
}

/// keywatch watches an LLM gateway's request logs and catches the abuse that
/// costs money: request floods, token-exhaustion prompts, prompt farming,
/// leaked keys and runaway spend.
#[derive(Parser, Debug)]
#[command(name = "keywatch", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The service: consume gateway records from Kafka, run every detector,
    /// and commit rollups, alerts, actions, state and offsets to Postgres in
    /// one transaction per batch (plus Parquet files for the lake).
    Run(run::RunArgs),
    /// The whole pipeline with nothing installed: an in-process Kafka with
    /// simulated traffic and attacks in accelerated real time, the real
    /// consumer and detectors, the Parquet lake, and a live page.
    Demo(demo::DemoArgs),
    /// The alert dispatcher, the revocation feed and the log intake
    /// (`POST /v1/logs`, when `[intake]` is enabled) without the Kafka
    /// pipeline (`run` includes them all).
    Serve(serve::ServeArgs),
    /// Block or unblock a key (or every key of a user) by hand, or list what is blocked.
    Keys(serve::KeysArgs),
    /// Make a bearer token for a gateway polling the feed, and its config lines.
    Token(serve::TokenArgs),
    /// List receivers and their deliveries, or re-enable one disabled by a 410.
    Receivers(serve::ReceiversArgs),
    /// Create or update the Postgres schema (also done by `run` at start-up).
    Migrate(run::MigrateArgs),
    /// Run the detectors over NDJSON gateway records, in file order on event
    /// time. Alerts go to stdout as NDJSON; a summary goes to stderr.
    Replay(replay::ReplayArgs),
    /// Write realistic simulated gateway traffic with injected attacks as
    /// NDJSON (deterministic for a seed).
    Simulate(simulate::SimulateArgs),
}

/// Config file flag shared by commands that run the detectors.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Config file (TOML; see keywatch.example.toml). Without it, the
    /// defaults apply. `KEYWATCH__SECTION__FIELD` environment variables override it.
    #[arg(long, short = 'c', env = "KEYWATCH_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging() {
        eprintln!("keywatch: error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Migrate(args) => run::migrate(args),
        Command::Demo(args) => demo::demo(args),
        Command::Serve(args) => serve::serve(args),
        Command::Keys(args) => serve::keys(args),
        Command::Token(args) => serve::token(args),
        Command::Receivers(args) => serve::receivers(args),
        Command::Replay(args) => replay::run(args),
        Command::Simulate(args) => simulate::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keywatch: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Log lines go to stderr through `tracing`: `RUST_LOG` filters them (an
/// `EnvFilter` directive such as `warn,ingest=debug`; default `info` for
/// keywatch's own crates and `warn` for libraries), and
/// `KEYWATCH_LOG_FORMAT=json` writes one JSON object per line for log
/// shippers (default `text`). A command's own output (replay's summary,
/// the demo's console) is not a log and is not affected.
fn init_logging() -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    const DEFAULT: &str = "warn,keywatch=info,ingest=info,storage=info,alerting=info";
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).map_err(|e| {
            format!("RUST_LOG: {e} (e.g. RUST_LOG=info or RUST_LOG=warn,ingest=debug)")
        })?,
        _ => EnvFilter::new(DEFAULT),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter);
    match std::env::var("KEYWATCH_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().try_init(),
        Ok("text") | Ok("") | Err(_) => builder.try_init(),
        Ok(other) => {
            return Err(format!(
                "KEYWATCH_LOG_FORMAT: expected text or json, got {other:?}"
            ))
        }
    }
    .map_err(|e| format!("starting the logger: {e}"))
}
