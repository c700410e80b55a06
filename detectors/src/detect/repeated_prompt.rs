//! Repeated prompts, per user.
//!
//! **Repeats.** Per user, a fingerprint seen once in the last
//! `window_minutes` costs 8 bytes (a 32-bit tag and its time); one seen
//! again is promoted to a repeating entry that keeps the times of its last
//! `max_repeats + 1` sightings, so its count in the sliding window is exact
//! and "more than N in the window" is simply "the oldest kept sighting is
//! still inside it". One alert per incident: while the user keeps
//! repeating, the incident stays open.
//!
//! **Bounded for heavy accounts.** A user's table holds at most
//! [`ONCE_MAX`] one-off fingerprints (the oldest give way) and
//! [`REPEATING_MAX`] repeating ones (the one seen longest ago gives way):
//! at most about 5 KB per user however heavy. The error is one-sided and
//! known: a repeat is missed only when more than [`ONCE_MAX`] other
//! distinct prompts came between its sightings (at 20,000 requests a day,
//! about 18 minutes; a prompt farmed once a minute, or every ten minutes,
//! is still caught), and a count is never overstated (a 32-bit tag within
//! one user's table collides with odds of about 1 in 16 million per
//! sighting). `tests/memory.rs` and `docs/performance.md` measure it.
//!
//! **Farming** by many accounts is the second stage's (`subject`): a
//! sighting that makes its user a repeater of a fingerprint (the second in
//! the window, [`PromptTracker::sight`] returns 2) is projected to the
//! fingerprint, and distinct such users are counted over every partition.
//! Counting only *repeating* users keeps popular one-off prompts ("hello")
//! quiet, and means only fingerprints someone repeated travel there.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::baseline::Incident;

/// A steady pace has no gap shorter than this: a person regenerating an
/// answer clicks again within seconds, a farming script paces itself.
const STEADY_MIN_GAP_SECS: u32 = 30;

/// Which early warnings a user gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Early {
    /// None (the user repeats prompts as a habit).
    Off,
    /// Only for sightings at a steady pace.
    Steady,
    /// At any pace.
    Any,
}

/// Settings.
#[derive(Clone, Copy, Debug)]
pub struct PromptParams {
    /// More than this many sightings in the window is an alert.
    pub max_repeats: u32,
    /// The window, seconds.
    pub window_secs: u32,
    /// Sightings within `early_secs` for an early warning (0: off).
    pub early_count: u32,
    /// The early warning's window, seconds.
    pub early_secs: u32,
    /// …which the sightings must span at least (a user regenerating an
    /// answer three times in a row is not a script), seconds.
    pub early_min_span_secs: u32,
}

/// Sightings of one (user, fingerprint).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sightings {
    /// Oldest kept sighting, Unix seconds.
    oldest: u32,
    /// Newer sightings, oldest first (empty, and unallocated, for one-offs).
    newer: Vec<u32>,
    /// End of the open incident, Unix seconds (0: none).
    incident_until: Incident,
    /// End of the open early warning, Unix seconds (0: none).
    #[serde(default)]
    early_until: Incident,
    /// Early findings alerted in the open early warning (at most two: the
    /// first, and for a user known to rarely repeat, one more sighting at
    /// a steady pace).
    #[serde(default)]
    early_alerts: u8,
}

/// What a sighting found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptFinding {
    /// The user sent the fingerprint `count` times in the window (a new incident).
    Repeated {
        /// Sightings in the window.
        count: u32,
    },
    /// The user sent the fingerprint `count` times within the early window,
    /// spanning `span_secs`: a script repeating it, before the hourly rule
    /// can say so.
    Early {
        /// Sightings within the early window.
        count: u32,
        /// From the first of them to this one, seconds.
        span_secs: u32,
        /// Whether they came at a steady pace (the longest gap at most 1.5
        /// times the shortest, none under 30 s), as a script sends them.
        steady: bool,
    },
}

/// Most one-off fingerprints remembered per user (see the module docs).
pub const ONCE_MAX: usize = 256;
/// Most repeating fingerprints tracked per user.
pub const REPEATING_MAX: usize = 32;

/// One user's fingerprints in the window: the one-off ones as 32-bit tags
/// with their time (oldest first, at most [`ONCE_MAX`]), and the repeating
/// ones with their sightings (at most [`REPEATING_MAX`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserPrompts {
    tags: VecDeque<u32>,
    times: VecDeque<u32>,
    repeating: Vec<(u32, Sightings)>,
}

impl UserPrompts {
    /// Fingerprints held (one-off and repeating).
    pub fn len(&self) -> usize {
        self.tags.len() + self.repeating.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops one-off sightings before `cutoff` (they are oldest first).
    fn trim(&mut self, cutoff: u32) {
        while self.times.front().is_some_and(|&t| t < cutoff) {
            self.tags.pop_front();
            self.times.pop_front();
        }
    }

    /// Where a one-off tag is (a plain scan over two slices: fast for 256).
    fn find_once(&self, tag: u32) -> Option<usize> {
        let (a, b) = self.tags.as_slices();
        match a.iter().position(|&g| g == tag) {
            Some(i) => Some(i),
            None => b.iter().position(|&g| g == tag).map(|i| a.len() + i),
        }
    }

    fn forget_once(&mut self, i: usize) -> u32 {
        self.tags.remove(i);
        self.times.remove(i).unwrap_or(0)
    }
}

/// The 32-bit tag of a fingerprint hash within one user's table (never 0).
fn tag_of(fp: u64) -> u32 {
    ((fp >> 32) as u32 ^ fp as u32).max(1)
}

impl Sightings {
    fn first(at: u32) -> Self {
        Sightings {
            oldest: at,
            newer: Vec::new(),
            incident_until: Incident::default(),
            early_until: Incident::default(),
            early_alerts: 0,
        }
    }

    fn newest(&self) -> u32 {
        self.newer.last().copied().unwrap_or(self.oldest)
    }

    fn is_open(&self, now_s: u32) -> bool {
        self.incident_until.is_open(now_s) || self.early_until.is_open(now_s)
    }

    /// Adds a sighting at `now_s`; findings go to `out`; returns the count
    /// in the window.
    fn see(
        &mut self,
        now_s: u32,
        early: Early,
        p: &PromptParams,
        out: &mut Vec<PromptFinding>,
    ) -> u32 {
        let cutoff = now_s.saturating_sub(p.window_secs);
        // Drop sightings that left the window, and any past the N+1 we need.
        let keep = p.max_repeats as usize + 1;
        self.newer.push(now_s);
        while self.oldest < cutoff || self.newer.len() + 1 > keep {
            if self.newer.is_empty() {
                self.oldest = now_s;
                break;
            }
            self.oldest = self.newer.remove(0);
        }
        let count = self.newer.len() as u32 + 1;
        if count > p.max_repeats && self.incident_until.begins(now_s, p.window_secs) {
            out.push(PromptFinding::Repeated { count });
        } else if early != Early::Off && p.early_count > 1 && !self.incident_until.is_open(now_s) {
            // The kept sightings are the newest, oldest first: take those in
            // the early window, with their shortest and longest gaps.
            let since = now_s.saturating_sub(p.early_secs);
            let times = std::iter::once(self.oldest).chain(self.newer.iter().copied());
            let (mut n, mut first, mut last) = (0u32, now_s, 0u32);
            let (mut min_gap, mut max_gap) = (u32::MAX, 0u32);
            for s in times.filter(|&s| s >= since) {
                if n > 0 {
                    // Late records may arrive out of order: a gap is never negative.
                    min_gap = min_gap.min(s.saturating_sub(last));
                    max_gap = max_gap.max(s.saturating_sub(last));
                }
                first = first.min(s);
                last = s;
                n += 1;
            }
            let span_secs = now_s.saturating_sub(first);
            // A script's steady pace is what tells it from a person
            // regenerating an answer a few times.
            let steady = n >= 2
                && 2 * max_gap as u64 <= 3 * min_gap as u64
                && min_gap >= STEADY_MIN_GAP_SECS;
            // The first early finding opens the early warning; a user known
            // to rarely repeat gets a second one a sighting later if the
            // pace is steady (the engine pages on that one).
            let open = self.early_until.is_open(now_s);
            let due = if !open {
                n >= p.early_count && (steady || early == Early::Any)
            } else {
                early == Early::Any && steady && self.early_alerts == 1 && n > p.early_count
            };
            if due && span_secs >= p.early_min_span_secs {
                if !open {
                    self.early_alerts = 0;
                }
                self.early_until.begins(now_s, p.early_secs);
                self.early_alerts += 1;
                out.push(PromptFinding::Early {
                    count: n,
                    span_secs,
                    steady,
                });
            }
        }
        count
    }
}

/// The rules over each user's table of sightings (the table lives with
/// the user).
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptTracker;

impl PromptTracker {
    /// Records a sighting of fingerprint `fp` by the user whose table is
    /// `up` at `now_s`. Findings (a repeat, an early warning once
    /// `early_count` sightings are in the early window when `early` allows
    /// it for this user, at a steady pace if it says so) go to `out`;
    /// returns the fingerprint's sightings in the window, this one included
    /// (2: the user has just become a repeater of it, a farming sighting).
    #[inline]
    pub fn sight(
        up: &mut Option<Box<UserPrompts>>,
        fp: u64,
        now_s: u32,
        early: Early,
        p: &PromptParams,
        out: &mut Vec<PromptFinding>,
    ) -> u32 {
        let cutoff = now_s.saturating_sub(p.window_secs);
        let t = up.get_or_insert_with(Default::default);
        t.trim(cutoff);
        let tag = tag_of(fp);
        let count = if let Some((_, e)) = t.repeating.iter_mut().find(|(g, _)| *g == tag) {
            e.see(now_s, early, p, out)
        } else if let Some(i) = t.find_once(tag) {
            // A one-off seen again: it repeats now.
            let mut e = Sightings::first(t.forget_once(i));
            let count = e.see(now_s, early, p, out);
            if t.repeating.len() >= REPEATING_MAX {
                // Room for it: the repeating fingerprint with the fewest
                // sightings gives way, the one seen longest ago among them
                // (one in an open incident only if all are).
                let victim = (0..t.repeating.len())
                    .min_by_key(|&j| {
                        let r = &t.repeating[j].1;
                        (r.is_open(now_s), r.newer.len(), r.newest())
                    })
                    .unwrap_or(0);
                t.repeating.swap_remove(victim);
            }
            t.repeating.push((tag, e));
            count
        } else {
            if t.tags.len() >= ONCE_MAX {
                t.tags.pop_front();
                t.times.pop_front();
            }
            t.tags.push_back(tag);
            t.times.push_back(now_s);
            1
        };
        count
    }

    /// Takes back the latest sighting of `fp` in the user's table `up`: its
    /// request turned out to be refused or a probe (known only from its
    /// response record, with split request/response logs).
    pub fn unsight(up: &mut Option<Box<UserPrompts>>, fp: u64) {
        let Some(t) = up.as_mut() else { return };
        let tag = tag_of(fp);
        if let Some(j) = t.repeating.iter().position(|(g, _)| *g == tag) {
            let e = &mut t.repeating[j].1;
            if e.newer.pop().is_none() && !e.is_open(e.oldest) {
                t.repeating.swap_remove(j);
            }
        } else if let Some(i) = t.find_once(tag) {
            t.forget_once(i);
        }
        if t.is_empty() {
            *up = None;
        }
    }

    /// Forgets what left the window by `now_s` in one user's table; frees
    /// it when empty.
    pub fn expire_user(up: &mut Option<Box<UserPrompts>>, now_s: u32, p: &PromptParams) {
        let Some(t) = up.as_mut() else { return };
        let cutoff = now_s.saturating_sub(p.window_secs);
        t.trim(cutoff);
        t.repeating
            .retain(|(_, e)| e.newest() >= cutoff || e.is_open(now_s));
        if t.is_empty() {
            *up = None;
            return;
        }
        // A burst leaves big tables behind; give the memory back.
        if t.tags.capacity() > 2 * t.tags.len() + 16 {
            t.tags.shrink_to_fit();
            t.times.shrink_to_fit();
        }
        if t.repeating.capacity() > 2 * t.repeating.len() + 4 {
            t.repeating.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each user's table, as the engine keeps them.
    #[derive(Default)]
    struct World {
        users: std::collections::HashMap<u64, Option<Box<UserPrompts>>>,
    }

    impl World {
        fn sight(
            &mut self,
            user: u64,
            fp: u64,
            now: u32,
            early: Early,
            p: &PromptParams,
            out: &mut Vec<PromptFinding>,
        ) -> u32 {
            let up = self.users.entry(user).or_default();
            PromptTracker::sight(up, fp, now, early, p, out)
        }

        fn unsight(&mut self, user: u64, fp: u64) {
            PromptTracker::unsight(self.users.entry(user).or_default(), fp);
        }

        fn expire(&mut self, now: u32, p: &PromptParams) {
            for up in self.users.values_mut() {
                PromptTracker::expire_user(up, now, p);
            }
        }

        fn is_empty(&self) -> bool {
            self.users.values().all(|u| u.is_none())
        }
    }

    const P: PromptParams = PromptParams {
        max_repeats: 5,
        window_secs: 3600,
        early_count: 0,
        early_secs: 600,
        early_min_span_secs: 90,
    };

    fn sight(t: &mut World, user: u64, fp: u64, now: u32) -> Vec<PromptFinding> {
        let mut out = vec![];
        t.sight(user, fp, now, Early::Off, &P, &mut out);
        out
    }

    #[test]
    fn a_script_gets_an_early_warning_and_a_quick_regenerate_does_not() {
        let p = PromptParams {
            early_count: 3,
            ..P
        };
        let mut t = World::default();
        let early = |t: &mut World, user, now| {
            let mut out = vec![];
            t.sight(user, 9, now, Early::Any, &p, &mut out);
            out
        };
        // Regenerated three times within a minute: no early warning.
        for i in 0..3 {
            assert!(early(&mut t, 1, 1000 + i * 20).is_empty());
        }
        // One repeat a minute: the third sighting, two minutes in, and
        // the fourth, still steady.
        assert!(early(&mut t, 2, 1000).is_empty());
        assert!(early(&mut t, 2, 1060).is_empty());
        assert_eq!(
            early(&mut t, 2, 1120),
            vec![PromptFinding::Early {
                count: 3,
                span_secs: 120,
                steady: true
            }]
        );
        assert_eq!(
            early(&mut t, 2, 1180),
            vec![PromptFinding::Early {
                count: 4,
                span_secs: 180,
                steady: true
            }]
        );
        assert!(
            early(&mut t, 2, 1240).is_empty(),
            "twice per warning at most"
        );
        // The hourly rule still decides the block.
        assert_eq!(
            early(&mut t, 2, 1300),
            vec![PromptFinding::Repeated { count: 6 }]
        );
        // A user not known to rarely repeat: only at a steady pace.
        let mut out = vec![];
        for (i, at) in [1000, 1010, 1100, 1115].into_iter().enumerate() {
            t.sight(4, 40, at, Early::Steady, &p, &mut out);
            assert!(out.is_empty(), "sighting {i}: {out:?}");
        }
        for at in [2000, 2060, 2125] {
            t.sight(5, 50, at, Early::Steady, &p, &mut out);
        }
        assert_eq!(
            out,
            vec![PromptFinding::Early {
                count: 3,
                span_secs: 125,
                steady: true
            }]
        );
        // Not allowed (the user repeats prompts as a habit): no warning.
        let mut out = vec![];
        for i in 0..4 {
            t.sight(3, 30, 1000 + i * 60, Early::Off, &p, &mut out);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn six_in_an_hour_alerts_once_five_do_not() {
        let mut t = World::default();
        for i in 0..5 {
            assert!(sight(&mut t, 1, 9, 1000 + i * 600).is_empty());
        }
        assert_eq!(
            sight(&mut t, 1, 9, 1000 + 5 * 600 - 1),
            vec![PromptFinding::Repeated { count: 6 }]
        );
        assert!(
            sight(&mut t, 1, 9, 1000 + 5 * 600 + 10).is_empty(),
            "same incident"
        );
    }

    #[test]
    fn six_spread_over_more_than_an_hour_do_not() {
        let mut t = World::default();
        for i in 0..12 {
            assert!(
                sight(&mut t, 1, 9, 1000 + i * 721).is_empty(),
                "sighting {i}"
            );
        }
    }

    #[test]
    fn unsighted_probes_never_add_up() {
        let mut t = World::default();
        // A health check every two minutes, each answered in two tokens.
        for i in 0..100 {
            assert!(sight(&mut t, 1, 9, 1000 + i * 120).is_empty());
            t.unsight(1, 9);
        }
        assert!(t.is_empty());
        t.unsight(1, 10);
        assert!(t.is_empty(), "an unknown sighting is ignored");
    }

    #[test]
    fn a_heavy_account_stays_bounded_and_still_gets_caught() {
        let mut w = World::default();
        let mut found = vec![];
        // 100 distinct prompts a minute for an hour, and one prompt farmed
        // once a minute among them.
        for m in 0..60u32 {
            for i in 0..100u64 {
                let now = 10_000 + m * 60 + i as u32 / 2;
                let fp = ((m as u64) << 32 | (i + 1000)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                w.sight(1, fp, now, Early::Off, &P, &mut found);
            }
            w.sight(1, 7, 10_000 + m * 60 + 55, Early::Off, &P, &mut found);
            let t = w.users[&1].as_ref().unwrap();
            assert!(t.tags.len() <= ONCE_MAX && t.repeating.len() <= REPEATING_MAX);
        }
        assert_eq!(found, vec![PromptFinding::Repeated { count: 6 }]);
        // Under 5 KB: the tags, the times and the repeating entries.
        let t = w.users[&1].as_ref().unwrap();
        let bytes = t.tags.capacity() * 8 + t.repeating.capacity() * 72;
        assert!(bytes < 5 * 1024, "{bytes}");
    }

    #[test]
    fn expiry_forgets_old_sightings() {
        let mut t = World::default();
        sight(&mut t, 1, 9, 1000);
        sight(&mut t, 2, 9, 1000);
        sight(&mut t, 2, 9, 1001);
        t.expire(1000 + 3601 + 3600, &P);
        assert!(t.is_empty());
    }
}
