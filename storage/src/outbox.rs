//! The delivery tables: `alert_outbox` (alerts waiting to be routed),
//! `alert_deliveries` (one row per alert and receiver), `delivery_attempts`
//! (every attempt) and `receiver_status` (receivers disabled by a 410).
//!
//! This module is the only writer of those tables. The dispatcher in
//! `alerting` decides *what* to do (which receivers want an alert, how long
//! a retry waits, when to give up); these statements do it, each step in one
//! transaction, safe with any number of dispatchers at once:
//!
//! - [`Outbox::route`] takes unrouted outbox rows with `FOR UPDATE SKIP
//!   LOCKED` under one advisory lock (so delivery ids follow the outbox's
//!   order) and writes a delivery per wanted receiver, `suppressed` when the
//!   same condition was delivered to it within the repeat interval;
//! - [`Outbox::claim`] leases a receiver's due deliveries under a
//!   per-receiver advisory lock, oldest first, holding back a user's later
//!   deliveries behind one that failed;
//! - [`Outbox::mark`] records an attempt and its outcome, and closes the
//!   outbox rows whose deliveries are all finished.

use std::time::Duration;

use detectors::Alert;
use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::query_error;
use crate::StorageError;

/// The delivery tables of one database. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: PgPool,
}

/// One receiver an alert is routed to, as the dispatcher decided.
#[derive(Clone, Copy, Debug)]
pub struct Route<'a> {
    /// The receiver's name.
    pub receiver: &'a str,
    /// Seconds the delivery waits before it is due (grouping).
    pub wait_secs: u64,
    /// The same condition delivered to this receiver within this many
    /// seconds makes the new delivery `suppressed`.
    pub repeat_secs: u64,
}

/// What one [`Outbox::route`] call did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routed {
    /// Outbox rows routed.
    pub alerts: usize,
    /// Receivers of the deliveries written as `suppressed`, one entry each.
    pub suppressed: Vec<String>,
    /// Outbox rows whose stored alert does not parse (ids and the parser's
    /// error): marked routed, delivered nowhere.
    pub unreadable: Vec<(String, String)>,
}

/// One leased delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    /// The delivery's id (`alert_deliveries.id`).
    pub id: i64,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// The alert's user.
    pub user_id: String,
    /// The alert.
    pub alert: Alert,
}

/// What [`Outbox::claim`] leased.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claim {
    /// Due deliveries, by id.
    pub claimed: Vec<Claimed>,
    /// Deliveries whose stored alert does not parse (id, error): given up.
    pub unreadable: Vec<(i64, String)>,
}

/// What came of one attempt, as [`Outbox::mark`] records it.
#[derive(Clone, Debug)]
pub enum Marked<'a> {
    /// The receiver took it.
    Delivered {
        /// The HTTP status, when there is one.
        status: Option<u16>,
    },
    /// Worth another attempt: each delivery's own wait, or given up past
    /// the retry schedule.
    Retry {
        /// The HTTP status, when there is one.
        status: Option<u16>,
        /// What went wrong.
        error: &'a str,
        /// Seconds until the next attempt, per delivery carried (`None`:
        /// given up, past the schedule).
        waits: &'a [Option<f64>],
        /// The wait is the receiver's `Retry-After`: not even a recovered
        /// receiver brings it forward.
        not_before: bool,
        /// The `last_error` of the deliveries given up.
        given_up: &'a str,
    },
    /// Refused for good (a 4xx): given up.
    Rejected {
        /// The HTTP status, when there is one.
        status: Option<u16>,
        /// What went wrong.
        error: &'a str,
    },
    /// The receiver answered 410 Gone: given up, and the receiver disabled.
    Gone {
        /// The receiver's answer.
        error: &'a str,
    },
}

impl Marked<'_> {
    /// The outcome's name in `delivery_attempts.outcome`.
    pub fn name(&self) -> &'static str {
        match self {
            Marked::Delivered { .. } => "delivered",
            Marked::Retry { .. } => "retry",
            Marked::Rejected { .. } => "rejected",
            Marked::Gone { .. } => "gone",
        }
    }
}

/// One receiver's deliveries by state, and why it is disabled if it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverSummary {
    /// The receiver's answer that disabled it (`None`: enabled).
    pub disabled: Option<String>,
    /// Deliveries waiting to be sent (or retried).
    pub pending: i64,
    /// Deliveries the receiver took.
    pub delivered: i64,
    /// Deliveries given up.
    pub failed: i64,
    /// Deliveries not sent because the same condition went out recently.
    pub suppressed: i64,
}

impl Outbox {
    /// The delivery tables reached through `pool`.
    pub fn new(pool: PgPool) -> Outbox {
        Outbox { pool }
    }

    /// The pool (for `LISTEN keywatch_outbox`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Receivers disabled by a 410 (until `keywatch receivers enable`).
    pub async fn disabled_receivers(&self) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar("SELECT receiver FROM receiver_status WHERE disabled_at IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("read disabled receivers"))
    }

    /// A receiver's deliveries by state, and whether it is disabled.
    pub async fn receiver_summary(&self, receiver: &str) -> Result<ReceiverSummary, StorageError> {
        let row = sqlx::query(
            "SELECT
                 (SELECT disabled_reason FROM receiver_status
                  WHERE receiver = $1 AND disabled_at IS NOT NULL) AS disabled,
                 count(*) FILTER (WHERE state = 'pending') AS pending,
                 count(*) FILTER (WHERE state = 'delivered') AS delivered,
                 count(*) FILTER (WHERE state = 'failed') AS failed,
                 count(*) FILTER (WHERE state = 'suppressed') AS suppressed
             FROM alert_deliveries WHERE receiver = $1",
        )
        .bind(receiver)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summarise a receiver"))?;
        Ok(ReceiverSummary {
            disabled: row.get("disabled"),
            pending: row.get("pending"),
            delivered: row.get("delivered"),
            failed: row.get("failed"),
            suppressed: row.get("suppressed"),
        })
    }

    /// Enables a receiver disabled by a 410; false when it was not disabled.
    /// Its held deliveries go out on the dispatcher's next round.
    pub async fn enable_receiver(&self, receiver: &str) -> Result<bool, StorageError> {
        let n = sqlx::query(
            "UPDATE receiver_status SET disabled_at = NULL, disabled_reason = NULL
             WHERE receiver = $1 AND disabled_at IS NOT NULL",
        )
        .bind(receiver)
        .execute(&self.pool)
        .await
        .map_err(query_error("enable a receiver"))?
        .rows_affected();
        Ok(n > 0)
    }

    /// Routes up to `limit` queued alerts, in outbox order: `routes` says,
    /// for each alert, which receivers get a delivery.
    pub async fn route<'r>(
        &self,
        limit: i64,
        mut routes: impl FnMut(&Alert) -> Vec<Route<'r>>,
    ) -> Result<Routed, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        // One router at a time, so delivery ids (per-user order) follow the outbox's order.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keywatch-route'))")
            .execute(&mut *tx)
            .await
            .map_err(query_error("take the routing lock"))?;
        let rows = sqlx::query(
            "SELECT o.alert_id, a.alert::text AS alert
             FROM alert_outbox o JOIN alerts a ON a.id = o.alert_id
             WHERE o.routed_at IS NULL
             ORDER BY o.created_at, o.alert_id
             LIMIT $1
             FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error("claim outbox rows"))?;
        let mut out = Routed::default();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.get("alert_id");
            let text: String = row.get("alert");
            ids.push(id.clone());
            let alert: Alert = match serde_json::from_str(&text) {
                Ok(a) => a,
                Err(e) => {
                    out.unreadable.push((id, e.to_string()));
                    continue;
                }
            };
            let condition = condition_of(&alert);
            for r in routes(&alert) {
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
                .bind(r.receiver)
                .bind(&alert.user_id)
                .bind(alert.severity.as_str())
                .bind(&condition)
                .bind(r.wait_secs as f64)
                .bind(r.repeat_secs as f64)
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_error("route an alert"))?;
                if inserted.as_deref() == Some("suppressed") {
                    out.suppressed.push(r.receiver.to_owned());
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
        .map_err(query_error("mark outbox rows routed"))?;
        tx.commit().await.map_err(query_error("commit routing"))?;
        out.alerts = ids.len();
        Ok(out)
    }

    /// Closes outbox rows none of whose deliveries is pending. Marking
    /// checks that too, but two receivers finishing one alert at once can
    /// each see the other's row still pending: this sweep closes such rows.
    pub async fn close_finished(&self) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE alert_outbox o SET delivered_at = now()
             WHERE o.delivered_at IS NULL AND o.routed_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM alert_deliveries d
                               WHERE d.alert_id = o.alert_id AND d.state = 'pending')",
        )
        .execute(&self.pool)
        .await
        .map_err(query_error("close finished outbox rows"))?;
        Ok(())
    }

    /// Leases up to `limit` of `receiver`'s due deliveries for `lease_secs`,
    /// oldest first. A delivery is due when its time has come, nobody holds
    /// its lease, and no earlier delivery of the same user to this receiver
    /// has failed and waits for a retry. With `horizon_secs` above 0 (a
    /// grouping receiver) and something due, first attempts due within that
    /// horizon come along, so they travel in the same message.
    pub async fn claim(
        &self,
        receiver: &str,
        limit: i64,
        horizon_secs: u64,
        lease_secs: u64,
    ) -> Result<Claim, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        // One claimer per receiver at a time: two could otherwise both see a
        // user's first delivery unclaimed and send that user's alerts out of order.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keywatch-claim:' || $1))")
            .bind(receiver)
            .execute(&mut *tx)
            .await
            .map_err(query_error("take the claim lock"))?;
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
        .bind(receiver)
        .bind(limit)
        .bind(horizon_secs as f64)
        .bind(lease_secs as f64)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error("claim deliveries"))?;
        tx.commit().await.map_err(query_error("commit a claim"))?;
        let mut out = Claim::default();
        for row in rows {
            let id: i64 = row.get("id");
            let text: String = row.get("alert");
            match serde_json::from_str::<Alert>(&text) {
                Ok(alert) => out.claimed.push(Claimed {
                    id,
                    attempts: row.get("attempts"),
                    user_id: row.get("user_id"),
                    alert,
                }),
                Err(e) => {
                    let error = format!("the stored alert does not parse: {e}");
                    sqlx::query(
                        "UPDATE alert_deliveries SET state = 'failed', finished_at = now(),
                             lease_until = NULL, last_error = $2 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(&error)
                    .execute(&self.pool)
                    .await
                    .map_err(query_error("give up an unreadable delivery"))?;
                    out.unreadable.push((id, error));
                }
            }
        }
        out.claimed.sort_by_key(|c| c.id);
        Ok(out)
    }

    /// Renews one delivery's lease (a user's webhook list is sent one by one).
    pub async fn renew_lease(&self, id: i64, lease_secs: u64) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE alert_deliveries SET lease_until = now() + $2 * interval '1 second' WHERE id = $1",
        )
        .bind(id)
        .bind(lease_secs as f64)
        .execute(&self.pool)
        .await
        .map_err(query_error("renew a lease"))?;
        Ok(())
    }

    /// Gives back leased deliveries that were not attempted.
    pub async fn release(&self, ids: &[i64]) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE alert_deliveries SET lease_until = NULL, attempts = attempts - 1
             WHERE id = ANY($1) AND state = 'pending'",
        )
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(query_error("release deliveries"))?;
        Ok(())
    }

    /// Records one attempt of `receiver` that carried `carried` (delivery
    /// ids and their attempt numbers) and took `took`, and its outcome, in
    /// one transaction. On [`Marked::Gone`] the receiver is disabled and,
    /// when this call is the one that disabled it, `operator_alert(at_ms)`
    /// (at the moment it was disabled) is stored and queued. Returns
    /// whether this call disabled the receiver.
    pub async fn mark(
        &self,
        receiver: &str,
        carried: &[(i64, i32)],
        took: Duration,
        outcome: &Marked<'_>,
        operator_alert: impl FnOnce(i64) -> Alert,
    ) -> Result<bool, StorageError> {
        let ids: Vec<i64> = carried.iter().map(|c| c.0).collect();
        let attempts: Vec<i32> = carried.iter().map(|c| c.1).collect();
        let (status, error) = match *outcome {
            Marked::Delivered { status } => (status, None),
            Marked::Retry { status, error, .. } | Marked::Rejected { status, error } => {
                (status, Some(error))
            }
            Marked::Gone { error } => (Some(410), Some(error)),
        };
        let status = status.map(i32::from);
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        sqlx::query(
            "INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, outcome,
                 http_status, error, grouped)
             SELECT id, attempt, clock_timestamp() - $3 * interval '1 millisecond', $3, $4, $5, $6, $7
             FROM UNNEST($1::int8[], $2::int4[]) AS t(id, attempt)",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(took.as_millis().min(i32::MAX as u128) as i32)
        .bind(outcome.name())
        .bind(status)
        .bind(error)
        .bind(ids.len() as i32)
        .execute(&mut *tx)
        .await
        .map_err(query_error("record an attempt"))?;
        let mut disabled = false;
        match *outcome {
            Marked::Delivered { .. } => {
                sqlx::query(
                    "UPDATE alert_deliveries SET state = 'delivered', finished_at = now(),
                         lease_until = NULL, last_status = $2, last_error = NULL
                     WHERE id = ANY($1) AND state = 'pending'",
                )
                .bind(&ids)
                .bind(status)
                .execute(&mut *tx)
                .await
                .map_err(query_error("mark delivered"))?;
                // The receiver is answering: its failed deliveries need not sit out their backoff.
                sqlx::query(
                    "UPDATE alert_deliveries
                     SET next_attempt_at = greatest(now(), coalesce(not_before, now()))
                     WHERE receiver = $1 AND state = 'pending' AND attempts > 0
                       AND last_status IS NULL
                       AND next_attempt_at > now()
                       AND (lease_until IS NULL OR lease_until < now())",
                )
                .bind(receiver)
                .execute(&mut *tx)
                .await
                .map_err(query_error("bring retries forward"))?;
            }
            Marked::Retry {
                waits,
                not_before,
                given_up,
                ..
            } => {
                let mut give_up = Vec::new();
                for (&id, wait) in ids.iter().zip(waits) {
                    let Some(wait) = *wait else {
                        give_up.push(id);
                        continue;
                    };
                    sqlx::query(
                        "UPDATE alert_deliveries SET next_attempt_at = now() + $2 * interval '1 second',
                             not_before = CASE WHEN $5 THEN now() + $2 * interval '1 second' END,
                             lease_until = NULL, last_status = $3, last_error = $4
                         WHERE id = $1 AND state = 'pending'",
                    )
                    .bind(id)
                    .bind(wait)
                    .bind(status)
                    .bind(error)
                    .bind(not_before)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("schedule a retry"))?;
                }
                if !give_up.is_empty() {
                    finish_failed(&mut tx, &give_up, status, given_up).await?;
                }
            }
            Marked::Rejected { error, .. } => {
                finish_failed(&mut tx, &ids, status, error).await?;
            }
            Marked::Gone { error } => {
                finish_failed(&mut tx, &ids, status, error).await?;
                disabled = disable(&mut tx, receiver, error, operator_alert).await?;
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
        .map_err(query_error("mark the outbox done"))?;
        tx.commit().await.map_err(query_error("commit marking"))?;
        Ok(disabled)
    }
}

async fn finish_failed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[i64],
    status: Option<i32>,
    error: &str,
) -> Result<(), StorageError> {
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
    .map_err(query_error("give up a delivery"))?;
    Ok(())
}

/// Disables a receiver that answered 410 and stores and queues the
/// operator alert about it; false when another dispatcher disabled it first.
async fn disable(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    receiver: &str,
    answer: &str,
    operator_alert: impl FnOnce(i64) -> Alert,
) -> Result<bool, StorageError> {
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
    .map_err(query_error("disable a receiver"))?;
    let Some(at) = at else {
        return Ok(false);
    };
    let alert = operator_alert(at);
    insert_alert(tx, &alert).await?;
    Ok(true)
}

/// Stores an alert raised outside a batch (an operator alert) and queues
/// it for delivery; an alert already stored (same id) is left alone.
pub(crate) async fn insert_alert(
    conn: &mut sqlx::PgConnection,
    alert: &Alert,
) -> Result<(), StorageError> {
    let json = serde_json::to_string(alert).map_err(|source| StorageError::Encode {
        alert_id: alert.id.clone(),
        source,
    })?;
    sqlx::query(
        "WITH a AS (
             INSERT INTO alerts (id, kind, severity, action, user_id, ts, reason, alert)
             VALUES ($1, $2, $3, $4, $5, to_timestamp($6 / 1000.0), $7, $8::jsonb)
             ON CONFLICT (id) DO NOTHING RETURNING id)
         INSERT INTO alert_outbox (alert_id) SELECT id FROM a",
    )
    .bind(&alert.id)
    .bind(alert.kind.as_str())
    .bind(alert.severity.as_str())
    .bind(alert.action.as_str())
    .bind(&alert.user_id)
    .bind(alert.ts)
    .bind(&alert.reason)
    .bind(json)
    .execute(conn)
    .await
    .map_err(query_error("queue the operator alert"))?;
    Ok(())
}

/// What an alert is about, for the repeat interval: kind and subject, plus
/// the budget period and percent for budget alerts (and, for an operator
/// alert about a receiver, its reason).
pub fn condition_of(a: &Alert) -> String {
    let mut c = format!(
        "{}|{}|{}|{}",
        a.kind.as_str(),
        a.user_id,
        a.key_id.as_deref().unwrap_or(""),
        a.ip.as_deref().unwrap_or("")
    );
    if a.kind == detectors::AlertKind::ReceiverDisabled {
        c.push('|');
        c.push_str(&a.reason);
    }
    if let Some(b) = &a.budget {
        c.push_str(&format!("|{:?}|{}|{}", b.period, b.period_start, b.percent));
    }
    c
}
