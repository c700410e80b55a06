//! keywatch's domain: the gateway event and its strict decoder, model
//! prices, learned baselines and sliding windows, every detector, the
//! per-partition [`Engine`] and the [`Alert`] it emits.
//!
//! Pure logic: no IO, no async, no clock. Time comes in with each event
//! (`Engine::observe` runs on event time) so tests step it by hand and a
//! replay of the same records always makes the same decisions, with the same
//! alert ids.

pub mod alert;
pub mod baseline;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod detect;
pub mod engine;
pub mod event;
pub mod hash;
pub mod price;
pub mod subject;
pub mod text;
pub mod time;

mod dedup;

pub use alert::{Action, Alert, AlertKind, BudgetInfo, Severity};
pub use checkpoint::{Checkpoint, CheckpointError, Entry, EntryKind};
pub use config::{ConfigError, EngineConfig};
pub use decode::{DecodeError, Decoder, Problem};
pub use engine::{Engine, EngineState, EngineStats, Outcome, Tracked};
pub use event::{Event, Phase};
pub use subject::{SubjectEngine, SubjectState};

/// A [`std::hash::Hasher`] over [`hash::stable_hash`]: the engine's maps
/// hash the same way in every build, so their snapshots stay valid.
#[derive(Clone, Copy, Debug, Default)]
pub struct StableHasher(u64);

impl std::hash::Hasher for StableHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0 = hash::stable_hash(self.0, bytes);
    }

    #[inline]
    fn write_u8(&mut self, _marker: u8) {
        // `str` hashing appends a 0xff marker; the length is already mixed in.
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        // Keys that are already hashes pass through (mixed with any prior state).
        self.0 = if self.0 == 0 {
            n
        } else {
            hash::combine(self.0, n)
        };
    }
}

/// Builds [`StableHasher`]s.
pub type StableBuild = std::hash::BuildHasherDefault<StableHasher>;
