//! What the signer tells its service manager (systemd, `Type=notify`): ready once it
//! serves, reloading during a SIGHUP, stopping at the drain, each with a status line for
//! `systemctl status`. Without `NOTIFY_SOCKET` (not run by systemd) nothing is sent.

use sd_notify::NotifyState;

/// The signer serves: `systemctl start` returns only now, after the token login, so a
/// unit ordered after it finds it listening, and a start that fails fails the command.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A SIGHUP reload begins; [`reloaded`] ends it.
pub fn reloading() {
    // The monotonic time lets systemd 253+ (`Type=notify-reload`) match the message to
    // the reload it asked for; older versions ignore it.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over (whatever its outcome, which the log and the metrics say).
pub fn reloaded(status: &str) {
    ready(status);
}

/// The drain begins: systemd shows the unit as deactivating, not failed.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

fn send(states: &[NotifyState]) {
    // `false`: NOTIFY_SOCKET stays set for the next message. Without it this is a no-op.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot tell systemd the signer's state (NOTIFY_SOCKET)");
    }
}
