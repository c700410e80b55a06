//! `POST /v1/logs`: the HTTP intake, on the feed's listener, for gateways
//! without a Kafka sink (docs/intake.md). This is the HTTP half; producing
//! is [`ingest::intake`].
//!
//! In order, a request is: authenticated (its own bearer token, not a feed
//! token: `401`), checked for a `Content-Encoding` (`415`), rate-limited
//! over all callers (`429` + `Retry-After`), given one of
//! `max_concurrent_requests` slots (`503` + `Retry-After`), held to
//! `max_body_bytes` (`413`, by `Content-Length` before reading, else while
//! reading) and `body_timeout_secs` (`408`), and produced: `200` once every
//! record is acknowledged, else `503` + `Retry-After` (or `413` for a
//! record larger than a Kafka message may be).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alerting::listen::Conn;
use alerting::metrics::{Exposition, Render};
use anyhow::{Context, Result};
use axum::body::{Body, HttpBody as _};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ingest::intake::{Intake, IntakeError, IntakeMetrics, Outcome, Token};
use ingest::telemetry::Kind;
use tokio::sync::Semaphore;

use crate::config::Config;

/// `Retry-After` when the broker did not acknowledge a request's records.
const RETRY_UNAVAILABLE_SECS: u64 = 5;
/// `Retry-After` when every slot is taken.
const RETRY_BUSY_SECS: u64 = 1;
/// The most memory set aside for a body before it arrives (it grows as it
/// does, up to `max_body_bytes`).
const MAX_RESERVE: usize = 1 << 20;

/// The intake's route and what it needs.
pub struct IntakeServer {
    intake: Intake,
    token: Token,
    bucket: Mutex<Bucket>,
    slots: Arc<Semaphore>,
    max_body: usize,
    body_timeout: Duration,
    metrics: Arc<IntakeMetrics>,
}

/// A token bucket over all callers: `rate` a second, holding `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

impl IntakeServer {
    /// The intake of `cfg`, or `None` when `intake.enabled` is false.
    pub fn new(cfg: &Config) -> Result<Option<Arc<IntakeServer>>> {
        let c = &cfg.intake;
        if !c.enabled {
            return Ok(None);
        }
        let token = c.token()?;
        let (decoder, _) = cfg.decoder()?;
        let intake = Intake::new(c, &cfg.kafka, decoder).context("starting the intake")?;
        let rate = f64::from(c.max_requests_per_second);
        Ok(Some(Arc::new(IntakeServer {
            metrics: intake.metrics(),
            intake,
            token,
            bucket: Mutex::new(Bucket {
                rate,
                tokens: rate,
                at: Instant::now(),
            }),
            slots: Arc::new(Semaphore::new(c.max_concurrent_requests as usize)),
            max_body: c.max_body_bytes,
            body_timeout: Duration::from_secs(c.body_timeout_secs),
        })))
    }

    /// The topic records go to.
    pub fn topic(&self) -> &str {
        self.intake.topic()
    }

    /// `POST /v1/logs`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/logs", post(logs))
            .with_state(Arc::clone(self))
    }

    /// The intake's part of `/metrics`.
    pub fn render(&self) -> Render {
        let m = Arc::clone(&self.metrics);
        Arc::new(move |out: &mut Exposition| {
            for s in m.samples() {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                match s.kind {
                    Kind::Counter => out.counter(s.name, s.help, &labels, s.value),
                    Kind::Gauge => out.gauge(s.name, s.help, &labels, s.value),
                }
            }
        })
    }
}

fn answer(status: StatusCode, retry_after: Option<u64>, body: serde_json::Value) -> Response {
    let mut r = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response();
    if let Some(secs) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn error(status: StatusCode, retry_after: Option<u64>, msg: impl std::fmt::Display) -> Response {
    answer(
        status,
        retry_after,
        serde_json::json!({ "error": msg.to_string() }),
    )
}

/// Why a body was not read whole.
enum Unread {
    TooLarge,
    Broken,
}

/// Reads the body, failing as soon as it passes `max` bytes.
async fn read_body(mut body: Body, max: usize, declared: Option<usize>) -> Result<Vec<u8>, Unread> {
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max).min(MAX_RESERVE));
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame.map_err(|_| Unread::Broken)?.into_data() else {
            continue; // trailers
        };
        if out.len() + data.len() > max {
            return Err(Unread::TooLarge);
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

async fn logs(
    State(st): State<Arc<IntakeServer>>,
    conn: Option<Extension<Conn>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let m = &st.metrics;
    let fail = |outcome, status, retry_after, msg: &dyn std::fmt::Display| {
        m.count(outcome);
        error(status, retry_after, msg)
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| alerting::request::bearer_token(v.as_bytes()));
    if !presented.is_some_and(|t| st.token.matches(t)) {
        return fail(
            Outcome::Unauthorized,
            StatusCode::UNAUTHORIZED,
            None,
            &"unauthorized",
        );
    }
    if let Some(c) = conn {
        // A gateway's connection: never evicted for another.
        c.authenticated();
    }
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return fail(
                Outcome::Unsupported,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
                &"Content-Encoding is not supported: send the body uncompressed",
            );
        }
    }
    let limited = st.bucket.lock().expect("intake bucket").take();
    if let Err(wait) = limited {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return fail(
            Outcome::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            Some(secs),
            &"rate limited (intake.max_requests_per_second)",
        );
    }
    let Ok(_slot) = Arc::clone(&st.slots).try_acquire_owned() else {
        return fail(
            Outcome::Busy,
            StatusCode::SERVICE_UNAVAILABLE,
            Some(RETRY_BUSY_SECS),
            &"busy: intake.max_concurrent_requests requests in progress; retry",
        );
    };
    let _in_flight = m.in_flight();
    let too_large = || {
        format!(
            "the body is larger than intake.max_body_bytes ({} bytes)",
            st.max_body
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if declared.is_some_and(|n| n > st.max_body) {
        return fail(
            Outcome::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            &too_large(),
        );
    }
    let body =
        match tokio::time::timeout(st.body_timeout, read_body(body, st.max_body, declared)).await {
            Ok(Ok(b)) => b,
            Ok(Err(Unread::TooLarge)) => {
                return fail(
                    Outcome::TooLarge,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    &too_large(),
                )
            }
            Ok(Err(Unread::Broken)) => {
                return fail(
                    Outcome::BodyIncomplete,
                    StatusCode::BAD_REQUEST,
                    None,
                    &"the body could not be read whole",
                )
            }
            Err(_) => {
                return fail(
                    Outcome::BodyIncomplete,
                    StatusCode::REQUEST_TIMEOUT,
                    None,
                    &"the body did not arrive within intake.body_timeout_secs",
                )
            }
        };
    match st.intake.produce(body).await {
        Ok(p) => {
            m.count(Outcome::Accepted);
            answer(
                StatusCode::OK,
                None,
                serde_json::json!({
                    "accepted": p.accepted,
                    "undecodable": p.undecodable,
                    "topic": st.intake.topic(),
                }),
            )
        }
        Err(e @ IntakeError::TooLarge { .. }) => {
            fail(Outcome::TooLarge, StatusCode::PAYLOAD_TOO_LARGE, None, &e)
        }
        Err(
            e @ IntakeError::Unavailable {
                acknowledged, of, ..
            },
        ) => {
            tracing::warn!(topic = %st.intake.topic(), error = %e, "intake: records not acknowledged; answered 503");
            m.count(Outcome::Unavailable);
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(RETRY_UNAVAILABLE_SECS),
                serde_json::json!({
                    "error": format!("not every record was acknowledged by Kafka ({e}); retry the whole request"),
                    "acknowledged": acknowledged,
                    "records": of,
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_one_second_and_says_when() {
        let mut b = Bucket {
            rate: 4.0,
            tokens: 4.0,
            at: Instant::now(),
        };
        for _ in 0..4 {
            b.take().unwrap();
        }
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_millis(250), "{wait:?}");
    }
}
