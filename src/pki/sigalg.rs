//! Signature algorithms meshca signs and verifies with, and software verification of
//! X.509 and PKCS#10 signatures (CSR proof of possession, issued-certificate checks).

use std::fmt;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, SHA_256_WITH_RSA_ENCRYPTION,
    SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use der::asn1::Null;
use der::{Any, Decode, Encode};
use sha2::Digest;
use signature::hazmat::PrehashVerifier;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use super::keys::{KeyType, NamedCurve, PublicKeyKind, describe_public_key};

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "signature algorithm {0} is not supported (use sha256/384/512WithRSAEncryption or ecdsa-with-SHA256/384/512)"
    )]
    UnsupportedAlgorithm(ObjectIdentifier),
    #[error("signature algorithm {0} has parameters it must not have")]
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

    fn rsa_scheme(self) -> rsa::Pkcs1v15Sign {
        match self {
            SignatureAlgorithm::RsaPkcs1Sha384 => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
            SignatureAlgorithm::RsaPkcs1Sha512 => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
            _ => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
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

/// A public key parsed once and ready to verify signatures (the root's is kept for the
/// life of the signer, so the per-request check costs no parsing).
#[derive(Clone)]
pub enum PublicKeyVerifier {
    Rsa(Box<rsa::PublicKey>),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

impl fmt::Debug for PublicKeyVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublicKeyVerifier::Rsa(_) => "PublicKeyVerifier(RSA)",
            PublicKeyVerifier::P256(_) => "PublicKeyVerifier(P-256)",
            PublicKeyVerifier::P384(_) => "PublicKeyVerifier(P-384)",
        })
    }
}

impl PublicKeyVerifier {
    pub fn new(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, SignatureError> {
        let kind = describe_public_key(spki).map_err(|e| SignatureError::BadKey(e.to_string()))?;
        let point = spki.subject_public_key.raw_bytes();
        Ok(match kind {
            PublicKeyKind::Rsa { modulus_bits, .. } => {
                let key = rsa::pkcs1::RsaPublicKeyRef::from_der(point)
                    .map_err(|e| SignatureError::BadKey(e.to_string()))?;
                let n = rsa::BoxedUint::from_be_slice_vartime(key.modulus.as_bytes());
                let e = rsa::BoxedUint::from_be_slice_vartime(key.public_exponent.as_bytes());
                // Size limits are policy's business (checked before any verification).
                let key = rsa::PublicKey::new_with_size_limits(
                    n,
                    e,
                    1024..=(modulus_bits as usize).max(1024),
                )
                .map_err(|e| SignatureError::BadKey(e.to_string()))?;
                PublicKeyVerifier::Rsa(Box::new(key))
            }
            PublicKeyKind::Ec(NamedCurve::P256) => PublicKeyVerifier::P256(
                p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                    .map_err(|e| SignatureError::BadKey(e.to_string()))?,
            ),
            PublicKeyKind::Ec(NamedCurve::P384) => PublicKeyVerifier::P384(
                p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
                    .map_err(|e| SignatureError::BadKey(e.to_string()))?,
            ),
            other => {
                return Err(SignatureError::BadKey(format!(
                    "{other} cannot verify signatures here"
                )));
            }
        })
    }

    fn kind_name(&self) -> &'static str {
        match self {
            PublicKeyVerifier::Rsa(_) => "RSA",
            PublicKeyVerifier::P256(_) => "ECDSA P-256",
            PublicKeyVerifier::P384(_) => "ECDSA P-384",
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
        let mismatch = || SignatureError::KeyMismatch {
            algorithm: algorithm.to_string(),
            key: self.kind_name().to_string(),
        };
        let digest = algorithm.digest(message);
        match self {
            PublicKeyVerifier::Rsa(key) => {
                if !algorithm.is_rsa() {
                    return Err(mismatch());
                }
                key.verify(algorithm.rsa_scheme(), &digest, signature)
                    .map_err(|_| SignatureError::Invalid)
            }
            PublicKeyVerifier::P256(key) => {
                if algorithm.is_rsa() {
                    return Err(mismatch());
                }
                let sig = p256::ecdsa::Signature::from_der(signature)
                    .map_err(|_| SignatureError::Invalid)?;
                key.verify_prehash(&digest, &sig)
                    .map_err(|_| SignatureError::Invalid)
            }
            PublicKeyVerifier::P384(key) => {
                if algorithm.is_rsa() {
                    return Err(mismatch());
                }
                let sig = p384::ecdsa::Signature::from_der(signature)
                    .map_err(|_| SignatureError::Invalid)?;
                key.verify_prehash(&digest, &sig)
                    .map_err(|_| SignatureError::Invalid)
            }
        }
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
