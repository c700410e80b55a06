//! Requests waiting for their response record, for gateways that log a
//! `request` and a `response` record apart.
//!
//! What a request was is known when it arrives (its prompt, its
//! fingerprint); how it went is known only from its response (the answer's
//! size, the status). Detectors that need both look the request up here
//! when its response arrives: a prompt answered in two tokens was a health
//! check, not a farmed prompt; a big prompt still generating after a
//! minute is as telling as its capped answer will be.
//!
//! Per user, at most 16 requests, forgotten after 10 minutes (their
//! response was lost); on the heap only while a user has some.

use serde::{Deserialize, Serialize};

/// Requests older than this are forgotten (their response was lost).
pub const FORGET_SECS: u32 = 600;
/// Most requests kept per user.
const MAX: usize = 16;

/// One request waiting for its response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// Low bits of the request hash.
    pub request: u32,
    /// When it arrived, Unix seconds.
    pub start: u32,
    /// Its prompt fingerprint's hash (0: none).
    pub fingerprint: u64,
    /// Its prompt tokens.
    pub prompt: u32,
    /// Whether its prompt was far above the user's usual size.
    pub big: bool,
}

/// A user's requests waiting for their responses, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    entries: Vec<Waiting>,
}

impl Pending {
    /// Remembers a request that arrived (dropping the forgotten and, when
    /// full, the oldest).
    pub fn open(slot: &mut Option<Box<Pending>>, w: Waiting) {
        let p = slot.get_or_insert_with(Default::default);
        p.entries
            .retain(|e| w.start.saturating_sub(e.start) < FORGET_SECS);
        if p.entries.len() >= MAX {
            p.entries.remove(0);
        }
        p.entries.push(w);
    }

    /// Takes the request a response answers, if it is still remembered;
    /// frees the list once empty.
    pub fn close(slot: &mut Option<Box<Pending>>, request: u32) -> Option<Waiting> {
        let p = slot.as_mut()?;
        let found = p
            .entries
            .iter()
            .position(|e| e.request == request)
            .map(|i| p.entries.remove(i));
        if p.entries.is_empty() {
            *slot = None;
        }
        found
    }

    /// Requests with a big prompt waiting at least `secs` at `now_s` (and
    /// not yet forgotten).
    pub fn aged_big(slot: &Option<Box<Pending>>, now_s: u32, secs: u32) -> u32 {
        slot.as_ref().map_or(0, |p| {
            p.entries
                .iter()
                .filter(|e| {
                    let age = now_s.saturating_sub(e.start);
                    e.big && age >= secs && age < FORGET_SECS
                })
                .count() as u32
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(request: u32, start: u32, big: bool) -> Waiting {
        Waiting {
            request,
            start,
            fingerprint: 7,
            prompt: 100,
            big,
        }
    }

    #[test]
    fn open_close_age_and_forget() {
        let mut slot = None;
        Pending::open(&mut slot, w(1, 1000, true));
        Pending::open(&mut slot, w(2, 1010, false));
        assert_eq!(Pending::aged_big(&slot, 1044, 45), 0);
        assert_eq!(Pending::aged_big(&slot, 1045, 45), 1);
        assert_eq!(Pending::close(&mut slot, 1).map(|e| e.big), Some(true));
        assert_eq!(Pending::close(&mut slot, 1), None, "taken once");
        assert_eq!(Pending::close(&mut slot, 2).map(|e| e.fingerprint), Some(7));
        assert!(slot.is_none(), "an empty list is freed");
        // Forgotten after ten minutes; at most sixteen kept.
        Pending::open(&mut slot, w(3, 1000, true));
        Pending::open(&mut slot, w(4, 1000 + FORGET_SECS, true));
        assert_eq!(Pending::close(&mut slot, 3), None);
        for i in 0..20 {
            Pending::open(&mut slot, w(100 + i, 2000, false));
        }
        assert_eq!(slot.as_ref().unwrap().entries.len(), MAX);
        assert_eq!(Pending::close(&mut slot, 100), None, "the oldest gave way");
    }
}
