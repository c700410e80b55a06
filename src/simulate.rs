//! `keywatch simulate`: realistic gateway traffic with injected attacks.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use sim::{LogFormat, Profile, SimConfig, Simulator, Truth};

/// Arguments of `keywatch simulate`.
#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Benign accounts.
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// Simulated hours.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Seed: the same seed and flags give byte-identical output.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First instant (RFC 3339).
    #[arg(long, default_value = "2026-11-23T00:00:00Z")]
    start: String,
    /// Shape of benign traffic: `standard` (what the detectors were tuned on) or `shifted` (a held-out shape).
    #[arg(long, default_value = "standard")]
    profile: Profile,
    /// Attacks injected per 1,000 user-days (at least one of each kind when above 0 and hours >= 2).
    #[arg(long, default_value_t = 20.0)]
    attacks_per_1k_user_days: f64,
    /// Share of users whose gateway logs split request/response records
    /// (canonical format only: with a gateway format it is forced to 0, as
    /// those gateways log a whole exchange in one record).
    #[arg(long, default_value_t = 0.2)]
    split_fraction: f64,
    /// Share of records delivered twice (as at-least-once log shippers do).
    #[arg(long, default_value_t = 0.005)]
    duplicate_fraction: f64,
    /// Log format of the records: canonical (keywatch's event), or a
    /// gateway's own shape: litellm, kong, apisix, envoy-ai-gateway (what
    /// `keywatch replay --format` reads). The same seed gives the same
    /// exchanges in every format.
    #[arg(long, default_value = "canonical")]
    format: LogFormat,
    /// Records per line: above 1, each line is a JSON array of this many
    /// records (the last may hold fewer), a batched message as Kong's
    /// kafka-log, APISIX's kafka-logger and LiteLLM's generic_api send them.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// With a gateway format: log no request or response bodies, as with
    /// LiteLLM's turn_off_message_logging, Kong's log_payloads off or
    /// APISIX's logging.payloads off (records then name no prompt). By
    /// default LiteLLM and APISIX log them, Kong on three keys in four.
    #[arg(long)]
    no_payloads: bool,
    /// Write the ground truth (every injected attack) to this JSON file.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Write records here instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

/// Runs the command.
pub fn run(a: SimulateArgs) -> Result<ExitCode> {
    let start_ms = detectors::time::parse_rfc3339(&a.start)
        .with_context(|| format!("--start: expected an RFC 3339 timestamp, got {:?}", a.start))?;
    anyhow::ensure!(a.hours > 0.0, "--hours: must be above 0, got {}", a.hours);
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.split_fraction),
        "--split-fraction: must be from 0 to 1"
    );
    anyhow::ensure!(
        (0.0..=0.5).contains(&a.duplicate_fraction),
        "--duplicate-fraction: must be from 0 to 0.5"
    );
    anyhow::ensure!(
        a.attacks_per_1k_user_days >= 0.0,
        "--attacks-per-1k-user-days: must not be negative"
    );
    anyhow::ensure!(a.batch >= 1, "--batch: must be at least 1");
    anyhow::ensure!(
        !a.no_payloads || a.format.is_gateway(),
        "--no-payloads: only with a gateway format (--format litellm, kong, apisix or envoy-ai-gateway)"
    );
    // A gateway logs a whole exchange in one record.
    let split_fraction = if a.format.is_gateway() {
        0.0
    } else {
        a.split_fraction
    };
    let cfg = SimConfig {
        users: a.users,
        hours: a.hours,
        seed: a.seed,
        start_ms,
        profile: a.profile,
        attacks_per_1k_user_days: a.attacks_per_1k_user_days,
        split_fraction,
        duplicate_fraction: a.duplicate_fraction,
        opening: false,
    };
    let mut sim = Simulator::new(cfg)
        .with_format(a.format)
        .with_payloads(!a.no_payloads);
    let sink: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    let mut buf = String::with_capacity(1 << 16);
    let mut records = 0u64;
    if a.batch == 1 {
        while sim.next_record(&mut buf).is_some() {
            records += 1;
            if buf.len() >= 60_000 {
                out.write_all(buf.as_bytes())?;
                buf.clear();
            }
        }
    } else {
        // `[r1,r2,…]` per line: each record without its newline.
        let mut record = String::with_capacity(1 << 12);
        let mut in_batch = 0;
        while sim.next_record(&mut record).is_some() {
            records += 1;
            buf.push(if in_batch == 0 { '[' } else { ',' });
            buf.push_str(record.trim_end_matches('\n'));
            record.clear();
            in_batch += 1;
            if in_batch == a.batch {
                buf.push_str("]\n");
                in_batch = 0;
                if buf.len() >= 60_000 {
                    out.write_all(buf.as_bytes())?;
                    buf.clear();
                }
            }
        }
        if in_batch > 0 {
            buf.push_str("]\n");
        }
    }
    out.write_all(buf.as_bytes())?;
    out.flush()?;
    if let Some(p) = &a.truth {
        let truth = Truth {
            benign_user_days: sim.benign_user_days(),
            attacks: sim.attacks().to_vec(),
            start_ms: Some(sim.start_ms()),
        };
        let f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
        serde_json::to_writer_pretty(BufWriter::new(f), &truth)?;
    }
    let mut shape = match (a.format, a.batch) {
        (LogFormat::Canonical, 1) => String::new(),
        (f, 1) => format!(" as {f} (exchanges only)"),
        (f, n) => format!(" as {f} in arrays of {n}"),
    };
    if a.no_payloads {
        shape.push_str(", no bodies");
    }
    eprintln!(
        "keywatch simulate: {records} records{shape}, {} attacks",
        sim.attacks().len()
    );
    Ok(ExitCode::SUCCESS)
}
