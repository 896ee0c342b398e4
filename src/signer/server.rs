//! Starting and running the signer: backend, audit log, TLS listener with bounded
//! connections and timeouts, an optional plain ops listener, a reload of the TLS files and
//! of the rules (policies, clients) on SIGHUP, and a graceful drain on SIGTERM (in-flight
//! requests finish, then exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::api::{self, ClientIdentity};
use super::audit::{AuditLog, AuditRecord, HeadAnchor, rfc3339};
use super::metrics::Metrics;
use super::ratelimit::{
    ClientLogThrottle, LogThrottle, REFUSAL_TALLY_PERIOD, RateLimit, RateLimiter, RefusalTally,
};
use super::reload::{Rules, RulesChange, restart_only_changes};
use super::{BoundAddresses, SignerState};
use crate::backend::RootSigner;
use crate::backend::pkcs11::{Pkcs11Backend, TokenError};
use crate::backend::vault::client::VaultError;
use crate::backend::vault::{VaultBackend, VaultStartError};
use crate::config::{
    AnnouncedRoot, Announcement, BackendSettings, ConfigError, RootSettings, SignerConfig,
};
use crate::pki::profile::RootCa;
use crate::policy::rules::check_root_strength;
use crate::tlsutil::{
    ClientCaError, CrlNextUpdate, CrlOverdue, MaterialFingerprint, MeshRoot, SupersededCrl,
    TlsError, TransportTrust, TrustChange, Validity, check_client_ca_apart_from_mesh,
    server_config,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Root(String),
    #[error("{0}")]
    Backend(String),
    /// The token refused the PIN (or has locked it): a restart would present the same PIN
    /// again, and each refusal counts towards locking the token.
    #[error("{0}")]
    PinRefused(String),
    /// Vault refused the login's credentials: a restart would present them again, and
    /// each refusal counts towards locking the role.
    #[error("{0}")]
    CredentialsRefused(String),
    #[error(transparent)]
    Audit(#[from] super::audit::AuditError),
    #[error(transparent)]
    Tls(#[from] crate::tlsutil::TlsError),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot handle signals: {0}")]
    Signals(String),
    /// The root key could not vouch for an announced root: the agents would not take it.
    #[error("{0}: the signer does not start")]
    CrossCert(String),
    /// The system clock reads before a certificate the signer works with begins: the
    /// clock is wrong (before 1970, TLS cannot check any certificate at all).
    #[error(
        "the system clock reads {}, before the notBefore ({}) of {what}: the clock is wrong (no certificate is in use before it begins); set it right (NTP) and start again",
        rfc3339(*now),
        rfc3339(*not_before)
    )]
    ClockBehind {
        what: String,
        now: SystemTime,
        not_before: SystemTime,
    },
}

impl StartError {
    /// The process exit status for this failure: [`EXIT_PIN_REFUSED`] for a refused PIN,
    /// so that a supervisor can be told not to restart (systemd's
    /// `RestartPreventExitStatus`); 1 otherwise.
    pub fn exit_status(&self) -> u8 {
        match self {
            StartError::PinRefused(_) | StartError::CredentialsRefused(_) => EXIT_PIN_REFUSED,
            _ => 1,
        }
    }
}

/// Exit status of a signer whose token refused the PIN: sysexits' EX_CONFIG (the
/// configuration is wrong; running again will not help).
pub const EXIT_PIN_REFUSED: u8 = 78;

/// Loads the root certificate named by the config.
pub fn load_root(config: &SignerConfig) -> Result<RootCa, StartError> {
    let path = &config.root.certificate;
    let pem = crate::fsutil::read_text(path).map_err(|e| {
        StartError::Root(format!(
            "{e} (run `meshca root init --config {}` first)",
            config.path.display()
        ))
    })?;
    let root =
        RootCa::from_pem(&pem).map_err(|e| StartError::Root(format!("{}: {e}", path.display())))?;
    check_root_strength(&root.key_kind, &config.policies).map_err(StartError::Root)?;
    check_announced_roots(&root, &config.root).map_err(StartError::Root)?;
    Ok(root)
}

/// `root.key_type` must be the root certificate's key: it is what `root init` made, what a
/// root change sets (README "Changing the root", step 4), and a config that names another
/// key type describes another root than the one it serves. Checked at start and by
/// `serve --check`; `root show` still shows the root.
pub fn check_root_key_type(config: &SignerConfig, root: &RootCa) -> Result<(), StartError> {
    let key_type = config.root.key_type;
    if key_type.is_type_of(&root.key_kind) {
        return Ok(());
    }
    Err(StartError::Root(format!(
        "root.key_type {key_type} does not match the root certificate {} ({}): set key_type to the root's key type",
        config.root.certificate.display(),
        root.key_kind
    )))
}

/// Has the root key vouch for each root `rules` announce ([`crate::pki::cross`]): the
/// cross certificate `in_force` holds for the same root is kept, so one is made at start
/// and when an announcement changes, not at every reload. Names the root it could not
/// vouch for.
pub async fn vouch_for_announced(
    backend: &dyn RootSigner,
    rules: &mut Rules,
    in_force: Option<&Rules>,
) -> Result<(), String> {
    for announced in [rules.next_root.as_mut(), rules.previous_root.as_mut()]
        .into_iter()
        .flatten()
    {
        let kept = in_force
            .into_iter()
            .flat_map(|rules| rules.announced_roots())
            .find(|r| r.fingerprint_sha256 == announced.fingerprint_sha256)
            .and_then(|r| r.cross_cert.clone());
        if let Some(kept) = kept {
            announced.cross_cert = Some(kept);
            continue;
        }
        let cannot = |e: String| {
            announced.problem(format!(
                "the root key cannot make the cross certificate that vouches for {} sha256 {} to the agents: {e}",
                announced.announcement.name(),
                announced.fingerprint_sha256
            ))
        };
        let root = RootCa::from_pem(&announced.pem).map_err(|e| cannot(e.to_string()))?;
        let certificate = backend
            .cross_sign(&root)
            .await
            .map_err(|e| cannot(e.to_string()))?;
        let cross =
            crate::pki::cross::CrossCert::of(&certificate).map_err(|e| cannot(e.to_string()))?;
        tracing::info!(
            sha256 = %announced.fingerprint_sha256,
            cross_serial = %cross.serial,
            cross_sha256 = %cross.fingerprint_sha256,
            "the root key vouches for the {}: cross certificate made",
            announced.announcement.name()
        );
        announced.cross_cert = Some(cross);
    }
    Ok(())
}

/// Why the signings of virtual meshes of `policies` that set `spec.trustDomains` would all
/// be refused, when the backend can tell it cannot sign intermediates with name
/// constraints: found otherwise only when a cluster asks (at its renewal, months on).
pub async fn constrained_unsignable(
    backend: &dyn RootSigner,
    policies: &crate::policy::PolicySet,
) -> Option<String> {
    let constrained: Vec<String> = policies
        .iter()
        .filter(|policy| !policy.trust_domains.is_empty())
        .map(|policy| policy.id.to_string())
        .collect();
    let first = constrained.first()?;
    let why = backend.cannot_sign_constrained().await?;
    let others = match constrained.len() - 1 {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!(
        "{why}: every signing for a virtual mesh with spec.trustDomains ({first}{others}) is refused (503 backend_unavailable) until it does"
    ))
}

/// [`constrained_unsignable`], said as a warning.
async fn warn_if_constrained_unsignable(
    backend: &dyn RootSigner,
    policies: &crate::policy::PolicySet,
    prefix: &str,
) {
    if let Some(problem) = constrained_unsignable(backend, policies).await {
        tracing::warn!("{prefix}{problem}");
    }
}

/// Each announced root must be another root than the one in force and than the other
/// announced one: a next root left in place after the switch, or a previous root named
/// before it, would announce nothing.
pub fn check_announced_roots(root: &RootCa, settings: &RootSettings) -> Result<(), String> {
    for announced in settings.announced() {
        if announced.fingerprint_sha256 == root.fingerprint_sha256 {
            let advice = match announced.announcement {
                Announcement::Next => "remove it once the signer has switched",
                Announcement::Previous => "name the root the signer switched from",
            };
            return Err(
                announced.problem(format!("is the root in force (root.certificate): {advice}"))
            );
        }
    }
    if let (Some(next), Some(previous)) = (&settings.next, &settings.previous)
        && next.fingerprint_sha256 == previous.fingerprint_sha256
    {
        return Err(previous.problem(format!(
            "is also {} {}: a root is either ahead of the root in force or behind it",
            Announcement::Next.key(),
            next.path.display()
        )));
    }
    Ok(())
}

/// The mesh roots a client CA must be apart from: the root in force (`root_path`, as the
/// config names it) and the announced ones.
pub(super) fn mesh_roots<'a>(
    root: &RootCa,
    root_path: &std::path::Path,
    announced: impl Iterator<Item = &'a AnnouncedRoot>,
) -> Result<Vec<MeshRoot>, ClientCaError> {
    let mut roots = vec![MeshRoot {
        name: format!("the root (root.certificate {})", root_path.display()),
        certificate: root.certificate.clone(),
    }];
    for announced in announced {
        let name = format!(
            "the {} ({} {})",
            announced.announcement.name(),
            announced.announcement.key(),
            announced.path.display()
        );
        // Read and checked as one certificate when the config was loaded.
        let certificate = crate::pki::pem::decode_certificates(&announced.pem)
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .ok_or_else(|| ClientCaError::UnusableRoot {
                root: name.clone(),
                message: "its certificate no longer parses".into(),
            })?;
        roots.push(MeshRoot { name, certificate });
    }
    Ok(roots)
}

/// Warns of each announced root that has ended. It stays announced (the agents skip it,
/// and `MeshcaNextRootExpiresSoon` keeps firing for a next root), and a start or reload
/// does not fail because time passed; the log says why the agents no longer add it.
fn warn_of_ended_announced_roots(settings: &RootSettings) {
    let now = SystemTime::now();
    for root in settings.announced().filter(|root| root.not_after <= now) {
        let advice = match root.announcement {
            Announcement::Next => "announce a new next root in its place (or withdraw it)",
            Announcement::Previous => "withdraw it",
        };
        tracing::warn!(
            file = %root.path.display(),
            fingerprint_sha256 = %root.fingerprint_sha256,
            expired_at = %rfc3339(root.not_after),
            "the {} ({}) has expired: the agents no longer trust it; {advice} and reload",
            root.announcement.name(),
            root.announcement.key(),
        );
    }
}

/// Says at ERROR that the serving certificate has expired (at a start, and after a TLS
/// reload that leaves it in force): the signer runs, but no client completes a handshake.
fn error_if_server_certificate_expired(not_after: SystemTime, file: &std::path::Path) {
    if not_after <= SystemTime::now() {
        tracing::error!(
            file = %file.display(),
            expired_at = %rfc3339(not_after),
            "the signer's TLS server certificate has expired: every client refuses the handshake and /readyz is 503; renew it and reload (SIGHUP)"
        );
    }
}

/// Refuses a start (and `serve --check`) whose clock reads before the root certificate or
/// the TLS server certificate begins by more than the notBefore backdating: a clock set
/// back (before 1970, no handshake could check a certificate at all), whose intermediates
/// would have ended before the clusters' clocks read them. A few seconds or minutes behind
/// the host that made them (a root is not backdated) is tolerated: intermediates are
/// backdated by as much. A reload does not check it: the signer runs on.
pub(super) fn clock_reaches_certificates(
    root: &RootCa,
    server_certificate: &Validity,
    config: &SignerConfig,
    now: SystemTime,
) -> Result<(), StartError> {
    let root_begins = root
        .certificate
        .tbs_certificate()
        .validity()
        .not_before
        .to_system_time();
    let certificates = [
        (
            format!("the root certificate {}", config.root.certificate.display()),
            root_begins,
        ),
        (
            format!("the TLS server certificate {}", config.tls_cert.display()),
            server_certificate.not_before,
        ),
    ];
    for (what, not_before) in certificates {
        if now + crate::policy::rules::BACKDATE < not_before {
            return Err(StartError::ClockBehind {
                what,
                now,
                not_before,
            });
        }
    }
    Ok(())
}

/// Says at ERROR, at a start, that the root has expired: every signing request is refused.
fn error_if_root_expired(root: &RootCa) {
    if root.not_after <= SystemTime::now() {
        tracing::error!(
            fingerprint_sha256 = %root.fingerprint_sha256,
            expired_at = %rfc3339(root.not_after),
            "the root certificate has expired: every signing request is refused (root_expired) and /readyz is 503; move to a new root"
        );
    }
}

/// Why a reload of the rules changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    RootTooWeak(String),
    #[error("{0}")]
    AnnouncedRoot(String),
    /// The root key could not vouch for a root announced now: the announcement in force
    /// stays.
    #[error("{0}: the announcement in force stays")]
    CrossCert(String),
    #[error(transparent)]
    ClientCa(#[from] ClientCaError),
    #[error("the audit log cannot record the change, so it is not applied: {0}")]
    Audit(#[from] super::audit::AuditError),
}

/// What a reload of the rules did.
#[derive(Debug)]
pub struct RulesReload {
    /// Empty when the rules read are the ones in force.
    pub change: RulesChange,
    /// Settings read only at start that differ in the file (left as they are).
    pub restart_only: Vec<&'static str>,
    /// Files those settings name that are missing: a restart would fail.
    pub restart_blockers: Vec<String>,
    /// The digest of the rules in force after the reload (changed or not): the value to
    /// compare between replicas.
    pub rules_sha256: String,
}

/// Opens the backend the config names (blocking: token login, key check; Vault login and
/// issuer check). Must run on a blocking thread of the runtime.
pub fn start_backend(
    config: &SignerConfig,
    root: RootCa,
) -> Result<Arc<dyn RootSigner>, StartError> {
    match config.backend().map_err(StartError::Backend)? {
        BackendSettings::Pkcs11(settings) => {
            let pin = read_pin(settings)?;
            let backend = Pkcs11Backend::start(settings, pin, root).map_err(|e| {
                let message = format!("PKCS#11 token: {e}");
                match e {
                    TokenError::PinIncorrect { .. } | TokenError::PinLocked => {
                        StartError::PinRefused(message)
                    }
                    _ => StartError::Backend(message),
                }
            })?;
            Ok(Arc::new(backend))
        }
        BackendSettings::Vault(settings) => {
            // Called on a thread of its own that entered the runtime: wait for the async
            // start here.
            let backend = tokio::runtime::Handle::current()
                .block_on(VaultBackend::start(settings, root))
                .map_err(|e| {
                    let message = format!("Vault: {e}");
                    match e {
                        VaultStartError::Vault(VaultError::LoginRefused { .. }) => {
                            StartError::CredentialsRefused(message)
                        }
                        _ => StartError::Backend(message),
                    }
                })?;
            Ok(Arc::new(backend))
        }
    }
}

/// The token's user PIN from its configured source (its file's 0600 rule included).
pub(super) fn read_pin(
    settings: &crate::config::Pkcs11Settings,
) -> Result<crate::secret::Secret, StartError> {
    settings
        .pin
        .read()
        .map_err(|e| StartError::Backend(format!("user PIN: {e}")))
}

/// The `[tls]` settings: where the server certificate and key, the client CA and the
/// client CRLs are, and what an overdue CRL means. Read at start; a SIGHUP that reads a
/// valid config puts the file's in force, so a CRL added during an incident is enforced
/// without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsFiles {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: PathBuf,
    pub(super) client_crls: Vec<PathBuf>,
    pub(super) client_crl_overdue: CrlOverdue,
}

impl TlsFiles {
    pub(super) fn of(config: &SignerConfig) -> Self {
        TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            client_ca: config.client_ca.clone(),
            client_crls: config.client_crls.clone(),
            client_crl_overdue: config.client_crl_overdue,
        }
    }

    /// The settings (by their config names) whose value differs in `read`.
    fn changed_in(&self, read: &TlsFiles) -> Vec<&'static str> {
        [
            ("tls.cert", self.cert == read.cert),
            ("tls.key", self.key == read.key),
            ("tls.client_ca", self.client_ca == read.client_ca),
            ("tls.client_crls", self.client_crls == read.client_crls),
            (
                "tls.client_crl_overdue",
                self.client_crl_overdue == read.client_crl_overdue,
            ),
        ]
        .into_iter()
        .filter_map(|(name, same)| (!same).then_some(name))
        .collect()
    }
}

/// The TLS settings new connections are accepted with.
#[derive(Clone)]
pub(super) struct ServingTls {
    acceptor: TlsAcceptor,
    pub(super) certificate: Validity,
    pub(super) client_ca_not_after: SystemTime,
    pub(super) crl_next_updates: Vec<CrlNextUpdate>,
    pub(super) superseded_crls: Vec<SupersededCrl>,
    pub(super) client_ca_crl_problems: Vec<String>,
    pub(super) key_readable_by_others: Option<crate::tlsutil::KeyReadableByOthers>,
    /// The client CA certificates: a reload of the rules checks them against the roots
    /// it announces and the clients' issuers; a decision finds its client's CA in them.
    pub(super) client_cas: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The same, described once for every connection accepted under these settings.
    pub(super) client_ca_set: Arc<crate::tlsutil::ClientCaSet>,
    /// What the acceptor was built from: a reload that reads the same keeps it.
    pub(super) fingerprint: MaterialFingerprint,
    /// With `client_crl_overdue = "refuse"`, the earliest `nextUpdate` of the CRLs in
    /// force: from then on a kept-alive connection's client is checked again at each
    /// request, as a new handshake would be (nothing in the fingerprint changes).
    pub(super) crls_refuse_from: Option<SystemTime>,
    /// The acceptor's client verifier: a decision checks its client with the one in force
    /// once the body is in (a reload may have revoked it since the handshake).
    pub(super) client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// What it trusts and presents: the `start` record names it, a reload records how it
    /// changed.
    pub(super) trust: TransportTrust,
    /// [`tls_source_digest`] of what it was built from, if every file could be read.
    source_digest: Option<[u8; 32]>,
}

/// Fresh settings from the config's TLS files (read at start, again on reload, and by
/// `serve --check`), the client CA apart from `mesh_roots`.
/// `source_digest`: [`tls_source_digest`] of them, taken before they are parsed (one
/// rewritten meanwhile makes the next reload build again, never keep what it did not
/// read), or None where no reload compares with it (`serve --check`).
pub(super) fn serving_tls(
    files: &TlsFiles,
    mesh_roots: &[MeshRoot],
    source_digest: Option<[u8; 32]>,
) -> Result<ServingTls, TlsError> {
    let tls = server_config(
        &files.cert,
        &files.key,
        &files.client_ca,
        &files.client_crls,
        files.client_crl_overdue,
    )?;
    check_client_ca_apart_from_mesh(&files.client_ca, &tls.client_cas, mesh_roots)?;
    let crls_refuse_from = (files.client_crl_overdue == CrlOverdue::Refuse)
        .then(|| {
            tls.crl_next_updates
                .iter()
                .filter_map(|crl| crl.next_update)
                .min()
        })
        .flatten();
    Ok(ServingTls {
        acceptor: TlsAcceptor::from(Arc::new(tls.config)),
        certificate: tls.certificate,
        client_ca_not_after: tls.client_ca_not_after,
        crl_next_updates: tls.crl_next_updates,
        superseded_crls: tls.superseded_crls,
        client_ca_crl_problems: tls.client_ca_crl_problems,
        key_readable_by_others: tls.key_readable_by_others,
        client_ca_set: tls.client_ca_set,
        client_cas: tls.client_cas,
        fingerprint: tls.fingerprint,
        crls_refuse_from,
        client_verifier: tls.client_verifier,
        trust: tls.trust,
        source_digest,
    })
}

/// SHA-256 of everything [`serving_tls`] builds from, as found now: the settings, the bytes
/// of each file (and the key's mode, which decides a warning), and the mesh roots the
/// client CA must be apart from. A reload that finds the digest in force keeps what is in
/// force without parsing: with a client CRL of 500,000 entries, parsing and building the
/// verifiers again took a second and doubled the memory for a SIGHUP that changed nothing
/// in `[tls]`. None if a file cannot be read (the build then says why).
fn tls_source_digest(files: &TlsFiles, mesh_roots: &[MeshRoot]) -> Option<[u8; 32]> {
    use sha2::Digest;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    // Each part followed by its length, so that no two different inputs hash alike.
    fn part(hash: &mut sha2::Sha256, bytes: &[u8]) {
        hash.update(bytes);
        hash.update((bytes.len() as u64).to_be_bytes());
    }
    let mut hash = sha2::Sha256::new();
    part(&mut hash, format!("{files:?}").as_bytes());
    let key_mode = std::fs::metadata(&files.key).ok()?.permissions().mode();
    part(&mut hash, &key_mode.to_be_bytes());
    let mut buf = vec![0u8; 64 * 1024];
    for path in [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .chain(&files.client_crls)
    {
        // Streamed: a large CRL is not held twice.
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    len += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        hash.update(len.to_be_bytes());
    }
    for root in mesh_roots {
        part(&mut hash, root.name.as_bytes());
        part(&mut hash, &der::Encode::to_der(&root.certificate).ok()?);
    }
    Some(hash.finalize().into())
}

/// A server key other users can read, named at start and at each TLS reload.
fn warn_of_open_key(tls: &ServingTls) {
    if let Some(open) = &tls.key_readable_by_others {
        tracing::warn!(key = %open.path.display(), "{open}");
    }
}

/// The client CA and CRLs now in force (at start and on a TLS reload): the CA's expiry and
/// the CRLs exported, each CRL past its `nextUpdate` warned of (the signer still enforces
/// it, but not what was revoked since; or, with `client_crl_overdue = "refuse"`, refuses
/// the clients it covers), and each one listed but superseded by a newer one of its issuer
/// named.
fn client_trust_in_force(metrics: &Metrics, tls: &ServingTls, overdue: CrlOverdue) {
    metrics.client_ca(tls.client_ca_not_after);
    metrics.client_crls(&tls.crl_next_updates);
    for superseded in &tls.superseded_crls {
        tracing::warn!(
            crl = %superseded.path.display(),
            "client CRL superseded: {superseded}; remove it from the file"
        );
    }
    for problem in &tls.client_ca_crl_problems {
        tracing::error!("client CA and CRLs: {problem}");
    }
    let now = SystemTime::now();
    for crl in &tls.crl_next_updates {
        if let Some(due) = crl.overdue_since(now) {
            warn_of_overdue_crl(&crl.path, due, overdue);
        }
    }
}

fn warn_of_overdue_crl(path: &std::path::Path, due: SystemTime, overdue: CrlOverdue) {
    match overdue {
        CrlOverdue::Accept => tracing::warn!(
            crl = %path.display(),
            next_update = %rfc3339(due),
            "client CRL past its nextUpdate: it is still enforced, but a newer one was due; revocations published since are not enforced until it is in place and the signer reloaded (SIGHUP)"
        ),
        CrlOverdue::Refuse => tracing::error!(
            crl = %path.display(),
            next_update = %rfc3339(due),
            "client CRL past its nextUpdate: the clients it covers are refused (client_crl_overdue = \"refuse\") until a newer one is in place and the signer reloaded (SIGHUP)"
        ),
    }
}

/// The client CRLs in force that were past their `nextUpdate` when last looked at: one
/// that passes it while the signer runs is warned of then, once (the start and each TLS
/// reload warn of those overdue already).
#[derive(Default)]
struct OverdueCrls(Vec<(std::path::PathBuf, SystemTime)>);

impl OverdueCrls {
    /// Those of `tls` overdue at `now`, each warned of unless it was at the last look
    /// (`warn`: false right after a load, which warned of them itself).
    fn look(&mut self, tls: &ServingTls, now: SystemTime, warn: bool) {
        let overdue: Vec<(std::path::PathBuf, SystemTime)> = tls
            .crl_next_updates
            .iter()
            .filter_map(|crl| Some((crl.path.clone(), crl.overdue_since(now)?)))
            .collect();
        if warn {
            for (path, due) in overdue.iter().filter(|crl| !self.0.contains(crl)) {
                warn_of_overdue_crl(path, *due, tls.trust.client_crl_overdue);
            }
        }
        self.0 = overdue;
    }
}

/// Why a TLS reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum TlsReloadError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the audit log cannot record the change of the transport trust, so it is not applied: {0}"
    )]
    Audit(#[from] super::audit::AuditError),
}

/// What a TLS reload did.
#[derive(Debug, Clone)]
pub struct TlsReload {
    /// The notAfter of the server certificate in force.
    pub certificate_not_after: SystemTime,
    /// Something in the files differed: new connections get the new settings and those
    /// made before close after their current request. When nothing differs, connections
    /// are left alone (a SIGHUP for a policy change does not cut every client's
    /// kept-alive connection).
    pub changed: bool,
    /// The `[tls]` settings whose value the config file changed (`tls.client_crls`, ...):
    /// in force from this reload on.
    pub settings_changed: Vec<&'static str>,
    /// The files were parsed and new settings built from them: false when their bytes
    /// (and the settings naming them) were those in force.
    pub parsed: bool,
}

/// A task the signer runs until it stops, and what the drain's warning says if it must be
/// cut short.
struct Background {
    cut: &'static str,
    handle: tokio::task::JoinHandle<()>,
}

impl Background {
    fn spawn(cut: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Background {
        Background {
            cut,
            handle: tokio::spawn(task),
        }
    }
}

/// A running signer: its addresses and the handles that reload and stop it.
pub struct RunningSigner {
    pub addresses: BoundAddresses,
    shutdown: watch::Sender<bool>,
    tasks: Vec<Background>,
    tls: watch::Sender<ServingTls>,
    state: Arc<SignerState>,
    /// The config as started: where to read it again, and what only a restart changes.
    config: SignerConfig,
    /// The `[tls]` settings in force: the started config's, then each reload's.
    tls_files: std::sync::Mutex<TlsFiles>,
    /// `--listen` was given: the file's `listen` does not matter, now or at a restart.
    listen_overridden: bool,
}

impl RunningSigner {
    /// Reads the config file again and puts its policies, client grants, limits and next
    /// root in force, after the same checks as at start (and the root's strength against
    /// the new policies). A change is written to the audit log (event `reload`) before it
    /// applies; on any error the rules in force stay. Decisions already under way finish
    /// under the rules they started with, connections keep the timeouts they were accepted
    /// with. Settings read only at start are not changed; the answer names those that
    /// differ in the file. `read` is [`RunningSigner::read_config`]'s answer.
    pub async fn reload_rules(
        &self,
        read: Result<SignerConfig, ConfigError>,
    ) -> Result<RulesReload, ReloadError> {
        let outcome = self.try_reload_rules(read).await;
        self.state.metrics.rules_reloaded(outcome.is_ok());
        if let Ok(reload) = &outcome {
            self.state
                .metrics
                .restart_pending(reload.restart_only.len());
        }
        outcome
    }

    /// Reads the config file again, and the VirtualMesh files it names: off the async
    /// workers.
    pub async fn read_config(&self) -> Result<SignerConfig, ConfigError> {
        let path = self.config.path.clone();
        tokio::task::spawn_blocking(move || SignerConfig::load(&path))
            .await
            .map_err(|e| ConfigError::Invalid {
                path: self.config.path.display().to_string(),
                message: e.to_string(),
            })?
    }

    async fn try_reload_rules(
        &self,
        read: Result<SignerConfig, ConfigError>,
    ) -> Result<RulesReload, ReloadError> {
        let read = read?;
        let root = self.state.backend.root();
        check_root_strength(&root.key_kind, &read.policies).map_err(ReloadError::RootTooWeak)?;
        check_announced_roots(root, &read.root).map_err(ReloadError::AnnouncedRoot)?;
        read.check_apart_from_root(&root.subject)?;
        // The client CA in force must be apart from a root announced now too.
        let roots = mesh_roots(root, &self.config.root.certificate, read.root.announced())?;
        let client_ca = self.tls_files_in_force().client_ca;
        check_client_ca_apart_from_mesh(&client_ca, &self.tls.borrow().client_cas, &roots)?;
        // Each issuer named must be a CA of those in force (read by this SIGHUP first).
        crate::tlsutil::check_issuer_pins(
            &client_ca,
            read.authorization.issuers(),
            &self.tls.borrow().client_cas,
        )?;
        let in_force = self.state.rules();
        let mut rules = Rules::reloaded(&read, &in_force);
        let vouched =
            vouch_for_announced(self.state.backend.as_ref(), &mut rules, Some(&*in_force)).await;
        // Cross certificates the root key made for this reload (not kept from those in
        // force): if the reload fails from here, only a line of their own names them.
        let made: Vec<String> = rules
            .announced_roots()
            .filter(|root| root.cross_cert.is_some())
            .filter(|root| {
                !in_force.announced_roots().any(|kept| {
                    kept.fingerprint_sha256 == root.fingerprint_sha256 && kept.cross_cert.is_some()
                })
            })
            .map(|root| root.described())
            .collect();
        if let Err(e) = vouched {
            self.record_failed_reload(&made, &e).await;
            return Err(ReloadError::CrossCert(e));
        }
        let change = RulesChange::between(&in_force, &rules);
        if !change.is_empty() {
            let record = AuditRecord {
                time: rfc3339(SystemTime::now()),
                event: "reload".into(),
                rule: Some("rules_changed".into()),
                message: Some(change.to_string()),
                rules_sha256: Some(rules.digest().to_string()),
                rules: Some(rules.text().to_string()),
                ..Default::default()
            };
            let announced = self.state.audit.expect_line();
            if let Err(e) = self.state.audit.append(record, announced).await {
                self.record_failed_reload(&made, &e.to_string()).await;
                return Err(e.into());
            }
            self.state.metrics.announced_roots(rules.announced_roots());
            self.state.metrics.rules_in_force(&rules);
            self.state.replace_rules(rules);
        }
        warn_of_ended_announced_roots(&read.root);
        warn_if_constrained_unsignable(self.state.backend.as_ref(), &read.policies, "SIGHUP: ")
            .await;
        // As at start, of what a reload changed: a virtual mesh added beside the others.
        // The same warning at every SIGHUP would bury the one that is news.
        for shared in read
            .policies
            .trust_domain_warnings_new_since(&in_force.policies)
        {
            tracing::warn!("SIGHUP: {shared}");
        }
        let mut restart_only = restart_only_changes(&self.config, &read);
        if self.listen_overridden {
            restart_only.retain(|setting| *setting != "listen");
        }
        let restart_blockers = super::reload::restart_blockers(&read, &restart_only);
        Ok(RulesReload {
            change,
            restart_only,
            restart_blockers,
            rules_sha256: self.state.rules().digest().to_string(),
        })
    }

    /// The `[tls]` settings in force.
    fn tls_files_in_force(&self) -> TlsFiles {
        // A panic while it was held cannot leave it half written: it is replaced whole.
        match self.tls_files.lock() {
            Ok(files) => files.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the server certificate and key, the client CA and the CRLs, from where
    /// `read`'s `[tls]` says (a config the reload could read), or else from where the
    /// settings in force say. If anything in them changed, new handshakes use them at once
    /// and connections made before close after the request they are serving, so a newly
    /// revoked client keeps no kept-alive connection; if nothing changed, connections stay
    /// open. A change of the transport trust (a client CA, a CRL, the server certificate,
    /// `client_crl_overdue`) is written to the audit log first (`tls_reload`,
    /// `tls_changed`), and not applied if it cannot be; a reload that fails is recorded
    /// too (`tls_reload_failed`). On an error the previous settings, and their places,
    /// stay in force.
    pub async fn reload_tls(
        &self,
        read: Option<&SignerConfig>,
    ) -> Result<TlsReload, TlsReloadError> {
        let in_force = self.tls_files_in_force();
        let files = read.map(TlsFiles::of).unwrap_or_else(|| in_force.clone());
        let rules = self.state.rules();
        let loaded = mesh_roots(
            self.state.backend.root(),
            &self.config.root.certificate,
            rules.announced_roots(),
        )
        .map_err(TlsError::from)
        .and_then(|roots| {
            let digest = tls_source_digest(&files, &roots);
            if digest.is_some() && digest == self.tls.borrow().source_digest {
                return Ok(None);
            }
            serving_tls(&files, &roots, digest).map(Some)
        });
        let parsed = matches!(loaded, Ok(Some(_)));
        let read = match loaded {
            Ok(Some(read)) => read,
            // The same bytes as in force: what is in force is what they would build (the
            // warnings and metrics below are given again, as after any reload).
            Ok(None) => self.tls.borrow().clone(),
            Err(e) => {
                self.state.metrics.tls_reloaded(None);
                self.record_tls_reload_failure(&e).await;
                return Err(e.into());
            }
        };
        let change = TrustChange::between(&self.tls.borrow().trust, &read.trust);
        if !change.is_empty() {
            let record = AuditRecord {
                time: rfc3339(SystemTime::now()),
                event: "tls_reload".into(),
                rule: Some("tls_changed".into()),
                message: Some(change.to_string()),
                tls: Some(read.trust.clone()),
                tls_change: Some(change),
                ..Default::default()
            };
            let announced = self.state.audit.expect_line();
            if let Err(e) = self.state.audit.append(record, announced).await {
                self.state.metrics.tls_reloaded(None);
                return Err(e.into());
            }
        }
        let certificate = read.certificate;
        error_if_server_certificate_expired(certificate.not_after, &files.cert);
        warn_of_open_key(&read);
        client_trust_in_force(&self.state.metrics, &read, files.client_crl_overdue);
        let settings_changed = in_force.changed_in(&files);
        match self.tls_files.lock() {
            Ok(mut place) => *place = files,
            Err(poisoned) => *poisoned.into_inner() = files,
        }
        let changed = self.tls.send_if_modified(|in_force| {
            let changed = in_force.fingerprint != read.fingerprint;
            if changed {
                *in_force = read;
            } else {
                // The same material from other bytes (a PEM rewritten, a key's mode): the
                // next reload compares with these.
                in_force.source_digest = read.source_digest;
            }
            changed
        });
        self.state.metrics.tls_reloaded(Some(certificate));
        Ok(TlsReload {
            certificate_not_after: certificate.not_after,
            changed,
            settings_changed,
            parsed,
        })
    }

    /// Records a rules reload that failed after the root key made cross certificates for
    /// it (`made`), which no `reload` line will name: every signature of the root key is
    /// on record. A line that cannot be written (the reason the reload failed, perhaps)
    /// leaves them to an ERROR in the log, serials and digests included.
    async fn record_failed_reload(&self, made: &[String], error: &str) {
        if made.is_empty() {
            return;
        }
        let message = format!(
            "rules not reloaded, the ones in force stay ({error}); the root key made cross certificates for the announced roots: {}, which no rule in force names",
            made.join("; ")
        );
        let record = AuditRecord {
            time: rfc3339(SystemTime::now()),
            event: "reload".into(),
            rule: Some("rules_reload_failed".into()),
            message: Some(message.clone()),
            ..Default::default()
        };
        let announced = self.state.audit.expect_line();
        if let Err(e) = self.state.audit.append(record, announced).await {
            tracing::error!(error = %e, made = %message, "the audit log cannot record the cross certificates a failed reload made");
        }
    }

    /// Records a TLS reload that failed: the trust in force stays, and the log says why
    /// another was not put in force (the error names files, never a key's contents). A
    /// line that cannot be written is logged: the reload has failed anyway.
    async fn record_tls_reload_failure(&self, error: &TlsError) {
        let record = AuditRecord {
            time: rfc3339(SystemTime::now()),
            event: "tls_reload".into(),
            rule: Some("tls_reload_failed".into()),
            message: Some(format!(
                "TLS settings not reloaded, the ones in force stay: {error}"
            )),
            ..Default::default()
        };
        let announced = self.state.audit.expect_line();
        if let Err(e) = self.state.audit.append(record, announced).await {
            tracing::error!(error = %e, "the audit log cannot record the failed TLS reload");
        }
    }

    /// Stops accepting and drains in-flight requests for at most the drain timeout, or
    /// until `hurry` resolves. Then every signing decision still under way (its connection
    /// cut by the drain, or its client gone) is stopped and audited as `signer_stopping`;
    /// returns once all decisions have their audit lines and the backend's calls still
    /// under way have ended or had their time (or `hurry` resolved): a token that stopped
    /// answering does not hold up the exit.
    pub async fn shutdown(self, hurry: impl Future<Output = ()> + Send + 'static) {
        let deadline = tokio::time::Instant::now() + self.state.rules().limits.drain_timeout;
        // `hurry` is a second stop signal: an operator who will not wait, rather than one
        // who kills the process and loses the lines. It ends every wait from then on.
        let hurried = CancellationToken::new();
        let hurry_watch = {
            let hurried = hurried.clone();
            tokio::spawn(async move {
                hurry.await;
                tracing::warn!(
                    "a second stop signal: the drain is cut short, and so is the wait for token calls still under way"
                );
                hurried.cancel();
            })
        };
        // Over at the drain time, or at once when hurried.
        let over = hurried.child_token();
        let timer = {
            let over = over.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                over.cancel();
            })
        };
        let _ = self.shutdown.send(true);
        for mut task in self.tasks {
            // A listener waits for its open connections; one that a peer holds open (a
            // request line sent to the ops port, then nothing) must not hold up the exit,
            // nor a periodic job waiting on a hung disk or backend.
            let drained = tokio::select! {
                // A task already done is not reported as cut once the drain is over.
                biased;
                _ = &mut task.handle => true,
                _ = over.cancelled() => false,
            };
            if !drained {
                tracing::warn!("drain time is over: {}", task.cut);
                task.handle.abort();
                let _ = task.handle.await;
            }
        }
        // Those still open and not serving a request are closed, and waited for (they end
        // at their next poll): one holding half a request's head, or in its handshake,
        // would otherwise send a signing request after the decisions were waited for,
        // decided while, or after, the stop is recorded.
        self.state.cut_connections.cancel();
        self.state.connections.close();
        self.state.connections.wait().await;
        let decisions = &self.state.decisions;
        decisions.close();
        let decided = tokio::select! {
            _ = decisions.wait() => true,
            _ = over.cancelled() => false,
        };
        timer.abort();
        if !decided {
            tracing::warn!(
                decisions = decisions.len(),
                "drain time is over: signing requests still under way are stopped and audited as signer_stopping"
            );
            self.state.stop_deciding.cancel();
            decisions.wait().await;
        }
        api::audit_counted_refusals(&self.state).await;
        record_stop(&self.state).await;
        HeadAnchor::default().log_if_moved(&self.state.audit);
        // Idle token threads end at once, whether hurried or not: polled first.
        tokio::select! {
            biased;
            _ = self.state.backend.finish_calls() => {}
            _ = hurried.cancelled() => {}
        }
        hurry_watch.abort();
        self.state.backend.close().await;
    }
}

/// File descriptors the signer needs besides its connections: token files and sessions,
/// the audit log, Vault connections, the runtime's own.
const OPEN_FILES_RESERVE: u64 = 64;

/// What the soft limit on open files is raised to at start (the systemd unit's
/// `LimitNOFILE`), when the hard limit allows it.
const OPEN_FILES_WANTED: u64 = 65536;

/// Open files `max_connections` API connections need, the ops port's, those of both
/// ports waiting for the slot of a connection closed for them, and the reserve.
pub fn open_files_needed(max_connections: usize) -> u64 {
    let waiting = 2 * crate::ops_http::MAX_WAITING_FOR_SLOT as u64;
    max_connections as u64
        + crate::ops_http::MAX_OPS_CONNECTIONS as u64
        + waiting
        + OPEN_FILES_RESERVE
}

/// Why `limit` open files are too few for `max_connections`, if they are: connections
/// anyone can open (no certificate needed before the handshake) would then use up the
/// descriptors, failing accepts, token reconnects and audit rotations alike.
pub fn open_files_shortfall(limit: u64, max_connections: usize) -> Option<String> {
    let needed = open_files_needed(max_connections);
    (limit < needed).then(|| {
        format!(
            "the limit on open files ({limit}) is below what limits.max_connections ({max_connections}) needs ({needed}, with the ops port's {}, {} for new connections waiting for a closed one's slot and {OPEN_FILES_RESERVE} for the token, the audit log and Vault): unauthenticated connections could use up the signer's file descriptors; raise it (systemd LimitNOFILE, ulimit -n, the container runtime's nofile) or lower limits.max_connections",
            crate::ops_http::MAX_OPS_CONNECTIONS,
            2 * crate::ops_http::MAX_WAITING_FOR_SLOT
        )
    })
}

/// Raises the soft limit on open files towards the hard one, as far as the signer can
/// use (a shell's or a container runtime's default is often 1024, under what the default
/// `max_connections` needs), and warns if it stays too low.
fn raise_open_files_limit(max_connections: usize) {
    let wanted = OPEN_FILES_WANTED.max(open_files_needed(max_connections));
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) => {
            if let Some(shortfall) = open_files_shortfall(limit, max_connections) {
                tracing::warn!("{shortfall}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the limit on open files"),
    }
}

/// Starts everything and returns once the listeners are bound.
pub async fn start(
    config: SignerConfig,
    listen_override: Option<SocketAddr>,
) -> Result<RunningSigner, StartError> {
    match start_unless_stopped(config, listen_override, &mut NeverStopped).await? {
        Started::Running(running) => Ok(*running),
        Started::Stopped | Started::StoppedBackendAbandoned => {
            unreachable!("a start that is never stopped ends running or failed")
        }
    }
}

/// How [`start_unless_stopped`] ended, when it did not fail.
enum Started {
    Running(Box<RunningSigner>),
    /// Stopped, the backend's start ended: the backend is closed if it started (the Vault
    /// token revoked, the token's sessions ended).
    Stopped,
    /// Stopped while the backend's start did not end: its thread is left behind, inside
    /// the PKCS#11 module or the Vault client.
    StoppedBackendAbandoned,
}

/// Where the requests to stop come from while the signer starts.
trait StopRequests {
    /// Resolves at the next request to stop.
    async fn next(&mut self);
}

impl StopRequests for crate::signals::StopSignals {
    async fn next(&mut self) {
        crate::signals::StopSignals::next(self).await
    }
}

/// No request to stop ever comes: [`start`]'s caller stops the signer once it runs.
struct NeverStopped;

impl StopRequests for NeverStopped {
    async fn next(&mut self) {
        std::future::pending().await
    }
}

/// A stop request this long after the first, while a stop at start waits for the
/// backend's start, stops at once; one sooner is taken for the first sent twice.
const SECOND_STOP_AFTER: Duration = Duration::from_secs(1);

/// A stop came while the backend was starting: its start is given `wait` to end (a token
/// that answers takes milliseconds) and then closed. Ended mid-way, SoftHSM could be
/// writing the token's files (the process ended that way left `token.object` empty: the
/// token gone), or run its exit handlers under the start's thread (a segfault). A start
/// that has not ended by then waits on a token that does not answer, and is left behind;
/// so is one a second request to stop comes for, as an operator's "stop now".
async fn stopped_while_backend_starts(
    mut starting: BackendStart,
    wait: Duration,
    stops: &mut impl StopRequests,
) -> Started {
    tracing::info!(
        waiting_seconds = wait.as_secs(),
        "stop requested while starting; letting the root key backend's start end first (a second SIGTERM or SIGINT stops without waiting)"
    );
    let first = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let ended = loop {
        tokio::select! {
            // A start that ended is closed, even if a second request came meanwhile.
            biased;
            ended = tokio::time::timeout_at(deadline, &mut starting) => break ended,
            () = stops.next() => {
                if first.elapsed() >= SECOND_STOP_AFTER {
                    tracing::warn!(
                        "a second stop request: stopping without waiting for the root key backend's start"
                    );
                    return Started::StoppedBackendAbandoned;
                }
                // Within a moment of the first: the same request sent twice (a service
                // manager and a wrapper both passing it on), not an operator's second.
            }
        }
    };
    match ended {
        Ok(Ok(Ok(backend))) => {
            backend.close().await;
            Started::Stopped
        }
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "the root key backend's start, ended after the stop, failed");
            Started::Stopped
        }
        // The thread ended without an answer (it logged why).
        Ok(Err(_)) => Started::Stopped,
        Err(_) => Started::StoppedBackendAbandoned,
    }
}

/// [`start`], unless a request to stop comes from `stops` first. A stop that comes after the backend started
/// (the Vault login done, the token logged in) closes it before returning: a Vault token
/// would otherwise stay live until its TTL. One that comes while the backend is still
/// starting lets it end first, for a bounded time ([`stopped_while_backend_starts`]): a
/// backend that does not answer must not keep the signer from stopping.
async fn start_unless_stopped(
    config: SignerConfig,
    listen_override: Option<SocketAddr>,
    stops: &mut impl StopRequests,
) -> Result<Started, StartError> {
    let started = Instant::now();
    config.check_listeners(listen_override)?;
    raise_open_files_limit(config.limits.max_connections);
    let root = load_root(&config)?;
    check_root_key_type(&config, &root)?;
    config.check_apart_from_root(&root.subject)?;
    for shared in config.policies.trust_domain_warnings() {
        tracing::warn!("{shared}");
    }
    let roots = mesh_roots(&root, &config.root.certificate, config.root.announced())
        .map_err(TlsError::from)?;
    let files = TlsFiles::of(&config);
    let tls = serving_tls(&files, &roots, tls_source_digest(&files, &roots))?;
    crate::tlsutil::check_issuer_pins(
        &config.client_ca,
        config.authorization.issuers(),
        &tls.client_cas,
    )
    .map_err(TlsError::from)?;
    clock_reaches_certificates(&root, &tls.certificate, &config, SystemTime::now())?;
    let mut metrics = Metrics::new(root.not_after, tls.certificate);
    error_if_server_certificate_expired(tls.certificate.not_after, &config.tls_cert);
    error_if_root_expired(&root);
    warn_of_open_key(&tls);
    client_trust_in_force(&metrics, &tls, config.client_crl_overdue);
    metrics.announced_roots(config.root.announced());
    warn_of_ended_announced_roots(&config.root);
    // Before the root key signs anything (the token's proof of the key, cross
    // certificates): a second signer on this log stops here, and whatever the key signs
    // from now on has a place to be recorded.
    let (audit, report) = AuditLog::open(&config.audit_log)?;
    metrics.watch_audit(&audit);
    if let Some(side) = &report.torn_tail_saved_to {
        tracing::warn!(saved_to = %side.display(), "audit log ended in an incomplete line (a crash mid-write); moved it aside and recorded the recovery");
    }
    // Runs beside the token login (another core), so neither waits for the other.
    let seeding = tokio::task::spawn_blocking(crate::tlsutil::seed_random_generator);
    let wait = backend_start_wait(&config);
    let mut starting = spawn_backend_start(&config, root)?;
    let backend = tokio::select! {
        backend = backend_started(&mut starting, wait, started) => backend?,
        () = stops.next() => {
            return Ok(stopped_while_backend_starts(starting, wait, stops).await);
        }
    };
    // The agents take an announced root only with the root key's word for it. A stop may
    // cut the asking short (a Vault or token that does not answer), but whatever the key
    // was asked to sign is recorded first. What follows is short and not cut: a stop
    // then comes after the `start` record, as a stop of the running signer.
    let mut rules = Rules::of(&config, &backend.root().fingerprint_sha256);
    let vouched = tokio::select! {
        biased;
        vouched = vouch_for_announced(backend.as_ref(), &mut rules, None) => Some(vouched),
        () = stops.next() => None,
    };
    let serving = match vouched {
        None => {
            record_stopped_start(&audit, &rules).await;
            tracing::info!("stop requested while starting; closing the root key backend");
            backend.close().await;
            return Ok(Started::Stopped);
        }
        Some(Err(e)) => {
            record_failed_start(&audit, &rules, &e).await;
            Err(StartError::CrossCert(e))
        }
        Some(Ok(())) => {
            warn_if_constrained_unsignable(backend.as_ref(), &config.policies, "").await;
            serve_with(
                config,
                listen_override,
                started,
                (tls, metrics, audit),
                seeding,
                (backend.clone(), rules),
            )
            .await
        }
    };
    // Whatever fails after the login gives it back (a Vault token revoked): a signer
    // restarted after each failed start would otherwise leave one live token per try.
    if serving.is_err() {
        backend.close().await;
    }
    serving.map(|running| Started::Running(Box::new(running)))
}

/// The rest of [`start`], once the backend is up and has vouched for the announced roots
/// (`rules`): on an error the caller closes it.
async fn serve_with(
    config: SignerConfig,
    listen_override: Option<SocketAddr>,
    started: Instant,
    (tls, metrics, audit): (ServingTls, Metrics, AuditLog),
    seeding: tokio::task::JoinHandle<()>,
    (backend, rules): (Arc<dyn RootSigner>, Rules),
) -> Result<RunningSigner, StartError> {
    let backend_ready_ms = started.elapsed().as_millis();
    // Nothing to report if it did not run: the generator then seeds at first use instead.
    let _ = seeding.await;

    let api_addr = listen_override.unwrap_or(config.listen);
    let listeners = async {
        let api = bind(api_addr).await?;
        let ops = match config.ops_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok::<_, StartError>((api, ops))
    };
    let (api_listener, ops_listener) = match listeners.await {
        Ok(listeners) => listeners,
        Err(e) => {
            record_failed_start(&audit, &rules, &e.to_string()).await;
            return Err(e);
        }
    };
    let addresses = BoundAddresses {
        api: local(&api_listener, api_addr),
        ops: ops_listener.as_ref().map(|l| local(l, api_addr)),
    };

    // Before any decision: the log says which rules the decisions after this line are made
    // under (a restart may have changed them with no reload on record).
    let rules_sha256 = rules.digest().to_string();
    metrics.rules_in_force(&rules);
    if let Err(e) = audit
        .record_start(start_record(&rules, &rules_sha256, &config, &tls.trust))
        .await
    {
        tracing::error!(
            error = %e,
            "the audit log cannot record the start: nothing is issued until it can (the start record goes first into the next write)"
        );
    }

    let (tls_tx, tls_rx) = watch::channel(tls);
    let state = Arc::new(SignerState {
        rules: std::sync::RwLock::new(Arc::new(rules)),
        tls: tls_rx.clone(),
        backend: backend.clone(),
        audit,
        metrics,
        rate_limiter: RateLimiter::default(),
        refusal_tally: RefusalTally::default(),
        handshake_log: ClientLogThrottle::new(
            HANDSHAKE_LOG_LIMIT,
            HANDSHAKE_LOG_CLIENT_WINDOW,
            HANDSHAKE_LOG_CLIENTS,
        ),
        server_certificate_log: LogThrottle::new(SERVER_CERTIFICATE_LOG_LIMIT),
        capped_by_root_noted: AtomicBool::new(false),
        decisions: TaskTracker::new(),
        stop_deciding: CancellationToken::new(),
        connections: TaskTracker::new(),
        cut_connections: CancellationToken::new(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = vec![
        Background::spawn(
            "the API port's connections still open are closed (a client that stopped mid-request)",
            serve_tls(
                api_listener,
                tls_rx,
                state.clone(),
                config.limits.max_connections,
                shutdown_rx.clone(),
            ),
        ),
        Background::spawn(
            "the periodic count of rate-limit refusals is stopped (its audit line was waiting for the disk)",
            count_refusals_periodically(state.clone(), shutdown_rx.clone()),
        ),
        Background::spawn(
            "the audit log's periodic probe is stopped (it was waiting for the disk)",
            probe_audit_log_periodically(state.clone(), shutdown_rx.clone()),
        ),
        Background::spawn(
            "the root key backend's periodic check is stopped (it was waiting for the backend)",
            check_backend_periodically(state.clone(), shutdown_rx.clone()),
        ),
    ];
    if let Some(listener) = ops_listener {
        let router = api::ops_router(state.clone());
        let mut rx = shutdown_rx.clone();
        let metrics = state.metrics.ops_connections.clone();
        tasks.push(Background::spawn(
            "the ops port's connections still open are closed (a scraper that stopped mid-request)",
            async move {
                let stop = async move { stopped(&mut rx).await };
                crate::ops_http::serve(listener, router, metrics, stop).await;
            },
        ));
    }
    tracing::info!(
        api = %addresses.api,
        ops = addresses.ops.map(tracing::field::display),
        backend = %backend.describe(),
        root_fingerprint_sha256 = %backend.root().fingerprint_sha256,
        next_root_fingerprint_sha256 = config.root.next.as_ref().map(|n| n.fingerprint_sha256.as_str()),
        previous_root_fingerprint_sha256 = config.root.previous.as_ref().map(|p| p.fingerprint_sha256.as_str()),
        virtual_meshes = config.policies.iter().count(),
        audit_log = %config.audit_log.display(),
        rules_sha256 = %rules_sha256,
        backend_ready_ms = backend_ready_ms as u64,
        ready_ms = started.elapsed().as_millis() as u64,
        "signer listening on https://{}",
        addresses.api
    );
    Ok(RunningSigner {
        addresses,
        shutdown: shutdown_tx,
        tasks,
        tls: tls_tx,
        state,
        tls_files: std::sync::Mutex::new(TlsFiles::of(&config)),
        config,
        listen_overridden: listen_override.is_some(),
    })
}

/// The audit log's `start` record: the rules every decision after it is made under, until
/// the next `reload` or `start`. It states them as a reload states its changes, and in
/// full with their digest.
/// It names the host and the root too: two replicas' logs, or the logs before and after a
/// root change, tell apart by their content, not only by where the file came from.
/// And the transport trust it starts with (`tls`): which client CAs and CRLs the
/// handshakes of the decisions after it are checked against.
fn start_record(
    rules: &Rules,
    rules_sha256: &str,
    config: &SignerConfig,
    trust: &TransportTrust,
) -> AuditRecord {
    AuditRecord {
        time: rfc3339(SystemTime::now()),
        event: "start".into(),
        rule: Some("rules_in_force".into()),
        message: Some(format!(
            "meshca {} started on host {}, issuing under root sha256 {}; rules in force: {}",
            crate::VERSION,
            host_name(),
            rules.root_sha256,
            rules.summary()
        )),
        rules_sha256: Some(rules_sha256.to_string()),
        rules: Some(rules.text().to_string()),
        root_key_proof: root_key_proof(config),
        tls: Some(trust.clone()),
        ..Default::default()
    }
}

/// Records a start that fails after the root key made cross certificates (a later
/// announced root it could not vouch for, a port taken): no `start` record will name
/// them, and the key's every certificate must be on record. Nothing when it made none.
async fn record_failed_start(audit: &AuditLog, rules: &Rules, error: &str) {
    let made: Vec<String> = rules
        .announced_roots()
        .filter(|root| root.cross_cert.is_some())
        .map(|root| root.described())
        .collect();
    if made.is_empty() {
        return;
    }
    record_start_failed(
        audit,
        format!(
            "meshca {} on host {} did not start ({error}); the root key made cross certificates for the announced roots: {}, and no other certificate",
            crate::VERSION,
            host_name(),
            made.join("; ")
        ),
    )
    .await;
}

/// Appends a `start_failed` record saying `message`.
async fn record_start_failed(audit: &AuditLog, message: String) {
    let record = AuditRecord {
        time: rfc3339(SystemTime::now()),
        event: "start_failed".into(),
        message: Some(message),
        ..Default::default()
    };
    if let Err(e) = audit.append(record, audit.expect_line()).await {
        tracing::error!(
            error = %e,
            "the audit log cannot record the cross certificates this start made or asked for"
        );
    }
}

/// Records a start stopped while the root key was asked for cross certificates: those it
/// made, and the one it was asked for whose answer was not awaited (it may have made it,
/// as Vault or the token may have signed before the stop). Nothing when it was asked for
/// none.
async fn record_stopped_start(audit: &AuditLog, rules: &Rules) {
    let made: Vec<String> = rules
        .announced_roots()
        .filter(|root| root.cross_cert.is_some())
        .map(|root| root.described())
        .collect();
    let unanswered = rules
        .announced_roots()
        .find(|root| root.cross_cert.is_none());
    let Some(unanswered) = unanswered else {
        return record_failed_start(audit, rules, "stop requested while starting").await;
    };
    let made = if made.is_empty() {
        String::new()
    } else {
        format!(
            "the root key made cross certificates for {}; ",
            made.join("; ")
        )
    };
    record_start_failed(
        audit,
        format!(
            "meshca {} on host {} did not start (stop requested while starting); {made}the root key was asked for the cross certificate that vouches for the {} sha256 {} and its answer was not awaited: it may have made it; no other certificate",
            crate::VERSION,
            host_name(),
            unanswered.announcement.name(),
            unanswered.fingerprint_sha256
        ),
    )
    .await;
}

/// How the backend that just started showed it holds the root's key, for the `start`
/// record. The token's proof is a signature by the root key that no decision line covers:
/// an HSM's own log shows it, and this says what it was.
fn root_key_proof(config: &SignerConfig) -> Option<String> {
    match config.backend().ok()? {
        BackendSettings::Pkcs11(settings) => Some(format!(
            "the token's key {} signed a challenge of 32 random bytes (no certificate), which verified under the root certificate",
            settings.key
        )),
        BackendSettings::Vault(settings) => Some(format!(
            "Vault issuer {} in mount {} holds the root certificate and a key, and may issue (nothing was signed)",
            settings.issuer_ref, settings.mount
        )),
    }
}

/// Writes the audit log's `stop` record, after every decision's line: the log then shows
/// a clean stop (a `start` with no `stop` before it follows a crash or a kill), and a log
/// moved away (rotated) since the last line is continued into a new file at its path now,
/// so the next start continues the chain. One that cannot be written is logged; the exit
/// goes on.
async fn record_stop(state: &SignerState) {
    let record = stop_record(&state.rules());
    if let Err(e) = state.audit.append(record, state.audit.expect_line()).await {
        tracing::error!(
            error = %e,
            "the audit log cannot record the stop: it will read as if the signer had crashed (every decision before it is on record)"
        );
    }
}

/// The audit log's `stop` record: the signer stops cleanly, every decision it made is on
/// record before this line.
fn stop_record(rules: &Rules) -> AuditRecord {
    AuditRecord {
        time: rfc3339(SystemTime::now()),
        event: "stop".into(),
        message: Some(format!(
            "meshca {} on host {} stopped: every decision it made is recorded before this line; nothing is signed until its next start",
            crate::VERSION,
            host_name(),
        )),
        rules_sha256: Some(rules.digest().to_string()),
        ..Default::default()
    }
}

/// The kernel's host name (a pod's name in Kubernetes), or `unknown`.
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Listen {
            addr,
            message: e.to_string(),
        })
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

/// Accepts connections until shutdown, each with the acceptor and the limits current at
/// its accept, then waits (bounded by the drain time then in force) for the open ones to
/// finish. `max_connections` is fixed for the process.
async fn serve_tls(
    listener: TcpListener,
    acceptors: watch::Receiver<ServingTls>,
    state: Arc<SignerState>,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
) {
    let app = api::router(state.clone());
    let bound = crate::ops_http::ConnectionBound::new(
        "api",
        max_connections,
        state.metrics.api_connections.clone(),
    );
    let mut watching = shutdown.clone();
    let stop = stopped(&mut watching);
    tokio::pin!(stop);
    let accept_errors = crate::ops_http::accept_error_log();
    while let Some((pending, tcp, peer)) =
        crate::ops_http::accept_admitted(&listener, &bound, true, &accept_errors, &mut stop).await
    {
        let _ = tcp.set_nodelay(true);
        // Marks this acceptor's version seen, so a reload after it is noticed below.
        let mut reloads = acceptors.clone();
        let (acceptor, settings) = {
            let in_force = reloads.borrow_and_update();
            (in_force.acceptor.clone(), in_force.fingerprint)
        };
        let limits = state.rules().limits;
        let app = app.clone();
        let cut = state.cut_connections.clone();
        let tracked = state.connections.token();
        let state = state.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            // The slot of a connection closed for this one is free once that one ends:
            // waited for here, so the accept loop goes on meanwhile.
            let slot = tokio::select! {
                slot = pending.taken() => slot,
                _ = stopped(&mut stop) => None,
            };
            let Some(slot) = slot else {
                return;
            };
            let requests_here = slot.handle();
            let served = async move {
                let handshaking = crate::tlsutil::accept_noting_refused_client(
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)),
                );
                let (handshake, refused_client) = tokio::select! {
                    handshake = handshaking => handshake,
                    // In its handshake longest, its slot given to a new connection:
                    // dropped.
                    _ = slot.closed_for_new() => {
                        tracing::debug!(%peer, "connection in its TLS handshake closed for a new one");
                        return;
                    }
                };
                let tls = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        let reason = crate::tlsutil::handshake_refusal_reason(&e);
                        let client = refused_client.as_ref();
                        let error = crate::tlsutil::handshake_error_text(&e);
                        return handshake_refused(&state, peer, reason, &error, client);
                    }
                    Err(_) => {
                        let error = "no handshake within the handshake timeout";
                        return handshake_refused(&state, peer, "timeout", error, None);
                    }
                };
                // The identity, which certificate it came with, and from where: the
                // audit log names all three.
                let mut client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|chain| ClientIdentity {
                        verified_under: Some(settings),
                        ..ClientIdentity::of_chain(chain)
                    })
                    .unwrap_or_default();
                client.peer = Some(peer);
                slot.established();
                let requests = slot.handle();
                let service =
                    hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                        request.extensions_mut().insert(client.clone());
                        let under_way = requests.request();
                        let answer = app.clone().oneshot(request);
                        async move {
                            let answer = answer.await;
                            drop(under_way);
                            answer
                        }
                    });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => Some(ended),
                    _ = stopped(&mut stop) => None,
                    _ = reloads.changed() => {
                        tracing::debug!(%peer, "TLS settings reloaded: closing this connection after its current request");
                        None
                    }
                    _ = slot.closed_for_new() => {
                        tracing::debug!(%peer, "idle connection closed for a new one");
                        connection.as_mut().graceful_shutdown();
                        // Closes at once when idle (close_notify); half a request's headers
                        // in are dropped after a moment, and a request that came in just as
                        // it was chosen is answered first.
                        match tokio::time::timeout(EVICTED_GRACE, connection.as_mut()).await {
                            Ok(ended) => Some(ended),
                            Err(_) if slot.serving() => Some(connection.as_mut().await),
                            Err(_) => Some(Ok(())),
                        }
                    }
                };
                let ended = match ended {
                    Some(ended) => ended,
                    None => {
                        // Finishes the request in flight, if any, then closes.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            };
            tokio::pin!(served);
            tokio::select! {
                () = &mut served => return,
                () = cut.cancelled() => {}
            }
            // Cut between requests (in its handshake, idle, half a head in): closed, so it
            // sends no request once the decisions are waited for.
            if !requests_here.serving() {
                tracing::debug!(%peer, "connection closed: the drain time is over");
                return;
            }
            // Serving a request: it starts no other (the stop turned keep-alive off), and
            // its request's decision is waited for, or stopped, with the others; its answer
            // is not waited for.
            drop(tracked);
            served.await;
        });
    }
    drop(listener);
    // Every connection holds a slot until it ends: all slots free means all drained.
    tokio::select! {
        _ = bound.drained() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(state.rules().limits.drain_timeout) => {
            tracing::warn!("drain timed out; closing remaining connections");
            state.cut_connections.cancel();
        }
    }
}

/// How long an idle API connection closed for a new one may take to close after its
/// graceful shutdown (one with half a request's headers in would otherwise hold its slot
/// until the header timeout).
const EVICTED_GRACE: Duration = Duration::from_secs(1);

/// Counts a refused handshake, and logs it unless the log throttle holds back its reason;
/// `client` is the refused certificate, when it was one.
fn handshake_refused(
    state: &SignerState,
    peer: SocketAddr,
    reason: &'static str,
    error: &str,
    client: Option<&crate::tlsutil::RefusedClient>,
) {
    state.metrics.handshake_refused(reason);
    // A client that refuses the signer's own certificate shows only as `protocol` (its
    // alert) or `connection` (it hung up): once that certificate has ended, say so.
    if matches!(reason, "protocol" | "connection") {
        let not_after = state.metrics.tls_certificate_not_after();
        if not_after <= SystemTime::now()
            && let Some(not_logged) = state
                .server_certificate_log
                .admit("server_certificate_expired", Instant::now())
        {
            tracing::error!(
                %peer,
                error,
                expired_at = %rfc3339(not_after),
                not_logged_since_last = not_logged,
                "TLS handshake refused while the signer's TLS server certificate ([tls] cert) has expired: clients refuse it; renew it and reload (SIGHUP)"
            );
        }
    }
    // By the client only when its chain leads to a client CA: anyone can claim an identity,
    // and a flood of made-up ones would fill the clients remembered.
    let verified = client.and_then(|client| client.client());
    if let Some(not_logged) = state.handshake_log.admit(reason, verified, Instant::now()) {
        let unparsed = matches!(client, Some(crate::tlsutil::RefusedClient::Unparsed));
        tracing::info!(
            %peer,
            reason,
            error,
            client = verified,
            claimed_client = client.and_then(|client| client.claimed_client()),
            client_serial = client.and_then(|client| client.serial()),
            client_not_after = client.and_then(|client| client.not_after()),
            client_certificate = unparsed.then_some("a certificate that does not parse"),
            advice = crate::tlsutil::handshake_refusal_advice(reason),
            not_logged_since_last = not_logged,
            "TLS handshake refused"
        );
    }
}

/// Refused handshakes logged one by one, per reason: a burst of 20, then one a second (a
/// scanner's flood of `protocol` does not hide an agent's `client_certificate_expired`);
/// the metric `meshca_tls_handshakes_refused_total` counts every one.
const HANDSHAKE_LOG_LIMIT: RateLimit = RateLimit {
    per_minute: 60,
    burst: 20,
};

/// Beyond [`HANDSHAKE_LOG_LIMIT`], each refused client (its chain leading to a client CA)
/// gets its first line of a reason in this window: one tenant's agent retrying with a
/// revoked certificate does not hide another's.
const HANDSHAKE_LOG_CLIENT_WINDOW: Duration = Duration::from_secs(60);

/// Refused clients remembered for [`HANDSHAKE_LOG_CLIENT_WINDOW`]; beyond them the
/// reason's bucket alone decides (bounded memory, and lines).
const HANDSHAKE_LOG_CLIENTS: usize = 1024;

/// Refused handshakes while the serving certificate has expired: every client's is, so
/// one line a minute says it (counting the others) without a line per handshake.
const SERVER_CERTIFICATE_LOG_LIMIT: RateLimit = RateLimit {
    per_minute: 1,
    burst: 1,
};

/// The ticks of a periodic job of the signer: every `period`, the first `first` from now,
/// until shutdown. Each such job is a task of its own: one held up (a count line queued
/// behind an audit write that hangs, the free space of a disk that does not answer, a
/// backend check) does not hold up the others, so the probe still reports a hung audit
/// write while a count line waits on it.
struct Every {
    ticks: tokio::time::Interval,
    shutdown: watch::Receiver<bool>,
}

impl Every {
    fn new(first: Duration, period: Duration, shutdown: watch::Receiver<bool>) -> Every {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Every { ticks, shutdown }
    }

    /// Waits for the next tick: true, or false once shutdown begins.
    async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.ticks.tick() => true,
            _ = stopped(&mut self.shutdown) => false,
        }
    }
}

/// Every period until shutdown: writes the counted rate-limit refusals (once more at
/// shutdown, after the last decision; the first counts are a period away), then logs the
/// audit log's head if it moved (at once too, for a log that already has lines).
async fn count_refusals_periodically(state: Arc<SignerState>, shutdown: watch::Receiver<bool>) {
    let mut head = HeadAnchor::default();
    head.log_if_moved(&state.audit);
    let mut every = Every::new(REFUSAL_TALLY_PERIOD, REFUSAL_TALLY_PERIOD, shutdown);
    while every.tick().await {
        api::audit_counted_refusals(&state).await;
        head.log_if_moved(&state.audit);
    }
}

/// Probes the audit log every period until shutdown ([`api::probe_audit_log`]), looking
/// at the log's free space too: a full disk shows while no request comes. And at the
/// client CRLs: one that passes its nextUpdate shows in the log, not in the metric
/// alone.
async fn probe_audit_log_periodically(state: Arc<SignerState>, shutdown: watch::Receiver<bool>) {
    let mut tls = state.tls.clone();
    let mut overdue_crls = OverdueCrls::default();
    overdue_crls.look(&tls.borrow_and_update(), SystemTime::now(), false);
    let mut every = Every::new(Duration::ZERO, AUDIT_PROBE_PERIOD, shutdown);
    while every.tick().await {
        api::probe_audit_log(&state).await;
        let reloaded = tls.has_changed().unwrap_or(false);
        overdue_crls.look(&tls.borrow_and_update(), SystemTime::now(), !reloaded);
    }
}

/// Checks the root key backend every period until shutdown. Without it, a token pulled
/// or a Vault sealed while no cluster is due shows nowhere until a renewal fails, which
/// may be months later.
async fn check_backend_periodically(state: Arc<SignerState>, shutdown: watch::Receiver<bool>) {
    let mut every = Every::new(Duration::ZERO, BACKEND_CHECK_PERIOD, shutdown);
    while every.tick().await {
        if let Err(problem) = api::backend_readiness(&state).await {
            tracing::warn!(%problem, "the root key backend cannot sign");
        }
    }
}

/// How often the root key backend's readiness is checked when nothing else asks.
const BACKEND_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// How often a log that failed its last write is tried again.
const AUDIT_PROBE_PERIOD: Duration = Duration::from_secs(5);

/// How often a start that waits for its backend says so, when the config sets no token
/// timeout to go by (Vault).
const BACKEND_START_REPORT: Duration = Duration::from_secs(10);

/// The answer of a backend start running on its own thread ([`spawn_backend_start`]).
type BackendStart = tokio::sync::oneshot::Receiver<Result<Arc<dyn RootSigner>, StartError>>;

/// How long a start waits for its backend before saying it still waits, and how long a
/// stop during the start waits for the backend's start to end: `pkcs11.timeout_seconds`,
/// or [`BACKEND_START_REPORT`] for Vault.
fn backend_start_wait(config: &SignerConfig) -> Duration {
    match config.backend() {
        Ok(BackendSettings::Pkcs11(settings)) => settings.timeout,
        _ => BACKEND_START_REPORT,
    }
}

/// Starts the backend (module, token, login, proof of the key; or Vault's login) on a
/// thread of its own. Not a runtime blocking thread: a token that never answers (a network
/// HSM cut off, token files locked) must not hold up the exit that a stop signal asks for
/// meanwhile; such a thread is left to the process exit.
fn spawn_backend_start(config: &SignerConfig, root: RootCa) -> Result<BackendStart, StartError> {
    let (answer, started) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let thread_config = config.clone();
    std::thread::Builder::new()
        .name("meshca-backend-start".into())
        .spawn(move || {
            let _entered = runtime.enter();
            // Its receiver is gone if a stop signal ended the start: nobody to tell.
            let _ = answer.send(start_backend(&thread_config, root));
        })
        .map_err(|e| StartError::Backend(format!("cannot start a thread: {e}")))?;
    tracing::info!("connecting to the root key backend");
    Ok(started)
}

/// Waits for the backend's start, saying every `pkcs11.timeout_seconds` that it still
/// waits.
async fn backend_started(
    started: &mut BackendStart,
    report_every: Duration,
    since: Instant,
) -> Result<Arc<dyn RootSigner>, StartError> {
    loop {
        match tokio::time::timeout(report_every, &mut *started).await {
            Ok(Ok(backend)) => return backend,
            Ok(Err(_)) => {
                return Err(StartError::Backend(
                    "the backend's start ended without an answer (see the log)".into(),
                ));
            }
            Err(_) => tracing::warn!(
                waiting_seconds = since.elapsed().as_secs(),
                "the root key backend has not answered yet (loading the module, finding the token, logging in, or Vault's login); still waiting (SIGTERM stops the signer)"
            ),
        }
    }
}

/// Ends the process, exit 0, without running exit handlers: the thread of a backend start
/// that a stop abandoned is still inside the PKCS#11 module (waiting on a token that does
/// not answer), and a normal exit runs the module's C++ static destructors (SoftHSM's)
/// under it, a segfault (exit 139) now and then. Nothing else is pending: nothing was
/// served, the audit log is closed, and the log lines are written once flushed.
fn exit_leaving_backend_start() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; it touches no memory of this one.
    unsafe { libc::_exit(0) }
}

/// Resolves once shutdown is requested (without holding the watch lock across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs the signer until SIGTERM or SIGINT, then drains and returns. SIGHUP reads the
/// config again and reloads the TLS files ([`RunningSigner::reload_tls`]) and the rules
/// ([`RunningSigner::reload_rules`]), each on its own: a mistake in one leaves the other's
/// reload standing.
pub async fn run(
    config: SignerConfig,
    listen_override: Option<SocketAddr>,
) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups =
        signal(SignalKind::hangup()).map_err(|e| StartError::Signals(format!("SIGHUP: {e}")))?;
    // One noted before this handler (see `signals::hold_hangups`) came after the config
    // was read, perhaps for a change made since: it is a reload too, once started.
    let early_hangup = crate::signals::hangup_noted();
    let mut stops = crate::signals::StopSignals::take_over()
        .map_err(|e| StartError::Signals(format!("SIGTERM/SIGINT: {e}")))?;
    // Nothing is served yet, so nothing to drain: a backend that does not answer at start
    // does not keep the signer from stopping, and one that did is closed.
    let started = start_unless_stopped(config, listen_override, &mut stops).await?;
    let running = match started {
        Started::Running(running) => *running,
        Started::Stopped => {
            tracing::info!("stop requested while starting; nothing was served, signer stopped");
            return Ok(());
        }
        Started::StoppedBackendAbandoned => {
            tracing::info!(
                "stop requested while starting; nothing was served, signer stopped (the root key backend's start, which did not end, is left to the process exit)"
            );
            exit_leaving_backend_start();
        }
    };
    crate::service_manager::ready(&serving_status(&running));
    if early_hangup {
        tracing::info!("a SIGHUP came while the signer was starting: reloading now");
        reload(&running).await;
    }
    loop {
        tokio::select! {
            _ = stops.next() => break,
            Some(()) = hangups.recv() => reload(&running).await,
        }
    }
    crate::service_manager::stopping();
    tracing::info!(
        "shutting down: no new connections, draining in-flight requests (a second SIGTERM or SIGINT cuts the drain short)"
    );
    running.shutdown(async move { stops.next().await }).await;
    tracing::info!("signer stopped");
    Ok(())
}

/// What a SIGHUP does: reads the config file, then reloads the TLS files (from where its
/// `[tls]` says, or, if it cannot be read, from where they were) and the rules, each on its
/// own.
async fn reload(running: &RunningSigner) {
    crate::service_manager::reloading();
    let read = running.read_config().await;
    let tls = running.reload_tls(read.as_ref().ok()).await;
    let tls_failed = tls.is_err() || read.is_err();
    if let Err(e) = &read {
        // Whatever in the file failed (a VirtualMesh file, a limit), its [tls] is not in
        // force either: a CRL added in the same edit must not look applied.
        tracing::error!(
            error = %e,
            "SIGHUP: the config file could not be read, so none of its [tls] settings (a file added to client_crls included) are in force; the TLS files were read again from their places in force"
        );
    }
    if let Ok(TlsReload {
        settings_changed, ..
    }) = &tls
        && !settings_changed.is_empty()
    {
        tracing::info!(
            settings = settings_changed.join(", "),
            "SIGHUP: [tls] settings changed in the config file are in force"
        );
    }
    match tls {
        Ok(TlsReload {
            certificate_not_after,
            changed: true,
            ..
        }) => tracing::info!(
            certificate_not_after = %rfc3339(certificate_not_after),
            "SIGHUP: TLS settings reloaded (server certificate and key, client CA, CRLs); connections made before close after their current request"
        ),
        Ok(TlsReload {
            certificate_not_after,
            changed: false,
            parsed,
            ..
        }) => tracing::info!(
            certificate_not_after = %rfc3339(certificate_not_after),
            parsed,
            "SIGHUP: TLS files read again, nothing in them changed; connections stay open"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: TLS settings not reloaded; the previous ones stay in force"
        ),
    }
    let rules = running.reload_rules(read).await;
    let rules_failed = rules.is_err();
    log_rules_reload(rules);
    let failed: Vec<&str> = [("tls", tls_failed), ("rules", rules_failed)]
        .into_iter()
        .filter_map(|(half, failed)| failed.then_some(half))
        .collect();
    let mut status = serving_status(running);
    if !failed.is_empty() {
        status.push_str(&format!(
            "; last reload failed ({}): see the log",
            failed.join(", ")
        ));
    }
    crate::service_manager::reloaded(&status);
}

/// What `systemctl status` shows while the signer serves.
fn serving_status(running: &RunningSigner) -> String {
    format!("serving https://{}", running.addresses.api)
}

fn log_rules_reload(outcome: Result<RulesReload, ReloadError>) {
    match outcome {
        Ok(reload) => {
            if reload.change.is_empty() {
                tracing::info!(
                    rules_sha256 = %reload.rules_sha256,
                    "SIGHUP: rules reloaded; nothing in them changed"
                );
            } else {
                tracing::info!(
                    rules_sha256 = %reload.rules_sha256,
                    changes = %reload.change.log_line(),
                    "SIGHUP: rules reloaded (recorded in the audit log)"
                );
            }
            if !reload.restart_only.is_empty() {
                // A restart with a broken start-only setting exits 1, and systemd loops.
                let blockers = &reload.restart_blockers;
                tracing::warn!(
                    settings = reload.restart_only.join(", "),
                    restart_would_fail = (!blockers.is_empty()).then(|| blockers.join("; ")),
                    "SIGHUP: settings read only at start differ in the config file; they take effect at the next restart (run `meshca serve --check --online` on the file first)"
                );
            }
        }
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: rules not reloaded; the ones in force stay"
        ),
    }
}
