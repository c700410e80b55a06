//! Receivers: build one from its config (checking its address), send it
//! one alert (webhooks) or a group of alerts (Slack, email), and classify
//! the answer into an [`Outcome`] the dispatcher records.
//!
//! INTERFACE STUB: the implementation lands with the notifier modules.

use std::time::Duration;

use detectors::Alert;

use crate::config::{AlertingConfig, ReceiverConfig, ReceiverKind};

/// What one delivery attempt came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The receiver took it (2xx; SMTP 250).
    Delivered {
        /// HTTP status, for HTTP receivers.
        status: Option<u16>,
    },
    /// Try again later: 5xx, 408, 429, timeouts, connection errors, SMTP 4xx.
    Retry {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// The receiver's `Retry-After`, when it gave one (capped by config).
        retry_after: Option<Duration>,
        /// What went wrong, without the URL or any secret.
        error: String,
    },
    /// Will never succeed as is: other 4xx, a redirect, a refused address,
    /// SMTP 5xx. The delivery is given up.
    Rejected {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What went wrong, without the URL or any secret.
        error: String,
    },
    /// `410 Gone`: the receiver asks never to be called again; it is disabled.
    Gone {
        /// What the receiver said (truncated), without the URL.
        error: String,
    },
}

/// A configured receiver, ready to send.
pub struct Receiver {
    /// Its configured name.
    pub name: String,
    /// Its kind.
    pub kind: ReceiverKind,
    cfg: ReceiverConfig,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Builds a receiver: resolves its secrets and checks its address
    /// (refused when it resolves to a loopback, private, link-local or
    /// metadata address, unless `alerting.allow_private_addresses`).
    /// Errors name the receiver and the field.
    pub fn build(cfg: &ReceiverConfig, global: &AlertingConfig) -> Result<Receiver, String> {
        let _ = global;
        Ok(Receiver {
            name: cfg.name.clone(),
            kind: cfg.kind,
            cfg: cfg.clone(),
        })
    }

    /// Whether an alert of this kind, severity and tier is routed here.
    pub fn wants(&self, alert: &Alert) -> bool {
        let _ = (&self.cfg, alert);
        true
    }

    /// Whether this receiver groups lower-severity alerts into one message
    /// (Slack and email do; webhooks send each alert on its own).
    pub fn groups(&self) -> bool {
        !matches!(self.kind, ReceiverKind::Webhook)
    }

    /// Sends `alerts` (exactly one for a webhook; one or more, for one
    /// message, for Slack and email). `attempt` counts from 1. Never
    /// panics and never returns an error text holding a URL or secret.
    pub async fn send(&self, alerts: &[Alert], attempt: u32) -> Outcome {
        let _ = (alerts, attempt);
        Outcome::Rejected {
            status: None,
            error: "not implemented".into(),
        }
    }
}
