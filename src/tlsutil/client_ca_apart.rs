//! The client CA must be apart from the mesh PKI. The signer hands each cluster an
//! intermediate of the mesh root, and its key lies in that cluster's
//! `istio-system/cacerts`; were the mesh root (or one of its intermediates) trusted for
//! clients, that key could issue a client certificate naming any other cluster and get
//! that cluster's intermediates from the signer.

use std::path::Path;

use der::Decode;
use rustls_pki_types::CertificateDer;
use x509_cert::Certificate;

use crate::pki::profile::verify_certificate_signature;
use crate::pki::sigalg::PublicKeyVerifier;

/// A mesh root the client CA is checked against: the root in force, the next or the
/// previous root.
pub struct MeshRoot {
    /// How the config names it, e.g. "the root (root.certificate root-cert.pem)".
    pub name: String,
    pub certificate: Certificate,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientCaError {
    #[error(
        "tls.client_ca {path}: the certificate {subject} {relation} {root}: a client CA must not be a mesh root nor issued by one, since any cluster's intermediate key (in its istio-system/cacerts) could then issue client certificates naming other clusters and get their intermediates; give client certificates a CA of their own (a transport PKI apart from the mesh root)"
    )]
    MeshCertificate {
        path: String,
        subject: String,
        relation: &'static str,
        root: String,
    },
    #[error("tls.client_ca {path}: a certificate does not parse: {message}")]
    Unreadable { path: String, message: String },
    #[error("{root}: its key cannot check signatures: {message}")]
    UnusableRoot { root: String, message: String },
    #[error(
        "clients: {identity:?}: issuer {issuer} is no CA certificate in tls.client_ca {path}, so this client could never be served; it holds {held}"
    )]
    IssuerNotInClientCa {
        identity: String,
        issuer: String,
        path: String,
        held: String,
    },
    #[error(
        "clients: {identity:?}: issuer {issuer}: {count} CA certificates in tls.client_ca {path} have that subject, and any of them could issue this identity; pin the CA by its sha256"
    )]
    IssuerSubjectShared {
        identity: String,
        issuer: String,
        path: String,
        count: usize,
    },
}

/// Refuses a client CA certificate (of `client_cas`, read from `path`) that has the key
/// of one of `mesh_roots` or was signed by one. Issuance is decided by the signature, not
/// by the issuer name or the authority key identifier: those are labels anyone can copy,
/// and the key identifiers are optional; the signature is what only the root's key makes.
pub fn check_client_ca_apart_from_mesh(
    path: &Path,
    client_cas: &[CertificateDer<'_>],
    mesh_roots: &[MeshRoot],
) -> Result<(), ClientCaError> {
    let roots = mesh_roots
        .iter()
        .map(|root| {
            let key = root.certificate.tbs_certificate().subject_public_key_info();
            PublicKeyVerifier::new(key)
                .map(|verifier| (root, verifier))
                .map_err(|e| ClientCaError::UnusableRoot {
                    root: root.name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for der in client_cas {
        let ca = Certificate::from_der(der).map_err(|e| ClientCaError::Unreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        for (root, verifier) in &roots {
            // The key bits alone: the same key may come with its algorithm's parameters
            // spelled another way.
            let same_key = ca
                .tbs_certificate()
                .subject_public_key_info()
                .subject_public_key
                == root
                    .certificate
                    .tbs_certificate()
                    .subject_public_key_info()
                    .subject_public_key;
            let relation = if same_key {
                "has the public key of"
            } else if verify_certificate_signature(&ca, verifier).is_ok() {
                "was issued by"
            } else {
                continue;
            };
            return Err(ClientCaError::MeshCertificate {
                path: path.display().to_string(),
                subject: ca.tbs_certificate().subject().to_string(),
                relation,
                root: root.name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls_pki_types::pem::PemObject;

    use super::*;
    use crate::pki::keys::KeyType;
    use crate::pki::testing::{software_bundle, software_root};

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_mesh_root_or_a_certificate_it_signed_is_refused_as_client_ca_another_ca_is_not() {
        let day = Duration::from_secs(86400);
        let (root_key, root) = software_root(KeyType::EcdsaP256, "acme", day);
        let (_, other_root) = software_root(KeyType::EcdsaP256, "acme", day);
        let now = SystemTime::now();
        let intermediate = software_bundle(
            &root_key,
            &root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            now,
            now + day,
        );
        let roots = [MeshRoot {
            name: "the root (root.certificate root-cert.pem)".into(),
            certificate: root.certificate.clone(),
        }];
        let path = Path::new("client-ca.pem");
        let check = |pem: &str| check_client_ca_apart_from_mesh(path, &[der_of(pem)], &roots);

        let refused = check(&root.pem).unwrap_err().to_string();
        assert!(
            refused.starts_with("tls.client_ca client-ca.pem: the certificate ")
                && refused
                    .contains(" has the public key of the root (root.certificate root-cert.pem)"),
            "{refused}"
        );
        let refused = check(&intermediate.ca_cert).unwrap_err().to_string();
        assert!(
            refused.contains("CN=cluster-a")
                && refused.contains(" was issued by the root (root.certificate"),
            "{refused}"
        );
        check(&other_root.pem).unwrap();
    }
}
