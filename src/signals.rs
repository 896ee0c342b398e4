//! The stop signals every long-running meshca command shares (the signer, the directory
//! and Kubernetes agents, the mesh controller): SIGTERM and SIGINT end them gracefully.

/// Takes SIGTERM and SIGINT over now and returns a future that resolves at the first of
/// them. Called before a process says it is ready: a signal sent right after must not
/// meet the default action (death without a drain), and one that arrives before the
/// future is first polled is kept. Needs the Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}
