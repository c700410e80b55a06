//! Duplicate detection: have we seen this (request_id, phase) lately?
//!
//! Two generations of 64-bit hashes, each spanning `horizon` of event time:
//! a repeat is caught when it arrives within one horizon of the original
//! (and possibly up to two), memory stays proportional to the records of
//! the last two horizons, and rotating is O(1).
//!
//! The window holds every record of the last `2 * horizon` (an hour at
//! the default), so it is most of a busy partition's checkpoint. A
//! checkpoint keeps it in *chunks*, entries of their own
//! ([`EntryKind::Dedup`], id `GENERATION.N`, the hashes packed as 8
//! little-endian bytes each): the first checkpoint writes both
//! generations whole, each later one only the hashes added since the one
//! before (one chunk per generation that grew), and the chunks of a
//! generation are deleted when it rotates out. Checkpoint writes then
//! follow the traffic since the last checkpoint, not the window held.
//! Serialized whole ([`serde`]), a generation is its packed hashes in
//! base64; checkpoints that kept the window inside their core (base64, or
//! an older array of numbers) still read, and the next checkpoint after
//! such a one writes the window whole as chunks.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Entry, EntryKind};
use crate::StableBuild;

/// Hashes in one chunk at most (512 KiB of state).
const CHUNK_HASHES: usize = 65_536;

/// Recently seen record hashes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Dedup {
    /// Start of the current generation, Unix ms.
    since: i64,
    #[serde(with = "packed", default, skip_serializing_if = "HashSet::is_empty")]
    cur: HashSet<u64, StableBuild>,
    #[serde(with = "packed", default, skip_serializing_if = "HashSet::is_empty")]
    prev: HashSet<u64, StableBuild>,
    /// The previous generation's name in chunk ids (None: none named yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev_since: Option<i64>,
    /// The number the next chunk gets.
    #[serde(default, skip_serializing_if = "is_zero")]
    next_chunk: u64,
    /// What the checkpoints have stored and what is new since.
    #[serde(skip)]
    log: ChunkLog,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The chunks stored and the hashes added since the last checkpoint.
#[derive(Clone, Debug, Default)]
struct ChunkLog {
    /// Hashes are logged as they are added (checkpoints are taken).
    tracking: bool,
    /// The next checkpoint writes every hash: none is stored in chunks
    /// (the window came from inside an older checkpoint's core).
    all: bool,
    /// Hashes added since the last checkpoint, by generation.
    fresh: Vec<(i64, Vec<u64>)>,
    /// Chunk ids stored, by generation.
    stored: Vec<(i64, Vec<Box<str>>)>,
    /// Chunks to delete: of generations that rotated out, or stale.
    dropped: Vec<Box<str>>,
}

/// Equal when the windows are: what was stored and logged is bookkeeping.
impl PartialEq for Dedup {
    fn eq(&self, other: &Self) -> bool {
        self.since == other.since && self.cur == other.cur && self.prev == other.prev
    }
}

/// The part of a [`Dedup`] a checkpoint's core holds when its hashes are
/// in chunks (field names as in `Dedup`, which reads it).
#[derive(Serialize)]
pub(crate) struct DedupCore {
    since: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_since: Option<i64>,
    next_chunk: u64,
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
            self.rotate(now_ms, horizon_ms);
        }
        if self.prev.contains(&h) {
            return false;
        }
        let new = self.cur.insert(h);
        if new && self.log.tracking {
            self.log.fresh(self.since).push(h);
        }
        new
    }

    #[cold]
    fn rotate(&mut self, now_ms: i64, horizon_ms: i64) {
        let expected = self.cur.len();
        let old = (self.since, self.prev_since);
        if now_ms - self.since >= 2 * horizon_ms {
            self.prev = HashSet::default();
            self.prev_since = None;
            self.log.drop_generation(old.0);
        } else {
            std::mem::swap(&mut self.prev, &mut self.cur);
            self.prev_since = Some(old.0);
        }
        if let Some(gone) = old.1 {
            self.log.drop_generation(gone);
        }
        self.cur.clear();
        // Size the new generation for the last one's traffic, not for a past burst.
        if self.cur.capacity() > 4 * expected + 64 {
            self.cur = HashSet::with_capacity_and_hasher(expected, Default::default());
        }
        self.since = now_ms;
    }

    /// Logs the hashes added from now on, for checkpoints of what changed.
    pub(crate) fn track(&mut self) {
        self.log.tracking = true;
    }

    /// The chunks a checkpoint writes and the ones it deletes: every hash
    /// (`full`, or when none is stored in chunks yet), else those added
    /// since the last checkpoint. What is added from now on goes into the
    /// next one. Also returns the core's part.
    pub(crate) fn checkpoint(&mut self, full: bool) -> (DedupCore, Vec<Entry>, Vec<Box<str>>) {
        let mut written = Vec::new();
        let forgotten;
        if full || self.log.all {
            self.log.fresh.clear();
            forgotten = if full {
                // A full checkpoint replaces every stored entry.
                self.log.dropped.clear();
                Vec::new()
            } else {
                // Stale chunks an older checkpoint may have left.
                std::mem::take(&mut self.log.dropped)
            };
            self.log.stored.clear();
            self.log.all = false;
            if self.prev_since.is_none() && !self.prev.is_empty() {
                self.prev_since = Some(self.since - 1);
            }
            let gens = [
                (self.since, &self.cur),
                (self.prev_since.unwrap_or(0), &self.prev),
            ];
            for (gen, set) in gens {
                let hashes: Vec<u64> = set.iter().copied().collect();
                written.push((gen, hashes));
            }
        } else {
            forgotten = std::mem::take(&mut self.log.dropped);
            written = std::mem::take(&mut self.log.fresh);
        }
        let mut entries = Vec::new();
        for (gen, hashes) in written {
            for piece in hashes.chunks(CHUNK_HASHES) {
                let id: Box<str> = format!("{gen}.{}", self.next_chunk).into();
                self.next_chunk += 1;
                let mut state = Vec::with_capacity(piece.len() * 8);
                for h in piece {
                    state.extend_from_slice(&h.to_le_bytes());
                }
                self.log.stored(gen).push(id.clone());
                entries.push(Entry {
                    kind: EntryKind::Dedup,
                    id,
                    state,
                });
            }
        }
        let core = DedupCore {
            since: self.since,
            prev_since: self.prev_since,
            next_chunk: self.next_chunk,
        };
        (core, entries, forgotten)
    }

    /// Takes a stored chunk back (restoring a checkpoint); `kept` after its
    /// core was read. A chunk of a generation that is neither current nor
    /// previous is stale: deleted by the next checkpoint.
    pub(crate) fn restore_chunk(&mut self, id: &str, state: &[u8]) -> Result<(), String> {
        let (gen, n) = id
            .split_once('.')
            .and_then(|(g, n)| Some((g.parse::<i64>().ok()?, n.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("duplicate window chunk id {id:?}: not GENERATION.N"))?;
        if !state.len().is_multiple_of(8) {
            return Err(format!(
                "duplicate window chunk {id}: {} bytes, not a whole number of 8-byte hashes",
                state.len()
            ));
        }
        let set = if gen == self.since {
            &mut self.cur
        } else if Some(gen) == self.prev_since {
            &mut self.prev
        } else {
            self.log.dropped.push(id.into());
            return Ok(());
        };
        set.reserve(state.len() / 8);
        for h in state.chunks_exact(8) {
            set.insert(u64::from_le_bytes(h.try_into().expect("8 bytes")));
        }
        self.next_chunk = self.next_chunk.max(n + 1);
        self.log.stored(gen).push(id.into());
        Ok(())
    }

    /// After the core was read: whether its window was inside it (an older
    /// checkpoint), so that the next checkpoint writes it all as chunks.
    pub(crate) fn restored_inline(&mut self) {
        if !self.cur.is_empty() || !self.prev.is_empty() {
            self.log.all = true;
        }
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }
}

impl ChunkLog {
    /// The fresh hashes of generation `gen`.
    fn fresh(&mut self, gen: i64) -> &mut Vec<u64> {
        if self.fresh.last().is_none_or(|(g, _)| *g != gen) {
            self.fresh.push((gen, Vec::new()));
        }
        &mut self.fresh.last_mut().expect("just pushed").1
    }

    /// The chunk ids stored for generation `gen`.
    fn stored(&mut self, gen: i64) -> &mut Vec<Box<str>> {
        match self.stored.iter().position(|(g, _)| *g == gen) {
            Some(i) => &mut self.stored[i].1,
            None => {
                self.stored.push((gen, Vec::new()));
                &mut self.stored.last_mut().expect("just pushed").1
            }
        }
    }

    /// Generation `gen` rotated out: its chunks are deleted, its fresh
    /// hashes not written.
    fn drop_generation(&mut self, gen: i64) {
        self.fresh.retain(|(g, _)| *g != gen);
        if let Some(i) = self.stored.iter().position(|(g, _)| *g == gen) {
            let (_, ids) = self.stored.swap_remove(i);
            self.dropped.extend(ids);
        }
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
