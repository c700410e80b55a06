//! What the feed reads from a request before it touches the database: the
//! poll's query string, the bearer token and `If-None-Match`. Every byte
//! of them comes from whoever connects, so these are plain functions over
//! bytes, with no state and no allocation beyond the decoded query, and
//! they are fuzzed (`fuzz/fuzz_targets/feed_request.rs`, and a proptest
//! below that runs in the test suite).

use std::borrow::Cow;

/// A poll of `/v1/revocations`, within the feed's configured bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Poll {
    /// The cursor: actions with a larger sequence number are wanted
    /// (clamped to `i64::MAX`, the largest sequence Postgres can hold).
    pub after: i64,
    /// Seconds to hold the request open while nothing is new (at most the
    /// configured `max_wait_secs`).
    pub wait: u64,
    /// Actions per page, from 1 to the configured `max_actions`.
    pub limit: u32,
}

/// The longest query string read (a poll needs well under 100 bytes).
pub const MAX_QUERY_BYTES: usize = 2048;

/// Parses a poll's query string (`after`, `wait`, `limit`; other names are
/// ignored, so gateways may add their own). The error, for a 400 answer,
/// names the parameter and what was wrong with it; a parameter given twice
/// is refused, since the two values could mean different cursors.
pub fn parse_poll(
    query: Option<&str>,
    max_wait_secs: u64,
    max_actions: u32,
) -> Result<Poll, String> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!(
            "query string: {} bytes, at most {MAX_QUERY_BYTES} are read",
            query.len()
        ));
    }
    const NAMES: [&str; 3] = ["after", "wait", "limit"];
    let mut given: [Option<u64>; 3] = [None; 3];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name);
        let Some(i) = NAMES.iter().position(|n| *n == name) else {
            continue;
        };
        let name = NAMES[i];
        if given[i].is_some() {
            return Err(format!("query parameter {name}: given more than once"));
        }
        let value = percent_decode(value);
        let n = value.parse::<u64>().map_err(|_| {
            format!(
                "query parameter {name}: expected a non-negative integer, got {}",
                shown(&value)
            )
        })?;
        given[i] = Some(n);
    }
    let [after, wait, limit] = given;
    Ok(Poll {
        after: after.unwrap_or(0).min(i64::MAX as u64) as i64,
        wait: wait.unwrap_or(0).min(max_wait_secs),
        limit: limit
            .map_or(max_actions, |l| l.min(u64::from(max_actions)) as u32)
            .max(1),
    })
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme is
/// case-insensitive, RFC 7235), or `None` for any other header.
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether an `If-None-Match` header matches `etag` (a quoted strong tag).
/// The comparison is weak (RFC 9110 13.1.2): `W/"x"` matches `"x"`.
pub fn etag_matches(if_none_match: &[u8], etag: &str) -> bool {
    let Ok(v) = std::str::from_utf8(if_none_match) else {
        return false;
    };
    v.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a
/// byte; a `%` not followed by two hex digits stays as it is, and bytes
/// that do not form UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(c: &u8) -> Option<u8> {
    (*c as char).to_digit(16).map(|d| d as u8)
}

/// A hostile value for an error message: escaped as Rust's `{:?}` escapes
/// it, quotes included, and cut to about 64 bytes (an escape can take ten
/// bytes for one character, so cutting the characters is not enough).
fn shown(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        if out.len() >= 64 {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// The checks the fuzzer and the test suite run on one input: whatever the
/// bytes, nothing panics and every result is within its bounds.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    // The first byte picks the bounds; the rest splits into the three
    // inputs at the first two zero bytes.
    let (&pick, rest) = data.split_first().unwrap_or((&0, &[]));
    let max_wait = u64::from(pick & 0x0f) * 300;
    let max_actions = u32::from(pick >> 4) * 700 + 1;
    let mut parts = rest.splitn(3, |&b| b == 0);
    let query = parts.next().unwrap_or_default();
    let auth = parts.next().unwrap_or_default();
    let inm = parts.next().unwrap_or_default();

    if let Ok(q) = std::str::from_utf8(query) {
        match parse_poll(Some(q), max_wait, max_actions) {
            Ok(p) => {
                assert!(p.after >= 0 && p.wait <= max_wait, "{p:?}");
                assert!((1..=max_actions).contains(&p.limit), "{p:?}");
            }
            Err(e) => {
                assert!(e.starts_with("query"), "{e}");
                assert!(e.len() < 400, "an error message of {} bytes", e.len());
            }
        }
    }
    if let Some(t) = bearer_token(auth) {
        assert!(!t.is_empty() && t.len() < auth.len(), "{t:?}");
        assert_eq!(t, t.trim());
    }
    let etag = "\"0123456789abcdef0123456789abcdef\"";
    let m = etag_matches(inm, etag);
    if inm == etag.as_bytes() || inm == b"*" {
        assert!(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_parse_within_bounds() {
        let p = parse_poll(Some("after=7&wait=30&limit=5"), 60, 1000).unwrap();
        assert_eq!(
            p,
            Poll {
                after: 7,
                wait: 30,
                limit: 5
            }
        );
        let p = parse_poll(None, 60, 1000).unwrap();
        assert_eq!(
            p,
            Poll {
                after: 0,
                wait: 0,
                limit: 1000
            }
        );
        // Over the bounds: clamped, as before.
        let p = parse_poll(
            Some("after=18446744073709551615&wait=99999&limit=0"),
            60,
            1000,
        );
        assert_eq!(
            p.unwrap(),
            Poll {
                after: i64::MAX,
                wait: 60,
                limit: 1
            }
        );
        let p = parse_poll(Some("limit=99999999999"), 60, 1000).unwrap();
        assert_eq!(p.limit, 1000);
        // Encoded names and values, and names the feed does not know.
        let p = parse_poll(Some("%61fter=%31%32&x=%zz&&gateway=kong+1"), 60, 10).unwrap();
        assert_eq!(p.after, 12);
    }

    #[test]
    fn bad_polls_name_the_parameter() {
        let e = parse_poll(Some("after=-5"), 60, 10).unwrap_err();
        assert_eq!(
            e,
            "query parameter after: expected a non-negative integer, got \"-5\""
        );
        let e = parse_poll(Some("wait=1&wait=2"), 60, 10).unwrap_err();
        assert_eq!(e, "query parameter wait: given more than once");
        let e = parse_poll(Some("limit"), 60, 10).unwrap_err();
        assert!(e.starts_with("query parameter limit: "), "{e}");
        let long = format!("after={}", "9".repeat(MAX_QUERY_BYTES));
        let e = parse_poll(Some(&long), 60, 10).unwrap_err();
        assert!(e.starts_with("query string: "), "{e}");
        let e = parse_poll(Some(&format!("after={}", "x".repeat(500))), 60, 10).unwrap_err();
        assert!(e.len() < 200, "{e}");
        // Escapes count toward the cut (the fuzzer found 437 bytes from 64 characters).
        let e = parse_poll(Some(&format!("after={}", "%01".repeat(300))), 60, 10).unwrap_err();
        assert!(e.len() < 200 && e.ends_with("…\""), "{e}");
    }

    #[test]
    fn tokens_and_etags() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bEARER  abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer \xff"), None);
        assert!(etag_matches(b"W/\"a\", \"b\"", "\"b\""));
        assert!(etag_matches(b"W/\"b\"", "\"b\""));
        assert!(etag_matches(b"*", "\"b\""));
        assert!(!etag_matches(b"\"a\"", "\"b\""));
    }

    proptest::proptest! {
        /// The fuzz target's checks on random bytes, in every test run.
        #[test]
        fn any_request_bytes_pass_the_fuzz_checks(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            fuzz_one(&data);
        }

        /// Any integer cursor reads back, clamped to what Postgres holds.
        #[test]
        fn any_cursor_reads_back(after in proptest::num::u64::ANY, wait in 0u64..10_000) {
            let p = parse_poll(Some(&format!("wait={wait}&after={after}")), 3600, 10).unwrap();
            proptest::prop_assert_eq!(p.after, after.min(i64::MAX as u64) as i64);
            proptest::prop_assert_eq!(p.wait, wait.min(3600));
        }
    }
}
