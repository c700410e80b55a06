//! The store against a real Postgres. Each test creates its own database
//! (`kw_test_<pid>_<n>_<nanos>`) through the server named by `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), so tests run in
//! parallel without colliding, and drops it when done, even on failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use detectors::time::PeriodKind;
use detectors::{Action, Alert, AlertKind, BudgetInfo, Checkpoint, Entry, EntryKind, Severity};
use sqlx::{Connection, PgConnection};
use storage::{BatchCommit, PartitionStart, RollupFlush, RollupRow, StorageError, Store};

const MINUTE: i64 = 60_000;
/// 2026-11-23T00:00:00Z
const DAY0: i64 = 1_795_392_000_000;

/// An `alerts` row: the JSON document, kind, severity, action, key, address,
/// ts and expiry (ms), observed, budget JSON.
type StoredAlert = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    Option<i64>,
    Option<f64>,
    Option<String>,
);

/// A `revocation_actions` row: alert id, key, user, action, reason, issued
/// and expiry (ms).
type ActionRow = (
    String,
    Option<String>,
    String,
    String,
    String,
    i64,
    Option<i64>,
);

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database replaced by `db` (query parameters kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| i + authority);
    format!("{}/{db}{query}", &base[..path])
}

/// A fresh, migrated database, dropped with this value.
struct TestDb {
    admin: String,
    name: String,
    store: Store,
}

impl TestDb {
    async fn new() -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "kw_test_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let store = Store::connect(&with_database(&admin, &name), 4)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        TestDb { admin, name, store }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await; a thread with its own runtime can, even while
        // the test's runtime is unwinding from a failed assertion.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(&sql).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}

async fn count(store: &Store, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn rollup(user: &str, key: &str, minute_ms: i64, requests: i64, cost_micros: i64) -> RollupRow {
    RollupRow {
        user_id: user.into(),
        key_id: key.into(),
        minute_ms,
        requests,
        prompt_tokens: requests * 100,
        completion_tokens: requests * 50,
        cost_micros,
        errors: 1,
        latency_sum_ms: requests * 300,
        latency_max_ms: 400 + requests,
    }
}

fn alert(id: &str, kind: AlertKind, action: Action, key: Option<&str>, ts: i64) -> Alert {
    Alert {
        id: id.into(),
        kind,
        severity: Severity::Warning,
        action,
        user_id: "acct_42".into(),
        key_id: key.map(Into::into),
        ip: None,
        ts,
        observed: Some(123.4),
        baseline: Some(7.25),
        threshold: Some(40.0),
        budget: None,
        expires_at: None,
        tier: None,
        reason: format!("reason of {id}"),
    }
}

/// One alert of each action, with every optional field used somewhere.
fn sample_alerts() -> Vec<Alert> {
    let mut budget = alert(
        "a-budget",
        AlertKind::BudgetThreshold,
        Action::Block,
        None,
        DAY0 + 5 * MINUTE + 120,
    );
    budget.severity = Severity::Critical;
    budget.observed = Some(50.000001);
    budget.baseline = None;
    budget.expires_at = Some(DAY0 + 86_400_000);
    budget.budget = Some(BudgetInfo {
        period: PeriodKind::Day,
        period_start: DAY0,
        limit_usd: 50.0,
        spent_usd: 50.000001,
        percent: 100,
    });
    let mut spike = alert(
        "a-spike",
        AlertKind::RequestSpike,
        Action::Throttle,
        Some("kh_1"),
        DAY0 + 3 * MINUTE + 7,
    );
    spike.expires_at = Some(DAY0 + 3 * MINUTE + 7 + 900_000);
    let mut leak = alert(
        "a-leak",
        AlertKind::LeakedKey,
        Action::Notify,
        Some("kh_2"),
        DAY0 + 4 * MINUTE,
    );
    leak.severity = Severity::Info;
    leak.ip = Some("2001:db8::1".into());
    leak.observed = None;
    leak.threshold = Some(0.1 + 0.2);
    vec![budget, spike, leak]
}

fn batch<'a>(
    start_offset: i64,
    next_offset: i64,
    rollups: &'a [RollupRow],
    alerts: &'a [Alert],
    checkpoint: Option<&'a Checkpoint>,
) -> BatchCommit<'a> {
    BatchCommit {
        topic: "gateway-logs",
        partition: 3,
        start_offset,
        next_offset,
        rollups,
        flush: true,
        rollups_from: None,
        alerts,
        checkpoint,
        budgets: &[],
        addresses: &[],
        sources: &[],
    }
}

/// (requests, prompt, completion, cost_micros, errors, latency_sum, latency_max) of one rollup row.
async fn rollup_row(
    store: &Store,
    user: &str,
    key: &str,
    minute_ms: i64,
) -> (i64, i64, i64, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT requests, prompt_tokens, completion_tokens, cost_micros, errors, latency_sum_ms,
             latency_max_ms
         FROM rollup_minute
         WHERE user_id = $1 AND key_id = $2 AND minute = to_timestamp($3 / 1000.0)",
    )
    .bind(user)
    .bind(key)
    .bind(minute_ms)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn migrating_twice_is_fine_and_everything_is_documented() {
    let db = TestDb::new().await;
    db.store.migrate().await.unwrap();
    db.store.migrate().await.unwrap();

    let relations: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v')
           AND c.relname NOT LIKE '\\_sqlx%'
         ORDER BY c.relname",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    let expected = [
        ("active_revocations", "v"),
        ("address_minute", "r"),
        ("alert_deliveries", "r"),
        ("alert_outbox", "r"),
        ("alerts", "r"),
        ("budget_periods", "r"),
        ("budget_status", "v"),
        ("consumer_offsets", "r"),
        ("delivery_attempts", "r"),
        ("engine_checkpoint_entries", "r"),
        ("engine_checkpoints", "r"),
        ("receiver_status", "r"),
        ("revocation_actions", "r"),
        ("rollup_day", "v"),
        ("rollup_hour", "v"),
        ("rollup_minute", "r"),
        ("spend_day", "v"),
        ("spend_month", "v"),
        ("stage_two_sources", "r"),
    ];
    let got: Vec<(&str, &str)> = relations
        .iter()
        .map(|(n, k)| (n.as_str(), k.as_str()))
        .collect();
    assert_eq!(got, expected);

    let undocumented: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || coalesce('.' || a.attname, '')
         FROM pg_class c
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v')
           AND c.relname NOT LIKE '\\_sqlx%'
           AND (obj_description(c.oid, 'pg_class') IS NULL
                OR col_description(c.oid, a.attnum) IS NULL)",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert!(undocumented.is_empty(), "without COMMENT: {undocumented:?}");
}

#[tokio::test]
async fn batches_add_up_and_a_replayed_batch_is_fenced() {
    let db = TestDb::new().await;
    let store = &db.store;
    assert_eq!(
        store.load_partition("gateway-logs", 3).await.unwrap(),
        PartitionStart::default()
    );

    let alerts = sample_alerts();
    let rollups1 = [
        rollup("acct_42", "kh_1", DAY0 + 3 * MINUTE, 2, 1_500),
        rollup("acct_7", "kh_9", DAY0 + 3 * MINUTE, 1, 10),
    ];
    store
        .commit_batch(&batch(
            0,
            10,
            &rollups1,
            &alerts,
            Some(&Checkpoint::whole(b"state@10".to_vec())),
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load_partition("gateway-logs", 3).await.unwrap(),
        PartitionStart {
            next_offset: Some(10),
            rollups_offset: Some(10),
            checkpoint: Some((10, b"state@10".to_vec())),
            entries: vec![],
        }
    );
    // Other partitions and topics are separate.
    assert_eq!(
        store.load_partition("gateway-logs", 4).await.unwrap(),
        PartitionStart::default()
    );

    // The same batch again: fenced, and nothing changes.
    let err = store
        .commit_batch(&batch(
            0,
            10,
            &rollups1,
            &alerts,
            Some(&Checkpoint::whole(b"other".to_vec())),
        ))
        .await
        .unwrap_err();
    match &err {
        StorageError::Fenced {
            topic,
            partition,
            expected,
            stored,
        } => {
            assert_eq!(
                (topic.as_str(), *partition, *expected, *stored),
                ("gateway-logs", 3, 0, 10)
            );
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(
        rollup_row(store, "acct_42", "kh_1", DAY0 + 3 * MINUTE).await,
        (2, 200, 100, 1_500, 1, 600, 402)
    );
    assert_eq!(
        store
            .load_partition("gateway-logs", 3)
            .await
            .unwrap()
            .checkpoint,
        Some((10, b"state@10".to_vec()))
    );

    // The next batch adds to the same minute and repeats one alert.
    let rollups2 = [
        rollup("acct_42", "kh_1", DAY0 + 3 * MINUTE, 1, 250),
        rollup("acct_42", "kh_1", DAY0 + 4 * MINUTE, 5, 5),
    ];
    let mut alerts2 = vec![alerts[1].clone()];
    alerts2.push(alert(
        "a-quota",
        AlertKind::TokenQuota,
        Action::Throttle,
        None,
        DAY0 + 6 * MINUTE,
    ));
    store
        .commit_batch(&batch(10, 20, &rollups2, &alerts2, None))
        .await
        .unwrap();
    assert_eq!(
        rollup_row(store, "acct_42", "kh_1", DAY0 + 3 * MINUTE).await,
        (3, 300, 150, 1_750, 2, 900, 402),
        "additive, latency max is the greater"
    );
    assert_eq!(
        rollup_row(store, "acct_42", "kh_1", DAY0 + 4 * MINUTE).await,
        (5, 500, 250, 5, 1, 1500, 405)
    );
    assert_eq!(count(store, "rollup_minute").await, 3);
    assert_eq!(
        store.load_partition("gateway-logs", 3).await.unwrap(),
        PartitionStart {
            next_offset: Some(20),
            rollups_offset: Some(20),
            checkpoint: Some((10, b"state@10".to_vec())),
            entries: vec![],
        },
        "a batch without a checkpoint keeps the last one"
    );

    // Alerts: stored once each, as the contract JSON.
    let mut all = alerts.clone();
    all.push(alerts2[1].clone());
    assert_eq!(count(store, "alerts").await, 4);
    for a in &all {
        let (doc, kind, severity, action, key, ip, ts, expires, observed, budget): StoredAlert =
            sqlx::query_as(
                "SELECT alert::text, kind, severity, action, key_id, ip,
                 (extract(epoch FROM ts) * 1000)::int8,
                 (extract(epoch FROM expires_at) * 1000)::int8, observed, budget::text
             FROM alerts WHERE id = $1",
            )
            .bind(&a.id)
            .fetch_one(store.pool())
            .await
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc, serde_json::to_value(a).unwrap(), "{}", a.id);
        assert_eq!(kind, a.kind.as_str());
        assert_eq!(
            severity,
            serde_json::to_value(a.severity).unwrap().as_str().unwrap()
        );
        assert_eq!(action, a.action.as_str());
        assert_eq!((key, ip), (a.key_id.clone(), a.ip.clone()));
        assert_eq!((ts, expires, observed), (a.ts, a.expires_at, a.observed));
        let budget: Option<serde_json::Value> = budget.map(|b| serde_json::from_str(&b).unwrap());
        assert_eq!(
            budget,
            a.budget.as_ref().map(|b| serde_json::to_value(b).unwrap())
        );
    }

    // Revocation actions: one per throttle/block alert, none for notify.
    let actions: Vec<ActionRow> = sqlx::query_as(
        "SELECT alert_id, key_id, user_id, action, reason,
                 (extract(epoch FROM issued_at) * 1000)::int8,
                 (extract(epoch FROM expires_at) * 1000)::int8
             FROM revocation_actions ORDER BY alert_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let mut expected: Vec<_> = all
        .iter()
        .filter(|a| a.action != Action::Notify)
        .map(|a| {
            (
                a.id.clone(),
                a.key_id.clone(),
                a.user_id.clone(),
                a.action.as_str().to_owned(),
                a.reason.clone(),
                a.ts,
                a.expires_at,
            )
        })
        .collect();
    expected.sort();
    assert_eq!(actions, expected);
    assert!(
        actions.iter().any(|a| a.0 == "a-budget" && a.1.is_none()),
        "user-level block"
    );

    // Outbox: one row per alert, pending.
    let outbox: Vec<(String, i32)> = sqlx::query_as(
        "SELECT alert_id, attempts FROM alert_outbox
         WHERE claimed_at IS NULL AND delivered_at IS NULL ORDER BY alert_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let mut ids: Vec<(String, i32)> = all.iter().map(|a| (a.id.clone(), 0)).collect();
    ids.sort();
    assert_eq!(outbox, ids);

    // A delivered (and cleaned up) or lifted alert seen again in a later
    // batch is neither queued nor enforced again.
    sqlx::query("DELETE FROM alert_outbox WHERE alert_id = 'a-spike'")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM revocation_actions WHERE alert_id = 'a-spike'")
        .execute(store.pool())
        .await
        .unwrap();
    store
        .commit_batch(&batch(
            20,
            21,
            &[],
            &alerts[1..2],
            Some(&Checkpoint::whole(b"state@21".to_vec())),
        ))
        .await
        .unwrap();
    assert_eq!(count(store, "alert_outbox").await, 3);
    assert_eq!(count(store, "revocation_actions").await, 2);
    assert_eq!(
        store.load_partition("gateway-logs", 3).await.unwrap(),
        PartitionStart {
            next_offset: Some(21),
            rollups_offset: Some(21),
            checkpoint: Some((21, b"state@21".to_vec())),
            entries: vec![],
        },
        "only the latest checkpoint is kept"
    );
    assert_eq!(count(store, "engine_checkpoints").await, 1);

    // An empty batch still moves the offset (a batch of only bad records).
    store
        .commit_batch(&batch(21, 30, &[], &[], None))
        .await
        .unwrap();
    assert_eq!(
        store
            .load_partition("gateway-logs", 3)
            .await
            .unwrap()
            .next_offset,
        Some(30)
    );
}

#[tokio::test]
async fn two_committers_from_one_offset_exactly_one_wins() {
    let db = TestDb::new().await;
    let store = db.store.clone();

    // Two tasks released together commit the same range of one partition.
    let race = |partition: i32, start: i64, round: i64| {
        let store = store.clone();
        async move {
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let tasks: Vec<_> = (0..2i64)
                .map(|who| {
                    let store = store.clone();
                    let barrier = barrier.clone();
                    tokio::spawn(async move {
                        let rollups = [rollup("acct_1", "kh_1", DAY0 + round * MINUTE, 1 + who, 1)];
                        let alerts = [alert(
                            &format!("round-{round}"),
                            AlertKind::RequestSpike,
                            Action::Throttle,
                            Some("kh_1"),
                            DAY0,
                        )];
                        let cp = Checkpoint::whole(b"s".to_vec());
                        let batch = BatchCommit {
                            partition,
                            ..batch(start, start + 10, &rollups, &alerts, Some(&cp))
                        };
                        barrier.wait().await;
                        store.commit_batch(&batch).await
                    })
                })
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            results
        }
    };

    // Rounds 0-7 race to create a partition's offset row (each a new
    // partition), rounds 8-15 to move partition 3's row.
    for round in 0..16i64 {
        let (partition, start) = if round < 8 {
            (100 + round as i32, 1000)
        } else {
            (3, (round - 8) * 10)
        };
        let results = race(partition, start, round).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, StorageError::Fenced { expected, stored, .. } if *expected == start && *stored == start + 10),
                    "round {round}: {e:?}"
                );
            }
        }
        // Only the winner's rollup is there: requests is 1 or 2, never 3.
        let requests: i64 = sqlx::query_scalar(
            "SELECT requests FROM rollup_minute WHERE minute = to_timestamp($1 / 1000.0)",
        )
        .bind(DAY0 + round * MINUTE)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert!(requests == 1 || requests == 2, "round {round}: {requests}");
        assert_eq!(
            store
                .load_partition("gateway-logs", partition)
                .await
                .unwrap()
                .next_offset,
            Some(start + 10)
        );
    }
    assert_eq!(count(&store, "alerts").await, 16);
    assert_eq!(count(&store, "revocation_actions").await, 16);
    assert_eq!(count(&store, "alert_outbox").await, 16);
    assert_eq!(count(&store, "engine_checkpoints").await, 9);
}

/// Both committers are certainly in flight together: the offset row is held
/// locked until both have sent their statements.
#[tokio::test]
async fn a_committer_waiting_on_the_offset_row_is_fenced_once_it_moves() {
    let db = TestDb::new().await;
    let store = db.store.clone();
    store
        .commit_batch(&batch(0, 10, &[], &[], None))
        .await
        .unwrap();

    let mut locker = PgConnection::connect(&with_database(&db.admin, &db.name))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT * FROM consumer_offsets FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..2)
        .map(|who| {
            let store = store.clone();
            tokio::spawn(async move {
                let rollups = [rollup("acct_1", "kh_1", DAY0, 1 + who, 1)];
                store
                    .commit_batch(&batch(10, 20, &rollups, &[], None))
                    .await
            })
        })
        .collect();
    // Both are now blocked on the row lock.
    let waiting = async {
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(store.pool())
            .await
            .unwrap();
            if n == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("both committers wait on the offset row");
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();

    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results.iter().any(|r| matches!(
        r,
        Err(StorageError::Fenced {
            expected: 10,
            stored: 20,
            ..
        })
    )));
    assert_eq!(count(&store, "rollup_minute").await, 1);
}

/// The next offset and rollups offset of `gateway-logs` partition 3.
async fn offsets(store: &Store) -> (Option<i64>, Option<i64>) {
    let s = store.load_partition("gateway-logs", 3).await.unwrap();
    (s.next_offset, s.rollups_offset)
}

async fn execute(store: &Store, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.unwrap();
}

/// Rollups held across batches: `rollups_offset` moves only with a commit
/// that flushes them, a first commit that does not flush starts it at the
/// batch's start, and rows from before migration 7 (NULL) read as the
/// next offset.
#[tokio::test]
async fn the_rollups_offset_moves_only_with_a_flush() {
    let db = TestDb::new().await;
    let store = &db.store;
    let held = |start, next| BatchCommit {
        flush: false,
        ..batch(start, next, &[], &[], None)
    };
    let flush = |start, next, from, rollups| BatchCommit {
        rollups_from: Some(from),
        ..batch(start, next, rollups, &[], None)
    };
    store.commit_batch(&held(5, 10)).await.unwrap();
    assert_eq!(offsets(store).await, (Some(10), Some(5)));
    store.commit_batch(&held(10, 20)).await.unwrap();
    assert_eq!(
        offsets(store).await,
        (Some(20), Some(5)),
        "held: the rollups stay at 5"
    );
    let rollups = [rollup("acct_1", "kh_1", DAY0, 3, 30)];
    assert!(
        matches!(
            store.commit_batch(&flush(20, 30, 7, &rollups)).await,
            Err(StorageError::Fenced { .. })
        ),
        "a flush expecting other stored rollups is fenced"
    );
    store
        .commit_batch(&flush(20, 30, 5, &rollups))
        .await
        .unwrap();
    assert_eq!(
        offsets(store).await,
        (Some(30), Some(30)),
        "a flush brings them up"
    );
    // A flush that moves no offset (a quiet partition's) is fenced on the
    // rollups: repeated (a retry after a commit that did land, or a late
    // owner), it adds nothing.
    store
        .commit_batch(&flush(30, 30, 30, &rollups))
        .await
        .unwrap();
    store.commit_batch(&held(30, 30)).await.unwrap();
    let late = [rollup("acct_1", "kh_1", DAY0, 100, 1)];
    assert!(matches!(
        store.commit_batch(&flush(30, 30, 20, &late)).await,
        Err(StorageError::Fenced { .. })
    ));
    // A fenced commit moves neither.
    assert!(matches!(
        store.commit_batch(&held(20, 40)).await,
        Err(StorageError::Fenced { stored: 30, .. })
    ));
    store.commit_batch(&held(30, 40)).await.unwrap();
    assert_eq!(offsets(store).await, (Some(40), Some(30)));
    // A row from before the columns: its rollups went with every batch.
    execute(
        store,
        "UPDATE consumer_offsets SET rollups_offset = NULL, rollups_next_offset = NULL",
    )
    .await;
    assert_eq!(offsets(store).await, (Some(40), Some(40)));
    store.commit_batch(&held(40, 50)).await.unwrap();
    assert_eq!(offsets(store).await, (Some(50), Some(40)));
    // A keywatch from before the columns commits 50..60 (rollups and all),
    // leaving them as they were: the rollups then go up to its offset.
    execute(store, "UPDATE consumer_offsets SET next_offset = 60").await;
    assert_eq!(offsets(store).await, (Some(60), Some(60)));
    store.commit_batch(&held(60, 70)).await.unwrap();
    assert_eq!(offsets(store).await, (Some(70), Some(60)));
    assert_eq!(rollup_row(store, "acct_1", "kh_1", DAY0).await.0, 6);
}

#[tokio::test]
async fn rollups_flushed_behind_are_fenced_and_do_not_hold_up_the_batches() {
    let db = TestDb::new().await;
    let store = &db.store;
    let held = |start, next| BatchCommit {
        flush: false,
        ..batch(start, next, &[], &[], None)
    };
    let rollups = [rollup("acct_1", "kh_1", DAY0, 3, 30)];
    let behind = |from, to| RollupFlush {
        topic: "gateway-logs",
        partition: 3,
        from,
        to,
        rollups: &rollups,
        budgets: &[],
        addresses: &[],
        sources: &[],
    };
    store.commit_batch(&held(0, 10)).await.unwrap();
    let fenced = |r: Result<(), StorageError>, at: i64| matches!(r, Err(StorageError::RollupsFenced { stored, .. }) if stored == at);
    assert!(
        fenced(store.flush_rollups(&behind(0, 20)).await, 0),
        "past the committed offset"
    );
    assert!(
        fenced(store.flush_rollups(&behind(3, 10)).await, 0),
        "from other stored rollups"
    );
    assert_eq!(count(store, "rollup_minute").await, 0);
    store.flush_rollups(&behind(0, 10)).await.unwrap();
    assert_eq!(offsets(store).await, (Some(10), Some(10)));
    assert!(
        fenced(store.flush_rollups(&behind(0, 10)).await, 10),
        "a retry of a flush that landed adds nothing"
    );
    assert_eq!(rollup_row(store, "acct_1", "kh_1", DAY0).await.0, 3);

    // A flush waiting on its rows (here: another transaction holds the
    // rollup row) does not hold the partition's offset row: batches
    // commit meanwhile, and the flush lands after them.
    store.commit_batch(&held(10, 20)).await.unwrap();
    let mut blocker = store.pool().begin().await.unwrap();
    sqlx::query("UPDATE rollup_minute SET requests = requests WHERE user_id = 'acct_1'")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let flushing = {
        let store = store.clone();
        let rollups = rollups.clone();
        tokio::spawn(async move {
            let f = RollupFlush {
                topic: "gateway-logs",
                partition: 3,
                from: 10,
                to: 20,
                rollups: &rollups,
                budgets: &[],
                addresses: &[],
                sources: &[],
            };
            store.flush_rollups(&f).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!flushing.is_finished(), "the flush waits on the held row");
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.commit_batch(&held(20, 30)),
    )
    .await
    .expect("a batch commits while a flush is under way")
    .unwrap();
    blocker.rollback().await.unwrap();
    flushing.await.unwrap().unwrap();
    assert_eq!(offsets(store).await, (Some(30), Some(20)));
    assert_eq!(rollup_row(store, "acct_1", "kh_1", DAY0).await.0, 6);
    // The next owner starts its rollups at 20.
    let start = store.load_partition("gateway-logs", 3).await.unwrap();
    assert_eq!(start.rollups_offset, Some(20));
}

#[tokio::test]
async fn views_sum_per_user_hour_day_and_month() {
    let db = TestDb::new().await;
    let store = &db.store;
    let day1 = DAY0 + 86_400_000;
    let rollups = [
        rollup("acct_42", "kh_1", DAY0 + 10 * MINUTE, 1, 1_250_000),
        rollup("acct_42", "kh_2", DAY0 + 11 * MINUTE, 2, 250_000),
        rollup("acct_42", "kh_1", DAY0 + 70 * MINUTE, 3, 1),
        rollup("acct_42", "kh_1", day1 - MINUTE, 4, 2),
        rollup("acct_42", "kh_1", day1, 5, 3_000_000),
        rollup("acct_7", "kh_9", DAY0 + 10 * MINUTE, 6, 999_999),
    ];
    store
        .commit_batch(&batch(0, 6, &rollups, &[], None))
        .await
        .unwrap();

    let spend_day: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT user_id, day::text, cost_usd::text, tokens, requests FROM spend_day ORDER BY user_id, day",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        spend_day,
        vec![
            (
                "acct_42".into(),
                "2026-11-23".into(),
                "1.500003".into(),
                10 * 150,
                10
            ),
            (
                "acct_42".into(),
                "2026-11-24".into(),
                "3.000000".into(),
                5 * 150,
                5
            ),
            (
                "acct_7".into(),
                "2026-11-23".into(),
                "0.999999".into(),
                6 * 150,
                6
            ),
        ]
    );

    let spend_month: Vec<(String, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, month::text, cost_usd::text, prompt_tokens, completion_tokens, requests
         FROM spend_month ORDER BY user_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        spend_month,
        vec![
            (
                "acct_42".into(),
                "2026-11-01".into(),
                "4.500003".into(),
                1500,
                750,
                15
            ),
            (
                "acct_7".into(),
                "2026-11-01".into(),
                "0.999999".into(),
                600,
                300,
                6
            ),
        ]
    );

    let day: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT key_id, day::text, requests, cost_micros, latency_max_ms FROM rollup_day
         WHERE user_id = 'acct_42' ORDER BY key_id, day",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        day,
        vec![
            ("kh_1".into(), "2026-11-23".into(), 8, 1_250_003, 404),
            ("kh_1".into(), "2026-11-24".into(), 5, 3_000_000, 405),
            ("kh_2".into(), "2026-11-23".into(), 2, 250_000, 402),
        ]
    );

    let hours: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM hour) * 1000)::int8, requests FROM rollup_hour
         WHERE user_id = 'acct_42' AND key_id = 'kh_1' ORDER BY hour",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        hours,
        vec![
            (DAY0, 1),
            (DAY0 + 3_600_000, 3),
            (day1 - 3_600_000, 4),
            (day1, 5)
        ]
    );

    // The views are UTC whatever the session's time zone.
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::raw_sql("SET TIME ZONE 'America/Los_Angeles'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM spend_day WHERE user_id = 'acct_42'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 2);
    sqlx::raw_sql("RESET TIME ZONE")
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_batches_store_nothing() {
    let db = TestDb::new().await;
    let store = &db.store;
    store
        .commit_batch(&batch(0, 10, &[], &[], None))
        .await
        .unwrap();

    let err = store
        .commit_batch(&batch(10, 5, &[], &[], None))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StorageError::OffsetsBackwards {
            start_offset: 10,
            next_offset: 5,
            ..
        }
    ));

    // Postgres refuses NUL in text: a deterministic failure, rolled back whole.
    let rollups = [rollup("acct\0evil", "kh_1", DAY0, 1, 1)];
    let err = store
        .commit_batch(&batch(10, 20, &rollups, &[], None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Query {
                what: "upsert rollups",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(
        store
            .load_partition("gateway-logs", 3)
            .await
            .unwrap()
            .next_offset,
        Some(10)
    );
    assert_eq!(count(store, "rollup_minute").await, 0);
}

fn entry(kind: EntryKind, id: &str, state: &str) -> Entry {
    Entry {
        kind,
        id: id.into(),
        state: state.as_bytes().to_vec(),
    }
}

fn sorted(mut e: Vec<Entry>) -> Vec<Entry> {
    e.sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
    e
}

#[tokio::test]
async fn checkpoint_entries_are_written_as_they_change_and_read_back_whole() {
    let db = TestDb::new().await;
    let store = &db.store;
    let full = Checkpoint {
        core: b"core@10".to_vec(),
        full: true,
        changed: vec![
            entry(EntryKind::User, "acct_1", "u1"),
            entry(EntryKind::User, "acct_2", "u2"),
            entry(EntryKind::Key, "kh_1", "k1"),
        ],
        ..Checkpoint::default()
    };
    store
        .commit_batch(&batch(0, 10, &[], &[], Some(&full)))
        .await
        .unwrap();
    // A delta: acct_2 forgotten, acct_1 changed, acct_3 new; a key forgotten
    // and seen again in the same interval is kept.
    let delta = Checkpoint {
        core: b"core@20".to_vec(),
        full: false,
        changed: vec![
            entry(EntryKind::User, "acct_1", "u1'"),
            entry(EntryKind::User, "acct_3", "u3"),
            entry(EntryKind::Key, "kh_1", "k1'"),
        ],
        forgotten: vec![
            (EntryKind::User, "acct_2".into()),
            (EntryKind::Key, "kh_1".into()),
        ],
        ..Checkpoint::default()
    };
    store
        .commit_batch(&batch(10, 20, &[], &[], Some(&delta)))
        .await
        .unwrap();
    // Another partition's entries are its own.
    let other = BatchCommit {
        partition: 4,
        ..batch(0, 5, &[], &[], Some(&full))
    };
    store.commit_batch(&other).await.unwrap();
    let start = store.load_partition("gateway-logs", 3).await.unwrap();
    assert_eq!(start.checkpoint, Some((20, b"core@20".to_vec())));
    assert_eq!(
        sorted(start.entries),
        vec![
            entry(EntryKind::User, "acct_1", "u1'"),
            entry(EntryKind::User, "acct_3", "u3"),
            entry(EntryKind::Key, "kh_1", "k1'"),
        ]
    );
    // A fenced batch writes none of its checkpoint.
    let stale = Checkpoint {
        core: b"stale".to_vec(),
        full: true,
        ..Checkpoint::default()
    };
    let err = store
        .commit_batch(&batch(10, 30, &[], &[], Some(&stale)))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Fenced { .. }), "{err}");
    assert_eq!(count(store, "engine_checkpoint_entries").await, 6);
    // A full checkpoint replaces every entry.
    let fresh = Checkpoint {
        core: b"core@30".to_vec(),
        full: true,
        changed: vec![entry(EntryKind::User, "acct_9", "u9")],
        ..Checkpoint::default()
    };
    store
        .commit_batch(&batch(20, 30, &[], &[], Some(&fresh)))
        .await
        .unwrap();
    let start = store.load_partition("gateway-logs", 3).await.unwrap();
    assert_eq!(start.entries, vec![entry(EntryKind::User, "acct_9", "u9")]);
    // Without a checkpoint there is nothing to read entries for.
    sqlx::query("DELETE FROM engine_checkpoints WHERE partition = 3")
        .execute(store.pool())
        .await
        .unwrap();
    let start = store.load_partition("gateway-logs", 3).await.unwrap();
    assert_eq!((start.checkpoint, start.entries.len()), (None, 0));
}
