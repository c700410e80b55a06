//! The checks any input must pass through the gateway adapters, whatever
//! its bytes: shared by the property tests (`detectors/tests/adapters.rs`),
//! the fuzz target (`fuzz/fuzz_targets/gateway.rs`) and the corpus replay
//! (`tests/fuzz_corpus.rs`), which include this file by path.
//!
//! [`gateway`] splits the input as the Kafka pipeline does
//! ([`split_records`]) and reads every record in every [`Format`] (the five
//! and `auto`), with two decoders (default options, and every option set).
//! Nothing panics; the same input gives the same answer, also from a new
//! decoder; an accepted event keeps the contract's limits and never shows
//! a raw key or prompt text the record held; an error names its gateway
//! and field, briefly.

#![allow(dead_code)]

use detectors::decode::{split_records, Format, GatewayOptions, KongCost, Origin, Piece};
use detectors::{DecodeError, Decoder, Event, Problem};

/// Every format a record may be read in: the five and `auto`.
pub const FORMATS: [Format; 6] = [
    Format::Canonical,
    Format::Litellm,
    Format::Kong,
    Format::Apisix,
    Format::EnvoyAiGateway,
    Format::Auto,
];

/// The hash key of the checks' decoders.
pub const HASH_KEY: &[u8] = b"adapter-checks";

/// A stream name longer than a request id may be: a record named by its
/// place must still get an id of at most 128 characters.
const LONG_STREAM: &str = "gateway-logs-of-a-team-that-names-its-topics-at-great-length-\
     eu-west-1-production-blue-green-canary-shadow-mirror-replay-archive-v2";

/// The options of the second decoder: identity from headers, end users
/// trusted, Kong's cost ignored.
pub fn options() -> GatewayOptions {
    GatewayOptions {
        account_header: Some("x-tenant-id".into()),
        key_header: Some("x-key-id".into()),
        end_user: true,
        kong_cost: KongCost::Ignore,
    }
}

/// The two decoders: default options, and [`options`].
pub fn decoders() -> [Decoder; 2] {
    [
        Decoder::new(HASH_KEY),
        Decoder::with_options(HASH_KEY, options()),
    ]
}

/// Header names (compared without case) whose values are raw credentials,
/// in every format.
const KEY_FIELDS: [&str; 4] = [
    "apikey",
    "x-api-key",
    "authorization",
    "proxy-authorization",
];

/// Field names under which text is prompt (or response) content, at any
/// depth: the canonical `prompt`, LiteLLM's `messages`, Kong's `payload`,
/// APISIX's `llm_request`.
const PROMPT_FIELDS: [&str; 4] = ["prompt", "messages", "payload", "llm_request"];

/// Runs every check on `data` read as a Kafka message: its pieces, and
/// each record in it in every format with both decoders. Returns how many
/// (record, format, decoder) reads were accepted.
pub fn gateway(data: &[u8]) -> usize {
    read_in(data, &FORMATS)
}

/// [`gateway`], reading each record only in `formats`.
pub fn read_in(data: &[u8], formats: &[Format]) -> usize {
    let records = split(data);
    let decs = decoders();
    let fresh = decoders();
    let mut accepted = 0;
    for (bytes, element) in records {
        let origins = [
            Origin {
                stream: "gw",
                partition: 1,
                offset: 42,
                element,
            },
            Origin {
                stream: LONG_STREAM,
                partition: i32::MAX,
                offset: i64::MAX,
                element,
            },
        ];
        let parsed = serde_json::from_slice::<serde_json::Value>(strip_bom(bytes)).ok();
        for (i, dec) in decs.iter().enumerate() {
            for &format in formats {
                accepted += usize::from(record(
                    dec,
                    &fresh[i],
                    format,
                    bytes,
                    &origins[i],
                    parsed.as_ref(),
                ));
            }
        }
    }
    accepted
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// The checks on [`split_records`] of `message`; returns its records with
/// their array index. Pieces are sub-slices of the message, in order, with
/// consecutive indices; a break is last; a message that does not start
/// with `[` is one record; and for a JSON array (serde_json's reading) the
/// records are its elements.
pub fn split(message: &[u8]) -> Vec<(&[u8], Option<u32>)> {
    let base = message.as_ptr() as usize;
    let mut pieces = Vec::new();
    split_records(message, |p| pieces.push(p));
    let mut end = 0usize;
    let mut records = Vec::new();
    let mut broken = None;
    for (n, p) in pieces.iter().enumerate() {
        let bytes = match p {
            Piece::Record(b, _) | Piece::Broken(b, _, _) => *b,
        };
        let start = (bytes.as_ptr() as usize).wrapping_sub(base);
        assert!(
            start <= message.len() && bytes.len() <= message.len() - start,
            "piece {n} is not inside the message"
        );
        assert!(
            start >= end,
            "piece {n} starts at {start}, before the last ended at {end}"
        );
        assert_eq!(&message[start..start + bytes.len()], bytes);
        end = start + bytes.len();
        assert!(broken.is_none(), "a piece after the break: {pieces:?}");
        match p {
            Piece::Record(b, None) => {
                assert_eq!(pieces.len(), 1, "a whole-message record among others");
                assert_eq!(b.len(), message.len(), "the whole message");
                records.push((*b, None));
            }
            Piece::Record(b, Some(i)) => {
                assert_eq!(*i as usize, records.len(), "element indices run 0, 1, 2, …");
                assert!(!b.is_empty(), "an empty element");
                assert!(
                    !b[0].is_ascii_whitespace() && !b[b.len() - 1].is_ascii_whitespace(),
                    "element {i} is not trimmed"
                );
                records.push((*b, Some(*i)));
            }
            Piece::Broken(_, i, e) => {
                assert_eq!(
                    *i as usize,
                    records.len(),
                    "the break names the next element"
                );
                error_shape(e, Format::Canonical);
                broken = Some(*i);
            }
        }
    }
    let first = message.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'[') {
        assert!(
            matches!(pieces[..], [Piece::Record(_, None)]),
            "a message not starting with '[' is one record: {pieces:?}"
        );
    }
    if let Ok(serde_json::Value::Array(elems)) = serde_json::from_slice(message) {
        if elems.iter().all(|e| depth(e) < 60) {
            assert_eq!(broken, None, "a JSON array broke: {pieces:?}");
            assert_eq!(records.len(), elems.len(), "one record per element");
            for ((b, _), want) in records.iter().zip(&elems) {
                let got: serde_json::Value = serde_json::from_slice(b).expect("an element is JSON");
                assert_eq!(&got, want);
            }
            let joined: Vec<&[u8]> = records.iter().map(|(b, _)| *b).collect();
            let joined = [b"[".as_slice(), &joined.join(&b","[..]), b"]"].concat();
            let again: serde_json::Value = serde_json::from_slice(&joined).unwrap();
            assert_eq!(again, serde_json::Value::Array(elems), "re-joined");
        }
    }
    records
}

/// The nesting depth of a value (a scalar is 0).
fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Reads `bytes` in `format` with `dec` and checks the answer; whether the
/// record was accepted.
fn record(
    dec: &Decoder,
    fresh: &Decoder,
    format: Format,
    bytes: &[u8],
    origin: &Origin<'_>,
    parsed: Option<&serde_json::Value>,
) -> bool {
    let got = dec.decode_as(format, bytes, origin);
    assert_eq!(
        got,
        dec.decode_as(format, bytes, origin),
        "{format}: deterministic"
    );
    assert_eq!(
        got,
        fresh.decode_as(format, bytes, origin),
        "{format}: the same from a new decoder"
    );
    let (ev, read_as) = match got {
        Ok(ok) => ok,
        Err(e) => {
            error_shape(&e, format);
            // What an error shows of the record is the value it quotes
            // (`got`): never a raw key or prompt, unless the value is an
            // object or array of the wrong type, whose first 40 characters
            // are quoted whatever they hold.
            let quoted = |e: &DecodeError| match &e.problem {
                Problem::WrongType { got, .. } | Problem::Invalid { got, .. }
                    if !got.starts_with("an object") && !got.starts_with("an array") =>
                {
                    Some(got.clone())
                }
                _ => None,
            };
            if let (Some(v), Some(got)) = (parsed, quoted(&e)) {
                let as_ = e.gateway.unwrap_or(Format::Canonical);
                let show = |b: &[u8]| {
                    dec.decode_as(format, b, origin)
                        .err()
                        .and_then(|e| quoted(&e))
                };
                for s in guarded(v, as_) {
                    assert!(
                        !shown_from(bytes, &s, &got, show),
                        "{format}: the error shows {s:?}: {e}"
                    );
                }
            }
            return false;
        }
    };
    match format {
        Format::Auto => {
            assert_ne!(read_as, Format::Auto);
            let direct = dec.decode_as(read_as, bytes, origin);
            assert_eq!(
                direct.as_ref().map(|(e, _)| e),
                Ok(&ev),
                "auto reads a record as {read_as} does"
            );
        }
        f => assert_eq!(read_as, f, "read as the format asked for"),
    }
    limits(&ev, read_as, bytes);
    // Only bytes that are JSON are accepted (serde_json, which refuses
    // lone surrogates, which descriptive text may carry, flagged; and whose
    // `Value` cannot hold 1e400, which `IgnoredAny` reads).
    let surrogate = bytes.windows(4).any(|w| {
        w[..2] == *b"\\u"
            && matches!(w[2], b'd' | b'D')
            && matches!(w[3], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
    });
    let json = parsed.is_some()
        || serde_json::from_slice::<serde::de::IgnoredAny>(strip_bom(bytes)).is_ok();
    assert!(
        surrogate || json,
        "{format}: accepted bytes that are not JSON"
    );
    if let Some(v) = parsed {
        let shown = format!("{ev:?}");
        let show = |b: &[u8]| {
            dec.decode_as(format, b, origin)
                .ok()
                .map(|(e, _)| format!("{e:?}"))
        };
        for s in guarded(v, read_as) {
            assert!(
                !shown_from(bytes, &s, &shown, show),
                "{format}: the event shows raw key or prompt text {s:?}: {shown}"
            );
        }
    }
    true
}

/// Whether `shown` (what reading `bytes` displayed) holds `s` because the
/// record's `s` went there: it holds it, and a read of the same bytes with
/// that `s` masked does not (so text the decoder writes whatever the
/// record, such as an error's wording, is not mistaken for it). A record
/// that holds `s` more than once, or only escaped, is not judged.
pub fn shown_from(
    bytes: &[u8],
    s: &str,
    shown: &str,
    show: impl Fn(&[u8]) -> Option<String>,
) -> bool {
    let raw = bytes
        .windows(s.len())
        .filter(|w| *w == s.as_bytes())
        .count();
    if !shown.contains(s) || raw != 1 || loose_unescape(bytes).matches(s).count() != 1 {
        return false;
    }
    let at = bytes
        .windows(s.len())
        .position(|w| w == s.as_bytes())
        .unwrap();
    let masked = [
        &bytes[..at],
        "Q".repeat(s.len()).as_bytes(),
        &bytes[at + s.len()..],
    ]
    .concat();
    show(&masked).is_none_or(|again| !again.contains(s))
}

/// `b` as text with its JSON escapes undone where they stand for a
/// character, leniently (any bytes).
fn loose_unescape(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    None => out.push_str(&hex),
                }
            }
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The shape of an error: `gateway: field: problem` (the canonical event:
/// `field: problem`), under 400 bytes.
pub fn error_shape(e: &DecodeError, format: Format) {
    let msg = e.to_string();
    assert!(!e.field.is_empty(), "an error names no field: {msg}");
    match (format, e.gateway) {
        (Format::Canonical, g) => assert_eq!(g, None, "{msg}"),
        (Format::Auto, g) => assert_ne!(g, Some(Format::Canonical), "{msg}"),
        (f, g) => assert_eq!(g, Some(f), "a {f} error names its gateway: {msg}"),
    }
    let prefix = match e.gateway {
        Some(g) => format!("{}: {}: ", g.as_str(), e.field),
        None => format!("{}: ", e.field),
    };
    assert!(
        msg.starts_with(&prefix),
        "{msg:?} does not start with {prefix:?}"
    );
    assert!(msg.len() < 400, "an error of {} bytes: {msg}", msg.len());
}

/// The contract's limits on an accepted event.
pub fn limits(ev: &Event<'_>, read_as: Format, bytes: &[u8]) {
    let chars = |s: &str| s.chars().count();
    // A U+FFFD the decoder put in place of a NUL or a lone surrogate, as
    // opposed to one the record sent.
    let sent_fffd = {
        let lower = bytes.to_ascii_lowercase();
        lower.windows(6).any(|w| w == b"\\ufffd")
            || bytes.windows(3).any(|w| w == "\u{FFFD}".as_bytes())
    };
    for (name, id) in [
        ("request_id", &ev.request_id),
        ("user_id", &ev.user_id),
        ("key_id", &ev.key_id),
    ] {
        assert!(
            (1..=128).contains(&chars(id)),
            "{name}: {} characters",
            chars(id)
        );
        assert!(!id.contains('\0'), "{name}: {id:?}");
        assert!(
            sent_fffd || !id.contains('\u{FFFD}'),
            "{read_as}: {name} {id:?} was changed (a NUL or lone surrogate replaced), not refused"
        );
    }
    for (name, text, max) in [
        ("tier", &ev.tier, 64),
        ("user_agent", &ev.user_agent, 512),
        ("endpoint", &ev.endpoint, 256),
        ("model", &ev.model, 128),
        ("prompt_fingerprint", &ev.prompt_fingerprint, 128),
    ] {
        if let Some(t) = text {
            assert!(
                chars(t) <= max,
                "{name}: {} characters (at most {max})",
                chars(t)
            );
            assert!(!t.contains('\0'), "{name}: {t:?}");
        }
    }
    if read_as != Format::Canonical {
        // A gateway's endpoint is its path: a query may carry `?apikey=`.
        assert!(
            !ev.endpoint
                .as_deref()
                .is_some_and(|e| e.contains(['?', '#'])),
            "{read_as}: endpoint {:?} keeps its query",
            ev.endpoint
        );
    }
    assert!(
        ev.status.is_none_or(|s| (100..=599).contains(&s)),
        "status {:?}",
        ev.status
    );
    assert!(
        ev.cost_usd.is_none_or(|c| c.is_finite() && c >= 0.0),
        "cost_usd {:?}",
        ev.cost_usd
    );
}

/// The text in a record (parsed) that an event read as `format` must
/// never show: each raw credential (a key header's value, and its token
/// after a `Bearer`/`Basic` scheme; the canonical `api_key`) and each
/// string of prompt content, when it is long enough not to match by chance
/// (12 characters, a letter past `f`, so no number or hash) and no other
/// string of the record holds it.
pub fn guarded(v: &serde_json::Value, format: Format) -> Vec<String> {
    let mut secret = Vec::new();
    let mut other = Vec::new();
    walk(v, format, 0, false, &mut secret, &mut other);
    let mut out: Vec<String> = secret
        .into_iter()
        .flat_map(|s| {
            let token = s.rsplit(' ').next().map(str::to_string);
            [Some(s), token]
        })
        .flatten()
        .filter(|s| {
            s.chars().count() >= 12
                && s.chars()
                    .any(|c| c.is_ascii_alphabetic() && c.to_ascii_lowercase() > 'f')
                && !other.iter().any(|o| o.contains(s.as_str()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn walk(
    v: &serde_json::Value,
    format: Format,
    level: usize,
    inside: bool,
    secret: &mut Vec<String>,
    other: &mut Vec<String>,
) {
    use serde_json::Value;
    match v {
        Value::String(s) if inside => secret.push(s.clone()),
        Value::String(s) => other.push(s.clone()),
        Value::Number(n) => other.push(n.to_string()),
        Value::Array(a) => {
            for x in a {
                walk(x, format, level + 1, inside, secret, other);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                other.push(k.clone());
                let guarded = KEY_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k))
                    || PROMPT_FIELDS.contains(&k.as_str())
                    || (format == Format::Canonical && level == 0 && k == "api_key");
                walk(x, format, level + 1, inside || guarded, secret, other);
            }
        }
        _ => {}
    }
}
