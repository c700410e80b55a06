//! The email for one alert or a group of them: plain text and HTML
//! (`multipart/alternative`), with the same content as the Slack message.
//!
//! The subject says at a glance how bad it is and who it is about. The
//! `Message-ID` is derived from the alert ids, so when a delivery is
//! retried after the server took the message but the answer was lost, the
//! copy carries the same id and mail systems can drop the duplicate.
//! Values from gateway traffic (user ids, keys, reasons) are HTML-escaped.

use std::fmt::Write as _;

use detectors::Alert;
use lettre::message::{Mailbox, MultiPart};
use lettre::Message;
use sha2::{Digest, Sha256};

use crate::notify::{count_title, dashboard_link, facts, human_time, severity_upper};

/// Most characters of a subject line (long subjects are cut with `…`).
pub const MAX_SUBJECT_CHARS: usize = 160;

/// Most alerts listed in one email; the rest are counted.
pub const MAX_LISTED: usize = 50;

/// Builds the email for `alerts` from `from` to `to`, with dashboard
/// links from `dashboard_url` (none when it is empty).
pub fn message(
    alerts: &[Alert],
    from: &Mailbox,
    to: &[Mailbox],
    dashboard_url: &str,
) -> Result<Message, String> {
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(subject(alerts))
        .message_id(Some(message_id(alerts, from.email.domain())));
    for t in to {
        builder = builder.to(t.clone());
    }
    builder
        .multipart(MultiPart::alternative_plain_html(
            plain_text(alerts, dashboard_url),
            html(alerts, dashboard_url),
        ))
        .map_err(|e| format!("building the email: {e}"))
}

/// `[keywatch] CRITICAL budget_threshold: acct_42 - <reason>` for one alert;
/// `[keywatch] 3 alerts (1 critical): <kind user, ...>` for a group.
pub fn subject(alerts: &[Alert]) -> String {
    let text = match alerts {
        [one] => format!(
            "[keywatch] {} {}: {} - {}",
            severity_upper(one.severity),
            one.kind.as_str(),
            one.user_id,
            one.reason
        ),
        _ => {
            let mut seen: Vec<String> = Vec::new();
            for a in alerts {
                let item = format!("{} {}", a.kind.as_str(), a.user_id);
                if !seen.contains(&item) {
                    seen.push(item);
                }
                if seen.len() >= 10 {
                    break;
                }
            }
            format!("[keywatch] {}: {}", count_title(alerts), seen.join(", "))
        }
    };
    one_line(&text, MAX_SUBJECT_CHARS)
}

/// `<keywatch.<hash of the sorted alert ids>@<domain>>`: the same alerts
/// always get the same Message-ID.
pub fn message_id(alerts: &[Alert], domain: &str) -> String {
    let mut ids: Vec<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let mut hex = String::with_capacity(32);
    for b in &digest[..16] {
        let _ = write!(hex, "{b:02x}");
    }
    format!("<keywatch.{hex}@{domain}>")
}

/// The plain-text part.
pub fn plain_text(alerts: &[Alert], dashboard_url: &str) -> String {
    let mut out = format!("keywatch: {}\n", count_title(alerts));
    for alert in alerts.iter().take(MAX_LISTED) {
        out.push_str("\n------------------------------------------------------------\n");
        let _ = writeln!(
            out,
            "{} {}\n{}\n",
            severity_upper(alert.severity),
            alert.kind.as_str(),
            alert.reason
        );
        for (label, value) in facts(alert) {
            let _ = writeln!(out, "  {:<19}{value}", format!("{label}:"));
        }
        if let Some(link) = dashboard_link(dashboard_url, &alert.user_id) {
            let _ = writeln!(out, "  {:<19}{link}", "Dashboard:");
        }
        let _ = writeln!(out, "\n  Alert {} at {}", alert.id, human_time(alert.ts));
    }
    if alerts.len() > MAX_LISTED {
        let _ = write!(
            out,
            "\n------------------------------------------------------------\n\nand {} more (see keywatch's alerts table)\n",
            alerts.len() - MAX_LISTED
        );
    }
    out
}

/// The HTML part: the same as the plain text, as a small table per alert.
pub fn html(alerts: &[Alert], dashboard_url: &str) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><body style=\"font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; color: #1d1c1d;\">\n",
    );
    let _ = writeln!(
        out,
        "<h2>keywatch: {}</h2>",
        escape_html(&count_title(alerts))
    );
    for alert in alerts.iter().take(MAX_LISTED) {
        let color = match alert.severity {
            detectors::Severity::Critical => "#b00020",
            detectors::Severity::Warning => "#b26a00",
            detectors::Severity::Info => "#2a5db0",
        };
        out.push_str("<hr>\n");
        let _ = writeln!(
            out,
            "<h3><span style=\"color: {color};\">{}</span> {}</h3>\n<p>{}</p>",
            severity_upper(alert.severity),
            escape_html(alert.kind.as_str()),
            escape_html(&alert.reason)
        );
        out.push_str("<table cellpadding=\"4\" style=\"border-collapse: collapse;\">\n");
        for (label, value) in facts(alert) {
            let _ = writeln!(
                out,
                "<tr><th align=\"left\" valign=\"top\">{}</th><td>{}</td></tr>",
                escape_html(label),
                escape_html(&value)
            );
        }
        out.push_str("</table>\n");
        if let Some(link) = dashboard_link(dashboard_url, &alert.user_id) {
            let _ = writeln!(
                out,
                "<p><a href=\"{}\">Open dashboard</a></p>",
                escape_html(&link)
            );
        }
        let _ = writeln!(
            out,
            "<p style=\"color: #616061; font-size: small;\">Alert <code>{}</code> at {}</p>",
            escape_html(&alert.id),
            human_time(alert.ts)
        );
    }
    if alerts.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "<hr>\n<p><em>and {} more (see keywatch's alerts table)</em></p>",
            alerts.len() - MAX_LISTED
        );
    }
    out.push_str("</body></html>\n");
    out
}

/// Escapes text for HTML content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line (control characters and runs of whitespace as one space), cut
/// to `max` characters with `…`.
fn one_line(s: &str, max: usize) -> String {
    let mut line = String::with_capacity(s.len());
    for c in s.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if !(c == ' ' && line.ends_with(' ')) {
            line.push(c);
        }
    }
    crate::slack::cut(line.trim(), max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::tests::sample_alert;

    fn from() -> Mailbox {
        "keywatch <alerts@example.com>".parse().unwrap()
    }

    fn to() -> Vec<Mailbox> {
        vec![
            "oncall@example.com".parse().unwrap(),
            "Ops <ops@example.org>".parse().unwrap(),
        ]
    }

    #[test]
    fn builds_both_parts_with_the_headers() {
        let alerts = [sample_alert(0), sample_alert(1), sample_alert(2)];
        let msg = message(&alerts, &from(), &to(), "https://dash.example/u/{user_id}").unwrap();
        let raw = String::from_utf8(msg.formatted()).unwrap();
        assert!(raw.contains("Content-Type: multipart/alternative"), "{raw}");
        assert!(
            raw.contains("Content-Type: text/plain; charset=utf-8"),
            "{raw}"
        );
        assert!(
            raw.contains("Content-Type: text/html; charset=utf-8"),
            "{raw}"
        );
        assert!(
            raw.contains("Subject: [keywatch] 3 alerts (1 critical):"),
            "{raw}"
        );
        assert!(raw.contains("From: keywatch <alerts@example.com>"), "{raw}");
        assert!(
            raw.contains("oncall@example.com") && raw.contains("ops@example.org"),
            "{raw}"
        );
        let id = message_id(&alerts, "example.com");
        assert!(raw.contains(&format!("Message-ID: {id}")), "{raw}");
        assert!(raw.contains("Date: "), "{raw}");
    }

    #[test]
    fn message_id_is_stable_and_depends_on_the_alerts() {
        let a = [sample_alert(0), sample_alert(1)];
        let b = [sample_alert(1), sample_alert(0)];
        let id = message_id(&a, "example.com");
        assert_eq!(
            id,
            message_id(&a, "example.com"),
            "a redelivery carries the same id"
        );
        assert_eq!(id, message_id(&b, "example.com"), "order does not matter");
        assert_ne!(id, message_id(&a[..1], "example.com"));
        assert!(
            id.starts_with("<keywatch.") && id.ends_with("@example.com>"),
            "{id}"
        );
        assert_eq!(id.len(), "<keywatch.".len() + 32 + "@example.com>".len());
        // Two builds of the same message carry it.
        let m1 = message(&a, &from(), &to(), "").unwrap();
        let m2 = message(&a, &from(), &to(), "").unwrap();
        let header = |m: &Message| {
            String::from_utf8(m.formatted())
                .unwrap()
                .lines()
                .find(|l| l.starts_with("Message-ID:"))
                .unwrap()
                .to_string()
        };
        assert_eq!(header(&m1), header(&m2));
    }

    #[test]
    fn subjects() {
        let one = sample_alert(42);
        assert_eq!(
            subject(std::slice::from_ref(&one)),
            "[keywatch] CRITICAL budget_threshold: acct_42 - acct_42 has spent $40.12 of its $50.00 daily budget (80%)."
        );
        let mut long = one.clone();
        long.reason = format!("line one\r\nSubject: injected {}", "x".repeat(500));
        let s = subject(&[long]);
        assert_eq!(s.chars().count(), MAX_SUBJECT_CHARS);
        assert!(s.ends_with('…'));
        assert!(!s.contains('\n') && !s.contains('\r'), "{s}");
        let group = [sample_alert(0), sample_alert(1), sample_alert(2)];
        assert_eq!(
            subject(&group),
            "[keywatch] 3 alerts (1 critical): budget_threshold acct_0, budget_threshold acct_1, budget_threshold acct_2"
        );
        let quiet = [sample_alert(1), sample_alert(2)];
        assert!(subject(&quiet).starts_with("[keywatch] 2 alerts: "));
    }

    #[test]
    fn bodies_carry_the_facts_and_escape_html() {
        let mut a = sample_alert(3);
        a.reason = "<script>alert('x')</script> & more".into();
        a.user_id = "u\"><img src=x>".into();
        let h = html(std::slice::from_ref(&a), "https://dash.example/u/{user_id}");
        assert!(!h.contains("<script>") && !h.contains("<img"), "{h}");
        assert!(
            h.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more"),
            "{h}"
        );
        assert!(
            h.contains(
                "<a href=\"https://dash.example/u/u%22%3E%3Cimg%20src%3Dx%3E\">Open dashboard</a>"
            ),
            "{h}"
        );
        assert!(h.contains("Blocked, until 2026-05-24 00:00:00 UTC"), "{h}");
        assert!(h.contains("$40.12 of $50.00 (80%), daily budget"), "{h}");

        let p = plain_text(&[sample_alert(3)], "https://dash.example/u/{user_id}");
        assert!(p.starts_with("keywatch: 1 critical alert\n"), "{p}");
        assert!(
            p.contains("CRITICAL budget_threshold\nacct_3 has spent"),
            "{p}"
        );
        assert!(
            p.contains("  User:              acct_3 (pro tier)\n"),
            "{p}"
        );
        assert!(
            p.contains("  What keywatch did: Blocked, until 2026-05-24 00:00:00 UTC\n"),
            "{p}"
        );
        assert!(
            p.contains("  Dashboard:         https://dash.example/u/acct_3\n"),
            "{p}"
        );
        assert!(
            p.contains("Alert a0003deadbeef at 2026-05-23 10:15:02 UTC"),
            "{p}"
        );
        // No link without a dashboard.
        assert!(!plain_text(&[sample_alert(3)], "").contains("Dashboard:"));
    }

    #[test]
    fn a_large_group_is_counted_not_listed() {
        let alerts: Vec<Alert> = (0..120).map(sample_alert).collect();
        let p = plain_text(&alerts, "");
        assert_eq!(p.matches("\n  Alert ").count(), MAX_LISTED);
        assert!(p.contains("and 70 more (see keywatch's alerts table)"));
        let h = html(&alerts, "");
        assert!(h.contains("and 70 more (see keywatch's alerts table)"));
        assert!(message(&alerts, &from(), &to(), "").is_ok());
    }
}
