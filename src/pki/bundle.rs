//! The checks an Istio plugged-in CA bundle (`cacerts`) must pass, as istiod makes them
//! plus meshca's profile: ca-cert.pem is a CA whose key is ca-key.pem, cert-chain.pem
//! starts with it and climbs to a root in root-cert.pem, every signature verifies and
//! every certificate is within its validity.

use std::time::SystemTime;

use der::Encode;
use sha2::Digest;
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::name::Name;

use super::csr::hex;
use super::keys::{PrivateKey, describe_public_key};
use super::lint::lint_intermediate_profile;
use super::pem::decode_certificates;
use super::profile::{
    NEGATIVE_SERIAL, is_ca, is_negative_serial, serial_hex, verify_certificate_signature,
};
use super::sigalg::PublicKeyVerifier;

/// The four files of a bundle, as text.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFiles {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert_chain: String,
    pub root_cert: String,
}

/// Without the key: a `{:?}` of a bundle (or of what holds one) in a log line or an error
/// must not carry the intermediate CA's private key.
impl std::fmt::Debug for BundleFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleFiles")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

/// File names Istio reads, in the order meshca writes them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("{file}: {message}")]
    File { file: &'static str, message: String },
    #[error("ca-key.pem does not match the public key of ca-cert.pem")]
    KeyMismatch,
    #[error("ca-cert.pem is not a CA certificate (basicConstraints cA is not true)")]
    NotCa,
    #[error(
        "cert-chain.pem must start with ca-cert.pem (istiod sends it to workloads as their chain)"
    )]
    ChainStart,
    #[error("cert-chain.pem: certificate {index} is not signed by certificate {next}: {reason}")]
    ChainLink {
        index: usize,
        next: usize,
        reason: String,
    },
    #[error("the chain does not end at a root in root-cert.pem")]
    NoTrustedRoot,
    #[error(
        "root-cert.pem: certificate {0} is not self-issued (its issuer is not its subject), so it is no root"
    )]
    NotSelfIssued(usize),
    #[error(
        "root-cert.pem: the root the chain ends at (certificate {0}) is not a self-signed CA whose signature meshca can verify"
    )]
    BadAnchor(usize),
    /// This clock reads past a certificate's notAfter: usually it simply expired.
    #[error(
        "{which} expired at {} (valid from {}; this machine's clock reads {}){hint}",
        super::datetime::rfc3339(*.not_after),
        super::datetime::rfc3339(*.not_before),
        super::datetime::rfc3339(*.now)
    )]
    Expired {
        which: String,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
        /// Empty, or [`BundleError::just_issued`]'s: only a certificate just issued
        /// tells that this clock is ahead.
        hint: &'static str,
    },
    /// This clock reads before a certificate's notBefore (see [`verify_once_valid`]).
    #[error(
        "{which} is not valid yet (valid {} to {}; this machine's clock reads {}){hint}",
        super::datetime::rfc3339(*.not_before),
        super::datetime::rfc3339(*.not_after),
        super::datetime::rfc3339(*.now)
    )]
    NotYetValid {
        which: String,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
        /// Empty, or [`BundleError::just_issued`]'s.
        hint: &'static str,
    },
    #[error("ca-cert.pem does not follow meshca's intermediate profile: {0}")]
    Profile(String),
    #[error(
        "the bundle chains to root {anchor}, not the expected root {expected} (it may trust that one too: root-cert.pem is what the bundle trusts, the chain is what its workloads present)"
    )]
    UnexpectedRoot { anchor: String, expected: String },
}

/// What a verified bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub key: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub chain_length: usize,
    /// SHA-256 fingerprints of every root in root-cert.pem.
    pub root_fingerprints: Vec<String>,
    /// Fingerprint of the root the chain ends at.
    pub anchor_fingerprint: String,
    /// When that root ends.
    pub anchor_not_after: SystemTime,
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint(cert: &Certificate) -> String {
    hex(&sha2::Sha256::digest(cert.to_der().unwrap_or_default()))
}

/// A file's certificates, every one of which istiod can read: a negative serial, which
/// openssl takes, makes Go's parser (and so istiod) leave the certificate out.
fn certs(file: &'static str, pem: &str) -> Result<Vec<Certificate>, BundleError> {
    let certs = decode_certificates(pem).map_err(|e| BundleError::File {
        file,
        message: e.to_string(),
    })?;
    if let Some(at) = certs
        .iter()
        .position(|c| is_negative_serial(c.tbs_certificate().serial_number()))
    {
        return Err(BundleError::File {
            file,
            message: format!("certificate {}: {NEGATIVE_SERIAL}", at + 1),
        });
    }
    Ok(certs)
}

fn same(a: &Certificate, b: &Certificate) -> bool {
    a.to_der().ok() == b.to_der().ok()
}

fn verifier(cert: &Certificate) -> Option<PublicKeyVerifier> {
    PublicKeyVerifier::new(cert.tbs_certificate().subject_public_key_info()).ok()
}

/// Why `child` does not link to `parent`, for an operator.
fn link_problem(child: &Certificate, parent: &Certificate) -> String {
    names_apart(
        child.tbs_certificate().issuer(),
        parent.tbs_certificate().subject(),
    )
    .unwrap_or_else(|| "its signature does not verify with the next one's key".into())
}

/// How an issuer name differs from the subject it should be, if it does. Go (istiod) finds
/// a parent by the bytes of the names, so the same text in another string type
/// (PrintableString where the other has UTF8String), which openssl accepts, breaks a chain
/// too.
fn names_apart(issuer: &Name, subject: &Name) -> Option<String> {
    if issuer == subject {
        return None;
    }
    Some(if issuer.to_string() == subject.to_string() {
        format!(
            "its issuer reads as the next one's subject ({subject}) but is encoded otherwise (another string type): Go, and so istiod, matches names byte for byte"
        )
    } else {
        format!("its issuer ({issuer}) is not the next one's subject ({subject})")
    })
}

fn signed_by(child: &Certificate, parent: &Certificate) -> bool {
    child.tbs_certificate().issuer() == parent.tbs_certificate().subject()
        && verifier(parent).is_some_and(|v| verify_certificate_signature(child, &v).is_ok())
}

fn check_time(which: String, cert: &Certificate, now: SystemTime) -> Result<(), BundleError> {
    let validity = cert.tbs_certificate().validity();
    let (nb, na) = (
        validity.not_before.to_system_time(),
        validity.not_after.to_system_time(),
    );
    if now < nb {
        return Err(BundleError::NotYetValid {
            which,
            not_before: nb,
            not_after: na,
            now,
            hint: "",
        });
    }
    if now > na {
        return Err(BundleError::Expired {
            which,
            not_before: nb,
            not_after: na,
            now,
            hint: "",
        });
    }
    Ok(())
}

impl BundleError {
    /// The error of a bundle the signer has just issued: one outside its validity then
    /// tells of this machine's clock (not a bundle that simply expired, as an installed
    /// one or one given to `meshca verify` usually is).
    pub fn just_issued(self) -> Self {
        match self {
            BundleError::NotYetValid {
                which,
                not_before,
                not_after,
                now,
                ..
            } => BundleError::NotYetValid {
                which,
                not_before,
                not_after,
                now,
                hint: ": a certificate just issued that is not valid yet means this machine's clock is behind the signer's by more than the notBefore backdating; check time synchronisation",
            },
            BundleError::Expired {
                which,
                not_before,
                not_after,
                now,
                ..
            } => BundleError::Expired {
                which,
                not_before,
                not_after,
                now,
                hint: ": a certificate just issued that has already expired means this machine's clock is ahead of the signer's by more than its lifetime; check time synchronisation",
            },
            other => other,
        }
    }
}

fn subject_key_id(cert: &Certificate) -> Vec<u8> {
    cert.tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, ski)| ski.0.as_bytes().to_vec())
        .unwrap_or_default()
}

/// notBefore and notAfter of the first certificate of `pem` (ca-cert.pem's intermediate),
/// read without judging anything else.
pub fn validity(file: &'static str, pem: &str) -> Result<(SystemTime, SystemTime), BundleError> {
    let validity = *certs(file, pem)?.remove(0).tbs_certificate().validity();
    Ok((
        validity.not_before.to_system_time(),
        validity.not_after.to_system_time(),
    ))
}

/// Whether `cert` may stand in root-cert.pem beside the root a chain ends at: it was parsed,
/// and it is self-issued (its subject is its issuer). Nothing more, because istiod asks
/// nothing more: it puts root-cert.pem into a Go `x509.CertPool`, which takes every
/// certificate Go can parse, and Go's chain building never checks a root's own signature
/// (a SHA-1, P-521, Ed25519 or RSA-PSS self-signature, which meshca cannot verify, is
/// fine) nor a root's basicConstraints (a v1 root, without extensions, anchors a chain).
/// What must verify is only what a chain uses: the link to its root and that root's
/// validity, checked by [`verify_bundle`] on the anchor. Self-issued is meshca's own
/// bound: an intermediate in root-cert.pem would have whatever it signed trusted without
/// its root, so an adopted one is not carried on.
pub fn is_self_issued(cert: &Certificate) -> bool {
    let tbs = cert.tbs_certificate();
    tbs.subject() == tbs.issuer()
}

/// Verifies a bundle at time `now`. root-cert.pem's roots need only be self-issued
/// ([`is_self_issued`]); the one the chain ends at must be a CA whose self-signature
/// verifies and valid at `now`. With `expected_root`, the chain must be anchored at that
/// certificate: trusting it (root-cert.pem holds an announced next root) is not having
/// moved to it. The error is the first of [`check_bundle`]'s findings.
pub fn verify_bundle(
    files: &BundleFiles,
    expected_root: Option<&Certificate>,
    now: SystemTime,
) -> Result<BundleSummary, BundleError> {
    check_bundle(files, expected_root, now).map_err(|mut findings| findings.remove(0))
}

/// The bundle's summary, or everything wrong with it at time `now` (never an empty list),
/// in the order [`verify_bundle`] checks it: its error is the first. Whoever mends a
/// bundle by hand sees every problem at once, not one per run. A check that needs a file
/// that did not parse is left out.
pub fn check_bundle(
    files: &BundleFiles,
    expected_root: Option<&Certificate>,
    now: SystemTime,
) -> Result<BundleSummary, Vec<BundleError>> {
    let mut findings = Vec::new();
    let mut noted = |parsed: Result<Vec<Certificate>, BundleError>| match parsed {
        Ok(certs) => Some(certs),
        Err(e) => {
            findings.push(e);
            None
        }
    };
    // decode_certificates refuses a file without a certificate, so each list has a first.
    let ca_cert = noted(certs(CA_CERT, &files.ca_cert)).map(|mut certs| certs.remove(0));
    let chain = noted(certs(CERT_CHAIN, &files.cert_chain));
    let roots = noted(certs(ROOT_CERT, &files.root_cert));
    let key_spki = PrivateKey::from_pem(&files.ca_key)
        .map_err(|e| e.to_string())
        .and_then(|key| key.public_key_info().map_err(|e| e.to_string()));
    let key_spki = match key_spki {
        Ok(spki) => Some(spki),
        Err(message) => {
            findings.push(BundleError::File {
                file: CA_KEY,
                message,
            });
            None
        }
    };

    if let Some(ca_cert) = &ca_cert {
        let tbs = ca_cert.tbs_certificate();
        if let Some(spki) = &key_spki
            && spki.to_der().ok() != tbs.subject_public_key_info().to_der().ok()
        {
            findings.push(BundleError::KeyMismatch);
        }
        if !is_ca(tbs) {
            findings.push(BundleError::NotCa);
        }
        if let Some(chain) = &chain
            && !same(&chain[0], ca_cert)
        {
            findings.push(BundleError::ChainStart);
        }
    }
    if let Some(roots) = &roots {
        for (index, root) in roots.iter().enumerate() {
            if !is_self_issued(root) {
                findings.push(BundleError::NotSelfIssued(index + 1));
            }
        }
    }
    let mut anchor = None;
    if let Some(chain) = &chain {
        for (index, pair) in chain.windows(2).enumerate() {
            if !signed_by(&pair[0], &pair[1]) {
                findings.push(BundleError::ChainLink {
                    index: index + 1,
                    next: index + 2,
                    reason: link_problem(&pair[0], &pair[1]),
                });
            }
        }
        if let Some(roots) = &roots {
            let top = &chain[chain.len() - 1];
            anchor = roots
                .iter()
                .enumerate()
                .find(|(_, root)| same(root, top) || signed_by(top, root));
            match anchor {
                None => findings.push(BundleError::NoTrustedRoot),
                Some((index, root)) => {
                    let sound = signed_by(root, root) && is_ca(root.tbs_certificate());
                    // Not named twice: a certificate that is not self-issued is no root.
                    if !sound && !findings.contains(&BundleError::NotSelfIssued(index + 1)) {
                        findings.push(BundleError::BadAnchor(index + 1));
                    }
                    if let Some(expected) = expected_root
                        && !same(root, expected)
                    {
                        findings.push(BundleError::UnexpectedRoot {
                            anchor: fingerprint(root),
                            expected: fingerprint(expected),
                        });
                    }
                }
            }
        }
        for (index, cert) in chain.iter().enumerate() {
            let which = format!("{CERT_CHAIN} certificate {}", index + 1);
            findings.extend(check_time(which, cert, now).err());
        }
    }
    // Not when it closes cert-chain.pem: its dates were checked there.
    let anchor_in_chain = matches!((&chain, anchor), (Some(chain), Some((_, root)))
        if same(root, &chain[chain.len() - 1]));
    if let Some((_, root)) = anchor
        && !anchor_in_chain
    {
        let which = format!("the anchoring root in {ROOT_CERT}");
        findings.extend(check_time(which, root, now).err());
    }
    // The profile is checked against ca-cert.pem's issuer, where it is known: the next
    // certificate of cert-chain.pem once that one is shown to have signed it, or for a
    // chain of one the root found to have. Against another certificate it would name
    // problems ca-cert.pem has not.
    let starts_with_ca_cert = !findings.contains(&BundleError::ChainStart);
    let first_link_holds = !findings
        .iter()
        .any(|finding| matches!(finding, BundleError::ChainLink { index: 1, .. }));
    let issuer = match (&chain, anchor) {
        (Some(chain), _) if chain.len() > 1 => {
            (starts_with_ca_cert && first_link_holds).then(|| &chain[1])
        }
        (Some(chain), Some((_, root))) if starts_with_ca_cert && signed_by(&chain[0], root) => {
            Some(root)
        }
        _ => None,
    };
    if let (Some(ca_cert), Some(issuer)) = (&ca_cert, issuer)
        && let Err(e) =
            lint_intermediate_profile(ca_cert.tbs_certificate(), &subject_key_id(issuer))
    {
        findings.push(BundleError::Profile(e.0.join("; ")));
    }

    let (Some(ca_cert), Some(chain), Some(roots), Some((_, anchor)), true) =
        (&ca_cert, &chain, &roots, anchor, findings.is_empty())
    else {
        // Without a finding every file parsed and the chain found its anchor.
        if findings.is_empty() {
            findings.push(BundleError::NoTrustedRoot);
        }
        return Err(findings);
    };
    let tbs = ca_cert.tbs_certificate();
    Ok(BundleSummary {
        subject: tbs.subject().to_string(),
        issuer: tbs.issuer().to_string(),
        serial: serial_hex(tbs.serial_number()),
        key: describe_public_key(tbs.subject_public_key_info())
            .map(|k| k.to_string())
            .unwrap_or_else(|_| "unknown".into()),
        not_before: tbs.validity().not_before.to_system_time(),
        not_after: tbs.validity().not_after.to_system_time(),
        chain_length: chain.len(),
        root_fingerprints: roots.iter().map(fingerprint).collect(),
        anchor_fingerprint: fingerprint(anchor),
        anchor_not_after: anchor
            .tbs_certificate()
            .validity()
            .not_after
            .to_system_time(),
    })
}

/// A bundle `now` finds not valid yet ([`BundleError::NotYetValid`]: this clock behind the
/// signer's that issued it), verified at the latest notBefore of its certificates, as it
/// will stand once this clock reaches it: what it holds. None if it fails otherwise then.
pub fn verify_once_valid(files: &BundleFiles, now: SystemTime) -> Option<BundleSummary> {
    let mut at = now;
    // Each step moves to a later notBefore: a few certificates, a few steps.
    for _ in 0..16 {
        match verify_bundle(files, None, at) {
            Ok(summary) => return Some(summary),
            Err(BundleError::NotYetValid { not_before, .. }) if not_before > at => at = not_before,
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_key_out() {
        let files = BundleFiles {
            ca_cert: "CERT".into(),
            ca_key: "-----BEGIN PRIVATE KEY-----SECRET".into(),
            cert_chain: "CHAIN".into(),
            root_cert: "ROOT".into(),
        };
        let shown = format!("{files:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(
            shown.contains("CERT") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    /// An intermediate under `root` without keyUsage (outside meshca's profile), made by
    /// openssl: its certificate and key, PEM.
    fn openssl_intermediate_without_key_usage(
        root_key: &PrivateKey,
        root: &crate::pki::profile::RootCa,
    ) -> (String, String) {
        use crate::pki::testing::openssl;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("root.pem"), &root.pem).unwrap();
        std::fs::write(
            d.join("root.key"),
            root_key.to_pkcs8_pem().unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            d.join("ext"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "int.key",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "int.key",
                "-subj",
                "/O=org/CN=mesh",
                "-out",
                "int.csr",
            ],
        );
        openssl(
            d,
            &[
                "x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key", "-days",
                "1", "-extfile", "ext", "-out", "int.pem",
            ],
        );
        let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap();
        (read("int.pem"), read("int.key"))
    }

    /// A root of a day and a bundle under it valid from 5 minutes before `now` for an hour.
    fn bundle_at(now: SystemTime) -> (crate::pki::profile::RootCa, BundleFiles) {
        use crate::pki::keys::KeyType;
        use crate::pki::testing::{software_bundle, software_root};
        use std::time::Duration;
        let hour = Duration::from_secs(3600);
        let (root_key, root) = software_root(KeyType::EcdsaP256, "org", 24 * hour);
        let files = software_bundle(
            &root_key,
            &root,
            "org",
            "mesh",
            KeyType::EcdsaP256,
            now - Duration::from_secs(300),
            now + hour,
        );
        (root, files)
    }

    /// A broken link names how: another CA's certificate next, or the same name text in
    /// another string type (openssl links those; Go, and so istiod, does not).
    #[test]
    fn a_broken_link_in_the_chain_says_how_the_names_differ() {
        use crate::pki::keys::KeyType;
        use crate::pki::profile::subject_name;
        use der::Tag;
        use der::asn1::Any;
        use std::time::Duration;
        use x509_cert::attr::AttributeTypeAndValue;
        use x509_cert::name::{RdnSequence, RelativeDistinguishedName};

        let now = SystemTime::now();
        let (_, files) = bundle_at(now);
        let (_, other) = crate::pki::testing::software_root(
            KeyType::EcdsaP256,
            "other",
            Duration::from_secs(3600),
        );
        let wrong_next = BundleFiles {
            cert_chain: format!("{}{}", files.ca_cert, other.pem),
            ..files.clone()
        };
        assert_eq!(
            verify_bundle(&wrong_next, None, now)
                .unwrap_err()
                .to_string(),
            "cert-chain.pem: certificate 1 is not signed by certificate 2: its issuer (CN=test root,O=org) is not the next one's subject (CN=test root,O=other)"
        );

        let printable = |org: &str, cn: &str| {
            let mut rdns = RdnSequence::default();
            for (oid, value) in [
                (const_oid::db::rfc4519::O, org),
                (const_oid::db::rfc4519::CN, cn),
            ] {
                let mut rdn = RelativeDistinguishedName::default();
                rdn.insert(AttributeTypeAndValue {
                    oid,
                    value: Any::new(Tag::PrintableString, value.as_bytes()).unwrap(),
                })
                .unwrap();
                rdns.push(rdn);
            }
            <Name as der::Decode>::from_der(&der::Encode::to_der(&rdns).unwrap()).unwrap()
        };
        let utf8 = subject_name("acme", "acme root").unwrap();
        assert_eq!(names_apart(&utf8, &utf8), None);
        assert_eq!(
            names_apart(&utf8, &printable("acme", "acme root")).unwrap(),
            "its issuer reads as the next one's subject (CN=acme root,O=acme) but is encoded otherwise (another string type): Go, and so istiod, matches names byte for byte"
        );
    }

    /// Every problem is found, in [`verify_bundle`]'s order (its error is the first); a
    /// file that does not parse leaves out only the checks that need it.
    #[test]
    fn check_bundle_names_every_problem_in_order() {
        use std::time::Duration;
        let now = SystemTime::now();
        let (_root, files) = bundle_at(now);
        assert!(check_bundle(&files, None, now).is_ok());
        let (_, other) = bundle_at(now);
        let later = now + Duration::from_secs(2 * 3600);
        let another_key = BundleFiles {
            ca_key: other.ca_key.clone(),
            ..files.clone()
        };
        let findings = check_bundle(&another_key, None, later).unwrap_err();
        assert!(
            matches!(
                findings.as_slice(),
                [BundleError::KeyMismatch, BundleError::Expired { which, .. }]
                    if which == "cert-chain.pem certificate 1"
            ),
            "{findings:?}"
        );
        assert_eq!(
            verify_bundle(&another_key, None, later).unwrap_err(),
            BundleError::KeyMismatch
        );
        let unreadable_key_and_roots = BundleFiles {
            ca_key: "not a key".into(),
            root_cert: files.ca_cert.clone(),
            ..files.clone()
        };
        let findings = check_bundle(&unreadable_key_and_roots, None, later).unwrap_err();
        assert!(
            matches!(
                findings.as_slice(),
                [
                    BundleError::File { file: CA_KEY, .. },
                    BundleError::NotSelfIssued(1),
                    BundleError::NoTrustedRoot,
                    BundleError::Expired { .. },
                ]
            ),
            "{findings:?}"
        );
    }

    /// Nothing named twice, nor a problem ca-cert.pem does not have: the root that closes
    /// cert-chain.pem is dated once, and the profile is not checked against a certificate
    /// that is not ca-cert.pem's issuer.
    #[test]
    fn check_bundle_names_each_problem_once_and_none_it_has_not() {
        use std::time::Duration;
        let now = SystemTime::now();
        let (_root, files) = bundle_at(now);
        let (root_key, root) = crate::pki::testing::software_root(
            crate::pki::keys::KeyType::EcdsaP256,
            "org",
            Duration::from_secs(24 * 3600),
        );
        // Two days on the root (of a day) has expired too: in cert-chain.pem, and that is
        // the anchor in root-cert.pem.
        let findings =
            check_bundle(&files, None, now + Duration::from_secs(48 * 3600)).unwrap_err();
        let named: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
        assert!(
            matches!(
                findings.as_slice(),
                [BundleError::Expired { which: first, .. }, BundleError::Expired { which: second, .. }]
                    if first == "cert-chain.pem certificate 1" && second == "cert-chain.pem certificate 2"
            ),
            "{named:?}"
        );
        // ca-cert.pem chained to another root: the link is named, not the profile against
        // that root (whose key identifier is not the one ca-cert.pem names).
        let (other_root, _) = bundle_at(now);
        let misplaced = BundleFiles {
            cert_chain: format!("{}{}", files.ca_cert, other_root.pem),
            root_cert: other_root.pem.clone(),
            ..files.clone()
        };
        let findings = check_bundle(&misplaced, None, now).unwrap_err();
        assert!(
            matches!(
                findings.as_slice(),
                [BundleError::ChainLink {
                    index: 1,
                    next: 2,
                    ..
                }]
            ),
            "{findings:?}"
        );
        // A ca-cert.pem outside the profile, whose issuer is cert-chain.pem's next, chained
        // to a root root-cert.pem lacks: both are named (the profile is checked against
        // that issuer, which signed it).
        let (ca_cert, ca_key) = openssl_intermediate_without_key_usage(&root_key, &root);
        let (_, unrelated) = crate::pki::testing::software_root(
            crate::pki::keys::KeyType::EcdsaP256,
            "org",
            Duration::from_secs(24 * 3600),
        );
        let unanchored = BundleFiles {
            cert_chain: format!("{ca_cert}{}", root.pem),
            ca_cert,
            ca_key,
            root_cert: unrelated.pem.clone(),
        };
        // Checked once it is valid: openssl dates it from its own now, which may be in the
        // second after the test's `now` (it was then "not valid yet" by a few milliseconds).
        let issued = SystemTime::now();
        let findings = check_bundle(&unanchored, None, issued).unwrap_err();
        assert!(
            matches!(
                findings.as_slice(),
                [BundleError::NoTrustedRoot, BundleError::Profile(_)]
            ),
            "{findings:?}"
        );
        // An intermediate anchoring the chain from root-cert.pem: not self-issued, said once.
        let intermediate_as_root = BundleFiles {
            cert_chain: files.ca_cert.clone(),
            root_cert: files.ca_cert.clone(),
            ..files.clone()
        };
        let findings = check_bundle(&intermediate_as_root, None, now).unwrap_err();
        assert_eq!(findings, [BundleError::NotSelfIssued(1)]);
    }

    /// A root istiod cannot read (a negative serial: Go refuses to parse it, and leaves it
    /// out of root-cert.pem's pool without a word) is named, not called valid as openssl
    /// would.
    #[test]
    fn a_certificate_with_a_negative_serial_is_named_in_any_file() {
        let now = SystemTime::now();
        let (root, files) = bundle_at(now);
        verify_bundle(&files, None, now).unwrap();
        let negative =
            crate::pki::testing::openssl_root(&["-sha256", "-set_serial", "-0x4F1E2D3C4B5A6978"]);
        let with_negative_root = BundleFiles {
            root_cert: format!("{}{negative}", root.pem),
            ..files.clone()
        };
        assert_eq!(
            verify_bundle(&with_negative_root, None, now)
                .unwrap_err()
                .to_string(),
            format!("root-cert.pem: certificate 2: {NEGATIVE_SERIAL}")
        );
    }

    #[test]
    fn only_the_anchor_must_verify_and_every_other_root_be_self_issued() {
        use crate::pki::pem::certificate_pem;
        use der::Decode;
        let now = SystemTime::now();
        let (root, files) = bundle_at(now);
        // Another certificate than a root beside the anchor.
        let with_intermediate = BundleFiles {
            root_cert: format!("{}{}", root.pem, files.ca_cert),
            ..files.clone()
        };
        assert_eq!(
            verify_bundle(&with_intermediate, None, now),
            Err(BundleError::NotSelfIssued(2))
        );
        // The anchor with its self-signature broken (the last byte of its signature).
        let mut der = root.certificate.to_der().unwrap();
        *der.last_mut().unwrap() ^= 1;
        let broken = certificate_pem(&Certificate::from_der(&der).unwrap());
        let broken_anchor = BundleFiles {
            root_cert: broken,
            ..files.clone()
        };
        assert_eq!(
            verify_bundle(&broken_anchor, None, now),
            Err(BundleError::BadAnchor(1))
        );
    }

    /// Outside its validity a bundle is said to be expired (with when) or not valid yet,
    /// with what this clock reads; only one just issued blames this clock (an installed
    /// bundle, or one given to `meshca verify`, usually simply expired).
    #[test]
    fn a_bundle_outside_its_validity_names_this_clock_and_a_fresh_one_blames_it() {
        use crate::pki::datetime::rfc3339;
        use std::time::Duration;
        let hour = Duration::from_secs(3600);
        let now = SystemTime::now();
        let (_root, files) = bundle_at(now);
        let clock_behind = now - Duration::from_secs(600);
        let early = verify_bundle(&files, None, clock_behind).unwrap_err();
        let said = early.to_string();
        assert!(
            said.contains(&format!(
                "this machine's clock reads {}",
                rfc3339(clock_behind)
            )) && said.contains("is not valid yet")
                && !said.contains("just issued"),
            "{said}"
        );
        let said = early.just_issued().to_string();
        assert!(said.contains("clock is behind the signer's"), "{said}");

        let expired = verify_bundle(&files, None, now + 2 * hour).unwrap_err();
        let said = expired.to_string();
        let not_after = match &expired {
            BundleError::Expired { not_after, .. } => *not_after,
            other => panic!("{other:?}"),
        };
        assert!(
            said.contains(&format!("expired at {}", rfc3339(not_after)))
                && said.contains("this machine's clock reads")
                && !said.contains("just issued")
                && !said.contains("ahead")
                && !said.contains("behind"),
            "{said}"
        );
        let said = expired.just_issued().to_string();
        assert!(
            said.contains("just issued") && said.contains("clock is ahead of the signer's"),
            "{said}"
        );
        verify_bundle(&files, None, now).unwrap();
        // A clock set before 1970 is said as a date, not as Rust's `SystemTime { .. }`.
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(315_619_200);
        let set_back = verify_bundle(&files, None, before_1970)
            .unwrap_err()
            .to_string();
        assert!(
            set_back.contains("this machine's clock reads 1960-01-01T00:00:00.000Z"),
            "{set_back}"
        );
    }
}
