//! The rules an intermediate must satisfy, as pure functions of the request and the
//! VirtualMesh policy. Each refusal names its rule and says what would have been accepted.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::pki::keys::{KeyType, NamedCurve, PublicKeyKind, RsaExponent};

/// No RSA key below this size is accepted, whatever a document asks for (NIST SP 800-57).
pub const RSA_FLOOR_BITS: u32 = 2048;
/// Larger RSA keys cost a lot to verify and buy nothing here.
pub const RSA_MAX_BITS: u32 = 8192;
/// The largest RSA public exponent Go's crypto/rsa (istiod) takes.
pub const GO_MAX_RSA_EXPONENT: u64 = (1 << 31) - 1;
/// P-256 offers 128-bit strength, the same as RSA-3072.
pub const P256_MAX_RSA_EQUIVALENT: u32 = 3072;
/// notBefore is set this far in the past so that clocks slightly behind still accept it.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Shortest lifetime a client may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(60);

/// The minimum RSA size the policy enforces for a document value.
pub fn effective_min_rsa_bits(document_value: u32) -> u32 {
    document_value.max(RSA_FLOOR_BITS)
}

/// Key types a CSR (or the root) may use under an RSA minimum.
pub fn accepted_key_types(min_rsa_bits: u32) -> Vec<KeyType> {
    KeyType::ALL
        .into_iter()
        .filter(|kt| check_public_key(&kt.public_key_kind(), min_rsa_bits).is_ok())
        .collect()
}

/// A root must be at least as strong as every virtual mesh it serves demands: checked for
/// the root at start and on every reload of the policies, and for an announced next root.
pub fn check_root_strength(
    root_key: &PublicKeyKind,
    policies: &crate::policy::PolicySet,
) -> Result<(), String> {
    for policy in policies.iter() {
        check_public_key(root_key, policy.min_rsa_bits).map_err(|d| {
            format!(
                "the root key ({root_key}) is too weak for virtual mesh {}: {}",
                policy.id, d.message
            )
        })?;
    }
    Ok(())
}

/// A policy rule, with the machine code the API reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    Org,
    Ttl,
    KeyAlgorithm,
    KeySize,
    KeyExponent,
    ProofOfPossession,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Org,
        Rule::Ttl,
        Rule::KeyAlgorithm,
        Rule::KeySize,
        Rule::KeyExponent,
        Rule::ProofOfPossession,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Rule::Org => "policy_org",
            Rule::Ttl => "policy_ttl",
            Rule::KeyAlgorithm => "policy_key_algorithm",
            Rule::KeySize => "policy_key_size",
            Rule::KeyExponent => "policy_key_exponent",
            Rule::ProofOfPossession => "policy_proof_of_possession",
        }
    }
}

/// A refusal: which rule, and a message for the person who sent the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub rule: Rule,
    pub message: String,
}

impl Denial {
    fn new(rule: Rule, message: String) -> Self {
        Denial { rule, message }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.rule.code())
    }
}

impl std::error::Error for Denial {}

/// Key type and size: RSA at least the minimum (and odd exponent >= 65537), ECDSA by
/// strength (P-384 always, P-256 while the RSA minimum is at most 3072), nothing else.
pub fn check_public_key(kind: &PublicKeyKind, min_rsa_bits: u32) -> Result<(), Denial> {
    match kind {
        PublicKeyKind::Rsa {
            modulus_bits,
            exponent,
        } => {
            if *modulus_bits < min_rsa_bits {
                return Err(Denial::new(
                    Rule::KeySize,
                    format!(
                        "RSA key of {modulus_bits} bits is below the virtual mesh's minimum of {min_rsa_bits} bits"
                    ),
                ));
            }
            if *modulus_bits > RSA_MAX_BITS {
                return Err(Denial::new(
                    Rule::KeySize,
                    format!(
                        "RSA key of {modulus_bits} bits is above the supported maximum of {RSA_MAX_BITS} bits"
                    ),
                ));
            }
            match exponent {
                RsaExponent::F4 => Ok(()),
                RsaExponent::Small(e) if *e > 65537 && *e <= GO_MAX_RSA_EXPONENT && e % 2 == 1 => {
                    Ok(())
                }
                RsaExponent::Small(e) => Err(Denial::new(
                    Rule::KeyExponent,
                    format!(
                        "RSA public exponent {e} is not accepted: it must be odd, at least 65537 and at most 2^31-1 (istiod's Go cannot use a larger one)"
                    ),
                )),
                RsaExponent::Large { .. } => Err(Denial::new(
                    Rule::KeyExponent,
                    "RSA public exponent larger than 64 bits is not accepted: use 65537".into(),
                )),
            }
        }
        PublicKeyKind::Ec(NamedCurve::P384) => Ok(()),
        PublicKeyKind::Ec(NamedCurve::P256) if min_rsa_bits <= P256_MAX_RSA_EQUIVALENT => Ok(()),
        PublicKeyKind::Ec(NamedCurve::P256) => Err(Denial::new(
            Rule::KeyAlgorithm,
            format!(
                "ECDSA P-256 (128-bit strength) is weaker than the virtual mesh's RSA minimum of {min_rsa_bits} bits; use P-384 or RSA-{min_rsa_bits}"
            ),
        )),
        other => Err(Denial::new(
            Rule::KeyAlgorithm,
            format!(
                "{other} is not accepted; accepted key types: {}",
                accepted_key_types(min_rsa_bits)
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The CSR's subject organization, if it names one, must be the policy's orgName. The
/// signer writes the subject itself; this only refuses a CSR that asks for another org.
pub fn check_org(requested_orgs: &[String], org_name: &str) -> Result<(), Denial> {
    match requested_orgs.iter().find(|o| o.as_str() != org_name) {
        None => Ok(()),
        Some(other) => Err(Denial::new(
            Rule::Org,
            format!(
                "CSR asks for organization {other:?}, but this virtual mesh issues only for {org_name:?}"
            ),
        )),
    }
}

/// The validity of an intermediate, decided before anything is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidityWindow {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// True when the root's own expiry, not the policy, set notAfter.
    pub capped_by_root: bool,
}

/// Why no validity window could be chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValidityError {
    /// The request asked for more than the policy allows (a client error).
    Denied(Denial),
    /// The requested ttl is too short to be useful (a client error).
    TooShort(String),
    /// The root is expired or about to: nothing can be issued (a server condition).
    RootExpired(String),
}

/// notBefore = now - [`BACKDATE`]; notAfter = now + ttl, ttl being the requested value
/// (at most the policy's) or the policy's; never after the root's notAfter.
pub fn intermediate_validity(
    now: SystemTime,
    requested_ttl: Option<Duration>,
    max_ttl: Duration,
    root_not_after: SystemTime,
) -> Result<ValidityWindow, ValidityError> {
    let ttl = match requested_ttl {
        Some(ttl) if ttl > max_ttl => {
            return Err(ValidityError::Denied(Denial::new(
                Rule::Ttl,
                format!(
                    "requested ttl of {} exceeds the virtual mesh's maximum of {}",
                    human_duration(ttl),
                    human_duration(max_ttl)
                ),
            )));
        }
        Some(ttl) if ttl < MIN_TTL => {
            return Err(ValidityError::TooShort(format!(
                "requested ttl of {} is below the minimum of {}",
                human_duration(ttl),
                human_duration(MIN_TTL)
            )));
        }
        Some(ttl) => ttl,
        None => max_ttl,
    };
    if root_not_after <= now + MIN_TTL {
        // The date, as /readyz and the start's ERROR name it: when it ended says how long
        // the clusters have been without renewals.
        let when = crate::signer::audit::rfc3339(root_not_after);
        let ended = if root_not_after <= now {
            format!("expired at {when}")
        } else {
            format!("expires at {when}, within a minute")
        };
        return Err(ValidityError::RootExpired(format!(
            "the root certificate {ended}: every signing request is refused; move to a new root"
        )));
    }
    let wanted = now + ttl;
    let (not_after, capped_by_root) = if wanted > root_not_after {
        (root_not_after, true)
    } else {
        (wanted, false)
    };
    Ok(ValidityWindow {
        not_before: now.checked_sub(BACKDATE).unwrap_or(now),
        not_after,
        capped_by_root,
    })
}

/// "356 days", "2 hours", "90 seconds": for messages people read.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (value, unit) = if secs.is_multiple_of(86_400) && secs >= 86_400 {
        (secs / 86_400, "day")
    } else if secs.is_multiple_of(3_600) && secs >= 3_600 {
        (secs / 3_600, "hour")
    } else {
        (secs, "second")
    };
    if value == 1 {
        format!("1 {unit}")
    } else {
        format!("{value} {unit}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa(bits: u32) -> PublicKeyKind {
        PublicKeyKind::Rsa {
            modulus_bits: bits,
            exponent: RsaExponent::F4,
        }
    }

    #[test]
    fn rsa_size_rule() {
        assert!(check_public_key(&rsa(4096), 4096).is_ok());
        assert!(check_public_key(&rsa(8192), 4096).is_ok());
        let denial = check_public_key(&rsa(3072), 4096).unwrap_err();
        assert_eq!(denial.rule, Rule::KeySize);
        assert!(denial.message.contains("3072") && denial.message.contains("4096"));
        assert_eq!(
            check_public_key(&rsa(16384), 2048).unwrap_err().rule,
            Rule::KeySize
        );
    }

    #[test]
    fn rsa_exponent_rule() {
        for (exponent, ok) in [
            (RsaExponent::F4, true),
            (RsaExponent::Small(3), false),
            (RsaExponent::Small(65536), false),
            (RsaExponent::Small(65539), true),
            (RsaExponent::Small(65538), false),
            (RsaExponent::Small(GO_MAX_RSA_EXPONENT), true),
            (RsaExponent::Small(GO_MAX_RSA_EXPONENT + 2), false),
            (RsaExponent::Small(4_294_967_297), false),
            (RsaExponent::Large { odd: true }, false),
        ] {
            let kind = PublicKeyKind::Rsa {
                modulus_bits: 2048,
                exponent,
            };
            let result = check_public_key(&kind, 2048);
            assert_eq!(result.is_ok(), ok, "{exponent:?}");
            if let Err(denial) = result {
                assert_eq!(denial.rule, Rule::KeyExponent);
            }
        }
    }

    #[test]
    fn ecdsa_strength_rule() {
        let p256 = PublicKeyKind::Ec(NamedCurve::P256);
        let p384 = PublicKeyKind::Ec(NamedCurve::P384);
        for min in [2048, 3072, 4096, 8192] {
            assert!(check_public_key(&p384, min).is_ok(), "P-384 under {min}");
            assert_eq!(
                check_public_key(&p256, min).is_ok(),
                min <= 3072,
                "P-256 under {min}"
            );
        }
        let other = PublicKeyKind::Ec(NamedCurve::Other(const_oid::db::rfc5912::SECP_521_R_1));
        assert_eq!(
            check_public_key(&other, 2048).unwrap_err().rule,
            Rule::KeyAlgorithm
        );
        let dsa = PublicKeyKind::Other(const_oid::db::rfc5912::ID_DSA);
        let denial = check_public_key(&dsa, 4096).unwrap_err();
        assert_eq!(denial.rule, Rule::KeyAlgorithm);
        assert!(
            denial.message.contains("rsa4096, ecdsa-p384"),
            "{}",
            denial.message
        );
    }

    #[test]
    fn accepted_key_types_follow_the_minimum() {
        use KeyType::*;
        assert_eq!(accepted_key_types(4096), vec![Rsa4096, EcdsaP384]);
        assert_eq!(
            accepted_key_types(3072),
            vec![Rsa3072, Rsa4096, EcdsaP256, EcdsaP384]
        );
        assert_eq!(accepted_key_types(2048), KeyType::ALL.to_vec());
        assert_eq!(effective_min_rsa_bits(1024), 2048);
        assert_eq!(effective_min_rsa_bits(4096), 4096);
    }

    #[test]
    fn org_rule() {
        assert!(check_org(&[], "smh").is_ok());
        assert!(check_org(&["smh".into()], "smh").is_ok());
        let denial = check_org(&["smh".into(), "evil".into()], "smh").unwrap_err();
        assert_eq!(denial.rule, Rule::Org);
        assert!(denial.message.contains("\"evil\""));
    }

    #[test]
    fn validity_uses_policy_ttl_and_root_cap() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let root_far = now + 1000 * day;
        let w = intermediate_validity(now, None, 356 * day, root_far).unwrap();
        assert_eq!(w.not_after, now + 356 * day);
        assert_eq!(w.not_before, now - BACKDATE);
        assert!(!w.capped_by_root);

        let w = intermediate_validity(now, Some(day), 356 * day, root_far).unwrap();
        assert_eq!(w.not_after, now + day);

        let root_soon = now + 10 * day;
        let w = intermediate_validity(now, None, 356 * day, root_soon).unwrap();
        assert_eq!(w.not_after, root_soon);
        assert!(w.capped_by_root);
    }

    #[test]
    fn validity_refusals() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        match intermediate_validity(now, Some(400 * day), 356 * day, now + 1000 * day) {
            Err(ValidityError::Denied(d)) => {
                assert_eq!(d.rule, Rule::Ttl);
                assert!(
                    d.message.contains("400 days") && d.message.contains("356 days"),
                    "{}",
                    d.message
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            intermediate_validity(now, Some(Duration::from_secs(5)), day, now + 10 * day),
            Err(ValidityError::TooShort(_))
        ));
        match intermediate_validity(now, None, day, now - day) {
            Err(ValidityError::RootExpired(message)) => assert_eq!(
                message,
                format!(
                    "the root certificate expired at {}: every signing request is refused; move to a new root",
                    crate::signer::audit::rfc3339(now - day)
                )
            ),
            other => panic!("{other:?}"),
        }
        match intermediate_validity(now, None, day, now + Duration::from_secs(30)) {
            Err(ValidityError::RootExpired(message)) => {
                assert!(message.contains(", within a minute:"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_secs(86_400)), "1 day");
        assert_eq!(human_duration(Duration::from_secs(7_200)), "2 hours");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 seconds");
    }
}
