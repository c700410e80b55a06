//! Dead letters carry no secrets: a raw `api_key` or `prompt` a gateway
//! logged by mistake is removed before a bad record goes to the
//! dead-letter topic, from the parsed object or, for bytes that are not
//! one, from the raw bytes.

/// What replaces a secret in a dead letter.
pub(super) const REDACTED: &str = "[redacted by keywatch]";
/// Most bytes of an over-long record kept in its dead letter.
pub(crate) const OVERSIZE_KEPT: usize = 64 << 10;

/// A bad record's payload for the dead-letter topic, with any raw secret a
/// gateway logged by mistake (`api_key`, `prompt`) removed: from the parsed
/// object when the record is one, else from the bytes (a cut or malformed
/// record may still carry a key). Other bytes go as they came.
pub fn redact(payload: &[u8]) -> Vec<u8> {
    if let Ok(serde_json::Value::Object(mut m)) =
        serde_json::from_slice::<serde_json::Value>(payload)
    {
        let mut changed = false;
        for k in ["api_key", "prompt"] {
            if let Some(v) = m.get_mut(k) {
                *v = serde_json::Value::String(REDACTED.into());
                changed = true;
            }
        }
        if changed {
            return serde_json::to_vec(&m).unwrap_or_else(|_| payload.to_vec());
        }
        return payload.to_vec();
    }
    redact_bytes(payload)
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

/// [`redact`] for bytes that are not a JSON object: every string value
/// after an `api_key` or `prompt` name is replaced, up to its closing quote
/// or the end of the bytes.
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
        if name != b"api_key" && name != b"prompt" {
            continue;
        }
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b':') {
            j += 1;
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
