//! The client CRLs a server enforces: read from their files, one per issuer and scope (the
//! newest), and when each file is due to be replaced. webpki consults the first CRL of an
//! issuer that covers a certificate, so an older list before a newer one would hide what
//! was revoked since: of one scope only the newest is kept, and lists of different scopes
//! that both cover a certificate (a full one and a partition) go newest first.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use const_oid::AssociatedOid;
use const_oid::db::rfc5280::ID_CE_ISSUING_DISTRIBUTION_POINT;
use der::{Decode, Encode};
use rustls_pki_types::CertificateRevocationListDer;
use x509_cert::certificate::Rfc5280;
use x509_cert::crl::CertificateList;
use x509_cert::ext::pkix::CrlNumber;
use x509_cert::time::Time;

use super::{CrlNextUpdate, EnforcedCrl, TlsError, load_pem_blocks};

/// What the CRL files hold, once the superseded lists are set aside.
pub(crate) struct ClientCrls {
    /// The newest CRL of each issuer and scope, the most recent thisUpdate first (files'
    /// order between lists of the same date).
    pub in_force: Vec<CertificateRevocationListDer<'static>>,
    /// Per file, in the configured order: the earliest `nextUpdate` of its CRLs in force.
    pub next_updates: Vec<CrlNextUpdate>,
    pub superseded: Vec<SupersededCrl>,
    /// The issuers of the CRLs in force, as DER names.
    pub issuers: Vec<Vec<u8>>,
    /// The CRLs in force, as the audit log names them.
    pub enforced: Vec<EnforcedCrl>,
}

/// A CRL not enforced because a newer one of the same issuer and scope was also listed.
#[derive(Debug, Clone, PartialEq)]
pub struct SupersededCrl {
    pub issuer: String,
    pub path: PathBuf,
    /// Its CRL number and thisUpdate, as "number N, thisUpdate T".
    pub edition: String,
    pub newer_path: PathBuf,
    pub newer_edition: String,
}

impl fmt::Display for SupersededCrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the CRL of {} in {} ({}) is not enforced: {} holds a newer one ({})",
            self.issuer,
            self.path.display(),
            self.edition,
            self.newer_path.display(),
            self.newer_edition
        )
    }
}

/// One CRL read from a file, with what tells it apart from and orders it against the
/// other lists of its issuer.
struct ReadCrl {
    der: CertificateRevocationListDer<'static>,
    /// The file it was read from (an index into the configured paths).
    file: usize,
    issuer: String,
    /// The issuer's name and the issuing distribution point (a partitioned CRL covers only
    /// part of what its issuer signed; two partitions are both in force), as DER.
    scope: (Vec<u8>, Option<Vec<u8>>),
    /// The CRL number's magnitude, big-endian, without leading zeros.
    number: Option<Vec<u8>>,
    this_update: Time,
    next_update: Option<SystemTime>,
}

impl ReadCrl {
    fn parse(
        der: CertificateRevocationListDer<'static>,
        file: usize,
        path: &Path,
    ) -> Result<Self, TlsError> {
        let invalid = |message: String| TlsError::Crls {
            path: path.display().to_string(),
            message,
        };
        let crl = CertificateList::<Rfc5280>::from_der(&der).map_err(|e| {
            invalid(if lacks_version(&der) {
                "a version 1 CRL (no version field and no extensions; `openssl ca -gencrl` makes one when its config names no crlnumber file): the TLS library checks only version 2 CRLs; give the CA a crlnumber file and make the CRL again".into()
            } else if is_time_error(&e) {
                // RFC 5280 lets a UTCTime say 1950 to 1969, but neither this reader nor
                // the TLS library (webpki) takes a date before 1970: not "not a CRL".
                format!(
                    "a CRL with a thisUpdate, nextUpdate or revocation date that is before 1970 or no valid date ({e}): the TLS library reads no date before 1970; make the CRL again with the CA's clock set right"
                )
            } else {
                format!("not a CRL: {e}")
            })
        })?;
        let tbs = crl.tbs_cert_list;
        if tbs.crl_extensions.as_ref().is_none_or(Vec::is_empty) {
            return Err(invalid(format!(
                "the CRL of {} has no extensions, which the TLS library requires (RFC 5280 asks every CRL for a CRL number and an authority key identifier); make it again with a crlnumber file in the CA's config",
                tbs.issuer
            )));
        }
        if tbs.next_update.is_none() {
            return Err(invalid(format!(
                "the CRL of {} has no nextUpdate, which the TLS library requires (RFC 5280 asks every CRL for one); make it again with one (openssl ca -gencrl sets it from default_crl_days)",
                tbs.issuer
            )));
        }
        // Refused here in words rather than by the verifier's builder in its Debug form.
        webpki::BorrowedCertRevocationList::from_der(&der)
            .map_err(|e| invalid(refused_by_webpki(&tbs.issuer, &e)))?;
        let extension = |oid| {
            tbs.crl_extensions
                .iter()
                .flatten()
                .find(|e| e.extn_id == oid)
                .map(|e| e.extn_value.as_bytes())
        };
        let number = extension(CrlNumber::OID)
            .map(|value| {
                CrlNumber::from_der(value)
                    .map(|n| magnitude(n.0.as_bytes()))
                    .map_err(|e| {
                        invalid(format!(
                            "a CRL of {} has an invalid CRL number: {e}",
                            tbs.issuer
                        ))
                    })
            })
            .transpose()?;
        let scope = (
            tbs.issuer
                .to_der()
                .map_err(|e| invalid(format!("a CRL's issuer cannot be encoded: {e}")))?,
            extension(ID_CE_ISSUING_DISTRIBUTION_POINT).map(<[u8]>::to_vec),
        );
        Ok(ReadCrl {
            der,
            file,
            issuer: tbs.issuer.to_string(),
            scope,
            number,
            this_update: tbs.this_update,
            next_update: tbs.next_update.map(|t| t.to_system_time()),
        })
    }

    /// Which of two lists of the same issuer and scope is newer: by CRL number when both
    /// have one (RFC 5280 5.2.3: it is how a user tells which list supersedes another),
    /// else by thisUpdate.
    fn newness(&self, other: &ReadCrl) -> Ordering {
        match (&self.number, &other.number) {
            (Some(a), Some(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
            _ => self
                .this_update
                .to_system_time()
                .cmp(&other.this_update.to_system_time()),
        }
    }

    fn described(&self) -> EnforcedCrl {
        use sha2::Digest;
        EnforcedCrl {
            issuer: self.issuer.clone(),
            crl_number: self.number.as_deref().map(display_number),
            this_update: crate::pki::datetime::rfc3339(self.this_update.to_system_time()),
            next_update: self.next_update.map(crate::pki::datetime::rfc3339),
            sha256: crate::pki::csr::hex(&sha2::Sha256::digest(&self.der)),
        }
    }

    fn edition(&self) -> String {
        match &self.number {
            Some(number) => format!(
                "number {}, thisUpdate {}",
                display_number(number),
                self.this_update
            ),
            None => format!("thisUpdate {}", self.this_update),
        }
    }
}

/// Reads every CRL of the files and keeps the newest of each issuer and scope. Two
/// different lists that cannot be ordered (same CRL number, or neither numbered and the
/// same thisUpdate) are an error: which one is in force would be a guess.
pub(super) fn read(paths: &[PathBuf]) -> Result<ClientCrls, TlsError> {
    read_with(paths, |path| {
        load_pem_blocks::<CertificateRevocationListDer<'static>>(
            path,
            "X509 CRL",
            |path, message| TlsError::Crls { path, message },
        )
    })
}

/// [`read`] with the CRLs of each file given by `load` (the fuzz target's, from memory).
pub(crate) fn read_with(
    paths: &[PathBuf],
    mut load: impl FnMut(&Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError>,
) -> Result<ClientCrls, TlsError> {
    let mut in_force: Vec<ReadCrl> = Vec::new();
    let mut superseded = Vec::new();
    for (file, path) in paths.iter().enumerate() {
        let in_file = load(path)?;
        for der in in_file {
            let crl = ReadCrl::parse(der, file, path)?;
            let Some(held) = in_force.iter_mut().find(|held| held.scope == crl.scope) else {
                in_force.push(crl);
                continue;
            };
            if held.der == crl.der {
                continue;
            }
            let (older, newer) = match crl.newness(held) {
                Ordering::Greater => (std::mem::replace(held, crl), &*held),
                Ordering::Less => (crl, &*held),
                Ordering::Equal => {
                    return Err(TlsError::Crls {
                        path: path.display().to_string(),
                        message: format!(
                            "two different CRLs of {} ({}) here and in {}: neither is newer, so which one is in force cannot be told; keep one",
                            crl.issuer,
                            crl.edition(),
                            paths[held.file].display()
                        ),
                    });
                }
            };
            superseded.push(SupersededCrl {
                issuer: older.issuer.clone(),
                path: paths[older.file].clone(),
                edition: older.edition(),
                newer_path: paths[newer.file].clone(),
                newer_edition: newer.edition(),
            });
        }
    }
    // A full list and a partition of one issuer may both cover a certificate: the one
    // consulted is the more recent.
    in_force.sort_by_key(|crl| std::cmp::Reverse(crl.this_update.to_system_time()));
    let next_updates = paths
        .iter()
        .enumerate()
        .map(|(file, path)| CrlNextUpdate {
            path: path.clone(),
            next_update: in_force
                .iter()
                .filter(|crl| crl.file == file)
                .filter_map(|crl| crl.next_update)
                .min(),
        })
        .collect();
    let issuers = in_force.iter().map(|crl| crl.scope.0.clone()).collect();
    let enforced = in_force.iter().map(ReadCrl::described).collect();
    Ok(ClientCrls {
        in_force: in_force.into_iter().map(|crl| crl.der).collect(),
        next_updates,
        superseded,
        issuers,
        enforced,
    })
}

/// Why the TLS library (webpki), which enforces the lists in the handshake, refuses one
/// that reads as a CRL, and what to do.
fn refused_by_webpki(issuer: &x509_cert::name::Name, e: &webpki::Error) -> String {
    use webpki::Error;
    let why = match e {
        Error::UnsupportedCrlIssuingDistributionPoint => {
            "its issuingDistributionPoint names no distribution point, or one relative to the issuer; the TLS library takes a partitioned CRL only when a full name names its partition (openssl: fullname = URI:... in the issuingDistributionPoint section)"
        }
        Error::UnsupportedRevocationReasonsPartitioning => {
            "it is partitioned by revocation reason (onlySomeReasons), which the TLS library does not take; make it cover every reason"
        }
        Error::UnsupportedIndirectCrl => {
            "it is an indirect CRL (it may list other issuers' certificates), which the TLS library does not take"
        }
        Error::UnsupportedDeltaCrl => {
            "it is a delta CRL (a change to a base list), which the TLS library does not take; give the full list"
        }
        Error::UnsupportedCriticalExtension => {
            "it has a critical extension the TLS library does not know"
        }
        other => return format!("the TLS library refuses the CRL of {issuer}: {other}"),
    };
    format!("the CRL of {issuer} cannot be enforced: {why}")
}

fn magnitude(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// Decimal when it fits 128 bits (as `openssl crl -text` shows small numbers), else hex.
fn display_number(magnitude: &[u8]) -> String {
    if magnitude.len() <= 16 {
        let mut value = 0u128;
        for byte in magnitude {
            value = (value << 8) | u128::from(*byte);
        }
        value.to_string()
    } else {
        magnitude.iter().map(|b| format!("{b:02X}")).collect()
    }
}

/// Whether `der` is a CRL whose tbsCertList starts with the signature algorithm, not a
/// version: a version 1 CRL, which RFC 5280 allows without extensions and webpki refuses.
/// Whether decoding failed at a UTCTime or GeneralizedTime value.
fn is_time_error(e: &der::Error) -> bool {
    use der::{ErrorKind, Tag};
    matches!(
        e.kind(),
        ErrorKind::DateTime
            | ErrorKind::Value {
                tag: Tag::UtcTime | Tag::GeneralizedTime
            }
    )
}

fn lacks_version(der: &[u8]) -> bool {
    use der::asn1::AnyRef;
    use der::{SliceReader, Tag};
    let first_in_tbs = || -> der::Result<Tag> {
        let crl = AnyRef::from_der(der)?;
        let mut fields = SliceReader::new(crl.value())?;
        let tbs = AnyRef::decode(&mut fields)?;
        Tag::peek(&SliceReader::new(tbs.value())?)
    };
    first_in_tbs() == Ok(Tag::Sequence)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::asn1::{BitString, OctetString};
    use der::pem::LineEnding;
    use der::{DateTime, EncodePem};
    use std::str::FromStr;
    use std::time::Duration;
    use x509_cert::Version;
    use x509_cert::crl::TbsCertList;
    use x509_cert::ext::Extension;
    use x509_cert::name::Name;
    use x509_cert::spki::AlgorithmIdentifierOwned;

    /// A CRL as its fields are read here (the signature is not checked when reading, only
    /// by webpki during a handshake).
    struct Crl {
        issuer: &'static str,
        number: Option<u64>,
        /// Days after 2026-01-01.
        this_update: u64,
        next_update: Option<u64>,
        partition: Option<&'static [u8]>,
        /// No extension at all (not even the authority key identifier the others have).
        bare: bool,
    }

    const CRL: Crl = Crl {
        issuer: "CN=transport CA",
        number: None,
        this_update: 0,
        next_update: Some(365),
        partition: None,
        bare: false,
    };

    /// An issuing distribution point: user certificates only, the partition named by the
    /// URI "u" (webpki takes no partition without a full name).
    const USER_PARTITION: Option<&[u8]> = Some(&[
        0x30, 0x0A, 0xA0, 0x05, 0xA0, 0x03, 0x86, 0x01, b'u', 0x81, 0x01, 0xFF,
    ]);

    fn day(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + n * 86_400)
    }

    fn time(n: u64) -> Time {
        Time::from(DateTime::from_system_time(day(n)).unwrap())
    }

    fn pem(crl: &Crl) -> String {
        // An authority key identifier, keyIdentifier 01: webpki takes no CRL without
        // extensions.
        let mut extensions = vec![Extension {
            extn_id: const_oid::db::rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
            critical: false,
            extn_value: OctetString::new([0x30, 0x03, 0x80, 0x01, 0x01]).unwrap(),
        }];
        if let Some(number) = crl.number {
            let value = CrlNumber::try_from(number).unwrap().to_der().unwrap();
            extensions.push(Extension {
                extn_id: CrlNumber::OID,
                critical: false,
                extn_value: OctetString::new(value).unwrap(),
            });
        }
        if let Some(partition) = crl.partition {
            extensions.push(Extension {
                extn_id: ID_CE_ISSUING_DISTRIBUTION_POINT,
                critical: true,
                extn_value: OctetString::new(partition).unwrap(),
            });
        }
        let algorithm = AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
            parameters: None,
        };
        CertificateList::<Rfc5280> {
            tbs_cert_list: TbsCertList {
                version: Version::V2,
                signature: algorithm.clone(),
                issuer: Name::from_str(crl.issuer).unwrap(),
                this_update: time(crl.this_update),
                next_update: crl.next_update.map(time),
                revoked_certificates: None,
                crl_extensions: (!crl.bare).then_some(extensions),
            },
            signature_algorithm: algorithm,
            signature: BitString::from_bytes(&[0; 8]).unwrap(),
        }
        .to_pem(LineEnding::LF)
        .unwrap()
    }

    /// Writes each file's CRLs (concatenated, in order) and reads them back.
    fn read_files(files: &[&[Crl]]) -> (tempfile::TempDir, Result<ClientCrls, TlsError>) {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = files
            .iter()
            .enumerate()
            .map(|(n, crls)| {
                let path = dir.path().join(format!("crl-{n}.pem"));
                std::fs::write(&path, crls.iter().map(pem).collect::<String>()).unwrap();
                path
            })
            .collect();
        let read = read(&paths);
        (dir, read)
    }

    fn in_force(read: &ClientCrls) -> Vec<String> {
        read.in_force
            .iter()
            .map(|der| {
                let crl = CertificateList::<Rfc5280>::from_der(der).unwrap();
                format!(
                    "{} {}",
                    crl.tbs_cert_list.issuer, crl.tbs_cert_list.this_update
                )
            })
            .collect()
    }

    /// RFC 5280 reads a UTCTime of 50 as 1950: a valid date, which neither x509-cert nor
    /// webpki takes (both count from 1970). Said so, not "not a CRL".
    #[test]
    fn a_crl_dated_before_1970_is_named_for_its_date() {
        let (_, der) = der::pem::decode_vec(pem(&CRL).as_bytes()).unwrap();
        let (from, to) = (b"260101000000Z", b"500101000000Z");
        let at = der.windows(from.len()).position(|w| w == from).unwrap();
        let mut old = der.clone();
        old[at..at + to.len()].copy_from_slice(to);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        let text = der::pem::encode_string("X509 CRL", LineEnding::LF, &old).unwrap();
        std::fs::write(&path, text).unwrap();
        let error = read(&[path]).err().unwrap().to_string();
        assert!(
            error.contains(
                "a CRL with a thisUpdate, nextUpdate or revocation date that is before 1970"
            ) && !error.contains("not a CRL"),
            "{error}"
        );
    }

    /// A version 1 CRL, as `openssl ca -gencrl` makes it without a crlnumber file (made
    /// here by openssl, as an operator would): named as such, with the fix, rather than
    /// "not a CRL: expected INTEGER".
    #[test]
    fn a_version_1_crl_is_named_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=transport CA",
            "-days",
            "1",
        ]);
        std::fs::write(dir.path().join("index.txt"), "").unwrap();
        std::fs::write(
            dir.path().join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ndefault_md = sha256\ndefault_crl_days = 1\n",
        )
        .unwrap();
        openssl(&[
            "ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "ca.key", "-cert", "ca.pem", "-out",
            "crl.pem",
        ]);
        let error = read(&[dir.path().join("crl.pem")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("a version 1 CRL") && error.contains("crlnumber file"),
            "{error}"
        );
        // Anything else that does not parse (a certificate labelled as a CRL) is still
        // "not a CRL".
        let certificate = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        let mislabelled = certificate.replace("CERTIFICATE", "X509 CRL");
        std::fs::write(dir.path().join("mislabelled.pem"), mislabelled).unwrap();
        let error = read(&[dir.path().join("mislabelled.pem")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("not a CRL") && !error.contains("version 1"),
            "{error}"
        );
    }

    #[test]
    fn an_older_list_before_a_newer_one_of_its_issuer_is_set_aside_and_named() {
        let old = Crl {
            number: Some(1000),
            this_update: 1,
            next_update: Some(31),
            ..CRL
        };
        let new = Crl {
            number: Some(1001),
            this_update: 5,
            next_update: Some(35),
            ..CRL
        };
        let (dir, read) = read_files(&[&[old, new]]);
        let read = read.unwrap();
        assert_eq!(in_force(&read), ["CN=transport CA 2026-01-06T00:00:00Z"]);
        assert_eq!(read.next_updates[0].next_update, Some(day(35)));
        let [superseded] = &read.superseded[..] else {
            panic!("{:?}", read.superseded)
        };
        let path = dir.path().join("crl-0.pem");
        assert_eq!(
            superseded.to_string(),
            format!(
                "the CRL of CN=transport CA in {} (number 1000, thisUpdate 2026-01-02T00:00:00Z) \
                 is not enforced: {} holds a newer one (number 1001, thisUpdate 2026-01-06T00:00:00Z)",
                path.display(),
                path.display()
            )
        );
    }

    #[test]
    fn the_crl_number_decides_before_the_date_and_compares_as_a_number() {
        // 256 is newer than 255 (compared as numbers, not as bytes), even with an
        // earlier thisUpdate (a clock set back at the CA).
        let numbered = Crl {
            number: Some(256),
            this_update: 1,
            ..CRL
        };
        let dated = Crl {
            number: Some(255),
            this_update: 9,
            ..CRL
        };
        let (_dir, read) = read_files(&[&[dated, numbered]]);
        let read = read.unwrap();
        assert_eq!(in_force(&read), ["CN=transport CA 2026-01-02T00:00:00Z"]);
        assert!(read.superseded[0].edition.starts_with("number 255,"));
        // Without a number on both, thisUpdate decides, across files too: a file left with
        // no list in force has no next update of its own.
        let newer = Crl {
            this_update: 9,
            next_update: Some(40),
            ..CRL
        };
        let older = Crl {
            number: Some(7),
            this_update: 1,
            next_update: Some(30),
            ..CRL
        };
        let (_dir, read) = read_files(&[&[newer], &[older]]);
        let read = read.unwrap();
        assert_eq!(in_force(&read), ["CN=transport CA 2026-01-10T00:00:00Z"]);
        let due: Vec<_> = read.next_updates.iter().map(|n| n.next_update).collect();
        assert_eq!(due, [Some(day(40)), None]);
    }

    #[test]
    fn other_issuers_and_partitions_are_all_in_force_and_the_earliest_next_update_counts() {
        let (_dir, read) = read_files(&[&[
            Crl {
                next_update: Some(30),
                ..CRL
            },
            Crl {
                issuer: "CN=other CA",
                next_update: Some(20),
                ..CRL
            },
            Crl {
                partition: USER_PARTITION,
                next_update: Some(25),
                ..CRL
            },
        ]]);
        let read = read.unwrap();
        assert_eq!(read.in_force.len(), 3);
        assert!(read.superseded.is_empty());
        assert_eq!(read.next_updates[0].next_update, Some(day(20)));
    }

    /// A full list and a newer partition of the same issuer, the full one first in the
    /// files: the partition comes first among those in force (webpki consults the first
    /// list covering a certificate); lists of the same date keep the files' order.
    #[test]
    fn lists_of_different_scopes_go_newest_first() {
        let (_dir, read) = read_files(&[
            &[CRL],
            &[Crl {
                issuer: "CN=other CA",
                ..CRL
            }],
            &[Crl {
                partition: USER_PARTITION,
                this_update: 2,
                ..CRL
            }],
        ]);
        let read = read.unwrap();
        assert_eq!(
            in_force(&read),
            [
                "CN=transport CA 2026-01-03T00:00:00Z",
                "CN=transport CA 2026-01-01T00:00:00Z",
                "CN=other CA 2026-01-01T00:00:00Z",
            ]
        );
        assert!(read.superseded.is_empty());
    }

    /// What webpki would refuse is refused when the files are read, naming the list and
    /// what to change, not by the verifier's builder in its Debug form.
    #[test]
    fn a_crl_the_tls_library_cannot_enforce_is_named_with_the_reason() {
        let refused = |crl: Crl| read_files(&[&[crl]]).1.err().unwrap().to_string();
        let unnamed_partition = refused(Crl {
            partition: Some(&[0x30, 0x03, 0x81, 0x01, 0xFF]),
            ..CRL
        });
        assert!(
            unnamed_partition.contains(
                "the CRL of CN=transport CA cannot be enforced: its issuingDistributionPoint names no distribution point"
            ) && unnamed_partition.contains("fullname = URI:"),
            "{unnamed_partition}"
        );
        let by_reason = refused(Crl {
            // onlySomeReasons (keyCompromise) beside the named partition.
            partition: Some(&[
                0x30, 0x0B, 0xA0, 0x05, 0xA0, 0x03, 0x86, 0x01, b'u', 0x83, 0x02, 0x06, 0x40,
            ]),
            ..CRL
        });
        assert!(
            by_reason.contains("partitioned by revocation reason (onlySomeReasons)"),
            "{by_reason}"
        );
        let undated = refused(Crl {
            next_update: None,
            ..CRL
        });
        assert!(
            undated.contains("the CRL of CN=transport CA has no nextUpdate"),
            "{undated}"
        );
        let bare = refused(Crl { bare: true, ..CRL });
        assert!(
            bare.contains("the CRL of CN=transport CA has no extensions")
                && bare.contains("crlnumber file"),
            "{bare}"
        );
    }

    #[test]
    fn the_same_list_twice_is_read_once_but_two_lists_neither_newer_are_refused() {
        let numbered = Crl {
            number: Some(4),
            ..CRL
        };
        let (_dir, read) = read_files(&[
            &[numbered],
            &[Crl {
                number: Some(4),
                ..CRL
            }],
        ]);
        let read = read.unwrap();
        assert_eq!(read.in_force.len(), 1);
        assert!(read.superseded.is_empty());

        let (dir, read) = read_files(&[
            &[Crl {
                number: Some(4),
                ..CRL
            }],
            &[Crl {
                number: Some(4),
                next_update: Some(3),
                ..CRL
            }],
        ]);
        let error = read.err().unwrap().to_string();
        assert!(
            error.starts_with(&format!(
                "cannot read CRLs from {}: two different CRLs of CN=transport CA (number 4,",
                dir.path().join("crl-1.pem").display()
            )) && error.contains(&format!(
                "and in {}",
                dir.path().join("crl-0.pem").display()
            )) && error.contains("neither is newer"),
            "{error}"
        );
    }
}
