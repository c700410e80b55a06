//! Budget thresholds and the daily token allowance, per user.
//!
//! Spend is integer micro-dollars, so "crossed 80%" is exact: the record
//! whose cost takes the period's spend from below `limit × 80 / 100` to at or
//! above it raises the alert, and a bit per percent makes it fire once per
//! (user, period, percent) whatever replays or restarts follow (the bits are
//! part of the checkpointed state; alert ids are derived from the same
//! triple). Periods are calendar days and months in the configured UTC
//! offset. The ledger keeps the current and the previous period of each
//! kind, so a record that arrives a little after midnight still counts
//! toward the day it happened. Anything older is charged to the current
//! period and reported as late: spend is never left out of every budget,
//! so a record stamped days in the past (a gateway's clock, a log shipper
//! that held it back) cannot slip under the limits.

use serde::{Deserialize, Serialize};

use crate::time::PeriodKind;

/// Spend and tokens in one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodSpend {
    /// Period start, Unix ms (0: unused slot).
    pub start_ms: i64,
    /// Spend so far, micro-dollars.
    pub micros: u64,
    /// The budget in force at the last record, micro-dollars.
    #[serde(default)]
    pub limit_micros: u64,
    /// Tokens so far (saturating).
    pub tokens: u32,
    /// Bit `i` set: alert percent `i` has fired.
    pub fired: u8,
    /// The token allowance alert has fired.
    pub tokens_fired: bool,
}

/// A user's ledger: current and previous day, and (only when a monthly
/// budget applies, to keep users small) current and previous month.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Current and previous day.
    pub day: [PeriodSpend; 2],
    /// Current and previous month, once a monthly budget has applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<Box<[PeriodSpend; 2]>>,
}

/// A percent of a budget crossed by one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    /// Day or month.
    pub period: PeriodKind,
    /// Period start, Unix ms.
    pub period_start: i64,
    /// The percent crossed.
    pub percent: u8,
    /// The budget, micro-dollars.
    pub limit_micros: u64,
    /// Spend after the record, micro-dollars.
    pub spent_micros: u64,
}

/// The daily token allowance passed by one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenQuotaCrossing {
    /// Day start, Unix ms.
    pub period_start: i64,
    /// Tokens after the record.
    pub tokens: u64,
    /// The allowance.
    pub limit: u64,
}

/// What posting a record crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetEvent {
    /// A percent of a spend budget.
    Spend(Crossing),
    /// The daily token allowance.
    Tokens(TokenQuotaCrossing),
}

/// Limits in force for one record.
#[derive(Clone, Copy, Debug)]
pub struct BudgetLimits<'a> {
    /// Daily budget, micro-dollars.
    pub daily_micros: u64,
    /// Monthly budget, micro-dollars.
    pub monthly_micros: Option<u64>,
    /// Daily token allowance.
    pub tokens_per_day: u64,
    /// Alert percents, ascending.
    pub percents: &'a [u8],
}

/// The day and month a record falls in, computed once per period rather
/// than once per record (calendar math is not free on the hot path).
#[derive(Clone, Copy, Debug, Default)]
pub struct PeriodClock {
    utc_offset_min: i32,
    day: (i64, i64),
    month: (i64, i64),
}

impl PeriodClock {
    /// A clock for periods in a zone `utc_offset_min` minutes east of UTC.
    pub fn new(utc_offset_min: i32) -> Self {
        PeriodClock {
            utc_offset_min,
            day: (0, 0),
            month: (0, 0),
        }
    }

    /// Starts of the day and the month holding `ts_ms`.
    #[inline]
    pub fn starts(&mut self, ts_ms: i64) -> (i64, i64) {
        if !(self.day.0..self.day.1).contains(&ts_ms) {
            self.day = PeriodKind::Day.bounds(ts_ms, self.utc_offset_min);
        }
        if !(self.month.0..self.month.1).contains(&ts_ms) {
            self.month = PeriodKind::Month.bounds(ts_ms, self.utc_offset_min);
        }
        (self.day.0, self.month.0)
    }
}

/// Result of adding a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// Counted in its period.
    Counted,
    /// Older than the previous period: charged to the current one instead
    /// (reported as late).
    Late,
}

/// `ceil(limit × pct / 100)` in integers: spend reaches the percent
/// exactly. (u64 holds any budget up to $184 billion times 100; past that it
/// saturates rather than wrapping.)
#[inline]
pub fn percent_bar(limit_micros: u64, pct: u8) -> u64 {
    limit_micros.saturating_mul(pct as u64).div_ceil(100)
}

/// The slot of the period starting at `start`, opening it when it is newer
/// than the current one; `None` when it is older than the previous one.
fn slot(slots: &mut [PeriodSpend; 2], start: i64) -> Option<&mut PeriodSpend> {
    if slots[0].start_ms == start {
        return Some(&mut slots[0]);
    }
    if slots[1].start_ms == start {
        return Some(&mut slots[1]);
    }
    if start > slots[0].start_ms {
        slots[1] = slots[0];
        slots[0] = PeriodSpend {
            start_ms: start,
            ..Default::default()
        };
        return Some(&mut slots[0]);
    }
    None
}

fn cross(
    p: &mut PeriodSpend,
    period: PeriodKind,
    micros: u64,
    limit: u64,
    percents: &[u8],
    out: &mut impl FnMut(BudgetEvent),
) {
    p.micros = p.micros.saturating_add(micros);
    for (i, &pct) in percents.iter().enumerate() {
        let bar = percent_bar(limit, pct);
        if p.micros >= bar && p.fired & (1 << i) == 0 {
            p.fired |= 1 << i;
            out(BudgetEvent::Spend(Crossing {
                period,
                period_start: p.start_ms,
                percent: pct,
                limit_micros: limit,
                spent_micros: p.micros,
            }));
        }
    }
}

impl Ledger {
    /// Posts a record's cost and tokens to the day and month starting at
    /// `day_start` and `month_start` (from a [`PeriodClock`]); crossings go to `out`.
    pub fn post(
        &mut self,
        (day_start, month_start): (i64, i64),
        micros: u64,
        tokens: u64,
        lim: &BudgetLimits<'_>,
        out: &mut impl FnMut(BudgetEvent),
    ) -> Posted {
        let (day, posted) = match slot(&mut self.day, day_start) {
            Some(day) => (day, Posted::Counted),
            None => (&mut self.day[0], Posted::Late),
        };
        day.limit_micros = lim.daily_micros;
        if micros > 0 {
            cross(
                day,
                PeriodKind::Day,
                micros,
                lim.daily_micros,
                lim.percents,
                out,
            );
        }
        day.tokens = day
            .tokens
            .saturating_add(tokens.min(u32::MAX as u64) as u32);
        if u64::from(day.tokens) >= lim.tokens_per_day && !day.tokens_fired && tokens > 0 {
            day.tokens_fired = true;
            out(BudgetEvent::Tokens(TokenQuotaCrossing {
                period_start: day.start_ms,
                tokens: u64::from(day.tokens),
                limit: lim.tokens_per_day,
            }));
        }
        if let Some(limit) = lim.monthly_micros {
            let months = self.month.get_or_insert_with(Default::default);
            // Older than the previous month: charged to the current one.
            let month = match slot(months, month_start) {
                Some(month) => month,
                None => &mut months[0],
            };
            month.limit_micros = limit;
            if micros > 0 {
                cross(month, PeriodKind::Month, micros, limit, lim.percents, out);
            }
            month.tokens = month
                .tokens
                .saturating_add(tokens.min(u32::MAX as u64) as u32);
        }
        posted
    }

    /// Spend in the current month, micro-dollars, if its period is `month_start`.
    pub fn month_spend(&self, month_start: i64) -> u64 {
        match &self.month {
            Some(m) if m[0].start_ms == month_start => m[0].micros,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{parse_rfc3339, DAY_MS};
    use proptest::prelude::*;

    const PCT: [u8; 3] = [50, 80, 100];

    fn lim() -> BudgetLimits<'static> {
        BudgetLimits {
            daily_micros: 1_000_000,
            monthly_micros: Some(3_000_000),
            tokens_per_day: 10_000,
            percents: &PCT,
        }
    }

    fn post(l: &mut Ledger, ts: i64, micros: u64) -> Vec<Crossing> {
        let mut v = vec![];
        l.post(
            PeriodClock::new(0).starts(ts),
            micros,
            0,
            &lim(),
            &mut |e| {
                if let BudgetEvent::Spend(c) = e {
                    v.push(c)
                }
            },
        );
        v
    }

    #[test]
    fn each_percent_fires_once_by_the_crossing_record() {
        let t0 = parse_rfc3339("2026-11-23T08:00:00Z").unwrap();
        let mut l = Ledger::default();
        assert!(post(&mut l, t0, 499_999).is_empty());
        let c = post(&mut l, t0 + 1, 1);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].percent, c[0].spent_micros), (50, 500_000));
        // One record crossing two percents fires both.
        let c = post(&mut l, t0 + 2, 600_000);
        assert_eq!(
            c.iter().map(|c| c.percent).collect::<Vec<_>>(),
            vec![80, 100]
        );
        assert!(post(&mut l, t0 + 3, 5_000_000)
            .iter()
            .all(|c| c.period == PeriodKind::Month));
        // The next day starts over.
        let c = post(&mut l, t0 + DAY_MS, 600_000);
        assert_eq!(
            c.iter().map(|c| (c.period, c.percent)).collect::<Vec<_>>(),
            vec![(PeriodKind::Day, 50)]
        );
        // A late record for yesterday counts there and fires nothing new.
        assert!(post(&mut l, t0 + 10, 1).is_empty());
        // Two days late: charged to today, where it crosses 80%.
        let mut late = vec![];
        assert_eq!(
            l.post(
                PeriodClock::new(0).starts(t0 - DAY_MS),
                200_000,
                0,
                &lim(),
                &mut |e| late.push(e)
            ),
            Posted::Late
        );
        assert_eq!(l.day[0].start_ms, PeriodClock::new(0).starts(t0 + DAY_MS).0);
        assert_eq!(l.day[0].micros, 800_000);
        assert!(matches!(
            late.as_slice(),
            [BudgetEvent::Spend(Crossing {
                period: PeriodKind::Day,
                percent: 80,
                ..
            })]
        ));
    }

    #[test]
    fn token_allowance_fires_once_a_day() {
        let t0 = parse_rfc3339("2026-11-23T08:00:00Z").unwrap();
        let mut l = Ledger::default();
        let mut q = vec![];
        for i in 0..30 {
            l.post(
                PeriodClock::new(0).starts(t0 + i),
                0,
                500,
                &lim(),
                &mut |e| {
                    if let BudgetEvent::Tokens(c) = e {
                        q.push(c)
                    }
                },
            );
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].tokens, 10_000);
    }

    proptest! {
        #[test]
        fn crossings_are_exact_and_unique(costs in proptest::collection::vec(0u64..400_000, 1..60)) {
            let t0 = parse_rfc3339("2026-11-23T08:00:00Z").unwrap();
            let mut l = Ledger::default();
            let mut total = 0u64;
            let mut seen = std::collections::HashSet::new();
            for (i, c) in costs.iter().enumerate() {
                let before = total;
                total += c;
                for x in post(&mut l, t0 + i as i64, *c) {
                    if x.period != PeriodKind::Day { continue; }
                    let bar = 1_000_000 * x.percent as u64 / 100;
                    prop_assert!(before < bar && total >= bar, "record {} crossed {}", i, x.percent);
                    prop_assert!(seen.insert(x.percent));
                }
            }
            for pct in PCT {
                prop_assert_eq!(seen.contains(&pct), total >= 1_000_000 * pct as u64 / 100);
            }
        }
    }
}
