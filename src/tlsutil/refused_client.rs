//! Who a refused client said it was. rustls hands the server nothing of a client
//! certificate it refused, so the log of a refused handshake could name only the peer's
//! address, which for agents behind one NAT names no cluster. The client verifier is
//! wrapped to note, for the handshake under way, the identity, serial and notAfter of a
//! certificate it refuses.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use der::Decode;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::Certificate;

tokio::task_local! {
    /// The refused certificate of the handshake the current task runs, described.
    static REFUSED: RefCell<Option<String>>;
}

/// Runs `handshake`, and returns with its output the description of the client
/// certificate refused in it, if one was.
pub async fn accept_noting_refused_client<F: Future>(handshake: F) -> (F::Output, Option<String>) {
    REFUSED
        .scope(RefCell::new(None), async {
            let output = handshake.await;
            (output, REFUSED.with(|refused| refused.take()))
        })
        .await
}

/// A client verifier that notes what it refuses (see the module's comment); it decides
/// nothing itself.
#[derive(Debug)]
pub struct NotingVerifier(pub Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NotingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self.0.verify_client_cert(end_entity, intermediates, now);
        if verdict.is_err() {
            // Outside a handshake run by `accept_noting_refused_client` there is nowhere
            // to note it, and nothing to do.
            let _ = REFUSED.try_with(|refused| {
                refused.replace(Some(describe(end_entity)));
            });
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// Longest identity written: anyone who can reach the port can present a certificate.
const IDENTITY_LIMIT: usize = 256;

/// `identity <id>, serial <hex>, notAfter <time>` of a refused certificate.
fn describe(der: &[u8]) -> String {
    let Ok(cert) = Certificate::from_der(der) else {
        return "a certificate that does not parse".into();
    };
    let identity = match super::client_identity(der) {
        Some(id) => crate::logging::clip(&id, IDENTITY_LIMIT),
        None => "none".into(),
    };
    let tbs = cert.tbs_certificate();
    format!(
        "identity {identity}, serial {}, notAfter {}",
        crate::pki::csr::hex(tbs.serial_number().as_bytes()),
        crate::signer::audit::rfc3339(tbs.validity().not_after.to_system_time()),
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::pki::keys::KeyType;
    use crate::pki::testing::{software_bundle, software_root};

    #[test]
    fn a_refused_certificate_is_described_by_what_names_its_client() {
        let (root_key, root) = software_root(KeyType::EcdsaP256, "acme", Duration::from_secs(3600));
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let bundle = software_bundle(
            &root_key,
            &root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            not_after - Duration::from_secs(60),
            not_after,
        );
        let der = <CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            bundle.ca_cert.as_bytes(),
        )
        .unwrap();
        let described = describe(&der);
        // No SAN: the identity is the CN, as for a client the signer serves.
        assert!(
            described.starts_with("identity cluster-a, serial "),
            "{described}"
        );
        assert!(
            described.ends_with(", notAfter 2033-05-18T03:33:20.000Z"),
            "{described}"
        );
        assert_eq!(describe(b"junk"), "a certificate that does not parse");
    }
}
