//! What an engine checkpoint writes: the engine's core (its clock) and,
//! per account, per key and per chunk of the duplicate window, an entry of
//! its own, so
//! that a checkpoint writes only what changed since the previous one and a
//! partition of a million accounts checkpoints as easily as one of a
//! thousand (issue 16; `storage` keeps the entries as rows).

/// What an entry holds the state of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// An account ([`crate::engine::UserState`]).
    User,
    /// A key ([`crate::engine::KeyState`]).
    Key,
    /// A chunk of the duplicate window (`crate::dedup`): packed hashes,
    /// id `GENERATION.N`.
    Dedup,
}

impl EntryKind {
    /// Its name in storage (`engine_checkpoint_entries.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::User => "user",
            EntryKind::Key => "key",
            EntryKind::Dedup => "dedup",
        }
    }

    /// The kind a stored name stands for.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(EntryKind::User),
            "key" => Some(EntryKind::Key),
            "dedup" => Some(EntryKind::Dedup),
            _ => None,
        }
    }
}

/// One account's or key's state in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Account or key.
    pub kind: EntryKind,
    /// The user id or key id.
    pub id: Box<str>,
    /// Its serialized state.
    pub state: Vec<u8>,
}

/// A checkpoint as a batch stores it: with `full`, the entries are all
/// there is (every stored entry of the partition goes first); without, they
/// are what changed since the previous checkpoint, and `forgotten` what the
/// engine dropped since (deleted before `changed` is written, so an account
/// forgotten and seen again is kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Everything not kept per entry.
    pub core: Vec<u8>,
    /// The entries replace every stored one.
    pub full: bool,
    /// Entries to write (insert or replace).
    pub changed: Vec<Entry>,
    /// Entries to delete.
    pub forgotten: Vec<(EntryKind, Box<str>)>,
    /// The engine's clock minute when it was taken: entries seen at or after
    /// it went into the next one.
    pub mark: u32,
}

impl Checkpoint {
    /// A checkpoint whose core is the whole state (the second stage's).
    pub fn whole(core: Vec<u8>) -> Self {
        Checkpoint {
            core,
            full: true,
            ..Checkpoint::default()
        }
    }

    /// Bytes it writes (core and entry states).
    pub fn bytes(&self) -> usize {
        self.core.len() + self.changed.iter().map(|e| e.state.len()).sum::<usize>()
    }
}

/// A checkpoint that cannot be read back: which part, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct CheckpointError {
    /// The core, or which entry.
    pub what: String,
    /// The decoder's complaint.
    #[source]
    pub source: serde_json::Error,
}
