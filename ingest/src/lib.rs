//! keywatch's input edge: NDJSON reading, (later) the Kafka consumer, and the
//! traffic simulator.
//!
//! [`ndjson`] cuts large reads into lines. [`simulate`] writes the canonical
//! gateway event of `contracts/gateway-event.md`, one JSON object per line,
//! and keeps the ground truth of the attacks it injected, so a run can be
//! scored with [`simulate::evaluate`].

#![warn(missing_docs)]

pub mod ndjson;
pub mod simulate;
