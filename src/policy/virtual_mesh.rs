//! VirtualMesh documents in the shape of the Service Mesh Hub guide, and their reduction to
//! the policy the signer enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::{RSA_MAX_BITS, accepted_key_types, effective_min_rsa_bits};
use crate::mesh::names::{is_constraint_trust_domain, is_dns1123_label};
use crate::pki::keys::KeyType;

/// `<namespace>/<name>`: how virtual meshes and meshes are named everywhere in meshca.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectRefError {
    #[error("{0:?} is not of the form <namespace>/<name>")]
    Form(String),
    #[error(
        "{value:?}: namespace {namespace:?} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63, no '.'), as Kubernetes requires of namespaces"
    )]
    Namespace { value: String, namespace: String },
    #[error(
        "{value:?}: name {name:?} is not a DNS subdomain (dot-separated parts of lowercase letters, digits and '-', each starting and ending with a letter or digit, at most 253 in all), as Kubernetes requires of object names"
    )]
    Name { value: String, name: String },
}

impl FromStr for ObjectRef {
    type Err = ObjectRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| ObjectRefError::Form(s.into()))?;
        if name.contains('/') {
            return Err(ObjectRefError::Form(s.into()));
        }
        // What the API server accepts: objects meshca derives from these names
        // (`<name>-federation`, labels) must be accepted too.
        if !is_dns1123_label(namespace) {
            return Err(ObjectRefError::Namespace {
                value: s.into(),
                namespace: namespace.into(),
            });
        }
        if !is_object_name(name) {
            return Err(ObjectRefError::Name {
                value: s.into(),
                name: name.into(),
            });
        }
        Ok(ObjectRef::new(namespace, name))
    }
}

/// A Kubernetes object name (its DNS-1123 subdomain check): dot-separated parts, each
/// like a DNS label but, as the API server has it, without the label's 63-character limit
/// (a 64-character name is a valid object; meshca refuses it later where it becomes a
/// label value, naming why).
fn is_object_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            part.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && part
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && part
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

impl Serialize for ObjectRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ObjectRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VirtualMesh document as written in YAML. Every key is one meshca reads or refuses by
/// name (a misspelled one left unread would change what is signed or federated); only
/// `metadata` is open (labels, annotations, ...), and `status` is taken and never read:
/// `kubectl get vmesh -o yaml`, a natural way to keep the signer's copy, writes one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMeshDocument {
    #[serde(default)]
    pub api_version: Option<String>,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: VirtualMeshSpec,
    /// What a cluster reported: not policy, ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

/// The seed's VirtualMesh spec. Also the spec of the management plane's `VirtualMesh`
/// custom resource (`crate::mesh_controller::crd`), whose schema is derived from these
/// types: options meshca refuses (`limited`, `provided`, other federation modes) are part
/// of the schema so that they reach the validation below and are refused by name, and so
/// is any other key (kept, not pruned, by the API server: see [`Unknown`]).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct VirtualMeshSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub certificate_authority: CertificateAuthority,
    /// Absent: shared trust only, nothing federated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<Federation>,
    /// Shared trust (one root): the only trust model meshca implements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub shared: Option<serde_json::Value>,
    /// Limited trust: refused (meshca implements shared trust).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub limited: Option<serde_json::Value>,
    /// true is refused: meshca creates no authorization policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_access_control: Option<bool>,
    /// The member meshes.
    #[serde(default)]
    pub meshes: Vec<MeshReference>,
    /// The SPIFFE trust domains of the members (each cluster's own and the ones in its
    /// `trustDomainAliases`). Present: every intermediate carries a critical name
    /// constraint permitting URIs of these hosts only, so that a cluster's intermediate
    /// key cannot sign another virtual mesh's workload identities. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domains: Option<Vec<String>>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: Unknown,
}

/// Keys of a VirtualMesh object that meshca does not know: kept so that validation refuses
/// them by name (`deny_unknown_fields` would do for files, but the mesh controller reads
/// the spec through the API server, which would prune them unless kept, and it must name
/// them in a status condition rather than fail to read the object).
pub type Unknown = BTreeMap<String, serde_json::Value>;

/// The keys of each level of a VirtualMesh's spec that keeps unknown keys.
const SPEC_KEYS: &[&str] = &[
    "displayName",
    "certificateAuthority",
    "federation",
    "shared",
    "limited",
    "enforceAccessControl",
    "meshes",
    "trustDomains",
];
const CA_KEYS: &[&str] = &["builtin", "provided"];
const BUILTIN_KEYS: &[&str] = &["ttlDays", "rsaKeySizeBytes", "orgName"];
const MESH_KEYS: &[&str] = &["name", "namespace"];

/// The keys known at `path` (serde_path_to_error's segments from the document's top),
/// for the levels that keep unknown keys.
fn known_keys(path: &serde_path_to_error::Path) -> Option<&'static [&'static str]> {
    use serde_path_to_error::Segment;
    let keys: Vec<Option<&str>> = path
        .iter()
        .map(|segment| match segment {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    match keys.as_slice() {
        [Some("spec")] => Some(SPEC_KEYS),
        [Some("spec"), Some("certificateAuthority")] => Some(CA_KEYS),
        [Some("spec"), Some("certificateAuthority"), Some("builtin")] => Some(BUILTIN_KEYS),
        [Some("spec"), Some("meshes"), None] => Some(MESH_KEYS),
        _ => None,
    }
}

/// The keys of the object at `path` in `doc` that are not in `known`: on a missing field,
/// these are likely the misspelling of it, and named with it.
fn unknown_at(doc: &serde_json::Value, path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    let Some(known) = known_keys(path) else {
        return Vec::new();
    };
    let mut at = Some(doc);
    for segment in path.iter() {
        at = match segment {
            Segment::Map { key } => at.and_then(|v| v.get(key)),
            Segment::Seq { index } => at.and_then(|v| v.get(index)),
            _ => None,
        };
    }
    at.and_then(serde_json::Value::as_object)
        .map(|object| {
            object
                .keys()
                .filter(|key| !known.contains(&key.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// What a refused unknown key's message says (the mesh controller's `UnknownField` reason).
pub const UNKNOWN_FIELD: &str = "is not a VirtualMesh field";

/// Refuses the first unknown key under `path`, naming it and the keys known there.
fn refuse_unknown(path: &str, other: &Unknown, known: &[&str]) -> Result<(), String> {
    match other.keys().next() {
        None => Ok(()),
        Some(key) => Err(format!(
            "{path}.{key} {UNKNOWN_FIELD} (known: {})",
            known.join(", ")
        )),
    }
}

/// Schema of a free-form object (kept as written, checked by meshca's validation).
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct CertificateAuthority {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinCa>,
    /// A CA supplied by the user: refused (the root key lives in the signer's token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub provided: Option<serde_json::Value>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: Unknown,
}

/// `spec.certificateAuthority.builtin`: the rules for the root and its intermediates.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BuiltinCa {
    pub ttl_days: u32,
    /// Despite the name, a size in bits (the seed's value is 4096).
    pub rsa_key_size_bytes: u32,
    pub org_name: String,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: Unknown,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct Federation {
    /// PERMISSIVE (the default); any other mode is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Which services are federated; parsed and checked by `crate::mesh::federation`
    /// (absent: every service). The signer ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::mesh::federation::ServiceSelector::open_schema")]
    pub selector: Option<serde_json::Value>,
    /// Suffix of federated host names, <service>.<namespace>.svc.<cluster>.<hostSuffix>
    /// (absent: mesh.internal, under the reserved .internal TLD); checked by
    /// `crate::mesh::federation`. The signer ignores it.
    #[serde(
        default,
        rename = "hostSuffix",
        skip_serializing_if = "Option::is_none"
    )]
    pub host_suffix: Option<String>,
    /// Any other key: refused by federation (an option it would otherwise ignore), ignored
    /// by the signer.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct MeshReference {
    pub name: String,
    pub namespace: String,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("{source_name}: not valid VirtualMesh YAML: {message}")]
    Yaml {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: {breach}: split it into several files, all listed in `virtual_meshes`")]
    TooLarge {
        source_name: String,
        breach: crate::yaml::Breach,
    },
    #[error("{source_name}: document {index} has kind {kind:?}, expected VirtualMesh")]
    WrongKind {
        source_name: String,
        index: usize,
        kind: String,
    },
    #[error("{source_name}: VirtualMesh {id}: {problem}")]
    Invalid {
        source_name: String,
        id: String,
        problem: String,
    },
    #[error("VirtualMesh {id} is defined twice ({first} and {second})")]
    Duplicate {
        id: String,
        first: String,
        second: String,
    },
    #[error("no VirtualMesh documents were loaded")]
    Empty,
}

/// The policy of one virtual mesh, as the signer enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualMeshPolicy {
    pub id: ObjectRef,
    pub display_name: Option<String>,
    /// Subject organization of the root and of every intermediate.
    pub org_name: String,
    /// Longest lifetime an intermediate (or the root) may get.
    pub max_ttl: Duration,
    /// Minimum RSA modulus in bits (never below 2048, whatever the document says).
    pub min_rsa_bits: u32,
    /// Meshes that may receive an intermediate under this virtual mesh.
    pub meshes: BTreeSet<ObjectRef>,
    /// `spec.trustDomains`, sorted: the URI hosts every intermediate's name constraints
    /// permit. Empty: the field is absent and intermediates carry no name constraints.
    pub trust_domains: Vec<String>,
    /// Where this policy was read from, for error messages.
    pub source: String,
}

impl VirtualMeshPolicy {
    pub fn accepted_key_types(&self) -> Vec<KeyType> {
        accepted_key_types(self.min_rsa_bits)
    }

    pub fn has_member(&self, mesh: &ObjectRef) -> bool {
        self.meshes.contains(mesh)
    }
}

/// Longest ttlDays accepted: beyond a century is a typo, not a policy.
const MAX_TTL_DAYS: u32 = 36_500;
/// RFC 5280's upper bound for an organization name.
const MAX_ORG_NAME_LEN: usize = 64;

impl VirtualMeshDocument {
    /// Refuses the first key meshca does not know under `spec`, by its path.
    fn unknown_keys(&self) -> Result<(), String> {
        let spec = &self.spec;
        refuse_unknown("spec", &spec.other, SPEC_KEYS)?;
        let ca = &spec.certificate_authority;
        refuse_unknown("spec.certificateAuthority", &ca.other, CA_KEYS)?;
        if let Some(builtin) = &ca.builtin {
            refuse_unknown(
                "spec.certificateAuthority.builtin",
                &builtin.other,
                BUILTIN_KEYS,
            )?;
        }
        for (index, mesh) in spec.meshes.iter().enumerate() {
            refuse_unknown(&format!("spec.meshes[{index}]"), &mesh.other, MESH_KEYS)?;
        }
        Ok(())
    }

    /// Validates the document and reduces it to the signer's policy.
    pub fn into_policy(self, source_name: &str) -> Result<VirtualMeshPolicy, PolicyLoadError> {
        let id_text = format!("{}/{}", self.metadata.namespace, self.metadata.name);
        let invalid = |problem: String| PolicyLoadError::Invalid {
            source_name: source_name.to_string(),
            id: id_text.clone(),
            problem,
        };
        let id: ObjectRef = id_text
            .parse()
            .map_err(|e: ObjectRefError| invalid(format!("metadata: {e}")))?;
        self.unknown_keys().map_err(invalid)?;
        let ca = &self.spec.certificate_authority;
        if ca.provided.is_some() {
            return Err(invalid(
                "spec.certificateAuthority.provided is not supported by the signer: the root key lives in the signer's token, so use builtin".into(),
            ));
        }
        let builtin = ca
            .builtin
            .as_ref()
            .ok_or_else(|| invalid("spec.certificateAuthority.builtin is required".into()))?;
        if builtin.ttl_days == 0 || builtin.ttl_days > MAX_TTL_DAYS {
            return Err(invalid(format!(
                "spec.certificateAuthority.builtin.ttlDays must be between 1 and {MAX_TTL_DAYS}, got {}",
                builtin.ttl_days
            )));
        }
        let org_name = builtin.org_name.trim();
        if org_name.is_empty()
            // Characters, as X.520 bounds the name (and the lint counts), not UTF-8 bytes.
            || org_name.chars().count() > MAX_ORG_NAME_LEN
            || org_name.chars().any(char::is_control)
        {
            return Err(invalid(format!(
                "spec.certificateAuthority.builtin.orgName must be 1 to {MAX_ORG_NAME_LEN} printable characters"
            )));
        }
        // Above the largest RSA key accepted, only P-384 would be: weaker than the minimum
        // the document states.
        if builtin.rsa_key_size_bytes > RSA_MAX_BITS {
            return Err(invalid(format!(
                "spec.certificateAuthority.builtin.rsaKeySizeBytes is the minimum RSA size in bits; {} is above the largest RSA key meshca accepts ({RSA_MAX_BITS} bits), so no RSA key could meet it and only ECDSA P-384 (as strong as RSA-7680) would be accepted: use at most {RSA_MAX_BITS}",
                builtin.rsa_key_size_bytes
            )));
        }
        if self.spec.limited.is_some() {
            return Err(invalid(
                "the limited trust model is not supported; meshca implements shared trust (one root)".into(),
            ));
        }
        let mut meshes = BTreeSet::new();
        for mesh in &self.spec.meshes {
            let mesh_ref: ObjectRef = format!("{}/{}", mesh.namespace, mesh.name)
                .parse()
                .map_err(|e: ObjectRefError| invalid(format!("spec.meshes: {e}")))?;
            if !meshes.insert(mesh_ref.clone()) {
                return Err(invalid(format!("spec.meshes lists {mesh_ref} twice")));
            }
        }
        if meshes.is_empty() {
            return Err(invalid("spec.meshes is empty".into()));
        }
        let trust_domains = match &self.spec.trust_domains {
            None => Vec::new(),
            Some(listed) => checked_trust_domains(listed).map_err(invalid)?,
        };
        Ok(VirtualMeshPolicy {
            id,
            display_name: self.spec.display_name.clone(),
            org_name: org_name.to_string(),
            max_ttl: Duration::from_secs(u64::from(builtin.ttl_days) * 86_400),
            min_rsa_bits: effective_min_rsa_bits(builtin.rsa_key_size_bytes),
            meshes,
            trust_domains,
            source: source_name.to_string(),
        })
    }
}

/// `spec.trustDomains` checked and sorted: each a SPIFFE trust domain, none twice, at
/// least one (an empty list would permit no workload identity at all), and each one Go's
/// crypto/x509 (istiod) parses in a name constraint ([`is_constraint_trust_domain`]).
fn checked_trust_domains(listed: &[String]) -> Result<Vec<String>, String> {
    if listed.is_empty() {
        return Err(
            "spec.trustDomains is empty: list the members' trust domains, or leave the field out for intermediates without name constraints".into(),
        );
    }
    let mut sorted = BTreeSet::new();
    for domain in listed {
        if !is_constraint_trust_domain(domain) {
            return Err(format!(
                "spec.trustDomains: {domain:?} is not a trust domain (dot-separated labels of lowercase letters, digits, '-' and '_', none empty, the last not all digits, at most 255 in all)"
            ));
        }
        if !sorted.insert(domain.clone()) {
            return Err(format!("spec.trustDomains lists {domain:?} twice"));
        }
    }
    Ok(sorted.into_iter().collect())
}

/// Document `number` (from 1) of `yaml`, already parsed into `doc`, as a VirtualMesh. An
/// error names the field by its path and, where it can, the line, never the value.
pub fn typed_document(
    yaml: &str,
    number: usize,
    doc: serde_json::Value,
) -> Result<VirtualMeshDocument, String> {
    let kept = doc.clone();
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let unknown = unknown_at(&kept, e.path());
        let unknown = match unknown.as_slice() {
            [] => String::new(),
            keys => format!(
                " ({} {UNKNOWN_FIELD}: a misspelling?)",
                keys.iter()
                    .map(|key| format!("{}.{key}", e.path()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "document {number}{}: {}: {}{unknown}",
            line_of_error(yaml),
            e.path(),
            without_value(&e.inner().to_string())
        )
    })
}

/// Where the typed reading of `yaml` fails, as ", line L column C", or nothing. The
/// documents are read as JSON values first (for their kinds), which keeps no positions:
/// on an error only, they are read again straight from the text, which does.
fn line_of_error(yaml: &str) -> String {
    let typed = serde_saphyr::from_multiple_with_options::<Option<VirtualMeshDocument>>(
        yaml,
        crate::yaml::options(),
    );
    match typed.err().and_then(|e| e.location()) {
        Some(at) if at.line() > 0 => format!(", line {} column {}", at.line(), at.column()),
        _ => String::new(),
    }
}

/// A serde error without the value it quotes (`invalid type: string "356", expected u32`
/// becomes `invalid type: string, expected u32`): YAML errors never quote the file, which
/// may be a secret given by mistake. The error is serde_json's, which is only text, so the
/// value is cut from it: it sits between the kind and the last ", expected " (the expected
/// part comes from meshca's types, never from the file).
fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((unexpected, expected)) = rest.rsplit_once(", expected ")
        {
            let kind = unexpected
                .split(['`', '"'])
                .next()
                .unwrap_or_default()
                .trim();
            return format!("{prefix}{kind}, expected {expected}");
        }
    }
    message.to_string()
}

/// Every VirtualMesh the signer knows, by `<namespace>/<name>`.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    meshes: BTreeMap<ObjectRef, VirtualMeshPolicy>,
}

impl PolicySet {
    /// Parses one multi-document YAML text and adds its VirtualMeshes.
    pub fn add_yaml(&mut self, source_name: &str, yaml: &str) -> Result<(), PolicyLoadError> {
        let docs: Vec<serde_json::Value> = crate::yaml::documents(yaml).map_err(|e| match e {
            crate::yaml::YamlError::TooLarge(breach) => PolicyLoadError::TooLarge {
                source_name: source_name.to_string(),
                breach,
            },
            crate::yaml::YamlError::Parse(e) => PolicyLoadError::Yaml {
                source_name: source_name.to_string(),
                message: e.to_string(),
            },
        })?;
        for (index, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "VirtualMesh" {
                return Err(PolicyLoadError::WrongKind {
                    source_name: source_name.to_string(),
                    index: index + 1,
                    kind: kind.to_string(),
                });
            }
            let document =
                typed_document(yaml, index + 1, doc).map_err(|message| PolicyLoadError::Yaml {
                    source_name: source_name.to_string(),
                    message,
                })?;
            self.insert(document.into_policy(source_name)?)?;
        }
        Ok(())
    }

    pub fn insert(&mut self, policy: VirtualMeshPolicy) -> Result<(), PolicyLoadError> {
        if let Some(existing) = self.meshes.get(&policy.id) {
            return Err(PolicyLoadError::Duplicate {
                id: policy.id.to_string(),
                first: existing.source.clone(),
                second: policy.source,
            });
        }
        self.meshes.insert(policy.id.clone(), policy);
        Ok(())
    }

    pub fn get(&self, id: &ObjectRef) -> Option<&VirtualMeshPolicy> {
        self.meshes.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &VirtualMeshPolicy> {
        self.meshes.values()
    }

    pub fn is_empty(&self) -> bool {
        self.meshes.is_empty()
    }

    /// What the start, `serve --check` and a reload warn of about trust domains: name
    /// constraints that rustls peers refuse, and virtual meshes sharing this signer's root
    /// without trust domains apart (every intermediate chains to that root, so a cluster
    /// of one can sign workload identities the others accept, unless name constraints
    /// keep it to its own trust domains). Not errors: several virtual meshes of one tenant
    /// are legitimate, and a mesh of sidecars only verifies name constraints. Each names
    /// at most [`NAMES_LISTED`] virtual meshes per list, then counts the rest: a signer of
    /// hundreds of them would otherwise log lines of kilobytes.
    pub fn trust_domain_warnings(&self) -> Vec<String> {
        self.trust_domain_warnings_listing(listed)
    }

    /// The warnings of [`Self::trust_domain_warnings`] a reload repeats: those whose
    /// virtual meshes (or trust domains) named differ from every warning of the policies
    /// `in_force`, so that a SIGHUP that changes none of them says nothing again.
    pub fn trust_domain_warnings_new_since(&self, in_force: &PolicySet) -> Vec<String> {
        // Compared with every name: a change past the ones listed is a change too.
        let before = in_force.trust_domain_warnings_listing(every);
        self.trust_domain_warnings_listing(every)
            .into_iter()
            .zip(self.trust_domain_warnings())
            .filter(|(whole, _)| !before.contains(whole))
            .map(|(_, shown)| shown)
            .collect()
    }

    /// The warnings, each list of virtual meshes written by `list`.
    fn trust_domain_warnings_listing(&self, list: fn(&[String]) -> String) -> Vec<String> {
        let mut warnings = Vec::new();
        let constrained: Vec<String> = self
            .iter()
            .filter(|policy| !policy.trust_domains.is_empty())
            .map(|policy| policy.id.to_string())
            .collect();
        if !constrained.is_empty() {
            warnings.push(format!(
                "virtual mesh {} sets spec.trustDomains: its intermediates carry URI name constraints, which rustls-webpki does not support, so rustls peers (Istio ambient mode's ztunnel among them) refuse every workload certificate under them, inside a cluster too; openssl and Go verify them: use spec.trustDomains only where no rustls peer verifies workload certificates",
                list(&constrained)
            ));
        }
        if self.meshes.len() < 2 {
            return warnings;
        }
        let unconstrained: Vec<String> = self
            .iter()
            .filter(|policy| policy.trust_domains.is_empty())
            .map(|policy| policy.id.to_string())
            .collect();
        if !unconstrained.is_empty() {
            let all: Vec<String> = self.iter().map(|policy| policy.id.to_string()).collect();
            let (which, verb, them) = match unconstrained.as_slice() {
                [one] => (one.clone(), "is", "it"),
                several => (list(several), "are", "them"),
            };
            warnings.push(format!(
                "the virtual meshes {} share one root and trust each other's workloads: {which} {verb} without spec.trustDomains, so the intermediate key of any cluster of {them} can sign workload identities (SPIFFE IDs) in any trust domain; list each virtual mesh's trust domains in spec.trustDomains to keep them apart, or give each tenant its own root and signer",
                list(&all)
            ));
        }
        let mut listed_by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for policy in self.iter() {
            for domain in &policy.trust_domains {
                listed_by
                    .entry(domain)
                    .or_default()
                    .push(policy.id.to_string());
            }
        }
        for (domain, ids) in listed_by.iter().filter(|(_, ids)| ids.len() > 1) {
            warnings.push(format!(
                "the virtual meshes {} all list the trust domain {domain} in spec.trustDomains: a cluster of any of them can sign the others' workload identities in it",
                list(ids)
            ));
        }
        // Go (istiod, proxyless gRPC) matches a URI constraint as a DNS one, subdomains
        // included; openssl does not. So `pay.local` lets pay's clusters sign identities
        // in `eu.pay.local` that Go accepts.
        for (parent, parent_ids) in &listed_by {
            let below = format!(".{parent}");
            for (domain, ids) in &listed_by {
                let others: Vec<String> = ids
                    .iter()
                    .filter(|id| !parent_ids.contains(id))
                    .cloned()
                    .collect();
                if domain.ends_with(&below) && !others.is_empty() {
                    warnings.push(format!(
                        "virtual mesh {} lists the trust domain {parent} and {} lists {domain}, a subdomain of it: Go (istiod, proxyless gRPC) reads a URI name constraint as covering subdomains, so a cluster of {} can sign workload identities in {domain} that Go accepts (openssl refuses them); use trust domains that are not subdomains of another virtual mesh's",
                        list(parent_ids),
                        list(&others),
                        list(parent_ids)
                    ));
                }
            }
        }
        warnings
    }
}

/// Most names a list in a log line names (a trust-domain warning's virtual meshes, a
/// reload's changes): a signer of hundreds would otherwise log lines of kilobytes.
pub const NAMES_LISTED: usize = 16;

/// `names`, the first [`NAMES_LISTED`] of them, then how many more.
pub(crate) fn listed(names: &[String]) -> String {
    let shown = names[..names.len().min(NAMES_LISTED)].join(", ");
    match names.len().saturating_sub(NAMES_LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// `names`, every one.
pub(crate) fn every(names: &[String]) -> String {
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SEED: &str = include_str!("../../config/virtual-mesh.yaml");

    #[test]
    fn seed_document_loads_with_its_two_meshes() {
        let mut set = PolicySet::default();
        set.add_yaml("seed", SEED).unwrap();
        let policy = set
            .get(&"service-mesh-hub/virtual-mesh".parse().unwrap())
            .unwrap();
        assert_eq!(policy.org_name, "service-mesh-hub");
        assert_eq!(policy.max_ttl, Duration::from_secs(356 * 86_400));
        assert_eq!(policy.min_rsa_bits, 4096);
        assert_eq!(policy.display_name.as_deref(), Some("Demo Mesh Federation"));
        let members: Vec<String> = policy.meshes.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            members,
            [
                "service-mesh-hub/istio-istio-system-management-plane",
                "service-mesh-hub/istio-istio-system-new-remote-cluster"
            ]
        );
    }

    fn doc(builtin: &str, extra: &str) -> String {
        format!(
            "kind: VirtualMesh\nmetadata:\n  name: vm\n  namespace: ns\nspec:\n  certificateAuthority:\n{builtin}\n  meshes:\n  - name: a\n    namespace: ns\n{extra}"
        )
    }

    fn load(yaml: &str) -> Result<PolicySet, PolicyLoadError> {
        let mut set = PolicySet::default();
        set.add_yaml("test.yaml", yaml).map(|_| set)
    }

    #[test]
    fn invalid_documents_are_refused_with_the_field_named() {
        let cases = [
            (
                doc(
                    "    builtin:\n      ttlDays: 0\n      rsaKeySizeBytes: 4096\n      orgName: o",
                    "",
                ),
                "ttlDays",
            ),
            (
                doc(
                    "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 4096\n      orgName: ''",
                    "",
                ),
                "orgName",
            ),
            (
                doc(
                    "    builtin:\n      ttlDay: 10\n      rsaKeySizeBytes: 4096\n      orgName: o",
                    "",
                ),
                "ttlDay",
            ),
            (
                doc(
                    "    provided:\n      certificate:\n        name: x\n        namespace: y",
                    "",
                ),
                "provided",
            ),
            (
                doc(
                    "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 4096\n      orgName: o",
                    "  limited: {}\n",
                ),
                "limited",
            ),
            (
                doc(
                    "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 4096\n      orgName: o",
                    "  - name: a\n    namespace: ns\n",
                ),
                "twice",
            ),
        ];
        for (yaml, needle) in cases {
            let err = load(&yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
            assert!(err.contains("test.yaml"), "source missing in {err:?}");
        }
    }

    /// 64 characters at most, counted as characters: 22 Japanese ones (66 bytes of UTF-8)
    /// are a valid orgName, 65 letters are not.
    #[test]
    fn the_org_name_is_bounded_in_characters_not_bytes() {
        let with_org = |org: &str| {
            doc(
                &format!(
                    "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 4096\n      orgName: {org}"
                ),
                "",
            )
        };
        let japanese = "株式会社メッシュ認証局".repeat(2);
        assert_eq!(japanese.chars().count(), 22);
        let set = load(&with_org(&japanese)).unwrap();
        assert_eq!(set.iter().next().unwrap().org_name, japanese);
        let err = load(&with_org(&"a".repeat(65))).unwrap_err().to_string();
        assert!(
            err.contains("orgName must be 1 to 64 printable characters"),
            "{err}"
        );
    }

    #[test]
    fn a_file_of_thousands_of_virtual_meshes_loads_and_one_past_the_limit_says_so() {
        let one = |n: usize| {
            format!(
                "---\nkind: VirtualMesh\nmetadata:\n  name: vm{n}\n  namespace: ns\nspec:\n  certificateAuthority:\n    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 4096\n      orgName: o\n  meshes:\n  - name: m{n}\n    namespace: ns\n"
            )
        };
        let many: String = (0..1_600).map(one).collect();
        assert_eq!(load(&many).unwrap().iter().count(), 1_600);
        // Past the bound, the message names the file, the limit and the way out.
        let err = load(&"---\n".repeat(crate::yaml::MAX_DOCUMENTS + 1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "test.yaml: it holds more than {} documents, the most one file may hold: split it into several files, all listed in `virtual_meshes`",
                crate::yaml::MAX_DOCUMENTS
            )
        );
    }

    #[test]
    fn a_type_error_names_the_field_and_line_but_not_the_value() {
        let yaml = SEED.replacen("ttlDays: 356", "ttlDays: \"SECRET356\"", 1);
        let err = load(&yaml).unwrap_err().to_string();
        assert!(
            err.contains(
                "spec.certificateAuthority.builtin.ttlDays: invalid type: string, expected u32"
            ),
            "{err}"
        );
        assert!(err.contains("line 18"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let yaml = SEED.replacen("rsaKeySizeBytes: 4096", "rsaKeySizeBytes: -4096", 1);
        let err = load(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("spec.certificateAuthority.builtin.rsaKeySizeBytes: invalid value: integer, expected u32"),
            "{err}"
        );
        assert!(!err.contains("4096"), "{err}");
        let yaml = SEED.replacen(
            "  - name: istio-istio-system-new-remote-cluster",
            "  - name: [SECRET]",
            1,
        );
        let err = load(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("spec.meshes[1].name: invalid type: sequence"),
            "{err}"
        );
        assert!(!err.contains("SECRET"), "{err}");
        // A required key misspelled is missing, and named with its place.
        let yaml = SEED.replacen("      orgName:", "      organization:", 1);
        let err = load(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("spec.certificateAuthority.builtin: missing field `orgName` (spec.certificateAuthority.builtin.organization is not a VirtualMesh field: a misspelling?)"),
            "{err}"
        );
    }

    #[test]
    fn a_misspelled_key_is_refused_by_name_at_every_level() {
        let cases = [
            (
                "federation:",
                "federaton:",
                "spec.federaton is not a VirtualMesh field",
            ),
            (
                "shared: {}",
                "limted: {}",
                "spec.limted is not a VirtualMesh field",
            ),
            (
                "enforceAccessControl: false",
                "enforceAccessControls: true",
                "spec.enforceAccessControls is not a VirtualMesh field",
            ),
            (
                "    builtin:",
                "    biultin:",
                "spec.certificateAuthority.biultin is not a VirtualMesh field",
            ),
            (
                "      orgName:",
                "      orgNam: o\n      orgName:",
                "spec.certificateAuthority.builtin.orgNam is not",
            ),
            (
                "  - name: istio-istio-system-management-plane",
                "  - name: istio-istio-system-management-plane\n    cluster: east",
                "spec.meshes[0].cluster is not a VirtualMesh field (known: name, namespace)",
            ),
            ("spec:", "spex:", "unknown field `spex`"),
        ];
        for (good, typo, needle) in cases {
            let yaml = SEED.replacen(good, typo, 1);
            assert_ne!(yaml, SEED, "{good}");
            let err = load(&yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        // metadata stays open: labels and annotations are the cluster's business.
        let labelled = SEED.replacen(
            "  namespace: service-mesh-hub\nspec:",
            "  namespace: service-mesh-hub\n  labels: {team: mesh}\nspec:",
            1,
        );
        assert_ne!(labelled, SEED);
        load(&labelled).unwrap();
        // So is a status (`kubectl get vmesh -o yaml` writes one): taken, never read.
        let with_status = format!("{SEED}status:\n  observedGeneration: 3\n  conditions: []\n");
        assert_eq!(
            load(&with_status).unwrap().iter().count(),
            load(SEED).unwrap().iter().count()
        );
    }

    #[test]
    fn trust_domains_are_checked_and_sorted() {
        let with = |list: &str| {
            doc(
                "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 2048\n      orgName: o",
                &format!("  trustDomains: {list}\n"),
            )
        };
        let policies = load(&with("[pay.remote, pay.local]")).unwrap();
        let policy = policies.iter().next().unwrap();
        assert_eq!(policy.trust_domains, ["pay.local", "pay.remote"]);
        // Absent: none, and no name constraints.
        let policies = load(&doc(
            "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 2048\n      orgName: o",
            "",
        ))
        .unwrap();
        assert!(policies.iter().next().unwrap().trust_domains.is_empty());
        for (list, needle) in [
            (
                "[Pay.local]",
                "spec.trustDomains: \"Pay.local\" is not a trust domain",
            ),
            (
                "[pay..local]",
                "spec.trustDomains: \"pay..local\" is not a trust domain",
            ),
            (
                "[10.0.0.1]",
                "spec.trustDomains: \"10.0.0.1\" is not a trust domain",
            ),
            (
                "['spiffe://pay.local']",
                "\"spiffe://pay.local\" is not a trust domain",
            ),
            (
                "[pay.local, pay.local]",
                "spec.trustDomains lists \"pay.local\" twice",
            ),
            ("[]", "spec.trustDomains is empty"),
            (
                "pay.local",
                "spec.trustDomains: invalid type: string, expected a sequence",
            ),
        ] {
            let err = load(&with(list)).unwrap_err().to_string();
            assert!(err.contains(needle), "{list}: {needle:?} not in {err:?}");
        }
        let misspelled = SEED.replacen("  meshes:", "  trustDomain: [a.local]\n  meshes:", 1);
        let err = load(&misspelled).unwrap_err().to_string();
        assert!(
            err.contains("spec.trustDomain is not a VirtualMesh field"),
            "{err}"
        );
    }

    /// A VirtualMesh `tenants/<name>` of org `name` and one member, with `trust_domains`
    /// (YAML lines of its spec, or "").
    fn tenant_vm(name: &str, trust_domains: &str) -> String {
        format!(
            "kind: VirtualMesh\nmetadata: {{name: {name}, namespace: tenants}}\nspec:\n  certificateAuthority:\n    builtin: {{ttlDays: 10, rsaKeySizeBytes: 2048, orgName: {name}}}\n  meshes:\n  - {{name: {name}-1, namespace: tenants}}\n{trust_domains}---\n"
        )
    }

    #[test]
    fn virtual_meshes_sharing_the_root_without_trust_domains_are_warned_of() {
        // One virtual mesh: nothing to say.
        assert!(
            load(&tenant_vm("pay", ""))
                .unwrap()
                .trust_domain_warnings()
                .is_empty()
        );
        let both = load(&format!("{}{}", tenant_vm("pay", ""), tenant_vm("web", ""))).unwrap();
        let warnings = both.trust_domain_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("the virtual meshes tenants/pay, tenants/web share one root and trust each other's workloads: tenants/pay, tenants/web are without spec.trustDomains"),
            "{}",
            warnings[0]
        );
        let one = load(&format!(
            "{}{}",
            tenant_vm("pay", "  trustDomains: [pay.local]\n"),
            tenant_vm("web", "")
        ))
        .unwrap();
        let warnings = one.trust_domain_warnings();
        assert!(
            warnings[1].contains("tenants/web is without spec.trustDomains, so the intermediate key of any cluster of it can sign"),
            "{warnings:?}"
        );
        let apart = load(&format!(
            "{}{}",
            tenant_vm("pay", "  trustDomains: [pay.local]\n"),
            tenant_vm("web", "  trustDomains: [web.local]\n")
        ))
        .unwrap();
        assert_eq!(apart.trust_domain_warnings().len(), 1, "only rustls's");
        let overlapping = load(&format!(
            "{}{}",
            tenant_vm("pay", "  trustDomains: [cluster.local, pay.local]\n"),
            tenant_vm("web", "  trustDomains: [cluster.local]\n")
        ))
        .unwrap();
        assert_eq!(
            overlapping.trust_domain_warnings()[1..],
            [
                "the virtual meshes tenants/pay, tenants/web all list the trust domain cluster.local in spec.trustDomains: a cluster of any of them can sign the others' workload identities in it"
            ]
        );
    }

    /// A reload warns again only of a warning whose virtual meshes changed (before, every
    /// SIGHUP repeated them all), and a warning lists 16 of them, then a count (it listed
    /// every one on one line).
    #[test]
    fn a_reload_repeats_only_changed_trust_domain_warnings_each_listing_16() {
        let tenants = |names: &[&str]| {
            load(
                &names
                    .iter()
                    .map(|name| tenant_vm(name, ""))
                    .collect::<String>(),
            )
            .unwrap()
        };
        let names: Vec<String> = (0..20).map(|n| format!("t{n:02}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let twenty = tenants(&names);
        let warnings = twenty.trust_domain_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let sixteen = (0..16)
            .map(|n| format!("tenants/t{n:02}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            warnings[0].starts_with(&format!(
                "the virtual meshes {sixteen} and 4 more share one root and trust each other's workloads: {sixteen} and 4 more are without"
            )),
            "{}",
            warnings[0]
        );
        // Nothing changed, or only what no warning names: nothing to say again.
        assert!(twenty.trust_domain_warnings_new_since(&twenty).is_empty());
        let longer = load(
            &names
                .iter()
                .map(|name| tenant_vm(name, "").replace("ttlDays: 10", "ttlDays: 20"))
                .collect::<String>(),
        )
        .unwrap();
        assert!(longer.trust_domain_warnings_new_since(&twenty).is_empty());
        // One virtual mesh past the 16 listed replaced: the line reads the same, but the
        // set it names changed.
        let replaced = tenants(&[&names[..19], &["t99"]].concat());
        assert_eq!(replaced.trust_domain_warnings(), warnings);
        assert_eq!(replaced.trust_domain_warnings_new_since(&twenty), warnings);
        // One given trust domains: both warnings are news.
        let constrained = load(&format!(
            "{}{}",
            tenant_vm("t00", "  trustDomains: [t00.local]\n"),
            names[1..]
                .iter()
                .map(|name| tenant_vm(name, ""))
                .collect::<String>()
        ))
        .unwrap();
        assert_eq!(
            constrained.trust_domain_warnings_new_since(&twenty).len(),
            2
        );
        assert!(
            constrained
                .trust_domain_warnings_new_since(&constrained)
                .is_empty()
        );
    }

    #[test]
    fn trust_domains_warn_that_rustls_peers_refuse_name_constraints() {
        let one = load(&tenant_vm("pay", "  trustDomains: [pay.local]\n")).unwrap();
        let warnings = one.trust_domain_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("virtual mesh tenants/pay sets spec.trustDomains: its intermediates carry URI name constraints, which rustls-webpki does not support, so rustls peers (Istio ambient mode's ztunnel among them) refuse every workload certificate"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn a_trust_domain_below_another_virtual_meshs_is_warned_of() {
        let nested = load(&format!(
            "{}{}",
            tenant_vm("pay", "  trustDomains: [pay.local]\n"),
            tenant_vm("eu", "  trustDomains: [eu.pay.local]\n")
        ))
        .unwrap();
        assert_eq!(
            nested.trust_domain_warnings()[1..],
            [
                "virtual mesh tenants/pay lists the trust domain pay.local and tenants/eu lists eu.pay.local, a subdomain of it: Go (istiod, proxyless gRPC) reads a URI name constraint as covering subdomains, so a cluster of tenants/pay can sign workload identities in eu.pay.local that Go accepts (openssl refuses them); use trust domains that are not subdomains of another virtual mesh's"
            ]
        );
        // Within one virtual mesh, a domain and its subdomain belong to the same tenant;
        // a name that only ends like another (`xpay.local`) is no subdomain.
        let own = load(&format!(
            "{}{}",
            tenant_vm("pay", "  trustDomains: [pay.local, eu.pay.local]\n"),
            tenant_vm("web", "  trustDomains: [xpay.local]\n")
        ))
        .unwrap();
        assert_eq!(own.trust_domain_warnings().len(), 1, "only rustls's");
    }

    #[test]
    fn an_rsa_minimum_above_the_largest_rsa_key_accepted_is_refused() {
        let with_minimum = |bits: u32| {
            doc(
                &format!(
                    "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: {bits}\n      orgName: o"
                ),
                "",
            )
        };
        let policies = load(&with_minimum(8192)).unwrap();
        let policy = policies.iter().next().unwrap();
        assert_eq!(policy.min_rsa_bits, 8192);
        for bits in [8193, 16_384] {
            let err = load(&with_minimum(bits)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("rsaKeySizeBytes is the minimum RSA size in bits; {bits} is above the largest RSA key meshca accepts (8192 bits)"))
                    && err.contains("use at most 8192"),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_kind_and_duplicates_are_refused() {
        let err = load("kind: Mesh\nmetadata: {name: a, namespace: b}\n").unwrap_err();
        assert!(err.to_string().contains("expected VirtualMesh"), "{err}");
        let one = doc(
            "    builtin:\n      ttlDays: 10\n      rsaKeySizeBytes: 2048\n      orgName: o",
            "",
        );
        let err = load(&format!("{one}---\n{one}")).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }

    #[test]
    fn object_refs_parse_strictly() {
        for good in ["a/b", "smh/cluster-a", "ns/a.b", "0/0-a.b-0", "a/1.2.3"] {
            assert!(good.parse::<ObjectRef>().is_ok(), "{good} refused");
        }
        let long_label = "a".repeat(63);
        assert!(
            format!("{long_label}/{long_label}")
                .parse::<ObjectRef>()
                .is_ok()
        );
        for bad in ["a", "/b", "a/", "A/b", "a/b/c", "a/-b", "a/b c"] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad} accepted");
        }
        // The review's counterexamples: labels that are empty or start or end with '-'
        // passed, and `federation render` wrote objects named `a..b-federation`, which
        // the API server refuses; and a namespace is one label.
        for (bad, message) in [
            (
                "ns/a..b",
                "\"ns/a..b\": name \"a..b\" is not a DNS subdomain",
            ),
            (
                "ns/0-.a",
                "\"ns/0-.a\": name \"0-.a\" is not a DNS subdomain",
            ),
            (
                "ns/a.-0",
                "\"ns/a.-0\": name \"a.-0\" is not a DNS subdomain",
            ),
            ("ns/a.", "\"ns/a.\": name \"a.\" is not a DNS subdomain"),
            ("a.b/vm", "\"a.b/vm\": namespace \"a.b\" is not a DNS label"),
            ("a-/vm", "\"a-/vm\": namespace \"a-\" is not a DNS label"),
            ("a/b/c", "\"a/b/c\" is not of the form <namespace>/<name>"),
        ] {
            let err = bad.parse::<ObjectRef>().unwrap_err().to_string();
            assert!(err.starts_with(message), "{bad}: {err}");
        }
        let err = format!("{}a/b", long_label)
            .parse::<ObjectRef>()
            .unwrap_err();
        assert!(matches!(err, ObjectRefError::Namespace { .. }), "{err}");
        assert!(
            format!("a/{}", "b".repeat(253))
                .parse::<ObjectRef>()
                .is_ok()
        );
        let err = format!("a/{}", ["b"; 128].join("."))
            .parse::<ObjectRef>()
            .unwrap_err();
        assert!(matches!(err, ObjectRefError::Name { .. }), "{err}");
        // In a VirtualMesh: the field and the value.
        let yaml = "kind: VirtualMesh\nmetadata: {name: a..b, namespace: ns}\nspec:\n  certificateAuthority:\n    builtin: {ttlDays: 10, rsaKeySizeBytes: 2048, orgName: o}\n  meshes:\n  - {name: m, namespace: ns}\n";
        let err = load(yaml).unwrap_err().to_string();
        assert!(
            err.contains("metadata: \"ns/a..b\": name \"a..b\" is not a DNS subdomain"),
            "{err}"
        );
        let yaml = yaml
            .replace("name: a..b", "name: vm")
            .replace("{name: m, namespace: ns}", "{name: m, namespace: a.b}");
        let err = load(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("spec.meshes: \"a.b/m\": namespace \"a.b\" is not a DNS label"),
            "{err}"
        );
    }
}
