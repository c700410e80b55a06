//! keywatch's input edge: the Kafka pipeline and NDJSON reading.
//!
//! [`kafka`] is the service's consumer: one worker per assigned partition
//! owning that partition's detector engine, committing each batch's effects
//! and offsets to Postgres in one transaction ([`batch`] is what a batch
//! accumulates, [`config`] its settings, [`telemetry`] its metrics and
//! log events). [`intake`] produces what gateways post over HTTP to the
//! topic the pipeline reads. [`ndjson`] cuts large reads into lines for `keywatch replay`. The traffic simulator is the `sim` crate.

pub mod batch;
pub mod config;
pub mod intake;
pub mod kafka;
pub mod ndjson;
pub mod telemetry;
