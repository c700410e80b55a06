//! Repeated prompts (one user) and prompt farming (many users).
//!
//! **Repeats.** For each (user, prompt fingerprint) seen in the last
//! `window_minutes`, the tracker keeps the times of the last
//! `max_repeats + 1` sightings: the count in the sliding window is exact,
//! and "more than N in the window" is simply "the oldest kept sighting is
//! still inside it". A fingerprint seen once costs one 40-byte entry and no
//! heap allocation; entries leave when their newest sighting leaves the
//! window. One alert per incident: while the user keeps repeating, the
//! incident stays open.
//!
//! **Farming.** The same fingerprint repeated (twice or more in the window)
//! by `farming_min_users` distinct users within the window is coordinated
//! farming: accounts made to split one job under every per-account limit.
//! Counting only *repeating* users keeps popular one-off prompts ("hello")
//! quiet, and means only fingerprints someone repeated take memory here.
//! Farming across partitions needs the fingerprint-keyed stream that
//! DESIGN.md describes; within one engine it is exact.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::baseline::Incident;
use crate::hash::combine;
use crate::StableBuild;

/// Settings.
#[derive(Clone, Copy, Debug)]
pub struct PromptParams {
    /// More than this many sightings in the window is an alert.
    pub max_repeats: u32,
    /// The window, seconds.
    pub window_secs: u32,
    /// Distinct repeating users for farming (0: off).
    pub farming_min_users: u32,
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
}

/// Users repeating one fingerprint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Crowd {
    /// Start of the counting window, Unix seconds.
    since: u32,
    /// Low 32 bits of the repeating users' hashes (at most `farming_min_users`).
    users: Vec<u32>,
    /// Whether this window already raised its alert.
    alerted: bool,
}

/// What a sighting found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptFinding {
    /// The user sent the fingerprint `count` times in the window (a new incident).
    Repeated {
        /// Sightings in the window.
        count: u32,
    },
    /// `users` distinct users repeated the fingerprint in the window; `since` starts it.
    Farming {
        /// Distinct repeating users.
        users: u32,
        /// Window start, Unix seconds.
        since: u32,
    },
}

/// The tracker for one engine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTracker {
    pub(crate) sightings: HashMap<u64, Sightings, StableBuild>,
    pub(crate) crowds: HashMap<u64, Crowd, StableBuild>,
}

impl PromptTracker {
    /// Records a sighting of fingerprint `fp` by user `user` at `now_s`.
    /// Up to two findings (a repeat and a farming crowd) go to `out`.
    #[inline]
    pub fn sight(
        &mut self,
        user: u64,
        fp: u64,
        now_s: u32,
        p: &PromptParams,
        out: &mut Vec<PromptFinding>,
    ) {
        let cutoff = now_s.saturating_sub(p.window_secs);
        let e = match self.sightings.entry(combine(user, fp)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Sightings {
                    oldest: now_s,
                    newer: Vec::new(),
                    incident_until: Incident::default(),
                });
                return;
            }
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        };
        // Drop sightings that left the window, and any past the N+1 we need.
        let keep = p.max_repeats as usize + 1;
        e.newer.push(now_s);
        while e.oldest < cutoff || e.newer.len() + 1 > keep {
            if e.newer.is_empty() {
                e.oldest = now_s;
                break;
            }
            e.oldest = e.newer.remove(0);
        }
        let count = e.newer.len() as u32 + 1;
        if count > p.max_repeats && e.incident_until.begins(now_s, p.window_secs) {
            out.push(PromptFinding::Repeated { count });
        }
        if count == 2 && p.farming_min_users > 0 {
            let crowd = self.crowds.entry(fp).or_insert_with(|| Crowd {
                since: now_s,
                users: Vec::new(),
                alerted: false,
            });
            if crowd.since < cutoff {
                crowd.since = now_s;
                crowd.users.clear();
                crowd.alerted = false;
            }
            let u = user as u32;
            if !crowd.users.contains(&u) && crowd.users.len() < p.farming_min_users as usize {
                crowd.users.push(u);
            }
            if !crowd.alerted && crowd.users.len() >= p.farming_min_users as usize {
                crowd.alerted = true;
                out.push(PromptFinding::Farming {
                    users: crowd.users.len() as u32,
                    since: crowd.since,
                });
            }
        }
    }

    /// Forgets sightings and crowds that left the window by `now_s`.
    pub fn expire(&mut self, now_s: u32, p: &PromptParams) {
        let cutoff = now_s.saturating_sub(p.window_secs);
        self.sightings.retain(|_, e| {
            e.newer.last().copied().unwrap_or(e.oldest) >= cutoff || e.incident_until.is_open(now_s)
        });
        self.crowds.retain(|_, c| c.since >= cutoff);
        // A burst of traffic leaves a big table behind; give the memory back.
        if self.sightings.capacity() > 4 * self.sightings.len() + 64 {
            self.sightings.shrink_to(2 * self.sightings.len());
        }
        if self.crowds.capacity() > 4 * self.crowds.len() + 64 {
            self.crowds.shrink_to(2 * self.crowds.len());
        }
    }

    /// Entries held: (user, fingerprint) pairs and farming crowds.
    pub fn len(&self) -> (usize, usize) {
        (self.sightings.len(), self.crowds.len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.sightings.is_empty() && self.crowds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PromptParams = PromptParams {
        max_repeats: 5,
        window_secs: 3600,
        farming_min_users: 3,
    };

    fn sight(t: &mut PromptTracker, user: u64, fp: u64, now: u32) -> Vec<PromptFinding> {
        let mut out = vec![];
        t.sight(user, fp, now, &P, &mut out);
        out
    }

    #[test]
    fn six_in_an_hour_alerts_once_five_do_not() {
        let mut t = PromptTracker::default();
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
        let mut t = PromptTracker::default();
        for i in 0..12 {
            assert!(
                sight(&mut t, 1, 9, 1000 + i * 721).is_empty(),
                "sighting {i}"
            );
        }
    }

    #[test]
    fn farming_needs_distinct_repeating_users() {
        let mut t = PromptTracker::default();
        // Many users sending a popular prompt once each: quiet.
        for u in 0..50 {
            assert!(sight(&mut t, u, 7, 1000 + u as u32).is_empty());
        }
        // Three users each repeating it: farming, once.
        let mut found = vec![];
        for u in 100..104 {
            found.extend(sight(&mut t, u, 7, 2000));
            found.extend(sight(&mut t, u, 7, 2001));
        }
        assert_eq!(
            found,
            vec![PromptFinding::Farming {
                users: 3,
                since: 2001
            }]
        );
    }

    #[test]
    fn expiry_forgets_old_sightings() {
        let mut t = PromptTracker::default();
        sight(&mut t, 1, 9, 1000);
        sight(&mut t, 2, 9, 1000);
        sight(&mut t, 2, 9, 1001);
        t.expire(1000 + 3601 + 3600, &P);
        assert!(t.is_empty());
    }
}
