//! The outbox dispatcher: turns queued alerts into deliveries and sends them.
//!
//! Two steps, each safe with any number of keywatch instances:
//!
//! 1. **Route.** Outbox rows not yet routed are taken with `FOR UPDATE SKIP
//!    LOCKED`; for every receiver whose rules want the alert, one
//!    `alert_deliveries` row is written (or a `suppressed` one when the same
//!    condition went to that receiver within the repeat interval). Critical
//!    alerts, and every alert for a webhook, are due at once; lower severities
//!    for Slack and email wait `group_wait` so they travel together.
//! 2. **Send.** Per receiver, due deliveries are *leased* (`lease_until`),
//!    sent with no transaction open, and marked with the outcome; every
//!    attempt is recorded in `delivery_attempts`. A dispatcher that dies
//!    between send and mark leaves a lease that runs out, and another sends
//!    again: at least once, with the same `webhook-id` (the alert id).
//!
//! Per receiver and user, alerts go out in order: a delivery that failed
//! holds back that user's later ones until it succeeds or is given up. When
//! a receiver answers again after failures, its waiting retries are brought
//! forward, so a receiver down for hours gets its backlog as soon as it is
//! back rather than on each delivery's own backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detectors::{Action, Alert, AlertKind, Severity};
use rand::Rng;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AlertingConfig;
use crate::notify::{Outcome, Receiver};

/// The user id of operator alerts (a receiver disabled), which are not about a user.
pub const OPERATOR_USER: &str = "keywatch";

/// Most outbox rows routed per transaction.
const ROUTE_BATCH: i64 = 500;
/// Most deliveries one receiver claims per round (a Slack or email message
/// carries at most this many alerts).
const CLAIM_BATCH: i64 = 50;
/// Users of one receiver sent to concurrently (webhooks).
const USERS_AT_ONCE: usize = 8;

/// A dispatcher failure: a Postgres error, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("dispatcher: {what}: {source}")]
pub struct DispatchError {
    what: &'static str,
    #[source]
    source: sqlx::Error,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> DispatchError {
    move |source| DispatchError { what, source }
}

/// Delivery counters since start, by receiver and outcome (for `/metrics`).
#[derive(Debug, Default)]
pub struct DeliveryMetrics {
    by_outcome: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Alerts routed (outbox rows turned into deliveries).
    pub routed: AtomicU64,
    /// Dispatcher rounds that failed on a Postgres error.
    pub errors: AtomicU64,
}

impl DeliveryMetrics {
    fn count(&self, receiver: &str, outcome: &'static str, n: u64) {
        let mut m = self.by_outcome.lock().expect("metrics lock");
        *m.entry((receiver.to_owned(), outcome)).or_default() += n;
    }

    /// `(receiver, outcome) -> deliveries`, outcome one of delivered,
    /// retry, rejected, gone, suppressed.
    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), u64> {
        self.by_outcome.lock().expect("metrics lock").clone()
    }
}

/// Sends queued alerts to the configured receivers.
pub struct Dispatcher {
    pool: PgPool,
    receivers: Vec<Arc<Receiver>>,
    cfg: AlertingConfig,
    metrics: Arc<DeliveryMetrics>,
}

/// One claimed delivery.
struct Claimed {
    id: i64,
    attempts: i32,
    user_id: String,
    alert: Alert,
}

impl Dispatcher {
    /// A dispatcher over `receivers` (built from `cfg.receivers`).
    pub fn new(pool: PgPool, receivers: Vec<Receiver>, cfg: AlertingConfig) -> Dispatcher {
        Dispatcher {
            pool,
            receivers: receivers.into_iter().map(Arc::new).collect(),
            cfg,
            metrics: Arc::default(),
        }
    }

    /// The delivery counters.
    pub fn metrics(&self) -> Arc<DeliveryMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs until `stop` turns true: a round at start, on every new outbox
    /// row (Postgres `NOTIFY` at the batch's commit) and every
    /// `poll_interval_secs`. Postgres errors are logged and retried.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let poll = Duration::from_secs_f64(self.cfg.poll_interval_secs.max(0.05));
        let mut listener = None;
        while !*stop.borrow() {
            if listener.is_none() {
                listener = match PgListener::connect_with(&self.pool).await {
                    Ok(mut l) => match l.listen("keywatch_outbox").await {
                        Ok(()) => Some(l),
                        Err(e) => {
                            eprintln!("keywatch dispatcher: LISTEN failed (polling instead): {e}");
                            None
                        }
                    },
                    Err(e) => {
                        eprintln!("keywatch dispatcher: LISTEN failed (polling instead): {e}");
                        None
                    }
                };
            }
            if let Err(e) = self.round().await {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("keywatch {e}; retrying");
            }
            let woke = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = woke => if r.is_err() { listener = None },
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One round: route what is queued, then send what is due, every
    /// receiver concurrently. Returns the deliveries attempted.
    pub async fn round(&self) -> Result<usize, DispatchError> {
        while self.route().await? == ROUTE_BATCH as usize {}
        let disabled: Vec<String> = sqlx::query_scalar(
            "SELECT receiver FROM receiver_status WHERE disabled_at IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("read disabled receivers"))?;
        let mut set = JoinSet::new();
        for r in &self.receivers {
            if disabled.contains(&r.name) {
                continue;
            }
            let (pool, r, cfg, m) = (
                self.pool.clone(),
                Arc::clone(r),
                self.cfg.clone(),
                Arc::clone(&self.metrics),
            );
            set.spawn(async move { send_due(&pool, &r, &cfg, &m).await });
        }
        let mut sent = 0;
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                // A bug; the leases run out and the next round sends again.
                Err(e) => eprintln!("keywatch dispatcher: a receiver's task failed: {e}"),
            }
        }
        // An outbox row is done when none of its deliveries is pending. Marking
        // checks that too, but two receivers finishing one alert at once can
        // each see the other's row still pending: this sweep closes such rows.
        sqlx::query(
            "UPDATE alert_outbox o SET delivered_at = now()
             WHERE o.delivered_at IS NULL AND o.routed_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM alert_deliveries d
                               WHERE d.alert_id = o.alert_id AND d.state = 'pending')",
        )
        .execute(&self.pool)
        .await
        .map_err(db("close finished outbox rows"))?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Routes up to [`ROUTE_BATCH`] queued alerts; returns how many.
    async fn route(&self) -> Result<usize, DispatchError> {
        let mut tx = self.pool.begin().await.map_err(db("begin routing"))?;
        // One router at a time, so delivery ids (per-user order) follow the outbox's order.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keywatch-route'))")
            .execute(&mut *tx)
            .await
            .map_err(db("take the routing lock"))?;
        let rows = sqlx::query(
            "SELECT o.alert_id, a.alert::text AS alert
             FROM alert_outbox o JOIN alerts a ON a.id = o.alert_id
             WHERE o.routed_at IS NULL
             ORDER BY o.created_at, o.alert_id
             LIMIT $1
             FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(ROUTE_BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claim outbox rows"))?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.get("alert_id");
            let text: String = row.get("alert");
            ids.push(id.clone());
            let alert: Alert = match serde_json::from_str(&text) {
                Ok(a) => a,
                Err(e) => {
                    // Written by this program, so this is a bug or a hand edit: keep it visible.
                    eprintln!("keywatch dispatcher: alert {id} in Postgres does not parse ({e}); not delivered");
                    continue;
                }
            };
            let condition = condition_of(&alert);
            for r in &self.receivers {
                // A disabled receiver's deliveries are held (pending) until it is enabled.
                if !r.wants(&alert) {
                    continue;
                }
                let wait = if r.groups() && alert.severity != Severity::Critical {
                    self.group_wait(r)
                } else {
                    0
                };
                let repeat = self.repeat_interval(r) as f64;
                let inserted: Option<String> = sqlx::query_scalar(
                    "INSERT INTO alert_deliveries (alert_id, receiver, user_id, severity, condition,
                         state, next_attempt_at, finished_at)
                     SELECT $1, $2, $3, $4, $5, s.state,
                         now() + $6 * interval '1 second',
                         CASE WHEN s.state = 'suppressed' THEN now() END
                     FROM (SELECT CASE WHEN EXISTS (
                               SELECT 1 FROM alert_deliveries d
                               WHERE d.receiver = $2 AND d.condition = $5 AND d.state = 'delivered'
                                 AND d.finished_at > now() - $7 * interval '1 second'
                                 AND array_position(ARRAY['info', 'warning', 'critical'], d.severity)
                                     >= array_position(ARRAY['info', 'warning', 'critical'], $4))
                           THEN 'suppressed' ELSE 'pending' END AS state) s
                     ON CONFLICT (alert_id, receiver) DO NOTHING
                     RETURNING state",
                )
                .bind(&id)
                .bind(&r.name)
                .bind(&alert.user_id)
                .bind(alert.severity.as_str())
                .bind(&condition)
                .bind(wait as f64)
                .bind(repeat)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("route an alert"))?;
                if inserted.as_deref() == Some("suppressed") {
                    self.metrics.count(&r.name, "suppressed", 1);
                }
            }
        }
        sqlx::query(
            "UPDATE alert_outbox o SET routed_at = now(),
                 delivered_at = CASE WHEN NOT EXISTS (
                     SELECT 1 FROM alert_deliveries d
                     WHERE d.alert_id = o.alert_id AND d.state = 'pending') THEN now() END
             WHERE o.alert_id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(db("mark outbox rows routed"))?;
        tx.commit().await.map_err(db("commit routing"))?;
        self.metrics
            .routed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        Ok(ids.len())
    }

    fn group_wait(&self, r: &Receiver) -> u64 {
        self.cfg
            .receivers
            .iter()
            .find(|c| c.name == r.name)
            .and_then(|c| c.group_wait_secs)
            .unwrap_or(self.cfg.group_wait_secs)
    }

    fn repeat_interval(&self, r: &Receiver) -> u64 {
        self.cfg
            .receivers
            .iter()
            .find(|c| c.name == r.name)
            .and_then(|c| c.repeat_interval_secs)
            .unwrap_or(self.cfg.repeat_interval_secs)
    }
}

/// Claims, sends and marks one receiver's due deliveries. Returns how many
/// deliveries were attempted.
async fn send_due(
    pool: &PgPool,
    r: &Arc<Receiver>,
    cfg: &AlertingConfig,
    m: &Arc<DeliveryMetrics>,
) -> Result<usize, DispatchError> {
    let claimed = claim(pool, r, cfg).await?;
    let n = claimed.len();
    if n == 0 {
        return Ok(0);
    }
    if r.groups() {
        // Slack and email: everything claimed travels as one message.
        let alerts: Vec<Alert> = claimed.iter().map(|c| c.alert.clone()).collect();
        let attempt = claimed.iter().map(|c| c.attempts).max().unwrap_or(1);
        let started = Instant::now();
        let outcome = r.send(&alerts, attempt as u32).await;
        mark(pool, r, cfg, m, &claimed, started.elapsed(), &outcome).await?;
        return Ok(n);
    }
    // Webhooks: one alert per request; users concurrently, each user's in order.
    let mut by_user: BTreeMap<String, Vec<Claimed>> = BTreeMap::new();
    for c in claimed {
        by_user.entry(c.user_id.clone()).or_default().push(c);
    }
    let mut users = by_user.into_values();
    let mut set = JoinSet::new();
    let mut first_err = None;
    // Set by the first 410: nothing more is sent to the receiver; the rest is released (held).
    let gone = Arc::new(AtomicBool::new(false));
    loop {
        while set.len() < USERS_AT_ONCE {
            let Some(list) = users.next() else { break };
            let (pool, r, cfg, m, gone) = (
                pool.clone(),
                Arc::clone(r),
                cfg.clone(),
                Arc::clone(m),
                Arc::clone(&gone),
            );
            set.spawn(async move { send_user(&pool, &r, &cfg, &m, &gone, list).await });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => eprintln!("keywatch dispatcher: a delivery task failed: {e}"),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

/// Sends one user's claimed webhook deliveries in order; after a failure,
/// or once the receiver has answered 410, the rest are released untried
/// (they wait behind the failed one, or for the receiver to be enabled).
async fn send_user(
    pool: &PgPool,
    r: &Receiver,
    cfg: &AlertingConfig,
    m: &DeliveryMetrics,
    gone_flag: &AtomicBool,
    list: Vec<Claimed>,
) -> Result<(), DispatchError> {
    let mut rest = list.into_iter().peekable();
    while let Some(c) = rest.next_if(|_| !gone_flag.load(Ordering::Acquire)) {
        // Each send gets a full lease: a user's list is sent one by one.
        sqlx::query(
            "UPDATE alert_deliveries SET lease_until = now() + $2 * interval '1 second' WHERE id = $1",
        )
        .bind(c.id)
        .bind(cfg.lease_secs as f64)
        .execute(pool)
        .await
        .map_err(db("renew a lease"))?;
        let started = Instant::now();
        let outcome = r
            .send(std::slice::from_ref(&c.alert), c.attempts as u32)
            .await;
        let ok = matches!(outcome, Outcome::Delivered { .. });
        let gone = matches!(outcome, Outcome::Gone { .. });
        mark(
            pool,
            r,
            cfg,
            m,
            std::slice::from_ref(&c),
            started.elapsed(),
            &outcome,
        )
        .await?;
        if gone {
            gone_flag.store(true, Ordering::Release);
        }
        if !ok {
            break;
        }
    }
    let ids: Vec<i64> = rest.map(|c| c.id).collect();
    release(pool, &ids).await
}

/// Leases the receiver's due deliveries, oldest first. A delivery is due
/// when its time has come, nobody holds its lease, and no earlier delivery
/// of the same user to this receiver has failed and waits for a retry. A
/// grouping receiver with something due also takes the lower-severity
/// deliveries still in their group wait, so they go in the same message.
async fn claim(
    pool: &PgPool,
    r: &Receiver,
    cfg: &AlertingConfig,
) -> Result<Vec<Claimed>, DispatchError> {
    let horizon = if r.groups() {
        cfg.receivers
            .iter()
            .find(|c| c.name == r.name)
            .and_then(|c| c.group_wait_secs)
            .unwrap_or(cfg.group_wait_secs)
    } else {
        0
    };
    let mut tx = pool.begin().await.map_err(db("begin a claim"))?;
    // One claimer per receiver at a time: two could otherwise both see a
    // user's first delivery unclaimed and send that user's alerts out of order.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keywatch-claim:' || $1))")
        .bind(&r.name)
        .execute(&mut *tx)
        .await
        .map_err(db("take the claim lock"))?;
    let rows = sqlx::query(
        "WITH due AS (
             SELECT d.id FROM alert_deliveries d
             WHERE d.receiver = $1 AND d.state = 'pending'
               AND (d.lease_until IS NULL OR d.lease_until < now())
               AND (d.next_attempt_at <= now()
                    OR (d.attempts = 0
                        AND d.next_attempt_at <= now() + $3 * interval '1 second'
                        AND EXISTS (SELECT 1 FROM alert_deliveries x
                                    WHERE x.receiver = $1 AND x.state = 'pending'
                                      AND x.next_attempt_at <= now()
                                      AND (x.lease_until IS NULL OR x.lease_until < now())
                                      AND NOT EXISTS (
                                          SELECT 1 FROM alert_deliveries y
                                          WHERE y.receiver = x.receiver AND y.user_id = x.user_id
                                            AND y.state = 'pending' AND y.id < x.id
                                            AND y.attempts > 0))))
               AND NOT EXISTS (
                   SELECT 1 FROM alert_deliveries e
                   WHERE e.receiver = d.receiver AND e.user_id = d.user_id
                     AND e.state = 'pending' AND e.id < d.id AND e.attempts > 0)
             ORDER BY d.id
             LIMIT $2
             FOR UPDATE OF d SKIP LOCKED
         )
         UPDATE alert_deliveries d
         SET lease_until = now() + $4 * interval '1 second', attempts = d.attempts + 1
         FROM due, alerts a
         WHERE d.id = due.id AND a.id = d.alert_id
         RETURNING d.id, d.attempts, d.user_id, a.alert::text AS alert",
    )
    .bind(&r.name)
    .bind(CLAIM_BATCH)
    .bind(horizon as f64)
    .bind(cfg.lease_secs as f64)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("claim deliveries"))?;
    tx.commit().await.map_err(db("commit a claim"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.get("id");
        let text: String = row.get("alert");
        match serde_json::from_str::<Alert>(&text) {
            Ok(alert) => out.push(Claimed {
                id,
                attempts: row.get("attempts"),
                user_id: row.get("user_id"),
                alert,
            }),
            Err(e) => {
                let error = format!("the stored alert does not parse: {e}");
                eprintln!("keywatch dispatcher: delivery {id}: {error}; given up");
                sqlx::query(
                    "UPDATE alert_deliveries SET state = 'failed', finished_at = now(),
                         lease_until = NULL, last_error = $2 WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .execute(pool)
                .await
                .map_err(db("give up an unreadable delivery"))?;
            }
        }
    }
    out.sort_by_key(|c| c.id);
    Ok(out)
}

/// Gives back leased deliveries that were not attempted.
async fn release(pool: &PgPool, ids: &[i64]) -> Result<(), DispatchError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE alert_deliveries SET lease_until = NULL, attempts = attempts - 1
         WHERE id = ANY($1) AND state = 'pending'",
    )
    .bind(ids)
    .execute(pool)
    .await
    .map_err(db("release deliveries"))?;
    Ok(())
}

/// Records an attempt's outcome for the deliveries it carried, in one transaction.
async fn mark(
    pool: &PgPool,
    r: &Receiver,
    cfg: &AlertingConfig,
    m: &DeliveryMetrics,
    carried: &[Claimed],
    took: Duration,
    outcome: &Outcome,
) -> Result<(), DispatchError> {
    let ids: Vec<i64> = carried.iter().map(|c| c.id).collect();
    let attempts: Vec<i32> = carried.iter().map(|c| c.attempts).collect();
    let (name, status, error) = match outcome {
        Outcome::Delivered { status } => ("delivered", *status, None),
        Outcome::Retry { status, error, .. } => ("retry", *status, Some(error.as_str())),
        Outcome::Rejected { status, error } => ("rejected", *status, Some(error.as_str())),
        Outcome::Gone { error } => ("gone", Some(410), Some(error.as_str())),
    };
    let status = status.map(i32::from);
    let mut tx = pool.begin().await.map_err(db("begin marking"))?;
    sqlx::query(
        "INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, outcome,
             http_status, error, grouped)
         SELECT id, attempt, clock_timestamp() - $3 * interval '1 millisecond', $3, $4, $5, $6, $7
         FROM UNNEST($1::int8[], $2::int4[]) AS t(id, attempt)",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(took.as_millis().min(i32::MAX as u128) as i32)
    .bind(name)
    .bind(status)
    .bind(error)
    .bind(ids.len() as i32)
    .execute(&mut *tx)
    .await
    .map_err(db("record an attempt"))?;
    match outcome {
        Outcome::Delivered { .. } => {
            sqlx::query(
                "UPDATE alert_deliveries SET state = 'delivered', finished_at = now(),
                     lease_until = NULL, last_status = $2, last_error = NULL
                 WHERE id = ANY($1) AND state = 'pending'",
            )
            .bind(&ids)
            .bind(status)
            .execute(&mut *tx)
            .await
            .map_err(db("mark delivered"))?;
            // The receiver is answering: its failed deliveries need not sit out their backoff.
            sqlx::query(
                "UPDATE alert_deliveries
                 SET next_attempt_at = greatest(now(), coalesce(not_before, now()))
                 WHERE receiver = $1 AND state = 'pending' AND attempts > 0
                   AND last_status IS NULL
                   AND next_attempt_at > now()
                   AND (lease_until IS NULL OR lease_until < now())",
            )
            .bind(&r.name)
            .execute(&mut *tx)
            .await
            .map_err(db("bring retries forward"))?;
        }
        Outcome::Retry { retry_after, .. } => {
            // Attempt n of a row failed: it waits schedule[n - 1] (its own n:
            // a message may carry first attempts and retries); past the
            // schedule it is given up.
            let mut give_up = Vec::new();
            for c in carried {
                let n = c.attempts.max(1) as usize;
                let Some(&base) = cfg.retry_schedule_secs.get(n - 1) else {
                    give_up.push(c.id);
                    continue;
                };
                let wait = match retry_after {
                    Some(d) => d.as_secs_f64().min(cfg.max_retry_after_secs as f64),
                    None => base as f64 * rand::thread_rng().gen_range(0.8..1.2),
                };
                sqlx::query(
                    "UPDATE alert_deliveries SET next_attempt_at = now() + $2 * interval '1 second',
                         not_before = CASE WHEN $5 THEN now() + $2 * interval '1 second' END,
                         lease_until = NULL, last_status = $3, last_error = $4
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(c.id)
                .bind(wait)
                .bind(status)
                .bind(error)
                .bind(retry_after.is_some())
                .execute(&mut *tx)
                .await
                .map_err(db("schedule a retry"))?;
            }
            if !give_up.is_empty() {
                let why = format!(
                    "given up after {} attempts: {}",
                    cfg.retry_schedule_secs.len() + 1,
                    error.unwrap_or_default()
                );
                finish_failed(&mut tx, &give_up, status, &why).await?;
            }
        }
        Outcome::Rejected { .. } => {
            finish_failed(&mut tx, &ids, status, error.unwrap_or_default()).await?;
        }
        Outcome::Gone { error } => {
            finish_failed(&mut tx, &ids, status, error).await?;
            disable(&mut tx, &r.name, error).await?;
        }
    }
    sqlx::query(
        "UPDATE alert_outbox o SET delivered_at = now()
         WHERE o.alert_id IN (SELECT alert_id FROM alert_deliveries WHERE id = ANY($1))
           AND o.delivered_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM alert_deliveries d
                           WHERE d.alert_id = o.alert_id AND d.state = 'pending')",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await
    .map_err(db("mark the outbox done"))?;
    tx.commit().await.map_err(db("commit marking"))?;
    m.count(&r.name, name, ids.len() as u64);
    Ok(())
}

async fn finish_failed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[i64],
    status: Option<i32>,
    error: &str,
) -> Result<(), DispatchError> {
    sqlx::query(
        "UPDATE alert_deliveries SET state = 'failed', finished_at = now(), lease_until = NULL,
             last_status = $2, last_error = $3
         WHERE id = ANY($1) AND state = 'pending'",
    )
    .bind(ids)
    .bind(status)
    .bind(error)
    .execute(&mut **tx)
    .await
    .map_err(db("give up a delivery"))?;
    Ok(())
}

/// Disables a receiver that answered 410 and queues an operator alert about it.
async fn disable(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    receiver: &str,
    answer: &str,
) -> Result<(), DispatchError> {
    let at: Option<i64> = sqlx::query_scalar(
        "INSERT INTO receiver_status (receiver, disabled_at, disabled_reason)
         VALUES ($1, now(), $2)
         ON CONFLICT (receiver) DO UPDATE SET disabled_at = now(), disabled_reason = $2
         WHERE receiver_status.disabled_at IS NULL
         RETURNING (extract(epoch FROM disabled_at) * 1000)::int8",
    )
    .bind(receiver)
    .bind(answer)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db("disable a receiver"))?;
    let Some(at) = at else {
        return Ok(()); // already disabled by another dispatcher
    };
    eprintln!("keywatch dispatcher: receiver \"{receiver}\" answered 410 Gone: disabled (`keywatch receivers enable {receiver}` re-enables it)");
    let alert = operator_alert(receiver, at);
    let json = serde_json::to_string(&alert).expect("an alert serializes");
    sqlx::query(
        "WITH a AS (
             INSERT INTO alerts (id, kind, severity, action, user_id, ts, reason, alert)
             VALUES ($1, $2, 'critical', 'notify', $3, to_timestamp($4 / 1000.0), $5, $6::jsonb)
             ON CONFLICT (id) DO NOTHING RETURNING id)
         INSERT INTO alert_outbox (alert_id) SELECT id FROM a",
    )
    .bind(&alert.id)
    .bind(alert.kind.as_str())
    .bind(OPERATOR_USER)
    .bind(at)
    .bind(&alert.reason)
    .bind(json)
    .execute(&mut **tx)
    .await
    .map_err(db("queue the operator alert"))?;
    Ok(())
}

/// The operator alert for a receiver disabled at `at_ms`.
pub fn operator_alert(receiver: &str, at_ms: i64) -> Alert {
    Alert {
        id: Alert::make_id(
            AlertKind::ReceiverDisabled,
            &format!("receiver:{receiver}"),
            &at_ms.to_string(),
        ),
        kind: AlertKind::ReceiverDisabled,
        severity: Severity::Critical,
        action: Action::Notify,
        user_id: OPERATOR_USER.into(),
        key_id: None,
        ip: None,
        ts: at_ms,
        observed: None,
        baseline: None,
        threshold: None,
        budget: None,
        expires_at: None,
        tier: None,
        reason: format!(
            "Receiver \"{receiver}\" answered 410 Gone, so keywatch stopped sending alerts to it; fix it, then run `keywatch receivers enable {receiver}`."
        ),
    }
}

/// What an alert is about, for the repeat interval: kind and subject, plus
/// the budget period and percent for budget alerts.
pub fn condition_of(a: &Alert) -> String {
    let mut c = format!(
        "{}|{}|{}|{}",
        a.kind.as_str(),
        a.user_id,
        a.key_id.as_deref().unwrap_or(""),
        a.ip.as_deref().unwrap_or("")
    );
    if a.kind == AlertKind::ReceiverDisabled {
        c.push('|');
        c.push_str(&a.reason);
    }
    if let Some(b) = &a.budget {
        c.push_str(&format!("|{:?}|{}|{}", b.period, b.period_start, b.percent));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_separate_subjects_and_budget_steps() {
        let a = operator_alert("x", 1);
        let mut b = a.clone();
        b.key_id = Some("k".into());
        assert_ne!(condition_of(&a), condition_of(&b));
        assert_eq!(condition_of(&a), condition_of(&operator_alert("x", 2)));
        assert_ne!(condition_of(&a), condition_of(&operator_alert("y", 1)));
    }
}
