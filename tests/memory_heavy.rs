//! Memory per heavy account: what one account sending a prompt every 4
//! seconds (21,600 a day, the heaviest ServeGen customers' rate) costs
//! while an hour of its prompts is in the window, with distinct
//! fingerprints and with none (the difference is its prompt table, which
//! the per-account bound keeps small; the rest is its learned state and
//! the duplicate check's entries for its last 30 minutes of records).
//! A process of its own: malloc's reuse of another test's freed blocks
//! would blur the count.
//! `cargo test --release --test memory_heavy -- --nocapture` prints them.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use detectors::{Engine, EngineConfig, Event};

mod counting;

use counting::RESERVED;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

const T0: i64 = 1_795_392_000_000; // 2026-11-23T00:00:00Z

/// Bytes per heavy account (reserved by malloc), measured while its last
/// hour of prompts is still in the window: `accounts` accounts each sending
/// a prompt every 4 seconds for two hours, distinct ones when
/// `fingerprints`, none at all otherwise.
fn bytes_per_heavy_account(accounts: u32, fingerprints: bool) -> f64 {
    let mut engine = Engine::new(&EngineConfig::default()).unwrap();
    let mut alerts = Vec::new();
    let before = RESERVED.load(Ordering::Relaxed);
    let mut strings = (String::new(), String::new(), String::new());
    for step in 0..1800u32 {
        for a in 0..accounts {
            let (rid, uid, fp) = &mut strings;
            rid.clear();
            uid.clear();
            fp.clear();
            use std::fmt::Write;
            write!(rid, "req_{a}_{step}").unwrap();
            write!(uid, "heavy_{a:05}").unwrap();
            write!(fp, "{:016x}", (a as u64) << 32 | step as u64).unwrap();
            let mut ev = Event::new(T0 + step as i64 * 4000, rid, uid, uid);
            ev.tier = Some(Cow::Borrowed("enterprise"));
            ev.model = Some(Cow::Borrowed("gpt-4o-mini"));
            ev.prompt_tokens = 800;
            ev.completion_tokens = 300;
            if fingerprints {
                ev.prompt_fingerprint = Some(Cow::Borrowed(fp));
            }
            ev.ip = Some(std::net::IpAddr::from([198, 51, 100, a as u8]));
            ev.asn = Some(64500);
            engine.observe(&ev, &mut alerts);
            alerts.clear();
        }
    }
    let tracked = engine.tracked();
    assert_eq!(tracked.users as u32, accounts);
    let reserved = (RESERVED.load(Ordering::Relaxed) - before) as f64 / accounts as f64;
    eprintln!(
        "{accounts} heavy accounts (a prompt every 4 s{}): {reserved:.0} bytes each reserved by malloc, {} prompt sightings held",
        if fingerprints { ", all distinct" } else { ", no fingerprints" },
        tracked.prompt_sightings
    );
    drop(engine);
    reserved
}

#[test]
fn a_heavy_accounts_prompt_table_stays_small() {
    // The rest of a heavy account's cost is its records' duplicate-check
    // entries (30 minutes of them) and its learned state.
    let without = bytes_per_heavy_account(200, false);
    let with = bytes_per_heavy_account(200, true);
    let table = with - without;
    eprintln!("prompt table: {table:.0} bytes per heavy account");
    assert!(
        table < 4096.0,
        "{table:.0} bytes of prompt table per heavy account"
    );
}
