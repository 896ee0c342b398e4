//! `meshca mesh-controller`, the management plane: for every `VirtualMesh`, the agents'
//! requests in the member clusters, federation objects applied and garbage-collected, the
//! root-change handshake, and one aggregated status.
//!
//! [`decide`] holds every decision as pure functions; [`k8s`] is the thin layer of API
//! calls; [`controller`] runs one against the other.

pub mod controller;
pub mod crd;
pub mod decide;
pub mod k8s;
pub mod metrics;
