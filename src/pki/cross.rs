//! Cross certificates: the current root's key vouching for a root the signer announces
//! (next or previous). An agent that trusts the current root takes an announced root only
//! with one, so that whoever merely holds a TLS certificate the agents trust cannot have a
//! cluster trust a root of their own: only the root key can.

use std::time::SystemTime;

use der::{Decode, Encode};
use sha2::Digest;
use x509_cert::Certificate;

use super::csr::hex;
use super::pem::{PemError, certificate_pem, decode_certificates};
use super::profile::{IntermediatePlan, ProfileError, RootCa, is_ca, random_serial, serial_hex};
use super::sigalg::{PublicKeyVerifier, SignatureError};
use crate::policy::rules::BACKDATE;

/// Why a cross certificate does not vouch for the announced root under the current one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrossError {
    #[error("the cross certificate cannot be read: {0}")]
    Unreadable(String),
    #[error("the cross certificate's subject is not the announced root's")]
    Subject,
    #[error("the cross certificate's public key is not the announced root's")]
    PublicKey,
    #[error("the cross certificate's issuer is not the current root's subject")]
    Issuer,
    #[error("the cross certificate is not a CA certificate")]
    NotCa,
    #[error("the cross certificate is not signed by the current root's key: {0}")]
    Signature(String),
    #[error("the cross certificate's key identifiers are wrong: {0}")]
    KeyIds(String),
}

/// A cross certificate the signer made, as it serves and audits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossCert {
    pub pem: String,
    /// Lowercase hex, as the API reports serials.
    pub serial: String,
    /// SHA-256 of its DER, lowercase hex.
    pub fingerprint_sha256: String,
}

impl CrossCert {
    pub fn of(certificate: &Certificate) -> Result<Self, CrossError> {
        let der = certificate
            .to_der()
            .map_err(|e| CrossError::Unreadable(e.to_string()))?;
        Ok(CrossCert {
            pem: certificate_pem(certificate),
            serial: serial_hex(certificate.tbs_certificate().serial_number()),
            fingerprint_sha256: hex(&sha2::Sha256::digest(&der)),
        })
    }

    /// How audit records and `serve --check` name it.
    pub fn describe(&self) -> String {
        format!(
            "cross certificate serial {} sha256 {}",
            self.serial, self.fingerprint_sha256
        )
    }
}

/// Serial and validity of a cross certificate for `announced` made at `now` under
/// `current`: a fresh random serial, from `now` less the usual backdate to the earlier end
/// of the two roots (the vouching means nothing once either has ended).
pub fn cross_plan(
    announced: &RootCa,
    current: &RootCa,
    now: SystemTime,
) -> Result<IntermediatePlan, ProfileError> {
    let not_after = announced.not_after.min(current.not_after);
    Ok(IntermediatePlan {
        subject: announced.subject.clone(),
        public_key: announced.public_key.clone(),
        serial: random_serial()?,
        // An announced root that has ended stays announced (the agents skip it): its
        // cross certificate then begins at that end rather than after it.
        not_before: now.checked_sub(BACKDATE).unwrap_or(now).min(not_after),
        not_after,
    })
}

/// Whether `cross` vouches for `announced` under `current`: `announced`'s exact subject
/// and public key, issued by `current`'s subject, a CA, signed by `current`'s key.
///
/// Its dates are not checked. It is read when a root is announced, by an agent that
/// already trusts `current`, to decide whether to trust `announced` itself; from then on
/// `announced`'s own validity (checked wherever a root is used) is what counts. And Vault's
/// `sign-self-issued` keeps the announced root's own dates, so they say nothing more.
pub fn check_cross(
    cross: &Certificate,
    current: &Certificate,
    announced: &Certificate,
) -> Result<(), CrossError> {
    let tbs = cross.tbs_certificate();
    if der(tbs.subject()) != der(announced.tbs_certificate().subject()) {
        return Err(CrossError::Subject);
    }
    if der(tbs.subject_public_key_info())
        != der(announced.tbs_certificate().subject_public_key_info())
    {
        return Err(CrossError::PublicKey);
    }
    if der(tbs.issuer()) != der(current.tbs_certificate().subject()) {
        return Err(CrossError::Issuer);
    }
    if !is_ca(tbs) {
        return Err(CrossError::NotCa);
    }
    let verifier = PublicKeyVerifier::new(current.tbs_certificate().subject_public_key_info())
        .map_err(|e| CrossError::Signature(e.to_string()))?;
    super::profile::verify_certificate_signature(cross, &verifier).map_err(|e| match e {
        SignatureError::Invalid => CrossError::Signature("the signature does not verify".into()),
        other => CrossError::Signature(other.to_string()),
    })
}

/// The DER of `value` (empty if it cannot be encoded, which then matches nothing real).
fn der<T: Encode>(value: &T) -> Vec<u8> {
    value.to_der().unwrap_or_default()
}

/// What the signer checks on a cross certificate it made, beyond [`check_cross`]: the
/// key identifiers (SKI the announced root's, AKI the current root's). A wrong AKI does
/// not fool meshca's agents, but a verifier that goes by key identifiers (openssl) would
/// take a cross certificate between two roots of the same name for self-signed.
pub fn check_cross_key_ids(
    cross: &Certificate,
    current: &RootCa,
    announced: &RootCa,
) -> Result<(), CrossError> {
    use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
    let tbs = cross.tbs_certificate();
    let ski = tbs
        .get_extension::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, ski)| ski.0.as_bytes().to_vec());
    if ski.as_deref() != Some(announced.subject_key_id.as_slice()) {
        return Err(CrossError::KeyIds(
            "its subject key identifier is not the announced root's".into(),
        ));
    }
    let aki = tbs
        .get_extension::<AuthorityKeyIdentifier>()
        .ok()
        .flatten()
        .and_then(|(_, aki)| aki.key_identifier.map(|id| id.as_bytes().to_vec()));
    if aki.as_deref() != Some(current.subject_key_id.as_slice()) {
        return Err(CrossError::KeyIds(
            "its authority key identifier is not the current root's subject key identifier".into(),
        ));
    }
    Ok(())
}

/// [`check_cross`] of a PEM cross certificate (exactly one certificate).
pub fn check_cross_pem(
    cross_pem: &str,
    current: &Certificate,
    announced: &Certificate,
) -> Result<(), CrossError> {
    let mut certs = decode_certificates(cross_pem)
        .map_err(|e: PemError| CrossError::Unreadable(e.to_string()))?;
    if certs.len() != 1 {
        return Err(CrossError::Unreadable(format!(
            "{} certificates, expected one",
            certs.len()
        )));
    }
    check_cross(&certs.remove(0), current, announced)
}

/// Reads a DER certificate (a backend's answer) as a cross certificate.
pub fn from_der(der: &[u8]) -> Result<Certificate, CrossError> {
    Certificate::from_der(der).map_err(|e| CrossError::Unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::keys::{KeyType, PrivateKey};
    use crate::pki::testing::software_root;
    use x509_cert::ext::pkix::{
        AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
    };

    const DAY: Duration = Duration::from_secs(86_400);

    fn cross(key: &PrivateKey, current: &RootCa, announced: &RootCa) -> Certificate {
        crate::pki::testing::software_cross(key, current, announced)
    }

    #[test]
    fn the_cross_certificate_has_the_announced_roots_name_key_and_ski_under_the_current_one() {
        let (key, current) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let (_, next) = software_root(KeyType::Rsa2048, "acme", 800 * DAY);
        let before = SystemTime::now();
        let cert = cross(&key, &current, &next);
        let tbs = cert.tbs_certificate();
        assert_eq!(tbs.subject(), &next.subject);
        assert_eq!(tbs.issuer(), &current.subject);
        assert_eq!(tbs.subject_public_key_info(), &next.public_key);
        let (critical, bc) = tbs.get_extension::<BasicConstraints>().unwrap().unwrap();
        assert!(critical && bc.ca);
        assert_eq!(bc.path_len_constraint, Some(1));
        let (critical, ku) = tbs.get_extension::<KeyUsage>().unwrap().unwrap();
        assert!(critical);
        assert_eq!(ku, crate::pki::profile::root_key_usage());
        let (_, ski) = tbs
            .get_extension::<SubjectKeyIdentifier>()
            .unwrap()
            .unwrap();
        assert_eq!(ski.0.as_bytes(), next.subject_key_id);
        let (_, aki) = tbs
            .get_extension::<AuthorityKeyIdentifier>()
            .unwrap()
            .unwrap();
        assert_eq!(
            aki.key_identifier.unwrap().as_bytes(),
            current.subject_key_id
        );
        // Backdated as everything the signer issues; ends with the earlier root.
        let validity = tbs.validity();
        let not_before = validity.not_before.to_system_time();
        assert!(not_before <= before - BACKDATE + Duration::from_secs(1));
        assert!(not_before >= before - BACKDATE - Duration::from_secs(5));
        assert_eq!(
            validity.not_after.to_system_time(),
            crate::pki::testing::whole_seconds(current.not_after)
        );
        assert_ne!(
            tbs.serial_number(),
            next.certificate.tbs_certificate().serial_number()
        );
        assert!(!crate::pki::profile::is_negative_serial(
            tbs.serial_number()
        ));
        assert_eq!(
            check_cross(&cert, &current.certificate, &next.certificate),
            Ok(())
        );
        let served = CrossCert::of(&cert).unwrap();
        assert_eq!(
            check_cross_pem(&served.pem, &current.certificate, &next.certificate),
            Ok(())
        );
        assert_eq!(served.serial, serial_hex(tbs.serial_number()));
    }

    #[test]
    fn a_cross_certificate_vouches_only_for_that_root_under_that_key() {
        let (key, current) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (other_key, other) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (_, next) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let (_, renamed) = software_root(KeyType::EcdsaP384, "evil", 400 * DAY);
        let good = cross(&key, &current, &next);
        // Signed by another key, under the current root's name.
        let mut forged_issuer = other.clone();
        forged_issuer.subject = current.subject.clone();
        let forged = cross(&other_key, &forged_issuer, &next);
        assert!(matches!(
            check_cross(&forged, &current.certificate, &next.certificate),
            Err(CrossError::Signature(_))
        ));
        // Checked against another root's key (the same name: test roots share it), and
        // against a root of another name.
        assert!(matches!(
            check_cross(&good, &other.certificate, &next.certificate),
            Err(CrossError::Signature(_))
        ));
        assert_eq!(
            check_cross(&good, &renamed.certificate, &next.certificate),
            Err(CrossError::Issuer)
        );
        // Another subject (the same key would still need that exact name).
        let mut other_name = next.clone();
        other_name.subject = renamed.subject.clone();
        let wrong_subject = cross(&key, &current, &other_name);
        assert_eq!(
            check_cross(&wrong_subject, &current.certificate, &next.certificate),
            Err(CrossError::Subject)
        );
        // Another key under the announced root's name.
        let mut other_key_same_name = renamed.clone();
        other_key_same_name.subject = next.subject.clone();
        let wrong_key = cross(&key, &current, &other_key_same_name);
        assert_eq!(
            check_cross(&wrong_key, &current.certificate, &next.certificate),
            Err(CrossError::PublicKey)
        );
        // The root itself (self-signed) is not a cross certificate for it.
        assert!(check_cross(&next.certificate, &current.certificate, &next.certificate).is_err());
        assert!(matches!(
            check_cross_pem("junk", &current.certificate, &next.certificate),
            Err(CrossError::Unreadable(_))
        ));
    }
}
