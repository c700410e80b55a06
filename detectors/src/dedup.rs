//! Duplicate detection: have we seen this (request_id, phase) lately?
//!
//! Two generations of 64-bit hashes, each spanning `horizon` of event time:
//! a repeat is caught when it arrives within one horizon of the original
//! (and possibly up to two), memory stays proportional to the records of
//! the last two horizons, and rotating is O(1).
//!
//! In a checkpoint each generation is its hashes packed (8 bytes each,
//! little-endian) and base64-encoded: about 10.7 characters a hash
//! against about 20 as JSON numbers, and quick to write and read. That
//! window holds every record of the last `2 * horizon` (an hour at the
//! default), so it is most of a busy partition's checkpoint core.
//! Checkpoints written as JSON arrays of numbers still read.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::StableBuild;

/// Recently seen record hashes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dedup {
    /// Start of the current generation, Unix ms.
    since: i64,
    #[serde(with = "packed")]
    cur: HashSet<u64, StableBuild>,
    #[serde(with = "packed")]
    prev: HashSet<u64, StableBuild>,
}

/// A set of hashes as base64 of their little-endian bytes (or, read from
/// an older checkpoint, as an array of numbers).
mod packed {
    use std::collections::HashSet;
    use std::fmt;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use crate::StableBuild;

    pub(super) fn serialize<S: Serializer>(
        set: &HashSet<u64, StableBuild>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(set.len() * 8);
        for h in set {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashSet<u64, StableBuild>, D::Error> {
        struct Hashes;
        impl<'de> Visitor<'de> for Hashes {
            type Value = HashSet<u64, StableBuild>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("base64 of 8-byte hashes, or an array of hashes")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let bytes = STANDARD
                    .decode(v)
                    .map_err(|e| E::custom(format_args!("duplicate window: {e}")))?;
                if bytes.len() % 8 != 0 {
                    return Err(E::custom(format_args!(
                        "duplicate window: {} bytes, not a whole number of 8-byte hashes",
                        bytes.len()
                    )));
                }
                let mut set =
                    HashSet::with_capacity_and_hasher(bytes.len() / 8, StableBuild::default());
                for h in bytes.chunks_exact(8) {
                    set.insert(u64::from_le_bytes(h.try_into().expect("8 bytes")));
                }
                Ok(set)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut set = HashSet::with_capacity_and_hasher(
                    seq.size_hint().unwrap_or(0).min(1 << 20),
                    StableBuild::default(),
                );
                while let Some(h) = seq.next_element::<u64>()? {
                    set.insert(h);
                }
                Ok(set)
            }
        }
        d.deserialize_any(Hashes)
    }
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

    #[test]
    fn a_window_round_trips_packed_and_reads_the_older_form() {
        let mut d = Dedup::default();
        let h = 60_000;
        for (i, x) in [0, 1, u64::MAX, 1 << 63, 42].into_iter().enumerate() {
            assert!(d.first_sighting(x, 1_000_000 + i as i64, h));
        }
        assert!(
            d.first_sighting(7, 1_000_000 + h, h),
            "rotated: 7 is in cur, the rest in prev"
        );
        let json = serde_json::to_string(&d).unwrap();
        assert!(!json.contains("18446744073709551615"), "{json}");
        let back: Dedup = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        // As checkpoints before the packed form wrote it.
        let old = r#"{"since":1060000,"cur":[7],"prev":[0,1,18446744073709551615,9223372036854775808,42]}"#;
        assert_eq!(serde_json::from_str::<Dedup>(old).unwrap(), d);
        // A broken one names what is wrong.
        let bad = serde_json::from_str::<Dedup>(r#"{"since":0,"cur":"AAAA","prev":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("not a whole number of 8-byte hashes"), "{bad}");
    }
}
