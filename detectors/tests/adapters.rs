//! No input panics a gateway adapter: property tests over arbitrary bytes,
//! JSON-shaped noise, and valid records of every gateway (the shapes the
//! adapters' module docs describe) cut at any byte, with JSON fragments
//! spliced in, values replaced by other types and keys given twice. Every
//! input goes through the checks in `adapters/check.rs` (the fuzz target
//! and the corpus replay run the same ones): never a panic, the same answer
//! twice, an accepted event within the contract's limits and without raw
//! keys or prompt text, an error naming its gateway and field, and
//! `split_records` cutting a message into sub-slices that are, for a JSON
//! array, its elements.

#[path = "adapters/check.rs"]
mod check;

use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::Decoder;
use proptest::prelude::*;
use serde_json::Value;

/// Kong 3.9+: `ai.proxy`, key-auth (the `apikey` header raw, Kong's own
/// serializer having redacted `authorization`), a key in the query string.
const KONG_39: &str = r#"{"request":{"id":"8c1f2a7e4b9d4c10a3e5f60718293a4b","uri":"/ai/v1/chat/completions?apikey=sk-kong-query-N4rT8vW2yQ","url":"https://gw.example.com:8443/ai/v1/chat/completions","method":"POST","size":412,"querystring":{"apikey":"sk-kong-query-N4rT8vW2yQ"},"headers":{"host":"gw.example.com","user-agent":"openai-python/1.51.0","apikey":"sk-kong-live-7Qf2XbN9dLp4Rt8w","authorization":"REDACTED","content-type":"application/json","x-tenant-id":"tenant-kong-3","x-key-id":"key-kong-header-1"},"tls":{"version":"TLSv1.3","cipher":"TLS_AES_256_GCM_SHA384"}},"upstream_uri":"/v1/chat/completions","upstream_status":"200","response":{"status":200,"size":1380,"headers":{"content-type":"application/json","x-kong-llm-model":"openai/gpt-4o"}},"latencies":{"kong":4,"proxy":1210,"request":1215,"receive":1},"tries":[{"ip":"104.18.6.192","port":443,"balancer_latency":0,"balancer_start":1733312400100}],"route":{"id":"b2d6e1f0-7a3c-4e58-9d21-6c0f4b8a1e37","name":"openai-chat","paths":["/ai"],"protocols":["https"]},"service":{"id":"5e0d9c8b-1a2f-4b3c-8d7e-6f5a4b3c2d1e","name":"openai","host":"api.openai.com","port":443,"protocol":"https"},"client_ip":"203.0.113.41","started_at":1733312400093,"source":"upstream","workspace":"0dc6f45b-8f8d-40d2-a504-473544ee190b","workspace_name":"default","consumer":{"id":"6f1c9d2e-3a4b-4c5d-8e9f-a0b1c2d3e4f5","username":"acme-prod","custom_id":"acct-acme","created_at":1733000000},"authenticated_entity":{"id":"9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d","consumer_id":{"id":"6f1c9d2e-3a4b-4c5d-8e9f-a0b1c2d3e4f5"}},"ai":{"proxy":{"usage":{"prompt_tokens":311,"completion_tokens":87,"total_tokens":398,"cost":0.00163,"time_per_token":13.9,"time_to_first_token":402},"meta":{"request_model":"gpt-4o","response_model":"gpt-4o-2024-08-06","provider_name":"openai","plugin_id":"c3d4e5f6-0718-4293-a4b5-c6d7e8f90a1b","llm_latency":1201,"request_mode":"oneshot"},"payload":{"request":"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"Draft a polite reminder about the overdue invoice\"}]}","response":"{\"id\":\"chatcmpl-AbC\"}"}}}}"#;

/// Kong 3.6: the flat `ai.usage` and `ai.meta`, a consumer known by its
/// username only, no credential id (the raw `x-api-key` is hashed), an
/// `Authorization` the serializer kept, and only a `correlation_id`.
const KONG_36: &str = r#"{"request":{"uri":"/llm/chat","url":"http://kong:8000/llm/chat","method":"POST","size":220,"querystring":{},"headers":{"host":"kong:8000","user-agent":"curl/8.5.0","x-api-key":"sk-kong-xapi-Hq7Ws2Lm9Vd4Kp1z","authorization":"Bearer sk-kong-bearer-Z3mK8vQ1nH6yT2cE","content-length":"220"}},"upstream_uri":"/v1/chat/completions","response":{"status":"429","size":310,"headers":{}},"latencies":{"kong":1,"proxy":95,"request":96.4},"tries":[],"client_ip":"2001:db8::17","started_at":1726783839538,"correlation_id":"f1e2d3c4-b5a6-4978-8695-a4b3c2d1e0f9#3","consumer":{"username":"beta-tester","id":"11111111-2222-4333-8444-555555555555"},"ai":{"usage":{"prompt_tokens":1024,"completion_tokens":0,"total_tokens":1024,"processing_time":0.9},"meta":{"request_model":"claude-3-5-sonnet-20240620","response_model":"UNSPECIFIED","provider_name":"anthropic"},"payload":{"request":"{\"messages\":[{\"role\":\"user\",\"content\":\"Summarise the quarterly numbers for the board\"}]}"}}}"#;

/// Kong 3.7: `ai["ai-proxy"]` with the singular token names, and a request
/// transformer's own model call, whose tokens add up.
const KONG_37: &str = r#"{"request":{"id":"0a1b2c3d4e5f40718293a4b5c6d7e8f9","uri":"/chat","method":"POST","headers":{"user-agent":"LangChain/0.2","apikey":"sk-kong-three-seven-Fv6Rn3Tb8Yc"}},"response":{"status":200},"latencies":{"request":2400},"client_ip":"198.51.100.9","started_at":1718000000000,"consumer":{"custom_id":"cust-0042","username":"acme-dev"},"authenticated_entity":{"id":"credential-77"},"ai":{"ai-request-transformer":{"usage":{"prompt_token":40,"completion_token":22,"cost":0.0001},"meta":{"request_model":"gpt-4o-mini","response_model":"gpt-4o-mini-2024-07-18"}},"ai-proxy":{"usage":{"prompt_token":580,"completion_token":144,"total_tokens":724,"cost":0.0042},"meta":{"request_model":"gpt-4o","response_model":"gpt-4o-2024-05-13","provider_name":"openai","plugin_id":"p-1"}}}}"#;

/// LiteLLM's StandardLoggingPayload; a caller's `extra_headers` carrying a
/// raw key sit in `model_parameters`.
const LITELLM_SLP: &str = r#"{"id":"chatcmpl-9f8e7d6c5b4a","trace_id":"trace-0001","litellm_call_id":"4c2b1a09-8f7e-4d6c-b5a4-938271605f4e","call_type":"acompletion","stream":false,"response_cost":0.0004215,"status":"success","custom_llm_provider":"openai","total_tokens":612,"prompt_tokens":540,"completion_tokens":72,"startTime":1764586802.25,"endTime":1764586803.75,"completionStartTime":1764586803.1,"response_time":1.5,"model":"gpt-4o-mini-2024-07-18","model_id":"model-deploy-1","model_group":"gpt-4o-mini","api_base":"https://api.openai.com/v1","metadata":{"user_api_key_hash":"3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea","user_api_key_alias":"batch-runner","user_api_key_user_id":"user-9001","user_api_key_team_id":"team-growth","user_api_key_org_id":null,"user_api_key_end_user_id":"end-user-3","user_api_key_spend":12.5,"user_api_key_max_budget":100,"requester_ip_address":"192.0.2.60","user_agent":"litellm-client/1.0","user_api_key_request_route":"/v1/chat/completions?debug=1","usage_object":{"prompt_tokens":540,"completion_tokens":72}},"cache_hit":false,"request_tags":["nightly"],"end_user":"end-user-3","requester_ip_address":"192.0.2.61","messages":[{"role":"system","content":"You are a meticulous research assistant"},{"role":"user","content":"List every clause about termination in this contract"}],"response":{"choices":[{"message":{"content":"Clause 14 covers termination for convenience"}}]},"error_str":null,"error_information":{"error_code":"","error_class":"","llm_provider":""},"model_parameters":{"temperature":0.2,"extra_headers":{"authorization":"Bearer sk-litellm-upstream-Wq4Ze8Rt2Yu6"}},"hidden_params":{"litellm_model_name":"gpt-4o-mini","api_base":"https://api.openai.com/v1"}}"#;

/// LiteLLM's older SpendLogs row: `api_key` is the key's hash, times are
/// naive, `metadata` and `messages` are strings.
const LITELLM_SPEND: &str = r#"{"request_id":"chatcmpl-spend-77","call_type":"acompletion","api_key":"9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab","spend":0.0031,"total_tokens":1200,"prompt_tokens":1000,"completion_tokens":200,"startTime":"2025-01-24 09:20:46.847371","endTime":"2025-01-24 09:20:49.000000","model":"claude-3-haiku-20240307","model_group":"claude-haiku","user":"user-spend-5","team_id":"team-ops","metadata":"{\"user_api_key\": \"9c56cc51\"}","cache_hit":"False","requester_ip_address":null,"status":"failure","error_information":{"error_code":"429"},"messages":"[{\"role\":\"user\",\"content\":\"Translate the onboarding guide into German\"}]","request_tags":"[]"}"#;

/// APISIX's logger entry with ai-proxy's `llm_summary` and `llm_request`,
/// key-auth's `apikey` header raw, no request id (its place stands in).
const APISIX_AI: &str = r#"{"latency":1811.0000324249,"request":{"querystring":{"apikey":"sk-apisix-query-Lk2Jh5Gf8Ds"},"headers":{"host":"gw:9080","user-agent":"Go-http-client/2.0","apikey":"sk-apisix-live-Mn3Bv6Cx9Zl","content-type":"application/json"},"method":"POST","size":180,"uri":"/v1/chat/completions?apikey=sk-apisix-query-Lk2Jh5Gf8Ds","url":"http://gw:9080/v1/chat/completions"},"response":{"headers":{"content-type":"application/json"},"status":200,"size":700},"route_id":"ai-route","client_ip":"192.0.2.14","server":{"hostname":"apisix-7d9f","version":"3.16.0"},"apisix_latency":5.0000324249268,"service_id":"","upstream_latency":1806,"start_time":1764586802123,"upstream":"api.openai.com:443","consumer":{"username":"team_blue"},"llm_summary":{"request_model":"gpt-4o","model":"gpt-4o-2024-08-06","duration":640,"prompt_tokens":120,"completion_tokens":33,"total_tokens":153,"stream":false,"end_user_id":"someone-else","cache_read_input_tokens":0},"llm_request":{"messages":[{"role":"user","content":"Compare these two vendor proposals on price"}],"stream":false}}"#;

/// APISIX with no consumer: the account is the `x-tenant-id` header (with
/// `gateways.account_header`), the key a raw bearer token; a request id
/// from `log_format_extra`.
const APISIX_PLAIN: &str = r#"{"latency":411.00001335144,"request":{"querystring":{},"headers":{"host":"127.0.0.1:9080","user-agent":"python-requests/2.32","x-tenant-id":"tenant-apisix-8","authorization":"Bearer sk-apisix-bearer-Qw9Er4Ty7Ui"},"method":"POST","size":83,"uri":"/v1/embeddings","url":"http://127.0.0.1:9080/v1/embeddings"},"response":{"status":503,"size":475},"route_id":"r","client_ip":"127.0.0.1","start_time":1699596164550,"upstream":"54.90.18.68:80","apisix_request_id":"a9b8c7d6e5f4"}"#;

/// Envoy AI Gateway's documented access-log entry, with the tenant and key
/// fields an operator adds, and an `x-api-key` logged by mistake.
const ENVOY: &str = r#"{":authority":"llm.example.com","bytes_received":105,"bytes_sent":432,"connection_termination_details":null,"downstream_local_address":"10.0.0.2:1975","downstream_remote_address":"198.51.100.77:64484","duration":1526,"gen_ai.provider.name":"openai","gen_ai.request.model":"gpt-4o-mini","gen_ai.request.model_override":null,"gen_ai.response.model":"gpt-4o-mini-2024-07-18","gen_ai.usage.input_tokens":15,"gen_ai.usage.output_tokens":7,"gen_ai.usage.total_tokens":22,"gen_ai.usage.cache_read_input_tokens":100,"method":"POST","protocol":"HTTP/1.1","response_code":200,"response_code_details":"via_upstream","response_flags":"-","route_name":"httproute/default/llm/rule/0/match/0/*","start_time":"2025-08-30T16:51:37.894Z","upstream_cluster":"httproute/default/llm/rule/0","upstream_host":"34.128.142.77:443","user-agent":"curl/8.7.1","x-envoy-origin-path":"/v1/chat/completions?api-version=2024-06-01","x-envoy-upstream-service-time":"451","x-forwarded-for":"192.168.1.38","x-request-id":"83b63da3-45a9-4196-98b8-1a7f697d6d8d","x-tenant-id":"tenant-42","x-key-id":"key-envoy-7","x-api-key":"sk-envoy-mistake-Pz5Xc8Vb1Nm"}"#;

/// Envoy AI Gateway: an MCP call (no tokens, no model), no request id, and
/// the caller's `authorization` in a field the operator added.
const ENVOY_MCP: &str = r#"{"bytes_received":165,"downstream_remote_address":"[2001:db8::9]:58124","duration":653.7,"gen_ai.provider.name":null,"gen_ai.request.model":null,"gen_ai.usage.input_tokens":null,"gen_ai.usage.output_tokens":null,"mcp.method.name":"tools/call","method":"POST","response_code":"200","start_time":"2025-10-08T10:42:11.430Z","x-envoy-origin-path":"/mcp","x-tenant-id":"t1","authorization":"Bearer sk-envoy-mcp-token-Jk4Lm7Np0Q"}"#;

/// keywatch's own event with a raw `api_key` and prompt text.
const CANONICAL: &str = r#"{"v":1,"ts":"2026-11-23T10:15:02.481Z","request_id":"req_01JD8XYZ","phase":"exchange","user_id":"acct_42","api_key":"sk-canonical-raw-Tg7Yh2Uj5Ik","tier":"pro","ip":"203.0.113.7","asn":64500,"user_agent":"my-app/2.1","endpoint":"/v1/chat/completions","model":"gpt-4o","status":200,"prompt_tokens":812,"completion_tokens":233,"cost_usd":0.0123,"latency_ms":1840,"prompt":"Write a limerick about a very tired kernel engineer"}"#;

/// Every fixture, named by its gateway and the format it is read as.
const FIXTURES: [(&str, Format, &str); 10] = [
    ("kong 3.9", Format::Kong, KONG_39),
    ("kong 3.6", Format::Kong, KONG_36),
    ("kong 3.7", Format::Kong, KONG_37),
    ("litellm payload", Format::Litellm, LITELLM_SLP),
    ("litellm spend row", Format::Litellm, LITELLM_SPEND),
    ("apisix ai", Format::Apisix, APISIX_AI),
    ("apisix plain", Format::Apisix, APISIX_PLAIN),
    ("envoy", Format::EnvoyAiGateway, ENVOY),
    ("envoy mcp", Format::EnvoyAiGateway, ENVOY_MCP),
    ("canonical", Format::Canonical, CANONICAL),
];

/// The raw keys and prompt texts the fixtures hold.
const SECRETS: [&str; 16] = [
    "sk-kong-query-N4rT8vW2yQ",
    "sk-kong-live-7Qf2XbN9dLp4Rt8w",
    "sk-kong-xapi-Hq7Ws2Lm9Vd4Kp1z",
    "sk-kong-bearer-Z3mK8vQ1nH6yT2cE",
    "sk-kong-three-seven-Fv6Rn3Tb8Yc",
    "sk-litellm-upstream-Wq4Ze8Rt2Yu6",
    "sk-apisix-query-Lk2Jh5Gf8Ds",
    "sk-apisix-live-Mn3Bv6Cx9Zl",
    "sk-apisix-bearer-Qw9Er4Ty7Ui",
    "sk-envoy-mistake-Pz5Xc8Vb1Nm",
    "sk-envoy-mcp-token-Jk4Lm7Np0Q",
    "sk-canonical-raw-Tg7Yh2Uj5Ik",
    "Draft a polite reminder",
    "List every clause about termination",
    "Compare these two vendor proposals",
    "Write a limerick about a very tired kernel engineer",
];

/// JSON fragments spliced into records at any byte.
fn fragments() -> Vec<String> {
    let mut f: Vec<String> = [
        "null",
        "-1",
        "-0",
        "0.5",
        "1e400",
        "-1e400",
        "1e-400",
        "1e308",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "true",
        "\"\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"\\udc00\\ud800\"",
        "\"\\ud83d\\ude00\"",
        "\\u0000",
        "\\ud800",
        "{}",
        "[]",
        "{\"a\":[1,{\"b\":null}]}",
        "\"k\":1,",
        ",",
        ":",
        "\"",
        "\\",
        "}",
        "]",
        "{",
        "[",
        "\u{feff}",
        "\u{fffd}",
        "\t\r\n ",
        "\"started_at\":1,",
        "\"consumer\":{\"username\":\"x\"},",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    f.push(format!("1{}", "0".repeat(400)));
    f.push("[".repeat(10_000));
    f.push(format!("{}{}", "[".repeat(100), "]".repeat(100)));
    f.push(format!("{}1{}", "{\"a\":".repeat(70), "}".repeat(70)));
    f.push(format!("\"{}\"", "x".repeat(100_000)));
    f.push(format!("\"{}\"", "é".repeat(600)));
    f.push(format!("\"{}\"", "\\u00e9".repeat(600)));
    f.push(format!("\"{}\"", "a".repeat(129)));
    f.push(format!("\"{}\"", "\\\"".repeat(300)));
    f
}

/// Values of every JSON type (and some that are not JSON), replacing a
/// record's values.
fn replacements() -> Vec<String> {
    let mut r: Vec<String> = [
        "null",
        "true",
        "false",
        "0",
        "-1",
        "-0",
        "1.5",
        "1e400",
        "-1e400",
        "1e-400",
        "1e308",
        "1.7976931348623157e308",
        "18446744073709551616",
        "1726783839538",
        "253402300800",
        "\"\"",
        "\"x\"",
        "\"200\"",
        "\" 404 \"",
        "\"UNSPECIFIED\"",
        "\"REDACTED\"",
        "\"Bearer \"",
        "\"2025-08-30T16:51:37.894Z\"",
        "\"2025-01-24 09:20:46.847371\"",
        "\"\\u0000\"",
        "\"a\\u0000b\"",
        "\"\\ud800\"",
        "\"\\udfff x\"",
        "\"/p?apikey=sk-x#frag\"",
        "\"300.1.1.1\"",
        "{}",
        "[]",
        "[1,\"two\",null]",
        "{\"prompt_tokens\":-5}",
        "{\"id\":\"\"}",
        "{\"username\":null,\"custom_id\":\"\"}",
        "tru",
        "01",
        "\"unterminated",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    r.push(format!("1{}", "0".repeat(400)));
    r.push(format!("{}{}", "[".repeat(200), "]".repeat(200)));
    r.push(format!("\"{}\"", "x".repeat(100_000)));
    r.push(format!("\"{}\"", "é".repeat(600)));
    r.push(format!("\"{}\"", "u".repeat(129)));
    r.push(format!("\"{}\"", "m".repeat(513)));
    r
}

const SLOT: &str = "kw-slot-5d1c9e";
const DUP: &str = "kw-dup-5d1c9e";

/// The value nodes of `v` in pre-order: each node's path.
fn nodes(v: &Value) -> Vec<Vec<PathStep>> {
    fn go(v: &Value, at: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
        out.push(at.clone());
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    at.push(PathStep::Index(i));
                    go(x, at, out);
                    at.pop();
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    at.push(PathStep::Key(k.clone()));
                    go(x, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at_mut<'v>(v: &'v mut Value, path: &[PathStep]) -> &'v mut Value {
    path.iter().fold(v, |v, s| match s {
        PathStep::Key(k) => &mut v[k.as_str()],
        PathStep::Index(i) => &mut v[*i],
    })
}

/// `record` with its `node`-th value (pre-order, modulo their number)
/// replaced by the raw text `with`.
fn replaced(record: &str, node: usize, with: &str) -> String {
    let mut v: Value = serde_json::from_str(record).unwrap();
    let all = nodes(&v);
    let path = &all[node % all.len()];
    *at_mut(&mut v, path) = Value::String(SLOT.into());
    serde_json::to_string(&v)
        .unwrap()
        .replacen(&format!("\"{SLOT}\""), with, 1)
}

/// `record` with a member of its `object`-th object given twice: its key
/// again, with the raw value `with` (or, `None`, its own value again).
fn duplicated(record: &str, object: usize, member: usize, with: Option<&str>) -> String {
    let mut v: Value = serde_json::from_str(record).unwrap();
    let objects: Vec<_> = nodes(&v)
        .into_iter()
        .filter(|p| {
            let mut c = v.clone();
            at_mut(&mut c, p).as_object().is_some_and(|o| !o.is_empty())
        })
        .collect();
    let path = &objects[object % objects.len()];
    let o = at_mut(&mut v, path).as_object_mut().unwrap();
    let (key, value) = o.iter().nth(member % o.len()).unwrap();
    let key = serde_json::to_string(key).unwrap();
    let value = with
        .map(str::to_string)
        .unwrap_or_else(|| serde_json::to_string(value).unwrap());
    o.insert(DUP.into(), Value::String(SLOT.into()));
    serde_json::to_string(&v).unwrap().replacen(
        &format!("\"{DUP}\":\"{SLOT}\""),
        &format!("{key}:{value}"),
        1,
    )
}

/// `s` with `frag` spliced in at byte `at` (modulo its length + 1).
fn spliced(s: &[u8], at: usize, frag: &str) -> Vec<u8> {
    let at = at % (s.len() + 1);
    [&s[..at], frag.as_bytes(), &s[at..]].concat()
}

/// Runs the checks, and also looks for each fixture's raw keys and prompt
/// texts (or a part of them) in the `Debug` of every event read from
/// `data`; one found there is a failure unless the input moved it out of
/// its key or prompt field (as the checks' own rule, which knows a secret
/// by where it sits, judges).
fn checked(data: &[u8]) -> usize {
    let n = check::gateway(data);
    if SECRETS.iter().all(|s| count(data, s) <= 1) {
        for dec in check::decoders() {
            for f in check::FORMATS {
                if let Ok((ev, read_as)) = dec.decode_as(f, data, &Origin::NOWHERE) {
                    let shown = format!("{ev:?}");
                    for s in SECRETS.iter().filter(|s| shown.contains(*s)) {
                        // Only where the input put it outside a key or prompt field.
                        assert!(
                            !in_guarded_place(data, s, read_as),
                            "{f}: the event shows {s:?}: {shown}"
                        );
                    }
                }
            }
        }
    }
    n
}

fn count(hay: &[u8], needle: &str) -> usize {
    hay.windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// Whether `s` in `data` still sits in a key header or prompt field of a
/// record read as `format` (the input parses and the checks' rule guards
/// it).
fn in_guarded_place(data: &[u8], s: &str, format: Format) -> bool {
    serde_json::from_slice::<Value>(data)
        .is_ok_and(|v| check::guarded(&v, format).iter().any(|g| g.contains(s)))
}

/// JSON-shaped noise: tokens of every adapter's field names and values.
fn json_noise() -> impl Strategy<Value = Vec<u8>> {
    let tokens = vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        " ",
        "null",
        "true",
        "0",
        "-1",
        "1.5",
        "1e400",
        "200",
        "\"x\"",
        "\"\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "1726783839538",
        "\"2025-08-30T16:51:37.894Z\"",
        "\"started_at\"",
        "\"request\"",
        "\"id\"",
        "\"uri\"",
        "\"headers\"",
        "\"apikey\"",
        "\"authorization\"",
        "\"user-agent\"",
        "\"x-tenant-id\"",
        "\"x-key-id\"",
        "\"consumer\"",
        "\"custom_id\"",
        "\"username\"",
        "\"authenticated_entity\"",
        "\"response\"",
        "\"status\"",
        "\"latencies\"",
        "\"ai\"",
        "\"proxy\"",
        "\"ai-proxy\"",
        "\"usage\"",
        "\"meta\"",
        "\"payload\"",
        "\"prompt_tokens\"",
        "\"completion_tokens\"",
        "\"prompt_token\"",
        "\"input_tokens\"",
        "\"cache_read_input_tokens\"",
        "\"cost\"",
        "\"response_model\"",
        "\"correlation_id\"",
        "\"startTime\"",
        "\"endTime\"",
        "\"litellm_call_id\"",
        "\"metadata\"",
        "\"user_api_key_user_id\"",
        "\"user_api_key_hash\"",
        "\"response_cost\"",
        "\"spend\"",
        "\"messages\"",
        "\"error_information\"",
        "\"error_code\"",
        "\"model_group\"",
        "\"user\"",
        "\"team_id\"",
        "\"api_key\"",
        "\"end_user\"",
        "\"start_time\"",
        "\"llm_summary\"",
        "\"llm_request\"",
        "\"latency\"",
        "\"client_ip\"",
        "\"route_id\"",
        "\"apisix_request_id\"",
        "\"end_user_id\"",
        "\"response_code\"",
        "\"duration\"",
        "\"x-request-id\"",
        "\"gen_ai.usage.input_tokens\"",
        "\"gen_ai.usage.output_tokens\"",
        "\"gen_ai.response.model\"",
        "\"downstream_remote_address\"",
        "\"x-forwarded-for\"",
        "\"x-envoy-origin-path\"",
        "\"ts\"",
        "\"request_id\"",
        "\"user_id\"",
        "\"key_id\"",
        "\"prompt\"",
        "\"cost_usd\"",
    ];
    proptest::collection::vec(proptest::sample::select(tokens), 0..80)
        .prop_map(|t| t.concat().into_bytes())
}

/// Any JSON value, with the strings and numbers gateways log.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
        "[\"\\\\\\[\\]{},: a\\x00\\x1fé😀]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_\\-\\.\"]{0,10}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `values` as a message: a JSON array with blanks of `ws` between tokens.
fn message(values: &[String], ws: &str) -> Vec<u8> {
    format!("{ws}[{ws}{}{ws}]{ws}", values.join(&format!("{ws},{ws}"))).into_bytes()
}

#[test]
fn every_fixture_is_read_in_its_format_and_by_auto() {
    let decs = check::decoders();
    for (name, format, rec) in FIXTURES {
        let v: Value = serde_json::from_str(rec).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            !check::guarded(&v, format).is_empty(),
            "{name}: the secret check has nothing to look for"
        );
        // Envoy AI Gateway names no account unless configured to, nor
        // does an APISIX route without an auth plugin.
        let dec = match name {
            "envoy" | "envoy mcp" | "apisix plain" => &decs[1],
            _ => &decs[0],
        };
        for asked in [format, Format::Auto] {
            let (ev, read_as) = dec
                .decode_as(asked, rec.as_bytes(), &Origin::NOWHERE)
                .unwrap_or_else(|e| panic!("{name} as {asked}: {e}"));
            assert_eq!(read_as, format, "{name} as {asked}");
            assert!(
                ev.prompt_tokens + ev.completion_tokens > 0
                    || matches!(name, "envoy mcp" | "apisix plain")
            );
            let shown = format!("{ev:?}");
            for s in SECRETS {
                assert!(!shown.contains(s), "{name}: {s:?} in {shown}");
            }
        }
        // Both decoders accept it in its own format: the checks reach the
        // accepted paths.
        assert!(checked(rec.as_bytes()) >= 2, "{name}");
    }
}

#[test]
fn every_fixture_cut_at_every_byte() {
    for (_, _, rec) in FIXTURES {
        let b = rec.as_bytes();
        for at in 0..=b.len() {
            checked(&b[..at]);
            checked(&b[at..]);
        }
    }
}

#[test]
fn a_message_of_every_fixture_splits_into_them() {
    let recs: Vec<String> = FIXTURES.iter().map(|f| f.2.to_string()).collect();
    for ws in ["", " ", "\n\t "] {
        let m = message(&recs, ws);
        let pieces = check::split(&m);
        assert_eq!(pieces.len(), FIXTURES.len());
        for (i, (b, e)) in pieces.iter().enumerate() {
            assert_eq!((*b, *e), (FIXTURES[i].2.as_bytes(), Some(i as u32)));
        }
        assert!(checked(&m) >= 2 * FIXTURES.len());
    }
}

#[test]
fn every_fragment_at_every_token_boundary() {
    // Between any two tokens (and just inside every string) of every
    // fixture: where a fragment changes what a field holds.
    // The long fragments are left to the property tests.
    let frags: Vec<String> = fragments().into_iter().filter(|f| f.len() < 1000).collect();
    for (_, format, rec) in FIXTURES {
        let b = rec.as_bytes();
        let cuts = (0..=b.len()).filter(|&i| {
            i == 0 || i == b.len() || matches!(b[i - 1], b'{' | b'[' | b',' | b':' | b'"')
        });
        for at in cuts {
            for f in &frags {
                check::read_in(&spliced(b, at, f), &[format, Format::Auto]);
            }
        }
    }
}

proptest! {
    // A failure prints its minimal input; no regression file is written.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        checked(&data);
    }

    #[test]
    fn arbitrary_bytes_after_an_open_bracket(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        checked(&[b"[".as_slice(), &data].concat());
    }

    #[test]
    fn json_shaped_noise(data in json_noise()) {
        checked(&data);
        checked(&[b"[".as_slice(), &data, b"]"].concat());
    }

    #[test]
    fn fragments_spliced_anywhere(fx in 0..FIXTURES.len(), at in any::<usize>(), frag in any::<prop::sample::Index>()) {
        let frags = fragments();
        let f = frag.get(&frags);
        checked(&spliced(FIXTURES[fx].2.as_bytes(), at, f));
    }

    #[test]
    fn bytes_overwritten(fx in 0..FIXTURES.len(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let mut b = FIXTURES[fx].2.as_bytes().to_vec();
        for (at, byte) in edits {
            let n = b.len();
            b[at % n] = byte;
        }
        checked(&b);
    }

    #[test]
    fn values_replaced_by_other_types(fx in 0..FIXTURES.len(), node in any::<usize>(), with in any::<prop::sample::Index>(), cut in any::<Option<usize>>()) {
        let r = replacements();
        let rec = replaced(FIXTURES[fx].2, node, with.get(&r).as_str());
        checked(rec.as_bytes());
        if let Some(c) = cut {
            checked(&rec.as_bytes()[..c % (rec.len() + 1)]);
        }
    }

    #[test]
    fn several_values_replaced(fx in 0..FIXTURES.len(), edits in proptest::collection::vec((any::<usize>(), any::<prop::sample::Index>()), 2..5)) {
        let r = replacements();
        let mut rec = FIXTURES[fx].2.to_string();
        for (node, with) in edits {
            let next = replaced(&rec, node, with.get(&r).as_str());
            // A replacement that is not JSON ends the chain.
            if serde_json::from_str::<Value>(&next).is_err() {
                checked(next.as_bytes());
                break;
            }
            rec = next;
        }
        checked(rec.as_bytes());
    }

    #[test]
    fn keys_given_twice(fx in 0..FIXTURES.len(), object in any::<usize>(), member in any::<usize>(), with in proptest::option::of(any::<prop::sample::Index>())) {
        let r = replacements();
        let rec = duplicated(FIXTURES[fx].2, object, member, with.as_ref().map(|i| i.get(&r).as_str()));
        checked(rec.as_bytes());
    }

    #[test]
    fn arrays_of_mutated_fixtures(
        elems in proptest::collection::vec((0..FIXTURES.len(), any::<usize>(), any::<prop::sample::Index>(), any::<bool>()), 0..6),
        ws in proptest::sample::select(vec!["", " ", "\n", "\r\n\t "]),
        cut in any::<Option<usize>>(),
    ) {
        let r = replacements();
        let values: Vec<String> = elems
            .iter()
            .map(|(fx, node, with, mutate)| {
                if *mutate {
                    replaced(FIXTURES[*fx].2, *node, with.get(&r).as_str())
                } else {
                    FIXTURES[*fx].2.to_string()
                }
            })
            .collect();
        let m = message(&values, ws);
        checked(&m);
        if let Some(c) = cut {
            checked(&m[..c % (m.len() + 1)]);
        }
    }

    #[test]
    fn json_arrays_split_into_serde_jsons_elements(v in proptest::collection::vec(json_value(), 0..8), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_vec_pretty(&v).unwrap()
        } else {
            serde_json::to_vec(&v).unwrap()
        };
        let pieces = check::split(&text);
        prop_assert_eq!(pieces.len(), v.len());
        let mut n = 0;
        split_records(&text, |p| {
            assert!(matches!(p, Piece::Record(_, Some(i)) if i == n), "{p:?}");
            n += 1;
        });
        checked(&text);
    }

    #[test]
    fn the_elements_before_a_break_stand(
        v in proptest::collection::vec(json_value(), 0..5),
        // Any bytes, those that are not UTF-8 among them (see
        // an_invalid_byte_in_one_element_leaves_the_elements_before_it).
        rest in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let elems: Vec<String> = v.iter().map(|e| serde_json::to_string(e).unwrap()).collect();
        let head = format!("[{}{}", elems.join(","), if elems.is_empty() { "" } else { "," });
        let m = [head.as_bytes(), &rest].concat();
        let pieces = check::split(&m);
        prop_assert!(pieces.len() >= elems.len(), "{:?}", pieces);
        for (i, e) in elems.iter().enumerate() {
            prop_assert_eq!(pieces[i], (e.as_bytes(), Some(i as u32)));
        }
    }

    #[test]
    fn anything_that_is_not_an_array_is_one_record(v in json_value()) {
        let v = if v.is_array() { serde_json::json!({ "a": v }) } else { v };
        let text = serde_json::to_vec(&v).unwrap();
        let pieces = check::split(&text);
        prop_assert_eq!(pieces, vec![(&text[..], None)]);
    }
}

#[test]
fn a_decoder_of_another_key_hashes_raw_keys_differently() {
    // The checks compare decoders of one key; a raw key's id depends on it.
    let a = Decoder::new(b"one");
    let b = Decoder::new(b"two");
    let (ea, _) = a
        .decode_as(Format::Kong, KONG_36.as_bytes(), &Origin::NOWHERE)
        .unwrap();
    let (eb, _) = b
        .decode_as(Format::Kong, KONG_36.as_bytes(), &Origin::NOWHERE)
        .unwrap();
    assert!(ea.key_id.starts_with("kh_"), "{}", ea.key_id);
    assert_ne!(ea.key_id, eb.key_id);
}

// Bugs these checks found, each as its smallest input.

/// Two AI plugins' costs, each a finite number, added up past `f64::MAX`:
/// the event's cost was infinite (fixed in `Usage::add`, which now holds
/// the sum to `f64::MAX` as token sums saturate).
#[test]
fn the_costs_of_two_ai_plugins_add_up_to_a_finite_cost() {
    let rec = KONG_37
        .replace("\"cost\":0.0001", "\"cost\":1e308")
        .replace("\"cost\":0.0042", "\"cost\":1e308");
    let (ev, _) = Decoder::new(b"k")
        .decode_as(Format::Kong, rec.as_bytes(), &Origin::NOWHERE)
        .unwrap();
    assert!(ev.cost_usd.is_some_and(f64::is_finite), "{:?}", ev.cost_usd);
    check::gateway(rec.as_bytes());
}

/// An identity taken from a request header (Kong's and APISIX's
/// `gateways.account_header` and `key_header`) that held an escaped NUL
/// was accepted with U+FFFD in its place, so `a\u0000b`, `a\ud800b` and
/// `a\ufffdb` were one account. Every other identity (the canonical ids,
/// Envoy AI Gateway's header fields, the ids gateways log) refuses it:
/// `expected text without NUL characters`; now these do too.
#[test]
fn a_header_identity_holding_a_nul_is_refused_as_every_identity_is() {
    let dec = Decoder::with_options(b"k", check::options());
    let kong = KONG_36
        .replace(
            r#""consumer":{"username":"beta-tester","id":"11111111-2222-4333-8444-555555555555"},"#,
            "",
        )
        .replace(
            r#""host":"kong:8000","#,
            r#""host":"kong:8000","x-tenant-id":"ten\u0000ant","#,
        );
    let apisix_account = APISIX_PLAIN.replace("tenant-apisix-8", r"tenant\u0000-apisix-8");
    let apisix_key = APISIX_AI.replace(
        r#""host":"gw:9080","#,
        r#""host":"gw:9080","x-key-id":"key\u0000-1","#,
    );
    let envoy = ENVOY.replace("tenant-42", r"tenant\u0000-42");
    for (name, format, rec) in [
        ("envoy (refused today)", Format::EnvoyAiGateway, envoy),
        ("kong account", Format::Kong, kong),
        ("apisix account", Format::Apisix, apisix_account),
        ("apisix key", Format::Apisix, apisix_key),
    ] {
        assert_ne!(rec, "", "{name}");
        let got = dec.decode_as(format, rec.as_bytes(), &Origin::NOWHERE);
        assert!(
            got.is_err(),
            "{name}: accepted as user {:?}, key {:?}",
            got.as_ref().map(|(e, _)| &e.user_id),
            got.as_ref().map(|(e, _)| &e.key_id)
        );
    }
}

/// A byte that is not UTF-8 in one element of an array broke the array at
/// element 0: the whole message was one dead letter naming `element 0`,
/// and the valid elements before it were lost, where `Piece::Broken`
/// promises they stand. (Kong's and APISIX's lua-cjson write header bytes
/// as they came, so one client's `User-Agent: \xff` took its batch with
/// it.)
#[test]
fn an_invalid_byte_in_one_element_leaves_the_elements_before_it() {
    let m = b"[{\"a\":1},\"\xff\"]";
    let mut pieces = Vec::new();
    split_records(m, |p| pieces.push(p));
    assert!(
        matches!(
            &pieces[..],
            [Piece::Record(b"{\"a\":1}", Some(0)), Piece::Broken(_, 1, _)]
        ),
        "{pieces:?}"
    );
}

#[test]
fn the_secret_check_tells_a_leak_from_the_decoders_own_words() {
    let rec = br#"{"apikey":"sk-abcdefghijklmnop"}"#;
    let s = "sk-abcdefghijklmnop";
    // A reader that echoes the record leaks it…
    let echo = |b: &[u8]| Some(String::from_utf8_lossy(b).into_owned());
    assert!(check::shown_from(rec, s, &echo(rec).unwrap(), echo));
    // …one whose text holds it whatever the record does not.
    let fixed = |_: &[u8]| Some(format!("always {s}"));
    assert!(!check::shown_from(rec, s, &fixed(rec).unwrap(), fixed));
    // A record holding it twice (here once escaped) is not judged.
    let twice = br#"{"apikey":"sk-abcdefghijklmnop","x":"\u0073k-abcdefghijklmnop"}"#;
    assert!(!check::shown_from(twice, s, &echo(twice).unwrap(), echo));
}
