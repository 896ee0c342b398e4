//! The stop signals every long-running meshca command shares (the signer, the directory
//! and Kubernetes agents, the mesh controller): SIGTERM and SIGINT end them gracefully.

/// Takes SIGTERM and SIGINT over now and returns a future that resolves at the first of
/// them. Called before a process says it is ready: a signal sent right after must not
/// meet the default action (death without a drain), and one that arrives before the
/// future is first polled is kept. Needs the Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut signals = StopSignals::take_over()?;
    Ok(async move { signals.next().await })
}

/// SIGTERM and SIGINT, each one of them in turn: for a process whose first one starts a
/// drain and whose second one cuts it short.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Takes both signals over now (see [`shutdown_signal`]).
    pub fn take_over() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
