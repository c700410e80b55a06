//! Dead-letter redaction on any bytes (see `ingest::kafka::fuzz_redact`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::kafka::fuzz_redact(data));
