//! The simulated exchanges in gateways' own log shapes: LiteLLM's
//! StandardLoggingPayload, Kong's `kong.log.serialize()` record with its
//! `ai` section, APISIX's logger entry with `llm_summary`, and Envoy AI
//! Gateway's access-log entry. Each record carries the fields those
//! gateways write around the exchange (headers, routes, services, timings,
//! request and response bodies where the gateway logs them), so record
//! sizes are like real ones.
//!
//! **Identity.** The gateway's account field is the simulator's user id
//! (`acct_000042`): LiteLLM's `metadata.user_api_key_user_id`, Kong's
//! `consumer.custom_id` (or `consumer.username` when the consumer has no
//! custom id), APISIX's `consumer.username`, and an `x-tenant-id`
//! access-log field for Envoy (which logs no identity unless the operator
//! adds one). Keys are derived deterministically from the simulator's key
//! id, so a key keeps one id and keys do not share one: LiteLLM's
//! `user_api_key_hash` (64 hex), Kong's credential UUID
//! (`authenticated_entity.id`), and for APISIX a raw `apikey` header (the
//! key-auth plugin's, logged because APISIX logs every request header,
//! which keywatch hashes). Envoy names no key: the account stands in.
//!
//! **Prompts.** A prompt the simulator knows only by its fingerprint is
//! written as text derived from that fingerprint (about `prompt_chars`
//! characters, which the simulator always draws with the fingerprint), so
//! equal fingerprints give equal text. LiteLLM logs it in `messages`, Kong
//! in `ai.*.payload.request` (the request body, on keys whose plugin logs
//! payloads), APISIX in `llm_request.messages`; Envoy logs no bodies. With
//! [`Simulator::with_payloads`] off, no gateway logs bodies (each one's
//! own setting for that), and its records name no prompt.
//!
//! **Versions.** Kong's `ai` section changed shape between releases; the
//! shape rotates by key (3.6 flat `ai.usage`, 3.7 singular
//! `prompt_token`, 3.8 `ai["ai-proxy"]` with `cost`, 3.9+ `ai.proxy`), so
//! every shape is in every run.
//!
//! **Delivery.** A gateway logs a whole exchange in one record: in a
//! gateway format an account that would log split request/response records
//! logs exchanges instead. Errors (status and, for LiteLLM, `failure` with
//! `error_information.error_code`) and latency are carried through, as are
//! the simulator's token counts, even on errors.

use super::*;

/// The log format records are written in: keywatch's canonical event or a
/// gateway's own log shape. The names are those `keywatch replay --format`
/// takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// keywatch's canonical event (contracts/gateway-event.md).
    #[default]
    Canonical,
    /// LiteLLM proxy's StandardLoggingPayload.
    Litellm,
    /// Kong Gateway's logged record with the AI plugins' `ai` section.
    Kong,
    /// Apache APISIX's logger entry with `ai-proxy`'s `llm_summary`.
    Apisix,
    /// Envoy AI Gateway's access-log entry (`gen_ai.*` attributes).
    EnvoyAiGateway,
}

impl LogFormat {
    /// Every format, canonical first.
    pub const ALL: [LogFormat; 5] = [
        LogFormat::Canonical,
        LogFormat::Litellm,
        LogFormat::Kong,
        LogFormat::Apisix,
        LogFormat::EnvoyAiGateway,
    ];

    /// The name `FromStr` accepts (and `keywatch replay --format` takes).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Canonical => "canonical",
            LogFormat::Litellm => "litellm",
            LogFormat::Kong => "kong",
            LogFormat::Apisix => "apisix",
            LogFormat::EnvoyAiGateway => "envoy-ai-gateway",
        }
    }

    /// A gateway's own shape (every format but canonical): one record per
    /// exchange, never split.
    pub fn is_gateway(self) -> bool {
        self != LogFormat::Canonical
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A log format name that is none of [`LogFormat::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?}: expected canonical, litellm, kong, apisix or envoy-ai-gateway")]
pub struct UnknownLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownLogFormat(s.to_owned()))
    }
}

/// How records are written: the format, and whether a gateway logs
/// request and response bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) format: LogFormat,
    pub(super) payloads: bool,
}

impl Shape {
    /// Canonical records (bodies are a gateway matter).
    pub(super) const CANONICAL: Shape = Shape {
        format: LogFormat::Canonical,
        payloads: true,
    };
}

impl Simulator {
    /// Writes every record in `format` (default canonical). Traffic,
    /// attacks and duplicates are the same for a seed in every format; in a
    /// gateway format an exchange is always one record, so with
    /// [`SimConfig::split_fraction`] at 0 every format has the same records
    /// in the same order.
    pub fn with_format(mut self, format: LogFormat) -> Self {
        self.shape.format = format;
        self
    }

    /// Whether the gateway logs request and response bodies (default
    /// true): LiteLLM's message logging (off: its redaction placeholder
    /// instead of messages and completion), Kong's `log_payloads` (on for
    /// three keys in four; off: for none), APISIX's `logging.payloads`.
    /// Without bodies a gateway record names no prompt. Envoy AI Gateway
    /// never logs bodies, and canonical records are not affected.
    pub fn with_payloads(mut self, payloads: bool) -> Self {
        self.shape.payloads = payloads;
        self
    }

    /// The format records are written in.
    pub fn format(&self) -> LogFormat {
        self.shape.format
    }
}

impl Delivery {
    /// Appends the line in `shape`.
    pub(super) fn render_as(&self, shape: Shape, out: &mut impl Sink) {
        let ex = &self.exchange;
        let payloads = shape.payloads;
        match shape.format {
            LogFormat::Canonical => self.render(out),
            LogFormat::Litellm => litellm(ex, payloads, out),
            LogFormat::Kong => kong(ex, payloads, out),
            LogFormat::Apisix => apisix(ex, payloads, out),
            LogFormat::EnvoyAiGateway => envoy(ex, out),
        }
    }
}

// ---------------------------------------------------------------------------
// What every shape shares.

/// Salts of the derived ids, so no two kinds of id coincide.
const SALT_CONSUMER: u64 = 0x6b6f_6e67_2d63_6f6e;
const SALT_CREDENTIAL: u64 = 0x6b6f_6e67_2d63_7265;
const SALT_SECRET: u64 = 0x736b_2d73_6563_7265;
const SALT_HASH: u64 = 0x6c69_7465_6c6c_6d68;
const SALT_REQUEST: u64 = 0x7265_7175_6573_7469;
const SALT_TRACE: u64 = 0x7472_6163_652d_6964;
const SALT_COMPLETION: u64 = 0x636f_6d70_6c65_7465;
const SALT_ENTITY: u64 = 0x656e_7469_7479_2d69;

/// Epoch seconds the gateways' configuration objects were created at
/// (2026-10-01T00:00:00Z): fixed, so a seed gives the same bytes.
const CONFIG_CREATED_S: u64 = 1_790_812_800;

/// Provider snapshot names, one per [`MODELS`] entry: what the provider
/// answers with (`response_model`), while the client asked for the alias.
const SNAPSHOTS: [&str; 7] = [
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "gpt-4.1-2025-04-14",
    "gpt-4.1-mini-2025-04-14",
    "claude-sonnet-4-20250514",
    "claude-3-5-haiku-20241022",
    "gemini-2.0-flash-001",
];

/// An upstream provider: its name in gateway logs, its API host, and an
/// address of it.
struct Provider {
    name: &'static str,
    host: &'static str,
    api_base: &'static str,
    ip: &'static str,
    /// Index for derived route and service ids.
    n: u64,
}

const OPENAI: Provider = Provider {
    name: "openai",
    host: "api.openai.com",
    api_base: "https://api.openai.com/v1",
    ip: "162.159.140.245",
    n: 1,
};
const ANTHROPIC: Provider = Provider {
    name: "anthropic",
    host: "api.anthropic.com",
    api_base: "https://api.anthropic.com",
    ip: "160.79.104.10",
    n: 2,
};
const GEMINI: Provider = Provider {
    name: "gemini",
    host: "generativelanguage.googleapis.com",
    api_base: "https://generativelanguage.googleapis.com/v1beta",
    ip: "142.250.74.202",
    n: 3,
};

fn provider(model: u8) -> &'static Provider {
    match model {
        4 | 5 => &ANTHROPIC,
        6 => &GEMINI,
        _ => &OPENAI,
    }
}

/// The gateway's own host name, as clients address it.
const GATEWAY_HOST: &str = "llm-gw.example.com";

/// An account as one number: benign accounts below 2^32, farm accounts above.
fn account_code(a: Account) -> u64 {
    match a {
        Account::Benign(n) => u64::from(n),
        Account::Farm(n) => (1 << 32) | u64::from(n),
    }
}

/// A version-4 UUID derived from `x` (distinct `x`, distinct UUIDs for
/// all practical purposes).
fn push_uuid(out: &mut impl Sink, x: u64) {
    let a = mix64(x);
    let b = mix64(a ^ x.rotate_left(17));
    push_hex(out, a >> 32, 8);
    out.put_ascii(b"-");
    push_hex(out, a >> 16, 4);
    out.put_ascii(b"-");
    push_hex(out, 0x4000 | (a & 0x0fff), 4);
    out.put_ascii(b"-");
    push_hex(out, 0x8000 | ((b >> 48) & 0x3fff), 4);
    out.put_ascii(b"-");
    push_hex(out, b, 12);
}

/// The raw key a client sends (`sk-kw-` and 32 hex), derived from the key id.
fn push_secret(out: &mut impl Sink, key: u32) {
    out.put_str("sk-kw-");
    push_hex(out, mix64(u64::from(key) ^ SALT_SECRET), 16);
    push_hex(out, mix64(u64::from(key).wrapping_add(SALT_SECRET)), 16);
}

/// `v` thousandths as a decimal with three places (`1.234`).
fn push_milli(out: &mut impl Sink, v: u64) {
    push_u64(out, v / 1000);
    out.put_ascii(b".");
    push_padded(out, v % 1000, 3);
}

/// Unix ms as epoch seconds with microseconds (`1795392000.481237`); the
/// extra microseconds stay below half a millisecond, so the time rounds
/// back to `ms` exactly.
fn push_epoch_seconds(out: &mut impl Sink, ms: i64, jitter: u64) {
    let ms = ms.max(0) as u64;
    push_u64(out, ms / 1000);
    out.put_ascii(b".");
    push_padded(out, ms % 1000, 3);
    push_padded(out, jitter % 450, 3);
}

fn is_error(ex: &Exchange) -> bool {
    ex.status >= 400
}

fn total_tokens(ex: &Exchange) -> u64 {
    u64::from(ex.prompt_tokens) + u64::from(ex.completion_tokens)
}

fn endpoint(ex: &Exchange) -> &'static str {
    if ex.embeddings {
        EMBEDDINGS
    } else {
        CHAT
    }
}

/// The cost of an exchange the gateway priced, in 1e-8 USD.
fn priced_cost(ex: &Exchange) -> Option<u64> {
    ex.priced
        .then(|| cost_e8(ex.model, ex.prompt_tokens, ex.completion_tokens))
}

/// Time to first token: a share of the latency.
fn first_token_ms(ex: &Exchange) -> u64 {
    let l = u64::from(ex.latency_ms);
    (l / 3 + 80).min(l)
}

/// How a provider words an error: class and message.
fn error_words(status: u16) -> (&'static str, &'static str, &'static str) {
    match status {
        429 => (
            "RateLimitError",
            "rate_limit_exceeded",
            "Rate limit reached for requests. Please try again in 20s.",
        ),
        400 => (
            "BadRequestError",
            "invalid_request_error",
            "Invalid request: the messages parameter is malformed.",
        ),
        401 | 403 => (
            "AuthenticationError",
            "invalid_api_key",
            "Incorrect API key provided.",
        ),
        _ => (
            "InternalServerError",
            "server_error",
            "The server had an error while processing your request.",
        ),
    }
}

/// How deeply the text being written is nested in JSON strings: once (a
/// string value) or twice (a JSON body logged as a string, as Kong does).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Esc {
    Once,
    Twice,
}

impl Esc {
    fn quote(self) -> &'static str {
        match self {
            Esc::Once => "\\\"",
            Esc::Twice => "\\\\\\\"",
        }
    }

    fn newline(self) -> &'static str {
        match self {
            Esc::Once => "\\n",
            Esc::Twice => "\\\\n",
        }
    }
}

/// The words of generated text (plain ASCII: no escaping needed).
const WORDS: [&str; 64] = [
    "the",
    "customer",
    "order",
    "please",
    "summary",
    "report",
    "data",
    "table",
    "and",
    "of",
    "with",
    "for",
    "a",
    "to",
    "in",
    "account",
    "invoice",
    "review",
    "function",
    "return",
    "error",
    "value",
    "list",
    "each",
    "region",
    "total",
    "service",
    "request",
    "response",
    "should",
    "include",
    "explain",
    "why",
    "how",
    "what",
    "this",
    "that",
    "code",
    "query",
    "user",
    "team",
    "project",
    "deadline",
    "budget",
    "contract",
    "clause",
    "risk",
    "model",
    "result",
    "test",
    "case",
    "input",
    "output",
    "format",
    "short",
    "detailed",
    "two",
    "three",
    "steps",
    "example",
    "paragraph",
    "sentence",
    "translate",
    "German",
];

/// Appends English-looking text of about `chars` characters (at least
/// one word), the same for the same `seed` and `chars`: words, sentence
/// ends, the odd quoted word and line break, escaped for `esc`.
fn push_text(out: &mut impl Sink, seed: u64, chars: u32, esc: Esc) {
    let mut state = seed;
    let mut written = 0u32;
    let mut first = true;
    loop {
        state = mix64(state.wrapping_add(0x9E37_79B9_7F4A_7C15));
        let word = WORDS[(state & 63) as usize];
        if !first {
            if (state >> 8).is_multiple_of(11) {
                out.put_ascii(b".");
                written += 1;
            }
            if (state >> 16).is_multiple_of(37) {
                out.put_str(esc.newline());
            } else {
                out.put_ascii(b" ");
            }
            written += 1;
        }
        first = false;
        if (state >> 24).is_multiple_of(41) {
            out.put_str(esc.quote());
            out.put_str(word);
            out.put_str(esc.quote());
            written += 2;
        } else {
            out.put_str(word);
        }
        written += word.len() as u32;
        if written >= chars {
            return;
        }
    }
}

/// The prompt's text: the simulator's raw text, or text derived from its
/// fingerprint.
fn push_prompt(out: &mut impl Sink, ex: &Exchange, esc: Esc) {
    match ex.prompt {
        PromptRef::Fingerprint(fp) => push_text(out, fp, ex.prompt_chars, esc),
        PromptRef::Text {
            template,
            reference,
        } => {
            out.put_str(PROMPT_TEXTS[usize::from(template)]);
            out.put_str(" (ref ");
            push_u64(out, u64::from(reference));
            out.put_ascii(b")");
        }
    }
}

/// The completion's text: about four characters a token.
fn push_completion(out: &mut impl Sink, ex: &Exchange, esc: Esc) {
    let chars = ex.completion_tokens.saturating_mul(4);
    push_text(out, ex.request_id ^ SALT_COMPLETION, chars, esc);
}

/// The completion id a provider gives (`chatcmpl-` and 24 hex).
fn push_completion_id(out: &mut impl Sink, ex: &Exchange) {
    out.put_str("chatcmpl-");
    push_hex(out, mix64(ex.request_id ^ SALT_REQUEST), 16);
    push_hex(out, ex.request_id, 8);
}

/// A plausible body size: its text plus the JSON around it.
fn request_bytes(ex: &Exchange) -> u64 {
    u64::from(ex.prompt_chars) + 96
}

fn response_bytes(ex: &Exchange) -> u64 {
    if is_error(ex) {
        180
    } else {
        u64::from(ex.completion_tokens) * 4 + 420
    }
}

// ---------------------------------------------------------------------------
// LiteLLM: the StandardLoggingPayload (litellm/types/utils.py).

/// What LiteLLM writes for messages and completions with
/// `turn_off_message_logging` (`LiteLLMCommonStrings`).
const LITELLM_REDACTED: &str = "redacted by litellm. 'litellm.turn_off_message_logging=True'";

fn litellm(ex: &Exchange, payloads: bool, out: &mut impl Sink) {
    let p = provider(ex.model);
    let model = MODELS[usize::from(ex.model)].name;
    let snapshot = SNAPSHOTS[usize::from(ex.model)];
    let cost = priced_cost(ex);
    let end_ms = ex.at_ms + i64::from(ex.latency_ms);
    let jitter = mix64(ex.request_id);
    out.put_str("{\"id\":\"");
    push_completion_id(out, ex);
    out.put_str("\",\"trace_id\":\"");
    push_uuid(out, ex.request_id ^ SALT_TRACE);
    out.put_str("\",\"litellm_call_id\":\"");
    push_uuid(out, ex.request_id ^ SALT_REQUEST);
    out.put_str("\",\"call_type\":\"");
    out.put_str(if ex.embeddings {
        "aembedding"
    } else {
        "acompletion"
    });
    out.put_str("\",\"stream\":false,\"response_cost\":");
    match cost {
        Some(c) => push_cost_e8(out, c),
        None => out.put_str("null"),
    }
    out.put_str(",\"response_cost_failure_debug_info\":null,\"status\":\"");
    out.put_str(if is_error(ex) { "failure" } else { "success" });
    out.put_str("\",\"custom_llm_provider\":\"");
    out.put_str(p.name);
    out.put_str("\",\"total_tokens\":");
    push_u64(out, total_tokens(ex));
    out.put_str(",\"prompt_tokens\":");
    push_u64(out, u64::from(ex.prompt_tokens));
    out.put_str(",\"completion_tokens\":");
    push_u64(out, u64::from(ex.completion_tokens));
    out.put_str(",\"startTime\":");
    push_epoch_seconds(out, ex.at_ms, jitter);
    out.put_str(",\"endTime\":");
    push_epoch_seconds(out, end_ms, jitter >> 20);
    out.put_str(",\"completionStartTime\":");
    push_epoch_seconds(out, ex.at_ms + first_token_ms(ex) as i64, jitter >> 40);
    out.put_str(",\"response_time\":");
    push_milli(out, u64::from(ex.latency_ms));
    out.put_str(",\"model\":\"");
    out.put_str(snapshot);
    out.put_str("\",\"model_id\":\"");
    push_hex(out, mix64(u64::from(ex.model) ^ SALT_HASH), 16);
    out.put_str("\",\"model_group\":\"");
    out.put_str(model);
    out.put_str("\",\"model_map_information\":{\"model_map_key\":\"");
    out.put_str(model);
    out.put_str("\",\"model_map_value\":null},\"api_base\":\"");
    out.put_str(p.api_base);
    out.put_str("\",\"metadata\":{\"user_api_key_hash\":\"");
    for i in 0..4u64 {
        push_hex(out, mix64((u64::from(ex.key) << 2 | i) ^ SALT_HASH), 16);
    }
    out.put_str("\",\"user_api_key_alias\":");
    if ex.key & 1 == 0 {
        out.put_str("\"key-");
        push_hex(out, u64::from(ex.key), 8);
        out.put_ascii(b"\"");
    } else {
        out.put_str("null");
    }
    out.put_str(",\"user_api_key_team_id\":");
    if ex.tier == Tier::Enterprise {
        out.put_str("\"team-");
        push_hex(out, mix64(account_code(ex.account) ^ SALT_ENTITY), 12);
        out.put_ascii(b"\"");
    } else {
        out.put_str("null");
    }
    out.put_str(",\"user_api_key_org_id\":null,\"user_api_key_user_id\":\"");
    push_user_id(out, ex.account);
    out.put_str("\",\"user_api_key_team_alias\":null,\"user_api_key_user_email\":null,\"user_api_key_end_user_id\":null,\"user_api_key_request_route\":\"");
    out.put_str(endpoint(ex));
    out.put_str("\",\"user_api_key_spend\":0.0,\"user_api_key_max_budget\":");
    push_cost_e8(out, ex.tier.limits().budget_e8);
    out.put_str(",\"user_api_key_budget_reset_at\":null,\"user_api_key_user_spend\":null,\"user_api_key_user_max_budget\":null,\"spend_logs_metadata\":null,\"requester_ip_address\":\"");
    push_ipv4(out, ex.ip);
    out.put_str("\",\"requester_metadata\":{},\"requester_custom_headers\":{},\"prompt_management_metadata\":null,\"mcp_tool_call_metadata\":null,\"vector_store_request_metadata\":null,\"applied_guardrails\":[],\"usage_object\":{\"completion_tokens\":");
    push_u64(out, u64::from(ex.completion_tokens));
    out.put_str(",\"prompt_tokens\":");
    push_u64(out, u64::from(ex.prompt_tokens));
    out.put_str(",\"total_tokens\":");
    push_u64(out, total_tokens(ex));
    out.put_str(
        ",\"completion_tokens_details\":null,\"prompt_tokens_details\":null},\"user_agent\":\"",
    );
    out.put_str(USER_AGENTS[usize::from(ex.user_agent)]);
    out.put_str("\"},\"cache_hit\":false,\"cache_key\":null,\"saved_cache_cost\":0.0,\"request_tags\":[],\"end_user\":\"\",\"requester_ip_address\":\"");
    push_ipv4(out, ex.ip);
    if payloads {
        out.put_str("\",\"messages\":[{\"role\":\"user\",\"content\":\"");
        push_prompt(out, ex, Esc::Once);
        out.put_str("\"}],\"response\":");
    } else {
        out.put_str("\",\"messages\":\"");
        out.put_str(LITELLM_REDACTED);
        out.put_str("\",\"response\":");
    }
    if is_error(ex) {
        out.put_str("{}");
    } else if ex.embeddings {
        out.put_str(
            "{\"object\":\"list\",\"data\":[{\"object\":\"embedding\",\"index\":0}],\"model\":\"",
        );
        out.put_str(snapshot);
        out.put_str("\",\"usage\":{\"prompt_tokens\":");
        push_u64(out, u64::from(ex.prompt_tokens));
        out.put_str(",\"total_tokens\":");
        push_u64(out, u64::from(ex.prompt_tokens));
        out.put_str("}}");
    } else {
        out.put_str("{\"id\":\"");
        push_completion_id(out, ex);
        out.put_str("\",\"created\":");
        push_u64(out, ex.at_ms.max(0) as u64 / 1000);
        out.put_str(",\"model\":\"");
        out.put_str(snapshot);
        out.put_str("\",\"object\":\"chat.completion\",\"system_fingerprint\":\"fp_");
        push_hex(out, mix64(u64::from(ex.model)), 10);
        out.put_str(
            "\",\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"message\":{\"content\":\"",
        );
        if payloads {
            push_completion(out, ex, Esc::Once);
        } else {
            out.put_str(LITELLM_REDACTED);
        }
        out.put_str("\",\"role\":\"assistant\",\"tool_calls\":null,\"function_call\":null}}],\"usage\":{\"completion_tokens\":");
        push_u64(out, u64::from(ex.completion_tokens));
        out.put_str(",\"prompt_tokens\":");
        push_u64(out, u64::from(ex.prompt_tokens));
        out.put_str(",\"total_tokens\":");
        push_u64(out, total_tokens(ex));
        out.put_str("}}");
    }
    if is_error(ex) {
        let (class, _, message) = error_words(ex.status);
        out.put_str(",\"error_str\":\"litellm.");
        out.put_str(class);
        out.put_str(": ");
        out.put_str(message);
        out.put_str("\",\"error_information\":{\"error_code\":\"");
        push_u64(out, u64::from(ex.status));
        out.put_str("\",\"error_class\":\"");
        out.put_str(class);
        out.put_str("\",\"llm_provider\":\"");
        out.put_str(p.name);
        out.put_str("\",\"traceback\":\"\",\"error_message\":\"");
        out.put_str(message);
        out.put_str("\"}");
    } else {
        out.put_str(",\"error_str\":null,\"error_information\":{\"error_code\":\"\",\"error_class\":\"\",\"llm_provider\":\"\",\"traceback\":\"\",\"error_message\":\"\"}");
    }
    out.put_str(",\"model_parameters\":{\"stream\":false},\"hidden_params\":{\"model_id\":\"");
    push_hex(out, mix64(u64::from(ex.model) ^ SALT_HASH), 16);
    out.put_str("\",\"cache_key\":null,\"api_base\":\"");
    out.put_str(p.api_base);
    out.put_str("\",\"response_cost\":");
    match cost {
        Some(c) => push_cost_e8(out, c),
        None => out.put_str("null"),
    }
    out.put_str(",\"litellm_overhead_time_ms\":");
    push_milli(out, 1500 + jitter % 9000);
    out.put_str(",\"batch_models\":null,\"litellm_model_name\":\"");
    out.put_str(snapshot);
    out.put_str("\"},\"guardrail_information\":null,\"standard_built_in_tools_params\":{\"web_search_options\":null,\"file_search\":null}}\n");
}

// ---------------------------------------------------------------------------
// Kong: `kong.log.serialize()` (kong/pdk/log.lua) and the `ai` section.

/// Which `ai` shape a key's records have: Kong 3.6, 3.7, 3.8 or 3.9+.
fn kong_version(key: u32) -> usize {
    (key % 4) as usize
}

const KONG_VERSIONS: [&str; 4] = ["3.6.1", "3.7.1", "3.8.0", "3.9.1"];

/// Whether a key's route logs request and response bodies
/// (`logging.log_payloads`): three keys in four.
fn kong_logs_payloads(key: u32) -> bool {
    mix32(key ^ 0x5bd1_e995) & 3 != 0
}

fn kong(ex: &Exchange, payloads: bool, out: &mut impl Sink) {
    let p = provider(ex.model);
    let version = kong_version(ex.key);
    let jitter = mix64(ex.request_id ^ SALT_TRACE);
    let latency = u64::from(ex.latency_ms);
    let kong_ms = (1 + jitter % 3).min(latency);
    let receive_ms = ((jitter >> 8) % 2).min(latency - kong_ms);
    let proxy_ms = latency - kong_ms - receive_ms;
    let rejected = ex.status == 429;
    let code = account_code(ex.account);
    out.put_str("{\"request\":{\"id\":\"");
    push_hex(out, mix64(ex.request_id ^ SALT_REQUEST), 16);
    push_hex(out, ex.request_id, 16);
    out.put_str("\",\"uri\":\"");
    out.put_str(endpoint(ex));
    out.put_str("\",\"url\":\"https://");
    out.put_str(GATEWAY_HOST);
    out.put_str(endpoint(ex));
    out.put_str("\",\"method\":\"POST\",\"size\":");
    push_u64(out, request_bytes(ex) + 310);
    out.put_str(",\"querystring\":{},\"headers\":{\"host\":\"");
    out.put_str(GATEWAY_HOST);
    out.put_str("\",\"user-agent\":\"");
    out.put_str(USER_AGENTS[usize::from(ex.user_agent)]);
    out.put_str("\",\"content-type\":\"application/json\",\"content-length\":\"");
    push_u64(out, request_bytes(ex));
    out.put_str("\",\"accept\":\"application/json\",\"accept-encoding\":\"gzip, deflate\",\"connection\":\"keep-alive\",");
    // key-auth reads the `apikey` header; clients of OpenAI's SDKs send the
    // key as a bearer token instead, which Kong redacts.
    if ex.key & 4 == 0 {
        out.put_str("\"apikey\":\"");
        push_secret(out, ex.key);
    } else {
        out.put_str("\"authorization\":\"REDACTED");
    }
    out.put_str("\"},\"tls\":{\"version\":\"TLSv1.3\",\"cipher\":\"TLS_AES_256_GCM_SHA384\",\"client_verify\":\"NONE\"}},\"upstream_uri\":\"");
    out.put_str(endpoint(ex));
    out.put_str("\",");
    if !rejected {
        out.put_str("\"upstream_status\":\"");
        push_u64(out, u64::from(ex.status));
        out.put_str("\",");
    }
    out.put_str("\"response\":{\"status\":");
    push_u64(out, u64::from(ex.status));
    out.put_str(",\"size\":");
    push_u64(out, response_bytes(ex) + 380);
    out.put_str(",\"headers\":{\"content-type\":\"application/json\",\"content-length\":\"");
    push_u64(out, response_bytes(ex));
    out.put_str("\",\"connection\":\"keep-alive\",\"via\":\"1.1 kong/");
    out.put_str(KONG_VERSIONS[version]);
    out.put_str("\",\"x-kong-upstream-latency\":\"");
    push_u64(out, proxy_ms);
    out.put_str("\",\"x-kong-proxy-latency\":\"");
    push_u64(out, kong_ms);
    out.put_str("\",\"x-kong-request-id\":\"");
    push_hex(out, mix64(ex.request_id ^ SALT_REQUEST), 16);
    push_hex(out, ex.request_id, 16);
    out.put_str("\",\"x-kong-llm-model\":\"");
    out.put_str(p.name);
    out.put_ascii(b"/");
    out.put_str(MODELS[usize::from(ex.model)].name);
    out.put_str("\"}},\"latencies\":{\"kong\":");
    push_u64(out, kong_ms);
    out.put_str(",\"proxy\":");
    push_u64(out, proxy_ms);
    out.put_str(",\"request\":");
    push_u64(out, latency);
    out.put_str(",\"receive\":");
    push_u64(out, receive_ms);
    out.put_str("},\"tries\":[");
    if !rejected {
        out.put_str("{\"balancer_start\":");
        push_u64(out, ex.at_ms.max(0) as u64 + kong_ms);
        out.put_str(",\"balancer_start_ns\":");
        push_u64(
            out,
            (ex.at_ms.max(0) as u64 + kong_ms) * 1_000_000 + jitter % 1_000_000,
        );
        out.put_str(",\"ip\":\"");
        out.put_str(p.ip);
        out.put_str("\",\"balancer_latency\":0,\"port\":443,\"balancer_latency_ns\":");
        push_u64(out, 9_000 + (jitter >> 20) % 40_000);
        out.put_ascii(b"}");
    }
    out.put_str("],\"route\":{\"id\":\"");
    push_uuid(out, 0x726f_7574_6500 | p.n);
    out.put_str("\",\"name\":\"");
    out.put_str(p.name);
    out.put_str("-llm\",\"paths\":[\"/v1\"],\"protocols\":[\"https\"],\"methods\":[\"POST\"],\"strip_path\":false,\"preserve_host\":false,\"request_buffering\":true,\"response_buffering\":true,\"regex_priority\":0,\"https_redirect_status_code\":426,\"path_handling\":\"v0\",\"service\":{\"id\":\"");
    push_uuid(out, 0x7365_7276_6900 | p.n);
    out.put_str("\"},\"ws_id\":\"");
    push_uuid(out, 0x7773);
    out.put_str("\",\"created_at\":");
    push_u64(out, CONFIG_CREATED_S);
    out.put_str(",\"updated_at\":");
    push_u64(out, CONFIG_CREATED_S + 86_400);
    out.put_str(",\"tags\":[\"ai\"]},\"service\":{\"id\":\"");
    push_uuid(out, 0x7365_7276_6900 | p.n);
    out.put_str("\",\"name\":\"");
    out.put_str(p.name);
    out.put_str("\",\"host\":\"");
    out.put_str(p.host);
    out.put_str("\",\"port\":443,\"protocol\":\"https\",\"retries\":5,\"connect_timeout\":60000,\"read_timeout\":60000,\"write_timeout\":60000,\"enabled\":true,\"ws_id\":\"");
    push_uuid(out, 0x7773);
    out.put_str("\",\"created_at\":");
    push_u64(out, CONFIG_CREATED_S);
    out.put_str(",\"updated_at\":");
    push_u64(out, CONFIG_CREATED_S);
    out.put_str("},\"client_ip\":\"");
    push_ipv4(out, ex.ip);
    out.put_str("\",\"started_at\":");
    push_u64(out, ex.at_ms.max(0) as u64);
    out.put_str(",\"source\":\"");
    out.put_str(if rejected { "kong" } else { "upstream" });
    out.put_str("\",\"workspace\":\"");
    push_uuid(out, 0x7773);
    out.put_str("\",\"workspace_name\":\"default\",\"consumer\":{\"id\":\"");
    push_uuid(out, code ^ SALT_CONSUMER);
    // Half the consumers have a custom id (the operator's own account id,
    // which the adapter prefers); the others are named by their username.
    if mix64(code ^ SALT_ENTITY) & 1 == 0 {
        out.put_str("\",\"username\":\"user-");
        push_hex(out, mix64(code ^ SALT_ENTITY), 8);
        out.put_str("\",\"custom_id\":\"");
        push_user_id(out, ex.account);
    } else {
        out.put_str("\",\"username\":\"");
        push_user_id(out, ex.account);
    }
    out.put_str("\",\"created_at\":");
    push_u64(out, CONFIG_CREATED_S);
    out.put_str(",\"updated_at\":");
    push_u64(out, CONFIG_CREATED_S);
    out.put_str(",\"type\":0,\"tags\":null},\"authenticated_entity\":{\"id\":\"");
    push_uuid(out, u64::from(ex.key) ^ SALT_CREDENTIAL);
    out.put_str("\",\"consumer_id\":{\"id\":\"");
    push_uuid(out, code ^ SALT_CONSUMER);
    out.put_str("\"}},\"ai\":{");
    kong_ai(
        ex,
        out,
        version,
        jitter,
        payloads && kong_logs_payloads(ex.key),
    );
    out.put_str("}}\n");
}

/// The inside of the `ai` object, in the shape of Kong `version` (0: 3.6,
/// 1: 3.7, 2: 3.8, 3: 3.9+).
/// `payloads`: whether the key's route logs bodies.
fn kong_ai(ex: &Exchange, out: &mut impl Sink, version: usize, jitter: u64, payloads: bool) {
    let p = provider(ex.model);
    let prompt = u64::from(ex.prompt_tokens);
    let completion = u64::from(ex.completion_tokens);
    let latency = u64::from(ex.latency_ms);
    let plugin_id = 0x70_6c75_6769_6e00 | p.n;
    match version {
        0 => out.put_str("\"usage\":{\"prompt_tokens\":"),
        1 => out.put_str("\"ai-proxy\":{\"usage\":{\"prompt_token\":"),
        2 => out.put_str("\"ai-proxy\":{\"usage\":{\"prompt_tokens\":"),
        _ => out.put_str("\"proxy\":{\"usage\":{\"prompt_tokens\":"),
    }
    push_u64(out, prompt);
    out.put_str(if version == 1 {
        ",\"completion_token\":"
    } else {
        ",\"completion_tokens\":"
    });
    push_u64(out, completion);
    out.put_str(",\"total_tokens\":");
    push_u64(out, prompt + completion);
    match version {
        0 => {
            out.put_str(",\"processing_time\":");
            push_milli(out, latency);
        }
        1 => {}
        _ => {
            out.put_str(",\"time_per_token\":");
            push_milli(out, latency * 1000 / completion.max(1));
            if version == 3 {
                out.put_str(",\"time_to_first_token\":");
                push_u64(out, first_token_ms(ex));
            }
            // The admin priced the route's models when the gateway priced
            // the exchange; else Kong writes 0.
            out.put_str(",\"cost\":");
            push_cost_e8(out, priced_cost(ex).unwrap_or(0));
            if version == 3 {
                out.put_str(",\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}");
            }
        }
    }
    out.put_str("},\"meta\":{\"request_model\":\"");
    out.put_str(MODELS[usize::from(ex.model)].name);
    out.put_str("\",\"response_model\":\"");
    out.put_str(SNAPSHOTS[usize::from(ex.model)]);
    out.put_str("\",\"provider_name\":\"");
    out.put_str(p.name);
    out.put_ascii(b"\"");
    if version >= 1 {
        out.put_str(",\"plugin_id\":\"");
        push_uuid(out, plugin_id);
        out.put_ascii(b"\"");
    }
    if version >= 2 {
        out.put_str(",\"llm_latency\":");
        push_u64(out, latency.saturating_sub(2 + jitter % 3));
    }
    if version == 3 {
        out.put_str(",\"request_mode\":\"oneshot\"");
    }
    out.put_ascii(b"}");
    if version == 2 {
        out.put_str(",\"cache\":{}");
    }
    if payloads {
        out.put_str(",\"payload\":{\"request\":\"{\\\"model\\\":\\\"");
        out.put_str(MODELS[usize::from(ex.model)].name);
        if ex.embeddings {
            out.put_str("\\\",\\\"input\\\":\\\"");
            push_prompt(out, ex, Esc::Twice);
            out.put_str("\\\"}\",\"response\":\"");
        } else {
            out.put_str("\\\",\\\"messages\\\":[{\\\"role\\\":\\\"user\\\",\\\"content\\\":\\\"");
            push_prompt(out, ex, Esc::Twice);
            out.put_str("\\\"}]}\",\"response\":\"");
        }
        if is_error(ex) {
            let (_, code, message) = error_words(ex.status);
            out.put_str("{\\\"error\\\":{\\\"message\\\":\\\"");
            out.put_str(message);
            out.put_str("\\\",\\\"type\\\":\\\"");
            out.put_str(code);
            out.put_str("\\\"}}");
        } else if ex.embeddings {
            out.put_str("{\\\"object\\\":\\\"list\\\",\\\"data\\\":[{\\\"object\\\":\\\"embedding\\\",\\\"index\\\":0}]}");
        } else {
            out.put_str("{\\\"id\\\":\\\"");
            push_completion_id(out, ex);
            out.put_str("\\\",\\\"object\\\":\\\"chat.completion\\\",\\\"model\\\":\\\"");
            out.put_str(SNAPSHOTS[usize::from(ex.model)]);
            out.put_str("\\\",\\\"choices\\\":[{\\\"index\\\":0,\\\"message\\\":{\\\"role\\\":\\\"assistant\\\",\\\"content\\\":\\\"");
            push_completion(out, ex, Esc::Twice);
            out.put_str("\\\"},\\\"finish_reason\\\":\\\"stop\\\"}]}");
        }
        out.put_ascii(b"\"}");
    }
    if version >= 1 {
        out.put_ascii(b"}");
    }
}

// ---------------------------------------------------------------------------
// APISIX: `get_full_log` (apisix/utils/log-util.lua) with ai-proxy's
// `llm_summary` and, with `logging.payloads`, `llm_request` and
// `llm_response_text`.

fn apisix(ex: &Exchange, payloads: bool, out: &mut impl Sink) {
    let p = provider(ex.model);
    let jitter = mix64(ex.request_id ^ SALT_TRACE);
    let latency = u64::from(ex.latency_ms);
    let own_ms = (2 + jitter % 6).min(latency);
    out.put_str("{\"latency\":");
    push_u64(out, latency);
    out.put_str(".0000");
    push_padded(out, jitter % 1_000_000, 6);
    out.put_str(",\"request\":{\"querystring\":{},\"headers\":{\"host\":\"");
    out.put_str(GATEWAY_HOST);
    out.put_str(":9443\",\"user-agent\":\"");
    out.put_str(USER_AGENTS[usize::from(ex.user_agent)]);
    out.put_str("\",\"content-type\":\"application/json\",\"content-length\":\"");
    push_u64(out, request_bytes(ex));
    out.put_str("\",\"accept\":\"application/json\",\"accept-encoding\":\"gzip, deflate\",\"connection\":\"keep-alive\",\"apikey\":\"");
    push_secret(out, ex.key);
    out.put_str("\"},\"method\":\"POST\",\"size\":");
    push_u64(out, request_bytes(ex) + 260);
    out.put_str(",\"uri\":\"");
    out.put_str(endpoint(ex));
    out.put_str("\",\"url\":\"https://");
    out.put_str(GATEWAY_HOST);
    out.put_str(":9443");
    out.put_str(endpoint(ex));
    out.put_str("\"},\"response\":{\"headers\":{\"content-type\":\"application/json\",\"content-length\":\"");
    push_u64(out, response_bytes(ex));
    out.put_str("\",\"connection\":\"close\",\"server\":\"APISIX/3.16.0\"},\"status\":");
    push_u64(out, u64::from(ex.status));
    out.put_str(",\"size\":");
    push_u64(out, response_bytes(ex) + 190);
    out.put_str("},\"route_id\":\"ai-");
    out.put_str(p.name);
    out.put_str("\",\"client_ip\":\"");
    push_ipv4(out, ex.ip);
    out.put_str("\",\"server\":{\"hostname\":\"apisix-gw-");
    push_hex(out, jitter >> 40, 4);
    out.put_str("\",\"version\":\"3.16.0\"},\"apisix_latency\":");
    push_u64(out, own_ms);
    out.put_str(".0000");
    push_padded(out, (jitter >> 20) % 1_000_000, 6);
    out.put_str(",\"service_id\":\"\",\"upstream_latency\":");
    push_u64(out, latency - own_ms);
    out.put_str(",\"start_time\":");
    push_u64(out, ex.at_ms.max(0) as u64);
    out.put_str(",\"upstream\":\"");
    out.put_str(p.ip);
    out.put_str(":443\",\"consumer\":{\"username\":\"");
    push_user_id(out, ex.account);
    out.put_str("\"},\"llm_summary\":{\"request_model\":\"");
    out.put_str(MODELS[usize::from(ex.model)].name);
    out.put_str("\",\"model\":\"");
    out.put_str(SNAPSHOTS[usize::from(ex.model)]);
    out.put_str("\",\"duration\":");
    push_u64(out, first_token_ms(ex));
    out.put_str(",\"prompt_tokens\":");
    push_u64(out, u64::from(ex.prompt_tokens));
    out.put_str(",\"completion_tokens\":");
    push_u64(out, u64::from(ex.completion_tokens));
    out.put_str(",\"total_tokens\":");
    push_u64(out, total_tokens(ex));
    out.put_str(",\"upstream_response_time\":");
    push_u64(out, latency - own_ms);
    out.put_str(",\"stream\":false,\"tool_count\":0,\"has_tool_calls\":false,\"end_user_id\":\"\",\"cache_read_input_tokens\":0,\"cache_creation_input_tokens\":0,\"reasoning_tokens\":0}");
    if payloads {
        out.put_str(",\"llm_request\":{\"messages\":[{\"role\":\"user\",\"content\":\"");
        push_prompt(out, ex, Esc::Once);
        out.put_str("\"}],\"stream\":false}");
    }
    if payloads && !is_error(ex) && !ex.embeddings {
        out.put_str(",\"llm_response_text\":{\"content\":\"");
        push_completion(out, ex, Esc::Once);
        out.put_str("\"}");
    }
    out.put_str("}\n");
}

// ---------------------------------------------------------------------------
// Envoy AI Gateway: the access-log entry of its documented JSON format,
// plus the `x-tenant-id` request header the operator logs (`%REQ(...)%`).

fn envoy(ex: &Exchange, out: &mut impl Sink) {
    let p = provider(ex.model);
    let jitter = mix64(ex.request_id ^ SALT_TRACE);
    let latency = u64::from(ex.latency_ms);
    let rejected = ex.status == 429;
    out.put_str("{\":authority\":\"");
    out.put_str(GATEWAY_HOST);
    out.put_str("\",\"bytes_received\":");
    push_u64(out, request_bytes(ex));
    out.put_str(",\"bytes_sent\":");
    push_u64(out, response_bytes(ex));
    out.put_str(",\"connection_termination_details\":null,\"downstream_local_address\":\"10.42.0.17:10080\",\"downstream_remote_address\":\"");
    push_ipv4(out, ex.ip);
    out.put_ascii(b":");
    push_u64(out, 1024 + jitter % 64_000);
    out.put_str("\",\"duration\":");
    push_u64(out, latency);
    out.put_str(",\"gen_ai.provider.name\":\"default/");
    out.put_str(p.name);
    out.put_str("/route/ai-gateway/rule/0/ref/0\",\"gen_ai.request.model\":\"");
    out.put_str(MODELS[usize::from(ex.model)].name);
    out.put_str("\",\"gen_ai.request.model_override\":null,\"gen_ai.response.model\":\"");
    out.put_str(SNAPSHOTS[usize::from(ex.model)]);
    out.put_str("\",\"gen_ai.usage.input_tokens\":");
    push_u64(out, u64::from(ex.prompt_tokens));
    out.put_str(",\"gen_ai.usage.output_tokens\":");
    push_u64(out, u64::from(ex.completion_tokens));
    out.put_str(",\"gen_ai.usage.total_tokens\":");
    push_u64(out, total_tokens(ex));
    out.put_str(",\"method\":\"POST\",\"protocol\":\"HTTP/1.1\",\"requested_server_name\":null,\"response_code\":");
    push_u64(out, u64::from(ex.status));
    out.put_str(",\"response_code_details\":\"");
    out.put_str(if rejected {
        "request_rate_limited"
    } else {
        "via_upstream"
    });
    out.put_str("\",\"response_flags\":\"");
    out.put_str(if rejected { "RL" } else { "-" });
    out.put_str(
        "\",\"route_name\":\"httproute/default/ai-gateway/rule/0/match/0/*\",\"start_time\":\"",
    );
    push_rfc3339(out, ex.at_ms);
    out.put_str("\",\"upstream_cluster\":\"httproute/default/ai-gateway/rule/");
    push_u64(out, p.n - 1);
    out.put_str("\",\"upstream_host\":");
    if rejected {
        out.put_str("null");
    } else {
        out.put_ascii(b"\"");
        out.put_str(p.ip);
        out.put_str(":443\"");
    }
    out.put_str(",\"upstream_local_address\":");
    if rejected {
        out.put_str("null");
    } else {
        out.put_str("\"10.42.0.17:");
        push_u64(out, 32_768 + (jitter >> 20) % 28_000);
        out.put_ascii(b"\"");
    }
    out.put_str(",\"upstream_transport_failure_reason\":null,\"user-agent\":\"");
    out.put_str(USER_AGENTS[usize::from(ex.user_agent)]);
    out.put_str("\",\"x-envoy-origin-path\":\"");
    out.put_str(endpoint(ex));
    out.put_str("\",\"x-envoy-upstream-service-time\":");
    if rejected {
        out.put_str("null");
    } else {
        out.put_ascii(b"\"");
        push_u64(out, latency.saturating_sub(1 + jitter % 4));
        out.put_ascii(b"\"");
    }
    out.put_str(",\"x-forwarded-for\":\"");
    push_ipv4(out, ex.ip);
    out.put_str("\",\"x-request-id\":\"");
    push_uuid(out, ex.request_id ^ SALT_REQUEST);
    out.put_str("\",\"x-tenant-id\":\"");
    push_user_id(out, ex.account);
    out.put_str("\"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::{BTreeMap, BTreeSet};

    fn cfg(seed: u64) -> SimConfig {
        SimConfig {
            users: 120,
            hours: 4.0,
            seed,
            split_fraction: 0.0,
            ..SimConfig::default()
        }
    }

    fn lines(cfg: SimConfig, format: LogFormat) -> Vec<String> {
        lines_with(cfg, format, true)
    }

    fn lines_with(cfg: SimConfig, format: LogFormat, payloads: bool) -> Vec<String> {
        let mut sim = Simulator::new(cfg)
            .with_format(format)
            .with_payloads(payloads);
        let mut out = String::new();
        let mut lines = Vec::new();
        while sim.next_record(&mut out).is_some() {
            assert!(
                out.ends_with('\n') && out.matches('\n').count() == 1,
                "{out}"
            );
            lines.push(out.trim_end().to_string());
            out.clear();
        }
        lines
    }

    fn at<'v>(v: &'v Value, path: &str) -> &'v Value {
        path.split('.')
            .fold(v, |v, k| v.get(k).unwrap_or(&Value::Null))
    }

    fn text(v: &Value) -> &str {
        v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
    }

    /// What a gateway record says about its exchange, read where each
    /// gateway puts it: (user, prompt tokens, completion tokens, status,
    /// latency ms, prompt text if logged).
    fn facts(format: LogFormat, v: &Value) -> (String, u64, u64, u64, u64, Option<String>) {
        let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
        match format {
            LogFormat::Canonical => unreachable!(),
            LogFormat::Litellm => {
                let status = match text(&v["status"]) {
                    "success" => 200,
                    _ => text(at(v, "error_information.error_code")).parse().unwrap(),
                };
                let start = v["startTime"].as_f64().unwrap() * 1000.0;
                let end = v["endTime"].as_f64().unwrap() * 1000.0;
                (
                    text(at(v, "metadata.user_api_key_user_id")).to_string(),
                    n(&v["prompt_tokens"]),
                    n(&v["completion_tokens"]),
                    status,
                    (end.round() - start.round()) as u64,
                    v["messages"][0]["content"].as_str().map(String::from),
                )
            }
            LogFormat::Kong => {
                let consumer = &v["consumer"];
                let user = consumer.get("custom_id").unwrap_or(&consumer["username"]);
                let ai = &v["ai"];
                let block = ["proxy", "ai-proxy"]
                    .iter()
                    .find_map(|k| ai.get(*k))
                    .unwrap_or(ai);
                let usage = &block["usage"];
                let pt = usage.get("prompt_tokens").unwrap_or(&usage["prompt_token"]);
                let ct = usage
                    .get("completion_tokens")
                    .unwrap_or(&usage["completion_token"]);
                let prompt = block.get("payload").map(|p| {
                    let body: Value = serde_json::from_str(text(&p["request"])).unwrap();
                    let content = body
                        .get("messages")
                        .map(|m| &m[0]["content"])
                        .unwrap_or(&body["input"]);
                    text(content).to_string()
                });
                (
                    text(user).to_string(),
                    n(pt),
                    n(ct),
                    n(at(v, "response.status")),
                    n(at(v, "latencies.request")),
                    prompt,
                )
            }
            LogFormat::Apisix => (
                text(at(v, "consumer.username")).to_string(),
                n(at(v, "llm_summary.prompt_tokens")),
                n(at(v, "llm_summary.completion_tokens")),
                n(at(v, "response.status")),
                v["latency"].as_f64().unwrap().round() as u64,
                v["llm_request"]["messages"][0]["content"]
                    .as_str()
                    .map(String::from),
            ),
            LogFormat::EnvoyAiGateway => (
                text(&v["x-tenant-id"]).to_string(),
                n(&v["gen_ai.usage.input_tokens"]),
                n(&v["gen_ai.usage.output_tokens"]),
                n(&v["response_code"]),
                n(&v["duration"]),
                None,
            ),
        }
    }

    #[test]
    fn names_round_trip() {
        for f in LogFormat::ALL {
            assert_eq!(f.as_str().parse::<LogFormat>(), Ok(f));
            assert_eq!(f.to_string(), f.as_str());
        }
        assert!("auto".parse::<LogFormat>().is_err());
        assert!(!LogFormat::Canonical.is_gateway() && LogFormat::Kong.is_gateway());
    }

    /// Every gateway record is one JSON object holding its exchange's
    /// account, tokens, status and latency where that gateway logs them,
    /// record for record with the canonical run of the same seed; equal
    /// fingerprints give equal prompt text.
    #[test]
    fn every_format_carries_the_canonical_exchanges() {
        let canonical: Vec<Value> = lines(cfg(3), LogFormat::Canonical)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(canonical.len() > 1000, "{}", canonical.len());
        assert!(canonical
            .iter()
            .any(|c| c["status"].as_u64().unwrap() >= 400));
        for format in &LogFormat::ALL[1..] {
            let got = lines(cfg(3), *format);
            assert_eq!(got.len(), canonical.len(), "{format}");
            let mut prompts: BTreeMap<&str, String> = BTreeMap::new();
            let mut texts = 0;
            for (line, c) in got.iter().zip(&canonical) {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{format}: {e}\n{line}"));
                let (user, pt, ct, status, latency, prompt) = facts(*format, &v);
                let want = (
                    text(&c["user_id"]).to_string(),
                    c["prompt_tokens"].as_u64().unwrap(),
                    c["completion_tokens"].as_u64().unwrap(),
                    c["status"].as_u64().unwrap(),
                    c["latency_ms"].as_u64().unwrap(),
                );
                assert_eq!((user, pt, ct, status, latency), want, "{format}: {line}");
                if let (Some(p), Some(fp)) = (prompt, c["prompt_fingerprint"].as_str()) {
                    texts += 1;
                    let first = prompts.entry(fp).or_insert_with(|| p.clone());
                    assert_eq!(*first, p, "{format}: fingerprint {fp} with two texts");
                }
                if let Some(raw) = c["prompt"].as_str() {
                    let (_, _, _, _, _, p) = facts(*format, &v);
                    if let Some(p) = p {
                        assert_eq!(p, raw, "{format}: the raw prompt is logged as is");
                    }
                }
            }
            if *format != LogFormat::EnvoyAiGateway {
                // Kong logs bodies on three keys in four (more on some).
                assert!(texts > got.len() / 3, "{format}: {texts} of {}", got.len());
                assert!(prompts.len() < texts, "{format}: some prompts repeat");
            }
        }
    }

    #[test]
    fn without_payloads_the_counts_stand_and_no_record_names_a_prompt() {
        let canonical: Vec<Value> = lines(cfg(4), LogFormat::Canonical)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for format in [LogFormat::Litellm, LogFormat::Kong, LogFormat::Apisix] {
            let got = lines_with(cfg(4), format, false);
            assert_eq!(got.len(), canonical.len(), "{format}");
            let with = lines(cfg(4), format);
            let size = |ls: &[String]| ls.iter().map(|l| l.len()).sum::<usize>();
            assert!(
                size(&got) * 2 < size(&with),
                "{format}: bodies are most of the bytes"
            );
            for (line, c) in got.iter().zip(&canonical) {
                let v: Value = serde_json::from_str(line).unwrap();
                let (user, pt, ct, status, _, prompt) = facts(format, &v);
                assert_eq!(user, text(&c["user_id"]), "{format}");
                assert_eq!(pt, c["prompt_tokens"].as_u64().unwrap(), "{format}");
                assert_eq!(ct, c["completion_tokens"].as_u64().unwrap(), "{format}");
                assert_eq!(status, c["status"].as_u64().unwrap(), "{format}");
                assert_eq!(prompt, None, "{format}: {line}");
                if format == LogFormat::Litellm {
                    assert_eq!(v["messages"], LITELLM_REDACTED, "{line}");
                }
            }
        }
    }

    #[test]
    fn prompt_text_has_about_the_prompts_size_and_the_same_seed_the_same_text() {
        for chars in [1, 40, 1000, 20_000] {
            let mut a = String::new();
            push_text(&mut a, 42, chars, Esc::Once);
            let mut b = String::new();
            push_text(&mut b, 42, chars, Esc::Once);
            assert_eq!(a, b);
            let len = serde_json::from_str::<String>(&format!("\"{a}\""))
                .unwrap()
                .len() as u32;
            assert!(len >= chars && len < chars + 12, "{chars}: {len}");
            let mut twice = String::new();
            push_text(&mut twice, 42, chars, Esc::Twice);
            let inner: String = serde_json::from_str(&format!("\"{twice}\"")).unwrap();
            assert_eq!(
                inner, a,
                "escaped twice, unescaped once: the once-escaped text"
            );
        }
        let mut other = String::new();
        push_text(&mut other, 43, 1000, Esc::Once);
        let mut a = String::new();
        push_text(&mut a, 42, 1000, Esc::Once);
        assert_ne!(a, other);
    }

    #[test]
    fn kong_has_every_ai_shape_and_records_with_and_without_payloads() {
        let mut shapes = BTreeSet::new();
        let (mut with, mut without) = (0, 0);
        for line in lines(cfg(5), LogFormat::Kong) {
            let v: Value = serde_json::from_str(&line).unwrap();
            let ai = v["ai"].as_object().unwrap();
            let shape = if ai.contains_key("usage") {
                "3.6"
            } else if ai.contains_key("proxy") {
                "3.9"
            } else if ai["ai-proxy"]["usage"].get("prompt_token").is_some() {
                "3.7"
            } else {
                assert!(ai["ai-proxy"]["usage"].get("cost").is_some(), "{line}");
                "3.8"
            };
            shapes.insert(shape);
            let has_payload = line.contains("\"payload\":{\"request\"");
            if has_payload {
                with += 1;
            } else {
                without += 1;
            }
        }
        assert_eq!(shapes.len(), 4, "{shapes:?}");
        assert!(with > 2 * without && without > 0, "{with} {without}");
    }

    #[test]
    fn a_gateway_logs_exchanges_even_for_accounts_that_would_split() {
        let split = SimConfig {
            split_fraction: 1.0,
            ..cfg(7)
        };
        let whole = lines(cfg(7), LogFormat::Canonical).len();
        assert!(lines(split.clone(), LogFormat::Canonical).len() > whole);
        for format in &LogFormat::ALL[1..] {
            assert_eq!(lines(split.clone(), *format).len(), whole, "{format}");
        }
    }

    #[test]
    fn sizes_are_like_real_records() {
        for format in LogFormat::ALL {
            let got = lines(cfg(9), format);
            let mean = got.iter().map(|l| l.len()).sum::<usize>() / got.len();
            let min = got.iter().map(|l| l.len()).min().unwrap();
            // Envoy's entry is the documented ~900 bytes; Kong's base record
            // alone is about 2 KB; LiteLLM's payload with its metadata
            // about 2.5 KB before any prompt (a refused login has none).
            let floor = match format {
                LogFormat::Canonical => 250,
                LogFormat::EnvoyAiGateway => 900,
                LogFormat::Apisix => 1000,
                LogFormat::Kong => 2000,
                LogFormat::Litellm => 2400,
            };
            assert!(min >= floor, "{format}: shortest {min} bytes, mean {mean}");
        }
    }
}
