//! The `[alerting]` and `[feed]` sections of the config file.
//!
//! Receiver secrets (Slack webhook URLs, webhook signing secrets, SMTP
//! passwords) may be written inline but are better read from the
//! environment or a file (`*_env`, `*_file`); they are held in [`Secret`],
//! whose `Debug` never shows the value.

use std::fmt;
use std::path::PathBuf;

use detectors::{AlertKind, Severity};
use serde::{Deserialize, Serialize};

/// Outbound alert delivery.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Where alerts go; each receiver has its own routing filter.
    pub receivers: Vec<ReceiverConfig>,
    /// Seconds between retries of a failed delivery: attempt `n + 1` waits
    /// `retry_schedule_secs[n]` (with ±20% jitter) after attempt `n` failed.
    /// When the list runs out the delivery is given up (state `failed`).
    /// The default is Svix's schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    pub retry_schedule_secs: Vec<u64>,
    /// Lower-severity (info, warning) alerts for Slack and email receivers
    /// wait this long so that alerts arriving together go out as one
    /// message. Critical alerts go at once; webhooks get every alert at once.
    pub group_wait_secs: u64,
    /// The same condition (kind, user, key or address, budget period and
    /// percent) is not sent to a receiver again within this many seconds;
    /// the repeat is recorded as `suppressed`.
    pub repeat_interval_secs: u64,
    /// Per-request timeout of a delivery (HTTP or SMTP), in seconds.
    pub timeout_secs: u64,
    /// A `Retry-After` longer than this (seconds) is capped to it.
    pub max_retry_after_secs: u64,
    /// Allow webhook and Slack URLs that resolve to loopback, private,
    /// link-local or cloud-metadata addresses. Off by default (SSRF
    /// protection); turn on for local receivers and tests only.
    pub allow_private_addresses: bool,
    /// Link to a user's dashboard in Slack and email messages; `{user_id}`
    /// is replaced by the (URL-encoded) user id. Empty: no link.
    pub dashboard_url: String,
    /// Seconds between outbox polls when the dispatcher found nothing to do
    /// (it is also woken at once when a batch commits new alerts).
    pub poll_interval_secs: f64,
    /// A claimed delivery not marked within this many seconds (its
    /// dispatcher died) may be taken by another dispatcher.
    pub lease_secs: u64,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            receivers: vec![],
            retry_schedule_secs: vec![5, 300, 1800, 7200, 18000, 36000, 36000],
            group_wait_secs: 30,
            repeat_interval_secs: 4 * 3600,
            timeout_secs: 10,
            max_retry_after_secs: 3600,
            allow_private_addresses: false,
            dashboard_url: String::new(),
            poll_interval_secs: 1.0,
            lease_secs: 120,
        }
    }
}

impl AlertingConfig {
    /// Checks what can be checked without resolving secrets or addresses
    /// (those are checked when the receivers are built, at start-up).
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.receivers.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(format!("alerting.receivers[{i}].name: must not be empty"));
            }
            if self.receivers[..i].iter().any(|o| o.name == r.name) {
                return Err(format!(
                    "alerting.receivers[{i}].name: \"{}\" is used twice (deliveries are recorded by name)",
                    r.name
                ));
            }
        }
        if self.timeout_secs == 0 {
            return Err("alerting.timeout_secs: must be at least 1".into());
        }
        if self.lease_secs <= self.timeout_secs {
            return Err(format!(
                "alerting.lease_secs: must be longer than alerting.timeout_secs ({}), or a slow send could be taken over while it is still running",
                self.timeout_secs
            ));
        }
        if self.poll_interval_secs.is_nan() || self.poll_interval_secs <= 0.0 {
            return Err("alerting.poll_interval_secs: must be above 0".into());
        }
        Ok(())
    }
}

/// One destination of alerts: its name and routing, and a transport whose
/// shape follows its `type`, so a field that does not apply to the type
/// (a `secret` on a Slack receiver, a `url` on an email one) cannot be
/// represented. The file keeps one flat table per receiver
/// ([`ReceiverFile`]); reading it checks which fields apply and refuses
/// the others, naming the receiver and the field.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "ReceiverFile", into = "ReceiverFile")]
pub struct ReceiverConfig {
    /// Unique name; deliveries are recorded under it, so keep it stable.
    pub name: String,
    /// Routing: alert kinds sent here (empty: every kind).
    pub kinds: Vec<AlertKind>,
    /// Routing: the lowest severity sent here (default `info`, everything).
    pub min_severity: Severity,
    /// Routing: user tiers sent here (empty: every tier, and alerts without one).
    pub tiers: Vec<String>,
    /// Overrides `alerting.group_wait_secs` for this receiver.
    pub group_wait_secs: Option<u64>,
    /// Overrides `alerting.repeat_interval_secs` for this receiver.
    pub repeat_interval_secs: Option<u64>,
    /// How alerts travel, by type.
    pub transport: TransportConfig,
}

/// A receiver's transport, by `type`.
#[derive(Clone, Debug, PartialEq)]
pub enum TransportConfig {
    /// A Slack incoming webhook: its URL is a secret.
    Slack {
        /// The webhook URL (`url`, `url_env` or `url_file`).
        url: SecretSource,
    },
    /// An HTTP endpoint, signed per Standard Webhooks.
    Webhook {
        /// The endpoint (`url`, `url_env` or `url_file`).
        url: SecretSource,
        /// The signing secrets (`secret`, `secret_env` or `secret_file`).
        secrets: SecretSource,
    },
    /// Email over SMTP.
    Email(EmailConfig),
}

/// An email receiver's SMTP settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EmailConfig {
    /// The SMTP server.
    pub smtp_host: String,
    /// Its port (default 25 for `none`, 587 for `starttls`, 465 for `tls`).
    pub smtp_port: Option<u16>,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// SMTP user (no authentication when absent).
    pub username: Option<String>,
    /// The SMTP password (`password_env` or `password_file`; never inline).
    pub password: SecretSource,
    /// Sender (`keywatch <alerts@example.com>`).
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
}

/// How an SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text: for local catchers only.
    None,
    /// STARTTLS on the submission port (the default).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl ReceiverConfig {
    /// Its type.
    pub fn kind(&self) -> ReceiverKind {
        match self.transport {
            TransportConfig::Slack { .. } => ReceiverKind::Slack,
            TransportConfig::Webhook { .. } => ReceiverKind::Webhook,
            TransportConfig::Email(_) => ReceiverKind::Email,
        }
    }
}

impl fmt::Debug for ReceiverConfig {
    /// Shows everything but secrets (a Slack URL is one; webhook URLs often
    /// carry a token in their path or query too): [`SecretSource`]'s own
    /// `Debug` hides inline values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("name", &self.name)
            .field("kinds", &self.kinds)
            .field("min_severity", &self.min_severity)
            .field("tiers", &self.tiers)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// One receiver as the config file writes it: one flat table, `type`
/// saying which of the transport fields apply.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverFile {
    /// Unique name.
    pub name: String,
    /// `slack`, `email` or `webhook`.
    #[serde(rename = "type")]
    pub kind: Option<ReceiverKind>,
    /// Routing: alert kinds sent here.
    pub kinds: Vec<AlertKind>,
    /// Routing: the lowest severity sent here.
    pub min_severity: Severity,
    /// Routing: user tiers sent here.
    pub tiers: Vec<String>,
    /// Overrides `alerting.group_wait_secs`.
    pub group_wait_secs: Option<u64>,
    /// Overrides `alerting.repeat_interval_secs`.
    pub repeat_interval_secs: Option<u64>,
    /// Slack and webhook: the URL (for Slack, prefer `url_env`/`url_file`).
    pub url: Option<String>,
    /// Slack and webhook: environment variable holding the URL.
    pub url_env: Option<String>,
    /// Slack and webhook: file holding the URL.
    pub url_file: Option<PathBuf>,
    /// Webhook: signing secrets (`whsec_` + base64), separated by spaces or
    /// commas; each one signs, so a receiver can rotate without a gap.
    pub secret: Option<String>,
    /// Webhook: environment variable holding the secrets.
    pub secret_env: Option<String>,
    /// Webhook: file holding the secrets.
    pub secret_file: Option<PathBuf>,
    /// Email: SMTP server host.
    pub smtp_host: Option<String>,
    /// Email: SMTP port.
    pub smtp_port: Option<u16>,
    /// Email: `none`, `starttls` or `tls` (default `starttls`).
    pub tls: Option<SmtpTls>,
    /// Email: SMTP user.
    pub username: Option<String>,
    /// Email: environment variable holding the SMTP password.
    pub password_env: Option<String>,
    /// Email: file holding the SMTP password.
    pub password_file: Option<PathBuf>,
    /// Email: sender.
    pub from: Option<String>,
    /// Email: recipients.
    pub to: Vec<String>,
}

impl TryFrom<ReceiverFile> for ReceiverConfig {
    type Error = String;

    fn try_from(f: ReceiverFile) -> Result<Self, String> {
        let who = format!("receiver \"{}\"", f.name);
        let kind = f
            .kind
            .ok_or_else(|| format!("{who}: type: required (slack, webhook or email)"))?;
        let url = f.url.is_some() || f.url_env.is_some() || f.url_file.is_some();
        let secret = f.secret.is_some() || f.secret_env.is_some() || f.secret_file.is_some();
        let smtp = [
            ("smtp_host", f.smtp_host.is_some()),
            ("smtp_port", f.smtp_port.is_some()),
            ("tls", f.tls.is_some()),
            ("username", f.username.is_some()),
            ("password_env", f.password_env.is_some()),
            ("password_file", f.password_file.is_some()),
            ("from", f.from.is_some()),
            ("to", !f.to.is_empty()),
        ];
        let (article, stray) = match kind {
            ReceiverKind::Slack => (
                "a slack",
                [("secret", secret)]
                    .into_iter()
                    .chain(smtp)
                    .find(|(_, set)| *set),
            ),
            ReceiverKind::Webhook => ("a webhook", smtp.into_iter().find(|(_, set)| *set)),
            ReceiverKind::Email => (
                "an email",
                [("url", url), ("secret", secret)]
                    .into_iter()
                    .find(|(_, set)| *set),
            ),
        };
        if let Some((field, _)) = stray {
            return Err(format!(
                "{who}: {field}: does not apply to {article} receiver"
            ));
        }
        let url_source = || SecretSource {
            value: f.url.clone(),
            env: f.url_env.clone(),
            file: f.url_file.clone(),
        };
        let transport = match kind {
            ReceiverKind::Slack => TransportConfig::Slack { url: url_source() },
            ReceiverKind::Webhook => TransportConfig::Webhook {
                url: url_source(),
                secrets: SecretSource {
                    value: f.secret.clone(),
                    env: f.secret_env.clone(),
                    file: f.secret_file.clone(),
                },
            },
            ReceiverKind::Email => {
                let required = |v: &Option<String>, field: &str| {
                    v.as_deref()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{who}: {field}: required for an email receiver"))
                };
                TransportConfig::Email(EmailConfig {
                    smtp_host: required(&f.smtp_host, "smtp_host")?,
                    smtp_port: f.smtp_port,
                    tls: f.tls.unwrap_or_default(),
                    username: f.username.clone().filter(|u| !u.is_empty()),
                    password: SecretSource {
                        value: None,
                        env: f.password_env.clone(),
                        file: f.password_file.clone(),
                    },
                    from: required(&f.from, "from")?,
                    to: f.to.clone(),
                })
            }
        };
        Ok(ReceiverConfig {
            name: f.name,
            kinds: f.kinds,
            min_severity: f.min_severity,
            tiers: f.tiers,
            group_wait_secs: f.group_wait_secs,
            repeat_interval_secs: f.repeat_interval_secs,
            transport,
        })
    }
}

impl From<ReceiverConfig> for ReceiverFile {
    fn from(c: ReceiverConfig) -> Self {
        let mut f = ReceiverFile {
            name: c.name,
            kinds: c.kinds,
            min_severity: c.min_severity,
            tiers: c.tiers,
            group_wait_secs: c.group_wait_secs,
            repeat_interval_secs: c.repeat_interval_secs,
            ..ReceiverFile::default()
        };
        let url = |f: &mut ReceiverFile, s: SecretSource| {
            (f.url, f.url_env, f.url_file) = (s.value, s.env, s.file);
        };
        match c.transport {
            TransportConfig::Slack { url: u } => {
                f.kind = Some(ReceiverKind::Slack);
                url(&mut f, u);
            }
            TransportConfig::Webhook { url: u, secrets } => {
                f.kind = Some(ReceiverKind::Webhook);
                url(&mut f, u);
                (f.secret, f.secret_env, f.secret_file) =
                    (secrets.value, secrets.env, secrets.file);
            }
            TransportConfig::Email(e) => {
                f.kind = Some(ReceiverKind::Email);
                f.smtp_host = Some(e.smtp_host);
                f.smtp_port = e.smtp_port;
                f.tls = Some(e.tls);
                f.username = e.username;
                (f.password_env, f.password_file) = (e.password.env, e.password.file);
                f.from = Some(e.from);
                f.to = e.to;
            }
        }
        f
    }
}

/// What kind of receiver.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReceiverKind {
    /// A Slack incoming webhook.
    Slack,
    /// Email over SMTP.
    Email,
    /// A generic endpoint, signed per the Standard Webhooks spec.
    Webhook,
}

/// A secret given inline (`secret`/`url`), by environment variable
/// (`*_env`) or by file (`*_file`): exactly one of them.
#[derive(Clone, Default, PartialEq)]
pub struct SecretSource {
    /// The value itself (discouraged: config files get shared).
    pub value: Option<String>,
    /// Environment variable holding the value.
    pub env: Option<String>,
    /// File holding the value (trailing whitespace ignored).
    pub file: Option<PathBuf>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("env", &self.env)
            .field("file", &self.file)
            .finish()
    }
}

impl SecretSource {
    /// Reads the secret; `what` names the field in errors.
    pub fn resolve(&self, what: &str) -> Result<Secret, String> {
        let given = [
            self.value.is_some(),
            self.env.is_some(),
            self.file.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                return Err(format!(
                    "{what}: not set (give it inline, by _env or by _file)"
                ))
            }
            1 => {}
            _ => {
                return Err(format!(
                    "{what}: give only one of the value, _env and _file"
                ))
            }
        }
        let value = if let Some(v) = &self.value {
            v.clone()
        } else if let Some(var) = &self.env {
            std::env::var(var)
                .map_err(|_| format!("{what}: environment variable {var} is not set"))?
        } else {
            let path = self.file.as_ref().expect("counted above");
            std::fs::read_to_string(path)
                .map_err(|e| format!("{what}: reading {}: {e}", path.display()))?
                .trim_end()
                .to_string()
        };
        if value.trim().is_empty() {
            return Err(format!("{what}: is empty"));
        }
        Ok(Secret(value))
    }
}

/// A secret value: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The revocation feed and metrics HTTP server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    /// Address to listen on (`127.0.0.1:8787`); empty: no HTTP server.
    pub listen: String,
    /// Gateways allowed to poll, each with the SHA-256 of its bearer token
    /// (`keywatch token NAME` makes a token and prints this line).
    pub clients: Vec<FeedClient>,
    /// Requests per minute a client may make (a token bucket, burst of the same
    /// size); past it: `429` with `Retry-After`. Failed authentications are
    /// limited the same way per remote address.
    pub requests_per_minute: u32,
    /// The longest long poll a client may ask for (`wait`, seconds).
    pub max_wait_secs: u64,
    /// Most actions in one `/v1/revocations` answer.
    pub max_actions: u32,
    /// Seconds a connection has to send a complete request head, from
    /// opening or from its previous answer (so also the keep-alive idle
    /// timeout).
    pub header_timeout_secs: u64,
    /// Seconds an answer may wait for the client to read it.
    pub write_timeout_secs: u64,
    /// Open connections at most (lowered to fit the file-descriptor limit).
    /// When full, a new connection evicts the oldest one that has not yet
    /// presented a valid token.
    pub max_connections: u32,
    /// Connections from one address (IPv4 address, IPv6 /64) that have not
    /// yet presented a valid token; a new one evicts that address's oldest.
    pub max_connections_per_address: u32,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            listen: "127.0.0.1:8787".into(),
            clients: vec![],
            requests_per_minute: 600,
            max_wait_secs: 60,
            max_actions: 1000,
            header_timeout_secs: 10,
            write_timeout_secs: 30,
            max_connections: 1024,
            max_connections_per_address: 16,
        }
    }
}

/// A gateway allowed to read the feed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedClient {
    /// The gateway's name (in logs and metrics).
    pub name: String,
    /// Lower-case hex SHA-256 of the bearer token; the token itself is never stored.
    pub token_sha256: String,
}
