//! keywatch's outward edge: notifiers (Slack, email over SMTP, signed
//! webhooks), the outbox dispatcher that feeds them from Postgres, and the
//! HTTP server for the revocation feed, blocklist and metrics.

pub mod config;
pub mod notify;

pub use config::{AlertingConfig, FeedConfig, ReceiverConfig, ReceiverKind, Secret};
pub use notify::{Outcome, Receiver};
