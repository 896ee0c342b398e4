//! PEM helpers: strict single-object decoding, certificate chains, encoding.

use der::{Decode, Encode};
use x509_cert::Certificate;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("not a PEM document ({0})")]
    Malformed(String),
    #[error("PEM label is {found:?}, expected {expected}")]
    WrongLabel { found: String, expected: String },
    #[error("no certificate found in PEM")]
    NoCertificates,
    #[error("certificate {index} in PEM is not a valid X.509 certificate: {message}")]
    BadCertificate { index: usize, message: String },
    #[error("PEM block {index} is labelled {found:?}, not CERTIFICATE{hint}", hint = label_hint(found))]
    NotACertificate { index: usize, found: String },
}

/// What to do about a block of another label in a certificate bundle, where it is common.
fn label_hint(found: &str) -> &'static str {
    match found {
        // istiod's and Go's bundle readers skip this block, and workloads get the file as
        // it is: a root written this way is not trusted where it should be.
        "TRUSTED CERTIFICATE" => {
            " (OpenSSL's trusted-certificate form, which Istio does not read as a root: \
             `openssl x509 -in FILE` prints it as a plain CERTIFICATE)"
        }
        _ => "",
    }
}

/// Decodes exactly one PEM object whose label is one of `labels`. The Base64 lines may
/// have any length (see [`rewrapped`]); everything else is RFC 7468's strict form.
pub fn decode_single(pem: &str, labels: &[&str]) -> Result<Vec<u8>, PemError> {
    let pem = rewrapped(pem.trim());
    let (label, der) =
        pem_rfc7468::decode_vec(pem.as_bytes()).map_err(|e| PemError::Malformed(e.to_string()))?;
    if !labels.contains(&label) {
        return Err(PemError::WrongLabel {
            found: label.to_string(),
            expected: labels.join(" or "),
        });
    }
    Ok(der)
}

/// `pem` with the Base64 between its boundaries in lines of 64, as pem_rfc7468 reads it
/// (it refuses any other length). openssl and Go (istiod's `AppendCertsFromPEM`) take
/// lines of any length: Python's `base64.encodebytes` writes 76, some tools one line.
/// Only the line length changes: text that is not one block (no boundaries, text around
/// them), a header, a blank line or a character outside Base64 is left for pem_rfc7468
/// to refuse.
fn rewrapped(pem: &str) -> std::borrow::Cow<'_, str> {
    let lines: Vec<&str> = pem.lines().collect();
    let [begin, body @ .., end] = lines.as_slice() else {
        return pem.into();
    };
    if !begin.starts_with("-----BEGIN ") || !end.starts_with("-----END ") {
        return pem.into();
    }
    let base64: String = body.iter().map(|line| line.trim_end()).collect();
    let alphabet = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    let odd = |line: &&str| line.starts_with("-----") || line.trim_end().is_empty();
    if body.iter().any(odd) || !base64.chars().all(alphabet) {
        return pem.into();
    }
    let mut text = format!("{begin}\n");
    // Base64 is ASCII: every 64 bytes are whole characters.
    for line in base64.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(end);
    text.into()
}

/// Decodes every `CERTIFICATE` block in order (a bundle or a chain).
pub fn decode_certificates(pem: &str) -> Result<Vec<Certificate>, PemError> {
    const BEGIN: &str = "-----BEGIN ";
    let mut certs = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block = &rest[start..];
        let end_marker = block
            .find("-----END ")
            .and_then(|e| block[e + 9..].find("-----").map(|t| e + 9 + t + 5))
            .ok_or_else(|| PemError::Malformed("unterminated PEM block".into()))?;
        let der = decode_single(&block[..end_marker], &["CERTIFICATE"]).map_err(|e| match e {
            PemError::WrongLabel { found, .. } => PemError::NotACertificate {
                index: certs.len() + 1,
                found,
            },
            other => other,
        })?;
        let cert = Certificate::from_der(&der).map_err(|e| PemError::BadCertificate {
            index: certs.len() + 1,
            message: e.to_string(),
        })?;
        certs.push(cert);
        rest = &block[end_marker..];
    }
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Every certificate of a PEM text that can be read, and how many blocks could not (another
/// label such as OpenSSL's `TRUSTED CERTIFICATE`, PEM headers, a certificate x509-cert
/// refuses): as Go's `AppendCertsFromPEM` reads a root bundle, where one odd block must
/// not cost the others. Text after an unterminated block is not read.
pub fn decode_readable_certificates(pem: &str) -> (Vec<Certificate>, usize) {
    const BEGIN: &str = "-----BEGIN ";
    let (mut certs, mut skipped) = (Vec::new(), 0);
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block = &rest[start..];
        let Some(end_marker) = block
            .find("-----END ")
            .and_then(|e| block[e + 9..].find("-----").map(|t| e + 9 + t + 5))
        else {
            skipped += 1;
            break;
        };
        match decode_single(&block[..end_marker], &["CERTIFICATE"])
            .ok()
            .and_then(|der| Certificate::from_der(&der).ok())
        {
            Some(cert) => certs.push(cert),
            None => skipped += 1,
        }
        rest = &block[end_marker..];
    }
    (certs, skipped)
}

/// PEM for DER bytes under a label, LF line endings.
pub fn encode(label: &str, der: &[u8]) -> String {
    // Encoding only fails for invalid labels, and every label here is a constant.
    pem_rfc7468::encode_string(label, pem_rfc7468::LineEnding::LF, der).unwrap_or_default()
}

/// A certificate as PEM.
pub fn certificate_pem(cert: &Certificate) -> String {
    encode("CERTIFICATE", &cert.to_der().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        let pem = encode("PRIVATE KEY", &[1, 2, 3]);
        assert_eq!(
            decode_single(&pem, &["PRIVATE KEY"]).unwrap(),
            vec![1, 2, 3]
        );
        let err = decode_single(&pem, &["CERTIFICATE REQUEST"]).unwrap_err();
        assert!(err.to_string().contains("PRIVATE KEY"));
        assert!(matches!(
            decode_single("junk", &["X"]),
            Err(PemError::Malformed(_))
        ));
    }

    #[test]
    fn a_block_of_another_label_in_a_bundle_is_named_by_its_place() {
        let cert = crate::pki::testing::software_root(
            crate::pki::keys::KeyType::EcdsaP256,
            "acme",
            std::time::Duration::from_secs(86_400),
        )
        .1
        .pem;
        let der = decode_single(&cert, &["CERTIFICATE"]).unwrap();
        let trusted = format!("{cert}{}", encode("TRUSTED CERTIFICATE", &der));
        let err = decode_certificates(&trusted).unwrap_err().to_string();
        assert!(
            err.starts_with("PEM block 2 is labelled \"TRUSTED CERTIFICATE\", not CERTIFICATE"),
            "{err}"
        );
        assert!(err.contains("`openssl x509 -in FILE`"), "{err}");
        let key = encode("PRIVATE KEY", &[1, 2, 3]);
        assert_eq!(
            decode_certificates(&key).unwrap_err().to_string(),
            "PEM block 1 is labelled \"PRIVATE KEY\", not CERTIFICATE"
        );
    }

    #[test]
    fn empty_bundle_is_an_error() {
        assert_eq!(
            decode_certificates("nothing here"),
            Err(PemError::NoCertificates)
        );
        let not_a_cert = encode("CERTIFICATE", &[0x30, 0x00]);
        assert!(matches!(
            decode_certificates(&not_a_cert),
            Err(PemError::BadCertificate { index: 1, .. })
        ));
    }

    /// `pem` (one block) with its Base64 in lines of `width`, or on one line (0).
    fn wrapped_at(pem: &str, width: usize) -> String {
        let lines: Vec<&str> = pem.trim().lines().collect();
        let base64: String = lines[1..lines.len() - 1].concat();
        let width = if width == 0 { base64.len() } else { width };
        let body: Vec<String> = base64
            .as_bytes()
            .chunks(width)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        format!(
            "{}\n{}\n{}\n",
            lines[0],
            body.join("\n"),
            lines[lines.len() - 1]
        )
    }

    #[test]
    fn base64_lines_of_any_length_are_read_as_openssl_and_go_read_them() {
        let (key, root) = crate::pki::testing::software_root(
            crate::pki::keys::KeyType::EcdsaP256,
            "acme",
            std::time::Duration::from_secs(86_400),
        );
        let csr = der::EncodePem::to_pem(
            &crate::pki::csr::build_csr(
                &key,
                crate::pki::profile::subject_name("acme", "a").unwrap(),
            )
            .unwrap(),
            der::pem::LineEnding::LF,
        )
        .unwrap();
        for width in [76, 0] {
            let rewrapped = wrapped_at(&root.pem, width);
            assert_ne!(rewrapped, root.pem);
            let read = crate::pki::profile::RootCa::from_pem(&rewrapped)
                .unwrap_or_else(|e| panic!("width {width}: {e}"));
            assert_eq!(read.fingerprint_sha256, root.fingerprint_sha256);
            let (certs, skipped) = decode_readable_certificates(&rewrapped);
            assert_eq!((certs.len(), skipped), (1, 0), "width {width}");
            // CRLF line endings too.
            let crlf = rewrapped.replace('\n', "\r\n");
            assert_eq!(decode_certificates(&crlf).unwrap().len(), 1);

            let rewrapped = wrapped_at(&csr, width);
            assert_ne!(rewrapped, csr);
            crate::pki::csr::ParsedCsr::from_pem(&rewrapped)
                .unwrap_or_else(|e| panic!("CSR, width {width}: {e}"));
        }
    }

    #[test]
    fn what_is_not_base64_or_not_one_block_is_still_refused() {
        let pem = encode("CERTIFICATE REQUEST", &[7; 100]);
        let one_line = wrapped_at(&pem, 0);
        assert_eq!(
            decode_single(&one_line, &["CERTIFICATE REQUEST"]).unwrap(),
            vec![7; 100]
        );
        let malformed = |text: &str| match decode_single(text, &["CERTIFICATE REQUEST"]) {
            Err(PemError::Malformed(message)) => message,
            other => panic!("{other:?} for {text}"),
        };
        // A character outside Base64; a character missing (the padding is wrong).
        let bad = one_line.replacen("Bw", "B!", 1);
        assert!(malformed(&bad).contains("Base64"), "{bad}");
        let short = one_line.replacen("BwcH", "BwH", 1);
        assert!(malformed(&short).contains("Base64"), "{short}");
        // Text before the block, a header, a blank line, two blocks: as before.
        malformed(&format!("junk\n{one_line}"));
        malformed(&one_line.replacen('\n', "\nProc-Type: 4,ENCRYPTED\n", 1));
        malformed(&one_line.replacen('\n', "\n\n", 1));
        malformed(&format!("{one_line}{one_line}"));
        assert!(matches!(
            decode_certificates(&wrapped_at(&encode("CERTIFICATE", &[1; 80]), 76)),
            Err(PemError::BadCertificate { index: 1, .. })
        ));
    }
}
