//! Stage two's event-time order, and its exactly-once filter.
//!
//! A stage-two partition hears from every stage-one partition (a *source*),
//! each in its own order and at its own speed: a source that crashed and
//! restarted is minutes behind the rest. Detectors keyed by an address see
//! that address's records from many sources, so taking them as they arrive
//! would make every decision depend on which source ran faster, and an
//! offline replay would decide differently from the service. Instead, the
//! merge holds each projection until every source has passed its event
//! time by `lateness` (each frame carries its source's *frontier*, the
//! largest event time stage one has seen there) and releases them in
//! (event time, request hash) order: the same order wherever the records
//! came from, so `keywatch replay` and `keywatch run` decide alike. A
//! source whose stage-one worker found no records for a while says it is
//! idle and is not waited for. A projection that arrives after its turn
//! (later than `lateness` behind every source, or behind an idle source's
//! wake-up) is taken at once and counted as *late*; past `max_buffered`
//! the oldest go first, counted as *forced*, so a stalled source costs
//! order, never memory without bound.
//!
//! **Exactly once.** Stage one writes a batch's frames before it commits
//! the batch, so a crash can write them twice, and a stage-one worker that
//! lost its partition can still be writing while the new owner writes the
//! same records again. Within one source the records come in source order,
//! so each source's high-water mark (the last position taken) says what is
//! a repeat: a projection at or before it is dropped. The marks live in
//! the merge's state, which is checkpointed with the stage-two engine and
//! rebuilt exactly by re-reading, as stage one's engine is.
//!
//! Every decision here is a function of the frames' content and order
//! within the stage-two partition, never of a clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

use super::projection::{FrameHeader, Projection, Seq};

/// One source (a stage-one partition) as the merge knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The last position taken from it (None: nothing yet).
    pub mark: Option<Seq>,
    /// The largest event time it has reported, Unix ms.
    pub frontier_ms: i64,
    /// It reported no records for a while.
    pub idle: bool,
}

/// A topic the merge has heard from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Its name.
    pub name: String,
    /// Partitions the topic has (the most any frame reported).
    pub partitions: u32,
}

/// A source: its topic (an index into the topics), partition and state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// Index of its topic.
    pub topic: usize,
    /// Its partition.
    pub partition: i32,
    /// Where it stands.
    pub source: Source,
}

/// A source's place in the merge, as [`Merge::header`] returns it.
pub type SourceId = usize;

/// A projection waiting for its turn, ordered by (event time, request hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting(pub Projection);

impl Ord for Waiting {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0.ts_ms, self.0.rid, self.0.kinds.0).cmp(&(o.0.ts_ms, o.0.rid, o.0.kinds.0))
    }
}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// What became of an offered projection.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Already taken before: dropped.
    Repeat,
    /// Waiting for its turn.
    Held,
    /// Behind the released time already: take it now.
    Late(Projection),
}

/// Counters of the merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeStats {
    /// Projections dropped as repeats of ones taken.
    pub repeats: u64,
    /// Projections taken on arrival, behind the released time.
    pub late: u64,
    /// Projections released early because too many were waiting.
    pub forced: u64,
}

/// The merge's state: sources, marks and what is waiting.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Merge {
    /// Topics heard from (a handful).
    topics: Vec<Topic>,
    /// Sources heard from (a topic's partitions: dozens), found by a scan.
    sources: Vec<SourceEntry>,
    /// Waiting projections, oldest first when popped.
    #[serde(with = "heap")]
    waiting: BinaryHeap<Reverse<Waiting>>,
    /// Event time released up to (never moves back).
    released_ms: i64,
    /// Counters.
    pub stats: MergeStats,
}

impl PartialEq for Merge {
    fn eq(&self, o: &Merge) -> bool {
        let sorted = |h: &BinaryHeap<Reverse<Waiting>>| {
            let mut v: Vec<Waiting> = h.iter().map(|r| r.0.clone()).collect();
            v.sort();
            v
        };
        self.topics == o.topics
            && self.sources == o.sources
            && self.released_ms == o.released_ms
            && self.stats == o.stats
            && sorted(&self.waiting) == sorted(&o.waiting)
    }
}

mod heap {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        h: &BinaryHeap<Reverse<Waiting>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut v: Vec<&Waiting> = h.iter().map(|r| &r.0).collect();
        v.sort();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BinaryHeap<Reverse<Waiting>>, D::Error> {
        let v: Vec<Waiting> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(Reverse).collect())
    }
}

impl Merge {
    /// A merge that has heard from nobody.
    pub fn new() -> Merge {
        Merge {
            released_ms: i64::MIN,
            ..Merge::default()
        }
    }

    /// Takes a frame's header: the source's partition count, frontier and
    /// idleness; returns the source's id for [`Merge::offer`].
    pub fn header(&mut self, h: &FrameHeader<'_>) -> SourceId {
        let t = match self.topics.iter().position(|t| t.name == h.topic) {
            Some(t) => t,
            None => {
                self.topics.push(Topic {
                    name: h.topic.to_owned(),
                    partitions: 0,
                });
                self.topics.len() - 1
            }
        };
        self.topics[t].partitions = self.topics[t].partitions.max(h.partitions);
        let id = match self
            .sources
            .iter()
            .position(|e| e.partition == h.partition && e.topic == t)
        {
            Some(id) => id,
            None => {
                self.sources.push(SourceEntry {
                    topic: t,
                    partition: h.partition,
                    source: Source {
                        mark: None,
                        frontier_ms: i64::MIN,
                        idle: false,
                    },
                });
                self.sources.len() - 1
            }
        };
        self.advance(id, h.frontier_ms, h.idle);
        id
    }

    /// A source's news without a frame: its frontier and idleness.
    pub fn advance(&mut self, id: SourceId, frontier_ms: i64, idle: bool) {
        let s = &mut self.sources[id].source;
        s.frontier_ms = s.frontier_ms.max(frontier_ms);
        s.idle = idle;
    }

    /// Offers a projection from source `id` (from its frame's header): a
    /// repeat is dropped, one behind the released time is handed back to be
    /// taken now, the rest wait.
    pub fn offer(&mut self, id: SourceId, p: Projection) -> Offered {
        let s = &mut self.sources[id].source;
        if s.mark.is_some_and(|m| p.seq <= m) {
            self.stats.repeats += 1;
            return Offered::Repeat;
        }
        s.mark = Some(p.seq);
        if p.ts_ms <= self.released_ms {
            self.stats.late += 1;
            return Offered::Late(p);
        }
        self.waiting.push(Reverse(Waiting(p)));
        Offered::Held
    }

    /// The time every source has passed by `lateness_ms`: the slowest
    /// non-idle source's frontier minus the lateness (a source of a known
    /// topic never heard from holds it back); with every source idle, the
    /// newest frontier.
    pub fn watermark(&self, lateness_ms: i64) -> i64 {
        let mut slowest: Option<i64> = None;
        let mut newest = i64::MIN;
        for (t, topic) in self.topics.iter().enumerate() {
            let mut heard = 0u32;
            for e in self.sources.iter().filter(|e| e.topic == t) {
                if (e.partition as u32) < topic.partitions {
                    heard += 1;
                }
                let s = &e.source;
                newest = newest.max(s.frontier_ms);
                if !s.idle {
                    slowest = Some(slowest.map_or(s.frontier_ms, |m| m.min(s.frontier_ms)));
                }
            }
            if heard < topic.partitions {
                // A partition of a known topic never heard from holds it back.
                slowest = Some(i64::MIN);
            }
        }
        match slowest {
            Some(f) => f.saturating_sub(lateness_ms),
            None => newest,
        }
    }

    /// Hands over, oldest first, every projection whose turn has come
    /// (`watermark`), and the oldest beyond `max_waiting`.
    pub fn release(
        &mut self,
        watermark: i64,
        max_waiting: usize,
        mut take: impl FnMut(Projection),
    ) {
        self.released_ms = self.released_ms.max(watermark);
        while let Some(Reverse(w)) = self.waiting.peek() {
            if w.0.ts_ms <= self.released_ms {
                let Reverse(Waiting(p)) = self.waiting.pop().expect("peeked");
                take(p);
            } else if self.waiting.len() > max_waiting {
                let Reverse(Waiting(p)) = self.waiting.pop().expect("peeked");
                self.stats.forced += 1;
                self.released_ms = self.released_ms.max(p.ts_ms);
                take(p);
            } else {
                break;
            }
        }
    }

    /// Hands over everything waiting (the end of a replay).
    pub fn drain(&mut self, take: impl FnMut(Projection)) {
        self.release(i64::MAX, 0, take);
    }

    /// Projections waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sources heard from.
    pub fn sources(&self) -> impl Iterator<Item = (&str, i32, &Source)> {
        self.sources
            .iter()
            .map(|e| (self.topics[e.topic].name.as_str(), e.partition, &e.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Phase;
    use crate::subject::projection::Kinds;

    fn p(ts: i64, offset: i64) -> Projection {
        Projection {
            ts_ms: ts,
            rid: offset as u64,
            seq: Seq::new(offset, None),
            kinds: Kinds::ADDRESS,
            phase: Phase::Exchange,
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 1,
            cost_micros: 1,
            ip: None,
            asn: None,
            flags: 0,
            user: "u".into(),
            key: "k".into(),
            fingerprint: None,
        }
    }

    fn h(partition: i32, frontier_ms: i64, idle: bool) -> FrameHeader<'static> {
        FrameHeader {
            topic: "t",
            partition,
            partitions: 2,
            frontier_ms,
            idle,
        }
    }

    fn taken(m: &mut Merge, lateness: i64) -> Vec<i64> {
        let mut out = vec![];
        let w = m.watermark(lateness);
        m.release(w, 1000, |p| out.push(p.ts_ms));
        out
    }

    #[test]
    fn records_wait_for_the_slowest_source_and_come_out_in_time_order() {
        let mut m = Merge::new();
        // Source 0 races ahead to t=100; source 1 has said nothing.
        m.header(&h(0, 100, false));
        for (i, ts) in [10, 50, 100].into_iter().enumerate() {
            assert_eq!(m.offer(0, p(ts, i as i64)), Offered::Held);
        }
        assert_eq!(taken(&mut m, 5), Vec::<i64>::new(), "partition 1 unheard");
        // Source 1 catches up to t=40.
        m.header(&h(1, 40, false));
        for (i, ts) in [5, 30, 40].into_iter().enumerate() {
            m.offer(1, p(ts, i as i64));
        }
        assert_eq!(taken(&mut m, 5), vec![5, 10, 30], "up to 40 - 5");
        m.header(&h(1, 200, false));
        assert_eq!(taken(&mut m, 5), vec![40, 50], "up to 100 - 5");
        // Source 0 goes idle: only source 1 is waited for.
        m.header(&h(0, 100, true));
        assert_eq!(taken(&mut m, 5), vec![100]);
        // A record behind what was released is taken at once.
        assert!(matches!(m.offer(1, p(60, 9)), Offered::Late(_)));
        assert_eq!(m.stats.late, 1);
    }

    #[test]
    fn the_order_does_not_depend_on_how_sources_interleave() {
        // Each source in its own time order (jittered), the two interleaved.
        let records: Vec<(i32, i64)> = (0..200)
            .map(|i| ((i % 3 == 0) as i32, i * 7 + (i * 13 % 5)))
            .collect();
        let run = |first: i32| {
            let mut m = Merge::new();
            let mut out = vec![];
            let mut offsets = [0i64; 2];
            let order: Vec<&(i32, i64)> = records
                .iter()
                .filter(|r| r.0 == first)
                .chain(records.iter().filter(|r| r.0 != first))
                .collect();
            let mut frontier = [i64::MIN; 2];
            for (src, ts) in order {
                frontier[*src as usize] = frontier[*src as usize].max(*ts);
                let id = m.header(&h(*src, frontier[*src as usize], false));
                offsets[*src as usize] += 1;
                if let Offered::Late(q) = m.offer(id, p(*ts, offsets[*src as usize])) {
                    out.push(q.ts_ms);
                }
                let w = m.watermark(10);
                m.release(w, 10_000, |q| out.push(q.ts_ms));
            }
            m.drain(|q| out.push(q.ts_ms));
            out
        };
        let (a, b) = (run(0), run(1));
        assert_eq!(a.len(), 200);
        assert_eq!(a, b, "the same order whichever source ran first");
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn repeats_are_dropped_by_position() {
        let mut m = Merge::new();
        m.header(&h(0, 10, false));
        m.header(&h(1, 10, false));
        for o in 0..5 {
            assert_eq!(m.offer(0, p(1 + o, o)), Offered::Held);
        }
        // The same batch again (a crash before stage one's commit), and a
        // longer one overlapping it.
        for o in 0..8 {
            let r = m.offer(0, p(1 + o, o));
            assert_eq!(r == Offered::Repeat, o < 5, "offset {o}");
        }
        assert_eq!(m.stats.repeats, 5);
        assert_eq!(m.waiting(), 8);
        // The marks survive a checkpoint.
        let m2: Merge = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(m2, m);
    }

    #[test]
    fn a_stalled_source_costs_order_not_memory() {
        let mut m = Merge::new();
        m.header(&h(0, 1_000_000, false));
        m.header(&h(1, 0, false));
        let mut out = vec![];
        for o in 0..100 {
            m.offer(0, p(100 + o, o));
            let w = m.watermark(0);
            m.release(w, 10, |q| out.push(q.ts_ms));
        }
        assert_eq!(m.waiting(), 10);
        assert_eq!(m.stats.forced, 90);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
    }
}
