//! keywatch's outward edge: notifiers (Slack, email over SMTP, signed
//! webhooks), the outbox dispatcher that feeds them from Postgres, and the
//! HTTP server for the revocation feed, blocklist and metrics.

pub mod config;
pub mod dispatch;
pub mod email;
pub mod feed;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod request;
pub mod sign;
pub mod slack;
pub mod ssrf;

pub use config::{AlertingConfig, FeedConfig, ReceiverConfig, ReceiverKind, Secret};
pub use notify::{Outcome, Receiver};
