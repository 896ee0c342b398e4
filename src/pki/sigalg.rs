//! Signature algorithms meshca signs and verifies with, and software verification of
//! X.509 and PKCS#10 signatures (CSR proof of possession, issued-certificate checks).

use std::fmt;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, SHA_256_WITH_RSA_ENCRYPTION,
    SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use der::asn1::Null;
use der::{Any, Encode};
use sha2::Digest;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use super::keys::{KeyType, NamedCurve, PublicKeyKind, describe_public_key};
use super::oids::Named;

/// The signature algorithms meshca accepts on CSRs and produces on certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPkcs1Sha512,
    EcdsaSha256,
    EcdsaSha384,
    EcdsaSha512,
}

/// What [`SignatureAlgorithm`] covers, as refusals name it.
pub const SUPPORTED_ALGORITHMS: &str =
    "sha256/384/512WithRSAEncryption or ecdsa-with-SHA256/384/512";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "signature algorithm {} is not supported (use {SUPPORTED_ALGORITHMS})",
        Named(.0)
    )]
    UnsupportedAlgorithm(ObjectIdentifier),
    #[error("signature algorithm {} has parameters it must not have", Named(.0))]
    BadParameters(ObjectIdentifier),
    #[error("a {algorithm} signature cannot be made by a {key} key")]
    KeyMismatch { algorithm: String, key: String },
    #[error("unusable public key: {0}")]
    BadKey(String),
    #[error("signature does not verify")]
    Invalid,
}

impl SignatureAlgorithm {
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            SignatureAlgorithm::RsaPkcs1Sha256 => SHA_256_WITH_RSA_ENCRYPTION,
            SignatureAlgorithm::RsaPkcs1Sha384 => SHA_384_WITH_RSA_ENCRYPTION,
            SignatureAlgorithm::RsaPkcs1Sha512 => SHA_512_WITH_RSA_ENCRYPTION,
            SignatureAlgorithm::EcdsaSha256 => ECDSA_WITH_SHA_256,
            SignatureAlgorithm::EcdsaSha384 => ECDSA_WITH_SHA_384,
            SignatureAlgorithm::EcdsaSha512 => ECDSA_WITH_SHA_512,
        }
    }

    fn is_rsa(self) -> bool {
        matches!(
            self,
            SignatureAlgorithm::RsaPkcs1Sha256
                | SignatureAlgorithm::RsaPkcs1Sha384
                | SignatureAlgorithm::RsaPkcs1Sha512
        )
    }

    /// The algorithm a root (or any CA) key of this type signs with.
    pub fn for_key_type(key_type: KeyType) -> Self {
        match key_type {
            KeyType::EcdsaP256 => SignatureAlgorithm::EcdsaSha256,
            KeyType::EcdsaP384 => SignatureAlgorithm::EcdsaSha384,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                SignatureAlgorithm::RsaPkcs1Sha256
            }
        }
    }

    /// The AlgorithmIdentifier as RFC 4055 / RFC 5758 want it: NULL parameters for RSA,
    /// absent parameters for ECDSA.
    pub fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        let parameters = if self.is_rsa() {
            Some(Any::from(Null))
        } else {
            None
        };
        AlgorithmIdentifierOwned {
            oid: self.oid(),
            parameters,
        }
    }

    /// Reads an AlgorithmIdentifier, refusing unknown algorithms and wrong parameters.
    pub fn from_identifier(id: &AlgorithmIdentifierOwned) -> Result<Self, SignatureError> {
        let algorithm = [
            SignatureAlgorithm::RsaPkcs1Sha256,
            SignatureAlgorithm::RsaPkcs1Sha384,
            SignatureAlgorithm::RsaPkcs1Sha512,
            SignatureAlgorithm::EcdsaSha256,
            SignatureAlgorithm::EcdsaSha384,
            SignatureAlgorithm::EcdsaSha512,
        ]
        .into_iter()
        .find(|a| a.oid() == id.oid)
        .ok_or(SignatureError::UnsupportedAlgorithm(id.oid))?;
        let parameters_ok = match &id.parameters {
            None => true,
            // RSA identifiers carry NULL (RFC 4055); ECDSA ones carry nothing (RFC 5758).
            Some(p) => algorithm.is_rsa() && p.to_der().ok().as_deref() == Some(&[0x05, 0x00]),
        };
        if !parameters_ok {
            return Err(SignatureError::BadParameters(id.oid));
        }
        Ok(algorithm)
    }

    fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            SignatureAlgorithm::RsaPkcs1Sha256 | SignatureAlgorithm::EcdsaSha256 => {
                sha2::Sha256::digest(message).to_vec()
            }
            SignatureAlgorithm::RsaPkcs1Sha384 | SignatureAlgorithm::EcdsaSha384 => {
                sha2::Sha384::digest(message).to_vec()
            }
            SignatureAlgorithm::RsaPkcs1Sha512 | SignatureAlgorithm::EcdsaSha512 => {
                sha2::Sha512::digest(message).to_vec()
            }
        }
    }
}

impl fmt::Display for SignatureAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureAlgorithm::RsaPkcs1Sha256 => "sha256WithRSAEncryption",
            SignatureAlgorithm::RsaPkcs1Sha384 => "sha384WithRSAEncryption",
            SignatureAlgorithm::RsaPkcs1Sha512 => "sha512WithRSAEncryption",
            SignatureAlgorithm::EcdsaSha256 => "ecdsa-with-SHA256",
            SignatureAlgorithm::EcdsaSha384 => "ecdsa-with-SHA384",
            SignatureAlgorithm::EcdsaSha512 => "ecdsa-with-SHA512",
        })
    }
}

/// A public key ready to verify signatures, with aws-lc-rs (the library rustls uses for
/// TLS here too) doing the arithmetic.
#[derive(Clone)]
pub struct PublicKeyVerifier {
    kind: VerifierKind,
    /// The subjectPublicKey bits: PKCS#1 RSAPublicKey, or the SEC1 point.
    key: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VerifierKind {
    Rsa,
    P256,
    P384,
}

impl fmt::Debug for PublicKeyVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKeyVerifier({})", self.kind_name())
    }
}

impl PublicKeyVerifier {
    /// Describes and checks the key, then keeps it ready for verification.
    pub fn new(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, SignatureError> {
        let kind = describe_public_key(spki).map_err(|e| SignatureError::BadKey(e.to_string()))?;
        Self::for_described(&kind, spki)
    }

    /// For a key already described (and so already checked) by [`describe_public_key`].
    pub fn for_described(
        kind: &PublicKeyKind,
        spki: &SubjectPublicKeyInfoOwned,
    ) -> Result<Self, SignatureError> {
        let kind = match kind {
            PublicKeyKind::Rsa { .. } => VerifierKind::Rsa,
            PublicKeyKind::Ec(NamedCurve::P256) => VerifierKind::P256,
            PublicKeyKind::Ec(NamedCurve::P384) => VerifierKind::P384,
            other => {
                return Err(SignatureError::BadKey(format!(
                    "{other} cannot verify signatures here"
                )));
            }
        };
        Ok(PublicKeyVerifier {
            kind,
            key: spki.subject_public_key.raw_bytes().to_vec(),
        })
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            VerifierKind::Rsa => "RSA",
            VerifierKind::P256 => "ECDSA P-256",
            VerifierKind::P384 => "ECDSA P-384",
        }
    }

    /// Verifies `signature` (X.509 encoding: PKCS#1 bytes for RSA, DER Ecdsa-Sig-Value for
    /// ECDSA) over `message`.
    pub fn verify(
        &self,
        algorithm: SignatureAlgorithm,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        use SignatureAlgorithm as A;
        use aws_lc_rs::signature as rs;
        let algorithm_impl: &dyn rs::VerificationAlgorithm = match (self.kind, algorithm) {
            (VerifierKind::Rsa, A::RsaPkcs1Sha256) => &rs::RSA_PKCS1_2048_8192_SHA256,
            (VerifierKind::Rsa, A::RsaPkcs1Sha384) => &rs::RSA_PKCS1_2048_8192_SHA384,
            (VerifierKind::Rsa, A::RsaPkcs1Sha512) => &rs::RSA_PKCS1_2048_8192_SHA512,
            (VerifierKind::P256, A::EcdsaSha256) => &rs::ECDSA_P256_SHA256_ASN1,
            (VerifierKind::P256, A::EcdsaSha384) => &rs::ECDSA_P256_SHA384_ASN1,
            (VerifierKind::P384, A::EcdsaSha256) => &rs::ECDSA_P384_SHA256_ASN1,
            (VerifierKind::P384, A::EcdsaSha384) => &rs::ECDSA_P384_SHA384_ASN1,
            (VerifierKind::P256, A::EcdsaSha512) => &rs::ECDSA_P256_SHA512_ASN1,
            (VerifierKind::P384, A::EcdsaSha512) => &rs::ECDSA_P384_SHA512_ASN1,
            _ => {
                return Err(SignatureError::KeyMismatch {
                    algorithm: algorithm.to_string(),
                    key: self.kind_name().to_string(),
                });
            }
        };
        rs::UnparsedPublicKey::new(algorithm_impl, &self.key)
            .verify(message, signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// Converts a PKCS#11 CKM_ECDSA signature (raw r || s) into the DER Ecdsa-Sig-Value X.509
/// carries. The curve decides the length of r and s.
pub fn ecdsa_raw_to_der(curve: &NamedCurve, raw: &[u8]) -> Result<Vec<u8>, SignatureError> {
    match curve {
        NamedCurve::P256 => p256::ecdsa::Signature::from_slice(raw)
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|_| SignatureError::Invalid),
        NamedCurve::P384 => p384::ecdsa::Signature::from_slice(raw)
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|_| SignatureError::Invalid),
        NamedCurve::Other(oid) => Err(SignatureError::BadKey(format!("curve {oid}"))),
    }
}

/// The digest a CKM_ECDSA token signature is computed over, for an ECDSA algorithm.
pub fn ecdsa_prehash(algorithm: SignatureAlgorithm, message: &[u8]) -> Vec<u8> {
    algorithm.digest(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::keys::PrivateKey;
    use signature::Signer;

    #[test]
    fn identifiers_round_trip_and_bad_parameters_are_refused() {
        for alg in [
            SignatureAlgorithm::RsaPkcs1Sha256,
            SignatureAlgorithm::RsaPkcs1Sha384,
            SignatureAlgorithm::EcdsaSha256,
            SignatureAlgorithm::EcdsaSha384,
        ] {
            assert_eq!(
                SignatureAlgorithm::from_identifier(&alg.algorithm_identifier()),
                Ok(alg)
            );
        }
        let mut ecdsa_with_null = SignatureAlgorithm::EcdsaSha256.algorithm_identifier();
        ecdsa_with_null.parameters = Some(Any::from(Null));
        assert!(matches!(
            SignatureAlgorithm::from_identifier(&ecdsa_with_null),
            Err(SignatureError::BadParameters(_))
        ));
        let pss = AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ID_RSASSA_PSS,
            parameters: None,
        };
        assert!(matches!(
            SignatureAlgorithm::from_identifier(&pss),
            Err(SignatureError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn ecdsa_signatures_verify_and_tampering_is_caught() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let PrivateKey::P256(signing) = &key else {
            unreachable!()
        };
        let sig: p256::ecdsa::DerSignature = signing.sign(b"hello");
        let verifier = PublicKeyVerifier::new(&key.public_key_info().unwrap()).unwrap();
        verifier
            .verify(SignatureAlgorithm::EcdsaSha256, b"hello", sig.as_bytes())
            .unwrap();
        assert_eq!(
            verifier.verify(SignatureAlgorithm::EcdsaSha256, b"hellO", sig.as_bytes()),
            Err(SignatureError::Invalid)
        );
        assert!(matches!(
            verifier.verify(SignatureAlgorithm::RsaPkcs1Sha256, b"hello", sig.as_bytes()),
            Err(SignatureError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn ecdsa_with_sha512_verifies_on_both_curves() {
        // Signed by RustCrypto over a SHA-512 prehash, verified by aws-lc-rs: two
        // independent implementations must agree (P-256 truncates the digest to 256 bits).
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let key = PrivateKey::generate(key_type).unwrap();
            let digest = ecdsa_prehash(SignatureAlgorithm::EcdsaSha512, b"tbs");
            let (curve, raw) = match &key {
                PrivateKey::P256(k) => {
                    let s: p256::ecdsa::Signature =
                        signature::hazmat::PrehashSigner::sign_prehash(k, &digest).unwrap();
                    (NamedCurve::P256, s.to_bytes().to_vec())
                }
                PrivateKey::P384(k) => {
                    let s: p384::ecdsa::Signature =
                        signature::hazmat::PrehashSigner::sign_prehash(k, &digest).unwrap();
                    (NamedCurve::P384, s.to_bytes().to_vec())
                }
                _ => unreachable!(),
            };
            let der = ecdsa_raw_to_der(&curve, &raw).unwrap();
            let verifier = PublicKeyVerifier::new(&key.public_key_info().unwrap()).unwrap();
            verifier
                .verify(SignatureAlgorithm::EcdsaSha512, b"tbs", &der)
                .unwrap();
            assert_eq!(
                verifier.verify(SignatureAlgorithm::EcdsaSha512, b"tbS", &der),
                Err(SignatureError::Invalid),
                "{key_type:?}"
            );
            assert_eq!(
                verifier.verify(SignatureAlgorithm::EcdsaSha384, b"tbs", &der),
                Err(SignatureError::Invalid),
                "{key_type:?}"
            );
        }
    }

    #[test]
    fn raw_ecdsa_converts_to_der() {
        let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
        let PrivateKey::P384(signing) = &key else {
            unreachable!()
        };
        let digest = ecdsa_prehash(SignatureAlgorithm::EcdsaSha384, b"tbs");
        let raw: p384::ecdsa::Signature =
            signature::hazmat::PrehashSigner::sign_prehash(signing, &digest).unwrap();
        let der = ecdsa_raw_to_der(&NamedCurve::P384, &raw.to_bytes()).unwrap();
        PublicKeyVerifier::new(&key.public_key_info().unwrap())
            .unwrap()
            .verify(SignatureAlgorithm::EcdsaSha384, b"tbs", &der)
            .unwrap();
        assert!(ecdsa_raw_to_der(&NamedCurve::P384, &raw.to_bytes()[..40]).is_err());
    }
}
