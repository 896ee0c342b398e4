//! Which client CA a client's certificate chains to, and the `[[clients]] issuer` that pins
//! an identity to one. With several CAs in `tls.client_ca` (a shared transport CA and a
//! team's own), each could otherwise issue a certificate naming any client and get that
//! client's grants: the identity alone does not say who vouched for it.

use std::fmt;
use std::path::Path;

use der::Decode;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::Digest;
use x509_cert::Certificate;

use super::ClientCaError;

/// The CA certificate in `tls.client_ca` a client's chain leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCa {
    /// SHA-256 of its DER, lowercase hex.
    pub sha256: String,
    /// Its subject (RFC 4514, as `openssl x509 -noout -subject -nameopt RFC2253` prints it).
    pub subject: String,
    /// How many CA certificates in `tls.client_ca` have this subject, itself included: a
    /// subject pin names a CA only while it is the one with that subject.
    pub sharing_subject: usize,
}

/// What a `[[clients]] issuer` names: a CA certificate in `tls.client_ca`, by the SHA-256
/// of its DER (unambiguous, changes when the CA is renewed) or by its subject (survives a
/// renewal; refused while two CAs there have it, since a CA's subject is a label whoever
/// makes one chooses).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IssuerPin {
    /// Lowercase hex.
    Sha256(String),
    Subject(String),
}

impl IssuerPin {
    /// `sha256:<64 hex digits>` (any case, byte pairs may be separated by `:` as openssl
    /// prints a fingerprint), else an RFC 4514 subject (`CN=team pay CA,O=pay`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(hex) = text.strip_prefix("sha256:") {
            let hex: String = hex.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "issuer {text:?} is no SHA-256 fingerprint (sha256: and 64 hex digits, as `openssl x509 -noout -fingerprint -sha256` prints them)"
                ));
            }
            return Ok(IssuerPin::Sha256(hex.to_ascii_lowercase()));
        }
        if !text.contains('=') {
            return Err(format!(
                "issuer {text:?} is neither sha256:<fingerprint> nor a subject (RFC 4514, as `openssl x509 -noout -subject -nameopt RFC2253` prints it: CN=...,O=...)"
            ));
        }
        Ok(IssuerPin::Subject(text.to_string()))
    }

    /// Whether a chain that leads to `ca` (none: to no CA of `tls.client_ca` now) is
    /// issued by the CA pinned; if not, why, in a sentence.
    pub fn admits(&self, ca: Option<&ClientCa>) -> Result<(), String> {
        let Some(ca) = ca else {
            return Err(format!(
                "the client certificate's chain leads to no CA in tls.client_ca now, and its identity is pinned to issuer {self}"
            ));
        };
        let matches = match self {
            IssuerPin::Sha256(sha256) => *sha256 == ca.sha256,
            IssuerPin::Subject(subject) => {
                if *subject == ca.subject && ca.sharing_subject > 1 {
                    return Err(format!(
                        "{} CAs in tls.client_ca have the subject {subject} its identity is pinned to: pin it by the CA's sha256",
                        ca.sharing_subject
                    ));
                }
                *subject == ca.subject
            }
        };
        if matches {
            return Ok(());
        }
        Err(format!(
            "the client certificate chains to the client CA {} (sha256:{}), but its identity is pinned to issuer {self}",
            ca.subject, ca.sha256
        ))
    }
}

impl fmt::Display for IssuerPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssuerPin::Sha256(hex) => write!(f, "sha256:{hex}"),
            IssuerPin::Subject(subject) => write!(f, "{subject}"),
        }
    }
}

/// A client CA certificate described for a pin (its SHA-256 and subject), and when it
/// ends (None: it does not parse).
struct CaName {
    sha256: String,
    subject: String,
    ends: Option<std::time::SystemTime>,
}

fn ca_names(client_cas: &[CertificateDer<'_>]) -> Vec<CaName> {
    client_cas
        .iter()
        .map(|der| {
            let ca = Certificate::from_der(der).ok();
            CaName {
                sha256: crate::pki::csr::hex(&sha2::Sha256::digest(der)),
                subject: ca.as_ref().map_or_else(
                    || "(a certificate that does not parse)".into(),
                    |ca| ca.tbs_certificate().subject().to_string(),
                ),
                ends: ca.map(|ca| ca.tbs_certificate().validity().not_after.to_system_time()),
            }
        })
        .collect()
}

/// The client CAs of one TLS load, as trust anchors each with its [`ClientCa`]: made once
/// per load (start, reload) and shared by the connections accepted under it, so a
/// connection's client CA is found without hashing and parsing every CA again.
#[derive(Debug)]
pub struct ClientCaSet {
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    /// Of each anchor, at the same place.
    cas: Vec<ClientCa>,
    /// When each anchor's certificate ends, at the same place (None: its dates do not
    /// parse). webpki never looks at a trust anchor's dates.
    ends: Vec<Option<std::time::SystemTime>>,
}

impl ClientCaSet {
    pub fn of(client_cas: &[CertificateDer<'_>]) -> Self {
        let names = ca_names(client_cas);
        // A CA that does not parse as a trust anchor is left out, as rustls's store leaves
        // it; the subjects shared are counted over them all, as a pin is checked.
        let mut set = ClientCaSet {
            anchors: Vec::new(),
            cas: Vec::new(),
            ends: Vec::new(),
        };
        for (der, name) in client_cas.iter().zip(&names) {
            let Ok(anchor) = webpki::anchor_from_trusted_cert(der) else {
                continue;
            };
            set.anchors.push(anchor.to_owned());
            set.cas.push(ClientCa {
                sha256: name.sha256.clone(),
                subject: name.subject.clone(),
                sharing_subject: names.iter().filter(|n| n.subject == name.subject).count(),
            });
            set.ends.push(name.ends);
        }
        set
    }

    /// The CA that `chain` leads to at `now` (as [`ClientCaSet::chained_to`]) if it has
    /// ended, with its end: webpki takes a chain to an ended CA, which Go and OpenSSL
    /// refuse, and the README promises the signer refuses.
    pub fn ended_ca_of(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<(ClientCa, std::time::SystemTime)> {
        let at = super::system_time(now);
        let index = self.anchor_of(chain, now)?;
        let end = self.ends.get(index).copied().flatten()?;
        // A CA renewed with the same name and key (its new certificate beside the old)
        // vouches for the same chain: webpki may have ended the path at the old one.
        let anchor = &self.anchors[index];
        let renewed = self
            .anchors
            .iter()
            .zip(&self.ends)
            .any(|(other, other_end)| {
                other.subject == anchor.subject
                    && other.subject_public_key_info == anchor.subject_public_key_info
                    && other_end.is_some_and(|other_end| at <= other_end)
            });
        (end < at && !renewed).then(|| (self.cas[index].clone(), end))
    }

    /// The CA that `chain` (leaf first, as the handshake presented it) leads to at `now`,
    /// as webpki builds the path (the CRLs aside: the handshake and the recheck once the
    /// body is in consult them). webpki tries the CAs before the intermediates a client
    /// sends, so a chain that leads to several ends at the nearest. None if it leads to
    /// none.
    pub fn chained_to(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Option<ClientCa> {
        self.cas.get(self.anchor_of(chain, now)?).cloned()
    }

    /// The place of the anchor `chain` leads to at `now` (see [`ClientCaSet::chained_to`]).
    fn anchor_of(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Option<usize> {
        let (leaf, intermediates) = chain.split_first()?;
        let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
        let algorithms = super::chosen_provider()
            .signature_verification_algorithms
            .all;
        let path = leaf
            .verify_for_usage(
                algorithms,
                &self.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .ok()?;
        self.anchors
            .iter()
            .position(|a| std::ptr::eq(a, path.anchor()))
    }
}

/// Refuses a pin (identity, issuer) that names no CA certificate of `client_cas` (read
/// from `path`), or a subject more than one of them has: its client could never be served,
/// or any of those CAs could issue its identity.
pub fn check_issuer_pins<'a>(
    path: &Path,
    pins: impl IntoIterator<Item = (&'a str, &'a IssuerPin)>,
    client_cas: &[CertificateDer<'_>],
) -> Result<(), ClientCaError> {
    let names = ca_names(client_cas);
    for (identity, pin) in pins {
        let matching = names
            .iter()
            .filter(|name| match pin {
                IssuerPin::Sha256(sha256) => name.sha256 == *sha256,
                IssuerPin::Subject(subject) => name.subject == *subject,
            })
            .count();
        let (identity, issuer, path) = (
            identity.to_string(),
            pin.to_string(),
            path.display().to_string(),
        );
        match matching {
            1 => {}
            0 => {
                let held = names
                    .iter()
                    .map(|name| format!("sha256:{} ({})", name.sha256, name.subject))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ClientCaError::IssuerNotInClientCa {
                    identity,
                    issuer,
                    path,
                    held,
                });
            }
            count => {
                return Err(ClientCaError::IssuerSubjectShared {
                    identity,
                    issuer,
                    path,
                    count,
                });
            }
        }
    }
    Ok(())
}

/// With more than one CA in `client_cas`, the clients of `unpinned` (identities without
/// an `issuer`) in a warning.
pub fn unpinned_clients_warning(
    client_cas: &[CertificateDer<'_>],
    unpinned: &[&str],
) -> Option<String> {
    if client_cas.len() < 2 || unpinned.is_empty() {
        return None;
    }
    Some(format!(
        "tls.client_ca holds {} CA certificates and these clients have no issuer: any of those CAs can issue their identity ({}); pin each to its CA with [[clients]] issuer",
        client_cas.len(),
        unpinned.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4f0c0000000000000000000000000000000000000000000000000000000000aa";

    fn ca(sha256: &str, subject: &str, sharing_subject: usize) -> ClientCa {
        ClientCa {
            sha256: sha256.into(),
            subject: subject.into(),
            sharing_subject,
        }
    }

    #[test]
    fn an_issuer_is_a_fingerprint_or_a_subject() {
        assert_eq!(
            IssuerPin::parse(&format!("sha256:{}", HEX.to_uppercase())),
            Ok(IssuerPin::Sha256(HEX.into()))
        );
        // As openssl prints a fingerprint: byte pairs separated by ':'.
        let colons: Vec<String> = HEX
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect();
        assert_eq!(
            IssuerPin::parse(&format!("sha256:{}", colons.join(":"))),
            Ok(IssuerPin::Sha256(HEX.into()))
        );
        assert_eq!(
            IssuerPin::parse("CN=team pay CA,O=pay"),
            Ok(IssuerPin::Subject("CN=team pay CA,O=pay".into()))
        );
        for wrong in ["sha256:4f0c", "sha256:zz", "team pay CA", ""] {
            assert!(IssuerPin::parse(wrong).is_err(), "{wrong}");
        }
    }

    #[test]
    fn a_pin_admits_only_its_ca() {
        let shared = ca(HEX, "CN=shared CA", 1);
        let pay = ca(&"11".repeat(32), "CN=team pay CA,O=pay", 1);
        let by_hash = IssuerPin::Sha256(HEX.into());
        assert_eq!(by_hash.admits(Some(&shared)), Ok(()));
        let refused = by_hash.admits(Some(&pay)).unwrap_err();
        assert!(refused.contains("CN=team pay CA,O=pay"), "{refused}");
        assert!(refused.contains(&format!("pinned to issuer sha256:{HEX}")));
        assert!(by_hash.admits(None).is_err());
        let by_subject = IssuerPin::Subject("CN=shared CA".into());
        assert_eq!(by_subject.admits(Some(&shared)), Ok(()));
        assert!(by_subject.admits(Some(&pay)).is_err());
        // Another CA given the same subject since: no longer one CA.
        let twin = ca(&"22".repeat(32), "CN=shared CA", 2);
        let refused = by_subject.admits(Some(&twin)).unwrap_err();
        assert!(refused.contains("2 CAs"), "{refused}");
    }

    #[test]
    fn a_pin_must_name_one_ca_of_the_client_ca_file() {
        use crate::pki::keys::KeyType;
        use crate::pki::testing::software_root;
        use rustls_pki_types::pem::PemObject;
        let day = std::time::Duration::from_secs(86_400);
        let der = |org: &str| {
            let (_, root) = software_root(KeyType::EcdsaP256, org, day);
            CertificateDer::from_pem_slice(root.pem.as_bytes()).unwrap()
        };
        let (shared, pay, pay_twin) = (der("shared"), der("pay"), der("pay"));
        let cas = [shared.clone(), pay.clone(), pay_twin];
        let names = ca_names(&cas);
        let path = Path::new("clients-ca.pem");
        let check = |pin: &IssuerPin| check_issuer_pins(path, [("spiffe://t/a", pin)], &cas);
        let by_hash = IssuerPin::Sha256(names[0].sha256.clone());
        assert!(check(&by_hash).is_ok());
        let absent = IssuerPin::Sha256("00".repeat(32));
        let refused = check(&absent).unwrap_err().to_string();
        assert!(refused.contains("\"spiffe://t/a\""), "{refused}");
        assert!(refused.contains(&names[1].sha256), "{refused}");
        assert!(refused.contains("clients-ca.pem"), "{refused}");
        let unique = IssuerPin::Subject(names[0].subject.clone());
        assert!(check(&unique).is_ok());
        let shared_subject = IssuerPin::Subject(names[1].subject.clone());
        let refused = check(&shared_subject).unwrap_err().to_string();
        assert!(refused.contains("2 CA certificates"), "{refused}");
        // The CA a chain leads to is none for a chain of nothing.
        let set = ClientCaSet::of(&cas);
        assert_eq!(set.chained_to(&[], UnixTime::since_unix_epoch(day)), None);
        let _ = (shared, pay);
    }

    /// The set made once per load describes each CA that is a trust anchor as a chain's
    /// CA is described: its SHA-256, its subject and how many CAs of the file share it
    /// (one that is no anchor left out, but counted). tests/client_binding.rs finds
    /// chains' CAs with it.
    #[test]
    fn the_client_ca_set_describes_each_anchor_in_its_place() {
        use crate::pki::keys::KeyType;
        use crate::pki::testing::software_root;
        use rustls_pki_types::pem::PemObject;
        let day = std::time::Duration::from_secs(86_400);
        let root = |org: &str| software_root(KeyType::EcdsaP256, org, day);
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let ((_, shared), (_, pay), (_, pay_twin)) = (root("shared"), root("pay"), root("pay"));
        let not_a_ca = CertificateDer::from(vec![1u8, 2, 3]);
        let cas = [
            der(&shared.pem),
            not_a_ca,
            der(&pay.pem),
            der(&pay_twin.pem),
        ];
        let names = ca_names(&cas);
        let set = ClientCaSet::of(&cas);
        let described: Vec<(&str, &str, usize)> = set
            .cas
            .iter()
            .map(|ca| (ca.sha256.as_str(), ca.subject.as_str(), ca.sharing_subject))
            .collect();
        assert_eq!(
            described,
            [
                (names[0].sha256.as_str(), names[0].subject.as_str(), 1),
                (names[2].sha256.as_str(), names[2].subject.as_str(), 2),
                (names[3].sha256.as_str(), names[3].subject.as_str(), 2),
            ]
        );
        assert_eq!(set.anchors.len(), 3);
    }

    /// A chain to a CA that has ended is found ended, unless that CA was renewed under the
    /// same name and key (its new certificate beside the old one in the file): webpki may
    /// end the path at either. A CA of the same name but another key renews nothing.
    #[test]
    fn a_chain_to_an_ended_ca_is_found_unless_the_ca_was_renewed_with_its_key() {
        use crate::pki::testing::openssl;
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &str| openssl(dir.path(), &args.split(' ').collect::<Vec<_>>());
        let ca_ext =
            "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign";
        for key in ["ca.key", "other.key", "client.key"] {
            run(&format!(
                "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {key}"
            ));
        }
        run(&format!(
            "req -x509 -key ca.key -subj /CN=clients -days 1 {ca_ext} -out old.pem"
        ));
        run(&format!(
            "req -x509 -key ca.key -subj /CN=clients -days 30 {ca_ext} -out renewed.pem"
        ));
        run(&format!(
            "req -x509 -key other.key -subj /CN=clients -days 30 {ca_ext} -out twin.pem"
        ));
        run("req -new -key client.key -subj /CN=c -out client.csr");
        std::fs::write(
            dir.path().join("client.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://t/c\n",
        )
        .unwrap();
        run(
            "x509 -req -in client.csr -CA old.pem -CAkey ca.key -set_serial 7 -days 10 -extfile client.ext -out client.pem",
        );
        let der = |name: &str| CertificateDer::from_pem_file(dir.path().join(name)).unwrap();
        let chain = [der("client.pem")];
        // Five days on: the old certificate has ended, the renewed one and the client not.
        let now = std::time::SystemTime::now();
        let later =
            super::super::unix_time(now + std::time::Duration::from_secs(5 * 86_400)).unwrap();
        let ended = ClientCaSet::of(&[der("old.pem")]).ended_ca_of(&chain, later);
        assert_eq!(
            ended.map(|(ca, _)| ca.subject),
            Some("CN=clients".to_string())
        );
        for renewed in [
            [der("old.pem"), der("renewed.pem")],
            [der("renewed.pem"), der("old.pem")],
        ] {
            assert_eq!(ClientCaSet::of(&renewed).ended_ca_of(&chain, later), None);
        }
        let twin = ClientCaSet::of(&[der("old.pem"), der("twin.pem")]);
        assert!(twin.ended_ca_of(&chain, later).is_some());
        // Today, nothing has ended.
        let today = super::super::unix_time(now).unwrap();
        assert_eq!(
            ClientCaSet::of(&[der("old.pem")]).ended_ca_of(&chain, today),
            None
        );
    }

    #[test]
    fn a_warning_names_unpinned_clients_only_with_several_cas() {
        let one = [CertificateDer::from(vec![1u8])];
        let two = [
            CertificateDer::from(vec![1u8]),
            CertificateDer::from(vec![2u8]),
        ];
        assert_eq!(unpinned_clients_warning(&one, &["a"]), None);
        assert_eq!(unpinned_clients_warning(&two, &[]), None);
        let warning = unpinned_clients_warning(&two, &["a", "b"]).unwrap();
        assert!(warning.contains("any of those CAs can issue their identity (a, b)"));
    }
}
