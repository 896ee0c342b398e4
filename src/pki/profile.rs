//! Certificate profiles meshca issues, built by meshca alone: the root (self-signed) and
//! intermediates (CA:true, pathlen 0). Nothing is ever copied from a CSR but its key.
//!
//! Building yields the exact DER TBSCertificate bytes; the caller lints them, has them
//! signed and assembles the certificate from those same bytes.

use std::time::SystemTime;

use der::asn1::{Any, AnyRef, BitString, Ia5String, OctetString};
use der::{Decode, Encode, Sequence, Tag};
use sha2::Digest;
use spki::{
    AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, EncodePublicKey,
    SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef,
};
use x509_cert::Certificate;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::builder::{Builder, CertificateBuilder, Profile as BuilderProfile};
use x509_cert::ext::pkix::constraints::name::{GeneralSubtree, NameConstraints};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use super::csr::hex;
use super::keys::{PublicKeyKind, describe_public_key};
use super::pem::{PemError, certificate_pem, decode_certificates};
use super::sigalg::{PublicKeyVerifier, SignatureAlgorithm, SignatureError};

/// Path length of the root: it signs intermediates, which sign workloads.
pub const ROOT_PATH_LEN: u8 = 1;
/// Key usages of every meshca CA certificate (RFC 5280 4.2.1.3).
pub fn intermediate_key_usage() -> KeyUsage {
    KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature)
}
pub fn root_key_usage() -> KeyUsage {
    KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign)
}
/// RFC 5280's upper bound for a common name (ub-common-name), in characters; an
/// organization name's (ub-organization-name) is the same.
pub const MAX_COMMON_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot build certificate: {0}")]
    Build(String),
    #[error("cannot encode certificate: {0}")]
    Encoding(#[from] der::Error),
    #[error(
        "the time {} cannot be written into a certificate (X.509 dates run from 1970 to 9999); check this machine's clock",
        super::datetime::rfc3339(*time)
    )]
    Time { time: SystemTime },
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("root certificate: {0}")]
    Pem(#[from] PemError),
    #[error("root certificate file holds {0} certificates, expected exactly one")]
    NotOne(usize),
    #[error("root certificate key: {0}")]
    Key(#[from] SignatureError),
    #[error("root certificate has no subject key identifier")]
    NoSubjectKeyId,
    #[error("root certificate is not a CA (basicConstraints cA is not true)")]
    NotCa,
    /// Verifiers (Go's crypto/x509 in istiod, openssl) refuse every chain through an
    /// intermediate it signed.
    #[error("root certificate cannot have intermediates: {0}")]
    NoIntermediates(&'static str),
    #[error("root certificate self-signature does not verify")]
    BadSelfSignature,
    #[error("root certificate {}", NEGATIVE_SERIAL)]
    NegativeSerial,
    /// Not a wrong signature: one meshca cannot check (an algorithm it does not verify).
    #[error("root certificate self-signature cannot be checked: {0}")]
    SelfSignatureNotCheckable(SignatureError),
}

/// The CN a certificate for `name` carries: its first 64 characters (RFC 5280's bound).
/// Whoever compares a certificate's CN with a mesh name compares it with this: a longer
/// name would never match, and its intermediate be replaced at every pass.
pub fn bounded_common_name(name: &str) -> String {
    name.chars().take(MAX_COMMON_NAME).collect()
}

/// A subject Name `O=<org>, CN=<common name>` (cut to [`bounded_common_name`]), both
/// UTF8String.
pub fn subject_name(org: &str, common_name: &str) -> Result<Name, der::Error> {
    let common_name = bounded_common_name(common_name);
    let mut rdns = RdnSequence::default();
    for (oid, value) in [
        (const_oid::db::rfc4519::O, org),
        (const_oid::db::rfc4519::CN, common_name.as_str()),
    ] {
        let mut rdn = RelativeDistinguishedName::default();
        rdn.insert(AttributeTypeAndValue {
            oid,
            value: Any::new(Tag::Utf8String, value.as_bytes())?,
        })?;
        rdns.push(rdn);
    }
    Name::from_der(&rdns.to_der()?)
}

/// The root CA as the signer knows it: its certificate and what is derived from it once.
#[derive(Debug, Clone)]
pub struct RootCa {
    pub certificate: Certificate,
    pub pem: String,
    pub subject: Name,
    pub key_kind: PublicKeyKind,
    pub public_key: SubjectPublicKeyInfoOwned,
    /// The algorithm this root signs with.
    pub signature_algorithm: SignatureAlgorithm,
    pub subject_key_id: Vec<u8>,
    pub not_after: SystemTime,
    pub verifier: PublicKeyVerifier,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint_sha256: String,
}

impl RootCa {
    /// Reads a PEM file holding exactly one self-signed CA certificate.
    pub fn from_pem(pem: &str) -> Result<Self, RootError> {
        let mut certs = decode_certificates(pem)?;
        if certs.len() != 1 {
            return Err(RootError::NotOne(certs.len()));
        }
        Self::from_certificate(certs.remove(0))
    }

    pub fn from_certificate(certificate: Certificate) -> Result<Self, RootError> {
        let tbs = certificate.tbs_certificate();
        if is_negative_serial(tbs.serial_number()) {
            return Err(RootError::NegativeSerial);
        }
        let public_key = tbs.subject_public_key_info().clone();
        let verifier = PublicKeyVerifier::new(&public_key)?;
        let key_kind = describe_public_key(&public_key)
            .map_err(|e| RootError::Key(SignatureError::BadKey(e.to_string())))?;
        let signature_algorithm = match &key_kind {
            PublicKeyKind::Ec(super::keys::NamedCurve::P384) => SignatureAlgorithm::EcdsaSha384,
            PublicKeyKind::Ec(_) => SignatureAlgorithm::EcdsaSha256,
            _ => SignatureAlgorithm::RsaPkcs1Sha256,
        };
        let subject_key_id = tbs
            .get_extension::<SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .map(|(_, ski)| ski.0.as_bytes().to_vec())
            .ok_or(RootError::NoSubjectKeyId)?;
        if !is_ca(tbs) {
            return Err(RootError::NotCa);
        }
        if let Some(why) = intermediates_refused(tbs) {
            return Err(RootError::NoIntermediates(why));
        }
        verify_certificate_signature(&certificate, &verifier).map_err(|e| match e {
            SignatureError::Invalid => RootError::BadSelfSignature,
            other => RootError::SelfSignatureNotCheckable(other),
        })?;
        let der = certificate
            .to_der()
            .map_err(|e| RootError::Pem(PemError::Malformed(e.to_string())))?;
        Ok(RootCa {
            pem: certificate_pem(&certificate),
            subject: tbs.subject().clone(),
            not_after: tbs.validity().not_after.to_system_time(),
            fingerprint_sha256: hex(&sha2::Sha256::digest(&der)),
            key_kind,
            public_key,
            signature_algorithm,
            subject_key_id,
            verifier,
            certificate,
        })
    }
}

/// Checks a certificate's signature with an issuer key.
pub fn verify_certificate_signature(
    cert: &Certificate,
    issuer: &PublicKeyVerifier,
) -> Result<(), SignatureError> {
    let algorithm = SignatureAlgorithm::from_identifier(cert.signature_algorithm())?;
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| SignatureError::BadKey(e.to_string()))?;
    let signature = cert.signature().as_bytes().ok_or(SignatureError::Invalid)?;
    issuer.verify(algorithm, &tbs, signature)
}

/// What the signer decided an intermediate will contain.
#[derive(Debug, Clone)]
pub struct IntermediatePlan {
    pub subject: Name,
    pub public_key: SubjectPublicKeyInfoOwned,
    pub serial: SerialNumber,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A fresh random serial: 16 bytes from the OS CSPRNG, positive, no leading zero octet.
pub fn random_serial() -> Result<SerialNumber, ProfileError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ProfileError::Build(format!("random serial: {e}")))?;
    // Top bit clear keeps it positive; a set bit 6 keeps the first octet non-zero, so the
    // encoding is exactly 16 octets (well inside RFC 5280's 20).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::new(&bytes)?)
}

/// The name constraints of an intermediate under a virtual mesh with `trust_domains`
/// (none without): permitted subtrees of type URI, one per trust domain. RFC 5280
/// 4.2.1.10 reads a URI constraint as a host, so `pay.local` permits
/// `spiffe://pay.local/...` and no other URI; names of other types (istiod's DNS-named
/// serving certificate) are not constrained.
pub fn trust_domain_constraints(
    trust_domains: &[String],
) -> Result<Option<NameConstraints>, der::Error> {
    if trust_domains.is_empty() {
        return Ok(None);
    }
    let subtrees = trust_domains
        .iter()
        .map(|domain| {
            Ok(GeneralSubtree {
                base: GeneralName::UniformResourceIdentifier(Ia5String::new(domain)?),
                minimum: 0,
                maximum: None,
            })
        })
        .collect::<Result<Vec<_>, der::Error>>()?;
    Ok(Some(NameConstraints {
        permitted_subtrees: Some(subtrees),
        excluded_subtrees: None,
    }))
}

/// The exact DER TBSCertificate of an intermediate under `root`, constrained to
/// `trust_domains` (see [`trust_domain_constraints`]).
pub fn intermediate_tbs(
    plan: &IntermediatePlan,
    root: &RootCa,
    trust_domains: &[String],
) -> Result<Vec<u8>, ProfileError> {
    intermediate_profile_tbs(plan, root, trust_domains, &root.subject)
}

/// [`intermediate_tbs`], but named as issued by the intermediate itself (its subject as
/// issuer): the self-issued template Vault's `sign-self-issued` takes, which puts the
/// root's name in as issuer and keeps everything else.
pub fn intermediate_template_tbs(
    plan: &IntermediatePlan,
    root: &RootCa,
    trust_domains: &[String],
) -> Result<Vec<u8>, ProfileError> {
    intermediate_profile_tbs(plan, root, trust_domains, &plan.subject)
}

fn intermediate_profile_tbs(
    plan: &IntermediatePlan,
    root: &RootCa,
    trust_domains: &[String],
    issuer: &Name,
) -> Result<Vec<u8>, ProfileError> {
    let profile = CaProfile {
        subject: plan.subject.clone(),
        issuer: Some(issuer.clone()),
        basic_constraints: BasicConstraints {
            ca: true,
            path_len_constraint: Some(0),
        },
        key_usage: intermediate_key_usage(),
        authority_key_id: Some(root.subject_key_id.clone()),
        subject_key_id: None,
        name_constraints: trust_domain_constraints(trust_domains)?,
    };
    let issuer = IssuerKey {
        public_key: root.public_key.clone(),
        algorithm: root.signature_algorithm,
    };
    build_tbs(profile, plan, &issuer)
}

/// The exact DER TBSCertificate of a cross certificate: `announced`'s subject, key and
/// SKI, issued by `current` (its subject, its SKI as AKI) with the root profile's
/// constraints, so that a client trusting `current` can tell its key vouches for
/// `announced`. `plan` gives the serial and validity (its subject and key are ignored).
pub fn cross_tbs(
    plan: &IntermediatePlan,
    announced: &RootCa,
    current: &RootCa,
) -> Result<Vec<u8>, ProfileError> {
    cross_profile_tbs(plan, announced, current, &current.subject)
}

/// [`cross_tbs`], but named as issued by `announced` itself: the self-issued template
/// Vault's `sign-self-issued` takes (it puts the current root's name in as issuer).
pub fn cross_template_tbs(
    plan: &IntermediatePlan,
    announced: &RootCa,
    current: &RootCa,
) -> Result<Vec<u8>, ProfileError> {
    cross_profile_tbs(plan, announced, current, &announced.subject)
}

fn cross_profile_tbs(
    plan: &IntermediatePlan,
    announced: &RootCa,
    current: &RootCa,
    issuer: &Name,
) -> Result<Vec<u8>, ProfileError> {
    let profile = CaProfile {
        subject: announced.subject.clone(),
        issuer: Some(issuer.clone()),
        basic_constraints: BasicConstraints {
            ca: true,
            path_len_constraint: Some(ROOT_PATH_LEN),
        },
        key_usage: root_key_usage(),
        authority_key_id: Some(current.subject_key_id.clone()),
        subject_key_id: Some(announced.subject_key_id.clone()),
        name_constraints: None,
    };
    let issuer = IssuerKey {
        public_key: current.public_key.clone(),
        algorithm: current.signature_algorithm,
    };
    let plan = IntermediatePlan {
        subject: announced.subject.clone(),
        public_key: announced.public_key.clone(),
        ..plan.clone()
    };
    build_tbs(profile, &plan, &issuer)
}

/// The exact DER TBSCertificate of a self-signed root.
pub fn root_tbs(
    plan: &IntermediatePlan,
    algorithm: SignatureAlgorithm,
) -> Result<Vec<u8>, ProfileError> {
    let profile = CaProfile {
        subject: plan.subject.clone(),
        issuer: None,
        basic_constraints: BasicConstraints {
            ca: true,
            path_len_constraint: Some(ROOT_PATH_LEN),
        },
        key_usage: root_key_usage(),
        authority_key_id: None,
        subject_key_id: None,
        name_constraints: None,
    };
    let issuer = IssuerKey {
        public_key: plan.public_key.clone(),
        algorithm,
    };
    build_tbs(profile, plan, &issuer)
}

fn build_tbs(
    profile: CaProfile,
    plan: &IntermediatePlan,
    issuer: &IssuerKey,
) -> Result<Vec<u8>, ProfileError> {
    let time = |t: SystemTime| Time::try_from(t).map_err(|_| ProfileError::Time { time: t });
    let validity = Validity::new(time(plan.not_before)?, time(plan.not_after)?);
    let mut builder = CertificateBuilder::new(
        profile,
        plan.serial.clone(),
        validity,
        plan.public_key.clone(),
    )
    .map_err(|e| ProfileError::Build(e.to_string()))?;
    builder
        .finalize(issuer)
        .map_err(|e| ProfileError::Build(e.to_string()))
}

/// Certificate = SEQUENCE { tbsCertificate, signatureAlgorithm, signature }, with the TBS
/// kept as the exact bytes that were linted and signed.
#[derive(Sequence)]
struct RawCertificate<'a> {
    tbs: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

/// Assembles a certificate around exactly `tbs_der` and returns its DER.
pub fn assemble(
    tbs_der: &[u8],
    algorithm: SignatureAlgorithm,
    signature: &[u8],
) -> Result<Vec<u8>, ProfileError> {
    let raw = RawCertificate {
        tbs: AnyRef::from_der(tbs_der)?,
        algorithm: algorithm.algorithm_identifier(),
        signature: BitString::from_bytes(signature)?,
    };
    Ok(raw.to_der()?)
}

/// The profile meshca's CA certificates follow (root and intermediate differ only in the
/// values passed in).
struct CaProfile {
    subject: Name,
    /// `None` for self-signed.
    issuer: Option<Name>,
    basic_constraints: BasicConstraints,
    key_usage: KeyUsage,
    /// The issuer's subject key identifier; `None` means self-signed (AKI = own SKI).
    authority_key_id: Option<Vec<u8>>,
    /// The subject key identifier when it is not derived from the key here: a cross
    /// certificate carries the announced root's own, whoever computed it.
    subject_key_id: Option<Vec<u8>>,
    /// An intermediate's, under a virtual mesh with trust domains; always critical.
    name_constraints: Option<NameConstraints>,
}

impl BuilderProfile for CaProfile {
    fn get_issuer(&self, subject: &Name) -> Name {
        self.issuer.clone().unwrap_or_else(|| subject.clone())
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &x509_cert::TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let subject = tbs.subject();
        let ski = match &self.subject_key_id {
            Some(id) => SubjectKeyIdentifier(OctetString::new(id.clone())?),
            None => SubjectKeyIdentifier::try_from(spk)?,
        };
        let aki_bytes = match &self.authority_key_id {
            Some(id) => id.clone(),
            None => ski.0.as_bytes().to_vec(),
        };
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(aki_bytes)?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        let mut extensions = vec![
            extension(&self.basic_constraints, true, subject)?,
            extension(&self.key_usage, true, subject)?,
            extension(&ski, false, subject)?,
            extension(&aki, false, subject)?,
        ];
        // Critical (RFC 5280 4.2.1.10): a verifier that cannot apply it must refuse the
        // chain rather than accept names outside it.
        if let Some(constraints) = &self.name_constraints {
            extensions.push(extension(constraints, true, subject)?);
        }
        Ok(extensions)
    }
}

/// An extension with the criticality this profile demands (not the library default).
fn extension<E: const_oid::AssociatedOid + Encode>(
    value: &E,
    critical: bool,
    subject: &Name,
) -> Result<Extension, der::Error> {
    (critical, value).to_extension(subject, &[])
}

/// The issuer's public key and algorithm, in the shape the x509-cert builder asks for.
/// It never signs: signing happens in the token, over the bytes `finalize` returns.
struct IssuerKey {
    public_key: SubjectPublicKeyInfoOwned,
    algorithm: SignatureAlgorithm,
}

#[derive(Clone)]
struct IssuerPublicKey(SubjectPublicKeyInfoOwned);

impl EncodePublicKey for IssuerPublicKey {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::encode_msg(&self.0)?)
    }
}

impl signature::Keypair for IssuerKey {
    type VerifyingKey = IssuerPublicKey;
    fn verifying_key(&self) -> IssuerPublicKey {
        IssuerPublicKey(self.public_key.clone())
    }
}

impl DynSignatureAlgorithmIdentifier for IssuerKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(self.algorithm.algorithm_identifier())
    }
}

/// Decodes a TBSCertificate from DER (for the linter).
pub fn decode_tbs(tbs_der: &[u8]) -> Result<x509_cert::TbsCertificate, der::Error> {
    x509_cert::TbsCertificate::from_der(tbs_der)
}

/// Why a CA certificate cannot sign CA certificates that verifiers accept, if it cannot:
/// a path length of 0, or a keyUsage without keyCertSign.
fn intermediates_refused(tbs: &x509_cert::TbsCertificate) -> Option<&'static str> {
    let path_len = tbs
        .get_extension::<BasicConstraints>()
        .ok()
        .flatten()
        .and_then(|(_, bc)| bc.path_len_constraint);
    if path_len == Some(0) {
        return Some(
            "its basicConstraints pathLenConstraint is 0 (no CA below it): make it again with none, or 1 or more",
        );
    }
    match tbs.get_extension::<KeyUsage>() {
        Ok(Some((_, usage))) if !usage.key_cert_sign() => Some(
            "its keyUsage lacks keyCertSign (it may sign no certificate): make it again with keyCertSign and cRLSign",
        ),
        Ok(_) => None,
        Err(_) => Some("its keyUsage cannot be read"),
    }
}

/// Whether a certificate's basicConstraints say CA (absent or unreadable: no).
pub fn is_ca(tbs: &x509_cert::TbsCertificate) -> bool {
    tbs.get_extension::<BasicConstraints>()
        .ok()
        .flatten()
        .is_some_and(|(_, bc)| bc.ca)
}

/// Whether a serial is negative (its DER's sign bit set). RFC 5280 4.1.2.2 wants a positive
/// integer; openssl takes a negative one, but Go's crypto/x509 (1.23 on), with which istiod
/// reads cacerts and root-cert.pem, refuses to parse the certificate, and its
/// `AppendCertsFromPEM` leaves such a root out without a word.
pub fn is_negative_serial(serial: &SerialNumber) -> bool {
    serial.as_bytes().first().is_some_and(|b| b & 0x80 != 0)
}

/// What is wrong with a negative serial, for errors.
pub const NEGATIVE_SERIAL: &str = "serial number is negative (RFC 5280 wants a positive integer; Go's crypto/x509, with which istiod reads certificates, refuses to parse it)";

/// A certificate's serial as lowercase hex of its value, as the API and the audit log
/// report it: without the zero octet DER puts before a first octet of 0x80 or more (a
/// Vault serial of 19 octets, say), as `openssl x509 -serial` and Vault's `pki/certs`
/// show it, so that either can be matched against the log.
pub fn serial_hex(serial: &SerialNumber) -> String {
    let bytes = serial.as_bytes();
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex(&bytes[start..])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::pki::testing::openssl_root;

    #[test]
    fn a_time_a_certificate_cannot_hold_is_said_as_a_date() {
        let set_back = SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(1);
        let message = ProfileError::Time { time: set_back }.to_string();
        assert!(message.contains("1969-12-31T23:59:59.000Z"), "{message}");
        assert!(!message.contains("SystemTime"), "{message}");
    }

    #[test]
    fn a_root_signed_with_an_algorithm_meshca_does_not_verify_is_named_not_called_bad() {
        for (signing, algorithm) in [
            (
                &["-sha256", "-sigopt", "rsa_padding_mode:pss"][..],
                "1.2.840.113549.1.1.10 (RSASSA-PSS)",
            ),
            (
                &["-sha1"][..],
                "1.2.840.113549.1.1.5 (sha1WithRSAEncryption)",
            ),
        ] {
            let err = RootCa::from_pem(&openssl_root(signing)).unwrap_err();
            assert!(
                matches!(err, RootError::SelfSignatureNotCheckable(_)),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "root certificate self-signature cannot be checked: signature algorithm {algorithm} is not supported (use sha256/384/512WithRSAEncryption or ecdsa-with-SHA256/384/512)"
                )
            );
        }
        // A supported algorithm with a wrong signature is still a bad signature.
        let root = openssl_root(&["-sha256"]);
        let certificate = RootCa::from_pem(&root).unwrap().certificate;
        let mut signature = certificate.signature().raw_bytes().to_vec();
        signature[10] ^= 1;
        let tampered = assemble(
            &certificate.tbs_certificate().to_der().unwrap(),
            SignatureAlgorithm::RsaPkcs1Sha256,
            &signature,
        )
        .unwrap();
        let certificate = Certificate::from_der(&tampered).unwrap();
        assert!(matches!(
            RootCa::from_certificate(certificate),
            Err(RootError::BadSelfSignature)
        ));
    }

    /// What the lint accepts is also what a decoder reads: a critical nameConstraints of
    /// permitted URI hosts, one per trust domain, nothing excluded, nothing else.
    #[test]
    fn trust_domains_become_critical_permitted_uri_subtrees() {
        use crate::pki::keys::{KeyType, PrivateKey};
        use crate::pki::testing::software_root;
        let (_key, root) = software_root(KeyType::EcdsaP384, "pay", Duration::from_secs(86_400));
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let now = SystemTime::now();
        let plan = IntermediatePlan {
            subject: subject_name("pay", "pay-1").unwrap(),
            public_key: key.public_key_info().unwrap(),
            serial: random_serial().unwrap(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        };
        let trust_domains = ["pay.local".to_string(), "pay.remote".to_string()];
        let tbs = x509_cert::TbsCertificate::from_der(
            &intermediate_tbs(&plan, &root, &trust_domains).unwrap(),
        )
        .unwrap();
        let (critical, constraints) = tbs.get_extension::<NameConstraints>().unwrap().unwrap();
        assert!(critical);
        assert_eq!(constraints.excluded_subtrees, None);
        let permitted: Vec<(String, u32, Option<u32>)> = constraints
            .permitted_subtrees
            .unwrap()
            .into_iter()
            .map(|subtree| match subtree.base {
                GeneralName::UniformResourceIdentifier(host) => {
                    (host.to_string(), subtree.minimum, subtree.maximum)
                }
                other => panic!("not a URI: {other:?}"),
            })
            .collect();
        assert_eq!(
            permitted,
            [
                ("pay.local".to_string(), 0, None),
                ("pay.remote".to_string(), 0, None)
            ]
        );
        // Without trust domains: the four extensions, as before.
        let bare =
            x509_cert::TbsCertificate::from_der(&intermediate_tbs(&plan, &root, &[]).unwrap())
                .unwrap();
        assert_eq!(bare.extensions().unwrap().len(), 4);
        assert!(bare.get_extension::<NameConstraints>().unwrap().is_none());
    }

    /// Serials read as their value, as openssl and Vault show them: DER's sign octet is
    /// not part of it.
    #[test]
    fn a_serial_is_shown_without_its_sign_octet() {
        let serial = |der: &[u8]| serial_hex(&SerialNumber::new(der).unwrap());
        assert_eq!(serial(&[0x00, 0xbe, 0x21]), "be21");
        assert_eq!(serial(&[0x40, 0x01]), "4001");
        assert_eq!(serial(&[0x00]), "00");
    }

    /// A root that cannot have intermediates (pathlen 0, a keyUsage without keyCertSign):
    /// refused by name, since every chain through an intermediate under it would be
    /// refused by istiod and openssl alike. Without keyUsage or a path length it is taken.
    #[test]
    fn a_root_that_cannot_have_intermediates_is_refused_by_name() {
        use crate::pki::testing::openssl_root_with;
        let refused = |extensions: &str| {
            RootCa::from_pem(&openssl_root_with(extensions, &["-sha256"]))
                .unwrap_err()
                .to_string()
        };
        let leaf_only = refused(
            "basicConstraints = critical,CA:true,pathlen:0\nkeyUsage = critical,keyCertSign,cRLSign\n",
        );
        assert!(
            leaf_only
                .contains("cannot have intermediates: its basicConstraints pathLenConstraint is 0"),
            "{leaf_only}"
        );
        let no_cert_sign =
            refused("basicConstraints = critical,CA:true\nkeyUsage = critical,cRLSign\n");
        assert!(
            no_cert_sign.contains("cannot have intermediates: its keyUsage lacks keyCertSign"),
            "{no_cert_sign}"
        );
        RootCa::from_pem(&openssl_root_with(
            "basicConstraints = critical,CA:true\n",
            &["-sha256"],
        ))
        .unwrap();
    }

    /// openssl makes a root with a negative serial when asked; Go's crypto/x509, and so
    /// istiod, cannot parse it, so it is no root for meshca either, in force or announced.
    #[test]
    fn a_root_with_a_negative_serial_is_refused_by_name() {
        let root = openssl_root(&["-sha256", "-set_serial", "-0x4F1E2D3C4B5A69788796A5B4"]);
        let err = RootCa::from_pem(&root).unwrap_err();
        assert!(matches!(err, RootError::NegativeSerial), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("root certificate {NEGATIVE_SERIAL}")
        );
        let certificate = decode_certificates(&root).unwrap().remove(0);
        let lint = crate::pki::lint::lint_root_profile(
            certificate.tbs_certificate(),
            "acme",
            2048,
            std::time::Duration::from_secs(31 * 86_400),
        )
        .unwrap_err();
        assert!(lint.to_string().contains(NEGATIVE_SERIAL), "{lint}");
        // The same root with a positive serial is taken.
        RootCa::from_pem(&openssl_root(&[
            "-sha256",
            "-set_serial",
            "0x4F1E2D3C4B5A69788796A5B4",
        ]))
        .unwrap();
    }
}
