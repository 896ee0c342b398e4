//! The management plane's custom resources (`meshca.dev/v1alpha1`): `VirtualMesh`, whose
//! spec is the seed's document ([`VirtualMeshSpec`], validated by the signer's and
//! federation's own code), and `Mesh`, one per Istio installation: how to reach its
//! cluster, its federation settings (the inventory's fields) and what its agent's request
//! carries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::crd::{Condition, RequestSettings};
// The inventory's defaults: a Mesh is an inventory entry.
use crate::mesh::inventory::{
    ClusterInventory, default_cluster_domain, default_gateway_port, default_istio_namespace,
};
use crate::policy::ObjectRef;
use crate::policy::virtual_mesh::{Metadata, VirtualMeshDocument, VirtualMeshSpec};

/// Namespace of the agent and its requests in member clusters (the agent's default).
pub const DEFAULT_AGENT_NAMESPACE: &str = "service-mesh-hub";
/// Key of the kubeconfig in the Secret a Mesh names.
pub const DEFAULT_KUBECONFIG_KEY: &str = "kubeconfig";

/// A virtual mesh: member meshes sharing one root, their services federated.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "meshca.dev",
    version = "v1alpha1",
    kind = "VirtualMesh",
    namespaced,
    shortname = "vmesh",
    status = "VirtualMeshStatus",
    doc = "Meshes that share one root (meshca's signer) and whose services are federated, in the shape of the Service Mesh Hub VirtualMesh.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Meshes","type":"integer","jsonPath":".status.meshCount"}"#,
    printcolumn = r#"{"name":"Root","type":"string","priority":1,"description":"SHA-256 of the root every member chains to","jsonPath":".status.rootFingerprint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct VirtualMeshResourceSpec {
    /// The seed document's spec, field for field.
    #[serde(flatten)]
    pub document: VirtualMeshSpec,
}

/// `namespace/name` of an object from its metadata.
fn id_of(metadata: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        metadata.namespace.clone().unwrap_or_default(),
        metadata.name.clone().unwrap_or_default(),
    )
}

impl VirtualMesh {
    pub fn id(&self) -> ObjectRef {
        id_of(&self.metadata)
    }

    /// The document the signer and federation validate.
    pub fn document(&self) -> VirtualMeshDocument {
        VirtualMeshDocument {
            api_version: Some("meshca.dev/v1alpha1".into()),
            kind: "VirtualMesh".into(),
            metadata: Metadata {
                name: self.metadata.name.clone().unwrap_or_default(),
                namespace: self.metadata.namespace.clone().unwrap_or_default(),
            },
            spec: self.spec.document.clone(),
            status: None,
        }
    }
}

/// One Istio installation (a member cluster): how the controller reaches it, what
/// federation needs to know about it, and the settings of its agent's request.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "meshca.dev",
    version = "v1alpha1",
    kind = "Mesh",
    namespaced,
    derive = "PartialEq",
    doc = "An Istio installation in a member cluster: its API access, trust domain, east-west gateway and agent settings.",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterName"}"#,
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// The cluster's name: a DNS label, part of federated host names
    /// (<service>.<namespace>.svc.<clusterName>.<hostSuffix>). Unique among a VirtualMesh's
    /// members.
    pub cluster_name: String,
    /// The Secret (in this Mesh's namespace) holding a kubeconfig for the cluster. Absent:
    /// the management cluster itself, with the controller's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret: Option<KubeconfigSecretRef>,
    /// SPIFFE trust domain of the mesh (e.g. cluster.local).
    pub trust_domain: String,
    /// Istio's namespace, where federation objects go (default istio-system).
    #[serde(default = "default_istio_namespace")]
    pub istio_namespace: String,
    /// The cluster's DNS domain (default cluster.local).
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Addresses other clusters reach this cluster's east-west gateway at (IPs of one
    /// family, or DNS names). Required when the cluster offers services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_addresses: Vec<String>,
    /// The gateway's TLS port (default 15443): the port of the gateway's Service, which
    /// clients reach at gatewayAddresses (a load balancer), not a node port.
    #[serde(default = "default_gateway_port")]
    pub gateway_port: u16,
    /// The VirtualMeshCertificateSigningRequest the controller keeps in this cluster.
    pub agent: MeshAgentSpec,
}

fn default_agent_namespace() -> String {
    DEFAULT_AGENT_NAMESPACE.into()
}
fn default_kubeconfig_key() -> String {
    DEFAULT_KUBECONFIG_KEY.into()
}

/// Where a member cluster's kubeconfig is.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeconfigSecretRef {
    /// Secret name, in the Mesh's namespace.
    pub name: String,
    /// Key holding the kubeconfig YAML (default kubeconfig).
    #[serde(default = "default_kubeconfig_key")]
    pub key: String,
    /// Context to use (default: the kubeconfig's current context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// Where the member's VirtualMeshCertificateSigningRequest goes, and what it carries
/// besides the virtual mesh and the mesh (set by the controller) and the retired roots
/// (the controller adds those it retires to `rotation.retiredRootFingerprints`): the
/// request's own settings, same fields and defaults.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshAgentSpec {
    /// Namespace of the agent in the member cluster, where the request goes (default
    /// service-mesh-hub). The request is named after this Mesh.
    #[serde(default = "default_agent_namespace")]
    pub namespace: String,
    /// The request's settings (flat, as in the request's spec).
    #[serde(flatten)]
    pub settings: RequestSettings,
}

impl Mesh {
    pub fn id(&self) -> ObjectRef {
        id_of(&self.metadata)
    }
}

impl MeshSpec {
    /// This Mesh as a federation inventory entry (services filled in later); its checks
    /// are [`ClusterInventory::validate`]'s.
    pub fn inventory(&self, mesh: &ObjectRef) -> ClusterInventory {
        ClusterInventory {
            name: self.cluster_name.clone(),
            mesh: mesh.clone(),
            trust_domain: self.trust_domain.clone(),
            istio_namespace: self.istio_namespace.clone(),
            cluster_domain: self.cluster_domain.clone(),
            gateway_addresses: self.gateway_addresses.clone(),
            gateway_port: self.gateway_port,
            services: Vec::new(),
        }
    }
}

/// Where a VirtualMesh stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VirtualMeshPhase {
    /// Valid; requests or federation not yet complete everywhere.
    Progressing,
    /// Every member has its intermediate under one root; federation applied everywhere.
    Ready,
    /// Something failed (a member unreachable, a request failed, a conflict); see
    /// conditions and meshes.
    Degraded,
    /// The spec is refused (see the Accepted condition); nothing in the clusters changed.
    Invalid,
    /// Being deleted: cleaning up the member clusters.
    Deleting,
}

/// Where one member stands: its request's phase, or what kept the controller from it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MemberPhase {
    /// The request exists; its agent has not reported yet.
    Pending,
    Requested,
    Issued,
    Installed,
    /// The agent reports a failure (see message).
    Failed,
    /// The controller could not reach, read or write the cluster (see message).
    Error,
    /// A request of that name exists and is not this VirtualMesh's.
    Conflict,
    /// Left the VirtualMesh; its cleanup is not finished (see message).
    Removing,
}

/// One member (or a former member still being cleaned up).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The Mesh.
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    /// Where its request and federation objects are (remembered for cleanup).
    pub agent_namespace: String,
    pub istio_namespace: String,
    pub phase: MemberPhase,
    /// From the request's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_root_fingerprints: Vec<String>,
    /// The root the signer announces as its next one, as the agent last heard it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_root_fingerprint: Option<String>,
    /// Federation in this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<MemberFederation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MemberStatus {
    pub fn id(&self) -> ObjectRef {
        ObjectRef::new(self.namespace.clone(), self.name.clone())
    }
}

/// What federation asks of one member cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberFederation {
    /// Services it offers the others.
    pub exported: u64,
    /// Services it receives from the others.
    pub imported: u64,
    /// Objects it holds (Gateway, DestinationRule, ServiceEntries).
    pub objects: u64,
    /// Objects of those names that belong to someone else (left alone): the first 16, by
    /// name, then how many more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Services of this cluster the selector picks that cannot be federated, each with
    /// why (ExternalName, no TCP port, ...): the first 16, then how many more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_federated: Vec<String>,
}

/// A root change under way: every member reports `root`; the roots they still trust
/// besides it are retired at `retireAt`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootRotation {
    pub root: String,
    /// When every member first reported the root with old roots still trusted.
    pub converged_at: String,
    /// When the old roots are (or were) retired.
    pub retire_at: String,
}

/// Federation across the members.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederationStatus {
    /// PERMISSIVE, or Disabled (no spec.federation).
    pub mode: String,
    /// Services federated, over all members.
    pub services: u64,
    /// Services that took their next address candidate after a hash collision.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moved_addresses: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the controller observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMeshStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VirtualMeshPhase>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted, TrustEstablished, Federated, Ready; NextRootTrusted while some member
    /// reports a next root.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Number of members.
    #[serde(default)]
    pub mesh_count: u64,
    /// SHA-256 of the root every member's intermediate chains to (absent while they differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    /// SHA-256 of the root the signer announces as its next one, as the members report it
    /// (absent when none does, or while they differ). Never retired; NextRootTrusted says
    /// when every member trusts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_root_fingerprint: Option<String>,
    /// Since when every member trusts that root (RFC 3339): NextRootTrusted turns True
    /// the retirement delay after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_root_trusted_since: Option<String>,
    /// Old roots the controller told every member to stop trusting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_root_fingerprints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_rotation: Option<RootRotation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationStatus>,
    /// Members, and former members whose cleanup is not finished, by namespace and name.
    #[serde(default)]
    pub meshes: Vec<MemberStatus>,
}

impl VirtualMeshStatus {
    /// Members (and former members) recorded, by Mesh.
    pub fn recorded(&self) -> BTreeMap<ObjectRef, &MemberStatus> {
        self.meshes.iter().map(|m| (m.id(), m)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::crd::{NamespacedName, RestartSpec};
    use kube::CustomResourceExt;

    #[test]
    fn a_minimal_mesh_gets_the_documented_defaults() {
        let spec: MeshSpec = serde_json::from_value(serde_json::json!({
            "clusterName": "east",
            "trustDomain": "east.local",
            "agent": {"signer": {"url": "https://signer.example:8443"}}
        }))
        .unwrap();
        assert_eq!(spec.istio_namespace, "istio-system");
        assert_eq!(spec.cluster_domain, "cluster.local");
        assert_eq!(spec.gateway_port, 15443);
        assert!(spec.kubeconfig_secret.is_none());
        assert_eq!(spec.agent.namespace, "service-mesh-hub");
        assert_eq!(spec.agent.settings.target, NamespacedName::default());
        assert_eq!(spec.agent.settings.restart, RestartSpec::default());
        let with_secret: KubeconfigSecretRef =
            serde_json::from_value(serde_json::json!({"name": "east-kubeconfig"})).unwrap();
        assert_eq!(with_secret.key, "kubeconfig");
        let inventory = spec.inventory(&"smh/east".parse().unwrap());
        inventory.validate().unwrap();
        assert_eq!(inventory.mesh.to_string(), "smh/east");
    }

    #[test]
    fn the_virtual_mesh_spec_is_the_seed_document() {
        let seed = include_str!("../../config/virtual-mesh.yaml");
        let mut value: serde_json::Value = serde_saphyr::from_str(seed).unwrap();
        value["apiVersion"] = "meshca.dev/v1alpha1".into();
        let vm: VirtualMesh = serde_json::from_value(value).unwrap();
        assert_eq!(vm.id().to_string(), "service-mesh-hub/virtual-mesh");
        let doc = vm.document();
        assert_eq!(doc.spec.meshes.len(), 2);
        doc.into_policy("test").unwrap();
        // The spec serializes back flat, as written.
        let spec = serde_json::to_value(&vm.spec).unwrap();
        assert_eq!(spec["federation"]["mode"], "PERMISSIVE");
        assert_eq!(spec["certificateAuthority"]["builtin"]["ttlDays"], 356);
        assert!(spec.get("document").is_none());
    }

    #[test]
    fn the_crds_have_names_and_a_status_subresource() {
        let vm = VirtualMesh::crd();
        assert_eq!(
            vm.metadata.name.as_deref(),
            Some("virtualmeshes.meshca.dev")
        );
        assert!(
            vm.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
        let mesh = Mesh::crd();
        assert_eq!(mesh.metadata.name.as_deref(), Some("meshes.meshca.dev"));
        assert!(mesh.spec.versions[0].subresources.is_none());
    }
}
