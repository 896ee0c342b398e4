//! Key types meshca knows, what a public key is (algorithm, size, curve), and software
//! keys for the agent side: generation, PEM encoding, loading.
//!
//! Root keys never pass through here: they live in the token or in Vault.

use std::fmt;
use std::str::FromStr;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, RSA_ENCRYPTION, SECP_256_R_1, SECP_384_R_1};
use der::{Decode, Encode};
use getrandom::SysRng;
use getrandom::rand_core::UnwrapErr;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use spki::SubjectPublicKeyInfoOwned;
use zeroize::Zeroizing;

use super::oids::Named;

/// A key algorithm and size meshca can generate, sign with or accept.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum KeyType {
    #[serde(rename = "rsa2048")]
    Rsa2048,
    #[serde(rename = "rsa3072")]
    Rsa3072,
    #[serde(rename = "rsa4096")]
    Rsa4096,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
}

impl KeyType {
    pub const ALL: [KeyType; 5] = [
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
            KeyType::Rsa4096 => "rsa4096",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
        }
    }

    /// RSA modulus size in bits, or `None` for ECDSA.
    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => None,
        }
    }

    /// The public-key description a key of this type has.
    pub fn public_key_kind(self) -> PublicKeyKind {
        match self {
            KeyType::EcdsaP256 => PublicKeyKind::Ec(NamedCurve::P256),
            KeyType::EcdsaP384 => PublicKeyKind::Ec(NamedCurve::P384),
            rsa => PublicKeyKind::Rsa {
                modulus_bits: rsa.rsa_bits().unwrap_or_default(),
                exponent: RsaExponent::F4,
            },
        }
    }
}

impl KeyType {
    /// Whether `kind` is a key of this type: the algorithm and the RSA size or curve. The
    /// RSA exponent is not looked at: a type stands for any exponent the policy accepts
    /// (odd, 65537 to 2^31-1, checked by [`check_public_key`]), not only the 65537 of
    /// [`KeyType::public_key_kind`].
    ///
    /// [`check_public_key`]: crate::policy::rules::check_public_key
    pub fn is_type_of(self, kind: &PublicKeyKind) -> bool {
        match (self.public_key_kind(), kind) {
            (
                PublicKeyKind::Rsa { modulus_bits, .. },
                PublicKeyKind::Rsa {
                    modulus_bits: bits, ..
                },
            ) => modulus_bits == *bits,
            (own, other) => own == *other,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| KeyError::UnknownKeyType(s.to_string()))
    }
}

/// Named elliptic curves, as far as meshca cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedCurve {
    P256,
    P384,
    Other(ObjectIdentifier),
}

impl fmt::Display for NamedCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamedCurve::P256 => f.write_str("P-256"),
            NamedCurve::P384 => f.write_str("P-384"),
            NamedCurve::Other(oid) => write!(f, "curve {}", Named(oid)),
        }
    }
}

/// An RSA public exponent, reduced to what the policy needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaExponent {
    /// 65537, the only exponent anyone should use.
    F4,
    /// Another value that fits in 64 bits.
    Small(u64),
    /// Larger than 64 bits; `odd` records its parity.
    Large { odd: bool },
}

/// What a subject public key is: the facts the policy rules decide on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKeyKind {
    Rsa {
        modulus_bits: u32,
        exponent: RsaExponent,
    },
    Ec(NamedCurve),
    /// Any other algorithm (DSA, Ed25519, ...), named by its OID.
    Other(ObjectIdentifier),
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::Rsa { modulus_bits, .. } => write!(f, "RSA-{modulus_bits}"),
            PublicKeyKind::Ec(curve) => write!(f, "ECDSA {curve}"),
            PublicKeyKind::Other(oid) => write!(f, "algorithm {}", Named(oid)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "unknown key type {0:?} (expected one of rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384)"
    )]
    UnknownKeyType(String),
    #[error("malformed RSA public key: {0}")]
    MalformedRsa(String),
    #[error("malformed EC public key: {0}")]
    MalformedEc(String),
    #[error("EC public key has no named-curve parameter")]
    MissingCurve,
    #[error("malformed public key: its BIT STRING has {0} unused bits (a key is whole octets)")]
    UnusedBits(u8),
    #[error("key generation failed: {0}")]
    Generation(String),
    #[error("cannot encode key: {0}")]
    Encoding(String),
    #[error(
        "cannot read private key PEM: expected PKCS#8 (PRIVATE KEY), PKCS#1 (RSA PRIVATE KEY) or SEC1 (EC PRIVATE KEY) of a supported type"
    )]
    UnreadablePrivateKey,
}

/// Describes a subject public key: algorithm, RSA size and exponent, or curve.
///
/// Fails only when the key claims a known algorithm but its encoding is broken (an RSA key
/// that is not an RSAPublicKey or whose parameters are not NULL, an EC point not on its
/// curve, a bit string with unused bits): such a key could never verify anything, or
/// would be signed into a certificate other parsers read differently, so it is malformed
/// input rather than a policy question. The SPKI a certificate carries is the CSR's as
/// given, so whatever this lets through is signed.
pub fn describe_public_key(spki: &SubjectPublicKeyInfoOwned) -> Result<PublicKeyKind, KeyError> {
    let algorithm = spki.algorithm.oid;
    let unused_bits = spki.subject_public_key.unused_bits();
    if unused_bits != 0 {
        return Err(KeyError::UnusedBits(unused_bits));
    }
    if algorithm == RSA_ENCRYPTION {
        // RFC 3279 2.3.1: the parameters MUST be NULL (absent, or anything else, is a key
        // Go's x509 refuses and zlint flags).
        let null_parameters = spki
            .algorithm
            .parameters
            .as_ref()
            .is_some_and(|p| der::Tagged::tag(p) == der::Tag::Null && p.value().is_empty());
        if !null_parameters {
            return Err(KeyError::MalformedRsa(
                "the rsaEncryption algorithm parameters must be NULL (RFC 3279)".into(),
            ));
        }
        let key = pkcs1::RsaPublicKeyRef::from_der(spki.subject_public_key.raw_bytes())
            .map_err(|e| KeyError::MalformedRsa(e.to_string()))?;
        let modulus = key.modulus.as_bytes();
        let modulus_bits = bit_length(modulus).ok_or_else(|| {
            KeyError::MalformedRsa(format!(
                "the modulus is {} bytes long, more bits than meshca counts",
                modulus.len()
            ))
        })?;
        if modulus_bits == 0 || modulus.last().is_some_and(|b| b & 1 == 0) {
            return Err(KeyError::MalformedRsa("modulus is zero or even".into()));
        }
        let exponent = key.public_exponent.as_bytes();
        let odd = exponent.last().is_some_and(|b| b & 1 == 1);
        let exponent = if exponent.len() <= 8 {
            let value = exponent
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            if value == 65537 {
                RsaExponent::F4
            } else {
                RsaExponent::Small(value)
            }
        } else {
            RsaExponent::Large { odd }
        };
        return Ok(PublicKeyKind::Rsa {
            modulus_bits,
            exponent,
        });
    }
    if algorithm == ID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            .ok_or(KeyError::MissingCurve)?;
        let point = spki.subject_public_key.raw_bytes();
        // Go's x509 (istiod) parses uncompressed points only, and OpenBao refuses the
        // others: a compressed point would make an intermediate istiod cannot load.
        let uncompressed = point.first() == Some(&0x04);
        if !uncompressed && (curve == SECP_256_R_1 || curve == SECP_384_R_1) {
            return Err(KeyError::MalformedEc(
                "the point is not in uncompressed form (istiod reads no other)".into(),
            ));
        }
        let curve = if curve == SECP_256_R_1 {
            p256::PublicKey::from_sec1_bytes(point)
                .map_err(|_| KeyError::MalformedEc("point is not on P-256".into()))?;
            NamedCurve::P256
        } else if curve == SECP_384_R_1 {
            p384::PublicKey::from_sec1_bytes(point)
                .map_err(|_| KeyError::MalformedEc("point is not on P-384".into()))?;
            NamedCurve::P384
        } else {
            NamedCurve::Other(curve)
        };
        return Ok(PublicKeyKind::Ec(curve));
    }
    Ok(PublicKeyKind::Other(algorithm))
}

/// Number of significant bits in a big-endian unsigned integer; none if it does not fit
/// a u32 (a modulus of 512 MiB, which only a broken PKCS#11 module or file would give).
fn bit_length(bytes: &[u8]) -> Option<u32> {
    match bytes.iter().position(|b| *b != 0) {
        None => Some(0),
        Some(first) => significant_bits(bytes.len() - first, bytes[first]),
    }
}

/// The bits of `significant_bytes` bytes whose first is `top` (not zero).
fn significant_bits(significant_bytes: usize, top: u8) -> Option<u32> {
    let rest = u32::try_from(significant_bytes.checked_sub(1)?).ok()?;
    rest.checked_mul(8)?.checked_add(8 - top.leading_zeros())
}

/// A private key held in this process (the agent's intermediate key). RSA keys are
/// aws-lc-rs's (blinded, constant-time arithmetic), not RustCrypto's rsa crate, whose
/// private-key operations leak timing (RUSTSEC-2023-0071, no fixed release).
pub enum PrivateKey {
    Rsa(Box<aws_lc_rs::rsa::KeyPair>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        write!(f, "PrivateKey({})", self.key_type())
    }
}

/// The operating system's CSPRNG, as the infallible RNG the RustCrypto crates expect.
pub fn system_rng() -> UnwrapErr<SysRng> {
    UnwrapErr(SysRng)
}

impl PrivateKey {
    /// Generates a fresh key in this process.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        use p256::elliptic_curve::Generate;
        let mut rng = system_rng();
        Ok(match key_type {
            KeyType::EcdsaP256 => {
                PrivateKey::P256(p256::ecdsa::SigningKey::generate_from_rng(&mut rng))
            }
            KeyType::EcdsaP384 => {
                PrivateKey::P384(p384::ecdsa::SigningKey::generate_from_rng(&mut rng))
            }
            rsa_type => {
                use aws_lc_rs::rsa::{KeyPair, KeySize};
                let size = match rsa_type.rsa_bits() {
                    Some(2048) => KeySize::Rsa2048,
                    Some(3072) => KeySize::Rsa3072,
                    _ => KeySize::Rsa4096,
                };
                let key = KeyPair::generate(size).map_err(|_| {
                    KeyError::Generation(format!("aws-lc could not generate an {rsa_type} key"))
                })?;
                PrivateKey::Rsa(Box::new(key))
            }
        })
    }

    pub fn key_type(&self) -> KeyType {
        match self {
            PrivateKey::P256(_) => KeyType::EcdsaP256,
            PrivateKey::P384(_) => KeyType::EcdsaP384,
            PrivateKey::Rsa(key) => match key.public_modulus_len() * 8 {
                0..=2048 => KeyType::Rsa2048,
                2049..=3072 => KeyType::Rsa3072,
                _ => KeyType::Rsa4096,
            },
        }
    }

    /// The SubjectPublicKeyInfo of this key.
    pub fn public_key_info(&self) -> Result<SubjectPublicKeyInfoOwned, KeyError> {
        let der = match self {
            PrivateKey::Rsa(key) => {
                use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
                use aws_lc_rs::signature::KeyPair;
                let der: PublicKeyX509Der = key.public_key().as_der().map_err(|_| {
                    KeyError::Encoding("aws-lc could not encode the RSA public key".into())
                })?;
                der.as_ref().to_vec()
            }
            PrivateKey::P256(key) => ec_der(key.verifying_key().to_public_key_der())?,
            PrivateKey::P384(key) => ec_der(key.verifying_key().to_public_key_der())?,
        };
        SubjectPublicKeyInfoOwned::from_der(&der).map_err(|e| KeyError::Encoding(e.to_string()))
    }

    /// PKCS#8 PEM (`PRIVATE KEY`), which istiod reads for RSA and ECDSA alike.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let line_ending = p256::pkcs8::LineEnding::LF;
        match self {
            PrivateKey::Rsa(key) => {
                use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
                // Zeroed by aws-lc-rs when dropped, as the PEM is by Zeroizing.
                let der: Pkcs8V1Der = key.as_der().map_err(|_| {
                    KeyError::Encoding("aws-lc could not encode the RSA private key".into())
                })?;
                pem_rfc7468::encode_string("PRIVATE KEY", line_ending, der.as_ref())
                    .map(Zeroizing::new)
                    .map_err(|e| KeyError::Encoding(e.to_string()))
            }
            PrivateKey::P256(key) => key.to_pkcs8_pem(line_ending).map_err(ec_encoding),
            PrivateKey::P384(key) => key.to_pkcs8_pem(line_ending).map_err(ec_encoding),
        }
    }

    /// Reads a private key PEM: PKCS#8, PKCS#1 RSA or SEC1 EC.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(PrivateKey::P256(key));
        }
        if let Ok(key) = p384::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(PrivateKey::P384(key));
        }
        if let Ok((label, der)) = pem_rfc7468::decode_vec(pem.as_bytes()) {
            use aws_lc_rs::rsa::KeyPair;
            let der = Zeroizing::new(der);
            let rsa = match label {
                "PRIVATE KEY" => KeyPair::from_pkcs8(&der).ok(),
                "RSA PRIVATE KEY" => KeyPair::from_der(&der).ok(),
                _ => None,
            };
            if let Some(key) = rsa {
                return Ok(PrivateKey::Rsa(Box::new(key)));
            }
        }
        if let Ok(key) = p256::SecretKey::from_sec1_pem(pem) {
            return Ok(PrivateKey::P256(key.into()));
        }
        if let Ok(key) = p384::SecretKey::from_sec1_pem(pem) {
            return Ok(PrivateKey::P384(key.into()));
        }
        Err(KeyError::UnreadablePrivateKey)
    }
}

/// An EC key's SubjectPublicKeyInfo DER, as the RustCrypto curve crates encode it.
fn ec_der(encoded: spki::Result<spki::Document>) -> Result<Vec<u8>, KeyError> {
    encoded
        .map(|der| der.as_bytes().to_vec())
        .map_err(|e| KeyError::Encoding(e.to_string()))
}

/// Why the RustCrypto curve crates could not encode a private key.
fn ec_encoding(e: p256::pkcs8::Error) -> KeyError {
    KeyError::Encoding(e.to_string())
}

/// The DER encoding of a SubjectPublicKeyInfo (what key fingerprints are taken over).
pub fn spki_der(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    spki.to_der().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for key_type in KeyType::ALL {
            assert_eq!(key_type.name().parse::<KeyType>().unwrap(), key_type);
        }
        let err = "rsa1024".parse::<KeyType>().unwrap_err().to_string();
        assert!(err.contains("rsa1024"), "{err}");
    }

    #[test]
    fn keys_of_other_curves_and_algorithms_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        for (algorithm, options, shown) in [
            (
                "EC",
                &["-pkeyopt", "ec_paramgen_curve:P-521"][..],
                "ECDSA curve 1.3.132.0.35 (P-521)",
            ),
            (
                "EC",
                &["-pkeyopt", "ec_paramgen_curve:secp256k1"][..],
                "ECDSA curve 1.3.132.0.10 (secp256k1)",
            ),
            (
                "EC",
                &["-pkeyopt", "ec_paramgen_curve:brainpoolP256r1"][..],
                "ECDSA curve 1.3.36.3.3.2.8.1.1.7 (brainpoolP256r1)",
            ),
            ("ED25519", &[][..], "algorithm 1.3.101.112 (Ed25519)"),
            ("ED448", &[][..], "algorithm 1.3.101.113 (Ed448)"),
        ] {
            let mut args = vec!["genpkey", "-algorithm", algorithm];
            args.extend(options);
            args.extend(["-out", "key.pem"]);
            openssl(&args);
            openssl(&[
                "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
            ]);
            let der = std::fs::read(dir.path().join("pub.der")).unwrap();
            let kind =
                describe_public_key(&SubjectPublicKeyInfoOwned::from_der(&der).unwrap()).unwrap();
            let denial = crate::policy::rules::check_public_key(&kind, 2048).unwrap_err();
            assert_eq!(
                denial.message,
                format!(
                    "{shown} is not accepted; accepted key types: rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384"
                )
            );
        }
    }

    #[test]
    fn bit_length_counts_significant_bits() {
        assert_eq!(bit_length(&[]), Some(0));
        assert_eq!(bit_length(&[0, 0]), Some(0));
        assert_eq!(bit_length(&[0, 1]), Some(1));
        assert_eq!(bit_length(&[0x80, 0]), Some(16));
        assert_eq!(bit_length(&[0, 0x7f, 0xff]), Some(15));
    }

    #[test]
    fn a_bit_length_past_u32_is_none_not_wrapped() {
        // 2^29 bytes with a top bit set: 2^32 bits, one past u32::MAX.
        assert_eq!(significant_bits(1 << 29, 0x80), None);
        assert_eq!(significant_bits(1 << 29, 0x01), Some(u32::MAX - 6));
        assert_eq!(significant_bits(usize::MAX, 0x01), None);
        assert_eq!(significant_bits((1 << 29) + 1, 0x01), None);
    }

    #[test]
    fn generated_ec_keys_describe_themselves() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let key = PrivateKey::generate(key_type).unwrap();
            assert_eq!(key.key_type(), key_type);
            let kind = describe_public_key(&key.public_key_info().unwrap()).unwrap();
            assert_eq!(kind, key_type.public_key_kind());
            let pem = key.to_pkcs8_pem().unwrap();
            let again = PrivateKey::from_pem(&pem).unwrap();
            assert_eq!(
                again.public_key_info().unwrap(),
                key.public_key_info().unwrap()
            );
        }
    }

    #[test]
    fn generated_rsa_keys_are_whole_and_sign_csrs_openssl_verifies() {
        use der::EncodePem;
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        for (key_type, bits) in [(KeyType::Rsa2048, 2048), (KeyType::Rsa3072, 3072)] {
            let key = PrivateKey::generate(key_type).unwrap();
            assert_eq!(key.key_type(), key_type);
            let kind = describe_public_key(&key.public_key_info().unwrap()).unwrap();
            assert_eq!(
                kind,
                PublicKeyKind::Rsa {
                    modulus_bits: bits,
                    exponent: RsaExponent::F4
                }
            );
            let pem = key.to_pkcs8_pem().unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
            // openssl checks the key's parts agree (p*q = n, d*e = 1, the CRT values)...
            std::fs::write(dir.path().join("key.pem"), pem.as_bytes()).unwrap();
            openssl(&["pkey", "-in", "key.pem", "-check", "-noout"]);
            // ...and that a CSR it signed verifies under its own key.
            let subject = crate::pki::profile::subject_name("acme", "mesh").unwrap();
            let csr = crate::pki::csr::build_csr(&key, subject)
                .unwrap()
                .to_pem(der::pem::LineEnding::LF)
                .unwrap();
            std::fs::write(dir.path().join("csr.pem"), csr).unwrap();
            openssl(&["req", "-in", "csr.pem", "-verify", "-noout"]);
            let again = PrivateKey::from_pem(&pem).unwrap();
            assert_eq!(
                again.public_key_info().unwrap(),
                key.public_key_info().unwrap()
            );
        }
        // A PKCS#1 key (`RSA PRIVATE KEY`, openssl's traditional form) is read too.
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "openssl.pem",
        ]);
        openssl(&[
            "rsa",
            "-in",
            "openssl.pem",
            "-traditional",
            "-out",
            "pkcs1.pem",
        ]);
        let pkcs1 = std::fs::read_to_string(dir.path().join("pkcs1.pem")).unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert_eq!(
            PrivateKey::from_pem(&pkcs1).unwrap().key_type(),
            KeyType::Rsa2048
        );
    }

    #[test]
    fn rsa_parameters_other_than_null_and_unused_bits_are_malformed() {
        let key = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let good = key.public_key_info().unwrap();
        let with = |parameters: Option<der::Any>| SubjectPublicKeyInfoOwned {
            algorithm: spki::AlgorithmIdentifierOwned {
                oid: RSA_ENCRYPTION,
                parameters,
            },
            subject_public_key: good.subject_public_key.clone(),
        };
        for parameters in [
            None,
            Some(der::Any::new(der::Tag::OctetString, vec![0u8; 64]).unwrap()),
            Some(der::Any::from(SECP_256_R_1)),
        ] {
            let err = describe_public_key(&with(parameters.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be NULL"), "{parameters:?}: {err}");
        }
        assert!(describe_public_key(&with(Some(der::Any::from(der::asn1::Null)))).is_ok());

        let ec = PrivateKey::generate(KeyType::EcdsaP256)
            .unwrap()
            .public_key_info()
            .unwrap();
        for mut spki in [good, ec] {
            let bytes = spki.subject_public_key.raw_bytes().to_vec();
            spki.subject_public_key = der::asn1::BitString::new(3, bytes).unwrap();
            let err = describe_public_key(&spki).unwrap_err().to_string();
            assert!(err.contains("3 unused bits"), "{err}");
        }
    }

    #[test]
    fn compressed_ec_points_are_malformed() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let mut spki = PrivateKey::generate(key_type)
                .unwrap()
                .public_key_info()
                .unwrap();
            // 04 || X || Y becomes (02 or 03, by Y's parity) || X: the same point.
            let point = spki.subject_public_key.raw_bytes().to_vec();
            let x = &point[1..=(point.len() - 1) / 2];
            let mut compressed = vec![0x02 | (point[point.len() - 1] & 1)];
            compressed.extend_from_slice(x);
            spki.subject_public_key = der::asn1::BitString::from_bytes(&compressed).unwrap();
            let err = describe_public_key(&spki).unwrap_err().to_string();
            assert!(err.contains("uncompressed form"), "{key_type}: {err}");
        }
    }

    #[test]
    fn garbage_private_key_is_refused_without_echoing_it() {
        let err =
            PrivateKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .to_string();
        assert!(!err.contains("AAAA"));
    }
}
