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

/// Set by [`note_hangup`] when a SIGHUP arrives before the signer's reload handler (and
/// on every one after, for the processes that have none).
static HANGUP_NOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_hangup(_signal: libc::c_int) {
    // Async-signal-safe: an atomic store, nothing else.
    HANGUP_NOTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Called first thing in `main`: a SIGHUP from then on is noted rather than met with its
/// default action (the process ends, exit 129). A unit's `systemctl reload`, or a
/// configuration run that reloads whatever is running, may send one at any moment after
/// the process starts, while the signer's own handler is installed only once its config
/// is read; the agents and the mesh controller have none and keep this one. The Tokio
/// handler the signer installs later calls this one after its own.
pub fn hold_hangups() -> std::io::Result<()> {
    // SAFETY: sigaction with a handler that only stores to an atomic; the struct is
    // zeroed, then its mask emptied, as sigaction(2) expects.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = note_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// For commands that do not run as daemons (a `root init` in a terminal that is closed
/// should end as before): SIGHUP's default action again, and a SIGHUP noted meanwhile
/// delivered now.
pub fn release_hangups() {
    // SAFETY: restores the default disposition; raise(3) then delivers a noted SIGHUP.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
        if HANGUP_NOTED.swap(false, std::sync::atomic::Ordering::SeqCst) {
            libc::raise(libc::SIGHUP);
        }
    }
}

/// Whether a SIGHUP was noted since the last call (the signer asks once its own handler
/// is in place, and then reloads for it).
pub fn hangup_noted() -> bool {
    HANGUP_NOTED.swap(false, std::sync::atomic::Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sighup_once_held_is_noted_not_fatal() {
        super::hold_hangups().unwrap();
        // SAFETY: raise(3) on this process, whose SIGHUP disposition was just set.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        assert!(super::hangup_noted());
        assert!(!super::hangup_noted(), "noted once per SIGHUP");
    }
}
