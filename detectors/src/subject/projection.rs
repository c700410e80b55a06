//! The projection: what stage one tells stage two about one counted record,
//! and the frame that carries a batch's projections to one stage-two
//! partition.
//!
//! A projection is the few fields the subject detectors need (time, account,
//! key, address, network, status, usage, a farming sighting) plus where the
//! record came from (its source offset, for exactly-once). Stage one routes
//! it to every subject it belongs to: its address, its address's /24 (IPv4)
//! or /64 (IPv6), its key, and its prompt fingerprint when the account has
//! just started repeating that prompt. The subject's hash picks the
//! stage-two partition, as a Kafka key would; what is routed to the same
//! partition travels once, with a bit per subject.
//!
//! **The frame.** Per stage-one batch, each stage-two partition gets one
//! message: the source (topic, partition, the topic's partition count), the
//! source's event-time *frontier* (the largest event time stage one has
//! seen on it), whether the source is idle, and the batch's projections for
//! that partition in source order. The frames are what stage two's event
//! time runs on (see [`super::merge`]): every partition hears from every
//! source at every batch, even when it has nothing for it.
//!
//! Binary, little-endian, versioned by a magic: a frame of a later version
//! is refused with an error naming it, never misread. Every length is
//! checked against what is left; text must be UTF-8.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::event::Phase;
use crate::hash::stable_hash;

/// The first bytes of every frame (and its version).
pub const MAGIC: &[u8; 4] = b"KWP1";

/// The most projections one frame may claim (a frame claiming more is
/// refused before anything is allocated).
pub const MAX_ENTRIES: u32 = 1 << 24;

/// A frame's body is cut into messages of about this many bytes (well under
/// the 1 MB a Kafka message may have by default): a big batch is several
/// frames to the same partition, in order.
pub const FRAME_BYTES: usize = 256 * 1024;

/// Where in its source a record sits: its offset and, for a record that was
/// an element of a JSON array, its index plus one (0: not in an array).
/// Ordered, so "already seen" is a comparison.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Seq {
    /// The source offset.
    pub offset: i64,
    /// The array element plus one (0: the message was one record).
    pub element: u32,
}

impl Seq {
    /// The position of a message's record (`element`: its index in an array).
    pub fn new(offset: i64, element: Option<u32>) -> Seq {
        Seq {
            offset,
            element: element.map_or(0, |e| e.saturating_add(1)),
        }
    }
}

/// The subjects a projection is routed to (a bit each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Kinds(pub u8);

impl Kinds {
    /// The record's address.
    pub const ADDRESS: Kinds = Kinds(1);
    /// The record's address's /24 (IPv4) or /64 (IPv6).
    pub const NETWORK: Kinds = Kinds(2);
    /// The record's key.
    pub const KEY: Kinds = Kinds(4);
    /// The record's prompt fingerprint (a farming sighting).
    pub const FINGERPRINT: Kinds = Kinds(8);

    /// Whether every bit of `k` is set.
    pub fn has(self, k: Kinds) -> bool {
        self.0 & k.0 == k.0
    }
}

impl std::ops::BitOr for Kinds {
    type Output = Kinds;
    fn bitor(self, o: Kinds) -> Kinds {
        Kinds(self.0 | o.0)
    }
}

/// The account was first seen by stage one within the young window (and
/// stage one has watched long enough for that to mean something).
pub const YOUNG: u8 = 1;
/// This record made its account a repeater of its prompt (its second
/// sighting in the repeat window): a farming sighting.
pub const FARMING: u8 = 2;

/// What stage two knows of one counted record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Projection {
    /// Event time, Unix ms (as stage one counted it).
    pub ts_ms: i64,
    /// A hash of the record's request id and phase: ties in event time are
    /// broken by it, so the order is the same wherever the records come from.
    pub rid: u64,
    /// Its place in its source.
    pub seq: Seq,
    /// The subjects this copy is for.
    pub kinds: Kinds,
    /// Which part of the request the record describes.
    pub phase: Phase,
    /// HTTP status (0: none logged).
    pub status: u16,
    /// Input tokens counted.
    pub prompt_tokens: u32,
    /// Output tokens counted.
    pub completion_tokens: u32,
    /// Spend counted, micro-dollars.
    pub cost_micros: u64,
    /// The client address.
    pub ip: Option<IpAddr>,
    /// The address's network number.
    pub asn: Option<u32>,
    /// [`YOUNG`], [`FARMING`] (stage two judges hosting networks by
    /// `asn`, against its own `subjects.hosting_asns`).
    pub flags: u8,
    /// The account.
    pub user: Box<str>,
    /// The key.
    pub key: Box<str>,
    /// The prompt fingerprint, on farming sightings.
    pub fingerprint: Option<Box<str>>,
}

impl Projection {
    /// Whether the gateway refused it for its credentials (401, 403).
    pub fn auth_failure(&self) -> bool {
        matches!(self.status, 401 | 403)
    }

    /// Whether the record counts the request itself (rates, accounts per address).
    pub fn counts_request(&self) -> bool {
        self.phase.counts_request()
    }

    /// Every subject the record belongs to (one engine judging them all,
    /// as `keywatch replay` has).
    pub fn every_subject(&self) -> Kinds {
        let mut k = Kinds::KEY;
        if self.ip.is_some() {
            k = k | Kinds::ADDRESS | Kinds::NETWORK;
        }
        if self.flags & FARMING != 0 && self.fingerprint.is_some() {
            k = k | Kinds::FINGERPRINT;
        }
        k
    }
}

/// A subject's routing hash.
pub fn subject_hash(kind: Kinds, subject: &[u8]) -> u64 {
    stable_hash(0x5B1E_C700 | kind.0 as u64, subject)
}

/// The /24 of an IPv4 address or the /64 of an IPv6 one, as text
/// (`203.0.113.0/24`, `2001:db8:1:2::/64`).
pub fn network_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// A hash of the address's /24 (/64), naming its network without text.
pub fn network_key(ip: IpAddr) -> u64 {
    let mut b = [0u8; 9];
    subject_hash(Kinds::NETWORK, prefix_bytes(ip, &mut b))
}

/// The prefix's bytes for hashing (no allocation).
fn prefix_bytes(ip: IpAddr, out: &mut [u8; 9]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[1..4].copy_from_slice(&v4.octets()[..3]);
            &out[..4]
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[1..9].copy_from_slice(&v6.octets()[..8]);
            &out[..9]
        }
    }
}

fn ip_bytes(ip: IpAddr, out: &mut [u8; 17]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
            &out[..5]
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&v6.octets());
            &out[..17]
        }
    }
}

/// The stage-two partition of each subject the projection belongs to, with
/// its bit; `None` where the record has no such subject. `partitions` is at
/// least 1.
pub fn routes(p: &Projection, partitions: u32) -> [Option<(u32, Kinds)>; 4] {
    let n = partitions.max(1) as u64;
    let at = |h: u64| (h % n) as u32;
    let mut out = [None; 4];
    if let Some(ip) = p.ip {
        let mut b = [0u8; 17];
        out[0] = Some((
            at(subject_hash(Kinds::ADDRESS, ip_bytes(ip, &mut b))),
            Kinds::ADDRESS,
        ));
        out[1] = Some((at(network_key(ip)), Kinds::NETWORK));
    }
    out[2] = Some((at(subject_hash(Kinds::KEY, p.key.as_bytes())), Kinds::KEY));
    if p.flags & FARMING != 0 {
        if let Some(fp) = &p.fingerprint {
            out[3] = Some((
                at(subject_hash(Kinds::FINGERPRINT, fp.as_bytes())),
                Kinds::FINGERPRINT,
            ));
        }
    }
    out
}

/// The header of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader<'a> {
    /// The source topic.
    pub topic: &'a str,
    /// The source partition.
    pub partition: i32,
    /// How many partitions the source topic has.
    pub partitions: u32,
    /// The largest event time stage one has seen on the source, Unix ms
    /// (`i64::MIN`: none yet).
    pub frontier_ms: i64,
    /// The source has had no records for a while: stage two does not wait
    /// for it.
    pub idle: bool,
}

/// Builds one batch's frames, one per stage-two partition.
#[derive(Debug, Default)]
pub struct FrameWriter {
    /// Entries per partition, encoded.
    bodies: Vec<Vec<u8>>,
    /// Entries per partition.
    counts: Vec<u32>,
    /// Per partition, where each full chunk of the body ends (byte, entries).
    cuts: Vec<Vec<(usize, u32)>>,
}

impl FrameWriter {
    /// A writer for `partitions` stage-two partitions (at least 1).
    pub fn new(partitions: u32) -> FrameWriter {
        let n = partitions.max(1) as usize;
        FrameWriter {
            bodies: vec![Vec::new(); n],
            counts: vec![0; n],
            cuts: vec![Vec::new(); n],
        }
    }

    /// Stage-two partitions written to.
    pub fn partitions(&self) -> u32 {
        self.bodies.len() as u32
    }

    /// Routes `p` to each of its subjects' partitions (its `kinds` are
    /// ignored: each copy gets the bits of the subjects in its partition).
    pub fn add(&mut self, p: &Projection) {
        let routes = routes(p, self.partitions());
        let mut done = [u32::MAX; 4];
        for (i, r) in routes.iter().enumerate() {
            let Some((part, _)) = *r else { continue };
            if done.contains(&part) {
                continue;
            }
            done[i] = part;
            let kinds = routes
                .iter()
                .flatten()
                .filter(|(q, _)| *q == part)
                .fold(Kinds::default(), |acc, (_, k)| acc | *k);
            let (body, count) = (
                &mut self.bodies[part as usize],
                &mut self.counts[part as usize],
            );
            encode_entry(p, kinds, body);
            *count += 1;
            let cuts = &mut self.cuts[part as usize];
            let since = cuts.last().map_or(0, |c| c.0);
            if body.len() - since >= FRAME_BYTES {
                cuts.push((body.len(), *count));
            }
        }
    }

    /// Projections added so far, over every partition.
    pub fn entries(&self) -> u64 {
        self.counts.iter().map(|&c| c as u64).sum()
    }

    /// The frames of every partition, header first: `(partition, frame)`
    /// in order, at least one per partition (a big body is cut into frames
    /// of about [`FRAME_BYTES`]); the writer is empty again afterwards.
    pub fn finish(&mut self, h: &FrameHeader<'_>) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.bodies.len());
        for (part, ((body, count), cuts)) in self
            .bodies
            .iter_mut()
            .zip(self.counts.iter_mut())
            .zip(self.cuts.iter_mut())
            .enumerate()
        {
            let last = (body.len(), *count);
            let mut from = (0usize, 0u32);
            for (to, upto) in cuts.iter().copied().chain(std::iter::once(last)) {
                // A cut right at the end leaves nothing after it.
                if (to, upto) == from && from != (0, 0) {
                    continue;
                }
                let mut f = Vec::with_capacity(64 + h.topic.len() + to - from.0);
                write_header(h, upto - from.1, &mut f);
                f.extend_from_slice(&body[from.0..to]);
                out.push((part as u32, f));
                from = (to, upto);
            }
            body.clear();
            cuts.clear();
            *count = 0;
        }
        out
    }
}

fn write_header(h: &FrameHeader<'_>, count: u32, f: &mut Vec<u8>) {
    f.extend_from_slice(MAGIC);
    let topic = &h.topic.as_bytes()[..h.topic.len().min(u16::MAX as usize)];
    f.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    f.extend_from_slice(topic);
    f.extend_from_slice(&h.partition.to_le_bytes());
    f.extend_from_slice(&h.partitions.to_le_bytes());
    f.extend_from_slice(&h.frontier_ms.to_le_bytes());
    f.push(h.idle as u8);
    f.extend_from_slice(&count.to_le_bytes());
}

const HAS_IP: u8 = 1;
const V6: u8 = 2;
const HAS_ASN: u8 = 4;
const HAS_FP: u8 = 8;

fn put_str(s: &str, f: &mut Vec<u8>) {
    let b = &s.as_bytes()[..floor_char_boundary(s, u16::MAX as usize)];
    f.extend_from_slice(&(b.len() as u16).to_le_bytes());
    f.extend_from_slice(b);
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn encode_entry(p: &Projection, kinds: Kinds, f: &mut Vec<u8>) {
    f.push(kinds.0);
    f.extend_from_slice(&p.ts_ms.to_le_bytes());
    f.extend_from_slice(&p.rid.to_le_bytes());
    f.extend_from_slice(&p.seq.offset.to_le_bytes());
    f.extend_from_slice(&p.seq.element.to_le_bytes());
    f.push(p.phase as u8);
    f.extend_from_slice(&p.status.to_le_bytes());
    f.extend_from_slice(&p.prompt_tokens.to_le_bytes());
    f.extend_from_slice(&p.completion_tokens.to_le_bytes());
    f.extend_from_slice(&p.cost_micros.to_le_bytes());
    f.push(p.flags);
    let fp = p
        .fingerprint
        .as_deref()
        .filter(|_| kinds.has(Kinds::FINGERPRINT));
    let mut bits = 0u8;
    if let Some(ip) = p.ip {
        bits |= HAS_IP | if ip.is_ipv6() { V6 } else { 0 };
    }
    if p.asn.is_some() {
        bits |= HAS_ASN;
    }
    if fp.is_some() {
        bits |= HAS_FP;
    }
    f.push(bits);
    match p.ip {
        Some(IpAddr::V4(v4)) => f.extend_from_slice(&v4.octets()),
        Some(IpAddr::V6(v6)) => f.extend_from_slice(&v6.octets()),
        None => {}
    }
    if let Some(a) = p.asn {
        f.extend_from_slice(&a.to_le_bytes());
    }
    put_str(&p.user, f);
    put_str(&p.key, f);
    if let Some(fp) = fp {
        put_str(fp, f);
    }
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with [`MAGIC`] (another version, or not a frame).
    #[error("not a keywatch projection frame of version 1 (first bytes {0:02x?})")]
    Magic(Vec<u8>),
    /// The frame ended inside a field.
    #[error("frame cut short at byte {at}, reading {field}")]
    Short {
        /// Byte offset.
        at: usize,
        /// The field being read.
        field: &'static str,
    },
    /// A field's value is impossible.
    #[error("frame byte {at}: {field}: {problem}")]
    Bad {
        /// Byte offset.
        at: usize,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// A frame read from bytes: its header, and its projections one by one.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The header.
    pub header: FrameHeader<'a>,
    /// Projections the frame holds.
    pub count: u32,
    body: &'a [u8],
    at: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        if self.b.len() - self.at < n {
            return Err(FrameError::Short { at: self.at, field });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2, field)?.try_into().unwrap()))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4, field)?.try_into().unwrap()))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8, field)?.try_into().unwrap()))
    }
    fn str(&mut self, field: &'static str) -> Result<&'a str, FrameError> {
        let n = self.u16(field)? as usize;
        let at = self.at;
        std::str::from_utf8(self.take(n, field)?).map_err(|_| FrameError::Bad {
            at,
            field,
            problem: "not UTF-8",
        })
    }
}

impl<'a> Frame<'a> {
    /// Reads a frame's header; its projections come from [`Frame::next`].
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(FrameError::Magic(bytes[..bytes.len().min(4)].to_vec()));
        }
        let mut r = Reader { b: bytes, at: 4 };
        let topic = r.str("topic")?;
        let partition = r.u32("partition")? as i32;
        let partitions = r.u32("partitions")?;
        let frontier_ms = r.u64("frontier")? as i64;
        let at = r.at;
        let idle = match r.u8("idle")? {
            0 => false,
            1 => true,
            _ => {
                return Err(FrameError::Bad {
                    at,
                    field: "idle",
                    problem: "neither 0 nor 1",
                })
            }
        };
        let at = r.at;
        let count = r.u32("count")?;
        if count > MAX_ENTRIES || partition < 0 || partitions == 0 || partition as u32 >= partitions
        {
            return Err(FrameError::Bad {
                at,
                field: "header",
                problem: "partition outside the topic, or too many projections",
            });
        }
        Ok(Frame {
            header: FrameHeader {
                topic,
                partition,
                partitions,
                frontier_ms,
                idle,
            },
            count,
            body: bytes,
            at: r.at,
        })
    }

    /// The next projection, `Ok(None)` after the last; an error leaves the
    /// rest of the frame unread.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Projection>, FrameError> {
        if self.count == 0 {
            if self.at != self.body.len() {
                return Err(FrameError::Bad {
                    at: self.at,
                    field: "frame",
                    problem: "bytes after the last projection",
                });
            }
            return Ok(None);
        }
        let mut r = Reader {
            b: self.body,
            at: self.at,
        };
        let kinds = Kinds(r.u8("kinds")?);
        let ts_ms = r.u64("ts")? as i64;
        let rid = r.u64("rid")?;
        let offset = r.u64("offset")? as i64;
        let element = r.u32("element")?;
        let at = r.at;
        let phase = match r.u8("phase")? {
            0 => Phase::Exchange,
            1 => Phase::Request,
            2 => Phase::Response,
            _ => {
                return Err(FrameError::Bad {
                    at,
                    field: "phase",
                    problem: "unknown phase",
                })
            }
        };
        let status = r.u16("status")?;
        let prompt_tokens = r.u32("prompt_tokens")?;
        let completion_tokens = r.u32("completion_tokens")?;
        let cost_micros = r.u64("cost")?;
        let flags = r.u8("flags")?;
        let bits = r.u8("fields")?;
        let ip = if bits & HAS_IP == 0 {
            None
        } else if bits & V6 != 0 {
            let b: [u8; 16] = r.take(16, "ip")?.try_into().unwrap();
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        } else {
            let b: [u8; 4] = r.take(4, "ip")?.try_into().unwrap();
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        };
        let asn = if bits & HAS_ASN != 0 {
            Some(r.u32("asn")?)
        } else {
            None
        };
        let user = r.str("user")?;
        let key = r.str("key")?;
        let fingerprint = if bits & HAS_FP != 0 {
            Some(r.str("fingerprint")?)
        } else {
            None
        };
        self.at = r.at;
        self.count -= 1;
        Ok(Some(Projection {
            ts_ms,
            rid,
            seq: Seq { offset, element },
            kinds,
            phase,
            status,
            prompt_tokens,
            completion_tokens,
            cost_micros,
            ip,
            asn,
            flags,
            user: user.into(),
            key: key.into(),
            fingerprint: fingerprint.map(Into::into),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(i: i64) -> Projection {
        Projection {
            ts_ms: 1_790_000_000_000 + i * 1000,
            rid: i as u64 * 7919,
            seq: Seq::new(100 + i, None),
            kinds: Kinds::default(),
            phase: Phase::Exchange,
            status: 200,
            prompt_tokens: 120,
            completion_tokens: 40,
            cost_micros: 310,
            ip: Some(IpAddr::from([203, 0, 113, (i % 200) as u8])),
            asn: Some(64500),
            flags: 0,
            user: format!("acct_{i}").into(),
            key: format!("key_{i}").into(),
            fingerprint: None,
        }
    }

    fn header() -> FrameHeader<'static> {
        FrameHeader {
            topic: "gateway-logs",
            partition: 2,
            partitions: 6,
            frontier_ms: 1_790_000_009_000,
            idle: false,
        }
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Projection>, FrameError> {
        let mut f = Frame::parse(bytes)?;
        let mut out = vec![];
        while let Some(p) = f.next()? {
            out.push(p);
        }
        Ok(out)
    }

    #[test]
    fn every_subject_gets_its_copy_once_per_partition() {
        let mut w = FrameWriter::new(4);
        let mut p = sample(1);
        p.flags = FARMING;
        p.fingerprint = Some("f00dfeed12345678".into());
        w.add(&p);
        let frames = w.finish(&header());
        assert_eq!(frames.len(), 4);
        let mut seen = Kinds::default();
        for (i, (part, f)) in frames.iter().enumerate() {
            assert_eq!(*part, i as u32);
            let got = read_all(f).unwrap();
            let h = Frame::parse(f).unwrap().header;
            assert_eq!(h, header(), "every partition gets the header");
            for g in got {
                assert_eq!(seen.0 & g.kinds.0, 0, "a subject routed twice");
                seen = seen | g.kinds;
                for (part, k) in routes(&p, 4).into_iter().flatten() {
                    assert_eq!(g.kinds.has(k), part == i as u32);
                }
                assert_eq!((&*g.user, g.ts_ms, g.seq), (&*p.user, p.ts_ms, p.seq));
                assert_eq!(g.fingerprint.is_some(), g.kinds.has(Kinds::FINGERPRINT));
            }
        }
        assert_eq!(seen.0, 15, "address, network, key and fingerprint");
    }

    #[test]
    fn a_heartbeat_is_a_frame_with_no_projections() {
        let mut w = FrameWriter::new(3);
        let h = FrameHeader {
            idle: true,
            ..header()
        };
        for (_, f) in w.finish(&h) {
            let frame = Frame::parse(&f).unwrap();
            assert!(frame.header.idle);
            assert_eq!(read_all(&f).unwrap(), vec![]);
        }
    }

    #[test]
    fn a_big_batch_is_cut_into_frames_that_keep_its_order() {
        let mut w = FrameWriter::new(2);
        for i in 0..20_000 {
            w.add(&sample(i));
        }
        let frames = w.finish(&header());
        assert!(frames.len() > 4, "{} frames", frames.len());
        for part in 0..2u32 {
            let mut seqs = vec![];
            for (_, f) in frames.iter().filter(|(p, _)| *p == part) {
                assert!(f.len() <= FRAME_BYTES + 1024, "{} bytes", f.len());
                seqs.extend(read_all(f).unwrap().into_iter().map(|p| p.seq));
            }
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "source order kept");
            let want = (0..20_000).filter(|&i| {
                routes(&sample(i), 2)
                    .into_iter()
                    .flatten()
                    .any(|r| r.0 == part)
            });
            assert_eq!(seqs.len(), want.count());
        }
    }

    #[test]
    fn bad_frames_are_named() {
        assert!(matches!(
            Frame::parse(b"KWP2...."),
            Err(FrameError::Magic(_))
        ));
        let mut w = FrameWriter::new(1);
        w.add(&sample(3));
        let f = w.finish(&header()).remove(0).1;
        for cut in 0..f.len() {
            assert!(read_all(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = f.clone();
        long.push(0);
        assert!(matches!(
            read_all(&long),
            Err(FrameError::Bad { field: "frame", .. })
        ));
    }

    proptest! {
        #[test]
        fn projections_round_trip(
            n in 1i64..20,
            parts in 1u32..8,
            v6 in any::<bool>(),
            user in "\\PC{0,40}",
        ) {
            let mut w = FrameWriter::new(parts);
            let mut all = vec![];
            for i in 0..n {
                let mut p = sample(i);
                p.user = user.clone().into();
                if v6 { p.ip = Some(IpAddr::from([0x2001, 0xdb8, 0, i as u16, 0, 0, 0, 1])); }
                if i % 3 == 0 { p.flags = FARMING; p.fingerprint = Some(format!("fp{i}").into()); }
                if i % 4 == 0 { p.ip = None; p.asn = None; }
                w.add(&p);
                all.push(p);
            }
            let frames = w.finish(&header());
            let mut got = vec![];
            for (_, f) in &frames { got.extend(read_all(f).unwrap()); }
            // Each projection arrives once per distinct partition of its subjects.
            for p in &all {
                let copies = got.iter().filter(|g| g.seq == p.seq).count();
                let mut parts: Vec<u32> = routes(p, parts).into_iter().flatten().map(|r| r.0).collect();
                parts.sort_unstable(); parts.dedup();
                prop_assert_eq!(copies, parts.len());
                for g in got.iter().filter(|g| g.seq == p.seq) {
                    prop_assert_eq!(&g.user, &p.user);
                    prop_assert_eq!(g.ip, p.ip);
                }
            }
        }

        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = read_all(&b);
            let _ = read_all(&bytes);
        }
    }
}
