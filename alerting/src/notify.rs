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

use crate::config::{AlertingConfig, ReceiverConfig, ReceiverKind, Secret, SecretSource};
use crate::sign::Signer;
use crate::ssrf::{self, PolicyResolver, TargetError};

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
        check_fields_apply(cfg, &field)?;
        let route = Route {
            kinds: cfg.kinds.clone(),
            min_severity: cfg.min_severity,
            tiers: cfg.tiers.clone(),
        };
        let timeout = Duration::from_secs(global.timeout_secs.max(1));
        if !matches!(cfg.kind, ReceiverKind::Webhook) {
            check_dashboard_url(&global.dashboard_url)?;
        }
        let transport = match cfg.kind {
            ReceiverKind::Slack | ReceiverKind::Webhook => {
                let url_secret = cfg.slack_url().resolve(&field("url"))?;
                let url =
                    ssrf::check_url(url_secret.expose().trim(), global.allow_private_addresses)
                        .map_err(|e| match e {
                            TargetError::Refused(r) => format!("receiver \"{name}\": {r}"),
                            other => format!("{}: {other}", field("url")),
                        })?;
                let client = http_client(global.allow_private_addresses, timeout)
                    .map_err(|e| format!("receiver \"{name}\": building the HTTP client: {e}"))?;
                let redact = redactions(&url);
                if matches!(cfg.kind, ReceiverKind::Slack) {
                    Transport::Slack {
                        client,
                        url,
                        redact,
                    }
                } else {
                    let secrets = cfg.signing_secrets().resolve(&field("secret"))?;
                    let signer = Signer::parse(secrets.expose())
                        .map_err(|e| format!("{}: {e}", field("secret")))?;
                    Transport::Webhook {
                        client,
                        url,
                        signer,
                        redact,
                    }
                }
            }
            ReceiverKind::Email => {
                if !global.allow_private_addresses {
                    check_smtp_host(cfg, &field)?;
                }
                email_transport(cfg, timeout, &field)?
            }
        };
        Ok(Receiver {
            name: cfg.name.clone(),
            kind: cfg.kind,
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

/// Classifies an HTTP answer: 2xx delivered; 410 gone; 408, 429 and 5xx
/// retried (after the receiver's `Retry-After`, capped at
/// `max_retry_after`); 3xx (redirects are not followed) and other 4xx
/// rejected. `body` is the start of the answer, quoted in the error text.
pub fn classify_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    max_retry_after: Duration,
    now: SystemTime,
) -> Outcome {
    let code = status.as_u16();
    let said = || {
        let reason = status
            .canonical_reason()
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        let snippet = snippet(&String::from_utf8_lossy(body), BODY_SNIPPET_CHARS);
        if snippet.is_empty() {
            format!("HTTP {code}{reason}")
        } else {
            format!("HTTP {code}{reason}: {snippet}")
        }
    };
    match code {
        200..=299 => Outcome::Delivered { status: Some(code) },
        410 => Outcome::Gone { error: said() },
        408 | 429 | 500..=599 => Outcome::Retry {
            status: Some(code),
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now))
                .map(|d| d.min(max_retry_after)),
            error: said(),
        },
        300..=399 => Outcome::Rejected {
            status: Some(code),
            error: format!("{}: redirect not followed", said()),
        },
        _ => Outcome::Rejected {
            status: Some(code),
            error: said(),
        },
    }
}

/// Parses a `Retry-After` value: delta-seconds (`120`) or an HTTP-date
/// (`Sun, 06 Nov 1994 08:49:37 GMT`, and the two obsolete forms RFC 9110
/// still asks recipients to accept). A date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(value)?;
    let now = unix_secs(now);
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

/// An HTTP-date as Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    let t: Vec<&str> = s.split_whitespace().collect();
    let (day, month, year, time) = match t.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [_, d, m, y, time, "GMT"] => (d.parse().ok()?, *m, y.parse::<i64>().ok()?, *time),
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        [_, dmy, time, "GMT"] => {
            let mut p = dmy.split('-');
            let (d, m, y) = (p.next()?, p.next()?, p.next()?);
            let y: i64 = y.parse().ok()?;
            let y = if y < 100 {
                y + if y < 70 { 2000 } else { 1900 }
            } else {
                y
            };
            (d.parse().ok()?, m, y, *time)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_, m, d, time, y] => (d.parse().ok()?, *m, y.parse().ok()?, *time),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    if !(1..=31).contains(&day) {
        return None;
    }
    let mut hms = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = detectors::time::days_from_civil(year, month, day);
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Classifies a failed HTTP exchange (no answer): a refused address is
/// rejected; timeouts, connection and DNS failures are retried. The text
/// is built from the error chain without the URL.
fn classify_transport_error(e: reqwest::Error, timeout: Duration) -> Outcome {
    let e = e.without_url();
    if let Some(refused) = ssrf::find_refused(&e) {
        return Outcome::Rejected {
            status: None,
            error: refused.to_string(),
        };
    }
    let chain = error_chain(&e);
    if e.is_timeout() {
        return Outcome::Retry {
            status: None,
            retry_after: None,
            error: format!("timed out after {}s ({chain})", timeout.as_secs()),
        };
    }
    if e.is_builder() {
        // The request itself cannot be made: it never will be.
        return Outcome::Rejected {
            status: None,
            error: chain,
        };
    }
    Outcome::Retry {
        status: None,
        retry_after: None,
        error: chain,
    }
}

/// Classifies an SMTP failure: a permanent (5xx) reply or a message the
/// client refuses to send is rejected; transient (4xx) replies, timeouts,
/// connection and TLS failures are retried.
pub fn classify_smtp(e: &lettre::transport::smtp::Error) -> Outcome {
    let error = format!("SMTP: {}", error_chain(e));
    if e.is_permanent() || e.is_client() {
        Outcome::Rejected {
            status: None,
            error,
        }
    } else {
        Outcome::Retry {
            status: None,
            retry_after: None,
            error,
        }
    }
}

/// An error and its sources, `: `-joined, without control characters and
/// without repeating a source whose text is already there.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    snippet(&out, 400)
}

/// The first `max` characters of `s`, control characters turned to spaces
/// and runs of whitespace collapsed, with `…` when cut.
fn snippet(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    let mut last_space = true;
    for c in s.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_space {
            continue;
        }
        if n == max {
            out.push('…');
            return out;
        }
        last_space = c == ' ';
        out.push(c);
        n += 1;
    }
    out.trim_end().to_string()
}

/// What must never show in an error text of a receiver at `url`: the URL
/// itself and, when it has one, its path and query (where Slack and many
/// webhook providers put their token).
fn redactions(url: &Url) -> Vec<String> {
    let mut out = vec![url.as_str().to_string()];
    if url.path().len() > 1 {
        out.push(url.path().to_string());
        // Each long path segment on its own, in case an answer quotes one
        // (Slack's token is a 24-character segment).
        out.extend(
            url.path_segments()
                .into_iter()
                .flatten()
                .filter(|s| s.len() >= 16)
                .map(str::to_string),
        );
    }
    if let Some(q) = url.query().filter(|q| !q.is_empty()) {
        out.push(q.to_string());
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// `o` with every `redact` string in its error text replaced.
fn scrub_outcome(o: Outcome, redact: &[String]) -> Outcome {
    let scrub = |mut s: String| {
        for r in redact {
            if s.contains(r.as_str()) {
                s = s.replace(r.as_str(), "<redacted>");
            }
        }
        s
    };
    match o {
        Outcome::Delivered { .. } => o,
        Outcome::Retry {
            status,
            retry_after,
            error,
        } => Outcome::Retry {
            status,
            retry_after,
            error: scrub(error),
        },
        Outcome::Rejected { status, error } => Outcome::Rejected {
            status,
            error: scrub(error),
        },
        Outcome::Gone { error } => Outcome::Gone {
            error: scrub(error),
        },
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

/// Whether an SMTP host is this machine (clear-text logins are allowed only there).
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The private-address guard for an SMTP relay. Mail relays live on
/// internal networks, so loopback and private addresses are allowed; every
/// other class the guard refuses for webhooks (cloud metadata, link-local,
/// unspecified, multicast, documentation, reserved) is refused here too,
/// for the literal host and for what its name resolves to at start-up.
fn check_smtp_host(cfg: &ReceiverConfig, field: &dyn Fn(&str) -> String) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let Some(host) = cfg.smtp_host.as_deref().map(str::trim) else {
        return Ok(());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<std::net::IpAddr> = match bare.parse() {
        Ok(ip) => vec![ip],
        Err(_) => (bare, cfg.smtp_port.unwrap_or(25))
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default(),
    };
    let refused = addrs.into_iter().find_map(|addr| {
        ssrf::classify(addr)
            .filter(|c| {
                !matches!(
                    c,
                    ssrf::AddressClass::Loopback | ssrf::AddressClass::Private
                )
            })
            .map(|class| ssrf::AddressRefused { addr, class })
    });
    match refused {
        Some(r) => Err(format!(
            "{}: {} is {} (set alerting.allow_private_addresses to allow)",
            field("smtp_host"),
            r.addr,
            r.class.describe()
        )),
        None => Ok(()),
    }
}

/// The SMTP transport of an email receiver.
fn email_transport(
    cfg: &ReceiverConfig,
    timeout: Duration,
    field: &dyn Fn(&str) -> String,
) -> Result<Transport, String> {
    let host = cfg
        .smtp_host
        .as_deref()
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{}: required for an email receiver", field("smtp_host")))?;
    let tls = cfg.tls.as_deref().unwrap_or("starttls");
    let builder = match tls {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).port(25),
        "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
            .map_err(|e| format!("{}: {}", field("smtp_host"), error_chain(&e)))?,
        "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
            .map_err(|e| format!("{}: {}", field("smtp_host"), error_chain(&e)))?,
        other => {
            return Err(format!(
                "{}: must be none, starttls or tls, not \"{other}\"",
                field("tls")
            ))
        }
    };
    let mut builder = builder.timeout(Some(timeout));
    if let Some(port) = cfg.smtp_port {
        builder = builder.port(port);
    }
    let password = SecretSource {
        value: None,
        env: cfg.password_env.clone(),
        file: cfg.password_file.clone(),
    };
    let has_password = password.env.is_some() || password.file.is_some();
    match cfg.username.as_deref().filter(|u| !u.is_empty()) {
        Some(_) if tls == "none" && !is_loopback_host(host) => {
            return Err(format!(
                "{}: a password would travel in clear text with tls = \"none\"; use starttls or tls (none is for local catchers)",
                field("username")
            ))
        }
        Some(user) => {
            let pass: Secret = password.resolve(&field("password"))?;
            builder = builder.credentials(Credentials::new(
                user.to_string(),
                pass.expose().to_string(),
            ));
        }
        None if has_password => {
            return Err(format!(
                "{}: a password needs a username (set {})",
                field("password_env"),
                field("username")
            ))
        }
        None => {}
    }
    let from_text = cfg
        .from
        .as_deref()
        .filter(|f| !f.trim().is_empty())
        .ok_or_else(|| format!("{}: required for an email receiver", field("from")))?;
    let from: Mailbox = from_text.parse().map_err(|e| {
        format!(
            "{}: \"{from_text}\" is not an email address ({e})",
            field("from")
        )
    })?;
    if cfg.to.is_empty() {
        return Err(format!("{}: give at least one recipient", field("to")));
    }
    let to = cfg
        .to
        .iter()
        .map(|t| {
            t.parse::<Mailbox>()
                .map_err(|e| format!("{}: \"{t}\" is not an email address ({e})", field("to")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Transport::Email {
        builder,
        mailer: OnceLock::new(),
        from,
        to,
    })
}

/// Refuses fields that do not apply to the receiver's type: they are
/// almost always a mistake (a `secret` on a Slack receiver signs nothing).
fn check_fields_apply(cfg: &ReceiverConfig, field: &dyn Fn(&str) -> String) -> Result<(), String> {
    let url = cfg.url.is_some() || cfg.url_env.is_some() || cfg.url_file.is_some();
    let secret = cfg.secret.is_some() || cfg.secret_env.is_some() || cfg.secret_file.is_some();
    let smtp = [
        ("smtp_host", cfg.smtp_host.is_some()),
        ("smtp_port", cfg.smtp_port.is_some()),
        ("tls", cfg.tls.is_some()),
        ("username", cfg.username.is_some()),
        ("password_env", cfg.password_env.is_some()),
        ("password_file", cfg.password_file.is_some()),
        ("from", cfg.from.is_some()),
        ("to", !cfg.to.is_empty()),
    ];
    let (kind, stray) = match cfg.kind {
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
    match stray {
        Some((f, _)) => Err(format!("{}: does not apply to {kind} receiver", field(f))),
        None => Ok(()),
    }
}

/// A bad dashboard link would make Slack refuse every message (a button
/// URL must be valid), so it is checked with the receivers.
fn check_dashboard_url(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Ok(());
    }
    let probe = template.replace("{user_id}", "user");
    match Url::parse(&probe) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && probe.len() <= 2000 => Ok(()),
        _ => Err(format!(
            "alerting.dashboard_url: must be an http or https URL (with {{user_id}} where the user id goes), not \"{template}\""
        )),
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

// ---------------------------------------------------------------------
// What a person reads: shared by the Slack and email messages.
// ---------------------------------------------------------------------

/// The dashboard link for a user: `template` with `{user_id}` replaced by
/// the percent-encoded id. `None` when no dashboard is configured.
pub fn dashboard_link(template: &str, user_id: &str) -> Option<String> {
    if template.is_empty() {
        return None;
    }
    Some(template.replace("{user_id}", &percent_encode(user_id)))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the
/// result is safe in a path segment or a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `CRITICAL`, `WARNING`, `INFO`.
pub(crate) fn severity_upper(s: Severity) -> &'static str {
    match s {
        Severity::Info => "INFO",
        Severity::Warning => "WARNING",
        Severity::Critical => "CRITICAL",
    }
}

/// "1 critical alert", "3 alerts (1 critical)", "2 alerts".
pub(crate) fn count_title(alerts: &[Alert]) -> String {
    if let [one] = alerts {
        return format!("1 {} alert", one.severity.as_str());
    }
    let critical = alerts
        .iter()
        .filter(|a| a.severity == Severity::Critical)
        .count();
    if critical > 0 {
        format!("{} alerts ({critical} critical)", alerts.len())
    } else {
        format!("{} alerts", alerts.len())
    }
}

/// A time for people: `2026-11-23 10:15:02 UTC`.
pub(crate) fn human_time(ms: i64) -> String {
    let iso = format_rfc3339(ms);
    format!("{} {} UTC", &iso[..10], &iso[11..19])
}

/// A number for people: integers with thousands separators, others with
/// as many decimals as their size deserves.
pub(crate) fn format_number(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    if a >= 1000.0 || (x.fract() == 0.0 && a < 1e15) {
        return group_thousands(x.round());
    }
    let decimals = if a >= 100.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        4
    };
    let s = format!("{x:.decimals$}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

/// `1234567` as `1,234,567`.
fn group_thousands(x: f64) -> String {
    if x.abs() >= 1e15 {
        return format!("{x:e}");
    }
    // Truncated toward zero, as callers pass whole numbers.
    detectors::text::group_digits(x.trunc() as i128)
}

/// Money: `$40.12`; sub-cent amounts keep four decimals (`$0.0031`).
pub(crate) fn format_usd(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x != 0.0 && x.abs() < 0.01 {
        return format!("${x:.4}");
    }
    let cents = format!("{:.2}", x.abs());
    let (int, frac) = cents.split_once('.').unwrap_or((&cents, "00"));
    let int = group_thousands(int.parse::<f64>().unwrap_or(0.0));
    let sign = if x < 0.0 { "-" } else { "" };
    format!("{sign}${int}.{frac}")
}

/// What keywatch did about the alert, and until when.
pub(crate) fn action_text(alert: &Alert) -> String {
    let until = match alert.expires_at {
        Some(ms) => format!("until {}", human_time(ms)),
        None => "until lifted".to_string(),
    };
    match alert.action {
        Action::Notify => "Notified only (nothing blocked)".to_string(),
        Action::Throttle => format!("Throttled, {until}"),
        Action::Block => format!("Blocked, {until}"),
    }
}

/// The facts of one alert as (label, plain text) pairs, most important
/// first, at most ten (Slack's limit of fields in a section).
pub(crate) fn facts(alert: &Alert) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(10);
    let user = match &alert.tier {
        Some(t) => format!("{} ({t} tier)", alert.user_id),
        None => alert.user_id.clone(),
    };
    out.push(("User", user));
    if let Some(k) = &alert.key_id {
        out.push(("Key", k.clone()));
    }
    if let Some(ip) = &alert.ip {
        out.push(("Address", ip.clone()));
    }
    out.push(("Kind", alert.kind.as_str().to_string()));
    out.push(("Severity", alert.severity.as_str().to_string()));
    out.push(("What keywatch did", action_text(alert)));
    if let Some(b) = &alert.budget {
        let period = match b.period.as_str() {
            "day" => "daily",
            "month" => "monthly",
            other => other,
        };
        out.push((
            "Budget",
            format!(
                "{} of {} ({}%), {period} budget from {}",
                format_usd(b.spent_usd),
                format_usd(b.limit_usd),
                b.percent,
                human_time(b.period_start)
            ),
        ));
    }
    for (label, v) in [
        ("Observed", alert.observed),
        ("Baseline", alert.baseline),
        ("Threshold", alert.threshold),
    ] {
        if let Some(v) = v {
            out.push((label, format_number(v)));
        }
    }
    out.truncate(10);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ReceiverConfig;
    use detectors::time::PeriodKind;
    use detectors::BudgetInfo;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// A budget alert as the detectors make it.
    /// Every third one is critical and blocks until the end of the day.
    pub(crate) fn sample_alert(i: usize) -> Alert {
        let critical = matches!(i % 3, 0);
        Alert {
            id: format!("a{i:04}deadbeef"),
            kind: AlertKind::BudgetThreshold,
            severity: if critical {
                Severity::Critical
            } else {
                Severity::Warning
            },
            action: if critical {
                Action::Block
            } else {
                Action::Notify
            },
            user_id: format!("acct_{i}"),
            key_id: Some(format!("key_{i}")),
            ip: None,
            ts: 1_779_531_302_481,
            observed: Some(40.12),
            baseline: None,
            threshold: Some(40.0),
            budget: Some(BudgetInfo {
                period: PeriodKind::Day,
                period_start: 1_779_494_400_000,
                limit_usd: 50.0,
                spent_usd: 40.12,
                percent: 80,
            }),
            expires_at: if critical {
                Some(1_779_580_800_000)
            } else {
                None
            },
            tier: Some("pro".into()),
            reason: format!("acct_{i} has spent $40.12 of its $50.00 daily budget (80%)."),
        }
    }

    const TOKEN: &str = "XoXbSeCrEtToKeN123";

    fn global(allow: bool) -> AlertingConfig {
        AlertingConfig {
            allow_private_addresses: allow,
            timeout_secs: 1,
            max_retry_after_secs: 600,
            ..AlertingConfig::default()
        }
    }

    fn slack_cfg(url: &str) -> ReceiverConfig {
        ReceiverConfig {
            name: "ops-slack".into(),
            kind: ReceiverKind::Slack,
            url: Some(url.into()),
            ..ReceiverConfig::default()
        }
    }

    fn webhook_cfg(url: &str) -> ReceiverConfig {
        ReceiverConfig {
            name: "ops-hook".into(),
            kind: ReceiverKind::Webhook,
            url: Some(url.into()),
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            ..ReceiverConfig::default()
        }
    }

    fn email_cfg() -> ReceiverConfig {
        ReceiverConfig {
            name: "ops-mail".into(),
            kind: ReceiverKind::Email,
            smtp_host: Some("127.0.0.1".into()),
            tls: Some("none".into()),
            from: Some("keywatch <alerts@example.com>".into()),
            to: vec!["oncall@example.com".into()],
            ..ReceiverConfig::default()
        }
    }

    fn build_err(cfg: ReceiverConfig, g: &AlertingConfig) -> String {
        Receiver::build(&cfg, g).unwrap_err()
    }

    #[test]
    fn build_errors_name_receiver_and_field() {
        let g = global(false);
        let mut c = slack_cfg("https://hooks.slack.com/x");
        c.name = "  ".into();
        assert_eq!(
            build_err(c, &g),
            "alerting.receivers[\"\"].name: must not be empty"
        );

        let mut c = slack_cfg("x");
        c.url = None;
        let e = build_err(c, &g);
        assert!(
            e.starts_with("alerting.receivers[\"ops-slack\"].url: not set"),
            "{e}"
        );

        let mut c = webhook_cfg("https://93.184.216.34/hook");
        c.secret = None;
        let e = build_err(c, &g);
        assert!(
            e.starts_with("alerting.receivers[\"ops-hook\"].secret: not set"),
            "{e}"
        );

        let mut c = webhook_cfg("https://93.184.216.34/hook");
        c.secret = Some("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
        let e = build_err(c, &g);
        assert!(
            e.starts_with(
                "alerting.receivers[\"ops-hook\"].secret: secret 1 does not start with \"whsec_\""
            ),
            "{e}"
        );
        assert!(!e.contains("MfKQ9r8"), "{e}");

        let e = build_err(webhook_cfg("http://10.0.0.5/hook"), &g);
        assert_eq!(e, "receiver \"ops-hook\": url resolves to 10.0.0.5, a private address (set alerting.allow_private_addresses to allow)");

        let e = build_err(webhook_cfg("ftp://example.com/hook"), &g);
        assert_eq!(
            e,
            "alerting.receivers[\"ops-hook\"].url: scheme must be http or https, not \"ftp\""
        );

        let mut c = slack_cfg("https://93.184.216.34/x");
        c.secret = Some("whsec_AAAA".into());
        let e = build_err(c, &g);
        assert_eq!(
            e,
            "alerting.receivers[\"ops-slack\"].secret: does not apply to a slack receiver"
        );

        let mut c = email_cfg();
        c.tls = Some("ssl".into());
        let e = build_err(c, &g);
        assert_eq!(
            e,
            "alerting.receivers[\"ops-mail\"].tls: must be none, starttls or tls, not \"ssl\""
        );

        // SMTP relays may be private or loopback, never a metadata or
        // link-local address.
        let mut c = email_cfg();
        c.smtp_host = Some("169.254.169.254".into());
        assert_eq!(
            build_err(c, &g),
            "alerting.receivers[\"ops-mail\"].smtp_host: 169.254.169.254 is a cloud metadata address (set alerting.allow_private_addresses to allow)"
        );
        let mut c = email_cfg();
        c.smtp_host = Some("[fe80::1]".into());
        assert!(build_err(c, &g).contains("fe80::1 is a link-local address"));
        let mut c = email_cfg();
        c.smtp_host = Some("10.1.2.3".into());
        Receiver::build(&c, &g).expect("a private relay is allowed");
        c.smtp_host = Some("169.254.169.254".into());
        Receiver::build(&c, &global(true)).expect("allowed by the switch");

        let mut c = email_cfg();
        c.smtp_host = None;
        assert_eq!(
            build_err(c, &g),
            "alerting.receivers[\"ops-mail\"].smtp_host: required for an email receiver"
        );

        let mut c = email_cfg();
        c.to = vec![];
        assert_eq!(
            build_err(c, &g),
            "alerting.receivers[\"ops-mail\"].to: give at least one recipient"
        );

        let mut c = email_cfg();
        c.to = vec!["not an address".into()];
        let e = build_err(c, &g);
        assert!(
            e.starts_with(
                "alerting.receivers[\"ops-mail\"].to: \"not an address\" is not an email address"
            ),
            "{e}"
        );

        let mut c = email_cfg();
        c.from = Some("@@".into());
        let e = build_err(c, &g);
        assert!(
            e.starts_with("alerting.receivers[\"ops-mail\"].from:"),
            "{e}"
        );

        let mut c = email_cfg();
        c.password_env = Some("KW_TEST_SMTP_PASSWORD".into());
        let e = build_err(c, &g);
        assert!(
            e.starts_with(
                "alerting.receivers[\"ops-mail\"].password_env: a password needs a username"
            ),
            "{e}"
        );

        let mut c = email_cfg();
        c.username = Some("kw".into());
        let e = build_err(c, &g);
        assert!(
            e.starts_with("alerting.receivers[\"ops-mail\"].password: not set"),
            "{e}"
        );

        let mut c = email_cfg();
        c.url = Some("https://example.com".into());
        assert_eq!(
            build_err(c, &g),
            "alerting.receivers[\"ops-mail\"].url: does not apply to an email receiver"
        );

        let bad_dash = AlertingConfig {
            dashboard_url: "dashboard/{user_id}".into(),
            ..global(false)
        };
        let e = build_err(slack_cfg("https://93.184.216.34/x"), &bad_dash);
        assert!(
            e.starts_with("alerting.dashboard_url: must be an http or https URL"),
            "{e}"
        );
    }

    #[test]
    fn slack_build_errors_never_show_the_url() {
        for url in [
            format!("http://127.0.0.1/services/T000/B000/{TOKEN}"),
            format!("http://169.254.169.254/services/T000/B000/{TOKEN}"),
            format!("gopher://hooks.slack.com/services/T000/B000/{TOKEN}"),
            format!("hooks.slack.com/services/T000/B000/{TOKEN}"),
        ] {
            let e = build_err(slack_cfg(&url), &global(false));
            assert!(!e.contains(TOKEN), "{e}");
        }
    }

    #[test]
    fn builds_each_kind_and_debug_shows_no_secret() {
        let g = global(true);
        let s = Receiver::build(
            &slack_cfg(&format!("https://hooks.slack.com/services/T/B/{TOKEN}")),
            &g,
        )
        .unwrap();
        let w = Receiver::build(&webhook_cfg("http://127.0.0.1:9/hook"), &g).unwrap();
        let e = Receiver::build(&email_cfg(), &g).unwrap();
        assert!(s.groups() && e.groups() && !w.groups());
        for r in [&s, &w, &e] {
            let d = format!("{r:?}");
            assert!(!d.contains(TOKEN) && !d.contains("MfKQ9"), "{d}");
        }
    }

    #[test]
    fn wants_routes_on_kind_severity_and_tier() {
        let g = global(true);
        let mut c = webhook_cfg("http://127.0.0.1:9/hook");
        let all = Receiver::build(&c, &g).unwrap();
        let mut a = sample_alert(1);
        assert!(all.wants(&a));
        a.tier = None;
        assert!(all.wants(&a), "no tier filter: alerts without a tier too");

        c.kinds = vec![AlertKind::RequestSpike];
        c.min_severity = Severity::Critical;
        c.tiers = vec!["free".into()];
        let r = Receiver::build(&c, &g).unwrap();
        let mut a = sample_alert(0);
        a.kind = AlertKind::RequestSpike;
        a.tier = Some("free".into());
        assert!(r.wants(&a));
        a.severity = Severity::Warning;
        assert!(!r.wants(&a), "below min_severity");
        a.severity = Severity::Critical;
        a.kind = AlertKind::BudgetThreshold;
        assert!(!r.wants(&a), "kind not listed");
        a.kind = AlertKind::RequestSpike;
        a.tier = Some("pro".into());
        assert!(!r.wants(&a), "tier not listed");
        a.tier = None;
        assert!(!r.wants(&a), "a tier filter skips alerts without a tier");

        c.kinds = vec![];
        c.tiers = vec![];
        c.min_severity = Severity::Warning;
        let r = Receiver::build(&c, &g).unwrap();
        let mut a = sample_alert(1);
        a.severity = Severity::Info;
        assert!(!r.wants(&a));
        a.severity = Severity::Warning;
        assert!(r.wants(&a));
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:47 1994", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Foo 1994 08:49:37 GMT", now),
            None
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn classification_from_status_and_headers() {
        let now = SystemTime::now();
        let cap = Duration::from_secs(600);
        let c = |code: u16, h: &[(&'static str, &str)], body: &str| {
            classify_response(
                StatusCode::from_u16(code).unwrap(),
                &headers(h),
                body.as_bytes(),
                cap,
                now,
            )
        };
        assert_eq!(c(200, &[], "ok"), Outcome::Delivered { status: Some(200) });
        assert_eq!(c(204, &[], ""), Outcome::Delivered { status: Some(204) });
        assert_eq!(
            c(410, &[], "channel_is_archived"),
            Outcome::Gone {
                error: "HTTP 410 Gone: channel_is_archived".into()
            }
        );
        assert_eq!(
            c(429, &[("retry-after", "30")], "rate_limited"),
            Outcome::Retry {
                status: Some(429),
                retry_after: Some(Duration::from_secs(30)),
                error: "HTTP 429 Too Many Requests: rate_limited".into()
            }
        );
        assert!(
            matches!(c(503, &[("retry-after", "86400")], ""), Outcome::Retry { retry_after: Some(d), .. } if d == cap),
            "capped"
        );
        assert!(matches!(
            c(500, &[], ""),
            Outcome::Retry {
                status: Some(500),
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            c(408, &[], ""),
            Outcome::Retry {
                status: Some(408),
                ..
            }
        ));
        assert!(matches!(
            c(502, &[("retry-after", "garbage")], ""),
            Outcome::Retry {
                retry_after: None,
                ..
            }
        ));
        match c(302, &[("location", "http://169.254.169.254/")], "") {
            Outcome::Rejected {
                status: Some(302),
                error,
            } => {
                assert_eq!(error, "HTTP 302 Found: redirect not followed");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c(400, &[], "invalid_payload"),
            Outcome::Rejected {
                status: Some(400),
                ..
            }
        ));
        assert!(matches!(
            c(404, &[], "no_service"),
            Outcome::Rejected {
                status: Some(404),
                ..
            }
        ));
        // Bodies are cut to 200 characters without control characters.
        let long = format!("line1\r\nline2\x1b[31m{}", "x".repeat(500));
        match c(400, &[], &long) {
            Outcome::Rejected { error, .. } => {
                assert!(
                    error.starts_with("HTTP 400 Bad Request: line1 line2 [31mxxx"),
                    "{error}"
                );
                assert!(!error.chars().any(|c| c.is_control()), "{error}");
                assert!(
                    error.chars().count() <= "HTTP 400 Bad Request: ".len() + 201,
                    "{}",
                    error.len()
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn numbers_and_money_read_well() {
        assert_eq!(format_number(1234567.0), "1,234,567");
        assert_eq!(format_number(42.0), "42");
        assert_eq!(format_number(7.12345), "7.12");
        assert_eq!(format_number(250.55), "250.6");
        assert_eq!(format_number(0.00123), "0.0012");
        assert_eq!(format_number(-1500.4), "-1,500");
        assert_eq!(format_number(f64::NAN), "n/a");
        assert_eq!(format_usd(40.123), "$40.12");
        assert_eq!(format_usd(1234.5), "$1,234.50");
        assert_eq!(format_usd(0.0031), "$0.0031");
        assert_eq!(format_usd(0.0), "$0.00");
        assert_eq!(human_time(1_779_531_302_481), "2026-05-23 10:15:02 UTC");
        assert_eq!(percent_encode("acct 42/&?é"), "acct%2042%2F%26%3F%C3%A9");
        assert_eq!(dashboard_link("", "u"), None);
        assert_eq!(
            dashboard_link("https://dash.example/users/{user_id}?tab=spend", "a&b").as_deref(),
            Some("https://dash.example/users/a%26b?tab=spend")
        );
    }

    // --- A tiny HTTP server on 127.0.0.1 for send tests ---

    /// One canned answer; `delay` before answering.
    #[derive(Clone)]
    struct Canned {
        status_line: &'static str,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    }

    fn canned(status_line: &'static str, body: &str) -> Canned {
        Canned {
            status_line,
            headers: vec![],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// A request as the server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<String> {
            self.head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        }
    }

    /// Serves `answer` to every connection; returns its address and what it saw.
    async fn serve(answer: Canned) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut r = BufReader::new(stream);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    log.lock().unwrap().push(Seen { head, body });
                    tokio::time::sleep(answer.delay).await;
                    let mut out = format!(
                        "HTTP/1.1 {}\r\ncontent-length: {}\r\nconnection: close\r\n",
                        answer.status_line,
                        answer.body.len()
                    );
                    for (k, v) in &answer.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(&answer.body);
                    let mut stream = r.into_inner();
                    let _ = stream.write_all(out.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    fn slack_at(addr: std::net::SocketAddr) -> Receiver {
        Receiver::build(
            &slack_cfg(&format!("http://{addr}/services/T000/B000/{TOKEN}")),
            &global(true),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn webhook_sends_one_signed_alert() {
        let (addr, seen) = serve(canned("200 OK", "ok")).await;
        let r =
            Receiver::build(&webhook_cfg(&format!("http://{addr}/hook")), &global(true)).unwrap();
        let alert = sample_alert(3);
        assert_eq!(
            r.send(std::slice::from_ref(&alert), 1).await,
            Outcome::Delivered { status: Some(200) }
        );
        let req = seen.lock().unwrap()[0].clone();
        assert!(req.head.starts_with("POST /hook HTTP/1.1"), "{}", req.head);
        assert_eq!(req.body, serde_json::to_vec(&alert).unwrap());
        assert_eq!(
            req.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(req.header("user-agent").as_deref(), Some(USER_AGENT));
        assert_eq!(req.header("webhook-id").as_deref(), Some(alert.id.as_str()));
        let ts: i64 = req.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!((ts - unix_secs(SystemTime::now())).abs() < 60);
        let sig = req.header("webhook-signature").unwrap();
        let signer = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert!(signer.verify(&sig, &alert.id, ts, &req.body), "{sig}");

        // More than one alert is refused, not silently split.
        let two = [sample_alert(1), sample_alert(2)];
        assert!(matches!(
            r.send(&two, 1).await,
            Outcome::Rejected { status: None, .. }
        ));
    }

    #[tokio::test]
    async fn slack_answers_map_to_outcomes_without_the_url() {
        let (addr, seen) = serve(canned("200 OK", "ok")).await;
        let alerts = [sample_alert(0), sample_alert(1)];
        assert_eq!(
            slack_at(addr).send(&alerts, 1).await,
            Outcome::Delivered { status: Some(200) }
        );
        let req = seen.lock().unwrap()[0].clone();
        let payload: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert!(payload["text"].as_str().unwrap().contains("2 alerts"));
        assert!(payload["blocks"].as_array().unwrap().len() > 3);

        // A 500 whose body quotes the URL: the token is scrubbed.
        let echo = format!("no handler for /services/T000/B000/{TOKEN}");
        let (addr, _) = serve(canned("500 Internal Server Error", &echo)).await;
        match slack_at(addr).send(&alerts, 1).await {
            Outcome::Retry {
                status: Some(500),
                retry_after: None,
                error,
            } => {
                assert!(!error.contains(TOKEN), "{error}");
                assert!(
                    error.starts_with("HTTP 500 Internal Server Error: no handler for <redacted>"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }

        let mut rate = canned("429 Too Many Requests", "rate_limited");
        rate.headers.push(("retry-after", "7".into()));
        let (addr, _) = serve(rate).await;
        assert_eq!(
            slack_at(addr).send(&alerts, 2).await,
            Outcome::Retry {
                status: Some(429),
                retry_after: Some(Duration::from_secs(7)),
                error: "HTTP 429 Too Many Requests: rate_limited".into()
            }
        );

        let (addr, _) = serve(canned("410 Gone", "channel_is_archived")).await;
        assert_eq!(
            slack_at(addr).send(&alerts, 1).await,
            Outcome::Gone {
                error: "HTTP 410 Gone: channel_is_archived".into()
            }
        );

        // A redirect is not followed, even to where the server points.
        let (target, target_seen) = serve(canned("200 OK", "ok")).await;
        let mut redirect = canned("302 Found", "");
        redirect
            .headers
            .push(("location", format!("http://{target}/elsewhere")));
        let (addr, _) = serve(redirect).await;
        match slack_at(addr).send(&alerts, 1).await {
            Outcome::Rejected {
                status: Some(302),
                error,
            } => assert!(error.contains("redirect not followed"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(target_seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn slow_and_unreachable_receivers_are_retried_without_the_url() {
        let mut slow = canned("200 OK", "ok");
        slow.delay = Duration::from_secs(5);
        let (addr, _) = serve(slow).await;
        match slack_at(addr).send(&[sample_alert(1)], 1).await {
            Outcome::Retry {
                status: None,
                error,
                ..
            } => {
                assert!(error.starts_with("timed out after 1s"), "{error}");
                assert!(!error.contains(TOKEN), "{error}");
            }
            other => panic!("{other:?}"),
        }

        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        match slack_at(closed).send(&[sample_alert(1)], 1).await {
            Outcome::Retry {
                status: None,
                error,
                ..
            } => {
                assert!(!error.contains(TOKEN), "{error}");
                assert!(!error.contains("/services/"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_address_refused_at_send_time_is_rejected_without_the_url() {
        // Built while private addresses were allowed; then the policy
        // resolver (the one that runs on every connection) refuses.
        let (addr, seen) = serve(canned("200 OK", "ok")).await;
        let url = format!(
            "http://localhost:{}/services/T000/B000/{TOKEN}",
            addr.port()
        );
        let mut r = Receiver::build(&slack_cfg(&url), &global(true)).unwrap();
        if let Transport::Slack { client, .. } = &mut r.transport {
            *client = http_client(false, Duration::from_secs(1)).unwrap();
        }
        match r.send(&[sample_alert(1)], 1).await {
            Outcome::Rejected {
                status: None,
                error,
            } => {
                assert!(error.contains("a loopback address"), "{error}");
                assert!(error.contains("allow_private_addresses"), "{error}");
                assert!(
                    !error.contains(TOKEN) && !error.contains("localhost:"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    // --- A tiny SMTP server for the email path ---

    /// Answers SMTP with 250s, except `mail_reply` to `MAIL FROM`.
    async fn smtp_server(mail_reply: &'static str) -> (u16, Arc<Mutex<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let data = Arc::new(Mutex::new(String::new()));
        let log = Arc::clone(&data);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let (rd, mut wr) = stream.into_split();
                    let mut rd = BufReader::new(rd);
                    let _ = wr.write_all(b"220 test ESMTP\r\n").await;
                    let mut in_data = false;
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if in_data {
                            if line == ".\r\n" {
                                in_data = false;
                                let _ = wr.write_all(b"250 2.0.0 queued\r\n").await;
                            } else {
                                log.lock().unwrap().push_str(&line);
                            }
                            continue;
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let reply: &str = match verb.as_str() {
                            "EHLO" | "HELO" => "250 test\r\n",
                            "MAIL" => mail_reply,
                            "DATA" => {
                                in_data = true;
                                "354 go ahead\r\n"
                            }
                            "QUIT" => {
                                let _ = wr.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => "250 ok\r\n",
                        };
                        let _ = wr.write_all(reply.as_bytes()).await;
                    }
                });
            }
        });
        (port, data)
    }

    fn email_at(port: u16) -> Receiver {
        let mut c = email_cfg();
        c.smtp_port = Some(port);
        Receiver::build(&c, &global(true)).unwrap()
    }

    #[tokio::test]
    async fn email_replies_map_to_outcomes() {
        let (port, data) = smtp_server("250 ok\r\n").await;
        let alerts = [sample_alert(0), sample_alert(1)];
        assert_eq!(
            email_at(port).send(&alerts, 1).await,
            Outcome::Delivered { status: None }
        );
        let text = data.lock().unwrap().clone();
        assert!(
            text.contains("Subject: [keywatch] 2 alerts (1 critical)"),
            "{text}"
        );

        let (port, _) = smtp_server("451 4.3.0 try later\r\n").await;
        match email_at(port).send(&alerts, 1).await {
            Outcome::Retry { error, .. } => assert!(
                error.starts_with("SMTP:") && error.contains("451"),
                "{error}"
            ),
            other => panic!("{other:?}"),
        }

        let (port, _) = smtp_server("550 5.7.1 relaying denied\r\n").await;
        match email_at(port).send(&alerts, 1).await {
            Outcome::Rejected { error, .. } => assert!(error.contains("550"), "{error}"),
            other => panic!("{other:?}"),
        }

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(matches!(
            email_at(closed).send(&alerts, 1).await,
            Outcome::Retry { .. }
        ));
    }
}
