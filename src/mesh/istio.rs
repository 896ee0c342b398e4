//! The Istio objects federation produces, as typed serde structs (networking.istio.io/v1), and
//! the identity (kind, namespace, name) the garbage collector compares them by.
//!
//! v1 rather than v1beta1: it is the stable API with Istio's deprecation guarantees, served by
//! every Istio release since 1.22 (all releases still supported); the fields used here are
//! identical in both versions, so [`API_VERSION`] is the only thing to change for an older
//! control plane.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// apiVersion of every object produced.
pub const API_VERSION: &str = "networking.istio.io/v1";

/// The kinds federation creates, in the order they are written out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Gateway,
    DestinationRule,
    ServiceEntry,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Gateway, Kind::DestinationRule, Kind::ServiceEntry];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "Gateway",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
        }
    }

    /// The resource name in REST paths: `/apis/networking.istio.io/v1/namespaces/<ns>/<plural>`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Gateway => "gateways",
            Kind::DestinationRule => "destinationrules",
            Kind::ServiceEntry => "serviceentries",
        }
    }

    pub fn parse(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which object, in one cluster: what the garbage collector compares.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The part of Kubernetes' ObjectMeta these objects use (others are ignored when reading).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A namespaced Istio resource: apiVersion, kind, metadata and a typed spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
}

pub type ServiceEntry = Resource<ServiceEntrySpec>;
pub type Gateway = Resource<GatewaySpec>;
pub type DestinationRule = Resource<DestinationRuleSpec>;

/// Any object federation produces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IstioObject {
    Gateway(Gateway),
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectParseError {
    #[error("object has kind {0:?}, not one federation produces")]
    UnknownKind(String),
    #[error("{kind}: {message}")]
    Invalid { kind: Kind, message: String },
}

impl IstioObject {
    pub fn kind(&self) -> Kind {
        match self {
            IstioObject::Gateway(_) => Kind::Gateway,
            IstioObject::DestinationRule(_) => Kind::DestinationRule,
            IstioObject::ServiceEntry(_) => Kind::ServiceEntry,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            IstioObject::Gateway(o) => &o.metadata,
            IstioObject::DestinationRule(o) => &o.metadata,
            IstioObject::ServiceEntry(o) => &o.metadata,
        }
    }

    pub fn id(&self) -> ObjectId {
        let meta = self.metadata();
        ObjectId {
            kind: self.kind(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }

    /// Reads an object back (from a cluster or a rendered file), dispatching on `kind`.
    pub fn from_value(value: serde_json::Value) -> Result<IstioObject, ObjectParseError> {
        let kind_text = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let kind = Kind::parse(kind_text)
            .ok_or_else(|| ObjectParseError::UnknownKind(kind_text.to_string()))?;
        let invalid = |e: serde_json::Error| ObjectParseError::Invalid {
            kind,
            message: e.to_string(),
        };
        Ok(match kind {
            Kind::Gateway => IstioObject::Gateway(serde_json::from_value(value).map_err(invalid)?),
            Kind::DestinationRule => {
                IstioObject::DestinationRule(serde_json::from_value(value).map_err(invalid)?)
            }
            Kind::ServiceEntry => {
                IstioObject::ServiceEntry(serde_json::from_value(value).map_err(invalid)?)
            }
        })
    }
}

// ---- ServiceEntry ----

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    pub protocol: String,
    pub name: String,
    /// The port on the endpoint (absent: `number`, unless the endpoint maps the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// An endpoint of a ServiceEntry (Istio's WorkloadEntry spec).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    pub address: String,
    /// Port name -> port number on this endpoint (absent: the service port's number).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

// ---- Gateway ----

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySpec {
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub port: GatewayPort,
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsSettings>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPort {
    pub number: u32,
    pub name: String,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTlsSettings {
    pub mode: ServerTlsMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

// ---- DestinationRule ----

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTlsSettings {
    pub mode: ClientTlsMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_read_back_by_kind_and_ignore_server_fields() {
        let value = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "DestinationRule",
            "metadata": {"name": "dr", "namespace": "istio-system", "uid": "x",
                         "labels": {"a": "b"}},
            "spec": {"host": "*.mesh.internal", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}},
            "status": {}
        });
        let object = IstioObject::from_value(value).unwrap();
        assert_eq!(object.kind(), Kind::DestinationRule);
        assert_eq!(object.id().to_string(), "DestinationRule istio-system/dr");
        let IstioObject::DestinationRule(dr) = object else {
            panic!("not a DestinationRule")
        };
        assert_eq!(
            dr.spec.traffic_policy.unwrap().tls.unwrap().mode,
            ClientTlsMode::IstioMutual
        );
        let err = IstioObject::from_value(serde_json::json!({"kind": "VirtualService"}));
        assert!(err.unwrap_err().to_string().contains("VirtualService"));
    }
}
