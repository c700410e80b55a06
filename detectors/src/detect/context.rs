//! What is usual for an account: the networks it calls from and the
//! clients (user agents) it calls with.
//!
//! Size alone cannot tell a batch job from an attack: real customers are
//! far burstier than any fixed factor allows (in Alibaba Bailian's
//! per-customer workload, ServeGen, a customer's busiest 10 minutes in two
//! weeks is 8x its median active rate at the median customer and 185x at
//! the 90th percentile). What the record carries can: a burst from the
//! account's usual networks and client is the account's own doing; the
//! same burst from a network or a client the account has never used is
//! someone else's. The detectors measure size; this says whose it is, and
//! the engine sets severity and action from both.
//!
//! Per account, a handful of networks (the record's `asn`, else the /16 of
//! an IPv4 or /32 of an IPv6 address, as `leaked_key` counts them) and
//! user agents, each with the minute it was first seen. A value is
//! *established* once the account used it again `familiar_after` minutes
//! or more after first: an attacker's network seen for the first time at
//! the onset is not established during the onset, and an attack that
//! comes first and stops within that span does not become the account's
//! usual context. Nor does one that goes on longer: a value first seen
//! within `familiar_after` minutes before or during an open incident on
//! the account (a spike alert of any severity, and its cooldown) is
//! *held*, established only when used again with no incident open, so an
//! attack that comes first and runs for hours leaves the account with no
//! usual context rather than with the attacker's, and its owner's later
//! traffic is not judged novel. Values the account had before the incident
//! are not held. When the slots are full, a new value replaces the
//! youngest not yet established, so established values stay and churn (a
//! roaming phone, an attacker's many addresses) costs one slot. An account
//! with nothing established yet has no context ([`Context::Unknown`]): a
//! fresh start judges nobody by novelty.
//!
//! 44 bytes per account, no heap.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::detect::leaked_key::network_of;
use crate::hash::stable_hash;

/// A value and the minute it was first seen (`tag` 0: empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    tag: u32,
    first: u32,
}

/// An account's usual networks and clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Familiar {
    /// Minute the account was first seen (0: never).
    since: u32,
    nets: [Seen; 3],
    agents: [Seen; 2],
}

/// What a record's context says about the traffic it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// The account is too new to have a usual context.
    Unknown,
    /// The record comes from an established network and client (or says
    /// nothing about them).
    Familiar,
    /// One of the record's network and client is new, the other usual.
    Changed,
    /// Everything the record says about where it comes from is new to the
    /// account: its network and its client (or the one of them it names).
    /// One of them new is an account's ordinary change (a trip, an SDK
    /// update); both at once is a stranger.
    Novel {
        /// The network is new.
        network: bool,
        /// The user agent is new.
        agent: bool,
    },
}

impl Context {
    /// Whether the context points at someone other than the account.
    pub fn is_novel(self) -> bool {
        matches!(self, Context::Novel { .. })
    }

    /// How the context reads in an alert's reason: "" when familiar.
    pub fn describe(self) -> &'static str {
        match self {
            Context::Unknown => " from a new account",
            Context::Familiar => " from its usual networks and client",
            Context::Novel {
                network: true,
                agent: true,
            } => " from a network and a client it has not used before",
            Context::Novel { network: true, .. } => " from a network it has not used before",
            Context::Novel { .. } => " from a client it has not used before",
            Context::Changed => {
                " from its usual client on a new network, or a new client on its usual network"
            }
        }
    }
}

/// A record's network and agent as tags (0: absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    net: u32,
    agent: u32,
}

impl Origin {
    /// Tags the record's address (with its network number) and user agent.
    #[inline]
    pub fn of(ip: Option<IpAddr>, asn: Option<u32>, user_agent: Option<&str>) -> Origin {
        let nonzero = |t: u32| t.max(1);
        Origin {
            net: ip.map_or(asn.map_or(0, nonzero), |ip| nonzero(network_of(ip, asn))),
            agent: user_agent.map_or(0, |ua| nonzero(stable_hash(11, ua.as_bytes()) as u32)),
        }
    }
}

/// Set in `Seen::first` once the value is established.
const ESTABLISHED: u32 = 1 << 31;
/// Set in `Seen::first` while the value waits for a use outside an incident.
const HELD: u32 = 1 << 30;

impl Seen {
    fn minute(&self) -> u32 {
        self.first & !(ESTABLISHED | HELD)
    }

    fn is_established(&self) -> bool {
        self.first & ESTABLISHED != 0
    }
}

fn note(slots: &mut [Seen], tag: u32, now_min: u32, after_min: u32, incident: bool) {
    if tag == 0 {
        return;
    }
    if incident {
        // Values that arrived with the incident wait for it to end.
        for s in slots.iter_mut() {
            if s.tag != 0 && !s.is_established() && s.minute().saturating_add(after_min) > now_min {
                s.first |= HELD;
            }
        }
    }
    if let Some(s) = slots.iter_mut().find(|s| s.tag == tag) {
        let held = incident && s.first & HELD != 0;
        if !held && !s.is_established() && now_min >= s.minute().saturating_add(after_min) {
            s.first = (s.first & !HELD) | ESTABLISHED;
        }
        return;
    }
    // An empty slot, else the youngest value not yet established gives
    // way, else the youngest.
    let i = match slots.iter().position(|s| s.tag == 0) {
        Some(i) => i,
        None => (0..slots.len())
            .max_by_key(|&i| (!slots[i].is_established(), slots[i].minute()))
            .unwrap_or(0),
    };
    slots[i] = Seen {
        tag,
        first: (now_min & !(ESTABLISHED | HELD)) | if incident { HELD } else { 0 },
    };
}

fn established(slots: &[Seen], tag: u32) -> bool {
    tag == 0 || slots.iter().any(|s| s.tag == tag && s.is_established())
}

impl Familiar {
    /// Minute the account was first seen (0: never).
    pub fn first_seen(&self) -> u32 {
        self.since
    }

    /// Learns a record's origin at `now_min`: a value seen again
    /// `after_min` minutes or more after it was first seen is established,
    /// unless it is held and `incident` (one is open on the account).
    #[inline]
    pub fn observe(&mut self, now_min: u32, o: Origin, after_min: u32, incident: bool) {
        if self.since == 0 {
            self.since = now_min.max(1);
        }
        note(&mut self.nets, o.net, now_min, after_min, incident);
        note(&mut self.agents, o.agent, now_min, after_min, incident);
    }

    /// Judges a record's origin against the established values; an
    /// account with none established yet has no context.
    pub fn judge(&self, o: Origin) -> Context {
        let any = |slots: &[Seen]| slots.iter().any(Seen::is_established);
        if !any(&self.nets) && !any(&self.agents) {
            return Context::Unknown;
        }
        let network = !established(&self.nets, o.net);
        let agent = !established(&self.agents, o.agent);
        // A field the record leaves out says nothing either way.
        let all_new = (network || o.net == 0) && (agent || o.agent == 0);
        match (network || agent, all_new) {
            (false, _) => Context::Familiar,
            (true, true) => Context::Novel { network, agent },
            (true, false) => Context::Changed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(ip: &str, ua: &str) -> Origin {
        Origin::of(Some(ip.parse().unwrap()), None, Some(ua))
    }

    #[test]
    fn usual_origins_are_familiar_new_ones_novel_and_new_accounts_unknown() {
        let mut f = Familiar::default();
        let home = origin("203.0.113.7", "OpenAI/Python 1.54.4");
        for m in 1000..1100 {
            f.observe(m, home, 30, false);
        }
        assert_eq!(f.judge(home), Context::Familiar);
        // Another address in the same /16: the same network.
        assert_eq!(
            f.judge(origin("203.0.200.1", "OpenAI/Python 1.54.4")),
            Context::Familiar
        );
        let thief = origin("45.10.0.1", "python-requests/2.32.3");
        f.observe(1100, thief, 30, false);
        assert_eq!(
            f.judge(thief),
            Context::Novel {
                network: true,
                agent: true
            }
        );
        // One of the two new: an ordinary change.
        assert_eq!(
            f.judge(origin("45.10.0.1", "OpenAI/Python 1.54.4")),
            Context::Changed
        );
        assert_eq!(
            f.judge(origin("203.0.113.7", "python-requests/2.32.3")),
            Context::Changed
        );
        // Used again 30 minutes on, it becomes usual.
        f.observe(1120, thief, 30, false);
        assert!(f.judge(thief).is_novel());
        f.observe(1130, thief, 30, false);
        assert_eq!(f.judge(thief), Context::Familiar);
        let fresh = Familiar::default();
        assert_eq!(fresh.judge(home), Context::Unknown);
        // An account whose first twenty minutes were an attack has no
        // usual context yet: its owner's later traffic is not novel.
        let mut taken = Familiar::default();
        for m in 0..20 {
            taken.observe(5000 + m, thief, 30, false);
        }
        assert_eq!(taken.judge(home), Context::Unknown);
        // Nor does one that runs for hours while its incident is open
        // (detected from its third minute).
        let mut held = Familiar::default();
        for m in 0..180 {
            held.observe(5000 + m, thief, 30, m >= 2);
        }
        assert_eq!(held.judge(home), Context::Unknown);
        assert_eq!(held.judge(thief), Context::Unknown);
        // Once it is over, a value seen again is established at once.
        held.observe(5300, thief, 30, false);
        assert_eq!(held.judge(thief), Context::Familiar);
        // What the account used before an incident is not held by it.
        let mut busy = Familiar::default();
        busy.observe(100, home, 30, false);
        busy.observe(140, home, 30, true);
        assert_eq!(busy.judge(home), Context::Familiar);
        let mut early = Familiar::default();
        early.observe(100, home, 30, false);
        for m in 0..60 {
            early.observe(110 + m, thief, 30, true);
        }
        early.observe(171, home, 30, true);
        assert_eq!(
            early.judge(home),
            Context::Unknown,
            "first seen 10 minutes before"
        );
    }

    #[test]
    fn churn_costs_one_slot_and_established_values_stay() {
        let mut f = Familiar::default();
        let a = origin("198.51.100.1", "ua-a");
        let b = origin("192.0.2.1", "ua-a");
        for m in [10, 50] {
            f.observe(m, a, 30, false);
            f.observe(m + 1, b, 30, false);
        }
        // A roaming client: a new /16 every minute.
        for i in 0..200u32 {
            let ip = format!("{}.{}.0.1", 10 + i % 200, i % 250);
            f.observe(100 + i, origin(&ip, "ua-a"), 30, false);
        }
        assert_eq!(f.judge(a), Context::Familiar);
        assert_eq!(f.judge(b), Context::Familiar);
    }

    #[test]
    fn a_record_without_address_or_agent_is_judged_by_what_it_has() {
        let mut f = Familiar::default();
        f.observe(10, Origin::of(None, None, Some("old")), 30, false);
        f.observe(50, Origin::of(None, None, Some("old")), 30, false);
        assert_eq!(f.judge(Origin::of(None, None, None)), Context::Familiar);
        assert!(f.judge(Origin::of(None, None, Some("new"))).is_novel());
    }
}
