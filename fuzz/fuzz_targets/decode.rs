//! The canonical decoder on any bytes, with serde_json as the reference
//! for what is JSON (see `detectors::decode::fuzz_one`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    detectors::decode::fuzz_one(data, |b| {
        serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    });
});
