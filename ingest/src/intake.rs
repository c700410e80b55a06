//! The HTTP intake's producing half, for gateways without a Kafka sink
//! (LiteLLM's `generic_api` callback, Kong's `http-log`, APISIX's
//! `http-logger`): a body a gateway posted is cut into records, each record
//! is produced *unchanged* to the intake topic, keyed by its user, and the
//! caller is answered only once the broker has acknowledged every one.
//!
//! The intake is no second way in. What it produces is read by the same
//! Kafka pipeline ([`crate::kafka`]) that reads a gateway's own Kafka sink,
//! so exactly-once effects, dead letters and the event-time bound apply to
//! it unchanged. A record is decoded here only to find its user, the Kafka
//! key that keeps a user's records in one partition and in order; one that
//! does not decode is produced all the same, without a key, and the
//! pipeline dead-letters it with the error naming the field, as it does any
//! bad record.
//!
//! **A body** is one JSON value (an object, or an array whose elements are
//! the records: LiteLLM's `json_array`, Kong's batches, APISIX's `json`),
//! pretty-printed or not; or else lines (NDJSON: LiteLLM's `ndjson`,
//! APISIX's `new_line`), each a record or an array of records, blank lines
//! skipped. See [`split_body`].
//!
//! **Failures.** Producing is `acks=all` with the idempotent producer, and
//! every record's acknowledgement is awaited. If any record is refused, or
//! not acknowledged within `intake.produce_timeout_ms` (librdkafka's
//! `message.timeout.ms`), the request fails as a whole ([`IntakeError`]),
//! the producer is replaced by a fresh one, and the caller is told to
//! retry. Records acknowledged before the failure then
//! arrive twice, and the engine's (`request_id`, `phase`) dedup counts them
//! once, with one exception: a record without a request id of its own
//! (APISIX logs none unless configured to) gets its id from its Kafka
//! position, so a retried APISIX batch may count twice unless the gateway
//! logs a request id.
//!
//! The HTTP side (route, token check, rate and body limits, status codes)
//! is the binary's (`src/intake.rs`); this module speaks no HTTP.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use detectors::decode::{split_records, Format, Origin, Piece};
use detectors::Decoder;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{KafkaConfig, PipelineConfigError};
use crate::kafka::PipelineError;
use crate::telemetry::{Kind, Sample};

/// `intake.max_body_bytes` by default: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;
/// The least and most `intake.max_body_bytes` may be.
pub const BODY_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=(1 << 30);
/// librdkafka's `message.max.bytes` when `[kafka.settings]` does not set it.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// What a Kafka message costs beyond its key and value, at most (record
/// batch framing; librdkafka counts it against `message.max.bytes`).
const MESSAGE_OVERHEAD: usize = 512;
/// The shortest plain token accepted.
const MIN_TOKEN_CHARS: usize = 16;

/// `[intake]`: `POST /v1/logs` on the feed's listener, producing what
/// gateways post to a Kafka topic the pipeline reads.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// Serve `POST /v1/logs` (in `keywatch run` and `keywatch serve`, on
    /// `feed.listen`).
    pub enabled: bool,
    /// The topic records are produced to: one of `kafka.topics`, whose
    /// format is how records are read to find their user. Unset: the
    /// first of `kafka.topics`.
    pub topic: Option<String>,
    /// The bearer token callers present, as text: best set from the
    /// environment (`KEYWATCH__INTAKE__TOKEN`). Exactly one of `token`,
    /// `token_file` and `token_sha256` is given when the intake is enabled.
    pub token: Option<String>,
    /// A file holding the token (trailing whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// The lower-case hex SHA-256 of the token, so the config never holds
    /// the token itself (as `feed.clients` do).
    pub token_sha256: Option<String>,
    /// The largest body read, in bytes; a longer one is answered `413`
    /// (by its `Content-Length` before anything is read, or as soon as the
    /// read passes it).
    pub max_body_bytes: usize,
    /// Requests per second over all callers (a token bucket holding one
    /// second's worth); past it: `429` with `Retry-After`.
    pub max_requests_per_second: u32,
    /// Requests being read or produced at once; one more is answered `503`
    /// with `Retry-After`.
    pub max_concurrent_requests: u32,
    /// How long the broker has to acknowledge a request's records
    /// (librdkafka's `message.timeout.ms`) before the request fails with
    /// `503`.
    pub produce_timeout_ms: u64,
    /// How long a caller has to send its whole body after the request
    /// head; slower: `408`.
    pub body_timeout_secs: u64,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            enabled: false,
            topic: None,
            token: None,
            token_file: None,
            token_sha256: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_requests_per_second: 50,
            max_concurrent_requests: 16,
            produce_timeout_ms: 10_000,
            body_timeout_secs: 30,
        }
    }
}

impl fmt::Debug for IntakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntakeConfig")
            .field("enabled", &self.enabled)
            .field("topic", &self.topic)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("token_sha256", &self.token_sha256)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_requests_per_second", &self.max_requests_per_second)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("produce_timeout_ms", &self.produce_timeout_ms)
            .field("body_timeout_secs", &self.body_timeout_secs)
            .finish()
    }
}

fn bad<T>(field: &'static str, problem: impl Into<String>) -> Result<T, PipelineConfigError> {
    Err(PipelineConfigError {
        field,
        problem: problem.into(),
    })
}

impl IntakeConfig {
    /// The topic in force: `topic`, else the first of `kafka.topics`.
    pub fn topic_in<'k>(&'k self, kafka: &'k KafkaConfig) -> &'k str {
        match &self.topic {
            Some(t) => t,
            None => kafka.topics.first().map_or("", |t| t.name()),
        }
    }

    /// Checks every value; the error names the field. The token is read
    /// (from its file, if it is in one) only when the intake is enabled.
    pub fn validate(&self, kafka: &KafkaConfig) -> Result<(), PipelineConfigError> {
        if let Some(t) = &self.topic {
            if !kafka.topics.iter().any(|k| k.name() == t) {
                return bad(
                    "intake.topic",
                    format!(
                        "{t:?} is not one of kafka.topics ({}): the intake produces to a topic the pipeline reads",
                        kafka.topic_names().join(", ")
                    ),
                );
            }
        }
        if !BODY_BYTES_RANGE.contains(&self.max_body_bytes) {
            return bad(
                "intake.max_body_bytes",
                format!(
                    "must be from 1024 to 1073741824 (1 GiB), got {}",
                    self.max_body_bytes
                ),
            );
        }
        let ranges: [(&'static str, u64, std::ops::RangeInclusive<u64>); 4] = [
            (
                "intake.max_requests_per_second",
                self.max_requests_per_second.into(),
                1..=1_000_000,
            ),
            (
                "intake.max_concurrent_requests",
                self.max_concurrent_requests.into(),
                1..=10_000,
            ),
            (
                "intake.produce_timeout_ms",
                self.produce_timeout_ms,
                1000..=300_000,
            ),
            ("intake.body_timeout_secs", self.body_timeout_secs, 1..=300),
        ];
        for (field, v, range) in ranges {
            if !range.contains(&v) {
                return bad(
                    field,
                    format!("must be from {} to {}, got {v}", range.start(), range.end()),
                );
            }
        }
        if let Some(h) = &self.token_sha256 {
            if Token::from_sha256_hex(h).is_none() {
                return bad(
                    "intake.token_sha256",
                    "must be 64 hex digits (the SHA-256 of the token)",
                );
            }
        }
        if self.enabled {
            self.token()?;
        }
        Ok(())
    }

    /// The token callers must present, from `token`, `token_file` or
    /// `token_sha256` (exactly one of them).
    pub fn token(&self) -> Result<Token, PipelineConfigError> {
        let given = [
            self.token.is_some(),
            self.token_file.is_some(),
            self.token_sha256.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                return bad(
                    "intake.token",
                    "not set: give token (best from KEYWATCH__INTAKE__TOKEN), token_file or token_sha256",
                )
            }
            1 => {}
            _ => {
                return bad(
                    "intake.token",
                    "give only one of token, token_file and token_sha256",
                )
            }
        }
        if let Some(h) = &self.token_sha256 {
            return Token::from_sha256_hex(h).map_or_else(
                || {
                    bad(
                        "intake.token_sha256",
                        "must be 64 hex digits (the SHA-256 of the token)",
                    )
                },
                Ok,
            );
        }
        let (field, text) = match (&self.token, &self.token_file) {
            (Some(t), _) => ("intake.token", t.clone()),
            (None, Some(path)) => {
                let t = std::fs::read_to_string(path).map_err(|e| PipelineConfigError {
                    field: "intake.token_file",
                    problem: format!("reading {}: {e}", path.display()),
                })?;
                ("intake.token_file", t.trim_end().to_string())
            }
            (None, None) => unreachable!("counted above"),
        };
        let chars = text.chars().count();
        if chars < MIN_TOKEN_CHARS || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            // The length is shown, never the value.
            return bad(
                field,
                format!(
                    "must be at least {MIN_TOKEN_CHARS} characters without spaces or control characters, got {chars} characters (make one with `openssl rand -hex 32`)"
                ),
            );
        }
        Ok(Token::of(&text))
    }
}

/// The intake's bearer token, held as its SHA-256 only. `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; 32]);

impl Token {
    /// The token whose text is `token`.
    pub fn of(token: &str) -> Token {
        Token(Sha256::digest(token.as_bytes()).into())
    }

    /// The token whose SHA-256 is the 64 hex digits `hex`.
    pub fn from_sha256_hex(hex: &str) -> Option<Token> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut h = [0u8; 32];
        for (i, out) in h.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
            *out = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Token(h))
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(h.ct_eq(&self.0))
    }

    /// The lower-case hex SHA-256 (what `feed.clients` store), to tell the
    /// intake's token from the feed's.
    pub fn sha256_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Calls `each` with every record of `body`, in order.
///
/// A body that is one JSON value and nothing more (by its brackets and
/// strings: validity is the decoder's business) is that value; any other
/// body is its lines, each trimmed, blank ones skipped. A value or line that
/// is a JSON array gives its elements ([`split_records`], as the pipeline
/// splits a Kafka message holding one); where such an array breaks, the
/// rest of it is one more record, which the pipeline dead-letters. A
/// leading UTF-8 byte-order mark is skipped.
pub fn split_body<'a>(body: &'a [u8], mut each: impl FnMut(&'a [u8])) {
    let body = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii();
    if body.is_empty() {
        return;
    }
    if one_value(body) {
        records_of(body, &mut each);
        return;
    }
    for line in body.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if !line.is_empty() {
            records_of(line, &mut each);
        }
    }
}

/// A value's records: an array's elements, else the value itself.
fn records_of<'a>(value: &'a [u8], each: &mut impl FnMut(&'a [u8])) {
    if value.first() != Some(&b'[') {
        each(value);
        return;
    }
    split_records(value, |piece| match piece {
        Piece::Record(bytes, _) => each(bytes),
        Piece::Broken(rest, _, _) => {
            let rest = rest.trim_ascii();
            if !rest.is_empty() {
                each(rest);
            }
        }
    });
}

/// Whether `b` (trimmed, not empty) is one JSON value and nothing after it,
/// judged by brackets and strings alone.
fn one_value(b: &[u8]) -> bool {
    let end = match b[0] {
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = 0;
            let mut end = None;
            while i < b.len() {
                match b[i] {
                    b'"' => match string_end(b, i) {
                        Some(e) => {
                            i = e;
                            continue;
                        }
                        None => break,
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            end = Some(i + 1);
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            end
        }
        b'"' => string_end(b, 0),
        _ => Some(
            b.iter()
                .position(|c| c.is_ascii_whitespace())
                .unwrap_or(b.len()),
        ),
    };
    end == Some(b.len())
}

/// The index after the string opening at `start` (a `"`), if it closes.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', &b[i..])?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
        if i > b.len() {
            return None;
        }
    }
}

/// The Kafka key of a record read in `format` from `topic`: its user, when
/// it decodes (an undecodable record has none).
pub fn key_of<'a>(
    decoder: &Decoder,
    format: Format,
    topic: &str,
    record: &'a [u8],
) -> Option<Cow<'a, str>> {
    let origin = Origin {
        stream: topic,
        ..Origin::NOWHERE
    };
    decoder
        .decode_as(format, record, &origin)
        .ok()
        .map(|(ev, _)| ev.user_id)
}

/// One record of a body, found and keyed: where it lies in the body, and
/// its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The record's bytes in the body.
    pub range: Range<usize>,
    /// Its user, or `None` when it does not decode.
    pub key: Option<String>,
}

/// Every record of `body` ([`split_body`]) with its key ([`key_of`]).
pub fn plan(body: &[u8], decoder: &Decoder, format: Format, topic: &str) -> Vec<Planned> {
    let base = body.as_ptr() as usize;
    let mut out = Vec::new();
    split_body(body, |record| {
        let start = record.as_ptr() as usize - base;
        out.push(Planned {
            range: start..start + record.len(),
            key: key_of(decoder, format, topic, record).map(Cow::into_owned),
        });
    });
    out
}

/// What a request produced, every record acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Produced {
    /// Records produced and acknowledged (the undecodable ones included).
    pub accepted: usize,
    /// Of them, records that did not decode: produced without a key, for
    /// the pipeline to dead-letter.
    pub undecodable: usize,
}

/// Why a request's records were not all produced.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// A record is larger than a Kafka message may be: retrying cannot help.
    #[error(
        "record {record} of {of} is {bytes} bytes with its key, more than a Kafka message may hold (about {limit} bytes: message.max.bytes in [kafka.settings], and the topic's max.message.bytes)"
    )]
    TooLarge {
        /// Which record (from 1, in body order).
        record: usize,
        /// Records in the body.
        of: usize,
        /// Its size with its key.
        bytes: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The broker did not acknowledge every record in time, or refused one:
    /// the caller should retry the whole request.
    #[error("{acknowledged} of {of} records acknowledged before the failure: {reason}")]
    Unavailable {
        /// Records acknowledged (they will come again with the retry).
        acknowledged: usize,
        /// Records in the body.
        of: usize,
        /// The producer's error.
        reason: String,
    },
}

/// How a request to the intake ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every record produced and acknowledged (`200`).
    Accepted,
    /// No valid token (`401`).
    Unauthorized,
    /// Past `max_requests_per_second` (`429`).
    RateLimited,
    /// `max_concurrent_requests` already in progress (`503`).
    Busy,
    /// Body or record too large (`413`).
    TooLarge,
    /// The body did not arrive within `body_timeout_secs` (`408`), or the
    /// caller went away while sending it.
    BodyIncomplete,
    /// A `Content-Encoding` other than `identity` (`415`).
    Unsupported,
    /// The broker did not acknowledge every record (`503`).
    Unavailable,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Accepted,
        Outcome::Unauthorized,
        Outcome::RateLimited,
        Outcome::Busy,
        Outcome::TooLarge,
        Outcome::BodyIncomplete,
        Outcome::Unsupported,
        Outcome::Unavailable,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Unauthorized => "unauthorized",
            Outcome::RateLimited => "rate_limited",
            Outcome::Busy => "busy",
            Outcome::TooLarge => "too_large",
            Outcome::BodyIncomplete => "body_incomplete",
            Outcome::Unsupported => "unsupported_encoding",
            Outcome::Unavailable => "unavailable",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .expect("listed")
    }
}

/// The intake's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct IntakeMetrics {
    requests: [AtomicU64; Outcome::ALL.len()],
    produced: AtomicU64,
    undecodable: AtomicU64,
    in_flight: AtomicU64,
}

impl IntakeMetrics {
    /// Counts a request's outcome.
    pub fn count(&self, outcome: Outcome) {
        self.requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that ended in `outcome` so far.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests[outcome.index()].load(Ordering::Relaxed)
    }

    /// A request is being read or produced until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// The counters as exposed samples.
    pub fn samples(&self) -> Vec<Sample> {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut out: Vec<Sample> = Outcome::ALL
            .iter()
            .map(|o| Sample {
                name: "keywatch_intake_requests_total",
                help: "Requests to POST /v1/logs by outcome (accepted, unauthorized, rate_limited, busy, too_large, body_incomplete, unsupported_encoding, unavailable).",
                kind: Kind::Counter,
                labels: vec![("outcome", o.as_str().to_string())],
                value: c(&self.requests[o.index()]),
            })
            .collect();
        let one = |name, help, kind, value| Sample {
            name,
            help,
            kind,
            labels: Vec::new(),
            value,
        };
        out.push(one(
            "keywatch_intake_records_total",
            "Records of accepted intake requests, every one acknowledged by the broker (undecodable ones included).",
            Kind::Counter,
            c(&self.produced),
        ));
        out.push(one(
            "keywatch_intake_records_undecodable_total",
            "Of those, records that did not decode: produced without a key, for the pipeline to dead-letter.",
            Kind::Counter,
            c(&self.undecodable),
        ));
        out.push(one(
            "keywatch_intake_requests_in_flight",
            "Intake requests being read or produced now.",
            Kind::Gauge,
            c(&self.in_flight),
        ));
        out
    }
}

/// See [`IntakeMetrics::in_flight`].
#[derive(Debug)]
pub struct InFlight(Arc<IntakeMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The producing side of the intake: the topic, how its records are read,
/// and the producer.
pub struct Intake {
    topic: String,
    format: Format,
    decoder: Decoder,
    client: ClientConfig,
    producer: Mutex<Arc<FutureProducer>>,
    timeout: Duration,
    max_message_bytes: usize,
    metrics: Arc<IntakeMetrics>,
}

impl fmt::Debug for Intake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client settings may hold SASL passwords: not shown.
        f.debug_struct("Intake")
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// The producer for `[intake]`, with `[kafka]`'s brokers and client
    /// settings: `acks=all`, idempotent, `message.timeout.ms` the intake's
    /// produce timeout. Records are read in the intake topic's format.
    pub fn new(
        cfg: &IntakeConfig,
        kafka: &KafkaConfig,
        decoder: Decoder,
    ) -> Result<Intake, PipelineError> {
        cfg.validate(kafka)?;
        let topic = cfg.topic_in(kafka).to_string();
        let settings = kafka.client_settings()?;
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &settings {
            client.set(k, v);
        }
        client
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string());
        let max_message_bytes = settings
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let producer = Arc::new(create(&client)?);
        Ok(Intake {
            format: kafka.format_of(&topic),
            topic,
            decoder,
            client,
            producer: Mutex::new(producer),
            timeout: Duration::from_millis(cfg.produce_timeout_ms),
            max_message_bytes,
            metrics: Arc::default(),
        })
    }

    /// The topic records go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The intake's counters.
    pub fn metrics(&self) -> Arc<IntakeMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Produces every record of `body` to the topic, keyed by its user,
    /// and waits for every acknowledgement. Counts the records; the
    /// request's outcome is the caller's to count.
    pub async fn produce(&self, body: Vec<u8>) -> Result<Produced, IntakeError> {
        let (decoder, format, topic) = (self.decoder.clone(), self.format, self.topic.clone());
        // Decoding hashes prompts and keys: off the async threads.
        let (body, planned) = tokio::task::spawn_blocking(move || {
            let planned = plan(&body, &decoder, format, &topic);
            (body, planned)
        })
        .await
        .map_err(|e| IntakeError::Unavailable {
            acknowledged: 0,
            of: 0,
            reason: format!("cutting the body into records failed: {e}"),
        })?;
        let of = planned.len();
        for (i, p) in planned.iter().enumerate() {
            let bytes = p.range.len() + p.key.as_ref().map_or(0, String::len);
            if bytes + MESSAGE_OVERHEAD > self.max_message_bytes {
                return Err(IntakeError::TooLarge {
                    record: i + 1,
                    of,
                    bytes,
                    limit: self.max_message_bytes,
                });
            }
        }
        let producer = Arc::clone(&self.producer.lock().expect("intake producer lock"));
        // librdkafka fails each message at `message.timeout.ms`; this is
        // only the backstop.
        let deadline = tokio::time::Instant::now() + self.timeout + Duration::from_secs(5);
        let mut pending = Vec::with_capacity(of);
        for (i, p) in planned.iter().enumerate() {
            let mut rec =
                FutureRecord::<str, [u8]>::to(&self.topic).payload(&body[p.range.clone()]);
            if let Some(k) = &p.key {
                rec = rec.key(k.as_str());
            }
            loop {
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(self.failed(&producer, i, of, 0, e)),
                }
            }
        }
        let mut acknowledged = 0;
        let mut failure = None;
        for (i, f) in pending.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, f).await {
                Ok(Ok(Ok(_))) => acknowledged += 1,
                Ok(Ok(Err((e, _)))) => {
                    failure.get_or_insert((i, e));
                }
                Ok(Err(_)) => {
                    failure.get_or_insert((i, KafkaError::Canceled));
                }
                Err(_) => {
                    failure.get_or_insert((
                        i,
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                    ));
                }
            }
        }
        if let Some((i, e)) = failure {
            return Err(self.failed(&producer, i, of, acknowledged, e));
        }
        let undecodable = planned.iter().filter(|p| p.key.is_none()).count();
        self.metrics
            .produced
            .fetch_add(of as u64, Ordering::Relaxed);
        self.metrics
            .undecodable
            .fetch_add(undecodable as u64, Ordering::Relaxed);
        Ok(Produced {
            accepted: of,
            undecodable,
        })
    }

    /// The request's error for the producer's `e` at record `i`.
    ///
    /// After a failure the producer is replaced by a fresh one (a new
    /// producer id), so the retry starts clean: an idempotent producer whose
    /// messages timed out must bump its epoch, which not every
    /// Kafka-protocol broker handles (after tansu 0.6.0 restarts, every
    /// later produce of the old producer fails), and one left in a fatal
    /// state never produces again.
    fn failed(
        &self,
        producer: &Arc<FutureProducer>,
        i: usize,
        of: usize,
        acknowledged: usize,
        e: KafkaError,
    ) -> IntakeError {
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
            return IntakeError::TooLarge {
                record: i + 1,
                of,
                bytes: 0,
                limit: self.max_message_bytes,
            };
        }
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(topic = %self.topic, error = %reason, code = ?code, "intake producer failed fatally");
        }
        self.replace(producer);
        IntakeError::Unavailable {
            acknowledged,
            of,
            reason: e.to_string(),
        }
    }

    /// Puts a fresh producer in place of `old`, unless another failed
    /// request did already. `old` is dropped on a thread of its own once no
    /// request holds it: dropping a producer blocks (librdkafka purges,
    /// flushes and joins its threads).
    fn replace(&self, old: &Arc<FutureProducer>) {
        let mut slot = self.producer.lock().expect("intake producer lock");
        if !Arc::ptr_eq(&slot, old) {
            return;
        }
        let fresh = match create(&self.client) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "making a new intake producer failed; keeping the old one");
                return;
            }
        };
        let retired = std::mem::replace(&mut *slot, fresh);
        drop(slot);
        let spawned = std::thread::Builder::new()
            .name("kw-intake-retire".into())
            .spawn(move || {
                while Arc::strong_count(&retired) > 1 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                drop(retired);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "retiring the old intake producer: no thread");
        }
    }
}

fn create(client: &ClientConfig) -> Result<FutureProducer, PipelineError> {
    client.create().map_err(|source| PipelineError::Kafka {
        what: "creating the intake producer",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TopicEntry;

    fn cut(body: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_body(body.as_bytes(), |r| {
            out.push(String::from_utf8_lossy(r).into_owned())
        });
        out
    }

    const A: &str =
        r#"{"ts":"2026-11-23T10:00:00Z","request_id":"r1","user_id":"u1","key_id":"k1"}"#;
    const B: &str =
        r#"{"ts":"2026-11-23T10:00:01Z","request_id":"r2","user_id":"u2","key_id":"k2"}"#;

    #[test]
    fn ndjson_lines_are_records_and_blank_lines_are_skipped() {
        assert_eq!(cut(&format!("{A}\n{B}\n")), [A, B]);
        assert_eq!(cut(&format!("\r\n{A}\r\n\r\n  \n{B}")), [A, B]);
        assert_eq!(cut(""), Vec::<String>::new());
        assert_eq!(cut(" \n\n "), Vec::<String>::new());
        // A broken line is one record as it stands; its neighbours are not touched.
        assert_eq!(
            cut(&format!("{A}\n{{\"ts\":\"2026\n{B}")),
            [A, "{\"ts\":\"2026", B]
        );
        assert_eq!(cut(&format!("{A}\nnot json\n")), [A, "not json"]);
    }

    #[test]
    fn one_value_is_the_body_however_it_is_laid_out() {
        assert_eq!(cut(A), [A]);
        assert_eq!(cut(&format!("\u{feff}{A}\n")), [A]);
        let pretty = "{\n  \"user_id\": \"u\",\n  \"s\": \"a } \\\" ]\"\n}";
        assert_eq!(cut(pretty), [pretty]);
        // An array's elements are the records, laid out as they may be.
        assert_eq!(cut(&format!("[{A},{B}]")), [A, B]);
        assert_eq!(cut(&format!("[\n  {A},\n\n  {B}\n]\n")), [A, B]);
        assert_eq!(cut("[]"), Vec::<String>::new());
        assert_eq!(cut("[1, \"x\"]"), ["1", "\"x\""]);
        // Arrays as NDJSON lines.
        assert_eq!(cut(&format!("[{A}]\n[{B}]")), [A, B]);
    }

    #[test]
    fn a_broken_array_keeps_its_good_elements_and_the_rest_is_one_record() {
        let body = format!("[{A},{{\"b\":tru}},{B}]");
        let got = cut(&body);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], A);
        assert_eq!(got[1], format!("{{\"b\":tru}},{B}]"));
        // Unclosed: the body is its one line, an array whose end is missing.
        let got = cut(&format!("[{A},"));
        assert_eq!(got[0], A);
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn values_end_by_brackets_and_strings() {
        for (b, want) in [
            ("{}", true),
            ("{\"a\":\"}\"}", true),
            ("{\"a\":\"\\\\\"}", true),
            ("{\"a\":\"\\\"}", false),
            ("{\"a\":[1,{}]} ", false),
            ("{} {}", false),
            ("{\"a\":1", false),
            ("\"x\"", true),
            ("\"x", false),
            ("42", true),
            ("4 2", false),
            ("[[]]", true),
        ] {
            assert_eq!(one_value(b.as_bytes()), want, "{b}");
        }
    }

    #[test]
    fn records_are_keyed_by_their_user_in_the_topic_format() {
        let dec = Decoder::new(b"test-key");
        let body = format!("[{A},{{\"hello\":1}},{B}]");
        let p = plan(body.as_bytes(), &dec, Format::Canonical, "gw");
        let keys: Vec<Option<&str>> = p.iter().map(|p| p.key.as_deref()).collect();
        assert_eq!(keys, [Some("u1"), None, Some("u2")]);
        // The ranges are the records' bytes in the body, unchanged.
        assert_eq!(&body[p[0].range.clone()], A);
        assert_eq!(&body[p[1].range.clone()], "{\"hello\":1}");
        // Read as another gateway's format, a canonical record is undecodable.
        let p = plan(A.as_bytes(), &dec, Format::Kong, "gw");
        assert_eq!(p[0].key, None);
        let p = plan(A.as_bytes(), &dec, Format::Auto, "gw");
        assert_eq!(p[0].key.as_deref(), Some("u1"));
    }

    fn kafka() -> KafkaConfig {
        KafkaConfig {
            topics: vec![
                "gw".into(),
                TopicEntry::Table {
                    name: "litellm".into(),
                    format: Format::Litellm,
                },
            ],
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn config_errors_name_the_field_and_never_show_the_token() {
        let k = kafka();
        let mut c = IntakeConfig::default();
        c.validate(&k).unwrap();
        assert_eq!(c.topic_in(&k), "gw");
        c.topic = Some("litellm".into());
        assert_eq!(c.topic_in(&k), "litellm");
        c.topic = Some("other".into());
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(
            e.starts_with("intake.topic: \"other\" is not one of kafka.topics (gw, litellm)"),
            "{e}"
        );
        c.topic = None;
        c.enabled = true;
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(e.starts_with("intake.token: not set"), "{e}");
        c.token = Some("short secret".into());
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(
            e.starts_with("intake.token: must be at least 16") && !e.contains("short secret"),
            "{e}"
        );
        c.token = Some("a-long-enough-intake-token".into());
        c.validate(&k).unwrap();
        assert!(!format!("{c:?}").contains("a-long-enough"));
        assert!(!format!("{:?}", c.token().unwrap()).contains("a-long-enough"));
        c.token_sha256 = Some(c.token().unwrap().sha256_hex());
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(e.contains("only one of"), "{e}");
        c.token = None;
        let t = c.token().unwrap();
        assert!(t.matches("a-long-enough-intake-token"));
        assert!(!t.matches("a-long-enough-intake-tokeN"));
        c.token_sha256 = Some("xyz".into());
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(
            e.starts_with("intake.token_sha256: must be 64 hex digits"),
            "{e}"
        );
        c.token_sha256 = None;
        c.token_file = Some("/nonexistent/intake-token".into());
        let e = c.validate(&k).unwrap_err().to_string();
        assert!(
            e.starts_with("intake.token_file: reading /nonexistent/intake-token"),
            "{e}"
        );
        for (field, set) in [
            (
                "intake.max_body_bytes",
                (|c: &mut IntakeConfig| c.max_body_bytes = 10) as fn(&mut IntakeConfig),
            ),
            ("intake.max_requests_per_second", |c| {
                c.max_requests_per_second = 0
            }),
            ("intake.max_concurrent_requests", |c| {
                c.max_concurrent_requests = 0
            }),
            ("intake.produce_timeout_ms", |c| c.produce_timeout_ms = 5),
            ("intake.body_timeout_secs", |c| c.body_timeout_secs = 0),
        ] {
            let mut c = IntakeConfig::default();
            set(&mut c);
            let e = c.validate(&k).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{field}: must be from")), "{e}");
        }
    }

    #[test]
    fn outcomes_are_counted_by_label() {
        let m = Arc::new(IntakeMetrics::default());
        m.count(Outcome::Accepted);
        m.count(Outcome::Unavailable);
        m.count(Outcome::Unavailable);
        let g = m.in_flight();
        let s = m.samples();
        let get = |name: &str, label: Option<&str>| {
            s.iter()
                .find(|x| x.name == name && label.is_none_or(|l| x.labels[0].1 == l))
                .map(|x| x.value)
        };
        assert_eq!(
            get("keywatch_intake_requests_total", Some("unavailable")),
            Some(2.0)
        );
        assert_eq!(
            get("keywatch_intake_requests_total", Some("accepted")),
            Some(1.0)
        );
        assert_eq!(get("keywatch_intake_requests_in_flight", None), Some(1.0));
        drop(g);
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
    }
}
