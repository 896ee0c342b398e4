//! What a SIGHUP may change in a running signer besides its TLS files: the rules every
//! signing decision is made under (VirtualMesh policies, client grants, and the limits on
//! requests and connections) and the roots it announces, read again from the config
//! file. Pure comparisons; the swap and its audit line are in `server`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use sha2::Digest;

use crate::backend::vault::config::VaultAuth;
use crate::config::{AnnouncedRoot, Announcement, AuthorizationTable, Limits, SignerConfig};
use crate::pki::csr::hex;
use crate::policy::rules::human_duration;
use crate::policy::virtual_mesh::{NAMES_LISTED, every, listed};
use crate::policy::{ObjectRef, PolicySet, VirtualMeshPolicy};
use crate::secret::SecretSource;

/// The rules a signing decision is made under. A reload replaces them whole; a decision
/// keeps the rules it started with, a connection the timeouts it was accepted with.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policies: PolicySet,
    pub authorization: AuthorizationTable,
    /// `[limits]`. `max_connections` sizes the listener's connection slots once, at
    /// start: a reload keeps the value in force (see [`restart_only_changes`]).
    pub limits: Limits,
    /// The root announced ahead of a root change, if any.
    pub next_root: Option<AnnouncedRoot>,
    /// The root announced after a root change, until it is retired, if any.
    pub previous_root: Option<AnnouncedRoot>,
    /// SHA-256 of the root certificate the signer issues under. Read only at start (a
    /// reload keeps it), but part of the digest: two signers, or two starts of one, with
    /// the same rules under different roots must not look alike in their audit logs.
    pub root_sha256: String,
    /// [`Rules::text`] and [`Rules::digest`], computed at the first use of either (each
    /// decision's audit line names the digest): rules are built whole and not changed
    /// once in force.
    written_out: std::sync::OnceLock<WrittenOut>,
}

/// The rules written out, and the digest of that text.
#[derive(Debug, Clone)]
struct WrittenOut {
    text: String,
    digest: String,
}

impl Rules {
    /// The rules of `config`, for a signer issuing under the root with SHA-256 `root_sha256`.
    pub fn of(config: &SignerConfig, root_sha256: &str) -> Self {
        Rules {
            policies: config.policies.clone(),
            authorization: config.authorization.clone(),
            limits: config.limits,
            next_root: config.root.next.clone(),
            previous_root: config.root.previous.clone(),
            root_sha256: root_sha256.to_ascii_lowercase(),
            written_out: std::sync::OnceLock::new(),
        }
    }

    /// The next root, then the previous one.
    pub fn announced_roots(&self) -> impl Iterator<Item = &AnnouncedRoot> {
        self.next_root.iter().chain(self.previous_root.iter())
    }

    /// The rules in short, as the `start` record states them: each virtual mesh (org,
    /// ttl, RSA minimum, meshes), how many clients and grants, every limit, and the
    /// announced roots. The same words as a reload's changes, so a change between two
    /// starts reads as it would in a `reload` record.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .policies
            .iter()
            .map(|policy| format!("virtual mesh {} ({})", policy.id, summary(policy, every)))
            .collect();
        let clients = self.authorization.clients().count();
        let grants: usize = self.authorization.clients().map(|(_, g)| g.len()).sum();
        parts.push(format!("{clients} clients with {grants} grants"));
        let limits: Vec<String> = limit_settings(&self.limits)
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        parts.push(format!("limits: {}", limits.join(", ")));
        for root in self.announced_roots() {
            parts.push(format!("{} announced", root.described()));
        }
        parts.join("; ")
    }

    /// SHA-256 (lowercase hex) of [`Rules::text`]: the same rules, the same digest.
    pub fn digest(&self) -> &str {
        &self.written_out().digest
    }

    /// The rules written out in full, one statement a line in a fixed order: the root in
    /// force, each virtual mesh with its settings and meshes, each client's grants one by
    /// one, every limit, the announced roots' fingerprints; whatever a reload names when
    /// it changes ([`RulesChange`]), `max_connections` and the root. `source` (which file
    /// a policy came from) is not part of it: the same rules have the same text wherever
    /// they were read. The `start` and `reload` records carry it, so the rules behind a
    /// digest can be read from the audit log alone.
    pub fn text(&self) -> &str {
        &self.written_out().text
    }

    /// The text and its digest, from one place: the digest is always that of the text.
    fn written_out(&self) -> &WrittenOut {
        self.written_out.get_or_init(|| {
            let text = self.write_out();
            let digest = hex(&sha2::Sha256::digest(text.as_bytes()));
            WrittenOut { text, digest }
        })
    }

    fn write_out(&self) -> String {
        let mut text = format!("root {}\n", self.root_sha256);
        for policy in self.policies.iter() {
            let display_name = policy
                .display_name
                .as_deref()
                .map(|name| format!(" display_name={}", quoted(name)))
                .unwrap_or_default();
            // Only when set: the text (and digest) of rules without it stay as they were.
            let trust_domains = if policy.trust_domains.is_empty() {
                String::new()
            } else {
                format!(" trust_domains={}", policy.trust_domains.join(","))
            };
            text.push_str(&format!(
                "virtual_mesh {} org={} max_ttl_seconds={} min_rsa_bits={}{display_name} meshes={}{trust_domains}\n",
                policy.id,
                quoted(&policy.org_name),
                policy.max_ttl.as_secs(),
                policy.min_rsa_bits,
                names(policy.meshes.iter()).join(", ")
            ));
        }
        for (identity, grants) in self.authorization.clients() {
            for (virtual_mesh, mesh) in grants {
                text.push_str(&format!(
                    "grant {} {virtual_mesh} {mesh}\n",
                    quoted(identity)
                ));
            }
            // Only where one is set: the rules of a config without one keep their digest.
            if let Some(issuer) = self.authorization.issuer_of(identity) {
                let issuer = quoted(&issuer.to_string());
                text.push_str(&format!("issuer {} {issuer}\n", quoted(identity)));
            }
        }
        for (name, value) in limit_settings(&self.limits) {
            text.push_str(&format!("limit {name}={value}\n"));
        }
        for root in self.announced_roots() {
            text.push_str(&format!(
                "{} {}\n",
                root.announcement.key(),
                root.fingerprint_sha256
            ));
        }
        text
    }

    /// The rules of a config read by a reload, with what a reload cannot change kept from
    /// `in_force`.
    pub fn reloaded(read: &SignerConfig, in_force: &Rules) -> Self {
        let mut rules = Rules::of(read, &in_force.root_sha256);
        rules.limits.max_connections = in_force.limits.max_connections;
        rules.written_out = std::sync::OnceLock::new(); // of the rules with that limit
        rules
    }
}

/// A free-text value in the rules' text, as a JSON string: a defined quoting an auditor's
/// tools read (Rust's `{:?}` is not one, and may change).
fn quoted(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// How newly read rules differ from those in force: one statement per change, virtual
/// meshes first, each group in name order. Empty when nothing that is enforced changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RulesChange {
    /// Every change, every name in it: the `reload` record's message.
    pub statements: Vec<String>,
    /// The same statements, each list in them cut at [`LOG_NAMES`] names and a count:
    /// what [`RulesChange::log_line`] shows of them.
    listed: Vec<String>,
}

/// How many names (and statements) a reload's log line lists of each list, the rest
/// counted: 499 clients renamed made a line of 77 KB. The audit record keeps them all.
pub const LOG_NAMES: usize = NAMES_LISTED;

/// How a statement writes a list of names: [`every`] one (the audit record) or the first
/// [`LOG_NAMES`] of them ([`listed`], the log line).
type List = fn(&[String]) -> String;

impl RulesChange {
    pub fn between(in_force: &Rules, read: &Rules) -> Self {
        RulesChange {
            statements: Self::statements(in_force, read, every),
            listed: Self::statements(in_force, read, listed),
        }
    }

    fn statements(in_force: &Rules, read: &Rules, list: List) -> Vec<String> {
        let mut statements = Vec::new();
        compare_virtual_meshes(&in_force.policies, &read.policies, list, &mut statements);
        compare_clients(
            &in_force.authorization,
            &read.authorization,
            list,
            &mut statements,
        );
        compare_limits(&in_force.limits, &read.limits, &mut statements);
        for (announcement, in_force, read) in [
            (Announcement::Next, &in_force.next_root, &read.next_root),
            (
                Announcement::Previous,
                &in_force.previous_root,
                &read.previous_root,
            ),
        ] {
            compare_announced_root(
                announcement,
                in_force.as_ref(),
                read.as_ref(),
                &mut statements,
            );
        }
        statements
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// The change as a reload's log line says it: at most [`LOG_NAMES`] statements, each
    /// naming at most as many of a list, then what was left out, which the audit log's
    /// `reload` record (its `message`) holds in full.
    pub fn log_line(&self) -> String {
        let mut line = self.listed[..self.listed.len().min(LOG_NAMES)].join("; ");
        let more = self.listed.len().saturating_sub(LOG_NAMES);
        if more > 0 {
            line.push_str(&format!("; and {more} more changes"));
        }
        if more > 0 || self.listed != self.statements {
            line.push_str(" (the audit log's reload record names them all)");
        }
        line
    }
}

impl fmt::Display for RulesChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.statements.join("; "))
    }
}

fn compare_virtual_meshes(
    in_force: &PolicySet,
    read: &PolicySet,
    list: List,
    out: &mut Vec<String>,
) {
    for old in in_force.iter() {
        let Some(new) = read.get(&old.id) else {
            out.push(format!("virtual mesh {} removed", old.id));
            continue;
        };
        let mut differences = Vec::new();
        if old.org_name != new.org_name {
            differences.push(format!("org {:?} -> {:?}", old.org_name, new.org_name));
        }
        if old.max_ttl != new.max_ttl {
            differences.push(format!(
                "ttl {} -> {}",
                human_duration(old.max_ttl),
                human_duration(new.max_ttl)
            ));
        }
        if old.min_rsa_bits != new.min_rsa_bits {
            differences.push(format!(
                "RSA minimum {} -> {} bits",
                old.min_rsa_bits, new.min_rsa_bits
            ));
        }
        let added = names(new.meshes.difference(&old.meshes));
        if !added.is_empty() {
            differences.push(format!("meshes added: {}", list(&added)));
        }
        let removed = names(old.meshes.difference(&new.meshes));
        if !removed.is_empty() {
            differences.push(format!("meshes removed: {}", list(&removed)));
        }
        if old.trust_domains != new.trust_domains {
            differences.push(format!(
                "trust domains {} -> {}",
                trust_domains(old, list),
                trust_domains(new, list)
            ));
        }
        if old.display_name != new.display_name {
            differences.push(format!(
                "display name {:?} -> {:?}",
                old.display_name.as_deref().unwrap_or(""),
                new.display_name.as_deref().unwrap_or("")
            ));
        }
        // `source` (the file it was read from) is not enforced: moving a document to
        // another file changes nothing.
        if !differences.is_empty() {
            out.push(format!(
                "virtual mesh {}: {}",
                old.id,
                differences.join(", ")
            ));
        }
    }
    for new in read.iter().filter(|p| in_force.get(&p.id).is_none()) {
        out.push(format!(
            "virtual mesh {} added ({})",
            new.id,
            summary(new, list)
        ));
    }
}

fn summary(policy: &VirtualMeshPolicy, list: List) -> String {
    let mut summary = format!(
        "org {:?}, ttl {}, RSA minimum {} bits, meshes: {}",
        policy.org_name,
        human_duration(policy.max_ttl),
        policy.min_rsa_bits,
        list(&names(policy.meshes.iter()))
    );
    if !policy.trust_domains.is_empty() {
        summary.push_str(&format!(", trust domains: {}", trust_domains(policy, list)));
    }
    summary
}

/// A virtual mesh's trust domains as a reload names them (`none`: unconstrained).
fn trust_domains(policy: &VirtualMeshPolicy, list: List) -> String {
    if policy.trust_domains.is_empty() {
        "none".into()
    } else {
        list(&policy.trust_domains)
    }
}

fn compare_clients(
    in_force: &AuthorizationTable,
    read: &AuthorizationTable,
    list: List,
    out: &mut Vec<String>,
) {
    for (identity, old) in in_force.clients() {
        let Some(new) = read.grants_of(identity) else {
            out.push(format!("client {identity} removed"));
            continue;
        };
        let mut differences = Vec::new();
        let added = grants(new.difference(old));
        if !added.is_empty() {
            differences.push(format!("may now ask for {}", list(&added)));
        }
        let removed = grants(old.difference(new));
        if !removed.is_empty() {
            differences.push(format!("may no longer ask for {}", list(&removed)));
        }
        let issuers = (in_force.issuer_of(identity), read.issuer_of(identity));
        if issuers.0 != issuers.1 {
            let issuer = |pin: Option<&crate::tlsutil::IssuerPin>| {
                pin.map_or("any client CA".to_string(), |pin| pin.to_string())
            };
            differences.push(format!(
                "issuer {} -> {}",
                issuer(issuers.0),
                issuer(issuers.1)
            ));
        }
        if !differences.is_empty() {
            out.push(format!("client {identity}: {}", differences.join("; ")));
        }
    }
    for (identity, new) in read.clients().filter(|(id, _)| !in_force.knows(id)) {
        let issuer = read
            .issuer_of(identity)
            .map(|pin| format!(", issued by {pin}"))
            .unwrap_or_default();
        out.push(format!(
            "client {identity} added (may ask for {}{issuer})",
            list(&grants(new.iter()))
        ));
    }
}

/// `[limits]` by their config names, durations in milliseconds as the file has them.
fn limit_settings(l: &Limits) -> [(&'static str, u64); 7] {
    let millis = |d: Duration| d.as_millis() as u64;
    [
        (
            "sign_requests_per_minute",
            u64::from(l.sign_requests_per_minute),
        ),
        ("sign_burst", u64::from(l.sign_burst)),
        ("max_connections", l.max_connections as u64),
        ("handshake_timeout_ms", millis(l.handshake_timeout)),
        ("header_timeout_ms", millis(l.header_timeout)),
        ("body_timeout_ms", millis(l.body_timeout)),
        ("drain_timeout_ms", millis(l.drain_timeout)),
    ]
}

/// The `[limits]` that differ. `max_connections` is left out: a reload does not change
/// it.
fn compare_limits(in_force: &Limits, read: &Limits, out: &mut Vec<String>) {
    let differences: Vec<String> = limit_settings(in_force)
        .into_iter()
        .zip(limit_settings(read))
        .filter(|((name, _), _)| *name != "max_connections")
        .filter(|((_, old), (_, new))| old != new)
        .map(|((name, old), (_, new))| format!("{name} {old} -> {new}"))
        .collect();
    if !differences.is_empty() {
        out.push(format!("limits: {}", differences.join(", ")));
    }
}

fn compare_announced_root(
    announcement: Announcement,
    in_force: Option<&AnnouncedRoot>,
    read: Option<&AnnouncedRoot>,
    out: &mut Vec<String>,
) {
    let name = announcement.name();
    let fingerprint = |root: Option<&AnnouncedRoot>| root.map(|r| r.fingerprint_sha256.clone());
    // The cross certificate the root key made for the root now announced, if any.
    let vouched = read
        .and_then(|r| r.cross_cert.as_ref())
        .map(|cross| format!(" ({})", cross.describe()))
        .unwrap_or_default();
    match (fingerprint(in_force), fingerprint(read)) {
        (None, Some(new)) => out.push(format!("{name} sha256 {new} announced{vouched}")),
        (Some(old), None) => out.push(format!("{name} sha256 {old} no longer announced")),
        (Some(old), Some(new)) if old != new => {
            out.push(format!("{name} sha256 {old} -> {new}{vouched}"))
        }
        _ => {}
    }
}

fn names<'a>(refs: impl Iterator<Item = &'a ObjectRef>) -> Vec<String> {
    refs.map(|r| r.to_string()).collect()
}

fn grants<'a>(pairs: impl Iterator<Item = &'a (ObjectRef, ObjectRef)>) -> Vec<String> {
    pairs
        .map(|(virtual_mesh, mesh)| format!("{mesh} in {virtual_mesh}"))
        .collect()
}

/// The settings read only at start that differ between the config in force and the one
/// just read, by their config names: a reload leaves them as they are, and says so.
pub fn restart_only_changes(in_force: &SignerConfig, read: &SignerConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    check("listen", in_force.listen == read.listen);
    check("ops_listen", in_force.ops_listen == read.ops_listen);
    check("audit_log", in_force.audit_log == read.audit_log);
    // The `[tls]` settings are not here: a reload puts them in force (`reload_tls`).
    // `root.common_name` is only read by `root init`: not a serving setting.
    let root = |c: &SignerConfig| {
        (
            c.root.certificate.clone(),
            c.root.virtual_mesh.clone(),
            c.root.key_type,
            c.root.backend,
        )
    };
    check("root", root(in_force) == root(read));
    check("pkcs11", in_force.pkcs11 == read.pkcs11);
    check("vault", in_force.vault == read.vault);
    check(
        "limits.max_connections",
        in_force.limits.max_connections == read.limits.max_connections,
    );
    changed
}

/// Files the changed start-only settings of `read` name that are missing: a restart with
/// that config would fail (and systemd restart it again and again). Only what can be seen
/// cheaply: `meshca serve --check --online` checks the rest.
pub fn restart_blockers(read: &SignerConfig, changed: &[&'static str]) -> Vec<String> {
    let mut missing = Vec::new();
    // Secret files are named as their errors name them (a value without a '/' not shown).
    let mut secret_files = Vec::new();
    let mut check = |setting: &str, path: &Path| {
        if !path.exists() {
            missing.push(format!("{setting} {} does not exist", path.display()));
        }
    };
    if changed.contains(&"root") {
        check("root.certificate", &read.root.certificate);
    }
    if let Some(pkcs11) = read.pkcs11.as_ref().filter(|_| changed.contains(&"pkcs11")) {
        check("pkcs11.module", &pkcs11.module);
        if let Some(conf) = &pkcs11.softhsm2_conf {
            check("pkcs11.softhsm2_conf", conf);
        }
        // A PIN file that is not there is the usual way such a restart fails.
        if let SecretSource::File(pin) = &pkcs11.pin {
            secret_files.push(pin);
        }
    }
    if let Some(vault) = read.vault.as_ref().filter(|_| changed.contains(&"vault")) {
        if let Some(ca_cert) = &vault.ca_cert {
            check("vault.ca_cert", ca_cert);
        }
        match &vault.auth {
            VaultAuth::Token(SecretSource::File(token)) => secret_files.push(token),
            VaultAuth::AppRole {
                role_id, secret_id, ..
            } => {
                if let SecretSource::File(role_id) = role_id {
                    secret_files.push(role_id);
                }
                if let SecretSource::File(secret_id) = secret_id {
                    secret_files.push(secret_id);
                }
            }
            VaultAuth::Kubernetes { jwt_file, .. } => secret_files.push(jwt_file),
            VaultAuth::Token(SecretSource::Env(_)) => {}
        }
    }
    for file in secret_files {
        if !file.path.exists() {
            missing.push(format!("{} does not exist", file.shown()));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MESHES: &str = r#"
apiVersion: networking.mesh.gloo.solo.io/v1
kind: VirtualMesh
metadata: {name: vm, namespace: test}
spec:
  meshes: [{name: cluster-a, namespace: test}, {name: cluster-b, namespace: test}]
  certificateAuthority:
    builtin: {ttlDays: 30, rsaKeySizeBytes: 2048, orgName: acme}
"#;

    /// A config in `dir` (relative paths resolve against it, so two configs in one dir
    /// differ only where the text does).
    fn config(dir: &Path, meshes_yaml: &str, clients: &str, extra: &str) -> SignerConfig {
        let pkcs11 = "[pkcs11]\nmodule = \"/lib/softhsm.so\"\nkey = \"pkcs11:token=t;object=k\"\npin_env = \"PIN\"";
        config_of(
            dir,
            meshes_yaml,
            "pkcs11",
            &format!("{pkcs11}\n{clients}\n{extra}"),
        )
    }

    /// A config in `dir` whose backend is `backend`, with that backend's section `rest`.
    fn backend_config(dir: &Path, backend: &str, rest: &str) -> SignerConfig {
        config_of(dir, MESHES, backend, &format!("{rest}\n{A_ONLY}"))
    }

    /// A config in `dir` with the virtual meshes `meshes_yaml`, root backend `backend`,
    /// and `rest` after its `[root]` section.
    fn config_of(dir: &Path, meshes_yaml: &str, backend: &str, rest: &str) -> SignerConfig {
        std::fs::write(dir.join("vm.yaml"), meshes_yaml).unwrap();
        let text = format!(
            r#"virtual_meshes = ["vm.yaml"]
audit_log = "audit.log"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"
[root]
certificate = "root.pem"
virtual_mesh = "test/vm"
key_type = "ecdsa-p384"
backend = "{backend}"
{rest}"#
        );
        SignerConfig::parse(&dir.join("signer.toml"), &text).unwrap()
    }

    /// The blockers of `read` whose text has `about` in it, with `dir` shown as `DIR`.
    fn blockers_about(
        read: &SignerConfig,
        changed: &[&'static str],
        about: &str,
        dir: &Path,
    ) -> Vec<String> {
        restart_blockers(read, changed)
            .into_iter()
            .filter(|b| b.contains(about))
            .map(|b| b.replace(&dir.display().to_string(), "DIR"))
            .collect()
    }

    #[test]
    fn a_missing_pin_file_blocks_a_restart_with_a_changed_pkcs11_section() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let read = backend_config(
            d,
            "pkcs11",
            "[pkcs11]\nmodule = \"/lib/softhsm.so\"\nkey = \"pkcs11:token=t;object=k\"\npin_file = \"user-pin\"",
        );
        // Without a '/' the value may be the PIN itself: not shown.
        assert_eq!(
            blockers_about(&read, &["pkcs11"], "pin", d),
            [format!("pkcs11.pin_file {HIDDEN} does not exist")]
        );
        assert!(blockers_about(&read, &["root"], "pin", d).is_empty());
        std::fs::write(d.join("user-pin"), "1234\n").unwrap();
        assert!(blockers_about(&read, &["pkcs11"], "pin", d).is_empty());
        let read = backend_config(
            d,
            "pkcs11",
            "[pkcs11]\nmodule = \"/lib/softhsm.so\"\nkey = \"pkcs11:token=t;object=k\"\npin_file = \"pins/user-pin\"",
        );
        assert_eq!(
            blockers_about(&read, &["pkcs11"], "pin", d),
            ["pkcs11.pin_file DIR/pins/user-pin does not exist"]
        );
    }

    const HIDDEN: &str =
        "(the value is not shown: without a '/' it may be the secret itself; give a path)";

    #[test]
    fn missing_vault_credential_files_block_a_restart_with_a_changed_vault_section() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vault = |auth: &str| {
            backend_config(
                d,
                "vault",
                &format!(
                    "[vault]\naddress = \"http://127.0.0.1:8200\"\nissuer_ref = \"root\"\n[vault.auth]\n{auth}"
                ),
            )
        };
        let approle = vault(
            "method = \"approle\"\nrole_id_file = \"role-id\"\nsecret_id_file = \"secret-id\"",
        );
        assert_eq!(
            blockers_about(&approle, &["vault"], "vault.auth", d),
            [
                format!("vault.auth.role_id_file {HIDDEN} does not exist"),
                format!("vault.auth.secret_id_file {HIDDEN} does not exist")
            ]
        );
        assert!(blockers_about(&approle, &["pkcs11"], "vault.auth", d).is_empty());
        let token = vault("method = \"token\"\ntoken_file = \"./token\"");
        assert_eq!(
            blockers_about(&token, &["vault"], "vault.auth", d),
            ["vault.auth.token_file DIR/./token does not exist"]
        );
        let kubernetes = vault("method = \"kubernetes\"\nrole = \"r\"\njwt_file = \"jwt\"");
        assert_eq!(
            blockers_about(&kubernetes, &["vault"], "vault.auth", d),
            [format!("vault.auth.jwt_file {HIDDEN} does not exist")]
        );
        for file in ["role-id", "secret-id", "token", "jwt"] {
            std::fs::write(d.join(file), "x\n").unwrap();
        }
        for read in [&approle, &token, &kubernetes] {
            assert!(blockers_about(read, &["vault"], "vault.auth", d).is_empty());
        }
    }

    #[test]
    fn a_missing_vault_ca_bundle_blocks_a_restart_with_a_changed_vault_section() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let read = backend_config(
            d,
            "vault",
            "[vault]\naddress = \"https://vault.example.org:8200\"\nca_cert = \"vault-ca.pem\"\nissuer_ref = \"root\"\n[vault.auth]\nmethod = \"token\"\ntoken_env = \"VAULT_TOKEN\"",
        );
        assert_eq!(
            blockers_about(&read, &["vault"], "vault.ca_cert", d),
            ["vault.ca_cert DIR/vault-ca.pem does not exist"]
        );
        assert!(blockers_about(&read, &["root"], "vault.ca_cert", d).is_empty());
        std::fs::write(d.join("vault-ca.pem"), "x\n").unwrap();
        assert!(blockers_about(&read, &["vault"], "vault.ca_cert", d).is_empty());
    }

    /// The root the signer of these tests issues under.
    const ROOT: &str = "5c7c996eb6003a9f99a65aa58a2c23b3a2bd6f1fe7d0d1332edc13411cb37b66";

    const A_ONLY: &str = r#"[[clients]]
identity = "spiffe://t/a"
allow = [{ virtual_mesh = "test/vm", mesh = "test/cluster-a" }]"#;

    #[test]
    fn a_reload_that_renames_clients_drops_their_issuance_series() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        let metrics = crate::signer::metrics::Metrics::new(
            now + hour,
            crate::tlsutil::Validity {
                not_before: now,
                not_after: now + hour,
            },
        );
        let rules = |ids: &[&str]| {
            let clients: String = ids
                .iter()
                .map(|id| {
                    format!(
                        "[[clients]]\nidentity = \"{id}\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-a\" }}]\n"
                    )
                })
                .collect();
            Rules::of(&config(dir.path(), MESHES, &clients, ""), ROOT)
        };
        let series = |name: &str, count: u32| {
            format!(
                "meshca_intermediates_issued_total{{client=\"spiffe://t/{name}\",virtual_mesh=\"test/vm\"}} {count}\n"
            )
        };
        metrics.rules_in_force(&rules(&["spiffe://t/a", "spiffe://t/b"]));
        metrics.issued("spiffe://t/a", "test/vm");
        metrics.issued("spiffe://t/b", "test/vm");
        assert!(metrics.render().contains(&series("a", 1)));
        metrics.rules_in_force(&rules(&["spiffe://t/b", "spiffe://t/c"]));
        let text = metrics.render();
        assert!(!text.contains("spiffe://t/a"), "{text}");
        assert!(text.contains(&series("b", 1)), "{text}");
        assert!(text.contains(&series("c", 0)), "{text}");
    }

    #[test]
    fn the_same_rules_are_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let rules = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        assert!(RulesChange::between(&rules, &rules.clone()).is_empty());
    }

    #[test]
    fn every_enforced_difference_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let before = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let meshes = MESHES
            .replace("ttlDays: 30", "ttlDays: 10")
            .replace("rsaKeySizeBytes: 2048", "rsaKeySizeBytes: 3072")
            .replace("orgName: acme", "orgName: acme2")
            .replace(
                "{name: cluster-b, namespace: test}",
                "{name: cluster-c, namespace: test}",
            )
            + r#"---
apiVersion: networking.mesh.gloo.solo.io/v1
kind: VirtualMesh
metadata: {name: other, namespace: test}
spec:
  meshes: [{name: cluster-a, namespace: test}]
  certificateAuthority:
    builtin: {ttlDays: 1, rsaKeySizeBytes: 4096, orgName: o}
"#;
        let clients = r#"[[clients]]
identity = "spiffe://t/a"
allow = [{ virtual_mesh = "test/other", mesh = "test/cluster-a" }]
[[clients]]
identity = "spiffe://t/c"
allow = [{ virtual_mesh = "test/vm", mesh = "test/cluster-c" }]"#;
        let after = Rules::of(&config(dir.path(), &meshes, clients, ""), ROOT);
        let change = RulesChange::between(&before, &after);
        assert_eq!(
            change.statements,
            [
                "virtual mesh test/vm: org \"acme\" -> \"acme2\", ttl 30 days -> 10 days, RSA minimum 2048 -> 3072 bits, meshes added: test/cluster-c, meshes removed: test/cluster-b",
                "virtual mesh test/other added (org \"o\", ttl 1 day, RSA minimum 4096 bits, meshes: test/cluster-a)",
                "client spiffe://t/a: may now ask for test/cluster-a in test/other; may no longer ask for test/cluster-a in test/vm",
                "client spiffe://t/c added (may ask for test/cluster-c in test/vm)",
            ]
        );
        // And back: removals are named too.
        let back = RulesChange::between(&after, &before);
        assert!(
            back.statements
                .contains(&"virtual mesh test/other removed".to_string())
        );
        assert!(
            back.statements
                .contains(&"client spiffe://t/c removed".to_string())
        );
    }

    /// 499 clients renamed made a log line of 77 KB: the line lists 16 statements and 16
    /// names of each list, then counts; the audit record's statements keep every one.
    #[test]
    fn a_reloads_log_line_lists_16_of_each_list_and_the_record_keeps_all() {
        let dir = tempfile::tempdir().unwrap();
        let before = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let added: Vec<String> = (0..20).map(|n| format!("m{n:02}")).collect();
        let members: String = added
            .iter()
            .map(|name| format!(", {{name: {name}, namespace: test}}"))
            .collect();
        let meshes = MESHES.replace(
            "{name: cluster-b, namespace: test}]",
            &format!("{{name: cluster-b, namespace: test}}{members}]"),
        );
        let allow = |names: &[String]| {
            names
                .iter()
                .map(|name| format!("{{ virtual_mesh = \"test/vm\", mesh = \"test/{name}\" }}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut clients = format!(
            "[[clients]]\nidentity = \"spiffe://t/a\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-a\" }}, {}]\n",
            allow(&added)
        );
        for n in 0..20 {
            clients.push_str(&format!(
                "[[clients]]\nidentity = \"spiffe://t/c{n:02}\"\nallow = [{}]\n",
                allow(&added[..1])
            ));
        }
        let after = Rules::of(&config(dir.path(), &meshes, &clients, ""), ROOT);
        let change = RulesChange::between(&before, &after);
        // The record: 22 statements, every name.
        assert_eq!(change.statements.len(), 22, "{change}");
        let record = change.to_string();
        assert!(
            record.contains("test/m18, test/m19; ")
                && record.contains("test/m19 in test/vm")
                && record.contains("spiffe://t/c19 added"),
            "{record}"
        );
        let sixteen = |each: fn(&String) -> String| {
            added[..16].iter().map(each).collect::<Vec<_>>().join(", ")
        };
        let line = change.log_line();
        assert!(
            line.starts_with(&format!(
                "virtual mesh test/vm: meshes added: {} and 4 more; client spiffe://t/a: may now ask for {} and 4 more; client spiffe://t/c00 added",
                sixteen(|name| format!("test/{name}")),
                sixteen(|name| format!("test/{name} in test/vm")),
            )),
            "{line}"
        );
        assert!(
            line.ends_with(
                "; client spiffe://t/c13 added (may ask for test/m00 in test/vm); and 6 more changes (the audit log's reload record names them all)"
            ),
            "{line}"
        );
        assert!(!line.contains("m19") && !line.contains("c14"), "{line}");
        // Nothing left out: the line is the record's message.
        let small = RulesChange::between(
            &before,
            &Rules::of(&config(dir.path(), MESHES, "", ""), ROOT),
        );
        assert_eq!(small.log_line(), small.to_string());
        assert_eq!(small.log_line(), "client spiffe://t/a removed");
    }

    #[test]
    fn a_start_states_the_rules_and_their_digest_follows_every_difference() {
        let dir = tempfile::tempdir().unwrap();
        let rules = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        assert_eq!(
            rules.summary(),
            "virtual mesh test/vm (org \"acme\", ttl 30 days, RSA minimum 2048 bits, meshes: test/cluster-a, test/cluster-b); \
             1 clients with 1 grants; \
             limits: sign_requests_per_minute 600, sign_burst 60, max_connections 1024, handshake_timeout_ms 10000, header_timeout_ms 10000, body_timeout_ms 10000, drain_timeout_ms 30000"
        );
        let digest = rules.digest();
        assert_eq!(digest.len(), 64);
        // The digest is that of the text, which names every grant and setting.
        assert_eq!(hex(&sha2::Sha256::digest(rules.text().as_bytes())), digest);
        assert_eq!(
            rules.text(),
            format!(
                "root {ROOT}\n\
                 virtual_mesh test/vm org=\"acme\" max_ttl_seconds=2592000 min_rsa_bits=2048 meshes=test/cluster-a, test/cluster-b\n\
                 grant \"spiffe://t/a\" test/vm test/cluster-a\n\
                 limit sign_requests_per_minute=600\n\
                 limit sign_burst=60\n\
                 limit max_connections=1024\n\
                 limit handshake_timeout_ms=10000\n\
                 limit header_timeout_ms=10000\n\
                 limit body_timeout_ms=10000\n\
                 limit drain_timeout_ms=30000\n"
            )
        );
        // Free text is quoted as a JSON string; a display name is named only when set.
        let named = MESHES.replace("spec:\n", "spec:\n  displayName: 'Demo \"Mesh\" \\ 1'\n");
        let named = Rules::of(&config(dir.path(), &named, A_ONLY, ""), ROOT);
        assert!(
            named.text().contains(
                "min_rsa_bits=2048 display_name=\"Demo \\\"Mesh\\\" \\\\ 1\" meshes=test/cluster-a"
            ),
            "{}",
            named.text()
        );
        // The same rules read again (from another file): the same digest.
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let again = Rules::of(&config(&dir.path().join("other"), MESHES, A_ONLY, ""), ROOT);
        assert_eq!(again.digest(), digest);
        // Any difference, a reload's or a restart's, another digest.
        let differing = [
            config(
                dir.path(),
                &MESHES.replace("ttlDays: 30", "ttlDays: 29"),
                A_ONLY,
                "",
            ),
            config(
                dir.path(),
                MESHES,
                &A_ONLY.replace("cluster-a\" }", "cluster-b\" }"),
                "",
            ),
            config(dir.path(), MESHES, A_ONLY, "[limits]\nsign_burst = 61"),
            config(dir.path(), MESHES, A_ONLY, "[limits]\nmax_connections = 7"),
        ];
        // The same rules under another root (another signer, or a root changed with
        // `root init --force` between two starts).
        let other_root = "ff".repeat(32);
        assert_ne!(
            Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), &other_root).digest(),
            digest
        );
        for read in &differing {
            assert_ne!(
                Rules::of(read, ROOT).digest(),
                digest,
                "{:?}",
                Rules::of(read, ROOT).summary()
            );
        }
    }

    /// Trust domains are rules: in the text (only when set, so rules without them keep
    /// their digest), the summary, and a reload's statement.
    #[test]
    fn trust_domains_are_part_of_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let before = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let constrained = MESHES.replace("spec:\n", "spec:\n  trustDomains: [b.local, a.local]\n");
        let after = Rules::of(&config(dir.path(), &constrained, A_ONLY, ""), ROOT);
        assert!(
            after
                .text()
                .contains("meshes=test/cluster-a, test/cluster-b trust_domains=a.local,b.local\n"),
            "{}",
            after.text()
        );
        assert!(
            !before.text().contains("trust_domains"),
            "{}",
            before.text()
        );
        assert_ne!(before.digest(), after.digest());
        assert!(
            after.summary().contains(
                "meshes: test/cluster-a, test/cluster-b, trust domains: a.local, b.local)"
            ),
            "{}",
            after.summary()
        );
        assert_eq!(
            RulesChange::between(&before, &after).statements,
            ["virtual mesh test/vm: trust domains none -> a.local, b.local"]
        );
        assert_eq!(
            RulesChange::between(&after, &before).statements,
            ["virtual mesh test/vm: trust domains a.local, b.local -> none"]
        );
    }

    #[test]
    fn settings_read_only_at_start_are_named_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let in_force = config(dir.path(), MESHES, A_ONLY, "");
        assert!(restart_only_changes(&in_force, &in_force.clone()).is_empty());
        let read = SignerConfig {
            listen: "127.0.0.1:1".parse().unwrap(),
            client_crl_overdue: crate::tlsutil::CrlOverdue::Refuse,
            ..config(
                dir.path(),
                MESHES,
                A_ONLY,
                "[limits]\nmax_connections = 7\nsign_burst = 7",
            )
        };
        assert_eq!(
            restart_only_changes(&in_force, &read),
            // `[tls]` settings are put in force by the reload, not held for a restart.
            ["listen", "limits.max_connections"]
        );
    }

    #[test]
    fn limits_change_by_reload_except_the_connection_slots() {
        let dir = tempfile::tempdir().unwrap();
        let before = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let read = config(
            dir.path(),
            MESHES,
            A_ONLY,
            "[limits]\nsign_requests_per_minute = 1200\nbody_timeout_ms = 30000\nmax_connections = 7",
        );
        let after = Rules::reloaded(&read, &before);
        assert_eq!(after.limits.max_connections, before.limits.max_connections);
        assert_eq!(after.limits.sign_requests_per_minute, 1200);
        assert_eq!(
            RulesChange::between(&before, &after).statements,
            ["limits: sign_requests_per_minute 600 -> 1200, body_timeout_ms 10000 -> 30000"]
        );
    }

    #[test]
    fn announced_roots_are_named_when_they_come_change_or_go() {
        let dir = tempfile::tempdir().unwrap();
        let none = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let root = |announcement, fingerprint: &str| AnnouncedRoot {
            announcement,
            path: dir.path().join("root.pem"),
            pem: String::new(),
            fingerprint_sha256: fingerprint.into(),
            key_kind: crate::pki::keys::KeyType::EcdsaP384.public_key_kind(),
            not_after: std::time::SystemTime::now(),
            cross_cert: None,
        };
        let announcing = |next: Option<&str>, previous: Option<&str>| Rules {
            next_root: next.map(|fp| root(Announcement::Next, fp)),
            previous_root: previous.map(|fp| root(Announcement::Previous, fp)),
            ..none.clone()
        };
        let statements = |a: &Rules, b: &Rules| RulesChange::between(a, b).statements;
        assert_eq!(
            statements(&none, &announcing(Some("aa"), None)),
            ["next root sha256 aa announced"]
        );
        assert_eq!(
            statements(&announcing(Some("aa"), None), &announcing(Some("bb"), None)),
            ["next root sha256 aa -> bb"]
        );
        assert_eq!(
            statements(&announcing(Some("aa"), None), &none),
            ["next root sha256 aa no longer announced"]
        );
        assert!(
            statements(&announcing(Some("aa"), None), &announcing(Some("aa"), None)).is_empty()
        );
        // The switch as a reload sees it: the next root goes, the old root is announced
        // as the previous one; later it goes too.
        assert_eq!(
            statements(&announcing(Some("bb"), None), &announcing(None, Some("aa"))),
            [
                "next root sha256 bb no longer announced",
                "previous root sha256 aa announced"
            ]
        );
        assert_eq!(
            statements(&announcing(None, Some("aa")), &none),
            ["previous root sha256 aa no longer announced"]
        );
        // The root key's cross certificate for a root newly announced is named with it,
        // in the reload's record and in the start's.
        let mut vouched = announcing(Some("cc"), None);
        if let Some(next) = vouched.next_root.as_mut() {
            next.cross_cert = Some(crate::pki::cross::CrossCert {
                pem: String::new(),
                serial: "4f01".into(),
                fingerprint_sha256: "dd".into(),
            });
        }
        assert_eq!(
            statements(&announcing(Some("aa"), None), &vouched),
            ["next root sha256 aa -> cc (cross certificate serial 4f01 sha256 dd)"]
        );
        assert!(
            vouched.summary().ends_with(
                "next root sha256 cc (cross certificate serial 4f01 sha256 dd) announced"
            ),
            "{}",
            vouched.summary()
        );
        // Not a restart-only setting: the reload puts it in force.
        let read = config(dir.path(), MESHES, A_ONLY, "");
        let mut announced = read.clone();
        announced.root.next = Some(root(Announcement::Next, "aa"));
        announced.root.previous = Some(root(Announcement::Previous, "bb"));
        assert!(restart_only_changes(&read, &announced).is_empty());
    }

    #[test]
    fn an_issuer_pin_is_in_the_rules_and_its_change_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let before = Rules::of(&config(dir.path(), MESHES, A_ONLY, ""), ROOT);
        let pinned = format!("{A_ONLY}\nissuer = \"sha256:{}\"", "ab".repeat(32));
        let after = Rules::of(&config(dir.path(), MESHES, &pinned, ""), ROOT);
        assert!(
            after.text().contains(&format!(
                "grant \"spiffe://t/a\" test/vm test/cluster-a\nissuer \"spiffe://t/a\" \"sha256:{}\"\n",
                "ab".repeat(32)
            )),
            "{}",
            after.text()
        );
        assert_ne!(before.digest(), after.digest());
        assert_eq!(
            RulesChange::between(&before, &after).statements,
            [format!(
                "client spiffe://t/a: issuer any client CA -> sha256:{}",
                "ab".repeat(32)
            )]
        );
        let by_subject = format!("{A_ONLY}\nissuer = \"CN=team pay CA,O=pay\"");
        let subject = Rules::of(&config(dir.path(), MESHES, &by_subject, ""), ROOT);
        assert_eq!(
            RulesChange::between(&after, &subject).statements,
            [format!(
                "client spiffe://t/a: issuer sha256:{} -> CN=team pay CA,O=pay",
                "ab".repeat(32)
            )]
        );
    }
}
