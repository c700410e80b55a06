//! The revocation feed's table, `revocation_actions`, and its view of what
//! is in force, `active_revocations` (migration 0003).
//!
//! Batches write the detectors' actions in their own transaction
//! ([`crate::Store::commit_batch`]); an operator's block or unblock goes in
//! through [`Feed::record_manual`]. Both take their sequence number from the
//! same sequence and fire the same `keywatch_feed` notification, so the
//! feed has one order. Readers page by sequence number ([`Feed::after`]) or
//! take what is in force ([`Feed::in_force`]).

use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;

use crate::error::query_error;
use crate::StorageError;

/// The revocation feed of one database. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Feed {
    pool: PgPool,
}

/// One action of the feed, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedRow {
    /// Its place in the feed (increasing, never reused).
    pub seq: i64,
    /// The key, or `None` for every key of the user.
    pub key_id: Option<String>,
    /// The account (empty for an address action).
    pub user_id: String,
    /// The address, for an address action (key cycling, credential stuffing).
    pub ip: Option<String>,
    /// `throttle`, `block` or `unblock`.
    pub action: String,
    /// Why, for a person.
    pub reason: String,
    /// The alert it comes from (`None` for an operator's action).
    pub alert_id: Option<String>,
    /// When it was issued, Unix ms.
    pub issued_ms: i64,
    /// When it lapses, Unix ms (`None`: never).
    pub expires_ms: Option<i64>,
}

/// An operator's block, throttle or unblock, as `keywatch keys` records it.
#[derive(Clone, Copy, Debug)]
pub struct ManualAction<'a> {
    /// The key, or `None` for every key of the user.
    pub key_id: Option<&'a str>,
    /// The account (empty for an address action).
    pub user_id: &'a str,
    /// The address, for an address action (then no key and no account).
    pub ip: Option<&'a str>,
    /// `block`, `throttle` or `unblock`.
    pub action: &'a str,
    /// Why.
    pub reason: &'a str,
    /// How long it lasts (`None`: until lifted).
    pub hours: Option<f64>,
    /// Who did it (recorded as `operator:NAME`).
    pub operator: &'a str,
}

const COLUMNS: &str = "seq, key_id, user_id, ip, action, reason, alert_id,
    (extract(epoch FROM issued_at) * 1000)::int8 AS issued_ms,
    (extract(epoch FROM expires_at) * 1000)::int8 AS expires_ms";

fn row_of(row: &PgRow) -> FeedRow {
    FeedRow {
        seq: row.get("seq"),
        key_id: row.get("key_id"),
        user_id: row.get("user_id"),
        ip: row.get("ip"),
        action: row.get("action"),
        reason: row.get("reason"),
        alert_id: row.get("alert_id"),
        issued_ms: row.get("issued_ms"),
        expires_ms: row.get("expires_ms"),
    }
}

impl Feed {
    /// The feed reached through `pool`.
    pub fn new(pool: PgPool) -> Feed {
        Feed { pool }
    }

    /// The pool (for `LISTEN keywatch_feed`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Up to `limit` actions after sequence number `after`, in order.
    pub async fn after(&self, after: i64, limit: u32) -> Result<Vec<FeedRow>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM revocation_actions WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("read the feed"))?;
        Ok(rows.iter().map(row_of).collect())
    }

    /// What is in force (not expired, not lifted), in feed order.
    pub async fn in_force(&self) -> Result<Vec<FeedRow>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM active_revocations ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("read the blocklist"))?;
        Ok(rows.iter().map(row_of).collect())
    }

    /// The newest committed sequence number (0 for an empty feed).
    pub async fn newest_seq(&self) -> Result<i64, StorageError> {
        sqlx::query_scalar::<_, Option<i64>>("SELECT max(seq) FROM revocation_actions")
            .fetch_one(&self.pool)
            .await
            .map(|m| m.unwrap_or(0))
            .map_err(query_error("read the newest feed seq"))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(query_error("answer a health check"))?;
        Ok(())
    }

    /// The users a key is blocked or throttled under right now.
    pub async fn owners_in_force(&self, key_id: &str) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM active_revocations WHERE key_id = $1 ORDER BY 1",
        )
        .bind(key_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("read a key's blocks"))
    }

    /// The user a key belongs to, from its latest alert or else its
    /// traffic of the last 30 days.
    pub async fn user_of_key(&self, key_id: &str) -> Result<Option<String>, StorageError> {
        sqlx::query_scalar(
            "SELECT user_id FROM (
                 (SELECT user_id, 1 AS pref FROM alerts WHERE key_id = $1 ORDER BY ts DESC LIMIT 1)
                 UNION ALL
                 (SELECT user_id, 2 FROM rollup_minute
                  WHERE key_id = $1 AND minute > now() - interval '30 days'
                  ORDER BY minute DESC LIMIT 1)) s
             ORDER BY pref LIMIT 1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("find a key's user"))
    }

    /// Records an operator's action in the feed (same table, order and
    /// notification as the detectors' actions); returns its sequence number.
    pub async fn record_manual(&self, a: &ManualAction<'_>) -> Result<i64, StorageError> {
        sqlx::query_scalar(
            "INSERT INTO revocation_actions (key_id, user_id, ip, action, reason, issued_at, expires_at, actor)
             VALUES ($1, $2, $7, $3, $4, now(), now() + $5 * interval '1 hour', $6)
             RETURNING seq",
        )
        .bind(a.key_id)
        .bind(a.user_id)
        .bind(a.action)
        .bind(a.reason)
        .bind(a.hours)
        .bind(format!("operator:{}", a.operator))
        .bind(a.ip)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("record an operator's action"))
    }
}
