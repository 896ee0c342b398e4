//! The mesh controller's Prometheus metrics (`--metrics-listen`): its loop (whether this
//! replica acts, when its last pass ended), its reconciles by outcome, per VirtualMesh
//! whether it is Ready, and per member Mesh when its kubeconfig's credential runs out.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::metrics::{Exposition, LoopMetrics};
use crate::signer::metrics::{OutcomeLabels, exposition, outcomes_from_zero, register_build_info};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VirtualMeshLabels {
    /// `namespace/name` of the VirtualMesh.
    pub virtual_mesh: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshLabels {
    /// `namespace/name` of the Mesh.
    pub mesh: String,
}

/// How a reconcile of a VirtualMesh ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// It ran to its end; `ready`: the phase is Ready.
    Kept { ready: bool },
    /// Cleaned up and its finalizer removed.
    Gone,
    /// It failed (logged); counted as not Ready.
    Failed,
}

pub struct MeshControllerMetrics {
    registry: Registry,
    reconciles: Family<OutcomeLabels, Counter>,
    ready: Family<VirtualMeshLabels, Gauge>,
    credential_expiration: Family<MeshLabels, Gauge>,
    /// The Meshes whose credential a pass has seen so far, and those of the pass before:
    /// a series a pass did not see (a Mesh gone, or no longer named by a VirtualMesh) is
    /// removed as it ends.
    credentials_seen: Mutex<(HashSet<String>, HashSet<String>)>,
    loop_metrics: LoopMetrics,
    ops_connections: crate::ops_http::OpsConnectionMetrics,
}

impl Default for MeshControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshca_mesh_controller");
        register_build_info(&mut registry);
        let reconciles = outcomes_from_zero(&["ok", "error"]);
        registry.register(
            "reconciles",
            "Reconciles of VirtualMeshes by outcome (ok, or error: the log says why)",
            reconciles.clone(),
        );
        let ready = Family::<VirtualMeshLabels, Gauge>::default();
        registry.register(
            "virtual_mesh_ready",
            "1 if the VirtualMesh's phase is Ready, 0 otherwise (its status says why)",
            ready.clone(),
        );
        let credential_expiration = Family::<MeshLabels, Gauge>::default();
        registry.register(
            "member_credential_expiration_timestamp_seconds",
            "When the credential of a member Mesh's kubeconfig (its token's exp, its client certificate's notAfter) runs out, Unix seconds; absent when it does not say",
            credential_expiration.clone(),
        );
        let loop_metrics = LoopMetrics::register(&mut registry);
        let ops_connections = crate::ops_http::OpsConnectionMetrics::register(&mut registry);
        MeshControllerMetrics {
            ops_connections,
            registry,
            reconciles,
            ready,
            credential_expiration,
            credentials_seen: Mutex::default(),
            loop_metrics,
        }
    }

    pub fn reconciled(&self, virtual_mesh: &str, outcome: Reconciled) {
        let counted = if outcome == Reconciled::Failed {
            "error"
        } else {
            "ok"
        };
        self.reconciles
            .get_or_create(&OutcomeLabels {
                outcome: counted.to_string(),
            })
            .inc();
        let ready = match outcome {
            Reconciled::Kept { ready } => ready,
            Reconciled::Failed => false,
            Reconciled::Gone => {
                self.forget(vec![virtual_mesh.to_string()]);
                return;
            }
        };
        self.ready
            .get_or_create(&VirtualMeshLabels {
                virtual_mesh: virtual_mesh.to_string(),
            })
            .set(i64::from(ready));
        self.loop_metrics.reported(virtual_mesh);
    }

    /// The kubeconfig of the member Mesh `mesh` (`namespace/name`) was read: its credential
    /// runs out at `expiry` (None: it does not say, and the series goes).
    pub fn member_credential(&self, mesh: &str, expiry: Option<std::time::SystemTime>) {
        let labels = MeshLabels {
            mesh: mesh.to_string(),
        };
        let Some(expiry) = expiry else {
            self.credential_expiration.remove(&labels);
            return;
        };
        let seconds = match expiry.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(_) => 0,
        };
        self.credential_expiration
            .get_or_create(&labels)
            .set(seconds);
        let mut seen = self
            .credentials_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        seen.0.insert(labels.mesh);
    }

    /// A pass ended; `present` are the VirtualMeshes it found.
    pub fn pass_completed(&self, present: &[String], at: std::time::SystemTime) {
        self.forget(self.loop_metrics.pass_completed(present, at));
        let mut seen = self
            .credentials_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (this_pass, last_pass) = &mut *seen;
        for gone in last_pass.difference(this_pass) {
            self.credential_expiration
                .remove(&MeshLabels { mesh: gone.clone() });
        }
        *last_pass = std::mem::take(this_pass);
    }

    /// Whether this replica acts; one that stops drops its VirtualMesh series, and its
    /// member credential series (the acting replica reads the Secrets from then on: an
    /// end seen before a renewal would otherwise stay here and fire the alert).
    pub fn set_leading(&self, leading: bool) {
        self.forget(self.loop_metrics.set_leading(leading));
        if !leading {
            self.credential_expiration.clear();
            let mut seen = self
                .credentials_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *seen = Default::default();
        }
    }

    /// The controller's `--resync-seconds`.
    pub fn set_resync(&self, resync: std::time::Duration) {
        self.loop_metrics.set_resync(resync);
    }

    fn forget(&self, virtual_meshes: Vec<String>) {
        for virtual_mesh in virtual_meshes {
            self.ready.remove(&VirtualMeshLabels { virtual_mesh });
        }
    }
}

impl Exposition for MeshControllerMetrics {
    fn render(&self) -> String {
        exposition(&self.registry)
    }

    fn ops_connections(&self) -> crate::ops_http::OpsConnectionMetrics {
        self.ops_connections.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(metrics: &MeshControllerMetrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("meshca_mesh_controller_member_credential_expiration"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_member_credential_no_pass_reads_loses_its_series() {
        let metrics = MeshControllerMetrics::new();
        let at =
            |seconds: u64| Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds));
        metrics.member_credential("smh/east", at(100));
        metrics.member_credential("smh/west", at(200));
        metrics.pass_completed(&[], std::time::SystemTime::now());
        assert_eq!(series(&metrics).len(), 2);
        // The next pass reads east only, and finds west's Secret no longer says an end.
        metrics.member_credential("smh/east", at(300));
        metrics.member_credential("smh/north", None);
        metrics.pass_completed(&[], std::time::SystemTime::now());
        assert_eq!(
            series(&metrics),
            [
                "meshca_mesh_controller_member_credential_expiration_timestamp_seconds{mesh=\"smh/east\"} 300"
            ]
        );
        // A credential that stops saying when it ends loses its series at once.
        metrics.member_credential("smh/east", None);
        assert!(series(&metrics).is_empty());
        // A replica that stops acting drops them all: it no longer reads the Secrets.
        metrics.member_credential("smh/east", at(400));
        metrics.set_leading(false);
        assert!(series(&metrics).is_empty());
    }
}
