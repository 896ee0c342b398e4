//! PKCS#10 certificate signing requests: strict parsing with proof of possession on the
//! signer side, and building a CSR for a locally generated key on the agent side.
//!
//! The signer reads only the subject public key and the subject organization from a CSR.
//! Requested extensions are listed (for the audit trail) and never copied.

use const_oid::ObjectIdentifier;
use const_oid::db::rfc4519::O as ID_AT_ORGANIZATION_NAME;
use const_oid::db::rfc5912::ID_EXTENSION_REQ;
use der::asn1::{AnyRef, BitString};
use der::{Decode, Encode, Sequence};
use sha2::Digest;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::DirectoryString;
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version};

use super::keys::{KeyError, PrivateKey, PublicKeyKind, describe_public_key};
use super::pem::{PemError, decode_single};
use super::sigalg::{PublicKeyVerifier, SignatureAlgorithm, SignatureError};

/// Largest CSR accepted, in DER bytes; the API's body limit is the outer bound.
const MAX_CSR_DER: usize = 32 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is not PEM: {0}")]
    Pem(#[from] PemError),
    #[error("CSR is not a valid PKCS#10 CertificationRequest: {0}")]
    Der(String),
    #[error("CSR is larger than {MAX_CSR_DER} bytes")]
    TooLarge,
    #[error("CSR public key is malformed: {0}")]
    MalformedKey(String),
    #[error("CSR subject organization is not a readable string")]
    BadSubject,
    #[error("CSR extension request is malformed: {0}")]
    BadExtensionRequest(String),
}

/// Why a CSR fails proof of possession.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("CSR signature does not prove possession of its key: {0}")]
pub struct PossessionError(pub SignatureError);

/// The raw outer structure, kept so the signature is checked over the exact bytes sent.
#[derive(Sequence)]
struct RawCertReq<'a> {
    info: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

/// A CSR that parsed cleanly. Nothing in it has been trusted yet: call
/// [`ParsedCsr::verify_possession`] after the key passes policy.
#[derive(Debug, Clone)]
pub struct ParsedCsr {
    pub public_key: SubjectPublicKeyInfoOwned,
    pub key_kind: PublicKeyKind,
    /// Every organization value in the CSR subject.
    pub requested_orgs: Vec<String>,
    /// OIDs of extensions the CSR asked for; recorded, never honoured.
    pub requested_extensions: Vec<ObjectIdentifier>,
    /// The subject the CSR asked for; recorded, never honoured (the policy names the
    /// intermediate).
    pub requested_subject: Name,
    /// OIDs of the CSR's attributes other than extensionRequest (a challengePassword,
    /// 1.2.840.113549.1.9.7); recorded, never honoured.
    pub other_attributes: Vec<ObjectIdentifier>,
    info_der: Vec<u8>,
    signature_algorithm: AlgorithmIdentifierOwned,
    signature: Vec<u8>,
    /// The whole request as received (canonical DER: trailing data is refused).
    der: Vec<u8>,
}

impl ParsedCsr {
    /// Parses a PEM `CERTIFICATE REQUEST`.
    pub fn from_pem(pem: &str) -> Result<Self, CsrError> {
        let der = decode_single(pem, &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"])?;
        Self::from_der(&der)
    }

    /// Parses DER, refusing trailing data, other versions and malformed keys.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_DER {
            return Err(CsrError::TooLarge);
        }
        let raw = RawCertReq::from_der(der).map_err(|e| CsrError::Der(e.to_string()))?;
        let info_der = raw
            .info
            .to_der()
            .map_err(|e| CsrError::Der(e.to_string()))?;
        let info = CertReqInfo::from_der(&info_der).map_err(|e| CsrError::Der(e.to_string()))?;
        if info.version != Version::V1 {
            return Err(CsrError::Der("unsupported version".into()));
        }
        let signature = raw
            .signature
            .as_bytes()
            .ok_or_else(|| CsrError::Der("signature BIT STRING has unused bits".into()))?
            .to_vec();
        let key_kind = describe_public_key(&info.public_key)
            .map_err(|e| CsrError::MalformedKey(e.to_string()))?;
        Ok(ParsedCsr {
            requested_orgs: organizations(&info.subject)?,
            requested_extensions: requested_extensions(&info)?,
            other_attributes: info
                .attributes
                .iter()
                .map(|a| a.oid)
                .filter(|oid| *oid != ID_EXTENSION_REQ)
                .collect(),
            requested_subject: info.subject.clone(),
            public_key: info.public_key,
            key_kind,
            info_der,
            signature_algorithm: raw.algorithm,
            signature,
            der: der.to_vec(),
        })
    }

    /// The request's DER, for a backend that wants the CSR itself (Vault).
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Checks the CSR's self-signature with its own public key.
    pub fn verify_possession(&self) -> Result<(), PossessionError> {
        let algorithm = SignatureAlgorithm::from_identifier(&self.signature_algorithm)
            .map_err(PossessionError)?;
        PublicKeyVerifier::for_described(&self.key_kind, &self.public_key)
            .and_then(|v| v.verify(algorithm, &self.info_der, &self.signature))
            .map_err(PossessionError)
    }

    /// SHA-256 of the DER SubjectPublicKeyInfo, hex: how the audit log names a key.
    pub fn public_key_sha256(&self) -> String {
        spki_sha256_hex(&self.public_key)
    }
}

/// SHA-256 over a DER SubjectPublicKeyInfo, lowercase hex.
pub fn spki_sha256_hex(spki: &SubjectPublicKeyInfoOwned) -> String {
    hex(&sha2::Sha256::digest(spki.to_der().unwrap_or_default()))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn organizations(subject: &Name) -> Result<Vec<String>, CsrError> {
    subject
        .iter()
        .filter(|atv| atv.oid == ID_AT_ORGANIZATION_NAME)
        .map(|atv| {
            atv.value
                .decode_as::<DirectoryString>()
                .map(String::from)
                .map_err(|_| CsrError::BadSubject)
        })
        .collect()
}

fn requested_extensions(info: &CertReqInfo) -> Result<Vec<ObjectIdentifier>, CsrError> {
    let mut oids = Vec::new();
    for attribute in info.attributes.iter().filter(|a| a.oid == ID_EXTENSION_REQ) {
        for value in attribute.values.iter() {
            let extensions: Vec<Extension> = value
                .decode_as()
                .map_err(|e: der::Error| CsrError::BadExtensionRequest(e.to_string()))?;
            oids.extend(extensions.iter().map(|e| e.extn_id));
        }
    }
    Ok(oids)
}

#[derive(Debug, thiserror::Error)]
pub enum CsrBuildError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot encode CSR: {0}")]
    Encoding(String),
    #[error("cannot sign CSR: {0}")]
    Signing(String),
}

/// Builds and signs a CSR for `key` with the given subject (no attributes, no extension
/// request: the signer decides the profile).
pub fn build_csr(key: &PrivateKey, subject: Name) -> Result<CertReq, CsrBuildError> {
    let encoding = |e: der::Error| CsrBuildError::Encoding(e.to_string());
    let info = CertReqInfo {
        version: Version::V1,
        subject,
        public_key: key.public_key_info()?,
        attributes: Default::default(),
    };
    let message = info.to_der().map_err(encoding)?;
    let (algorithm, signature) = sign_with(key, &message)?;
    Ok(CertReq {
        info,
        algorithm: algorithm.algorithm_identifier(),
        signature: BitString::from_bytes(&signature).map_err(encoding)?,
    })
}

/// Signs `message` with a software key: the algorithm and the X.509-encoded signature.
pub fn sign_with(
    key: &PrivateKey,
    message: &[u8],
) -> Result<(SignatureAlgorithm, Vec<u8>), CsrBuildError> {
    use signature::Signer;
    let signing = |e: signature::Error| CsrBuildError::Signing(e.to_string());
    Ok(match key {
        PrivateKey::Rsa(rsa_key) => {
            // aws-lc blinds the private operation itself.
            let mut sig = vec![0u8; rsa_key.public_modulus_len()];
            rsa_key
                .sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    message,
                    &mut sig,
                )
                .map_err(|_| {
                    CsrBuildError::Signing("aws-lc could not sign with the RSA key".into())
                })?;
            (SignatureAlgorithm::RsaPkcs1Sha256, sig)
        }
        PrivateKey::P256(k) => {
            let sig: p256::ecdsa::DerSignature = k.try_sign(message).map_err(signing)?;
            (SignatureAlgorithm::EcdsaSha256, sig.as_bytes().to_vec())
        }
        PrivateKey::P384(k) => {
            let sig: p384::ecdsa::DerSignature = k.try_sign(message).map_err(signing)?;
            (SignatureAlgorithm::EcdsaSha384, sig.as_bytes().to_vec())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::keys::KeyType;
    use crate::pki::profile::subject_name;
    use der::EncodePem;

    fn csr_pem(key: &PrivateKey, org: &str) -> String {
        build_csr(key, subject_name(org, "test").unwrap())
            .unwrap()
            .to_pem(der::pem::LineEnding::LF)
            .unwrap()
    }

    #[test]
    fn built_csr_parses_and_proves_possession() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = PrivateKey::generate(key_type).unwrap();
            let csr = ParsedCsr::from_pem(&csr_pem(&key, "acme")).unwrap();
            assert_eq!(csr.key_kind, key_type.public_key_kind());
            assert_eq!(csr.requested_orgs, vec!["acme".to_string()]);
            assert!(csr.requested_extensions.is_empty());
            csr.verify_possession().unwrap();
            assert_eq!(csr.public_key_sha256().len(), 64);
        }
    }

    #[test]
    fn a_tampered_csr_fails_possession() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let mut req = build_csr(&key, subject_name("acme", "a").unwrap()).unwrap();
        req.info.subject = subject_name("acme", "b").unwrap();
        let parsed = ParsedCsr::from_der(&req.to_der().unwrap()).unwrap();
        assert_eq!(
            parsed.verify_possession(),
            Err(PossessionError(SignatureError::Invalid))
        );
    }

    #[test]
    fn garbage_and_trailing_data_are_refused() {
        assert!(matches!(
            ParsedCsr::from_pem("hello"),
            Err(CsrError::Pem(_))
        ));
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let mut der = build_csr(&key, subject_name("acme", "a").unwrap())
            .unwrap()
            .to_der()
            .unwrap();
        assert!(matches!(
            ParsedCsr::from_der(&der[..der.len() - 3]),
            Err(CsrError::Der(_))
        ));
        der.push(0);
        assert!(matches!(ParsedCsr::from_der(&der), Err(CsrError::Der(_))));
    }
}
