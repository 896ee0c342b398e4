//! The signer daemon (`meshca serve`): an mTLS HTTPS API in front of the root key,
//! enforcing VirtualMesh policy, writing every decision to the audit log.

pub mod api;
pub mod audit;
pub mod check;
pub mod decision;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod server;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::RootSigner;
use reload::Rules;

/// Everything a request handler reads. Fixed at start, apart from the rules (replaced by a
/// reload), the audit writer and the metrics.
pub struct SignerState {
    /// Policies, client grants and limits; see [`SignerState::rules`].
    rules: RwLock<Arc<Rules>>,
    /// The TLS settings in force (replaced by a reload): a decision checks its client
    /// certificate against their client CAs and CRLs once the body is in.
    tls: tokio::sync::watch::Receiver<server::ServingTls>,
    pub backend: Arc<dyn RootSigner>,
    pub audit: audit::AuditLog,
    pub metrics: metrics::Metrics,
    /// Buckets per client; the limit comes from the rules in force.
    pub rate_limiter: ratelimit::RateLimiter,
    /// Rate-limit refusals counted for one audit line instead of one line each.
    pub refusal_tally: ratelimit::RefusalTally,
    /// Log lines of refused TLS handshakes: a burst, then about one a second per reason,
    /// and each refused client's first line of a reason in a minute.
    pub handshake_log: ratelimit::ClientLogThrottle,
    /// Log lines saying a refused handshake met an expired serving certificate: one a
    /// minute.
    pub server_certificate_log: ratelimit::LogThrottle,
    /// Set once the log has said that intermediates end with the root. With a VirtualMesh's
    /// one ttlDays for the root and its intermediates that is every request, so it is said
    /// once per process (the root only changes with a restart), not once per request.
    pub capped_by_root_noted: AtomicBool,
    /// Every signing decision under way, each in a task of its own: shutdown waits for
    /// them, so none ends without its audit line.
    pub decisions: TaskTracker,
    /// Cancelled when the drain time is over: decisions still waiting (for a body, for the
    /// token) stop, and are audited as `signer_stopping`.
    pub stop_deciding: CancellationToken,
    /// The API connections until each ends or is seen serving a request once the drain
    /// time is over: shutdown waits for them before it waits for the decisions, so that no
    /// request comes in after those.
    pub connections: TaskTracker,
    /// Cancelled when the drain time is over: the API connections still open and not
    /// serving a request (in a handshake, idle, half a request's head in) are closed.
    pub cut_connections: CancellationToken,
}

impl SignerState {
    /// The rules in force now. A decision takes them once and keeps them, so a reload
    /// during it does not mix old and new rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the TLS settings in force now accept this client certificate chain (leaf
    /// first, as the handshake presented it): the handshake checked it against those of
    /// its time, and a reload since may have revoked it (or replaced its CA). The refusal
    /// reason is one of the handshake's (`client_certificate_revoked`, ...).
    pub fn client_still_trusted(
        &self,
        client: &api::ClientIdentity,
    ) -> Result<(), (&'static str, rustls::Error)> {
        let Some((end_entity, intermediates)) = client.chain.split_first() else {
            let e = rustls::Error::NoCertificatesPresented;
            return Err((crate::tlsutil::certificate_refusal_reason(&e), e));
        };
        let verifier = {
            let in_force = self.tls.borrow();
            // Unchanged since the handshake checked it, the certificate not past its end,
            // no client CA ended and no CRL refusing its clients overdue (a connection
            // kept alive): nothing to check again (a signature check per request would
            // cost the signing path for nothing).
            let now = std::time::SystemTime::now();
            if client.verified_under == Some(in_force.fingerprint)
                && client.not_after.is_some_and(|end| now < end)
                && now < in_force.client_ca_not_after
                && in_force.crls_refuse_from.is_none_or(|due| now < due)
            {
                return Ok(());
            }
            in_force.client_verifier.clone()
        };
        // Not UnixTime::now(), which panics on a clock set before 1970 (then every
        // certificate is not yet valid, and refused).
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now = rustls_pki_types::UnixTime::since_unix_epoch(since_epoch);
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|e| (crate::tlsutil::certificate_refusal_reason(&e), e))
    }

    /// The CA of the client CAs in force that the client's chain leads to now: found
    /// once per connection while the TLS settings stay the same, among the CAs described
    /// once per TLS load.
    pub fn client_ca_of(&self, client: &api::ClientIdentity) -> Option<crate::tlsutil::ClientCa> {
        let (fingerprint, client_cas) = {
            let in_force = self.tls.borrow();
            if let Some((under, found)) = client.client_ca_found.get()
                && *under == in_force.fingerprint
            {
                return found.clone();
            }
            (in_force.fingerprint, in_force.client_ca_set.clone())
        };
        let now = crate::tlsutil::unix_time(std::time::SystemTime::now())?;
        let found = client_cas.chained_to(&client.chain, now);
        // Kept only if none was: settings reloaded since close this connection anyway.
        let _ = client.client_ca_found.set((fingerprint, found.clone()));
        found
    }

    fn replace_rules(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
    }
}

/// Where the signer ended up listening (ports may have been chosen by the OS).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddresses {
    pub api: SocketAddr,
    pub ops: Option<SocketAddr>,
}
