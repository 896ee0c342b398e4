//! The inventory federation works from: for each member cluster, its mesh, trust domain,
//! east-west gateway and the Services it has. Read from YAML by `meshca federation render`,
//! built from Mesh objects and Service lists by the controller; validated here either way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};

use super::istio::Resolution;
use super::names::{
    is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_host_name, is_label_key,
    is_label_value, is_trust_domain,
};
use crate::policy::ObjectRef;

/// Istio's port for mTLS traffic through an east-west gateway.
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;
pub const DEFAULT_ISTIO_NAMESPACE: &str = "istio-system";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Largest inventory file `federation render` reads.
pub const MAX_INVENTORY_BYTES: u64 = 64 << 20;
/// Most parser events an inventory may produce (serde-saphyr's default is 1,000,000).
pub const MAX_INVENTORY_EVENTS: usize = 40_000_000;
/// Most nodes (mappings, lists and values) an inventory may hold.
pub const MAX_INVENTORY_NODES: usize = 20_000_000;

/// `clusters: [...]`: every member cluster of one VirtualMesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub clusters: Vec<ClusterInventory>,
}

/// One member cluster (one Istio installation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInventory {
    /// Cluster name: a DNS label; it becomes part of host names and the output file name.
    pub name: String,
    /// `<namespace>/<name>` of this cluster's Mesh, as listed in the VirtualMesh.
    pub mesh: ObjectRef,
    pub trust_domain: String,
    /// Namespace of Istio's config root, where federation objects are written.
    #[serde(default = "default_istio_namespace")]
    pub istio_namespace: String,
    /// The cluster's DNS domain (kubelet `clusterDomain`).
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Addresses other clusters reach this cluster's east-west gateway at: IPs (all IPv4 or
    /// all IPv6) or DNS names.
    #[serde(default)]
    pub gateway_addresses: Vec<String>,
    /// The port clients dial at those addresses and the Gateway's server port, which Istio
    /// takes for a port of the gateway's Service: that Service's port, not a node port.
    #[serde(default = "default_gateway_port")]
    pub gateway_port: u16,
    #[serde(default)]
    pub services: Vec<ServiceInventory>,
}

// Also the defaults of a Mesh resource's same fields.
pub(crate) fn default_istio_namespace() -> String {
    DEFAULT_ISTIO_NAMESPACE.into()
}
pub(crate) fn default_cluster_domain() -> String {
    DEFAULT_CLUSTER_DOMAIN.into()
}
pub(crate) fn default_gateway_port() -> u16 {
    DEFAULT_GATEWAY_PORT
}

/// A Kubernetes Service of a member cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInventory {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `clusterIP: None`: the cluster-local name resolves to the pods' own addresses, so
    /// the exporting cluster's gateway must dial each port's `targetPort` (no kube-proxy
    /// maps the Service port there).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    pub ports: Vec<PortInventory>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortInventory {
    pub number: u16,
    /// Absent: `<protocol>-<number>`, e.g. `tcp-5432`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Absent: from the name's prefix as Istio does (`http-web` is HTTP), else TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Headless Services only: the port the pods listen on, when it differs from `number`.
    #[serde(
        default,
        rename = "targetPort",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_port: Option<u16>,
}

/// Application protocols a ServiceEntry port may carry through the mTLS gateway (all over
/// TCP: UDP and SCTP cannot cross it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    Tcp,
    Tls,
    Mongo,
    Mysql,
    Redis,
}

impl Protocol {
    const ALL: [Protocol; 10] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Mongo,
        Protocol::Mysql,
        Protocol::Redis,
    ];

    /// The spelling written into ServiceEntries (Istio parses protocols case-insensitively).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-WEB",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Mongo => "MONGO",
            Protocol::Mysql => "MYSQL",
            Protocol::Redis => "REDIS",
        }
    }

    pub fn parse(s: &str) -> Result<Protocol, String> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                if s.eq_ignore_ascii_case("udp") || s.eq_ignore_ascii_case("sctp") {
                    format!("protocol {s} cannot be federated: the east-west gateway carries mTLS over TCP only")
                } else {
                    format!(
                        "unknown protocol {s:?} (one of {})",
                        Protocol::ALL.map(Protocol::as_str).join(", ")
                    )
                }
            })
    }

    /// Istio's port-name convention: `<protocol>[-<suffix>]`; anything else is TCP.
    pub fn from_port_name(name: &str) -> Protocol {
        if name == "grpc-web" || name.starts_with("grpc-web-") {
            return Protocol::GrpcWeb;
        }
        let prefix = name.split('-').next().unwrap_or(name);
        match Protocol::parse(prefix) {
            Ok(Protocol::GrpcWeb) | Err(_) => Protocol::Tcp,
            Ok(p) => p,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Protocol::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl PortInventory {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or_else(|| match &self.name {
            Some(name) => Protocol::from_port_name(name),
            None => Protocol::Tcp,
        })
    }

    /// The port's name, or the one derived for it.
    pub fn name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!(
                "{}-{}",
                self.protocol().as_str().to_ascii_lowercase(),
                self.number
            ),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InventoryError {
    #[error("{source_name}: not a valid inventory: {message}")]
    Yaml {
        source_name: String,
        message: String,
    },
    #[error("the inventory lists no clusters")]
    Empty,
    #[error("cluster name {0:?} is listed twice")]
    DuplicateCluster(String),
    #[error("mesh {mesh} is claimed by two clusters, {first} and {second}")]
    MeshClaimedTwice {
        mesh: String,
        first: String,
        second: String,
    },
    #[error("cluster {cluster}: {problem}")]
    Cluster { cluster: String, problem: String },
    #[error("cluster {cluster}: service {service}: {problem}")]
    Service {
        cluster: String,
        service: String,
        problem: String,
    },
    #[error("cluster {cluster}: service {service} is listed twice")]
    DuplicateService { cluster: String, service: String },
}

impl Inventory {
    /// Parses and validates an inventory document.
    pub fn from_yaml(source_name: &str, yaml: &str) -> Result<Inventory, InventoryError> {
        // Large meshes make large inventories: lift the parser's event and node budget
        // (the input size is capped by the caller).
        let mut budget = crate::yaml::budget();
        budget.max_events = MAX_INVENTORY_EVENTS;
        budget.max_nodes = MAX_INVENTORY_NODES;
        let mut options = crate::yaml::options();
        options.budget = Some(budget.clone());
        let inventory: Inventory =
            serde_saphyr::from_str_with_options(yaml, options).map_err(|e| {
                InventoryError::Yaml {
                    source_name: source_name.to_string(),
                    message: crate::yaml::YamlError::new(e, &budget).to_string(),
                }
            })?;
        inventory.validate()?;
        Ok(inventory)
    }

    /// Checks every name, address, port and label, and that nothing is listed twice.
    pub fn validate(&self) -> Result<(), InventoryError> {
        if self.clusters.is_empty() {
            return Err(InventoryError::Empty);
        }
        let mut names = HashSet::with_capacity(self.clusters.len());
        let mut meshes: HashMap<&ObjectRef, &str> = HashMap::with_capacity(self.clusters.len());
        for cluster in &self.clusters {
            cluster.validate()?;
            if !names.insert(cluster.name.as_str()) {
                return Err(InventoryError::DuplicateCluster(cluster.name.clone()));
            }
            if let Some(first) = meshes.insert(&cluster.mesh, &cluster.name) {
                return Err(InventoryError::MeshClaimedTwice {
                    mesh: cluster.mesh.to_string(),
                    first: first.to_string(),
                    second: cluster.name.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterInventory> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

impl ClusterInventory {
    fn problem(&self, problem: String) -> InventoryError {
        InventoryError::Cluster {
            cluster: self.name.clone(),
            problem,
        }
    }

    pub fn validate(&self) -> Result<(), InventoryError> {
        if !is_dns1123_label(&self.name) {
            return Err(self.problem(
                "the name must be a DNS label (lowercase letters, digits and '-', at most 63): it becomes part of host names".into(),
            ));
        }
        if !is_trust_domain(&self.trust_domain) {
            return Err(self.problem(format!(
                "trustDomain {:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')",
                self.trust_domain
            )));
        }
        if !is_dns1123_label(&self.istio_namespace) {
            return Err(self.problem(format!(
                "istioNamespace {:?} is not a namespace name",
                self.istio_namespace
            )));
        }
        if !is_dns1123_subdomain(&self.cluster_domain) {
            return Err(self.problem(format!(
                "clusterDomain {:?} is not a DNS domain",
                self.cluster_domain
            )));
        }
        if self.gateway_port == 0 {
            return Err(self.problem("gatewayPort must be between 1 and 65535".into()));
        }
        self.gateway_resolution()?;
        let mut seen = HashSet::with_capacity(self.services.len());
        for service in &self.services {
            service.validate(self)?;
            if !seen.insert((service.namespace.as_str(), service.name.as_str())) {
                return Err(InventoryError::DuplicateService {
                    cluster: self.name.clone(),
                    service: format!("{}/{}", service.namespace, service.name),
                });
            }
        }
        Ok(())
    }

    /// STATIC when every gateway address is an IP, DNS when any is a host name; an address
    /// that is neither is an error, and so are IPv4 and IPv6 addresses in one list.
    pub fn gateway_resolution(&self) -> Result<Resolution, InventoryError> {
        let mut resolution = Resolution::Static;
        let mut seen = HashSet::with_capacity(self.gateway_addresses.len());
        let (mut first_v4, mut first_v6): (Option<&str>, Option<&str>) = (None, None);
        for (i, address) in self.gateway_addresses.iter().enumerate() {
            match address.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => {
                    first_v4.get_or_insert(address);
                }
                Ok(IpAddr::V6(_)) => {
                    first_v6.get_or_insert(address);
                }
                Err(_) => {}
            }
            if let (Some(v4), Some(v6)) = (first_v4, first_v6) {
                // Every importing cluster gets every address as an endpoint: one without
                // the other family would fail a share of its connections.
                return Err(self.problem(format!(
                    "gatewayAddresses mixes IPv4 ({v4}) and IPv6 ({v6}) addresses: every importing cluster gets all of them as endpoints, and one without IPv6 (or IPv4) would fail a share of its calls; list the addresses of one family, one every importing cluster can reach"
                )));
            }
            if address.parse::<IpAddr>().is_err() {
                if !is_host_name(address) {
                    let hint = if address.contains(':') && !address.contains("::") {
                        " (give the port in gatewayPort)"
                    } else {
                        ""
                    };
                    return Err(self.problem(format!(
                        "gatewayAddresses[{i}] {address:?} is neither an IP address nor a DNS name{hint}"
                    )));
                }
                resolution = Resolution::Dns;
            }
            if !seen.insert(address.to_ascii_lowercase()) {
                return Err(self.problem(format!("gatewayAddresses lists {address:?} twice")));
            }
        }
        Ok(resolution)
    }
}

impl ServiceInventory {
    pub fn validate(&self, cluster: &ClusterInventory) -> Result<(), InventoryError> {
        let problem = |problem: String| InventoryError::Service {
            cluster: cluster.name.clone(),
            service: format!("{}/{}", self.namespace, self.name),
            problem,
        };
        if !is_dns1035_label(&self.name) {
            return Err(problem(
                "the name must be a DNS-1035 label (lowercase letter first, then letters, digits, '-', at most 63)".into(),
            ));
        }
        if !is_dns1123_label(&self.namespace) {
            return Err(problem(
                "the namespace must be a DNS label (at most 63)".into(),
            ));
        }
        for (key, value) in &self.labels {
            if !is_label_key(key) {
                return Err(problem(format!(
                    "label key {key:?} is not a valid label key"
                )));
            }
            if !is_label_value(value) {
                return Err(problem(format!(
                    "label {key}: value {value:?} is not a valid label value (at most 63 of letters, digits, '-', '_', '.')"
                )));
            }
        }
        if self.ports.is_empty() {
            return Err(problem(
                "has no ports: a ServiceEntry needs at least one".into(),
            ));
        }
        let mut numbers = HashSet::with_capacity(self.ports.len());
        let mut names = HashSet::with_capacity(self.ports.len());
        for port in &self.ports {
            if port.number == 0 {
                return Err(problem("port number 0 is not a port".into()));
            }
            match port.target_port {
                Some(0) => {
                    return Err(problem(format!(
                        "port {}: targetPort 0 is not a port",
                        port.number
                    )));
                }
                // A ClusterIP Service's gateway dials the Service port, which kube-proxy
                // maps: a targetPort there would bypass that mapping.
                Some(_) if !self.headless => {
                    return Err(problem(format!(
                        "port {}: targetPort is for headless Services only (set headless: true if it has clusterIP: None)",
                        port.number
                    )));
                }
                _ => {}
            }
            if let Some(name) = &port.name
                && !is_dns1123_label(name)
            {
                return Err(problem(format!(
                    "port {}: name {name:?} is not a DNS label",
                    port.number
                )));
            }
            if !numbers.insert(port.number) {
                return Err(problem(format!("port {} is listed twice", port.number)));
            }
            let name = match &port.name {
                Some(name) => std::borrow::Cow::Borrowed(name.as_str()),
                None => std::borrow::Cow::Owned(port.name()),
            };
            if !names.insert(name.clone()) {
                return Err(problem(format!("port name {name:?} is used twice")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
clusters:
- name: east
  mesh: smh/east-mesh
  trustDomain: east.local
  gatewayAddresses: [192.0.2.10, 192.0.2.11]
  services:
  - name: reviews
    namespace: default
    labels: {app: reviews}
    ports:
    - {number: 9080, name: http}
    - {number: 5432}
    - {number: 7000, name: grpc-web, protocol: grpc-web}
- name: west
  mesh: smh/west-mesh
  trustDomain: west.local
  gatewayAddresses: [gw.west.example.com]
  gatewayPort: 443
";

    #[test]
    fn good_inventory_loads_with_defaults() {
        let inv = Inventory::from_yaml("inv.yaml", GOOD).unwrap();
        let east = inv.cluster("east").unwrap();
        assert_eq!(east.gateway_port, DEFAULT_GATEWAY_PORT);
        assert_eq!(east.istio_namespace, "istio-system");
        assert_eq!(east.cluster_domain, "cluster.local");
        assert_eq!(east.gateway_resolution().unwrap(), Resolution::Static);
        // One family, whichever.
        let mut v6 = east.clone();
        v6.gateway_addresses = vec!["2001:db8::1".into(), "2001:db8::2".into()];
        assert_eq!(v6.gateway_resolution().unwrap(), Resolution::Static);
        let ports = &east.services[0].ports;
        assert_eq!(ports[0].protocol(), Protocol::Http);
        assert_eq!(ports[1].protocol(), Protocol::Tcp);
        assert_eq!(ports[1].name(), "tcp-5432");
        assert_eq!(ports[2].protocol(), Protocol::GrpcWeb);
        let west = inv.cluster("west").unwrap();
        assert_eq!(west.gateway_port, 443);
        assert_eq!(west.gateway_resolution().unwrap(), Resolution::Dns);
    }

    #[test]
    fn protocols_follow_istio_port_naming() {
        for (name, protocol) in [
            ("http", Protocol::Http),
            ("http-web", Protocol::Http),
            ("http2", Protocol::Http2),
            ("grpc-api", Protocol::Grpc),
            ("grpc-web-x", Protocol::GrpcWeb),
            ("tls-db", Protocol::Tls),
            ("mongo", Protocol::Mongo),
            ("web", Protocol::Tcp),
            ("udp-dns", Protocol::Tcp),
        ] {
            assert_eq!(Protocol::from_port_name(name), protocol, "{name}");
        }
    }

    fn refused(from: &str, to: &str, needle: &str) {
        assert!(GOOD.contains(from), "{from:?} not in the base inventory");
        let yaml = GOOD.replacen(from, to, 1);
        let err = Inventory::from_yaml("inv.yaml", &yaml)
            .expect_err(&format!("accepted with {to:?}"))
            .to_string();
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }

    #[test]
    fn bad_inventories_are_refused_naming_the_problem() {
        refused(
            "name: east\n",
            "name: East\n",
            "cluster East: the name must be a DNS label",
        );
        refused("name: west\n", "name: east\n", "\"east\" is listed twice");
        refused(
            "smh/west-mesh",
            "smh/east-mesh",
            "mesh smh/east-mesh is claimed by two clusters, east and west",
        );
        refused("smh/west-mesh", "west-mesh", "<namespace>/<name>");
        refused("east.local", "East", "cluster east: trustDomain \"East\"");
        refused(
            "192.0.2.10,",
            "192.0.2.300,",
            "gatewayAddresses[0] \"192.0.2.300\" is neither an IP address nor a DNS name",
        );
        refused(
            "192.0.2.10,",
            "'192.0.2.10:15443',",
            "(give the port in gatewayPort)",
        );
        refused(
            "192.0.2.10, 192.0.2.11",
            "192.0.2.10, 192.0.2.10",
            "lists \"192.0.2.10\" twice",
        );
        refused(
            "192.0.2.10, 192.0.2.11",
            "192.0.2.10, gw.example.com, 2001:db8::1",
            "cluster east: gatewayAddresses mixes IPv4 (192.0.2.10) and IPv6 (2001:db8::1) addresses",
        );
        refused(
            "gatewayPort: 443",
            "gatewayPort: 0",
            "gatewayPort must be between 1 and 65535",
        );
        refused("gatewayPort: 443", "gatewayPort: 70000", "inv.yaml");
        refused(
            "name: reviews",
            "name: Reviews",
            "service default/Reviews: the name must be a DNS-1035 label",
        );
        refused(
            "namespace: default",
            "namespace: de_fault",
            "the namespace must be a DNS label",
        );
        refused(
            "{app: reviews}",
            "{'app/x/y': reviews}",
            "label key \"app/x/y\"",
        );
        refused("{app: reviews}", "{app: 'a b'}", "label app: value \"a b\"");
        refused(
            "{number: 5432}",
            "{number: 9080}",
            "port 9080 is listed twice",
        );
        refused(
            "{number: 5432}",
            "{number: 5432, name: http}",
            "port name \"http\" is used twice",
        );
        refused(
            "{number: 5432}",
            "{number: 5432, name: Db}",
            "port 5432: name \"Db\" is not a DNS label",
        );
        refused(
            "{number: 5432}",
            "{number: 5432, protocol: UDP}",
            "protocol UDP cannot be federated",
        );
        refused(
            "{number: 5432}",
            "{number: 5432, protocol: quic}",
            "unknown protocol \"quic\"",
        );
        refused("{number: 5432}", "{number: 0}", "port number 0");
        refused(
            "{number: 5432}",
            "{number: 5432, targetPort: 15432}",
            "port 5432: targetPort is for headless Services only",
        );
        refused(
            "{number: 5432}",
            "{number: 5432, targetPort: 0}",
            "port 5432: targetPort 0 is not a port",
        );
        refused(
            "  trustDomain: west.local\n",
            "  trustDomain: west.local\n  region: eu\n",
            "region",
        );
        refused(
            "    ports:\n    - {number: 9080, name: http}\n    - {number: 5432}\n    - {number: 7000, name: grpc-web, protocol: grpc-web}\n",
            "    ports: []\n",
            "has no ports",
        );
        refused(
            "  services:\n  - name: reviews\n",
            "  services:\n  - name: reviews\n    namespace: default\n    ports: [{number: 1}]\n  - name: reviews\n",
            "service default/reviews is listed twice",
        );
        let err = Inventory::from_yaml("inv.yaml", "clusters: []\n").unwrap_err();
        assert_eq!(err, InventoryError::Empty);
    }
}
