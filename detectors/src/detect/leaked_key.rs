//! Keys used from many networks at once: the shape of a leaked key.
//!
//! A key normally lives on a few machines: a laptop, a server or a small
//! fleet behind one cloud's egress. A leaked key is replayed from wherever
//! the finder runs: many addresses in many autonomous systems. Per key and
//! per window of `window_minutes`, the detector counts distinct addresses
//! and distinct networks (the record's `asn`, or the /16 of an IPv4 and /32
//! of an IPv6 address when it has none). A window is suspicious when the
//! addresses reach `max(min_ips, factor × learned addresses per window)` and
//! the networks reach `min_asns`; a fleet that grows inside one cloud stays
//! quiet because it adds addresses, not networks. The learned count is an
//! EWMA over past windows that were not suspicious.
//!
//! A leak that goes on window after window is one incident: it alerts (and
//! blocks the key, with no expiry) when it begins, and the windows that
//! follow while it goes on only extend it. A key quiet for a whole window
//! and then spread again is a new incident.
//!
//! Distinct sets are kept exact but bounded: at most the bar's worth of
//! address entries, so a key costs at most about a kilobyte even under
//! attack, and a few dozen bytes at rest.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::baseline::Incident;
use crate::hash::stable_hash;

/// Most addresses tracked per key and window.
const MAX_TRACKED: usize = 128;

/// Settings.
#[derive(Clone, Copy, Debug)]
pub struct LeakParams {
    /// Window length, minutes.
    pub window_minutes: u32,
    /// Minimum distinct addresses.
    pub min_ips: u32,
    /// Minimum distinct networks.
    pub min_asns: u32,
    /// Multiple of the learned count.
    pub factor: f64,
}

/// A key's address state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakState {
    /// Start of the current window, Unix minutes.
    since: u32,
    /// Distinct addresses in the window: the address hash in the high half,
    /// its network in the low half (one allocation per key, not two).
    ips: Vec<u64>,
    /// Learned distinct addresses per window.
    learned: f32,
    /// Whether this window was already found suspicious.
    alerted: bool,
    /// The leak under way, in minutes: suspicious windows extend it.
    #[serde(default)]
    incident: Incident,
}

/// A detected spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Leak {
    /// Distinct addresses in the window.
    pub ips: u32,
    /// Distinct networks in the window.
    pub networks: u32,
    /// Learned addresses per window.
    pub baseline: f64,
    /// The address bar crossed.
    pub threshold: f64,
    /// Window start, Unix minutes.
    pub since: u32,
}

pub(crate) fn network_of(ip: IpAddr, asn: Option<u32>) -> u32 {
    match (asn, ip) {
        (Some(a), _) => a,
        (None, IpAddr::V4(v4)) => {
            let o = v4.octets();
            0x8000_0000 | (o[0] as u32) << 8 | o[1] as u32
        }
        (None, IpAddr::V6(v6)) => {
            let s = v6.segments();
            stable_hash(
                6,
                &[(s[0] >> 8) as u8, s[0] as u8, (s[1] >> 8) as u8, s[1] as u8],
            ) as u32
                | 0x4000_0000
        }
    }
}

fn ip_hash(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => stable_hash(4, &v4.octets()) as u32,
        IpAddr::V6(v6) => stable_hash(6, &v6.octets()) as u32,
    }
}

impl LeakState {
    /// Counts a request from `ip` (in network `asn`) at minute `now_min`.
    #[inline]
    pub fn on_address(
        &mut self,
        now_min: u32,
        ip: IpAddr,
        asn: Option<u32>,
        p: &LeakParams,
    ) -> Option<Leak> {
        if now_min >= self.since + p.window_minutes {
            if !self.alerted && self.since != 0 {
                let n = self.ips.len() as f32;
                self.learned = if self.learned == 0.0 {
                    n
                } else {
                    0.9 * self.learned + 0.1 * n
                };
            }
            self.since = now_min;
            self.ips.clear();
            if self.ips.capacity() > 8 {
                self.ips.shrink_to(2);
            }
            self.alerted = false;
        }
        let bar = (p.factor * self.learned as f64).max(p.min_ips as f64);
        let entry = (ip_hash(ip) as u64) << 32 | network_of(ip, asn) as u64;
        if self.ips.len() < MAX_TRACKED && !self.ips.iter().any(|e| e >> 32 == entry >> 32) {
            self.ips.push(entry);
        }
        if self.alerted || (self.ips.len() as f64) < bar.min(MAX_TRACKED as f64) {
            return None;
        }
        // Networks are counted only once the addresses pass their bar.
        let mut nets: Vec<u32> = self.ips.iter().map(|e| *e as u32).collect();
        nets.sort_unstable();
        nets.dedup();
        if nets.len() < p.min_asns as usize {
            return None;
        }
        self.alerted = true;
        // A window ends at most `window_minutes` after this detection, and
        // the next one is suspicious within another window if it goes on.
        if !self.incident.begins(now_min, 2 * p.window_minutes) {
            return None;
        }
        Some(Leak {
            ips: self.ips.len() as u32,
            networks: nets.len() as u32,
            baseline: self.learned as f64,
            threshold: bar.ceil(),
            since: self.since,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LeakParams = LeakParams {
        window_minutes: 10,
        min_ips: 8,
        min_asns: 3,
        factor: 3.0,
    };

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
    }

    #[test]
    fn a_fleet_in_one_cloud_is_quiet_and_a_leak_is_caught() {
        let mut s = LeakState::default();
        // 20 addresses in one AS for hours: a fleet.
        for m in 0..300u32 {
            for i in 0..20u8 {
                assert_eq!(
                    s.on_address(1000 + m, v4(34, 1, i, 9), Some(16509), &P),
                    None
                );
            }
        }
        // A leak: addresses across many networks within one minute.
        let mut s = LeakState::default();
        for m in 0..300u32 {
            assert_eq!(
                s.on_address(1000 + m, v4(203, 0, 113, 7), Some(64500), &P),
                None
            );
        }
        let mut hit = None;
        for i in 0..40u8 {
            if let Some(l) = s.on_address(1300, v4(100 + i, i, 1, 1), Some(1000 + i as u32), &P) {
                hit.get_or_insert((i, l));
            }
        }
        let (i, l) = hit.expect("leak caught");
        assert!(i < 10, "caught after {} addresses", i + 1);
        assert!(l.ips >= 8 && l.networks >= 3);
    }

    #[test]
    fn a_leak_going_on_is_one_incident() {
        let mut s = LeakState::default();
        let mut alerts = Vec::new();
        // Twelve addresses in twelve networks every minute for an hour.
        for m in 0..60u32 {
            for i in 0..12u8 {
                let ip = v4(100 + i, (m % 200) as u8, 1, 1);
                if let Some(l) = s.on_address(2000 + m, ip, Some(1000 + i as u32), &P) {
                    alerts.push((m, l.since));
                }
            }
        }
        assert_eq!(alerts, vec![(0, 2000)], "one alert, in the first window");
        // Quiet for a while, from one address; then spread again: a new one.
        for m in 60..120u32 {
            assert_eq!(
                s.on_address(2000 + m, v4(203, 0, 113, 7), Some(64500), &P),
                None
            );
        }
        let again = (0..12u8)
            .find_map(|i| s.on_address(2120, v4(100 + i, 7, 1, 1), Some(1000 + i as u32), &P));
        assert_eq!(again.map(|l| l.since), Some(2120));
    }

    #[test]
    fn networks_fall_back_to_prefixes_without_asn() {
        assert_eq!(
            network_of(v4(10, 1, 2, 3), None),
            network_of(v4(10, 1, 9, 9), None)
        );
        assert_ne!(
            network_of(v4(10, 1, 2, 3), None),
            network_of(v4(10, 2, 2, 3), None)
        );
    }
}
