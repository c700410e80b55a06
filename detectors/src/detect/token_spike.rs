//! Token spikes and token-exhaustion prompts, per user.
//!
//! Two signals, either of which raises a `token_spike`:
//!
//! - **Huge completions.** A completion is huge when it is at least
//!   `huge_fraction_of_max` of the tier's max output tokens *and* more than
//!   `huge_z` standard deviations above the user's learned completion size
//!   (an exponentially weighted log-normal, starting from a prior median of a
//!   tenth of max output; the z bar is capped at 90% of max output).
//!   `huge_count` huge completions within
//!   `window_minutes` is a token-exhaustion attack: prompts crafted to make
//!   the model write until the cap, typically 3 in well under a minute. The
//!   z-test keeps a user who habitually writes long answers quiet.
//! - **Token bursts.** Tokens (input + output) in a sliding minute more than
//!   `burst_z` standard deviations above the user's learned (log-normal)
//!   tokens per active minute, and at least `min_max_outputs_per_minute ×`
//!   max output tokens: context stuffing and runaway loops that no single
//!   request gives away. Per-minute token use is heavy-tailed (one pasted
//!   document makes a big minute), so the bar is on the log scale and
//!   learns each user's spread, not just their mean; and it is judged
//!   only once ten active minutes are learned.
//!
//! Huge completions and burst minutes do not feed the baselines.

use serde::{Deserialize, Serialize};

use crate::baseline::{Incident, LogBaseline, SlidingMinute, Tick};
use crate::event::Phase;

/// The tier priors weigh as much as this many observations.
const PRIOR_WEIGHT: f64 = 8.0;

/// Active minutes learned before token bursts are judged. A new user's
/// first big minutes say nothing yet; huge completions, runaway spend and
/// the daily token allowance cover them meanwhile.
const WARM_MINUTES: u32 = 10;

/// Most huge completions remembered; `huge_count` is at most this.
pub const MAX_HUGE_COUNT: u32 = 4;

/// Settings resolved for one tier.
#[derive(Clone, Copy, Debug)]
pub struct TokenParams {
    /// The smallest huge completion, before the z-test.
    pub huge_floor: f64,
    /// The z-test's bar never exceeds this (90% of max output), so a user with
    /// a wide learned spread still cannot hide completions at the cap.
    pub huge_cap: f64,
    /// Standard deviations above the learned log size.
    pub huge_z: f64,
    /// Huge completions needed.
    pub huge_count: u32,
    /// Window for counting them, seconds.
    pub window_secs: u32,
    /// Prior median and log-scale spread of tokens per active minute.
    pub minute_prior: (f64, f64),
    /// Standard deviations above the learned log tokens per minute.
    pub burst_z: f64,
    /// Minimum tokens in a burst minute.
    pub min_burst: f64,
    /// Floor on the learning rate of the size baseline.
    pub alpha_min: f64,
    /// Prior median completion and log-scale spread.
    pub size_prior: (f64, f64),
    /// Incident cooldown, minutes.
    pub cooldown_minutes: u32,
    /// A request still unanswered after this many seconds is a long generation…
    pub in_flight_secs: u32,
    /// …and this many at once is a token spike (0: off).
    pub in_flight_count: u32,
}

/// Requests of a split-logging user still waiting for their response
/// record: (request hash, start second), oldest first, at most 16.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    entries: Vec<(u32, u32)>,
}

/// Requests older than this are forgotten (their response was lost).
const IN_FLIGHT_FORGET_SECS: u32 = 600;
/// Most requests tracked in flight per user.
const IN_FLIGHT_MAX: usize = 16;

/// A user's token state (about 70 bytes; in-flight requests of
/// split-logging users on the heap, only while they have some).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenState {
    window: SlidingMinute,
    /// Tokens per active minute (`n == 0`: not started, the prior applies).
    minutes: LogBaseline,
    /// Completion sizes (`n == 0`: not started).
    size: LogBaseline,
    bar: f32,
    huge: [u32; MAX_HUGE_COUNT as usize],
    huge_len: u8,
    incident_until: Incident,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Box<InFlight>>,
}

/// What made the token spike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TokenCause {
    /// `count` huge completions in the window; this one had `completion` tokens.
    Huge {
        /// Huge completions in the window.
        count: u32,
        /// The triggering completion's size.
        completion: u64,
        /// The size bar it crossed.
        threshold: f64,
        /// The user's learned median completion.
        baseline: f64,
    },
    /// `count` requests still generating after `oldest_secs` (split logs).
    InFlight {
        /// Requests unanswered for at least the bar.
        count: u32,
        /// Age of the oldest of them, seconds.
        oldest_secs: u32,
    },
    /// Tokens in the sliding minute.
    Burst {
        /// Tokens in the sliding minute.
        observed: f64,
        /// Learned median tokens per active minute.
        baseline: f64,
        /// The bar crossed.
        threshold: f64,
    },
}

/// A detected token spike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenSpike {
    /// What made it.
    pub cause: TokenCause,
    /// Minute the incident started.
    pub onset_minute: u32,
}

impl TokenState {
    /// Counts a record's tokens at `t`: `tokens` is what the record
    /// counts (input + output), `completion` the completion size when the
    /// record carries a finished response.
    #[inline]
    pub fn on_tokens(
        &mut self,
        t: Tick,
        tokens: u64,
        completion: Option<u64>,
        p: &TokenParams,
    ) -> Option<TokenSpike> {
        if let Some(closed) = self.window.advance(t) {
            if closed > 0 && (self.bar == 0.0 || (closed as f32) < self.bar) {
                if self.minutes.n == 0 {
                    self.minutes = LogBaseline::with_prior(p.minute_prior.0, p.minute_prior.1);
                }
                self.minutes
                    .observe(closed as f64, p.alpha_min, PRIOR_WEIGHT);
            }
            self.bar = 0.0;
        }
        self.window.add(tokens.min(u32::MAX as u64) as u32);
        let mut cause = None;
        if let Some(c) = completion.filter(|&c| c > 0) {
            let mut size = if self.size.n == 0 {
                LogBaseline::with_prior(p.size_prior.0, p.size_prior.1)
            } else {
                self.size
            };
            let bar = size.upper(p.huge_z).min(p.huge_cap).max(p.huge_floor);
            if c as f64 >= bar {
                let now_s = t.secs;
                let count = self.push_huge(now_s, p);
                if count >= p.huge_count {
                    let baseline = size.median();
                    cause = Some(TokenCause::Huge {
                        count,
                        completion: c,
                        threshold: bar.round(),
                        baseline: baseline.round(),
                    });
                }
            } else {
                size.observe(c as f64, p.alpha_min, PRIOR_WEIGHT);
            }
            self.size = size;
        }
        let warmed = self.minutes.n >= WARM_MINUTES;
        if cause.is_none() && warmed {
            let est = self.window.estimate(t);
            if est >= p.min_burst {
                let minutes = self.minutes;
                if self.bar == 0.0 {
                    self.bar = minutes
                        .upper(p.burst_z)
                        .max(p.min_burst)
                        .min(f32::MAX as f64)
                        .ceil() as f32;
                }
                if est >= self.bar as f64 {
                    let baseline = minutes.median().round();
                    cause = Some(TokenCause::Burst {
                        observed: est.round(),
                        baseline,
                        threshold: self.bar as f64,
                    });
                }
            }
        }
        self.incident(t, cause?, p)
    }

    /// One alert per incident: a spike while one is open only extends it.
    fn incident(&mut self, t: Tick, cause: TokenCause, p: &TokenParams) -> Option<TokenSpike> {
        let m = t.minute;
        let new = self.incident_until.begins(m, p.cooldown_minutes);
        new.then_some(TokenSpike {
            cause,
            onset_minute: m,
        })
    }

    /// Tracks requests in flight for gateways that log `request` and
    /// `response` records separately. A completion's size is known only
    /// from its response, stamped when generation ends, which for a prompt
    /// built to exhaust the output cap is a minute or two later; but such
    /// requests pile up unanswered long before. `in_flight_count` requests
    /// still open after `in_flight_secs` (normal answers take seconds) raise
    /// the token spike early. `request` is the record's request hash.
    pub fn on_phase(
        &mut self,
        t: Tick,
        phase: Phase,
        request: u64,
        p: &TokenParams,
    ) -> Option<TokenSpike> {
        if p.in_flight_count == 0 {
            return None;
        }
        let key = request as u32;
        match phase {
            Phase::Exchange => return None,
            Phase::Request => {
                let pend = self.pending.get_or_insert_with(Default::default);
                pend.entries
                    .retain(|e| t.secs.saturating_sub(e.1) < IN_FLIGHT_FORGET_SECS);
                if pend.entries.len() >= IN_FLIGHT_MAX {
                    pend.entries.remove(0);
                }
                pend.entries.push((key, t.secs));
            }
            Phase::Response => {
                let pend = self.pending.as_mut()?;
                if let Some(i) = pend.entries.iter().position(|e| e.0 == key) {
                    pend.entries.remove(i);
                }
                if pend.entries.is_empty() {
                    self.pending = None;
                    return None;
                }
            }
        }
        let pend = self.pending.as_ref()?;
        let ages = pend.entries.iter().map(|e| t.secs.saturating_sub(e.1));
        // Count and oldest age in one pass: no allocation on the hot path.
        let (count, oldest_secs) = ages
            .filter(|&a| a >= p.in_flight_secs && a < IN_FLIGHT_FORGET_SECS)
            .fold((0u32, 0u32), |(n, oldest), a| (n + 1, oldest.max(a)));
        if count < p.in_flight_count {
            return None;
        }
        let cause = TokenCause::InFlight { count, oldest_secs };
        self.incident(t, cause, p)
    }

    /// Remembers a huge completion; returns how many fall in the window.
    fn push_huge(&mut self, now_s: u32, p: &TokenParams) -> u32 {
        let cutoff = now_s.saturating_sub(p.window_secs);
        let mut kept = 0usize;
        for i in 0..self.huge_len as usize {
            if self.huge[i] >= cutoff {
                self.huge[kept] = self.huge[i];
                kept += 1;
            }
        }
        if kept == self.huge.len() {
            self.huge.copy_within(1.., 0);
            kept -= 1;
        }
        self.huge[kept] = now_s;
        self.huge_len = (kept + 1) as u8;
        self.huge_len as u32
    }

    /// Minute of the last record.
    pub fn last_minute(&self) -> u32 {
        self.window.minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::MINUTE_MS;

    fn params() -> TokenParams {
        // The pro tier's defaults: max output 4000.
        TokenParams {
            huge_floor: 3000.0,
            huge_cap: 3600.0,
            huge_z: 3.0,
            huge_count: 3,
            window_secs: 600,
            minute_prior: (1000.0, 1.0),
            burst_z: 4.0,
            min_burst: 24_000.0,
            alpha_min: 1.0 / 60.0,
            size_prior: (400.0, 1.0),
            cooldown_minutes: 15,
            in_flight_secs: 45,
            in_flight_count: 3,
        }
    }

    #[test]
    fn long_generations_piling_up_are_caught_before_their_responses() {
        let p = params();
        let mut s = TokenState::default();
        // Normal split traffic: each request answered within seconds.
        for i in 0..200u64 {
            let t0 = i as i64 * 30_000;
            assert_eq!(s.on_phase(Tick::at(t0), Phase::Request, i, &p), None);
            assert_eq!(
                s.on_phase(Tick::at(t0 + 4_000), Phase::Response, i, &p),
                None
            );
        }
        assert!(s.pending.is_none(), "answered requests are forgotten");
        // An attack: a request every 10 s, none answered for 100 s.
        let onset = 200 * 30_000;
        let mut first = None;
        for i in 0..12u64 {
            let t = onset + i as i64 * 10_000;
            if let Some(sp) = s.on_phase(Tick::at(t), Phase::Request, 1000 + i, &p) {
                first.get_or_insert((t, sp));
            }
        }
        let (t, sp) = first.expect("caught");
        assert!(t - onset <= 70_000, "caught after {} ms", t - onset);
        assert!(matches!(sp.cause, TokenCause::InFlight { count: 3, .. }));
    }

    #[test]
    fn normal_use_is_quiet_and_exhaustion_is_caught_fast() {
        let mut s = TokenState::default();
        let p = params();
        for i in 0..600i64 {
            let c = 150 + (i * 37 % 400) as u64;
            assert_eq!(
                s.on_tokens(Tick::at(i * 20_000), 300 + c, Some(c), &p),
                None,
                "request {i}"
            );
        }
        let onset = 600 * 20_000;
        let mut hits = vec![];
        for i in 0..20i64 {
            let t = onset + i * 5_000;
            if let Some(sp) = s.on_tokens(Tick::at(t), 3900 + 2000, Some(3900), &p) {
                hits.push((t, sp));
            }
        }
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert!(
            hits[0].0 - onset <= 10_000,
            "third huge completion triggers"
        );
        assert!(matches!(hits[0].1.cause, TokenCause::Huge { count: 3, .. }));
    }

    #[test]
    fn a_habitually_long_writer_is_quiet() {
        let mut s = TokenState::default();
        let p = params();
        for i in 0..2000i64 {
            let c = 2600 + (i * 53 % 700) as u64;
            let r = s.on_tokens(Tick::at(i * 60_000), c, Some(c), &p);
            // The prior flags the first few; once learned, long answers are normal.
            if i > 50 {
                assert_eq!(r, None, "request {i}");
            }
        }
    }

    #[test]
    fn token_burst_without_huge_outputs() {
        let mut s = TokenState::default();
        let p = params();
        for m in 0..120i64 {
            assert_eq!(
                s.on_tokens(Tick::at(m * MINUTE_MS), 2000, Some(500), &p),
                None
            );
        }
        let onset = 120 * MINUTE_MS;
        let mut first = None;
        for i in 0..120i64 {
            let t = onset + i * 500;
            if let Some(sp) = s.on_tokens(Tick::at(t), 4000, Some(600), &p) {
                first.get_or_insert((t, sp));
            }
        }
        let (t, sp) = first.expect("burst caught");
        assert!(t - onset < MINUTE_MS);
        assert!(matches!(sp.cause, TokenCause::Burst { .. }));
    }
}
