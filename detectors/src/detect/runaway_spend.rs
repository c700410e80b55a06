//! Runaway spend: a user spending at a pace that empties the daily budget
//! within the hour.
//!
//! Budget alerts say where spend *is*; this detector says where it is
//! *going*, minutes after a drain starts rather than when half the money
//! is gone. The statistic is spend in a sliding minute (micro-dollars). It
//! fires when that minute's spend is at least `daily budget / pace_minutes`
//! (at this pace the whole budget lasts `pace_minutes`) *and* at least
//! `burst_factor ×` the user's learned spend per active minute (a
//! Gamma-Poisson-style rate with a prior of the budget spread over eight
//! active hours), so a user who always spends fast against a generous
//! budget is not paged. A runaway is *sustained* when fast minutes have
//! gone on for half of `sustain_minutes` and the spend of the last
//! `sustain_minutes` keeps the pace too: one expensive request makes a fast
//! minute, a drain makes fast minutes. The pace is of requests served:
//! the engine leaves refused ones (status 400 and up) out of it, since a
//! retry storm, or a gateway already limiting the account, is not a drain
//! (the budget still counts what they were charged). One alert per
//! incident (the engine weighs the record's context for severity, and
//! alerts again within an incident only when the severity rises).

use serde::{Deserialize, Serialize};

use crate::baseline::{
    Escalation, Raise, RateBaseline, RatePrior, SlidingMinute, SlidingSum, Tick,
};

/// Settings resolved for one user's budget.
#[derive(Clone, Copy, Debug)]
pub struct PaceParams {
    /// Spend per minute that empties the budget within the pace window.
    pub pace_micros: f64,
    /// Prior of spend per active minute.
    pub prior: RatePrior,
    /// Per-active-minute decay.
    pub decay: f64,
    /// Minimum multiple of the learned spend rate.
    pub burst_factor: f64,
    /// Incident cooldown, minutes.
    pub cooldown_minutes: u32,
    /// A pace is sustained when it held over this many minutes.
    pub sustain_minutes: u32,
}

/// A user's spend-pace state (32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpendPace {
    window: SlidingMinute,
    rate: RateBaseline,
    bar: f32,
    #[serde(default)]
    incident: Escalation,
    /// Spend over the last `sustain_minutes`.
    #[serde(default)]
    recent: SlidingSum,
    /// First and last minute of the current run of fast minutes.
    #[serde(default)]
    streak: (u32, u32),
}

/// A detected runaway.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Runaway {
    /// Spend in the sliding minute, micro-dollars.
    pub observed_micros: f64,
    /// Learned spend per active minute, micro-dollars.
    pub baseline_micros: f64,
    /// The bar crossed, micro-dollars.
    pub threshold_micros: f64,
    /// Minute of the finding.
    pub onset_minute: u32,
    /// Whether the pace held over the last `sustain_minutes`, not just a minute.
    pub sustained: bool,
}

impl SpendPace {
    /// Counts a record's cost at `t`; returns the runaway while the sliding
    /// minute is over the bar (see [`SpendPace::escalates`] for alerts).
    #[inline]
    pub fn on_spend(&mut self, t: Tick, micros: u64, p: &PaceParams) -> Option<Runaway> {
        if let Some(closed) = self.window.advance(t) {
            if closed > 0 && (self.bar == 0.0 || (closed as f32) < self.bar) {
                self.rate.observe(closed as f64, p.decay, p.prior);
            }
            self.bar = 0.0;
        }
        let amount = micros.min(u32::MAX as u64) as u32;
        self.window.add(amount);
        let sustain_s = p.sustain_minutes.max(1) * 60;
        self.recent.add(t.secs, sustain_s, amount);
        let est = self.window.estimate(t);
        if est < p.pace_micros {
            return None;
        }
        if self.bar == 0.0 {
            self.bar = (p.burst_factor * self.rate.mean(p.prior))
                .max(p.pace_micros)
                .ceil() as f32;
        }
        if est < self.bar as f64 {
            return None;
        }
        let m = t.minute;
        if self.streak.0 == 0 || m > self.streak.1 + p.cooldown_minutes {
            self.streak.0 = m;
        }
        self.streak.1 = m;
        let minutes = p.sustain_minutes.max(1);
        Some(Runaway {
            observed_micros: est,
            baseline_micros: self.rate.mean(p.prior),
            threshold_micros: self.bar as f64,
            onset_minute: m,
            // Fast minutes for half the span, and the span's spend at pace.
            sustained: m >= self.streak.0 + minutes / 2
                && self.recent.estimate(t.secs, sustain_s) >= minutes as f64 * p.pace_micros,
        })
    }

    /// Spend per minute over the last `sustain_minutes` at `t`, micro-dollars.
    pub fn sustained_micros(&self, t: Tick, p: &PaceParams) -> f64 {
        let minutes = p.sustain_minutes.max(1);
        self.recent.estimate(t.secs, minutes * 60) / minutes as f64
    }

    /// The learned spend per active minute, micro-dollars.
    pub fn learned_micros(&self, p: &PaceParams) -> f64 {
        self.rate.mean(p.prior)
    }

    /// Whether a runaway of severity `level` at minute `m` is a new alert:
    /// one that opens an incident, or one more severe than any in it.
    pub fn escalates(&mut self, m: u32, level: u8, p: &PaceParams) -> Option<Raise> {
        self.incident.alerts(m, p.cooldown_minutes, level)
    }

    /// Whether an incident of this detector is open at minute `m`.
    pub fn in_incident(&self, m: u32) -> bool {
        self.incident.is_open(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::decay_for_half_life;
    use crate::time::MINUTE_MS;

    /// A $50/day budget: the pace bar is $50/60 a minute.
    fn params() -> PaceParams {
        PaceParams {
            pace_micros: 50e6 / 60.0,
            prior: RatePrior {
                rate: 50e6 / 480.0,
                minutes: 10.0,
            },
            decay: decay_for_half_life(60.0),
            burst_factor: 4.0,
            cooldown_minutes: 30,
            sustain_minutes: 10,
        }
    }

    #[test]
    fn normal_spend_is_quiet_and_a_drain_is_caught_in_its_first_minute() {
        let mut s = SpendPace::default();
        for m in 0..600i64 {
            // $0.02 a request, 5 a minute: $0.10/min.
            for i in 0..5 {
                assert_eq!(
                    s.on_spend(Tick::at(m * MINUTE_MS + i * 12_000), 20_000, &params()),
                    None
                );
            }
        }
        // A drain: $1.25 a minute (the budget gone in 40 minutes), $0.25 every 12 s.
        let onset = 600 * MINUTE_MS;
        let mut hits = vec![];
        for i in 0..200i64 {
            let t = onset + i * 12_000;
            if let Some(r) = s.on_spend(Tick::at(t), 250_000, &params()) {
                if s.escalates(r.onset_minute, 0, &params()).is_some() {
                    hits.push((t, r));
                }
            }
        }
        assert_eq!(hits.len(), 1);
        assert!(
            !hits[0].1.sustained,
            "one minute is not yet a sustained pace"
        );
        let later = s.on_spend(Tick::at(onset + 200 * 12_000), 250_000, &params());
        assert!(later.is_some_and(|r| r.sustained), "{later:?}");
        assert!(
            hits[0].0 - onset < MINUTE_MS,
            "caught after {} ms",
            hits[0].0 - onset
        );
    }
}
