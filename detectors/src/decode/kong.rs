//! Kong Gateway: the record every logging plugin writes
//! (`kong.log.serialize()`, Kong/kong `kong/pdk/log.lua`) with the AI
//! plugins' `ai` section, in each of its shapes:
//!
//! | Kong | `ai` |
//! |---|---|
//! | 3.6 | flat `ai.usage.{prompt_tokens,completion_tokens}`, `ai.meta` |
//! | 3.7 | `ai["ai-proxy"].usage.{prompt_token,completion_token}` (singular) |
//! | 3.8 | `ai["ai-proxy"].usage.{prompt_tokens,completion_tokens,cost}` |
//! | 3.9+ | `ai.proxy.{meta,usage,payload}`; other AI plugins under their own names |
//!
//! Tokens of every AI plugin in the record are summed (a request
//! transformer's own model call is spent on the same request).
//!
//! | event | Kong |
//! |---|---|
//! | ts | `started_at` (epoch ms) |
//! | request_id | `request.id`, else `correlation_id` |
//! | user_id | `consumer.custom_id`, else `.username`, else `.id` (present when an auth plugin ran); else the `gateways.account_header` request header |
//! | key_id | `authenticated_entity.id` (the credential); else the `gateways.key_header` header; else a keyed hash of a raw key header (`apikey`, `x-api-key`, `api-key`, `x-goog-api-key`, `authorization`); else the account |
//! | status, ip, latency_ms | `response.status`, `client_ip`, `latencies.request` |
//! | model | `ai.*.meta.response_model`, else `request_model` (not `UNSPECIFIED`) |
//! | cost_usd | `ai.*.usage.cost` when non-zero and `gateways.kong_cost = "usd"` |
//! | endpoint, user_agent | `request.uri` without its query, `request.headers.user-agent` |
//! | prompt | `ai.*.payload.request` (the request body, with `log_payloads`) |

use std::borrow::Cow;

use super::gateway::{bearer, plain_addr, Found, KongCost, Origin, Usage, UsageNames};
use super::{DecodeError, Decoder, Problem, Raw, Scanner, F_MODEL, F_REQ, F_TS, F_UA};
use crate::event::Event;

const FLAT: UsageNames = UsageNames {
    prompt: "ai.usage.prompt_tokens",
    completion: "ai.usage.completion_tokens",
    input: "ai.usage.input_tokens",
    output: "ai.usage.output_tokens",
    cache_read: "ai.usage.cache_read_input_tokens",
    cache_creation: "ai.usage.cache_creation_input_tokens",
    cost: "ai.usage.cost",
};

const PLUGIN: UsageNames = UsageNames {
    prompt: "ai.*.usage.prompt_tokens",
    completion: "ai.*.usage.completion_tokens",
    input: "ai.*.usage.input_tokens",
    output: "ai.*.usage.output_tokens",
    cache_read: "ai.*.usage.cache_read_input_tokens",
    cache_creation: "ai.*.usage.cache_creation_input_tokens",
    cost: "ai.*.usage.cost",
};

/// Reads one Kong record (errors are said of the gateway by the caller).
pub(super) fn read<'a>(
    dec: &Decoder,
    record: &'a [u8],
    origin: &Origin<'_>,
) -> Result<Event<'a>, DecodeError> {
    let mut sc = Scanner::open(record)?;
    let mut f = Found::new();
    let mut seen = 0u32;
    let opts = &*dec.options;
    let mut usage: Option<Usage> = None;
    sc.fields(|sc, k| {
        match &*k {
            "started_at" => {
                if seen & F_TS != 0 {
                    return Err(DecodeError::new("started_at", Problem::Duplicate));
                }
                seen |= F_TS;
                f.ts_ms = sc.epoch("started_at", 1.0)?;
            }
            "request" if sc.at_object() => request(sc, &mut f, opts, &mut seen)?,
            "correlation_id" => {
                if let Some(id) = sc.opt_id("correlation_id")? {
                    f.request_id.offer(1, id);
                }
            }
            "consumer" if sc.at_object() => sc.fields(|sc, k| {
                let (rank, field) = match &*k {
                    "custom_id" => (0, "consumer.custom_id"),
                    "username" => (1, "consumer.username"),
                    "id" => (2, "consumer.id"),
                    _ => return sc.skip_value(0),
                };
                if let Some(u) = sc.opt_id(field)? {
                    f.user.offer(rank, u);
                }
                Ok(())
            })?,
            "authenticated_entity" if sc.at_object() => sc.fields(|sc, k| match &*k {
                "id" => {
                    if let Some(id) = sc.opt_id("authenticated_entity.id")? {
                        f.key.offer(0, id);
                    }
                    Ok(())
                }
                _ => sc.skip_value(0),
            })?,
            "response" if sc.at_object() => f.response(sc)?,
            "client_ip" => f.address(sc, "client_ip", plain_addr)?,
            "latencies" if sc.at_object() => sc.fields(|sc, k| match &*k {
                "request" => f.latency(sc, "latencies.request"),
                _ => sc.skip_value(0),
            })?,
            "ai" if sc.at_object() => ai(sc, &mut f, &mut usage)?,
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })?;
    sc.end()?;
    if let Some(u) = usage {
        if u.cost > 0.0 && opts.kong_cost == KongCost::Usd {
            f.ev().cost_usd = Some(u.cost);
        }
        f.usage = u;
    }
    if !f.user.is_some() {
        return Err(no_account(opts.account_header.as_deref()));
    }
    f.finish(dec, origin, "started_at", Some("request.id"), "consumer")
}

/// The error of a record no consumer and no configured header name.
fn no_account(header: Option<&str>) -> DecodeError {
    DecodeError::new(
        "consumer",
        Problem::Invalid {
            expected: match header {
                Some(_) => "a consumer (an auth plugin on the route) or the gateways.account_header request header",
                None => "a consumer (an auth plugin on the route), or gateways.account_header naming a header that identifies the account",
            },
            got: "none: the record identifies no account".to_string(),
        },
    )
}

fn request<'a>(
    sc: &mut Scanner<'a>,
    f: &mut Found<'a>,
    opts: &super::GatewayOptions,
    seen: &mut u32,
) -> Result<(), DecodeError> {
    sc.fields(|sc, k| {
        match &*k {
            "id" => {
                if *seen & F_REQ != 0 {
                    return Err(DecodeError::new("request.id", Problem::Duplicate));
                }
                *seen |= F_REQ;
                if let Some(id) = sc.opt_id("request.id")? {
                    f.request_id.offer(0, id);
                }
            }
            "uri" => f.endpoint(sc, "request.uri")?,
            "headers" if sc.at_object() => headers(sc, f, opts)?,
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })
}

/// Headers that carry a raw API key, in the order one is taken as the
/// key: key-auth's `apikey`, Anthropic's `x-api-key`, Azure's `api-key`,
/// Google's `x-goog-api-key`, and the bearer token of `authorization`.
const KEY_HEADERS: [&str; 5] = [
    "apikey",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "authorization",
];

/// Reads a request's logged headers (Kong and APISIX): the user agent,
/// the configured identity headers, and any raw key, which is only ever
/// hashed.
pub(super) fn headers<'a>(
    sc: &mut Scanner<'a>,
    f: &mut Found<'a>,
    opts: &super::GatewayOptions,
) -> Result<(), DecodeError> {
    sc.fields(|sc, k| {
        let name = &*k;
        if opts
            .account_header
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(name))
        {
            if let Raw::Str(v) = sc.raw("request.headers")? {
                if !v.is_empty() {
                    f.user.offer(
                        9,
                        checked_id(v, sc.mangled.take(), "gateways.account_header")?,
                    );
                }
            }
            return Ok(());
        }
        if opts
            .key_header
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(name))
        {
            if let Raw::Str(v) = sc.raw("request.headers")? {
                if !v.is_empty() {
                    f.key
                        .offer(9, checked_id(v, sc.mangled.take(), "gateways.key_header")?);
                }
            }
            return Ok(());
        }
        let rank = if let Some(r) = KEY_HEADERS
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
        {
            r as u8
        } else if name.eq_ignore_ascii_case("user-agent") {
            let (t, bad) = sc.text("request.headers.user-agent", 512)?;
            f.flag(F_UA, bad);
            f.ev().user_agent = t;
            return Ok(());
        } else {
            return sc.skip_value(0);
        };
        // A raw secret: never kept, never quoted; its keyed hash may name the key.
        if let Raw::Str(v) = sc.raw("request.headers")? {
            let secret = match v {
                Cow::Borrowed(b) => bearer(b).map(Cow::Borrowed),
                Cow::Owned(o) => bearer(&o).map(|t| Cow::Owned(t.to_string())),
            };
            if let Some(s) = secret {
                f.raw_key.offer(rank, s);
            }
        }
        Ok(())
    })
}

/// An identity read from a header: 1-128 characters, exactly as sent (a
/// NUL or lone surrogate, `mangled`, refuses the record as in every identity).
fn checked_id<'a>(
    v: Cow<'a, str>,
    mangled: Option<&'static str>,
    field: &'static str,
) -> Result<Cow<'a, str>, DecodeError> {
    if let Some(why) = mangled {
        return Err(super::mangled(field, why));
    }
    let len = super::char_len(&v);
    if len > 128 {
        return Err(DecodeError::new(field, Problem::TooLong { max: 128, len }));
    }
    Ok(v)
}

/// The `ai` section in any of its shapes.
fn ai<'a>(
    sc: &mut Scanner<'a>,
    f: &mut Found<'a>,
    usage: &mut Option<Usage>,
) -> Result<(), DecodeError> {
    sc.fields(|sc, k| {
        match &*k {
            // 3.6: one flat set for the one AI plugin.
            "usage" if sc.at_object() => add(usage, sc.usage(&FLAT)?),
            "meta" if sc.at_object() => meta(sc, f, 1)?,
            "payload" if sc.at_object() => payload(sc, f)?,
            // 3.7+: one entry per AI plugin; the proxy's model stands first.
            name if sc.at_object() => {
                let rank = if matches!(name, "proxy" | "ai-proxy" | "ai-proxy-advanced") {
                    0
                } else {
                    2
                };
                sc.fields(|sc, k| {
                    match &*k {
                        "usage" if sc.at_object() => add(usage, sc.usage(&PLUGIN)?),
                        "meta" if sc.at_object() => meta(sc, f, rank)?,
                        "payload" if sc.at_object() => payload(sc, f)?,
                        _ => sc.skip_value(0)?,
                    }
                    Ok(())
                })?;
            }
            _ => sc.skip_value(0)?,
        }
        Ok(())
    })
}

fn add(total: &mut Option<Usage>, u: Usage) {
    match total {
        None => *total = Some(u),
        Some(t) => t.add(u),
    }
}

fn meta<'a>(sc: &mut Scanner<'a>, f: &mut Found<'a>, rank: u8) -> Result<(), DecodeError> {
    sc.fields(|sc, k| {
        let (r, field) = match &*k {
            "response_model" => (rank * 2, "ai.*.meta.response_model"),
            "request_model" => (rank * 2 + 1, "ai.*.meta.request_model"),
            _ => return sc.skip_value(0),
        };
        let (t, bad) = sc.text(field, 128)?;
        f.flag(F_MODEL, bad);
        if let Some(t) = t.filter(|t| t != "UNSPECIFIED") {
            f.model.offer(r, t);
        }
        Ok(())
    })
}

fn payload<'a>(sc: &mut Scanner<'a>, f: &mut Found<'a>) -> Result<(), DecodeError> {
    sc.fields(|sc, k| match &*k {
        "request" if f.prompt.is_none() => {
            // The body is JSON inside a JSON string: fingerprinted as
            // logged, escapes and all (the same body is the same text),
            // so it is never unescaped into a copy.
            if sc.peek() == Some(b'"') {
                let logged = sc.span()?;
                let body = &logged[1..logged.len() - 1];
                if !body.is_empty() {
                    f.prompt = Some(Cow::Borrowed(body));
                }
            } else {
                sc.skip_value(0)?;
            }
            Ok(())
        }
        _ => sc.skip_value(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Format;
    use crate::decode::{GatewayOptions, Origin};

    fn read_with(opts: GatewayOptions, rec: &str) -> Result<Event<'_>, DecodeError> {
        Decoder::with_options(b"test-key", opts)
            .decode_as(Format::Kong, rec.as_bytes(), &Origin::NOWHERE)
            .map(|(e, _)| e)
    }

    fn read(rec: &str) -> Result<Event<'_>, DecodeError> {
        read_with(GatewayOptions::default(), rec)
    }

    /// A Kong base record (fields as `kong.log.serialize()` writes them;
    /// values made up) with `AI` in place of its `ai` section.
    fn record(ai: &str) -> String {
        format!(
            r#"{{"request":{{"id":"2f6946328ffc4946b8c9120704a4a155","uri":"/openai/v1/chat/completions?apikey=sk-in-the-query","url":"http://gw/openai/v1/chat/completions","method":"POST","size":300,"querystring":{{"apikey":"sk-in-the-query"}},"headers":{{"host":"gw","user-agent":"python-httpx/0.27","apikey":"sk-live-secret-123","authorization":"REDACTED","content-type":"application/json"}},"tls":{{}}}},"upstream_uri":"/v1/chat/completions","upstream_status":"200","response":{{"status":200,"size":900,"headers":{{}}}},"latencies":{{"kong":2,"proxy":840,"request":843,"receive":1}},"tries":[{{"ip":"10.0.0.5","port":443,"balancer_latency":0}}],"route":{{"id":"r1","name":"openai"}},"service":{{"id":"s1"}},"client_ip":"198.51.100.23","started_at":1726783839538,"source":"upstream","workspace":"w1","workspace_name":"default","consumer":{{"id":"5b8e3f5e-0000-4000-8000-000000000001","username":"acme","created_at":1726782477}},"authenticated_entity":{{"id":"0c1a2b3c-0000-4000-8000-0000000000aa","consumer_id":{{"id":"5b8e3f5e-0000-4000-8000-000000000001"}}}}{ai}}}"#
        )
    }

    #[test]
    fn every_ai_shape_gives_the_same_counts() {
        let shapes = [
            // 3.6
            r#","ai":{"usage":{"prompt_tokens":25,"completion_tokens":12,"total_tokens":37,"processing_time":1.2},"meta":{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06","provider_name":"openai"},"payload":{"request":"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"}}"#,
            // 3.7
            r#","ai":{"ai-proxy":{"usage":{"prompt_token":25,"completion_token":12,"total_tokens":37},"meta":{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06","provider_name":"openai","plugin_id":"p1"},"payload":{"request":"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"}}}"#,
            // 3.8
            r#","ai":{"ai-proxy":{"usage":{"prompt_tokens":25,"completion_tokens":12,"total_tokens":37,"time_per_token":20.5,"cost":0},"meta":{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06","provider_name":"openai","llm_latency":800},"cache":{},"payload":{"request":"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"}}}"#,
            // 3.9+
            r#","ai":{"proxy":{"usage":{"prompt_tokens":25,"completion_tokens":12,"total_tokens":37,"cost":0,"prompt_tokens_details":{"cached_tokens":0},"time_to_first_token":300},"meta":{"request_model":"UNSPECIFIED","response_model":"gpt-4o-2024-08-06","provider_name":"openai","plugin_id":"p1","llm_latency":800},"payload":{"request":"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}","response":"{}"}}}"#,
        ];
        let mut prints = Vec::new();
        for ai in shapes {
            let rec = record(ai);
            let ev = read(&rec).unwrap_or_else(|e| panic!("{e}\n{rec}"));
            assert_eq!(ev.ts_ms, 1_726_783_839_538);
            assert_eq!(ev.request_id, "2f6946328ffc4946b8c9120704a4a155");
            assert_eq!(ev.user_id, "acme");
            assert_eq!(ev.key_id, "0c1a2b3c-0000-4000-8000-0000000000aa");
            assert_eq!((ev.prompt_tokens, ev.completion_tokens), (25, 12), "{ai}");
            assert_eq!(ev.model.as_deref(), Some("gpt-4o-2024-08-06"));
            assert_eq!(ev.status, Some(200));
            assert_eq!(ev.latency_ms, Some(843));
            assert_eq!(ev.ip, "198.51.100.23".parse().ok());
            assert_eq!(ev.endpoint.as_deref(), Some("/openai/v1/chat/completions"));
            assert_eq!(ev.user_agent.as_deref(), Some("python-httpx/0.27"));
            assert_eq!(ev.cost_usd, None, "cost 0 is no price: the table prices it");
            assert_eq!(ev.repaired, 0);
            prints.push(
                ev.prompt_fingerprint
                    .clone()
                    .expect("the logged body is the prompt")
                    .into_owned(),
            );
        }
        prints.dedup();
        assert_eq!(
            prints.len(),
            1,
            "the same body is the same prompt in every shape"
        );
    }

    #[test]
    fn plugins_add_up_and_a_priced_cost_is_taken() {
        let rec = record(
            r#","ai":{"proxy":{"usage":{"prompt_tokens":10,"completion_tokens":5,"cost":0.002},"meta":{"response_model":"m"}},"ai-request-transformer":{"usage":{"prompt_tokens":3,"completion_tokens":2,"cost":0.001},"meta":{"response_model":"small"}}}"#,
        );
        let ev = read(&rec).unwrap();
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (13, 7));
        assert_eq!(ev.model.as_deref(), Some("m"));
        assert!((ev.cost_usd.unwrap() - 0.003).abs() < 1e-12);
        let ignored = read_with(
            GatewayOptions {
                kong_cost: KongCost::Ignore,
                ..Default::default()
            },
            &rec,
        )
        .unwrap();
        assert_eq!(ignored.cost_usd, None);
    }

    #[test]
    fn a_raw_apikey_header_is_hashed_and_never_kept() {
        let rec = record("").replace(r#","authenticated_entity":{"id":"0c1a2b3c-0000-4000-8000-0000000000aa","consumer_id":{"id":"5b8e3f5e-0000-4000-8000-000000000001"}}"#, "");
        let ev = read(&rec).unwrap();
        assert!(ev.key_id.starts_with("kh_"), "{}", ev.key_id);
        let dbg = format!("{ev:?}");
        assert!(
            !dbg.contains("sk-live-secret-123") && !dbg.contains("sk-in-the-query"),
            "{dbg}"
        );
        assert_eq!(
            (ev.prompt_tokens, ev.completion_tokens),
            (0, 0),
            "a route with no AI plugin"
        );
    }

    #[test]
    fn no_consumer_is_a_clear_error_unless_a_header_names_the_account() {
        let rec = record("").replace(r#""consumer":{"id":"5b8e3f5e-0000-4000-8000-000000000001","username":"acme","created_at":1726782477},"#, "");
        let e = read(&rec).unwrap_err().to_string();
        assert!(e.starts_with("kong: consumer: expected a consumer (an auth plugin on the route), or gateways.account_header"), "{e}");
        let rec = rec.replace(
            r#""host":"gw","#,
            r#""host":"gw","x-tenant-id":"tenant-7","#,
        );
        let opts = GatewayOptions {
            account_header: Some("X-Tenant-Id".into()),
            ..Default::default()
        };
        assert_eq!(read_with(opts, &rec).unwrap().user_id, "tenant-7");
    }

    #[test]
    fn a_byte_that_is_not_utf8_in_a_header_is_flagged_not_refused() {
        // `@` marks where a byte 0xFF goes: a client's raw header byte.
        let with_ff = |rec: String| -> Vec<u8> {
            rec.into_bytes()
                .into_iter()
                .map(|b| if b == b'@' { 0xFF } else { b })
                .collect()
        };
        let dec = Decoder::new(b"test-key");
        let bytes = with_ff(record("").replace("python-httpx/0.27", "evil@agent"));
        for format in [Format::Kong, Format::Auto] {
            let (ev, read_as) = dec.decode_as(format, &bytes, &Origin::NOWHERE).unwrap();
            assert_eq!(read_as, Format::Kong);
            assert_eq!(ev.user_id, "acme", "the request is counted to its account");
            assert_eq!(ev.user_agent.as_deref(), Some("evil\u{FFFD}agent"));
            let fields: Vec<_> = super::super::repaired_fields(ev.repaired).collect();
            assert_eq!(fields, ["user_agent"]);
        }
        // In an identity it is refused, as any changed identity is.
        let bytes = with_ff(record("").replace(r#""username":"acme""#, r#""username":"ac@me""#));
        let e = dec
            .decode_as(Format::Kong, &bytes, &Origin::NOWHERE)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("kong: record: not valid UTF-8 at byte"),
            "{e}"
        );
    }

    #[test]
    fn strict_where_it_counts() {
        let cases = [
            (
                record("").replace(r#""started_at":1726783839538,"#, ""),
                "kong: started_at: required field is missing",
            ),
            (
                record("").replace(r#""started_at":1726783839538"#, r#""started_at":"soon""#),
                "kong: started_at: expected a number, got \"soon\"",
            ),
            (
                record("").replace(r#""id":"2f6946328ffc4946b8c9120704a4a155","#, ""),
                "kong: request.id: required field is missing",
            ),
            (
                record(r#","ai":{"proxy":{"usage":{"prompt_tokens":-4}}}"#),
                "kong: ai.*.usage.prompt_tokens: expected a non-negative integer, got -4",
            ),
            (
                record(r#","ai":{"usage":{"completion_tokens":1.5}}"#),
                "kong: ai.usage.completion_tokens: expected a non-negative integer, got 1.5",
            ),
        ];
        for (rec, want) in cases {
            assert_eq!(read(&rec).unwrap_err().to_string(), want);
        }
        let bad = record("")
            .replace(r#""status":200"#, r#""status":"two hundred""#)
            .replace(r#""client_ip":"198.51.100.23""#, r#""client_ip":"::zz""#);
        let ev = read(&bad).unwrap();
        assert_eq!(
            super::super::repaired_fields(ev.repaired).collect::<Vec<_>>(),
            ["ip", "status"]
        );
    }
}
