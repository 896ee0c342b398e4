//! The signer's configuration file (TOML). Relative paths are relative to the file itself,
//! so a config directory can be moved as a whole. Every problem is reported with the field
//! it concerns; unknown fields are errors (a typo must not silently weaken policy).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::backend::pkcs11_uri::Pkcs11Uri;
use crate::backend::vault::config::{VaultSection, VaultSettings};
use crate::pki::keys::{KeyType, PublicKeyKind};
use crate::pki::lint::lint_root_profile;
use crate::pki::profile::RootCa;
use crate::policy::rules::check_root_strength;
use crate::policy::{ObjectRef, PolicySet, VirtualMeshPolicy};
use crate::secret::{SecretFile, SecretSource};
use crate::signer::audit::rfc3339;
use crate::tlsutil::{CrlOverdue, IssuerPin};

mod granted_meshes;
mod identities;

/// Default address of the mTLS API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    ops_listen: Option<String>,
    virtual_meshes: Vec<PathBuf>,
    audit_log: PathBuf,
    tls: TlsSection,
    root: RootSection,
    pkcs11: Option<Pkcs11Section>,
    vault: Option<VaultSection>,
    #[serde(default)]
    clients: Vec<ClientSection>,
    #[serde(default)]
    limits: Option<LimitsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    sign_requests_per_minute: Option<u32>,
    sign_burst: Option<u32>,
    max_connections: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    #[serde(default)]
    client_crls: Vec<PathBuf>,
    #[serde(default)]
    client_crl_overdue: CrlOverdue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootSection {
    certificate: PathBuf,
    #[serde(default)]
    next_certificate: Option<PathBuf>,
    #[serde(default)]
    previous_certificate: Option<PathBuf>,
    virtual_mesh: ObjectRef,
    key_type: KeyType,
    #[serde(default)]
    common_name: Option<String>,
    backend: BackendKind,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Pkcs11,
    Vault,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pkcs11Section {
    module: Option<PathBuf>,
    key: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    timeout_seconds: Option<u64>,
    softhsm2_conf: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSection {
    identity: String,
    allow: Vec<GrantSection>,
    /// The CA in `tls.client_ca` its certificate must chain to.
    #[serde(default)]
    issuer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSection {
    virtual_mesh: ObjectRef,
    mesh: ObjectRef,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// The file cannot be read; the message names it.
    #[error("{0}")]
    Unreadable(String),
}

/// The PKCS#11 backend's settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub key: Pkcs11Uri,
    pub pin: SecretSource,
    /// Sessions in the signing pool, each with its own token thread.
    pub sessions: usize,
    /// How long a signing waits for the token, its turn for a session included: a token
    /// that hangs (a network HSM cut off, a stuck lock) answers 503, not never.
    pub timeout: Duration,
    /// SOFTHSM2_CONF to set for the module, if the config names one.
    pub softhsm2_conf: Option<PathBuf>,
}

/// The selected backend's section (see [`SignerConfig::backend`]).
#[derive(Debug, Clone, Copy)]
pub enum BackendSettings<'a> {
    Pkcs11(&'a Pkcs11Settings),
    Vault(&'a VaultSettings),
}

/// Settings of the root CA, whatever the backend.
#[derive(Debug, Clone)]
pub struct RootSettings {
    pub certificate: PathBuf,
    /// `next_certificate`: the root announced ahead of a root change.
    pub next: Option<AnnouncedRoot>,
    /// `previous_certificate`: the root in force before the last root change, announced
    /// until it is retired.
    pub previous: Option<AnnouncedRoot>,
    pub virtual_mesh: ObjectRef,
    pub key_type: KeyType,
    /// `root.common_name` as configured, unchecked: only `root init` uses it, through
    /// [`SignerConfig::root_common_name`].
    pub common_name: Option<String>,
    pub backend: BackendKind,
}

impl RootSettings {
    /// The roots announced besides the one in force: the next root, then the previous one.
    pub fn announced(&self) -> impl Iterator<Item = &AnnouncedRoot> {
        self.next.iter().chain(self.previous.iter())
    }
}

/// `root.common_name`, or `<orgName> root CA` without one: 1 to 64 characters without
/// control characters, as X.520 bounds a commonName (strict parsers refuse a longer one,
/// and a root's name is in every certificate it issues). Checked rather than cut: a
/// root's name cannot be changed once it is made. Checked by `root init` only: a root
/// that exists (made by an older build that cut or allowed the name) must keep serving.
fn root_common_name(configured: Option<&str>, org_name: &str) -> Result<String, String> {
    let (name, whose) = match configured {
        Some(name) => (name.to_string(), "root.common_name".to_string()),
        None => (
            format!("{org_name} root CA"),
            format!("the default root common name ({org_name:?} root CA)"),
        ),
    };
    let chars = name.chars().count();
    if name.trim().is_empty() {
        return Err(format!("{whose} is empty"));
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err(format!(
            "{whose} has leading or trailing spaces or control characters"
        ));
    }
    let most = crate::pki::profile::MAX_COMMON_NAME;
    if chars > most {
        return Err(format!(
            "{whose} has {chars} characters; a certificate's common name has at most {most}{}",
            if configured.is_none() {
                ": set root.common_name"
            } else {
                ""
            }
        ));
    }
    Ok(name)
}

/// Which side of a root change an announced root is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The root the signer will switch to: the agents trust it ahead of the switch, so
    /// that no cluster refuses another's workloads while they move.
    Next,
    /// The root the signer switched from: a cluster that joins before the others have
    /// moved trusts it too, until the old root is retired.
    Previous,
}

impl Announcement {
    /// The config key that names it.
    pub fn key(self) -> &'static str {
        match self {
            Announcement::Next => "root.next_certificate",
            Announcement::Previous => "root.previous_certificate",
        }
    }

    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Announcement::Next => "next",
            Announcement::Previous => "previous",
        }
    }

    /// How logs, audit records and `serve --check` call it.
    pub fn name(self) -> &'static str {
        match self {
            Announcement::Next => "next root",
            Announcement::Previous => "previous root",
        }
    }
}

/// A root the signer announces besides the one it issues under (`[root]
/// next_certificate` or `previous_certificate`): the agents add it to every cluster's
/// root-cert.pem, so that clusters on either side of a root change keep trusting each
/// other's workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedRoot {
    pub announcement: Announcement,
    pub path: PathBuf,
    /// The certificate, canonical PEM.
    pub pem: String,
    /// SHA-256 of its DER, lowercase hex.
    pub fingerprint_sha256: String,
    pub key_kind: PublicKeyKind,
    pub not_after: SystemTime,
    /// The root key vouching for it, made by the running signer (never read from the
    /// config): what the agents need to take it.
    pub cross_cert: Option<crate::pki::cross::CrossCert>,
}

impl AnnouncedRoot {
    /// Reads and checks the next root as the root it will become: one self-signed CA
    /// certificate in meshca's root profile, with the root virtual mesh's org, key rule and
    /// lifetime, strong enough for every virtual mesh, and already valid (an agent trusts
    /// only a root valid now). One that has since expired is kept, as the previous root is:
    /// the agents skip it, the start, a reload and `serve --check` warn, and a restart must
    /// not fail because time passed.
    pub fn load_next(
        path: &Path,
        root_policy: &VirtualMeshPolicy,
        policies: &PolicySet,
        now: SystemTime,
    ) -> Result<Self, String> {
        let (announced, root) = Self::read(Announcement::Next, path)?;
        let named = |problem: String| announced.problem(problem);
        let tbs = root.certificate.tbs_certificate();
        lint_root_profile(
            tbs,
            &root_policy.org_name,
            root_policy.min_rsa_bits,
            root_policy.max_ttl,
        )
        .map_err(|e| named(e.to_string()))?;
        check_root_strength(&root.key_kind, policies).map_err(named)?;
        let not_before = tbs.validity().not_before.to_system_time();
        if now < not_before {
            return Err(named(format!(
                "not valid before {}: an agent would not trust it yet",
                rfc3339(not_before)
            )));
        }
        Ok(announced)
    }

    /// Reads the previous root: one self-signed CA certificate. It was the root in force,
    /// so no rule of today binds it (a root change may be made to meet a stricter one), and
    /// an expired one is kept (the agents skip it; `serve --check` says so): a start must
    /// not fail because a root on its way out ended.
    pub fn load_previous(path: &Path) -> Result<Self, String> {
        Self::read(Announcement::Previous, path).map(|(announced, _)| announced)
    }

    fn read(announcement: Announcement, path: &Path) -> Result<(Self, RootCa), String> {
        let key = announcement.key();
        let pem = crate::fsutil::read_text(path).map_err(|e| format!("{key}: {e}"))?;
        let root = RootCa::from_pem(&pem).map_err(|e| format!("{key} {}: {e}", path.display()))?;
        let announced = AnnouncedRoot {
            announcement,
            path: path.to_path_buf(),
            pem: root.pem.clone(),
            fingerprint_sha256: root.fingerprint_sha256.clone(),
            key_kind: root.key_kind.clone(),
            not_after: root.not_after,
            cross_cert: None,
        };
        Ok((announced, root))
    }

    /// How audit records name it: its SHA-256, and its cross certificate once made.
    pub fn described(&self) -> String {
        match &self.cross_cert {
            Some(cross) => format!(
                "{} sha256 {} ({})",
                self.announcement.name(),
                self.fingerprint_sha256,
                cross.describe()
            ),
            None => format!(
                "{} sha256 {}",
                self.announcement.name(),
                self.fingerprint_sha256
            ),
        }
    }

    /// `problem`, prefixed with the config key and the file.
    pub fn problem(&self, problem: impl fmt::Display) -> String {
        format!(
            "{} {}: {problem}",
            self.announcement.key(),
            self.path.display()
        )
    }
}

/// Who may ask for which (virtual mesh, mesh) pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthorizationTable {
    grants: BTreeMap<String, BTreeSet<(ObjectRef, ObjectRef)>>,
    /// The client CA each identity that has an `issuer` must chain to.
    issuers: BTreeMap<String, IssuerPin>,
}

impl AuthorizationTable {
    pub fn allows(&self, identity: &str, virtual_mesh: &ObjectRef, mesh: &ObjectRef) -> bool {
        self.grants
            .get(identity)
            .is_some_and(|g| g.contains(&(virtual_mesh.clone(), mesh.clone())))
    }

    pub fn knows(&self, identity: &str) -> bool {
        self.grants.contains_key(identity)
    }

    /// The `(virtual mesh, mesh)` pairs `identity` may ask for, if it is a client.
    pub fn grants_of(&self, identity: &str) -> Option<&BTreeSet<(ObjectRef, ObjectRef)>> {
        self.grants.get(identity)
    }

    /// Every client identity with its `(virtual mesh, mesh)` grants, in identity order.
    pub fn clients(&self) -> impl Iterator<Item = (&str, &BTreeSet<(ObjectRef, ObjectRef)>)> {
        self.grants.iter().map(|(id, grants)| (id.as_str(), grants))
    }

    /// The CA `identity`'s certificate must chain to, if it is pinned to one.
    pub fn issuer_of(&self, identity: &str) -> Option<&IssuerPin> {
        self.issuers.get(identity)
    }

    /// Every pinned identity with its issuer, in identity order.
    pub fn issuers(&self) -> impl Iterator<Item = (&str, &IssuerPin)> {
        self.issuers.iter().map(|(id, pin)| (id.as_str(), pin))
    }

    pub fn pin_issuer(&mut self, identity: &str, issuer: IssuerPin) {
        self.issuers.insert(identity.to_string(), issuer);
    }

    pub fn insert(&mut self, identity: &str, virtual_mesh: ObjectRef, mesh: ObjectRef) {
        self.grants
            .entry(identity.to_string())
            .or_default()
            .insert((virtual_mesh, mesh));
    }
}

/// Bounds on what one client, or all of them together, can make the signer do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Signing requests per minute per client identity (sustained).
    pub sign_requests_per_minute: u32,
    /// Signing requests a client may make at once.
    pub sign_burst: u32,
    /// Connections open at once on the API port, from their accept on; beyond it a new
    /// one takes the slot of the one idle longest, or, once those in their TLS handshake
    /// hold half, of the one in its handshake longest (see `ops_http::ConnectionBound`).
    pub max_connections: usize,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Request headers must arrive within this.
    pub header_timeout: Duration,
    /// A signing request's body must arrive within this once its handler starts reading.
    pub body_timeout: Duration,
    /// On SIGTERM, how long open connections may take to finish; requests still under way
    /// then are audited as `signer_stopping` before the process exits. Keep it below the
    /// supervisor's stop timeout (the systemd unit's TimeoutStopSec, Kubernetes'
    /// terminationGracePeriodSeconds).
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sign_requests_per_minute: 600,
            sign_burst: 60,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The signer configuration, loaded and validated.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub ops_listen: Option<SocketAddr>,
    pub policies: PolicySet,
    pub audit_log: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    /// CRLs (PEM) for client certificates; a revoked client is refused at the handshake.
    pub client_crls: Vec<PathBuf>,
    /// What a client gets while its CRL is past its `nextUpdate`.
    pub client_crl_overdue: CrlOverdue,
    pub root: RootSettings,
    pub pkcs11: Option<Pkcs11Settings>,
    pub vault: Option<VaultSettings>,
    pub authorization: AuthorizationTable,
    pub limits: Limits,
}

impl SignerConfig {
    /// Refuses an API listener (`listen_override`, `serve --listen`, else `listen`) and
    /// `ops_listen` that cannot both bind. `serve` and `serve --check` check it on the
    /// address the start uses, not the file's alone: `--listen` makes the file's `listen`
    /// irrelevant, and may itself take `ops_listen`'s port.
    pub fn check_listeners(&self, listen_override: Option<SocketAddr>) -> Result<(), ConfigError> {
        listeners_fit(
            listen_override.unwrap_or(self.listen),
            listen_override.is_some(),
            self.ops_listen,
        )
        .map_err(|message| invalid(&self.path, message))
    }

    /// Reads, resolves and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::fsutil::read_text(path).map_err(ConfigError::Unreadable)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| invalid(path, toml_error(text, &e)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let err = |message: String| invalid(path, message);

        let listen =
            parse_addr(file.listen.as_deref().unwrap_or(DEFAULT_LISTEN), "listen").map_err(err)?;
        let ops_listen = file
            .ops_listen
            .as_deref()
            .map(|a| parse_addr(a, "ops_listen"))
            .transpose()
            .map_err(err)?;
        // Whether `listen` and `ops_listen` can both bind is checked on the address a start
        // uses (`--listen` overrides the file's): `check_listeners`.

        let mut policies = PolicySet::default();
        if file.virtual_meshes.is_empty() {
            return Err(err("virtual_meshes lists no files".into()));
        }
        for vm_path in &file.virtual_meshes {
            let vm_path = resolve(vm_path);
            let yaml = crate::fsutil::read_text(&vm_path).map_err(err)?;
            policies
                .add_yaml(&vm_path.display().to_string(), &yaml)
                .map_err(|e| err(e.to_string()))?;
        }
        if policies.is_empty() {
            return Err(err(
                "no VirtualMesh documents found in virtual_meshes".into()
            ));
        }

        let root_policy = policies.get(&file.root.virtual_mesh).ok_or_else(|| {
            err(format!(
                "root.virtual_mesh {} is not among the loaded VirtualMeshes",
                file.root.virtual_mesh
            ))
        })?;
        let next = file
            .root
            .next_certificate
            .as_deref()
            .map(|p| {
                AnnouncedRoot::load_next(&resolve(p), root_policy, &policies, SystemTime::now())
            })
            .transpose()
            .map_err(err)?;
        let previous = file
            .root
            .previous_certificate
            .as_deref()
            .map(|p| AnnouncedRoot::load_previous(&resolve(p)))
            .transpose()
            .map_err(err)?;
        let root = RootSettings {
            certificate: resolve(&file.root.certificate),
            next,
            previous,
            common_name: file.root.common_name.clone(),
            virtual_mesh: file.root.virtual_mesh.clone(),
            key_type: file.root.key_type,
            backend: file.root.backend,
        };

        // Only the selected backend's section: a stale one would mislead the reader.
        let (pkcs11, vault) = match (root.backend, file.pkcs11, file.vault) {
            (BackendKind::Pkcs11, Some(section), None) => {
                (Some(pkcs11_settings(section, &resolve).map_err(err)?), None)
            }
            (BackendKind::Vault, None, Some(section)) => {
                (None, Some(section.resolve(&resolve).map_err(err)?))
            }
            (backend, pkcs11, vault) => {
                let name = match backend {
                    BackendKind::Pkcs11 => "pkcs11",
                    BackendKind::Vault => "vault",
                };
                let message = if pkcs11.is_some() && vault.is_some() {
                    format!(
                        "root.backend is \"{name}\": remove the other backend's section ([pkcs11] or [vault])"
                    )
                } else if pkcs11.is_none() && vault.is_none() {
                    format!("root.backend is \"{name}\" but there is no [{name}] section")
                } else {
                    format!(
                        "root.backend is \"{name}\" but the config has the other backend's section instead of [{name}]"
                    )
                };
                return Err(err(message));
            }
        };

        let mut authorization = AuthorizationTable::default();
        // Each identity as compared for a collision, and as written.
        let mut folded: BTreeMap<String, &str> = BTreeMap::new();
        for client in &file.clients {
            let identity = client.identity.trim();
            if identity.is_empty() {
                return Err(err("clients: identity is empty".into()));
            }
            if let Some(why) = identities::never_matches(identity) {
                return Err(err(format!(
                    "clients: identity {identity:?} can never be a client certificate's: {why}"
                )));
            }
            if authorization.knows(identity) {
                return Err(err(format!(
                    "clients: identity {identity:?} is listed twice"
                )));
            }
            if let Some(other) = folded.insert(identities::folded(identity), identity) {
                return Err(err(format!(
                    "clients: identities {other:?} and {identity:?} differ only in case where case does not count (a URI's scheme and host, a whole DNS or CN identity): one client's certificate could be either's; keep one"
                )));
            }
            if client.allow.is_empty() {
                return Err(err(format!(
                    "clients: {identity:?} has an empty allow list"
                )));
            }
            for grant in &client.allow {
                let policy = policies.get(&grant.virtual_mesh).ok_or_else(|| {
                    err(format!(
                        "clients: {identity:?} is granted unknown virtual mesh {}",
                        grant.virtual_mesh
                    ))
                })?;
                check_member(policy, &grant.mesh)
                    .map_err(|m| err(format!("clients: {identity:?}: {m}")))?;
                authorization.insert(identity, grant.virtual_mesh.clone(), grant.mesh.clone());
            }
            if let Some(issuer) = &client.issuer {
                let pin = IssuerPin::parse(issuer)
                    .map_err(|m| err(format!("clients: {identity:?}: {m}")))?;
                authorization.pin_issuer(identity, pin);
            }
        }

        granted_meshes::check_granted_meshes(&policies, &authorization).map_err(err)?;
        // The root in force is read at start and reload ([`Self::check_apart_from_root`]);
        // the announced ones are read here.
        let announced: Vec<(String, x509_cert::Certificate)> = root
            .announced()
            .filter_map(|a| {
                let certificate = crate::pki::pem::decode_certificates(&a.pem).ok()?;
                let name = format!(
                    "the {} ({} {})",
                    a.announcement.name(),
                    a.announcement.key(),
                    a.path.display()
                );
                Some((name, certificate.into_iter().next()?))
            })
            .collect();
        granted_meshes::check_apart_from_roots(
            &policies,
            &authorization,
            announced
                .iter()
                .map(|(name, c)| (name.clone(), c.tbs_certificate().subject())),
            " or announce a root of another common name",
        )
        .map_err(err)?;

        let limits = limits(file.limits).map_err(err)?;
        Ok(SignerConfig {
            path: path.to_path_buf(),
            limits,
            client_crls: file.tls.client_crls.iter().map(|p| resolve(p)).collect(),
            client_crl_overdue: file.tls.client_crl_overdue,
            listen,
            ops_listen,
            audit_log: resolve(&file.audit_log),
            tls_cert: resolve(&file.tls.cert),
            tls_key: resolve(&file.tls.key),
            client_ca: resolve(&file.tls.client_ca),
            root,
            pkcs11,
            vault,
            policies,
            authorization,
        })
    }

    /// The VirtualMesh that governs the root.
    pub fn root_policy(&self) -> &VirtualMeshPolicy {
        // Checked at load time.
        self.policies
            .get(&self.root.virtual_mesh)
            .expect("root.virtual_mesh validated at load")
    }

    /// The section of the backend `root.backend` selects (present after a load; an error
    /// only for a config put together by hand without it).
    pub fn backend(&self) -> Result<BackendSettings<'_>, String> {
        match self.root.backend {
            BackendKind::Pkcs11 => self
                .pkcs11
                .as_ref()
                .map(BackendSettings::Pkcs11)
                .ok_or_else(|| "no [pkcs11] section".to_string()),
            BackendKind::Vault => self
                .vault
                .as_ref()
                .map(BackendSettings::Vault)
                .ok_or_else(|| "no [vault] section".to_string()),
        }
    }

    /// `root init`'s first check, whatever the backend: the root's own virtual mesh
    /// accepts `root.key_type`.
    pub fn check_root_key_type(&self) -> Result<(), String> {
        let policy = self.root_policy();
        let key_type = self.root.key_type;
        crate::policy::rules::check_public_key(&key_type.public_key_kind(), policy.min_rsa_bits)
            .map_err(|d| {
                format!(
                    "root.key_type {key_type} does not satisfy virtual mesh {}: {}",
                    policy.id, d.message
                )
            })
    }

    /// The name `root init` gives a new root: `root.common_name`, or `<orgName> root CA`,
    /// refused if X.520 does not allow it (see `root_common_name` above), or if a granted
    /// mesh's intermediate would carry the root's subject (`O=<orgName>, CN=<name>`).
    pub fn root_common_name(&self) -> Result<String, String> {
        let org = &self.root_policy().org_name;
        let name = root_common_name(self.root.common_name.as_deref(), org)?;
        let subject = crate::pki::profile::subject_name(org, &name)
            .map_err(|e| format!("root.common_name {name:?}: {e}"))?;
        granted_meshes::check_apart_from_roots(
            &self.policies,
            &self.authorization,
            [("the new root".to_string(), &subject)],
            " or set root.common_name to another name",
        )?;
        Ok(name)
    }

    /// Refuses a granted mesh whose intermediate would carry the subject of `root`, the
    /// root in force (read at start and at each reload, not with the config).
    pub fn check_apart_from_root(&self, root: &x509_cert::name::Name) -> Result<(), ConfigError> {
        granted_meshes::check_apart_from_roots(
            &self.policies,
            &self.authorization,
            [(
                format!(
                    "the root (root.certificate {})",
                    self.root.certificate.display()
                ),
                root,
            )],
            " (a root's name cannot change)",
        )
        .map_err(|message| invalid(&self.path, message))
    }

    /// `root init` writes the new root's certificate to `root.certificate`: a file already
    /// there is some root's certificate, perhaps the one in force (a root change's config
    /// copied without naming another file), and the signer would not start with it
    /// replaced. Only `--force` replaces it; checked before anything is made.
    pub fn check_root_certificate_free(&self, force: bool) -> Result<(), RootCertificateTaken> {
        let path = &self.root.certificate;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RootCertificateTaken::Unknown(format!(
                "cannot check whether the root certificate {} exists: {e}",
                path.display()
            ))),
            Ok(_) if force => Ok(()),
            Ok(_) => Err(RootCertificateTaken::Exists(format!(
                "the root certificate {} already exists: root init would replace it with a new root's, and a signer whose key is that root's would not start again. For a new root (a root change), name another file in [root] certificate (README \"Changing the root\"); to replace this one, pass --force",
                path.display()
            ))),
        }
    }
}

/// Why `root init` may not write the root certificate file: it is there (a script may
/// take that as "already done"), or whether it is could not be told.
#[derive(Debug, thiserror::Error)]
pub enum RootCertificateTaken {
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Unknown(String),
}

fn limits(section: Option<LimitsSection>) -> Result<Limits, String> {
    let defaults = Limits::default();
    let Some(section) = section else {
        return Ok(defaults);
    };
    let limits = Limits {
        sign_requests_per_minute: section
            .sign_requests_per_minute
            .unwrap_or(defaults.sign_requests_per_minute),
        sign_burst: section.sign_burst.unwrap_or(defaults.sign_burst),
        max_connections: section.max_connections.unwrap_or(defaults.max_connections),
        handshake_timeout: millis_or(section.handshake_timeout_ms, defaults.handshake_timeout),
        header_timeout: millis_or(section.header_timeout_ms, defaults.header_timeout),
        body_timeout: millis_or(section.body_timeout_ms, defaults.body_timeout),
        drain_timeout: millis_or(section.drain_timeout_ms, defaults.drain_timeout),
    };
    if limits.sign_requests_per_minute == 0 || limits.sign_burst == 0 {
        return Err("limits: sign_requests_per_minute and sign_burst must be at least 1".into());
    }
    if !(1..=MAX_CONNECTIONS_LIMIT).contains(&limits.max_connections) {
        return Err(format!(
            "limits.max_connections must be between 1 and {MAX_CONNECTIONS_LIMIT}"
        ));
    }
    for (name, timeout) in [
        ("handshake_timeout_ms", limits.handshake_timeout),
        ("header_timeout_ms", limits.header_timeout),
        ("body_timeout_ms", limits.body_timeout),
        ("drain_timeout_ms", limits.drain_timeout),
    ] {
        if timeout.is_zero() {
            return Err(format!("limits.{name} must be positive"));
        }
        if timeout > MAX_LIMIT_TIMEOUT {
            return Err(format!(
                "limits.{name} must be at most {} (5 minutes), got {}",
                MAX_LIMIT_TIMEOUT.as_millis(),
                timeout.as_millis()
            ));
        }
    }
    Ok(limits)
}

/// A `*_ms` setting as a duration, or the default when it is not set.
fn millis_or(ms: Option<u64>, default: Duration) -> Duration {
    ms.map(Duration::from_millis).unwrap_or(default)
}

/// Longest `[limits] *_timeout_ms`, as for `pkcs11.timeout_seconds`: a handshake, header or
/// body slower than this is a stalled or hostile peer holding one of `max_connections`
/// slots, and a drain this long already outlasts every supervisor's stop timeout.
const MAX_LIMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Far above what one process can hold open, and small enough for a semaphore.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

fn check_member(policy: &VirtualMeshPolicy, mesh: &ObjectRef) -> Result<(), String> {
    if policy.has_member(mesh) {
        Ok(())
    } else {
        Err(format!(
            "mesh {mesh} is not a member of virtual mesh {}",
            policy.id
        ))
    }
}

/// A module path with a slash in it: a bare name is looked up by the dynamic loader
/// (LD_LIBRARY_PATH, its cache), so the environment would choose the code that holds the
/// root key's sessions, and not the file `serve --check` checked.
fn never_searched(module: PathBuf) -> PathBuf {
    if module.parent().is_some_and(|p| p.as_os_str().is_empty()) {
        Path::new(".").join(module)
    } else {
        module
    }
}

fn pkcs11_settings(
    section: Pkcs11Section,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Pkcs11Settings, String> {
    let key: Pkcs11Uri = section
        .key
        .parse()
        .map_err(|e| format!("pkcs11.key: {e}"))?;
    let module = match (&section.module, &key.module_path) {
        (Some(m), Some(uri)) if resolve(m) != resolve(Path::new(uri)) => {
            // Which one wins would decide the token `root init` makes the root in.
            return Err(format!(
                "pkcs11.module ({}) and the key URI's module-path ({}) name different modules: set one",
                m.display(),
                uri
            ));
        }
        (Some(m), _) => resolve(m),
        (None, Some(m)) => resolve(Path::new(m)),
        (None, None) => {
            return Err("pkcs11.module is required (or module-path in the key URI)".into());
        }
    };
    let module = never_searched(module);
    let uri_pin = key
        .pin_source
        .as_deref()
        .map(|p| PathBuf::from(p.strip_prefix("file:").unwrap_or(p)));
    let pin = match (section.pin_file, section.pin_env, uri_pin) {
        (Some(file), None, None) => {
            SecretSource::File(SecretFile::new("pkcs11.pin_file", &file, resolve(&file)))
        }
        (None, Some(env), None) => SecretSource::env("pkcs11.pin_env", env)?,
        (None, None, Some(file)) => SecretSource::File(SecretFile::new(
            "pkcs11.key pin-source",
            &file,
            resolve(&file),
        )),
        (None, None, None) => {
            return Err("pkcs11: set pin_file or pin_env (PINs are never accepted inline or on the command line)".into());
        }
        _ => {
            return Err(
                "pkcs11: set only one of pin_file, pin_env or pin-source in the key URI".into(),
            );
        }
    };
    let sessions = section.sessions.unwrap_or_else(default_sessions);
    if !(1..=MAX_SESSIONS).contains(&sessions) {
        return Err(format!(
            "pkcs11.sessions must be between 1 and {MAX_SESSIONS}, got {sessions}"
        ));
    }
    let timeout = match section.timeout_seconds {
        None => DEFAULT_TOKEN_TIMEOUT,
        Some(seconds @ 1..=300) => Duration::from_secs(seconds),
        Some(seconds) => {
            return Err(format!(
                "pkcs11.timeout_seconds must be between 1 and 300, got {seconds}"
            ));
        }
    };
    Ok(Pkcs11Settings {
        module,
        key,
        pin,
        sessions,
        timeout,
        softhsm2_conf: section.softhsm2_conf.map(|p| resolve(&p)),
    })
}

/// How long a signing waits for the token by default: far above a loaded token's queue
/// (milliseconds), below the agents' own 60 s wait, so they get the signer's answer.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Most PKCS#11 sessions a signer opens.
const MAX_SESSIONS: usize = 256;
/// Most sessions opened by default: small tokens allow few (a YubiHSM 2 has 16), and more
/// concurrent signings than this gain nothing on a signer's load.
const MAX_DEFAULT_SESSIONS: usize = 16;

/// Two sessions (so two token threads) per CPU, at most [`MAX_DEFAULT_SESSIONS`]. An
/// issuance holds its token thread from building the certificate to checking the
/// signature, and a token call can wait on the token's own locks (SoftHSM) or on the
/// network (a network HSM); with one per CPU the cores sat idle part of the time (`make
/// bench`, ECDSA P-256 on 2 CPUs, measured before the token threads: about 4,200
/// signings/s with 2 sessions, 5,100 with 4).
pub fn default_sessions() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_mul(2)
        .min(MAX_DEFAULT_SESSIONS)
}

/// A TOML error without the source snippet toml prints by default: the offending line
/// could hold a secret someone pasted inline.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = without_values(error.message());
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// serde's "invalid type: integer `123456`, expected a string" without the value: a PIN
/// or token written where its variable's or file's name belongs would be printed back.
/// Field names (as in "unknown field `pin`") stay: they are the point of the message.
fn without_values(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (unexpected, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
            let kind = unexpected
                .split(['`', '"', '\''])
                .next()
                .unwrap_or("")
                .trim();
            let expected = if expected.is_empty() {
                String::new()
            } else {
                format!(", expected {expected}")
            };
            return format!("{prefix}{kind} (value not shown){expected}");
        }
    }
    message.to_string()
}

fn parse_addr(value: &str, field: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{field}: {value:?} is not an address like 127.0.0.1:8443"))
}

/// Why the API listener at `listen` (given by `--listen` if `overridden`) and the ops
/// listener cannot both bind, if they cannot.
pub fn listeners_fit(
    listen: SocketAddr,
    overridden: bool,
    ops_listen: Option<SocketAddr>,
) -> Result<(), String> {
    match ops_listen {
        Some(ops) if listeners_collide(listen, ops) => {
            let name = if overridden { "--listen" } else { "listen" };
            Err(format!(
                "ops_listen {ops} and {name} {listen} take the same port: the second listener could not bind (address already in use); give ops_listen another port"
            ))
        }
        _ => Ok(()),
    }
}

/// Whether two listeners cannot both bind: the same port (not 0, which the system picks)
/// on the same address, or on a wildcard that covers the other (`0.0.0.0` covers the IPv4
/// addresses, `[::]` every address, as Linux binds it dual-stack by default).
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn invalid(path: &Path, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: path.display().to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_fixture(dir: &Path, extra: &str) -> PathBuf {
        std::fs::write(
            dir.join("vm.yaml"),
            include_str!("../config/virtual-mesh.yaml"),
        )
        .unwrap();
        let path = dir.join("signer.toml");
        std::fs::write(
            &path,
            format!(
                r#"
virtual_meshes = ["vm.yaml"]
audit_log = "audit.log"
[tls]
cert = "pki/signer.pem"
key = "pki/signer.key"
client_ca = "pki/ca.pem"
[root]
certificate = "root-cert.pem"
virtual_mesh = "service-mesh-hub/virtual-mesh"
key_type = "rsa4096"
backend = "pkcs11"
[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
key = "pkcs11:token=meshca;object=root-ca"
pin_file = "user-pin"
{extra}
"#
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn a_module_is_always_a_path_never_a_name_the_loader_searches() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "module = \"/usr/lib/softhsm/libsofthsm2.so\"\nkey = \"pkcs11:token=meshca;object=root-ca\"",
            "key = \"pkcs11:token=meshca;object=root-ca?module-path=libsofthsm2.so\"",
        );
        assert!(text.contains("module-path=libsofthsm2.so"), "{text}");
        let config = SignerConfig::parse(&path, &text).unwrap();
        let Ok(BackendSettings::Pkcs11(settings)) = config.backend() else {
            panic!("not a PKCS#11 backend");
        };
        // Resolved against the config's directory, as `module` is.
        assert_eq!(settings.module, dir.path().join("libsofthsm2.so"));
        // A config in the working directory: still a path.
        assert_eq!(
            never_searched(PathBuf::from("libsofthsm2.so")),
            PathBuf::from("./libsofthsm2.so")
        );
        assert_eq!(
            never_searched(PathBuf::from("/usr/lib/x.so")),
            PathBuf::from("/usr/lib/x.so")
        );

        // Both set: the same module is fine; two modules are refused, naming both.
        let both = |uri_module: &str| {
            let text = std::fs::read_to_string(&path).unwrap().replace(
                "key = \"pkcs11:token=meshca;object=root-ca\"",
                &format!("key = \"pkcs11:token=meshca;object=root-ca?module-path={uri_module}\""),
            );
            SignerConfig::parse(&path, &text).map(|_| ())
        };
        assert!(both("/usr/lib/softhsm/libsofthsm2.so").is_ok());
        let err = both("/usr/lib/vendor-hsm.so").unwrap_err().to_string();
        assert!(
            err.contains("/usr/lib/softhsm/libsofthsm2.so")
                && err.contains("/usr/lib/vendor-hsm.so")
                && err.contains("name different modules"),
            "{err}"
        );
    }

    const GRANT: &str = r#"
[[clients]]
identity = "spiffe://demo/cluster/a"
allow = [{ virtual_mesh = "service-mesh-hub/virtual-mesh", mesh = "service-mesh-hub/istio-istio-system-management-plane" }]
"#;

    /// `text` with the commented-out block that starts at the line `# {header}` switched
    /// on (one leading `#` taken from each line up to the next empty line; a line of a
    /// lone `#` does not end it).
    fn uncommented(text: &str, header: &str) -> String {
        let start = format!("# {header}");
        let mut on = false;
        let lines = text.lines().map(|line| {
            on = (on || line == start) && !line.is_empty();
            match line.strip_prefix('#') {
                Some(rest) if on => rest.strip_prefix(' ').unwrap_or(rest),
                _ => line,
            }
        });
        let switched = lines.collect::<Vec<_>>().join("\n");
        assert!(switched != text.trim_end(), "no block {start:?}");
        switched
    }

    #[test]
    fn a_value_in_the_wrong_place_is_not_printed_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), "");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("pin_file = \"user-pin\"", "pin_env = 987654");
        assert!(text.contains("pin_env = 987654"), "{text}");
        std::fs::write(&path, text).unwrap();
        let err = SignerConfig::load(&path).unwrap_err().to_string();
        assert!(!err.contains("987654"), "{err}");
        assert!(
            err.contains("invalid type: integer (value not shown), expected a string"),
            "{err}"
        );
        // Quoted, it is a string, but no variable's name: still not shown.
        let quoted = std::fs::read_to_string(&path)
            .unwrap()
            .replace("pin_env = 987654", "pin_env = \"987654\"");
        std::fs::write(&path, quoted).unwrap();
        let err = SignerConfig::load(&path).unwrap_err().to_string();
        assert!(
            !err.contains("987654")
                && err.contains("pkcs11.pin_env is not an environment variable name"),
            "{err}"
        );
        assert_eq!(
            without_values("unknown field `pin`, expected one of `pin_file`, `pin_env`"),
            "unknown field `pin`, expected one of `pin_file`, `pin_env`"
        );
        assert_eq!(
            without_values("invalid value: string \"abc\", expected a port"),
            "invalid value: string (value not shown), expected a port"
        );
    }

    #[test]
    fn a_root_common_name_x509_does_not_allow_is_refused_by_root_init_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap();
        let with_name = |name: &str| {
            text.replace(
                "backend = \"pkcs11\"",
                &format!("backend = \"pkcs11\"\ncommon_name = {name:?}"),
            )
        };
        let long = "n".repeat(65);
        for (name, problem) in [
            ("", "root.common_name is empty"),
            ("  ", "root.common_name is empty"),
            (
                " acme root",
                "leading or trailing spaces or control characters",
            ),
            (
                "acme\troot",
                "leading or trailing spaces or control characters",
            ),
            (
                &long,
                "root.common_name has 65 characters; a certificate's common name has at most 64",
            ),
        ] {
            std::fs::write(&path, with_name(name)).unwrap();
            // The config loads (a signer whose root exists serves with it); `root init`,
            // which would name a root with it, refuses it.
            let config = SignerConfig::load(&path).unwrap();
            let err = config.root_common_name().unwrap_err();
            assert!(err.contains(problem), "{name:?}: {err}");
        }
        // 64 characters, counted as characters.
        let most = "é".repeat(64);
        std::fs::write(&path, with_name(&most)).unwrap();
        let config = SignerConfig::load(&path).unwrap();
        assert_eq!(config.root_common_name().unwrap(), most);
        // Without one, the default must fit too: an orgName of 60 makes 68 characters.
        std::fs::write(&path, &text).unwrap();
        let org = "o".repeat(60);
        let meshes = std::fs::read_to_string(dir.path().join("vm.yaml")).unwrap();
        std::fs::write(
            dir.path().join("vm.yaml"),
            meshes.replace("orgName: \"service-mesh-hub\"", &format!("orgName: {org}")),
        )
        .unwrap();
        let config = SignerConfig::load(&path).unwrap();
        let err = config.root_common_name().unwrap_err();
        assert!(
            err.contains("the default root common name")
                && err.contains("has 68 characters")
                && err.contains("set root.common_name"),
            "{err}"
        );
    }

    /// The shipped example, as it is and with its commented sections switched on, is a
    /// config the signer accepts: a key renamed in the code but not in the example would
    /// be an error for whoever starts from it.
    #[test]
    fn the_example_config_parses_as_shipped_and_with_its_commented_sections() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/signer.example.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        let shipped = SignerConfig::parse(&example, &text).unwrap();
        assert_eq!(shipped.root.backend, BackendKind::Pkcs11);
        assert_eq!(shipped.limits, Limits::default());
        let shipped_pkcs11 = shipped.pkcs11.as_ref().unwrap();
        assert_eq!(shipped_pkcs11.timeout, DEFAULT_TOKEN_TIMEOUT);

        // The optional settings commented out in [tls], [pkcs11] and [[clients]] (each key's first
        // occurrence: [vault] further down has a timeout_seconds too).
        let optional = [
            "client_crls",
            "client_crl_overdue",
            "sessions",
            "timeout_seconds",
            "softhsm2_conf",
            "issuer",
        ]
        .iter()
        .fold(text.clone(), |text, key| {
            text.replacen(&format!("\n# {key} = "), &format!("\n{key} = "), 1)
        });
        let config = SignerConfig::parse(&example, &optional).unwrap();
        assert_eq!(config.client_crls.len(), 1);
        assert_eq!(config.client_crl_overdue, CrlOverdue::Accept);
        let pkcs11 = config.pkcs11.unwrap();
        assert_eq!(pkcs11.sessions, 8);
        assert_eq!(pkcs11.timeout, Duration::from_secs(30));
        assert!(pkcs11.softhsm2_conf.is_some());
        assert_eq!(
            config.authorization.issuers().count(),
            1,
            "the example's [[clients]] issuer"
        );

        // The announced roots' keys are known (the files they name are read, so they
        // must exist).
        for (key, file) in [
            ("next_certificate", "next-root-cert.pem"),
            ("previous_certificate", "old-root-cert.pem"),
        ] {
            let announced = text.replace(&format!("\n# {key} = "), &format!("\n{key} = "));
            let message = SignerConfig::parse(&example, &announced)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(&format!("root.{key}: cannot read /var/lib/meshca/{file}")),
                "{message}"
            );
        }

        // The [limits] block shows the defaults.
        let limits = uncommented(&text, "[limits]");
        assert_eq!(
            SignerConfig::parse(&example, &limits).unwrap().limits,
            Limits::default()
        );

        // The [vault] block (with its [vault.auth]), in place of [pkcs11].
        let vault =
            uncommented(&text, "[vault]").replace("backend = \"pkcs11\"", "backend = \"vault\"");
        let without_pkcs11 = vault
            .split("\n\n")
            .filter(|block| !block.starts_with("[pkcs11]"))
            .collect::<Vec<_>>()
            .join("\n\n");
        let config = SignerConfig::parse(&example, &without_pkcs11).unwrap();
        assert_eq!(config.root.backend, BackendKind::Vault);
        assert!(config.pkcs11.is_none() && config.vault.is_some());
    }

    /// A PIN typed where pin_file wants a path: an error names the setting, not the value
    /// (which resolving against the config's directory would have shown with a '/').
    #[test]
    fn a_pin_file_without_a_slash_is_not_shown_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap();
        let with = |pin_file: &str| {
            let edited = text.replace(
                "pin_file = \"user-pin\"",
                &format!("pin_file = \"{pin_file}\""),
            );
            let config = SignerConfig::parse(&path, &edited).unwrap();
            config.pkcs11.unwrap().pin.read().unwrap_err().to_string()
        };
        let err = with("8c1f2e7a9b3d4c5e6f708192");
        assert!(
            err.contains("pkcs11.pin_file") && err.contains("the value is not shown"),
            "{err}"
        );
        assert!(!err.contains("8c1f2e7a9b3d4c5e6f708192"), "{err}");
        let err = with("secrets/user-pin");
        let shown = dir.path().join("secrets/user-pin").display().to_string();
        assert!(
            err.contains("pkcs11.pin_file") && err.contains(&shown),
            "{err}"
        );
    }

    #[test]
    fn loads_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SignerConfig::load(&write_fixture(dir.path(), GRANT)).unwrap();
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.audit_log, dir.path().join("audit.log"));
        assert_eq!(cfg.root_common_name().unwrap(), "service-mesh-hub root CA");
        let pkcs11 = cfg.pkcs11.unwrap();
        assert!(
            matches!(&pkcs11.pin, SecretSource::File(f) if f.path == dir.path().join("user-pin")),
            "{:?}",
            pkcs11.pin
        );
        let vm = "service-mesh-hub/virtual-mesh".parse().unwrap();
        let mgmt = "service-mesh-hub/istio-istio-system-management-plane"
            .parse()
            .unwrap();
        let remote = "service-mesh-hub/istio-istio-system-new-remote-cluster"
            .parse()
            .unwrap();
        assert!(
            cfg.authorization
                .allows("spiffe://demo/cluster/a", &vm, &mgmt)
        );
        assert!(
            !cfg.authorization
                .allows("spiffe://demo/cluster/a", &vm, &remote)
        );
        assert!(!cfg.authorization.allows("someone-else", &vm, &mgmt));
    }

    #[test]
    fn an_ops_listener_on_the_signers_port_is_refused_by_name() {
        let load = |listen: &str, ops: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = write_fixture(dir.path(), "");
            let text = std::fs::read_to_string(&path).unwrap().replacen(
                "virtual_meshes",
                &format!("{listen}ops_listen = \"{ops}\"\nvirtual_meshes"),
                1,
            );
            std::fs::write(&path, text).unwrap();
            let config = SignerConfig::load(&path).map_err(|e| e.to_string())?;
            config.check_listeners(None).map_err(|e| e.to_string())
        };
        for (listen, ops) in [
            ("", "127.0.0.1:8443"),
            ("listen = \"0.0.0.0:9443\"\n", "127.0.0.1:9443"),
            ("listen = \"[::1]:9443\"\n", "[::]:9443"),
        ] {
            let err = load(listen, ops).unwrap_err();
            assert!(
                err.contains(&format!("ops_listen {ops} and listen "))
                    && err.contains("take the same port"),
                "{listen} {ops}: {err}"
            );
        }
        for (listen, ops) in [
            ("", "127.0.0.1:9090"),
            ("listen = \"0.0.0.0:9443\"\n", "[::1]:9443"),
            ("listen = \"127.0.0.1:0\"\n", "127.0.0.1:0"),
        ] {
            load(listen, ops).unwrap();
        }
    }

    #[test]
    fn the_listen_address_checked_against_ops_listen_is_the_one_used() {
        let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
        let ops = Some(addr("127.0.0.1:9443"));
        // `--listen` on ops_listen's port: refused, naming the flag.
        let err = listeners_fit(addr("0.0.0.0:9443"), true, ops).unwrap_err();
        assert!(
            err.starts_with(
                "ops_listen 127.0.0.1:9443 and --listen 0.0.0.0:9443 take the same port"
            ),
            "{err}"
        );
        assert!(listeners_fit(addr("127.0.0.1:8443"), true, ops).is_ok());
        assert!(listeners_fit(addr("127.0.0.1:9443"), false, None).is_ok());
        // A file whose own listen collides is read; `--listen` elsewhere makes it fit.
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), "");
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "virtual_meshes",
            "listen = \"127.0.0.1:9443\"\nops_listen = \"127.0.0.1:9443\"\nvirtual_meshes",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let config = SignerConfig::load(&path).unwrap();
        assert!(config.check_listeners(None).is_err());
        config.check_listeners(Some(addr("127.0.0.1:0"))).unwrap();
        let err = config
            .check_listeners(Some(addr("[::]:9443")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("and --listen [::]:9443 take the same port"),
            "{err}"
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("pin = \"1234\"\n", "unknown field `pin`"),
            ("sessions = 0\n", "pkcs11.sessions"),
            (
                "timeout_seconds = 0\n",
                "pkcs11.timeout_seconds must be between 1 and 300, got 0",
            ),
            (
                "[limits]\nbody_timeout_ms = 0\n",
                "limits.body_timeout_ms must be positive",
            ),
            (
                "[limits]\nheader_timeout_ms = 9223372036854775807\n",
                "limits.header_timeout_ms must be at most 300000 (5 minutes), got 9223372036854775807",
            ),
            (
                "[limits]\ndrain_timeout_ms = 300001\n",
                "limits.drain_timeout_ms must be at most 300000",
            ),
            (
                "[[clients]]\nidentity = \"x\"\nallow = [{ virtual_mesh = \"service-mesh-hub/virtual-mesh\", mesh = \"service-mesh-hub/nope\" }]\n",
                "not a member",
            ),
            (
                "[[clients]]\nidentity = \"x\"\nallow = [{ virtual_mesh = \"a/b\", mesh = \"service-mesh-hub/nope\" }]\n",
                "unknown virtual mesh a/b",
            ),
        ];
        for (extra, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let err = SignerConfig::load(&write_fixture(dir.path(), extra))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
            assert!(!err.contains("1234"), "secret echoed: {err}");
        }
    }

    #[test]
    fn client_identities_that_never_match_or_collide_are_refused() {
        let client = |identity: &str| {
            format!(
                "[[clients]]\nidentity = \"{identity}\"\nallow = [{{ virtual_mesh = \"service-mesh-hub/virtual-mesh\", mesh = \"service-mesh-hub/istio-istio-system-management-plane\" }}]\n"
            )
        };
        let web = "spiffe://meshca.t/cluster/web-1";
        let cases = [
            (
                client("web 1"),
                "\"web 1\" can never be a client certificate's",
            ),
            (client("*"), "it has '*'"),
            (
                client("web-1:8443"),
                "\"web-1:8443\" can never be a client certificate's",
            ),
            // A Cyrillic 'е'.
            (client("spiffe://meshca.t/cluster/w\u{0435}b-1"), "U+0435"),
            (
                client("SPIFFE://MESHCA.T/cluster/web-1") + &client(web),
                "identities \"SPIFFE://MESHCA.T/cluster/web-1\" and \"spiffe://meshca.t/cluster/web-1\" differ only in case",
            ),
            (client("Web-1") + &client("web-1"), "differ only in case"),
        ];
        for (extra, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let err = SignerConfig::load(&write_fixture(dir.path(), &extra))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        // A path differs by case: two clients.
        let dir = tempfile::tempdir().unwrap();
        let two = client(web) + &client("spiffe://meshca.t/cluster/Web-1");
        assert!(SignerConfig::load(&write_fixture(dir.path(), &two)).is_ok());
    }

    /// A granted mesh's intermediate would be `O=service-mesh-hub,
    /// CN=istio-istio-system-management-plane`: no root may have that subject.
    #[test]
    fn a_mesh_whose_intermediate_would_carry_a_roots_subject_is_refused() {
        let mesh = "istio-istio-system-management-plane";
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(dir.path(), GRANT);
        let (_, same) = crate::pki::testing::software_root_named(
            KeyType::EcdsaP384,
            "service-mesh-hub",
            mesh,
            Duration::from_secs(86_400),
        );
        std::fs::write(dir.path().join("old.pem"), &same.pem).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let announced = text.replace(
            "backend = \"pkcs11\"\n",
            "backend = \"pkcs11\"\nprevious_certificate = \"old.pem\"\n",
        );
        assert_ne!(announced, text);
        std::fs::write(&path, &announced).unwrap();
        let refused = SignerConfig::load(&path).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "mesh service-mesh-hub/{mesh} (virtual mesh service-mesh-hub/virtual-mesh) is granted, and its intermediate would have the subject O=service-mesh-hub, CN={mesh}, which is the subject of the previous root (root.previous_certificate {}",
                dir.path().join("old.pem").display()
            )),
            "{refused}"
        );
        assert!(
            refused.ends_with("or announce a root of another common name"),
            "{refused}"
        );

        // The root in force, read at start: the same check.
        std::fs::write(&path, &text).unwrap();
        let config = SignerConfig::load(&path).unwrap();
        let refused = config
            .check_apart_from_root(&same.subject)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("which is the subject of the root (root.certificate ")
                && refused.ends_with("(a root's name cannot change)"),
            "{refused}"
        );
        let (_, apart) = crate::pki::testing::software_root_named(
            KeyType::EcdsaP384,
            "service-mesh-hub",
            "service-mesh-hub root CA",
            Duration::from_secs(86_400),
        );
        config.check_apart_from_root(&apart.subject).unwrap();

        // `root init` refuses to make such a root.
        let named = text.replace(
            "key_type = ",
            &format!("common_name = \"{mesh}\"\nkey_type = "),
        );
        std::fs::write(&path, &named).unwrap();
        let refused = SignerConfig::load(&path)
            .unwrap()
            .root_common_name()
            .unwrap_err();
        assert!(
            refused.contains("which is the subject of the new root")
                && refused.ends_with("or set root.common_name to another name"),
            "{refused}"
        );
    }

    #[test]
    fn a_mesh_in_two_granted_virtual_meshes_or_two_of_one_subject_are_refused() {
        let vm = |name: &str, org: &str, meshes: &str| {
            format!(
                "kind: VirtualMesh\nmetadata: {{name: {name}, namespace: tenants}}\nspec:\n  certificateAuthority:\n    builtin: {{ttlDays: 10, rsaKeySizeBytes: 4096, orgName: {org}}}\n  meshes: [{meshes}]\n"
            )
        };
        let grant = |identity: &str, virtual_mesh: &str, mesh: &str| {
            format!(
                "[[clients]]\nidentity = \"{identity}\"\nallow = [{{ virtual_mesh = \"{virtual_mesh}\", mesh = \"{mesh}\" }}]\n"
            )
        };
        let pay_1 = "{name: pay-1, namespace: pay}";
        let cases = [
            (
                vm("web", "web", pay_1),
                grant("spiffe://t/pay-1", "tenants/pay", "pay/pay-1")
                    + &grant("spiffe://t/web-1", "tenants/web", "pay/pay-1"),
                "mesh pay/pay-1 is granted in virtual mesh tenants/pay and in tenants/web",
            ),
            (
                vm("pay2", "pay", "{name: pay-1, namespace: other}"),
                grant("spiffe://t/pay-1", "tenants/pay", "pay/pay-1")
                    + &grant("spiffe://t/other", "tenants/pay2", "other/pay-1"),
                "would both have the subject O=pay, CN=pay-1",
            ),
        ];
        for (second, clients, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = write_fixture(dir.path(), &clients);
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("service-mesh-hub/virtual-mesh", "tenants/pay");
            std::fs::write(&path, text).unwrap();
            let meshes = vm("pay", "pay", pay_1) + "---\n" + &second;
            std::fs::write(dir.path().join("vm.yaml"), meshes).unwrap();
            let err = SignerConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }
}
