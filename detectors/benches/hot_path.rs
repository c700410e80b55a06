//! The hot path, measured with criterion: decoding a record, and decoding
//! plus every detector, over simulated gateway traffic (~400-byte records);
//! and each gateway adapter on the same simulated requests rendered in its
//! gateway's log format (`decode_formats`).
//!
//! `cargo bench -p detectors --bench hot_path`

// criterion_group! makes an undocumented public fn.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use detectors::decode::{Format, GatewayOptions, Origin};
use detectors::{Decoder, Engine, EngineConfig};
use sim::{LogFormat, SimConfig, Simulator};

/// Simulated records, one per line.
fn trace(users: u32, hours: f64) -> Vec<String> {
    rendered(users, hours, LogFormat::Canonical, 0.2)
}

/// Simulated records in `format`, one per line (`split`: the share of
/// users whose records come as a request and a response).
fn rendered(users: u32, hours: f64, format: LogFormat, split: f64) -> Vec<String> {
    let mut sim = Simulator::new(SimConfig {
        users,
        hours,
        seed: 42,
        split_fraction: split,
        ..SimConfig::default()
    })
    .with_format(format);
    let mut buf = String::new();
    let mut lines = Vec::new();
    while sim.next_record(&mut buf).is_some() {
        lines.push(buf.trim_end().to_string());
        buf.clear();
    }
    lines
}

fn hot_path(c: &mut Criterion) {
    let lines = trace(2000, 6.0);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let decoder = Decoder::new(b"bench-key");
    let mut g = c.benchmark_group("hot_path");
    g.sample_size(10);
    g.throughput(Throughput::Elements(lines.len() as u64));
    eprintln!(
        "trace: {} records, mean {} bytes",
        lines.len(),
        bytes / lines.len()
    );

    g.bench_function("decode", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(decoder.decode(l.as_bytes()).unwrap());
            }
        })
    });
    g.bench_function("decode_and_detect", |b| {
        b.iter_batched(
            || Engine::new(&EngineConfig::default()).unwrap(),
            |mut engine| {
                let mut alerts = Vec::new();
                for l in &lines {
                    let ev = decoder.decode(l.as_bytes()).unwrap();
                    engine.observe(&ev, &mut alerts);
                    alerts.clear();
                }
                engine
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Each adapter against the canonical decoder on the same requests (no
/// request/response split: gateways log a whole exchange).
fn decode_formats(c: &mut Criterion) {
    let decoder = Decoder::with_options(
        b"bench-key",
        GatewayOptions {
            account_header: Some("x-tenant-id".into()),
            ..GatewayOptions::default()
        },
    );
    let mut g = c.benchmark_group("decode_formats");
    g.sample_size(10);
    for (sim_format, format) in [
        (LogFormat::Canonical, Format::Canonical),
        (LogFormat::Litellm, Format::Litellm),
        (LogFormat::Kong, Format::Kong),
        (LogFormat::Apisix, Format::Apisix),
        (LogFormat::EnvoyAiGateway, Format::EnvoyAiGateway),
    ] {
        let lines = rendered(500, 6.0, sim_format, 0.0);
        let bytes: usize = lines.iter().map(|l| l.len()).sum();
        eprintln!(
            "{}: {} records, mean {} bytes",
            format.as_str(),
            lines.len(),
            bytes / lines.len()
        );
        g.throughput(Throughput::Elements(lines.len() as u64));
        for (name, as_format) in [(format.as_str(), format), ("auto", Format::Auto)] {
            if name == "auto" && format == Format::Canonical {
                continue;
            }
            let id = if name == "auto" {
                format!("{}/auto", format.as_str())
            } else {
                name.to_string()
            };
            g.bench_function(id, |b| {
                b.iter(|| {
                    for l in &lines {
                        black_box(
                            decoder
                                .decode_as(as_format, l.as_bytes(), &Origin::NOWHERE)
                                .unwrap(),
                        );
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, hot_path, decode_formats);
criterion_main!(benches);
