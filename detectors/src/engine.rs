//! The per-partition engine: every detector over one stream of events.
//!
//! `observe(event)` runs on event time: the engine's clock is the largest
//! event time seen, so a replay of the same records makes the same
//! decisions with the same alert ids, whatever the wall clock says. State
//! per user and key is a few hundred bytes, expires when idle, and the whole
//! [`EngineState`] can be snapshotted and restored with serde.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::alert::{round_usd, Action, Alert, AlertKind, BudgetInfo, Severity};
use crate::baseline::{
    decay_for_half_life, minute_of, QuantileCache, Raise, RatePrior, ShareBaseline, SharePrior,
    Tick,
};
use crate::checkpoint::{Checkpoint, CheckpointError, Entry, EntryKind};
use crate::config::{ConfigError, EngineConfig, TierConfig};
use crate::dedup::{Dedup, DedupCore};
use crate::detect::budget::{
    percent_bar, BudgetEvent, BudgetLimits, Crossing, Ledger, PeriodClock, Posted,
    TokenQuotaCrossing,
};
use crate::detect::context::{Context, Familiar, Origin};
use crate::detect::leaked_key::{Leak, LeakParams, LeakState};
use crate::detect::pending::{Pending, Waiting};
use crate::detect::repeated_prompt::{
    Early, PromptFinding, PromptParams, PromptTracker, UserPrompts,
};
use crate::detect::request_spike::{RateParams, RateState, Spike};
use crate::detect::runaway_spend::{PaceParams, Runaway, SpendPace};
use crate::detect::token_spike::{TokenCause, TokenParams, TokenState};
use crate::event::{Event, Phase};
use crate::hash::{combine, stable_hash};
use crate::price::PriceTable;
use crate::subject::projection::{Kinds, Projection, Seq, FARMING, YOUNG};
use crate::time::{PeriodKind, MINUTE_MS};
use crate::StableBuild;

/// Most distinct unpriced model names kept for the report.
const MAX_UNPRICED_NAMES: usize = 64;
/// State is swept for idle entries every this many minutes of event time
/// (a full pass over the maps: rare enough to cost little, often enough that
/// prompt sightings stay within their window plus this).
const SWEEP_EVERY_MINUTES: u32 = 30;

/// What `observe` did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Counted by every detector that applies.
    Counted {
        /// What the record cost, in micro-dollars (its `cost_usd`, else priced;
        /// 0 for request-phase records), as the budgets counted it.
        cost_micros: u64,
    },
    /// A repeat of a (request_id, phase) already counted: changed nothing.
    Duplicate,
}

/// Per-user state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Last minute with a record.
    pub last_minute: u32,
    /// Request rate.
    pub rate: RateState,
    /// Token sizes and rate.
    pub tokens: TokenState,
    /// Spend and tokens per period.
    pub ledger: Ledger,
    /// Spend pace.
    pub pace: SpendPace,
    /// Usual networks and clients.
    #[serde(default)]
    pub familiar: Familiar,
    /// Share of the user's prompts that repeat one seen in the window.
    #[serde(default)]
    pub repeats: ShareBaseline,
    /// Prompts seen in the window (none held for a user without any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Box<UserPrompts>>,
    /// Requests waiting for their response record (split logs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Box<Pending>>,
}

/// Per-key state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// Last minute with a record.
    pub last_minute: u32,
    /// Request rate.
    pub rate: RateState,
    /// Addresses and networks.
    pub leak: LeakState,
}

/// Everything the engine has learned: what a checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// The engine's clock: the largest event time seen, Unix ms.
    pub now_ms: i64,
    /// Users by id. The state is boxed so that the map's slots stay
    /// small: a map doubles its slots when it fills, and empty slots then
    /// cost a pointer each instead of a whole state (`tests/memory.rs`).
    /// A checkpoint keeps them as entries of their own (its core has none).
    #[serde(default)]
    pub users: HashMap<Box<str>, Box<UserState>, StableBuild>,
    /// Keys by id, boxed likewise.
    #[serde(default)]
    pub keys: HashMap<Box<str>, Box<KeyState>, StableBuild>,
    /// The earliest event time seen, Unix ms (0: none): how long the
    /// engine has watched, for what counts as a young account.
    #[serde(default)]
    pub first_ms: i64,
    /// Recently counted records.
    dedup: Dedup,
    /// Minute of the last sweep of prompt sightings.
    last_sweep: u32,
    /// Minute of the last sweep of idle users and keys.
    #[serde(default)]
    last_idle_sweep: u32,
}

impl EngineState {
    /// The state a checkpoint stored: its core, then its entries. Also
    /// reads a checkpoint from before entries (accounts inside the core).
    /// Returns the state and what [`Engine::track_changes`] wants: the
    /// checkpoint's clock minute, or None when its accounts were inside
    /// the core (so the next checkpoint writes them all as entries).
    pub fn from_checkpoint(
        core: &[u8],
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(EngineState, Option<u32>), CheckpointError> {
        let mut st: EngineState =
            serde_json::from_slice(core).map_err(|source| CheckpointError {
                what: "the checkpoint's core".into(),
                source,
            })?;
        let inside = !st.users.is_empty() || !st.keys.is_empty();
        st.dedup.restored_inline();
        for e in entries {
            let bad = |source| CheckpointError {
                what: format!("the checkpoint entry of {} {:?}", e.kind.as_str(), &*e.id),
                source,
            };
            match e.kind {
                EntryKind::User => {
                    let u: UserState = serde_json::from_slice(&e.state).map_err(bad)?;
                    st.users.insert(e.id, Box::new(u));
                }
                EntryKind::Key => {
                    let k: KeyState = serde_json::from_slice(&e.state).map_err(bad)?;
                    st.keys.insert(e.id, Box::new(k));
                }
                EntryKind::Dedup => {
                    st.dedup
                        .restore_chunk(&e.id, &e.state)
                        .map_err(|m| bad(serde::de::Error::custom(m)))?;
                }
            }
        }
        let since = (!inside).then(|| minute_of(st.now_ms));
        Ok((st, since))
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("engine state serializes")
}

/// Counters for the run's report and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Events observed (including duplicates).
    pub events: u64,
    /// Duplicates ignored.
    pub duplicates: u64,
    /// Records older than their account's previous budget period (charged to the current one).
    pub late: u64,
    /// Records whose time was past their reference by more than
    /// `event_time.max_ahead_secs` (counted at the bound).
    #[serde(default)]
    pub ahead: u64,
    /// Records with usage whose model had no price (and no fallback applied).
    pub unpriced: u64,
    /// Unpriced records by model name (at most 64 names; the rest under `(other)`).
    pub unpriced_models: BTreeMap<String, u64>,
    /// Records naming a tier the config does not have (given the default tier).
    pub unknown_tiers: u64,
    /// Alerts raised, by kind.
    pub alerts: BTreeMap<AlertKind, u64>,
}

/// How much state the engine holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tracked {
    /// Users.
    pub users: usize,
    /// Keys.
    pub keys: usize,
    /// (user, fingerprint) pairs seen in the window.
    pub prompt_sightings: usize,
    /// Record hashes held for duplicate detection.
    pub dedup_entries: usize,
}

/// A tier with its detector settings resolved.
#[derive(Clone, Debug)]
struct Tier {
    name: String,
    limits: TierConfig,
    rate: RateParams,
    tokens: TokenParams,
    daily_micros: u64,
    monthly_micros: Option<u64>,
}

/// A user's overrides, resolved.
#[derive(Clone, Copy, Debug)]
struct UserLimits {
    tier: Option<usize>,
    daily_micros: Option<u64>,
    monthly_micros: Option<u64>,
}

/// Settings resolved once at start-up.
#[derive(Clone, Debug)]
struct Resolved {
    tiers: Vec<Tier>,
    default_tier: usize,
    overrides: HashMap<String, UserLimits>,
    percents: Vec<u8>,
    utc_offset_min: i32,
    prompts: PromptParams,
    /// Prior of a user's share of prompts that repeat one in the window.
    repeat_prior: SharePrior,
    /// Per-sighting decay of that share.
    repeat_decay: f64,
    leak: LeakParams,
    repeat_action: Action,
    cfg: EngineConfig,
    idle_ttl_min: u32,
    dedup_horizon_ms: i64,
    max_ahead_ms: i64,
    pace_decay: f64,
}

/// The engine for one partition (or one replay).
#[derive(Clone, Debug)]
pub struct Engine {
    r: Resolved,
    prices: PriceTable,
    state: EngineState,
    stats: EngineStats,
    findings: Vec<PromptFinding>,
    /// The last record observed made its account a repeater of its prompt.
    farming: bool,
    periods: PeriodClock,
    quantiles: QuantileCache,
    /// What changed since the last checkpoint (None: not tracked, as in a
    /// replay, which never checkpoints).
    changes: Option<Box<Changes>>,
}

/// What an incremental checkpoint needs to know besides the state.
#[derive(Clone, Debug, Default)]
struct Changes {
    /// The clock minute of the last stored checkpoint: an account or key
    /// seen at or after it changed (`last_minute` is the engine's clock
    /// when it was last seen). None: nothing stored yet; write everything.
    since: Option<u32>,
    /// Accounts whose prompt sightings a sweep may have changed without a
    /// record of theirs.
    swept: Vec<Box<str>>,
    /// Accounts forgotten since.
    forgotten_users: Vec<Box<str>>,
    /// Keys forgotten since.
    forgotten_keys: Vec<Box<str>>,
}

/// The part of [`EngineState`] a checkpoint's core holds: all but its
/// accounts and keys (field names as in `EngineState`, which reads it).
#[derive(Serialize)]
struct CoreRef {
    now_ms: i64,
    first_ms: i64,
    dedup: DedupCore,
    last_sweep: u32,
    last_idle_sweep: u32,
}

fn micros(usd: f64) -> u64 {
    (usd * 1e6).round() as u64
}

fn resolve(cfg: &EngineConfig) -> Result<Resolved, ConfigError> {
    cfg.validate()?;
    let rs = &cfg.request_spike;
    let ts = &cfg.token_spike;
    let tiers: Vec<Tier> = cfg
        .effective_tiers()
        .into_iter()
        .map(|(name, t)| {
            let rpm = t.requests_per_minute as f64;
            let max_out = t.max_output_tokens as f64;
            Tier {
                rate: RateParams {
                    prior: RatePrior {
                        rate: (rs.prior_fraction * rpm).max(rs.prior_requests),
                        minutes: rs.prior_minutes,
                    },
                    decay: decay_for_half_life(rs.half_life_minutes),
                    burst_factor: rs.burst_factor,
                    p_value: rs.p_value,
                    min_requests: (rs.min_fraction_of_tier * rpm).max(rs.min_requests as f64),
                    cooldown_minutes: rs.cooldown_minutes,
                },
                tokens: TokenParams {
                    cap: ts.huge_fraction_of_max * max_out,
                    share_prior: SharePrior {
                        share: ts.cap_share_prior,
                        trials: ts.cap_share_prior_answers,
                    },
                    share_decay: decay_for_half_life(ts.cap_share_half_life),
                    share_p_value: ts.cap_share_p_value,
                    share_min_hits: ts.cap_share_min_hits,
                    prompt_z: ts.prompt_z,
                    prompt_factor: ts.prompt_factor,
                    prompt_min: ts.prompt_min_tokens as f64,
                    // Wide, and the same on every plan: a new account's
                    // prompts say nothing yet.
                    prompt_prior: (1000.0, 1.2),
                    exhaustion_count: ts.exhaustion_count,
                    probe_max: cfg.repeated_prompt.probe_max_tokens,
                    window_secs: ts.window_minutes * 60,
                    // A hundredth of the day's allowance per active minute, spread wide.
                    minute_prior: (t.tokens_per_day as f64 / 100.0, 1.0),
                    burst_z: ts.burst_z,
                    min_burst: (ts.min_max_outputs_per_minute * max_out)
                        .max(ts.min_day_fraction * t.tokens_per_day as f64),
                    alpha_min: 1.0 / ts.half_life,
                    size_prior: (max_out / 10.0, 1.0),
                    cooldown_minutes: ts.cooldown_minutes,
                    in_flight_secs: ts.in_flight_secs,
                },
                daily_micros: micros(t.daily_budget_usd),
                monthly_micros: t.monthly_budget_usd.map(micros),
                limits: t,
                name,
            }
        })
        .collect();
    let idx = |name: &str| tiers.iter().position(|t| t.name == name);
    let default_tier = idx(&cfg.default_tier).expect("validated");
    let overrides = cfg
        .users
        .iter()
        .map(|(u, o)| {
            let tier = o.tier.as_deref().and_then(idx);
            let limits = UserLimits {
                tier,
                daily_micros: o.daily_budget_usd.map(micros),
                monthly_micros: o.monthly_budget_usd.map(micros),
            };
            (u.clone(), limits)
        })
        .collect();
    let mut percents = cfg.budgets.alert_percents.clone();
    percents.sort_unstable();
    Ok(Resolved {
        default_tier,
        overrides,
        percents,
        utc_offset_min: cfg.utc_offset_minutes()?,
        prompts: PromptParams {
            max_repeats: cfg.repeated_prompt.max_repeats,
            window_secs: cfg.repeated_prompt.window_minutes * 60,
            early_count: cfg.repeated_prompt.early_count,
            early_secs: cfg.repeated_prompt.early_window_minutes * 60,
            early_min_span_secs: cfg.repeated_prompt.early_min_span_secs,
        },
        repeat_prior: SharePrior {
            share: 0.02,
            trials: 50.0,
        },
        repeat_decay: decay_for_half_life(200.0),
        leak: LeakParams {
            window_minutes: cfg.leaked_key.window_minutes,
            min_ips: cfg.leaked_key.min_ips,
            min_asns: cfg.leaked_key.min_asns,
            factor: cfg.leaked_key.factor,
        },
        repeat_action: cfg.repeated_prompt.action,
        idle_ttl_min: cfg.state.idle_ttl_hours * 60,
        dedup_horizon_ms: cfg.state.dedup_horizon_minutes as i64 * MINUTE_MS,
        max_ahead_ms: i64::from(cfg.event_time.max_ahead_secs) * 1000,
        pace_decay: decay_for_half_life(cfg.runaway_spend.half_life_minutes),
        tiers,
        cfg: cfg.clone(),
    })
}

/// Groups digits: 12345 -> "12,345" (rounded; saturating far out of range).
fn thousands(n: f64) -> String {
    crate::text::group_digits(n.round() as i64 as i128)
}

fn ratio(observed: f64, baseline: f64) -> String {
    if baseline >= 0.05 {
        format!("{:.0}x", observed / baseline)
    } else {
        "far above".to_string()
    }
}

/// A fingerprint's first 12 characters, as alert reasons show it.
pub(crate) fn short_fp(fp: &str) -> &str {
    match fp.char_indices().nth(12) {
        Some((i, _)) => &fp[..i],
        None => fp,
    }
}

impl Engine {
    /// An engine with fresh state; the config is validated first.
    pub fn new(cfg: &EngineConfig) -> Result<Self, ConfigError> {
        Self::restore(cfg, EngineState::default())
    }

    /// An engine continuing from a snapshot.
    pub fn restore(cfg: &EngineConfig, state: EngineState) -> Result<Self, ConfigError> {
        let r = resolve(cfg)?;
        let prices = PriceTable::new(cfg.effective_prices(), cfg.pricing.fallback);
        let periods = PeriodClock::new(r.utc_offset_min);
        Ok(Engine {
            r,
            prices,
            periods,
            state,
            stats: EngineStats::default(),
            findings: Vec::new(),
            farming: false,
            quantiles: QuantileCache::default(),
            changes: None,
        })
    }

    /// Starts tracking what changes, for [`Engine::checkpoint`]: `since` is
    /// what [`EngineState::from_checkpoint`] returned (None: a fresh engine,
    /// or one restored from a checkpoint that kept its accounts inside; its
    /// first checkpoint writes every entry).
    pub fn track_changes(&mut self, since: Option<u32>) {
        self.state.dedup.track();
        self.changes = Some(Box::new(Changes {
            since,
            ..Changes::default()
        }));
    }

    /// A checkpoint of the state: the core, and the accounts and keys that
    /// changed since the last one taken (all of them when none was, or
    /// when changes are not tracked). What changes from here on goes into
    /// the next one; should this one not be stored, call
    /// [`Engine::checkpoint_lost`] so that the next is full.
    pub fn checkpoint(&mut self) -> Checkpoint {
        // Tracked, with a checkpoint taken before: what changed since; else
        // everything (every entry was seen at or after minute 0).
        let full = self.changes.as_deref().is_none_or(|c| c.since.is_none());
        let (dedup, chunks, dropped) = self.state.dedup.checkpoint(full);
        let st = &self.state;
        let core = serde_json::to_vec(&CoreRef {
            now_ms: st.now_ms,
            first_ms: st.first_ms,
            dedup,
            last_sweep: st.last_sweep,
            last_idle_sweep: st.last_idle_sweep,
        })
        .expect("engine state serializes");
        let c = self.changes.as_deref().filter(|c| c.since.is_some());
        let since = c.and_then(|c| c.since).unwrap_or(0);
        let swept: std::collections::HashSet<&str> = c
            .into_iter()
            .flat_map(|c| c.swept.iter().map(|id| &**id))
            .collect();
        let entry = |kind, id: &str, state: Vec<u8>| Entry {
            kind,
            id: id.into(),
            state,
        };
        let mut changed = Vec::new();
        for (id, u) in &st.users {
            if u.last_minute >= since || swept.contains(&**id) {
                changed.push(entry(EntryKind::User, id, to_json(u)));
            }
        }
        for (id, k) in &st.keys {
            if k.last_minute >= since {
                changed.push(entry(EntryKind::Key, id, to_json(k)));
            }
        }
        let mut forgotten = c.map_or_else(Vec::new, |c| {
            let users = c
                .forgotten_users
                .iter()
                .map(|id| (EntryKind::User, id.clone()));
            let keys = c
                .forgotten_keys
                .iter()
                .map(|id| (EntryKind::Key, id.clone()));
            users.chain(keys).collect()
        });
        changed.extend(chunks);
        forgotten.extend(dropped.into_iter().map(|id| (EntryKind::Dedup, id)));
        let mark = minute_of(st.now_ms);
        if let Some(c) = self.changes.as_deref_mut() {
            *c = Changes {
                since: Some(mark),
                ..Changes::default()
            };
        }
        Checkpoint {
            core,
            full,
            changed,
            forgotten,
            mark,
        }
    }

    /// The last checkpoint taken was not stored (or another writer's
    /// replaced it): the next one writes every account and key.
    pub fn checkpoint_lost(&mut self) {
        if let Some(c) = self.changes.as_deref_mut() {
            c.since = None;
        }
    }

    /// The learned state, for a checkpoint.
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// A user's learned state (its budget ledger, for example).
    pub fn user(&self, user_id: &str) -> Option<&UserState> {
        self.state.users.get(user_id).map(|u| &**u)
    }

    /// The run's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// How much state is held.
    pub fn tracked(&self) -> Tracked {
        let prompt_sightings = self
            .state
            .users
            .values()
            .filter_map(|u| u.prompts.as_ref())
            .map(|t| t.len())
            .sum();
        Tracked {
            users: self.state.users.len(),
            keys: self.state.keys.len(),
            prompt_sightings,
            dedup_entries: self.state.dedup.len(),
        }
    }

    /// What the second stage needs of the record just observed (counted:
    /// its `cost_micros` as [`Outcome::Counted`] said), at `seq` in its
    /// source: its usage as counted, its address, whether its account is
    /// young (first seen within `subjects.young_minutes`, once this engine
    /// has watched for `subjects.history_hours`) and whether it made its
    /// account a repeater of its prompt.
    pub fn projection(&self, ev: &Event<'_>, cost_micros: u64, seq: Seq) -> Projection {
        let sc = &self.r.cfg.subjects;
        let minute = minute_of(ev.ts_ms);
        let watched_min = minute.saturating_sub(minute_of(self.state.first_ms));
        let first_seen = self
            .state
            .users
            .get(&*ev.user_id)
            .map_or(0, |u| u.familiar.first_seen());
        let young = watched_min >= sc.history_hours * 60
            && first_seen != 0
            && minute.saturating_sub(first_seen) <= sc.young_minutes;
        let flags = if young { YOUNG } else { 0 } | if self.farming { FARMING } else { 0 };
        let (counts_request, counts_response) =
            (ev.phase.counts_request(), ev.phase.counts_response());
        Projection {
            ts_ms: ev.ts_ms,
            rid: combine(
                stable_hash(1, ev.request_id.as_bytes()),
                ev.phase as u64 + 1,
            ),
            seq,
            kinds: Kinds::default(),
            phase: ev.phase,
            status: ev.status.unwrap_or(0),
            prompt_tokens: if counts_request { ev.prompt_tokens } else { 0 }.min(u32::MAX as u64)
                as u32,
            completion_tokens: if counts_response {
                ev.completion_tokens
            } else {
                0
            }
            .min(u32::MAX as u64) as u32,
            cost_micros,
            ip: ev.ip,
            asn: ev.asn,
            flags,
            user: ev.user_id.as_ref().into(),
            key: ev.key_id.as_ref().into(),
            fingerprint: self
                .farming
                .then(|| ev.prompt_fingerprint.as_deref().map(Into::into))
                .flatten(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.r.cfg
    }

    fn tier_of(&mut self, ev: &Event<'_>) -> (usize, Option<u64>, Option<u64>) {
        if !self.r.overrides.is_empty() {
            if let Some(&o) = self.r.overrides.get(&*ev.user_id) {
                let t = o.tier.unwrap_or_else(|| self.tier_by_name(ev));
                return (t, o.daily_micros, o.monthly_micros);
            }
        }
        (self.tier_by_name(ev), None, None)
    }

    fn tier_by_name(&mut self, ev: &Event<'_>) -> usize {
        match ev.tier.as_deref() {
            None => self.r.default_tier,
            Some(name) => match self.r.tiers.iter().position(|t| t.name == name) {
                Some(i) => i,
                None => {
                    self.stats.unknown_tiers += 1;
                    self.r.default_tier
                }
            },
        }
    }

    /// Holds `ev`'s time to at most `event_time.max_ahead_secs` past
    /// `reference_ms` (a clock the record does not set: see
    /// [`crate::config::EventTimeConfig`]). A record past it is counted at
    /// the bound and flagged; so no record can move the partition's clock,
    /// or its account's budget period, further ahead than that. Call before
    /// [`Engine::observe`], with the same reference on every read of the
    /// record, so a re-read decides the same. Returns whether it clamped.
    pub fn bound_time(&mut self, ev: &mut Event<'_>, reference_ms: i64) -> bool {
        let bound = reference_ms.saturating_add(self.r.max_ahead_ms);
        if ev.ts_ms <= bound {
            return false;
        }
        ev.ts_ms = bound;
        ev.repaired |= crate::decode::TS_REPAIRED;
        self.stats.ahead += 1;
        true
    }

    /// Observes one event; alerts it raises are appended to `out`.
    pub fn observe(&mut self, ev: &Event<'_>, out: &mut Vec<Alert>) -> Outcome {
        self.stats.events += 1;
        self.farming = false;
        if self.state.first_ms == 0 {
            self.state.first_ms = ev.ts_ms;
        }
        if ev.ts_ms > self.state.now_ms {
            self.state.now_ms = ev.ts_ms;
        }
        let now = self.state.now_ms;
        let request = stable_hash(1, ev.request_id.as_bytes());
        let rec = combine(request, ev.phase as u64 + 1);
        if !self
            .state
            .dedup
            .first_sighting(rec, now, self.r.dedup_horizon_ms)
        {
            self.stats.duplicates += 1;
            return Outcome::Duplicate;
        }
        let t = Tick::at(ev.ts_ms);
        let now_min = if now == ev.ts_ms {
            t.minute
        } else {
            minute_of(now)
        };
        self.sweep(t, now, now_min);
        let before = out.len();
        let (tier_idx, daily_override, monthly_override) = self.tier_of(ev);

        let counts_request = ev.phase.counts_request();
        let counts_response = ev.phase.counts_response();
        let (cost_micros, tokens) = self.usage(ev, counts_request, counts_response);

        let tier = &self.r.tiers[tier_idx];
        let cfg = &self.r.cfg;

        let user = match self.state.users.get_mut(&*ev.user_id) {
            Some(u) => u,
            None => self
                .state
                .users
                .entry(ev.user_id.as_ref().into())
                .or_default(),
        };
        user.last_minute = now_min;
        let key = match self.state.keys.get_mut(&*ev.key_id) {
            Some(k) => k,
            None => self
                .state
                .keys
                .entry(ev.key_id.as_ref().into())
                .or_default(),
        };
        key.last_minute = now_min;
        // Whose doing it is: judged before this record teaches the account.
        let origin = Origin::of(ev.ip, ev.asn, ev.user_agent.as_deref());
        let ctx = user.familiar.judge(origin);
        if counts_request {
            // An attack does not become the account's usual context.
            let incident = cfg.context.hold_during_incidents
                && (user.rate.in_incident(t.minute)
                    || key.rate.in_incident(t.minute)
                    || user.tokens.in_incident(t.minute)
                    || user.pace.in_incident(t.minute));
            user.familiar.observe(
                t.minute,
                origin,
                cfg.context.familiar_after_minutes,
                incident,
            );
        }
        let fp_hash = ev
            .prompt_fingerprint
            .as_deref()
            .map(|fp| stable_hash(2, fp.as_bytes()));
        // Split logs: a request waits for its response, which says how it went.
        let answered = match ev.phase {
            Phase::Exchange => None,
            Phase::Response => Pending::close(&mut user.pending, request as u32),
            Phase::Request => {
                let big = user
                    .tokens
                    .judge_prompt(ev.prompt_tokens, ctx, &tier.tokens);
                let waiting = Waiting {
                    request: request as u32,
                    start: t.secs,
                    fingerprint: fp_hash.unwrap_or(0),
                    prompt: ev.prompt_tokens.min(u32::MAX as u64) as u32,
                    big,
                };
                Pending::open(&mut user.pending, waiting);
                None
            }
        };
        let daily_micros = daily_override.unwrap_or(tier.daily_micros);
        // From a stranger's network and client, a pace that would empty the
        // budget in twice the runaway window is already a runaway.
        let pace_minutes = match ctx {
            Context::Novel { .. } => 2.0 * cfg.runaway_spend.pace_minutes,
            _ => cfg.runaway_spend.pace_minutes,
        };
        let pace = PaceParams {
            pace_micros: daily_micros as f64 / pace_minutes,
            prior: RatePrior {
                rate: daily_micros as f64 / 480.0,
                minutes: 10.0,
            },
            decay: self.r.pace_decay,
            burst_factor: cfg.runaway_spend.burst_factor,
            cooldown_minutes: cfg.runaway_spend.cooldown_minutes,
            sustain_minutes: cfg.runaway_spend.sustain_minutes,
        };

        let rec = Record {
            ev,
            t,
            ctx,
            tier,
            cfg,
            counts_request,
            counts_response,
            tokens,
            daily_micros,
        };
        if counts_request && cfg.request_spike.enabled {
            request_spike(&rec, &pace, user, key, &mut self.quantiles, out);
        }
        if counts_request && cfg.leaked_key.enabled {
            leaked_key(&rec, &self.r.leak, key, out);
        }
        if cfg.token_spike.enabled && (tokens > 0 || ev.phase != Phase::Exchange) {
            token_spike(&rec, answered, user, out);
        }
        if cost_micros > 0 || tokens > 0 {
            let limits = BudgetLimits {
                daily_micros,
                monthly_micros: monthly_override.or(tier.monthly_micros),
                tokens_per_day: tier.limits.tokens_per_day,
                percents: &self.r.percents,
            };
            let starts = self.periods.starts(ev.ts_ms);
            if budget(
                &rec,
                cost_micros,
                starts,
                &limits,
                self.r.utc_offset_min,
                user,
                out,
            ) == Posted::Late
            {
                self.stats.late += 1;
            }
            // A refused request's recorded cost is spent (the budget counts
            // it), but refusals are a retry storm or the gateway already
            // limiting the account, not a drain being served.
            if cost_micros > 0 && cfg.runaway_spend.enabled && !ev.refused() {
                runaway_spend(&rec, cost_micros, &limits, &pace, user, out);
            }
        }
        self.farming = repeated_prompt(
            &rec,
            answered,
            fp_hash,
            user,
            &mut self.findings,
            &self.r,
            out,
        );

        for a in &mut out[before..] {
            *self.stats.alerts.entry(a.kind).or_default() += 1;
            if a.user_id == *ev.user_id {
                a.tier = Some(self.r.tiers[tier_idx].name.clone());
            }
        }
        Outcome::Counted { cost_micros }
    }

    /// Every `SWEEP_EVERY_MINUTES` of engine time, prompt sightings out of
    /// their windows go; idle users and keys every eighth of their lifetime.
    fn sweep(&mut self, t: Tick, now: i64, now_min: u32) {
        if now_min >= self.state.last_sweep + SWEEP_EVERY_MINUTES {
            self.state.last_sweep = now_min;
            self.expire_prompts(t.secs.max((now / 1000) as u32));
            // Idle users and keys live for days: an eighth of their lifetime is precise enough.
            if now_min
                >= self.state.last_idle_sweep + (self.r.idle_ttl_min / 8).max(SWEEP_EVERY_MINUTES)
            {
                self.expire();
            }
        }
    }

    /// What a record counts: its cost (the record's own, else its usage
    /// priced when it carries the answer) in micro-dollars, and its tokens
    /// (a request's prompt, a response's completion, an exchange's both).
    fn usage(&mut self, ev: &Event<'_>, counts_request: bool, counts_response: bool) -> (u64, u64) {
        let cost_micros = match (ev.cost_usd, counts_response) {
            (Some(usd), _) => micros(usd),
            (None, false) => 0,
            (None, true) => {
                let (c, priced) = self.prices.cost_micros(
                    ev.model.as_deref(),
                    ev.prompt_tokens,
                    ev.completion_tokens,
                );
                if !priced && (ev.prompt_tokens > 0 || ev.completion_tokens > 0) {
                    self.note_unpriced(ev.model.as_deref());
                }
                c
            }
        };
        let tokens = if counts_request { ev.prompt_tokens } else { 0 }
            + if counts_response {
                ev.completion_tokens
            } else {
                0
            };
        (cost_micros, tokens)
    }

    fn note_unpriced(&mut self, model: Option<&str>) {
        self.stats.unpriced += 1;
        let name = model.unwrap_or("(no model)");
        if let Some(n) = self.stats.unpriced_models.get_mut(name) {
            *n += 1;
        } else if self.stats.unpriced_models.len() < MAX_UNPRICED_NAMES {
            self.stats.unpriced_models.insert(name.to_string(), 1);
        } else {
            *self
                .stats
                .unpriced_models
                .entry("(other)".to_string())
                .or_default() += 1;
        }
    }

    /// Forgets idle users and keys and prompt sightings that left their
    /// window, as of the engine's clock. `observe` calls it every few minutes
    /// of event time; a caller may call it when time passes without events.
    pub fn expire(&mut self) {
        let now_min = minute_of(self.state.now_ms);
        self.state.last_sweep = now_min;
        self.state.last_idle_sweep = now_min;
        let cutoff = now_min.saturating_sub(self.r.idle_ttl_min);
        let (month_start, _) = PeriodKind::Month.bounds(self.state.now_ms, self.r.utc_offset_min);
        let keep_months = self.r.tiers.iter().any(|t| t.monthly_micros.is_some())
            || self
                .r
                .overrides
                .values()
                .any(|o| o.monthly_micros.is_some());
        let mut changes = self.changes.as_deref_mut();
        self.state.users.retain(|id, u| {
            let keep =
                u.last_minute >= cutoff || (keep_months && u.ledger.month_spend(month_start) > 0);
            if let (false, Some(c)) = (keep, changes.as_deref_mut()) {
                c.forgotten_users.push(id.clone());
            }
            keep
        });
        self.state.keys.retain(|id, k| {
            let keep = k.last_minute >= cutoff;
            if let (false, Some(c)) = (keep, changes.as_deref_mut()) {
                c.forgotten_keys.push(id.clone());
            }
            keep
        });
        self.expire_prompts((self.state.now_ms.max(0) / 1000) as u32);
    }

    /// Forgets prompt sightings that left their window.
    fn expire_prompts(&mut self, now_s: u32) {
        let p = &self.r.prompts;
        let mut changes = self.changes.as_deref_mut();
        for (id, u) in self.state.users.iter_mut() {
            if u.prompts.is_some() {
                PromptTracker::expire_user(&mut u.prompts, now_s, p);
                // An account seen since the last checkpoint is written anyway.
                if let Some(c) = changes.as_deref_mut() {
                    if c.since.is_some_and(|since| u.last_minute < since) {
                        c.swept.push(id.clone());
                    }
                }
            }
        }
    }
}

/// One record as every detector sees it: what it counts, and whose doing
/// it looks like (judged before this record teaches the account).
#[derive(Clone, Copy)]
struct Record<'a, 'e> {
    ev: &'a Event<'e>,
    t: Tick,
    ctx: Context,
    tier: &'a Tier,
    cfg: &'a EngineConfig,
    counts_request: bool,
    counts_response: bool,
    tokens: u64,
    daily_micros: u64,
}

/// Request floods, by key and by account, against their learned rates.
fn request_spike(
    rec: &Record<'_, '_>,
    pace: &PaceParams,
    user: &mut UserState,
    key: &mut KeyState,
    quantiles: &mut QuantileCache,
    out: &mut Vec<Alert>,
) {
    let Record {
        ev,
        t,
        ctx,
        tier,
        cfg,
        daily_micros,
        ..
    } = *rec;
    // Key first: a key's spike names the key and throttles it.
    let key_spike = key.rate.on_request(t, &tier.rate, quantiles);
    let user_spike = user.rate.on_request(t, &tier.rate, quantiles);
    let spike = key_spike
        .map(|sp| (sp, true))
        .or(user_spike.map(|sp| (sp, false)));
    if let Some((sp, on_key)) = spike {
        // Budget at risk: the last minutes' spend keeps a pace that
        // would use a whole day's budget within the runaway window.
        let at_risk = || {
            user.pace.sustained_micros(t, pace) * cfg.runaway_spend.pace_minutes
                >= daily_micros as f64
        };
        let (severity, action) = match (ctx, on_key) {
            (Context::Novel { .. }, true) => (Severity::Critical, Action::Throttle),
            (Context::Novel { .. }, false) => (Severity::Warning, Action::Notify),
            (Context::Familiar | Context::Changed, _) if at_risk() => {
                (Severity::Warning, Action::Notify)
            }
            _ => (Severity::Info, Action::Notify),
        };
        let state = if on_key {
            &mut key.rate
        } else {
            &mut user.rate
        };
        if let Some(raise) = state.escalates(t.minute, level(severity), &tier.rate) {
            out.push(request_spike_alert(
                ev,
                sp,
                on_key,
                (severity, action),
                ctx,
                raise,
            ));
        }
    }
}

/// One key used from many networks at once.
fn leaked_key(rec: &Record<'_, '_>, leak: &LeakParams, key: &mut KeyState, out: &mut Vec<Alert>) {
    let Record { ev, t, .. } = *rec;
    if let Some(ip) = ev.ip {
        if let Some(l) = key.leak.on_address(t.minute, ip, ev.asn, leak) {
            out.push(leaked_key_alert(ev, ip, &l, leak.window_minutes));
        }
    }
}

/// Token exhaustion, capped-share jumps and token bursts.
fn token_spike(
    rec: &Record<'_, '_>,
    answered: Option<Waiting>,
    user: &mut UserState,
    out: &mut Vec<Alert>,
) {
    let Record {
        ev,
        t,
        ctx,
        tier,
        cfg,
        counts_response,
        tokens,
        ..
    } = *rec;
    let p = &tier.tokens;
    let in_flight = match ev.phase {
        Phase::Request => user.tokens.in_flight(t, &user.pending, ev.prompt_tokens, p),
        _ => None,
    };
    let big_request = match ev.phase {
        Phase::Request => Some(false),
        _ => answered.map(|w| w.big),
    };
    let prompt = match (ev.phase, answered) {
        (Phase::Response, Some(w)) => Some(w.prompt as u64),
        (Phase::Response, None) => (ev.prompt_tokens > 0).then_some(ev.prompt_tokens),
        _ => Some(ev.prompt_tokens),
    };
    let completion = counts_response.then_some(ev.completion_tokens);
    let spike = match tokens {
        0 => None,
        _ => user.tokens.on_tokens(
            t,
            tokens,
            prompt,
            completion,
            big_request,
            &user.pending,
            ctx,
            p,
        ),
    };
    let cause = match (in_flight, spike) {
        (Some(a), Some(b)) if b.strength() > a.strength() => Some(b),
        (a, b) => a.or(b),
    };
    if let Some(cause) = cause {
        let (severity, action) = match (cause, ctx) {
            (TokenCause::Exhaustion { .. }, _) | (_, Context::Novel { .. }) => {
                (Severity::Critical, Action::Throttle)
            }
            _ => (Severity::Info, Action::Notify),
        };
        if let Some(raise) = user.tokens.escalates(t, level(severity), p) {
            out.push(token_spike_alert(
                ev,
                cause,
                (severity, action),
                ctx,
                raise,
                tier,
                cfg,
            ));
        }
    }
}

/// Posts the record's spend and tokens to the account's ledger: budget
/// alerts at each configured percent and the token quota, once each.
fn budget(
    rec: &Record<'_, '_>,
    cost_micros: u64,
    starts: (i64, i64),
    limits: &BudgetLimits<'_>,
    utc_offset_min: i32,
    user: &mut UserState,
    out: &mut Vec<Alert>,
) -> Posted {
    let Record {
        ev, tier, tokens, ..
    } = *rec;
    let tier_name = tier.name.as_str();
    user.ledger
        .post(starts, cost_micros, tokens, limits, &mut |e| {
            out.push(match e {
                BudgetEvent::Spend(c) => budget_alert(ev, c, utc_offset_min),
                BudgetEvent::Tokens(q) => quota_alert(ev, q, tier_name, utc_offset_min),
            })
        })
}

/// Spend at a pace that empties the daily budget within the runaway window.
fn runaway_spend(
    rec: &Record<'_, '_>,
    cost_micros: u64,
    limits: &BudgetLimits<'_>,
    pace: &PaceParams,
    user: &mut UserState,
    out: &mut Vec<Alert>,
) {
    let Record { ev, t, ctx, .. } = *rec;
    if let Some(r) = user.pace.on_spend(t, cost_micros, pace) {
        let (severity, action) = match (ctx, r.sustained) {
            (Context::Novel { .. }, _) => (Severity::Critical, Action::Throttle),
            (_, true) => (Severity::Warning, Action::Notify),
            (_, false) => (Severity::Info, Action::Notify),
        };
        if let Some(raise) = user.pace.escalates(t.minute, level(severity), pace) {
            let left = limits
                .daily_micros
                .saturating_sub(user.ledger.day[0].micros);
            out.push(runaway_alert(
                ev,
                &r,
                (severity, action),
                ctx,
                raise,
                left,
                limits.daily_micros,
            ));
        }
    }
}

/// The same prompt again and again from one account. Returns whether the
/// record made its account a repeater of its prompt (a farming sighting,
/// for the second stage).
fn repeated_prompt(
    rec: &Record<'_, '_>,
    answered: Option<Waiting>,
    fp_hash: Option<u64>,
    user: &mut UserState,
    findings: &mut Vec<PromptFinding>,
    r: &Resolved,
    out: &mut Vec<Alert>,
) -> bool {
    let Record {
        ev,
        t,
        cfg,
        counts_request,
        ..
    } = *rec;
    // A refused request (its retry is the same prompt again) and a probe
    // (a health check answered in a token or two, an embedding) are
    // not prompts being farmed.
    // (A record with no usage at all says nothing about its answer.)
    let no_usage = ev.prompt_tokens == 0 && ev.completion_tokens == 0;
    let harvested = ev.phase == Phase::Request
        || (!ev.refused()
            && (no_usage || ev.completion_tokens > cfg.repeated_prompt.probe_max_tokens));
    if cfg.repeated_prompt.enabled && !harvested {
        // A split log's response: take back its request's sighting.
        if let Some(w) = answered.filter(|w| w.fingerprint != 0) {
            PromptTracker::unsight(&mut user.prompts, w.fingerprint);
        }
    }
    if counts_request && cfg.repeated_prompt.enabled && harvested {
        if let (Some(fp), Some(fh)) = (ev.prompt_fingerprint.as_deref(), fp_hash) {
            let now_s = t.secs;
            findings.clear();
            // Early warnings: at any pace for an account known to rarely
            // repeat itself (it pages when steady), at a steady pace for
            // one not known yet or that sometimes does (for the record),
            // none for one that often does.
            let share = user.repeats.mean(r.repeat_prior);
            let max_share = cfg.repeated_prompt.early_max_repeat_share;
            let rare = share < max_share && user.repeats.trials >= 100.0;
            let early = if rare {
                Early::Any
            } else if share < 10.0 * max_share {
                Early::Steady
            } else {
                Early::Off
            };
            let seen =
                PromptTracker::sight(&mut user.prompts, fh, now_s, early, &r.prompts, findings);
            user.repeats.observe(seen > 1, r.repeat_decay);
            for f in findings.iter() {
                out.push(prompt_alert(ev, fp, *f, r, now_s, rare));
            }
            return seen == 2;
        }
    }
    false
}

/// The fields every alert shares, from the record that made it true.
fn alert(kind: AlertKind, id: String, ev: &Event<'_>, with_key: bool) -> Alert {
    Alert {
        id,
        kind,
        severity: Severity::Warning,
        action: Action::Notify,
        user_id: ev.user_id.to_string(),
        key_id: with_key.then(|| ev.key_id.to_string()),
        ip: None,
        ts: ev.ts_ms,
        observed: None,
        baseline: None,
        threshold: None,
        budget: None,
        expires_at: None,
        tier: None,
        reason: String::new(),
    }
}

/// A severity as an escalation level.
fn level(s: Severity) -> u8 {
    match s {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

/// The window part of an alert id: the minute, and for an escalation
/// within an open incident its severity too (an escalation in the minute
/// of the first alert is still a different alert).
fn window_of(minute: u32, raise: Raise, severity: Severity) -> String {
    match raise {
        Raise::New => format!("m{minute}"),
        Raise::Higher => format!("m{minute}:{}", severity.as_str()),
    }
}

/// A leaked key: used from `l.ips` addresses within the window.
fn leaked_key_alert(ev: &Event<'_>, ip: std::net::IpAddr, l: &Leak, window_minutes: u32) -> Alert {
    let id = Alert::make_id(
        AlertKind::LeakedKey,
        &format!("key:{}", ev.key_id),
        &format!("m{}", l.since),
    );
    Alert {
        severity: Severity::Critical,
        action: Action::Block,
        ip: Some(ip.to_string()),
        observed: Some(l.ips as f64),
        baseline: Some((l.baseline * 10.0).round() / 10.0),
        threshold: Some(l.threshold),
        reason: format!(
            "Key {} of {} was used from {} addresses in {} networks within {} minutes (usually {:.0}); it has probably leaked, so keywatch asks gateways to block it.",
            ev.key_id,
            ev.user_id,
            l.ips,
            l.networks,
            window_minutes,
            l.baseline.max(1.0)
        ),
        ..alert(AlertKind::LeakedKey, id, ev, true)
    }
}

/// Runaway spend: `left_micros` of a `daily_micros` budget left at the
/// pace the finding measured.
fn runaway_alert(
    ev: &Event<'_>,
    r: &Runaway,
    (severity, action): (Severity, Action),
    ctx: Context,
    raise: Raise,
    left_micros: u64,
    daily_micros: u64,
) -> Alert {
    let left = left_micros as f64;
    let minutes_left = (left / r.observed_micros.max(1.0)).ceil();
    let id = Alert::make_id(
        AlertKind::RunawaySpend,
        &format!("user:{}", ev.user_id),
        &window_of(r.onset_minute, raise, severity),
    );
    let doing = match action {
        Action::Notify => "no action was taken".to_string(),
        _ => format!("keywatch asks gateways to throttle key {}", ev.key_id),
    };
    Alert {
        severity,
        action,
        observed: Some((r.observed_micros / 1e4).round() / 100.0),
        baseline: Some((r.baseline_micros / 1e4).round() / 100.0),
        threshold: Some((r.threshold_micros / 1e4).round() / 100.0),
        reason: format!(
            "{} spent ${:.2} in the last minute{} (usually ${:.2} per active minute); at that pace the ${:.2} left of its ${:.2} daily budget lasts {} minutes, so {doing}.",
            ev.user_id,
            r.observed_micros / 1e6,
            ctx.describe(),
            r.baseline_micros / 1e6,
            left / 1e6,
            daily_micros as f64 / 1e6,
            minutes_left,
        ),
        ..alert(AlertKind::RunawaySpend, id, ev, true)
    }
}

fn request_spike_alert(
    ev: &Event<'_>,
    sp: Spike,
    on_key: bool,
    (severity, action): (Severity, Action),
    ctx: Context,
    raise: Raise,
) -> Alert {
    let subject = if on_key {
        format!("key:{}", ev.key_id)
    } else {
        format!("user:{}", ev.user_id)
    };
    let id = Alert::make_id(
        AlertKind::RequestSpike,
        &subject,
        &window_of(sp.onset_minute, raise, severity),
    );
    let baseline = (sp.baseline * 10.0).round() / 10.0;
    let who = if on_key {
        format!("Key {} of {}", ev.key_id, ev.user_id)
    } else {
        ev.user_id.to_string()
    };
    let what = match (action, on_key, ctx) {
        (Action::Throttle, _, _) => "keywatch asks gateways to throttle the key",
        (_, _, Context::Familiar | Context::Changed) if severity == Severity::Warning => {
            "at that pace its daily budget runs out before the day ends; no action was taken"
        }
        (_, _, Context::Familiar | Context::Changed) => {
            "likely a batch job of its own; no action was taken"
        }
        (_, false, _) => "no single key stands out; no action was taken",
        _ => "no action was taken",
    };
    Alert {
        severity,
        action,
        observed: Some(sp.observed),
        baseline: Some(baseline),
        threshold: Some(sp.threshold),
        reason: format!(
            "{who} made {} requests in the last minute{}, {} its usual {:.1} per active minute; {what}.",
            thousands(sp.observed),
            ctx.describe(),
            ratio(sp.observed, sp.baseline),
            baseline
        ),
        ..alert(AlertKind::RequestSpike, id, ev, on_key)
    }
}

fn token_spike_alert(
    ev: &Event<'_>,
    cause: TokenCause,
    (severity, action): (Severity, Action),
    ctx: Context,
    raise: Raise,
    tier: &Tier,
    cfg: &EngineConfig,
) -> Alert {
    let id = Alert::make_id(
        AlertKind::TokenSpike,
        &format!("user:{}", ev.user_id),
        &window_of(minute_of(ev.ts_ms), raise, severity),
    );
    let doing = match action {
        Action::Notify => "no action was taken".to_string(),
        _ => format!("keywatch asks gateways to throttle key {}", ev.key_id),
    };
    let window = cfg.token_spike.window_minutes;
    let (observed, baseline, threshold, reason) = match cause {
        TokenCause::Exhaustion {
            count,
            prompt,
            prompt_baseline,
        } => (
            count as f64,
            prompt_baseline,
            cfg.token_spike.exhaustion_count as f64,
            format!(
                "{} sent {} prompts far above its usual size (the latest {} tokens; usually ~{}) whose answers ran to the {} tier's {}-token cap (or are still generating) within {} minutes{}: likely token-exhaustion prompts, so {doing}.",
                ev.user_id,
                count,
                thousands(prompt as f64),
                thousands(prompt_baseline),
                tier.name,
                thousands(tier.limits.max_output_tokens as f64),
                window,
                ctx.describe()
            ),
        ),
        TokenCause::CappedShare {
            hits,
            answers,
            learned,
            p_value,
            ..
        } => (
            hits as f64,
            (learned * answers as f64 * 10.0).round() / 10.0,
            cfg.token_spike.cap_share_min_hits as f64,
            format!(
                "{} got {} of its last {} answers cut at the {} tier's {}-token cap within {} minutes{}, against a learned {:.1}% of answers (p = {:.0e}); {doing}.",
                ev.user_id,
                hits,
                answers,
                tier.name,
                thousands(tier.limits.max_output_tokens as f64),
                window,
                ctx.describe(),
                learned * 100.0,
                p_value
            ),
        ),
        TokenCause::Burst {
            observed,
            baseline,
            threshold,
        } => (
            observed,
            baseline,
            threshold,
            format!(
                "{} used {} tokens in the last minute{}, {} its usual {} per active minute; {doing}.",
                ev.user_id,
                thousands(observed),
                ctx.describe(),
                ratio(observed, baseline),
                thousands(baseline)
            ),
        ),
    };
    Alert {
        severity,
        action,
        observed: Some(observed),
        baseline: Some(baseline),
        threshold: Some(threshold),
        reason,
        ..alert(AlertKind::TokenSpike, id, ev, true)
    }
}

fn budget_alert(ev: &Event<'_>, c: Crossing, utc_offset_min: i32) -> Alert {
    let id = Alert::make_id(
        AlertKind::BudgetThreshold,
        &format!("user:{}", ev.user_id),
        &format!("{}:{}:{}", c.period.as_str(), c.period_start, c.percent),
    );
    let blocking = c.percent >= 100;
    let (severity, action) = match c.percent {
        p if p >= 100 => (Severity::Critical, Action::Block),
        p if p >= 80 => (Severity::Warning, Action::Notify),
        _ => (Severity::Info, Action::Notify),
    };
    let period_word = match c.period {
        PeriodKind::Day => "daily",
        PeriodKind::Month => "monthly",
    };
    let tail = if blocking {
        " keywatch asks gateways to block its keys until the period ends."
    } else {
        ""
    };
    Alert {
        severity,
        action,
        observed: Some(round_usd(c.spent_micros)),
        threshold: Some(round_usd(percent_bar(c.limit_micros, c.percent))),
        budget: Some(BudgetInfo {
            period: c.period,
            period_start: c.period_start,
            limit_usd: round_usd(c.limit_micros),
            spent_usd: round_usd(c.spent_micros),
            percent: c.percent,
        }),
        expires_at: blocking.then(|| c.period.bounds(c.period_start, utc_offset_min).1),
        tier: None,
        reason: format!(
            "{} has spent ${:.2} of its ${:.2} {period_word} budget ({}%).{tail}",
            ev.user_id,
            c.spent_micros as f64 / 1e6,
            c.limit_micros as f64 / 1e6,
            c.percent
        ),
        ..alert(AlertKind::BudgetThreshold, id, ev, false)
    }
}

fn quota_alert(ev: &Event<'_>, q: TokenQuotaCrossing, tier: &str, utc_offset_min: i32) -> Alert {
    let id = Alert::make_id(
        AlertKind::TokenQuota,
        &format!("user:{}", ev.user_id),
        &format!("day:{}", q.period_start),
    );
    Alert {
        severity: Severity::Warning,
        action: Action::Throttle,
        observed: Some(q.tokens as f64),
        threshold: Some(q.limit as f64),
        expires_at: Some(PeriodKind::Day.bounds(q.period_start, utc_offset_min).1),
        tier: None,
        reason: format!(
            "{} has used {} tokens today, over the {} tier's {} a day; keywatch asks gateways to throttle it until the day ends.",
            ev.user_id,
            thousands(q.tokens as f64),
            tier,
            thousands(q.limit as f64)
        ),
        ..alert(AlertKind::TokenQuota, id, ev, false)
    }
}

/// A prompt finding's alert; `rare` says the user is known to rarely repeat
/// a prompt (an early warning from it, at a script's pace, pages).
fn prompt_alert(
    ev: &Event<'_>,
    fp: &str,
    f: PromptFinding,
    r: &Resolved,
    now_s: u32,
    rare: bool,
) -> Alert {
    let window = r.cfg.repeated_prompt.window_minutes;
    match f {
        PromptFinding::Repeated { count } => {
            let id = Alert::make_id(
                AlertKind::RepeatedPrompt,
                &format!("user:{}|fp:{fp}", ev.user_id),
                &format!("s{now_s}"),
            );
            let doing = match r.repeat_action {
                Action::Block => format!("keywatch asks gateways to block key {}", ev.key_id),
                Action::Throttle => format!("keywatch asks gateways to throttle key {}", ev.key_id),
                Action::Notify => "no action was taken".to_string(),
            };
            Alert {
                severity: Severity::Warning,
                action: r.repeat_action,
                observed: Some(count as f64),
                threshold: Some(r.prompts.max_repeats as f64),
                reason: format!(
                    "{} sent the same prompt (fingerprint {}) {} times within {} minutes, more than the {} allowed; {doing}.",
                    ev.user_id,
                    short_fp(fp),
                    count,
                    window,
                    r.prompts.max_repeats
                ),
                ..alert(AlertKind::RepeatedPrompt, id, ev, true)
            }
        }
        PromptFinding::Early {
            count,
            span_secs,
            steady,
        } => {
            let id = Alert::make_id(
                AlertKind::RepeatedPrompt,
                &format!("user:{}|fp:{fp}", ev.user_id),
                &format!("early{count}:s{now_s}"),
            );
            let (severity, how) = match (rare, steady) {
                (true, true) if count > r.prompts.early_count => (
                    Severity::Warning,
                    "at a script's steady pace, from an account that rarely repeats a prompt",
                ),
                (true, _) => (
                    Severity::Info,
                    "from an account that rarely repeats a prompt",
                ),
                (false, _) => (Severity::Info, "at a steady pace"),
            };
            Alert {
                severity,
                action: Action::Notify,
                observed: Some(count as f64),
                threshold: Some(r.prompts.early_count as f64),
                reason: format!(
                    "{} sent the same prompt (fingerprint {}) {} times over the last {} minutes, {how}; more than {} within {} minutes is a {}, no action was taken yet.",
                    ev.user_id,
                    short_fp(fp),
                    count,
                    span_secs.div_ceil(60),
                    r.prompts.max_repeats,
                    window,
                    r.repeat_action.as_str()
                ),
                ..alert(AlertKind::RepeatedPrompt, id, ev, true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{parse_rfc3339, HOUR_MS};
    use std::borrow::Cow;

    fn t0() -> i64 {
        parse_rfc3339("2026-11-23T08:00:00Z").unwrap()
    }

    /// An owned record, so tests can build streams.
    #[derive(Clone)]
    struct Rec {
        ts: i64,
        id: String,
        user: String,
        key: String,
        phase: Phase,
        cost: Option<f64>,
        model: Option<&'static str>,
        pt: u64,
        ct: u64,
        fp: Option<String>,
        ip: Option<&'static str>,
        status: Option<u16>,
    }

    impl Rec {
        fn new(ts: i64, id: impl Into<String>, user: &str) -> Rec {
            Rec {
                ts,
                id: id.into(),
                user: user.into(),
                key: format!("key_{user}"),
                phase: Phase::Exchange,
                cost: None,
                model: Some("gpt-4o-mini"),
                pt: 100,
                ct: 50,
                fp: None,
                ip: None,
                status: None,
            }
        }

        fn event(&self) -> Event<'_> {
            let mut e = Event::new(self.ts, &self.id, &self.user, &self.key);
            e.phase = self.phase;
            e.cost_usd = self.cost;
            e.model = self.model.map(Cow::Borrowed);
            e.prompt_tokens = self.pt;
            e.completion_tokens = self.ct;
            e.prompt_fingerprint = self.fp.as_deref().map(Cow::Borrowed);
            e.ip = self.ip.map(|s| s.parse().unwrap());
            e.status = self.status;
            e
        }
    }

    fn run(engine: &mut Engine, recs: &[Rec]) -> Vec<Alert> {
        let mut out = vec![];
        for r in recs {
            engine.observe(&r.event(), &mut out);
        }
        out
    }

    #[test]
    fn budget_alerts_fire_once_each_on_the_crossing_record() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        // Free tier: $1/day. 40 records of $0.03 = $1.20.
        let recs: Vec<Rec> = (0..40)
            .map(|i| Rec {
                cost: Some(0.03),
                ..Rec::new(t0() + i * 600_000, format!("r{i}"), "acct_1")
            })
            .collect();
        let alerts: Vec<Alert> = run(&mut e, &recs)
            .into_iter()
            .filter(|a| a.kind == AlertKind::BudgetThreshold)
            .collect();
        let got: Vec<(u8, &str)> = alerts
            .iter()
            .map(|a| (a.budget.as_ref().unwrap().percent, a.id.as_str()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        // $0.03 × 17 = $0.51 crosses 50% (record 16), × 27 = $0.81 crosses 80% (record 26), × 34 = $1.02 crosses 100% (record 33).
        for (a, (pct, idx)) in alerts.iter().zip([(50, 16), (80, 26), (100, 33)]) {
            let b = a.budget.as_ref().unwrap();
            assert_eq!(b.percent, pct);
            assert_eq!(a.ts, recs[idx].ts, "{pct}% fired by record {idx}");
            assert_eq!(b.limit_usd, 1.0);
        }
        let block = &alerts[2];
        assert_eq!(
            (block.action, block.severity),
            (Action::Block, Severity::Critical)
        );
        assert_eq!(
            block.expires_at,
            Some(parse_rfc3339("2026-11-24T00:00:00Z").unwrap())
        );
        assert_eq!(block.reason, "acct_1 has spent $1.02 of its $1.00 daily budget (100%). keywatch asks gateways to block its keys until the period ends.");
    }

    /// Found on gateway-model tuning seed 12: a free account's retry storm
    /// (its requests refused with 429 and 5xx for minutes, each retry
    /// logged with the prompt's cost) read as a sustained runaway. The
    /// budget counts what the gateway charged; the pace is of spend
    /// served.
    #[test]
    fn a_retry_storm_is_charged_to_the_budget_but_is_no_runaway() {
        let storm = |status: u16| {
            let mut e = Engine::new(&EngineConfig::default()).unwrap();
            // An hour of one $0.002 request every 5 minutes, then 10
            // minutes of a $0.01 record every 10 s: $0.60, a pace that
            // would use the $1 day in 17 minutes.
            let mut recs: Vec<Rec> = (0..12)
                .map(|i| Rec {
                    cost: Some(0.002),
                    ..Rec::new(t0() + i * 300_000, format!("r{i}"), "acct_1")
                })
                .collect();
            recs.extend((0..60).map(|i| Rec {
                cost: Some(0.01),
                status: Some(status),
                ct: 0,
                ..Rec::new(t0() + HOUR_MS + i * 10_000, format!("s{i}"), "acct_1")
            }));
            let alerts = run(&mut e, &recs);
            let kinds = |k: AlertKind| alerts.iter().filter(|a| a.kind == k).count();
            (
                kinds(AlertKind::RunawaySpend),
                kinds(AlertKind::BudgetThreshold),
            )
        };
        assert_eq!(storm(502), (0, 1), "refused: charged (50%), no runaway");
        let (runaways, budget) = storm(200);
        assert!(runaways > 0, "the same spend served is a runaway");
        assert_eq!(budget, 1);
    }

    #[test]
    fn duplicates_change_nothing() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        let r = Rec {
            cost: Some(0.6),
            ..Rec::new(t0(), "r1", "acct_1")
        };
        let mut out = vec![];
        let budget = |out: &Vec<Alert>| {
            out.iter()
                .filter(|a| a.kind == AlertKind::BudgetThreshold)
                .count()
        };
        assert_eq!(
            e.observe(&r.event(), &mut out),
            Outcome::Counted {
                cost_micros: 600_000
            }
        );
        assert_eq!(budget(&out), 1, "50% of $1");
        let before = out.len();
        assert_eq!(e.observe(&r.event(), &mut out), Outcome::Duplicate);
        assert_eq!(
            out.len(),
            before,
            "a duplicate changes nothing (and must not reach 100%)"
        );
        // The same request_id in the other phase is a different record.
        let resp = Rec {
            phase: Phase::Response,
            ..r.clone()
        };
        assert!(matches!(
            e.observe(&resp.event(), &mut out),
            Outcome::Counted { .. }
        ));
        assert_eq!(e.stats().duplicates, 1);
    }

    #[test]
    fn split_phases_count_each_thing_once() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        let user = "acct_split";
        let mut recs = vec![];
        for i in 0..10 {
            let ts = t0() + i * 1000;
            recs.push(Rec {
                phase: Phase::Request,
                pt: 1000,
                ct: 0,
                model: Some("gpt-4o"),
                ..Rec::new(ts, format!("r{i}"), user)
            });
            recs.push(Rec {
                phase: Phase::Response,
                pt: 1000,
                ct: 500,
                model: Some("gpt-4o"),
                ..Rec::new(ts + 500, format!("r{i}"), user)
            });
        }
        run(&mut e, &recs);
        let u = &e.state().users[user];
        // Input tokens counted on the request, output on the response.
        assert_eq!(u.ledger.day[0].tokens, 10 * 1500);
        // Cost priced on the response: 1000 × 2.5 + 500 × 10 = 7500 micro-dollars each.
        assert_eq!(u.ledger.day[0].micros, 10 * 7500);
    }

    #[test]
    fn unknown_models_are_flagged_not_silently_free() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        run(
            &mut e,
            &[
                Rec {
                    model: Some("my-finetune"),
                    ..Rec::new(t0(), "r1", "u")
                },
                Rec {
                    model: None,
                    ..Rec::new(t0(), "r2", "u")
                },
            ],
        );
        assert_eq!(e.stats().unpriced, 2);
        assert_eq!(e.stats().unpriced_models.get("my-finetune"), Some(&1));
        assert_eq!(e.stats().unpriced_models.get("(no model)"), Some(&1));
    }

    /// A stream with every detector firing: a flood, repeats, a leak, a budget drain.
    fn eventful_stream() -> Vec<Rec> {
        let mut recs = vec![];
        let mut n = 0;
        let mut id = || {
            n += 1;
            format!("r{n}")
        };
        for m in 0..180 {
            for u in 0..5 {
                let user = format!("acct_{u}");
                recs.push(Rec {
                    fp: Some(format!("fp{m}{u}")),
                    ip: Some("203.0.113.7"),
                    pt: 20,
                    ct: 10,
                    ..Rec::new(t0() + m * 60_000 + u * 1000, id(), &user)
                });
            }
        }
        let at = t0() + 3 * HOUR_MS;
        for i in 0..300 {
            recs.push(Rec {
                ip: Some("203.0.113.7"),
                ..Rec::new(at + i * 200, id(), "acct_0")
            });
        }
        for i in 0..8 {
            recs.push(Rec {
                fp: Some("same".into()),
                ..Rec::new(at + i * 60_000, id(), "acct_1")
            });
        }
        let ips = [
            "198.51.100.1",
            "192.0.2.1",
            "100.64.0.1",
            "100.65.0.1",
            "100.66.0.1",
            "100.67.0.1",
            "100.68.0.1",
            "100.69.0.1",
            "100.70.0.1",
        ];
        for (i, ip) in ips.iter().enumerate() {
            recs.push(Rec {
                ip: Some(ip),
                ..Rec::new(at + i as i64 * 1000, id(), "acct_2")
            });
        }
        for i in 0..40 {
            recs.push(Rec {
                cost: Some(0.05),
                ..Rec::new(at + i * 1000, id(), "acct_3")
            });
        }
        recs.sort_by_key(|r| r.ts);
        recs
    }

    #[test]
    fn every_detector_fires_on_the_eventful_stream() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        let alerts = run(&mut e, &eventful_stream());
        let kinds: std::collections::BTreeSet<AlertKind> = alerts.iter().map(|a| a.kind).collect();
        for k in [
            AlertKind::RequestSpike,
            AlertKind::RepeatedPrompt,
            AlertKind::LeakedKey,
            AlertKind::BudgetThreshold,
        ] {
            assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
        }
        let ids: std::collections::HashSet<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids.len(), alerts.len(), "alert ids are unique");
        // Nothing fires on the quiet users' normal traffic.
        assert!(alerts.iter().all(|a| a.user_id != "acct_4"), "{alerts:#?}");
    }

    #[test]
    fn snapshot_and_restore_continue_exactly() {
        let recs = eventful_stream();
        let mut whole = Engine::new(&EngineConfig::default()).unwrap();
        let want = run(&mut whole, &recs);
        for cut in [1, recs.len() / 3, recs.len() / 2, recs.len() - 5] {
            let mut first = Engine::new(&EngineConfig::default()).unwrap();
            let mut got = run(&mut first, &recs[..cut]);
            let json = serde_json::to_string(first.state()).unwrap();
            let state: EngineState = serde_json::from_str(&json).unwrap();
            let mut second = Engine::restore(&EngineConfig::default(), state).unwrap();
            got.extend(run(&mut second, &recs[cut..]));
            assert_eq!(got, want, "cut at {cut}");
            // A replay of already-counted records after a restore changes nothing.
            let again = run(&mut second, &recs[recs.len() - 5..]);
            assert!(again.is_empty());
        }
    }

    /// Accounts that come in waves an hour apart (so earlier waves go idle
    /// and are forgotten), repeating prompts now and then, over the
    /// eventful stream.
    fn waves_of_accounts() -> Vec<Rec> {
        let mut recs = eventful_stream();
        let mut n = 0;
        for h in 0..6i64 {
            for m in 0..60i64 {
                for u in 0..12i64 {
                    if (m + u) % 5 != 0 {
                        continue;
                    }
                    n += 1;
                    let user = format!("wave{h}_{u}");
                    recs.push(Rec {
                        fp: Some(format!("p{}", (m / 15 + u) % 3)),
                        ip: Some("198.51.100.9"),
                        pt: 30,
                        ct: 12,
                        ..Rec::new(
                            t0() + h * HOUR_MS + m * 60_000 + u * 700,
                            format!("w{n}"),
                            &user,
                        )
                    });
                }
            }
        }
        recs.sort_by_key(|r| r.ts);
        recs
    }

    #[test]
    fn incremental_checkpoints_restore_the_state_exactly() {
        let mut cfg = EngineConfig::default();
        cfg.state.idle_ttl_hours = 2;
        let recs = waves_of_accounts();
        let mut whole = Engine::new(&cfg).unwrap();
        let want = run(&mut whole, &recs);
        let mut e = Engine::new(&cfg).unwrap();
        e.track_changes(None);
        // What Postgres would hold: the core and one entry per account and key.
        let mut core = Vec::new();
        let mut stored: HashMap<(EntryKind, Box<str>), Vec<u8>> = HashMap::new();
        let (mut got, mut fulls, mut written, mut forgotten, mut held) = (vec![], 0, 0, 0, 0);
        let (mut dedup_written, mut dedup_forgotten) = (0, 0);
        let step = recs.len() / 23;
        for (i, chunk) in recs.chunks(step).enumerate() {
            got.extend(run(&mut e, chunk));
            let cp = e.checkpoint();
            if cp.full {
                fulls += 1;
                stored.clear();
            }
            for (kind, id) in &cp.forgotten {
                stored.remove(&(*kind, id.clone()));
            }
            // Only what the chunk touched is written: its accounts and keys,
            // and accounts whose prompt sightings a sweep went through (or
            // ones seen in the minute of the previous checkpoint, unchanged).
            let seen: std::collections::HashSet<&str> = chunk
                .iter()
                .flat_map(|r| [r.user.as_str(), r.key.as_str()])
                .collect();
            for en in &cp.changed {
                let before = stored.insert((en.kind, en.id.clone()), en.state.clone());
                if en.kind == EntryKind::Dedup {
                    assert!(before.is_none(), "chunk {} written twice", en.id);
                    dedup_written += en.state.len() / 8;
                } else if !cp.full && !seen.contains(&*en.id) {
                    let before = before.unwrap_or_default();
                    assert!(
                        before == en.state || String::from_utf8_lossy(&before).contains("prompts"),
                        "{:?} {} written unseen",
                        en.kind,
                        en.id
                    );
                }
            }
            // The duplicate window is in chunks, not in the core, and the
            // chunks stored hold exactly the hashes of the window (those of
            // a generation that rotated out are deleted).
            assert!(cp.core.len() < 300, "core of {} bytes", cp.core.len());
            dedup_forgotten += cp
                .forgotten
                .iter()
                .filter(|(k, _)| *k == EntryKind::Dedup)
                .count();
            let chunked: usize = stored
                .iter()
                .filter(|((k, _), _)| *k == EntryKind::Dedup)
                .map(|(_, s)| s.len() / 8)
                .sum();
            assert_eq!(chunked, e.tracked().dedup_entries, "after checkpoint {i}");
            core.clone_from(&cp.core);
            written += cp.changed.len();
            forgotten += cp.forgotten.len();
            held += stored.len();
            let entries = stored.iter().map(|((kind, id), state)| Entry {
                kind: *kind,
                id: id.clone(),
                state: state.clone(),
            });
            let (state, since) = EngineState::from_checkpoint(&core, entries).unwrap();
            assert_eq!(&state, e.state(), "after checkpoint {i}");
            assert!(since.is_some());
            // The restored engine goes on exactly as the one that kept running.
            if i % 7 == 3 {
                let mut restored = Engine::restore(&cfg, state).unwrap();
                restored.track_changes(since);
                let consumed = ((i + 1) * step).min(recs.len());
                let mut rest = got.clone();
                rest.extend(run(&mut restored, &recs[consumed..]));
                assert_eq!(rest, want, "restored after checkpoint {i}");
            }
        }
        assert_eq!(got, want);
        assert_eq!(fulls, 1, "only the first checkpoint writes everything");
        assert!(forgotten > 0, "idle accounts were forgotten");
        assert!(written < held, "{written} of {held}");
        // Each hash written once (the window's records, not the window at
        // every checkpoint), and generations rotated out.
        let counted = e.stats().events - e.stats().duplicates;
        assert!(dedup_written > 0 && dedup_written as u64 <= counted);
        assert!(dedup_forgotten > 0, "no chunk of a past generation deleted");
    }

    /// A checkpoint of 2026-12-05 (accounts as entries, the duplicate
    /// window inside the core) restores, and the next checkpoint, a delta,
    /// writes the whole window as chunks.
    #[test]
    fn a_checkpoint_with_the_duplicate_window_inside_still_restores() {
        let recs = eventful_stream();
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        run(&mut e, &recs);
        let mut old: serde_json::Value = serde_json::to_value(e.state()).unwrap();
        old.as_object_mut().unwrap().remove("users");
        old.as_object_mut().unwrap().remove("keys");
        // As 2026-12-06's checkpoints wrote it: no generation marks.
        let d = old["dedup"].as_object_mut().unwrap();
        d.remove("prev_since");
        d.remove("next_chunk");
        assert!(old["dedup"]["cur"].is_string(), "{old}");
        assert!(old["dedup"]["prev"].is_string(), "two generations: {old}");
        let entries: Vec<Entry> = e
            .checkpoint()
            .changed
            .into_iter()
            .filter(|en| en.kind != EntryKind::Dedup)
            .collect();
        let core = serde_json::to_vec(&old).unwrap();
        let (state, since) = EngineState::from_checkpoint(&core, entries.clone()).unwrap();
        assert_eq!(&state, e.state());
        let mut again = Engine::restore(&EngineConfig::default(), state).unwrap();
        again.track_changes(since);
        let cp = again.checkpoint();
        assert!(!cp.full);
        let chunked: usize = cp
            .changed
            .iter()
            .filter(|en| en.kind == EntryKind::Dedup)
            .map(|en| en.state.len() / 8)
            .sum();
        assert!(chunked > 0);
        assert_eq!(chunked, e.tracked().dedup_entries);
        // What Postgres then holds restores the same window.
        let mut stored: HashMap<(EntryKind, Box<str>), Vec<u8>> = entries
            .into_iter()
            .map(|en| ((en.kind, en.id), en.state))
            .collect();
        for en in &cp.changed {
            stored.insert((en.kind, en.id.clone()), en.state.clone());
        }
        let stored = stored
            .into_iter()
            .map(|((kind, id), state)| Entry { kind, id, state });
        let (back, _) = EngineState::from_checkpoint(&cp.core, stored).unwrap();
        assert_eq!(&back, e.state());
        // A chunk that does not read is named.
        let bad = |id: &str, state: &[u8]| {
            let en = Entry {
                kind: EntryKind::Dedup,
                id: id.into(),
                state: state.to_vec(),
            };
            EngineState::from_checkpoint(&cp.core, [en])
                .unwrap_err()
                .to_string()
        };
        assert!(bad("x", &[0; 8]).contains("not GENERATION.N"));
        assert!(bad("5.1", &[0; 7]).contains("not a whole number of 8-byte hashes"));
    }

    #[test]
    fn a_checkpoint_with_its_accounts_inside_still_restores() {
        let recs = eventful_stream();
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        run(&mut e, &recs);
        let old = serde_json::to_vec(e.state()).unwrap();
        let (state, since) = EngineState::from_checkpoint(&old, []).unwrap();
        assert_eq!(&state, e.state());
        assert_eq!(since, None, "its next checkpoint writes every entry");
        let mut again = Engine::restore(&EngineConfig::default(), state).unwrap();
        again.track_changes(since);
        assert!(again.checkpoint().full);
        assert!(!again.checkpoint().full);
        again.checkpoint_lost();
        assert!(
            again.checkpoint().full,
            "a lost checkpoint makes the next full"
        );
        let bad = EngineState::from_checkpoint(
            &e.checkpoint().core,
            [Entry {
                kind: EntryKind::User,
                id: "acct_0".into(),
                state: b"{".to_vec(),
            }],
        )
        .unwrap_err();
        assert!(
            bad.to_string().contains("entry of user \"acct_0\""),
            "{bad}"
        );
    }

    #[test]
    fn alerts_follow_the_contract() {
        let mut e = Engine::new(&EngineConfig::default()).unwrap();
        let alerts = run(&mut e, &eventful_stream());
        for a in &alerts {
            let v = serde_json::to_value(a).unwrap();
            for field in [
                "id", "kind", "severity", "action", "user_id", "ts", "reason",
            ] {
                assert!(v.get(field).is_some(), "{field} missing in {v}");
            }
            assert!(parse_rfc3339(v["ts"].as_str().unwrap()).is_some());
            assert!(["info", "warning", "critical"].contains(&v["severity"].as_str().unwrap()));
            assert!(["notify", "throttle", "block"].contains(&v["action"].as_str().unwrap()));
            assert!(
                a.reason.ends_with('.') && a.reason.len() > 30,
                "{}",
                a.reason
            );
            if a.kind == AlertKind::BudgetThreshold {
                let b = &v["budget"];
                for field in [
                    "period",
                    "period_start",
                    "limit_usd",
                    "spent_usd",
                    "percent",
                ] {
                    assert!(b.get(field).is_some(), "budget.{field} missing in {v}");
                }
            }
            let back: Alert = serde_json::from_value(v).unwrap();
            assert_eq!(&back, a);
        }
    }

    #[test]
    fn idle_state_expires() {
        let mut cfg = EngineConfig::default();
        cfg.state.idle_ttl_hours = 1;
        let mut e = Engine::new(&cfg).unwrap();
        run(
            &mut e,
            &[
                Rec::new(t0(), "a", "old"),
                Rec::new(t0() + 30 * 60_000, "b", "recent"),
            ],
        );
        run(&mut e, &[Rec::new(t0() + 2 * HOUR_MS, "c", "now")]);
        e.expire();
        let users: std::collections::BTreeSet<&str> =
            e.state().users.keys().map(|k| &**k).collect();
        assert_eq!(users, ["now"].into_iter().collect());
    }

    #[test]
    fn per_user_state_is_compact() {
        // The fixed part of a user's and a key's state; ids, map slots and
        // prompt sightings come on top (measured by `keywatch replay`).
        // 384 since the capped-share test counts every capped answer (12
        // bytes, 8 after padding).
        assert!(
            std::mem::size_of::<UserState>() <= 384,
            "{}",
            std::mem::size_of::<UserState>()
        );
        assert!(
            std::mem::size_of::<KeyState>() <= 128,
            "{}",
            std::mem::size_of::<KeyState>()
        );
    }
}
