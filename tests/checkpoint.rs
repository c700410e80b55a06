//! Checkpoints that scale with the accounts (issue 16), against the real
//! Postgres: one partition's engine with many accounts checkpoints once in
//! full, then writes only the accounts and keys that changed, and restores
//! to exactly the state that kept running.
//!
//! `cargo test --release --test checkpoint -- --nocapture` prints the
//! figures (bytes and rows written per checkpoint, time to store and to
//! restore); `KEYWATCH_CHECKPOINT_USERS=1000000` measures a partition of a
//! million accounts instead of the default 20,000. Figures are printed,
//! never asserted: what is asserted is the state and the rows written.

use std::borrow::Cow;
use std::time::Instant;

use detectors::{Checkpoint, Engine, EngineConfig, EngineState, EntryKind, Event};
use storage::{BatchCommit, CheckpointWrite, Store};

mod common;

use common::services::Database;

const T0: i64 = 1_795_392_000_000; // 2026-11-23T00:00:00Z

/// One record of account `u` (its `i`-th), as `tests/memory.rs` makes them:
/// two keys per account, a prompt, an address, usage.
fn observe(engine: &mut Engine, u: u32, i: u32, ts: i64) {
    let rid = format!("req_{u:08}_{i}");
    let uid = format!("acct_{u:08}");
    let kid = format!("key_{:08x}_{}", u.wrapping_mul(2_654_435_761), i % 2);
    let fp = format!("{:016x}", (u as u64) << 8 | i as u64);
    let mut ev = Event::new(ts, &rid, &uid, &kid);
    ev.tier = Some(Cow::Borrowed(["free", "pro", "enterprise"][u as usize % 3]));
    ev.model = Some(Cow::Borrowed("gpt-4o-mini"));
    ev.prompt_tokens = 300;
    ev.completion_tokens = 200;
    ev.prompt_fingerprint = Some(Cow::Borrowed(&fp));
    ev.ip = Some(std::net::IpAddr::from([203, 0, (u >> 8) as u8, u as u8]));
    ev.asn = Some(64500);
    let mut alerts = Vec::new();
    engine.observe(&ev, &mut alerts);
}

fn batch(start: i64, next: i64, cp: &detectors::Checkpoint) -> BatchCommit<'_> {
    BatchCommit {
        topic: "gateway-logs",
        partition: 0,
        start_offset: start,
        next_offset: next,
        rollups: &[],
        flush: true,
        rollups_from: None,
        alerts: &[],
        checkpoint: Some(cp),
        budgets: &[],
        addresses: &[],
        sources: &[],
    }
}

fn users() -> u32 {
    match std::env::var("KEYWATCH_CHECKPOINT_USERS") {
        Ok(v) if !v.trim().is_empty() => v.trim().replace('_', "").parse().unwrap_or_else(|_| {
            panic!("KEYWATCH_CHECKPOINT_USERS: {v:?} is not a count");
        }),
        _ => 20_000,
    }
}

#[test]
fn a_partition_checkpoints_what_changed_and_restores_exactly() {
    let users = users();
    let db = Database::create("checkpoint");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async {
        let s = Store::connect(&db.url, 2).await.unwrap();
        s.migrate().await.unwrap();
        s
    });
    let cfg = EngineConfig::default();
    let mut engine = Engine::new(&cfg).unwrap();
    engine.track_changes(None);
    // An hour of traffic, the accounts spread over it.
    for u in 0..users {
        for i in 0..3u32 {
            let at = T0 + u as i64 * 3_600_000 / users as i64 + i as i64 * 20_000;
            observe(&mut engine, u, i, at);
        }
    }
    let offset = users as i64 * 3;

    // The first checkpoint writes every account and key.
    let took = Instant::now();
    let full = engine.checkpoint();
    let encode_full = took.elapsed();
    assert!(full.full);
    let hashes = |cp: &Checkpoint| -> usize {
        cp.changed
            .iter()
            .filter(|e| e.kind == EntryKind::Dedup)
            .map(|e| e.state.len() / 8)
            .sum()
    };
    assert_eq!(
        full.changed
            .iter()
            .filter(|e| e.kind != EntryKind::Dedup)
            .count() as u32,
        users * 3,
        "an account and two keys each"
    );
    assert_eq!(
        hashes(&full),
        engine.tracked().dedup_entries,
        "the duplicate window, in chunks"
    );
    rt.block_on(store.commit_batch(&batch(0, offset, &full)))
        .unwrap();
    let store_full = took.elapsed();
    // Accounts and keys seen in the checkpoint's own minute go into the next
    // one too (the engine marks changes by minute, at no memory per account).
    let st = engine.state();
    let overlap_users = st
        .users
        .values()
        .filter(|u| u.last_minute >= full.mark)
        .count() as u32;
    let overlap_keys = st
        .keys
        .values()
        .filter(|k| k.last_minute >= full.mark)
        .count() as u32;

    // Minutes later (before the next sweep of prompt sightings, which
    // would change the accounts whose sightings leave their window), one
    // account in a hundred sends a record.
    let changed = (users / 100).max(1);
    let later = T0 + 62 * 60_000;
    for n in 0..changed {
        observe(&mut engine, (n * 100 + 7) % users, 9, later + n as i64);
    }
    let took = Instant::now();
    let delta = engine.checkpoint();
    let encode_delta = took.elapsed();
    assert!(!delta.full);
    let (touched_users, touched_keys) =
        delta
            .changed
            .iter()
            .fold((0u32, 0u32), |(u, k), e| match e.kind {
                EntryKind::User => (u + 1, k),
                EntryKind::Key => (u, k + 1),
                EntryKind::Dedup => (u, k),
            });
    assert_eq!(
        hashes(&delta),
        changed as usize,
        "only the new records' hashes"
    );
    // What changed is written, and only that: each account seen and its key
    // (and what was seen in the minute of the last checkpoint).
    assert!(touched_users >= changed && touched_users <= changed + overlap_users);
    assert!(touched_keys >= changed && touched_keys <= changed + overlap_keys);
    assert!(delta.forgotten.is_empty());
    // As the pipeline stores a periodic checkpoint: in a transaction of its
    // own, after its batch committed, on top of the one it was taken against.
    let at = offset + changed as i64;
    let moved = BatchCommit {
        checkpoint: None,
        ..batch(offset, at, &delta)
    };
    rt.block_on(store.commit_batch(&moved)).unwrap();
    let w = CheckpointWrite {
        topic: "gateway-logs",
        partition: 0,
        at,
        previous: Some(offset),
        checkpoint: &delta,
        bytes_per_sec: None,
    };
    let stored = rt.block_on(store.store_checkpoint(&w)).unwrap();
    assert!(stored, "stored on top of the full one");
    let store_delta = took.elapsed();
    // A delta taken against another checkpoint is refused, and changes nothing.
    let stale = CheckpointWrite {
        at: at + 1,
        previous: Some(0),
        ..w
    };
    assert!(!rt.block_on(store.store_checkpoint(&stale)).unwrap());

    // Restore: read the core and every entry, decode, build the engine.
    let took = Instant::now();
    let start = rt
        .block_on(store.load_partition("gateway-logs", 0))
        .unwrap();
    let read = took.elapsed();
    let (at, core) = start.checkpoint.unwrap();
    assert_eq!(at, offset + changed as i64);
    let rows = start.entries.len();
    let chunks = start
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dedup)
        .count();
    let (state, since) = EngineState::from_checkpoint(&core, start.entries).unwrap();
    let restored = Engine::restore(&cfg, state).unwrap();
    let restore = took.elapsed();
    assert!(since.is_some());
    assert_eq!(
        restored.state(),
        engine.state(),
        "the restored state is the one that ran"
    );
    assert_eq!(
        rows - chunks,
        engine.state().users.len() + engine.state().keys.len()
    );

    let table_bytes: i64 = rt.block_on(async {
        sqlx::query_scalar("SELECT pg_total_relation_size('engine_checkpoint_entries')")
            .fetch_one(store.pool())
            .await
            .unwrap()
    });
    eprintln!(
        "checkpoint of {users} accounts ({} keys) in one partition:\n\
         full:  {} entries, {:.1} MB, encoded in {:.2} s, stored in {:.2} s\n\
         delta: {} accounts sent a record: {} entries ({touched_users} accounts, {touched_keys} keys; {overlap_users} accounts and {overlap_keys} keys seen in the minute of the full one), {:.2} MB, encoded in {:.3} s, stored in {:.3} s\n\
         restore: {rows} rows read in {:.2} s, decoded and built in {:.2} s total\n\
         entries table: {:.1} MB on disk\n\
         duplicate window: {} hashes, {} in the full checkpoint's chunks, {} in the delta's; core {} bytes (full), {} bytes (delta)",
        engine.state().keys.len(),
        full.changed.len(),
        full.bytes() as f64 / 1e6,
        encode_full.as_secs_f64(),
        store_full.as_secs_f64(),
        changed,
        delta.changed.len(),
        delta.bytes() as f64 / 1e6,
        encode_delta.as_secs_f64(),
        store_delta.as_secs_f64(),
        read.as_secs_f64(),
        restore.as_secs_f64(),
        table_bytes as f64 / 1e6,
        engine.tracked().dedup_entries,
        hashes(&full),
        hashes(&delta),
        full.core.len(),
        delta.core.len(),
    );
}
