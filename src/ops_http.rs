//! The plain-HTTP listener of the ops endpoints (`/metrics`, `/healthz`, `/readyz`) of the
//! signer and the controllers: at most [`MAX_OPS_CONNECTIONS`] at once, each cut off when
//! a request's headers take longer than [`OPS_HEADER_TIMEOUT`] (idle keep-alive included).
//! Unauthenticated clients reach it, so a pile of half-sent requests must not use up the
//! process's file descriptors (and with them the signer's API port). The accept loop with
//! its connection bound ([`accept_bounded`]) is the API port's too.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::signer::ratelimit::{LogThrottle, RateLimit};

/// Connections served at once; more wait in the kernel's accept queue. A scraper or a
/// probe holds one or two.
pub const MAX_OPS_CONNECTIONS: usize = 64;

/// Longest wait for a request's headers, the first one or the next on a kept-alive
/// connection.
pub const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `stop` completes; then finishes the requests in
/// flight (the caller bounds how long it waits for this future).
pub async fn serve(listener: TcpListener, router: Router, stop: impl Future<Output = ()>) {
    serve_bounded(
        listener,
        router,
        MAX_OPS_CONNECTIONS,
        OPS_HEADER_TIMEOUT,
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
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => return Some((permit, tcp, peer)),
                Err(e) => {
                    if let Some(not_logged) = error_log.admit("accept", std::time::Instant::now()) {
                        tracing::warn!(
                            error = %e,
                            failed_since_last_line = not_logged,
                            "accept failed; retrying every 50 ms (at most one such line per 10 s)"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.as_mut() => return None,
        }
    }
}

async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stopping, _) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    let error_log = accept_error_log();
    while let Some((permit, tcp, peer)) =
        accept_bounded(&listener, &slots, &error_log, &mut stop).await
    {
        let router = router.clone();
        let mut stop_connection = stopping.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                router.clone().oneshot(request)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = stop_connection.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "ops connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a slot until it ends: all slots free means all finished.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
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

    /// Serves a /healthz router with these bounds; send on the returned channel to stop.
    fn start(
        max: usize,
        header_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_bounded(
            listener,
            router,
            max,
            header_timeout,
            async {
                let _ = stop_rx.await;
            },
        ));
        (addr, stop_tx, server)
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
    async fn connections_beyond_the_bound_wait_for_a_slot() {
        let (addr, stop, server) = start(2, Duration::from_secs(600));
        let first = half_sent(addr).await;
        let second = half_sent(addr).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third.write_all(GET_AND_CLOSE).await.unwrap();
        // Not served while the two half-sent requests hold both slots (a wait can only
        // make this pass wrongly, never fail wrongly)...
        let mut answer = Vec::new();
        let early =
            tokio::time::timeout(Duration::from_millis(300), third.read_to_end(&mut answer)).await;
        assert!(early.is_err(), "served beyond the bound: {answer:?}");
        // ...and served once one of them goes.
        drop(first);
        third.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A stop waits for the connections still open (each bounded by the header
        // timeout): here the last one goes first.
        drop(second);
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn half_sent_and_idle_connections_are_closed_by_the_server() {
        let (addr, stop, server) = start(8, Duration::from_millis(300));
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
