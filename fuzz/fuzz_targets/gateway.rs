//! The gateway adapters (`decode_as` in every format, with and without
//! `[gateways]` options) and `split_records` on any bytes: the checks of
//! `detectors/tests/adapters/check.rs`, which the property tests and the
//! corpus replay (`tests/fuzz_corpus.rs`) run too.
#![no_main]

#[path = "../../detectors/tests/adapters/check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::gateway(data);
});
