//! Certificates as the tests make and check them with the `openssl` CLI, the independent
//! implementation: CSRs for keys and extensions meshca would never produce, the root's
//! self-signature and profile, a signer's answer as a cacerts directory, the chain check.

use std::path::Path;

use der::EncodePem;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::subject_name;
use serde_json::Value;

use super::{Env, EnvSpec, openssl, text, write};

/// `genpkey` arguments of keys meshca refuses, for [`openssl_csr`].
pub const KEYGEN_P521: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"];
pub const KEYGEN_ED25519: &[&str] = &["-algorithm", "ED25519"];
pub const KEYGEN_RSA1024: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"];
pub const KEYGEN_RSA_EXPONENT_3: &[&str] = &[
    "-algorithm",
    "RSA",
    "-pkeyopt",
    "rsa_keygen_bits:2048",
    "-pkeyopt",
    "rsa_keygen_pubexp:3",
];

/// A well-formed P-256 CSR for O=org, CN=cn whose subject was then changed to CN=renamed:
/// its signature no longer verifies (proof of possession fails).
pub fn tampered_csr(org: &str, cn: &str, renamed: &str) -> String {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut req = build_csr(&key, subject_name(org, cn).unwrap()).unwrap();
    req.info.subject = subject_name(org, renamed).unwrap();
    req.to_pem(der::pem::LineEnding::LF).unwrap()
}

/// A CSR made by openssl: a `genpkey` key with `keygen`, then `req -new` with `subject`
/// and `extra` arguments (e.g. `-addext`). Files go to `dir` as `{name}.key|.csr`.
pub fn openssl_csr(
    dir: &Path,
    name: &str,
    keygen: &[&str],
    subject: &str,
    extra: &[&str],
) -> String {
    let key = format!("{name}.key");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(keygen);
    args.extend_from_slice(&["-out", &key]);
    openssl(dir, &args);
    let out = format!("{name}.csr");
    let mut args = vec!["req", "-new", "-key", &key, "-subj", subject, "-out", &out];
    args.extend_from_slice(extra);
    openssl(dir, &args);
    std::fs::read_to_string(dir.join(out)).unwrap()
}

/// Asserts openssl verifies the environment's root-cert.pem as self-signed (`tag` names
/// the case in the message) and returns openssl's text of it.
pub fn openssl_root_text(env: &Env, tag: &str) -> String {
    let root = env.path("root-cert.pem");
    let root = root.to_str().unwrap();
    let verified = openssl(env.dir.path(), &["verify", "-CAfile", root, root]);
    assert!(verified.contains(": OK"), "{tag}: {verified}");
    openssl(env.dir.path(), &["x509", "-in", root, "-noout", "-text"])
}

/// Writes a signing answer's certificate, chain and root as a cacerts directory's files.
pub fn write_answer(dir: &Path, answer: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    write(dir, "ca-cert.pem", answer["certificate"].as_str().unwrap());
    write(dir, "cert-chain.pem", answer["certChain"].as_str().unwrap());
    write(dir, "root-cert.pem", answer["rootCert"].as_str().unwrap());
}

/// `openssl verify` of a cacerts directory's ca-cert.pem through cert-chain.pem to
/// root-cert.pem; returns what openssl printed.
pub fn openssl_verify_bundle(dir: &Path) -> String {
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "ca-cert.pem",
        ],
    )
}

/// `meshca serve` with another environment's root certificate in place of this one's:
/// asserts that the signer refuses to start, and returns its stderr.
pub fn serve_with_a_foreign_root(env: &Env) -> String {
    let other = Env::with(EnvSpec::default());
    std::fs::copy(other.path("root-cert.pem"), env.path("root-cert.pem")).unwrap();
    let out = env.run_with_config(&["serve"]);
    assert!(!out.status.success());
    text(&out.stderr)
}
