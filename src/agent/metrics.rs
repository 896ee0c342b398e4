//! The controllers' Prometheus metrics (`--metrics-listen`) and their HTTP endpoint. Both
//! controllers report their loop ([`LoopMetrics`]: whether the replica acts, when its last
//! pass ended, its resync period); the agent adds, per request, when its installed
//! intermediate expires, when it will be renewed, whether its last reconcile succeeded
//! and whether the signer answered it, and when its own client certificate expires.
//! These are what `deploy/prometheus/meshca-alerts.yaml` alerts on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::client::SignerContact;
use crate::signer::metrics::{OutcomeLabels, exposition, outcomes_from_zero, unix_seconds};
use crate::tlsutil::Validity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name` of the VirtualMeshCertificateSigningRequest, or in directory mode
    /// the target directory.
    pub request: String,
}

/// What one reconcile of a request found and did.
#[derive(Debug, Clone, Copy)]
pub struct Reconciled<'a> {
    /// `ok`, or the reason it failed (the `Ready` condition's reason).
    pub outcome: &'a str,
    /// notAfter and renewal time of the bundle installed after it, when known.
    pub installed: Option<(SystemTime, SystemTime)>,
    /// Whether the signer answered its last request to it.
    pub signer: SignerContact,
    /// Whether the installed intermediate ends with the signer's root, so that a renewal
    /// could not end later (None: not known in this pass, the last value stays).
    pub ends_with_root: Option<bool>,
    /// Whether the request's restart plan stopped waiting (`Restarted` False,
    /// `TimedOut`): None where the agent restarts nothing (directory mode).
    pub restart_timed_out: Option<bool>,
}

/// Metrics a controller serves at `/metrics`.
pub trait Exposition: Send + Sync {
    /// The Prometheus text exposition.
    fn render(&self) -> String;

    /// The metrics port's own connection counts, in the same registry.
    fn ops_connections(&self) -> crate::ops_http::OpsConnectionMetrics;
}

/// The loop of a Lease-holding controller (see [`super::election::LeaderLoop`]), and
/// which objects (requests, VirtualMeshes) it reports series for: those of an object that
/// is gone, or of all when this replica stops acting, must be removed, since a stale value
/// could raise a false alert (the replica that acts now reports them).
pub struct LoopMetrics {
    leader: Gauge,
    last_pass: Gauge,
    resync: Gauge,
    reported: Mutex<BTreeSet<String>>,
}

impl LoopMetrics {
    /// Registers `leader`, `last_pass_timestamp_seconds` and `resync_seconds` under the
    /// registry's prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica acts (holds the Lease; always for a directory agent)",
            leader.clone(),
        );
        let last_pass = Gauge::default();
        registry.register(
            "last_pass_timestamp_seconds",
            "When this replica last completed a pass (Unix seconds; 0: never)",
            last_pass.clone(),
        );
        let resync = Gauge::default();
        registry.register(
            "resync_seconds",
            "Longest time between two passes (--resync-seconds): the stall alerts wait for three",
            resync.clone(),
        );
        LoopMetrics {
            leader,
            last_pass,
            resync,
            reported: Mutex::new(BTreeSet::new()),
        }
    }

    /// The longest time between two passes: an alert on a stalled loop scales with it.
    pub fn set_resync(&self, resync: Duration) {
        self.resync
            .set(i64::try_from(resync.as_secs()).unwrap_or(i64::MAX));
    }

    /// The object `key` has series now.
    pub fn reported(&self, key: &str) {
        self.reported_keys().insert(key.to_string());
    }

    /// Whether this replica acts. Returns the objects whose series to remove: all of them
    /// when it does not.
    #[must_use]
    pub fn set_leading(&self, leading: bool) -> Vec<String> {
        self.leader.set(i64::from(leading));
        if leading {
            return Vec::new();
        }
        std::mem::take(&mut *self.reported_keys())
            .into_iter()
            .collect()
    }

    /// A pass ended at `at`; `present` are the objects it found. Returns the objects whose
    /// series to remove: those no longer present.
    #[must_use]
    pub fn pass_completed(&self, present: &[String], at: SystemTime) -> Vec<String> {
        self.last_pass.set(unix_seconds(at));
        let mut reported = self.reported_keys();
        let gone: Vec<String> = reported
            .iter()
            .filter(|key| !present.contains(key))
            .cloned()
            .collect();
        for key in &gone {
            reported.remove(key);
        }
        gone
    }

    fn reported_keys(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct AgentMetrics {
    registry: Registry,
    expiration: Family<RequestLabels, Gauge>,
    renewal: Family<RequestLabels, Gauge>,
    ready: Family<RequestLabels, Gauge>,
    signer_reachable: Family<RequestLabels, Gauge>,
    restart_timed_out: Family<RequestLabels, Gauge>,
    ends_with_root: Family<RequestLabels, Gauge>,
    root_cert_changed: Family<RequestLabels, Gauge>,
    reconciles: Family<OutcomeLabels, Counter>,
    issuances: Counter,
    client_certificate_expiration: Gauge,
    client_certificate_not_before: Gauge,
    loop_metrics: LoopMetrics,
    ops_connections: crate::ops_http::OpsConnectionMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshca_agent");
        crate::signer::metrics::register_build_info(&mut registry);
        let expiration = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "notAfter of the installed intermediate (Unix seconds)",
            expiration.clone(),
        );
        let renewal = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "certificate_renewal_timestamp_seconds",
            "When the agent will replace the installed intermediate (Unix seconds)",
            renewal.clone(),
        );
        let ready = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "certificate_ready",
            "1 if the last reconcile of the request succeeded, 0 if it failed (see its status.lastError)",
            ready.clone(),
        );
        let signer_reachable = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "signer_reachable",
            "1 if the signer answered the request's last pass that asked it, 0 if it could not be reached (the installed intermediate stays in use; renewals and root changes wait)",
            signer_reachable.clone(),
        );
        let restart_timed_out = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "restart_timed_out",
            "1 if the request's restart plan stopped waiting for istiod's rollout or a namespace's istio-ca-root-cert (status.restart.message names which; the rest of its workloads were not restarted), 0 otherwise",
            restart_timed_out.clone(),
        );
        let ends_with_root = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "certificate_ends_with_root",
            "1 if the installed intermediate ends with the signer's root (no earlier): a renewal could not end later, so it is kept past its renewal time and the root must change before it ends; 0 otherwise",
            ends_with_root.clone(),
        );
        let root_cert_changed = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "root_cert_changed_timestamp_seconds",
            "When this directory agent last wrote root-cert.pem with new bytes (Unix seconds; no series until it has): istiod takes them only when it starts, so one started before this runs on the old files",
            root_cert_changed.clone(),
        );
        let reconciles = outcomes_from_zero(&["ok"]);
        registry.register(
            "reconciles",
            "Reconciles of requests by outcome (ok, or the Ready condition's reason)",
            reconciles.clone(),
        );
        let issuances = Counter::default();
        registry.register(
            "issuances",
            "New intermediates installed",
            issuances.clone(),
        );
        let client_certificate_expiration = Gauge::default();
        registry.register(
            "client_certificate_expiration_timestamp_seconds",
            "notAfter of the client certificate the agent presents to the signer, as last read (Unix seconds; 0 until a pass reads it)",
            client_certificate_expiration.clone(),
        );
        let client_certificate_not_before = Gauge::default();
        registry.register(
            "client_certificate_not_before_timestamp_seconds",
            "notBefore of that client certificate, as last read (Unix seconds; 0 until a pass reads it): with its notAfter, its lifetime",
            client_certificate_not_before.clone(),
        );
        let loop_metrics = LoopMetrics::register(&mut registry);
        let ops_connections = crate::ops_http::OpsConnectionMetrics::register(&mut registry);
        AgentMetrics {
            ops_connections,
            registry,
            client_certificate_expiration,
            client_certificate_not_before,
            expiration,
            renewal,
            ready,
            signer_reachable,
            restart_timed_out,
            ends_with_root,
            root_cert_changed,
            reconciles,
            issuances,
            loop_metrics,
        }
    }

    pub fn reconciled(&self, request: &str, what: Reconciled<'_>) {
        let labels = RequestLabels {
            request: request.to_string(),
        };
        if let Some((not_after, renew_at)) = what.installed {
            self.expiration
                .get_or_create(&labels)
                .set(unix_seconds(not_after));
            self.renewal
                .get_or_create(&labels)
                .set(unix_seconds(renew_at));
        }
        self.ready
            .get_or_create(&labels)
            .set(i64::from(what.outcome == "ok"));
        let reachable = match what.signer {
            SignerContact::Answered => Some(1),
            SignerContact::Unreachable => Some(0),
            // Kept as last known: this pass did not get as far as asking.
            SignerContact::NotAsked => None,
        };
        if let Some(reachable) = reachable {
            self.signer_reachable.get_or_create(&labels).set(reachable);
        }
        if let Some(ends_with_root) = what.ends_with_root {
            self.ends_with_root
                .get_or_create(&labels)
                .set(i64::from(ends_with_root));
        }
        if let Some(timed_out) = what.restart_timed_out {
            self.restart_timed_out
                .get_or_create(&labels)
                .set(i64::from(timed_out));
        }
        self.reconciles
            .get_or_create(&OutcomeLabels {
                outcome: what.outcome.to_string(),
            })
            .inc();
        self.loop_metrics.reported(&labels.request);
    }

    /// The client certificate read for this pass.
    pub fn client_certificate(&self, validity: Validity) {
        self.client_certificate_expiration
            .set(unix_seconds(validity.not_after));
        self.client_certificate_not_before
            .set(unix_seconds(validity.not_before));
    }

    /// The directory agent wrote root-cert.pem with new bytes at `at`: istiod must start
    /// again to take them (it reads the files only when it starts).
    pub fn root_cert_changed(&self, request: &str, at: SystemTime) {
        let labels = RequestLabels {
            request: request.to_string(),
        };
        self.root_cert_changed
            .get_or_create(&labels)
            .set(unix_seconds(at));
        self.loop_metrics.reported(&labels.request);
    }

    /// A new intermediate was installed.
    pub fn issued(&self) {
        self.issuances.inc();
    }

    /// A pass over all requests ended; `present` are the requests it found.
    pub fn pass_completed(&self, present: &[String], at: SystemTime) {
        self.forget(self.loop_metrics.pass_completed(present, at));
    }

    /// Whether this replica acts; one that stops drops its request series, and its
    /// client certificate's expiry (back to 0, as before any pass): the certificate may
    /// be renewed for the new leader while this one, not reading it, would report the
    /// old one's end until its alert fired.
    pub fn set_leading(&self, leading: bool) {
        if !leading {
            self.client_certificate_expiration.set(0);
            self.client_certificate_not_before.set(0);
        }
        self.forget(self.loop_metrics.set_leading(leading));
    }

    /// The agent's `--resync-seconds`.
    pub fn set_resync(&self, resync: Duration) {
        self.loop_metrics.set_resync(resync);
    }

    fn forget(&self, requests: Vec<String>) {
        for request in requests {
            let labels = RequestLabels { request };
            self.expiration.remove(&labels);
            self.renewal.remove(&labels);
            self.ready.remove(&labels);
            self.signer_reachable.remove(&labels);
            self.restart_timed_out.remove(&labels);
            self.ends_with_root.remove(&labels);
            self.root_cert_changed.remove(&labels);
        }
    }
}

impl Exposition for AgentMetrics {
    fn render(&self) -> String {
        exposition(&self.registry)
    }

    fn ops_connections(&self) -> crate::ops_http::OpsConnectionMetrics {
        self.ops_connections.clone()
    }
}

/// Binds `addr` and serves `/metrics` and `/healthz` over plain HTTP (as the signer's
/// `ops_listen` does) until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<dyn Exposition>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let connections = metrics.ops_connections();
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        crate::signer::metrics::EXPOSITION_CONTENT_TYPE,
                    )],
                    metrics.render(),
                )
                    .into_response()
            }),
        );
    tokio::spawn(crate::ops_http::serve(
        listener,
        router,
        connections,
        std::future::pending(),
    ));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn a_request_reports_its_bundle_until_it_is_gone() {
        let m = AgentMetrics::new();
        m.set_leading(true);
        m.reconciled(
            "mesh/a",
            Reconciled {
                outcome: "ok",
                installed: Some((at(9_000), at(6_000))),
                signer: SignerContact::Answered,
                ends_with_root: Some(true),
                restart_timed_out: Some(true),
            },
        );
        m.issued();
        m.reconciled(
            "mesh/b",
            Reconciled {
                outcome: "SignerError",
                installed: None,
                signer: SignerContact::Unreachable,
                ends_with_root: Some(false),
                restart_timed_out: None,
            },
        );
        m.root_cert_changed("mesh/a", at(5_555));
        m.pass_completed(&["mesh/a".into(), "mesh/b".into()], at(1_234));
        let text = m.render();
        for needle in [
            "meshca_agent_certificate_expiration_timestamp_seconds{request=\"mesh/a\"} 9000",
            "meshca_agent_certificate_renewal_timestamp_seconds{request=\"mesh/a\"} 6000",
            "meshca_agent_certificate_ready{request=\"mesh/a\"} 1",
            "meshca_agent_certificate_ready{request=\"mesh/b\"} 0",
            "meshca_agent_signer_reachable{request=\"mesh/a\"} 1",
            "meshca_agent_signer_reachable{request=\"mesh/b\"} 0",
            "meshca_agent_restart_timed_out{request=\"mesh/a\"} 1",
            "meshca_agent_certificate_ends_with_root{request=\"mesh/a\"} 1",
            "meshca_agent_certificate_ends_with_root{request=\"mesh/b\"} 0",
            "meshca_agent_reconciles_total{outcome=\"ok\"} 1",
            "meshca_agent_reconciles_total{outcome=\"SignerError\"} 1",
            "meshca_agent_issuances_total 1",
            "meshca_agent_leader 1",
            "meshca_agent_last_pass_timestamp_seconds 1234",
            "meshca_agent_root_cert_changed_timestamp_seconds{request=\"mesh/a\"} 5555",
            concat!(
                "meshca_agent_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\",revision=\"",
                env!("MESHCA_BUILD_REVISION"),
                "\"} 1\n"
            ),
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(!text.contains("expiration_timestamp_seconds{request=\"mesh/b\"}"));
        // Directory mode restarts nothing: no series.
        assert!(!text.contains("restart_timed_out{request=\"mesh/b\"}"));

        // A pass that failed before asking the signer (a Kubernetes error, say) keeps the
        // last answer known.
        m.reconciled(
            "mesh/b",
            Reconciled {
                outcome: "KubernetesError",
                installed: None,
                signer: SignerContact::NotAsked,
                ends_with_root: None,
                restart_timed_out: Some(false),
            },
        );
        m.pass_completed(&["mesh/b".into()], at(1_300));
        let text = m.render();
        assert!(text.contains("meshca_agent_signer_reachable{request=\"mesh/b\"} 0"));
        assert!(text.contains("meshca_agent_certificate_ends_with_root{request=\"mesh/b\"} 0"));
        assert!(
            !text.contains("mesh/a"),
            "deleted request still reported:\n{text}"
        );
        assert!(text.contains("meshca_agent_certificate_ready{request=\"mesh/b\"} 0"));

        m.client_certificate(Validity {
            not_before: at(8_888),
            not_after: at(9_999),
        });
        let expiry = "meshca_agent_client_certificate_expiration_timestamp_seconds";
        let start = "meshca_agent_client_certificate_not_before_timestamp_seconds";
        assert!(m.render().contains(&format!("{expiry} 9999")));
        assert!(m.render().contains(&format!("{start} 8888")));
        m.set_leading(false);
        let text = m.render();
        assert!(
            !text.contains("mesh/b"),
            "a follower reports requests:\n{text}"
        );
        assert!(text.contains("meshca_agent_leader 0"));
        assert!(text.contains(&format!("{expiry} 0")), "{text}");
        assert!(text.contains(&format!("{start} 0")), "{text}");
        assert!(text.contains("meshca_agent_reconciles_total{outcome=\"ok\"} 1"));
    }
}
