//! What the gateway adapters share: the [`Format`] a topic is read in, the
//! shape recognition behind `auto`, the split of a message holding a JSON
//! array of records, and `Found`, the fields an adapter gathered, turned
//! into an [`Event`] by one set of rules (which identity wins, the fallback
//! id, a raw secret hashed and dropped).
//!
//! Facts about each gateway's log (field names, units, versions) are in the
//! adapters' modules and in docs/gateways.md.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{char_len, cut, invalid, DecodeError, Decoder, Problem, Raw, Scanner};
use crate::event::Event;
use crate::time::parse_rfc3339;

/// The log format of a topic (or a replayed file).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// keywatch's own event (contracts/gateway-event.md).
    #[default]
    Canonical,
    /// LiteLLM proxy's StandardLoggingPayload (and its older SpendLogs row).
    Litellm,
    /// Kong Gateway's `kong.log.serialize()` record with the AI plugins' `ai` section.
    Kong,
    /// Apache APISIX's logger entry with `ai-proxy`'s `llm_summary`.
    Apisix,
    /// Envoy AI Gateway's access-log entry (`gen_ai.*` attributes).
    EnvoyAiGateway,
    /// Each record's format recognised by its shape.
    Auto,
}

impl Format {
    /// Every format a record can be read as (all but `auto`).
    pub const CONCRETE: [Format; 5] = [
        Format::Canonical,
        Format::Litellm,
        Format::Kong,
        Format::Apisix,
        Format::EnvoyAiGateway,
    ];

    /// The name used in config, flags, summaries and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Canonical => "canonical",
            Format::Litellm => "litellm",
            Format::Kong => "kong",
            Format::Apisix => "apisix",
            Format::EnvoyAiGateway => "envoy-ai-gateway",
            Format::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::CONCRETE
            .into_iter()
            .chain([Format::Auto])
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown format {s:?} (formats: canonical, litellm, kong, apisix, envoy-ai-gateway, auto)"
                )
            })
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the adapters find what a gateway's record does not say itself
/// (`[gateways]` in the config).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayOptions {
    /// A request header (Kong, APISIX: `request.headers.<name>`) or
    /// access-log field (Envoy AI Gateway: the top-level `<name>`) naming
    /// the account when the gateway identified none (no auth plugin ran).
    /// Only for a header the gateway sets or checks itself (a JWT claim, a
    /// tenant header the gateway enforces): a client-chosen header lets a
    /// client spread its requests over made-up accounts.
    pub account_header: Option<String>,
    /// Likewise, the key when the gateway names no credential; without it
    /// the key is a keyed hash of a raw key header, else the account.
    pub key_header: Option<String>,
    /// Count a request whose key has no owner (LiteLLM: no user, team or
    /// org; APISIX: no consumer) to its end user (LiteLLM's `end_user`,
    /// APISIX's `llm_summary.end_user_id`), which the caller sets in the
    /// request body: only where the caller is trusted.
    pub end_user: bool,
    /// Kong: what a non-zero `usage.cost` is.
    pub kong_cost: KongCost,
}

/// What Kong's `usage.cost` means: it is computed from the prices the Kong
/// admin configured, in the admin's currency, and is 0 without them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KongCost {
    /// A non-zero cost is the request's cost in USD (0: priced from keywatch's table).
    #[default]
    Usd,
    /// Never used: every request is priced from keywatch's table.
    Ignore,
}

/// Where a record sits in its stream, for gateways that log no request id
/// (APISIX by default): the record's id is then its place, so a
/// re-delivered message is still recognised as a duplicate.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'o> {
    /// Topic (or file) name.
    pub stream: &'o str,
    /// Partition (0 for a file).
    pub partition: i32,
    /// Offset (line number in a file).
    pub offset: i64,
    /// Index in the message's JSON array, if it held one.
    pub element: Option<u32>,
}

impl Origin<'_> {
    /// A place with no stream: tests and tools.
    pub const NOWHERE: Origin<'static> = Origin {
        stream: "",
        partition: 0,
        offset: 0,
        element: None,
    };

    fn id(&self) -> String {
        let mut s = format!("at:{}/{}/{}", self.stream, self.partition, self.offset);
        if let Some(e) = self.element {
            s.push_str(&format!("/{e}"));
        }
        if s.len() > 128 {
            let (p, o) = (self.partition.to_string(), self.offset.to_string());
            let e = self.element.map(|e| e.to_string()).unwrap_or_default();
            s = format!(
                "at:{}",
                crate::hash::deterministic_id(&[self.stream, &p, &o, &e])
            );
        }
        s
    }
}

/// One record of a message: the whole message, or one element of the JSON
/// array it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A record: its bytes, and its index when it is an array's element.
    Record(&'a [u8], Option<u32>),
    /// The array broke at element `index` (bad JSON there): the bytes
    /// from that element on, and why. The elements before it stand.
    Broken(&'a [u8], u32, DecodeError),
}

/// Splits a message into its records: a message whose first non-blank
/// byte is `[` is a JSON array (Kong's kafka-log and http-log, APISIX's
/// kafka-logger and LiteLLM's generic_api batch this way), any other
/// message is one record. Calls `each` with every piece, in order; an empty
/// array has none.
pub fn split_records<'a>(message: &'a [u8], mut each: impl FnMut(Piece<'a>)) {
    let start = message
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(message.len());
    if message.get(start) != Some(&b'[') {
        each(Piece::Record(message, None));
        return;
    }
    // Bytes that are not UTF-8 break the array where they are: the
    // elements before them stand.
    let valid = match std::str::from_utf8(message) {
        Ok(_) => message.len(),
        Err(e) => e.valid_up_to(),
    };
    let bad_utf8 = |from: usize| {
        DecodeError::new(
            "record",
            Problem::InvalidUtf8 {
                at: valid.saturating_sub(from),
            },
        )
    };
    let mut sc = match Scanner::open(&message[..valid]) {
        Ok(sc) => sc,
        Err(e) => {
            each(Piece::Broken(message, 0, e));
            return;
        }
    };
    sc.i = start + 1;
    // A break at the end of the UTF-8 prefix is the bad byte's.
    let broken = |e: DecodeError, from: usize, at: usize| {
        if valid < message.len() && at >= valid {
            bad_utf8(from)
        } else {
            e
        }
    };
    // After the closing bracket: only white space, and no bad byte.
    let tail = |sc: &mut Scanner<'_>, from: usize| {
        sc.end()?;
        if valid < message.len() {
            return Err(bad_utf8(from));
        }
        Ok(())
    };
    sc.ws();
    if sc.peek() == Some(b']') {
        sc.i += 1;
        if let Err(e) = tail(&mut sc, start) {
            each(Piece::Broken(&message[start..], 0, e));
        }
        return;
    }
    let mut index = 0u32;
    loop {
        sc.ws();
        let from = sc.i;
        if let Err(e) = sc.skip_value(1) {
            let e = broken(e, from, sc.i);
            each(Piece::Broken(&message[from..], index, e));
            return;
        }
        each(Piece::Record(&message[from..sc.i], Some(index)));
        sc.ws();
        match sc.peek() {
            Some(b',') => sc.i += 1,
            Some(b']') => {
                sc.i += 1;
                let after = sc.i;
                if let Err(e) = tail(&mut sc, after) {
                    each(Piece::Broken(&message[after..], index + 1, e));
                }
                return;
            }
            _ => {
                let at = sc.i;
                let e = broken(sc.syntax("',' or ']'"), at, at);
                each(Piece::Broken(&message[at..], index + 1, e));
                return;
            }
        }
        index = index.saturating_add(1);
    }
}

/// The format whose fields a record has: each top-level name that only one
/// format uses is a vote; two votes decide at once, else the most votes
/// when the object ends. A record with none is refused, naming the formats.
pub(super) fn recognise(record: &[u8]) -> Result<Format, DecodeError> {
    let mut sc = Scanner::open(record)?;
    let mut votes = [0u8; 5];
    let mut decided = None;
    let res = sc.fields(|sc, key| {
        if decided.is_some() {
            // Decided: the adapter reads (and checks) the rest.
            return Err(DecodeError::new("record", Problem::Missing));
        }
        let vote = match &*key {
            "ts" | "user_id" | "key_id" | "phase" | "prompt_fingerprint" | "api_key" => Some(0),
            "startTime"
            | "endTime"
            | "litellm_call_id"
            | "call_type"
            | "response_cost"
            | "model_group"
            | "custom_llm_provider"
            | "spend"
            | "hidden_params"
            | "standard_built_in_tools_params" => Some(1),
            "started_at"
            | "latencies"
            | "upstream_uri"
            | "upstream_status"
            | "tries"
            | "authenticated_entity"
            | "ai"
            | "workspace_name" => Some(2),
            "route_id" | "service_id" | "apisix_latency" | "upstream_latency" | "llm_summary"
            | "llm_request" => Some(3),
            "start_time" => Some(if sc.peek() == Some(b'"') { 4 } else { 3 }),
            "response_code"
            | "x-envoy-origin-path"
            | "downstream_remote_address"
            | "x-request-id"
            | "response_flags" => Some(4),
            k if k.starts_with("gen_ai.") || k.starts_with("genai_") => Some(4),
            _ => None,
        };
        if let Some(v) = vote {
            votes[v] += 1;
            if votes[v] >= 2 {
                decided = Some(v);
            }
        }
        sc.skip_value(0)
    });
    if let Some(v) = decided {
        return Ok(Format::CONCRETE[v]);
    }
    res?;
    sc.end()?;
    let best = (0..5).max_by_key(|&i| (votes[i], std::cmp::Reverse(i)));
    match best {
        Some(i) if votes[i] > 0 && votes.iter().filter(|&&n| n == votes[i]).count() == 1 => {
            Ok(Format::CONCRETE[i])
        }
        _ => Err(invalid(
            "record",
            "a record of a known format (canonical, litellm, kong, apisix, envoy-ai-gateway)",
            "none recognised by its fields".to_string(),
        )),
    }
}

/// An identity candidate: where it came from (lower ranks win) and its text.
#[derive(Debug, Default)]
pub(super) struct Slot<'a> {
    best: Option<(u8, Cow<'a, str>)>,
}

impl<'a> Slot<'a> {
    /// Offers `v` at `rank`; the lowest rank offered stands.
    pub(super) fn offer(&mut self, rank: u8, v: Cow<'a, str>) {
        if self.best.as_ref().is_none_or(|(r, _)| rank < *r) {
            self.best = Some((rank, v));
        }
    }

    pub(super) fn get(&self) -> Option<&Cow<'a, str>> {
        self.best.as_ref().map(|(_, v)| v)
    }

    pub(super) fn take(self) -> Option<Cow<'a, str>> {
        self.best.map(|(_, v)| v)
    }

    pub(super) fn is_some(&self) -> bool {
        self.best.is_some()
    }
}

/// What an adapter found in a record, before the shared rules make it an event.
#[derive(Debug, Default)]
pub(super) struct Found<'a> {
    pub(super) ev: Option<Event<'a>>,
    pub(super) ts_ms: Option<i64>,
    pub(super) request_id: Slot<'a>,
    pub(super) user: Slot<'a>,
    pub(super) key: Slot<'a>,
    /// A raw API key the gateway logged: hashed when no key names the
    /// credential, and dropped.
    pub(super) raw_key: Slot<'a>,
    /// The prompt (text or its request body), to fingerprint.
    pub(super) prompt: Option<Cow<'a, str>>,
    pub(super) model: Slot<'a>,
    pub(super) usage: Usage,
}

/// Token counts in the shapes gateways log them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Usage {
    /// OpenAI-style `prompt_tokens` (cached tokens included).
    pub(super) prompt: Option<u64>,
    /// `completion_tokens`, or an `output_tokens`.
    pub(super) completion: Option<u64>,
    /// Anthropic-style `input_tokens`, which excludes the cache…
    pub(super) input: Option<u64>,
    /// …read (`cache_read_input_tokens`)…
    pub(super) cache_read: u64,
    /// …and written (`cache_creation_input_tokens`).
    pub(super) cache_creation: u64,
    /// A `cost` the gateway computed (Kong: from its admin's prices).
    pub(super) cost: f64,
}

impl Usage {
    /// Prompt tokens: `prompt_tokens` when logged, else Anthropic's input
    /// plus its cache reads and writes (its `input_tokens` counts neither).
    pub(super) fn prompt_tokens(&self) -> u64 {
        match (self.prompt, self.input) {
            (Some(p), _) => p,
            (None, Some(i)) => i
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            (None, None) => 0,
        }
    }

    /// Adds another usage block (a second AI plugin's own model call).
    pub(super) fn add(&mut self, other: Usage) {
        let p = self.prompt_tokens().saturating_add(other.prompt_tokens());
        let c = self
            .completion
            .unwrap_or(0)
            .saturating_add(other.completion.unwrap_or(0));
        *self = Usage {
            prompt: Some(p),
            completion: Some(c),
            cost: (self.cost + other.cost).min(f64::MAX),
            ..Usage::default()
        };
    }
}

impl<'a> Scanner<'a> {
    /// Reads a usage object (`prompt_tokens`, `completion_tokens`, their
    /// singular Kong 3.7 spelling, `input_tokens`/`output_tokens`, the
    /// Anthropic cache fields); other fields are skipped. `at` names the
    /// object in errors (`ai.proxy.usage`).
    pub(super) fn usage(&mut self, names: &UsageNames) -> Result<Usage, DecodeError> {
        let mut u = Usage::default();
        let mut seen = 0u8;
        self.fields(|sc, k| {
            let (bit, field) = match &*k {
                "prompt_tokens" | "prompt_token" => (1, names.prompt),
                "completion_tokens" | "completion_token" => (2, names.completion),
                "input_tokens" => (4, names.input),
                "output_tokens" => (8, names.output),
                "cache_read_input_tokens" => (16, names.cache_read),
                "cache_creation_input_tokens" => (32, names.cache_creation),
                "cost" => {
                    if seen & 64 != 0 {
                        return Err(DecodeError::new(names.cost, Problem::Duplicate));
                    }
                    seen |= 64;
                    u.cost = sc.cost(names.cost)?.unwrap_or(0.0);
                    return Ok(());
                }
                _ => return sc.skip_value(0),
            };
            if seen & bit != 0 {
                return Err(DecodeError::new(field, Problem::Duplicate));
            }
            seen |= bit;
            let v = sc.uint(field, true)?;
            match bit {
                1 => u.prompt = v,
                2 => u.completion = u.completion.or(v),
                4 => u.input = v,
                8 => u.completion = u.completion.or(v),
                16 => u.cache_read = v.unwrap_or(0),
                _ => u.cache_creation = v.unwrap_or(0),
            }
            Ok(())
        })?;
        Ok(u)
    }

    /// A required identifier, or `None` for `null` and `""` (gateways
    /// write both for "not known").
    pub(super) fn opt_id(
        &mut self,
        field: &'static str,
    ) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self.peek() {
            Some(b'n') => {
                self.skip_value(0)?;
                Ok(None)
            }
            Some(b'"') if self.b.get(self.i + 1) == Some(&b'"') => {
                self.i += 2;
                Ok(None)
            }
            _ => self.id(field).map(Some),
        }
    }

    /// A descriptive text: cut to `max` characters, or dropped when it is
    /// not a string; the bool says it was changed (to flag the field).
    pub(super) fn text(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<(Option<Cow<'a, str>>, bool), DecodeError> {
        let t = match self.raw(field)? {
            Raw::Str(t) => t,
            Raw::Null => return Ok((None, false)),
            _ => return Ok((None, true)),
        };
        let mangled = self.mangled.take().is_some();
        if t.is_empty() {
            return Ok((None, mangled));
        }
        let (t, was_cut) = cut(t, max);
        Ok((Some(t), mangled || was_cut))
    }

    /// A duration or size in milliseconds that may have a fraction:
    /// rounded; the bool says it was not a non-negative number (dropped).
    pub(super) fn millis(
        &mut self,
        field: &'static str,
    ) -> Result<(Option<u64>, bool), DecodeError> {
        match self.float(field) {
            Ok(None) => Ok((None, false)),
            Ok(Some(v)) if (0.0..1e15).contains(&v) => Ok((Some(v.round() as u64), false)),
            Ok(Some(_)) => Ok((None, true)),
            Err(e) if matches!(e.problem, Problem::Syntax { .. }) => Err(e),
            Err(_) => Ok((None, true)),
        }
    }

    /// An epoch time in `unit_ms` milliseconds (1 for milliseconds, 1000
    /// for seconds) as Unix milliseconds, within years 1970 to 9999.
    pub(super) fn epoch(
        &mut self,
        field: &'static str,
        unit_ms: f64,
    ) -> Result<Option<i64>, DecodeError> {
        let Some(v) = self.float(field)? else {
            return Ok(None);
        };
        let ms = v * unit_ms;
        if !(0.0..253_402_300_800_000.0).contains(&ms) {
            let what = if unit_ms == 1.0 {
                "epoch milliseconds from 1970 to 9999"
            } else {
                "epoch seconds from 1970 to 9999"
            };
            return Err(invalid(field, what, format!("{v}")));
        }
        Ok(Some(ms.round() as i64))
    }

    /// The status a gateway logged: an integer 100-599 (a string of one is
    /// taken too); anything else is dropped and flagged.
    pub(super) fn status(
        &mut self,
        field: &'static str,
    ) -> Result<(Option<u16>, bool), DecodeError> {
        let v = match self.raw(field)? {
            Raw::Num(n) => n.parse::<u16>().ok(),
            Raw::Str(s) => s.trim().parse::<u16>().ok(),
            Raw::Null => return Ok((None, false)),
            Raw::Other(..) => None,
        };
        match v {
            Some(s @ 100..=599) => Ok((Some(s), false)),
            _ => Ok((None, true)),
        }
    }
}

/// The names errors give a usage object's fields.
pub(super) struct UsageNames {
    pub(super) prompt: &'static str,
    pub(super) completion: &'static str,
    pub(super) input: &'static str,
    pub(super) output: &'static str,
    pub(super) cache_read: &'static str,
    pub(super) cache_creation: &'static str,
    pub(super) cost: &'static str,
}

/// A time as LiteLLM writes it: RFC 3339, or a naive
/// `YYYY-MM-DD HH:MM:SS[.ffffff]` with no zone, which is taken as UTC.
pub(super) fn parse_naive_or_rfc3339(s: &str) -> Option<i64> {
    if let Some(t) = parse_rfc3339(s) {
        return Some(t);
    }
    let b = s.as_bytes();
    if b.len() < 19 || b.len() > 40 || b.iter().any(|c| matches!(c, b'Z' | b'z' | b'+')) {
        return None;
    }
    if b.len() > 19 && b[19] != b'.' {
        return None;
    }
    let mut buf = [0u8; 41];
    buf[..b.len()].copy_from_slice(b);
    buf[b.len()] = b'Z';
    parse_rfc3339(std::str::from_utf8(&buf[..=b.len()]).ok()?)
}

/// A client address from `ip`, `ip:port`, `[v6]:port` or a
/// comma-separated forwarding list (its first entry).
pub(super) fn parse_addr(s: &str) -> Option<std::net::IpAddr> {
    let s = s.split(',').next()?.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(Into::into)
}

/// A plain IP address (Kong's and APISIX's `client_ip`).
pub(super) fn plain_addr(s: &str) -> Option<std::net::IpAddr> {
    s.parse().ok()
}

/// An endpoint without its query string: keys sent as `?apikey=` must not
/// be kept, and the path is what groups requests.
pub(super) fn path_only(t: Cow<'_, str>) -> Cow<'_, str> {
    match t.find(['?', '#']) {
        None => t,
        Some(i) => match t {
            Cow::Borrowed(b) => Cow::Borrowed(&b[..i]),
            Cow::Owned(mut o) => {
                o.truncate(i);
                Cow::Owned(o)
            }
        },
    }
}

/// The raw secret in an `Authorization` value (its token after a
/// `Bearer`/`Basic` scheme), unless the gateway already redacted it.
pub(super) fn bearer(v: &str) -> Option<&str> {
    let t = v.trim();
    let t = t
        .split_once(' ')
        .map(|(scheme, rest)| {
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("basic") {
                rest.trim()
            } else {
                t
            }
        })
        .unwrap_or(t);
    (!t.is_empty() && !t.eq_ignore_ascii_case("redacted")).then_some(t)
}

impl<'a> Found<'a> {
    /// `"response": {"status": N, …}` (Kong, APISIX): the status, flagged
    /// and dropped when it is not one.
    pub(super) fn response(&mut self, sc: &mut Scanner<'a>) -> Result<(), DecodeError> {
        sc.fields(|sc, k| match &*k {
            "status" => {
                let (s, bad) = sc.status("response.status")?;
                self.flag(super::F_STATUS, bad);
                self.ev().status = s;
                Ok(())
            }
            _ => sc.skip_value(0),
        })
    }

    /// A client address read by `parse` (a plain address, or
    /// [`parse_addr`]'s `ip:port` and forwarding lists): taken when it is
    /// one, else flagged and dropped; the first address read stands.
    pub(super) fn address(
        &mut self,
        sc: &mut Scanner<'a>,
        field: &'static str,
        parse: fn(&str) -> Option<std::net::IpAddr>,
    ) -> Result<(), DecodeError> {
        let (t, bad) = sc.text(field, 256)?;
        let ip = t.as_deref().and_then(parse);
        self.flag(super::F_IP, bad || (t.is_some() && ip.is_none()));
        if self.ev().ip.is_none() {
            self.ev().ip = ip;
        }
        Ok(())
    }

    /// An endpoint, cut to 256 characters and to its path (flagged when cut).
    pub(super) fn endpoint(
        &mut self,
        sc: &mut Scanner<'a>,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        let (t, bad) = sc.text(field, 256)?;
        self.flag(super::F_ENDPOINT, bad);
        self.ev().endpoint = t.map(path_only);
        Ok(())
    }

    /// A latency in (possibly fractional) milliseconds; flagged and dropped
    /// when it is not a non-negative number.
    pub(super) fn latency(
        &mut self,
        sc: &mut Scanner<'a>,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        let (ms, bad) = sc.millis(field)?;
        self.flag(super::F_LAT, bad);
        self.ev().latency_ms = ms;
        Ok(())
    }

    pub(super) fn new() -> Self {
        Found {
            ev: Some(Event::new(0, "", "", "")),
            ..Found::default()
        }
    }

    /// The event being filled.
    pub(super) fn ev(&mut self) -> &mut Event<'a> {
        self.ev.get_or_insert_with(|| Event::new(0, "", "", ""))
    }

    /// Flags descriptive field `bit` as cut or dropped when `changed`.
    pub(super) fn flag(&mut self, bit: u32, changed: bool) {
        if changed {
            self.ev().repaired |= bit;
        }
    }

    /// Makes the event: `ts_field` and `user_field` name the required
    /// fields in errors; `id_field` names the request id when the gateway
    /// always logs one (`None`: the record's place stands in for it).
    pub(super) fn finish(
        mut self,
        dec: &Decoder,
        origin: &Origin<'_>,
        ts_field: &'static str,
        id_field: Option<&'static str>,
        user_field: &'static str,
    ) -> Result<Event<'a>, DecodeError> {
        let mut ev = self.ev.take().unwrap_or_else(|| Event::new(0, "", "", ""));
        ev.ts_ms = self
            .ts_ms
            .ok_or_else(|| DecodeError::new(ts_field, Problem::Missing))?;
        ev.request_id = match self.request_id.take() {
            Some(id) => id,
            None => match id_field {
                Some(f) => return Err(DecodeError::new(f, Problem::Missing)),
                None => Cow::Owned(origin.id()),
            },
        };
        ev.user_id = self
            .user
            .take()
            .ok_or_else(|| DecodeError::new(user_field, Problem::Missing))?;
        ev.key_id = match (self.key.take(), self.raw_key.take()) {
            (Some(k), _) => k,
            (None, Some(raw)) => Cow::Owned(dec.secrets.key_id(&raw)),
            (None, None) => ev.user_id.clone(),
        };
        if let Some(m) = self.model.take() {
            ev.model = Some(m);
        }
        ev.prompt_tokens = self.usage.prompt_tokens();
        ev.completion_tokens = self.usage.completion.unwrap_or(0);
        if let Some(p) = self.prompt.take() {
            ev.prompt_fingerprint = Some(Cow::Owned(dec.secrets.prompt_fingerprint(&p)));
            ev.prompt_chars = Some(char_len(&p) as u64);
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(m: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_records(m.as_bytes(), |p| {
            out.push(match p {
                Piece::Record(b, i) => format!("{i:?}={}", String::from_utf8_lossy(b)),
                Piece::Broken(b, i, e) => {
                    format!("broken {i} {e} ({})", String::from_utf8_lossy(b))
                }
            })
        });
        out
    }

    #[test]
    fn arrays_split_into_their_elements_and_a_break_names_its_element() {
        assert_eq!(pieces(r#"{"a":1}"#), [r#"None={"a":1}"#]);
        assert_eq!(pieces(" [ ] "), Vec::<String>::new());
        assert_eq!(
            pieces(r#"[{"a":[1,2]}, {"b":"]"} ,3]"#),
            [
                r#"Some(0)={"a":[1,2]}"#,
                r#"Some(1)={"b":"]"}"#,
                "Some(2)=3"
            ]
        );
        let broken = pieces(r#"[{"a":1},{"b":tru},{"c":3}]"#);
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(
            broken[1].starts_with("broken 1 record: not a JSON object"),
            "{broken:?}"
        );
        let unclosed = pieces(r#"[{"a":1}"#);
        assert!(unclosed[1].starts_with("broken 1 "), "{unclosed:?}");
        let trailing = pieces(r#"[{"a":1}] x"#);
        assert!(trailing[1].starts_with("broken 1 "), "{trailing:?}");
    }

    #[test]
    fn shapes_are_recognised_by_their_fields() {
        let cases = [
            (
                r#"{"ts":"2026-01-01T00:00:00Z","user_id":"u","key_id":"k"}"#,
                Format::Canonical,
            ),
            (
                r#"{"id":"x","startTime":1.5,"model_group":"g"}"#,
                Format::Litellm,
            ),
            (
                r#"{"started_at":1,"request":{},"latencies":{}}"#,
                Format::Kong,
            ),
            (
                r#"{"start_time":1699596164550,"client_ip":"1.2.3.4","route_id":"r"}"#,
                Format::Apisix,
            ),
            (
                r#"{"start_time":"2025-08-30T16:51:37.894Z","response_code":200}"#,
                Format::EnvoyAiGateway,
            ),
        ];
        for (rec, want) in cases {
            assert_eq!(recognise(rec.as_bytes()), Ok(want), "{rec}");
        }
        let e = recognise(br#"{"hello":"world"}"#).unwrap_err();
        assert!(e.to_string().contains("known format"), "{e}");
        assert!(recognise(b"[1]").is_err());
    }

    #[test]
    fn times_and_addresses_in_gateway_spellings() {
        assert_eq!(
            parse_naive_or_rfc3339("2025-01-24 09:20:46.847371"),
            parse_rfc3339("2025-01-24T09:20:46.847Z")
        );
        assert_eq!(
            parse_naive_or_rfc3339("2025-01-24 09:20:46"),
            parse_rfc3339("2025-01-24T09:20:46Z")
        );
        assert_eq!(parse_naive_or_rfc3339("2025-01-24 09:20"), None);
        assert_eq!(parse_addr("127.0.0.1:64484"), "127.0.0.1".parse().ok());
        assert_eq!(parse_addr("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_addr("2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(
            parse_addr("203.0.113.9, 10.0.0.1"),
            "203.0.113.9".parse().ok()
        );
        assert_eq!(parse_addr("host:80"), None);
        assert_eq!(path_only(Cow::Borrowed("/v1/chat?apikey=sk-1")), "/v1/chat");
        assert_eq!(bearer("Bearer sk-abc"), Some("sk-abc"));
        assert_eq!(bearer("REDACTED"), None);
    }

    #[test]
    fn anthropic_input_adds_its_cache_and_openai_prompt_does_not() {
        let openai = Usage {
            prompt: Some(100),
            input: Some(7),
            cache_read: 50,
            ..Usage::default()
        };
        assert_eq!(openai.prompt_tokens(), 100);
        let anthropic = Usage {
            input: Some(10),
            cache_read: 200,
            cache_creation: 30,
            ..Usage::default()
        };
        assert_eq!(anthropic.prompt_tokens(), 240);
    }
}
