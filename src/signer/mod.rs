//! The signer daemon (`meshca serve`): an mTLS HTTPS API in front of the root key,
//! enforcing VirtualMesh policy, writing every decision to the audit log.

pub mod api;
pub mod audit;
pub mod decision;
pub mod metrics;
pub mod ratelimit;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::RootSigner;
use crate::config::AuthorizationTable;
use crate::policy::PolicySet;

/// Everything a request handler reads. Immutable after start, apart from the audit writer
/// and the metrics.
pub struct SignerState {
    pub policies: PolicySet,
    pub authorization: AuthorizationTable,
    pub backend: Arc<dyn RootSigner>,
    pub audit: audit::AuditLog,
    pub metrics: metrics::Metrics,
    pub rate_limiter: ratelimit::RateLimiter,
    /// Set once the log has said that intermediates end with the root. With a VirtualMesh's
    /// one ttlDays for the root and its intermediates that is every request, so it is said
    /// once per process (the root only changes with a restart), not once per request.
    pub capped_by_root_noted: AtomicBool,
}

/// Where the signer ended up listening (ports may have been chosen by the OS).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddresses {
    pub api: SocketAddr,
    pub ops: Option<SocketAddr>,
}
