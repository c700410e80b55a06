//! Receivers: build one from its config (checking its address), send it
//! one alert (webhooks) or a group of alerts (Slack, email), and classify
//! the answer into an [`Outcome`] the dispatcher records.
//!
//! Everything a receiver needs is resolved and checked in
//! [`Receiver::build`], at start-up, so a bad config stops keywatch with an
//! error naming the field instead of failing deliveries later. Sending
//! never panics and never returns an error text holding a URL (a Slack
//! URL is a secret) or a signing key: error texts end up in logs and in
//! the `alert_deliveries` table.
//!
//! The classification is a pure function of what came back
//! ([`classify_response`], [`classify_smtp`]) so the retry policy is
//! tested without a network.
//!
//! By role: this module is the receiver (build, route, send); `classify`
//! turns answers into outcomes and keeps URLs and secrets out of error
//! texts; `checks` validates a receiver's config and builds its SMTP
//! transport; `text` is what a person reads in Slack and email.

use std::sync::{Once, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use detectors::time::format_rfc3339;
use detectors::{Action, Alert, AlertKind, Severity};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};

use crate::config::{
    AlertingConfig, EmailConfig, ReceiverConfig, ReceiverKind, Secret, SmtpTls, TransportConfig,
};
use crate::sign::Signer;
use crate::ssrf::{self, PolicyResolver, TargetError};

mod checks;
mod classify;
#[cfg(test)]
pub(crate) mod tests;
pub(crate) mod text;

use checks::*;
use classify::*;
pub use classify::{classify_response, classify_smtp, parse_retry_after};
pub(crate) use text::{count_title, facts, human_time, severity_upper};
pub use text::{dashboard_link, percent_encode};

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

/// The `User-Agent` of every HTTP delivery.
pub const USER_AGENT: &str = concat!("keywatch/", env!("CARGO_PKG_VERSION"));

/// How much of a receiver's answer goes into an error text.
const BODY_SNIPPET_CHARS: usize = 200;

/// How much of a receiver's answer is read at all (the rest is dropped).
const BODY_READ_LIMIT: usize = 4096;

/// A configured receiver, ready to send.
pub struct Receiver {
    /// Its configured name.
    pub name: String,
    /// Its kind.
    pub kind: ReceiverKind,
    route: Route,
    transport: Transport,
    timeout: Duration,
    max_retry_after: Duration,
    dashboard_url: String,
}

/// Which alerts a receiver wants.
#[derive(Debug)]
struct Route {
    kinds: Vec<AlertKind>,
    min_severity: Severity,
    tiers: Vec<String>,
}

/// How a receiver sends. No `Debug`: it holds the Slack URL and keys.
enum Transport {
    Slack {
        client: Client,
        url: Url,
        /// Strings that must never appear in an error text (the URL and its path).
        redact: Vec<String>,
    },
    Webhook {
        client: Client,
        url: Url,
        signer: Signer,
        redact: Vec<String>,
    },
    Email {
        /// The configured transport, built on first use: lettre's pool
        /// starts a task, which needs the Tokio runtime `send` runs on.
        builder: AsyncSmtpTransportBuilder,
        mailer: OnceLock<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("route", &self.route)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Builds a receiver: resolves its secrets and checks its address
    /// (refused when it resolves to a loopback, private, link-local or
    /// metadata address, unless `alerting.allow_private_addresses`).
    /// Errors name the receiver and the field.
    pub fn build(cfg: &ReceiverConfig, global: &AlertingConfig) -> Result<Receiver, String> {
        let name = cfg.name.trim();
        if name.is_empty() {
            return Err("alerting.receivers[\"\"].name: must not be empty".into());
        }
        let field = |f: &str| format!("alerting.receivers[\"{name}\"].{f}");
        let route = Route {
            kinds: cfg.kinds.clone(),
            min_severity: cfg.min_severity,
            tiers: cfg.tiers.clone(),
        };
        let timeout = Duration::from_secs(global.timeout_secs.max(1));
        if cfg.kind() != ReceiverKind::Webhook {
            check_dashboard_url(&global.dashboard_url)?;
        }
        let transport = match &cfg.transport {
            TransportConfig::Slack { url: source }
            | TransportConfig::Webhook { url: source, .. } => {
                let url_secret = source.resolve(&field("url"))?;
                let url =
                    ssrf::check_url(url_secret.expose().trim(), global.allow_private_addresses)
                        .map_err(|e| match e {
                            TargetError::Refused(r) => format!("receiver \"{name}\": {r}"),
                            other => format!("{}: {other}", field("url")),
                        })?;
                let client = http_client(global.allow_private_addresses, timeout)
                    .map_err(|e| format!("receiver \"{name}\": building the HTTP client: {e}"))?;
                let redact = redactions(&url);
                match &cfg.transport {
                    TransportConfig::Webhook { secrets, .. } => {
                        let secrets = secrets.resolve(&field("secret"))?;
                        let signer = Signer::parse(secrets.expose())
                            .map_err(|e| format!("{}: {e}", field("secret")))?;
                        Transport::Webhook {
                            client,
                            url,
                            signer,
                            redact,
                        }
                    }
                    _ => Transport::Slack {
                        client,
                        url,
                        redact,
                    },
                }
            }
            TransportConfig::Email(email) => {
                if !global.allow_private_addresses {
                    check_smtp_host(email, &field)?;
                }
                email_transport(email, timeout, &field)?
            }
        };
        Ok(Receiver {
            name: cfg.name.clone(),
            kind: cfg.kind(),
            route,
            transport,
            timeout,
            max_retry_after: Duration::from_secs(global.max_retry_after_secs),
            dashboard_url: global.dashboard_url.clone(),
        })
    }

    /// Whether an alert of this kind, severity and tier is routed here.
    pub fn wants(&self, alert: &Alert) -> bool {
        let r = &self.route;
        (r.kinds.is_empty() || r.kinds.contains(&alert.kind))
            && alert.severity >= r.min_severity
            && (r.tiers.is_empty()
                || alert
                    .tier
                    .as_deref()
                    .is_some_and(|t| r.tiers.iter().any(|x| x == t)))
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
        // Every attempt is sent the same way; the dispatcher owns the count.
        let _ = attempt;
        if alerts.is_empty() {
            return Outcome::Rejected {
                status: None,
                error: "nothing to send (no alerts given)".into(),
            };
        }
        match &self.transport {
            Transport::Slack {
                client,
                url,
                redact,
            } => {
                let payload = crate::slack::message(alerts, &self.dashboard_url);
                let body = serde_json::to_vec(&payload).expect("a JSON value serializes");
                let req = client
                    .post(url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(body);
                let outcome = self.exchange(req).await;
                scrub_outcome(outcome, redact)
            }
            Transport::Webhook {
                client,
                url,
                signer,
                redact,
            } => {
                let [alert] = alerts else {
                    return Outcome::Rejected {
                        status: None,
                        error: format!(
                            "a webhook delivery carries exactly one alert, not {}",
                            alerts.len()
                        ),
                    };
                };
                let body = serde_json::to_vec(alert).expect("an alert serializes");
                let timestamp = unix_secs(SystemTime::now());
                let signature = signer.sign(&alert.id, timestamp, &body);
                let req = client
                    .post(url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header("webhook-id", alert.id.as_str())
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", signature)
                    .body(body);
                let outcome = self.exchange(req).await;
                scrub_outcome(outcome, redact)
            }
            Transport::Email {
                builder,
                mailer,
                from,
                to,
            } => {
                let mailer = mailer.get_or_init(|| builder.clone().build());
                let msg = match crate::email::message(alerts, from, to, &self.dashboard_url) {
                    Ok(m) => m,
                    Err(e) => {
                        return Outcome::Rejected {
                            status: None,
                            error: e,
                        }
                    }
                };
                match tokio::time::timeout(self.timeout, mailer.send(msg)).await {
                    Ok(Ok(_)) => Outcome::Delivered { status: None },
                    Ok(Err(e)) => classify_smtp(&e),
                    Err(_) => Outcome::Retry {
                        status: None,
                        retry_after: None,
                        error: format!("SMTP: timed out after {}s", self.timeout.as_secs()),
                    },
                }
            }
        }
    }

    /// Sends one HTTP request and classifies the answer.
    async fn exchange(&self, req: reqwest::RequestBuilder) -> Outcome {
        match req.send().await {
            Ok(mut resp) => {
                let status = resp.status();
                let headers = std::mem::take(resp.headers_mut());
                let mut body = Vec::new();
                // Read a little of the answer for the error text; a huge or
                // endless body is cut off (the client timeout bounds it too).
                while body.len() < BODY_READ_LIMIT {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        Ok(None) | Err(_) => break,
                    }
                }
                classify_response(
                    status,
                    &headers,
                    &body,
                    self.max_retry_after,
                    SystemTime::now(),
                )
            }
            Err(e) => classify_transport_error(e, self.timeout),
        }
    }
}

/// Installs rustls's `ring` crypto provider as the process default, once.
/// reqwest is built without a provider of its own; the binary may call
/// this early too (a second install is ignored).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The HTTP client of one Slack or webhook receiver: no redirects (a 3xx
/// could point anywhere, including inside the network), no proxy from the
/// environment, the policy resolver, a total timeout.
fn http_client(allow_private: bool, timeout: Duration) -> Result<Client, String> {
    install_crypto_provider();
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .dns_resolver(PolicyResolver::new(allow_private))
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| error_chain(&e.without_url()))
}
