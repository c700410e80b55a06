//! Where batches go when there is no Postgres (`keywatch demo` on a bare
//! machine), and the tap a demo reads either way: offsets, checkpoints,
//! alerts and revocation actions kept in memory with the same fence and
//! the same once-per-id rule as the Postgres commit, plus the small
//! aggregates a live view shows (requests per minute, spend per user).
//!
//! [`Backend`] is what the pipeline commits to: Postgres, memory, or both
//! (Postgres is the truth; memory mirrors what committed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use detectors::{Action, Alert, Checkpoint, Entry, EntryKind};

use crate::{
    BatchCommit, CheckpointWrite, PartitionStart, RollupFlush, RollupRow, StorageError, Store,
};

/// One partition's checkpoint entries: state by kind and id.
type EntryStates = HashMap<(EntryKind, Box<str>), Vec<u8>>;

/// Batches kept in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each partition's next offset and rollups offset.
    offsets: HashMap<(String, i32), (i64, i64)>,
    checkpoints: HashMap<(String, i32), (i64, Vec<u8>)>,
    /// Each partition's checkpoint entries.
    entries: HashMap<(String, i32), EntryStates>,
    alert_ids: HashSet<String>,
    alerts: Vec<Alert>,
    actions: Vec<MemoryAction>,
    per_minute: BTreeMap<i64, MinuteTotals>,
    spend: HashMap<String, i64>,
    batches: u64,
}

/// A revocation action as the feed shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryAction {
    /// Position in the feed, from 1.
    pub seq: i64,
    /// The alert that issued it.
    pub alert: Alert,
}

/// Everything committed in one minute (event time), over all users.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MinuteTotals {
    /// Requests.
    pub requests: i64,
    /// Spend, micro-dollars.
    pub cost_micros: i64,
}

/// What a live view reads.
#[derive(Clone, Debug, Default)]
pub struct MemorySnapshot {
    /// Alerts, oldest first (the last `alerts_kept`).
    pub alerts: Vec<Alert>,
    /// Alerts ever committed (distinct ids).
    pub alerts_total: usize,
    /// Revocation actions after the asked-for sequence number.
    pub actions: Vec<MemoryAction>,
    /// Requests and spend per minute (unix ms of the minute), the last minutes.
    pub per_minute: Vec<(i64, MinuteTotals)>,
    /// Users with the highest spend: (user, micro-dollars), highest first.
    pub top_spenders: Vec<(String, i64)>,
    /// Users seen.
    pub users: usize,
    /// Batches committed.
    pub batches: u64,
}

impl Inner {
    /// A checkpoint valid at `at`: its core, and its entries applied.
    fn write_checkpoint(&mut self, key: (String, i32), at: i64, cp: &Checkpoint) {
        let entries = self.entries.entry(key.clone()).or_default();
        if cp.full {
            entries.clear();
        }
        for (kind, id) in &cp.forgotten {
            entries.remove(&(*kind, id.clone()));
        }
        for e in &cp.changed {
            entries.insert((e.kind, e.id.clone()), e.state.clone());
        }
        self.checkpoints.insert(key, (at, cp.core.clone()));
    }

    /// Rollups added to the live view's minutes and spend.
    fn add_rollups(&mut self, rows: &[RollupRow]) {
        for r in rows {
            let m = self.per_minute.entry(r.minute_ms).or_default();
            m.requests += r.requests;
            m.cost_micros += r.cost_micros;
            *self.spend.entry(r.user_id.clone()).or_default() += r.cost_micros;
        }
        // A live view needs the last day of minutes, not the whole history.
        while self.per_minute.len() > 24 * 60 {
            self.per_minute.pop_first();
        }
    }
}

impl MemoryStore {
    /// Where a partition resumes (nothing stored: from the start).
    pub fn load_partition(&self, topic: &str, partition: i32) -> PartitionStart {
        let inner = self.inner.lock().expect("memory store lock");
        let key = (topic.to_owned(), partition);
        PartitionStart {
            next_offset: inner.offsets.get(&key).map(|o| o.0),
            rollups_offset: inner.offsets.get(&key).map(|o| o.1),
            checkpoint: inner.checkpoints.get(&key).cloned(),
            entries: inner
                .entries
                .get(&key)
                .into_iter()
                .flatten()
                .map(|((kind, id), state)| Entry {
                    kind: *kind,
                    id: id.clone(),
                    state: state.clone(),
                })
                .collect(),
        }
    }

    /// Stores a checkpoint on its own, with [`Store::store_checkpoint`]'s
    /// rules (unpaced).
    pub fn store_checkpoint(&self, w: &CheckpointWrite<'_>) -> bool {
        let mut inner = self.inner.lock().expect("memory store lock");
        let key = (w.topic.to_owned(), w.partition);
        if !w.fits(inner.checkpoints.get(&key).map(|c| c.0)) {
            return false;
        }
        inner.write_checkpoint(key, w.at, w.checkpoint);
        true
    }

    /// Stores a batch with the Postgres commit's rules: the start offset must
    /// be the stored one (`fence`: else [`StorageError::Fenced`]); an alert
    /// id is stored once, and only a new throttle or block alert adds an action.
    pub fn commit_batch(&self, batch: &BatchCommit<'_>, fence: bool) -> Result<(), StorageError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let key = (batch.topic.to_owned(), batch.partition);
        if fence {
            if let Some(&(stored, rollups)) = inner.offsets.get(&key) {
                let expected = batch.rollups_from.filter(|_| batch.flush);
                if stored != batch.start_offset || expected.is_some_and(|r| r != rollups) {
                    return Err(StorageError::Fenced {
                        topic: batch.topic.to_owned(),
                        partition: batch.partition,
                        expected: batch.start_offset,
                        stored,
                    });
                }
            }
        }
        let rollups_at = match (batch.flush, inner.offsets.get(&key)) {
            (true, _) => batch.next_offset,
            (false, Some(&(_, at))) => at,
            (false, None) => batch.start_offset,
        };
        inner
            .offsets
            .insert(key.clone(), (batch.next_offset, rollups_at));
        if let Some(cp) = batch.checkpoint {
            inner.write_checkpoint(key, batch.next_offset, cp);
        }
        inner.add_rollups(batch.rollups);
        for a in batch.alerts {
            if !inner.alert_ids.insert(a.id.clone()) {
                continue;
            }
            if matches!(a.action, Action::Throttle | Action::Block) {
                let seq = inner.actions.len() as i64 + 1;
                inner.actions.push(MemoryAction {
                    seq,
                    alert: a.clone(),
                });
            }
            inner.alerts.push(a.clone());
        }
        inner.batches += 1;
        Ok(())
    }

    /// Writes held rollups on their own with [`Store::flush_rollups`]'s
    /// rules (`fence`: the stored rollups must end at `from`, and the
    /// offset be at `to` or past it).
    pub fn flush_rollups(&self, f: &RollupFlush<'_>, fence: bool) -> Result<(), StorageError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let key = (f.topic.to_owned(), f.partition);
        let stored = inner.offsets.get(&key).copied();
        if fence && !stored.is_some_and(|(next, rollups)| rollups == f.from && next >= f.to) {
            return Err(StorageError::RollupsFenced {
                topic: f.topic.to_owned(),
                partition: f.partition,
                expected: f.from,
                stored: stored.map_or(-1, |s| s.1),
            });
        }
        if let Some(o) = inner.offsets.get_mut(&key) {
            o.1 = f.to;
        }
        inner.add_rollups(f.rollups);
        Ok(())
    }

    /// The live view's numbers: the last `alerts_kept` alerts, actions after
    /// `after_seq`, the last `minutes` minutes and the `top` biggest spenders.
    pub fn snapshot(
        &self,
        alerts_kept: usize,
        after_seq: i64,
        minutes: usize,
        top: usize,
    ) -> MemorySnapshot {
        let inner = self.inner.lock().expect("memory store lock");
        let mut top_spenders: Vec<(String, i64)> =
            inner.spend.iter().map(|(u, c)| (u.clone(), *c)).collect();
        top_spenders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top_spenders.truncate(top);
        MemorySnapshot {
            alerts: inner.alerts[inner.alerts.len().saturating_sub(alerts_kept)..].to_vec(),
            alerts_total: inner.alerts.len(),
            actions: inner
                .actions
                .iter()
                .filter(|a| a.seq > after_seq)
                .cloned()
                .collect(),
            per_minute: inner
                .per_minute
                .iter()
                .rev()
                .take(minutes)
                .rev()
                .map(|(m, t)| (*m, *t))
                .collect(),
            top_spenders,
            users: inner.spend.len(),
            batches: inner.batches,
        }
    }
}

/// Where the pipeline commits batches: Postgres, memory, or both.
#[derive(Clone, Debug)]
pub struct Backend {
    postgres: Option<Store>,
    memory: Option<Arc<MemoryStore>>,
}

impl From<Store> for Backend {
    fn from(store: Store) -> Backend {
        Backend {
            postgres: Some(store),
            memory: None,
        }
    }
}

impl Backend {
    /// Memory only (no Postgres).
    pub fn memory(memory: Arc<MemoryStore>) -> Backend {
        Backend {
            postgres: None,
            memory: Some(memory),
        }
    }

    /// Postgres, mirrored to memory after each commit (for a live view).
    pub fn mirrored(store: Store, memory: Arc<MemoryStore>) -> Backend {
        Backend {
            postgres: Some(store),
            memory: Some(memory),
        }
    }

    /// Where a partition resumes.
    pub async fn load_partition(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionStart, StorageError> {
        match (&self.postgres, &self.memory) {
            (Some(p), _) => p.load_partition(topic, partition).await,
            (None, Some(m)) => Ok(m.load_partition(topic, partition)),
            (None, None) => unreachable!("a backend has Postgres or memory"),
        }
    }

    /// Stores a checkpoint on its own ([`Store::store_checkpoint`]); the
    /// memory mirror follows Postgres' verdict.
    pub async fn store_checkpoint(&self, w: &CheckpointWrite<'_>) -> Result<bool, StorageError> {
        let stored = match &self.postgres {
            Some(p) => p.store_checkpoint(w).await?,
            None => true,
        };
        match (&self.memory, stored) {
            // Without Postgres the memory store's verdict is the verdict.
            (Some(m), true) => Ok(m.store_checkpoint(w) || self.postgres.is_some()),
            _ => Ok(stored),
        }
    }

    /// Writes held rollups on their own ([`Store::flush_rollups`]), then
    /// to the memory mirror.
    pub async fn flush_rollups(&self, f: &RollupFlush<'_>) -> Result<(), StorageError> {
        if let Some(p) = &self.postgres {
            p.flush_rollups(f).await?;
        }
        if let Some(m) = &self.memory {
            m.flush_rollups(f, self.postgres.is_none())?;
        }
        Ok(())
    }

    /// Commits a batch (to Postgres, then to the memory mirror).
    pub async fn commit_batch(&self, batch: &BatchCommit<'_>) -> Result<(), StorageError> {
        if let Some(p) = &self.postgres {
            p.commit_batch(batch).await?;
        }
        if let Some(m) = &self.memory {
            // A mirror follows Postgres, whose fence already held.
            m.commit_batch(batch, self.postgres.is_none())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RollupRow;

    fn batch<'a>(start: i64, alerts: &'a [Alert], rollups: &'a [RollupRow]) -> BatchCommit<'a> {
        BatchCommit {
            topic: "t",
            partition: 0,
            start_offset: start,
            next_offset: start + 10,
            rollups,
            flush: true,
            rollups_from: None,
            alerts,
            checkpoint: None,
            budgets: &[],
            addresses: &[],
            sources: &[],
        }
    }

    #[test]
    fn fence_once_per_id_and_actions() {
        let m = MemoryStore::default();
        let mut a: Alert = serde_json::from_str(
            r#"{"id":"a1","kind":"leaked_key","severity":"critical","action":"block","user_id":"u","ts":"2026-11-23T00:00:00Z","reason":"r"}"#,
        )
        .unwrap();
        let rollups = [RollupRow {
            user_id: "u".into(),
            key_id: "k".into(),
            minute_ms: 60_000,
            requests: 3,
            cost_micros: 7,
            ..RollupRow::default()
        }];
        m.commit_batch(&batch(0, std::slice::from_ref(&a), &rollups), true)
            .unwrap();
        assert!(matches!(
            m.commit_batch(&batch(0, &[], &[]), true),
            Err(StorageError::Fenced { stored: 10, .. })
        ));
        a.action = Action::Notify;
        m.commit_batch(&batch(10, std::slice::from_ref(&a), &rollups), true)
            .unwrap();
        let s = m.snapshot(10, 0, 10, 10);
        assert_eq!((s.alerts_total, s.actions.len(), s.users), (1, 1, 1));
        assert_eq!(
            s.per_minute,
            vec![(
                60_000,
                MinuteTotals {
                    requests: 6,
                    cost_micros: 14
                }
            )]
        );
        assert_eq!(s.top_spenders, vec![("u".to_string(), 14)]);
        assert_eq!(m.load_partition("t", 0).next_offset, Some(20));
    }

    #[test]
    fn a_flush_behind_is_fenced_on_the_rollups_offset_as_in_postgres() {
        let m = MemoryStore::default();
        let rollups = [RollupRow {
            user_id: "u".into(),
            minute_ms: 60_000,
            requests: 2,
            ..RollupRow::default()
        }];
        let held = BatchCommit {
            flush: false,
            ..batch(0, &[], &[])
        };
        m.commit_batch(&held, true).unwrap();
        let f = |from, to| RollupFlush {
            topic: "t",
            partition: 0,
            from,
            to,
            rollups: &rollups,
            budgets: &[],
            addresses: &[],
            sources: &[],
        };
        let fenced = |r| matches!(r, Err(StorageError::RollupsFenced { .. }));
        assert!(fenced(m.flush_rollups(&f(0, 11), true)), "past the offset");
        assert!(fenced(m.flush_rollups(&f(5, 10), true)), "other rollups");
        m.flush_rollups(&f(0, 10), true).unwrap();
        assert!(fenced(m.flush_rollups(&f(0, 10), true)), "twice");
        assert_eq!(m.load_partition("t", 0).rollups_offset, Some(10));
        assert_eq!(m.snapshot(0, 0, 10, 10).per_minute[0].1.requests, 2);
    }
}
