//! Every decision of the mesh controller, as pure functions of what was read (and of the
//! time): which VirtualMesh owns a mesh, whether a VirtualMesh is valid, the request each
//! member gets, which Services are federated, which Istio objects to apply or delete, when
//! old roots are retired, and the status that sums it up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use super::crd::{
    FederationStatus, MemberFederation, MemberPhase, MemberStatus, Mesh, MeshSpec, RootRotation,
    VirtualMesh, VirtualMeshPhase, VirtualMeshStatus,
};
use crate::agent::controller::set_condition;
use crate::agent::crd::{
    NamespacedName, Phase, RequestSettings, RotationSpec, VirtualMeshCertificateSigningRequest,
    VmcsrSpec, VmcsrStatus,
};
use crate::agent::rotation::normalize_fingerprint;
use crate::logging::clip;
use crate::mesh::federation::{FederationConfig, FederationError, FederationPlan};
use crate::mesh::inventory::{
    ClusterInventory, Inventory, InventoryError, PortInventory, Protocol, ServiceInventory,
};
use crate::mesh::istio::{IstioObject, Kind, ObjectId};
use crate::mesh::names::{is_dns1123_label, is_dns1123_subdomain, is_label_value};
use crate::policy::{ObjectRef, PolicyLoadError};
use crate::signer::audit::rfc3339;

/// Finalizer on every VirtualMesh: its member clusters are cleaned before it goes.
pub const FINALIZER: &str = "meshca.dev/mesh-controller";
/// Label on requests: the Mesh (name; its namespace is the VirtualMesh's) it is for.
pub const LABEL_MESH: &str = "meshca.io/mesh";
/// Namespaces whose Services are never federated (besides each mesh's Istio namespace).
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// Condition types, in the order they appear in status.
pub const ACCEPTED: &str = "Accepted";
pub const TRUST_ESTABLISHED: &str = "TrustEstablished";
pub const FEDERATED: &str = "Federated";
pub const READY: &str = "Ready";
/// Present only while some member reports a next root (the signer's announced one).
pub const NEXT_ROOT_TRUSTED: &str = "NextRootTrusted";

// ---------------------------------------------------------------------------------------
// Ownership and validation

/// Which VirtualMesh owns each mesh. One whose status records it (a member, or a former
/// member still being cleaned up) keeps it: an older VirtualMesh that lists it later
/// does not take it, nor does any other before the cleanup ends, since both would act on
/// the one cluster. A mesh no status records goes to the oldest VirtualMesh listing it
/// (then by namespace/name), valid or not, so that a newcomer never takes a mesh from a
/// VirtualMesh with a typo. Status is written by the controller alone (a subresource),
/// so editing a spec cannot fake a claim.
pub fn claims(virtual_meshes: &[VirtualMesh]) -> BTreeMap<ObjectRef, ObjectRef> {
    let mut order: Vec<&VirtualMesh> = virtual_meshes.iter().collect();
    order.sort_by_key(|vm| {
        (
            vm.metadata.creation_timestamp.as_ref().map(|t| t.0),
            vm.id(),
        )
    });
    let mut owners = BTreeMap::new();
    for vm in &order {
        for member in vm.status.iter().flat_map(|s| &s.meshes) {
            owners.entry(member.id()).or_insert_with(|| vm.id());
        }
    }
    for vm in order {
        for mesh in &vm.spec.document.meshes {
            if let Ok(id) = format!("{}/{}", mesh.namespace, mesh.name).parse::<ObjectRef>() {
                owners.entry(id).or_insert_with(|| vm.id());
            }
        }
    }
    owners
}

/// Why a VirtualMesh is refused: the Accepted condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub message: String,
}

/// A member mesh, checked.
#[derive(Debug, Clone)]
pub struct Member<'m> {
    pub id: ObjectRef,
    pub mesh: &'m Mesh,
    /// Its inventory entry, without services.
    pub inventory: ClusterInventory,
}

impl Member<'_> {
    pub fn spec(&self) -> &MeshSpec {
        &self.mesh.spec
    }
}

/// A VirtualMesh that may be acted on.
#[derive(Debug, Clone)]
pub struct Valid<'m> {
    pub config: FederationConfig,
    /// By Mesh namespace/name.
    pub members: Vec<Member<'m>>,
}

/// The reason and message for a VirtualMesh federation (or the signer) refuses. The
/// message is the validation's own words, without the source prefix.
pub fn rejection(error: FederationError) -> Rejection {
    use crate::policy::virtual_mesh::UNKNOWN_FIELD;
    match error {
        FederationError::VirtualMesh(PolicyLoadError::Invalid { problem, .. }) => {
            let reason = if problem.contains("limited trust") {
                "UnsupportedTrustModel"
            } else if problem.starts_with("spec.certificateAuthority.provided") {
                "UnsupportedCertificateAuthority"
            } else if problem.contains(UNKNOWN_FIELD) {
                "UnknownField"
            } else {
                "InvalidSpec"
            };
            Rejection {
                reason,
                message: problem,
            }
        }
        FederationError::Unsupported { problem, .. } => Rejection {
            reason: if problem.starts_with("spec.federation.mode") {
                "UnsupportedFederationMode"
            } else {
                "UnsupportedOption"
            },
            message: problem,
        },
        FederationError::Selector { problem, .. } => Rejection {
            reason: "InvalidSelector",
            message: format!("spec.federation.selector: {problem}"),
        },
        FederationError::HostSuffix { problem, .. } => Rejection {
            reason: "InvalidHostSuffix",
            message: format!("spec.federation.hostSuffix: {problem}"),
        },
        other => Rejection {
            reason: "InvalidSpec",
            message: other.to_string(),
        },
    }
}

/// Checks one Mesh beyond its inventory entry: what its request needs.
/// A member's trust domain must be one the VirtualMesh's `spec.trustDomains` lists, if it
/// lists any: its intermediate would permit no identity of its own workloads, and every
/// workload certificate istiod issues after the next renewal would fail verification.
fn check_trust_domain(mesh: &MeshSpec, trust_domains: &[String]) -> Result<(), String> {
    if trust_domains.is_empty() || trust_domains.contains(&mesh.trust_domain) {
        return Ok(());
    }
    Err(format!(
        "trustDomain {} is not in the VirtualMesh's spec.trustDomains ({}): the intermediates the signer issues would not permit this cluster's workload identities",
        mesh.trust_domain,
        trust_domains.join(", ")
    ))
}

fn check_mesh(mesh: &MeshSpec) -> Result<(), String> {
    if let Some(secret) = &mesh.kubeconfig_secret {
        if !is_dns1123_subdomain(&secret.name) {
            return Err(format!(
                "spec.kubeconfigSecret.name {:?} is not a Secret name",
                secret.name
            ));
        }
        if secret.key.is_empty() {
            return Err("spec.kubeconfigSecret.key is empty".into());
        }
    }
    let agent = &mesh.agent;
    if !is_dns1123_label(&agent.namespace) {
        return Err(format!(
            "spec.agent.namespace {:?} is not a namespace name",
            agent.namespace
        ));
    }
    let agent = &agent.settings;
    if !agent.signer.url.starts_with("https://") {
        return Err(format!(
            "spec.agent.signer.url {:?} must start with https://",
            agent.signer.url
        ));
    }
    agent
        .target
        .to_ref()
        .map_err(|e| format!("spec.agent.target: {e}"))?;
    agent
        .rotation
        .settings()
        .map_err(|e| format!("spec.agent.rotation: {e}"))?;
    Ok(())
}

/// Validates a VirtualMesh against the Meshes the controller sees (those of `namespace`)
/// and the ownership of each mesh: the document as the signer and federation check it,
/// then every member exists, belongs to this VirtualMesh only, is a valid Mesh, and no two
/// members name the same cluster. Every member problem is reported at once.
pub fn validate<'m>(
    vm: &VirtualMesh,
    meshes: &BTreeMap<ObjectRef, &'m Mesh>,
    claims: &BTreeMap<ObjectRef, ObjectRef>,
    namespace: &str,
) -> Result<Valid<'m>, Rejection> {
    let config = FederationConfig::from_document(&vm.document(), "VirtualMesh resource")
        .map_err(rejection)?;
    let id = vm.id();
    let trust_domains = vm
        .spec
        .document
        .trust_domains
        .as_deref()
        .unwrap_or_default();
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let mut members = Vec::with_capacity(config.members.len());
    for mesh_id in &config.members {
        let Some(mesh) = meshes.get(mesh_id) else {
            let hint = if mesh_id.namespace != namespace {
                format!(" (the controller reads Meshes in namespace {namespace} only)")
            } else {
                String::new()
            };
            problems.push((
                "MeshNotFound",
                format!("Mesh {mesh_id} does not exist{hint}"),
            ));
            continue;
        };
        if mesh.metadata.deletion_timestamp.is_some() {
            problems.push((
                "MeshDeleting",
                format!(
                    "Mesh {mesh_id} is being deleted: remove it from spec.meshes; its cluster is cleaned up then, and the Mesh goes"
                ),
            ));
            continue;
        }
        match claims.get(mesh_id) {
            Some(owner) if *owner != id => {
                problems.push((
                    "MeshConflict",
                    format!(
                        "mesh {mesh_id} already belongs to VirtualMesh {owner} (a mesh is in one VirtualMesh at most, and stays with the one whose status records it until that one has cleaned its cluster up)"
                    ),
                ));
                continue;
            }
            _ => {}
        }
        if !is_label_value(&mesh_id.name) {
            problems.push((
                "InvalidMesh",
                format!(
                    "Mesh {mesh_id}: the name is longer than 63 characters; its request is labelled with it, and a label value holds at most 63"
                ),
            ));
            continue;
        }
        let inventory = mesh.spec.inventory(mesh_id);
        if let Err(e) = inventory
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| check_mesh(&mesh.spec))
            .and_then(|()| check_trust_domain(&mesh.spec, trust_domains))
        {
            problems.push(("InvalidMesh", format!("Mesh {mesh_id}: {e}")));
            continue;
        }
        members.push(Member {
            id: mesh_id.clone(),
            mesh,
            inventory,
        });
    }
    if problems.is_empty() {
        let union = Inventory {
            clusters: members.iter().map(|m| m.inventory.clone()).collect(),
        };
        if let Err(InventoryError::DuplicateCluster(cluster)) = union.validate() {
            let named: Vec<String> = members
                .iter()
                .filter(|m| m.inventory.name == cluster)
                .map(|m| m.id.to_string())
                .collect();
            problems.push((
                "DuplicateCluster",
                format!(
                    "Meshes {} all have clusterName {cluster:?}: cluster names are part of federated host names and must differ",
                    named.join(", ")
                ),
            ));
        }
    }
    if let Some((reason, _)) = problems.first() {
        return Err(Rejection {
            reason,
            message: problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(Valid { config, members })
}

// ---------------------------------------------------------------------------------------
// Requests (VirtualMeshCertificateSigningRequests in the member clusters)

fn has_labels(
    labels: Option<&BTreeMap<String, String>>,
    wanted: &BTreeMap<String, String>,
) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The labels of the request for `mesh`: the VirtualMesh's, plus the mesh's name.
pub fn request_labels(config: &FederationConfig, mesh: &ObjectRef) -> BTreeMap<String, String> {
    let mut labels = config.labels();
    labels.insert(LABEL_MESH.to_string(), mesh.name.clone());
    labels
}

/// The request a member must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredRequest {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec: VmcsrSpec,
}

impl DesiredRequest {
    /// The server-side apply body: what meshca owns, nothing else.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "meshca.dev/v1alpha1",
            "kind": "VirtualMeshCertificateSigningRequest",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": self.spec,
        })
    }
}

/// The request for `member` (named after its Mesh, in its agent's namespace): the Mesh's
/// agent settings, the virtual mesh and mesh, and the Mesh's own retired roots plus
/// `retired` (the controller's), sorted.
pub fn desired_request(
    config: &FederationConfig,
    member: &ObjectRef,
    mesh: &MeshSpec,
    retired: &[String],
) -> DesiredRequest {
    let agent = &mesh.agent;
    let retired: BTreeSet<String> = agent
        .settings
        .rotation
        .retired_root_fingerprints
        .iter()
        .chain(retired)
        .map(|fp| normalize_fingerprint(fp))
        .collect();
    DesiredRequest {
        namespace: agent.namespace.clone(),
        name: member.name.clone(),
        labels: request_labels(config, member),
        spec: VmcsrSpec {
            virtual_mesh: NamespacedName {
                namespace: config.virtual_mesh.namespace.clone(),
                name: config.virtual_mesh.name.clone(),
            },
            mesh: NamespacedName {
                namespace: member.namespace.clone(),
                name: member.name.clone(),
            },
            settings: RequestSettings {
                rotation: RotationSpec {
                    retired_root_fingerprints: retired.into_iter().collect(),
                    ..agent.settings.rotation.clone()
                },
                ..agent.settings.clone()
            },
        },
    }
}

/// What to do about a member's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAction {
    /// Create it, or bring it to the desired spec and labels (server-side apply).
    Apply,
    /// Already as desired: no write.
    UpToDate,
    /// A request of that name exists and is not this VirtualMesh's: left alone.
    Conflict(String),
}

/// Compares the request found under the desired name (if any) with the desired one. Specs
/// are compared typed, so the API server's defaults do not count as a difference.
pub fn request_action(
    desired: &DesiredRequest,
    existing: Option<&VirtualMeshCertificateSigningRequest>,
) -> RequestAction {
    let Some(existing) = existing else {
        return RequestAction::Apply;
    };
    let vm = (
        &desired.spec.virtual_mesh.namespace,
        &desired.spec.virtual_mesh.name,
    );
    let without_mesh: BTreeMap<String, String> = desired
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != LABEL_MESH)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !has_labels(existing.metadata.labels.as_ref(), &without_mesh) {
        return RequestAction::Conflict(format!(
            "VirtualMeshCertificateSigningRequest {}/{} exists and was not created for VirtualMesh {}/{} (labels {}); delete it or rename the Mesh",
            desired.namespace,
            desired.name,
            vm.0,
            vm.1,
            without_mesh
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if has_labels(existing.metadata.labels.as_ref(), &desired.labels)
        && existing.spec == desired.spec
    {
        RequestAction::UpToDate
    } else {
        RequestAction::Apply
    }
}

/// Of the requests found in a cluster, those this VirtualMesh made for `mesh` that are not
/// `keep` (`namespace`, `name`): left behind by a changed agent namespace, or all of them
/// when the mesh left (`keep` None).
pub fn stale_requests<'e>(
    existing: &'e [VirtualMeshCertificateSigningRequest],
    labels: &BTreeMap<String, String>,
    keep: Option<(&str, &str)>,
) -> Vec<&'e VirtualMeshCertificateSigningRequest> {
    existing
        .iter()
        .filter(|r| has_labels(r.metadata.labels.as_ref(), labels))
        .filter(|r| {
            let id = (
                r.metadata.namespace.as_deref().unwrap_or_default(),
                r.metadata.name.as_deref().unwrap_or_default(),
            );
            keep != Some(id)
        })
        .collect()
}

/// The request of `desired`'s name among those found.
pub fn find_request<'e>(
    existing: &'e [VirtualMeshCertificateSigningRequest],
    namespace: &str,
    name: &str,
) -> Option<&'e VirtualMeshCertificateSigningRequest> {
    existing.iter().find(|r| {
        r.metadata.namespace.as_deref() == Some(namespace)
            && r.metadata.name.as_deref() == Some(name)
    })
}

// ---------------------------------------------------------------------------------------
// Services

/// At most 16 entries of `list`, each cut at 256 bytes, then one saying how many more: what
/// one member's Services put into the VirtualMesh's status stays small.
pub fn bounded_list(mut list: Vec<String>) -> Vec<String> {
    const ENTRIES: usize = 16;
    const ENTRY_BYTES: usize = 256;
    let more = list.len().saturating_sub(ENTRIES);
    list.truncate(ENTRIES);
    for entry in &mut list {
        if entry.len() > ENTRY_BYTES {
            let mut end = ENTRY_BYTES;
            while !entry.is_char_boundary(end) {
                end -= 1;
            }
            entry.truncate(end);
            entry.push_str("...");
        }
    }
    if more > 0 {
        list.push(format!("... and {more} more"));
    }
    list
}

/// A cluster's Services as federation inventory: all but those of the system namespaces
/// and the mesh's Istio namespace, `default/kubernetes`, ExternalName Services, headless
/// Services with a named targetPort, and Services left without a TCP port (UDP and SCTP
/// ports are dropped: the east-west gateway carries TCP). A headless Service's ports keep
/// a numeric targetPort that differs from the port. A port's protocol comes from its
/// appProtocol when Istio knows it, else from its name. Also returns why each other
/// Service was skipped.
pub fn federated_services(
    services: &[Service],
    cluster: &ClusterInventory,
    host_suffix: &str,
) -> (Vec<ServiceInventory>, Vec<String>) {
    let mut out = Vec::with_capacity(services.len());
    let mut skipped = Vec::new();
    for service in services {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        if SYSTEM_NAMESPACES.contains(&namespace.as_str())
            || namespace == cluster.istio_namespace
            || (namespace == "default" && name == "kubernetes")
        {
            continue;
        }
        let spec = service.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            skipped.push(format!("{namespace}/{name}: ExternalName"));
            continue;
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let tcp_ports: Vec<ServicePort> = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .collect();
        // A headless Service's name resolves to pod addresses, so the gateway must dial
        // the targetPort; a named one is a number per pod, which would take reading the
        // pods or EndpointSlices, and the controller reads neither.
        if headless
            && let Some(named) = tcp_ports.iter().find_map(|p| match &p.target_port {
                Some(IntOrString::String(target)) => Some((p.port, target)),
                _ => None,
            })
        {
            skipped.push(format!(
                "{namespace}/{name}: headless with a named targetPort (port {} -> {:?}): the port the pods listen on is not known",
                named.0, named.1
            ));
            continue;
        }
        let ports: Vec<PortInventory> = tcp_ports
            .into_iter()
            .filter_map(|p| {
                let number = u16::try_from(p.port).ok().filter(|n| *n > 0)?;
                let target_port = match p.target_port {
                    // The API server keeps targetPort in 1..=65535; anything else reads as
                    // 0, which validation refuses, naming the Service.
                    Some(IntOrString::Int(target)) if headless && target != p.port => {
                        Some(u16::try_from(target).unwrap_or(0))
                    }
                    _ => None,
                };
                Some(PortInventory {
                    number,
                    protocol: p
                        .app_protocol
                        .as_deref()
                        .and_then(|a| Protocol::parse(a).ok()),
                    name: p.name.filter(|n| !n.is_empty()),
                    target_port,
                })
            })
            .collect();
        if ports.is_empty() {
            skipped.push(format!("{namespace}/{name}: no TCP port"));
            continue;
        }
        let candidate = ServiceInventory {
            name: name.clone(),
            namespace: namespace.clone(),
            labels: service.metadata.labels.clone().unwrap_or_default(),
            headless,
            ports,
        };
        if let Err(e) = candidate.validate(cluster) {
            skipped.push(e.to_string());
            continue;
        }
        match crate::mesh::federation::sni_problem(&candidate, &cluster.name, host_suffix) {
            Some(problem) => skipped.push(format!("{namespace}/{name}: {problem}")),
            None => out.push(candidate),
        }
    }
    (out, skipped)
}

// ---------------------------------------------------------------------------------------
// Federation objects

/// An Istio object found in a member cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingObject {
    pub id: ObjectId,
    pub labels: BTreeMap<String, String>,
    /// None when it cannot be read as the kind federation writes (it is then rewritten).
    pub object: Option<IstioObject>,
}

impl ExistingObject {
    /// Reads a listed object (`kind` from the list: items need not carry it).
    pub fn from_value(kind: Kind, mut value: serde_json::Value) -> Option<ExistingObject> {
        let meta = value.get("metadata")?;
        let id = ObjectId {
            kind,
            namespace: meta.get("namespace")?.as_str()?.to_string(),
            name: meta.get("name")?.as_str()?.to_string(),
        };
        let labels = meta
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        value["kind"] = kind.as_str().into();
        Some(ExistingObject {
            id,
            labels,
            object: IstioObject::from_value(value).ok(),
        })
    }
}

/// What to change in one cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectChanges {
    /// Missing or different: server-side apply.
    pub apply: Vec<IstioObject>,
    /// Labelled for this VirtualMesh and no longer wanted.
    pub delete: Vec<ObjectId>,
    /// Wanted names held by objects without this VirtualMesh's labels: left alone.
    pub conflicts: Vec<ObjectId>,
    pub unchanged: usize,
}

impl ObjectChanges {
    /// The conflicts as a member's status lists them (and the Federated condition's message
    /// after it): sorted, so that the same ones read the same at every pass and an unchanged
    /// status is not written again, then [`bounded_list`]: thousands of hand-made objects
    /// holding wanted names would otherwise take the VirtualMesh's status write past
    /// etcd's request limit, and no status would be written at all.
    pub fn conflicts_listed(&self) -> Vec<String> {
        let mut listed: Vec<String> = self.conflicts.iter().map(ObjectId::to_string).collect();
        listed.sort();
        bounded_list(listed)
    }
}

/// Whether an object found is the desired one: same spec, carrying the desired labels
/// (labels others added do not count).
fn same_object(desired: &IstioObject, existing: &IstioObject) -> bool {
    let labels_kept = desired
        .metadata()
        .labels
        .iter()
        .all(|(k, v)| existing.metadata().labels.get(k) == Some(v));
    labels_kept
        && match (desired, existing) {
            (IstioObject::Gateway(d), IstioObject::Gateway(e)) => d.spec == e.spec,
            (IstioObject::DestinationRule(d), IstioObject::DestinationRule(e)) => d.spec == e.spec,
            (IstioObject::ServiceEntry(d), IstioObject::ServiceEntry(e)) => d.spec == e.spec,
            _ => false,
        }
}

/// The changes that bring `cluster` to the plan, given the objects found in the namespaces
/// it uses (all of them, labelled or not: an unlabelled object of a wanted name is a
/// conflict, not something to take over).
pub fn object_changes(
    plan: &FederationPlan<'_>,
    cluster: &str,
    existing: &[ExistingObject],
    labels: &BTreeMap<String, String>,
) -> ObjectChanges {
    let ours = |e: &ExistingObject| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v));
    let by_id: HashMap<&ObjectId, &ExistingObject> = existing.iter().map(|e| (&e.id, e)).collect();
    let mut changes = ObjectChanges::default();
    for desired in plan.objects(cluster).into_iter().flatten() {
        let id = desired.id();
        match by_id.get(&id) {
            None => changes.apply.push(desired.to_object()),
            Some(found) if !ours(found) => changes.conflicts.push(id),
            Some(found) => {
                let object = desired.to_object();
                if found
                    .object
                    .as_ref()
                    .is_some_and(|e| same_object(&object, e))
                {
                    changes.unchanged += 1;
                } else {
                    changes.apply.push(object);
                }
            }
        }
    }
    let labelled: Vec<ObjectId> = existing
        .iter()
        .filter(|e| ours(e))
        .map(|e| e.id.clone())
        .collect();
    changes.delete = plan
        .stale_objects(cluster, &labelled)
        .into_iter()
        .cloned()
        .collect();
    changes
}

/// Everything labelled for this VirtualMesh: what a cluster that left must lose.
pub fn cleanup_objects(
    existing: &[ExistingObject],
    labels: &BTreeMap<String, String>,
) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = existing
        .iter()
        .filter(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
        .map(|e| e.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

// ---------------------------------------------------------------------------------------
// Roots: the retirement handshake

/// What one member's request says about its roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberTrust {
    /// Phase Installed.
    pub installed: bool,
    /// The status describes the request's current spec (observedGeneration).
    pub current: bool,
    /// The root its intermediate chains to.
    pub root: Option<String>,
    /// Every root in its root-cert.pem.
    pub trusted: Vec<String>,
    /// The root the signer announces as its next one, as the agent last heard it: trusted
    /// ahead of a root change, so never retired.
    pub next: Option<String>,
    /// Its restart plan is under way: istiod may still run with the roots it had (it takes
    /// a changed root-cert.pem only when it starts), whatever the Secret holds.
    pub restarting: bool,
    /// Its cluster could not be read in this pass: what it reports is not known.
    pub unread: bool,
}

/// Most roots taken from one member's `trustedRootFingerprints` (a root change has two or
/// three at once).
const MAX_REPORTED_ROOTS: usize = 16;

/// Longest member message (an agent's `lastError`, the controller's own problem with the
/// member) copied into the VirtualMesh's status.
pub const MAX_MEMBER_MESSAGE: usize = 1024;

/// A SHA-256 fingerprint a member's status reports, normalized, if it is one: a member
/// cluster's status is written by whoever holds that cluster, and what it says goes into
/// the VirtualMesh's status and into every other member's request.
fn reported_fingerprint(fp: &str) -> Option<String> {
    let fp = normalize_fingerprint(fp);
    (fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit())).then_some(fp)
}

/// The roots a member reports trusting: fingerprints only, at most [`MAX_REPORTED_ROOTS`].
fn reported_roots(fps: &[String]) -> Vec<String> {
    fps.iter()
        .filter_map(|fp| reported_fingerprint(fp))
        .take(MAX_REPORTED_ROOTS)
        .collect()
}

impl MemberTrust {
    pub fn of(request: Option<&VirtualMeshCertificateSigningRequest>) -> MemberTrust {
        let Some(request) = request else {
            return MemberTrust::default();
        };
        let Some(status) = &request.status else {
            return MemberTrust::default();
        };
        MemberTrust {
            installed: status.phase == Some(Phase::Installed),
            current: status.observed_generation.is_some()
                && status.observed_generation == request.metadata.generation,
            root: status
                .root_fingerprint
                .as_deref()
                .and_then(reported_fingerprint),
            trusted: reported_roots(&status.trusted_root_fingerprints),
            next: status
                .next_root_fingerprint
                .as_deref()
                .and_then(reported_fingerprint),
            // Under `never` a plan left unfinished stays so (the agent stops carrying
            // it out): the operator restarts istiod, and nothing here waits for it.
            restarting: request.spec.settings.restart.policy
                != crate::agent::restart::RestartPolicy::Never
                && status
                    .restart
                    .as_ref()
                    .is_some_and(|plan| !plan.stage.is_final()),
            unread: false,
        }
    }

    /// Whether its root-cert.pem holds `root`, as reported for its current spec (a status
    /// for an older spec may describe a root-cert.pem the agent is about to change), with
    /// no restart plan of its under way (istiod takes the file only when it starts).
    fn trusts_now(&self, root: &str) -> bool {
        self.installed
            && self.current
            && !self.restarting
            && self.trusted.iter().any(|fp| fp == root)
    }
}

/// The outcome of the handshake for this pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootDecision {
    /// The root every member's installed intermediate chains to, when they agree.
    pub common_root: Option<String>,
    /// Roots every member's request lists as retired (sorted).
    pub retired: Vec<String>,
    /// A root change waiting for `retire_at`.
    pub rotation: Option<RootRotation>,
    /// Roots retired in this pass.
    pub newly_retired: Vec<String>,
}

fn parse_time(text: &str) -> Option<SystemTime> {
    text.parse::<Timestamp>().ok().map(SystemTime::from)
}

/// The root-change handshake. Once every member reports the same root R, Installed, for
/// its current spec, the other roots any member still trusts are retired, `retire_after`
/// after that was first seen (so that workload certificates issued under the old root can
/// be renewed first). A root some member chains to, or reports as the signer's next root,
/// is never retired (it is taken off the list if it was, e.g. after a rollback): the next
/// root is trusted ahead of the signer's switch to it, and retiring it would undo that.
pub fn decide_roots(
    members: &[MemberTrust],
    previous: &VirtualMeshStatus,
    now: SystemTime,
    retire_after: Duration,
) -> RootDecision {
    let in_use: BTreeSet<&str> = members.iter().filter_map(|m| m.root.as_deref()).collect();
    let announced: BTreeSet<&str> = members.iter().filter_map(|m| m.next.as_deref()).collect();
    let kept = |fp: &str| in_use.contains(fp) || announced.contains(fp);
    let mut retired: BTreeSet<String> = previous
        .retired_root_fingerprints
        .iter()
        .map(|fp| normalize_fingerprint(fp))
        .filter(|fp| !kept(fp))
        .collect();
    if members.iter().any(|m| m.unread) {
        // Nothing is decided from the others alone, and a rotation under way keeps its
        // clock: one API server's blip would otherwise start its wait over (and blips
        // more often than the wait would put retirement off for ever).
        return RootDecision {
            retired: retired.into_iter().collect(),
            rotation: previous.root_rotation.clone(),
            ..RootDecision::default()
        };
    }
    let agreed = !members.is_empty()
        && in_use.len() == 1
        && members.iter().all(|m| m.installed && m.root.is_some());
    let common_root = agreed
        .then(|| in_use.iter().next().map(|r| r.to_string()))
        .flatten();
    let Some(root) = common_root.clone() else {
        return RootDecision {
            retired: retired.into_iter().collect(),
            ..RootDecision::default()
        };
    };
    let old: BTreeSet<String> = members
        .iter()
        .flat_map(|m| m.trusted.iter().cloned())
        // R is in use, so kept.
        .filter(|fp| !kept(fp) && !retired.contains(fp))
        .collect();
    let settled = members.iter().all(|m| m.current && !m.restarting);
    if old.is_empty() || !settled {
        // Nothing to retire, or a member has not yet acted on its latest spec (or its
        // istiod not yet restarted for it): keep any rotation under way as it was.
        let rotation = previous
            .root_rotation
            .clone()
            .filter(|r| r.root == root && !old.is_empty());
        return RootDecision {
            common_root,
            retired: retired.into_iter().collect(),
            rotation,
            newly_retired: vec![],
        };
    }
    let converged_at = previous
        .root_rotation
        .as_ref()
        .filter(|r| r.root == root)
        .and_then(|r| parse_time(&r.converged_at))
        .unwrap_or(now);
    let retire_at = converged_at + retire_after;
    if now >= retire_at {
        retired.extend(old.iter().cloned());
        return RootDecision {
            common_root,
            retired: retired.into_iter().collect(),
            rotation: None,
            newly_retired: old.into_iter().collect(),
        };
    }
    RootDecision {
        common_root,
        retired: retired.into_iter().collect(),
        rotation: Some(RootRotation {
            root,
            converged_at: rfc3339(converged_at),
            retire_at: rfc3339(retire_at),
        }),
        newly_retired: vec![],
    }
}

/// Where the members stand on the root the signer announces as its next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextRootTrust {
    /// Every member that reports a next root reports `root`; `lacking` are the members
    /// whose root-cert.pem does not hold it yet (or whose status is not Installed for their
    /// current spec), by Mesh. None lacking: the signer may switch to it.
    Agreed {
        root: String,
        lacking: Vec<ObjectRef>,
        /// Those of `lacking` seen not to hold it (read, Installed for their current spec,
        /// no restart under way, and the root not in their root-cert.pem). The others are
        /// unknown this pass (unreadable, renewing, restarting): they do not restart the
        /// wait of [`Observed::next_root_settle`].
        distrusting: Vec<ObjectRef>,
    },
    /// Members report different next roots: each member that reports one, with its root.
    Differ(Vec<(ObjectRef, String)>),
}

/// Whether every member trusts the next root its agent reports (None: no member reports
/// one). The operator switches the signer to the next root once this says so.
pub fn next_root_trust(members: &[(&ObjectRef, &MemberTrust)]) -> Option<NextRootTrust> {
    let reported: Vec<(ObjectRef, String)> = members
        .iter()
        .filter_map(|(id, m)| Some(((*id).clone(), m.next.clone()?)))
        .collect();
    let root = reported.first()?.1.clone();
    if reported.iter().any(|(_, other)| *other != root) {
        return Some(NextRootTrust::Differ(reported));
    }
    let lacking = members
        .iter()
        .filter(|(_, m)| !m.trusts_now(&root))
        .map(|(id, _)| (*id).clone())
        .collect();
    let distrusting = members
        .iter()
        .filter(|(_, m)| m.installed && m.current && !m.restarting && !m.trusted.contains(&root))
        .map(|(id, _)| (*id).clone())
        .collect();
    Some(NextRootTrust::Agreed {
        root,
        lacking,
        distrusting,
    })
}

// ---------------------------------------------------------------------------------------
// Status

/// What the controller knows about a member's request.
#[derive(Debug, Clone, Copy)]
pub enum RequestView<'a> {
    /// It exists (or was just applied); its agent's status, if any.
    Present(Option<&'a VmcsrStatus>),
    /// Another request holds its name.
    Conflict,
    /// The cluster could not be read or written.
    Error,
}

/// Where the member is, where its things are, and the first problem found.
#[derive(Debug, Clone)]
pub struct MemberReport<'a> {
    pub id: ObjectRef,
    pub cluster: String,
    pub agent_namespace: String,
    pub istio_namespace: String,
    pub request: RequestView<'a>,
    pub federation: Option<MemberFederation>,
    /// The controller's own problem with this member (unreachable, a write failed, a
    /// conflict), shown instead of the agent's error.
    pub problem: Option<String>,
    /// The pass's time: an Installed report whose intermediate is past its renewal time
    /// (by a day) or its end is a member in trouble, whatever its agent last wrote.
    pub now: SystemTime,
}

/// How long past its renewal time an installed intermediate may stay before its member
/// counts as failing: a failing agent retries for a while, then someone should look.
const RENEWAL_GRACE: Duration = Duration::from_secs(86_400);

/// The namespace a member's status records (its request's, or its federation objects'):
/// the Mesh's `now` once nothing is left under the one recorded `before` (`moved`), else
/// still that one, so that the next passes read and clean it.
pub fn namespace_to_record(now: &str, before: Option<&str>, moved: bool) -> String {
    match before {
        Some(before) if !moved => before.to_string(),
        _ => now.to_string(),
    }
}

/// A member's status line.
pub fn member_status(report: &MemberReport<'_>) -> MemberStatus {
    let mut status = MemberStatus {
        namespace: report.id.namespace.clone(),
        name: report.id.name.clone(),
        cluster: report.cluster.clone(),
        agent_namespace: report.agent_namespace.clone(),
        istio_namespace: report.istio_namespace.clone(),
        phase: MemberPhase::Pending,
        serial: None,
        not_after: None,
        root_fingerprint: None,
        trusted_root_fingerprints: vec![],
        next_root_fingerprint: None,
        federation: report.federation.clone(),
        // Bounded too: a member API server's error page is copied into it whole, and a
        // status past etcd's limit would stop every write of the VirtualMesh's status.
        message: report
            .problem
            .as_deref()
            .map(|p| clip(p, MAX_MEMBER_MESSAGE)),
    };
    match report.request {
        RequestView::Error => status.phase = MemberPhase::Error,
        RequestView::Conflict => status.phase = MemberPhase::Conflict,
        RequestView::Present(agent) => {
            if let Some(agent) = agent {
                status.phase = match agent.phase {
                    None | Some(Phase::Pending) => MemberPhase::Pending,
                    Some(Phase::Requested) => MemberPhase::Requested,
                    Some(Phase::Issued) => MemberPhase::Issued,
                    Some(Phase::Installed) => MemberPhase::Installed,
                    Some(Phase::Failed) => MemberPhase::Failed,
                };
                // Copied bounded: the member cluster's holder writes these.
                status.serial = agent.serial.as_deref().map(|s| clip(s, 64));
                status.not_after = agent.not_after.as_deref().map(|t| clip(t, 64));
                status.root_fingerprint = agent
                    .root_fingerprint
                    .as_deref()
                    .and_then(reported_fingerprint);
                status.trusted_root_fingerprints = reported_roots(&agent.trusted_root_fingerprints);
                status.next_root_fingerprint = agent
                    .next_root_fingerprint
                    .as_deref()
                    .and_then(reported_fingerprint);
                if status.message.is_none() {
                    status.message = agent
                        .last_error
                        .as_deref()
                        .map(|e| clip(e, MAX_MEMBER_MESSAGE));
                }
                // The request reads as its agent last wrote it: an agent scaled to zero or
                // stuck leaves Installed there while the intermediate runs out.
                if status.phase == MemberPhase::Installed
                    && let Some(stale) = stale_install(agent, report.now)
                {
                    status.phase = MemberPhase::Failed;
                    status.message = Some(stale);
                }
            }
            if report.problem.is_some() {
                status.phase = MemberPhase::Error;
            }
        }
    }
    status
}

/// Why an intermediate its agent reports Installed is not fine at `now`: ended, or over
/// [`RENEWAL_GRACE`] past its renewal time.
fn stale_install(agent: &VmcsrStatus, now: SystemTime) -> Option<String> {
    let not_after = agent.not_after.as_deref().and_then(parse_time);
    if not_after.is_some_and(|end| end < now) {
        return Some(format!(
            "its intermediate ended at {}, yet its request still reads Installed: is its agent running and leading?",
            agent
                .not_after
                .as_deref()
                .map(|t| clip(t, 64))
                .unwrap_or_default()
        ));
    }
    let renew_at = agent.renew_at.as_deref().and_then(parse_time)?;
    (renew_at + RENEWAL_GRACE < now).then(|| {
        format!(
            "its intermediate is over a day past its renewal time ({}) and ends at {}: its agent has not replaced it (see the request's status and the agent's log; one that already ends with the signer's root waits for a root change)",
            agent.renew_at.as_deref().map(|t| clip(t, 64)).unwrap_or_default(),
            agent.not_after.as_deref().map(|t| clip(t, 64)).unwrap_or_default()
        )
    })
}

/// How federation went in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederationOutcome {
    /// No spec.federation: every object this VirtualMesh made is garbage.
    Disabled,
    /// The plan was applied (member problems show in their status).
    Applied { services: u64, moved_addresses: u64 },
    /// Nothing applied or deleted anywhere (so that a cluster whose Services could not be
    /// read does not look like one that left).
    Held {
        reason: &'static str,
        message: String,
    },
}

/// Everything one converging pass observed.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Members, by Mesh.
    pub members: Vec<MemberStatus>,
    /// Former members whose cleanup did not finish (phase Removing).
    pub removing: Vec<MemberStatus>,
    pub roots: RootDecision,
    /// The next root the members report, and who trusts it ([`next_root_trust`]).
    pub next_root: Option<NextRootTrust>,
    /// How long every member must have trusted the next root before the signer may switch
    /// to it: workloads take a changed root set from istiod only with their next
    /// certificate (the controller's `--retire-after-seconds`, the same bound the other way).
    pub next_root_settle: Duration,
    pub federation: FederationOutcome,
}

fn is_trouble(phase: MemberPhase) -> bool {
    matches!(
        phase,
        MemberPhase::Failed | MemberPhase::Error | MemberPhase::Conflict | MemberPhase::Removing
    )
}

fn describe(members: &[&MemberStatus]) -> String {
    members
        .iter()
        .map(|m| match &m.message {
            Some(message) => format!("{} ({:?}: {message})", m.id(), m.phase),
            None => format!("{} ({:?})", m.id(), m.phase),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status of a valid VirtualMesh after a pass.
pub fn converged_status(
    previous: &VirtualMeshStatus,
    generation: Option<i64>,
    observed: Observed,
    now: SystemTime,
) -> VirtualMeshStatus {
    let mut status = VirtualMeshStatus {
        conditions: previous.conditions.clone(),
        ..VirtualMeshStatus::default()
    };
    let members = &observed.members;
    let condition =
        |status: &mut VirtualMeshStatus, type_: &str, ok: bool, reason: &str, message: &str| {
            set_condition(
                &mut status.conditions,
                type_,
                ok,
                reason,
                message,
                generation,
                now,
            );
        };
    condition(
        &mut status,
        ACCEPTED,
        true,
        "Valid",
        &format!("{} member mesh(es)", members.len()),
    );

    let (trust_ok, trust_reason, trust_message) = match &observed.roots.common_root {
        Some(root) => (
            true,
            "SharedRoot",
            format!("every member's intermediate chains to root sha256 {root}"),
        ),
        None => {
            let failing: Vec<&MemberStatus> =
                members.iter().filter(|m| is_trouble(m.phase)).collect();
            let waiting: Vec<&MemberStatus> = members
                .iter()
                .filter(|m| m.phase != MemberPhase::Installed)
                .collect();
            if !failing.is_empty() {
                (false, "MemberFailed", describe(&failing))
            } else if waiting.is_empty() {
                let roots: Vec<String> = members
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: {}",
                            m.id(),
                            m.root_fingerprint.as_deref().unwrap_or("none")
                        )
                    })
                    .collect();
                (
                    false,
                    "RootsDiffer",
                    format!(
                        "members chain to different roots ({}); each agent follows the signer's root",
                        roots.join(", ")
                    ),
                )
            } else {
                (
                    false,
                    "Pending",
                    format!("waiting for {}", describe(&waiting)),
                )
            }
        }
    };
    condition(
        &mut status,
        TRUST_ESTABLISHED,
        trust_ok,
        trust_reason,
        &trust_message,
    );

    let (fed_ok, fed_reason, fed_message) = match &observed.federation {
        FederationOutcome::Disabled => (
            true,
            "Disabled",
            "spec.federation is absent: services are not federated".to_string(),
        ),
        FederationOutcome::Held { reason, message } => (false, *reason, message.clone()),
        FederationOutcome::Applied { services, .. } => {
            let conflicted: Vec<String> = members
                .iter()
                .filter_map(|m| {
                    let f = m.federation.as_ref()?;
                    (!f.conflicts.is_empty())
                        .then(|| format!("{}: {}", m.cluster, f.conflicts.join(", ")))
                })
                .collect();
            let errors: Vec<&MemberStatus> = members
                .iter()
                .filter(|m| m.phase == MemberPhase::Error)
                .collect();
            if !errors.is_empty() {
                (false, "MemberError", describe(&errors))
            } else if !conflicted.is_empty() {
                (
                    false,
                    "Conflict",
                    format!(
                        "objects of these names exist without this VirtualMesh's labels and were left alone: {}",
                        conflicted.join("; ")
                    ),
                )
            } else {
                (
                    true,
                    "Applied",
                    format!(
                        "{services} service(s) federated across {} cluster(s)",
                        members.len()
                    ),
                )
            }
        }
    };
    condition(&mut status, FEDERATED, fed_ok, fed_reason, &fed_message);

    // Ready says what the phase says: a member in trouble (an Installed one whose
    // intermediate ran out, in conflict) or one not cleaned up is not Ready, though its
    // root is shared and federation applied.
    let troubled: Vec<&MemberStatus> = members
        .iter()
        .filter(|m| is_trouble(m.phase))
        .chain(&observed.removing)
        .collect();
    let (ready, ready_reason, ready_message) = if !trust_ok {
        (false, trust_reason, trust_message)
    } else if !fed_ok {
        (false, fed_reason, fed_message)
    } else if !troubled.is_empty() {
        (false, "MemberFailed", describe(&troubled))
    } else {
        (
            true,
            "Ready",
            "shared root and federation in place".to_string(),
        )
    };
    condition(&mut status, READY, ready, ready_reason, &ready_message);

    // Preparing the next root is not a degradation: Ready and the phase ignore it.
    match &observed.next_root {
        None => status.conditions.retain(|c| c.type_ != NEXT_ROOT_TRUSTED),
        Some(NextRootTrust::Agreed {
            root,
            lacking,
            distrusting,
        }) => {
            status.next_root_fingerprint = Some(root.clone());
            let since_before = previous
                .next_root_trusted_since
                .as_deref()
                .filter(|_| previous.next_root_fingerprint.as_deref() == Some(root));
            if distrusting.is_empty() {
                // Kept through a pass that could not see every member.
                status.next_root_trusted_since = since_before.map(String::from);
            }
            if lacking.is_empty() {
                let since = since_before.and_then(parse_time).unwrap_or(now);
                status.next_root_trusted_since = Some(rfc3339(since));
                let switch_at = since + observed.next_root_settle;
                if now >= switch_at {
                    condition(
                        &mut status,
                        NEXT_ROOT_TRUSTED,
                        true,
                        "AllMembers",
                        &format!(
                            "every member has trusted the signer's next root sha256 {root} since {}: the signer may switch to it",
                            rfc3339(since)
                        ),
                    );
                } else {
                    condition(
                        &mut status,
                        NEXT_ROOT_TRUSTED,
                        false,
                        "Settling",
                        &format!(
                            "every member trusts the signer's next root sha256 {root} since {}, but workloads take it from istiod only with their next certificate: keep the signer on its current root until {}",
                            rfc3339(since),
                            rfc3339(switch_at)
                        ),
                    );
                }
            } else {
                let names: Vec<String> = lacking.iter().map(ToString::to_string).collect();
                condition(
                    &mut status,
                    NEXT_ROOT_TRUSTED,
                    false,
                    "Pending",
                    &format!(
                        "the signer's next root sha256 {root} is not yet trusted by {}; keep the signer on its current root until it is",
                        names.join(", ")
                    ),
                );
            }
        }
        Some(NextRootTrust::Differ(reported)) => {
            let roots: Vec<String> = reported
                .iter()
                .map(|(id, root)| format!("{id}: {root}"))
                .collect();
            condition(
                &mut status,
                NEXT_ROOT_TRUSTED,
                false,
                "NextRootsDiffer",
                &format!(
                    "members report different next roots ({}); each agent reports the one its signer announces",
                    roots.join(", ")
                ),
            );
        }
    }

    let troubled = !troubled.is_empty() || !fed_ok;
    status.phase = Some(if ready {
        VirtualMeshPhase::Ready
    } else if troubled {
        VirtualMeshPhase::Degraded
    } else {
        VirtualMeshPhase::Progressing
    });
    status.observed_generation = generation;
    status.mesh_count = members.len() as u64;
    status.root_fingerprint = observed.roots.common_root.clone();
    status.retired_root_fingerprints = observed.roots.retired.clone();
    status.root_rotation = observed.roots.rotation.clone();
    status.federation = Some(match observed.federation {
        FederationOutcome::Applied {
            services,
            moved_addresses,
        } => FederationStatus {
            mode: "PERMISSIVE".into(),
            services,
            moved_addresses,
        },
        FederationOutcome::Disabled => FederationStatus {
            mode: "Disabled".into(),
            ..FederationStatus::default()
        },
        // What was applied before stays in place.
        FederationOutcome::Held { .. } => previous.federation.clone().unwrap_or_default(),
    });
    let mut meshes = observed.members;
    meshes.extend(observed.removing);
    meshes.sort_by_key(|m| m.id());
    status.meshes = meshes;
    status
}

/// The status of a refused VirtualMesh: Accepted and Ready false with the reason; what the
/// clusters hold (members, roots, federation) is left as last recorded, as are the clusters.
pub fn rejected_status(
    previous: &VirtualMeshStatus,
    generation: Option<i64>,
    rejection: &Rejection,
    now: SystemTime,
) -> VirtualMeshStatus {
    let mut status = previous.clone();
    for type_ in [ACCEPTED, READY] {
        set_condition(
            &mut status.conditions,
            type_,
            false,
            rejection.reason,
            &rejection.message,
            generation,
            now,
        );
    }
    status.phase = Some(VirtualMeshPhase::Invalid);
    status.observed_generation = generation;
    status
}

/// The status while a deleted VirtualMesh's clusters are cleaned: what is left.
pub fn deleting_status(
    previous: &VirtualMeshStatus,
    generation: Option<i64>,
    remaining: Vec<MemberStatus>,
    now: SystemTime,
) -> VirtualMeshStatus {
    let mut status = previous.clone();
    let message = format!(
        "cleaning up; not yet done in: {}",
        describe(&remaining.iter().collect::<Vec<_>>())
    );
    set_condition(
        &mut status.conditions,
        READY,
        false,
        "Deleting",
        &message,
        generation,
        now,
    );
    status.phase = Some(VirtualMeshPhase::Deleting);
    status.observed_generation = generation;
    status.meshes = remaining;
    status
}

/// A status line for a member not recorded yet, from its Mesh: how a member joins the
/// status before anything is made in its cluster, and how a deletion lists a member a
/// pass cut short may have touched.
pub fn unrecorded_member(id: &ObjectRef, mesh: &Mesh, phase: MemberPhase) -> MemberStatus {
    MemberStatus {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        cluster: mesh.spec.cluster_name.clone(),
        agent_namespace: mesh.spec.agent.namespace.clone(),
        istio_namespace: mesh.spec.istio_namespace.clone(),
        phase,
        serial: None,
        not_after: None,
        root_fingerprint: None,
        trusted_root_fingerprints: vec![],
        next_root_fingerprint: None,
        federation: None,
        message: None,
    }
}

/// Former members: recorded in status, no longer listed (or their VirtualMesh is going).
pub fn departed<'s>(
    previous: &'s VirtualMeshStatus,
    members: &BTreeSet<ObjectRef>,
) -> Vec<&'s MemberStatus> {
    previous
        .meshes
        .iter()
        .filter(|m| !members.contains(&m.id()))
        .collect()
}

/// Whether a VirtualMesh carries the controller's finalizer.
pub fn has_finalizer(vm: &VirtualMesh) -> bool {
    vm.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// Whether a Mesh carries the controller's finalizer.
pub fn mesh_has_finalizer(mesh: &Mesh) -> bool {
    mesh.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// The Meshes a VirtualMesh holds on to: those its spec lists and those its status records
/// (a former member until its cluster is clean).
pub fn holds(vm: &VirtualMesh, status: &VirtualMeshStatus) -> BTreeSet<ObjectRef> {
    let listed = vm.spec.document.meshes.iter().filter_map(|m| {
        format!("{}/{}", m.namespace, m.name)
            .parse::<ObjectRef>()
            .ok()
    });
    listed
        .chain(status.meshes.iter().map(MemberStatus::id))
        .collect()
}

/// Meshes whose finalizer can go: carrying it, and held by no VirtualMesh.
pub fn meshes_to_release(meshes: &[Mesh], held: &BTreeSet<ObjectRef>) -> Vec<ObjectRef> {
    meshes
        .iter()
        .filter(|m| mesh_has_finalizer(m) && !held.contains(&m.id()))
        .map(Mesh::id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    use crate::mesh::federation::DEFAULT_HOST_SUFFIX;
    use crate::mesh::translate;

    const R1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const R2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const R3: &str = "3333333333333333333333333333333333333333333333333333333333333333";

    fn merge(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p,
        }
    }

    fn vm_with(name: &str, created: &str, meshes: &[&str], extra: Value) -> VirtualMesh {
        let mut spec = json!({
            "certificateAuthority": {"builtin": {"ttlDays": 10, "rsaKeySizeBytes": 2048, "orgName": "o"}},
            "federation": {"mode": "PERMISSIVE"},
            "shared": {},
            "meshes": meshes.iter().map(|m| {
                let (ns, name) = m.split_once('/').unwrap_or(("smh", m));
                json!({"name": name, "namespace": ns})
            }).collect::<Vec<_>>(),
        });
        merge(&mut spec, extra);
        serde_json::from_value(json!({
            "apiVersion": "meshca.dev/v1alpha1", "kind": "VirtualMesh",
            "metadata": {"name": name, "namespace": "smh", "creationTimestamp": created, "generation": 1},
            "spec": spec
        }))
        .unwrap()
    }

    fn vm(meshes: &[&str]) -> VirtualMesh {
        vm_with("vm", "2024-01-01T00:00:00Z", meshes, json!({}))
    }

    fn mesh_with(name: &str, cluster: &str, extra: Value) -> Mesh {
        let mut spec = json!({
            "clusterName": cluster,
            "trustDomain": format!("{cluster}.local"),
            "kubeconfigSecret": {"name": format!("{cluster}-kubeconfig")},
            "gatewayAddresses": ["192.0.2.1"],
            "agent": {"signer": {"url": "https://signer.example:8443"}}
        });
        merge(&mut spec, extra);
        serde_json::from_value(json!({
            "apiVersion": "meshca.dev/v1alpha1", "kind": "Mesh",
            "metadata": {"name": name, "namespace": "smh"},
            "spec": spec
        }))
        .unwrap()
    }

    fn mesh(name: &str, cluster: &str) -> Mesh {
        mesh_with(name, cluster, json!({}))
    }

    fn by_id(meshes: &[Mesh]) -> BTreeMap<ObjectRef, &Mesh> {
        meshes.iter().map(|m| (m.id(), m)).collect()
    }

    fn check(vm: &VirtualMesh, meshes: &[Mesh]) -> Result<Vec<String>, Rejection> {
        let claims = claims(std::slice::from_ref(vm));
        validate(vm, &by_id(meshes), &claims, "smh")
            .map(|v| v.members.iter().map(|m| m.id.to_string()).collect())
    }

    fn r(s: &str) -> ObjectRef {
        s.parse().unwrap()
    }

    #[test]
    fn the_oldest_virtual_mesh_owns_a_mesh() {
        let old = vm_with("b-old", "2024-01-01T00:00:00Z", &["a", "b"], json!({}));
        let new = vm_with("a-new", "2024-06-01T00:00:00Z", &["b", "c"], json!({}));
        let tie = vm_with("a-tie", "2024-01-01T00:00:00Z", &["c", "d"], json!({}));
        let owners = claims(&[new.clone(), old.clone(), tie.clone()]);
        assert_eq!(owners[&r("smh/a")], r("smh/b-old"));
        assert_eq!(owners[&r("smh/b")], r("smh/b-old"));
        // Same age: by name.
        assert_eq!(owners[&r("smh/c")], r("smh/a-tie"));
        assert_eq!(owners[&r("smh/d")], r("smh/a-tie"));
        // A conflict is reported by the newcomer, naming the owner.
        let meshes = [mesh("a", "a"), mesh("b", "b"), mesh("c", "c")];
        let all = [new.clone(), old.clone()];
        let err = validate(&new, &by_id(&meshes), &claims(&all), "smh").unwrap_err();
        assert_eq!(err.reason, "MeshConflict");
        assert!(
            err.message
                .contains("mesh smh/b already belongs to VirtualMesh smh/b-old"),
            "{}",
            err.message
        );
        assert!(validate(&old, &by_id(&meshes), &claims(&all), "smh").is_ok());
    }

    /// A VirtualMesh holding a mesh keeps it when an older one lists it later, and while
    /// it cleans up a mesh it left: another team's older VirtualMesh cannot take a
    /// cluster (and its kubeconfig, and its Services) by adding it to its spec.
    #[test]
    fn a_mesh_stays_with_the_virtual_mesh_whose_status_records_it() {
        let a = mesh("a", "a");
        let holding = |vm: &mut VirtualMesh, phase: MemberPhase| {
            vm.status = Some(VirtualMeshStatus {
                meshes: vec![unrecorded_member(&r("smh/a"), &a, phase)],
                ..Default::default()
            });
        };
        let old = vm_with("old", "2024-01-01T00:00:00Z", &["a"], json!({}));
        let mut holder = vm_with("holder", "2024-06-01T00:00:00Z", &["a"], json!({}));
        holding(&mut holder, MemberPhase::Installed);
        let all = [old.clone(), holder.clone()];
        assert_eq!(claims(&all)[&r("smh/a")], r("smh/holder"));
        let meshes = [a.clone()];
        let err = validate(&old, &by_id(&meshes), &claims(&all), "smh").unwrap_err();
        assert_eq!(err.reason, "MeshConflict");
        assert!(
            err.message
                .contains("mesh smh/a already belongs to VirtualMesh smh/holder"),
            "{}",
            err.message
        );
        assert!(validate(&holder, &by_id(&meshes), &claims(&all), "smh").is_ok());

        // Left the holder's spec, its cleanup not finished: still the holder's.
        let mut leaving = vm_with("holder", "2024-06-01T00:00:00Z", &[], json!({}));
        holding(&mut leaving, MemberPhase::Removing);
        let all = [old.clone(), leaving];
        assert_eq!(claims(&all)[&r("smh/a")], r("smh/holder"));
        // Once cleaned (no longer recorded), the oldest listing it takes it.
        let cleaned = vm_with("holder", "2024-06-01T00:00:00Z", &[], json!({}));
        assert_eq!(claims(&[old, cleaned])[&r("smh/a")], r("smh/old"));
    }

    #[test]
    fn a_valid_virtual_mesh_lists_its_members_in_order() {
        let members = check(
            &vm(&["west", "east"]),
            &[mesh("east", "east"), mesh("west", "west")],
        )
        .unwrap();
        assert_eq!(members, ["smh/east", "smh/west"]);
    }

    #[test]
    fn unsupported_options_are_refused_with_their_own_reason() {
        let meshes = [mesh("a", "a")];
        let cases = [
            (
                json!({"limited": {}, "shared": null}),
                "UnsupportedTrustModel",
                "the limited trust model is not supported",
            ),
            (
                json!({"federation": {"mode": "STRICT"}}),
                "UnsupportedFederationMode",
                "spec.federation.mode \"STRICT\" is not supported",
            ),
            (
                json!({"enforceAccessControl": true}),
                "UnsupportedOption",
                "spec.enforceAccessControl: true is not supported",
            ),
            (
                json!({"federation": {"exportTo": "all"}}),
                "UnsupportedOption",
                "spec.federation.exportTo is not supported",
            ),
            (
                json!({"certificateAuthority": {"builtin": null, "provided": {"certificate": {"name": "x"}}}}),
                "UnsupportedCertificateAuthority",
                "provided is not supported",
            ),
            (
                json!({"federation": {"selector": {"namespaces": ["Bad_NS"]}}}),
                "InvalidSelector",
                "spec.federation.selector: namespaces",
            ),
            (
                json!({"federation": {"selector": {"podSelector": {}}}}),
                "InvalidSelector",
                "unknown field",
            ),
            (
                json!({"federation": {"hostSuffix": ".Global"}}),
                "InvalidHostSuffix",
                "spec.federation.hostSuffix: \".Global\" is not a DNS name",
            ),
            (
                json!({"certificateAuthority": {"builtin": {"ttlDays": 0}}}),
                "InvalidSpec",
                "ttlDays must be between 1",
            ),
            (json!({"meshes": []}), "InvalidSpec", "spec.meshes is empty"),
            (
                json!({"federaton": {"mode": "PERMISSIVE"}}),
                "UnknownField",
                "spec.federaton is not a VirtualMesh field",
            ),
            (
                json!({"certificateAuthority": {"builtin": {"ttlDay": 10}}}),
                "UnknownField",
                "spec.certificateAuthority.builtin.ttlDay is not a VirtualMesh field",
            ),
        ];
        for (extra, reason, needle) in cases {
            let vm = vm_with("vm", "2024-01-01T00:00:00Z", &["a"], extra.clone());
            let err = check(&vm, &meshes).unwrap_err();
            assert_eq!(err.reason, reason, "{extra}: {}", err.message);
            assert!(
                err.message.contains(needle),
                "{needle:?} not in {:?}",
                err.message
            );
            // The validation's own words, without a source prefix.
            assert!(!err.message.starts_with("VirtualMesh"), "{}", err.message);
        }
    }

    /// A member outside the VirtualMesh's trust domains would get intermediates that
    /// permit none of its workloads' identities: refused by name, before any request.
    #[test]
    fn a_member_must_be_in_the_virtual_meshs_trust_domains() {
        let constrained = |list: Value| {
            vm_with(
                "vm",
                "2024-01-01T00:00:00Z",
                &["a", "b"],
                json!({"trustDomains": list}),
            )
        };
        let meshes = [mesh("a", "a"), mesh("b", "b")];
        assert_eq!(
            check(&constrained(json!(["a.local", "b.local"])), &meshes).unwrap(),
            ["smh/a", "smh/b"]
        );
        let err = check(&constrained(json!(["a.local"])), &meshes).unwrap_err();
        assert_eq!(err.reason, "InvalidMesh");
        assert_eq!(
            err.message,
            "Mesh smh/b: trustDomain b.local is not in the VirtualMesh's spec.trustDomains (a.local): the intermediates the signer issues would not permit this cluster's workload identities"
        );
        // The signer's own check of the list, by name.
        let err = check(&constrained(json!(["A.local"])), &meshes).unwrap_err();
        assert!(
            err.message
                .contains("spec.trustDomains: \"A.local\" is not a trust domain"),
            "{}",
            err.message
        );
    }

    #[test]
    fn members_must_exist_be_valid_and_differ() {
        let err = check(&vm(&["a", "other/b"]), &[]).unwrap_err();
        assert_eq!(err.reason, "MeshNotFound");
        assert_eq!(
            err.message,
            "Mesh other/b does not exist (the controller reads Meshes in namespace smh only); Mesh smh/a does not exist"
        );
        let cases = [
            (
                json!({"trustDomain": "Bad"}),
                "trustDomain \"Bad\" is not a trust domain",
            ),
            (
                json!({"agent": {"signer": {"url": "http://signer:80"}}}),
                "spec.agent.signer.url \"http://signer:80\" must start with https://",
            ),
            (
                json!({"gatewayAddresses": ["10.0.0.1:15443"]}),
                "give the port in gatewayPort",
            ),
            (
                json!({"gatewayAddresses": ["192.0.2.1", "2001:db8::1"]}),
                "gatewayAddresses mixes IPv4 (192.0.2.1) and IPv6 (2001:db8::1) addresses",
            ),
            (
                json!({"agent": {"namespace": "Smh"}}),
                "spec.agent.namespace",
            ),
            (
                json!({"agent": {"rotation": {"renewFraction": 2.0}}}),
                "spec.agent.rotation",
            ),
            (
                json!({"agent": {"rotation": {"retiredRootFingerprints": ["5F:35"]}}}),
                "spec.agent.rotation: retiredRootFingerprints[0] \"5F:35\": not a SHA-256",
            ),
            (
                json!({"kubeconfigSecret": {"name": "a/b"}}),
                "spec.kubeconfigSecret.name",
            ),
            (
                json!({"clusterName": "East"}),
                "the name must be a DNS label",
            ),
        ];
        for (extra, needle) in cases {
            let err = check(&vm(&["a"]), &[mesh_with("a", "a", extra.clone())]).unwrap_err();
            assert_eq!(err.reason, "InvalidMesh", "{extra}");
            assert!(err.message.starts_with("Mesh smh/a: "), "{}", err.message);
            assert!(
                err.message.contains(needle),
                "{needle:?} not in {:?}",
                err.message
            );
        }
        let long = "m".repeat(64);
        let err = check(&vm(&[long.as_str()]), &[mesh(&long, "a")]).unwrap_err();
        assert_eq!(err.reason, "InvalidMesh");
        assert!(err.message.contains("longer than 63"), "{}", err.message);
        let err = check(&vm(&["a", "b"]), &[mesh("a", "same"), mesh("b", "same")]).unwrap_err();
        assert_eq!(err.reason, "DuplicateCluster");
        assert!(
            err.message
                .contains("smh/a, smh/b all have clusterName \"same\""),
            "{}",
            err.message
        );
        let mut going = mesh("a", "a");
        going.metadata.deletion_timestamp =
            serde_json::from_value(json!("2024-01-01T00:00:00Z")).unwrap();
        let err = check(&vm(&["a"]), &[going]).unwrap_err();
        assert_eq!(err.reason, "MeshDeleting");
        assert!(
            err.message.contains("remove it from spec.meshes"),
            "{}",
            err.message
        );
    }

    fn config(meshes: &[&str]) -> FederationConfig {
        let ms: Vec<Mesh> = meshes.iter().map(|m| mesh(m, m)).collect();
        let vm = vm(meshes);
        validate(&vm, &by_id(&ms), &claims(std::slice::from_ref(&vm)), "smh")
            .unwrap()
            .config
    }

    #[test]
    fn the_request_carries_the_mesh_settings_and_every_retired_root() {
        let c = config(&["east"]);
        let m = mesh_with(
            "east",
            "east",
            json!({"agent": {"namespace": "agents", "keyType": "ecdsa-p384", "ttlSeconds": 3600,
                "adopt": true, "target": {"namespace": "istio", "name": "cacerts"},
                "rotation": {"renewFraction": 0.5, "retiredRootFingerprints": [R3.to_uppercase()],
                    "acceptedRootFingerprints": [R1, R2]},
                "restart": {"policy": "never"}}}),
        );
        let d = desired_request(
            &c,
            &r("smh/east"),
            &m.spec,
            &[R1.to_string(), R3.to_string()],
        );
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("agents", "east"));
        assert_eq!(d.labels[LABEL_MESH], "east");
        assert_eq!(d.labels["meshca.io/virtual-mesh"], "vm");
        assert_eq!(d.labels["meshca.io/virtual-mesh-namespace"], "smh");
        assert_eq!(d.labels["app.kubernetes.io/managed-by"], "meshca");
        let body = d.body();
        assert_eq!(body["kind"], "VirtualMeshCertificateSigningRequest");
        assert_eq!(body["apiVersion"], "meshca.dev/v1alpha1");
        let spec = &body["spec"];
        assert_eq!(
            spec["virtualMesh"],
            json!({"namespace": "smh", "name": "vm"})
        );
        assert_eq!(spec["mesh"], json!({"namespace": "smh", "name": "east"}));
        assert_eq!(spec["signer"]["url"], "https://signer.example:8443");
        assert_eq!(
            spec["target"],
            json!({"namespace": "istio", "name": "cacerts"})
        );
        assert_eq!(spec["keyType"], "ecdsa-p384");
        assert_eq!(spec["ttlSeconds"], 3600);
        assert_eq!(spec["adopt"], true);
        assert_eq!(spec["restart"]["policy"], "never");
        assert_eq!(spec["rotation"]["renewFraction"], 0.5);
        // The Mesh's own (normalized) and the controller's, once each, sorted.
        assert_eq!(spec["rotation"]["retiredRootFingerprints"], json!([R1, R3]));
        // The roots the agent accepts, copied as the Mesh lists them.
        assert_eq!(
            spec["rotation"]["acceptedRootFingerprints"],
            json!([R1, R2])
        );
        // The body reads back as the agent's type, equal to what was desired.
        let back: VirtualMeshCertificateSigningRequest = serde_json::from_value(body).unwrap();
        assert_eq!(back.spec, d.spec);
    }

    fn request(labels: Value, spec: Value) -> VirtualMeshCertificateSigningRequest {
        serde_json::from_value(json!({
            "apiVersion": "meshca.dev/v1alpha1", "kind": "VirtualMeshCertificateSigningRequest",
            "metadata": {"name": "east", "namespace": "service-mesh-hub", "labels": labels, "generation": 3},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn requests_are_applied_only_when_they_differ_and_never_taken_over() {
        let c = config(&["east"]);
        let d = desired_request(&c, &r("smh/east"), &mesh("east", "east").spec, &[]);
        assert_eq!(request_action(&d, None), RequestAction::Apply);
        // As stored by the API server: every default filled in. Still up to date.
        let mut stored = serde_json::to_value(&d.spec).unwrap();
        merge(
            &mut stored,
            json!({"adopt": false, "restart": {"workloadNamespaces": [], "workloadSelector": ""}}),
        );
        let labels = serde_json::to_value(&d.labels).unwrap();
        let mut with_more = labels.clone();
        with_more["team"] = "x".into();
        assert_eq!(
            request_action(&d, Some(&request(with_more, stored.clone()))),
            RequestAction::UpToDate
        );
        // A spec difference (here: a root to retire) is applied.
        let mut old = stored.clone();
        old["rotation"]["retiredRootFingerprints"] = json!([R1]);
        assert_eq!(
            request_action(&d, Some(&request(labels.clone(), old))),
            RequestAction::Apply
        );
        // Ours but missing the mesh label: relabelled.
        let mut partial = labels.clone();
        partial.as_object_mut().unwrap().remove(LABEL_MESH);
        assert_eq!(
            request_action(&d, Some(&request(partial, stored.clone()))),
            RequestAction::Apply
        );
        // Someone else's request of that name: a conflict, never overwritten.
        for foreign in [
            json!({}),
            json!({"meshca.io/virtual-mesh": "other", "meshca.io/virtual-mesh-namespace": "smh", "app.kubernetes.io/managed-by": "meshca"}),
        ] {
            match request_action(&d, Some(&request(foreign, stored.clone()))) {
                RequestAction::Conflict(message) => {
                    assert!(message.contains("service-mesh-hub/east exists and was not created for VirtualMesh smh/vm"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn stale_requests_are_this_meshes_under_another_name_only() {
        let c = config(&["east", "west"]);
        let east = request_labels(&c, &r("smh/east"));
        let west = request_labels(&c, &r("smh/west"));
        let named = |ns: &str, name: &str, labels: &BTreeMap<String, String>| {
            let mut req = request(
                serde_json::to_value(labels).unwrap(),
                serde_json::to_value(
                    desired_request(&c, &r("smh/east"), &mesh("east", "east").spec, &[]).spec,
                )
                .unwrap(),
            );
            req.metadata.namespace = Some(ns.into());
            req.metadata.name = Some(name.into());
            req
        };
        let existing = vec![
            named("service-mesh-hub", "east", &east),
            named("old-agents", "east", &east),
            named("service-mesh-hub", "west", &west),
            named("service-mesh-hub", "hand-made", &BTreeMap::new()),
        ];
        let ids = |v: Vec<&VirtualMeshCertificateSigningRequest>| -> Vec<String> {
            v.iter()
                .map(|r| {
                    format!(
                        "{}/{}",
                        r.metadata.namespace.as_deref().unwrap(),
                        r.metadata.name.as_deref().unwrap()
                    )
                })
                .collect()
        };
        assert_eq!(
            ids(stale_requests(
                &existing,
                &east,
                Some(("service-mesh-hub", "east"))
            )),
            ["old-agents/east"]
        );
        assert_eq!(
            ids(stale_requests(&existing, &east, None)),
            ["service-mesh-hub/east", "old-agents/east"]
        );
        assert_eq!(
            ids(stale_requests(
                &existing,
                &west,
                Some(("service-mesh-hub", "west"))
            )),
            Vec::<String>::new()
        );
        assert_eq!(
            find_request(&existing, "service-mesh-hub", "west")
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("west")
        );
    }

    fn service(ns: &str, name: &str, extra: Value) -> Service {
        let mut value = json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"ports": [{"port": 9080, "name": "http", "protocol": "TCP"}]}
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_status_list_is_bounded_in_entries_and_bytes() {
        assert_eq!(bounded_list(vec!["a".into()]), ["a"]);
        let many: Vec<String> = (0..20).map(|i| format!("shop/s{i}: no TCP port")).collect();
        let bounded = bounded_list(many);
        assert_eq!(bounded.len(), 17);
        assert_eq!(bounded[15], "shop/s15: no TCP port");
        assert_eq!(bounded[16], "... and 4 more");
        let long = bounded_list(vec!["é".repeat(200)]);
        assert_eq!(long[0].len(), 256 + "...".len());
        assert!(long[0].ends_with("..."));
    }

    #[test]
    fn services_become_inventory_without_system_udp_or_external_ones() {
        let cluster = mesh_with("east", "east", json!({"istioNamespace": "istio"}))
            .spec
            .inventory(&r("smh/east"));
        let services = vec![
            service("bookinfo", "reviews", json!({})),
            service("kube-system", "kube-dns", json!({})),
            service("istio", "istiod", json!({})),
            service("default", "kubernetes", json!({})),
            service(
                "default",
                "web",
                json!({"spec": {"ports": [
                    {"port": 53, "name": "dns", "protocol": "UDP"},
                    {"port": 8443, "appProtocol": "https"},
                    {"port": 7070, "name": "grpc-api", "appProtocol": "kubernetes.io/h2c"},
                    {"port": 5000}
                ]}}),
            ),
            service(
                "default",
                "ext",
                json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
            ),
            service(
                "default",
                "dns-only",
                json!({"spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}),
            ),
            service(
                "default",
                "bad-labels",
                json!({"metadata": {"labels": {"a": "-x"}}}),
            ),
        ];
        let (inventory, skipped) = federated_services(&services, &cluster, DEFAULT_HOST_SUFFIX);
        let names: Vec<String> = inventory
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        assert_eq!(names, ["bookinfo/reviews", "default/web"]);
        let web = &inventory[1];
        let ports: Vec<(u16, String, Protocol)> = web
            .ports
            .iter()
            .map(|p| (p.number, p.name(), p.protocol()))
            .collect();
        assert_eq!(
            ports,
            [
                (8443, "https-8443".to_string(), Protocol::Https),
                (7070, "grpc-api".to_string(), Protocol::Grpc),
                (5000, "tcp-5000".to_string(), Protocol::Tcp),
            ]
        );
        assert_eq!(inventory[0].labels["app"], "reviews");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].contains("default/ext: ExternalName"));
        assert!(skipped[1].contains("default/dns-only: no TCP port"));
        assert!(
            skipped[2].contains("bad-labels") && skipped[2].contains("label"),
            "{}",
            skipped[2]
        );
    }

    #[test]
    fn headless_services_send_the_gateway_to_the_target_port_or_stay_out() {
        let c = config(&["east", "west"]);
        let mut east = mesh("east", "east").spec.inventory(&r("smh/east"));
        let ports = |target: Value| json!({"spec": {"ports": [{"port": 80, "name": "http", "targetPort": target}]}});
        let headless = |target: Value| {
            let mut extra = ports(target);
            merge(&mut extra, json!({"spec": {"clusterIP": "None"}}));
            extra
        };
        let services = vec![
            service("shop", "db", headless(json!(8080))),
            service("shop", "same", headless(json!(80))),
            service("shop", "named", headless(json!("web"))),
            // kube-proxy maps a ClusterIP Service's port: nothing to add.
            service(
                "shop",
                "cart",
                json!({"spec": {"clusterIP": "10.0.0.7", "ports": [{"port": 80, "name": "http", "targetPort": 8080}]}}),
            ),
        ];
        let (services, skipped) = federated_services(&services, &east, DEFAULT_HOST_SUFFIX);
        let targets: Vec<(&str, Option<u16>, bool)> = services
            .iter()
            .map(|s| (s.name.as_str(), s.ports[0].target_port, s.headless))
            .collect();
        assert_eq!(
            targets,
            [
                ("db", Some(8080), true),
                ("same", None, true),
                ("cart", None, false)
            ]
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0]
                .contains("shop/named: headless with a named targetPort (port 80 -> \"web\")"),
            "{}",
            skipped[0]
        );

        east.services = services;
        let west = mesh("west", "west").spec.inventory(&r("smh/west"));
        let inventory = Inventory {
            clusters: vec![east, west],
        };
        let plan = translate(&c, &inventory).unwrap();
        let entry = |cluster: &str, host: &str| {
            let object = plan
                .objects(cluster)
                .unwrap()
                .find(|o| o.name() == host)
                .unwrap()
                .to_object();
            let IstioObject::ServiceEntry(entry) = object else {
                panic!("{host} is not a ServiceEntry")
            };
            entry
        };
        // East's own entry resolves db's name to pod addresses: the gateway dials 8080.
        let local = entry("east", "db.shop.svc.east.mesh.internal");
        assert_eq!(local.spec.ports[0].number, 80);
        assert_eq!(local.spec.ports[0].target_port, Some(8080));
        assert_eq!(
            entry("east", "cart.shop.svc.east.mesh.internal").spec.ports[0].target_port,
            None
        );
        // West reaches db through east's gateway port, not the pods' port.
        let imported = entry("west", "db.shop.svc.east.mesh.internal");
        assert_eq!(imported.spec.ports[0].target_port, None);
        assert_eq!(imported.spec.endpoints[0].ports["http"], 15443);
    }

    fn two_cluster_inventory(c: &FederationConfig, services: &[(&str, &str)]) -> Inventory {
        let mut clusters = Vec::new();
        for name in ["east", "west"] {
            let mut inv = mesh(name, name).spec.inventory(&r(&format!("smh/{name}")));
            inv.services = services
                .iter()
                .filter(|(cluster, _)| *cluster == name)
                .map(|(_, svc)| serde_json::from_value(json!({"name": svc, "namespace": "shop", "ports": [{"number": 80, "name": "http"}]})).unwrap())
                .collect();
            clusters.push(inv);
        }
        let _ = c;
        Inventory { clusters }
    }

    fn existing_from(object: &IstioObject) -> ExistingObject {
        let value = serde_json::to_value(object).unwrap();
        ExistingObject::from_value(object.kind(), value).unwrap()
    }

    #[test]
    fn objects_are_applied_when_missing_or_different_and_stale_ones_deleted() {
        let c = config(&["east", "west"]);
        let labels = c.labels();
        let inventory =
            two_cluster_inventory(&c, &[("east", "cart"), ("east", "pay"), ("west", "ui")]);
        let plan = translate(&c, &inventory).unwrap();
        let desired: Vec<IstioObject> = plan
            .objects("west")
            .unwrap()
            .map(|d| d.to_object())
            .collect();
        assert_eq!(desired.len(), 5, "gateway, rule, 2 imported, 1 local entry");

        // Nothing there: everything applied.
        let changes = object_changes(&plan, "west", &[], &labels);
        assert_eq!(changes.apply, desired);
        assert!(changes.delete.is_empty() && changes.conflicts.is_empty());

        // Everything there as desired (plus a label someone added): nothing to do.
        let mut existing: Vec<ExistingObject> = desired.iter().map(existing_from).collect();
        existing[0].labels.insert("team".into(), "x".into());
        if let Some(IstioObject::Gateway(g)) = existing[0].object.as_mut() {
            g.metadata.labels.insert("team".into(), "x".into());
        }
        let changes = object_changes(&plan, "west", &existing, &labels);
        assert_eq!(
            changes,
            ObjectChanges {
                unchanged: 5,
                ..ObjectChanges::default()
            }
        );

        // One changed by hand, one unreadable, one stale, one in an old namespace, one of
        // another VirtualMesh, one hand-made object holding a wanted name.
        let mut changed = existing.clone();
        if let Some(IstioObject::ServiceEntry(se)) = changed[2].object.as_mut() {
            se.spec.addresses = vec!["240.0.0.1".into()];
        }
        changed[3].object = None;
        let mut stale = existing[2].clone();
        stale.id.name = "gone.shop.svc.east.mesh.internal".into();
        let mut old_ns = existing[2].clone();
        old_ns.id.namespace = "old-istio".into();
        let mut others = existing[2].clone();
        others.id.name = "theirs.shop.svc.east.mesh.internal".into();
        others
            .labels
            .insert("meshca.io/virtual-mesh".into(), "other".into());
        changed.extend([stale, old_ns, others]);
        let mut foreign = changed.remove(4);
        foreign.labels.clear();
        changed.push(foreign.clone());
        let changes = object_changes(&plan, "west", &changed, &labels);
        let applied: Vec<ObjectId> = changes.apply.iter().map(IstioObject::id).collect();
        assert_eq!(applied, [desired[2].id(), desired[3].id()]);
        assert_eq!(changes.conflicts, [foreign.id.clone()]);
        let mut deleted: Vec<String> = changes.delete.iter().map(|d| d.to_string()).collect();
        deleted.sort();
        assert_eq!(
            deleted,
            [
                "ServiceEntry istio-system/gone.shop.svc.east.mesh.internal",
                "ServiceEntry old-istio/cart.shop.svc.east.mesh.internal",
            ]
        );
        assert_eq!(changes.unchanged, 2);

        // A cluster outside the plan (or federation disabled) loses everything labelled.
        let changes = object_changes(&plan, "north", &existing, &labels);
        assert_eq!(changes.delete.len(), 5);
        assert!(changes.apply.is_empty());
        assert_eq!(cleanup_objects(&changed, &labels).len(), 6);
    }

    fn trust(installed: bool, current: bool, root: &str, trusted: &[&str]) -> MemberTrust {
        MemberTrust {
            installed,
            current,
            root: (!root.is_empty()).then(|| root.to_string()),
            trusted: trusted.iter().map(|s| s.to_string()).collect(),
            next: None,
            restarting: false,
            unread: false,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn old_roots_are_retired_once_every_member_is_on_the_new_one() {
        let none = VirtualMeshStatus::default();
        // No members, or members not all installed: nothing.
        assert_eq!(
            decide_roots(&[], &none, at(0), DAY),
            RootDecision::default()
        );
        let mixed = [
            trust(true, true, R2, &[R2, R1]),
            trust(false, true, "", &[]),
        ];
        assert_eq!(
            decide_roots(&mixed, &none, at(0), DAY),
            RootDecision::default()
        );
        // Installed, but on different roots.
        let apart = [
            trust(true, true, R2, &[R2, R1]),
            trust(true, true, R1, &[R1]),
        ];
        assert_eq!(decide_roots(&apart, &none, at(0), DAY).common_root, None);
        // One root, nothing else trusted: shared, nothing to retire.
        let settled = [trust(true, true, R1, &[R1]), trust(true, true, R1, &[R1])];
        assert_eq!(
            decide_roots(&settled, &none, at(0), DAY),
            RootDecision {
                common_root: Some(R1.into()),
                ..RootDecision::default()
            }
        );
        // Everyone moved to R2 and still trusts R1: the wait starts...
        let moved = [
            trust(true, true, R2, &[R2, R1]),
            trust(true, true, R2, &[R2]),
        ];
        let waiting = decide_roots(&moved, &none, at(0), DAY);
        assert_eq!(waiting.common_root.as_deref(), Some(R2));
        assert!(waiting.retired.is_empty() && waiting.newly_retired.is_empty());
        let rotation = waiting.rotation.clone().unwrap();
        assert_eq!(rotation.root, R2);
        assert_eq!(rotation.converged_at, rfc3339(at(0)));
        assert_eq!(rotation.retire_at, rfc3339(at(86_400)));
        // ... and is remembered through status, not restarted.
        let previous = VirtualMeshStatus {
            root_rotation: Some(rotation.clone()),
            ..none.clone()
        };
        assert_eq!(
            decide_roots(&moved, &previous, at(3_600), DAY).rotation,
            Some(rotation.clone())
        );
        // A member whose cluster could not be read holds it back too, and the wait goes on
        // from when it began: once it is read again, R1 is retired at the time set.
        let unread = [
            trust(true, true, R2, &[R2, R1]),
            MemberTrust {
                unread: true,
                ..MemberTrust::default()
            },
        ];
        let blip = decide_roots(&unread, &previous, at(7_200), DAY);
        assert_eq!(blip.rotation, Some(rotation.clone()));
        assert!(blip.retired.is_empty() && blip.newly_retired.is_empty());
        let after_blip = VirtualMeshStatus {
            root_rotation: blip.rotation.clone(),
            ..none.clone()
        };
        assert_eq!(
            decide_roots(&moved, &after_blip, at(86_400), DAY).newly_retired,
            [R1]
        );
        // A member that has not acted on its latest spec holds retirement back.
        let stale = [
            trust(true, false, R2, &[R2, R1]),
            trust(true, true, R2, &[R2]),
        ];
        let held = decide_roots(&stale, &previous, at(90_000), DAY);
        assert_eq!(held.rotation, Some(rotation.clone()));
        assert!(held.retired.is_empty());
        // Time is up: R1 retired.
        let done = decide_roots(&moved, &previous, at(86_400), DAY);
        assert_eq!(done.retired, [R1]);
        assert_eq!(done.newly_retired, [R1]);
        assert_eq!(done.rotation, None);
        // Immediately with no wait.
        assert_eq!(
            decide_roots(&moved, &none, at(0), Duration::ZERO).retired,
            [R1]
        );
        // Next passes: retired stays while agents rewrite, with no new rotation.
        let after = VirtualMeshStatus {
            retired_root_fingerprints: vec![R1.into()],
            ..none.clone()
        };
        let again = decide_roots(&moved, &after, at(90_000), DAY);
        assert_eq!(
            (again.retired.clone(), again.rotation.clone()),
            (vec![R1.to_string()], None)
        );
        assert!(again.newly_retired.is_empty());
        // A rotation recorded for another root starts over.
        let other = VirtualMeshStatus {
            root_rotation: Some(RootRotation {
                root: R3.into(),
                ..rotation.clone()
            }),
            ..none.clone()
        };
        assert_eq!(
            decide_roots(&moved, &other, at(500), DAY)
                .rotation
                .unwrap()
                .converged_at,
            rfc3339(at(500))
        );
        // Back to R1 (rollback): R1 is in use, so it is no longer retired.
        let back = [
            trust(true, true, R1, &[R1, R2]),
            trust(false, true, R1, &[R1]),
        ];
        let rolled = decide_roots(&back, &after, at(0), DAY);
        assert!(rolled.retired.is_empty(), "{rolled:?}");
        // Fingerprints compare normalized (the agent accepts colons and upper case).
        let upper = [trust(true, true, R2, &[R2, R1])];
        let prev = VirtualMeshStatus {
            retired_root_fingerprints: vec![R1.to_uppercase()],
            ..none
        };
        assert_eq!(decide_roots(&upper, &prev, at(0), DAY).retired, [R1]);
        let request = request(
            json!({}),
            json!({"virtualMesh": {"namespace": "a", "name": "b"}, "mesh": {"namespace": "a", "name": "c"}, "signer": {"url": "https://s"}}),
        );
        assert_eq!(MemberTrust::of(Some(&request)), MemberTrust::default());
        let mut reported = request.clone();
        reported.status = Some(VmcsrStatus {
            phase: Some(Phase::Installed),
            observed_generation: Some(3),
            root_fingerprint: Some(R2.to_uppercase()),
            trusted_root_fingerprints: vec![R2.into(), R1.into()],
            ..VmcsrStatus::default()
        });
        assert_eq!(
            MemberTrust::of(Some(&reported)),
            trust(true, true, R2, &[R2, R1])
        );
        reported.metadata.generation = Some(4);
        assert!(!MemberTrust::of(Some(&reported)).current);
        // A restart plan under way holds it back; under `never`, which stops a plan
        // where it stands, it does not (nothing would ever finish it).
        reported.metadata.generation = Some(3);
        let plan = crate::agent::restart::plan_for(
            crate::agent::restart::RestartPolicy::Always,
            crate::agent::restart::InstallKind::RootsOnly,
            "aa01",
            R2,
            "",
            None,
            "2026-01-01T00:00:00Z",
        );
        reported.status.as_mut().unwrap().restart = plan;
        assert!(MemberTrust::of(Some(&reported)).restarting);
        reported.spec.settings.restart.policy = crate::agent::restart::RestartPolicy::Never;
        assert!(!MemberTrust::of(Some(&reported)).restarting);
    }

    /// `member`, its agent reporting `next` as the signer's next root.
    fn announcing(member: MemberTrust, next: &str) -> MemberTrust {
        MemberTrust {
            next: Some(next.into()),
            ..member
        }
    }

    #[test]
    fn the_next_root_is_never_retired() {
        let none = VirtualMeshStatus::default();
        // Prepare phase: every member on R1, trusting R1 and the announced R2. No rotation
        // starts, nothing is retired, however long it lasts.
        let preparing = [
            announcing(trust(true, true, R1, &[R1, R2]), R2),
            announcing(trust(true, true, R1, &[R2, R1]), R2),
        ];
        let settled = RootDecision {
            common_root: Some(R1.into()),
            ..RootDecision::default()
        };
        for later in [0, 86_400, 10 * 86_400] {
            assert_eq!(
                decide_roots(&preparing, &none, at(later), DAY),
                settled,
                "at +{later}s"
            );
        }
        assert_eq!(
            decide_roots(&preparing, &none, at(0), Duration::ZERO),
            settled
        );
        // A rotation recorded for R1 (by a controller that did not know R2 was next) goes.
        let recorded = VirtualMeshStatus {
            root_rotation: Some(RootRotation {
                root: R1.into(),
                converged_at: rfc3339(at(0)),
                retire_at: rfc3339(at(86_400)),
            }),
            ..none.clone()
        };
        assert_eq!(
            decide_roots(&preparing, &recorded, at(90_000), DAY),
            settled
        );
        // R2 retired before (by an older controller) but announced now: taken off; the
        // other retired roots stay.
        let retired_before = VirtualMeshStatus {
            retired_root_fingerprints: vec![R2.to_uppercase(), R3.into()],
            ..none.clone()
        };
        let restored = decide_roots(&preparing, &retired_before, at(0), DAY);
        assert_eq!(restored.retired, [R3]);
        assert!(restored.newly_retired.is_empty() && restored.rotation.is_none());
        // One member's agent reporting it is enough (the other's may not have heard yet).
        let one_heard = [
            announcing(trust(true, true, R1, &[R1, R2]), &R2.to_uppercase()),
            trust(true, true, R1, &[R1, R2]),
        ];
        assert_eq!(decide_roots(&one_heard, &none, at(90_000), DAY), settled);
        assert!(
            decide_roots(&one_heard, &retired_before, at(0), DAY)
                .retired
                .iter()
                .all(|fp| fp != R2)
        );
        // Another old root besides the next one is still retired, and only it.
        let with_old = [
            announcing(trust(true, true, R1, &[R1, R3, R2]), R2),
            announcing(trust(true, true, R1, &[R1, R2]), R2),
        ];
        let retiring = decide_roots(&with_old, &none, at(0), DAY);
        assert_eq!(
            retiring.rotation.as_ref().map(|r| r.root.as_str()),
            Some(R1)
        );
        let previous = VirtualMeshStatus {
            root_rotation: retiring.rotation,
            ..none.clone()
        };
        let done = decide_roots(&with_old, &previous, at(86_400), DAY);
        assert_eq!(
            (done.retired, done.newly_retired),
            (vec![R3.to_string()], vec![R3.to_string()])
        );
        // After the switch (members on R2, still trusting R1, the signer announcing no next
        // root): R1 goes after retire_after, as in any root change.
        let switched = [
            trust(true, true, R2, &[R2, R1]),
            trust(true, true, R2, &[R2, R1]),
        ];
        let waiting = decide_roots(&switched, &none, at(0), DAY);
        assert!(waiting.retired.is_empty());
        let rotation = waiting.rotation.unwrap();
        assert_eq!(rotation.root, R2);
        let previous = VirtualMeshStatus {
            root_rotation: Some(rotation),
            ..none.clone()
        };
        let done = decide_roots(&switched, &previous, at(86_400), DAY);
        assert_eq!(
            (done.retired, done.newly_retired),
            (vec![R1.to_string()], vec![R1.to_string()])
        );
    }

    #[test]
    fn next_root_trusted_says_when_every_member_trusts_the_next_root() {
        let (east, west) = (r("smh/east"), r("smh/west"));
        let both = |e: &MemberTrust, w: &MemberTrust| next_root_trust(&[(&east, e), (&west, w)]);
        let on_r1 = trust(true, true, R1, &[R1]);
        let preparing = announcing(trust(true, true, R1, &[R1, R2]), R2);
        // Nobody reports a next root: nothing to say.
        assert_eq!(both(&on_r1, &on_r1), None);
        // West's agent has not heard of R2 (nor trusts it): west lacks it, seen so.
        assert_eq!(
            both(&preparing, &on_r1),
            Some(NextRootTrust::Agreed {
                root: R2.into(),
                lacking: vec![west.clone()],
                distrusting: vec![west.clone()],
            })
        );
        // West trusts it, but its status is for an older spec, or not Installed: lacking,
        // though not seen to distrust it.
        for not_yet in [
            announcing(trust(true, false, R1, &[R1, R2]), R2),
            announcing(trust(false, true, R1, &[R1, R2]), R2),
        ] {
            assert_eq!(
                both(&preparing, &not_yet),
                Some(NextRootTrust::Agreed {
                    root: R2.into(),
                    lacking: vec![west.clone()],
                    distrusting: vec![],
                })
            );
        }
        // Every member trusts it (compared normalized).
        let upper = announcing(trust(true, true, R1, &[R1, R2]), &R2.to_uppercase());
        assert_eq!(
            both(&preparing, &upper),
            Some(NextRootTrust::Agreed {
                root: R2.into(),
                lacking: vec![],
                distrusting: vec![],
            })
        );
        // Different next roots.
        let other = announcing(trust(true, true, R1, &[R1, R3]), R3);
        assert_eq!(
            both(&preparing, &other),
            Some(NextRootTrust::Differ(vec![
                (east.clone(), R2.into()),
                (west.clone(), R3.into()),
            ]))
        );

        // In status: the condition after the others, Ready and the phase unaffected.
        let installed = VmcsrStatus {
            next_root_fingerprint: Some(R2.into()),
            trusted_root_fingerprints: vec![R1.into(), R2.into()],
            ..agent(Phase::Installed, R1, None)
        };
        let status_with = |previous: &VirtualMeshStatus, next: Option<NextRootTrust>, t: u64| {
            let mut seen = observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&installed)), None),
                ],
                FederationOutcome::Disabled,
            );
            seen.next_root = next;
            converged_status(previous, Some(2), seen, at(t))
        };
        let pending = status_with(&VirtualMeshStatus::default(), both(&preparing, &on_r1), 0);
        let types: Vec<&str> = pending
            .conditions
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(
            types,
            [
                ACCEPTED,
                TRUST_ESTABLISHED,
                FEDERATED,
                READY,
                NEXT_ROOT_TRUSTED
            ]
        );
        let c = condition(&pending, NEXT_ROOT_TRUSTED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Pending"));
        assert!(
            c.message.contains(&format!(
                "next root sha256 {R2} is not yet trusted by smh/west;"
            )),
            "{}",
            c.message
        );
        assert!(!c.message.contains("smh/east"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(2));
        assert_eq!(pending.next_root_fingerprint.as_deref(), Some(R2));
        assert_eq!(pending.phase, Some(VirtualMeshPhase::Ready));
        assert_eq!(condition(&pending, READY).status, "True");
        // Per member: the next root its agent reports.
        assert_eq!(pending.meshes[0].next_root_fingerprint.as_deref(), Some(R2));

        let all = status_with(&pending, both(&preparing, &preparing), 60);
        let c = condition(&all, NEXT_ROOT_TRUSTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "AllMembers")
        );
        assert!(c.message.contains(R2), "{}", c.message);
        assert_eq!(c.last_transition_time, rfc3339(at(60)));
        assert_eq!(all.next_root_fingerprint.as_deref(), Some(R2));
        assert_eq!(all.phase, Some(VirtualMeshPhase::Ready));

        let differ = status_with(&all, both(&preparing, &other), 120);
        let c = condition(&differ, NEXT_ROOT_TRUSTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NextRootsDiffer")
        );
        assert!(
            c.message
                .contains(&format!("smh/east: {R2}, smh/west: {R3}")),
            "{}",
            c.message
        );
        assert_eq!(differ.next_root_fingerprint, None);
        assert_eq!(differ.phase, Some(VirtualMeshPhase::Ready));

        // No member reports a next root any more (the signer switched): the condition goes.
        let after = status_with(&differ, None, 180);
        assert!(
            after
                .conditions
                .iter()
                .all(|c| c.type_ != NEXT_ROOT_TRUSTED)
        );
        assert_eq!(after.next_root_fingerprint, None);
        assert_eq!(after.conditions.len(), 4);

        // With a settle time (the retirement delay): every member's Secret holds R2, but
        // workloads learn it with their next certificate; True only a settle time after.
        let settling = |previous: &VirtualMeshStatus, t: u64| {
            let mut seen = observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&installed)), None),
                ],
                FederationOutcome::Disabled,
            );
            seen.next_root = both(&preparing, &preparing);
            seen.next_root_settle = DAY;
            converged_status(previous, Some(2), seen, at(t))
        };
        let first = settling(&pending, 60);
        let c = condition(&first, NEXT_ROOT_TRUSTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Settling")
        );
        let since = rfc3339(at(60));
        let until = rfc3339(at(60) + DAY);
        assert!(
            c.message.contains(&since)
                && c.message.contains(&format!("current root until {until}")),
            "{}",
            c.message
        );
        assert_eq!(
            first.next_root_trusted_since.as_deref(),
            Some(since.as_str())
        );
        let later = settling(&first, 60 + 86_399);
        assert_eq!(condition(&later, NEXT_ROOT_TRUSTED).reason, "Settling");
        let settled = settling(&later, 60 + 86_400);
        let c = condition(&settled, NEXT_ROOT_TRUSTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "AllMembers")
        );
        assert_eq!(
            settled.next_root_trusted_since.as_deref(),
            Some(since.as_str())
        );
        // A pass that cannot see a member (its cluster unreadable, its agent renewing)
        // keeps the time; the condition waits for that member meanwhile.
        let unseen = trust(false, false, "", &[]);
        let blip = status_with(&settled, both(&preparing, &unseen), 88_000);
        assert_eq!(
            blip.next_root_trusted_since.as_deref(),
            Some(since.as_str())
        );
        assert_eq!(condition(&blip, NEXT_ROOT_TRUSTED).reason, "Pending");
        let back = settling(&blip, 88_060);
        assert_eq!(
            back.next_root_trusted_since.as_deref(),
            Some(since.as_str())
        );
        assert_eq!(condition(&back, NEXT_ROOT_TRUSTED).reason, "AllMembers");
        // A member that stops trusting it starts the wait again.
        let lost = status_with(&settled, both(&preparing, &on_r1), 90_000);
        assert_eq!(lost.next_root_trusted_since, None);
        assert_eq!(
            settling(&lost, 90_060).next_root_trusted_since,
            Some(rfc3339(at(90_060)))
        );
    }

    #[test]
    fn a_member_whose_istiod_is_not_yet_restarted_does_not_trust_the_next_root_yet() {
        let east = r("smh/east");
        let mut restarting = announcing(trust(true, true, R1, &[R1, R2]), R2);
        restarting.restarting = true;
        assert_eq!(
            next_root_trust(&[(&east, &restarting)]),
            Some(NextRootTrust::Agreed {
                root: R2.into(),
                lacking: vec![east.clone()],
                distrusting: vec![],
            })
        );
        // Nor is a root change converged, for retirement, while a member restarts.
        let mut moved = trust(true, true, R2, &[R1, R2]);
        let none = VirtualMeshStatus::default();
        assert!(
            decide_roots(&[moved.clone()], &none, at(0), DAY)
                .rotation
                .is_some()
        );
        moved.restarting = true;
        assert!(decide_roots(&[moved], &none, at(0), DAY).rotation.is_none());
    }

    fn report<'a>(name: &str, view: RequestView<'a>, problem: Option<&str>) -> MemberStatus {
        member_status(&MemberReport {
            id: r(&format!("smh/{name}")),
            cluster: name.into(),
            agent_namespace: "service-mesh-hub".into(),
            istio_namespace: "istio-system".into(),
            request: view,
            federation: Some(MemberFederation {
                exported: 1,
                imported: 1,
                objects: 4,
                conflicts: vec![],
                not_federated: vec![],
            }),
            problem: problem.map(String::from),
            now: SystemTime::now(),
        })
    }

    fn agent(phase: Phase, root: &str, error: Option<&str>) -> VmcsrStatus {
        VmcsrStatus {
            phase: Some(phase),
            root_fingerprint: Some(root.into()),
            trusted_root_fingerprints: vec![root.into()],
            serial: Some("0a".into()),
            not_after: Some("2030-01-01T00:00:00.000Z".into()),
            last_error: error.map(String::from),
            ..VmcsrStatus::default()
        }
    }

    fn condition<'s>(
        status: &'s VirtualMeshStatus,
        type_: &str,
    ) -> &'s crate::agent::crd::Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn observed(members: Vec<MemberStatus>, federation: FederationOutcome) -> Observed {
        let roots: BTreeSet<&str> = members
            .iter()
            .filter_map(|m| m.root_fingerprint.as_deref())
            .collect();
        let common = (members.iter().all(|m| m.phase == MemberPhase::Installed)
            && roots.len() == 1)
            .then(|| roots.iter().next().unwrap().to_string());
        Observed {
            members,
            removing: vec![],
            roots: RootDecision {
                common_root: common,
                ..RootDecision::default()
            },
            next_root: None,
            next_root_settle: Duration::ZERO,
            federation,
        }
    }

    #[test]
    fn member_status_follows_the_agent_unless_the_controller_had_a_problem() {
        let installed = agent(Phase::Installed, R1, None);
        let s = report("east", RequestView::Present(Some(&installed)), None);
        assert_eq!(s.phase, MemberPhase::Installed);
        assert_eq!(s.root_fingerprint.as_deref(), Some(R1));
        assert_eq!(s.serial.as_deref(), Some("0a"));
        assert_eq!(
            report("east", RequestView::Present(None), None).phase,
            MemberPhase::Pending
        );
        let failed = agent(Phase::Failed, R1, Some("cannot reach the signer"));
        let s = report("east", RequestView::Present(Some(&failed)), None);
        assert_eq!(
            (s.phase, s.message.as_deref()),
            (MemberPhase::Failed, Some("cannot reach the signer"))
        );
        let s = report(
            "east",
            RequestView::Present(Some(&installed)),
            Some("apply failed"),
        );
        assert_eq!(
            (s.phase, s.message.as_deref()),
            (MemberPhase::Error, Some("apply failed"))
        );
        assert_eq!(
            report("east", RequestView::Conflict, Some("taken")).phase,
            MemberPhase::Conflict
        );
        assert_eq!(
            report("east", RequestView::Error, Some("down")).phase,
            MemberPhase::Error
        );
    }

    #[test]
    fn an_installed_report_past_its_renewal_or_end_is_a_failing_member() {
        let ago = |secs: u64| rfc3339(SystemTime::now() - Duration::from_secs(secs));
        let ahead = |secs: u64| rfc3339(SystemTime::now() + Duration::from_secs(secs));
        let with_times = |renew_at: String, not_after: String| VmcsrStatus {
            renew_at: Some(renew_at),
            not_after: Some(not_after),
            ..agent(Phase::Installed, R1, None)
        };
        // Renewal an hour overdue: the agent may be retrying; still Installed.
        let fresh = with_times(ago(3600), ahead(86_400 * 30));
        let s = report("east", RequestView::Present(Some(&fresh)), None);
        assert_eq!((s.phase, s.message), (MemberPhase::Installed, None));
        // Two days overdue: someone should look.
        let overdue = with_times(ago(2 * 86_400), ahead(86_400 * 30));
        let s = report("east", RequestView::Present(Some(&overdue)), None);
        assert_eq!(s.phase, MemberPhase::Failed);
        assert!(
            s.message
                .as_deref()
                .unwrap()
                .contains("over a day past its renewal time")
        );
        // Ended, though its request still says Installed (its agent gone).
        let ended = with_times(ago(10 * 86_400), ago(60));
        let s = report("east", RequestView::Present(Some(&ended)), None);
        assert_eq!(s.phase, MemberPhase::Failed);
        assert!(
            s.message
                .as_deref()
                .unwrap()
                .contains("yet its request still reads Installed")
        );
    }

    /// A member whose intermediate ran out while its request still reads Installed shares
    /// the root all the same, and federation is applied: Ready is False all the same, as
    /// the phase is Degraded (before, Ready said True, and `kubectl wait` believed it).
    #[test]
    fn a_member_in_trouble_under_the_shared_root_is_not_ready() {
        let installed = agent(Phase::Installed, R1, None);
        let ended = VmcsrStatus {
            renew_at: Some(rfc3339(
                SystemTime::now() - Duration::from_secs(10 * 86_400),
            )),
            not_after: Some(rfc3339(SystemTime::now() - Duration::from_secs(60))),
            ..installed.clone()
        };
        let mut seen = observed(
            vec![
                report("east", RequestView::Present(Some(&installed)), None),
                report("west", RequestView::Present(Some(&ended)), None),
            ],
            FederationOutcome::Applied {
                services: 2,
                moved_addresses: 0,
            },
        );
        // As decide_roots sees it: both requests read Installed under R1.
        seen.roots.common_root = Some(R1.into());
        let status = converged_status(&VirtualMeshStatus::default(), Some(1), seen, at(0));
        assert_eq!(condition(&status, TRUST_ESTABLISHED).status, "True");
        assert_eq!(condition(&status, FEDERATED).status, "True");
        let ready = condition(&status, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "MemberFailed")
        );
        assert!(
            ready.message.starts_with("smh/west (Failed: "),
            "{}",
            ready.message
        );
        assert_eq!(status.phase, Some(VirtualMeshPhase::Degraded));
    }

    #[test]
    fn what_a_member_reports_is_taken_bounded_and_fingerprints_only() {
        // Whoever holds a member cluster writes its request's status.
        let mut hostile = agent(Phase::Installed, R1, Some(&"x".repeat(1 << 20)));
        hostile.trusted_root_fingerprints = std::iter::once("zz".to_string())
            .chain((0..10_000).map(|i| format!("{i:064x}")))
            .collect();
        hostile.next_root_fingerprint = Some("not a fingerprint".into());
        hostile.serial = Some("f".repeat(100_000));
        let s = report("east", RequestView::Present(Some(&hostile)), None);
        assert_eq!(s.root_fingerprint.as_deref(), Some(R1));
        assert_eq!(s.trusted_root_fingerprints.len(), MAX_REPORTED_ROOTS);
        assert!(!s.trusted_root_fingerprints.contains(&"zz".to_string()));
        assert_eq!(s.next_root_fingerprint, None);
        assert!(s.message.as_deref().unwrap().len() < MAX_MEMBER_MESSAGE + 40);
        assert!(s.serial.as_deref().unwrap().len() < 100);
        // So is the controller's own problem with the member, which may carry a member
        // API server's whole error page.
        let page = "<html>".repeat(100_000);
        let s = report("east", RequestView::Error, Some(&page));
        assert!(s.message.as_deref().unwrap().len() < MAX_MEMBER_MESSAGE + 40);
        let request = VirtualMeshCertificateSigningRequest {
            metadata: Default::default(),
            spec: serde_json::from_value(json!({
                "virtualMesh": {"namespace": "smh", "name": "vm"},
                "mesh": {"namespace": "smh", "name": "east"},
                "signer": {"url": "https://signer:8443"}
            }))
            .unwrap(),
            status: Some(hostile),
        };
        let trust = MemberTrust::of(Some(&request));
        assert_eq!(trust.trusted.len(), MAX_REPORTED_ROOTS);
        assert!(trust.trusted.iter().all(|fp| fp.len() == 64));
        assert_eq!(trust.next, None);
    }

    #[test]
    fn status_sums_up_trust_and_federation() {
        let t0 = at(0);
        let applied = FederationOutcome::Applied {
            services: 2,
            moved_addresses: 0,
        };
        let installed = agent(Phase::Installed, R1, None);
        let requested = VmcsrStatus {
            phase: Some(Phase::Requested),
            ..VmcsrStatus::default()
        };

        // Ready.
        let ready = converged_status(
            &VirtualMeshStatus::default(),
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&installed)), None),
                ],
                applied.clone(),
            ),
            t0,
        );
        assert_eq!(ready.phase, Some(VirtualMeshPhase::Ready));
        assert_eq!(ready.observed_generation, Some(2));
        assert_eq!(ready.mesh_count, 2);
        assert_eq!(ready.root_fingerprint.as_deref(), Some(R1));
        let types: Vec<&str> = ready.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [ACCEPTED, TRUST_ESTABLISHED, FEDERATED, READY]);
        assert!(
            ready
                .conditions
                .iter()
                .all(|c| c.status == "True" && c.observed_generation == Some(2))
        );
        assert_eq!(
            condition(&ready, FEDERATED).message,
            "2 service(s) federated across 2 cluster(s)"
        );
        assert_eq!(ready.federation.as_ref().unwrap().mode, "PERMISSIVE");
        // The same observation later gives the same status: nothing to write.
        let again = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&installed)), None),
                ],
                applied.clone(),
            ),
            at(600),
        );
        assert_eq!(again, ready);

        // Waiting for an agent: Progressing, naming who.
        let waiting = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&requested)), None),
                ],
                applied.clone(),
            ),
            at(700),
        );
        assert_eq!(waiting.phase, Some(VirtualMeshPhase::Progressing));
        let trust = condition(&waiting, TRUST_ESTABLISHED);
        assert_eq!(
            (trust.status.as_str(), trust.reason.as_str()),
            ("False", "Pending")
        );
        assert_eq!(trust.message, "waiting for smh/west (Requested)");
        assert_eq!(trust.last_transition_time, rfc3339(at(700)));
        assert_eq!(condition(&waiting, READY).reason, "Pending");
        assert_eq!(waiting.root_fingerprint, None);

        // A failed agent: Degraded with its error.
        let failed = agent(Phase::Failed, R1, Some("signer said no"));
        let degraded = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&failed)), None),
                ],
                applied.clone(),
            ),
            t0,
        );
        assert_eq!(degraded.phase, Some(VirtualMeshPhase::Degraded));
        let trust = condition(&degraded, TRUST_ESTABLISHED);
        assert_eq!(trust.reason, "MemberFailed");
        assert!(
            trust.message.contains("smh/west (Failed: signer said no)"),
            "{}",
            trust.message
        );

        // Roots differ.
        let other = agent(Phase::Installed, R2, None);
        let differ = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Present(Some(&other)), None),
                ],
                applied.clone(),
            ),
            t0,
        );
        assert_eq!(condition(&differ, TRUST_ESTABLISHED).reason, "RootsDiffer");

        // Federation held: Degraded, the last federation status kept.
        let held = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    report("west", RequestView::Error, Some("connection refused")),
                ],
                FederationOutcome::Held {
                    reason: "MemberError",
                    message: "cannot read smh/west".into(),
                },
            ),
            t0,
        );
        assert_eq!(held.phase, Some(VirtualMeshPhase::Degraded));
        let federated = condition(&held, FEDERATED);
        assert_eq!(
            (federated.status.as_str(), federated.reason.as_str()),
            ("False", "MemberError")
        );
        assert_eq!(held.federation, ready.federation);

        // Thousands of conflicting objects: the status and the message name the first
        // 16 (in name order) and how many more.
        let many = ObjectChanges {
            conflicts: (0..2_000)
                .rev()
                .map(|n| ObjectId {
                    kind: Kind::ServiceEntry,
                    namespace: "istio-system".into(),
                    name: format!("s{n:04}.shop.svc.east.mesh.internal"),
                })
                .collect(),
            ..ObjectChanges::default()
        };
        let listed = many.conflicts_listed();
        assert_eq!(listed.len(), 17);
        assert_eq!(
            listed[0],
            "ServiceEntry istio-system/s0000.shop.svc.east.mesh.internal"
        );
        assert_eq!(
            listed[15],
            "ServiceEntry istio-system/s0015.shop.svc.east.mesh.internal"
        );
        assert_eq!(listed[16], "... and 1984 more");
        let mut crowded = report("west", RequestView::Present(Some(&installed)), None);
        crowded.federation.as_mut().unwrap().conflicts = listed;
        let crowded = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    crowded,
                ],
                applied.clone(),
            ),
            t0,
        );
        let message = &condition(&crowded, FEDERATED).message;
        assert!(message.ends_with(", ... and 1984 more"), "{message}");
        assert!(message.len() < 2_048, "{} bytes", message.len());

        // Conflicting objects.
        let mut conflicted = report("west", RequestView::Present(Some(&installed)), None);
        conflicted.federation.as_mut().unwrap().conflicts =
            vec!["ServiceEntry istio-system/x".into()];
        let conflict = converged_status(
            &ready,
            Some(2),
            observed(
                vec![
                    report("east", RequestView::Present(Some(&installed)), None),
                    conflicted,
                ],
                applied.clone(),
            ),
            t0,
        );
        assert_eq!(condition(&conflict, FEDERATED).reason, "Conflict");
        assert!(
            condition(&conflict, FEDERATED)
                .message
                .contains("west: ServiceEntry istio-system/x")
        );
        assert_eq!(conflict.phase, Some(VirtualMeshPhase::Degraded));

        // Federation disabled: Ready on trust alone.
        let disabled = converged_status(
            &VirtualMeshStatus::default(),
            Some(1),
            observed(
                vec![report("east", RequestView::Present(Some(&installed)), None)],
                FederationOutcome::Disabled,
            ),
            t0,
        );
        assert_eq!(disabled.phase, Some(VirtualMeshPhase::Ready));
        assert_eq!(condition(&disabled, FEDERATED).reason, "Disabled");
        assert_eq!(disabled.federation.as_ref().unwrap().mode, "Disabled");

        // A former member not yet cleaned: listed as Removing, Degraded.
        let mut with_removing = observed(
            vec![report("east", RequestView::Present(Some(&installed)), None)],
            FederationOutcome::Disabled,
        );
        with_removing.removing = vec![MemberStatus {
            phase: MemberPhase::Removing,
            message: Some("Secret gone".into()),
            ..report("west", RequestView::Error, None)
        }];
        let removing = converged_status(&VirtualMeshStatus::default(), Some(1), with_removing, t0);
        assert_eq!(removing.phase, Some(VirtualMeshPhase::Degraded));
        assert_eq!(removing.mesh_count, 1);
        assert_eq!(removing.meshes.len(), 2);
    }

    #[test]
    fn a_refused_spec_keeps_what_was_recorded_and_names_the_reason() {
        let installed = agent(Phase::Installed, R1, None);
        let ready = converged_status(
            &VirtualMeshStatus::default(),
            Some(1),
            observed(
                vec![report("east", RequestView::Present(Some(&installed)), None)],
                FederationOutcome::Disabled,
            ),
            at(0),
        );
        let rejection = Rejection {
            reason: "UnsupportedTrustModel",
            message: "the limited trust model is not supported".into(),
        };
        let refused = rejected_status(&ready, Some(2), &rejection, at(10));
        assert_eq!(refused.phase, Some(VirtualMeshPhase::Invalid));
        assert_eq!(refused.observed_generation, Some(2));
        for type_ in [ACCEPTED, READY] {
            let c = condition(&refused, type_);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "UnsupportedTrustModel")
            );
            assert_eq!(c.message, rejection.message);
        }
        assert_eq!(refused.meshes, ready.meshes);
        assert_eq!(refused.root_fingerprint, ready.root_fingerprint);
        assert_eq!(
            rejected_status(&refused, Some(2), &rejection, at(20)),
            refused
        );

        let left = vec![MemberStatus {
            phase: MemberPhase::Removing,
            message: Some("down".into()),
            ..ready.meshes[0].clone()
        }];
        let deleting = deleting_status(&ready, Some(2), left.clone(), at(30));
        assert_eq!(deleting.phase, Some(VirtualMeshPhase::Deleting));
        assert_eq!(deleting.meshes, left);
        assert!(
            condition(&deleting, READY)
                .message
                .contains("smh/east (Removing: down)")
        );
        let departed_ones: Vec<ObjectRef> = departed(&ready, &BTreeSet::new())
            .iter()
            .map(|m| m.id())
            .collect();
        assert_eq!(departed_ones, [r("smh/east")]);
        assert!(departed(&ready, &BTreeSet::from([r("smh/east")])).is_empty());
    }

    #[test]
    fn meshes_keep_their_finalizer_while_a_virtual_mesh_holds_them() {
        let mut a = mesh("a", "a");
        let mut b = mesh("b", "b");
        let c = mesh("c", "c");
        for m in [&mut a, &mut b] {
            m.metadata.finalizers = Some(vec![FINALIZER.into(), "other".into()]);
        }
        let v = vm(&["a"]);
        let status = VirtualMeshStatus {
            meshes: vec![report("b", RequestView::Error, None)],
            ..VirtualMeshStatus::default()
        };
        let held = holds(&v, &status);
        assert_eq!(held, BTreeSet::from([r("smh/a"), r("smh/b")]));
        assert!(meshes_to_release(&[a.clone(), b.clone(), c.clone()], &held).is_empty());
        assert_eq!(
            meshes_to_release(&[a, b, c], &BTreeSet::from([r("smh/a")])),
            [r("smh/b")]
        );
        assert!(!has_finalizer(&v));
    }
}
