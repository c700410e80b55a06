//! Distinct things per window, against a learned norm: the statistic of
//! every stage-two detector.
//!
//! A subject (an address, a network, a key, a prompt) counts the distinct
//! accounts (or keys) it sees in a window of `window_minutes` that opens at
//! its first record and closes `window_minutes` later; a window that raised
//! no alert teaches the subject's norm, an exponentially weighted mean of
//! distinct counts per active window. The bar is `max(min, factor x norm)`,
//! where the norm starts at a prior worth `PRIOR_WINDOWS` windows, so a
//! fresh subject is judged by the prior (a data-center address never seen
//! has the norm of one household) and a busy one by what it has carried
//! (an office NAT learns its dozens). Counts are exact but bounded: at most
//! `max_tracked` distinct tags a window, enough to cross any sane bar.
//!
//! One alert per incident: a window alerts at most once, and an incident
//! lasts two windows after each alerting window, so an abuse that goes on
//! window after window raises one alert. Windows that crossed the bar do
//! not teach the norm, so an attack does not become normal, unless the
//! detector judged the crossing benign by its context ([`Distinct::accept`]:
//! an office on an access network at a fresh start crosses the prior's bar
//! and must still learn its dozens).

use serde::{Deserialize, Serialize};

use crate::baseline::Incident;

/// The weight of the prior, in windows.
const PRIOR_WINDOWS: f64 = 4.0;
/// The learning rate of the norm, per window.
const ALPHA: f64 = 0.1;

/// Settings of one distinct count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistinctParams {
    /// Window length, minutes.
    pub window_minutes: u32,
    /// The absolute minimum.
    pub min: u32,
    /// Multiple of the learned norm.
    pub factor: f64,
    /// The norm of a subject never seen.
    pub prior: f64,
    /// Most distinct tags counted in a window.
    pub max_tracked: usize,
}

/// A subject's distinct count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Distinct {
    /// Minute the window opened (0: none yet).
    since: u32,
    /// Distinct tags in the window, each with a flag bit in its top bit
    /// (the caller's: a young account, say).
    tags: Vec<u32>,
    /// Records in the window.
    pub count: u32,
    /// The learned norm (distinct per window).
    norm: f32,
    /// Windows learned.
    windows: u16,
    /// This window crossed its bar.
    alerted: bool,
    /// The open incident was judged benign: its windows teach anyway.
    #[serde(default)]
    accepted: bool,
    /// The open incident, in minutes.
    incident: Incident,
}

/// A crossing of the bar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crossing {
    /// Distinct tags in the window.
    pub distinct: u32,
    /// Of them, flagged.
    pub flagged: u32,
    /// Records in the window.
    pub count: u32,
    /// The learned norm (with its prior).
    pub norm: f64,
    /// The bar crossed.
    pub threshold: f64,
    /// Minute the window opened.
    pub since: u32,
}

impl Distinct {
    /// The norm with its prior blended in.
    pub fn norm(&self, p: &DistinctParams) -> f64 {
        let w = (self.windows as f64).min(1.0 / ALPHA);
        (p.prior * PRIOR_WINDOWS + self.norm as f64 * w) / (PRIOR_WINDOWS + w)
    }

    /// Counts `tag` (`flagged` marks it) at `now_min`; returns a crossing
    /// when this record takes the window over its bar, `gate` allows it,
    /// and no incident is open. `gate` sees the crossing first (a detector
    /// that needs more than a count, such as distinct keys, says no).
    pub fn see(
        &mut self,
        now_min: u32,
        tag: u32,
        flagged: bool,
        p: &DistinctParams,
        gate: impl FnOnce(&Crossing) -> bool,
    ) -> Option<Crossing> {
        self.roll(now_min, p);
        if self.since == 0 {
            self.since = now_min.max(1);
        }
        self.count = self.count.saturating_add(1);
        let tag = tag & 0x7fff_ffff;
        if self.tags.len() < p.max_tracked && !self.tags.iter().any(|t| t & 0x7fff_ffff == tag) {
            self.tags.push(tag | (flagged as u32) << 31);
        }
        if self.alerted {
            return None;
        }
        let norm = self.norm(p);
        let threshold = (p.factor * norm).max(p.min as f64).ceil();
        let distinct = self.tags.len() as u32;
        if (distinct as f64) < threshold.min(p.max_tracked as f64) {
            return None;
        }
        let c = Crossing {
            distinct,
            flagged: self.tags.iter().filter(|t| *t >> 31 == 1).count() as u32,
            count: self.count,
            norm,
            threshold,
            since: self.since,
        };
        if !gate(&c) {
            return None;
        }
        self.alerted = true;
        if !self.incident.begins(now_min, 2 * p.window_minutes) {
            return None;
        }
        self.accepted = false;
        Some(c)
    }

    /// Closes the window if `now_min` is past it, learning from it when it
    /// did not alert.
    fn roll(&mut self, now_min: u32, p: &DistinctParams) {
        if self.since == 0 || now_min < self.since + p.window_minutes {
            return;
        }
        if !self.alerted || self.accepted {
            let n = self.tags.len() as f32;
            self.norm = if self.windows == 0 {
                n
            } else {
                (1.0 - ALPHA as f32) * self.norm + ALPHA as f32 * n
            };
            self.windows = self.windows.saturating_add(1);
        }
        self.since = now_min.max(1);
        self.tags.clear();
        if self.tags.capacity() > 16 {
            self.tags.shrink_to(4);
        }
        self.count = 0;
        self.alerted = false;
    }

    /// The crossing just returned was judged benign: the windows of its
    /// incident teach the norm when they close.
    pub fn accept(&mut self) {
        self.accepted = true;
    }

    /// Minute the window opened (0: never).
    pub fn since(&self) -> u32 {
        self.since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: DistinctParams = DistinctParams {
        window_minutes: 30,
        min: 8,
        factor: 3.0,
        prior: 2.0,
        max_tracked: 128,
    };

    fn yes(_: &Crossing) -> bool {
        true
    }

    #[test]
    fn a_fresh_subject_is_judged_by_the_prior_a_busy_one_by_its_norm() {
        // A fresh address: 25 accounts in a window cross at the minimum.
        let mut d = Distinct::default();
        let hit = (0..25u32).find_map(|u| d.see(1000, u, false, &P, yes));
        assert_eq!(hit.map(|c| c.distinct), Some(8));
        // An office: 20 accounts a window for a day learns its norm and is
        // quiet (its crossings of the prior's bar judged benign).
        let mut d = Distinct::default();
        let mut alerts = 0;
        for w in 0..48u32 {
            for u in 0..20u32 {
                if d.see(1000 + 30 * w, (w * 7 + u) % 40, false, &P, yes)
                    .is_some()
                {
                    alerts += 1;
                    d.accept();
                }
            }
        }
        assert_eq!(alerts, 1, "the first window crosses the prior, once");
        assert!(d.norm(&P) > 14.0, "{}", d.norm(&P));
        for u in 0..40u32 {
            assert_eq!(d.see(1000 + 30 * 48, u, false, &P, yes), None, "{u}");
        }
        // Three times its norm is not.
        let hit = (100..200u32).find_map(|u| d.see(1000 + 30 * 48, u, false, &P, yes));
        assert!(hit.is_some());
    }

    #[test]
    fn an_abuse_going_on_is_one_incident_and_does_not_become_normal() {
        let mut d = Distinct::default();
        let mut alerts = vec![];
        for w in 0..10u32 {
            for u in 0..30u32 {
                if let Some(c) = d.see(1000 + 30 * w, w * 100 + u, true, &P, yes) {
                    alerts.push((w, c.flagged));
                }
            }
        }
        assert_eq!(alerts, vec![(0, 8)]);
        assert!(
            d.norm(&P) < 2.5,
            "alerting windows teach nothing: {}",
            d.norm(&P)
        );
    }

    #[test]
    fn the_gate_holds_a_crossing_back() {
        let mut d = Distinct::default();
        for u in 0..20u32 {
            assert_eq!(
                d.see(1000, u, false, &P, |c| c.distinct >= 12)
                    .map(|c| c.distinct),
                (u == 11).then_some(12)
            );
        }
    }
}
