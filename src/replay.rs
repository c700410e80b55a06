//! `keywatch replay`: the detectors over an NDJSON file, on event time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::subject::{Seq, SubjectsTracked};
use detectors::{Alert, Engine, EngineStats, Outcome, SubjectEngine, Tracked};
use ingest::ndjson::{Line, LineReader};
use serde::Serialize;
use sim::{evaluate, AlertRef, Truth};

use crate::config::Config;
use crate::ConfigArg;

/// Arguments of `keywatch replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// NDJSON file of gateway records (one JSON object per line, or a JSON
    /// array of them: a batched message), or `-` for standard input.
    input: PathBuf,
    /// The records' log format: canonical, litellm, kong, apisix,
    /// envoy-ai-gateway, or auto (each record's recognised by its shape).
    /// Default: `kafka.format` from the config.
    #[arg(long)]
    format: Option<Format>,
    /// Decode every record but run no detectors: the decoder's limit on the same input.
    #[arg(long)]
    decode_only: bool,
    /// Ground truth written by `keywatch simulate --truth`: score the alerts against it.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Print the summary to stderr as one JSON object instead of text.
    #[arg(long)]
    json_summary: bool,
    /// Decode errors to print one by one (all are counted by reason).
    #[arg(long, default_value_t = 20)]
    show_errors: usize,
    /// The reference clock for event times (RFC 3339; default: the wall clock
    /// at start): a record more than `engine.event_time.max_ahead_secs` past
    /// it is counted at that bound. Set it to the export's end when
    /// replaying history, so a record from the future of the data is held.
    #[arg(long, value_parser = parse_now)]
    now: Option<i64>,
}

fn parse_now(s: &str) -> Result<i64, String> {
    detectors::time::parse_rfc3339(s)
        .ok_or_else(|| format!("expected an RFC 3339 time such as 2026-11-23T12:00:00Z, got {s:?}"))
}

/// Line numbers kept per decode-error reason.
const LINES_PER_REASON: usize = 10;

/// Decode errors of one reason.
#[derive(Debug, Default, Serialize)]
struct ErrorGroup {
    count: u64,
    /// First line numbers with this reason.
    lines: Vec<u64>,
}

impl ErrorGroup {
    /// Counts line `line_no`, keeping the first few line numbers.
    fn add(&mut self, line_no: u64) {
        self.count += 1;
        if self.lines.len() < LINES_PER_REASON {
            self.lines.push(line_no);
        }
    }
}

/// One line of a grouped count: `    name: N (lines 1, 2, …)`.
fn write_group(w: &mut impl Write, name: &str, g: &ErrorGroup) -> std::io::Result<()> {
    let lines: Vec<String> = g.lines.iter().map(|l| l.to_string()).collect();
    let more = if g.count as usize > g.lines.len() {
        ", …"
    } else {
        ""
    };
    writeln!(
        w,
        "    {name}: {} (lines {}{more})",
        group(g.count),
        lines.join(", ")
    )
}

/// What the second stage did.
#[derive(Debug, Default, Serialize)]
struct SubjectsSummary {
    /// Alerts of the second stage, by kind.
    alerts: BTreeMap<&'static str, u64>,
    /// Projections its detectors took.
    taken: u64,
    /// Taken out of event-time order (later than `subjects.lateness_secs`).
    late: u64,
    tracked: SubjectsTracked,
}

/// What a replay did.
#[derive(Debug, Default, Serialize)]
struct Summary {
    records: u64,
    /// Lines that held a JSON array of records, and the records in them.
    array_lines: u64,
    array_records: u64,
    /// The format the records were read in (`auto`: recognised per record).
    format: &'static str,
    /// Records decoded, by the format they were read as.
    formats: BTreeMap<&'static str, u64>,
    bytes: u64,
    blank_lines: u64,
    decoded: u64,
    decode_errors: u64,
    /// By `field: kind`.
    decode_errors_by_reason: BTreeMap<String, ErrorGroup>,
    /// Records counted with a descriptive field cut or dropped.
    repaired: u64,
    /// By field.
    repaired_by_field: BTreeMap<&'static str, ErrorGroup>,
    seconds: f64,
    records_per_second: f64,
    decode_only: bool,
    hash_key_built_in: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<EngineStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracked: Option<Tracked>,
    /// The second stage (address, network, key and prompt subjects).
    #[serde(skip_serializing_if = "Option::is_none")]
    subjects: Option<SubjectsSummary>,
    alerts: u64,
    /// Heap held at the end (null unless built with `--features heap-stats`).
    heap_bytes: Option<usize>,
    heap_bytes_per_user: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evaluation: Option<serde_json::Value>,
    /// Second-stage alerts by kind, while running.
    #[serde(skip)]
    second_alerts: BTreeMap<&'static str, u64>,
}

/// Runs the command.
pub fn run(args: ReplayArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    let (decoder, built_in) = cfg.decoder()?;
    let format = args.format.unwrap_or(cfg.kafka.format);
    let source = args.input.display().to_string();
    let mut engine = Engine::new(&cfg.engine)?;
    // The second stage, in this process (one source: the file), unless
    // `kafka.subjects.enabled` is false.
    let mut subjects = cfg
        .kafka
        .subjects
        .enabled
        .then(|| SubjectEngine::new(&cfg.engine))
        .transpose()?;
    let truth = match &args.truth {
        Some(p) => {
            let f = File::open(p).with_context(|| format!("opening truth file {}", p.display()))?;
            let t: Truth = serde_json::from_reader(io::BufReader::new(f)).with_context(|| {
                format!(
                    "truth file {} is not a keywatch simulate truth file",
                    p.display()
                )
            })?;
            Some(t)
        }
        None => None,
    };
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    let mut stderr = io::stderr().lock();
    let mut s = Summary {
        decode_only: args.decode_only,
        hash_key_built_in: built_in,
        format: format.as_str(),
        ..Default::default()
    };
    let mut alerts: Vec<Alert> = Vec::new();
    let mut kept: Vec<Alert> = Vec::new();
    let mut shown = 0usize;
    let heap_before = crate::live_heap_bytes();

    let reference_ms = args.now.unwrap_or_else(detectors::time::wall_clock_ms);
    let started = Instant::now();
    let max_record = cfg.pipeline.max_record_bytes;
    let mut handle = |line_no: u64, line: Line<'_>| -> Result<()> {
        let text = match line {
            Line::Text(t) if t.len() <= max_record => Ok(t),
            Line::Text(t) => Err(t.len() as u64),
            Line::TooLong(n) => Err(n),
        };
        let t = match text {
            Ok(t) => {
                s.bytes += t.len() as u64 + 1;
                if t.iter().all(u8::is_ascii_whitespace) {
                    s.blank_lines += 1;
                    return Ok(());
                }
                t
            }
            // Over the cap: read and dropped, never held; a dead letter like
            // a record that does not decode.
            Err(n) => {
                s.bytes += n + 1;
                s.records += 1;
                s.decode_errors += 1;
                if shown < args.show_errors {
                    shown += 1;
                    writeln!(
                        stderr,
                        "line {line_no}: record: {n} bytes, more than pipeline.max_record_bytes ({max_record})"
                    )?;
                }
                s.decode_errors_by_reason
                    .entry("record: too_long".to_string())
                    .or_default()
                    .add(line_no);
                return Ok(());
            }
        };
        let mut result = Ok(());
        split_records(t, |piece| {
            if result.is_err() {
                return;
            }
            s.records += 1;
            let (decoded, element) = match piece {
                Piece::Record(bytes, element) => {
                    let origin = Origin {
                        stream: &source,
                        partition: 0,
                        offset: line_no as i64,
                        element,
                    };
                    (decoder.decode_as(format, bytes, &origin), element)
                }
                Piece::Broken(_, element, e) => (Err(e), Some(element)),
            };
            if let Some(i) = element {
                s.array_records += 1;
                if i == 0 {
                    s.array_lines += 1;
                }
            }
            result = (|| -> Result<()> {
                let (mut ev, read_as) = match decoded {
                    Ok(ok) => ok,
                    Err(e) => {
                        s.decode_errors += 1;
                        if shown < args.show_errors {
                            shown += 1;
                            match element {
                                Some(i) => writeln!(stderr, "line {line_no} element {i}: {e}")?,
                                None => writeln!(stderr, "line {line_no}: {e}")?,
                            }
                        }
                        s.decode_errors_by_reason
                            .entry(e.reason())
                            .or_default()
                            .add(line_no);
                        return Ok(());
                    }
                };
                s.decoded += 1;
                *s.formats.entry(read_as.as_str()).or_default() += 1;
                if !args.decode_only {
                    engine.bound_time(&mut ev, reference_ms);
                }
                if ev.repaired != 0 {
                    s.repaired += 1;
                    for field in detectors::decode::repaired_fields(ev.repaired) {
                        s.repaired_by_field.entry(field).or_default().add(line_no);
                    }
                }
                if args.decode_only {
                    std::hint::black_box(&ev);
                    return Ok(());
                }
                if let (Outcome::Counted { cost_micros }, Some(subjects)) =
                    (engine.observe(&ev, &mut alerts), subjects.as_mut())
                {
                    let mut p =
                        engine.projection(&ev, cost_micros, Seq::new(line_no as i64, element));
                    p.kinds = p.every_subject();
                    subjects.observe_local(p, engine.state().now_ms, &mut alerts, None);
                }
                emit(
                    &mut alerts,
                    &mut out,
                    &mut s,
                    truth.is_some().then_some(&mut kept),
                )?;
                Ok(())
            })();
        });
        result
    };
    if args.input.as_os_str() == "-" {
        let mut lines = LineReader::with_limit(io::stdin().lock(), max_record);
        while let Some((line_no, line)) = lines.next_line().context("reading standard input")? {
            handle(line_no, line)?;
        }
    } else {
        let file =
            File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        // SAFETY: the map is read-only and lives only for this loop; a file
        // truncated underneath by another process is outside what replay
        // promises (as with any reader of a file being rewritten).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", args.input.display()))?;
        for (line_no, line) in ingest::ndjson::lines(&map) {
            handle(line_no, Line::Text(line))?;
        }
    }
    if let (false, Some(subjects)) = (args.decode_only, subjects.as_mut()) {
        subjects.drain(&mut alerts, None);
        emit(
            &mut alerts,
            &mut out,
            &mut s,
            truth.is_some().then_some(&mut kept),
        )?;
    }
    out.flush()?;
    s.seconds = started.elapsed().as_secs_f64();
    s.records_per_second = s.records as f64 / s.seconds.max(1e-9);
    s.heap_bytes = crate::live_heap_bytes()
        .zip(heap_before)
        .map(|(now, before)| now.saturating_sub(before));
    if !args.decode_only {
        let tracked = engine.tracked();
        s.heap_bytes_per_user = s
            .heap_bytes
            .filter(|_| tracked.users > 0)
            .map(|b| b as f64 / tracked.users as f64);
        s.tracked = Some(tracked);
        s.engine = Some(engine.stats().clone());
        s.subjects = subjects.as_ref().map(|subjects| SubjectsSummary {
            alerts: std::mem::take(&mut s.second_alerts),
            taken: subjects.taken(),
            late: subjects.merge_stats().late,
            tracked: subjects.tracked(),
        });
    }
    let mut evaluation_text = None;
    if let Some(t) = &truth {
        let refs: Vec<AlertRef<'_>> = kept
            .iter()
            .map(|a| AlertRef {
                kind: a.kind.as_str(),
                user_id: &a.user_id,
                key_id: a.key_id.as_deref(),
                ts_ms: a.ts,
                action: a.action.as_str(),
                severity: a.severity.as_str(),
            })
            .collect();
        let ev = evaluate(&t.attacks, t.benign_user_days, t.start_ms, &refs);
        evaluation_text = Some(ev.to_string());
        s.evaluation = Some(serde_json::to_value(&ev)?);
    }
    if args.json_summary {
        serde_json::to_writer(&mut stderr, &s)?;
        writeln!(stderr)?;
    } else {
        write_summary(&mut stderr, &s)?;
        if let Some(t) = evaluation_text {
            writeln!(stderr, "{t}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the alerts out (and keeps them for scoring), counting them; the
/// second stage's are counted by kind too (the first's are in its stats).
fn emit(
    alerts: &mut Vec<Alert>,
    out: &mut impl Write,
    s: &mut Summary,
    mut kept: Option<&mut Vec<Alert>>,
) -> Result<()> {
    for a in alerts.drain(..) {
        serde_json::to_writer(&mut *out, &a)?;
        out.write_all(b"\n")?;
        s.alerts += 1;
        if a.kind.second_stage() {
            *s.second_alerts.entry(a.kind.as_str()).or_default() += 1;
        }
        if let Some(k) = kept.as_deref_mut() {
            k.push(a);
        }
    }
    Ok(())
}

fn group(n: u64) -> String {
    detectors::text::group_digits(n.into())
}

fn write_summary(w: &mut impl Write, s: &Summary) -> io::Result<()> {
    let mode = if s.decode_only { " (decode only)" } else { "" };
    writeln!(
        w,
        "keywatch replay{mode}: {} records in {:.3} s: {} records/s, {:.0} MB/s",
        group(s.records),
        s.seconds,
        group(s.records_per_second as u64),
        s.bytes as f64 / 1e6 / s.seconds.max(1e-9)
    )?;
    writeln!(
        w,
        "  decoded {}, decode errors {}, blank lines {}",
        group(s.decoded),
        group(s.decode_errors),
        group(s.blank_lines)
    )?;
    let seen: Vec<String> = s
        .formats
        .iter()
        .map(|(f, n)| format!("{f} {}", group(*n)))
        .collect();
    writeln!(
        w,
        "  format {}: read as {}",
        s.format,
        if seen.is_empty() {
            "nothing".to_string()
        } else {
            seen.join(", ")
        }
    )?;
    if s.array_lines > 0 {
        writeln!(
            w,
            "  {} records in {} lines holding a JSON array (each decoded and counted on its own)",
            group(s.array_records),
            group(s.array_lines)
        )?;
    }
    for (reason, g) in &s.decode_errors_by_reason {
        write_group(w, reason, g)?;
    }
    if s.repaired > 0 {
        writeln!(
            w,
            "  counted with a descriptive field cut or dropped, or a time clamped {} (flagged in the lake's `repaired` column):",
            group(s.repaired)
        )?;
        for (field, g) in &s.repaired_by_field {
            write_group(w, field, g)?;
        }
    }
    if let Some(e) = &s.engine {
        writeln!(
            w,
            "  duplicates {}, older than the previous budget period (charged to the current) {}, ahead of the reference clock (counted at its bound) {}",
            group(e.duplicates),
            group(e.late),
            group(e.ahead)
        )?;
        let kinds: Vec<String> = e
            .alerts
            .iter()
            .map(|(k, n)| format!("{} {}", k.as_str(), group(*n)))
            .collect();
        writeln!(
            w,
            "  alerts {}{}{}",
            group(s.alerts),
            if kinds.is_empty() { "" } else { ": " },
            kinds.join(", ")
        )?;
        if e.unpriced > 0 {
            let models: Vec<String> = e
                .unpriced_models
                .iter()
                // Model names come from traffic: escaped, so none can forge a line.
                .map(|(m, n)| format!("{} {}", crate::serve::printable(m), group(*n)))
                .collect();
            writeln!(
                w,
                "  unpriced records (model not in the price table, cost counted as 0): {} ({})",
                group(e.unpriced),
                models.join(", ")
            )?;
        }
        if e.unknown_tiers > 0 {
            writeln!(
                w,
                "  records naming an unknown tier (given the default tier): {}",
                group(e.unknown_tiers)
            )?;
        }
    }
    if let Some(st) = &s.subjects {
        let kinds: Vec<String> = st
            .alerts
            .iter()
            .map(|(k, n)| format!("{k} {}", group(*n)))
            .collect();
        let t = &st.tracked;
        writeln!(
            w,
            "  second stage (addresses, networks, keys, prompts across accounts): alerts {}; {} addresses, {} networks, {} keys, {} farmed prompts held; {} records taken, {} out of event-time order",
            if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") },
            group(t.addresses as u64),
            group(t.networks as u64),
            group(t.keys as u64),
            group(t.prompts as u64),
            group(st.taken),
            group(st.late)
        )?;
    }
    if let Some(t) = &s.tracked {
        writeln!(
            w,
            "  state: {} users, {} keys, {} prompt sightings; {}",
            group(t.users as u64),
            group(t.keys as u64),
            group(t.prompt_sightings as u64),
            match (s.heap_bytes, s.heap_bytes_per_user) {
                (Some(b), per_user) => format!(
                    "heap {:.1} MiB{}",
                    b as f64 / (1024.0 * 1024.0),
                    per_user
                        .map(|u| format!(" ({u:.0} bytes per tracked user, all state included)"))
                        .unwrap_or_default()
                ),
                (None, _) => "heap not counted (build with --features heap-stats)".into(),
            }
        )?;
    }
    if s.hash_key_built_in {
        writeln!(w, "  note: privacy.hash_key is not set; raw api_key/prompt fields were hashed with the built-in key")?;
    }
    Ok(())
}
