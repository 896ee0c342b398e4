//! Lint before sign: every TBSCertificate meshca is about to have signed (and every
//! certificate a backend hands back) is checked against RFC 5280 basics and the policy.
//! A finding stops issuance; nothing is ever signed on a guess.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use const_oid::AssociatedOid;
use der::Encode;
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::TbsCertificate;
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::constraints::name::NameConstraints;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::time::Time;

use super::profile::{
    IntermediatePlan, NEGATIVE_SERIAL, ROOT_PATH_LEN, RootCa, intermediate_key_usage,
    is_negative_serial, root_key_usage,
};
use super::sigalg::SignatureAlgorithm;
use crate::policy::rules::check_public_key;

/// Everything found wrong with a TBS. Empty never escapes: see [`Findings::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintFailure(pub Vec<String>);

impl fmt::Display for LintFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate failed lint: {}", self.0.join("; "))
    }
}

impl std::error::Error for LintFailure {}

#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, finding: impl FnOnce() -> String) {
        if !ok {
            self.0.push(finding());
        }
    }

    fn finish(self) -> Result<(), LintFailure> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(LintFailure(self.0))
        }
    }
}

/// What an intermediate must look like.
pub struct IntermediateExpectations<'a> {
    pub root: &'a RootCa,
    /// The CSR's key: the only thing taken from the request.
    pub public_key: &'a SubjectPublicKeyInfoOwned,
    pub org_name: &'a str,
    /// Latest acceptable notAfter (policy ttl and root expiry already applied).
    pub latest_not_after: SystemTime,
    pub min_rsa_bits: u32,
    /// The virtual mesh's trust domains: exactly the URI hosts the name constraints must
    /// permit (empty: no name constraints).
    pub trust_domains: &'a [String],
    /// When meshca built the TBS itself, the exact plan it must match.
    pub plan: Option<&'a IntermediatePlan>,
}

/// Lints an intermediate's TBS against the profile and policy.
pub fn lint_intermediate(
    tbs: &TbsCertificate,
    expect: &IntermediateExpectations<'_>,
) -> Result<(), LintFailure> {
    let mut f = Findings::default();
    common_checks(tbs, &mut f);
    let root = expect.root;
    f.check(
        *tbs.signature() == root.signature_algorithm.algorithm_identifier(),
        || {
            format!(
                "signature algorithm is not the root's ({})",
                root.signature_algorithm
            )
        },
    );
    f.check(same_der(tbs.issuer(), &root.subject), || {
        format!(
            "issuer {} is not the root's subject {}",
            tbs.issuer(),
            root.subject
        )
    });
    f.check(
        same_der(tbs.subject_public_key_info(), expect.public_key),
        || "subject public key is not the CSR's key".into(),
    );
    let not_after = tbs.validity().not_after.to_system_time();
    f.check(not_after <= expect.latest_not_after, || {
        "notAfter is later than the policy allows".into()
    });
    f.check(not_after <= root.not_after, || {
        "notAfter is later than the root's notAfter".into()
    });
    check_org(tbs, expect.org_name, &mut f);
    if let Ok(kind) = super::keys::describe_public_key(tbs.subject_public_key_info()) {
        if let Err(denial) = check_public_key(&kind, expect.min_rsa_bits) {
            f.0.push(format!("subject key fails policy: {}", denial.message));
        }
    } else {
        f.0.push("subject public key is malformed".into());
    }
    check_extensions(
        tbs,
        &ExpectedExtensions {
            path_len: 0,
            key_usage: intermediate_key_usage(),
            authority_key_id: &root.subject_key_id,
            name_constraints: ExpectedConstraints::Exactly(expect.trust_domains),
        },
        &mut f,
    );
    if let Some(plan) = expect.plan {
        check_plan(tbs, plan, &mut f);
    }
    f.finish()
}

/// Lints a self-signed root's TBS.
pub fn lint_root(
    tbs: &TbsCertificate,
    plan: &IntermediatePlan,
    algorithm: SignatureAlgorithm,
    org_name: &str,
    min_rsa_bits: u32,
) -> Result<(), LintFailure> {
    let mut f = Findings::default();
    common_checks(tbs, &mut f);
    f.check(*tbs.signature() == algorithm.algorithm_identifier(), || {
        format!("signature algorithm is not {algorithm}")
    });
    f.check(same_der(tbs.issuer(), tbs.subject()), || {
        "root issuer differs from its subject".into()
    });
    check_org(tbs, org_name, &mut f);
    match super::keys::describe_public_key(tbs.subject_public_key_info()) {
        Ok(kind) => {
            if let Err(denial) = check_public_key(&kind, min_rsa_bits) {
                f.0.push(format!("root key fails policy: {}", denial.message));
            }
        }
        Err(e) => f.0.push(format!("root key is malformed: {e}")),
    }
    let ski = tbs
        .get_extension::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, s)| s.0.as_bytes().to_vec())
        .unwrap_or_default();
    check_extensions(
        tbs,
        &ExpectedExtensions {
            path_len: ROOT_PATH_LEN,
            key_usage: root_key_usage(),
            authority_key_id: &ski,
            name_constraints: ExpectedConstraints::Exactly(&[]),
        },
        &mut f,
    );
    check_plan(tbs, plan, &mut f);
    f.finish()
}

fn same_der<T: Encode>(a: &T, b: &T) -> bool {
    matches!((a.to_der(), b.to_der()), (Ok(x), Ok(y)) if x == y)
}

/// Version, serial, unique identifiers, validity order and time encodings.
fn common_checks(tbs: &TbsCertificate, f: &mut Findings) {
    f.check(tbs.version() == Version::V3, || "version is not v3".into());
    let serial = tbs.serial_number().as_bytes();
    f.check(!serial.is_empty() && serial.iter().any(|b| *b != 0), || {
        "serial number is zero".into()
    });
    f.check(!is_negative_serial(tbs.serial_number()), || {
        NEGATIVE_SERIAL.into()
    });
    f.check(serial.len() <= 20, || {
        "serial number is longer than 20 octets".into()
    });
    // At least 64 bits of entropy (CA/B Forum ballot 164) means at least 8 octets.
    f.check(serial.len() >= 8, || {
        "serial number is shorter than 8 octets".into()
    });
    f.check(
        tbs.issuer_unique_id().is_none() && tbs.subject_unique_id().is_none(),
        || "unique identifiers must not be present (RFC 5280 4.1.2.8)".into(),
    );
    let validity = tbs.validity();
    f.check(
        validity.not_before.to_system_time() < validity.not_after.to_system_time(),
        || "notBefore is not before notAfter".into(),
    );
    for (name, time) in [
        ("notBefore", &validity.not_before),
        ("notAfter", &validity.not_after),
    ] {
        let year = time.to_date_time().year();
        let utc = matches!(time, Time::UtcTime(_));
        f.check(utc == (year < 2050), || {
            format!(
                "{name} in {year} must be encoded as {}",
                if year < 2050 {
                    "UTCTime"
                } else {
                    "GeneralizedTime"
                }
            )
        });
    }
    f.check(!tbs.subject().is_empty(), || "subject is empty".into());
    check_subject_bounds(tbs.subject(), f);
}

/// The X.520 bounds (RFC 5280 appendix A) of the attributes meshca's names carry:
/// commonName and organizationName, 1 to 64 characters. Strict parsers refuse a longer
/// or empty value, and a root's subject is the issuer of every certificate under it.
fn check_subject_bounds(subject: &Name, f: &mut Findings) {
    const MAX_CHARS: usize = super::profile::MAX_COMMON_NAME;
    for atv in subject.iter_rdn().flat_map(|rdn| rdn.iter()) {
        let attribute = match atv.oid {
            const_oid::db::rfc4519::CN => "commonName",
            const_oid::db::rfc4519::O => "organizationName",
            _ => continue,
        };
        let Ok(text) = atv
            .value
            .decode_as::<x509_cert::ext::pkix::name::DirectoryString>()
        else {
            f.check(false, || format!("subject {attribute} is not a string"));
            continue;
        };
        let chars = String::from(text).chars().count();
        f.check((1..=MAX_CHARS).contains(&chars), || {
            format!("subject {attribute} has {chars} characters; X.520 allows 1 to {MAX_CHARS}")
        });
    }
}

fn check_org(tbs: &TbsCertificate, org_name: &str, f: &mut Findings) {
    let orgs: Vec<String> = tbs
        .subject()
        .iter()
        .filter(|atv| atv.oid == const_oid::db::rfc4519::O)
        .map(|atv| {
            atv.value
                .decode_as::<x509_cert::ext::pkix::name::DirectoryString>()
                .map(String::from)
                .unwrap_or_default()
        })
        .collect();
    f.check(orgs.len() == 1 && orgs[0] == org_name, || {
        format!("subject organization is {orgs:?}, policy requires exactly {org_name:?}")
    });
}

struct ExpectedExtensions<'a> {
    path_len: u8,
    key_usage: KeyUsage,
    authority_key_id: &'a [u8],
    name_constraints: ExpectedConstraints<'a>,
}

/// The name constraints a CA certificate may carry.
enum ExpectedConstraints<'a> {
    /// Permitted URI subtrees of exactly these trust domains; none when empty (what the
    /// signer issues, and a root).
    Exactly(&'a [String]),
    /// None, or meshca's shape with any trust domains: an installed intermediate, checked
    /// by an agent or `meshca verify`, which do not know the signer's policy.
    TrustDomainsOnly,
}

/// Exactly four extensions, each once: basicConstraints (critical, CA, path length),
/// keyUsage (critical, the profile's bits), SKI (non-empty) and AKI (key id only); and
/// for an intermediate under a virtual mesh with trust domains, nameConstraints.
fn check_extensions(tbs: &TbsCertificate, expect: &ExpectedExtensions<'_>, f: &mut Findings) {
    let constrained = !matches!(expect.name_constraints, ExpectedConstraints::Exactly(&[]));
    let mut allowed = vec![
        BasicConstraints::OID,
        KeyUsage::OID,
        SubjectKeyIdentifier::OID,
        AuthorityKeyIdentifier::OID,
    ];
    if constrained {
        allowed.push(NameConstraints::OID);
    }
    let extensions = tbs.extensions().map(|e| e.as_slice()).unwrap_or_default();
    let mut seen = HashSet::new();
    for ext in extensions {
        f.check(seen.insert(ext.extn_id), || {
            format!("extension {} appears twice", ext.extn_id)
        });
        f.check(allowed.contains(&ext.extn_id), || {
            format!("unexpected extension {} (the profile has only basicConstraints, keyUsage, SKI and AKI, and nameConstraints for an intermediate under a virtual mesh with trustDomains)", ext.extn_id)
        });
    }
    if constrained {
        check_name_constraints(tbs, &expect.name_constraints, f);
    }
    match tbs.get_extension::<BasicConstraints>() {
        Ok(Some((critical, bc))) => {
            f.check(critical, || "basicConstraints is not critical".into());
            f.check(bc.ca, || "basicConstraints cA is not true".into());
            f.check(bc.path_len_constraint == Some(expect.path_len), || {
                format!(
                    "pathLenConstraint is {:?}, expected {}",
                    bc.path_len_constraint, expect.path_len
                )
            });
        }
        _ => f.0.push("basicConstraints is missing or malformed".into()),
    }
    match tbs.get_extension::<KeyUsage>() {
        Ok(Some((critical, ku))) => {
            f.check(critical, || "keyUsage is not critical".into());
            f.check(ku == expect.key_usage, || {
                format!("keyUsage is {:?}, expected {:?}", ku.0, expect.key_usage.0)
            });
            f.check(ku.key_cert_sign(), || {
                "keyUsage lacks keyCertSign for a CA".into()
            });
        }
        _ => f.0.push("keyUsage is missing or malformed".into()),
    }
    match tbs.get_extension::<SubjectKeyIdentifier>() {
        Ok(Some((critical, ski))) => {
            f.check(!critical, || {
                "subjectKeyIdentifier must not be critical".into()
            });
            f.check(!ski.0.as_bytes().is_empty(), || {
                "subjectKeyIdentifier is empty".into()
            });
        }
        _ => {
            f.0.push("subjectKeyIdentifier is missing or malformed".into())
        }
    }
    match tbs.get_extension::<AuthorityKeyIdentifier>() {
        Ok(Some((critical, aki))) => {
            f.check(!critical, || {
                "authorityKeyIdentifier must not be critical".into()
            });
            f.check(
                aki.key_identifier.as_ref().map(|k| k.as_bytes()) == Some(expect.authority_key_id),
                || "authorityKeyIdentifier does not match the issuer's subjectKeyIdentifier".into(),
            );
            f.check(
                aki.authority_cert_issuer.is_none() && aki.authority_cert_serial_number.is_none(),
                || "authorityKeyIdentifier carries issuer name or serial".into(),
            );
        }
        _ => {
            f.0.push("authorityKeyIdentifier is missing or malformed".into())
        }
    }
}

/// meshca's name constraints: critical, permitted subtrees only, each a URI host that is a
/// trust domain Go can parse, with no minimum or maximum; for the signer's own check,
/// exactly the policy's trust domains.
fn check_name_constraints(
    tbs: &TbsCertificate,
    expect: &ExpectedConstraints<'_>,
    f: &mut Findings,
) {
    let (critical, constraints) = match tbs.get_extension::<NameConstraints>() {
        Ok(Some(found)) => found,
        Ok(None) => {
            if let ExpectedConstraints::Exactly(domains) = expect {
                f.0.push(format!(
                    "nameConstraints is missing; the virtual mesh permits only the trust domains {}",
                    domains.join(", ")
                ));
            }
            return;
        }
        Err(_) => {
            f.0.push("nameConstraints is malformed".into());
            return;
        }
    };
    f.check(critical, || "nameConstraints is not critical".into());
    f.check(constraints.excluded_subtrees.is_none(), || {
        "nameConstraints has excluded subtrees (meshca permits trust domains only)".into()
    });
    let subtrees = constraints.permitted_subtrees.unwrap_or_default();
    f.check(!subtrees.is_empty(), || {
        "nameConstraints permits no subtree".into()
    });
    let mut hosts = Vec::new();
    for subtree in &subtrees {
        f.check(subtree.minimum == 0 && subtree.maximum.is_none(), || {
            "a nameConstraints subtree has a minimum or maximum".into()
        });
        match &subtree.base {
            GeneralName::UniformResourceIdentifier(host) => {
                let host = host.as_str();
                f.check(crate::mesh::names::is_constraint_trust_domain(host), || {
                    format!("nameConstraints permits URI host {host:?}, which is not a trust domain")
                });
                hosts.push(host.to_string());
            }
            other => f.0.push(format!(
                "nameConstraints constrains a name other than a URI ({}): meshca constrains workload URIs only, so istiod's DNS-named certificates stay valid",
                general_name_type(other)
            )),
        }
    }
    if let ExpectedConstraints::Exactly(domains) = expect {
        hosts.sort();
        f.check(hosts == *domains, || {
            format!(
                "nameConstraints permits the trust domains {}, the virtual mesh {}",
                hosts.join(", "),
                domains.join(", ")
            )
        });
    }
}

/// A GeneralName's type, as RFC 5280 names it.
fn general_name_type(name: &GeneralName) -> &'static str {
    match name {
        GeneralName::OtherName(_) => "otherName",
        GeneralName::Rfc822Name(_) => "rfc822Name",
        GeneralName::DnsName(_) => "dNSName",
        GeneralName::DirectoryName(_) => "directoryName",
        GeneralName::EdiPartyName(_) => "ediPartyName",
        GeneralName::UniformResourceIdentifier(_) => "uniformResourceIdentifier",
        GeneralName::IpAddress(_) => "iPAddress",
        GeneralName::RegisteredId(_) => "registeredID",
    }
}

/// The TBS must carry exactly what was planned.
fn check_plan(tbs: &TbsCertificate, plan: &IntermediatePlan, f: &mut Findings) {
    f.check(*tbs.serial_number() == plan.serial, || {
        "serial differs from the plan".into()
    });
    f.check(same_der(tbs.subject(), &plan.subject), || {
        "subject differs from the plan".into()
    });
    f.check(
        same_der(tbs.subject_public_key_info(), &plan.public_key),
        || "public key differs from the plan".into(),
    );
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let validity = tbs.validity();
    f.check(
        secs(validity.not_before.to_system_time()) == secs(plan.not_before)
            && secs(validity.not_after.to_system_time()) == secs(plan.not_after),
        || "validity differs from the plan".into(),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum SignedCheckError {
    #[error("signed certificate does not parse: {0}")]
    Parse(String),
    #[error("signed certificate does not carry the TBS bytes that were linted")]
    TbsChanged,
    #[error("signed certificate's signature does not verify with the root public key: {0}")]
    Signature(#[from] super::sigalg::SignatureError),
}

/// After the token signs: the certificate must parse, carry byte for byte the TBS that
/// was linted, and verify under the root's public key. Only then is it handed out.
pub fn check_signed_certificate(
    cert_der: &[u8],
    linted_tbs: &[u8],
    root: &RootCa,
) -> Result<x509_cert::Certificate, SignedCheckError> {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| SignedCheckError::Parse(e.to_string()))?;
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| SignedCheckError::Parse(e.to_string()))?;
    if tbs != linted_tbs {
        return Err(SignedCheckError::TbsChanged);
    }
    // The TBS is byte for byte the linted one, so verify over those bytes directly.
    let algorithm = super::sigalg::SignatureAlgorithm::from_identifier(cert.signature_algorithm())?;
    let signature = cert
        .signature()
        .as_bytes()
        .ok_or(super::sigalg::SignatureError::Invalid)?;
    root.verifier.verify(algorithm, linted_tbs, signature)?;
    Ok(cert)
}

/// A root certificate meshca did not build itself (made by Vault, or an existing issuer
/// being adopted): meshca's root profile (exactly basicConstraints CA with pathlen 1,
/// keyUsage keyCertSign + cRLSign, SKI, AKI = SKI), self-issued, the policy's org and key
/// rule, and a lifetime of at most `max_lifetime` (plus [`ROOT_LIFETIME_SLACK`] for the
/// backdating issuers do). Serial and exact validity are the issuer's choice.
pub fn lint_root_profile(
    tbs: &TbsCertificate,
    org_name: &str,
    min_rsa_bits: u32,
    max_lifetime: Duration,
) -> Result<(), LintFailure> {
    let mut f = Findings::default();
    common_checks(tbs, &mut f);
    f.check(same_der(tbs.issuer(), tbs.subject()), || {
        "root issuer differs from its subject".into()
    });
    f.check(
        SignatureAlgorithm::from_identifier(tbs.signature()).is_ok(),
        || {
            format!(
                "signature algorithm {} is not one meshca verifies (it verifies {})",
                super::oids::Named(&tbs.signature().oid),
                super::sigalg::SUPPORTED_ALGORITHMS
            )
        },
    );
    check_org(tbs, org_name, &mut f);
    match super::keys::describe_public_key(tbs.subject_public_key_info()) {
        Ok(kind) => {
            if let Err(denial) = check_public_key(&kind, min_rsa_bits) {
                f.0.push(format!("root key fails policy: {}", denial.message));
            }
        }
        Err(e) => f.0.push(format!("root key is malformed: {e}")),
    }
    let validity = tbs.validity();
    let lifetime = validity
        .not_after
        .to_system_time()
        .duration_since(validity.not_before.to_system_time())
        .unwrap_or_default();
    f.check(lifetime <= max_lifetime + ROOT_LIFETIME_SLACK, || {
        format!(
            "root lifetime is {}s, the policy allows at most {}s",
            lifetime.as_secs(),
            max_lifetime.as_secs()
        )
    });
    let ski = tbs
        .get_extension::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, s)| s.0.as_bytes().to_vec())
        .unwrap_or_default();
    check_extensions(
        tbs,
        &ExpectedExtensions {
            path_len: ROOT_PATH_LEN,
            key_usage: root_key_usage(),
            authority_key_id: &ski,
            name_constraints: ExpectedConstraints::Exactly(&[]),
        },
        &mut f,
    );
    f.finish()
}

/// How much longer than the policy's ttl a root made elsewhere may live: issuers backdate
/// notBefore (Vault by 30 s, meshca by [`BACKDATE`](crate::policy::rules::BACKDATE)).
pub const ROOT_LIFETIME_SLACK: Duration = Duration::from_secs(10 * 60);

/// The subject must carry the expected attributes, in the expected order, with the same
/// values. For certificates meshca did not encode itself (Vault's): Go writes
/// PrintableString where meshca writes UTF8String, so values are compared as text, not
/// as DER. Nothing else about the subject may differ.
pub fn check_subject_values(tbs: &TbsCertificate, expected: &Name) -> Result<(), LintFailure> {
    let mut f = Findings::default();
    let actual = subject_values(tbs.subject());
    let wanted = subject_values(expected);
    f.check(actual.is_some() && actual == wanted, || {
        format!("subject is {}, expected {expected}", tbs.subject())
    });
    f.finish()
}

/// Each RDN of a name as its (OID, text) pairs, or `None` if a value is not a string.
pub(crate) type NameValues = Vec<Vec<(const_oid::ObjectIdentifier, String)>>;

pub(crate) fn subject_values(name: &Name) -> Option<NameValues> {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    atv.value
                        .decode_as::<x509_cert::ext::pkix::name::DirectoryString>()
                        .ok()
                        .map(|text| (atv.oid, String::from(text)))
                })
                .collect()
        })
        .collect()
}

/// The profile checks alone (no policy): RFC 5280 basics plus meshca's intermediate
/// extensions, with the issuer's key identifier. Used to check installed bundles.
pub fn lint_intermediate_profile(
    tbs: &TbsCertificate,
    issuer_key_id: &[u8],
) -> Result<(), LintFailure> {
    let mut f = Findings::default();
    common_checks(tbs, &mut f);
    check_extensions(
        tbs,
        &ExpectedExtensions {
            path_len: 0,
            key_usage: intermediate_key_usage(),
            authority_key_id: issuer_key_id,
            name_constraints: ExpectedConstraints::TrustDomainsOnly,
        },
        &mut f,
    );
    f.finish()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use x509_cert::builder::{Builder, CertificateBuilder, Profile as BuilderProfile};
    use x509_cert::ext::Extension;
    use x509_cert::ext::pkix::{SubjectAltName, name::GeneralName};
    use x509_cert::name::Name;
    use x509_cert::time::Validity;

    use super::*;
    use crate::pki::keys::{KeyType, PrivateKey};
    use crate::pki::profile::{decode_tbs, intermediate_tbs, random_serial, subject_name};
    use crate::pki::testing::software_root;

    const DAY: Duration = Duration::from_secs(86_400);

    fn plan_for(key: &PrivateKey, org: &str) -> IntermediatePlan {
        let now = SystemTime::now();
        IntermediatePlan {
            subject: subject_name(org, "mesh").unwrap(),
            public_key: key.public_key_info().unwrap(),
            serial: random_serial().unwrap(),
            not_before: now - Duration::from_secs(300),
            not_after: now + 10 * DAY,
        }
    }

    #[test]
    fn the_profile_passes_its_own_lint() {
        for root_type in [KeyType::EcdsaP384, KeyType::Rsa2048] {
            let (_root_key, root) = software_root(root_type, "acme", 100 * DAY);
            let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let plan = plan_for(&key, "acme");
            let tbs = decode_tbs(&intermediate_tbs(&plan, &root, &[]).unwrap()).unwrap();
            let expect = IntermediateExpectations {
                root: &root,
                public_key: &plan.public_key,
                org_name: "acme",
                latest_not_after: plan.not_after,
                min_rsa_bits: 2048,
                trust_domains: &[],
                plan: Some(&plan),
            };
            lint_intermediate(&tbs, &expect).unwrap();
        }
    }

    #[test]
    fn a_name_over_the_x520_bounds_is_a_finding() {
        let (_root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        // subject_name cuts a long common name, so the name is made by hand.
        let name = |org: &str, cn: &str| {
            <Name as std::str::FromStr>::from_str(&format!("CN={cn},O={org}")).unwrap()
        };
        for (subject, needle) in [
            (
                name("acme", &"n".repeat(65)),
                "subject commonName has 65 characters",
            ),
            (
                name(&"o".repeat(65), "mesh"),
                "subject organizationName has 65 characters",
            ),
        ] {
            let plan = IntermediatePlan {
                subject,
                ..plan_for(&key, "acme")
            };
            let tbs = decode_tbs(&intermediate_tbs(&plan, &root, &[]).unwrap()).unwrap();
            let failure = lint_intermediate_profile(&tbs, &root.subject_key_id).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
        }
        let plan = IntermediatePlan {
            subject: name(&"o".repeat(64), &"é".repeat(64)),
            ..plan_for(&key, "acme")
        };
        let tbs = decode_tbs(&intermediate_tbs(&plan, &root, &[]).unwrap()).unwrap();
        lint_intermediate_profile(&tbs, &root.subject_key_id).unwrap();
    }

    #[test]
    fn each_expectation_that_does_not_hold_is_a_finding() {
        let (_root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let other_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let other_spki = other_key.public_key_info().unwrap();
        let plan = plan_for(&key, "acme");
        let tbs = decode_tbs(&intermediate_tbs(&plan, &root, &[]).unwrap()).unwrap();
        let base = || IntermediateExpectations {
            root: &root,
            public_key: &plan.public_key,
            org_name: "acme",
            latest_not_after: plan.not_after,
            min_rsa_bits: 2048,
            trust_domains: &[],
            plan: None,
        };
        let cases: Vec<(IntermediateExpectations<'_>, &str)> = vec![
            (
                IntermediateExpectations {
                    org_name: "other",
                    ..base()
                },
                "organization",
            ),
            (
                IntermediateExpectations {
                    latest_not_after: plan.not_after - DAY,
                    ..base()
                },
                "later than the policy",
            ),
            (
                IntermediateExpectations {
                    min_rsa_bits: 4096,
                    ..base()
                },
                "fails policy",
            ),
            (
                IntermediateExpectations {
                    public_key: &other_spki,
                    ..base()
                },
                "not the CSR's key",
            ),
        ];
        for (expect, needle) in cases {
            let failure = lint_intermediate(&tbs, &expect).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
        }
    }

    /// A profile that gets things wrong, to prove the linter notices.
    struct Rogue {
        subject: Name,
        issuer: Name,
        extensions: Vec<Extension>,
    }

    impl BuilderProfile for Rogue {
        fn get_issuer(&self, _subject: &Name) -> Name {
            self.issuer.clone()
        }
        fn get_subject(&self) -> Name {
            self.subject.clone()
        }
        fn build_extensions(
            &self,
            _spk: spki::SubjectPublicKeyInfoRef<'_>,
            _issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
            _tbs: &TbsCertificate,
        ) -> x509_cert::builder::Result<Vec<Extension>> {
            Ok(self.extensions.clone())
        }
    }

    /// The TBS of an intermediate for `plan` under `root` with `extensions` exactly, as a
    /// [`Rogue`] profile builds it.
    fn rogue_tbs(
        plan: &IntermediatePlan,
        root: &RootCa,
        root_signer: &p384::ecdsa::SigningKey,
        extensions: Vec<Extension>,
    ) -> TbsCertificate {
        let profile = Rogue {
            subject: plan.subject.clone(),
            issuer: root.subject.clone(),
            extensions,
        };
        let validity = Validity::new(
            plan.not_before.try_into().unwrap(),
            plan.not_after.try_into().unwrap(),
        );
        let mut builder = CertificateBuilder::new(
            profile,
            plan.serial.clone(),
            validity,
            plan.public_key.clone(),
        )
        .unwrap();
        decode_tbs(&builder.finalize(root_signer).unwrap()).unwrap()
    }

    fn ext<E: const_oid::AssociatedOid + der::Encode>(value: &E, critical: bool) -> Extension {
        use x509_cert::ext::ToExtension;
        (critical, value)
            .to_extension(&Name::default(), &[])
            .unwrap()
    }

    #[test]
    fn wrong_extensions_are_findings() {
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let PrivateKey::P384(root_signer) = &root_key else {
            unreachable!()
        };
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let plan = plan_for(&key, "acme");
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(der::asn1::OctetString::new(root.subject_key_id.clone()).unwrap()),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        let ski = SubjectKeyIdentifier(der::asn1::OctetString::new(vec![1, 2, 3]).unwrap());
        let good_bc = BasicConstraints {
            ca: true,
            path_len_constraint: Some(0),
        };
        let san = SubjectAltName(vec![GeneralName::DnsName(
            der::asn1::Ia5String::new("evil.example").unwrap(),
        )]);
        let cases: Vec<(Vec<Extension>, &str)> = vec![
            (
                vec![
                    ext(&good_bc, false),
                    ext(&intermediate_key_usage(), true),
                    ext(&ski, false),
                    ext(&aki, false),
                ],
                "basicConstraints is not critical",
            ),
            (
                vec![
                    ext(
                        &BasicConstraints {
                            ca: true,
                            path_len_constraint: Some(3),
                        },
                        true,
                    ),
                    ext(&intermediate_key_usage(), true),
                    ext(&ski, false),
                    ext(&aki, false),
                ],
                "pathLenConstraint",
            ),
            (
                vec![
                    ext(&good_bc, true),
                    ext(&root_key_usage(), true),
                    ext(&ski, false),
                    ext(&aki, false),
                ],
                "keyUsage is",
            ),
            (
                vec![
                    ext(&good_bc, true),
                    ext(&intermediate_key_usage(), true),
                    ext(&ski, false),
                    ext(&aki, false),
                    ext(&san, false),
                ],
                "unexpected extension 2.5.29.17",
            ),
            (
                vec![
                    ext(&good_bc, true),
                    ext(&intermediate_key_usage(), true),
                    ext(&ski, false),
                ],
                "authorityKeyIdentifier is missing",
            ),
        ];
        for (extensions, needle) in cases {
            let tbs = rogue_tbs(&plan, &root, root_signer, extensions);
            let expect = IntermediateExpectations {
                root: &root,
                public_key: &plan.public_key,
                org_name: "acme",
                latest_not_after: plan.not_after,
                min_rsa_bits: 2048,
                trust_domains: &[],
                plan: Some(&plan),
            };
            let failure = lint_intermediate(&tbs, &expect).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
        }
    }

    fn domains(list: &[&str]) -> Vec<String> {
        list.iter().map(|d| d.to_string()).collect()
    }

    /// The signer's check wants exactly the policy's trust domains; an installed
    /// intermediate (agent, `meshca verify`) may carry any, in meshca's shape only.
    #[test]
    fn name_constraints_are_the_policys_and_of_meshcas_shape() {
        use x509_cert::ext::pkix::constraints::name::GeneralSubtree;
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let plan = plan_for(&key, "acme");
        let expect = |trust_domains| IntermediateExpectations {
            root: &root,
            public_key: &plan.public_key,
            org_name: "acme",
            latest_not_after: plan.not_after,
            min_rsa_bits: 2048,
            trust_domains,
            plan: Some(&plan),
        };
        let pay = domains(&["pay.local", "pay.remote"]);
        let pay_only = domains(&["pay.local"]);
        let tbs = decode_tbs(&intermediate_tbs(&plan, &root, &pay).unwrap()).unwrap();
        lint_intermediate(&tbs, &expect(&pay)).unwrap();
        lint_intermediate_profile(&tbs, &root.subject_key_id).unwrap();
        let web = domains(&["web.local"]);
        for (expected, needle) in [
            (
                &web[..],
                "nameConstraints permits the trust domains pay.local, pay.remote, the virtual mesh web.local",
            ),
            (&[][..], "unexpected extension 2.5.29.30"),
        ] {
            let failure = lint_intermediate(&tbs, &expect(expected)).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
        }
        // Unconstrained where the policy has trust domains.
        let bare = decode_tbs(&intermediate_tbs(&plan, &root, &[]).unwrap()).unwrap();
        let failure = lint_intermediate(&bare, &expect(&pay)).unwrap_err();
        assert!(
            failure.to_string().contains("nameConstraints is missing"),
            "{failure}"
        );
        lint_intermediate_profile(&bare, &root.subject_key_id).unwrap();

        // Shapes meshca never makes, refused by the agent's and verify's check too.
        let PrivateKey::P384(root_signer) = &root_key else {
            unreachable!()
        };
        let subtree = |base| GeneralSubtree {
            base,
            minimum: 0,
            maximum: None,
        };
        let uri = |host: &str| {
            GeneralName::UniformResourceIdentifier(der::asn1::Ia5String::new(host).unwrap())
        };
        let dns = GeneralName::DnsName(der::asn1::Ia5String::new("pay.local").unwrap());
        let permitted = |subtrees| NameConstraints {
            permitted_subtrees: Some(subtrees),
            excluded_subtrees: None,
        };
        let cases: Vec<(NameConstraints, bool, &str)> = vec![
            (
                permitted(vec![subtree(uri("pay.local"))]),
                false,
                "nameConstraints is not critical",
            ),
            (
                permitted(vec![subtree(dns)]),
                true,
                "constrains a name other than a URI (dNSName)",
            ),
            (
                permitted(vec![subtree(uri("10.0.0.1"))]),
                true,
                "which is not a trust domain",
            ),
            (
                NameConstraints {
                    permitted_subtrees: Some(vec![subtree(uri("pay.local"))]),
                    excluded_subtrees: Some(vec![subtree(uri("web.local"))]),
                },
                true,
                "excluded subtrees",
            ),
            (
                permitted(vec![GeneralSubtree {
                    base: uri("pay.local"),
                    minimum: 1,
                    maximum: None,
                }]),
                true,
                "minimum or maximum",
            ),
        ];
        let ski = SubjectKeyIdentifier(der::asn1::OctetString::new(vec![1, 2, 3]).unwrap());
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(der::asn1::OctetString::new(root.subject_key_id.clone()).unwrap()),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        for (constraints, critical, needle) in cases {
            let rogue = rogue_tbs(
                &plan,
                &root,
                root_signer,
                vec![
                    ext(
                        &BasicConstraints {
                            ca: true,
                            path_len_constraint: Some(0),
                        },
                        true,
                    ),
                    ext(&intermediate_key_usage(), true),
                    ext(&ski, false),
                    ext(&aki, false),
                    ext(&constraints, critical),
                ],
            );
            let failure = lint_intermediate_profile(&rogue, &root.subject_key_id).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
            let failure = lint_intermediate(&rogue, &expect(&pay_only)).unwrap_err();
            assert!(
                failure.to_string().contains(needle),
                "{needle:?} not in {failure}"
            );
        }
    }

    #[test]
    fn a_signature_over_other_bytes_is_caught_after_signing() {
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let plan = plan_for(&key, "acme");
        let tbs = intermediate_tbs(&plan, &root, &[]).unwrap();
        let (alg, signature) = crate::pki::csr::sign_with(&root_key, &tbs).unwrap();
        let cert = crate::pki::profile::assemble(&tbs, alg, &signature).unwrap();
        check_signed_certificate(&cert, &tbs, &root).unwrap();

        let mut other_plan = plan.clone();
        other_plan.serial = random_serial().unwrap();
        let other_tbs = intermediate_tbs(&other_plan, &root, &[]).unwrap();
        assert!(matches!(
            check_signed_certificate(&cert, &other_tbs, &root),
            Err(SignedCheckError::TbsChanged)
        ));
        // Signed by someone else's key: the signature does not verify under the root.
        let (impostor, _) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let (alg, bad_signature) = crate::pki::csr::sign_with(&impostor, &tbs).unwrap();
        let forged = crate::pki::profile::assemble(&tbs, alg, &bad_signature).unwrap();
        assert!(matches!(
            check_signed_certificate(&forged, &tbs, &root),
            Err(SignedCheckError::Signature(_))
        ));
    }
}
