//! Test helpers: a root CA signed in software, so the pure code can be tested without a
//! token. Never compiled into the product.

use std::time::{Duration, SystemTime};

use der::Decode;
use x509_cert::Certificate;

use super::csr::sign_with;
use super::keys::{KeyType, PrivateKey};
use super::profile::{IntermediatePlan, RootCa, assemble, random_serial, root_tbs, subject_name};
use super::sigalg::SignatureAlgorithm;

/// `t` without its fraction of a second, as certificates carry it: a bundle made from it
/// has exactly the times the test compares with.
pub fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// Runs the openssl CLI with `args` in `dir` (an independent maker of certificates and
/// CRLs, as an operator's tools would be); panics with its stderr if it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed RSA-2048 CA (O=acme) made by openssl with `signing` options (`-sha1`, PSS
/// padding, `-set_serial`).
pub fn openssl_root(signing: &[&str]) -> String {
    openssl_root_with(
        "basicConstraints = critical,CA:true,pathlen:1\nkeyUsage = critical,keyCertSign,cRLSign\n",
        signing,
    )
}

/// [`openssl_root`] with the extensions `extensions` (openssl config lines) besides a
/// subject key identifier.
pub fn openssl_root_with(extensions: &str, signing: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("root.cnf"),
        format!(
            "[req]\ndistinguished_name = dn\nx509_extensions = root_ext\nprompt = no\n\
             [dn]\nO = acme\nCN = acme root\n\
             [root_ext]\n{extensions}subjectKeyIdentifier = hash\n"
        ),
    )
    .unwrap();
    let mut args = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key", "-config",
        "root.cnf", "-days", "30", "-out", "root.pem",
    ];
    args.extend(signing);
    openssl(dir.path(), &args);
    std::fs::read_to_string(dir.path().join("root.pem")).unwrap()
}

/// A self-signed root for `org`, valid for `ttl`, with a software key of `key_type`.
pub fn software_root(key_type: KeyType, org: &str, ttl: Duration) -> (PrivateKey, RootCa) {
    software_root_named(key_type, org, "test root", ttl)
}

/// [`software_root`] with the common name `cn`.
pub fn software_root_named(
    key_type: KeyType,
    org: &str,
    cn: &str,
    ttl: Duration,
) -> (PrivateKey, RootCa) {
    let key = PrivateKey::generate(key_type).unwrap();
    let now = SystemTime::now();
    let plan = IntermediatePlan {
        subject: subject_name(org, cn).unwrap(),
        public_key: key.public_key_info().unwrap(),
        serial: random_serial().unwrap(),
        not_before: now - Duration::from_secs(60),
        not_after: now + ttl,
    };
    let algorithm = SignatureAlgorithm::for_key_type(key_type);
    let tbs = root_tbs(&plan, algorithm).unwrap();
    let (signed_with, signature) = sign_with(&key, &tbs).unwrap();
    assert_eq!(signed_with, algorithm);
    let cert = Certificate::from_der(&assemble(&tbs, algorithm, &signature).unwrap()).unwrap();
    (key, RootCa::from_certificate(cert).unwrap())
}

/// A complete `cacerts` bundle: an intermediate for mesh `cn` (org `org`, key type
/// `key_type`) valid from `not_before` to `not_after`, signed in software by `root`.
pub fn software_bundle(
    root_key: &PrivateKey,
    root: &RootCa,
    org: &str,
    cn: &str,
    key_type: KeyType,
    not_before: SystemTime,
    not_after: SystemTime,
) -> super::bundle::BundleFiles {
    use super::profile::intermediate_tbs;
    let key = PrivateKey::generate(key_type).unwrap();
    let plan = IntermediatePlan {
        subject: subject_name(org, cn).unwrap(),
        public_key: key.public_key_info().unwrap(),
        serial: random_serial().unwrap(),
        not_before,
        not_after,
    };
    let tbs = intermediate_tbs(&plan, root, &[]).unwrap();
    let (algorithm, signature) = sign_with(root_key, &tbs).unwrap();
    let cert = Certificate::from_der(&assemble(&tbs, algorithm, &signature).unwrap()).unwrap();
    let cert_pem = super::pem::certificate_pem(&cert);
    super::bundle::BundleFiles {
        ca_cert: cert_pem.clone(),
        ca_key: key.to_pkcs8_pem().unwrap().to_string(),
        cert_chain: format!("{cert_pem}{}", root.pem),
        root_cert: root.pem.clone(),
    }
}

/// A cross certificate for `announced` under `current`, signed in software with
/// `current_key` as the token would sign it.
pub fn software_cross(
    current_key: &PrivateKey,
    current: &RootCa,
    announced: &RootCa,
) -> Certificate {
    let plan = super::cross::cross_plan(announced, current, SystemTime::now()).unwrap();
    let tbs = super::profile::cross_tbs(&plan, announced, current).unwrap();
    let (algorithm, signature) = sign_with(current_key, &tbs).unwrap();
    Certificate::from_der(&assemble(&tbs, algorithm, &signature).unwrap()).unwrap()
}
