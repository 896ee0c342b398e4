//! Federation (mode PERMISSIVE) as pure functions: from a VirtualMesh and an inventory of its
//! member clusters, the exact set of Istio objects each cluster must hold, and which labelled
//! objects are stale.
//!
//! For every selected Service S of cluster E (host `<S>.<ns>.svc.<E>.<suffix>`, the suffix
//! `mesh.internal` unless the VirtualMesh names another):
//! - in every other member cluster: a ServiceEntry (MESH_INTERNAL, a stable 240.0.0.0/4
//!   address, S's ports, one endpoint per E's east-west gateway address on its TLS port,
//!   carrying S's labels);
//! - in E: a ServiceEntry for the same host resolving to S's cluster-local name, visible only
//!   in the Istio namespace. The gateway routes by SNI (`outbound_.<port>_._.<host>`) to the
//!   Envoy cluster of that name; without this entry E's gateway has no such cluster.
//!
//! Per cluster: a Gateway (TLS port, AUTO_PASSTHROUGH, `*.<suffix>`) where it exports, and a
//! DestinationRule (`*.<suffix>`, ISTIO_MUTUAL, exported to every namespace, as the imported
//! ServiceEntries are) where it imports: the clients' sidecars must
//! originate Istio mTLS to the gateway (its addresses carry no tlsMode label, so auto-mTLS
//! would send plain text); on the exporting side the gateway passes TLS through untouched.
//!
//! The plan borrows the inventory and stores one record per exported service: objects are
//! built when asked for ([`DesiredObject::to_object`]), because a ServiceEntry is identical
//! in every importing cluster and 100 clusters of 1,000 services would otherwise mean ten
//! million objects in memory.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use serde::Deserialize;

use super::address::{self, AddressKey, AddressSpaceExhausted};
use super::inventory::{ClusterInventory, Inventory, InventoryError, ServiceInventory};
use super::istio::{
    API_VERSION, ClientTlsMode, ClientTlsSettings, DestinationRule, DestinationRuleSpec, Gateway,
    GatewayPort, GatewaySpec, IstioObject, Kind, Location, ObjectId, ObjectMeta, Resolution,
    Resource, Server, ServerTlsMode, ServerTlsSettings, ServiceEntry, ServiceEntrySpec,
    ServicePort, TrafficPolicy, WorkloadEntry,
};
use super::names::{is_dns1123_label, is_dns1123_subdomain, is_label_key, is_label_value};
use crate::policy::virtual_mesh::VirtualMeshDocument;
use crate::policy::{ObjectRef, PolicyLoadError};

/// Label on every federation object: the VirtualMesh's name.
pub const LABEL_VIRTUAL_MESH: &str = "meshca.io/virtual-mesh";
/// Label on every federation object: the VirtualMesh's namespace.
pub const LABEL_VIRTUAL_MESH_NAMESPACE: &str = "meshca.io/virtual-mesh-namespace";
/// Label on ServiceEntries: the cluster the service lives in.
pub const LABEL_SOURCE_CLUSTER: &str = "meshca.io/source-cluster";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "meshca";

/// Suffix of federated hosts when the VirtualMesh names none. Under `.internal`, which
/// ICANN reserved for private use: never delegated, so a lookup that misses Istio's DNS
/// proxy gets NXDOMAIN instead of an answer from whoever registered the name (`.global`,
/// the old suffix, is a public TLD open to registration).
pub const DEFAULT_HOST_SUFFIX: &str = "mesh.internal";
/// Longest host suffix: `<service>.<namespace>.svc.<cluster>.` takes up to 196 characters
/// (three labels of 63), and a host, which is also the ServiceEntry's name, holds 253.
pub const MAX_HOST_SUFFIX_LEN: usize = 253 - (63 + 1 + 63 + 5 + 63 + 1);
/// `exportTo` of imported ServiceEntries and of the DestinationRule: every namespace, set
/// explicitly so that a mesh-wide default (meshConfig `defaultServiceExportTo`,
/// `defaultDestinationRuleExportTo`) narrowed to `["."]` does not hide them from clients
/// outside the Istio namespace.
pub const EXPORT_TO_ALL: &str = "*";
/// Selector of the gateway federation configures: Istio's east-west gateway.
pub const GATEWAY_SELECTOR: (&str, &str) = ("istio", "eastwestgateway");

/// The federation modes meshca implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FederationMode {
    /// Every selected service of every member is offered to every other member.
    Permissive,
}

/// `spec.federation.selector`: which services are federated. Both parts must match; an
/// empty or absent selector selects every service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSelector {
    /// Only services in these namespaces (empty: any namespace).
    #[serde(default)]
    pub namespaces: BTreeSet<String>,
    /// Only services carrying all these labels.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl ServiceSelector {
    /// Schema of `spec.federation.selector` in the VirtualMesh CRD: these fields, and any
    /// other key kept (not pruned) so that validation refuses it by name.
    pub fn open_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        use schemars::JsonSchema;
        let mut schema = Self::json_schema(generator);
        schema.remove("additionalProperties");
        schema.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
        schema
    }

    pub fn matches(&self, service: &ServiceInventory) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&service.namespace))
            && self
                .match_labels
                .iter()
                .all(|(k, v)| service.labels.get(k) == Some(v))
    }

    fn check(&self) -> Result<(), String> {
        if let Some(ns) = self.namespaces.iter().find(|ns| !is_dns1123_label(ns)) {
            return Err(format!("namespaces: {ns:?} is not a namespace name"));
        }
        for (key, value) in &self.match_labels {
            if !is_label_key(key) || !is_label_value(value) {
                return Err(format!(
                    "matchLabels: {key:?}: {value:?} is not a valid label"
                ));
            }
        }
        Ok(())
    }
}

/// A VirtualMesh reduced to what federation needs, every option checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederationConfig {
    pub virtual_mesh: ObjectRef,
    pub members: BTreeSet<ObjectRef>,
    /// None: the VirtualMesh has no `spec.federation`, so nothing is federated (and whatever
    /// was is garbage).
    pub mode: Option<FederationMode>,
    pub selector: ServiceSelector,
    /// Suffix of federated hosts (`<service>.<namespace>.svc.<cluster>.<suffix>`), checked.
    pub host_suffix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error(transparent)]
    VirtualMesh(#[from] PolicyLoadError),
    #[error("{source_name}: expected exactly one VirtualMesh document, found {count}")]
    DocumentCount { source_name: String, count: usize },
    #[error("{source_name}: VirtualMesh {virtual_mesh}: {problem}")]
    Unsupported {
        source_name: String,
        virtual_mesh: String,
        problem: String,
    },
    #[error("{source_name}: VirtualMesh {virtual_mesh}: spec.federation.selector: {problem}")]
    Selector {
        source_name: String,
        virtual_mesh: String,
        problem: String,
    },
    #[error("{source_name}: VirtualMesh {virtual_mesh}: spec.federation.hostSuffix: {problem}")]
    HostSuffix {
        source_name: String,
        virtual_mesh: String,
        problem: String,
    },
    #[error(
        "cluster {cluster} has clusterDomain {cluster_domain}; host suffix {host_suffix} {why}: the federation Gateway and DestinationRule (*.{host_suffix}) would take {taken}; choose a suffix that is neither the cluster domain, a parent of it, nor under svc.{cluster_domain} (the default, mesh.internal, is fine)"
    )]
    HostSuffixTakesClusterLocalNames {
        cluster: String,
        cluster_domain: String,
        host_suffix: String,
        /// How the suffix sits relative to the cluster domain.
        why: String,
        /// Which cluster-local names `*.<suffix>` matches.
        taken: String,
    },
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(
        "VirtualMesh {virtual_mesh} lists mesh {mesh}, but no cluster in the inventory has that mesh"
    )]
    UnknownMember { virtual_mesh: String, mesh: String },
    #[error(
        "cluster {cluster} has mesh {mesh}, which is not a member of VirtualMesh {virtual_mesh}"
    )]
    NotAMember {
        cluster: String,
        mesh: String,
        virtual_mesh: String,
    },
    #[error(
        "cluster {cluster} exports {services} service(s) but has no gatewayAddresses: other clusters could not reach them"
    )]
    NoGateway { cluster: String, services: usize },
    #[error(transparent)]
    Addresses(#[from] AddressSpaceExhausted),
}

/// A host suffix must be a lowercase DNS name, not an IP address, short enough for every
/// host under it.
fn check_host_suffix(suffix: &str) -> Result<(), String> {
    if !is_dns1123_subdomain(suffix)
        || suffix
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{suffix:?} is not a DNS name (dot-separated labels of lowercase letters, digits and '-', at most 63 each, the last not all digits; no leading dot or '*')"
        ));
    }
    if suffix.len() > MAX_HOST_SUFFIX_LEN {
        return Err(format!(
            "{suffix:?} is {} characters long, more than {MAX_HOST_SUFFIX_LEN}: with a service, namespace and cluster name of 63 each a host (also the ServiceEntry's name) would pass 253",
            suffix.len()
        ));
    }
    Ok(())
}

/// Parses a file holding exactly one VirtualMesh document.
pub fn parse_virtual_mesh(
    source_name: &str,
    yaml: &str,
) -> Result<VirtualMeshDocument, FederationError> {
    let yaml_error = |message: String| PolicyLoadError::Yaml {
        source_name: source_name.to_string(),
        message,
    };
    let docs: Vec<serde_json::Value> = crate::yaml::documents(yaml).map_err(|e| match e {
        crate::yaml::YamlError::TooLarge(breach) => PolicyLoadError::TooLarge {
            source_name: source_name.to_string(),
            breach,
        },
        crate::yaml::YamlError::Parse(e) => yaml_error(e.to_string()),
    })?;
    let mut docs: Vec<serde_json::Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    if docs.len() != 1 {
        return Err(FederationError::DocumentCount {
            source_name: source_name.to_string(),
            count: docs.len(),
        });
    }
    let doc = docs.remove(0);
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "VirtualMesh" {
        return Err(PolicyLoadError::WrongKind {
            source_name: source_name.to_string(),
            index: 1,
            kind: kind.to_string(),
        }
        .into());
    }
    Ok(crate::policy::virtual_mesh::typed_document(yaml, 1, doc).map_err(yaml_error)?)
}

impl FederationConfig {
    /// Validates a VirtualMesh for federation: everything the signer checks (so a document
    /// the signer would refuse is refused here too), then the federation options. Options
    /// meshca does not implement are errors, never silently ignored.
    pub fn from_document(
        doc: &VirtualMeshDocument,
        source_name: &str,
    ) -> Result<FederationConfig, FederationError> {
        let policy = doc.clone().into_policy(source_name)?;
        let id = policy.id;
        let unsupported = |problem: String| FederationError::Unsupported {
            source_name: source_name.to_string(),
            virtual_mesh: id.to_string(),
            problem,
        };
        for (what, value) in [("name", &id.name), ("namespace", &id.namespace)] {
            if value.len() > 63 {
                return Err(unsupported(format!(
                    "metadata.{what} is longer than 63 characters; federation labels every object with it, and a label value holds at most 63"
                )));
            }
        }
        if doc.spec.enforce_access_control == Some(true) {
            return Err(unsupported(
                "spec.enforceAccessControl: true is not supported: meshca creates no authorization policies, so access would not be enforced; set it to false".into(),
            ));
        }
        let host_suffix = match doc
            .spec
            .federation
            .as_ref()
            .and_then(|f| f.host_suffix.as_ref())
        {
            None => DEFAULT_HOST_SUFFIX.to_string(),
            Some(suffix) => {
                check_host_suffix(suffix).map_err(|problem| FederationError::HostSuffix {
                    source_name: source_name.to_string(),
                    virtual_mesh: id.to_string(),
                    problem,
                })?;
                suffix.clone()
            }
        };
        let (mode, selector) = match &doc.spec.federation {
            None => (None, ServiceSelector::default()),
            Some(federation) => {
                if let Some(key) = federation.other.keys().next() {
                    return Err(unsupported(format!(
                        "spec.federation.{key} is not supported (known: mode, selector, hostSuffix)"
                    )));
                }
                match federation.mode.as_deref() {
                    None | Some("PERMISSIVE") => {}
                    Some(other) => {
                        return Err(unsupported(format!(
                            "spec.federation.mode {other:?} is not supported: meshca implements PERMISSIVE (every selected service of every member is offered to every other member)"
                        )));
                    }
                }
                let selector = match &federation.selector {
                    None => ServiceSelector::default(),
                    Some(value) => {
                        let selector_error = |problem: String| FederationError::Selector {
                            source_name: source_name.to_string(),
                            virtual_mesh: id.to_string(),
                            problem,
                        };
                        let selector: ServiceSelector = serde_json::from_value(value.clone())
                            .map_err(|e| selector_error(e.to_string()))?;
                        selector.check().map_err(selector_error)?;
                        selector
                    }
                };
                (Some(FederationMode::Permissive), selector)
            }
        };
        Ok(FederationConfig {
            virtual_mesh: id,
            members: policy.meshes,
            mode,
            selector,
            host_suffix,
        })
    }

    /// The Gateway's and the DestinationRule's host: every federated host.
    pub fn wildcard_host(&self) -> String {
        format!("*.{}", self.host_suffix)
    }

    /// The labels every federation object of this VirtualMesh carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
            (
                LABEL_VIRTUAL_MESH.to_string(),
                self.virtual_mesh.name.clone(),
            ),
            (
                LABEL_VIRTUAL_MESH_NAMESPACE.to_string(),
                self.virtual_mesh.namespace.clone(),
            ),
        ])
    }

    /// Kubernetes label selector for listing this VirtualMesh's objects in a cluster (the
    /// `existing` argument of [`FederationPlan::stale_objects`]).
    pub fn label_selector(&self) -> String {
        format!(
            "{LABEL_VIRTUAL_MESH}={},{LABEL_VIRTUAL_MESH_NAMESPACE}={}",
            self.virtual_mesh.name, self.virtual_mesh.namespace
        )
    }

    /// Name of the Gateway and of the DestinationRule in each cluster.
    pub fn object_name(&self) -> String {
        format!("{}-federation", self.virtual_mesh.name)
    }
}

/// A service one cluster offers the others.
#[derive(Debug)]
struct Export<'a> {
    service: &'a ServiceInventory,
    /// `<name>.<namespace>.svc.<cluster>.<suffix>`: also the ServiceEntries' name.
    host: String,
    address: Ipv4Addr,
}

#[derive(Debug)]
struct ClusterPlan<'a> {
    inventory: &'a ClusterInventory,
    resolution: Resolution,
    /// Sorted by (namespace, name).
    exports: Vec<Export<'a>>,
    /// Services this cluster gets from the others.
    imports: usize,
}

/// Counts for one cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterSummary {
    pub exported: usize,
    pub imported: usize,
    pub objects: usize,
}

/// What every member cluster must hold for one VirtualMesh. Borrows the inventory.
#[derive(Debug)]
pub struct FederationPlan<'a> {
    config: &'a FederationConfig,
    labels: BTreeMap<String, String>,
    object_name: String,
    /// `*.<suffix>`.
    wildcard_host: String,
    /// Sorted by cluster name.
    clusters: Vec<ClusterPlan<'a>>,
    moved_addresses: usize,
}

/// Computes the federation of `config` over `inventory`.
///
/// Errors: an invalid inventory, a member mesh without a cluster, a cluster whose mesh is
/// not a member, a host suffix whose wildcard would match a member's cluster-local names
/// (see [`cluster_local_overlap`]), an exporting cluster without gateway addresses.
pub fn translate<'a>(
    config: &'a FederationConfig,
    inventory: &'a Inventory,
) -> Result<FederationPlan<'a>, FederationError> {
    inventory.validate()?;
    for cluster in &inventory.clusters {
        if !config.members.contains(&cluster.mesh) {
            return Err(FederationError::NotAMember {
                cluster: cluster.name.clone(),
                mesh: cluster.mesh.to_string(),
                virtual_mesh: config.virtual_mesh.to_string(),
            });
        }
    }
    let present: HashSet<&ObjectRef> = inventory.clusters.iter().map(|c| &c.mesh).collect();
    if let Some(missing) = config.members.iter().find(|m| !present.contains(m)) {
        return Err(FederationError::UnknownMember {
            virtual_mesh: config.virtual_mesh.to_string(),
            mesh: missing.to_string(),
        });
    }

    for cluster in &inventory.clusters {
        let domain = &cluster.cluster_domain;
        let suffix = &config.host_suffix;
        if let Some((why, taken)) = cluster_local_overlap(suffix, domain) {
            return Err(FederationError::HostSuffixTakesClusterLocalNames {
                cluster: cluster.name.clone(),
                cluster_domain: domain.clone(),
                host_suffix: suffix.clone(),
                why,
                taken,
            });
        }
    }

    let mut sorted: Vec<&ClusterInventory> = inventory.clusters.iter().collect();
    sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    // With fewer than two members there is no one to offer anything to.
    let federating = config.mode.is_some() && sorted.len() > 1;

    let mut selected: Vec<Vec<&ServiceInventory>> = Vec::with_capacity(sorted.len());
    for cluster in &sorted {
        let mut services: Vec<&ServiceInventory> = if federating {
            cluster
                .services
                .iter()
                .filter(|s| config.selector.matches(s))
                .collect()
        } else {
            Vec::new()
        };
        services.sort_unstable_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if !services.is_empty() && cluster.gateway_addresses.is_empty() {
            return Err(FederationError::NoGateway {
                cluster: cluster.name.clone(),
                services: services.len(),
            });
        }
        selected.push(services);
    }

    let total: usize = selected.iter().map(Vec::len).sum();
    let mut keys = Vec::with_capacity(total);
    for (cluster, services) in sorted.iter().zip(&selected) {
        keys.extend(services.iter().map(|s| AddressKey {
            cluster: &cluster.name,
            namespace: &s.namespace,
            name: &s.name,
        }));
    }
    let allocated = address::allocate(&keys)?;
    let moved_addresses = allocated.iter().filter(|a| a.probe > 0).count();
    drop(keys);

    // `allocated` is index-aligned with `keys`: cluster by cluster, service by service.
    let mut allocated = allocated.into_iter();
    let mut clusters = Vec::with_capacity(sorted.len());
    for (cluster, services) in sorted.into_iter().zip(selected) {
        let exports = services
            .into_iter()
            .zip(allocated.by_ref())
            .map(|(service, allocated)| Export {
                host: federated_host(service, &cluster.name, &config.host_suffix),
                address: allocated.address,
                service,
            })
            .collect();
        clusters.push(ClusterPlan {
            inventory: cluster,
            resolution: cluster.gateway_resolution()?,
            exports,
            imports: 0,
        });
    }
    for cluster in &mut clusters {
        cluster.imports = total - cluster.exports.len();
    }
    Ok(FederationPlan {
        config,
        labels: config.labels(),
        object_name: config.object_name(),
        wildcard_host: config.wildcard_host(),
        clusters,
        moved_addresses,
    })
}

/// `name` is `parent` or under it, label by label (`xcluster.local` is not under
/// `cluster.local`).
fn is_at_or_under(name: &str, parent: &str) -> bool {
    name == parent
        || name
            .strip_suffix(parent)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Whether `*.<suffix>` (the federation Gateway's and DestinationRule's host) would match
/// names a cluster with clusterDomain `domain` gives its own Services: how the suffix sits
/// and what it would take, or None.
///
/// Istio's `*.S` matches every name ending in `.S`. Cluster-local names are
/// `<service>.<namespace>.svc.<domain>` and, for a headless Service's pods,
/// `<pod>.<service>.<namespace>.svc.<domain>`. So S must not be the domain or a parent of
/// it, nor `svc.<domain>` or anything under it: deeper suffixes match no name Kubernetes
/// defines today, but the federated hosts would then sit in the zone the cluster's DNS
/// answers for (with NXDOMAIN when Istio's DNS proxy is bypassed). A sibling such as
/// `global.<domain>` matches no cluster-local name and stays allowed.
fn cluster_local_overlap(suffix: &str, domain: &str) -> Option<(String, String)> {
    if is_at_or_under(domain, suffix) {
        return Some((
            "is that domain or a parent of it".to_string(),
            format!("every cluster-local Service (<service>.<namespace>.svc.{domain})"),
        ));
    }
    let services = format!("svc.{domain}");
    if !is_at_or_under(suffix, &services) {
        return None;
    }
    // The labels in front of `svc.<domain>`, nearest first: namespace, service, ...
    let above = suffix[..suffix.len() - services.len()].trim_end_matches('.');
    let mut labels = above.rsplit('.').filter(|l| !l.is_empty());
    let taken = match (labels.next(), labels.next(), labels.next()) {
        (None, ..) => format!("every cluster-local Service (<service>.<namespace>.{suffix})"),
        (Some(namespace), None, _) => {
            format!("every Service of namespace {namespace} (<service>.{suffix})")
        }
        (Some(namespace), Some(service), None) => format!(
            "the pods of headless Service {service} in namespace {namespace} (<pod>.{suffix})"
        ),
        (Some(_), Some(_), Some(_)) => {
            format!("names in the zone svc.{domain}, which the cluster's DNS answers for Services")
        }
    };
    let why = format!("is {services}, where its Services are named, or under it");
    Some((why, taken))
}

/// Longest SNI Envoy takes (`UpstreamTlsContext.sni`: at most 255 bytes): a longer one
/// makes every importing sidecar refuse the cluster (a NACK at each push).
pub const MAX_SNI_LEN: usize = 255;

/// Why `service` of `cluster` cannot be federated under `suffix`, if it cannot: the SNI a
/// client sends for its highest port, `outbound_.<port>_._.<host>` (what the exporting
/// gateway routes by), would be longer than Envoy takes. The suffix's own bound keeps the
/// host within 253; a host near that, with the SNI's 19 more, is not.
pub fn sni_problem(service: &ServiceInventory, cluster: &str, suffix: &str) -> Option<String> {
    let host = federated_host(service, cluster, suffix);
    let port = service.ports.iter().map(|p| p.number).max()?;
    let sni = format!("outbound_.{port}_._.{host}");
    (sni.len() > MAX_SNI_LEN).then(|| {
        format!(
            "the SNI its clients would send, outbound_.{port}_._.{host}, is {} bytes, over the {MAX_SNI_LEN} Envoy takes: shorten its name, its namespace's, the cluster's or the hostSuffix",
            sni.len()
        )
    })
}

fn federated_host(service: &ServiceInventory, cluster: &str, suffix: &str) -> String {
    let mut host = String::with_capacity(
        service.name.len() + service.namespace.len() + cluster.len() + suffix.len() + 7,
    );
    for part in [
        service.name.as_str(),
        ".",
        &service.namespace,
        ".svc.",
        cluster,
        ".",
        suffix,
    ] {
        host.push_str(part);
    }
    host
}

impl<'a> FederationPlan<'a> {
    pub fn config(&self) -> &FederationConfig {
        self.config
    }

    /// Cluster names, sorted.
    pub fn clusters(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.clusters.iter().map(|c| c.inventory.name.as_str())
    }

    /// How many services did not get their plain-hash address because another service
    /// already had it (see [`super::address`]).
    pub fn moved_addresses(&self) -> usize {
        self.moved_addresses
    }

    fn cluster(&self, name: &str) -> Option<&ClusterPlan<'a>> {
        self.clusters
            .binary_search_by(|c| c.inventory.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.clusters[i])
    }

    pub fn summary(&self, cluster: &str) -> Option<ClusterSummary> {
        let plan = self.cluster(cluster)?;
        let exported = plan.exports.len();
        Some(ClusterSummary {
            exported,
            imported: plan.imports,
            objects: usize::from(exported > 0)
                + usize::from(plan.imports > 0)
                + exported
                + plan.imports,
        })
    }

    /// Every object `cluster` must hold, in a fixed order: the Gateway, the
    /// DestinationRule, then ServiceEntries by (source cluster, namespace, name). None for a
    /// cluster outside the plan.
    pub fn objects<'s>(
        &'s self,
        cluster: &str,
    ) -> Option<impl Iterator<Item = DesiredObject<'s>> + use<'s, 'a>> {
        let plan: &'s FederationPlan<'s> = self;
        let target = plan.cluster(cluster)?;
        let gateway = (!target.exports.is_empty()).then_some(What::Gateway);
        let rule = (target.imports > 0).then_some(What::DestinationRule);
        let entries = plan.clusters.iter().flat_map(move |source| {
            source.exports.iter().map(move |export| {
                if std::ptr::eq(source, target) {
                    What::LocalServiceEntry(export)
                } else {
                    What::RemoteServiceEntry(source, export)
                }
            })
        });
        Some(
            gateway
                .into_iter()
                .chain(rule)
                .chain(entries)
                .map(move |what| DesiredObject { plan, target, what }),
        )
    }

    /// Of the objects found in `cluster` with this VirtualMesh's labels, those to delete:
    /// every one the plan does not list (all of them for a cluster outside the plan).
    pub fn stale_objects<'e>(&self, cluster: &str, existing: &'e [ObjectId]) -> Vec<&'e ObjectId> {
        let mut stale = match self.objects(cluster) {
            Some(desired) => stale_objects(existing, desired),
            None => existing.iter().collect(),
        };
        stale.sort();
        stale.dedup();
        stale
    }
}

/// Of `existing` (objects labelled for a VirtualMesh in one cluster), those not in
/// `desired`, in the order given.
pub fn stale_objects<'e, 'p>(
    existing: &'e [ObjectId],
    desired: impl IntoIterator<Item = DesiredObject<'p>>,
) -> Vec<&'e ObjectId> {
    let wanted: HashSet<(Kind, &str, &str)> = desired.into_iter().map(|d| d.key()).collect();
    existing
        .iter()
        .filter(|e| !wanted.contains(&(e.kind, e.namespace.as_str(), e.name.as_str())))
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum What<'p> {
    Gateway,
    DestinationRule,
    /// The exporting cluster's own entry for one of its services (see the module doc).
    LocalServiceEntry(&'p Export<'p>),
    /// Another cluster's service, imported.
    RemoteServiceEntry(&'p ClusterPlan<'p>, &'p Export<'p>),
}

/// One object a cluster must hold: cheap to list and compare, built on demand.
#[derive(Clone, Copy)]
pub struct DesiredObject<'p> {
    plan: &'p FederationPlan<'p>,
    target: &'p ClusterPlan<'p>,
    what: What<'p>,
}

impl std::fmt::Debug for DesiredObject<'_> {
    // Not derived: that would print the whole plan.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DesiredObject({}: {} {}/{})",
            self.cluster(),
            self.kind(),
            self.namespace(),
            self.name()
        )
    }
}

impl<'p> DesiredObject<'p> {
    pub fn kind(&self) -> Kind {
        match self.what {
            What::Gateway => Kind::Gateway,
            What::DestinationRule => Kind::DestinationRule,
            What::LocalServiceEntry(_) | What::RemoteServiceEntry(..) => Kind::ServiceEntry,
        }
    }

    pub fn namespace(&self) -> &'p str {
        &self.target.inventory.istio_namespace
    }

    pub fn name(&self) -> &'p str {
        match self.what {
            What::Gateway | What::DestinationRule => &self.plan.object_name,
            What::LocalServiceEntry(export) | What::RemoteServiceEntry(_, export) => &export.host,
        }
    }

    /// For a ServiceEntry, the cluster whose service it is (the target cluster itself for
    /// the entry that lets its gateway route the service).
    pub fn source_cluster(&self) -> Option<&'p str> {
        match self.what {
            What::Gateway | What::DestinationRule => None,
            What::LocalServiceEntry(_) => Some(&self.target.inventory.name),
            What::RemoteServiceEntry(source, _) => Some(&source.inventory.name),
        }
    }

    /// The cluster this object goes to.
    pub fn cluster(&self) -> &'p str {
        &self.target.inventory.name
    }

    fn key(&self) -> (Kind, &'p str, &'p str) {
        (self.kind(), self.namespace(), self.name())
    }

    pub fn id(&self) -> ObjectId {
        ObjectId {
            kind: self.kind(),
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
        }
    }

    fn meta(&self, source_cluster: Option<&str>) -> ObjectMeta {
        let mut labels = self.plan.labels.clone();
        if let Some(cluster) = source_cluster {
            labels.insert(LABEL_SOURCE_CLUSTER.to_string(), cluster.to_string());
        }
        ObjectMeta {
            name: self.name().to_string(),
            namespace: self.namespace().to_string(),
            labels,
        }
    }

    /// The full object, ready to apply or print.
    pub fn to_object(&self) -> IstioObject {
        match self.what {
            What::Gateway => IstioObject::Gateway(self.gateway()),
            What::DestinationRule => IstioObject::DestinationRule(self.destination_rule()),
            What::LocalServiceEntry(export) => IstioObject::ServiceEntry(self.local_entry(export)),
            What::RemoteServiceEntry(source, export) => {
                IstioObject::ServiceEntry(self.remote_entry(source, export))
            }
        }
    }

    fn resource<S>(&self, kind: Kind, metadata: ObjectMeta, spec: S) -> Resource<S> {
        Resource {
            api_version: API_VERSION.to_string(),
            kind: kind.as_str().to_string(),
            metadata,
            spec,
        }
    }

    fn gateway(&self) -> Gateway {
        let spec = GatewaySpec {
            selector: BTreeMap::from([(
                GATEWAY_SELECTOR.0.to_string(),
                GATEWAY_SELECTOR.1.to_string(),
            )]),
            servers: vec![Server {
                port: GatewayPort {
                    number: u32::from(self.target.inventory.gateway_port),
                    name: "tls".into(),
                    protocol: "TLS".into(),
                },
                hosts: vec![self.plan.wildcard_host.clone()],
                tls: Some(ServerTlsSettings {
                    mode: ServerTlsMode::AutoPassthrough,
                }),
            }],
        };
        self.resource(Kind::Gateway, self.meta(None), spec)
    }

    fn destination_rule(&self) -> DestinationRule {
        let spec = DestinationRuleSpec {
            host: self.plan.wildcard_host.clone(),
            traffic_policy: Some(TrafficPolicy {
                tls: Some(ClientTlsSettings {
                    mode: ClientTlsMode::IstioMutual,
                }),
            }),
            // Every client namespace needs it, whatever the mesh's
            // defaultDestinationRuleExportTo: without it a client sends plain text.
            export_to: vec![EXPORT_TO_ALL.into()],
        };
        self.resource(Kind::DestinationRule, self.meta(None), spec)
    }

    /// S's ports. `with_target_ports`: for the exporting cluster's own entry, whose
    /// endpoint is S's cluster-local name: for a headless S that name resolves to pod
    /// addresses, where nothing maps the Service port to the targetPort, so the gateway
    /// must dial the targetPort itself. Imported entries map every port to the gateway.
    fn ports(service: &ServiceInventory, with_target_ports: bool) -> Vec<ServicePort> {
        service
            .ports
            .iter()
            .map(|p| ServicePort {
                number: u32::from(p.number),
                protocol: p.protocol().as_str().to_string(),
                name: p.name(),
                target_port: p.target_port.filter(|_| with_target_ports).map(u32::from),
            })
            .collect()
    }

    fn remote_entry(&self, source: &ClusterPlan<'_>, export: &Export<'_>) -> ServiceEntry {
        let service = export.service;
        let ports = Self::ports(service, false);
        let gateway_port = u32::from(source.inventory.gateway_port);
        // Every service port arrives on the gateway's TLS port; the SNI says which.
        let endpoint_ports: BTreeMap<String, u32> = ports
            .iter()
            .map(|p| (p.name.clone(), gateway_port))
            .collect();
        let addresses = &source.inventory.gateway_addresses;
        let mut endpoints = Vec::with_capacity(addresses.len());
        let mut endpoint_ports = Some(endpoint_ports);
        for (i, address) in addresses.iter().enumerate() {
            // The last endpoint takes the map, the others a copy.
            let ports = if i + 1 == addresses.len() {
                endpoint_ports.take().unwrap_or_default()
            } else {
                endpoint_ports.clone().unwrap_or_default()
            };
            endpoints.push(WorkloadEntry {
                address: address.clone(),
                ports,
                labels: service.labels.clone(),
            });
        }
        let spec = ServiceEntrySpec {
            hosts: vec![export.host.clone()],
            addresses: vec![export.address.to_string()],
            ports,
            location: Some(Location::MeshInternal),
            resolution: Some(source.resolution),
            endpoints,
            // Every client namespace, whatever the mesh's defaultServiceExportTo.
            export_to: vec![EXPORT_TO_ALL.into()],
        };
        let meta = self.meta(Some(&source.inventory.name));
        self.resource(Kind::ServiceEntry, meta, spec)
    }

    fn local_entry(&self, export: &Export<'_>) -> ServiceEntry {
        let service = export.service;
        let cluster = self.target.inventory;
        let spec = ServiceEntrySpec {
            hosts: vec![export.host.clone()],
            addresses: Vec::new(),
            ports: Self::ports(service, true),
            location: Some(Location::MeshInternal),
            resolution: Some(Resolution::Dns),
            endpoints: vec![WorkloadEntry {
                address: format!(
                    "{}.{}.svc.{}",
                    service.name, service.namespace, cluster.cluster_domain
                ),
                ports: BTreeMap::new(),
                labels: service.labels.clone(),
            }],
            // Only the gateway (in the Istio namespace) needs it; sidecars keep using the
            // cluster-local name.
            export_to: vec![".".into()],
        };
        let meta = self.meta(Some(&cluster.name));
        self.resource(Kind::ServiceEntry, meta, spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(federation: &str, meshes: &[&str]) -> String {
        let mut out = format!(
            "kind: VirtualMesh\nmetadata: {{name: vm, namespace: ns}}\nspec:\n  certificateAuthority:\n    builtin: {{ttlDays: 10, rsaKeySizeBytes: 2048, orgName: o}}\n{federation}  meshes:\n"
        );
        for mesh in meshes {
            out.push_str(&format!("  - {{name: {mesh}, namespace: ns}}\n"));
        }
        out
    }

    fn config(federation: &str, meshes: &[&str]) -> Result<FederationConfig, FederationError> {
        let doc = parse_virtual_mesh("vm.yaml", &vm(federation, meshes))?;
        FederationConfig::from_document(&doc, "vm.yaml")
    }

    fn inventory(yaml: &str) -> Inventory {
        Inventory::from_yaml("inv.yaml", yaml).unwrap()
    }

    #[test]
    fn selector_is_checked_and_matches_namespaces_and_labels() {
        for (selector, needle) in [
            ("{namespaces: [Bad_NS]}", "namespaces: \"Bad_NS\""),
            ("{matchLabels: {'a b': c}}", "matchLabels"),
            ("[a]", "spec.federation.selector"),
        ] {
            let err = config(
                &format!("  federation:\n    selector: {selector}\n"),
                &["a"],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
            assert!(err.contains("VirtualMesh ns/vm"), "{err}");
        }
        let c = config(
            "  federation:\n    selector: {namespaces: [x], matchLabels: {k: v}}\n",
            &["a"],
        )
        .unwrap();
        assert_eq!(c.mode, Some(FederationMode::Permissive));
        let service = |namespace: &str, labels: &[(&str, &str)]| ServiceInventory {
            name: "s".into(),
            namespace: namespace.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            headless: false,
            ports: Vec::new(),
        };
        assert!(c.selector.matches(&service("x", &[("k", "v"), ("o", "p")])));
        assert!(!c.selector.matches(&service("y", &[("k", "v")])));
        assert!(!c.selector.matches(&service("x", &[("k", "w")])));
        assert!(!c.selector.matches(&service("x", &[])));
        assert!(ServiceSelector::default().matches(&service("any", &[])));
    }

    #[test]
    fn federation_mode_defaults_and_absence() {
        // `federation: {}`: the seed's only mode.
        let c = config("  federation: {}\n", &["a"]).unwrap();
        assert_eq!(c.mode, Some(FederationMode::Permissive));
        let c = config("", &["a"]).unwrap();
        assert_eq!(c.mode, None);
        let err = config("  federation: {mode: permissive}\n", &["a"]).unwrap_err();
        assert!(err.to_string().contains("PERMISSIVE"), "{err}");
    }

    const TWO: &str = "\
clusters:
- name: a
  mesh: ns/a
  trustDomain: a.local
  services:
  - {name: s, namespace: n, ports: [{number: 80}]}
- name: b
  mesh: ns/b
  trustDomain: b.local
";

    #[test]
    fn an_exporting_cluster_needs_a_gateway() {
        let c = config("  federation: {}\n", &["a", "b"]).unwrap();
        let inv = inventory(TWO);
        let err = translate(&c, &inv).unwrap_err().to_string();
        assert!(
            err.contains("cluster a exports 1 service(s) but has no gatewayAddresses"),
            "{err}"
        );
        // Nothing selected from a: no gateway needed, nothing to hold anywhere.
        let c = config(
            "  federation:\n    selector: {namespaces: [other]}\n",
            &["a", "b"],
        )
        .unwrap();
        let plan = translate(&c, &inv).unwrap();
        assert_eq!(plan.objects("a").unwrap().count(), 0);
        assert_eq!(plan.objects("b").unwrap().count(), 0);
    }

    #[test]
    fn a_lone_member_federates_nothing() {
        let c = config("  federation: {}\n", &["a"]).unwrap();
        let inv = inventory(
            "clusters:\n- name: a\n  mesh: ns/a\n  trustDomain: a.local\n  gatewayAddresses: [192.0.2.1]\n  services:\n  - {name: s, namespace: n, ports: [{number: 80}]}\n",
        );
        let plan = translate(&c, &inv).unwrap();
        assert_eq!(plan.clusters().collect::<Vec<_>>(), ["a"]);
        assert_eq!(plan.objects("a").unwrap().count(), 0);
        assert!(plan.objects("b").is_none());
        assert_eq!(plan.summary("a"), Some(ClusterSummary::default()));
    }

    #[test]
    fn hosts_end_in_a_suffix_that_is_checked_and_defaults_to_mesh_internal() {
        let inv = inventory(
            "clusters:\n- name: a\n  mesh: ns/a\n  trustDomain: a.local\n  gatewayAddresses: [192.0.2.1]\n  services:\n  - {name: s, namespace: n, ports: [{number: 80}]}\n- name: b\n  mesh: ns/b\n  trustDomain: b.local\n",
        );
        let hosts = |c: &FederationConfig| -> Vec<String> {
            let plan = translate(c, &inv).unwrap();
            let mut hosts: Vec<String> = Vec::new();
            for cluster in ["a", "b"] {
                for object in plan.objects(cluster).unwrap() {
                    match object.to_object() {
                        IstioObject::Gateway(g) => hosts.extend(g.spec.servers[0].hosts.clone()),
                        IstioObject::DestinationRule(d) => hosts.push(d.spec.host),
                        IstioObject::ServiceEntry(e) => hosts.extend(e.spec.hosts),
                    }
                }
            }
            hosts
        };
        // `.global` is a public TLD: the default is under the reserved `.internal`.
        let c = config("  federation: {}\n", &["a", "b"]).unwrap();
        assert_eq!(c.host_suffix, "mesh.internal");
        assert_eq!(
            hosts(&c),
            [
                "*.mesh.internal",
                "s.n.svc.a.mesh.internal",
                "*.mesh.internal",
                "s.n.svc.a.mesh.internal"
            ]
        );
        let c = config(
            "  federation: {hostSuffix: mesh.example.com}\n",
            &["a", "b"],
        )
        .unwrap();
        assert_eq!(
            hosts(&c)[..2],
            ["*.mesh.example.com", "s.n.svc.a.mesh.example.com"]
        );

        let longest = format!(
            "{}.{}",
            "x".repeat(28),
            "y".repeat(MAX_HOST_SUFFIX_LEN - 29)
        );
        assert!(
            config(
                &format!("  federation: {{hostSuffix: {longest}}}\n"),
                &["a"]
            )
            .is_ok()
        );
        // The longest names under the longest suffix still make a valid object name.
        let label = "z".repeat(63);
        let service = ServiceInventory {
            name: label.clone(),
            namespace: label.clone(),
            labels: BTreeMap::new(),
            headless: false,
            ports: Vec::new(),
        };
        let host = federated_host(&service, &label, &longest);
        assert_eq!(host.len(), 253);
        assert!(is_dns1123_subdomain(&host));
        // Its SNI, though, would be longer than Envoy takes: such a service is left out,
        // named; one of ordinary names is not.
        let with_port = ServiceInventory {
            ports: vec![crate::mesh::inventory::PortInventory {
                number: 8080,
                protocol: None,
                name: None,
                target_port: None,
            }],
            ..service
        };
        let problem = sni_problem(&with_port, &label, &longest).unwrap();
        assert!(
            problem.contains("is 271 bytes, over the 255 Envoy takes"),
            "{problem}"
        );
        let ordinary = ServiceInventory {
            name: "reviews".into(),
            namespace: "bookinfo".into(),
            ..with_port
        };
        assert_eq!(sni_problem(&ordinary, "east", &longest), None);

        for (suffix, needle) in [
            (".global", "is not a DNS name"),
            ("Global", "is not a DNS name"),
            ("'*.mesh'", "is not a DNS name"),
            ("a..b", "is not a DNS name"),
            ("10.0.0.1", "is not a DNS name"),
            (&format!("{}.internal", "a".repeat(64)), "is not a DNS name"),
            (&format!("y{longest}"), "more than 57"),
        ] {
            let err = config(&format!("  federation: {{hostSuffix: {suffix}}}\n"), &["a"])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("VirtualMesh ns/vm: spec.federation.hostSuffix: ")
                    && err.contains(needle),
                "{suffix}: {needle:?} not in {err:?}"
            );
        }
    }

    /// `*.<suffix>` (Gateway AUTO_PASSTHROUGH hosts, an ISTIO_MUTUAL DestinationRule
    /// exported everywhere) must match no cluster-local name `<svc>.<ns>.svc.<domain>`.
    #[test]
    fn a_host_suffix_whose_wildcard_takes_cluster_local_names_is_refused() {
        let inv = inventory(
            "clusters:\n- name: a\n  mesh: ns/a\n  trustDomain: a.local\n  gatewayAddresses: [192.0.2.1]\n  services:\n  - {name: s, namespace: n, ports: [{number: 80}]}\n- name: b\n  mesh: ns/b\n  trustDomain: b.local\n",
        );
        let translated = |suffix: &str| {
            let c = config(
                &format!("  federation: {{hostSuffix: {suffix}}}\n"),
                &["a", "b"],
            )
            .unwrap();
            translate(&c, &inv).map(|_| ()).map_err(|e| e.to_string())
        };
        for (suffix, why, taken) in [
            (
                "local",
                "is that domain or a parent of it",
                "every cluster-local Service (<service>.<namespace>.svc.cluster.local)",
            ),
            (
                "cluster.local",
                "is that domain or a parent of it",
                "every cluster-local Service (<service>.<namespace>.svc.cluster.local)",
            ),
            // The review's counterexamples: under the domain, yet `*.svc.cluster.local`
            // is every Service and `*.default.svc.cluster.local` every one of `default`.
            (
                "svc.cluster.local",
                "is svc.cluster.local, where its Services are named, or under it",
                "every cluster-local Service (<service>.<namespace>.svc.cluster.local)",
            ),
            (
                "default.svc.cluster.local",
                "is svc.cluster.local, where its Services are named, or under it",
                "every Service of namespace default (<service>.default.svc.cluster.local)",
            ),
            (
                "db.default.svc.cluster.local",
                "is svc.cluster.local, where its Services are named, or under it",
                "the pods of headless Service db in namespace default (<pod>.db.default.svc.cluster.local)",
            ),
            (
                "x.db.default.svc.cluster.local",
                "is svc.cluster.local, where its Services are named, or under it",
                "names in the zone svc.cluster.local, which the cluster's DNS answers for Services",
            ),
        ] {
            let Err(err) = translated(suffix) else {
                panic!("host suffix {suffix} accepted")
            };
            assert!(
                err.starts_with(&format!(
                    "cluster a has clusterDomain cluster.local; host suffix {suffix} {why}: the federation Gateway and DestinationRule (*.{suffix}) would take {taken}; "
                )),
                "{suffix}: {err}"
            );
        }
        // Beside the Service zone, or merely sharing letters with it: no cluster-local
        // name ends in `.<suffix>`.
        for suffix in [
            "global.cluster.local",
            "pod.cluster.local",
            "xsvc.cluster.local",
            "svc.xcluster.local",
            "svc.cluster.local.example",
            "mesh.internal",
        ] {
            assert_eq!(translated(suffix), Ok(()), "{suffix}");
        }
    }

    #[test]
    fn long_virtual_mesh_names_cannot_be_labels() {
        let long = "v".repeat(64);
        let yaml = vm("", &["a"]).replace("name: vm", &format!("name: {long}"));
        let doc = parse_virtual_mesh("vm.yaml", &yaml).unwrap();
        let err = FederationConfig::from_document(&doc, "vm.yaml").unwrap_err();
        assert!(
            err.to_string().contains("metadata.name is longer than 63"),
            "{err}"
        );
    }
}
