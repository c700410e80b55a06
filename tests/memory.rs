//! Memory per tracked user: the engine's learned state for many users,
//! measured with a counting allocator (a bound on bytes, not a timing).
//!
//! Each user gets a realistic handful of records (two keys, prompts, an
//! address, costs); then time moves on past the prompt and duplicate
//! windows, so what remains is the per-user and per-key state that lives
//! for the idle TTL. `cargo test --release --test memory -- --nocapture`
//! prints the figures: bytes asked for, and bytes malloc reserved for them
//! (rounding and block headers included; the bound is on this one).
//! `KEYWATCH_MEMORY_USERS` (comma-separated, e.g.
//! `KEYWATCH_MEMORY_USERS=1000000`) measures other user counts instead of
//! the default 10,000 and 100,000, under the same bound.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use detectors::{Engine, EngineConfig, Event};

mod counting;

use counting::{LIVE, RESERVED};

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

const T0: i64 = 1_795_392_000_000; // 2026-11-23T00:00:00Z

/// Bytes per user: (asked for, reserved by malloc).
fn bytes_per_user(users: u32) -> (f64, f64) {
    let mut engine = Engine::new(&EngineConfig::default()).unwrap();
    let mut alerts = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    let before_reserved = RESERVED.load(Ordering::Relaxed);
    let mut strings = (String::new(), String::new(), String::new(), String::new());
    for u in 0..users {
        for i in 0..6u32 {
            let (rid, uid, kid, fp) = &mut strings;
            rid.clear();
            uid.clear();
            kid.clear();
            fp.clear();
            use std::fmt::Write;
            write!(rid, "req_{u:08}_{i}").unwrap();
            write!(uid, "acct_{u:08}").unwrap();
            write!(kid, "key_{:08x}_{}", u.wrapping_mul(2_654_435_761), i % 2).unwrap();
            write!(fp, "{:016x}", (u as u64) << 8 | i as u64).unwrap();
            let mut ev = Event::new(
                T0 + (u as i64 % 3600) * 1000 + i as i64 * 20_000,
                rid,
                uid,
                kid,
            );
            ev.tier = Some(Cow::Borrowed(["free", "pro", "enterprise"][u as usize % 3]));
            ev.model = Some(Cow::Borrowed("gpt-4o-mini"));
            ev.prompt_tokens = 300;
            ev.completion_tokens = 200;
            ev.prompt_fingerprint = Some(Cow::Borrowed(fp));
            ev.ip = Some(std::net::IpAddr::from([203, 0, (u >> 8) as u8, u as u8]));
            ev.asn = Some(64500);
            engine.observe(&ev, &mut alerts);
            alerts.clear();
        }
    }
    // Two hours later, past the prompt window and the duplicate horizon.
    let later = Event::new(T0 + 3 * 3_600_000, "late", "acct_late", "key_late");
    engine.observe(&later, &mut alerts);
    engine.expire();
    let tracked = engine.tracked();
    assert_eq!(tracked.users as u32, users + 1);
    assert_eq!(
        tracked.prompt_sightings, 0,
        "prompt sightings left their window"
    );
    let per_user = (LIVE.load(Ordering::Relaxed) - before) as f64 / users as f64;
    let reserved = (RESERVED.load(Ordering::Relaxed) - before_reserved) as f64 / users as f64;
    eprintln!(
        "{users} users, {} keys: {per_user:.0} bytes per user asked for, {reserved:.0} reserved by malloc (user state plus its two keys, map slots and ids)",
        tracked.keys
    );
    drop(engine);
    (per_user, reserved)
}

/// The user counts to measure: `KEYWATCH_MEMORY_USERS` if set, else
/// 10,000 and 100,000 (1,000,000 takes 1.1 GB and 10 s in release).
fn user_counts() -> Vec<u32> {
    match std::env::var("KEYWATCH_MEMORY_USERS") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|n| {
                n.trim()
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("KEYWATCH_MEMORY_USERS: {n:?} is not a count"))
            })
            .collect(),
        _ => vec![10_000, 100_000],
    }
}

#[test]
fn learned_state_is_well_under_a_kibibyte_per_user() {
    for users in user_counts() {
        let (asked, reserved) = bytes_per_user(users);
        assert!(
            asked <= reserved,
            "{asked:.0} asked > {reserved:.0} reserved"
        );
        assert!(
            reserved < 1024.0,
            "{reserved:.0} bytes per user reserved at {users} users"
        );
    }
}
