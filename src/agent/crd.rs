//! The agent's custom resource, `VirtualMeshCertificateSigningRequest`
//! (`meshca.dev/v1alpha1`, short name `vmcsr`), derived from these Rust types, and
//! `meshca crds`: every CRD meshca defines as multi-document YAML.
//!
//! To add a CRD, append its `crd()` to [`component_crds`]; `meshca crds`, deploy/ and the
//! tests comparing them follow.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::restart::{RestartPolicy, RestartRecord};
use super::rotation::{
    DEFAULT_JITTER_FRACTION, DEFAULT_RENEW_FRACTION, RootPin, RotationSettings,
    SHA256_FINGERPRINT_PATTERN, SettingsError, parse_sha256_fingerprint,
};
use crate::pki::keys::KeyType;
use crate::policy::ObjectRef;

/// A cluster's request for its Istio intermediate CA: which mesh, from which signer,
/// where to install it, when to rotate, what to restart.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "meshca.dev",
    version = "v1alpha1",
    kind = "VirtualMeshCertificateSigningRequest",
    namespaced,
    shortname = "vmcsr",
    status = "VmcsrStatus",
    derive = "PartialEq",
    doc = "Request for a cluster's Istio intermediate CA, signed by a meshca signer and installed as the cacerts Secret.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Expiry","type":"date","description":"notAfter of the installed intermediate","jsonPath":".status.notAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VmcsrSpec {
    /// The VirtualMesh whose policy governs the intermediate.
    pub virtual_mesh: NamespacedName,
    /// This cluster's mesh (a member of the virtual mesh); the intermediate's CN.
    pub mesh: NamespacedName,
    /// Signer, target Secret, key, lifetime, rotation and restarts (flat in the spec).
    #[serde(flatten)]
    pub settings: RequestSettings,
}

/// What a request asks of the signer and how its agent installs, renews and restarts:
/// the fields a request's spec shares with a Mesh's `agent` settings (flattened into
/// both, so each is written as before).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestSettings {
    /// The signer to ask, as reachable from the agent's cluster.
    pub signer: SignerRef,
    /// The Secret istiod reads (default istio-system/cacerts).
    #[serde(default)]
    pub target: NamespacedName,
    /// Replace a `cacerts` Secret meshca did not create (its roots stay trusted).
    #[serde(default)]
    pub adopt: bool,
    /// Key type of the intermediate (default: the first of ecdsa-p256, ecdsa-p384,
    /// rsa2048, rsa3072, rsa4096 the policy accepts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<KeyType>,
    /// Ask for less than the policy's maximum lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub rotation: RotationSpec,
    #[serde(default)]
    pub restart: RestartSpec,
}

/// `{namespace, name}` of an object.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl Default for NamespacedName {
    /// Istio's plugged-in CA Secret.
    fn default() -> Self {
        NamespacedName {
            namespace: "istio-system".into(),
            name: "cacerts".into(),
        }
    }
}

impl NamespacedName {
    /// Checked conversion (DNS names).
    pub fn to_ref(&self) -> Result<ObjectRef, String> {
        format!("{}/{}", self.namespace, self.name)
            .parse()
            .map_err(|e: crate::policy::virtual_mesh::ObjectRefError| e.to_string())
    }
}

/// Where the signer is. The client certificate is the agent's (mounted from a Secret).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SignerRef {
    /// https://host:port
    pub url: String,
}

/// When to renew and which old roots to stop trusting.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Renew after this fraction of the lifetime (0.1 to 0.95, default 2/3).
    #[serde(default = "default_renew_fraction")]
    #[schemars(range(min = 0.1, max = 0.95))]
    pub renew_fraction: f64,
    /// Renew up to this fraction of the lifetime earlier, fixed per certificate by its
    /// serial (0 to 0.5, default 0.05).
    #[serde(default = "default_jitter_fraction")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub jitter_fraction: f64,
    /// SHA-256 fingerprints of old roots to drop from root-cert.pem once every cluster
    /// has moved to the new root (set by the operator or the management plane): 64 hex
    /// digits, bare or in colon-separated pairs (`openssl x509 -noout -fingerprint
    /// -sha256`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(SHA256_FINGERPRINT_PATTERN)))]
    pub retired_root_fingerprints: Vec<String>,
    /// SHA-256 fingerprints of the only roots this agent accepts from the signer (same
    /// forms). Empty (the default): any root, trust on first use. Set in production: a
    /// signer's stolen TLS key, or any certificate the agent's CA bundle trusts, then
    /// cannot have the cluster trust a root of its own. A root the signer issues under or
    /// announces that is not listed is refused (named in the status) or left out of
    /// root-cert.pem; add the next root here before it is announced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(SHA256_FINGERPRINT_PATTERN)))]
    pub accepted_root_fingerprints: Vec<String>,
}

fn default_renew_fraction() -> f64 {
    DEFAULT_RENEW_FRACTION
}

fn default_jitter_fraction() -> f64 {
    DEFAULT_JITTER_FRACTION
}

impl Default for RotationSpec {
    fn default() -> Self {
        RotationSpec {
            renew_fraction: DEFAULT_RENEW_FRACTION,
            jitter_fraction: DEFAULT_JITTER_FRACTION,
            retired_root_fingerprints: vec![],
            accepted_root_fingerprints: vec![],
        }
    }
}

impl RotationSpec {
    /// The roots accepted from the signer (checked by [`RotationSpec::settings`]).
    pub fn root_pin(&self) -> RootPin {
        RootPin::new(
            &self.accepted_root_fingerprints,
            "spec.rotation.acceptedRootFingerprints (or the Mesh's agent settings)",
        )
    }

    /// The renewal settings, once the whole spec is checked: a retired root not named by
    /// its SHA-256 would match no root and stay trusted without a word (an API server
    /// refuses it by the schema; one whose CRD predates the pattern does not).
    pub fn settings(&self) -> Result<RotationSettings, SettingsError> {
        for (index, fingerprint) in self.retired_root_fingerprints.iter().enumerate() {
            parse_sha256_fingerprint(fingerprint)
                .map_err(|problem| SettingsError::retired_root(index, fingerprint, problem))?;
        }
        for (index, fingerprint) in self.accepted_root_fingerprints.iter().enumerate() {
            parse_sha256_fingerprint(fingerprint)
                .map_err(|problem| SettingsError::accepted_root(index, fingerprint, problem))?;
        }
        RotationSettings::new(self.renew_fraction, self.jitter_fraction)
    }
}

/// What to restart after a new intermediate, and how long to wait for the new root.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartSpec {
    /// auto: everything at the first switch from Istio's self-signed CA (and at the repair
    /// of a bundle missing a file), istiod alone whenever root-cert.pem changes, nothing
    /// for a renewal under the same roots; always: everything after every new
    /// intermediate; never.
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Label selector of the istiod Deployments, in the target Secret's namespace.
    #[serde(default = "default_istiod_selector")]
    pub istiod_selector: String,
    /// Namespaces holding gateway Deployments.
    #[serde(default = "default_gateway_namespaces")]
    pub gateway_namespaces: Vec<String>,
    /// Label selector of the gateway Deployments.
    #[serde(default = "default_gateway_selector")]
    pub gateway_selector: String,
    /// Namespaces whose workloads restart (after their istio-ca-root-cert carries the
    /// new root).
    #[serde(default)]
    pub workload_namespaces: Vec<String>,
    /// Label selector of the workloads: Deployments, StatefulSets and DaemonSets (empty: all
    /// in those namespaces).
    #[serde(default)]
    pub workload_selector: String,
    /// How long a stage waits for a namespace's istio-ca-root-cert before the plan stops.
    #[serde(default = "default_wait_seconds")]
    pub wait_seconds: u64,
}

fn default_istiod_selector() -> String {
    "app=istiod".into()
}

fn default_gateway_namespaces() -> Vec<String> {
    vec!["istio-system".into()]
}

fn default_gateway_selector() -> String {
    "istio in (ingressgateway,egressgateway,eastwestgateway)".into()
}

fn default_wait_seconds() -> u64 {
    900
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartPolicy::default(),
            istiod_selector: default_istiod_selector(),
            gateway_namespaces: default_gateway_namespaces(),
            gateway_selector: default_gateway_selector(),
            workload_namespaces: vec![],
            workload_selector: String::new(),
            wait_seconds: default_wait_seconds(),
        }
    }
}

/// Lifecycle of a request.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Seen, nothing done yet (or waiting for leadership).
    Pending,
    /// A CSR was sent to the signer.
    Requested,
    /// The signer answered with a certificate that passed istiod's checks.
    Issued,
    /// The bundle is in the target Secret.
    Installed,
    /// The last attempt failed (see lastError); an installed bundle stays in place.
    Failed,
}

/// A standard Kubernetes condition.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What the agent observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmcsrStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Serial (hex) of the installed intermediate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// notAfter of the installed intermediate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// When the agent renews it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<String>,
    /// SHA-256 of the root the intermediate chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    /// SHA-256 of every root in root-cert.pem (more than one during a root change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_root_fingerprints: Vec<String>,
    /// SHA-256 of the root the signer announces as its next one (trusted ahead of a root
    /// change), as last heard from the signer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_root_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The restart plan of the installed serial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartRecord>,
}

/// The part of meshca a CRD belongs to: where deploy/ installs it (the agent's in every
/// member cluster, the mesh controller's in the management cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Agent,
    MeshController,
}

/// Every CRD meshca defines with its component, in the order `meshca crds` prints them.
pub fn component_crds() -> Vec<(Component, CustomResourceDefinition)> {
    use crate::mesh_controller::crd::{Mesh, VirtualMesh};
    vec![
        (
            Component::Agent,
            VirtualMeshCertificateSigningRequest::crd(),
        ),
        (Component::MeshController, VirtualMesh::crd()),
        (Component::MeshController, Mesh::crd()),
    ]
}

/// Every CRD meshca defines, in the order `meshca crds` prints them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    component_crds().into_iter().map(|(_, crd)| crd).collect()
}

/// `meshca crds`: multi-document YAML, each document starting with `---`.
pub fn crds_yaml() -> Result<String, String> {
    crds_yaml_for(None)
}

/// `meshca crds [--for COMPONENT]`: the CRDs of one component, or all.
pub fn crds_yaml_for(component: Option<Component>) -> Result<String, String> {
    let mut out = String::new();
    for (of, crd) in component_crds() {
        if component.is_some_and(|c| c != of) {
            continue;
        }
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_spec_gets_the_documented_defaults() {
        let spec: VmcsrSpec = serde_json::from_value(serde_json::json!({
            "virtualMesh": {"namespace": "service-mesh-hub", "name": "virtual-mesh"},
            "mesh": {"namespace": "service-mesh-hub", "name": "cluster-a"},
            "signer": {"url": "https://signer.example:8443"}
        }))
        .unwrap();
        let spec = spec.settings;
        assert_eq!(spec.target, NamespacedName::default());
        assert_eq!(
            spec.target.to_ref().unwrap().to_string(),
            "istio-system/cacerts"
        );
        assert!(!spec.adopt);
        assert_eq!(
            spec.rotation.settings().unwrap(),
            RotationSettings::default()
        );
        assert_eq!(spec.restart, RestartSpec::default());
        assert_eq!(spec.restart.policy, RestartPolicy::Auto);
    }

    #[test]
    fn the_crd_has_the_names_columns_and_status_subresource() {
        let crd = VirtualMeshCertificateSigningRequest::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("virtualmeshcertificatesigningrequests.meshca.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["vmcsr".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<(String, String)> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.clone(), c.json_path.clone()))
            .collect();
        assert_eq!(
            columns,
            vec![
                ("Phase".into(), ".status.phase".into()),
                ("Expiry".into(), ".status.notAfter".into()),
                ("Age".into(), ".metadata.creationTimestamp".into()),
            ]
        );
        let yaml = crds_yaml().unwrap();
        assert!(yaml.starts_with("---\n"));
        assert!(yaml.contains("kind: CustomResourceDefinition"));
    }

    /// The schema's pattern and the agent's own check take the same forms: a root retired
    /// in another form would match no root and stay trusted.
    #[test]
    fn retired_roots_are_sha256_fingerprints_by_the_schema_and_the_spec_check() {
        let crd = serde_json::to_value(VirtualMeshCertificateSigningRequest::crd()).unwrap();
        let items = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["rotation"]["properties"]["retiredRootFingerprints"]["items"];
        assert_eq!(items["pattern"], SHA256_FINGERPRINT_PATTERN, "{items}");
        let sha256 = "5f35e0c1d0e4b1a9c0ffee00112233445566778899aabbccddeeff0011223344";
        let paired = |hex: &str| {
            hex.as_bytes()
                .chunks(2)
                .map(|pair| String::from_utf8_lossy(pair).to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join(":")
        };
        let rotation = |retired: Vec<String>| RotationSpec {
            retired_root_fingerprints: retired,
            ..RotationSpec::default()
        };
        for taken in [
            sha256.to_string(),
            sha256.to_ascii_uppercase(),
            paired(sha256),
        ] {
            assert_eq!(
                parse_sha256_fingerprint(&taken).as_deref(),
                Ok(sha256),
                "{taken}"
            );
            assert!(rotation(vec![taken]).settings().is_ok());
        }
        let sha1 = paired(&sha256[..40]);
        for (refused, why) in [
            (sha1.clone(), "this looks like a SHA-1 fingerprint"),
            (sha1.replace(':', ""), "this looks like a SHA-1 fingerprint"),
            ("xyz".to_string(), "not a SHA-256 fingerprint"),
            (format!("{sha256}00"), "not a SHA-256 fingerprint"),
            (format!(" {sha256}"), "not a SHA-256 fingerprint"),
            ("a".repeat(1000), "not a SHA-256 fingerprint"),
        ] {
            let message = rotation(vec![sha256.into(), refused.clone()])
                .settings()
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with("retiredRootFingerprints[1] \"") && message.contains(why),
                "{refused}: {message}"
            );
            // A long value is cut: a status message is no place for it.
            assert!(message.len() < 400, "{message}");
        }
    }

    /// Accepted roots take the forms retired roots take, by the schema and the check.
    #[test]
    fn accepted_roots_are_sha256_fingerprints_by_the_schema_and_the_spec_check() {
        let crd = serde_json::to_value(VirtualMeshCertificateSigningRequest::crd()).unwrap();
        let items = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["rotation"]["properties"]["acceptedRootFingerprints"]["items"];
        assert_eq!(items["pattern"], SHA256_FINGERPRINT_PATTERN, "{items}");
        let sha256 = "5f35e0c1d0e4b1a9c0ffee00112233445566778899aabbccddeeff0011223344";
        let rotation = |accepted: Vec<String>| RotationSpec {
            accepted_root_fingerprints: accepted,
            ..RotationSpec::default()
        };
        let spec = rotation(vec![sha256.to_ascii_uppercase()]);
        assert!(spec.settings().is_ok());
        assert!(spec.root_pin().accepts(sha256));
        assert!(!spec.root_pin().accepts(&"ab".repeat(32)));
        assert!(RotationSpec::default().root_pin().is_empty());
        let message = rotation(vec![sha256.into(), "xyz".into()])
            .settings()
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("acceptedRootFingerprints[1] \"xyz\": not a SHA-256"),
            "{message}"
        );
    }

    #[test]
    fn restart_policy_values_are_lowercase() {
        for (text, policy) in [
            ("auto", RestartPolicy::Auto),
            ("always", RestartPolicy::Always),
            ("never", RestartPolicy::Never),
        ] {
            let parsed: RestartPolicy = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(parsed, policy);
        }
        assert!(serde_json::from_value::<RestartPolicy>(serde_json::json!("Auto")).is_err());
    }
}
