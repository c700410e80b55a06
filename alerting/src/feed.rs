//! The HTTP side: the revocation feed gateways poll, the blocklist, health
//! and Prometheus metrics (contracts/alerts-and-feed.md).
//!
//! - `GET /v1/revocations?after=SEQ&wait=SECONDS`: actions with `seq > SEQ`,
//!   oldest first; with `wait`, held open until one exists (long poll). A
//!   Postgres `NOTIFY` at the writing transaction's commit wakes waiting
//!   polls, so a gateway hears of a block milliseconds after it commits.
//!   Sequence numbers become visible in order (migration 0003), so a
//!   cursor never skips an action committed late.
//! - `GET /v1/blocklist`: every key blocked or throttled now, with an
//!   `ETag` (`If-None-Match` gets `304`).
//! - `GET /healthz` (no token): `200 ok` when Postgres answers, else `503`.
//! - `GET /metrics` (no token; bind the server to an internal address).
//!
//! Gateways authenticate with bearer tokens stored as SHA-256 hashes and
//! compared in constant time; every authentication failure gets the same
//! `401`. Each client (and, for failures, each remote address) has a token
//! bucket; past it, `429` with `Retry-After`. Connections are held to
//! header and write timeouts and capped, with authenticated gateways
//! first ([`crate::listen`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Extension, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use detectors::time::format_rfc3339;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgListener, PgPool};
use storage::feed::{Feed, FeedRow};
use storage::StorageError;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::FeedConfig;
use crate::listen::{self, Conn, ConnMetrics, Limits};
use crate::metrics::{Exposition, Sources};
use crate::request::{self, Poll};

/// The body of every `401`, whatever was wrong.
const UNAUTHORIZED: &str = "{\"error\":\"unauthorized\"}";
/// A waiting poll re-reads at least this often, even without a notification.
const SAFETY_POLL: Duration = Duration::from_secs(1);

/// Lower-case hex SHA-256 of a bearer token: what `feed.clients` stores.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The longest long poll a config may allow.
pub const MAX_WAIT_SECS: u64 = 3600;
/// The most actions one answer may carry.
pub const MAX_ACTIONS: u32 = 100_000;
/// The highest per-client request rate.
pub const MAX_REQUESTS_PER_MINUTE: u32 = 1_000_000;
/// The longest header or write timeout a config may set.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// The most connections a config may allow.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

/// Checks `[feed]`: unique client names, well-formed token hashes, and
/// durations and counts within bounds.
pub fn validate(cfg: &FeedConfig) -> Result<(), String> {
    for (i, c) in cfg.clients.iter().enumerate() {
        if c.name.is_empty() {
            return Err(format!("feed.clients[{i}].name: must not be empty"));
        }
        if cfg.clients[..i].iter().any(|o| o.name == c.name) {
            return Err(format!(
                "feed.clients[{i}].name: \"{}\" is used twice",
                c.name
            ));
        }
        let h = &c.token_sha256;
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "feed.clients[{i}].token_sha256: must be 64 hex digits (the SHA-256 of the token; `keywatch token {}` makes one)",
                c.name
            ));
        }
    }
    if !(1..=MAX_REQUESTS_PER_MINUTE).contains(&cfg.requests_per_minute) {
        return Err(format!(
            "feed.requests_per_minute: must be from 1 to {MAX_REQUESTS_PER_MINUTE}, got {}",
            cfg.requests_per_minute
        ));
    }
    if !(1..=MAX_ACTIONS).contains(&cfg.max_actions) {
        return Err(format!(
            "feed.max_actions: must be from 1 to {MAX_ACTIONS}, got {}",
            cfg.max_actions
        ));
    }
    if cfg.max_wait_secs > MAX_WAIT_SECS {
        return Err(format!(
            "feed.max_wait_secs: must be at most {MAX_WAIT_SECS} (an hour), got {}",
            cfg.max_wait_secs
        ));
    }
    for (name, v) in [
        ("header_timeout_secs", cfg.header_timeout_secs),
        ("write_timeout_secs", cfg.write_timeout_secs),
    ] {
        if !(1..=MAX_TIMEOUT_SECS).contains(&v) {
            return Err(format!(
                "feed.{name}: must be from 1 to {MAX_TIMEOUT_SECS}, got {v}"
            ));
        }
    }
    if !(1..=MAX_CONNECTIONS).contains(&cfg.max_connections) {
        return Err(format!(
            "feed.max_connections: must be from 1 to {MAX_CONNECTIONS}, got {}",
            cfg.max_connections
        ));
    }
    if !(1..=cfg.max_connections).contains(&cfg.max_connections_per_address) {
        return Err(format!(
            "feed.max_connections_per_address: must be from 1 to max_connections ({}), got {}",
            cfg.max_connections, cfg.max_connections_per_address
        ));
    }
    Ok(())
}

/// Requests served, by endpoint and status (for `/metrics`).
#[derive(Debug, Default)]
pub struct FeedMetrics {
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    /// The server's connections.
    pub connections: Arc<ConnMetrics>,
}

impl FeedMetrics {
    fn count(&self, endpoint: &'static str, status: StatusCode) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((endpoint, status.as_u16()))
            .or_default() += 1;
    }

    /// `(endpoint, status) -> requests`.
    pub fn snapshot(&self) -> Vec<((&'static str, u16), u64)> {
        let mut v: Vec<_> = self
            .requests
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort();
        v
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by client name (or remote address for failed authentications).
struct Limiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    fn new(per_minute: u32) -> Limiter {
        Limiter {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(per_minute),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&self, who: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.buckets.lock().expect("limiter lock");
        if map.len() > 100_000 {
            // Addresses of failed attempts could grow without end: forget full buckets.
            let (burst, per_sec) = (self.burst, self.per_sec);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
        }
        let b = map.entry(who.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_sec))
        }
    }
}

struct AppState {
    feed: Feed,
    cfg: FeedConfig,
    clients: Vec<(String, [u8; 32])>,
    limiter: Limiter,
    latest: watch::Receiver<i64>,
    metrics: Arc<FeedMetrics>,
    sources: Sources,
    /// Turns true when the server stops: waiting polls answer at once.
    stop: watch::Receiver<bool>,
}

/// Serves until `stop` turns true. `listener` is bound by the caller (so
/// tests can use port 0). A background task LISTENs for new actions.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: PgPool,
    cfg: FeedConfig,
    sources: Sources,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(listener, pool, cfg, sources, Router::new(), stop).await
}

/// [`serve`] with more `routes` on the same listener, under the same
/// connection rules (the binary's `POST /v1/logs` intake). A route there
/// marks its connection authenticated itself ([`Conn`]).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    pool: PgPool,
    cfg: FeedConfig,
    sources: Sources,
    routes: Router,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let clients = cfg
        .clients
        .iter()
        .map(|c| {
            let mut h = [0u8; 32];
            for (i, b) in h.iter_mut().enumerate() {
                *b = u8::from_str_radix(&c.token_sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            (c.name.clone(), h)
        })
        .collect();
    let (tx, latest) = watch::channel(0i64);
    let feed = Feed::new(pool);
    let watcher = tokio::spawn(watch_feed(feed.clone(), tx, stop.clone()));
    let metrics = Arc::new(FeedMetrics::default());
    let connections = Arc::clone(&metrics.connections);
    let state = Arc::new(AppState {
        limiter: Limiter::new(cfg.requests_per_minute),
        feed,
        stop: stop.clone(),
        cfg: cfg.clone(),
        clients,
        latest,
        metrics: Arc::clone(&metrics),
        sources: Sources {
            feed: Some(metrics),
            ..sources
        },
    });
    let app = Router::new()
        .route("/v1/revocations", get(revocations))
        .route("/v1/blocklist", get(blocklist))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        .with_state(state)
        .merge(routes);
    let r = listen::serve(listener, app, Limits::of(&cfg), connections, stop).await;
    watcher.abort();
    r
}

/// Keeps `tx` at the newest committed sequence number: LISTEN for the
/// trigger's notifications, and read the maximum after every (re)connect.
async fn watch_feed(feed: Feed, tx: watch::Sender<i64>, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let mut l = match PgListener::connect_with(feed.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polls fall back to re-reading every second");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if l.listen("keywatch_feed").await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Ok(m) = feed.newest_seq().await {
            tx.send_if_modified(|v| std::mem::replace(v, (*v).max(m)) < m);
        }
        // Ok(None) or Err: the connection was lost; reconnect and re-read the maximum.
        while let Ok(Some(n)) = l.try_recv().await {
            if let Ok(seq) = n.payload().parse::<i64>() {
                tx.send_if_modified(|v| std::mem::replace(v, (*v).max(seq)) < seq);
            }
        }
    }
}

/// One action as the feed shows it.
#[derive(Serialize)]
struct FeedAction {
    seq: i64,
    key_id: Option<String>,
    user_id: String,
    /// The address, for an address action (an extension of the contract;
    /// absent for key and user actions).
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    action: String,
    reason: String,
    alert_id: Option<String>,
    issued_at: String,
    expires_at: Option<String>,
}

/// A `/v1/revocations` answer.
#[derive(Serialize)]
struct Page {
    actions: Vec<FeedAction>,
    next_after: i64,
    /// The cursor was past the newest action (a restored database, a made-up
    /// cursor): `next_after` is the newest, and the gateway should resync
    /// from `/v1/blocklist`. Absent when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cursor_ahead: bool,
}

/// A `/v1/blocklist` answer.
#[derive(Serialize)]
struct Blocklist {
    entries: Vec<FeedAction>,
}

fn action_of(row: FeedRow) -> FeedAction {
    FeedAction {
        seq: row.seq,
        key_id: row.key_id,
        user_id: row.user_id,
        ip: row.ip,
        action: row.action,
        reason: row.reason,
        alert_id: row.alert_id,
        issued_at: format_rfc3339(row.issued_ms),
        expires_at: row.expires_ms.map(format_rfc3339),
    }
}

/// Authenticates and rate-limits; the client's name, or the answer to send.
fn admit(
    st: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    conn: Option<&Conn>,
    endpoint: &'static str,
) -> Result<String, Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| request::bearer_token(v.as_bytes()));
    let client = token.and_then(|t| {
        let h: [u8; 32] = Sha256::digest(t.as_bytes()).into();
        // Compare with every client, so the time taken says nothing about which matched.
        let mut found = None;
        for (name, want) in &st.clients {
            if bool::from(h.ct_eq(want)) {
                found = Some(name.clone());
            }
        }
        found
    });
    let bucket = match &client {
        Some(name) => format!("client:{name}"),
        None => format!("addr:{}", peer_ip(peer)),
    };
    if let Err(wait) = st.limiter.take(&bucket) {
        st.metrics.count(endpoint, StatusCode::TOO_MANY_REQUESTS);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(Box::new(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, HeaderValue::from(secs)),
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    ),
                ],
                "{\"error\":\"rate limited\"}",
            )
                .into_response(),
        ));
    }
    match client {
        Some(name) => {
            if let Some(c) = conn {
                c.authenticated();
            }
            Ok(name)
        }
        None => {
            st.metrics.count(endpoint, StatusCode::UNAUTHORIZED);
            Err(Box::new(
                (
                    StatusCode::UNAUTHORIZED,
                    [
                        (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        ),
                    ],
                    UNAUTHORIZED,
                )
                    .into_response(),
            ))
        }
    }
}

fn peer_ip(peer: SocketAddr) -> IpAddr {
    peer.ip()
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn bad_request(msg: String) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": msg }).to_string(),
    )
}

/// Postgres is unavailable: counted, logged, and answered 503.
fn unavailable(st: &AppState, endpoint: &'static str, e: StorageError) -> Response {
    st.metrics.count(endpoint, StatusCode::SERVICE_UNAVAILABLE);
    tracing::warn!(error = %e.detail(), "feed request: Postgres unavailable");
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "{\"error\":\"the feed's database is unavailable; retry\"}".into(),
    )
}

async fn revocations(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    conn: Option<Extension<Conn>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    const EP: &str = "revocations";
    if let Err(r) = admit(&st, &headers, peer, conn.as_deref(), EP) {
        return *r;
    }
    let Poll { after, wait, limit } =
        match request::parse_poll(query.as_deref(), st.cfg.max_wait_secs, st.cfg.max_actions) {
            Ok(p) => p,
            Err(e) => {
                st.metrics.count(EP, StatusCode::BAD_REQUEST);
                return bad_request(e);
            }
        };
    // `wait` is at most `max_wait_secs` (validated to an hour); checked all
    // the same, so no config can make a poll panic.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(Duration::from_secs(wait))
        .unwrap_or(now + Duration::from_secs(MAX_WAIT_SECS));
    let mut latest = st.latest.clone();
    let mut first = true;
    loop {
        latest.mark_unchanged();
        let rows = st.feed.after(after, limit).await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                return unavailable(&st, EP, e);
            }
        };
        let mut newest = None;
        if rows.is_empty() && first {
            // Only on the first read: a cursor cannot pass the feed while it waits.
            match st.feed.newest_seq().await {
                Ok(m) => newest = Some(m).filter(|&m| after > m),
                Err(e) => {
                    return unavailable(&st, EP, e);
                }
            }
        }
        first = false;
        let now = tokio::time::Instant::now();
        if !rows.is_empty() || newest.is_some() || now >= deadline || *st.stop.borrow() {
            let actions: Vec<FeedAction> = rows.into_iter().map(action_of).collect();
            let next_after = newest.unwrap_or_else(|| actions.last().map_or(after, |a| a.seq));
            st.metrics.count(EP, StatusCode::OK);
            let page = Page {
                actions,
                next_after,
                cursor_ahead: newest.is_some(),
            };
            return json_response(
                StatusCode::OK,
                serde_json::to_string(&page).expect("a page serializes"),
            );
        }
        let nap = (deadline - now).min(SAFETY_POLL);
        let mut stop = st.stop.clone();
        tokio::select! {
            _ = tokio::time::timeout(nap, latest.changed()) => {}
            _ = listen::stopped(&mut stop) => {}
        }
    }
}

async fn blocklist(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    conn: Option<Extension<Conn>>,
    headers: HeaderMap,
) -> Response {
    const EP: &str = "blocklist";
    if let Err(r) = admit(&st, &headers, peer, conn.as_deref(), EP) {
        return *r;
    }
    // The view (migration 0003) defines "in force": not expired, not lifted.
    let rows = st.feed.in_force().await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            return unavailable(&st, EP, e);
        }
    };
    let entries: Vec<FeedAction> = rows.into_iter().map(action_of).collect();
    let body = serde_json::to_string(&Blocklist { entries }).expect("a blocklist serializes");
    let etag = format!("\"{}\"", &hex(&Sha256::digest(body.as_bytes()))[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| request::etag_matches(v.as_bytes(), &etag));
    let etag_value = HeaderValue::from_str(&etag).expect("hex is a valid header");
    if matches {
        st.metrics.count(EP, StatusCode::NOT_MODIFIED);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    st.metrics.count(EP, StatusCode::OK);
    (
        StatusCode::OK,
        [
            (header::ETAG, etag_value),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    match st.feed.ping().await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e.detail(), "health check: Postgres unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "postgres unavailable\n").into_response()
        }
    }
}

async fn metrics_page(State(st): State<Arc<AppState>>) -> Response {
    let mut out = Exposition::default();
    st.sources.render(&mut out);
    out.gauge(
        "keywatch_feed_latest_seq",
        "Newest revocation-feed sequence number this instance has seen.",
        &[],
        *st.latest.borrow() as f64,
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out.finish(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn limiter_refills_and_says_when() {
        let l = Limiter::new(60);
        for _ in 0..60 {
            l.take("a").unwrap();
        }
        let wait = l.take("a").unwrap_err();
        assert!(
            wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        l.take("b").unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut cfg = FeedConfig::default();
        cfg.clients.push(crate::config::FeedClient {
            name: "gw".into(),
            token_sha256: "xyz".into(),
        });
        let e = validate(&cfg).unwrap_err();
        assert!(e.contains("feed.clients[0].token_sha256"), "{e}");
        cfg.clients[0].token_sha256 = hash_token("t");
        validate(&cfg).unwrap();
        // Durations and counts are bounded: the long poll's deadline
        // cannot overflow.
        cfg.max_wait_secs = i64::MAX as u64;
        let e = validate(&cfg).unwrap_err();
        assert!(
            e.starts_with("feed.max_wait_secs: must be at most 3600"),
            "{e}"
        );
        cfg.max_wait_secs = MAX_WAIT_SECS;
        validate(&cfg).unwrap();
        cfg.max_actions = u32::MAX;
        let e = validate(&cfg).unwrap_err();
        assert!(
            e.starts_with("feed.max_actions: must be from 1 to 100000"),
            "{e}"
        );
        cfg.clients.push(cfg.clients[0].clone());
        assert!(validate(&cfg).unwrap_err().contains("used twice"));
    }
}
