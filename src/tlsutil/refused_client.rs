//! Who a refused client said it was, and whether that is known. rustls hands the server
//! nothing of a client certificate it refused, so the log of a refused handshake could
//! name only the peer's address, which for agents behind one NAT names no cluster. The
//! client verifier is wrapped to note, for the handshake under way, the identity, serial
//! and notAfter of a certificate it refuses, and whether its chain was shown to lead to
//! `client_ca`: anyone who can reach the port can present a certificate naming any
//! client.
//!
//! A refusal for a date is asked again at a time the chain is valid. webpki checks each
//! certificate's dates before it looks for the certificate's issuer, and of the chains it
//! tried it reports the date error over "unknown issuer": a self-signed certificate that
//! has expired would otherwise be refused as `client_certificate_expired`, named by the
//! client it claims to be, firing the alert and using up that reason's log lines.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use der::Decode;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use x509_cert::Certificate;

use super::ClientCaSet;

tokio::task_local! {
    /// The refused certificate of the handshake the current task runs.
    static REFUSED: RefCell<Option<RefusedClient>>;
}

/// Runs `handshake`, and returns with its output the client certificate refused in it,
/// if one was.
pub async fn accept_noting_refused_client<F: Future>(
    handshake: F,
) -> (F::Output, Option<RefusedClient>) {
    REFUSED
        .scope(RefCell::new(None), async {
            let output = handshake.await;
            (output, REFUSED.with(|refused| refused.take()))
        })
        .await
}

/// A client verifier that decides as webpki does with the client CAs and CRLs, and notes
/// what it refuses (see the module's comment). The other two verifiers only explain a
/// refusal; they never let a certificate through.
#[derive(Debug)]
pub struct NotingVerifier {
    deciding: Arc<dyn ClientCertVerifier>,
    /// The same client CAs and CRLs, a CRL's nextUpdate not enforced (only a chain's own
    /// dates are set aside when asking again, not how fresh the CRLs are now).
    dates_aside: Arc<dyn ClientCertVerifier>,
    /// The same client CAs, no CRLs: whether a certificate refused for its revocation
    /// status chains to them at all. webpki checks each certificate of a path against the
    /// CRLs right after its signature, so a revoked (or unlisted) intermediate is reported
    /// before the end entity's signature is checked.
    revocation_aside: Arc<dyn ClientCertVerifier>,
    /// The client CAs, to refuse a chain that leads to one that has ended (webpki never
    /// looks at a trust anchor's dates), and when the first of them ends: until then
    /// there is nothing to look for.
    client_cas: Arc<ClientCaSet>,
    first_ca_end: std::time::SystemTime,
}

impl NotingVerifier {
    /// Client certificates must chain to `client_cas` and not be revoked by `crls`; with
    /// `enforce_crl_next_update`, a CRL past its nextUpdate refuses the certificates it
    /// covers.
    pub fn new(
        client_cas: Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        enforce_crl_next_update: bool,
        provider: Arc<rustls::crypto::CryptoProvider>,
        (client_ca_set, first_ca_end): (Arc<ClientCaSet>, std::time::SystemTime),
    ) -> Result<Self, VerifierBuilderError> {
        let builder =
            || WebPkiClientVerifier::builder_with_provider(client_cas.clone(), provider.clone());
        let mut deciding = builder().with_crls(crls.clone());
        if enforce_crl_next_update {
            deciding = deciding.enforce_revocation_expiration();
        }
        Ok(NotingVerifier {
            deciding: deciding.build()?,
            dates_aside: builder().with_crls(crls).build()?,
            revocation_aside: builder().build()?,
            client_cas: client_ca_set,
            first_ca_end,
        })
    }

    /// Why a chain webpki took is refused all the same: it leads to a client CA that has
    /// ended, as Go and OpenSSL see it (and the README's `MeshcaClientCaExpiresSoon` says).
    fn ended_client_ca(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<rustls::Error> {
        if super::system_time(now) <= self.first_ca_end {
            return None;
        }
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(intermediates.iter().cloned())
            .collect();
        let (ca, ended) = self.client_cas.ended_ca_of(&chain, now)?;
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(ClientCaEnded {
                subject: ca.subject,
                sha256: ca.sha256,
                ended,
            })),
        )))
    }

    /// What a refused certificate is refused with, and whether its chain was shown to lead
    /// to a client CA.
    fn explain(
        &self,
        error: rustls::Error,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Refusal {
        if !is_date_error(&error) {
            return self.refusal_at(error, end_entity, intermediates, now);
        }
        let Some(valid_at) = time_the_chain_is_valid(end_entity, intermediates) else {
            return Refusal::unverified(DateRecheckError::NoValidityPeriod.into());
        };
        match self
            .dates_aside
            .verify_client_cert(end_entity, intermediates, valid_at)
        {
            // The chain leads to a client CA, revocation included: the date is the reason.
            Ok(_) => Refusal {
                error,
                chains_to_client_ca: true,
            },
            // A date again: of another certificate than the end entity (valid at
            // `valid_at`), one whose dates match no time the rest is valid at. No chain
            // valid at one time leads to a client CA.
            Err(again) if is_date_error(&again) => {
                Refusal::unverified(CertificateError::UnknownIssuer.into())
            }
            Err(again) => self.refusal_at(again, end_entity, intermediates, valid_at),
        }
    }

    /// `error` as the refusal, verified only for a revocation status (the only errors
    /// webpki finds on a path that reached a client CA) and only if the chain leads to a
    /// client CA at `at` when CRLs are not consulted.
    fn refusal_at(
        &self,
        error: rustls::Error,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: UnixTime,
    ) -> Refusal {
        let chains_to_client_ca = is_revocation_error(&error)
            && self
                .revocation_aside
                .verify_client_cert(end_entity, intermediates, at)
                .is_ok();
        Refusal {
            error,
            chains_to_client_ca,
        }
    }
}

/// Why a certificate was refused, and whether its chain was shown to lead to a client CA
/// (else the identity it names is only claimed).
struct Refusal {
    error: rustls::Error,
    chains_to_client_ca: bool,
}

impl Refusal {
    fn unverified(error: rustls::Error) -> Self {
        Refusal {
            error,
            chains_to_client_ca: false,
        }
    }
}

/// A chain that leads to a client CA that has ended: refused as `client_certificate_expired`
/// ([`super::certificate_refusal_reason`]), named so, since the client's own certificate
/// may well be valid.
#[derive(Debug, thiserror::Error)]
#[error(
    "the client CA it chains to, {subject} (sha256 {sha256}), ended at {}: its clients are refused; reissue them under its successor in tls.client_ca",
    crate::pki::datetime::rfc3339(*ended)
)]
pub struct ClientCaEnded {
    subject: String,
    sha256: String,
    ended: std::time::SystemTime,
}

/// A refusal made when asking again at a time the chain is valid.
#[derive(Debug, thiserror::Error)]
enum DateRecheckError {
    #[error(
        "the certificate is valid at no time (its notAfter is before its notBefore, or its dates do not parse)"
    )]
    NoValidityPeriod,
}

impl From<DateRecheckError> for rustls::Error {
    fn from(e: DateRecheckError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// A certificate of the chain is expired or not yet valid (rustls reports a certificate
/// whose notBefore is after its notAfter as expired too).
fn is_date_error(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }
        )
    )
}

/// What only a CRL check finds, on a path already found to lead to a client CA.
fn is_revocation_error(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(
            CertificateError::Revoked
                | CertificateError::UnknownRevocationStatus
                | CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. }
        )
    )
}

/// A time at which the end entity is valid, and every intermediate presented too if there
/// is such a time (the latest notBefore): an issuer was valid when it issued. A client may
/// send an extra certificate whose dates match no other; then only the end entity's count.
/// None if the end entity is valid at no time.
fn time_the_chain_is_valid(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<UnixTime> {
    let end_entity = validity(end_entity).filter(|(from, to)| from <= to)?;
    let all = intermediates
        .iter()
        .filter_map(|der| validity(der))
        .fold(end_entity, |(from, to), (other_from, other_to)| {
            (from.max(other_from), to.min(other_to))
        });
    let (from, _) = if all.0 <= all.1 { all } else { end_entity };
    Some(UnixTime::since_unix_epoch(from))
}

/// notBefore and notAfter, from the Unix epoch.
fn validity(der: &[u8]) -> Option<(Duration, Duration)> {
    let cert = Certificate::from_der(der).ok()?;
    let validity = cert.tbs_certificate().validity();
    Some((
        validity.not_before.to_unix_duration(),
        validity.not_after.to_unix_duration(),
    ))
}

impl ClientCertVerifier for NotingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.deciding.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.deciding.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.deciding.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refusal = match self
            .deciding
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(verified) => match self.ended_client_ca(end_entity, intermediates, now) {
                None => return Ok(verified),
                Some(error) => Refusal {
                    error,
                    chains_to_client_ca: true,
                },
            },
            Err(error) => self.explain(error, end_entity, intermediates, now),
        };
        // Outside a handshake run by `accept_noting_refused_client` there is nowhere to
        // note it, and nothing to do.
        let _ = REFUSED.try_with(|refused| {
            refused.replace(Some(RefusedClient::of(
                end_entity,
                refusal.chains_to_client_ca,
            )));
        });
        Err(refusal.error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.deciding.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.deciding.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.deciding.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.deciding.requires_raw_public_keys()
    }
}
/// Longest identity written: anyone who can reach the port can present a certificate.
const IDENTITY_LIMIT: usize = 256;

/// A client certificate refused in a handshake, as the log names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusedClient {
    /// A certificate that does not parse.
    Unparsed,
    Certificate {
        /// The identity it names (clipped; `none` if it names none).
        identity: String,
        /// Whether its chain was shown to lead to a client CA: otherwise the identity is
        /// only claimed (anyone can put any identity in a certificate of their own).
        chains_to_client_ca: bool,
        /// Its serial, hex.
        serial: String,
        /// Its notAfter, RFC 3339.
        not_after: String,
    },
}

impl RefusedClient {
    fn of(der: &[u8], chains_to_client_ca: bool) -> Self {
        let Ok(cert) = Certificate::from_der(der) else {
            return RefusedClient::Unparsed;
        };
        let identity = match super::client_identity(der) {
            Some(id) => crate::logging::clip(&id, IDENTITY_LIMIT),
            None => "none".into(),
        };
        let tbs = cert.tbs_certificate();
        RefusedClient::Certificate {
            identity,
            chains_to_client_ca,
            serial: crate::pki::profile::serial_hex(tbs.serial_number()),
            not_after: crate::signer::audit::rfc3339(tbs.validity().not_after.to_system_time()),
        }
    }

    /// The identity of a certificate whose chain leads to a client CA: a client the CA
    /// named, as every other log line's `client` is.
    pub fn client(&self) -> Option<&str> {
        match self {
            RefusedClient::Certificate {
                identity,
                chains_to_client_ca: true,
                ..
            } => Some(identity),
            _ => None,
        }
    }

    /// The identity of a certificate not shown to come from a client CA: only claimed.
    pub fn claimed_client(&self) -> Option<&str> {
        match self {
            RefusedClient::Certificate {
                identity,
                chains_to_client_ca: false,
                ..
            } => Some(identity),
            _ => None,
        }
    }

    pub fn serial(&self) -> Option<&str> {
        match self {
            RefusedClient::Certificate { serial, .. } => Some(serial),
            RefusedClient::Unparsed => None,
        }
    }

    pub fn not_after(&self) -> Option<&str> {
        match self {
            RefusedClient::Certificate { not_after, .. } => Some(not_after),
            RefusedClient::Unparsed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::pki::keys::KeyType;
    use crate::pki::testing::{software_bundle, software_root};

    #[test]
    fn a_refused_certificate_is_named_by_what_names_its_client() {
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
        let verified = RefusedClient::of(&der, true);
        // No SAN: the identity is the CN, as for a client the signer serves.
        assert_eq!(verified.client(), Some("cluster-a"));
        assert_eq!(verified.claimed_client(), None);
        assert!(verified.serial().is_some_and(|s| !s.is_empty()));
        assert_eq!(verified.not_after(), Some("2033-05-18T03:33:20.000Z"));
        // Not shown to chain to a client CA: only claimed.
        let claimed = RefusedClient::of(&der, false);
        assert_eq!(
            (claimed.client(), claimed.claimed_client()),
            (None, Some("cluster-a"))
        );
        assert_eq!(claimed.serial(), verified.serial());
        let junk = RefusedClient::of(b"junk", true);
        assert_eq!(junk, RefusedClient::Unparsed);
        assert_eq!((junk.client(), junk.serial()), (None, None));
    }
}
