//! Envoy AI Gateway: an access-log entry in the JSON format its docs give
//! (`site/docs/capabilities/observability/accesslogs.md`), the `gen_ai.*`
//! attributes its ext-proc fills. The operator chooses the names; these
//! are the documented ones.
//!
//! | event | Envoy AI Gateway |
//! |---|---|
//! | ts | `start_time` (RFC 3339) |
//! | request_id | `x-request-id`, else the record's place in its stream |
//! | user_id, key_id | not logged by default: the `gateways.account_header` / `key_header` fields the operator adds (`%REQ(x-tenant-id)%`); no key: the account |
//! | tokens | `gen_ai.usage.input_tokens` (cache reads and writes included by the gateway), `output_tokens` (`null` for MCP calls); the older `genai_tokens_input` / `_output` names too |
//! | model | `gen_ai.response.model`, else `gen_ai.request.model_override`, else `gen_ai.request.model` (or the older `genai_model_name`) |
//! | status, latency_ms | `response_code`, `duration` |
//! | ip | `downstream_remote_address` (`ip:port`), else the first `x-forwarded-for` entry |
//! | endpoint, user_agent | `x-envoy-origin-path` without its query, `user-agent` |

use std::borrow::Cow;

use super::gateway::{parse_addr, Found, Origin};
use super::{
    invalid, quote, DecodeError, Decoder, Problem, Raw, Scanner, F_CT, F_MODEL, F_PT, F_STATUS,
    F_TS, F_UA,
};
use crate::event::Event;
use crate::time::parse_rfc3339;

/// Reads one Envoy AI Gateway record (errors are said of the gateway by the caller).
pub(super) fn read<'a>(
    dec: &Decoder,
    record: &'a [u8],
    origin: &Origin<'_>,
) -> Result<Event<'a>, DecodeError> {
    let mut sc = Scanner::open(record)?;
    let mut f = Found::new();
    let opts = &*dec.options;
    let mut seen = 0u32;
    let mut forwarded: Option<Cow<'a, str>> = None;
    let mut once = |bit: u32, field: &'static str| {
        if seen & bit != 0 {
            return Err(DecodeError::new(field, Problem::Duplicate));
        }
        seen |= bit;
        Ok(())
    };
    sc.fields(|sc, k| {
        let name = &*k;
        if opts
            .account_header
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(name))
        {
            if let Some(u) = sc.opt_id(field_name(name, "account"))? {
                f.user.offer(0, u);
            }
            return Ok(());
        }
        if opts
            .key_header
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(name))
        {
            if let Some(u) = sc.opt_id(field_name(name, "key"))? {
                f.key.offer(0, u);
            }
            return Ok(());
        }
        match name {
            "start_time" => {
                once(F_TS, "start_time")?;
                let t = sc.req_str("start_time", false)?;
                f.ts_ms =
                    Some(parse_rfc3339(&t).ok_or_else(|| {
                        invalid("start_time", "an RFC 3339 timestamp", quote(&t))
                    })?);
            }
            "x-request-id" => {
                if let Some(id) = sc.opt_id("x-request-id")? {
                    f.request_id.offer(0, id);
                }
            }
            // Envoy AI Gateway's input count already holds cache reads and
            // writes (its Anthropic translator adds them), so it is the prompt.
            "gen_ai.usage.input_tokens" | "genai_tokens_input" => {
                once(F_PT, "gen_ai.usage.input_tokens")?;
                f.usage.prompt = sc.uint("gen_ai.usage.input_tokens", true)?;
            }
            "gen_ai.usage.output_tokens" | "genai_tokens_output" => {
                once(F_CT, "gen_ai.usage.output_tokens")?;
                f.usage.completion = sc.uint("gen_ai.usage.output_tokens", true)?;
            }
            "gen_ai.response.model"
            | "gen_ai.request.model_override"
            | "gen_ai.request.model"
            | "genai_model_name" => {
                let rank = match name {
                    "gen_ai.response.model" => 0,
                    "gen_ai.request.model_override" => 1,
                    _ => 2,
                };
                let (t, bad) = sc.text("gen_ai.request.model", 128)?;
                f.flag(F_MODEL, bad);
                if let Some(t) = t {
                    f.model.offer(rank, t);
                }
            }
            "response_code" => {
                let (s, bad) = sc.status("response_code")?;
                f.flag(F_STATUS, bad);
                f.ev().status = s;
            }
            "duration" => f.latency(sc, "duration")?,
            "downstream_remote_address" => {
                f.address(sc, "downstream_remote_address", parse_addr)?
            }
            "x-forwarded-for" => {
                if let Raw::Str(t) = sc.raw("x-forwarded-for")? {
                    forwarded = Some(t);
                }
            }
            "user-agent" => {
                let (t, bad) = sc.text("user-agent", 512)?;
                f.flag(F_UA, bad);
                f.ev().user_agent = t;
            }
            "x-envoy-origin-path" => f.endpoint(sc, "x-envoy-origin-path")?,
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })?;
    sc.end()?;
    if f.ev().ip.is_none() {
        if let Some(ip) = forwarded.as_deref().and_then(parse_addr) {
            f.ev().ip = Some(ip);
        }
    }
    if !f.user.is_some() {
        return Err(DecodeError::new(
            "account",
            Problem::Invalid {
                expected: match opts.account_header {
                    Some(_) => "the access-log field gateways.account_header names",
                    None => "an account: add a header field to the access-log format (\"x-tenant-id\": \"%REQ(x-tenant-id)%\") and name it in gateways.account_header",
                },
                got: "none: Envoy AI Gateway logs no user by default".to_string(),
            },
        ));
    }
    f.finish(dec, origin, "start_time", None, "account")
}

fn field_name(_name: &str, what: &'static str) -> &'static str {
    match what {
        "account" => "gateways.account_header",
        _ => "gateways.key_header",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Format;
    use crate::decode::{GatewayOptions, Origin};

    /// An access-log entry in the documented format (values made up), with
    /// an `x-tenant-id` field the operator added.
    const ENTRY: &str = r#"{":authority":"llm.example.com","bytes_received":105,"bytes_sent":432,"connection_termination_details":null,"downstream_local_address":"10.0.0.2:1975","downstream_remote_address":"198.51.100.77:64484","duration":1526,"gen_ai.provider.name":"openai","gen_ai.request.model":"gpt-4o-mini","gen_ai.request.model_override":null,"gen_ai.response.model":"gpt-4o-mini-2024-07-18","gen_ai.usage.input_tokens":15,"gen_ai.usage.output_tokens":7,"gen_ai.usage.total_tokens":22,"method":"POST","protocol":"HTTP/1.1","response_code":200,"response_code_details":"via_upstream","response_flags":"-","route_name":"httproute/default/llm/rule/0/match/0/*","start_time":"2025-08-30T16:51:37.894Z","upstream_cluster":"httproute/default/llm/rule/0","upstream_host":"34.128.142.77:443","user-agent":"curl/8.7.1","x-envoy-origin-path":"/v1/chat/completions","x-envoy-upstream-service-time":"451","x-forwarded-for":"192.168.1.38","x-request-id":"83b63da3-45a9-4196-98b8-1a7f697d6d8d","x-tenant-id":"tenant-42"}"#;

    fn tenant() -> Decoder {
        Decoder::with_options(
            b"test-key",
            GatewayOptions {
                account_header: Some("x-tenant-id".into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn an_access_log_entry_maps_field_by_field() {
        let (ev, _) = tenant()
            .decode_as(Format::EnvoyAiGateway, ENTRY.as_bytes(), &Origin::NOWHERE)
            .unwrap();
        assert_eq!(ev.ts_ms, parse_rfc3339("2025-08-30T16:51:37.894Z").unwrap());
        assert_eq!(ev.request_id, "83b63da3-45a9-4196-98b8-1a7f697d6d8d");
        assert_eq!(
            (ev.user_id.as_ref(), ev.key_id.as_ref()),
            ("tenant-42", "tenant-42")
        );
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (15, 7));
        assert_eq!(ev.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!((ev.status, ev.latency_ms), (Some(200), Some(1526)));
        assert_eq!(
            ev.ip,
            "198.51.100.77".parse().ok(),
            "the connection's address, not the client-set header"
        );
        assert_eq!(ev.endpoint.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(ev.repaired, 0);
    }

    #[test]
    fn mcp_calls_count_with_no_tokens_and_no_account_is_a_clear_error() {
        let mcp = r#"{"bytes_received":165,"downstream_remote_address":"127.0.0.1:58124","duration":653,"gen_ai.provider.name":null,"gen_ai.request.model":null,"gen_ai.usage.input_tokens":null,"gen_ai.usage.output_tokens":null,"mcp.method.name":"tools/call","method":"POST","response_code":200,"start_time":"2025-10-08T10:42:11.430Z","x-envoy-origin-path":"/mcp","x-request-id":"cf2c0454","x-tenant-id":"t1"}"#;
        let (ev, _) = tenant()
            .decode_as(Format::EnvoyAiGateway, mcp.as_bytes(), &Origin::NOWHERE)
            .unwrap();
        assert_eq!(
            (ev.prompt_tokens, ev.completion_tokens, ev.model),
            (0, 0, None)
        );
        let e = Decoder::new(b"k")
            .decode_as(Format::EnvoyAiGateway, mcp.as_bytes(), &Origin::NOWHERE)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("envoy-ai-gateway: account: expected an account: add a header field"),
            "{e}"
        );
        // The older access-log names (genai_*) read the same.
        let older = ENTRY
            .replace("gen_ai.usage.input_tokens", "genai_tokens_input")
            .replace("gen_ai.usage.output_tokens", "genai_tokens_output")
            .replace(r#""gen_ai.response.model":"gpt-4o-mini-2024-07-18","#, "")
            .replace("gen_ai.request.model\"", "genai_model_name\"");
        let (ev, _) = tenant()
            .decode_as(Format::EnvoyAiGateway, older.as_bytes(), &Origin::NOWHERE)
            .unwrap();
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (15, 7), "{older}");
        assert_eq!(ev.model.as_deref(), Some("gpt-4o-mini"));
    }
}
