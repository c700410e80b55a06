//! The canonical gateway event (contracts/gateway-event.md, version 1).

use std::borrow::Cow;
use std::net::IpAddr;

/// Which part of a request a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One record for the whole request and response.
    Exchange,
    /// The request arrived: counts the request, its prompt tokens and its prompt.
    Request,
    /// The response finished: counts completion tokens, cost, status and latency.
    Response,
}

impl Phase {
    /// The contract's name of the phase.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Exchange => "exchange",
            Phase::Request => "request",
            Phase::Response => "response",
        }
    }

    /// Whether records of this phase count the request itself (rate, prompt, address).
    pub fn counts_request(self) -> bool {
        self != Phase::Response
    }

    /// Whether records of this phase count the response (completion tokens, cost, status).
    pub fn counts_response(self) -> bool {
        self != Phase::Request
    }
}

/// One decoded gateway record. Strings borrow from the input line unless
/// they had JSON escapes (or were derived from a secret). A raw `api_key` and
/// raw `prompt` text never reach this type: the decoder turns them into
/// keyed hashes (`key_id`, `prompt_fingerprint`) and drops them.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<'a> {
    /// Event time, Unix milliseconds.
    pub ts_ms: i64,
    /// The gateway's unique id of the request.
    pub request_id: Cow<'a, str>,
    /// Which part of the request this record describes.
    pub phase: Phase,
    /// The account that owns the budget.
    pub user_id: Cow<'a, str>,
    /// The API key's public id, or `kh_…` (a keyed hash) when the gateway sent only the raw key.
    pub key_id: Cow<'a, str>,
    /// The plan name, if the record carried one.
    pub tier: Option<Cow<'a, str>>,
    /// The client address.
    pub ip: Option<IpAddr>,
    /// The client address's autonomous system number.
    pub asn: Option<u32>,
    /// The client's user agent.
    pub user_agent: Option<Cow<'a, str>>,
    /// The gateway endpoint called.
    pub endpoint: Option<Cow<'a, str>>,
    /// The model called, used for pricing.
    pub model: Option<Cow<'a, str>>,
    /// HTTP status the gateway returned.
    pub status: Option<u16>,
    /// Input tokens.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub completion_tokens: u64,
    /// The gateway's own cost of the request.
    pub cost_usd: Option<f64>,
    /// Request latency.
    pub latency_ms: Option<u64>,
    /// The gateway's prompt hash, or keywatch's keyed hash of the prompt text.
    pub prompt_fingerprint: Option<Cow<'a, str>>,
    /// Prompt length in characters.
    pub prompt_chars: Option<u64>,
    /// Descriptive fields the decoder cut or dropped because they broke the
    /// contract (too long, the wrong type, NUL or a lone surrogate, a
    /// duplicate): the record is still counted. A bit per field;
    /// `decode::repaired_fields` names them.
    pub repaired: u32,
}

impl<'a> Event<'a> {
    /// The same event owning all its text.
    pub fn into_owned(self) -> Event<'static> {
        let own = |c: Cow<'a, str>| Cow::Owned(c.into_owned());
        Event {
            ts_ms: self.ts_ms,
            request_id: own(self.request_id),
            phase: self.phase,
            user_id: own(self.user_id),
            key_id: own(self.key_id),
            tier: self.tier.map(own),
            ip: self.ip,
            asn: self.asn,
            user_agent: self.user_agent.map(own),
            endpoint: self.endpoint.map(own),
            model: self.model.map(own),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
            latency_ms: self.latency_ms,
            prompt_fingerprint: self.prompt_fingerprint.map(own),
            prompt_chars: self.prompt_chars,
            repaired: self.repaired,
        }
    }

    /// Whether the gateway or the provider refused the request (a status of
    /// 400 or more: a rate limit, an upstream failure, a bad request).
    #[inline]
    pub fn refused(&self) -> bool {
        self.status.is_some_and(|s| s >= 400)
    }

    /// A minimal exchange event, for tests and tools.
    pub fn new(ts_ms: i64, request_id: &'a str, user_id: &'a str, key_id: &'a str) -> Self {
        Event {
            ts_ms,
            request_id: Cow::Borrowed(request_id),
            phase: Phase::Exchange,
            user_id: Cow::Borrowed(user_id),
            key_id: Cow::Borrowed(key_id),
            tier: None,
            ip: None,
            asn: None,
            user_agent: None,
            endpoint: None,
            model: None,
            status: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: None,
            latency_ms: None,
            prompt_fingerprint: None,
            prompt_chars: None,
            repaired: 0,
        }
    }
}
