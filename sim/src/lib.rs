//! A deterministic simulator of LLM gateway traffic, with injected attacks
//! and their ground truth, and an evaluator that scores alerts against it.
//!
//! # The model
//!
//! Every simulated account is an *actor* with its own random stream and a
//! next wake-up time; one priority queue ordered by (time, sequence number)
//! interleaves all of them, so records come out in event-time order and a
//! seed always gives the same bytes (no hash-map order, no platform libm:
//! see `rng`).
//!
//! **Benign accounts** have a tier (free / pro / enterprise), one to three
//! keys, one or two stable home addresses in one autonomous system, one
//! client (user agent) and a favourite model. Their activity is
//! heavy-tailed: a Pareto-distributed number of sessions per day, arriving
//! as a Poisson process modulated by a daily cycle (a sinusoid with its peak
//! mid-afternoon UTC and its trough at 30 % of the peak in the standard
//! profile). A session is a geometric number of requests separated by
//! exponential gaps (tens of seconds for people, seconds for enterprise
//! back ends). Some pro and enterprise accounts run batch jobs: a session
//! becomes a 5-15 minute burst at 2-3 times their usual rate. Prompt and
//! completion sizes are lognormal. A few prompts are repeated two to four
//! times within an hour (retries, regenerate), and a pool of twenty
//! "popular" prompts is shared across accounts, each account using one at
//! most twice an hour.
//!
//! Benign accounts stay inside their tier, by construction rather than by
//! luck: a sliding one-minute window holds them to 60 % of the tier's
//! requests per minute, completions are capped at 60 % of the tier's maximum
//! output, and a per-UTC-day ledger stops an account for the rest of the day
//! before it passes 75 % of its daily tokens or 80 % of its daily budget.
//!
//! The **shifted profile** keeps those limits but changes the shape: more
//! paying accounts, a heavier tail, its peak at a different hour and a
//! deeper trough, more batch accounts with harsher bursts, twice the share
//! of split request/response logging, longer prompts and shorter
//! completions, and three times the popular-prompt traffic. Detectors tuned
//! on the standard profile are checked on it.
//!
//! **Attacks** are planned at construction (the ground truth,
//! [`Simulator::attacks`]), never in the first hour so baselines exist, and
//! each runs as its own actor interleaved with the benign traffic:
//! [`AttackKind`] documents each one's intensity.
//!
//! **Delivery** imitates real gateway logs: a share of accounts log a
//! request record and a later response record instead of one exchange
//! record, about 30 % of records leave `cost_usd` out for keywatch to price,
//! about 1 % carry the raw prompt instead of a fingerprint, and a small
//! share of lines are delivered twice, the second copy a little later.

mod attack;
mod benign;
mod eval;
mod gateway;
mod record;
mod render;
mod rng;
mod tables;

pub use eval::{
    evaluate, AlertRef, BenignScore, Evaluation, KindScore, COLD_START_MS, CORE_KINDS, FAST_KINDS,
    FAST_MS,
};
pub use gateway::{LogFormat, UnknownLogFormat};

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;

// The submodules share one namespace: each does `use super::*`.
use attack::*;
use benign::*;
use record::*;
use render::{push_cost_e8, push_hex, push_ipv4, push_padded, push_rfc3339, push_u64, Sink};
use rng::{cos, mix32, mix64, Rng};
use tables::*;

const SECOND_MS: i64 = 1000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Shape of benign traffic. `Standard` is what detectors are tuned on;
/// `Shifted` is deliberately different (held-out check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The traffic shape detectors are tuned on.
    Standard,
    /// A different shape within the same tier limits, for held-out checks.
    Shifted,
}

impl Profile {
    /// The name `FromStr` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Standard => "standard",
            Profile::Shifted => "shifted",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A traffic profile name that is neither `standard` nor `shifted`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown traffic profile {0:?}: expected \"standard\" or \"shifted\"")]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standard" => Ok(Profile::Standard),
            "shifted" => Ok(Profile::Shifted),
            other => Err(UnknownProfile(other.to_owned())),
        }
    }
}

/// What to simulate. Out-of-range values are clamped, never rejected:
/// negative or non-finite durations and rates become 0, fractions are
/// clamped to [0, 1].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Benign accounts (default 1000).
    pub users: u32,
    /// Simulated duration in hours (default 24).
    pub hours: f64,
    /// Seed of every random draw (default 1).
    pub seed: u64,
    /// Unix ms of the first instant (default 2026-11-23T00:00:00Z; clamped
    /// to 1970 through year 8300, so every timestamp stays writable).
    pub start_ms: i64,
    /// Shape of benign traffic (default standard).
    pub profile: Profile,
    /// Attacks injected per 1000 benign user-days (default 20). When it is
    /// positive and the run lasts at least 2 hours, at least one attack of
    /// each kind is injected.
    pub attacks_per_1k_user_days: f64,
    /// Share of accounts whose gateway logs split request and response
    /// records (default 0.2; the shifted profile doubles it).
    pub split_fraction: f64,
    /// Share of records delivered twice: the exact same line again, up to
    /// 3 s later (default 0.005).
    pub duplicate_fraction: f64,
    /// An opening for a live demo (default off): the first attack of each
    /// kind starts right after the first hour, one every
    /// [`OPENING_STEP_MS`], instead of at a random time. Every other draw
    /// is the same, so the rest of the day's attacks are unchanged.
    pub opening: bool,
}

/// With [`SimConfig::opening`], the time between the opening attacks' onsets.
pub const OPENING_STEP_MS: i64 = 90_000;

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            users: 1000,
            hours: 24.0,
            seed: 1,
            start_ms: 1_795_392_000_000,
            profile: Profile::Standard,
            attacks_per_1k_user_days: 20.0,
            split_fraction: 0.2,
            duplicate_fraction: 0.005,
            opening: false,
        }
    }
}

/// One injected attack: the ground truth the evaluator scores against.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Attack {
    /// What kind of abuse.
    pub kind: AttackKind,
    /// The account whose traffic it is (for a coordinated-farming campaign's
    /// head entry, the campaign's first account).
    pub user_id: String,
    /// The key used, `None` for a coordinated-farming campaign's head entry
    /// (its member entries name each account's key).
    pub key_id: Option<String>,
    /// First instant of attack traffic (unix ms).
    pub onset_ms: i64,
    /// Last instant of attack traffic (unix ms).
    pub end_ms: i64,
    /// Which form of the kind, when a traffic model tells them apart (for
    /// example `stolen key` or `owner's script` for a flood); reported on
    /// its own line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// What `keywatch simulate --truth` writes and `keywatch replay --truth`
/// reads back: everything [`evaluate`] needs besides the alerts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Truth {
    /// [`Simulator::benign_user_days`] of the run.
    pub benign_user_days: f64,
    /// [`Simulator::attacks`] of the run.
    pub attacks: Vec<Attack>,
    /// The run's first instant (unix ms), for the cold-start figure; truth
    /// files written before it existed leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<i64>,
}

/// The kinds of abuse the simulator injects.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// A victim's key sends at 10-40 times its tier's usual benign rate and
    /// at least 1.5 times the tier's requests-per-minute limit, for 5-20
    /// minutes, from the victim's usual address (a scripted flood; the
    /// gateway answers part of the excess with 429).
    RequestFlood,
    /// A victim's key sends 4-20 requests a minute (a script: steady cadence,
    /// ±30 %) with large prompts and completions of 90-100 % of the tier's
    /// maximum output, for 10-30 min.
    TokenExhaustion,
    /// One account's script sends the same prompt at a steady 4-10 times a
    /// minute for 20-60 min.
    PromptFarming,
    /// 20-60 new accounts, all started by one script within a minute, each
    /// send the same prompt 3-6 times, 15-60 s apart. Ground truth: a head
    /// entry (first account, key `None`) and one entry per account with its
    /// key, all with the same onset and end.
    CoordinatedFarming,
    /// A victim's key is used from 30-200 addresses in 10 or more autonomous
    /// systems with other clients, 5-30 requests a minute in all, for 30-120
    /// minutes, while the victim's own traffic goes on.
    LeakedKey,
    /// A victim's key sends expensive requests (gpt-4o or claude-sonnet-4,
    /// large completions) at a script's steady cadence, fast enough to pass
    /// the daily budget in 20-60 minutes, for about that long.
    BudgetDrain,
    /// 15-40 new free accounts cycled from one address (a hosting
    /// provider's, or a residential one), each quiet on its own: 6-10
    /// ordinary requests over the 30 minutes. Ground truth: a head entry and
    /// one entry per account, as a campaign has.
    KeyCycling,
    /// One address (a hosting or abuse network) tries 60-300 guessed keys
    /// over 10-20 minutes, each refused with 401 (now and then 403). The
    /// gateway names no account for a key it does not know, so each guess
    /// is its own account. Ground truth: a head entry and one per guess.
    CredentialStuffing,
    /// 30-60 new free accounts behind residential proxies (each its own
    /// access address) send one prompt only 2-3 times each, minutes apart:
    /// no account repeats enough to be noticed alone, and in a partitioned
    /// topic no partition sees many of them. Ground truth: a head entry and
    /// one per account.
    SpreadFarming,
}

impl AttackKind {
    /// Every kind, in report order.
    pub const ALL: [AttackKind; 6] = [
        AttackKind::RequestFlood,
        AttackKind::TokenExhaustion,
        AttackKind::PromptFarming,
        AttackKind::CoordinatedFarming,
        AttackKind::LeakedKey,
        AttackKind::BudgetDrain,
    ];

    /// The kinds that span accounts, planned on a stream of their own (so
    /// adding them left every other attack of a seed as it was), caught by
    /// the second stage's detectors.
    pub const CROSS_ACCOUNT: [AttackKind; 3] = [
        AttackKind::KeyCycling,
        AttackKind::CredentialStuffing,
        AttackKind::SpreadFarming,
    ];

    /// Whether the ground truth lists the attack as a group: a head entry
    /// (the first account, no key) and one entry per account with its key,
    /// all with the same onset and end.
    pub fn grouped(self) -> bool {
        matches!(
            self,
            AttackKind::CoordinatedFarming
                | AttackKind::KeyCycling
                | AttackKind::CredentialStuffing
                | AttackKind::SpreadFarming
        )
    }

    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            AttackKind::RequestFlood => "request_flood",
            AttackKind::TokenExhaustion => "token_exhaustion",
            AttackKind::PromptFarming => "prompt_farming",
            AttackKind::CoordinatedFarming => "coordinated_farming",
            AttackKind::LeakedKey => "leaked_key",
            AttackKind::BudgetDrain => "budget_drain",
            AttackKind::KeyCycling => "key_cycling",
            AttackKind::CredentialStuffing => "credential_stuffing",
            AttackKind::SpreadFarming => "spread_farming",
        }
    }
}

impl fmt::Display for AttackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// Random streams, one per purpose, so adding draws to one leaves the others
// unchanged.
const STREAM_USER: u64 = 1;
const STREAM_PLAN: u64 = 2;
const STREAM_ATTACK: u64 = 3;
const STREAM_ATTACK_TRAFFIC: u64 = 4;
const STREAM_FARM: u64 = 5;
const STREAM_DELIVERY: u64 = 6;
const STREAM_SALTS: u64 = 7;
const STREAM_CROSS_PLAN: u64 = 8;
const STREAM_CROSS: u64 = 9;

// ---------------------------------------------------------------------------
// The simulator.

/// Something due at a time: an actor's wake-up or a pending line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Due {
    at_ms: i64,
    /// Insertion order: breaks ties so the order never depends on the heap.
    seq: u64,
    what: Wake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    User(u32),
    Attacker(u32),
    Deliver(u32),
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest.
        other.at_ms.cmp(&self.at_ms).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The deterministic traffic generator: benign accounts and injected
/// attacks, written one JSON line at a time in event-time order.
///
/// Memory is proportional to the number of accounts (about 300 bytes each,
/// more for enterprise accounts) plus the lines in flight; output costs no
/// allocation per record.
pub struct Simulator {
    params: &'static ProfileParams,
    start_ms: i64,
    run_end_ms: i64,
    benign_user_days: f64,
    duplicate_share: f64,
    popular: [SharedPrompt; POPULAR_PROMPTS],
    users: Vec<BenignUser>,
    attackers: Vec<Attacker>,
    attacks: Vec<Attack>,
    queue: BinaryHeap<Due>,
    pending: Vec<Delivery>,
    free_slots: Vec<u32>,
    seq: u64,
    ids: RequestIds,
    delivery_rng: Rng,
    line: Vec<u8>,
    shape: gateway::Shape,
}

impl Simulator {
    /// Plans the run: draws every account and every attack (so
    /// [`attacks`](Self::attacks) is complete at once) and schedules each
    /// actor's first wake-up.
    pub fn new(cfg: SimConfig) -> Self {
        let mut cfg = cfg;
        let unit = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let non_negative = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
        // Ten years is plenty and keeps every timestamp in range.
        cfg.hours = non_negative(cfg.hours).min(24.0 * 3653.0);
        cfg.attacks_per_1k_user_days = non_negative(cfg.attacks_per_1k_user_days);
        cfg.split_fraction = unit(cfg.split_fraction);
        cfg.duplicate_fraction = unit(cfg.duplicate_fraction);
        cfg.start_ms = cfg.start_ms.clamp(0, 200_000_000_000_000);

        let params = cfg.profile.params();
        let run_end_ms = cfg.start_ms + (cfg.hours * HOUR_MS as f64).round() as i64;
        let split_share = (cfg.split_fraction * params.split_mult).min(1.0);
        let mut salts = Rng::new(cfg.seed, STREAM_SALTS, 0);
        let key_salt = salts.next_u64() as u32;
        let ids = RequestIds {
            next: 0,
            salt: salts.next_u64(),
        };
        let mut popular = [SharedPrompt {
            fingerprint: 0,
            tokens: 0,
            chars: 0,
        }; POPULAR_PROMPTS];
        for s in &mut popular {
            let tokens = salts.lognormal(120.0, 0.6).clamp(10.0, 1500.0) as u32;
            *s = SharedPrompt {
                fingerprint: salts.next_u64(),
                tokens,
                chars: chars_for(&mut salts, tokens),
            };
        }

        let users: Vec<BenignUser> = (0..cfg.users)
            .map(|n| BenignUser::new(n, cfg.seed, key_salt, split_share, params))
            .collect();
        let plan = plan_attacks(&cfg, &users, key_salt, run_end_ms, split_share);

        let mut sim = Self {
            params,
            start_ms: cfg.start_ms,
            run_end_ms,
            benign_user_days: f64::from(cfg.users) * cfg.hours / 24.0,
            duplicate_share: cfg.duplicate_fraction,
            popular,
            users,
            attackers: Vec::with_capacity(plan.attackers.len()),
            attacks: plan.attacks,
            queue: BinaryHeap::with_capacity(cfg.users as usize + plan.attackers.len() + 64),
            pending: Vec::new(),
            free_slots: Vec::new(),
            seq: 0,
            ids,
            delivery_rng: Rng::new(cfg.seed, STREAM_DELIVERY, 0),
            line: Vec::with_capacity(1024),
            shape: gateway::Shape::CANONICAL,
        };
        let world = World {
            params,
            popular: &sim.popular,
            run_end_ms,
        };
        let mut first_wakes = Vec::with_capacity(sim.users.len());
        for (i, user) in sim.users.iter_mut().enumerate() {
            if let Some(at) = user.next_session(cfg.start_ms, &world) {
                first_wakes.push((at, Wake::User(i as u32)));
            }
        }
        for (i, (at, attacker)) in plan.attackers.into_iter().enumerate() {
            sim.attackers.push(attacker);
            if at <= sim.attackers[i].end_ms {
                first_wakes.push((at, Wake::Attacker(i as u32)));
            }
        }
        for (at, what) in first_wakes {
            sim.schedule(at, what);
        }
        sim
    }

    /// Appends the next record (one JSON object and `'\n'`) to `out` and
    /// returns its event time (`ts`, unix ms); `None` when the run is over.
    ///
    /// Event times never decrease, except on a redelivered duplicate: the
    /// exact same line as an earlier one, so it carries that line's time,
    /// at most 3 s behind the stream.
    pub fn next_record(&mut self, out: &mut String) -> Option<i64> {
        loop {
            let due = *self.queue.peek()?;
            let world = World {
                params: self.params,
                popular: &self.popular,
                run_end_ms: self.run_end_ms,
            };
            let (made, next) = match due.what {
                Wake::Deliver(slot) => {
                    self.queue.pop();
                    let delivery = self.pending[slot as usize];
                    self.free_slots.push(slot);
                    return Some(self.deliver(delivery, due.at_ms, out));
                }
                Wake::User(i) => self.users[i as usize].step(due.at_ms, &world, &mut self.ids),
                Wake::Attacker(i) => {
                    let (ex, next) =
                        self.attackers[i as usize].step(due.at_ms, &mut self.ids, self.params);
                    (Some(ex), next)
                }
            };
            match next {
                Some(at) => {
                    debug_assert!(at >= due.at_ms, "actors never wake in the past");
                    let seq = self.next_seq();
                    if let Some(mut top) = self.queue.peek_mut() {
                        top.at_ms = at.max(due.at_ms);
                        top.seq = seq;
                    }
                }
                None => {
                    self.queue.pop();
                }
            }
            if let Some(exchange) = made {
                let phase = if exchange.split && !self.shape.format.is_gateway() {
                    let response = Delivery {
                        exchange,
                        phase: Phase::Response,
                        redelivery: false,
                    };
                    self.hold(response, exchange.at_ms + i64::from(exchange.latency_ms));
                    Phase::Request
                } else {
                    Phase::Exchange
                };
                let delivery = Delivery {
                    exchange,
                    phase,
                    redelivery: false,
                };
                return Some(self.deliver(delivery, due.at_ms, out));
            }
        }
    }

    /// Ground truth: every injected attack, in onset order. Fixed at
    /// construction. A coordinated-farming campaign is a head entry (its
    /// first account, key `None`) followed by one entry per account.
    pub fn attacks(&self) -> &[Attack] {
        &self.attacks
    }

    /// The run's first instant, unix ms.
    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// Benign user-days simulated (accounts times hours / 24), the
    /// denominator of false-positive rates.
    pub fn benign_user_days(&self) -> f64 {
        self.benign_user_days
    }

    /// Writes a line and maybe schedules its redelivery; returns its event
    /// time.
    fn deliver(&mut self, delivery: Delivery, now: i64, out: &mut String) -> i64 {
        // Format into a reused byte buffer, then validate once per line:
        // cheaper than growing the String a field at a time.
        self.line.clear();
        delivery.render_as(self.shape, &mut self.line);
        out.push_str(std::str::from_utf8(&self.line).expect("lines are ASCII by construction"));
        if !delivery.redelivery
            && self.duplicate_share > 0.0
            && self.delivery_rng.chance(self.duplicate_share)
        {
            let later = now + 100 + self.delivery_rng.below(2900) as i64;
            self.hold(
                Delivery {
                    redelivery: true,
                    ..delivery
                },
                later,
            );
        }
        delivery.event_ms()
    }

    /// Keeps a line until `at`.
    fn hold(&mut self, delivery: Delivery, at: i64) {
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.pending[slot as usize] = delivery;
                slot
            }
            None => {
                self.pending.push(delivery);
                (self.pending.len() - 1) as u32
            }
        };
        self.schedule(at, Wake::Deliver(slot));
    }

    fn schedule(&mut self, at_ms: i64, what: Wake) {
        let seq = self.next_seq();
        self.queue.push(Due { at_ms, seq, what });
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

#[cfg(test)]
mod tests;
