//! The feed's query, bearer token and If-None-Match parsing (see
//! `alerting::request::fuzz_one`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| alerting::request::fuzz_one(data));
