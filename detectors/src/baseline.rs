//! Learned baselines and sliding windows: the statistics every detector shares.
//!
//! - [`RateBaseline`]: a count per active minute as a Gamma-Poisson model with
//!   exponential forgetting. The tier gives a Gamma prior worth a few minutes
//!   of evidence (the cold start); each active minute updates the posterior,
//!   older minutes, and the prior with them, fading with a half-life, so an
//!   account's own rate replaces its tier's. The posterior predictive of the
//!   next minute's count is negative binomial, whose upper tail gives a
//!   significance threshold that is naturally wider while evidence is thin.
//! - [`ShareBaseline`]: a learned share of trials that are "hits" (answers
//!   at the output cap, say) as a Beta-Binomial model with forgetting, whose
//!   upper tail says how surprising k hits in the last n trials are.
//! - [`LogBaseline`]: exponentially weighted mean and variance of `ln(1+x)`,
//!   for heavy-tailed sizes such as completion tokens.
//! - [`SlidingMinute`]: the two-bucket sliding-window estimate (current minute
//!   plus the previous minute weighted by how much of it still overlaps), so a
//!   burst straddling a minute boundary is seen whole.

use serde::{Deserialize, Serialize};
use statrs::distribution::{DiscreteCDF, NegativeBinomial};

use crate::time::MINUTE_MS;

/// Minute index (Unix minutes) of an instant; instants before 1970 map to 0.
#[inline]
pub fn minute_of(ms: i64) -> u32 {
    (ms.max(0) / MINUTE_MS) as u32
}

/// An instant as the detectors read it: derived once per record, because
/// integer division is not free and every detector needs the minute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tick {
    /// Unix milliseconds.
    pub ms: i64,
    /// Unix minutes.
    pub minute: u32,
    /// Unix seconds.
    pub secs: u32,
    /// How far into its minute the instant is, from 0 to 1.
    pub into_minute: f64,
}

impl Tick {
    /// The tick of `ms` (instants before 1970 read as 1970).
    #[inline]
    pub fn at(ms: i64) -> Tick {
        let ms = ms.max(0);
        Tick {
            ms,
            minute: (ms / MINUTE_MS) as u32,
            secs: (ms / 1000) as u32,
            into_minute: (ms % MINUTE_MS) as f64 / MINUTE_MS as f64,
        }
    }
}

/// One alert per incident: the rule every detector shares. A detection
/// while the incident is open only extends it; one after it lapsed opens a
/// new one. Times are in the detector's unit (minutes or seconds); 0 is
/// "never".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Incident(u32);

impl Incident {
    /// Records a detection at `now` that keeps the incident open `lasts`
    /// more units; true when it opens a new incident (and should alert).
    #[inline]
    pub fn begins(&mut self, now: u32, lasts: u32) -> bool {
        let open = self.0 != 0 && now <= self.0;
        self.0 = now + lasts;
        !open
    }

    /// Whether the incident is still open at `now`.
    #[inline]
    pub fn is_open(&self, now: u32) -> bool {
        self.0 != 0 && now <= self.0
    }
}

/// Decay per step for a half-life of `half_life` steps.
pub fn decay_for_half_life(half_life: f64) -> f64 {
    0.5f64.powf(1.0 / half_life)
}

/// Rate per active minute, learned as a Gamma-Poisson posterior with forgetting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateBaseline {
    /// Decayed sum of observed per-minute counts.
    pub sum: f32,
    /// Decayed number of observed minutes.
    pub weight: f32,
}

/// The prior of a [`RateBaseline`]: a rate and its weight in minutes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatePrior {
    /// Prior rate per active minute.
    pub rate: f64,
    /// Prior weight, in minutes of evidence.
    pub minutes: f64,
}

impl RateBaseline {
    /// Adds one active minute's count, fading the past by `decay`. The
    /// first observation starts from the prior, which then fades like any
    /// other evidence: after a few half-lives the rate is the subject's own.
    #[inline]
    pub fn observe(&mut self, count: f64, decay: f64, prior: RatePrior) {
        let (sum, weight) = self.posterior(prior);
        self.sum = (sum * decay + count) as f32;
        self.weight = (weight * decay + 1.0) as f32;
    }

    /// Posterior shape and rate (Gamma(a, b)): the prior until the first
    /// observation.
    #[inline]
    pub fn posterior(&self, prior: RatePrior) -> (f64, f64) {
        if self.weight == 0.0 {
            (prior.rate * prior.minutes, prior.minutes)
        } else {
            (self.sum as f64, self.weight as f64)
        }
    }

    /// Decayed minutes of evidence behind the rate (0 before the first).
    #[inline]
    pub fn evidence(&self) -> f64 {
        self.weight as f64
    }

    /// Posterior mean rate per active minute.
    #[inline]
    pub fn mean(&self, prior: RatePrior) -> f64 {
        let (a, b) = self.posterior(prior);
        a / b
    }

    /// Smallest count `k` with `P(X >= k) <= p_value` under the posterior
    /// predictive (negative binomial with r = a, success probability b/(b+1)).
    pub fn upper_quantile(&self, prior: RatePrior, p_value: f64) -> f64 {
        let (a, b) = self.posterior(prior);
        match NegativeBinomial::new(a.max(1e-6), b / (b + 1.0)) {
            // inverse_cdf gives the smallest x with P(X <= x) >= 1 - p, so P(X >= x + 1) <= p.
            Ok(nb) => nb.inverse_cdf(1.0 - p_value) as f64 + 1.0,
            Err(_) => f64::INFINITY,
        }
    }
}

/// Memoized negative-binomial tail quantiles, shared by every subject of an
/// engine: the quantile is an incomplete beta function (microseconds), and
/// thousands of subjects have nearly the same posterior. The posterior is
/// rounded to a 1% grid on the log scale, its shape up and its rate down
/// (a slightly higher mean: a slightly higher, never lower, bar), so the
/// result depends only on the posterior, never on what was cached before.
#[derive(Clone, Debug, Default)]
pub struct QuantileCache {
    map: std::collections::HashMap<(i32, i32, u64), f32, crate::StableBuild>,
}

/// Most quantiles kept before the cache starts over.
const QUANTILE_CACHE_MAX: usize = 1 << 16;

impl QuantileCache {
    /// [`RateBaseline::upper_quantile`] of `base`, on the rounded posterior.
    pub fn upper(&mut self, base: &RateBaseline, prior: RatePrior, p_value: f64) -> f64 {
        let (a, b) = base.posterior(prior);
        let ka = (a.max(1e-6).ln() * 100.0).ceil() as i32;
        let kb = (b.max(1e-6).ln() * 100.0).floor() as i32;
        let key = (ka, kb, p_value.to_bits());
        if let Some(&q) = self.map.get(&key) {
            return q as f64;
        }
        if self.map.len() >= QUANTILE_CACHE_MAX {
            self.map.clear();
        }
        let rounded = RateBaseline {
            sum: (ka as f64 / 100.0).exp() as f32,
            weight: (kb as f64 / 100.0).exp() as f32,
        };
        // `rounded` has weight > 0, so its posterior is itself.
        let q = rounded.upper_quantile(prior, p_value);
        self.map.insert(key, q as f32);
        q
    }
}

/// A learned share of hits among trials, with forgetting: Beta-Binomial.
///
/// The prior is a share worth a number of trials; unlike a rate's prior it
/// does not fade, so however long an account has never hit the cap, a few
/// hits in a row stay merely unlikely rather than impossible (real use
/// changes; a share of exactly zero would page on the first change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShareBaseline {
    /// Decayed hits.
    pub hits: f32,
    /// Decayed trials.
    pub trials: f32,
}

/// The prior of a [`ShareBaseline`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharePrior {
    /// Prior share of hits.
    pub share: f64,
    /// Prior weight, in trials.
    pub trials: f64,
}

impl ShareBaseline {
    /// Adds one trial, fading the past by `decay`.
    #[inline]
    pub fn observe(&mut self, hit: bool, decay: f64) {
        self.hits = (self.hits as f64 * decay + hit as u8 as f64) as f32;
        self.trials = (self.trials as f64 * decay + 1.0) as f32;
    }

    /// Posterior Beta(α, β).
    #[inline]
    pub fn posterior(&self, prior: SharePrior) -> (f64, f64) {
        let hits = self.hits as f64;
        let misses = (self.trials as f64 - hits).max(0.0);
        (
            prior.share * prior.trials + hits,
            (1.0 - prior.share) * prior.trials + misses,
        )
    }

    /// Posterior mean share.
    #[inline]
    pub fn mean(&self, prior: SharePrior) -> f64 {
        let (a, b) = self.posterior(prior);
        a / (a + b)
    }

    /// `P(K >= k)` for `K` hits in `n` new trials under the posterior
    /// predictive (Beta-Binomial). Costs O(n - k) after one log-gamma
    /// evaluation: call it only when `k` is already notable.
    pub fn upper_tail(&self, prior: SharePrior, k: u32, n: u32) -> f64 {
        if k == 0 {
            return 1.0;
        }
        if k > n {
            return 0.0;
        }
        let (a, b) = self.posterior(prior);
        let (kf, nf) = (k as f64, n as f64);
        // log P(K = k) = ln C(n,k) + ln B(k+a, n-k+b) - ln B(a, b)
        let ln_beta = |x: f64, y: f64| ln_gamma(x) + ln_gamma(y) - ln_gamma(x + y);
        let ln_choose = ln_gamma(nf + 1.0) - ln_gamma(kf + 1.0) - ln_gamma(nf - kf + 1.0);
        let mut term = (ln_choose + ln_beta(kf + a, nf - kf + b) - ln_beta(a, b)).exp();
        let mut sum = term;
        for j in k..n {
            let j = j as f64;
            // P(K = j+1) / P(K = j)
            term *= (nf - j) / (j + 1.0) * (j + a) / (nf - j - 1.0 + b);
            sum += term;
        }
        sum.min(1.0)
    }
}

fn ln_gamma(x: f64) -> f64 {
    statrs::function::gamma::ln_gamma(x)
}

/// A sum over a sliding window of any length: the current window plus
/// the share of the previous one that still overlaps (the two-bucket
/// estimate [`SlidingMinute`] makes for minutes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlidingSum {
    /// Start of the current bucket, Unix seconds.
    pub since: u32,
    /// Sum in the current bucket.
    pub cur: u32,
    /// Sum in the bucket before it.
    pub prev: u32,
}

impl SlidingSum {
    /// Adds `amount` at `now_s` (windows of `len_s` seconds).
    #[inline]
    pub fn add(&mut self, now_s: u32, len_s: u32, amount: u32) {
        self.roll(now_s, len_s);
        self.cur = self.cur.saturating_add(amount);
    }

    /// The estimate of the sum in the `len_s` seconds before `now_s`.
    #[inline]
    pub fn estimate(&self, now_s: u32, len_s: u32) -> f64 {
        let mut w = *self;
        w.roll(now_s, len_s);
        let into = (now_s.saturating_sub(w.since) as f64 / len_s.max(1) as f64).min(1.0);
        w.cur as f64 + w.prev as f64 * (1.0 - into)
    }

    fn roll(&mut self, now_s: u32, len_s: u32) {
        let len_s = len_s.max(1);
        if now_s < self.since.saturating_add(len_s) {
            return;
        }
        let steps = (now_s - self.since) / len_s;
        self.prev = if steps == 1 { self.cur } else { 0 };
        self.cur = 0;
        self.since += steps * len_s;
    }
}

/// One alert per incident, with escalation: a finding while the incident
/// is open alerts again only when it is more severe than any so far (an
/// info-level batch job that turns out to come from a stolen key is news).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    /// The incident's end (the detector's unit; 0: none).
    pub until: Incident,
    /// The highest level alerted in it.
    pub level: u8,
}

/// Why a finding alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raise {
    /// It opens an incident.
    New,
    /// It is more severe than anything the open incident alerted.
    Higher,
}

impl Escalation {
    /// Records a finding of `level` at `now` that keeps the incident open
    /// `lasts` more units; says whether and why it alerts.
    #[inline]
    pub fn alerts(&mut self, now: u32, lasts: u32, level: u8) -> Option<Raise> {
        if self.until.begins(now, lasts) {
            self.level = level;
            return Some(Raise::New);
        }
        if level > self.level {
            self.level = level;
            return Some(Raise::Higher);
        }
        None
    }

    /// Whether the incident is open at `now`.
    #[inline]
    pub fn is_open(&self, now: u32) -> bool {
        self.until.is_open(now)
    }
}

/// Exponentially weighted mean and variance of `ln(1 + x)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogBaseline {
    /// Mean of `ln(1+x)`.
    pub mean: f32,
    /// Variance of `ln(1+x)`.
    pub var: f32,
    /// Observations so far, saturating (drives the learning rate early on).
    pub n: u32,
}

impl LogBaseline {
    /// A baseline starting at a prior median and log-scale standard deviation.
    pub fn with_prior(median: f64, sd: f64) -> Self {
        LogBaseline {
            mean: median.ln_1p() as f32,
            var: (sd * sd) as f32,
            n: 0,
        }
    }

    /// Adds one observation. The prior counts as `prior_weight` observations
    /// (so two quiet minutes cannot shrink the spread to nothing): the
    /// learning rate is `1/(n + prior_weight + 1)` until it reaches `alpha_min`.
    #[inline]
    pub fn observe(&mut self, x: f64, alpha_min: f64, prior_weight: f64) {
        let y = x.ln_1p();
        let alpha = (1.0 / (self.n as f64 + prior_weight + 1.0)).max(alpha_min);
        let d = y - self.mean as f64;
        let mean = self.mean as f64 + alpha * d;
        let var = (1.0 - alpha) * (self.var as f64 + alpha * d * d);
        self.mean = mean as f32;
        self.var = var as f32;
        self.n = self.n.saturating_add(1);
    }

    /// The value `z` standard deviations above the mean, back on the original scale.
    #[inline]
    pub fn upper(&self, z: f64) -> f64 {
        (self.mean as f64 + z * (self.var as f64).max(0.0).sqrt()).exp_m1()
    }

    /// Like [`LogBaseline::upper`], but for the *next* observation given
    /// how little may have been seen: the mean and spread are estimates, so
    /// the bar is the Student-t predictive one, with `n + prior_weight`
    /// observations behind it (at most the `2/alpha_min - 1` an
    /// exponentially weighted estimate is worth). A baseline learned from a
    /// dozen prompts stretches a 2.5-sd bar to about 2.8; a long-learned one
    /// keeps it. The t quantile is the Cornish-Fisher expansion from the
    /// normal one (Abramowitz and Stegun 26.7.5), within 1% from 8 degrees
    /// of freedom (the fewest it uses), with no special functions on the hot path.
    #[inline]
    pub fn upper_predictive(&self, z: f64, prior_weight: f64, alpha_min: f64) -> f64 {
        let n = (self.n as f64 + prior_weight + 1.0).min(2.0 / alpha_min - 1.0);
        let nu = (n - 1.0).max(8.0);
        let (z2, z3) = (z * z, z * z * z);
        let (z5, z7) = (z3 * z2, z3 * z2 * z2);
        let t = z
            + (z3 + z) / (4.0 * nu)
            + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * nu * nu)
            + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * nu * nu * nu);
        let sd = (self.var as f64).max(0.0).sqrt() * (1.0 + 1.0 / n).sqrt();
        (self.mean as f64 + t * sd).exp_m1()
    }

    /// The learned median, on the original scale.
    #[inline]
    pub fn median(&self) -> f64 {
        (self.mean as f64).exp_m1()
    }
}

/// Two-bucket sliding-minute counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlidingMinute {
    /// Minute index of the current bucket.
    pub minute: u32,
    /// Amount counted in the current minute.
    pub cur: u32,
    /// Amount counted in the minute before it (0 when that minute was idle).
    pub prev: u32,
}

impl SlidingMinute {
    /// Moves to the minute of `t`. Returns the amount of the minute that
    /// closed, when one did. Late instants count in the current minute.
    #[inline]
    pub fn advance(&mut self, t: Tick) -> Option<u32> {
        let m = t.minute;
        if m <= self.minute {
            return None;
        }
        let closed = self.cur;
        self.prev = if m == self.minute + 1 { self.cur } else { 0 };
        self.cur = 0;
        self.minute = m;
        Some(closed)
    }

    /// Adds `amount` to the current minute.
    #[inline]
    pub fn add(&mut self, amount: u32) {
        self.cur = self.cur.saturating_add(amount);
    }

    /// The sliding-minute estimate at `t`: the current minute plus the
    /// share of the previous minute that still lies within the last 60 s.
    #[inline]
    pub fn estimate(&self, t: Tick) -> f64 {
        let into = if t.minute == self.minute {
            t.into_minute
        } else {
            1.0
        };
        self.cur as f64 + self.prev as f64 * (1.0 - into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PRIOR: RatePrior = RatePrior {
        rate: 2.0,
        minutes: 10.0,
    };

    #[test]
    fn cold_start_is_the_prior_and_evidence_moves_it() {
        let mut b = RateBaseline::default();
        assert!((b.mean(PRIOR) - 2.0).abs() < 1e-9);
        let d = decay_for_half_life(60.0);
        for _ in 0..500 {
            b.observe(20.0, d, PRIOR);
        }
        // The prior fades with the evidence: the rate is the subject's own.
        let m = b.mean(PRIOR);
        assert!((19.9..=20.0).contains(&m), "{m}");
    }

    #[test]
    fn quantile_is_wide_when_evidence_is_thin() {
        let thin = RateBaseline::default();
        let mut thick = RateBaseline::default();
        for _ in 0..1000 {
            thick.observe(2.0, 1.0, PRIOR);
        }
        let q_thin = thin.upper_quantile(PRIOR, 1e-6);
        let q_thick = thick.upper_quantile(PRIOR, 1e-6);
        assert!(q_thin > q_thick, "{q_thin} vs {q_thick}");
        // Poisson(2) has P(X >= 12) ~ 3.5e-7, so the threshold sits near there.
        assert!((10.0..=14.0).contains(&q_thick), "{q_thick}");
    }

    #[test]
    fn sliding_minute_weights_the_previous_minute() {
        let mut w = SlidingMinute::default();
        w.advance(Tick::at(0));
        w.add(60);
        assert_eq!(w.advance(Tick::at(MINUTE_MS + 15_000)), Some(60));
        w.add(10);
        assert!((w.estimate(Tick::at(MINUTE_MS + 15_000)) - (10.0 + 45.0)).abs() < 1e-9);
        assert_eq!(w.advance(Tick::at(3 * MINUTE_MS)), Some(10));
        assert_eq!(
            w.prev, 0,
            "an idle minute in between clears the previous bucket"
        );
    }

    #[test]
    fn cached_quantiles_are_never_below_the_exact_ones_and_close() {
        let mut cache = QuantileCache::default();
        let d = decay_for_half_life(60.0);
        for rate in [0.3, 2.0, 7.5, 40.0, 300.0] {
            let mut b = RateBaseline::default();
            for i in 0..200 {
                b.observe(rate * (1.0 + (i % 5) as f64 / 10.0), d, PRIOR);
                let exact = b.upper_quantile(PRIOR, 1e-6);
                let cached = cache.upper(&b, PRIOR, 1e-6);
                assert!(
                    cached >= exact && cached <= exact * 1.05 + 1.0,
                    "{rate}: {cached} vs {exact}"
                );
                assert_eq!(
                    cache.upper(&b, PRIOR, 1e-6),
                    cached,
                    "the same posterior, the same bar"
                );
            }
        }
    }

    #[test]
    fn share_tail_matches_a_direct_sum_and_learns() {
        let prior = SharePrior {
            share: 0.05,
            trials: 20.0,
        };
        let fresh = ShareBaseline::default();
        // Beta(1, 19): P(3 of 3) = (1*2*3)/(20*21*22).
        let p = fresh.upper_tail(prior, 3, 3);
        assert!((p - 6.0 / 9240.0).abs() < 1e-9, "{p}");
        assert_eq!(fresh.upper_tail(prior, 0, 5), 1.0);
        assert_eq!(fresh.upper_tail(prior, 6, 5), 0.0);
        // Tail over all k from 0 sums to 1.
        let all: f64 = (0..=10)
            .map(|k| fresh.upper_tail(prior, k, 10) - fresh.upper_tail(prior, k + 1, 10))
            .sum();
        assert!((all - 1.0).abs() < 1e-9, "{all}");
        // An account whose answers hit the cap a third of the time finds
        // three in a row ordinary; one that never does finds them rare.
        let d = decay_for_half_life(200.0);
        let (mut hitter, mut never) = (ShareBaseline::default(), ShareBaseline::default());
        for i in 0..1000 {
            hitter.observe(i % 3 == 0, d);
            never.observe(false, d);
        }
        assert!(hitter.upper_tail(prior, 3, 3) > 0.01);
        assert!(never.upper_tail(prior, 3, 3) < 1e-5);
        assert!((hitter.mean(prior) - 0.33).abs() < 0.03);
    }

    #[test]
    fn sliding_sum_weights_the_previous_window() {
        // Buckets are aligned to multiples of the window: 1,000,200 starts one.
        let mut c = SlidingSum::default();
        for t in 0..10 {
            c.add(1_000_200 + t * 59, 600, 1);
        }
        assert_eq!(c.since, 1_000_200);
        assert!((c.estimate(1_000_200 + 599, 600) - 10.0).abs() < 1e-9);
        // Halfway into the next window half of the last one still counts.
        let half = c.since + 600 + 300;
        assert!((c.estimate(half, 600) - 5.0).abs() < 1e-9);
        assert_eq!(c.estimate(c.since + 5000, 600), 0.0);
    }

    #[test]
    fn escalation_alerts_on_a_new_incident_or_a_higher_level() {
        let mut e = Escalation::default();
        assert_eq!(e.alerts(100, 15, 0), Some(Raise::New));
        assert_eq!(e.alerts(101, 15, 0), None, "same incident, same level");
        assert_eq!(e.alerts(102, 15, 2), Some(Raise::Higher));
        assert_eq!(e.alerts(103, 15, 1), None, "lower than reached");
        assert_eq!(e.alerts(200, 15, 0), Some(Raise::New), "after the cooldown");
    }

    proptest! {
        #[test]
        fn rate_mean_stays_within_observed_and_prior(counts in proptest::collection::vec(0u32..500, 1..200), hl in 1.0f64..500.0) {
            let mut b = RateBaseline::default();
            let d = decay_for_half_life(hl);
            for &c in &counts {
                b.observe(c as f64, d, PRIOR);
            }
            let lo = counts.iter().copied().min().unwrap().min(2) as f64;
            let hi = counts.iter().copied().max().unwrap().max(2) as f64;
            let m = b.mean(PRIOR);
            prop_assert!(m >= lo - 1e-3 && m <= hi + 1e-3, "{} not in [{}, {}]", m, lo, hi);
        }

        #[test]
        fn quantile_grows_with_the_rate(r1 in 0.1f64..200.0, r2 in 0.1f64..200.0) {
            let b = RateBaseline::default();
            let (lo, hi) = if r1 <= r2 { (r1, r2) } else { (r2, r1) };
            let q1 = b.upper_quantile(RatePrior { rate: lo, minutes: 10.0 }, 1e-6);
            let q2 = b.upper_quantile(RatePrior { rate: hi, minutes: 10.0 }, 1e-6);
            prop_assert!(q1 <= q2);
            prop_assert!(q1 > lo);
        }

        #[test]
        fn log_baseline_mean_tracks_within_range(xs in proptest::collection::vec(0.0f64..1e6, 1..300)) {
            let mut b = LogBaseline::with_prior(100.0, 1.0);
            for &x in &xs {
                b.observe(x, 0.01, 1.0);
            }
            let lo = xs.iter().cloned().fold(100.0f64, f64::min).ln_1p();
            let hi = xs.iter().cloned().fold(100.0f64, f64::max).ln_1p();
            prop_assert!(b.mean as f64 >= lo - 1e-3 && b.mean as f64 <= hi + 1e-3);
            prop_assert!(b.var >= 0.0);
            prop_assert!(b.upper(3.0) >= b.median() - 1e-6);
        }

        #[test]
        fn sliding_estimate_is_between_cur_and_cur_plus_prev(
            steps in proptest::collection::vec((0i64..90_000, 0u32..50), 1..100)
        ) {
            let mut w = SlidingMinute::default();
            let mut t = 0i64;
            for (dt, n) in steps {
                t += dt;
                w.advance(Tick::at(t));
                w.add(n);
                let e = w.estimate(Tick::at(t));
                prop_assert!(e >= w.cur as f64 - 1e-9);
                prop_assert!(e <= (w.cur + w.prev) as f64 + 1e-9);
            }
        }
    }

    #[test]
    fn the_predictive_bar_is_student_t_and_tends_to_the_normal_one() {
        use statrs::distribution::{ContinuousCDF, Normal, StudentsT};
        let z = 2.5;
        let p = Normal::new(0.0, 1.0).unwrap().cdf(z);
        for n in [9u32, 12, 20, 40, 100] {
            let b = LogBaseline {
                mean: 7.0,
                var: 1.0,
                n: n - 1,
            };
            // prior_weight 0: n observations, n - 1 degrees of freedom.
            let nu = n as f64 - 1.0;
            let exact = StudentsT::new(0.0, 1.0, nu).unwrap().inverse_cdf(p);
            let sd = (1.0 + 1.0 / n as f64).sqrt();
            let want = (7.0 + exact * sd).exp_m1();
            let got = b.upper_predictive(z, 0.0, 1e-6);
            let err = (got.ln_1p() - want.ln_1p()).abs() / (want.ln_1p() - 7.0);
            assert!(err < 0.01, "n {n}: {got} against {want}");
            assert!(got > b.upper(z), "a short history widens the bar");
        }
        let learned = LogBaseline {
            mean: 7.0,
            var: 1.0,
            n: 10_000,
        };
        let ratio = (learned.upper_predictive(z, 8.0, 1.0 / 60.0).ln_1p() - 7.0) / z;
        assert!((1.0..1.02).contains(&ratio), "{ratio}");
    }
}
