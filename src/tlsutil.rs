//! rustls configurations for both ends of the signer's mTLS (aws-lc-rs provider, TLS 1.3
//! and TLS 1.2 with forward-secret AEAD suites only), the client identity a certificate
//! carries, and why a handshake was refused.

use std::path::Path;
use std::sync::Arc;

use der::Decode;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

mod client_ca_apart;
mod client_crls;
mod client_issuer;
mod refused_client;
mod trust;
pub use client_ca_apart::{ClientCaError, MeshRoot, check_client_ca_apart_from_mesh};
pub use client_crls::SupersededCrl;
pub(crate) use client_crls::read_with as read_crls_with;
pub use client_issuer::{
    ClientCa, ClientCaSet, IssuerPin, check_issuer_pins, unpinned_clients_warning,
};
pub use refused_client::{RefusedClient, accept_noting_refused_client};
pub use trust::{EnforcedCrl, ServerCertificate, Switched, TransportTrust, TrustChange, TrustedCa};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {message}")]
    Certificates { path: String, message: String },
    #[error("cannot read CRLs from {path}: {message}")]
    Crls { path: String, message: String },
    #[error("cannot read private key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error(transparent)]
    ClientCa(#[from] ClientCaError),
}

/// The crypto provider every meshca TLS endpoint uses: aws-lc-rs, the same library that
/// checks CSR and certificate signatures (`pki::sigalg`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(chosen_provider())
}

fn chosen_provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The wall clock rustls checks certificates against: rustls's own reads it with an
/// `unwrap`, so a clock set before 1970 would panic in every handshake. This one answers
/// "no time" then, and the handshake fails with rustls's `FailedToGetCurrentTime`.
#[derive(Debug)]
pub struct WallClock;

impl rustls::time_provider::TimeProvider for WallClock {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        unix_time(std::time::SystemTime::now())
    }
}

/// `at` as rustls counts time, or none if it is before 1970.
pub fn unix_time(at: std::time::SystemTime) -> Option<rustls_pki_types::UnixTime> {
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(rustls_pki_types::UnixTime::since_unix_epoch)
}

/// [`unix_time`] back: the moment `at` as a [`std::time::SystemTime`].
pub fn system_time(at: rustls_pki_types::UnixTime) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.as_secs())
}

/// [`WallClock`], for a rustls configuration builder.
pub fn wall_clock() -> Arc<dyn rustls::time_provider::TimeProvider> {
    Arc::new(WallClock)
}

/// Seeds aws-lc's random generator now. aws-lc seeds it on first use, from the OS and from
/// a CPU-jitter entropy source that takes tens of milliseconds; a server calls this while
/// starting so that cost is not added to its first client's handshake.
pub fn seed_random_generator() {
    let _ = aws_lc_rs::rand::fill(&mut [0u8; 1]);
}

/// Makes [`provider`] the process default too, for any client built without an explicit
/// configuration. Idempotent.
pub fn install_default_provider() {
    let _ = chosen_provider().install_default();
}

/// Reads every certificate of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_pem_blocks(path, "CERTIFICATE", |path, message| {
        TlsError::Certificates { path, message }
    })
}

/// Every PEM block of type `T` (`label`) in a file; a file without one is an error, made
/// by `error` from the path and the problem.
fn load_pem_blocks<T: PemObject>(
    path: &Path,
    label: &str,
    error: fn(String, String) -> TlsError,
) -> Result<Vec<T>, TlsError> {
    let err = |message: String| error(path.display().to_string(), message);
    let blocks = T::pem_file_iter(path)
        .map_err(|e| err(pem_error(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_error(&e)))?;
    if blocks.is_empty() {
        return Err(err(format!("no {label} blocks found")));
    }
    Ok(blocks)
}

/// A PEM error in words: rustls-pki-types prints the marker or line it names as a list of
/// byte values (`[45, 45, 45, ...]`), which says nothing to whoever reads the log.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim_end().to_string();
    match e {
        // The marker is the block's label (`CERTIFICATE`).
        Error::MissingSectionEnd { end_marker } => format!(
            "missing section end marker \"-----END {}-----\" (the file ends inside a PEM block: cut short?)",
            text(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("illegal section start: {:?}", text(line))
        }
        other => other.to_string(),
    }
}

/// Reads a private key PEM (PKCS#8, PKCS#1 or SEC1). The error never quotes the file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    read_private_key(path).map(|(key, _)| key)
}

/// [`load_private_key`], and whether other users can read the file read.
fn read_private_key(
    path: &Path,
) -> Result<(PrivateKeyDer<'static>, Option<KeyReadableByOthers>), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |message: String| TlsError::Key {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    // The mode of the file opened, not of whatever the path names a moment later.
    let mode = file
        .metadata()
        .map_err(|e| err(e.to_string()))?
        .permissions()
        .mode();
    let key = PrivateKeyDer::from_pem_reader(file).map_err(|e| {
        err(match e {
            rustls_pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "no usable PRIVATE KEY block".into(),
        })
    })?;
    let readable = (mode & 0o004 != 0).then(|| KeyReadableByOthers {
        path: path.to_path_buf(),
        mode: mode & 0o777,
    });
    Ok((key, readable))
}

/// A private key read from a file every user of the host can read (mode o+r; read by the
/// group is fine, as for PIN files). Warned of, not refused: a Kubernetes Secret volume
/// makes its files 0644 unless told otherwise, and there only the pod sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReadableByOthers {
    pub path: std::path::PathBuf,
    /// The file's permission bits.
    pub mode: u32,
}

impl std::fmt::Display for KeyReadableByOthers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        write!(
            f,
            "the private key {path} can be read by other users (mode {:o}): whoever reads it can pass for this side of the mTLS; run: chmod 600 {path}",
            self.mode
        )
    }
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    trust_store(path, load_certificates(path)?)
}

/// A store trusting `certs`, read from `path` (named in errors).
fn trust_store(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::Certificates {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// What a client handshake gets while the CRL that covers its certificate is past its
/// `nextUpdate` (`[tls] client_crl_overdue`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlOverdue {
    /// Served, the CRL still enforced as loaded (revocations published since are not
    /// known): an overdue CRL does not stop the clusters' renewals.
    #[default]
    Accept,
    /// Refused (fail closed): the signer serves no client whose revocation state it cannot
    /// vouch for, until a newer CRL is in place and reloaded.
    Refuse,
}

impl CrlOverdue {
    /// Its value in the config file.
    pub fn name(self) -> &'static str {
        match self {
            CrlOverdue::Accept => "accept",
            CrlOverdue::Refuse => "refuse",
        }
    }

    /// What an overdue CRL means for the clients it covers, for a warning.
    pub fn consequence(self) -> &'static str {
        match self {
            CrlOverdue::Accept => "it is still enforced, but not what was revoked since",
            CrlOverdue::Refuse => {
                "the clients it covers are refused (client_crl_overdue = \"refuse\") until a newer one is in place and the signer reloaded"
            }
        }
    }
}

/// Server side: a client certificate is required, must chain to `client_ca`, and must
/// not be revoked by the newest CRL of its issuer in `crls`; `overdue` says what a
/// certificate whose CRL is past its `nextUpdate` gets.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    crls: &[std::path::PathBuf],
    overdue: CrlOverdue,
) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let crls = client_crls::read(crls)?;
    let client_cas = load_certificates(client_ca)?;
    let client_ca_not_after = earliest_not_after(&client_cas, client_ca)?;
    let client_ca_crl_problems = if crls.in_force.is_empty() {
        Vec::new()
    } else {
        client_ca_crl_problems(&client_cas, &crls.issuers)
    };
    let chain = load_certificates(cert)?;
    let (private_key, key_readable_by_others) = read_private_key(key)?;
    let fingerprint = MaterialFingerprint::builder()
        .part("chain", &chain)
        .part("key", &[private_key.secret_der()])
        .part("client_ca", &client_cas)
        .part("crls", &crls.in_force)
        // Refusing or accepting the clients of an overdue CRL is a different verifier.
        .part("crl_overdue", &[format!("{overdue:?}")])
        .finish();
    let client_ca_set = Arc::new(ClientCaSet::of(&client_cas));
    let verifier = refused_client::NotingVerifier::new(
        Arc::new(trust_store(client_ca, client_cas.clone())?),
        crls.in_force,
        overdue == CrlOverdue::Refuse,
        provider.clone(),
        (client_ca_set.clone(), client_ca_not_after),
    )
    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", client_ca.display())))?;
    let verifier = Arc::new(verifier);
    let client_verifier: Arc<dyn ClientCertVerifier> = verifier.clone();
    let config = rustls::ServerConfig::builder_with_details(provider, wall_clock())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier);
    let certificate = leaf_validity(&chain, cert)?;
    let trust = TransportTrust {
        server_certificate: ServerCertificate {
            sha256: der_sha256(&chain[0]),
            not_after: crate::pki::datetime::rfc3339(certificate.not_after),
        },
        client_cas: trusted_cas(&client_cas, client_ca)?,
        client_crls: crls.enforced,
        client_crl_overdue: overdue,
    };
    let mut config = config
        .with_single_cert(chain, private_key)
        .map_err(|e| certificate_error("server", cert, key, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the client verifier, so a client
    // certificate expired since, or one an overdue CRL covers under "refuse", would be
    // taken unchecked. An agent makes one handshake per pass; a full one costs it little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(ServerTls {
        config,
        certificate,
        client_ca_not_after,
        client_cas,
        client_ca_set,
        crl_next_updates: crls.next_updates,
        superseded_crls: crls.superseded,
        client_ca_crl_problems,
        key_readable_by_others,
        fingerprint,
        client_verifier,
        trust,
    })
}

/// SHA-256 of a DER item, lowercase hex.
fn der_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    crate::pki::csr::hex(&sha2::Sha256::digest(der))
}

/// The client CA certificates by subject and SHA-256, as the audit log names them.
fn trusted_cas(cas: &[CertificateDer<'_>], path: &Path) -> Result<Vec<TrustedCa>, TlsError> {
    cas.iter()
        .map(|der| {
            Ok(TrustedCa {
                subject: parse_certificate(der, path)?
                    .tbs_certificate()
                    .subject()
                    .to_string(),
                sha256: der_sha256(der),
            })
        })
        .collect()
}

/// With client CRLs configured, what in the client CA bundle gets clients refused at the
/// handshake, each said in a sentence. webpki then refuses a certificate whose revocation
/// status is unknown, so a CA no CRL in force was issued by has every client refused; and
/// it consults one CRL per issuer name (the first it finds), checked against the issuer's
/// key, so of two CAs with the same subject (one renewed under its old name) only one can
/// have its clients served.
fn client_ca_crl_problems(cas: &[CertificateDer<'static>], crl_issuers: &[Vec<u8>]) -> Vec<String> {
    let subjects: Vec<(Vec<u8>, String)> = cas
        .iter()
        .filter_map(|der| Certificate::from_der(der).ok())
        .map(|ca| {
            let name = ca.tbs_certificate().subject();
            (
                der::Encode::to_der(name).unwrap_or_default(),
                name.to_string(),
            )
        })
        .collect();
    let mut problems = Vec::new();
    for (index, (der, name)) in subjects.iter().enumerate() {
        let same_name = subjects.iter().filter(|(other, _)| other == der).count();
        let first_of_its_name = subjects.iter().position(|(other, _)| other == der) == Some(index);
        if same_name > 1 && first_of_its_name {
            problems.push(format!(
                "{same_name} client CA certificates (tls.client_ca) have the subject {name}: with CRLs configured, the signer consults one CRL per issuer name, checked against one of their keys, so the clients of the others are refused at the handshake; give a renewed CA a subject of its own"
            ));
        }
        if !crl_issuers.contains(der) && first_of_its_name {
            problems.push(format!(
                "the client CA {name} (tls.client_ca) has no CRL in tls.client_crls: with CRLs configured, the revocation status of every client certificate it issued is unknown, and each is refused at the handshake (client_certificate_revocation_unknown); add its CRL, or remove the CA if no client uses it"
            ));
        }
    }
    problems
}

/// A server's rustls configuration, when its own certificate expires, when its client
/// CRLs are due to be replaced, and what it was built from.
pub struct ServerTls {
    pub config: rustls::ServerConfig,
    /// The validity of the certificate this side presents.
    pub certificate: Validity,
    /// When the first of the client CA certificates expires: from then on, no client whose
    /// certificate chains only to it gets through the handshake.
    pub client_ca_not_after: std::time::SystemTime,
    /// The client CA certificates, as read.
    pub client_cas: Vec<CertificateDer<'static>>,
    /// The same, described once for every connection accepted under these settings.
    pub client_ca_set: Arc<ClientCaSet>,
    pub crl_next_updates: Vec<CrlNextUpdate>,
    /// CRLs listed but not enforced: a newer one of their issuer was listed too.
    pub superseded_crls: Vec<SupersededCrl>,
    /// With CRLs configured: what in the client CA bundle gets clients refused (a CA no
    /// CRL covers, CAs sharing a subject), in sentences.
    pub client_ca_crl_problems: Vec<String>,
    /// Set if other users can read the key file.
    pub key_readable_by_others: Option<KeyReadableByOthers>,
    pub fingerprint: MaterialFingerprint,
    /// The verifier the handshakes use (client CAs and CRLs): a request under way when
    /// these settings replaced older ones is checked with it again before it is decided.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// What it trusts and presents, as the audit log records it.
    pub trust: TransportTrust,
}

/// When a client CRL file is due to be replaced: the earliest `nextUpdate` of the CRLs in
/// force in it (superseded ones left out), by which their issuer promised a newer list
/// (none if no CRL in force in it has one: the field is optional in X.509, required by
/// RFC 5280 of conforming issuers). The signer enforces the CRLs it loaded until a
/// reload, however old: past this time, revocations published since are not enforced (the
/// newer CRL was not published, or not put in place and reloaded).
#[derive(Debug, Clone, PartialEq)]
pub struct CrlNextUpdate {
    pub path: std::path::PathBuf,
    pub next_update: Option<std::time::SystemTime>,
}

impl CrlNextUpdate {
    /// The `nextUpdate` if it has passed at `now`.
    pub fn overdue_since(&self, now: std::time::SystemTime) -> Option<std::time::SystemTime> {
        self.next_update.filter(|next| *next <= now)
    }
}

/// A SHA-256 digest of the DER of everything a TLS configuration was built from, so a
/// reload can tell whether anything changed (PEM comments and line breaks do not count).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MaterialFingerprint([u8; 32]);

impl MaterialFingerprint {
    fn builder() -> FingerprintBuilder {
        FingerprintBuilder(sha2::Sha256::default())
    }
}

/// Feeds named parts of DER items to the digest. Each part is named and each item
/// length-prefixed, so moving bytes from one item or part to the next changes it.
struct FingerprintBuilder(sha2::Sha256);

impl FingerprintBuilder {
    fn part<T: AsRef<[u8]>>(mut self, name: &str, items: &[T]) -> Self {
        use sha2::Digest;
        self.0.update(name.as_bytes());
        self.0.update((items.len() as u64).to_be_bytes());
        for item in items {
            let item = item.as_ref();
            self.0.update((item.len() as u64).to_be_bytes());
            self.0.update(item);
        }
        self
    }

    fn finish(self) -> MaterialFingerprint {
        use sha2::Digest;
        MaterialFingerprint(self.0.finalize().into())
    }
}

impl std::fmt::Debug for MaterialFingerprint {
    // The digest covers the private key: nothing of it is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaterialFingerprint(..)")
    }
}

/// Client side: trust only `ca` for the server, present `client_cert`/`client_key`.
pub fn client_config(
    ca: &Path,
    client_cert: &Path,
    client_key: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(client_tls(ca, client_cert, client_key)?.config)
}

/// [`client_config`], and when the client certificate expires.
pub fn client_tls(ca: &Path, client_cert: &Path, client_key: &Path) -> Result<ClientTls, TlsError> {
    let chain = load_certificates(client_cert)?;
    let certificate = leaf_validity(&chain, client_cert)?;
    let (key, key_readable_by_others) = read_private_key(client_key)?;
    let mut config = rustls::ClientConfig::builder_with_details(provider(), wall_clock())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(root_store(ca)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| certificate_error("client", client_cert, client_key, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ClientTls {
        config,
        certificate,
        key_readable_by_others,
    })
}

/// notBefore and notAfter of the first certificate of `chain` (read from `path`, which
/// errors name).
fn leaf_validity(chain: &[CertificateDer<'_>], path: &Path) -> Result<Validity, TlsError> {
    let leaf = chain.first().ok_or_else(|| no_certificate(path))?;
    let validity = *parse_certificate(leaf, path)?.tbs_certificate().validity();
    Ok(Validity {
        not_before: validity.not_before.to_system_time(),
        not_after: validity.not_after.to_system_time(),
    })
}

/// The earliest notAfter of the certificates read from `path`.
fn earliest_not_after(
    certs: &[CertificateDer<'_>],
    path: &Path,
) -> Result<std::time::SystemTime, TlsError> {
    let mut earliest: Option<std::time::SystemTime> = None;
    for cert in certs {
        let ends = not_after(cert, path)?;
        earliest = Some(earliest.map_or(ends, |e| e.min(ends)));
    }
    earliest.ok_or_else(|| no_certificate(path))
}

fn not_after(cert: &CertificateDer<'_>, path: &Path) -> Result<std::time::SystemTime, TlsError> {
    let cert = parse_certificate(cert, path)?;
    Ok(cert.tbs_certificate().validity().not_after.to_system_time())
}

fn parse_certificate(cert: &CertificateDer<'_>, path: &Path) -> Result<Certificate, TlsError> {
    Certificate::from_der(cert).map_err(|e| TlsError::Certificates {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn no_certificate(path: &Path) -> TlsError {
    TlsError::Certificates {
        path: path.display().to_string(),
        message: "no certificate".into(),
    }
}

/// A certificate's notBefore and notAfter: the metrics export both, so that an alert on a
/// certificate's end can scale with its lifetime (one that lives an hour is renewed
/// minutes, not days, before it ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

/// A client's rustls configuration and when its own certificate begins and expires.
pub struct ClientTls {
    pub config: rustls::ClientConfig,
    /// The validity of the certificate this side presents.
    pub certificate: Validity,
    /// Set if other users can read the key file.
    pub key_readable_by_others: Option<KeyReadableByOthers>,
}

/// A certificate and key rustls refused together; the common mistake (a key from another
/// pair) said in words rather than as rustls's `KeyMismatch`.
fn certificate_error(side: &str, cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::Config(format!(
                "the {side} key {} is not the private key of the certificate {}",
                key.display(),
                cert.display()
            ))
        }
        e => TlsError::Config(format!("{side} certificate {}: {e}", cert.display())),
    }
}

/// The identity of a client certificate: its URI SAN, else its first DNS SAN, else its
/// subject common name. A DNS SAN or CN with a `:` gives none: every URI has one, and a
/// certificate whose CN (or DNS SAN) reads as another client's URI identity would
/// otherwise get that client's grants and rate-limit bucket (a transport CA that lets
/// requesters choose their CN is common; one that lets them choose URI SANs is not).
pub fn client_identity(cert_der: &[u8]) -> Option<String> {
    identity_of(&Certificate::from_der(cert_der).ok()?).ok()
}

/// Why a client certificate has no identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoIdentity {
    #[error(
        "the client certificate carries no identity (a URI SAN; else a DNS SAN or CN without ':', which could pass for a URI)"
    )]
    None,
    /// A SPIFFE X.509-SVID has exactly one URI SAN; of several, whichever the CA wrote
    /// first is no more the client than the others.
    #[error(
        "the client certificate has {0} URI SANs, and so no identity: a SPIFFE X.509-SVID has exactly one, and the signer does not pick one of several"
    )]
    SeveralUriSans(usize),
    /// A subjectAltName that does not decode (a name x509-cert does not read, such as a
    /// non-ASCII one) may hold a URI: falling back to a DNS name or the CN would pass over
    /// it, and the one-URI rule with it.
    #[error(
        "the client certificate's subjectAltName cannot be read, and so it has no identity: the signer does not fall back to its DNS name or CN"
    )]
    UnreadableSan,
}

/// [`client_identity`] of a certificate already decoded, or why it has none.
pub fn identity_of(cert: &Certificate) -> Result<String, NoIdentity> {
    let tbs = cert.tbs_certificate();
    let not_uri_like = |name: String| (!name.contains(':')).then_some(name);
    let san = tbs
        .get_extension::<SubjectAltName>()
        .map_err(|_| NoIdentity::UnreadableSan)?;
    if let Some((_, san)) = san {
        let uris: Vec<String> = san
            .0
            .iter()
            .filter_map(|n| match n {
                GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        match <[String; 1]>::try_from(uris) {
            Ok([uri]) => return Ok(uri),
            Err(uris) if uris.len() > 1 => return Err(NoIdentity::SeveralUriSans(uris.len())),
            Err(_) => {}
        }
        let dns = san.0.iter().find_map(|n| match n {
            GeneralName::DnsName(d) => Some(d.to_string()),
            _ => None,
        });
        if let Some(dns) = dns {
            return not_uri_like(dns).ok_or(NoIdentity::None);
        }
    }
    tbs.subject()
        .common_name()
        .ok()
        .flatten()
        .map(String::from)
        .and_then(not_uri_like)
        .ok_or(NoIdentity::None)
}

/// Every reason [`handshake_refusal_reason`] gives, and `timeout` (the server's own
/// handshake timeout). The `client_certificate_*` ones are clients the signer's CA may
/// know (an agent whose transport certificate expired cannot renew anything); the others
/// are what scanners and broken clients cause.
pub const HANDSHAKE_REFUSAL_REASONS: [&str; 10] = [
    "client_certificate_expired",
    "client_certificate_revoked",
    "client_certificate_crl_overdue",
    "client_certificate_revocation_unknown",
    "client_certificate_unknown_issuer",
    "client_certificate_invalid",
    "no_client_certificate",
    "protocol",
    "connection",
    "timeout",
];

/// Why a server-side handshake failed, from the error tokio-rustls returned: a short code
/// for a metric label (one of [`HANDSHAKE_REFUSAL_REASONS`]).
pub fn handshake_refusal_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        // Not TLS: the peer reset or closed the connection mid-handshake.
        return "connection";
    };
    certificate_refusal_reason(tls)
}

/// A failed handshake's error in words (see [`certificate_error_text`]).
pub fn handshake_error_text(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => certificate_error_text(tls),
        None => e.to_string(),
    }
}

/// A certificate refusal in words. rustls shows an error of meshca's own verifier (a
/// client CA that has ended, say) in its Debug form: that error's own words instead.
pub fn certificate_error_text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => e.to_string(),
    }
}

/// Why a client certificate (chain) was refused, from the verifier's error: one of
/// [`HANDSHAKE_REFUSAL_REASONS`].
pub fn certificate_refusal_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as Cert;
    match e {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::Expired | Cert::ExpiredContext { .. } => "client_certificate_expired",
            Cert::Other(other) if other.0.is::<refused_client::ClientCaEnded>() => {
                "client_certificate_expired"
            }
            Cert::Revoked => "client_certificate_revoked",
            // Only with `client_crl_overdue = "refuse"`.
            Cert::ExpiredRevocationList | Cert::ExpiredRevocationListContext { .. } => {
                "client_certificate_crl_overdue"
            }
            // With CRLs configured: no CRL in force of a CA in the client's chain.
            Cert::UnknownRevocationStatus => "client_certificate_revocation_unknown",
            Cert::UnknownIssuer => "client_certificate_unknown_issuer",
            _ => "client_certificate_invalid",
        },
        _ => "protocol",
    }
}

/// What to do about a refusal of `reason`, for the log line, where the reason alone does
/// not say.
pub fn handshake_refusal_advice(reason: &str) -> Option<&'static str> {
    match reason {
        // The start and `serve --check` name the CAs in `client_ca` without a CRL, but an
        // intermediate the clients send in their chains is seen only here.
        "client_certificate_revocation_unknown" => Some(
            "with tls.client_crls configured, every CA that issued a certificate of the client's chain needs its CRL there, intermediates the clients send included; add the missing CRL to a file in tls.client_crls and reload",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::MaterialFingerprint;

    #[test]
    fn the_wall_clock_gives_no_time_before_1970_instead_of_panicking() {
        use std::time::{Duration, UNIX_EPOCH};
        let second = Duration::from_secs(1);
        assert_eq!(super::unix_time(UNIX_EPOCH - second), None);
        assert_eq!(
            super::unix_time(UNIX_EPOCH + second).map(|t| t.as_secs()),
            Some(1)
        );
        assert_eq!(super::unix_time(UNIX_EPOCH).map(|t| t.as_secs()), Some(0));
    }

    /// A self-signed certificate made by openssl with the subjectAltName `san` (none if
    /// empty) and the subject `/CN=<cn>`.
    fn certificate_with(san: &str, cn: &str) -> x509_cert::Certificate {
        use der::Decode;
        let dir = tempfile::tempdir().unwrap();
        let subject = format!("/CN={cn}");
        let mut args = vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.der",
            "-outform",
            "DER",
            "-days",
            "1",
            "-subj",
            &subject,
        ];
        // `DER:<hex>`: the extension's bytes as given, however malformed.
        let extension = match san.strip_prefix("DER:") {
            Some(_) => format!("2.5.29.17={san}"),
            None => format!("subjectAltName={san}"),
        };
        if !san.is_empty() {
            args.extend_from_slice(&["-addext", &extension]);
        }
        crate::pki::testing::openssl(dir.path(), &args);
        x509_cert::Certificate::from_der(&std::fs::read(dir.path().join("c.der")).unwrap()).unwrap()
    }

    #[test]
    fn a_certificate_names_one_identity_or_none() {
        use super::{NoIdentity, identity_of};
        let web = "spiffe://meshca.t/cluster/web-1";
        let pay = "spiffe://meshca.t/cluster/pay-1";
        assert_eq!(
            identity_of(&certificate_with(&format!("URI:{web},DNS:x"), "c")),
            Ok(web.into())
        );
        // Two URI SANs: not whichever the CA wrote first.
        assert_eq!(
            identity_of(&certificate_with(&format!("URI:{web},URI:{pay}"), "c")),
            Err(NoIdentity::SeveralUriSans(2))
        );
        let why = NoIdentity::SeveralUriSans(2).to_string();
        assert!(why.contains("2 URI SANs"), "{why}");
        assert_eq!(
            identity_of(&certificate_with("DNS:web-1.t", "c")),
            Ok("web-1.t".into())
        );
        assert_eq!(
            identity_of(&certificate_with("", "web-1")),
            Ok("web-1".into())
        );
        assert_eq!(
            identity_of(&certificate_with("DNS:web-1:8443", "c")),
            Err(NoIdentity::None)
        );
        // A URI beside a DNS name x509-cert does not read (non-ASCII in an IA5String):
        // not the CN, which the one-URI rule never meant to reach.
        let uri = web.as_bytes();
        let dns = "w\u{e9}b".as_bytes();
        let mut names = vec![0x86, uri.len() as u8];
        names.extend_from_slice(uri);
        names.extend_from_slice(&[0x82, dns.len() as u8]);
        names.extend_from_slice(dns);
        let mut san = vec![0x30, names.len() as u8];
        san.extend_from_slice(&names);
        let hex: String = san.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(
            identity_of(&certificate_with(&format!("DER:{hex}"), "web-1")),
            Err(NoIdentity::UnreadableSan)
        );
    }

    #[test]
    fn a_truncated_pem_names_its_missing_end_marker_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let error = super::load_certificates(&path).unwrap_err().to_string();
        assert!(
            error.contains("missing section end marker \"-----END CERTIFICATE-----\""),
            "{error}"
        );
        assert!(!error.contains("[45, 45"), "{error}");
    }

    #[test]
    fn a_refused_handshake_is_named_by_its_cause() {
        use super::{HANDSHAKE_REFUSAL_REASONS, handshake_refusal_reason};
        use rustls::{CertificateError, Error};
        use std::io::{Error as IoError, ErrorKind};
        let wrapped = |e: Error| IoError::new(ErrorKind::InvalidData, e);
        let cases = [
            (
                wrapped(Error::InvalidCertificate(CertificateError::Expired)),
                "client_certificate_expired",
            ),
            (
                wrapped(Error::InvalidCertificate(CertificateError::Revoked)),
                "client_certificate_revoked",
            ),
            (
                wrapped(Error::InvalidCertificate(
                    CertificateError::ExpiredRevocationList,
                )),
                "client_certificate_crl_overdue",
            ),
            (
                wrapped(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                "client_certificate_unknown_issuer",
            ),
            (
                wrapped(Error::InvalidCertificate(
                    CertificateError::UnknownRevocationStatus,
                )),
                "client_certificate_revocation_unknown",
            ),
            (
                wrapped(Error::InvalidCertificate(CertificateError::NotValidYet)),
                "client_certificate_invalid",
            ),
            (
                wrapped(Error::NoCertificatesPresented),
                "no_client_certificate",
            ),
            (
                wrapped(Error::General("no shared cipher suite".into())),
                "protocol",
            ),
            (IoError::from(ErrorKind::ConnectionReset), "connection"),
        ];
        for (error, reason) in cases {
            assert_eq!(handshake_refusal_reason(&error), reason, "{error}");
            assert!(HANDSHAKE_REFUSAL_REASONS.contains(&reason));
        }
    }

    #[test]
    fn a_fingerprint_changes_when_bytes_move_between_items_or_parts() {
        let of = |chain: &[&str], crls: &[&str]| {
            MaterialFingerprint::builder()
                .part("chain", chain)
                .part("crls", crls)
                .finish()
        };
        let base = of(&["ab", "c"], &[]);
        assert_eq!(base, of(&["ab", "c"], &[]));
        for other in [
            of(&["a", "bc"], &[]),
            of(&["ab"], &["c"]),
            of(&["ab", "c", ""], &[]),
        ] {
            assert_ne!(base, other);
        }
    }
}
