//! The second stage: detectors keyed by address, network, key and prompt,
//! across every partition.
//!
//! The gateway's topic is keyed by account, so stage one (the per-partition
//! [`crate::Engine`]) sees one account at a time. Abuse that spans
//! accounts needs another key: stage one *projects* every counted record
//! ([`projection`]) to the subjects it belongs to, an internal topic
//! carries the projections keyed by subject (as Kafka Streams' repartition
//! topics do), and stage two's [`SubjectEngine`] judges each subject with
//! every account's records, whatever partition they came from. Its input
//! is put in event-time order and cleared of repeats by [`merge`], so the
//! service and an offline replay decide alike and a crash doubles nothing.
//!
//! The detectors (each a distinct count per window against the subject's
//! learned norm, with a prior for a subject never seen and an absolute
//! minimum; [`window`]):
//!
//! - **key cycling**: distinct accounts from one address, and from one /24
//!   (IPv4) or /64 (IPv6), far above what it has been learned to carry. An
//!   office NAT or a university learns its dozens; a fresh address has the
//!   prior's norm. The record's context sets the severity: from a hosting
//!   provider's network, or when most of the accounts are young (first
//!   seen within `subjects.young_minutes`, once stage one has watched for
//!   `subjects.history_hours`), it is throwaway accounts cycled from one
//!   place: critical, and the address is blocked for 24 hours (a network
//!   gets a warning); otherwise an info alert, and the window teaches the
//!   norm (at a fresh start an office cannot be told apart yet).
//! - **credential stuffing**: distinct keys failing authentication (401,
//!   403) from one address, far above its norm, with at least
//!   `credential_stuffing.min_failures` failures: critical, address
//!   blocked for 24 hours. A client retrying its one revoked key is one key.
//! - **key sharing**: one key id under more accounts than it has been
//!   learned to serve: a warning.
//! - **data-center share**: the share of a key's requests from hosting
//!   networks jumping above its learned share (a stolen key's traffic
//!   moves to data centers): an info alert, a signal for the other
//!   detectors' context; a key born in a data center is not moving there.
//! - **prompt farming**: distinct accounts each repeating one prompt
//!   fingerprint (stage one marks an account's second sighting of a
//!   prompt in the repeat window), counted over the whole topic: a warning.
//!   This replaces stage one's per-partition count.

pub mod engine;
pub mod merge;
pub mod projection;
pub mod window;

pub use engine::{AddressRollups, AddressTotals, SubjectEngine, SubjectState, SubjectsTracked};
pub use projection::{Frame, FrameError, FrameHeader, FrameWriter, Kinds, Projection, Seq};
