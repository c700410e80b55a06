use super::text::*;
use super::*;
use crate::config::{
    EmailConfig, ReceiverConfig, ReceiverFile, ReceiverKind, SecretSource, SmtpTls, TransportConfig,
};
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

/// A receiver as the config file has it, read.
fn from_file(f: ReceiverFile) -> ReceiverConfig {
    ReceiverConfig::try_from(f).unwrap()
}

fn inline(v: &str) -> SecretSource {
    SecretSource {
        value: Some(v.into()),
        ..SecretSource::default()
    }
}

fn slack_cfg(url: &str) -> ReceiverConfig {
    from_file(ReceiverFile {
        name: "ops-slack".into(),
        kind: Some(ReceiverKind::Slack),
        url: Some(url.into()),
        ..ReceiverFile::default()
    })
}

fn webhook_cfg(url: &str) -> ReceiverConfig {
    from_file(ReceiverFile {
        name: "ops-hook".into(),
        kind: Some(ReceiverKind::Webhook),
        url: Some(url.into()),
        secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        ..ReceiverFile::default()
    })
}

fn email_file() -> ReceiverFile {
    ReceiverFile {
        name: "ops-mail".into(),
        kind: Some(ReceiverKind::Email),
        smtp_host: Some("127.0.0.1".into()),
        tls: Some(SmtpTls::None),
        from: Some("keywatch <alerts@example.com>".into()),
        to: vec!["oncall@example.com".into()],
        ..ReceiverFile::default()
    }
}

fn email_cfg() -> ReceiverConfig {
    from_file(email_file())
}

/// The email settings of an email receiver.
fn email(c: &mut ReceiverConfig) -> &mut EmailConfig {
    match &mut c.transport {
        TransportConfig::Email(e) => e,
        other => panic!("not an email receiver: {other:?}"),
    }
}

/// The signing secrets of a webhook receiver.
fn secrets(c: &mut ReceiverConfig) -> &mut SecretSource {
    match &mut c.transport {
        TransportConfig::Webhook { secrets, .. } => secrets,
        other => panic!("not a webhook receiver: {other:?}"),
    }
}

#[test]
fn fields_that_do_not_apply_or_are_missing_are_refused_when_read() {
    let e = ReceiverConfig::try_from(ReceiverFile {
        secret: Some("whsec_AAAA".into()),
        ..ReceiverFile::from(slack_cfg("https://93.184.216.34/x"))
    })
    .unwrap_err();
    assert_eq!(
        e,
        "receiver \"ops-slack\": secret: does not apply to a slack receiver"
    );
    let e = ReceiverConfig::try_from(ReceiverFile {
        url: Some("https://example.com".into()),
        ..email_file()
    })
    .unwrap_err();
    assert_eq!(
        e,
        "receiver \"ops-mail\": url: does not apply to an email receiver"
    );
    let e = ReceiverConfig::try_from(ReceiverFile {
        smtp_port: Some(25),
        ..ReceiverFile::from(webhook_cfg("https://93.184.216.34/x"))
    })
    .unwrap_err();
    assert_eq!(
        e,
        "receiver \"ops-hook\": smtp_port: does not apply to a webhook receiver"
    );
    let e = ReceiverConfig::try_from(ReceiverFile {
        smtp_host: None,
        ..email_file()
    })
    .unwrap_err();
    assert_eq!(
        e,
        "receiver \"ops-mail\": smtp_host: required for an email receiver"
    );
    let e = ReceiverConfig::try_from(ReceiverFile {
        from: Some("  ".into()),
        ..email_file()
    })
    .unwrap_err();
    assert_eq!(
        e,
        "receiver \"ops-mail\": from: required for an email receiver"
    );
    let e = ReceiverConfig::try_from(ReceiverFile {
        kind: None,
        ..email_file()
    })
    .unwrap_err();
    assert!(
        e.starts_with("receiver \"ops-mail\": type: required"),
        "{e}"
    );
    // The file form round-trips.
    for c in [
        slack_cfg("https://x/y"),
        webhook_cfg("https://x/y"),
        email_cfg(),
    ] {
        assert_eq!(
            ReceiverConfig::try_from(ReceiverFile::from(c.clone())).unwrap(),
            c
        );
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
    c.transport = TransportConfig::Slack {
        url: SecretSource::default(),
    };
    let e = build_err(c, &g);
    assert!(
        e.starts_with("alerting.receivers[\"ops-slack\"].url: not set"),
        "{e}"
    );

    let mut c = webhook_cfg("https://93.184.216.34/hook");
    *secrets(&mut c) = SecretSource::default();
    let e = build_err(c, &g);
    assert!(
        e.starts_with("alerting.receivers[\"ops-hook\"].secret: not set"),
        "{e}"
    );

    let mut c = webhook_cfg("https://93.184.216.34/hook");
    *secrets(&mut c) = inline("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
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

    // SMTP relays may be private or loopback, never a metadata or
    // link-local address.
    let mut c = email_cfg();
    email(&mut c).smtp_host = "169.254.169.254".into();
    assert_eq!(
        build_err(c, &g),
        "alerting.receivers[\"ops-mail\"].smtp_host: 169.254.169.254 is a cloud metadata address (set alerting.allow_private_addresses to allow)"
    );
    let mut c = email_cfg();
    email(&mut c).smtp_host = "[fe80::1]".into();
    assert!(build_err(c, &g).contains("fe80::1 is a link-local address"));
    let mut c = email_cfg();
    email(&mut c).smtp_host = "10.1.2.3".into();
    Receiver::build(&c, &g).expect("a private relay is allowed");
    email(&mut c).smtp_host = "169.254.169.254".into();
    Receiver::build(&c, &global(true)).expect("allowed by the switch");

    let mut c = email_cfg();
    email(&mut c).to = vec![];
    assert_eq!(
        build_err(c, &g),
        "alerting.receivers[\"ops-mail\"].to: give at least one recipient"
    );

    let mut c = email_cfg();
    email(&mut c).to = vec!["not an address".into()];
    let e = build_err(c, &g);
    assert!(
        e.starts_with(
            "alerting.receivers[\"ops-mail\"].to: \"not an address\" is not an email address"
        ),
        "{e}"
    );

    let mut c = email_cfg();
    email(&mut c).from = "@@".into();
    let e = build_err(c, &g);
    assert!(
        e.starts_with("alerting.receivers[\"ops-mail\"].from:"),
        "{e}"
    );

    let mut c = email_cfg();
    email(&mut c).password.env = Some("KW_TEST_SMTP_PASSWORD".into());
    let e = build_err(c, &g);
    assert!(
        e.starts_with("alerting.receivers[\"ops-mail\"].password_env: a password needs a username"),
        "{e}"
    );

    let mut c = email_cfg();
    email(&mut c).username = Some("kw".into());
    let e = build_err(c, &g);
    assert!(
        e.starts_with("alerting.receivers[\"ops-mail\"].password: not set"),
        "{e}"
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
    let r = Receiver::build(&webhook_cfg(&format!("http://{addr}/hook")), &global(true)).unwrap();
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
    email(&mut c).smtp_port = Some(port);
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
