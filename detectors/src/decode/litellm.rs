//! LiteLLM proxy: the StandardLoggingPayload every callback receives
//! (`litellm/types/utils.py`, docs.litellm.ai/docs/proxy/logging_spec), and
//! the older SpendLogs row some sinks send.
//!
//! | event | StandardLoggingPayload | SpendLogs |
//! |---|---|---|
//! | ts | `startTime`: epoch seconds, or a naive `YYYY-MM-DD HH:MM:SS.ffffff` (UTC) | `startTime` |
//! | request_id | `id`, else `litellm_call_id` | `request_id` |
//! | user_id | `metadata.user_api_key_user_id`, else `_team_id`, else `_org_id` (else `end_user` if `gateways.end_user`), else the key | `user`, `team_id`, `organization_id` |
//! | key_id | `metadata.user_api_key_hash` (SHA-256 of the virtual key), else `_alias`; placeholders (`unused-…`) are not keys | `api_key` (the hash) |
//! | status | `success` → 200, `failure` → `error_information.error_code`, else 500 | `status` |
//! | cost_usd | `response_cost` | `spend` |
//! | model | `model_group` (the alias asked for), else `model` | same |
//! | ip, user_agent | `requester_ip_address`, `user_agent` (top level, else `metadata`); often empty | |
//! | endpoint | `metadata.user_api_key_request_route` | |
//! | latency_ms | `(endTime - startTime) * 1000` | |
//! | prompt | `messages`, unless LiteLLM redacted them | |

use std::borrow::Cow;

use super::gateway::{parse_addr, parse_naive_or_rfc3339, Found, Origin};
use super::{
    invalid, quote, DecodeError, Decoder, Problem, Raw, Scanner, F_COST, F_CT, F_KEY, F_MODEL,
    F_PT, F_REQ, F_STATUS, F_TS, F_UA, F_USER,
};
use crate::event::Event;

/// What LiteLLM writes for messages when message logging is off.
const REDACTED_MESSAGES: &str = "redacted by litellm";

/// Whether `messages` is LiteLLM's placeholder for messages it did not
/// log (the placeholder string, or one message holding it): not a prompt,
/// else every request would look like the same prompt. Only the whole
/// value counts, so a prompt that quotes the phrase is still a prompt.
fn redacted(m: &str) -> bool {
    // The placeholder is short: a long value is a prompt, as is one
    // without the phrase (checked before anything is copied).
    if m.len() > 512 || !m.contains(REDACTED_MESSAGES) {
        return false;
    }
    let m = m.trim();
    if m.starts_with(REDACTED_MESSAGES) {
        return true;
    }
    let inner = m
        .strip_prefix('[')
        .and_then(|m| m.strip_suffix(']'))
        .map(str::trim)
        .unwrap_or(m);
    let Some(body) = inner.strip_prefix('{').and_then(|m| m.strip_suffix('}')) else {
        return false;
    };
    // `{"role":"user","content":"redacted by litellm…"}`, in any field order.
    let rest = body.replace(' ', "");
    let content = rest
        .split_once("\"content\":\"")
        .map(|(_, c)| c)
        .unwrap_or("");
    content.starts_with(REDACTED_MESSAGES.replace(' ', "").as_str())
        && !content.trim_end_matches('"').contains('"')
        && rest.matches("\"content\"").count() == 1
        && !rest.contains('{')
}

/// A time field: epoch seconds, or text.
enum When {
    Seconds(f64),
    Text(i64),
}

fn when(sc: &mut Scanner<'_>, field: &'static str) -> Result<Option<i64>, DecodeError> {
    let w = match sc.peek() {
        Some(b'"') => {
            let t = sc.req_str(field, false)?;
            When::Text(parse_naive_or_rfc3339(&t).ok_or_else(|| {
                invalid(
                    field,
                    "epoch seconds or a time such as 2025-01-24 09:20:46.847371",
                    quote(&t),
                )
            })?)
        }
        _ => match sc.epoch(field, 1000.0)? {
            Some(ms) => When::Seconds(ms as f64),
            None => return Ok(None),
        },
    };
    Ok(Some(match w {
        When::Seconds(ms) => ms as i64,
        When::Text(ms) => ms,
    }))
}

/// A key value that is not a key: LiteLLM writes placeholders when no
/// proxy key was used (`unused-for-aws-bedrock` in a captured payload).
fn placeholder(k: &str) -> bool {
    k.starts_with("unused")
}

/// Reads one LiteLLM record (errors are said of the gateway by the caller).
pub(super) fn read<'a>(
    dec: &Decoder,
    record: &'a [u8],
    origin: &Origin<'_>,
) -> Result<Event<'a>, DecodeError> {
    let mut sc = Scanner::open(record)?;
    let mut f = Found::new();
    let mut seen = 0u32;
    let mut end_ms = None;
    let mut outcome: Option<Cow<'a, str>> = None;
    let mut error_code: Option<u16> = None;
    let mut end_user = None;
    let mut once = |bit: u32, field: &'static str| {
        if seen & bit != 0 {
            return Err(DecodeError::new(field, Problem::Duplicate));
        }
        seen |= bit;
        Ok(())
    };
    sc.fields(|sc, k| {
        match &*k {
            "startTime" => {
                once(F_TS, "startTime")?;
                f.ts_ms = when(sc, "startTime")?;
            }
            "endTime" => end_ms = when(sc, "endTime")?,
            "id" | "request_id" => {
                once(F_REQ, "id")?;
                if let Some(id) = sc.opt_id(if &*k == "id" { "id" } else { "request_id" })? {
                    f.request_id.offer(0, id);
                }
            }
            "litellm_call_id" => {
                if let Some(id) = sc.opt_id("litellm_call_id")? {
                    f.request_id.offer(1, id);
                }
            }
            "user" => {
                once(F_USER, "user")?;
                if let Some(u) = sc.opt_id("user")? {
                    f.user.offer(0, u);
                }
            }
            "team_id" => {
                if let Some(u) = sc.opt_id("team_id")? {
                    f.user.offer(1, u);
                }
            }
            "organization_id" => {
                if let Some(u) = sc.opt_id("organization_id")? {
                    f.user.offer(2, u);
                }
            }
            "end_user" => end_user = sc.opt_id("end_user")?,
            "api_key" => {
                // SpendLogs: the key's hash, not the key.
                once(F_KEY, "api_key")?;
                if let Some(k) = sc.opt_id("api_key")? {
                    if !placeholder(&k) {
                        f.key.offer(0, k);
                    }
                }
            }
            "metadata" if sc.at_object() => metadata(sc, &mut f, dec.options.end_user)?,
            "status" => match sc.raw("status")? {
                Raw::Str(s) => outcome = Some(s),
                Raw::Null => {}
                _ => f.flag(F_STATUS, true),
            },
            "error_information" if sc.at_object() => {
                sc.fields(|sc, k| match &*k {
                    "error_code" => {
                        let (code, _) = sc.status("error_information.error_code")?;
                        error_code = code;
                        Ok(())
                    }
                    _ => sc.skip_value(0),
                })?;
            }
            "prompt_tokens" => {
                once(F_PT, "prompt_tokens")?;
                f.usage.prompt = sc.uint("prompt_tokens", true)?;
            }
            "completion_tokens" => {
                once(F_CT, "completion_tokens")?;
                f.usage.completion = sc.uint("completion_tokens", true)?;
            }
            "response_cost" | "spend" => {
                once(F_COST, "response_cost")?;
                f.ev().cost_usd = sc.cost(if &*k == "spend" {
                    "spend"
                } else {
                    "response_cost"
                })?;
            }
            "model_group" => model(sc, &mut f, 0, "model_group")?,
            "model" => model(sc, &mut f, 1, "model")?,
            "requester_ip_address" => f.address(sc, "requester_ip_address", parse_addr)?,
            "user_agent" => {
                let (t, bad) = sc.text("user_agent", 512)?;
                f.flag(F_UA, bad);
                if t.is_some() {
                    f.ev().user_agent = t;
                }
            }
            "messages" => {
                let m = match sc.peek() {
                    Some(b'"') => sc.req_str("messages", false)?,
                    _ => Cow::Borrowed(sc.span()?),
                };
                if !redacted(&m) && m != "null" {
                    f.prompt = Some(m);
                }
            }
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })?;
    sc.end()?;
    if dec.options.end_user && !f.user.is_some() {
        if let Some(u) = end_user {
            f.user.offer(3, u);
        }
    }
    if let Some(o) = outcome {
        let status = match &*o {
            "success" => Some(200),
            "failure" => Some(error_code.unwrap_or(500)),
            _ => None,
        };
        f.flag(F_STATUS, status.is_none());
        f.ev().status = status;
    }
    if let (Some(start), Some(end)) = (f.ts_ms, end_ms) {
        let ev = f.ev();
        if end >= start {
            ev.latency_ms = Some((end - start) as u64);
        }
    }
    if !f.user.is_some() {
        match f.key.get().cloned() {
            // A key no user, team or org owns (or one that failed to
            // authenticate, still logged with its hash): the key stands
            // for its account, so its use is still counted.
            Some(k) => f.user.offer(4, k),
            None => {
                return Err(DecodeError::new(
                    "metadata.user_api_key_user_id",
                    Problem::Invalid {
                        expected: "a key's user, team or org, or its hash or alias (or gateways.end_user = true)",
                        got: "no identity: not a proxy key's request".to_string(),
                    },
                ))
            }
        }
    }
    f.finish(
        dec,
        origin,
        "startTime",
        Some("id"),
        "metadata.user_api_key_user_id",
    )
}

fn metadata<'a>(
    sc: &mut Scanner<'a>,
    f: &mut Found<'a>,
    end_user: bool,
) -> Result<(), DecodeError> {
    sc.fields(|sc, k| {
        match &*k {
            "user_api_key_hash" => {
                if let Some(h) = sc.opt_id("metadata.user_api_key_hash")? {
                    if !placeholder(&h) {
                        f.key.offer(0, h);
                    }
                }
            }
            "user_api_key_alias" => {
                if let Some(a) = sc.opt_id("metadata.user_api_key_alias")? {
                    if !placeholder(&a) {
                        f.key.offer(1, a);
                    }
                }
            }
            "user_api_key_user_id" => {
                if let Some(u) = sc.opt_id("metadata.user_api_key_user_id")? {
                    f.user.offer(0, u);
                }
            }
            "user_api_key_team_id" => {
                if let Some(u) = sc.opt_id("metadata.user_api_key_team_id")? {
                    f.user.offer(1, u);
                }
            }
            "user_api_key_org_id" => {
                if let Some(u) = sc.opt_id("metadata.user_api_key_org_id")? {
                    f.user.offer(2, u);
                }
            }
            "user_api_key_end_user_id" if end_user => {
                if let Some(u) = sc.opt_id("metadata.user_api_key_end_user_id")? {
                    f.user.offer(3, u);
                }
            }
            "requester_ip_address" if f.ev().ip.is_none() => {
                f.address(sc, "metadata.requester_ip_address", parse_addr)?
            }
            "user_agent" if f.ev().user_agent.is_none() => {
                let (t, bad) = sc.text("metadata.user_agent", 512)?;
                f.flag(F_UA, bad);
                f.ev().user_agent = t;
            }
            "user_api_key_request_route" => {
                f.endpoint(sc, "metadata.user_api_key_request_route")?
            }
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })
}

fn model<'a>(
    sc: &mut Scanner<'a>,
    f: &mut Found<'a>,
    rank: u8,
    field: &'static str,
) -> Result<(), DecodeError> {
    let (t, bad) = sc.text(field, 128)?;
    f.flag(F_MODEL, bad);
    if let Some(t) = t {
        f.model.offer(rank, t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Format;
    use crate::decode::Origin;

    fn dec() -> Decoder {
        Decoder::new(b"test-key")
    }

    fn read(rec: &str) -> Result<Event<'_>, DecodeError> {
        dec()
            .decode_as(Format::Litellm, rec.as_bytes(), &Origin::NOWHERE)
            .map(|(e, _)| e)
    }

    /// A StandardLoggingPayload as the proxy's callbacks get it (fields
    /// and kinds as in LiteLLM's logging spec; values made up).
    const SLP: &str = r#"{"id":"chatcmpl-7a1e","trace_id":"t-1","litellm_call_id":"c0ffee-1","call_type":"acompletion","stream":false,"response_cost":0.00042,"status":"success","custom_llm_provider":"openai","total_tokens":60,"prompt_tokens":45,"completion_tokens":15,"startTime":1764586802.25,"endTime":1764586803.5,"completionStartTime":1764586803.1,"response_time":1.25,"model":"gpt-4o-mini-2024-07-18","model_id":"m-1","model_group":"gpt-4o-mini","api_base":"https://api.openai.com","metadata":{"user_api_key_hash":"88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b","user_api_key_alias":"ci-bot","user_api_key_user_id":"user-17","user_api_key_team_id":"team-a","user_api_key_org_id":null,"user_api_key_spend":3.2,"user_api_key_max_budget":10,"requester_ip_address":"","user_agent":"OpenAI/Python 1.54.0","user_api_key_request_route":"/chat/completions","usage_object":{"prompt_tokens":45,"completion_tokens":15}},"cache_hit":false,"request_tags":[],"end_user":"","requester_ip_address":"203.0.113.50","messages":[{"role":"user","content":"Say hi"}],"response":{"choices":[]},"error_str":null,"error_information":{"error_code":"","error_class":""},"model_parameters":{},"hidden_params":{"litellm_model_name":"gpt-4o-mini"}}"#;

    #[test]
    fn a_standard_logging_payload_maps_field_by_field() {
        let ev = read(SLP).unwrap();
        assert_eq!(ev.ts_ms, 1_764_586_802_250);
        assert_eq!(ev.request_id, "chatcmpl-7a1e");
        assert_eq!(ev.user_id, "user-17");
        assert_eq!(
            ev.key_id,
            "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b"
        );
        assert_eq!(ev.status, Some(200));
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (45, 15));
        assert_eq!(ev.cost_usd, Some(0.00042));
        assert_eq!(ev.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(ev.ip, "203.0.113.50".parse().ok());
        assert_eq!(ev.latency_ms, Some(1250));
        assert_eq!(ev.endpoint.as_deref(), Some("/chat/completions"));
        assert_eq!(ev.user_agent.as_deref(), Some("OpenAI/Python 1.54.0"));
        assert!(ev.prompt_fingerprint.is_some());
        assert_eq!(
            ev.repaired,
            0,
            "{:?}",
            super::super::repaired_fields(ev.repaired).collect::<Vec<_>>()
        );
    }

    #[test]
    fn failures_naive_times_placeholders_and_redacted_messages() {
        let rec = SLP
            .replace(r#""status":"success""#, r#""status":"failure""#)
            .replace(r#""error_code":"""#, r#""error_code":"429""#)
            .replace(r#""startTime":1764586802.25"#, r#""startTime":"2025-01-24 09:20:46.847371""#)
            .replace(r#""endTime":1764586803.5"#, r#""endTime":"2025-01-24 09:20:47.000000""#)
            .replace(r#""user_api_key_hash":"88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b""#, r#""user_api_key_hash":"unused-for-aws-bedrock""#)
            .replace(r#"[{"role":"user","content":"Say hi"}]"#, r#""redacted by litellm. 'litellm.turn_off_message_logging=True'""#);
        let ev = read(&rec).unwrap();
        assert_eq!(ev.status, Some(429));
        assert_eq!(
            ev.ts_ms,
            crate::time::parse_rfc3339("2025-01-24T09:20:46.847Z").unwrap()
        );
        assert_eq!(ev.latency_ms, Some(153));
        assert_eq!(
            ev.key_id, "ci-bot",
            "the placeholder is not a key; the alias is"
        );
        assert_eq!(
            ev.prompt_fingerprint, None,
            "LiteLLM's placeholder is no prompt"
        );
        let unknown_code = SLP.replace(r#""status":"success""#, r#""status":"failure""#);
        assert_eq!(read(&unknown_code).unwrap().status, Some(500));
    }

    #[test]
    fn a_spend_logs_row_maps_too() {
        let row = r#"{"request_id":"chatcmpl-9","call_type":"acompletion","api_key":"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8","spend":0.0021,"total_tokens":30,"prompt_tokens":20,"completion_tokens":10,"startTime":"2025-01-24 09:20:46.847371","endTime":"2025-01-24 09:20:48.000000","model":"gpt-4o","model_group":"gpt-4o","user":"u-3","team_id":"","metadata":"{\"user_api_key\": \"5e88\"}","cache_hit":"False","requester_ip_address":null,"status":"success","messages":"[]","request_tags":"[]"}"#;
        let ev = read(row).unwrap();
        assert_eq!(
            (ev.request_id.as_ref(), ev.user_id.as_ref()),
            ("chatcmpl-9", "u-3")
        );
        assert!(ev.key_id.starts_with("5e8848"));
        assert_eq!(ev.cost_usd, Some(0.0021));
        assert_eq!(ev.status, Some(200));
    }

    #[test]
    fn identity_and_counts_are_strict() {
        let cases = [
            (SLP.replace(r#""user_api_key_user_id":"user-17","user_api_key_team_id":"team-a","#, "").replace(r#""user_api_key_hash":"88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b","user_api_key_alias":"ci-bot","#, ""),
             "litellm: metadata.user_api_key_user_id: expected a key's user, team or org, or its hash or alias (or gateways.end_user = true), got no identity: not a proxy key's request"),
            (SLP.replace(r#""startTime":1764586802.25,"#, ""), "litellm: startTime: required field is missing"),
            (SLP.replace(r#""startTime":1764586802.25"#, r#""startTime":"yesterday""#),
             "litellm: startTime: expected epoch seconds or a time such as 2025-01-24 09:20:46.847371, got \"yesterday\""),
            (SLP.replace(r#""prompt_tokens":45"#, r#""prompt_tokens":-1"#),
             "litellm: prompt_tokens: expected a non-negative integer, got -1"),
            (SLP.replace(r#""id":"chatcmpl-7a1e","#, r#""id":"chatcmpl-7a1e","id":"other","#), "litellm: id: appears more than once"),
            (SLP.replace(r#""response_cost":0.00042"#, r#""response_cost":"0.1""#), "litellm: response_cost: expected a number, got \"0.1\""),
        ];
        for (rec, want) in cases {
            assert_eq!(read(&rec).unwrap_err().to_string(), want);
        }
        let ownerless = SLP.replace(
            r#""user_api_key_user_id":"user-17","user_api_key_team_id":"team-a","#,
            "",
        );
        let ev = read(&ownerless).unwrap();
        assert_eq!(
            ev.user_id, ev.key_id,
            "a key without an owner stands for its account"
        );
        assert!(ev.user_id.starts_with("88dc28"));
        // Only the placeholder itself is not a prompt; a prompt quoting it is one.
        for (messages, prompt) in [
            (
                r#"[{"role":"user","content":"redacted by litellm. 'litellm.turn_off_message_logging=True'"}]"#,
                false,
            ),
            (
                r#"[{"role":"user","content":"please say: redacted by litellm"}]"#,
                true,
            ),
            (
                r#"[{"role":"user","content":"redacted by litellm"},{"role":"user","content":"more"}]"#,
                true,
            ),
        ] {
            let rec = SLP.replace(r#"[{"role":"user","content":"Say hi"}]"#, messages);
            assert_eq!(
                read(&rec).unwrap().prompt_fingerprint.is_some(),
                prompt,
                "{messages}"
            );
        }
        let no_user = SLP
            .replace(
                r#""user_api_key_user_id":"user-17","user_api_key_team_id":"team-a","#,
                "",
            )
            .replace(r#""end_user":"""#, r#""end_user":"cust-9""#);
        let opts = crate::decode::GatewayOptions {
            end_user: true,
            ..Default::default()
        };
        let d = Decoder::with_options(b"k", opts);
        let (ev, _) = d
            .decode_as(Format::Litellm, no_user.as_bytes(), &Origin::NOWHERE)
            .unwrap();
        assert_eq!(ev.user_id, "cust-9");
    }

    #[test]
    fn bad_descriptive_fields_are_flagged_not_refused() {
        let rec = SLP
            .replace(
                r#""requester_ip_address":"203.0.113.50""#,
                r#""requester_ip_address":"not-an-ip""#,
            )
            .replace(r#""status":"success""#, r#""status":"weird""#)
            .replace(r#""model_group":"gpt-4o-mini""#, r#""model_group":42"#);
        let ev = read(&rec).unwrap();
        let fields: Vec<_> = super::super::repaired_fields(ev.repaired).collect();
        assert_eq!(fields, ["ip", "model", "status"]);
        assert_eq!(ev.status, None);
        assert_eq!(ev.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    }
}
