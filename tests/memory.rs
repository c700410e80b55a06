//! Memory per tracked user: the engine's learned state for many users,
//! measured with a counting allocator (a bound on bytes, not a timing).
//!
//! Each user gets a realistic handful of records (two keys, prompts, an
//! address, costs); then time moves on past the prompt and duplicate
//! windows, so what remains is the per-user and per-key state that lives
//! for the idle TTL. `cargo test --release --test memory -- --nocapture`
//! prints the figure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};

use detectors::{Engine, EngineConfig, Event};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged, counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        // SAFETY: caller's arguments.
        let q = unsafe { System.realloc(p, l, n) };
        if !q.is_null() {
            LIVE.fetch_add(n, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const T0: i64 = 1_795_392_000_000; // 2026-11-23T00:00:00Z

fn bytes_per_user(users: u32) -> f64 {
    let mut engine = Engine::new(&EngineConfig::default()).unwrap();
    let mut alerts = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
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
    let after = LIVE.load(Ordering::Relaxed);
    let per_user = (after - before) as f64 / users as f64;
    eprintln!(
        "{users} users, {} keys: {:.0} bytes per user (user state plus its two keys, map slots and ids)",
        tracked.keys, per_user
    );
    drop(engine);
    per_user
}

#[test]
fn learned_state_is_well_under_a_kibibyte_per_user() {
    for users in [10_000, 100_000] {
        let b = bytes_per_user(users);
        assert!(b < 1024.0, "{b:.0} bytes per user at {users} users");
    }
}
