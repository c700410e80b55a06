//! Apache APISIX: the logger entry (`apisix/utils/log-util.lua`,
//! `get_full_log`) with the `llm_summary` that `ai-proxy` adds when
//! `logging.summaries` is on (`apisix/plugins/ai-proxy/base.lua`).
//!
//! | event | APISIX |
//! |---|---|
//! | ts | `start_time` (epoch ms) |
//! | request_id | `request_id` or `apisix_request_id` (added with `log_format_extra`); by default there is none, and the record's place in its stream stands in |
//! | user_id | `consumer.username` (present when an auth plugin ran); else the `gateways.account_header` request header; else `llm_summary.end_user_id` if `gateways.end_user` |
//! | key_id | the `gateways.key_header` header, else a keyed hash of a raw key header (as for Kong), else the account |
//! | tokens | `llm_summary.prompt_tokens`, `completion_tokens` |
//! | model | `llm_summary.model`, else `request_model` |
//! | status, ip, latency_ms | `response.status`, `client_ip`, `latency` (fractional ms, rounded) |
//! | endpoint, user_agent | `request.uri` without its query, `request.headers.user-agent` |
//! | prompt | `llm_request.messages` (with `logging.payloads`) |

use super::gateway::{plain_addr, Found, Origin};
use super::kong::headers;
use super::{DecodeError, Decoder, Problem, Scanner, F_MODEL, F_TS};
use crate::event::Event;

/// Reads one APISIX record (errors are said of the gateway by the caller).
pub(super) fn read<'a>(
    dec: &Decoder,
    record: &'a [u8],
    origin: &Origin<'_>,
) -> Result<Event<'a>, DecodeError> {
    let mut sc = Scanner::open(record)?;
    let mut f = Found::new();
    let opts = &*dec.options;
    let mut seen = 0u32;
    let mut end_user = None;
    sc.fields(|sc, k| {
        match &*k {
            "start_time" => {
                if seen & F_TS != 0 {
                    return Err(DecodeError::new("start_time", Problem::Duplicate));
                }
                seen |= F_TS;
                f.ts_ms = sc.epoch("start_time", 1.0)?;
            }
            "request_id" | "apisix_request_id" => {
                let field = if &*k == "request_id" {
                    "request_id"
                } else {
                    "apisix_request_id"
                };
                if let Some(id) = sc.opt_id(field)? {
                    f.request_id.offer(0, id);
                }
            }
            "request" if sc.at_object() => sc.fields(|sc, k| {
                match &*k {
                    "uri" => f.endpoint(sc, "request.uri")?,
                    "headers" if sc.at_object() => headers(sc, &mut f, opts)?,
                    _ => sc.skip_value(0)?,
                }
                Ok(())
            })?,
            "consumer" if sc.at_object() => sc.fields(|sc, k| match &*k {
                "username" => {
                    if let Some(u) = sc.opt_id("consumer.username")? {
                        f.user.offer(0, u);
                    }
                    Ok(())
                }
                _ => sc.skip_value(0),
            })?,
            "response" if sc.at_object() => f.response(sc)?,
            "client_ip" => f.address(sc, "client_ip", plain_addr)?,
            "latency" => f.latency(sc, "latency")?,
            "llm_summary" if sc.at_object() => {
                let mut got = 0u8;
                sc.fields(|sc, k| {
                    let (bit, field) = match &*k {
                        "prompt_tokens" => (1, "llm_summary.prompt_tokens"),
                        "completion_tokens" => (2, "llm_summary.completion_tokens"),
                        "model" | "request_model" => {
                            let (rank, field) = if &*k == "model" {
                                (0, "llm_summary.model")
                            } else {
                                (1, "llm_summary.request_model")
                            };
                            let (t, bad) = sc.text(field, 128)?;
                            f.flag(F_MODEL, bad);
                            if let Some(t) = t {
                                f.model.offer(rank, t);
                            }
                            return Ok(());
                        }
                        "end_user_id" => {
                            end_user = sc.opt_id("llm_summary.end_user_id")?;
                            return Ok(());
                        }
                        _ => return sc.skip_value(0),
                    };
                    if got & bit != 0 {
                        return Err(DecodeError::new(field, Problem::Duplicate));
                    }
                    got |= bit;
                    let v = sc.uint(field, true)?;
                    if bit == 1 {
                        f.usage.prompt = v;
                    } else {
                        f.usage.completion = v;
                    }
                    Ok(())
                })?;
            }
            "llm_request" if sc.at_object() => sc.fields(|sc, k| match &*k {
                "messages" => {
                    f.prompt = Some(sc.span()?.into());
                    Ok(())
                }
                _ => sc.skip_value(0),
            })?,
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })?;
    sc.end()?;
    if opts.end_user && !f.user.is_some() {
        if let Some(u) = end_user {
            f.user.offer(10, u);
        }
    }
    if !f.user.is_some() {
        return Err(DecodeError::new(
            "consumer.username",
            Problem::Invalid {
                expected: match opts.account_header {
                    Some(_) => "a consumer (an auth plugin on the route) or the gateways.account_header request header",
                    None => "a consumer (an auth plugin on the route), or gateways.account_header naming a header that identifies the account",
                },
                got: "none: the record identifies no account".to_string(),
            },
        ));
    }
    f.finish(dec, origin, "start_time", None, "consumer.username")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Format;
    use crate::decode::{GatewayOptions, Origin};

    /// An APISIX kafka-logger entry with `llm_summary` (fields as
    /// `get_full_log` and ai-proxy's `set_logging` write them; values made up).
    const ENTRY: &str = r#"{"latency":1811.0000324249,"request":{"querystring":{},"headers":{"host":"gw:9080","user-agent":"curl/8.7.1","apikey":"auth-one-secret","content-type":"application/json"},"method":"POST","size":180,"uri":"/v1/chat/completions","url":"http://gw:9080/v1/chat/completions"},"response":{"headers":{"content-type":"application/json"},"status":200,"size":700},"route_id":"ai-route","client_ip":"192.0.2.14","server":{"hostname":"apisix","version":"3.16.0"},"apisix_latency":5.0000324249268,"service_id":"","upstream_latency":1806,"start_time":1764586802123,"upstream":"api.openai.com:443","consumer":{"username":"team_blue"},"llm_summary":{"request_model":"gpt-4o","model":"gpt-4o-2024-08-06","duration":640,"prompt_tokens":120,"completion_tokens":33,"total_tokens":153,"stream":false,"end_user_id":"someone","cache_read_input_tokens":0},"llm_request":{"messages":[{"role":"user","content":"Summarise this"}],"stream":false}}"#;

    fn read_at<'a>(rec: &'a str, origin: &Origin<'_>) -> Result<Event<'a>, DecodeError> {
        Decoder::new(b"test-key")
            .decode_as(Format::Apisix, rec.as_bytes(), origin)
            .map(|(e, _)| e)
    }

    #[test]
    fn an_entry_with_llm_summary_maps_field_by_field() {
        let origin = Origin {
            stream: "apisix-logs",
            partition: 2,
            offset: 917,
            element: Some(4),
        };
        let ev = read_at(ENTRY, &origin).unwrap();
        assert_eq!(ev.ts_ms, 1_764_586_802_123);
        assert_eq!(
            ev.request_id, "at:apisix-logs/2/917/4",
            "no request id: the record's place"
        );
        assert_eq!(ev.user_id, "team_blue");
        assert!(ev.key_id.starts_with("kh_"), "the key-auth header, hashed");
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (120, 33));
        assert_eq!(ev.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!((ev.status, ev.latency_ms), (Some(200), Some(1811)));
        assert_eq!(ev.ip, "192.0.2.14".parse().ok());
        assert!(ev.prompt_fingerprint.is_some());
        assert!(!format!("{ev:?}").contains("auth-one-secret"));
        let with_id = ENTRY.replace(r#""route_id""#, r#""request_id":"4a1f9c","route_id""#);
        assert_eq!(read_at(&with_id, &origin).unwrap().request_id, "4a1f9c");
    }

    #[test]
    fn a_plain_entry_counts_a_request_and_no_consumer_is_an_error() {
        let plain = r#"{"latency":411.00001335144,"request":{"querystring":{},"headers":{"host":"127.0.0.1:9080","user-agent":"curl/8.7.1"},"method":"GET","size":83,"uri":"/get","url":"http://127.0.0.1:9080/get"},"response":{"status":200,"size":475},"route_id":"r","client_ip":"127.0.0.1","start_time":1699596164550,"upstream":"54.90.18.68:80"}"#;
        let e = read_at(plain, &Origin::NOWHERE).unwrap_err().to_string();
        assert!(
            e.starts_with("apisix: consumer.username: expected a consumer"),
            "{e}"
        );
        let with_consumer = plain.replace(
            r#""route_id""#,
            r#""consumer":{"username":"u1"},"route_id""#,
        );
        let ev = read_at(&with_consumer, &Origin::NOWHERE).unwrap();
        assert_eq!(
            (ev.user_id.as_ref(), ev.key_id.as_ref()),
            ("u1", "u1"),
            "no key: the account's"
        );
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (0, 0));
        let opts = GatewayOptions {
            end_user: true,
            ..Default::default()
        };
        let no_consumer = ENTRY.replace(r#""consumer":{"username":"team_blue"},"#, "");
        let (ev, _) = Decoder::with_options(b"k", opts)
            .decode_as(Format::Apisix, no_consumer.as_bytes(), &Origin::NOWHERE)
            .unwrap();
        assert_eq!(ev.user_id, "someone");
    }
}
