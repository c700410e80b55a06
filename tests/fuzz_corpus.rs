//! Every input in the fuzz corpus (`fuzz/corpus/TARGET/`), run through its
//! target's checks: the inputs the fuzzer found interesting, and any crash
//! it found once (kept there after the fix), stay tested without nightly.
//! `bash scripts/fuzz` grows the corpus; docs/fuzzing.md has its figures.

use std::path::Path;

#[path = "../detectors/tests/adapters/check.rs"]
mod gateway;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    inputs
}

fn replay(target: &str, check: impl Fn(&[u8])) {
    for (path, data) in corpus(target) {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        assert!(ok.is_ok(), "{path} fails the {target} checks");
    }
}

fn is_json(b: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
}

#[test]
fn the_decoder_passes_its_corpus() {
    let accepted = std::cell::Cell::new(0);
    replay("decode", |d| {
        accepted.set(accepted.get() + usize::from(detectors::decode::fuzz_one(d, is_json)));
    });
    // The checks on accepted records ran: the corpus is not all refusals.
    assert!(accepted.get() >= 3, "{} inputs accepted", accepted.get());
}

#[test]
fn the_ndjson_reader_passes_its_corpus() {
    replay("ndjson", ingest::ndjson::fuzz_one);
}

#[test]
fn redaction_passes_its_corpus() {
    replay("redact", ingest::kafka::fuzz_redact);
}

#[test]
fn the_feed_request_parser_passes_its_corpus() {
    replay("feed_request", alerting::request::fuzz_one);
}

#[test]
fn the_gateway_adapters_pass_their_corpus() {
    let accepted = std::cell::Cell::new(0);
    replay("gateway", |d| {
        accepted.set(accepted.get() + gateway::gateway(d))
    });
    assert!(accepted.get() >= 10, "{} reads accepted", accepted.get());
}
