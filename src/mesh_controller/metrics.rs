//! The mesh controller's Prometheus metrics (`--metrics-listen`): its loop (whether this
//! replica acts, when its last pass ended), its reconciles by outcome, and per VirtualMesh
//! whether it is Ready.

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
        let loop_metrics = LoopMetrics::register(&mut registry);
        let ops_connections = crate::ops_http::OpsConnectionMetrics::register(&mut registry);
        MeshControllerMetrics {
            ops_connections,
            registry,
            reconciles,
            ready,
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

    /// A pass ended; `present` are the VirtualMeshes it found.
    pub fn pass_completed(&self, present: &[String], at: std::time::SystemTime) {
        self.forget(self.loop_metrics.pass_completed(present, at));
    }

    /// Whether this replica acts; one that stops drops its VirtualMesh series.
    pub fn set_leading(&self, leading: bool) {
        self.forget(self.loop_metrics.set_leading(leading));
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
