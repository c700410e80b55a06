//! Dead letters carry no secrets: a raw `api_key` or `prompt` a gateway
//! logged by mistake is removed before a bad record goes to the
//! dead-letter topic, from the parsed object or, for bytes that are not
//! one, from the raw bytes.

/// What replaces a secret in a dead letter.
pub(super) const REDACTED: &str = "[redacted by keywatch]";
/// Most bytes of an over-long record kept in its dead letter.
pub(crate) const OVERSIZE_KEPT: usize = 64 << 10;

/// Field names whose values are secrets or prompt text wherever they sit
/// in a record (compared without case): the canonical `api_key` and
/// `prompt`, key headers a gateway logs (Kong keeps `apikey`, APISIX every
/// header), LiteLLM's `messages` and `response`, Kong's `payload`, APISIX's
/// `llm_request`, `llm_response_text` and request `body`, and a message's
/// `content`.
const SECRET_FIELDS: [&str; 16] = [
    "api_key",
    "prompt",
    "apikey",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "messages",
    "payload",
    "llm_request",
    "llm_response_text",
    "body",
    "content",
    "querystring",
];

/// Fields holding a URL or path, whose query string may carry a key (`?apikey=`).
const URL_FIELDS: [&str; 4] = ["uri", "url", "x-envoy-origin-path", "upstream_uri"];

fn is_secret(name: &[u8]) -> bool {
    SECRET_FIELDS
        .iter()
        .any(|f| f.as_bytes().eq_ignore_ascii_case(name))
}

/// A bad record's payload for the dead-letter topic, with every raw secret
/// and prompt a gateway logged (`SECRET_FIELDS`, at any depth, and the
/// query string of a URL) removed: from the parsed value when the record
/// is JSON, else from the bytes (a cut or malformed record may still carry
/// a key). Other bytes go as they came.
pub fn redact(payload: &[u8]) -> Vec<u8> {
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(payload) {
        if v.is_object() || v.is_array() {
            if scrub(&mut v, 0) {
                return serde_json::to_vec(&v).unwrap_or_else(|_| redact_bytes(payload));
            }
            return payload.to_vec();
        }
    }
    redact_bytes(payload)
}

/// Replaces secret values in `v`, depth first; whether anything changed.
fn scrub(v: &mut serde_json::Value, depth: u32) -> bool {
    use serde_json::Value;
    let mut changed = false;
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let response_text =
                    k == "response" && (val.is_string() || val.get("choices").is_some());
                if is_secret(k.as_bytes()) || response_text {
                    *val = Value::String(REDACTED.into());
                    changed = true;
                } else if URL_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k)) {
                    if let Some(q) = val.as_str().and_then(|s| s.find('?')) {
                        let kept = format!("{}?{REDACTED}", &val.as_str().unwrap_or("")[..q]);
                        *val = Value::String(kept);
                        changed = true;
                    }
                } else if depth < 64 {
                    changed |= scrub(val, depth + 1);
                }
            }
        }
        Value::Array(a) if depth < 64 => {
            for val in a {
                changed |= scrub(val, depth + 1);
            }
        }
        _ => {}
    }
    changed
}

/// The end of the JSON string starting after the quote at `from`: the index
/// of its closing quote, or the end of the bytes.
pub(super) fn string_end(b: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// A string's text with `\uXXXX` and one-letter escapes undone (enough to
/// recognise a field name however it is spelled).
pub(super) fn loose_unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            if raw[i + 1] == b'u' && i + 6 <= raw.len() {
                let hex = std::str::from_utf8(&raw[i + 2..i + 6]).ok();
                if let Some(c) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(c);
                    i += 6;
                    continue;
                }
            }
            out.push(raw[i + 1]);
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// [`redact`] for bytes that are not JSON: every string value after a
/// `SECRET_FIELDS` name is replaced, up to its closing quote or the end
/// of the bytes.
pub(super) fn redact_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let end = string_end(b, i + 1);
        let name = loose_unescape(&b[i + 1..end]);
        out.extend_from_slice(&b[i..(end + 1).min(b.len())]);
        i = end + 1;
        let url = URL_FIELDS
            .iter()
            .any(|f| f.as_bytes().eq_ignore_ascii_case(&name));
        if !url && !is_secret(&name) {
            continue;
        }
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b':') {
            j += 1;
        }
        if url && j < b.len() && b[j] == b'"' {
            // A URL keeps its path; its query string (which may hold a key) goes.
            let close = string_end(b, j + 1);
            if let Some(q) = b[j + 1..close].iter().position(|&c| c == b'?') {
                out.extend_from_slice(&b[i..=j + 1 + q]);
                out.extend_from_slice(REDACTED.as_bytes());
                if close < b.len() {
                    out.push(b'"');
                }
                i = close + 1;
            }
            continue;
        }
        if j < b.len() && b[j] == b'"' {
            out.extend_from_slice(&b[i..=j]);
            out.extend_from_slice(REDACTED.as_bytes());
            let close = string_end(b, j + 1);
            if close < b.len() {
                out.push(b'"');
            }
            i = close + 1;
        }
    }
    out
}

/// The checks the fuzzer (`fuzz/fuzz_targets/redact.rs`) and the test
/// suite run on one input: [`redact`] never panics on any bytes, and a
/// secret written as the value of `api_key` or `prompt` at the start of a
/// record never reaches a dead letter, whatever bytes follow it (a cut
/// record, invalid UTF-8, more fields, another copy of the name).
#[doc(hidden)]
pub fn fuzz_redact(data: &[u8]) {
    const SECRET: &[u8] = b"sk-fuzz-7Hq2Lw9Xv4";
    let count = |b: &[u8]| b.windows(SECRET.len()).filter(|w| *w == SECRET).count();
    let _ = redact(data);
    for name in ["api_key", "prompt"] {
        let mut rec = format!("{{\"{name}\": \"").into_bytes();
        rec.extend_from_slice(SECRET);
        rec.push(b'"');
        rec.extend_from_slice(data);
        let out = redact(&rec);
        assert!(
            count(&out) <= count(data),
            "{name}'s value reached the dead letter: {}",
            String::from_utf8_lossy(&out)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_carry_no_secrets() {
        let out = redact(
            br#"{"ts":"bad","api_key":"sk-live-SECRET","prompt":"my secret prompt","user_id":"u"}"#,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("SECRET") && !text.contains("secret prompt"),
            "{text}"
        );
        assert!(text.contains("\"ts\":\"bad\""));
        assert_eq!(redact(b"not json at all"), b"not json at all");
        // Cut or malformed records are redacted from their bytes, however
        // the name is spelled, up to the end of a cut value.
        for raw in [
            &br#"{"ts":"x","api_key":"sk-live-SECRET","user_id":"u""#[..],
            br#"{"api\u005fkey" : "sk-live-SECRET\"still" "prompt":"secret prompt"#,
            br#"garbage "prompt":"secret prompt and more"#,
        ] {
            let text = String::from_utf8(redact(raw)).unwrap();
            assert!(
                !text.contains("SECRET")
                    && !text.contains("secret prompt")
                    && !text.contains("still"),
                "{text}"
            );
            assert!(text.contains(REDACTED), "{text}");
        }
        assert_eq!(
            redact(br#"{"user_id":"u","prompt_tokens":"many""#),
            br#"{"user_id":"u","prompt_tokens":"many""#
        );
    }

    #[test]
    fn gateway_records_lose_their_keys_and_prompts_at_any_depth() {
        let kong = br#"{"request":{"uri":"/v1/chat?apikey=sk-QUERY","headers":{"ApiKey":"sk-HEADER","authorization":"Bearer sk-BEARER","user-agent":"curl"},"querystring":{"apikey":"sk-QUERY"}},"ai":{"proxy":{"payload":{"request":"{\"messages\":\"PROMPT\"}"}}},"started_at":"bad"}"#;
        let litellm = br#"[{"id":"x","messages":[{"role":"user","content":"PROMPT"}],"response":{"choices":[{"message":{"content":"ANSWER"}}]},"startTime":"bad"}]"#;
        let cut = br#"{"request":{"headers":{"x-api-key":"sk-CUT","user-agent":"curl"#;
        let cut_url = br#"{"request":{"uri":"/v1/x?apikey=sk-URL","headers":{"#;
        for raw in [&kong[..], litellm, cut, cut_url] {
            let text = String::from_utf8(redact(raw)).unwrap();
            for secret in ["sk-", "PROMPT", "ANSWER"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains(REDACTED), "{text}");
        }
        let text = String::from_utf8(redact(kong)).unwrap();
        assert!(
            text.contains("\"user-agent\":\"curl\"") && text.contains("/v1/chat?"),
            "{text}"
        );
    }

    proptest::proptest! {
        /// The fuzz target's checks, on bytes rich in JSON's structure, in every test run.
        #[test]
        fn whatever_follows_a_secret_it_is_redacted(
            data in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(&b"\""[..]), proptest::prelude::Just(&b"\\"[..]),
                    proptest::prelude::Just(&b":"[..]), proptest::prelude::Just(&b","[..]),
                    proptest::prelude::Just(&b"}"[..]), proptest::prelude::Just(&b"api_key"[..]),
                    proptest::prelude::Just(&b"prompt"[..]), proptest::prelude::Just(&b"\\u0022"[..]),
                    proptest::prelude::Just(&b"\xff"[..]), proptest::prelude::Just(&b" x"[..]),
                ],
                0..40,
            ),
        ) {
            fuzz_redact(&data.concat());
        }
    }
}
