//! The Slack message for one alert or a group of them: Block Kit, readable
//! on a phone at 3 a.m.
//!
//! Each alert gets a section saying what happened (its reason), the facts
//! as fields (who, how much, what keywatch did and until when), a link to
//! the user's dashboard, and a context line with the alert id and time.
//! Slack refuses a whole message that breaks one of its limits (50 blocks,
//! 3000 characters of section text, 10 fields of 2000, a 150-character
//! header), and a refused message is a lost alert, so every text here is
//! cut to fit and a large group lists its first alerts and says how many
//! more there are. User ids, keys and reasons come from gateway traffic,
//! so `&`, `<` and `>` are escaped: otherwise a user id like `<!channel>`
//! would page a whole channel.

use detectors::{Alert, Severity};
use serde_json::{json, Value};

use crate::notify::{count_title, dashboard_link, facts, human_time, severity_upper};

/// Most blocks in one message.
pub const MAX_BLOCKS: usize = 50;
/// Most characters of a section's text.
pub const MAX_SECTION_TEXT: usize = 3000;
/// Most fields in a section.
pub const MAX_FIELDS: usize = 10;
/// Most characters of one field.
pub const MAX_FIELD_TEXT: usize = 2000;
/// Most characters of a header block.
pub const MAX_HEADER_TEXT: usize = 150;
/// The notification fallback `text` is kept to this many characters (Slack
/// truncates past 40,000; a notification shows far less).
pub const MAX_FALLBACK_TEXT: usize = 3000;

/// The Slack payload (`text` and `blocks`) for `alerts`, with each alert's
/// dashboard link made from `dashboard_url` (no link when it is empty).
pub fn message(alerts: &[Alert], dashboard_url: &str) -> Value {
    let shown = alerts_that_fit(alerts.len());
    let mut blocks = Vec::with_capacity(3 * shown + 2);
    blocks.push(json!({
        "type": "header",
        "text": {
            "type": "plain_text",
            "text": cut(&format!("keywatch: {}", count_title(alerts)), MAX_HEADER_TEXT),
            "emoji": true,
        },
    }));
    for (i, alert) in alerts[..shown].iter().enumerate() {
        if i > 0 {
            blocks.push(json!({"type": "divider"}));
        }
        blocks.push(section(alert, dashboard_url));
        blocks.push(context(alert));
    }
    let rest = alerts.len() - shown;
    if rest > 0 {
        blocks.push(json!({"type": "divider"}));
        blocks.push(json!({
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": format!("_…and {rest} more (see keywatch's alerts table)_"),
            },
        }));
    }
    json!({ "text": fallback_text(alerts), "blocks": blocks })
}

/// How many alerts fit in [`MAX_BLOCKS`]: a header, then per alert a
/// section and a context block with a divider between alerts, and when
/// some are left out, a divider and an "and N more" section.
fn alerts_that_fit(n: usize) -> usize {
    let blocks_for = |k: usize| 1 + 3 * k - usize::from(k > 0) + if k < n { 2 } else { 0 };
    let mut k = n.min(MAX_BLOCKS);
    while k > 0 && blocks_for(k) > MAX_BLOCKS {
        k -= 1;
    }
    k
}

/// The alert's section: severity and kind, what happened, the dashboard
/// link; the facts as fields.
fn section(alert: &Alert, dashboard_url: &str) -> Value {
    let emoji = match alert.severity {
        Severity::Critical => ":rotating_light:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    };
    let head = format!(
        "{emoji} *{}* `{}`\n",
        severity_upper(alert.severity),
        alert.kind.as_str()
    );
    let link = dashboard_link(dashboard_url, &alert.user_id)
        .map(|url| format!("\n<{}|Open dashboard>", link_target(&url)))
        .filter(|l| l.chars().count() <= MAX_SECTION_TEXT / 2)
        .unwrap_or_default();
    let room = MAX_SECTION_TEXT - head.chars().count() - link.chars().count();
    let text = format!("{head}{}{link}", escape_within(&alert.reason, room));
    let fields: Vec<Value> = facts(alert)
        .into_iter()
        .take(MAX_FIELDS)
        .map(|(label, value)| {
            let label = format!("*{label}*\n");
            let room = MAX_FIELD_TEXT - label.chars().count();
            json!({"type": "mrkdwn", "text": format!("{label}{}", escape_within(&value, room))})
        })
        .collect();
    json!({
        "type": "section",
        "text": {"type": "mrkdwn", "text": text},
        "fields": fields,
    })
}

/// The alert's id and time, small, under its section.
fn context(alert: &Alert) -> Value {
    let id: String = alert
        .id
        .chars()
        .map(|c| if c == '`' { '\'' } else { c })
        .collect();
    json!({
        "type": "context",
        "elements": [{
            "type": "mrkdwn",
            "text": format!("Alert `{}` · {}", escape_within(&id, 200), human_time(alert.ts)),
        }],
    })
}

/// The plain notification text: what a phone's lock screen shows.
fn fallback_text(alerts: &[Alert]) -> String {
    let text = match alerts {
        [] => "keywatch: no alerts".to_string(),
        [one] => format!(
            "keywatch: {} {} for {}: {}",
            severity_upper(one.severity),
            one.kind.as_str(),
            one.user_id,
            one.reason
        ),
        [first, rest @ ..] => format!(
            "keywatch: {}: {} (and {} more)",
            count_title(alerts),
            first.reason,
            rest.len()
        ),
    };
    escape_within(&text, MAX_FALLBACK_TEXT)
}

/// A URL inside a mrkdwn link `<url|text>`: `&` escaped as Slack asks,
/// and the characters that would end the link percent-encoded.
fn link_target(url: &str) -> String {
    url.replace('&', "&amp;")
        .replace('<', "%3C")
        .replace('>', "%3E")
        .replace('|', "%7C")
}

/// Escapes `&`, `<` and `>` for mrkdwn (and plain text fields, which Slack
/// parses the same way).
pub fn escape_mrkdwn(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// [`escape_mrkdwn`], cut (never inside an escape) so the result is at
/// most `max` characters, ending in `…` when cut.
fn escape_within(s: &str, max: usize) -> String {
    let full = escape_mrkdwn(s);
    if full.chars().count() <= max {
        return full;
    }
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        let piece = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            _ => "",
        };
        let w = if piece.is_empty() { 1 } else { piece.len() };
        if n + w + 1 > max {
            break;
        }
        if piece.is_empty() {
            out.push(c);
        } else {
            out.push_str(piece);
        }
        n += w;
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// Plain text cut to `max` characters, ending in `…` when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::tests::sample_alert;

    /// Asserts every Slack limit this module promises to keep.
    fn assert_within_limits(msg: &Value) {
        let blocks = msg["blocks"].as_array().unwrap();
        assert!(blocks.len() <= MAX_BLOCKS, "{} blocks", blocks.len());
        assert!(msg["text"].as_str().unwrap().chars().count() <= MAX_FALLBACK_TEXT);
        for b in blocks {
            match b["type"].as_str().unwrap() {
                "header" => {
                    let t = b["text"]["text"].as_str().unwrap();
                    assert!(t.chars().count() <= MAX_HEADER_TEXT, "{t}");
                    assert_eq!(b["text"]["type"], "plain_text");
                }
                "section" => {
                    let t = b["text"]["text"].as_str().unwrap();
                    assert!(
                        t.chars().count() <= MAX_SECTION_TEXT,
                        "{}",
                        t.chars().count()
                    );
                    if let Some(fields) = b["fields"].as_array() {
                        assert!(fields.len() <= MAX_FIELDS);
                        for f in fields {
                            let t = f["text"].as_str().unwrap();
                            assert!(t.chars().count() <= MAX_FIELD_TEXT, "{}", t.chars().count());
                        }
                    }
                }
                "context" => {
                    let els = b["elements"].as_array().unwrap();
                    assert!(els.len() <= 10);
                }
                "divider" => {}
                other => panic!("unexpected block {other}"),
            }
        }
    }

    #[test]
    fn a_large_group_keeps_every_limit() {
        let alerts: Vec<Alert> = (0..200).map(sample_alert).collect();
        let msg = message(&alerts, "https://dash.example/u/{user_id}");
        assert_within_limits(&msg);
        let blocks = msg["blocks"].as_array().unwrap();
        assert_eq!(
            blocks[0]["text"]["text"],
            "keywatch: 200 alerts (67 critical)"
        );
        let last = blocks.last().unwrap()["text"]["text"].as_str().unwrap();
        let shown = blocks.iter().filter(|b| b["type"] == "context").count();
        assert_eq!(shown, 16);
        assert_eq!(
            last,
            format!("_…and {} more (see keywatch's alerts table)_", 200 - shown)
        );
    }

    #[test]
    fn group_sizes_around_the_limit() {
        for n in [1, 2, 15, 16, 17, 18, 50, 51] {
            let alerts: Vec<Alert> = (0..n).map(sample_alert).collect();
            let msg = message(&alerts, "");
            assert_within_limits(&msg);
            let blocks = msg["blocks"].as_array().unwrap();
            let shown = blocks.iter().filter(|b| b["type"] == "context").count();
            let more = blocks.last().unwrap()["text"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("more (see"));
            assert_eq!(more, shown < n, "n = {n}");
        }
    }

    #[test]
    fn huge_texts_are_cut_to_fit() {
        let mut a = sample_alert(0);
        a.reason = "<&>".repeat(5000);
        a.user_id = "u".repeat(5000);
        a.key_id = Some("k&".repeat(3000));
        let msg = message(&[a], "https://dash.example/u/{user_id}");
        assert_within_limits(&msg);
        let text = msg["blocks"][1]["text"]["text"].as_str().unwrap();
        // Never cut inside an escape.
        let body = text.split('\n').nth(1).unwrap();
        assert!(body.ends_with('…'));
        let trimmed = body.trim_end_matches('…');
        let leftover = trimmed
            .replace("&lt;", "")
            .replace("&amp;", "")
            .replace("&gt;", "");
        assert_eq!(leftover, "", "a cut escape");
        // The dashboard link, if kept, is whole; here it is too long and dropped.
        assert!(!text.contains("Open dashboard"));
    }

    #[test]
    fn user_text_is_escaped() {
        let mut a = sample_alert(1);
        a.reason = "<!channel> spent & lost <http://evil.example|click>".into();
        a.user_id = "<@U123>".into();
        let msg = message(&[a], "https://dash.example/u/{user_id}?x=1&y=2");
        let raw = msg.to_string();
        assert!(!raw.contains("<!channel>"), "{raw}");
        assert!(!raw.contains("<@U123>"), "{raw}");
        assert!(!raw.contains("<http://evil"), "{raw}");
        let section = msg["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(
            section.contains("&lt;!channel&gt; spent &amp; lost &lt;http://evil.example|click&gt;"),
            "{section}"
        );
        // The link carries the percent-encoded id and Slack's escaping of `&`.
        assert!(
            section
                .ends_with("\n<https://dash.example/u/%3C%40U123%3E?x=1&amp;y=2|Open dashboard>"),
            "{section}"
        );
        let fields = msg["blocks"][1]["fields"].as_array().unwrap();
        assert_eq!(fields[0]["text"], "*User*\n&lt;@U123&gt; (pro tier)");
        assert!(msg["text"].as_str().unwrap().contains("&lt;!channel&gt;"));
    }

    #[test]
    fn one_alert_reads_well() {
        let a = sample_alert(3);
        let msg = message(&[a], "");
        assert_eq!(
            msg["blocks"][0]["text"]["text"],
            "keywatch: 1 critical alert"
        );
        assert_eq!(
            msg["text"],
            "keywatch: CRITICAL budget_threshold for acct_3: acct_3 has spent $40.12 of its $50.00 daily budget (80%)."
        );
        let section = &msg["blocks"][1];
        assert_eq!(
            section["text"]["text"],
            ":rotating_light: *CRITICAL* `budget_threshold`\nacct_3 has spent $40.12 of its $50.00 daily budget (80%)."
        );
        let fields: Vec<&str> = section["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "*User*\nacct_3 (pro tier)",
                "*Key*\nkey_3",
                "*Kind*\nbudget_threshold",
                "*Severity*\ncritical",
                "*What keywatch did*\nBlocked, until 2026-05-24 00:00:00 UTC",
                "*Budget*\n$40.12 of $50.00 (80%), daily budget from 2026-05-23 00:00:00 UTC",
                "*Observed*\n40.12",
                "*Threshold*\n40",
            ]
        );
        assert_eq!(
            msg["blocks"][2]["elements"][0]["text"],
            "Alert `a0003deadbeef` · 2026-05-23 10:15:02 UTC"
        );
        assert_eq!(
            msg["blocks"].as_array().unwrap().len(),
            3,
            "no divider after one alert"
        );
    }
}
