//! keywatch's input edge: the Kafka pipeline, NDJSON reading, and the
//! traffic simulator.
//!
//! [`kafka`] is the service's consumer: one worker per assigned partition
//! owning that partition's detector engine, committing each batch's effects
//! and offsets to Postgres in one transaction ([`batch`] is what a batch
//! accumulates, [`config`] its settings). [`ndjson`] cuts large reads into
//! lines for `keywatch replay`. [`simulate`] writes the canonical gateway
//! event of `contracts/gateway-event.md`, one JSON object per line, and keeps
//! the ground truth of the attacks it injected, so a run can be scored with
//! [`simulate::evaluate`].

#![warn(missing_docs)]

pub mod batch;
pub mod config;
pub mod kafka;
pub mod ndjson;
pub mod simulate;
