//! The detectors. Each module keeps its own compact state and returns a
//! finding; the [`Engine`](crate::Engine) turns findings into alerts.

pub mod budget;
pub mod context;
pub mod leaked_key;
pub mod pending;
pub mod repeated_prompt;
pub mod request_spike;
pub mod runaway_spend;
pub mod token_spike;
