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
//!
//! This module decides; `storage::outbox` owns the tables and their
//! statements.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detectors::{Action, Alert, AlertKind, Severity};
use rand::Rng;
use sqlx::postgres::{PgListener, PgPool};
use storage::outbox::{Claimed, Marked, Outbox, Route};
use storage::StorageError;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, warn};

use crate::config::{AlertingConfig, ReceiverConfig};
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

/// A dispatcher failure: a Postgres error, naming the step that failed
/// and the driver's error.
#[derive(Debug, thiserror::Error)]
#[error("dispatcher: {}", .0.detail())]
pub struct DispatchError(StorageError);

impl From<StorageError> for DispatchError {
    fn from(e: StorageError) -> Self {
        DispatchError(e)
    }
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

// The dispatcher's events: each one that a counter watches logs and counts
// here, together.
impl DeliveryMetrics {
    /// A round failed on a Postgres error; the next round retries.
    fn round_failed(&self, e: &DispatchError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "dispatcher round failed; retrying");
    }

    /// An attempt's outcome for the `n` deliveries it carried; `disabled`
    /// when its 410 disabled the receiver.
    fn attempted(&self, receiver: &str, outcome: &'static str, n: u64, disabled: bool) {
        self.count(receiver, outcome, n);
        if disabled {
            error!(receiver, "receiver answered 410 Gone: disabled (`keywatch receivers enable {receiver}` re-enables it)");
        }
    }

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
    outbox: Outbox,
    receivers: Vec<Arc<Receiver>>,
    cfg: AlertingConfig,
    metrics: Arc<DeliveryMetrics>,
}

impl Dispatcher {
    /// A dispatcher over `receivers` (built from `cfg.receivers`).
    pub fn new(pool: PgPool, receivers: Vec<Receiver>, cfg: AlertingConfig) -> Dispatcher {
        Dispatcher {
            outbox: Outbox::new(pool),
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
                listener = match PgListener::connect_with(self.outbox.pool()).await {
                    Ok(mut l) => match l.listen("keywatch_outbox").await {
                        Ok(()) => Some(l),
                        Err(e) => {
                            warn!(error = %e, "LISTEN failed; polling instead");
                            None
                        }
                    },
                    Err(e) => {
                        warn!(error = %e, "LISTEN failed; polling instead");
                        None
                    }
                };
            }
            if let Err(e) = self.round().await {
                self.metrics.round_failed(&e);
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
        let disabled = self.outbox.disabled_receivers().await?;
        let mut set = JoinSet::new();
        for r in &self.receivers {
            if disabled.contains(&r.name) {
                continue;
            }
            let (outbox, r, cfg, m) = (
                self.outbox.clone(),
                Arc::clone(r),
                self.cfg.clone(),
                Arc::clone(&self.metrics),
            );
            set.spawn(async move { send_due(&outbox, &r, &cfg, &m).await });
        }
        let mut sent = 0;
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                // A bug; the leases run out and the next round sends again.
                Err(e) => error!(error = %e, "BUG: a receiver's task failed"),
            }
        }
        self.outbox.close_finished().await?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Routes up to [`ROUTE_BATCH`] queued alerts; returns how many.
    async fn route(&self) -> Result<usize, DispatchError> {
        let routed = self
            .outbox
            .route(ROUTE_BATCH, |alert| {
                self.receivers
                    .iter()
                    // A disabled receiver's deliveries are held (pending) until it is enabled.
                    .filter(|r| r.wants(alert))
                    .map(|r| Route {
                        receiver: &r.name,
                        wait_secs: if r.groups() && alert.severity != Severity::Critical {
                            group_wait(&self.cfg, r)
                        } else {
                            0
                        },
                        repeat_secs: repeat_interval(&self.cfg, r),
                    })
                    .collect()
            })
            .await?;
        for (id, e) in &routed.unreadable {
            // Written by this program, so this is a bug or a hand edit: keep it visible.
            error!(alert_id = %id, error = %e, "a stored alert does not parse; not delivered");
        }
        for r in &routed.suppressed {
            self.metrics.count(r, "suppressed", 1);
        }
        self.metrics
            .routed
            .fetch_add(routed.alerts as u64, Ordering::Relaxed);
        Ok(routed.alerts)
    }
}

/// `r`'s own entry in `alerting.receivers` (its per-receiver overrides).
fn own_config<'c>(cfg: &'c AlertingConfig, r: &Receiver) -> Option<&'c ReceiverConfig> {
    cfg.receivers.iter().find(|c| c.name == r.name)
}

/// How long the same condition is not sent to `r` again.
fn repeat_interval(cfg: &AlertingConfig, r: &Receiver) -> u64 {
    own_config(cfg, r)
        .and_then(|c| c.repeat_interval_secs)
        .unwrap_or(cfg.repeat_interval_secs)
}

/// How long `r`'s lower-severity deliveries wait to be grouped.
fn group_wait(cfg: &AlertingConfig, r: &Receiver) -> u64 {
    own_config(cfg, r)
        .and_then(|c| c.group_wait_secs)
        .unwrap_or(cfg.group_wait_secs)
}

/// Claims, sends and marks one receiver's due deliveries. Returns how many
/// deliveries were attempted.
async fn send_due(
    outbox: &Outbox,
    r: &Arc<Receiver>,
    cfg: &AlertingConfig,
    m: &Arc<DeliveryMetrics>,
) -> Result<usize, DispatchError> {
    // A grouping receiver with something due also takes the lower-severity
    // deliveries still in their group wait, so they go in the same message.
    let horizon = if r.groups() { group_wait(cfg, r) } else { 0 };
    let claim = outbox
        .claim(&r.name, CLAIM_BATCH, horizon, cfg.lease_secs)
        .await?;
    for (id, error) in &claim.unreadable {
        error!(delivery_id = id, error = %error, "given up");
    }
    let claimed = claim.claimed;
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
        mark(outbox, r, cfg, m, &claimed, started.elapsed(), &outcome).await?;
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
            let (outbox, r, cfg, m, gone) = (
                outbox.clone(),
                Arc::clone(r),
                cfg.clone(),
                Arc::clone(m),
                Arc::clone(&gone),
            );
            set.spawn(async move { send_user(&outbox, &r, &cfg, &m, &gone, list).await });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => error!(error = %e, "BUG: a delivery task failed"),
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
    outbox: &Outbox,
    r: &Receiver,
    cfg: &AlertingConfig,
    m: &DeliveryMetrics,
    gone_flag: &AtomicBool,
    list: Vec<Claimed>,
) -> Result<(), DispatchError> {
    let mut rest = list.into_iter().peekable();
    while let Some(c) = rest.next_if(|_| !gone_flag.load(Ordering::Acquire)) {
        // Each send gets a full lease: a user's list is sent one by one.
        outbox.renew_lease(c.id, cfg.lease_secs).await?;
        let started = Instant::now();
        let outcome = r
            .send(std::slice::from_ref(&c.alert), c.attempts as u32)
            .await;
        let ok = matches!(outcome, Outcome::Delivered { .. });
        let gone = matches!(outcome, Outcome::Gone { .. });
        mark(
            outbox,
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
    Ok(outbox.release(&ids).await?)
}

/// Records an attempt's outcome for the deliveries it carried. A retry
/// waits its row's step of the schedule (attempt n waits schedule[n - 1]:
/// a message may carry first attempts and retries, each with its own n),
/// jittered by ±20%, or the receiver's `Retry-After` (capped); past the
/// schedule the row is given up.
async fn mark(
    outbox: &Outbox,
    r: &Receiver,
    cfg: &AlertingConfig,
    m: &DeliveryMetrics,
    carried: &[Claimed],
    took: Duration,
    outcome: &Outcome,
) -> Result<(), DispatchError> {
    let ids: Vec<(i64, i32)> = carried.iter().map(|c| (c.id, c.attempts)).collect();
    let waits: Vec<Option<f64>>;
    let given_up: String;
    let marked = match outcome {
        Outcome::Delivered { status } => Marked::Delivered { status: *status },
        Outcome::Retry {
            status,
            error,
            retry_after,
        } => {
            waits = carried
                .iter()
                .map(|c| {
                    let base = *cfg
                        .retry_schedule_secs
                        .get(c.attempts.max(1) as usize - 1)?;
                    Some(match retry_after {
                        Some(d) => d.as_secs_f64().min(cfg.max_retry_after_secs as f64),
                        None => base as f64 * rand::thread_rng().gen_range(0.8..1.2),
                    })
                })
                .collect();
            given_up = format!(
                "given up after {} attempts: {error}",
                cfg.retry_schedule_secs.len() + 1
            );
            Marked::Retry {
                status: *status,
                error,
                waits: &waits,
                not_before: retry_after.is_some(),
                given_up: &given_up,
            }
        }
        Outcome::Rejected { status, error } => Marked::Rejected {
            status: *status,
            error,
        },
        Outcome::Gone { error } => Marked::Gone { error },
    };
    let disabled = outbox
        .mark(&r.name, &ids, took, &marked, |at| {
            operator_alert(&r.name, at)
        })
        .await?;
    m.attempted(&r.name, marked.name(), ids.len() as u64, disabled);
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

#[cfg(test)]
mod tests {
    use super::*;
    use storage::outbox::condition_of;

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
