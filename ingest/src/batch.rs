//! What one batch accumulates before its commit: per-minute rollups (the
//! lake's rows are built by [`storage::LakeRows`]). Pure bookkeeping, shared by the Kafka
//! pipeline and by anything that must compute the same rollups offline
//! (tests compare the two).

use std::collections::HashMap;

use detectors::hash::{combine, stable_hash};
use detectors::time::MINUTE_MS;
use detectors::{Event, StableBuild};
use storage::RollupRow;

/// Per-(user, key, minute) sums. Rows are allocated once per group, not per
/// record: a record finds its row through a 64-bit hash and an equality check.
#[derive(Debug, Default)]
pub struct Rollups {
    rows: Vec<RollupRow>,
    index: HashMap<u64, usize, StableBuild>,
}

impl Rollups {
    /// Adds a counted record that cost `cost_micros`.
    pub fn add(&mut self, ev: &Event<'_>, cost_micros: u64) {
        let minute_ms = ev.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let h = combine(
            combine(
                stable_hash(11, ev.user_id.as_bytes()),
                stable_hash(12, ev.key_id.as_bytes()),
            ),
            minute_ms as u64,
        );
        let matches = |r: &RollupRow| {
            r.minute_ms == minute_ms && r.user_id == *ev.user_id && r.key_id == *ev.key_id
        };
        let idx = match self.index.get(&h) {
            Some(&i) if matches(&self.rows[i]) => i,
            // A 64-bit collision between two groups: find (or make) the row the slow way.
            Some(_) => match self.rows.iter().position(matches) {
                Some(i) => i,
                None => self.push(ev, minute_ms),
            },
            None => {
                let i = self.push(ev, minute_ms);
                self.index.insert(h, i);
                i
            }
        };
        let r = &mut self.rows[idx];
        let req = ev.phase.counts_request();
        let resp = ev.phase.counts_response();
        if req {
            r.requests += 1;
            r.prompt_tokens += ev.prompt_tokens as i64;
        }
        if resp {
            r.completion_tokens += ev.completion_tokens as i64;
            if ev.status.is_some_and(|s| s >= 400) {
                r.errors += 1;
            }
            if let Some(l) = ev.latency_ms {
                r.latency_sum_ms += l as i64;
                r.latency_max_ms = r.latency_max_ms.max(l as i64);
            }
        }
        r.cost_micros += cost_micros as i64;
    }

    fn push(&mut self, ev: &Event<'_>, minute_ms: i64) -> usize {
        self.rows.push(RollupRow {
            user_id: ev.user_id.to_string(),
            key_id: ev.key_id.to_string(),
            minute_ms,
            ..Default::default()
        });
        self.rows.len() - 1
    }

    /// The rows so far.
    pub fn rows(&self) -> &[RollupRow] {
        &self.rows
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Empties the accumulator, keeping its memory.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.index.clear();
    }

    /// Folds another accumulator's rows into a map keyed by (user, key,
    /// minute): how tests total rollups across batches.
    pub fn merge_into(rows: &[RollupRow], into: &mut HashMap<(String, String, i64), RollupRow>) {
        for r in rows {
            let e = into
                .entry((r.user_id.clone(), r.key_id.clone(), r.minute_ms))
                .or_insert_with(|| RollupRow {
                    user_id: r.user_id.clone(),
                    key_id: r.key_id.clone(),
                    minute_ms: r.minute_ms,
                    ..Default::default()
                });
            e.requests += r.requests;
            e.prompt_tokens += r.prompt_tokens;
            e.completion_tokens += r.completion_tokens;
            e.cost_micros += r.cost_micros;
            e.errors += r.errors;
            e.latency_sum_ms += r.latency_sum_ms;
            e.latency_max_ms = e.latency_max_ms.max(r.latency_max_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detectors::Phase;

    #[test]
    fn rollups_group_by_user_key_minute_and_count_phases_once() {
        let mut r = Rollups::default();
        let t = 1_795_392_000_000;
        let mut req = Event::new(t + 1000, "r1", "u", "k");
        req.phase = Phase::Request;
        req.prompt_tokens = 100;
        let mut resp = Event::new(t + 2000, "r1", "u", "k");
        resp.phase = Phase::Response;
        resp.prompt_tokens = 100;
        resp.completion_tokens = 50;
        resp.status = Some(500);
        resp.latency_ms = Some(900);
        r.add(&req, 0);
        r.add(&resp, 1234);
        let mut other = Event::new(t + 61_000, "r2", "u", "k");
        other.prompt_tokens = 7;
        r.add(&other, 1);
        assert_eq!(r.rows().len(), 2);
        let first = &r.rows()[0];
        assert_eq!(
            (first.requests, first.prompt_tokens, first.completion_tokens),
            (1, 100, 50)
        );
        assert_eq!(
            (
                first.errors,
                first.latency_sum_ms,
                first.latency_max_ms,
                first.cost_micros
            ),
            (1, 900, 900, 1234)
        );
        assert_eq!(first.minute_ms, t);
        assert_eq!(r.rows()[1].minute_ms, t + 60_000);
    }
}
