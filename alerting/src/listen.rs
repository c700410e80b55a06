//! The feed's connections: who may hold one, and for how long.
//!
//! The feed faces the people keywatch watches, so a socket that says
//! nothing, says it one byte at a time, or never reads its answer must not
//! keep a gateway from being served. The rules:
//!
//! - **Header timeout.** A connection delivers a complete request head
//!   within `header_timeout_secs` of opening or of its previous answer, or
//!   is closed. The same clock runs between keep-alive requests, so it is
//!   also the idle timeout.
//! - **Write timeout.** An answer the client does not read for
//!   `write_timeout_secs` closes the connection.
//! - **Caps.** At most `max_connections` are open (lowered, when the
//!   process's file-descriptor limit is smaller, to leave room for Postgres,
//!   Kafka and files), and at most `max_connections_per_address` not yet
//!   authenticated from one address (an IPv4 address, an IPv6 /64). A
//!   connection is *authenticated* once one of its requests carried a valid
//!   token; from then on it is never evicted for another.
//! - **The newest unauthenticated connection wins.** A new connection that
//!   would pass a cap evicts the oldest unauthenticated one (of its address,
//!   or anywhere); only when every slot is held by authenticated gateways is
//!   the new one closed at once. A socket farm therefore cannot hold a slot
//!   longer than it takes newer connections to arrive, and a gateway, which
//!   sends its request as soon as it connects, is served.
//!
//! Each rule counts in `keywatch_feed_connections_closed_total{reason}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower_service::Service;

/// File descriptors kept for everything but feed connections.
const RESERVED_FDS: u64 = 128;
/// The largest request head a connection may send.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long open connections get to finish when the server stops.
const DRAIN: Duration = Duration::from_secs(5);

/// The connection rules, from `[feed]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// See the module docs.
    pub header_timeout: Duration,
    /// See the module docs.
    pub write_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Unauthenticated connections from one address at most.
    pub per_address: usize,
}

impl Limits {
    /// The rules `[feed]` sets.
    pub fn of(cfg: &crate::FeedConfig) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(cfg.header_timeout_secs),
            write_timeout: Duration::from_secs(cfg.write_timeout_secs),
            max_connections: cfg.max_connections as usize,
            per_address: cfg.max_connections_per_address as usize,
        }
    }
}

/// Why a connection ended early (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    HeaderTimeout,
    WriteTimeout,
    EvictedForAddress,
    EvictedForCap,
    RefusedFull,
}

const REASONS: [(Closed, &str); 5] = [
    (Closed::HeaderTimeout, "header_timeout"),
    (Closed::WriteTimeout, "write_timeout"),
    (Closed::EvictedForAddress, "evicted_per_address"),
    (Closed::EvictedForCap, "evicted_max_connections"),
    (Closed::RefusedFull, "refused_all_authenticated"),
];

/// Connection counts for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    closed: [AtomicU64; REASONS.len()],
    open: AtomicU64,
    authenticated: AtomicU64,
    cap: AtomicU64,
}

impl ConnMetrics {
    fn close(&self, why: Closed) {
        let i = REASONS.iter().position(|(c, _)| *c == why).expect("listed");
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the connection metrics.
    pub fn render(&self, out: &mut crate::metrics::Exposition) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.counter(
            "keywatch_feed_connections_accepted_total",
            "Connections the feed server accepted.",
            &[],
            get(&self.accepted),
        );
        out.counter(
            "keywatch_feed_accept_errors_total",
            "Failed accepts (for example out of file descriptors).",
            &[],
            get(&self.accept_errors),
        );
        for (i, (_, reason)) in REASONS.iter().enumerate() {
            out.counter(
                "keywatch_feed_connections_closed_total",
                "Connections closed by a rule: header or write timeout, eviction for a newer one, or refused.",
                &[("reason", reason)],
                get(&self.closed[i]),
            );
        }
        out.gauge(
            "keywatch_feed_connections_open",
            "Feed connections open now.",
            &[],
            get(&self.open),
        );
        out.gauge(
            "keywatch_feed_connections_authenticated",
            "Open feed connections that have presented a valid token.",
            &[],
            get(&self.authenticated),
        );
        out.gauge(
            "keywatch_feed_connections_max",
            "The connection cap in force (max_connections, lowered to fit the file-descriptor limit).",
            &[],
            get(&self.cap),
        );
    }
}

/// Where connections are grouped for `per_address`: an IPv4 address or an
/// IPv6 /64 (one subscriber's allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Source(u128);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(u128::from(u32::from(v4))),
                None => Source((u128::from(v6) >> 64 << 64) | 1 << 32),
            },
        }
    }
}

/// Who holds a slot.
#[derive(Default)]
struct Table {
    next: u64,
    open: usize,
    /// Unauthenticated connections, oldest first: their source and eviction signal.
    unauthenticated: BTreeMap<u64, (Source, Arc<Notify>)>,
    by_source: HashMap<Source, BTreeSet<u64>>,
}

impl Table {
    fn forget(&mut self, id: u64) -> bool {
        let Some((src, _)) = self.unauthenticated.remove(&id) else {
            return false;
        };
        if let Some(ids) = self.by_source.get_mut(&src) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&src);
            }
        }
        true
    }

    fn evict(&mut self, id: u64) {
        if let Some((_, n)) = self.unauthenticated.get(&id) {
            n.notify_one();
        }
        self.forget(id);
    }
}

struct Tracker {
    limits: Limits,
    table: Mutex<Table>,
    metrics: Arc<ConnMetrics>,
}

impl Tracker {
    /// A slot for a new connection from `src`, or `None` (refused).
    fn admit(self: &Arc<Self>, src: Source) -> Option<(Conn, Arc<Notify>)> {
        let mut t = self.table.lock().expect("connection table");
        if let Some(oldest) = t
            .by_source
            .get(&src)
            .filter(|ids| ids.len() >= self.limits.per_address)
            .and_then(|ids| ids.first().copied())
        {
            t.evict(oldest);
            self.metrics.close(Closed::EvictedForAddress);
        }
        if t.open >= self.limits.max_connections {
            match t.unauthenticated.keys().next().copied() {
                Some(oldest) => {
                    t.evict(oldest);
                    self.metrics.close(Closed::EvictedForCap);
                }
                None => {
                    self.metrics.close(Closed::RefusedFull);
                    return None;
                }
            }
        }
        let id = t.next;
        t.next += 1;
        // An evicted connection's slot is freed when its task ends; until
        // then it still counts, so `open` may briefly pass the cap.
        t.open += 1;
        let evict = Arc::new(Notify::new());
        t.unauthenticated.insert(id, (src, Arc::clone(&evict)));
        t.by_source.entry(src).or_default().insert(id);
        self.metrics.open.store(t.open as u64, Ordering::Relaxed);
        Some((
            Conn(Arc::new(Slot {
                id,
                authenticated: AtomicBool::new(false),
                tracker: Arc::clone(self),
            })),
            evict,
        ))
    }
}

struct Slot {
    id: u64,
    authenticated: AtomicBool,
    tracker: Arc<Tracker>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.tracker.table.lock().expect("connection table");
        t.forget(self.id);
        t.open -= 1;
        let m = &self.tracker.metrics;
        m.open.store(t.open as u64, Ordering::Relaxed);
        if self.authenticated.load(Ordering::Relaxed) {
            m.authenticated.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The connection a request came on (a request extension): the handler
/// marks it authenticated when the request's token is valid.
#[derive(Clone)]
pub struct Conn(Arc<Slot>);

impl Conn {
    /// This connection carried a valid token: it is no longer evictable
    /// and no longer counts against its address.
    pub fn authenticated(&self) {
        if !self.0.authenticated.swap(true, Ordering::Relaxed) {
            let tracker = &self.0.tracker;
            if tracker
                .table
                .lock()
                .expect("connection table")
                .forget(self.0.id)
            {
                tracker
                    .metrics
                    .authenticated
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                // Evicted a moment ago: its task is ending; nothing to count.
                self.0.authenticated.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// The connection cap that fits this process's file-descriptor limit,
/// after raising the soft limit to the hard one.
fn fitted_cap(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        if lim.current != lim.maximum {
            let raised = rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                lim.current = lim.maximum;
            }
        }
        // None is unlimited.
        let soft = lim.current.unwrap_or(u64::MAX);
        let room = if soft > 2 * RESERVED_FDS {
            soft - RESERVED_FDS
        } else {
            (soft / 2).max(1)
        };
        wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
    }
    #[cfg(not(unix))]
    wanted
}

/// Serves `app` on `listener` under `limits` until `stop` turns true; then
/// stops accepting and gives open connections 5 s (`DRAIN`) to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut limits: Limits,
    metrics: Arc<ConnMetrics>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let cap = fitted_cap(limits.max_connections);
    if cap < limits.max_connections {
        tracing::warn!(
            connections = cap,
            configured = limits.max_connections,
            "at most {cap} connections: the file-descriptor limit leaves no room for feed.max_connections; raise `ulimit -n`"
        );
        limits.max_connections = cap;
    }
    limits.per_address = limits.per_address.min(limits.max_connections);
    metrics.cap.store(cap as u64, Ordering::Relaxed);
    let tracker = Arc::new(Tracker {
        limits,
        table: Mutex::default(),
        metrics: Arc::clone(&metrics),
    });
    let mut tasks = JoinSet::new();
    let mut accept_failures = 0u64;
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
                accept_failures += 1;
                if accept_failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures = accept_failures, "accept failed");
                }
                // Out of descriptors or memory: let connections end first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.accepted.fetch_add(1, Ordering::Relaxed);
        let Some((conn, evict)) = tracker.admit(Source::of(peer.ip())) else {
            drop(stream);
            continue;
        };
        tasks.spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            conn,
            evict,
            stop.clone(),
            Arc::clone(&metrics),
        ));
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    conn: Conn,
    evict: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<ConnMetrics>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(conn.clone());
        app.clone().call(req)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let served = http.serve_connection(io, svc);
    tokio::pin!(served);
    let ended = tokio::select! {
        r = served.as_mut() => r,
        _ = evict.notified() => return,
        _ = stopped(&mut stop) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            metrics.close(Closed::HeaderTimeout);
        } else if timed_out(&e) {
            metrics.close(Closed::WriteTimeout);
        }
    }
}

/// Completes when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A stream whose writes fail with `TimedOut` after making no progress
/// for `limit` (a client that stopped reading).
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stall: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    /// After a write that could not proceed: fails once the stall is `limit` old.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + self.limit;
            self.stall.as_mut().reset(at);
        }
        match self.stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for feed.write_timeout_secs",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(&mut self, r: io::Result<T>) -> Poll<io::Result<T>> {
        self.armed = false;
        Poll::Ready(r)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.stalled(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.stalled(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.stalled(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.stalled(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(max: usize, per_address: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            limits: Limits {
                header_timeout: Duration::from_secs(1),
                write_timeout: Duration::from_secs(1),
                max_connections: max,
                per_address,
            },
            table: Mutex::default(),
            metrics: Arc::default(),
        })
    }

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    fn evicted(n: &Arc<Notify>) -> bool {
        // `notify_one` stores a permit: a fresh `notified()` completes at once.
        let f = n.notified();
        tokio::pin!(f);
        f.as_mut().enable()
    }

    #[test]
    fn ipv6_groups_by_64_and_v4_mapped_is_v4() {
        assert_eq!(src("2001:db8:1:2::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:10.0.0.1"), src("10.0.0.1"));
        assert_ne!(src("10.0.0.1"), src("10.0.0.2"));
    }

    #[test]
    fn a_new_connection_evicts_the_oldest_unauthenticated_of_its_address() {
        let t = tracker(100, 2);
        let (_a, ea) = t.admit(src("10.0.0.1")).unwrap();
        let (_b, eb) = t.admit(src("10.0.0.1")).unwrap();
        let (_other, eo) = t.admit(src("10.0.0.2")).unwrap();
        let (_c, ec) = t.admit(src("10.0.0.1")).unwrap();
        assert!(evicted(&ea), "the oldest of the address goes");
        assert!(!evicted(&eb) && !evicted(&ec) && !evicted(&eo));
    }

    #[test]
    fn authenticated_connections_are_never_evicted() {
        let t = tracker(2, 10);
        let (gw, egw) = t.admit(src("10.0.0.1")).unwrap();
        gw.authenticated();
        let (_idle, eidle) = t.admit(src("10.0.0.9")).unwrap();
        // Full: the newcomer evicts the idle socket, not the gateway.
        let (newer, enewer) = t.admit(src("10.0.0.9")).unwrap();
        assert!(evicted(&eidle) && !evicted(&egw) && !evicted(&enewer));
        drop(_idle);
        newer.authenticated();
        // Every slot authenticated: a newcomer is refused.
        assert!(t.admit(src("10.0.0.7")).is_none());
        drop(gw);
        assert!(t.admit(src("10.0.0.7")).is_some(), "a closed slot is free");
        assert_eq!(t.metrics.authenticated.load(Ordering::Relaxed), 1);
    }
}
