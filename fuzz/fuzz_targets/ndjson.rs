//! The NDJSON reader, any text in reads of any size (see `ingest::ndjson::fuzz_one`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::ndjson::fuzz_one(data));
