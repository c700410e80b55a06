//! The stage-two engine: one per stage-two partition (or one per replay),
//! owning the merge and every subject's state.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::merge::{Merge, MergeStats, Offered};
use super::projection::{
    network_key, network_prefix, Frame, FrameError, FrameHeader, Kinds, Projection, FARMING, YOUNG,
};
use super::window::{Crossing, Distinct, DistinctParams};
use crate::alert::{Action, Alert, AlertKind, Severity};
use crate::baseline::{Incident, ShareBaseline, SharePrior};
use crate::config::{ConfigError, DataCenterShareConfig, EngineConfig};
use crate::hash::stable_hash;
use crate::text::group_digits;
use crate::time::MINUTE_MS;
use crate::StableBuild;

/// Most distinct accounts or keys counted per subject and window.
const MAX_TRACKED: usize = 128;
/// How long an address block lasts (addresses change hands).
const ADDRESS_BLOCK_MS: i64 = 24 * 60 * MINUTE_MS;
/// Minutes between sweeps of idle subjects.
const SWEEP_MINUTES: u32 = 10;

/// An address's state: the accounts it carries and its failed logins.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressState {
    last_minute: u32,
    accounts: Distinct,
    /// Distinct keys failing authentication (kept only once one has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failures: Option<Box<Distinct>>,
}

/// A subject counted by one distinct window (a network's accounts, a key's
/// accounts, a prompt's farming accounts).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Crowd {
    last_minute: u32,
    distinct: Distinct,
}

/// A key: its accounts, and the share of its requests from hosting networks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeySubject {
    last_minute: u32,
    accounts: Distinct,
    #[serde(default)]
    hosted: HostedShare,
}

/// The share of a key's requests from hosting networks: this window's
/// count, and the learned share of the windows before (a Beta-Binomial
/// rate with forgetting, fed by whole windows that did not alert).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostedShare {
    since: u32,
    requests: u32,
    hosted: u32,
    learned: ShareBaseline,
    alerted: bool,
    incident: Incident,
}

/// The prior of a key's hosted share: 2%, worth 20 requests.
const HOSTED_PRIOR: SharePrior = SharePrior {
    share: 0.02,
    trials: 20.0,
};
/// Per-window forgetting of the learned hosted share.
const HOSTED_DECAY: f32 = 0.8;

/// A jump in a key's hosted share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShareJump {
    /// Requests from hosting networks in the window.
    pub hosted: u32,
    /// Requests in the window.
    pub requests: u32,
    /// The learned share.
    pub learned: f64,
    /// Minute the window opened.
    pub since: u32,
}

impl HostedShare {
    /// Counts a request at `minute`; a jump when the window's hosted share
    /// passes the bar for the first time in an incident.
    fn see(&mut self, minute: u32, hosted: bool, p: &DataCenterShareConfig) -> Option<ShareJump> {
        if self.since == 0 || minute >= self.since + p.window_minutes {
            if self.since != 0 && !self.alerted {
                let l = &mut self.learned;
                l.hits = l.hits * HOSTED_DECAY + self.hosted as f32;
                l.trials = l.trials * HOSTED_DECAY + self.requests as f32;
            }
            *self = HostedShare {
                since: minute.max(1),
                learned: self.learned,
                incident: self.incident,
                ..HostedShare::default()
            };
        }
        self.requests = self.requests.saturating_add(1);
        self.hosted = self.hosted.saturating_add(hosted as u32);
        if self.alerted
            || !hosted
            || self.requests < p.min_requests
            || (self.hosted as f64) < p.min_share * self.requests as f64
            // A key born in a data center is not moving there: it needs a
            // history, and one spent mostly elsewhere.
            || self.learned.trials < p.min_history as f32
            || self.learned.mean(HOSTED_PRIOR) > p.max_learned_share
        {
            return None;
        }
        let tail = self
            .learned
            .upper_tail(HOSTED_PRIOR, self.hosted, self.requests);
        if tail >= p.p_value {
            return None;
        }
        self.alerted = true;
        if !self.incident.begins(minute, 2 * p.window_minutes) {
            return None;
        }
        Some(ShareJump {
            hosted: self.hosted,
            requests: self.requests,
            learned: self.learned.mean(HOSTED_PRIOR),
            since: self.since,
        })
    }
}

/// Everything stage two has learned: what its checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubjectState {
    /// Event-time order and exactly-once marks.
    pub merge: Merge,
    /// The largest event time taken, Unix ms.
    pub now_ms: i64,
    last_sweep: u32,
    addresses: HashMap<IpAddr, Box<AddressState>, StableBuild>,
    networks: HashMap<u64, Box<Crowd>, StableBuild>,
    keys: HashMap<Box<str>, Box<KeySubject>, StableBuild>,
    prompts: HashMap<u64, Box<Crowd>, StableBuild>,
}

/// Traffic of one address in one minute, as stage two adds it up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressTotals {
    /// Requests counted.
    pub requests: i64,
    /// Responses with an error status.
    pub errors: i64,
    /// Responses refusing credentials (401, 403).
    pub auth_failures: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Spend, micro-dollars.
    pub cost_micros: i64,
}

/// Per (address, minute) totals of the records taken.
pub type AddressRollups = HashMap<(IpAddr, i64), AddressTotals>;

/// How much state stage two holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SubjectsTracked {
    /// Addresses.
    pub addresses: usize,
    /// /24 and /64 networks.
    pub networks: usize,
    /// Keys.
    pub keys: usize,
    /// Prompts being farmed by more than one account.
    pub prompts: usize,
    /// Projections waiting for their turn.
    pub waiting: usize,
}

/// Settings resolved once.
#[derive(Clone, Debug)]
struct Resolved {
    lateness_ms: i64,
    max_buffered: usize,
    idle_ttl_min: u32,
    hosting: Vec<u32>,
    cycling: Option<DistinctParams>,
    stuffing: Option<(DistinctParams, u32)>,
    sharing: Option<DistinctParams>,
    hosted: Option<DataCenterShareConfig>,
    farming: Option<DistinctParams>,
}

/// The stage-two engine.
#[derive(Clone, Debug)]
pub struct SubjectEngine {
    r: Resolved,
    state: SubjectState,
    /// Projections taken (after repeats were dropped).
    taken: u64,
    /// The source of [`SubjectEngine::observe_local`], once it has one.
    local: Option<usize>,
}

/// A key or account's tag in a distinct window.
fn tag(s: &str) -> u32 {
    stable_hash(21, s.as_bytes()) as u32
}

impl SubjectEngine {
    /// A fresh engine; the config is validated.
    pub fn new(cfg: &EngineConfig) -> Result<SubjectEngine, ConfigError> {
        Self::restore(cfg, SubjectState::default())
    }

    /// An engine continuing from a checkpoint.
    pub fn restore(
        cfg: &EngineConfig,
        mut state: SubjectState,
    ) -> Result<SubjectEngine, ConfigError> {
        cfg.validate()?;
        if state == SubjectState::default() {
            state.merge = Merge::new();
        }
        let kc = &cfg.key_cycling;
        let cs = &cfg.credential_stuffing;
        let ks = &cfg.key_sharing;
        let rp = &cfg.repeated_prompt;
        let mut hosting = cfg.subjects.hosting_asns.clone();
        hosting.sort_unstable();
        hosting.dedup();
        let r = Resolved {
            lateness_ms: cfg.subjects.lateness_secs as i64 * 1000,
            max_buffered: cfg.subjects.max_buffered as usize,
            idle_ttl_min: cfg.subjects.idle_ttl_hours * 60,
            hosting,
            cycling: kc.enabled.then_some(DistinctParams {
                window_minutes: kc.window_minutes,
                min: kc.min_accounts,
                factor: kc.factor,
                prior: kc.prior_accounts,
                max_tracked: MAX_TRACKED,
            }),
            stuffing: cs.enabled.then_some((
                DistinctParams {
                    window_minutes: cs.window_minutes,
                    min: cs.min_keys,
                    factor: cs.factor,
                    prior: 1.0,
                    max_tracked: MAX_TRACKED,
                },
                cs.min_failures,
            )),
            sharing: ks.enabled.then_some(DistinctParams {
                window_minutes: ks.window_minutes,
                min: ks.min_users,
                factor: ks.factor,
                prior: 1.0,
                max_tracked: MAX_TRACKED,
            }),
            hosted: cfg
                .data_center_share
                .enabled
                .then(|| cfg.data_center_share.clone()),
            farming: (rp.enabled && rp.farming_min_users > 0).then_some(DistinctParams {
                window_minutes: rp.window_minutes,
                min: rp.farming_min_users,
                factor: 3.0,
                prior: 1.0,
                max_tracked: MAX_TRACKED,
            }),
        };
        Ok(SubjectEngine {
            r,
            state,
            taken: 0,
            local: None,
        })
    }

    /// The state, for a checkpoint.
    pub fn state(&self) -> &SubjectState {
        &self.state
    }

    /// The merge's counters.
    pub fn merge_stats(&self) -> MergeStats {
        self.state.merge.stats
    }

    /// Projections taken by the detectors.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// How much state is held.
    pub fn tracked(&self) -> SubjectsTracked {
        SubjectsTracked {
            addresses: self.state.addresses.len(),
            networks: self.state.networks.len(),
            keys: self.state.keys.len(),
            prompts: self.state.prompts.len(),
            waiting: self.state.merge.waiting(),
        }
    }

    /// Takes one frame from a stage-one partition: its projections wait
    /// their turn (repeats dropped), and every projection whose turn came
    /// goes through the detectors. Alerts go to `out`, address totals to
    /// `rollups` (None while re-reading to rebuild state). A frame that
    /// cannot be read is an error and changes nothing past its last good
    /// projection.
    pub fn observe_frame(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<Alert>,
        mut rollups: Option<&mut AddressRollups>,
    ) -> Result<(), FrameError> {
        let mut frame = Frame::parse(bytes)?;
        let source = self.state.merge.header(&frame.header);
        let mut result = Ok(());
        loop {
            match frame.next() {
                Ok(Some(p)) => {
                    if let Offered::Late(p) = self.state.merge.offer(source, p) {
                        self.take(&p, out, rollups.as_deref_mut());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.release(out, rollups);
        result
    }

    /// Takes one projection of a single local source (`keywatch replay`):
    /// `frontier_ms` is the largest event time that source has seen.
    pub fn observe_local(
        &mut self,
        p: Projection,
        frontier_ms: i64,
        out: &mut Vec<Alert>,
        mut rollups: Option<&mut AddressRollups>,
    ) {
        let source = match self.local {
            Some(id) => {
                self.state.merge.advance(id, frontier_ms, false);
                id
            }
            None => {
                let id = self.state.merge.header(&FrameHeader {
                    topic: "",
                    partition: 0,
                    partitions: 1,
                    frontier_ms,
                    idle: false,
                });
                *self.local.insert(id)
            }
        };
        if let Offered::Late(p) = self.state.merge.offer(source, p) {
            self.take(&p, out, rollups.as_deref_mut());
        }
        self.release(out, rollups);
    }

    /// Takes everything still waiting (the end of a replay).
    pub fn drain(&mut self, out: &mut Vec<Alert>, rollups: Option<&mut AddressRollups>) {
        self.release_to(i64::MAX, 0, out, rollups);
    }

    /// Takes every projection whose turn has come.
    fn release(&mut self, out: &mut Vec<Alert>, rollups: Option<&mut AddressRollups>) {
        let w = self.state.merge.watermark(self.r.lateness_ms);
        self.release_to(w, self.r.max_buffered, out, rollups);
    }

    /// Takes, oldest first, what the merge releases up to `watermark` (and
    /// beyond `max_waiting`).
    fn release_to(
        &mut self,
        watermark: i64,
        max_waiting: usize,
        out: &mut Vec<Alert>,
        mut rollups: Option<&mut AddressRollups>,
    ) {
        let mut taken = Vec::new();
        self.state
            .merge
            .release(watermark, max_waiting, |p| taken.push(p));
        for p in &taken {
            self.take(p, out, rollups.as_deref_mut());
        }
    }

    fn hosting(&self, asn: Option<u32>) -> bool {
        asn.is_some_and(|a| self.r.hosting.binary_search(&a).is_ok())
    }

    /// Runs one projection through the detectors of its subjects.
    fn take(&mut self, p: &Projection, out: &mut Vec<Alert>, rollups: Option<&mut AddressRollups>) {
        self.taken += 1;
        if p.ts_ms > self.state.now_ms {
            self.state.now_ms = p.ts_ms;
        }
        let minute = (p.ts_ms.div_euclid(MINUTE_MS)).clamp(1, u32::MAX as i64) as u32;
        self.sweep(minute);
        let user = tag(&p.user);
        let young = p.flags & YOUNG != 0;
        let hosting = self.hosting(p.asn);
        if p.kinds.has(Kinds::ADDRESS) {
            if let Some(ip) = p.ip {
                if let Some(r) = rollups {
                    let t = r
                        .entry((ip, p.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS))
                        .or_default();
                    t.requests += p.counts_request() as i64;
                    if p.phase.counts_response() && p.status >= 400 {
                        t.errors += 1;
                    }
                    t.auth_failures += (p.phase.counts_response() && p.auth_failure()) as i64;
                    t.prompt_tokens += p.prompt_tokens as i64;
                    t.completion_tokens += p.completion_tokens as i64;
                    t.cost_micros += p.cost_micros.min(i64::MAX as u64) as i64;
                }
                self.address(p, ip, (minute, user, young, hosting), out);
            }
        }
        if p.kinds.has(Kinds::NETWORK) && p.counts_request() {
            if let (Some(ip), Some(cp)) = (p.ip, self.r.cycling) {
                let net = network_key(ip);
                let c = self.state.networks.entry(net).or_default();
                c.last_minute = minute;
                if let Some(x) = c.distinct.see(minute, user, young, &cp, |_| true) {
                    out.push(cycling(&mut c.distinct, &x, &cp, p, ip, true, hosting));
                }
            }
        }
        if p.kinds.has(Kinds::KEY) && p.counts_request() {
            let c = match self.state.keys.get_mut(&*p.key) {
                Some(c) => c,
                None => self.state.keys.entry(p.key.clone()).or_default(),
            };
            c.last_minute = minute;
            if let Some(sp) = self.r.sharing {
                if let Some(x) = c.accounts.see(minute, user, young, &sp, |_| true) {
                    out.push(sharing_alert(p, &x, sp.window_minutes));
                }
            }
            if let Some(dc) = &self.r.hosted {
                if let Some(j) = c.hosted.see(minute, hosting, dc) {
                    out.push(hosted_alert(p, &j, dc.window_minutes));
                }
            }
        }
        if p.kinds.has(Kinds::FINGERPRINT) && p.flags & FARMING != 0 {
            if let (Some(fp), Some(fpp)) = (p.fingerprint.as_deref(), self.r.farming) {
                let h = stable_hash(23, fp.as_bytes());
                let c = self.state.prompts.entry(h).or_default();
                c.last_minute = minute;
                if let Some(x) = c.distinct.see(minute, user, young, &fpp, |_| true) {
                    out.push(farming_alert(p, fp, &x, fpp.window_minutes));
                }
            }
        }
    }

    /// Key cycling and credential stuffing on one address; `(minute, user,
    /// young, hosting)` as [`SubjectEngine::take`] found them.
    fn address(
        &mut self,
        p: &Projection,
        ip: IpAddr,
        (minute, user, young, hosting): (u32, u32, bool, bool),
        out: &mut Vec<Alert>,
    ) {
        let (cycling_on, stuffing) = (self.r.cycling, self.r.stuffing);
        let a = self.state.addresses.entry(ip).or_default();
        a.last_minute = minute;
        if p.counts_request() {
            if let Some(cp) = cycling_on {
                if let Some(x) = a.accounts.see(minute, user, young, &cp, |_| true) {
                    out.push(cycling(&mut a.accounts, &x, &cp, p, ip, false, hosting));
                }
            }
        }
        if p.phase.counts_response() && p.auth_failure() {
            if let Some((sp, min_failures)) = stuffing {
                let f = a.failures.get_or_insert_with(Default::default);
                let gate = |c: &Crossing| c.count >= min_failures;
                if let Some(x) = f.see(minute, tag(&p.key), false, &sp, gate) {
                    out.push(stuffing_alert(p, ip, &x, sp.window_minutes));
                }
            }
        }
    }

    /// Every `SWEEP_MINUTES`, subjects idle for `idle_ttl` go.
    fn sweep(&mut self, minute: u32) {
        if minute < self.state.last_sweep + SWEEP_MINUTES {
            return;
        }
        self.state.last_sweep = minute;
        let cutoff = minute.saturating_sub(self.r.idle_ttl_min);
        self.state.addresses.retain(|_, a| a.last_minute >= cutoff);
        self.state.networks.retain(|_, c| c.last_minute >= cutoff);
        self.state.keys.retain(|_, c| c.last_minute >= cutoff);
        // A farming window is the repeat window: a prompt out of it is done.
        let farm = self.r.farming.map_or(0, |f| f.window_minutes);
        let prompt_cutoff = minute.saturating_sub(farm.max(1) * 2);
        self.state
            .prompts
            .retain(|_, c| c.last_minute >= prompt_cutoff);
    }
}

/// Most of the window's accounts are young, and enough of them.
fn young_majority(x: &Crossing, min: u32) -> bool {
    x.flagged >= min && 2 * x.flagged >= x.distinct
}

/// Judges a key-cycling crossing `x` of an address (of its /24 or /64 with
/// `network`): from a hosting network, or of mostly young accounts, it is
/// suspect; otherwise an office's, and its windows teach the norm `d`.
fn cycling(
    d: &mut Distinct,
    x: &Crossing,
    cp: &DistinctParams,
    p: &Projection,
    ip: IpAddr,
    network: bool,
    hosting: bool,
) -> Alert {
    let suspect = hosting || young_majority(x, cp.min);
    if !suspect {
        d.accept();
    }
    cycling_alert(p, ip, network, suspect, hosting, x, cp.window_minutes)
}

/// An alert of the second stage: `kind` decided on `subject` in the window
/// that opened at minute `since`, the record `p` crossing the bar.
fn base(
    kind: AlertKind,
    subject: &str,
    since: u32,
    p: &Projection,
    (severity, action): (Severity, Action),
) -> Alert {
    Alert {
        id: Alert::make_id(kind, subject, &format!("m{since}")),
        kind,
        severity,
        action,
        user_id: p.user.to_string(),
        key_id: None,
        ip: None,
        ts: p.ts_ms,
        observed: None,
        baseline: None,
        threshold: None,
        budget: None,
        expires_at: (action == Action::Block).then_some(p.ts_ms + ADDRESS_BLOCK_MS),
        tier: None,
        reason: String::new(),
    }
}

/// [`base`] for a distinct count's crossing: what was seen, the norm and the bar.
fn crossing(
    kind: AlertKind,
    subject: &str,
    x: &Crossing,
    p: &Projection,
    decision: (Severity, Action),
) -> Alert {
    Alert {
        observed: Some(x.distinct as f64),
        baseline: Some(round1(x.norm)),
        threshold: Some(x.threshold),
        ..base(kind, subject, x.since, p, decision)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn cycling_alert(
    p: &Projection,
    ip: IpAddr,
    network: bool,
    suspect: bool,
    hosting: bool,
    x: &Crossing,
    window: u32,
) -> Alert {
    let (prefix, subject) = if network {
        ("net", network_prefix(ip))
    } else {
        ("ip", ip.to_string())
    };
    let decision = match (suspect, network) {
        (true, false) => (Severity::Critical, Action::Block),
        (true, true) => (Severity::Warning, Action::Notify),
        (false, _) => (Severity::Info, Action::Notify),
    };
    let what = if network { "network" } else { "address" };
    let why = match (hosting, x.flagged) {
        (true, _) => " from a hosting provider's network".to_string(),
        (false, y) if suspect => format!(", {y} of them accounts first seen within the last hours"),
        _ => String::new(),
    };
    let then = match decision.0 {
        Severity::Critical => "a sign of throwaway accounts cycled from one place; keywatch asks gateways to block the address for 24 hours.",
        Severity::Warning => "a sign of throwaway accounts cycled from one network; no action was taken.",
        Severity::Info => "an office or shared network carries that many at times, so no action was taken.",
    };
    let subject_id = format!("{prefix}:{subject}");
    let mut a = crossing(AlertKind::KeyCycling, &subject_id, x, p, decision);
    a.ip = Some(subject.clone());
    a.reason = format!(
        "The {what} {subject} carried {} distinct accounts within {window} minutes{why} (usually about {}; the latest {}), {then}",
        x.distinct,
        round1(x.norm),
        p.user
    );
    a
}

fn stuffing_alert(p: &Projection, ip: IpAddr, x: &Crossing, window: u32) -> Alert {
    let decision = (Severity::Critical, Action::Block);
    let mut a = crossing(
        AlertKind::CredentialStuffing,
        &format!("ip:{ip}"),
        x,
        p,
        decision,
    );
    a.ip = Some(ip.to_string());
    // The failures are what was seen; the norm and bar are of distinct keys.
    a.observed = Some(x.count as f64);
    a.reason = format!(
        "The address {ip} failed authentication {} times for {} distinct keys within {window} minutes (usually about {} keys), a sign of credential stuffing; keywatch asks gateways to block the address for 24 hours.",
        group_digits(x.count as i128),
        x.distinct,
        round1(x.norm)
    );
    a
}

fn sharing_alert(p: &Projection, x: &Crossing, window: u32) -> Alert {
    let decision = (Severity::Warning, Action::Notify);
    let mut a = crossing(
        AlertKind::KeySharing,
        &format!("key:{}", p.key),
        x,
        p,
        decision,
    );
    a.key_id = Some(p.key.to_string());
    a.reason = format!(
        "Key {} was used under {} distinct accounts within {window} minutes (usually {}; the latest {}): a key shared, resold or misattributed; no action was taken.",
        p.key,
        x.distinct,
        round1(x.norm),
        p.user
    );
    a
}

fn hosted_alert(p: &Projection, j: &ShareJump, window: u32) -> Alert {
    let decision = (Severity::Info, Action::Notify);
    let subject = format!("key:{}", p.key);
    let mut a = base(AlertKind::DataCenterShare, &subject, j.since, p, decision);
    a.key_id = Some(p.key.to_string());
    let share = j.hosted as f64 / j.requests as f64;
    a.observed = Some((share * 1000.0).round() / 1000.0);
    a.baseline = Some((j.learned * 1000.0).round() / 1000.0);
    a.reason = format!(
        "Key {} of {} made {} of its {} requests within {window} minutes from hosting providers' networks (usually {:.0}%): its traffic has moved to data centers, as a stolen key's does; no action was taken.",
        p.key,
        p.user,
        j.hosted,
        j.requests,
        100.0 * j.learned
    );
    a
}

fn farming_alert(p: &Projection, fp: &str, x: &Crossing, window: u32) -> Alert {
    let short = crate::engine::short_fp(fp);
    let decision = (Severity::Warning, Action::Notify);
    let mut a = crossing(
        AlertKind::PromptFarming,
        &format!("fp:{fp}"),
        x,
        p,
        decision,
    );
    a.key_id = Some(p.key.to_string());
    a.reason = format!(
        "{} accounts are each repeating the same prompt (fingerprint {short}) within {window} minutes, a sign of coordinated prompt farming; the latest is {} on key {}.",
        x.distinct, p.user, p.key
    );
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Phase;
    use crate::subject::projection::{FrameWriter, Seq};

    fn proj(ts_ms: i64, offset: i64, user: &str, ip: [u8; 4], asn: u32) -> Projection {
        Projection {
            ts_ms,
            rid: stable_hash(9, user.as_bytes()) ^ offset as u64,
            seq: Seq::new(offset, None),
            kinds: Kinds::default(),
            phase: Phase::Exchange,
            status: 200,
            prompt_tokens: 100,
            completion_tokens: 50,
            cost_micros: 100,
            ip: Some(IpAddr::from(ip)),
            asn: Some(asn),
            flags: 0,
            user: user.into(),
            key: format!("key_{user}").into(),
            fingerprint: None,
        }
    }

    const T0: i64 = 1_795_000_000_000;

    /// Sends `records` through frames as stage one would: `sources`
    /// partitions, each a frame per `batch` records.
    fn through_frames(
        e: &mut SubjectEngine,
        records: &[Projection],
        sources: i32,
        batch: usize,
    ) -> Vec<Alert> {
        let mut out = vec![];
        let mut per: Vec<Vec<&Projection>> = vec![vec![]; sources as usize];
        for (i, r) in records.iter().enumerate() {
            per[i % sources as usize].push(r);
        }
        let mut frontier = vec![i64::MIN; sources as usize];
        let mut cursor = vec![0usize; sources as usize];
        // Round robin over sources, a batch at a time.
        loop {
            let mut any = false;
            for s in 0..sources as usize {
                let mut w = FrameWriter::new(1);
                let end = (cursor[s] + batch).min(per[s].len());
                for r in &per[s][cursor[s]..end] {
                    frontier[s] = frontier[s].max(r.ts_ms);
                    w.add(r);
                }
                any |= end > cursor[s];
                let idle = end == per[s].len();
                cursor[s] = end;
                let frame = w.finish(&FrameHeader {
                    topic: "gw",
                    partition: s as i32,
                    partitions: sources as u32,
                    frontier_ms: frontier[s],
                    idle,
                });
                e.observe_frame(&frame[0].1, &mut out, None).unwrap();
            }
            if !any {
                break;
            }
        }
        out
    }

    #[test]
    fn throwaway_accounts_from_a_data_center_are_blocked_an_office_is_not() {
        let cfg = EngineConfig::default();
        let mut e = SubjectEngine::new(&cfg).unwrap();
        let mut recs = vec![];
        let mut o = 0;
        // An office on an access network: 30 people, all day.
        for m in 0..600i64 {
            for u in 0..3 {
                let user = format!("staff{}", (m * 3 + u) % 30);
                recs.push(proj(
                    T0 + m * 60_000 + u * 1000,
                    o,
                    &user,
                    [73, 1, 2, 3],
                    7922,
                ));
                o += 1;
            }
        }
        // 25 throwaway accounts cycling from one cloud address, 8 requests each.
        for i in 0..200i64 {
            let user = format!("throwaway{}", i % 25);
            recs.push(proj(
                T0 + 300 * 60_000 + i * 9_000,
                o,
                &user,
                [3, 9, 9, 9],
                16509,
            ));
            o += 1;
        }
        recs.sort_by_key(|r| r.ts_ms);
        let alerts = through_frames(&mut e, &recs, 3, 50);
        let cycling: Vec<_> = alerts
            .iter()
            .filter(|a| a.kind == AlertKind::KeyCycling)
            .collect();
        let blocked: Vec<_> = cycling
            .iter()
            .filter(|a| a.action == Action::Block)
            .collect();
        assert_eq!(blocked.len(), 1, "{cycling:#?}");
        assert_eq!(blocked[0].ip.as_deref(), Some("3.9.9.9"));
        assert!(cycling
            .iter()
            .filter(|a| a.ip.as_deref() == Some("73.1.2.3"))
            .all(|a| a.severity == Severity::Info));
        assert_eq!(e.merge_stats().late, 0);
    }

    #[test]
    fn a_key_moving_to_data_centers_is_noticed_one_born_there_is_not() {
        let mut e = SubjectEngine::new(&EngineConfig::default()).unwrap();
        let mut out = vec![];
        let mut o = 0;
        let mut send = |e: &mut SubjectEngine,
                        ts: i64,
                        key: &str,
                        ip: [u8; 4],
                        asn: u32,
                        out: &mut Vec<Alert>| {
            o += 1;
            let mut p = proj(ts, o, "acct", ip, asn);
            p.key = key.into();
            p.kinds = Kinds::KEY;
            e.observe_local(p, ts, out, None);
        };
        // A key on a home network for a day, then from a cloud.
        for i in 0..200i64 {
            send(
                &mut e,
                T0 + i * 300_000,
                "key_home",
                [73, 1, 1, 1],
                7922,
                &mut out,
            );
        }
        // A back end's key, in a cloud from its first request.
        for i in 0..200i64 {
            send(
                &mut e,
                T0 + i * 300_000 + 1,
                "key_svc",
                [3, 1, 1, 1],
                16509,
                &mut out,
            );
        }
        let t1 = T0 + 200 * 300_000;
        for i in 0..30i64 {
            send(
                &mut e,
                t1 + i * 20_000,
                "key_home",
                [3, 2, 2, (i % 200) as u8],
                16509,
                &mut out,
            );
            send(
                &mut e,
                t1 + i * 20_000 + 1,
                "key_svc",
                [3, 1, 1, 1],
                16509,
                &mut out,
            );
        }
        e.drain(&mut out, None);
        let dc: Vec<_> = out
            .iter()
            .filter(|a| a.kind == AlertKind::DataCenterShare)
            .collect();
        assert_eq!(dc.len(), 1, "{dc:#?}");
        assert_eq!(dc[0].key_id.as_deref(), Some("key_home"));
        assert_eq!(
            (dc[0].severity, dc[0].action),
            (Severity::Info, Action::Notify)
        );
    }

    #[test]
    fn stuffing_needs_many_keys_a_revoked_key_retrying_is_not() {
        let mut e = SubjectEngine::new(&EngineConfig::default()).unwrap();
        let mut out = vec![];
        // One client retrying its revoked key 100 times.
        for i in 0..100i64 {
            let mut p = proj(T0 + i * 1000, i, "acct", [88, 1, 1, 1], 3320);
            p.status = 401;
            p.kinds = Kinds::ADDRESS;
            e.observe_local(p, T0 + i * 1000, &mut out, None);
        }
        // A stuffer trying 60 keys.
        for i in 0..60i64 {
            let mut p = proj(
                T0 + 200_000 + i * 1000,
                200 + i,
                "anonymous",
                [45, 1, 1, 1],
                63949,
            );
            p.key = format!("kh_guess{i}").into();
            p.status = 401;
            p.kinds = Kinds::ADDRESS;
            e.observe_local(p, T0 + 200_000 + i * 1000, &mut out, None);
        }
        e.drain(&mut out, None);
        let s: Vec<_> = out
            .iter()
            .filter(|a| a.kind == AlertKind::CredentialStuffing)
            .collect();
        assert_eq!(s.len(), 1, "{out:#?}");
        assert_eq!(
            (s[0].ip.as_deref(), s[0].action),
            (Some("45.1.1.1"), Action::Block)
        );
        assert_eq!(s[0].observed, Some(20.0));
    }

    #[test]
    fn the_same_records_decide_alike_however_the_sources_interleave() {
        let cfg = EngineConfig::default();
        let mut recs = vec![];
        for i in 0..3000i64 {
            let user = format!("u{}", i % 97);
            let ip = if i % 5 == 0 {
                [3, 1, 1, (i % 2) as u8]
            } else {
                [73, (i % 50) as u8, 1, 1]
            };
            let mut p = proj(
                T0 + i * 700,
                i,
                &user,
                ip,
                if ip[0] == 3 { 16509 } else { 7922 },
            );
            if i % 11 == 0 {
                p.key = "key_shared".into();
            }
            recs.push(p);
        }
        let run = |sources: i32, batch: usize| {
            let mut e = SubjectEngine::new(&cfg).unwrap();
            let mut a: Vec<String> = through_frames(&mut e, &recs, sources, batch)
                .into_iter()
                .map(|a| a.id)
                .collect();
            a.sort();
            (a, e.taken())
        };
        let (one, n1) = run(1, 10_000);
        let (six, n6) = run(6, 37);
        assert!(!one.is_empty());
        assert_eq!(one, six);
        assert_eq!(n1, n6);
    }
}
