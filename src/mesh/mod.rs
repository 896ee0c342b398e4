//! Management plane: VirtualMesh membership and cross-cluster federation.
//!
//! Pure translation (no Kubernetes client here): [`federation::translate`] turns a VirtualMesh
//! and an [`inventory::Inventory`] of its member clusters into the Istio objects each cluster
//! must hold, and [`federation::FederationPlan::stale_objects`] says which labelled objects to
//! delete. `meshca federation render` ([`render`]) writes the same plan to files.

pub mod address;
pub mod federation;
pub mod inventory;
pub mod istio;
pub mod names;
pub mod render;

pub use federation::{
    DesiredObject, FederationConfig, FederationError, FederationMode, FederationPlan,
    ServiceSelector, parse_virtual_mesh, stale_objects, translate,
};
pub use inventory::{ClusterInventory, Inventory, InventoryError, PortInventory, ServiceInventory};
pub use istio::{IstioObject, Kind, ObjectId};
