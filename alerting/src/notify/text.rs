//! What a person reads: the pieces of text the Slack and email messages share.

use super::*;

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

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986 unreserved characters, so the
/// result is safe in a path segment or a query value.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, NOT_UNRESERVED).to_string()
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
pub(crate) fn group_thousands(x: f64) -> String {
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
