//! Strict decoding of the canonical event.
//!
//! A hand-written, allocation-free (for unescaped input) scanner for the one
//! flat JSON object each record is. It is strict about what the contract
//! fixes and lenient only where the README documents it: unknown fields are
//! skipped (after checking they are valid JSON), and `null` for an optional
//! field means the field is absent. Every rejection names the field and the
//! problem, e.g. `prompt_tokens: expected a non-negative integer, got -3`.
//!
//! Beside it, one module per gateway whose own log format keywatch reads
//! ([`litellm`], [`kong`], [`apisix`], [`envoy`]), each mapping a record into
//! the same [`Event`] with the same strictness, and [`gateway`]: the
//! [`Format`] of a topic, the shape recognition of `auto`, and the split of
//! a message holding a JSON array of records.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

pub mod apisix;
pub mod envoy;
pub mod gateway;
pub mod kong;
pub mod litellm;

pub use gateway::{split_records, Format, GatewayOptions, KongCost, Origin, Piece};

use crate::event::{Event, Phase};
use crate::hash::SecretHasher;
use crate::time::parse_rfc3339;

/// Nesting allowed inside unknown fields before a record is refused.
const MAX_DEPTH: u32 = 64;
/// Longest value text quoted back in an error message.
const SNIPPET: usize = 40;

/// Why a record was refused; `field` names where (`record` for the whole
/// line), and `gateway` whose format it was read as (none: the canonical
/// event). Shown as `kong: consumer: required field is missing`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The field at fault (a dotted path in a gateway's record), or `record`
    /// when the line as a whole is wrong.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: Problem,
    /// The gateway format the record was read as; `None` for the canonical event.
    pub gateway: Option<Format>,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(g) = self.gateway {
            write!(f, "{}: ", g.as_str())?;
        }
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for DecodeError {}

/// What is wrong with a field or record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The bytes are not one JSON object.
    Syntax {
        /// Byte offset in the line.
        at: usize,
        /// What was expected there.
        expected: &'static str,
    },
    /// The bytes are not UTF-8.
    InvalidUtf8 {
        /// Byte offset of the first bad byte.
        at: usize,
    },
    /// A required field is absent.
    Missing,
    /// A value has the wrong JSON type.
    WrongType {
        /// The type the contract asks for.
        expected: &'static str,
        /// The value seen (its type only, for secret fields).
        got: String,
    },
    /// A value has the right type but is outside what the contract allows.
    Invalid {
        /// What the contract allows.
        expected: &'static str,
        /// The value seen.
        got: String,
    },
    /// A string is longer than the contract allows.
    TooLong {
        /// Maximum length in characters.
        max: usize,
        /// Length seen, in characters.
        len: usize,
    },
    /// The field appears twice in the object.
    Duplicate,
}

impl DecodeError {
    fn new(field: &'static str, problem: Problem) -> Self {
        DecodeError {
            field,
            problem,
            gateway: None,
        }
    }

    /// The same error, said of a record read in `gateway`'s format.
    fn of(mut self, gateway: Format) -> Self {
        if gateway != Format::Canonical {
            self.gateway = Some(gateway);
        }
        self
    }

    /// `field: kind` (with the gateway in front when there is one): the
    /// group a summary counts this error under.
    pub fn reason(&self) -> String {
        match self.gateway {
            Some(g) => format!("{}: {}: {}", g.as_str(), self.field, self.kind()),
            None => format!("{}: {}", self.field, self.kind()),
        }
    }

    /// A short, stable name of the problem's kind (`missing`, `wrong_type`,
    /// `invalid`, `too_long`, `duplicate`, `syntax`, `invalid_utf8`), for
    /// grouping errors in summaries.
    pub fn kind(&self) -> &'static str {
        match self.problem {
            Problem::Syntax { .. } => "syntax",
            Problem::InvalidUtf8 { .. } => "invalid_utf8",
            Problem::Missing => "missing",
            Problem::WrongType { .. } => "wrong_type",
            Problem::Invalid { .. } => "invalid",
            Problem::TooLong { .. } => "too_long",
            Problem::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Syntax { at, expected } => {
                write!(f, "not a JSON object: expected {expected} at byte {at}")
            }
            Problem::InvalidUtf8 { at } => write!(f, "not valid UTF-8 at byte {at}"),
            Problem::Missing => f.write_str("required field is missing"),
            Problem::WrongType { expected, got } => write!(f, "expected {expected}, got {got}"),
            Problem::Invalid { expected, got } => write!(f, "expected {expected}, got {got}"),
            Problem::TooLong { max, len } => write!(f, "longer than {max} characters ({len})"),
            Problem::Duplicate => f.write_str("appears more than once"),
        }
    }
}

/// Decodes canonical records. Holds the keyed hasher for the secrets a
/// gateway may send by mistake.
#[derive(Clone, Debug)]
pub struct Decoder {
    secrets: SecretHasher,
    options: Arc<GatewayOptions>,
}

/// One JSON value's kind, as far as the decoder needs to know it.
enum Raw<'a> {
    Str(Cow<'a, str>),
    Num(&'a str),
    Null,
    Other(&'static str, usize),
}

// Field bits, for duplicate detection.
const F_V: u32 = 1;
const F_TS: u32 = 1 << 1;
/// The [`Event::repaired`] bit of `ts`: set when the record's time was
/// clamped to its reference ([`crate::Engine::bound_time`]).
pub const TS_REPAIRED: u32 = F_TS;
const F_REQ: u32 = 1 << 2;
const F_PHASE: u32 = 1 << 3;
const F_USER: u32 = 1 << 4;
const F_KEY: u32 = 1 << 5;
const F_API_KEY: u32 = 1 << 6;
const F_TIER: u32 = 1 << 7;
const F_IP: u32 = 1 << 8;
const F_ASN: u32 = 1 << 9;
const F_UA: u32 = 1 << 10;
const F_ENDPOINT: u32 = 1 << 11;
const F_MODEL: u32 = 1 << 12;
const F_STATUS: u32 = 1 << 13;
const F_PT: u32 = 1 << 14;
const F_CT: u32 = 1 << 15;
const F_COST: u32 = 1 << 16;
const F_LAT: u32 = 1 << 17;
const F_FP: u32 = 1 << 18;
const F_PROMPT: u32 = 1 << 19;
const F_CHARS: u32 = 1 << 20;

struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    /// Set by `string` when it replaced a NUL or a lone surrogate with
    /// U+FFFD: the text it returned is not what was sent.
    mangled: Option<&'static str>,
}

/// The descriptive fields: what the detectors can do without. A bad one is
/// cut or dropped and flagged in [`Event::repaired`], never a dead letter,
/// so a caller-controlled field cannot make a request go uncounted.
const DESCRIPTIVE: u32 = F_TIER
    | F_IP
    | F_ASN
    | F_UA
    | F_ENDPOINT
    | F_MODEL
    | F_STATUS
    | F_LAT
    | F_FP
    | F_PROMPT
    | F_CHARS;

/// The fields of [`Event::repaired`]'s bits, in bit order.
const FIELD_NAMES: [&str; 21] = [
    "v",
    "ts",
    "request_id",
    "phase",
    "user_id",
    "key_id",
    "api_key",
    "tier",
    "ip",
    "asn",
    "user_agent",
    "endpoint",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "prompt_fingerprint",
    "prompt",
    "prompt_chars",
];

/// The names of the fields in an [`Event::repaired`] mask, in contract order.
pub fn repaired_fields(mask: u32) -> impl Iterator<Item = &'static str> {
    FIELD_NAMES
        .iter()
        .enumerate()
        .filter(move |(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| *n)
}

impl Decoder {
    /// A decoder whose keyed hashes use `hash_key`.
    pub fn new(hash_key: &[u8]) -> Self {
        Decoder::with_options(hash_key, GatewayOptions::default())
    }

    /// A decoder whose keyed hashes use `hash_key` and whose gateway
    /// adapters follow `options` (where identity comes from when a record
    /// lacks its own).
    pub fn with_options(hash_key: &[u8], options: GatewayOptions) -> Self {
        Decoder {
            secrets: SecretHasher::new(hash_key),
            options: Arc::new(options),
        }
    }

    /// The adapters' options.
    pub fn options(&self) -> &GatewayOptions {
        &self.options
    }

    /// Decodes one record read in `format` (`auto`: recognised by its
    /// shape), returning the event and the format it was read as (never
    /// `auto`). `origin` names records whose gateway logs no request id
    /// (APISIX by default): their id is their place in the stream, so a
    /// re-delivery of the same message is still a duplicate.
    pub fn decode_as<'a>(
        &self,
        format: Format,
        record: &'a [u8],
        origin: &Origin<'_>,
    ) -> Result<(Event<'a>, Format), DecodeError> {
        let format = match format {
            Format::Auto => match gateway::recognise(record) {
                Err(e) if matches!(e.problem, Problem::InvalidUtf8 { .. }) => {
                    let text = String::from_utf8_lossy(record);
                    gateway::recognise(text.as_bytes()).map_err(|_| e)?
                }
                other => other?,
            },
            f => f,
        };
        match self.read_as(format, record, origin) {
            // A gateway writes a client's header bytes as they came: one
            // that is not UTF-8 (in a User-Agent, say) must not make the
            // request go uncounted. The record is read with U+FFFD in its
            // place and the fields that hold one are flagged; an identity
            // holding one is refused, as a changed identity always is.
            Err(e)
                if format != Format::Canonical
                    && matches!(e.problem, Problem::InvalidUtf8 { .. }) =>
            {
                let text = String::from_utf8_lossy(record);
                let mut ev = self
                    .read_as(format, text.as_bytes(), origin)
                    .map_err(|_| e.clone())?;
                let bad = |t: &str| t.contains('\u{FFFD}');
                if bad(&ev.request_id) || bad(&ev.user_id) || bad(&ev.key_id) {
                    return Err(e);
                }
                let mut flagged = 0;
                for (bit, t) in [
                    (F_TIER, &ev.tier),
                    (F_UA, &ev.user_agent),
                    (F_ENDPOINT, &ev.endpoint),
                    (F_MODEL, &ev.model),
                ] {
                    if t.as_deref().is_some_and(bad) {
                        flagged |= bit;
                    }
                }
                if flagged == 0 && ev.prompt_fingerprint.is_some() {
                    // Else the byte was in the prompt (fingerprinted with
                    // U+FFFD in its place) or in a field no one reads.
                    flagged = F_PROMPT;
                }
                ev.repaired |= flagged;
                Ok((ev.into_owned(), format))
            }
            other => other.map(|ev| (ev, format)),
        }
    }

    fn read_as<'a>(
        &self,
        format: Format,
        record: &'a [u8],
        origin: &Origin<'_>,
    ) -> Result<Event<'a>, DecodeError> {
        let ev = match format {
            Format::Canonical | Format::Auto => self.decode(record),
            Format::Litellm => litellm::read(self, record, origin),
            Format::Kong => kong::read(self, record, origin),
            Format::Apisix => apisix::read(self, record, origin),
            Format::EnvoyAiGateway => envoy::read(self, record, origin),
        }
        .map_err(|e| e.of(format))?;
        Ok(ev)
    }

    /// Decodes one record (a line, without or with its trailing newline).
    pub fn decode<'a>(&self, line: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let mut sc = Scanner::open(line)?;
        let mut ev = Event::new(0, "", "", "");
        let mut seen = 0u32;
        let mut api_key: Option<Cow<'a, str>> = None;
        let mut prompt: Option<Cow<'a, str>> = None;

        sc.fields(|sc, key| {
            let (bit, field) = field_of(&key);
            let repeat = bit != 0 && seen & bit != 0;
            if repeat && bit & DESCRIPTIVE == 0 {
                return Err(DecodeError::new(field, Problem::Duplicate));
            }
            seen |= bit;
            if repeat {
                // A descriptive field twice: the first stands.
                ev.repaired |= bit;
                sc.skip_value(0)?;
            } else if bit & DESCRIPTIVE != 0 {
                ev.repaired |= sc.descriptive(&mut ev, &mut prompt, bit, field)?;
            } else {
                match bit {
                    0 => sc.skip_value(0)?,
                    F_V => {
                        if let Some(v) = sc.uint(field, false)? {
                            if v != 1 {
                                return Err(invalid(field, "schema version 1", v.to_string()));
                            }
                        }
                    }
                    F_TS => {
                        let t = sc.req_str(field, false)?;
                        ev.ts_ms = parse_rfc3339(&t)
                            .ok_or_else(|| invalid(field, "an RFC 3339 timestamp", quote(&t)))?;
                    }
                    F_REQ => ev.request_id = sc.id(field)?,
                    F_USER => ev.user_id = sc.id(field)?,
                    F_KEY => ev.key_id = sc.id(field)?,
                    F_PHASE => {
                        if let Some(p) = sc.opt_str(field, false)? {
                            ev.phase = match &*p {
                                "exchange" => Phase::Exchange,
                                "request" => Phase::Request,
                                "response" => Phase::Response,
                                _ => {
                                    return Err(invalid(
                                        field,
                                        "\"exchange\", \"request\" or \"response\"",
                                        quote(&p),
                                    ))
                                }
                            };
                        }
                    }
                    F_API_KEY => {
                        api_key = sc.opt_str(field, true)?;
                        if let Some(why) = sc.mangled {
                            return Err(mangled(field, why));
                        }
                    }
                    F_PT => ev.prompt_tokens = sc.uint(field, true)?.unwrap_or(0),
                    F_CT => ev.completion_tokens = sc.uint(field, true)?.unwrap_or(0),
                    F_COST => ev.cost_usd = sc.cost(field)?,
                    _ => unreachable!("every field bit has an arm"),
                }
            }
            Ok(())
        })?;
        sc.end()?;

        for (bit, field) in [(F_TS, "ts"), (F_REQ, "request_id"), (F_USER, "user_id")] {
            if seen & bit == 0 {
                return Err(DecodeError::new(field, Problem::Missing));
            }
        }
        if seen & F_KEY == 0 {
            match api_key {
                Some(k) if !k.is_empty() => ev.key_id = Cow::Owned(self.secrets.key_id(&k)),
                _ => return Err(DecodeError::new("key_id", Problem::Missing)),
            }
        }
        if let Some(p) = prompt {
            if ev.prompt_fingerprint.is_none() {
                ev.prompt_fingerprint = Some(Cow::Owned(self.secrets.prompt_fingerprint(&p)));
            }
            if ev.prompt_chars.is_none() {
                ev.prompt_chars = Some(p.chars().count() as u64);
            }
        }
        Ok(ev)
    }
}

/// Skips the bytes of a JSON string that need no attention (not `"`, `\\`
/// or a control character), eight at a time: the classic SWAR tests for a
/// zero byte and a byte below 0x20 over a `u64`. Returns the index of the
/// first byte that needs attention, or `b.len()`.
#[inline]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while i + 8 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
        let quote = w ^ (ONES * b'"' as u64);
        let slash = w ^ (ONES * b'\\' as u64);
        let special = (quote.wrapping_sub(ONES) & !quote)
            | (slash.wrapping_sub(ONES) & !slash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        let special = special & HIGH;
        if special != 0 {
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && b[i] != b'"' && b[i] != b'\\' && b[i] >= 0x20 {
        i += 1;
    }
    i
}

/// A field's bit and its name as errors give it (`record` when unknown).
fn field_of(key: &str) -> (u32, &'static str) {
    let bit = match key {
        "v" => F_V,
        "ts" => F_TS,
        "request_id" => F_REQ,
        "phase" => F_PHASE,
        "user_id" => F_USER,
        "key_id" => F_KEY,
        "api_key" => F_API_KEY,
        "tier" => F_TIER,
        "ip" => F_IP,
        "asn" => F_ASN,
        "user_agent" => F_UA,
        "endpoint" => F_ENDPOINT,
        "model" => F_MODEL,
        "status" => F_STATUS,
        "prompt_tokens" => F_PT,
        "completion_tokens" => F_CT,
        "cost_usd" => F_COST,
        "latency_ms" => F_LAT,
        "prompt_fingerprint" => F_FP,
        "prompt" => F_PROMPT,
        "prompt_chars" => F_CHARS,
        _ => return (0, "record"),
    };
    (bit, FIELD_NAMES[bit.trailing_zeros() as usize])
}

fn invalid(field: &'static str, expected: &'static str, got: String) -> DecodeError {
    DecodeError::new(field, Problem::Invalid { expected, got })
}

fn snippet(s: &str) -> &str {
    match s.char_indices().nth(SNIPPET) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn quote(s: &str) -> String {
    let cut = snippet(s);
    let ell = if cut.len() < s.len() { "…" } else { "" };
    format!("{:?}{ell}", cut)
}

const MANGLED_NUL: &str = "text without NUL characters";
const MANGLED_SURROGATE: &str = "text without lone surrogates";

/// The error for a strict field whose text held a NUL or lone surrogate.
fn mangled(field: &'static str, why: &'static str) -> DecodeError {
    let got = if why == MANGLED_NUL {
        "\"\\u0000\""
    } else {
        "an unpaired \\u surrogate escape"
    };
    DecodeError::new(
        field,
        Problem::Invalid {
            expected: why,
            got: got.to_string(),
        },
    )
}

/// `s` cut to at most `max` characters, and whether it was cut.
fn cut(s: Cow<'_, str>, max: usize) -> (Cow<'_, str>, bool) {
    let end = match s.char_indices().nth(max) {
        Some((i, _)) => i,
        None => return (s, false),
    };
    let t = match s {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..end]),
        Cow::Owned(mut o) => {
            o.truncate(end);
            Cow::Owned(o)
        }
    };
    (t, true)
}

fn char_len(s: &str) -> usize {
    if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    }
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `line`, which must be UTF-8. A UTF-8
    /// byte-order mark (a file saved by an editor that writes one, on its
    /// first line) is skipped.
    fn open(line: &'a [u8]) -> Result<Self, DecodeError> {
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        let s = std::str::from_utf8(line).map_err(|e| {
            DecodeError::new(
                "record",
                Problem::InvalidUtf8 {
                    at: e.valid_up_to(),
                },
            )
        })?;
        Ok(Scanner {
            s,
            b: line,
            i: 0,
            mangled: None,
        })
    }

    /// Reads the object at the cursor, calling `f` with each field name;
    /// `f` consumes the field's value (reading or skipping it).
    #[inline(always)]
    fn fields(
        &mut self,
        mut f: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        self.ws();
        self.expect(b'{', "'{'")?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.syntax("a field name"));
            }
            let key = self.string("record")?;
            self.mangled = None;
            self.ws();
            self.expect(b':', "':'")?;
            self.ws();
            f(self, key)?;
            self.mangled = None;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.syntax("',' or '}'")),
            }
        }
    }

    /// The end of a record: nothing but white space after its value.
    fn end(&mut self) -> Result<(), DecodeError> {
        self.ws();
        if self.i != self.b.len() {
            return Err(self.syntax("the end of the record"));
        }
        Ok(())
    }

    /// Whether the value at the cursor is an object (else it is read by
    /// the caller, or skipped).
    fn at_object(&self) -> bool {
        self.peek() == Some(b'{')
    }

    /// A number that may have a fraction (`null`: absent). Anything else
    /// is the wrong type.
    fn float(&mut self, field: &'static str) -> Result<Option<f64>, DecodeError> {
        match self.raw(field)? {
            Raw::Num(n) => n
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| invalid(field, "a finite number", snippet(n).to_string())),
            Raw::Null => Ok(None),
            other => {
                let got = self.got(&other, false);
                Err(DecodeError::new(
                    field,
                    Problem::WrongType {
                        expected: "a number",
                        got,
                    },
                ))
            }
        }
    }

    /// The text of the value at the cursor, as sent (any JSON value).
    fn span(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.i;
        self.skip_value(0)?;
        Ok(&self.s[start..self.i])
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn syntax(&self, expected: &'static str) -> DecodeError {
        DecodeError::new(
            "record",
            Problem::Syntax {
                at: self.i,
                expected,
            },
        )
    }

    #[inline]
    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), DecodeError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.syntax(what))
        }
    }

    /// Reads a JSON string at `self.i` (which is a quote). Borrowed unless it has escapes.
    fn string(&mut self, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
        self.i += 1;
        let start = self.i;
        self.i = plain_run(self.b, self.i);
        loop {
            match self.peek() {
                Some(b'"') => {
                    let s = &self.s[start..self.i];
                    self.i += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(c) if c < 0x20 => {
                    return Err(self.string_syntax(field, "an escaped control character"))
                }
                Some(_) => self.i += 1,
                None => return Err(self.string_syntax(field, "a closing quote")),
            }
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(&self.s[start..self.i]);
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let esc = self
                        .peek()
                        .ok_or_else(|| self.string_syntax(field, "an escape"))?;
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4(field)?;
                            let mut c = hi;
                            if (0xD800..0xDC00).contains(&hi)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                let back = self.i;
                                self.i += 2;
                                let lo = self.hex4(field)?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                } else {
                                    // Not a pair: the next escape stands alone.
                                    self.i = back;
                                }
                            }
                            // A NUL (Postgres text cannot hold one) or a lone
                            // surrogate becomes U+FFFD; the caller decides
                            // whether a changed value is acceptable.
                            match char::from_u32(c) {
                                Some('\0') => {
                                    self.mangled = Some(MANGLED_NUL);
                                    out.push('\u{FFFD}');
                                }
                                Some(ch) => out.push(ch),
                                None => {
                                    self.mangled = Some(MANGLED_SURROGATE);
                                    out.push('\u{FFFD}');
                                }
                            }
                        }
                        _ => return Err(self.string_syntax(field, "a valid escape")),
                    }
                }
                Some(c) if c < 0x20 => {
                    return Err(self.string_syntax(field, "an escaped control character"))
                }
                Some(_) => {
                    // Copy the run of plain characters up to the next quote or backslash.
                    let run = self.i;
                    self.i = plain_run(self.b, self.i);
                    out.push_str(&self.s[run..self.i]);
                }
                None => return Err(self.string_syntax(field, "a closing quote")),
            }
        }
    }

    /// Checks the JSON string at `self.i` (a quote) and moves past it,
    /// accepting exactly what [`Scanner::string`] does, without building
    /// its text: how values no one reads are skipped.
    fn skip_string(&mut self) -> Result<(), DecodeError> {
        self.i += 1;
        loop {
            self.i = plain_run(self.b, self.i);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            self.hex4("record")?;
                        }
                        Some(_) => {
                            self.i += 1;
                            return Err(self.syntax("a valid escape"));
                        }
                        None => return Err(self.syntax("an escape")),
                    }
                }
                Some(_) => return Err(self.syntax("an escaped control character")),
                None => return Err(self.syntax("a closing quote")),
            }
        }
    }

    fn string_syntax(&self, _field: &'static str, expected: &'static str) -> DecodeError {
        self.syntax(expected)
    }

    fn hex4(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let h = self
            .b
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.string_syntax(field, "four hex digits"))?;
        let mut v = 0u32;
        for &c in h {
            let d = (c as char)
                .to_digit(16)
                .ok_or_else(|| self.string_syntax(field, "four hex digits"))?;
            v = v * 16 + d;
        }
        self.i += 4;
        Ok(v)
    }

    /// Reads a JSON number token's text at `self.i`, checking its grammar.
    fn number(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while let Some(b'0'..=b'9') = self.peek() {
                    self.i += 1;
                }
            }
            _ => return Err(self.syntax("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("a digit after '.'"));
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("a digit in the exponent"));
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        Ok(&self.s[start..self.i])
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), DecodeError> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.syntax("a JSON value"))
        }
    }

    /// Reads any value, classified.
    fn raw(&mut self, field: &'static str) -> Result<Raw<'a>, DecodeError> {
        let start = self.i;
        match self.peek() {
            Some(b'"') => Ok(Raw::Str(self.string(field)?)),
            Some(b'-' | b'0'..=b'9') => Ok(Raw::Num(self.number()?)),
            Some(b'n') => self.literal(b"null").map(|_| Raw::Null),
            Some(b't') => self.literal(b"true").map(|_| Raw::Other("true", start)),
            Some(b'f') => self.literal(b"false").map(|_| Raw::Other("false", start)),
            Some(b'{') => self.skip_value(0).map(|_| Raw::Other("an object", start)),
            Some(b'[') => self.skip_value(0).map(|_| Raw::Other("an array", start)),
            _ => Err(self.syntax("a JSON value")),
        }
    }

    fn skip_value(&mut self, depth: u32) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.syntax("less deeply nested values"));
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return Err(self.syntax("a field name"));
                    }
                    self.skip_string()?;
                    self.ws();
                    self.expect(b':', "':'")?;
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(self.syntax("',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(self.syntax("',' or ']'")),
                    }
                }
            }
            Some(b'"') => self.skip_string(),
            _ => self.raw("record").map(|_| ()),
        }
    }

    /// Describes a value of the wrong type; secret fields show only the type.
    fn got(&self, raw: &Raw<'a>, secret: bool) -> String {
        match raw {
            Raw::Str(s) if secret => format!("a string of {} characters", char_len(s)),
            Raw::Str(s) => quote(s),
            Raw::Num(_) if secret => "a number".to_string(),
            Raw::Num(n) => snippet(n).to_string(),
            Raw::Null => "null".to_string(),
            Raw::Other(what, start) => match *what {
                "an object" | "an array" if !secret => {
                    let text = &self.s[*start..self.i];
                    format!("{what} {}", quote(text))
                }
                w => w.to_string(),
            },
        }
    }

    fn opt_str(
        &mut self,
        field: &'static str,
        secret: bool,
    ) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self.raw(field)? {
            Raw::Str(s) => Ok(Some(s)),
            Raw::Null => Ok(None),
            other => {
                let got = self.got(&other, secret);
                Err(DecodeError::new(
                    field,
                    Problem::WrongType {
                        expected: "a string",
                        got,
                    },
                ))
            }
        }
    }

    fn req_str(&mut self, field: &'static str, secret: bool) -> Result<Cow<'a, str>, DecodeError> {
        match self.raw(field)? {
            Raw::Str(s) => Ok(s),
            other => {
                let got = self.got(&other, secret);
                Err(DecodeError::new(
                    field,
                    Problem::WrongType {
                        expected: "a string",
                        got,
                    },
                ))
            }
        }
    }

    /// A required identifier: 1 to 128 characters.
    fn id(&mut self, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
        let s = self.req_str(field, false)?;
        if let Some(why) = self.mangled {
            return Err(mangled(field, why));
        }
        if s.is_empty() {
            return Err(invalid(field, "a non-empty string", "\"\"".to_string()));
        }
        let len = char_len(&s);
        if len > 128 {
            return Err(DecodeError::new(field, Problem::TooLong { max: 128, len }));
        }
        Ok(s)
    }

    /// Reads descriptive field `bit` into `ev` (or `prompt`). A value that
    /// breaks the contract is cut (text too long: to its limit) or dropped
    /// (the wrong type, not an address, out of range, text that held a NUL
    /// or lone surrogate where it names something) and the field's bit is
    /// returned; 0 when the value stands as sent. Only bytes that are not
    /// JSON are an error here: the record is still counted.
    fn descriptive(
        &mut self,
        ev: &mut Event<'a>,
        prompt: &mut Option<Cow<'a, str>>,
        bit: u32,
        field: &'static str,
    ) -> Result<u32, DecodeError> {
        let mut bad = false;
        if matches!(bit, F_ASN | F_STATUS | F_LAT | F_CHARS) {
            let v = match self.uint(field, false) {
                Ok(v) => v,
                Err(e) if matches!(e.problem, Problem::Syntax { .. }) => return Err(e),
                Err(_) => {
                    bad = true;
                    None
                }
            };
            match bit {
                F_ASN => ev.asn = v.and_then(|v| u32::try_from(v).map_err(|_| bad = true).ok()),
                F_STATUS => {
                    ev.status = v.and_then(|v| match v {
                        100..=599 => Some(v as u16),
                        _ => {
                            bad = true;
                            None
                        }
                    })
                }
                F_LAT => ev.latency_ms = v,
                _ => ev.prompt_chars = v,
            }
            return Ok(if bad { bit } else { 0 });
        }
        let text = match self.raw(field)? {
            Raw::Str(t) => Some(t),
            Raw::Null => None,
            _ => {
                bad = true;
                None
            }
        };
        let mangled = self.mangled.take().is_some();
        match bit {
            F_PROMPT => {
                // Fingerprinted with the replacement characters: the same
                // bytes again are the same prompt.
                bad |= mangled;
                *prompt = text;
            }
            F_IP => {
                ev.ip = text.and_then(|t| t.parse().map_err(|_| bad = true).ok());
            }
            F_TIER => {
                // A cut tier would name another tier: dropped, the default
                // tier applies.
                ev.tier = text.and_then(|t| match mangled || char_len(&t) > 64 {
                    true => {
                        bad = true;
                        None
                    }
                    false => Some(t),
                });
            }
            _ => {
                let max = match bit {
                    F_UA => 512,
                    F_ENDPOINT => 256,
                    _ => 128,
                };
                bad |= mangled;
                let t = text.map(|t| {
                    let (t, was_cut) = cut(t, max);
                    bad |= was_cut;
                    t
                });
                match bit {
                    F_UA => ev.user_agent = t,
                    F_ENDPOINT => ev.endpoint = t,
                    F_MODEL => ev.model = t,
                    _ => ev.prompt_fingerprint = t,
                }
            }
        }
        Ok(if bad { bit } else { 0 })
    }

    /// A non-negative integer (`null` is absent). `counting` fields phrase
    /// negative values as "a non-negative integer".
    fn uint(&mut self, field: &'static str, counting: bool) -> Result<Option<u64>, DecodeError> {
        let expected = if counting {
            "a non-negative integer"
        } else {
            "an integer"
        };
        let raw = self.raw(field)?;
        let n = match raw {
            Raw::Num(n) => n,
            Raw::Null => return Ok(None),
            other => {
                let got = self.got(&other, false);
                return Err(DecodeError::new(
                    field,
                    Problem::WrongType { expected, got },
                ));
            }
        };
        let bytes = n.as_bytes();
        if bytes.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) {
            return Err(DecodeError::new(
                field,
                Problem::WrongType {
                    expected,
                    got: snippet(n).to_string(),
                },
            ));
        }
        if bytes[0] == b'-' {
            return Err(invalid(
                field,
                "a non-negative integer",
                snippet(n).to_string(),
            ));
        }
        let mut v: u64 = 0;
        for &c in bytes {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add((c - b'0') as u64))
                .ok_or_else(|| invalid(field, "an integer below 2^64", snippet(n).to_string()))?;
        }
        Ok(Some(v))
    }

    fn cost(&mut self, field: &'static str) -> Result<Option<f64>, DecodeError> {
        match self.raw(field)? {
            Raw::Num(n) => {
                let v: f64 = n
                    .parse()
                    .map_err(|_| invalid(field, "a finite number", snippet(n).to_string()))?;
                if !v.is_finite() || v < 0.0 {
                    return Err(invalid(
                        field,
                        "a non-negative number",
                        snippet(n).to_string(),
                    ));
                }
                Ok(Some(v))
            }
            Raw::Null => Ok(None),
            other => {
                let got = self.got(&other, false);
                Err(DecodeError::new(
                    field,
                    Problem::WrongType {
                        expected: "a number",
                        got,
                    },
                ))
            }
        }
    }
}

/// The checks the fuzzer (`fuzz/fuzz_targets/decode.rs`) and the test
/// suite run on one input, whatever its bytes: decoding never panics and
/// gives the same answer twice; an event it accepts keeps every field
/// within the contract's limits (identifiers 1-128 characters, descriptive
/// text cut to its limit, no NUL) and
/// comes from bytes that are JSON (`is_json` is the reference parser); a
/// refusal names its field in a short message. Returns whether the record
/// was accepted.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8], is_json: impl Fn(&[u8]) -> bool) -> bool {
    let dec = Decoder::new(b"fuzz-key");
    let got = dec.decode(data);
    assert_eq!(got, dec.decode(data), "decoding is deterministic");
    let ev = match got {
        Ok(ev) => ev,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with(e.field), "{msg}");
            assert!(msg.len() <= 400, "an error of {} bytes: {msg}", msg.len());
            return false;
        }
    };
    for (name, id) in [
        ("request_id", &ev.request_id),
        ("user_id", &ev.user_id),
        ("key_id", &ev.key_id),
    ] {
        assert!((1..=128).contains(&char_len(id)), "{name}: {id:?}");
    }
    for (name, text, max) in [
        ("tier", &ev.tier, 64),
        ("user_agent", &ev.user_agent, 512),
        ("endpoint", &ev.endpoint, 256),
        ("model", &ev.model, 128),
        ("prompt_fingerprint", &ev.prompt_fingerprint, 128),
    ] {
        if let Some(t) = text {
            assert!(char_len(t) <= max, "{name}: {} characters", char_len(t));
        }
    }
    // A NUL can only arrive escaped, and an escaped NUL is never kept
    // (a U+FFFD sent as such is a character like any other).
    for (name, text) in [
        ("tier", &ev.tier),
        ("user_agent", &ev.user_agent),
        ("endpoint", &ev.endpoint),
        ("model", &ev.model),
    ] {
        assert!(
            !text.as_deref().is_some_and(|t| t.contains('\0')),
            "{name}: {text:?}"
        );
    }
    assert!(ev.status.is_none_or(|s| (100..=599).contains(&s)));
    assert!(
        ev.cost_usd.is_none_or(|c| c.is_finite() && c >= 0.0),
        "{:?}",
        ev.cost_usd
    );
    // The reference parser cannot read lone surrogates, which the decoder
    // takes (and flags) in descriptive text.
    let body = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let surrogate = body.windows(4).any(|w| {
        w[..2] == *b"\\u"
            && matches!(w[2], b'd' | b'D')
            && matches!(w[3], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
    });
    assert!(
        surrogate || is_json(body),
        "accepted bytes that are not JSON"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"{"ts":"2026-11-23T10:15:02.481Z","request_id":"req_01JD8","user_id":"acct_42","key_id":"key_7f3a","tier":"pro","ip":"203.0.113.7","asn":64500,"endpoint":"/v1/chat/completions","model":"gpt-4o","status":200,"prompt_tokens":812,"completion_tokens":233,"latency_ms":1840,"prompt_fingerprint":"9f86d081884c7d65"}"#;

    fn dec() -> Decoder {
        Decoder::new(b"test-key")
    }

    fn is_json(b: &[u8]) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    }

    fn err(line: &str) -> String {
        dec().decode(line.as_bytes()).unwrap_err().to_string()
    }

    fn with(field_json: &str) -> String {
        format!(
            r#"{{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"u","key_id":"k",{field_json}}}"#
        )
    }

    #[test]
    fn decodes_the_contract_example() {
        let ev = dec().decode(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(ev.ts_ms, 1_795_428_902_481);
        assert_eq!(ev.request_id, "req_01JD8");
        assert_eq!(ev.phase, Phase::Exchange);
        assert_eq!(ev.user_id, "acct_42");
        assert_eq!(ev.key_id, "key_7f3a");
        assert_eq!(ev.tier.as_deref(), Some("pro"));
        assert_eq!(ev.ip, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(ev.asn, Some(64500));
        assert_eq!(ev.model.as_deref(), Some("gpt-4o"));
        assert_eq!(ev.status, Some(200));
        assert_eq!((ev.prompt_tokens, ev.completion_tokens), (812, 233));
        assert_eq!(ev.latency_ms, Some(1840));
        assert_eq!(ev.prompt_fingerprint.as_deref(), Some("9f86d081884c7d65"));
        assert!(
            matches!(ev.user_id, Cow::Borrowed(_)),
            "plain strings are not copied"
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_nulls_are_absent() {
        let line = with(
            r#""x_gw":{"a":[1,2,{"b":null}],"c":"\u00e9"},"ip":null,"cost_usd":0.25,"phase":"response""#,
        );
        let ev = dec().decode(line.as_bytes()).unwrap();
        assert_eq!(ev.ip, None);
        assert_eq!(ev.cost_usd, Some(0.25));
        assert_eq!(ev.phase, Phase::Response);
    }

    #[test]
    fn escapes_are_decoded() {
        let ev = dec()
            .decode(br#"{"ts":"2026-11-23T10:15:02Z","request_id":"r\"1","user_id":"\u00e9\ud83d\ude00","key_id":"k\\"}"#)
            .unwrap();
        assert_eq!(ev.request_id, "r\"1");
        assert_eq!(ev.user_id, "é😀");
        assert_eq!(ev.key_id, "k\\");
    }

    #[test]
    fn every_decode_error_names_field_and_problem() {
        let cases: &[(&str, &str)] = &[
            (
                "not json",
                "record: not a JSON object: expected '{' at byte 0",
            ),
            ("", "record: not a JSON object: expected '{' at byte 0"),
            ("[1,2]", "record: not a JSON object: expected '{' at byte 0"),
            (
                r#"{"ts":"2026-11-23T10:15:02Z""#,
                "record: not a JSON object: expected ',' or '}' at byte 28",
            ),
            (
                r#"{"ts" "x"}"#,
                "record: not a JSON object: expected ':' at byte 6",
            ),
            (
                r#"{} {}"#,
                "record: not a JSON object: expected the end of the record at byte 3",
            ),
            (
                r#"{"request_id":"r","user_id":"u","key_id":"k"}"#,
                "ts: required field is missing",
            ),
            (
                r#"{"ts":"2026-11-23T10:15:02Z","user_id":"u","key_id":"k"}"#,
                "request_id: required field is missing",
            ),
            (
                r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","key_id":"k"}"#,
                "user_id: required field is missing",
            ),
            (
                r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"u"}"#,
                "key_id: required field is missing",
            ),
            (
                r#"{"ts":"yesterday","request_id":"r","user_id":"u","key_id":"k"}"#,
                "ts: expected an RFC 3339 timestamp, got \"yesterday\"",
            ),
            (
                r#"{"ts":1700000000,"request_id":"r","user_id":"u","key_id":"k"}"#,
                "ts: expected a string, got 1700000000",
            ),
            (
                r#"{"ts":"2026-11-23T10:15:02Z","request_id":"","user_id":"u","key_id":"k"}"#,
                "request_id: expected a non-empty string, got \"\"",
            ),
            (
                r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":null,"key_id":"k"}"#,
                "user_id: expected a string, got null",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(&err(line), want, "{line}");
        }
        let long = "x".repeat(129);
        let field_cases: Vec<(String, &str)> = vec![
            (
                r#""prompt_tokens":-3"#.into(),
                "prompt_tokens: expected a non-negative integer, got -3",
            ),
            (
                r#""prompt_tokens":1.5"#.into(),
                "prompt_tokens: expected a non-negative integer, got 1.5",
            ),
            (
                r#""prompt_tokens":"12""#.into(),
                "prompt_tokens: expected a non-negative integer, got \"12\"",
            ),
            (
                r#""completion_tokens":true"#.into(),
                "completion_tokens: expected a non-negative integer, got true",
            ),
            (
                r#""completion_tokens":99999999999999999999999"#.into(),
                "completion_tokens: expected an integer below 2^64, got 99999999999999999999999",
            ),
            (r#""v":2"#.into(), "v: expected schema version 1, got 2"),
            (
                r#""phase":"stream""#.into(),
                "phase: expected \"exchange\", \"request\" or \"response\", got \"stream\"",
            ),
            (
                r#""cost_usd":-0.5"#.into(),
                "cost_usd: expected a non-negative number, got -0.5",
            ),
            (
                r#""cost_usd":"0.5""#.into(),
                "cost_usd: expected a number, got \"0.5\"",
            ),
            (
                r#""user_id":"again""#.into(),
                "user_id: appears more than once",
            ),
            (
                r#""x":tru"#.into(),
                "record: not a JSON object: expected a JSON value at byte 77",
            ),
            (
                r#""x":"a\qb""#.into(),
                "record: not a JSON object: expected a valid escape at byte 81",
            ),
            (
                r#""x":01"#.into(),
                "record: not a JSON object: expected ',' or '}' at byte 78",
            ),
        ];
        for (field, want) in &field_cases {
            assert_eq!(&err(&with(field)), want, "{field}");
        }
        assert_eq!(
            err(&format!(
                r#"{{"ts":"2026-11-23T10:15:02Z","request_id":"{long}","user_id":"u","key_id":"k"}}"#
            )),
            "request_id: longer than 128 characters (129)"
        );
        let nul = err(
            r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"a\u0000b","key_id":"k"}"#,
        );
        assert_eq!(
            nul,
            "user_id: expected text without NUL characters, got \"\\u0000\""
        );
        let bad_utf8 = dec().decode(b"{\"ts\":\"\xff\"}").unwrap_err();
        assert_eq!(bad_utf8.to_string(), "record: not valid UTF-8 at byte 7");
        let deep = with(&format!(r#""x":{}{}"#, "[".repeat(100), "]".repeat(100)));
        assert_eq!(dec().decode(deep.as_bytes()).unwrap_err().kind(), "syntax");
    }

    #[test]
    fn field_names_are_in_bit_order() {
        for (i, name) in FIELD_NAMES.iter().enumerate() {
            assert_eq!(field_of(name), (1 << i, *name));
        }
        assert_eq!(field_of("nope"), (0, "record"));
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let line = format!("\u{FEFF}{EXAMPLE}");
        let ev = dec().decode(line.as_bytes()).unwrap();
        assert_eq!(ev, dec().decode(EXAMPLE.as_bytes()).unwrap());
    }

    #[test]
    fn bad_descriptive_fields_are_cut_or_dropped_and_flagged_never_refused() {
        let long = "x".repeat(129);
        let cases: Vec<(String, &str)> = vec![
            (
                format!(r#""user_agent":"{}""#, "u".repeat(513)),
                "user_agent",
            ),
            (format!(r#""model":"{long}""#), "model"),
            (format!(r#""endpoint":"{}""#, "e".repeat(257)), "endpoint"),
            (
                format!(r#""prompt_fingerprint":"{long}""#),
                "prompt_fingerprint",
            ),
            (format!(r#""tier":"{}""#, "t".repeat(65)), "tier"),
            (r#""tier":5"#.into(), "tier"),
            (r#""user_agent":"curl\u0000x""#.into(), "user_agent"),
            (r#""model":"gpt\ud800""#.into(), "model"),
            (r#""prompt":"hi \udc00 there""#.into(), "prompt"),
            (r#""prompt":"a\u0000b""#.into(), "prompt"),
            (r#""user_agent":{"a":1}"#.into(), "user_agent"),
            (r#""ip":"999.1.1.1""#.into(), "ip"),
            (r#""ip":7"#.into(), "ip"),
            (r#""asn":4294967296"#.into(), "asn"),
            (r#""asn":"AS1""#.into(), "asn"),
            (r#""status":99"#.into(), "status"),
            (r#""status":"success""#.into(), "status"),
            (r#""latency_ms":[1]"#.into(), "latency_ms"),
            (r#""latency_ms":-1"#.into(), "latency_ms"),
            (r#""prompt_chars":{"n":1}"#.into(), "prompt_chars"),
            (r#""model":"a","model":"b""#.into(), "model"),
        ];
        let plain = r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"u","key_id":"k"}"#;
        let base = dec().decode(plain.as_bytes()).unwrap();
        for (field, name) in &cases {
            let line = with(field);
            let ev = dec()
                .decode(line.as_bytes())
                .unwrap_or_else(|e| panic!("{field}: refused ({e})"));
            assert_eq!(
                repaired_fields(ev.repaired).collect::<Vec<_>>(),
                [*name],
                "{field}"
            );
            // What the detectors count is untouched.
            assert_eq!(
                (
                    ev.ts_ms,
                    &ev.user_id,
                    &ev.key_id,
                    ev.prompt_tokens,
                    ev.completion_tokens
                ),
                (
                    base.ts_ms,
                    &base.user_id,
                    &base.key_id,
                    base.prompt_tokens,
                    base.completion_tokens
                ),
                "{field}"
            );
        }
        let cut_ua = with(&format!(r#""user_agent":"{}""#, "é".repeat(600)));
        let ev = dec().decode(cut_ua.as_bytes()).unwrap();
        assert_eq!(
            ev.user_agent.as_deref().map(|u| u.chars().count()),
            Some(512)
        );
        let twice = with(r#""model":"a","model":"b""#);
        let ev = dec().decode(twice.as_bytes()).unwrap();
        assert_eq!(ev.model.as_deref(), Some("a"), "the first stands");
        // The same mangled prompt twice is the same prompt.
        let mangled = with(r#""prompt":"x\ud800""#);
        let a = dec().decode(mangled.as_bytes()).unwrap();
        let b = dec().decode(mangled.as_bytes()).unwrap();
        assert_eq!(a.prompt_fingerprint, b.prompt_fingerprint);
        assert!(a.prompt_fingerprint.is_some());
        // A clean record has nothing flagged.
        assert_eq!(base.repaired, 0);
        // Identity stays strict: a NUL or lone surrogate in an id, or an id
        // twice, is a dead letter.
        let e = err(
            r#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"a\ud800","key_id":"k"}"#,
        );
        assert_eq!(
            e,
            "user_id: expected text without lone surrogates, got an unpaired \\u surrogate escape"
        );
        // Broken JSON inside a descriptive field still is.
        assert_eq!(
            err(&with(r#""user_agent":"a\qb""#)).split(':').next(),
            Some("record")
        );
    }

    #[test]
    fn secrets_are_hashed_and_never_echoed() {
        let ev = dec()
            .decode(br#"{"ts":"2026-11-23T10:15:02Z","request_id":"r","user_id":"u","api_key":"sk-live-SECRET","prompt":"Tell me  a joke"}"#)
            .unwrap();
        assert!(ev.key_id.starts_with("kh_"));
        assert!(!format!("{ev:?}").contains("SECRET"));
        assert!(!format!("{ev:?}").contains("joke"));
        assert_eq!(ev.prompt_chars, Some(15));
        assert_eq!(ev.prompt_fingerprint.as_deref().map(str::len), Some(16));
        // key_id wins over api_key when both are present.
        let line = with(r#""api_key":"sk-live-SECRET""#);
        let ev = dec().decode(line.as_bytes()).unwrap();
        assert_eq!(ev.key_id, "k");
        // A secret of the wrong type is described without its value.
        let e = err(&with(r#""api_key":12345678"#));
        assert_eq!(e, "api_key: expected a string, got a number");
        // A prompt of the wrong type is dropped (and flagged), never echoed.
        let line = with(r#""prompt":["secret words"]"#);
        let ev = dec().decode(line.as_bytes()).unwrap();
        assert_eq!(repaired_fields(ev.repaired).collect::<Vec<_>>(), ["prompt"]);
        assert!(!format!("{ev:?}").contains("secret words"));
    }

    fn event_json() -> impl Strategy<Value = (serde_json::Value, String)> {
        (
            0i64..4_000_000_000_000,
            "[a-zA-Z0-9_\\-\"\\\\é😀 ]{1,40}",
            "[a-z0-9_]{1,20}",
            proptest::option::of(0u64..1_000_000),
            proptest::option::of(0.0f64..100.0),
            proptest::option::of(100u16..600),
            proptest::sample::select(vec!["exchange", "request", "response"]),
        )
            .prop_map(|(ts, rid, uid, pt, cost, status, phase)| {
                let mut v = serde_json::json!({
                    "ts": crate::time::format_rfc3339(ts),
                    "request_id": rid,
                    "user_id": uid,
                    "key_id": format!("key_{uid}"),
                    "phase": phase,
                    "extra": {"nested": [1, "two", null, {"three": 3.5e-3}]},
                });
                if let Some(pt) = pt {
                    v["prompt_tokens"] = pt.into();
                }
                if let Some(c) = cost {
                    v["cost_usd"] = c.into();
                }
                if let Some(s) = status {
                    v["status"] = s.into();
                }
                let text = serde_json::to_string(&v).unwrap();
                (v, text)
            })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json((v, text) in event_json()) {
            let ev = dec().decode(text.as_bytes()).unwrap();
            prop_assert_eq!(crate::time::format_rfc3339(ev.ts_ms), v["ts"].as_str().unwrap());
            prop_assert_eq!(&*ev.request_id, v["request_id"].as_str().unwrap());
            prop_assert_eq!(&*ev.user_id, v["user_id"].as_str().unwrap());
            prop_assert_eq!(ev.prompt_tokens, v["prompt_tokens"].as_u64().unwrap_or(0));
            prop_assert_eq!(ev.cost_usd, v["cost_usd"].as_f64());
            prop_assert_eq!(ev.status.map(u64::from), v["status"].as_u64());
            prop_assert_eq!(ev.phase.as_str(), v["phase"].as_str().unwrap());
        }

        #[test]
        fn plain_run_finds_the_first_special_byte(bytes in proptest::collection::vec(any::<u8>(), 0..64), start in 0usize..64) {
            let start = start.min(bytes.len());
            let want = bytes[start..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .map_or(bytes.len(), |p| start + p);
            prop_assert_eq!(plain_run(&bytes, start), want);
        }

        #[test]
        fn garbage_passes_the_fuzz_checks(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_one(&bytes, is_json);
        }

        #[test]
        fn mangled_records_pass_the_fuzz_checks(cut in 0usize..330, byte in any::<u8>()) {
            let mut b = EXAMPLE.as_bytes().to_vec();
            let at = cut.min(b.len() - 1);
            b[at] = byte;
            fuzz_one(&b, is_json);
            fuzz_one(&EXAMPLE.as_bytes()[..at], is_json);
        }

        #[test]
        fn records_with_spliced_values_pass_the_fuzz_checks(
            at in 0usize..330,
            splice in proptest::prop_oneof![
                Just("\\u0000"), Just("\\ud800"), Just("1e999"), Just("-0"), Just("\\"),
                Just("\"x\":1,"), Just("null"), Just("[[[[[[]]]]]]"), Just("\u{feff}"), Just("\u{fffd}"),
                Just("18446744073709551616"), Just("0.5e-400"), Just("\"\""),
            ],
        ) {
            let at = at.min(EXAMPLE.len());
            let at = (0..=at).rev().find(|&i| EXAMPLE.is_char_boundary(i)).unwrap_or(0);
            let b = format!("{}{}{}", &EXAMPLE[..at], splice, &EXAMPLE[at..]);
            fuzz_one(b.as_bytes(), is_json);
        }
    }
}
