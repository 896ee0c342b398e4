//! The plain-HTTP listener of the ops endpoints (`/metrics`, `/healthz`, `/readyz`) of the
//! signer and the controllers: at most [`MAX_OPS_CONNECTIONS`] at once, each cut off when
//! a request's headers take longer than [`OPS_HEADER_TIMEOUT`] (idle keep-alive included).
//! Unauthenticated clients reach it, so a pile of half-sent requests must not use up the
//! process's file descriptors (and with them the signer's API port), nor keep the
//! kubelet's probes out: a connection beyond the bound takes the slot of the one idle
//! longest (no request under way), and is closed at once only if every slot is serving a
//! request. [`OpsConnectionMetrics`] counts both. The accept loop with its connection
//! bound ([`accept_bounded`]) is the API port's.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::signer::ratelimit::{LogThrottle, RateLimit};

/// Connections served at once. A scraper or a probe holds one or two; beyond these, the
/// connection idle longest is closed for the new one.
pub const MAX_OPS_CONNECTIONS: usize = 64;

/// Longest wait for a request's headers, the first one or the next on a kept-alive
/// connection. Short: probes and scrapers send theirs at once (the kubelet's probes time
/// out after 1 s by default), and a slot held idle is a slot a probe may need.
pub const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection of the ops port was closed by the bound on connections.
const CLOSED_IDLE: &str = "idle_for_new";
const CLOSED_ALL_BUSY: &str = "all_busy";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The ops port's connections, for the registry of the process serving it: how many are
/// open, and how many the bound closed (`idle_for_new`: idle, closed to serve a new one;
/// `all_busy`: new, closed at once as every slot was serving a request). Many of either
/// mean more clients than [`MAX_OPS_CONNECTIONS`] (or someone holding connections open).
#[derive(Clone, Debug, Default)]
pub struct OpsConnectionMetrics {
    open: Gauge,
    closed: Family<ReasonLabels, Counter>,
}

impl OpsConnectionMetrics {
    /// Registers `ops_connections` and `ops_connections_closed_total` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = OpsConnectionMetrics::default();
        // Both series from zero, so an increase from the first closing shows.
        for reason in [CLOSED_IDLE, CLOSED_ALL_BUSY] {
            let _ = metrics.closed.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        registry.register(
            "ops_connections",
            "Open connections on the ops port (metrics, health)",
            metrics.open.clone(),
        );
        registry.register(
            "ops_connections_closed",
            "Connections of the ops port closed by its connection bound, by reason (idle_for_new: idle, closed for a new one; all_busy: new, closed at once as every slot was serving a request)",
            metrics.closed.clone(),
        );
        metrics
    }

    fn closed(&self, reason: &str) {
        self.closed
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

/// Serves `router` on `listener` until `stop` completes; then finishes the requests in
/// flight (the caller bounds how long it waits for this future).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    metrics: OpsConnectionMetrics,
    stop: impl Future<Output = ()>,
) {
    serve_bounded(
        listener,
        router,
        Bounds {
            max_connections: MAX_OPS_CONNECTIONS,
            header_timeout: OPS_HEADER_TIMEOUT,
        },
        metrics,
        stop,
    )
    .await
}

/// Failed accepts of one listener: one log line per 10 s, with how many were not logged
/// (while the process is out of file descriptors every 50 ms retry fails).
const ACCEPT_ERROR_LOG_LIMIT: RateLimit = RateLimit {
    per_minute: 6,
    burst: 1,
};

/// The throttle of one listener's failed-accept lines ([`accept_bounded`]).
pub(crate) fn accept_error_log() -> LogThrottle {
    LogThrottle::new(ACCEPT_ERROR_LOG_LIMIT)
}

/// One accept. A failure (out of file descriptors, say) is logged through `error_log` and
/// met with a 50 ms pause before None: the caller's loop neither spins nor floods the log.
async fn accept_once(
    listener: &TcpListener,
    error_log: &LogThrottle,
) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(e) => {
            if let Some(not_logged) = error_log.admit("accept", std::time::Instant::now()) {
                tracing::warn!(
                    error = %e,
                    failed_since_last_line = not_logged,
                    "accept failed; retrying every 50 ms (at most one such line per 10 s)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// The next connection once a slot of `slots` is free, with the slot it holds until it
/// ends; None once `stop` completes. Accept errors (EMFILE and friends) are logged
/// through `error_log` and retried after a pause rather than spun on.
pub(crate) async fn accept_bounded<F: Future<Output = ()>>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    error_log: &LogThrottle,
    stop: &mut std::pin::Pin<&mut F>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        permit = slots.clone().acquire_owned() => permit.ok()?,
        _ = stop.as_mut() => return None,
    };
    loop {
        tokio::select! {
            accepted = accept_once(listener, error_log) => {
                if let Some((tcp, peer)) = accepted {
                    return Some((permit, tcp, peer));
                }
            }
            _ = stop.as_mut() => return None,
        }
    }
}

#[derive(Clone, Copy)]
struct Bounds {
    max_connections: usize,
    header_timeout: Duration,
}

/// One open connection: whether it is serving a request, and how to close it.
struct OpenConnection {
    requests_under_way: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// The open connections, by the order they were accepted in.
#[derive(Default)]
struct OpenConnections(Mutex<BTreeMap<u64, OpenConnection>>);

impl OpenConnections {
    /// Closes the connection accepted first of those serving no request; false if every
    /// one is serving one.
    fn close_oldest_idle(&self) -> bool {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = open
            .iter()
            .find(|(_, c)| c.requests_under_way.load(Ordering::SeqCst) == 0)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| open.remove(&id)) {
            Some(connection) => {
                connection.close.cancel();
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Counts a request under way on its connection while it lives.
struct UnderWay(Arc<AtomicUsize>);

impl UnderWay {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        UnderWay(count.clone())
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The next connection with a slot for it: a free one, or that of the connection idle
/// longest, closed for it; None once `stop` completes. A connection that finds every slot
/// serving a request is closed at once (counted). Accept errors as [`accept_bounded`].
async fn accept_evicting<F: Future<Output = ()>>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    open: &OpenConnections,
    metrics: &OpsConnectionMetrics,
    error_log: &LogThrottle,
    stop: &mut std::pin::Pin<&mut F>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = accept_once(listener, error_log) => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
            _ = stop.as_mut() => return None,
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Some((permit, tcp, peer));
        }
        if !open.close_oldest_idle() {
            metrics.closed(CLOSED_ALL_BUSY);
            tracing::debug!(%peer, "ops connection closed at once: every slot is serving a request");
            continue;
        }
        metrics.closed(CLOSED_IDLE);
        // The closed connection's task gives its slot back as it ends.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.ok()?,
            _ = stop.as_mut() => return None,
        };
        return Some((permit, tcp, peer));
    }
}

async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    metrics: OpsConnectionMetrics,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let open = Arc::new(OpenConnections::default());
    let (stopping, _) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    let error_log = accept_error_log();
    let mut next_id = 0u64;
    while let Some((permit, tcp, peer)) =
        accept_evicting(&listener, &slots, &open, &metrics, &error_log, &mut stop).await
    {
        let id = next_id;
        next_id += 1;
        let requests_under_way = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        open.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                OpenConnection {
                    requests_under_way: requests_under_way.clone(),
                    close: close.clone(),
                },
            );
        let router = router.clone();
        let mut stop_connection = stopping.subscribe();
        let open = open.clone();
        let gauge = metrics.open.clone();
        tokio::spawn(async move {
            let _permit = permit;
            gauge.inc();
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let under_way = UnderWay::new(&requests_under_way);
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await;
                    drop(under_way);
                    response
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                _ = stop_connection.changed() => {
                    connection.as_mut().graceful_shutdown();
                    Some(connection.await)
                }
                // Idle, and its slot given to a new connection: dropped, so closed.
                _ = close.cancelled() => None,
            };
            match ended {
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "ops connection ended with an error")
                }
                Some(Ok(())) => {}
                None => tracing::debug!(%peer, "idle ops connection closed for a new one"),
            }
            open.remove(id);
            gauge.dec();
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a slot until it ends: all slots free means all finished.
    let all = u32::try_from(bounds.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_once_per_interval_with_their_count() {
        let errors = accept_error_log();
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 20 a second for a minute: one line per 10 s, each with the failures between.
        let lines: Vec<u64> = (0..1200)
            .filter_map(|n| errors.admit("accept", at(n * 50)))
            .collect();
        assert_eq!(lines, [0, 199, 199, 199, 199, 199]);
    }
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A test server's address, metrics, stop channel (send to stop) and task.
    type Started = (
        std::net::SocketAddr,
        OpsConnectionMetrics,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    );

    /// Serves `router` with these bounds; send on the returned channel to stop.
    fn start_with(router: Router, max: usize, header_timeout: Duration) -> Started {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let metrics = OpsConnectionMetrics::register(&mut Registry::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let bounds = Bounds {
            max_connections: max,
            header_timeout,
        };
        let server = tokio::spawn(serve_bounded(
            listener,
            router,
            bounds,
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        (addr, metrics, stop_tx, server)
    }

    /// A /healthz router served with these bounds.
    fn start(max: usize, header_timeout: Duration) -> Started {
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        start_with(router, max, header_timeout)
    }

    fn closed_for(metrics: &OpsConnectionMetrics, reason: &str) -> u64 {
        metrics
            .closed
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .get()
    }

    /// A generous bound on a wait that must end: a server that never ends it fails the
    /// test rather than hangs it.
    async fn within<T>(what: &str, wait: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
    }

    async fn half_sent(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tcp
    }

    const GET_AND_CLOSE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn idle_connections_up_to_the_bound_do_not_keep_a_probe_out() {
        // Connections cut off by no header timeout: only the bound can close them.
        let (addr, metrics, stop, server) = start(MAX_OPS_CONNECTIONS, Duration::from_secs(600));
        let mut idle = Vec::new();
        for _ in 0..MAX_OPS_CONNECTIONS {
            idle.push(half_sent(addr).await);
        }
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe.write_all(GET_AND_CLOSE).await.unwrap();
        let mut answer = Vec::new();
        within("the probe was not answered", probe.read_to_end(&mut answer))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The slot was the one of the connection idle longest, now closed.
        let mut rest = Vec::new();
        within(
            "the oldest idle connection stayed open",
            idle[0].read_to_end(&mut rest),
        )
        .await
        .unwrap();
        assert_eq!(closed_for(&metrics, CLOSED_IDLE), 1);
        assert_eq!(closed_for(&metrics, CLOSED_ALL_BUSY), 0);
        drop(idle);
        let _ = stop.send(());
        server.await.unwrap();
        assert_eq!(metrics.open.get(), 0);
    }

    #[tokio::test]
    async fn a_connection_finding_every_slot_serving_a_request_is_closed_at_once() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        // A permit per request let through (no missed wake-up if one comes first).
        let release = Arc::new(Semaphore::new(0));
        let hold = release.clone();
        let router = Router::new().route(
            "/healthz",
            get(move || {
                let (entered, release) = (entered_tx.clone(), hold.clone());
                async move {
                    let _ = entered.send(());
                    let _ = release.acquire().await.map(|permit| permit.forget());
                    "ok\n"
                }
            }),
        );
        let (addr, metrics, stop, server) = start_with(router, 2, Duration::from_secs(600));
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(GET_AND_CLOSE).await.unwrap();
            within("a request was not handled", entered.recv()).await;
            busy.push(tcp);
        }
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        // Closed (or reset) without an answer.
        let _ = within(
            "the connection was not closed",
            refused.read_to_end(&mut answer),
        )
        .await;
        assert!(answer.is_empty(), "{answer:?}");
        assert_eq!(closed_for(&metrics, CLOSED_ALL_BUSY), 1);
        assert_eq!(closed_for(&metrics, CLOSED_IDLE), 0);
        // The requests under way are answered.
        release.add_permits(2);
        for mut tcp in busy {
            let mut answer = Vec::new();
            within(
                "a held request was not answered",
                tcp.read_to_end(&mut answer),
            )
            .await
            .unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn half_sent_and_idle_connections_are_closed_by_the_server() {
        let (addr, _metrics, stop, server) = start(8, Duration::from_millis(300));
        // A generous bound: a server that never closes them fails here rather than hangs.
        let closed = |read| async move {
            tokio::time::timeout(Duration::from_secs(60), read)
                .await
                .expect("the server did not close the connection")
        };
        let mut stalled = half_sent(addr).await;
        let mut rest = Vec::new();
        // Returns only once the server closes it (hyper may answer 408 first).
        closed(stalled.read_to_end(&mut rest)).await.unwrap();
        // A kept-alive connection idle after its answer is closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        closed(idle.read_to_end(&mut answer)).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
