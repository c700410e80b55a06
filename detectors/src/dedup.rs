//! Duplicate detection: have we seen this (request_id, phase) lately?
//!
//! Two generations of 64-bit hashes, each spanning `horizon` of event time:
//! a repeat is caught when it arrives within one horizon of the original
//! (and possibly up to two), memory stays proportional to the records of
//! the last two horizons, and rotating is O(1).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::StableBuild;

/// Recently seen record hashes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dedup {
    /// Start of the current generation, Unix ms.
    since: i64,
    cur: HashSet<u64, StableBuild>,
    prev: HashSet<u64, StableBuild>,
}

impl Dedup {
    /// Whether `h` is new at `now_ms` (and remembers it); false for a duplicate.
    #[inline]
    pub fn first_sighting(&mut self, h: u64, now_ms: i64, horizon_ms: i64) -> bool {
        if now_ms - self.since >= horizon_ms {
            let expected = self.cur.len();
            if now_ms - self.since >= 2 * horizon_ms {
                self.prev = HashSet::default();
            } else {
                std::mem::swap(&mut self.prev, &mut self.cur);
            }
            self.cur.clear();
            // Size the new generation for the last one's traffic, not for a past burst.
            if self.cur.capacity() > 4 * expected + 64 {
                self.cur = HashSet::with_capacity_and_hasher(expected, Default::default());
            }
            self.since = now_ms;
        }
        if self.prev.contains(&h) {
            return false;
        }
        self.cur.insert(h)
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_horizon_are_caught_and_memory_rotates() {
        let mut d = Dedup::default();
        let h = 60_000;
        assert!(d.first_sighting(1, 1_000_000, h));
        assert!(!d.first_sighting(1, 1_000_001, h));
        assert!(d.first_sighting(2, 1_000_000 + h + 1, h));
        assert!(
            !d.first_sighting(1, 1_000_000 + h + 2, h),
            "still in the previous generation"
        );
        assert!(d.first_sighting(3, 1_000_000 + 5 * h, h));
        assert_eq!(d.len(), 1);
        assert!(
            d.first_sighting(1, 1_000_000 + 5 * h + 1, h),
            "forgotten after two horizons"
        );
    }
}
