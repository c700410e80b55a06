//! What came back, as an [`Outcome`]: HTTP answers, transport and SMTP
//! errors, `Retry-After`; and the error texts, cut, without control
//! characters and with the receiver's URL and tokens redacted.

use super::*;

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

/// An HTTP-date (the three forms of RFC 9110 section 5.6.7) as Unix seconds.
pub(crate) fn parse_http_date(s: &str) -> Option<i64> {
    httpdate::parse_http_date(s).ok().map(unix_secs)
}

/// Classifies a failed HTTP exchange (no answer): a refused address is
/// rejected; timeouts, connection and DNS failures are retried. The text
/// is built from the error chain without the URL.
pub(crate) fn classify_transport_error(e: reqwest::Error, timeout: Duration) -> Outcome {
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
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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
pub(crate) fn snippet(s: &str, max: usize) -> String {
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
pub(crate) fn redactions(url: &Url) -> Vec<String> {
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
pub(crate) fn scrub_outcome(o: Outcome, redact: &[String]) -> Outcome {
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

/// Seconds since the Unix epoch.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}
