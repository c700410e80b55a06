//! Request spikes, per user and per key.
//!
//! The statistic is the request count in a sliding minute (see
//! [`SlidingMinute`]). The expected count is learned per subject as a
//! Gamma-Poisson rate per *active* minute (minutes with no requests are not
//! evidence of a lower rate for bursty, session-shaped traffic), starting
//! from a prior of `max(prior_requests, prior_fraction × tier requests/min)` worth
//! `prior_minutes` minutes, and forgetting with a half-life.
//!
//! A sliding minute is a spike when all three hold:
//! 1. it is at least `max(min_requests, min_fraction_of_tier × tier rpm)`:
//!    a quiet user's three requests are never a spike;
//! 2. it is at least `burst_factor ×` the learned rate: a legitimate 2-3x
//!    batch burst does not page anyone;
//! 3. it is in the upper `p_value` tail of the negative-binomial posterior
//!    predictive: with little evidence the bar is higher.
//!
//! The bar is computed once per subject-minute, and only when the cheap
//! volume check passes. Minutes over the bar do not feed the baseline, so a
//! flood does not teach the detector that floods are normal.
//!
//! Size says a minute is unusual, not whose doing it is: the engine weighs
//! the record's context (see `context`) for severity and action, and
//! [`RateState::escalates`] keeps one alert per incident (an incident ends
//! after `cooldown_minutes` without a spike), alerting again within it
//! only when the severity rises.

use serde::{Deserialize, Serialize};

use crate::baseline::{
    Escalation, QuantileCache, Raise, RateBaseline, RatePrior, SlidingMinute, Tick,
};

/// Settings resolved for one tier.
#[derive(Clone, Copy, Debug)]
pub struct RateParams {
    /// Cold-start prior.
    pub prior: RatePrior,
    /// Per-active-minute decay of the baseline.
    pub decay: f64,
    /// Minimum multiple of the learned rate.
    pub burst_factor: f64,
    /// Tail probability.
    pub p_value: f64,
    /// Minimum spike size, requests per minute.
    pub min_requests: f64,
    /// Incident cooldown, minutes.
    pub cooldown_minutes: u32,
}

/// A subject's request-rate state (28 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateState {
    window: SlidingMinute,
    base: RateBaseline,
    /// This minute's bar; 0 until computed (it is computed only for a minute
    /// that passes the volume and burst-factor bars, so a minute with no bar
    /// was below them and counts as evidence of normal).
    bar: f32,
    /// The open incident.
    #[serde(default)]
    incident: Escalation,
}

/// A detected spike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spike {
    /// Requests in the sliding minute.
    pub observed: f64,
    /// Learned requests per active minute.
    pub baseline: f64,
    /// The bar crossed.
    pub threshold: f64,
    /// Minute of the spike (part of the alert id).
    pub onset_minute: u32,
}

impl RateState {
    /// Counts one request at `t`; returns the spike while the sliding
    /// minute is over the bar (see [`RateState::escalates`] for alerts).
    #[inline]
    pub fn on_request(
        &mut self,
        t: Tick,
        p: &RateParams,
        quantiles: &mut QuantileCache,
    ) -> Option<Spike> {
        if let Some(closed) = self.window.advance(t) {
            // A minute over the bar is not evidence of normal.
            if closed > 0 && (self.bar == 0.0 || (closed as f32) < self.bar) {
                self.base.observe(closed as f64, p.decay, p.prior);
            }
            self.bar = 0.0;
        }
        self.window.add(1);
        let est = self.window.estimate(t);
        if est < p.min_requests {
            return None;
        }
        if self.bar == 0.0 {
            // The cheap bars first: the tail quantile (an incomplete beta
            // function) is only worth computing for a minute that passes them.
            let floor = (p.burst_factor * self.base.mean(p.prior)).max(p.min_requests);
            if est < floor {
                return None;
            }
            let q = quantiles.upper(&self.base, p.prior, p.p_value);
            self.bar = q.max(floor).ceil() as f32;
        }
        if est < self.bar as f64 {
            return None;
        }
        Some(Spike {
            observed: est.round(),
            baseline: self.base.mean(p.prior),
            threshold: self.bar as f64,
            onset_minute: t.minute,
        })
    }

    /// Whether a spike of severity `level` at minute `m` is a new alert:
    /// one that opens an incident, or one more severe than any in it.
    pub fn escalates(&mut self, m: u32, level: u8, p: &RateParams) -> Option<Raise> {
        self.incident.alerts(m, p.cooldown_minutes, level)
    }

    /// Whether an incident of this detector is open at minute `m`.
    pub fn in_incident(&self, m: u32) -> bool {
        self.incident.is_open(m)
    }

    /// Minutes of evidence behind the learned rate.
    pub fn evidence(&self) -> f64 {
        self.base.evidence()
    }

    /// Minute of the last request.
    pub fn last_minute(&self) -> u32 {
        self.window.minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::decay_for_half_life;
    use crate::time::MINUTE_MS;

    fn params() -> RateParams {
        RateParams {
            prior: RatePrior {
                rate: 15.0,
                minutes: 10.0,
            },
            decay: decay_for_half_life(60.0),
            burst_factor: 4.0,
            p_value: 1e-6,
            min_requests: 45.0,
            cooldown_minutes: 15,
        }
    }

    /// Feeds `per_min` evenly spaced requests a minute for `minutes` from `start`; returns spikes.
    fn feed(s: &mut RateState, start: i64, minutes: i64, per_min: i64) -> Vec<(i64, Spike)> {
        let mut out = vec![];
        for m in 0..minutes {
            for i in 0..per_min {
                let t = start + m * MINUTE_MS + i * MINUTE_MS / per_min;
                if let Some(sp) =
                    s.on_request(Tick::at(t), &params(), &mut QuantileCache::default())
                {
                    if s.escalates(sp.onset_minute, 0, &params()).is_some() {
                        out.push((t, sp));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_steady_user_and_a_3x_burst_are_quiet() {
        let mut s = RateState::default();
        assert!(feed(&mut s, 0, 120, 10).is_empty());
        assert!(
            feed(&mut s, 120 * MINUTE_MS, 15, 30).is_empty(),
            "3x burst paged"
        );
    }

    #[test]
    fn a_flood_alerts_once_within_a_minute() {
        let mut s = RateState::default();
        assert!(feed(&mut s, 0, 120, 10).is_empty());
        let onset = 120 * MINUTE_MS;
        let spikes = feed(&mut s, onset, 10, 200);
        assert_eq!(spikes.len(), 1, "one alert per incident");
        let (t, sp) = spikes[0];
        assert!(t - onset < MINUTE_MS, "caught after {} ms", t - onset);
        assert!(sp.observed >= sp.threshold && sp.threshold >= 40.0);
        assert!(
            (sp.baseline - 10.0).abs() < 2.0,
            "flood did not poison the baseline: {}",
            sp.baseline
        );
        // After a quiet spell longer than the cooldown, a new flood is a new incident.
        feed(&mut s, onset + 10 * MINUTE_MS, 30, 10);
        assert_eq!(feed(&mut s, onset + 40 * MINUTE_MS, 3, 200).len(), 1);
    }

    #[test]
    fn a_new_quiet_user_is_not_a_spike() {
        let mut s = RateState::default();
        assert!(feed(&mut s, 0, 5, 3).is_empty());
    }
}
