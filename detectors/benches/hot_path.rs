//! The hot path, measured with criterion: decoding a record, and decoding
//! plus every detector, over simulated gateway traffic (~400-byte records).
//!
//! `cargo bench -p detectors --bench hot_path`

// criterion_group! makes an undocumented public fn.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use detectors::{Decoder, Engine, EngineConfig};
use sim::{SimConfig, Simulator};

/// Simulated records, one per line.
fn trace(users: u32, hours: f64) -> Vec<String> {
    let mut sim = Simulator::new(SimConfig {
        users,
        hours,
        seed: 42,
        ..SimConfig::default()
    });
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

criterion_group!(benches, hot_path);
criterion_main!(benches);
